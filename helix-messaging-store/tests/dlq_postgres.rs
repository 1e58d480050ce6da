//! The PostgreSQL DLQ store against the machine's server (127.0.0.1:5432, database `test`;
//! `HELIX_TEST_POSTGRES` overrides the connection string): every field survives, filters
//! work, and two instances sharing the table never claim or re-drive one entry twice.
#![cfg(feature = "postgres")]

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use helix_messaging_testkit::stores::{
    OpenStore, a_killed_replay_resumes_without_publishing_twice,
    check_a_page_and_its_count_leave_discarded_entries_out_alike,
    check_claims_hold_entries_and_versions_fence_writes,
    check_finished_replays_are_pruned_oldest_first, check_the_sample_error_is_the_newest_failures,
    letter, replay_store_round_trips,
};

use futures::{FutureExt, StreamExt};
use helix_messaging_core::dlq::{
    DeadLetterFilter, DeadLetterReason, DeadLetterStore, EntryStatus, Processor, ProcessorConfig,
    StoredDeadLetter,
};
use helix_messaging_core::{Broker, SubscribeOptions};
use helix_messaging_memory::MemoryBroker;
use helix_messaging_store::PostgresDeadLetterStore;

fn connection() -> String {
    std::env::var("HELIX_TEST_POSTGRES")
        .unwrap_or_else(|_| "host=127.0.0.1 user=postgres dbname=test".into())
}

/// A table of the test's own, dropped afterwards even when the test fails.
struct Table(String);

impl Table {
    fn new() -> Table {
        Table(format!("hm_test_dlq_{}", uuid_like()))
    }
}

impl Drop for Table {
    fn drop(&mut self) {
        let _ = std::process::Command::new("psql")
            .args([
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-d",
                "test",
                "-q",
                "-c",
            ])
            .arg(format!("DROP TABLE IF EXISTS {0}, {0}_replays", self.0))
            .output();
    }
}

fn uuid_like() -> String {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{:x}_{}", nanos, std::process::id())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_hold_entries_and_versions_fence_writes() {
    let table = Table::new();
    let store = PostgresDeadLetterStore::connect_table(&connection(), &table.0)
        .await
        .expect("PostgreSQL on 127.0.0.1:5432 (scripts/test starts it)");
    check_claims_hold_entries_and_versions_fence_writes(&store, "orders").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_groups_sample_error_is_its_newest_failures() {
    let table = Table::new();
    let store = PostgresDeadLetterStore::connect_table(&connection(), &table.0)
        .await
        .expect("PostgreSQL on 127.0.0.1:5432 (scripts/test starts it)");
    check_the_sample_error_is_the_newest_failures(&store, "orders").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_postgres_store_keeps_every_field_and_instances_claim_disjoint_entries() {
    let table = Table::new();
    let a = PostgresDeadLetterStore::connect_table(&connection(), &table.0)
        .await
        .expect("PostgreSQL on 127.0.0.1:5432 (scripts/test starts it)");
    let t0 = SystemTime::now() - Duration::from_secs(600);
    let mut ids = Vec::new();
    for i in 0..40 {
        let kind = if i % 2 == 0 {
            "order.created"
        } else {
            "payment.made"
        };
        let l = letter(
            "orders",
            DeadLetterReason::MaxRetriesExceeded,
            kind,
            t0 + Duration::from_millis(i),
        );
        let mut entry = StoredDeadLetter::received(l.clone(), SystemTime::now());
        entry.next_attempt_at = Some(SystemTime::now() - Duration::from_secs(1));
        assert!(a.insert(entry.clone()).await.unwrap());
        assert!(!a.insert(entry).await.unwrap(), "one id is stored once");
        ids.push(l);
    }
    // A second instance on the same table.
    let b = PostgresDeadLetterStore::connect_table(&connection(), &table.0)
        .await
        .unwrap();
    let got = b.get(&ids[0].id).await.unwrap().expect("stored");
    assert_eq!(got.letter.message.id(), ids[0].message.id());
    assert_eq!(got.letter.message.headers(), ids[0].message.headers());
    assert_eq!(got.letter.message.payload(), ids[0].message.payload());
    assert_eq!(got.letter.message.priority(), 7);
    assert_eq!(got.letter.error, ids[0].error);
    assert_eq!(got.letter.attempts, 4);
    assert_eq!(got.status, EntryStatus::Pending);
    let payments = DeadLetterFilter {
        message_type: Some("payment.made".into()),
        ..DeadLetterFilter::default()
    };
    assert_eq!(b.count(&payments).await.unwrap(), 20);
    let page = b.list(&DeadLetterFilter::default(), 5, 10).await.unwrap();
    let expected: Vec<&str> = ids[10..15].iter().map(|l| l.id.as_str()).collect();
    assert_eq!(
        page.iter()
            .map(|e| e.letter.id.as_str())
            .collect::<Vec<_>>(),
        expected
    );
    let many = b
        .get_many(&[ids[3].id.clone(), "missing".into(), ids[1].id.clone()])
        .await
        .unwrap();
    assert_eq!(
        many.iter()
            .map(|e| e.letter.id.as_str())
            .collect::<Vec<_>>(),
        vec![ids[3].id.as_str(), ids[1].id.as_str()]
    );

    // Both instances claim at once: every due entry goes to exactly one of them.
    let lease = Duration::from_secs(60);
    let (from_a, from_b) = tokio::join!(
        a.claim_due(SystemTime::now(), lease, 25),
        b.claim_due(SystemTime::now(), lease, 25)
    );
    let (from_a, from_b) = (from_a.unwrap(), from_b.unwrap());
    let a_ids: HashSet<String> = from_a.iter().map(|e| e.letter.id.clone()).collect();
    let b_ids: HashSet<String> = from_b.iter().map(|e| e.letter.id.clone()).collect();
    assert!(a_ids.is_disjoint(&b_ids), "an entry was claimed twice");
    assert_eq!(a_ids.len() + b_ids.len(), 40);
    assert!(
        a.claim_due(SystemTime::now(), lease, 100)
            .await
            .unwrap()
            .is_empty()
    );

    let groups = a.groups(&DeadLetterFilter::default()).await.unwrap();
    assert_eq!(groups.len(), 1);
    assert_eq!(groups[0].count, 40);
    let mut parked = a.get(&ids[5].id).await.unwrap().unwrap();
    parked.status = EntryStatus::Parked;
    assert!(b.update(&parked).await.unwrap());
    let stats = a.stats().await.unwrap();
    assert_eq!((stats.depth, stats.parked), (40, 1));
    let current: Vec<(String, u64)> = a
        .get_many(&[ids[0].id.clone(), ids[2].id.clone()])
        .await
        .unwrap()
        .iter()
        .map(|e| (e.letter.id.clone(), e.version))
        .collect();
    assert_eq!(a.remove_many(&current).await.unwrap(), 2);
    assert_eq!(b.purge(&payments).await.unwrap(), 20);
    assert_eq!(a.count(&DeadLetterFilter::default()).await.unwrap(), 18);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processors_sharing_a_table_redrive_each_entry_once() {
    let table = Table::new();
    let broker: Arc<dyn Broker> = Arc::new(MemoryBroker::new());
    let topic = helix_messaging_testkit::fresh_name("shared");
    let mut sink = broker
        .subscribe(&topic, SubscribeOptions::group("g"))
        .await
        .unwrap();
    let config = ProcessorConfig {
        batch_size: 50,
        topics: vec![helix_messaging_testkit::fresh_name("dlq")],
        ..ProcessorConfig::default()
    };
    let open = || async {
        Arc::new(
            PostgresDeadLetterStore::connect_table(&connection(), &table.0)
                .await
                .unwrap(),
        )
    };
    let first = Processor::new(broker.clone(), open().await, config.clone()).unwrap();
    let second = Processor::new(broker.clone(), open().await, config).unwrap();
    let mut sent = HashSet::new();
    for i in 0..30 {
        let l = letter(
            &topic,
            DeadLetterReason::MaxRetriesExceeded,
            "order.created",
            SystemTime::now() - Duration::from_secs(60 - i),
        );
        sent.insert(l.message.id().to_owned());
        let mut entry = StoredDeadLetter::received(l, SystemTime::now());
        entry.next_attempt_at = Some(SystemTime::now() - Duration::from_secs(1));
        first.store().insert(entry).await.unwrap();
    }
    let (a, b) = tokio::join!(first.process_due(), second.process_due());
    assert_eq!(
        a.unwrap() + b.unwrap(),
        30,
        "every due entry attempted once in all"
    );
    let mut received = HashSet::new();
    for _ in 0..30 {
        let d = tokio::time::timeout(Duration::from_secs(10), sink.next())
            .await
            .expect("a re-driven message")
            .expect("open")
            .expect("delivery");
        assert!(
            received.insert(d.message().id().to_owned()),
            "re-driven twice"
        );
        d.ack().await.unwrap();
    }
    assert_eq!(received, sent);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), sink.next())
            .await
            .is_err(),
        "a duplicate arrived"
    );
    assert_eq!(first.stats().await.unwrap().depth, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_checkpoints_live_beside_the_dlq_in_postgres() {
    let table = Table::new();
    let dlq = PostgresDeadLetterStore::connect_table(&connection(), &table.0)
        .await
        .expect("PostgreSQL on 127.0.0.1:5432 (scripts/test starts it)");
    let store = dlq.replay_store().await.unwrap();
    replay_store_round_trips(&store).await;
    let config = connection();
    let name = table.0.clone();
    let open: OpenStore = Arc::new(move || {
        let (config, name) = (config.clone(), name.clone());
        async move {
            let dlq = PostgresDeadLetterStore::connect_table(&config, &name)
                .await
                .unwrap();
            Arc::new(dlq.replay_store().await.unwrap())
                as Arc<dyn helix_messaging_core::replay::ReplayStore>
        }
        .boxed()
    });
    a_killed_replay_resumes_without_publishing_twice(open).await;
}

/// The DLQ and its replay checkpoints share one database. A DLQ call stuck behind a lock
/// (a slow listing, a table another client holds) must not hold up a replay's lease
/// renewal, or the replay is taken over while it runs (issue 27, item 4).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dlq_call_stuck_on_a_lock_does_not_hold_up_a_replay_lease() {
    use helix_messaging_core::replay::{Checkpoint, ReplayRecord, ReplayRequest, ReplayStore};

    let table = Table::new();
    let dlq = Arc::new(
        PostgresDeadLetterStore::connect_table(&connection(), &table.0)
            .await
            .expect("PostgreSQL on 127.0.0.1:5432 (scripts/test starts it)"),
    );
    let replays = dlq.replay_store().await.unwrap();
    let now = SystemTime::now();
    let request = ReplayRequest::new("orders", now - Duration::from_secs(60), now).with_id("r");
    let record = ReplayRecord {
        progress: serde_json::from_value(serde_json::json!({
            "id": "r", "status": "running", "topic": "orders", "target_topic": "orders.replay",
            "dry_run": false, "total": 0, "replayed": 0, "skipped": 0, "failed": 0,
            "filtered": 0, "duplicates": 0, "by_type": {}, "skipped_by_type": {},
            "reached": null, "from_time": request.from_time, "to_time": request.to_time,
            "started_at": now, "finished_at": null, "last_error": null, "resumes": 0
        }))
        .unwrap(),
        request,
        checkpoint: Checkpoint::default(),
    };
    let creator = replays
        .create(&record, "creator", Duration::from_secs(30))
        .await
        .unwrap()
        .expect("created");
    replays.release("r", &creator).await.unwrap();

    // Another client locks the DLQ's table; a DLQ count then waits for it.
    let (locker, connection_task) = tokio_postgres::connect(&connection(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection_task);
    locker
        .batch_execute(&format!(
            "BEGIN; LOCK TABLE {} IN ACCESS EXCLUSIVE MODE",
            table.0
        ))
        .await
        .unwrap();
    let counting = tokio::spawn({
        let dlq = dlq.clone();
        async move { dlq.count(&DeadLetterFilter::default()).await }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let waiting: i64 = locker
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE $1",
                &[&format!("%{}%", table.0)],
            )
            .await
            .unwrap()
            .get(0);
        if waiting > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the DLQ count never waited on the lock"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let claimed = tokio::time::timeout(
        Duration::from_secs(10),
        replays.claim("r", "me", Duration::from_secs(30)),
    )
    .await;
    locker.batch_execute("ROLLBACK").await.unwrap();
    let counted = tokio::time::timeout(Duration::from_secs(30), counting)
        .await
        .expect("the count finished once the lock was gone");
    assert_eq!(counted.unwrap().unwrap(), 0);
    let lease = claimed
        .expect("the replay's lease was claimed while the DLQ call waited")
        .unwrap();
    assert!(lease.is_some(), "free: claimed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_and_its_count_are_one_read_and_leave_discarded_entries_out_alike() {
    let table = Table::new();
    let store = PostgresDeadLetterStore::connect_table(&connection(), &table.0)
        .await
        .expect("PostgreSQL on 127.0.0.1:5432 (scripts/test starts it)");
    check_a_page_and_its_count_leave_discarded_entries_out_alike(&store, "orders").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_replays_are_pruned_oldest_first_in_postgres() {
    let table = Table::new();
    let dlq = PostgresDeadLetterStore::connect_table(&connection(), &table.0)
        .await
        .expect("PostgreSQL on 127.0.0.1:5432 (scripts/test starts it)");
    check_finished_replays_are_pruned_oldest_first(&dlq.replay_store().await.unwrap()).await;
}
