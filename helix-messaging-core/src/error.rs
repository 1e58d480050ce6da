//! The one error type every helix-messaging operation returns.

use std::borrow::Cow;
use std::error::Error as StdError;
use std::fmt;

/// Shorthand for `std::result::Result<T, helix_messaging_core::Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Boxed source error kept inside [`Error`].
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// What went wrong, in terms a caller can act on.
///
/// The set grows as backends land, so match with a wildcard arm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Configuration is missing or malformed; the message names the variable or field.
    Config,
    /// The broker could not be reached, or the connection was lost.
    Connection,
    /// An operation did not complete in time (including a publish that waited for
    /// capacity on a full queue).
    Timeout,
    /// A named thing (topic, group, delivery, DLQ entry) does not exist or is no longer held.
    NotFound,
    /// The backend cannot do this; see its [`Capabilities`](crate::Capabilities).
    Unsupported,
    /// The payload exceeds what the backend accepts.
    PayloadTooLarge,
    /// A message could not be encoded or decoded.
    Serialization,
    /// The broker (or the subscription) was closed.
    Closed,
    /// The broker refused the operation (unroutable message, negative confirm, ACL).
    Rejected,
    /// An argument is not valid (empty topic name, illegal characters, …).
    InvalidInput,
    /// The delivery was already acked, nacked or rejected.
    AlreadySettled,
    /// Another operation holds the thing right now (a DLQ entry being re-driven); trying
    /// again once it is done can succeed.
    Conflict,
    /// Too much work of this kind is under way: a limit on jobs running at once (bulk
    /// redrives, replays) is reached, and the message names it. Nothing was started; trying
    /// again once one has finished can succeed (retryable by default). The admin API answers
    /// it with 429 Too Many Requests.
    Busy,
    /// Anything else the backend reported.
    Backend,
}

impl ErrorKind {
    /// Whether an error of this kind is worth retrying unless the site says otherwise.
    ///
    /// Connection loss, time-outs, conflicts (another operation holding the thing) and
    /// [`ErrorKind::Busy`] (too many jobs running) are transient; everything else needs a
    /// change first.
    pub const fn retryable_by_default(self) -> bool {
        matches!(
            self,
            ErrorKind::Connection | ErrorKind::Timeout | ErrorKind::Conflict | ErrorKind::Busy
        )
    }

    /// The kind in snake case (`"not_found"`, `"payload_too_large"`, …): the `kind` label of
    /// failure metrics and the `error.type` of a failed span.
    pub const fn label(self) -> &'static str {
        match self {
            ErrorKind::Config => "config",
            ErrorKind::Connection => "connection",
            ErrorKind::Timeout => "timeout",
            ErrorKind::NotFound => "not_found",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::PayloadTooLarge => "payload_too_large",
            ErrorKind::Serialization => "serialization",
            ErrorKind::Closed => "closed",
            ErrorKind::Rejected => "rejected",
            ErrorKind::InvalidInput => "invalid_input",
            ErrorKind::AlreadySettled => "already_settled",
            ErrorKind::Conflict => "conflict",
            ErrorKind::Busy => "busy",
            ErrorKind::Backend => "backend",
        }
    }

    const fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Config => "configuration error",
            ErrorKind::Connection => "connection error",
            ErrorKind::Timeout => "timed out",
            ErrorKind::NotFound => "not found",
            ErrorKind::Unsupported => "unsupported by this backend",
            ErrorKind::PayloadTooLarge => "payload too large",
            ErrorKind::Serialization => "serialization error",
            ErrorKind::Closed => "closed",
            ErrorKind::Rejected => "rejected by the broker",
            ErrorKind::InvalidInput => "invalid input",
            ErrorKind::AlreadySettled => "delivery already settled",
            ErrorKind::Conflict => "held by another operation",
            ErrorKind::Busy => "too many jobs running",
            ErrorKind::Backend => "backend error",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A helix-messaging error: a [`ErrorKind`], a human-readable message, whether retrying may
/// help, and the client library's original error as [`source`](StdError::source).
///
/// Messages never contain secrets: adapters redact credentials before building an `Error`.
#[derive(Debug, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct Error {
    kind: ErrorKind,
    message: Cow<'static, str>,
    retryable: bool,
    #[source]
    source: Option<BoxError>,
}

impl Error {
    /// An error of `kind`; retryable as [`ErrorKind::retryable_by_default`] says.
    pub fn new(kind: ErrorKind, message: impl Into<Cow<'static, str>>) -> Self {
        Error {
            kind,
            message: message.into(),
            retryable: kind.retryable_by_default(),
            source: None,
        }
    }

    /// Attach the underlying error (kept as `source`, never flattened into the message).
    #[must_use]
    pub fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// Override whether retrying may help.
    #[must_use]
    pub fn with_retryable(mut self, retryable: bool) -> Self {
        self.retryable = retryable;
        self
    }

    /// A configuration error naming the offending variable or field.
    pub fn config(variable: &str, problem: impl fmt::Display) -> Self {
        Error::new(ErrorKind::Config, format!("{variable}: {problem}"))
    }

    /// The backend `backend` cannot do `operation`.
    pub fn unsupported(backend: &str, operation: impl fmt::Display) -> Self {
        Error::new(
            ErrorKind::Unsupported,
            format!("the {backend} backend does not support {operation}"),
        )
    }

    /// The broker or subscription has been closed.
    pub fn closed(what: impl fmt::Display) -> Self {
        Error::new(ErrorKind::Closed, format!("{what} is closed"))
    }

    /// An argument that is not valid.
    pub fn invalid_input(problem: impl Into<Cow<'static, str>>) -> Self {
        Error::new(ErrorKind::InvalidInput, problem)
    }

    /// An error standing for several, of which `first` is the first: `first`'s kind and
    /// retryability, `summary` as its message, and `first` as its source.
    pub fn summarising(first: Error, summary: String) -> Self {
        Error::new(first.kind, summary)
            .with_retryable(first.retryable)
            .with_source(first)
    }

    /// A copy with the same kind, message and retryability but no source (sources cannot be
    /// cloned); for reporting one failure against several operations.
    pub fn copy_without_source(&self) -> Error {
        Error {
            kind: self.kind,
            message: self.message.clone(),
            retryable: self.retryable,
            source: None,
        }
    }

    /// What went wrong.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// Whether retrying the same operation may succeed.
    pub fn is_retryable(&self) -> bool {
        self.retryable
    }

    /// The message without the kind prefix.
    pub fn message(&self) -> &str {
        &self.message
    }
}

/// Run `future`, failing with a retryable [`ErrorKind::Timeout`] naming `what` (for example
/// "connecting to amqp://…") if it takes longer than `limit`.
///
/// # Errors
/// [`ErrorKind::Timeout`] when the limit passes first.
pub async fn within<T>(
    limit: std::time::Duration,
    what: impl fmt::Display,
    future: impl std::future::Future<Output = T>,
) -> Result<T> {
    tokio::time::timeout(limit, future).await.map_err(|_| {
        Error::new(
            ErrorKind::Timeout,
            format!("{what} took longer than {limit:?}"),
        )
    })
}

/// The error for a task of `what` that did not run to its end (it panicked, or its runtime
/// shut down): the task's own account, which carries the panic's message.
pub(crate) fn task_stopped(what: &str, err: &tokio::task::JoinError) -> Error {
    Error::new(ErrorKind::Backend, format!("{what} stopped: {err}"))
}

/// The error a background job (a bulk redrive, a replay) ends with when its work panicked:
/// the panic's message, when it carries one.
pub(crate) fn panicked(job: &str, payload: &(dyn std::any::Any + Send)) -> Error {
    let message = panic_message(payload);
    Error::new(ErrorKind::Backend, format!("the {job} panicked: {message}"))
}

/// The message a panic carries (its `&str` or `String` payload), or says it has none.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|text| (*text).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_shows_kind_and_message_and_keeps_source() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let err = Error::new(ErrorKind::Connection, "cannot reach 127.0.0.1:5672").with_source(io);
        assert_eq!(
            err.to_string(),
            "connection error: cannot reach 127.0.0.1:5672"
        );
        assert!(err.is_retryable());
        assert_eq!(err.source().expect("source kept").to_string(), "refused");
    }

    #[test]
    fn retryable_defaults_follow_kind_and_can_be_overridden() {
        assert!(!Error::new(ErrorKind::Config, "x").is_retryable());
        assert!(Error::new(ErrorKind::Timeout, "x").is_retryable());
        assert!(
            !Error::new(ErrorKind::Timeout, "x")
                .with_retryable(false)
                .is_retryable()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn within_names_what_took_too_long_and_passes_results_through() {
        let limit = std::time::Duration::from_secs(5);
        let late = within(
            limit,
            "connecting to amqp://h",
            std::future::pending::<()>(),
        )
        .await
        .expect_err("never finishes");
        assert_eq!(late.kind(), ErrorKind::Timeout);
        assert!(late.is_retryable());
        assert_eq!(late.message(), "connecting to amqp://h took longer than 5s");
        assert_eq!(within(limit, "x", async { 7 }).await.expect("in time"), 7);
    }

    #[test]
    fn config_error_names_the_variable() {
        let err = Error::config("RABBITMQ_PORT", "expected a port number, got \"abc\"");
        assert_eq!(err.kind(), ErrorKind::Config);
        assert!(err.to_string().contains("RABBITMQ_PORT"));
    }
}
