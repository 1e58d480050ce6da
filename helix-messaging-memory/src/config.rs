//! How the memory broker is tuned ([`MemoryConfig`]); apart from the broker so that its I/O-free
//! state machine can read the settings without importing the broker built on it.

use std::time::Duration;

#[cfg(doc)]
use helix_messaging_core::ErrorKind;

/// Default largest payload accepted: 16 MiB.
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 16 * 1024 * 1024;

/// Tuning of the memory broker. Every field has a default ([`MemoryConfig::default`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryConfig {
    /// Most messages a group may hold (ready plus unacked). A publish to a topic with a full
    /// group waits for room up to [`MemoryConfig::publish_timeout`]. Default 100,000.
    pub max_queue_depth: usize,
    /// How long a publish waits for room in a full group before failing with
    /// [`ErrorKind::Timeout`]. Default 5 s.
    pub publish_timeout: Duration,
    /// How long a delivery may stay unacked, measured from when it was handed out, before it
    /// is returned to its group for another member. `None` waits forever. Default 30 min
    /// (RabbitMQ's consumer timeout).
    pub ack_deadline: Option<Duration>,
    /// Most messages the retained log keeps per topic (the replay source); 0 keeps none.
    /// Default 100,000.
    pub retention_messages: usize,
    /// Oldest message the retained log keeps, by recorded time; `None` keeps any age.
    /// Default 24 h.
    pub retention_age: Option<Duration>,
    /// Largest payload accepted, in bytes. Default [`DEFAULT_MAX_PAYLOAD_BYTES`].
    pub max_payload_bytes: usize,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            max_queue_depth: 100_000,
            publish_timeout: Duration::from_secs(5),
            ack_deadline: Some(Duration::from_secs(30 * 60)),
            retention_messages: 100_000,
            retention_age: Some(Duration::from_secs(24 * 60 * 60)),
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
        }
    }
}
