//! Taking entries over in the group's pending list: the reclaimer's pass (XAUTOCLAIM, with
//! each entry's delivery count), and handing a leaving consumer's entries back to the group.

use crate::primary::Connection;
use helix_messaging_core::Result;
use redis::streams::{StreamAutoClaimReply, StreamPendingCountReply};

use super::entry::RawEntry;
use super::group::{REQUEUE_CONSUMER, delayed_key};
use super::reader::Reader;
use crate::acks::EntryId;
use crate::error::from_redis;

/// Take requeued entries and entries idle past the ack deadline, with their delivery counts.
pub(super) async fn claim(
    reader: &Reader,
    connection: &mut Connection,
    cursor: &mut String,
    room: usize,
) -> Result<Vec<(RawEntry, u32)>> {
    let deadline_ms = reader.shared.config.streams.ack_deadline.as_millis() as u64;
    let reply: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
        .arg(&*reader.topic)
        .arg(&*reader.group)
        .arg(&reader.consumer)
        .arg(deadline_ms)
        .arg(cursor.as_str())
        .arg("COUNT")
        .arg(room)
        .query_async(connection)
        .await
        .map_err(|e| from_redis(e, format!("XAUTOCLAIM on {}", reader.topic)))?;
    *cursor = reply.next_stream_id;
    if !reply.deleted_ids.is_empty() {
        // Trimmed away while pending: nothing left to deliver, so clear them from the group.
        let _: redis::RedisResult<i64> = redis::cmd("XACK")
            .arg(&*reader.topic)
            .arg(&*reader.group)
            .arg(&reply.deleted_ids)
            .query_async(connection)
            .await;
    }
    let claimed = reply.claimed;
    if claimed.is_empty() {
        return Ok(Vec::new());
    }
    // Each entry's own delivery count, which XAUTOCLAIM has just incremented: one XPENDING
    // per id, exactly that id, in one round trip. (A range from the first to the last id would
    // also list this consumer's other pending entries between them and crowd claimed ones
    // out of the reply.)
    let mut counts = redis::pipe();
    for entry in &claimed {
        counts
            .cmd("XPENDING")
            .arg(&*reader.topic)
            .arg(&*reader.group)
            .arg(&entry.id)
            .arg(&entry.id)
            .arg(1);
    }
    let pending: Vec<StreamPendingCountReply> = counts
        .query_async(connection)
        .await
        .map_err(|e| from_redis(e, format!("XPENDING on {}", reader.topic)))?;
    Ok(claimed
        .into_iter()
        .zip(pending)
        .map(|(entry, pending)| {
            // Gone from the pending list meanwhile (acked by a member it was also claimed
            // by): at least the claim and the delivery before it.
            let count = pending.ids.first().map_or(2, |p| p.times_delivered);
            (
                RawEntry::from(entry),
                u32::try_from(count).unwrap_or(u32::MAX),
            )
        })
        .collect())
}

/// On the way out: a private group is destroyed; otherwise this consumer's pending entries
/// go back to the group for the other members, and the consumer is removed.
pub(super) async fn hand_back(reader: &Reader, connection: &mut Connection, private: bool) {
    let topic = &*reader.topic;
    let group = &*reader.group;
    if private {
        let destroyed: redis::RedisResult<i64> = redis::cmd("XGROUP")
            .arg("DESTROY")
            .arg(topic)
            .arg(group)
            .query_async(connection)
            .await;
        // The group's long delays die with it.
        let _: redis::RedisResult<i64> = redis::cmd("DEL")
            .arg(delayed_key(&reader.shared.config, topic, group))
            .query_async(connection)
            .await;
        if let Err(err) = destroyed {
            tracing::warn!(topic, group, error = %err, "cannot remove private consumer group");
        }
        return;
    }
    // Each entry keeps its count, less the read that never reached the application.
    let received: Vec<EntryId> = std::mem::take(&mut *reader.received.lock())
        .into_iter()
        .collect();
    let handed: redis::RedisResult<i64> = HAND_BACK
        .key(topic)
        .arg(group)
        .arg(&reader.consumer)
        .arg(REQUEUE_CONSUMER)
        .arg(received)
        .invoke_async(connection)
        .await;
    if let Err(err) = handed {
        tracing::warn!(topic, group, error = %err, "cannot hand back pending entries; the reclaimer will take them after the ack deadline");
    }
}

/// Hand a leaving consumer's pending entries to the requeue consumer, then remove it, in one
/// atomic step: removing a consumer drops whatever it still has pending, so nothing may
/// reach its pending list between the listing and the removal. KEYS: stream. ARGV: group,
/// consumer, requeue consumer, then the ids the application received (an entry read but
/// never received has its delivery count set back by one). Returns how many were handed.
const HAND_BACK_SCRIPT: &str = r"
local received = {}
for i = 4, #ARGV do received[ARGV[i]] = true end
local handed = 0
while true do
  local pending = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1000, ARGV[2])
  if #pending == 0 then break end
  for _, entry in ipairs(pending) do
    local count = entry[4]
    if not received[entry[1]] and count > 0 then count = count - 1 end
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[3], 0, entry[1], 'TIME', 0,
        'RETRYCOUNT', count, 'JUSTID')
    handed = handed + 1
  end
end
redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
return handed
";

static HAND_BACK: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(HAND_BACK_SCRIPT));
