//! The Kafka backend runs the conformance suite against a real Kafka-protocol broker (Tansu on
//! 127.0.0.1:9092, started by `scripts/test`; `KAFKA_BROKERS` overrides). A broker that
//! cannot be reached fails the test.

mod common;

use std::sync::Arc;

use helix_messaging_core::Broker;
use helix_messaging_kafka::KafkaBroker;
use helix_messaging_testkit::Conformance;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_passes_the_conformance_suite() {
    Conformance::new("kafka", || async {
        Ok(Arc::new(KafkaBroker::connect(common::config()).await?) as Arc<dyn Broker>)
    })
    // The 10,000-message poison case handles one message at a time; against Tansu (a debug
    // build in CI, with the other packages' tests running) it can come near the default case
    // limit of 120 s.
    .settings(helix_messaging_testkit::Settings {
        case_timeout: std::time::Duration::from_secs(300),
        ..helix_messaging_testkit::Settings::from_env()
    })
    // A partition is a log: records are read in the order they were written.
    .expect_skipped(
        "priority_order",
        "Kafka partitions keep write order; no priorities",
    )
    // Attempts of records still out travel in the committed offsets' metadata, which Apache
    // Kafka keeps and Tansu 0.6 drops (its OffsetFetch answers offsets only).
    .exclude(
        "crash_loop_counts_every_attempt",
        "Tansu 0.6 drops offset-commit metadata; kafka.rs a_crash_loop_counts_every_attempt_across_owners runs it on librdkafka's mock cluster",
    )
    .exclude(
        "prefetched_but_unseen_is_not_an_attempt",
        "Tansu 0.6 drops offset-commit metadata, where the received one's attempt survives; kafka.rs a_crash_loop_counts_every_attempt_across_owners checks both on librdkafka's mock cluster",
    )
    .run()
    .await
    .assert_passed();
}
