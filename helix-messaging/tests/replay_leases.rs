//! One replay runs in one place: concurrent starts and resumes in one process run it once,
//! and a handler that lost its lease writes nothing over the one that took the replay over
//! (issue 27, items 3 and 4).
#![cfg(feature = "memory")]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use helix_messaging::replay::{
    Checkpoint, MemoryReplayStore, ReplayConfig, ReplayHandler, ReplayOptions, ReplayProgress,
    ReplayRecord, ReplayRequest, ReplayStatus, ReplayStore,
};
use helix_messaging::{Broker, Message};
use helix_messaging_testkit::plane::{FaultyReplayStore, read_copies};

const SOURCE: &str = "audit";
const TARGET: &str = "audit.copies";

/// A memory broker whose `audit` topic holds `n` messages over 7 keys; the window around
/// them.
async fn history(n: usize) -> (Arc<dyn Broker>, Vec<Message>, SystemTime, SystemTime) {
    let broker: Arc<dyn Broker> = helix_messaging::connect("memory://").await.unwrap();
    let from = SystemTime::now() - Duration::from_secs(1);
    let sent: Vec<Message> = (0..n)
        .map(|i| Message::new(format!("event {i}")).with_key(format!("k{}", i % 7)))
        .collect();
    broker
        .publish_batch(SOURCE, sent.clone())
        .await
        .into_result()
        .unwrap();
    (
        broker,
        sent,
        from,
        SystemTime::now() + Duration::from_secs(1),
    )
}

/// How often each source message was copied into the target by replay `id`.
async fn copies(broker: &Arc<dyn Broker>, id: &str, from: SystemTime) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for (copy, _) in read_copies(broker, TARGET, from, id).await.unwrap() {
        *counts.entry(copy).or_default() += 1;
    }
    counts
}

fn request(id: &str, from: SystemTime, to: SystemTime, options: ReplayOptions) -> ReplayRequest {
    ReplayRequest::new(SOURCE, from, to)
        .with_id(id)
        .with_target_topic(TARGET)
        .with_options(options)
}

/// The record of a replay that failed before publishing anything.
fn failed_record(request: ReplayRequest) -> ReplayRecord {
    let progress = ReplayProgress {
        id: request.id.clone(),
        status: ReplayStatus::Failed,
        topic: request.topic.clone(),
        target_topic: request.target(),
        dry_run: false,
        total: 0,
        replayed: 0,
        skipped: 0,
        failed: 0,
        filtered: 0,
        duplicates: 0,
        by_type: Default::default(),
        skipped_by_type: Default::default(),
        reached: None,
        from_time: request.from_time,
        to_time: request.to_time,
        started_at: SystemTime::now(),
        finished_at: Some(SystemTime::now()),
        last_error: Some("the broker went away".into()),
        resumes: 0,
    };
    ReplayRecord {
        request,
        progress,
        checkpoint: Checkpoint::default(),
    }
}

async fn wait_until(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done().await {
        assert!(Instant::now() < deadline, "{what}: not in 30 s");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_replay_resumed_three_times_at_once_runs_once() {
    let (broker, sent, from, to) = history(300).await;
    let store = Arc::new(FaultyReplayStore::new(Arc::new(MemoryReplayStore::new())));
    let record = failed_record(request("resumed", from, to, ReplayOptions::default()));
    // Failed and free: its last holder released it.
    let setup = store
        .create(&record, "setup", Duration::from_secs(30))
        .await
        .unwrap()
        .expect("created");
    store.release("resumed", &setup).await.unwrap();
    let handler = ReplayHandler::open(broker.clone(), ReplayConfig::default(), store)
        .await
        .unwrap();

    let (a, b, c) = tokio::join!(
        handler.resume_replay("resumed"),
        handler.resume_replay("resumed"),
        handler.resume_replay("resumed"),
    );
    let started = [&a, &b, &c].iter().filter(|r| r.is_ok()).count();
    assert_eq!(
        started, 1,
        "exactly one resume starts it: {a:?} {b:?} {c:?}"
    );
    let done = tokio::time::timeout(Duration::from_secs(30), handler.wait("resumed"))
        .await
        .expect("finished in time")
        .unwrap();
    assert_eq!(done.status, ReplayStatus::Completed, "{done:?}");
    assert_eq!((done.total, done.replayed), (300, 300), "{done:?}");
    let copies = copies(&broker, "resumed", from).await;
    assert_eq!(copies.len(), sent.len(), "every message copied");
    let twice: Vec<_> = copies.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "copied more than once: {} messages",
        twice.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_racing_the_adopt_loop_and_a_cancel_stops_the_only_run() {
    let (broker, _, from, to) = history(200).await;
    let store = Arc::new(FaultyReplayStore::new(Arc::new(MemoryReplayStore::new())));
    let handler = ReplayHandler::open(broker.clone(), ReplayConfig::default(), store)
        .await
        .unwrap();
    let slow = ReplayOptions {
        batch_size: 1,
        delay_between: Duration::from_millis(20),
        ..ReplayOptions::default()
    };
    let req = request("raced", from, to, slow);
    let (first, second) = tokio::join!(
        handler.start_replay(req.clone()),
        handler.start_replay(req.clone())
    );
    assert_eq!(
        [&first, &second].iter().filter(|r| r.is_ok()).count(),
        1,
        "one id, one replay: {first:?} {second:?}"
    );
    handler.cancel_replay("raced").await.unwrap();
    let done = tokio::time::timeout(Duration::from_secs(30), handler.wait("raced"))
        .await
        .expect("the cancel stopped it")
        .unwrap();
    assert_eq!(done.status, ReplayStatus::Cancelled, "{done:?}");
    let at_cancel = copies(&broker, "raced", from).await.len();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        copies(&broker, "raced", from).await.len(),
        at_cancel,
        "nothing publishes after the cancel"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_lost_its_lease_stops_and_overwrites_nothing() {
    const TOTAL: usize = 150;
    let (broker, sent, from, to) = history(TOTAL).await;
    let shared: Arc<dyn ReplayStore> = Arc::new(MemoryReplayStore::new());
    let cut_off = Arc::new(FaultyReplayStore::new(shared.clone()));
    let config = |name: &str| ReplayConfig {
        lease: Duration::from_millis(300),
        checkpoint_interval: Duration::ZERO,
        instance_id: Some(name.into()),
        ..ReplayConfig::default()
    };
    let first = ReplayHandler::open(broker.clone(), config("first"), cut_off.clone())
        .await
        .unwrap();
    let slow = ReplayOptions {
        batch_size: 1,
        delay_between: Duration::from_millis(15),
        ..ReplayOptions::default()
    };
    first
        .start_replay(request("taken-over", from, to, slow))
        .await
        .unwrap();
    wait_until("ten replayed by the first handler", async || {
        first.replay_progress("taken-over").await.unwrap().replayed >= 10
    })
    .await;
    // The first handler can no longer renew its lease; the second takes the replay over
    // once it has run out.
    cut_off.set_claims_down(true);
    let second = ReplayHandler::open(broker.clone(), config("second"), shared.clone())
        .await
        .unwrap();
    let done = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let record = shared.load("taken-over").await.unwrap().unwrap();
            if record.progress.status.is_finished() {
                return record;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("finished in time");
    // Let a stale holder, if it still runs, write what it would.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let record = shared.load("taken-over").await.unwrap().unwrap();
    assert_eq!(record, done, "nothing overwrote the finished record");
    assert_eq!(
        record.progress.status,
        ReplayStatus::Completed,
        "{record:?}"
    );
    assert!(
        record.progress.resumes >= 1,
        "the second handler resumed it"
    );
    assert_eq!(
        (record.progress.total, record.progress.replayed),
        (TOTAL as u64, TOTAL as u64),
        "{:?}",
        record.progress
    );
    let copies = copies(&broker, "taken-over", from).await;
    assert_eq!(copies.len(), sent.len(), "every message copied");
    // The first handler may have had one batch (one message) on its way when the second
    // took over; after that it publishes nothing.
    let twice = copies.values().filter(|n| **n > 1).count();
    assert!(twice <= 1, "{twice} messages copied twice");
    drop((first, second));
}
