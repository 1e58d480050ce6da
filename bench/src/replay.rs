//! Replay on the broker `MESSAGING_BACKEND` names (memory by default; Redis needs
//! `redis-streams`, RabbitMQ `RABBITMQ_REPLAY_JOURNAL=true`).
//!
//! - `replay`: a replay of an N-message window into a target topic (batches of 100, progress
//!   checkpointed in memory and in SQLite) against plain `publish_batch` of the same N
//!   messages in batches of 100, same broker, same run.
//! - `replay-peak`: one replay of a window of N messages (default 1,000,000), reporting the
//!   process's resident memory before it and its peak while it ran.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use helix_messaging::Broker;
use helix_messaging::memory::{MemoryBroker, MemoryConfig};
use helix_messaging::replay::{
    ReplayConfig, ReplayHandler, ReplayOptions, ReplayRequest, ReplayStatus, ReplayStore,
    SqliteReplayStore,
};

use crate::leftovers::{self, fresh};
use crate::measure::{Batching, Clock, Options, Run, histogram, publish_batches, report};

/// Both the window and its copies stay in the memory broker's log.
async fn broker(messages: usize) -> Arc<dyn Broker> {
    if leftovers::backend() == "memory" {
        return Arc::new(MemoryBroker::with_config(MemoryConfig {
            retention_messages: messages + 1,
            retention_age: None,
            ..MemoryConfig::default()
        }));
    }
    leftovers::broker().await
}

/// Publish the window: `n` messages, timed as the plain `publish_batch` side.
async fn publish_window(broker: &Arc<dyn Broker>, topic: &str, options: &Options) -> Run {
    let started = Instant::now();
    let latency = publish_batches(
        broker.as_ref(),
        topic,
        options.messages,
        Batching::whole(100),
        Clock::new(options.size),
    )
    .await;
    Run {
        messages: options.messages,
        elapsed: started.elapsed(),
        latency,
    }
}

/// Replay everything recorded in `[from, to)` of `topic` into `target`; the replay's own
/// time.
async fn replay(
    broker: &Arc<dyn Broker>,
    store: Arc<dyn ReplayStore>,
    (topic, target): (&str, &str),
    (from, to): (SystemTime, SystemTime),
    expected: usize,
    dry_run: bool,
) -> Run {
    let handler = ReplayHandler::open(broker.clone(), ReplayConfig::default(), store)
        .await
        .expect("replay handler");
    let started = Instant::now();
    let request = ReplayRequest::new(topic, from, to)
        .with_target_topic(target)
        .with_options(ReplayOptions {
            batch_size: 100,
            dry_run,
            ..ReplayOptions::default()
        });
    let id = handler.start_replay(request).await.expect("start").id;
    let done = handler.wait(&id).await.expect("replay");
    assert_eq!(done.status, ReplayStatus::Completed, "{done:?}");
    assert_eq!(done.replayed as usize, expected, "{done:?}");
    Run {
        messages: expected,
        elapsed: started.elapsed(),
        latency: histogram(),
    }
}

fn temp_dir(what: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("helix-bench-{what}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

pub(crate) async fn compare(options: &Options) {
    let backend = leftovers::backend();
    println!(
        "replay on {backend}: a window of {} messages x {} B into a target topic, batches of 100, {} runs each",
        options.messages, options.size, options.runs
    );
    let dir = temp_dir("replay");
    let (mut plain, mut memory, mut sqlite) = (Vec::new(), Vec::new(), Vec::new());
    for run in 1..=options.runs {
        let broker = broker(options.messages * 3).await;
        let topic = fresh("window");
        let from = SystemTime::now() - Duration::from_secs(1);
        let p = publish_window(&broker, &topic, options).await;
        let window = (from, SystemTime::now() + Duration::from_secs(1));
        println!("run {run}: {}", p.line("plain publish_batch 100"));
        plain.push(p);
        // Each replay's copies stay until the run ends (in RabbitMQ's journal, until the
        // scenario's last run), so the second replay of a run publishes into a fuller
        // broker: the two checkpoint stores take turns going first.
        let sqlite_first = run % 2 == 0;
        let targets = [fresh("replayed"), fresh("replayed"), fresh("dry-run")];
        for (with_sqlite, target) in [sqlite_first, !sqlite_first].into_iter().zip(&targets) {
            let store: Arc<dyn ReplayStore> = if with_sqlite {
                let path = dir.join(format!("run-{run}.sqlite"));
                Arc::new(SqliteReplayStore::open(path).await.expect("sqlite"))
            } else {
                Arc::new(helix_messaging::replay::MemoryReplayStore::new())
            };
            let r = replay(
                &broker,
                store,
                (&topic, target),
                window,
                options.messages,
                false,
            )
            .await;
            let (label, runs) = if with_sqlite {
                ("replay, SQLite checkpoints", &mut sqlite)
            } else {
                ("replay, memory checkpoints", &mut memory)
            };
            println!("run {run}: {}", r.line(label));
            runs.push(r);
        }
        let d = replay(
            &broker,
            Arc::new(helix_messaging::replay::MemoryReplayStore::new()),
            (&topic, &targets[2]),
            window,
            options.messages,
            true,
        )
        .await;
        println!("run {run}: {}", d.line("dry run (reading only)"));
        let _ = broker.close().await;
        // The dry run made no topic.
        for made in [&topic, &targets[0], &targets[1]] {
            leftovers::remove_topic(made, &[]).await;
        }
    }
    leftovers::remove_exchange().await;
    report(
        "plain publish_batch 100",
        plain.clone(),
        "replay, memory checkpoints",
        memory,
    );
    report(
        "plain publish_batch 100",
        plain,
        "replay, SQLite checkpoints",
        sqlite,
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A `/proc/self/status` field in KiB.
fn status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

pub(crate) async fn peak_memory(options: &Options) {
    let backend = leftovers::backend();
    println!(
        "replay peak memory on {backend}: a window of {} messages x {} B, batches of 100, SQLite checkpoints",
        options.messages, options.size
    );
    let broker = broker(options.messages * 2).await;
    let topic = fresh("window");
    let from = SystemTime::now() - Duration::from_secs(1);
    let published = publish_window(&broker, &topic, options).await;
    println!("{}", published.line("window published"));
    let window = (from, SystemTime::now() + Duration::from_secs(1));
    let dir = temp_dir("replay-peak");
    let target = fresh("replayed");
    // On the memory backend the broker's own log keeps every copy, which is the broker's
    // memory, not the replay's: a dry run first shows what the replay itself holds.
    let passes: &[bool] = if backend == "memory" {
        &[true, false]
    } else {
        &[false]
    };
    for &dry_run in passes {
        let before = status_kib("VmRSS:").unwrap_or(0);
        // Resets the peak to the current size, so the peak read afterwards is the replay's.
        let reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
        let store = SqliteReplayStore::open(dir.join(format!("peak-{dry_run}.sqlite")))
            .await
            .expect("sqlite");
        let run = replay(
            &broker,
            Arc::new(store),
            (&topic, &target),
            window,
            options.messages,
            dry_run,
        )
        .await;
        let peak = status_kib("VmHWM:").unwrap_or(0);
        let label = if dry_run {
            "dry run, SQLite checkpoints"
        } else {
            "replay, SQLite checkpoints"
        };
        println!("{}", run.line(label));
        println!(
            "  resident memory: {:.1} MiB before, peak {:.1} MiB while it ran ({}), +{:.1} MiB",
            before as f64 / 1024.0,
            peak as f64 / 1024.0,
            if reset {
                "peak reset before it"
            } else {
                "peak of the whole process: /proc/self/clear_refs refused"
            },
            peak.saturating_sub(before) as f64 / 1024.0
        );
    }
    if backend == "memory" {
        println!(
            "(the in-process broker's log holds the window and, after the replay, its copies)"
        );
    }
    let _ = broker.close().await;
    for made in [&topic, &target] {
        leftovers::remove_topic(made, &[]).await;
    }
    leftovers::remove_exchange().await;
    let _ = std::fs::remove_dir_all(&dir);
}
