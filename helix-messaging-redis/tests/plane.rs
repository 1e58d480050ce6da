//! The reliability plane under seeded faults on Redis Streams, in the configuration
//! `from_env()` builds by default (`HELIX_PLANE_SEEDS=n` runs seeds 1..=n, default 20;
//! `HELIX_PLANE_SEED=s` one seed).

use std::sync::Arc;

use helix_messaging_core::Broker;
use helix_messaging_redis::{RedisBroker, RedisConfig, RedisMode};
use helix_messaging_testkit::plane::{DlqHarness, ReplayHarness, SpoolHarness};

async fn streams() -> helix_messaging_core::Result<Arc<dyn Broker>> {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let config = RedisConfig::new(&url, RedisMode::Streams)?;
    Ok(Arc::new(RedisBroker::connect(config).await?) as Arc<dyn Broker>)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_spool_keeps_every_acknowledged_publish_under_faults_on_streams() {
    SpoolHarness::new("redis-streams", streams)
        .run()
        .await
        .assert_holds();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_killed_and_resumed_under_faults_copies_each_entry_once_in_order() {
    ReplayHarness::new("redis-streams", streams)
        .run()
        .await
        .assert_holds();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dlq_delivers_each_entry_once_and_never_undoes_a_discard_under_faults_on_streams() {
    DlqHarness::new("redis-streams", streams)
        .run()
        .await
        .assert_holds();
}
