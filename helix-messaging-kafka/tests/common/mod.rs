//! Settings every Kafka test uses: the test broker on 127.0.0.1:9092 (`KAFKA_BROKERS`
//! overrides), Apache Kafka in KRaft mode as `scripts/test` starts it, or Tansu 0.6 when
//! `HELIX_KAFKA_BROKER=tansu`.

#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use futures::StreamExt;
use helix_messaging_core::{Delivery, Subscription};
use helix_messaging_kafka::KafkaConfig;

/// Settings for `brokers` with the short group timings a test needs: a group join or a fetch
/// otherwise crawls.
pub fn config_for(brokers: &str) -> KafkaConfig {
    let mut config = KafkaConfig::new(brokers);
    config.fetch_wait_max = Duration::from_millis(50);
    config.session_timeout = Duration::from_secs(6);
    config.heartbeat_interval = Duration::from_millis(500);
    config.shutdown_grace = Duration::from_secs(2);
    config
}

/// Whether the tests run against Tansu 0.6 (`HELIX_KAFKA_BROKER=tansu`) rather than Apache
/// Kafka: the few behaviours Tansu does not have are then excluded, with the reason.
pub fn on_tansu() -> bool {
    std::env::var("HELIX_KAFKA_BROKER").is_ok_and(|b| b == "tansu")
}

/// The shared test broker's bootstrap list (`KAFKA_BROKERS`, default 127.0.0.1:9092).
pub fn brokers() -> String {
    std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

/// The shared test broker.
pub fn config() -> KafkaConfig {
    config_for(&brokers())
}

/// The next delivery, failing the test if none arrives within 20 s or the stream errs or ends.
pub async fn recv(sub: &mut Subscription) -> Delivery {
    tokio::time::timeout(Duration::from_secs(20), sub.next())
        .await
        .unwrap_or_else(|_| panic!("no delivery on {} within 20 s", sub.topic()))
        .expect("subscription open")
        .expect("no stream error")
}

/// The adapter's log in the test output (`RUST_LOG` overrides), so a failure shows what the
/// group was doing.
pub fn log_to_test_output() {
    helix_messaging_testkit::log_to_test_output("helix_messaging_kafka=info");
}

/// The value and source of `key` in the configuration of `topic` on the cluster at `brokers`.
pub async fn topic_setting(brokers: &str, topic: &str, key: &str) -> (Option<String>, String) {
    use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    let options = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
    let described = tokio::time::timeout(
        Duration::from_secs(20),
        admin.describe_configs([&ResourceSpecifier::Topic(topic)], &options),
    )
    .await
    .expect("described within 20 s")
    .unwrap();
    let resource = described[0].as_ref().expect("the topic's configuration");
    let entry = resource.get(key).expect(key);
    (entry.value.clone(), format!("{:?}", entry.source))
}
