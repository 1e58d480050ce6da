//! Kafka against the memory reference: seeded programs of publishes, acks, requeues and
//! rejects (`HELIX_DIFFERENTIAL_SEEDS=n` runs seeds 1..=n, `HELIX_DIFFERENTIAL_SEED=s` one
//! seed), consumer crashes included, on Apache Kafka (on Tansu 0.6 without crashes).

mod common;

use std::sync::Arc;

use helix_messaging_core::Broker;
use helix_messaging_kafka::{KafkaBroker, KafkaConfig};
use helix_messaging_testkit::Differential;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_agrees_with_the_memory_reference() {
    common::log_to_test_output();
    // What `MESSAGING_BACKEND=kafka` gives with nothing but the brokers set.
    let config = KafkaConfig::new(common::brokers());
    let mut differential = Differential::new("kafka", move || {
        let config = config.clone();
        async move { Ok(Arc::new(KafkaBroker::connect(config).await?) as Arc<dyn Broker>) }
    });
    if common::on_tansu() {
        differential = differential.without_crashes(
            "Tansu 0.6 drops offset-commit metadata, where attempts survive a crash",
        );
    }
    differential.run().await.assert_agrees();
}
