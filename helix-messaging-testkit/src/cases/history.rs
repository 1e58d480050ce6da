//! Cases for what a topic keeps and where a group stands in it: the history read by time
//! range, groups starting from the earliest message or from a time, and a group's backlog.
//! Together because each reads back what was published before the reader came.

use std::time::{Duration, SystemTime};

use futures::StreamExt;
use helix_messaging_core::{
    ErrorKind, Message, Result, StartPosition, SubscribeOptions, TimeRange,
};

use crate::helpers::{Ctx, eventually, fresh_name};

/// A group's backlog: zero before it exists, every message published while it has no
/// member, and after two of five are acked and the subscription dropped, the other three
/// (waiting, or in flight where the backend counts what it handed out); a bad name is
/// refused.
pub async fn backlog_counts_what_the_group_has_not_finished(ctx: Ctx) -> Result<()> {
    let topic = ctx.topic("backlog");
    let group = "lagging";
    assert_eq!(
        ctx.broker.backlog(&topic, group).await?.lag(),
        0,
        "a group that never subscribed"
    );
    ctx.create_group(&topic, group).await?;
    // One publish per request: some Kafka-protocol brokers report the high watermark of a
    // batched produce short.
    for i in 0..5 {
        ctx.publish(&topic, Message::new(format!("m{i}"))).await;
    }
    let broker = ctx.broker.clone();
    let waiting = eventually(ctx.settings.receive_timeout, "five waiting", || {
        let broker = broker.clone();
        let topic = topic.clone();
        async move {
            let backlog = broker.backlog(&topic, group).await.ok()?;
            // Once five are counted, nothing may be in flight: the subscription that made
            // the group is gone, so what its last read took is given back.
            (backlog.lag() == 5 && backlog.in_flight.is_none_or(|n| n == 0)).then_some(backlog)
        }
    })
    .await;
    assert_eq!(waiting.waiting, 5, "nothing is in flight yet: {waiting:?}");
    assert!(waiting.in_flight.is_none_or(|n| n == 0), "{waiting:?}");

    let mut sub = ctx
        .subscribe(&topic, SubscribeOptions::group(group).with_prefetch(1))
        .await;
    for _ in 0..2 {
        ctx.recv(&mut sub).await.ack().await?;
    }
    drop(sub);
    let broker = ctx.broker.clone();
    eventually(ctx.settings.receive_timeout, "three left", || {
        let broker = broker.clone();
        let topic = topic.clone();
        async move {
            let backlog = broker.backlog(&topic, group).await.ok()?;
            (backlog.lag() == 3).then_some(())
        }
    })
    .await;
    let err = ctx
        .broker
        .backlog(&topic, "bad group!")
        .await
        .expect_err("a bad group name");
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
    Ok(())
}

/// A backend without backlog reporting says so with `Unsupported`.
pub async fn backlog_is_declared_honestly(ctx: Ctx) -> Result<()> {
    if ctx.broker.capabilities().backlog {
        return Ok(());
    }
    let err = ctx
        .broker
        .backlog(&ctx.topic("backlog"), "g")
        .await
        .expect_err("no backlog without the capability");
    assert_eq!(err.kind(), ErrorKind::Unsupported, "{err}");
    Ok(())
}

/// Reading the history by time range returns exactly the messages recorded in the window.
pub async fn read_range_returns_exactly_the_window(ctx: Ctx) -> Result<()> {
    let topic = ctx.topic("range");
    // Backends record times at millisecond resolution (Redis stream ids, Kafka
    // timestamps), so a message published in the same millisecond as a boundary may be
    // recorded on either side of it. Gaps on both sides of each boundary keep every message
    // unambiguously inside or outside.
    let gap = Duration::from_millis(150);
    for i in 0..2 {
        ctx.publish(&topic, Message::new(format!("before {i}")))
            .await;
    }
    tokio::time::sleep(gap).await;
    let from = SystemTime::now();
    tokio::time::sleep(gap).await;
    let mut inside = Vec::new();
    for i in 0..3 {
        let m = Message::new(format!("inside {i}")).with_key("k");
        inside.push(m.id().to_owned());
        ctx.publish(&topic, m).await;
    }
    tokio::time::sleep(gap).await;
    let to = SystemTime::now();
    tokio::time::sleep(gap).await;
    for i in 0..2 {
        ctx.publish(&topic, Message::new(format!("after {i}")))
            .await;
    }
    let range = TimeRange::new(from, to)?;
    let entries: Vec<_> = tokio::time::timeout(
        ctx.settings.receive_timeout,
        ctx.broker
            .read_range(&topic, range)
            .await?
            .collect::<Vec<_>>(),
    )
    .await
    .expect("history read finished in time");
    let mut got = Vec::new();
    for entry in entries {
        let entry = entry?;
        assert!(
            range.contains(entry.recorded_at),
            "entry recorded at {:?} is outside the window",
            entry.recorded_at
        );
        got.push(entry.message.id().to_owned());
    }
    assert_eq!(got, inside, "exactly the window, oldest first");
    Ok(())
}

/// A new group told to start from the earliest retained message receives the history first.
pub async fn new_group_starts_from_earliest(ctx: Ctx) -> Result<()> {
    let topic = ctx.topic("earliest");
    let mut sent = Vec::new();
    for i in 0..3 {
        let m = Message::new(format!("old {i}")).with_key("k");
        sent.push(m.id().to_owned());
        ctx.publish(&topic, m).await;
    }
    let options = SubscribeOptions::group(fresh_name("late")).with_start(StartPosition::Earliest);
    let mut sub = ctx.subscribe(&topic, options).await;
    let newer = Message::new("new").with_key("k");
    ctx.publish(&topic, newer.clone()).await;
    sent.push(newer.id().to_owned());
    assert_eq!(ctx.recv_ack_ids(&mut sub, 4).await, sent);
    ctx.expect_quiet(&mut sub).await;
    Ok(())
}

/// A group starting at a time skips older history only: a live message published after the
/// group joined arrives even when its own timestamp is older than the start.
pub async fn live_messages_stamped_before_a_time_start_arrive(ctx: Ctx) -> Result<()> {
    let topic = ctx.topic("time-start");
    let start = SystemTime::now() - Duration::from_secs(60);
    let mut sub = ctx
        .subscribe(
            &topic,
            SubscribeOptions::group(fresh_name("g")).with_start(StartPosition::Time(start)),
        )
        .await;
    let backdated = Message::new("live, stamped an hour ago")
        .with_key("k")
        .with_timestamp(SystemTime::now() - Duration::from_secs(3600));
    ctx.publish(&topic, backdated.clone()).await;
    let got = ctx.recv_ack_ids(&mut sub, 1).await;
    assert_eq!(got, vec![backdated.id().to_owned()]);
    ctx.expect_quiet(&mut sub).await;
    Ok(())
}
