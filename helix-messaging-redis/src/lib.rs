//! Redis backend for helix-messaging, in two honestly labelled modes:
//!
//! - **pub/sub** ([`RedisMode::PubSub`], `MESSAGING_BACKEND=redis`): PUBLISH / SUBSCRIBE.
//!   At most once: nothing is stored, a message published while nobody listens is gone
//!   (counted, not an error), there are no consumer groups and no redelivery — `nack(true)`
//!   returns `Unsupported` so a retry layer knows to retry in process. A subscriber whose
//!   connection drops reconnects and resubscribes by itself when next polled.
//! - **Streams** ([`RedisMode::Streams`], `MESSAGING_BACKEND=redis-streams`): XADD, trimmed
//!   to a length limit but never below what a group still needs (the `trim` module's
//!   docs), consumer groups with XREADGROUP, XACK on ack, requeue by handing the
//!   entry back to the group, attempt from the delivery count, a reclaimer (XAUTOCLAIM) that
//!   takes over entries left pending past the ack deadline (measured from delivery), replay by
//!   time range with XRANGE, and TTL enforced when a message is read.
//!
//! ```no_run
//! use helix_messaging_core::{Broker, Message, Publisher};
//! use helix_messaging_redis::{RedisBroker, RedisConfig, RedisMode};
//!
//! # async fn demo() -> helix_messaging_core::Result<()> {
//! let broker = RedisBroker::connect(RedisConfig::from_env(RedisMode::Streams)?).await?;
//! broker.publish("helixagent.events.audit", Message::new("login")).await?;
//! # Ok(()) }
//! ```

mod acks;
mod codec;
mod config;
mod error;
mod primary;
mod pubsub;
mod shared;
mod streams;
mod trim;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_trait::async_trait;
use helix_messaging_core::{
    BatchReport, Broker, Capabilities, Error, Health, HealthStatus, HistoryStream, Message,
    Publisher, Result, SubscribeOptions, Subscriber, Subscription, TimeRange, check_payload_size,
    validate_name, within,
};

use helix_messaging_core::observe::connection::{count_connection, count_connection_failure};
use primary::Primary;
use shared::Shared;

pub use config::{
    DEFAULT_MAX_PAYLOAD_BYTES, PUBSUB_CAPABILITIES, PUBSUB_NAME, RedisConfig, RedisMode,
    STREAMS_CAPABILITIES, STREAMS_NAME, StreamsConfig,
};
pub use streams::REQUEUE_CONSUMER;
pub use trim::{TRIM_HELD_BACK_METRIC, TRIMMED_METRIC, TrimReport};

/// Name of the metric counting pub/sub publishes that reached no subscriber.
pub const UNROUTED_METRIC: &str = "messaging_redis_unrouted_publishes_total";

// The publish path of both modes: it builds each mode's commands and trims after Streams
// publishes, so it stands here, above both modes and trimming, rather than with the state it
// works on.
impl Shared {
    /// Validate one message for `topic` and build the command that publishes it in this
    /// mode.
    fn prepare(&self, topic: &str, message: &Message) -> Result<redis::Cmd> {
        check_payload_size(self.name(), message, self.config.max_payload_bytes)?;
        match self.config.mode {
            RedisMode::PubSub => Ok(codec::publish_command(
                topic,
                message,
                self.config.pubsub_envelope,
            )),
            RedisMode::Streams => Ok(streams::xadd(self, topic, message)),
        }
    }

    /// Run publish commands in one pipelined round trip. Pub/sub publishes that reached no
    /// subscriber are counted, not errors.
    async fn send(
        &self,
        topic: &str,
        commands: impl IntoIterator<Item = redis::Cmd>,
    ) -> Result<()> {
        let mut pipe = redis::pipe();
        for command in commands {
            pipe.add_command(command);
        }
        // Redis replicates asynchronously: WAIT, after the entries on the same connection,
        // answers once that many replicas hold everything written before it.
        let replicas = self.config.min_replicas_ack;
        if replicas > 0 {
            pipe.cmd("WAIT")
                .arg(replicas)
                .arg(self.config.min_replicas_timeout.as_millis() as u64);
        }
        let mut commands = self.commands.clone();
        let replies: Vec<redis::Value> = match pipe.query_async(&mut commands).await {
            Ok(replies) => {
                if self.commands_lost.swap(false, Ordering::AcqRel) {
                    self.count_reconnect();
                    count_connection(self.name());
                    self.commands_state.set(true);
                }
                replies
            }
            Err(err) => {
                let err = error::from_redis(err, format!("publishing to {topic}"));
                if err.kind() == helix_messaging_core::ErrorKind::Connection {
                    self.commands_lost.store(true, Ordering::Release);
                    self.commands_state.set(false);
                }
                return Err(err);
            }
        };
        if replicas > 0 {
            let confirmed = match replies.last() {
                Some(redis::Value::Int(n)) => usize::try_from(*n).unwrap_or(0),
                _ => 0,
            };
            if confirmed < replicas {
                return Err(Error::new(
                    helix_messaging_core::ErrorKind::Timeout,
                    format!(
                        "publishing to {topic}: {confirmed} of the {replicas} replicas REDIS_MIN_REPLICAS_ACK asks for confirmed within {:?}; the entries are on the primary, and a failover may lose them",
                        self.config.min_replicas_timeout
                    ),
                )
                .with_retryable(true));
            }
        }
        if self.config.mode == RedisMode::PubSub {
            let unrouted = replies
                .iter()
                .filter(|r| matches!(r, redis::Value::Int(0)))
                .count() as u64;
            if unrouted > 0 {
                self.unrouted.fetch_add(unrouted, Ordering::Relaxed);
                metrics::counter!(UNROUTED_METRIC, "topic" => topic.to_owned()).increment(unrouted);
            }
        }
        Ok(())
    }

    /// After a publish to `topic`: Streams are trimmed in the background when due (its
    /// interval has passed and no trim of it is running).
    fn published(self: &Arc<Self>, topic: &str) {
        if self.config.mode != RedisMode::Streams
            || !self.trimmer.start_if_due(topic, &self.config.streams)
        {
            return;
        }
        let shared = self.clone();
        let topic = topic.to_owned();
        self.tasks.spawn(async move {
            if let Err(err) = shared.trim(&topic).await {
                tracing::warn!(topic, error = %err, "trimming failed; the next publish tries again");
            }
            shared.trimmer.finished(&topic);
        });
    }

    /// Trim `topic` now.
    async fn trim(&self, topic: &str) -> Result<TrimReport> {
        self.trimmer
            .trim(&self.commands, &self.config.streams, topic)
            .await
    }
}

/// A connection to Redis in pub/sub or Streams mode. Cheap to clone.
#[derive(Clone)]
pub struct RedisBroker {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for RedisBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBroker")
            .field("config", &self.shared.config)
            .field("closed", &self.shared.closed.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl RedisBroker {
    /// Connect (the first connection is awaited; later ones are re-established by
    /// themselves).
    ///
    /// # Errors
    /// [`Config`](helix_messaging_core::ErrorKind::Config) for unusable settings (unreadable
    /// CA file, refused credentials), [`Connection`](helix_messaging_core::ErrorKind::Connection)
    /// or [`Timeout`](helix_messaging_core::ErrorKind::Timeout) when the server cannot be
    /// reached.
    ///
    /// Counted in `messaging_connections_total` or, when it fails,
    /// `messaging_connection_failures_total`.
    pub async fn connect(config: RedisConfig) -> Result<Self> {
        let backend = shared::backend_name(config.mode);
        let connected = RedisBroker::connect_uncounted(config).await;
        match &connected {
            Ok(_) => count_connection(backend),
            Err(_) => count_connection_failure(backend),
        }
        connected
    }

    async fn connect_uncounted(config: RedisConfig) -> Result<Self> {
        config.validate()?;
        let primary = Arc::new(Primary::locate(&config).await?);
        // One direct attempt first, so an unreachable server or a refused certificate is
        // reported at once rather than after the manager's reconnect backoff. (A cluster's
        // connection, or a sentinel-named primary's, is made once without a backoff below:
        // only the plain server's is a connection manager.)
        if config.cluster_nodes.is_empty() && config.sentinels.is_empty() {
            let (client, address) = primary.client().await?;
            within(
                config.connect_timeout,
                format!("connecting to {address}"),
                client.get_multiplexed_async_connection(),
            )
            .await?
            .map_err(|e| error::from_redis(e, format!("connecting to {address}")))?;
        }
        // A publish's WAIT holds the connection's reply for up to its timeout.
        let waits = if config.min_replicas_ack > 0 {
            config.min_replicas_timeout
        } else {
            Duration::ZERO
        };
        let commands = primary.connect(waits).await?;
        Ok(RedisBroker {
            shared: Arc::new(Shared::new(config, primary, commands)),
        })
    }

    /// Connect with settings from the environment (see [`RedisConfig::from_vars`]).
    ///
    /// # Errors
    /// As [`RedisConfig::from_vars`] and [`RedisBroker::connect`].
    pub async fn from_env(mode: RedisMode) -> Result<Self> {
        RedisBroker::connect(RedisConfig::from_env(mode)?).await
    }

    /// The settings in use.
    pub fn config(&self) -> &RedisConfig {
        &self.shared.config
    }

    /// Pub/sub publishes that reached no subscriber since connecting (also reported as the
    /// [`UNROUTED_METRIC`] counter).
    pub fn unrouted_publishes(&self) -> u64 {
        self.shared.unrouted.load(Ordering::Relaxed)
    }

    /// Stream entries removed by trimming since connecting (also reported as the
    /// [`TRIMMED_METRIC`] counter).
    pub fn trimmed_entries(&self) -> u64 {
        self.shared.trimmer.trimmed()
    }

    /// Trim `topic` to [`StreamsConfig::max_len`] now, never below the oldest entry a
    /// consumer group has pending or not yet delivered. Publishing does this by itself at most
    /// once per [`StreamsConfig::trim_interval`]; this is for operators and tests.
    ///
    /// # Errors
    /// [`Unsupported`](helix_messaging_core::ErrorKind::Unsupported) in pub/sub mode;
    /// [`Closed`](helix_messaging_core::ErrorKind::Closed) after `close`; the server's error.
    pub async fn trim(&self, topic: &str) -> Result<TrimReport> {
        validate_name("topic", topic)?;
        self.shared.ensure_open()?;
        if self.shared.config.mode == RedisMode::PubSub {
            return Err(Error::unsupported(
                PUBSUB_NAME,
                "trimming (pub/sub stores nothing)",
            ));
        }
        self.shared.trim(topic).await
    }
}

/// Commands per pipeline in a `publish_batch`.
const PUBLISH_CHUNK: usize = 1000;

#[async_trait]
impl Publisher for RedisBroker {
    async fn publish(&self, topic: &str, message: Message) -> Result<()> {
        validate_name("topic", topic)?;
        self.shared.ensure_open()?;
        let command = self.shared.prepare(topic, &message)?;
        self.shared.send(topic, [command]).await?;
        self.shared.published(topic);
        Ok(())
    }

    async fn publish_batch(&self, topic: &str, messages: Vec<Message>) -> BatchReport {
        let total = messages.len();
        if let Err(err) = validate_name("topic", topic).and_then(|()| self.shared.ensure_open()) {
            return BatchReport::all_failed(total, &err);
        }
        let mut failures = Vec::new();
        let mut prepared = Vec::with_capacity(total);
        for (index, message) in messages.iter().enumerate() {
            match self.shared.prepare(topic, message) {
                Ok(command) => prepared.push((index, command)),
                Err(err) => failures.push((index, err)),
            }
        }
        // One pipeline per chunk, without building a single enormous request, and every
        // chunk in flight at once on the multiplexed connection: awaiting each chunk's
        // replies before writing the next left the connection idle for a round trip per
        // chunk (pub/sub `publish_batch` of 10,000 ran at 0.85x raw redis-rs writing one
        // pipeline). The chunks are written in order: each one's request is queued on the
        // connection when it is first polled, and `join_all` first polls them in order.
        let mut prepared = prepared.into_iter().peekable();
        let mut chunks = Vec::new();
        while prepared.peek().is_some() {
            let (indexes, commands): (Vec<usize>, Vec<redis::Cmd>) =
                prepared.by_ref().take(PUBLISH_CHUNK).unzip();
            chunks.push((indexes, commands));
        }
        let sent = futures::future::join_all(chunks.into_iter().map(|(indexes, commands)| async {
            (indexes, self.shared.send(topic, commands).await)
        }))
        .await;
        for (indexes, result) in sent {
            if let Err(err) = result {
                failures.extend(indexes.into_iter().map(|i| (i, err.copy_without_source())));
            }
        }
        self.shared.published(topic);
        BatchReport::new(total, failures)
    }
}

impl RedisBroker {
    /// Check the names and that the broker is open, for `doing` something to a consumer
    /// group, which only Streams mode has.
    fn streams_group(&self, topic: &str, group: &str, doing: &str) -> Result<()> {
        validate_name("topic", topic)?;
        validate_name("group", group)?;
        self.shared.ensure_open()?;
        match self.shared.config.mode {
            RedisMode::PubSub => Err(Error::unsupported(
                PUBSUB_NAME,
                format!("{doing} (pub/sub has no groups; use redis-streams)"),
            )),
            RedisMode::Streams => Ok(()),
        }
    }
}

#[async_trait]
impl Subscriber for RedisBroker {
    async fn subscribe(&self, topic: &str, options: SubscribeOptions) -> Result<Subscription> {
        validate_name("topic", topic)?;
        if let Some(group) = &options.group {
            validate_name("group", group)?;
        }
        self.shared.ensure_open()?;
        match self.shared.config.mode {
            RedisMode::PubSub => pubsub::subscribe(&self.shared, topic, options).await,
            RedisMode::Streams => streams::subscribe(&self.shared, topic, options).await,
        }
    }
}

#[async_trait]
impl Broker for RedisBroker {
    fn name(&self) -> &'static str {
        self.shared.name()
    }

    fn capabilities(&self) -> Capabilities {
        self.shared.config.capabilities()
    }

    async fn health(&self) -> Health {
        if self.shared.closed.load(Ordering::Acquire) {
            return Health::unhealthy(format!("the {} broker is closed", self.name()));
        }
        let mut commands = self.shared.commands.clone();
        let ping: redis::RedisResult<String> = redis::cmd("PING").query_async(&mut commands).await;
        let address = self.shared.primary.address();
        match ping {
            Err(err) => Health::unhealthy(format!("{address}: {err}")),
            Ok(_) => match self.shared.reconnecting.load(Ordering::Relaxed) {
                0 => Health::healthy(format!("{address} answers")),
                n => Health {
                    status: HealthStatus::Degraded,
                    detail: format!("{address} answers; {n} subscriptions are reconnecting"),
                },
            },
        }
    }

    async fn backlog(&self, topic: &str, group: &str) -> Result<helix_messaging_core::Backlog> {
        self.streams_group(topic, group, "reporting a group's backlog")?;
        streams::backlog(&self.shared, topic, group).await
    }

    /// Streams: the group of that name on the stream whose key is the topic. Pub/sub has no
    /// groups: the channel.
    fn group_address(&self, topic: &str, group: &str) -> helix_messaging_core::GroupAddress {
        match self.shared.config.mode {
            RedisMode::Streams => helix_messaging_core::GroupAddress {
                kind: "stream group",
                name: group.to_owned(),
                source: Some(format!("stream {topic}")),
            },
            RedisMode::PubSub => helix_messaging_core::GroupAddress {
                kind: "channel",
                name: topic.to_owned(),
                source: None,
            },
        }
    }

    /// Streams: `XGROUP CREATE <topic> <group> $ MKSTREAM`, no consumer and no blocking
    /// connection; pub/sub has no groups.
    async fn create_group(&self, topic: &str, group: &str) -> Result<()> {
        self.streams_group(topic, group, "creating a consumer group")?;
        streams::create_group(&self.shared, topic, group).await
    }

    async fn read_range(&self, topic: &str, range: TimeRange) -> Result<HistoryStream> {
        validate_name("topic", topic)?;
        self.shared.ensure_open()?;
        match self.shared.config.mode {
            RedisMode::PubSub => Err(Error::unsupported(
                PUBSUB_NAME,
                "reading history (pub/sub keeps none; use redis-streams)",
            )),
            RedisMode::Streams => Ok(streams::read_range(self.shared.clone(), topic, range)),
        }
    }

    async fn close(&self) -> Result<()> {
        self.shared.closed.store(true, Ordering::Release);
        self.shared.commands_state.set(false);
        self.shared.shutdown.cancel();
        self.shared.tasks.close();
        // Subscription tasks hand their unacked entries back to the group on the way out;
        // give them a bounded moment to do so.
        let _ = tokio::time::timeout(
            self.shared.config.response_timeout,
            self.shared.tasks.wait(),
        )
        .await;
        Ok(())
    }
}
