//! Both Redis modes against the memory reference: seeded programs of publishes, acks,
//! requeues, rejects and consumer crashes (`HELIX_DIFFERENTIAL_SEEDS=n` runs seeds 1..=n,
//! `HELIX_DIFFERENTIAL_SEED=s` one seed).

use std::sync::Arc;

use helix_messaging_core::Broker;
use helix_messaging_redis::{RedisBroker, RedisConfig, RedisMode};
use helix_messaging_testkit::Differential;

/// What `MESSAGING_BACKEND=redis-streams` (or `redis`) gives with nothing else set.
fn config(mode: RedisMode) -> RedisConfig {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    RedisConfig::new(&url, mode).expect("REDIS_URL")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_streams_agree_with_the_memory_reference() {
    Differential::new("redis-streams", || async {
        Ok(Arc::new(RedisBroker::connect(config(RedisMode::Streams)).await?) as Arc<dyn Broker>)
    })
    .run()
    .await
    .assert_agrees();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_pubsub_agrees_with_the_memory_reference() {
    Differential::new("redis", || async {
        Ok(Arc::new(RedisBroker::connect(config(RedisMode::PubSub)).await?) as Arc<dyn Broker>)
    })
    .run()
    .await
    .assert_agrees();
}
