//! The dead-letter flow end to end: a worker with retry and dead-lettering, a DLQ processor
//! keeping the dead letters in a durable SQLite store, and the management plane (list, failure
//! groups, reprocess, discard, a canary bulk redrive).
//!
//! Runs on the embedded memory broker with no setup:
//!
//! ```text
//! cargo run -p helix-messaging-examples --bin dlq
//! ```
//!
//! and on any compiled-in backend with consumer groups when `MESSAGING_BACKEND` names it
//! (for example `MESSAGING_BACKEND=redis-streams cargo run -p helix-messaging-examples
//! --features redis --bin dlq`). `HELIX_DLQ_STORE` names the SQLite file (default: a fresh
//! file in the temporary directory).

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use helix_messaging::dlq::{
    CanaryConfig, DeadLetterConfig, DeadLetterFilter, DeadLetterLayer, DeadLetterQueue, Processor,
    ProcessorConfig, RedriveRequest, SqliteDeadLetterStore,
};
use helix_messaging::retry::{RetryLayer, RetryPolicy};
use helix_messaging::{
    Broker, Envelope, ErrorKind, HandlerError, Message, Result, Runner, json_handler,
};

const QUEUE: &str = "helixagent.tasks.llm";

#[derive(serde::Deserialize)]
struct LlmRequest {
    prompt: String,
    #[serde(default)]
    provider: String,
}

#[tokio::main]
async fn main() -> ExitCode {
    helix_messaging_examples::run_main("error", run()).await
}

async fn wait_for_depth(processor: &Processor, depth: u64) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while processor.stats().await?.depth != depth {
        if Instant::now() > deadline {
            return Err(helix_messaging::Error::new(
                ErrorKind::Timeout,
                format!("the DLQ did not reach {depth} entries within 30 s"),
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

async fn run() -> Result<()> {
    let broker: Arc<dyn Broker> = helix_messaging::from_env().await?;
    let caps = broker.capabilities();
    println!("backend: {}", broker.name());
    if !caps.consumer_groups || !caps.redelivery {
        return Err(helix_messaging::Error::unsupported(
            broker.name(),
            "this example: dead-lettering needs consumer groups and redelivery (try memory, redis-streams, rabbitmq or kafka)",
        ));
    }
    // Fresh names per run, so a shared broker's leftovers do not mix in.
    let run = uuid_suffix();
    let queue = format!("{QUEUE}.{run}");
    let dlq_topic = format!("helixagent.dlq.{run}");
    let store_path = std::env::var("HELIX_DLQ_STORE").map_or_else(
        |_| std::env::temp_dir().join(format!("helix-dlq-example-{run}.sqlite")),
        Into::into,
    );
    let store = Arc::new(SqliteDeadLetterStore::open(&store_path).await?);
    println!("DLQ store: {}", store_path.display());

    // The processor first: its group on the DLQ topic must exist before anything fails.
    let processor = Processor::new(
        broker.clone(),
        store.clone(),
        ProcessorConfig {
            topics: vec![dlq_topic.clone()],
            poll_interval: Duration::from_millis(200),
            // Re-drives are left to the operator below.
            auto_redrive: false,
            ..ProcessorConfig::default()
        },
    )?;
    processor.start().await?;

    // The worker: JSON payloads, the provider "flaky" fails until it is "fixed", 2 retries
    // with backoff, then the DLQ.
    let fixed = Arc::new(AtomicBool::new(false));
    let is_fixed = fixed.clone();
    let worker = Runner::builder(broker.clone(), queue.clone())
        .group("llm-workers")
        .layer(DeadLetterLayer::new(
            DeadLetterQueue::new(broker.clone(), DeadLetterConfig::new(&dlq_topic)?)
                .with_processor(&processor),
        ))
        .layer(RetryLayer::new(
            RetryPolicy::new()
                .with_max_retries(2)
                .with_retry_delay(Duration::from_millis(100))
                .with_max_retry_delay(Duration::from_millis(400)),
        )?)
        .start(json_handler(
            move |request: LlmRequest, envelope: Envelope| {
                let is_fixed = is_fixed.clone();
                async move {
                    if request.provider == "flaky" && !is_fixed.load(Ordering::SeqCst) {
                        return Err(HandlerError::transient(std::io::Error::other(format!(
                            "provider {} timed out (attempt {})",
                            request.provider, envelope.info.attempt
                        ))));
                    }
                    if request.prompt.is_empty() {
                        return Err(HandlerError::permanent(std::io::Error::other(
                            "empty prompt",
                        )));
                    }
                    println!(
                        "  handled {:?} (attempt {})",
                        request.prompt, envelope.info.attempt
                    );
                    Ok(())
                }
            },
        ))
        .await?;

    let requests = [
        r#"{"prompt": "summarise the debate", "provider": "gemini"}"#,
        r#"{"prompt": "verify provider", "provider": "flaky"}"#,
        r#"{"prompt": "rank answers", "provider": "flaky"}"#,
        r#"{"prompt": "", "provider": "gemini"}"#,
        r#"{"prompt": "truncated"#,
    ];
    println!("publishing {} requests to {queue}", requests.len());
    for body in requests {
        broker
            .publish(
                &queue,
                Message::new(body).with_header("type", "llm.request"),
            )
            .await?;
    }
    // Two flaky ones after their retries, the empty prompt and the undecodable payload.
    wait_for_depth(&processor, 4).await?;

    let page = processor.list(&DeadLetterFilter::default(), 10, 0).await?;
    println!("\nDLQ: {} entries", page.count);
    for entry in &page.entries {
        let l = &entry.letter;
        println!(
            "  {} [{}] {} after {} attempt(s): {}",
            l.id,
            entry.status.as_str(),
            l.reason,
            l.attempts,
            l.error
        );
    }
    println!("\nfailures by reason:");
    for group in processor
        .failure_groups(&DeadLetterFilter::default())
        .await?
    {
        println!("  {:>3} × {} on {}", group.count, group.reason, group.topic);
    }

    // The operator discards what can never work and fixes the provider.
    for entry in &page.entries {
        if !entry.letter.reason.worth_redriving() {
            processor
                .discard(entry.id(), "bad input, reported upstream")
                .await?;
        }
    }
    fixed.store(true, Ordering::SeqCst);
    println!("\nprovider fixed; bulk redrive with a canary of 1:");
    let job = processor
        .start_redrive(RedriveRequest {
            filter: DeadLetterFilter {
                status: Some(helix_messaging::dlq::EntryStatus::Pending),
                ..DeadLetterFilter::default()
            },
            rate_per_second: Some(50.0),
            canary: Some(CanaryConfig {
                count: 1,
                watch: Duration::from_millis(500),
            }),
            ..RedriveRequest::default()
        })
        .await?;
    let progress = loop {
        let progress = processor.redrive_progress(&job.id)?;
        if progress.status.is_finished() {
            break progress;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!(
        "redrive {}: {} of {} re-driven, {} failed",
        progress.status.as_str(),
        progress.redriven,
        progress.total,
        progress.failed
    );
    // Let the worker handle the re-driven requests before stopping.
    tokio::time::sleep(Duration::from_millis(500)).await;
    worker.shutdown().await;
    processor.stop().await;
    let stats = processor.stats().await?;
    let metrics = processor.metrics();
    println!(
        "\nDLQ depth {} (parked {}); processed {}, discarded {}",
        stats.depth, stats.parked, metrics.messages_processed, metrics.messages_discarded
    );
    broker.close().await?;
    if std::env::var_os("HELIX_DLQ_STORE").is_none() {
        helix_messaging_examples::remove_sqlite_files(&store_path);
    }
    Ok(())
}

fn uuid_suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("{}-{nanos:x}", std::process::id())
}
