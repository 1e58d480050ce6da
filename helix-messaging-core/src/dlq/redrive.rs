//! Bulk redrive jobs: re-drive a frozen selection of DLQ entries at a bounded rate, with
//! progress, cancel and a canary mode.

use std::collections::{HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::FutureExt;
use futures::future::OptionFuture;
use parking_lot::Mutex;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use super::jobs::{
    Job, MAX_FINISHED_REDRIVES, MAX_RUNNING_REDRIVES, RedriveProgress, RedriveRequest,
    RedriveStatus, prune_finished,
};
use super::processor::{Processor, publish_timed_out, redrive_copy};
use super::report::RedrivePreview;
use super::store::remove_redriven;
use super::store::{DeadLetterFilter, StoredDeadLetter};
use crate::error::{Error, ErrorKind, Result, panicked, task_stopped};
use crate::message::Message;
use crate::names::validate_name;

/// Entries an unpaced redrive claims at once, in whole batches (at least one): with a claim
/// and a removal per group, the store's commits are shared by this many re-driven entries.
const CLAIM_GROUP: usize = 1_000;

/// Paces a job's chunks to `rate` messages a second over every window: a chunk goes out no
/// sooner than the previous one's share of a second after it. Time spent not sending (a
/// canary's watch, a slow store) is not banked: the job never bursts to catch up with a
/// schedule taken from when it started.
#[derive(Debug)]
struct Pacer {
    rate: f64,
    next: Option<Instant>,
}

impl Pacer {
    fn new(rate: f64) -> Self {
        Pacer { rate, next: None }
    }

    /// When the next chunk, of `messages`, may go out; the one after it waits its share.
    fn take(&mut self, messages: usize) -> Instant {
        let now = Instant::now();
        let at = self.next.map_or(now, |next| next.max(now));
        // A rate too small to express waits a year, rather than overflowing.
        let year = Duration::from_secs(365 * 24 * 3600);
        let share =
            Duration::try_from_secs_f64(messages as f64 / self.rate).map_or(year, |d| d.min(year));
        self.next = Some(at + share);
        at
    }
}

impl Processor {
    /// Start a bulk redrive job in the background; returns its progress as it starts (its
    /// `id` names the job to [`redrive_progress`](Processor::redrive_progress),
    /// [`cancel_redrive`](Processor::cancel_redrive) and in
    /// [`list_redrives`](Processor::list_redrives)), the way
    /// [`ReplayHandler::start_replay`](crate::replay::ReplayHandler::start_replay) does for a
    /// replay. See [`RedriveRequest`]. The selection leaves discarded entries out.
    ///
    /// At most [`MAX_RUNNING_REDRIVES`] jobs run at once; finished ones are kept for listing
    /// up to [`MAX_FINISHED_REDRIVES`], the oldest forgotten first.
    ///
    /// # Errors
    /// - [`ErrorKind::InvalidInput`](crate::error::ErrorKind::InvalidInput) for a bad request.
    /// - [`ErrorKind::Conflict`](crate::error::ErrorKind::Conflict) (not retryable) for an id
    ///   a job listed here already has.
    /// - [`ErrorKind::Busy`](crate::error::ErrorKind::Busy) while [`MAX_RUNNING_REDRIVES`]
    ///   jobs run.
    /// - The store's error selecting entries.
    ///
    /// Nothing was started on any of them.
    pub async fn start_redrive(&self, request: RedriveRequest) -> Result<RedriveProgress> {
        start(self, request).await
    }

    /// What [`start_redrive`](Processor::start_redrive) would re-drive for `request`, read
    /// without starting anything or changing anything: its selection's size and failure
    /// groups (one read of the store). The request is checked as a start checks it, so a
    /// preview that succeeds means the start would be accepted, unless
    /// [`MAX_RUNNING_REDRIVES`] jobs are running by then or its id is taken.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`](crate::error::ErrorKind::InvalidInput) for a bad request;
    /// the store's error.
    pub async fn preview_redrive(&self, request: &RedriveRequest) -> Result<RedrivePreview> {
        check(request)?;
        let groups = self.inner.store.groups(&selection(&request.filter)).await?;
        Ok(RedrivePreview {
            total: groups.iter().map(|g| g.count).sum(),
            groups,
        })
    }
}

/// What a redrive selects: the filter's entries that are not discarded (they are never
/// re-driven, so they are not counted in its `total` either).
fn selection(filter: &DeadLetterFilter) -> DeadLetterFilter {
    DeadLetterFilter {
        exclude_discarded: true,
        ..filter.clone()
    }
}

fn check(request: &RedriveRequest) -> Result<()> {
    if let Some(target) = &request.target_topic {
        validate_name("target topic", target)?;
    }
    // As a replay id: any text a URL path can carry back, bounded.
    if let Some(id) = &request.id
        && (id.is_empty() || id.len() > 200 || id.chars().any(char::is_control))
    {
        return Err(Error::invalid_input(
            "id: a redrive's id is 1 to 200 characters, no control characters",
        ));
    }
    request.check_limits()
}

/// Whether a job `id` may start next to `jobs`: its id is free and fewer than
/// [`MAX_RUNNING_REDRIVES`] run.
fn admit(jobs: &HashMap<String, Job>, id: &str) -> Result<()> {
    if jobs.contains_key(id) {
        return Err(Error::new(
            ErrorKind::Conflict,
            format!("a redrive job with id {id:?} already exists"),
        )
        .with_retryable(false));
    }
    let running = jobs
        .values()
        .filter(|job| !job.progress.lock().status.is_finished())
        .count();
    if running >= MAX_RUNNING_REDRIVES {
        return Err(Error::new(
            ErrorKind::Busy,
            format!(
                "{running} redrive jobs are running, the most allowed (MAX_RUNNING_REDRIVES = {MAX_RUNNING_REDRIVES}); try again once one has finished, or cancel one"
            ),
        ));
    }
    Ok(())
}

async fn start(processor: &Processor, request: RedriveRequest) -> Result<RedriveProgress> {
    check(&request)?;
    let id = request
        .id
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    // Refused before the selection is read (which can be long); checked again when the job
    // is entered, under the same lock, for requests racing this one.
    admit(&processor.inner.jobs.lock(), &id)?;
    let ids = processor
        .inner
        .store
        .ids(&selection(&request.filter))
        .await?;
    let progress = Arc::new(Mutex::new(RedriveProgress {
        id: id.clone(),
        status: RedriveStatus::Running,
        total: ids.len() as u64,
        redriven: 0,
        failed: 0,
        skipped: 0,
        started_at: SystemTime::now(),
        finished_at: None,
        last_error: None,
    }));
    let cancel = CancellationToken::new();
    {
        let mut jobs = processor.inner.jobs.lock();
        admit(&jobs, &id)?;
        jobs.insert(
            id.clone(),
            Job {
                progress: progress.clone(),
                cancel: cancel.clone(),
            },
        );
        prune_finished(&mut jobs, MAX_FINISHED_REDRIVES);
    }
    let started = progress.lock().clone();
    let run = Run {
        processor: processor.clone(),
        request,
        progress,
        cancel,
    };
    tokio::spawn(run.run(ids));
    Ok(started)
}

/// A group's entries as claimed: those held for the job, how many of the group's ids could
/// not be claimed, and when the holds run out (counted from when the claim was asked for).
struct Claimed {
    entries: Vec<StoredDeadLetter>,
    skipped: usize,
    held_until: Instant,
}

/// A group's removal, running on a task of its own from the moment the group was published,
/// so that nothing the job does next (publishing the next group, waiting for the claim of
/// the one after) holds it back. The job always waits for it; should the job's future be
/// dropped instead (a panic unwinding it), the task is aborted with it rather than left to
/// write after the job has reported how it ended.
struct Removal(AbortOnDropHandle<Result<()>>);

impl Removal {
    /// Start removing `group` (and letting go of its failures) on `processor`'s store.
    fn start(processor: &Processor, group: Settled) -> Self {
        Removal(AbortOnDropHandle::new(tokio::spawn(settle(
            processor.clone(),
            group,
        ))))
    }

    /// The removal's outcome, once it is done.
    async fn finish(self) -> Result<()> {
        self.0
            .await
            .unwrap_or_else(|err| Err(task_stopped("a redrive's removal", &err)))
    }
}

/// Take a group's re-driven entries out of the store, then let go of the ones that failed:
/// the removals first, while their claims are young, and one commit for all of them,
/// whatever number of failures (one write each) follows.
async fn settle(processor: Processor, group: Settled) -> Result<()> {
    let removed = if group.confirmed.is_empty() {
        Ok(())
    } else {
        let store = &processor.inner.store;
        remove_redriven(store.as_ref(), &group.confirmed)
            .await
            .inspect_err(|err| {
                tracing::warn!(entries = group.confirmed.len(), error = %err, "re-driven dead letters could not be removed from the DLQ; they stay there and may be re-driven again");
            })
    };
    for entry in &group.failed {
        processor.let_go(entry).await;
    }
    removed
}

/// A group's entries once published: confirmed (id and claimed version, to be removed) or
/// failed (to be let go).
struct Settled {
    confirmed: Vec<(String, u64)>,
    failed: Vec<StoredDeadLetter>,
}

struct Run {
    processor: Processor,
    request: RedriveRequest,
    progress: Arc<Mutex<RedriveProgress>>,
    cancel: CancellationToken,
}

impl Run {
    async fn run(self, ids: Vec<String>) {
        // A panic in the job ends it failed, never leaves it running.
        let driven = AssertUnwindSafe(self.drive(ids))
            .catch_unwind()
            .await
            .unwrap_or_else(|panic| Err(panicked("redrive job", &*panic)));
        let status = match driven {
            Ok(status) => status,
            Err(err) => {
                self.progress.lock().last_error = Some(err.to_string());
                RedriveStatus::Failed
            }
        };
        // Finished and pruned in one step under the jobs' lock, so no listing ever sees one
        // more finished job than are kept.
        let mut jobs = self.processor.inner.jobs.lock();
        {
            let mut progress = self.progress.lock();
            progress.status = status;
            progress.finished_at = Some(SystemTime::now());
            tracing::info!(job = %progress.id, status = status.as_str(), redriven = progress.redriven, failed = progress.failed, skipped = progress.skipped, "DLQ redrive job finished");
        }
        prune_finished(&mut jobs, MAX_FINISHED_REDRIVES);
    }

    async fn drive(&self, ids: Vec<String>) -> Result<RedriveStatus> {
        let mut pacer = self.request.rate_per_second.map(Pacer::new);
        let (canaries, rest) = match self.request.canary {
            Some(canary) => ids.split_at(canary.count.min(ids.len())),
            None => ids.split_at(0),
        };
        if let Some(canary) = self.request.canary.filter(|_| !canaries.is_empty()) {
            let canary_ids = self.batch(canaries, &mut pacer).await?;
            if self.cancel.is_cancelled() {
                return Ok(RedriveStatus::Cancelled);
            }
            if canary_ids.is_empty() {
                // Nothing to watch: going on would re-drive everything without a canary.
                return Err(Error::new(
                    ErrorKind::Backend,
                    "no canary could be re-driven (see last_error); the rest were left alone",
                ));
            }
            self.progress.lock().status = RedriveStatus::Watching;
            tokio::select! {
                () = self.cancel.cancelled() => return Ok(RedriveStatus::Cancelled),
                () = tokio::time::sleep(canary.watch) => {}
            }
            if self.canary_failed(&canary_ids).await? {
                return Ok(RedriveStatus::CanaryFailed);
            }
            self.progress.lock().status = RedriveStatus::Running;
        }
        self.batch(rest, &mut pacer).await?;
        Ok(if self.cancel.is_cancelled() {
            RedriveStatus::Cancelled
        } else {
            RedriveStatus::Completed
        })
    }

    /// With a rate limit, batches are small enough to keep the pace even (about twenty a
    /// second).
    fn chunk_size(&self) -> usize {
        match self.request.rate_per_second {
            Some(rate) => ((rate / 20.0) as usize).clamp(1, self.request.batch_size),
            None => self.request.batch_size,
        }
    }

    /// Entries claimed (and later removed) together: a paced job's chunk, so what it holds
    /// at any time is one chunk; an unpaced job's whole batches up to [`CLAIM_GROUP`], so the
    /// store's two commits (claim, removal) are shared by many batches.
    fn group_size(&self) -> usize {
        match self.request.rate_per_second {
            Some(_) => self.chunk_size(),
            None => {
                let batch = self.request.batch_size;
                batch * (CLAIM_GROUP / batch).max(1)
            }
        }
    }

    /// Re-drive the entries `ids`, group by group, each when `pacer` lets it go; returns the
    /// original message id of each one re-driven, with the redrive count its copy carries.
    ///
    /// A group's removal starts the moment its publishing ends (a removal only ever follows
    /// its group's confirmations, and comes well within its hold). Unpaced, it goes on while
    /// the next group is published, and the group after that is claimed while one is
    /// published; the job stops at the first claim or removal that fails, once the group
    /// under way is out and its removal done. Paced, each group is removed before the next.
    ///
    /// A group claimed ahead is published even when the job is cancelled meanwhile:
    /// another job skips what this one holds, so letting it go unpublished would leave it
    /// re-driven by neither. When the job stops on an error it is let go (another job that
    /// skipped it leaves it in the DLQ, as a job that fails does with what it did not
    /// reach), and so when a removal panics; a panic in the job itself, or a crash, leaves
    /// it held until its claim runs out, as it does the group being published.
    async fn batch(
        &self,
        ids: &[String],
        pacer: &mut Option<Pacer>,
    ) -> Result<HashMap<String, u32>> {
        let mut redriven_ids = HashMap::new();
        let mut removing: Option<Removal> = None;
        let mut ahead: Option<Result<Claimed>> = None;
        let mut outcome = Ok(());
        let mut groups = ids.chunks(self.group_size());
        let lease = self.processor.claim_lease();
        let paced = pacer.is_some();
        loop {
            let claimed = match ahead.take() {
                Some(claimed) => claimed,
                None => {
                    if self.cancel.is_cancelled() {
                        break;
                    }
                    let Some(group) = groups.next() else {
                        break;
                    };
                    if let Some(pacer) = pacer {
                        let due = pacer.take(group.len());
                        tokio::select! {
                            () = self.cancel.cancelled() => break,
                            () = tokio::time::sleep_until(due) => {}
                        }
                    }
                    self.claim_group(group, lease).await
                }
            };
            let claimed = match claimed {
                Ok(claimed) => claimed,
                Err(err) => {
                    outcome = outcome.and(Err(err));
                    break;
                }
            };
            let next = if !paced && !self.cancel.is_cancelled() {
                // Held longer by as long as this group's publishing may take: its own
                // publishing is timed from when it starts, as if it had been claimed then.
                let waits = self.processor.config().processing_timeout + self.hold_margin();
                groups
                    .next()
                    .map(|next| self.claim_group(next, lease + waits))
            } else {
                None
            };
            let published = async {
                let settled = self.publish_group(claimed, &mut redriven_ids).await;
                Removal::start(&self.processor, settled)
            };
            let (removal, removed, next) = futures::join!(
                published,
                OptionFuture::from(removing.take().map(Removal::finish)),
                OptionFuture::from(next)
            );
            ahead = next;
            if let Some(Err(err)) = removed {
                outcome = Err(err);
            }
            if paced || outcome.is_err() {
                outcome = outcome.and(removal.finish().await);
            } else {
                removing = Some(removal);
            }
            if outcome.is_err() {
                break;
            }
        }
        if let Some(removal) = removing {
            outcome = outcome.and(removal.finish().await);
        }
        if let Some(Ok(unpublished)) = ahead {
            for entry in &unpublished.entries {
                self.processor.let_go(entry).await;
            }
        }
        outcome.map(|()| redriven_ids)
    }

    /// How much of a claim's hold is kept past its group's publishing for the removal,
    /// and how long past `processing_timeout` the publishing may go on: half of what the
    /// hold gives beyond `processing_timeout` (the hold being a minute more, 30 s).
    fn hold_margin(&self) -> Duration {
        let timeout = self.processor.config().processing_timeout;
        self.processor.claim_lease().saturating_sub(timeout) / 2
    }

    /// Claim the entries `ids` for this job alone, for `lease`, so another job, a reprocess
    /// or an automatic attempt does not re-drive them at the same time.
    async fn claim_group(&self, ids: &[String], lease: Duration) -> Result<Claimed> {
        let claimed_at = Instant::now();
        let entries = self
            .processor
            .inner
            .store
            .claim(ids, SystemTime::now(), lease)
            .await?;
        Ok(Claimed {
            skipped: ids.len() - entries.len(),
            entries,
            held_until: claimed_at + lease,
        })
    }

    /// Publish a claimed group, batch by batch; returns the entries whose copies were
    /// confirmed (to be removed) and those that failed (to be let go).
    async fn publish_group(
        &self,
        group: Claimed,
        redriven_ids: &mut HashMap<String, u32>,
    ) -> Settled {
        // Gone (reprocessed, purged), discarded, or being re-driven by another operation.
        self.progress.lock().skipped += group.skipped as u64;
        // Each batch has `processing_timeout`, as a batch claimed on its own would; and the
        // group ends its publishing within the hold's margin past that, counted from when
        // it starts, and never later than a margin before its hold runs out (which only a
        // store slow for minutes brings forward), so the removal that follows comes well
        // within the hold. What was not confirmed by its deadline (or not sent, the time
        // being up) counts failed and is let go (a copy may still arrive: at least once).
        let timeout = self.processor.config().processing_timeout;
        let margin = self.hold_margin();
        let now = Instant::now();
        let group_ends =
            (now + timeout + margin).min(group.held_until.checked_sub(margin).unwrap_or(now));
        let mut settled = Settled {
            confirmed: Vec::with_capacity(group.entries.len()),
            failed: Vec::new(),
        };
        for batch in group.entries.chunks(self.request.batch_size) {
            let deadline = (tokio::time::Instant::now() + timeout).min(group_ends);
            self.publish_batch(batch, deadline, &mut settled, redriven_ids)
                .await;
        }
        settled
    }

    /// Publish the claimed entries `entries`, one batch per target topic and source broker
    /// so confirmations are awaited together; each goes to `settled`, confirmed or failed.
    async fn publish_batch(
        &self,
        entries: &[StoredDeadLetter],
        deadline: tokio::time::Instant,
        settled: &mut Settled,
        redriven_ids: &mut HashMap<String, u32>,
    ) {
        let letters: Vec<&super::letter::DeadLetter> = entries.iter().map(|e| &e.letter).collect();
        let mut by_topic: Vec<(String, Option<&str>, Vec<usize>)> = Vec::new();
        for (i, letter) in letters.iter().enumerate() {
            let topic = self
                .request
                .target_topic
                .clone()
                .unwrap_or_else(|| letter.original_topic.clone());
            let source = letter.source();
            match by_topic
                .iter_mut()
                .find(|(t, s, _)| *t == topic && *s == source)
            {
                Some((_, _, members)) => members.push(i),
                None => by_topic.push((topic, source, vec![i])),
            }
        }
        let (mut redriven, mut failed, mut last_error) = (0, 0, None);
        let timeout = self.processor.config().processing_timeout;
        for (topic, _, members) in by_topic {
            let messages: Vec<Message> = members
                .iter()
                .map(|&i| redrive_copy(letters[i], &topic))
                .collect();
            let count = messages.len();
            // The members share a source, so the first names their broker.
            let report = match self.processor.broker_for(letters[members[0]]) {
                Err(err) => {
                    let failures = (0..count)
                        .map(|i| (i, Error::new(err.kind(), err.message().to_owned())))
                        .collect();
                    crate::broker::BatchReport::new(count, failures)
                }
                Ok(_) if tokio::time::Instant::now() >= deadline => {
                    let failures = (0..count)
                        .map(|i| (i, publish_timed_out(timeout)))
                        .collect();
                    crate::broker::BatchReport::new(count, failures)
                }
                Ok(broker) => {
                    let publish = broker.publish_batch(&topic, messages);
                    tokio::time::timeout_at(deadline, publish)
                        .await
                        .unwrap_or_else(|_| {
                            let failures = (0..count)
                                .map(|i| (i, publish_timed_out(timeout)))
                                .collect();
                            crate::broker::BatchReport::new(count, failures)
                        })
                }
            };
            let failures: HashSet<usize> = report.failures().iter().map(|(i, _)| *i).collect();
            if let Some((_, err)) = report.failures().first() {
                last_error = Some(err.to_string());
            }
            for (position, &i) in members.iter().enumerate() {
                if failures.contains(&position) {
                    failed += 1;
                    settled.failed.push(entries[i].clone());
                } else {
                    // Published and confirmed: it counts as re-driven whatever the store
                    // says next, and only now may it leave the DLQ.
                    settled
                        .confirmed
                        .push((entries[i].letter.id.clone(), entries[i].version));
                    redriven_ids.insert(
                        letters[i].message.id().to_owned(),
                        letters[i].redrives.saturating_add(1),
                    );
                    self.processor.note_redriven();
                    redriven += 1;
                }
            }
        }
        let mut progress = self.progress.lock();
        progress.redriven += redriven;
        progress.failed += failed;
        if last_error.is_some() {
            progress.last_error = last_error;
        }
    }

    /// Whether any canary was dead-lettered again: an entry of its original message id
    /// carrying at least the redrive count of the canary's copy. Counted, not timed: the
    /// consumer that fails it stamps the failure with its own clock, which need not agree
    /// with this process's.
    async fn canary_failed(&self, canaries: &HashMap<String, u32>) -> Result<bool> {
        let store = &self.processor.inner.store;
        for (original_id, redrives) in canaries {
            let filter = DeadLetterFilter {
                original_id: Some(original_id.clone()),
                ..DeadLetterFilter::default()
            };
            let entries = store.list(&filter, usize::MAX, 0).await?;
            if entries.iter().any(|e| e.letter.redrives >= *redrives) {
                return Ok(true);
            }
        }
        Ok(false)
    }
}
