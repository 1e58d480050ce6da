//! Several nodes (`RABBITMQ_CLUSTER_NODES`): the adapter connects to the first node that
//! answers and, when its node dies, reconnects to another. The nodes here are a private
//! RabbitMQ node of the test's own and the machine's node.

use std::time::{Duration, Instant};

use futures::StreamExt;
use helix_messaging_core::{Broker, Message, Publisher, SubscribeOptions, Subscriber};
use helix_messaging_rabbitmq::{RabbitBroker, RabbitConfig};
use helix_messaging_testkit::faults::{PrivateRabbitMq, rabbitmqctl};
use helix_messaging_testkit::{env_lookup, fresh_name};

mod common;

/// The machine's node, as `host:port`.
const MACHINE_NODE: &str = "127.0.0.1:5672";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_cannot_be_reached_is_passed_over() {
    // Nothing listens on port 1; the machine's node is next.
    let config = RabbitConfig::from_vars(env_lookup(&[
        ("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:1/%2f"),
        ("RABBITMQ_CLUSTER_NODES", MACHINE_NODE),
    ]))
    .unwrap();
    let broker = RabbitBroker::connect(config)
        .await
        .expect("the second node answers");
    let topic = fresh_name("cluster.passed-over");
    let mut sub = broker
        .subscribe(&topic, SubscribeOptions::group("g"))
        .await
        .unwrap();
    broker.publish(&topic, Message::new("here")).await.unwrap();
    let delivery = common::recv(&mut sub).await;
    assert_eq!(delivery.message().payload(), "here".as_bytes());
    delivery.ack().await.unwrap();
    broker.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_its_node_dies_the_adapter_moves_to_another_and_goes_on() {
    let mut first = PrivateRabbitMq::start();
    let mut config = RabbitConfig::from_vars(env_lookup(&[
        ("RABBITMQ_URL", first.url().as_str()),
        ("RABBITMQ_CLUSTER_NODES", MACHINE_NODE),
    ]))
    .unwrap();
    config.max_reconnect_delay = Duration::from_millis(500);
    let broker = RabbitBroker::connect(config).await.unwrap();
    let topic = fresh_name("cluster.failover");
    let queue = format!("{topic}.g");
    let mut sub = broker
        .subscribe(&topic, SubscribeOptions::group("g"))
        .await
        .unwrap();
    broker
        .publish(&topic, Message::new("before"))
        .await
        .unwrap();
    common::recv(&mut sub).await.ack().await.unwrap();
    let on = |args: &[&str]| rabbitmqctl(&[args, &["list_queues", "name", "--quiet"]].concat());
    assert!(
        on(&["-n", first.node()]).lines().any(|l| l.trim() == queue),
        "the group's queue is on the first node"
    );

    // Consumed all along, as an application does: the subscription sets itself up again on
    // the node the adapter moves to when it is polled.
    let (got, mut received) = tokio::sync::mpsc::unbounded_channel();
    let consumer = tokio::spawn(async move {
        while let Some(next) = sub.next().await {
            match next {
                Ok(delivery) => {
                    let payload = delivery.message().payload().clone();
                    let _ = delivery.ack().await;
                    let _ = got.send(payload);
                }
                Err(err) => eprintln!("the subscription reported: {err}"),
            }
        }
    });
    first.kill();
    let died = Instant::now();
    // Publishes fail (retryably, or unroutable until the group's queue is declared on the
    // new node) until the adapter and the subscription are on the machine's node.
    let deadline = died + Duration::from_secs(60);
    let resumed = loop {
        assert!(
            Instant::now() < deadline,
            "no delivery on another node within 60 s"
        );
        if broker.publish(&topic, Message::new("after")).await.is_err() {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        if let Ok(Some(payload)) =
            tokio::time::timeout(Duration::from_secs(2), received.recv()).await
        {
            assert_eq!(payload, "after".as_bytes());
            break died.elapsed();
        }
    };
    eprintln!("cluster failover: delivering again {resumed:?} after its node died");
    assert!(
        resumed <= Duration::from_secs(10),
        "delivering again took {resumed:?}"
    );
    assert!(
        on(&[]).lines().any(|l| l.trim() == queue),
        "the group's queue is now on the machine's node"
    );
    broker.close().await.unwrap();
    consumer.await.unwrap();
    // The queue this test made on the machine's node.
    let _ = std::process::Command::new("rabbitmqctl")
        .args(["delete_queue", &queue])
        .output();
}
