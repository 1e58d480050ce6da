//! The broker traits every backend implements, and the types they exchange.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::SystemTime;

use async_trait::async_trait;
use futures::stream::{BoxStream, Stream};

use crate::capabilities::Capabilities;
use crate::delivery::{Delivery, Position};
use crate::error::{Error, ErrorKind, Result};
use crate::message::Message;

/// Where a newly created consumer group starts reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StartPosition {
    /// Only messages published after the group was created (the default).
    #[default]
    Latest,
    /// Everything the topic still retains, then new messages.
    Earliest,
    /// Retained messages recorded at or after this time, then new messages.
    Time(SystemTime),
}

/// Default number of unacked deliveries a subscription may hold (HelixAgent's `PrefetchCount`).
pub const DEFAULT_PREFETCH: usize = 100;

/// How to subscribe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscribeOptions {
    /// Consumer group. Members of one group compete for messages; every group gets every
    /// message. A named group outlives its subscriptions: what is published while it has no
    /// member waits for the next one. `None` makes a private group for this subscription
    /// alone, which receives everything published after it subscribed and goes away with it.
    pub group: Option<String>,
    /// Most unacked deliveries this subscription holds at once (at least 1).
    pub prefetch: usize,
    /// Where a group that does not exist yet starts. Ignored for an existing group, which
    /// continues where it is. Anything but [`StartPosition::Latest`] needs
    /// [`Capabilities::replay_by_time`].
    pub start: StartPosition,
}

impl Default for SubscribeOptions {
    fn default() -> Self {
        SubscribeOptions {
            group: None,
            prefetch: DEFAULT_PREFETCH,
            start: StartPosition::Latest,
        }
    }
}

impl SubscribeOptions {
    /// Options for joining consumer group `group`, defaults otherwise.
    pub fn group(group: impl Into<String>) -> Self {
        SubscribeOptions {
            group: Some(group.into()),
            ..SubscribeOptions::default()
        }
    }

    /// Set the prefetch (values below 1 are treated as 1).
    #[must_use]
    pub fn with_prefetch(mut self, prefetch: usize) -> Self {
        self.prefetch = prefetch.max(1);
        self
    }

    /// Set where a new group starts.
    #[must_use]
    pub fn with_start(mut self, start: StartPosition) -> Self {
        self.start = start;
        self
    }
}

/// A live subscription: a [`Stream`] of deliveries.
///
/// The stream yields `Err` for a problem the backend reports but survives (it keeps going),
/// and ends (`None`) when the broker is closed. Dropping the subscription returns its unsettled
/// deliveries to the group on backends with [`Capabilities::redeliver_unacked`]: at once, or
/// (RabbitMQ, whose deliveries can only be settled on their own channel) once the deliveries
/// themselves are dropped too, so that one still held can be settled.
pub struct Subscription {
    topic: Arc<str>,
    group: Option<Arc<str>>,
    system: Option<&'static str>,
    inner: BoxStream<'static, Result<Delivery>>,
}

impl Subscription {
    /// Wrap a backend's delivery stream (adapters do this).
    pub fn new(
        topic: Arc<str>,
        group: Option<Arc<str>>,
        inner: BoxStream<'static, Result<Delivery>>,
    ) -> Self {
        Subscription {
            topic,
            group,
            system: None,
            inner,
        }
    }

    /// Name the backend the deliveries come from (`messaging.system` of the spans that
    /// process them).
    #[must_use]
    pub fn with_system(mut self, system: &'static str) -> Self {
        self.system = Some(system);
        self
    }

    /// The backend the deliveries come from, when the subscription was told.
    pub fn system(&self) -> Option<&'static str> {
        self.system
    }

    /// The subscribed topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The consumer group, if one was named.
    pub fn group(&self) -> Option<&str> {
        self.group.as_deref()
    }
}

impl Stream for Subscription {
    type Item = Result<Delivery>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.inner.size_hint()
    }
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("topic", &self.topic)
            .field("group", &self.group)
            .finish_non_exhaustive()
    }
}

/// A half-open time window `[from, to)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeRange {
    from: SystemTime,
    to: SystemTime,
}

impl TimeRange {
    /// The window from `from` (inclusive) to `to` (exclusive).
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] when `to` is before `from`.
    pub fn new(from: SystemTime, to: SystemTime) -> Result<Self> {
        if to < from {
            return Err(Error::invalid_input(
                "time range ends before it starts (to < from)",
            ));
        }
        Ok(TimeRange { from, to })
    }

    /// Inclusive start.
    pub fn from(&self) -> SystemTime {
        self.from
    }

    /// Exclusive end.
    pub fn to(&self) -> SystemTime {
        self.to
    }

    /// Whether `t` lies in the window.
    pub fn contains(&self, t: SystemTime) -> bool {
        self.from <= t && t < self.to
    }
}

/// A message read back from a topic's history.
#[derive(Debug, Clone)]
pub struct HistoryEntry {
    /// The message as published.
    pub message: Arc<Message>,
    /// The time the backend recorded for it: its append time where the broker assigns one,
    /// otherwise the message timestamp.
    pub recorded_at: SystemTime,
    /// Where it sits in the backend.
    pub position: Option<Position>,
}

/// Stream of history entries in recorded order.
pub type HistoryStream = BoxStream<'static, Result<HistoryEntry>>;

/// Overall health of a broker connection, ordered from best to worst (so `a.max(b)` is the
/// worse of two).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum HealthStatus {
    /// Everything works.
    Healthy,
    /// Working with reduced guarantees (reconnecting, spooling to a fallback).
    Degraded,
    /// Not working (closed, unreachable).
    Unhealthy,
}

/// A health report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// The verdict.
    pub status: HealthStatus,
    /// Human-readable detail (never contains secrets).
    pub detail: String,
}

impl Health {
    /// A healthy report with `detail`.
    pub fn healthy(detail: impl Into<String>) -> Self {
        Health {
            status: HealthStatus::Healthy,
            detail: detail.into(),
        }
    }

    /// An unhealthy report with `detail`.
    pub fn unhealthy(detail: impl Into<String>) -> Self {
        Health {
            status: HealthStatus::Unhealthy,
            detail: detail.into(),
        }
    }
}

/// Outcome of a batch publish: which messages (by index in the batch) failed and why.
#[derive(Debug, Default)]
pub struct BatchReport {
    total: usize,
    failures: Vec<(usize, Error)>,
}

impl BatchReport {
    /// A report for a batch of `total` messages with the given failures.
    pub fn new(total: usize, mut failures: Vec<(usize, Error)>) -> Self {
        failures.sort_by_key(|(index, _)| *index);
        BatchReport { total, failures }
    }

    /// A report where every one of `total` messages failed with `error`'s kind and text.
    pub fn all_failed(total: usize, error: &Error) -> Self {
        let failures = (0..total)
            .map(|i| (i, error.copy_without_source()))
            .collect();
        BatchReport { total, failures }
    }

    /// Publish a batch in two phases, for clients whose acknowledgements arrive
    /// asynchronously: `start` hands each message to the client in order (a message it fails
    /// fails alone), then the acknowledgement of each started message is awaited with
    /// `acknowledged`, in order, so a batch costs one round trip rather than one per message.
    /// `start` takes each message by value: a client that copies what it sends lets it be
    /// freed at once instead of holding the whole batch until its last acknowledgement.
    ///
    /// The acknowledgements are all in flight once the last message is started, so awaiting
    /// them in turn takes as long as awaiting them together, without a task per message
    /// (joining 10,000 Kafka delivery reports cost about 2,400 instructions a message more).
    /// `acknowledged` is called as each is awaited: a timeout started there would run one
    /// after another, so a backend that bounds the wait gives the batch one deadline.
    ///
    /// A message `start` fails with [`ErrorKind::Timeout`] was not taken by the client in
    /// time (a full queue that does not drain, a blocked connection), so none after it would
    /// be: the rest of the batch fails at once with a retryable timeout, without being
    /// started, instead of each waiting its own timeout, one after another.
    pub async fn pipelined<M, T, Start, Started, Ack, Acked>(
        messages: Vec<M>,
        mut start: Start,
        acknowledged: Ack,
    ) -> BatchReport
    where
        Start: FnMut(M) -> Started,
        Started: std::future::Future<Output = Result<T>>,
        Ack: Fn(T) -> Acked,
        Acked: std::future::Future<Output = Result<()>>,
    {
        let total = messages.len();
        let mut failures = Vec::new();
        let mut pending = Vec::with_capacity(total);
        // Why the rest of the batch is not started, once a message timed out.
        let mut refused: Option<String> = None;
        for (index, message) in messages.into_iter().enumerate() {
            if let Some(why) = &refused {
                failures.push((index, Error::new(ErrorKind::Timeout, why.clone())));
                continue;
            }
            match start(message).await {
                Ok(handle) => pending.push((index, handle)),
                Err(err) => {
                    if err.kind() == ErrorKind::Timeout {
                        refused = Some(format!(
                            "not published: an earlier message of the batch timed out ({})",
                            err.message()
                        ));
                    }
                    failures.push((index, err));
                }
            }
        }
        for (index, handle) in pending {
            if let Err(err) = acknowledged(handle).await {
                failures.push((index, err));
            }
        }
        BatchReport::new(total, failures)
    }

    /// Messages in the batch.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Messages the broker accepted.
    pub fn succeeded(&self) -> usize {
        self.total - self.failures.len()
    }

    /// Whether every message was accepted.
    pub fn is_ok(&self) -> bool {
        self.failures.is_empty()
    }

    /// The failed messages' indices and errors, in batch order.
    pub fn failures(&self) -> &[(usize, Error)] {
        &self.failures
    }

    /// Takes the failed messages' indices and errors out of the report, in batch order.
    pub fn into_failures(self) -> Vec<(usize, Error)> {
        self.failures
    }

    /// `Ok(())` if every message was accepted, else the first failure, annotated with how many
    /// failed.
    ///
    /// # Errors
    /// The first failure's kind and retryability, with a message counting all failures.
    pub fn into_result(self) -> Result<()> {
        let failed = self.failures.len();
        match self.failures.into_iter().next() {
            None => Ok(()),
            Some((index, first)) => {
                let summary = format!(
                    "{failed} of {} messages in the batch failed; first (index {index}): {}",
                    self.total,
                    first.message()
                );
                Err(Error::summarising(first, summary))
            }
        }
    }
}

/// Publishes messages to topics.
#[async_trait]
pub trait Publisher: Send + Sync {
    /// Publish one message to `topic`.
    ///
    /// Resolves once the broker has accepted the message with its durability acknowledgement
    /// where it has one (RabbitMQ confirm, Kafka ack, Redis reply).
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] for a bad topic name, [`ErrorKind::PayloadTooLarge`],
    /// [`ErrorKind::Closed`] after close, [`ErrorKind::Timeout`] when the broker stays full,
    /// connection and backend errors otherwise.
    async fn publish(&self, topic: &str, message: Message) -> Result<()>;

    /// Publish many messages to `topic`, pipelining acknowledgements (every message is on its
    /// way before any acknowledgement is awaited, so a batch costs about one round trip, not
    /// one per message), and report per message. Messages keep their order relative to each
    /// other. A broker that takes none of them fails the batch within about one publish
    /// timeout, not one per message: once a message is not taken in time, the rest fail at
    /// once with a retryable [`ErrorKind::Timeout`].
    ///
    /// The default publishes every message concurrently; backends override it with their
    /// native batching.
    async fn publish_batch(&self, topic: &str, messages: Vec<Message>) -> BatchReport {
        let total = messages.len();
        let results =
            futures::future::join_all(messages.into_iter().map(|m| self.publish(topic, m))).await;
        let failures = results
            .into_iter()
            .enumerate()
            .filter_map(|(i, r)| r.err().map(|e| (i, e)))
            .collect();
        BatchReport::new(total, failures)
    }
}

/// Subscribes to topics.
#[async_trait]
pub trait Subscriber: Send + Sync {
    /// Subscribe to `topic`.
    ///
    /// When this resolves the subscription is registered: every message published to `topic`
    /// afterwards reaches its group.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] for a bad topic or group name, [`ErrorKind::Closed`] after
    /// close, [`ErrorKind::Unsupported`] for options the backend cannot honour (a named group
    /// without [`Capabilities::consumer_groups`], a start position without
    /// [`Capabilities::replay_by_time`]).
    async fn subscribe(&self, topic: &str, options: SubscribeOptions) -> Result<Subscription>;
}

/// How far one consumer group is behind on one topic ([`Broker::backlog`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Backlog {
    /// Messages waiting for the group: published and not yet delivered to any member, or
    /// given back (requeued, or held by a member that left) and held by none (on a
    /// log-based backend, past the group's committed position).
    pub waiting: u64,
    /// Messages delivered to a member and not yet settled, where the backend tracks that.
    pub in_flight: Option<u64>,
}

impl Backlog {
    /// Everything the group has not finished: waiting plus in flight.
    pub fn lag(&self) -> u64 {
        self.waiting + self.in_flight.unwrap_or(0)
    }
}

/// Where a backend keeps one consumer group of one topic, named as the backend's own tools
/// name it (`rabbitmqadmin get queue=…`, `kafka-consumer-groups.sh --group …`,
/// `redis-cli XINFO GROUPS …`), for an operator going from a topic to what to inspect
/// ([`Broker::group_address`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupAddress {
    /// What those tools call it: `"queue"` (RabbitMQ), `"consumer group"` (Kafka),
    /// `"stream group"` (Redis Streams), `"channel"` (Redis pub/sub, which has no groups),
    /// `"group"` otherwise.
    pub kind: &'static str,
    /// Its name in those tools.
    pub name: String,
    /// Where its messages come from, when the name does not say: the exchange and routing
    /// key a queue is bound with, the Kafka topic, the stream's key.
    pub source: Option<String>,
}

impl GroupAddress {
    /// Group `group` of `topic`, named as they are: a backend whose tools know nothing
    /// more specific.
    pub fn plain(topic: &str, group: &str) -> Self {
        GroupAddress {
            kind: "group",
            name: group.to_owned(),
            source: Some(topic.to_owned()),
        }
    }
}

/// A connection to one messaging backend: publish, subscribe, report and close.
///
/// `Arc<dyn Broker>` is what every layer above the adapters works with. Its `Debug` output
/// never contains secrets.
#[async_trait]
pub trait Broker: Publisher + Subscriber + fmt::Debug {
    /// Short backend name (`"memory"`, `"redis"`, `"kafka"`, `"rabbitmq"`, …).
    fn name(&self) -> &'static str;

    /// What this backend promises.
    fn capabilities(&self) -> Capabilities;

    /// Current health.
    async fn health(&self) -> Health;

    /// Read `topic`'s retained history recorded inside `range`, oldest first. Exactly the
    /// window: nothing recorded before `range.from()` or at/after `range.to()`.
    ///
    /// # Errors
    /// [`ErrorKind::Unsupported`] unless [`Capabilities::replay_by_time`]; otherwise as the
    /// backend reports.
    async fn read_range(&self, topic: &str, range: TimeRange) -> Result<HistoryStream> {
        let _ = (topic, range);
        Err(Error::unsupported(
            self.name(),
            "reading history by time range",
        ))
    }

    /// How far consumer group `group` is behind on `topic`: what waits for it and, where the
    /// backend knows, what it holds unsettled. A group the backend has never seen has a
    /// zero backlog.
    ///
    /// # Errors
    /// [`ErrorKind::Unsupported`] unless [`Capabilities::backlog`]; [`ErrorKind::InvalidInput`]
    /// for a bad name; otherwise as the backend reports.
    async fn backlog(&self, topic: &str, group: &str) -> Result<Backlog> {
        let _ = (topic, group);
        Err(Error::unsupported(
            self.name(),
            "reporting a group's backlog",
        ))
    }

    /// Where this backend keeps consumer group `group` of `topic` ([`GroupAddress`]), whether
    /// or not the group exists yet. The default names the group and the topic as they are.
    fn group_address(&self, topic: &str, group: &str) -> GroupAddress {
        GroupAddress::plain(topic, group)
    }

    /// Create consumer group `group` on `topic` without joining it, so that every message
    /// published to `topic` from now on waits for the group's first member, as it does for a
    /// group whose members have all left. A group that exists already is left where it is:
    /// nothing it holds is delivered, lost or moved.
    ///
    /// This is how a producer keeps what it publishes before any consumer has started
    /// (RabbitMQ refuses a publish no queue is bound for). The default subscribes to the group
    /// and drops the subscription at once; backends override it to declare the group without
    /// a member.
    ///
    /// # Errors
    /// [`ErrorKind::Unsupported`] without [`Capabilities::consumer_groups`];
    /// [`ErrorKind::InvalidInput`] for a bad name; [`ErrorKind::Closed`] after close;
    /// connection and backend errors otherwise.
    async fn create_group(&self, topic: &str, group: &str) -> Result<()> {
        let subscription = self
            .subscribe(topic, SubscribeOptions::group(group))
            .await?;
        drop(subscription);
        Ok(())
    }

    /// Close the connection: publishing and subscribing fail with [`ErrorKind::Closed`]
    /// afterwards and open subscriptions end. Idempotent.
    ///
    /// # Errors
    /// The backend's error if flushing or closing failed.
    async fn close(&self) -> Result<()>;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Once one message times out being handed over, the rest fail at once as retryable
    /// timeouts without being started; other failures stay the message's own.
    #[tokio::test]
    async fn after_a_start_timeout_the_rest_of_the_batch_fails_unstarted() {
        let mut started = Vec::new();
        let report = BatchReport::pipelined(
            (0..5).collect(),
            |i: usize| {
                started.push(i);
                async move {
                    match i {
                        1 => Err(Error::invalid_input("bad message")),
                        2 => Err(Error::new(ErrorKind::Timeout, "queue full")),
                        _ => Ok(i),
                    }
                }
            },
            |_| async { Ok(()) },
        )
        .await;
        assert_eq!(started, vec![0, 1, 2]);
        let failed: Vec<(usize, ErrorKind, bool)> = report
            .failures()
            .iter()
            .map(|(i, e)| (*i, e.kind(), e.is_retryable()))
            .collect();
        assert_eq!(
            failed,
            vec![
                (1, ErrorKind::InvalidInput, false),
                (2, ErrorKind::Timeout, true),
                (3, ErrorKind::Timeout, true),
                (4, ErrorKind::Timeout, true),
            ]
        );
        assert!(
            report.failures()[2].1.message().contains("queue full"),
            "{}",
            report.failures()[2].1
        );
    }
}
