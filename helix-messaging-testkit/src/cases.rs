//! The conformance cases. Each takes a [`Ctx`] with a fresh broker and fails by panicking
//! (assertions) or returning a broker error.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use helix_messaging_core::{
    ErrorKind, Message, Result, StartPosition, SubscribeOptions, TimeRange,
};

use crate::{Case, Ctx, Needs};

mod reliability;
mod replay;
pub use reliability::*;
pub use replay::*;

macro_rules! cases {
    ($($name:ident: [$($need:ident),*];)*) => {
        /// Every case, in the order the runner reports them.
        pub const ALL: &[Case] = &[
            $(Case::new(stringify!($name), &[$(Needs::$need),*], |ctx| $name(ctx).boxed()),)*
        ];
    };
}

cases! {
    round_trip: [Metadata];
    batch_publish: [Metadata];
    per_key_ordering: [Metadata, PerKeyOrdering];
    topic_isolation: [Metadata];
    fan_out_to_groups: [ConsumerGroups];
    group_load_sharing: [ConsumerGroups];
    nack_requeue_redelivers: [Redelivery];
    reject_does_not_redeliver: [Metadata];
    double_settle_is_refused: [];
    dropped_subscription_hands_over_unacked: [ConsumerGroups, RedeliverUnacked];
    concurrent_publishers_exactly_once: [Metadata];
    priority_order: [ConsumerGroups, Priority];
    ttl_expiry: [ConsumerGroups, Ttl];
    read_range_returns_exactly_the_window: [ReplayByTime];
    new_group_starts_from_earliest: [ConsumerGroups, ReplayByTime];
    invalid_names_are_refused: [];
    oversized_payload_is_refused: [PayloadLimit];
    closed_broker_refuses_work: [];
    requeue_reaches_only_its_group: [ConsumerGroups, Redelivery];
    crash_loop_counts_every_attempt: [ConsumerGroups, RedeliverUnacked];
    prefetch_one_keeps_flowing: [Redelivery];
    a_held_window_fills_to_the_prefetch: [ConsumerGroups];
    live_messages_stamped_before_a_time_start_arrive: [ConsumerGroups, ReplayByTime];
    zero_ttl_is_never_delivered: [Ttl];
    settling_after_close_fails: [];
    prefetched_but_unseen_is_not_an_attempt: [ConsumerGroups, RedeliverUnacked];
    an_owner_that_never_received_it_keeps_its_attempts: [ConsumerGroups, RedeliverUnacked];
    an_ack_past_a_crashed_message_stays_acked: [ConsumerGroups, RedeliverUnacked];
    prefetched_by_two_owners_in_turn_is_no_attempt: [ConsumerGroups, RedeliverUnacked];
    successive_members_of_a_group_lose_nothing: [ConsumerGroups, RedeliverUnacked];
    close_ends_subscriptions_promptly_and_commits_nothing_held: [ConsumerGroups, RedeliverUnacked];
    delayed_requeue_holds_the_message_back: [ConsumerGroups, DelayedDelivery];
    delayed_requeue_is_declared_honestly: [];
    retry_then_dead_letter_after_exact_attempts: [ConsumerGroups, Redelivery];
    undecodable_is_dead_lettered_on_first_delivery: [ConsumerGroups];
    poison_message_does_not_stall_the_others: [ConsumerGroups, Redelivery];
    processor_ingests_lists_and_reprocesses: [ConsumerGroups];
    malformed_payloads_reach_the_dlq_after_one_delivery: [ConsumerGroups];
    replay_copies_exactly_the_window: [ReplayByTime];
    replay_skips_duplicate_ids: [ReplayByTime];
    replay_cancel_stops_within_one_batch: [ReplayByTime];
    replay_resumes_after_restart_without_duplicates: [ReplayByTime];
    replay_is_declared_honestly: [];
    backlog_counts_what_the_group_has_not_finished: [ConsumerGroups, Backlog];
    backlog_is_declared_honestly: [];
}

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
    let waiting = crate::eventually(ctx.settings.receive_timeout, "five waiting", || {
        let broker = broker.clone();
        let topic = topic.clone();
        async move {
            let backlog = broker.backlog(&topic, group).await.ok()?;
            (backlog.lag() == 5).then_some(backlog)
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
    crate::eventually(ctx.settings.receive_timeout, "three left", || {
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

/// Payload, key, headers (non-ASCII values too), ids and metadata survive the trip; an empty
/// and a 1 MiB payload too. First delivery has attempt 1 and is not flagged redelivered.
pub async fn round_trip(ctx: Ctx) -> Result<()> {
    let topic = ctx.topic("round-trip");
    let mut sub = ctx.subscribe(&topic, SubscribeOptions::default()).await;

    let big: Bytes = (0..1024 * 1024).map(|i| (i % 251) as u8).collect();
    let sent = vec![
        Message::new("hello, world")
            .with_key("key-1")
            .with_header("type", "greeting")
            .with_header("lang", "日本語 — ünïcödé ✓")
            .with_content_type("text/plain; charset=utf-8")
            .with_correlation_id("corr-42"),
        Message::new(Bytes::new()).with_header("kind", "empty"),
        Message::new(big).with_header("kind", "big"),
    ];
    for m in &sent {
        ctx.publish(&topic, m.clone()).await;
    }
    let mut received = BTreeMap::new();
    for d in ctx.recv_n(&mut sub, sent.len()).await {
        assert_eq!(&*d.info().topic, topic.as_str());
        assert_eq!(d.attempt(), 1, "first delivery has attempt 1");
        assert!(!d.info().redelivered, "first delivery is not redelivered");
        received.insert(d.message().id().to_owned(), d.message().clone());
        d.ack().await?;
    }
    for m in &sent {
        let got = received
            .get(m.id())
            .unwrap_or_else(|| panic!("message {} not received", m.id()));
        assert_eq!(got.payload(), m.payload(), "payload of {}", m.id());
        assert_eq!(got.key(), m.key(), "key of {}", m.id());
        assert_eq!(got.headers(), m.headers(), "headers of {}", m.id());
        assert_eq!(got.content_type(), m.content_type());
        assert_eq!(got.correlation_id(), m.correlation_id());
        let skew = got
            .timestamp()
            .duration_since(m.timestamp())
            .or_else(|e| Ok::<_, ()>(e.duration()))
            .expect("duration");
        assert!(
            skew < Duration::from_secs(1),
            "timestamp of {} moved by {skew:?}",
            m.id()
        );
    }
    ctx.expect_quiet(&mut sub).await;
    Ok(())
}

/// A batch publish is accepted whole and every message arrives (in order where the backend
/// orders by key). The batch is larger than the pipelines and chunks adapters split a batch
/// into (Redis: 1,000 commands, in flight together), so order across chunks is checked too,
/// and than the default prefetch, so a consumer fills its window in the middle of what it
/// fetched (the Kafka adapter once lost or stalled on the rest of a batch when it paused
/// there).
pub async fn batch_publish(ctx: Ctx) -> Result<()> {
    const BATCH: usize = 2_500;
    let topic = ctx.topic("batch");
    let mut sub = ctx.subscribe(&topic, SubscribeOptions::default()).await;
    let batch: Vec<Message> = (0..BATCH)
        .map(|i| Message::new(format!("m{i}")).with_key("one-key"))
        .collect();
    let ids: Vec<String> = batch.iter().map(|m| m.id().to_owned()).collect();
    let report = ctx.broker.publish_batch(&topic, batch).await;
    assert_eq!(report.total(), BATCH);
    report.into_result()?;
    let got = ctx.recv_ack_ids(&mut sub, ids.len()).await;
    if ctx.broker.capabilities().per_key_ordering {
        assert_eq!(got, ids, "batch order is kept for one key");
    } else {
        let got: HashSet<_> = got.into_iter().collect();
        assert_eq!(got, ids.into_iter().collect::<HashSet<_>>());
    }
    ctx.expect_quiet(&mut sub).await;
    Ok(())
}

/// Messages with the same key arrive in publish order, with keys interleaved.
pub async fn per_key_ordering(ctx: Ctx) -> Result<()> {
    let topic = ctx.topic("ordering");
    let mut sub = ctx.subscribe(&topic, SubscribeOptions::default()).await;
    let keys = ["alpha", "beta", "gamma"];
    for i in 0..50u32 {
        for key in keys {
            let m = Message::new(format!("{key}-{i}"))
                .with_key(key)
                .with_header("seq", i.to_string());
            ctx.publish(&topic, m).await;
        }
    }
    let mut last: BTreeMap<String, i64> = BTreeMap::new();
    for _ in 0..150 {
        let d = ctx.recv(&mut sub).await;
        let key = d.message().key().expect("key kept").to_owned();
        let seq: i64 = d
            .message()
            .header("seq")
            .expect("seq header")
            .parse()
            .expect("number");
        let prev = last.insert(key.clone(), seq).unwrap_or(-1);
        assert_eq!(seq, prev + 1, "key {key}: got seq {seq} after {prev}");
        d.ack().await?;
    }
    ctx.expect_quiet(&mut sub).await;
    Ok(())
}

/// A subscriber never sees another topic's messages.
pub async fn topic_isolation(ctx: Ctx) -> Result<()> {
    let a = ctx.topic("iso-a");
    let b = ctx.topic("iso-b");
    let mut sub_a = ctx.subscribe(&a, SubscribeOptions::default()).await;
    let mut sub_b = ctx.subscribe(&b, SubscribeOptions::default()).await;
    let to_a: Vec<Message> = (0..3).map(|i| Message::new(format!("a{i}"))).collect();
    for m in &to_a {
        ctx.publish(&a, m.clone()).await;
    }
    let got: HashSet<String> = ctx.recv_ack_ids(&mut sub_a, 3).await.into_iter().collect();
    assert_eq!(got, to_a.iter().map(|m| m.id().to_owned()).collect());
    ctx.expect_quiet(&mut sub_b).await;

    let to_b = Message::new("b0");
    ctx.publish(&b, to_b.clone()).await;
    assert_eq!(
        ctx.recv_ack_ids(&mut sub_b, 1).await,
        vec![to_b.id().to_owned()]
    );
    ctx.expect_quiet(&mut sub_a).await;
    Ok(())
}

/// Every group gets every message.
pub async fn fan_out_to_groups(ctx: Ctx) -> Result<()> {
    let topic = ctx.topic("fan-out");
    let mut g1 = ctx
        .subscribe(&topic, SubscribeOptions::group(crate::fresh_name("g1")))
        .await;
    let mut g2 = ctx
        .subscribe(&topic, SubscribeOptions::group(crate::fresh_name("g2")))
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
    let group = crate::fresh_name("workers");
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
        .subscribe(&topic, SubscribeOptions::group(crate::fresh_name("g")))
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

/// Unacked deliveries of a dropped subscription go to the next member of the group.
pub async fn dropped_subscription_hands_over_unacked(ctx: Ctx) -> Result<()> {
    let topic = ctx.topic("handover");
    let group = crate::fresh_name("g");
    let mut first = ctx
        .subscribe(&topic, SubscribeOptions::group(&group).with_prefetch(10))
        .await;
    let mut sent = HashSet::new();
    for i in 0..5 {
        let m = Message::new(format!("job {i}")).with_key("jobs");
        sent.insert(m.id().to_owned());
        ctx.publish(&topic, m).await;
    }
    let held = ctx.recv_n(&mut first, 5).await;
    let held_ids: HashSet<String> = held.iter().map(|d| d.message().id().to_owned()).collect();
    assert_eq!(held_ids, sent);
    drop(held);
    drop(first);

    let mut second = ctx.subscribe(&topic, SubscribeOptions::group(&group)).await;
    let got: HashSet<String> = ctx.recv_ack_ids(&mut second, 5).await.into_iter().collect();
    assert_eq!(got, sent, "every unacked message was handed over");
    ctx.expect_quiet(&mut second).await;
    Ok(())
}

/// 20 publishers × 500 messages, all received exactly once.
pub async fn concurrent_publishers_exactly_once(ctx: Ctx) -> Result<()> {
    const PUBLISHERS: usize = 20;
    const EACH: usize = 500;
    let topic = ctx.topic("concurrent");
    let mut sub = ctx
        .subscribe(&topic, SubscribeOptions::default().with_prefetch(500))
        .await;
    let publishers: Vec<_> = (0..PUBLISHERS)
        .map(|p| {
            let broker = ctx.broker.clone();
            let topic = topic.clone();
            tokio::spawn(async move {
                for i in 0..EACH {
                    let m = Message::new(format!("{p}:{i}"))
                        .with_id(format!("p{p}-m{i}"))
                        .with_key(format!("publisher-{p}"));
                    broker.publish(&topic, m).await?;
                }
                Ok::<_, helix_messaging_core::Error>(())
            })
        })
        .collect();
    let mut seen = HashSet::with_capacity(PUBLISHERS * EACH);
    for _ in 0..PUBLISHERS * EACH {
        let d = ctx.recv(&mut sub).await;
        let id = d.message().id().to_owned();
        assert!(seen.insert(id.clone()), "{id} received twice");
        d.ack().await?;
    }
    for p in publishers {
        p.await.expect("publisher task")?;
    }
    let expected: HashSet<String> = (0..PUBLISHERS)
        .flat_map(|p| (0..EACH).map(move |i| format!("p{p}-m{i}")))
        .collect();
    assert_eq!(seen, expected);
    ctx.expect_quiet(&mut sub).await;
    Ok(())
}

/// A backlog is delivered highest priority first, publish order within one priority.
pub async fn priority_order(ctx: Ctx) -> Result<()> {
    let topic = ctx.topic("priority");
    let group = crate::fresh_name("g");
    ctx.create_group(&topic, &group).await?;
    let priorities = [1u8, 5, 10, 0, 7, 3, 10, 5];
    let mut sent = Vec::new();
    for (i, p) in priorities.iter().enumerate() {
        let m = Message::new(format!("p{p}"))
            .with_id(format!("i{i}-p{p}"))
            .with_priority(*p);
        sent.push((*p, i, m.id().to_owned()));
        ctx.publish(&topic, m).await;
    }
    sent.sort_by_key(|(p, i, _)| (std::cmp::Reverse(*p), *i));
    let expected: Vec<String> = sent.into_iter().map(|(_, _, id)| id).collect();
    let mut sub = ctx
        .subscribe(&topic, SubscribeOptions::group(&group).with_prefetch(1))
        .await;
    let got = ctx.recv_ack_ids(&mut sub, expected.len()).await;
    assert_eq!(
        got, expected,
        "highest priority first, FIFO within a priority"
    );
    ctx.expect_quiet(&mut sub).await;
    Ok(())
}

/// A message whose TTL passes before delivery is never delivered; others are.
pub async fn ttl_expiry(ctx: Ctx) -> Result<()> {
    let topic = ctx.topic("ttl");
    let group = crate::fresh_name("g");
    ctx.create_group(&topic, &group).await?;
    let short = Message::new("expires").with_ttl(Duration::from_millis(100));
    let plain = Message::new("stays");
    let long = Message::new("stays too").with_ttl(Duration::from_secs(300));
    for m in [&short, &plain, &long] {
        ctx.publish(&topic, m.clone()).await;
    }
    // Lets the short TTL pass for certain before anyone consumes.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut sub = ctx.subscribe(&topic, SubscribeOptions::group(&group)).await;
    // Keyless messages may travel different partitions: which arrive is the point, not in
    // what order (ordering is `per_key_ordering`'s case).
    let got: HashSet<String> = ctx.recv_ack_ids(&mut sub, 2).await.into_iter().collect();
    let expected: HashSet<String> = [plain.id().to_owned(), long.id().to_owned()].into();
    assert_eq!(got, expected, "the unexpired messages, and only those");
    ctx.expect_quiet(&mut sub).await;
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
    let options =
        SubscribeOptions::group(crate::fresh_name("late")).with_start(StartPosition::Earliest);
    let mut sub = ctx.subscribe(&topic, options).await;
    let newer = Message::new("new").with_key("k");
    ctx.publish(&topic, newer.clone()).await;
    sent.push(newer.id().to_owned());
    assert_eq!(ctx.recv_ack_ids(&mut sub, 4).await, sent);
    ctx.expect_quiet(&mut sub).await;
    Ok(())
}

/// Empty or illegal topic and group names are refused with `InvalidInput`.
pub async fn invalid_names_are_refused(ctx: Ctx) -> Result<()> {
    let err = ctx
        .broker
        .publish("", Message::new("x"))
        .await
        .expect_err("empty topic");
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    let err = ctx
        .broker
        .publish("has space", Message::new("x"))
        .await
        .expect_err("topic with a space");
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    let err = ctx
        .broker
        .subscribe("tasks/llm", SubscribeOptions::default())
        .await
        .expect_err("topic with a slash");
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    let err = ctx
        .broker
        .subscribe(&ctx.topic("ok"), SubscribeOptions::group("bad group"))
        .await
        .expect_err("group with a space");
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    Ok(())
}

/// A payload over the declared limit is refused with `PayloadTooLarge`, not truncated.
pub async fn oversized_payload_is_refused(ctx: Ctx) -> Result<()> {
    let limit = ctx
        .broker
        .capabilities()
        .max_payload_bytes
        .expect("case needs a payload limit");
    let topic = ctx.topic("too-big");
    let mut sub = ctx.subscribe(&topic, SubscribeOptions::default()).await;
    let err = ctx
        .broker
        .publish(&topic, Message::new(vec![0u8; limit + 1]))
        .await
        .expect_err("oversized payload");
    assert_eq!(err.kind(), ErrorKind::PayloadTooLarge);
    ctx.expect_quiet(&mut sub).await;
    Ok(())
}

/// After close, publish and subscribe fail with `Closed` and open subscriptions end.
pub async fn closed_broker_refuses_work(ctx: Ctx) -> Result<()> {
    let topic = ctx.topic("closed");
    let mut sub = ctx.subscribe(&topic, SubscribeOptions::default()).await;
    ctx.broker.close().await?;
    let err = ctx
        .broker
        .publish(&topic, Message::new("late"))
        .await
        .expect_err("publish after close");
    assert_eq!(err.kind(), ErrorKind::Closed);
    let err = ctx
        .broker
        .subscribe(&topic, SubscribeOptions::default())
        .await
        .expect_err("subscribe after close");
    assert_eq!(err.kind(), ErrorKind::Closed);
    let report = ctx
        .broker
        .publish_batch(&topic, vec![Message::new("a"), Message::new("b")])
        .await;
    assert_eq!(report.succeeded(), 0);
    assert!(
        report
            .failures()
            .iter()
            .all(|(_, e)| e.kind() == ErrorKind::Closed)
    );
    let end = tokio::time::timeout(ctx.settings.receive_timeout, sub.next())
        .await
        .expect("open subscription ends after close");
    assert!(end.is_none(), "subscription yielded instead of ending");
    ctx.broker.close().await?;
    Ok(())
}

/// `nack(true)` in one group redelivers to that group only: another group receives the
/// message exactly once, and the history holds it once.
pub async fn requeue_reaches_only_its_group(ctx: Ctx) -> Result<()> {
    let topic = ctx.topic("requeue-groups");
    let mut g1 = ctx
        .subscribe(&topic, SubscribeOptions::group(crate::fresh_name("g1")))
        .await;
    let mut g2 = ctx
        .subscribe(&topic, SubscribeOptions::group(crate::fresh_name("g2")))
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

/// A consumer that crashes (drops its delivery and subscription unsettled) again and again
/// sees the attempt count go 1, 2, 3, 4, 5: a retry limit can be reached.
pub async fn crash_loop_counts_every_attempt(ctx: Ctx) -> Result<()> {
    let topic = ctx.topic("crash-loop");
    let group = crate::fresh_name("g");
    ctx.create_group(&topic, &group).await?;
    let m = Message::new("poison").with_key("k");
    ctx.publish(&topic, m.clone()).await;
    for expected in 1..=5u32 {
        let mut sub = ctx
            .subscribe(&topic, SubscribeOptions::group(&group).with_prefetch(1))
            .await;
        let d = ctx.recv(&mut sub).await;
        assert_eq!(d.message().id(), m.id());
        assert_eq!(
            d.attempt(),
            expected,
            "attempt after {} crashes",
            expected - 1
        );
        assert_eq!(d.info().redelivered, expected > 1, "redelivered flag");
        if expected == 5 {
            d.ack().await?;
            ctx.expect_quiet(&mut sub).await;
        }
        // The crash: neither settled nor kept.
        drop(d);
        drop(sub);
    }
    Ok(())
}

/// With a prefetch of 1, each ack lets the next message through.
pub async fn prefetch_one_keeps_flowing(ctx: Ctx) -> Result<()> {
    let topic = ctx.topic("prefetch-one");
    let group = crate::fresh_name("g");
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
    let group = crate::fresh_name("g");
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

/// A group starting at a time skips older history only: a live message published after the
/// group joined arrives even when its own timestamp is older than the start.
pub async fn live_messages_stamped_before_a_time_start_arrive(ctx: Ctx) -> Result<()> {
    let topic = ctx.topic("time-start");
    let start = SystemTime::now() - Duration::from_secs(60);
    let mut sub = ctx
        .subscribe(
            &topic,
            SubscribeOptions::group(crate::fresh_name("g")).with_start(StartPosition::Time(start)),
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

/// A TTL of zero means the message expires as it is published: it is never delivered, even
/// to a consumer waiting for it.
pub async fn zero_ttl_is_never_delivered(ctx: Ctx) -> Result<()> {
    let topic = ctx.topic("ttl-zero");
    let group = crate::fresh_name("g");
    let mut sub = ctx.subscribe(&topic, SubscribeOptions::group(&group)).await;
    ctx.publish(&topic, Message::new("gone").with_ttl(Duration::ZERO))
        .await;
    let kept = Message::new("kept");
    ctx.publish(&topic, kept.clone()).await;
    assert_eq!(
        ctx.recv_ack_ids(&mut sub, 1).await,
        vec![kept.id().to_owned()]
    );
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

/// A fresh topic, a group created on it, and `n` messages `m0`, `m1`, … of one key
/// published to it, in order.
async fn a_group_with_messages(
    ctx: &Ctx,
    what: &str,
    n: usize,
) -> Result<(String, String, Vec<Message>)> {
    let topic = ctx.topic(what);
    let group = crate::fresh_name("g");
    ctx.create_group(&topic, &group).await?;
    let sent: Vec<Message> = (0..n)
        .map(|i| Message::new(format!("m{i}")).with_key("k"))
        .collect();
    for m in &sent {
        ctx.publish(&topic, m.clone()).await;
    }
    Ok((topic, group, sent))
}

/// A member of `group` that ends without taking anything, after time enough to prefetch
/// what waits, as a member busy elsewhere would.
async fn a_member_that_only_prefetches(ctx: &Ctx, topic: &str, group: &str) {
    let member = ctx.subscribe(topic, SubscribeOptions::group(group)).await;
    tokio::time::sleep(ctx.settings.quiet_period).await;
    drop(member);
}

/// The next member of `group` receives `m` at `attempt` (redelivered past the first), and
/// then nothing more.
async fn the_next_member_receives(
    ctx: &Ctx,
    topic: &str,
    group: &str,
    m: &Message,
    attempt: u32,
    why: &str,
) -> Result<()> {
    let mut next = ctx.subscribe(topic, SubscribeOptions::group(group)).await;
    let d = ctx.recv(&mut next).await;
    assert_eq!(d.message().id(), m.id());
    assert_eq!(
        (d.attempt(), d.info().redelivered),
        (attempt, attempt > 1),
        "{why}"
    );
    d.ack().await?;
    ctx.expect_quiet(&mut next).await;
    Ok(())
}

/// Attempts survive an owner that never received the message: after a crash at attempt 1,
/// a subscription that ends without taking anything (it may have prefetched the message, or
/// not fetched it yet) leaves the next one to receive it at attempt 2, not 1 again.
pub async fn an_owner_that_never_received_it_keeps_its_attempts(ctx: Ctx) -> Result<()> {
    let (topic, group, sent) = a_group_with_messages(&ctx, "unseen-owner", 1).await?;
    let mut first = ctx
        .subscribe(&topic, SubscribeOptions::group(&group).with_prefetch(1))
        .await;
    let d = ctx.recv(&mut first).await;
    assert_eq!((d.message().id(), d.attempt()), (sent[0].id(), 1));
    drop(first);
    drop(d);
    a_member_that_only_prefetches(&ctx, &topic, &group).await;
    the_next_member_receives(
        &ctx,
        &topic,
        &group,
        &sent[0],
        2,
        "the second owner never received it: its attempt 1 must not be forgotten",
    )
    .await
}

/// A message two members in turn only prefetched (each ended without taking anything)
/// reaches the third at attempt 1: no one has attempted it.
pub async fn prefetched_by_two_owners_in_turn_is_no_attempt(ctx: Ctx) -> Result<()> {
    let (topic, group, sent) = a_group_with_messages(&ctx, "prefetched-twice", 1).await?;
    for _ in 0..2 {
        a_member_that_only_prefetches(&ctx, &topic, &group).await;
    }
    the_next_member_receives(&ctx, &topic, &group, &sent[0], 1, "never attempted").await
}

/// A consumer that acks a later message and then crashes holding an earlier one of the same
/// key: the next consumer of the group receives the earlier one again, and never the one
/// that was acked (on Kafka the commit cannot pass the held message, so this is on the
/// adapter).
pub async fn an_ack_past_a_crashed_message_stays_acked(ctx: Ctx) -> Result<()> {
    let (topic, group, sent) = a_group_with_messages(&ctx, "ack-past-crash", 3).await?;
    let mut first = ctx
        .subscribe(&topic, SubscribeOptions::group(&group).with_prefetch(3))
        .await;
    let mut got = ctx.recv_n(&mut first, 3).await;
    let ids: Vec<&str> = got.iter().map(|d| d.message().id()).collect();
    let want: Vec<&str> = sent.iter().map(Message::id).collect();
    assert_eq!(ids, want, "in order");
    let held = got.remove(0);
    for d in got {
        d.ack().await?;
    }
    drop(first);
    drop(held);
    let mut next = ctx.subscribe(&topic, SubscribeOptions::group(&group)).await;
    let d = ctx.recv(&mut next).await;
    assert_eq!(
        (d.message().id(), d.attempt()),
        (sent[0].id(), 2),
        "the held one comes back"
    );
    d.ack().await?;
    ctx.expect_quiet(&mut next).await;
    Ok(())
}

/// Members of one group that follow each other, each taking its share, acking it and
/// leaving (with more prefetched than it took), lose nothing between them and repeat
/// nothing: 5,000 messages from 50 concurrent publishers, five members of 1,000 each.
pub async fn successive_members_of_a_group_lose_nothing(ctx: Ctx) -> Result<()> {
    const PUBLISHERS: usize = 50;
    const EACH: usize = 100;
    const MEMBERS: usize = 5;
    let total = PUBLISHERS * EACH;
    let topic = ctx.topic("successive");
    let group = crate::fresh_name("g");
    ctx.create_group(&topic, &group).await?;
    let publishing = (0..PUBLISHERS).map(|p| {
        let (ctx, topic) = (ctx.clone(), topic.clone());
        async move {
            for i in 0..EACH {
                ctx.publish(
                    &topic,
                    Message::new(format!("p{p} m{i}")).with_key(format!("p{p}")),
                )
                .await;
            }
        }
    });
    // Published while the members consume: a bounded backend holds publishers back until
    // there is room.
    let publishing = tokio::spawn(futures::future::join_all(publishing));
    let mut seen = HashSet::new();
    for member in 0..MEMBERS {
        let mut sub = ctx.subscribe(&topic, SubscribeOptions::group(&group)).await;
        for _ in 0..total / MEMBERS {
            let d = ctx.recv(&mut sub).await;
            let id = d.message().id().to_owned();
            d.ack().await?;
            assert!(
                seen.insert(id.clone()),
                "member {member} received {id} again"
            );
        }
        drop(sub);
    }
    publishing.await.expect("the publishers finished");
    assert_eq!(seen.len(), total, "every message, once");
    let mut last = ctx.subscribe(&topic, SubscribeOptions::group(&group)).await;
    ctx.expect_quiet(&mut last).await;
    Ok(())
}

/// Closing the broker ends its subscriptions within a few seconds, whatever their
/// deliveries' state (one is held unsettled here), and, on a durable backend, commits
/// nothing they held: another process's member of the group receives the held message
/// again, and not the acked one.
pub async fn close_ends_subscriptions_promptly_and_commits_nothing_held(ctx: Ctx) -> Result<()> {
    /// How long a subscription may outlive `close()` returning.
    const AFTER_CLOSE: Duration = Duration::from_secs(1);
    /// How long `close()` plus that may take in all, with a delivery held.
    const IN_ALL: Duration = Duration::from_secs(10);
    let (topic, group, sent) = a_group_with_messages(&ctx, "close-ends", 3).await?;
    let mut sub = ctx
        .subscribe(&topic, SubscribeOptions::group(&group).with_prefetch(2))
        .await;
    let held = ctx.recv(&mut sub).await;
    assert_eq!(held.message().id(), sent[0].id());
    let acked = ctx.recv(&mut sub).await;
    assert_eq!(acked.message().id(), sent[1].id());
    acked.ack().await?;

    let started = std::time::Instant::now();
    ctx.broker.close().await?;
    let closed_in = started.elapsed();
    let drained = tokio::time::timeout(AFTER_CLOSE, async {
        // Deliveries handed over before the close may still come out; then it ends.
        while sub.next().await.is_some() {}
    })
    .await;
    assert!(
        drained.is_ok(),
        "the subscription was still open {AFTER_CLOSE:?} after close() returned (in {closed_in:?})"
    );
    assert!(
        started.elapsed() <= IN_ALL,
        "close() and the end of the subscription took {:?}",
        started.elapsed()
    );
    drop(held);
    if !ctx.broker.capabilities().durable {
        // Another broker of an in-process backend shares nothing with this one.
        return Ok(());
    }

    let other = ctx.another_broker().await?;
    let mut next = other
        .subscribe(&topic, SubscribeOptions::group(&group))
        .await?;
    let mut ids = Vec::new();
    for _ in 0..2 {
        let d = ctx.recv(&mut next).await;
        ids.push(d.message().id().to_owned());
        d.ack().await?;
    }
    ctx.expect_quiet(&mut next).await;
    other.close().await?;
    let want = vec![sent[0].id().to_owned(), sent[2].id().to_owned()];
    assert_eq!(
        ids, want,
        "the held message again, then the one never taken; not the acked one"
    );
    Ok(())
}

/// A subscription that ends with one delivery received and others only prefetched (read
/// from the broker, never handed to the application) hands all of them over, and only the
/// one the application saw counts as an attempt.
pub async fn prefetched_but_unseen_is_not_an_attempt(ctx: Ctx) -> Result<()> {
    let (topic, group, sent) = a_group_with_messages(&ctx, "unseen", 3).await?;
    let mut first = ctx
        .subscribe(&topic, SubscribeOptions::group(&group).with_prefetch(3))
        .await;
    let seen = ctx.recv(&mut first).await;
    assert_eq!(seen.message().id(), sent[0].id());
    // Give the others time to be prefetched, as they would be by a busy consumer.
    tokio::time::sleep(ctx.settings.quiet_period).await;
    drop(first);
    drop(seen);
    let mut next = ctx.subscribe(&topic, SubscribeOptions::group(&group)).await;
    let mut attempts = BTreeMap::new();
    for d in ctx.recv_n(&mut next, 3).await {
        attempts.insert(d.message().id().to_owned(), d.attempt());
        d.ack().await?;
    }
    let expected: BTreeMap<String, u32> = sent
        .iter()
        .enumerate()
        .map(|(i, m)| (m.id().to_owned(), if i == 0 { 2 } else { 1 }))
        .collect();
    assert_eq!(attempts, expected, "only the received one was attempted");
    ctx.expect_quiet(&mut next).await;
    Ok(())
}
