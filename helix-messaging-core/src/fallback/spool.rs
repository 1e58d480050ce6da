//! The spool contract: what a spool must keep ([`Spool`]), its bounds ([`SpoolLimits`]), what
//! it reports, and the in-memory spool ([`MemorySpool`]). Apart from the broker that uses
//! it so that durable spools (in `helix-messaging-store`) implement it without the
//! forwarding machinery.

use std::collections::HashMap;
use std::time::SystemTime;

use async_trait::async_trait;
use parking_lot::Mutex;

use crate::error::{Error, ErrorKind, Result};
use crate::message::Message;

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
    /// append's, and a reader never sees a `seq` before every lower one is visible (the
    /// forwarder reads on past the last `seq` it read; a store that numbers appends before
    /// committing them, such as a shared sequence, must not let a lower one appear later).
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

    /// Up to `limit` of the oldest messages whose `seq` is above `after`, in spool order: the
    /// forwarder reads its next batch with it while the last one is still being removed.
    /// The default keeps what [`oldest`](Spool::oldest) returns above `after`, which may be
    /// fewer than there are, never one at or below it; since the batch before is usually
    /// still held then, a spool without its own gets little reading ahead.
    ///
    /// # Errors
    /// The store's error.
    async fn oldest_after(&self, after: i64, limit: usize) -> Result<Vec<SpooledMessage>> {
        let mut oldest = self.oldest(limit).await?;
        oldest.retain(|m| m.seq > after);
        Ok(oldest)
    }

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

    async fn oldest_after(&self, after: i64, limit: usize) -> Result<Vec<SpooledMessage>> {
        let state = self.state.lock();
        // Held in `seq` order (every append's are above every earlier one's).
        let start = state.held.partition_point(|(m, _)| m.seq <= after);
        Ok(state
            .held
            .range(start..)
            .take(limit)
            .map(|(m, _)| m.clone())
            .collect())
    }

    async fn remove(&self, seqs: &[i64]) -> Result<()> {
        // A set: the forwarder removes a thousand at a time from a spool of many more.
        let seqs: std::collections::HashSet<i64> = seqs.iter().copied().collect();
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
