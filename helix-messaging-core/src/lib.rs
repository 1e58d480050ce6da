//! Core of helix-messaging: the contract every backend implements, the handler runner, and
//! the reliability plane built on them. Applications depend on the `helix-messaging` crate,
//! which re-exports all of this (and the durable stores of `helix-messaging-store`); backend
//! adapters depend on this crate alone. Nothing here does SQL, HTTP or exports telemetry.
//!
//! # How it stacks
//!
//! From the ground up (a module uses only those listed before it):
//!
//! 1. **The contract.** [`Message`] and its [`Headers`]; errors ([`Error`], [`ErrorKind`]);
//!    what a backend can do ([`Capabilities`]); topic and group [names](validate_name); a
//!    received [`Delivery`] settled once through its [`Settler`] ([`Settlement`]: ack,
//!    requeue, requeue after a delay, reject); the broker traits [`Publisher`],
//!    [`Subscriber`] and [`Broker`], with history reads ([`Broker::read_range`]) and backlogs.
//! 2. **The runner.** [`Runner`] runs a [`Handler`] over a topic with bounded concurrency and
//!    settles each delivery from the handler's verdict ([`HandlerError`]); a [`Layer`] wraps
//!    the handler. [`json_handler`] decodes payloads first. [`trace`] names its spans and
//!    carries W3C trace context in message headers, against the OpenTelemetry API only.
//! 3. **Handler layers and broker wrappers.** [`retry::RetryLayer`] retries with backoff;
//!    broker wrappers are [`stack::BrokerLayer`]s: [`observe`] (metrics), [`breaker`]
//!    (circuit breakers), [`lazy`] (a broker that connects in the background), and their
//!    order is written down once, in [`stack`].
//! 4. **The plane.** [`dlq`]: the dead-letter layer, the DLQ wire format, the processor
//!    that manages what was dead-lettered, and bulk redrive jobs. [`replay`]: re-publishing
//!    a time range of a topic's history. [`fallback`]: spooling publishes while the broker is
//!    away. Each keeps its state behind a store trait with an in-memory implementation here;
//!    SQLite and PostgreSQL ones are in `helix-messaging-store`.
//! 5. **The hub.** [`hub::Hub`] wires all of it the way HelixAgent did: tasks and events on
//!    two brokers, breakers, spools, retry and dead-lettering. It stays in this crate rather
//!    than the facade because the admin API (`helix-messaging-admin`), which the facade
//!    re-exports, serves a hub.

pub mod breaker;
mod broker;
mod capabilities;
mod delivery;
pub mod dlq;
mod error;
pub mod fallback;
pub mod hub;
pub mod lazy;
mod message;
mod names;
pub mod observe;
pub mod replay;
pub mod retry;
mod runner;
pub mod settings;
pub mod stack;
pub mod trace;
mod typed;
pub mod window;

pub use broker::{
    Backlog, BatchReport, Broker, DEFAULT_PREFETCH, GroupAddress, Health, HealthStatus,
    HistoryEntry, HistoryStream, Publisher, StartPosition, SubscribeOptions, Subscriber,
    Subscription, TimeRange,
};
pub use capabilities::Capabilities;
pub use delivery::{
    Acknowledge, Delivery, DeliveryInfo, Envelope, Position, Settlement, Settler, UnboxedDelivery,
};
pub use error::{BoxError, Error, ErrorKind, Result, panic_message, within};
pub use message::{
    Headers, MAX_PRIORITY, MESSAGE_TYPE_HEADER, Message, MessageParts, parse_timestamp_nanos,
};
pub use names::{MAX_NAME_LEN, check_payload_size, validate_name};
pub use runner::{
    BoxHandler, DEFAULT_CONCURRENCY, DEFAULT_SHUTDOWN_TIMEOUT, FailureKind, Handler, HandlerError,
    HandlerFn, Layer, RunReport, Runner, RunnerBuilder, handler_fn,
};
pub use typed::{JsonHandler, json_handler};
pub use window::{PublishWindow, WindowFailure, WindowOptions, WindowReport};

/// Re-exported so adapters and layers implement the traits with the same macro version.
pub use async_trait::async_trait;
