//! The RabbitMQ backend runs the conformance suite against the real server on 127.0.0.1:5672
//! (`RABBITMQ_URL` overrides). A server that cannot be reached fails the test.

mod common;

use std::sync::Arc;

use helix_messaging_core::Broker;
use helix_messaging_rabbitmq::RabbitBroker;
use helix_messaging_testkit::Conformance;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_passes_the_conformance_suite() {
    // With the replay journal on, every case applies: history is read from the journal
    // stream. Without it the two history cases are skipped by capability, which
    // `replay_needs_the_journal` in rabbitmq.rs covers.
    // A vhost of its own, so reading the journal from its start reads only this run.
    let vhost = common::Vhost::new("helix-conformance");
    let config = vhost.journal_config();
    Conformance::new("rabbitmq", move || {
        let config = config.clone();
        async move { Ok(Arc::new(RabbitBroker::connect(config).await?) as Arc<dyn Broker>) }
    })
    .run()
    .await
    .assert_passed();
}
