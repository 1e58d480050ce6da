//! The fallback spool (`MESSAGING_FALLBACK_ENABLED`): while the broker cannot take
//! publishes, they are written to a local durable spool and forwarded, in order per topic,
//! once it can again.
//!
//! [`FallbackBroker`] wraps a [`BreakerBroker`]. A publish goes to the broker while the
//! publish breaker lets it and the topic has nothing spooled; it is spooled when the breaker
//! is open or the broker fails it with a broker error (connection, timeout, backend), and
//! once a topic has spooled messages, later publishes to it are spooled behind them so the
//! topic's order holds. A spooled publish returns `Ok` only once the spool has it on disk
//! ([`SqliteSpool`]: WAL, `synchronous = FULL`). The spool is bounded
//! ([`SpoolLimits`]): beyond the bound a publish fails with [`ErrorKind::Rejected`], never
//! dropped. Forwarded messages keep their ids, so a consumer can deduplicate the copy of a
//! publish whose broker acknowledgement was lost before it was spooled. Health is
//! `degraded` while anything is spooled; metrics `messaging_fallback_spool_depth`,
//! `messaging_fallback_spool_bytes`, `messaging_fallback_spool_oldest_age_seconds`,
//! `messaging_fallback_spooled_total` and `messaging_fallback_forwarded_total`.

#[cfg(feature = "sqlite")]
mod sqlite;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

#[cfg(feature = "sqlite")]
pub use sqlite::SqliteSpool;

use crate::breaker::{BreakerBroker, BreakerState, is_broker_failure};
use crate::{
    BatchReport, Broker, Capabilities, Error, ErrorKind, Health, HealthStatus, HistoryStream,
    Message, Publisher, Result, SubscribeOptions, Subscriber, Subscription, TimeRange, trace,
};

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

/// What a spool holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpoolStats {
    /// Messages.
    pub depth: u64,
    /// Their payload and header bytes.
    pub bytes: u64,
    /// When the oldest was spooled.
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

/// Durable storage of spooled publishes.
#[async_trait]
pub trait Spool: Send + Sync + 'static {
    /// Append `messages` for `topic`, all or none, durable when it returns.
    ///
    /// # Errors
    /// [`ErrorKind::Rejected`] when they do not fit the limits (nothing is appended); the
    /// store's error.
    async fn append(&self, topic: &str, messages: &[Message]) -> Result<()>;

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

    /// Spooled messages per topic (to keep a topic's order when a process starts with a
    /// non-empty spool).
    ///
    /// # Errors
    /// The store's error.
    async fn topics(&self) -> Result<HashMap<String, u64>>;

    /// What the spool holds.
    ///
    /// # Errors
    /// The store's error.
    async fn stats(&self) -> Result<SpoolStats>;
}

fn full(limits: SpoolLimits, stats: SpoolStats, adding: usize, bytes: u64) -> Error {
    Error::new(
        ErrorKind::Rejected,
        format!(
            "the fallback spool is full: it holds {} messages ({} bytes) of at most {} ({} bytes), {adding} more ({bytes} bytes) do not fit",
            stats.depth, stats.bytes, limits.max_messages, limits.max_bytes
        ),
    )
}

/// A spool in memory: bounded, ordered, but gone with the process (for tests and for
/// applications that accept that).
#[derive(Debug, Default)]
pub struct MemorySpool {
    limits: SpoolLimits,
    state: Mutex<MemorySpoolState>,
}

/// The last sequence number given, the spooled messages with their spool times, and their
/// bytes.
#[derive(Debug, Default)]
struct MemorySpoolState {
    last_seq: i64,
    held: std::collections::VecDeque<(SpooledMessage, SystemTime)>,
    bytes: u64,
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
    async fn append(&self, topic: &str, messages: &[Message]) -> Result<()> {
        let mut state = self.state.lock();
        let bytes: u64 = messages.iter().map(spooled_size).sum();
        let (depth, held) = (state.held.len() as u64, state.bytes);
        if depth + messages.len() as u64 > self.limits.max_messages
            || held + bytes > self.limits.max_bytes
        {
            let stats = SpoolStats {
                depth,
                bytes: held,
                oldest: None,
            };
            return Err(full(self.limits, stats, messages.len(), bytes));
        }
        let now = SystemTime::now();
        for message in messages {
            state.last_seq += 1;
            let seq = state.last_seq;
            state.held.push_back((
                SpooledMessage {
                    seq,
                    topic: topic.to_owned(),
                    message: message.clone(),
                },
                now,
            ));
        }
        state.bytes += bytes;
        Ok(())
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

    async fn topics(&self) -> Result<HashMap<String, u64>> {
        let mut topics = HashMap::new();
        for (m, _) in &self.state.lock().held {
            *topics.entry(m.topic.clone()).or_default() += 1;
        }
        Ok(topics)
    }

    async fn stats(&self) -> Result<SpoolStats> {
        let state = self.state.lock();
        Ok(SpoolStats {
            depth: state.held.len() as u64,
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

struct Inner {
    broker: BreakerBroker,
    spool: Arc<dyn Spool>,
    config: ForwardConfig,
    /// Spooled messages per topic not yet forwarded: a topic listed here is spooled behind.
    pending: Mutex<HashMap<String, u64>>,
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
        let pending = spool.topics().await?;
        let fallback = FallbackBroker {
            inner: Arc::new(Inner {
                broker,
                spool,
                config: ForwardConfig {
                    batch_size: config.batch_size.max(1),
                    ..config
                },
                pending: Mutex::new(pending),
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

    async fn publish_gauges(&self) {
        if let Ok(stats) = self.inner.spool.stats().await {
            metrics::gauge!("messaging_fallback_spool_depth").set(stats.depth as f64);
            metrics::gauge!("messaging_fallback_spool_bytes").set(stats.bytes as f64);
            let age = stats
                .oldest
                .and_then(|at| at.elapsed().ok())
                .unwrap_or_default();
            metrics::gauge!("messaging_fallback_spool_oldest_age_seconds").set(age.as_secs_f64());
        }
    }

    fn spooled_behind(&self, topic: &str) -> bool {
        self.inner.pending.lock().get(topic).is_some_and(|n| *n > 0)
    }

    async fn spool(&self, topic: &str, mut messages: Vec<Message>) -> Result<()> {
        // Each spooled message carries the publisher's trace on through its `spool` span:
        // the forwarder that sends it later runs outside the publisher's span.
        for message in &mut messages {
            trace::stamp_copy(trace::CopyKind::Spool, topic, message);
        }
        self.inner.spool.append(topic, &messages).await?;
        *self
            .inner
            .pending
            .lock()
            .entry(topic.to_owned())
            .or_default() += messages.len() as u64;
        metrics::counter!("messaging_fallback_spooled_total").increment(messages.len() as u64);
        self.publish_gauges().await;
        self.inner.wake.notify_one();
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
            let pause = if self.inner.pending.lock().values().any(|n| *n > 0) {
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

    /// Forward one batch of the oldest spooled messages; how many went out.
    async fn forward_once(&self) -> Result<usize> {
        if self.inner.broker.publish_breaker().state() == BreakerState::Open {
            return Ok(0);
        }
        let batch = self
            .inner
            .spool
            .oldest(self.inner.config.batch_size)
            .await?;
        let mut forwarded = 0;
        let mut start = 0;
        // Runs of one topic, in spool order; a run's failure stops the round so nothing
        // overtakes it.
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
            let accepted = report
                .failures()
                .first()
                .map_or(run.len(), |(first, _)| *first);
            let seqs: Vec<i64> = run[..accepted].iter().map(|m| m.seq).collect();
            if !seqs.is_empty() {
                self.inner.spool.remove(&seqs).await?;
                if let Some(n) = self.inner.pending.lock().get_mut(&topic) {
                    *n = n.saturating_sub(seqs.len() as u64);
                }
                metrics::counter!("messaging_fallback_forwarded_total")
                    .increment(seqs.len() as u64);
                forwarded += seqs.len();
            }
            if accepted < run.len() {
                // Later messages of the run may have been accepted out of order; they stay
                // spooled and go again (same ids), never lost.
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
            Ok(stats) if stats.depth > 0 => {
                let age = stats
                    .oldest
                    .and_then(|at| at.elapsed().ok())
                    .unwrap_or_default();
                (
                    HealthStatus::Degraded,
                    format!(
                        "{} publishes spooled, oldest {:.0} s",
                        stats.depth,
                        age.as_secs_f64()
                    ),
                )
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

    async fn backlog(&self, topic: &str, group: &str) -> Result<crate::Backlog> {
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

    fn limits() -> SpoolLimits {
        SpoolLimits {
            max_messages: 5,
            max_bytes: 10_000,
        }
    }

    async fn keeps_order_and_bounds(spool: &dyn Spool) {
        let a: Vec<Message> = (0..3)
            .map(|i| {
                Message::new(format!("a{i}"))
                    .with_key("k")
                    .with_header("traceparent", "00-1-2-01")
                    .with_priority(4)
            })
            .collect();
        spool.append("orders", &a).await.unwrap();
        spool.append("audit", &[Message::new("b0")]).await.unwrap();
        let err = spool
            .append("orders", &[Message::new("c0"), Message::new("c1")])
            .await
            .expect_err("6 > 5");
        assert_eq!(err.kind(), ErrorKind::Rejected);
        assert!(err.to_string().contains("spool is full"), "{err}");
        let big = Message::new(vec![0u8; 20_000]);
        assert_eq!(
            spool.append("x", &[big]).await.unwrap_err().kind(),
            ErrorKind::Rejected,
            "over the byte bound"
        );
        let stats = spool.stats().await.unwrap();
        assert_eq!(stats.depth, 4, "a refused append adds nothing");
        assert!(stats.oldest.is_some());
        let held = spool.oldest(10).await.unwrap();
        let order: Vec<(&str, &str)> = held
            .iter()
            .map(|m| (m.topic.as_str(), m.message.id()))
            .collect();
        let want: Vec<(&str, &str)> = a
            .iter()
            .map(|m| ("orders", m.id()))
            .chain(std::iter::once(("audit", held[3].message.id())))
            .collect();
        assert_eq!(order, want, "spool order");
        assert_eq!(held[0].message, a[0], "every field kept");
        assert_eq!(
            spool.topics().await.unwrap(),
            [("orders".to_owned(), 3), ("audit".to_owned(), 1)].into()
        );
        spool.remove(&[held[0].seq, held[1].seq]).await.unwrap();
        let left = spool.oldest(10).await.unwrap();
        assert_eq!(left.len(), 2);
        assert_eq!(left[0].message.id(), a[2].id());
        assert_eq!(spool.stats().await.unwrap().depth, 2);
    }

    /// A broker that is away with nothing spooled yet is degraded, not down: publishes
    /// would be accepted into the spool.
    #[tokio::test]
    async fn an_open_breaker_with_an_empty_spool_is_degraded() {
        use crate::breaker::BreakerConfig;
        use crate::{Capabilities, Result, TimeRange};

        /// The least broker there is: healthy, accepting everything.
        #[derive(Debug)]
        struct Accepting;
        #[async_trait]
        impl Publisher for Accepting {
            async fn publish(&self, _: &str, _: Message) -> Result<()> {
                Ok(())
            }
        }
        #[async_trait]
        impl Subscriber for Accepting {
            async fn subscribe(&self, _: &str, _: SubscribeOptions) -> Result<Subscription> {
                Err(Error::unsupported("accepting", "subscribing"))
            }
        }
        #[async_trait]
        impl Broker for Accepting {
            fn name(&self) -> &'static str {
                "accepting"
            }
            fn capabilities(&self) -> Capabilities {
                Capabilities::NONE
            }
            async fn health(&self) -> Health {
                Health::healthy("up")
            }
            async fn read_range(&self, _: &str, _: TimeRange) -> Result<HistoryStream> {
                Err(Error::unsupported("accepting", "history"))
            }
            async fn close(&self) -> Result<()> {
                Ok(())
            }
        }

        let breaker = BreakerBroker::new(
            Arc::new(Accepting),
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

    #[tokio::test]
    async fn the_memory_spool_keeps_order_and_bounds() {
        keeps_order_and_bounds(&MemorySpool::new(limits())).await;
    }

    #[cfg(feature = "sqlite")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_sqlite_spool_keeps_order_and_bounds_and_survives_reopening() {
        let path = std::env::temp_dir().join(format!(
            "helix-spool-test-{}.sqlite",
            uuid::Uuid::new_v4().simple()
        ));
        let spool = SqliteSpool::open(&path, limits()).await.unwrap();
        keeps_order_and_bounds(&spool).await;
        drop(spool);
        let reopened = SqliteSpool::open(&path, limits()).await.unwrap();
        assert_eq!(reopened.stats().await.unwrap().depth, 2, "kept on disk");
        assert_eq!(
            reopened.oldest(1).await.unwrap()[0]
                .message
                .payload()
                .as_ref(),
            b"a2"
        );
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
    }
}
