//! Reading a topic's history by time range.
//!
//! Each partition is positioned at the broker's offset for the window's start (less the clock
//! skew) where the broker can look offsets up by time, else at its beginning, and read up to
//! the high watermark taken when the read began; records are then filtered by their own
//! timestamps, so the result is exactly the window whatever the broker's lookup does.
//!
//! The read streams: each partition has its own queue (bounded by
//! `queued.max.messages.kbytes`, so the client stops fetching a partition that is ahead),
//! and the partitions are merged k-way by timestamp, holding one record per partition.
//! Nothing is paused and resumed, so a fetch never restarts inside a record batch.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use backon::{BlockingRetryable, ExponentialBuilder};
use helix_messaging_core::{
    Error, ErrorKind, HistoryEntry, HistoryStream, Position, Result, TimeRange,
};
use rdkafka::consumer::base_consumer::PartitionQueue;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, DefaultConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message as _;
use rdkafka::{Offset, TopicPartitionList};

use crate::config::KafkaConfig;
use crate::error::from_kafka;
use crate::wire;

/// The timestamp (ms) to look offsets up at for a read starting at `t`: `clock_skew` earlier,
/// since the lookup uses the brokers' clock and the filter afterwards the publishers'.
pub(crate) fn lookup_millis(t: SystemTime, clock_skew: Duration) -> i64 {
    wire::millis(t.checked_sub(clock_skew).unwrap_or(t))
}

/// Where a read by time starts in `partition`, whose offsets run from `low` to `high`, given
/// the answer of an offset-for-time lookup (ListOffsets by timestamp, which Apache Kafka
/// answers from its time index). A broker without a timestamp index (Tansu 0.6) answers
/// with an error or no offset, and so does a failed lookup: the read then starts at the
/// beginning and the filter by time keeps the window exact.
pub(crate) fn offset_for_time(
    found: Option<&TopicPartitionList>,
    topic: &str,
    partition: i32,
    (low, high): (i64, i64),
) -> i64 {
    match found
        .and_then(|t| t.find_partition(topic, partition))
        .map(|e| e.offset())
    {
        Some(Offset::Offset(o)) if o >= low => o,
        Some(Offset::End) => high,
        _ => low,
    }
}

/// Entries handed from the reading thread to the stream ahead of being asked for.
const HANDOFF: usize = 256;

/// What the consumer's main queue holds for a partition fetched before it had a queue of its
/// own (the client fetches from the assignment on, and a loaded machine may split the queues
/// only once a partition's whole window is fetched).
enum Early {
    /// A record, at its offset.
    Entry(i64, HistoryEntry),
    /// The end of the partition: no partition-end event follows on the partition's own
    /// queue, which without it would wait for records that never come.
    End,
}

/// The next event of `consumer`'s main queue, waiting up to `timeout`, with the partition it
/// is about; `None` when there is none.
fn main_queue_event(
    consumer: &BaseConsumer,
    topic: &str,
    timeout: Duration,
) -> Option<Result<(i32, Early)>> {
    Some(match consumer.poll(timeout)? {
        Ok(record) => {
            let (partition, offset) = (record.partition(), record.offset());
            Ok((
                partition,
                Early::Entry(offset, entry(&record, partition, offset)),
            ))
        }
        Err(KafkaError::PartitionEOF(partition)) => Ok((partition, Early::End)),
        Err(err) => Err(from_kafka(err, format!("reading {topic}"))),
    })
}

/// One partition of a read: its queue, where it ends, and its next entry in the window.
struct Part {
    partition: i32,
    /// Where the read began: the broker's offset for the window's start (or the beginning).
    start: i64,
    /// The high watermark when the read began. The read ends at the partition's
    /// end-of-partition event, which follows the fetch responses' high watermark, and takes
    /// this only as a lower bound: on Apache Kafka the two agree, but Tansu 0.6 answers a
    /// ListOffsets for the latest offset with the last record batch's base offset + 1, a
    /// point inside the last batch, and a read ending there would miss its end.
    end: i64,
    queue: PartitionQueue<DefaultConsumerContext>,
    /// What was fetched before the partition had its own queue, which arrives on the
    /// consumer's main queue; it precedes everything on the partition queue.
    early: std::collections::VecDeque<Early>,
    head: Option<HistoryEntry>,
    done: bool,
}

/// A read in progress. Blocking: drive it off the async threads.
pub(crate) struct Reader {
    // Dropped after the queues (fields drop in order), which must not outlive it.
    parts: Vec<Part>,
    consumer: Arc<BaseConsumer>,
    topic: String,
    range: TimeRange,
    timeout: Duration,
    clock_skew: Duration,
}

/// The partition ids of `topic` (none when it does not exist). Blocking.
fn partitions_of(consumer: &BaseConsumer, topic: &str, timeout: Duration) -> Result<Vec<i32>> {
    let metadata = consumer
        .fetch_metadata(Some(topic), timeout)
        .map_err(|e| from_kafka(e, format!("reading the metadata of {topic}")))?;
    Ok(metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect())
}

/// A client that speaks for `group` to its coordinator without joining it.
fn group_client(config: &KafkaConfig, group: &str, doing: &str) -> Result<BaseConsumer> {
    let mut client = config.reader();
    client.set("group.id", group);
    client.create().map_err(|e| config.client_error(e, doing))
}

/// What `group` has committed on `partitions` of `topic`.
fn committed_offsets(
    consumer: &BaseConsumer,
    topic: &str,
    group: &str,
    partitions: &[i32],
    timeout: Duration,
) -> Result<TopicPartitionList> {
    let mut query = TopicPartitionList::new();
    for partition in partitions {
        query.add_partition(topic, *partition);
    }
    consumer
        .committed_offsets(query, timeout)
        .map_err(|e| from_kafka(e, format!("reading {group}'s committed offsets on {topic}")))
}

/// The low and high watermarks of one partition.
fn watermarks(
    consumer: &BaseConsumer,
    topic: &str,
    partition: i32,
    timeout: Duration,
) -> Result<(i64, i64)> {
    consumer
        .fetch_watermarks(topic, partition, timeout)
        .map_err(|e| from_kafka(e, format!("reading the watermarks of {topic}/{partition}")))
}

/// How many records of `topic` (a Kafka topic name) `group` has not committed past, over
/// every partition. Blocking. Asks the group's coordinator without joining the group.
pub(crate) fn group_lag(config: &KafkaConfig, topic: &str, group: &str) -> Result<u64> {
    let consumer = group_client(config, group, "creating a lag reader")?;
    retrying(config, || lag_of(config, &consumer, topic, group))
}

/// One attempt of [`group_lag`].
fn lag_of(config: &KafkaConfig, consumer: &BaseConsumer, topic: &str, group: &str) -> Result<u64> {
    let timeout = config.request_timeout;
    let partitions = partitions_of(consumer, topic, timeout)?;
    if partitions.is_empty() {
        return Ok(0);
    }
    let committed = committed_offsets(consumer, topic, group, &partitions, timeout)?;
    let mut lag = 0u64;
    for partition in partitions {
        let (low, high) = watermarks(consumer, topic, partition, timeout)?;
        let from = match committed
            .find_partition(topic, partition)
            .map(|p| p.offset())
        {
            Some(Offset::Offset(at)) => at.max(low),
            _ => low,
        };
        lag += u64::try_from(high - from).unwrap_or(0);
    }
    Ok(lag)
}

/// Create `group` on `topic` (a Kafka topic name) without joining it: every partition the
/// group has no committed offset on gets its high watermark committed, as a member's first
/// assignment would. A commit from outside the group is refused while it has members; once
/// they are placed they commit their start, so the attempt is repeated until every
/// partition has a committed offset. Blocking.
///
/// A topic just created has no leaders for a moment (`NotLeaderForPartition`, no partitions
/// in its metadata): such retryable failures are tried again for up to the request timeout.
pub(crate) fn create_group(config: &KafkaConfig, topic: &str, group: &str) -> Result<()> {
    let consumer = group_client(config, group, "creating a group creator")?;
    retrying(config, || commit_start(config, &consumer, topic, group))
}

/// Run `attempt` again while it fails retryably (a topic or cluster just created has no
/// leader or coordinator for a moment), for up to the request timeout. Blocking.
fn retrying<T>(config: &KafkaConfig, attempt: impl FnMut() -> Result<T>) -> Result<T> {
    let backoff = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(Duration::from_millis(500))
        .with_total_delay(Some(config.request_timeout))
        .without_max_times();
    attempt
        .retry(backoff)
        .sleep(std::thread::sleep)
        .when(Error::is_retryable)
        .call()
}

/// One attempt of [`create_group`].
fn commit_start(
    config: &KafkaConfig,
    consumer: &BaseConsumer,
    topic: &str,
    group: &str,
) -> Result<()> {
    let timeout = config.request_timeout;
    let partitions = partitions_of(consumer, topic, timeout)?;
    if partitions.is_empty() {
        return Err(Error::new(
            ErrorKind::Backend,
            format!("creating group {group} on {topic}: its partitions are not known yet"),
        )
        .with_retryable(true));
    }
    let committed = committed_offsets(consumer, topic, group, &partitions, timeout)?;
    let mut fresh = TopicPartitionList::new();
    for partition in partitions {
        let known = committed
            .find_partition(topic, partition)
            .is_some_and(|p| matches!(p.offset(), Offset::Offset(_)));
        if !known {
            let (_, high) = watermarks(consumer, topic, partition, timeout)?;
            fresh
                .add_partition_offset(topic, partition, Offset::Offset(high))
                .map_err(|e| {
                    from_kafka(e, format!("positioning {group} on {topic}/{partition}"))
                })?;
        }
    }
    if fresh.count() == 0 {
        return Ok(());
    }
    match consumer.commit(&fresh, CommitMode::Sync) {
        Ok(()) => Ok(()),
        // Refused from outside while the group has members. A member commits its start only
        // once it has been placed, so until every partition has a committed offset the
        // group is still forming: tried again (see `retrying`), and a task published now
        // would not be certain to reach it.
        Err(KafkaError::ConsumerCommit(
            RDKafkaErrorCode::UnknownMemberId
            | RDKafkaErrorCode::IllegalGeneration
            | RDKafkaErrorCode::RebalanceInProgress,
        )) => Err(Error::new(
            ErrorKind::Backend,
            format!(
                "creating group {group} on {topic}: its members have not committed their start yet"
            ),
        )
        .with_retryable(true)),
        // The group's coordinator is still being chosen or loading (a cluster just started).
        Err(
            e @ KafkaError::ConsumerCommit(
                RDKafkaErrorCode::CoordinatorNotAvailable
                | RDKafkaErrorCode::NotCoordinator
                | RDKafkaErrorCode::CoordinatorLoadInProgress,
            ),
        ) => Err(from_kafka(e, format!("creating group {group} on {topic}")).with_retryable(true)),
        Err(e) => Err(from_kafka(e, format!("creating group {group} on {topic}"))),
    }
}

/// Start reading `topic` (a Kafka topic name) inside `range`. Blocking.
pub(crate) fn open(config: &KafkaConfig, topic: &str, range: TimeRange) -> Result<Reader> {
    open_with(config, topic, range, |_, _| Ok(Vec::new()))
}

/// [`open`], running `before_split` between the assignment and the split of the partitions'
/// queues with the consumer and the partitions read; what it takes off the consumer's main
/// queue goes to those partitions as fetched before the split. A test holds a read there
/// until its partitions are fetched to their ends, as a loaded machine may.
fn open_with(
    config: &KafkaConfig,
    topic: &str,
    range: TimeRange,
    before_split: impl FnOnce(&BaseConsumer, &[i32]) -> Result<Vec<(i32, Early)>>,
) -> Result<Reader> {
    let consumer: Arc<BaseConsumer> = Arc::new(
        config
            .reader()
            .create()
            .map_err(|e| config.client_error(e, "creating a history reader"))?,
    );
    let timeout = config.request_timeout;
    let partitions = partitions_of(&consumer, topic, timeout)?;
    let start_ms = lookup_millis(range.from(), config.clock_skew);
    let mut query = TopicPartitionList::new();
    for partition in &partitions {
        let _ = query.add_partition_offset(topic, *partition, Offset::Offset(start_ms));
    }
    let by_time = consumer.offsets_for_times(query, timeout).ok();

    let mut assignment = TopicPartitionList::new();
    let mut ends = Vec::new();
    for partition in partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, partition, timeout)
            .map_err(|e| from_kafka(e, format!("reading the offsets of {topic}/{partition}")))?;
        let start = offset_for_time(by_time.as_ref(), topic, partition, (low, high));
        if start < high {
            let _ = assignment.add_partition_offset(topic, partition, Offset::Offset(start));
            ends.push((partition, start, high));
        }
    }
    if !ends.is_empty() {
        consumer
            .assign(&assignment)
            .map_err(|e| from_kafka(e, format!("reading {topic}")))?;
    }
    let read: Vec<i32> = ends.iter().map(|(partition, _, _)| *partition).collect();
    let fetched = before_split(&consumer, &read)?;
    // After the assignment: assigning deactivates the partition queues split before it.
    let mut parts = Vec::with_capacity(ends.len());
    for (partition, start, end) in ends {
        let queue = consumer
            .split_partition_queue(topic, partition)
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Backend,
                    format!("reading {topic}/{partition}: no queue of its own"),
                )
            })?;
        parts.push(Part {
            partition,
            start,
            end,
            queue,
            early: std::collections::VecDeque::new(),
            head: None,
            done: false,
        });
    }
    for (partition, early) in fetched {
        if let Some(part) = parts.iter_mut().find(|p| p.partition == partition) {
            part.early.push_back(early);
        }
    }
    for part in &parts {
        tracing::debug!(
            topic,
            partition = part.partition,
            start = part.start,
            end = part.end,
            "reading history"
        );
    }
    Ok(Reader {
        parts,
        consumer,
        topic: topic.to_owned(),
        range,
        timeout,
        clock_skew: config.clock_skew,
    })
}

impl Reader {
    /// Serve the client's events; what was fetched before the split is kept for its
    /// partition.
    fn serve_main_queue(&mut self) -> Result<()> {
        while let Some(event) = main_queue_event(&self.consumer, &self.topic, Duration::ZERO) {
            let (partition, early) = event?;
            if let Some(part) = self.parts.iter_mut().find(|p| p.partition == partition) {
                part.early.push_back(early);
            }
        }
        Ok(())
    }

    /// Fill `part`'s head with its next record in the window, or mark it done.
    fn fill(&mut self, index: usize) -> Result<()> {
        let mut waited_since = Instant::now();
        while self.parts[index].head.is_none() && !self.parts[index].done {
            self.serve_main_queue()?;
            let (topic, range, timeout) = (&self.topic, self.range, self.timeout);
            let past_window = range.to() + self.clock_skew;
            let part = &mut self.parts[index];
            let (offset, entry) = match part.early.pop_front() {
                Some(Early::Entry(offset, entry)) => (offset, entry),
                Some(Early::End) => {
                    part.done = true;
                    continue;
                }
                None => match part.queue.poll(Duration::from_millis(100)) {
                    None => {
                        if waited_since.elapsed() > timeout {
                            return Err(Error::new(
                                ErrorKind::Timeout,
                                format!(
                                    "reading the history of {topic}/{}: no records for {timeout:?} before its end",
                                    part.partition
                                ),
                            ));
                        }
                        continue;
                    }
                    Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => {
                        part.done = true;
                        continue;
                    }
                    Some(Err(err)) => return Err(from_kafka(err, format!("reading {topic}"))),
                    Some(Ok(record)) => {
                        let offset = record.offset();
                        (offset, entry(&record, part.partition, offset))
                    }
                },
            };
            waited_since = Instant::now();
            // Past the end the read began at and past the window (with the clock skew's
            // allowance): what follows was written after the read began.
            if offset >= part.end && entry.recorded_at >= past_window {
                part.done = true;
                continue;
            }
            if range.contains(entry.recorded_at) {
                part.head = Some(entry);
            }
        }
        Ok(())
    }

    /// The next entry of the window across partitions: the oldest of the partitions' heads
    /// (ties by partition), or `None` at the end.
    pub(crate) fn next_entry(&mut self) -> Option<Result<HistoryEntry>> {
        for index in 0..self.parts.len() {
            if let Err(err) = self.fill(index) {
                return Some(Err(err));
            }
        }
        let oldest = self
            .parts
            .iter_mut()
            .filter(|p| p.head.is_some())
            .min_by_key(|p| (p.head.as_ref().map(|h| h.recorded_at), p.partition))?;
        oldest.head.take().map(Ok)
    }
}

fn entry(
    record: &rdkafka::message::BorrowedMessage<'_>,
    partition: i32,
    offset: i64,
) -> HistoryEntry {
    let received = wire::received(record);
    HistoryEntry {
        message: Arc::new(received.message),
        recorded_at: received.recorded_at,
        position: Some(Position::Offset { partition, offset }),
    }
}

/// Stream `topic` (a Kafka topic name) inside `range`, oldest first.
pub(crate) async fn stream(
    config: KafkaConfig,
    topic: String,
    range: TimeRange,
) -> Result<HistoryStream> {
    let mut reader =
        crate::error::blocking("reading history", move || open(&config, &topic, range)).await?;
    let (tx, rx) = tokio::sync::mpsc::channel(HANDOFF);
    tokio::task::spawn_blocking(move || {
        while let Some(entry) = reader.next_entry() {
            let failed = entry.is_err();
            // The stream was dropped: stop reading.
            if tx.blocking_send(entry).is_err() || failed {
                break;
            }
        }
    });
    Ok(Box::pin(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|entry| (entry, rx))
    })))
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use helix_messaging_core::{Broker, Message, Publisher, TimeRange};

    use crate::KafkaBroker;
    use crate::config::KafkaConfig;
    use crate::topics::KafkaTopic;

    /// A read by time starts where the broker's time index says (ListOffsets by timestamp),
    /// not at the partition's beginning: against the test broker (Apache Kafka on
    /// 127.0.0.1:9092, `KAFKA_BROKERS` overrides), ten records a minute apart, a window from
    /// just after the sixth.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_read_by_time_starts_at_the_brokers_offset_for_the_time() {
        let brokers = std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into());
        let config = KafkaConfig::new(brokers);
        let broker = KafkaBroker::connect(config.clone())
            .await
            .expect("Kafka on 127.0.0.1:9092 (scripts/test starts it)");
        let topic = helix_messaging_testkit::fresh_name("by-time");
        broker
            .create_topics(&[KafkaTopic::new(&topic, 1)])
            .await
            .unwrap();
        let t0 = SystemTime::now() - Duration::from_secs(3600);
        let minute = Duration::from_secs(60);
        for i in 0..10u32 {
            let at = t0 + minute * i;
            broker
                .publish(&topic, Message::new(format!("m{i}")).with_timestamp(at))
                .await
                .unwrap();
        }
        let range = TimeRange::new(t0 + minute * 5 + minute / 2, SystemTime::now()).unwrap();
        let kafka_topic = config.kafka_topic(&topic);
        let reader = tokio::task::spawn_blocking(move || super::open(&config, &kafka_topic, range))
            .await
            .unwrap()
            .unwrap();
        let starts: Vec<i64> = reader.parts.iter().map(|p| p.start).collect();
        assert_eq!(
            starts,
            vec![6],
            "the first record at or after the window's start"
        );
        drop(reader);
        broker.close().await.unwrap();
    }

    /// Takes events off `consumer`'s main queue until it has had the end of each of
    /// `partitions`, failing after 20 s.
    fn hold_until_fetched(
        consumer: &rdkafka::consumer::BaseConsumer,
        topic: &str,
        partitions: &[i32],
    ) -> helix_messaging_core::Result<Vec<(i32, super::Early)>> {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let mut fetched = Vec::new();
        let mut ended = std::collections::BTreeSet::new();
        while ended.len() < partitions.len() {
            assert!(
                std::time::Instant::now() < deadline,
                "{topic}: only partitions {ended:?} of {partitions:?} fetched to their ends in 20 s"
            );
            if let Some(event) =
                super::main_queue_event(consumer, topic, Duration::from_millis(100))
            {
                let (partition, early) = event?;
                if matches!(early, super::Early::End) {
                    ended.insert(partition);
                }
                fetched.push((partition, early));
            }
        }
        Ok(fetched)
    }

    /// A partition fetched to its end before the read split its queue off has its records
    /// and its end on the consumer's main queue and nothing on its own queue (the client
    /// fetches from the assignment on, and on a loaded machine the split can come that
    /// late): the read still ends, with every record, rather than wait on the partition's
    /// queue for an end that never comes until it times out. Against the test broker, the
    /// read held before the split until the main queue has every partition's end.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_partition_fetched_to_its_end_before_the_split_still_ends_the_read() {
        let brokers = std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into());
        let mut config = KafkaConfig::new(brokers);
        // How long a read waits for a partition's next event: a read waiting for an end
        // that never comes fails in 3 s.
        config.request_timeout = Duration::from_secs(3);
        let broker = KafkaBroker::connect(config.clone())
            .await
            .expect("Kafka on 127.0.0.1:9092 (scripts/test starts it)");
        let topic = helix_messaging_testkit::fresh_name("fetched-before-split");
        broker
            .create_topics(&[KafkaTopic::new(&topic, 3)])
            .await
            .unwrap();
        let from = SystemTime::now() - Duration::from_secs(1);
        let sent: Vec<String> = (0..12).map(|i| format!("m{i:02}")).collect();
        for id in &sent {
            broker
                .publish(&topic, Message::new("x").with_id(id).with_key(id))
                .await
                .unwrap();
        }
        let range = TimeRange::new(from, SystemTime::now() + Duration::from_secs(1)).unwrap();
        let kafka_topic = config.kafka_topic(&topic);
        let read =
            tokio::task::spawn_blocking(move || -> helix_messaging_core::Result<Vec<String>> {
                let mut reader =
                    super::open_with(&config, &kafka_topic, range, |consumer, parts| {
                        hold_until_fetched(consumer, &kafka_topic, parts)
                    })?;
                let mut ids = Vec::new();
                while let Some(entry) = reader.next_entry() {
                    ids.push(entry?.message.id().to_owned());
                }
                Ok(ids)
            })
            .await
            .unwrap();
        let mut ids = read.expect("the read ends without an error");
        ids.sort();
        assert_eq!(ids, sent);
        broker.close().await.unwrap();
    }
}
