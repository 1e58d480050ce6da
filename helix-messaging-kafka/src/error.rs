//! The one place rdkafka errors become helix-messaging errors.

use std::fmt::Display;

use helix_messaging_core::{Error, ErrorKind};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

/// Map an error code to a kind and whether retrying may help.
fn classify(code: RDKafkaErrorCode) -> (ErrorKind, bool) {
    use RDKafkaErrorCode as C;
    match code {
        C::MessageSizeTooLarge => (ErrorKind::PayloadTooLarge, false),
        C::MessageTimedOut | C::RequestTimedOut | C::OperationTimedOut | C::TimedOutQueue => {
            (ErrorKind::Timeout, true)
        }
        C::QueueFull => (ErrorKind::Timeout, true),
        C::BrokerTransportFailure | C::AllBrokersDown | C::NetworkException => {
            (ErrorKind::Connection, true)
        }
        C::LeaderNotAvailable
        | C::NotLeaderForPartition
        | C::NotEnoughReplicas
        | C::NotEnoughReplicasAfterAppend => (ErrorKind::Backend, true),
        C::UnknownTopicOrPartition | C::UnknownTopic | C::UnknownPartition => {
            (ErrorKind::NotFound, false)
        }
        C::TopicAuthorizationFailed | C::SaslAuthenticationFailed | C::Authentication => {
            (ErrorKind::Config, false)
        }
        C::InvalidConfig | C::InvalidArgument => (ErrorKind::InvalidInput, false),
        _ => (ErrorKind::Backend, false),
    }
}

/// The producer's refusal or failure of a record bound for `kafka_topic`.
pub(crate) fn publishing(err: KafkaError, kafka_topic: &str) -> Error {
    from_kafka(err, format!("publishing to {kafka_topic}"))
}

/// Map an rdkafka error met while `doing` something.
pub(crate) fn from_kafka(err: KafkaError, doing: impl Display) -> Error {
    let (kind, retryable) = match &err {
        KafkaError::ClientConfig(..) | KafkaError::ClientCreation(_) => (ErrorKind::Config, false),
        KafkaError::Canceled => (ErrorKind::Closed, false),
        KafkaError::AdminOp(code) => classify(*code),
        other => match other.rdkafka_error_code() {
            Some(code) => classify(code),
            None => (ErrorKind::Backend, false),
        },
    };
    Error::new(kind, format!("{doing}: {err}"))
        .with_retryable(retryable)
        .with_source(err)
}

/// Run a blocking librdkafka call (metadata, flush, a history read) off the async threads.
///
/// # Errors
/// `f`'s error, or [`ErrorKind::Backend`] if the blocking task panicked or was cancelled.
pub(crate) async fn blocking<T: Send + 'static>(
    what: &str,
    f: impl FnOnce() -> helix_messaging_core::Result<T> + Send + 'static,
) -> helix_messaging_core::Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        Error::new(
            ErrorKind::Backend,
            format!("{what}: the blocking task failed: {e}"),
        )
    })?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_map_to_kinds_a_caller_can_act_on() {
        let err = from_kafka(
            KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge),
            "publishing",
        );
        assert_eq!(err.kind(), ErrorKind::PayloadTooLarge);
        assert!(!err.is_retryable());
        let err = from_kafka(
            KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut),
            "publishing",
        );
        assert_eq!(err.kind(), ErrorKind::Timeout);
        assert!(err.is_retryable());
        let err = from_kafka(
            KafkaError::MetadataFetch(RDKafkaErrorCode::AllBrokersDown),
            "x",
        );
        assert_eq!(err.kind(), ErrorKind::Connection);
    }
}
