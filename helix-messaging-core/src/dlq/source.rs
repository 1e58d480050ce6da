//! A broker besides the processor's own whose DLQ topics it ingests: what it is, and the
//! checks it is made with (the ingesting is `sources`', which is built on the processor).

use std::sync::Arc;

use crate::broker::Broker;
use crate::error::{Error, Result};
use crate::names::validate_name;

/// A broker besides the processor's own whose DLQ topics it ingests, under a name the
/// stored letters keep ([`HEADER_SOURCE`](super::letter::HEADER_SOURCE)) so a re-drive publishes back to this broker.
///
/// The name must stay the same across restarts: a stored letter whose source the processor
/// was not given is not re-driven (to another broker, it would reach no consumer).
#[derive(Clone)]
pub struct DeadLetterSource {
    pub(super) name: String,
    pub(super) broker: Arc<dyn Broker>,
    pub(super) topics: Vec<String>,
}

impl std::fmt::Debug for DeadLetterSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeadLetterSource")
            .field("name", &self.name)
            .field("topics", &self.topics)
            .finish_non_exhaustive()
    }
}

impl DeadLetterSource {
    /// The DLQ `topics` of `broker`, known as `name` (`events`, say).
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`](crate::ErrorKind::InvalidInput) for an empty or
    /// over-long name or topic, or no topic at all.
    pub fn new(
        name: impl Into<String>,
        broker: Arc<dyn Broker>,
        topics: Vec<String>,
    ) -> Result<Self> {
        let name = name.into();
        validate_name("dead-letter source", &name)?;
        if topics.is_empty() {
            return Err(Error::invalid_input(format!(
                "dead-letter source {name}: name at least one DLQ topic"
            )));
        }
        for topic in &topics {
            validate_name("DLQ topic", topic)?;
        }
        Ok(DeadLetterSource {
            name,
            broker,
            topics,
        })
    }

    /// Its name, as stored letters carry it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its DLQ topics.
    pub fn topics(&self) -> &[String] {
        &self.topics
    }
}
