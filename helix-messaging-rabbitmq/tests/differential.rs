//! RabbitMQ against the memory reference: seeded programs of publishes, acks, requeues,
//! rejects and consumer crashes (`HELIX_DIFFERENTIAL_SEEDS=n` runs seeds 1..=n,
//! `HELIX_DIFFERENTIAL_SEED=s` one seed).

mod common;

use std::sync::Arc;

use helix_messaging_core::Broker;
use helix_messaging_rabbitmq::{RabbitBroker, RabbitConfig};
use helix_messaging_testkit::Differential;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_agrees_with_the_memory_reference() {
    // What `MESSAGING_BACKEND=rabbitmq` gives with nothing else set, in a vhost of its own
    // (its queues go away with it).
    let vhost = common::Vhost::new("helix-differential");
    let config = RabbitConfig::new(&vhost.0.url()).expect("the vhost's URL");
    Differential::new("rabbitmq", move || {
        let config = config.clone();
        async move { Ok(Arc::new(RabbitBroker::connect(config).await?) as Arc<dyn Broker>) }
    })
    .run()
    .await
    .assert_agrees();
}
