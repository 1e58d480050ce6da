//! Memory backend end to end (publish → subscribe → ack) against raw `tokio::sync::mpsc`.

use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use helix_messaging::memory::{MemoryBroker, MemoryConfig};
use helix_messaging::{Broker, Message, Publisher, SubscribeOptions, Subscriber};
use tokio::sync::mpsc;

use crate::measure::{
    Clock, Options, PEAK_CALLERS, Run, Side, histogram, in_tasks, publish_concurrently,
    publish_through_window, report,
};

/// Queue bound shared by both sides, so neither buffers more than the other.
const CAPACITY: usize = 10_000;
const PREFETCH: usize = 1_000;

pub(crate) async fn raw_mpsc(options: &Options) -> Run {
    let clock = Clock::new(options.size);
    let (tx, rx) = mpsc::channel::<bytes::Bytes>(CAPACITY);
    let n = options.messages;
    let started = Instant::now();
    let producer = tokio::spawn(async move {
        for _ in 0..n {
            tx.send(clock.stamped_payload())
                .await
                .expect("receiver alive");
        }
    });
    let run = receive_all(rx, clock, started).await;
    producer.await.expect("producer");
    run
}

/// The raw side of the 256-callers row like for like: [`PEAK_CALLERS`] tasks, each with a
/// clone of the channel's sender, each sending one message at a time and timing every send
/// as [`publish_concurrently`] times every publish.
pub(crate) async fn raw_mpsc_senders(options: &Options) -> Run {
    let clock = Clock::new(options.size);
    let (tx, rx) = mpsc::channel::<bytes::Bytes>(CAPACITY);
    let n = options.messages;
    let started = Instant::now();
    let producers = tokio::spawn(async move {
        in_tasks(PEAK_CALLERS, n, move |_, count| {
            let tx = tx.clone();
            async move {
                let mut round_trips = histogram();
                for _ in 0..count {
                    let sent = Instant::now();
                    tx.send(clock.stamped_payload())
                        .await
                        .expect("receiver alive");
                    round_trips.saturating_record(sent.elapsed().as_nanos() as u64);
                }
                round_trips
            }
        })
        .await
    });
    let run = receive_all(rx, clock, started).await;
    producers.await.expect("producers");
    run
}

/// Receive until every sender is gone, recording each message's latency.
async fn receive_all(mut rx: mpsc::Receiver<bytes::Bytes>, clock: Clock, started: Instant) -> Run {
    let mut latency = histogram();
    let mut received = 0;
    while let Some(payload) = rx.recv().await {
        latency.saturating_record(clock.latency_ns(&payload));
        received += 1;
    }
    Run {
        messages: received,
        elapsed: started.elapsed(),
        latency,
    }
}

/// Publishing for [`memory_broker`]: `publish_batch` of this many (1: `publish`), one
/// `publish` at a time from each of `PEAK_CALLERS` tasks, or one `PublishWindow::send` per
/// message with the queue bound in flight.
#[derive(Clone, Copy)]
pub(crate) enum Publishing {
    Batches(usize),
    Concurrent,
    Window,
}

pub(crate) async fn memory_broker(options: &Options, publishing: Publishing) -> Run {
    let clock = Clock::new(options.size);
    let broker = Arc::new(MemoryBroker::with_config(MemoryConfig {
        max_queue_depth: CAPACITY,
        retention_messages: 100_000,
        ..MemoryConfig::default()
    }));
    let topic = "bench.memory";
    let mut sub = broker
        .subscribe(
            topic,
            SubscribeOptions::group("bench").with_prefetch(PREFETCH),
        )
        .await
        .expect("subscribe");
    let n = options.messages;
    let started = Instant::now();
    let producer = {
        let broker = broker.clone();
        tokio::spawn(async move {
            let batch = match publishing {
                Publishing::Batches(batch) => batch,
                Publishing::Concurrent => {
                    publish_concurrently(&*broker, topic, n, clock).await;
                    return;
                }
                Publishing::Window => {
                    publish_through_window(broker, topic, n, CAPACITY, clock).await;
                    return;
                }
            };
            let mut sent = 0;
            while sent < n {
                let count = batch.min(n - sent);
                if count == 1 {
                    let message = Message::new(clock.stamped_payload());
                    broker.publish(topic, message).await.expect("publish");
                } else {
                    let messages = (0..count)
                        .map(|_| Message::new(clock.stamped_payload()))
                        .collect();
                    broker
                        .publish_batch(topic, messages)
                        .await
                        .into_result()
                        .expect("publish batch");
                }
                sent += count;
            }
        })
    };
    let mut latency = histogram();
    let mut received = 0;
    while received < n {
        let delivery = sub.next().await.expect("open").expect("delivery");
        latency.saturating_record(clock.latency_ns(delivery.message().payload()));
        delivery.ack().await.expect("ack");
        received += 1;
    }
    producer.await.expect("producer");
    let elapsed = started.elapsed();
    broker.close().await.expect("close");
    Run {
        messages: received,
        elapsed,
        latency,
    }
}

pub(crate) async fn compare(options: &Options) -> f64 {
    println!(
        "memory end to end: {} messages x {} B, {} runs each, queue bound {CAPACITY}, prefetch {PREFETCH}",
        options.messages, options.size, options.runs
    );
    // At peak, helix's best public paths: large batches, and many concurrent callers.
    let mut ways = vec![
        ("memory (publish + ack)", Publishing::Batches(1)),
        ("memory (publish_batch 100 + ack)", Publishing::Batches(100)),
    ];
    if options.peak {
        ways.push((
            "memory (publish_batch 1000 + ack)",
            Publishing::Batches(1_000),
        ));
        ways.push(("memory (256 publish callers + ack)", Publishing::Concurrent));
        ways.push(("memory (publish window + ack)", Publishing::Window));
    }
    // `--filter` keeps the adapter ways whose label contains it (the raw side always runs).
    if let Some(filter) = options.filter.as_deref() {
        ways.retain(|(label, _)| label.contains(filter));
        assert!(
            !ways.is_empty(),
            "--filter {filter:?} matches no memory way"
        );
    }
    // The 256 callers are also measured against as many senders on the channel.
    let callers = ways
        .iter()
        .any(|(_, publishing)| matches!(publishing, Publishing::Concurrent));
    const SENDERS: &str = "raw tokio mpsc, 256 senders";
    // `--side`: one side alone, for a profiler; no ratio.
    if let Some(side) = options.side {
        for run in 1..=options.runs {
            if side == Side::Raw {
                println!(
                    "run {run}: {}",
                    raw_mpsc(options).await.line("raw tokio mpsc")
                );
                if callers {
                    println!(
                        "run {run}: {}",
                        raw_mpsc_senders(options).await.line(SENDERS)
                    );
                }
                continue;
            }
            for (label, publishing) in &ways {
                let m = memory_broker(options, *publishing).await;
                println!("run {run}: {}", m.line(label));
            }
        }
        return 0.0;
    }
    let mut raw = Vec::new();
    let mut raw_senders = Vec::new();
    let mut ours: Vec<Vec<Run>> = ways.iter().map(|_| Vec::new()).collect();
    for run in 1..=options.runs {
        let r = raw_mpsc(options).await;
        println!("run {run}: {}", r.line("raw tokio mpsc"));
        raw.push(r);
        if callers {
            let r = raw_mpsc_senders(options).await;
            println!("run {run}: {}", r.line(SENDERS));
            raw_senders.push(r);
        }
        for ((label, publishing), runs) in ways.iter().zip(&mut ours) {
            let m = memory_broker(options, *publishing).await;
            println!("run {run}: {}", m.line(label));
            runs.push(m);
        }
    }
    let ratios: Vec<f64> = ways
        .iter()
        .zip(ours)
        .map(|((label, publishing), runs)| {
            if matches!(publishing, Publishing::Concurrent) {
                report(SENDERS, raw_senders.clone(), label, runs.clone());
            }
            report("raw tokio mpsc", raw.clone(), label, runs)
        })
        .collect();
    let best = ratios.iter().copied().fold(0.0, f64::max);
    println!(
        "target: memory >= 0.5x raw mpsc end to end (peak: 0.95x); measured {:.2}x with publish, best {best:.2}x",
        ratios[0]
    );
    ratios[0]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keeps the harness from rotting: a small run completes and counts every message.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn small_comparison_runs_and_counts_every_message() {
        let options = Options {
            messages: 5_000,
            size: 256,
            runs: 1,
            messages_given: true,
            filter: None,
            peak: false,
            side: None,
            baseline: None,
            chunk: None,
            prefetch: None,
        };
        assert_eq!(raw_mpsc(&options).await.messages, 5_000);
        assert_eq!(raw_mpsc_senders(&options).await.messages, 5_000);
        for publishing in [
            Publishing::Batches(1),
            Publishing::Batches(100),
            Publishing::Concurrent,
            Publishing::Window,
        ] {
            assert_eq!(memory_broker(&options, publishing).await.messages, 5_000);
        }
    }
}
