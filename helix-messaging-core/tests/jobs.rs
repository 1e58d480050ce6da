//! Background jobs are bounded (issue 29): a redrive is paced by default, at most
//! `MAX_RUNNING_REDRIVES` redrives and `MAX_RUNNING_REPLAYS` replays run at once (one more is
//! `Busy`), a redrive id in use is a `Conflict`, finished jobs are kept only up to
//! `MAX_FINISHED_REDRIVES` / `MAX_FINISHED_REPLAYS`, and a redrive preview changes nothing.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use helix_messaging_core::dlq::{
    DEFAULT_REDRIVE_RATE, DeadLetter, DeadLetterFilter, DeadLetterReason, MAX_FINISHED_REDRIVES,
    MAX_RUNNING_REDRIVES, MemoryDeadLetterStore, Processor, ProcessorConfig, RedriveRequest,
    RedriveStatus,
};
use helix_messaging_core::replay::{
    Checkpoint, MAX_FINISHED_REPLAYS, MAX_RUNNING_REPLAYS, MemoryReplayStore, ReplayConfig,
    ReplayHandler, ReplayOptions, ReplayProgress, ReplayRecord, ReplayRequest, ReplayStatus,
    ReplayStore,
};
use helix_messaging_core::{Broker, DeliveryInfo, ErrorKind, Message};
use helix_messaging_memory::MemoryBroker;

fn processor() -> Processor {
    let broker: Arc<dyn Broker> = Arc::new(MemoryBroker::new());
    Processor::new(
        broker,
        Arc::new(MemoryDeadLetterStore::new()),
        ProcessorConfig {
            auto_redrive: false,
            ..ProcessorConfig::default()
        },
    )
    .unwrap()
}

async fn ingest(processor: &Processor, n: usize) {
    let info = DeliveryInfo {
        topic: "jobs.orders".into(),
        group: Some("workers".into()),
        attempt: 3,
        redelivered: true,
        position: None,
    };
    for i in 0..n {
        let now = SystemTime::now();
        let letter = DeadLetter::new(
            &Message::new(format!("m{i}")),
            &info,
            DeadLetterReason::Permanent,
            "boom",
            now,
            now,
        );
        assert!(processor.ingest(letter).await.unwrap());
    }
}

/// Wait (5 s at most) until no redrive job runs.
async fn until_idle(processor: &Processor) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while processor
        .list_redrives()
        .iter()
        .any(|job| !job.status.is_finished())
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "redrives still running after 5 s: {:?}",
            processor.list_redrives()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[test]
fn a_redrive_is_paced_unless_it_says_otherwise() {
    assert_eq!(
        RedriveRequest::default().rate_per_second,
        Some(DEFAULT_REDRIVE_RATE)
    );
}

#[tokio::test]
async fn one_redrive_more_than_the_most_running_is_busy_and_an_id_in_use_a_conflict() {
    let processor = processor();
    // At the slowest pace each job re-drives one entry at once and the next a hundred seconds
    // later: with more entries than jobs, each stays running.
    ingest(&processor, 10).await;
    let slow = |id: &str| RedriveRequest {
        rate_per_second: Some(0.01),
        batch_size: 1,
        id: Some(id.to_owned()),
        ..RedriveRequest::default()
    };
    for i in 0..MAX_RUNNING_REDRIVES {
        processor
            .start_redrive(slow(&format!("slow-{i}")))
            .await
            .unwrap();
    }
    let busy = processor.start_redrive(slow("one-more")).await.unwrap_err();
    assert_eq!(busy.kind(), ErrorKind::Busy, "{busy}");
    assert!(busy.is_retryable(), "{busy}");
    assert!(busy.to_string().contains("MAX_RUNNING_REDRIVES"), "{busy}");
    assert!(
        processor.redrive_progress("one-more").is_err(),
        "nothing was started"
    );
    let taken = processor.start_redrive(slow("slow-0")).await.unwrap_err();
    assert_eq!(taken.kind(), ErrorKind::Conflict, "{taken}");
    assert!(!taken.is_retryable(), "{taken}");

    processor.cancel_redrive("slow-0").unwrap();
    until_idle_of(&processor, "slow-0").await;
    processor
        .start_redrive(slow("after-one-ended"))
        .await
        .expect("a place is free once one has ended");
    for job in processor.list_redrives() {
        processor.cancel_redrive(&job.id).unwrap();
    }
    until_idle(&processor).await;
}

async fn until_idle_of(processor: &Processor, id: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !processor.redrive_progress(id).unwrap().status.is_finished() {
        assert!(tokio::time::Instant::now() < deadline, "{id} still running");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn finished_redrives_are_kept_up_to_the_most_and_running_ones_always() {
    let processor = processor();
    ingest(&processor, 2).await;
    let running = processor
        .start_redrive(RedriveRequest {
            rate_per_second: Some(0.01),
            batch_size: 1,
            id: Some("running".into()),
            ..RedriveRequest::default()
        })
        .await
        .unwrap();
    // Selections of nothing: each job finishes at once.
    let nothing = DeadLetterFilter {
        topic: Some("no.such.topic".into()),
        ..DeadLetterFilter::default()
    };
    let mut ids = Vec::new();
    for i in 0..MAX_FINISHED_REDRIVES + 5 {
        let id = format!("empty-{i:03}");
        processor
            .start_redrive(RedriveRequest {
                filter: nothing.clone(),
                id: Some(id.clone()),
                ..RedriveRequest::default()
            })
            .await
            .unwrap();
        until_idle_of(&processor, &id).await;
        ids.push(id);
    }
    let jobs = processor.list_redrives();
    assert_eq!(
        jobs.len(),
        MAX_FINISHED_REDRIVES + 1,
        "the most kept, and the running one"
    );
    for forgotten in &ids[..5] {
        let err = processor.redrive_progress(forgotten).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound, "{forgotten} was pruned");
    }
    for kept in &ids[5..] {
        processor
            .redrive_progress(kept)
            .expect("the newest are kept");
    }
    assert_eq!(
        processor.redrive_progress(&running.id).unwrap().status,
        RedriveStatus::Running,
        "a running job, the oldest, is never pruned"
    );
    processor.cancel_redrive(&running.id).unwrap();
    until_idle(&processor).await;
}

#[tokio::test]
async fn a_redrive_preview_counts_the_selection_and_starts_and_changes_nothing() {
    let processor = processor();
    ingest(&processor, 3).await;
    let page = processor
        .list(&DeadLetterFilter::default(), 10, 0)
        .await
        .unwrap();
    processor
        .discard(page.entries[0].id(), "not worth it")
        .await
        .unwrap();
    let preview = processor
        .preview_redrive(&RedriveRequest::default())
        .await
        .unwrap();
    assert_eq!(preview.total, 2, "discarded entries are not re-driven");
    assert_eq!(preview.groups.len(), 1);
    assert_eq!(preview.groups[0].count, 2);
    assert!(processor.list_redrives().is_empty(), "nothing started");
    let after = processor
        .list(&DeadLetterFilter::default(), 10, 0)
        .await
        .unwrap();
    assert_eq!(after, page_with_discard(page, &after), "nothing changed");
    let bad = processor
        .preview_redrive(&RedriveRequest {
            batch_size: 0,
            ..RedriveRequest::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad.kind(), ErrorKind::InvalidInput, "checked as a start is");
}

/// `before` as it should read after its first entry was discarded (and nothing else).
fn page_with_discard(
    mut before: helix_messaging_core::dlq::DeadLetterPage,
    after: &helix_messaging_core::dlq::DeadLetterPage,
) -> helix_messaging_core::dlq::DeadLetterPage {
    before.entries[0] = after.entries[0].clone();
    before
}

#[tokio::test]
async fn one_replay_more_than_the_most_running_is_busy() {
    let broker: Arc<dyn Broker> = Arc::new(MemoryBroker::new());
    let from = SystemTime::now() - Duration::from_secs(1);
    for i in 0..3 {
        broker
            .publish("jobs.history", Message::new(format!("h{i}")))
            .await
            .unwrap();
    }
    assert_eq!(ReplayConfig::default().max_active, MAX_RUNNING_REPLAYS);
    let handler = ReplayHandler::new(broker, ReplayConfig::default());
    // One message a minute: each stays running.
    let slow = || {
        ReplayRequest::new("jobs.history", from, SystemTime::now()).with_options(ReplayOptions {
            batch_size: 1,
            delay_between: Duration::from_secs(60),
            ..ReplayOptions::default()
        })
    };
    let mut started = Vec::new();
    for _ in 0..MAX_RUNNING_REPLAYS {
        started.push(handler.start_replay(slow()).await.unwrap().id);
    }
    let busy = handler.start_replay(slow()).await.unwrap_err();
    assert_eq!(busy.kind(), ErrorKind::Busy, "{busy}");
    assert!(busy.to_string().contains("MAX_RUNNING_REPLAYS"), "{busy}");
    for id in &started {
        handler.cancel_replay(id).await.unwrap();
        let done = tokio::time::timeout(Duration::from_secs(5), handler.wait(id))
            .await
            .expect("cancelled within 5 s")
            .unwrap();
        assert_eq!(done.status, ReplayStatus::Cancelled);
    }
}

fn record(id: &str, status: ReplayStatus, finished_secs: u64) -> ReplayRecord {
    let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
    let request = ReplayRequest::new("t", start, start + Duration::from_secs(10)).with_id(id);
    let progress = ReplayProgress {
        id: id.to_owned(),
        status,
        topic: "t".into(),
        target_topic: "t.replay".into(),
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
        from_time: start,
        to_time: start + Duration::from_secs(10),
        started_at: start,
        finished_at: status
            .is_finished()
            .then(|| start + Duration::from_secs(finished_secs)),
        last_error: None,
        resumes: 0,
    };
    ReplayRecord {
        request,
        progress,
        checkpoint: Checkpoint::default(),
    }
}

#[tokio::test]
async fn a_replay_store_forgets_the_oldest_finished_records_beyond_the_most() {
    let store = MemoryReplayStore::new();
    let lease = Duration::from_secs(60);
    store
        .create(&record("running", ReplayStatus::Running, 0), "me", lease)
        .await
        .unwrap();
    store
        .create(&record("failed", ReplayStatus::Failed, 1), "me", lease)
        .await
        .unwrap();
    for i in 0..5 {
        let status = if i % 2 == 0 {
            ReplayStatus::Completed
        } else {
            ReplayStatus::Cancelled
        };
        // Finished in the order of their numbers, created in the reverse.
        let id = format!("done-{}", 4 - i);
        store
            .create(&record(&id, status, 10 + 4 - i), "me", lease)
            .await
            .unwrap();
    }
    let mut removed = store.prune_finished(3).await.unwrap();
    removed.sort();
    assert_eq!(removed, ["done-0", "done-1"], "the oldest finished first");
    let mut left: Vec<String> = store
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.request.id)
        .collect();
    left.sort();
    assert_eq!(left, ["done-2", "done-3", "done-4", "failed", "running"]);
    assert!(store.prune_finished(3).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_replay_handler_keeps_the_most_finished_replays() {
    let broker: Arc<dyn Broker> = Arc::new(MemoryBroker::new());
    let from = SystemTime::now() - Duration::from_secs(1);
    broker
        .publish("jobs.pruned", Message::new("one"))
        .await
        .unwrap();
    let handler = ReplayHandler::new(broker, ReplayConfig::default());
    let mut ids = Vec::new();
    for i in 0..MAX_FINISHED_REPLAYS + 2 {
        let request =
            ReplayRequest::new("jobs.pruned", from, SystemTime::now()).with_id(format!("r-{i:03}"));
        let id = handler.start_replay(request).await.unwrap().id;
        tokio::time::timeout(Duration::from_secs(5), handler.wait(&id))
            .await
            .expect("a one-message replay within 5 s")
            .unwrap();
        ids.push(id);
    }
    // Pruned once a replay has ended, just after it says so.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let listed = handler.list_replays().await.unwrap().len();
        if listed == MAX_FINISHED_REPLAYS {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{listed} replays listed after 5 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for forgotten in &ids[..2] {
        let err = handler.replay_progress(forgotten).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound, "{forgotten}");
    }
    handler
        .replay_progress(ids.last().unwrap())
        .await
        .expect("the newest is kept");
}
