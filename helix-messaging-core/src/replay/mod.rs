//! Time-range replay (HelixAgent's `replay` package): read a topic's history between two
//! times, filter it by message type and headers, and publish the matches into a target
//! topic, in batches, paced, optionally as a dry run, skipping repeated message ids, with
//! progress, cancel and list.
//!
//! - [`ReplayHandler::start_replay`] returns at once; the replay runs in the background.
//! - It streams the window ([`Broker::read_range`]) and holds at most one batch, so memory
//!   stays bounded whatever the window's size (the id set of
//!   [`ReplayOptions::skip_duplicates`] aside: about 20 bytes per distinct id).
//! - Copies keep the original's id, key (so per-key order holds in the target), payload and
//!   headers (trace context included), carry [`HEADER_REPLAY_ID`], [`HEADER_SOURCE_TOPIC`],
//!   [`HEADER_SOURCE_POSITION`] and [`HEADER_ORIGINAL_TIMESTAMP`], and are stamped with the
//!   time they are replayed (a log's retention goes by timestamps; the original's is in the
//!   header).
//! - Progress is checkpointed in a [`ReplayStore`] (the DLQ's SQLite file or PostgreSQL
//!   database, when configured). A replay interrupted by a restart is resumed by
//!   [`ReplayHandler::open`]: what the checkpoint covers is skipped, and copies published
//!   after it are found in the target topic by their replay id, so nothing is published
//!   twice.

mod request;
mod run;
mod store;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use request::{
    HEADER_ORIGINAL_TIMESTAMP, HEADER_REPLAY_ID, HEADER_SOURCE_POSITION, HEADER_SOURCE_TOPIC,
    MAX_FINISHED_REPLAYS, MAX_REPLAY_BATCH_SIZE, MAX_RUNNING_REPLAYS, ReplayConfig, ReplayFilter,
    ReplayOptions, ReplayProgress, ReplayRequest, ReplayStatus, UNTYPED,
};
pub use store::{Checkpoint, Frontier, MemoryReplayStore, ReplayLease, ReplayRecord, ReplayStore};

use crate::broker::Broker;
#[cfg(doc)]
use crate::capabilities::Capabilities;
use crate::error::{Error, ErrorKind, Result, within};

/// Backends that keep history, for the error a backend without it returns.
const HISTORY_BACKENDS: &str = "memory, redis-streams (MESSAGING_BACKEND=redis-streams), kafka, \
    and rabbitmq with the replay journal on (RABBITMQ_REPLAY_JOURNAL=true)";

/// A replay this handler runs, or is about to: a slot taken in the jobs map before any
/// await, so one replay id is started at most once in a process however many calls race.
struct Job {
    /// Which taking of the slot this is (a reservation given up removes only its own).
    slot: u64,
    /// `None` until the run is spawned.
    progress: Option<Arc<Mutex<ReplayProgress>>>,
    cancel: CancellationToken,
    finished: watch::Receiver<bool>,
}

/// A slot in the jobs map, held until the run is spawned; dropped unused, it frees the slot.
struct Reservation {
    inner: Arc<Inner>,
    id: String,
    slot: u64,
    cancel: CancellationToken,
    done: Option<watch::Sender<bool>>,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.done.is_some() {
            let mut jobs = self.inner.jobs.lock();
            if jobs.get(&self.id).is_some_and(|job| job.slot == self.slot) {
                jobs.remove(&self.id);
            }
        }
    }
}

struct Inner {
    broker: Arc<dyn Broker>,
    config: ReplayConfig,
    store: Arc<dyn ReplayStore>,
    jobs: Mutex<HashMap<String, Job>>,
    /// Numbers the slots of `jobs`.
    slots: std::sync::atomic::AtomicU64,
    /// The lease holder name.
    owner: String,
    /// Cancelled by [`ReplayHandler::shutdown`]: replays stop where they are and stay
    /// resumable.
    shutdown: CancellationToken,
}

/// Starts, tracks and cancels replays on one broker (HelixAgent's `replay.NewHandler`).
/// Cloning shares the handler.
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use std::sync::Arc;
/// use std::time::{Duration, SystemTime};
///
/// use helix_messaging_core::replay::{ReplayConfig, ReplayHandler, ReplayRequest, ReplayStatus};
/// use helix_messaging_core::{Broker, MESSAGE_TYPE_HEADER, Message};
/// use helix_messaging_memory::MemoryBroker;
///
/// let broker: Arc<dyn Broker> = Arc::new(MemoryBroker::new());
/// let from = SystemTime::now() - Duration::from_secs(1);
/// for kind in ["order.created", "order.paid", "order.created"] {
///     let event = Message::new(kind).with_header(MESSAGE_TYPE_HEADER, kind);
///     broker.publish("orders", event).await?;
/// }
/// let handler = ReplayHandler::new(broker.clone(), ReplayConfig::default());
/// let mut request = ReplayRequest::new("orders", from, SystemTime::now())
///     .with_target_topic("orders.replayed");
/// request.filter.message_types = vec!["order.created".to_owned()];
/// let started = handler.start_replay(request).await?; // runs in the background
/// let done = tokio::time::timeout(Duration::from_secs(5), handler.wait(&started.id))
///     .await
///     .expect("finished in time")?;
/// assert_eq!(done.status, ReplayStatus::Completed);
/// assert_eq!((done.replayed, done.filtered), (2, 1));
/// # Ok::<(), helix_messaging_core::Error>(())
/// # }).unwrap();
/// ```
#[derive(Clone)]
pub struct ReplayHandler {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ReplayHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplayHandler")
            .field("broker", &self.inner.broker.name())
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl ReplayHandler {
    /// A handler keeping progress in memory only (a replay interrupted by a restart is not
    /// resumed).
    pub fn new(broker: Arc<dyn Broker>, config: ReplayConfig) -> Self {
        ReplayHandler::with_store(broker, config, Arc::new(MemoryReplayStore::new()))
    }

    fn with_store(
        broker: Arc<dyn Broker>,
        config: ReplayConfig,
        store: Arc<dyn ReplayStore>,
    ) -> Self {
        let owner = config
            .instance_id
            .clone()
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        ReplayHandler {
            inner: Arc::new(Inner {
                broker,
                config,
                owner,
                store,
                jobs: Mutex::new(HashMap::new()),
                slots: std::sync::atomic::AtomicU64::new(0),
                shutdown: CancellationToken::new(),
            }),
        }
    }

    /// A handler checkpointing into `store`. Replays the store shows as running and that no
    /// live handler holds (a previous process was stopped, or crashed and its lease has run
    /// out) are resumed from their checkpoints, now and, while the handler lives, whenever
    /// such a lease runs out later.
    ///
    /// # Errors
    /// The store's error reading its records.
    pub async fn open(
        broker: Arc<dyn Broker>,
        config: ReplayConfig,
        store: Arc<dyn ReplayStore>,
    ) -> Result<Self> {
        let handler = ReplayHandler::with_store(broker, config, store);
        handler.adopt_orphans().await?;
        let weak = Arc::downgrade(&handler.inner);
        let shutdown = handler.inner.shutdown.clone();
        let every = (handler.inner.config.lease / 2).max(Duration::from_millis(50));
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(every) => {}
                }
                let Some(inner) = weak.upgrade() else { return };
                if let Err(err) = (ReplayHandler { inner }).adopt_orphans().await {
                    tracing::warn!(error = %err, "looking for replays to resume failed");
                }
            }
        });
        Ok(handler)
    }

    /// Resume every running replay of the store that nobody holds.
    async fn adopt_orphans(&self) -> Result<()> {
        for record in self.inner.store.list().await? {
            if record.progress.status != ReplayStatus::Running {
                continue;
            }
            let Ok(slot) = self.reserve(record.id(), false) else {
                continue;
            };
            if let Some(lease) = self.claim(record.id()).await? {
                // Read again under the lease: the holder that gave it up may have finished
                // it since the listing.
                match self.inner.store.load(record.id()).await? {
                    Some(record) if record.progress.status == ReplayStatus::Running => {
                        tracing::info!(replay = %record.id(), "resuming an interrupted replay");
                        self.spawn(slot, record, lease, true);
                    }
                    _ => self.release(record.id(), &lease).await,
                }
            }
        }
        Ok(())
    }

    /// Take the slot for replay `id` in this process, before any await: refused while a run
    /// of it is live here (or being started), and, with `limit`, when `max_active` replays
    /// run.
    fn reserve(&self, id: &str, limit: bool) -> std::result::Result<Reservation, Busy> {
        let mut jobs = self.inner.jobs.lock();
        if jobs.get(id).is_some_and(|job| !*job.finished.borrow()) {
            return Err(Busy::Running);
        }
        let active = jobs.values().filter(|job| !*job.finished.borrow()).count();
        if limit && active >= self.inner.config.max_active {
            return Err(Busy::Full(active));
        }
        let slot = self
            .inner
            .slots
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let cancel = CancellationToken::new();
        let (done, finished) = watch::channel(false);
        let previous = jobs.insert(
            id.to_owned(),
            Job {
                slot,
                progress: None,
                cancel: cancel.clone(),
                finished,
            },
        );
        drop(jobs);
        // A finished run's job is replaced; its progress is in the store.
        drop(previous);
        Ok(Reservation {
            inner: self.inner.clone(),
            id: id.to_owned(),
            slot,
            cancel,
            done: Some(done),
        })
    }

    async fn claim(&self, id: &str) -> Result<Option<ReplayLease>> {
        self.inner
            .store
            .claim(id, &self.inner.owner, self.inner.config.lease)
            .await
    }

    async fn release(&self, id: &str, lease: &ReplayLease) {
        if let Err(err) = self.inner.store.release(id, lease).await {
            tracing::warn!(replay = %id, error = %err, "releasing the replay failed; it is free once its lease runs out");
        }
    }

    /// The broker replays read from and publish to.
    pub fn broker(&self) -> &Arc<dyn Broker> {
        &self.inner.broker
    }

    /// Start a replay in the background; returns its initial progress (with its id). A
    /// window ending in the future is clamped to now: the replay copies what the topic holds
    /// when it starts (the progress shows the clamped `to_time`), never live traffic.
    ///
    /// # Errors
    /// - [`ErrorKind::Unsupported`] when the broker keeps no history, naming the backends
    ///   that do.
    /// - [`ErrorKind::InvalidInput`] for a bad request.
    /// - [`ErrorKind::Busy`] while [`ReplayConfig::max_active`] replays run here.
    /// - [`ErrorKind::Conflict`] (not retryable) for an id already used.
    /// - The store's error saving the first checkpoint (nothing was started).
    pub async fn start_replay(&self, mut request: ReplayRequest) -> Result<ReplayProgress> {
        let broker = &self.inner.broker;
        if !broker.capabilities().replay_by_time {
            return Err(Error::unsupported(
                broker.name(),
                format!(
                    "replay (its configuration keeps no history to read back); backends that do: {HISTORY_BACKENDS}"
                ),
            ));
        }
        if request.id.is_empty() {
            request.id = uuid::Uuid::new_v4().to_string();
        }
        // A replay copies history: a window ending in the future ends now, rather than
        // copying live traffic (on a log that keeps it) until then.
        request.to_time = request.to_time.min(SystemTime::now());
        request.validate()?;
        let exists = || {
            Error::new(
                ErrorKind::Conflict,
                format!("a replay with id {:?} already exists", request.id),
            )
            .with_retryable(false)
        };
        let slot = match self.reserve(&request.id, true) {
            Ok(slot) => slot,
            Err(Busy::Running) => return Err(exists()),
            Err(busy) => return Err(busy.into_error(&request.id)),
        };
        let record = ReplayRecord {
            progress: ReplayProgress::new(&request),
            request: request.clone(),
            checkpoint: Checkpoint::default(),
        };
        // Created leased to this handler, so no other handler's adopt loop can take it
        // before it runs here.
        let Some(lease) = self
            .inner
            .store
            .create(&record, &self.inner.owner, self.inner.config.lease)
            .await?
        else {
            return Err(exists());
        };
        let progress = record.progress.clone();
        tracing::info!(replay = %progress.id, topic = %progress.topic, target = %progress.target_topic, dry_run = progress.dry_run, "replay started");
        self.spawn(slot, record, lease, false);
        Ok(progress)
    }

    /// Continue a failed replay from its checkpoint.
    ///
    /// # Errors
    /// [`ErrorKind::NotFound`] for an unknown id; [`ErrorKind::InvalidInput`] unless it
    /// failed; the store's error.
    pub async fn resume_replay(&self, id: &str) -> Result<ReplayProgress> {
        let not_failed = |status: &str| {
            Error::invalid_input(format!(
                "replay {id:?} is {status}; only a failed replay can be resumed"
            ))
        };
        let slot = self.reserve(id, false).map_err(|_| not_failed("running"))?;
        let record = self
            .inner
            .store
            .load(id)
            .await?
            .ok_or_else(|| not_found(id))?;
        if record.progress.status != ReplayStatus::Failed {
            return Err(not_failed(record.progress.status.as_str()));
        }
        let Some(lease) = self.claim(id).await? else {
            return Err(not_failed("running in another process sharing the store"));
        };
        // Read again under the lease: what was read before may have changed in between.
        let record = match self.inner.store.load(id).await? {
            Some(record) if record.progress.status == ReplayStatus::Failed => record,
            other => {
                self.release(id, &lease).await;
                let status = other.map_or("gone", |r| r.progress.status.as_str());
                return Err(not_failed(status));
            }
        };
        let progress = record.progress.clone();
        self.spawn(slot, record, lease, true);
        Ok(progress)
    }

    fn spawn(
        &self,
        mut slot: Reservation,
        record: ReplayRecord,
        lease: ReplayLease,
        resumed: bool,
    ) {
        let mut progress = record.progress.clone();
        progress.status = ReplayStatus::Running;
        progress.finished_at = None;
        if resumed {
            progress.resumes += 1;
        }
        let progress = Arc::new(Mutex::new(progress));
        let done = slot.done.take().expect("a reservation is spawned once");
        if let Some(job) = self.inner.jobs.lock().get_mut(record.id())
            && job.slot == slot.slot
        {
            job.progress = Some(progress.clone());
        }
        let run = run::Run {
            broker: self.inner.broker.clone(),
            store: self.inner.store.clone(),
            config: self.inner.config.clone(),
            lease,
            record,
            progress,
            cancel: slot.cancel.clone(),
            shutdown: self.inner.shutdown.clone(),
            lost: false,
        };
        let handler = self.clone();
        tokio::spawn(async move {
            metrics::gauge!("messaging_replay_active").increment(1.0);
            run.run().await;
            metrics::gauge!("messaging_replay_active").decrement(1.0);
            let _ = done.send(true);
            handler.prune().await;
        });
    }

    /// Forget the completed and cancelled replays beyond the newest
    /// [`MAX_FINISHED_REPLAYS`], in the store and here: the records of a handler that runs
    /// replays for months stay bounded.
    async fn prune(&self) {
        let removed = match self.inner.store.prune_finished(MAX_FINISHED_REPLAYS).await {
            Ok(removed) => removed,
            Err(err) => {
                tracing::warn!(error = %err, "pruning finished replays from the store failed; tried again when the next replay ends");
                Vec::new()
            }
        };
        let mut jobs = self.inner.jobs.lock();
        let finished = |job: &Job| *job.finished.borrow();
        for id in removed {
            if jobs.get(&id).is_some_and(finished) {
                jobs.remove(&id);
            }
        }
        // Runs the store could not record are known here alone: bounded the same way, and
        // like the store, a failed run (resumable) is never forgotten.
        let mut ended: Vec<(SystemTime, String)> = jobs
            .iter()
            .filter(|(_, job)| finished(job))
            .filter(|(_, job)| {
                job.progress
                    .as_ref()
                    .is_none_or(|p| p.lock().status != ReplayStatus::Failed)
            })
            .map(|(id, job)| {
                let at = job.progress.as_ref().map(|p| {
                    let p = p.lock();
                    p.finished_at.unwrap_or(p.started_at)
                });
                (at.unwrap_or(SystemTime::UNIX_EPOCH), id.clone())
            })
            .collect();
        if ended.len() > MAX_FINISHED_REPLAYS {
            ended.sort();
            let excess = ended.len() - MAX_FINISHED_REPLAYS;
            for (_, id) in ended.into_iter().take(excess) {
                jobs.remove(&id);
            }
        }
    }

    /// A replay's progress (of this process's run, or as last stored); named like
    /// [`Processor::redrive_progress`](crate::dlq::Processor::redrive_progress).
    ///
    /// # Errors
    /// [`ErrorKind::NotFound`] for an unknown id; the store's error.
    pub async fn replay_progress(&self, id: &str) -> Result<ReplayProgress> {
        let (live, ended) = self.job_progress(id);
        if let Some(progress) = live {
            return Ok(progress);
        }
        // A run that ended here wrote its end to the store, unless it lost the replay to
        // another handler (which the store then shows) or could not write (its own copy
        // says why).
        match self.inner.store.load(id).await {
            Ok(Some(record)) => Ok(record.progress),
            Ok(None) => ended.ok_or_else(|| not_found(id)),
            Err(err) => ended.ok_or(err),
        }
    }

    /// [`ReplayHandler::replay_progress`] under HelixAgent's name (`GetProgress`).
    ///
    /// # Errors
    /// As [`ReplayHandler::replay_progress`].
    pub async fn get_progress(&self, id: &str) -> Result<ReplayProgress> {
        self.replay_progress(id).await
    }

    /// This handler's progress of replay `id`: of a live run, or of one that ended.
    fn job_progress(&self, id: &str) -> (Option<ReplayProgress>, Option<ReplayProgress>) {
        let jobs = self.inner.jobs.lock();
        let Some(job) = jobs.get(id) else {
            return (None, None);
        };
        let progress = job.progress.as_ref().map(|p| p.lock().clone());
        if *job.finished.borrow() {
            (None, progress)
        } else {
            (progress, None)
        }
    }

    /// Every replay known here or in the store, newest first (finished ones: the newest
    /// [`MAX_FINISHED_REPLAYS`] completed or cancelled, and every failed one).
    ///
    /// # Errors
    /// The store's error.
    pub async fn list_replays(&self) -> Result<Vec<ReplayProgress>> {
        let mut all: HashMap<String, ReplayProgress> = self
            .inner
            .store
            .list()
            .await?
            .into_iter()
            .map(|record| (record.request.id, record.progress))
            .collect();
        for (id, job) in self.inner.jobs.lock().iter() {
            // Live runs only: an ended one is as the store shows it.
            if let Some(progress) = &job.progress
                && (!*job.finished.borrow() || !all.contains_key(id))
            {
                all.insert(id.clone(), progress.lock().clone());
            }
        }
        let mut all: Vec<ReplayProgress> = all.into_values().collect();
        all.sort_by(|a, b| b.started_at.cmp(&a.started_at).then(a.id.cmp(&b.id)));
        Ok(all)
    }

    /// Ask a replay to stop: the batch being published is finished, nothing after it. The
    /// replay's status becomes [`ReplayStatus::Cancelled`]. Idempotent; a finished replay
    /// stays as it finished.
    ///
    /// # Errors
    /// [`ErrorKind::NotFound`] for an unknown id; the store's error.
    pub async fn cancel_replay(&self, id: &str) -> Result<()> {
        // A run of it here (spawned: a slot still being taken may come to nothing).
        if let Some(job) = self.inner.jobs.lock().get(id)
            && job.progress.is_some()
            && !*job.finished.borrow()
        {
            job.cancel.cancel();
            return Ok(());
        }
        match self.inner.store.load(id).await? {
            None => Err(not_found(id)),
            Some(record) => {
                let elsewhere = || {
                    Error::invalid_input(format!(
                        "replay {id:?} is running in another process sharing the store; cancel it there"
                    ))
                };
                if record.progress.status == ReplayStatus::Running {
                    return Err(elsewhere());
                }
                if record.progress.status != ReplayStatus::Failed {
                    return Ok(());
                }
                // Failed: not running anywhere, but resumable; cancelling closes it, holding
                // its slot here and its lease, so that a resume starting meanwhile, here or
                // elsewhere, is not undone.
                let Ok(_slot) = self.reserve(id, false) else {
                    return Err(Error::invalid_input(format!(
                        "replay {id:?} is being resumed here; cancel it again"
                    )));
                };
                let Some(lease) = self.claim(id).await? else {
                    return Err(elsewhere());
                };
                let closed = match self.inner.store.load(id).await {
                    Ok(Some(mut record)) if record.progress.status == ReplayStatus::Failed => {
                        record.progress.status = ReplayStatus::Cancelled;
                        match self.inner.store.save(&record, &lease).await {
                            Ok(true) => Ok(()),
                            Ok(false) => Err(elsewhere()),
                            Err(err) => Err(err),
                        }
                    }
                    Ok(_) => Ok(()),
                    Err(err) => Err(err),
                };
                self.release(id, &lease).await;
                closed
            }
        }
    }

    /// Wait until the replay has stopped; its final progress. A replay running in another
    /// process sharing the store (or waiting for this handler to take it over) is watched in
    /// the store.
    ///
    /// # Errors
    /// [`ErrorKind::NotFound`] for an id not running here and not stored; the store's
    /// error.
    pub async fn wait(&self, id: &str) -> Result<ReplayProgress> {
        loop {
            let finished = self
                .inner
                .jobs
                .lock()
                .get(id)
                .map(|job| job.finished.clone());
            if let Some(mut finished) = finished {
                // The sender lives until the run has ended, after which the value is true.
                let _ = finished.wait_for(|done| *done).await;
                let progress = self.replay_progress(id).await?;
                // A run that stopped holding the lease (shutdown, lost lease) leaves the
                // replay running elsewhere.
                if progress.status.is_finished() || self.inner.shutdown.is_cancelled() {
                    return Ok(progress);
                }
            }
            let progress = self.replay_progress(id).await?;
            if progress.status.is_finished() {
                return Ok(progress);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stop every running replay where it is, leaving it resumable by the next
    /// [`ReplayHandler::open`] on the same store; waits for them (at most `timeout`).
    ///
    /// # Errors
    /// [`ErrorKind::Timeout`] when a replay did not stop in time.
    pub async fn shutdown(&self, timeout: Duration) -> Result<()> {
        self.inner.shutdown.cancel();
        let waiting: Vec<_> = self
            .inner
            .jobs
            .lock()
            .values()
            .map(|job| job.finished.clone())
            .collect();
        within(
            timeout,
            "stopping the running replays",
            futures::future::join_all(waiting.into_iter().map(|mut finished| async move {
                let _ = finished.wait_for(|done| *done).await;
            })),
        )
        .await
        .map(drop)
    }
}

/// Why a replay's slot could not be taken.
enum Busy {
    /// A run of it is live here.
    Running,
    /// This many replays run, the most allowed.
    Full(usize),
}

impl Busy {
    fn into_error(self, id: &str) -> Error {
        match self {
            Busy::Running => Error::invalid_input(format!("replay {id:?} is running")),
            Busy::Full(active) => Error::new(
                ErrorKind::Busy,
                format!(
                    "{active} replays are running, the most allowed (ReplayConfig::max_active, by default MAX_RUNNING_REPLAYS = {MAX_RUNNING_REPLAYS}); try again once one has finished, or cancel one"
                ),
            ),
        }
    }
}

fn not_found(id: &str) -> Error {
    Error::new(ErrorKind::NotFound, format!("no replay {id:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Message;

    #[test]
    fn the_filter_takes_types_and_exact_headers() {
        let order = Message::new("x")
            .with_header("type", "order.created")
            .with_header("region", "eu");
        let untyped = Message::new("x").with_header("region", "eu");
        assert!(ReplayFilter::default().matches(&order));
        assert!(ReplayFilter::default().matches(&untyped));
        let by_type = ReplayFilter {
            message_types: vec!["order.created".into(), "order.paid".into()],
            ..ReplayFilter::default()
        };
        assert!(by_type.matches(&order));
        assert!(
            !by_type.matches(&untyped),
            "a type filter leaves untyped messages out"
        );
        let by_header = ReplayFilter {
            headers: [("region".to_owned(), "us".to_owned())].into(),
            ..ReplayFilter::default()
        };
        assert!(!by_header.matches(&order));
        let both = ReplayFilter {
            headers: [("region".to_owned(), "eu".to_owned())].into(),
            ..by_type
        };
        assert!(both.matches(&order));
    }

    #[test]
    fn percentage_follows_the_window_covered() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let request = ReplayRequest::new("t", start, start + Duration::from_secs(100));
        let mut p = ReplayProgress::new(&request);
        assert_eq!(p.percentage(), 0.0);
        p.reached = Some(start + Duration::from_secs(25));
        assert!((p.percentage() - 25.0).abs() < 1e-9);
        p.reached = Some(start + Duration::from_secs(100));
        assert!(p.percentage() < 100.0, "100 only once completed");
        p.status = ReplayStatus::Completed;
        assert_eq!(p.percentage(), 100.0);
    }

    #[test]
    fn requests_are_checked() {
        let now = SystemTime::now();
        let ok = ReplayRequest::new("orders", now - Duration::from_secs(60), now);
        assert_eq!(ok.target(), "orders.replay");
        assert!(ok.validate().is_ok());
        let backwards = ReplayRequest::new("orders", now, now - Duration::from_secs(60));
        assert_eq!(
            backwards.validate().unwrap_err().kind(),
            ErrorKind::InvalidInput
        );
        let no_batch = ok.clone().with_options(ReplayOptions {
            batch_size: 0,
            ..ReplayOptions::default()
        });
        assert!(
            no_batch
                .validate()
                .unwrap_err()
                .to_string()
                .contains("batch_size")
        );
        let bad_target = ok.with_target_topic("has space");
        assert_eq!(
            bad_target.validate().unwrap_err().kind(),
            ErrorKind::InvalidInput
        );
    }

    #[test]
    fn a_request_reads_from_json_with_defaults() {
        let json = r#"{"topic":"helixagent.events.audit",
            "from_time":{"secs_since_epoch":1704067200,"nanos_since_epoch":0},
            "to_time":{"secs_since_epoch":1704153600,"nanos_since_epoch":0},
            "options":{"dry_run":true}}"#;
        let request: ReplayRequest = serde_json::from_str(json).unwrap();
        assert!(request.options.dry_run);
        assert_eq!(request.options.batch_size, 100);
        assert_eq!(request.target(), "helixagent.events.audit.replay");
    }
}
