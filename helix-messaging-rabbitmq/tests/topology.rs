//! Declared topology, HelixAgent's preset, native dead-lettering and the replay journal against
//! the real RabbitMQ. Topology tests run in a vhost of their own, so HelixAgent's names do not
//! touch anything else on the server.

mod common;

use std::time::{Duration, SystemTime};

use futures::StreamExt;
use helix_messaging_core::replay::{ReplayConfig, ReplayHandler, ReplayRequest};
use helix_messaging_core::{
    Broker, ErrorKind, HealthStatus, Message, Publisher, StartPosition, SubscribeOptions,
    Subscriber, TimeRange,
};
use helix_messaging_rabbitmq::{
    ExchangeType, HELIXAGENT_DLQ, HELIXAGENT_TASKS, Queue, RabbitBroker, Topology,
};
use helix_messaging_testkit::fresh_name;

use common::{Vhost, rabbitmqctl, recv};

/// `rabbitmqctl list_queues` of `vhost`: name and arguments, one line per queue.
fn queue_arguments(vhost: &Vhost) -> Vec<String> {
    rabbitmqctl(&["list_queues", "-q", "-p", vhost.name(), "name", "arguments"])
        .lines()
        .filter(|l| !l.starts_with("name"))
        .map(str::to_owned)
        .collect()
}

fn line_of<'a>(lines: &'a [String], queue: &str) -> &'a str {
    lines
        .iter()
        .find(|l| l.split_whitespace().next() == Some(queue))
        .unwrap_or_else(|| panic!("queue {queue} not declared; queues: {lines:#?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_topology_is_declared_with_the_seeds_arguments() {
    let vhost = Vhost::new("helix-topology");
    let broker = RabbitBroker::connect(vhost.config()).await.unwrap();
    broker.declare(Topology::helixagent()).await.unwrap();
    // Declaring the same again is a no-op, not an error.
    broker.declare(Topology::helixagent()).await.unwrap();

    let queues = queue_arguments(&vhost);
    let llm = line_of(&queues, "helixagent.tasks.llm");
    assert!(
        llm.contains("x-max-priority") && llm.contains("10"),
        "{llm}"
    );
    assert!(
        llm.contains("helixagent.dlq"),
        "task queues dead-letter to the DLQ: {llm}"
    );
    let background = line_of(&queues, "helixagent.tasks.background");
    assert!(!background.contains("x-max-priority"), "{background}");
    for queue in [
        "helixagent.tasks.debate",
        "helixagent.tasks.verification",
        "helixagent.tasks.notifications",
    ] {
        assert!(
            line_of(&queues, queue).contains("helixagent.dlq"),
            "{queue}"
        );
    }
    let dlq = line_of(&queues, "helixagent.dlq");
    assert!(
        dlq.contains("604800000") && dlq.contains("100000"),
        "7 days, 100,000: {dlq}"
    );
    let retry = line_of(&queues, "helixagent.retry");
    assert!(
        retry.contains("60000") && retry.contains("10000"),
        "60 s, 10,000: {retry}"
    );

    let exchanges = rabbitmqctl(&["list_exchanges", "-q", "-p", vhost.name(), "name", "type"]);
    for (name, kind) in [
        ("helixagent.tasks", "direct"),
        ("helixagent.events", "topic"),
        ("helixagent.notifications", "fanout"),
    ] {
        assert!(
            exchanges
                .lines()
                .any(|l| l.split_whitespace().collect::<Vec<_>>() == [name, kind]),
            "{name} {kind} in {exchanges}"
        );
    }

    // A declaration that contradicts the server's is refused, and the broker keeps working.
    let err = broker
        .declare(Topology::new().queue(Queue::classic(HELIXAGENT_DLQ).max_length(5)))
        .await
        .expect_err("conflicting arguments");
    assert_eq!(err.kind(), ErrorKind::Rejected, "{err}");
    broker
        .publish_to(HELIXAGENT_TASKS, "debate", Message::new("still publishing"))
        .await
        .unwrap();
    broker.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_route_by_type_in_priority_order_and_rejected_tasks_land_in_the_dlq() {
    let vhost = Vhost::new("helix-topology");
    let broker = RabbitBroker::connect(vhost.config()).await.unwrap();
    broker.declare(Topology::helixagent()).await.unwrap();
    for priority in [1, 9, 5] {
        broker
            .publish_to(
                HELIXAGENT_TASKS,
                "llm",
                Message::new(format!("p{priority}")).with_priority(priority),
            )
            .await
            .unwrap();
    }
    broker
        .publish_to(HELIXAGENT_TASKS, "debate", Message::new("round 1"))
        .await
        .unwrap();
    let err = broker
        .publish_to(HELIXAGENT_TASKS, "no-such-type", Message::new("x"))
        .await
        .expect_err("no queue for that task type");
    assert_eq!(err.kind(), ErrorKind::Rejected);

    let mut llm = broker.consume("helixagent.tasks.llm", 10).await.unwrap();
    let mut order = Vec::new();
    for _ in 0..3 {
        let d = recv(&mut llm).await;
        assert_eq!(d.info().topic.as_ref(), "helixagent.tasks.llm");
        order.push(d.message().priority());
        if d.message().priority() == 5 {
            d.reject().await.unwrap();
        } else {
            d.ack().await.unwrap();
        }
    }
    assert_eq!(order, [9, 5, 1], "highest priority first");

    let mut debate = broker.consume("helixagent.tasks.debate", 10).await.unwrap();
    let d = recv(&mut debate).await;
    assert_eq!(d.message().payload().as_ref(), b"round 1");
    d.ack().await.unwrap();

    let mut dlq = broker.consume(HELIXAGENT_DLQ, 10).await.unwrap();
    let dead = recv(&mut dlq).await;
    assert_eq!(dead.message().payload().as_ref(), b"p5");
    assert_eq!(
        dead.message().header("x-first-death-queue"),
        Some("helixagent.tasks.llm")
    );
    assert_eq!(
        dead.message().header("x-first-death-reason"),
        Some("rejected")
    );
    dead.ack().await.unwrap();

    let missing = broker
        .consume("no.such.queue", 10)
        .await
        .expect_err("missing queue");
    assert_eq!(missing.kind(), ErrorKind::NotFound, "{missing}");
    broker.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_group_delivery_is_dead_lettered_with_its_origin() {
    let vhost = Vhost::new("helix-dlx");
    let broker = RabbitBroker::connect(vhost.config()).await.unwrap();
    assert!(broker.capabilities().native_dlq);
    let topic = fresh_name("dlx");
    let mut sub = broker
        .subscribe(&topic, SubscribeOptions::group("workers"))
        .await
        .unwrap();
    let sent = Message::new("poison").with_header("type", "task.poison");
    broker.publish(&topic, sent.clone()).await.unwrap();
    recv(&mut sub).await.reject().await.unwrap();

    let mut dlq = broker.consume(HELIXAGENT_DLQ, 10).await.unwrap();
    let dead = recv(&mut dlq).await;
    assert_eq!(dead.message().id(), sent.id());
    assert_eq!(dead.message().header("type"), Some("task.poison"));
    assert_eq!(
        dead.message().header("x-first-death-queue"),
        Some(format!("{topic}.workers").as_str())
    );
    dead.ack().await.unwrap();

    // With dead-lettering off the backend says so.
    let mut config = vhost.config();
    config.dead_letter_queue = None;
    let plain = RabbitBroker::connect(config).await.unwrap();
    assert!(!plain.capabilities().native_dlq);
    plain.close().await.unwrap();
    broker.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declared_topology_is_declared_again_after_the_connection_is_lost() {
    let vhost = Vhost::new("helix-redeclare");
    let broker = RabbitBroker::connect(vhost.config()).await.unwrap();
    let topology = Topology::new()
        .exchange("orders", ExchangeType::Direct)
        .queue(Queue::classic("orders.created"))
        .bind("orders.created", "orders", "created");
    broker.declare(topology).await.unwrap();
    rabbitmqctl(&["delete_queue", "-p", vhost.name(), "orders.created"]);
    rabbitmqctl(&[
        "close_all_connections",
        "-p",
        vhost.name(),
        "redeclare test",
    ]);

    // Until the new connection is up, publishes fail fast; then the queue is back and
    // routable again.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        match broker
            .publish_to("orders", "created", Message::new("after reconnect"))
            .await
        {
            Ok(()) => break,
            Err(err) => {
                assert!(err.is_retryable(), "only reconnecting may fail: {err}");
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "not back in 15 s: {err}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    assert_eq!(broker.health().await.status, HealthStatus::Healthy);
    let mut created = broker.consume("orders.created", 10).await.unwrap();
    let d = recv(&mut created).await;
    assert_eq!(d.message().payload().as_ref(), b"after reconnect");
    d.ack().await.unwrap();
    broker.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_needs_the_journal_and_says_so() {
    let broker = RabbitBroker::connect(common::config()).await.unwrap();
    assert!(!broker.capabilities().replay_by_time);
    let now = SystemTime::now();
    let range = TimeRange::new(now - Duration::from_secs(60), now).unwrap();
    let err = broker
        .read_range("t", range)
        .await
        .err()
        .expect("no journal");
    assert_eq!(err.kind(), ErrorKind::Unsupported);
    assert!(err.to_string().contains("RABBITMQ_REPLAY_JOURNAL"), "{err}");
    let err = broker
        .subscribe(
            "t",
            SubscribeOptions::group("g").with_start(StartPosition::Earliest),
        )
        .await
        .expect_err("no journal");
    assert_eq!(err.kind(), ErrorKind::Unsupported);
    let broker: std::sync::Arc<dyn Broker> = std::sync::Arc::new(broker);
    let replays = ReplayHandler::new(broker.clone(), ReplayConfig::default());
    let err = replays
        .start_replay(ReplayRequest::new("t", range.from(), range.to()))
        .await
        .expect_err("no journal, no replay");
    assert_eq!(err.kind(), ErrorKind::Unsupported);
    for named in [
        "kafka",
        "MESSAGING_BACKEND=redis-streams",
        "RABBITMQ_REPLAY_JOURNAL=true",
    ] {
        assert!(err.to_string().contains(named), "names {named}: {err}");
    }
    broker.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_group_starting_at_a_time_gets_the_history_from_then_and_then_live_messages() {
    let vhost = Vhost::new("helix-journal");
    let broker = RabbitBroker::connect(vhost.journal_config()).await.unwrap();
    assert!(broker.capabilities().replay_by_time);
    let topic = fresh_name("since");
    let other = fresh_name("other");
    broker
        .publish(&topic, Message::new("too old"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let since = SystemTime::now();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut expected = Vec::new();
    for i in 0..3 {
        let m = Message::new(format!("kept {i}"));
        expected.push(m.id().to_owned());
        broker.publish(&topic, m).await.unwrap();
        // Another topic's traffic in the same journal is not part of the history.
        broker
            .publish(&other, Message::new("elsewhere"))
            .await
            .unwrap();
    }
    // Already expired when the group is created: not copied.
    broker
        .publish(
            &topic,
            Message::new("expired").with_ttl(Duration::from_millis(1)),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;

    let group = fresh_name("g");
    let mut sub = broker
        .subscribe(
            &topic,
            SubscribeOptions::group(&group).with_start(StartPosition::Time(since)),
        )
        .await
        .unwrap();
    let live = Message::new("live");
    broker.publish(&topic, live.clone()).await.unwrap();
    expected.push(live.id().to_owned());
    let mut got = Vec::new();
    for _ in 0..expected.len() {
        let d = recv(&mut sub).await;
        got.push(d.message().id().to_owned());
        d.ack().await.unwrap();
    }
    assert_eq!(got, expected);
    let quiet = tokio::time::timeout(Duration::from_millis(500), sub.next()).await;
    assert!(
        quiet.is_err(),
        "nothing more: {:?}",
        quiet.map(|d| d.map(|d| d.map(|d| d.message().payload().clone())))
    );
    drop(sub);

    // The group exists now: joining it again does not copy the history a second time.
    let mut again = broker
        .subscribe(
            &topic,
            SubscribeOptions::group(&group).with_start(StartPosition::Earliest),
        )
        .await
        .unwrap();
    let quiet = tokio::time::timeout(Duration::from_millis(500), again.next()).await;
    assert!(quiet.is_err(), "an existing group continues where it is");
    broker.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quorum_queue_counts_native_redeliveries_exactly() {
    let vhost = Vhost::new("helix-quorum");
    let broker = RabbitBroker::connect(vhost.config()).await.unwrap();
    broker
        .declare(Topology::new().queue(Queue {
            queue_type: helix_messaging_rabbitmq::QueueType::Quorum,
            ..Queue::classic("jobs")
        }))
        .await
        .unwrap();
    broker
        .publish_to("", "jobs", Message::new("x"))
        .await
        .unwrap();
    // Each time the consumer goes away without settling, RabbitMQ redelivers; the redelivered
    // flag alone could only say "more than once".
    for expected in 1..=3 {
        let mut sub = broker.consume("jobs", 1).await.unwrap();
        let d = recv(&mut sub).await;
        assert_eq!(d.attempt(), expected);
        drop(d);
        drop(sub);
    }
    let mut sub = broker.consume("jobs", 1).await.unwrap();
    let d = recv(&mut sub).await;
    assert_eq!(d.attempt(), 4);
    assert!(d.info().redelivered);
    assert_eq!(
        d.message().header("x-delivery-count"),
        None,
        "broker bookkeeping stays out"
    );
    d.ack().await.unwrap();
    broker.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_message_is_dropped_and_never_dead_lettered() {
    // Dead-lettered on expiry, messages nobody rejected would fill the bounded dead-letter
    // queue and push real rejects out: an expired message is dropped when read instead.
    let vhost = Vhost::new("helix-expiry");
    let broker = RabbitBroker::connect(vhost.config()).await.unwrap();
    let topic = fresh_name("expiry");
    drop(
        broker
            .subscribe(&topic, SubscribeOptions::group("workers"))
            .await
            .unwrap(),
    );
    let short = Message::new("expires").with_ttl(Duration::from_millis(50));
    let kept = Message::new("kept");
    broker.publish(&topic, short).await.unwrap();
    broker.publish(&topic, kept.clone()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut sub = broker
        .subscribe(&topic, SubscribeOptions::group("workers"))
        .await
        .unwrap();
    let d = recv(&mut sub).await;
    assert_eq!(
        d.message().id(),
        kept.id(),
        "the expired one is not delivered"
    );
    d.ack().await.unwrap();

    let dead = rabbitmqctl(&["list_queues", "-p", vhost.name(), "name", "messages"]);
    let line = dead
        .lines()
        .find(|l| l.starts_with(HELIXAGENT_DLQ))
        .unwrap_or_else(|| panic!("{HELIXAGENT_DLQ} is declared: {dead}"));
    assert_eq!(
        line.split_whitespace().nth(1),
        Some("0"),
        "nothing was dead-lettered: {line}"
    );
    broker.close().await.unwrap();
}
