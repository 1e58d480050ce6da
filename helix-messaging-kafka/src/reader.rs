//! The reader of a subscription: the task that polls its consumer (which also runs its
//! rebalances), buffers what arrives, hands deliveries out within the prefetch window, stores
//! the commit points their settlements move, and commits when the subscription ends.
//!
//! Group consumers: where a subscription starts, which offsets it commits, and how its
//! deliveries are handed out and settled. The reader is the top of them; beneath it
//! [`crate::rebalance`] holds the consumer's rebalance callbacks, [`crate::acker`] the
//! settling of a delivery, and [`crate::offsets`] (with [`crate::attempts`]) the bookkeeping
//! the three share, free of I/O.
//!
//! A delayed requeue writes a copy to the group's own retry topic (`<topic>.retry.<group>`,
//! read by the group's members in the group `<group>.helix-retry`) carrying the attempts so far
//! and the time it is due, and then settles the original. A member reading a copy that is
//! not due yet holds it, and the records behind it, and pauses that one partition until it
//! is due; every other partition keeps flowing. The copy is committed only once it is
//! settled, so a crash while it waits loses nothing.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::FutureExt as _;
use futures::StreamExt as _;
use helix_messaging_core::{DeliveryInfo, Position, Result, UnboxedDelivery};
use rdkafka::TopicPartitionList;
use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::message::Message as _;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use crate::acker::{AckContext, Buffered, KafkaAcker};
use crate::error::from_kafka;
use crate::offsets::{GroupState, Registered};
use crate::rebalance::{GroupConsumer, commit_list};
use crate::retry_lane::RetryLane;
use crate::shared::Shared;
use crate::wire;

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
pub(crate) type Handed = (Arc<GroupState>, Vec<Result<Unboxed>>);

/// A delivery as the reader makes it: assembled by the subscription's stream, on the
/// application's task (see [`UnboxedDelivery`]).
pub(crate) type Unboxed = UnboxedDelivery<KafkaAcker>;

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
    pub(crate) retry: Option<Arc<RetryLane>>,
}

/// Commit what a leaving member settled. A coordinator that is moving or a rebalance under
/// way (another member joining as this one leaves) fails a commit only for the moment:
/// it is tried again, polling meanwhile so the consumer can finish that rebalance, rather
/// than given up, which would have the next owner redeliver settled messages.
async fn final_commit(consumer: &Arc<GroupConsumer>, state: &GroupState) {
    let topic = state.topic();
    use backon::BackoffBuilder;
    let mut waits = backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(1))
        .with_max_times(10)
        .build();
    loop {
        // Built afresh each time: a rebalance meanwhile took the revoked partitions out (and
        // committed them), and committing them again could move their new owner back.
        let offsets = commit_list(topic, state.commit_points());
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
        let (acks, again_rx) = AckContext::new(
            &parts.consumer,
            parts.state.clone(),
            parts.topic.clone(),
            parts.retry,
        );
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
        let mut assignments = self.state.assignments();
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
                _ = store_ticks.tick() => self.store_settled(),
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
                        // One stream for the burst: each `recv` makes a stream of its own,
                        // which takes a slot in the consumer's waker list under its lock
                        // and gives it back, for every record.
                        let mut records = self.consumer.stream();
                        for _ in 1..RECV_BURST {
                            self.gather(&mut buffer, &permits, &mut out);
                            if pauses.wanted() {
                                break;
                            }
                            match records.next().now_or_never().flatten() {
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
        out: &mut Vec<Result<Unboxed>>,
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
    fn send_out(&self, out: &mut Vec<Result<Unboxed>>) -> bool {
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
        let mut records = self.consumer.stream();
        let drained = loop {
            match records.next().now_or_never().flatten() {
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

    /// Store, for the consumer's next automatic commit, every commit point that moved since
    /// the last call, with the attempts of the records still out. Runs on a short tick rather
    /// than per settlement: only the last store before a commit counts, and building the
    /// attempts list for each of thousands of settlements a second cost more than the
    /// consuming itself. Revocations and the final commit read the points directly.
    fn store_settled(&self) {
        let moved = self.state.take_moved();
        if moved.is_empty() {
            return;
        }
        let tpl = commit_list(self.state.topic(), moved);
        // `store_offsets` stores exactly each point; librdkafka's single-offset store would
        // store `point + 1` and skip a message.
        if let Err(err) = self.consumer.store_offsets(&tpl) {
            // Revoked meanwhile: its new owner starts from the last commit, which at worst
            // redelivers; anything else is tried again on the next tick.
            tracing::debug!(topic = %self.state.topic(), error = %err, "storing offsets failed");
            self.state.store_failed();
        }
    }

    /// Report a consumer error on the subscription and pause briefly; `false` once the
    /// subscription is gone.
    async fn report(&self, err: rdkafka::error::KafkaError) -> bool {
        let err = from_kafka(err, format!("consuming {}", self.state.topic()));
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
        tpl.add_partition(self.state.topic(), partition);
        let result = if pause {
            self.consumer.pause(&tpl)
        } else {
            self.consumer.resume(&tpl)
        };
        if let Err(err) = result {
            tracing::warn!(topic = %self.state.topic(), partition, pause, error = %err, "pausing or resuming a partition failed");
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

    fn delivery(&self, item: Buffered, permit: OwnedSemaphorePermit) -> Unboxed {
        let acker = KafkaAcker::new(self.acks.clone(), &item, permit);
        Unboxed {
            message: item.message,
            info: DeliveryInfo {
                topic: self.topic.clone(),
                group: self.group.clone(),
                attempt: item.attempt,
                redelivered: item.attempt > 1,
                position: Some(Position::Offset {
                    partition: item.partition,
                    offset: item.offset,
                }),
            },
            acker,
        }
    }
}
