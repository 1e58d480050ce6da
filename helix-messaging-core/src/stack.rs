//! Broker wrappers, built one way and stacked in one order.
//!
//! A [`BrokerLayer`] wraps a broker in another that adds one concern, the way tower's
//! `Layer` wraps a service:
//!
//! | layer | makes | adds |
//! |---|---|---|
//! | [`ObserveLayer`](crate::observe::ObserveLayer) | [`ObservedBroker`](crate::observe::ObservedBroker) | metrics, publish spans, backlog gauges |
//! | [`BreakerLayer`](crate::breaker::BreakerLayer) | [`BreakerBroker`](crate::breaker::BreakerBroker) | a circuit breaker on publishing and one on consuming |
//! | [`FallbackLayer`](crate::fallback::FallbackLayer) | [`FallbackBroker`](crate::fallback::FallbackBroker) | its own breaker, and a spool while that breaker is open |
//!
//! [`Guarded`] wraps a broker with a [`PublishGuard`] asked before each publish and group
//! creation: the hub's task queues use it, and so can a test's fault switch.
//!
//! [`LazyBroker`](crate::lazy::LazyBroker) is no layer but a root: it stands in for the
//! adapter while the adapter connects in the background.
//!
//! **The order**, innermost first, as the hub builds each of its sides:
//!
//! 1. the adapter, or a `LazyBroker` connecting it;
//! 2. [`ObserveLayer`](crate::observe::ObserveLayer): beneath the breaker and the spool, so a
//!    publish is counted when the broker takes it (a spooled one when it is forwarded), and
//!    a breaker's fast failures are not counted as the broker's;
//! 3. on the task side, a [`Guarded`] broker that creates each task queue's workers' group
//!    before the first task reaches it: beneath the spool, so a task drained from the spool
//!    finds its group too;
//! 4. [`BreakerLayer`](crate::breaker::BreakerLayer) or, with a spool,
//!    [`FallbackLayer`](crate::fallback::FallbackLayer), which brings its breaker along: the
//!    breaker's state is what decides that a publish goes to the spool.
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use std::sync::Arc;
//!
//! use helix_messaging_core::breaker::{BreakerConfig, BreakerLayer};
//! use helix_messaging_core::fallback::{FallbackLayer, MemorySpool};
//! use helix_messaging_core::observe::ObserveLayer;
//! use helix_messaging_core::stack::BrokerLayer;
//! use helix_messaging_core::{Broker, Message, Publisher};
//! use helix_messaging_memory::MemoryBroker;
//!
//! let adapter: Arc<dyn Broker> = Arc::new(MemoryBroker::new());
//! let observed = Arc::new(ObserveLayer::new().wrap(adapter).await?);
//! // Without a spool:
//! let guarded = BreakerLayer::new(BreakerConfig::default()).wrap(observed.clone()).await?;
//! guarded.publish("orders", Message::new("one")).await?;
//! // With one:
//! let spooled = FallbackLayer::new(Arc::new(MemorySpool::default()))
//!     .wrap(observed)
//!     .await?;
//! spooled.publish("orders", Message::new("two")).await?;
//! # spooled.close().await?;
//! # Ok::<(), helix_messaging_core::Error>(())
//! # }).unwrap();
//! ```

use std::sync::Arc;

use async_trait::async_trait;

use crate::broker::Broker;
use crate::error::{Error, Result};

/// Wraps a broker in another that adds one concern (see the [module doc](self) for the
/// layers and the order they stack in).
#[async_trait]
pub trait BrokerLayer: Send + Sync {
    /// The broker it makes; [`wrap`](Self::wrap) returns it by type, so what the wrapper
    /// offers beyond [`Broker`] (a breaker's state, a spool's figures) stays reachable.
    type Wrapped: Broker;

    /// `inner`, wrapped.
    ///
    /// # Errors
    /// The layer's own: [`ErrorKind::InvalidInput`](crate::ErrorKind::InvalidInput) for a bad
    /// configuration, a spool's error reading what it holds.
    async fn wrap(&self, inner: Arc<dyn Broker>) -> Result<Self::Wrapped>;
}

/// A check a [`Guarded`] broker makes before a publish, or a group's creation, reaches the
/// broker it wraps: creating what the publish needs first, or refusing it.
#[async_trait]
pub trait PublishGuard: Send + Sync + std::fmt::Debug {
    /// Before a publish (or a batch) to `topic` reaches `inner`.
    ///
    /// # Errors
    /// Whatever refuses the publish: it then fails unsent, with this error.
    async fn before_publish(&self, inner: &dyn Broker, topic: &str) -> Result<()>;

    /// After a publish (or a batch) to `topic` was answered, with the first failure, if any.
    /// By default nothing.
    fn after_publish(&self, topic: &str, failure: Option<&Error>) {
        let _ = (topic, failure);
    }

    /// Before [`Broker::create_group`] on `topic` reaches `inner`. By default nothing.
    ///
    /// # Errors
    /// Whatever refuses the creation.
    async fn before_create_group(&self, inner: &dyn Broker, topic: &str) -> Result<()> {
        let _ = (inner, topic);
        Ok(())
    }
}

/// A broker that asks its [`PublishGuard`] before each publish and group creation, and
/// passes everything else to the broker it wraps as it is.
#[derive(Debug)]
pub struct Guarded<G> {
    inner: Arc<dyn Broker>,
    guard: G,
}

impl<G: PublishGuard> Guarded<G> {
    /// `inner`, guarded by `guard`.
    pub fn new(inner: Arc<dyn Broker>, guard: G) -> Self {
        Guarded { inner, guard }
    }

    /// The guard.
    pub fn guard(&self) -> &G {
        &self.guard
    }
}

#[async_trait]
impl<G: PublishGuard> crate::broker::Publisher for Guarded<G> {
    async fn publish(&self, topic: &str, message: crate::message::Message) -> Result<()> {
        self.guard.before_publish(&*self.inner, topic).await?;
        let published = self.inner.publish(topic, message).await;
        self.guard.after_publish(topic, published.as_ref().err());
        published
    }

    async fn publish_batch(
        &self,
        topic: &str,
        messages: Vec<crate::message::Message>,
    ) -> crate::broker::BatchReport {
        match self.guard.before_publish(&*self.inner, topic).await {
            Ok(()) => {
                let report = self.inner.publish_batch(topic, messages).await;
                self.guard
                    .after_publish(topic, report.failures().first().map(|(_, err)| err));
                report
            }
            Err(err) => crate::broker::BatchReport::all_failed(messages.len(), &err),
        }
    }
}

#[async_trait]
impl<G: PublishGuard> crate::broker::Subscriber for Guarded<G> {
    async fn subscribe(
        &self,
        topic: &str,
        options: crate::broker::SubscribeOptions,
    ) -> Result<crate::broker::Subscription> {
        self.inner.subscribe(topic, options).await
    }
}

#[async_trait]
impl<G: PublishGuard> Broker for Guarded<G> {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn capabilities(&self) -> crate::capabilities::Capabilities {
        self.inner.capabilities()
    }

    async fn health(&self) -> crate::broker::Health {
        self.inner.health().await
    }

    async fn read_range(
        &self,
        topic: &str,
        range: crate::broker::TimeRange,
    ) -> Result<crate::broker::HistoryStream> {
        self.inner.read_range(topic, range).await
    }

    async fn backlog(&self, topic: &str, group: &str) -> Result<crate::broker::Backlog> {
        self.inner.backlog(topic, group).await
    }

    fn group_address(&self, topic: &str, group: &str) -> crate::broker::GroupAddress {
        self.inner.group_address(topic, group)
    }

    async fn create_group(&self, topic: &str, group: &str) -> Result<()> {
        self.guard.before_create_group(&*self.inner, topic).await?;
        self.inner.create_group(topic, group).await
    }

    async fn close(&self) -> Result<()> {
        self.inner.close().await
    }
}
