//! Shared by the core's integration tests: a memory broker with a publishing path of the
//! test's own, and waiting for a redrive job.

use std::time::Duration;

use helix_messaging_core::dlq::{Processor, RedriveProgress};

/// Implement [`Subscriber`](helix_messaging_core::Subscriber) and
/// [`Broker`](helix_messaging_core::Broker) for `$wrapper`, a tuple struct over a
/// `MemoryBroker`, by handing every call to the memory broker: the test writes only the
/// `Publisher` it is about.
macro_rules! memory_underneath {
    ($wrapper:ty) => {
        #[helix_messaging_core::async_trait]
        impl helix_messaging_core::Subscriber for $wrapper {
            async fn subscribe(
                &self,
                topic: &str,
                options: helix_messaging_core::SubscribeOptions,
            ) -> helix_messaging_core::Result<helix_messaging_core::Subscription> {
                self.0.subscribe(topic, options).await
            }
        }

        #[helix_messaging_core::async_trait]
        impl helix_messaging_core::Broker for $wrapper {
            fn name(&self) -> &'static str {
                self.0.name()
            }

            fn capabilities(&self) -> helix_messaging_core::Capabilities {
                self.0.capabilities()
            }

            async fn health(&self) -> helix_messaging_core::Health {
                self.0.health().await
            }

            async fn read_range(
                &self,
                topic: &str,
                range: helix_messaging_core::TimeRange,
            ) -> helix_messaging_core::Result<helix_messaging_core::HistoryStream> {
                self.0.read_range(topic, range).await
            }

            async fn close(&self) -> helix_messaging_core::Result<()> {
                self.0.close().await
            }
        }
    };
}
pub(crate) use memory_underneath;

/// The redrive job `id`'s progress once it has finished; fails the test if it has not
/// within `within`.
pub(crate) async fn redrive_finished(
    processor: &Processor,
    id: &str,
    within: Duration,
) -> RedriveProgress {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let progress = processor.redrive_progress(id).unwrap();
        if progress.status.is_finished() {
            return progress;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still {:?} {within:?} later",
            progress.status
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
