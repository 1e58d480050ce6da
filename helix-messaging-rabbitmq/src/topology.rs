//! Declarative topology: exchanges, queues and bindings, declared together and declared again
//! on every new connection, plus HelixAgent's topology as a ready preset.

use std::time::Duration;

use helix_messaging_core::{Error, Result};
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, Connection};

use crate::error::from_lapin;

/// How an exchange routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExchangeType {
    /// To the queues whose binding key equals the routing key.
    Direct,
    /// To the queues whose binding pattern (`*` one word, `#` any words) matches the routing
    /// key.
    Topic,
    /// To every bound queue, whatever the routing key.
    Fanout,
    /// By message headers instead of the routing key.
    Headers,
}

impl From<ExchangeType> for lapin::ExchangeKind {
    fn from(kind: ExchangeType) -> Self {
        match kind {
            ExchangeType::Direct => lapin::ExchangeKind::Direct,
            ExchangeType::Topic => lapin::ExchangeKind::Topic,
            ExchangeType::Fanout => lapin::ExchangeKind::Fanout,
            ExchangeType::Headers => lapin::ExchangeKind::Headers,
        }
    }
}

/// An exchange to declare.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exchange {
    /// Its name.
    pub name: String,
    /// How it routes.
    pub kind: ExchangeType,
    /// Survives a broker restart (default true).
    pub durable: bool,
}

impl Exchange {
    /// A durable exchange named `name` routing as `kind`.
    pub fn new(name: impl Into<String>, kind: ExchangeType) -> Self {
        Exchange {
            name: name.into(),
            kind,
            durable: true,
        }
    }
}

/// The kind of queue (`x-queue-type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QueueType {
    /// A classic queue: the only kind with priorities on RabbitMQ 3.10.
    #[default]
    Classic,
    /// A replicated quorum queue (keeps a delivery count, no priorities before 3.12).
    Quorum,
    /// An append-only stream: messages stay after consumption, readable from any offset.
    Stream,
}

/// A queue to declare, with the arguments RabbitMQ takes at declaration time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queue {
    /// Its name.
    pub name: String,
    /// Survives a broker restart (default true; streams are always durable).
    pub durable: bool,
    /// Classic, quorum or stream.
    pub queue_type: QueueType,
    /// `x-max-priority`: deliver a backlog highest priority first (classic queues only).
    pub max_priority: Option<u8>,
    /// `x-message-ttl`: messages older than this are discarded (or dead-lettered).
    pub message_ttl: Option<Duration>,
    /// `x-max-length`: at most this many messages; the oldest are dropped (or dead-lettered)
    /// beyond it.
    pub max_length: Option<u32>,
    /// `x-dead-letter-exchange`: where rejected, expired and overflowing messages go (`""` is
    /// the default exchange, which routes by queue name).
    pub dead_letter_exchange: Option<String>,
    /// `x-dead-letter-routing-key`: the routing key they are dead-lettered with (their own
    /// when unset).
    pub dead_letter_routing_key: Option<String>,
    /// `x-max-age` of a stream: segments older than this are removed.
    pub max_age: Option<Duration>,
    /// `x-stream-max-segment-size-bytes`: retention works segment by segment, so smaller
    /// segments make [`Queue::max_age`] take effect sooner.
    pub max_segment_bytes: Option<u64>,
}

impl Queue {
    /// A durable classic queue named `name` with no arguments.
    pub fn classic(name: impl Into<String>) -> Self {
        Queue {
            name: name.into(),
            durable: true,
            queue_type: QueueType::Classic,
            max_priority: None,
            message_ttl: None,
            max_length: None,
            dead_letter_exchange: None,
            dead_letter_routing_key: None,
            max_age: None,
            max_segment_bytes: None,
        }
    }

    /// A durable quorum queue named `name` with no arguments (replicated over the cluster's
    /// nodes; no priority on RabbitMQ 3.10).
    pub fn quorum(name: impl Into<String>) -> Self {
        Queue {
            queue_type: QueueType::Quorum,
            ..Queue::classic(name)
        }
    }

    /// A durable stream named `name` keeping messages for `max_age`.
    pub fn stream(name: impl Into<String>, max_age: Duration) -> Self {
        Queue {
            queue_type: QueueType::Stream,
            max_age: Some(max_age),
            ..Queue::classic(name)
        }
    }

    /// Set `x-max-priority`.
    #[must_use]
    pub fn max_priority(mut self, max: u8) -> Self {
        self.max_priority = Some(max);
        self
    }

    /// Set `x-message-ttl`.
    #[must_use]
    pub fn message_ttl(mut self, ttl: Duration) -> Self {
        self.message_ttl = Some(ttl);
        self
    }

    /// Set `x-max-length`.
    #[must_use]
    pub fn max_length(mut self, max: u32) -> Self {
        self.max_length = Some(max);
        self
    }

    /// Dead-letter to the queue named `queue` (through the default exchange).
    #[must_use]
    pub fn dead_letter_to_queue(self, queue: impl Into<String>) -> Self {
        self.dead_letter_to("", queue)
    }

    /// Dead-letter to `exchange` with `routing_key`.
    #[must_use]
    pub fn dead_letter_to(
        mut self,
        exchange: impl Into<String>,
        routing_key: impl Into<String>,
    ) -> Self {
        self.dead_letter_exchange = Some(exchange.into());
        self.dead_letter_routing_key = Some(routing_key.into());
        self
    }

    /// Set the stream segment size.
    #[must_use]
    pub fn max_segment_bytes(mut self, bytes: u64) -> Self {
        self.max_segment_bytes = Some(bytes);
        self
    }

    fn validate(&self) -> Result<()> {
        let field = |what: &str| format!("queue {:?}: {what}", self.name);
        if self.name.is_empty() {
            return Err(Error::invalid_input("a declared queue needs a name"));
        }
        if self.max_priority.is_some() && self.queue_type != QueueType::Classic {
            return Err(Error::invalid_input(field(
                "x-max-priority needs a classic queue (RabbitMQ 3.10 has no priorities on quorum queues or streams)",
            )));
        }
        if self.max_priority.is_some_and(|p| p == 0) {
            return Err(Error::invalid_input(field(
                "x-max-priority must be 1 to 255",
            )));
        }
        if self.queue_type == QueueType::Stream && !self.durable {
            return Err(Error::invalid_input(field("streams are always durable")));
        }
        if self.queue_type != QueueType::Stream
            && (self.max_age.is_some() || self.max_segment_bytes.is_some())
        {
            return Err(Error::invalid_input(field(
                "x-max-age and segment sizes apply to streams only",
            )));
        }
        if self.queue_type == QueueType::Stream
            && (self.dead_letter_exchange.is_some() || self.message_ttl.is_some())
        {
            return Err(Error::invalid_input(field(
                "streams neither dead-letter nor expire single messages (use max_age)",
            )));
        }
        Ok(())
    }

    /// The declaration arguments.
    pub(crate) fn arguments(&self) -> FieldTable {
        let mut args = FieldTable::default();
        let text = |s: &str| AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()));
        let millis =
            |d: Duration| AMQPValue::LongLongInt(i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        let queue_type = match self.queue_type {
            QueueType::Classic => None,
            QueueType::Quorum => Some("quorum"),
            QueueType::Stream => Some("stream"),
        };
        if let Some(queue_type) = queue_type {
            args.insert("x-queue-type".into(), text(queue_type));
        }
        if let Some(max) = self.max_priority {
            args.insert("x-max-priority".into(), AMQPValue::ShortShortUInt(max));
        }
        if let Some(ttl) = self.message_ttl {
            args.insert("x-message-ttl".into(), millis(ttl));
        }
        if let Some(max) = self.max_length {
            args.insert(
                "x-max-length".into(),
                AMQPValue::LongLongInt(i64::from(max)),
            );
        }
        if let Some(exchange) = &self.dead_letter_exchange {
            args.insert("x-dead-letter-exchange".into(), text(exchange));
        }
        if let Some(key) = &self.dead_letter_routing_key {
            args.insert("x-dead-letter-routing-key".into(), text(key));
        }
        if let Some(age) = self.max_age {
            // Streams take the age as text with a unit; seconds are exact for any Duration
            // that matters here.
            args.insert(
                "x-max-age".into(),
                text(&format!("{}s", age.as_secs().max(1))),
            );
        }
        if let Some(bytes) = self.max_segment_bytes {
            args.insert(
                "x-stream-max-segment-size-bytes".into(),
                AMQPValue::LongLongInt(i64::try_from(bytes).unwrap_or(i64::MAX)),
            );
        }
        args
    }
}

/// A binding of a queue to an exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    /// The queue receiving.
    pub queue: String,
    /// The exchange routing to it.
    pub exchange: String,
    /// The binding key (a pattern on topic exchanges, ignored by fanout exchanges).
    pub routing_key: String,
}

/// Exchanges, queues and bindings, declared in that order by
/// [`RabbitBroker::declare`](crate::RabbitBroker::declare) and declared again on every new
/// connection.
///
/// ```
/// use std::time::Duration;
/// use helix_messaging_rabbitmq::{ExchangeType, Queue, Topology};
///
/// let topology = Topology::new()
///     .exchange("orders", ExchangeType::Direct)
///     .queue(Queue::classic("orders.created").max_priority(10).dead_letter_to_queue("orders.dlq"))
///     .queue(Queue::classic("orders.dlq").message_ttl(Duration::from_secs(86_400)))
///     .bind("orders.created", "orders", "created");
/// assert_eq!(topology.queues().len(), 2);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Topology {
    exchanges: Vec<Exchange>,
    queues: Vec<Queue>,
    bindings: Vec<Binding>,
}

/// Name of HelixAgent's dead-letter queue.
pub const HELIXAGENT_DLQ: &str = "helixagent.dlq";
/// Name of HelixAgent's retry queue.
pub const HELIXAGENT_RETRY: &str = "helixagent.retry";
/// HelixAgent's direct exchange routing tasks by type.
pub const HELIXAGENT_TASKS: &str = "helixagent.tasks";
/// HelixAgent's topic exchange for events.
pub const HELIXAGENT_EVENTS: &str = "helixagent.events";
/// HelixAgent's fanout exchange for notifications.
pub const HELIXAGENT_NOTIFICATIONS: &str = "helixagent.notifications";

impl Topology {
    /// An empty topology.
    pub fn new() -> Self {
        Topology::default()
    }

    /// Add a durable exchange.
    #[must_use]
    pub fn exchange(mut self, name: impl Into<String>, kind: ExchangeType) -> Self {
        self.exchanges.push(Exchange::new(name, kind));
        self
    }

    /// Add an exchange as described.
    #[must_use]
    pub fn with_exchange(mut self, exchange: Exchange) -> Self {
        self.exchanges.push(exchange);
        self
    }

    /// Add a queue.
    #[must_use]
    pub fn queue(mut self, queue: Queue) -> Self {
        self.queues.push(queue);
        self
    }

    /// Bind `queue` to `exchange` with `routing_key`.
    #[must_use]
    pub fn bind(
        mut self,
        queue: impl Into<String>,
        exchange: impl Into<String>,
        routing_key: impl Into<String>,
    ) -> Self {
        self.bindings.push(Binding {
            queue: queue.into(),
            exchange: exchange.into(),
            routing_key: routing_key.into(),
        });
        self
    }

    /// Everything in `other` added after this topology's own.
    #[must_use]
    pub fn merge(mut self, other: Topology) -> Self {
        self.exchanges.extend(other.exchanges);
        self.queues.extend(other.queues);
        self.bindings.extend(other.bindings);
        self
    }

    /// The exchanges, in declaration order.
    pub fn exchanges(&self) -> &[Exchange] {
        &self.exchanges
    }

    /// The queues, in declaration order.
    pub fn queues(&self) -> &[Queue] {
        &self.queues
    }

    /// The bindings, in declaration order.
    pub fn bindings(&self) -> &[Binding] {
        &self.bindings
    }

    /// HelixAgent's dead-letter queue: messages kept 7 days, at most 100,000.
    pub fn helixagent_dlq(name: &str) -> Queue {
        Queue::classic(name)
            .message_ttl(Duration::from_secs(7 * 24 * 3600))
            .max_length(100_000)
    }

    /// HelixAgent's topology:
    ///
    /// | what | name | details |
    /// |---|---|---|
    /// | direct exchange | `helixagent.tasks` | task routing by type |
    /// | topic exchange | `helixagent.events` | event pattern matching |
    /// | fanout exchange | `helixagent.notifications` | broadcast |
    /// | queue | `helixagent.tasks.background` | key `background` |
    /// | queue | `helixagent.tasks.llm` | key `llm`, priorities 0–10 |
    /// | queue | `helixagent.tasks.debate` | key `debate` |
    /// | queue | `helixagent.tasks.verification` | key `verification` |
    /// | queue | `helixagent.tasks.notifications` | key `notifications` |
    /// | queue | `helixagent.dlq` | 7 days, at most 100,000 |
    /// | queue | `helixagent.retry` | 60 s, at most 10,000 |
    ///
    /// Every task queue dead-letters to `helixagent.dlq`, so a rejected task lands there. The
    /// retry queue parks messages for 60 s and then dead-letters them back to
    /// `helixagent.tasks` with their own routing key, so a task parked there (for example by
    /// publishing it to the default exchange with routing key `helixagent.retry` and the
    /// task's key in the `CC` header) returns to its task queue; one that overflows the retry
    /// queue's 10,000 goes the same way early rather than being lost.
    pub fn helixagent() -> Self {
        let task_queues = [
            ("background", None),
            ("llm", Some(10)),
            ("debate", None),
            ("verification", None),
            ("notifications", None),
        ];
        let mut topology = Topology::new()
            .exchange(HELIXAGENT_TASKS, ExchangeType::Direct)
            .exchange(HELIXAGENT_EVENTS, ExchangeType::Topic)
            .exchange(HELIXAGENT_NOTIFICATIONS, ExchangeType::Fanout)
            .queue(Topology::helixagent_dlq(HELIXAGENT_DLQ))
            .queue(Queue {
                dead_letter_exchange: Some(HELIXAGENT_TASKS.to_owned()),
                ..Queue::classic(HELIXAGENT_RETRY)
                    .message_ttl(Duration::from_secs(60))
                    .max_length(10_000)
            });
        for (key, priority) in task_queues {
            let name = format!("{HELIXAGENT_TASKS}.{key}");
            let mut queue = Queue::classic(&name).dead_letter_to_queue(HELIXAGENT_DLQ);
            queue.max_priority = priority;
            topology = topology.queue(queue).bind(name, HELIXAGENT_TASKS, key);
        }
        topology
    }

    /// Check the declarations are consistent before sending any of them.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`](helix_messaging_core::ErrorKind::InvalidInput) naming the
    /// offending queue, exchange or binding.
    pub fn validate(&self) -> Result<()> {
        for exchange in &self.exchanges {
            if exchange.name.is_empty() || exchange.name.starts_with("amq.") {
                return Err(Error::invalid_input(format!(
                    "exchange {:?}: names that are empty or start with \"amq.\" are reserved",
                    exchange.name
                )));
            }
        }
        for queue in &self.queues {
            queue.validate()?;
        }
        for binding in &self.bindings {
            if binding.exchange.is_empty() {
                return Err(Error::invalid_input(format!(
                    "binding of {:?}: queues cannot be bound to the default exchange",
                    binding.queue
                )));
            }
        }
        Ok(())
    }

    /// Declare everything on a channel of `connection` of its own: a refused declaration
    /// closes the channel it was made on, which must not be the publishing channel.
    pub(crate) async fn declare_on(&self, connection: &Connection) -> Result<()> {
        self.validate()?;
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| from_lapin(e, "opening a channel to declare topology"))?;
        let declared = self.declare_with(&channel).await;
        if channel.status().connected() {
            let _ = channel.close(200, "topology declared".into()).await;
        }
        declared
    }

    async fn declare_with(&self, channel: &Channel) -> Result<()> {
        for exchange in &self.exchanges {
            channel
                .exchange_declare(
                    exchange.name.as_str().into(),
                    exchange.kind.into(),
                    ExchangeDeclareOptions {
                        durable: exchange.durable,
                        ..ExchangeDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map_err(|e| from_lapin(e, format!("declaring exchange {:?}", exchange.name)))?;
        }
        for queue in &self.queues {
            channel
                .queue_declare(
                    queue.name.as_str().into(),
                    QueueDeclareOptions {
                        durable: queue.durable,
                        ..QueueDeclareOptions::default()
                    },
                    queue.arguments(),
                )
                .await
                .map_err(|e| from_lapin(e, format!("declaring queue {:?}", queue.name)))?;
        }
        for binding in &self.bindings {
            channel
                .queue_bind(
                    binding.queue.as_str().into(),
                    binding.exchange.as_str().into(),
                    binding.routing_key.as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|e| {
                    from_lapin(
                        e,
                        format!(
                            "binding queue {:?} to exchange {:?} with key {:?}",
                            binding.queue, binding.exchange, binding.routing_key
                        ),
                    )
                })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use helix_messaging_core::ErrorKind;

    #[test]
    fn the_seed_preset_has_the_seeds_names_priorities_and_limits() {
        let t = Topology::helixagent();
        t.validate().expect("preset is consistent");
        let names: Vec<_> = t.exchanges().iter().map(|e| (&*e.name, e.kind)).collect();
        assert_eq!(
            names,
            [
                ("helixagent.tasks", ExchangeType::Direct),
                ("helixagent.events", ExchangeType::Topic),
                ("helixagent.notifications", ExchangeType::Fanout),
            ]
        );
        let queue = |n: &str| t.queues().iter().find(|q| q.name == n).expect(n);
        assert_eq!(queue("helixagent.tasks.llm").max_priority, Some(10));
        assert_eq!(queue("helixagent.tasks.background").max_priority, None);
        let dlq = queue("helixagent.dlq");
        assert_eq!(dlq.message_ttl, Some(Duration::from_secs(604_800)));
        assert_eq!(dlq.max_length, Some(100_000));
        let retry = queue("helixagent.retry");
        assert_eq!(retry.message_ttl, Some(Duration::from_secs(60)));
        assert_eq!(retry.max_length, Some(10_000));
        for key in [
            "background",
            "llm",
            "debate",
            "verification",
            "notifications",
        ] {
            let name = format!("helixagent.tasks.{key}");
            assert_eq!(
                queue(&name).dead_letter_routing_key.as_deref(),
                Some("helixagent.dlq")
            );
            assert!(
                t.bindings().iter().any(|b| b.queue == name
                    && b.exchange == "helixagent.tasks"
                    && b.routing_key == key),
                "{name} bound by {key}"
            );
        }
    }

    #[test]
    fn inconsistent_declarations_are_refused_before_anything_is_sent() {
        let cases = [
            Topology::new().queue(Queue {
                queue_type: QueueType::Quorum,
                ..Queue::classic("q").max_priority(5)
            }),
            Topology::new().queue(Queue::classic("q").max_priority(0)),
            Topology::new().queue(Queue::classic("q").max_segment_bytes(10)),
            Topology::new().queue(
                Queue::stream("s", Duration::from_secs(60)).message_ttl(Duration::from_secs(1)),
            ),
            Topology::new().exchange("amq.mine", ExchangeType::Topic),
            Topology::new().bind("q", "", "k"),
        ];
        for topology in cases {
            let err = topology.validate().expect_err("inconsistent");
            assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
        }
    }

    #[test]
    fn arguments_carry_every_setting() {
        let args = Queue::classic("q")
            .max_priority(10)
            .message_ttl(Duration::from_secs(60))
            .max_length(10)
            .dead_letter_to("dlx", "dead")
            .arguments();
        let get = |k: &str| args.inner().get(k).cloned();
        assert_eq!(get("x-max-priority"), Some(AMQPValue::ShortShortUInt(10)));
        assert_eq!(get("x-message-ttl"), Some(AMQPValue::LongLongInt(60_000)));
        assert_eq!(get("x-max-length"), Some(AMQPValue::LongLongInt(10)));
        assert!(get("x-dead-letter-exchange").is_some());
        let stream = Queue::stream("s", Duration::from_secs(3600)).arguments();
        assert_eq!(
            stream.inner().get("x-max-age"),
            Some(&AMQPValue::LongString(LongString::from(b"3600s".to_vec())))
        );
    }
}
