//! The one place redis-rs errors become helix-messaging errors.

use std::fmt::Display;

use helix_messaging_core::{Error, ErrorKind};
use redis::RedisError;

/// Map a redis-rs error met while `doing` something.
pub(crate) fn from_redis(err: RedisError, doing: impl Display) -> Error {
    let kind = if err.is_timeout() {
        ErrorKind::Timeout
    } else if lost_the_connection(&err) {
        ErrorKind::Connection
    } else {
        match err.kind() {
            redis::ErrorKind::AuthenticationFailed => ErrorKind::Config,
            redis::ErrorKind::InvalidClientConfig => ErrorKind::Config,
            redis::ErrorKind::Parse | redis::ErrorKind::UnexpectedReturnType => {
                ErrorKind::Serialization
            }
            _ if err.code() == Some("NOGROUP") => ErrorKind::NotFound,
            // A server that is not (or not yet) the primary: after a failover, the next
            // attempt goes to the one that is.
            _ if err.code().is_some_and(not_primary) => ErrorKind::Connection,
            _ => ErrorKind::Backend,
        }
    };
    // The server's own advice wins where it says a retry can succeed: LOADING while an AOF is
    // replayed after a restart, TRYAGAIN, MASTERDOWN, …
    let retryable = kind.retryable_by_default()
        || matches!(
            err.retry_method(),
            redis::RetryMethod::Reconnect
                | redis::RetryMethod::RetryImmediately
                | redis::RetryMethod::WaitAndRetry
        );
    Error::new(kind, format!("{doing}: {err}"))
        .with_retryable(retryable)
        .with_source(err)
}

/// Whether `err` says the connection to the server is gone (or was never made).
pub(crate) fn lost_the_connection(err: &RedisError) -> bool {
    err.is_io_error() || err.is_connection_dropped() || err.is_connection_refusal()
}

/// Whether a server error code says the server does not take writes as a primary: a
/// replica (`READONLY`), one cut off from its primary (`MASTERDOWN`), or one still loading
/// its data (`LOADING`).
pub(crate) fn not_primary(code: &str) -> bool {
    matches!(code, "READONLY" | "MASTERDOWN" | "LOADING")
}

/// Whether a server error is the given code (`BUSYGROUP`, `NOGROUP`, …).
pub(crate) fn has_code(err: &RedisError, code: &str) -> bool {
    err.code() == Some(code)
}
