//! Cases for time-range replay over a real broker's history.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use helix_messaging_core::replay::{
    self, MemoryReplayStore, ReplayConfig, ReplayFilter, ReplayHandler, ReplayOptions,
    ReplayProgress, ReplayRequest, ReplayStatus, ReplayStore,
};
use helix_messaging_core::{ErrorKind, HistoryEntry, Message, Result, TimeRange};

use crate::helpers::{Ctx, eventually, fresh_name};

const HOUR: Duration = Duration::from_secs(3600);

/// Every entry of `topic`'s history recorded in `range`, within the receive timeout.
async fn history(ctx: &Ctx, topic: &str, range: TimeRange) -> Result<Vec<HistoryEntry>> {
    let entries = tokio::time::timeout(
        ctx.settings.receive_timeout * 2,
        ctx.broker
            .read_range(topic, range)
            .await?
            .collect::<Vec<_>>(),
    )
    .await
    .unwrap_or_else(|_| panic!("reading the history of {topic} did not finish in time"));
    entries.into_iter().collect()
}

/// Everything `topic` has recorded from the Unix epoch to an hour from now.
async fn everything(ctx: &Ctx, topic: &str) -> Result<Vec<HistoryEntry>> {
    history(
        ctx,
        topic,
        TimeRange::new(UNIX_EPOCH, SystemTime::now() + HOUR)?,
    )
    .await
}

/// Publish `messages` to `topic`, one batch, all accepted.
async fn publish_all(ctx: &Ctx, topic: &str, messages: Vec<Message>) -> Result<()> {
    ctx.broker
        .publish_batch(topic, messages)
        .await
        .into_result()
}

/// Publish `messages` to `topic`; a window (with a second's margin each side) that holds
/// them all.
async fn publish_window(ctx: &Ctx, topic: &str, messages: Vec<Message>) -> Result<TimeRange> {
    let from = SystemTime::now() - Duration::from_secs(1);
    publish_all(ctx, topic, messages).await?;
    TimeRange::new(from, SystemTime::now() + Duration::from_secs(1))
}

/// `n` messages numbered in their payload, keyed by `key(i)`.
fn numbered(n: usize, key: impl Fn(usize) -> String) -> Vec<Message> {
    (0..n)
        .map(|i| Message::new(format!("m {i}")).with_key(key(i)))
        .collect()
}

/// A history of three hours (by message timestamp, one message every three minutes) with
/// types, regions, keys and a trace context; returns the messages in publish order.
fn three_hours_of_orders(now: SystemTime) -> Vec<Message> {
    (0..60u64)
        .map(|i| {
            let kind = ["order.created", "order.cancelled", ""][(i % 3) as usize];
            let mut m = Message::new(format!("order {i}"))
                .with_key(format!("customer-{}", i % 4))
                .with_timestamp(now - 3 * HOUR + Duration::from_secs(180 * i))
                .with_header("region", if i % 2 == 0 { "eu" } else { "us" })
                .with_header(
                    "traceparent",
                    format!("00-{:032x}-{:016x}-01", i + 1, i + 1),
                );
            if !kind.is_empty() {
                m = m.with_header("type", kind);
            }
            m
        })
        .collect()
}

/// The window of `entries` (by the times the backend recorded) from the 20th to the 40th:
/// exactly the middle hour where the backend records message timestamps (Kafka, RabbitMQ),
/// the middle batch where it records append times.
fn middle_hour(entries: &[HistoryEntry]) -> Result<TimeRange> {
    let mut times: Vec<SystemTime> = entries.iter().map(|e| e.recorded_at).collect();
    times.sort();
    TimeRange::new(times[20], times[40])
}

fn ids_in(
    entries: &[HistoryEntry],
    range: TimeRange,
    keep: impl Fn(&Message) -> bool,
) -> Vec<String> {
    entries
        .iter()
        .filter(|e| range.contains(e.recorded_at) && keep(&e.message))
        .map(|e| e.message.id().to_owned())
        .collect()
}

async fn finished(handler: &ReplayHandler, id: &str, within: Duration) -> Result<ReplayProgress> {
    let progress = tokio::time::timeout(within, handler.wait(id))
        .await
        .unwrap_or_else(|_| panic!("replay {id} did not finish within {within:?}"))?;
    Ok(progress)
}

fn assert_adds_up(progress: &ReplayProgress) {
    assert_eq!(
        progress.replayed + progress.skipped + progress.failed,
        progress.total,
        "replayed + skipped + failed == total: {progress:?}"
    );
    assert_eq!(
        progress.filtered + progress.duplicates,
        progress.skipped,
        "skipped is filtered + duplicates: {progress:?}"
    );
    assert_eq!(
        progress.by_type.values().sum::<u64>(),
        progress.replayed,
        "by_type adds up to replayed: {progress:?}"
    );
}

/// Copies in `target` published by replay `id`, in the order the target recorded them.
async fn copies(ctx: &Ctx, target: &str, id: &str) -> Result<Vec<HistoryEntry>> {
    Ok(everything(ctx, target)
        .await?
        .into_iter()
        .filter(|e| e.message.header(replay::HEADER_REPLAY_ID) == Some(id))
        .collect())
}

/// Per key, the ids in the order given.
fn by_key<'a>(messages: impl Iterator<Item = &'a Message>) -> BTreeMap<String, Vec<String>> {
    let mut keys: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for m in messages {
        keys.entry(m.key().unwrap_or_default().to_owned())
            .or_default()
            .push(m.id().to_owned());
    }
    keys
}

/// A one-hour window out of three hours of history is replayed exactly: every message in it
/// and nothing else, keys, payloads and trace context kept, order per key kept, with the
/// replay's headers; type and header filters take exactly their subset; a dry run counts by
/// type and publishes nothing.
pub async fn replay_copies_exactly_the_window(ctx: Ctx) -> Result<()> {
    let topic = ctx.topic("replay-source");
    let sent = three_hours_of_orders(SystemTime::now());
    // Three batches with gaps between: where the backend records append times (memory,
    // Redis) the hours are told apart by these gaps.
    for hour in sent.chunks(20) {
        publish_all(&ctx, &topic, hour.to_vec()).await?;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let recorded = everything(&ctx, &topic).await?;
    assert_eq!(recorded.len(), sent.len(), "the whole history reads back");
    let window = middle_hour(&recorded)?;
    let handler = ReplayHandler::new(ctx.broker.clone(), ReplayConfig::default());
    let limit = ctx.settings.receive_timeout * 4;

    // Everything in the window.
    let target = ctx.topic("replay-all");
    let all = ReplayRequest::new(&topic, window.from(), window.to())
        .with_target_topic(&target)
        .with_options(ReplayOptions {
            batch_size: 7,
            ..ReplayOptions::default()
        });
    let started = handler.start_replay(all).await?;
    let done = finished(&handler, &started.id, limit).await?;
    let expected = ids_in(&recorded, window, |_| true);
    assert_eq!(expected.len(), 20, "the window holds 20 of the 60 messages");
    assert_eq!(done.status, ReplayStatus::Completed, "{done:?}");
    assert_eq!(
        (done.total, done.replayed, done.skipped, done.failed),
        (20, 20, 0, 0)
    );
    assert_adds_up(&done);
    assert_eq!(done.percentage(), 100.0);
    let got = copies(&ctx, &target, &started.id).await?;
    let originals: HashMap<&str, &Message> = sent.iter().map(|m| (m.id(), m)).collect();
    let mut got_ids: Vec<String> = got.iter().map(|e| e.message.id().to_owned()).collect();
    got_ids.sort();
    let mut want = expected.clone();
    want.sort();
    assert_eq!(got_ids, want, "exactly the window, each once");
    for copy in &got {
        let m = &copy.message;
        let original = originals[m.id()];
        assert_eq!(m.payload(), original.payload());
        assert_eq!(m.key(), original.key(), "key kept");
        assert_eq!(
            m.header("traceparent"),
            original.header("traceparent"),
            "trace context kept"
        );
        assert_eq!(m.header("type"), original.header("type"));
        assert_eq!(m.header(replay::HEADER_SOURCE_TOPIC), Some(topic.as_str()));
        let original_ms = original
            .timestamp()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis();
        assert_eq!(
            m.header(replay::HEADER_ORIGINAL_TIMESTAMP),
            Some(original_ms.to_string().as_str())
        );
    }
    let in_window: Vec<&Message> = sent
        .iter()
        .filter(|m| expected.iter().any(|id| id == m.id()))
        .collect();
    assert_eq!(
        by_key(got.iter().map(|e| &*e.message)),
        by_key(in_window.into_iter()),
        "per-key order kept"
    );

    // Type and header filters.
    let target = ctx.topic("replay-filtered");
    let filter = ReplayFilter {
        message_types: vec!["order.created".into()],
        headers: [("region".to_owned(), "eu".to_owned())].into(),
    };
    let filtered = ReplayRequest::new(&topic, window.from(), window.to())
        .with_target_topic(&target)
        .with_filter(filter.clone());
    let started = handler.start_replay(filtered).await?;
    let done = finished(&handler, &started.id, limit).await?;
    let expected = ids_in(&recorded, window, |m| filter.matches(m));
    assert!(
        !expected.is_empty() && expected.len() < 20,
        "the filter takes a strict subset"
    );
    assert_eq!(done.replayed, expected.len() as u64, "{done:?}");
    assert_eq!(done.filtered, 20 - expected.len() as u64, "{done:?}");
    assert_adds_up(&done);
    let mut got: Vec<String> = copies(&ctx, &target, &started.id)
        .await?
        .iter()
        .map(|e| e.message.id().to_owned())
        .collect();
    got.sort();
    let mut want = expected;
    want.sort();
    assert_eq!(got, want, "exactly the filtered subset");
    for entry in copies(&ctx, &target, &started.id).await? {
        assert_eq!(entry.message.header("type"), Some("order.created"));
        assert_eq!(entry.message.header("region"), Some("eu"));
    }

    // A dry run.
    let target = ctx.topic("replay-dry");
    let dry = ReplayRequest::new(&topic, window.from(), window.to())
        .with_target_topic(&target)
        .with_filter(ReplayFilter {
            message_types: vec!["order.created".into(), "order.cancelled".into()],
            ..ReplayFilter::default()
        })
        .with_options(ReplayOptions {
            dry_run: true,
            ..ReplayOptions::default()
        });
    let started = handler.start_replay(dry).await?;
    let done = finished(&handler, &started.id, limit).await?;
    assert!(done.dry_run);
    assert_adds_up(&done);
    let count = |kind: &str| {
        recorded
            .iter()
            .filter(|e| window.contains(e.recorded_at) && e.message.header("type") == Some(kind))
            .count() as u64
    };
    let mut by_type = BTreeMap::new();
    by_type.insert("order.cancelled".to_owned(), count("order.cancelled"));
    by_type.insert("order.created".to_owned(), count("order.created"));
    assert_eq!(done.by_type, by_type, "what would be replayed, by type");
    let untyped = 20 - count("order.created") - count("order.cancelled");
    assert_eq!(
        done.skipped_by_type,
        [(replay::UNTYPED.to_owned(), untyped)].into(),
        "what would be skipped"
    );
    assert!(
        everything(&ctx, &target).await?.is_empty(),
        "a dry run publishes nothing"
    );
    Ok(())
}

/// With `skip_duplicates`, a message id seen before in the window is skipped and counted.
pub async fn replay_skips_duplicate_ids(ctx: Ctx) -> Result<()> {
    let topic = ctx.topic("replay-dups");
    let target = ctx.topic("replay-dups-target");
    let originals = numbered(20, |_| "k".into());
    let mut sent = originals.clone();
    // Every other one again, as a producer retrying would.
    sent.extend(originals.iter().step_by(2).cloned());
    let window = publish_window(&ctx, &topic, sent).await?;
    let handler = ReplayHandler::new(ctx.broker.clone(), ReplayConfig::default());
    let request = ReplayRequest::new(&topic, window.from(), window.to())
        .with_target_topic(&target)
        .with_options(ReplayOptions {
            skip_duplicates: true,
            batch_size: 6,
            ..ReplayOptions::default()
        });
    let started = handler.start_replay(request).await?;
    let done = finished(&handler, &started.id, ctx.settings.receive_timeout * 4).await?;
    assert_eq!(
        (done.total, done.replayed, done.duplicates),
        (30, 20, 10),
        "{done:?}"
    );
    assert_adds_up(&done);
    let got: Vec<String> = copies(&ctx, &target, &started.id)
        .await?
        .iter()
        .map(|e| e.message.id().to_owned())
        .collect();
    let want: Vec<String> = originals.iter().map(|m| m.id().to_owned()).collect();
    assert_eq!(got, want, "each id once, in order");
    Ok(())
}

/// A cancelled replay stops within one batch: what it published is what its progress says,
/// and nothing is published afterwards.
pub async fn replay_cancel_stops_within_one_batch(ctx: Ctx) -> Result<()> {
    let topic = ctx.topic("replay-cancel");
    let target = ctx.topic("replay-cancel-target");
    let window = publish_window(&ctx, &topic, numbered(60, |_| "k".into())).await?;
    let handler = ReplayHandler::new(ctx.broker.clone(), ReplayConfig::default());
    let request = ReplayRequest::new(&topic, window.from(), window.to())
        .with_target_topic(&target)
        .with_options(ReplayOptions {
            batch_size: 5,
            delay_between: Duration::from_millis(300),
            ..ReplayOptions::default()
        });
    let started = handler.start_replay(request).await?;
    let id = started.id.clone();
    let at_cancel = eventually(
        ctx.settings.receive_timeout * 2,
        "the first batch replayed",
        || {
            let handler = handler.clone();
            let id = id.clone();
            async move {
                let p = handler.replay_progress(&id).await.ok()?;
                (p.replayed >= 5).then_some(p.replayed)
            }
        },
    )
    .await;
    handler.cancel_replay(&id).await?;
    let done = finished(&handler, &id, ctx.settings.receive_timeout).await?;
    assert_eq!(done.status, ReplayStatus::Cancelled, "{done:?}");
    assert!(
        done.replayed <= at_cancel + 5,
        "stopped within one batch of the cancel: {} replayed, {at_cancel} at the cancel",
        done.replayed
    );
    assert!(done.replayed < 60, "stopped before the end");
    assert_adds_up(&done);
    // Give a runaway publisher the time of several batches to show itself.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let published = copies(&ctx, &target, &id).await?.len() as u64;
    assert_eq!(
        published, done.replayed,
        "published exactly what the progress says"
    );
    assert_eq!(
        handler.replay_progress(&id).await?.status,
        ReplayStatus::Cancelled
    );
    let listed = handler.list_replays().await?;
    assert!(listed.iter().any(|p| p.id == id), "the replay is listed");
    Ok(())
}

/// A replay stopped by a restart (its handler shut down mid-run, a new one opened on the
/// same store) resumes and completes, publishing every message of the window exactly once,
/// also those published after its last checkpoint; a second handler sharing the store while
/// the first runs it leaves it alone.
pub async fn replay_resumes_after_restart_without_duplicates(ctx: Ctx) -> Result<()> {
    let topic = ctx.topic("replay-resume");
    let target = ctx.topic("replay-resume-target");
    let sent = numbered(80, |i| format!("k{}", i % 3));
    let window = publish_window(&ctx, &topic, sent.clone()).await?;
    let store: Arc<dyn ReplayStore> = Arc::new(MemoryReplayStore::new());
    // Checkpoints an hour apart: after the first batch, every copy published before the
    // restart is known only from the target itself.
    let config = ReplayConfig {
        checkpoint_interval: HOUR,
        ..ReplayConfig::default()
    };
    let first = ReplayHandler::open(ctx.broker.clone(), config.clone(), store.clone()).await?;
    let request = ReplayRequest::new(&topic, window.from(), window.to())
        .with_id(fresh_name("resume"))
        .with_target_topic(&target)
        .with_options(ReplayOptions {
            batch_size: 5,
            delay_between: Duration::from_millis(100),
            skip_duplicates: true,
            ..ReplayOptions::default()
        });
    let id = first.start_replay(request).await?.id;
    // Another handler on the same store while the first runs it: it must leave it alone.
    let bystander = ReplayHandler::open(ctx.broker.clone(), config.clone(), store.clone()).await?;
    eventually(
        ctx.settings.receive_timeout * 2,
        "some batches replayed",
        || {
            let first = first.clone();
            let id = id.clone();
            async move { (first.replay_progress(&id).await.ok()?.replayed >= 20).then_some(()) }
        },
    )
    .await;
    first.shutdown(ctx.settings.receive_timeout).await?;
    let before = copies(&ctx, &target, &id).await?.len();
    assert!(
        (20..80).contains(&before),
        "stopped midway: {before} copies"
    );
    let stored = store.load(&id).await?.expect("the replay is stored");
    assert_eq!(
        stored.progress.status,
        ReplayStatus::Running,
        "stored as running"
    );

    // The bystander (whose sweep may take it over first) and a restarted handler: between
    // them the replay resumes once and completes.
    let second = ReplayHandler::open(ctx.broker.clone(), config, store.clone()).await?;
    let done = finished(&second, &id, ctx.settings.receive_timeout * 4).await?;
    drop(bystander);
    assert_eq!(done.status, ReplayStatus::Completed, "{done:?}");
    assert_eq!(done.resumes, 1);
    assert_eq!((done.total, done.replayed), (80, 80), "{done:?}");
    assert_adds_up(&done);
    let got = copies(&ctx, &target, &id).await?;
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for entry in &got {
        *counts.entry(entry.message.id()).or_default() += 1;
    }
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "published twice after the restart: {twice:?}"
    );
    assert_eq!(counts.len(), 80, "every message of the window published");
    assert_eq!(
        by_key(got.iter().map(|e| &*e.message)),
        by_key(sent.iter()),
        "per-key order kept across the restart"
    );
    Ok(())
}

/// Replay is refused as `Unsupported`, naming the backends that keep history, exactly where
/// the backend does not declare `replay_by_time`; elsewhere an empty window completes.
pub async fn replay_is_declared_honestly(ctx: Ctx) -> Result<()> {
    let topic = ctx.topic("replay-honest");
    let handler = ReplayHandler::new(ctx.broker.clone(), ReplayConfig::default());
    let now = SystemTime::now();
    let request = ReplayRequest::new(&topic, now - HOUR, now - HOUR + Duration::from_secs(1))
        .with_target_topic(ctx.topic("replay-honest-target"));
    let started = handler.start_replay(request).await;
    if ctx.broker.capabilities().replay_by_time {
        let started = started?;
        let done = finished(&handler, &started.id, ctx.settings.receive_timeout * 2).await?;
        assert_eq!(
            (done.status, done.total),
            (ReplayStatus::Completed, 0),
            "{done:?}"
        );
    } else {
        let err = started.expect_err("replay without history must be refused");
        assert_eq!(err.kind(), ErrorKind::Unsupported, "{err}");
        let text = err.to_string();
        for named in [
            "memory",
            "kafka",
            "MESSAGING_BACKEND=redis-streams",
            "RABBITMQ_REPLAY_JOURNAL=true",
        ] {
            assert!(text.contains(named), "the error names {named}: {text}");
        }
    }
    Ok(())
}
