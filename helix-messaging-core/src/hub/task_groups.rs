//! The workers' group of every task queue, created before the first task reaches the broker.
//! On RabbitMQ a publish that no queue is bound for is refused, so without it a task
//! published before the first worker subscribed would be lost (or, drained from the spool,
//! refused).

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use parking_lot::RwLock;

use crate::broker::Broker;
use crate::error::{ErrorKind, Result};
use crate::stack::PublishGuard;

/// The task queues the hub knows of, and whether the workers' group of each exists yet.
#[derive(Debug)]
pub(super) struct TaskQueues {
    group: String,
    created: RwLock<HashMap<String, bool>>,
    /// One creation at a time: two publishes to a new queue at once would both find no
    /// group on Kafka, and the later start position committed could pass the earlier
    /// one's task.
    creating: tokio::sync::Mutex<()>,
}

impl TaskQueues {
    pub(super) fn new(group: &str) -> Self {
        TaskQueues {
            group: group.to_owned(),
            created: RwLock::default(),
            creating: tokio::sync::Mutex::new(()),
        }
    }

    /// Note `queue` as a task queue: its group is created before the next publish to it.
    pub(super) fn expect(&self, queue: &str) {
        if !self.created.read().contains_key(queue) {
            self.created
                .write()
                .entry(queue.to_owned())
                .or_insert(false);
        }
    }

    /// Note `queue` as a task queue whose group a subscription has just created.
    pub(super) fn subscribed(&self, queue: &str) {
        self.created.write().insert(queue.to_owned(), true);
    }

    /// The task queues known so far.
    pub(super) fn names(&self) -> Vec<String> {
        self.created.read().keys().cloned().collect()
    }

    /// Create the group of `topic` on `broker` if it is a task queue whose group is not known
    /// to exist yet. A broker without consumer groups has none to create.
    ///
    /// Only a retryable failure (the broker away, a group still forming) fails the publish,
    /// which is then spooled or retried as any publish would be, and creation is tried again
    /// before the next. Any other (no permission to declare queues, the workers' queue
    /// declared with other arguments) is logged and the task published anyway: the workers'
    /// own declaration stands, and the broker's answer to the publish is what counts.
    async fn ensure(&self, broker: &dyn Broker, topic: &str) -> Result<()> {
        if self.created.read().get(topic) != Some(&false) {
            return Ok(());
        }
        let _one_at_a_time = self.creating.lock().await;
        if self.created.read().get(topic) != Some(&false) {
            return Ok(());
        }
        if broker.capabilities().consumer_groups
            && let Err(err) = broker.create_group(topic, &self.group).await
        {
            if err.is_retryable() {
                return Err(err);
            }
            tracing::warn!(queue = topic, group = %self.group, error = %err, "cannot create the workers' group of this task queue; publishing to it as it is");
        }
        self.created.write().insert(topic.to_owned(), true);
        Ok(())
    }

    /// Create every expected group now; the first failure is returned, and the groups not
    /// created are tried again before their next publish.
    pub(super) async fn create_all(&self, broker: &dyn Broker) -> Result<()> {
        for queue in self.names() {
            self.ensure(broker, &queue).await?;
        }
        Ok(())
    }
}

/// The task side's broker beneath its breaker and spool is guarded by the task queues: a
/// publish to a task queue whose group does not exist yet creates it first, so a publish
/// drained from the spool is covered too. Publishes to any other topic pass untouched.
#[async_trait]
impl PublishGuard for Arc<TaskQueues> {
    async fn before_publish(&self, inner: &dyn Broker, topic: &str) -> Result<()> {
        self.ensure(inner, topic).await
    }

    /// A task refused for good (RabbitMQ: unroutable) means the group is gone (its queue
    /// expired, or an operator deleted it): it is created again before the next publish.
    fn after_publish(&self, topic: &str, failure: Option<&crate::error::Error>) {
        if failure.is_some_and(|err| err.kind() == ErrorKind::Rejected && !err.is_retryable())
            && let Some(created) = self.created.write().get_mut(topic)
        {
            *created = false;
        }
    }
}
