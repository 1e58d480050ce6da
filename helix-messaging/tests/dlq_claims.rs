//! One DLQ entry, one re-drive at a time (issue 27, item 8): an automatic attempt, a
//! reprocess, a bulk redrive and a discard each act on an entry only while no other of them
//! holds it, and none writes back a stale copy. Before entries were claimed, a discard made
//! while a handler re-drove the entry was undone by the attempt's write-back, and a reprocess
//! or a bulk redrive during an attempt delivered the message twice.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime};

mod common;
use helix_messaging_testkit::stores::letter;

use async_trait::async_trait;
use futures::StreamExt;
use helix_messaging::dlq::{
    DeadLetter, DeadLetterFilter, DeadLetterReason, DeadLetterStats, DeadLetterStore, EntryStatus,
    FailureGroup, MemoryDeadLetterStore, Processor, ProcessorConfig, RedriveRequest, RedriveStatus,
    StoredDeadLetter,
};
use helix_messaging::{Broker, ErrorKind, SubscribeOptions, Subscription};
use tokio::sync::{Notify, Semaphore};

const WAIT: Duration = Duration::from_secs(15);
/// How long a test watches for a delivery that must not come.
const QUIET: Duration = Duration::from_millis(300);

fn name(what: &str) -> String {
    helix_messaging_testkit::fresh_name(what)
}

async fn broker() -> Arc<dyn Broker> {
    helix_messaging::connect("memory://")
        .await
        .expect("memory broker")
}

/// A handler for `llm.request` letters that says when it started and finishes, failing or
/// not, only when released.
#[derive(Clone)]
struct HeldHandler {
    started: Arc<Semaphore>,
    release: Arc<Notify>,
    calls: Arc<AtomicU32>,
}

impl Default for HeldHandler {
    fn default() -> Self {
        HeldHandler {
            started: Arc::new(Semaphore::new(0)),
            release: Arc::default(),
            calls: Arc::default(),
        }
    }
}

impl HeldHandler {
    fn register(&self, processor: &Processor, succeed: bool) {
        let held = self.clone();
        processor.register_handler("llm.request", move |_letter: DeadLetter| {
            let held = held.clone();
            async move {
                held.calls.fetch_add(1, Ordering::SeqCst);
                held.started.add_permits(1);
                held.release.notified().await;
                if succeed {
                    Ok(())
                } else {
                    Err("the provider is still rate-limited".into())
                }
            }
        });
    }

    async fn wait_started(&self) {
        tokio::time::timeout(WAIT, self.started.acquire())
            .await
            .expect("the handler started within the wait")
            .expect("open")
            .forget();
    }

    fn finish(&self) {
        self.release.notify_one();
    }
}

fn config() -> ProcessorConfig {
    ProcessorConfig {
        topics: vec![name("dlq")],
        retry_delay: Duration::from_millis(10),
        max_retry_delay: Duration::from_millis(10),
        max_retries: 5,
        ..ProcessorConfig::default()
    }
}

/// Stores a `llm.request` letter of `topic`, due for its automatic re-drive now.
async fn due_letter(store: &dyn DeadLetterStore, topic: &str) -> String {
    let now = SystemTime::now();
    let mut entry = StoredDeadLetter::received(
        letter(
            topic,
            DeadLetterReason::MaxRetriesExceeded,
            "llm.request",
            now,
        ),
        now,
    );
    entry.next_attempt_at = Some(now - Duration::from_secs(1));
    let id = entry.id().to_owned();
    assert!(store.insert(entry).await.unwrap());
    id
}

/// An automatic attempt on `processor`, running in the background until the handler is
/// released.
async fn attempt_under_way(
    processor: &Processor,
    handler: &HeldHandler,
) -> tokio::task::JoinHandle<usize> {
    let polling = processor.clone();
    let attempt = tokio::spawn(async move { polling.process_due().await.unwrap() });
    handler.wait_started().await;
    attempt
}

/// Let the held handler finish and wait for the attempt under way; how many were due.
async fn attempt_ends(handler: &HeldHandler, attempt: tokio::task::JoinHandle<usize>) -> usize {
    handler.finish();
    tokio::time::timeout(WAIT, attempt)
        .await
        .expect("the attempt ended within the wait")
        .expect("the attempt did not panic")
}

async fn nothing_arrives(sub: &mut Subscription, what: &str) {
    if let Ok(Some(delivery)) = tokio::time::timeout(QUIET, sub.next()).await {
        panic!(
            "{what}: {} was delivered",
            delivery.expect("no stream error").message().id()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_discard_during_a_handlers_redrive_is_never_undone() {
    let store = Arc::new(MemoryDeadLetterStore::new());
    let processor = Processor::new(broker().await, store.clone(), config()).unwrap();
    let handler = HeldHandler::default();
    handler.register(&processor, false);
    let id = due_letter(store.as_ref(), &name("llm")).await;

    let attempt = attempt_under_way(&processor, &handler).await;
    let discarded = processor.discard(&id, "the operator gave up").await;
    assert_eq!(attempt_ends(&handler, attempt).await, 1);

    match discarded {
        Ok(()) => {}
        Err(err) => {
            // Refused while the handler held the entry: once it let go, the discard goes
            // through.
            assert_eq!(err.kind(), ErrorKind::Conflict, "{err}");
            processor
                .discard(&id, "the operator gave up")
                .await
                .unwrap();
        }
    }
    let entry = processor.get(&id).await.unwrap();
    assert_eq!(
        entry.status,
        EntryStatus::Discarded,
        "a discard that returned Ok was undone by the attempt's write-back"
    );
    assert_eq!(
        entry.discard_reason.as_deref(),
        Some("the operator gave up")
    );
    // Due times passed or not, a discarded entry is never re-driven again.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(processor.process_due().await.unwrap(), 0);
    assert_eq!(handler.calls.load(Ordering::SeqCst), 1);
}

/// A processor on the memory broker with a held handler that succeeds, one entry of its
/// type due, and a subscription to the entry's topic.
struct Scene {
    processor: Processor,
    handler: HeldHandler,
    id: String,
    sub: Subscription,
}

impl Scene {
    async fn new() -> Scene {
        let broker = broker().await;
        let topic = name("llm");
        let store = Arc::new(MemoryDeadLetterStore::new());
        let processor = Processor::new(broker.clone(), store.clone(), config()).unwrap();
        let handler = HeldHandler::default();
        handler.register(&processor, true);
        let id = due_letter(store.as_ref(), &topic).await;
        let sub = broker
            .subscribe(&topic, SubscribeOptions::group("g"))
            .await
            .unwrap();
        Scene {
            processor,
            handler,
            id,
            sub,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reprocess_during_an_automatic_attempt_does_not_deliver_twice() {
    let Scene {
        processor,
        handler,
        id,
        mut sub,
    } = Scene::new().await;

    let attempt = attempt_under_way(&processor, &handler).await;
    let reprocessed = processor.reprocess(&id, None).await;
    assert_eq!(attempt_ends(&handler, attempt).await, 1);

    let err = reprocessed.expect_err("the entry was being re-driven by its handler");
    assert_eq!(err.kind(), ErrorKind::Conflict, "{err}");
    nothing_arrives(
        &mut sub,
        "the handler re-drove it; a reprocess published it again",
    )
    .await;
    assert_eq!(
        processor.get(&id).await.unwrap_err().kind(),
        ErrorKind::NotFound,
        "the handler's success removed the entry"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_redrive_during_an_automatic_attempt_leaves_the_entry_to_it() {
    let Scene {
        processor,
        handler,
        id,
        mut sub,
    } = Scene::new().await;

    let attempt = attempt_under_way(&processor, &handler).await;
    let job = processor
        .start_redrive(RedriveRequest::default())
        .await
        .unwrap();
    let progress = common::redrive_finished(&processor, &job.id).await;
    assert_eq!(attempt_ends(&handler, attempt).await, 1);

    assert_eq!(progress.status, RedriveStatus::Completed);
    assert_eq!(
        (progress.total, progress.redriven, progress.skipped),
        (1, 0, 1),
        "the entry held by the handler is skipped, not re-driven again"
    );
    nothing_arrives(
        &mut sub,
        "the handler re-drove it; the bulk redrive published it again",
    )
    .await;
    assert_eq!(
        processor.get(&id).await.unwrap_err().kind(),
        ErrorKind::NotFound
    );
}

/// A memory store whose removals wait (up to a few seconds) until two jobs have read or
/// claimed entries, so that two redrive jobs overlap deterministically: the second job comes
/// to the entries while the first has published them and not yet removed them.
struct OverlappingJobs {
    inner: MemoryDeadLetterStore,
    reads: Arc<Semaphore>,
}

impl OverlappingJobs {
    fn read(&self) {
        self.reads.add_permits(1);
    }
}

#[async_trait]
impl DeadLetterStore for OverlappingJobs {
    async fn insert(&self, entry: StoredDeadLetter) -> helix_messaging::Result<bool> {
        self.inner.insert(entry).await
    }
    async fn get(&self, id: &str) -> helix_messaging::Result<Option<StoredDeadLetter>> {
        self.inner.get(id).await
    }
    async fn get_many(&self, ids: &[String]) -> helix_messaging::Result<Vec<StoredDeadLetter>> {
        self.read();
        self.inner.get_many(ids).await
    }
    async fn list(
        &self,
        filter: &DeadLetterFilter,
        limit: usize,
        offset: usize,
    ) -> helix_messaging::Result<Vec<StoredDeadLetter>> {
        self.inner.list(filter, limit, offset).await
    }
    async fn count(&self, filter: &DeadLetterFilter) -> helix_messaging::Result<u64> {
        self.inner.count(filter).await
    }
    async fn ids(&self, filter: &DeadLetterFilter) -> helix_messaging::Result<Vec<String>> {
        self.inner.ids(filter).await
    }
    async fn claim_due(
        &self,
        now: SystemTime,
        lease: Duration,
        limit: usize,
    ) -> helix_messaging::Result<Vec<StoredDeadLetter>> {
        self.inner.claim_due(now, lease, limit).await
    }
    async fn update(&self, entry: &StoredDeadLetter) -> helix_messaging::Result<bool> {
        self.inner.update(entry).await
    }
    async fn claim(
        &self,
        ids: &[String],
        now: SystemTime,
        lease: Duration,
    ) -> helix_messaging::Result<Vec<StoredDeadLetter>> {
        self.read();
        self.inner.claim(ids, now, lease).await
    }
    async fn remove(&self, id: &str, version: u64) -> helix_messaging::Result<bool> {
        self.inner.remove(id, version).await
    }
    async fn remove_many(&self, entries: &[(String, u64)]) -> helix_messaging::Result<u64> {
        // Both jobs have come to the entries (or one never will): go on.
        if let Ok(Ok(both)) =
            tokio::time::timeout(Duration::from_secs(3), self.reads.acquire_many(2)).await
        {
            both.forget();
            self.reads.add_permits(2);
        }
        self.inner.remove_many(entries).await
    }
    async fn purge(&self, filter: &DeadLetterFilter) -> helix_messaging::Result<u64> {
        self.inner.purge(filter).await
    }
    async fn groups(
        &self,
        filter: &DeadLetterFilter,
    ) -> helix_messaging::Result<Vec<FailureGroup>> {
        self.inner.groups(filter).await
    }
    async fn stats(&self) -> helix_messaging::Result<DeadLetterStats> {
        self.inner.stats().await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_bulk_redrives_of_one_selection_publish_each_entry_once() {
    const ENTRIES: usize = 10;
    let broker = broker().await;
    let topic = name("orders");
    let store = Arc::new(OverlappingJobs {
        inner: MemoryDeadLetterStore::new(),
        reads: Arc::new(Semaphore::new(0)),
    });
    let processor = Processor::new(broker.clone(), store.clone(), config()).unwrap();
    let t0 = SystemTime::now() - Duration::from_secs(60);
    for i in 0..ENTRIES {
        let at = t0 + Duration::from_millis(i as u64);
        let l = letter(
            &topic,
            DeadLetterReason::MaxRetriesExceeded,
            "order.created",
            at,
        );
        store
            .insert(StoredDeadLetter::received(l, SystemTime::now()))
            .await
            .unwrap();
    }
    let mut sub = broker
        .subscribe(&topic, SubscribeOptions::group("g"))
        .await
        .unwrap();

    let (a, b) = tokio::join!(
        processor.start_redrive(RedriveRequest::default()),
        processor.start_redrive(RedriveRequest::default())
    );
    let (a, b) = (
        common::redrive_finished(&processor, &a.unwrap().id).await,
        common::redrive_finished(&processor, &b.unwrap().id).await,
    );
    assert_eq!(a.redriven + b.redriven, ENTRIES as u64, "{a:?}\n{b:?}");
    assert_eq!(a.redriven + a.skipped, ENTRIES as u64, "{a:?}");
    assert_eq!(b.redriven + b.skipped, ENTRIES as u64, "{b:?}");
    let mut seen = std::collections::HashSet::new();
    for _ in 0..ENTRIES {
        let delivery = tokio::time::timeout(WAIT, sub.next())
            .await
            .expect("a re-driven copy within the wait")
            .expect("open")
            .expect("no stream error");
        assert!(
            seen.insert(delivery.message().id().to_owned()),
            "{} re-driven twice",
            delivery.message().id()
        );
        delivery.ack().await.unwrap();
    }
    nothing_arrives(&mut sub, "an entry went out once per job").await;
    assert_eq!(store.count(&DeadLetterFilter::default()).await.unwrap(), 0);
}

/// A process running a bulk redrive over an SQLite DLQ dies midway (its runtime shut down
/// under it, at whatever await it had reached: a claim, a publish, a removal); a new process
/// opens the same file and re-drives what is left. Nothing is lost: every entry is delivered
/// or still in the DLQ. What the dead process held (at most the chunk it was on) stays held
/// until its claim runs out, so the new job skips it rather than publishing it a second time
/// now; only that chunk can arrive twice, once its hold has run out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_redrive_killed_midway_loses_nothing_and_leaves_at_most_its_chunk_held() {
    use helix_messaging::dlq::SqliteDeadLetterStore;
    use helix_messaging_testkit::plane::read_history;
    use std::collections::HashMap;

    const ENTRIES: usize = 600;
    const RATE: f64 = 400.0;
    // The job's chunk at this rate: rate / 20, within the batch size.
    const CHUNK: usize = 20;
    let broker = broker().await;
    let topic = name("killed");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dlq.sqlite");
    let from = SystemTime::now() - Duration::from_secs(1);
    let mut messages = HashMap::new();
    {
        let store = SqliteDeadLetterStore::open(&path).await.unwrap();
        let t0 = SystemTime::now() - Duration::from_secs(600);
        for i in 0..ENTRIES {
            let at = t0 + Duration::from_millis(i as u64);
            let l = letter(
                &topic,
                DeadLetterReason::MaxRetriesExceeded,
                "order.created",
                at,
            );
            messages.insert(l.id.clone(), l.message.id().to_owned());
            store
                .insert(StoredDeadLetter::received(l, SystemTime::now()))
                .await
                .unwrap();
        }
    }

    let (first_broker, first_path) = (broker.clone(), path.clone());
    let at_kill = helix_messaging_testkit::stores::in_a_process_killed_after(async move {
        let store = SqliteDeadLetterStore::open(&first_path).await.unwrap();
        let processor = Processor::new(first_broker, Arc::new(store), config()).unwrap();
        let job = processor
            .start_redrive(RedriveRequest {
                rate_per_second: Some(RATE),
                ..RedriveRequest::default()
            })
            .await
            .unwrap();
        helix_messaging_testkit::eventually(WAIT, "a third re-driven", || {
            let progress = processor.redrive_progress(&job.id).unwrap();
            async move { (progress.redriven >= (ENTRIES / 3) as u64).then_some(progress.redriven) }
        })
        .await
    });
    assert!(at_kill < ENTRIES as u64, "killed midway");

    // The restarted process.
    let store = Arc::new(SqliteDeadLetterStore::open(&path).await.unwrap());
    let processor = Processor::new(broker.clone(), store.clone(), config()).unwrap();
    // The rest as fast as the broker confirms: the pace is not under test here.
    let progress = common::unpaced_redrive(&processor).await;
    assert_eq!(progress.status, RedriveStatus::Completed, "{progress:?}");
    assert_eq!(
        progress.redriven + progress.skipped,
        progress.total,
        "{progress:?}"
    );

    let mut copies: HashMap<String, usize> = HashMap::new();
    for message in read_history(&broker, &topic, from).await.unwrap() {
        *copies.entry(message.id().to_owned()).or_default() += 1;
    }
    let now = SystemTime::now();
    let left = store
        .list(&DeadLetterFilter::default(), ENTRIES, 0)
        .await
        .unwrap();
    let held = left.iter().filter(|e| e.is_claimed(now)).count();
    assert_eq!(
        held,
        left.len(),
        "what is left is what the dead process held"
    );
    assert!(
        left.len() <= CHUNK,
        "{} left held, more than a chunk",
        left.len()
    );
    assert_eq!(progress.skipped, left.len() as u64, "{progress:?}");
    let twice = copies.values().filter(|n| **n > 1).count();
    assert_eq!(
        twice, 0,
        "{twice} delivered twice while the dead process's hold lasts"
    );
    for (entry, message) in &messages {
        assert!(
            copies.contains_key(message) || left.iter().any(|e| e.id() == entry),
            "entry {entry} is neither delivered nor in the DLQ"
        );
    }
}

/// A memory store whose due claims hold entries for 200 ms only, so that one poll's batch
/// outlives its claim, as a batch of slow handlers outlives `processing_timeout + 60 s`.
struct ShortDueClaims(MemoryDeadLetterStore);

#[async_trait]
impl DeadLetterStore for ShortDueClaims {
    async fn insert(&self, entry: StoredDeadLetter) -> helix_messaging::Result<bool> {
        self.0.insert(entry).await
    }
    async fn get(&self, id: &str) -> helix_messaging::Result<Option<StoredDeadLetter>> {
        self.0.get(id).await
    }
    async fn list(
        &self,
        filter: &DeadLetterFilter,
        limit: usize,
        offset: usize,
    ) -> helix_messaging::Result<Vec<StoredDeadLetter>> {
        self.0.list(filter, limit, offset).await
    }
    async fn count(&self, filter: &DeadLetterFilter) -> helix_messaging::Result<u64> {
        self.0.count(filter).await
    }
    async fn ids(&self, filter: &DeadLetterFilter) -> helix_messaging::Result<Vec<String>> {
        self.0.ids(filter).await
    }
    async fn claim_due(
        &self,
        now: SystemTime,
        _lease: Duration,
        limit: usize,
    ) -> helix_messaging::Result<Vec<StoredDeadLetter>> {
        self.0
            .claim_due(now, Duration::from_millis(200), limit)
            .await
    }
    async fn claim(
        &self,
        ids: &[String],
        now: SystemTime,
        lease: Duration,
    ) -> helix_messaging::Result<Vec<StoredDeadLetter>> {
        self.0.claim(ids, now, lease).await
    }
    async fn update(&self, entry: &StoredDeadLetter) -> helix_messaging::Result<bool> {
        self.0.update(entry).await
    }
    async fn remove(&self, id: &str, version: u64) -> helix_messaging::Result<bool> {
        self.0.remove(id, version).await
    }
    async fn purge(&self, filter: &DeadLetterFilter) -> helix_messaging::Result<u64> {
        self.0.purge(filter).await
    }
    async fn groups(
        &self,
        filter: &DeadLetterFilter,
    ) -> helix_messaging::Result<Vec<FailureGroup>> {
        self.0.groups(filter).await
    }
    async fn stats(&self) -> helix_messaging::Result<DeadLetterStats> {
        self.0.stats().await
    }
}

/// One poll claims a batch and attempts its entries one after another; an entry whose
/// claim ran out while an earlier one was handled may be taken by another re-drive (here a
/// reprocess). The attempt then leaves it to that re-drive instead of delivering it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_whose_claim_ran_out_during_its_batch_is_not_delivered_twice() {
    let broker = broker().await;
    let topic = name("batch");
    let store = Arc::new(ShortDueClaims(MemoryDeadLetterStore::new()));
    let processor = Processor::new(broker.clone(), store.clone(), config()).unwrap();
    let handler = HeldHandler::default();
    handler.register(&processor, true);
    // First in the batch (dead-lettered earlier): the slow, handled one.
    let slow = due_letter(store.as_ref(), &topic).await;
    let now = SystemTime::now();
    let plain = StoredDeadLetter::received(
        letter(
            &topic,
            DeadLetterReason::MaxRetriesExceeded,
            "order.created",
            now,
        ),
        now,
    );
    let mut plain = plain;
    plain.next_attempt_at = Some(now - Duration::from_millis(500));
    let plain_id = plain.id().to_owned();
    let plain_message = plain.letter.message.id().to_owned();
    assert!(store.insert(plain).await.unwrap());
    let mut sub = broker
        .subscribe(&topic, SubscribeOptions::group("g"))
        .await
        .unwrap();

    let attempt = attempt_under_way(&processor, &handler).await;
    // The batch's claim has run out; the plain entry's turn has not come.
    tokio::time::sleep(Duration::from_millis(300)).await;
    processor.reprocess(&plain_id, None).await.unwrap();
    assert_eq!(
        attempt_ends(&handler, attempt).await,
        1,
        "the slow entry was attempted; the plain one was left to the reprocess"
    );

    let first = tokio::time::timeout(WAIT, sub.next())
        .await
        .expect("the reprocessed copy")
        .expect("open")
        .expect("no stream error");
    assert_eq!(first.message().id(), plain_message);
    first.ack().await.unwrap();
    nothing_arrives(
        &mut sub,
        "the reprocess took the entry; the batch delivered it again",
    )
    .await;
    assert!(
        processor.get(&slow).await.is_err(),
        "the handled entry is gone"
    );
}
