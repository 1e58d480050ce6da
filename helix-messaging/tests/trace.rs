//! A trace continues from the publisher to the consumer, and on through the DLQ and its
//! re-drive, a replay and the fallback spool: the spans are collected by a real
//! OpenTelemetry SDK (in-memory exporter) behind the `tracing-opentelemetry` layer, and
//! the W3C `traceparent` travels in the message headers over the real brokers.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use helix_messaging::breaker::{BreakerBroker, BreakerConfig};
use helix_messaging::dlq::{
    DeadLetterConfig, DeadLetterFilter, DeadLetterLayer, DeadLetterQueue, MemoryDeadLetterStore,
    Processor, ProcessorConfig,
};
use helix_messaging::fallback::{FallbackBroker, ForwardConfig, MemorySpool, SpoolLimits};
use helix_messaging::observe::ObservedBroker;
use helix_messaging::replay::{ReplayConfig, ReplayHandler, ReplayRequest};
use helix_messaging::trace::TRACEPARENT_HEADER;
use helix_messaging::{Broker, Envelope, HandlerError, Message, Publisher, Runner, handler_fn};
use helix_messaging_testkit::faults::outage;
use helix_messaging_testkit::{eventually, fresh_name};
use opentelemetry::trace::{SpanId, TraceId, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use parking_lot::Mutex;
use tracing::Instrument;
use tracing_subscriber::layer::SubscriberExt;

const WAIT: Duration = Duration::from_secs(30);

/// One exporter for the test process: nextest runs each test in its own process; under
/// `cargo test` the tests share it and tell their spans apart by their fresh topics.
fn exporter() -> &'static InMemorySpanExporter {
    static EXPORTER: OnceLock<InMemorySpanExporter> = OnceLock::new();
    EXPORTER.get_or_init(|| {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("helix-test")));
        tracing::subscriber::set_global_default(subscriber).expect("no other subscriber");
        exporter
    })
}

fn spans() -> Vec<SpanData> {
    exporter().get_finished_spans().expect("exporter is open")
}

fn attribute(span: &SpanData, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.to_string())
}

/// The finished spans called `name`, in the order they ended.
fn named(name: &str) -> Vec<SpanData> {
    spans().into_iter().filter(|s| s.name == name).collect()
}

/// Wait for `count` finished spans called `name`.
async fn wait_for(name: &str, count: usize) -> Vec<SpanData> {
    eventually(
        WAIT,
        &format!("{count} finished `{name}` span(s)"),
        || async {
            let found = named(name);
            (found.len() >= count).then_some(found)
        },
    )
    .await
}

fn one(name: &str) -> SpanData {
    let mut found = named(name);
    assert_eq!(found.len(), 1, "exactly one `{name}` span: {found:#?}");
    found.remove(0)
}

fn id_of(span: &SpanData) -> (TraceId, SpanId) {
    (span.span_context.trace_id(), span.span_context.span_id())
}

/// `child` is a direct child of `parent` in the same trace.
fn assert_child(child: &SpanData, parent: &SpanData) {
    assert_eq!(
        child.span_context.trace_id(),
        parent.span_context.trace_id(),
        "`{}` continues the trace of `{}`",
        child.name,
        parent.name
    );
    assert_eq!(
        child.parent_span_id,
        parent.span_context.span_id(),
        "`{}` is a child of `{}`",
        child.name,
        parent.name
    );
}

/// Runs `work` inside a fresh root span and returns its trace and span ids.
async fn in_root<F: std::future::Future<Output = ()>>(work: F) -> (TraceId, SpanId) {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let root = tracing::info_span!("request");
    let ids = {
        let cx = root.context();
        let span = opentelemetry::trace::TraceContextExt::span(&cx);
        let sc = span.span_context();
        (sc.trace_id(), sc.span_id())
    };
    work.instrument(root).await;
    ids
}

/// What an [`acking`] runner saw: the `traceparent` header of every delivery.
type Seen = Arc<Mutex<Vec<Option<String>>>>;

/// A runner over `broker` that acks everything and keeps what it saw.
async fn acking(broker: &Arc<dyn Broker>, topic: &str) -> (Runner, Seen) {
    let seen = Seen::default();
    let sink = seen.clone();
    let runner = Runner::builder(broker.clone(), topic)
        .group("traced")
        .start(handler_fn(move |envelope: Envelope| {
            let sink = sink.clone();
            async move {
                let header = envelope
                    .message
                    .header(TRACEPARENT_HEADER)
                    .map(str::to_owned);
                sink.lock().push(header);
                Ok(())
            }
        }))
        .await
        .unwrap();
    (runner, seen)
}

/// The W3C header naming `span` as the sender.
fn traceparent_of(span: &SpanData) -> String {
    format!(
        "00-{}-{}-01",
        span.span_context.trace_id(),
        span.span_context.span_id()
    )
}

async fn a_consumer_continues_the_publishers_trace(backend: Arc<dyn Broker>) {
    exporter();
    let system = backend.name();
    let broker: Arc<dyn Broker> = Arc::new(ObservedBroker::new(backend));
    let topic = fresh_name("traced");
    let (runner, seen) = acking(&broker, &topic).await;

    let message = Message::new("traced payload");
    let (root_trace, root_span) = in_root(async {
        broker.publish(&topic, message.clone()).await.unwrap();
    })
    .await;
    let settle_name = format!("settle {topic}");
    wait_for(&settle_name, 1).await;
    let process_name = format!("process {topic}");
    wait_for(&process_name, 1).await;
    runner.shutdown().await;

    let publish = one(&format!("publish {topic}"));
    assert_eq!(
        *seen.lock(),
        [Some(traceparent_of(&publish))],
        "the message crossed the broker with the publish span's context"
    );
    assert_eq!(
        id_of(&publish).0,
        root_trace,
        "publish is inside the request"
    );
    assert_eq!(publish.parent_span_id, root_span);
    assert_eq!(
        attribute(&publish, "messaging.system").as_deref(),
        Some(system)
    );
    assert_eq!(
        attribute(&publish, "messaging.operation.type").as_deref(),
        Some("send")
    );
    assert_eq!(
        attribute(&publish, "messaging.message.id").as_deref(),
        Some(message.id())
    );
    assert_eq!(publish.span_kind, opentelemetry::trace::SpanKind::Producer);

    let process = one(&process_name);
    assert_child(&process, &publish);
    assert!(
        process.parent_span_is_remote,
        "the parent came over the broker"
    );
    assert_eq!(process.span_kind, opentelemetry::trace::SpanKind::Consumer);
    assert_eq!(
        attribute(&process, "messaging.system").as_deref(),
        Some(system)
    );
    assert_eq!(
        attribute(&process, "messaging.destination.name").as_deref(),
        Some(topic.as_str())
    );
    assert_eq!(
        attribute(&process, "messaging.consumer.group.name").as_deref(),
        Some("traced")
    );
    assert_eq!(
        attribute(&process, "messaging.message.id").as_deref(),
        Some(message.id())
    );

    let settle = one(&settle_name);
    assert_child(&settle, &process);
    assert_eq!(
        attribute(&settle, "messaging.operation.name").as_deref(),
        Some("ack")
    );
    // Closed before the test's runtime goes: the subscription's reader commits and leaves
    // its group while the runtime still runs. Dropped with the runtime instead, a Kafka
    // reader cancelled in its final commit left librdkafka's destroy waiting on a broker
    // thread, and the runtime's shutdown waited on it for good (3 of 25 runs here).
    broker.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_continues_the_publishers_trace_on_memory() {
    let broker = helix_messaging::connect("memory://").await.unwrap();
    a_consumer_continues_the_publishers_trace(broker).await;
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_continues_the_publishers_trace_on_redis_streams() {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let broker = helix_messaging::connect(&url.replacen("redis://", "redis-streams://", 1))
        .await
        .expect("Redis");
    a_consumer_continues_the_publishers_trace(broker).await;
}

#[cfg(feature = "rabbitmq")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_continues_the_publishers_trace_on_rabbitmq() {
    let url = std::env::var("RABBITMQ_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let broker = helix_messaging::connect(&url).await.expect("RabbitMQ");
    a_consumer_continues_the_publishers_trace(broker).await;
}

#[cfg(feature = "kafka")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_continues_the_publishers_trace_on_kafka() {
    use helix_messaging::kafka::{KafkaBroker, KafkaConfig};
    let brokers = std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into());
    let mut config = KafkaConfig::new(brokers);
    // A group join and an empty fetch take seconds at librdkafka's defaults.
    config.fetch_wait_max = Duration::from_millis(50);
    config.session_timeout = Duration::from_secs(6);
    config.heartbeat_interval = Duration::from_millis(500);
    config.shutdown_grace = Duration::from_secs(2);
    let broker = KafkaBroker::connect(config)
        .await
        .expect("Kafka on 127.0.0.1:9092 (scripts/test starts it)");
    a_consumer_continues_the_publishers_trace(Arc::new(broker)).await;
}

/// Publisher → process (fails) → dead_letter → DLQ → re-drive → process again, one trace.
async fn the_trace_goes_through_the_dlq_and_its_redrive(backend: Arc<dyn Broker>) {
    exporter();
    let broker: Arc<dyn Broker> = Arc::new(ObservedBroker::new(backend));
    let (topic, dlq_topic) = (fresh_name("orders"), fresh_name("dlq"));
    let processor = Processor::new(
        broker.clone(),
        Arc::new(MemoryDeadLetterStore::new()),
        ProcessorConfig {
            topics: vec![dlq_topic.clone()],
            auto_redrive: false,
            poll_interval: Duration::from_millis(50),
            ..ProcessorConfig::default()
        },
    )
    .unwrap();
    processor.start().await.unwrap();
    // Fails the first delivery for good; the re-driven copy succeeds.
    let failed_once = Arc::new(AtomicBool::new(false));
    let handled = Arc::new(AtomicU32::new(0));
    let (flag, count) = (failed_once.clone(), handled.clone());
    let runner = Runner::builder(broker.clone(), &topic)
        .group("workers")
        .layer(DeadLetterLayer::new(DeadLetterQueue::new(
            broker.clone(),
            DeadLetterConfig::new(&dlq_topic).unwrap(),
        )))
        .start(handler_fn(move |_: Envelope| {
            let (flag, count) = (flag.clone(), count.clone());
            async move {
                if flag.swap(true, Ordering::SeqCst) {
                    count.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                } else {
                    Err(HandlerError::permanent(std::io::Error::other("bad order")))
                }
            }
        }))
        .await
        .unwrap();

    let (root_trace, root_span) = in_root(async {
        broker.publish(&topic, Message::new("order")).await.unwrap();
    })
    .await;
    let stored = eventually(WAIT, "the dead letter stored", || {
        let processor = processor.clone();
        async move {
            let page = processor
                .list(&DeadLetterFilter::default(), 10, 0)
                .await
                .ok()?;
            page.entries.into_iter().next()
        }
    })
    .await;
    processor.reprocess(&stored.letter.id, None).await.unwrap();
    eventually(WAIT, "the re-driven copy handled", || async {
        (handled.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await;
    let processes = wait_for(&format!("process {topic}"), 2).await;
    runner.shutdown().await;
    processor.stop().await;

    let publishes = named(&format!("publish {topic}"));
    assert_eq!(
        publishes.len(),
        2,
        "the publish and the re-drive's: {publishes:#?}"
    );
    let publish = publishes
        .iter()
        .find(|p| p.parent_span_id == root_span)
        .expect("the publish inside the request");
    assert_eq!(id_of(publish).0, root_trace);
    let first = processes
        .iter()
        .find(|p| p.parent_span_id == publish.span_context.span_id())
        .expect("the first process span is the publish's child");
    assert_eq!(
        attribute(first, "error.type").as_deref(),
        Some("dead_lettered"),
        "the process span failed, though the delivery was settled as handled"
    );
    let dead_letter = one(&format!("dead_letter {dlq_topic}"));
    assert_child(&dead_letter, first);
    assert_eq!(
        attribute(&dead_letter, "helix.dlq.reason").as_deref(),
        Some("permanent failure")
    );
    let to_dlq = one(&format!("publish {dlq_topic}"));
    assert_child(&to_dlq, &dead_letter);
    let redrive = one(&format!("redrive {topic}"));
    assert_eq!(
        id_of(&redrive).0,
        root_trace,
        "the re-drive continues the trace"
    );
    let second = processes
        .iter()
        .find(|p| p.span_context.span_id() != first.span_context.span_id())
        .unwrap();
    // The re-drive published through the observed broker: its publish span (not the
    // first one) is the second process span's parent, inside the re-drive.
    let all = spans();
    let redriven_publish = all
        .iter()
        .find(|s| s.span_context.span_id() == second.parent_span_id)
        .expect("the second process span's parent was collected");
    assert_eq!(redriven_publish.name, format!("publish {topic}").as_str());
    assert_child(redriven_publish, &redrive);
    assert_child(second, redriven_publish);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trace_goes_through_the_dlq_and_its_redrive_on_memory() {
    let broker = helix_messaging::connect("memory://").await.unwrap();
    the_trace_goes_through_the_dlq_and_its_redrive(broker).await;
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trace_goes_through_the_dlq_and_its_redrive_on_redis_streams() {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let broker = helix_messaging::connect(&url.replacen("redis://", "redis-streams://", 1))
        .await
        .expect("Redis");
    the_trace_goes_through_the_dlq_and_its_redrive(broker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_copy_continues_the_original_trace() {
    exporter();
    let backend = helix_messaging::connect("memory://").await.unwrap();
    let broker: Arc<dyn Broker> = Arc::new(ObservedBroker::new(backend));
    let (topic, target) = (fresh_name("history"), fresh_name("replayed"));
    let from = SystemTime::now() - Duration::from_secs(1);
    let (root_trace, _) = in_root(async {
        broker.publish(&topic, Message::new("then")).await.unwrap();
    })
    .await;
    let (runner, seen) = acking(&broker, &target).await;
    let replays = ReplayHandler::new(broker.clone(), ReplayConfig::default());
    let mut request = ReplayRequest::new(&topic, from, SystemTime::now() + Duration::from_secs(1));
    request.target_topic = Some(target.clone());
    let started = replays.start_replay(request).await.unwrap();
    let done = replays.wait(&started.id).await.unwrap();
    assert_eq!(done.replayed, 1, "{done:?}");
    wait_for(&format!("process {target}"), 1).await;
    runner.shutdown().await;

    let original = one(&format!("publish {topic}"));
    assert_eq!(id_of(&original).0, root_trace);
    let copy = one(&format!("replay {target}"));
    assert_child(&copy, &original);
    let batch = one(&format!("publish {target}"));
    assert!(
        batch
            .links
            .iter()
            .any(|link| link.span_context.span_id() == copy.span_context.span_id()),
        "the batch publish links to the copy it sent"
    );
    let process = one(&format!("process {target}"));
    assert_child(&process, &copy);
    assert_eq!(*seen.lock(), [Some(traceparent_of(&copy))]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spooled_publish_continues_the_publishers_trace() {
    exporter();
    let memory = helix_messaging::connect("memory://").await.unwrap();
    let away = Arc::new(outage(memory, true));
    let observed: Arc<dyn Broker> = Arc::new(ObservedBroker::new(away.clone()));
    let fallback = FallbackBroker::new(
        BreakerBroker::new(
            observed.clone(),
            BreakerConfig {
                failure_threshold: 1,
                open_interval: Duration::from_millis(100),
                ..BreakerConfig::default()
            },
        )
        .unwrap(),
        Arc::new(MemorySpool::new(SpoolLimits::default())),
        ForwardConfig {
            retry_interval: Duration::from_millis(50),
            ..ForwardConfig::default()
        },
    )
    .await
    .unwrap();
    let topic = fresh_name("spooled");
    let (runner, seen) = acking(&observed, &topic).await;
    let message = Message::new("kept for later");
    let (root_trace, root_span) = in_root(async {
        fallback.publish(&topic, message.clone()).await.unwrap();
    })
    .await;
    assert_eq!(fallback.spool_stats().await.unwrap().depth, 1, "spooled");
    away.guard().set_down(false);
    wait_for(&format!("process {topic}"), 1).await;
    runner.shutdown().await;

    let spool = one(&format!("spool {topic}"));
    assert_eq!(*seen.lock(), [Some(traceparent_of(&spool))]);
    assert_eq!(id_of(&spool), (root_trace, spool.span_context.span_id()));
    assert_eq!(
        spool.parent_span_id, root_span,
        "spooled inside the request"
    );
    let process = one(&format!("process {topic}"));
    assert_child(&process, &spool);
    // The failed direct attempt shows as a failed publish span of the same request.
    let attempts = named(&format!("publish {topic}"));
    assert!(
        attempts.iter().any(|s| s.parent_span_id == root_span
            && attribute(s, "error.type").as_deref() == Some("connection")),
        "{attempts:#?}"
    );
}
