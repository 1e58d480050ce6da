//! What a backend can honestly promise.

/// The promises a backend keeps. Each adapter exposes its own as a constant, so the testkit,
/// the README's backend table and applications can all read them without connecting.
///
/// An operation that needs a capability the backend lacks returns
/// [`ErrorKind::Unsupported`](crate::ErrorKind::Unsupported); it is never silently ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Capabilities {
    /// Accepted messages survive a broker restart.
    pub durable: bool,
    /// A message reaches its subscribers whole: its id, key, headers (trace context and
    /// `type` included), priority, content type and correlation id as published, besides
    /// its payload. Without it a subscriber sees the payload only, with a fresh id, so
    /// retries, the DLQ's handlers by type, tracing and deduplication by id cannot work
    /// across it (Redis pub/sub with its envelope turned off).
    pub metadata: bool,
    /// A delivery stays pending until acked, and `nack(requeue = true)` redelivers it with
    /// attempt + 1.
    pub redelivery: bool,
    /// Named consumer groups: competing consumers inside a group, every group gets every
    /// message.
    pub consumer_groups: bool,
    /// Messages with the same key reach a group in publish order.
    pub per_key_ordering: bool,
    /// A backlog is delivered highest priority first.
    pub priority: bool,
    /// A message's TTL is enforced: it is discarded if not delivered in time.
    pub ttl: bool,
    /// Unacked deliveries are handed to another member after a deadline or when their
    /// subscription goes away.
    pub redeliver_unacked: bool,
    /// The topic's history can be read back by time range, and a new group can start from it.
    pub replay_by_time: bool,
    /// Rejected messages are routed to a dead-letter destination by the broker itself.
    pub native_dlq: bool,
    /// A requeue can be delayed ([`Delivery::requeue_after`](crate::Delivery::requeue_after)): the
    /// broker holds the message back for its group until the delay has passed, so a waiting
    /// retry occupies nothing in the consumer and survives its crash. Promised for named
    /// consumer groups; a private subscription's delivery may not offer it (Kafka would need
    /// a retry topic per subscription), which [`Delivery::delays_requeue`](crate::Delivery::delays_requeue)
    /// tells.
    pub delayed_requeue: bool,
    /// How far a consumer group is behind can be asked ([`Broker::backlog`](crate::Broker::backlog)):
    /// the messages waiting for it, and where the backend knows, those delivered but not
    /// yet settled.
    pub backlog: bool,
    /// Largest payload accepted, in bytes, when the backend enforces one.
    pub max_payload_bytes: Option<usize>,
}

impl Capabilities {
    /// No capabilities at all: the base adapters build on with struct-update syntax.
    pub const NONE: Capabilities = Capabilities {
        durable: false,
        metadata: false,
        redelivery: false,
        consumer_groups: false,
        per_key_ordering: false,
        priority: false,
        ttl: false,
        redeliver_unacked: false,
        replay_by_time: false,
        native_dlq: false,
        delayed_requeue: false,
        backlog: false,
        max_payload_bytes: None,
    };

    /// The boolean capabilities with a short column title each, in a fixed order (used to
    /// render and check the README's backend table).
    pub fn flags(&self) -> [(&'static str, bool); 12] {
        [
            ("Durable", self.durable),
            ("Metadata kept", self.metadata),
            ("Ack + redelivery", self.redelivery),
            ("Consumer groups", self.consumer_groups),
            ("Per-key order", self.per_key_ordering),
            ("Priority", self.priority),
            ("TTL", self.ttl),
            ("Unacked handed over", self.redeliver_unacked),
            ("Replay by time", self.replay_by_time),
            ("Native DLQ", self.native_dlq),
            ("Delayed requeue", self.delayed_requeue),
            ("Backlog", self.backlog),
        ]
    }
}
