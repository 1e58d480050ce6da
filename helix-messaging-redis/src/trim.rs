//! Trimming streams without losing what a consumer group still needs.
//!
//! `XADD … MAXLEN ~ n` trims by length alone: a group that lags more than `n` entries loses
//! the oldest ones it has not read (or has read and not acked), with no error, log or metric.
//! Redis 7.0 has no trimming that respects groups (`XADD … ACKED` came in 8.2), so the
//! adapter trims itself, at most once per [`StreamsConfig::trim_interval`] per topic, after
//! a publish: one Lua script (atomic on the server) finds where trimming to
//! [`StreamsConfig::max_len`] would cut, and cuts no further than the oldest entry any group
//! has pending or not yet delivered. What it removes is counted ([`TRIMMED_METRIC`]); a cut
//! held back by a lagging group is counted ([`TRIM_HELD_BACK_METRIC`]) and logged.
//!
//! A private subscription's group (`helix-private-…`) protects its entries only while it has
//! a consumer that read within the ack deadline: a process that crashed leaves such a group
//! behind, and it must not keep the stream from being trimmed for ever.
//!
//! [`StreamsConfig::trim_interval`]: crate::StreamsConfig::trim_interval
//! [`StreamsConfig::max_len`]: crate::StreamsConfig::max_len

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::primary::Connection;
use helix_messaging_core::Result;

use crate::config::StreamsConfig;
use crate::error::from_redis;

/// Counter of stream entries removed by trimming, labelled by topic.
pub const TRIMMED_METRIC: &str = "messaging_redis_trimmed_entries_total";
/// Counter of trims that stopped short of the length limit because a group still needed the
/// entries, labelled by topic.
pub const TRIM_HELD_BACK_METRIC: &str = "messaging_redis_trim_held_back_total";

/// Prefix of the groups of subscriptions without a group.
pub(crate) const PRIVATE_GROUP_PREFIX: &str = "helix-private-";

/// KEYS[1] the stream; ARGV: max length, `~` or `=`, the idle time (ms) after which a private
/// group no longer counts, the private group prefix. Returns `{removed, held_back, length}`.
const SCRIPT: &str = r#"
local key = KEYS[1]
local max_len = tonumber(ARGV[1])
local approx = ARGV[2] == '~'
local orphan_ms = tonumber(ARGV[3])
local private_prefix = ARGV[4]

local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local function less(a, b)
  local am, as = parse(a)
  local bm, bs = parse(b)
  if am ~= bm then return am < bm end
  return as < bs
end
local function fields(flat)
  local map = {}
  for i = 1, #flat, 2 do map[flat[i]] = flat[i + 1] end
  return map
end

local len = redis.call('XLEN', key)
if len <= max_len then return {0, 0, len} end
-- The first entry a trim by length keeps.
local head = redis.call('XRANGE', key, '-', '+', 'COUNT', len - max_len + 1)
local cut = head[#head][1]
local safe = cut
for _, flat in ipairs(redis.call('XINFO', 'GROUPS', key)) do
  local group = fields(flat)
  local counts = true
  if string.sub(group['name'], 1, #private_prefix) == private_prefix then
    counts = false
    for _, consumer in ipairs(redis.call('XINFO', 'CONSUMERS', key, group['name'])) do
      if fields(consumer)['idle'] < orphan_ms then counts = true end
    end
  end
  if counts then
    local pending = redis.call('XPENDING', key, group['name'])
    if pending[1] > 0 and less(pending[2], safe) then safe = pending[2] end
    local undelivered = redis.call('XRANGE', key, '(' .. group['last-delivered-id'], '+', 'COUNT', 1)
    if #undelivered > 0 and less(undelivered[1][1], safe) then safe = undelivered[1][1] end
  end
end
local removed
if approx then
  removed = redis.call('XTRIM', key, 'MINID', '~', safe)
else
  removed = redis.call('XTRIM', key, 'MINID', safe)
end
local held = 0
if less(safe, cut) then held = 1 end
return {removed, held, redis.call('XLEN', key)}
"#;

/// What one trim of a stream did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrimReport {
    /// Entries removed.
    pub removed: u64,
    /// Whether a consumer group's pending or undelivered entries stopped the trim short of
    /// the length limit.
    pub held_back: bool,
    /// Entries in the stream afterwards.
    pub length: u64,
}

#[derive(Default)]
struct TopicTrim {
    last: Option<Instant>,
    running: bool,
    warned: Option<Instant>,
}

/// Longest silence between two warnings about the same held-back topic.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// One broker's trimming: the script, and what it remembers between trims. It is handed the
/// connection and the settings it trims with, so that it stands below the broker's shared
/// state, which holds it.
pub(crate) struct Trimmer {
    script: redis::Script,
    /// When each topic was last trimmed and last warned about.
    topics: parking_lot::Mutex<HashMap<String, TopicTrim>>,
    /// Stream entries removed by trimming since connecting.
    trimmed: AtomicU64,
}

impl Trimmer {
    pub(crate) fn new() -> Self {
        Trimmer {
            script: redis::Script::new(SCRIPT),
            topics: parking_lot::Mutex::default(),
            trimmed: AtomicU64::new(0),
        }
    }

    /// Stream entries removed by trimming since connecting.
    pub(crate) fn trimmed(&self) -> u64 {
        self.trimmed.load(Ordering::Relaxed)
    }

    /// Trim `topic` now.
    pub(crate) async fn trim(
        &self,
        commands: &Connection,
        streams: &StreamsConfig,
        topic: &str,
    ) -> Result<TrimReport> {
        let mut commands = commands.clone();
        let Some(max_len) = streams.max_len else {
            // No limit: nothing to trim; the report still tells the length.
            let length: u64 = redis::cmd("XLEN")
                .arg(topic)
                .query_async(&mut commands)
                .await
                .map_err(|e| from_redis(e, format!("XLEN {topic}")))?;
            return Ok(TrimReport {
                removed: 0,
                held_back: false,
                length,
            });
        };
        let (removed, held, length): (u64, u8, u64) = self
            .script
            .key(topic)
            .arg(max_len)
            .arg(if streams.exact_trim { "=" } else { "~" })
            .arg(u64::try_from(streams.ack_deadline.as_millis()).unwrap_or(u64::MAX))
            .arg(PRIVATE_GROUP_PREFIX)
            .invoke_async(&mut commands)
            .await
            .map_err(|e| from_redis(e, format!("trimming {topic}")))?;
        let report = TrimReport {
            removed,
            held_back: held == 1,
            length,
        };
        if removed > 0 {
            self.trimmed.fetch_add(removed, Ordering::Relaxed);
            metrics::counter!(TRIMMED_METRIC, "topic" => topic.to_owned()).increment(removed);
            tracing::debug!(topic, removed, length, "trimmed stream");
        }
        if report.held_back {
            metrics::counter!(TRIM_HELD_BACK_METRIC, "topic" => topic.to_owned()).increment(1);
            let warn = {
                let mut topics = self.topics.lock();
                let state = topics.entry(topic.to_owned()).or_default();
                let due = state.warned.is_none_or(|t| t.elapsed() >= WARN_EVERY);
                if due {
                    state.warned = Some(Instant::now());
                }
                due
            };
            if warn {
                tracing::warn!(
                    topic,
                    length,
                    max_len,
                    "stream kept above its length limit: a consumer group has not yet read or acked its oldest entries"
                );
            }
        }
        Ok(report)
    }

    /// After a publish to `topic`: whether to trim it in the background, that is whether its
    /// interval has passed and no trim of it is running. When it is, the trim counts as
    /// running from now until [`Trimmer::finished`].
    pub(crate) fn start_if_due(&self, topic: &str, streams: &StreamsConfig) -> bool {
        if streams.max_len.is_none() {
            return false;
        }
        let interval = streams.trim_interval;
        let mut topics = self.topics.lock();
        if !topics.contains_key(topic) {
            topics.insert(topic.to_owned(), TopicTrim::default());
        }
        let Some(state) = topics.get_mut(topic) else {
            return false;
        };
        if state.running || state.last.is_some_and(|t| t.elapsed() < interval) {
            return false;
        }
        state.running = true;
        state.last = Some(Instant::now());
        true
    }

    /// A background trim of `topic` begun by [`Trimmer::start_if_due`] is over.
    pub(crate) fn finished(&self, topic: &str) {
        if let Some(state) = self.topics.lock().get_mut(topic) {
            state.running = false;
        }
    }
}
