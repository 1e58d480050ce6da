//! The one place lapin errors become helix-messaging errors.

use std::fmt::Display;

use helix_messaging_core::{Error, ErrorKind};

/// Map a lapin error met while `doing` something.
pub(crate) fn from_lapin(err: lapin::Error, doing: impl Display) -> Error {
    let kind = match err.kind() {
        lapin::ErrorKind::IOError(_) | lapin::ErrorKind::RuntimeShutdownError(_) => {
            ErrorKind::Connection
        }
        lapin::ErrorKind::InvalidChannelState(..) | lapin::ErrorKind::InvalidConnectionState(_) => {
            ErrorKind::Connection
        }
        lapin::ErrorKind::ProtocolError(amqp) => match amqp.kind() {
            // The broker closed the connection over its own state (an operator, or a failure
            // such as a quorum queue losing its leader under a publish): what waited on it
            // is undecided, as on a connection lost, and a new connection is the remedy.
            lapin::protocol::AMQPErrorKind::Hard(
                lapin::protocol::AMQPHardError::CONNECTIONFORCED
                | lapin::protocol::AMQPHardError::INTERNALERROR,
            ) => ErrorKind::Connection,
            lapin::protocol::AMQPErrorKind::Soft(lapin::protocol::AMQPSoftError::NOTFOUND) => {
                ErrorKind::NotFound
            }
            lapin::protocol::AMQPErrorKind::Soft(lapin::protocol::AMQPSoftError::ACCESSREFUSED)
            | lapin::protocol::AMQPErrorKind::Hard(lapin::protocol::AMQPHardError::NOTALLOWED) => {
                ErrorKind::Config
            }
            _ => ErrorKind::Rejected,
        },
        lapin::ErrorKind::AuthProviderError(_) => ErrorKind::Config,
        lapin::ErrorKind::ParsingError(_) | lapin::ErrorKind::SerialisationError(_) => {
            ErrorKind::Serialization
        }
        _ => ErrorKind::Backend,
    };
    Error::new(kind, format!("{doing}: {err}")).with_source(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::protocol::{AMQPError, AMQPErrorKind, AMQPHardError};

    fn closed_by_the_broker(error: AMQPHardError) -> lapin::Error {
        lapin::ErrorKind::ProtocolError(AMQPError::new(
            AMQPErrorKind::Hard(error),
            "closed by the broker".into(),
        ))
        .into()
    }

    /// A connection the broker closes over a failure of its own leaves a publish waiting
    /// for its confirm as undecided as a connection lost does: it is made again (the
    /// three-node drill met `INTERNAL_ERROR` when the queue's leader was killed, and three
    /// publishes were refused for good).
    #[test]
    fn a_connection_the_broker_closes_over_its_own_failure_is_a_lost_connection() {
        for error in [
            AMQPHardError::CONNECTIONFORCED,
            AMQPHardError::INTERNALERROR,
        ] {
            let err = from_lapin(
                closed_by_the_broker(error.clone()),
                "waiting for the confirm",
            );
            assert_eq!(err.kind(), ErrorKind::Connection, "{error:?}");
            assert!(err.is_retryable(), "{error:?}");
        }
    }

    /// A hard error the client caused is no better on another connection: not retried.
    #[test]
    fn a_connection_closed_over_the_clients_own_mistake_is_not_retried() {
        let err = from_lapin(
            closed_by_the_broker(AMQPHardError::COMMANDINVALID),
            "publishing",
        );
        assert!(!err.is_retryable());
    }
}
