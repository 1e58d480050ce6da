//! Helpers of the Redis tests. Tests that kill, restart or reconfigure a server use a
//! `PrivateRedis` of the testkit on a free port, never the machine's Redis on 6379.

#![allow(dead_code, unreachable_pub)]

use futures::StreamExt;
use helix_messaging_core::{Delivery, Subscription};
use helix_messaging_redis::{RedisBroker, RedisConfig, RedisMode};
use std::path::PathBuf;
use std::time::Duration;

pub fn temp_dir(what: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "helix-redis-{what}-{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// Longest wait for one expected delivery.
pub const WAIT: Duration = Duration::from_secs(15);

/// The shared server (`REDIS_URL` overrides).
pub fn shared_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// Deletes keys from the shared server when dropped, so a test leaves nothing behind even
/// when it fails.
pub struct DeleteOnDrop(pub Vec<String>);

impl Drop for DeleteOnDrop {
    fn drop(&mut self) {
        delete_keys(&shared_url(), &self.0);
    }
}

/// [`DeleteOnDrop`] for keys on the server and database `.0` names (a URL).
pub struct DeleteOnDropAt(pub String, pub Vec<String>);

impl Drop for DeleteOnDropAt {
    fn drop(&mut self) {
        delete_keys(&self.0, &self.1);
    }
}

fn delete_keys(url: &str, keys: &[String]) {
    if let Ok(mut conn) = redis::Client::open(url).and_then(|c| c.get_connection()) {
        let _: redis::RedisResult<i64> = redis::cmd("DEL").arg(keys).query(&mut conn);
    }
}

/// A broker for `url` in `mode`, with `tune` applied to its settings.
pub async fn broker(
    url: &str,
    mode: RedisMode,
    tune: impl FnOnce(&mut RedisConfig),
) -> RedisBroker {
    let mut config = RedisConfig::new(url, mode).expect("url");
    tune(&mut config);
    RedisBroker::connect(config).await.expect("connect")
}

/// The next delivery, failing the test if none arrives within [`WAIT`] or the stream errs
/// or ends.
pub async fn recv(sub: &mut Subscription) -> Delivery {
    tokio::time::timeout(WAIT, sub.next())
        .await
        .unwrap_or_else(|_| panic!("no delivery on {} within {WAIT:?}", sub.topic()))
        .expect("subscription open")
        .expect("no stream error")
}
