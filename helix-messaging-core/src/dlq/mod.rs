//! Dead-lettering: what happens to a message that cannot be processed, and the management
//! plane over what was dead-lettered (HelixAgent's "Dead Letter Queue (DLQ) Processing").
//!
//! - [`DeadLetterLayer`] (a runner [`Layer`]) sends a message to its DLQ topic when the
//!   handler fails permanently, when a [`RetryLayer`](crate::retry::RetryLayer) has used up
//!   its retries, or when the payload cannot be decoded; the original is acked only once the
//!   DLQ publish is confirmed.
//! - The DLQ message is readable by any client: the original payload as the body, the
//!   original headers, and the failure facts in `helix-dlq-*` headers ([`DeadLetter`]).
//! - [`Processor`] ingests the DLQ topics into a [`DeadLetterStore`] (in memory here; SQLite
//!   and PostgreSQL in `helix-messaging-store`), re-drives with backoff, parks what stays broken, and offers list / get /
//!   reprocess / discard / purge, failure groups and bulk redrive jobs.

mod config;
mod jobs;
mod letter;
mod processor;
mod redrive;
mod report;
mod source;
mod sources;
mod store;

use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;

/// [`DeadLetterHandler`], under its name before 0.2 (a trait cannot be deprecated by alias;
/// new code names `DeadLetterHandler`).
pub use config::DeadLetterHandler as DlqHandler;
pub use config::{DEFAULT_PROCESSOR_GROUP, DeadLetterHandler, ProcessorConfig};
pub use jobs::{
    CanaryConfig, DEFAULT_REDRIVE_RATE, MAX_CANARY_WATCH, MAX_FINISHED_REDRIVES,
    MAX_REDRIVE_BATCH_SIZE, MAX_REDRIVE_RATE, MAX_RUNNING_REDRIVES, MIN_REDRIVE_RATE,
    RedriveProgress, RedriveRequest, RedriveStatus,
};
pub use letter::{
    DEFAULT_DLQ_TOPIC, DeadLetter, DeadLetterReason, EVENT_DLQ_TOPIC, HEADER_ATTEMPTS,
    HEADER_DEAD_LETTERED_AT, HEADER_ERROR, HEADER_ERROR_TRUNCATED, HEADER_FIRST_FAILURE,
    HEADER_GROUP, HEADER_LAST_FAILURE, HEADER_ORIGINAL_ID, HEADER_ORIGINAL_TIMESTAMP,
    HEADER_ORIGINAL_TOPIC, HEADER_PREFIX, HEADER_REASON, HEADER_REDRIVE_COUNT, HEADER_SOURCE,
    MAX_ERROR_HEADER_BYTES, TASK_DLQ_TOPIC,
};
pub use processor::Processor;
pub use report::{DeadLetterPage, ProcessorMetrics, RedrivePreview};
pub use source::DeadLetterSource;
pub use store::{
    DeadLetterFilter, DeadLetterStats, DeadLetterStore, EntryStatus, FailureGroup,
    MemoryDeadLetterStore, StoredDeadLetter,
};

use crate::broker::Publisher;
use crate::delivery::Envelope;
use crate::error::{Error, Result};
use crate::names::validate_name;
use crate::runner::{BoxHandler, Handler, HandlerError, Layer};
use crate::trace;

/// [`DeadLetterFilter`], under its name before 0.2.
#[deprecated(since = "0.2.0", note = "renamed `DeadLetterFilter`")]
pub type DlqFilter = DeadLetterFilter;
/// [`DeadLetterStats`], under its name before 0.2.
#[deprecated(since = "0.2.0", note = "renamed `DeadLetterStats`")]
pub type DlqStats = DeadLetterStats;
/// [`DeadLetterPage`], under its name before 0.2.
#[deprecated(since = "0.2.0", note = "renamed `DeadLetterPage`")]
pub type DlqPage = DeadLetterPage;

/// Where dead letters go.
///
/// Every failed message goes to the default DLQ topic unless a route matches its
/// topic: routes are `(prefix, dlq topic)` pairs, the longest matching prefix wins.
/// [`DeadLetterConfig::helixagent`] routes `helixagent.tasks.*` to `helixagent.dlq.tasks` and
/// `helixagent.events.*` to `helixagent.dlq.events`, as HelixAgent's topology does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterConfig {
    topic: String,
    routes: Vec<(String, String)>,
}

impl Default for DeadLetterConfig {
    fn default() -> Self {
        DeadLetterConfig {
            topic: DEFAULT_DLQ_TOPIC.to_owned(),
            routes: Vec::new(),
        }
    }
}

impl DeadLetterConfig {
    /// Everything to `topic`.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`](crate::ErrorKind::InvalidInput) for an invalid topic name.
    pub fn new(topic: impl Into<String>) -> Result<Self> {
        let topic = topic.into();
        validate_name("DLQ topic", &topic)?;
        Ok(DeadLetterConfig {
            topic,
            routes: Vec::new(),
        })
    }

    /// HelixAgent's topology: tasks to `helixagent.dlq.tasks`, events to
    /// `helixagent.dlq.events`, anything else to `helixagent.dlq`.
    pub fn helixagent() -> Self {
        DeadLetterConfig {
            topic: DEFAULT_DLQ_TOPIC.to_owned(),
            routes: vec![
                ("helixagent.tasks.".to_owned(), TASK_DLQ_TOPIC.to_owned()),
                ("helixagent.events.".to_owned(), EVENT_DLQ_TOPIC.to_owned()),
            ],
        }
    }

    /// [`DeadLetterConfig::helixagent`], under its name before 0.2.
    #[deprecated(since = "0.2.0", note = "renamed `DeadLetterConfig::helixagent`")]
    pub fn seeds() -> Self {
        DeadLetterConfig::helixagent()
    }

    /// Send failures of topics starting with `prefix` to `dlq_topic`.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`](crate::ErrorKind::InvalidInput) for an invalid topic name.
    pub fn route(
        mut self,
        prefix: impl Into<String>,
        dlq_topic: impl Into<String>,
    ) -> Result<Self> {
        let dlq_topic = dlq_topic.into();
        validate_name("DLQ topic", &dlq_topic)?;
        self.routes.push((prefix.into(), dlq_topic));
        Ok(self)
    }

    /// The DLQ topic for a message that failed on `topic`.
    pub fn topic_for(&self, topic: &str) -> &str {
        self.routes
            .iter()
            .filter(|(prefix, _)| topic.starts_with(prefix.as_str()))
            .max_by_key(|(prefix, _)| prefix.len())
            .map_or(self.topic.as_str(), |(_, dlq)| dlq.as_str())
    }

    /// Every DLQ topic this configuration can send to (what a [`Processor`] consumes).
    pub fn topics(&self) -> Vec<String> {
        let mut topics: Vec<String> = std::iter::once(self.topic.clone())
            .chain(self.routes.iter().map(|(_, t)| t.clone()))
            .collect();
        topics.sort();
        topics.dedup();
        topics
    }
}

/// Sends dead letters: publishes each to its DLQ topic (confirmed), and hands it with its
/// full error text to a [`Processor`] in this process when one is attached.
#[derive(Clone)]
pub struct DeadLetterQueue {
    publisher: Arc<dyn Publisher>,
    config: Arc<DeadLetterConfig>,
    processor: Option<Processor>,
    /// How `messaging_dead_lettered_total` labels the original topic.
    topic_labels: Arc<crate::names::TopicLabels>,
}

impl std::fmt::Debug for DeadLetterQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeadLetterQueue")
            .field("config", &self.config)
            .field("processor", &self.processor.is_some())
            .finish()
    }
}

impl DeadLetterQueue {
    /// Dead letters published through `publisher` (any `Arc<dyn Broker>` coerces) to the
    /// topics of `config`.
    pub fn new(publisher: Arc<dyn Publisher>, config: DeadLetterConfig) -> Self {
        DeadLetterQueue {
            publisher,
            config: Arc::new(config),
            processor: None,
            topic_labels: Arc::default(),
        }
    }

    /// Label `messaging_dead_lettered_total`'s topics with `labels` (share the ones an
    /// [`ObservedBroker`](crate::observe::ObservedBroker) uses, so both name the same topics);
    /// by default a set of its own with [`DEFAULT_MAX_TOPIC_LABELS`](crate::observe::DEFAULT_MAX_TOPIC_LABELS).
    #[must_use]
    pub fn with_topic_labels(mut self, labels: Arc<crate::names::TopicLabels>) -> Self {
        self.topic_labels = labels;
        self
    }

    /// Also hand each dead letter, with its full error text, to `processor` (the DLQ topic's
    /// header carries at most [`MAX_ERROR_HEADER_BYTES`] of it; the processor's own ingest
    /// of the same letter from the topic is then a no-op).
    #[must_use]
    pub fn with_processor(mut self, processor: &Processor) -> Self {
        self.processor = Some(processor.clone());
        self
    }

    /// The configuration.
    pub fn config(&self) -> &DeadLetterConfig {
        &self.config
    }

    /// Publish `letter` to its DLQ topic and wait for the broker's confirmation; then hand it
    /// to the attached processor, if any. Returns the DLQ topic.
    ///
    /// # Errors
    /// The publish error: the dead letter did not reach the broker, so the caller must not
    /// settle the original. A failure of the processor's store is only logged: the
    /// processor ingests the letter from the DLQ topic anyway.
    pub async fn send(&self, letter: &DeadLetter) -> Result<String> {
        let topic = self.config.topic_for(&letter.original_topic).to_owned();
        let span = trace::dead_letter_span(
            &letter.original_topic,
            &topic,
            letter.reason.as_str(),
            &letter.message,
        );
        // The letter carries the dead-lettering's context on, to its re-drives too.
        let mut letter = letter.clone();
        trace::stamp(&mut letter.message, &span);
        let letter = &letter;
        trace::in_span(span, self.publisher.publish(&topic, letter.to_message())).await?;
        metrics::counter!(
            "messaging_dead_lettered_total",
            "topic" => self.topic_labels.label(&letter.original_topic).to_string(),
            "reason" => letter.reason.as_str(),
        )
        .increment(1);
        if let Some(processor) = &self.processor
            && let Err(err) = processor.ingest(letter.clone()).await
        {
            tracing::warn!(dead_letter = %letter.id, error = %err, "dead letter published but not recorded in the store; the processor ingests it from the DLQ topic");
        }
        Ok(topic)
    }
}

/// A runner [`Layer`] that dead-letters what cannot be processed.
///
/// When the inner handler fails permanently (its own verdict, an undecodable payload, or
/// retries used up under a [`RetryLayer`](crate::retry::RetryLayer) inside this layer), the
/// message is published to its DLQ topic with the failure facts and, once the broker has
/// confirmed that, reported as handled so the runner acks the original. If the DLQ publish
/// fails, the original is requeued (after [`DeadLetterLayer::PUBLISH_RETRY_DELAY`]), never
/// acked: nothing is lost while the DLQ is unreachable.
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use std::sync::Arc;
/// use std::time::Duration;
///
/// use futures::StreamExt;
/// use helix_messaging_core::dlq::{
///     DeadLetter, DeadLetterConfig, DeadLetterLayer, DeadLetterQueue, DeadLetterReason,
/// };
/// use helix_messaging_core::{
///     Broker, Envelope, HandlerError, Message, Runner, SubscribeOptions, handler_fn,
/// };
/// use helix_messaging_memory::MemoryBroker;
///
/// let broker: Arc<dyn Broker> = Arc::new(MemoryBroker::new());
/// let mut dlq = broker.subscribe("orders.dlq", SubscribeOptions::default()).await?;
/// let queue = DeadLetterQueue::new(broker.clone(), DeadLetterConfig::new("orders.dlq")?);
/// let runner = Runner::builder(broker.clone(), "orders")
///     .group("billing")
///     .layer(DeadLetterLayer::new(queue))
///     .start(handler_fn(|_order: Envelope| async {
///         Err(HandlerError::permanent("no such customer"))
///     }))
///     .await?;
/// broker.publish("orders", Message::new("order 7")).await?;
/// let delivery = tokio::time::timeout(Duration::from_secs(5), dlq.next())
///     .await
///     .expect("dead-lettered in time")
///     .expect("subscription open")?;
/// let letter = DeadLetter::from_message(delivery.message(), "orders.dlq");
/// assert_eq!(letter.original_topic, "orders");
/// assert_eq!(letter.reason, DeadLetterReason::Permanent);
/// assert_eq!(letter.message.payload().as_ref(), b"order 7");
/// runner.shutdown().await;
/// # Ok::<(), helix_messaging_core::Error>(())
/// # }).unwrap();
/// ```
pub struct DeadLetterLayer {
    queue: DeadLetterQueue,
}

impl DeadLetterLayer {
    /// How long a message whose dead-lettering failed waits before it is tried again.
    pub const PUBLISH_RETRY_DELAY: std::time::Duration = std::time::Duration::from_secs(1);

    /// A layer sending to `queue`.
    pub fn new(queue: DeadLetterQueue) -> Self {
        DeadLetterLayer { queue }
    }
}

impl Layer for DeadLetterLayer {
    fn layer(&self, inner: BoxHandler) -> BoxHandler {
        Arc::new(DeadLettering {
            inner,
            queue: self.queue.clone(),
        })
    }
}

struct DeadLettering {
    inner: BoxHandler,
    queue: DeadLetterQueue,
}

#[async_trait]
impl Handler for DeadLettering {
    async fn handle(&self, envelope: Envelope) -> Result<(), HandlerError> {
        // Reference-counted copies, so the failure path still has the message (the position,
        // which may own a string, is not needed for the dead letter).
        let message = envelope.message.clone();
        let (topic, group, attempt) = (
            envelope.info.topic.clone(),
            envelope.info.group.clone(),
            envelope.info.attempt,
        );
        let err = match self.inner.handle(envelope).await {
            Ok(()) => return Ok(()),
            Err(err) => err,
        };
        let Some(reason) = err.dead_letter_reason() else {
            return Err(err);
        };
        let info = crate::delivery::DeliveryInfo {
            topic,
            group,
            attempt,
            redelivered: attempt > 1,
            position: None,
        };
        let now = SystemTime::now();
        let letter = DeadLetter::new(
            &message,
            &info,
            reason,
            &err.error().to_string(),
            err.first_failure().unwrap_or(now),
            now,
        );
        match self.queue.send(&letter).await {
            Ok(topic) => {
                // The delivery is settled as handled, but its processing failed: the
                // process span says so.
                let process = tracing::Span::current();
                process.record("otel.status_code", "ERROR");
                process.record("error.type", "dead_lettered");
                tracing::warn!(
                    topic = %info.topic,
                    message_id = message.id(),
                    dead_letter = %letter.id,
                    dlq_topic = %topic,
                    reason = reason.as_str(),
                    attempts = info.attempt,
                    error = %err,
                    "message dead-lettered"
                );
                Ok(())
            }
            Err(send) => {
                tracing::error!(
                    topic = %info.topic,
                    message_id = message.id(),
                    error = %send,
                    "could not dead-letter the message; requeueing it"
                );
                Err(HandlerError::transient(Error::new(
                    send.kind(),
                    format!("dead-lettering failed ({send}) after: {err}"),
                ))
                .with_retry_after(DeadLetterLayer::PUBLISH_RETRY_DELAY))
            }
        }
    }
}
