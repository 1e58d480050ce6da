//! [`FaultyBroker`]: a broker wrapper whose publishes fail (before the broker saw them or
//! after), come late or are refused, whose deliveries are dropped with the connection or
//! delayed, and whose history entries may read back undecodable, all as a [`FaultSchedule`]
//! says (see the [plane](super) docs). Its own module: every harness of the plane runs its
//! programs through it.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use futures::StreamExt;
use helix_messaging_core::{
    Broker, Capabilities, Error, ErrorKind, Health, HistoryStream, Message, Publisher, Result,
    SubscribeOptions, Subscriber, Subscription, TimeRange,
};
use parking_lot::Mutex;

use super::schedule::{Fault, FaultSchedule, faulted, transient};

/// A broker whose publishes fail as its [`FaultSchedule`] says (see the module docs).
#[derive(Debug, Clone)]
pub struct FaultyBroker {
    inner: Arc<dyn Broker>,
    schedule: FaultSchedule,
    /// When the wrapped broker took each publish, per topic.
    taken: Arc<Mutex<HashMap<String, Vec<tokio::time::Instant>>>>,
}

impl FaultyBroker {
    /// Wrap `inner`.
    pub fn new(inner: Arc<dyn Broker>, schedule: FaultSchedule) -> Self {
        FaultyBroker {
            inner,
            schedule,
            taken: Arc::default(),
        }
    }

    /// When each publish to `topic` that the wrapped broker took (its publish returned
    /// `Ok`, whatever the wrapper then reported) was sent, in order of the broker's answers.
    pub fn taken_at(&self, topic: &str) -> Vec<tokio::time::Instant> {
        self.taken.lock().get(topic).cloned().unwrap_or_default()
    }
}

#[async_trait]
impl Publisher for FaultyBroker {
    async fn publish(&self, topic: &str, message: Message) -> Result<()> {
        if self.schedule.refuses(message.id()) {
            return Err(Error::new(
                ErrorKind::Rejected,
                format!(
                    "injected fault: the broker refuses message {}",
                    message.id()
                ),
            ));
        }
        let fault = self.schedule.next(message.id());
        // Timed when the caller let it go, not when the broker answered: a slow broker
        // must not look like a caller sending too fast.
        let sent = tokio::time::Instant::now();
        let publish = async {
            let published = self.inner.publish(topic, message).await;
            if published.is_ok() {
                self.taken
                    .lock()
                    .entry(topic.to_owned())
                    .or_default()
                    .push(sent);
            }
            published
        };
        faulted(fault, "publish", publish).await
    }

    /// In order, one at a time; a transient fault fails the rest of the batch unsent, as a
    /// lost connection does.
    async fn publish_batch(
        &self,
        topic: &str,
        messages: Vec<Message>,
    ) -> helix_messaging_core::BatchReport {
        let total = messages.len();
        let mut failures = Vec::new();
        let mut lost: Option<Error> = None;
        for (index, message) in messages.into_iter().enumerate() {
            if let Some(err) = &lost {
                failures.push((index, err.copy_without_source()));
                continue;
            }
            if let Err(err) = self.publish(topic, message).await {
                if err.kind() == ErrorKind::Connection {
                    lost = Some(err.copy_without_source());
                }
                failures.push((index, err));
            }
        }
        helix_messaging_core::BatchReport::new(total, failures)
    }
}

#[async_trait]
impl Subscriber for FaultyBroker {
    /// The wrapped broker's subscription, whose deliveries the schedule may drop with the
    /// connection (the delivery goes back to the broker, requeued, and the stream reports the
    /// loss and keeps going, as the adapters do) or delay.
    async fn subscribe(&self, topic: &str, options: SubscribeOptions) -> Result<Subscription> {
        let inner = self.inner.subscribe(topic, options).await?;
        let (name, group, system) = (
            Arc::<str>::from(inner.topic()),
            inner.group().map(Arc::<str>::from),
            inner.system(),
        );
        let schedule = self.schedule.clone();
        let key = format!("a delivery on {topic}");
        let deliveries = inner.then(move |item| {
            let fault = match &item {
                Ok(_) => schedule.next(&key),
                Err(_) => Fault::Pass,
            };
            async move {
                match (fault, item) {
                    (Fault::Transient | Fault::AfterTheFact, Ok(delivery)) => {
                        let _ = delivery.nack(true).await;
                        Err(transient("a subscription"))
                    }
                    (Fault::Delay(by), item) => {
                        tokio::time::sleep(by).await;
                        item
                    }
                    (_, item) => item,
                }
            }
        });
        let subscription = Subscription::new(name, group, Box::pin(deliveries));
        Ok(match system {
            Some(system) => subscription.with_system(system),
            None => subscription,
        })
    }
}

#[async_trait]
impl Broker for FaultyBroker {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    async fn health(&self) -> Health {
        self.inner.health().await
    }

    /// The wrapped broker's history, with the entries the schedule makes undecodable read
    /// back as [`ErrorKind::Serialization`] errors.
    async fn read_range(&self, topic: &str, range: TimeRange) -> Result<HistoryStream> {
        let schedule = self.schedule.clone();
        let entries = self.inner.read_range(topic, range).await?;
        Ok(Box::pin(entries.map(move |entry| match entry {
            Ok(entry) if schedule.undecodable(entry.message.id()) => Err(Error::new(
                ErrorKind::Serialization,
                format!(
                    "injected fault: the entry of {} cannot be decoded",
                    entry.message.id()
                ),
            )),
            other => other,
        })))
    }

    async fn backlog(&self, topic: &str, group: &str) -> Result<helix_messaging_core::Backlog> {
        self.inner.backlog(topic, group).await
    }

    fn group_address(&self, topic: &str, group: &str) -> helix_messaging_core::GroupAddress {
        self.inner.group_address(topic, group)
    }

    async fn create_group(&self, topic: &str, group: &str) -> Result<()> {
        self.inner.create_group(topic, group).await
    }

    async fn close(&self) -> Result<()> {
        self.inner.close().await
    }
}
