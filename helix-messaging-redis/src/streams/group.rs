//! The consumer group as Redis keeps it: creating it, the placeholder consumer and the sorted
//! set of long delays that stand beside it, and its backlog. The read loop, settlement and
//! the reclaimer all name these, so they stand at the ground.

use crate::primary::Connection;
use helix_messaging_core::Result;

use crate::config::RedisConfig;
use crate::error::{from_redis, has_code};
use crate::shared::Shared;

/// Consumer name that holds requeued and handed-back entries until a member claims them.
pub const REQUEUE_CONSUMER: &str = "helix-requeue";

/// The sorted set of `group`'s entries waiting out a delay longer than the ack deadline.
///
/// On a Redis Cluster the topic is the key's hash tag (`{topic}.helix-delayed.<group>`), so
/// the key lives in the stream's slot: the scripts that move entries between the two touch
/// both at once, which a cluster allows only within one slot. A single server keeps the
/// name it always had.
pub(super) fn delayed_key(config: &RedisConfig, topic: &str, group: &str) -> String {
    if config.cluster_nodes.is_empty() {
        format!("{topic}.helix-delayed.{group}")
    } else {
        format!("{{{topic}}}.helix-delayed.{group}")
    }
}

/// Create `group` on `topic` (and the stream) for what is added from now on, without a
/// member ([`Broker::create_group`](helix_messaging_core::Broker::create_group)).
pub(crate) async fn create_latest(shared: &Shared, topic: &str, group: &str) -> Result<()> {
    create_group(&mut shared.commands.clone(), topic, group, "$").await
}

/// Create `group` on `topic`, and the stream if there is none, delivering what comes after
/// `start`; a group that exists already is left as it is.
pub(super) async fn create_group(
    commands: &mut Connection,
    topic: &str,
    group: &str,
    start: &str,
) -> Result<()> {
    let created: redis::RedisResult<()> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(topic)
        .arg(group)
        .arg(start)
        .arg("MKSTREAM")
        .query_async(commands)
        .await;
    match created {
        Ok(()) => Ok(()),
        Err(e) if has_code(&e, "BUSYGROUP") => Ok(()),
        Err(e) => Err(from_redis(e, format!("XGROUP CREATE {topic} {group}"))),
    }
}

/// A group's backlog in one round trip. KEYS: stream, delayed set. ARGV: group, the
/// placeholder consumer. Returns {entries not yet delivered to the group, pending with a
/// member (delivered, unacked), waiting out a long delay, held by the placeholder}. The
/// placeholder's entries (requeued, waiting out a short delay, or handed back by a member
/// that left) belong to nobody, so they wait rather than being in flight. XINFO's `lag` is
/// nil when Redis cannot tell (entries were deleted inside the group's range); the entries
/// are then counted.
const BACKLOG_SCRIPT: &str = r"
local ok, groups = pcall(redis.call, 'XINFO', 'GROUPS', KEYS[1])
if not ok then return {0, 0, 0, 0} end
for _, flat in ipairs(groups) do
  local g = {}
  for i = 1, #flat, 2 do g[flat[i]] = flat[i + 1] end
  if g['name'] == ARGV[1] then
    local lag = g['lag']
    if type(lag) ~= 'number' then
      lag = #redis.call('XRANGE', KEYS[1], '(' .. g['last-delivered-id'], '+')
    end
    local held = 0
    local summary = redis.call('XPENDING', KEYS[1], ARGV[1])
    if summary[4] then
      for _, consumer in ipairs(summary[4]) do
        if consumer[1] == ARGV[2] then held = tonumber(consumer[2]) end
      end
    end
    return {lag, g['pending'] - held, redis.call('ZCARD', KEYS[2]), held}
  end
end
return {0, 0, 0, 0}
";

static BACKLOG: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(BACKLOG_SCRIPT));

/// `group`'s backlog on `topic` (see [`BACKLOG_SCRIPT`]): waiting is what the group has not
/// read, what waits out a delay and what the placeholder holds for the next member; in
/// flight is what a member holds.
pub(crate) async fn backlog(
    shared: &Shared,
    topic: &str,
    group: &str,
) -> Result<helix_messaging_core::Backlog> {
    let mut commands = shared.commands.clone();
    let (unread, pending, delayed, held): (u64, u64, u64, u64) = BACKLOG
        .key(topic)
        .key(delayed_key(&shared.config, topic, group))
        .arg(group)
        .arg(REQUEUE_CONSUMER)
        .invoke_async(&mut commands)
        .await
        .map_err(|e| from_redis(e, format!("reading the backlog of {group} on {topic}")))?;
    Ok(helix_messaging_core::Backlog {
        waiting: unread + delayed + held,
        in_flight: Some(pending),
    })
}
