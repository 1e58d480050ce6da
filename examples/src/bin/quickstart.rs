//! Quick start: publish tasks and events, consume them with the handler runner, watch a failed
//! task come back as a redelivery.
//!
//! Runs on the embedded memory broker with no setup:
//!
//! ```text
//! cargo run -p helix-messaging-examples --bin quickstart
//! ```
//!
//! and on any compiled-in backend when `MESSAGING_BACKEND` names it.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use helix_messaging::{Envelope, HandlerError, Message, Runner, SubscribeOptions, handler_fn};

const TASKS: &str = "helixagent.tasks.background";
const EVENTS: &str = "helixagent.events.audit";

#[tokio::main]
async fn main() -> ExitCode {
    helix_messaging_examples::run_main("warn", run()).await
}

async fn run() -> helix_messaging::Result<()> {
    let broker = helix_messaging::from_env().await?;
    println!(
        "backend: {} ({:?})",
        broker.name(),
        broker.health().await.status
    );
    // The example adapts to what the backend can do instead of assuming it: without
    // consumer groups every subscription gets its own copy, without redelivery a failed
    // task cannot come back.
    let caps = broker.capabilities();
    let options = |group: &str| SubscribeOptions {
        group: caps.consumer_groups.then(|| group.to_owned()),
        ..SubscribeOptions::default()
    };

    // Tasks: one worker group sharing the work. Subscribing first creates the group, so
    // nothing published below is missed.
    let log: Arc<Mutex<BTreeMap<String, Vec<u32>>>> = Arc::default();
    let worker_log = log.clone();
    let redelivery = caps.redelivery;
    let workers = Runner::builder(broker.clone(), TASKS)
        .options(options("helixagent-workers"))
        .concurrency(4)
        .start(handler_fn(move |task: Envelope| {
            let log = worker_log.clone();
            async move {
                let name = String::from_utf8_lossy(task.message.payload()).into_owned();
                let attempt = task.info.attempt;
                log.lock()
                    .expect("log lock")
                    .entry(name.clone())
                    .or_default()
                    .push(attempt);
                if name == "flaky-report" && attempt == 1 && redelivery {
                    println!("task {name:<14} attempt {attempt}: failed, will be redelivered");
                    return Err(HandlerError::transient("report service not ready yet"));
                }
                println!(
                    "task {name:<14} attempt {attempt}: done (priority {})",
                    task.message.priority()
                );
                Ok(())
            }
        }))
        .await?;

    // Events: two independent groups, each sees every event.
    let mut audit = broker.subscribe(EVENTS, options("audit-log")).await?;
    let mut analytics = broker
        .subscribe(EVENTS, options("analytics-workers"))
        .await?;

    for (name, priority) in [("send-email", 5), ("flaky-report", 10), ("resize-image", 1)] {
        broker
            .publish(
                TASKS,
                Message::new(name)
                    .with_priority(priority)
                    .with_header("type", "task"),
            )
            .await?;
    }
    let events: Vec<Message> = ["user.signed_up", "user.upgraded"]
        .into_iter()
        .map(|kind| {
            Message::new(format!("{{\"event\":\"{kind}\"}}"))
                .with_content_type("application/json")
                .with_header("type", kind)
        })
        .collect();
    broker
        .publish_batch(EVENTS, events.clone())
        .await
        .into_result()?;

    for (group, sub) in [
        ("audit-log", &mut audit),
        ("analytics-workers", &mut analytics),
    ] {
        for _ in 0..events.len() {
            let delivery = tokio::time::timeout(Duration::from_secs(10), sub.next())
                .await
                .map_err(|_| {
                    helix_messaging::Error::new(
                        helix_messaging::ErrorKind::Timeout,
                        "no event within 10 s",
                    )
                })?
                .ok_or_else(|| helix_messaging::Error::closed("the event subscription"))??;
            println!(
                "event {:<15} -> group {group}",
                delivery.message().header("type").unwrap_or("?")
            );
            delivery.ack().await?;
        }
    }

    // Wait (bounded) until every task has been handled, including the redelivery.
    let all_done = tokio::time::timeout(Duration::from_secs(10), async {
        while workers.report().acked < 3 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let report = workers.shutdown().await;
    println!(
        "workers: {} acked, {} requeued, {} rejected",
        report.acked, report.requeued, report.rejected
    );
    for (task, attempts) in log.lock().expect("log lock").iter() {
        println!("  {task:<14} attempts {attempts:?}");
    }
    broker.close().await?;
    if all_done.is_err() {
        return Err(helix_messaging::Error::new(
            helix_messaging::ErrorKind::Timeout,
            format!("tasks not all handled within 10 s: {report:?}"),
        ));
    }
    Ok(())
}
