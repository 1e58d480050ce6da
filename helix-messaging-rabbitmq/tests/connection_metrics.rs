//! The connection metrics of the real RabbitMQ: up while connected, down once closed, and
//! connections and failed attempts counted.

use std::time::Duration;

use helix_messaging_core::Broker;
use helix_messaging_core::observe::connection::{
    CONNECTION_FAILURES_METRIC, CONNECTION_UP_METRIC, CONNECTIONS_METRIC,
};
use helix_messaging_rabbitmq::{NAME, RabbitBroker, RabbitConfig};
use helix_messaging_testkit::recorded::{self, counter, gauge};

mod common;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_state_is_up_after_connect_and_down_after_close() {
    recorded::install();
    let config = common::config();
    let address = config.address();
    let on = [("backend", NAME), ("connection", address.as_str())];
    let before = counter(
        &recorded::snapshot(),
        CONNECTIONS_METRIC,
        &[("backend", NAME)],
    );
    let broker = RabbitBroker::connect(config).await.unwrap();
    let recorded = recorded::snapshot();
    assert_eq!(gauge(&recorded, CONNECTION_UP_METRIC, &on), Some(1.0));
    assert_eq!(
        counter(&recorded, CONNECTIONS_METRIC, &[("backend", NAME)]) - before,
        1
    );
    broker.close().await.unwrap();
    assert_eq!(
        gauge(&recorded::snapshot(), CONNECTION_UP_METRIC, &on),
        Some(0.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connection_is_counted_as_a_failure() {
    recorded::install();
    // Port 1 on loopback: nothing listens, the connection is refused at once.
    let mut config = RabbitConfig::new("amqp://guest:guest@127.0.0.1:1/%2f").unwrap();
    config.connect_timeout = Duration::from_secs(5);
    let failures = || {
        counter(
            &recorded::snapshot(),
            CONNECTION_FAILURES_METRIC,
            &[("backend", NAME)],
        )
    };
    let before = failures();
    RabbitBroker::connect(config).await.unwrap_err();
    assert_eq!(failures() - before, 1);
}
