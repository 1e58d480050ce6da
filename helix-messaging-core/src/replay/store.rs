//! Where replays keep their progress: the durable record a replay resumes from.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::request::{ReplayProgress, ReplayRequest, ReplayStatus};
use crate::error::{Error, ErrorKind, Result};

/// How far a replay has got through its window, per partition of the source: every entry at
/// or before the mark has been dealt with (published, skipped or counted as failed).
///
/// A mark is the entry's place in its partition as two numbers compared in order: a Kafka
/// offset, a Redis stream id's milliseconds and sequence, a memory or stream sequence number.
pub type Frontier = BTreeMap<i32, (u64, u64)>;

/// What a replay has made durable: enough to resume it after a restart without publishing
/// anything twice.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Entries dealt with, per source partition.
    pub frontier: Frontier,
    /// Set before the first batch published after this checkpoint: copies published since
    /// then are not covered by `frontier`, so a resumed replay looks for them in the target
    /// topic (by their replay id header) instead of publishing them again.
    pub in_flight_since: Option<SystemTime>,
}

/// One replay as stored: what was asked, how far it got, where to resume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplayRecord {
    /// The request (with its id filled in).
    pub request: ReplayRequest,
    /// Progress as of `checkpoint`.
    pub progress: ReplayProgress,
    /// Where a resumed run starts.
    pub checkpoint: Checkpoint,
}

impl ReplayRecord {
    /// The replay id.
    pub fn id(&self) -> &str {
        &self.request.id
    }

    /// The record as JSON, the form a durable store keeps it in.
    ///
    /// # Errors
    /// [`ErrorKind::Serialization`] when it cannot be encoded.
    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string(self).map_err(|e| {
            Error::new(
                ErrorKind::Serialization,
                format!("encoding replay {}: {e}", self.id()),
            )
        })
    }

    /// A record from its JSON ([`to_json`](Self::to_json)); `id` names it in the error.
    ///
    /// # Errors
    /// [`ErrorKind::Serialization`] when `json` is not a record.
    pub fn from_json(id: &str, json: &str) -> Result<Self> {
        serde_json::from_str(json).map_err(|e| {
            Error::new(
                ErrorKind::Serialization,
                format!("stored replay {id:?} cannot be decoded: {e}"),
            )
        })
    }
}

/// A hold on one replay, from [`ReplayStore::claim`]: who holds it, and which taking of it
/// this is. Every write a run makes is fenced by it: once the replay has been claimed again
/// (by another handler whose lease check found this one run out, or by a restarted process of
/// the same name), the writes under this lease change nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayLease {
    /// The holder's name.
    pub owner: String,
    /// Grows with every claim of the replay, whoever makes it.
    pub epoch: u64,
}

/// Durable replay records. Implementations: [`MemoryReplayStore`] (nothing survives the
/// process); in `helix-messaging-store`, `SqliteReplayStore` (feature `sqlite`) and
/// `PostgresReplayStore` (feature `postgres`), each of which can share the DLQ's database.
///
/// A replay runs in one handler at a time: the handler [claims](ReplayStore::claim) a lease,
/// renews it while it runs, and writes the record only under it
/// ([`ReplayStore::save`]). Lease times are the store's clock (the database server's for the
/// SQL stores), so handlers on machines whose clocks disagree still agree on when a lease
/// has run out.
#[async_trait]
pub trait ReplayStore: Send + Sync + 'static {
    /// Store a new record, unless one with its id exists, leased to `owner` for `duration`
    /// in the same atomic step (so no other handler can take a replay being started). The
    /// lease, or `None` when the id exists. Durable when it returns.
    ///
    /// # Errors
    /// The store's error; nothing was stored.
    async fn create(
        &self,
        record: &ReplayRecord,
        owner: &str,
        duration: Duration,
    ) -> Result<Option<ReplayLease>>;

    /// Replace the record, if `lease` still holds it: nobody has claimed the replay since
    /// `lease` was taken. Whether it was written. Durable when it returns.
    ///
    /// # Errors
    /// The store's error; the record is then as before.
    async fn save(&self, record: &ReplayRecord, lease: &ReplayLease) -> Result<bool>;

    /// The record with this id, if any.
    ///
    /// # Errors
    /// The store's error, or [`ErrorKind::Serialization`] for a record that cannot be read.
    async fn load(&self, id: &str) -> Result<Option<ReplayRecord>>;

    /// Every record, in no particular order.
    ///
    /// # Errors
    /// As [`ReplayStore::load`].
    async fn list(&self) -> Result<Vec<ReplayRecord>>;

    /// Forget the record; whether there was one.
    ///
    /// # Errors
    /// The store's error.
    async fn remove(&self, id: &str) -> Result<bool>;

    /// Forget the completed and cancelled records beyond the newest `keep` (newest by when
    /// they finished), the oldest first; the ids forgotten. Running and failed records (a
    /// failed replay can be resumed) are never forgotten. The
    /// [`ReplayHandler`](super::ReplayHandler) calls it with
    /// [`MAX_FINISHED_REPLAYS`](super::MAX_FINISHED_REPLAYS) whenever a replay ends. Neither
    /// status changes once reached, so a record forgotten here is not being written by a run.
    ///
    /// # Errors
    /// As [`ReplayStore::list`] and [`ReplayStore::remove`]; records forgotten before the
    /// error stay forgotten.
    async fn prune_finished(&self, keep: usize) -> Result<Vec<String>> {
        let mut ended: Vec<(SystemTime, String)> = self
            .list()
            .await?
            .into_iter()
            .filter(|r| {
                matches!(
                    r.progress.status,
                    ReplayStatus::Completed | ReplayStatus::Cancelled
                )
            })
            .map(|r| {
                let p = &r.progress;
                (p.finished_at.unwrap_or(p.started_at), r.request.id)
            })
            .collect();
        if ended.len() <= keep {
            return Ok(Vec::new());
        }
        ended.sort();
        let excess = ended.len() - keep;
        let mut removed = Vec::with_capacity(excess);
        for (_, id) in ended.into_iter().take(excess) {
            if self.remove(&id).await? {
                removed.push(id);
            }
        }
        Ok(removed)
    }

    /// Take the lease on replay `id` for `owner`, for `duration` of the store's clock. It is
    /// taken when nobody holds it, when its holder's lease has run out, or when `owner`
    /// holds it already (a restarted process of the same name takes its replays back at
    /// once); each taking has a new, greater epoch, which fences off the previous holder's
    /// writes. `None` when someone else holds it, or for an unknown id.
    ///
    /// # Errors
    /// The store's error.
    async fn claim(&self, id: &str, owner: &str, duration: Duration)
    -> Result<Option<ReplayLease>>;

    /// Extend `lease` to `duration` from now (the store's clock), if it still holds the
    /// replay. Whether it does.
    ///
    /// # Errors
    /// The store's error.
    async fn renew(&self, id: &str, lease: &ReplayLease, duration: Duration) -> Result<bool>;

    /// Give the replay up, if `lease` still holds it.
    ///
    /// # Errors
    /// The store's error.
    async fn release(&self, id: &str, lease: &ReplayLease) -> Result<()>;
}

/// Who holds a replay in a [`MemoryReplayStore`].
#[derive(Debug, Default)]
struct MemoryLease {
    owner: Option<String>,
    epoch: u64,
    until: Option<Instant>,
}

/// Replay records in memory: progress is kept for listing, but nothing survives the process.
#[derive(Debug, Default)]
pub struct MemoryReplayStore {
    records: Mutex<HashMap<String, (ReplayRecord, MemoryLease)>>,
}

impl MemoryReplayStore {
    /// An empty store.
    pub fn new() -> Self {
        MemoryReplayStore::default()
    }
}

fn holds(held: &MemoryLease, lease: &ReplayLease) -> bool {
    held.owner.as_deref() == Some(lease.owner.as_str()) && held.epoch == lease.epoch
}

#[async_trait]
impl ReplayStore for MemoryReplayStore {
    async fn create(
        &self,
        record: &ReplayRecord,
        owner: &str,
        duration: Duration,
    ) -> Result<Option<ReplayLease>> {
        let mut records = self.records.lock();
        if records.contains_key(record.id()) {
            return Ok(None);
        }
        let held = MemoryLease {
            owner: Some(owner.to_owned()),
            epoch: 1,
            until: Some(Instant::now() + duration),
        };
        records.insert(record.id().to_owned(), (record.clone(), held));
        Ok(Some(ReplayLease {
            owner: owner.to_owned(),
            epoch: 1,
        }))
    }

    async fn save(&self, record: &ReplayRecord, lease: &ReplayLease) -> Result<bool> {
        let mut records = self.records.lock();
        match records.get_mut(record.id()) {
            Some((stored, held)) if holds(held, lease) => {
                *stored = record.clone();
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn load(&self, id: &str) -> Result<Option<ReplayRecord>> {
        Ok(self
            .records
            .lock()
            .get(id)
            .map(|(record, _)| record.clone()))
    }

    async fn list(&self) -> Result<Vec<ReplayRecord>> {
        Ok(self
            .records
            .lock()
            .values()
            .map(|(record, _)| record.clone())
            .collect())
    }

    async fn remove(&self, id: &str) -> Result<bool> {
        Ok(self.records.lock().remove(id).is_some())
    }

    async fn claim(
        &self,
        id: &str,
        owner: &str,
        duration: Duration,
    ) -> Result<Option<ReplayLease>> {
        let mut records = self.records.lock();
        let Some((_, held)) = records.get_mut(id) else {
            return Ok(None);
        };
        let now = Instant::now();
        let free = match (&held.owner, held.until) {
            (None, _) => true,
            (Some(holder), until) => holder == owner || until.is_none_or(|until| until < now),
        };
        if !free {
            return Ok(None);
        }
        held.owner = Some(owner.to_owned());
        held.epoch += 1;
        held.until = Some(now + duration);
        Ok(Some(ReplayLease {
            owner: owner.to_owned(),
            epoch: held.epoch,
        }))
    }

    async fn renew(&self, id: &str, lease: &ReplayLease, duration: Duration) -> Result<bool> {
        let mut records = self.records.lock();
        match records.get_mut(id) {
            Some((_, held)) if holds(held, lease) => {
                held.until = Some(Instant::now() + duration);
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn release(&self, id: &str, lease: &ReplayLease) -> Result<()> {
        if let Some((_, held)) = self.records.lock().get_mut(id)
            && holds(held, lease)
        {
            held.owner = None;
            held.until = None;
        }
        Ok(())
    }
}
