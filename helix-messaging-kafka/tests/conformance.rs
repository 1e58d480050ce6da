//! The Kafka backend runs the conformance suite against a real broker (Apache Kafka on
//! 127.0.0.1:9092, started by `scripts/test`; `KAFKA_BROKERS` overrides), in its default
//! configuration. A broker that cannot be reached fails the test.

mod common;

use std::sync::Arc;

use helix_messaging_core::Broker;
use helix_messaging_kafka::{KafkaBroker, KafkaConfig};
use helix_messaging_testkit::Conformance;

/// What `MESSAGING_BACKEND=kafka` gives with nothing but the brokers set: the default
/// fetch wait, session timeout, heartbeat and shutdown grace (the other Kafka tests shorten
/// them to make hand-overs quick; here they cost about 4 s in all).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_passes_the_conformance_suite() {
    let config = KafkaConfig::new(common::brokers());
    let mut suite = Conformance::new("kafka", move || {
        let config = config.clone();
        async move { Ok(Arc::new(KafkaBroker::connect(config).await?) as Arc<dyn Broker>) }
    })
    // A partition is a log: records are read in the order they were written.
    .expect_skipped(
        "priority_order",
        "Kafka partitions keep write order; no priorities",
    );
    if common::on_tansu() {
        // Attempts of records still out travel in the committed offsets' metadata, which
        // Apache Kafka keeps and Tansu 0.6 drops (its OffsetFetch answers offsets only).
        suite = suite
            .exclude(
                "crash_loop_counts_every_attempt",
                "Tansu 0.6 drops offset-commit metadata",
            )
            .exclude(
                "prefetched_but_unseen_is_not_an_attempt",
                "Tansu 0.6 drops offset-commit metadata, where the received one's attempt survives",
            );
    }
    suite.run().await.assert_passed();
}
