//! The connection metrics of the real RabbitMQ: up while connected, down once closed, and
//! connections and failed attempts counted.

use std::time::Duration;

use helix_messaging_core::Broker;
use helix_messaging_rabbitmq::{NAME, RabbitBroker, RabbitConfig};
use helix_messaging_testkit::recorded::{self, connections, connections_up};

mod common;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_state_is_up_after_connect_and_down_after_close() {
    recorded::install();
    let config = common::config();
    let address = config.address();
    let (before, _) = connections(NAME);
    let broker = RabbitBroker::connect(config).await.unwrap();
    assert_eq!(connections_up(NAME, &address), Some(1.0));
    assert_eq!(connections(NAME).0 - before, 1);
    broker.close().await.unwrap();
    assert_eq!(connections_up(NAME, &address), Some(0.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connection_is_counted_as_a_failure() {
    recorded::install();
    // Port 1 on loopback: nothing listens, the connection is refused at once.
    let mut config = RabbitConfig::new("amqp://guest:guest@127.0.0.1:1/%2f").unwrap();
    config.connect_timeout = Duration::from_secs(5);
    let (_, before) = connections(NAME);
    RabbitBroker::connect(config).await.unwrap_err();
    assert_eq!(connections(NAME).1 - before, 1);
}
