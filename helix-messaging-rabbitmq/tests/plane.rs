//! The reliability plane under seeded faults on RabbitMQ: the spool in its default
//! configuration, replay with the replay journal on, which replay needs (`HELIX_PLANE_SEEDS=n`
//! runs seeds 1..=n, default 20; `HELIX_PLANE_SEED=s` one seed).

mod common;

use std::sync::Arc;

use helix_messaging_core::Broker;
use helix_messaging_rabbitmq::RabbitBroker;
use helix_messaging_testkit::plane::{DlqHarness, ReplayHarness, SpoolHarness};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_spool_keeps_every_acknowledged_publish_under_faults() {
    SpoolHarness::new("rabbitmq", || async {
        Ok(Arc::new(RabbitBroker::connect(common::config()).await?) as Arc<dyn Broker>)
    })
    .run()
    .await
    .assert_holds();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_killed_and_resumed_under_faults_copies_each_entry_once_in_order() {
    // A vhost of its own: the journal is read from its start.
    let vhost = common::Vhost::new("helix-plane-replay");
    let config = vhost.journal_config();
    ReplayHarness::new("rabbitmq", move || {
        let config = config.clone();
        async move { Ok(Arc::new(RabbitBroker::connect(config).await?) as Arc<dyn Broker>) }
    })
    .run()
    .await
    .assert_holds();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dlq_delivers_each_entry_once_and_never_undoes_a_discard_under_faults() {
    // The copies are counted in the journal, read from the vhost's start.
    let vhost = common::Vhost::new("helix-plane-dlq");
    let config = vhost.journal_config();
    DlqHarness::new("rabbitmq", move || {
        let config = config.clone();
        async move { Ok(Arc::new(RabbitBroker::connect(config).await?) as Arc<dyn Broker>) }
    })
    .run()
    .await
    .assert_holds();
}
