//! Time-range replay end to end: a dry run that counts what a filtered replay would publish,
//! the replay itself (skipping duplicate ids, checkpointed in the DLQ's SQLite file), a
//! cancelled one, and the list of replays.
//!
//! Runs on the embedded memory broker with no setup:
//!
//! ```text
//! cargo run -p helix-messaging-examples --bin replay
//! ```
//!
//! and on any compiled-in backend that keeps history when `MESSAGING_BACKEND` names it (for
//! example `MESSAGING_BACKEND=kafka cargo run -p helix-messaging-examples --features kafka
//! --bin replay`; Redis needs `redis-streams`, RabbitMQ `RABBITMQ_REPLAY_JOURNAL=true`).
//! `HELIX_REPLAY_STORE` names the SQLite file (default: a fresh file in the temporary
//! directory).

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use helix_messaging::dlq::SqliteDeadLetterStore;
use helix_messaging::replay::{
    ReplayConfig, ReplayFilter, ReplayHandler, ReplayOptions, ReplayProgress, ReplayRequest,
    ReplayStatus,
};
use helix_messaging::{Broker, ErrorKind, Message, Result, TimeRange};

const TOPIC: &str = "helixagent.events.llm.responses";

#[tokio::main]
async fn main() -> ExitCode {
    helix_messaging_examples::run_main("error", run()).await
}

/// `count` LLM events, a third of them from gemini, every fifth a request rather than a
/// response.
fn events(label: &str, count: usize) -> Vec<Message> {
    (0..count)
        .map(|i| {
            let provider = ["gemini", "openai", "claude"][i % 3];
            let kind = if i % 5 == 0 {
                "llm.request"
            } else {
                "llm.response"
            };
            Message::new(format!(
                r#"{{"n":{i},"phase":"{label}","provider":"{provider}"}}"#
            ))
            .with_key(format!("session-{}", i % 8))
            .with_content_type("application/json")
            .with_header("type", kind)
            .with_header("provider", provider)
        })
        .collect()
}

fn show(what: &str, p: &ReplayProgress) {
    println!(
        "{what}: {}, {} total, {} replayed {} skipped ({} filtered, {} duplicates) {} failed, {:.0}%",
        p.status.as_str(),
        p.total,
        p.replayed,
        p.skipped,
        p.filtered,
        p.duplicates,
        p.failed,
        p.percentage()
    );
}

async fn count_copies(broker: &Arc<dyn Broker>, target: &str, since: SystemTime) -> Result<usize> {
    let range = TimeRange::new(since, SystemTime::now() + Duration::from_secs(5))?;
    let mut copies = broker.read_range(target, range).await?;
    let mut n = 0;
    while let Some(entry) = copies.next().await {
        entry?;
        n += 1;
    }
    Ok(n)
}

async fn run() -> Result<()> {
    let broker: Arc<dyn Broker> = helix_messaging::from_env().await?;
    println!("backend: {}", broker.name());
    let run_id = format!(
        "{:x}",
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis()
    );
    let topic = format!("{TOPIC}.{run_id}");

    // A history in three parts; the middle part is the window to replay.
    let gap = Duration::from_millis(200);
    broker
        .publish_batch(&topic, events("before", 100))
        .await
        .into_result()?;
    tokio::time::sleep(gap).await;
    let from = SystemTime::now();
    let mut window = events("window", 300);
    // A producer that retried: 30 of the window's events arrive twice.
    window.extend(window[..30].to_vec());
    broker.publish_batch(&topic, window).await.into_result()?;
    tokio::time::sleep(gap).await;
    let to = SystemTime::now();
    broker
        .publish_batch(&topic, events("after", 100))
        .await
        .into_result()?;
    println!("published 530 events to {topic}; the window holds 330 of them");

    let path = std::env::var("HELIX_REPLAY_STORE").map_or_else(
        |_| std::env::temp_dir().join(format!("helix-replay-example-{run_id}.sqlite")),
        Into::into,
    );
    // The DLQ's SQLite file keeps the replay checkpoints too.
    let store = SqliteDeadLetterStore::open(&path)
        .await?
        .replay_store()
        .await?;
    println!("checkpoints in {}", path.display());
    let replays =
        match ReplayHandler::open(broker.clone(), ReplayConfig::default(), Arc::new(store)).await {
            Ok(handler) => handler,
            Err(err) => return Err(err),
        };

    // 1. A dry run of the filtered replay: counts, nothing published.
    let gemini = ReplayFilter {
        message_types: vec!["llm.response".into()],
        headers: [("provider".to_owned(), "gemini".to_owned())].into(),
    };
    let target = format!("{topic}.replay");
    let dry = ReplayRequest::new(&topic, from, to)
        .with_id(format!("dry-{run_id}"))
        .with_target_topic(&target)
        .with_filter(gemini.clone())
        .with_options(ReplayOptions {
            dry_run: true,
            skip_duplicates: true,
            ..ReplayOptions::default()
        });
    let started = match replays.start_replay(dry).await {
        Err(err) if err.kind() == ErrorKind::Unsupported => {
            println!("{err}");
            return Err(err);
        }
        other => other?,
    };
    let dry = replays.wait(&started.id).await?;
    show("dry run", &dry);
    println!(
        "  would replay by type: {:?}; would skip by type: {:?}",
        dry.by_type, dry.skipped_by_type
    );

    // 2. The replay itself.
    let since = SystemTime::now() - Duration::from_secs(1);
    let request = ReplayRequest::new(&topic, from, to)
        .with_id(format!("gemini-{run_id}"))
        .with_target_topic(&target)
        .with_filter(gemini)
        .with_options(ReplayOptions {
            batch_size: 20,
            delay_between: Duration::from_millis(10),
            skip_duplicates: true,
            ..ReplayOptions::default()
        });
    let started = replays.start_replay(request).await?;
    let done = loop {
        let p = replays.replay_progress(&started.id).await?;
        if p.status.is_finished() {
            break p;
        }
        show("  replaying", &p);
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    show("replay", &done);
    let copies = count_copies(&broker, &target, since).await?;
    println!(
        "  {target} holds {copies} copies (the dry run said {})",
        dry.replayed
    );
    if done.status != ReplayStatus::Completed || copies as u64 != dry.replayed {
        return Err(helix_messaging::Error::new(
            ErrorKind::Backend,
            "the replay did not publish what the dry run counted",
        ));
    }

    // 3. A slow replay of everything, cancelled after its first batches.
    let slow = ReplayRequest::new(&topic, from, to)
        .with_id(format!("slow-{run_id}"))
        .with_target_topic(format!("{topic}.slow"))
        .with_options(ReplayOptions {
            batch_size: 10,
            delay_between: Duration::from_millis(100),
            ..ReplayOptions::default()
        });
    let slow = replays.start_replay(slow).await?;
    tokio::time::sleep(Duration::from_millis(250)).await;
    replays.cancel_replay(&slow.id).await?;
    show("cancelled replay", &replays.wait(&slow.id).await?);

    // 4. Every replay the store knows.
    for p in replays.list_replays().await? {
        println!(
            "listed: {} {} replayed {} of {}",
            p.id,
            p.status.as_str(),
            p.replayed,
            p.total
        );
    }
    broker.close().await?;
    if std::env::var_os("HELIX_REPLAY_STORE").is_none() {
        helix_messaging_examples::remove_sqlite_files(&path);
    }
    Ok(())
}
