//! What a [`Processor`](super::Processor) is configured with: its settings and the custom
//! re-processing registered per message type. Apart from the processor so that the jobs and
//! redrive code it stacks on never see its internals.

use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;

use super::letter::{DEFAULT_DLQ_TOPIC, DeadLetter};
use crate::error::{BoxError, Error, Result};
use crate::names::validate_name;
use crate::retry::RetryPolicy;

/// Group the processor consumes DLQ topics in.
pub const DEFAULT_PROCESSOR_GROUP: &str = "helix-dlq-processor";

/// How the [`Processor`](super::Processor) works (HelixAgent's `dlq.ProcessorConfig`).
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessorConfig {
    /// Automatic re-drives of one message, counted across its trips through the DLQ (the
    /// [`HEADER_REDRIVE_COUNT`](super::HEADER_REDRIVE_COUNT) header), before it is parked
    /// (default 3).
    pub max_retries: u32,
    /// Wait before the first automatic re-drive (default 1 s).
    pub retry_delay: Duration,
    /// Factor the wait grows by per re-drive (default 2.0).
    pub retry_backoff_multiplier: f32,
    /// Longest wait between re-drives (default 30 s).
    pub max_retry_delay: Duration,
    /// Longest a registered handler may take for one message (default 30 s); a handler
    /// still running then counts as failed.
    pub processing_timeout: Duration,
    /// Entries re-driven per poll (default 10).
    pub batch_size: usize,
    /// Time between polls for due re-drives (default 5 s).
    pub poll_interval: Duration,
    /// DLQ topics to ingest (default `["helixagent.dlq"]`; see
    /// [`DeadLetterConfig::topics`](super::DeadLetterConfig::topics)).
    pub topics: Vec<String>,
    /// Consumer group the DLQ topics are ingested in (default `helix-dlq-processor`).
    pub group: String,
    /// Re-drive automatically (default true). Off, entries wait for an operator.
    pub auto_redrive: bool,
}

impl Default for ProcessorConfig {
    fn default() -> Self {
        ProcessorConfig {
            max_retries: 3,
            retry_delay: Duration::from_secs(1),
            retry_backoff_multiplier: 2.0,
            max_retry_delay: Duration::from_secs(30),
            processing_timeout: Duration::from_secs(30),
            batch_size: 10,
            poll_interval: Duration::from_secs(5),
            topics: vec![DEFAULT_DLQ_TOPIC.to_owned()],
            group: DEFAULT_PROCESSOR_GROUP.to_owned(),
            auto_redrive: true,
        }
    }
}

impl ProcessorConfig {
    pub(super) fn backoff(&self) -> RetryPolicy {
        RetryPolicy {
            max_retries: self.max_retries,
            retry_delay: self.retry_delay,
            retry_backoff_multiplier: self.retry_backoff_multiplier,
            max_retry_delay: self.max_retry_delay,
            jitter: true,
        }
    }

    pub(super) fn validate(&self) -> Result<()> {
        self.backoff().validate()?;
        if self.batch_size == 0 {
            return Err(Error::config("batch_size", "must be at least 1"));
        }
        if self.poll_interval.is_zero() {
            return Err(Error::config("poll_interval", "must be longer than zero"));
        }
        if self.topics.is_empty() {
            return Err(Error::config("topics", "name at least one DLQ topic"));
        }
        for topic in &self.topics {
            validate_name("DLQ topic", topic)?;
        }
        validate_name("group", &self.group)
    }
}

/// Custom re-processing for one message type (HelixAgent's `RegisterHandler`): called instead
/// of republishing to the original topic. `Ok` resolves the entry; `Err` counts as a failed
/// re-drive.
#[async_trait]
pub trait DeadLetterHandler: Send + Sync + 'static {
    /// Re-process one dead letter.
    ///
    /// # Errors
    /// Why it failed again; the processor retries with backoff, then parks it.
    async fn handle(&self, letter: DeadLetter) -> std::result::Result<(), BoxError>;
}

#[async_trait]
impl<F, Fut> DeadLetterHandler for F
where
    F: Fn(DeadLetter) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = std::result::Result<(), BoxError>> + Send + 'static,
{
    async fn handle(&self, letter: DeadLetter) -> std::result::Result<(), BoxError> {
        self(letter).await
    }
}
