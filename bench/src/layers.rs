//! The reliability layers' cost on the memory backend, and the bulk redrive rate.
//!
//! - `layers`: the handler runner bare against the same runner with the full stack (a
//!   `DeadLetterLayer` around a `RetryLayer`), every message succeeding, same run.
//! - `redrive`: a bulk redrive job of N dead letters (memory store, and SQLite store) against
//!   plain `publish_batch` of the same N messages in the same batch size, on the broker
//!   `MESSAGING_BACKEND` names (memory by default).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use helix_messaging::dlq::{
    DeadLetter, DeadLetterConfig, DeadLetterLayer, DeadLetterQueue, DeadLetterReason,
    DeadLetterStore, MemoryDeadLetterStore, Processor, ProcessorConfig, RedriveRequest,
    SqliteDeadLetterStore, StoredDeadLetter,
};
use helix_messaging::memory::{MemoryBroker, MemoryConfig};
use helix_messaging::observe::ObservedBroker;
use helix_messaging::retry::{RetryLayer, RetryPolicy};
use helix_messaging::{
    Broker, DeliveryInfo, Envelope, Message, Runner, SubscribeOptions, handler_fn,
};

use crate::leftovers;
use crate::measure::{Batching, Clock, Options, Run, histogram, publish_batches, report};

const BATCH: usize = 1_000;

fn broker() -> Arc<dyn Broker> {
    Arc::new(MemoryBroker::with_config(MemoryConfig {
        max_queue_depth: 1_000_000,
        ..MemoryConfig::default()
    }))
}

/// What the runner runs on in [`run_through`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stack {
    /// The broker and the runner alone.
    Bare,
    /// A `DeadLetterLayer` around a `RetryLayer`.
    Layers,
    /// The broker in an `ObservedBroker` (metrics into an installed Prometheus recorder, and
    /// its spans, no tracing subscriber), publisher and runner alike.
    Observed,
}

/// Publish `options.messages` through the runner on `stack`; the time from the first
/// publish until the handler has seen every message.
async fn run_through(options: &Options, stack: Stack) -> Run {
    let clock = Clock::new(options.size);
    let broker = match stack {
        Stack::Observed => Arc::new(ObservedBroker::new(broker())) as Arc<dyn Broker>,
        Stack::Bare | Stack::Layers => broker(),
    };
    let topic = "bench.layers";
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = seen.clone();
    // Only a counter: per-message bookkeeping here would cost both sides alike and blur
    // what the layers cost.
    let handler = handler_fn(move |_envelope: Envelope| {
        let counter = counter.clone();
        async move {
            counter.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
    });
    let mut builder = Runner::builder(broker.clone(), topic)
        .group("bench")
        .concurrency(64)
        .options(SubscribeOptions::group("bench").with_prefetch(1_000));
    if stack == Stack::Layers {
        builder = builder
            .layer(DeadLetterLayer::new(DeadLetterQueue::new(
                broker.clone(),
                DeadLetterConfig::new("bench.dlq").expect("name"),
            )))
            .layer(RetryLayer::new(RetryPolicy::new()).expect("policy"));
    }
    let runner = builder.start(handler).await.expect("runner");
    let n = options.messages;
    let started = Instant::now();
    publish_batches(&*broker, topic, n, Batching::whole(BATCH), clock).await;
    while seen.load(Ordering::Relaxed) < n {
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    let elapsed = started.elapsed();
    runner.shutdown().await;
    Run {
        messages: n,
        elapsed,
        latency: histogram(),
    }
}

pub(crate) async fn compare_layers(options: &Options) -> f64 {
    println!(
        "runner on memory, bare vs retry + DLQ layers: {} messages x {} B, {} runs each, concurrency 64",
        options.messages, options.size, options.runs
    );
    // The metrics go where a service's would: into the Prometheus recorder the admin API
    // serves them from (without a recorder every metric call is a no-op).
    let _ = helix_messaging::admin::install_prometheus();
    let stacks = [
        (Stack::Bare, "bare runner"),
        (Stack::Layers, "runner + DLQ + retry layers"),
        (Stack::Observed, "runner on an ObservedBroker"),
    ];
    let mut runs: Vec<Vec<Run>> = stacks.iter().map(|_| Vec::new()).collect();
    for run in 1..=options.runs {
        // Rotating which goes first keeps warm-up from favouring one side.
        for i in 0..stacks.len() {
            let at = (i + run) % stacks.len();
            let (stack, label) = stacks[at];
            let r = run_through(options, stack).await;
            println!("run {run}: {}", r.line(label));
            runs[at].push(r);
        }
    }
    let bare = runs[0].clone();
    let layered = report(stacks[0].1, bare.clone(), stacks[1].1, runs[1].clone());
    let observed = report(stacks[0].1, bare, stacks[2].1, runs[2].clone());
    println!(
        "target: layers >= 0.95x the bare runner; measured {layered:.2}x (ObservedBroker: {observed:.2}x)"
    );
    layered
}

pub(crate) fn letters(n: usize, size: usize, topic: &str) -> Vec<DeadLetter> {
    let info = DeliveryInfo {
        topic: topic.into(),
        group: Some("bench".into()),
        attempt: 4,
        redelivered: true,
        position: None,
    };
    let payload = bytes::Bytes::from(vec![b'x'; size]);
    let now = SystemTime::now();
    (0..n)
        .map(|_| {
            DeadLetter::new(
                &Message::new(payload.clone()),
                &info,
                DeadLetterReason::MaxRetriesExceeded,
                "bench",
                now,
                now,
            )
        })
        .collect()
}

/// Redrive `options.messages` stored dead letters in one job; the job's own time.
async fn redrive_job(options: &Options, store: Arc<dyn DeadLetterStore>) -> Run {
    let broker = leftovers::broker().await;
    let topic = leftovers::fresh("redriven");
    for letter in letters(options.messages, options.size, &topic) {
        store
            .insert(StoredDeadLetter::received(letter, SystemTime::now()))
            .await
            .expect("insert");
    }
    // The group that receives the re-driven messages (so they are routed and counted).
    let sink = broker
        .subscribe(&topic, SubscribeOptions::group("sink"))
        .await
        .expect("subscribe");
    let processor = Processor::new(
        broker.clone(),
        store,
        ProcessorConfig {
            auto_redrive: false,
            ..ProcessorConfig::default()
        },
    )
    .expect("processor");
    let started = Instant::now();
    let job = processor
        .start_redrive(RedriveRequest {
            batch_size: 100,
            // Unpaced: the bench measures how fast a redrive can go.
            rate_per_second: None,
            ..RedriveRequest::default()
        })
        .await
        .expect("start");
    let progress = loop {
        let progress = processor.redrive_progress(&job.id).expect("job");
        if progress.status.is_finished() {
            break progress;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    assert_eq!(progress.redriven as usize, options.messages, "{progress:?}");
    let elapsed = started.elapsed();
    drop(sink);
    let _ = broker.close().await;
    leftovers::remove_topic(&topic, &["sink"]).await;
    Run {
        messages: options.messages,
        elapsed,
        latency: histogram(),
    }
}

async fn plain_batches(options: &Options) -> Run {
    let broker = leftovers::broker().await;
    let topic = leftovers::fresh("plain");
    let sink = broker
        .subscribe(&topic, SubscribeOptions::group("sink"))
        .await
        .expect("subscribe");
    let payload = bytes::Bytes::from(vec![b'x'; options.size]);
    let started = Instant::now();
    let mut sent = 0;
    while sent < options.messages {
        let count = 100.min(options.messages - sent);
        let messages = (0..count).map(|_| Message::new(payload.clone())).collect();
        broker
            .publish_batch(&topic, messages)
            .await
            .into_result()
            .expect("publish");
        sent += count;
    }
    let elapsed = started.elapsed();
    drop(sink);
    let _ = broker.close().await;
    leftovers::remove_topic(&topic, &["sink"]).await;
    Run {
        messages: options.messages,
        elapsed,
        latency: histogram(),
    }
}

pub(crate) async fn compare_redrive(options: &Options) {
    let backend = leftovers::backend();
    println!(
        "bulk redrive on {backend}: {} dead letters x {} B, batches of 100, {} runs each",
        options.messages, options.size, options.runs
    );
    let dir = std::env::temp_dir().join(format!("helix-bench-redrive-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let (mut plain, mut memory, mut sqlite) = (Vec::new(), Vec::new(), Vec::new());
    for run in 1..=options.runs {
        let p = plain_batches(options).await;
        println!("run {run}: {}", p.line("plain publish_batch 100"));
        plain.push(p);
        let m = redrive_job(options, Arc::new(MemoryDeadLetterStore::new())).await;
        println!("run {run}: {}", m.line("redrive job, memory store"));
        memory.push(m);
        let path = dir.join(format!("run-{run}.sqlite"));
        let store = SqliteDeadLetterStore::open(&path).await.expect("sqlite");
        let s = redrive_job(options, Arc::new(store)).await;
        println!("run {run}: {}", s.line("redrive job, SQLite store"));
        sqlite.push(s);
    }
    leftovers::remove_exchange().await;
    report(
        "plain publish_batch 100",
        plain.clone(),
        "redrive job, memory store",
        memory,
    );
    report(
        "plain publish_batch 100",
        plain,
        "redrive job, SQLite store",
        sqlite,
    );
    let _ = std::fs::remove_dir_all(&dir);
}
