//! Background jobs against a broker whose publishes are slow.
//!
//! - A replay reads its next batch, and makes its copies, while the previous batch is being
//!   published: a copy made ahead still carries the time it is published, which a resumed
//!   replay relies on to find it (Kafka reads a time range by the records' own timestamps).
//! - An unpaced redrive claims several batches at once: each batch still has the whole
//!   `processing_timeout`, as a batch claimed on its own would.
//! - Each group of a slow unpaced redrive, the ones claimed while the group before was
//!   being published too, still has the whole `processing_timeout` per batch.
//! - An unpaced redrive cancelled midway leaves nothing held: the group it claimed ahead
//!   is published, not left held (another job may have skipped it). A job stopped by a
//!   failing store lets its group ahead go.
//! - A group's removal does not wait for the claim of the group ahead: a claim that stalls
//!   past a group's hold does not push that group's removal past it.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use helix_messaging_core::dlq::{
    DEFAULT_DLQ_TOPIC, DeadLetter, DeadLetterFilter, DeadLetterStats, DeadLetterStore,
    FailureGroup, HEADER_ORIGINAL_TOPIC, MemoryDeadLetterStore, Processor, ProcessorConfig,
    RedriveProgress, RedriveRequest, RedriveStatus, StoredDeadLetter,
};
use helix_messaging_core::replay::{
    ReplayConfig, ReplayHandler, ReplayOptions, ReplayRequest, ReplayStatus,
};
use helix_messaging_core::{
    BatchReport, Broker, Message, Publisher, Result, TimeRange, async_trait,
};
use helix_messaging_memory::MemoryBroker;

mod common;

/// How long each publish takes: long enough for the replay to read ahead meanwhile.
const PUBLISH_TAKES: Duration = Duration::from_millis(20);
/// The pause between batches: longer than any copy may wait between being made and sent.
const BETWEEN_BATCHES: Duration = Duration::from_millis(400);

/// The memory broker, except that a publish takes the given time before it is made.
#[derive(Debug)]
struct SlowPublish(MemoryBroker, Duration);

#[async_trait]
impl Publisher for SlowPublish {
    async fn publish(&self, topic: &str, message: Message) -> Result<()> {
        tokio::time::sleep(self.1).await;
        self.0.publish(topic, message).await
    }

    async fn publish_batch(&self, topic: &str, messages: Vec<Message>) -> BatchReport {
        tokio::time::sleep(self.1).await;
        self.0.publish_batch(topic, messages).await
    }
}

common::memory_underneath!(SlowPublish);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_made_ahead_carry_the_time_they_are_published() {
    const WINDOW: usize = 300;
    let memory = MemoryBroker::new();
    let from = SystemTime::now() - Duration::from_secs(60);
    for i in 0..WINDOW {
        memory
            .publish("audit", Message::new(format!("m{i}")))
            .await
            .unwrap();
    }
    let to = SystemTime::now() + Duration::from_millis(1);
    let broker: Arc<dyn Broker> = Arc::new(SlowPublish(memory, PUBLISH_TAKES));
    let handler = ReplayHandler::new(broker.clone(), ReplayConfig::default());
    let request = ReplayRequest::new("audit", from, to)
        .with_target_topic("audit.replayed")
        .with_options(ReplayOptions {
            batch_size: 100,
            delay_between: BETWEEN_BATCHES,
            ..ReplayOptions::default()
        });
    let id = handler.start_replay(request).await.unwrap().id;
    let done = tokio::time::timeout(Duration::from_secs(30), handler.wait(&id))
        .await
        .expect("the replay finished within 30 s")
        .unwrap();
    assert_eq!(done.status, ReplayStatus::Completed, "{done:?}");
    assert_eq!(done.replayed as usize, WINDOW, "{done:?}");

    let range = TimeRange::new(from, SystemTime::now() + Duration::from_secs(5)).unwrap();
    let mut copies = broker.read_range("audit.replayed", range).await.unwrap();
    let mut seen = 0;
    while let Some(entry) = copies.next().await {
        let entry = entry.unwrap();
        let waited = entry
            .recorded_at
            .duration_since(entry.message.timestamp())
            .unwrap_or_default();
        assert!(
            waited < BETWEEN_BATCHES / 2,
            "copy {} was stamped {waited:?} before the broker took it",
            entry.message.id()
        );
        seen += 1;
    }
    assert_eq!(seen, WINDOW);
}

/// A processor on a broker whose every publish takes `publish_takes`, holding `letters` dead
/// letters of `orders`.
async fn slow_processor(
    letters: usize,
    processing_timeout: Duration,
    publish_takes: Duration,
) -> Processor {
    let broker: Arc<dyn Broker> = Arc::new(SlowPublish(MemoryBroker::new(), publish_takes));
    let config = ProcessorConfig {
        auto_redrive: false,
        processing_timeout,
        ..ProcessorConfig::default()
    };
    let processor = Processor::new(broker, Arc::new(MemoryDeadLetterStore::new()), config).unwrap();
    ingest_orders(&processor, letters).await;
    processor
}

/// Dead-letter `letters` messages of `orders` into `processor`'s store.
async fn ingest_orders(processor: &Processor, letters: usize) {
    for i in 0..letters {
        let failed =
            Message::new(format!("order {i}")).with_header(HEADER_ORIGINAL_TOPIC, "orders");
        processor
            .ingest(DeadLetter::from_message(&failed, DEFAULT_DLQ_TOPIC))
            .await
            .unwrap();
    }
}

/// Wait (up to `within`) for the job `id` to complete, every one of `letters` re-driven.
async fn every_letter_redriven(processor: &Processor, id: &str, letters: usize, within: Duration) {
    let progress = common::redrive_finished(processor, id, within).await;
    assert_eq!(progress.status, RedriveStatus::Completed, "{progress:?}");
    assert_eq!(
        (progress.redriven, progress.failed, progress.skipped),
        (letters as u64, 0, 0),
        "{progress:?}"
    );
}

/// Wait (up to 10 s) until the job `id` has re-driven something.
async fn some_redriven(processor: &Processor, id: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while processor.redrive_progress(id).unwrap().redriven == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "nothing re-driven in 10 s"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Every entry `processor`'s store holds.
async fn every_entry(processor: &Processor) -> Vec<StoredDeadLetter> {
    processor
        .store()
        .list(&DeadLetterFilter::default(), usize::MAX, 0)
        .await
        .unwrap()
}

/// Start an unpaced redrive of everything `processor` holds.
async fn start_unpaced(processor: &Processor) -> RedriveProgress {
    processor
        .start_redrive(RedriveRequest {
            rate_per_second: None,
            ..RedriveRequest::default()
        })
        .await
        .unwrap()
}

/// A processor as [`slow_processor`] makes it, with [`PUBLISH_TAKES`], and the unpaced
/// redrive of its letters it has started.
async fn unpaced_redrive(
    letters: usize,
    processing_timeout: Duration,
) -> (Processor, RedriveProgress) {
    let processor = slow_processor(letters, processing_timeout, PUBLISH_TAKES).await;
    let job = start_unpaced(&processor).await;
    (processor, job)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_batch_of_a_grouped_redrive_has_the_whole_processing_timeout() {
    // Five batches of 100 in one claimed group: together they take five publishes, longer
    // than one timeout, each well within it.
    const LETTERS: usize = 500;
    let timeout = PUBLISH_TAKES * 3;
    let (processor, job) = unpaced_redrive(LETTERS, timeout).await;
    every_letter_redriven(&processor, &job.id, LETTERS, Duration::from_secs(30)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unpaced_redrive_cancelled_midway_holds_nothing_it_did_not_publish() {
    // Six claimed groups of 1,000, each ten slow batches: the cancel lands while the
    // first is being published (or, on a slow machine, a later one), and the group claimed
    // ahead meanwhile goes out too.
    const LETTERS: usize = 6_000;
    let (processor, job) =
        unpaced_redrive(LETTERS, ProcessorConfig::default().processing_timeout).await;
    some_redriven(&processor, &job.id).await;
    processor.cancel_redrive(&job.id).unwrap();
    let progress = common::redrive_finished(&processor, &job.id, Duration::from_secs(30)).await;
    assert_eq!(progress.status, RedriveStatus::Cancelled, "{progress:?}");
    // The first group, and the one claimed ahead while it was published.
    assert!(
        progress.redriven >= 2_000 && (progress.redriven as usize) < LETTERS,
        "{progress:?}"
    );
    let left = every_entry(&processor).await;
    assert_eq!(
        left.len() + progress.redriven as usize,
        LETTERS,
        "{progress:?}"
    );
    let now = SystemTime::now();
    let held = left.iter().filter(|entry| !entry.claimable(now)).count();
    assert_eq!(
        held, 0,
        "entries still held after the job ended: {progress:?}"
    );
}

/// Three groups of ten batches, each batch taking 3 s against a 10 s timeout: each group
/// takes 30 s, and a group claimed while the one before it was published still has the
/// whole timeout for each of its batches.
#[tokio::test(start_paused = true)]
async fn every_group_of_a_slow_unpaced_redrive_has_the_whole_processing_timeout() {
    const LETTERS: usize = 3_000;
    let processor = slow_processor(LETTERS, Duration::from_secs(10), Duration::from_secs(3)).await;
    let job = start_unpaced(&processor).await;
    every_letter_redriven(&processor, &job.id, LETTERS, Duration::from_secs(600)).await;
}

/// Two jobs over the same letters, the second skipping what the first holds, and the first
/// cancelled: between them every letter is re-driven, as if the first had held only what it
/// was publishing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_cancelled_while_another_skips_what_it_holds_leaves_no_letter_behind() {
    const LETTERS: usize = 3_000;
    let processor = slow_processor(
        LETTERS,
        ProcessorConfig::default().processing_timeout,
        PUBLISH_TAKES,
    )
    .await;
    let first = start_unpaced(&processor).await;
    some_redriven(&processor, &first.id).await;
    let second = start_unpaced(&processor).await;
    processor.cancel_redrive(&first.id).unwrap();
    let first = common::redrive_finished(&processor, &first.id, Duration::from_secs(30)).await;
    let second = common::redrive_finished(&processor, &second.id, Duration::from_secs(30)).await;
    assert_eq!(second.status, RedriveStatus::Completed, "{second:?}");
    let left = every_entry(&processor).await;
    assert!(
        left.is_empty(),
        "{} left; first {first:?}, second {second:?}",
        left.len()
    );
    assert_eq!(
        first.redriven + second.redriven,
        LETTERS as u64,
        "first {first:?}, second {second:?}"
    );
}

/// The memory store with scripted faults, which notes when each claimed entry's hold runs
/// out (in tokio's time) and counts the removals that came later than that.
#[derive(Default)]
struct ScriptedStore {
    inner: MemoryDeadLetterStore,
    /// Every removal fails.
    removals_fail: bool,
    /// The claim with this number (from 1) waits this long before it is made.
    slow_claim: Option<(usize, Duration)>,
    claims: std::sync::atomic::AtomicUsize,
    held_until: parking_lot::Mutex<std::collections::HashMap<String, tokio::time::Instant>>,
    late_removals: std::sync::atomic::AtomicUsize,
}

#[async_trait]
impl DeadLetterStore for ScriptedStore {
    async fn insert(&self, entry: StoredDeadLetter) -> Result<bool> {
        self.inner.insert(entry).await
    }
    async fn get(&self, id: &str) -> Result<Option<StoredDeadLetter>> {
        self.inner.get(id).await
    }
    async fn list(
        &self,
        filter: &DeadLetterFilter,
        limit: usize,
        offset: usize,
    ) -> Result<Vec<StoredDeadLetter>> {
        self.inner.list(filter, limit, offset).await
    }
    async fn count(&self, filter: &DeadLetterFilter) -> Result<u64> {
        self.inner.count(filter).await
    }
    async fn ids(&self, filter: &DeadLetterFilter) -> Result<Vec<String>> {
        self.inner.ids(filter).await
    }
    async fn claim_due(
        &self,
        now: SystemTime,
        lease: Duration,
        limit: usize,
    ) -> Result<Vec<StoredDeadLetter>> {
        self.inner.claim_due(now, lease, limit).await
    }
    async fn claim(
        &self,
        ids: &[String],
        now: SystemTime,
        lease: Duration,
    ) -> Result<Vec<StoredDeadLetter>> {
        let number = self
            .claims
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            + 1;
        let asked = tokio::time::Instant::now();
        if let Some((_, wait)) = self.slow_claim.filter(|(slow, _)| *slow == number) {
            tokio::time::sleep(wait).await;
        }
        let claimed = self.inner.claim(ids, now, lease).await?;
        let mut held = self.held_until.lock();
        for entry in &claimed {
            held.insert(entry.id().to_owned(), asked + lease);
        }
        Ok(claimed)
    }
    async fn update(&self, entry: &StoredDeadLetter) -> Result<bool> {
        self.inner.update(entry).await
    }
    async fn remove(&self, id: &str, version: u64) -> Result<bool> {
        if self.removals_fail {
            return Err(helix_messaging_core::Error::new(
                helix_messaging_core::ErrorKind::Backend,
                "the disk is full",
            ));
        }
        let held_until = self.held_until.lock().get(id).copied();
        if held_until.is_some_and(|until| tokio::time::Instant::now() >= until) {
            self.late_removals
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        self.inner.remove(id, version).await
    }
    async fn purge(&self, filter: &DeadLetterFilter) -> Result<u64> {
        self.inner.purge(filter).await
    }
    async fn groups(&self, filter: &DeadLetterFilter) -> Result<Vec<FailureGroup>> {
        self.inner.groups(filter).await
    }
    async fn stats(&self) -> Result<DeadLetterStats> {
        self.inner.stats().await
    }
}

/// A processor on the memory broker over `store`, holding `letters` dead letters of
/// `orders`.
async fn processor_over(store: Arc<ScriptedStore>, letters: usize) -> Processor {
    let broker: Arc<dyn Broker> = Arc::new(MemoryBroker::new());
    let config = ProcessorConfig {
        auto_redrive: false,
        ..ProcessorConfig::default()
    };
    let processor = Processor::new(broker, store, config).unwrap();
    ingest_orders(&processor, letters).await;
    processor
}

/// The claim of the second group (made while the first is published) takes 100 s, longer
/// than the first group's hold (90 s): the first group's removal does not wait for it, and
/// comes while its hold lasts.
#[tokio::test(start_paused = true)]
async fn a_slow_claim_ahead_does_not_hold_back_the_removal_before_it() {
    const LETTERS: usize = 2_000;
    let store = Arc::new(ScriptedStore {
        slow_claim: Some((2, Duration::from_secs(100))),
        ..ScriptedStore::default()
    });
    let processor = processor_over(store.clone(), LETTERS).await;
    let job = start_unpaced(&processor).await;
    every_letter_redriven(&processor, &job.id, LETTERS, Duration::from_secs(900)).await;
    assert_eq!(
        store
            .late_removals
            .load(std::sync::atomic::Ordering::SeqCst),
        0,
        "removals after their hold ran out"
    );
    let left = store.count(&DeadLetterFilter::default()).await.unwrap();
    assert_eq!(left, 0, "every re-driven letter was removed");
}

/// Removals fail: the job stops once the group under way is published, and the group it
/// claimed ahead is let go at once rather than held until its claim runs out. (What was
/// published and could not be removed stays held: it may be re-driven again later.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_stopped_by_its_store_lets_go_of_the_group_it_claimed_ahead() {
    const LETTERS: usize = 4_000;
    let store = Arc::new(ScriptedStore {
        removals_fail: true,
        ..ScriptedStore::default()
    });
    let processor = processor_over(store, LETTERS).await;
    let job = start_unpaced(&processor).await;
    let progress = common::redrive_finished(&processor, &job.id, Duration::from_secs(30)).await;
    assert_eq!(progress.status, RedriveStatus::Failed, "{progress:?}");
    // The first group's removal fails while the second is published and the third
    // claimed: the job stops after the second.
    assert_eq!(progress.redriven, 2_000, "{progress:?}");
    let left = every_entry(&processor).await;
    assert_eq!(left.len(), LETTERS, "nothing could be removed");
    let now = SystemTime::now();
    let held = left.iter().filter(|entry| !entry.claimable(now)).count();
    assert_eq!(
        held, 2_000,
        "only what was published stays held: {progress:?}"
    );
}
