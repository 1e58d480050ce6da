//! RabbitMQ: raw lapin against the adapter, 256 B persistent messages with publisher confirms,
//! publish-only and end to end.
//!
//! Both sides publish persistent, `mandatory` messages through a durable topic exchange to a
//! durable queue on one connection, in batches whose confirms are awaited together
//! (`publish_batch` on the adapter); both consume with a prefetch and ack every delivery, a
//! number of acks in flight at once: batches of 100, prefetch 500 and 64 acks like for like,
//! 1,000, 2,000 and 256 with `--peak` ([`shape`]).
//!
//! Two raw baselines:
//! - *like for like*: the raw queue has the adapter's arguments (`x-max-priority 10`,
//!   dead-lettering) and each raw message carries what the adapter needs to carry a
//!   `Message` (message id, timestamp, priority, the nanosecond timestamp header). The ratio
//!   is the adapter's own overhead; this is the target's comparison.
//! - *minimal*: a plain queue and bare messages. The ratio adds what priority queues and the
//!   metadata cost the broker, so users can weigh them (`max_priority = 0` turns priority
//!   queues off).

use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use hdrhistogram::Histogram;
use helix_messaging::rabbitmq::{RabbitBroker, RabbitConfig};
use helix_messaging::{Broker, SubscribeOptions, Subscriber};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};

use crate::measure::{
    Baseline, Clock, Options, Pattern, Run, Shape, adapter_publish, compare_baselines, histogram,
    pattern, publish_and_consume, raw_publishing, scenarios,
};

fn shape(options: &Options) -> Shape {
    Shape::pick(
        options,
        Shape::like_for_like(500),
        Shape {
            batch: 1_000,
            chunk: 1_000,
            prefetch: 2_000,
            acks_in_flight: 256,
        },
    )
}
const RAW_EXCHANGE: &str = "bench.raw";

/// The server the raw clients (and the scenarios' cleanup) connect to: `RABBITMQ_URL`.
pub(crate) fn url() -> String {
    std::env::var("RABBITMQ_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

fn topic(what: &str) -> String {
    format!("bench.{what}.{}", std::process::id())
}

async fn raw_connection() -> Connection {
    Connection::connect(&url(), ConnectionProperties::default())
        .await
        .expect("connect to RabbitMQ")
}

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(s.as_bytes().to_vec().into())
}

/// A confirming channel, the raw exchange, and a durable queue bound to it by `key`, with the
/// adapter's queue arguments for a like-for-like baseline.
async fn raw_setup(connection: &Connection, key: &str, baseline: Baseline) -> Channel {
    let channel = connection.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    channel
        .exchange_declare(
            RAW_EXCHANGE.into(),
            lapin::ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut args = FieldTable::default();
    if baseline.carries_metadata() {
        args.insert("x-max-priority".into(), AMQPValue::ShortShortUInt(10));
        args.insert("x-dead-letter-exchange".into(), text(""));
        args.insert("x-dead-letter-routing-key".into(), text("bench.dlq"));
    }
    channel
        .queue_declare(
            key.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            args,
        )
        .await
        .unwrap();
    channel
        .queue_bind(
            key.into(),
            RAW_EXCHANGE.into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel
}

async fn delete_queue(queue: &str) {
    let connection = raw_connection().await;
    let channel = connection.create_channel().await.unwrap();
    let _ = channel
        .queue_delete(queue.into(), QueueDeleteOptions::default())
        .await;
    let _ = connection.close(200, "done".into()).await;
}

/// Publish `n` stamped payloads with raw lapin, `batch` confirms in flight at a time.
/// Returns the round trip of every batch.
async fn raw_publish_all(
    channel: &Channel,
    key: &str,
    n: usize,
    batch: usize,
    clock: Clock,
    baseline: Baseline,
) -> Histogram<u64> {
    let mut round_trips = histogram();
    let mut sent = 0;
    let persistent = BasicProperties::default().with_delivery_mode(2);
    while sent < n {
        let batch_started = Instant::now();
        let count = batch.min(n - sent);
        let mut confirms = Vec::with_capacity(count);
        for _ in 0..count {
            let payload = clock.stamped_payload();
            let properties = match baseline {
                Baseline::Minimal => persistent.clone(),
                Baseline::LikeForLike | Baseline::Owned => {
                    let now = SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .unwrap_or_default();
                    let mut headers = FieldTable::default();
                    headers.insert(
                        "x-helix-timestamp-ns".into(),
                        AMQPValue::LongLongInt(now.as_nanos() as i64),
                    );
                    persistent
                        .clone()
                        .with_message_id(uuid::Uuid::new_v4().to_string().into())
                        .with_timestamp(now.as_secs())
                        .with_priority(0)
                        .with_headers(headers)
                }
            };
            confirms.push(
                channel
                    .basic_publish(
                        RAW_EXCHANGE.into(),
                        key.into(),
                        BasicPublishOptions {
                            mandatory: true,
                            ..BasicPublishOptions::default()
                        },
                        &payload,
                        properties,
                    )
                    .await
                    .expect("raw publish"),
            );
        }
        // In turn, as the Kafka baseline awaits its reports: the confirms are already on
        // their way.
        for confirm in confirms {
            assert!(matches!(
                confirm.await.expect("confirm"),
                Confirmation::Ack(None)
            ));
        }
        round_trips.saturating_record(batch_started.elapsed().as_nanos() as u64);
        sent += count;
    }
    round_trips
}

/// The adapter with its defaults (priority queues, dead-lettering into `bench.dlq`), or
/// with them turned off by `RABBITMQ_MAX_PRIORITY=0` and `RABBITMQ_DEAD_LETTER_QUEUE=none`
/// (compare that run with the minimal raw baseline: the cost of the queue arguments).
async fn adapter() -> RabbitBroker {
    let mut config = RabbitConfig::new(&url()).expect("RABBITMQ_URL");
    config.exchange = "bench.adapter".into();
    config.dead_letter_queue = Some("bench.dlq".into());
    if let Ok(max) = std::env::var("RABBITMQ_MAX_PRIORITY") {
        config.max_priority = max.trim().parse().expect("RABBITMQ_MAX_PRIORITY: 0 to 255");
    }
    if std::env::var("RABBITMQ_DEAD_LETTER_QUEUE").is_ok_and(|v| v.trim() == "none") {
        config.dead_letter_queue = None;
    }
    RabbitBroker::connect(config)
        .await
        .expect("connect to RabbitMQ")
}

/// Raw publishing: batches of [`Shape::batch`], or (`concurrent`) one message at a time,
/// each confirm awaited, from each of `PEAK_CALLERS`
/// tasks sharing the channel.
async fn raw_publish_only(options: &Options, baseline: Baseline, pattern: Pattern) -> Run {
    let clock = Clock::new(options.size);
    let key = topic("raw-publish");
    let connection = raw_connection().await;
    let channel = raw_setup(&connection, &key, baseline).await;
    let started = Instant::now();
    let batch = shape(options).batch;
    let latency = raw_publishing(options.messages, batch, pattern, |count, batch| {
        let (channel, key) = (channel.clone(), key.clone());
        async move { raw_publish_all(&channel, &key, count, batch, clock, baseline).await }
    })
    .await;
    let elapsed = started.elapsed();
    let _ = connection.close(200, "done".into()).await;
    delete_queue(&key).await;
    Run {
        messages: options.messages,
        elapsed,
        latency,
    }
}

/// The adapter's publishing: `publish_batch` in [`Shape::batch`] chunks, or (`concurrent`)
/// one `publish` at a time from each of
/// `PEAK_CALLERS` tasks.
async fn adapter_publish_only(options: &Options, pattern: Pattern) -> Run {
    let clock = Clock::new(options.size);
    let topic = topic("adapter-publish");
    let broker = adapter().await;
    // The group's queue makes the topic routable, as the raw side's bound queue does.
    drop(
        broker
            .subscribe(&topic, SubscribeOptions::group("g"))
            .await
            .expect("subscribe"),
    );
    let started = Instant::now();
    let latency = adapter_publish(
        &broker,
        &topic,
        options.messages,
        shape(options).batching(),
        pattern,
        clock,
    )
    .await;
    let elapsed = started.elapsed();
    broker.close().await.unwrap();
    delete_queue(&format!("{topic}.g")).await;
    Run {
        messages: options.messages,
        elapsed,
        latency,
    }
}

async fn raw_e2e(options: &Options, baseline: Baseline) -> Run {
    let clock = Clock::new(options.size);
    let key = topic("raw-e2e");
    let n = options.messages;
    let connection = raw_connection().await;
    let publisher = raw_setup(&connection, &key, baseline).await;
    let consumer_channel = connection.create_channel().await.unwrap();
    consumer_channel
        .basic_qos(
            u16::try_from(shape(options).prefetch).unwrap_or(u16::MAX),
            BasicQosOptions::default(),
        )
        .await
        .unwrap();
    let consumer = consumer_channel
        .basic_consume(
            key.as_str().into(),
            "bench".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let started = Instant::now();
    let producer = {
        let key = key.clone();
        let batch = shape(options).batch;
        tokio::spawn(
            async move { raw_publish_all(&publisher, &key, n, batch, clock, baseline).await },
        )
    };
    let latency = Arc::new(Mutex::new(histogram()));
    consumer
        .take(n)
        .for_each_concurrent(shape(options).acks_in_flight, |delivery| {
            let latency = latency.clone();
            async move {
                let delivery = delivery.expect("delivery");
                let ns = clock.latency_ns(&delivery.data);
                latency.lock().expect("histogram").saturating_record(ns);
                delivery
                    .acker
                    .ack(BasicAckOptions::default())
                    .await
                    .expect("ack");
            }
        })
        .await;
    let elapsed = started.elapsed();
    producer.await.unwrap();
    let _ = connection.close(200, "done".into()).await;
    delete_queue(&key).await;
    let latency = latency.lock().expect("histogram").clone();
    Run {
        messages: n,
        elapsed,
        latency,
    }
}

async fn adapter_e2e(options: &Options) -> Run {
    let clock = Clock::new(options.size);
    let topic = topic("adapter-e2e");
    let n = options.messages;
    let broker = adapter().await;
    let subscription = broker
        .subscribe(
            &topic,
            SubscribeOptions::group("g").with_prefetch(shape(options).prefetch),
        )
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
    delete_queue(&format!("{topic}.g")).await;
    run
}

pub(crate) async fn compare(options: &Options) {
    println!(
        "rabbitmq at {}: {} persistent messages x {} B with confirms, {:?}, {} runs each",
        url().split('@').next_back().unwrap_or_default(),
        options.messages,
        options.size,
        shape(options),
        options.runs
    );
    compare_baselines(
        options,
        "raw lapin",
        "beam.smp",
        scenarios(options),
        |scenario, baseline| async move {
            match scenario {
                1 => raw_e2e(options, baseline).await,
                _ => raw_publish_only(options, baseline, pattern(scenario)).await,
            }
        },
        |scenario| async move {
            match scenario {
                1 => adapter_e2e(options).await,
                _ => adapter_publish_only(options, pattern(scenario)).await,
            }
        },
    )
    .await;
}
