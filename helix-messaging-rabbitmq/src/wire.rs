//! Mapping between [`Message`] and AMQP properties.
//!
//! Message id, correlation id, content type, priority and timestamp map to their AMQP
//! properties; headers to the header table; the key, the nanosecond timestamp, the TTL and
//! the attempt count travel in reserved `x-helix-` headers.
//!
//! The TTL is not the AMQP `expiration`: RabbitMQ dead-letters expired messages through the
//! queue's dead-letter exchange, where they would crowd real rejects out of the bounded
//! dead-letter queue, and it hands a zero-TTL message to a waiting consumer. Like every other
//! backend, the adapter drops a message whose TTL has passed when it is read (a plain
//! client's `expiration` is honoured the same way, on top of RabbitMQ's own).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use helix_messaging_core::{Headers, Message, MessageParts};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString};

const KEY: &str = "x-helix-key";
const TIMESTAMP_NS: &str = "x-helix-timestamp-ns";
const ATTEMPTS: &str = "x-helix-attempt";
const TTL_MS: &str = "x-helix-ttl-ms";
/// Marks a fence in the replay journal: the end of one read (see `journal`).
pub(crate) const FENCE: &str = "x-helix-fence";
/// Where a stream delivery sits in its stream (set by RabbitMQ).
const STREAM_OFFSET: &str = "x-stream-offset";
/// Earlier deliveries of a message from a quorum queue (set by RabbitMQ; broker bookkeeping,
/// not part of the message, see [`uncounted_redelivery`]).
const DELIVERY_COUNT: &str = "x-delivery-count";

/// Persistent delivery mode.
const PERSISTENT: u8 = 2;

/// AMQP properties for `message`; `attempts_so_far` is set on a requeued copy.
pub(crate) fn properties(message: &Message, attempts_so_far: Option<u32>) -> BasicProperties {
    let mut headers = FieldTable::default();
    for (name, value) in message.headers() {
        headers.insert(name.as_str().into(), long_string(value.as_bytes()));
    }
    if let Some(key) = message.key() {
        headers.insert(KEY.into(), long_string(key.as_bytes()));
    }
    let since_epoch = message
        .timestamp()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    headers.insert(
        TIMESTAMP_NS.into(),
        AMQPValue::LongLongInt(i64::try_from(since_epoch.as_nanos()).unwrap_or(i64::MAX)),
    );
    if let Some(attempts) = attempts_so_far {
        headers.insert(ATTEMPTS.into(), AMQPValue::LongUInt(attempts));
    }
    if let Some(ttl) = message.ttl() {
        headers.insert(
            TTL_MS.into(),
            AMQPValue::LongLongInt(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX)),
        );
    }
    let mut props = BasicProperties::default()
        .with_message_id(message.id().into())
        .with_delivery_mode(PERSISTENT)
        .with_timestamp(since_epoch.as_secs())
        .with_priority(message.priority())
        .with_headers(headers);
    if let Some(ct) = message.content_type() {
        props = props.with_content_type(ct.into());
    }
    if let Some(corr) = message.correlation_id() {
        props = props.with_correlation_id(corr.into());
    }
    props
}

/// `props` with the attempt count set to `attempts_so_far` (for a copy of a received message).
/// Marks a copy that waits out a delay in a retry queue: when it is dead-lettered back, the
/// broker's `x-death` bookkeeping of that hop is not part of the message.
const DELAYED: &str = "x-helix-delayed";

/// Headers the broker adds when it dead-letters a message.
const DEATH_HEADERS: [&str; 7] = [
    "x-death",
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-last-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
];

/// `props` marked as a delayed copy.
pub(crate) fn delayed(props: BasicProperties) -> BasicProperties {
    let mut headers = props.headers().clone().unwrap_or_default();
    headers.insert(DELAYED.into(), AMQPValue::Boolean(true));
    props.with_headers(headers)
}

pub(crate) fn with_attempts(props: &BasicProperties, attempts_so_far: u32) -> BasicProperties {
    let mut headers = props.headers().clone().unwrap_or_default();
    headers.insert(ATTEMPTS.into(), AMQPValue::LongUInt(attempts_so_far));
    props.clone().with_headers(headers)
}

/// Attempts made before the copy that carries them was published.
pub(crate) fn attempts_in_header(props: &BasicProperties) -> u32 {
    match header(props, ATTEMPTS) {
        Some(AMQPValue::LongUInt(n)) => *n,
        _ => 0,
    }
}

/// The AMQP message id, if the publisher set one.
pub(crate) fn message_id(props: &BasicProperties) -> Option<String> {
    props.message_id().as_ref().map(|id| id.to_string())
}

/// A native redelivery, which the consumer re-counts itself (see `ConsumerContext::screen`).
///
/// Classic queues keep only the redelivered flag. Quorum queues count deliveries in
/// `x-delivery-count`, but they count every return: one this broker's subscriptions had
/// prefetched and never handed out too, which is no attempt here. So their redeliveries are
/// re-counted the same way, and the broker's count is not read.
pub(crate) fn uncounted_redelivery(delivery: &lapin::message::Delivery) -> bool {
    delivery.redelivered
}

/// The message's TTL: ours, else a plain client's AMQP `expiration`.
fn ttl(props: &BasicProperties) -> Option<Duration> {
    header(props, TTL_MS)
        .and_then(integer)
        .map(|ms| Duration::from_millis(u64::try_from(ms).unwrap_or(0)))
        .or_else(|| {
            props
                .expiration()
                .as_ref()
                .and_then(|e| e.as_str().parse::<u64>().ok())
                .map(Duration::from_millis)
        })
}

fn long_string(bytes: &[u8]) -> AMQPValue {
    AMQPValue::LongString(LongString::from(bytes.to_vec()))
}

/// A received message and the attempt it is on.
pub(crate) struct Received {
    pub(crate) message: Message,
    pub(crate) attempt: u32,
}

/// One header of `props`.
pub(crate) fn header<'a>(props: &'a BasicProperties, name: &str) -> Option<&'a AMQPValue> {
    props.headers().as_ref().and_then(|t| t.inner().get(name))
}

/// The message's timestamp: the nanosecond header this library writes, else the AMQP
/// timestamp (seconds), else now.
pub(crate) fn timestamp(props: &BasicProperties) -> SystemTime {
    match header(props, TIMESTAMP_NS) {
        Some(AMQPValue::LongLongInt(ns)) => UNIX_EPOCH + Duration::from_nanos(*ns as u64),
        _ => props
            .timestamp()
            .map_or_else(SystemTime::now, |s| UNIX_EPOCH + Duration::from_secs(s)),
    }
}

/// Whether a message with `props` has outlived its TTL by `now`.
pub(crate) fn expired(props: &BasicProperties, now: SystemTime) -> bool {
    ttl(props).is_some_and(|ttl| timestamp(props) + ttl <= now)
}

/// The stream offset RabbitMQ reports on a delivery from a stream.
pub(crate) fn stream_offset(props: &BasicProperties) -> Option<i64> {
    header(props, STREAM_OFFSET).and_then(integer)
}

/// An integer header value of any width.
fn integer(value: &AMQPValue) -> Option<i64> {
    match value {
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::LongUInt(n) => Some(i64::from(*n)),
        AMQPValue::LongInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortUInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortShortUInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortShortInt(n) => Some(i64::from(*n)),
        _ => None,
    }
}

/// Rebuild the message from a delivery. Messages from other publishers (no helix headers)
/// are taken as they are: a fresh id if they carry none, the AMQP timestamp or now. The
/// payload is taken out of the delivery, not copied.
pub(crate) fn received(delivery: &mut lapin::message::Delivery) -> Received {
    let props = &delivery.properties;
    let table = props.headers().as_ref();
    let header = |name: &str| header(props, name);
    let timestamp = timestamp(props);
    let payload = std::mem::take(&mut delivery.data);
    let mut headers = Headers::new();
    if let Some(table) = table {
        let came_back_from_a_delay = table.inner().contains_key(DELAYED);
        for (name, value) in table.inner() {
            let name = name.as_str();
            // Broker bookkeeping of streams, and of our own retry hop, is not part of the
            // message.
            let bookkeeping = name == STREAM_OFFSET
                || name == DELIVERY_COUNT
                || (came_back_from_a_delay && DEATH_HEADERS.contains(&name));
            if !name.starts_with("x-helix-") && !bookkeeping {
                headers.insert(name.to_owned(), text(value));
            }
        }
    }
    let message = Message::from_parts(MessageParts {
        // A message without an id keeps the fresh one set below; one with an id has it
        // copied in place, never through a `String` of its own.
        id: String::new(),
        key: header(KEY).map(text),
        payload: payload.into(),
        headers,
        timestamp,
        content_type: props.content_type().as_ref().map(|ct| ct.to_string()),
        correlation_id: props.correlation_id().as_ref().map(|c| c.to_string()),
        priority: props.priority().unwrap_or(0),
        ttl: ttl(props),
    });
    let message = match props.message_id() {
        Some(id) => message.with_id_copied(id.as_str()),
        None => message.with_id(uuid::Uuid::new_v4().to_string()),
    };
    let earlier = attempts_in_header(props);
    // A native redelivery (closed channel) adds one delivery the header cannot know about;
    // the consumer re-counts those before they get here (see `uncounted_redelivery`), so this
    // is only the estimate used when that copy could not be made.
    let attempt = earlier + 1 + u32::from(delivery.redelivered);
    Received { message, attempt }
}

/// A header value as text: strings as they are, other AMQP types in their usual notation.
fn text(value: &AMQPValue) -> String {
    match value {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.as_str().to_owned(),
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::ShortShortInt(n) => n.to_string(),
        AMQPValue::ShortShortUInt(n) => n.to_string(),
        AMQPValue::ShortInt(n) => n.to_string(),
        AMQPValue::ShortUInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::LongUInt(n) => n.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::Float(n) => n.to_string(),
        AMQPValue::Double(n) => n.to_string(),
        other => format!("{other:?}"),
    }
}
