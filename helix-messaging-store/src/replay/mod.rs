//! The replay record stores ([`ReplayStore`](helix_messaging_core::replay::ReplayStore)).

#[cfg(feature = "postgres")]
pub(crate) mod postgres;
#[cfg(feature = "sqlite")]
pub(crate) mod sqlite;
