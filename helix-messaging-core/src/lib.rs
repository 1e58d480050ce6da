//! Core contracts of helix-messaging: the message model, the broker traits every backend
//! implements, errors, capabilities and the handler runner.
//!
//! Applications depend on the `helix-messaging` crate, which re-exports all of this; backend
//! adapters depend on this crate directly.

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
pub mod stack;
pub mod trace;
mod typed;

pub use broker::{
    Backlog, BatchReport, Broker, DEFAULT_PREFETCH, Health, HealthStatus, HistoryEntry,
    HistoryStream, Publisher, StartPosition, SubscribeOptions, Subscriber, Subscription, TimeRange,
};
pub use capabilities::Capabilities;
pub use delivery::{Acknowledge, Delivery, DeliveryInfo, Envelope, Position, Settlement, Settler};
pub use error::{BoxError, Error, ErrorKind, Result, within};
pub use message::{Headers, MAX_PRIORITY, MESSAGE_TYPE_HEADER, Message, MessageParts};
pub use names::{MAX_NAME_LEN, check_payload_size, validate_name};
pub use runner::{
    BoxHandler, DEFAULT_CONCURRENCY, DEFAULT_SHUTDOWN_TIMEOUT, FailureKind, Handler, HandlerError,
    HandlerFn, Layer, RunReport, Runner, RunnerBuilder, handler_fn,
};
pub use typed::{JsonHandler, json_handler};

/// Re-exported so adapters and layers implement the traits with the same macro version.
pub use async_trait::async_trait;
