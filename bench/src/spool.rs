//! The fallback spool on the broker `MESSAGING_BACKEND` names (memory by default): how fast
//! publishes are spooled (SQLite, on disk before `Ok`), and how fast a full spool is
//! forwarded once the broker is back, each against plain `publish_batch` of 100 in the same
//! run.

use std::sync::Arc;
use std::time::{Duration, Instant};

use helix_messaging::Message;
use helix_messaging::breaker::{BreakerBroker, BreakerConfig};
use helix_messaging::fallback::{FallbackBroker, ForwardConfig, Spool, SpoolLimits, SqliteSpool};

use crate::leftovers;
use crate::measure::{Options, Run, histogram, report};

fn messages(n: usize, size: usize) -> Vec<Message> {
    let payload = bytes::Bytes::from(vec![b'x'; size]);
    (0..n).map(|_| Message::new(payload.clone())).collect()
}

fn run(messages: usize, elapsed: Duration) -> Run {
    Run {
        messages,
        elapsed,
        latency: histogram(),
    }
}

fn limits() -> SpoolLimits {
    SpoolLimits {
        max_messages: u64::MAX,
        max_bytes: u64::MAX,
    }
}

pub(crate) async fn compare(options: &Options) {
    let backend = leftovers::backend();
    println!(
        "fallback spool on {backend}: {} messages x {} B, {} runs each",
        options.messages, options.size, options.runs
    );
    let dir = std::env::temp_dir().join(format!("helix-bench-spool-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let (mut plain, mut batches, mut singles, mut forwards) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for r in 1..=options.runs {
        let broker = leftovers::broker().await;
        let topic = leftovers::fresh("spool");
        // A group, so the topic is routable where that matters (RabbitMQ).
        let sink = broker
            .subscribe(&topic, helix_messaging::SubscribeOptions::group("sink"))
            .await
            .expect("subscribe");
        let started = Instant::now();
        for batch in messages(options.messages, options.size).chunks(100) {
            broker
                .publish_batch(&topic, batch.to_vec())
                .await
                .into_result()
                .expect("publish");
        }
        let p = run(options.messages, started.elapsed());
        println!("run {r}: {}", p.line("plain publish_batch 100"));
        plain.push(p);

        let spool = SqliteSpool::open(dir.join(format!("run-{r}.sqlite")), limits())
            .await
            .expect("spool");
        let started = Instant::now();
        for batch in messages(options.messages, options.size).chunks(100) {
            spool.append(&topic, batch).await.expect("append");
        }
        let b = run(options.messages, started.elapsed());
        println!("run {r}: {}", b.line("spool append, batches of 100"));
        batches.push(b);

        // One append per publish, as single publishes during an outage are spooled.
        let singles_n = (options.messages / 50).max(100);
        let single_spool = SqliteSpool::open(dir.join(format!("single-{r}.sqlite")), limits())
            .await
            .expect("spool");
        let started = Instant::now();
        for message in messages(singles_n, options.size) {
            single_spool
                .append(&topic, std::slice::from_ref(&message))
                .await
                .expect("append");
        }
        let s = run(singles_n, started.elapsed());
        println!("run {r}: {}", s.line("spool append, one by one"));
        singles.push(s);

        // Forward the full spool through a live broker.
        let guarded =
            BreakerBroker::new(broker.clone(), BreakerConfig::default()).expect("breaker");
        let started = Instant::now();
        let fallback = FallbackBroker::new(guarded, Arc::new(spool), ForwardConfig::default())
            .await
            .expect("fallback");
        while fallback.spool_stats().await.expect("stats").depth > 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let f = run(options.messages, started.elapsed());
        println!("run {r}: {}", f.line("forwarding the spool"));
        forwards.push(f);
        drop(sink);
        let _ = broker.close().await;
        leftovers::remove_topic(&topic, &["sink"]).await;
    }
    leftovers::remove_exchange().await;
    report(
        "plain publish_batch 100",
        plain.clone(),
        "spool append, batches of 100",
        batches,
    );
    report(
        "plain publish_batch 100",
        plain.clone(),
        "spool append, one by one",
        singles,
    );
    report(
        "plain publish_batch 100",
        plain,
        "forwarding the spool",
        forwards,
    );
    let _ = std::fs::remove_dir_all(&dir);
}
