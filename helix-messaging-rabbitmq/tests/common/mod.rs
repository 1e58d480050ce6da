//! Settings every RabbitMQ test uses: the real server on 127.0.0.1:5672 (`RABBITMQ_URL`
//! overrides).

#![allow(dead_code, unreachable_pub, unused_imports)]

use std::time::Duration;

use futures::StreamExt;
use helix_messaging_core::{Delivery, Subscription};
use helix_messaging_rabbitmq::RabbitConfig;

/// The adapter's log in the test output (`RUST_LOG` overrides): its reconnects and
/// re-created consumers, so a failure shows what supervision was doing.
pub fn log_to_test_output() {
    helix_messaging_testkit::log_to_test_output("helix_messaging_rabbitmq=info");
}

/// Test settings for the server at `url`.
fn config_for(url: &str) -> RabbitConfig {
    let mut config = RabbitConfig::new(url).expect("RABBITMQ_URL");
    // Queues of the tests' random groups remove themselves once unused.
    config.group_queue_expires = Some(Duration::from_secs(30));
    // Rejected test messages stay out of HelixAgent's dead-letter queue.
    config.dead_letter_queue = Some("hm-test.dlq".into());
    config
}

/// The shared server's default vhost.
pub fn config() -> RabbitConfig {
    config_for(&url())
}

/// The shared server's URL, its default vhost (`RABBITMQ_URL` overrides).
pub fn url() -> String {
    std::env::var("RABBITMQ_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

use helix_messaging_testkit::faults::TestVhost;
pub use helix_messaging_testkit::faults::rabbitmqctl;

/// A vhost of the test's own, deleted afterwards.
pub struct Vhost(pub TestVhost);

impl Vhost {
    pub fn new(prefix: &str) -> Vhost {
        Vhost(TestVhost::new(prefix))
    }

    /// The vhost's name.
    pub fn name(&self) -> &str {
        &self.0.0
    }

    /// Test settings for this vhost, with the backend's default dead-letter queue (the
    /// vhost keeps it apart from everything else).
    pub fn config(&self) -> RabbitConfig {
        let mut config = config_for(&self.0.url());
        config.dead_letter_queue = Some(helix_messaging_rabbitmq::HELIXAGENT_DLQ.into());
        config
    }

    /// [`Vhost::config`] with the replay journal on: the journal then holds only this
    /// vhost's traffic, and goes away with it.
    pub fn journal_config(&self) -> RabbitConfig {
        let mut config = self.config();
        config.replay_journal = true;
        config
    }
}

/// The next delivery, failing the test if none arrives within 10 s or the stream errs or ends.
pub async fn recv(sub: &mut Subscription) -> Delivery {
    tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .unwrap_or_else(|_| panic!("no delivery on {} within 10 s", sub.topic()))
        .expect("subscription open")
        .expect("no stream error")
}
