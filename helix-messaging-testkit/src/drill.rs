//! What the node-loss drills measure, one way for every backend: when each message was
//! first published and first delivered, the copies that came, what the publishers were told,
//! and from these the figures a drill prints (lost, duplicates, time to deliver again after
//! a fault).
//!
//! A [`Drill`] holds both records. Its publishers publish with [`Drill::publish`]: a publish
//! refused for now (a leader election, a lost connection, too few replicas) is made again
//! under the same id, as an application does, until it is acknowledged or the drill's
//! patience runs out. Its consumers record with [`Drill::record_deliveries`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use helix_messaging_core::{Message, Position, Publisher, Subscription};
use parking_lot::Mutex;

/// When each message was first published and first delivered (and from which partition,
/// where the backend has partitions), and how many copies were delivered in all. Shared
/// by a drill's publishers and consumers.
#[derive(Debug, Default)]
pub struct Timeline {
    inner: Mutex<Seen>,
}

#[derive(Debug, Default)]
struct Seen {
    first_publish: HashMap<String, Instant>,
    first_delivery: HashMap<String, (Instant, Option<i32>)>,
    copies: usize,
}

impl Timeline {
    /// `id` is being published (again, if it was before: the first time is kept).
    pub fn published(&self, id: &str) {
        self.inner
            .lock()
            .first_publish
            .entry(id.to_owned())
            .or_insert_with(Instant::now);
    }

    /// A copy of `id` was delivered, from `partition` where there is one.
    pub fn delivered(&self, id: &str, partition: Option<i32>) {
        let mut seen = self.inner.lock();
        seen.copies += 1;
        seen.first_delivery
            .entry(id.to_owned())
            .or_insert_with(|| (Instant::now(), partition));
    }

    /// Whether every one of `ids` has been delivered.
    pub fn all_delivered<'a>(&self, ids: impl IntoIterator<Item = &'a String>) -> bool {
        let seen = self.inner.lock();
        ids.into_iter()
            .all(|id| seen.first_delivery.contains_key(id))
    }

    /// How many of `ids` (acknowledged publishes) were never delivered.
    pub fn lost<'a>(&self, ids: impl IntoIterator<Item = &'a String>) -> usize {
        let seen = self.inner.lock();
        ids.into_iter()
            .filter(|id| !seen.first_delivery.contains_key(*id))
            .count()
    }

    /// Copies delivered beyond the first of each message.
    pub fn duplicates(&self) -> usize {
        let seen = self.inner.lock();
        seen.copies - seen.first_delivery.len()
    }

    /// How long after `fault` the first message first published after it was delivered,
    /// from any partition or from `partition` only: the time consumers took to deliver
    /// again, without what was already on its way before the fault.
    pub fn resumed_after(&self, fault: Instant, partition: Option<i32>) -> Option<Duration> {
        let seen = self.inner.lock();
        seen.first_publish
            .iter()
            .filter(|(_, published)| **published > fault)
            .filter_map(|(id, _)| seen.first_delivery.get(id))
            .filter(|(_, from)| partition.is_none() || *from == partition)
            .map(|(delivered, _)| *delivered)
            .min()
            .map(|delivered| delivered.duration_since(fault))
    }
}

/// What a drill's publishers were told: the ids acknowledged, those refused for good, and
/// how often each kind of refusal for now was met (each followed by the same publish
/// again).
#[derive(Debug, Default)]
pub struct Outcomes {
    inner: Mutex<Told>,
}

#[derive(Debug, Default, Clone)]
struct Told {
    acknowledged: Vec<String>,
    refused: Vec<String>,
    refused_for_now: HashMap<String, usize>,
}

impl Outcomes {
    /// The ids acknowledged so far, in the order they were.
    pub fn acknowledged(&self) -> Vec<String> {
        self.inner.lock().acknowledged.clone()
    }

    /// The ids refused for good so far.
    pub fn refused(&self) -> Vec<String> {
        self.inner.lock().refused.clone()
    }

    /// Publishes with an outcome so far, acknowledged or refused for good.
    pub fn settled(&self) -> usize {
        let told = self.inner.lock();
        told.acknowledged.len() + told.refused.len()
    }

    /// Refusals for now, by error kind, for the drill's figures.
    pub fn refused_for_now(&self) -> HashMap<String, usize> {
        self.inner.lock().refused_for_now.clone()
    }
}

/// A drill's records: when messages were published and delivered, what publishers were
/// told, and how long a publish refused for now is made again.
#[derive(Debug)]
pub struct Drill {
    /// When each message was first published and first delivered.
    pub timeline: Timeline,
    /// What the publishers were told.
    pub outcomes: Outcomes,
    patience: Duration,
}

impl Drill {
    /// Records for a drill whose publishes are made again for up to `patience`.
    pub fn new(patience: Duration) -> Arc<Drill> {
        Arc::new(Drill {
            timeline: Timeline::default(),
            outcomes: Outcomes::default(),
            patience,
        })
    }

    /// Publish `message()` (a message with `id`) to `topic`; while it is refused
    /// retryably and the patience has not run out since the first attempt, wait 50 ms and
    /// publish it again. The first attempt is recorded in the timeline, the outcome in the
    /// outcomes (a refusal for good is printed with its error).
    pub async fn publish(
        &self,
        publisher: &(impl Publisher + ?Sized),
        topic: &str,
        id: &str,
        message: impl Fn() -> Message,
    ) {
        let started = Instant::now();
        self.timeline.published(id);
        loop {
            match publisher.publish(topic, message().with_id(id)).await {
                Ok(()) => {
                    self.outcomes.inner.lock().acknowledged.push(id.to_owned());
                    return;
                }
                Err(e) if e.is_retryable() && started.elapsed() < self.patience => {
                    *self
                        .outcomes
                        .inner
                        .lock()
                        .refused_for_now
                        .entry(format!("{:?}", e.kind()))
                        .or_default() += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => {
                    eprintln!("{id} refused for good: {e}");
                    self.outcomes.inner.lock().refused.push(id.to_owned());
                    return;
                }
            }
        }
    }

    /// A task that records every delivery of `subscription` in the timeline (with its Kafka
    /// partition, if any) and acks it, until the subscription ends. With `concurrent_acks`,
    /// each ack runs on a task of its own (the prefetch window bounds how many are out), as
    /// a consumer that keeps up does; otherwise one after another. An ack that fails (its
    /// connection died, its partition moved) is left: the message comes again, a duplicate.
    pub fn record_deliveries(
        self: &Arc<Self>,
        mut subscription: Subscription,
        concurrent_acks: bool,
    ) -> tokio::task::JoinHandle<()> {
        let drill = self.clone();
        tokio::spawn(async move {
            while let Some(next) = subscription.next().await {
                let Ok(delivery) = next else { continue };
                let partition = match delivery.info().position {
                    Some(Position::Offset { partition, .. }) => Some(partition),
                    _ => None,
                };
                drill.timeline.delivered(delivery.message().id(), partition);
                if concurrent_acks {
                    tokio::spawn(async move {
                        let _ = delivery.ack().await;
                    });
                } else {
                    let _ = delivery.ack().await;
                }
            }
        })
    }
}
