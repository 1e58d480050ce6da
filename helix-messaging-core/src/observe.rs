//! Message counts and delivery latency for any [`Broker`], under HelixAgent's metric names,
//! through the [`metrics`] facade (the application installs the exporter).
//!
//! [`ObservedBroker`] records, with the labels `backend` (the adapter's name) and `topic`:
//!
//! - `messaging_messages_published_total`: messages the broker accepted;
//! - `messaging_publish_failures_total`: publishes it did not (label `kind` too, the
//!   [`ErrorKind`](crate::ErrorKind) in snake case);
//! - `messaging_messages_consumed_total`: deliveries handed to a subscriber, each attempt
//!   counted (a redelivery is consumed again);
//! - `messaging_delivery_latency_seconds`: a histogram of the time from a message's
//!   timestamp to its delivery (a first delivery's is the transit time; a redelivery's
//!   includes its earlier attempts);
//! - `messaging_consume_errors_total`: errors a subscription reported and survived;
//! - `messaging_messages_acked_total` and `messaging_messages_nacked_total` (label `requeue`
//!   too: `"true"` for a requeue, delayed or not, `"false"` for a reject): settlements of
//!   its deliveries the broker accepted ([`settle`]);
//!
//! and, labelled `backend` alone:
//!
//! - `messaging_publish_latency_seconds`: a histogram of how long each publish call took,
//!   whether it succeeded or not (a batch is one call), in [`LATENCY_BUCKETS`].
//!
//! and, for every consumer group subscribed through it (label `group` too), sampled from
//! [`Broker::backlog`] every [`DEFAULT_BACKLOG_INTERVAL`] (see
//! [`ObservedBroker::with_backlog_interval`]) on backends that declare
//! [`Capabilities::backlog`]:
//!
//! - `messaging_queue_depth`: messages waiting for the group, not yet delivered to any
//!   member ([`Backlog::waiting`]);
//! - `messaging_consumer_lag`: everything the group has not finished, waiting plus
//!   delivered-but-unsettled where the backend knows that ([`Backlog::lag`]; on Kafka the
//!   distance from the committed offset to the high watermark);
//! - `messaging_backlog_sample_errors_total`: samples the broker could not answer (the
//!   gauges then keep their last value).
//!
//! Adapters count `messaging_reconnects_total` (label `backend`, [`count_reconnect`]) where
//! they re-establish a lost connection, whether or not they are observed, and report their
//! connections' state, the connections they make and the attempts that fail ([`connection`]).
//!
//! A group stays sampled after its last subscription ends, until the broker is closed or
//! dropped: a backlog that grows while nobody consumes is what the gauges are for. At most
//! [`MAX_SAMPLED_GROUPS`] (topic, group) pairs are sampled; later ones are not (logged once).
//!
//! Every publish also gets a `publish {topic}` span and the message its W3C `traceparent`
//! ([`crate::trace`]); a subscription names the backend, so the runner's process spans carry
//! `messaging.system`.
//!
//! **Topic cardinality is bounded**: the first [`TopicLabels::max`] distinct topics an
//! `ObservedBroker` sees keep their own label, every later one is recorded under
//! [`OTHER_TOPICS`], so a service publishing to per-user or per-request topics cannot grow
//! the exporter's memory without bound. Clones of one `ObservedBroker` share the bound.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use futures::StreamExt;
use opentelemetry::trace::TraceContextExt;
use parking_lot::Mutex;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::broker::{
    Backlog, BatchReport, Broker, Health, HistoryStream, Publisher, SubscribeOptions, Subscriber,
    Subscription, TimeRange,
};
use crate::capabilities::Capabilities;
use crate::error::{Error, Result};
use crate::message::Message;
pub use crate::names::{DEFAULT_MAX_TOPIC_LABELS, OTHER_TOPICS, TopicLabels};
use crate::observe::settle::SettleCounters;
use crate::stack::BrokerLayer;
use crate::trace;

pub mod connection;
pub mod settle;

/// The histogram of publish call durations, labelled `backend` (the module docs).
pub const PUBLISH_LATENCY_METRIC: &str = "messaging_publish_latency_seconds";

/// The counter of connections an adapter re-established after losing them, labelled
/// `backend` (each adapter documents what it counts).
pub const RECONNECTS_METRIC: &str = "messaging_reconnects_total";

/// Count one re-established connection of `backend` in [`RECONNECTS_METRIC`]. Adapters call
/// it from their reconnect paths.
pub fn count_reconnect(backend: &'static str) {
    count_reconnects(backend, 1);
}

/// Count `n` re-established connections of `backend` in [`RECONNECTS_METRIC`].
pub fn count_reconnects(backend: &'static str, n: u64) {
    metrics::counter!(RECONNECTS_METRIC, "backend" => backend).increment(n);
}

/// The bucket bounds, in seconds, of every latency histogram this project records (the
/// names ending in `_seconds`: `messaging_delivery_latency_seconds`,
/// `messaging_publish_latency_seconds`). An exporter renders them as Prometheus histograms
/// with these `le` bounds (the admin API's `install_prometheus` does), so
/// `histogram_quantile` works over `_bucket` and instances aggregate.
///
/// From 1 ms (an in-process or local broker) to 5 minutes: a redelivery's latency includes
/// its earlier attempts and their backoff, and a delivery after a consumer outage its wait.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// How often the backlog gauges are sampled by default.
pub const DEFAULT_BACKLOG_INTERVAL: Duration = Duration::from_secs(15);

/// The most (topic, group) pairs one [`ObservedBroker`] samples.
pub const MAX_SAMPLED_GROUPS: usize = 1_000;

/// A broker whose publishes and deliveries are counted (see the module docs). Everything
/// else passes through unchanged; it adds no errors of its own. Build it with
/// [`ObservedBroker::new`] or, stacked with the other wrappers, [`ObserveLayer`].
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use std::sync::Arc;
///
/// use helix_messaging_core::observe::ObservedBroker;
/// use helix_messaging_core::{Message, Publisher};
/// use helix_messaging_memory::MemoryBroker;
/// use metrics_util::debugging::{DebugValue, DebuggingRecorder};
///
/// // The application installs an exporter (Prometheus, say); a debugging one here.
/// let recorder = DebuggingRecorder::new();
/// let snapshots = recorder.snapshotter();
/// recorder.install().expect("the only recorder");
///
/// let observed = ObservedBroker::new(Arc::new(MemoryBroker::new()));
/// observed.publish("orders", Message::new("order 7")).await?;
/// let published = snapshots.snapshot().into_vec().into_iter().find_map(|(key, _, _, value)| {
///     (key.key().name() == "messaging_messages_published_total").then_some(value)
/// });
/// assert_eq!(published, Some(DebugValue::Counter(1)));
/// # Ok::<(), helix_messaging_core::Error>(())
/// # }).unwrap();
/// ```
#[derive(Clone)]
pub struct ObservedBroker {
    shared: Arc<Backlogs>,
}

/// What the clones of one [`ObservedBroker`] share: the broker, its topic labels, and the
/// consumer groups it samples with its sampling task's state. The task holds it weakly, so
/// it ends when the last clone of the broker is dropped.
struct Backlogs {
    inner: Arc<dyn Broker>,
    topics: Arc<TopicLabels>,
    interval: Duration,
    groups: Mutex<HashSet<(String, String)>>,
    started: AtomicBool,
    closed: AtomicBool,
    warned_full: AtomicBool,
}

impl Backlogs {
    fn new(inner: Arc<dyn Broker>, topics: Arc<TopicLabels>, interval: Duration) -> Arc<Self> {
        Arc::new(Backlogs {
            inner,
            topics,
            interval,
            groups: Mutex::new(HashSet::new()),
            started: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            warned_full: AtomicBool::new(false),
        })
    }

    /// Remember `topic`'s `group`; start the sampling task with the first one.
    fn track(self: &Arc<Self>, topic: &str, group: &str) {
        {
            let mut groups = self.groups.lock();
            if groups.len() >= MAX_SAMPLED_GROUPS {
                if !groups.contains(&(topic.to_owned(), group.to_owned()))
                    && !self.warned_full.swap(true, Ordering::Relaxed)
                {
                    tracing::warn!(
                        max = MAX_SAMPLED_GROUPS,
                        "too many consumer groups to sample backlogs of; later ones are not sampled"
                    );
                }
                return;
            }
            groups.insert((topic.to_owned(), group.to_owned()));
        }
        if self.interval.is_zero() || self.started.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.started.store(false, Ordering::Release);
            return;
        };
        let weak = Arc::downgrade(self);
        runtime.spawn(sample_every(weak, self.interval));
    }

    /// Sample every tracked group once and set the gauges. Topics sharing a label (past the
    /// topic bound) are summed; a label one of whose groups could not be sampled keeps its
    /// last value rather than showing a partial sum.
    async fn sample(&self) {
        let groups: Vec<(String, String)> = self.groups.lock().iter().cloned().collect();
        let backend = self.inner.name();
        let mut sums: HashMap<(Arc<str>, String), LabelSum> = HashMap::new();
        for (topic, group) in groups {
            let label = self.topics.label(&topic);
            let sample = match self.inner.backlog(&topic, &group).await {
                Ok(backlog) => Some((backlog.waiting, backlog.lag())),
                Err(err) => {
                    tracing::debug!(%topic, %group, error = %err, "backlog sample failed");
                    metrics::counter!("messaging_backlog_sample_errors_total", "backend" => backend)
                        .increment(1);
                    None
                }
            };
            let sum = sums.entry((label, group)).or_insert(Some((0, 0)));
            *sum = match (*sum, sample) {
                (Some((waiting, lag)), Some((w, l))) => Some((waiting + w, lag + l)),
                _ => None,
            };
        }
        for ((topic, group), sum) in sums {
            let Some((waiting, lag)) = sum else { continue };
            let labels = [
                ("backend", backend.to_owned()),
                ("topic", topic.to_string()),
                ("group", group),
            ];
            metrics::gauge!("messaging_queue_depth", &labels).set(waiting as f64);
            metrics::gauge!("messaging_consumer_lag", &labels).set(lag as f64);
        }
    }
}

/// Waiting and lag summed over a label's topics for one group; `None` once one of them
/// could not be sampled.
type LabelSum = Option<(u64, u64)>;

async fn sample_every(backlogs: Weak<Backlogs>, interval: Duration) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(backlogs) = backlogs.upgrade() else {
            return;
        };
        if backlogs.closed.load(Ordering::Acquire) {
            return;
        }
        backlogs.sample().await;
    }
}

/// Builds [`ObservedBroker`]s, as a [`BrokerLayer`] (see [`crate::stack`] for where it
/// stacks): each with at most [`DEFAULT_MAX_TOPIC_LABELS`] topic labels and backlog samples
/// every [`DEFAULT_BACKLOG_INTERVAL`], unless told otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObserveLayer {
    max_topic_labels: usize,
    backlog_interval: Duration,
}

impl Default for ObserveLayer {
    fn default() -> Self {
        ObserveLayer {
            max_topic_labels: DEFAULT_MAX_TOPIC_LABELS,
            backlog_interval: DEFAULT_BACKLOG_INTERVAL,
        }
    }
}

impl ObserveLayer {
    /// The defaults.
    pub fn new() -> Self {
        ObserveLayer::default()
    }

    /// At most `max` distinct topic labels per broker ([`TopicLabels`]).
    pub fn with_max_topic_labels(mut self, max: usize) -> Self {
        self.max_topic_labels = max;
        self
    }

    /// Backlog samples every `interval` ([`ObservedBroker::with_backlog_interval`]).
    pub fn with_backlog_interval(mut self, interval: Duration) -> Self {
        self.backlog_interval = interval;
        self
    }
}

#[async_trait]
impl BrokerLayer for ObserveLayer {
    type Wrapped = ObservedBroker;

    async fn wrap(&self, inner: Arc<dyn Broker>) -> Result<ObservedBroker> {
        Ok(
            ObservedBroker::with_topic_labels(inner, TopicLabels::new(self.max_topic_labels))
                .with_backlog_interval(self.backlog_interval),
        )
    }
}

impl std::fmt::Debug for ObservedBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObservedBroker")
            .field("backend", &self.shared.inner.name())
            .field("topic_labels", &self.shared.topics.max())
            .finish()
    }
}

impl ObservedBroker {
    /// Observe `inner`, with at most [`DEFAULT_MAX_TOPIC_LABELS`] topic labels.
    pub fn new(inner: Arc<dyn Broker>) -> Self {
        ObservedBroker::with_topic_labels(inner, TopicLabels::default())
    }

    /// Observe `inner` with the given topic bound.
    pub fn with_topic_labels(inner: Arc<dyn Broker>, topics: TopicLabels) -> Self {
        // Shown at 0 from the start: a dashboard and an alert on reconnects see the series
        // before the first one happens.
        count_reconnects(inner.name(), 0);
        ObservedBroker {
            shared: Backlogs::new(inner, Arc::new(topics), DEFAULT_BACKLOG_INTERVAL),
        }
    }

    /// Sample the backlog gauges every `interval` instead of [`DEFAULT_BACKLOG_INTERVAL`];
    /// [`Duration::ZERO`] samples only when [`ObservedBroker::sample_backlogs`] is called.
    /// Takes effect for a broker no group has subscribed through yet.
    pub fn with_backlog_interval(mut self, interval: Duration) -> Self {
        self.shared = Backlogs::new(
            self.shared.inner.clone(),
            self.shared.topics.clone(),
            interval,
        );
        self
    }

    /// Sample the backlog of every consumer group subscribed through this broker now, and
    /// set `messaging_queue_depth` and `messaging_consumer_lag` (the module docs). A group
    /// the broker cannot report on is counted in `messaging_backlog_sample_errors_total`
    /// and keeps its last values; nothing is returned as an error.
    pub async fn sample_backlogs(&self) {
        self.shared.sample().await;
    }

    fn labels(&self, topic: &str) -> [(&'static str, String); 2] {
        [
            ("backend", self.shared.inner.name().to_owned()),
            ("topic", self.shared.topics.label(topic).to_string()),
        ]
    }

    fn time_publish(&self, started: Instant) {
        metrics::histogram!(PUBLISH_LATENCY_METRIC, "backend" => self.shared.inner.name())
            .record(started.elapsed().as_secs_f64());
    }

    fn count_published(&self, topic: &str, accepted: usize, failures: &[&Error]) {
        let labels = self.labels(topic);
        if accepted > 0 {
            metrics::counter!("messaging_messages_published_total", &labels)
                .increment(accepted as u64);
        }
        for err in failures {
            let [backend, topic] = labels.clone();
            metrics::counter!(
                "messaging_publish_failures_total",
                &[backend, topic, ("kind", err.kind().label().to_owned())]
            )
            .increment(1);
        }
    }
}

#[async_trait]
impl Publisher for ObservedBroker {
    async fn publish(&self, topic: &str, mut message: Message) -> Result<()> {
        let span = trace::publish_span(self.shared.inner.name(), topic, &message);
        trace::stamp(&mut message, &span);
        let started = Instant::now();
        let outcome = trace::in_span(span, self.shared.inner.publish(topic, message)).await;
        self.time_publish(started);
        match &outcome {
            Ok(()) => self.count_published(topic, 1, &[]),
            Err(err) => self.count_published(topic, 0, &[err]),
        }
        outcome
    }

    async fn publish_batch(&self, topic: &str, mut messages: Vec<Message>) -> BatchReport {
        let span = trace::batch_publish_span(self.shared.inner.name(), topic, messages.len());
        if !span.is_disabled() {
            let cx = span.context();
            for message in &mut messages {
                // A message that already carries a context (a replay copy, a spooled
                // publish) keeps it, so its consumer continues that trace; the batch span
                // links to it.
                let carried = trace::carried_context(message);
                let carried = carried.span().span_context().clone();
                if carried.is_valid() {
                    span.add_link(carried);
                } else {
                    trace::stamp_context(message, &cx);
                }
            }
        }
        let started = Instant::now();
        let report = self
            .shared
            .inner
            .publish_batch(topic, messages)
            .instrument(span.clone())
            .await;
        self.time_publish(started);
        let failures: Vec<&Error> = report.failures().iter().map(|(_, err)| err).collect();
        if let Some(first) = failures.first() {
            trace::record_error(&span, first);
        }
        self.count_published(topic, report.succeeded(), &failures);
        report
    }
}

#[async_trait]
impl Subscriber for ObservedBroker {
    async fn subscribe(&self, topic: &str, options: SubscribeOptions) -> Result<Subscription> {
        let subscription = self.shared.inner.subscribe(topic, options).await?;
        if let Some(group) = subscription.group()
            && self.shared.inner.capabilities().backlog
        {
            self.shared.track(topic, group);
        }
        let name: Arc<str> = Arc::from(subscription.topic());
        let group = subscription.group().map(Arc::from);
        // The handles are looked up once: a delivery only bumps them.
        let labels = self.labels(topic);
        let consumed = metrics::counter!("messaging_messages_consumed_total", &labels);
        let latency = metrics::histogram!("messaging_delivery_latency_seconds", &labels);
        let errors = metrics::counter!("messaging_consume_errors_total", &labels);
        let settles = SettleCounters::new(&labels);
        let observed = subscription.map(move |item| match item {
            Ok(delivery) => {
                consumed.increment(1);
                // A timestamp ahead of this clock (skew between hosts) records nothing
                // rather than a made-up zero.
                if let Ok(age) = SystemTime::now().duration_since(delivery.message().timestamp()) {
                    latency.record(age.as_secs_f64());
                }
                Ok(settles.wrap(delivery))
            }
            Err(err) => {
                errors.increment(1);
                Err(err)
            }
        });
        Ok(
            Subscription::new(name, group, Box::pin(observed))
                .with_system(self.shared.inner.name()),
        )
    }
}

#[async_trait]
impl Broker for ObservedBroker {
    fn name(&self) -> &'static str {
        self.shared.inner.name()
    }

    fn capabilities(&self) -> Capabilities {
        self.shared.inner.capabilities()
    }

    async fn health(&self) -> Health {
        self.shared.inner.health().await
    }

    async fn read_range(&self, topic: &str, range: TimeRange) -> Result<HistoryStream> {
        self.shared.inner.read_range(topic, range).await
    }

    async fn backlog(&self, topic: &str, group: &str) -> Result<Backlog> {
        self.shared.inner.backlog(topic, group).await
    }

    fn group_address(&self, topic: &str, group: &str) -> crate::broker::GroupAddress {
        self.shared.inner.group_address(topic, group)
    }

    async fn create_group(&self, topic: &str, group: &str) -> Result<()> {
        self.shared.inner.create_group(topic, group).await
    }

    async fn close(&self) -> Result<()> {
        self.shared.closed.store(true, Ordering::Release);
        self.shared.inner.close().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_past_the_bound_share_one_label_and_known_ones_keep_theirs() {
        let labels = TopicLabels::new(2);
        assert_eq!(&*labels.label("a"), "a");
        assert_eq!(&*labels.label("b"), "b");
        assert_eq!(&*labels.label("c"), OTHER_TOPICS);
        assert_eq!(&*labels.label("a"), "a", "a labelled topic keeps its label");
        assert_eq!(&*TopicLabels::new(0).label("a"), OTHER_TOPICS);
    }
}
