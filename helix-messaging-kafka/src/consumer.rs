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

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use helix_messaging_core::{
    Acknowledge, Delivery, DeliveryInfo, Error, ErrorKind, Message, Position, Result, Settlement,
    StartPosition,
};
use parking_lot::Mutex;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::KafkaResult;
use rdkafka::message::Message as _;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};

use crate::error::from_kafka;
use crate::{Shared, history, wire};

/// The consumer type of a subscription.
pub(crate) type GroupConsumer = StreamConsumer<GroupContext>;

/// Offsets of one assigned partition.
struct Tracker {
    /// Which assignment this is: settlements from an earlier one are refused.
    generation: u64,
    /// Offsets handed out (or buffered) and not settled yet.
    pending: BTreeSet<i64>,
    /// The offset after the highest one received, or the start position; `None` when
    /// librdkafka resolved the start itself and nothing has arrived yet.
    next: Option<i64>,
    /// The offset last stored for commit.
    stored: i64,
}

impl Tracker {
    fn new(generation: u64, start: Option<i64>) -> Self {
        Tracker {
            generation,
            pending: BTreeSet::new(),
            next: start,
            stored: start.unwrap_or(i64::MIN),
        }
    }

    /// Everything below this offset is settled; `None` while it is not known.
    fn commit_point(&self) -> Option<i64> {
        self.pending.first().copied().or(self.next)
    }
}

/// What a subscription's rebalance callback and its deliveries share.
pub(crate) struct GroupState {
    topic: String,
    start: StartPosition,
    timeout: Duration,
    clock_skew: Duration,
    partitions: Mutex<HashMap<i32, Tracker>>,
    generation: AtomicU64,
    /// Counts assignments, so `subscribe` can wait for the first.
    assignments: watch::Sender<u64>,
    /// Messages recorded before this are skipped: a start time the broker could not look up
    /// by itself.
    not_before: Mutex<Option<SystemTime>>,
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
            assignments: watch::Sender::new(0),
            not_before: Mutex::default(),
        })
    }

    /// Resolves once the group has assigned this member its partitions (possibly none).
    pub(crate) async fn first_assignment(&self) {
        let mut changes = self.assignments.subscribe();
        let _ = changes.wait_for(|n| *n > 0).await;
    }

    /// Where a partition without a committed offset starts.
    fn start_offset<C: ConsumerContext>(&self, consumer: &BaseConsumer<C>, partition: i32) -> i64 {
        let watermarks = consumer.fetch_watermarks(&self.topic, partition, self.timeout);
        let (low, high) = match watermarks {
            Ok(marks) => marks,
            Err(err) => {
                tracing::warn!(topic = %self.topic, partition, error = %err, "cannot read watermarks; starting at the beginning");
                (0, 0)
            }
        };
        match self.start {
            StartPosition::Latest => high,
            StartPosition::Earliest => low,
            StartPosition::Time(since) => {
                *self.not_before.lock() = Some(since);
                let mut query = TopicPartitionList::new();
                let _ = query.add_partition_offset(
                    &self.topic,
                    partition,
                    Offset::Offset(history::lookup_millis(since, self.clock_skew)),
                );
                let found = consumer.offsets_for_times(query, self.timeout).ok();
                history::offset_for_time(found.as_ref(), &self.topic, partition, (low, high))
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
                .map(|e| e.offset());
            let start = match (&committed, known) {
                (_, Some(Offset::Offset(o))) => Some(o),
                // The lookup failed: librdkafka's own resolution (committed, else
                // `auto.offset.reset`) is the safe choice.
                (None, _) => None,
                (Some(_), _) => {
                    let start = self.start_offset(consumer, partition);
                    let _ =
                        fresh.add_partition_offset(&self.topic, partition, Offset::Offset(start));
                    Some(start)
                }
            };
            let offset = start.map_or(Offset::Stored, Offset::Offset);
            let _ = positions.add_partition_offset(&self.topic, partition, offset);
            trackers.push((partition, start));
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
        for (partition, start) in trackers {
            partitions.insert(partition, Tracker::new(generation, start));
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
                let point = partitions
                    .remove(&element.partition())
                    .and_then(|t| t.commit_point());
                tracing::debug!(topic = %self.topic, partition = element.partition(), ?point, "partition revoked");
                if let Some(point) = point {
                    let _ = store.add_partition_offset(
                        &self.topic,
                        element.partition(),
                        Offset::Offset(point),
                    );
                }
            }
        }
        if store.count() > 0
            && let Err(err) = consumer.commit(&store, CommitMode::Sync)
        {
            tracing::warn!(topic = %self.topic, error = %err, "committing revoked partitions failed");
        }
    }

    /// Record that `offset` of `partition` was received; `None` if the partition is no longer
    /// assigned here.
    fn register(&self, partition: i32, offset: i64) -> Option<u64> {
        let mut partitions = self.partitions.lock();
        let tracker = partitions.get_mut(&partition)?;
        tracker.pending.insert(offset);
        tracker.next = Some(tracker.next.map_or(offset + 1, |n| n.max(offset + 1)));
        Some(tracker.generation)
    }

    /// Whether deliveries of `partition` from assignment `generation` may still be handed out.
    fn holds(&self, partition: i32, generation: u64) -> bool {
        self.partitions
            .lock()
            .get(&partition)
            .is_some_and(|t| t.generation == generation)
    }

    /// Mark `offset` settled and store the new commit point if it moved.
    fn settle(
        &self,
        consumer: &GroupConsumer,
        partition: i32,
        offset: i64,
        generation: u64,
    ) -> Result<()> {
        let store = {
            let mut partitions = self.partitions.lock();
            let tracker = partitions
                .get_mut(&partition)
                .filter(|t| t.generation == generation)
                .ok_or_else(|| {
                    Error::new(
                        ErrorKind::NotFound,
                        format!(
                            "partition {partition} of {} was reassigned; its new owner receives this message again",
                            self.topic
                        ),
                    )
                })?;
            tracker.pending.remove(&offset);
            tracker
                .commit_point()
                .filter(|p| *p > tracker.stored)
                .inspect(|p| {
                    tracker.stored = *p;
                })
        };
        if let Some(point) = store {
            // `store_offsets` stores exactly `point`; librdkafka's single-offset store would
            // store `point + 1` and skip a message.
            let mut tpl = TopicPartitionList::new();
            let _ = tpl.add_partition_offset(&self.topic, partition, Offset::Offset(point));
            consumer.store_offsets(&tpl).map_err(|e| {
                from_kafka(
                    e,
                    format!("storing offset {point} of partition {partition}"),
                )
            })?;
        }
        Ok(())
    }

    fn not_before(&self) -> Option<SystemTime> {
        *self.not_before.lock()
    }
}

/// The rebalance callback of a subscription's consumer.
pub(crate) struct GroupContext {
    pub(crate) state: Arc<GroupState>,
}

impl ClientContext for GroupContext {}

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
struct Buffered {
    message: Message,
    attempt: u32,
    partition: i32,
    offset: i64,
    generation: u64,
}

/// Everything a subscription's reader task needs.
pub(crate) struct Reader {
    pub(crate) consumer: Arc<GroupConsumer>,
    pub(crate) state: Arc<GroupState>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) deliveries: mpsc::UnboundedSender<Result<Delivery>>,
    pub(crate) prefetch: usize,
    pub(crate) topic: Arc<str>,
    pub(crate) group: Option<Arc<str>>,
}

impl Reader {
    /// Poll the consumer (which also runs its rebalances), buffer what arrives, hand it out
    /// while fewer than `prefetch` deliveries are unsettled, and pause fetching while the
    /// buffer is full. Ends when the subscription is dropped or the broker closed.
    pub(crate) async fn run(self) {
        let permits = Arc::new(Semaphore::new(self.prefetch));
        let mut buffer: VecDeque<Buffered> = VecDeque::new();
        let mut paused = false;
        let mut closed = self.shared.closed.subscribe();
        let mut assignments = self.state.assignments.subscribe();
        loop {
            if paused && buffer.len() < self.prefetch / 2 {
                paused = !self.set_paused(false);
            }
            tokio::select! {
                biased;
                () = async { let _ = closed.wait_for(|c| *c).await; } => break,
                () = self.deliveries.closed() => break,
                Ok(()) = assignments.changed() => {
                    // Revoked partitions' records are not handed out any more, and a new
                    // assignment must not inherit a pause from an earlier one.
                    buffer.retain(|b| self.state.holds(b.partition, b.generation));
                    paused = buffer.len() >= self.prefetch && self.set_paused(true);
                    if !paused {
                        self.set_paused(false);
                    }
                }
                permit = permits.clone().acquire_owned(), if !buffer.is_empty() => {
                    let Ok(permit) = permit else { break };
                    let Some(item) = buffer.pop_front() else { continue };
                    if !self.state.holds(item.partition, item.generation) {
                        continue;
                    }
                    let delivery = self.delivery(item, permit);
                    if self.deliveries.send(Ok(delivery)).is_err() {
                        break;
                    }
                }
                received = self.consumer.recv() => match received {
                    Ok(record) => {
                        let (partition, offset) = (record.partition(), record.offset());
                        let Some(generation) = self.state.register(partition, offset) else {
                            continue;
                        };
                        let received = wire::received(&record);
                        drop(record);
                        let now = SystemTime::now();
                        let too_old = self
                            .state
                            .not_before()
                            .is_some_and(|t| received.message.timestamp() < t);
                        if too_old || wire::expired(&received.message, now) {
                            let _ = self.state.settle(&self.consumer, partition, offset, generation);
                            continue;
                        }
                        buffer.push_back(Buffered {
                            message: received.message,
                            attempt: received.attempt,
                            partition,
                            offset,
                            generation,
                        });
                        if !paused && buffer.len() >= self.prefetch {
                            paused = self.set_paused(true);
                        }
                    }
                    Err(err) => {
                        let err = from_kafka(err, format!("consuming {}", self.state.topic));
                        tracing::warn!(error = %err, "consumer error");
                        if self.deliveries.send(Err(err)).is_err() {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
        self.shutdown(&permits).await;
    }

    /// Pause or resume fetching every assigned partition; returns whether it took effect.
    fn set_paused(&self, pause: bool) -> bool {
        let Ok(assignment) = self.consumer.assignment() else {
            return false;
        };
        let result = if pause {
            self.consumer.pause(&assignment)
        } else {
            self.consumer.resume(&assignment)
        };
        result.is_ok()
    }

    /// Stop fetching, give deliveries still out `shutdown_grace` to be settled (the consumer
    /// keeps polling meanwhile, so the group is not held up), commit, and leave the group.
    async fn shutdown(self, permits: &Semaphore) {
        self.set_paused(true);
        let deadline = tokio::time::Instant::now() + self.shared.config.shutdown_grace;
        while permits.available_permits() < self.prefetch && tokio::time::Instant::now() < deadline
        {
            // Records still arriving are not registered: they stay uncommitted, so the next
            // owner of the partition reads them.
            let _ = tokio::time::timeout(Duration::from_millis(50), self.consumer.recv()).await;
        }
        let consumer = self.consumer;
        let state = self.state;
        // Committing and closing block on the network.
        let _ = tokio::task::spawn_blocking(move || {
            let mut store = TopicPartitionList::new();
            for (partition, tracker) in state.partitions.lock().iter() {
                if let Some(point) = tracker.commit_point() {
                    let _ =
                        store.add_partition_offset(&state.topic, *partition, Offset::Offset(point));
                }
            }
            if store.count() > 0 {
                let committed: KafkaResult<()> = consumer.commit(&store, CommitMode::Sync);
                if let Err(err) = committed {
                    tracing::warn!(topic = %state.topic, error = %err, "final commit failed");
                }
            }
            drop(consumer);
        })
        .await;
    }

    fn delivery(&self, item: Buffered, permit: OwnedSemaphorePermit) -> Delivery {
        let message = Arc::new(item.message);
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
                consumer: Arc::downgrade(&self.consumer),
                state: self.state.clone(),
                shared: self.shared.clone(),
                topic: self.topic.clone(),
                message,
                attempt: item.attempt,
                partition: item.partition,
                offset: item.offset,
                generation: item.generation,
                _permit: permit,
            }),
        )
    }
}

/// Settles one delivery. Holds a prefetch permit until it is dropped.
struct KafkaAcker {
    /// Weak: a subscription that has ended must be able to leave its group.
    consumer: Weak<GroupConsumer>,
    state: Arc<GroupState>,
    shared: Arc<Shared>,
    topic: Arc<str>,
    message: Arc<Message>,
    attempt: u32,
    partition: i32,
    offset: i64,
    generation: u64,
    _permit: OwnedSemaphorePermit,
}

#[async_trait]
impl Acknowledge for KafkaAcker {
    async fn settle(self: Box<Self>, outcome: Settlement) -> Result<()> {
        if outcome == Settlement::Requeue {
            // Kafka cannot hand one record out again without rewinding the whole partition,
            // so a requeue publishes a copy (same key, same partition, at its end) carrying
            // the attempts so far, and settles the original once the copy is stored. If the
            // copy fails, the original stays unsettled and is redelivered from the committed
            // offset after the next rebalance or restart: never lost.
            self.shared
                .publish_one(&self.topic, &self.message, Some(self.attempt))
                .await?;
        }
        let consumer = self.consumer.upgrade().ok_or_else(|| {
            Error::new(
                ErrorKind::NotFound,
                format!(
                    "the subscription to {} has ended; the message is redelivered from the committed offset",
                    self.topic
                ),
            )
        })?;
        self.state
            .settle(&consumer, self.partition, self.offset, self.generation)
    }
}
