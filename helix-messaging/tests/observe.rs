//! `ObservedBroker` records HelixAgent's message metrics with bounded topic labels, on the
//! memory broker and on the real Redis Streams.

mod common;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use helix_messaging::observe::settle::{ACKED_METRIC, NACKED_METRIC};
use helix_messaging::observe::{OTHER_TOPICS, ObservedBroker, PUBLISH_LATENCY_METRIC, TopicLabels};
use helix_messaging::{Broker, ErrorKind, Message, Publisher, SubscribeOptions, Subscriber};
use helix_messaging_testkit::recorded::{self, Value, counter, gauge, labels};

async fn counts_publishes_deliveries_and_latency(broker: Arc<dyn Broker>) {
    recorded::install();
    // Two topics keep their names; a third, and a refused one, are `_other`.
    let observed = ObservedBroker::with_topic_labels(broker, TopicLabels::new(2));
    let backend = observed.name();
    let run = uuid::Uuid::new_v4().simple().to_string();
    let (a, b, c) = (
        format!("observe.{run}.a"),
        format!("observe.{run}.b"),
        format!("observe.{run}.c"),
    );
    let mut sub = observed
        .subscribe(&a, SubscribeOptions::group("observers"))
        .await
        .unwrap();
    for i in 0..3 {
        observed
            .publish(&a, Message::new(format!("a{i}")))
            .await
            .unwrap();
    }
    let report = observed
        .publish_batch(&b, vec![Message::new("b0"), Message::new("b1")])
        .await;
    assert!(report.is_ok(), "{:?}", report.failures());
    observed.publish(&c, Message::new("c0")).await.unwrap();
    let refused = observed
        .publish("not a topic!", Message::new("x"))
        .await
        .unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::InvalidInput);
    for _ in 0..3 {
        let delivery = tokio::time::timeout(Duration::from_secs(15), sub.next())
            .await
            .expect("a delivery within 15 s")
            .expect("the subscription is open")
            .expect("a delivery");
        delivery.ack().await.unwrap();
    }

    let recorded = recorded::snapshot();
    let published = "messaging_messages_published_total";
    fn on<'a>(backend: &'a str, topic: &'a str) -> [(&'a str, &'a str); 2] {
        [("backend", backend), ("topic", topic)]
    }
    assert_eq!(counter(&recorded, published, &on(backend, &a)), 3);
    assert_eq!(counter(&recorded, published, &on(backend, &b)), 2);
    assert_eq!(counter(&recorded, published, &on(backend, OTHER_TOPICS)), 1);
    assert!(
        !recorded
            .keys()
            .any(|(_, labels)| labels.iter().any(|(_, v)| *v == c)),
        "the topic past the bound has no label of its own"
    );
    assert_eq!(
        counter(
            &recorded,
            "messaging_publish_failures_total",
            &[
                ("backend", backend),
                ("topic", OTHER_TOPICS),
                ("kind", "invalid_input")
            ]
        ),
        1
    );
    assert_eq!(
        counter(
            &recorded,
            "messaging_messages_consumed_total",
            &on(backend, &a)
        ),
        3
    );
    match recorded.get(&(
        "messaging_delivery_latency_seconds".to_owned(),
        labels(&on(backend, &a)),
    )) {
        Some(Value::Histogram(values)) => {
            assert_eq!(values.len(), 3, "one latency per delivery");
            for v in values {
                assert!(
                    (0.0..15.0).contains(v),
                    "latency {v} s is from this test's publishes"
                );
            }
        }
        other => panic!("latency: {other:?}"),
    }
    observed.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_publishes_deliveries_and_latency_are_counted_with_bounded_topics() {
    let broker = helix_messaging::connect("memory://").await.unwrap();
    counts_publishes_deliveries_and_latency(broker).await;
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_streams_publishes_deliveries_and_latency_are_counted_with_bounded_topics() {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let broker = helix_messaging::connect(&url.replacen("redis://", "redis-streams://", 1))
        .await
        .expect("Redis");
    counts_publishes_deliveries_and_latency(broker).await;
}

/// Acks, requeues and rejects of an observed subscription's deliveries are counted, each
/// under its topic and backend, and every publish call is timed under its backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_settlements_and_publish_latency_are_counted() {
    recorded::install();
    let observed = ObservedBroker::new(helix_messaging::connect("memory://").await.unwrap());
    let topic = format!("observe.settle.{}", uuid::Uuid::new_v4().simple());
    let mut sub = observed
        .subscribe(&topic, SubscribeOptions::group("settlers"))
        .await
        .unwrap();
    for payload in ["acked", "requeued then rejected"] {
        observed
            .publish(&topic, Message::new(payload))
            .await
            .unwrap();
    }
    let report = observed
        .publish_batch(&topic, vec![Message::new("acked too")])
        .await;
    assert!(report.is_ok(), "{:?}", report.failures());
    let mut next = async || {
        tokio::time::timeout(Duration::from_secs(15), sub.next())
            .await
            .expect("a delivery within 15 s")
            .expect("the subscription is open")
            .expect("a delivery")
    };
    let mut requeued = false;
    for _ in 0..4 {
        let delivery = next().await;
        match (delivery.message().payload().as_ref(), requeued) {
            (b"requeued then rejected", false) => {
                delivery.nack(true).await.unwrap();
                requeued = true;
            }
            (b"requeued then rejected", true) => delivery.reject().await.unwrap(),
            _ => delivery.ack().await.unwrap(),
        }
    }
    let recorded = recorded::snapshot();
    let on = [("backend", "memory"), ("topic", topic.as_str())];
    assert_eq!(counter(&recorded, ACKED_METRIC, &on), 2);
    let nacked = |requeue| {
        counter(
            &recorded,
            NACKED_METRIC,
            &[on[0], on[1], ("requeue", requeue)],
        )
    };
    assert_eq!(nacked("true"), 1, "the requeue");
    assert_eq!(nacked("false"), 1, "the reject");
    match recorded.get(&(
        PUBLISH_LATENCY_METRIC.to_owned(),
        labels(&[("backend", "memory")]),
    )) {
        // Other tests of this process may publish on memory too (under `cargo test`).
        Some(Value::Histogram(values)) => assert!(values.len() >= 3, "{values:?}"),
        other => panic!("publish latency: {other:?}"),
    }
    observed.close().await.unwrap();
}

/// The hub counts what its brokers take (beneath the breaker and the spool).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hub_counts_its_publishes() {
    recorded::install();
    let tasks = helix_messaging::connect("memory://").await.unwrap();
    let events = helix_messaging::connect("memory://").await.unwrap();
    let hub = helix_messaging::hub::Hub::new(
        helix_messaging::hub::HubConfig::default(),
        tasks,
        events,
        None,
    )
    .await
    .unwrap();
    let queue = format!("observe.{}.tasks", uuid::Uuid::new_v4().simple());
    for _ in 0..2 {
        let task = helix_messaging::hub::Task::new("observe", serde_json::json!({}));
        hub.publish_task(&queue, &task).await.unwrap();
    }
    assert_eq!(
        counter(
            &recorded::snapshot(),
            "messaging_messages_published_total",
            &[("backend", "memory"), ("topic", &queue)]
        ),
        2
    );
    hub.close().await.unwrap();
}

/// Wait until the sampler has set `topic`'s `group` gauges to a depth in `depth` and `lag`.
async fn until_gauges(
    backend: &str,
    topic: &str,
    group: &str,
    depth: std::ops::RangeInclusive<f64>,
    lag: f64,
) {
    let on = [("backend", backend), ("topic", topic), ("group", group)];
    let mut last = (None, None);
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while std::time::Instant::now() < deadline {
        let recorded = recorded::snapshot();
        last = (
            gauge(&recorded, "messaging_queue_depth", &on),
            gauge(&recorded, "messaging_consumer_lag", &on),
        );
        if last.0.is_some_and(|d| depth.contains(&d)) && last.1 == Some(lag) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{topic}/{group}: (depth, lag) {last:?}, expected ({depth:?}, {lag}) within 15 s");
}

/// The background sampler follows a group's backlog: everything waiting while it has no
/// member, one fewer waiting (and, where the backend counts it, still in the lag) while a
/// member holds a delivery, and what is left once that delivery is acked. `read_ahead`: how
/// many entries a subscription may have read from the broker beyond what it handed out
/// (they count as in flight, not waiting, and stay so after it is dropped).
async fn samples_queue_depth_and_lag(
    broker: Arc<dyn Broker>,
    counts_in_flight: bool,
    read_ahead: f64,
) {
    recorded::install();
    let observed = ObservedBroker::new(broker).with_backlog_interval(Duration::from_millis(50));
    let backend = observed.name();
    let topic = format!("observe.{}.depth", uuid::Uuid::new_v4().simple());
    let group = "depth-watchers";
    let options = SubscribeOptions::group(group).with_prefetch(1);
    // The group exists (and is sampled) from its first subscription on.
    drop(observed.subscribe(&topic, options.clone()).await.unwrap());
    until_gauges(backend, &topic, group, 0.0..=0.0, 0.0).await;
    for i in 0..4 {
        observed
            .publish(&topic, Message::new(format!("m{i}")))
            .await
            .unwrap();
    }
    until_gauges(backend, &topic, group, 4.0..=4.0, 4.0).await;

    let mut sub = observed.subscribe(&topic, options).await.unwrap();
    let held = tokio::time::timeout(Duration::from_secs(15), sub.next())
        .await
        .expect("a delivery within 15 s")
        .expect("the subscription is open")
        .expect("a delivery");
    let lag_while_held = if counts_in_flight { 4.0 } else { 3.0 };
    until_gauges(
        backend,
        &topic,
        group,
        3.0 - read_ahead..=3.0,
        lag_while_held,
    )
    .await;
    held.ack().await.unwrap();
    drop(sub);
    until_gauges(backend, &topic, group, 3.0 - read_ahead..=3.0, 3.0).await;
    observed.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_queue_depth_and_lag_are_sampled() {
    let broker = helix_messaging::connect("memory://").await.unwrap();
    samples_queue_depth_and_lag(broker, true, 0.0).await;
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_streams_queue_depth_and_lag_are_sampled() {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let broker = helix_messaging::connect(&url.replacen("redis://", "redis-streams://", 1))
        .await
        .expect("Redis");
    // The reader may have read the next entry once the held one was acked.
    samples_queue_depth_and_lag(broker, true, 1.0).await;
}

/// RabbitMQ reports a queue's ready messages only: a held delivery leaves the lag.
#[cfg(feature = "rabbitmq")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_queue_depth_and_lag_are_sampled() {
    let url = std::env::var("RABBITMQ_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let broker = helix_messaging::connect(&url).await.expect("RabbitMQ");
    samples_queue_depth_and_lag(broker, false, 0.0).await;
}

/// Topics past the label bound are summed under `_other`, per group; without an interval
/// nothing is sampled until `sample_backlogs` is called.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unlabelled_topics_are_summed_and_sampling_on_demand_works() {
    recorded::install();
    let broker = helix_messaging::connect("memory://").await.unwrap();
    let observed = ObservedBroker::with_topic_labels(broker, TopicLabels::new(0))
        .with_backlog_interval(Duration::ZERO);
    let run = uuid::Uuid::new_v4().simple().to_string();
    // A group name of this test's own: `_other` is shared with other tests.
    let group = format!("summed-{run}");
    for (n, topic) in [
        (2, format!("observe.{run}.x")),
        (3, format!("observe.{run}.y")),
    ] {
        drop(
            observed
                .subscribe(&topic, SubscribeOptions::group(&group))
                .await
                .unwrap(),
        );
        for i in 0..n {
            observed
                .publish(&topic, Message::new(format!("m{i}")))
                .await
                .unwrap();
        }
    }
    let on = [
        ("backend", observed.name()),
        ("topic", OTHER_TOPICS),
        ("group", group.as_str()),
    ];
    assert_eq!(
        gauge(&recorded::snapshot(), "messaging_queue_depth", &on),
        None,
        "nothing is sampled without an interval until asked"
    );
    observed.sample_backlogs().await;
    let recorded = recorded::snapshot();
    assert_eq!(gauge(&recorded, "messaging_queue_depth", &on), Some(5.0));
    assert_eq!(gauge(&recorded, "messaging_consumer_lag", &on), Some(5.0));
    observed.close().await.unwrap();
}

/// The hub's two sides on one backend keep their metrics apart: each side's breakers are
/// named after the side, and each spool's gauges and counters carry the side in `spool`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hubs_sides_have_breakers_and_spools_of_their_own() {
    use helix_messaging::fallback::{MemorySpool, Spool};
    use helix_messaging::hub::{Hub, HubConfig};
    use helix_messaging_testkit::recorded;
    recorded::install();
    let broker = helix_messaging::connect("memory://").await.unwrap();
    let spools = (
        Arc::new(MemorySpool::default()) as Arc<dyn Spool>,
        Arc::new(MemorySpool::default()) as Arc<dyn Spool>,
    );
    let hub = Hub::new(HubConfig::default(), broker.clone(), broker, Some(spools))
        .await
        .unwrap();
    let recorded = recorded::snapshot();
    for side in ["tasks", "events"] {
        for breaker in ["publish", "consume"] {
            let name = format!("{side}.memory.{breaker}");
            assert_eq!(
                recorded::gauge(
                    &recorded,
                    "messaging_circuit_breaker_state",
                    &[("breaker", &name)]
                ),
                Some(0.0),
                "breaker {name}, closed"
            );
        }
        assert_eq!(
            recorded::gauge(
                &recorded,
                "messaging_fallback_spool_depth",
                &[("spool", &format!("{side}.memory"))]
            ),
            Some(0.0),
            "the {side} spool's depth"
        );
    }
    hub.close().await.unwrap();
}

/// `messaging_dead_lettered_total` labels topics as `observe` does: by name up to the bound,
/// then `_other`, so dead letters from many topics cannot grow its series without end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_lettered_counts_use_bounded_topic_labels() {
    use helix_messaging::dlq::{DeadLetterConfig, DeadLetterQueue, DeadLetterReason};
    recorded::install();
    let broker = helix_messaging::connect("memory://").await.unwrap();
    let labels = Arc::new(TopicLabels::new(2));
    let dlq =
        DeadLetterQueue::new(broker.clone(), DeadLetterConfig::default()).with_topic_labels(labels);
    let topics: Vec<String> = (0..4)
        .map(|_| helix_messaging_testkit::fresh_name("dead"))
        .collect();
    for topic in &topics {
        let letter = helix_messaging_testkit::stores::letter(
            topic,
            DeadLetterReason::MaxRetriesExceeded,
            "order.created",
            std::time::SystemTime::now(),
        );
        dlq.send(&letter).await.unwrap();
    }
    let recorded = recorded::snapshot();
    let reason = [("reason", DeadLetterReason::MaxRetriesExceeded.as_str())];
    let by = |topic: &str| {
        counter(
            &recorded,
            "messaging_dead_lettered_total",
            &[reason[0], ("topic", topic)],
        )
    };
    assert_eq!(
        (by(&topics[0]), by(&topics[1])),
        (1, 1),
        "the first two by name"
    );
    assert_eq!(
        (by(&topics[2]), by(&topics[3])),
        (0, 0),
        "no series of their own"
    );
    assert!(by(OTHER_TOPICS) >= 2, "the rest as {OTHER_TOPICS}");
}
