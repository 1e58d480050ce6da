//! The runners that drive both sides: the adapter's publish-only and end-to-end runs, and the
//! task fan-out that the raw clients' concurrent runs share with it.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use hdrhistogram::Histogram;
use helix_messaging::window::{PublishWindow, WindowOptions};
use helix_messaging::{Message, Publisher, Subscription};

use super::options::{Batching, PEAK_CALLERS, Pattern};
use super::run::{Clock, Run, histogram};

/// An adapter's publish-only run: [`publish_batches`] as `batching` says,
/// [`publish_concurrently`], or [`publish_through_window`] with `batching.window` in flight.
pub(crate) async fn adapter_publish<P: Publisher + Clone + 'static>(
    publisher: &P,
    topic: &str,
    n: usize,
    batching: Batching,
    pattern: Pattern,
    clock: Clock,
) -> Histogram<u64> {
    match pattern {
        Pattern::Batches => publish_batches(publisher, topic, n, batching, clock).await,
        Pattern::Callers => publish_concurrently(publisher, topic, n, clock).await,
        Pattern::Window => {
            let publisher: Arc<dyn Publisher> = Arc::new(publisher.clone());
            publish_through_window(publisher, topic, n, batching.window, clock).await
        }
    }
}

/// The loop the README shows for publishing at volume: one `PublishWindow::send` per message
/// with `window` in flight, then `close`. Returns how long each `window` sends took (the
/// round trip of a window, as the raw side's batches record theirs).
pub(crate) async fn publish_through_window(
    publisher: Arc<dyn Publisher>,
    topic: &str,
    n: usize,
    window: usize,
    clock: Clock,
) -> Histogram<u64> {
    let window_options = WindowOptions {
        window,
        ..WindowOptions::default()
    };
    let sink = PublishWindow::with_options(publisher, topic, window_options).expect("window");
    let mut round_trips = histogram();
    let mut started = Instant::now();
    for n in 1..=n {
        sink.send(Message::new(clock.stamped_payload()))
            .await
            .expect("send");
        if n % window == 0 {
            round_trips.saturating_record(started.elapsed().as_nanos() as u64);
            started = Instant::now();
        }
    }
    sink.close()
        .await
        .into_result()
        .expect("every message confirmed");
    round_trips.saturating_record(started.elapsed().as_nanos() as u64);
    round_trips
}

/// Split `n` among `tasks` tasks, each running `task(its index, its count)`, and merge the
/// histograms they return.
pub(crate) async fn in_tasks<F, Fut>(tasks: usize, n: usize, task: F) -> Histogram<u64>
where
    F: Fn(usize, usize) -> Fut,
    Fut: Future<Output = Histogram<u64>> + Send + 'static,
{
    let handles: Vec<_> = (0..tasks)
        .map(|i| {
            // The first `n % tasks` tasks take one more, so exactly `n` go out.
            let count = n / tasks + usize::from(i < n % tasks);
            tokio::spawn(task(i, count))
        })
        .collect();
    let mut merged = histogram();
    for handle in handles {
        merged.add(handle.await.expect("task")).expect("histogram");
    }
    merged
}

/// A raw client's publish-only run: `publish(n, batch)`, or with [`Pattern::Callers`]
/// `publish(its count, 1)` in each of [`PEAK_CALLERS`] tasks, so every caller awaits one
/// acknowledgement at a time.
pub(crate) async fn raw_publishing<F, Fut>(
    n: usize,
    batch: usize,
    pattern: Pattern,
    publish: F,
) -> Histogram<u64>
where
    F: Fn(usize, usize) -> Fut,
    Fut: Future<Output = Histogram<u64>> + Send + 'static,
{
    if pattern == Pattern::Callers {
        in_tasks(PEAK_CALLERS, n, |_, count| publish(count, 1)).await
    } else {
        publish(n, batch).await
    }
}

/// Publish `n` stamped messages from [`PEAK_CALLERS`] tasks, each awaiting one `publish` at
/// a time. Returns every publish's round trip.
pub(crate) async fn publish_concurrently<P: Publisher + Clone + 'static>(
    publisher: &P,
    topic: &str,
    n: usize,
    clock: Clock,
) -> Histogram<u64> {
    in_tasks(PEAK_CALLERS, n, |_, count| {
        let (publisher, topic) = (publisher.clone(), topic.to_owned());
        async move {
            let mut round_trips = histogram();
            for _ in 0..count {
                let sent = Instant::now();
                publisher
                    .publish(&topic, Message::new(clock.stamped_payload()))
                    .await
                    .expect("publish");
                round_trips.saturating_record(sent.elapsed().as_nanos() as u64);
            }
            round_trips
        }
    })
    .await
}

/// Publish `n` stamped messages with `publish_batch`, a window of `batching.window` at a
/// time: each window in calls of `batching.chunk`, each call started as soon as its messages
/// are built (so they go to the client while the next chunk is built, as a raw loop hands
/// over each record as it builds it), and every call's report awaited before the next
/// window. Returns the round trip of every window.
pub(crate) async fn publish_batches<P: Publisher + ?Sized>(
    publisher: &P,
    topic: &str,
    n: usize,
    batching: Batching,
    clock: Clock,
) -> Histogram<u64> {
    let mut round_trips = histogram();
    let mut sent = 0;
    while sent < n {
        let window_started = Instant::now();
        let count = batching.window.min(n - sent);
        let mut in_flight = Vec::new();
        let mut left = count;
        while left > 0 {
            let take = batching.chunk.min(left);
            left -= take;
            let messages = (0..take)
                .map(|_| Message::new(clock.stamped_payload()))
                .collect();
            let mut publishing = publisher.publish_batch(topic, messages);
            // Polled once here: a backend hands the batch to its client on the first poll.
            match futures::poll!(&mut publishing) {
                std::task::Poll::Ready(report) => report.into_result().expect("publish_batch"),
                std::task::Poll::Pending => in_flight.push(publishing),
            }
        }
        for report in futures::future::join_all(in_flight).await {
            report.into_result().expect("publish_batch");
        }
        round_trips.saturating_record(window_started.elapsed().as_nanos() as u64);
        sent += count;
    }
    round_trips
}

/// Publish `message` to `topic` and take it back through `subscription`, acked, the receive
/// and the ack each within 10 s: one message through before a run's clock starts, or a
/// check that one goes through. Panics naming the step that failed.
pub(crate) async fn one_through<P: Publisher + ?Sized>(
    publisher: &P,
    topic: &str,
    subscription: &mut Subscription,
    message: Message,
) {
    publisher
        .publish(topic, message)
        .await
        .expect("one message published");
    let delivery = tokio::time::timeout(Duration::from_secs(10), subscription.next())
        .await
        .expect("the message delivered within 10 s")
        .expect("the subscription is open")
        .expect("the delivery");
    tokio::time::timeout(Duration::from_secs(10), delivery.ack())
        .await
        .expect("the ack within 10 s")
        .expect("the ack");
}

/// An adapter's end-to-end run: `n` stamped messages published with [`publish_batches`] in
/// the background while `subscription` receives and acks them ([`consume_and_ack`]); timed
/// from the first publish to the last delivery.
pub(crate) async fn publish_and_consume<P: Publisher + Clone + 'static>(
    publisher: &P,
    topic: &str,
    subscription: Subscription,
    n: usize,
    batching: Batching,
    clock: Clock,
    acks_in_flight: usize,
) -> Run {
    let started = Instant::now();
    let producer = {
        let publisher = publisher.clone();
        let topic = topic.to_owned();
        tokio::spawn(async move { publish_batches(&publisher, &topic, n, batching, clock).await })
    };
    let latency = consume_and_ack(subscription, n, clock, acks_in_flight).await;
    let elapsed = started.elapsed();
    producer.await.expect("producer task");
    Run {
        messages: n,
        elapsed,
        latency,
    }
}

/// Receive `n` deliveries from `subscription`, recording each one's latency and acking it,
/// up to `acks_in_flight` acks at once; with 1, each is acked before the next is taken.
async fn consume_and_ack(
    subscription: Subscription,
    n: usize,
    clock: Clock,
    acks_in_flight: usize,
) -> Histogram<u64> {
    if acks_in_flight == 1 {
        // The loop a raw consumer runs: no task per ack.
        let mut latency = histogram();
        let mut deliveries = subscription.take(n);
        while let Some(delivery) = deliveries.next().await {
            let delivery = delivery.expect("delivery");
            latency.saturating_record(clock.latency_ns(delivery.message().payload()));
            delivery.ack().await.expect("ack");
        }
        return latency;
    }
    let latency = Arc::new(Mutex::new(histogram()));
    subscription
        .take(n)
        .for_each_concurrent(acks_in_flight, |delivery| {
            let latency = latency.clone();
            async move {
                let delivery = delivery.expect("delivery");
                let ns = clock.latency_ns(delivery.message().payload());
                latency.lock().expect("histogram").saturating_record(ns);
                delivery.ack().await.expect("ack");
            }
        })
        .await;
    latency.lock().expect("histogram").clone()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// In chunks, every message goes out exactly once and in order, and each window is one
    /// round trip.
    #[tokio::test]
    async fn publish_batches_in_chunks_sends_every_message_once_in_order() {
        use helix_messaging::memory::MemoryBroker;
        use helix_messaging::{SubscribeOptions, Subscriber};

        let broker = MemoryBroker::new();
        let mut subscription = broker
            .subscribe("chunks", SubscribeOptions::default())
            .await
            .unwrap();
        let batching = Batching {
            window: 1_000,
            chunk: 300,
        };
        let round_trips = publish_batches(&broker, "chunks", 2_500, batching, Clock::new(64)).await;
        assert_eq!(round_trips.len(), 3, "windows of 1,000, 1,000 and 500");
        let mut last_sent = 0;
        for _ in 0..2_500 {
            let delivery = tokio::time::timeout(Duration::from_secs(5), subscription.next())
                .await
                .expect("a delivery within 5 s")
                .expect("the subscription is open")
                .unwrap();
            let payload = delivery.message().payload();
            let sent = u64::from_be_bytes(payload[..8].try_into().unwrap());
            assert!(sent >= last_sent, "out of order");
            last_sent = sent;
            delivery.ack().await.unwrap();
        }
        let extra = tokio::time::timeout(Duration::from_millis(100), subscription.next()).await;
        assert!(extra.is_err(), "no message beyond the 2,500 published");
    }
}
