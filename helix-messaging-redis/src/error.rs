//! The one place redis-rs errors become helix-messaging errors.

use std::fmt::Display;

use helix_messaging_core::{Error, ErrorKind};
use redis::RedisError;

/// Map a redis-rs error met while `doing` something.
pub(crate) fn from_redis(err: RedisError, doing: impl Display) -> Error {
    let kind = if err.is_timeout() {
        ErrorKind::Timeout
    } else if err.is_io_error() || err.is_connection_dropped() || err.is_connection_refusal() {
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
            _ if matches!(err.code(), Some("READONLY" | "MASTERDOWN" | "LOADING")) => {
                ErrorKind::Connection
            }
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

/// Whether a server error is the given code (`BUSYGROUP`, `NOGROUP`, …).
pub(crate) fn has_code(err: &RedisError, code: &str) -> bool {
    err.code() == Some(code)
}
