//! The fallback spool ([`Spool`](helix_messaging_core::fallback::Spool)).

mod meta;
pub(crate) mod sqlite;
