//! The replay journal: a stream queue bound to the exchange with `#`, so it keeps every
//! message published to any topic (see [`RabbitConfig::replay_journal`]).
//!
//! A read starts from the stream's offset for a time (or its first entry) and has to know
//! where to stop, which a stream consumer never learns by itself: the reader first appends a
//! fence (an entry carrying a fresh id in `x-helix-fence`, sent straight to the stream) and
//! reads until it meets that fence. Everything confirmed before the read began lies before
//! the fence. Other readers' fences are skipped.
//!
//! The stream is positioned by the broker's append time at second resolution, so a read
//! starts [`RabbitConfig::journal_clock_skew`] early and filters on the messages' own
//! timestamps: the result is exactly the window whatever the broker's granularity.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use helix_messaging_core::{
    Error, ErrorKind, HistoryEntry, HistoryStream, Message, Position, Result, TimeRange, within,
};
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, Consumer};

use crate::config::RabbitConfig;
use crate::consumer::close_consumer;
use crate::error::from_lapin;
use crate::link::Link;
use crate::shared::Shared;
use crate::wire;

/// Entries a journal read holds unacked (streams need a prefetch to consume at all); they
/// are acked together once half of them have arrived.
const READ_PREFETCH: u16 = 1000;

/// Copies to a new group's queue kept in flight before waiting for their confirms.
const COPY_WINDOW: usize = 256;

/// Whether queue `name` exists (a passive declaration on a throwaway channel, since a
/// refused one closes its channel).
pub(crate) async fn queue_exists(shared: &Shared, link: &Link, name: &str) -> Result<bool> {
    let channel = link
        .connection
        .create_channel()
        .await
        .map_err(|e| shared.connection_error(e, "opening a channel"))?;
    let declared = channel
        .queue_declare(
            name.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await;
    if channel.status().connected() {
        let _ = channel.close(200, "checked".into()).await;
    }
    match declared {
        Ok(_) => Ok(true),
        Err(err) => match from_lapin(err, format!("looking up queue {name:?}")) {
            err if err.kind() == ErrorKind::NotFound => Ok(false),
            err => Err(err),
        },
    }
}

/// One read of the journal: the entries of one topic, oldest first, up to this read's fence.
struct JournalReader {
    current: Option<(Channel, Consumer)>,
    fence: String,
    topic: Arc<str>,
    journal: String,
    /// Longest wait for the next entry: the fence is already there, so a longer silence
    /// means the connection is gone.
    patience: std::time::Duration,
    /// Entries received since the last ack.
    unacked: u16,
}

impl JournalReader {
    /// Append the fence, then start reading at `since` (minus the clock skew), or at the
    /// first entry.
    async fn open(
        shared: &Shared,
        link: &Link,
        topic: &str,
        since: Option<SystemTime>,
    ) -> Result<Self> {
        let config: &RabbitConfig = shared.config();
        let journal = config.journal_queue();
        let fence = uuid::Uuid::new_v4().simple().to_string();
        let marker = Message::new("").with_header(wire::FENCE, fence.as_str());
        let confirm = shared
            .within_publish_timeout(&journal, shared.start_publish("", &journal, &marker, None))
            .await?;
        shared.confirmed(&journal, confirm).await?;

        let offset = match since {
            None => AMQPValue::LongString(LongString::from(b"first".to_vec())),
            Some(since) => {
                let start = since
                    .checked_sub(config.journal_clock_skew)
                    .unwrap_or(UNIX_EPOCH);
                let secs = start
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs();
                AMQPValue::Timestamp(secs)
            }
        };
        let mut arguments = FieldTable::default();
        arguments.insert("x-stream-offset".into(), offset);
        let lapin_err = |e, doing: &str| shared.connection_error(e, doing);
        let opened = async {
            let channel = link
                .connection
                .create_channel()
                .await
                .map_err(|e| lapin_err(e, "opening a channel to read the journal"))?;
            channel
                .basic_qos(READ_PREFETCH, BasicQosOptions::default())
                .await
                .map_err(|e| lapin_err(e, "setting the journal read's prefetch"))?;
            let consumer = channel
                .basic_consume(
                    journal.as_str().into(),
                    format!("helix-replay-{fence}").into(),
                    BasicConsumeOptions::default(),
                    arguments,
                )
                .await
                .map_err(|e| lapin_err(e, "reading the replay journal"))?;
            Ok::<_, Error>((channel, consumer))
        };
        let current =
            within(config.connect_timeout, "opening the replay journal", opened).await??;
        Ok(JournalReader {
            current: Some(current),
            fence,
            topic: Arc::from(topic),
            journal,
            patience: config.publish_timeout,
            unacked: 0,
        })
    }

    /// The next entry of the topic, or `None` at the fence.
    async fn next(&mut self) -> Result<Option<lapin::message::Delivery>> {
        loop {
            let Some((_, consumer)) = self.current.as_mut() else {
                return Ok(None);
            };
            let next = within(
                self.patience,
                format!("reading the replay journal {}", self.journal),
                consumer.next(),
            )
            .await?;
            let delivery = match next {
                Some(Ok(delivery)) => delivery,
                Some(Err(err)) => return Err(from_lapin(err, "reading the replay journal")),
                None => {
                    return Err(Error::new(
                        ErrorKind::Connection,
                        "the replay journal's consumer was cancelled before the read finished",
                    ));
                }
            };
            // A stream consumer's acks only return credit, so one for many will do.
            self.unacked += 1;
            if self.unacked >= READ_PREFETCH / 2 {
                self.unacked = 0;
                delivery
                    .acker
                    .ack(BasicAckOptions { multiple: true })
                    .await
                    .map_err(|e| from_lapin(e, "acknowledging journal entries"))?;
            }
            if let Some(fence) = wire::header(&delivery.properties, wire::FENCE) {
                if matches!(fence, AMQPValue::LongString(id) if id.as_bytes() == self.fence.as_bytes())
                {
                    self.finish();
                    return Ok(None);
                }
                continue;
            }
            if delivery.routing_key.as_str() == &*self.topic {
                return Ok(Some(delivery));
            }
        }
    }

    fn finish(&mut self) {
        if let Some((channel, consumer)) = self.current.take() {
            close_consumer(channel, consumer, None, None);
        }
    }
}

impl Drop for JournalReader {
    fn drop(&mut self) {
        self.finish();
    }
}

/// `topic`'s journal entries recorded (by message timestamp) inside `range`.
pub(crate) async fn read_range(
    shared: &Shared,
    link: &Link,
    topic: &str,
    range: TimeRange,
) -> Result<HistoryStream> {
    let reader = JournalReader::open(shared, link, topic, Some(range.from())).await?;
    Ok(Box::pin(futures::stream::unfold(
        Some(reader),
        move |reader| async move {
            let mut reader = reader?;
            loop {
                match reader.next().await {
                    Ok(None) => return None,
                    Err(err) => return Some((Err(err), None)),
                    Ok(Some(mut delivery)) => {
                        let recorded_at = wire::timestamp(&delivery.properties);
                        if !range.contains(recorded_at) {
                            continue;
                        }
                        let position = wire::stream_offset(&delivery.properties).map(|offset| {
                            Position::Offset {
                                partition: 0,
                                offset,
                            }
                        });
                        let entry = HistoryEntry {
                            message: Arc::new(wire::received(&mut delivery).message),
                            recorded_at,
                            position,
                        };
                        return Some((Ok(entry), Some(reader)));
                    }
                }
            }
        },
    )))
}

/// Copy `topic`'s journal entries from `since` (or all it keeps) into `queue`, a new group's
/// queue, as they were published; messages whose TTL has passed are left out. Returns how
/// many were copied.
///
/// The queue is bound before the copy starts, so a message published during the copy can
/// arrive twice: live and copied (at least once, never lost).
pub(crate) async fn copy_history(
    shared: &Shared,
    link: &Link,
    topic: &str,
    since: Option<SystemTime>,
    queue: &str,
) -> Result<usize> {
    let mut reader = JournalReader::open(shared, link, topic, since).await?;
    let mut in_flight = Vec::with_capacity(COPY_WINDOW);
    let mut copied = 0;
    let now = SystemTime::now();
    while let Some(delivery) = reader.next().await? {
        let props = &delivery.properties;
        if since.is_some_and(|since| wire::timestamp(props) < since) || wire::expired(props, now) {
            continue;
        }
        let confirm = shared
            .within_publish_timeout(
                queue,
                shared.start_publish_raw("", queue, &delivery.data, props.clone()),
            )
            .await?;
        in_flight.push(confirm);
        copied += 1;
        if in_flight.len() >= COPY_WINDOW {
            for confirm in in_flight.drain(..) {
                shared.confirmed(queue, confirm).await?;
            }
        }
    }
    for confirm in in_flight {
        shared.confirmed(queue, confirm).await?;
    }
    tracing::debug!(
        topic,
        queue,
        copied,
        "new group filled from the replay journal"
    );
    Ok(copied)
}
