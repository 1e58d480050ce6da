//! Streams mode: XADD, consumer groups with XREADGROUP, XACK, requeue via the group's pending
//! list, a reclaimer (XAUTOCLAIM) for entries left pending past the ack deadline, XRANGE
//! replay.
//!
//! Requeue hands an entry to a placeholder consumer ([`REQUEUE_CONSUMER`]) with its idle
//! time set to the maximum (`XCLAIM … TIME 0 JUSTID`, which keeps the delivery count), so the
//! next reclaimer pass of any member takes it at once; that pass increments the delivery
//! count, which is where `attempt` comes from.
//!
//! A delayed requeue is timed by Redis itself, with the same pending list: the entry goes to
//! the requeue consumer with its delivery time set so that it becomes idle past the ack
//! deadline exactly when the delay is over, and the reclaimer takes it then. A delay longer
//! than the ack deadline cannot be expressed that way (Redis refuses delivery times in the
//! future), so such an entry is also put in a sorted set by due time
//! (`<topic>.helix-delayed.<group>`) and kept idle-fresh by every member's reclaimer until
//! it is within the ack deadline of being due. The entry never leaves the group's pending
//! list, so the wait reaches only its group, counts as an attempt, survives any consumer's
//! crash and is never trimmed.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use helix_messaging_core::{
    Acknowledge, Delivery, DeliveryInfo, Error, ErrorKind, HistoryEntry, HistoryStream, Position,
    Result, Settlement, StartPosition, SubscribeOptions, Subscription, TimeRange,
};
use redis::aio::ConnectionManager;
use redis::streams::{StreamAutoClaimReply, StreamId, StreamPendingCountReply, StreamRangeReply};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use crate::Shared;
use crate::acks::EntryId;
use crate::codec;
use crate::error::{from_redis, has_code};

/// Consumer name that holds requeued and handed-back entries until a member claims them.
pub const REQUEUE_CONSUMER: &str = "helix-requeue";

/// The sorted set of `group`'s entries waiting out a delay longer than the ack deadline.
fn delayed_key(topic: &str, group: &str) -> String {
    format!("{topic}.helix-delayed.{group}")
}

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

static DELAY: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(DELAY_SCRIPT));
static HOLD: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(HOLD_SCRIPT));

/// Run the hold pass for `reader`'s group (see [`HOLD_SCRIPT`]).
async fn hold_delayed(reader: &Reader, connection: &mut ConnectionManager) -> Result<()> {
    let deadline_ms = reader.shared.config.streams.ack_deadline.as_millis() as u64;
    HOLD.key(&*reader.topic)
        .key(delayed_key(&reader.topic, &reader.group))
        .arg(&*reader.group)
        .arg(REQUEUE_CONSUMER)
        .arg(deadline_ms)
        .invoke_async::<i64>(connection)
        .await
        .map(|_| ())
        .map_err(|e| from_redis(e, format!("holding delayed entries of {}", reader.topic)))
}

/// Entries read per XRANGE page when reading history.
const RANGE_PAGE: usize = 500;

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
fn ceil_ms(t: SystemTime) -> u64 {
    let nanos = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos();
    nanos.div_ceil(1_000_000) as u64
}

/// The time encoded in a stream entry id (`<ms>-<seq>`).
fn id_time(id: &str) -> SystemTime {
    let ms = id
        .split('-')
        .next()
        .and_then(|ms| ms.parse::<u64>().ok())
        .unwrap_or(0);
    UNIX_EPOCH + Duration::from_millis(ms)
}

async fn create_group(
    commands: &mut ConnectionManager,
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

/// A stream entry taken out of a reply without copying: its id and fields.
struct RawEntry {
    id: String,
    fields: Vec<(String, redis::Value)>,
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

/// Parse an XREADGROUP reply (`[[key, [[id, [field, value, …]], …]]]`, or nil on time-out)
/// by taking the values apart instead of converting through maps and clones: this runs for
/// every entry read.
fn parse_read_reply(reply: redis::Value) -> Result<Vec<RawEntry>> {
    let malformed = || {
        Error::new(
            ErrorKind::Serialization,
            "XREADGROUP reply does not have the documented shape",
        )
    };
    let streams = match reply {
        redis::Value::Nil => return Ok(Vec::new()),
        redis::Value::Array(streams) => streams,
        redis::Value::Map(pairs) => pairs
            .into_iter()
            .map(|(k, v)| redis::Value::Array(vec![k, v]))
            .collect(),
        _ => return Err(malformed()),
    };
    let mut out = Vec::new();
    for stream in streams {
        let redis::Value::Array(mut key_and_entries) = stream else {
            return Err(malformed());
        };
        let Some(redis::Value::Array(entries)) = key_and_entries.pop() else {
            return Err(malformed());
        };
        out.reserve(entries.len());
        for entry in entries {
            let redis::Value::Array(mut id_and_fields) = entry else {
                return Err(malformed());
            };
            let fields = match id_and_fields.pop() {
                Some(redis::Value::Array(flat)) => flat,
                // An entry deleted while pending comes back with nil fields.
                Some(redis::Value::Nil) => Vec::new(),
                _ => return Err(malformed()),
            };
            let id = id_and_fields.pop().and_then(text).ok_or_else(malformed)?;
            let mut pairs = Vec::with_capacity(fields.len() / 2);
            let mut flat = fields.into_iter();
            while let (Some(name), Some(value)) = (flat.next(), flat.next()) {
                pairs.push((text(name).ok_or_else(malformed)?, value));
            }
            out.push(RawEntry { id, fields: pairs });
        }
    }
    Ok(out)
}

/// What a subscription's task and its deliveries' ackers share.
struct Reader {
    shared: Arc<Shared>,
    topic: Arc<str>,
    group: Arc<str>,
    /// The group as reported in deliveries (`None` for a private subscription).
    reported_group: Option<Arc<str>>,
    consumer: String,
    prefetch: usize,
    /// Deliveries handed out and not yet settled or dropped.
    outstanding: AtomicUsize,
    /// Woken when settlements free the first slot of a full window, or half the window: the
    /// two points the reader waits for (not on every settlement, which would wake it once
    /// per delivery), and by a requeue.
    slot_freed: Notify,
    /// Set by a requeue so the next pass claims at once, from the start of the pending list.
    requeued: AtomicBool,
    /// Entries the application has received and not settled. XREADGROUP counts a delivery
    /// when it reads an entry, but one still on its way to the application when the
    /// subscription ends was never seen: handing it back, its count is set back by one.
    /// Kept as [`EntryId`]s: inserting and removing one per delivery costs no allocation.
    received: parking_lot::Mutex<std::collections::HashSet<EntryId>>,
    /// Where its deliveries' acks go, to be sent together.
    acks: crate::acks::Acks,
}

pub(crate) async fn subscribe(
    shared: &Arc<Shared>,
    topic: &str,
    options: SubscribeOptions,
) -> Result<Subscription> {
    let private = options.group.is_none();
    let group: Arc<str> = match &options.group {
        Some(group) => Arc::from(group.as_str()),
        None => Arc::from(format!(
            "{}{}",
            crate::trim::PRIVATE_GROUP_PREFIX,
            uuid::Uuid::new_v4().simple()
        )),
    };
    let start = match options.start {
        StartPosition::Latest => "$".to_owned(),
        StartPosition::Earliest => "0".to_owned(),
        // The group starts after the given id, so the last id before `t` is the start.
        StartPosition::Time(t) => match ceil_ms(t) {
            0 => "0".to_owned(),
            ms => format!("{}-{}", ms - 1, u64::MAX),
        },
    };
    let mut commands = shared.commands.clone();
    // Created before returning, so every later XADD reaches the group.
    create_group(&mut commands, topic, &group, &start).await?;

    // Blocking reads get a connection of their own: on the shared multiplexed connection a
    // blocked XREADGROUP would hold up every publish and ack queued behind it.
    let connection = shared
        .client
        .get_connection_manager_with_config(crate::manager_config(
            &shared.config,
            shared.config.streams.block,
        ))
        .await
        .map_err(|e| from_redis(e, format!("connecting to {}", shared.config.address())))?;
    let acks_connection = shared
        .acks_connection
        .get_or_try_init(|| {
            shared
                .client
                .get_connection_manager_with_config(crate::manager_config(
                    &shared.config,
                    Duration::ZERO,
                ))
        })
        .await
        .map_err(|e| from_redis(e, format!("connecting to {}", shared.config.address())))?
        .clone();

    let topic: Arc<str> = Arc::from(topic);
    let acks = crate::acks::Acks::start(
        acks_connection,
        topic.clone(),
        group.clone(),
        shared.shutdown.clone(),
    );
    let reader = Arc::new(Reader {
        shared: shared.clone(),
        topic: topic.clone(),
        reported_group: (!private).then(|| group.clone()),
        group,
        consumer: format!("c-{}", uuid::Uuid::new_v4().simple()),
        prefetch: options.prefetch.max(1),
        outstanding: AtomicUsize::new(0),
        slot_freed: Notify::new(),
        requeued: AtomicBool::new(false),
        received: parking_lot::Mutex::default(),
        acks,
    });
    // Batches, each at most a prefetch window, so two of them bound what is buffered.
    let (tx, rx) = mpsc::channel(2);
    let cancel = shared.shutdown.child_token();
    let reported_group = reader.reported_group.clone();
    let seen_by = reader.clone();
    shared
        .tasks
        .spawn(read_loop(reader, connection, tx, cancel.clone(), private));
    let deliveries = futures::StreamExt::inspect(crate::channel_stream(rx, cancel), move |item| {
        if let Ok(delivery) = item
            && let Some(Position::StreamId(id)) = &delivery.info().position
            && let Some(key) = EntryId::parse(id)
        {
            seen_by.received.lock().insert(key);
        }
    });
    Ok(Subscription::new(
        topic,
        reported_group,
        Box::pin(deliveries),
    ))
}

/// How long a reader with only a few free slots (under half its prefetch) waits for
/// settlements to free more before reading into the few: long enough for a consumer that
/// settles steadily to free half a window, short enough not to stall one that holds its
/// deliveries until the window is full.
const SHORT_READ_WAIT: Duration = Duration::from_millis(10);

async fn read_loop(
    reader: Arc<Reader>,
    mut connection: ConnectionManager,
    tx: mpsc::Sender<Vec<Result<Delivery>>>,
    cancel: CancellationToken,
    private: bool,
) {
    let streams = reader.shared.config.streams.clone();
    let mut cursor = "0-0".to_owned();
    let mut last_claim: Option<Instant> = None;
    // Well inside the ack deadline, so a long-delayed entry is refreshed before it could be
    // reclaimed; and once before the first claim, for entries delayed while no member ran.
    let hold_every = streams.ack_deadline / 4;
    let mut last_hold: Option<Instant> = None;
    // Since when a few slots have been free, waiting for more.
    let mut short_since: Option<Instant> = None;
    'reading: while !cancel.is_cancelled() {
        let room = reader
            .prefetch
            .saturating_sub(reader.outstanding.load(Ordering::Acquire));
        // Reading only once half the window is free keeps reads large: many small
        // XREADGROUP round trips, serialized with delivery, cap throughput. But an
        // application may hold what it has until it gets more (a batch of the whole window),
        // so a few free slots are filled anyway once settlements stop freeing more.
        if room == 0 {
            short_since = None;
            tokio::select! {
                () = cancel.cancelled() => break,
                () = reader.slot_freed.notified() => {}
            }
            continue;
        }
        if room < reader.prefetch.div_ceil(2) {
            let left = SHORT_READ_WAIT
                .saturating_sub(short_since.get_or_insert_with(Instant::now).elapsed());
            if !left.is_zero() {
                tokio::select! {
                    () = cancel.cancelled() => break,
                    () = reader.slot_freed.notified() => {}
                    () = tokio::time::sleep(left) => {}
                }
                continue;
            }
        }
        short_since = None;
        let requeued = reader.requeued.swap(false, Ordering::AcqRel);
        if requeued {
            cursor = "0-0".to_owned();
        }
        let claim_due =
            requeued || last_claim.is_none_or(|t| t.elapsed() >= streams.claim_interval);
        let batch = tokio::select! {
            () = cancel.cancelled() => break,
            batch = async {
                if claim_due {
                    if last_hold.is_none_or(|t| t.elapsed() >= hold_every) {
                        hold_delayed(&reader, &mut connection).await?;
                        last_hold = Some(Instant::now());
                    }
                    last_claim = Some(Instant::now());
                    let claimed = claim(&reader, &mut connection, &mut cursor, room).await?;
                    if !claimed.is_empty() {
                        return Ok(claimed);
                    }
                }
                read_new(&reader, &mut connection, room, streams.block).await
            } => batch,
        };
        match batch {
            Ok(entries) => {
                let mut batch = Vec::with_capacity(entries.len());
                for (entry, attempt) in entries {
                    if let Some(item) = to_delivery(&reader, entry, attempt).await {
                        if item.is_ok() {
                            reader.outstanding.fetch_add(1, Ordering::AcqRel);
                        }
                        batch.push(item);
                    }
                }
                if batch.is_empty() {
                    continue;
                }
                // One hand-over per read rather than per entry.
                let sent = tokio::select! {
                    () = cancel.cancelled() => break 'reading,
                    sent = tx.send(batch) => sent,
                };
                if sent.is_err() {
                    break 'reading;
                }
            }
            Err(err) if err.kind() == ErrorKind::NotFound => {
                // The group (or the whole stream) vanished, e.g. a restart of a Redis that
                // does not persist: recreate it and read whatever the stream holds.
                tracing::warn!(topic = %reader.topic, group = %reader.group, error = %err, "consumer group missing; recreating it");
                let mut commands = reader.shared.commands.clone();
                if let Err(err) =
                    create_group(&mut commands, &reader.topic, &reader.group, "0").await
                {
                    tracing::warn!(error = %err, "cannot recreate consumer group");
                    tokio::time::sleep(streams.claim_interval).await;
                }
            }
            Err(err) => {
                tracing::warn!(topic = %reader.topic, error = %err, "reading the stream failed; waiting for Redis");
                let probe = connection.clone();
                let back = reader
                    .shared
                    .retry_until_cancelled("reaching Redis", &cancel, || {
                        let mut probe = probe.clone();
                        async move {
                            redis::cmd("PING")
                                .query_async::<String>(&mut probe)
                                .await
                                .map_err(|e| from_redis(e, "PING"))
                        }
                    })
                    .await;
                if back.is_none() {
                    break;
                }
                if err.kind() == ErrorKind::Connection {
                    reader.shared.count_reconnect();
                }
            }
        }
    }
    drop(tx);
    hand_back(&reader, &mut connection, private).await;
}

/// Take requeued entries and entries idle past the ack deadline, with their delivery counts.
async fn claim(
    reader: &Reader,
    connection: &mut ConnectionManager,
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

async fn read_new(
    reader: &Reader,
    connection: &mut ConnectionManager,
    room: usize,
    block: Duration,
) -> Result<Vec<(RawEntry, u32)>> {
    let reply: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(&*reader.group)
        .arg(&reader.consumer)
        .arg("COUNT")
        .arg(room)
        .arg("BLOCK")
        .arg(block.as_millis() as u64)
        .arg("STREAMS")
        .arg(&*reader.topic)
        .arg(">")
        .query_async(connection)
        .await
        .map_err(|e| from_redis(e, format!("XREADGROUP on {}", reader.topic)))?;
    Ok(parse_read_reply(reply)?
        .into_iter()
        .map(|entry| (entry, 1))
        .collect())
}

/// Turn a stream entry into a delivery. Expired entries are acked and skipped (`None`);
/// undecodable ones are copied to `<topic>.undecodable` with the reason, acked, and reported
/// as an error on the subscription.
async fn to_delivery(
    reader: &Arc<Reader>,
    mut entry: RawEntry,
    attempt: u32,
) -> Option<Result<Delivery>> {
    let recorded_at = id_time(&entry.id);
    let decoded = codec::from_stream_fields(
        &entry.id,
        recorded_at,
        &mut entry.fields,
        &reader.shared.config.streams.payload_field,
    );
    match decoded {
        Ok(message) if codec::expired(&message, recorded_at, SystemTime::now()) => {
            ack(reader, &entry.id).await.ok();
            tracing::debug!(topic = %reader.topic, id = %entry.id, "dropped an entry whose TTL passed");
            None
        }
        Ok(message) => {
            let Some(key) = EntryId::parse(&entry.id) else {
                let err = Error::new(
                    ErrorKind::Serialization,
                    format!("entry id {:?} is not of the form <ms>-<seq>", entry.id),
                );
                return Some(Err(set_aside(reader, entry, &err).await));
            };
            Some(Ok(Delivery::new(
                Arc::new(message),
                DeliveryInfo {
                    topic: reader.topic.clone(),
                    group: reader.reported_group.clone(),
                    attempt,
                    redelivered: attempt > 1,
                    position: Some(Position::StreamId(entry.id)),
                },
                Box::new(StreamAcker {
                    reader: reader.clone(),
                    key,
                }),
            )))
        }
        Err(err) => Some(Err(set_aside(reader, entry, &err).await)),
    }
}

/// Move an undecodable entry out of the group's way without losing it.
async fn set_aside(reader: &Reader, entry: RawEntry, err: &Error) -> Error {
    let parking = format!("{}.undecodable", reader.topic);
    let mut cmd = redis::cmd("XADD");
    cmd.arg(&parking).arg("*");
    for (field, value) in &entry.fields {
        // Binary values are kept byte for byte; anything else as its textual form.
        match value {
            redis::Value::BulkString(bytes) => cmd.arg(field).arg(bytes.as_slice()),
            other => cmd.arg(field).arg(format!("{other:?}")),
        };
    }
    cmd.arg("helix.reason")
        .arg(err.message())
        .arg("helix.source-id")
        .arg(&entry.id)
        .arg("helix.group")
        .arg(&*reader.group);
    let mut commands = reader.shared.commands.clone();
    let parked: redis::RedisResult<String> = cmd.query_async(&mut commands).await;
    match parked {
        Ok(_) => {
            ack(reader, &entry.id).await.ok();
            Error::new(
                ErrorKind::Serialization,
                format!(
                    "entry {} on {} cannot be decoded ({}); moved to {parking}",
                    entry.id,
                    reader.topic,
                    err.message()
                ),
            )
        }
        Err(park_err) => Error::new(
            ErrorKind::Serialization,
            format!(
                "entry {} on {} cannot be decoded ({}) and could not be moved aside ({park_err}); it stays pending",
                entry.id,
                reader.topic,
                err.message()
            ),
        ),
    }
}

/// Ack `id` for `reader`'s group: whether it was still pending.
async fn ack(reader: &Reader, id: &str) -> Result<bool> {
    if let Some(key) = EntryId::parse(id) {
        return reader.acks.ack(key).await;
    }
    // Not an id Redis makes, so not one the ack task can carry: acked on its own, as given.
    let acked: i64 = redis::cmd("XACK")
        .arg(&*reader.topic)
        .arg(&*reader.group)
        .arg(id)
        .query_async(&mut reader.shared.commands.clone())
        .await
        .map_err(|e| from_redis(e, format!("XACK of {id} on {}", reader.topic)))?;
    Ok(acked > 0)
}

/// On the way out: a private group is destroyed; otherwise this consumer's pending entries
/// go back to the group for the other members, and the consumer is removed.
async fn hand_back(reader: &Reader, connection: &mut ConnectionManager, private: bool) {
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
            .arg(delayed_key(topic, group))
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

/// `XCLAIM` to the requeue consumer with maximal idle time and the delivery count kept.
fn requeue_cmd(topic: &str, group: &str, ids: &[EntryId]) -> redis::Cmd {
    let mut cmd = redis::cmd("XCLAIM");
    cmd.arg(topic)
        .arg(group)
        .arg(REQUEUE_CONSUMER)
        .arg(0)
        .arg(ids)
        .arg("TIME")
        .arg(0)
        .arg("JUSTID");
    cmd
}

struct StreamAcker {
    reader: Arc<Reader>,
    key: EntryId,
}

#[async_trait]
impl Acknowledge for StreamAcker {
    fn delays_requeue(&self) -> bool {
        true
    }

    async fn settle(mut self: Box<Self>, outcome: Settlement) -> Result<()> {
        self.reader.shared.ensure_open()?;
        self.reader.received.lock().remove(&self.key);
        match outcome {
            Settlement::Ack | Settlement::Reject => match self.reader.acks.ack(self.key).await? {
                true => Ok(()),
                false => Err(self.not_pending()),
            },
            Settlement::RequeueAfter(delay) => {
                let reader = &self.reader;
                let mut commands = reader.shared.commands.clone();
                let deadline_ms = reader.shared.config.streams.ack_deadline.as_millis() as u64;
                let held: i64 = DELAY
                    .key(&*reader.topic)
                    .key(delayed_key(&reader.topic, &reader.group))
                    .arg(&*reader.group)
                    .arg(REQUEUE_CONSUMER)
                    .arg(self.key)
                    .arg(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX))
                    .arg(deadline_ms)
                    .invoke_async(&mut commands)
                    .await
                    .map_err(|e| {
                        from_redis(
                            e,
                            format!("delayed requeue of {} on {}", self.key, reader.topic),
                        )
                    })?;
                if held == 0 {
                    return Err(self.not_pending());
                }
                Ok(())
            }
            Settlement::Requeue => {
                let reader = &self.reader;
                let mut commands = reader.shared.commands.clone();
                let ids = [self.key];
                let claimed: Vec<String> = requeue_cmd(&reader.topic, &reader.group, &ids)
                    .query_async(&mut commands)
                    .await
                    .map_err(|e| {
                        from_redis(e, format!("requeue {} on {}", self.key, reader.topic))
                    })?;
                if claimed.is_empty() {
                    return Err(self.not_pending());
                }
                reader.requeued.store(true, Ordering::Release);
                reader.slot_freed.notify_one();
                Ok(())
            }
        }
    }
}

impl StreamAcker {
    fn not_pending(&self) -> Error {
        Error::new(
            ErrorKind::NotFound,
            format!(
                "entry {} on {} is no longer pending for group {} (already settled, or taken over by another member after the ack deadline)",
                self.key, self.reader.topic, self.reader.group
            ),
        )
    }
}

impl Drop for StreamAcker {
    /// Settled or not, the delivery no longer occupies a prefetch slot; an unsettled one stays
    /// pending and is reclaimed after the ack deadline.
    fn drop(&mut self) {
        let reader = &self.reader;
        let before = reader.outstanding.fetch_sub(1, Ordering::AcqRel);
        // Each count is passed by exactly one decrement, so each point wakes the reader once.
        let room = reader.prefetch.saturating_sub(before.saturating_sub(1));
        if room == 1 || room == reader.prefetch.div_ceil(2) {
            reader.slot_freed.notify_one();
        }
    }
}

/// A group's backlog in one round trip. KEYS: stream, delayed set. ARGV: group. Returns
/// {entries not yet delivered to the group, pending (delivered, unacked, or waiting out a
/// short delay), waiting out a long delay}. XINFO's `lag` is nil when Redis cannot tell
/// (entries were deleted inside the group's range); the entries are then counted.
const BACKLOG_SCRIPT: &str = r"
local ok, groups = pcall(redis.call, 'XINFO', 'GROUPS', KEYS[1])
if not ok then return {0, 0, 0} end
for _, flat in ipairs(groups) do
  local g = {}
  for i = 1, #flat, 2 do g[flat[i]] = flat[i + 1] end
  if g['name'] == ARGV[1] then
    local lag = g['lag']
    if type(lag) ~= 'number' then
      lag = #redis.call('XRANGE', KEYS[1], '(' .. g['last-delivered-id'], '+')
    end
    return {lag, g['pending'], redis.call('ZCARD', KEYS[2])}
  end
end
return {0, 0, 0}
";

static BACKLOG: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(BACKLOG_SCRIPT));

/// `group`'s backlog on `topic` (see [`BACKLOG_SCRIPT`]): waiting is what the group has not
/// read plus what waits out a long delay; in flight is its pending list.
pub(crate) async fn backlog(
    shared: &Shared,
    topic: &str,
    group: &str,
) -> Result<helix_messaging_core::Backlog> {
    let mut commands = shared.commands.clone();
    let (unread, pending, delayed): (u64, u64, u64) = BACKLOG
        .key(topic)
        .key(delayed_key(topic, group))
        .arg(group)
        .invoke_async(&mut commands)
        .await
        .map_err(|e| from_redis(e, format!("reading the backlog of {group} on {topic}")))?;
    Ok(helix_messaging_core::Backlog {
        waiting: unread + delayed,
        in_flight: Some(pending),
    })
}

pub(crate) fn read_range(shared: Arc<Shared>, topic: &str, range: TimeRange) -> HistoryStream {
    let topic: Arc<str> = Arc::from(topic);
    let end_ms = ceil_ms(range.to());
    let start = format!("{}-0", ceil_ms(range.from()));
    // Exclusive end: entries recorded before `to`, i.e. with an id time below ceil(to).
    let end = format!("({end_ms}-0");
    let first = (end_ms > 0).then_some(start);
    let pages = futures::stream::unfold(first, move |next| {
        let shared = shared.clone();
        let topic = topic.clone();
        let end = end.clone();
        async move {
            let start = next?;
            let mut commands = shared.commands.clone();
            let page: Result<StreamRangeReply> = redis::cmd("XRANGE")
                .arg(&*topic)
                .arg(&start)
                .arg(&end)
                .arg("COUNT")
                .arg(RANGE_PAGE)
                .query_async(&mut commands)
                .await
                .map_err(|e| from_redis(e, format!("XRANGE on {topic}")));
            match page {
                Err(err) => Some((vec![Err(err)], None)),
                Ok(page) => {
                    let following = (page.ids.len() == RANGE_PAGE)
                        .then(|| page.ids.last().map(|e| format!("({}", e.id)))
                        .flatten();
                    let entries = page
                        .ids
                        .into_iter()
                        .map(|entry| {
                            history_entry(&topic, entry, &shared.config.streams.payload_field)
                        })
                        .collect();
                    Some((entries, following))
                }
            }
        }
    });
    Box::pin(futures::StreamExt::flat_map(pages, futures::stream::iter))
}

fn history_entry(topic: &str, entry: StreamId, payload_field: &str) -> Result<HistoryEntry> {
    let recorded_at = id_time(&entry.id);
    let mut fields: Vec<(String, redis::Value)> = entry.map.into_iter().collect();
    let message = codec::from_stream_fields(&entry.id, recorded_at, &mut fields, payload_field)
        .map_err(|e| {
            Error::new(
                ErrorKind::Serialization,
                format!(
                    "entry {} on {topic} cannot be decoded: {}",
                    entry.id,
                    e.message()
                ),
            )
        })?;
    Ok(HistoryEntry {
        message: Arc::new(message),
        recorded_at,
        position: Some(Position::StreamId(entry.id)),
    })
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
