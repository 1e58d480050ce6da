//! [`FallbackBroker`]: the publish path that spools while the broker cannot take
//! publishes, and the forwarder that sends what was spooled once it can (see the
//! [module doc](super)).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::future::{BoxFuture, OptionFuture};
use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::breaker::{BreakerBroker, BreakerLayer, BreakerState, is_broker_failure};
use crate::broker::{
    BatchReport, Broker, Health, HealthStatus, HistoryStream, Publisher, SubscribeOptions,
    Subscriber, Subscription, TimeRange,
};
use crate::capabilities::Capabilities;
use crate::error::{Error, ErrorKind, Result};
use crate::message::Message;
use crate::stack::BrokerLayer;
use crate::trace;

use super::spool::{RefusedMessage, Spool, SpoolStats, SpooledMessage};

/// Whether `err` is the broker refusing the message itself (set aside when forwarding), as
/// opposed to the broker failing or going away (the message waits and goes again). A
/// refusal the broker says is for now (retryable: RabbitMQ's negative confirm while a quorum
/// queue elects its leader) is the latter.
fn is_refusal(err: &Error) -> bool {
    matches!(
        err.kind(),
        ErrorKind::Rejected
            | ErrorKind::PayloadTooLarge
            | ErrorKind::InvalidInput
            | ErrorKind::Serialization
    ) && !err.is_retryable()
}

/// A spooled message the broker refused for good, to be set aside.
struct Refused {
    seq: i64,
    id: String,
    reason: String,
}

/// A forwarded run's messages by what the broker said, in order up to the first failure that
/// is not the broker refusing the message: the `seq`s accepted, those refused for good, and
/// whether a failure stopped the run there (a broker failure, or the broker closing: later
/// messages of the run may have been accepted out of order; they stay spooled and go again,
/// same ids, never lost).
fn sort_outcomes(run: &[SpooledMessage], report: &BatchReport) -> (Vec<i64>, Vec<Refused>, bool) {
    let mut failures = report.failures().iter().peekable();
    let (mut sent, mut refused) = (Vec::new(), Vec::new());
    for (i, message) in run.iter().enumerate() {
        match failures.next_if(|(at, _)| *at == i) {
            None => sent.push(message.seq),
            Some((_, err)) if is_refusal(err) => refused.push(Refused {
                seq: message.seq,
                id: message.message.id().to_owned(),
                reason: err.to_string(),
            }),
            Some(_) => return (sent, refused, true),
        }
    }
    (sent, refused, false)
}

/// How the forwarder runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForwardConfig {
    /// Messages read from the spool and published at a time (default 1,000). A batch is
    /// removed from the spool (a durable commit per run of one topic) once the broker has
    /// confirmed it, while the next batch is published, and the batch after that is read
    /// meanwhile.
    pub batch_size: usize,
    /// Pause after a failed forward before trying again (default 1 s).
    pub retry_interval: Duration,
}

impl Default for ForwardConfig {
    fn default() -> Self {
        ForwardConfig {
            batch_size: 1_000,
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
/// module docs). Cloning shares it; the forwarder stops at [`Broker::close`]. Build it with
/// [`FallbackBroker::new`] or, stacked with the other wrappers, [`FallbackLayer`].
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use std::sync::Arc;
/// use std::time::Duration;
///
/// use futures::StreamExt;
/// use helix_messaging_core::breaker::{BreakerBroker, BreakerConfig};
/// use helix_messaging_core::fallback::{FallbackBroker, ForwardConfig, MemorySpool};
/// use helix_messaging_core::{Broker, Error, ErrorKind, Message, Publisher, SubscribeOptions};
/// use helix_messaging_memory::MemoryBroker;
///
/// let memory: Arc<dyn Broker> = Arc::new(MemoryBroker::new());
/// let mut orders = memory.subscribe("orders", SubscribeOptions::default()).await?;
/// let breaker = BreakerConfig {
///     failure_threshold: 1,
///     // Long enough that the publish below finds it open even on a busy machine.
///     open_interval: Duration::from_secs(2),
///     ..BreakerConfig::default()
/// };
/// let forwarding = ForwardConfig {
///     retry_interval: Duration::from_millis(20),
///     ..ForwardConfig::default()
/// };
/// let spool = Arc::new(MemorySpool::default());
/// let guarded = BreakerBroker::new(memory, breaker)?;
/// let fallback = FallbackBroker::new(guarded, spool, forwarding).await?;
/// // The broker fails a publish with a connection error: the breaker opens.
/// let permit = fallback.breaker_broker().publish_breaker().acquire()?;
/// permit.record(Some(&Error::new(ErrorKind::Connection, "connection reset")));
/// fallback.publish("orders", Message::new("order 7")).await?; // Ok: spooled
/// assert_eq!(fallback.spool_stats().await?.depth, 1);
/// // Once the breaker lets a call through again, the forwarder sends it on.
/// let forwarded = tokio::time::timeout(Duration::from_secs(10), orders.next())
///     .await
///     .expect("forwarded in time")
///     .expect("subscription open")?;
/// assert_eq!(forwarded.message().payload().as_ref(), b"order 7");
/// fallback.close().await?;
/// # Ok::<(), helix_messaging_core::Error>(())
/// # }).unwrap();
/// ```
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

/// Builds [`FallbackBroker`]s, as a [`BrokerLayer`] (see [`crate::stack`] for where it
/// stacks): each over a breaker of its own ([`BreakerLayer`], default
/// [`BreakerConfig`](crate::breaker::BreakerConfig) unless told otherwise), spooling to
/// `spool` while that breaker is open.
#[derive(Clone)]
pub struct FallbackLayer {
    spool: Arc<dyn Spool>,
    breaker: BreakerLayer,
    forward: ForwardConfig,
}

impl std::fmt::Debug for FallbackLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FallbackLayer")
            .field("breaker", &self.breaker)
            .field("forward", &self.forward)
            .finish_non_exhaustive()
    }
}

impl FallbackLayer {
    /// Spool to `spool`, with default breakers and forwarding.
    pub fn new(spool: Arc<dyn Spool>) -> Self {
        FallbackLayer {
            spool,
            breaker: BreakerLayer::new(crate::breaker::BreakerConfig::default()),
            forward: ForwardConfig::default(),
        }
    }

    /// The breaker the fallback builds beneath it.
    pub fn with_breaker(mut self, breaker: BreakerLayer) -> Self {
        self.breaker = breaker;
        self
    }

    /// How the forwarder runs.
    pub fn with_forwarding(mut self, forward: ForwardConfig) -> Self {
        self.forward = forward;
        self
    }
}

#[async_trait]
impl BrokerLayer for FallbackLayer {
    type Wrapped = FallbackBroker;

    async fn wrap(&self, inner: Arc<dyn Broker>) -> Result<FallbackBroker> {
        let guarded = self.breaker.wrap(inner).await?;
        FallbackBroker::new(guarded, self.spool.clone(), self.forward).await
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

    /// Takes a forwarded run's confirmed messages out of the spool and sets aside those
    /// the broker refused for good; then their topic's mark moves past them.
    async fn settle_forwarded(
        &self,
        topic: String,
        sent: Vec<i64>,
        refused: Vec<Refused>,
    ) -> Result<()> {
        if !sent.is_empty() {
            self.inner.spool.remove(&sent).await?;
            metrics::counter!("messaging_fallback_forwarded_total", "spool" => self.label())
                .increment(sent.len() as u64);
        }
        for Refused { seq, id, reason } in &refused {
            self.inner.spool.refuse(*seq, reason).await?;
            tracing::warn!(topic, seq, id, %reason, "the broker refused a spooled message; it is set aside");
            metrics::counter!("messaging_fallback_refused_total", "spool" => self.label())
                .increment(1);
        }
        let cleared = sent
            .iter()
            .copied()
            .chain(refused.iter().map(|r| r.seq))
            .max();
        if let Some(cleared) = cleared {
            self.mark(&topic, |m| m.cleared = m.cleared.max(cleared));
        }
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

    /// Forward the oldest spooled messages, batch after batch until the spool is empty, a
    /// run fails, the broker closes or the breaker opens, setting aside those the broker refuses for good;
    /// how many went out.
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
        let batch_size = self.inner.config.batch_size;
        // The previous run's removal (a durable commit), running while the next run is
        // published: a run goes out only once the one before it is confirmed, so nothing
        // overtakes, and a message leaves the spool only once confirmed, but the disk and the
        // broker work at once instead of in turn. A removal that fails is seen one run late:
        // both runs stay spooled and go again (same ids).
        let mut settling: Option<BoxFuture<'_, Result<()>>> = None;
        let mut batch = batch;
        // Batch after batch while the broker takes them, each read while the last run of the
        // one before is published.
        'batches: loop {
            let mut next = None;
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
                let publishing = self
                    .inner
                    .broker
                    .publish_batch(&topic, run.iter().map(|m| m.message.clone()).collect());
                let reading = (end == batch.len()).then(|| {
                    self.inner
                        .spool
                        .oldest_after(batch[end - 1].seq, batch_size)
                });
                let (report, settled, read) = tokio::join!(
                    publishing,
                    OptionFuture::from(settling.take()),
                    OptionFuture::from(reading),
                );
                settled.transpose()?;
                match read {
                    Some(Ok(read)) => next = Some(read),
                    Some(Err(err)) => {
                        // This round ends after this run; the next reads afresh.
                        tracing::warn!(error = %err, "reading ahead in the fallback spool failed");
                    }
                    None => {}
                }
                let (sent, refused, stopped) = sort_outcomes(run, &report);
                forwarded += sent.len();
                settling = Some(Box::pin(self.settle_forwarded(topic, sent, refused)));
                if stopped {
                    break 'batches;
                }
                start = end;
            }
            let go_on = !self.inner.stop.is_cancelled()
                && self.inner.broker.publish_breaker().state() != BreakerState::Open;
            match next {
                Some(read) if !read.is_empty() && go_on => {
                    batch = read;
                    // A long drain shows on the depth and age gauges as it goes.
                    self.publish_gauges().await;
                }
                _ => break,
            }
        }
        if let Some(last) = settling {
            last.await?;
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

    fn group_address(&self, topic: &str, group: &str) -> crate::broker::GroupAddress {
        self.inner.broker.group_address(topic, group)
    }

    async fn create_group(&self, topic: &str, group: &str) -> Result<()> {
        self.inner.broker.create_group(topic, group).await
    }

    async fn close(&self) -> Result<()> {
        self.inner.stop.cancel();
        self.inner.broker.close().await
    }
}

#[cfg(test)]
mod tests;
