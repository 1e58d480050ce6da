//! What a replay is asked to do and how it reports: the request with its filter and
//! options, the headers a copy carries, the status and progress, and the handler's
//! configuration. Apart from the handler and the run, which both build on these.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::broker::TimeRange;
use crate::error::{Error, Result};
use crate::message::{Headers, MESSAGE_TYPE_HEADER, Message};
use crate::names::validate_name;

/// Most messages a replay publishes per batch ([`ReplayOptions::batch_size`]); a batch is
/// held in memory.
pub const MAX_REPLAY_BATCH_SIZE: usize = 10_000;
/// Replays a [`ReplayHandler`](super::ReplayHandler) runs at once by default
/// ([`ReplayConfig::max_active`]): each holds a batch in memory and a broker connection's
/// worth of reading and publishing.
pub const MAX_RUNNING_REPLAYS: usize = 4;
/// Finished replays kept for listing (in the [`ReplayStore`](super::ReplayStore) and in the
/// handler's memory): beyond this many completed or cancelled ones, those that finished
/// first are forgotten whenever a replay ends. Running replays are never forgotten, nor are
/// failed ones (they can be resumed; cancelling one closes it, and it is then forgotten in
/// its turn).
pub const MAX_FINISHED_REPLAYS: usize = 100;

/// Header naming the replay that published a copy.
pub const HEADER_REPLAY_ID: &str = "helix-replay-id";
/// Header naming the topic a copy was replayed from.
pub const HEADER_SOURCE_TOPIC: &str = "helix-replay-source-topic";
/// Header with the original's place in the source (`<partition>:<a>:<b>`), which a resumed
/// replay uses to recognise copies it already published.
pub const HEADER_SOURCE_POSITION: &str = "helix-replay-source-position";
/// Header with the original's timestamp, milliseconds since the Unix epoch.
pub const HEADER_ORIGINAL_TIMESTAMP: &str = "helix-replay-original-timestamp";

/// What `by_type` counts messages without a type header under.
pub const UNTYPED: &str = "(untyped)";

/// Which messages of the window are replayed. An empty filter takes everything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplayFilter {
    /// Take only messages whose type (the [`MESSAGE_TYPE_HEADER`] header) is one of these;
    /// empty takes every type, untyped messages included.
    #[serde(default)]
    pub message_types: Vec<String>,
    /// Take only messages carrying every one of these headers with exactly this value.
    #[serde(default)]
    pub headers: Headers,
}

impl ReplayFilter {
    /// Whether `message` passes.
    pub fn matches(&self, message: &Message) -> bool {
        let type_ok = self.message_types.is_empty()
            || message
                .header(MESSAGE_TYPE_HEADER)
                .is_some_and(|t| self.message_types.iter().any(|wanted| wanted == t));
        type_ok
            && self
                .headers
                .iter()
                .all(|(name, value)| message.header(name) == Some(value.as_str()))
    }
}

/// How a replay runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ReplayOptions {
    /// Messages published per batch, whose confirmations are awaited together (default
    /// 100). A cancel takes effect between batches.
    pub batch_size: usize,
    /// Pause after each batch (default none).
    pub delay_between: Duration,
    /// Publish nothing: count what would be replayed (by type) and what would be skipped.
    pub dry_run: bool,
    /// Skip a message whose id was already seen earlier in the window.
    pub skip_duplicates: bool,
}

impl Default for ReplayOptions {
    fn default() -> Self {
        ReplayOptions {
            batch_size: 100,
            delay_between: Duration::ZERO,
            dry_run: false,
            skip_duplicates: false,
        }
    }
}

/// A replay: which topic, which window, where to, which messages, how.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplayRequest {
    /// Replay id (an empty one is replaced by a fresh UUID). At most one replay per id.
    #[serde(default)]
    pub id: String,
    /// The topic whose history is replayed.
    pub topic: String,
    /// Window start (inclusive), by the time the backend recorded each message.
    pub from_time: SystemTime,
    /// Window end (exclusive).
    pub to_time: SystemTime,
    /// Where copies are published (default `<topic>.replay`).
    #[serde(default)]
    pub target_topic: Option<String>,
    /// Which messages.
    #[serde(default)]
    pub filter: ReplayFilter,
    /// How.
    #[serde(default)]
    pub options: ReplayOptions,
}

impl ReplayRequest {
    /// Replay `topic` recorded in `[from_time, to_time)` into `<topic>.replay`, everything,
    /// with default options.
    pub fn new(topic: impl Into<String>, from_time: SystemTime, to_time: SystemTime) -> Self {
        ReplayRequest {
            id: String::new(),
            topic: topic.into(),
            from_time,
            to_time,
            target_topic: None,
            filter: ReplayFilter::default(),
            options: ReplayOptions::default(),
        }
    }

    /// Set the replay id.
    #[must_use]
    pub fn with_id(mut self, id: impl Into<String>) -> Self {
        self.id = id.into();
        self
    }

    /// Publish into `target` instead of `<topic>.replay`.
    #[must_use]
    pub fn with_target_topic(mut self, target: impl Into<String>) -> Self {
        self.target_topic = Some(target.into());
        self
    }

    /// Set the filter.
    #[must_use]
    pub fn with_filter(mut self, filter: ReplayFilter) -> Self {
        self.filter = filter;
        self
    }

    /// Set the options.
    #[must_use]
    pub fn with_options(mut self, options: ReplayOptions) -> Self {
        self.options = options;
        self
    }

    /// Where copies go.
    pub fn target(&self) -> String {
        self.target_topic
            .clone()
            .unwrap_or_else(|| format!("{}.replay", self.topic))
    }

    pub(super) fn validate(&self) -> Result<TimeRange> {
        validate_name("topic", &self.topic)?;
        validate_name("target topic", &self.target())?;
        if self.id.len() > 200 || self.id.chars().any(char::is_control) {
            return Err(Error::invalid_input(
                "replay id: at most 200 characters, no control characters",
            ));
        }
        if self.options.batch_size == 0 {
            return Err(Error::invalid_input("batch_size must be at least 1"));
        }
        if self.options.batch_size > MAX_REPLAY_BATCH_SIZE {
            return Err(Error::invalid_input(format!(
                "batch_size must be at most {MAX_REPLAY_BATCH_SIZE}, got {}",
                self.options.batch_size
            )));
        }
        if self.target() == self.topic {
            // Its own copies would land in the window it is reading, and be copied again.
            return Err(Error::invalid_input(format!(
                "target_topic must differ from the source topic {:?}",
                self.topic
            )));
        }
        TimeRange::new(self.from_time, self.to_time)
    }
}

/// Where a replay stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplayStatus {
    /// Reading and publishing (or resumed after a restart and doing so again).
    Running,
    /// The whole window was dealt with.
    Completed,
    /// Cancelled; what was published stays published.
    Cancelled,
    /// Stopped by an error (in `last_error`); [`ReplayHandler::resume_replay`](super::ReplayHandler::resume_replay) continues it
    /// from its checkpoint.
    Failed,
}

impl ReplayStatus {
    /// The status as shown.
    pub const fn as_str(self) -> &'static str {
        match self {
            ReplayStatus::Running => "running",
            ReplayStatus::Completed => "completed",
            ReplayStatus::Cancelled => "cancelled",
            ReplayStatus::Failed => "failed",
        }
    }

    /// Whether the replay has stopped.
    pub const fn is_finished(self) -> bool {
        !matches!(self, ReplayStatus::Running)
    }
}

/// A replay's progress. Always `replayed + skipped + failed == total`, where `total` counts
/// the window's messages dealt with so far (final once the replay has completed: the window
/// is streamed, not counted ahead).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplayProgress {
    /// The replay id.
    pub id: String,
    /// Where it stands.
    pub status: ReplayStatus,
    /// The source topic.
    pub topic: String,
    /// The target topic.
    pub target_topic: String,
    /// Whether this is a dry run (`replayed` then counts what would have been published).
    pub dry_run: bool,
    /// Messages of the window dealt with.
    pub total: u64,
    /// Published to the target (confirmed by the broker).
    pub replayed: u64,
    /// Left out: filtered or duplicates.
    pub skipped: u64,
    /// Could not be published (after retrying transient errors).
    pub failed: u64,
    /// Of `skipped`: did not pass the filter.
    pub filtered: u64,
    /// Of `skipped`: an id already seen in the window.
    pub duplicates: u64,
    /// `replayed` by message type ([`UNTYPED`] for messages without one).
    pub by_type: BTreeMap<String, u64>,
    /// `skipped` by message type.
    pub skipped_by_type: BTreeMap<String, u64>,
    /// Recorded time of the last message dealt with.
    pub reached: Option<SystemTime>,
    /// The window.
    pub from_time: SystemTime,
    /// The window's end.
    pub to_time: SystemTime,
    /// When the replay started.
    pub started_at: SystemTime,
    /// When it finished.
    pub finished_at: Option<SystemTime>,
    /// The last error seen.
    pub last_error: Option<String>,
    /// How often it was resumed after a restart or a failure.
    pub resumes: u32,
}

impl ReplayProgress {
    pub(super) fn new(request: &ReplayRequest) -> Self {
        ReplayProgress {
            id: request.id.clone(),
            status: ReplayStatus::Running,
            topic: request.topic.clone(),
            target_topic: request.target(),
            dry_run: request.options.dry_run,
            total: 0,
            replayed: 0,
            skipped: 0,
            failed: 0,
            filtered: 0,
            duplicates: 0,
            by_type: BTreeMap::new(),
            skipped_by_type: BTreeMap::new(),
            reached: None,
            from_time: request.from_time,
            to_time: request.to_time,
            started_at: SystemTime::now(),
            finished_at: None,
            last_error: None,
            resumes: 0,
        }
    }

    /// How much of the window has been dealt with, in percent: 100 once completed, else
    /// the share of the window's time span up to [`ReplayProgress::reached`] (the number of
    /// messages in the window is not known ahead).
    pub fn percentage(&self) -> f64 {
        if self.status == ReplayStatus::Completed {
            return 100.0;
        }
        let span = self
            .to_time
            .duration_since(self.from_time)
            .unwrap_or_default()
            .as_secs_f64();
        match self.reached {
            None => 0.0,
            Some(_) if span <= 0.0 => 100.0,
            Some(reached) => {
                let covered = reached
                    .duration_since(self.from_time)
                    .unwrap_or_default()
                    .as_secs_f64();
                (covered * 100.0 / span).min(99.9)
            }
        }
    }
}

/// Settings shared by a handler's replays (HelixAgent's `DefaultReplayConfig`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayConfig {
    /// Most replays running at once in this handler (default [`MAX_RUNNING_REPLAYS`]); one
    /// more is refused with [`ErrorKind::Busy`](crate::error::ErrorKind::Busy) until one
    /// finishes.
    pub max_active: usize,
    /// Attempts to publish a batch's messages that fail with a transient error (default 3),
    /// with exponential backoff from `retry_delay`.
    pub publish_attempts: usize,
    /// First backoff between those attempts (default 200 ms).
    pub retry_delay: Duration,
    /// Longest time between checkpoints while a replay runs (default 1 s; they are taken
    /// between batches). Copies published since the last one are recognised by a resumed
    /// replay in the target topic.
    pub checkpoint_interval: Duration,
    /// How far clocks may disagree (default 5 s): a resumed replay looks for its copies in
    /// the target from that much before its in-flight mark.
    pub clock_skew: Duration,
    /// How long a handler's hold on a running replay lasts without renewal (default 15 s;
    /// renewed every third of it). Handlers sharing a store run each replay in one of them;
    /// one whose holder died (crashed, never released it) is taken over by another once its
    /// lease has run out.
    pub lease: Duration,
    /// This handler's name as a lease holder (default: a fresh UUID). A stable name (the
    /// host or pod name) lets a restarted process take its own replays back at once instead
    /// of waiting for their leases to run out. It must be unique among the live handlers
    /// sharing a store: two live handlers of one name take a replay from each other.
    pub instance_id: Option<String>,
}

impl Default for ReplayConfig {
    fn default() -> Self {
        ReplayConfig {
            max_active: MAX_RUNNING_REPLAYS,
            publish_attempts: 3,
            retry_delay: Duration::from_millis(200),
            checkpoint_interval: Duration::from_secs(1),
            clock_skew: Duration::from_secs(5),
            lease: Duration::from_secs(15),
            instance_id: None,
        }
    }
}
