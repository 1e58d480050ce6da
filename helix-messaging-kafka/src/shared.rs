//! What the broker handle and every subscription and delivery share: the settings, the
//! producers and the topics known to exist. Kept beneath the readers and ackers (which
//! publish retry copies and watch for close through it) so that they need nothing from the
//! crate root, which is built on them.

use std::sync::atomic::AtomicBool;

use helix_messaging_core::{Error, ErrorKind, Message, Result, check_payload_size};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio::sync::watch;

use crate::config::{KafkaConfig, NAME};
use crate::error::from_kafka;
use crate::reconnects::StatsContext;
use crate::topics::Topics;
use crate::wire;

/// The adapter's producers, whose statistics count their reconnects.
pub(crate) type HelixProducer = FutureProducer<StatsContext>;

/// What the broker handle and every subscription and delivery share.
pub(crate) struct Shared {
    pub(crate) config: KafkaConfig,
    pub(crate) producer: HelixProducer,
    /// Writes retry-topic copies one record per batch (see [`Shared::retry_producer`]).
    retry_producer: parking_lot::Mutex<Option<HelixProducer>>,
    pub(crate) topics: Topics,
    /// Set once on close; readers watch it.
    pub(crate) closed: watch::Sender<bool>,
    pub(crate) closing: AtomicBool,
    /// The subscriptions' reader tasks, awaited on close so every consumer has committed and
    /// left its group when `close` returns.
    pub(crate) readers: parking_lot::Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Shared {
    /// An open broker's shared state around `producer` and `topics`.
    pub(crate) fn new(config: KafkaConfig, producer: HelixProducer, topics: Topics) -> Self {
        Shared {
            config,
            producer,
            retry_producer: parking_lot::Mutex::new(None),
            topics,
            closed: watch::Sender::new(false),
            closing: AtomicBool::new(false),
            readers: parking_lot::Mutex::default(),
        }
    }

    pub(crate) fn ensure_open(&self) -> Result<()> {
        if *self.closed.borrow() {
            Err(Error::closed("the kafka broker"))
        } else {
            Ok(())
        }
    }

    /// Hand one record to the producer; the returned future resolves with its delivery report.
    fn enqueue(
        &self,
        kafka_topic: &str,
        message: &Message,
    ) -> Result<rdkafka::producer::DeliveryFuture> {
        self.enqueue_with(&self.producer, kafka_topic, message, wire::headers(message))
    }

    /// The producer of retry-topic copies, created on first use, with no linger: a delayed
    /// requeue settles its delivery only once its copy's delivery report is in, so waiting
    /// for a batch to fill would hold the consumer's slot for nothing. Retry traffic is
    /// small, so what batching would save is too.
    pub(crate) fn retry_producer(&self) -> Result<HelixProducer> {
        let mut slot = self.retry_producer.lock();
        if let Some(producer) = slot.as_ref() {
            return Ok(producer.clone());
        }
        let producer: HelixProducer = self
            .config
            .producer()
            .set("linger.ms", "0")
            .create_with_context(StatsContext::default())
            .map_err(|e| {
                self.config
                    .client_error(e, "creating the Kafka producer of retry copies")
            })?;
        *slot = Some(producer.clone());
        Ok(producer)
    }

    /// [`Shared::enqueue`] through `producer` with the record headers given.
    pub(crate) fn enqueue_with(
        &self,
        producer: &HelixProducer,
        kafka_topic: &str,
        message: &Message,
        headers: rdkafka::message::OwnedHeaders,
    ) -> Result<rdkafka::producer::DeliveryFuture> {
        check_payload_size(NAME, message, self.config.max_payload_bytes)?;
        let mut record: FutureRecord<'_, str, [u8]> = FutureRecord::to(kafka_topic)
            .payload(message.payload().as_ref())
            .timestamp(wire::millis(message.timestamp()))
            .headers(headers);
        if let Some(key) = message.key() {
            record = record.key(key);
        }
        producer
            .send_result(record)
            .map_err(|(err, _)| from_kafka(err, format!("publishing to {kafka_topic}")))
    }

    /// The broker's verdict on one record.
    pub(crate) async fn delivered(
        &self,
        kafka_topic: &str,
        report: rdkafka::producer::DeliveryFuture,
    ) -> Result<()> {
        match report.await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err((err, _))) => Err(from_kafka(err, format!("publishing to {kafka_topic}"))),
            Err(_) => Err(Error::closed("the kafka producer")),
        }
    }

    /// Publish one message to `topic` (as the application names it) and wait for its report.
    /// A producer queue that stays full for the publish timeout is a retryable timeout.
    pub(crate) async fn publish_one(&self, topic: &str, message: &Message) -> Result<()> {
        let kafka_topic = self.config.kafka_topic_ref(topic);
        self.topics.ensure(&self.config, &kafka_topic).await?;
        let report = self.enqueue_waiting(&kafka_topic, message).await?;
        self.delivered(&kafka_topic, report).await
    }

    /// [`Shared::enqueue`], waiting while the producer's queue is full.
    pub(crate) async fn enqueue_waiting(
        &self,
        kafka_topic: &str,
        message: &Message,
    ) -> Result<rdkafka::producer::DeliveryFuture> {
        // The clock is read only once the queue is full: this runs for every record.
        let mut deadline = None;
        loop {
            match self.enqueue(kafka_topic, message) {
                Err(err) if err.kind() == ErrorKind::Timeout && err.is_retryable() => {
                    let now = tokio::time::Instant::now();
                    if now >= *deadline.get_or_insert(now + self.config.publish_timeout) {
                        return Err(err);
                    }
                    // The queue is full: the delivery reports of earlier records free it.
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                }
                other => return other,
            }
        }
    }
}
