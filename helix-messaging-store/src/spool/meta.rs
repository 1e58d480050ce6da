//! What the spool keeps of a message besides its payload (which has a column of its own):
//! its id, key, headers, timestamp, content type, correlation id, priority and TTL.
//!
//! Written as a BLOB in a compact form of the spool's own: a version byte, then each field in
//! a fixed order, numbers little-endian, texts and optional fields prefixed by their length
//! or presence. Files written before it hold the message as JSON text (`serde_json` of the
//! payloadless [`Message`]), which is still read. Forwarding a spool decodes every message:
//! the JSON cost about 4,900 instructions a message, a quarter of a forward's client work on
//! Redis Streams (callgrind).

use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use helix_messaging_core::{Error, ErrorKind, Headers, Message, MessageParts, Result};
use rusqlite::types::ValueRef;

/// The first byte of the compact form. JSON text starts with `{`, never with this.
const VERSION: u8 = 1;

/// `message` without its payload, in the compact form.
///
/// # Errors
/// [`ErrorKind::Serialization`] for a timestamp before the Unix epoch, which the spool has
/// never kept (the JSON it wrote before refused one too).
pub(crate) fn encode(message: &Message) -> Result<Vec<u8>> {
    let since_epoch = message
        .timestamp()
        .duration_since(UNIX_EPOCH)
        .map_err(|_| {
            Error::new(
                ErrorKind::Serialization,
                format!(
                    "spooling message {}: its timestamp is before the Unix epoch",
                    message.id()
                ),
            )
        })?;
    let texts: usize = [
        message.key(),
        message.content_type(),
        message.correlation_id(),
    ]
    .iter()
    .map(|text| text.map_or(0, str::len))
    .sum::<usize>()
        + message.id().len()
        + message
            .headers()
            .iter()
            .map(|(name, value)| name.len() + value.len() + 8)
            .sum::<usize>();
    let mut out = Vec::with_capacity(texts + 64);
    out.push(VERSION);
    text(&mut out, message.id());
    optional_text(&mut out, message.key());
    duration(&mut out, since_epoch);
    optional_text(&mut out, message.content_type());
    optional_text(&mut out, message.correlation_id());
    out.push(message.priority());
    match message.ttl() {
        Some(ttl) => {
            out.push(1);
            duration(&mut out, ttl);
        }
        None => out.push(0),
    }
    length(&mut out, message.headers().len());
    for (name, value) in message.headers() {
        text(&mut out, name);
        text(&mut out, value);
    }
    Ok(out)
}

/// The message a row holds: its metadata `meta` (the compact form, or JSON text from an
/// earlier version) with `payload`.
///
/// # Errors
/// A conversion failure of column `column` when `meta` is neither: cut short, malformed, or
/// of a version this one does not know.
pub(crate) fn decode(
    meta: ValueRef<'_>,
    payload: Vec<u8>,
    column: usize,
) -> rusqlite::Result<Message> {
    let failure = |ty, err: Box<dyn std::error::Error + Send + Sync>| {
        rusqlite::Error::FromSqlConversionFailure(column, ty, err)
    };
    let mut parts = match meta {
        ValueRef::Blob(bytes) => {
            compact(bytes).map_err(|err| failure(rusqlite::types::Type::Blob, err.into()))?
        }
        ValueRef::Text(json) => serde_json::from_slice::<Message>(json)
            .map_err(|err| failure(rusqlite::types::Type::Text, err.into()))?
            .into_parts(),
        other => {
            return Err(failure(
                other.data_type(),
                "a spooled message's metadata is neither text nor a blob".into(),
            ));
        }
    };
    parts.payload = payload.into();
    Ok(Message::from_parts(parts))
}

fn length(out: &mut Vec<u8>, n: usize) {
    // A text past 4 GiB would be written with a wrong length, but never reaches the file:
    // SQLite refuses a value over 1,000,000,000 bytes (SQLITE_MAX_LENGTH), so its append fails.
    out.extend_from_slice(&u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes());
}

fn text(out: &mut Vec<u8>, s: &str) {
    length(out, s.len());
    out.extend_from_slice(s.as_bytes());
}

fn optional_text(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => {
            out.push(1);
            text(out, s);
        }
        None => out.push(0),
    }
}

fn duration(out: &mut Vec<u8>, d: Duration) {
    out.extend_from_slice(&d.as_secs().to_le_bytes());
    out.extend_from_slice(&d.subsec_nanos().to_le_bytes());
}

/// Why a compact form could not be read.
#[derive(Debug, thiserror::Error)]
#[error("a spooled message's metadata is {0}")]
struct Malformed(&'static str);

/// The fields of a compact form, read front to back.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], Malformed> {
        if self.0.len() < n {
            return Err(Malformed("cut short"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn byte(&mut self) -> std::result::Result<u8, Malformed> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> std::result::Result<u32, Malformed> {
        let bytes = self.take(4)?;
        Ok(u32::from_le_bytes(bytes.try_into().expect("4 bytes")))
    }

    fn u64(&mut self) -> std::result::Result<u64, Malformed> {
        let bytes = self.take(8)?;
        Ok(u64::from_le_bytes(bytes.try_into().expect("8 bytes")))
    }

    fn text(&mut self) -> std::result::Result<String, Malformed> {
        let n = self.u32()? as usize;
        let bytes = self.take(n)?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| Malformed("not UTF-8 where text is expected"))
    }

    fn flag(&mut self) -> std::result::Result<bool, Malformed> {
        match self.byte()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(Malformed("malformed: a presence flag is neither 0 nor 1")),
        }
    }

    fn optional_text(&mut self) -> std::result::Result<Option<String>, Malformed> {
        Ok(if self.flag()? {
            Some(self.text()?)
        } else {
            None
        })
    }

    fn duration(&mut self) -> std::result::Result<Duration, Malformed> {
        let secs = self.u64()?;
        let nanos = self.u32()?;
        if nanos >= 1_000_000_000 {
            return Err(Malformed(
                "malformed: a duration's nanoseconds reach a second",
            ));
        }
        Ok(Duration::new(secs, nanos))
    }
}

fn compact(bytes: &[u8]) -> std::result::Result<MessageParts, Malformed> {
    let mut r = Reader(bytes);
    if r.byte()? != VERSION {
        return Err(Malformed("of a version this spool does not know"));
    }
    let id = r.text()?;
    let key = r.optional_text()?;
    let timestamp = UNIX_EPOCH.checked_add(r.duration()?).ok_or(Malformed(
        "malformed: a timestamp past what this system holds",
    ))?;
    let content_type = r.optional_text()?;
    let correlation_id = r.optional_text()?;
    let priority = r.byte()?;
    let ttl = if r.flag()? { Some(r.duration()?) } else { None };
    let count = r.u32()?;
    let mut headers = Headers::new();
    for _ in 0..count {
        let name = r.text()?;
        headers.insert(name, r.text()?);
    }
    if !r.0.is_empty() {
        return Err(Malformed("malformed: bytes are left after its last field"));
    }
    Ok(MessageParts {
        id,
        key,
        payload: Bytes::new(),
        headers,
        timestamp,
        content_type,
        correlation_id,
        priority,
        ttl,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every_field() -> Message {
        Message::new("the payload")
            .with_key("order-42")
            .with_header("lang", "日本語 ✓")
            .with_header("empty", "")
            .with_content_type("application/json")
            .with_correlation_id("corr-1")
            .with_priority(7)
            .with_ttl(Duration::new(3, 123_456_789))
            .with_timestamp(UNIX_EPOCH + Duration::new(1_796_000_000, 987_654_321))
    }

    fn round_trip(message: &Message) -> Message {
        let meta = encode(message).unwrap();
        decode(ValueRef::Blob(&meta), message.payload().to_vec(), 2).unwrap()
    }

    #[test]
    fn every_field_comes_back_exactly() {
        for message in [
            every_field(),
            Message::new(""),
            Message::new("x").with_id(""),
            Message::new("many")
                .with_headers((0..300).map(|i| (format!("h{i}"), "v".repeat(i))).collect()),
            Message::new("epoch").with_timestamp(UNIX_EPOCH),
            Message::new("long").with_key("k".repeat(70_000)),
        ] {
            assert_eq!(round_trip(&message), message);
        }
    }

    /// Spool files written before the compact form hold JSON text; they still forward.
    #[test]
    fn json_written_by_earlier_versions_is_still_read() {
        let message = every_field();
        let mut parts = message.clone().into_parts();
        parts.payload = Bytes::new();
        let json = serde_json::to_string(&Message::from_parts(parts)).unwrap();
        let read = decode(
            ValueRef::Text(json.as_bytes()),
            message.payload().to_vec(),
            2,
        )
        .unwrap();
        assert_eq!(read, message);
    }

    /// Whatever is cut off or corrupted, reading fails with an error naming the column, never
    /// a panic or a message made up from the rest.
    #[test]
    fn cut_short_or_corrupted_metadata_is_an_error() {
        let meta = encode(&every_field()).unwrap();
        for end in 0..meta.len() {
            let err = decode(ValueRef::Blob(&meta[..end]), Vec::new(), 2)
                .expect_err("a prefix is not a whole form");
            assert!(
                matches!(err, rusqlite::Error::FromSqlConversionFailure(2, _, _)),
                "{err:?}"
            );
        }
        let mut newer = meta.clone();
        newer[0] = VERSION + 1;
        let err = decode(ValueRef::Blob(&newer), Vec::new(), 2).unwrap_err();
        assert!(err.to_string().contains("version"), "{err}");
        let mut longer = meta.clone();
        longer.push(0);
        assert!(decode(ValueRef::Blob(&longer), Vec::new(), 2).is_err());
        assert!(decode(ValueRef::Text(b"{not json"), Vec::new(), 2).is_err());
        assert!(decode(ValueRef::Integer(1), Vec::new(), 2).is_err());
    }

    #[test]
    fn a_timestamp_before_the_epoch_is_refused_as_before() {
        let message = Message::new("old").with_timestamp(UNIX_EPOCH - Duration::from_secs(1));
        assert_eq!(
            encode(&message).unwrap_err().kind(),
            ErrorKind::Serialization
        );
    }
}
