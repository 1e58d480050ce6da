//! The per-topic state machine: retained log, consumer groups, ready queues by priority,
//! in-flight deliveries with deadlines. Everything here runs under the topic's lock and never
//! awaits.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use helix_messaging_core::{HistoryEntry, MAX_PRIORITY, Message, Position, StartPosition};
use tokio::sync::Notify;

use crate::config::MemoryConfig;

const LEVELS: usize = MAX_PRIORITY as usize + 1;

/// The current instant, read from the clock the first time it is asked for: a publish
/// needs it only for a TTL or to purge a full group, and most carry no TTL into groups with
/// room.
#[derive(Default)]
pub(crate) struct LazyNow(Option<Instant>);

impl LazyNow {
    pub(crate) fn get(&mut self) -> Instant {
        *self.0.get_or_insert_with(Instant::now)
    }
}

/// A message waiting in a group's ready queue.
pub(crate) struct Ready {
    pub(crate) message: Arc<Message>,
    pub(crate) seq: u64,
    /// How often it has been handed out so far.
    pub(crate) deliveries: u32,
    pub(crate) expires_at: Option<Instant>,
}

struct InFlight {
    ready: Ready,
    /// The delivery's token, unique in the topic: what its acker names it by.
    token: u64,
    member: u64,
    deadline: Option<Instant>,
}

/// The ring of deliveries in flight moves its oldest half aside once it is longer than this
/// and than four slots per delivery in it (see [`InFlightTable`]); a ring that has held
/// more than four times this much is shrunk as it empties.
const RING_SLACK: usize = 1024;

/// A group's deliveries in flight, by the index each was given when taken (consecutive in
/// the group, so ordered by the time they were taken).
///
/// Most deliveries are settled in about the order they were taken, so they are kept in a
/// ring starting at the oldest: taking one is a push and settling one clears its slot (and
/// drops the cleared slots at the front), where a `BTreeMap`'s insert and remove took a
/// twelfth of a consumer's time. A delivery held while many after it are settled keeps the
/// ring from shrinking behind it: once the ring is past [`RING_SLACK`] and four slots for
/// each delivery it holds, its oldest half moves to `held_long`, a map, so memory stays
/// proportional to what is held.
struct InFlightTable {
    /// The index of `ring[0]`; everything in `held_long` is older.
    base: u64,
    ring: VecDeque<Option<InFlight>>,
    /// Deliveries in the ring.
    in_ring: usize,
    held_long: BTreeMap<u64, InFlight>,
}

impl InFlightTable {
    fn new() -> Self {
        InFlightTable {
            base: 0,
            ring: VecDeque::new(),
            in_ring: 0,
            held_long: BTreeMap::new(),
        }
    }

    fn len(&self) -> usize {
        self.in_ring + self.held_long.len()
    }

    /// Add a delivery just taken; returns the index it is kept at, one past every index
    /// given before (the ring always ends there: slots leave it only from the front).
    fn push(&mut self, in_flight: InFlight) -> u64 {
        let index = self.base + self.ring.len() as u64;
        self.ring.push_back(Some(in_flight));
        self.in_ring += 1;
        if self.ring.len() > RING_SLACK && self.ring.len() > 4 * self.in_ring {
            for _ in 0..self.ring.len() / 2 {
                if let Some(Some(held)) = self.ring.pop_front() {
                    self.held_long.insert(self.base, held);
                    self.in_ring -= 1;
                }
                self.base += 1;
            }
            self.trim_front();
        }
        index
    }

    /// Remove the delivery at `index` if it is the one with `token` (a stale acker may name
    /// an index a later group in the same slot has given to another).
    fn remove(&mut self, index: u64, token: u64) -> Option<InFlight> {
        if index < self.base {
            return match self.held_long.get(&index) {
                Some(held) if held.token == token => self.held_long.remove(&index),
                _ => None,
            };
        }
        let slot = self
            .ring
            .get_mut(usize::try_from(index - self.base).ok()?)?;
        if slot.as_ref()?.token != token {
            return None;
        }
        let removed = slot.take();
        self.in_ring -= 1;
        self.trim_front();
        removed
    }

    fn trim_front(&mut self) {
        while let Some(None) = self.ring.front() {
            self.ring.pop_front();
            self.base += 1;
        }
        // A burst of deliveries in flight would otherwise keep its ring's memory for good.
        if self.ring.capacity() > 4 * RING_SLACK && self.ring.len() < self.ring.capacity() / 8 {
            self.ring.shrink_to(self.ring.capacity() / 4);
        }
    }

    /// The oldest delivery in flight.
    fn first(&self) -> Option<&InFlight> {
        match self.held_long.values().next() {
            Some(held) => Some(held),
            None => self.ring.front().and_then(Option::as_ref),
        }
    }

    /// Remove and return the oldest delivery if `due` holds for it.
    fn pop_first_if(&mut self, due: impl Fn(&InFlight) -> bool) -> Option<InFlight> {
        if let Some(entry) = self.held_long.first_entry() {
            return due(entry.get()).then(|| entry.remove());
        }
        if !due(self.ring.front()?.as_ref()?) {
            return None;
        }
        let first = self.ring.pop_front().flatten();
        self.in_ring -= 1;
        self.base += 1;
        self.trim_front();
        first
    }

    /// Remove and return every delivery for which `pick` holds, oldest first.
    fn remove_where(&mut self, pick: impl Fn(&InFlight) -> bool) -> Vec<InFlight> {
        let held: Vec<u64> = self
            .held_long
            .iter()
            .filter(|(_, f)| pick(f))
            .map(|(index, _)| *index)
            .collect();
        let mut removed: Vec<InFlight> = held
            .into_iter()
            .filter_map(|index| self.held_long.remove(&index))
            .collect();
        for slot in &mut self.ring {
            if slot.as_ref().is_some_and(&pick) {
                removed.extend(slot.take());
                self.in_ring -= 1;
            }
        }
        self.trim_front();
        removed
    }
}

struct Member {
    id: u64,
    notify: Arc<Notify>,
    outstanding: usize,
    prefetch: usize,
}

/// One consumer group (or a private subscription's own group).
pub(crate) struct Group {
    name: Option<Arc<str>>,
    ready: [VecDeque<Ready>; LEVELS],
    ready_len: usize,
    /// Earliest expiry among ready entries, if any has a TTL (a lower bound: entries taken
    /// since may have held it). Lets a full group skip scanning for expired entries when
    /// none can be due.
    earliest_expiry: Option<Instant>,
    /// By index, which grows with delivery time; with one ack deadline for the whole broker
    /// the first entry is therefore always the next to expire.
    in_flight: InFlightTable,
    /// Requeued with a delay: held back until the instant, keyed with the delivery token so
    /// equal instants stay apart and keep their order.
    delayed: BTreeMap<(Instant, u64), Ready>,
    members: Vec<Member>,
}

impl Group {
    fn new(name: Option<Arc<str>>) -> Self {
        Group {
            name,
            ready: Default::default(),
            ready_len: 0,
            earliest_expiry: None,
            in_flight: InFlightTable::new(),
            delayed: BTreeMap::new(),
            members: Vec::new(),
        }
    }

    fn depth(&self) -> usize {
        self.ready_len + self.in_flight.len() + self.delayed.len()
    }

    /// Move every delayed entry whose time has come to the head of the ready queue.
    fn release_due(&mut self, now: Instant) {
        let mut due = Vec::new();
        while let Some(entry) = self.delayed.first_entry() {
            if entry.key().0 > now {
                break;
            }
            due.push(entry.remove());
        }
        if !due.is_empty() {
            self.push_front_in_order(due);
        }
    }

    fn push_back(&mut self, ready: Ready) {
        self.note_expiry(ready.expires_at);
        self.ready[usize::from(ready.message.priority())].push_back(ready);
        self.ready_len += 1;
    }

    fn note_expiry(&mut self, expires_at: Option<Instant>) {
        if let Some(t) = expires_at {
            self.earliest_expiry = Some(self.earliest_expiry.map_or(t, |e| e.min(t)));
        }
    }

    /// Put redelivered entries back at the head of their priority level, keeping their
    /// original relative order.
    fn push_front_in_order(&mut self, mut entries: Vec<Ready>) {
        entries.sort_by_key(|r| std::cmp::Reverse(r.seq));
        for ready in entries {
            self.note_expiry(ready.expires_at);
            self.ready[usize::from(ready.message.priority())].push_front(ready);
            self.ready_len += 1;
        }
    }

    fn pop_highest(&mut self) -> Option<Ready> {
        let level = self.ready.iter_mut().rev().find(|q| !q.is_empty())?;
        self.ready_len -= 1;
        level.pop_front()
    }

    fn notify_members(&self) {
        for member in &self.members {
            member.notify.notify_one();
        }
    }

    fn member_mut(&mut self, id: u64) -> Option<&mut Member> {
        self.members.iter_mut().find(|m| m.id == id)
    }

    /// Return every in-flight delivery whose deadline has passed to the ready queue.
    fn requeue_overdue(&mut self, now: Instant) {
        let mut overdue = Vec::new();
        while let Some(in_flight) = self
            .in_flight
            .pop_first_if(|f| f.deadline.is_some_and(|deadline| deadline <= now))
        {
            if let Some(member) = self.member_mut(in_flight.member) {
                member.outstanding -= 1;
            }
            overdue.push(in_flight.ready);
        }
        if !overdue.is_empty() {
            self.push_front_in_order(overdue);
            self.notify_members();
        }
    }

    fn purge_expired(&mut self, now: Instant) -> usize {
        if self.earliest_expiry.is_none_or(|t| t > now) {
            return 0;
        }
        let before = self.ready_len;
        let mut earliest = None;
        for level in &mut self.ready {
            level.retain(|r| match r.expires_at {
                None => true,
                Some(t) if t <= now => false,
                Some(t) => {
                    earliest = Some(earliest.map_or(t, |e: Instant| e.min(t)));
                    true
                }
            });
        }
        self.earliest_expiry = earliest;
        self.ready_len = self.ready.iter().map(VecDeque::len).sum();
        before - self.ready_len
    }
}

/// A delivery taken from a group, to be turned into a [`helix_messaging_core::Delivery`]
/// outside the lock.
pub(crate) struct Taken {
    pub(crate) message: Arc<Message>,
    pub(crate) token: u64,
    /// Where its group keeps it in flight.
    pub(crate) index: u64,
    pub(crate) attempt: u32,
    pub(crate) seq: u64,
}

/// What a member found when it tried to take deliveries.
pub(crate) enum Take {
    /// Deliveries (at least one).
    Some(Vec<Taken>),
    /// Nothing to take now; wake up by this time at the latest (an ack deadline).
    Wait(Option<Instant>),
    /// The broker is closed.
    Closed,
}

/// Log entries evicted by retention, freed by the publisher after it releases the topic
/// lock. Inline for the usual one per publish once the log is full, so that steady state
/// allocates nothing for it.
pub(crate) type Evicted = smallvec::SmallVec<[Arc<Message>; 4]>;

/// A message published without the topic lock, waiting in the topic's inbox until the next
/// holder of the lock enters it. Its clocks were read when it was published.
pub(crate) struct Inboxed {
    pub(crate) message: Arc<Message>,
    pub(crate) wall: SystemTime,
    pub(crate) expires_at: Option<Instant>,
}

/// Why a publish could not be enqueued right now.
pub(crate) enum Blocked {
    /// The group in `slot` holds its bound. Its name is looked up only for an error: a
    /// publisher checks again after every settlement while a group is full, and a `String`
    /// per check was an allocation per message at the bound.
    Full {
        slot: usize,
    },
    Closed,
}

/// What settling does with a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SettleAction {
    /// Remove it (ack or reject).
    Remove,
    /// Hand it out again now.
    Requeue,
    /// Hand it out again once this instant has passed.
    RequeueAt(Instant),
}

/// Outcome of settling a delivery.
pub(crate) enum SettleError {
    Closed,
    NotHeld,
}

struct LogEntry {
    message: Arc<Message>,
    recorded_at: SystemTime,
    seq: u64,
    expires_at: Option<Instant>,
}

/// Everything about one topic, guarded by one lock.
pub(crate) struct TopicState {
    config: Arc<MemoryConfig>,
    pub(crate) closed: bool,
    next_seq: u64,
    next_token: u64,
    next_member: u64,
    last_recorded: SystemTime,
    log: VecDeque<LogEntry>,
    groups: Vec<Option<Group>>,
    group_slots: HashMap<Arc<str>, usize>,
    /// Messages dropped because their TTL passed before delivery (diagnostics, tests).
    pub(crate) expired: u64,
    /// The topic's inbox queue not in use, kept here to be swapped with the one in use.
    pub(crate) inbox_spare: Vec<Inboxed>,
}

impl TopicState {
    pub(crate) fn new(config: Arc<MemoryConfig>) -> Self {
        TopicState {
            config,
            closed: false,
            next_seq: 0,
            next_token: 0,
            next_member: 0,
            last_recorded: SystemTime::UNIX_EPOCH,
            log: VecDeque::new(),
            groups: Vec::new(),
            group_slots: HashMap::new(),
            expired: 0,
            inbox_spare: Vec::new(),
        }
    }

    fn group_mut(&mut self, slot: usize) -> Option<&mut Group> {
        self.groups.get_mut(slot).and_then(Option::as_mut)
    }

    /// The name of the group in `slot`, for an error: `(private)` for a private
    /// subscription's, `(gone)` when it has left since (or a later group's, had one taken
    /// the slot meanwhile).
    pub(crate) fn group_label(&self, slot: usize) -> String {
        match self.groups.get(slot).and_then(Option::as_ref) {
            Some(group) => group.name.as_deref().unwrap_or("(private)").to_owned(),
            None => "(gone)".to_owned(),
        }
    }

    /// Check whether one more message fits in every group, besides `pending` ones already
    /// admitted but not yet entered; purges expired messages from a full group before
    /// declaring it full.
    pub(crate) fn check_space(&mut self, now: &mut LazyNow, pending: usize) -> Result<(), Blocked> {
        if self.closed {
            return Err(Blocked::Closed);
        }
        let capacity = self.config.max_queue_depth;
        let mut purged = 0;
        for (slot, group) in self.groups.iter_mut().enumerate() {
            let Some(group) = group else { continue };
            if group.depth() + pending >= capacity {
                purged += group.purge_expired(now.get());
                if group.depth() + pending >= capacity {
                    self.expired += purged as u64;
                    return Err(Blocked::Full { slot });
                }
            }
        }
        self.expired += purged as u64;
        Ok(())
    }

    /// Append to the log and every group. The caller has checked space. `now` and `wall` are
    /// read by the caller before taking the lock; log entries evicted by retention are moved
    /// to `evicted` so they are freed after the lock is released.
    pub(crate) fn enqueue(
        &mut self,
        message: Arc<Message>,
        now: &mut LazyNow,
        wall: SystemTime,
        evicted: &mut Evicted,
    ) {
        let expires_at = message.ttl().map(|ttl| now.get() + ttl);
        self.append(message, expires_at, wall, evicted, true);
    }

    /// Enter a message from the inbox. Its publisher woke the members already.
    pub(crate) fn enter(&mut self, inboxed: Inboxed, evicted: &mut Evicted) {
        self.append(
            inboxed.message,
            inboxed.expires_at,
            inboxed.wall,
            evicted,
            false,
        );
    }

    fn append(
        &mut self,
        message: Arc<Message>,
        expires_at: Option<Instant>,
        wall: SystemTime,
        evicted: &mut Evicted,
        notify: bool,
    ) {
        let seq = self.next_seq;
        self.next_seq += 1;
        // Recorded times never go backwards, so the log stays sorted for range reads even if
        // the wall clock is stepped back.
        let recorded_at = wall.max(self.last_recorded);
        self.last_recorded = recorded_at;
        for group in self.groups.iter_mut().flatten() {
            group.push_back(Ready {
                message: message.clone(),
                seq,
                deliveries: 0,
                expires_at,
            });
            if notify {
                group.notify_members();
            }
        }
        if self.config.retention_messages > 0 {
            self.log.push_back(LogEntry {
                message,
                recorded_at,
                seq,
                expires_at,
            });
            self.prune_log(recorded_at, evicted);
        }
    }

    fn prune_log(&mut self, now: SystemTime, evicted: &mut Evicted) {
        let oldest_kept = self
            .config
            .retention_age
            .map(|age| now.checked_sub(age).unwrap_or(SystemTime::UNIX_EPOCH));
        while let Some(front) = self.log.front() {
            let too_many = self.log.len() > self.config.retention_messages;
            let too_old = oldest_kept.is_some_and(|t| front.recorded_at < t);
            if !(too_many || too_old) {
                break;
            }
            if let Some(entry) = self.log.pop_front() {
                evicted.push(entry.message);
            }
        }
    }

    /// Join (creating if needed) a group; returns `(slot, member id)`. A new group takes at
    /// most `room` messages from the log.
    pub(crate) fn join(
        &mut self,
        group_name: Option<Arc<str>>,
        prefetch: usize,
        start: StartPosition,
        notify: Arc<Notify>,
        room: usize,
    ) -> (usize, u64) {
        let existing = group_name
            .as_ref()
            .and_then(|name| self.group_slots.get(name).copied());
        let slot = match existing {
            Some(slot) => slot,
            None => {
                let mut group = Group::new(group_name.clone());
                self.seed_from_log(&mut group, start, room);
                let slot = match self.groups.iter().position(Option::is_none) {
                    Some(free) => {
                        self.groups[free] = Some(group);
                        free
                    }
                    None => {
                        self.groups.push(Some(group));
                        self.groups.len() - 1
                    }
                };
                if let Some(name) = group_name {
                    self.group_slots.insert(name, slot);
                }
                slot
            }
        };
        let id = self.next_member;
        self.next_member += 1;
        let group = self.group_mut(slot).expect("slot was just resolved");
        group.members.push(Member {
            id,
            notify,
            outstanding: 0,
            prefetch: prefetch.max(1),
        });
        (slot, id)
    }

    fn seed_from_log(&self, group: &mut Group, start: StartPosition, room: usize) {
        let first = match start {
            StartPosition::Latest => return,
            StartPosition::Earliest => 0,
            StartPosition::Time(t) => self.log.partition_point(|e| e.recorded_at < t),
        };
        for entry in self.log.range(first..).take(room) {
            group.push_back(Ready {
                message: entry.message.clone(),
                seq: entry.seq,
                deliveries: 0,
                expires_at: entry.expires_at,
            });
        }
    }

    /// A member leaves: its in-flight deliveries go back to the group (or vanish with a
    /// private group). Those in `unseen` (taken into its buffer but never received by the
    /// application) go back without the delivery they were counted for. Returns whether a
    /// private group went away with it, freeing whatever room it took.
    pub(crate) fn leave(&mut self, slot: usize, member_id: u64, unseen: &[u64]) -> bool {
        let Some(group) = self.group_mut(slot) else {
            return false;
        };
        group.members.retain(|m| m.id != member_id);
        if group.name.is_none() {
            self.groups[slot] = None;
            return true;
        }
        let held = group.in_flight.remove_where(|f| f.member == member_id);
        if held.is_empty() {
            return false;
        }
        let returned = held
            .into_iter()
            .map(|f| {
                let mut ready = f.ready;
                if unseen.contains(&f.token) {
                    ready.deliveries = ready.deliveries.saturating_sub(1);
                }
                ready
            })
            .collect();
        group.push_front_in_order(returned);
        group.notify_members();
        false
    }

    /// Take up to `max` deliveries for a member, respecting its prefetch.
    pub(crate) fn take(&mut self, slot: usize, member_id: u64, max: usize, now: Instant) -> Take {
        if self.closed {
            return Take::Closed;
        }
        let ack_deadline = self.config.ack_deadline;
        let mut next_token = self.next_token;
        let mut expired = 0u64;
        let Some(group) = self.group_mut(slot) else {
            return Take::Closed;
        };
        group.requeue_overdue(now);
        group.release_due(now);
        let Some(member) = group.member_mut(member_id) else {
            return Take::Closed;
        };
        let room = member.prefetch.saturating_sub(member.outstanding).min(max);
        let mut taken = Vec::new();
        while taken.len() < room {
            let Some(mut ready) = group.pop_highest() else {
                break;
            };
            if ready.expires_at.is_some_and(|t| t <= now) {
                expired += 1;
                continue;
            }
            ready.deliveries += 1;
            let token = next_token;
            next_token += 1;
            let (message, attempt, seq) = (ready.message.clone(), ready.deliveries, ready.seq);
            let index = group.in_flight.push(InFlight {
                ready,
                token,
                member: member_id,
                deadline: ack_deadline.map(|d| now + d),
            });
            taken.push(Taken {
                message,
                token,
                index,
                attempt,
                seq,
            });
        }
        let next_ack_deadline = group.in_flight.first().and_then(|f| f.deadline);
        let next_release = group.delayed.keys().next().map(|(at, _)| *at);
        let next_deadline = match (next_ack_deadline, next_release) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if let Some(member) = group.member_mut(member_id) {
            member.outstanding += taken.len();
        }
        self.next_token = next_token;
        self.expired += expired;
        if taken.is_empty() {
            Take::Wait(next_deadline)
        } else {
            Take::Some(taken)
        }
    }

    /// Settle one delivery. Returns whether it freed a slot in its group (it was removed), so
    /// the caller can wake a publisher waiting for space.
    pub(crate) fn settle(
        &mut self,
        slot: usize,
        token: u64,
        index: u64,
        action: SettleAction,
    ) -> Result<bool, SettleError> {
        if self.closed {
            return Err(SettleError::Closed);
        }
        let group = self.group_mut(slot).ok_or(SettleError::NotHeld)?;
        let in_flight = group
            .in_flight
            .remove(index, token)
            .ok_or(SettleError::NotHeld)?;
        let member = group.member_mut(in_flight.member);
        let mut wake_member = None;
        if let Some(member) = member {
            if member.outstanding >= member.prefetch {
                wake_member = Some(member.notify.clone());
            }
            member.outstanding -= 1;
        }
        let removed = match action {
            SettleAction::Remove => true,
            SettleAction::Requeue => {
                group.push_front_in_order(vec![in_flight.ready]);
                false
            }
            SettleAction::RequeueAt(at) => {
                group.delayed.insert((at, token), in_flight.ready);
                false
            }
        };
        // Every member is woken for a delayed entry too: one of them must recompute its
        // wake-up time to include the release.
        if !removed {
            group.notify_members();
        } else if let Some(notify) = wake_member {
            notify.notify_one();
        }
        Ok(removed)
    }

    /// Up to `limit` retained messages recorded in `[from, to)` after sequence number
    /// `after` (from the window's start without one): a page of a streamed read.
    pub(crate) fn history_page(
        &self,
        from: SystemTime,
        to: SystemTime,
        after: Option<u64>,
        limit: usize,
    ) -> Vec<HistoryEntry> {
        let first = match after {
            None => self.log.partition_point(|e| e.recorded_at < from),
            Some(after) => self.log.partition_point(|e| e.seq <= after),
        };
        self.log
            .range(first..)
            .take_while(|e| e.recorded_at < to)
            .filter(|e| e.recorded_at >= from)
            .take(limit)
            .map(|e| HistoryEntry {
                message: e.message.clone(),
                recorded_at: e.recorded_at,
                position: Some(Position::Sequence(e.seq)),
            })
            .collect()
    }

    /// Close the topic and wake everyone waiting on it.
    pub(crate) fn close(&mut self) {
        self.closed = true;
        for group in self.groups.iter().flatten() {
            group.notify_members();
        }
    }

    /// What waits for the named group (ready and held back for a delayed requeue) and what
    /// its members hold; zero for a group that never joined.
    pub(crate) fn backlog(&self, group: &str) -> helix_messaging_core::Backlog {
        let Some(group) = self
            .group_slots
            .get(group)
            .and_then(|&slot| self.groups.get(slot))
            .and_then(Option::as_ref)
        else {
            return helix_messaging_core::Backlog::default();
        };
        helix_messaging_core::Backlog {
            waiting: (group.ready_len + group.delayed.len()) as u64,
            in_flight: Some(group.in_flight.len() as u64),
        }
    }

    /// Number of groups and their total depth (health, tests).
    pub(crate) fn depth(&self) -> usize {
        self.groups.iter().flatten().map(Group::depth).sum()
    }

    /// How many messages a group may hold.
    pub(crate) fn capacity(&self) -> usize {
        self.config.max_queue_depth
    }

    /// The depth of the fullest group (0 without groups).
    pub(crate) fn fullest(&self) -> usize {
        self.groups
            .iter()
            .flatten()
            .map(Group::depth)
            .max()
            .unwrap_or(0)
    }

    /// Every member's wake-up, to be woken for each message published.
    pub(crate) fn wake_ups(&self) -> Vec<Arc<Notify>> {
        self.groups
            .iter()
            .flatten()
            .flat_map(|group| group.members.iter().map(|m| m.notify.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn in_flight(token: u64, member: u64) -> InFlight {
        InFlight {
            ready: Ready {
                message: Arc::new(Message::new("m")),
                seq: token,
                deliveries: 1,
                expires_at: None,
            },
            token,
            member,
            deadline: None,
        }
    }

    /// Tokens are unique in the topic, indices in the group: the two differ whenever the
    /// topic has other groups.
    fn token_of(index: u64) -> u64 {
        3 * index + 7
    }

    #[test]
    fn one_delivery_held_while_a_hundred_thousand_are_settled_keeps_the_table_small() {
        let mut table = InFlightTable::new();
        assert_eq!(table.push(in_flight(token_of(0), 1)), 0);
        for index in 1..100_000 {
            assert_eq!(table.push(in_flight(token_of(index), 1)), index);
            let settled = table.remove(index, token_of(index)).expect("held");
            assert_eq!(settled.token, token_of(index));
            assert!(
                table.ring.len() <= RING_SLACK + 1,
                "{} slots for {} deliveries at {index}",
                table.ring.len(),
                table.len()
            );
        }
        assert_eq!(table.len(), 1);
        assert_eq!(table.first().map(|f| f.token), Some(token_of(0)));
        assert!(
            table.remove(0, token_of(0)).is_some(),
            "the held one settles"
        );
        assert_eq!(table.len(), 0);
        assert!(table.first().is_none());
    }

    #[test]
    fn a_burst_in_flight_gives_its_memory_back_once_settled() {
        let mut table = InFlightTable::new();
        for index in 0..100_000 {
            assert_eq!(table.push(in_flight(token_of(index), 1)), index);
        }
        assert!(table.ring.capacity() >= 100_000);
        for index in 0..100_000 {
            table.remove(index, token_of(index)).expect("held");
        }
        assert!(
            table.ring.capacity() <= 4 * RING_SLACK,
            "{} slots kept",
            table.ring.capacity()
        );
    }

    #[test]
    fn a_token_that_is_not_the_one_at_its_index_settles_nothing() {
        let mut table = InFlightTable::new();
        for index in 0..3_000 {
            assert_eq!(table.push(in_flight(token_of(index), 1)), index);
        }
        // Past the ring's front and inside it, and an index never given.
        for index in [0, 1_500, 2_999] {
            assert!(table.remove(index, token_of(index) + 1).is_none());
        }
        assert!(table.remove(3_000, token_of(3_000)).is_none());
        assert_eq!(table.len(), 3_000);
        // The same once the oldest have moved aside: settle all but 0 and 1 of the first
        // 2,500, so the ring is mostly empty slots and its front half moves.
        for index in 2..2_500 {
            table.remove(index, token_of(index)).expect("held");
        }
        for index in 2_500..3_000 {
            table.remove(index, token_of(index)).expect("held");
        }
        for index in 3_000..6_000 {
            assert_eq!(table.push(in_flight(token_of(index), 1)), index);
            table.remove(index, token_of(index)).expect("held");
        }
        assert!(table.base > 1, "the oldest moved out of the ring");
        assert!(table.remove(1, token_of(1) + 1).is_none());
        assert_eq!(
            table.remove(1, token_of(1)).map(|f| f.token),
            Some(token_of(1))
        );
    }

    #[test]
    fn the_oldest_comes_first_wherever_it_is_kept() {
        let mut table = InFlightTable::new();
        for index in 0..5_000 {
            assert_eq!(table.push(in_flight(token_of(index), index % 2)), index);
        }
        // Settle every index but multiples of 100 below 4,000: the ring's front moves aside.
        for index in (0..4_000).filter(|i| i % 100 != 0) {
            table.remove(index, token_of(index)).expect("held");
        }
        for index in 5_000..9_000 {
            assert_eq!(table.push(in_flight(token_of(index), 0)), index);
            table.remove(index, token_of(index)).expect("held");
        }
        assert!(!table.held_long.is_empty(), "some moved aside");
        let mut popped = Vec::new();
        while let Some(f) = table.pop_first_if(|f| f.token < token_of(4_100)) {
            popped.push(f.token);
        }
        let want: Vec<u64> = (0..4_000)
            .step_by(100)
            .chain(4_000..4_100)
            .map(token_of)
            .collect();
        assert_eq!(popped, want, "oldest first, stopping at the first not due");
        assert_eq!(table.first().map(|f| f.token), Some(token_of(4_100)));
        // A member's deliveries go, oldest first, and only theirs.
        let odd = table.remove_where(|f| f.member == 1);
        assert!(odd.iter().all(|f| f.member == 1));
        assert!(odd.windows(2).all(|w| w[0].token < w[1].token));
        assert_eq!(odd.len(), 450);
        assert_eq!(table.len(), 450);
    }
}
