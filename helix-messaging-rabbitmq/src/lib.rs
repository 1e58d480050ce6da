//! RabbitMQ backend for helix-messaging, on lapin.
//!
//! Topology: every topic is a routing key on one durable topic exchange
//! ([`RabbitConfig::exchange`], `helixagent` by default). A consumer group is a durable queue
//! named `<topic>.<group>` bound to that routing key, so members of a group share its
//! messages and every group gets every message. A subscription without a group gets a queue
//! of its own, `<topic>.private-<uuid>`, deleted with the subscription (and by `x-expires`
//! if its process dies); not exclusive, so a reconnect finds it again. Group queues are classic queues with
//! `x-max-priority`, so a backlog is delivered by priority; a message whose TTL has passed is
//! dropped when it is read (see the `wire` module for why not the AMQP `expiration`).
//!
//! Publishing is persistent, `mandatory` and, by default, confirmed: a publish resolves after
//! the broker's confirm, an unroutable message (no group bound to the topic) is returned as an
//! [`ErrorKind::Rejected`] error, never a silent ack. A batch keeps every confirm in flight
//! and waits for them together.
//!
//! Requeue (`nack(true)`) publishes a copy to the group's queue carrying the number of
//! deliveries so far in the `x-helix-attempt` header, then acks the original, so `attempt`
//! is exact on classic queues (which keep no delivery count); the copy joins the back of the
//! queue. Deliveries a closed channel returns (a dropped subscription, a lost connection) come
//! back natively with only the redelivered flag: the consumer re-counts each such delivery by
//! the same copy-then-ack before the application sees it, so attempts stay exact through a
//! crash loop too.
//!
//! Headers starting with `x-helix-` are reserved for this mapping.

mod config;
mod error;
mod journal;
mod link;
mod topology;
mod wire;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use helix_messaging_core::{
    Acknowledge, Backlog, BatchReport, Broker, Capabilities, DEFAULT_PREFETCH, Delivery, Error,
    ErrorKind, Health, HistoryStream, Message, Publisher, Result, Settlement, StartPosition,
    SubscribeOptions, Subscriber, Subscription, TimeRange, check_payload_size, validate_name,
    within,
};
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, BasicRejectOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Confirmation};

pub use config::{DEFAULT_MAX_PAYLOAD_BYTES, RabbitConfig};
pub use topology::{
    Binding, Exchange, ExchangeType, HELIXAGENT_DLQ, HELIXAGENT_EVENTS, HELIXAGENT_NOTIFICATIONS,
    HELIXAGENT_RETRY, HELIXAGENT_TASKS, Queue, QueueType, Topology,
};

use error::from_lapin;
use link::{Link, Supervisor};

/// Backend name reported by [`Broker::name`] and selected by `MESSAGING_BACKEND=rabbitmq`.
pub const NAME: &str = "rabbitmq";

/// What the RabbitMQ backend promises.
pub const CAPABILITIES: Capabilities = Capabilities {
    metadata: true,
    durable: true,
    redelivery: true,
    consumer_groups: true,
    per_key_ordering: true,
    priority: true,
    ttl: true,
    redeliver_unacked: true,
    // Needs the replay journal, which is off by default; see `RabbitConfig::replay_journal`.
    replay_by_time: false,
    native_dlq: true,
    delayed_delivery: true,
    backlog: true,
    max_payload_bytes: Some(DEFAULT_MAX_PAYLOAD_BYTES),
};

struct Shared {
    supervisor: Arc<Supervisor>,
    /// Messages (queue, message id) a subscription of this broker had prefetched but never
    /// handed to the application when it ended: they come back flagged redelivered, and are
    /// not an attempt.
    /// Each says whether the delivery was itself a redelivery not counted yet when it was
    /// prefetched (returned by an earlier consumer that had received it): that return is
    /// still an attempt to count.
    unseen: std::sync::Mutex<std::collections::HashMap<(String, String), bool>>,
}

/// Most remembered unseen returns; past it the memory starts over (those returns then count
/// as attempts, as they would in another process).
const UNSEEN_MAX: usize = 100_000;

impl Shared {
    fn config(&self) -> &RabbitConfig {
        self.supervisor.config()
    }

    fn unseen(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<(String, String), bool>> {
        self.unseen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn note_unseen(&self, queue: &str, id: String, uncounted: bool) {
        let mut unseen = self.unseen();
        if unseen.len() >= UNSEEN_MAX {
            unseen.clear();
        }
        // A return noted earlier and prefetched again unseen comes back flagged redelivered
        // by its own earlier return, not by an attempt: what the first note said stands.
        unseen
            .entry((queue.to_owned(), id))
            .and_modify(|earlier| *earlier &= uncounted)
            .or_insert(uncounted);
    }

    /// Whether `id` came back unseen from a subscription of this broker: `Some(uncounted)`
    /// as noted by [`Shared::note_unseen`].
    fn take_unseen(&self, queue: &str, id: &str) -> Option<bool> {
        self.unseen().remove(&(queue.to_owned(), id.to_owned()))
    }

    fn ensure_open(&self) -> Result<()> {
        if self.supervisor.is_closed() {
            Err(Error::closed("the rabbitmq broker"))
        } else {
            Ok(())
        }
    }

    /// The link if it is usable now; otherwise a retryable error (and reconnecting starts).
    fn link(&self) -> Result<Arc<Link>> {
        self.supervisor
            .usable()
            .ok_or_else(|| self.supervisor.unavailable())
    }

    /// A lapin error met on the live connection: map it, and start reconnecting when it means
    /// the connection is gone.
    fn connection_error(&self, err: lapin::Error, doing: impl std::fmt::Display) -> Error {
        let err = from_lapin(err, doing);
        // A channel the server closed reports itself as a connection error too; only a
        // connection that is really down is replaced (which tears down every consumer).
        if err.kind() == ErrorKind::Connection {
            let _ = self.supervisor.usable();
        }
        err
    }

    /// Start publishing `message`; the returned future resolves with the broker's verdict.
    /// Without a usable connection this fails at once with a retryable error.
    async fn start_publish(
        &self,
        exchange: &str,
        routing_key: &str,
        message: &Message,
        attempts_so_far: Option<u32>,
    ) -> Result<lapin::PublisherConfirm> {
        self.within_publish_timeout(
            routing_key,
            self.begin_publish(exchange, routing_key, message, attempts_so_far),
        )
        .await
    }

    /// [`Shared::start_publish`] without its timeout.
    async fn begin_publish(
        &self,
        exchange: &str,
        routing_key: &str,
        message: &Message,
        attempts_so_far: Option<u32>,
    ) -> Result<lapin::PublisherConfirm> {
        check_payload_size(NAME, message, self.config().max_payload_bytes)?;
        self.begin_publish_raw(
            exchange,
            routing_key,
            message.payload(),
            wire::properties(message, attempts_so_far),
        )
        .await
    }

    /// [`Shared::start_publish`] of a payload with its AMQP properties as they are (copies of
    /// received messages).
    async fn start_publish_raw(
        &self,
        exchange: &str,
        routing_key: &str,
        payload: &[u8],
        properties: lapin::BasicProperties,
    ) -> Result<lapin::PublisherConfirm> {
        self.within_publish_timeout(
            routing_key,
            self.begin_publish_raw(exchange, routing_key, payload, properties),
        )
        .await
    }

    /// [`Shared::start_publish_raw`] without its timeout.
    async fn begin_publish_raw(
        &self,
        exchange: &str,
        routing_key: &str,
        payload: &[u8],
        properties: lapin::BasicProperties,
    ) -> Result<lapin::PublisherConfirm> {
        let link = self.link()?;
        let publisher = link.publisher().await?;
        publisher
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                payload,
                properties,
            )
            .await
            .map_err(|e| self.connection_error(e, format!("publishing to {routing_key}")))
    }

    /// `step` of a publish to `routing_key`, failing with [`Shared::publish_timed_out`] past
    /// the publish timeout.
    fn within_publish_timeout<T>(
        &self,
        routing_key: &str,
        step: impl Future<Output = Result<T>>,
    ) -> impl Future<Output = Result<T>> {
        let deadline = tokio::time::Instant::now() + self.config().publish_timeout;
        self.by_publish_deadline(deadline, routing_key, step)
    }

    /// `step` of a publish to `routing_key`, failing with [`Shared::publish_timed_out`] past
    /// `deadline`.
    async fn by_publish_deadline<T>(
        &self,
        deadline: tokio::time::Instant,
        routing_key: &str,
        step: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        tokio::time::timeout_at(deadline, step)
            .await
            .map_err(|_| self.publish_timed_out(routing_key))?
    }

    /// Publish a copy straight to `queue` (the default exchange) and wait for its confirm: how
    /// a requeue and a re-counted redelivery carry their attempt count.
    async fn copy_to_queue(
        &self,
        queue: &str,
        payload: &[u8],
        properties: lapin::BasicProperties,
    ) -> Result<()> {
        let confirm = self
            .start_publish_raw("", queue, payload, properties)
            .await?;
        self.confirmed(queue, confirm).await
    }

    /// Publish a copy to `queue`'s retry queue for `delay` (rounded up to a step of
    /// [`delay_step`]): a queue whose message TTL is that step and which dead-letters back to
    /// `queue`, so the broker holds the message meanwhile. The retry queue is declared each
    /// time, which also renews its `x-expires` (it goes away a minute after its last use,
    /// always after the messages in it have left).
    async fn delay_to_queue(
        &self,
        queue: &str,
        payload: &[u8],
        properties: lapin::BasicProperties,
        delay: Duration,
    ) -> Result<()> {
        let step = delay_step(delay);
        let retry_queue = format!("{queue}.retry.{step}");
        let mut arguments = FieldTable::default();
        arguments.insert("x-message-ttl".into(), AMQPValue::LongUInt(step));
        arguments.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString("".into()),
        );
        arguments.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(queue.into()),
        );
        arguments.insert(
            "x-expires".into(),
            AMQPValue::LongUInt(step.saturating_add(60_000)),
        );
        let link = self.link()?;
        let declare = async {
            link.publisher()
                .await?
                .queue_declare(
                    retry_queue.as_str().into(),
                    QueueDeclareOptions {
                        durable: true,
                        ..QueueDeclareOptions::default()
                    },
                    arguments,
                )
                .await
                .map_err(|e| self.connection_error(e, format!("declaring {retry_queue}")))
        };
        tokio::time::timeout(self.config().publish_timeout, declare)
            .await
            .map_err(|_| self.publish_timed_out(&retry_queue))??;
        self.copy_to_queue(&retry_queue, payload, wire::delayed(properties))
            .await
    }

    fn publish_timed_out(&self, routing_key: &str) -> Error {
        Error::new(
            ErrorKind::Timeout,
            format!(
                "no confirm for a publish to {routing_key} within {:?} (connection lost or broker blocked); whether it was stored is unknown",
                self.config().publish_timeout
            ),
        )
    }

    /// The broker's verdict on one publish, within the publish timeout.
    async fn confirmed(&self, routing_key: &str, confirm: lapin::PublisherConfirm) -> Result<()> {
        self.within_publish_timeout(routing_key, self.verdict(routing_key, confirm))
            .await
    }

    /// [`Shared::confirmed`] without its timeout.
    async fn verdict(&self, routing_key: &str, confirm: lapin::PublisherConfirm) -> Result<()> {
        let confirmation = confirm.await.map_err(|e| {
            self.connection_error(
                e,
                format!("waiting for the confirm of a publish to {routing_key}"),
            )
        })?;
        match confirmation {
            Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
            Confirmation::Ack(Some(returned)) => Err(Error::new(
                ErrorKind::Rejected,
                format!(
                    "unroutable: no queue is bound to {routing_key} on exchange {:?} (no consumer group exists for the topic); the broker returned it ({} {})",
                    returned.delivery.exchange.as_str(),
                    returned.reply_code,
                    returned.reply_text
                ),
            )),
            Confirmation::Nack(_) => Err(Error::new(
                ErrorKind::Rejected,
                format!(
                    "the broker refused to store a message for {routing_key} (negative confirm)"
                ),
            )
            .with_retryable(true)),
        }
    }
}

/// A connection to RabbitMQ, supervised: when it is lost it is replaced, with backoff, and
/// every subscription re-creates its queue, binding and consumer on the new one. Cheap to
/// clone.
#[derive(Clone)]
pub struct RabbitBroker {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for RabbitBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitBroker")
            .field("config", self.shared.config())
            .field("closed", &self.shared.supervisor.is_closed())
            .finish_non_exhaustive()
    }
}

impl RabbitBroker {
    /// Connect, open the publishing channel and declare the exchange.
    ///
    /// # Errors
    /// [`ErrorKind::Connection`] / [`ErrorKind::Timeout`] when the server cannot be reached,
    /// [`ErrorKind::Config`] when it refuses the credentials or the vhost.
    pub async fn connect(config: RabbitConfig) -> Result<Self> {
        let first = Link::open(&config, &[]).await?;
        Ok(RabbitBroker {
            shared: Arc::new(Shared {
                supervisor: Supervisor::new(config, first),
                unseen: std::sync::Mutex::default(),
            }),
        })
    }

    /// Connect with settings from the environment (see [`RabbitConfig::from_vars`]).
    ///
    /// # Errors
    /// As [`RabbitConfig::from_vars`] and [`RabbitBroker::connect`].
    pub async fn from_env() -> Result<Self> {
        RabbitBroker::connect(RabbitConfig::from_env()?).await
    }

    /// The settings in use.
    pub fn config(&self) -> &RabbitConfig {
        self.shared.config()
    }
}

#[async_trait]
impl Publisher for RabbitBroker {
    async fn publish(&self, topic: &str, message: Message) -> Result<()> {
        validate_name("topic", topic)?;
        self.shared.ensure_open()?;
        // One timeout for the publish and its confirm (as `publish_timeout` promises), not
        // one each: a timer is registered and removed per publish, and under many concurrent
        // callers the second one was 3% of the client's instructions. Written out rather than
        // through `within_publish_timeout`: its async fn holds the publish's future (lapin's
        // is large) in a state of its own, one more copy of it per publish (callgrind).
        let shared = &self.shared;
        tokio::time::timeout(shared.config().publish_timeout, async {
            let confirm = shared
                .begin_publish(&shared.config().exchange, topic, &message, None)
                .await?;
            shared.verdict(topic, confirm).await
        })
        .await
        .map_err(|_| shared.publish_timed_out(topic))?
    }

    async fn publish_batch(&self, topic: &str, messages: Vec<Message>) -> BatchReport {
        let total = messages.len();
        if let Err(err) = validate_name("topic", topic).and_then(|()| self.shared.ensure_open()) {
            return BatchReport::all_failed(total, &err);
        }
        // Every publish goes out before any confirm is awaited: one window of confirms in
        // flight instead of a round trip per message.
        let shared = &self.shared;
        // The confirms are awaited in turn: one deadline for all of them, set when the first
        // is awaited, so a batch the broker does not confirm fails within one publish timeout.
        let deadline = std::sync::OnceLock::new();
        BatchReport::pipelined(
            messages,
            |message| async move {
                shared
                    .start_publish(&shared.config().exchange, topic, &message, None)
                    .await
            },
            move |confirm| {
                let deadline = *deadline
                    .get_or_init(|| tokio::time::Instant::now() + shared.config().publish_timeout);
                shared.by_publish_deadline(deadline, topic, shared.verdict(topic, confirm))
            },
        )
        .await
    }
}

/// What a subscription is, so it can be re-created on a new connection.
struct SubscriptionSpec {
    /// The topic, or the queue's name for [`RabbitBroker::consume`].
    topic: Arc<str>,
    group: Option<Arc<str>>,
    prefetch: u16,
    /// Consume this declared queue as it is instead of declaring and binding a group queue.
    declared_queue: bool,
    /// The queue of a subscription without a group, `<topic>.private-<uuid>`: named here so
    /// that a reconnect declares the same queue again instead of a new, empty one.
    private_queue: Option<String>,
}

impl SubscriptionSpec {
    /// The name of a named group's queue, `<topic>.<group>`; `None` for a private
    /// subscription (see [`SubscriptionSpec::private_queue`]).
    fn group_queue(&self) -> Option<String> {
        self.group
            .as_ref()
            .map(|group| format!("{}.{group}", self.topic))
    }
}

/// Declare the queue, bind it, set the prefetch and start consuming on a new channel, within
/// the connect timeout (a broker that is still starting may never answer).
async fn open_consumer(
    shared: &Shared,
    spec: &SubscriptionSpec,
    link: &Link,
) -> Result<(Channel, lapin::Consumer, String)> {
    within(
        shared.config().connect_timeout,
        format!("setting up the consumer for {}", spec.topic),
        open_consumer_unbounded(shared, spec, link),
    )
    .await?
}

async fn open_consumer_unbounded(
    shared: &Shared,
    spec: &SubscriptionSpec,
    link: &Link,
) -> Result<(Channel, lapin::Consumer, String)> {
    let lapin_err = |e, doing: String| shared.connection_error(e, doing);
    let channel = link
        .connection
        .create_channel()
        .await
        .map_err(|e| lapin_err(e, "opening a consumer channel".into()))?;
    channel
        .basic_qos(spec.prefetch, BasicQosOptions::default())
        .await
        .map_err(|e| lapin_err(e, "setting the prefetch".into()))?;
    let queue_name = if spec.declared_queue {
        spec.topic.to_string()
    } else {
        declare_group_queue(shared, spec, &channel).await?
    };
    let consumer = channel
        .basic_consume(
            queue_name.as_str().into(),
            format!("helix-{}", uuid::Uuid::new_v4().simple()).into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| lapin_err(e, format!("consuming from {queue_name}")))?;
    Ok((channel, consumer, queue_name))
}

/// Declare the subscription's queue and bind it to its topic; returns the queue's name.
async fn declare_group_queue(
    shared: &Shared,
    spec: &SubscriptionSpec,
    channel: &Channel,
) -> Result<String> {
    let config = shared.config();
    let lapin_err = |e, doing: String| shared.connection_error(e, doing);
    let private = spec.group.is_none();
    let name = spec
        .group_queue()
        .or_else(|| spec.private_queue.clone())
        .unwrap_or_default();
    let mut queue = Queue::classic(name);
    if config.max_priority > 0 {
        queue = queue.max_priority(config.max_priority);
    }
    if let Some(dlq) = &config.dead_letter_queue {
        queue = queue.dead_letter_to_queue(dlq.as_str());
    }
    let mut arguments = queue.arguments();
    let expires = if private {
        Some(config.private_queue_expires)
    } else {
        config.group_queue_expires
    };
    if let Some(expires) = expires {
        arguments.insert(
            "x-expires".into(),
            AMQPValue::LongUInt(u32::try_from(expires.as_millis()).unwrap_or(u32::MAX)),
        );
    }
    // A private queue is neither exclusive nor auto-delete: either would delete it with a
    // lost connection, and with it what was published until the reconnect.
    let declared = channel
        .queue_declare(
            queue.name.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            arguments,
        )
        .await
        .map_err(|e| lapin_err(e, format!("declaring queue {:?}", queue.name)))?;
    let queue_name = declared.name().as_str().to_owned();
    // Bound before returning, so every later publish to the topic reaches the queue.
    channel
        .queue_bind(
            queue_name.as_str().into(),
            config.exchange.as_str().into(),
            (*spec.topic).into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| lapin_err(e, format!("binding {queue_name} to {}", spec.topic)))?;
    Ok(queue_name)
}

impl RabbitBroker {
    /// Declare `topology` now and again on every new connection (after a reconnect, before
    /// any subscription is re-created).
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] for inconsistent declarations (nothing is sent then);
    /// [`ErrorKind::Rejected`] when the broker refuses one, typically because the queue or
    /// exchange exists with other arguments (the topology is then not remembered);
    /// [`ErrorKind::Connection`] without a connection.
    pub async fn declare(&self, topology: Topology) -> Result<()> {
        self.shared.ensure_open()?;
        topology.validate()?;
        let link = self.shared.link()?;
        within(
            self.shared.config().connect_timeout,
            "declaring topology",
            topology.declare_on(&link.connection),
        )
        .await??;
        self.shared.supervisor.remember(topology);
        Ok(())
    }

    /// Publish `message` to `exchange` with `routing_key` (for example a task to the seeds'
    /// `helixagent.tasks` exchange with key `llm`), with the same confirms and `mandatory`
    /// handling as [`Publisher::publish`].
    ///
    /// # Errors
    /// As [`Publisher::publish`]; [`ErrorKind::Rejected`] when no queue is bound for
    /// `routing_key`; [`ErrorKind::NotFound`] when the exchange does not exist.
    pub async fn publish_to(
        &self,
        exchange: &str,
        routing_key: &str,
        message: Message,
    ) -> Result<()> {
        self.shared.ensure_open()?;
        let confirm = self
            .shared
            .start_publish(exchange, routing_key, &message, None)
            .await?;
        self.shared.confirmed(routing_key, confirm).await
    }

    /// Consume the declared queue `queue` as it is (no declaration, no binding), for example
    /// `helixagent.tasks.llm` or the dead-letter queue. Deliveries report the queue's name as
    /// their topic; otherwise it behaves as a group subscription, re-created after a
    /// reconnect.
    ///
    /// # Errors
    /// [`ErrorKind::NotFound`] when the queue does not exist; [`ErrorKind::Closed`],
    /// [`ErrorKind::Connection`] as for [`Subscriber::subscribe`].
    pub async fn consume(&self, queue: &str, prefetch: u16) -> Result<Subscription> {
        self.shared.ensure_open()?;
        let spec = SubscriptionSpec {
            topic: Arc::from(queue),
            group: None,
            prefetch: prefetch.max(1),
            declared_queue: true,
            private_queue: None,
        };
        self.start_subscription(spec, None).await
    }

    /// Open the consumer of `spec`; with `history`, first fill its new queue from the journal.
    async fn start_subscription(
        &self,
        spec: SubscriptionSpec,
        history: Option<Option<std::time::SystemTime>>,
    ) -> Result<Subscription> {
        let link = self.shared.link()?;
        let fresh = match (&history, spec.group_queue()) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(_), Some(name)) => !journal::queue_exists(&self.shared, &link, &name).await?,
        };
        let (channel, consumer, queue) = open_consumer(&self.shared, &spec, &link).await?;
        if let (true, Some(since)) = (fresh, history)
            && let Err(err) =
                journal::copy_history(&self.shared, &link, &spec.topic, since, &queue).await
        {
            // Without its history the group must not exist, or the next attempt would find it
            // and skip the history for good.
            if spec.group.is_some() {
                let _ = channel
                    .queue_delete(queue.as_str().into(), Default::default())
                    .await;
            }
            return Err(err);
        }
        let (topic, group) = (spec.topic.clone(), spec.group.clone());
        let state = ConsumerStream {
            current: Some(Current::new(
                consumer.clone(),
                link,
                &self.shared.supervisor,
            )),
            context: Arc::new(ConsumerContext::new(
                &self.shared,
                &spec,
                queue,
                channel,
                consumer,
            )),
            spec,
            finished: false,
        };
        Ok(Subscription::new(
            topic,
            group,
            Box::pin(futures::stream::unfold(state, ConsumerStream::next)),
        ))
    }
}

#[async_trait]
impl Subscriber for RabbitBroker {
    async fn subscribe(&self, topic: &str, options: SubscribeOptions) -> Result<Subscription> {
        validate_name("topic", topic)?;
        if let Some(group) = &options.group {
            validate_name("group", group)?;
        }
        self.shared.ensure_open()?;
        let history = match options.start {
            StartPosition::Latest => None,
            StartPosition::Earliest => Some(None),
            StartPosition::Time(since) => Some(Some(since)),
        };
        if history.is_some() && !self.shared.config().replay_journal {
            return Err(Error::unsupported(
                NAME,
                "starting a group from history without the replay journal (RABBITMQ_REPLAY_JOURNAL=true): queues keep nothing from before they exist",
            ));
        }
        let prefetch = if options.prefetch == DEFAULT_PREFETCH {
            self.shared.config().prefetch_count
        } else {
            u16::try_from(options.prefetch).unwrap_or(u16::MAX)
        };
        let spec = SubscriptionSpec {
            topic: Arc::from(topic),
            group: options.group.as_deref().map(Arc::from),
            prefetch,
            declared_queue: false,
            private_queue: options
                .group
                .is_none()
                .then(|| format!("{topic}.private-{}", uuid::Uuid::new_v4().simple())),
        };
        self.start_subscription(spec, history).await
    }
}

#[async_trait]
impl Broker for RabbitBroker {
    fn name(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        self.shared.config().capabilities()
    }

    /// `waiting` is the group queue's ready count (a passive declare of `<topic>.<group>`);
    /// AMQP does not report unacknowledged counts, so `in_flight` is unknown, and a requeue
    /// waiting out its delay sits in the delay queue, not counted.
    async fn backlog(&self, topic: &str, group: &str) -> Result<Backlog> {
        validate_name("topic", topic)?;
        validate_name("group", group)?;
        self.shared.ensure_open()?;
        let link = self.shared.link()?;
        let queue = format!("{topic}.{group}");
        let probe = async {
            // Its own channel: a passive declare of a missing queue closes the channel.
            let channel = link
                .connection
                .create_channel()
                .await
                .map_err(|e| self.shared.connection_error(e, "opening a channel"))?;
            let declared = channel
                .queue_declare(
                    queue.as_str().into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await;
            let backlog = match declared {
                Ok(declared) => Backlog {
                    waiting: u64::from(declared.message_count()),
                    in_flight: None,
                },
                Err(e) => {
                    let err = from_lapin(e, format!("inspecting queue {queue:?}"));
                    if err.kind() != ErrorKind::NotFound {
                        return Err(err);
                    }
                    // The group never subscribed: nothing waits for it.
                    Backlog::default()
                }
            };
            if channel.status().connected() {
                let _ = channel.close(200, "backlog read".into()).await;
            }
            Ok(backlog)
        };
        within(
            self.shared.config().connect_timeout,
            format!("reading the backlog of {queue}"),
            probe,
        )
        .await?
    }

    async fn read_range(&self, topic: &str, range: TimeRange) -> Result<HistoryStream> {
        validate_name("topic", topic)?;
        self.shared.ensure_open()?;
        if !self.shared.config().replay_journal {
            return Err(Error::unsupported(
                NAME,
                "reading history without the replay journal (RABBITMQ_REPLAY_JOURNAL=true)",
            ));
        }
        let link = self.shared.link()?;
        journal::read_range(&self.shared, &link, topic, range).await
    }

    async fn health(&self) -> Health {
        let supervisor = &self.shared.supervisor;
        let address = supervisor.config().address();
        if supervisor.is_closed() {
            Health::unhealthy(format!("the rabbitmq broker ({address}) is closed"))
        } else if supervisor.usable().is_some() {
            Health::healthy(format!("connected to {address}"))
        } else if supervisor.gave_up() {
            Health::unhealthy(supervisor.unavailable().to_string())
        } else {
            Health {
                status: helix_messaging_core::HealthStatus::Degraded,
                detail: format!("{address}: connection lost, reconnecting"),
            }
        }
    }

    async fn close(&self) -> Result<()> {
        self.shared.supervisor.close().await
    }
}

/// A subscription's consumer, re-created on a new connection when the old one is lost. Its
/// channel belongs to the [`ConsumerContext`], which its deliveries share.
struct ConsumerStream {
    /// The consumer, while it has one.
    current: Option<Current>,
    context: Arc<ConsumerContext>,
    spec: SubscriptionSpec,
    /// Set once an unrecoverable failure has been reported: the stream then ends.
    finished: bool,
}

impl ConsumerStream {
    async fn next(mut self) -> Option<(Result<Delivery>, Self)> {
        let supervisor = self.context.shared.supervisor.clone();
        loop {
            if self.finished || supervisor.is_closed() {
                return None;
            }
            let Some(current) = self.current.as_mut() else {
                // Lost: wait for a new connection and rebuild on it.
                let Some(link) = supervisor.wait_usable().await else {
                    if supervisor.is_closed() {
                        return None;
                    }
                    self.finished = true;
                    return Some((Err(supervisor.unavailable()), self));
                };
                match open_consumer(&self.context.shared, &self.spec, &link).await {
                    Ok((channel, consumer, queue)) => {
                        tracing::info!(%queue, "consumer re-created on the new connection");
                        self.current = Some(Current::new(consumer.clone(), link, &supervisor));
                        self.context = Arc::new(ConsumerContext::new(
                            &self.context.shared,
                            &self.spec,
                            queue,
                            channel,
                            consumer,
                        ));
                    }
                    Err(err) if err.is_retryable() => {
                        tracing::warn!(error = %err, "re-creating the consumer failed; retrying");
                        tokio::time::sleep(supervisor.config().reconnect_delay).await;
                    }
                    Err(err) => {
                        self.finished = true;
                        return Some((Err(err), self));
                    }
                }
                continue;
            };
            let next = tokio::select! {
                next = current.consumer.next() => next,
                () = &mut current.link_lost => None,
            };
            match next {
                Some(Ok(delivery)) => {
                    if let Some((delivery, unseen)) = self.context.screen(delivery).await {
                        return Some((Ok(self.context.delivery(delivery, unseen)), self));
                    }
                }
                // After close, the channel's end shows up as an error or an end: that is the
                // end of the subscription, not something to report.
                _ if supervisor.is_closed() => return None,
                lost => {
                    let why = match lost {
                        Some(Err(err)) => err.to_string(),
                        _ => "consumer cancelled".to_owned(),
                    };
                    tracing::warn!(queue = %self.context.queue, why, "consumer lost; re-creating it");
                    self.release();
                    // Starts reconnecting if the connection itself is gone.
                    let _ = supervisor.usable();
                }
            }
        }
    }

    /// Give up the lost consumer and close its channel now: its deliveries are being
    /// returned to the queue anyway.
    fn release(&mut self) {
        self.current = None;
        self.context.channel.close(false);
    }
}

/// A live consumer and the watch on the link it was created on.
struct Current {
    consumer: lapin::Consumer,
    /// Resolves once the link is replaced or found unusable: a consumer does not always learn
    /// that its connection died. Made once per consumer rather than once per delivery.
    link_lost: futures::future::BoxFuture<'static, ()>,
}

impl Current {
    fn new(consumer: lapin::Consumer, link: Arc<Link>, supervisor: &Arc<Supervisor>) -> Self {
        let supervisor = supervisor.clone();
        let link_lost = Box::pin(async move {
            tokio::select! {
                () = supervisor.replaced(&link) => {}
                // The last resort: a periodic look at the link itself.
                () = async {
                    while link.usable() {
                        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    }
                } => {}
            }
        });
        Current {
            consumer,
            link_lost,
        }
    }
}

/// A consumer's channel. It stays open while the subscription or any of its unsettled
/// deliveries is alive, so a delivery can still be settled after its subscription was dropped
/// (`stream.take(n).for_each_concurrent(..)` drops the stream before the last acks); once
/// neither is left it is closed, and RabbitMQ returns whatever is still unacked. A private
/// subscription's queue is deleted then too.
struct ConsumerChannel {
    parts: std::sync::Mutex<Option<(Channel, lapin::Consumer)>>,
    private_queue: Option<String>,
    /// Where unseen returns are remembered: the broker and the consumer's queue.
    returns: (Arc<Shared>, String),
}

impl ConsumerChannel {
    fn new(
        channel: Channel,
        consumer: lapin::Consumer,
        private_queue: Option<String>,
        returns: (Arc<Shared>, String),
    ) -> Self {
        ConsumerChannel {
            parts: std::sync::Mutex::new(Some((channel, consumer))),
            private_queue,
            returns,
        }
    }

    /// Close the channel; with `finished`, the subscription is over and its private queue
    /// goes too (a lost consumer keeps it, for the consumer that replaces it).
    fn close(&self, finished: bool) {
        let parts = self
            .parts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some((channel, consumer)) = parts {
            let delete = self.private_queue.clone().filter(|_| finished);
            let returns = (finished && delete.is_none()).then(|| self.returns.clone());
            close_consumer(channel, consumer, delete, returns);
        }
    }
}

impl Drop for ConsumerChannel {
    fn drop(&mut self) {
        self.close(true);
    }
}

/// Close `channel` in the background, then drop `consumer`: dropped earlier, lapin would
/// cancel it concurrently with the close, and the failed cancel can surface as an error
/// elsewhere on the connection. Closing the channel returns its unacked deliveries. With
/// `delete`, that queue is deleted first. With `returns`, the consumer is cancelled first and
/// what it had prefetched but not handed out is remembered as unseen (see [`Shared::unseen`]),
/// so those returns keep their place in the queue and are not counted as attempts.
fn close_consumer(
    channel: Channel,
    mut consumer: lapin::Consumer,
    delete: Option<String>,
    returns: Option<(Arc<Shared>, String)>,
) {
    if !channel.status().connected() {
        return;
    }
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(async move {
            if let Some((shared, queue)) = returns
                && channel
                    .basic_cancel(consumer.tag(), BasicCancelOptions::default())
                    .await
                    .is_ok()
            {
                // After cancel-ok nothing more arrives: what the consumer still yields was
                // prefetched and never handed out.
                while let Ok(Some(Ok(delivery))) =
                    tokio::time::timeout(std::time::Duration::from_millis(500), consumer.next())
                        .await
                {
                    if let Some(id) = wire::message_id(&delivery.properties) {
                        shared.note_unseen(&queue, id, wire::uncounted_redelivery(&delivery));
                    }
                }
            }
            if let Some(queue) = delete
                && let Err(err) = channel
                    .queue_delete(queue.as_str().into(), Default::default())
                    .await
            {
                tracing::debug!(%queue, error = %err, "deleting a private queue");
            }
            if let Err(err) = channel.close(200, "consumer dropped".into()).await {
                tracing::debug!(error = %err, "closing a consumer channel");
            }
            drop(consumer);
        });
    }
}

/// What every delivery of one subscription shares.
struct ConsumerContext {
    shared: Arc<Shared>,
    topic: Arc<str>,
    group: Option<Arc<str>>,
    queue: String,
    channel: ConsumerChannel,
}

impl ConsumerContext {
    fn new(
        shared: &Arc<Shared>,
        spec: &SubscriptionSpec,
        queue: String,
        channel: Channel,
        consumer: lapin::Consumer,
    ) -> Self {
        ConsumerContext {
            shared: shared.clone(),
            topic: spec.topic.clone(),
            group: spec.group.clone(),
            channel: ConsumerChannel::new(
                channel,
                consumer,
                spec.private_queue.clone(),
                (shared.clone(), queue.clone()),
            ),
            queue,
        }
    }

    /// What must happen to a delivery before the application sees it: `None` when it was
    /// dealt with here.
    ///
    /// - Its TTL has passed: acked and dropped (never dead-lettered).
    /// - A native redelivery the queue does not count (a classic queue after a consumer
    ///   crashed or its channel closed): a copy with the attempt that was lost counted is
    ///   published to the queue and the original acked, so a crash loop climbs 1, 2, 3, …
    ///   and reaches a retry limit. If the copy fails, the delivery is handed out with its
    ///   estimated attempt instead.
    /// - A return of one this broker's subscriptions had prefetched and never handed out:
    ///   delivered in its place, its redelivered flag no attempt (`Some((delivery, true))`).
    async fn screen(
        &self,
        delivery: lapin::message::Delivery,
    ) -> Option<(lapin::message::Delivery, bool)> {
        let queue = &self.queue;
        if wire::expired(&delivery.properties, std::time::SystemTime::now()) {
            if let Err(err) = settle_delivery(self, &delivery.acker, AckAction::Ack).await {
                tracing::warn!(queue, error = %err, "dropping an expired message failed");
            }
            return None;
        }
        if !wire::uncounted_redelivery(&delivery) {
            return Some((delivery, false));
        }
        // Returned unseen by a subscription of this broker: not an attempt, and it keeps its
        // place in the queue; unless it was a return not counted yet when that subscription
        // prefetched it (a crashed consumer's), which is counted now as it would have been
        // there.
        if let Some(id) = wire::message_id(&delivery.properties)
            && self.shared.take_unseen(queue, &id) == Some(false)
        {
            return Some((delivery, true));
        }
        let counted = wire::attempts_in_header(&delivery.properties) + 1;
        let properties = wire::with_attempts(&delivery.properties, counted);
        let copied = self
            .shared
            .copy_to_queue(queue, &delivery.data, properties)
            .await;
        match copied {
            Ok(()) => {
                // If this fails the broker returns the original as well: a duplicate, never
                // a loss.
                if let Err(err) = settle_delivery(self, &delivery.acker, AckAction::Ack).await {
                    tracing::warn!(queue, error = %err, "acking a re-counted redelivery failed");
                }
                None
            }
            Err(err) => {
                tracing::warn!(queue, error = %err, "re-counting a redelivery failed; delivering it with an estimated attempt");
                Some((delivery, false))
            }
        }
    }

    /// The delivery the application gets; `unseen` as from [`ConsumerContext::screen`].
    fn delivery(
        self: &Arc<Self>,
        mut delivery: lapin::message::Delivery,
        unseen: bool,
    ) -> Delivery {
        let mut received = wire::received(&mut delivery);
        if unseen {
            received.attempt = received.attempt.saturating_sub(1).max(1);
        }
        let message = Arc::new(received.message);
        Delivery::new(
            message.clone(),
            helix_messaging_core::DeliveryInfo {
                topic: self.topic.clone(),
                group: self.group.clone(),
                attempt: received.attempt,
                redelivered: received.attempt > 1,
                position: Some(helix_messaging_core::Position::DeliveryTag(
                    delivery.delivery_tag,
                )),
            },
            Box::new(RabbitAcker {
                acker: delivery.acker,
                context: self.clone(),
                message,
                attempt: received.attempt,
            }),
        )
    }
}

struct RabbitAcker {
    acker: lapin::Acker,
    context: Arc<ConsumerContext>,
    message: Arc<Message>,
    attempt: u32,
}

/// The retry-queue TTL a delay is rounded up to, in milliseconds: steps of at most a
/// third (10, 12, 15, 20, 25, 30, 40, 50, 60, 80 times a power of ten, at least 10 ms), so a
/// group needs few retry queues however its delays are jittered.
fn delay_step(delay: Duration) -> u32 {
    const STEPS: [u64; 10] = [10, 12, 15, 20, 25, 30, 40, 50, 60, 80];
    let wanted = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
    let mut scale = 1u64;
    while scale <= u64::from(u32::MAX) {
        if let Some(step) = STEPS.iter().map(|s| s * scale).find(|s| *s >= wanted) {
            return u32::try_from(step).unwrap_or(u32::MAX);
        }
        scale *= 10;
    }
    u32::MAX
}

#[async_trait]
impl Acknowledge for RabbitAcker {
    fn delays_requeue(&self) -> bool {
        true
    }

    async fn settle(self: Box<Self>, outcome: Settlement) -> Result<()> {
        let queue = &self.context.queue;
        let action = match outcome {
            Settlement::Ack => AckAction::Ack,
            Settlement::Reject => AckAction::Reject,
            Settlement::RequeueAfter(delay) => {
                // As a requeue, but through the retry queue: the broker holds the copy for
                // the delay, then dead-letters it back to this group's queue alone. If the
                // copy fails the delivery is requeued at once: a retry that comes early,
                // never one that is lost.
                let properties = wire::properties(&self.message, Some(self.attempt));
                let copied = self
                    .context
                    .shared
                    .delay_to_queue(queue, self.message.payload(), properties, delay)
                    .await;
                match copied {
                    Ok(()) => AckAction::Ack,
                    Err(err) => {
                        tracing::warn!(queue, error = %err, "delayed requeue copy failed; requeueing natively");
                        AckAction::Requeue
                    }
                }
            }
            Settlement::Requeue => {
                // A copy carrying the attempt count, then the original acked: classic queues
                // keep no delivery count, so this is how the next attempt knows its number.
                // The copy is bounded by the publish timeout on its own, so the original is
                // always settled one way or the other afterwards.
                let properties = wire::properties(&self.message, Some(self.attempt));
                let copied = self
                    .context
                    .shared
                    .copy_to_queue(queue, self.message.payload(), properties)
                    .await;
                match copied {
                    Ok(()) => AckAction::Ack,
                    Err(err) => {
                        tracing::warn!(queue, error = %err, "requeue copy failed; requeueing natively");
                        AckAction::Requeue
                    }
                }
            }
        };
        settle_delivery(&self.context, &self.acker, action).await
    }
}

/// What a settlement is doing, for its errors: "settling (Ack) a delivery from <queue>".
struct Settling<'a> {
    action: AckAction,
    queue: &'a str,
}

impl std::fmt::Display for Settling<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "settling ({:?}) a delivery from {}",
            self.action, self.queue
        )
    }
}

/// What to tell the broker about one delivery.
#[derive(Debug, Clone, Copy)]
enum AckAction {
    Ack,
    Reject,
    /// Back to the queue natively (the redelivered flag is set).
    Requeue,
}

/// Settle one delivery on its channel. A settlement lapin refuses because the channel is
/// closed (the broker then returns the delivery to its queue) is an error, never `Ok`; one
/// on a channel whose connection just died may never be answered, so it is bounded by the
/// publish timeout.
async fn settle_delivery(
    context: &ConsumerContext,
    acker: &lapin::Acker,
    action: AckAction,
) -> Result<()> {
    let queue = &context.queue;
    // After close nothing is sent: an ack written to a connection being torn down can wait
    // for the whole timeout (seen once under load) instead of failing.
    if context.shared.supervisor.is_closed() {
        return Err(Error::closed("the rabbitmq broker"));
    }
    // Written out only for an error: a settlement is made for every delivery.
    let doing = Settling { action, queue };
    let settle = async {
        match action {
            AckAction::Ack => acker.ack(BasicAckOptions::default()).await,
            AckAction::Reject => acker.reject(BasicRejectOptions { requeue: false }).await,
            AckAction::Requeue => {
                acker
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..BasicNackOptions::default()
                    })
                    .await
            }
        }
    };
    let done = within(context.shared.config().publish_timeout, &doing, settle)
        .await?
        .map_err(|e| from_lapin(e, &doing))?;
    if done {
        return Ok(());
    }
    let supervisor = &context.shared.supervisor;
    if supervisor.is_closed() {
        return Err(Error::closed("the rabbitmq broker"));
    }
    Err(Error::new(
        ErrorKind::Connection,
        format!(
            "{doing}: its channel is closed, so nothing was settled; the broker returns the message to {queue}"
        ),
    )
    .with_retryable(false))
}
