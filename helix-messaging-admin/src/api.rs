//! The admin API's JSON contract: the bodies the server answers with (and the small request
//! bodies it reads), as typed structs that the server serializes and clients such as
//! `helixctl` deserialize, so the shape is written down once.
//!
//! Times are strings in RFC 3339 with milliseconds, UTC (`2026-01-02T03:04:05.678Z`).
//! Statuses are strings rather than enums, so a client keeps reading answers from a newer
//! server that adds a status. Unknown fields are ignored when reading an answer, for the
//! same reason.
//!
//! The types that carry stored data (DLQ entries, their messages, failure groups, refused
//! spool messages) hold [`Cow`] strings: the server serializes them borrowed from what it
//! read (a page of 1,000 entries copies no payload), and a client deserializes them owned,
//! as `Entry<'static>`. Job progress, health and acknowledgements are a few fields once per
//! answer and hold owned strings.

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A failed answer's body: `{"error": {"status", "message"}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: ErrorDetail,
}

/// The inside of an [`ErrorBody`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// The HTTP status of the answer; always set by the server. `None` (JSON `null`) when a
    /// client reports a failure that had no HTTP answer (the server unreachable, bad usage).
    pub status: Option<u16>,
    /// Why, for a person to read.
    pub message: String,
}

impl ErrorBody {
    /// An error body with `status` and `message`.
    pub fn new(status: Option<u16>, message: impl Into<String>) -> Self {
        ErrorBody {
            error: ErrorDetail {
                status,
                message: message.into(),
            },
        }
    }
}

/// One side's health in [`Health`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SideHealth {
    /// `healthy`, `degraded` or `unhealthy`.
    pub status: String,
    /// What the side reported.
    pub detail: String,
}

/// `GET /v1/messaging/health` (HTTP 503 when `status` is `unhealthy`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// `healthy`, `degraded` or `unhealthy`: the worse of the two sides.
    pub status: String,
    /// The task side.
    pub tasks: SideHealth,
    /// The event side.
    pub events: SideHealth,
}

/// A message as the API shows it inside a DLQ entry or a refused spool message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryMessage<'a> {
    /// Its partition or routing key.
    pub key: Option<Cow<'a, str>>,
    /// Its headers.
    pub headers: Cow<'a, BTreeMap<String, String>>,
    /// The payload as text when it is UTF-8; `None` otherwise.
    pub payload: Option<Cow<'a, str>>,
    /// The payload's length in bytes (given whether or not it is shown).
    pub payload_size: usize,
}

/// A DLQ entry: `GET /v1/messaging/dlq/{id}`, and each of a [`Page`]'s `messages`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry<'a> {
    /// The entry's id (the path's `{id}`).
    pub id: Cow<'a, str>,
    /// The failed message's own id.
    pub original_id: Cow<'a, str>,
    /// The topic it failed on.
    pub original_topic: Cow<'a, str>,
    /// The consumer group it failed in.
    pub group: Option<Cow<'a, str>>,
    /// Why it was dead-lettered (`permanent failure`, `undecodable payload`, …).
    pub reason: Cow<'a, str>,
    /// The error it failed with.
    pub error: Cow<'a, str>,
    /// Deliveries before it was dead-lettered.
    pub attempts: u32,
    /// Times it was re-driven and failed again.
    pub redrives: u32,
    /// Its first failure.
    pub first_failure_at: String,
    /// Its last failure.
    pub last_failure_at: String,
    /// `pending`, `parked` or `discarded`.
    pub status: Cow<'a, str>,
    /// Automatic re-drives attempted from the DLQ.
    pub retries: u32,
    /// When the next automatic re-drive is due.
    pub next_attempt_at: Option<String>,
    /// The last re-drive's error.
    pub last_error: Option<Cow<'a, str>>,
    /// Why it was discarded.
    pub discard_reason: Option<Cow<'a, str>>,
    /// When the DLQ stored it.
    pub stored_at: String,
    /// Until when a re-drive holds it.
    pub claimed_until: Option<String>,
    /// The failed message.
    pub message: EntryMessage<'a>,
}

/// `GET /v1/messaging/dlq`: one page of entries, oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Page<'a> {
    /// Every entry matching the filter, not just this page's.
    pub count: u64,
    /// The page size asked for.
    pub limit: usize,
    /// Entries skipped before this page.
    pub offset: usize,
    /// This page's entries.
    pub messages: Vec<Entry<'a>>,
}

/// Entries failed for the same reason on the same topic, in [`Groups`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Group<'a> {
    /// The reason they share.
    pub reason: Cow<'a, str>,
    /// The topic they failed on.
    pub topic: Cow<'a, str>,
    /// How many.
    pub count: u64,
    /// The oldest one's last failure.
    pub oldest: String,
    /// The newest one's last failure.
    pub newest: String,
    /// One of their errors.
    pub sample_error: Cow<'a, str>,
}

/// `GET /v1/messaging/dlq/groups`: the entries grouped by reason and topic, largest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Groups<'a> {
    /// Number of groups.
    pub count: usize,
    /// The groups.
    pub groups: Vec<Group<'a>>,
}

/// `POST /v1/messaging/dlq/redrives` with `"dry_run": true`: what a redrive would take,
/// starting nothing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RedrivePreview<'a> {
    /// Always `true`: nothing was started.
    pub dry_run: bool,
    /// Entries the redrive would take (the sum of the groups' counts).
    pub total: u64,
    /// Number of groups.
    pub count: usize,
    /// The selection grouped by reason and topic, largest first.
    pub groups: Vec<Group<'a>>,
}

/// What was done to one DLQ entry: `{"id", "status"}` (`reprocessed`, `discarded`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// The entry's id.
    pub id: String,
    /// What was done.
    pub status: String,
}

/// The optional body of `POST /v1/messaging/dlq/{id}/reprocess`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReprocessBody {
    /// Publish there instead of the topic it failed on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_topic: Option<String>,
}

/// The optional body of `DELETE /v1/messaging/dlq/{id}/discard`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiscardBody {
    /// Why (kept with the entry).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A bulk redrive job's progress: its start (202), `GET` and `DELETE
/// /v1/messaging/dlq/redrives/{id}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Redrive {
    /// The job's id.
    pub id: String,
    /// `running`, `watching` (canaries), `completed`, `cancelled`, `failed`, …
    pub status: String,
    /// Entries selected.
    pub total: u64,
    /// Published and removed from the DLQ.
    pub redriven: u64,
    /// Could not be published (kept in the DLQ).
    pub failed: u64,
    /// Gone or held elsewhere by the time the job reached them.
    pub skipped: u64,
    /// Share of the selection dealt with, 0 to 100.
    pub percentage: f64,
    /// When it started.
    pub started_at: String,
    /// When it finished.
    pub finished_at: Option<String>,
    /// The last error seen.
    pub last_error: Option<String>,
}

impl Redrive {
    /// Whether the job is still going (`running` or `watching` its canaries).
    pub fn is_active(&self) -> bool {
        matches!(self.status.as_str(), "running" | "watching")
    }
}

/// `GET /v1/messaging/dlq/redrives`: every job, newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Redrives {
    /// Number of jobs.
    pub count: usize,
    /// The jobs.
    pub redrives: Vec<Redrive>,
}

/// A replay's progress: its start (202), `GET` and `DELETE /v1/messaging/replay/{id}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Replay {
    /// The replay's id.
    pub id: String,
    /// `running`, `completed`, `cancelled`, `failed`, …
    pub status: String,
    /// The source topic.
    pub topic: String,
    /// Where copies go.
    pub target_topic: String,
    /// Whether it only counts (publishing nothing).
    pub dry_run: bool,
    /// Messages of the window dealt with.
    pub total: u64,
    /// Published to the target (or, in a dry run, would have been).
    pub replayed: u64,
    /// Left out: filtered or duplicates.
    pub skipped: u64,
    /// Could not be published.
    pub failed: u64,
    /// Of `skipped`: did not pass the filter.
    pub filtered: u64,
    /// Of `skipped`: an id already seen in the window.
    pub duplicates: u64,
    /// `replayed` by message type.
    pub by_type: BTreeMap<String, u64>,
    /// `skipped` by message type.
    pub skipped_by_type: BTreeMap<String, u64>,
    /// Share of the window reached, 0 to 100.
    pub percentage: f64,
    /// Recorded time of the last message dealt with.
    pub reached: Option<String>,
    /// The window's start.
    pub from_time: String,
    /// The window's end (exclusive).
    pub to_time: String,
    /// When it started.
    pub started_at: String,
    /// When it finished.
    pub finished_at: Option<String>,
    /// The last error seen.
    pub last_error: Option<String>,
    /// How often it was resumed after a restart or a failure.
    pub resumes: u32,
}

impl Replay {
    /// Whether the replay is still going.
    pub fn is_active(&self) -> bool {
        self.status == "running"
    }
}

/// `GET /v1/messaging/replay`: every replay, newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Replays {
    /// Number of replays.
    pub count: usize,
    /// The replays.
    pub replays: Vec<Replay>,
}

/// A consumer group of one of the hub's topics, in [`Queues`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Queue {
    /// `"tasks"` or `"events"`: the side whose broker holds it.
    pub side: String,
    /// The topic (a task queue's name, for tasks).
    pub topic: String,
    /// The consumer group.
    pub group: String,
    /// The side's backend.
    pub backend: String,
    /// What the backend's own tools call it: `queue`, `consumer group`, `stream group`,
    /// `channel` or `group`.
    pub kind: String,
    /// Its name in those tools (the RabbitMQ queue, the Kafka group, …).
    pub name: String,
    /// Where its messages come from, when the name does not say.
    pub source: Option<String>,
    /// Messages waiting for the group (`None` when the backlog could not be read).
    pub waiting: Option<u64>,
    /// Messages delivered and not yet settled, where the backend knows.
    pub in_flight: Option<u64>,
    /// Why the backlog could not be read (a backend without backlogs, a broker away).
    pub backlog_error: Option<String>,
}

/// `GET /v1/messaging/queues`: the consumer groups of the hub's topics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Queues {
    /// Number of groups listed.
    pub count: usize,
    /// The groups, by side, topic and group.
    pub queues: Vec<Queue>,
}

/// One side's fallback spool, in [`Spools`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpoolStats {
    /// Messages waiting to be forwarded.
    pub depth: u64,
    /// Messages the broker refused, set aside.
    pub refused: u64,
    /// Bytes held.
    pub bytes: u64,
    /// When the oldest waiting message was spooled.
    pub oldest: Option<String>,
}

/// `GET /v1/messaging/spools`: each side's spool, `None` (JSON `null`) for a side without one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spools {
    /// The task side's spool.
    pub tasks: Option<SpoolStats>,
    /// The event side's spool.
    pub events: Option<SpoolStats>,
}

/// A message the broker refused when it was forwarded from the spool, in [`RefusedList`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refused<'a> {
    /// Its place in the spool (the path's `{seq}`).
    pub seq: i64,
    /// The topic it was for.
    pub topic: Cow<'a, str>,
    /// The broker's refusal.
    pub reason: Cow<'a, str>,
    /// When it was refused.
    pub refused_at: String,
    /// The message's id.
    pub message_id: Cow<'a, str>,
    /// The message.
    pub message: EntryMessage<'a>,
}

/// `GET /v1/messaging/spools/{side}/refused`: the refused messages, oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusedList<'a> {
    /// Number listed.
    pub count: usize,
    /// The messages.
    pub refused: Vec<Refused<'a>>,
}

/// What was done to one refused spool message: `{"seq", "status"}` (`retried`,
/// `discarded`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpoolAck {
    /// The message's place in the spool.
    pub seq: i64,
    /// What was done.
    pub status: String,
}

/// The body of `POST /v1/messaging/dlq/redrives`: which entries and how fast. Every field is
/// optional, but the selection is deliberate: an empty `filter` needs `all`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedriveBody {
    /// Which entries: the list endpoint's filter keys (`topic`, `reason`, `type`, `status`,
    /// `original_id`, `from`, `to`). Empty only with `all`.
    #[serde(default)]
    pub filter: BTreeMap<String, String>,
    /// Re-drive every entry: required when `filter` is empty, refused with one.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub all: bool,
    /// Answer with what would be re-driven ([`RedrivePreview`]), starting nothing.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
    /// The job's id (a new UUID when absent); an id in use is a 409.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Publish there instead of each message's original topic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_topic: Option<String>,
    /// Most messages per second (the server's default rate when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_per_second: Option<f64>,
    /// Re-drive this many first, watch them, then the rest.
    #[serde(
        default,
        deserialize_with = "crate::json::optional_object",
        skip_serializing_if = "Option::is_none"
    )]
    pub canary: Option<CanaryBody>,
    /// Messages per published batch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<usize>,
}

/// A redrive's canary: `count` entries first, watched for `watch_ms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CanaryBody {
    /// How many entries go first.
    pub count: usize,
    /// How long they are watched, in milliseconds.
    pub watch_ms: u64,
}

/// The body of `POST /v1/messaging/replay` (HelixAgent's request; times in RFC 3339).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplayBody {
    /// The replay's id (a new UUID when absent); an id already used is a 409.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The topic whose history is copied.
    pub topic: String,
    /// The window's start, RFC 3339.
    pub from_time: String,
    /// The window's end, RFC 3339 (clamped to the start of the replay).
    pub to_time: String,
    /// Publish the copies there (never the source topic) rather than back on `topic`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_topic: Option<String>,
    /// Which messages are copied.
    #[serde(default, deserialize_with = "crate::json::object")]
    pub filter: ReplayFilterBody,
    /// How they are copied.
    #[serde(default, deserialize_with = "crate::json::object")]
    pub options: ReplayOptionsBody,
}

/// A replay's filter: messages of these types and with these headers (empty: every one).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplayFilterBody {
    /// Only messages whose `type` header is one of these.
    #[serde(default)]
    pub message_types: Vec<String>,
    /// Only messages carrying each of these headers with this value.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

/// A replay's options.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplayOptionsBody {
    /// Messages per published batch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<usize>,
    /// Pause between batches, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay_between_ms: Option<u64>,
    /// Count what would be copied, copying nothing.
    #[serde(default)]
    pub dry_run: bool,
    /// Copy each message id once.
    #[serde(default)]
    pub skip_duplicates: bool,
}
