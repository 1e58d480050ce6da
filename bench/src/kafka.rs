//! Kafka: raw rdkafka (`FutureProducer` + `StreamConsumer`) against the adapter, 256 B
//! messages on a 4-partition topic, publish-only and end to end.
//!
//! Both sides use the same producer settings (`acks=all`, idempotence, `linger.ms` 5) and hand
//! batches of records to the producer before awaiting their delivery reports
//! (`publish_batch` on the adapter; 100, or 10,000 with `--peak` in calls of 1,000, each
//! started as soon as it is built, see [`shape`]). End to end,
//! the raw consumer stores each processed record's offset for the background commit (the
//! usual at-least-once loop); the adapter acks every delivery, up to 64 at once (peak: each
//! before the next is taken, the raw consumer's loop).
//!
//! Two raw baselines, as for RabbitMQ: *like for like* records carry what the adapter needs to
//! carry a `Message` (id and nanosecond timestamp headers, record timestamp), and the raw
//! consumer reads those headers back as the adapter does; *minimal* records are bare
//! payloads. A third, *owned* (`--baseline owned`, end to end only), is like for like with
//! a consumer that copies each record out of the client on a reading task and hands it to
//! the application's task, as the adapter's subscriptions do.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use helix_messaging::kafka::{KafkaBroker, KafkaConfig, KafkaTopic};
use helix_messaging::{Broker, Message, Publisher, SubscribeOptions, Subscriber};
use rdkafka::ClientConfig;
use rdkafka::ClientContext;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{Client, DefaultClientContext};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, Message as _, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use crate::measure::{
    Baseline, Clock, Options, Pattern, Run, Shape, adapter_publish, compare_baselines, histogram,
    one_through, pattern, publish_and_consume, raw_publishing, scenarios,
};

const PARTITIONS: i32 = 4;

/// Like for like, and at peak: 10,000 delivery reports outstanding (as many as the
/// producer's default queue lets a caller hand over without waiting), consumers holding as
/// many, and each delivery acked before the next is taken. A Kafka ack is a local offset
/// store, on the adapter's side as on the raw consumer's (`store_offset`): it has no round
/// trip to overlap, so the peak consumer is the raw one's loop, without a task per ack. The
/// adapter hands each window over in `publish_batch` calls of 1,000 as it builds them, as
/// the raw loop hands each record over as it builds it: one call of 10,000 built up front
/// (`--chunk 10000`) keeps every message of the window in memory before the first is sent,
/// past what the allocator's per-thread caches and the CPU's caches hold.
fn shape(options: &Options) -> Shape {
    Shape::pick(
        options,
        Shape::like_for_like(1_000),
        Shape {
            batch: 10_000,
            chunk: 1_000,
            prefetch: 10_000,
            acks_in_flight: 1,
        },
    )
}

fn brokers() -> String {
    std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

fn topic(what: &str) -> String {
    format!(
        "bench.{what}.{}.{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    )
}

fn adapter_config() -> KafkaConfig {
    let mut config = KafkaConfig::new(brokers());
    config.fetch_wait_max = Duration::from_millis(50);
    config.session_timeout = Duration::from_secs(6);
    config.heartbeat_interval = Duration::from_millis(500);
    config.default_partitions = PARTITIONS;
    config
}

/// A producer that already knows `topic`'s partitions and leaders, as the adapter's does
/// once connected and the topic created: connection setup stays out of the timing.
fn raw_producer(topic: &str) -> FutureProducer {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()
        .expect("raw producer");
    await_leaders(producer.client(), topic);
    producer
}

/// Wait until every partition of `topic` has a leader in the metadata `client` reads, for up
/// to 10 s in all: a producer that reads a topic before its leaders are elected holds its
/// records until it asks again. Panics with the last answer seen after that.
fn await_leaders<C: ClientContext>(client: &Client<C>, topic: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = String::from("no answer");
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "{topic}: not every partition has a leader after 10 s; last seen: {last}"
        );
        match client.fetch_metadata(Some(topic), left) {
            Ok(metadata) => match metadata.topics().iter().find(|t| t.name() == topic) {
                Some(t)
                    if t.error().is_none()
                        && t.partitions().len() == PARTITIONS as usize
                        && t.partitions()
                            .iter()
                            .all(|p| p.error().is_none() && p.leader() >= 0) =>
                {
                    return;
                }
                Some(t) => {
                    let leaders: Vec<i32> = t.partitions().iter().map(|p| p.leader()).collect();
                    last = format!("error {:?}, leaders {leaders:?}", t.error());
                }
                None => last = "the topic is not listed".to_owned(),
            },
            Err(err) => last = err.to_string(),
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// An admin client of `KAFKA_BROKERS`: it creates and deletes the runs' topics and reads
/// their metadata for [`await_leaders`] on the adapter's side.
fn admin_client() -> AdminClient<DefaultClientContext> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .expect("admin client")
}

/// One bare record to `topic`, delivered within 10 s: the raw side's first message, sent
/// before a run's clock starts. (`send`'s own limit is only the wait for room in the
/// producer's queue; the delivery itself has librdkafka's message timeout, 5 minutes.)
async fn raw_send_first(producer: &FutureProducer, topic: &str) {
    let delivery = producer.send(
        FutureRecord::<'_, str, [u8]>::to(topic).payload(&[]),
        Duration::from_secs(10),
    );
    tokio::time::timeout(Duration::from_secs(10), delivery)
        .await
        .expect("the first record delivered within 10 s")
        .expect("the first record delivered");
}

async fn raw_create_topic(name: &str) {
    let admin = admin_client();
    let topic = NewTopic::new(name, PARTITIONS, TopicReplication::Fixed(1));
    admin
        .create_topics([&topic], &AdminOptions::new())
        .await
        .expect("create topic");
}

/// Delete a run's topic once it is measured: a broker slows as topics pile up (Tansu keeps
/// every topic in memory; Apache Kafka keeps their segments and indexes open), which would
/// favour whichever side runs first.
async fn delete_topic(name: &str) {
    let admin = admin_client();
    if let Err(err) = admin.delete_topics(&[name], &AdminOptions::new()).await {
        eprintln!("deleting {name}: {err}");
    }
}

/// Publish `n` stamped payloads with raw rdkafka, `batch` reports awaited together.
/// Returns the round trip of every batch.
async fn raw_publish_all(
    producer: &FutureProducer,
    topic: &str,
    n: usize,
    batch: usize,
    clock: Clock,
    baseline: Baseline,
) -> Histogram<u64> {
    let mut round_trips = histogram();
    let mut sent = 0;
    while sent < n {
        let batch_started = Instant::now();
        let count = batch.min(n - sent);
        let mut reports = Vec::with_capacity(count);
        for _ in 0..count {
            let payload = clock.stamped_payload();
            let mut record: FutureRecord<'_, str, [u8]> = FutureRecord::to(topic).payload(&payload);
            if baseline.carries_metadata() {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default();
                let id = uuid::Uuid::new_v4().to_string();
                let nanos = now.as_nanos().to_string();
                record = record.timestamp(now.as_millis() as i64).headers(
                    OwnedHeaders::new_with_capacity(2)
                        .insert(Header {
                            key: "x-helix-id",
                            value: Some(&id),
                        })
                        .insert(Header {
                            key: "x-helix-timestamp-ns",
                            value: Some(&nanos),
                        }),
                );
            }
            loop {
                match producer.send_result(record) {
                    Ok(report) => {
                        reports.push(report);
                        break;
                    }
                    Err((_, back)) => {
                        record = back;
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
            }
        }
        // In turn: the reports are already on their way, and joining 10,000 futures costs
        // more than awaiting each (a task allocated per future, and its wake-ups).
        for report in reports {
            report.await.expect("report").expect("delivered");
        }
        round_trips.saturating_record(batch_started.elapsed().as_nanos() as u64);
        sent += count;
    }
    round_trips
}

/// Raw publishing: batches of [`Shape::batch`], or (`concurrent`) one record at a time from
/// each of `PEAK_CALLERS` tasks sharing the producer.
async fn raw_publish_only(options: &Options, baseline: Baseline, pattern: Pattern) -> Run {
    let clock = Clock::new(options.size);
    let topic = topic("raw-publish");
    raw_create_topic(&topic).await;
    let producer = raw_producer(&topic);
    // One record first, as the adapter's side sends: the run times publishing, not the
    // producer's start (an idempotent producer holds every record until it has its producer
    // id, asked for once a broker answers, and again 500 ms later when none had).
    raw_send_first(&producer, &topic).await;
    let started = Instant::now();
    let batch = shape(options).batch;
    let latency = raw_publishing(options.messages, batch, pattern, |count, batch| {
        let (producer, topic) = (producer.clone(), topic.clone());
        async move { raw_publish_all(&producer, &topic, count, batch, clock, baseline).await }
    })
    .await;
    let elapsed = started.elapsed();
    delete_topic(&topic).await;
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
    let broker = KafkaBroker::connect(adapter_config())
        .await
        .expect("connect");
    broker
        .create_topics(&[KafkaTopic::new(&topic, PARTITIONS)])
        .await
        .expect("create topic");
    await_leaders(admin_client().inner(), &topic);
    // One message first, as the raw side sends: the producer reads the topic's partitions
    // before it sends its first record there, and the run times publishing.
    broker
        .publish(&topic, Message::new(Vec::new()))
        .await
        .expect("the first message published");
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
    delete_topic(&topic).await;
    Run {
        messages: options.messages,
        elapsed,
        latency,
    }
}

/// What a like-for-like raw consumer reads besides the payload: the id and timestamp its
/// producer sent in headers, which the adapter reads to give each delivery its `Message`.
/// A consumer that deduplicates, traces or orders by them reads them as well.
fn read_identity(record: &rdkafka::message::BorrowedMessage<'_>) {
    let (id, nanos) = identity(record);
    assert!(
        id.is_some_and(|id| !id.is_empty()) && nanos.is_some(),
        "a like-for-like record carries its id and timestamp"
    );
}

/// The id and nanosecond timestamp a like-for-like record's headers carry.
fn identity<'a>(
    record: &'a rdkafka::message::BorrowedMessage<'_>,
) -> (Option<&'a str>, Option<u128>) {
    use rdkafka::message::Headers as _;
    let headers = record
        .headers()
        .expect("like-for-like records carry headers");
    let (mut id, mut nanos) = (None, None);
    for header in headers.iter() {
        let text = header.value.and_then(|v| std::str::from_utf8(v).ok());
        match header.key {
            "x-helix-id" => id = text,
            "x-helix-timestamp-ns" => nanos = text.and_then(|v| v.parse::<u128>().ok()),
            _ => {}
        }
    }
    (id, nanos)
}

async fn raw_e2e(options: &Options, baseline: Baseline) -> Run {
    let clock = Clock::new(options.size);
    let topic = topic("raw-e2e");
    let n = options.messages;
    raw_create_topic(&topic).await;
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set(
            "group.id",
            format!("bench-{}", uuid::Uuid::new_v4().simple()),
        )
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.offset.store", "false")
        .set("fetch.wait.max.ms", "50")
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "500")
        .create()
        .expect("raw consumer");
    consumer.subscribe(&[&topic]).expect("subscribe");
    // Joined before the clock starts, as the adapter's `subscribe` is when it returns.
    let joining = Instant::now();
    while consumer.assignment().map_or(0, |a| a.count()) == 0 {
        assert!(
            joining.elapsed() < Duration::from_secs(30),
            "the raw consumer has no partitions 30 s after subscribing"
        );
        let _ = tokio::time::timeout(Duration::from_millis(50), consumer.recv()).await;
    }
    let producer = raw_producer(&topic);
    // One record through first, as on the adapter's side: the run times neither the
    // producer's start nor the consumer's first fetch.
    raw_send_first(&producer, &topic).await;
    let first = tokio::time::timeout(Duration::from_secs(10), consumer.recv())
        .await
        .expect("the first record within 10 s")
        .expect("the first record");
    consumer
        .store_offset_from_message(&first)
        .expect("store offset");
    drop(first);
    let started = Instant::now();
    // The task publishes through a clone: the producer is destroyed only after the clock is
    // read (its drop joins its polling thread and flushes), as the adapter's is on close.
    let publishing = {
        let (producer, topic) = (producer.clone(), topic.clone());
        let batch = shape(options).batch;
        tokio::spawn(
            async move { raw_publish_all(&producer, &topic, n, batch, clock, baseline).await },
        )
    };
    // The consumer is dropped only after the clock is read too: a group consumer's drop
    // leaves the group and commits, which the adapter's side does after its clock.
    let (latency, consumer) = if baseline == Baseline::Owned {
        consume_owned(consumer, &topic, n, clock, shape(options).prefetch).await
    } else {
        let mut latency = histogram();
        for _ in 0..n {
            let record = consumer.recv().await.expect("record");
            latency.saturating_record(clock.latency_ns(record.payload().expect("payload")));
            if baseline.carries_metadata() {
                read_identity(&record);
            }
            consumer
                .store_offset_from_message(&record)
                .expect("store offset");
        }
        (latency, std::sync::Arc::new(consumer))
    };
    let elapsed = started.elapsed();
    publishing.await.unwrap();
    drop((producer, consumer));
    delete_topic(&topic).await;
    Run {
        messages: n,
        elapsed,
        latency,
    }
}

/// A record as a hand-written consumer keeps it once it hands records from a reading task to
/// the application's: the payload copied out of the client, the identity it carries, and
/// where its offset goes.
struct OwnedRecord {
    payload: Vec<u8>,
    id: String,
    nanos: u128,
    partition: i32,
    offset: i64,
}

/// Records a reading task hands over at once at most, in [`Baseline::Owned`]'s consumer.
const OWNED_BURST: usize = 256;

/// [`Baseline::Owned`]'s consumer: a task of its own reads the records, copies each out of
/// the client with its identity headers, and sends whatever it found ready (up to
/// [`OWNED_BURST`]) in one message over a channel of `prefetch / OWNED_BURST` such bursts;
/// the application's task takes them in turn and stores their offsets for the background
/// commit once for each burst (a `store_offset` looks the topic up by name, so a call per
/// record would charge the raw side for that instead). Returns the latency histogram of `n`
/// records, and the consumer, for the caller to drop once its clock is read.
async fn consume_owned(
    consumer: StreamConsumer,
    topic: &str,
    n: usize,
    clock: Clock,
    prefetch: usize,
) -> (Histogram<u64>, std::sync::Arc<StreamConsumer>) {
    use futures::{FutureExt as _, StreamExt as _};
    let consumer = std::sync::Arc::new(consumer);
    let (bursts, mut received) =
        tokio::sync::mpsc::channel::<Vec<OwnedRecord>>(prefetch.div_ceil(OWNED_BURST).max(1));
    let reader = {
        let consumer = consumer.clone();
        tokio::spawn(async move {
            let mut stream = consumer.stream();
            let mut read = 0;
            while read < n {
                let first = stream.next().await.expect("a record").expect("record");
                let limit = OWNED_BURST.min(n - read);
                let mut burst = Vec::with_capacity(limit);
                burst.push(owned_record(&first));
                drop(first);
                while burst.len() < limit {
                    match stream.next().now_or_never() {
                        Some(record) => {
                            let record = record.expect("a record").expect("record");
                            burst.push(owned_record(&record));
                        }
                        None => break,
                    }
                }
                read += burst.len();
                if bursts.send(burst).await.is_err() {
                    return;
                }
            }
        })
    };
    let mut latency = histogram();
    let mut stored = [None::<i64>; PARTITIONS as usize];
    let mut taken = 0;
    while taken < n {
        let Some(burst) = received.recv().await else {
            // The reader ended early: its panic says why.
            reader.await.expect("the reader");
            panic!("the reader handed over {taken} of {n} records");
        };
        taken += burst.len();
        for record in burst {
            latency.saturating_record(clock.latency_ns(&record.payload));
            assert!(
                !record.id.is_empty() && record.nanos > 0,
                "a like-for-like record carries its id and timestamp"
            );
            stored[usize::try_from(record.partition).expect("a partition number")] =
                Some(record.offset);
        }
        for (partition, offset) in stored.iter_mut().enumerate() {
            if let Some(offset) = offset.take() {
                consumer
                    .store_offset(topic, partition as i32, offset)
                    .expect("store offset");
            }
        }
    }
    reader.await.expect("the reader");
    (latency, consumer)
}

/// `record` copied out of the client, with the identity its headers carry.
fn owned_record(record: &rdkafka::message::BorrowedMessage<'_>) -> OwnedRecord {
    let (id, nanos) = identity(record);
    OwnedRecord {
        payload: record.payload().expect("payload").to_vec(),
        id: id
            .expect("a like-for-like record carries its id")
            .to_owned(),
        nanos: nanos.expect("a like-for-like record carries its timestamp"),
        partition: record.partition(),
        offset: record.offset(),
    }
}

async fn adapter_e2e(options: &Options) -> Run {
    let clock = Clock::new(options.size);
    let topic = topic("adapter-e2e");
    let n = options.messages;
    let broker = KafkaBroker::connect(adapter_config())
        .await
        .expect("connect");
    let mut subscription = broker
        .subscribe(
            &topic,
            SubscribeOptions::group("bench").with_prefetch(shape(options).prefetch),
        )
        .await
        .expect("subscribe");
    await_leaders(admin_client().inner(), &topic);
    // One message through first, as on the raw side.
    one_through(&broker, &topic, &mut subscription, Message::new(Vec::new())).await;
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
    delete_topic(&topic).await;
    run
}

pub(crate) async fn compare(options: &Options) {
    println!(
        "kafka at {}: {} messages x {} B on {PARTITIONS} partitions, {:?}, {} runs each",
        brokers(),
        options.messages,
        options.size,
        shape(options),
        options.runs
    );
    compare_baselines(
        options,
        "raw rdkafka",
        // The broker's process, whose CPU time each run reports: Apache Kafka's JVM, or Tansu.
        if std::env::var("HELIX_KAFKA_BROKER").is_ok_and(|b| b == "tansu") {
            "tansu"
        } else {
            "java"
        },
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
