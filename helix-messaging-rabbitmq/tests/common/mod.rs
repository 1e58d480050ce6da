//! Settings every RabbitMQ test uses: the real server on 127.0.0.1:5672 (`RABBITMQ_URL`
//! overrides).

#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use futures::StreamExt;
use helix_messaging_core::{Delivery, Subscription};
use helix_messaging_rabbitmq::RabbitConfig;

pub fn config() -> RabbitConfig {
    let url = std::env::var("RABBITMQ_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let mut config = RabbitConfig::new(&url).expect("RABBITMQ_URL");
    // Queues of the tests' random groups remove themselves once unused.
    config.group_queue_expires = Some(Duration::from_secs(30));
    config
}

/// The next delivery, failing the test if none arrives within 10 s or the stream errs or ends.
pub async fn recv(sub: &mut Subscription) -> Delivery {
    tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .unwrap_or_else(|_| panic!("no delivery on {} within 10 s", sub.topic()))
        .expect("subscription open")
        .expect("no stream error")
}
