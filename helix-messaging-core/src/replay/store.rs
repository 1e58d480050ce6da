//! Where replays keep their progress: the durable record a replay resumes from.

use std::collections::{BTreeMap, HashMap};
use std::time::SystemTime;

use async_trait::async_trait;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::{ReplayProgress, ReplayRequest};
use crate::{Error, ErrorKind, Result};

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

    /// The record as JSON (how the SQL stores keep it).
    #[cfg_attr(not(any(feature = "sqlite", feature = "postgres")), allow(dead_code))]
    pub(crate) fn to_json(&self) -> Result<String> {
        serde_json::to_string(self).map_err(|e| {
            Error::new(
                ErrorKind::Serialization,
                format!("encoding replay {}: {e}", self.id()),
            )
        })
    }

    /// A record from its JSON.
    #[cfg_attr(not(any(feature = "sqlite", feature = "postgres")), allow(dead_code))]
    pub(crate) fn from_json(id: &str, json: &str) -> Result<Self> {
        serde_json::from_str(json).map_err(|e| {
            Error::new(
                ErrorKind::Serialization,
                format!("stored replay {id:?} cannot be decoded: {e}"),
            )
        })
    }
}

/// Durable replay records. Implementations: [`MemoryReplayStore`] (nothing survives the
/// process), `SqliteReplayStore` (feature `sqlite`) and `PostgresReplayStore` (feature
/// `postgres`), each of which can share the DLQ's database.
#[async_trait]
pub trait ReplayStore: Send + Sync + 'static {
    /// Insert or replace the record with this id. Durable when it returns.
    ///
    /// # Errors
    /// The store's error; the record is then as before.
    async fn save(&self, record: &ReplayRecord) -> Result<()>;

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

    /// Take or renew the lease on replay `id` for `owner` until `until`, atomically: it
    /// succeeds when nobody holds it, `owner` already does, or the holder's lease ended
    /// before `now`. Whether `owner` holds it now (false for an unknown id). Handlers sharing
    /// a store run each replay in one of them at a time this way.
    ///
    /// # Errors
    /// The store's error.
    async fn claim(
        &self,
        id: &str,
        owner: &str,
        until: SystemTime,
        now: SystemTime,
    ) -> Result<bool>;

    /// Give up `owner`'s lease on `id`, if it holds it.
    ///
    /// # Errors
    /// The store's error.
    async fn release(&self, id: &str, owner: &str) -> Result<()>;
}

/// Replay records in memory: progress is kept for listing, but nothing survives the process.
#[derive(Debug, Default)]
pub struct MemoryReplayStore {
    records: Mutex<HashMap<String, ReplayRecord>>,
    leases: Mutex<HashMap<String, (String, SystemTime)>>,
}

impl MemoryReplayStore {
    /// An empty store.
    pub fn new() -> Self {
        MemoryReplayStore::default()
    }
}

#[async_trait]
impl ReplayStore for MemoryReplayStore {
    async fn save(&self, record: &ReplayRecord) -> Result<()> {
        self.records
            .lock()
            .insert(record.id().to_owned(), record.clone());
        Ok(())
    }

    async fn load(&self, id: &str) -> Result<Option<ReplayRecord>> {
        Ok(self.records.lock().get(id).cloned())
    }

    async fn list(&self) -> Result<Vec<ReplayRecord>> {
        Ok(self.records.lock().values().cloned().collect())
    }

    async fn remove(&self, id: &str) -> Result<bool> {
        self.leases.lock().remove(id);
        Ok(self.records.lock().remove(id).is_some())
    }

    async fn claim(
        &self,
        id: &str,
        owner: &str,
        until: SystemTime,
        now: SystemTime,
    ) -> Result<bool> {
        if !self.records.lock().contains_key(id) {
            return Ok(false);
        }
        let mut leases = self.leases.lock();
        let free = leases
            .get(id)
            .is_none_or(|(holder, ends)| holder == owner || *ends < now);
        if free {
            leases.insert(id.to_owned(), (owner.to_owned(), until));
        }
        Ok(free)
    }

    async fn release(&self, id: &str, owner: &str) -> Result<()> {
        let mut leases = self.leases.lock();
        if leases.get(id).is_some_and(|(holder, _)| holder == owner) {
            leases.remove(id);
        }
        Ok(())
    }
}
