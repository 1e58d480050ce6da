//! Publishes numbered tasks or events through the hub (configured from the environment like
//! any hub program: `MESSAGING_TASK_BACKEND`, `MESSAGING_EVENT_BACKEND`,
//! `MESSAGING_FALLBACK_ENABLED`, …), printing every publish's outcome, then waits until its
//! fallback spool is forwarded. It is the publisher of the fallback drill
//! (`examples/tests/fallback_drill.rs`), and a way to watch the spool at work by hand:
//!
//! ```text
//! MESSAGING_TASK_BACKEND=rabbitmq MESSAGING_FALLBACK_ENABLED=true \
//!   cargo run -p helix-messaging-examples --features rabbitmq --bin spool_publisher -- \
//!   tasks helixagent.tasks.background run1 0 10000
//! ```
//!
//! Arguments: `tasks|events <queue or topic> <run> <from> <to>`. Message `i` of `from..to`
//! has the id `<run>-<i>`, so a restarted publisher sends the one it may have been killed
//! in the middle of again under the same id. Every tenth task has a deadline 500 ms after
//! it was made (it expires if an outage holds it longer); every tenth event carries
//! `"poison": true` in its data. Output, one line each: `ok <i>`, `rejected <i> <error>`,
//! then `published <ok> <rejected>`, then `drained` once the spool is empty. The wait for
//! the spool is bounded by `SPOOL_PUBLISHER_DRAIN_SECS` (default 300).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use helix_messaging::hub::{Event, Hub, Task};
use helix_messaging::{Error, Result};

#[tokio::main]
async fn main() -> ExitCode {
    helix_messaging_examples::run_main("error", run()).await
}

/// What to publish.
enum Kind {
    Tasks,
    Events,
}

fn usage(problem: &str) -> Error {
    Error::invalid_input(format!(
        "{problem}; usage: spool_publisher tasks|events <queue or topic> <run> <from> <to>"
    ))
}

async fn run() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [kind, topic, run, from, to] = args.as_slice() else {
        return Err(usage("five arguments expected"));
    };
    let kind = match kind.as_str() {
        "tasks" => Kind::Tasks,
        "events" => Kind::Events,
        other => return Err(usage(&format!("unknown kind {other:?}"))),
    };
    let number = |s: &str| {
        s.parse::<u64>()
            .map_err(|_| usage(&format!("{s:?} is not a number")))
    };
    let (from, to) = (number(from)?, number(to)?);
    let drain_limit = match std::env::var("SPOOL_PUBLISHER_DRAIN_SECS") {
        Ok(v) => Duration::from_secs(v.trim().parse().map_err(|_| {
            Error::config("SPOOL_PUBLISHER_DRAIN_SECS", format!("not a number: {v:?}"))
        })?),
        Err(_) => Duration::from_secs(300),
    };

    let hub = helix_messaging::hub_from_env().await?;
    let (mut ok, mut rejected) = (0u64, 0u64);
    for i in from..to {
        let id = format!("{run}-{i}");
        let outcome = match kind {
            Kind::Tasks => {
                let mut task = Task::new("drill", serde_json::json!({ "n": i }));
                task.id = id;
                if i % 10 == 0 {
                    let deadline = task.created_at + chrono::Duration::milliseconds(500);
                    task = task.with_deadline(deadline);
                }
                hub.publish_task(topic, &task).await
            }
            Kind::Events => {
                let mut event = Event::new(
                    "drill.published",
                    "spool-publisher",
                    serde_json::json!({ "n": i, "poison": i % 10 == 0 }),
                )
                .with_subject(format!("drill-{}", i % 16));
                event.id = id;
                hub.publish_event(topic, &event).await
            }
        };
        // stdout is line-buffered: each outcome is out before the next publish starts.
        match outcome {
            Ok(()) => {
                ok += 1;
                println!("ok {i}");
            }
            Err(err) => {
                rejected += 1;
                println!("rejected {i} {err}");
            }
        }
    }
    println!("published {ok} {rejected}");
    wait_drained(&hub, drain_limit).await?;
    println!("drained");
    hub.close().await
}

/// Wait until neither side's spool holds anything.
async fn wait_drained(hub: &Hub, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        let stats = hub.spool_stats().await?;
        let held = stats.tasks.map_or(0, |s| s.depth) + stats.events.map_or(0, |s| s.depth);
        if held == 0 {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(Error::new(
                helix_messaging::ErrorKind::Timeout,
                format!("{held} publishes still spooled after {limit:?}"),
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
