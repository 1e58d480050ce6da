//! The DLQ processor (HelixAgent's `dlq.NewProcessor(broker, ProcessorConfig)`): ingests DLQ
//! topics into a store, re-drives on a schedule with backoff, parks what stays broken, and
//! offers the management operations.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use parking_lot::{Mutex, RwLock};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::config::{DeadLetterHandler, ProcessorConfig};
use super::jobs::{Job, RedriveProgress};
use super::letter::DeadLetter;
use super::report::{DeadLetterPage, ProcessorMetrics};
use super::source::DeadLetterSource;
use super::store::remove_redriven;
use super::store::{
    DeadLetterFilter, DeadLetterStats, DeadLetterStore, EntryStatus, FailureGroup, StoredDeadLetter,
};
use crate::broker::Broker;
use crate::error::{Error, ErrorKind, Result, task_stopped};
use crate::names::validate_name;
use crate::retry::RetryPolicy;
use crate::runner::{HandlerError, Runner};
use crate::trace;

#[derive(Default)]
struct Counters {
    ingested: AtomicU64,
    processed: AtomicU64,
    retried: AtomicU64,
    discarded: AtomicU64,
    parked: AtomicU64,
}

struct Running {
    stop: CancellationToken,
    poller: JoinHandle<()>,
    ingesters: Vec<Runner>,
}

pub(super) struct Inner {
    pub(super) broker: Arc<dyn Broker>,
    /// Brokers besides `broker` whose DLQ topics are ingested too.
    pub(super) sources: Vec<DeadLetterSource>,
    pub(super) store: Arc<dyn DeadLetterStore>,
    config: ProcessorConfig,
    handlers: RwLock<HashMap<String, Arc<dyn DeadLetterHandler>>>,
    counters: Counters,
    /// Ingests that failed in a row (the store is down), for the ingesters' backoff.
    pub(super) ingest_failures: std::sync::atomic::AtomicU32,
    pub(super) jobs: Mutex<HashMap<String, Job>>,
    running: tokio::sync::Mutex<Option<Running>>,
}

/// How the ingesters back off while the store fails: 100 ms, doubling, at most 10 s, with
/// jitter. The dead letter stays unacked on its topic meanwhile and is taken again after.
const INGEST_BACKOFF: RetryPolicy = RetryPolicy {
    max_retries: u32::MAX,
    retry_delay: Duration::from_millis(100),
    retry_backoff_multiplier: 2.0,
    max_retry_delay: Duration::from_secs(10),
    jitter: true,
};

/// The DLQ processor and management plane.
///
/// Cheap to clone (all clones share one processor).
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use std::sync::Arc;
/// use std::time::Duration;
///
/// use futures::StreamExt;
/// use helix_messaging_core::dlq::{
///     DEFAULT_DLQ_TOPIC, DeadLetter, DeadLetterFilter, HEADER_ORIGINAL_TOPIC, MemoryDeadLetterStore,
///     Processor, ProcessorConfig,
/// };
/// use helix_messaging_core::{Broker, Message, SubscribeOptions};
/// use helix_messaging_memory::MemoryBroker;
///
/// let broker: Arc<dyn Broker> = Arc::new(MemoryBroker::new());
/// let config = ProcessorConfig {
///     auto_redrive: false, // re-drive by hand below
///     ..ProcessorConfig::default()
/// };
/// let store = Arc::new(MemoryDeadLetterStore::new());
/// let processor = Processor::new(broker.clone(), store, config)?;
/// // Custom re-processing for one message type, called instead of a republish.
/// processor.register_handler("llm.request", |letter: DeadLetter| async move {
///     println!("retrying {} by hand", letter.message.id());
///     Ok(())
/// });
/// processor.start().await?; // ingests the DLQ topics in the background
/// // One dead letter, as a DeadLetterLayer publishes it, handed over directly:
/// let failed = Message::new("order 7").with_header(HEADER_ORIGINAL_TOPIC, "orders");
/// processor.ingest(DeadLetter::from_message(&failed, DEFAULT_DLQ_TOPIC)).await?;
/// let page = processor.list(&DeadLetterFilter::default(), 100, 0).await?;
/// assert_eq!(page.count, 1);
///
/// // Send it back to its topic, and out of the DLQ.
/// let mut orders = broker.subscribe("orders", SubscribeOptions::default()).await?;
/// processor.reprocess(&page.entries[0].letter.id, None).await?;
/// let again = tokio::time::timeout(Duration::from_secs(5), orders.next())
///     .await
///     .expect("re-driven in time")
///     .expect("subscription open")?;
/// assert_eq!(again.message().payload().as_ref(), b"order 7");
/// assert_eq!(processor.stats().await?.depth, 0);
/// processor.stop().await;
/// # Ok::<(), helix_messaging_core::Error>(())
/// # }).unwrap();
/// ```
#[derive(Clone)]
pub struct Processor {
    pub(super) inner: Arc<Inner>,
}

impl std::fmt::Debug for Processor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Processor")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl Processor {
    /// A processor over `broker` (where DLQ topics are read and re-drives published) keeping
    /// its entries in `store`.
    ///
    /// # Errors
    /// [`ErrorKind::Config`] naming the field of `config` that is out of range.
    pub fn new(
        broker: Arc<dyn Broker>,
        store: Arc<dyn DeadLetterStore>,
        config: ProcessorConfig,
    ) -> Result<Self> {
        Processor::assemble(broker, store, config, Vec::new())
    }

    /// [`Processor::new`] with `sources` (their names already checked).
    pub(super) fn assemble(
        broker: Arc<dyn Broker>,
        store: Arc<dyn DeadLetterStore>,
        config: ProcessorConfig,
        sources: Vec<DeadLetterSource>,
    ) -> Result<Self> {
        config.validate()?;
        Ok(Processor {
            inner: Arc::new(Inner {
                broker,
                sources,
                store,
                config,
                handlers: RwLock::new(HashMap::new()),
                counters: Counters::default(),
                ingest_failures: std::sync::atomic::AtomicU32::new(0),
                jobs: Mutex::new(HashMap::new()),
                running: tokio::sync::Mutex::new(None),
            }),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ProcessorConfig {
        &self.inner.config
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn DeadLetterStore> {
        &self.inner.store
    }

    /// Re-process messages of `message_type` (their `type` header) with `handler` instead of
    /// republishing them. Replaces an earlier handler for the type.
    pub fn register_handler(
        &self,
        message_type: impl Into<String>,
        handler: impl DeadLetterHandler,
    ) {
        self.inner
            .handlers
            .write()
            .insert(message_type.into(), Arc::new(handler));
    }

    fn handler_for(&self, letter: &DeadLetter) -> Option<Arc<dyn DeadLetterHandler>> {
        let message_type = letter.message_type()?;
        self.inner.handlers.read().get(message_type).cloned()
    }

    /// Start ingesting the DLQ topics and re-driving due entries in the background. The
    /// processor's group on a DLQ topic, created by the first start, begins with everything
    /// the topic retains on backends with [`Capabilities::replay_by_time`](crate::Capabilities::replay_by_time);
    /// elsewhere start the processor before anything can fail (RabbitMQ refuses a dead letter
    /// no queue is bound for, so the original is requeued rather than lost).
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] when already started; the subscribe error otherwise.
    pub async fn start(&self) -> Result<()> {
        let mut running = self.inner.running.lock().await;
        if running.is_some() {
            return Err(Error::invalid_input("the DLQ processor is already running"));
        }
        let ingesters = self.start_ingesters().await?;
        let stop = CancellationToken::new();
        let poller = tokio::spawn(self.clone().poll_loop(stop.clone()));
        *running = Some(Running {
            stop,
            poller,
            ingesters,
        });
        Ok(())
    }

    /// Stop ingesting and re-driving; bulk redrive jobs are cancelled. Idempotent.
    pub async fn stop(&self) {
        let running = self.inner.running.lock().await.take();
        for job in self.inner.jobs.lock().values() {
            job.cancel.cancel();
        }
        if let Some(running) = running {
            running.stop.cancel();
            let _ = running.poller.await;
            for runner in running.ingesters {
                runner.shutdown().await;
            }
        }
    }

    async fn poll_loop(self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(self.inner.config.poll_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            if self.inner.config.auto_redrive
                && let Err(err) = self.process_due().await
            {
                tracing::warn!(error = %err, "DLQ re-drive poll failed");
            }
            if let Err(err) = self.publish_gauges().await {
                tracing::warn!(error = %err, "could not read the DLQ store's depth");
            }
        }
    }

    async fn publish_gauges(&self) -> Result<()> {
        let stats = self.inner.store.stats().await?;
        // HelixAgent names the depth gauge `messaging_dlq_messages_total`.
        metrics::gauge!("messaging_dlq_messages_total").set(stats.depth as f64);
        metrics::gauge!("messaging_dlq_parked_messages").set(stats.parked as f64);
        let age = stats
            .oldest
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .unwrap_or_default();
        metrics::gauge!("messaging_dlq_oldest_age_seconds").set(age.as_secs_f64());
        Ok(())
    }

    /// Take a dead letter into the store (the ingest path; also usable directly). Decides
    /// its fate: scheduled for an automatic re-drive, or parked when its re-drives are used
    /// up or cannot help (an undecodable or permanently failing message without a registered
    /// handler). Returns whether it was new.
    ///
    /// # Errors
    /// The store's error (the DLQ message then stays unacked and comes back).
    pub async fn ingest(&self, letter: DeadLetter) -> Result<bool> {
        let now = SystemTime::now();
        let config = &self.inner.config;
        let has_handler = self.handler_for(&letter).is_some();
        let mut entry = StoredDeadLetter::received(letter, now);
        if config.auto_redrive {
            let used = entry.letter.redrives;
            if used >= config.max_retries || !(entry.letter.reason.worth_redriving() || has_handler)
            {
                entry.status = EntryStatus::Parked;
            } else {
                let delay = config
                    .backoff()
                    .delay_before_retry(used + 1)
                    .unwrap_or_default();
                entry.next_attempt_at = Some(now + delay);
            }
        }
        let parked = entry.status == EntryStatus::Parked;
        let new = self.inner.store.insert(entry).await?;
        if new {
            self.inner.counters.ingested.fetch_add(1, Ordering::Relaxed);
            if parked {
                self.count_parked();
            }
        }
        Ok(new)
    }

    /// After a failed ingest (the store is down): wait before the dead letter is taken
    /// again, longer with every failure in a row, and say so at warn, so the ingesters
    /// neither spin nor fail silently.
    pub(super) async fn back_off_ingesting(&self, dlq_topic: &str, err: Error) -> HandlerError {
        let failures = self.inner.ingest_failures.fetch_add(1, Ordering::Relaxed) + 1;
        let wait = INGEST_BACKOFF
            .delay_before_retry(failures.min(64))
            .unwrap_or(INGEST_BACKOFF.max_retry_delay);
        tracing::warn!(dlq_topic, failures, ?wait, error = %err, "the DLQ store did not take a dead letter; it stays on its topic and is tried again after a pause");
        tokio::time::sleep(wait).await;
        HandlerError::transient(err)
    }

    fn count_parked(&self) {
        self.inner.counters.parked.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("messaging_dlq_parked_total").increment(1);
    }

    fn count_processed(&self) {
        self.inner
            .counters
            .processed
            .fetch_add(1, Ordering::Relaxed);
        // HelixAgent's counter for DLQ messages re-processed.
        metrics::counter!("messaging_dlq_reprocessed_total").increment(1);
    }

    /// Re-drive every entry whose automatic re-drive is due (at most `batch_size`): one poll.
    /// Returns how many were attempted (an entry another re-drive took meanwhile is not).
    ///
    /// Entries are claimed for `processing_timeout` plus a minute first, so processors
    /// sharing a store do not re-drive the same entry twice.
    ///
    /// # Errors
    /// The store's error when claiming.
    pub async fn process_due(&self) -> Result<usize> {
        let due = self
            .inner
            .store
            .claim_due(
                SystemTime::now(),
                self.claim_lease(),
                self.inner.config.batch_size,
            )
            .await?;
        let mut attempted = 0;
        for entry in due {
            // The entries are attempted one after another under one claim: one whose hold
            // could run out before its attempt ends is held anew first.
            if let Some(entry) = self.hold_for_attempt(entry).await {
                self.attempt(entry).await;
                attempted += 1;
            }
        }
        Ok(attempted)
    }

    /// `entry`, held long enough for an attempt (a handler or a publish bounded by
    /// `processing_timeout`): as claimed, or held anew by a write naming its version.
    /// `None` when another re-drive took it meanwhile (its hold had run out), it was purged,
    /// or the store failed (it comes due again when its hold runs out).
    async fn hold_for_attempt(&self, mut entry: StoredDeadLetter) -> Option<StoredDeadLetter> {
        let now = SystemTime::now();
        let needed = now + self.inner.config.processing_timeout + HOLD_MARGIN;
        if entry.claimed_until.is_some_and(|until| until >= needed) {
            return Some(entry);
        }
        entry.claimed_until = Some(now + self.claim_lease());
        match self.inner.store.update(&entry).await {
            Ok(true) => {
                entry.version += 1;
                Some(entry)
            }
            Ok(false) => None,
            Err(err) => {
                tracing::warn!(dead_letter = %entry.id(), error = %err, "could not hold a DLQ entry for its re-drive; it comes due again when its claim runs out");
                None
            }
        }
    }

    /// How long a re-drive holds an entry: longer than a handler may take, so the entry is
    /// let go only by a holder that died.
    pub(super) fn claim_lease(&self) -> Duration {
        self.inner.config.processing_timeout + Duration::from_secs(60)
    }

    async fn attempt(&self, mut entry: StoredDeadLetter) {
        let timeout = self.inner.config.processing_timeout;
        let outcome = match self.handler_for(&entry.letter) {
            Some(handler) => {
                match tokio::time::timeout(timeout, handler.handle(entry.letter.clone())).await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(err)) => Err(err.to_string()),
                    Err(_) => Err(format!("the handler did not finish within {timeout:?}")),
                }
            }
            None => {
                let target = entry.letter.original_topic.clone();
                self.republish(&entry.letter, &target)
                    .await
                    .map_err(|e| e.to_string())
            }
        };
        let id = entry.letter.id.clone();
        // Written back only over the copy this attempt claimed: nothing else re-drives or
        // discards a held entry, and one whose hold ran out (a handler slower than the
        // lease) belongs to whoever claimed it next.
        let stored = match outcome {
            Ok(()) => {
                self.count_processed();
                self.inner.store.remove(&id, entry.version).await
            }
            Err(error) => {
                let config = &self.inner.config;
                entry.claimed_until = None;
                entry.retries += 1;
                let used = entry.letter.redrives + entry.retries;
                entry.last_error = Some(error.clone());
                match config.backoff().delay_before_retry(used + 1) {
                    Some(delay) if used < config.max_retries => {
                        entry.next_attempt_at = Some(SystemTime::now() + delay);
                        self.inner.counters.retried.fetch_add(1, Ordering::Relaxed);
                        metrics::counter!("messaging_dlq_retried_total").increment(1);
                    }
                    _ => {
                        entry.status = EntryStatus::Parked;
                        entry.next_attempt_at = None;
                        self.count_parked();
                        tracing::warn!(dead_letter = %id, error, "DLQ entry parked: re-drives used up");
                    }
                }
                self.inner.store.update(&entry).await
            }
        };
        match stored {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(dead_letter = %id, "a re-drive's outcome was not recorded: the entry was purged, or its hold ran out and another re-drive took it");
            }
            Err(err) => {
                tracing::error!(dead_letter = %id, error = %err, "could not record a re-drive's outcome in the DLQ store; the entry is re-driven again when its hold runs out");
            }
        }
    }

    /// Let go of `entry`, claimed by a re-drive that could not publish it, at once rather
    /// than when its hold runs out (which it still does if this write fails).
    pub(super) async fn let_go(&self, entry: &StoredDeadLetter) {
        let mut released = entry.clone();
        released.claimed_until = None;
        if let Err(err) = self.inner.store.update(&released).await {
            tracing::warn!(dead_letter = %entry.id(), error = %err, "could not let go of a DLQ entry whose re-drive failed; it is held until its claim runs out");
        }
    }

    /// Hold the entry `id` for a re-drive by this call alone.
    ///
    /// # Errors
    /// [`ErrorKind::NotFound`] for an unknown id, [`ErrorKind::InvalidInput`] for a
    /// discarded entry, [`ErrorKind::Conflict`] while another re-drive holds it; the store's
    /// error.
    async fn claim_one(&self, id: &str) -> Result<StoredDeadLetter> {
        let now = SystemTime::now();
        let store = &self.inner.store;
        if let Some(entry) = store
            .claim(&[id.to_owned()], now, self.claim_lease())
            .await?
            .pop()
        {
            return Ok(entry);
        }
        let entry = self.get(id).await?;
        Err(unclaimable(&entry, now))
    }

    /// Publish `letter`'s message to `topic` and wait for the broker's confirmation, no
    /// longer than `processing_timeout` (so the publish ends well within the entry's hold).
    ///
    /// # Errors
    /// The broker's error; [`ErrorKind::Timeout`] when it did not confirm in time (the copy
    /// may still arrive: at least once).
    pub(super) async fn republish(&self, letter: &DeadLetter, topic: &str) -> Result<()> {
        let timeout = self.inner.config.processing_timeout;
        let publish = self
            .broker_for(letter)?
            .publish(topic, redrive_copy(letter, topic));
        tokio::time::timeout(timeout, publish)
            .await
            .unwrap_or_else(|_| Err(publish_timed_out(timeout)))
    }

    /// Entries matching `filter`, a page at a time, oldest first (HelixAgent's
    /// `ListMessages(limit, offset)`), with how many match in all, both from one read of the
    /// store (see [`DeadLetterPage`]).
    ///
    /// # Errors
    /// The store's error.
    pub async fn list(
        &self,
        filter: &DeadLetterFilter,
        limit: usize,
        offset: usize,
    ) -> Result<DeadLetterPage> {
        let (entries, count) = self.inner.store.page(filter, limit, offset).await?;
        Ok(DeadLetterPage {
            entries,
            count,
            limit,
            offset,
        })
    }

    /// One entry.
    ///
    /// # Errors
    /// [`ErrorKind::NotFound`] for an unknown id; the store's error.
    pub async fn get(&self, id: &str) -> Result<StoredDeadLetter> {
        self.inner.store.get(id).await?.ok_or_else(|| not_found(id))
    }

    /// Re-drive one entry now (HelixAgent's `ReprocessMessage`): republish it to its original
    /// topic, or to `target_topic`, with its original id, attempts starting again at 1 and
    /// the re-drive counter one higher; once the broker has confirmed, remove the entry.
    /// Parked entries can be reprocessed; discarded ones cannot. The entry is held while it
    /// is republished, so no automatic attempt or bulk redrive re-drives it at the same time.
    ///
    /// # Errors
    /// [`ErrorKind::NotFound`] for an unknown id, [`ErrorKind::InvalidInput`] for a
    /// discarded entry or an invalid target, [`ErrorKind::Conflict`] while another re-drive
    /// holds the entry (an automatic attempt, a bulk redrive); the publish error (the entry
    /// is kept).
    pub async fn reprocess(&self, id: &str, target_topic: Option<&str>) -> Result<()> {
        if let Some(target) = target_topic {
            validate_name("target topic", target)?;
        }
        // Runs to its end even when the caller goes away (an HTTP client that hangs up): cut
        // off between its claim and its removal, it would leave the entry held, and perhaps
        // published, until the hold ran out.
        let processor = self.clone();
        let (id, target) = (id.to_owned(), target_topic.map(str::to_owned));
        tokio::spawn(async move { processor.reprocess_claimed(&id, target.as_deref()).await })
            .await
            .map_err(|err| task_stopped("a DLQ reprocess", &err))?
    }

    async fn reprocess_claimed(&self, id: &str, target_topic: Option<&str>) -> Result<()> {
        let entry = self.claim_one(id).await?;
        let target = target_topic.unwrap_or(&entry.letter.original_topic);
        // The original topic comes from the dead letter's headers: checked like a target
        // given, so a bad one is refused here rather than by the broker.
        let published = match validate_name("target topic", target) {
            Ok(()) => self.republish(&entry.letter, target).await,
            Err(err) => Err(err),
        };
        if let Err(err) = published {
            self.let_go(&entry).await;
            return Err(err);
        }
        self.count_processed();
        // Published: the reprocess is done whatever the store says next. An entry the
        // store keeps failing to remove stays held until its claim runs out, and may then
        // be re-driven again (at least once).
        if let Err(err) =
            remove_redriven(self.inner.store.as_ref(), &[(id.to_owned(), entry.version)]).await
        {
            tracing::warn!(dead_letter = %id, error = %err, "a reprocessed DLQ entry could not be removed; it stays held until its claim runs out and may be re-driven again");
        }
        Ok(())
    }

    /// Discard one entry (HelixAgent's `DiscardMessage(id, reason)`): it is never re-driven
    /// and no longer counts towards the DLQ depth; it stays listed, with the reason, until
    /// purged. Nothing undoes a discard: a re-drive under way holds the entry, and the
    /// discard is refused until it lets go.
    ///
    /// # Errors
    /// [`ErrorKind::NotFound`] for an unknown id, [`ErrorKind::Conflict`] while a re-drive
    /// holds the entry (try again once it is done: it succeeded and the entry is gone, or
    /// it failed and the discard goes through); the store's error.
    pub async fn discard(&self, id: &str, reason: &str) -> Result<()> {
        // Compare-and-set: a write between the read and the update (another discard, a
        // claim) makes the update miss, and the entry is read again.
        let mut tries = 0;
        loop {
            let mut entry = self.get(id).await?;
            let now = SystemTime::now();
            if entry.is_claimed(now) {
                return Err(unclaimable(&entry, now));
            }
            entry.status = EntryStatus::Discarded;
            entry.next_attempt_at = None;
            entry.discard_reason = Some(reason.to_owned());
            if self.inner.store.update(&entry).await? {
                break;
            }
            tries += 1;
            if tries == DISCARD_TRIES {
                return Err(Error::new(
                    ErrorKind::Conflict,
                    format!("DLQ entry {id} kept changing while it was being discarded; try again"),
                ));
            }
        }
        self.inner
            .counters
            .discarded
            .fetch_add(1, Ordering::Relaxed);
        metrics::counter!("messaging_dlq_discarded_total").increment(1);
        tracing::info!(dead_letter = %id, reason, "DLQ entry discarded");
        Ok(())
    }

    /// Remove every entry matching `filter` from the store for good; how many.
    ///
    /// # Errors
    /// The store's error.
    pub async fn purge(&self, filter: &DeadLetterFilter) -> Result<u64> {
        let purged = self.inner.store.purge(filter).await?;
        tracing::info!(purged, ?filter, "DLQ entries purged");
        Ok(purged)
    }

    /// Entries matching `filter` grouped by reason and topic, largest group first.
    ///
    /// # Errors
    /// The store's error.
    pub async fn failure_groups(&self, filter: &DeadLetterFilter) -> Result<Vec<FailureGroup>> {
        self.inner.store.groups(filter).await
    }

    /// Depth, parked count and oldest entry.
    ///
    /// # Errors
    /// The store's error.
    pub async fn stats(&self) -> Result<DeadLetterStats> {
        self.inner.store.stats().await
    }

    /// Counts of what the processor has done.
    pub fn metrics(&self) -> ProcessorMetrics {
        let c = &self.inner.counters;
        ProcessorMetrics {
            messages_ingested: c.ingested.load(Ordering::Relaxed),
            messages_processed: c.processed.load(Ordering::Relaxed),
            messages_retried: c.retried.load(Ordering::Relaxed),
            messages_discarded: c.discarded.load(Ordering::Relaxed),
            messages_parked: c.parked.load(Ordering::Relaxed),
        }
    }

    pub(super) fn note_redriven(&self) {
        self.count_processed();
    }

    /// A redrive job's progress.
    ///
    /// # Errors
    /// [`ErrorKind::NotFound`] for an unknown job id.
    pub fn redrive_progress(&self, id: &str) -> Result<RedriveProgress> {
        self.inner
            .jobs
            .lock()
            .get(id)
            .map(|job| job.progress.lock().clone())
            .ok_or_else(|| Error::new(ErrorKind::NotFound, format!("no redrive job {id:?}")))
    }

    /// Every redrive job this processor runs, and the last
    /// [`MAX_FINISHED_REDRIVES`](super::MAX_FINISHED_REDRIVES) it finished; newest first.
    pub fn list_redrives(&self) -> Vec<RedriveProgress> {
        let mut jobs: Vec<RedriveProgress> = self
            .inner
            .jobs
            .lock()
            .values()
            .map(|job| job.progress.lock().clone())
            .collect();
        jobs.sort_by_key(|job| std::cmp::Reverse(job.started_at));
        jobs
    }

    /// Ask a redrive job to stop; what it re-drove stays re-driven. Idempotent.
    ///
    /// # Errors
    /// [`ErrorKind::NotFound`] for an unknown job id.
    pub fn cancel_redrive(&self, id: &str) -> Result<()> {
        let jobs = self.inner.jobs.lock();
        let job = jobs
            .get(id)
            .ok_or_else(|| Error::new(ErrorKind::NotFound, format!("no redrive job {id:?}")))?;
        job.cancel.cancel();
        Ok(())
    }
}

/// Hold an entry must have left, beyond `processing_timeout`, for an attempt to start on it.
const HOLD_MARGIN: Duration = Duration::from_secs(10);

/// A publish the broker did not confirm within `timeout`.
pub(super) fn publish_timed_out(timeout: Duration) -> Error {
    Error::new(
        ErrorKind::Timeout,
        format!(
            "the broker did not confirm the re-drive within {timeout:?}; the copy may still arrive"
        ),
    )
    .with_retryable(true)
}

/// Reads of an entry a discard makes before giving up on one that keeps changing.
const DISCARD_TRIES: u32 = 5;

/// Why `entry` could not be claimed at `now`.
fn unclaimable(entry: &StoredDeadLetter, now: SystemTime) -> Error {
    let id = entry.id();
    if entry.status == EntryStatus::Discarded {
        return Error::invalid_input(format!(
            "DLQ entry {id} was discarded ({}); purge it or reprocess another",
            entry.discard_reason.as_deref().unwrap_or("no reason given")
        ));
    }
    let left = entry
        .claimed_until
        .and_then(|until| until.duration_since(now).ok())
        .unwrap_or_default();
    Error::new(
        ErrorKind::Conflict,
        format!(
            "DLQ entry {id} is being re-driven by another operation (held for up to {}s more); try again once it is done",
            left.as_secs() + 1
        ),
    )
}

fn not_found(id: &str) -> Error {
    Error::new(ErrorKind::NotFound, format!("no DLQ entry {id:?}"))
}

/// The message re-driving `letter` to `topic` publishes, stamped with its `redrive` span so
/// the consumer continues the letter's trace.
pub(super) fn redrive_copy(letter: &DeadLetter, topic: &str) -> crate::message::Message {
    let mut message = letter.redrive_message();
    trace::stamp_copy(trace::CopyKind::Redrive, topic, &mut message);
    message
}
