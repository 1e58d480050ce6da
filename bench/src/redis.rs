//! Redis: raw redis-rs against the adapter, pub/sub and Streams, publish-only and end to end.
//! Like with like: the raw side pipelines batches of 100 (10,000 with `--peak`, see
//! [`shape`]), the adapter uses `publish_batch` with the same batch size; the raw Streams
//! consumer acks each XREADGROUP batch with one XACK (with `--peak`, also with a script
//! answering per entry, the adapter's broker-side cost), the adapter's consumer acks every
//! delivery, up to 64 (peak: 256) at once (the adapter sends acks that meet in one round
//! trip).

use std::time::Instant;

use futures::StreamExt;
use helix_messaging::redis::{RedisBroker, RedisConfig, RedisMode};
use helix_messaging::{Broker, SubscribeOptions, Subscriber};
use redis::aio::MultiplexedConnection;
use redis::streams::StreamReadReply;

use hdrhistogram::Histogram;

use crate::measure::{
    Baseline, Clock, Options, Pattern, Run, Shape, adapter_publish, compare_baselines, histogram,
    publish_and_consume, raw_publishing,
};

fn shape(options: &Options) -> Shape {
    Shape::pick(
        options,
        Shape::like_for_like(500),
        Shape {
            batch: 10_000,
            chunk: 10_000,
            prefetch: 2_000,
            acks_in_flight: 2_000,
        },
    )
}
const FIELD: &str = "data";

/// The server the raw clients (and the scenarios' cleanup) connect to: `REDIS_URL`.
pub(crate) fn url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

fn topic(what: &str) -> String {
    format!("bench.{what}.{}", std::process::id())
}

async fn raw_connection() -> MultiplexedConnection {
    redis::Client::open(url())
        .expect("REDIS_URL")
        .get_multiplexed_async_connection()
        .await
        .expect("connect to Redis")
}

async fn adapter(mode: RedisMode) -> RedisBroker {
    let config = RedisConfig::new(&url(), mode).expect("REDIS_URL");
    RedisBroker::connect(config)
        .await
        .expect("connect to Redis")
}

async fn delete(topic: &str) {
    let mut conn = raw_connection().await;
    let _: redis::RedisResult<i64> = redis::cmd("DEL").arg(topic).query_async(&mut conn).await;
}

/// XADDs (or PUBLISHes) of `payloads`; with `metadata`, each entry also carries an id and a
/// nanosecond timestamp, as the adapter's entries do.
fn raw_pipeline(
    streams: bool,
    metadata: bool,
    topic: &str,
    payloads: &[bytes::Bytes],
) -> redis::Pipeline {
    let mut pipe = redis::pipe();
    for payload in payloads {
        if streams {
            let cmd = pipe
                .cmd("XADD")
                .arg(topic)
                .arg("MAXLEN")
                .arg("~")
                .arg(1_000_000)
                .arg("*")
                .arg(FIELD)
                .arg(payload.as_ref());
            if metadata {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default();
                cmd.arg("id")
                    .arg(uuid::Uuid::new_v4().to_string())
                    .arg("ts")
                    .arg(now.as_nanos().to_string());
            }
        } else if metadata {
            // The same id and timestamp, framed after the payload.
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            let mut framed = payload.to_vec();
            framed.extend_from_slice(uuid::Uuid::new_v4().to_string().as_bytes());
            framed.extend_from_slice(&now.as_nanos().to_be_bytes());
            pipe.cmd("PUBLISH").arg(topic).arg(framed);
        } else {
            pipe.cmd("PUBLISH").arg(topic).arg(payload.as_ref());
        }
    }
    pipe
}

/// Publish `n` stamped payloads in pipelined batches with raw redis-rs.
/// Returns the round trip of every batch.
async fn raw_publish_all(
    conn: &mut MultiplexedConnection,
    streams: bool,
    metadata: bool,
    topic: &str,
    n: usize,
    batch: usize,
    clock: Clock,
) -> Histogram<u64> {
    let mut round_trips = histogram();
    let mut sent = 0;
    while sent < n {
        let batch_started = Instant::now();
        let count = batch.min(n - sent);
        let payloads: Vec<bytes::Bytes> = (0..count).map(|_| clock.stamped_payload()).collect();
        let _: Vec<redis::Value> = raw_pipeline(streams, metadata, topic, &payloads)
            .query_async(conn)
            .await
            .expect("raw pipeline");
        round_trips.saturating_record(batch_started.elapsed().as_nanos() as u64);
        sent += count;
    }
    round_trips
}

/// Publish-only run; `raw` is the raw side's baseline, `None` the adapter, publishing as
/// `pattern` says.
async fn publish_only(
    options: &Options,
    streams: bool,
    raw: Option<Baseline>,
    pattern: Pattern,
) -> Run {
    let clock = Clock::new(options.size);
    let topic = topic(if streams { "pub-streams" } else { "pub-pubsub" });
    let n = options.messages;
    let started = Instant::now();
    // For publish-only runs the latency columns are batch round trips.
    let latency = if let Some(baseline) = raw {
        let conn = raw_connection().await;
        let metadata = baseline.carries_metadata();
        // Concurrent callers share the one multiplexed connection.
        raw_publishing(n, shape(options).batch, pattern, |count, batch| {
            let (mut conn, topic) = (conn.clone(), topic.clone());
            async move {
                raw_publish_all(&mut conn, streams, metadata, &topic, count, batch, clock).await
            }
        })
        .await
    } else {
        let mode = if streams {
            RedisMode::Streams
        } else {
            RedisMode::PubSub
        };
        let broker = adapter(mode).await;
        adapter_publish(
            &broker,
            &topic,
            n,
            shape(options).batching(),
            pattern,
            clock,
        )
        .await
    };
    let elapsed = started.elapsed();
    delete(&topic).await;
    Run {
        messages: n,
        elapsed,
        latency,
    }
}

/// Publish `n` messages with raw redis-rs in the background.
fn spawn_raw_producer(
    streams: bool,
    metadata: bool,
    topic: &str,
    n: usize,
    batch: usize,
    clock: Clock,
) -> tokio::task::JoinHandle<Histogram<u64>> {
    let topic = topic.to_owned();
    tokio::spawn(async move {
        let mut conn = raw_connection().await;
        raw_publish_all(&mut conn, streams, metadata, &topic, n, batch, clock).await
    })
}

async fn raw_pubsub_e2e(options: &Options, baseline: Baseline) -> Run {
    let clock = Clock::new(options.size);
    let topic = topic("e2e-raw-pubsub");
    let n = options.messages;
    let mut subscriber = redis::Client::open(url())
        .unwrap()
        .get_async_pubsub()
        .await
        .unwrap();
    subscriber.subscribe(&topic).await.unwrap();
    let started = Instant::now();
    let metadata = baseline.carries_metadata();
    let producer = spawn_raw_producer(false, metadata, &topic, n, shape(options).batch, clock);
    let mut latency = histogram();
    let mut messages = subscriber.on_message();
    for _ in 0..n {
        let msg = messages.next().await.expect("pub/sub stream");
        latency.saturating_record(clock.latency_ns(msg.get_payload_bytes()));
    }
    let elapsed = started.elapsed();
    producer.await.unwrap();
    Run {
        messages: n,
        elapsed,
        latency,
    }
}

/// How the raw Streams consumer acks a read.
#[derive(Clone, Copy, PartialEq, Eq)]
enum RawAck {
    /// One `XACK` of every id in the read: the raw client at its best, learning only how
    /// many were still pending.
    Counted,
    /// One script call acking each id with its own `XACK`, answering for every entry
    /// whether it was still pending: what the adapter's per-delivery ack promises, and
    /// what Redis 7.0 can answer per entry only through a script (Redis 8.2's `XACKDEL`
    /// would answer per id natively). The broker-side cost matched on the raw side.
    AnsweredPerEntry,
}

/// The per-entry ack a raw client would write: the 1-based positions of the ids that were
/// not pending. KEYS: stream. ARGV: group, ids.
const RAW_ACK_PER_ENTRY: &str = r"
local missing = {}
for i = 2, #ARGV do
  if redis.call('XACK', KEYS[1], ARGV[1], ARGV[i]) == 0 then missing[#missing + 1] = i - 1 end
end
return missing
";

/// The raw Streams consumer: each read acked in one command, as `ack` says. Like for like,
/// its producer writes the adapter's metadata; minimal, bare entries.
async fn raw_streams_e2e(options: &Options, baseline: Baseline, ack: RawAck) -> Run {
    let metadata = baseline.carries_metadata();
    let clock = Clock::new(options.size);
    let topic = topic("e2e-raw-streams");
    let n = options.messages;
    let mut conn = raw_connection().await;
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&topic)
        .arg("g")
        .arg("$")
        .arg("MKSTREAM")
        .query_async(&mut conn)
        .await
        .unwrap();
    let per_entry = redis::Script::new(RAW_ACK_PER_ENTRY);
    if ack == RawAck::AnsweredPerEntry {
        // Before the clock starts: the first timed call is then not the one that loads it.
        per_entry.load_async(&mut conn).await.unwrap();
    }
    let started = Instant::now();
    let producer = spawn_raw_producer(true, metadata, &topic, n, shape(options).batch, clock);
    let mut reader = raw_connection().await;
    let mut latency = histogram();
    let mut received = 0;
    while received < n {
        let reply: Option<StreamReadReply> = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg("g")
            .arg("c")
            .arg("COUNT")
            .arg(shape(options).prefetch)
            .arg("BLOCK")
            .arg(1000)
            .arg("STREAMS")
            .arg(&topic)
            .arg(">")
            .query_async(&mut reader)
            .await
            .unwrap();
        let ids: Vec<String> = reply
            .into_iter()
            .flat_map(|r| r.keys)
            .flat_map(|k| k.ids)
            .map(|entry| {
                if let Some(redis::Value::BulkString(bytes)) = entry.map.get(FIELD) {
                    latency.saturating_record(clock.latency_ns(bytes));
                }
                entry.id
            })
            .collect();
        if ids.is_empty() {
            continue;
        }
        received += ids.len();
        match ack {
            RawAck::Counted => {
                let acked: usize = redis::cmd("XACK")
                    .arg(&topic)
                    .arg("g")
                    .arg(&ids)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                assert_eq!(acked, ids.len(), "every entry read was pending");
            }
            RawAck::AnsweredPerEntry => {
                let missing: Vec<usize> = per_entry
                    .key(&topic)
                    .arg("g")
                    .arg(&ids)
                    .invoke_async(&mut conn)
                    .await
                    .unwrap();
                assert!(missing.is_empty(), "every entry read was pending");
            }
        }
    }
    let elapsed = started.elapsed();
    producer.await.unwrap();
    delete(&topic).await;
    Run {
        messages: n,
        elapsed,
        latency,
    }
}

async fn adapter_e2e(options: &Options, mode: RedisMode) -> Run {
    let clock = Clock::new(options.size);
    let streams = mode == RedisMode::Streams;
    let topic = topic(if streams { "e2e-streams" } else { "e2e-pubsub" });
    let n = options.messages;
    let broker = adapter(mode).await;
    let subscribe = if streams {
        SubscribeOptions::group("g").with_prefetch(shape(options).prefetch)
    } else {
        SubscribeOptions::default().with_prefetch(shape(options).prefetch)
    };
    let subscription = broker
        .subscribe(&topic, subscribe)
        .await
        .expect("subscribe");
    let run = publish_and_consume(
        &broker,
        &topic,
        subscription,
        n,
        shape(options).batching(),
        clock,
        shape(options).acks_in_flight,
    )
    .await;
    broker.close().await.unwrap();
    if streams {
        delete(&topic).await;
    }
    run
}

/// The scenarios, by index for [`compare_baselines`].
const SCENARIOS: [&str; 9] = [
    "pub/sub publish",
    "streams publish",
    "pub/sub end to end",
    "streams end to end",
    "pub/sub publish, 256 callers",
    "streams publish, 256 callers",
    "streams end to end, raw acks answered per entry",
    "pub/sub publish, window",
    "streams publish, window",
];

/// The publishing pattern of publish-only scenario `scenario` of [`SCENARIOS`].
fn publish_pattern(scenario: usize) -> Pattern {
    match scenario {
        4 | 5 => Pattern::Callers,
        7 | 8 => Pattern::Window,
        _ => Pattern::Batches,
    }
}

pub(crate) async fn compare(options: &Options) {
    println!(
        "redis at {}: {} messages x {} B, {:?}, {} runs each",
        url(),
        options.messages,
        options.size,
        shape(options),
        options.runs
    );
    // The concurrent callers and the raw per-entry acks run against the raw client's peak,
    // at peak only.
    let scenarios = if options.peak {
        &SCENARIOS[..]
    } else {
        &SCENARIOS[..4]
    };
    compare_baselines(
        options,
        "raw",
        "redis-server",
        scenarios,
        |scenario, baseline| async move {
            match scenario {
                0 | 4 | 7 => {
                    publish_only(options, false, Some(baseline), publish_pattern(scenario)).await
                }
                1 | 5 | 8 => {
                    publish_only(options, true, Some(baseline), publish_pattern(scenario)).await
                }
                2 => raw_pubsub_e2e(options, baseline).await,
                3 => raw_streams_e2e(options, baseline, RawAck::Counted).await,
                _ => raw_streams_e2e(options, baseline, RawAck::AnsweredPerEntry).await,
            }
        },
        |scenario| async move {
            match scenario {
                0 | 4 | 7 => publish_only(options, false, None, publish_pattern(scenario)).await,
                1 | 5 | 8 => publish_only(options, true, None, publish_pattern(scenario)).await,
                2 => adapter_e2e(options, RedisMode::PubSub).await,
                _ => adapter_e2e(options, RedisMode::Streams).await,
            }
        },
    )
    .await;
}
