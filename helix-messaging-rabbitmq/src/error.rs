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
            lapin::protocol::AMQPErrorKind::Hard(
                lapin::protocol::AMQPHardError::CONNECTIONFORCED,
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
