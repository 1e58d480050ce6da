//! The reliability plane under seeded faults on the memory backend: the fallback spool's
//! promise (`HELIX_PLANE_SEEDS=n` runs seeds 1..=n, default 20; `HELIX_PLANE_SEED=s` one), the
//! replay's and the circuit breaker's.

use std::sync::Arc;

use helix_messaging_core::Broker;
use helix_messaging_memory::MemoryBroker;
use helix_messaging_testkit::plane::{
    DlqHarness, ReplayHarness, SpoolHarness, assert_breaker_holds,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_spool_keeps_every_acknowledged_publish_under_faults() {
    SpoolHarness::new("memory", || async {
        Ok(Arc::new(MemoryBroker::new()) as Arc<dyn Broker>)
    })
    .run()
    .await
    .assert_holds();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_killed_and_resumed_under_faults_copies_each_entry_once_in_order() {
    ReplayHarness::new("memory", || async {
        Ok(Arc::new(MemoryBroker::new()) as Arc<dyn Broker>)
    })
    .run()
    .await
    .assert_holds();
}

#[tokio::test(start_paused = true)]
async fn the_breaker_always_resolves_and_never_underflows() {
    assert_breaker_holds().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dlq_delivers_each_entry_once_and_never_undoes_a_discard_under_faults() {
    DlqHarness::new("memory", || async {
        Ok(Arc::new(MemoryBroker::new()) as Arc<dyn Broker>)
    })
    .run()
    .await
    .assert_holds();
}
