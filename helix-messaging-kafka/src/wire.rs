//! Mapping between [`Message`] and Kafka records.
//!
//! The payload is the record's value and the key its key, so other Kafka clients read the
//! messages as they are; the record timestamp is the message timestamp (milliseconds).
//! Application headers become record headers; the id, the exact (nanosecond) timestamp,
//! content type, correlation id, priority and TTL travel in reserved `x-helix-` headers.
//! Copies on a group's retry topic (a delayed requeue) carry the attempts made so far in
//! `x-helix-attempt` and the time before which they must not be handed out in
//! `x-helix-not-before-ms`; attempts of records on the topic itself live in the committed
//! offsets' metadata (see the `attempts` module).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use helix_messaging_core::{Message, MessageParts};
use rdkafka::Message as _;
use rdkafka::message::{BorrowedMessage, Header, Headers as _, OwnedHeaders};

const ID: &str = "x-helix-id";
const TIMESTAMP_NS: &str = "x-helix-timestamp-ns";
const CONTENT_TYPE: &str = "x-helix-content-type";
const CORRELATION_ID: &str = "x-helix-correlation-id";
const PRIORITY: &str = "x-helix-priority";
const TTL_MS: &str = "x-helix-ttl-ms";
/// Attempts made before this copy was written (retry-topic copies).
const ATTEMPT: &str = "x-helix-attempt";
/// Milliseconds since the epoch before which a retry-topic copy is not handed out.
const NOT_BEFORE_MS: &str = "x-helix-not-before-ms";

/// Record headers for a retry-topic copy of `message`: its own, the attempts made so far and
/// the time it is due.
pub(crate) fn retry_headers(
    message: &Message,
    attempts: u32,
    not_before: SystemTime,
) -> OwnedHeaders {
    headers(message)
        .insert(Header {
            key: ATTEMPT,
            value: Some(attempts.to_string().as_bytes()),
        })
        .insert(Header {
            key: NOT_BEFORE_MS,
            value: Some(millis(not_before).to_string().as_bytes()),
        })
}

/// Record headers for `message`.
pub(crate) fn headers(message: &Message) -> OwnedHeaders {
    // `insert` takes the list by value and hands it back. Each header is added to the one
    // list: taking it out of a `&mut` with `mem::take` built and destroyed an empty native
    // list per header (`OwnedHeaders::default` allocates one), about 1,000 instructions a
    // header, measured with callgrind.
    fn add(headers: OwnedHeaders, key: &str, value: &str) -> OwnedHeaders {
        headers.insert(Header {
            key,
            value: Some(value.as_bytes()),
        })
    }
    let mut headers = OwnedHeaders::new_with_capacity(message.headers().len() + 4);
    for (name, value) in message.headers() {
        headers = add(headers, name, value);
    }
    headers = add(headers, ID, message.id());
    // Written on the stack: a `String` per record was one more allocation on every publish.
    let mut timestamp = itoa::Buffer::new();
    headers = add(
        headers,
        TIMESTAMP_NS,
        timestamp.format(nanos(message.timestamp())),
    );
    if let Some(ct) = message.content_type() {
        headers = add(headers, CONTENT_TYPE, ct);
    }
    if let Some(corr) = message.correlation_id() {
        headers = add(headers, CORRELATION_ID, corr);
    }
    if message.priority() > 0 {
        headers = add(headers, PRIORITY, &message.priority().to_string());
    }
    if let Some(ttl) = message.ttl() {
        headers = add(headers, TTL_MS, &ttl.as_millis().to_string());
    }
    headers
}

/// Nanoseconds since the epoch; `u64` holds them until the year 2554, and formats several
/// times faster than `u128` (this runs for every record published).
fn nanos(t: SystemTime) -> u64 {
    u64::try_from(t.duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos()).unwrap_or(u64::MAX)
}

/// Milliseconds since the epoch: the record timestamp.
pub(crate) fn millis(t: SystemTime) -> i64 {
    i64::try_from(t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis()).unwrap_or(i64::MAX)
}

/// The time of a record timestamp in milliseconds.
pub(crate) fn from_millis(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

/// A received record as a message, the attempt it is on, and the record's own timestamp.
pub(crate) struct Received {
    pub(crate) message: Message,
    /// Attempts written into the record by a retry-topic copy.
    pub(crate) attempts_in_header: u32,
    /// When a retry-topic copy is due.
    pub(crate) not_before: Option<SystemTime>,
    /// The record timestamp (the broker's append time on topics configured for it).
    pub(crate) recorded_at: SystemTime,
}

/// Rebuild the message from a record. Records from other producers (no helix headers) are
/// taken as they are: the offset-derived id `<topic>-<partition>@<offset>`, the record
/// timestamp.
pub(crate) fn received(record: &BorrowedMessage<'_>) -> Received {
    let recorded_at = record
        .timestamp()
        .to_millis()
        .map_or_else(SystemTime::now, from_millis);
    // Borrowed from the record until the message is made: an owned copy would be a
    // `String` allocated only to be copied into the message's inline id and freed.
    let mut id: Option<std::borrow::Cow<'_, str>> = None;
    let mut timestamp = recorded_at;
    let mut content_type = None;
    let mut correlation_id = None;
    let mut priority = 0;
    let mut ttl = None;
    let mut earlier = 0;
    let mut not_before = None;
    let mut app_headers = helix_messaging_core::Headers::new();
    if let Some(headers) = record.headers() {
        for header in headers.iter() {
            let raw = header.value.unwrap_or_default();
            let value = || text(raw);
            match header.key {
                ID => id = Some(value()),
                TIMESTAMP_NS => {
                    if let Some(at) = helix_messaging_core::parse_timestamp_nanos(raw) {
                        timestamp = at;
                    }
                }
                CONTENT_TYPE => content_type = Some(value().into_owned()),
                CORRELATION_ID => correlation_id = Some(value().into_owned()),
                PRIORITY => priority = value().parse().unwrap_or(0),
                TTL_MS => ttl = value().parse::<u64>().ok().map(Duration::from_millis),
                ATTEMPT => earlier = value().parse().unwrap_or(0),
                NOT_BEFORE_MS => not_before = value().parse::<i64>().ok().map(from_millis),
                key if key.starts_with("x-helix-") => {}
                key => {
                    app_headers.insert(key.to_owned(), value().into_owned());
                }
            }
        }
    }
    let payload = bytes_of(record.payload());
    let message = Message::from_parts(MessageParts {
        id: String::new(),
        key: record
            .key()
            .map(|key| String::from_utf8_lossy(key).into_owned()),
        payload,
        headers: app_headers,
        timestamp,
        content_type,
        correlation_id,
        priority,
        ttl,
    });
    let message = match id {
        Some(id) => message.with_id_copied(&id),
        None => message.with_id(format!(
            "{}-{}@{}",
            record.topic(),
            record.partition(),
            record.offset()
        )),
    };
    Received {
        message,
        attempts_in_header: earlier,
        not_before,
        recorded_at,
    }
}

/// A header value as text: borrowed when it is UTF-8, as every helix header is (checking
/// that is several times faster than `String::from_utf8_lossy`'s walk, and this runs for
/// every header of every record), with invalid sequences replaced otherwise.
fn text(value: &[u8]) -> std::borrow::Cow<'_, str> {
    match std::str::from_utf8(value) {
        Ok(text) => std::borrow::Cow::Borrowed(text),
        Err(_) => String::from_utf8_lossy(value),
    }
}

fn bytes_of(payload: Option<&[u8]>) -> bytes::Bytes {
    payload.map_or_else(bytes::Bytes::new, bytes::Bytes::copy_from_slice)
}

/// Whether `message` has outlived its TTL by `now`.
pub(crate) fn expired(message: &Message, now: SystemTime) -> bool {
    message
        .ttl()
        .is_some_and(|ttl| message.timestamp() + ttl <= now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_timestamp_header_is_the_exact_nanosecond() {
        let at = UNIX_EPOCH + Duration::from_nanos(1_234_567_890_123_456_789);
        let message = Message::new("x").with_timestamp(at);
        let written = headers(&message);
        let value = written
            .iter()
            .find(|h| h.key == TIMESTAMP_NS)
            .and_then(|h| h.value)
            .expect("timestamp header");
        assert_eq!(value, b"1234567890123456789");
    }

    #[test]
    fn header_text_is_borrowed_when_valid_and_replaced_when_not() {
        assert!(matches!(
            text(b"x-id-1"),
            std::borrow::Cow::Borrowed("x-id-1")
        ));
        assert_eq!(text(b"a\xffb"), "a\u{FFFD}b");
    }
}
