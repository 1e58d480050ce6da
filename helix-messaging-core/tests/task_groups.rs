//! The hub creates a task queue's workers' group before the first task reaches the broker;
//! a creation that fails for good does not stop the task, one that fails for now fails the
//! publish (spooled or retried like any) and is tried again.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use async_trait::async_trait;
use helix_messaging_core::hub::{Hub, HubConfig, Task};
use helix_messaging_core::stack::{Guarded, PublishGuard};
use helix_messaging_core::{Broker, Error, ErrorKind, Result};
use helix_messaging_memory::MemoryBroker;

/// Refuses to create groups: for good (no permission) or for now (`retryable`), counting
/// the attempts.
#[derive(Debug)]
struct RefusesGroups {
    retryable: bool,
    refusing: AtomicBool,
    attempts: AtomicUsize,
}

#[async_trait]
impl PublishGuard for RefusesGroups {
    async fn before_publish(&self, _inner: &dyn Broker, _topic: &str) -> Result<()> {
        Ok(())
    }

    async fn before_create_group(&self, _inner: &dyn Broker, _topic: &str) -> Result<()> {
        self.attempts.fetch_add(1, Ordering::SeqCst);
        if self.refusing.load(Ordering::SeqCst) {
            let kind = if self.retryable {
                ErrorKind::Connection
            } else {
                ErrorKind::Config
            };
            return Err(Error::new(kind, "creating groups refused"));
        }
        Ok(())
    }
}

async fn hub_over(retryable: bool) -> (Hub, Arc<Guarded<RefusesGroups>>) {
    let broker = Arc::new(Guarded::new(
        Arc::new(MemoryBroker::new()),
        RefusesGroups {
            retryable,
            refusing: AtomicBool::new(true),
            attempts: AtomicUsize::new(0),
        },
    ));
    let as_dyn: Arc<dyn Broker> = broker.clone();
    let hub = Hub::new(HubConfig::default(), as_dyn.clone(), as_dyn, None)
        .await
        .unwrap();
    (hub, broker)
}

#[tokio::test]
async fn a_group_that_cannot_be_created_for_good_does_not_stop_the_task() {
    let (hub, broker) = hub_over(false).await;
    let task = Task::new("t", serde_json::json!({}));
    hub.publish_task("q", &task)
        .await
        .expect("published anyway");
    hub.publish_task("q", &task).await.unwrap();
    assert_eq!(
        broker.guard().attempts.load(Ordering::SeqCst),
        1,
        "tried once, not before every publish"
    );
}

#[tokio::test]
async fn a_group_that_cannot_be_created_for_now_fails_the_publish_and_is_tried_again() {
    let (hub, broker) = hub_over(true).await;
    let task = Task::new("t", serde_json::json!({}));
    let err = hub.publish_task("q", &task).await.unwrap_err();
    assert!(err.is_retryable(), "{err}");
    broker.guard().refusing.store(false, Ordering::SeqCst);
    hub.publish_task("q", &task)
        .await
        .expect("created, then published");
    assert_eq!(broker.guard().attempts.load(Ordering::SeqCst), 2);
    let invalid = hub.publish_task("not a queue", &task).await.unwrap_err();
    assert_eq!(invalid.kind(), ErrorKind::InvalidInput);
    assert!(
        hub.queues().iter().all(|q| q.topic != "not a queue"),
        "an invalid name is not listed"
    );
}
