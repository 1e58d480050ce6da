//! The dead-letter stores ([`DeadLetterStore`](helix_messaging_core::dlq::DeadLetterStore)).

#[cfg(feature = "postgres")]
pub(crate) mod postgres;
#[cfg(feature = "sqlite")]
pub(crate) mod sqlite;
