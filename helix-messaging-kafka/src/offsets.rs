//! Offset bookkeeping of a group consumer: which records of each assigned partition are
//! unsettled, with the attempts made on them, and the commit point each partition has
//! reached.
//!
//! Offsets are committed only up to the lowest unsettled offset of each partition: an ack out
//! of order never commits past a message still in flight. The adapter stores that offset with
//! librdkafka on every settlement; librdkafka commits what is stored every second, and the
//! adapter commits synchronously when a partition is revoked and when the subscription ends.
//!
//! Apart from the consumer it serves, like the memory backend's state: nothing here awaits or
//! talks to the broker. The rebalance callbacks, the reader and the ackers do the I/O with
//! what it returns, so the bookkeeping runs under one short lock and is tested without a
//! broker.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::SystemTime;

use helix_messaging_core::{Error, ErrorKind, Result};
use parking_lot::Mutex;
use tokio::sync::watch;

use crate::attempts::{OffsetNote, offset_metadata, parse_attempts_metadata};

/// The records of one partition handed out (or buffered) and not settled yet, in offset
/// order, each with the attempts made on it so far: by this owner's application, or by
/// earlier owners for a record not received here yet.
///
/// A fetch returns a partition's records in offset order and most settle in about that
/// order: registering is an append, a settlement a binary search, and the settled records at
/// the front are dropped as they come. This runs for every record, twice; two B-trees (the
/// unsettled offsets, and the attempts of those received) cost several times as much.
#[derive(Default)]
struct Unsettled {
    slots: VecDeque<Slot>,
    /// Settled slots behind the front (which is never settled), dropped in one pass once
    /// they are half of all.
    settled_inside: usize,
}

#[derive(Clone, Copy)]
struct Slot {
    offset: i64,
    state: SlotState,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum SlotState {
    /// Registered, not received by the application yet; the attempts earlier owners made
    /// (0 if none), which a commit must keep carrying until this owner settles it.
    Buffered(u32),
    /// Received by the application at this attempt.
    Received(u32),
    Settled,
}

impl Unsettled {
    fn find(&self, offset: i64) -> Result<usize, usize> {
        // A partition's offsets are mostly consecutive: look where it would be first.
        let guess = self
            .slots
            .front()
            .and_then(|front| offset.checked_sub(front.offset))
            .and_then(|distance| usize::try_from(distance).ok());
        if let Some(i) = guess
            && self.slots.get(i).is_some_and(|slot| slot.offset == offset)
        {
            return Ok(i);
        }
        self.slots.binary_search_by_key(&offset, |slot| slot.offset)
    }

    /// Register `offset` as unsettled, with `earlier` attempts made on it by earlier owners;
    /// one already unsettled is left as it is.
    fn insert(&mut self, offset: i64, earlier: u32) {
        let state = SlotState::Buffered(earlier);
        if self.slots.back().is_none_or(|last| last.offset < offset) {
            self.slots.push_back(Slot { offset, state });
            return;
        }
        match self.find(offset) {
            Ok(i) => {
                if self.slots[i].state == SlotState::Settled {
                    self.slots[i].state = state;
                    self.settled_inside -= 1;
                }
            }
            Err(i) => self.slots.insert(i, Slot { offset, state }),
        }
    }

    /// The application received `offset` at `attempt`; `false` if it is not unsettled.
    fn received(&mut self, offset: i64, attempt: u32) -> bool {
        match self.find(offset) {
            Ok(i) if self.slots[i].state != SlotState::Settled => {
                self.slots[i].state = SlotState::Received(attempt);
                true
            }
            _ => false,
        }
    }

    /// Mark `offset` settled (nothing if it is not unsettled).
    fn settle(&mut self, offset: i64) {
        let Ok(i) = self.find(offset) else { return };
        if self.slots[i].state == SlotState::Settled {
            return;
        }
        if i > 0 {
            self.slots[i].state = SlotState::Settled;
            self.settled_inside += 1;
            // A front the application holds must not keep every later settled slot.
            if self.settled_inside > 64 && self.settled_inside * 2 > self.slots.len() {
                self.slots.retain(|slot| slot.state != SlotState::Settled);
                self.settled_inside = 0;
            }
            return;
        }
        self.slots.pop_front();
        while self
            .slots
            .front()
            .is_some_and(|slot| slot.state == SlotState::Settled)
        {
            self.slots.pop_front();
            self.settled_inside -= 1;
        }
    }

    /// The lowest unsettled offset.
    fn first(&self) -> Option<i64> {
        self.slots.front().map(|slot| slot.offset)
    }

    /// Ranges of offsets (inclusive) settled above the lowest unsettled one, up to
    /// `below`: the gaps between the unsettled records. Every record below `below` was
    /// registered as it arrived, so an offset in a gap is a settled record (or none at all).
    fn settled_gaps(&self, below: i64) -> impl Iterator<Item = (i64, i64)> + '_ {
        let mut open = self
            .slots
            .iter()
            .filter(|slot| slot.state != SlotState::Settled)
            .map(|slot| slot.offset)
            .chain(std::iter::once(below))
            .peekable();
        std::iter::from_fn(move || {
            loop {
                let at = open.next()?;
                let next = *open.peek()?;
                if next > at + 1 {
                    return Some((at + 1, next - 1));
                }
            }
        })
    }

    /// `(offset, attempts)` of the unsettled records attempted so far: received by the
    /// application here, or by an earlier owner's.
    fn attempts(&self) -> impl Iterator<Item = (i64, u32)> + '_ {
        self.slots.iter().filter_map(|slot| match slot.state {
            SlotState::Received(attempt) | SlotState::Buffered(attempt) if attempt > 0 => {
                Some((slot.offset, attempt))
            }
            _ => None,
        })
    }
}

/// Offsets of one assigned partition.
struct Tracker {
    /// Which assignment this is: settlements from an earlier one are refused.
    generation: u64,
    /// Records handed out (or buffered) and not settled yet, with the attempt each had
    /// reached when the application received it.
    unsettled: Unsettled,
    /// The offset after the highest one received, or the start position; `None` when
    /// librdkafka resolved the start itself and nothing has arrived yet.
    next: Option<i64>,
    /// The offset last stored for commit.
    stored: i64,
    /// Attempts made by earlier owners on records not registered here yet, read from the
    /// committed offset's metadata.
    prior: BTreeMap<i64, u32>,
    /// Ranges of offsets (inclusive, in order) an earlier owner settled above its commit
    /// point: not delivered again here.
    prior_settled: Vec<(i64, i64)>,
    /// A start by time on a broker without a timestamp index: records below the offset that
    /// was the end of the partition when the group started, and stamped before the time, are
    /// history the group must skip. Live records are never filtered.
    history_filter: Option<(i64, SystemTime)>,
}

impl Tracker {
    fn new(
        generation: u64,
        start: Option<i64>,
        metadata: Option<&str>,
        history_filter: Option<(i64, SystemTime)>,
    ) -> Self {
        let prior = metadata.map(parse_attempts_metadata).unwrap_or_default();
        Tracker {
            generation,
            unsettled: Unsettled::default(),
            next: start,
            stored: start.unwrap_or(i64::MIN),
            prior: prior.attempts,
            prior_settled: prior.settled,
            history_filter,
        }
    }

    /// The metadata committed with the commit point: the attempts of records still out,
    /// including those an earlier owner made on records this owner has not received (or not
    /// even fetched) yet; dropping those would restart their count at 1 with the next owner.
    ///
    /// It also names the records settled above the commit point (acked past one still out,
    /// here or by an earlier owner), so the next owner does not deliver them again: a commit
    /// is one offset per partition, and without this every acked record behind one held
    /// message would come back. Revocations and a subscription's end commit it as it is;
    /// the periodic commit stores it only when the commit point moves, so after a crash the
    /// next owner knows what the last such commit said (the rest comes back: at least
    /// once).
    fn metadata(&self) -> String {
        let below = self.next.unwrap_or(i64::MIN);
        let settled_here = self
            .unsettled
            .settled_gaps(below)
            .map(|(from, to)| (from, OffsetNote::Settled(to)));
        let settled_before = self
            .prior_settled
            .iter()
            .filter(|(_, to)| *to >= below)
            .map(|&(from, to)| (from.max(below), OffsetNote::Settled(to)));
        let attempts = self
            .unsettled
            .attempts()
            .map(|(offset, attempts)| (offset, OffsetNote::Attempts(attempts)));
        let prior = self
            .prior
            .iter()
            .map(|(offset, attempts)| (*offset, OffsetNote::Attempts(*attempts)));
        let mut all: Vec<(i64, OffsetNote)> = attempts
            .chain(settled_here)
            .chain(prior)
            .chain(settled_before)
            .collect();
        // Lowest first: past the size limit, the entries for the next owner's first
        // records are the ones kept.
        all.sort_unstable_by_key(|(offset, _)| *offset);
        offset_metadata(all)
    }

    /// Register `offset` as unsettled: the attempts earlier owners made on it (0 if none),
    /// or `None` if an earlier owner settled it already.
    fn register(&mut self, offset: i64) -> Option<u32> {
        let earlier = self.prior.remove(&offset).unwrap_or(0);
        self.unsettled.insert(offset, earlier);
        self.next = Some(self.next.map_or(offset + 1, |n| n.max(offset + 1)));
        let at = self.prior_settled.partition_point(|(_, to)| *to < offset);
        let settled = self
            .prior_settled
            .get(at)
            .is_some_and(|(from, _)| *from <= offset);
        (!settled).then_some(earlier)
    }

    /// Everything below this offset is settled; `None` while it is not known.
    fn commit_point(&self) -> Option<i64> {
        self.unsettled.first().or(self.next)
    }
}

/// A partition of a new assignment: where it starts (`None`: where librdkafka resolves it),
/// the metadata committed with its offset, and its history filter (see
/// [`Tracker::history_filter`]).
pub(crate) type Assigned = (i32, Option<i64>, Option<String>, Option<(i64, SystemTime)>);

/// A partition's commit point and the metadata to commit with it (see [`Tracker::metadata`]):
/// what is stored or committed.
pub(crate) type Commit = (i32, i64, String);

/// What a subscription's rebalance callback and its deliveries share.
pub(crate) struct GroupState {
    topic: String,
    partitions: Mutex<BTreeMap<i32, Tracker>>,
    generation: AtomicU64,
    /// Set when a settlement moved a commit point that is not stored yet.
    unstored: AtomicBool,
    /// Counts assignments, so `subscribe` can wait for the first.
    assignments: watch::Sender<u64>,
}

impl GroupState {
    pub(crate) fn new(topic: String) -> Arc<Self> {
        Arc::new(GroupState {
            topic,
            partitions: Mutex::default(),
            generation: AtomicU64::new(0),
            unstored: AtomicBool::new(false),
            assignments: watch::Sender::new(0),
        })
    }

    /// The topic, as the broker names it.
    pub(crate) fn topic(&self) -> &str {
        &self.topic
    }

    /// Sees the count of assignments change (see [`GroupState::assigned`]).
    pub(crate) fn assignments(&self) -> watch::Receiver<u64> {
        self.assignments.subscribe()
    }

    /// Count an assignment the consumer has taken.
    pub(crate) fn assigned(&self) {
        self.assignments.send_modify(|n| *n += 1);
    }

    /// Begin an assignment: its generation, above every earlier one's.
    pub(crate) fn next_generation(&self) -> u64 {
        self.generation.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// Track the partitions of assignment `generation`.
    pub(crate) fn track(&self, generation: u64, assigned: Vec<Assigned>) {
        let mut partitions = self.partitions.lock();
        for (partition, start, metadata, filter) in assigned {
            let tracker = Tracker::new(generation, start, metadata.as_deref(), filter);
            partitions.insert(partition, tracker);
        }
    }

    /// Stop tracking the revoked `partitions`: the commit point of each that has one, to
    /// commit.
    pub(crate) fn revoke(&self, revoked: impl IntoIterator<Item = i32>) -> Vec<Commit> {
        let mut store = Vec::new();
        let mut partitions = self.partitions.lock();
        for partition in revoked {
            let Some(tracker) = partitions.remove(&partition) else {
                continue;
            };
            let point = tracker.commit_point();
            tracing::debug!(topic = %self.topic, partition, ?point, "partition revoked");
            if let Some(point) = point {
                store.push((partition, point, tracker.metadata()));
            }
        }
        store
    }

    /// Record that `offset` of `partition` was received, stamped `timestamp`, with
    /// `attempts_in_header` earlier attempts written into the record itself. Returns the
    /// assignment's generation and the record's attempt number, or `None` if the partition
    /// is no longer assigned here; `Skip` if the record is history a start by time excludes.
    pub(crate) fn register(
        &self,
        partition: i32,
        offset: i64,
        timestamp: SystemTime,
        attempts_in_header: u32,
    ) -> Option<Registered> {
        let mut partitions = self.partitions.lock();
        let tracker = partitions.get_mut(&partition)?;
        let Some(earlier) = tracker.register(offset) else {
            return Some(Registered::Skip(tracker.generation));
        };
        let before_start = tracker
            .history_filter
            .is_some_and(|(end, since)| offset < end && timestamp < since);
        if before_start {
            return Some(Registered::Skip(tracker.generation));
        }
        Some(Registered::Deliver {
            generation: tracker.generation,
            attempt: attempts_in_header.max(earlier) + 1,
        })
    }

    /// The application received `offset` of `partition` at `attempt`: the number a later
    /// owner continues from if it is not settled here.
    pub(crate) fn received(&self, partition: i32, offset: i64, attempt: u32) {
        if let Some(tracker) = self.partitions.lock().get_mut(&partition) {
            tracker.unsettled.received(offset, attempt);
        }
    }

    /// Whether deliveries of `partition` from assignment `generation` may still be handed out.
    pub(crate) fn holds(&self, partition: i32, generation: u64) -> bool {
        self.partitions
            .lock()
            .get(&partition)
            .is_some_and(|t| t.generation == generation)
    }

    /// Mark `offset` settled. A commit point that moved is stored by the reader's next
    /// [`GroupState::take_moved`].
    pub(crate) fn settle(&self, partition: i32, offset: i64, generation: u64) -> Result<()> {
        let mut partitions = self.partitions.lock();
        let tracker = partitions
            .get_mut(&partition)
            .filter(|t| t.generation == generation)
            .ok_or_else(|| reassigned(partition, &self.topic))?;
        tracker.unsettled.settle(offset);
        if tracker.commit_point().is_some_and(|p| p > tracker.stored) {
            self.unstored.store(true, Ordering::Release);
        }
        Ok(())
    }

    /// Every commit point that moved since the last call, with its metadata, counted as
    /// stored from now on (see [`GroupState::store_failed`]).
    pub(crate) fn take_moved(&self) -> Vec<Commit> {
        if !self.unstored.swap(false, Ordering::AcqRel) {
            return Vec::new();
        }
        let mut moved = Vec::new();
        let mut partitions = self.partitions.lock();
        for (partition, tracker) in partitions.iter_mut() {
            if let Some(point) = tracker.commit_point().filter(|p| *p > tracker.stored) {
                tracker.stored = point;
                moved.push((*partition, point, tracker.metadata()));
            }
        }
        moved
    }

    /// Storing what [`GroupState::take_moved`] returned failed: the next call tries again.
    pub(crate) fn store_failed(&self) {
        self.unstored.store(true, Ordering::Release);
    }

    /// The commit point of every partition that has one, with its metadata.
    pub(crate) fn commit_points(&self) -> Vec<Commit> {
        let partitions = self.partitions.lock();
        let mut points = Vec::new();
        for (partition, tracker) in partitions.iter() {
            if let Some(point) = tracker.commit_point() {
                points.push((*partition, point, tracker.metadata()));
            }
        }
        points
    }
}

/// What [`GroupState::register`] found out about a received record.
pub(crate) enum Registered {
    /// Hand it out with this attempt number.
    Deliver { generation: u64, attempt: u32 },
    /// Settle it unseen: history before a start by time.
    Skip(u64),
}

/// The error of a settlement of `partition` of `topic` after it was assigned elsewhere.
pub(crate) fn reassigned(partition: i32, topic: &str) -> Error {
    Error::new(
        ErrorKind::NotFound,
        format!(
            "partition {partition} of {topic} was reassigned; its new owner receives this message again"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unsettled(offsets: impl IntoIterator<Item = i64>) -> Unsettled {
        let mut list = Unsettled::default();
        for offset in offsets {
            list.insert(offset, 0);
        }
        list
    }

    #[test]
    fn the_commit_point_waits_for_the_lowest_unsettled_record() {
        let mut list = unsettled(10..15);
        assert_eq!(list.first(), Some(10));
        list.settle(12);
        list.settle(11);
        assert_eq!(
            list.first(),
            Some(10),
            "settled out of order: 10 is still out"
        );
        list.settle(10);
        assert_eq!(list.first(), Some(13), "11 and 12 were settled already");
        list.settle(13);
        list.settle(14);
        assert_eq!(list.first(), None);
        assert_eq!(list.settled_inside, 0);
    }

    #[test]
    fn only_attempted_unsettled_records_carry_their_attempts() {
        let mut list = unsettled([3, 4, 5, 6]);
        assert!(list.received(4, 1));
        assert!(list.received(5, 2));
        assert!(!list.received(9, 1), "never registered");
        list.settle(5);
        assert!(!list.received(5, 3), "settled");
        assert_eq!(list.attempts().collect::<Vec<_>>(), vec![(4, 1)]);
        let notes = |list: &Unsettled| {
            offset_metadata(list.attempts().map(|(o, a)| (o, OffsetNote::Attempts(a))))
        };
        assert_eq!(notes(&list), "helix-attempts:4=1");
        assert_eq!(
            parse_attempts_metadata("helix-attempts:4=1,6-6,7=3,9-12").attempts,
            BTreeMap::from([(4, 1), (7, 3)])
        );
        assert_eq!(notes(&unsettled([1])), "");
    }

    /// An owner that commits before it has received a record an earlier owner attempted
    /// (before fetching it, or with it only prefetched) commits those attempts again.
    #[test]
    fn attempts_inherited_from_an_earlier_owner_are_committed_until_received_here() {
        let mut tracker = Tracker::new(2, Some(3), Some("helix-attempts:3=2,5=1"), None);
        assert_eq!(
            tracker.metadata(),
            "helix-attempts:3=2,5=1",
            "nothing fetched yet"
        );
        assert_eq!(tracker.register(3), Some(2));
        assert_eq!(tracker.register(4), Some(0));
        assert_eq!(
            tracker.metadata(),
            "helix-attempts:3=2,5=1",
            "3 prefetched, not received"
        );
        assert!(tracker.unsettled.received(3, 3));
        assert_eq!(tracker.metadata(), "helix-attempts:3=3,5=1");
        tracker.unsettled.settle(3);
        assert_eq!(tracker.register(5), Some(1));
        assert_eq!(tracker.metadata(), "helix-attempts:5=1");
        assert_eq!(tracker.commit_point(), Some(4));
    }

    /// Records settled above the commit point are named in the metadata, and the next owner
    /// settles them without delivering them again, carrying them on until it has.
    #[test]
    fn records_settled_past_one_still_out_are_not_delivered_to_the_next_owner() {
        let mut first = Tracker::new(1, Some(10), None, None);
        for offset in 10..=15 {
            assert_eq!(first.register(offset), Some(0));
        }
        assert!(first.unsettled.received(10, 1));
        for offset in [11, 12, 14] {
            first.unsettled.settle(offset);
        }
        assert_eq!(first.commit_point(), Some(10));
        let metadata = first.metadata();
        assert_eq!(metadata, "helix-attempts:10=1,11-12,14-14");

        let mut next = Tracker::new(2, Some(10), Some(&metadata), None);
        assert_eq!(
            next.metadata(),
            metadata,
            "carried on before anything is fetched"
        );
        let registered: Vec<Option<u32>> = (10..=15).map(|o| next.register(o)).collect();
        assert_eq!(
            registered,
            vec![Some(1), None, None, Some(0), None, Some(0)],
            "11, 12 and 14 are settled already"
        );
        for offset in [11, 12, 14] {
            next.unsettled.settle(offset);
        }
        assert_eq!(next.metadata(), "helix-attempts:10=1,11-12,14-14");
        next.unsettled.settle(10);
        assert_eq!(next.commit_point(), Some(13));
        assert_eq!(next.metadata(), "helix-attempts:14-14");
    }

    #[test]
    fn a_record_registered_again_or_out_of_order_is_unsettled_once() {
        let mut list = unsettled([5, 7]);
        list.insert(6, 0);
        list.insert(2, 0);
        list.insert(7, 0);
        assert_eq!(
            list.slots.iter().map(|s| s.offset).collect::<Vec<_>>(),
            vec![2, 5, 6, 7]
        );
        list.settle(6);
        list.insert(6, 0);
        for offset in [2, 5, 7] {
            list.settle(offset);
        }
        assert_eq!(
            list.first(),
            Some(6),
            "registered again after its settlement"
        );
    }

    #[test]
    fn a_held_record_does_not_keep_every_later_settlement() {
        let mut list = unsettled(0..10_000);
        assert!(list.received(0, 1));
        for offset in 1..10_000 {
            list.settle(offset);
        }
        assert!(list.slots.len() < 200, "{} slots kept", list.slots.len());
        assert_eq!(list.first(), Some(0));
        assert_eq!(list.attempts().collect::<Vec<_>>(), vec![(0, 1)]);
        list.settle(0);
        assert_eq!(list.first(), None);
        assert_eq!(list.settled_inside, 0);
    }
}
