//! Kafka against the memory reference: seeded programs of publishes, acks, requeues and
//! rejects (`HELIX_DIFFERENTIAL_SEEDS=n` runs seeds 1..=n, `HELIX_DIFFERENTIAL_SEED=s` one
//! seed), on Tansu.

mod common;

use std::sync::Arc;

use helix_messaging_core::Broker;
use helix_messaging_kafka::KafkaBroker;
use helix_messaging_testkit::Differential;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_agrees_with_the_memory_reference() {
    Differential::new("kafka", || async {
        Ok(Arc::new(KafkaBroker::connect(common::config()).await?) as Arc<dyn Broker>)
    })
    .without_crashes(
        "Tansu 0.6 drops offset-commit metadata, where attempts survive a crash; kafka.rs a_crash_loop_counts_every_attempt_across_owners checks crashes on librdkafka's mock cluster",
    )
    .run()
    .await
    .assert_agrees();
}
