//! The RabbitMQ backend runs the conformance suite against the real server on 127.0.0.1:5672
//! (`RABBITMQ_URL` overrides). A server that cannot be reached fails the test.

mod common;

use std::sync::Arc;

use helix_messaging_core::Broker;
use helix_messaging_rabbitmq::{RabbitBroker, RabbitConfig};
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

/// The configuration `MESSAGING_BACKEND=rabbitmq` gives with nothing else set (no replay
/// journal, HelixAgent's dead-letter queue), in a vhost of its own: what users get is what
/// the suite proves. Without the journal there is no history, so the history cases skip by
/// capability.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_passes_the_conformance_suite_in_its_default_configuration() {
    let vhost = common::Vhost::new("helix-default");
    let config = RabbitConfig::new(&vhost.0.url()).expect("the vhost's URL");
    assert!(!config.replay_journal, "the journal is off by default");
    let mut suite = Conformance::new("rabbitmq", move || {
        let config = config.clone();
        async move { Ok(Arc::new(RabbitBroker::connect(config).await?) as Arc<dyn Broker>) }
    });
    for case in [
        "read_range_returns_exactly_the_window",
        "new_group_starts_from_earliest",
        "live_messages_stamped_before_a_time_start_arrive",
        "replay_copies_exactly_the_window",
        "replay_skips_duplicate_ids",
        "replay_cancel_stops_within_one_batch",
        "replay_resumes_after_restart_without_duplicates",
    ] {
        suite = suite.expect_skipped(case, "no history without RABBITMQ_REPLAY_JOURNAL");
    }
    suite.run().await.assert_passed();
}

// Quorum queues (`RABBITMQ_QUEUE_TYPE=quorum`) run the suite on a three-node cluster of
// the test's own, in `tests/drill.rs`.
