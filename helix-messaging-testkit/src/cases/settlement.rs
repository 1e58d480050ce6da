//! Cases for consumer groups and settlement: fan-out and load sharing, nack, reject and a
//! second settlement, a requeue kept to its group, prefetch windows, and settling after a
//! close. Together because each checks how a group shares out, settles and holds back its
//! deliveries.

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use helix_messaging_core::{ErrorKind, Message, Result, SubscribeOptions, TimeRange};

use crate::helpers::{Ctx, fresh_name};

/// Every group gets every message.
pub async fn fan_out_to_groups(ctx: Ctx) -> Result<()> {
    let topic = ctx.topic("fan-out");
    let mut g1 = ctx
        .subscribe(&topic, SubscribeOptions::group(fresh_name("g1")))
        .await;
    let mut g2 = ctx
        .subscribe(&topic, SubscribeOptions::group(fresh_name("g2")))
        .await;
    let sent: HashSet<String> = {
        let mut ids = HashSet::new();
        for i in 0..10 {
            let m = Message::new(format!("event {i}")).with_key(format!("k{i}"));
            ids.insert(m.id().to_owned());
            ctx.publish(&topic, m).await;
        }
        ids
    };
    let got1: HashSet<String> = ctx.recv_ack_ids(&mut g1, 10).await.into_iter().collect();
    let got2: HashSet<String> = ctx.recv_ack_ids(&mut g2, 10).await.into_iter().collect();
    assert_eq!(got1, sent, "group 1 got every message");
    assert_eq!(got2, sent, "group 2 got every message");
    ctx.expect_quiet(&mut g1).await;
    ctx.expect_quiet(&mut g2).await;
    Ok(())
}

/// Two members of one group both receive work; together they receive everything, nothing
/// twice. Each member holds its deliveries unacked until the other has received one, so with
/// a prefetch of 5 the first member cannot take everything.
pub async fn group_load_sharing(ctx: Ctx) -> Result<()> {
    let topic = ctx.topic("sharing");
    let group = fresh_name("workers");
    let options = SubscribeOptions::group(&group).with_prefetch(5);
    let mut members = [
        ctx.subscribe(&topic, options.clone()).await,
        ctx.subscribe(&topic, options).await,
    ];
    let mut sent = HashSet::new();
    for i in 0..40 {
        let m = Message::new(format!("task {i}")).with_key(format!("key-{i}"));
        sent.insert(m.id().to_owned());
        ctx.publish(&topic, m).await;
    }
    let mut got: [Vec<String>; 2] = [Vec::new(), Vec::new()];
    let mut held: Vec<helix_messaging_core::Delivery> = Vec::new();
    let deadline = tokio::time::Instant::now() + ctx.settings.receive_timeout * 4;
    while got[0].len() + got[1].len() < sent.len() {
        let [a, b] = &mut members;
        let (who, next) = tokio::select! {
            next = a.next() => (0, next),
            next = b.next() => (1, next),
            () = tokio::time::sleep_until(deadline) => panic!(
                "group members received only {} + {} of {} messages",
                got[0].len(), got[1].len(), sent.len()
            ),
        };
        let d = next.expect("subscription ended")?;
        got[who].push(d.message().id().to_owned());
        held.push(d);
        if !got[0].is_empty() && !got[1].is_empty() {
            for d in held.drain(..) {
                d.ack().await?;
            }
        }
    }
    for d in held.drain(..) {
        d.ack().await?;
    }
    assert!(!got[0].is_empty(), "member 1 received no work");
    assert!(!got[1].is_empty(), "member 2 received no work");
    let all: Vec<&String> = got[0].iter().chain(&got[1]).collect();
    let unique: HashSet<&String> = all.iter().copied().collect();
    assert_eq!(all.len(), unique.len(), "a message was delivered twice");
    assert_eq!(unique, sent.iter().collect(), "union is everything");
    for m in &mut members {
        ctx.expect_quiet(m).await;
    }
    Ok(())
}

/// `nack(requeue = true)` redelivers the same message with attempt + 1 and the redelivered
/// flag; after the ack it is gone.
pub async fn nack_requeue_redelivers(ctx: Ctx) -> Result<()> {
    let topic = ctx.topic("nack");
    let mut sub = ctx
        .subscribe(&topic, SubscribeOptions::group(fresh_name("g")))
        .await;
    let m = Message::new("retry me");
    ctx.publish(&topic, m.clone()).await;
    let first = ctx.recv(&mut sub).await;
    assert_eq!(first.message().id(), m.id());
    assert_eq!(first.attempt(), 1);
    assert!(!first.info().redelivered);
    first.nack(true).await?;

    let second = ctx.recv(&mut sub).await;
    assert_eq!(second.message().id(), m.id(), "the same message comes back");
    assert_eq!(second.attempt(), 2, "attempt is incremented");
    assert!(second.info().redelivered, "redelivered flag is set");
    assert_eq!(second.message().payload(), m.payload());
    second.nack(true).await?;

    let third = ctx.recv(&mut sub).await;
    assert_eq!(third.message().id(), m.id());
    assert_eq!(third.attempt(), 3);
    third.ack().await?;
    ctx.expect_quiet(&mut sub).await;
    Ok(())
}

/// A rejected message is not delivered again; the subscription goes on with the next one.
pub async fn reject_does_not_redeliver(ctx: Ctx) -> Result<()> {
    let topic = ctx.topic("reject");
    let mut sub = ctx.subscribe(&topic, SubscribeOptions::default()).await;
    let poison = Message::new("poison");
    let next = Message::new("fine");
    ctx.publish(&topic, poison.clone()).await;
    let d = ctx.recv(&mut sub).await;
    assert_eq!(d.message().id(), poison.id());
    d.reject().await?;
    ctx.publish(&topic, next.clone()).await;
    let d = ctx.recv(&mut sub).await;
    assert_eq!(
        d.message().id(),
        next.id(),
        "the rejected message came back"
    );
    d.ack().await?;
    ctx.expect_quiet(&mut sub).await;
    Ok(())
}

/// A second settlement of a delivery returns `AlreadySettled` and changes nothing: an acked
/// message does not come back after a late nack.
pub async fn double_settle_is_refused(ctx: Ctx) -> Result<()> {
    let topic = ctx.topic("double-settle");
    let mut sub = ctx.subscribe(&topic, SubscribeOptions::default()).await;
    ctx.publish(&topic, Message::new("once")).await;
    let d = ctx.recv(&mut sub).await;
    d.ack().await?;
    assert!(d.is_settled());
    for (what, err) in [
        ("ack", d.ack().await),
        ("nack", d.nack(true).await),
        ("reject", d.reject().await),
    ] {
        let err = err.expect_err(what);
        assert_eq!(err.kind(), ErrorKind::AlreadySettled, "{what} after ack");
    }
    ctx.expect_quiet(&mut sub).await;

    ctx.publish(&topic, Message::new("rejected")).await;
    let d = ctx.recv(&mut sub).await;
    d.reject().await?;
    let err = d.ack().await.expect_err("ack after reject");
    assert_eq!(err.kind(), ErrorKind::AlreadySettled);
    ctx.expect_quiet(&mut sub).await;
    Ok(())
}

/// `nack(true)` in one group redelivers to that group only: another group receives the
/// message exactly once, and the history holds it once.
pub async fn requeue_reaches_only_its_group(ctx: Ctx) -> Result<()> {
    let topic = ctx.topic("requeue-groups");
    let mut g1 = ctx
        .subscribe(&topic, SubscribeOptions::group(fresh_name("g1")))
        .await;
    let mut g2 = ctx
        .subscribe(&topic, SubscribeOptions::group(fresh_name("g2")))
        .await;
    // The topic is new: the window can start well before the publish (backends record
    // times in whole milliseconds, so `now` could fall after the message's record time).
    let from = SystemTime::now() - Duration::from_secs(5);
    let m = Message::new("nacked in g1 only");
    ctx.publish(&topic, m.clone()).await;

    let first = ctx.recv(&mut g1).await;
    assert_eq!(first.message().id(), m.id());
    first.nack(true).await?;
    let again = ctx.recv(&mut g1).await;
    assert_eq!(again.message().id(), m.id(), "g1 gets its requeued message");
    assert_eq!(again.attempt(), 2);
    again.ack().await?;

    let other = ctx.recv(&mut g2).await;
    assert_eq!(other.message().id(), m.id());
    assert_eq!(other.attempt(), 1, "g2 sees a first delivery");
    assert!(!other.info().redelivered);
    other.ack().await?;
    ctx.expect_quiet(&mut g2).await;
    ctx.expect_quiet(&mut g1).await;

    if ctx.broker.capabilities().replay_by_time {
        let range = TimeRange::new(from, SystemTime::now() + Duration::from_secs(1))?;
        let entries: Vec<_> = tokio::time::timeout(
            ctx.settings.receive_timeout,
            ctx.broker
                .read_range(&topic, range)
                .await?
                .collect::<Vec<_>>(),
        )
        .await
        .expect("history read finished in time");
        let ids: Vec<String> = entries
            .into_iter()
            .map(|e| e.map(|e| e.message.id().to_owned()))
            .collect::<Result<_>>()?;
        assert_eq!(
            ids,
            vec![m.id().to_owned()],
            "a requeue adds nothing to the history"
        );
    }
    Ok(())
}

/// With a prefetch of 1, each ack lets the next message through.
pub async fn prefetch_one_keeps_flowing(ctx: Ctx) -> Result<()> {
    let topic = ctx.topic("prefetch-one");
    let group = fresh_name("g");
    let mut sub = ctx
        .subscribe(&topic, SubscribeOptions::group(&group).with_prefetch(1))
        .await;
    let sent: Vec<Message> = (0..4)
        .map(|i| Message::new(format!("one at a time {i}")).with_key("k"))
        .collect();
    for m in &sent {
        ctx.publish(&topic, m.clone()).await;
    }
    let got = ctx.recv_ack_ids(&mut sub, sent.len()).await;
    let expected: Vec<String> = sent.iter().map(|m| m.id().to_owned()).collect();
    assert_eq!(got, expected);
    ctx.expect_quiet(&mut sub).await;
    Ok(())
}

/// A consumer that holds its deliveries unsettled still receives up to its prefetch: the
/// window fills even when the last free slots are few (an application collecting a batch
/// before settling any must not wait forever), nothing beyond it arrives while all are held,
/// and each settlement lets one more through.
pub async fn a_held_window_fills_to_the_prefetch(ctx: Ctx) -> Result<()> {
    const WINDOW: usize = 10;
    let topic = ctx.topic("held-window");
    let group = fresh_name("g");
    let mut sub = ctx
        .subscribe(
            &topic,
            SubscribeOptions::group(&group).with_prefetch(WINDOW),
        )
        .await;
    let sent: Vec<Message> = (0..WINDOW + 2)
        .map(|i| Message::new(format!("held {i}")).with_key("k"))
        .collect();
    // Most of the window first, taken and held, so the rest is a read of its own.
    for m in &sent[..WINDOW - 2] {
        ctx.publish(&topic, m.clone()).await;
    }
    let mut held = ctx.recv_n(&mut sub, WINDOW - 2).await;
    for m in &sent[WINDOW - 2..] {
        ctx.publish(&topic, m.clone()).await;
    }
    held.extend(ctx.recv_n(&mut sub, 2).await);
    ctx.expect_quiet(&mut sub).await;

    let mut got = HashSet::new();
    for _ in 0..2 {
        let settled = held.remove(0);
        got.insert(settled.message().id().to_owned());
        settled.ack().await?;
        held.push(ctx.recv(&mut sub).await);
        ctx.expect_quiet(&mut sub).await;
    }
    for d in held {
        assert!(
            got.insert(d.message().id().to_owned()),
            "{} delivered twice",
            d.message().id()
        );
        d.ack().await?;
    }
    let expected: HashSet<String> = sent.iter().map(|m| m.id().to_owned()).collect();
    assert_eq!(got, expected, "every message once");
    ctx.expect_quiet(&mut sub).await;
    Ok(())
}

/// A delivery settled after its broker was closed reports an error: nothing was settled, and
/// `Ok` would be a lie.
pub async fn settling_after_close_fails(ctx: Ctx) -> Result<()> {
    let topic = ctx.topic("settle-closed");
    let mut sub = ctx.subscribe(&topic, SubscribeOptions::default()).await;
    ctx.publish(&topic, Message::new("a")).await;
    ctx.publish(&topic, Message::new("b")).await;
    let held = ctx.recv_n(&mut sub, 2).await;
    ctx.broker.close().await?;
    for (what, result) in [
        ("ack", held[0].ack().await),
        ("reject", held[1].reject().await),
    ] {
        let err = result.expect_err(what);
        assert!(
            matches!(
                err.kind(),
                ErrorKind::Closed | ErrorKind::Connection | ErrorKind::NotFound
            ),
            "{what} after close: unexpected kind {:?} ({err})",
            err.kind()
        );
    }
    Ok(())
}
