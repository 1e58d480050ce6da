//! The fallback spool (`MESSAGING_FALLBACK_ENABLED`): while the broker cannot take
//! publishes, they are written to a local durable spool and forwarded, in order per topic,
//! once it can again.
//!
//! [`FallbackBroker`] wraps a [`BreakerBroker`]. A publish goes to the broker while the
//! publish breaker lets it and the topic has nothing spooled; it is spooled when the breaker
//! is open or the broker fails it with a broker error (connection, timeout, backend), and
//! once a topic has spooled messages, later publishes to it are spooled behind them so the
//! topic's order holds. A spooled publish returns `Ok` only once the spool has it on disk
//! (`SqliteSpool` in `helix-messaging-store`: WAL, `synchronous = FULL`), and a publish whose caller goes away while
//! it is being spooled still finishes spooling, so the topic's order never depends on
//! whether its caller waited. What can be checked locally (the topic's name) is checked
//! before spooling: such a publish fails at once rather than returning `Ok`. The spool is
//! bounded ([`SpoolLimits`]): beyond the bound a publish fails with [`ErrorKind::Rejected`],
//! never dropped. Forwarded messages keep their ids, so a consumer can deduplicate the copy
//! of a publish whose broker acknowledgement was lost before it was spooled.
//!
//! A spooled message the broker refuses for good when it is forwarded
//! ([`ErrorKind::Rejected`], [`ErrorKind::PayloadTooLarge`], [`ErrorKind::InvalidInput`] or
//! [`ErrorKind::Serialization`]; any other failure, a closing broker's included, leaves it
//! waiting) is
//! set aside, durably, with the broker's error ([`FallbackBroker::refused`]), and the rest
//! keeps flowing; it stays there until it is sent again ([`FallbackBroker::retry_refused`])
//! or discarded ([`FallbackBroker::discard_refused`]), and counts against the limits
//! meanwhile.
//!
//! Health is `degraded` while anything is spooled or set aside; metrics, labelled `spool`
//! with the breaker broker's name, `messaging_fallback_spool_depth`, `messaging_fallback_spool_refused`,
//! `messaging_fallback_spool_bytes`, `messaging_fallback_spool_oldest_age_seconds`,
//! `messaging_fallback_spooled_total`, `messaging_fallback_forwarded_total` and
//! `messaging_fallback_refused_total`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::breaker::{BreakerBroker, BreakerState, is_broker_failure};
use crate::broker::{
    BatchReport, Broker, Health, HealthStatus, HistoryStream, Publisher, SubscribeOptions,
    Subscriber, Subscription, TimeRange,
};
use crate::capabilities::Capabilities;
use crate::error::{Error, ErrorKind, Result};
use crate::message::Message;
use crate::trace;

/// Whether `err` is the broker refusing the message itself (set aside when forwarding), as
/// opposed to the broker failing or going away (the message waits and goes again).
fn is_refusal(err: &Error) -> bool {
    matches!(
        err.kind(),
        ErrorKind::Rejected
            | ErrorKind::PayloadTooLarge
            | ErrorKind::InvalidInput
            | ErrorKind::Serialization
    )
}

/// How much a spool may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpoolLimits {
    /// Most messages (default 100,000).
    pub max_messages: u64,
    /// Most payload and header bytes (default 256 MiB).
    pub max_bytes: u64,
}

impl Default for SpoolLimits {
    fn default() -> Self {
        SpoolLimits {
            max_messages: 100_000,
            max_bytes: 256 * 1024 * 1024,
        }
    }
}

/// A spooled message, in spool order.
#[derive(Debug, Clone, PartialEq)]
pub struct SpooledMessage {
    /// Place in the spool (grows with every append).
    pub seq: i64,
    /// The topic it was published to.
    pub topic: String,
    /// The message as published.
    pub message: Message,
}

impl SpoolLimits {
    /// Whether `adding` more messages of `bytes` bytes fit beside what `held` counts
    /// (waiting and set aside, the same for every spool).
    ///
    /// # Errors
    /// [`ErrorKind::Rejected`], naming what the spool holds and its limits, when they do not
    /// fit.
    pub fn admit(&self, held: SpoolStats, adding: usize, bytes: u64) -> Result<()> {
        if held.depth + held.refused + adding as u64 <= self.max_messages
            && held.bytes + bytes <= self.max_bytes
        {
            return Ok(());
        }
        Err(Error::new(
            ErrorKind::Rejected,
            format!(
                "the fallback spool is full: it holds {} messages ({} bytes) of at most {} ({} bytes), {adding} more ({bytes} bytes) do not fit",
                held.depth, held.bytes, self.max_messages, self.max_bytes
            ),
        ))
    }
}

/// A spooled message the broker refused for good, set aside.
#[derive(Debug, Clone, PartialEq)]
pub struct RefusedMessage {
    /// Its place in the spool when it was refused (it keeps it while set aside).
    pub seq: i64,
    /// The topic it was published to.
    pub topic: String,
    /// The message as published.
    pub message: Message,
    /// The broker's error.
    pub reason: String,
    /// When it was set aside.
    pub refused_at: SystemTime,
}

/// What a spool holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpoolStats {
    /// Messages waiting to be forwarded.
    pub depth: u64,
    /// Messages set aside because the broker refused them (not in `depth`).
    pub refused: u64,
    /// The payload and header bytes of both.
    pub bytes: u64,
    /// When the oldest message waiting to be forwarded was spooled.
    pub oldest: Option<SystemTime>,
}

/// The bytes a message counts for against [`SpoolLimits::max_bytes`].
pub fn spooled_size(message: &Message) -> u64 {
    let headers: usize = message
        .headers()
        .iter()
        .map(|(k, v)| k.len() + v.len())
        .sum();
    (message.payload().len() + headers + message.id().len()) as u64
}

/// Durable storage of spooled publishes: the messages waiting to be forwarded, in order, and
/// beside them those set aside because the broker refused them.
#[async_trait]
pub trait Spool: Send + Sync + 'static {
    /// Append `messages` for `topic`, all or none, durable when it returns; the `seq` of
    /// the last one (0 when there are none). Every append's `seq`s are above every earlier
    /// append's.
    ///
    /// # Errors
    /// [`ErrorKind::Rejected`] when they do not fit the limits (nothing is appended); the
    /// store's error.
    async fn append(&self, topic: &str, messages: &[Message]) -> Result<i64>;

    /// Up to `limit` of the oldest messages, in spool order.
    ///
    /// # Errors
    /// The store's error.
    async fn oldest(&self, limit: usize) -> Result<Vec<SpooledMessage>>;

    /// Remove the messages with these `seq`s (forwarded).
    ///
    /// # Errors
    /// The store's error.
    async fn remove(&self, seqs: &[i64]) -> Result<()>;

    /// Set the waiting message `seq` aside with `reason` (the broker refused it), in one
    /// durable step; nothing if it is not waiting.
    ///
    /// # Errors
    /// The store's error.
    async fn refuse(&self, seq: i64, reason: &str) -> Result<()>;

    /// Up to `limit` of the messages set aside, oldest first.
    ///
    /// # Errors
    /// The store's error.
    async fn refused(&self, limit: usize) -> Result<Vec<RefusedMessage>>;

    /// Take the set-aside message `seq` out: with `retry`, back to the end of the spool to
    /// be forwarded again (under a new `seq`), else discarded; `false` if it is not there.
    ///
    /// # Errors
    /// The store's error.
    async fn release_refused(&self, seq: i64, retry: bool) -> Result<bool>;

    /// The newest waiting `seq` of each topic that has messages waiting (to keep a topic's
    /// order when a process starts with a non-empty spool).
    ///
    /// # Errors
    /// The store's error.
    async fn topics(&self) -> Result<HashMap<String, i64>>;

    /// What the spool holds.
    ///
    /// # Errors
    /// The store's error.
    async fn stats(&self) -> Result<SpoolStats>;
}

/// A spool in memory: bounded, ordered, but gone with the process (for tests and for
/// applications that accept that).
#[derive(Debug, Default)]
pub struct MemorySpool {
    limits: SpoolLimits,
    state: Mutex<MemorySpoolState>,
}

/// The last sequence number given, the spooled messages with their spool times, those set
/// aside, and the bytes of both.
#[derive(Debug, Default)]
struct MemorySpoolState {
    last_seq: i64,
    held: std::collections::VecDeque<(SpooledMessage, SystemTime)>,
    refused: std::collections::BTreeMap<i64, RefusedMessage>,
    bytes: u64,
}

impl MemorySpoolState {
    fn push(&mut self, topic: &str, message: Message, at: SystemTime) -> i64 {
        self.last_seq += 1;
        let seq = self.last_seq;
        self.held.push_back((
            SpooledMessage {
                seq,
                topic: topic.to_owned(),
                message,
            },
            at,
        ));
        seq
    }
}

impl MemorySpool {
    /// An empty spool with these limits.
    pub fn new(limits: SpoolLimits) -> Self {
        MemorySpool {
            limits,
            state: Mutex::default(),
        }
    }
}

#[async_trait]
impl Spool for MemorySpool {
    async fn append(&self, topic: &str, messages: &[Message]) -> Result<i64> {
        if messages.is_empty() {
            return Ok(0);
        }
        let mut state = self.state.lock();
        let bytes: u64 = messages.iter().map(spooled_size).sum();
        let (depth, refused, held) = (
            state.held.len() as u64,
            state.refused.len() as u64,
            state.bytes,
        );
        let stats = SpoolStats {
            depth,
            refused,
            bytes: held,
            oldest: None,
        };
        self.limits.admit(stats, messages.len(), bytes)?;
        let now = SystemTime::now();
        for message in messages {
            state.push(topic, message.clone(), now);
        }
        state.bytes += bytes;
        Ok(state.last_seq)
    }

    async fn oldest(&self, limit: usize) -> Result<Vec<SpooledMessage>> {
        Ok(self
            .state
            .lock()
            .held
            .iter()
            .take(limit)
            .map(|(m, _)| m.clone())
            .collect())
    }

    async fn remove(&self, seqs: &[i64]) -> Result<()> {
        let mut state = self.state.lock();
        let mut freed = 0;
        state.held.retain(|(m, _)| {
            let gone = seqs.contains(&m.seq);
            if gone {
                freed += spooled_size(&m.message);
            }
            !gone
        });
        state.bytes -= freed;
        Ok(())
    }

    async fn refuse(&self, seq: i64, reason: &str) -> Result<()> {
        let mut state = self.state.lock();
        if let Some(i) = state.held.iter().position(|(m, _)| m.seq == seq)
            && let Some((m, _)) = state.held.remove(i)
        {
            state.refused.insert(
                seq,
                RefusedMessage {
                    seq,
                    topic: m.topic,
                    message: m.message,
                    reason: reason.to_owned(),
                    refused_at: SystemTime::now(),
                },
            );
        }
        Ok(())
    }

    async fn refused(&self, limit: usize) -> Result<Vec<RefusedMessage>> {
        Ok(self
            .state
            .lock()
            .refused
            .values()
            .take(limit)
            .cloned()
            .collect())
    }

    async fn release_refused(&self, seq: i64, retry: bool) -> Result<bool> {
        let mut state = self.state.lock();
        let Some(refused) = state.refused.remove(&seq) else {
            return Ok(false);
        };
        if retry {
            state.push(&refused.topic, refused.message, SystemTime::now());
        } else {
            state.bytes -= spooled_size(&refused.message);
        }
        Ok(true)
    }

    async fn topics(&self) -> Result<HashMap<String, i64>> {
        let mut topics = HashMap::new();
        for (m, _) in &self.state.lock().held {
            topics.insert(m.topic.clone(), m.seq);
        }
        Ok(topics)
    }

    async fn stats(&self) -> Result<SpoolStats> {
        let state = self.state.lock();
        Ok(SpoolStats {
            depth: state.held.len() as u64,
            refused: state.refused.len() as u64,
            bytes: state.bytes,
            oldest: state.held.front().map(|(_, at)| *at),
        })
    }
}

/// How the forwarder runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForwardConfig {
    /// Messages forwarded per batch (default 100).
    pub batch_size: usize,
    /// Pause after a failed forward before trying again (default 1 s).
    pub retry_interval: Duration,
}

impl Default for ForwardConfig {
    fn default() -> Self {
        ForwardConfig {
            batch_size: 100,
            retry_interval: Duration::from_secs(1),
        }
    }
}

/// Where a topic's spooled messages stand: the newest `seq` appended, the newest forwarded
/// or set aside, and the appends under way. The topic has messages waiting while the first
/// is above the second or an append is under way. The two seqs only grow, so it does not
/// matter whether an append or the forwarder records its mark first; an append counts as
/// under way from before it starts until its mark is recorded, so nothing published to the
/// topic meanwhile goes to the broker ahead of it.
#[derive(Debug, Default, Clone, Copy)]
struct TopicMarks {
    appended: i64,
    cleared: i64,
    appending: u32,
}

impl TopicMarks {
    fn waiting(self) -> bool {
        self.appended > self.cleared || self.appending > 0
    }
}

struct Inner {
    broker: BreakerBroker,
    spool: Arc<dyn Spool>,
    config: ForwardConfig,
    /// Per topic: a topic with messages waiting has later publishes spooled behind them.
    marks: Mutex<HashMap<String, TopicMarks>>,
    wake: Notify,
    stop: CancellationToken,
}

/// A broker that spools publishes it cannot deliver and forwards them later (see the
/// module docs). Cloning shares it; the forwarder stops at [`Broker::close`].
#[derive(Clone)]
pub struct FallbackBroker {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for FallbackBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FallbackBroker")
            .field("broker", &self.inner.broker)
            .finish_non_exhaustive()
    }
}

impl FallbackBroker {
    /// Wrap `broker` with `spool`, and start forwarding what the spool already holds (a
    /// previous process's leftovers) as soon as the broker takes it.
    ///
    /// # Errors
    /// The spool's error reading what it holds.
    pub async fn new(
        broker: BreakerBroker,
        spool: Arc<dyn Spool>,
        config: ForwardConfig,
    ) -> Result<Self> {
        let marks = spool
            .topics()
            .await?
            .into_iter()
            .map(|(topic, newest)| {
                let marks = TopicMarks {
                    appended: newest,
                    ..TopicMarks::default()
                };
                (topic, marks)
            })
            .collect();
        let fallback = FallbackBroker {
            inner: Arc::new(Inner {
                broker,
                spool,
                config: ForwardConfig {
                    batch_size: config.batch_size.max(1),
                    ..config
                },
                marks: Mutex::new(marks),
                wake: Notify::new(),
                stop: CancellationToken::new(),
            }),
        };
        fallback.publish_gauges().await;
        let forwarder = fallback.clone();
        tokio::spawn(async move { forwarder.forward_loop().await });
        Ok(fallback)
    }

    /// The wrapped broker (with its breakers).
    pub fn breaker_broker(&self) -> &BreakerBroker {
        &self.inner.broker
    }

    /// What the spool holds.
    ///
    /// # Errors
    /// The spool's error.
    pub async fn spool_stats(&self) -> Result<SpoolStats> {
        self.inner.spool.stats().await
    }

    /// Up to `limit` of the messages set aside because the broker refused them, oldest
    /// first.
    ///
    /// # Errors
    /// The spool's error.
    pub async fn refused(&self, limit: usize) -> Result<Vec<RefusedMessage>> {
        self.inner.spool.refused(limit).await
    }

    /// Send the set-aside message `seq` again: it goes back to the end of the spool and is
    /// forwarded (or set aside again, if the broker still refuses it); `false` if there is
    /// no such message.
    ///
    /// # Errors
    /// The spool's error.
    pub async fn retry_refused(&self, seq: i64) -> Result<bool> {
        let found = self.inner.spool.release_refused(seq, true).await?;
        if found {
            // Back in its topic's line: what is published to the topic from now on waits
            // behind it. It is back whatever happens next, so a failure to read the line
            // is logged, not returned (a caller told it failed would find it gone).
            match self.inner.spool.topics().await {
                Ok(topics) => {
                    for (topic, newest) in topics {
                        self.mark(&topic, |m| m.appended = m.appended.max(newest));
                    }
                }
                Err(err) => tracing::warn!(
                    seq,
                    error = %err,
                    "a refused message is back in the spool, but the spool's topics could not be read; publishes to its topic may overtake it"
                ),
            }
            self.inner.wake.notify_one();
        }
        self.publish_gauges().await;
        Ok(found)
    }

    /// Discard the set-aside message `seq` for good; `false` if there is no such message.
    ///
    /// # Errors
    /// The spool's error.
    pub async fn discard_refused(&self, seq: i64) -> Result<bool> {
        let found = self.inner.spool.release_refused(seq, false).await?;
        if found {
            tracing::warn!(
                seq,
                "a message the broker refused was discarded from the fallback spool"
            );
        }
        self.publish_gauges().await;
        Ok(found)
    }

    async fn publish_gauges(&self) {
        if let Ok(stats) = self.inner.spool.stats().await {
            metrics::gauge!("messaging_fallback_spool_depth", "spool" => self.label())
                .set(stats.depth as f64);
            metrics::gauge!("messaging_fallback_spool_refused", "spool" => self.label())
                .set(stats.refused as f64);
            metrics::gauge!("messaging_fallback_spool_bytes", "spool" => self.label())
                .set(stats.bytes as f64);
            let age = stats
                .oldest
                .and_then(|at| at.elapsed().ok())
                .unwrap_or_default();
            metrics::gauge!("messaging_fallback_spool_oldest_age_seconds", "spool" => self.label())
                .set(age.as_secs_f64());
        }
    }

    /// The `spool` label of its metrics: the breaker broker's name (`<backend>`, or what
    /// [`BreakerBroker::named`] gave it).
    fn label(&self) -> String {
        self.inner.broker.label().to_owned()
    }

    fn spooled_behind(&self, topic: &str) -> bool {
        self.inner
            .marks
            .lock()
            .get(topic)
            .is_some_and(|m| m.waiting())
    }

    fn mark(&self, topic: &str, update: impl FnOnce(&mut TopicMarks)) {
        update(self.inner.marks.lock().entry(topic.to_owned()).or_default());
    }

    async fn spool(&self, topic: &str, mut messages: Vec<Message>) -> Result<()> {
        // Each spooled message carries the publisher's trace on through its `spool` span:
        // the forwarder that sends it later runs outside the publisher's span.
        if messages.is_empty() {
            return Ok(());
        }
        for message in &mut messages {
            trace::stamp_copy(trace::CopyKind::Spool, topic, message);
        }
        // Appended and marked in a task of its own: a caller that goes away once the spool
        // has the messages must not leave them unmarked, or the topic's next publishes would
        // go to the broker ahead of them.
        self.mark(topic, |m| m.appending += 1);
        let this = self.clone();
        let topic = topic.to_owned();
        let appending = tokio::spawn(async move {
            let appended = this.inner.spool.append(&topic, &messages).await;
            this.mark(&topic, |m| {
                m.appending -= 1;
                if let Ok(newest) = appended {
                    m.appended = m.appended.max(newest);
                }
            });
            if appended.is_err() {
                // The append may have taken effect before it failed: the forwarder looks.
                this.inner.wake.notify_one();
            }
            appended?;
            metrics::counter!("messaging_fallback_spooled_total", "spool" => this.label())
                .increment(messages.len() as u64);
            this.inner.wake.notify_one();
            Ok::<_, Error>(())
        });
        appending.await.map_err(|err| {
            Error::new(
                ErrorKind::Backend,
                format!("spooling a publish did not finish: {err}"),
            )
        })??;
        self.publish_gauges().await;
        Ok(())
    }

    async fn forward_loop(&self) {
        loop {
            let forwarded = match self.forward_once().await {
                Ok(n) => n,
                Err(err) => {
                    tracing::warn!(error = %err, "forwarding the fallback spool failed; retrying");
                    0
                }
            };
            if forwarded > 0 {
                continue;
            }
            // A message sent again from the set-aside area, or one an append took although
            // it was reported failed, has no mark: the spool itself says whether anything
            // waits, and a spool that cannot say may hold something.
            let waiting = self.inner.marks.lock().values().any(|m| m.waiting())
                || self.inner.spool.stats().await.map_or(true, |s| s.depth > 0);
            let pause = if waiting {
                self.inner.config.retry_interval
            } else {
                Duration::from_secs(3600)
            };
            tokio::select! {
                () = self.inner.stop.cancelled() => return,
                () = self.inner.wake.notified() => {}
                () = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// Forward one batch of the oldest spooled messages, setting aside those the broker
    /// refuses for good; how many went out.
    async fn forward_once(&self) -> Result<usize> {
        if self.inner.broker.publish_breaker().state() == BreakerState::Open {
            return Ok(0);
        }
        let appended: Vec<(String, i64)> = self
            .inner
            .marks
            .lock()
            .iter()
            .map(|(topic, m)| (topic.clone(), m.appended))
            .collect();
        let batch = self
            .inner
            .spool
            .oldest(self.inner.config.batch_size)
            .await?;
        if batch.is_empty() {
            // Everything appended before the read has left the spool: a mark the forwarder
            // did not get to record (it was stopped in between) must not keep its topic
            // spooled.
            for (topic, newest) in appended {
                self.mark(&topic, |m| m.cleared = m.cleared.max(newest));
            }
            return Ok(0);
        }
        let mut forwarded = 0;
        let mut start = 0;
        // Runs of one topic, in spool order; a run's broker failure stops the round so
        // nothing overtakes it.
        while start < batch.len() {
            let topic = batch[start].topic.clone();
            let end = batch[start..]
                .iter()
                .position(|m| m.topic != topic)
                .map_or(batch.len(), |n| start + n);
            let run = &batch[start..end];
            let report = self
                .inner
                .broker
                .publish_batch(&topic, run.iter().map(|m| m.message.clone()).collect())
                .await;
            // In order up to the first failure that is not the broker refusing the message:
            // accepted, or refused for good.
            let mut failures = report.failures().iter().peekable();
            let (mut sent, mut refused, mut stopped) = (Vec::new(), Vec::new(), false);
            for (i, message) in run.iter().enumerate() {
                match failures.next_if(|(at, _)| *at == i) {
                    None => sent.push(message.seq),
                    Some((_, err)) if is_refusal(err) => refused.push((message, err.to_string())),
                    Some(_) => {
                        // A broker failure, or the broker closing: later messages of the run
                        // may have been accepted out of order; they stay spooled and go
                        // again (same ids), never lost.
                        stopped = true;
                        break;
                    }
                }
            }
            if !sent.is_empty() {
                self.inner.spool.remove(&sent).await?;
                metrics::counter!("messaging_fallback_forwarded_total", "spool" => self.label())
                    .increment(sent.len() as u64);
                forwarded += sent.len();
            }
            for (message, reason) in &refused {
                self.inner.spool.refuse(message.seq, reason).await?;
                tracing::warn!(topic, seq = message.seq, id = message.message.id(), %reason, "the broker refused a spooled message; it is set aside");
                metrics::counter!("messaging_fallback_refused_total", "spool" => self.label())
                    .increment(1);
            }
            let cleared = sent
                .iter()
                .copied()
                .chain(refused.iter().map(|(m, _)| m.seq))
                .max();
            if let Some(cleared) = cleared {
                self.mark(&topic, |m| m.cleared = m.cleared.max(cleared));
            }
            if stopped {
                break;
            }
            start = end;
        }
        self.publish_gauges().await;
        Ok(forwarded)
    }
}

#[async_trait]
impl Publisher for FallbackBroker {
    async fn publish(&self, topic: &str, message: Message) -> Result<()> {
        // Refused here rather than spooled with `Ok` and refused by the broker later.
        crate::names::validate_name("topic", topic)?;
        if !self.spooled_behind(topic) {
            match self.inner.broker.publish(topic, message.clone()).await {
                Ok(()) => return Ok(()),
                Err(err) if !is_broker_failure(&err) => return Err(err),
                Err(err) => {
                    tracing::debug!(topic, error = %err, "publish spooled: the broker cannot take it");
                }
            }
        }
        self.spool(topic, vec![message]).await
    }

    async fn publish_batch(&self, topic: &str, messages: Vec<Message>) -> BatchReport {
        let total = messages.len();
        if let Err(err) = crate::names::validate_name("topic", topic) {
            return BatchReport::all_failed(total, &err);
        }
        if !self.spooled_behind(topic) {
            let report = self
                .inner
                .broker
                .publish_batch(topic, messages.clone())
                .await;
            let transient: Vec<usize> = report
                .failures()
                .iter()
                .filter(|(_, err)| is_broker_failure(err))
                .map(|(i, _)| *i)
                .collect();
            if transient.is_empty() {
                return report;
            }
            let retry: Vec<Message> = transient.iter().map(|&i| messages[i].clone()).collect();
            let mut failures: Vec<(usize, Error)> = report
                .failures()
                .iter()
                .filter(|(_, err)| !is_broker_failure(err))
                .map(|(i, err)| (*i, err.copy_without_source()))
                .collect();
            if let Err(err) = self.spool(topic, retry).await {
                failures.extend(transient.iter().map(|&i| (i, err.copy_without_source())));
            }
            return BatchReport::new(total, failures);
        }
        match self.spool(topic, messages).await {
            Ok(()) => BatchReport::new(total, Vec::new()),
            Err(err) => BatchReport::all_failed(total, &err),
        }
    }
}

#[async_trait]
impl Subscriber for FallbackBroker {
    async fn subscribe(&self, topic: &str, options: SubscribeOptions) -> Result<Subscription> {
        self.inner.broker.subscribe(topic, options).await
    }
}

#[async_trait]
impl Broker for FallbackBroker {
    fn name(&self) -> &'static str {
        self.inner.broker.name()
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.broker.capabilities()
    }

    async fn health(&self) -> Health {
        let inner = self.inner.broker.health().await;
        let stats = self.inner.spool.stats().await;
        let (status, spooled) = match &stats {
            Ok(stats) if stats.depth > 0 || stats.refused > 0 => {
                let age = stats
                    .oldest
                    .and_then(|at| at.elapsed().ok())
                    .unwrap_or_default();
                let mut detail = format!(
                    "{} publishes spooled, oldest {:.0} s",
                    stats.depth,
                    age.as_secs_f64()
                );
                if stats.refused > 0 {
                    detail.push_str(&format!(
                        "; {} refused by the broker and set aside",
                        stats.refused
                    ));
                }
                (HealthStatus::Degraded, detail)
            }
            Ok(_) => (HealthStatus::Healthy, "spool empty".to_owned()),
            Err(err) => (HealthStatus::Unhealthy, format!("spool unreadable: {err}")),
        };
        // Publishes are accepted into the spool while the broker is away: degraded, not down.
        let status = status.max(inner.status.min(HealthStatus::Degraded));
        Health {
            status,
            detail: format!("{}; fallback: {spooled}", inner.detail),
        }
    }

    async fn read_range(&self, topic: &str, range: TimeRange) -> Result<HistoryStream> {
        self.inner.broker.read_range(topic, range).await
    }

    async fn backlog(&self, topic: &str, group: &str) -> Result<crate::broker::Backlog> {
        self.inner.broker.backlog(topic, group).await
    }

    async fn close(&self) -> Result<()> {
        self.inner.stop.cancel();
        self.inner.broker.close().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_open_breaker_with_an_empty_spool_is_degraded() {
        use crate::breaker::BreakerConfig;
        // Up, accepting everything.
        let breaker = BreakerBroker::new(
            Arc::new(Scripted::default()),
            BreakerConfig {
                failure_threshold: 1,
                ..BreakerConfig::default()
            },
        )
        .unwrap();
        let fallback = FallbackBroker::new(
            breaker,
            Arc::new(MemorySpool::new(SpoolLimits::default())),
            ForwardConfig::default(),
        )
        .await
        .unwrap();
        assert_eq!(fallback.health().await.status, HealthStatus::Healthy);
        fallback
            .breaker_broker()
            .publish_breaker()
            .observe(Some(&Error::new(ErrorKind::Connection, "refused")));
        let health = fallback.health().await;
        assert_eq!(health.status, HealthStatus::Degraded, "{health:?}");
        assert!(health.detail.contains("spool empty"), "{health:?}");
        fallback.close().await.unwrap();
    }

    /// A broker whose availability the test switches, which refuses payloads saying
    /// "poison" for good and records what it accepted, in order.
    #[derive(Debug, Default)]
    struct Scripted {
        down: std::sync::atomic::AtomicBool,
        closed: std::sync::atomic::AtomicBool,
        accepted: Mutex<Vec<(String, String)>>,
    }

    impl Scripted {
        fn set_down(&self, down: bool) {
            self.down.store(down, std::sync::atomic::Ordering::SeqCst);
        }

        fn accepted(&self) -> Vec<(String, String)> {
            self.accepted.lock().clone()
        }
    }

    #[async_trait]
    impl Publisher for Scripted {
        async fn publish(&self, topic: &str, message: Message) -> Result<()> {
            if self.down.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(
                    Error::new(ErrorKind::Connection, "connection refused").with_retryable(true)
                );
            }
            if self.closed.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(Error::closed("the scripted broker"));
            }
            let payload = String::from_utf8_lossy(message.payload()).into_owned();
            if payload == "poison" {
                return Err(Error::new(ErrorKind::Rejected, "the broker refuses poison"));
            }
            self.accepted.lock().push((topic.to_owned(), payload));
            Ok(())
        }
    }

    #[async_trait]
    impl Subscriber for Scripted {
        async fn subscribe(&self, _: &str, _: SubscribeOptions) -> Result<Subscription> {
            Err(Error::unsupported("scripted", "subscribing"))
        }
    }

    #[async_trait]
    impl Broker for Scripted {
        fn name(&self) -> &'static str {
            "scripted"
        }
        fn capabilities(&self) -> Capabilities {
            Capabilities::NONE
        }
        async fn health(&self) -> Health {
            Health::healthy("up")
        }
        async fn read_range(&self, _: &str, _: TimeRange) -> Result<HistoryStream> {
            Err(Error::unsupported("scripted", "history"))
        }
        async fn close(&self) -> Result<()> {
            Ok(())
        }
    }

    /// A fallback broker over `broker` whose breaker never opens (so every publish is tried
    /// on the broker first) and whose forwarder retries every 10 ms.
    async fn fallback_over(broker: Arc<Scripted>, spool: Arc<dyn Spool>) -> FallbackBroker {
        fallback_retrying(broker, spool, Duration::from_millis(10)).await
    }

    /// The same, retrying every `retry_interval`.
    async fn fallback_retrying(
        broker: Arc<Scripted>,
        spool: Arc<dyn Spool>,
        retry_interval: Duration,
    ) -> FallbackBroker {
        use crate::breaker::BreakerConfig;
        let breaker = BreakerBroker::new(
            broker,
            BreakerConfig {
                failure_threshold: 1_000_000,
                ..BreakerConfig::default()
            },
        )
        .unwrap();
        let config = ForwardConfig {
            batch_size: 100,
            retry_interval,
        };
        FallbackBroker::new(breaker, spool, config).await.unwrap()
    }

    /// Wait (at most 5 s) until `done` holds.
    async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !done() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what}: not within 5 s"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn payloads(accepted: &[(String, String)], topic: &str) -> Vec<String> {
        accepted
            .iter()
            .filter(|(t, _)| t == topic)
            .map(|(_, p)| p.clone())
            .collect()
    }

    /// A spooled message the broker refuses for good is set aside with the broker's reason
    /// (listed, counted, reported as degraded health), and everything behind it, on its
    /// topic and on others, is forwarded; it can be discarded or sent again.
    #[tokio::test]
    async fn a_refused_message_is_set_aside_and_the_rest_keeps_flowing() {
        let broker = Arc::new(Scripted::default());
        let fallback = fallback_over(broker.clone(), Arc::new(MemorySpool::default())).await;
        broker.set_down(true);
        for (topic, payload) in [("a", "a1"), ("a", "poison"), ("a", "a2"), ("b", "b1")] {
            fallback
                .publish(topic, Message::new(payload))
                .await
                .unwrap();
        }
        assert_eq!(
            fallback.spool_stats().await.unwrap().depth,
            4,
            "all spooled"
        );
        broker.set_down(false);
        eventually("everything but the refused message forwarded", || {
            broker.accepted().len() == 3
        })
        .await;
        let accepted = broker.accepted();
        assert_eq!(payloads(&accepted, "a"), ["a1", "a2"], "in order");
        assert_eq!(payloads(&accepted, "b"), ["b1"]);
        // Later publishes go straight to the broker again.
        fallback.publish("a", Message::new("a3")).await.unwrap();
        assert_eq!(payloads(&broker.accepted(), "a"), ["a1", "a2", "a3"]);

        let stats = fallback.spool_stats().await.unwrap();
        assert_eq!((stats.depth, stats.refused), (0, 1), "{stats:?}");
        let refused = fallback.refused(10).await.unwrap();
        assert_eq!(refused.len(), 1);
        assert_eq!(refused[0].topic, "a");
        assert_eq!(refused[0].message.payload().as_ref(), b"poison");
        assert!(
            refused[0].reason.contains("refuses poison"),
            "{:?}",
            refused[0]
        );
        let health = fallback.health().await;
        assert_eq!(health.status, HealthStatus::Degraded, "{health:?}");
        assert!(health.detail.contains("1 refused"), "{health:?}");

        // Sent again, it is refused again and set aside again; discarded, it is gone.
        assert!(fallback.retry_refused(refused[0].seq).await.unwrap());
        let mut again = Vec::new();
        for _ in 0..200 {
            again = fallback.refused(10).await.unwrap();
            if again.len() == 1 && again[0].seq != refused[0].seq {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(again.len(), 1, "set aside again");
        assert_ne!(again[0].seq, refused[0].seq, "a new place in the spool");
        assert!(
            !fallback.discard_refused(refused[0].seq).await.unwrap(),
            "no longer there"
        );
        assert!(fallback.discard_refused(again[0].seq).await.unwrap());
        assert_eq!(fallback.spool_stats().await.unwrap().refused, 0);
        assert_eq!(fallback.health().await.status, HealthStatus::Healthy);
        fallback.close().await.unwrap();
    }

    /// A forward that meets a closed broker (the process is shutting down) keeps the
    /// messages spooled for the next process: closing is not the broker refusing them.
    #[tokio::test]
    async fn a_closed_broker_sets_nothing_aside() {
        let broker = Arc::new(Scripted::default());
        let spool = Arc::new(MemorySpool::default());
        let fallback = fallback_retrying(broker.clone(), spool, Duration::from_secs(3600)).await;
        broker.set_down(true);
        fallback.publish("t", Message::new("kept")).await.unwrap();
        broker.set_down(false);
        broker
            .closed
            .store(true, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(fallback.forward_once().await.unwrap(), 0);
        let stats = fallback.spool_stats().await.unwrap();
        assert_eq!((stats.depth, stats.refused), (1, 0), "{stats:?}");
        fallback.close().await.unwrap();
    }

    /// An empty batch spools nothing and leaves the topic's order alone.
    #[tokio::test]
    async fn an_empty_batch_spools_nothing() {
        let broker = Arc::new(Scripted::default());
        let spool = Arc::new(MemorySpool::default());
        let fallback = fallback_over(broker.clone(), spool).await;
        broker.set_down(true);
        fallback.publish("a", Message::new("a1")).await.unwrap();
        let report = fallback.publish_batch("b", Vec::new()).await;
        assert!(report.failures().is_empty());
        assert!(!fallback.spooled_behind("b"), "b has nothing waiting");
        fallback.close().await.unwrap();
    }

    /// A publish that the broker would refuse for its name is refused at once, never spooled
    /// with `Ok`.
    #[tokio::test]
    async fn a_bad_name_is_refused_before_spooling() {
        let broker = Arc::new(Scripted::default());
        let fallback = fallback_over(broker.clone(), Arc::new(MemorySpool::default())).await;
        broker.set_down(true);
        let err = fallback
            .publish("bad topic!", Message::new("x"))
            .await
            .expect_err("an invalid name");
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
        let report = fallback
            .publish_batch("bad topic!", vec![Message::new("x")])
            .await;
        assert_eq!(report.failures().len(), 1);
        assert_eq!(fallback.spool_stats().await.unwrap().depth, 0);
        fallback.close().await.unwrap();
    }

    /// A memory spool scripted by the test: its appends can pause once they are durable until
    /// the test lets them go on, or take effect and then be reported failed (a commit whose
    /// answer was lost); its figures can be unreadable.
    #[derive(Debug, Default)]
    struct ScriptedSpool {
        inner: MemorySpool,
        pausing: bool,
        appends_reported_failed: bool,
        figures_unreadable: bool,
        committed: Notify,
        resume: Notify,
        appends: std::sync::atomic::AtomicUsize,
    }

    impl ScriptedSpool {
        fn pausing() -> Self {
            ScriptedSpool {
                pausing: true,
                ..ScriptedSpool::default()
            }
        }
    }

    #[async_trait]
    impl Spool for ScriptedSpool {
        async fn append(&self, topic: &str, messages: &[Message]) -> Result<i64> {
            let seq = self.inner.append(topic, messages).await?;
            self.appends
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if self.pausing {
                self.committed.notify_one();
                self.resume.notified().await;
            }
            if self.appends_reported_failed {
                return Err(
                    Error::new(ErrorKind::Timeout, "the commit's answer was lost")
                        .with_retryable(true),
                );
            }
            Ok(seq)
        }
        async fn oldest(&self, limit: usize) -> Result<Vec<SpooledMessage>> {
            self.inner.oldest(limit).await
        }
        async fn remove(&self, seqs: &[i64]) -> Result<()> {
            self.inner.remove(seqs).await
        }
        async fn refuse(&self, seq: i64, reason: &str) -> Result<()> {
            self.inner.refuse(seq, reason).await
        }
        async fn refused(&self, limit: usize) -> Result<Vec<RefusedMessage>> {
            self.inner.refused(limit).await
        }
        async fn release_refused(&self, seq: i64, retry: bool) -> Result<bool> {
            self.inner.release_refused(seq, retry).await
        }
        async fn topics(&self) -> Result<HashMap<String, i64>> {
            self.inner.topics().await
        }
        async fn stats(&self) -> Result<SpoolStats> {
            if self.figures_unreadable {
                return Err(Error::new(
                    ErrorKind::Backend,
                    "the spool's figures cannot be read",
                ));
            }
            self.inner.stats().await
        }
    }

    /// A publish whose caller went away after the spool had it still holds the topic's
    /// order: a later publish to the topic is spooled behind it, not sent ahead (the
    /// forwarder retries only hourly here, so nothing but the topic's marks keeps the order).
    #[tokio::test]
    async fn a_publish_cancelled_after_spooling_is_not_overtaken() {
        let broker = Arc::new(Scripted::default());
        let spool = Arc::new(ScriptedSpool::pausing());
        let fallback =
            fallback_retrying(broker.clone(), spool.clone(), Duration::from_secs(3600)).await;
        broker.set_down(true);
        let publish = fallback.publish("t", Message::new("first"));
        tokio::select! {
            _ = publish => panic!("the append is paused"),
            () = spool.committed.notified() => {}
        }
        // The caller is gone; the spool has the message. The append goes on by itself, and
        // the forwarder's first round finds the broker still down (its next is in an hour).
        spool.resume.notify_one();
        tokio::time::sleep(Duration::from_millis(50)).await;
        broker.set_down(false);
        let second = fallback.publish("t", Message::new("second"));
        tokio::pin!(second);
        loop {
            tokio::select! {
                result = &mut second => { result.unwrap(); break; }
                () = spool.committed.notified() => spool.resume.notify_one(),
            }
        }
        eventually("both forwarded", || broker.accepted().len() == 2).await;
        assert_eq!(payloads(&broker.accepted(), "t"), ["first", "second"]);
        fallback.close().await.unwrap();
    }

    /// A message forwarded before its append has returned leaves nothing behind: the topic's
    /// next publish goes straight to the broker.
    #[tokio::test]
    async fn a_message_forwarded_before_its_append_returns_leaves_the_topic_unspooled() {
        let broker = Arc::new(Scripted::default());
        let spool = Arc::new(ScriptedSpool::pausing());
        let fallback = fallback_over(broker.clone(), spool.clone()).await;
        broker.set_down(true);
        let publishing = {
            let fallback = fallback.clone();
            tokio::spawn(async move { fallback.publish("t", Message::new("first")).await })
        };
        spool.committed.notified().await;
        broker.set_down(false);
        assert_eq!(
            fallback.forward_once().await.unwrap(),
            1,
            "forwarded meanwhile"
        );
        spool.resume.notify_one();
        publishing.await.unwrap().unwrap();
        tokio::time::timeout(
            Duration::from_secs(2),
            fallback.publish("t", Message::new("second")),
        )
        .await
        .expect("straight to the broker, not into the (paused) spool")
        .unwrap();
        assert_eq!(payloads(&broker.accepted(), "t"), ["first", "second"]);
        assert_eq!(
            spool.appends.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "the second publish went straight to the broker"
        );
        fallback.close().await.unwrap();
    }

    /// A message the spool took although its append was reported failed is forwarded once
    /// the broker is back: the forwarder is woken for it, and a spool whose figures cannot
    /// be read counts as holding something. Found by the plane harness (a process killed and
    /// restarted on its spool, memory, seed 9): the forwarder slept for an hour beside it.
    #[tokio::test]
    async fn a_message_spooled_by_an_append_reported_failed_is_still_forwarded() {
        // The forwarder is asleep when the append fails: only a wake-up brings it back.
        let readable = ScriptedSpool {
            appends_reported_failed: true,
            ..ScriptedSpool::default()
        };
        spooled_by_an_append_reported_failed_is_forwarded(readable).await;
        // It is woken, finds the broker down, and cannot tell whether anything waits.
        let unreadable = ScriptedSpool {
            appends_reported_failed: true,
            figures_unreadable: true,
            ..ScriptedSpool::default()
        };
        spooled_by_an_append_reported_failed_is_forwarded(unreadable).await;
    }

    async fn spooled_by_an_append_reported_failed_is_forwarded(spool: ScriptedSpool) {
        let broker = Arc::new(Scripted::default());
        let fallback = fallback_over(broker.clone(), Arc::new(spool)).await;
        // Idle: the forwarder has found nothing and rests until woken.
        tokio::time::sleep(Duration::from_millis(50)).await;
        broker.set_down(true);
        let published = fallback.publish("t", Message::new("kept")).await;
        assert_eq!(published.unwrap_err().kind(), ErrorKind::Timeout);
        // The forwarder tries while the broker is still down, then looks whether anything
        // waits before it rests.
        tokio::time::sleep(Duration::from_millis(100)).await;
        broker.set_down(false);
        eventually("the spooled message forwarded", || {
            payloads(&broker.accepted(), "t") == ["kept"]
        })
        .await;
        fallback.close().await.unwrap();
    }
}
