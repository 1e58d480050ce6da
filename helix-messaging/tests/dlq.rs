//! The DLQ store and processor on the embedded broker: the SQLite store across reopenings,
//! automatic re-drive with backoff and parking, per-type handlers, and bulk redrive jobs
//! (frozen selection, rate limit, canary, cancel).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime};

mod common;
use common::letter;

use futures::StreamExt;
use helix_messaging::dlq::{
    CanaryConfig, DeadLetter, DeadLetterConfig, DeadLetterFilter, DeadLetterLayer, DeadLetterQueue,
    DeadLetterReason, DeadLetterStore, EntryStatus, Processor, ProcessorConfig, RedriveRequest,
    RedriveStatus, SqliteDeadLetterStore, StoredDeadLetter,
};
use helix_messaging::retry::{RetryLayer, RetryPolicy};
use helix_messaging::{
    Broker, Envelope, HandlerError, Message, Runner, SubscribeOptions, Subscription, handler_fn,
};

const WAIT: Duration = Duration::from_secs(15);

async fn broker() -> Arc<dyn Broker> {
    helix_messaging::connect("memory://")
        .await
        .expect("memory broker")
}

fn name(what: &str) -> String {
    helix_messaging_testkit::fresh_name(what)
}

async fn eventually<T, Fut>(what: &str, check: impl FnMut() -> Fut) -> T
where
    Fut: std::future::Future<Output = Option<T>>,
{
    helix_messaging_testkit::eventually(WAIT, what, check).await
}

async fn recv(sub: &mut Subscription) -> helix_messaging::Delivery {
    tokio::time::timeout(WAIT, sub.next())
        .await
        .unwrap_or_else(|_| panic!("no delivery on {} within {WAIT:?}", sub.topic()))
        .expect("open")
        .expect("no stream error")
}

fn in_file(dir: &tempfile::TempDir) -> std::path::PathBuf {
    dir.path().join("dlq.sqlite")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_groups_sample_error_is_its_newest_failures_on_every_store() {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = SqliteDeadLetterStore::open(in_file(&dir)).await.unwrap();
    common::check_the_sample_error_is_the_newest_failures(&sqlite, "orders").await;
    let memory = helix_messaging::dlq::MemoryDeadLetterStore::new();
    common::check_the_sample_error_is_the_newest_failures(&memory, "orders").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_hold_entries_and_versions_fence_writes_on_every_store() {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = SqliteDeadLetterStore::open(in_file(&dir)).await.unwrap();
    common::check_claims_hold_entries_and_versions_fence_writes(&sqlite, "orders").await;
    let memory = helix_messaging::dlq::MemoryDeadLetterStore::new();
    common::check_claims_hold_entries_and_versions_fence_writes(&memory, "orders").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sqlite_store_keeps_every_field_across_a_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let t0 = SystemTime::now() - Duration::from_secs(60);
    let letters = [
        letter(
            "orders",
            DeadLetterReason::MaxRetriesExceeded,
            "order.created",
            t0,
        ),
        letter(
            "orders",
            DeadLetterReason::Undecodable,
            "order.created",
            t0 + Duration::from_secs(1),
        ),
        letter(
            "payments",
            DeadLetterReason::MaxRetriesExceeded,
            "payment.made",
            t0 + Duration::from_secs(2),
        ),
    ];
    {
        let store = SqliteDeadLetterStore::open(in_file(&dir)).await.unwrap();
        for l in &letters {
            let entry = StoredDeadLetter::received(l.clone(), SystemTime::now());
            assert!(store.insert(entry.clone()).await.unwrap());
            assert!(
                !store.insert(entry).await.unwrap(),
                "a second insert of one id is ignored"
            );
        }
        let mut parked = store.get(&letters[1].id).await.unwrap().unwrap();
        parked.status = EntryStatus::Parked;
        parked.last_error = Some("still broken".into());
        assert!(store.update(&parked).await.unwrap());
        let mut due = store.get(&letters[2].id).await.unwrap().unwrap();
        due.next_attempt_at = Some(SystemTime::now() - Duration::from_secs(1));
        store.update(&due).await.unwrap();
    }
    // A new process opens the same file.
    let store = SqliteDeadLetterStore::open(in_file(&dir)).await.unwrap();
    let all = store
        .list(&DeadLetterFilter::default(), 10, 0)
        .await
        .unwrap();
    assert_eq!(all.len(), 3);
    let ids: Vec<&str> = all.iter().map(|e| e.letter.id.as_str()).collect();
    assert_eq!(
        ids,
        letters.iter().map(|l| l.id.as_str()).collect::<Vec<_>>(),
        "listed oldest first"
    );
    let first = &all[0].letter;
    let expected = &letters[0];
    assert_eq!(first.message.id(), expected.message.id());
    assert_eq!(first.message.payload(), expected.message.payload());
    assert_eq!(first.message.headers(), expected.message.headers());
    assert_eq!(first.message.key(), Some("k-1"));
    assert_eq!(first.message.priority(), 7);
    assert_eq!(first.message.content_type(), Some("application/json"));
    assert_eq!(first.message.correlation_id(), Some("corr"));
    assert_eq!(first.error, expected.error, "the full error text is kept");
    assert_eq!(first.attempts, 4);
    assert_eq!(first.group.as_deref(), Some("workers"));
    let micros = |t: SystemTime| {
        t.duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_micros()
    };
    assert_eq!(
        micros(first.first_failure_at),
        micros(expected.first_failure_at)
    );
    assert_eq!(
        micros(first.last_failure_at),
        micros(expected.last_failure_at)
    );
    assert_eq!(all[1].status, EntryStatus::Parked);
    assert_eq!(all[1].last_error.as_deref(), Some("still broken"));

    let orders = DeadLetterFilter {
        topic: Some("orders".into()),
        ..DeadLetterFilter::default()
    };
    assert_eq!(store.count(&orders).await.unwrap(), 2);
    let undecodable = DeadLetterFilter {
        reason: Some(DeadLetterReason::Undecodable),
        ..DeadLetterFilter::default()
    };
    assert_eq!(store.count(&undecodable).await.unwrap(), 1);
    let payments = DeadLetterFilter {
        message_type: Some("payment.made".into()),
        ..DeadLetterFilter::default()
    };
    assert_eq!(
        store.ids(&payments).await.unwrap(),
        vec![letters[2].id.clone()]
    );
    let window = DeadLetterFilter {
        from: Some(t0 + Duration::from_millis(500)),
        to: Some(t0 + Duration::from_millis(1_500)),
        ..DeadLetterFilter::default()
    };
    assert_eq!(
        store.ids(&window).await.unwrap(),
        vec![letters[1].id.clone()]
    );
    assert_eq!(
        store
            .list(&DeadLetterFilter::default(), 1, 1)
            .await
            .unwrap()[0]
            .letter
            .id,
        letters[1].id,
        "offset"
    );

    let groups = store.groups(&DeadLetterFilter::default()).await.unwrap();
    assert_eq!(groups.len(), 3);
    let stats = store.stats().await.unwrap();
    assert_eq!((stats.depth, stats.parked), (3, 1));
    assert_eq!(stats.oldest.map(micros), Some(micros(t0)));

    let lease = Duration::from_secs(60);
    let claimed = store.claim_due(SystemTime::now(), lease, 10).await.unwrap();
    assert_eq!(claimed.len(), 1, "only the due, pending entry");
    assert_eq!(claimed[0].letter.id, letters[2].id);
    assert!(
        store
            .claim_due(SystemTime::now(), lease, 10)
            .await
            .unwrap()
            .is_empty(),
        "a claimed entry is leased"
    );
    assert_eq!(
        store
            .claim_due(
                SystemTime::now() + lease + Duration::from_secs(1),
                lease,
                10
            )
            .await
            .unwrap()
            .len(),
        1,
        "after the lease it is due again"
    );

    let first = store.get(&letters[0].id).await.unwrap().unwrap();
    assert!(store.remove(&letters[0].id, first.version).await.unwrap());
    assert!(!store.remove(&letters[0].id, first.version).await.unwrap());
    assert_eq!(store.purge(&orders).await.unwrap(), 1);
    drop(store);
    let store = SqliteDeadLetterStore::open(in_file(&dir)).await.unwrap();
    assert_eq!(
        store.ids(&DeadLetterFilter::default()).await.unwrap(),
        vec![letters[2].id.clone()]
    );
}

/// Dead-letters every message of `topic` in group `workers` (no retries) into `dlq_topic`.
async fn failing_consumer(
    broker: &Arc<dyn Broker>,
    topic: &str,
    dlq_topic: &str,
    reason: DeadLetterReason,
) -> (Runner, Arc<AtomicU32>) {
    let calls = Arc::new(AtomicU32::new(0));
    let counted = calls.clone();
    let runner = Runner::builder(broker.clone(), topic)
        .group("workers")
        .layer(DeadLetterLayer::new(DeadLetterQueue::new(
            broker.clone(),
            DeadLetterConfig::new(dlq_topic).unwrap(),
        )))
        .layer(RetryLayer::new(RetryPolicy::new().with_max_retries(0)).unwrap())
        .start(handler_fn(move |_envelope: Envelope| {
            let counted = counted.clone();
            async move {
                counted.fetch_add(1, Ordering::SeqCst);
                let err = HandlerError::transient(std::io::Error::other("downstream is down"));
                Err(if reason == DeadLetterReason::MaxRetriesExceeded {
                    err
                } else {
                    err.with_reason(reason)
                })
            }
        }))
        .await
        .unwrap();
    (runner, calls)
}

/// A processor of `broker` with a DLQ store in memory and the tests' settings.
fn memory_processor(broker: Arc<dyn Broker>) -> Processor {
    Processor::new(
        broker,
        Arc::new(helix_messaging::dlq::MemoryDeadLetterStore::new()),
        processor_config(&name("dlq")),
    )
    .unwrap()
}

fn processor_config(dlq_topic: &str) -> ProcessorConfig {
    ProcessorConfig {
        topics: vec![dlq_topic.to_owned()],
        poll_interval: Duration::from_millis(50),
        retry_delay: Duration::from_millis(100),
        max_retry_delay: Duration::from_millis(200),
        max_retries: 2,
        ..ProcessorConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reopened_store_can_be_reprocessed_discarded_and_purged() {
    let dir = tempfile::tempdir().unwrap();
    let broker = broker().await;
    let (topic, dlq_topic) = (name("orders"), name("dlq"));
    let config = ProcessorConfig {
        auto_redrive: false,
        ..processor_config(&dlq_topic)
    };
    let processor = Processor::new(
        broker.clone(),
        Arc::new(SqliteDeadLetterStore::open(in_file(&dir)).await.unwrap()),
        config.clone(),
    )
    .unwrap();
    processor.start().await.unwrap();
    let (runner, _) =
        failing_consumer(&broker, &topic, &dlq_topic, DeadLetterReason::Permanent).await;
    let sent: Vec<Message> = (0..3).map(|i| Message::new(format!("order {i}"))).collect();
    for m in &sent {
        broker.publish(&topic, m.clone()).await.unwrap();
    }
    eventually("three dead letters stored", || {
        let processor = processor.clone();
        async move { (processor.stats().await.ok()?.depth == 3).then_some(()) }
    })
    .await;
    runner.shutdown().await;
    processor.stop().await;
    drop(processor);

    // Another process, the same file.
    let store = Arc::new(SqliteDeadLetterStore::open(in_file(&dir)).await.unwrap());
    let processor = Processor::new(broker.clone(), store.clone(), config).unwrap();
    let page = processor
        .list(&DeadLetterFilter::default(), 10, 0)
        .await
        .unwrap();
    assert_eq!(page.count, 3);
    let id_of = |m: &Message| {
        page.entries
            .iter()
            .find(|e| e.letter.message.id() == m.id())
            .map(|e| e.letter.id.clone())
            .expect("entry for a sent message")
    };
    let mut replay = broker
        .subscribe(&topic, SubscribeOptions::group(name("after")))
        .await
        .unwrap();
    processor.reprocess(&id_of(&sent[0]), None).await.unwrap();
    let back = recv(&mut replay).await;
    assert_eq!(back.message().id(), sent[0].id());
    assert_eq!(back.message().payload(), sent[0].payload());
    back.ack().await.unwrap();
    let elsewhere = name("elsewhere");
    let mut other = broker
        .subscribe(&elsewhere, SubscribeOptions::group("g"))
        .await
        .unwrap();
    processor
        .reprocess(&id_of(&sent[1]), Some(&elsewhere))
        .await
        .unwrap();
    assert_eq!(
        recv(&mut other).await.message().id(),
        sent[1].id(),
        "reprocessed into another topic"
    );
    processor
        .discard(&id_of(&sent[2]), "test data")
        .await
        .unwrap();
    let discarded = processor.get(&id_of(&sent[2])).await.unwrap();
    assert_eq!(discarded.status, EntryStatus::Discarded);
    assert_eq!(discarded.discard_reason.as_deref(), Some("test data"));
    assert_eq!(processor.stats().await.unwrap().depth, 0);
    assert_eq!(
        processor
            .purge(&DeadLetterFilter {
                status: Some(EntryStatus::Discarded),
                ..DeadLetterFilter::default()
            })
            .await
            .unwrap(),
        1
    );
    assert_eq!(store.count(&DeadLetterFilter::default()).await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn automatic_redrive_backs_off_then_parks_the_message() {
    let broker = broker().await;
    let (topic, dlq_topic) = (name("flaky"), name("dlq"));
    let dir = tempfile::tempdir().unwrap();
    let processor = Processor::new(
        broker.clone(),
        Arc::new(SqliteDeadLetterStore::open(in_file(&dir)).await.unwrap()),
        processor_config(&dlq_topic),
    )
    .unwrap();
    processor.start().await.unwrap();
    let (runner, calls) = failing_consumer(
        &broker,
        &topic,
        &dlq_topic,
        DeadLetterReason::MaxRetriesExceeded,
    )
    .await;
    let m = Message::new("keeps failing");
    broker.publish(&topic, m.clone()).await.unwrap();
    let parked = eventually("the message parked", || {
        let processor = processor.clone();
        async move {
            let page = processor
                .list(
                    &DeadLetterFilter {
                        status: Some(EntryStatus::Parked),
                        ..DeadLetterFilter::default()
                    },
                    10,
                    0,
                )
                .await
                .ok()?;
            page.entries.into_iter().next()
        }
    })
    .await;
    runner.shutdown().await;
    processor.stop().await;
    assert_eq!(
        parked.letter.message.id(),
        m.id(),
        "the original id survives every trip"
    );
    assert_eq!(parked.letter.redrives, 2, "re-driven max_retries times");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        3,
        "the first delivery and one per re-drive"
    );
    let metrics = processor.metrics();
    assert_eq!(metrics.messages_ingested, 3);
    assert_eq!(metrics.messages_processed, 2, "two re-drives published");
    assert_eq!(metrics.messages_parked, 1);
    assert_eq!(
        processor.stats().await.unwrap().depth,
        1,
        "parked, never lost"
    );
}

/// While its store is down the processor's ingester backs off instead of taking the dead
/// letter back and again in a tight loop; once the store is back the letter is ingested.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ingester_backs_off_while_its_store_is_down() {
    use helix_messaging_testkit::plane::FaultyDeadLetterStore;
    let broker = broker().await;
    let dlq_topic = name("dlq");
    let store = Arc::new(FaultyDeadLetterStore::new(
        helix_messaging::dlq::MemoryDeadLetterStore::new(),
    ));
    let processor =
        Processor::new(broker.clone(), store.clone(), processor_config(&dlq_topic)).unwrap();
    processor.start().await.unwrap();
    store.set_down(true);
    let letter = common::letter(
        "orders",
        DeadLetterReason::MaxRetriesExceeded,
        "order.created",
        std::time::SystemTime::now(),
    );
    broker
        .publish(&dlq_topic, letter.to_message())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let tried = store.inserts_tried();
    assert!(
        (1..=12).contains(&tried),
        "{tried} inserts in 2 s with the store down: it should back off (100 ms doubling)"
    );
    store.set_down(false);
    eventually("ingested once the store is back", || {
        let processor = processor.clone();
        async move { (processor.stats().await.ok()?.depth == 1).then_some(()) }
    })
    .await;
    processor.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_for_the_message_type_is_retried_with_backoff_instead_of_republishing() {
    let broker = broker().await;
    let (topic, dlq_topic) = (name("llm"), name("dlq"));
    let processor = Processor::new(
        broker.clone(),
        Arc::new(helix_messaging::dlq::MemoryDeadLetterStore::new()),
        ProcessorConfig {
            max_retries: 3,
            ..processor_config(&dlq_topic)
        },
    )
    .unwrap();
    let tries = Arc::new(AtomicU32::new(0));
    let counted = tries.clone();
    processor.register_handler("llm.request", move |letter: DeadLetter| {
        let counted = counted.clone();
        async move {
            assert_eq!(letter.message.header("type"), Some("llm.request"));
            if counted.fetch_add(1, Ordering::SeqCst) < 2 {
                return Err("provider still rate-limited".into());
            }
            Ok(())
        }
    });
    processor.start().await.unwrap();
    let mut original = broker
        .subscribe(&topic, SubscribeOptions::group(name("watch")))
        .await
        .unwrap();
    // Permanent failures are parked unless a handler is registered for their type.
    let (runner, _) =
        failing_consumer(&broker, &topic, &dlq_topic, DeadLetterReason::Permanent).await;
    broker
        .publish(
            &topic,
            Message::new("prompt").with_header("type", "llm.request"),
        )
        .await
        .unwrap();
    recv(&mut original).await.ack().await.unwrap();
    eventually("the handler succeeded and the entry is gone", || {
        let (processor, tries) = (processor.clone(), tries.clone());
        async move {
            (tries.load(Ordering::SeqCst) == 3 && processor.stats().await.ok()?.depth == 0)
                .then_some(())
        }
    })
    .await;
    runner.shutdown().await;
    processor.stop().await;
    let metrics = processor.metrics();
    assert_eq!(metrics.messages_retried, 2);
    assert_eq!(metrics.messages_processed, 1);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), original.next())
            .await
            .is_err(),
        "a handled entry is not republished"
    );
}

/// Stores `n` dead letters of `topic` directly (as the processor would have ingested them).
async fn stored_letters(processor: &Processor, topic: &str, n: usize) -> Vec<DeadLetter> {
    let t0 = SystemTime::now() - Duration::from_secs(3_600);
    let mut out = Vec::new();
    for i in 0..n {
        let l = letter(
            topic,
            DeadLetterReason::MaxRetriesExceeded,
            "order.created",
            t0 + Duration::from_millis(i as u64),
        );
        processor
            .store()
            .insert(StoredDeadLetter::received(l.clone(), SystemTime::now()))
            .await
            .unwrap();
        out.push(l);
    }
    out
}

/// Re-drive `count` entries first and watch them for `watch`.
fn canary(count: usize, watch: Duration) -> Option<CanaryConfig> {
    Some(CanaryConfig { count, watch })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_redrive_keeps_its_rate_and_its_frozen_selection() {
    let broker = broker().await;
    let topic = name("bulk");
    let dir = tempfile::tempdir().unwrap();
    let processor = Processor::new(
        broker.clone(),
        Arc::new(SqliteDeadLetterStore::open(in_file(&dir)).await.unwrap()),
        processor_config(&name("dlq")),
    )
    .unwrap();
    let letters = stored_letters(&processor, &topic, 200).await;
    drop(processor);
    // The redrive runs in a later process, on the reopened file.
    let processor = Processor::new(
        broker.clone(),
        Arc::new(SqliteDeadLetterStore::open(in_file(&dir)).await.unwrap()),
        processor_config(&name("dlq")),
    )
    .unwrap();
    let mut sub = broker
        .subscribe(&topic, SubscribeOptions::group("g"))
        .await
        .unwrap();
    let started = Instant::now();
    let job = processor
        .start_redrive(RedriveRequest {
            rate_per_second: Some(100.0),
            ..RedriveRequest::default()
        })
        .await
        .unwrap();
    // Dead-lettered after the job started: not part of its selection.
    let late = stored_letters(&processor, &topic, 1).await;
    let progress = common::redrive_finished(&processor, &job.id).await;
    let took = started.elapsed();
    assert_eq!(progress.status, RedriveStatus::Completed);
    assert_eq!(
        (
            progress.total,
            progress.redriven,
            progress.failed,
            progress.skipped
        ),
        (200, 200, 0, 0)
    );
    assert!((progress.percentage() - 100.0).abs() < f64::EPSILON);
    assert!(
        took >= Duration::from_millis(1_900),
        "200 messages at 100/s took only {took:?}"
    );
    let mut got = Vec::new();
    for _ in 0..200 {
        let d = recv(&mut sub).await;
        got.push(d.message().id().to_owned());
        d.ack().await.unwrap();
    }
    let expected: Vec<String> = letters.iter().map(|l| l.message.id().to_owned()).collect();
    assert_eq!(got, expected, "re-driven in DLQ order");
    let left = processor
        .list(&DeadLetterFilter::default(), 10, 0)
        .await
        .unwrap();
    assert_eq!(left.count, 1);
    assert_eq!(
        left.entries[0].letter.id, late[0].id,
        "only the late letter stays"
    );
    assert_eq!(processor.list_redrives().len(), 1);
}

/// The rate limit holds over every window of the run, the canary watch included: the time
/// spent watching is not banked and spent in one burst afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_redrive_keeps_its_rate_after_the_canary_watch() {
    const RATE: f64 = 20.0;
    let broker = broker().await;
    let topic = name("paced");
    let processor = memory_processor(broker.clone());
    stored_letters(&processor, &topic, 30).await;
    let mut sub = broker
        .subscribe(&topic, SubscribeOptions::group("g"))
        .await
        .unwrap();
    let job = processor
        .start_redrive(RedriveRequest {
            rate_per_second: Some(RATE),
            canary: canary(1, Duration::from_secs(1)),
            ..RedriveRequest::default()
        })
        .await
        .unwrap();
    let mut arrivals = Vec::new();
    for _ in 0..30 {
        recv(&mut sub).await.ack().await.unwrap();
        arrivals.push(Instant::now());
    }
    assert_eq!(
        common::redrive_finished(&processor, &job.id).await.status,
        RedriveStatus::Completed
    );
    // Half a second holds RATE / 2 messages, plus one chunk (RATE / 20) that may start at
    // its beginning and a little for the scheduler.
    let window = Duration::from_millis(500);
    let most = (RATE / 2.0) as usize + 1 + 2;
    for (i, at) in arrivals.iter().enumerate() {
        let within = arrivals[i..].iter().filter(|t| **t < *at + window).count();
        assert!(
            within <= most,
            "{within} re-driven within {window:?} from the {i}th at {RATE}/s (at most {most})"
        );
    }
}

/// When the store cannot remove what was re-driven, the job's counts still add up to its
/// selection: what went out counts as re-driven, and the job fails saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redrive_whose_removals_fail_still_counts_what_went_out() {
    use helix_messaging_testkit::plane::FaultyDeadLetterStore;
    let broker = broker().await;
    let topic = name("unremovable");
    let store = Arc::new(FaultyDeadLetterStore::new(
        helix_messaging::dlq::MemoryDeadLetterStore::new(),
    ));
    let processor = Processor::new(
        broker.clone(),
        store.clone(),
        processor_config(&name("dlq")),
    )
    .unwrap();
    stored_letters(&processor, &topic, 10).await;
    store.set_removals_down(true);
    let job = processor
        .start_redrive(RedriveRequest::default())
        .await
        .unwrap();
    let progress = common::redrive_finished(&processor, &job.id).await;
    assert_eq!(progress.status, RedriveStatus::Failed, "{progress:?}");
    assert_eq!(
        (progress.redriven, progress.failed, progress.skipped),
        (10, 0, 0),
        "published, so re-driven, though still in the store: {progress:?}"
    );
    assert!(
        progress
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("removal")),
        "{progress:?}"
    );
}

/// A redrive whose canary cannot be re-driven fails, leaving everything else in the DLQ,
/// instead of going on without a canary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redrive_whose_canary_cannot_go_out_fails_and_re_drives_nothing() {
    use helix_messaging_testkit::plane::{FaultSchedule, FaultyBroker};
    // A broker that refuses every message.
    let refusing: Arc<dyn helix_messaging::Broker> = Arc::new(FaultyBroker::new(
        broker().await,
        FaultSchedule::new(1, 0, 100),
    ));
    let processor = memory_processor(refusing);
    stored_letters(&processor, &name("no-canary"), 5).await;
    let job = processor
        .start_redrive(RedriveRequest {
            canary: canary(1, Duration::from_millis(200)),
            ..RedriveRequest::default()
        })
        .await
        .unwrap();
    let progress = common::redrive_finished(&processor, &job.id).await;
    assert_eq!(progress.status, RedriveStatus::Failed, "{progress:?}");
    assert_eq!(
        (progress.redriven, progress.failed),
        (0, 1),
        "only the canary was tried"
    );
    assert!(
        progress
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("canary")),
        "{progress:?}"
    );
    assert_eq!(
        processor.stats().await.unwrap().depth,
        5,
        "all still in the DLQ"
    );
}

/// A canary dead-lettered again by a consumer whose clock runs an hour behind the
/// processor's still fails the canary: it is recognised by its redrive count, not by when
/// its failure was stamped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_failing_on_a_host_with_a_slow_clock_still_stops_the_redrive() {
    let broker = broker().await;
    let topic = name("skewed");
    let processor = memory_processor(broker.clone());
    let letters = stored_letters(&processor, &topic, 5).await;
    let mut sub = broker
        .subscribe(&topic, SubscribeOptions::group("g"))
        .await
        .unwrap();
    let job = processor
        .start_redrive(RedriveRequest {
            canary: canary(1, Duration::from_secs(2)),
            ..RedriveRequest::default()
        })
        .await
        .unwrap();
    let canary = recv(&mut sub).await;
    assert_eq!(canary.message().id(), letters[0].message.id());
    // The consumer fails it again (a dead letter of the copy, which carries one more
    // redrive), and stamps the failure by its own clock.
    let mut again = letters[0].clone();
    again.id = uuid::Uuid::new_v4().to_string();
    again.redrives += 1;
    again.last_failure_at = SystemTime::now() - Duration::from_secs(3_600);
    again.first_failure_at = again.last_failure_at;
    canary.ack().await.unwrap();
    processor.ingest(again).await.unwrap();
    let progress = common::redrive_finished(&processor, &job.id).await;
    assert_eq!(progress.status, RedriveStatus::CanaryFailed, "{progress:?}");
    assert_eq!(progress.redriven, 1, "only the canary went out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_that_fails_again_stops_the_redrive_and_a_cancel_stops_it_too() {
    let broker = broker().await;
    let (topic, dlq_topic) = (name("canary"), name("dlq"));
    let dir = tempfile::tempdir().unwrap();
    let config = ProcessorConfig {
        auto_redrive: false,
        ..processor_config(&dlq_topic)
    };
    let open = || async { Arc::new(SqliteDeadLetterStore::open(in_file(&dir)).await.unwrap()) };
    let earlier = Processor::new(broker.clone(), open().await, config.clone()).unwrap();
    stored_letters(&earlier, &topic, 20).await;
    drop(earlier);
    // The jobs run in a later process, on the reopened file.
    let processor = Processor::new(broker.clone(), open().await, config).unwrap();
    processor.start().await.unwrap();
    let (runner, calls) =
        failing_consumer(&broker, &topic, &dlq_topic, DeadLetterReason::Permanent).await;
    let job = processor
        .start_redrive(RedriveRequest {
            canary: canary(2, Duration::from_millis(1_500)),
            ..RedriveRequest::default()
        })
        .await
        .unwrap();
    let progress = common::redrive_finished(&processor, &job.id).await;
    assert_eq!(progress.status, RedriveStatus::CanaryFailed);
    assert_eq!(progress.redriven, 2, "only the canaries went out");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    let stats = processor.stats().await.unwrap();
    assert_eq!(stats.depth, 20, "18 untouched and the 2 canaries back");
    runner.shutdown().await;

    // Nobody fails now, but the job is cancelled early.
    let job = processor
        .start_redrive(RedriveRequest {
            rate_per_second: Some(10.0),
            ..RedriveRequest::default()
        })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(350)).await;
    processor.cancel_redrive(&job.id).unwrap();
    let progress = common::redrive_finished(&processor, &job.id).await;
    assert_eq!(progress.status, RedriveStatus::Cancelled);
    assert!(
        progress.redriven >= 1 && progress.redriven < 20,
        "redriven {} before the cancel",
        progress.redriven
    );
    assert_eq!(
        processor.stats().await.unwrap().depth,
        20 - progress.redriven,
        "what was not re-driven stays"
    );
    processor.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn letters_sent_before_the_processor_first_ran_are_ingested() {
    let broker = broker().await;
    let (topic, dlq_topic) = (name("early"), name("dlq"));
    let queue = DeadLetterQueue::new(broker.clone(), DeadLetterConfig::new(&dlq_topic).unwrap());
    let early = letter(
        &topic,
        DeadLetterReason::MaxRetriesExceeded,
        "order.created",
        SystemTime::now(),
    );
    queue.send(&early).await.unwrap();
    let processor = Processor::new(
        broker.clone(),
        Arc::new(helix_messaging::dlq::MemoryDeadLetterStore::new()),
        ProcessorConfig {
            auto_redrive: false,
            ..processor_config(&dlq_topic)
        },
    )
    .unwrap();
    processor.start().await.unwrap();
    let stored = eventually("the early letter ingested", || {
        let processor = processor.clone();
        let id = early.id.clone();
        async move { processor.get(&id).await.ok() }
    })
    .await;
    assert_eq!(stored.letter.message.id(), early.message.id());
    assert_eq!(
        stored.letter.error,
        early.error[..1024],
        "the wire carries the bounded error"
    );
    processor.stop().await;
}
