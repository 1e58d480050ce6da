//! Kafka's connections made and attempts failed, read from librdkafka's statistics, on the
//! real Kafka and through an outage of librdkafka's mock cluster.

use std::time::Duration;

use helix_messaging_core::{Broker, Message, Publisher};
use helix_messaging_kafka::{KafkaBroker, NAME};
use helix_messaging_testkit::eventually;
use helix_messaging_testkit::recorded::{self, connections};

mod common;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_to_the_real_kafka_are_counted() {
    recorded::install();
    let before = connections(NAME);
    let mut config = common::config();
    config.statistics_interval = Duration::from_millis(200);
    let broker = KafkaBroker::connect(config).await.unwrap();
    broker
        .publish(
            &helix_messaging_testkit::fresh_name("connections"),
            Message::new("x"),
        )
        .await
        .unwrap();
    eventually(
        Duration::from_secs(10),
        "the producer's connection counted",
        || async { (connections(NAME).0 > before.0).then_some(()) },
    )
    .await;
    assert_eq!(connections(NAME).1, before.1, "no attempt failed");
    broker.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attempts_that_fail_during_an_outage_and_the_reconnect_are_counted() {
    recorded::install();
    let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
    let topic = "outage";
    cluster.create_topic(topic, 1, 1).unwrap();
    let mut config = common::config_for(&cluster.bootstrap_servers());
    config.statistics_interval = Duration::from_millis(200);
    config.publish_timeout = Duration::from_secs(1);
    let broker = KafkaBroker::connect(config).await.unwrap();
    broker.publish(topic, Message::new("up")).await.unwrap();
    let connected = eventually(Duration::from_secs(10), "connected", || async {
        let now = connections(NAME);
        (now.0 > 0).then_some(now)
    })
    .await;

    cluster.broker_down(1).unwrap();
    // Traffic makes the producer try to reconnect while the broker is away.
    let _ = broker.publish(topic, Message::new("down")).await;
    let failing = eventually(
        Duration::from_secs(20),
        "failed attempts counted",
        || async {
            let now = connections(NAME);
            (now.1 > connected.1).then_some(now)
        },
    )
    .await;
    cluster.broker_up(1).unwrap();
    eventually(Duration::from_secs(30), "the reconnect counted", || async {
        (connections(NAME).0 > failing.0).then_some(())
    })
    .await;
    broker.close().await.unwrap();
}
