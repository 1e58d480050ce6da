//! Helpers shared by the DLQ tests: the embedded broker, fresh names, waiting and receiving,
//! the SQLite file, a consumer that dead-letters everything and the processor's settings.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use futures::StreamExt;
use helix_messaging::dlq::{
    DeadLetterConfig, DeadLetterLayer, DeadLetterQueue, DeadLetterReason, ProcessorConfig,
};
use helix_messaging::retry::{RetryLayer, RetryPolicy};
use helix_messaging::{Broker, Envelope, HandlerError, Runner, Subscription, handler_fn};

pub(crate) const WAIT: Duration = Duration::from_secs(15);

pub(crate) async fn broker() -> Arc<dyn Broker> {
    helix_messaging::connect("memory://")
        .await
        .expect("memory broker")
}

pub(crate) fn name(what: &str) -> String {
    helix_messaging_testkit::fresh_name(what)
}

pub(crate) async fn eventually<T, Fut>(what: &str, check: impl FnMut() -> Fut) -> T
where
    Fut: std::future::Future<Output = Option<T>>,
{
    helix_messaging_testkit::eventually(WAIT, what, check).await
}

pub(crate) async fn recv(sub: &mut Subscription) -> helix_messaging::Delivery {
    tokio::time::timeout(WAIT, sub.next())
        .await
        .unwrap_or_else(|_| panic!("no delivery on {} within {WAIT:?}", sub.topic()))
        .expect("open")
        .expect("no stream error")
}

pub(crate) fn in_file(dir: &tempfile::TempDir) -> std::path::PathBuf {
    dir.path().join("dlq.sqlite")
}

/// Dead-letters every message of `topic` in group `workers` (no retries) into `dlq_topic`.
pub(crate) async fn failing_consumer(
    broker: &Arc<dyn Broker>,
    topic: &str,
    dlq_topic: &str,
    reason: DeadLetterReason,
) -> (Runner, Arc<AtomicU32>) {
    let calls = Arc::new(AtomicU32::new(0));
    let counted = calls.clone();
    let runner = Runner::builder(broker.clone(), topic)
        .group("workers")
        .layer(DeadLetterLayer::new(DeadLetterQueue::new(
            broker.clone(),
            DeadLetterConfig::new(dlq_topic).unwrap(),
        )))
        .layer(RetryLayer::new(RetryPolicy::new().with_max_retries(0)).unwrap())
        .start(handler_fn(move |_envelope: Envelope| {
            let counted = counted.clone();
            async move {
                counted.fetch_add(1, Ordering::SeqCst);
                let err = HandlerError::transient(std::io::Error::other("downstream is down"));
                Err(if reason == DeadLetterReason::MaxRetriesExceeded {
                    err
                } else {
                    err.with_reason(reason)
                })
            }
        }))
        .await
        .unwrap();
    (runner, calls)
}

pub(crate) fn processor_config(dlq_topic: &str) -> ProcessorConfig {
    ProcessorConfig {
        topics: vec![dlq_topic.to_owned()],
        poll_interval: Duration::from_millis(50),
        retry_delay: Duration::from_millis(100),
        max_retry_delay: Duration::from_millis(200),
        max_retries: 2,
        ..ProcessorConfig::default()
    }
}
