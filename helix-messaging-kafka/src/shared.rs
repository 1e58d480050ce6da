//! What the broker handle and every subscription and delivery share: the settings, the
//! producers and the topics known to exist. Kept beneath the readers and ackers (which
//! publish retry copies and watch for close through it) so that they need nothing from the
//! crate root, which is built on them.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::task::{Context, Poll};

use futures::FutureExt;
use futures::future::{BoxFuture, Shared as SharedFuture};

use helix_messaging_core::{Error, ErrorKind, Message, Result, check_payload_size, within};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use tokio::sync::watch;

use crate::config::{KafkaConfig, NAME};
use crate::error::from_kafka;
use crate::reconnects::StatsContext;
use crate::topics::Topics;
use crate::wire;

/// The adapter's producers, whose statistics count their reconnects.
pub(crate) type HelixProducer = FutureProducer<StatsContext>;

/// Delivery reports of records whose publishers stopped waiting for them, until they are in.
///
/// Dropping a publish does not take its record back from the producer, which still delivers
/// it: a replay run stopped mid-publish (killed, or its lease lost) leaves its copy there,
/// and the run resuming it on the same handle searches the target for the copies published
/// before. A history read waits for these first ([`Shared::settle`]), or it would miss such
/// a copy and the replay publish it twice.
#[derive(Default)]
pub(crate) struct Unsettled(parking_lot::Mutex<Vec<SharedFuture<BoxFuture<'static, ()>>>>);

impl Unsettled {
    fn keep(&self, report: DeliveryFuture) {
        let report = report.map(drop).boxed().shared();
        if report.clone().now_or_never().is_none() {
            let mut held = self.0.lock();
            Self::prune(&mut held);
            held.push(report);
        }
    }

    /// The reports not in yet.
    fn in_flight(&self) -> Vec<SharedFuture<BoxFuture<'static, ()>>> {
        let mut held = self.0.lock();
        Self::prune(&mut held);
        held.clone()
    }

    /// Drop the reports already in: only what is in flight is held.
    fn prune(held: &mut Vec<SharedFuture<BoxFuture<'static, ()>>>) {
        held.retain(|r| r.clone().now_or_never().is_none());
    }
}

/// A record's delivery report. Dropped before the report is in, it is kept in the handle's
/// [`Unsettled`], for history reads to wait for.
pub(crate) struct Report {
    future: Option<DeliveryFuture>,
    unsettled: Arc<Unsettled>,
}

impl Future for Report {
    type Output = <DeliveryFuture as Future>::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let Some(future) = self.future.as_mut() else {
            return Poll::Ready(Err(futures::channel::oneshot::Canceled));
        };
        let report = std::task::ready!(future.poll_unpin(cx));
        self.future = None;
        Poll::Ready(report)
    }
}

impl Drop for Report {
    fn drop(&mut self) {
        if let Some(future) = self.future.take() {
            self.unsettled.keep(future);
        }
    }
}

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

    /// Hand one record to the producer; the returned future resolves with its delivery report.
    fn enqueue(&self, kafka_topic: &str, message: &Message) -> Result<Report> {
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
    ) -> Result<Report> {
        check_payload_size(NAME, message, self.config.max_payload_bytes)?;
        let mut record: FutureRecord<'_, str, [u8]> = FutureRecord::to(kafka_topic)
            .payload(message.payload().as_ref())
            .timestamp(wire::millis(message.timestamp()))
            .headers(headers);
        if let Some(key) = message.key() {
            record = record.key(key);
        }
        let future = producer
            .send_result(record)
            .map_err(|(err, _)| from_kafka(err, format!("publishing to {kafka_topic}")))?;
        Ok(Report {
            future: Some(future),
            unsettled: self.unsettled.clone(),
        })
    }

    /// Wait for the delivery reports of the records whose publishers stopped waiting for
    /// them (see [`Unsettled`]), so that a history read that begins now sees every record
    /// this handle took before. The producer reports on a record within its message timeout
    /// (the publish timeout) of taking it, or once the request it is in is answered.
    ///
    /// # Errors
    /// A retryable [`ErrorKind::Timeout`] when they are not all in by then.
    pub(crate) async fn settle(&self) -> Result<()> {
        let reports = self.unsettled.in_flight();
        if reports.is_empty() {
            return Ok(());
        }
        let limit = self.config.publish_timeout + self.config.request_timeout;
        within(
            limit,
            "the delivery reports of records published before the read",
            futures::future::join_all(reports),
        )
        .await
        .map(drop)
        .map_err(|err| err.with_retryable(true))
    }

    /// The broker's verdict on one record.
    pub(crate) async fn delivered(&self, kafka_topic: &str, report: Report) -> Result<()> {
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
    ) -> Result<Report> {
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
