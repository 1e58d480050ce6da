//! The messaging hub on HelixAgent's topology: LLM tasks to a worker group, debate events to
//! an audit group, a task past its deadline dead-lettered, health and metrics.
//!
//! Runs on the embedded memory broker with no setup:
//!
//! ```text
//! cargo run -p helix-messaging-examples --bin hub
//! ```
//!
//! and on HelixAgent's hybrid with `MESSAGING_TASK_BACKEND=rabbitmq MESSAGING_EVENT_BACKEND=kafka
//! cargo run -p helix-messaging-examples --features rabbitmq,kafka --bin hub` (or any backends
//! with consumer groups; `MESSAGING_FALLBACK_ENABLED=true` spools publishes while a broker is
//! away).

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use helix_messaging::hub::{Event, Task};
use helix_messaging::{ErrorKind, Result};

const TASKS: &str = "helixagent.tasks.llm";
const EVENTS: &str = "helixagent.events.debates";

#[tokio::main]
async fn main() -> ExitCode {
    helix_messaging_examples::run_main("error", run()).await
}

async fn run() -> Result<()> {
    let hub = helix_messaging::hub_from_env().await?;
    println!(
        "tasks on {}, events on {}",
        hub.task_broker().name(),
        hub.event_broker().name()
    );
    let handled = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = handled.clone();
    let workers = hub
        .subscribe_tasks(TASKS, move |task: Task, _| {
            let counter = counter.clone();
            async move {
                println!(
                    "worker: task {} ({}, priority {})",
                    task.id, task.kind, task.priority
                );
                counter.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
        })
        .await?;
    let counter = seen.clone();
    let audit = hub
        .subscribe_events(
            EVENTS,
            move |event: Event, _| {
                let counter = counter.clone();
                async move {
                    println!(
                        "audit: {} from {} about {} at {}",
                        event.kind,
                        event.source,
                        event.subject.as_deref().unwrap_or("-"),
                        event.time.to_rfc3339()
                    );
                    counter.fetch_add(1, Ordering::Relaxed);
                    Ok(())
                }
            },
            "audit",
        )
        .await?;

    for (i, model) in ["helix-ensemble", "gemini", "claude"].iter().enumerate() {
        let task = Task::new(
            "completion",
            serde_json::json!({ "model": model, "messages": [{ "role": "user", "content": "hello" }] }),
        )
        .with_priority(u8::try_from(i * 4).unwrap_or(10));
        hub.publish_task(TASKS, &task).await?;
    }
    let late = Task::new("completion", serde_json::json!({ "model": "late" }))
        .with_deadline(chrono::Utc::now() - chrono::Duration::seconds(1));
    hub.publish_task(TASKS, &late).await?;
    for round in 1..=2 {
        let event = Event::new(
            "debate.round.completed",
            "debate-service",
            serde_json::json!({ "debate_id": "debate-789", "round": round, "responses": 5 }),
        )
        .with_subject("debate-789");
        hub.publish_event(EVENTS, &event).await?;
    }

    let deadline = Instant::now() + Duration::from_secs(30);
    while handled.load(Ordering::Relaxed) < 3
        || seen.load(Ordering::Relaxed) < 2
        || hub.metrics().tasks_expired < 1
    {
        if Instant::now() > deadline {
            return Err(helix_messaging::Error::new(
                ErrorKind::Timeout,
                format!(
                    "the hub did not handle everything within 30 s: {:?}",
                    hub.metrics()
                ),
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let health = hub.health_check().await;
    println!(
        "health: {:?} (tasks: {}; events: {})",
        health.status, health.tasks.detail, health.events.detail
    );
    println!("metrics: {:?}", hub.metrics());
    println!("the late task went to the DLQ with reason \"deadline exceeded\"");
    workers.shutdown().await;
    audit.shutdown().await;
    hub.close().await
}
