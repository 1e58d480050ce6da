//! The wire forms of a message, readable by plain clients.
//!
//! **Stream entries** keep the payload as it is in one field ([`StreamsConfig::payload_field`],
//! `data` by default) and the metadata in fields of their own: `helix.id`, `helix.ts-ns`
//! (nanoseconds since the Unix epoch), `helix.key`, `helix.content-type`,
//! `helix.correlation-id`, `helix.priority`, `helix.ttl-ms`. Each header is a field with its
//! own name (`helix.header.<name>` when the name would clash with the payload field or the
//! reserved prefix). A plain `XADD s * data <json>` is read back with that payload, its
//! entry id as the message id, the entry's time as its timestamp and any other fields as
//! headers; a plain `XRANGE` sees helix's payloads as they are.
//!
//! **Entries of the first format** (a single field `m` holding the envelope below) are still
//! read.
//!
//! **The envelope**: one MessagePack map with the payload and all metadata, used by pub/sub
//! while [`RedisConfig::pubsub_envelope`](crate::RedisConfig::pubsub_envelope) is on (the
//! default; off, pub/sub publishes the bare payload, which is all a channel carries). Keys: `v`
//! format version (1), `id`, `k` key, `p` payload (binary), `h` headers (map), `t` timestamp
//! in nanoseconds, `ct` content type, `c` correlation id, `pr` priority, `ttl` TTL in ms.
//! A subscriber recognises an envelope whatever its own setting, and delivers anything else
//! as a plain message whose payload is the body.
//!
//! [`StreamsConfig::payload_field`]: crate::StreamsConfig::payload_field

use std::borrow::Cow;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use helix_messaging_core::{Error, ErrorKind, Headers, Message, MessageParts, Result};
use serde::Deserialize;
#[cfg(test)]
use serde::Serialize;

/// The single field of first-format stream entries, holding the envelope.
pub(crate) const LEGACY_FIELD: &str = "m";

/// Prefix of the stream fields that carry helix's metadata.
pub(crate) const RESERVED_PREFIX: &str = "helix.";
const F_ID: &str = "helix.id";
const F_TS_NS: &str = "helix.ts-ns";
const F_KEY: &str = "helix.key";
const F_CONTENT_TYPE: &str = "helix.content-type";
const F_CORRELATION_ID: &str = "helix.correlation-id";
const F_PRIORITY: &str = "helix.priority";
const F_TTL_MS: &str = "helix.ttl-ms";
const F_HEADER: &str = "helix.header.";

const VERSION: u8 = 1;

/// What the envelope holds, as `rmp_serde` writes it: the reference [`write_envelope`] is
/// tested against.
#[cfg(test)]
#[derive(Serialize)]
struct Outgoing<'a> {
    v: u8,
    id: &'a str,
    #[serde(rename = "k", skip_serializing_if = "Option::is_none")]
    key: Option<&'a str>,
    #[serde(rename = "p", with = "serde_bytes")]
    payload: &'a [u8],
    #[serde(rename = "h", skip_serializing_if = "Headers::is_empty")]
    headers: &'a Headers,
    #[serde(rename = "t")]
    ts_ns: u64,
    #[serde(rename = "ct", skip_serializing_if = "Option::is_none")]
    content_type: Option<&'a str>,
    #[serde(rename = "c", skip_serializing_if = "Option::is_none")]
    correlation_id: Option<&'a str>,
    #[serde(rename = "pr", skip_serializing_if = "is_zero")]
    priority: u8,
    #[serde(rename = "ttl", skip_serializing_if = "Option::is_none")]
    ttl_ms: Option<u64>,
}

#[cfg(test)]
fn is_zero(p: &u8) -> bool {
    *p == 0
}

#[derive(Deserialize)]
struct Incoming<'a> {
    v: u8,
    #[serde(borrow)]
    id: Cow<'a, str>,
    #[serde(rename = "k", default, borrow)]
    key: Option<Cow<'a, str>>,
    #[serde(rename = "p", with = "serde_bytes")]
    payload: Vec<u8>,
    #[serde(rename = "h", default)]
    headers: Headers,
    #[serde(rename = "t")]
    ts_ns: u64,
    #[serde(rename = "ct", default, borrow)]
    content_type: Option<Cow<'a, str>>,
    #[serde(rename = "c", default, borrow)]
    correlation_id: Option<Cow<'a, str>>,
    #[serde(rename = "pr", default)]
    priority: u8,
    #[serde(rename = "ttl", default)]
    ttl_ms: Option<u64>,
}

/// Encode `message` for the wire with `rmp_serde`, the reference [`write_envelope`] is tested
/// against.
#[cfg(test)]
pub(crate) fn encode(message: &Message) -> Result<Vec<u8>> {
    let outgoing = Outgoing {
        v: VERSION,
        id: message.id(),
        key: message.key(),
        payload: message.payload(),
        headers: message.headers(),
        ts_ns: nanos(message.timestamp()),
        content_type: message.content_type(),
        correlation_id: message.correlation_id(),
        priority: message.priority(),
        ttl_ms: message.ttl().map(|t| t.as_millis() as u64),
    };
    // Sized once up front: growing the buffer while encoding reallocates it several times per
    // message, which shows in profiles of a busy publisher.
    let mut out = Vec::with_capacity(envelope_capacity(message));
    rmp_serde::encode::write_named(&mut out, &outgoing).map_err(|e| {
        Error::new(
            ErrorKind::Serialization,
            format!("cannot encode message {}", message.id()),
        )
        .with_source(e)
    })?;
    Ok(out)
}

/// Room enough for the envelope of `message` (its fields' names and lengths, the numbers at
/// their longest), so that writing it does not grow the buffer.
fn envelope_capacity(message: &Message) -> usize {
    let headers: usize = message
        .headers()
        .iter()
        .map(|(k, v)| k.len() + v.len() + 10)
        .sum();
    message.payload().len() + message.id().len() + optional_texts_len(message) + headers + 96
}

/// The bytes of `message`'s key, content type and correlation id, those it has.
fn optional_texts_len(message: &Message) -> usize {
    [
        message.key(),
        message.content_type(),
        message.correlation_id(),
    ]
    .into_iter()
    .flatten()
    .map(str::len)
    .sum()
}

/// Decode a wire message.
///
/// # Errors
/// [`ErrorKind::Serialization`] saying why (not a helix-messaging envelope, newer version).
pub(crate) fn decode(bytes: &[u8]) -> Result<Message> {
    let incoming: Incoming<'_> = rmp_serde::from_slice(bytes).map_err(|e| {
        Error::new(
            ErrorKind::Serialization,
            format!(
                "{} bytes that are not a helix-messaging envelope: {e}",
                bytes.len()
            ),
        )
    })?;
    if incoming.v != VERSION {
        return Err(Error::new(
            ErrorKind::Serialization,
            format!(
                "envelope version {} is not supported (this build reads version {VERSION})",
                incoming.v
            ),
        ));
    }
    Ok(Message::from_parts(MessageParts {
        id: incoming.id.into_owned(),
        key: incoming.key.map(Cow::into_owned),
        payload: Bytes::from(incoming.payload),
        headers: incoming.headers,
        timestamp: UNIX_EPOCH + Duration::from_nanos(incoming.ts_ns),
        content_type: incoming.content_type.map(Cow::into_owned),
        correlation_id: incoming.correlation_id.map(Cow::into_owned),
        priority: incoming.priority,
        ttl: incoming.ttl_ms.map(Duration::from_millis),
    }))
}

fn nanos(t: SystemTime) -> u64 {
    u64::try_from(t.duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos()).unwrap_or(u64::MAX)
}

/// Upper bounds of what [`append_stream_fields`] writes for `message`: its arguments and
/// their bytes, so that an `XADD` is built in buffers of the right size. Grown one argument
/// at a time they were reallocated about six times per message, 15% of a Streams
/// publisher's instructions (callgrind).
pub(crate) fn stream_fields_capacity(message: &Message, payload_field: &str) -> (usize, usize) {
    // Every optional field's name, and the longest a number is written (`u64::MAX`).
    const OPTIONAL_NAMES: usize = F_KEY.len()
        + F_CONTENT_TYPE.len()
        + F_CORRELATION_ID.len()
        + F_PRIORITY.len()
        + F_TTL_MS.len();
    const NUMBER: usize = 20;
    let headers: usize = message
        .headers()
        .iter()
        .map(|(name, value)| F_HEADER.len() + name.len() + value.len())
        .sum();
    let texts = optional_texts_len(message);
    let args = 6 + 10 + 2 * message.headers().len();
    let bytes = payload_field.len()
        + message.payload().len()
        + F_ID.len()
        + message.id().len()
        + F_TS_NS.len()
        + 3 * NUMBER
        + OPTIONAL_NAMES
        + texts
        + headers;
    (args, bytes)
}

/// Append `message` as stream entry fields (field, value, field, value, …) to an `XADD`.
pub(crate) fn append_stream_fields(cmd: &mut redis::Cmd, message: &Message, payload_field: &str) {
    cmd.arg(payload_field).arg(message.payload().as_ref());
    cmd.arg(F_ID).arg(message.id());
    cmd.arg(F_TS_NS).arg(nanos(message.timestamp()));
    if let Some(key) = message.key() {
        cmd.arg(F_KEY).arg(key);
    }
    if let Some(ct) = message.content_type() {
        cmd.arg(F_CONTENT_TYPE).arg(ct);
    }
    if let Some(corr) = message.correlation_id() {
        cmd.arg(F_CORRELATION_ID).arg(corr);
    }
    if message.priority() > 0 {
        cmd.arg(F_PRIORITY).arg(message.priority());
    }
    if let Some(ttl) = message.ttl() {
        cmd.arg(F_TTL_MS)
            .arg(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX));
    }
    for (name, value) in message.headers() {
        let clashes =
            name == payload_field || name == LEGACY_FIELD || name.starts_with(RESERVED_PREFIX);
        if clashes {
            cmd.arg(format!("{F_HEADER}{name}")).arg(value);
        } else {
            cmd.arg(name).arg(value);
        }
    }
}

fn value_bytes(value: &redis::Value) -> Cow<'_, [u8]> {
    match value {
        redis::Value::BulkString(bytes) => Cow::Borrowed(bytes),
        redis::Value::SimpleString(s) => Cow::Borrowed(s.as_bytes()),
        redis::Value::Int(n) => Cow::Owned(n.to_string().into_bytes()),
        other => Cow::Owned(format!("{other:?}").into_bytes()),
    }
}

fn value_text(value: &redis::Value) -> String {
    String::from_utf8_lossy(&value_bytes(value)).into_owned()
}

/// The value as bytes, taken out of the reply (left empty) rather than copied: this runs
/// for every payload read.
fn take_bytes(value: &mut redis::Value) -> Bytes {
    match value {
        redis::Value::BulkString(bytes) => Bytes::from(std::mem::take(bytes)),
        other => Bytes::copy_from_slice(&value_bytes(other)),
    }
}

/// The value as text, taken out of the reply when it is UTF-8 (as helix writes it).
fn take_text(value: &mut redis::Value) -> String {
    match value {
        redis::Value::BulkString(bytes) => match String::from_utf8(std::mem::take(bytes)) {
            Ok(text) => text,
            Err(err) => {
                let text = String::from_utf8_lossy(err.as_bytes()).into_owned();
                *bytes = err.into_bytes();
                text
            }
        },
        other => value_text(other),
    }
}

/// Read a stream entry written in either format, or by a plain client. The payload and
/// the text fields are taken out of `fields` (left empty) once the payload is found; a
/// failed read leaves them as they were.
///
/// # Errors
/// [`ErrorKind::Serialization`] when the entry has no payload field and no first-format
/// envelope, or its envelope cannot be decoded.
pub(crate) fn from_stream_fields(
    entry_id: &str,
    recorded_at: SystemTime,
    fields: &mut [(String, redis::Value)],
    payload_field: &str,
) -> Result<Message> {
    // Whether the payload is there is settled first: only then are values taken out, so an
    // entry that cannot be read keeps its fields for setting aside.
    if !fields.iter().any(|(field, _)| field == payload_field) {
        return match fields.iter().find(|(field, _)| field == LEGACY_FIELD) {
            Some((_, envelope)) => decode(&value_bytes(envelope)),
            None => Err(Error::new(
                ErrorKind::Serialization,
                format!(
                    "entry has no {payload_field:?} field (the payload) and no helix-messaging envelope"
                ),
            )),
        };
    }
    let mut payload = Bytes::new();
    let mut id = None;
    let mut timestamp = recorded_at;
    let mut key = None;
    let mut content_type = None;
    let mut correlation_id = None;
    let mut priority = 0;
    let mut ttl = None;
    let mut headers = Headers::new();
    for (field, value) in fields.iter_mut() {
        if field == payload_field {
            payload = take_bytes(value);
            continue;
        }
        match field.as_str() {
            LEGACY_FIELD => {}
            F_ID => id = Some(take_text(value)),
            F_TS_NS => {
                // Parsed where it lies: a `String` of it was an allocation per entry read.
                if let Some(at) = helix_messaging_core::parse_timestamp_nanos(&value_bytes(value)) {
                    timestamp = at;
                }
            }
            F_KEY => key = Some(take_text(value)),
            F_CONTENT_TYPE => content_type = Some(take_text(value)),
            F_CORRELATION_ID => correlation_id = Some(take_text(value)),
            F_PRIORITY => priority = value_text(value).parse().unwrap_or(0),
            F_TTL_MS => {
                ttl = value_text(value)
                    .parse::<u64>()
                    .ok()
                    .map(Duration::from_millis)
            }
            other => {
                let name = other.strip_prefix(F_HEADER).unwrap_or(other).to_owned();
                headers.insert(name, take_text(value));
            }
        }
    }
    Ok(Message::from_parts(MessageParts {
        id: id.unwrap_or_else(|| entry_id.to_owned()),
        key,
        payload,
        headers,
        timestamp,
        content_type,
        correlation_id,
        priority,
        ttl,
    }))
}

/// The `PUBLISH` of `message` to `channel`: its body is the envelope when `envelope`, else
/// the bare payload.
///
/// The envelope is written by [`write_envelope`] into a buffer each thread keeps, then into
/// the command, which is sized up front as an `XADD` is (see [`stream_fields_capacity`]):
/// `rmp_serde` and a buffer of its own per message cost about 1,200 instructions a publish.
pub(crate) fn publish_command(channel: &str, message: &Message, envelope: bool) -> redis::Cmd {
    thread_local! {
        static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let publish = |body: &[u8]| {
        let mut cmd = redis::Cmd::with_capacity(3, "PUBLISH".len() + channel.len() + body.len());
        cmd.arg("PUBLISH").arg(channel).arg(body);
        cmd
    };
    if !envelope {
        return publish(message.payload());
    }
    SCRATCH.with_borrow_mut(|scratch| {
        scratch.clear();
        write_envelope(scratch, message);
        let cmd = publish(scratch);
        // A rare large message does not leave its buffer behind on the thread.
        if scratch.capacity() > 64 * 1024 {
            *scratch = Vec::new();
        }
        cmd
    })
}

/// Append the envelope of `message` to `out`: the bytes `rmp_serde::encode::write_named`
/// writes for `Outgoing` (a map of the fields set, in declaration order), written by hand
/// because this runs for every pub/sub publish. The test
/// `hand_written_envelopes_are_byte_for_byte_rmp_serde` holds the two together.
fn write_envelope(out: &mut Vec<u8>, message: &Message) {
    #[inline(always)]
    fn uint(out: &mut Vec<u8>, v: u64) {
        if v < 128 {
            out.push(v as u8);
        } else if let Ok(v) = u8::try_from(v) {
            out.extend_from_slice(&[0xcc, v]);
        } else if let Ok(v) = u16::try_from(v) {
            out.push(0xcd);
            out.extend_from_slice(&v.to_be_bytes());
        } else if let Ok(v) = u32::try_from(v) {
            out.push(0xce);
            out.extend_from_slice(&v.to_be_bytes());
        } else {
            out.push(0xcf);
            out.extend_from_slice(&v.to_be_bytes());
        }
    }
    /// A length: the fix form's marker or the 8-, 16- or 32-bit form's, then the length.
    #[inline(always)]
    fn len(out: &mut Vec<u8>, n: usize, fix: Option<(u8, usize)>, markers: [u8; 3]) {
        match (fix, u8::try_from(n), u16::try_from(n)) {
            (Some((marker, limit)), _, _) if n < limit => out.push(marker | n as u8),
            (_, Ok(n), _) if markers[0] != 0 => out.extend_from_slice(&[markers[0], n]),
            (_, _, Ok(n)) => {
                out.push(markers[1]);
                out.extend_from_slice(&n.to_be_bytes());
            }
            _ => {
                out.push(markers[2]);
                out.extend_from_slice(&(n as u32).to_be_bytes());
            }
        }
    }
    #[inline(always)]
    fn str(out: &mut Vec<u8>, s: &str) {
        len(out, s.len(), Some((0xa0, 32)), [0xd9, 0xda, 0xdb]);
        out.extend_from_slice(s.as_bytes());
    }
    let ttl_ms = message.ttl().map(|t| t.as_millis() as u64);
    let fields = 4
        + usize::from(message.key().is_some())
        + usize::from(!message.headers().is_empty())
        + usize::from(message.content_type().is_some())
        + usize::from(message.correlation_id().is_some())
        + usize::from(message.priority() != 0)
        + usize::from(ttl_ms.is_some());
    out.reserve(envelope_capacity(message));
    len(out, fields, Some((0x80, 16)), [0, 0xde, 0xdf]);
    str(out, "v");
    uint(out, u64::from(VERSION));
    str(out, "id");
    str(out, message.id());
    if let Some(key) = message.key() {
        str(out, "k");
        str(out, key);
    }
    str(out, "p");
    len(out, message.payload().len(), None, [0xc4, 0xc5, 0xc6]);
    out.extend_from_slice(message.payload());
    if !message.headers().is_empty() {
        str(out, "h");
        len(
            out,
            message.headers().len(),
            Some((0x80, 16)),
            [0, 0xde, 0xdf],
        );
        for (name, value) in message.headers() {
            str(out, name);
            str(out, value);
        }
    }
    str(out, "t");
    uint(out, nanos(message.timestamp()));
    if let Some(ct) = message.content_type() {
        str(out, "ct");
        str(out, ct);
    }
    if let Some(c) = message.correlation_id() {
        str(out, "c");
        str(out, c);
    }
    if message.priority() != 0 {
        str(out, "pr");
        uint(out, u64::from(message.priority()));
    }
    if let Some(ttl) = ttl_ms {
        str(out, "ttl");
        uint(out, ttl);
    }
}

/// A received pub/sub body: helix's envelope, or a plain message whose payload is the body.
pub(crate) fn from_pubsub_body(body: &[u8]) -> Message {
    decode(body).unwrap_or_else(|_| Message::new(Bytes::copy_from_slice(body)))
}

/// Whether `message`, recorded at `recorded_at`, has outlived its TTL by `now`.
pub(crate) fn expired(message: &Message, recorded_at: SystemTime, now: SystemTime) -> bool {
    message.ttl().is_some_and(|ttl| recorded_at + ttl <= now)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sizes an `XADD` is built with cover what is written, for a message with every
    /// field, headers that clash with reserved names, and numbers at their longest.
    #[test]
    fn stream_fields_capacity_covers_what_is_written() {
        let m = Message::new(vec![7u8; 300])
            .with_key("a-key")
            .with_header("lang", "日本語 ✓")
            .with_header("helix.id", "clashes")
            .with_header("payload", "clashes too")
            .with_content_type("application/octet-stream")
            .with_correlation_id("corr")
            .with_priority(10)
            .with_ttl(Duration::MAX);
        let mut cmd = redis::cmd("XADD");
        append_stream_fields(&mut cmd, &m, "payload");
        let written: Vec<usize> = cmd
            .args_iter()
            .skip(1)
            .map(|arg| match arg {
                redis::Arg::Simple(bytes) => bytes.len(),
                _ => 0,
            })
            .collect();
        let (args, bytes) = stream_fields_capacity(&m, "payload");
        assert!(
            written.len() <= args,
            "{} arguments, room for {args}",
            written.len()
        );
        let total: usize = written.iter().sum();
        assert!(total <= bytes, "{total} bytes, room for {bytes}");
    }

    #[test]
    fn every_field_survives_a_round_trip() {
        let m = Message::new(vec![0u8, 159, 146, 150])
            .with_key("k")
            .with_header("lang", "日本語 ✓")
            .with_content_type("application/octet-stream")
            .with_correlation_id("c")
            .with_priority(9)
            .with_ttl(Duration::from_millis(1500));
        let back = decode(&encode(&m).unwrap()).unwrap();
        assert_eq!(back, m);
    }

    fn fields_of(message: &Message, payload_field: &str) -> Vec<(String, redis::Value)> {
        let mut cmd = redis::cmd("XADD");
        append_stream_fields(&mut cmd, message, payload_field);
        let args: Vec<Vec<u8>> = cmd
            .args_iter()
            .skip(1)
            .map(|a| match a {
                redis::Arg::Simple(bytes) => bytes.to_vec(),
                _ => Vec::new(),
            })
            .collect();
        args.chunks(2)
            .map(|pair| {
                (
                    String::from_utf8(pair[0].clone()).unwrap(),
                    redis::Value::BulkString(pair[1].clone()),
                )
            })
            .collect()
    }

    #[test]
    fn stream_fields_carry_the_payload_as_it_is_and_every_field_back() {
        let m = Message::new(&b"{\"a\":1}"[..])
            .with_key("k")
            .with_header("lang", "日本語 ✓")
            .with_header("data", "clashes with the payload field")
            .with_header("helix.id", "clashes with the prefix")
            .with_content_type("application/json")
            .with_correlation_id("c")
            .with_priority(9)
            .with_ttl(Duration::from_millis(1500));
        let mut fields = fields_of(&m, "data");
        assert_eq!(
            fields[0],
            (
                "data".to_owned(),
                redis::Value::BulkString(b"{\"a\":1}".to_vec())
            )
        );
        let back = from_stream_fields("1-0", UNIX_EPOCH, &mut fields, "data").unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn a_plain_entry_is_a_message_with_its_payload_and_fields_as_headers() {
        let recorded = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        let mut fields = vec![
            (
                "data".to_owned(),
                redis::Value::BulkString(b"{\"a\":1}".to_vec()),
            ),
            (
                "source".to_owned(),
                redis::Value::BulkString(b"billing".to_vec()),
            ),
        ];
        let m = from_stream_fields("1700000000123-0", recorded, &mut fields, "data").unwrap();
        assert_eq!(m.payload().as_ref(), b"{\"a\":1}");
        assert_eq!(m.id(), "1700000000123-0");
        assert_eq!(m.timestamp(), recorded);
        assert_eq!(m.header("source"), Some("billing"));
        let none = from_stream_fields("1-0", recorded, &mut [], "data").expect_err("empty");
        assert_eq!(none.kind(), ErrorKind::Serialization);
    }

    #[test]
    fn first_format_entries_are_still_read() {
        let m = Message::new("old").with_header("h", "v");
        let mut fields = vec![(
            LEGACY_FIELD.to_owned(),
            redis::Value::BulkString(encode(&m).unwrap()),
        )];
        assert_eq!(
            from_stream_fields("1-0", UNIX_EPOCH, &mut fields, "data").unwrap(),
            m
        );
    }

    #[test]
    fn pubsub_bodies_are_bare_unless_the_envelope_is_on_and_both_are_read() {
        let body = |cmd: redis::Cmd| -> Vec<u8> {
            let args: Vec<Vec<u8>> = cmd
                .args_iter()
                .map(|arg| match arg {
                    redis::Arg::Simple(bytes) => bytes.to_vec(),
                    _ => panic!("no cursor in a PUBLISH"),
                })
                .collect();
            assert_eq!(args.len(), 3, "PUBLISH, the channel, the body");
            assert_eq!(args[0], b"PUBLISH");
            assert_eq!(args[1], b"chan");
            args[2].clone()
        };
        let m = Message::new("body").with_header("h", "v");
        assert_eq!(body(publish_command("chan", &m, false)), b"body");
        assert_eq!(
            from_pubsub_body(b"{\"a\":1}").payload().as_ref(),
            b"{\"a\":1}"
        );
        let enveloped = body(publish_command("chan", &m, true));
        assert_eq!(
            enveloped,
            encode(&m).unwrap(),
            "the envelope, byte for byte"
        );
        assert_eq!(from_pubsub_body(&enveloped), m);
        // Every field set, and a body of several kilobytes, still arrives whole.
        let big = Message::new(vec![9u8; 5000])
            .with_key("k")
            .with_header("a-long-header-name", "x".repeat(300))
            .with_content_type("application/octet-stream")
            .with_correlation_id("corr")
            .with_priority(9)
            .with_ttl(Duration::from_millis(u64::MAX));
        let enveloped = body(publish_command("chan", &big, true));
        assert_eq!(from_pubsub_body(&enveloped), big);
    }

    #[test]
    fn hand_written_envelopes_are_byte_for_byte_rmp_serde() {
        let many: Headers = (0..20)
            .map(|i| (format!("header-{i}"), "v".repeat(i * 20)))
            .collect();
        let messages = [
            Message::new(""),
            Message::new("body").with_header("h", "v"),
            Message::new(vec![1u8; 200])
                .with_key("k".repeat(31))
                .with_content_type("c".repeat(32))
                .with_correlation_id("r".repeat(300))
                .with_priority(1)
                .with_ttl(Duration::from_millis(127)),
            Message::new(vec![2u8; 70_000])
                .with_key("k".repeat(70_000))
                .with_headers(many)
                .with_priority(200)
                .with_ttl(Duration::from_millis(u64::MAX)),
            Message::new(vec![3u8; 300])
                .with_id("i".repeat(255))
                .with_ttl(Duration::from_millis(65_536)),
            Message::new("t")
                .with_timestamp(UNIX_EPOCH)
                .with_ttl(Duration::from_millis(255)),
            Message::new("t")
                .with_timestamp(UNIX_EPOCH + Duration::from_nanos(65_535))
                .with_ttl(Duration::from_millis(u64::from(u32::MAX) + 1)),
        ];
        // Every boundary between two forms of a length or a number.
        let lengths = [0, 31, 32, 255, 256, 65_535, 65_536];
        let numbers = [127, 128, 255, 256, 65_535, 65_536];
        let numbers = numbers
            .into_iter()
            .chain([u64::from(u32::MAX), u64::from(u32::MAX) + 1]);
        let edges = lengths
            .into_iter()
            .map(|n| Message::new(vec![4u8; n]).with_key("k".repeat(n)))
            .chain([15, 16].map(|n| {
                Message::new("h")
                    .with_headers((0..n).map(|i| (i.to_string(), String::new())).collect())
            }))
            .chain(numbers.map(|n| Message::new("n").with_ttl(Duration::from_millis(n))));
        for message in messages.into_iter().chain(edges) {
            let mut hand = Vec::new();
            write_envelope(&mut hand, &message);
            assert_eq!(hand, encode(&message).unwrap(), "{message:?}");
            assert_eq!(decode(&hand).unwrap(), message);
        }
    }

    #[test]
    fn foreign_bytes_are_a_serialization_error() {
        let err = decode(b"hello from redis-cli").expect_err("not an envelope");
        assert_eq!(err.kind(), ErrorKind::Serialization);
        assert!(
            err.to_string().contains("not a helix-messaging envelope"),
            "{err}"
        );
    }
}
