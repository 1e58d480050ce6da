//! Cases for publishing and receiving on one topic: payloads and metadata kept, batches,
//! per-key order, isolation, concurrent publishers, priority and TTL, what is refused, and
//! a closed broker. Together because each checks what a publish does and what a subscriber
//! then receives, without the settlement and handover the other modules check.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use helix_messaging_core::window::{PublishWindow, WindowOptions};
use helix_messaging_core::{ErrorKind, Message, Publisher, Result, SubscribeOptions};

use crate::helpers::{Ctx, fresh_name};

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
    assert_one_keys_order(&ctx, got, ids, "batch order is kept for one key");
    ctx.expect_quiet(&mut sub).await;
    Ok(())
}

/// A [`PublishWindow`] delivers every message sent through it, once, and reports each
/// outcome by the sequence number `send` returned: a payload over the backend's limit in the
/// middle fails alone, as itself. The window is small against the messages, so `send` waits
/// for room and calls gather what was sent while others were out. With one call in flight,
/// one key's messages keep their order on a backend that orders by key.
pub async fn a_publish_window_delivers_every_message_and_reports_each(ctx: Ctx) -> Result<()> {
    const TOTAL: usize = 2_500;
    let topic = ctx.topic("window");
    let mut sub = ctx.subscribe(&topic, SubscribeOptions::default()).await;
    let publisher: Arc<dyn Publisher> = ctx.broker.clone();
    let window = PublishWindow::with_options(
        publisher.clone(),
        &topic,
        WindowOptions {
            window: 200,
            batches_in_flight: 4,
        },
    )?;
    let limit = ctx.broker.capabilities().max_payload_bytes;
    let mut ids = HashSet::new();
    let mut oversized = None;
    for n in 0..TOTAL {
        let message = match limit {
            Some(limit) if n == TOTAL / 2 => Message::new(vec![0u8; limit + 1]),
            _ => Message::new(format!("w{n}")),
        };
        let id = message.id().to_owned();
        let sequence = window.send(message).await?;
        assert_eq!(sequence, n as u64, "sequence numbers count the sends");
        if limit.is_some() && n == TOTAL / 2 {
            oversized = Some(sequence);
        } else {
            ids.insert(id);
        }
    }
    let report = window.close().await;
    let failed: Vec<(u64, ErrorKind)> = report
        .failures()
        .iter()
        .map(|f| (f.sequence, f.error.kind()))
        .collect();
    assert_eq!(
        failed,
        oversized
            .map(|sequence| (sequence, ErrorKind::PayloadTooLarge))
            .into_iter()
            .collect::<Vec<_>>(),
        "only the oversized message fails"
    );
    assert_eq!(report.confirmed(), ids.len() as u64);
    let got: HashSet<String> = ctx
        .recv_ack_ids(&mut sub, ids.len())
        .await
        .into_iter()
        .collect();
    assert_eq!(got, ids, "every confirmed message arrives");
    ctx.expect_quiet(&mut sub).await;

    let ordered = PublishWindow::with_options(
        publisher,
        &topic,
        WindowOptions {
            window: 50,
            batches_in_flight: 1,
        },
    )?;
    let mut sent = Vec::new();
    for n in 0..300 {
        let message = Message::new(format!("o{n}")).with_key("one-key");
        sent.push(message.id().to_owned());
        ordered.send(message).await?;
    }
    assert_eq!(ordered.close().await.into_result()?, 300);
    let got = ctx.recv_ack_ids(&mut sub, sent.len()).await;
    assert_one_keys_order(&ctx, got, sent, "one call at a time keeps one key's order");
    ctx.expect_quiet(&mut sub).await;
    Ok(())
}

/// One key's messages arrived as `sent`: in that order on a backend that orders by key,
/// else the same set.
fn assert_one_keys_order(ctx: &Ctx, got: Vec<String>, sent: Vec<String>, what: &str) {
    if ctx.broker.capabilities().per_key_ordering {
        assert_eq!(got, sent, "{what}");
    } else {
        let got: HashSet<_> = got.into_iter().collect();
        assert_eq!(got, sent.into_iter().collect::<HashSet<_>>(), "{what}");
    }
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
    let group = fresh_name("g");
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
    let group = fresh_name("g");
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

/// A group created without a member keeps what is published before its first member joins;
/// creating it again, before and while it has a member, neither loses, repeats nor moves
/// anything. A backend without consumer groups refuses with `Unsupported`.
pub async fn a_group_created_without_a_member_keeps_what_is_published(ctx: Ctx) -> Result<()> {
    let topic = ctx.topic("created-group");
    let group = fresh_name("g");
    if !ctx.broker.capabilities().consumer_groups {
        let err = ctx
            .broker
            .create_group(&topic, &group)
            .await
            .expect_err("create_group without consumer groups");
        assert_eq!(err.kind(), ErrorKind::Unsupported);
        return Ok(());
    }
    ctx.broker.create_group(&topic, &group).await?;
    let early = [Message::new("early 1"), Message::new("early 2")];
    for m in &early {
        ctx.publish(&topic, m.clone()).await;
    }
    ctx.broker.create_group(&topic, &group).await?;
    let mut sub = ctx.subscribe(&topic, SubscribeOptions::group(&group)).await;
    let got: HashSet<String> = ctx.recv_ack_ids(&mut sub, 2).await.into_iter().collect();
    let expected: HashSet<String> = early.iter().map(|m| m.id().to_owned()).collect();
    assert_eq!(got, expected, "what was published before the first member");
    ctx.broker.create_group(&topic, &group).await?;
    let late = Message::new("late");
    ctx.publish(&topic, late.clone()).await;
    assert_eq!(
        ctx.recv_ack_ids(&mut sub, 1).await,
        vec![late.id().to_owned()],
        "the member, undisturbed by creating its group again, gets what follows"
    );
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

/// A TTL of zero means the message expires as it is published: it is never delivered, even
/// to a consumer waiting for it.
pub async fn zero_ttl_is_never_delivered(ctx: Ctx) -> Result<()> {
    let topic = ctx.topic("ttl-zero");
    let group = fresh_name("g");
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
