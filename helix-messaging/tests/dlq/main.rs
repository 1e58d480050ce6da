//! The DLQ store and processor on the embedded broker: the SQLite store across reopenings,
//! automatic re-drive with backoff and parking, per-type handlers, and bulk redrive jobs
//! (frozen selection, rate limit, canary, cancel).
//!
//! This file holds the stores' tests; `processor` the processor's, `redrive` the bulk
//! redrive jobs', and `support` the helpers they share.

use std::time::{Duration, SystemTime};

#[path = "../common/mod.rs"]
mod common;
mod processor;
mod redrive;
mod sources;
mod support;
use helix_messaging_testkit::stores::letter;
use support::in_file;

use helix_messaging::dlq::{
    DeadLetterFilter, DeadLetterReason, DeadLetterStore, EntryStatus, SqliteDeadLetterStore,
    StoredDeadLetter,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_groups_sample_error_is_its_newest_failures_on_every_store() {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = SqliteDeadLetterStore::open(in_file(&dir)).await.unwrap();
    helix_messaging_testkit::stores::check_the_sample_error_is_the_newest_failures(
        &sqlite, "orders",
    )
    .await;
    let memory = helix_messaging::dlq::MemoryDeadLetterStore::new();
    helix_messaging_testkit::stores::check_the_sample_error_is_the_newest_failures(
        &memory, "orders",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_and_its_count_leave_discarded_entries_out_alike_on_every_store() {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = SqliteDeadLetterStore::open(in_file(&dir)).await.unwrap();
    helix_messaging_testkit::stores::check_a_page_and_its_count_leave_discarded_entries_out_alike(
        &sqlite, "orders",
    )
    .await;
    let memory = helix_messaging::dlq::MemoryDeadLetterStore::new();
    helix_messaging_testkit::stores::check_a_page_and_its_count_leave_discarded_entries_out_alike(
        &memory, "orders",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_hold_entries_and_versions_fence_writes_on_every_store() {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = SqliteDeadLetterStore::open(in_file(&dir)).await.unwrap();
    helix_messaging_testkit::stores::check_claims_hold_entries_and_versions_fence_writes(
        &sqlite, "orders",
    )
    .await;
    let memory = helix_messaging::dlq::MemoryDeadLetterStore::new();
    helix_messaging_testkit::stores::check_claims_hold_entries_and_versions_fence_writes(
        &memory, "orders",
    )
    .await;
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
