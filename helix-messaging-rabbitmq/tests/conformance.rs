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

/// `RABBITMQ_QUEUE_TYPE=quorum`, the replicated queue type (what the documents'
/// `RABBITMQ_HA_MODE` asked of classic mirrored queues, which RabbitMQ removed): every group
/// queue the suite makes is a quorum queue, and the suite passes on them. Quorum queues on
/// 3.10 take no priority, so the capability says so and the priority case skips.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_with_quorum_queues_passes_the_conformance_suite() {
    let vhost = common::Vhost::new("helix-quorum");
    let url = vhost.0.url();
    let config = RabbitConfig::from_vars(helix_messaging_testkit::env_lookup(&[
        ("RABBITMQ_URL", url.as_str()),
        ("RABBITMQ_QUEUE_TYPE", "quorum"),
        // Every case but priority applies, the history ones read from the journal.
        ("RABBITMQ_REPLAY_JOURNAL", "true"),
    ]))
    .unwrap();
    assert!(
        !config.capabilities().priority,
        "quorum queues have no priority on 3.10"
    );
    Conformance::new("rabbitmq-quorum", move || {
        let config = config.clone();
        async move { Ok(Arc::new(RabbitBroker::connect(config).await?) as Arc<dyn Broker>) }
    })
    .expect_skipped(
        "priority_order",
        "quorum queues take no priority on RabbitMQ 3.10",
    )
    .run()
    .await
    .assert_passed();
    // Every group queue the suite declared is a quorum queue; private ones (a subscription
    // without a group, gone with it) and the backend's own queues stay classic.
    let listed = common::rabbitmqctl(&[
        "list_queues",
        "-p",
        vhost.name(),
        "name",
        "type",
        "--no-table-headers",
        "--quiet",
    ]);
    let mut groups = 0;
    for line in listed.lines() {
        let mut fields = line.split_whitespace();
        let (Some(name), Some(kind)) = (fields.next(), fields.next()) else {
            continue;
        };
        // A private queue, a delayed requeue's retry queue, the dead-letter queue.
        let backend_own = name.contains(".private-")
            || name.contains(".retry.")
            || name.starts_with("helixagent.");
        if !backend_own {
            groups += 1;
            assert_eq!(kind, "quorum", "{name} is a {kind} queue");
        }
    }
    assert!(groups > 10, "the suite declared group queues:\n{listed}");
}
