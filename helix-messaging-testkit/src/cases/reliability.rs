//! Cases for the reliability layers over a real broker: delayed requeue, retry, dead-lettering
//! and the DLQ processor.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use helix_messaging_core::dlq::{
    self, DeadLetterConfig, DeadLetterFilter, DeadLetterLayer, DeadLetterQueue, DeadLetterReason,
    EntryStatus, MemoryDeadLetterStore, Processor, ProcessorConfig,
};
use helix_messaging_core::retry::{RetryLayer, RetryPolicy};
use helix_messaging_core::{
    Delivery, Envelope, ErrorKind, HandlerError, Message, Result, Runner, SubscribeOptions,
    handler_fn, json_handler,
};
use parking_lot::Mutex;

use crate::helpers::{Ctx, eventually, fresh_name};

fn header<'a>(d: &'a Delivery, name: &str) -> &'a str {
    d.message()
        .header(name)
        .unwrap_or_else(|| panic!("dead letter lacks header {name}"))
}

fn millis_header(d: &Delivery, name: &str) -> u64 {
    header(d, name)
        .parse()
        .unwrap_or_else(|e| panic!("header {name} is not a number of milliseconds: {e}"))
}

fn dead_letter_layer(ctx: &Ctx, dlq_topic: &str) -> Result<DeadLetterLayer> {
    Ok(DeadLetterLayer::new(DeadLetterQueue::new(
        ctx.broker.clone(),
        DeadLetterConfig::new(dlq_topic)?,
    )))
}

fn fixed_retries(max_retries: u32, delay: Duration) -> Result<RetryLayer> {
    RetryLayer::new(
        RetryPolicy::new()
            .with_max_retries(max_retries)
            .with_retry_delay(delay)
            .with_backoff_multiplier(1.0)
            .with_max_retry_delay(delay)
            .with_jitter(false),
    )
}

/// `requeue_after` keeps the message from its group for the delay while later messages flow
/// past it, then hands it out again with attempt 2; another group sees it once.
pub async fn delayed_requeue_holds_the_message_back(ctx: Ctx) -> Result<()> {
    let topic = ctx.topic("delayed-requeue");
    let mut g1 = ctx
        .subscribe(&topic, SubscribeOptions::group(fresh_name("g1")))
        .await;
    let mut g2 = ctx
        .subscribe(&topic, SubscribeOptions::group(fresh_name("g2")))
        .await;
    let held = Message::new("held back").with_key("k1");
    ctx.publish(&topic, held.clone()).await;
    let first = ctx.recv(&mut g1).await;
    assert_eq!(first.message().id(), held.id());
    assert!(
        first.delays_requeue(),
        "the backend declares delayed_requeue"
    );
    // Long enough that the later message's publish and delivery fit inside it on a loaded
    // machine (a debug-built broker took over a second under a parallel build).
    let delay = Duration::from_secs(3);
    let requeued_at = Instant::now();
    first.requeue_after(delay).await?;

    let later = Message::new("flows past").with_key("k2");
    ctx.publish(&topic, later.clone()).await;
    let next = ctx.recv(&mut g1).await;
    assert_eq!(
        next.message().id(),
        later.id(),
        "a later message arrives while the first waits"
    );
    assert!(
        requeued_at.elapsed() < delay,
        "the later message waited for the delayed one"
    );
    next.ack().await?;

    let again = ctx.recv(&mut g1).await;
    let waited = requeued_at.elapsed();
    assert_eq!(again.message().id(), held.id());
    assert_eq!(again.attempt(), 2, "a delayed requeue counts as an attempt");
    assert!(again.info().redelivered);
    assert!(
        waited >= delay - Duration::from_millis(20),
        "redelivered after {waited:?}, before the {delay:?} delay"
    );
    assert_eq!(again.message().payload(), held.payload());
    assert_eq!(again.message().key(), Some("k1"));
    again.ack().await?;

    // Different keys: backends that partition may hand them over in either order.
    let mut ids = ctx.recv_ack_ids(&mut g2, 2).await;
    ids.sort();
    let mut expected = vec![held.id().to_owned(), later.id().to_owned()];
    expected.sort();
    assert_eq!(ids, expected, "the other group sees each message once");
    ctx.expect_quiet(&mut g2).await;
    ctx.expect_quiet(&mut g1).await;
    Ok(())
}

/// A backend says honestly whether it can delay a requeue: a delivery to a named group can
/// when the backend declares `delayed_requeue`; where it cannot, `requeue_after` is
/// `Unsupported` and leaves the delivery unsettled (it can still be acked).
pub async fn delayed_requeue_is_declared_honestly(ctx: Ctx) -> Result<()> {
    let topic = ctx.topic("delay-declared");
    let options = if ctx.broker.capabilities().consumer_groups {
        SubscribeOptions::group(fresh_name("g"))
    } else {
        SubscribeOptions::default()
    };
    let mut sub = ctx.subscribe(&topic, options).await;
    ctx.publish(&topic, Message::new("x")).await;
    let d = ctx.recv(&mut sub).await;
    let declared = ctx.broker.capabilities().delayed_requeue;
    assert_eq!(
        d.delays_requeue(),
        declared,
        "delays_requeue matches the capability"
    );
    if !d.delays_requeue() {
        let err = d
            .requeue_after(Duration::from_millis(100))
            .await
            .expect_err("requeue_after without delayed_requeue");
        assert_eq!(err.kind(), ErrorKind::Unsupported);
        assert!(
            !d.is_settled(),
            "the refused requeue_after settled the delivery"
        );
    }
    d.ack().await?;
    ctx.expect_quiet(&mut sub).await;
    Ok(())
}

/// A message that always fails transiently is attempted exactly `max_retries + 1` times with
/// the policy's delays between attempts, then dead-lettered with its topic, group, reason,
/// error, attempts, failure times, payload and headers; the original is acked.
pub async fn retry_then_dead_letter_after_exact_attempts(ctx: Ctx) -> Result<()> {
    let topic = ctx.topic("retry");
    let dlq_topic = ctx.topic("retry-dlq");
    let group = fresh_name("workers");
    let mut dlq = ctx
        .subscribe(&dlq_topic, SubscribeOptions::group(fresh_name("dlq")))
        .await;
    let attempts = Arc::new(Mutex::new(Vec::new()));
    let seen = attempts.clone();
    let delay = Duration::from_millis(300);
    let runner = Runner::builder(ctx.broker.clone(), topic.clone())
        .group(group.clone())
        .layer(dead_letter_layer(&ctx, &dlq_topic)?)
        .layer(fixed_retries(3, delay)?)
        .start(handler_fn(move |envelope: Envelope| {
            let seen = seen.clone();
            async move {
                if envelope.message.header("poison").is_some() {
                    seen.lock().push(envelope.info.attempt);
                    return Err(HandlerError::transient(std::io::Error::other(
                        "the service behind it is down",
                    )));
                }
                Ok(())
            }
        }))
        .await?;
    let poison = Message::new("always fails")
        .with_key("p")
        .with_header("poison", "yes")
        .with_header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        );
    ctx.publish(&topic, poison.clone()).await;
    ctx.publish(&topic, Message::new("fine")).await;

    let letter = ctx.recv(&mut dlq).await;
    assert_eq!(letter.message().payload(), poison.payload());
    assert_eq!(letter.message().key(), Some("p"));
    assert_eq!(header(&letter, dlq::HEADER_ORIGINAL_TOPIC), topic);
    assert_eq!(header(&letter, dlq::HEADER_ORIGINAL_ID), poison.id());
    assert_eq!(header(&letter, dlq::HEADER_GROUP), group);
    assert_eq!(
        header(&letter, dlq::HEADER_REASON),
        DeadLetterReason::MaxRetriesExceeded.as_str()
    );
    assert_eq!(header(&letter, dlq::HEADER_ATTEMPTS), "4");
    assert!(header(&letter, dlq::HEADER_ERROR).contains("the service behind it is down"));
    assert_eq!(
        letter.message().header("traceparent"),
        poison.header("traceparent"),
        "trace context travels into the DLQ"
    );
    let first = millis_header(&letter, dlq::HEADER_FIRST_FAILURE);
    let last = millis_header(&letter, dlq::HEADER_LAST_FAILURE);
    let waited = Duration::from_millis(last.saturating_sub(first));
    assert!(
        waited >= 3 * delay - Duration::from_millis(30),
        "first to last failure took {waited:?}, less than three retry delays of {delay:?}"
    );
    letter.ack().await?;
    ctx.expect_quiet(&mut dlq).await;

    let report = runner.shutdown().await;
    assert_eq!(
        *attempts.lock(),
        vec![1, 2, 3, 4],
        "attempts the handler saw"
    );
    assert_eq!(report.delayed, 3, "three retries waited");
    assert_eq!(
        report.acked, 2,
        "the good message and the dead-lettered one"
    );
    assert_eq!(report.settle_errors, 0);
    Ok(())
}

#[derive(serde::Deserialize)]
struct Order {
    id: u64,
}

/// A payload that cannot be decoded into the handler's type reaches the DLQ on its first
/// delivery with reason "undecodable payload" and never reaches the handler.
pub async fn undecodable_is_dead_lettered_on_first_delivery(ctx: Ctx) -> Result<()> {
    let topic = ctx.topic("undecodable");
    let dlq_topic = ctx.topic("undecodable-dlq");
    let mut dlq = ctx
        .subscribe(&dlq_topic, SubscribeOptions::group(fresh_name("dlq")))
        .await;
    let handled = Arc::new(Mutex::new(Vec::new()));
    let seen = handled.clone();
    let runner = Runner::builder(ctx.broker.clone(), topic.clone())
        .group(fresh_name("workers"))
        .layer(dead_letter_layer(&ctx, &dlq_topic)?)
        .layer(fixed_retries(3, Duration::from_millis(50))?)
        .start(json_handler(move |order: Order, _envelope: Envelope| {
            let seen = seen.clone();
            async move {
                seen.lock().push(order.id);
                Ok(())
            }
        }))
        .await?;
    let garbage = Message::new("{\"id\": \"not a number\"").with_header("type", "order.created");
    ctx.publish(&topic, garbage.clone()).await;
    ctx.publish(&topic, Message::new("{\"id\": 7}")).await;

    let letter = ctx.recv(&mut dlq).await;
    assert_eq!(header(&letter, dlq::HEADER_ORIGINAL_ID), garbage.id());
    assert_eq!(
        header(&letter, dlq::HEADER_REASON),
        DeadLetterReason::Undecodable.as_str()
    );
    assert_eq!(header(&letter, dlq::HEADER_ATTEMPTS), "1");
    assert!(header(&letter, dlq::HEADER_ERROR).contains("JSON"));
    assert_eq!(letter.message().header("type"), Some("order.created"));
    letter.ack().await?;
    let handled_ids = eventually(ctx.settings.receive_timeout, "good order handled", || {
        let handled = handled.clone();
        async move {
            let handled = handled.lock().clone();
            (!handled.is_empty()).then_some(handled)
        }
    })
    .await;
    ctx.expect_quiet(&mut dlq).await;
    let report = runner.shutdown().await;
    assert_eq!(
        handled_ids,
        vec![7],
        "only the decodable payload reached the handler"
    );
    assert_eq!(report.delayed, 0, "an undecodable payload is never retried");
    Ok(())
}

/// One always-failing message among 10,000, handled one at a time: while it waits for its
/// retries the others keep being processed (a waiting retry holds no handler slot); each of
/// them is processed exactly once and it is dead-lettered after exactly `max_retries + 1`
/// attempts.
pub async fn poison_message_does_not_stall_the_others(ctx: Ctx) -> Result<()> {
    const TOTAL: usize = 10_000;
    let topic = ctx.topic("poison");
    let dlq_topic = ctx.topic("poison-dlq");
    let mut dlq = ctx
        .subscribe(&dlq_topic, SubscribeOptions::group(fresh_name("dlq")))
        .await;
    #[derive(Default)]
    struct Seen {
        poison_attempts: Vec<(u32, Instant, Instant)>,
        good: HashMap<String, u32>,
        good_done: Vec<Instant>,
    }
    let seen = Arc::new(Mutex::new(Seen::default()));
    let record = seen.clone();
    let delay = Duration::from_millis(500);
    let runner = Runner::builder(ctx.broker.clone(), topic.clone())
        .options(SubscribeOptions::group(fresh_name("workers")))
        .concurrency(1)
        .layer(dead_letter_layer(&ctx, &dlq_topic)?)
        .layer(fixed_retries(3, delay)?)
        .start(handler_fn(move |envelope: Envelope| {
            let record = record.clone();
            async move {
                let started = Instant::now();
                if envelope.message.header("poison").is_some() {
                    record.lock().poison_attempts.push((
                        envelope.info.attempt,
                        started,
                        Instant::now(),
                    ));
                    return Err(HandlerError::transient(std::io::Error::other("poison")));
                }
                let mut seen = record.lock();
                *seen
                    .good
                    .entry(envelope.message.id().to_owned())
                    .or_default() += 1;
                seen.good_done.push(Instant::now());
                Ok(())
            }
        }))
        .await?;
    let poison = Message::new("poison").with_header("poison", "yes");
    let mut batch = vec![poison.clone()];
    batch.extend((1..TOTAL).map(|i| Message::new(format!("good {i}"))));
    let good_ids: Vec<String> = batch[1..].iter().map(|m| m.id().to_owned()).collect();
    for chunk in batch.chunks(1_000) {
        ctx.broker
            .publish_batch(&topic, chunk.to_vec())
            .await
            .into_result()?;
    }

    let letter = ctx.recv(&mut dlq).await;
    assert_eq!(header(&letter, dlq::HEADER_ORIGINAL_ID), poison.id());
    assert_eq!(header(&letter, dlq::HEADER_ATTEMPTS), "4");
    letter.ack().await?;
    let timeout = ctx.settings.receive_timeout * 4;
    eventually(timeout, "every good message processed", || {
        let seen = seen.clone();
        async move { (seen.lock().good.len() == TOTAL - 1).then_some(()) }
    })
    .await;
    let report = runner.shutdown().await;
    ctx.expect_quiet(&mut dlq).await;

    let seen = seen.lock();
    let attempts: Vec<u32> = seen.poison_attempts.iter().map(|(a, _, _)| *a).collect();
    assert_eq!(attempts, vec![1, 2, 3, 4], "poison attempts");
    for id in &good_ids {
        assert_eq!(
            seen.good.get(id),
            Some(&1),
            "good message {id} processed once"
        );
    }
    // The first wait: from the poison's first failure to its second attempt.
    let (_, _, failed_at) = seen.poison_attempts[0];
    let (_, retried_at, _) = seen.poison_attempts[1];
    let during_wait = seen
        .good_done
        .iter()
        .filter(|t| **t > failed_at && **t < retried_at)
        .count();
    let before_wait = seen.good_done.iter().filter(|t| **t <= failed_at).count();
    assert!(
        during_wait > 0 || before_wait == TOTAL - 1,
        "no other message was processed while the poison waited {:?} for its retry ({before_wait} before)",
        retried_at - failed_at
    );
    assert_eq!(report.acked, TOTAL as u64);
    assert_eq!(report.delayed, 3);
    Ok(())
}

/// The processor ingests dead letters from its DLQ topic; they can be listed (with the
/// total count), fetched, grouped by reason, discarded and reprocessed: the reprocessed
/// message reaches its original topic with its original id, a first attempt and the
/// re-drive counter, and leaves the store.
pub async fn processor_ingests_lists_and_reprocesses(ctx: Ctx) -> Result<()> {
    let topic = ctx.topic("managed");
    let dlq_topic = ctx.topic("managed-dlq");
    let store = Arc::new(MemoryDeadLetterStore::new());
    let processor = Processor::new(
        ctx.broker.clone(),
        store.clone(),
        ProcessorConfig {
            topics: vec![dlq_topic.clone()],
            group: fresh_name("processor"),
            // Permanent failures are parked on arrival; nothing else is due within the case.
            retry_delay: Duration::from_secs(600),
            max_retry_delay: Duration::from_secs(600),
            poll_interval: Duration::from_millis(100),
            ..ProcessorConfig::default()
        },
    )?;
    processor.start().await?;
    let mut after = ctx
        .subscribe(&topic, SubscribeOptions::group(fresh_name("after")))
        .await;
    let runner = Runner::builder(ctx.broker.clone(), topic.clone())
        .group(fresh_name("workers"))
        .layer(dead_letter_layer(&ctx, &dlq_topic)?)
        .start(handler_fn(|envelope: Envelope| async move {
            Err(HandlerError::permanent(std::io::Error::other(format!(
                "cannot process {}",
                String::from_utf8_lossy(envelope.message.payload())
            ))))
        }))
        .await?;
    // One key, so every backend hands them over in publish order.
    let keep = Message::new("keep me")
        .with_key("order-1")
        .with_header("type", "order.created");
    let drop_me = Message::new("drop me")
        .with_key("order-1")
        .with_header("type", "order.created");
    ctx.publish(&topic, keep.clone()).await;
    ctx.publish(&topic, drop_me.clone()).await;
    // The `after` group sees both originals first.
    let originals = ctx.recv_ack_ids(&mut after, 2).await;
    assert_eq!(
        originals,
        vec![keep.id().to_owned(), drop_me.id().to_owned()]
    );

    let page = eventually(
        ctx.settings.receive_timeout,
        "two dead letters stored",
        || {
            let processor = processor.clone();
            async move {
                let page = processor
                    .list(&DeadLetterFilter::default(), 1, 0)
                    .await
                    .ok()?;
                (page.count == 2).then_some(page)
            }
        },
    )
    .await;
    runner.shutdown().await;
    assert_eq!(page.entries.len(), 1, "the limit is honoured");
    let by_original = |id: &str| DeadLetterFilter {
        original_id: Some(id.to_owned()),
        ..DeadLetterFilter::default()
    };
    let kept = processor.list(&by_original(keep.id()), 10, 0).await?;
    assert_eq!(kept.count, 1);
    let kept = &kept.entries[0];
    assert_eq!(
        kept.status,
        EntryStatus::Parked,
        "a permanent failure is parked"
    );
    assert_eq!(kept.letter.original_topic, topic);
    assert_eq!(kept.letter.reason, DeadLetterReason::Permanent);
    assert!(kept.letter.error.contains("cannot process keep me"));
    assert_eq!(processor.get(kept.id()).await?.letter.id, kept.letter.id);
    let groups = processor
        .failure_groups(&DeadLetterFilter::default())
        .await?;
    assert_eq!(groups.len(), 1);
    assert_eq!(groups[0].count, 2);
    assert_eq!(groups[0].reason, DeadLetterReason::Permanent);

    let dropped = processor
        .list(&by_original(drop_me.id()), 10, 0)
        .await?
        .entries;
    processor
        .discard(dropped[0].id(), "known bad input")
        .await?;
    let stats = processor.stats().await?;
    assert_eq!(stats.depth, 1, "a discarded entry no longer counts");
    let err = processor
        .reprocess(dropped[0].id(), None)
        .await
        .expect_err("a discarded entry cannot be reprocessed");
    assert_eq!(err.kind(), ErrorKind::InvalidInput);

    processor.reprocess(kept.id(), None).await?;
    let again = ctx.recv(&mut after).await;
    assert_eq!(again.message().id(), keep.id(), "the original id is kept");
    assert_eq!(again.attempt(), 1, "attempts start again");
    assert_eq!(again.message().header(dlq::HEADER_REDRIVE_COUNT), Some("1"));
    assert!(
        again
            .message()
            .headers()
            .keys()
            .all(|k| !k.starts_with(dlq::HEADER_PREFIX)),
        "no failure headers on the re-driven message"
    );
    again.ack().await?;
    let err = processor
        .get(kept.id())
        .await
        .expect_err("reprocessed entry is gone");
    assert_eq!(err.kind(), ErrorKind::NotFound);
    let metrics = processor.metrics();
    assert_eq!(metrics.messages_ingested, 2);
    assert_eq!(metrics.messages_processed, 1);
    assert_eq!(metrics.messages_discarded, 1);
    assert_eq!(metrics.messages_parked, 2);
    processor.stop().await;
    ctx.expect_quiet(&mut after).await;
    Ok(())
}

/// 1% of 2,000 payloads cannot be decoded: each of those reaches the DLQ after exactly one
/// delivery (never the handler), every other one is handled exactly once.
pub async fn malformed_payloads_reach_the_dlq_after_one_delivery(ctx: Ctx) -> Result<()> {
    const TOTAL: usize = 2_000;
    let topic = ctx.topic("malformed");
    let dlq_topic = ctx.topic("malformed-dlq");
    let mut dlq = ctx
        .subscribe(&dlq_topic, SubscribeOptions::group(fresh_name("dlq")))
        .await;
    let handled = Arc::new(Mutex::new(HashMap::<u64, u32>::new()));
    let seen = handled.clone();
    let runner = Runner::builder(ctx.broker.clone(), topic.clone())
        .options(SubscribeOptions::group(fresh_name("workers")))
        .concurrency(8)
        .layer(dead_letter_layer(&ctx, &dlq_topic)?)
        .layer(fixed_retries(3, Duration::from_millis(50))?)
        .start(json_handler(move |order: Order, _envelope: Envelope| {
            let seen = seen.clone();
            async move {
                *seen.lock().entry(order.id).or_default() += 1;
                Ok(())
            }
        }))
        .await?;
    let mut malformed = std::collections::HashSet::new();
    let messages: Vec<Message> = (0..TOTAL as u64)
        .map(|i| {
            if i % 100 == 99 {
                let m = Message::new(format!("{{\"id\": {i}, truncated"));
                malformed.insert(m.id().to_owned());
                m
            } else {
                Message::new(format!("{{\"id\": {i}}}"))
            }
        })
        .collect();
    for chunk in messages.chunks(500) {
        ctx.broker
            .publish_batch(&topic, chunk.to_vec())
            .await
            .into_result()?;
    }
    let mut dead = std::collections::HashSet::new();
    for _ in 0..malformed.len() {
        let letter = ctx.recv(&mut dlq).await;
        assert_eq!(header(&letter, dlq::HEADER_ATTEMPTS), "1");
        assert_eq!(
            header(&letter, dlq::HEADER_REASON),
            DeadLetterReason::Undecodable.as_str()
        );
        dead.insert(header(&letter, dlq::HEADER_ORIGINAL_ID).to_owned());
        letter.ack().await?;
    }
    assert_eq!(
        dead, malformed,
        "exactly the malformed payloads were dead-lettered"
    );
    let good = TOTAL - malformed.len();
    eventually(
        ctx.settings.receive_timeout,
        "every good payload handled",
        || {
            let handled = handled.clone();
            async move { (handled.lock().len() == good).then_some(()) }
        },
    )
    .await;
    let report = runner.shutdown().await;
    ctx.expect_quiet(&mut dlq).await;
    assert!(
        handled.lock().values().all(|n| *n == 1),
        "a good payload was handled twice"
    );
    assert_eq!(report.delayed, 0, "nothing was retried");
    assert_eq!(report.acked, TOTAL as u64);
    Ok(())
}
