//! Where dead letters are kept for management: the store trait and the in-memory store.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use parking_lot::Mutex;

use super::letter::DeadLetter;
use crate::error::{Error, Result};
use crate::runner::DeadLetterReason;

/// Where a stored dead letter stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EntryStatus {
    /// Waiting: for its next automatic re-drive (when `next_attempt_at` is set) or for an
    /// operator.
    Pending,
    /// Automatic re-drives are used up, or cannot help: kept until an operator reprocesses,
    /// discards or purges it.
    Parked,
    /// Discarded by an operator (kept, with the reason, until purged).
    Discarded,
}

impl EntryStatus {
    /// The status as stored and shown.
    pub const fn as_str(self) -> &'static str {
        match self {
            EntryStatus::Pending => "pending",
            EntryStatus::Parked => "parked",
            EntryStatus::Discarded => "discarded",
        }
    }

    /// Parse [`EntryStatus::as_str`]'s output.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`](crate::ErrorKind::InvalidInput) for anything else.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "pending" => Ok(EntryStatus::Pending),
            "parked" => Ok(EntryStatus::Parked),
            "discarded" => Ok(EntryStatus::Discarded),
            other => Err(Error::invalid_input(format!(
                "unknown DLQ entry status {other:?}; expected pending, parked or discarded"
            ))),
        }
    }
}

/// A dead letter as the store keeps it: the letter and the processor's bookkeeping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredDeadLetter {
    /// The dead letter.
    pub letter: DeadLetter,
    /// Where it stands.
    pub status: EntryStatus,
    /// Automatic re-drive attempts the processor has made for this entry.
    pub retries: u32,
    /// When the processor re-drives it next (`None`: not automatically).
    pub next_attempt_at: Option<SystemTime>,
    /// The processor's last re-drive error, if one failed.
    pub last_error: Option<String>,
    /// Why an operator discarded it.
    pub discard_reason: Option<String>,
    /// When the store received it.
    pub stored_at: SystemTime,
    /// How many times the store has written the entry since it was inserted: an update or
    /// a removal names the version it read and takes effect only while the entry is still
    /// at it, so nothing writes back a stale copy.
    pub version: u64,
    /// Until when a re-drive holds the entry (an automatic attempt, a reprocess or a bulk
    /// redrive): while it does, nothing else re-drives or discards it. A holder that dies
    /// lets go when this time passes.
    pub claimed_until: Option<SystemTime>,
}

impl StoredDeadLetter {
    /// A freshly received letter: pending, no re-drive scheduled.
    pub fn received(letter: DeadLetter, now: SystemTime) -> Self {
        StoredDeadLetter {
            letter,
            status: EntryStatus::Pending,
            retries: 0,
            next_attempt_at: None,
            last_error: None,
            discard_reason: None,
            stored_at: now,
            version: 0,
            claimed_until: None,
        }
    }

    /// The entry's id (the dead letter's).
    pub fn id(&self) -> &str {
        &self.letter.id
    }

    /// Whether a re-drive holds the entry at `now`.
    pub fn is_claimed(&self, now: SystemTime) -> bool {
        self.claimed_until.is_some_and(|until| until > now)
    }

    /// Whether a re-drive may claim the entry at `now`: it is not discarded and nothing
    /// holds it.
    pub fn claimable(&self, now: SystemTime) -> bool {
        self.status != EntryStatus::Discarded && !self.is_claimed(now)
    }
}

/// Which entries an operation covers. Every field set must match; an empty filter matches
/// everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeadLetterFilter {
    /// The topic the message failed on.
    pub topic: Option<String>,
    /// Why it was dead-lettered.
    pub reason: Option<DeadLetterReason>,
    /// Its message type (the `type` header).
    pub message_type: Option<String>,
    /// Its status.
    pub status: Option<EntryStatus>,
    /// The failed message's own id.
    pub original_id: Option<String>,
    /// Dead-lettered at or after this time.
    pub from: Option<SystemTime>,
    /// Dead-lettered before this time.
    pub to: Option<SystemTime>,
    /// Leave discarded entries out: what the DLQ depth (the `messaging_dlq_messages_total`
    /// gauge, [`DeadLetterStats::depth`]) counts. The admin API sets it when a listing,
    /// failure groups or a redrive ask for no `status`; a bulk redrive always selects so
    /// (discarded entries are never re-driven). With `status` discarded, nothing matches.
    pub exclude_discarded: bool,
}

impl DeadLetterFilter {
    /// Whether `entry` matches.
    pub fn matches(&self, entry: &StoredDeadLetter) -> bool {
        let l = &entry.letter;
        self.topic.as_ref().is_none_or(|t| *t == l.original_topic)
            && self.reason.is_none_or(|r| r == l.reason)
            && self
                .message_type
                .as_deref()
                .is_none_or(|t| l.message_type() == Some(t))
            && self.status.is_none_or(|s| s == entry.status)
            && self
                .original_id
                .as_deref()
                .is_none_or(|id| l.message.id() == id)
            && self.from.is_none_or(|t| l.last_failure_at >= t)
            && self.to.is_none_or(|t| l.last_failure_at < t)
            && !(self.exclude_discarded && entry.status == EntryStatus::Discarded)
    }
}

/// Microseconds since the epoch: the precision the SQL stores keep times in, so grouping
/// ties break the same way on every store.
fn micros(t: SystemTime) -> i64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// Failures sharing a reason and topic: the "what is breaking" view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailureGroup {
    /// The reason.
    pub reason: DeadLetterReason,
    /// The topic the messages failed on.
    pub topic: String,
    /// How many entries.
    pub count: u64,
    /// Earliest dead-lettering among them.
    pub oldest: SystemTime,
    /// Latest dead-lettering among them.
    pub newest: SystemTime,
    /// The error text of the latest one (of two at the same time, the one with the greater id;
    /// the same on every store).
    pub sample_error: String,
}

/// Size and age of the DLQ (entries not discarded).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeadLetterStats {
    /// Pending and parked entries.
    pub depth: u64,
    /// Parked entries.
    pub parked: u64,
    /// When the oldest of them was dead-lettered.
    pub oldest: Option<SystemTime>,
}

/// Keeps dead letters for the [`Processor`](super::Processor) and its management operations.
///
/// Listings are ordered by dead-lettering time, then id: oldest first. Implementations: the in-memory
/// [`MemoryDeadLetterStore`]; in `helix-messaging-store`, the durable `SqliteDeadLetterStore`
/// (feature `sqlite`) and `PostgresDeadLetterStore` (feature `postgres`), shared by several
/// instances.
#[async_trait]
pub trait DeadLetterStore: Send + Sync + 'static {
    /// Store `entry` unless one with its id exists; whether it was stored. Durable stores
    /// return only once it is on disk.
    ///
    /// # Errors
    /// The store's error.
    async fn insert(&self, entry: StoredDeadLetter) -> Result<bool>;

    /// The entry with this id.
    ///
    /// # Errors
    /// The store's error.
    async fn get(&self, id: &str) -> Result<Option<StoredDeadLetter>>;

    /// The entries with these ids that exist, in the order given (one read where the store
    /// can).
    ///
    /// # Errors
    /// The store's error.
    async fn get_many(&self, ids: &[String]) -> Result<Vec<StoredDeadLetter>> {
        let mut found = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(entry) = self.get(id).await? {
                found.push(entry);
            }
        }
        Ok(found)
    }

    /// Up to `limit` entries matching `filter`, skipping the first `offset`.
    ///
    /// # Errors
    /// The store's error.
    async fn list(
        &self,
        filter: &DeadLetterFilter,
        limit: usize,
        offset: usize,
    ) -> Result<Vec<StoredDeadLetter>>;

    /// How many entries match `filter`.
    ///
    /// # Errors
    /// The store's error.
    async fn count(&self, filter: &DeadLetterFilter) -> Result<u64>;

    /// [`list`](DeadLetterStore::list) and [`count`](DeadLetterStore::count) of `filter` as
    /// one consistent read: the count is of the same state of the store the page was read
    /// from. The stores here all keep that promise (the memory store under one lock, SQLite
    /// in one read transaction, PostgreSQL in one `REPEATABLE READ` transaction); this
    /// default, for stores that cannot, reads one after the other, and the two may then
    /// disagree by what changed in between.
    ///
    /// # Errors
    /// The store's error.
    async fn page(
        &self,
        filter: &DeadLetterFilter,
        limit: usize,
        offset: usize,
    ) -> Result<(Vec<StoredDeadLetter>, u64)> {
        let entries = self.list(filter, limit, offset).await?;
        let count = self.count(filter).await?;
        Ok((entries, count))
    }

    /// The ids of every entry matching `filter`, in listing order.
    ///
    /// # Errors
    /// The store's error.
    async fn ids(&self, filter: &DeadLetterFilter) -> Result<Vec<String>>;

    /// Claim up to `limit` pending entries whose automatic re-drive is due at `now` and that
    /// nothing holds, earliest first. In the same atomic step each is held until
    /// `now + lease` ([`StoredDeadLetter::claimed_until`]), its next attempt moves there
    /// too and its version goes up by one; the entries are returned as stored after that
    /// step. Another processor sharing the store does not claim them too, and an entry
    /// whose processor dies comes due again after the lease.
    ///
    /// # Errors
    /// The store's error.
    async fn claim_due(
        &self,
        now: SystemTime,
        lease: Duration,
        limit: usize,
    ) -> Result<Vec<StoredDeadLetter>>;

    /// Claim, in one atomic step, those of the entries `ids` that exist, are not discarded
    /// and that nothing holds at `now` ([`StoredDeadLetter::claimable`]): each is held until
    /// `now + lease` and its version goes up by one. Returns them as stored after that step,
    /// in the order of `ids`; the others are left as they are.
    ///
    /// # Errors
    /// The store's error.
    async fn claim(
        &self,
        ids: &[String],
        now: SystemTime,
        lease: Duration,
    ) -> Result<Vec<StoredDeadLetter>>;

    /// Replace the stored entry with `entry` if the stored one is still at
    /// `entry.version`; the stored copy's version becomes `entry.version + 1`. Whether it
    /// was replaced: `false` when the entry is gone or was written since `entry` was read.
    ///
    /// # Errors
    /// The store's error.
    async fn update(&self, entry: &StoredDeadLetter) -> Result<bool>;

    /// Remove the entry `id` if it is still at `version`; whether it was removed.
    ///
    /// # Errors
    /// The store's error.
    async fn remove(&self, id: &str, version: u64) -> Result<bool>;

    /// Remove every entry of `entries` (id and version) still at its version, in one
    /// durable write where the store can; how many were removed.
    ///
    /// # Errors
    /// The store's error.
    async fn remove_many(&self, entries: &[(String, u64)]) -> Result<u64> {
        let mut removed = 0;
        for (id, version) in entries {
            removed += u64::from(self.remove(id, *version).await?);
        }
        Ok(removed)
    }

    /// Remove every entry matching `filter`; how many.
    ///
    /// # Errors
    /// The store's error.
    async fn purge(&self, filter: &DeadLetterFilter) -> Result<u64>;

    /// Entries matching `filter` grouped by reason and topic, largest group first.
    ///
    /// # Errors
    /// The store's error.
    async fn groups(&self, filter: &DeadLetterFilter) -> Result<Vec<FailureGroup>>;

    /// Depth and age of what is not discarded.
    ///
    /// # Errors
    /// The store's error.
    async fn stats(&self) -> Result<DeadLetterStats>;
}

/// Holds `entry` for a re-drive until `until` (the in-process stores' claim).
fn hold(entry: &mut StoredDeadLetter, until: SystemTime) {
    entry.claimed_until = Some(until);
    entry.version += 1;
}

/// Groups `entries` by reason and topic (shared by stores that filter in process).
pub(crate) fn group_entries<'a>(
    entries: impl Iterator<Item = &'a StoredDeadLetter>,
) -> Vec<FailureGroup> {
    // Each group with the id of the entry its sample error is from.
    let mut groups: BTreeMap<(&'static str, String), (FailureGroup, &'a str)> = BTreeMap::new();
    for entry in entries {
        let l = &entry.letter;
        let at = l.last_failure_at;
        groups
            .entry((l.reason.as_str(), l.original_topic.clone()))
            .and_modify(|(g, sample_id)| {
                g.count += 1;
                g.oldest = g.oldest.min(at);
                // Compared at the microseconds the SQL stores keep, so all stores agree.
                if (micros(at), l.id.as_str()) > (micros(g.newest), *sample_id) {
                    g.newest = at;
                    g.sample_error.clone_from(&l.error);
                    *sample_id = &l.id;
                }
            })
            .or_insert_with(|| {
                let group = FailureGroup {
                    reason: l.reason,
                    topic: l.original_topic.clone(),
                    count: 1,
                    oldest: at,
                    newest: at,
                    sample_error: l.error.clone(),
                };
                (group, &l.id)
            });
    }
    let mut groups: Vec<FailureGroup> = groups.into_values().map(|(g, _)| g).collect();
    groups.sort_by(|a, b| b.count.cmp(&a.count).then(a.topic.cmp(&b.topic)));
    groups
}

/// Dead letters kept in this process: for tests, the memory backend and applications that
/// accept losing the DLQ's bookkeeping with the process (the DLQ topic still holds the
/// letters on a durable broker).
#[derive(Debug, Default)]
pub struct MemoryDeadLetterStore {
    inner: Mutex<Entries>,
}

#[derive(Debug, Default)]
struct Entries {
    /// By (dead-lettered at, id): the listing order.
    by_time: BTreeMap<(SystemTime, String), StoredDeadLetter>,
    /// Id to its key in `by_time`.
    by_id: std::collections::HashMap<String, SystemTime>,
}

impl Entries {
    fn key_of(&self, id: &str) -> Option<(SystemTime, String)> {
        self.by_id.get(id).map(|t| (*t, id.to_owned()))
    }

    fn put(&mut self, entry: StoredDeadLetter) {
        let at = entry.letter.last_failure_at;
        self.by_id.insert(entry.letter.id.clone(), at);
        self.by_time.insert((at, entry.letter.id.clone()), entry);
    }

    fn get_mut(&mut self, id: &str) -> Option<&mut StoredDeadLetter> {
        let key = self.key_of(id)?;
        self.by_time.get_mut(&key)
    }

    fn take(&mut self, id: &str) -> Option<StoredDeadLetter> {
        let key = self.key_of(id)?;
        self.by_id.remove(id);
        self.by_time.remove(&key)
    }

    fn matching<'a>(
        &'a self,
        filter: &'a DeadLetterFilter,
    ) -> impl Iterator<Item = &'a StoredDeadLetter> + 'a {
        self.by_time.values().filter(move |e| filter.matches(e))
    }
}

impl MemoryDeadLetterStore {
    /// An empty store.
    pub fn new() -> Self {
        MemoryDeadLetterStore::default()
    }
}

#[async_trait]
impl DeadLetterStore for MemoryDeadLetterStore {
    async fn insert(&self, entry: StoredDeadLetter) -> Result<bool> {
        let mut entries = self.inner.lock();
        if entries.by_id.contains_key(entry.id()) {
            return Ok(false);
        }
        entries.put(entry);
        Ok(true)
    }

    async fn get(&self, id: &str) -> Result<Option<StoredDeadLetter>> {
        let entries = self.inner.lock();
        Ok(entries
            .key_of(id)
            .and_then(|k| entries.by_time.get(&k).cloned()))
    }

    async fn list(
        &self,
        filter: &DeadLetterFilter,
        limit: usize,
        offset: usize,
    ) -> Result<Vec<StoredDeadLetter>> {
        let entries = self.inner.lock();
        Ok(entries
            .matching(filter)
            .skip(offset)
            .take(limit)
            .cloned()
            .collect())
    }

    async fn count(&self, filter: &DeadLetterFilter) -> Result<u64> {
        Ok(self.inner.lock().matching(filter).count() as u64)
    }

    async fn page(
        &self,
        filter: &DeadLetterFilter,
        limit: usize,
        offset: usize,
    ) -> Result<(Vec<StoredDeadLetter>, u64)> {
        let entries = self.inner.lock();
        let page = entries
            .matching(filter)
            .skip(offset)
            .take(limit)
            .cloned()
            .collect();
        Ok((page, entries.matching(filter).count() as u64))
    }

    async fn ids(&self, filter: &DeadLetterFilter) -> Result<Vec<String>> {
        let entries = self.inner.lock();
        Ok(entries
            .matching(filter)
            .map(|e| e.letter.id.clone())
            .collect())
    }

    async fn claim_due(
        &self,
        now: SystemTime,
        lease: Duration,
        limit: usize,
    ) -> Result<Vec<StoredDeadLetter>> {
        let mut entries = self.inner.lock();
        let mut due: Vec<(SystemTime, String)> = entries
            .by_time
            .values()
            .filter(|e| {
                e.status == EntryStatus::Pending
                    && e.next_attempt_at.is_some_and(|t| t <= now)
                    && !e.is_claimed(now)
            })
            .map(|e| (e.next_attempt_at.unwrap_or(now), e.letter.id.clone()))
            .collect();
        due.sort();
        due.truncate(limit);
        let mut claimed = Vec::with_capacity(due.len());
        for (_, id) in due {
            if let Some(entry) = entries.get_mut(&id) {
                entry.next_attempt_at = Some(now + lease);
                hold(entry, now + lease);
                claimed.push(entry.clone());
            }
        }
        Ok(claimed)
    }

    async fn claim(
        &self,
        ids: &[String],
        now: SystemTime,
        lease: Duration,
    ) -> Result<Vec<StoredDeadLetter>> {
        let mut entries = self.inner.lock();
        let mut claimed = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(entry) = entries.get_mut(id).filter(|e| e.claimable(now)) {
                hold(entry, now + lease);
                claimed.push(entry.clone());
            }
        }
        Ok(claimed)
    }

    async fn update(&self, entry: &StoredDeadLetter) -> Result<bool> {
        let mut entries = self.inner.lock();
        if entries.get_mut(entry.id()).map(|e| e.version) != Some(entry.version) {
            return Ok(false);
        }
        entries.take(entry.id());
        let mut written = entry.clone();
        written.version += 1;
        entries.put(written);
        Ok(true)
    }

    async fn remove(&self, id: &str, version: u64) -> Result<bool> {
        let mut entries = self.inner.lock();
        if entries.get_mut(id).map(|e| e.version) != Some(version) {
            return Ok(false);
        }
        Ok(entries.take(id).is_some())
    }

    async fn purge(&self, filter: &DeadLetterFilter) -> Result<u64> {
        let mut entries = self.inner.lock();
        let ids: Vec<String> = entries
            .matching(filter)
            .map(|e| e.letter.id.clone())
            .collect();
        for id in &ids {
            entries.take(id);
        }
        Ok(ids.len() as u64)
    }

    async fn groups(&self, filter: &DeadLetterFilter) -> Result<Vec<FailureGroup>> {
        Ok(group_entries(self.inner.lock().matching(filter)))
    }

    async fn stats(&self) -> Result<DeadLetterStats> {
        let entries = self.inner.lock();
        let mut stats = DeadLetterStats::default();
        for e in entries
            .by_time
            .values()
            .filter(|e| e.status != EntryStatus::Discarded)
        {
            stats.depth += 1;
            if e.status == EntryStatus::Parked {
                stats.parked += 1;
            }
            let at = e.letter.last_failure_at;
            stats.oldest = Some(stats.oldest.map_or(at, |o| o.min(at)));
        }
        Ok(stats)
    }
}

/// Remove re-driven entries from the store, trying a few times over about a second: a
/// store that fails here leaves entries already published in the DLQ.
pub(super) async fn remove_redriven(
    store: &dyn DeadLetterStore,
    entries: &[(String, u64)],
) -> Result<()> {
    use backon::Retryable;
    let backoff = backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_times(3);
    (|| store.remove_many(entries))
        .retry(backoff)
        .await
        .map(|_| ())
        .map_err(|err| {
            Error::new(
                err.kind(),
                format!(
                    "the DLQ removal of {} re-driven entries failed: {err}",
                    entries.len()
                ),
            )
            .with_source(err)
        })
}
