//! What a bulk redrive job is, apart from how it runs: the request, its status and progress,
//! and the handle the processor keeps for each job (the running is `redrive`'s, which is
//! built on the processor).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use super::store::DeadLetterFilter;
use crate::error::{Error, Result};

/// Redrive the first `count` entries, then watch for `watch`: if any of them is
/// dead-lettered again meanwhile, the job stops ([`RedriveStatus::CanaryFailed`]) and the
/// rest stay in the DLQ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CanaryConfig {
    /// Entries re-driven first.
    pub count: usize,
    /// How long to watch them before re-driving the rest.
    pub watch: Duration,
}

/// Most messages a redrive publishes per batch ([`RedriveRequest::batch_size`]).
pub const MAX_REDRIVE_BATCH_SIZE: usize = 10_000;
/// Slowest rate a redrive may be paced at, in messages per second (one a minute, about).
pub const MIN_REDRIVE_RATE: f64 = 0.01;
/// Fastest rate a redrive may be paced at, in messages per second.
pub const MAX_REDRIVE_RATE: f64 = 1_000_000.0;
/// Longest a canary may be watched ([`CanaryConfig::watch`]).
pub const MAX_CANARY_WATCH: Duration = Duration::from_secs(3600);
/// The pace of a redrive that names none ([`RedriveRequest::default`], and a body without
/// `rate_per_second` over the admin API), in messages per second: a redrive started without
/// thought does not flood the consumers it re-drives to (10,000 entries take 100 s).
pub const DEFAULT_REDRIVE_RATE: f64 = 100.0;
/// Most bulk redrive jobs one [`Processor`](super::Processor) runs at once (running or
/// watching a canary); one more is refused with
/// [`ErrorKind::Busy`](crate::error::ErrorKind::Busy) until one finishes.
pub const MAX_RUNNING_REDRIVES: usize = 4;
/// Finished redrive jobs a [`Processor`](super::Processor) keeps for
/// [`list_redrives`](super::Processor::list_redrives) and
/// [`redrive_progress`](super::Processor::redrive_progress): beyond this many, the ones that
/// finished first are forgotten. Running jobs are always kept.
pub const MAX_FINISHED_REDRIVES: usize = 100;

/// A bulk redrive: which entries, where to, how fast.
#[derive(Debug, Clone, PartialEq)]
pub struct RedriveRequest {
    /// The entries to re-drive, selected when the job starts (the selection is frozen:
    /// entries dead-lettered later are not part of it). Discarded entries are never
    /// re-driven.
    pub filter: DeadLetterFilter,
    /// Publish to this topic instead of each message's original topic.
    pub target_topic: Option<String>,
    /// Most messages published per second (`None`: as fast as the broker confirms; the
    /// default is [`DEFAULT_REDRIVE_RATE`]).
    pub rate_per_second: Option<f64>,
    /// Canary mode.
    pub canary: Option<CanaryConfig>,
    /// Messages published per batch (default 100; the batch's confirmations are awaited
    /// together, within the processor's `processing_timeout`).
    ///
    /// A paced job claims, publishes and removes each chunk it sends before the next. An
    /// unpaced one claims a group of whole batches at a time (as many as fit in 1,000
    /// entries, at least one) and removes the group's confirmed entries while it claims and
    /// publishes the next group; a cancel takes effect between groups. So a process killed
    /// midway leaves at most two groups held until their claims run out, and the entries
    /// of those that were published but not yet removed are re-driven again after that (at
    /// least once).
    pub batch_size: usize,
    /// The job's id (`None`: a new UUID). An id a job this processor still lists already
    /// has is refused with [`ErrorKind::Conflict`](crate::error::ErrorKind::Conflict), so a
    /// client that retries a start with its own id does not start the job twice.
    pub id: Option<String>,
}

impl RedriveRequest {
    /// The request against the limits ([`MAX_REDRIVE_BATCH_SIZE`], [`MIN_REDRIVE_RATE`] to
    /// [`MAX_REDRIVE_RATE`], [`MAX_CANARY_WATCH`]).
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`](crate::error::ErrorKind::InvalidInput) naming the field and
    /// its limit.
    pub(super) fn check_limits(&self) -> Result<()> {
        if let Some(rate) = self.rate_per_second
            && !(MIN_REDRIVE_RATE..=MAX_REDRIVE_RATE).contains(&rate)
        {
            return Err(Error::invalid_input(format!(
                "rate_per_second must be a number from {MIN_REDRIVE_RATE} to {MAX_REDRIVE_RATE} messages a second, got {rate}"
            )));
        }
        if self.batch_size == 0 {
            return Err(Error::invalid_input("batch_size must be at least 1"));
        }
        if self.batch_size > MAX_REDRIVE_BATCH_SIZE {
            return Err(Error::invalid_input(format!(
                "batch_size must be at most {MAX_REDRIVE_BATCH_SIZE}, got {}",
                self.batch_size
            )));
        }
        if let Some(canary) = self.canary
            && canary.watch > MAX_CANARY_WATCH
        {
            return Err(Error::invalid_input(format!(
                "canary.watch_ms must be at most {} ms (one hour), got {}",
                MAX_CANARY_WATCH.as_millis(),
                canary.watch.as_millis()
            )));
        }
        Ok(())
    }
}

impl Default for RedriveRequest {
    /// Every entry ([`DeadLetterFilter::default`]) to its original topic, at
    /// [`DEFAULT_REDRIVE_RATE`], 100 a batch, no canary, a new id.
    fn default() -> Self {
        RedriveRequest {
            filter: DeadLetterFilter::default(),
            target_topic: None,
            rate_per_second: Some(DEFAULT_REDRIVE_RATE),
            canary: None,
            batch_size: 100,
            id: None,
        }
    }
}

/// Where a redrive job stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedriveStatus {
    /// Re-driving.
    Running,
    /// The canaries are out; watching whether they fail again.
    Watching,
    /// Everything selected was re-driven (or skipped, or failed to publish).
    Completed,
    /// Cancelled; what was re-driven stays re-driven.
    Cancelled,
    /// A canary was dead-lettered again; the rest were left alone.
    CanaryFailed,
    /// The store failed; the job stopped.
    Failed,
}

impl RedriveStatus {
    /// The status as shown.
    pub const fn as_str(self) -> &'static str {
        match self {
            RedriveStatus::Running => "running",
            RedriveStatus::Watching => "watching",
            RedriveStatus::Completed => "completed",
            RedriveStatus::Cancelled => "cancelled",
            RedriveStatus::CanaryFailed => "canary_failed",
            RedriveStatus::Failed => "failed",
        }
    }

    /// Whether the job has stopped.
    pub const fn is_finished(self) -> bool {
        !matches!(self, RedriveStatus::Running | RedriveStatus::Watching)
    }
}

/// A redrive job's progress. `redriven + failed + skipped <= total`, equal once finished
/// unless cancelled or stopped early.
#[derive(Debug, Clone, PartialEq)]
pub struct RedriveProgress {
    /// The job id.
    pub id: String,
    /// Where it stands.
    pub status: RedriveStatus,
    /// Entries selected.
    pub total: u64,
    /// Published (confirmed) and removed from the DLQ.
    pub redriven: u64,
    /// Could not be published (kept in the DLQ).
    pub failed: u64,
    /// Gone, discarded or held by another re-drive (an automatic attempt, a reprocess,
    /// another job) by the time the job reached them.
    pub skipped: u64,
    /// When the job started.
    pub started_at: SystemTime,
    /// When it finished.
    pub finished_at: Option<SystemTime>,
    /// The last error seen.
    pub last_error: Option<String>,
}

impl RedriveProgress {
    /// Percentage of the selection dealt with (100 for an empty selection).
    pub fn percentage(&self) -> f64 {
        if self.total == 0 {
            return 100.0;
        }
        (self.redriven + self.failed + self.skipped) as f64 * 100.0 / self.total as f64
    }
}

pub(super) struct Job {
    pub(super) progress: Arc<Mutex<RedriveProgress>>,
    pub(super) cancel: CancellationToken,
}

/// Forget the finished jobs of `jobs` beyond the newest `keep` (newest by when they finished;
/// running ones are never forgotten): the map of a processor that runs redrives for months
/// stays bounded.
pub(super) fn prune_finished(jobs: &mut HashMap<String, Job>, keep: usize) {
    let mut finished: Vec<(SystemTime, String)> = jobs
        .iter()
        .filter_map(|(id, job)| {
            let progress = job.progress.lock();
            progress.status.is_finished().then(|| {
                (
                    progress.finished_at.unwrap_or(progress.started_at),
                    id.clone(),
                )
            })
        })
        .collect();
    if finished.len() <= keep {
        return;
    }
    finished.sort();
    let excess = finished.len() - keep;
    for (_, id) in finished.into_iter().take(excess) {
        jobs.remove(&id);
    }
}
