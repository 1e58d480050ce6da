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

mod acker;
mod config;
mod consumer;
mod error;
mod journal;
mod link;
mod publish;
mod shared;
mod topology;
mod wire;

use std::sync::Arc;

use async_trait::async_trait;
use futures::StreamExt;
use helix_messaging_core::{
    Backlog, BatchReport, Broker, Capabilities, DEFAULT_PREFETCH, Error, ErrorKind, GroupAddress,
    Health, HistoryStream, Message, Publisher, Result, StartPosition, SubscribeOptions, Subscriber,
    Subscription, TimeRange, validate_name, within,
};
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;

pub use config::{CAPABILITIES, DEFAULT_MAX_PAYLOAD_BYTES, NAME, RabbitConfig};
pub use topology::{
    Binding, Exchange, ExchangeType, HELIXAGENT_DLQ, HELIXAGENT_EVENTS, HELIXAGENT_NOTIFICATIONS,
    HELIXAGENT_RETRY, HELIXAGENT_TASKS, Queue, QueueType, Topology,
};

use consumer::{ConsumerStream, SubscriptionSpec, open_consumer};
use error::from_lapin;
use link::{Link, Supervisor};
use shared::Shared;

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
        let first = Link::open(&config, &[], 0).await?;
        Ok(RabbitBroker {
            shared: Arc::new(Shared::new(Supervisor::new(config, first))),
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
        // through a deadline (`by_publish_deadline`): its async fn holds the publish's future
        // (lapin's is large) in a state of its own, one more copy of it per publish (callgrind).
        let shared = &self.shared;
        tokio::time::timeout(shared.config().publish_timeout, async {
            let confirm = shared
                .start_publish(&shared.config().exchange, topic, &message, None)
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
                    .within_publish_timeout(
                        topic,
                        shared.start_publish(&shared.config().exchange, topic, &message, None),
                    )
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

    /// Publish `message` to `exchange` with `routing_key` (for example a task to HelixAgent's
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
            .within_publish_timeout(
                routing_key,
                self.shared
                    .start_publish(exchange, routing_key, &message, None),
            )
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
        let state = ConsumerStream::new(&self.shared, spec, link, queue, channel, consumer);
        // The acker makes each screened delivery the application's.
        let deliveries = futures::stream::unfold(state, ConsumerStream::next).map(|screened| {
            screened.map(|(context, delivery, unseen)| context.delivery(delivery, unseen))
        });
        Ok(Subscription::new(topic, group, Box::pin(deliveries)))
    }
}

impl RabbitBroker {
    /// A channel of its own on `link`, for a declaration that may close it.
    async fn own_channel(&self, link: &Link) -> Result<lapin::Channel> {
        link.connection
            .create_channel()
            .await
            .map_err(|e| self.shared.connection_error(e, "opening a channel"))
    }
}

/// Close a channel opened for one declaration, unless the broker already has; a failure to
/// close changes nothing the declaration did.
async fn close_quietly(channel: &lapin::Channel, reason: &str) {
    if channel.status().connected() {
        let _ = channel.close(200, reason.into()).await;
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
            let channel = self.own_channel(&link).await?;
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
            close_quietly(&channel, "backlog read").await;
            Ok(backlog)
        };
        within(
            self.shared.config().connect_timeout,
            format!("reading the backlog of {queue}"),
            probe,
        )
        .await?
    }

    /// The group's queue, `<topic>.<group>`, bound to the exchange with the topic as its
    /// routing key.
    fn group_address(&self, topic: &str, group: &str) -> GroupAddress {
        GroupAddress {
            kind: "queue",
            name: format!("{topic}.{group}"),
            source: Some(format!(
                "exchange {}, routing key {topic}",
                self.shared.config().exchange
            )),
        }
    }

    /// Declares the group's queue `<topic>.<group>` and binds it, as a subscription would,
    /// without consuming from it.
    async fn create_group(&self, topic: &str, group: &str) -> Result<()> {
        validate_name("topic", topic)?;
        validate_name("group", group)?;
        self.shared.ensure_open()?;
        let link = self.shared.link()?;
        let spec = SubscriptionSpec {
            topic: Arc::from(topic),
            group: Some(Arc::from(group)),
            prefetch: 1,
            declared_queue: false,
            private_queue: None,
        };
        let declare = async {
            let channel = self.own_channel(&link).await?;
            let declared = consumer::declare_group_queue(&self.shared, &spec, &channel).await;
            close_quietly(&channel, "group declared").await;
            declared.map(drop)
        };
        within(
            self.shared.config().connect_timeout,
            format!("declaring the queue of group {group} on {topic}"),
            declare,
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
