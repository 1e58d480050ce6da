//! RabbitMQ-specific behaviour against the real server.

mod common;

use std::time::Duration;

use futures::StreamExt;
use helix_messaging_core::{Broker, ErrorKind, Message, Publisher, SubscribeOptions, Subscriber};

use helix_messaging_rabbitmq::{RabbitBroker, RabbitConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_no_queue_can_take_is_an_error_not_a_silent_ack() {
    let broker = RabbitBroker::connect(common::config()).await.unwrap();
    let topic = helix_messaging_testkit::fresh_name("unroutable");
    let err = broker
        .publish(&topic, Message::new("nobody is bound"))
        .await
        .expect_err("unroutable publish");
    assert_eq!(err.kind(), ErrorKind::Rejected);
    assert!(err.to_string().contains("unroutable"), "{err}");

    let report = broker
        .publish_batch(&topic, vec![Message::new("a"), Message::new("b")])
        .await;
    assert_eq!(
        report.failures().len(),
        2,
        "every message of the batch is reported"
    );

    // Once a group exists the same topic is routable.
    let mut sub = broker
        .subscribe(
            &topic,
            SubscribeOptions::group(helix_messaging_testkit::fresh_name("g")),
        )
        .await
        .unwrap();
    broker
        .publish(&topic, Message::new("now routable"))
        .await
        .unwrap();
    let d = common::recv(&mut sub).await;
    assert_eq!(d.message().payload().as_ref(), b"now routable");
    d.ack().await.unwrap();
    broker.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_dropped_unacked_comes_back_as_a_redelivery() {
    let broker = RabbitBroker::connect(common::config()).await.unwrap();
    let topic = helix_messaging_testkit::fresh_name("redelivered");
    let group = helix_messaging_testkit::fresh_name("g");
    let mut first = broker
        .subscribe(&topic, SubscribeOptions::group(&group))
        .await
        .unwrap();
    broker.publish(&topic, Message::new("x")).await.unwrap();
    let held = common::recv(&mut first).await;
    assert_eq!(held.attempt(), 1);
    drop(held);
    drop(first);
    let mut second = broker
        .subscribe(&topic, SubscribeOptions::group(&group))
        .await
        .unwrap();
    let again = common::recv(&mut second).await;
    assert!(
        again.info().redelivered,
        "RabbitMQ flags the native redelivery"
    );
    assert_eq!(again.attempt(), 2);
    again.ack().await.unwrap();
    broker.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_can_be_acked_after_its_subscription_is_dropped() {
    // `subscription.take(n).for_each_concurrent(..)` drops the stream while the last acks are
    // still running; those acks must reach the broker, not fail on a closed channel.
    let broker = RabbitBroker::connect(common::config()).await.unwrap();
    let topic = helix_messaging_testkit::fresh_name("late-ack");
    let group = helix_messaging_testkit::fresh_name("g");
    let mut sub = broker
        .subscribe(&topic, SubscribeOptions::group(&group))
        .await
        .unwrap();
    broker.publish(&topic, Message::new("x")).await.unwrap();
    let held = common::recv(&mut sub).await;
    drop(sub);
    held.ack()
        .await
        .expect("ack after the subscription was dropped");
    drop(held);

    let mut next = broker
        .subscribe(&topic, SubscribeOptions::group(&group))
        .await
        .unwrap();
    let quiet = tokio::time::timeout(std::time::Duration::from_millis(500), next.next()).await;
    assert!(quiet.is_err(), "the acked message is gone for good");
    broker.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_priority_queues_the_backend_does_not_claim_priority() {
    let mut config = common::config();
    config.max_priority = 0;
    let broker = RabbitBroker::connect(config).await.unwrap();
    assert!(!broker.capabilities().priority);
    let topic = helix_messaging_testkit::fresh_name("plain");
    let mut sub = broker
        .subscribe(&topic, SubscribeOptions::group("g"))
        .await
        .unwrap();
    broker
        .publish(&topic, Message::new("x").with_priority(9))
        .await
        .unwrap();
    common::recv(&mut sub).await.ack().await.unwrap();
    broker.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_subscription_keeps_its_queue_and_messages_across_a_reconnect() {
    let vhost = common::Vhost::new("helix-private");
    let subscriber = RabbitBroker::connect(vhost.config()).await.unwrap();
    let topic = helix_messaging_testkit::fresh_name("private");
    let mut sub = subscriber
        .subscribe(&topic, SubscribeOptions::default())
        .await
        .unwrap();
    subscriber
        .publish(&topic, Message::new("before"))
        .await
        .unwrap();
    common::recv(&mut sub).await.ack().await.unwrap();

    common::rabbitmqctl(&[
        "close_all_connections",
        "-p",
        vhost.name(),
        "private queue test",
    ]);
    // The subscriber re-creates its consumer only when its stream is next polled: until then
    // nothing of it is on the broker but its queue. A publisher connected after the kill finds
    // that queue (an exclusive one would have gone with the connection: unroutable).
    let publisher = RabbitBroker::connect(vhost.config()).await.unwrap();
    let meanwhile = Message::new("published while the subscriber was disconnected");
    publisher
        .publish(&topic, meanwhile.clone())
        .await
        .expect("the private queue outlives its connection");
    let d = common::recv(&mut sub).await;
    assert_eq!(d.message().id(), meanwhile.id());
    d.ack().await.unwrap();

    // Dropping the subscription deletes the queue: the topic is unroutable again.
    drop(sub);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match publisher.publish(&topic, Message::new("after")).await {
            Err(err) if err.kind() == ErrorKind::Rejected => break,
            _ if tokio::time::Instant::now() > deadline => {
                panic!("the private queue was not deleted with its subscription")
            }
            _ => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
        }
    }
    publisher.close().await.unwrap();
    subscriber.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_publishing_channel_leaves_consumers_alone() {
    let broker = RabbitBroker::connect(common::config()).await.unwrap();
    let topic = helix_messaging_testkit::fresh_name("publisher-channel");
    let mut sub = broker
        .subscribe(
            &topic,
            SubscribeOptions::group(helix_messaging_testkit::fresh_name("g")),
        )
        .await
        .unwrap();
    broker.publish(&topic, Message::new("held")).await.unwrap();
    let held = common::recv(&mut sub).await;

    // The server closes the publishing channel for a publish to a missing exchange.
    let err = broker
        .publish_to("hm-test.no-such-exchange", "x", Message::new("lost"))
        .await
        .expect_err("publish to a missing exchange");
    assert_ne!(err.kind(), ErrorKind::Closed, "{err}");

    // The next publish opens a new channel; the consumer's channel was never touched, so the
    // held delivery can still be acked and does not come back.
    let next = Message::new("after");
    broker.publish(&topic, next.clone()).await.unwrap();
    held.ack()
        .await
        .expect("the consumer's channel is still open");
    let d = common::recv(&mut sub).await;
    assert_eq!(d.message().id(), next.id());
    assert_eq!(d.attempt(), 1);
    d.ack().await.unwrap();
    let quiet = tokio::time::timeout(std::time::Duration::from_millis(500), sub.next()).await;
    assert!(quiet.is_err(), "nothing is redelivered");
    broker.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settlement_on_a_killed_connection_is_an_error() {
    let vhost = common::Vhost::new("helix-dead-channel");
    let broker = RabbitBroker::connect(vhost.config()).await.unwrap();
    let topic = helix_messaging_testkit::fresh_name("dead-channel");
    let group = helix_messaging_testkit::fresh_name("g");
    let mut sub = broker
        .subscribe(&topic, SubscribeOptions::group(&group))
        .await
        .unwrap();
    let m = Message::new("settled on a dead channel");
    broker.publish(&topic, m.clone()).await.unwrap();
    let held = common::recv(&mut sub).await;
    let probe = helix_messaging_testkit::fresh_name("probe");
    let _probe_group = broker
        .subscribe(&probe, SubscribeOptions::group("g"))
        .await
        .unwrap();
    common::rabbitmqctl(&[
        "close_all_connections",
        "-p",
        vhost.name(),
        "dead channel test",
    ]);
    // Once a publish goes through again, the broker is on a new connection and the held
    // delivery's channel is known to be dead. (An ack is fire-and-forget in AMQP: while the
    // client has not yet learnt of the close, nobody can tell it failed.)
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(15);
    while broker.publish(&probe, Message::new("probe")).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no reconnect within 15 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let err = held
        .ack()
        .await
        .expect_err("an ack on a killed connection must not be Ok");
    assert_eq!(err.kind(), ErrorKind::Connection, "{err}");
    // The broker gives the message back: it comes again, counted.
    let again = common::recv(&mut sub).await;
    assert_eq!(again.message().id(), m.id());
    assert_eq!(again.attempt(), 2);
    again.ack().await.unwrap();
    broker.close().await.unwrap();
}

/// A delayed requeue waits in the broker, not in the consumer: after the consumer's whole
/// connection is gone, the message comes back to its group no sooner than the delay, with
/// attempt 2 and none of the broker's dead-letter bookkeeping of the retry hop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_requeue_waits_in_the_broker_across_a_consumer_crash() {
    let topic = helix_messaging_testkit::fresh_name("delayed");
    let group = helix_messaging_testkit::fresh_name("g");
    let delay = std::time::Duration::from_millis(2_000);
    let consumer = RabbitBroker::connect(common::config()).await.unwrap();
    let mut sub = consumer
        .subscribe(&topic, SubscribeOptions::group(&group))
        .await
        .unwrap();
    let m = Message::new("wait in the broker").with_header("kind", "retry-me");
    consumer.publish(&topic, m.clone()).await.unwrap();
    let d = common::recv(&mut sub).await;
    assert!(d.delays_requeue());
    let requeued_at = std::time::Instant::now();
    d.requeue_after(delay).await.unwrap();
    // The consumer's process "dies": its connection closes with nothing held.
    drop(sub);
    consumer.close().await.unwrap();

    let other = RabbitBroker::connect(common::config()).await.unwrap();
    let mut sub = other
        .subscribe(&topic, SubscribeOptions::group(&group))
        .await
        .unwrap();
    let again = common::recv(&mut sub).await;
    let waited = requeued_at.elapsed();
    assert_eq!(again.message().id(), m.id());
    assert_eq!(again.attempt(), 2);
    assert!(
        waited >= delay - std::time::Duration::from_millis(20),
        "back after {waited:?}, before the {delay:?} delay"
    );
    assert_eq!(again.message().header("kind"), Some("retry-me"));
    assert!(
        again
            .message()
            .headers()
            .keys()
            .all(|k| !k.starts_with("x-death") && !k.starts_with("x-first-death")),
        "dead-letter bookkeeping leaked into the headers: {:?}",
        again.message().headers()
    );
    again.ack().await.unwrap();
    assert!(
        tokio::time::timeout(std::time::Duration::from_millis(500), sub.next())
            .await
            .is_err(),
        "delivered again after the ack"
    );
}

/// HelixAgent's documents write `RABBITMQ_URL=amqp://user:pass@localhost:5672/`: the Go client
/// reads the empty path as the default vhost `/`, and so must this backend (lapin alone reads
/// it as vhost `""`, which the broker refuses).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_url_with_an_empty_path_connects_to_the_default_vhost() {
    let mut config = RabbitConfig::new("amqp://guest:guest@127.0.0.1:5672/").unwrap();
    config.dead_letter_queue = Some("hm-test.dlq".into());
    let broker = tokio::time::timeout(Duration::from_secs(30), RabbitBroker::connect(config))
        .await
        .expect("connect answered within 30 s")
        .expect("connected to vhost /");
    assert_eq!(broker.config().address(), "amqp://guest@127.0.0.1:5672//");
    broker.close().await.unwrap();
}

/// `RABBITMQ_CONNECT_TIMEOUT` bounds the connect: a server that accepts the TCP connection
/// and never speaks AMQP fails it with a timeout, not a hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connect_timeout_variable_bounds_a_silent_server() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    // Accepted connections are kept open and never answered.
    let held = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let keeper = held.clone();
    std::thread::spawn(move || {
        for stream in silent.incoming().flatten() {
            keeper.lock().unwrap().push(stream);
        }
    });
    let url = format!("amqp://guest:guest@127.0.0.1:{port}/");
    let config = RabbitConfig::from_vars(helix_messaging_testkit::env_lookup(&[
        ("RABBITMQ_URL", url.as_str()),
        ("RABBITMQ_CONNECT_TIMEOUT", "300ms"),
    ]))
    .unwrap();
    assert_eq!(config.connect_timeout, Duration::from_millis(300));
    let started = std::time::Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(10), RabbitBroker::connect(config))
        .await
        .expect("the connect gave up well within 10 s")
        .expect_err("a silent server is not a broker");
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "gave up after {:?}, not about 300 ms",
        started.elapsed()
    );
}

/// Messages of other AMQP publishers (no helix headers) are taken as they are, as the wire
/// module promises: the message id they carry, or a fresh UUID each when they carry none;
/// the AMQP timestamp (seconds); their headers and their payload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_of_other_publishers_are_received_as_they_are() {
    use lapin::options::BasicPublishOptions;
    use lapin::types::{AMQPValue, FieldTable};

    let config = common::config();
    let broker = RabbitBroker::connect(config.clone()).await.unwrap();
    let topic = helix_messaging_testkit::fresh_name("plain-amqp");
    let mut sub = broker
        .subscribe(&topic, SubscribeOptions::group("g"))
        .await
        .unwrap();
    let connection =
        lapin::Connection::connect(&common::url(), lapin::ConnectionProperties::default())
            .await
            .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let mut headers = FieldTable::default();
    headers.insert("origin".into(), AMQPValue::LongString("elsewhere".into()));
    let publish = |body: &'static [u8], properties: lapin::BasicProperties| {
        let (channel, exchange, topic) = (&channel, config.exchange.clone(), topic.clone());
        async move {
            channel
                .basic_publish(
                    exchange.into(),
                    topic.into(),
                    BasicPublishOptions::default(),
                    body,
                    properties,
                )
                .await
                .unwrap()
                .await
                .unwrap();
        }
    };
    publish(
        b"with an id",
        lapin::BasicProperties::default()
            .with_message_id("their-id-1".into())
            .with_timestamp(1_700_000_000)
            .with_headers(headers),
    )
    .await;
    publish(b"without one", lapin::BasicProperties::default()).await;
    publish(b"without one either", lapin::BasicProperties::default()).await;

    let first = common::recv(&mut sub).await;
    let message = first.message();
    assert_eq!(message.id(), "their-id-1");
    assert_eq!(message.payload().as_ref(), b"with an id");
    assert_eq!(message.header("origin"), Some("elsewhere"));
    assert_eq!(
        message.timestamp(),
        std::time::UNIX_EPOCH + Duration::from_secs(1_700_000_000)
    );
    first.ack().await.unwrap();
    let mut fresh = Vec::new();
    for body in [b"without one".as_slice(), b"without one either"] {
        let delivery = common::recv(&mut sub).await;
        assert_eq!(delivery.message().payload().as_ref(), body);
        let id = uuid::Uuid::parse_str(delivery.message().id()).expect("a UUID");
        assert_eq!(id.get_version_num(), 4);
        assert_eq!(id.hyphenated().to_string(), delivery.message().id());
        fresh.push(id);
        delivery.ack().await.unwrap();
    }
    assert_ne!(fresh[0], fresh[1], "each message gets an id of its own");
    connection.close(0, "done".into()).await.unwrap();
    broker.close().await.unwrap();
}
