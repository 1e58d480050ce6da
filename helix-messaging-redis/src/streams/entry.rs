//! Stream entries on the wire: the XADD that writes one, the time an entry id encodes, and
//! entries taken out of XREADGROUP replies. Publishing, reading and replay all use these.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use helix_messaging_core::{Error, ErrorKind, Result};
use redis::streams::StreamId;

use crate::codec;
use crate::shared::Shared;

/// The XADD of `message`. No `MAXLEN`: trimming by length alone would cut entries a
/// lagging group still needs (see the `trim` module).
pub(crate) fn xadd(
    shared: &Shared,
    topic: &str,
    message: &helix_messaging_core::Message,
) -> redis::Cmd {
    let payload_field = &shared.config.streams.payload_field;
    let (args, bytes) = codec::stream_fields_capacity(message, payload_field);
    let mut cmd = redis::Cmd::with_capacity(3 + args, "XADD".len() + topic.len() + 1 + bytes);
    cmd.arg("XADD");
    cmd.arg(topic);
    cmd.arg("*");
    codec::append_stream_fields(&mut cmd, message, payload_field);
    cmd
}

/// Milliseconds since the epoch, rounded up: an entry whose id time is `ms` was recorded at
/// or after `t` exactly when `ms >= ceil_ms(t)`.
pub(super) fn ceil_ms(t: SystemTime) -> u64 {
    let nanos = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos();
    nanos.div_ceil(1_000_000) as u64
}

/// The time encoded in a stream entry id (`<ms>-<seq>`).
pub(super) fn id_time(id: &str) -> SystemTime {
    let ms = id
        .split('-')
        .next()
        .and_then(|ms| ms.parse::<u64>().ok())
        .unwrap_or(0);
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// A stream entry taken out of a reply without copying: its id and fields.
pub(super) struct RawEntry {
    pub(super) id: String,
    pub(super) fields: Vec<(String, redis::Value)>,
}

impl From<StreamId> for RawEntry {
    fn from(entry: StreamId) -> Self {
        RawEntry {
            id: entry.id,
            fields: entry.map.into_iter().collect(),
        }
    }
}

fn text(value: redis::Value) -> Option<String> {
    match value {
        redis::Value::BulkString(bytes) => String::from_utf8(bytes).ok(),
        redis::Value::SimpleString(s) => Some(s),
        _ => None,
    }
}

fn malformed(command: &str) -> Error {
    Error::new(
        ErrorKind::Serialization,
        format!("{command} reply does not have the documented shape"),
    )
}

/// Parse an XREADGROUP reply (`[[key, [[id, [field, value, …]], …]]]`, or nil on time-out)
/// by taking the values apart instead of converting through maps and clones: this runs for
/// every entry read.
pub(super) fn parse_read_reply(reply: redis::Value) -> Result<Vec<RawEntry>> {
    const COMMAND: &str = "XREADGROUP";
    let streams = match reply {
        redis::Value::Nil => return Ok(Vec::new()),
        redis::Value::Array(streams) => streams,
        redis::Value::Map(pairs) => pairs
            .into_iter()
            .map(|(k, v)| redis::Value::Array(vec![k, v]))
            .collect(),
        _ => return Err(malformed(COMMAND)),
    };
    let mut out = Vec::new();
    for stream in streams {
        let redis::Value::Array(mut key_and_entries) = stream else {
            return Err(malformed(COMMAND));
        };
        let Some(redis::Value::Array(entries)) = key_and_entries.pop() else {
            return Err(malformed(COMMAND));
        };
        parse_entries(entries, COMMAND, &mut out)?;
    }
    Ok(out)
}

/// Parse an XRANGE reply (`[[id, [field, value, …]], …]`) the same way.
pub(super) fn parse_range_reply(reply: redis::Value) -> Result<Vec<RawEntry>> {
    const COMMAND: &str = "XRANGE";
    let redis::Value::Array(entries) = reply else {
        return Err(malformed(COMMAND));
    };
    let mut out = Vec::new();
    parse_entries(entries, COMMAND, &mut out)?;
    Ok(out)
}

/// `[[id, [field, value, …]], …]`, from `command`'s reply, onto `out`.
fn parse_entries(entries: Vec<redis::Value>, command: &str, out: &mut Vec<RawEntry>) -> Result<()> {
    out.reserve(entries.len());
    for entry in entries {
        let redis::Value::Array(mut id_and_fields) = entry else {
            return Err(malformed(command));
        };
        let fields = match id_and_fields.pop() {
            Some(redis::Value::Array(flat)) => flat,
            // An entry deleted while pending comes back with nil fields.
            Some(redis::Value::Nil) => Vec::new(),
            _ => return Err(malformed(command)),
        };
        let id = id_and_fields
            .pop()
            .and_then(text)
            .ok_or_else(|| malformed(command))?;
        let mut pairs = Vec::with_capacity(fields.len() / 2);
        let mut flat = fields.into_iter();
        while let (Some(name), Some(value)) = (flat.next(), flat.next()) {
            pairs.push((text(name).ok_or_else(|| malformed(command))?, value));
        }
        out.push(RawEntry { id, fields: pairs });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_bounds_round_up_to_whole_milliseconds() {
        let t = UNIX_EPOCH + Duration::from_micros(10_500);
        assert_eq!(ceil_ms(t), 11);
        assert_eq!(ceil_ms(UNIX_EPOCH + Duration::from_millis(10)), 10);
        assert_eq!(
            id_time("1700000000123-7"),
            UNIX_EPOCH + Duration::from_millis(1_700_000_000_123)
        );
    }
}
