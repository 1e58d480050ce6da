//! The faulty stores: a [`Spool`], a [`DeadLetterStore`] and a [`ReplayStore`] wrapped so
//! that their calls fail (before they act, after, or late) as a [`FaultSchedule`] says, or
//! while set down. Together because they wrap the plane's stores alike, apart from the
//! harnesses that drive them.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use helix_messaging_core::dlq::{
    DeadLetterFilter, DeadLetterStats, DeadLetterStore, FailureGroup, StoredDeadLetter,
};
use helix_messaging_core::fallback::{RefusedMessage, Spool, SpoolStats, SpooledMessage};
use helix_messaging_core::replay::{ReplayLease, ReplayRecord, ReplayStore};
use helix_messaging_core::{Message, Result};
use parking_lot::Mutex;

use super::schedule::{Fault, FaultSchedule, after_the_fact, faulted, scheduled, transient};

/// A spool whose calls fail as its [`FaultSchedule`] says: an append can fail before it is
/// written or after (see the module docs); the other calls fail before they act.
#[derive(Clone)]
pub struct FaultySpool {
    inner: Arc<dyn Spool>,
    schedule: FaultSchedule,
}

impl std::fmt::Debug for FaultySpool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultySpool")
            .field("schedule", &self.schedule)
            .finish_non_exhaustive()
    }
}

impl FaultySpool {
    /// Wrap `inner`.
    pub fn new(inner: Arc<dyn Spool>, schedule: FaultSchedule) -> Self {
        FaultySpool { inner, schedule }
    }
}

#[async_trait]
impl Spool for FaultySpool {
    async fn append(&self, topic: &str, messages: &[Message]) -> Result<i64> {
        let fault = self.schedule.next("spool append");
        faulted(fault, "spool append", self.inner.append(topic, messages)).await
    }

    async fn oldest(&self, limit: usize) -> Result<Vec<SpooledMessage>> {
        let fault = self.schedule.next("spool read");
        faulted(fault, "spool read", self.inner.oldest(limit)).await
    }

    async fn oldest_after(&self, after: i64, limit: usize) -> Result<Vec<SpooledMessage>> {
        let fault = self.schedule.next("spool read");
        faulted(fault, "spool read", self.inner.oldest_after(after, limit)).await
    }

    async fn remove(&self, seqs: &[i64]) -> Result<()> {
        let fault = self.schedule.next("spool remove");
        faulted(fault, "spool remove", self.inner.remove(seqs)).await
    }

    async fn refuse(&self, seq: i64, reason: &str) -> Result<()> {
        let fault = self.schedule.next("spool set aside");
        faulted(fault, "spool set aside", self.inner.refuse(seq, reason)).await
    }

    async fn refused(&self, limit: usize) -> Result<Vec<RefusedMessage>> {
        self.inner.refused(limit).await
    }

    async fn release_refused(&self, seq: i64, retry: bool) -> Result<bool> {
        self.inner.release_refused(seq, retry).await
    }

    async fn topics(&self) -> Result<HashMap<String, i64>> {
        self.inner.topics().await
    }

    async fn stats(&self) -> Result<SpoolStats> {
        self.inner.stats().await
    }
}

/// A dead-letter store whose calls fail (a retryable connection error, before the call acts)
/// while it is set down, and otherwise as its [`FaultSchedule`] says, if it has one: before
/// the call acts, after it acted (a write done but reported failed), or late. It counts the
/// inserts tried.
#[derive(Debug)]
pub struct FaultyDeadLetterStore<S> {
    inner: S,
    down: AtomicBool,
    /// Only removals fail.
    removals_down: AtomicBool,
    inserts: std::sync::atomic::AtomicU64,
    schedule: Option<FaultSchedule>,
    /// Entries a fault may have left held, with the version they were left at: claimed by a
    /// call reported failed, held anew by an update reported failed, or not let go or
    /// removed because the write failed before it acted.
    stranded: Mutex<std::collections::HashSet<(String, u64)>>,
}

impl<S> FaultyDeadLetterStore<S> {
    /// Wrap `inner`, up.
    pub fn new(inner: S) -> Self {
        FaultyDeadLetterStore {
            inner,
            down: AtomicBool::new(false),
            removals_down: AtomicBool::new(false),
            inserts: std::sync::atomic::AtomicU64::default(),
            schedule: None,
            stranded: Mutex::default(),
        }
    }

    /// The entries a scheduled fault may have left held until their claims run out (as the
    /// processor intends when a store write fails), each with the version it was left at:
    /// an entry written again since is no longer explained by the fault.
    pub fn stranded(&self) -> std::collections::HashSet<(String, u64)> {
        self.stranded.lock().clone()
    }

    fn fault(&self, what: &str) -> Fault {
        scheduled(self.schedule.as_ref(), what)
    }

    fn strand<'a>(&self, entries: impl IntoIterator<Item = (&'a str, u64)>) {
        self.stranded
            .lock()
            .extend(entries.into_iter().map(|(id, v)| (id.to_owned(), v)));
    }

    /// A claim of kind `what`: one that takes effect and is then reported failed strands
    /// what it claimed.
    async fn claim_call(
        &self,
        what: &str,
        call: impl std::future::Future<Output = Result<Vec<StoredDeadLetter>>>,
    ) -> Result<Vec<StoredDeadLetter>> {
        self.check(what)?;
        match self.fault(what) {
            Fault::AfterTheFact => {
                let claimed = call.await?;
                self.strand(claimed.iter().map(|e| (e.id(), e.version)));
                Err(after_the_fact(what))
            }
            fault => faulted(fault, what, call).await,
        }
    }

    /// A write of kind `what` to `entries` (id and the version it names): one that fails
    /// before it acts strands them at that version; `holding` (an update that holds its
    /// entry, at the next version) strands it if the write took effect and was reported
    /// failed.
    async fn write_call<T>(
        &self,
        what: &str,
        entries: &[(&str, u64)],
        holding: Option<(&str, u64)>,
        call: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        self.check(what)?;
        let fault = self.fault(what);
        match fault {
            Fault::Transient => self.strand(entries.iter().copied()),
            Fault::AfterTheFact => self.strand(holding),
            _ => {}
        }
        faulted(fault, what, call).await
    }

    /// Also fail calls as `schedule` says (each kind of call keyed by what it is, so a seed
    /// replays the same faults).
    #[must_use]
    pub fn with_schedule(mut self, schedule: FaultSchedule) -> Self {
        self.schedule = Some(schedule);
        self
    }

    /// Run `call` (a call of kind `what`) as the store's state and schedule say.
    async fn call<T>(
        &self,
        what: &str,
        call: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        self.check(what)?;
        faulted(self.fault(what), what, call).await
    }

    /// Fail every removal from now on (`true`), the other calls passing through, or pass
    /// removals through again.
    pub fn set_removals_down(&self, down: bool) {
        self.removals_down.store(down, Ordering::SeqCst);
    }

    fn check_removal(&self) -> Result<()> {
        if self.removals_down.load(Ordering::SeqCst) {
            Err(transient("a DLQ removal"))
        } else {
            Ok(())
        }
    }

    /// Fail every call from now on (`true`), or pass them through again.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// Inserts tried so far, failed ones included.
    pub fn inserts_tried(&self) -> u64 {
        self.inserts.load(Ordering::SeqCst)
    }

    fn check(&self, what: &str) -> Result<()> {
        if self.down.load(Ordering::SeqCst) {
            Err(transient(what))
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl<S: DeadLetterStore> DeadLetterStore for FaultyDeadLetterStore<S> {
    async fn insert(&self, entry: StoredDeadLetter) -> Result<bool> {
        self.inserts.fetch_add(1, Ordering::SeqCst);
        // Keyed by entry: a report names the entry an insert failed (or only seemed to) for.
        let what = format!("a DLQ insert of {}", entry.id());
        self.call(&what, self.inner.insert(entry)).await
    }

    async fn get(&self, id: &str) -> Result<Option<StoredDeadLetter>> {
        self.call("a DLQ read", self.inner.get(id)).await
    }

    async fn list(
        &self,
        filter: &DeadLetterFilter,
        limit: usize,
        offset: usize,
    ) -> Result<Vec<StoredDeadLetter>> {
        self.call("a DLQ listing", self.inner.list(filter, limit, offset))
            .await
    }

    async fn count(&self, filter: &DeadLetterFilter) -> Result<u64> {
        self.call("a DLQ count", self.inner.count(filter)).await
    }

    async fn ids(&self, filter: &DeadLetterFilter) -> Result<Vec<String>> {
        self.call("a DLQ selection", self.inner.ids(filter)).await
    }

    async fn claim_due(
        &self,
        now: std::time::SystemTime,
        lease: Duration,
        limit: usize,
    ) -> Result<Vec<StoredDeadLetter>> {
        self.claim_call(
            "a DLQ claim of due entries",
            self.inner.claim_due(now, lease, limit),
        )
        .await
    }

    async fn update(&self, entry: &StoredDeadLetter) -> Result<bool> {
        let holding = entry
            .claimed_until
            .filter(|until| *until > std::time::SystemTime::now())
            .map(|_| (entry.id(), entry.version + 1));
        self.write_call(
            "a DLQ update",
            &[(entry.id(), entry.version)],
            holding,
            self.inner.update(entry),
        )
        .await
    }

    async fn claim(
        &self,
        ids: &[String],
        now: std::time::SystemTime,
        lease: Duration,
    ) -> Result<Vec<StoredDeadLetter>> {
        self.claim_call("a DLQ claim", self.inner.claim(ids, now, lease))
            .await
    }

    async fn remove(&self, id: &str, version: u64) -> Result<bool> {
        self.check_removal()?;
        self.write_call(
            "a DLQ removal",
            &[(id, version)],
            None,
            self.inner.remove(id, version),
        )
        .await
    }

    async fn remove_many(&self, entries: &[(String, u64)]) -> Result<u64> {
        self.check_removal()?;
        let named: Vec<(&str, u64)> = entries.iter().map(|(id, v)| (id.as_str(), *v)).collect();
        self.write_call(
            "a DLQ removal",
            &named,
            None,
            self.inner.remove_many(entries),
        )
        .await
    }

    async fn purge(&self, filter: &DeadLetterFilter) -> Result<u64> {
        self.call("a DLQ purge", self.inner.purge(filter)).await
    }

    async fn groups(&self, filter: &DeadLetterFilter) -> Result<Vec<FailureGroup>> {
        self.call("a DLQ grouping", self.inner.groups(filter)).await
    }

    async fn stats(&self) -> Result<DeadLetterStats> {
        self.call("the DLQ's stats", self.inner.stats()).await
    }
}

/// A replay store that lets other tasks run before each call (as a store across a network
/// does) and whose lease claims and renewals fail (a retryable connection error) while set
/// down, the other calls passing through: a handler cut off from the store's leases.
pub struct FaultyReplayStore {
    inner: Arc<dyn ReplayStore>,
    claims_down: AtomicBool,
    schedule: Option<FaultSchedule>,
}

impl std::fmt::Debug for FaultyReplayStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultyReplayStore")
            .field("claims_down", &self.claims_down)
            .finish_non_exhaustive()
    }
}

impl FaultyReplayStore {
    /// Wrap `inner`, up.
    pub fn new(inner: Arc<dyn ReplayStore>) -> Self {
        FaultyReplayStore {
            inner,
            claims_down: AtomicBool::new(false),
            schedule: None,
        }
    }

    /// Also fail calls as `schedule` says: before a call acts, after it acted (a write done
    /// but reported failed), or late; each kind of call keyed by what it is.
    #[must_use]
    pub fn with_schedule(mut self, schedule: FaultSchedule) -> Self {
        self.schedule = Some(schedule);
        self
    }

    /// Run `call` (of kind `what`) as the schedule says, after letting other tasks run.
    async fn call<T>(
        &self,
        what: &str,
        call: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        tokio::task::yield_now().await;
        faulted(scheduled(self.schedule.as_ref(), what), what, call).await
    }

    /// Fail every claim and renewal from now on (`true`), or pass them through again.
    pub fn set_claims_down(&self, down: bool) {
        self.claims_down.store(down, Ordering::SeqCst);
    }
}

#[async_trait]
impl ReplayStore for FaultyReplayStore {
    async fn create(
        &self,
        record: &ReplayRecord,
        owner: &str,
        duration: Duration,
    ) -> Result<Option<ReplayLease>> {
        self.call(
            "a replay creation",
            self.inner.create(record, owner, duration),
        )
        .await
    }

    async fn save(&self, record: &ReplayRecord, lease: &ReplayLease) -> Result<bool> {
        self.call("a replay checkpoint", self.inner.save(record, lease))
            .await
    }

    async fn load(&self, id: &str) -> Result<Option<ReplayRecord>> {
        self.call("a replay read", self.inner.load(id)).await
    }

    async fn list(&self) -> Result<Vec<ReplayRecord>> {
        self.call("a replay listing", self.inner.list()).await
    }

    async fn remove(&self, id: &str) -> Result<bool> {
        self.call("a replay removal", self.inner.remove(id)).await
    }

    async fn claim(
        &self,
        id: &str,
        owner: &str,
        duration: Duration,
    ) -> Result<Option<ReplayLease>> {
        if self.claims_down.load(Ordering::SeqCst) {
            return Err(transient("a replay lease claim"));
        }
        self.call(
            "a replay lease claim",
            self.inner.claim(id, owner, duration),
        )
        .await
    }

    async fn renew(&self, id: &str, lease: &ReplayLease, duration: Duration) -> Result<bool> {
        if self.claims_down.load(Ordering::SeqCst) {
            return Err(transient("a replay lease renewal"));
        }
        self.call(
            "a replay lease renewal",
            self.inner.renew(id, lease, duration),
        )
        .await
    }

    async fn release(&self, id: &str, lease: &ReplayLease) -> Result<()> {
        self.call("a replay lease release", self.inner.release(id, lease))
            .await
    }
}
