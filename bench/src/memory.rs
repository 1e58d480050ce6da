//! Memory backend end to end (publish → subscribe → ack) against raw `tokio::sync::mpsc`.

use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use helix_messaging::memory::{MemoryBroker, MemoryConfig};
use helix_messaging::{Broker, Message, Publisher, SubscribeOptions, Subscriber};
use tokio::sync::mpsc;

use crate::measure::{Clock, Options, Run, histogram, report};

/// Queue bound shared by both sides, so neither buffers more than the other.
const CAPACITY: usize = 10_000;
const PREFETCH: usize = 1_000;

pub(crate) async fn raw_mpsc(options: &Options) -> Run {
    let clock = Clock::new(options.size);
    let (tx, mut rx) = mpsc::channel::<bytes::Bytes>(CAPACITY);
    let n = options.messages;
    let started = Instant::now();
    let producer = tokio::spawn(async move {
        for _ in 0..n {
            tx.send(clock.stamped_payload())
                .await
                .expect("receiver alive");
        }
    });
    let mut latency = histogram();
    let mut received = 0;
    while let Some(payload) = rx.recv().await {
        latency.saturating_record(clock.latency_ns(&payload));
        received += 1;
    }
    producer.await.expect("producer");
    Run {
        messages: received,
        elapsed: started.elapsed(),
        latency,
    }
}

pub(crate) async fn memory_broker(options: &Options, batch: usize) -> Run {
    let clock = Clock::new(options.size);
    let broker = Arc::new(MemoryBroker::with_config(MemoryConfig {
        max_queue_depth: CAPACITY,
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
    let (mut raw, mut single, mut batched) = (Vec::new(), Vec::new(), Vec::new());
    for run in 1..=options.runs {
        let r = raw_mpsc(options).await;
        println!("run {run}: {}", r.line("raw tokio mpsc"));
        raw.push(r);
        let m = memory_broker(options, 1).await;
        println!("run {run}: {}", m.line("memory (publish + ack)"));
        single.push(m);
        let b = memory_broker(options, 100).await;
        println!("run {run}: {}", b.line("memory (publish_batch 100 + ack)"));
        batched.push(b);
    }
    let ratio = report(
        "raw tokio mpsc",
        raw.clone(),
        "memory (publish + ack)",
        single,
    );
    report(
        "raw tokio mpsc",
        raw,
        "memory (publish_batch 100 + ack)",
        batched,
    );
    println!("target: memory >= 0.5x raw mpsc end to end; measured {ratio:.2}x");
    ratio
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
        };
        assert_eq!(raw_mpsc(&options).await.messages, 5_000);
        assert_eq!(memory_broker(&options, 1).await.messages, 5_000);
        assert_eq!(memory_broker(&options, 100).await.messages, 5_000);
    }
}
