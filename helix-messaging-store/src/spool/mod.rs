//! The fallback spool ([`Spool`](helix_messaging_core::fallback::Spool)).

pub(crate) mod sqlite;
