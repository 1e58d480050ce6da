//! Delayed requeues, timed by Redis with the group's pending list (the parent module tells
//! how): the script that requeues an entry with a delay, and the hold pass that keeps a long
//! delay from being reclaimed before it is due.

use crate::primary::Connection;
use helix_messaging_core::Result;

use super::group::{REQUEUE_CONSUMER, delayed_key};
use super::reader::Reader;
use crate::error::from_redis;

/// Requeue one entry with a delay. KEYS: stream, delayed set. ARGV: group, requeue consumer,
/// entry id, delay ms, ack deadline ms. Returns 0 when the entry is no longer pending.
const DELAY_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local delay = tonumber(ARGV[4])
local deadline = tonumber(ARGV[5])
local at = now
if delay <= deadline then at = now + delay - deadline end
local claimed = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3],
    'TIME', string.format('%.0f', at), 'JUSTID')
if #claimed == 0 then return 0 end
if delay > deadline then redis.call('ZADD', KEYS[2], string.format('%.0f', now + delay), ARGV[3]) end
return 1
";

/// Keep long-delayed entries from being reclaimed early, and hand those now within the ack
/// deadline of being due to Redis's own timing. KEYS: stream, delayed set. ARGV: group,
/// requeue consumer, ack deadline ms. Returns how many left the set.
const HOLD_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local deadline = tonumber(ARGV[3])
local entries = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
local released = 0
for i = 1, #entries, 2 do
  local id = entries[i]
  local due = tonumber(entries[i + 1])
  local near = due - now <= deadline
  local at = now
  if near then at = due - deadline end
  local claimed = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id,
      'TIME', string.format('%.0f', at), 'JUSTID')
  if near or #claimed == 0 then
    redis.call('ZREM', KEYS[2], id)
    released = released + 1
  end
end
return released
";

pub(super) static DELAY: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(DELAY_SCRIPT));
static HOLD: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(HOLD_SCRIPT));

/// Run the hold pass for `reader`'s group (see [`HOLD_SCRIPT`]).
pub(super) async fn hold_delayed(reader: &Reader, connection: &mut Connection) -> Result<()> {
    let deadline_ms = reader.shared.config.streams.ack_deadline.as_millis() as u64;
    HOLD.key(&*reader.topic)
        .key(delayed_key(
            &reader.shared.config,
            &reader.topic,
            &reader.group,
        ))
        .arg(&*reader.group)
        .arg(REQUEUE_CONSUMER)
        .arg(deadline_ms)
        .invoke_async::<i64>(connection)
        .await
        .map(|_| ())
        .map_err(|e| from_redis(e, format!("holding delayed entries of {}", reader.topic)))
}
