//! One replay's run: stream the window, filter, publish in batches, checkpoint.

use std::collections::HashSet;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use backon::{BackoffBuilder, ExponentialBuilder};
use futures::{FutureExt, StreamExt};
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use super::request::{
    HEADER_ORIGINAL_TIMESTAMP, HEADER_REPLAY_ID, HEADER_SOURCE_POSITION, HEADER_SOURCE_TOPIC,
    ReplayConfig, ReplayProgress, ReplayRequest, ReplayStatus, UNTYPED,
};
use super::store::{Frontier, ReplayLease, ReplayRecord, ReplayStore};
use crate::broker::{Broker, HistoryEntry, TimeRange};
use crate::delivery::Position;
use crate::error::{Error, ErrorKind, Result, panicked};
use crate::message::millis;
use crate::message::{MESSAGE_TYPE_HEADER, Message};
use crate::trace;

pub(super) struct Run {
    pub(super) broker: Arc<dyn Broker>,
    pub(super) store: Arc<dyn ReplayStore>,
    pub(super) config: ReplayConfig,
    /// The lease this run holds: every write it makes is fenced by it.
    pub(super) lease: ReplayLease,
    /// As last made durable.
    pub(super) record: ReplayRecord,
    /// Live: ahead of `record` by what was done since the last checkpoint.
    pub(super) progress: Arc<Mutex<ReplayProgress>>,
    pub(super) cancel: CancellationToken,
    pub(super) shutdown: CancellationToken,
    /// Set when a write found the lease taken by another handler.
    pub(super) lost: bool,
}

enum Stop {
    Completed,
    Cancelled,
    /// The handler shut down: the stored record stays `Running`, to be resumed.
    Interrupted,
    /// Another handler took the replay over (this one could not renew its lease in time):
    /// this run writes nothing more.
    LeaseLost,
}

/// An entry read from the source, with its place there; in the batch, an original waiting
/// to be copied.
struct Prepared {
    entry: HistoryEntry,
    partition: i32,
    mark: (u64, u64),
    position: String,
    /// Made ahead, when it was read while the previous batch was being published.
    copy: Option<Message>,
}

/// What every copy of one replay carries besides its original.
struct Copies {
    replay_id: String,
    source_topic: String,
    target: String,
}

impl Copies {
    fn of(request: &ReplayRequest) -> Self {
        Copies {
            replay_id: request.id.clone(),
            source_topic: request.topic.clone(),
            target: request.target(),
        }
    }

    /// The copy published for `original`, found at `position` in the source.
    fn make(&self, original: &Message, position: &str) -> Message {
        // Changed in place rather than taken apart: taking it apart gives the id back as a
        // `String`, an allocation per copy only to be copied inline again.
        let mut copy = original.clone().with_timestamp(SystemTime::now());
        let headers = copy.headers_mut();
        headers.insert(HEADER_REPLAY_ID.to_owned(), self.replay_id.clone());
        headers.insert(HEADER_SOURCE_TOPIC.to_owned(), self.source_topic.clone());
        headers.insert(HEADER_SOURCE_POSITION.to_owned(), position.to_owned());
        headers.insert(
            HEADER_ORIGINAL_TIMESTAMP.to_owned(),
            millis(original.timestamp()),
        );
        trace::stamp_copy(trace::CopyKind::Replay, &self.target, &mut copy);
        copy
    }
}

/// The window being read: entries come from `staged` (read while a batch was being
/// published) before the stream.
struct Source {
    stream: futures::stream::BoxStream<'static, Result<HistoryEntry>>,
    /// The stream returned its end (it is not polled again).
    ended: bool,
    /// Entries read so far (an entry's place when the backend gives it no position).
    index: u64,
    staged: std::collections::VecDeque<Result<Prepared>>,
}

impl Source {
    fn prepare(&mut self, item: Result<HistoryEntry>) -> Result<Prepared> {
        let entry = item?;
        self.index += 1;
        let (partition, mark) = position_mark(&entry, self.index);
        Ok(Prepared {
            position: position_key(partition, mark),
            entry,
            partition,
            mark,
            copy: None,
        })
    }

    /// Run `work` (a batch being published), reading and preparing up to `limit` entries
    /// meanwhile, with their copies made when `copies` is given; `work`'s output. The copies
    /// are made on this task while the broker confirms, rather than after it has.
    async fn read_during<T>(
        &mut self,
        work: impl std::future::Future<Output = T>,
        limit: usize,
        copies: Option<&Copies>,
    ) -> T {
        let mut work = std::pin::pin!(work);
        loop {
            tokio::select! {
                biased;
                out = &mut work => return out,
                item = self.stream.next(), if !self.ended && self.staged.len() < limit => {
                    let Some(item) = item else {
                        self.ended = true;
                        continue;
                    };
                    let mut prepared = self.prepare(item);
                    if let (Ok(p), Some(copies)) = (&mut prepared, copies) {
                        p.copy = Some(copies.make(&p.entry.message, &p.position));
                    }
                    self.staged.push_back(prepared);
                }
            }
        }
    }
}

/// `partition:major:minor`, the source position copies carry and a resume looks for.
fn position_key(partition: i32, (major, minor): (u64, u64)) -> String {
    // At most 11 + 20 + 20 digits and two colons.
    let mut key = String::with_capacity(53);
    key.push_str(itoa::Buffer::new().format(partition));
    key.push(':');
    key.push_str(itoa::Buffer::new().format(major));
    key.push(':');
    key.push_str(itoa::Buffer::new().format(minor));
    key
}

/// What a run keeps besides its progress.
struct State {
    frontier: Frontier,
    batch: Vec<Prepared>,
    /// Copies a previous run published after its last checkpoint (source positions).
    published_before: HashSet<String>,
    /// Hashes of the ids seen (with `skip_duplicates`).
    seen: HashSet<u64>,
    last_checkpoint: Instant,
}

/// Where an entry sits in its source partition, as a mark comparable with the frontier's.
/// Entries a backend gives no position fall back on their index in the window, which holds
/// while the window's history does not change.
fn position_mark(entry: &HistoryEntry, index: u64) -> (i32, (u64, u64)) {
    let by_index = (i32::MIN, (index, 0));
    match &entry.position {
        Some(Position::Offset { partition, offset }) => {
            (*partition, (u64::try_from(*offset).unwrap_or(0), 0))
        }
        Some(Position::Sequence(n)) => (0, (*n, 0)),
        Some(Position::StreamId(id)) => id
            .split_once('-')
            .and_then(|(ms, seq)| Some((0, (ms.parse().ok()?, seq.parse().ok()?))))
            .unwrap_or(by_index),
        Some(Position::DeliveryTag(_)) | None => by_index,
    }
}

/// Entries read ahead of the batch being published (at least one batch's worth).
const READ_AHEAD: usize = 1024;

/// Most entries handed from the reading task to the run at once (see [`read_ahead`]).
const READ_AHEAD_CHUNK: usize = 256;

/// `stream` read by a task of its own into a buffer of about `ahead` entries, so the next
/// batch is read while this one is published. The task ends with the stream or when the
/// returned stream is dropped.
///
/// Entries cross in chunks of what the stream has ready, up to [`READ_AHEAD_CHUNK`]: sent
/// one by one, the channel's send, wake-up and receive for each entry cost more than
/// reading it from the in-process broker.
fn read_ahead(
    stream: crate::broker::HistoryStream,
    ahead: usize,
) -> futures::stream::BoxStream<'static, Result<HistoryEntry>> {
    let chunk = READ_AHEAD_CHUNK.min(ahead).max(1);
    let (tx, rx) = tokio::sync::mpsc::channel((ahead / chunk).max(1));
    tokio::spawn(async move {
        let mut chunks = stream.ready_chunks(chunk);
        while let Some(entries) = chunks.next().await {
            if tx.send(entries).await.is_err() {
                break;
            }
        }
    });
    Box::pin(
        futures::stream::unfold(rx, |mut rx| async move {
            rx.recv()
                .await
                .map(|entries| (futures::stream::iter(entries), rx))
        })
        .flatten(),
    )
}

fn id_hash(id: &str) -> u64 {
    let mut hasher = DefaultHasher::new();
    id.hash(&mut hasher);
    hasher.finish()
}

fn type_of(message: &Message) -> &str {
    message.header(MESSAGE_TYPE_HEADER).unwrap_or(UNTYPED)
}

fn bump(counts: &mut std::collections::BTreeMap<String, u64>, kind: &str, by: u64) {
    match counts.get_mut(kind) {
        Some(n) => *n += by,
        None => {
            counts.insert(kind.to_owned(), by);
        }
    }
}

impl Run {
    pub(super) async fn run(mut self) {
        let id = self.record.request.id.clone();
        let (store, held, lease) = (self.store.clone(), self.lease.clone(), self.config.lease);
        let renew = async {
            // Past its lease another handler may take the replay over: the run stops by then
            // rather than publish beside it, whether or not a renewal is still on its way. The
            // lease was taken no later than when this run began, and a renewal extends it
            // from no earlier than when it was sent.
            let mut expires = tokio::time::Instant::now() + lease;
            loop {
                tokio::time::sleep((lease / 3).max(Duration::from_millis(10))).await;
                let sent = tokio::time::Instant::now();
                match tokio::time::timeout_at(expires, store.renew(&id, &held, lease)).await {
                    Err(_) => {
                        tracing::warn!(replay = %id, "the replay's lease ran out before it could be renewed");
                        return;
                    }
                    Ok(Ok(true)) => expires = sent + lease,
                    Ok(Ok(false)) => return,
                    Ok(Err(err)) => {
                        tracing::warn!(replay = %id, error = %err, "renewing the replay's lease failed");
                        if tokio::time::Instant::now() >= expires {
                            return;
                        }
                    }
                }
            }
        };
        let outcome = tokio::select! {
            // A panic in the run ends the replay failed (resumable), never leaves it running.
            outcome = AssertUnwindSafe(self.drive()).catch_unwind() => {
                outcome.unwrap_or_else(|panic| Err(panicked("replay", &*panic)))
            }
            () = renew => Ok(Stop::LeaseLost),
        };
        let outcome = match outcome {
            Err(err) if err.kind() == ErrorKind::AlreadySettled && self.lost => Ok(Stop::LeaseLost),
            other => other,
        };
        let mut final_record = match outcome {
            Ok(Stop::LeaseLost) => {
                tracing::warn!(replay = %id, "another handler took the replay over; this one stops");
                return;
            }
            Ok(Stop::Interrupted) => {
                tracing::info!(replay = %id, "replay interrupted by shutdown; it resumes from its checkpoint");
                if let Err(err) = self.store.release(&id, &self.lease).await {
                    tracing::warn!(replay = %id, error = %err, "releasing the replay failed; another handler takes it once the lease runs out");
                }
                return;
            }
            Ok(stop) => {
                let mut progress = self.progress.lock();
                progress.status = match stop {
                    Stop::Cancelled => ReplayStatus::Cancelled,
                    _ => ReplayStatus::Completed,
                };
                progress.finished_at = Some(SystemTime::now());
                ReplayRecord {
                    request: self.record.request.clone(),
                    progress: progress.clone(),
                    checkpoint: self.record.checkpoint.clone(),
                }
            }
            Err(err) => {
                // Back to what is durable, so the counts match the checkpoint a resume
                // starts from.
                let mut record = self.record.clone();
                record.progress.status = ReplayStatus::Failed;
                record.progress.last_error = Some(err.to_string());
                record.progress.finished_at = Some(SystemTime::now());
                record.progress.resumes = self.progress.lock().resumes;
                *self.progress.lock() = record.progress.clone();
                tracing::warn!(replay = %id, error = %err, "replay failed; resumable from its checkpoint");
                record
            }
        };
        match self.store.save(&final_record, &self.lease).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(replay = %id, "another handler took the replay over before it finished here; its record is that handler's");
                return;
            }
            Err(err) => {
                tracing::warn!(replay = %id, error = %err, "the replay's final state could not be stored");
                final_record.progress.last_error = Some(err.to_string());
                *self.progress.lock() = final_record.progress.clone();
            }
        }
        if let Err(err) = self.store.release(&id, &self.lease).await {
            tracing::warn!(replay = %id, error = %err, "releasing the finished replay failed");
        }
        let p = &final_record.progress;
        tracing::info!(replay = %id, status = p.status.as_str(), total = p.total, replayed = p.replayed, skipped = p.skipped, failed = p.failed, "replay finished");
    }

    async fn drive(&mut self) -> Result<Stop> {
        let request = self.record.request.clone();
        let range = TimeRange::new(request.from_time, request.to_time)?;
        let options = request.options.clone();
        let resume_from = self.record.checkpoint.frontier.clone();
        let published_before = match self.record.checkpoint.in_flight_since {
            Some(since) if !options.dry_run => self.find_published(since).await?,
            _ => HashSet::new(),
        };
        let mut state = State {
            frontier: resume_from.clone(),
            batch: Vec::with_capacity(options.batch_size),
            published_before,
            seen: HashSet::new(),
            last_checkpoint: Instant::now(),
        };
        let mut source = Source {
            stream: read_ahead(
                self.broker.read_range(&request.topic, range).await?,
                options.batch_size.max(READ_AHEAD),
            ),
            ended: false,
            index: 0,
            staged: std::collections::VecDeque::new(),
        };
        let copies = Copies::of(&request);
        // An undecodable entry has no position to compare with the checkpoint. In the
        // stream's order, those before an entry the checkpoint covers were counted by the
        // run that took it; those after the last covered entry were not (a checkpoint is
        // taken right after an entry). So on a resume they are held back until the next
        // entry says which side of the frontier they are on. Exact for a source read in
        // position order, which is every backend that yields undecodable entries (Redis
        // Streams: one stream, in id order).
        let mut past_frontier = resume_from.is_empty();
        let mut held_back: Vec<Error> = Vec::new();
        loop {
            let item = match source.staged.pop_front() {
                Some(item) => {
                    if self.shutdown.is_cancelled() {
                        return Ok(Stop::Interrupted);
                    }
                    if self.cancel.is_cancelled() {
                        return Ok(Stop::Cancelled);
                    }
                    item
                }
                None if source.ended => break,
                None => {
                    let item = tokio::select! {
                        biased;
                        () = self.shutdown.cancelled() => return Ok(Stop::Interrupted),
                        () = self.cancel.cancelled() => return Ok(Stop::Cancelled),
                        item = source.stream.next() => item,
                    };
                    let Some(item) = item else { break };
                    source.prepare(item)
                }
            };
            let prepared = match item {
                Ok(prepared) => prepared,
                // One entry the backend cannot decode: it cannot be replayed, the rest can.
                Err(err) if err.kind() == ErrorKind::Serialization => {
                    if past_frontier {
                        self.count_undecodable(std::slice::from_ref(&err));
                    } else {
                        held_back.push(err);
                    }
                    continue;
                }
                Err(err) => return Err(err),
            };
            let (entry, partition, mark) = (&prepared.entry, prepared.partition, prepared.mark);
            if resume_from
                .get(&partition)
                .is_some_and(|done| mark <= *done)
            {
                if options.skip_duplicates {
                    state.seen.insert(id_hash(entry.message.id()));
                }
                // Before a covered entry: counted by the run that checkpointed it.
                held_back.clear();
                continue;
            }
            if !past_frontier {
                past_frontier = true;
                self.count_undecodable(&std::mem::take(&mut held_back));
            }
            state.frontier.insert(partition, mark);
            // Dealt with here (skipped, or published by a previous run) rather than batched.
            let settled = {
                let mut progress = self.progress.lock();
                progress.reached = Some(entry.recorded_at);
                let kind = type_of(&entry.message);
                let filtered = !request.filter.matches(&entry.message);
                if filtered
                    || (options.skip_duplicates && !state.seen.insert(id_hash(entry.message.id())))
                {
                    progress.total += 1;
                    progress.skipped += 1;
                    if filtered {
                        progress.filtered += 1;
                    } else {
                        progress.duplicates += 1;
                    }
                    bump(&mut progress.skipped_by_type, kind, 1);
                    true
                } else if !state.published_before.is_empty()
                    && state.published_before.remove(&prepared.position)
                {
                    progress.total += 1;
                    progress.replayed += 1;
                    bump(&mut progress.by_type, kind, 1);
                    true
                } else {
                    false
                }
            };
            if settled {
                // A long stretch of skipped entries is checkpointed too, when nothing is
                // batched (the frontier is then exactly what was dealt with).
                if state.batch.is_empty() {
                    self.checkpoint(&mut state, false).await?;
                }
                continue;
            }
            state.batch.push(prepared);
            if state.batch.len() >= options.batch_size {
                // The next batch is read, and its copies made, while this one is confirmed;
                // it is dealt with (counted, checkpointed) only after.
                let ahead = (!options.dry_run).then_some(&copies);
                source
                    .read_during(self.flush(&mut state, &copies), options.batch_size, ahead)
                    .await?;
                self.checkpoint(&mut state, false).await?;
                if !options.delay_between.is_zero() {
                    tokio::select! {
                        biased;
                        () = self.shutdown.cancelled() => return Ok(Stop::Interrupted),
                        () = self.cancel.cancelled() => return Ok(Stop::Cancelled),
                        () = tokio::time::sleep(options.delay_between) => {}
                    }
                }
            }
        }
        self.count_undecodable(&held_back);
        self.flush(&mut state, &copies).await?;
        self.checkpoint(&mut state, true).await?;
        Ok(Stop::Completed)
    }

    /// Count entries the backend could not decode as dealt with, failed.
    fn count_undecodable(&self, errors: &[Error]) {
        let Some(last) = errors.last() else { return };
        let mut progress = self.progress.lock();
        progress.total += errors.len() as u64;
        progress.failed += errors.len() as u64;
        progress.last_error = Some(last.to_string());
    }

    /// Write `record` under the run's lease.
    ///
    /// # Errors
    /// The store's error, or [`ErrorKind::AlreadySettled`] (with `lost` set) when another
    /// handler has taken the replay over: this run must stop without writing or publishing
    /// more.
    async fn save(&mut self, record: &ReplayRecord) -> Result<()> {
        if self.store.save(record, &self.lease).await? {
            return Ok(());
        }
        self.lost = true;
        Err(Error::new(
            ErrorKind::AlreadySettled,
            format!("replay {}: another handler took it over", record.request.id),
        ))
    }

    /// Make the progress durable when the interval has passed (or `force`). Only called
    /// with an empty batch, so the frontier is exactly what was dealt with.
    async fn checkpoint(&mut self, state: &mut State, force: bool) -> Result<()> {
        if !force && state.last_checkpoint.elapsed() < self.config.checkpoint_interval {
            return Ok(());
        }
        let mut record = ReplayRecord {
            request: self.record.request.clone(),
            progress: self.progress.lock().clone(),
            checkpoint: self.record.checkpoint.clone(),
        };
        record.checkpoint.frontier = state.frontier.clone();
        // Copies of a previous run not met again yet must still be looked for next time.
        if state.published_before.is_empty() {
            record.checkpoint.in_flight_since = None;
        }
        self.save(&record).await?;
        self.record = record;
        state.last_checkpoint = Instant::now();
        Ok(())
    }

    /// Publish the batch (or, in a dry run, count it) and count the outcome.
    async fn flush(&mut self, state: &mut State, copies: &Copies) -> Result<()> {
        if state.batch.is_empty() {
            return Ok(());
        }
        let mut batch = std::mem::take(&mut state.batch);
        let mut refused = vec![false; batch.len()];
        if !self.record.request.options.dry_run {
            if self.record.checkpoint.in_flight_since.is_none() {
                // Durable before the first copy goes out: a resumed run looks for copies
                // from here on.
                let mut record = self.record.clone();
                record.checkpoint.in_flight_since = Some(SystemTime::now());
                self.save(&record).await?;
                self.record = record;
            }
            refused = self.publish(&mut batch, copies).await?;
        }
        let mut progress = self.progress.lock();
        for (pending, failed) in batch.iter().zip(refused) {
            progress.total += 1;
            if failed {
                progress.failed += 1;
            } else {
                progress.replayed += 1;
                bump(&mut progress.by_type, type_of(&pending.entry.message), 1);
            }
        }
        drop(progress);
        state.batch = batch;
        state.batch.clear();
        Ok(())
    }

    /// Publish copies of `batch`, retrying transient failures; which ones the broker refused
    /// for good (counted failed: no retry can publish them).
    ///
    /// A broker that stops taking messages fails the rest of the batch (the
    /// [`Publisher::publish_batch`](crate::Publisher::publish_batch) contract), so what is
    /// retried is the failed suffix, in order, and per-key order holds in the target. A
    /// timeout is ambiguous (the broker may have taken the message): before a retry, the
    /// target is searched for the copies such a batch published (by replay id and source
    /// position, as a resume does), and those found are not published again; so is any other
    /// transient failure, since a connection lost after the broker took a copy looks the
    /// same. A copy the broker takes but shows only after the search (a slow replica) can
    /// still be published twice.
    ///
    /// # Errors
    /// The last error when a copy still fails transiently after
    /// [`ReplayConfig::publish_attempts`]: the replay stops (resumable from its checkpoint,
    /// which never moves past an unpublished copy) rather than count it failed.
    async fn publish(&self, batch: &mut [Prepared], copies: &Copies) -> Result<Vec<bool>> {
        let target = &copies.target;
        let mut refused = vec![false; batch.len()];
        let mut pending: Vec<usize> = (0..batch.len()).collect();
        let mut delays = ExponentialBuilder::default()
            .with_min_delay(self.config.retry_delay)
            .with_max_times(self.config.publish_attempts.saturating_sub(1))
            .build();
        loop {
            // A copy made ahead goes out on the first attempt, stamped now: a resumed run
            // looks for copies from the in-flight mark on, which may be later than when it
            // was made (a broker such as Kafka reads a time range by the copies' own
            // timestamps). A retry makes a fresh one.
            let now = SystemTime::now();
            let messages = pending
                .iter()
                .map(|&i| {
                    let p = &mut batch[i];
                    match p.copy.take() {
                        Some(copy) => copy.with_timestamp(now),
                        None => copies.make(&p.entry.message, &p.position),
                    }
                })
                .collect();
            let report = self.broker.publish_batch(target, messages).await;
            let mut retry = Vec::new();
            let mut transient: Option<Error> = None;
            for (j, err) in report.failures() {
                let i = pending[*j];
                if err.is_retryable() {
                    retry.push(i);
                    transient = Some(err.copy_without_source());
                } else {
                    refused[i] = true;
                    self.progress.lock().last_error = Some(err.to_string());
                }
            }
            // A timeout, or a connection lost while the confirmation was on its way
            // (RabbitMQ): the broker may have taken the copy.
            if !retry.is_empty()
                && let Some(since) = self.record.checkpoint.in_flight_since
            {
                let published = self.find_published(since).await?;
                retry.retain(|&i| !published.contains(&batch[i].position));
            }
            let Some(err) = transient.filter(|_| !retry.is_empty()) else {
                return Ok(refused);
            };
            retry.sort_unstable();
            match delays.next() {
                Some(delay) => tokio::time::sleep(delay).await,
                None => return Err(err),
            }
            pending = retry;
        }
    }

    /// Source positions of the copies this replay published to the target since `since`
    /// (a previous run's in-flight mark).
    async fn find_published(&self, since: SystemTime) -> Result<HashSet<String>> {
        let skew = self.config.clock_skew;
        let from = since.checked_sub(skew).unwrap_or(since);
        let range = TimeRange::new(from, SystemTime::now() + skew)?;
        let id = self.record.request.id.as_str();
        let mut copies = self
            .broker
            .read_range(&self.record.request.target(), range)
            .await?;
        let mut found = HashSet::new();
        while let Some(entry) = copies.next().await {
            let entry = match entry {
                Ok(entry) => entry,
                Err(err) if err.kind() == ErrorKind::Serialization => continue,
                Err(err) => return Err(err),
            };
            let message = &entry.message;
            if message.header(HEADER_REPLAY_ID) == Some(id)
                && let Some(position) = message.header(HEADER_SOURCE_POSITION)
            {
                found.insert(position.to_owned());
            }
        }
        tracing::info!(
            replay = id,
            copies = found.len(),
            "copies published after the last checkpoint found in the target"
        );
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(position: Option<Position>) -> HistoryEntry {
        HistoryEntry {
            message: Arc::new(Message::new("x")),
            recorded_at: SystemTime::now(),
            position,
        }
    }

    #[test]
    fn positions_become_marks_ordered_within_their_partition() {
        let kafka = |offset| {
            position_mark(
                &at(Some(Position::Offset {
                    partition: 3,
                    offset,
                })),
                9,
            )
        };
        assert_eq!(kafka(41), (3, (41, 0)));
        assert!(kafka(41).1 < kafka(42).1);
        let redis = |id: &str| position_mark(&at(Some(Position::StreamId(id.into()))), 9);
        assert_eq!(redis("1700000000123-4"), (0, (1_700_000_000_123, 4)));
        assert!(redis("1700000000123-9").1 < redis("1700000000124-0").1);
        assert_eq!(
            position_mark(&at(Some(Position::Sequence(7))), 9),
            (0, (7, 0))
        );
        // No usable position: the index in the window.
        assert_eq!(position_mark(&at(None), 9), (i32::MIN, (9, 0)));
        assert_eq!(
            position_mark(&at(Some(Position::StreamId("garbage".into()))), 5),
            (i32::MIN, (5, 0))
        );
    }

    #[test]
    fn a_position_key_names_partition_and_mark() {
        assert_eq!(position_key(3, (41, 0)), "3:41:0");
        assert_eq!(
            position_key(i32::MIN, (u64::MAX, 7)),
            format!("{}:{}:7", i32::MIN, u64::MAX)
        );
        assert_eq!(
            millis(std::time::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123)),
            "1700000000123"
        );
    }

    #[test]
    fn counts_by_type_accumulate() {
        let mut counts = std::collections::BTreeMap::new();
        bump(&mut counts, "a", 1);
        bump(&mut counts, "a", 2);
        bump(&mut counts, UNTYPED, 1);
        assert_eq!(counts.get("a"), Some(&3));
        assert_eq!(counts.get(UNTYPED), Some(&1));
        assert_eq!(type_of(&Message::new("x")), UNTYPED);
        assert_eq!(type_of(&Message::new("x").with_header("type", "t")), "t");
    }
}
