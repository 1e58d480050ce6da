//! The reliability plane under seeded faults on Kafka, in its default configuration: replay,
//! which reads a topic's history by time (`HELIX_PLANE_SEEDS=n` runs seeds 1..=n, default
//! 20; `HELIX_PLANE_SEED=s` one seed). The spool and DLQ harnesses run on the brokers whose
//! subscriptions the harness watches (memory, Redis Streams, RabbitMQ).

mod common;

use std::sync::Arc;

use helix_messaging_core::Broker;
use helix_messaging_kafka::KafkaBroker;
use helix_messaging_testkit::plane::ReplayHarness;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_killed_and_resumed_under_faults_copies_each_entry_once_in_order() {
    ReplayHarness::new("kafka", || async {
        Ok(Arc::new(KafkaBroker::connect(common::config()).await?) as Arc<dyn Broker>)
    })
    .run()
    .await
    .assert_holds();
}
