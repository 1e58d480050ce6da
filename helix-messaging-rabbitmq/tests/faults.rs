//! Fault tests against the real RabbitMQ: connections killed server-side, and the broker
//! application stopped and started while messages flow. Each runs in a vhost of its own;
//! the broker is always left running, even when a test fails.

use std::collections::HashSet;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use helix_messaging_core::{Broker, Message, Publisher, SubscribeOptions, Subscriber};
use helix_messaging_rabbitmq::{RabbitBroker, RabbitConfig};

mod common;
use common::{Vhost, rabbitmqctl};
use helix_messaging_testkit::faults::{KeepRabbitMqRunning, start_rabbitmq, stop_rabbitmq};

const MESSAGES: usize = 20_000;

/// Both tests act on the whole node; they must not overlap.
static NODE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Test settings for `vhost` with quick reconnects, retried for long enough to outlast a
/// restart on a loaded machine.
fn fault_config(vhost: &Vhost) -> RabbitConfig {
    let mut config = vhost.config();
    config.max_reconnect_delay = Duration::from_millis(500);
    config.reconnect_attempts = 200;
    config.publish_timeout = Duration::from_secs(10);
    config.connect_timeout = Duration::from_secs(5);
    config
}

/// Receives and acks everything on `topic` for group `g`, recording ids and arrival times.
async fn collect(broker: &RabbitBroker, topic: &str) -> Arc<Mutex<Vec<(String, Instant)>>> {
    let mut sub = broker
        .subscribe(topic, SubscribeOptions::group("g").with_prefetch(200))
        .await
        .unwrap();
    let received: Arc<Mutex<Vec<(String, Instant)>>> = Arc::default();
    let sink = received.clone();
    tokio::spawn(async move {
        while let Some(item) = sub.next().await {
            let d = match item {
                Ok(d) => d,
                Err(err) => {
                    eprintln!("subscription reported: {err}");
                    continue;
                }
            };
            sink.lock()
                .unwrap()
                .push((d.message().id().to_owned(), Instant::now()));
            // An ack lost with its channel only means a redelivery, counted as a duplicate.
            let _ = d.ack().await;
        }
    });
    received
}

/// Wait until every accepted id has arrived; report counts either way.
async fn expect_all_delivered(
    what: &str,
    accepted: &[String],
    refused: usize,
    received: &Arc<Mutex<Vec<(String, Instant)>>>,
) {
    let wanted: HashSet<&String> = accepted.iter().collect();
    let done = tokio::time::timeout(Duration::from_secs(120), async {
        loop {
            let got: HashSet<String> = received
                .lock()
                .unwrap()
                .iter()
                .map(|(id, _)| id.clone())
                .collect();
            if wanted.iter().all(|id| got.contains(*id)) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let all = received.lock().unwrap().len();
    let unique: HashSet<String> = received
        .lock()
        .unwrap()
        .iter()
        .map(|(id, _)| id.clone())
        .collect();
    let missing = wanted.iter().filter(|id| !unique.contains(**id)).count();
    eprintln!(
        "{what}: {} confirmed, {refused} refused during the fault, {all} received, {} duplicates, {missing} confirmed but missing",
        accepted.len(),
        all - unique.len()
    );
    assert!(
        done.is_ok(),
        "{what}: {missing} confirmed messages were never delivered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_resume_and_nothing_confirmed_is_lost_when_connections_are_killed() {
    let _node = NODE.lock().await;
    helix_messaging_testkit::recorded::install();
    let reconnects_before =
        helix_messaging_testkit::recorded::reconnects(helix_messaging_rabbitmq::NAME);
    let vhost = Vhost::new("helix-fault");
    let topic = "fault.connection-kill";
    let consumer = RabbitBroker::connect(fault_config(&vhost)).await.unwrap();
    let received = collect(&consumer, topic).await;
    let publisher = RabbitBroker::connect(fault_config(&vhost)).await.unwrap();

    let mut accepted = Vec::new();
    let mut refused = 0;
    let mut killed_at = None;
    for batch in 0..MESSAGES / 100 {
        if batch == MESSAGES / 400 {
            let vhost_name = vhost.name().to_owned();
            tokio::task::spawn_blocking(move || {
                rabbitmqctl(&[
                    "close_all_connections",
                    "-p",
                    &vhost_name,
                    "helix fault test",
                ]);
            })
            .await
            .unwrap();
            killed_at = Some(Instant::now());
        }
        let ids: Vec<String> = (0..100).map(|i| format!("m{}", batch * 100 + i)).collect();
        let messages = ids
            .iter()
            .map(|id| Message::new("x").with_id(id.clone()))
            .collect();
        let report = publisher.publish_batch(topic, messages).await;
        let failed: HashSet<usize> = report.failures().iter().map(|(i, _)| *i).collect();
        for (err_index, err) in report.failures().iter().take(1) {
            assert!(err.is_retryable(), "message {err_index}: {err}");
        }
        refused += failed.len();
        accepted.extend(
            ids.into_iter()
                .enumerate()
                .filter(|(i, _)| !failed.contains(i))
                .map(|(_, id)| id),
        );
        if !failed.is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    expect_all_delivered("connection kill", &accepted, refused, &received).await;

    let killed_at = killed_at.expect("connections were killed");
    let resumed = received
        .lock()
        .unwrap()
        .iter()
        .map(|(_, at)| *at)
        .filter(|at| *at > killed_at)
        .min()
        .expect("deliveries after the kill");
    let gap = resumed - killed_at;
    eprintln!("connection kill: first delivery {gap:?} after the connections were closed");
    assert!(
        gap <= Duration::from_secs(5),
        "consumers resumed only after {gap:?}"
    );
    // The publisher's and the consumer's connections, each replaced once.
    assert_eq!(
        helix_messaging_testkit::recorded::reconnects(helix_messaging_rabbitmq::NAME)
            - reconnects_before,
        2,
        "messaging_reconnects_total"
    );
    publisher.close().await.unwrap();
    consumer.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_confirmed_publish_survives_a_broker_restart() {
    const PUBLISHERS: usize = 8;
    common::log_to_test_output();
    let _node = NODE.lock().await;
    let vhost = Vhost::new("helix-fault");
    let topic = "fault.restart";
    let consumer = RabbitBroker::connect(fault_config(&vhost)).await.unwrap();
    let received = collect(&consumer, topic).await;
    let publisher = RabbitBroker::connect(fault_config(&vhost)).await.unwrap();
    let accepted: Arc<Mutex<Vec<String>>> = Arc::default();
    let refused = Arc::new(std::sync::atomic::AtomicUsize::new(0));

    let _keep_running = KeepRabbitMqRunning;
    let restarter = {
        let accepted = accepted.clone();
        tokio::spawn(async move {
            while accepted.lock().unwrap().len() < MESSAGES / 3 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            stop_rabbitmq().await;
            tokio::time::sleep(Duration::from_secs(1)).await;
            start_rabbitmq().await;
        })
    };
    let publishers: Vec<_> = (0..PUBLISHERS)
        .map(|p| {
            let (publisher, accepted, refused) =
                (publisher.clone(), accepted.clone(), refused.clone());
            tokio::spawn(async move {
                for i in 0..MESSAGES / PUBLISHERS {
                    let id = format!("p{p}-{i}");
                    match publisher
                        .publish(topic, Message::new("x").with_id(id.clone()))
                        .await
                    {
                        Ok(()) => accepted.lock().unwrap().push(id),
                        Err(err) => {
                            assert!(
                                err.is_retryable()
                                    || err.kind() == helix_messaging_core::ErrorKind::Rejected,
                                "{err}"
                            );
                            refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            })
        })
        .collect();
    for p in publishers {
        p.await.unwrap();
    }
    restarter.await.unwrap();
    let accepted = accepted.lock().unwrap().clone();
    let refused = refused.load(std::sync::atomic::Ordering::Relaxed);
    assert!(refused > 0, "the restart happened while publishing");
    expect_all_delivered("broker restart", &accepted, refused, &received).await;
    publisher.close().await.unwrap();
    consumer.close().await.unwrap();
}

/// Puts the memory high watermark back when dropped, so a failing test leaves the broker
/// accepting publishes.
struct RestoreWatermark(String);

impl Drop for RestoreWatermark {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["set_vm_memory_high_watermark", &self.0])
            .output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requeue_whose_copy_times_out_still_settles_the_delivery() {
    // A memory alarm blocks every publishing connection: the requeue's copy cannot be
    // confirmed within the publish timeout. The delivery must still be settled (natively
    // requeued), or it would hold its prefetch slot, and the subscription would stall, for as
    // long as its channel lives.
    let _node = NODE.lock().await;
    common::log_to_test_output();
    let vhost = Vhost::new("helix-slow-requeue");
    // Configured as an operator does, so the variable itself is what is proven here.
    let url = vhost.0.url();
    let config = RabbitConfig::from_vars(helix_messaging_testkit::env_lookup(&[
        ("RABBITMQ_URL", url.as_str()),
        ("RABBITMQ_PUBLISH_TIMEOUT", "1s"),
    ]))
    .unwrap();
    let broker = RabbitBroker::connect(config).await.unwrap();
    let topic = "fault.slow-requeue";
    let mut sub = broker
        .subscribe(topic, SubscribeOptions::group("g").with_prefetch(1))
        .await
        .unwrap();
    let m = Message::new("requeued while the broker is blocked");
    broker.publish(topic, m.clone()).await.unwrap();
    let d = common::recv(&mut sub).await;

    let watermark = rabbitmqctl(&["eval", "vm_memory_monitor:get_vm_memory_high_watermark()."]);
    let watermark = watermark.trim();
    let restore = RestoreWatermark(if watermark.parse::<f64>().is_ok() {
        watermark.to_owned()
    } else {
        "0.4".to_owned()
    });
    rabbitmqctl(&["set_vm_memory_high_watermark", "0.0000001"]);
    let deadline = Instant::now() + Duration::from_secs(15);
    while !rabbitmqctl(&["eval", "rabbit_alarm:get_alarms()."]).contains("memory") {
        assert!(Instant::now() < deadline, "the memory alarm did not go off");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let started = Instant::now();
    let settled = d.nack(true).await;
    eprintln!(
        "requeue under the alarm: {settled:?} after {:?}",
        started.elapsed()
    );
    // A publish meanwhile is a retryable timeout within the publish timeout
    // (RABBITMQ_PUBLISH_TIMEOUT): one deadline for the publish and its confirm, as
    // `publish_timeout` promises.
    let blocked = Message::new("published while the broker is blocked");
    let started = Instant::now();
    let refused = broker.publish(topic, blocked.clone()).await;
    let took = started.elapsed();
    let err = refused.expect_err("no confirm comes while the broker is blocked");
    helix_messaging_testkit::faults::assert_retryable_timeout(&err);
    assert!(
        took < Duration::from_millis(1_800),
        "a 1 s publish timeout took {took:?}"
    );
    // So is every message of a batch, within the same timeout: once one is not taken, the
    // rest fail at once, and the confirms share one deadline.
    let batch_ids = helix_messaging_testkit::faults::assert_batch_times_out(
        &broker,
        topic,
        5,
        Duration::from_millis(1_800),
    )
    .await;
    drop(restore);

    // Once the broker reads again, the message comes back (perhaps twice: the copy may have
    // been stored after its confirm timed out), and nothing is stuck behind it.
    let again = common::recv(&mut sub).await;
    assert_eq!(again.message().id(), m.id());
    assert!(again.attempt() >= 2, "attempt {}", again.attempt());
    again.ack().await.unwrap();
    let next = Message::new("after");
    broker.publish(topic, next.clone()).await.unwrap();
    loop {
        let d = common::recv(&mut sub).await;
        d.ack().await.unwrap();
        if d.message().id() == next.id() {
            break;
        }
        let id = d.message().id();
        assert!(
            id == m.id() || id == blocked.id() || batch_ids.iter().any(|b| b == id),
            "only the duplicate copy, or the publishes whose confirms timed out, may come first"
        );
    }
    broker.close().await.unwrap();
}

/// Through a `BreakerBroker`, publishes during an outage open the publish breaker after its
/// threshold; then they fail fast without reaching the adapter, health says so, and once
/// the broker is back a probe closes the breaker again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_publish_breaker_opens_in_an_outage_and_closes_after_it() {
    use helix_messaging_core::breaker::{BreakerBroker, BreakerConfig, BreakerState};
    use helix_messaging_core::{ErrorKind, HealthStatus};

    common::log_to_test_output();
    let _node = NODE.lock().await;
    let vhost = Vhost::new("helix-breaker");
    let mut config = fault_config(&vhost);
    config.publish_timeout = Duration::from_secs(2);
    let inner = Arc::new(RabbitBroker::connect(config).await.unwrap());
    let topic = "breaker.outage";
    let _group = inner
        .subscribe(topic, SubscribeOptions::group("g"))
        .await
        .unwrap();
    let broker = BreakerBroker::new(
        inner,
        BreakerConfig {
            failure_threshold: 3,
            open_interval: Duration::from_secs(2),
            half_open_probes: 1,
        },
    )
    .unwrap();
    broker.publish(topic, Message::new("before")).await.unwrap();
    assert_eq!(broker.health().await.status, HealthStatus::Healthy);

    let _keep_running = KeepRabbitMqRunning;
    stop_rabbitmq().await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut failures = 0;
    while broker.publish_breaker().state() != BreakerState::Open {
        let err = broker
            .publish(topic, Message::new("during"))
            .await
            .expect_err("the node is stopped");
        assert!(err.is_retryable(), "{err}");
        failures += 1;
        assert!(Instant::now() < deadline, "the breaker did not open: {err}");
    }
    assert!(failures >= 3, "opened after {failures} failures");
    let err = broker
        .publish(topic, Message::new("fails fast"))
        .await
        .expect_err("open");
    assert_eq!(err.kind(), ErrorKind::Connection);
    assert!(
        err.to_string()
            .contains("circuit breaker rabbitmq.publish is open"),
        "failed fast in the breaker, not in the adapter: {err}"
    );
    let batch = broker
        .publish_batch(topic, vec![Message::new("a"), Message::new("b")])
        .await;
    assert_eq!(batch.failures().len(), 2, "a batch fails fast whole");
    let health = broker.health().await;
    assert_eq!(health.status, HealthStatus::Unhealthy, "{health:?}");
    assert!(
        health.detail.contains("rabbitmq.publish open"),
        "{health:?}"
    );

    start_rabbitmq().await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match broker.publish(topic, Message::new("after")).await {
            Ok(()) => break,
            Err(err) => {
                assert!(Instant::now() < deadline, "never closed again: {err}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    assert_eq!(broker.publish_breaker().state(), BreakerState::Closed);
    assert_eq!(broker.health().await.status, HealthStatus::Healthy);
    broker.close().await.unwrap();
}

/// Through a `FallbackBroker`, every publish made while the node is stopped returns `Ok`
/// (spooled), health is degraded meanwhile, and once the node is back everything is
/// forwarded and delivered, in publish order per topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_during_an_outage_are_spooled_and_forwarded_in_order() {
    use helix_messaging_core::HealthStatus;
    use helix_messaging_core::breaker::{BreakerBroker, BreakerConfig};
    use helix_messaging_core::fallback::{FallbackBroker, ForwardConfig, MemorySpool, SpoolLimits};

    common::log_to_test_output();
    let _node = NODE.lock().await;
    let vhost = Vhost::new("helix-spool");
    let mut config = fault_config(&vhost);
    config.publish_timeout = Duration::from_secs(2);
    let consumer = RabbitBroker::connect(fault_config(&vhost)).await.unwrap();
    let (a, b) = ("spool.a", "spool.b");
    let got_a = collect(&consumer, a).await;
    let got_b = collect(&consumer, b).await;
    let inner = Arc::new(RabbitBroker::connect(config).await.unwrap());
    let breaker = BreakerBroker::new(
        inner,
        BreakerConfig {
            failure_threshold: 2,
            open_interval: Duration::from_secs(1),
            half_open_probes: 1,
        },
    )
    .unwrap();
    let broker = FallbackBroker::new(
        breaker,
        Arc::new(MemorySpool::new(SpoolLimits::default())),
        ForwardConfig {
            batch_size: 50,
            retry_interval: Duration::from_millis(200),
        },
    )
    .await
    .unwrap();
    let mut sent_a = Vec::new();
    for i in 0..20 {
        let m = Message::new(format!("before {i}"));
        sent_a.push(m.id().to_owned());
        broker.publish(a, m).await.unwrap();
    }

    let _keep_running = KeepRabbitMqRunning;
    stop_rabbitmq().await;
    let mut sent_b = Vec::new();
    for i in 0..300 {
        let m = Message::new(format!("during {i}"));
        sent_a.push(m.id().to_owned());
        broker.publish(a, m).await.expect("spooled, not refused");
        if i % 30 == 0 {
            let batch: Vec<Message> = (0..20)
                .map(|j| Message::new(format!("batch {i}.{j}")))
                .collect();
            sent_b.extend(batch.iter().map(|m| m.id().to_owned()));
            broker
                .publish_batch(b, batch)
                .await
                .into_result()
                .expect("spooled, not refused");
        }
    }
    let spooled = broker.spool_stats().await.unwrap().depth;
    assert!(spooled > 0, "the outage's publishes are spooled");
    let health = broker.health().await;
    assert_eq!(health.status, HealthStatus::Degraded, "{health:?}");
    assert!(health.detail.contains("publishes spooled"), "{health:?}");

    start_rabbitmq().await;
    let deadline = Instant::now() + Duration::from_secs(90);
    while broker.spool_stats().await.unwrap().depth > 0 {
        assert!(Instant::now() < deadline, "the spool was not forwarded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    expect_all_delivered("spool a", &sent_a, 0, &got_a).await;
    expect_all_delivered("spool b", &sent_b, 0, &got_b).await;
    // Per topic, first arrivals follow publish order (a redelivery may repeat one).
    for (sent, got) in [(&sent_a, &got_a), (&sent_b, &got_b)] {
        let mut seen = HashSet::new();
        let firsts: Vec<String> = got
            .lock()
            .unwrap()
            .iter()
            .filter(|(id, _)| seen.insert(id.clone()))
            .map(|(id, _)| id.clone())
            .collect();
        assert_eq!(&firsts, sent, "publish order kept through the spool");
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let health = broker.health().await;
        if health.status == HealthStatus::Healthy {
            break;
        }
        assert!(Instant::now() < deadline, "never healthy again: {health:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    broker.close().await.unwrap();
    consumer.close().await.unwrap();
}
