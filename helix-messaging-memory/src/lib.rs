//! The in-process broker of helix-messaging: the embedded default backend and the reference
//! implementation every other backend is compared to.
//!
//! It keeps everything in this process (nothing survives a restart) and implements every other
//! promise of the contract: consumer groups with competing members and fan-out across groups,
//! ack / requeue / reject with attempt counting, redelivery of unacked messages when their
//! subscription is dropped or their ack deadline passes, priority order, per-message TTL,
//! bounded queues with backpressure, and a retained log readable by time range.
//!
//! ```
//! use futures::StreamExt;
//! use helix_messaging_core::{Broker, Message, Publisher, SubscribeOptions, Subscriber};
//! use helix_messaging_memory::MemoryBroker;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> helix_messaging_core::Result<()> {
//! let broker = MemoryBroker::new();
//! let mut sub = broker.subscribe("greetings", SubscribeOptions::group("workers")).await?;
//! broker.publish("greetings", Message::new("hello")).await?;
//! let delivery = sub.next().await.expect("a delivery")?;
//! assert_eq!(delivery.message().payload().as_ref(), b"hello");
//! delivery.ack().await?;
//! # Ok(()) }
//! ```

mod config;
mod state;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Instant, SystemTime};

use async_trait::async_trait;
use crossbeam_utils::CachePadded;
use helix_messaging_core::{
    Acknowledge, Backlog, BatchReport, Broker, Capabilities, Delivery, DeliveryInfo, Error,
    ErrorKind, Health, HistoryEntry, HistoryStream, Message, Position, Publisher, Result,
    Settlement, SubscribeOptions, Subscriber, Subscription, TimeRange, check_payload_size,
    validate_name,
};
use parking_lot::{Mutex, MutexGuard, RwLock};
use tokio::sync::Notify;

pub use config::{DEFAULT_MAX_PAYLOAD_BYTES, MemoryConfig};
use state::{
    Blocked, Evicted, Inboxed, LazyNow, SettleAction, SettleError, Take, Taken, TopicState,
};

/// Backend name reported by [`Broker::name`].
pub const NAME: &str = "memory";

/// What the memory broker promises (with the default payload limit).
pub const CAPABILITIES: Capabilities = Capabilities {
    metadata: true,
    durable: false,
    redelivery: true,
    consumer_groups: true,
    per_key_ordering: true,
    priority: true,
    ttl: true,
    redeliver_unacked: true,
    replay_by_time: true,
    native_dlq: false,
    delayed_requeue: true,
    backlog: true,
    max_payload_bytes: Some(DEFAULT_MAX_PAYLOAD_BYTES),
};

/// Deliveries a subscription moves out of the shared queue per lock acquisition (bounded by
/// its prefetch), so a busy consumer does not take the topic lock once per message.
const TAKE_BATCH: usize = 64;

/// Entries copied out of a topic per lock taken by a history read.
const HISTORY_PAGE: usize = 1024;

/// Counters of one topic, for diagnostics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TopicStats {
    /// Messages queued or unacked, summed over the topic's groups.
    pub depth: usize,
    /// Messages dropped because their TTL passed before delivery.
    pub expired: u64,
}

struct Topic {
    name: Arc<str>,
    state: Mutex<TopicState>,
    /// Publishers waiting for room in a full group.
    space: Notify,
    /// How many publishers are publishing under the lock, each of which may wait on `space`
    /// (counted from before its first check). A settlement that frees a slot wakes one of
    /// them while any are counted: waking them all for every slot made hundreds of callers
    /// fight over one slot under the topic lock, and waking one only when the group was full
    /// before could leave a second waiter asleep beside room freed by the next settlement.
    space_waiters: AtomicUsize,
    /// Messages published without taking `state`'s lock.
    inbox: Inbox,
}

/// Where a publish leaves its message when every group has room for it, so that publishing
/// does not take the topic lock the consumers take for every batch and every settlement:
/// publisher and consumer fighting over that lock, and sleeping on it, cost the memory
/// broker two thirds of a bare channel's rate. Whoever holds the lock next enters the
/// messages waiting here in the order they were published, before it reads or changes
/// anything else ([`Topic::lock`]), so every reader sees every publish that returned.
///
/// Each field a publisher and a consumer both touch has a cache line of its own, so that
/// writing one does not take the others away from the other core.
struct Inbox {
    queue: CachePadded<Mutex<Vec<Inboxed>>>,
    /// Messages admitted and not yet entered: counted before they are pushed, and uncounted
    /// only after they are entered, so a publisher never sees fewer than there are.
    len: CachePadded<AtomicUsize>,
    /// The fullest group's depth as last recorded under the lock. With `len` it never falls
    /// short of the true depth: a message entered from the inbox stays counted in `len`
    /// until this is recorded after it, a message published under the lock is counted here
    /// before it is entered, and a joining group holds it at the bound until it is seeded.
    /// With it a publisher decides without the lock that a message fits.
    fullest: CachePadded<AtomicUsize>,
    /// Every member's wake-up, woken for each message put here.
    wake_ups: CachePadded<RwLock<Vec<Arc<Notify>>>>,
    /// Whether `evicted` holds any, read by every publish without taking its lock.
    has_evicted: CachePadded<AtomicBool>,
    /// Messages retention evicted while a consumer entered the inbox, freed by the next
    /// publisher: glibc frees memory another thread allocated on its slow path, under the
    /// lock of the allocating thread's arena, which that thread is taking to allocate the
    /// next message. Entering them from a consumer's thread and freeing them there cost
    /// more than the inbox saved. No more than [`EVICTED_KEPT`] wait here: past that the
    /// lock holder frees them (publishing has stopped), and closing frees them all.
    evicted: CachePadded<Mutex<Vec<Arc<Message>>>>,
}

/// How many evicted messages may wait for a publisher to free them.
const EVICTED_KEPT: usize = 256;

/// How many messages may wait in an inbox before a publisher takes the lock and enters
/// them itself: keeps the log and the groups current on a topic nobody reads.
const INBOX_LIMIT: usize = 1024;

impl Topic {
    /// The state, locked, after entering every message waiting in the inbox.
    fn lock(&self) -> MutexGuard<'_, TopicState> {
        let mut state = self.state.lock();
        self.enter_inbox(&mut state);
        state
    }

    fn enter_inbox(&self, state: &mut TopicState) {
        if self.inbox.len.load(Ordering::Acquire) == 0 {
            return;
        }
        let mut evicted = Evicted::new();
        // Swapped with the lock holder's empty one, so that neither side allocates a queue
        // again, nor frees one the other allocated.
        let mut waiting = std::mem::take(&mut state.inbox_spare);
        std::mem::swap(&mut *self.inbox.queue.lock(), &mut waiting);
        let count = waiting.len();
        for inboxed in waiting.drain(..) {
            state.enter(inboxed, &mut evicted);
        }
        state.inbox_spare = waiting;
        if count == 0 {
            return;
        }
        if !evicted.is_empty() {
            let mut kept = self.inbox.evicted.lock();
            kept.extend(evicted);
            if kept.len() > EVICTED_KEPT {
                kept.clear();
            }
            self.inbox
                .has_evicted
                .store(!kept.is_empty(), Ordering::Release);
        }
        // Raised before the count drops, so a publisher never sees room that is not there.
        self.note_depth(state);
        self.inbox.len.fetch_sub(count, Ordering::SeqCst);
    }

    /// Publish `count` messages without the lock if every group has room for them besides
    /// those already admitted, the inbox is not over its limit and the topic is open; the
    /// caller then pushes them with [`Topic::push`]. Otherwise nothing is admitted.
    fn admit(&self, count: usize, capacity: usize) -> bool {
        let before = self.inbox.len.fetch_add(count, Ordering::SeqCst);
        let fits = before < INBOX_LIMIT
            && self.inbox.fullest.load(Ordering::SeqCst) + before + count <= capacity;
        if !fits {
            self.inbox.len.fetch_sub(count, Ordering::SeqCst);
        }
        fits
    }

    /// Put admitted messages in the inbox and wake every member. Returns what retention
    /// evicted meanwhile, for the caller to free once it holds no lock.
    fn push(&self, messages: impl IntoIterator<Item = Inboxed>) -> Vec<Arc<Message>> {
        self.inbox.queue.lock().extend(messages);
        for wake_up in self.inbox.wake_ups.read().iter() {
            wake_up.notify_one();
        }
        self.take_evicted()
    }

    /// What retention evicted and left for a publisher to free, unless another publisher is
    /// taking it: for the caller to free once it holds no lock.
    fn take_evicted(&self) -> Vec<Arc<Message>> {
        if !self.inbox.has_evicted.load(Ordering::Acquire) {
            return Vec::new();
        }
        match self.inbox.evicted.try_lock() {
            Some(mut evicted) => {
                self.inbox.has_evicted.store(false, Ordering::Release);
                std::mem::take(&mut *evicted)
            }
            None => Vec::new(),
        }
    }

    /// Free every evicted message waiting for a publisher.
    fn free_evicted(&self) {
        let evicted = std::mem::take(&mut *self.inbox.evicted.lock());
        self.inbox.has_evicted.store(false, Ordering::Release);
        drop(evicted);
    }

    /// Messages admitted to the inbox and not yet entered.
    fn admitted(&self) -> usize {
        self.inbox.len.load(Ordering::SeqCst)
    }

    /// Record the fullest group's depth after it may have changed under the lock.
    fn note_depth(&self, state: &TopicState) {
        self.inbox.fullest.store(state.fullest(), Ordering::SeqCst);
    }

    /// Record who is to be woken after a member joined or left.
    fn note_members(&self, state: &TopicState) {
        *self.inbox.wake_ups.write() = state.wake_ups();
    }
}

struct Shared {
    config: Arc<MemoryConfig>,
    /// Looked up by every publish: foldhash, seeded per map, hashes a name several times
    /// faster than the standard library's SipHash.
    topics: RwLock<HashMap<Arc<str>, Arc<Topic>, foldhash::fast::RandomState>>,
    closed: AtomicBool,
}

/// The in-process broker. Cheap to clone: clones share the same topics.
#[derive(Clone)]
pub struct MemoryBroker {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for MemoryBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBroker")
            .field("config", &self.shared.config)
            .field("topics", &self.shared.topics.read().len())
            .field("closed", &self.shared.closed.load(Ordering::Relaxed))
            .finish()
    }
}

impl Default for MemoryBroker {
    fn default() -> Self {
        MemoryBroker::new()
    }
}

impl MemoryBroker {
    /// A broker with the default [`MemoryConfig`].
    pub fn new() -> Self {
        MemoryBroker::with_config(MemoryConfig::default())
    }

    /// A broker with `config`.
    pub fn with_config(config: MemoryConfig) -> Self {
        MemoryBroker {
            shared: Arc::new(Shared {
                config: Arc::new(config),
                topics: RwLock::new(HashMap::default()),
                closed: AtomicBool::new(false),
            }),
        }
    }

    /// The configuration in use.
    pub fn config(&self) -> &MemoryConfig {
        &self.shared.config
    }

    /// Counters of `topic` (zero for a topic never used).
    pub fn topic_stats(&self, topic: &str) -> TopicStats {
        match self.shared.topics.read().get(topic) {
            None => TopicStats::default(),
            Some(topic) => {
                let state = topic.lock();
                TopicStats {
                    depth: state.depth(),
                    expired: state.expired,
                }
            }
        }
    }

    fn ensure_open(&self) -> Result<()> {
        if self.shared.closed.load(Ordering::Acquire) {
            Err(Error::closed("the memory broker"))
        } else {
            Ok(())
        }
    }

    fn topic(&self, name: &str) -> Result<Arc<Topic>> {
        // Only a valid name is ever entered below, so one found needs no checking again
        // (this runs for every publish); otherwise the checks come in their usual order.
        if self.ensure_open().is_ok()
            && let Some(topic) = self.shared.topics.read().get(name)
        {
            return Ok(topic.clone());
        }
        validate_name("topic", name)?;
        self.ensure_open()?;
        let mut topics = self.shared.topics.write();
        // Re-checked under the write lock: close() marks topics closed under it, so a topic
        // created here after close would never be closed.
        self.ensure_open()?;
        let topic = topics.entry(Arc::from(name)).or_insert_with_key(|key| {
            Arc::new(Topic {
                name: key.clone(),
                state: Mutex::new(TopicState::new(self.shared.config.clone())),
                space: Notify::new(),
                space_waiters: AtomicUsize::new(0),
                inbox: Inbox {
                    queue: CachePadded::new(Mutex::new(Vec::new())),
                    len: CachePadded::new(AtomicUsize::new(0)),
                    fullest: CachePadded::new(AtomicUsize::new(0)),
                    wake_ups: CachePadded::new(RwLock::new(Vec::new())),
                    has_evicted: CachePadded::new(AtomicBool::new(false)),
                    evicted: CachePadded::new(Mutex::new(Vec::new())),
                },
            })
        });
        Ok(topic.clone())
    }

    fn check_payload(&self, message: &Message) -> Result<()> {
        check_payload_size(NAME, message, self.shared.config.max_payload_bytes)
    }

    /// Enqueue `messages` in order, waiting for room as needed. On failure returns how many
    /// were enqueued before it and the error. Messages come already shared: a future holding
    /// them by value would be one message larger per copy it keeps.
    async fn enqueue_all(
        &self,
        topic: &Topic,
        messages: impl IntoIterator<Item = Arc<Message>>,
    ) -> Result<(), (usize, Error)> {
        let timeout = self.shared.config.publish_timeout;
        let mut done = 0;
        let mut messages = messages.into_iter().peekable();
        // Counted as waiting from the start, before the first check under the lock, so that
        // a settlement after any check sees it (see `Topic::space_waiters`). A publish comes
        // this way when the inbox refused it, mostly because a group is at its bound; this
        // way the lock that finds the room freed is the one that enters the message, where
        // a wait after the first check took one lock to find room and another to use it.
        let _waiting = SpaceWaiter::register(topic);
        // When the current wait for room ends: each message has the publish timeout to be
        // taken, so it starts again once one is.
        let mut deadline = None;
        while messages.peek().is_some() {
            let done_before = done;
            // Registered before the check, so a settlement between the check and the wait
            // still wakes us. Boxed: the notification would otherwise make every publish's
            // future larger than the allocator's per-thread cache serves.
            let mut room_freed = Box::pin(topic.space.notified());
            room_freed.as_mut().enable();
            // Clocks are read and evicted messages freed outside the lock, which publishers
            // and consumers of the topic share.
            let mut now = LazyNow::default();
            let wall = SystemTime::now();
            let mut evicted = Evicted::new();
            let blocked = {
                let mut state = topic.lock();
                // Each message entered adds one to every group; a purge in the check only
                // lowers them, so counting on from here never falls short.
                let mut fullest = state.fullest();
                let blocked = loop {
                    if messages.peek().is_none() {
                        break None;
                    }
                    // The message is counted in the fullest depth before the check reads
                    // what waits admitted: a publisher admitting one meanwhile either sees
                    // this one or is seen by the check.
                    fullest += 1;
                    topic.inbox.fullest.store(fullest, Ordering::SeqCst);
                    if let Err(blocked) = state.check_space(&mut now, topic.admitted()) {
                        break Some(blocked);
                    }
                    let message = messages.next().expect("peeked");
                    state.enqueue(message, &mut now, wall, &mut evicted);
                    done += 1;
                };
                topic.note_depth(&state);
                blocked
            };
            drop(evicted);
            // With the groups full every publish comes this way: left to the inbox's
            // publishers, the evicted messages would pass the limit and be freed by a
            // consumer, on the slow path this avoids.
            drop(topic.take_evicted());
            let full_slot = match blocked {
                None => break,
                Some(Blocked::Closed) => return Err((done, Error::closed("the memory broker"))),
                Some(Blocked::Full { slot }) => slot,
            };
            let checked_at = now.get();
            if done > done_before {
                deadline = None;
            }
            let deadline = *deadline.get_or_insert(checked_at + timeout);
            if checked_at >= deadline {
                let group = topic.state.lock().group_label(full_slot);
                return Err((
                    done,
                    Error::new(
                        ErrorKind::Timeout,
                        format!(
                            "topic {:?}: group {group:?} is full ({} messages) and no room freed within {timeout:?}",
                            topic.name, self.shared.config.max_queue_depth
                        ),
                    ),
                ));
            }
            let _ = tokio::time::timeout_at(deadline.into(), room_freed).await;
        }
        Ok(())
    }

    /// Publish `messages` to the existing topic `name` through its inbox (see [`Inbox`]) if
    /// the broker is open and they fit; otherwise give them back, to be published under the
    /// topic lock. The topic is looked up under the map's read lock, without cloning its
    /// `Arc`: the count shares a cache line with the topic lock, which the consumers take for
    /// every batch and settlement. Holding the read lock also keeps [`Broker::close`], which
    /// takes the write lock, from running between the check that the broker is open and the
    /// push: a message pushed is never one a close has already refused.
    fn try_inbox<I>(&self, name: &str, messages: I) -> std::result::Result<(), I>
    where
        I: ExactSizeIterator<Item = Arc<Message>>,
    {
        let count = messages.len();
        let evicted = {
            let topics = self.shared.topics.read();
            if self.shared.closed.load(Ordering::Acquire) || count == 0 {
                return Err(messages);
            }
            let Some(topic) = topics.get(name) else {
                return Err(messages);
            };
            if !topic.admit(count, self.shared.config.max_queue_depth) {
                return Err(messages);
            }
            let wall = SystemTime::now();
            let mut now = LazyNow::default();
            topic.push(messages.map(|message| Inboxed {
                expires_at: message.ttl().map(|ttl| now.get() + ttl),
                message,
                wall,
            }))
        };
        drop(evicted);
        Ok(())
    }
}

/// A publisher's place among `Topic::space_waiters`, given up however its publish ends.
struct SpaceWaiter<'a>(&'a Topic);

impl<'a> SpaceWaiter<'a> {
    fn register(topic: &'a Topic) -> Self {
        topic.space_waiters.fetch_add(1, Ordering::SeqCst);
        SpaceWaiter(topic)
    }
}

impl Drop for SpaceWaiter<'_> {
    fn drop(&mut self) {
        self.0.space_waiters.fetch_sub(1, Ordering::SeqCst);
    }
}

#[async_trait]
impl Publisher for MemoryBroker {
    async fn publish(&self, topic: &str, message: Message) -> Result<()> {
        let message = Arc::new(message);
        // The long way reports a bad name or a closed broker before an oversized payload.
        let message = if self.check_payload(&message).is_ok() {
            match self.try_inbox(topic, std::iter::once(message)) {
                Ok(()) => return Ok(()),
                Err(mut back) => back.next().expect("the message given back"),
            }
        } else {
            message
        };
        let topic = self.topic(topic)?;
        self.check_payload(&message)?;
        self.enqueue_all(&topic, [message])
            .await
            .map_err(|(_, e)| e)
    }

    async fn publish_batch(&self, name: &str, messages: Vec<Message>) -> BatchReport {
        let total = messages.len();
        let topic = match self.topic(name) {
            Ok(topic) => topic,
            Err(err) => return BatchReport::all_failed(total, &err),
        };
        let mut failures = Vec::new();
        let mut accepted_indices = Vec::with_capacity(total);
        let mut accepted = Vec::with_capacity(total);
        for (index, message) in messages.into_iter().enumerate() {
            match self.check_payload(&message) {
                Ok(()) => {
                    accepted_indices.push(index);
                    accepted.push(message);
                }
                Err(err) => failures.push((index, err)),
            }
        }
        let rest = match self.try_inbox(name, accepted.into_iter().map(Arc::new)) {
            Ok(()) => return BatchReport::new(total, failures),
            Err(rest) => rest,
        };
        if let Err((done, err)) = self.enqueue_all(&topic, rest).await {
            failures.extend(
                accepted_indices[done..]
                    .iter()
                    .map(|&index| (index, err.copy_without_source())),
            );
        }
        BatchReport::new(total, failures)
    }
}

#[async_trait]
impl Subscriber for MemoryBroker {
    async fn subscribe(&self, topic: &str, options: SubscribeOptions) -> Result<Subscription> {
        if let Some(group) = &options.group {
            validate_name("group", group)?;
        }
        let topic = self.topic(topic)?;
        let notify = Arc::new(Notify::new());
        let group_name: Option<Arc<str>> = options.group.as_deref().map(Arc::from);
        let (slot, id) = {
            let mut state = topic.lock();
            if state.closed {
                return Err(Error::closed("the memory broker"));
            }
            // A new group starts with what it takes from the log, past the depth publishers
            // read: they are turned to the lock until it is recorded, and what they were
            // admitted before it, still to be entered, keeps its room.
            topic
                .inbox
                .fullest
                .store(state.capacity(), Ordering::SeqCst);
            let room = state.capacity().saturating_sub(topic.admitted());
            let joined = state.join(
                group_name.clone(),
                options.prefetch,
                options.start,
                notify.clone(),
                room,
            );
            topic.note_depth(&state);
            topic.note_members(&state);
            joined
        };
        let member = MemberStream {
            topic: topic.clone(),
            topic_name: Arc::from(&*topic.name),
            slot,
            id,
            notify,
            group: options.group.as_deref().map(Arc::from),
            buffer: VecDeque::new(),
        };
        let stream = futures::stream::unfold(member, |mut member| async move {
            member.next_delivery().await.map(|d| (Ok(d), member))
        });
        Ok(Subscription::new(
            topic.name.clone(),
            group_name,
            Box::pin(stream),
        ))
    }
}

#[async_trait]
impl Broker for MemoryBroker {
    fn name(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            max_payload_bytes: Some(self.shared.config.max_payload_bytes),
            ..CAPABILITIES
        }
    }

    async fn health(&self) -> Health {
        if self.shared.closed.load(Ordering::Acquire) {
            return Health::unhealthy("the memory broker is closed");
        }
        let topics = self.shared.topics.read();
        let depth: usize = topics.values().map(|t| t.lock().depth()).sum();
        Health::healthy(format!(
            "{} topics, {depth} messages queued or unacked",
            topics.len()
        ))
    }

    async fn backlog(&self, topic: &str, group: &str) -> Result<Backlog> {
        validate_name("topic", topic)?;
        validate_name("group", group)?;
        self.ensure_open()?;
        Ok(match self.shared.topics.read().get(topic) {
            None => Backlog::default(),
            Some(topic) => topic.lock().backlog(group),
        })
    }

    async fn read_range(&self, topic: &str, range: TimeRange) -> Result<HistoryStream> {
        validate_name("topic", topic)?;
        self.ensure_open()?;
        let Some(topic) = self.shared.topics.read().get(topic).cloned() else {
            return Ok(Box::pin(futures::stream::empty()));
        };
        // Page by page, so a long window is never copied whole and publishing goes on
        // between pages.
        let pages = futures::stream::unfold(Some(None), move |after: Option<Option<u64>>| {
            let topic = topic.clone();
            async move {
                let after = after?;
                let page = topic
                    .lock()
                    .history_page(range.from(), range.to(), after, HISTORY_PAGE);
                let next = match page.last() {
                    Some(HistoryEntry {
                        position: Some(Position::Sequence(seq)),
                        ..
                    }) if page.len() == HISTORY_PAGE => Some(Some(*seq)),
                    _ => None,
                };
                (!page.is_empty()).then(|| (futures::stream::iter(page.into_iter().map(Ok)), next))
            }
        });
        Ok(Box::pin(futures::StreamExt::flatten(pages)))
    }

    async fn close(&self) -> Result<()> {
        let topics = self.shared.topics.write();
        self.shared.closed.store(true, Ordering::Release);
        for topic in topics.values() {
            topic.lock().close();
            topic.space.notify_waiters();
            topic.free_evicted();
        }
        Ok(())
    }
}

/// One subscription's view of its group.
struct MemberStream {
    topic: Arc<Topic>,
    /// The topic's and the group's names for each delivery's `DeliveryInfo`, in allocations
    /// of this member's own: each delivery clones and drops them, and the topic's own name
    /// shares its allocation's cache line with the count those clones write, which every
    /// publish reads to find the topic.
    topic_name: Arc<str>,
    slot: usize,
    id: u64,
    notify: Arc<Notify>,
    group: Option<Arc<str>>,
    /// Taken from the group, not yet received by the application. Each becomes a
    /// [`Delivery`] as it is received: made all at once, a take's 64 ackers came from
    /// glibc's slower paths, past the few chunks its per-thread cache holds.
    buffer: VecDeque<Taken>,
}

impl MemberStream {
    async fn next_delivery(&mut self) -> Option<Delivery> {
        loop {
            if let Some(taken) = self.buffer.pop_front() {
                return Some(self.delivery(taken));
            }
            let take = {
                let mut state = self.topic.lock();
                let take = state.take(self.slot, self.id, TAKE_BATCH, Instant::now());
                // Taking drops expired messages: room a publisher may use without the lock.
                self.topic.note_depth(&state);
                take
            };
            match take {
                Take::Some(taken) => self.buffer.extend(taken),
                Take::Closed => return None,
                // notify_one stores a permit, so a publish between take() and here still
                // wakes us.
                Take::Wait(Some(deadline)) => {
                    let _ = tokio::time::timeout_at(deadline.into(), self.notify.notified()).await;
                }
                Take::Wait(None) => self.notify.notified().await,
            }
        }
    }

    fn delivery(&self, taken: Taken) -> Delivery {
        Delivery::new(
            taken.message,
            DeliveryInfo {
                topic: self.topic_name.clone(),
                group: self.group.clone(),
                attempt: taken.attempt,
                redelivered: taken.attempt > 1,
                position: Some(Position::Sequence(taken.seq)),
            },
            Box::new(MemoryAcker {
                topic: self.topic.clone(),
                slot: self.slot,
                token: taken.token,
                index: taken.index,
            }),
        )
    }
}

impl Drop for MemberStream {
    fn drop(&mut self) {
        // What is still buffered was never received: it goes back uncounted.
        let unseen: Vec<u64> = self.buffer.iter().map(|taken| taken.token).collect();
        let group_gone = {
            let mut state = self.topic.lock();
            let gone = state.leave(self.slot, self.id, &unseen);
            self.topic.note_members(&state);
            self.topic.note_depth(&state);
            gone
        };
        if group_gone {
            // A private subscription's group took its room with it: any publisher it held
            // back may go on.
            self.topic.space.notify_waiters();
        }
    }
}

struct MemoryAcker {
    topic: Arc<Topic>,
    slot: usize,
    token: u64,
    /// Where the group keeps the delivery in flight.
    index: u64,
}

#[async_trait]
impl Acknowledge for MemoryAcker {
    fn delays_requeue(&self) -> bool {
        true
    }

    async fn settle(mut self: Box<Self>, outcome: Settlement) -> Result<()> {
        self.settle_now(outcome).unwrap_or(Ok(()))
    }

    /// Every outcome is settled here: the broker is in this process.
    fn settle_now(&mut self, outcome: Settlement) -> Option<Result<()>> {
        let action = match outcome {
            Settlement::Ack | Settlement::Reject => SettleAction::Remove,
            Settlement::Requeue => SettleAction::Requeue,
            Settlement::RequeueAfter(delay) => SettleAction::RequeueAt(Instant::now() + delay),
        };
        let settled = {
            // The inbox is not entered: settling reads and changes nothing it could hold.
            let mut state = self.topic.state.lock();
            let settled = state.settle(self.slot, self.token, self.index, action);
            // Only where the depth a publisher reads could turn it away: elsewhere the next
            // take records it, and writing it here for every ack takes its cache line from
            // the publishers' core as often.
            if matches!(settled, Ok(true))
                && self.topic.inbox.fullest.load(Ordering::Relaxed) + 2 * INBOX_LIMIT
                    >= state.capacity()
            {
                self.topic.note_depth(&state);
            }
            settled
        };
        Some(match settled {
            Ok(freed_slot) => {
                // SeqCst pairs with the waiter's increment: either it is seen here, or the
                // waiter's check under the lock saw the freed slot.
                if freed_slot && self.topic.space_waiters.load(Ordering::SeqCst) > 0 {
                    self.topic.space.notify_one();
                }
                Ok(())
            }
            Err(SettleError::Closed) => Err(Error::closed("the memory broker")),
            Err(SettleError::NotHeld) => Err(Error::new(
                ErrorKind::NotFound,
                format!(
                    "delivery {} on topic {:?} is no longer held (its subscription was dropped or its ack deadline passed); it is redelivered instead",
                    self.token, self.topic.name
                ),
            )),
        })
    }
}
