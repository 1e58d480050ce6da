//! [`SpoolHarness`]: seeded programs through a fallback broker over a [`FaultyBroker`] and
//! a [`FaultySpool`], published by a process killed midway and a second one on the same
//! spool, and the spool's promise checked once the faults heal (see the [plane](super)
//! docs).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use helix_messaging_core::breaker::{BreakerBroker, BreakerConfig};
use helix_messaging_core::fallback::{FallbackBroker, ForwardConfig, MemorySpool, Spool};
use helix_messaging_core::{Broker, Message, Publisher, Result, SubscribeOptions};

use super::broker::FaultyBroker;
use super::schedule::{FaultSchedule, cancel_after_polls};
use super::seeds::{PlaneReport, SeedRun, run_seeds};
use super::stores::FaultySpool;
use crate::differential::splitmix;
use crate::helpers::{Factory, Settings, fresh_name};

/// How one publish of a program ended for its caller.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Ok,
    Failed(String),
    Cancelled,
}

/// What one seeded run of the spool saw.
#[derive(Debug)]
struct SpoolRun {
    /// Per topic, the publishes in call order with their outcome.
    published: BTreeMap<String, Vec<(String, Outcome)>>,
    /// Per topic, the ids delivered, in order.
    delivered: BTreeMap<String, Vec<String>>,
    /// Id to the reason it was set aside with.
    refused: HashMap<String, String>,
    /// The ids the broker refuses for good: the only ones that may be set aside.
    refusable: std::collections::HashSet<String>,
    faults: Vec<String>,
    problems: Vec<String>,
}

impl SeedRun for SpoolRun {
    fn faults(&self) -> &[String] {
        &self.faults
    }

    fn observed(&self) -> String {
        format!(
            "published: {:?}\n  delivered: {:?}\n  set aside: {:?}",
            self.published, self.delivered, self.refused
        )
    }

    /// How the publishes ended and what arrived, in numbers.
    fn summary(&self) -> String {
        let (mut ok, mut failed, mut cancelled) = (0, 0, 0);
        for (_, outcome) in self.published.values().flatten() {
            match outcome {
                Outcome::Ok => ok += 1,
                Outcome::Failed(_) => failed += 1,
                Outcome::Cancelled => cancelled += 1,
            }
        }
        let delivered: usize = self.delivered.values().map(Vec::len).sum();
        format!(
            "{ok} ok, {failed} failed, {cancelled} cancelled; {delivered} deliveries, {} set aside; {} faults",
            self.refused.len(),
            self.faults.len()
        )
    }

    /// The spool's promise, broken in each of these ways (empty if kept).
    fn violations(&self) -> Vec<String> {
        let mut violations = self.problems.clone();
        for (topic, published) in &self.published {
            let delivered = self.delivered.get(topic).cloned().unwrap_or_default();
            let mut first_seen: HashMap<&str, usize> = HashMap::new();
            for (at, id) in delivered.iter().enumerate() {
                first_seen.entry(id.as_str()).or_insert(at);
            }
            let mut last: Option<(&str, usize)> = None;
            for (id, outcome) in published {
                if *outcome != Outcome::Ok {
                    continue;
                }
                match (first_seen.get(id.as_str()), self.refused.get(id)) {
                    (Some(&at), _) => {
                        if let Some((before, before_at)) = last
                            && before_at > at
                        {
                            violations.push(format!(
                                "{topic}: {id} was first delivered before {before}, whose publish returned Ok earlier"
                            ));
                        }
                        last = Some((id, at));
                    }
                    (None, Some(reason)) if reason.is_empty() => {
                        violations.push(format!("{topic}: {id} is set aside without a reason"));
                    }
                    (None, Some(reason)) if !self.refusable.contains(id) => {
                        violations.push(format!(
                            "{topic}: {id} is set aside ({reason}) though the broker takes it"
                        ));
                    }
                    (None, Some(_)) => {}
                    (None, None) => violations.push(format!(
                        "{topic}: {id}'s publish returned Ok, but it was neither delivered nor set aside"
                    )),
                }
            }
        }
        violations
    }
}

/// Builds the spool a run's fallback broker writes to.
type SpoolFactory =
    Arc<dyn Fn() -> futures::future::BoxFuture<'static, Result<Arc<dyn Spool>>> + Send + Sync>;

/// Seeded runs of the fallback spool over one backend (see the module docs).
pub struct SpoolHarness {
    backend: String,
    factory: Factory,
    spool: SpoolFactory,
    messages: usize,
    settings: Settings,
}

impl SpoolHarness {
    /// A harness building a fresh broker of `backend` for every run with `factory`.
    pub fn new<F, Fut>(backend: impl Into<String>, factory: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<Arc<dyn Broker>>> + Send + 'static,
    {
        SpoolHarness {
            backend: backend.into(),
            factory: Arc::new(move || futures::FutureExt::boxed(factory())),
            spool: Arc::new(|| {
                futures::FutureExt::boxed(async {
                    Ok(Arc::new(MemorySpool::default()) as Arc<dyn Spool>)
                })
            }),
            messages: 60,
            settings: Settings::from_env(),
        }
    }

    /// Spool to what `spool` builds (a fresh one every run) instead of a [`MemorySpool`].
    #[must_use]
    pub fn spooling_to<F, Fut>(mut self, spool: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<Arc<dyn Spool>>> + Send + 'static,
    {
        self.spool = Arc::new(move || futures::FutureExt::boxed(spool()));
        self
    }

    /// Run every seed; a failing seed is shrunk to the fewest publishes that still fail.
    pub async fn run(self) -> PlaneReport {
        run_seeds(&self.backend, "spool", self.messages, |seed, messages| {
            self.run_seed(seed, messages)
        })
        .await
    }

    async fn run_seed(&self, seed: u64, messages: usize) -> SpoolRun {
        let mut run = SpoolRun {
            published: BTreeMap::new(),
            delivered: BTreeMap::new(),
            refused: HashMap::new(),
            refusable: std::collections::HashSet::new(),
            faults: Vec::new(),
            problems: Vec::new(),
        };
        let broker = match (self.factory)().await {
            Ok(broker) => broker,
            Err(err) => {
                run.problems.push(format!("creating the broker: {err}"));
                return run;
            }
        };
        let schedule = FaultSchedule::new(seed, 30, 5);
        let topics: Vec<String> = (0..3).map(|_| fresh_name("plane")).collect();
        // Observed on the broker itself, through groups that exist before the first publish.
        let mut subscriptions = Vec::new();
        for topic in &topics {
            match broker
                .subscribe(topic, SubscribeOptions::group(fresh_name("watch")))
                .await
            {
                Ok(sub) => subscriptions.push(sub),
                Err(err) => {
                    run.problems.push(format!("subscribe to {topic}: {err}"));
                    let _ = broker.close().await;
                    return run;
                }
            }
        }
        let spool = match (self.spool)().await {
            Ok(spool) => spool,
            Err(err) => {
                run.problems.push(format!("building the spool: {err}"));
                let _ = broker.close().await;
                return run;
            }
        };
        for index in 0..messages {
            let id = format!("s{seed}-m{index}");
            if schedule.refuses(&id) {
                run.refusable.insert(id);
            }
        }
        // A first process publishes the first part of the program and is killed (its
        // runtime shut down, its forwarder dropped at whatever await it reached, perhaps
        // mid-round: sent and not yet removed); a second one, on the same spool, forwards
        // what it left and publishes the rest.
        let killed_after = (splitmix(seed ^ 0x00C1_A55E) % (messages as u64 + 1)) as usize;
        let first = tokio::task::spawn_blocking({
            let (broker, spool, schedule, topics) = (
                broker.clone(),
                spool.clone(),
                schedule.clone(),
                topics.clone(),
            );
            move || first_process(broker, spool, &schedule, &topics, seed, 0..killed_after)
        })
        .await
        .unwrap_or_else(|e| Err(format!("the first process panicked: {e}")));
        match first {
            Ok(published) => record(&mut run, published),
            Err(problem) => run.problems.push(problem),
        }
        let fallback = match fallback_over(broker.clone(), spool, &schedule).await {
            Ok(fallback) => fallback,
            Err(err) => {
                run.problems
                    .push(format!("building the fallback broker: {err}"));
                let _ = broker.close().await;
                return run;
            }
        };
        let rest = publish_program(&fallback, &topics, seed, killed_after..messages).await;
        record(&mut run, rest);
        schedule.heal();
        // Everything still spooled is forwarded once the faults are gone.
        let drained = tokio::time::timeout(self.settings.receive_timeout, async {
            loop {
                if fallback.spool_stats().await.is_ok_and(|s| s.depth == 0) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        if drained.is_err() {
            let stats = fallback.spool_stats().await;
            run.problems.push(format!(
                "the spool did not drain within {:?} after the faults healed: {stats:?}",
                self.settings.receive_timeout
            ));
        }
        if let Ok(refused) = fallback.refused(usize::MAX).await {
            run.refused = refused
                .into_iter()
                .map(|r| (r.message.id().to_owned(), r.reason))
                .collect();
        }
        for (topic, mut sub) in topics.iter().zip(subscriptions) {
            let wanted: usize = run.published[topic]
                .iter()
                .filter(|(id, o)| *o == Outcome::Ok && !run.refused.contains_key(id))
                .count();
            let delivered = run.delivered.entry(topic.clone()).or_default();
            loop {
                let distinct = delivered
                    .iter()
                    .collect::<std::collections::HashSet<_>>()
                    .len();
                let wait = if distinct >= wanted {
                    self.settings.quiet_period
                } else {
                    self.settings.receive_timeout
                };
                match tokio::time::timeout(wait, sub.next()).await {
                    Ok(Some(Ok(delivery))) => {
                        delivered.push(delivery.message().id().to_owned());
                        if let Err(err) = delivery.ack().await {
                            run.problems.push(format!("ack on {topic}: {err}"));
                        }
                    }
                    Ok(Some(Err(err))) => run.problems.push(format!("stream of {topic}: {err}")),
                    Ok(None) | Err(_) => break,
                }
            }
        }
        run.faults = schedule.applied();
        let _ = fallback.close().await;
        run
    }
}

/// One publish of a program: its topic, its message id and how it ended for the caller.
type Published = (String, String, Outcome);

fn record(run: &mut SpoolRun, published: Vec<Published>) {
    for (topic, id, outcome) in published {
        run.published.entry(topic).or_default().push((id, outcome));
    }
}

/// Publish the program's messages `indexes` through `fallback`, a few of them cancelled at
/// a seeded await point.
async fn publish_program(
    fallback: &FallbackBroker,
    topics: &[String],
    seed: u64,
    indexes: std::ops::Range<usize>,
) -> Vec<Published> {
    let mut published = Vec::new();
    for index in indexes {
        let roll = splitmix(seed ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let topic = &topics[(roll % 3) as usize];
        let id = format!("s{seed}-m{index}");
        // One key per topic: every backend keeps one key's order.
        let message = Message::new(id.clone())
            .with_id(id.clone())
            .with_key(topic.clone());
        let publish = fallback.publish(topic, message);
        let outcome = if (roll >> 8) % 100 < 10 {
            match cancel_after_polls(publish, ((roll >> 16) % 4) as usize).await {
                None => Outcome::Cancelled,
                Some(Ok(())) => Outcome::Ok,
                Some(Err(err)) => Outcome::Failed(err.to_string()),
            }
        } else {
            match publish.await {
                Ok(()) => Outcome::Ok,
                Err(err) => Outcome::Failed(err.to_string()),
            }
        };
        published.push((topic.clone(), id, outcome));
    }
    published
}

/// A process that publishes the program's messages `indexes` through a fallback of its own
/// on `spool`, lets its forwarder run for a seeded moment, and is killed: its runtime shut
/// down with every task dropped where it stands.
fn first_process(
    broker: Arc<dyn Broker>,
    spool: Arc<dyn Spool>,
    schedule: &FaultSchedule,
    topics: &[String],
    seed: u64,
    indexes: std::ops::Range<usize>,
) -> std::result::Result<Vec<Published>, String> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| format!("building the first process's runtime: {e}"))?;
    let published = runtime.block_on(async {
        let fallback = fallback_over(broker, spool, schedule)
            .await
            .map_err(|e| format!("building the first process's fallback broker: {e}"))?;
        let published = publish_program(&fallback, topics, seed, indexes).await;
        tokio::time::sleep(Duration::from_millis(splitmix(seed ^ 0x0F0E) % 20)).await;
        Ok(published)
    });
    runtime.shutdown_timeout(Duration::from_secs(10));
    published
}

async fn fallback_over(
    broker: Arc<dyn Broker>,
    spool: Arc<dyn Spool>,
    schedule: &FaultSchedule,
) -> Result<FallbackBroker> {
    let faulty = Arc::new(FaultyBroker::new(broker, schedule.clone()));
    let breaker = BreakerBroker::new(
        faulty,
        BreakerConfig {
            failure_threshold: 3,
            open_interval: Duration::from_millis(50),
            half_open_probes: 1,
        },
    )?;
    let spool = FaultySpool::new(spool, schedule.clone());
    let config = ForwardConfig {
        batch_size: 7,
        retry_interval: Duration::from_millis(10),
    };
    FallbackBroker::new(breaker, Arc::new(spool), config).await
}
