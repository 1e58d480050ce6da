//! Reading a topic's history by time range.
//!
//! Each partition is positioned at the broker's offset for the window's start (less the clock
//! skew) where the broker can look offsets up by time, else at its beginning, and read up to
//! the high watermark taken when the read began; records are then filtered by their own
//! timestamps, so the result is exactly the window whatever the broker's lookup does. Entries
//! of all partitions are returned oldest first.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use helix_messaging_core::{Error, ErrorKind, HistoryEntry, Position, Result, TimeRange};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message as _;
use rdkafka::{Offset, TopicPartitionList};

use crate::error::from_kafka;
use crate::{KafkaConfig, wire};

/// The timestamp (ms) to look offsets up at for a read starting at `t`: `clock_skew` earlier,
/// since the lookup uses the brokers' clock and the filter afterwards the publishers'.
pub(crate) fn lookup_millis(t: SystemTime, clock_skew: Duration) -> i64 {
    wire::millis(t.checked_sub(clock_skew).unwrap_or(t))
}

/// Where a read by time starts in `partition`, whose offsets run from `low` to `high`, given
/// the answer of an offset-for-time lookup. Brokers without a timestamp index (Tansu) answer
/// with an error or no offset: the read then starts at the beginning and filters by time.
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

/// Read `topic` (a Kafka topic name) inside `range`. Blocking: run it off the async threads.
pub(crate) fn read(
    config: &KafkaConfig,
    topic: &str,
    range: TimeRange,
) -> Result<Vec<HistoryEntry>> {
    let consumer: BaseConsumer = config
        .reader()
        .create()
        .map_err(|e| config.client_error(e, "creating a history reader"))?;
    let timeout = config.request_timeout;
    let metadata = consumer
        .fetch_metadata(Some(topic), timeout)
        .map_err(|e| from_kafka(e, format!("reading the metadata of {topic}")))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    let start_ms = lookup_millis(range.from(), config.clock_skew);
    let mut query = TopicPartitionList::new();
    for partition in &partitions {
        let _ = query.add_partition_offset(topic, *partition, Offset::Offset(start_ms));
    }
    let by_time = consumer.offsets_for_times(query, timeout).ok();

    let mut assignment = TopicPartitionList::new();
    // Where each partition's read ends: its high watermark when the read began.
    let mut ends = std::collections::HashMap::new();
    for partition in partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, partition, timeout)
            .map_err(|e| from_kafka(e, format!("reading the offsets of {topic}/{partition}")))?;
        let start = offset_for_time(by_time.as_ref(), topic, partition, (low, high));
        if start < high {
            let _ = assignment.add_partition_offset(topic, partition, Offset::Offset(start));
            ends.insert(partition, high);
        }
    }
    if ends.is_empty() {
        return Ok(Vec::new());
    }
    consumer
        .assign(&assignment)
        .map_err(|e| from_kafka(e, format!("reading {topic}")))?;

    let mut entries = Vec::new();
    let mut last_progress = Instant::now();
    while !ends.is_empty() {
        match consumer.poll(Duration::from_millis(100)) {
            None => {
                if last_progress.elapsed() > timeout {
                    return Err(Error::new(
                        ErrorKind::Timeout,
                        format!(
                            "reading the history of {topic}: no records for {timeout:?} before its end"
                        ),
                    ));
                }
            }
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(partition))) => {
                ends.remove(&partition);
            }
            Some(Err(err)) => return Err(from_kafka(err, format!("reading {topic}"))),
            Some(Ok(record)) => {
                last_progress = Instant::now();
                let (partition, offset) = (record.partition(), record.offset());
                let Some(end) = ends.get(&partition).copied() else {
                    continue;
                };
                if offset + 1 >= end {
                    ends.remove(&partition);
                }
                if offset >= end {
                    continue;
                }
                let received = wire::received(&record);
                if range.contains(received.recorded_at) {
                    entries.push(HistoryEntry {
                        message: Arc::new(received.message),
                        recorded_at: received.recorded_at,
                        position: Some(Position::Offset { partition, offset }),
                    });
                }
            }
        }
    }
    entries.sort_by(|a, b| {
        let key = |e: &HistoryEntry| match e.position {
            Some(Position::Offset { partition, offset }) => (partition, offset),
            _ => (0, 0),
        };
        a.recorded_at
            .cmp(&b.recorded_at)
            .then_with(|| key(a).cmp(&key(b)))
    });
    Ok(entries)
}
