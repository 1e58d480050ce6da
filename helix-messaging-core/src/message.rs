//! The message model: what a publisher sends and a subscriber receives.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use arrayvec::ArrayString;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// Highest message priority (HelixAgent's range is 0–10, higher is more urgent).
pub const MAX_PRIORITY: u8 = 10;

/// The header naming a message's type (`llm.request`, `verification.completed`, …): what DLQ
/// handlers are registered for and what replay filters on.
pub const MESSAGE_TYPE_HEADER: &str = "type";

/// String headers carried with a message, ordered by name.
pub type Headers = BTreeMap<String, String>;

/// A message: an opaque payload plus the metadata every backend carries.
///
/// Build one with [`Message::new`] and the `with_*` methods:
///
/// ```
/// use helix_messaging_core::Message;
/// use std::time::Duration;
///
/// let msg = Message::new("hello")
///     .with_key("user-42")
///     .with_header("type", "greeting")
///     .with_priority(7)
///     .with_ttl(Duration::from_secs(60));
/// assert_eq!(msg.payload().as_ref(), b"hello");
/// assert_eq!(msg.header("type"), Some("greeting"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    id: MessageId,
    key: Option<String>,
    payload: Bytes,
    headers: Headers,
    timestamp: SystemTime,
    content_type: Option<String>,
    correlation_id: Option<String>,
    priority: u8,
    ttl: Option<Duration>,
}

/// Everything a [`Message`] carries, field by field: what an adapter has read back from its
/// wire format, for [`Message::from_parts`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageParts {
    /// The message id.
    pub id: String,
    /// The key, if any.
    pub key: Option<String>,
    /// The payload.
    pub payload: Bytes,
    /// Application headers.
    pub headers: Headers,
    /// When the message was created.
    pub timestamp: SystemTime,
    /// The content type, if any.
    pub content_type: Option<String>,
    /// The correlation id, if any.
    pub correlation_id: Option<String>,
    /// Priority 0–10 (higher values are clamped).
    pub priority: u8,
    /// Time to live, if any.
    pub ttl: Option<Duration>,
}

impl Message {
    /// A message with `payload`, a fresh UUID v4 id, the current time as timestamp, no key,
    /// no headers, priority 0 and no TTL.
    pub fn new(payload: impl Into<Bytes>) -> Self {
        Message {
            id: MessageId::generate(),
            key: None,
            payload: payload.into(),
            headers: Headers::new(),
            timestamp: SystemTime::now(),
            content_type: None,
            correlation_id: None,
            priority: 0,
            ttl: None,
        }
    }

    /// A message made of `parts` as they are (the priority is clamped to [`MAX_PRIORITY`]):
    /// for adapters rebuilding a received message in one step.
    pub fn from_parts(parts: MessageParts) -> Self {
        Message {
            id: MessageId::from_string(parts.id),
            key: parts.key,
            payload: parts.payload,
            headers: parts.headers,
            timestamp: parts.timestamp,
            content_type: parts.content_type,
            correlation_id: parts.correlation_id,
            priority: parts.priority.min(MAX_PRIORITY),
            ttl: parts.ttl,
        }
    }

    /// The message taken apart, field by field: the inverse of [`Message::from_parts`], for
    /// building a changed copy without naming every field.
    pub fn into_parts(self) -> MessageParts {
        MessageParts {
            id: self.id.into_string(),
            key: self.key,
            payload: self.payload,
            headers: self.headers,
            timestamp: self.timestamp,
            content_type: self.content_type,
            correlation_id: self.correlation_id,
            priority: self.priority,
            ttl: self.ttl,
        }
    }

    /// A message with the given id, payload and timestamp and nothing else set: for adapters
    /// rebuilding a received message, where generating an id and reading the clock would be
    /// wasted work.
    pub fn restore(
        id: impl Into<String>,
        payload: impl Into<Bytes>,
        timestamp: SystemTime,
    ) -> Self {
        Message {
            id: MessageId::from_string(id.into()),
            key: None,
            payload: payload.into(),
            headers: Headers::new(),
            timestamp,
            content_type: None,
            correlation_id: None,
            priority: 0,
            ttl: None,
        }
    }

    /// Replace the generated id (for example with an id from an upstream system).
    #[must_use]
    pub fn with_id(mut self, id: impl Into<String>) -> Self {
        self.id = MessageId::from_string(id.into());
        self
    }

    /// Replace the id with a copy of `id`. Unlike [`Message::with_id`], it allocates
    /// nothing for an id of up to 36 bytes (a UUID's text): for an id read from a received
    /// record, where a `String` made only to be handed over would be allocated and freed
    /// for every message.
    #[must_use]
    pub fn with_id_copied(mut self, id: &str) -> Self {
        self.id = MessageId::copied(id);
        self
    }

    /// Set the key: messages with the same key keep their order on backends that declare
    /// per-key ordering. On Kafka it is the record key (so it picks the partition). On
    /// RabbitMQ and Redis it travels with the message (the `x-helix-key` header, the
    /// `helix.key` field) but does not route it: the topic is the routing key, since a key
    /// appended to it (`<topic>.<key>`) could not be told apart from another topic.
    #[must_use]
    pub fn with_key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Add (or replace) one header.
    #[must_use]
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// Replace all headers.
    #[must_use]
    pub fn with_headers(mut self, headers: Headers) -> Self {
        self.headers = headers;
        self
    }

    /// Override the timestamp (defaults to the time the message was built).
    #[must_use]
    pub fn with_timestamp(mut self, timestamp: SystemTime) -> Self {
        self.timestamp = timestamp;
        self
    }

    /// Set the MIME content type of the payload.
    #[must_use]
    pub fn with_content_type(mut self, content_type: impl Into<String>) -> Self {
        self.content_type = Some(content_type.into());
        self
    }

    /// Set the correlation id (request/reply, tracing a workflow across messages).
    #[must_use]
    pub fn with_correlation_id(mut self, correlation_id: impl Into<String>) -> Self {
        self.correlation_id = Some(correlation_id.into());
        self
    }

    /// Set the priority, 0 (default) to [`MAX_PRIORITY`]; higher is more urgent.
    ///
    /// Values above [`MAX_PRIORITY`] are clamped to it, as AMQP brokers treat a priority above
    /// a queue's maximum.
    #[must_use]
    pub fn with_priority(mut self, priority: u8) -> Self {
        self.priority = priority.min(MAX_PRIORITY);
        self
    }

    /// Discard the message if it has not been delivered within `ttl` of entering the broker.
    #[must_use]
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// The message id (a UUID v4 unless one was given).
    pub fn id(&self) -> &str {
        self.id.as_str()
    }

    /// The key, if any (see [`Message::with_key`]).
    pub fn key(&self) -> Option<&str> {
        self.key.as_deref()
    }

    /// The payload bytes.
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }

    /// All headers.
    pub fn headers(&self) -> &Headers {
        &self.headers
    }

    /// One header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    /// Mutable access to the headers (layers use it to add trace context).
    pub fn headers_mut(&mut self) -> &mut Headers {
        &mut self.headers
    }

    /// When the message was created (or the time given with [`Message::with_timestamp`]).
    pub fn timestamp(&self) -> SystemTime {
        self.timestamp
    }

    /// The payload's MIME content type, if given.
    pub fn content_type(&self) -> Option<&str> {
        self.content_type.as_deref()
    }

    /// The correlation id, if given.
    pub fn correlation_id(&self) -> Option<&str> {
        self.correlation_id.as_deref()
    }

    /// The priority, 0 to [`MAX_PRIORITY`].
    pub fn priority(&self) -> u8 {
        self.priority
    }

    /// The time-to-live, if any.
    pub fn ttl(&self) -> Option<Duration> {
        self.ttl
    }
}

/// The longest id kept inline: a UUID's 36 characters, hyphenated.
const INLINE_ID: usize = uuid::fmt::Hyphenated::LENGTH;

/// A message's id, as [`Message::id`] shows it. An id of up to 36 bytes (a generated UUID
/// v4, a UUID received back, a Kafka offset or Redis entry id) is kept inline, so that
/// making a message allocates nothing for its id and a received one holds no allocation for
/// it: this runs once per message on every backend, and a received message is usually
/// dropped on another thread than the one that built it, where glibc frees a chunk that
/// is not its own on its slow path. A longer id is kept as it came.
#[derive(Clone)]
enum MessageId {
    /// Held in an `ArrayString`, whose text needs no UTF-8 check when read: checking 36 bytes
    /// with `str::from_utf8` cost about 200 instructions, on every read of the id (every
    /// publish reads it to write its header or field).
    Inline(ArrayString<INLINE_ID>),
    Given(String),
}

impl MessageId {
    /// A fresh UUID v4, lowercase and hyphenated.
    fn generate() -> Self {
        let mut text = [0u8; INLINE_ID];
        let id = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut text);
        MessageId::Inline(ArrayString::from(id).expect("a hyphenated UUID is 36 bytes"))
    }

    /// `id` inline when it fits, freeing its `String` here, on the thread that built it.
    fn from_string(id: String) -> Self {
        match ArrayString::from(&id) {
            Ok(inline) => MessageId::Inline(inline),
            Err(_) => MessageId::Given(id),
        }
    }

    /// `id` inline when it fits, copied into a `String` otherwise.
    fn copied(id: &str) -> Self {
        match ArrayString::from(id) {
            Ok(inline) => MessageId::Inline(inline),
            Err(_) => MessageId::Given(id.to_owned()),
        }
    }

    fn as_str(&self) -> &str {
        match self {
            MessageId::Inline(text) => text,
            MessageId::Given(text) => text,
        }
    }

    fn into_string(self) -> String {
        match self {
            MessageId::Inline(text) => text.as_str().to_owned(),
            MessageId::Given(text) => text,
        }
    }
}

/// Ids are equal when their text is, however each was made: a message received back equals
/// the one that was sent.
impl PartialEq for MessageId {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for MessageId {}

impl std::fmt::Debug for MessageId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl Serialize for MessageId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for MessageId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(MessageId::from_string)
    }
}

/// The time `text` gives as a decimal count of nanoseconds since the Unix epoch, the form
/// a message's exact timestamp takes in Kafka's `x-helix-timestamp-ns` header and the Redis
/// Streams `helix.ts-ns` field; `None` unless `text` is what `str::parse::<u64>` accepts.
///
/// The same result as that parse, for every input, but faster on the 19 digits a timestamp
/// of this century has: the standard parse checks each digit for overflow beyond 16 digits,
/// which no number of 19 digits can reach. It runs for every message received.
pub fn parse_timestamp_nanos(text: &[u8]) -> Option<SystemTime> {
    let digits = text.strip_prefix(b"+").unwrap_or(text);
    let nanos = if (1..=19).contains(&digits.len()) {
        digits.iter().try_fold(0u64, |n, &d| {
            d.is_ascii_digit().then(|| n * 10 + u64::from(d - b'0'))
        })?
    } else {
        std::str::from_utf8(text).ok()?.parse::<u64>().ok()?
    };
    Some(std::time::UNIX_EPOCH + Duration::from_nanos(nanos))
}

/// `t` as milliseconds since the Unix epoch, the form times take in headers.
pub(crate) fn millis(t: SystemTime) -> String {
    let ms = t
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    // As u64 (enough for 584 million years): u128 formatting costs several times more, and
    // this runs for every replayed copy.
    itoa::Buffer::new()
        .format(u64::try_from(ms).unwrap_or(u64::MAX))
        .to_owned()
}

/// A header time written by [`millis`].
pub(crate) fn parse_millis(s: &str) -> Option<SystemTime> {
    s.parse::<u64>()
        .ok()
        .map(|ms| std::time::UNIX_EPOCH + Duration::from_millis(ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fast path agrees with `str::parse::<u64>` on every input: signs, empty text,
    /// non-digits, the widths around the fast path's limit and the edges of `u64`.
    #[test]
    fn timestamps_in_nanoseconds_parse_as_the_standard_parse_does() {
        let mut inputs: Vec<String> = [
            "",
            "+",
            "-",
            "-1",
            "0",
            "+0",
            "00",
            "7",
            "+7",
            "++7",
            "+-7",
            " 7",
            "7 ",
            "1a",
            "١",
            "1_000",
            "18446744073709551615",
            "18446744073709551616",
            "+18446744073709551615",
            "99999999999999999999",
            "000000000000000000001",
            "1765000000123456789",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        for width in 15..=21 {
            inputs.push("9".repeat(width));
            inputs.push(format!("1{}", "0".repeat(width - 1)));
            inputs.push(format!("{}x", "1".repeat(width - 1)));
        }
        for text in inputs {
            let expected = text
                .parse::<u64>()
                .ok()
                .map(|ns| std::time::UNIX_EPOCH + Duration::from_nanos(ns));
            assert_eq!(parse_timestamp_nanos(text.as_bytes()), expected, "{text:?}");
        }
        assert_eq!(parse_timestamp_nanos(b"\xff1"), None, "not UTF-8");
    }

    /// Ids up to 36 bytes are kept inline and longer ones as given; either way every id
    /// reads back, takes the message apart and goes through serde exactly as it was given,
    /// multi-byte characters at the boundary included.
    #[test]
    fn every_id_reads_back_as_given_inline_or_not() {
        let uuid = uuid::Uuid::new_v4().hyphenated().to_string();
        let ids = [
            String::new(),
            "a".to_owned(),
            "topic-3@1234567".to_owned(),
            "x".repeat(35),
            "x".repeat(36),
            "x".repeat(37),
            format!("{}é", "x".repeat(34)),
            format!("{}é", "x".repeat(35)),
            uuid.to_uppercase(),
            uuid,
            "z".repeat(200),
        ];
        for id in ids {
            let message = Message::new("p").with_id(id.clone());
            assert_eq!(message.id(), id);
            let copied = Message::new("p").with_id_copied(&id);
            assert_eq!(copied.id(), id, "copied");
            assert_eq!(
                matches!(copied.id, MessageId::Inline(_)),
                id.len() <= INLINE_ID,
                "a copied id of {} bytes is inline exactly when it fits",
                id.len()
            );
            let restored = Message::restore(id.clone(), "p", std::time::UNIX_EPOCH);
            assert_eq!(restored.id(), id);
            let rebuilt = Message::from_parts(message.clone().into_parts());
            assert_eq!(rebuilt.id(), id);
            assert_eq!(rebuilt, message);
            let json = serde_json::to_string(&message).expect("serialize");
            let back: Message = serde_json::from_str(&json).expect("deserialize");
            assert_eq!(back.id(), id, "through serde");
        }
    }

    #[test]
    fn new_message_has_a_uuid_and_defaults() {
        let a = Message::new(Bytes::from_static(b"x"));
        let b = Message::new(Bytes::from_static(b"x"));
        assert_ne!(a.id(), b.id());
        assert!(uuid::Uuid::parse_str(a.id()).is_ok());
        assert_eq!(a.priority(), 0);
        assert_eq!(a.ttl(), None);
        assert!(a.headers().is_empty());
    }

    #[test]
    fn a_generated_id_equals_the_same_id_given_and_survives_serde() {
        let sent = Message::new("x");
        let received = Message::from_parts(sent.clone().into_parts());
        assert_eq!(received.id(), sent.id());
        assert_eq!(received, sent);
        assert_eq!(format!("{:?}", sent.id), format!("{:?}", sent.id()));
        let json = serde_json::to_value(&sent).unwrap();
        assert_eq!(json["id"], serde_json::Value::from(sent.id()));
        let back: Message = serde_json::from_value(json).unwrap();
        assert_eq!(back, sent);
        let renamed = sent.clone().with_id("another");
        assert_ne!(
            renamed, sent,
            "messages differing only in their id are not equal"
        );
    }

    #[test]
    fn priority_is_clamped_to_the_maximum() {
        assert_eq!(Message::new("").with_priority(200).priority(), MAX_PRIORITY);
        assert_eq!(Message::new("").with_priority(3).priority(), 3);
    }
}
