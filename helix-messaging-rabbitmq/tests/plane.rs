//! The reliability plane under seeded faults on RabbitMQ, in its default configuration
//! (`HELIX_PLANE_SEEDS=n` runs seeds 1..=n, default 20; `HELIX_PLANE_SEED=s` one seed).

mod common;

use std::sync::Arc;

use helix_messaging_core::Broker;
use helix_messaging_rabbitmq::RabbitBroker;
use helix_messaging_testkit::plane::SpoolHarness;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_spool_keeps_every_acknowledged_publish_under_faults() {
    SpoolHarness::new("rabbitmq", || async {
        Ok(Arc::new(RabbitBroker::connect(common::config()).await?) as Arc<dyn Broker>)
    })
    .run()
    .await
    .assert_holds();
}
