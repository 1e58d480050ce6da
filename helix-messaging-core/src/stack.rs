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
//! [`LazyBroker`](crate::lazy::LazyBroker) is no layer but a root: it stands in for the
//! adapter while the adapter connects in the background.
//!
//! **The order**, innermost first, as the hub builds each of its sides:
//!
//! 1. the adapter, or a `LazyBroker` connecting it;
//! 2. [`ObserveLayer`](crate::observe::ObserveLayer): beneath the breaker and the spool, so a
//!    publish is counted when the broker takes it (a spooled one when it is forwarded), and
//!    a breaker's fast failures are not counted as the broker's;
//! 3. [`BreakerLayer`](crate::breaker::BreakerLayer) or, with a spool,
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
use crate::error::Result;

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
