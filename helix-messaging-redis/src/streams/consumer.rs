//! A subscription in Streams mode: joining the group, the read loop that fills the prefetch
//! window with claimed and new entries, and turning entries into deliveries (or setting aside
//! those that cannot be decoded).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use crate::primary::Connection;
use helix_messaging_core::observe::connection::ConnectionState;
use helix_messaging_core::{
    DeliveryInfo, Error, ErrorKind, Position, Result, StartPosition, SubscribeOptions,
    Subscription, UnboxedDelivery,
};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use super::acker::StreamAcker;
use super::delay::hold_delayed;
use super::entry::{RawEntry, ceil_ms, id_time, parse_read_reply};
use super::group::create_group;
use super::pending::{claim, hand_back};
use super::reader::{Reader, ack};
use crate::acks::{Acks, EntryId};
use crate::codec;
use crate::error::from_redis;
use crate::shared::{Shared, channel_stream};
use crate::trim::PRIVATE_GROUP_PREFIX;

/// A delivery as the reading task makes it: assembled by the subscription's stream, on the
/// application's task (see [`UnboxedDelivery`]).
type Unboxed = UnboxedDelivery<StreamAcker>;

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
            PRIVATE_GROUP_PREFIX,
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
    let connection = shared.primary.connect(shared.config.streams.block).await?;
    let acks_connection = shared
        .acks_connection
        .get_or_try_init(|| shared.primary.connect(Duration::ZERO))
        .await?
        .clone();

    let topic: Arc<str> = Arc::from(topic);
    let acks = Acks::start(
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
    // Up before returning: the subscription is connected from here on.
    let state = shared.subscription_state();
    shared.tasks.spawn(read_loop(
        reader,
        connection,
        state,
        tx,
        cancel.clone(),
        private,
    ));
    let deliveries = futures::StreamExt::map(channel_stream(rx, cancel), move |item| {
        let delivery = item?;
        seen_by.received.lock().insert(delivery.acker.key);
        Ok(delivery.into_delivery())
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
    mut connection: Connection,
    state: ConnectionState,
    tx: mpsc::Sender<Vec<Result<Unboxed>>>,
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
                let lost = err.kind() == ErrorKind::Connection;
                if lost {
                    state.set(false);
                }
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
                if lost {
                    reader.shared.subscription_reconnected(&state);
                }
            }
        }
    }
    drop(tx);
    hand_back(&reader, &mut connection, private).await;
}

async fn read_new(
    reader: &Reader,
    connection: &mut Connection,
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
) -> Option<Result<Unboxed>> {
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
            Some(Ok(UnboxedDelivery {
                message: Arc::new(message),
                info: DeliveryInfo {
                    topic: reader.topic.clone(),
                    group: reader.reported_group.clone(),
                    attempt,
                    redelivered: attempt > 1,
                    position: Some(Position::StreamId(entry.id)),
                },
                acker: StreamAcker {
                    reader: reader.clone(),
                    key,
                },
            }))
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
