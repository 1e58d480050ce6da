//! helix-messaging: one messaging API over RabbitMQ, Kafka, Redis and an in-memory broker.
//!
//! Pick the backend with Cargo features (`memory` is the default) and at run time with
//! `MESSAGING_BACKEND`; everything above the broker works with `Arc<dyn Broker>`.
//!
//! ```
//! use futures::StreamExt;
//! use helix_messaging::{Message, SubscribeOptions};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> helix_messaging::Result<()> {
//! let broker = helix_messaging::connect("memory://").await?;
//! let mut tasks = broker.subscribe("helixagent.tasks.background", SubscribeOptions::group("workers")).await?;
//! broker.publish("helixagent.tasks.background", Message::new("reindex").with_priority(5)).await?;
//! let delivery = tasks.next().await.expect("a delivery")?;
//! delivery.ack().await?;
//! # Ok(()) }
//! ```

mod backends;
mod hub_env;
pub mod logging;

pub use backends::{BACKEND_VAR, BackendInfo, KNOWN_BACKENDS, capability_table, compiled_backends};
pub use helix_messaging_core::*;
pub use hub_env::{
    BACKLOG_INTERVAL_MS_VAR, BREAKER_FAILURES_VAR, BREAKER_OPEN_MS_VAR, ENABLED_VAR,
    EVENT_BACKEND_VAR, FALLBACK_DIR_VAR, FALLBACK_MAX_BYTES_VAR, FALLBACK_MAX_MESSAGES_VAR,
    FALLBACK_VAR, GROUP_VAR, TASK_BACKEND_VAR, TASK_QUEUES_VAR, hub_from_env, hub_from_vars,
};

/// The durable stores (features `sqlite`, the default, and `postgres`), also re-exported
/// in [`dlq`], [`replay`] and [`fallback`] beside the traits they implement.
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub use helix_messaging_store as store;

/// Dead-lettering: [`DeadLetterLayer`](dlq::DeadLetterLayer), the [`Processor`](dlq::Processor)
/// and its stores, in memory, in SQLite (feature `sqlite`) and in PostgreSQL (feature
/// `postgres`). See [`helix_messaging_core::dlq`] for how the pieces fit.
pub mod dlq {
    pub use helix_messaging_core::dlq::*;
    #[cfg(feature = "postgres")]
    pub use helix_messaging_store::PostgresDeadLetterStore;
    #[cfg(feature = "sqlite")]
    pub use helix_messaging_store::SqliteDeadLetterStore;
}

/// Replay of a time range of a topic, with its record stores in memory, in SQLite (feature
/// `sqlite`) and in PostgreSQL (feature `postgres`). See [`helix_messaging_core::replay`].
pub mod replay {
    pub use helix_messaging_core::replay::*;
    #[cfg(feature = "postgres")]
    pub use helix_messaging_store::PostgresReplayStore;
    #[cfg(feature = "sqlite")]
    pub use helix_messaging_store::SqliteReplayStore;
}

/// The fallback spool, in memory or in SQLite (feature `sqlite`). See
/// [`helix_messaging_core::fallback`].
pub mod fallback {
    pub use helix_messaging_core::fallback::*;
    #[cfg(feature = "sqlite")]
    pub use helix_messaging_store::SqliteSpool;
}

/// The HTTP admin API (feature `admin`).
#[cfg(feature = "admin")]
pub use helix_messaging_admin as admin;
#[cfg(feature = "kafka")]
pub use helix_messaging_kafka as kafka;
#[cfg(feature = "memory")]
pub use helix_messaging_memory as memory;
#[cfg(feature = "rabbitmq")]
pub use helix_messaging_rabbitmq as rabbitmq;
#[cfg(feature = "redis")]
pub use helix_messaging_redis as redis;

use std::sync::Arc;

/// Build the broker `MESSAGING_BACKEND` names (default `memory`), configured from the
/// backend's own environment variables.
///
/// # Errors
/// [`ErrorKind::Config`] for an unknown backend (listing the compiled-in ones), for a backend
/// whose Cargo feature is off (naming the feature), or for malformed backend variables (naming
/// the variable); connection errors from the backend.
pub async fn from_env() -> Result<Arc<dyn Broker>> {
    from_vars(|name| std::env::var(name).ok()).await
}

/// [`from_env`] reading variables through `lookup` instead of the process environment (for
/// configuration from another source, and for tests).
///
/// # Errors
/// As [`from_env`].
pub async fn from_vars(lookup: impl Fn(&str) -> Option<String>) -> Result<Arc<dyn Broker>> {
    let requested = lookup(BACKEND_VAR)
        .map(|v| v.trim().to_ascii_lowercase())
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "memory".to_owned());
    let backend = backends::resolve(&requested, BACKEND_VAR)?;
    backends::build(backend, &lookup, None).await
}

/// Build a broker from a URL whose scheme names the backend: `memory://`,
/// `redis://host:6379` or `rediss://…` (Redis pub/sub), `redis-streams://host:6379` or
/// `rediss-streams://…` (Redis Streams), `amqp://user:password@host:5672/vhost` or `amqps://…`
/// (RabbitMQ), `kafka://host:9092[,host:9092…]` (Kafka, other settings at their defaults).
///
/// # Errors
/// [`ErrorKind::Config`] for a URL without a scheme or with an unknown or not compiled-in
/// scheme; connection errors from the backend.
pub async fn connect(url: &str) -> Result<Arc<dyn Broker>> {
    let (backend, client_url) = backends::from_url(url)?;
    backends::build(backend, &|_: &str| None, Some(&client_url)).await
}

/// Compiles the README's Rust examples as doc tests, so they cannot drift from the API.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
struct ReadmeDoctests;
