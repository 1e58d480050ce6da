//! The consumer context of a subscription: the rebalance callbacks, which decide where
//! assigned partitions start and commit what revoked ones settled.
//!
//! On revoke, a partition's trackers are dropped: buffered deliveries of it are discarded and a
//! later settlement of one already handed out fails with
//! [`ErrorKind::NotFound`](helix_messaging_core::ErrorKind::NotFound) (its new owner gets it
//! again from the committed offset).
//!
//! Apart from the offsets: this is where their bookkeeping meets the broker, in callbacks
//! librdkafka runs on the reader's task while it polls (they block on the broker there).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use helix_messaging_core::StartPosition;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use crate::config::KafkaConfig;
use crate::history;
use crate::offsets::{Commit, GroupState};

/// The consumer type of a subscription.
pub(crate) type GroupConsumer = StreamConsumer<GroupContext>;

/// Resolves once the group has assigned this member its partitions (possibly none).
pub(crate) async fn first_assignment(state: &GroupState) {
    let mut changes = state.assignments();
    let _ = changes.wait_for(|n| *n > 0).await;
}

/// The rebalance callback of a subscription's consumer.
pub(crate) struct GroupContext {
    state: Arc<GroupState>,
    reconnects: crate::reconnects::Reconnects,
    /// Where a partition the group has no committed offset for starts.
    start: StartPosition,
    timeout: Duration,
    clock_skew: Duration,
}

impl GroupContext {
    /// The context of a consumer whose partitions `state` tracks, and which starts one the
    /// group has no committed offset for at `start`.
    pub(crate) fn new(state: Arc<GroupState>, start: StartPosition, config: &KafkaConfig) -> Self {
        GroupContext {
            state,
            reconnects: crate::reconnects::Reconnects::default(),
            start,
            timeout: config.request_timeout,
            clock_skew: config.clock_skew,
        }
    }

    /// Where a partition without a committed offset starts, and for a start by time the
    /// history filter (see [`Assigned`](crate::offsets::Assigned)).
    fn start_offset<C: ConsumerContext>(
        &self,
        consumer: &BaseConsumer<C>,
        partition: i32,
    ) -> (i64, Option<(i64, SystemTime)>) {
        let topic = self.state.topic();
        let watermarks = consumer.fetch_watermarks(topic, partition, self.timeout);
        let (low, high) = match watermarks {
            Ok(marks) => marks,
            Err(err) => {
                tracing::warn!(topic = %topic, partition, error = %err, "cannot read watermarks; starting at the beginning");
                (0, 0)
            }
        };
        match self.start {
            StartPosition::Latest => (high, None),
            StartPosition::Earliest => (low, None),
            StartPosition::Time(since) => {
                let mut query = TopicPartitionList::new();
                let _ = query.add_partition_offset(
                    topic,
                    partition,
                    Offset::Offset(history::lookup_millis(since, self.clock_skew)),
                );
                let found = consumer.offsets_for_times(query, self.timeout).ok();
                let start = history::offset_for_time(found.as_ref(), topic, partition, (low, high));
                (start, Some((high, since)))
            }
        }
    }

    fn on_assign<C: ConsumerContext>(
        &self,
        consumer: &BaseConsumer<C>,
        assigned: &TopicPartitionList,
    ) -> TopicPartitionList {
        let topic = self.state.topic();
        let committed = (0..3).find_map(|_| {
            consumer
                .committed_offsets(assigned.clone(), self.timeout)
                .ok()
        });
        let mut positions = TopicPartitionList::new();
        let mut fresh = TopicPartitionList::new();
        let generation = self.state.next_generation();
        let mut trackers = Vec::new();
        for element in assigned.elements_for_topic(topic) {
            let partition = element.partition();
            let known = committed
                .as_ref()
                .and_then(|c| c.find_partition(topic, partition))
                .map(|e| (e.offset(), e.metadata().to_owned()));
            let (start, metadata, filter) = match (&committed, known) {
                (_, Some((Offset::Offset(o), metadata))) => (Some(o), Some(metadata), None),
                // The lookup failed: librdkafka's own resolution (committed, else
                // `auto.offset.reset`) is the safe choice.
                (None, _) => (None, None, None),
                (Some(_), _) => {
                    let (start, filter) = self.start_offset(consumer, partition);
                    let _ = fresh.add_partition_offset(topic, partition, Offset::Offset(start));
                    (Some(start), None, filter)
                }
            };
            let offset = start.map_or(Offset::Stored, Offset::Offset);
            let _ = positions.add_partition_offset(topic, partition, offset);
            trackers.push((partition, start, metadata, filter));
        }
        // A new group's position is committed at once, so what is published while it has no
        // member waits for the next one.
        if fresh.count() > 0
            && let Err(err) = consumer.commit(&fresh, CommitMode::Sync)
        {
            tracing::warn!(topic = %topic, error = %err, "committing the start position failed");
        }
        tracing::debug!(topic = %topic, generation, ?trackers, "partitions assigned");
        self.state.track(generation, trackers);
        positions
    }

    fn on_revoke<C: ConsumerContext>(
        &self,
        consumer: &BaseConsumer<C>,
        revoked: &TopicPartitionList,
    ) {
        let topic = self.state.topic();
        let partitions = revoked.elements_for_topic(topic);
        let store = commit_list(
            topic,
            self.state
                .revoke(partitions.iter().map(|element| element.partition())),
        );
        // Stored too: on unassign the consumer commits its stored offsets, and a store that
        // lags the tick would move the group back.
        if store.count() > 0
            && let Err(err) = consumer
                .store_offsets(&store)
                .and_then(|()| consumer.commit(&store, CommitMode::Sync))
        {
            tracing::warn!(topic = %topic, error = %err, "committing revoked partitions failed");
        }
    }
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
                let positions = self.on_assign(consumer, tpl);
                if let Err(err) = consumer.assign(&positions) {
                    tracing::error!(topic = %self.state.topic(), error = %err, "assigning partitions failed");
                }
                self.state.assigned();
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.on_revoke(consumer, tpl);
                let _ = consumer.unassign();
            }
            other => {
                tracing::error!(topic = %self.state.topic(), error = ?other, "rebalance failed");
                let _ = consumer.unassign();
            }
        }
    }
}

/// A list to store or commit: the commit points of partitions of `topic`, with their
/// metadata.
pub(crate) fn commit_list(topic: &str, commits: Vec<Commit>) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    for (partition, point, metadata) in commits {
        add_commit(&mut tpl, topic, partition, point, &metadata);
    }
    tpl
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
