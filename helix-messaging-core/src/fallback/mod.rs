//! The fallback spool (`MESSAGING_FALLBACK_ENABLED`): while the broker cannot take
//! publishes, they are written to a local durable spool and forwarded, in order per topic,
//! once it can again.
//!
//! [`FallbackBroker`] wraps a [`BreakerBroker`]. A publish goes to the broker while the
//! publish breaker lets it and the topic has nothing spooled; it is spooled when the breaker
//! is open or the broker fails it with a broker error (connection, timeout, backend), and
//! once a topic has spooled messages, later publishes to it are spooled behind them so the
//! topic's order holds. A spooled publish returns `Ok` only once the spool has it on disk
//! (`SqliteSpool` in `helix-messaging-store`: WAL, `synchronous = FULL`), and a publish whose caller goes away while
//! it is being spooled still finishes spooling, so the topic's order never depends on
//! whether its caller waited. What can be checked locally (the topic's name) is checked
//! before spooling: such a publish fails at once rather than returning `Ok`. The spool is
//! bounded ([`SpoolLimits`]): beyond the bound a publish fails with [`ErrorKind::Rejected`],
//! never dropped. Forwarded messages keep their ids, so a consumer can deduplicate the copy
//! of a publish whose broker acknowledgement was lost before it was spooled.
//!
//! A spooled message the broker refuses for good when it is forwarded
//! ([`ErrorKind::Rejected`], [`ErrorKind::PayloadTooLarge`], [`ErrorKind::InvalidInput`] or
//! [`ErrorKind::Serialization`]; any other failure, a closing broker's included, leaves it
//! waiting) is
//! set aside, durably, with the broker's error ([`FallbackBroker::refused`]), and the rest
//! keeps flowing; it stays there until it is sent again ([`FallbackBroker::retry_refused`])
//! or discarded ([`FallbackBroker::discard_refused`]), and counts against the limits
//! meanwhile.
//!
//! Health is `degraded` while anything is spooled or set aside; metrics, labelled `spool`
//! with the breaker broker's name, `messaging_fallback_spool_depth`, `messaging_fallback_spool_refused`,
//! `messaging_fallback_spool_bytes`, `messaging_fallback_spool_oldest_age_seconds`,
//! `messaging_fallback_spooled_total`, `messaging_fallback_forwarded_total` and
//! `messaging_fallback_refused_total`.
//!
//! [`BreakerBroker`]: crate::breaker::BreakerBroker
//! [`ErrorKind::Rejected`]: crate::ErrorKind::Rejected
//! [`ErrorKind::PayloadTooLarge`]: crate::ErrorKind::PayloadTooLarge
//! [`ErrorKind::InvalidInput`]: crate::ErrorKind::InvalidInput
//! [`ErrorKind::Serialization`]: crate::ErrorKind::Serialization

mod broker;
mod spool;

pub use broker::{FallbackBroker, FallbackLayer, ForwardConfig};
pub use spool::{
    MemorySpool, RefusedMessage, Spool, SpoolLimits, SpoolStats, SpooledMessage, spooled_size,
};
