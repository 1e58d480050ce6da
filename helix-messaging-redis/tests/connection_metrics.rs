//! The connection metrics of the real Redis: the publishing connection up while connected,
//! down once closed, and connections and failed attempts counted.

use std::time::Duration;

use helix_messaging_core::Broker;
use helix_messaging_core::observe::connection::{
    CONNECTION_FAILURES_METRIC, CONNECTION_UP_METRIC, CONNECTIONS_METRIC,
};
use helix_messaging_redis::{RedisBroker, RedisConfig, RedisMode, STREAMS_NAME};
use helix_messaging_testkit::recorded::{self, counter, gauge};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_state_is_up_after_connect_and_down_after_close() {
    recorded::install();
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let config = RedisConfig::new(&url, RedisMode::Streams).expect("REDIS_URL");
    let address = config.address();
    let on = [("backend", STREAMS_NAME), ("connection", address.as_str())];
    let connections = || {
        counter(
            &recorded::snapshot(),
            CONNECTIONS_METRIC,
            &[("backend", STREAMS_NAME)],
        )
    };
    let before = connections();
    let broker = RedisBroker::connect(config).await.unwrap();
    assert_eq!(
        gauge(&recorded::snapshot(), CONNECTION_UP_METRIC, &on),
        Some(1.0)
    );
    assert_eq!(connections() - before, 1);
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
    let mut config = RedisConfig::new("redis://127.0.0.1:1", RedisMode::Streams).unwrap();
    config.connect_timeout = Duration::from_secs(5);
    let failures = || {
        counter(
            &recorded::snapshot(),
            CONNECTION_FAILURES_METRIC,
            &[("backend", STREAMS_NAME)],
        )
    };
    let before = failures();
    RedisBroker::connect(config).await.unwrap_err();
    assert_eq!(failures() - before, 1);
}
