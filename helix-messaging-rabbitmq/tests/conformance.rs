//! The RabbitMQ backend runs the conformance suite against the real server on 127.0.0.1:5672
//! (`RABBITMQ_URL` overrides). A server that cannot be reached fails the test.

mod common;

use std::sync::Arc;

use helix_messaging_core::Broker;
use helix_messaging_rabbitmq::RabbitBroker;
use helix_messaging_testkit::Conformance;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_passes_the_conformance_suite() {
    // Queues hold no history from before they exist; replay through a stream queue is not
    // implemented yet, so the backend does not declare it.
    let no_history = "RabbitMQ queues keep no history; stream-queue replay is not implemented yet";
    Conformance::new("rabbitmq", || async {
        Ok(Arc::new(RabbitBroker::connect(common::config()).await?) as Arc<dyn Broker>)
    })
    .expect_skipped("read_range_returns_exactly_the_window", no_history)
    .expect_skipped("new_group_starts_from_earliest", no_history)
    .run()
    .await
    .assert_passed();
}
