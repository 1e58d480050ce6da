//! Kafka backend for helix-messaging, on rdkafka (librdkafka built from the crate's bundled
//! sources).
//!
//! - **Publishing**: an idempotent producer with `acks=all`; a publish resolves on its
//!   delivery report, a batch hands every record to the producer before awaiting any report.
//!   The message key is the record key (so one key stays on one partition, in order), the
//!   payload the record value; see the `wire` module for headers. Closing flushes.
//! - **Topics**: created on first use with [`KafkaConfig::default_partitions`] partitions, or
//!   declared up front with [`KafkaBroker::create_topics`] ([`KafkaTopic::helixagent`] is HelixAgent's
//!   table). [`KafkaConfig::topic_prefix`] is prepended.
//! - **Consuming**: a subscription is a consumer in its group (a private group when it names
//!   none). A new group starts where [`SubscribeOptions::start`] says and commits that
//!   position at once, so what is published while it has no member waits for it. Offsets are
//!   committed only up to the lowest unsettled offset per partition. `nack(true)` leaves the
//!   record unsettled and hands it out again to the same subscription with `attempt + 1`
//!   (nothing is written to the topic, so no other group sees it again); a delivery dropped
//!   unsettled is handed out again the same way. Attempts survive a change of owner in the
//!   committed offsets' metadata. A message whose TTL has passed is skipped when read. On
//!   revoke, what is settled is committed and the partition's undelivered records are
//!   dropped.
//! - **Replay**: `read_range` reads every partition from the broker's offset for the window's
//!   start (or the beginning, on brokers without a timestamp index) to the high watermark, and
//!   filters by record timestamp. It begins once the records this handle took and whose
//!   publishers stopped waiting for them (a dropped publish) are delivered or failed, so it
//!   sees every record the handle took before it.

mod acker;
mod attempts;
mod config;
mod error;
mod history;
mod offsets;
mod reader;
mod rebalance;
mod reconnects;
mod reports;
mod retry_lane;
mod shared;
mod topics;
mod wire;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use async_trait::async_trait;
use helix_messaging_core::{
    BatchReport, Broker, Capabilities, DEFAULT_PREFETCH, Error, Health, HistoryStream, Message,
    Publisher, Result, SubscribeOptions, Subscriber, Subscription, TimeRange, validate_name,
    within,
};
use rdkafka::consumer::Consumer;
use rdkafka::producer::Producer;
use tokio::sync::mpsc;
// Only the `# Errors` sections below name it.
#[cfg(doc)]
use helix_messaging_core::ErrorKind;

pub use config::{CAPABILITIES, Compression, DEFAULT_MAX_PAYLOAD_BYTES, KafkaConfig, NAME};
pub use topics::KafkaTopic;

use error::{blocking, from_kafka};
use offsets::GroupState;
use reader::{Reader, ReaderParts};
use rebalance::{GroupConsumer, GroupContext};
use reconnects::StatsContext;
use retry_lane::{RetryLane, StartReader};
use shared::{HelixProducer, Shared};
use topics::Topics;

/// A connection to a Kafka cluster: one producer shared by every publish, one consumer per
/// subscription. Cheap to clone.
#[derive(Clone)]
pub struct KafkaBroker {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for KafkaBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaBroker")
            .field("config", &self.shared.config)
            .field("closed", &*self.shared.closed.borrow())
            .finish_non_exhaustive()
    }
}

impl KafkaBroker {
    /// Create the producer and check the cluster answers (its metadata, within
    /// [`KafkaConfig::request_timeout`]).
    ///
    /// # Errors
    /// [`ErrorKind::Config`] for settings librdkafka refuses; [`ErrorKind::Connection`] /
    /// [`ErrorKind::Timeout`] when no broker answers.
    pub async fn connect(config: KafkaConfig) -> Result<Self> {
        let producer: HelixProducer = config
            .producer()
            .create_with_context(StatsContext::default())
            .map_err(|e| config.client_error(e, "creating the Kafka producer"))?;
        let topics = Topics::new(&config)?;
        let broker = KafkaBroker {
            shared: Arc::new(Shared::new(config, producer, topics)),
        };
        broker.metadata().await?;
        Ok(broker)
    }

    /// Connect with settings from the environment (see [`KafkaConfig::from_vars`]).
    ///
    /// # Errors
    /// As [`KafkaConfig::from_vars`] and [`KafkaBroker::connect`].
    pub async fn from_env() -> Result<Self> {
        KafkaBroker::connect(KafkaConfig::from_env()?).await
    }

    /// The settings in use.
    pub fn config(&self) -> &KafkaConfig {
        &self.shared.config
    }

    /// Create `topics` (their names get the topic prefix); existing ones are left as they are.
    ///
    /// # Errors
    /// [`ErrorKind::Rejected`] when the cluster refuses one (too many partitions, bad
    /// retention, …); [`ErrorKind::Timeout`] / [`ErrorKind::Connection`] otherwise.
    pub async fn create_topics(&self, topics: &[KafkaTopic]) -> Result<()> {
        self.shared.ensure_open()?;
        let prefixed: Vec<KafkaTopic> = topics
            .iter()
            .map(|t| KafkaTopic {
                name: self.shared.config.kafka_topic(&t.name),
                ..t.clone()
            })
            .collect();
        self.shared
            .topics
            .create(&self.shared.config, &prefixed)
            .await
    }

    /// Fetch the cluster's metadata: proves a broker answers.
    async fn metadata(&self) -> Result<usize> {
        let shared = self.shared.clone();
        let timeout = shared.config.request_timeout;
        let brokers = shared.config.brokers.clone();
        blocking("reading the cluster's metadata", move || {
            shared
                .producer
                .client()
                .fetch_metadata(None, timeout)
                .map(|m| m.brokers().len())
                .map_err(|e| from_kafka(e, format!("reaching the Kafka brokers {brokers}")))
        })
        .await
    }
}

#[async_trait]
impl Publisher for KafkaBroker {
    async fn publish(&self, topic: &str, message: Message) -> Result<()> {
        validate_name("topic", topic)?;
        self.shared.ensure_open()?;
        self.shared.publish_one(topic, &message).await
    }

    async fn publish_batch(&self, topic: &str, messages: Vec<Message>) -> BatchReport {
        let total = messages.len();
        let kafka_topic = self.shared.config.kafka_topic(topic);
        let ready = async {
            validate_name("topic", topic)?;
            self.shared.ensure_open()?;
            self.shared
                .topics
                .ensure(&self.shared.config, &kafka_topic)
                .await
        };
        if let Err(err) = ready.await {
            return BatchReport::all_failed(total, &err);
        }
        // Every record goes to the producer before any report is awaited: librdkafka batches
        // them, and the reports arrive together. The first verdict asked for waits for them
        // all, once; each record's is then looked up by the key its slot was made with.
        let shared = &self.shared;
        let kafka_topic = &kafka_topic;
        let reports = &shared.pending_reports();
        let mut next_key = 0;
        BatchReport::pipelined(
            messages,
            |message| {
                let key = next_key;
                next_key += 1;
                let slot = reports.slot(key);
                async move {
                    shared.enqueue_waiting(kafka_topic, &message, slot).await?;
                    Ok(key)
                }
            },
            |key| reports.delivered(key, kafka_topic),
        )
        .await
    }
}

#[async_trait]
impl Subscriber for KafkaBroker {
    async fn subscribe(&self, topic: &str, options: SubscribeOptions) -> Result<Subscription> {
        validate_name("topic", topic)?;
        if let Some(group) = &options.group {
            validate_name("group", group)?;
        }
        self.shared.ensure_open()?;
        let config = &self.shared.config;
        let kafka_topic = config.kafka_topic(topic);
        self.shared.topics.ensure(config, &kafka_topic).await?;
        let group_id = match &options.group {
            Some(group) => group.clone(),
            None => format!("helix-private-{}", uuid::Uuid::new_v4().simple()),
        };
        let (deliveries, mut receiver) = mpsc::unbounded_channel();
        let lane = Lane {
            shared: self.shared.clone(),
            deliveries: deliveries.downgrade(),
            prefetch: if options.prefetch == DEFAULT_PREFETCH {
                config.max_poll_records
            } else {
                options.prefetch.max(1)
            },
            topic: Arc::from(topic),
            group: options.group.as_deref().map(Arc::from),
        };
        let retry = options
            .group
            .as_deref()
            .and_then(|group| RetryLane::new(&self.shared, lane.clone(), &kafka_topic, group));
        let state = lane.start(&kafka_topic, &group_id, options.start, retry.clone())?;
        // Copies left on the retry topic by members that are gone are read from the start.
        if let Some(retry) = &retry
            && self
                .shared
                .topics
                .exists(config, &retry.kafka_topic)
                .await?
        {
            retry.ensure_started().await?;
        }
        // From here only running readers keep the stream open: it ends once they have.
        drop(deliveries);
        // Registered once the group has placed this member: only then is every later publish
        // certain to reach the group from the position it starts at.
        let joined = config.request_timeout + config.session_timeout;
        within(
            joined,
            format!("joining group {group_id} on {kafka_topic}"),
            rebalance::first_assignment(&state),
        )
        .await?;
        // A delivery counts as an attempt once the application has it: one still queued here
        // when the subscription is dropped was never seen.
        let mut batch: Option<(Arc<GroupState>, std::vec::IntoIter<Result<reader::Unboxed>>)> =
            None;
        let stream = futures::stream::poll_fn(move |cx| {
            loop {
                if let Some((state, deliveries)) = &mut batch {
                    if let Some(delivery) = deliveries.next() {
                        if let Ok(delivery) = &delivery
                            && let Some(helix_messaging_core::Position::Offset {
                                partition,
                                offset,
                            }) = delivery.info.position
                        {
                            state.received(partition, offset, delivery.info.attempt);
                        }
                        return std::task::Poll::Ready(Some(
                            delivery.map(reader::Unboxed::into_delivery),
                        ));
                    }
                    batch = None;
                }
                match receiver.poll_recv(cx) {
                    std::task::Poll::Ready(Some((state, deliveries))) => {
                        batch = Some((state, deliveries.into_iter()));
                    }
                    std::task::Poll::Ready(None) => return std::task::Poll::Ready(None),
                    std::task::Poll::Pending => return std::task::Poll::Pending,
                }
            }
        });
        Ok(Subscription::new(lane.topic, lane.group, Box::pin(stream)))
    }
}

/// What a subscription's readers (of its topic and of its retry topic) share.
#[derive(Clone)]
struct Lane {
    shared: Arc<Shared>,
    /// Weak: what keeps a subscription's stream open is its running readers, never an
    /// unsettled delivery (whose acker can reach this lane through the retry lane), so the
    /// stream ends when the broker closes whatever the application still holds.
    deliveries: mpsc::WeakUnboundedSender<reader::Handed>,
    prefetch: usize,
    /// The topic as the application names it (what deliveries report).
    topic: Arc<str>,
    group: Option<Arc<str>>,
}

impl StartReader for Lane {
    fn start(
        &self,
        kafka_topic: &str,
        group_id: &str,
        start: helix_messaging_core::StartPosition,
        retry: Option<Arc<RetryLane>>,
    ) -> Result<Arc<GroupState>> {
        let config = &self.shared.config;
        let deliveries = self
            .deliveries
            .upgrade()
            .ok_or_else(|| Error::closed(format!("the subscription to {}", self.topic)))?;
        let state = GroupState::new(kafka_topic.to_owned());
        let fallback = match start {
            helix_messaging_core::StartPosition::Latest => "latest",
            _ => "earliest",
        };
        let consumer: GroupConsumer = config
            .consumer(group_id)
            .set("auto.offset.reset", fallback)
            .create_with_context(GroupContext::new(state.clone(), start, config))
            .map_err(|e| {
                config.client_error(e, &format!("creating a consumer for group {group_id}"))
            })?;
        consumer
            .subscribe(&[kafka_topic])
            .map_err(|e| from_kafka(e, format!("subscribing to {kafka_topic}")))?;
        let reader = Reader::new(ReaderParts {
            consumer: Arc::new(consumer),
            state: state.clone(),
            shared: self.shared.clone(),
            deliveries,
            prefetch: self.prefetch,
            topic: self.topic.clone(),
            group: self.group.clone(),
            retry,
        });
        let mut readers = self.shared.readers.lock();
        readers.retain(|r| !r.is_finished());
        readers.push(tokio::spawn(reader.run()));
        Ok(state)
    }
}

#[async_trait]
impl Broker for KafkaBroker {
    fn name(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        self.shared.config.capabilities()
    }

    async fn health(&self) -> Health {
        if *self.shared.closed.borrow() {
            return Health::unhealthy("the kafka broker is closed");
        }
        match self.metadata().await {
            Ok(brokers) => Health::healthy(format!(
                "{brokers} broker(s) reachable at {}",
                self.shared.config.brokers
            )),
            Err(err) => Health::unhealthy(err.to_string()),
        }
    }

    /// `waiting` is the group's lag: per partition, the high watermark less the committed
    /// offset (the low watermark where it has committed nothing). Kafka does not know what a
    /// member holds unsettled (`in_flight` is unknown), and copies waiting out a delay on the
    /// group's retry topic are not counted.
    async fn backlog(&self, topic: &str, group: &str) -> Result<helix_messaging_core::Backlog> {
        validate_name("topic", topic)?;
        validate_name("group", group)?;
        self.shared.ensure_open()?;
        let config = self.shared.config.clone();
        let kafka_topic = config.kafka_topic(topic);
        let group = group.to_owned();
        blocking("reading a group's backlog", move || {
            history::group_lag(&config, &kafka_topic, &group)
        })
        .await
        .map(|waiting| helix_messaging_core::Backlog {
            waiting,
            in_flight: None,
        })
    }

    /// The Kafka consumer group of that name, on the topic's Kafka name.
    fn group_address(&self, topic: &str, group: &str) -> helix_messaging_core::GroupAddress {
        helix_messaging_core::GroupAddress {
            kind: "consumer group",
            name: group.to_owned(),
            source: Some(format!("topic {}", self.shared.config.kafka_topic(topic))),
        }
    }

    /// Commits the group's start position from outside it: no member joins, so a running
    /// group is not rebalanced.
    async fn create_group(&self, topic: &str, group: &str) -> Result<()> {
        validate_name("topic", topic)?;
        validate_name("group", group)?;
        self.shared.ensure_open()?;
        let config = self.shared.config.clone();
        let kafka_topic = config.kafka_topic(topic);
        self.shared.topics.ensure(&config, &kafka_topic).await?;
        let group = group.to_owned();
        blocking("creating a consumer group", move || {
            history::create_group(&config, &kafka_topic, &group)
        })
        .await
    }

    async fn read_range(&self, topic: &str, range: TimeRange) -> Result<HistoryStream> {
        validate_name("topic", topic)?;
        self.shared.ensure_open()?;
        let kafka_topic = self.shared.config.kafka_topic(topic);
        // A record this handle took stays in the producer when its publisher stops waiting
        // (a replay run stopped mid-publish), and the read must see it: the run resuming the
        // replay looks for its predecessor's copies in the history.
        self.shared.settle().await?;
        history::stream(self.shared.config.clone(), kafka_topic, range).await
    }

    async fn close(&self) -> Result<()> {
        if self.shared.closing.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        self.shared.closed.send_replace(true);
        // Subscriptions end: each gives its deliveries still out the shutdown grace, commits
        // and leaves its group.
        let readers = std::mem::take(&mut *self.shared.readers.lock());
        let limit = self.shared.config.shutdown_grace + self.shared.config.request_timeout * 2;
        if within(
            limit,
            "ending the subscriptions",
            futures::future::join_all(readers),
        )
        .await
        .is_err()
        {
            tracing::warn!(?limit, "subscriptions did not end in time; closing anyway");
        }
        let shared = self.shared.clone();
        let timeout = shared.config.publish_timeout;
        blocking("flushing the producer", move || {
            shared
                .producer
                .flush(timeout)
                .map_err(|e| from_kafka(e, "flushing the producer"))
        })
        .await
    }
}
