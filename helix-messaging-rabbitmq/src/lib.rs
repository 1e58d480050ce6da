//! RabbitMQ backend for helix-messaging, on lapin.
//!
//! Topology: every topic is a routing key on one durable topic exchange
//! ([`RabbitConfig::exchange`], `helixagent` by default). A consumer group is a durable queue
//! named `<topic>.<group>` bound to that routing key, so members of a group share its
//! messages and every group gets every message. A subscription without a group gets a
//! server-named exclusive queue that goes away with it. Group queues are classic queues with
//! `x-max-priority`, so a backlog is delivered by priority; a message TTL becomes the AMQP
//! `expiration`.
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
//! back natively with the redelivered flag.
//!
//! Headers starting with `x-helix-` are reserved for this mapping.

mod config;
mod error;
mod wire;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use futures::StreamExt;
use helix_messaging_core::{
    Acknowledge, BatchReport, Broker, Capabilities, DEFAULT_PREFETCH, Delivery, Error, ErrorKind,
    Health, Message, Publisher, Result, Settlement, StartPosition, SubscribeOptions, Subscriber,
    Subscription, check_payload_size, validate_name,
};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    BasicRejectOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind};

pub use config::{DEFAULT_MAX_PAYLOAD_BYTES, RabbitConfig};

use error::from_lapin;

/// Backend name reported by [`Broker::name`] and selected by `MESSAGING_BACKEND=rabbitmq`.
pub const NAME: &str = "rabbitmq";

/// What the RabbitMQ backend promises.
pub const CAPABILITIES: Capabilities = Capabilities {
    durable: true,
    redelivery: true,
    consumer_groups: true,
    per_key_ordering: true,
    priority: true,
    ttl: true,
    redeliver_unacked: true,
    replay_by_time: false,
    native_dlq: false,
    max_payload_bytes: Some(DEFAULT_MAX_PAYLOAD_BYTES),
};

struct Shared {
    config: RabbitConfig,
    connection: Connection,
    /// Publishing channel, in confirm mode when [`RabbitConfig::publisher_confirm`] is set.
    publisher: Channel,
    closed: AtomicBool,
}

impl Shared {
    fn ensure_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            Err(Error::closed("the rabbitmq broker"))
        } else {
            Ok(())
        }
    }

    /// Start publishing `message`; the returned future resolves with the broker's verdict.
    async fn start_publish(
        &self,
        exchange: &str,
        routing_key: &str,
        message: &Message,
        attempts_so_far: Option<u32>,
    ) -> Result<lapin::PublisherConfirm> {
        check_payload_size(NAME, message, self.config.max_payload_bytes)?;
        self.publisher
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                message.payload(),
                wire::properties(message, attempts_so_far),
            )
            .await
            .map_err(|e| from_lapin(e, format!("publishing to {routing_key}")))
    }

    /// The broker's verdict on one publish.
    async fn confirmed(&self, routing_key: &str, confirm: lapin::PublisherConfirm) -> Result<()> {
        let confirmation = confirm.await.map_err(|e| {
            from_lapin(
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
                    self.config.exchange, returned.reply_code, returned.reply_text
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

/// A connection to RabbitMQ. Cheap to clone.
#[derive(Clone)]
pub struct RabbitBroker {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for RabbitBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitBroker")
            .field("config", &self.shared.config)
            .field("closed", &self.shared.closed.load(Ordering::Relaxed))
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
        let address = config.address();
        let connection = tokio::time::timeout(
            config.connect_timeout,
            Connection::connect_uri(config.uri(), ConnectionProperties::default()),
        )
        .await
        .map_err(|_| {
            Error::new(
                ErrorKind::Timeout,
                format!(
                    "connecting to {address} took longer than {:?}",
                    config.connect_timeout
                ),
            )
        })?
        .map_err(|e| from_lapin(e, format!("connecting to {address}")))?;
        let publisher = connection
            .create_channel()
            .await
            .map_err(|e| from_lapin(e, "opening the publishing channel"))?;
        if config.publisher_confirm {
            publisher
                .confirm_select(ConfirmSelectOptions::default())
                .await
                .map_err(|e| from_lapin(e, "enabling publisher confirms"))?;
        }
        publisher
            .exchange_declare(
                config.exchange.as_str().into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| from_lapin(e, format!("declaring exchange {:?}", config.exchange)))?;
        Ok(RabbitBroker {
            shared: Arc::new(Shared {
                config,
                connection,
                publisher,
                closed: AtomicBool::new(false),
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
        &self.shared.config
    }
}

#[async_trait]
impl Publisher for RabbitBroker {
    async fn publish(&self, topic: &str, message: Message) -> Result<()> {
        validate_name("topic", topic)?;
        self.shared.ensure_open()?;
        let confirm = self
            .shared
            .start_publish(&self.shared.config.exchange, topic, &message, None)
            .await?;
        self.shared.confirmed(topic, confirm).await
    }

    async fn publish_batch(&self, topic: &str, messages: Vec<Message>) -> BatchReport {
        let total = messages.len();
        if let Err(err) = validate_name("topic", topic).and_then(|()| self.shared.ensure_open()) {
            return BatchReport::all_failed(total, &err);
        }
        // Every publish goes out before any confirm is awaited: one window of confirms in
        // flight instead of a round trip per message.
        let mut failures = Vec::new();
        let mut pending = Vec::with_capacity(total);
        for (index, message) in messages.iter().enumerate() {
            match self
                .shared
                .start_publish(&self.shared.config.exchange, topic, message, None)
                .await
            {
                Ok(confirm) => pending.push((index, confirm)),
                Err(err) => failures.push((index, err)),
            }
        }
        let verdicts =
            futures::future::join_all(pending.into_iter().map(|(index, confirm)| async move {
                (index, self.shared.confirmed(topic, confirm).await)
            }))
            .await;
        failures.extend(
            verdicts
                .into_iter()
                .filter_map(|(i, r)| r.err().map(|e| (i, e))),
        );
        BatchReport::new(total, failures)
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
        if options.start != StartPosition::Latest {
            return Err(Error::unsupported(
                NAME,
                "starting a group from history (queues keep no history before they exist)",
            ));
        }
        let config = &self.shared.config;
        let channel = self
            .shared
            .connection
            .create_channel()
            .await
            .map_err(|e| from_lapin(e, "opening a consumer channel"))?;
        let prefetch = if options.prefetch == DEFAULT_PREFETCH {
            config.prefetch_count
        } else {
            u16::try_from(options.prefetch).unwrap_or(u16::MAX)
        };
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await
            .map_err(|e| from_lapin(e, "setting the prefetch"))?;

        let private = options.group.is_none();
        let mut arguments = FieldTable::default();
        arguments.insert(
            "x-max-priority".into(),
            AMQPValue::ShortShortUInt(config.max_priority),
        );
        if let (false, Some(expires)) = (private, config.group_queue_expires) {
            arguments.insert(
                "x-expires".into(),
                AMQPValue::LongUInt(u32::try_from(expires.as_millis()).unwrap_or(u32::MAX)),
            );
        }
        let queue_name = match &options.group {
            Some(group) => format!("{topic}.{group}"),
            None => String::new(),
        };
        let queue = channel
            .queue_declare(
                queue_name.as_str().into(),
                QueueDeclareOptions {
                    durable: !private,
                    exclusive: private,
                    auto_delete: private,
                    ..QueueDeclareOptions::default()
                },
                arguments,
            )
            .await
            .map_err(|e| from_lapin(e, format!("declaring queue {queue_name:?}")))?;
        let queue_name = queue.name().as_str().to_owned();
        // Bound before returning, so every later publish to the topic reaches the queue.
        channel
            .queue_bind(
                queue_name.as_str().into(),
                config.exchange.as_str().into(),
                topic.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| from_lapin(e, format!("binding {queue_name} to {topic}")))?;
        let consumer = channel
            .basic_consume(
                queue_name.as_str().into(),
                format!("helix-{}", uuid::Uuid::new_v4().simple()).into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| from_lapin(e, format!("consuming from {queue_name}")))?;

        let topic: Arc<str> = Arc::from(topic);
        let group: Option<Arc<str>> = options.group.as_deref().map(Arc::from);
        let state = ConsumerStream {
            consumer: Some(consumer),
            channel,
            context: Arc::new(ConsumerContext {
                shared: self.shared.clone(),
                topic: topic.clone(),
                group: group.clone(),
                queue: queue_name,
            }),
        };
        let deliveries = futures::stream::unfold(state, |mut state| async move {
            let next = state.consumer.as_mut()?.next().await?;
            let item = match next {
                Ok(delivery) => Ok(state.context.delivery(delivery)),
                // After close, the channel's end shows up as an error: that is the end of
                // the subscription, not something to report.
                Err(_) if state.context.shared.closed.load(Ordering::Acquire) => return None,
                Err(err) => Err(from_lapin(
                    err,
                    format!("consuming from {}", state.context.queue),
                )),
            };
            Some((item, state))
        });
        Ok(Subscription::new(topic, group, Box::pin(deliveries)))
    }
}

#[async_trait]
impl Broker for RabbitBroker {
    fn name(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            durable: self.shared.config.publisher_confirm,
            max_payload_bytes: Some(self.shared.config.max_payload_bytes),
            ..CAPABILITIES
        }
    }

    async fn health(&self) -> Health {
        let address = self.shared.config.address();
        if self.shared.closed.load(Ordering::Acquire) {
            return Health::unhealthy(format!("the rabbitmq broker ({address}) is closed"));
        }
        let status = self.shared.connection.status();
        if status.connected() {
            Health::healthy(format!("connected to {address}"))
        } else {
            Health::unhealthy(format!("{address}: not connected"))
        }
    }

    async fn close(&self) -> Result<()> {
        if self.shared.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        match self
            .shared
            .connection
            .close(200, "closed by the application".into())
            .await
        {
            Ok(()) => Ok(()),
            // Already gone is as closed as it gets.
            Err(err) if !self.shared.connection.status().connected() => {
                tracing::debug!(error = %err, "connection was already closed");
                Ok(())
            }
            Err(err) => Err(from_lapin(err, "closing the connection")),
        }
    }
}

/// A subscription's consumer and channel. Dropping it closes the channel, which makes
/// RabbitMQ return the unacked deliveries to the queue. The consumer is kept until the close
/// has completed: dropped earlier, lapin would cancel it concurrently with the close, and the
/// failed cancel can surface as an error elsewhere on the connection.
struct ConsumerStream {
    consumer: Option<lapin::Consumer>,
    channel: Channel,
    context: Arc<ConsumerContext>,
}

impl Drop for ConsumerStream {
    fn drop(&mut self) {
        let consumer = self.consumer.take();
        let channel = self.channel.clone();
        if !channel.status().connected() {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(err) = channel.close(200, "subscription dropped".into()).await {
                    tracing::debug!(error = %err, "closing a consumer channel");
                }
                drop(consumer);
            });
        }
    }
}

/// What every delivery of one subscription shares.
struct ConsumerContext {
    shared: Arc<Shared>,
    topic: Arc<str>,
    group: Option<Arc<str>>,
    queue: String,
}

impl ConsumerContext {
    fn delivery(self: &Arc<Self>, delivery: lapin::message::Delivery) -> Delivery {
        let received = wire::received(&delivery);
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

#[async_trait]
impl Acknowledge for RabbitAcker {
    async fn settle(self: Box<Self>, outcome: Settlement) -> Result<()> {
        let queue = &self.context.queue;
        let settled = match outcome {
            Settlement::Ack => self.acker.ack(BasicAckOptions::default()).await,
            Settlement::Reject => {
                self.acker
                    .reject(BasicRejectOptions { requeue: false })
                    .await
            }
            Settlement::Requeue => {
                // A copy carrying the attempt count, then the original acked: classic queues
                // keep no delivery count, so this is how the next attempt knows its number.
                let shared = &self.context.shared;
                let copied = match shared
                    .start_publish("", queue, &self.message, Some(self.attempt))
                    .await
                {
                    Ok(confirm) => shared.confirmed(queue, confirm).await,
                    Err(err) => Err(err),
                };
                match copied {
                    Ok(()) => self.acker.ack(BasicAckOptions::default()).await,
                    Err(err) => {
                        tracing::warn!(queue, error = %err, "requeue copy failed; requeueing natively");
                        self.acker
                            .nack(BasicNackOptions {
                                requeue: true,
                                ..BasicNackOptions::default()
                            })
                            .await
                    }
                }
            }
        };
        settled
            .map(|_| ())
            .map_err(|e| from_lapin(e, format!("settling a delivery from {queue}")))
    }
}
