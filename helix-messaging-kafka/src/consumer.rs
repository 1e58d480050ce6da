//! Group consumers: where a subscription starts, which offsets it commits, and how its
//! deliveries are handed out and settled.
//!
//! Offsets are committed only up to the lowest unsettled offset of each partition: an ack out
//! of order never commits past a message still in flight. The adapter stores that offset with
//! librdkafka on every settlement; librdkafka commits what is stored every second, and the
//! adapter commits synchronously when a partition is revoked and when the subscription ends.
//!
//! On revoke, a partition's trackers are dropped: buffered deliveries of it are discarded and a
//! later settlement of one already handed out fails with [`ErrorKind::NotFound`] (its new owner
//! gets it again from the committed offset).
//!
//! Requeue never writes to the topic (every other group would receive the message again):
//! the record stays unsettled, so no commit passes it, and the reader hands it out again at
//! the head of its buffer with `attempt + 1`. A delivery dropped unsettled is handed out again
//! the same way, so it cannot hold its partition's commits back for good.
//!
//! Attempts survive a change of owner: every commit carries, in the offset's metadata, the
//! attempt each unsettled record had reached when the application received it
//! ([`offset_metadata`]), and the next owner of the partition continues from there. The
//! metadata also names the records settled above the commit point (acked past one still
//! out), which the next owner settles without delivering them again.
//!
//! A delayed requeue writes a copy to the group's own retry topic (`<topic>.retry.<group>`,
//! read by the group's members in the group `<group>.helix-retry`) carrying the attempts so far
//! and the time it is due, and then settles the original. A member reading a copy that is
//! not due yet holds it, and the records behind it, and pauses that one partition until it
//! is due; every other partition keeps flowing. The copy is committed only once it is
//! settled, so a crash while it waits loses nothing.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use futures::FutureExt as _;
use helix_messaging_core::{
    Acknowledge, Delivery, DeliveryInfo, Error, ErrorKind, Message, Position, Result, Settlement,
    StartPosition,
};
use parking_lot::Mutex;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::message::Message as _;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};

use crate::error::from_kafka;
use crate::{Shared, history, wire};

/// The consumer type of a subscription.
pub(crate) type GroupConsumer = StreamConsumer<GroupContext>;

/// Most records a reader takes in one go from what the consumer has already fetched.
const RECV_BURST: usize = 256;

/// Pauses a reader has decided on and makes once it has taken what was already fetched
/// (see [`Reader::drain_then_pause`]).
#[derive(Default)]
struct Pauses {
    /// Fetching as a whole: the buffer is full.
    all: bool,
    /// Partitions whose head record is not due yet.
    partitions: BTreeSet<i32>,
}

impl Pauses {
    fn wanted(&self) -> bool {
        self.all || !self.partitions.is_empty()
    }
}

/// How often a reader stores the commit points its deliveries' settlements moved.
const STORE_INTERVAL: Duration = Duration::from_millis(100);

/// What a reader hands to its subscription: the group state the deliveries belong to (the
/// topic's, or its retry topic's), and the deliveries, in order. Handed over together: a
/// hand-over per delivery woke the application's task (on another thread) and touched the
/// channel and the state's count from both threads for each one.
pub(crate) type Handed = (Arc<GroupState>, Vec<Result<Delivery>>);

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

/// What a subscription's rebalance callback and its deliveries share.
pub(crate) struct GroupState {
    topic: String,
    start: StartPosition,
    timeout: Duration,
    clock_skew: Duration,
    partitions: Mutex<BTreeMap<i32, Tracker>>,
    generation: AtomicU64,
    /// Set when a settlement moved a commit point that is not stored yet.
    unstored: AtomicBool,
    /// Counts assignments, so `subscribe` can wait for the first.
    assignments: watch::Sender<u64>,
}

impl GroupState {
    pub(crate) fn new(topic: String, start: StartPosition, shared: &Shared) -> Arc<Self> {
        Arc::new(GroupState {
            topic,
            start,
            timeout: shared.config.request_timeout,
            clock_skew: shared.config.clock_skew,
            partitions: Mutex::default(),
            generation: AtomicU64::new(0),
            unstored: AtomicBool::new(false),
            assignments: watch::Sender::new(0),
        })
    }

    /// Resolves once the group has assigned this member its partitions (possibly none).
    pub(crate) async fn first_assignment(&self) {
        let mut changes = self.assignments.subscribe();
        let _ = changes.wait_for(|n| *n > 0).await;
    }

    /// Where a partition without a committed offset starts, and for a start by time the
    /// history filter (see [`Tracker::history_filter`]).
    fn start_offset<C: ConsumerContext>(
        &self,
        consumer: &BaseConsumer<C>,
        partition: i32,
    ) -> (i64, Option<(i64, SystemTime)>) {
        let watermarks = consumer.fetch_watermarks(&self.topic, partition, self.timeout);
        let (low, high) = match watermarks {
            Ok(marks) => marks,
            Err(err) => {
                tracing::warn!(topic = %self.topic, partition, error = %err, "cannot read watermarks; starting at the beginning");
                (0, 0)
            }
        };
        match self.start {
            StartPosition::Latest => (high, None),
            StartPosition::Earliest => (low, None),
            StartPosition::Time(since) => {
                let mut query = TopicPartitionList::new();
                let _ = query.add_partition_offset(
                    &self.topic,
                    partition,
                    Offset::Offset(history::lookup_millis(since, self.clock_skew)),
                );
                let found = consumer.offsets_for_times(query, self.timeout).ok();
                let start =
                    history::offset_for_time(found.as_ref(), &self.topic, partition, (low, high));
                (start, Some((high, since)))
            }
        }
    }

    fn on_assign<C: ConsumerContext>(
        &self,
        consumer: &BaseConsumer<C>,
        assigned: &TopicPartitionList,
    ) -> TopicPartitionList {
        let committed = (0..3).find_map(|_| {
            consumer
                .committed_offsets(assigned.clone(), self.timeout)
                .ok()
        });
        let mut positions = TopicPartitionList::new();
        let mut fresh = TopicPartitionList::new();
        let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        let mut trackers = Vec::new();
        for element in assigned.elements_for_topic(&self.topic) {
            let partition = element.partition();
            let known = committed
                .as_ref()
                .and_then(|c| c.find_partition(&self.topic, partition))
                .map(|e| (e.offset(), e.metadata().to_owned()));
            let (start, metadata, filter) = match (&committed, known) {
                (_, Some((Offset::Offset(o), metadata))) => (Some(o), Some(metadata), None),
                // The lookup failed: librdkafka's own resolution (committed, else
                // `auto.offset.reset`) is the safe choice.
                (None, _) => (None, None, None),
                (Some(_), _) => {
                    let (start, filter) = self.start_offset(consumer, partition);
                    let _ =
                        fresh.add_partition_offset(&self.topic, partition, Offset::Offset(start));
                    (Some(start), None, filter)
                }
            };
            let offset = start.map_or(Offset::Stored, Offset::Offset);
            let _ = positions.add_partition_offset(&self.topic, partition, offset);
            trackers.push((partition, start, metadata, filter));
        }
        // A new group's position is committed at once, so what is published while it has no
        // member waits for the next one.
        if fresh.count() > 0
            && let Err(err) = consumer.commit(&fresh, CommitMode::Sync)
        {
            tracing::warn!(topic = %self.topic, error = %err, "committing the start position failed");
        }
        tracing::debug!(topic = %self.topic, generation, ?trackers, "partitions assigned");
        let mut partitions = self.partitions.lock();
        for (partition, start, metadata, filter) in trackers {
            let tracker = Tracker::new(generation, start, metadata.as_deref(), filter);
            partitions.insert(partition, tracker);
        }
        positions
    }

    fn on_revoke<C: ConsumerContext>(
        &self,
        consumer: &BaseConsumer<C>,
        revoked: &TopicPartitionList,
    ) {
        let mut store = TopicPartitionList::new();
        {
            let mut partitions = self.partitions.lock();
            for element in revoked.elements_for_topic(&self.topic) {
                let Some(tracker) = partitions.remove(&element.partition()) else {
                    continue;
                };
                let point = tracker.commit_point();
                tracing::debug!(topic = %self.topic, partition = element.partition(), ?point, "partition revoked");
                if let Some(point) = point {
                    add_commit(
                        &mut store,
                        &self.topic,
                        element.partition(),
                        point,
                        &tracker.metadata(),
                    );
                }
            }
        }
        // Stored too: on unassign the consumer commits its stored offsets, and a store that
        // lags the tick would move the group back.
        if store.count() > 0
            && let Err(err) = consumer
                .store_offsets(&store)
                .and_then(|()| consumer.commit(&store, CommitMode::Sync))
        {
            tracing::warn!(topic = %self.topic, error = %err, "committing revoked partitions failed");
        }
    }

    /// Record that `offset` of `partition` was received, stamped `timestamp`, with
    /// `attempts_in_header` earlier attempts written into the record itself. Returns the
    /// assignment's generation and the record's attempt number, or `None` if the partition
    /// is no longer assigned here; `Skip` if the record is history a start by time excludes.
    fn register(
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
    fn holds(&self, partition: i32, generation: u64) -> bool {
        self.partitions
            .lock()
            .get(&partition)
            .is_some_and(|t| t.generation == generation)
    }

    /// Mark `offset` settled. A commit point that moved is stored by the next
    /// [`GroupState::store_settled`].
    fn settle(&self, partition: i32, offset: i64, generation: u64) -> Result<()> {
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

    /// Store, for the consumer's next automatic commit, every commit point that moved since
    /// the last call, with the attempts of the records still out. Runs on a short tick rather
    /// than per settlement: only the last store before a commit counts, and building the
    /// attempts list for each of thousands of settlements a second cost more than the
    /// consuming itself. Revocations and the final commit read the points directly.
    fn store_settled(&self, consumer: &GroupConsumer) {
        if !self.unstored.swap(false, Ordering::AcqRel) {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        {
            let mut partitions = self.partitions.lock();
            for (partition, tracker) in partitions.iter_mut() {
                if let Some(point) = tracker.commit_point().filter(|p| *p > tracker.stored) {
                    tracker.stored = point;
                    add_commit(
                        &mut tpl,
                        &self.topic,
                        *partition,
                        point,
                        &tracker.metadata(),
                    );
                }
            }
        }
        // `store_offsets` stores exactly each point; librdkafka's single-offset store would
        // store `point + 1` and skip a message.
        if tpl.count() > 0
            && let Err(err) = consumer.store_offsets(&tpl)
        {
            // Revoked meanwhile: its new owner starts from the last commit, which at worst
            // redelivers; anything else is tried again on the next tick.
            tracing::debug!(topic = %self.topic, error = %err, "storing offsets failed");
            self.unstored.store(true, Ordering::Release);
        }
    }
}

/// What [`GroupState::register`] found out about a received record.
enum Registered {
    /// Hand it out with this attempt number.
    Deliver { generation: u64, attempt: u32 },
    /// Settle it unseen: history before a start by time.
    Skip(u64),
}

/// Prefix of the offset metadata this adapter commits.
const ATTEMPTS_PREFIX: &str = "helix-attempts:";

/// Kafka brokers keep 4096 bytes of offset metadata by default (`offset.metadata.max.bytes`);
/// the list stays well below, keeping the lowest offsets (the next owner's first records).
const ATTEMPTS_METADATA_MAX: usize = 3000;

/// What the offset metadata says about a record at or after the commit point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OffsetNote {
    /// Still out, attempted this many times.
    Attempts(u32),
    /// Settled, and so is every record up to this offset (inclusive).
    Settled(i64),
}

/// `helix-attempts:<offset>=<attempts>,<from>-<to>,…` in offset order: the attempts of the
/// records still out, and the ranges settled above the commit point. Past the size limit
/// the highest entries are left out: their records are then delivered again, as they would
/// be without the metadata (at least once).
pub(crate) fn offset_metadata(notes: impl IntoIterator<Item = (i64, OffsetNote)>) -> String {
    let mut notes = notes.into_iter().peekable();
    let mut out = String::new();
    if notes.peek().is_none() {
        return out;
    }
    out.push_str(ATTEMPTS_PREFIX);
    for (i, (offset, note)) in notes.enumerate() {
        let sep = if i == 0 { "" } else { "," };
        let entry = match note {
            OffsetNote::Attempts(attempts) => format!("{sep}{offset}={attempts}"),
            OffsetNote::Settled(to) => format!("{sep}{offset}-{to}"),
        };
        if out.len() + entry.len() > ATTEMPTS_METADATA_MAX {
            break;
        }
        out.push_str(&entry);
    }
    out
}

/// The metadata of [`offset_metadata`], read back.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct PriorOffsets {
    /// Attempts of records still out.
    pub(crate) attempts: BTreeMap<i64, u32>,
    /// Settled ranges (inclusive), in offset order.
    pub(crate) settled: Vec<(i64, i64)>,
}

/// The inverse of [`offset_metadata`]; anything else (another client's metadata) says
/// nothing.
pub(crate) fn parse_attempts_metadata(metadata: &str) -> PriorOffsets {
    let mut prior = PriorOffsets::default();
    let Some(list) = metadata.strip_prefix(ATTEMPTS_PREFIX) else {
        return prior;
    };
    for entry in list.split(',') {
        if let Some((offset, attempts)) = entry.split_once('=') {
            if let (Ok(offset), Ok(attempts)) = (offset.parse(), attempts.parse()) {
                prior.attempts.insert(offset, attempts);
            }
        } else if let Some((from, to)) = entry.split_once('-')
            && let (Ok(from), Ok(to)) = (from.parse::<i64>(), to.parse::<i64>())
            && from <= to
        {
            prior.settled.push((from, to));
        }
    }
    prior.settled.sort_unstable();
    prior
}

/// Add `point` of `partition` with `metadata` to a list to store or commit.
fn add_commit(
    tpl: &mut TopicPartitionList,
    topic: &str,
    partition: i32,
    point: i64,
    metadata: &str,
) {
    let mut element = tpl.add_partition(topic, partition);
    let _ = element.set_offset(Offset::Offset(point));
    element.set_metadata(metadata);
}

/// The rebalance callback of a subscription's consumer.
pub(crate) struct GroupContext {
    pub(crate) state: Arc<GroupState>,
    pub(crate) reconnects: crate::reconnects::Reconnects,
}

impl ClientContext for GroupContext {
    fn stats_raw(&self, statistics: &[u8]) {
        self.reconnects.observe(statistics);
    }
}

impl ConsumerContext for GroupContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let positions = self.state.on_assign(consumer, tpl);
                if let Err(err) = consumer.assign(&positions) {
                    tracing::error!(topic = %self.state.topic, error = %err, "assigning partitions failed");
                }
                self.state.assignments.send_modify(|n| *n += 1);
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.state.on_revoke(consumer, tpl);
                let _ = consumer.unassign();
            }
            other => {
                tracing::error!(topic = %self.state.topic, error = ?other, "rebalance failed");
                let _ = consumer.unassign();
            }
        }
    }
}

/// A received record waiting to be handed out.
pub(crate) struct Buffered {
    message: Arc<Message>,
    attempt: u32,
    partition: i32,
    offset: i64,
    generation: u64,
    /// A retry-topic copy is not handed out before this time.
    not_before: Option<SystemTime>,
}

/// The earliest time a held partition's first record is due (`None`: nothing held).
fn next_release(held: &BTreeMap<i32, VecDeque<Buffered>>) -> Option<tokio::time::Instant> {
    let now = SystemTime::now();
    held.values()
        .filter_map(VecDeque::front)
        .map(|b| {
            let wait = b
                .not_before
                .and_then(|t| t.duration_since(now).ok())
                .unwrap_or_default();
            tokio::time::Instant::now() + wait
        })
        .min()
}

/// Everything a subscription's reader task needs.
pub(crate) struct Reader {
    consumer: Arc<GroupConsumer>,
    state: Arc<GroupState>,
    shared: Arc<Shared>,
    deliveries: mpsc::UnboundedSender<Handed>,
    /// Requeued and dropped deliveries, to hand out again (their sender is in `acks`).
    again_rx: mpsc::UnboundedReceiver<Buffered>,
    prefetch: usize,
    topic: Arc<str>,
    group: Option<Arc<str>>,
    /// What the deliveries' ackers share.
    acks: Arc<AckContext>,
}

/// What a reader is made of (see [`Reader::new`]).
pub(crate) struct ReaderParts {
    pub(crate) consumer: Arc<GroupConsumer>,
    pub(crate) state: Arc<GroupState>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) deliveries: mpsc::UnboundedSender<Handed>,
    pub(crate) prefetch: usize,
    pub(crate) topic: Arc<str>,
    pub(crate) group: Option<Arc<str>>,
    /// Where delayed requeues go (named groups only).
    pub(crate) retry: Option<Arc<crate::RetryLane>>,
}

/// Commit what a leaving member settled. A coordinator that is moving or a rebalance under
/// way (another member joining as this one leaves) fails a commit only for the moment:
/// it is tried again, polling meanwhile so the consumer can finish that rebalance, rather
/// than given up, which would have the next owner redeliver settled messages.
async fn final_commit(consumer: &Arc<GroupConsumer>, state: &GroupState) {
    let topic = state.topic.as_str();
    use backon::BackoffBuilder;
    let mut waits = backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(1))
        .with_max_times(10)
        .build();
    loop {
        // Built afresh each time: a rebalance meanwhile took the revoked partitions out (and
        // committed them), and committing them again could move their new owner back.
        let mut offsets = TopicPartitionList::new();
        for (partition, tracker) in state.partitions.lock().iter() {
            if let Some(point) = tracker.commit_point() {
                add_commit(&mut offsets, topic, *partition, point, &tracker.metadata());
            }
        }
        if offsets.count() == 0 {
            return;
        }
        // Stored as well as committed: closing commits the stored offsets, which must not be
        // behind this commit.
        if let Err(err) = consumer.store_offsets(&offsets) {
            tracing::debug!(topic, error = %err, "storing the final offsets failed");
        }
        let committer = consumer.clone();
        let committed =
            tokio::task::spawn_blocking(move || committer.commit(&offsets, CommitMode::Sync))
                .await
                .unwrap_or(Err(rdkafka::error::KafkaError::Canceled));
        let err = match committed {
            Ok(()) => return,
            Err(err) => err,
        };
        let passing = err.rdkafka_error_code().is_some_and(|code| {
            use rdkafka::error::RDKafkaErrorCode as C;
            matches!(
                code,
                C::RebalanceInProgress
                    | C::WaitingForCoordinator
                    | C::CoordinatorLoadInProgress
                    | C::CoordinatorNotAvailable
                    | C::NotCoordinator
                    | C::RequestTimedOut
            )
        });
        match waits.next().filter(|_| passing) {
            Some(wait) => {
                tracing::debug!(topic, error = %err, ?wait, "final commit failed for now; trying again");
                let until = tokio::time::Instant::now() + wait;
                while tokio::time::Instant::now() < until {
                    // Records arriving now are not registered: they stay uncommitted.
                    let _ = tokio::time::timeout(Duration::from_millis(50), consumer.recv()).await;
                }
            }
            None => {
                tracing::warn!(topic, error = %err, "final commit failed");
                return;
            }
        }
    }
}

impl Reader {
    pub(crate) fn new(parts: ReaderParts) -> Self {
        let (again, again_rx) = mpsc::unbounded_channel();
        let acks = Arc::new(AckContext {
            consumer: Arc::downgrade(&parts.consumer),
            state: parts.state.clone(),
            again,
            topic: parts.topic.clone(),
            retry: parts.retry,
        });
        Reader {
            consumer: parts.consumer,
            state: parts.state,
            shared: parts.shared,
            deliveries: parts.deliveries,
            again_rx,
            prefetch: parts.prefetch,
            topic: parts.topic,
            group: parts.group,
            acks,
        }
    }

    /// Poll the consumer (which also runs its rebalances), buffer what arrives, hand it out
    /// while fewer than `prefetch` deliveries are unsettled, and pause fetching while the
    /// buffer is full. Ends when the subscription is dropped or the broker closed.
    pub(crate) async fn run(mut self) {
        let permits = Arc::new(Semaphore::new(self.prefetch));
        let mut buffer: VecDeque<Buffered> = VecDeque::new();
        // Per partition: records waiting for a retry copy at their head to be due.
        let mut held: BTreeMap<i32, VecDeque<Buffered>> = BTreeMap::new();
        let mut paused = false;
        let mut pauses = Pauses::default();
        let mut closed = self.shared.closed.subscribe();
        let mut assignments = self.state.assignments.subscribe();
        // Well inside the automatic commit interval, so a commit carries what was settled
        // up to a moment before it.
        let mut store_ticks = tokio::time::interval(STORE_INTERVAL);
        store_ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        'running: loop {
            if !self.hand_out(&mut buffer, &permits) {
                break;
            }
            // Fetching resumes once the buffer is half empty; with a prefetch of 1, once it is
            // empty.
            if paused && buffer.len() * 2 < self.prefetch.max(2) {
                paused = !self.set_paused(false, &held);
            }
            let release = next_release(&held);
            tokio::select! {
                biased;
                () = async { let _ = closed.wait_for(|c| *c).await; } => break,
                () = self.deliveries.closed() => break,
                Ok(()) = assignments.changed() => {
                    // Revoked partitions' records are not handed out any more, and a new
                    // assignment must not inherit a pause from an earlier one.
                    buffer.retain(|b| self.state.holds(b.partition, b.generation));
                    held.retain(|_, queue| {
                        queue.retain(|b| self.state.holds(b.partition, b.generation));
                        !queue.is_empty()
                    });
                    paused = buffer.len() >= self.prefetch && self.set_paused(true, &held);
                    if !paused {
                        self.set_paused(false, &held);
                    }
                    for partition in held.keys() {
                        self.pause_partition(*partition, true);
                    }
                }
                () = async {
                    if let Some(at) = release {
                        tokio::time::sleep_until(at).await;
                    }
                }, if release.is_some() => {
                    let now = SystemTime::now();
                    held.retain(|partition, queue| {
                        while queue.front().is_some_and(|b| b.not_before.is_none_or(|t| t <= now)) {
                            if let Some(item) = queue.pop_front() {
                                buffer.push_back(item);
                            }
                        }
                        if queue.is_empty() && !paused {
                            self.pause_partition(*partition, false);
                        }
                        !queue.is_empty()
                    });
                    if !paused && buffer.len() >= self.prefetch {
                        pauses.all = true;
                    }
                    if let Err(err) = self.drain_then_pause(&mut buffer, &mut held, &mut paused, &mut pauses)
                        && !self.report(err).await
                    {
                        break;
                    }
                }
                _ = store_ticks.tick() => self.state.store_settled(&self.consumer),
                Some(item) = self.again_rx.recv() => {
                    if self.state.holds(item.partition, item.generation) {
                        buffer.push_front(item);
                    }
                }
                permit = permits.clone().acquire_owned(), if !buffer.is_empty() => {
                    let Ok(permit) = permit else { break };
                    let Some(item) = buffer.pop_front() else { continue };
                    if !self.state.holds(item.partition, item.generation) {
                        continue;
                    }
                    let delivery = self.delivery(item, permit);
                    if self.deliveries.send((self.state.clone(), vec![Ok(delivery)])).is_err() {
                        break;
                    }
                }
                received = self.consumer.recv() => match received {
                    Ok(record) => {
                        self.take(record, &mut buffer, &mut held, paused, &mut pauses);
                        // Records that have arrived meanwhile are taken now rather than one
                        // trip through this loop each, and handed out as they come: a buffer
                        // filled first would pause fetching, and the consumer drops what it
                        // had fetched beyond a paused position. They reach the subscription
                        // together, once the burst is over.
                        let mut out = Vec::new();
                        for _ in 1..RECV_BURST {
                            self.gather(&mut buffer, &permits, &mut out);
                            if pauses.wanted() {
                                break;
                            }
                            match self.consumer.recv().now_or_never() {
                                Some(Ok(record)) => {
                                    self.take(record, &mut buffer, &mut held, paused, &mut pauses);
                                }
                                Some(Err(err)) => {
                                    if !self.send_out(&mut out) || !self.report(err).await {
                                        break 'running;
                                    }
                                    break;
                                }
                                None => break,
                            }
                        }
                        if !self.send_out(&mut out) {
                            break 'running;
                        }
                        if let Err(err) = self.drain_then_pause(&mut buffer, &mut held, &mut paused, &mut pauses)
                            && !self.report(err).await
                        {
                            break 'running;
                        }
                    }
                    Err(err) => {
                        if !self.report(err).await {
                            break;
                        }
                    }
                },
            }
        }
        self.shutdown(&permits).await;
    }

    /// Hand out buffered records while the prefetch window has room; `false` once the
    /// subscription is gone.
    fn hand_out(&self, buffer: &mut VecDeque<Buffered>, permits: &Arc<Semaphore>) -> bool {
        let mut out = Vec::new();
        self.gather(buffer, permits, &mut out);
        self.send_out(&mut out)
    }

    /// Make deliveries of buffered records, into `out`, while the prefetch window has room.
    fn gather(
        &self,
        buffer: &mut VecDeque<Buffered>,
        permits: &Arc<Semaphore>,
        out: &mut Vec<Result<Delivery>>,
    ) {
        while !buffer.is_empty() {
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                break;
            };
            let Some(item) = buffer.pop_front() else {
                break;
            };
            if !self.state.holds(item.partition, item.generation) {
                continue;
            }
            out.push(Ok(self.delivery(item, permit)));
        }
    }

    /// Hand the deliveries in `out` to the subscription; `false` once it is gone.
    fn send_out(&self, out: &mut Vec<Result<Delivery>>) -> bool {
        out.is_empty()
            || self
                .deliveries
                .send((self.state.clone(), std::mem::take(out)))
                .is_ok()
    }

    /// Register a received record and buffer it (or hold it, when it or an earlier record
    /// of its partition is not due yet); ask for fetching to pause once the buffer is full,
    /// or for the partition of a held record (made by [`Reader::drain_then_pause`]).
    fn take(
        &self,
        record: rdkafka::message::BorrowedMessage<'_>,
        buffer: &mut VecDeque<Buffered>,
        held: &mut BTreeMap<i32, VecDeque<Buffered>>,
        paused: bool,
        pauses: &mut Pauses,
    ) {
        let (partition, offset) = (record.partition(), record.offset());
        let received = wire::received(&record);
        drop(record);
        let registered = self.state.register(
            partition,
            offset,
            received.message.timestamp(),
            received.attempts_in_header,
        );
        let (generation, attempt) = match registered {
            None => return,
            Some(Registered::Skip(generation)) => {
                let _ = self.state.settle(partition, offset, generation);
                return;
            }
            Some(Registered::Deliver {
                generation,
                attempt,
            }) => (generation, attempt),
        };
        if wire::expired(&received.message, SystemTime::now()) {
            let _ = self.state.settle(partition, offset, generation);
            return;
        }
        let item = Buffered {
            message: Arc::new(received.message),
            attempt,
            partition,
            offset,
            generation,
            not_before: received.not_before,
        };
        let early = item.not_before.is_some_and(|t| t > SystemTime::now());
        if early || held.contains_key(&partition) {
            // Only this partition waits; its later records keep their order behind the one
            // that is not due.
            let queue = held.entry(partition).or_default();
            if queue.is_empty() {
                pauses.partitions.insert(partition);
            }
            queue.push_back(item);
            return;
        }
        buffer.push_back(item);
        if !paused && buffer.len() >= self.prefetch {
            pauses.all = true;
        }
    }

    /// Take everything the consumer has already fetched, then make the pauses `pauses` asks
    /// for (`paused` is set once fetching is paused as a whole).
    ///
    /// librdkafka discards what it fetched beyond a paused partition's position and fetches
    /// from that position again on resume. Drained first, nothing fetched is thrown away and
    /// fetched again, and the position is the end of what was fetched, a batch boundary.
    /// Apache Kafka serves a fetch from inside a batch too (with the whole batch), but not
    /// every Kafka-protocol broker does: Tansu 0.6 answers it with nothing, or with the
    /// batches after it, and a subscription that paused mid-batch there stalled or lost the
    /// rest of the batch (a default subscription got 202 of a `publish_batch` of 500).
    fn drain_then_pause(
        &self,
        buffer: &mut VecDeque<Buffered>,
        held: &mut BTreeMap<i32, VecDeque<Buffered>>,
        paused: &mut bool,
        pauses: &mut Pauses,
    ) -> std::result::Result<(), rdkafka::error::KafkaError> {
        if !pauses.wanted() {
            return Ok(());
        }
        let drained = loop {
            match self.consumer.recv().now_or_never() {
                Some(Ok(record)) => self.take(record, buffer, held, *paused, pauses),
                Some(Err(err)) => break Err(err),
                None => break Ok(()),
            }
        };
        for partition in std::mem::take(&mut pauses.partitions) {
            self.pause_partition(partition, true);
        }
        if std::mem::take(&mut pauses.all) && !*paused {
            *paused = self.set_paused(true, held);
        }
        drained
    }

    /// Report a consumer error on the subscription and pause briefly; `false` once the
    /// subscription is gone.
    async fn report(&self, err: rdkafka::error::KafkaError) -> bool {
        let err = from_kafka(err, format!("consuming {}", self.state.topic));
        tracing::warn!(error = %err, "consumer error");
        if self
            .deliveries
            .send((self.state.clone(), vec![Err(err)]))
            .is_err()
        {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        true
    }

    /// Pause or resume fetching every assigned partition (a resume leaves the `held` ones
    /// paused); returns whether it took effect.
    fn set_paused(&self, pause: bool, held: &BTreeMap<i32, VecDeque<Buffered>>) -> bool {
        let Ok(assignment) = self.consumer.assignment() else {
            return false;
        };
        let result = if pause {
            self.consumer.pause(&assignment)
        } else {
            let mut resume = TopicPartitionList::new();
            for element in assignment.elements() {
                if !held.contains_key(&element.partition()) {
                    resume.add_partition(element.topic(), element.partition());
                }
            }
            self.consumer.resume(&resume)
        };
        result.is_ok()
    }

    /// Pause or resume fetching one partition.
    fn pause_partition(&self, partition: i32, pause: bool) {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&self.state.topic, partition);
        let result = if pause {
            self.consumer.pause(&tpl)
        } else {
            self.consumer.resume(&tpl)
        };
        if let Err(err) = result {
            tracing::warn!(topic = %self.state.topic, partition, pause, error = %err, "pausing or resuming a partition failed");
        }
    }

    /// End the subscription's stream, stop fetching, give deliveries still out
    /// `shutdown_grace` to be settled (the consumer keeps polling meanwhile, so the group is
    /// not held up), commit, and leave the group.
    async fn shutdown(self, permits: &Semaphore) {
        self.set_paused(true, &BTreeMap::new());
        // The application learns at once that nothing more comes; what it still holds can
        // be settled during the grace.
        let Reader {
            consumer,
            state,
            shared,
            deliveries,
            prefetch,
            ..
        } = self;
        drop(deliveries);
        let deadline = tokio::time::Instant::now() + shared.config.shutdown_grace;
        while permits.available_permits() < prefetch && tokio::time::Instant::now() < deadline {
            // Records still arriving are not registered: they stay uncommitted, so the next
            // owner of the partition reads them.
            let _ = tokio::time::timeout(Duration::from_millis(50), consumer.recv()).await;
        }
        final_commit(&consumer, &state).await;
        // Closing blocks on the network.
        let _ = tokio::task::spawn_blocking(move || drop(consumer)).await;
    }

    fn delivery(&self, item: Buffered, permit: OwnedSemaphorePermit) -> Delivery {
        let message = item.message;
        Delivery::new(
            message.clone(),
            DeliveryInfo {
                topic: self.topic.clone(),
                group: self.group.clone(),
                attempt: item.attempt,
                redelivered: item.attempt > 1,
                position: Some(Position::Offset {
                    partition: item.partition,
                    offset: item.offset,
                }),
            },
            Box::new(KafkaAcker {
                context: self.acks.clone(),
                message,
                attempt: item.attempt,
                partition: item.partition,
                offset: item.offset,
                generation: item.generation,
                settled: false,
                _permit: permit,
            }),
        )
    }
}

/// What every delivery of one reader settles through: one reference per delivery rather
/// than one per part (each is an atomic count touched on two threads).
struct AckContext {
    /// Weak: a subscription that has ended must be able to leave its group.
    consumer: Weak<GroupConsumer>,
    state: Arc<GroupState>,
    again: mpsc::UnboundedSender<Buffered>,
    topic: Arc<str>,
    retry: Option<Arc<crate::RetryLane>>,
}

/// Settles one delivery. Holds a prefetch permit until it is dropped.
struct KafkaAcker {
    context: Arc<AckContext>,
    message: Arc<Message>,
    attempt: u32,
    partition: i32,
    offset: i64,
    generation: u64,
    /// Set once the delivery is settled: dropping an unsettled acker hands the record out
    /// again.
    settled: bool,
    _permit: OwnedSemaphorePermit,
}

impl KafkaAcker {
    /// Hand the record out again with the next attempt; `false` if the partition is no longer
    /// assigned here or the subscription has ended (its next owner reads it again from the
    /// committed offset, which has not passed it).
    fn hand_out_again(&self) -> bool {
        let context = &self.context;
        context.state.holds(self.partition, self.generation)
            && context
                .again
                .send(Buffered {
                    message: self.message.clone(),
                    attempt: self.attempt + 1,
                    partition: self.partition,
                    offset: self.offset,
                    generation: self.generation,
                    not_before: None,
                })
                .is_ok()
    }

    /// The error of a settlement after the subscription ended.
    fn ended(&self) -> Error {
        Error::new(
            ErrorKind::NotFound,
            format!(
                "the subscription to {} has ended; the message is redelivered from the committed offset",
                self.context.topic
            ),
        )
    }
}

/// The error of a settlement of `partition` of `topic` after it was assigned elsewhere.
fn reassigned(partition: i32, topic: &str) -> Error {
    Error::new(
        ErrorKind::NotFound,
        format!(
            "partition {partition} of {topic} was reassigned; its new owner receives this message again"
        ),
    )
}

impl Drop for KafkaAcker {
    fn drop(&mut self) {
        if !self.settled {
            self.hand_out_again();
        }
    }
}

#[async_trait]
impl Acknowledge for KafkaAcker {
    fn delays_requeue(&self) -> bool {
        self.context.retry.is_some()
    }

    /// Everything but a delayed requeue is settled here: an ack or a reject moves the
    /// partition's commit point, a requeue hands the record out again from this process.
    fn settle_now(&mut self, outcome: Settlement) -> Option<Result<()>> {
        if matches!(outcome, Settlement::RequeueAfter(_)) {
            return None;
        }
        self.settled = true;
        let context = &self.context;
        if context.consumer.strong_count() == 0 {
            return Some(Err(self.ended()));
        }
        if outcome == Settlement::Requeue {
            // Rewinding the partition would redeliver everything after the record too, and a
            // copy on the topic would reach every other group: the record stays unsettled
            // (no commit passes it) and is handed out again here.
            return Some(if self.hand_out_again() {
                Ok(())
            } else {
                Err(reassigned(self.partition, &context.topic))
            });
        }
        Some(
            context
                .state
                .settle(self.partition, self.offset, self.generation),
        )
    }

    async fn settle(mut self: Box<Self>, outcome: Settlement) -> Result<()> {
        let Settlement::RequeueAfter(delay) = outcome else {
            // Settled at once (the `Settler` asks `settle_now` first; this is for a caller
            // that does not).
            return self.settle_now(outcome).unwrap_or(Ok(()));
        };
        self.settled = true;
        let context = self.context.clone();
        if context.consumer.strong_count() == 0 {
            return Err(self.ended());
        }
        let lane = context.retry.clone().ok_or_else(|| {
            Error::unsupported(
                crate::NAME,
                "a delayed requeue on a private subscription (named groups have a retry topic)",
            )
        })?;
        let due = SystemTime::now() + delay;
        match lane.send(&self.message, self.attempt, due).await {
            // The copy is on the retry topic: the original is done with.
            Ok(()) => context
                .state
                .settle(self.partition, self.offset, self.generation),
            Err(err) => {
                // A retry that comes early, never one that is lost.
                tracing::warn!(topic = %context.topic, error = %err, "writing the retry copy failed; requeueing at once");
                if self.hand_out_again() {
                    Ok(())
                } else {
                    Err(err)
                }
            }
        }
    }
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
