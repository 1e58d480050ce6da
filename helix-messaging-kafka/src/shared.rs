//! What the broker handle and every subscription and delivery share: the settings, the
//! producers and the topics known to exist. Kept beneath the readers and ackers (which
//! publish retry copies and watch for close through it) so that they need nothing from the
//! crate root, which is built on them.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use helix_messaging_core::{Error, ErrorKind, Message, Result, check_payload_size, within};
use rdkafka::producer::BaseRecord;
use tokio::sync::watch;

use crate::config::{KafkaConfig, NAME};
use crate::error::publishing;
use crate::reconnects::StatsContext;
pub(crate) use crate::reports::HelixProducer;
use crate::reports::{self, PendingReports, Slot, Unsettled};
use crate::topics::Topics;
use crate::wire;

/// What the broker handle and every subscription and delivery share.
pub(crate) struct Shared {
    pub(crate) config: KafkaConfig,
    pub(crate) producer: HelixProducer,
    /// Writes retry-topic copies one record per batch (see [`Shared::retry_producer`]).
    retry_producer: parking_lot::Mutex<Option<HelixProducer>>,
    pub(crate) topics: Topics,
    unsettled: Arc<Unsettled>,
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
            unsettled: Arc::default(),
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

    /// A publishing call's delivery reports (see [`PendingReports`]).
    pub(crate) fn pending_reports(&self) -> PendingReports {
        PendingReports::new(self.unsettled.clone())
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

    /// Hand one record to `producer` with the record headers given; its report settles
    /// `slot`.
    ///
    /// # Errors
    /// The producer's refusal (a full queue is a retryable [`ErrorKind::Timeout`]), or a
    /// payload over the size limit, with `slot` back for another try.
    pub(crate) fn enqueue_with(
        &self,
        producer: &HelixProducer,
        kafka_topic: &str,
        message: &Message,
        headers: rdkafka::message::OwnedHeaders,
        slot: Box<Slot>,
    ) -> std::result::Result<(), (Error, Box<Slot>)> {
        if let Err(err) = check_payload_size(NAME, message, self.config.max_payload_bytes) {
            return Err((err, slot));
        }
        let mut record: BaseRecord<'_, str, [u8], Box<Slot>> =
            BaseRecord::with_opaque_to(kafka_topic, slot)
                .payload(message.payload().as_ref())
                .timestamp(wire::millis(message.timestamp()))
                .headers(headers);
        if let Some(key) = message.key() {
            record = record.key(key);
        }
        producer
            .send(record)
            .map_err(|(err, record)| (publishing(err, kafka_topic), record.delivery_opaque))
    }

    /// Wait for the delivery reports of the records whose publishers stopped waiting for
    /// them (see [`Unsettled`]), so that a history read that begins now sees every record
    /// this handle took before. The producer reports on a record within its message timeout
    /// (the publish timeout) of taking it, or once the request it is in is answered.
    ///
    /// # Errors
    /// A retryable [`ErrorKind::Timeout`] when they are not all in by then.
    pub(crate) async fn settle(&self) -> Result<()> {
        let calls = self.unsettled.in_flight();
        if calls.is_empty() {
            return Ok(());
        }
        let limit = self.config.publish_timeout + self.config.request_timeout;
        within(
            limit,
            "the delivery reports of records published before the read",
            reports::all_in_by_polling(&calls),
        )
        .await
        .map_err(|err| err.with_retryable(true))
    }

    /// Publish one message to `topic` (as the application names it) and wait for its report.
    /// A producer queue that stays full for the publish timeout is a retryable timeout.
    pub(crate) async fn publish_one(&self, topic: &str, message: &Message) -> Result<()> {
        let kafka_topic = self.config.kafka_topic_ref(topic);
        self.topics.ensure(&self.config, &kafka_topic).await?;
        let reports = self.pending_reports();
        self.enqueue_waiting(&kafka_topic, message, reports.slot(0))
            .await?;
        reports.delivered(0, &kafka_topic).await
    }

    /// Hand `message` to the handle's producer, its report settling `slot`, waiting while
    /// the producer's queue is full.
    ///
    /// # Errors
    /// As [`Shared::enqueue_with`], with `slot` withdrawn; a queue that stays full for the
    /// publish timeout is a retryable [`ErrorKind::Timeout`].
    pub(crate) async fn enqueue_waiting(
        &self,
        kafka_topic: &str,
        message: &Message,
        mut slot: Box<Slot>,
    ) -> Result<()> {
        // The clock is read only once the queue is full: this runs for every record.
        let mut deadline = None;
        loop {
            let headers = wire::headers(message);
            match self.enqueue_with(&self.producer, kafka_topic, message, headers, slot) {
                Err((err, back)) if err.kind() == ErrorKind::Timeout && err.is_retryable() => {
                    let now = tokio::time::Instant::now();
                    slot = back;
                    if now >= *deadline.get_or_insert(now + self.config.publish_timeout) {
                        slot.withdraw();
                        return Err(err);
                    }
                    // The queue is full: the delivery reports of earlier records free it.
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                }
                Err((err, mut refused)) => {
                    refused.withdraw();
                    return Err(err);
                }
                Ok(()) => return Ok(()),
            }
        }
    }
}
