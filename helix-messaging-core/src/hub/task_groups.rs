//! The workers' group of every task queue, created before the first task reaches the broker.
//! On RabbitMQ a publish that no queue is bound for is refused, so without it a task
//! published before the first worker subscribed would be lost (or, drained from the spool,
//! refused).

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use parking_lot::RwLock;

use crate::broker::{
    Backlog, BatchReport, Broker, Health, HistoryStream, Publisher, SubscribeOptions, Subscriber,
    Subscription, TimeRange,
};
use crate::capabilities::Capabilities;
use crate::error::Result;
use crate::message::Message;

/// The task queues the hub knows of, and whether the workers' group of each exists yet.
#[derive(Debug)]
pub(super) struct TaskQueues {
    group: String,
    created: RwLock<HashMap<String, bool>>,
}

impl TaskQueues {
    pub(super) fn new(group: &str) -> Self {
        TaskQueues {
            group: group.to_owned(),
            created: RwLock::default(),
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
    async fn ensure(&self, broker: &dyn Broker, topic: &str) -> Result<()> {
        if self.created.read().get(topic) != Some(&false) {
            return Ok(());
        }
        if broker.capabilities().consumer_groups {
            broker.create_group(topic, &self.group).await?;
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

/// The task side's broker beneath its breaker and spool: a publish to a task queue whose
/// group does not exist yet creates it first, so a publish drained from the spool is
/// covered too. Publishes to any other topic pass untouched.
#[derive(Debug)]
pub(super) struct TaskGroupBroker {
    pub(super) inner: Arc<dyn Broker>,
    pub(super) queues: Arc<TaskQueues>,
}

#[async_trait]
impl Publisher for TaskGroupBroker {
    async fn publish(&self, topic: &str, message: Message) -> Result<()> {
        self.queues.ensure(&*self.inner, topic).await?;
        self.inner.publish(topic, message).await
    }

    async fn publish_batch(&self, topic: &str, messages: Vec<Message>) -> BatchReport {
        match self.queues.ensure(&*self.inner, topic).await {
            Ok(()) => self.inner.publish_batch(topic, messages).await,
            Err(err) => BatchReport::all_failed(messages.len(), &err),
        }
    }
}

#[async_trait]
impl Subscriber for TaskGroupBroker {
    async fn subscribe(&self, topic: &str, options: SubscribeOptions) -> Result<Subscription> {
        self.inner.subscribe(topic, options).await
    }
}

#[async_trait]
impl Broker for TaskGroupBroker {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    async fn health(&self) -> Health {
        self.inner.health().await
    }

    async fn read_range(&self, topic: &str, range: TimeRange) -> Result<HistoryStream> {
        self.inner.read_range(topic, range).await
    }

    async fn backlog(&self, topic: &str, group: &str) -> Result<Backlog> {
        self.inner.backlog(topic, group).await
    }

    fn group_address(&self, topic: &str, group: &str) -> crate::broker::GroupAddress {
        self.inner.group_address(topic, group)
    }

    async fn create_group(&self, topic: &str, group: &str) -> Result<()> {
        self.inner.create_group(topic, group).await
    }

    async fn close(&self) -> Result<()> {
        self.inner.close().await
    }
}
