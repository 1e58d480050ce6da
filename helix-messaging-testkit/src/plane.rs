//! The reliability plane under faults: seeded fault-injecting wrappers over a broker and a
//! spool, and runs that check the plane's promises after each seed.
//!
//! [`FaultyBroker`] wraps any `Arc<dyn Broker>` and, per publish, passes it through, fails it
//! transiently (a retryable connection error, before the broker saw it), times it out
//! *after* the broker took it (the ambiguous case), or delays it; a message it refuses
//! ([`ErrorKind::Rejected`]) it refuses every time, as a broker refuses a bad message. Per
//! delivery, it drops it with the connection (requeued, the stream reporting the loss) or
//! delays it. A
//! batch goes over in order, and a transient fault fails the rest of it, as a lost
//! connection does. [`FaultySpool`] does the same to a [`Spool`]'s calls: an append can
//! fail before it is written or after (written, but reported failed). Every decision comes
//! from the seed and, for a publish, the message's id and how often it was tried; for a
//! store call, how many calls of its kind came before. So a seed replays the same faults
//! whatever order the caller and the forwarder interleave in.
//!
//! [`SpoolHarness`] runs seeded programs through a [`FallbackBroker`] over a faulty broker
//! and spool, cancelling some publishes at a seeded await point; the first part of each
//! program is published by a process killed afterwards (its runtime shut down, its
//! forwarder dropped at whatever await it reached, perhaps mid-round) and the rest by a
//! second process on the same spool. It then heals the faults and
//! checks the spool's promise: every publish that returned `Ok` is delivered at least once,
//! with each topic's first deliveries in the order of the `Ok`s, or sits in the set-aside
//! area with the broker's reason; never neither. [`check_breaker`] drives a
//! [`CircuitBreaker`] through seeded permits, outcomes, abandoned calls and time, and checks
//! that its counts never underflow and that a half-open breaker always resolves.
//!
//! On a violation the report names the seed, the shortest failing program (the fewest
//! publishes that still fail) and what was observed. `HELIX_PLANE_SEEDS=n` runs seeds 1 to n
//! (default 20), `HELIX_PLANE_SEED=s` one seed.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use futures::StreamExt;
use helix_messaging_core::breaker::{BreakerBroker, BreakerConfig, BreakerState, CircuitBreaker};
use helix_messaging_core::dlq::{
    DeadLetterStore, DlqFilter, DlqStats, FailureGroup, StoredDeadLetter,
};
use helix_messaging_core::fallback::{
    FallbackBroker, ForwardConfig, MemorySpool, RefusedMessage, Spool, SpoolStats, SpooledMessage,
};
use helix_messaging_core::replay::{
    HEADER_REPLAY_ID, MemoryReplayStore, ReplayConfig, ReplayHandler, ReplayLease, ReplayOptions,
    ReplayProgress, ReplayRecord, ReplayRequest, ReplayStatus, ReplayStore,
};
use helix_messaging_core::{
    Broker, Capabilities, Error, ErrorKind, Health, HistoryStream, Message, Publisher, Result,
    SubscribeOptions, Subscriber, Subscription, TimeRange,
};
use parking_lot::Mutex;

use crate::differential::splitmix;
use crate::helpers::Factory;

mod dlq;
pub use dlq::DlqHarness;

/// What a faulty wrapper does to one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Nothing: the call goes through.
    Pass,
    /// A retryable connection error before the call reaches the wrapped broker or store.
    Transient,
    /// The call goes through, then fails with a retryable timeout: the ambiguous case.
    AfterTheFact,
    /// The call goes through after this long.
    Delay(Duration),
}

/// A seeded source of faults shared by the wrappers of one run. Cloning shares it.
#[derive(Debug, Clone)]
pub struct FaultSchedule {
    seed: u64,
    /// Percent of calls that get a fault while the schedule is active.
    rate: u64,
    /// Percent of messages the broker refuses for good.
    refuse_rate: u64,
    /// Percent of history entries read back as undecodable.
    undecodable_rate: u64,
    active: Arc<AtomicBool>,
    /// Calls so far per key (a message id, or a kind of store call).
    calls: Arc<Mutex<HashMap<String, u64>>>,
    applied: Arc<Mutex<Vec<String>>>,
}

impl FaultSchedule {
    /// Faults on about `rate` percent of calls and refusals of about `refuse_rate` percent of
    /// messages, from `seed`.
    pub fn new(seed: u64, rate: u64, refuse_rate: u64) -> Self {
        FaultSchedule {
            seed,
            rate,
            refuse_rate,
            undecodable_rate: 0,
            active: Arc::new(AtomicBool::new(true)),
            calls: Arc::default(),
            applied: Arc::default(),
        }
    }

    /// The fault for the next call about `key` (a message id, or a kind of store call).
    pub fn next(&self, key: &str) -> Fault {
        let call = {
            let mut calls = self.calls.lock();
            let n = calls.entry(key.to_owned()).or_default();
            *n += 1;
            *n
        };
        if !self.active.load(Ordering::SeqCst) {
            return Fault::Pass;
        }
        let roll = splitmix(hash(self.seed, key) ^ call.wrapping_mul(0xD6E8_FEB8_6659_FD93));
        if roll % 100 >= self.rate {
            return Fault::Pass;
        }
        let fault = match (roll >> 8) % 3 {
            0 => Fault::Transient,
            1 => Fault::AfterTheFact,
            _ => Fault::Delay(Duration::from_millis((roll >> 16) % 30)),
        };
        self.applied
            .lock()
            .push(format!("{key}, call {call}: {fault:?}"));
        fault
    }

    /// Whether the broker refuses the message `id` (always the same answer for an id, and
    /// also once the schedule is healed: a refusal is the message's, not the moment's).
    pub fn refuses(&self, id: &str) -> bool {
        hash(self.seed ^ 0x5EED, id) % 100 < self.refuse_rate
    }

    /// Also read about `rate` percent of history entries back as undecodable (always the same
    /// entries, by message id), as a backend does with an entry it cannot decode.
    #[must_use]
    pub fn with_undecodable(mut self, rate: u64) -> Self {
        self.undecodable_rate = rate;
        self
    }

    /// Whether the history entry of message `id` reads back as undecodable.
    pub fn undecodable(&self, id: &str) -> bool {
        hash(self.seed ^ 0xDEC0DE, id) % 100 < self.undecodable_rate
    }

    /// No more faults from now on (refusals stay).
    pub fn heal(&self) {
        self.active.store(false, Ordering::SeqCst);
    }

    /// The faults applied so far, in order.
    pub fn applied(&self) -> Vec<String> {
        self.applied.lock().clone()
    }
}

/// A broker whose publishes fail as its [`FaultSchedule`] says (see the module docs).
#[derive(Debug, Clone)]
pub struct FaultyBroker {
    inner: Arc<dyn Broker>,
    schedule: FaultSchedule,
    /// When the wrapped broker took each publish, per topic.
    taken: Arc<Mutex<HashMap<String, Vec<tokio::time::Instant>>>>,
}

impl FaultyBroker {
    /// Wrap `inner`.
    pub fn new(inner: Arc<dyn Broker>, schedule: FaultSchedule) -> Self {
        FaultyBroker {
            inner,
            schedule,
            taken: Arc::default(),
        }
    }

    /// When each publish to `topic` that the wrapped broker took (its publish returned
    /// `Ok`, whatever the wrapper then reported) was sent, in order of the broker's answers.
    pub fn taken_at(&self, topic: &str) -> Vec<tokio::time::Instant> {
        self.taken.lock().get(topic).cloned().unwrap_or_default()
    }
}

fn hash(seed: u64, key: &str) -> u64 {
    key.bytes().fold(seed, |h, b| splitmix(h ^ u64::from(b)))
}

fn transient(what: &str) -> Error {
    Error::new(
        ErrorKind::Connection,
        format!("injected fault: {what} lost the connection"),
    )
    .with_retryable(true)
}

fn after_the_fact(what: &str) -> Error {
    Error::new(
        ErrorKind::Timeout,
        format!("injected fault: {what} timed out after it was done"),
    )
    .with_retryable(true)
}

/// The fault `schedule` (if a wrapper has one) gives the next call of kind `what`.
fn scheduled(schedule: Option<&FaultSchedule>, what: &str) -> Fault {
    schedule.map_or(Fault::Pass, |schedule| schedule.next(what))
}

/// Run `call` as `fault` says.
async fn faulted<T>(
    fault: Fault,
    what: &str,
    call: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    match fault {
        Fault::Pass => call.await,
        Fault::Transient => Err(transient(what)),
        Fault::AfterTheFact => {
            call.await?;
            Err(after_the_fact(what))
        }
        Fault::Delay(by) => {
            tokio::time::sleep(by).await;
            call.await
        }
    }
}

#[async_trait]
impl Publisher for FaultyBroker {
    async fn publish(&self, topic: &str, message: Message) -> Result<()> {
        if self.schedule.refuses(message.id()) {
            return Err(Error::new(
                ErrorKind::Rejected,
                format!(
                    "injected fault: the broker refuses message {}",
                    message.id()
                ),
            ));
        }
        let fault = self.schedule.next(message.id());
        // Timed when the caller let it go, not when the broker answered: a slow broker
        // must not look like a caller sending too fast.
        let sent = tokio::time::Instant::now();
        let publish = async {
            let published = self.inner.publish(topic, message).await;
            if published.is_ok() {
                self.taken
                    .lock()
                    .entry(topic.to_owned())
                    .or_default()
                    .push(sent);
            }
            published
        };
        faulted(fault, "publish", publish).await
    }

    /// In order, one at a time; a transient fault fails the rest of the batch unsent, as a
    /// lost connection does.
    async fn publish_batch(
        &self,
        topic: &str,
        messages: Vec<Message>,
    ) -> helix_messaging_core::BatchReport {
        let total = messages.len();
        let mut failures = Vec::new();
        let mut lost: Option<Error> = None;
        for (index, message) in messages.into_iter().enumerate() {
            if let Some(err) = &lost {
                failures.push((index, err.copy_without_source()));
                continue;
            }
            if let Err(err) = self.publish(topic, message).await {
                if err.kind() == ErrorKind::Connection {
                    lost = Some(err.copy_without_source());
                }
                failures.push((index, err));
            }
        }
        helix_messaging_core::BatchReport::new(total, failures)
    }
}

#[async_trait]
impl Subscriber for FaultyBroker {
    /// The wrapped broker's subscription, whose deliveries the schedule may drop with the
    /// connection (the delivery goes back to the broker, requeued, and the stream reports the
    /// loss and keeps going, as the adapters do) or delay.
    async fn subscribe(&self, topic: &str, options: SubscribeOptions) -> Result<Subscription> {
        let inner = self.inner.subscribe(topic, options).await?;
        let (name, group, system) = (
            Arc::<str>::from(inner.topic()),
            inner.group().map(Arc::<str>::from),
            inner.system(),
        );
        let schedule = self.schedule.clone();
        let key = format!("a delivery on {topic}");
        let deliveries = inner.then(move |item| {
            let fault = match &item {
                Ok(_) => schedule.next(&key),
                Err(_) => Fault::Pass,
            };
            async move {
                match (fault, item) {
                    (Fault::Transient | Fault::AfterTheFact, Ok(delivery)) => {
                        let _ = delivery.nack(true).await;
                        Err(transient("a subscription"))
                    }
                    (Fault::Delay(by), item) => {
                        tokio::time::sleep(by).await;
                        item
                    }
                    (_, item) => item,
                }
            }
        });
        let subscription = Subscription::new(name, group, Box::pin(deliveries));
        Ok(match system {
            Some(system) => subscription.with_system(system),
            None => subscription,
        })
    }
}

#[async_trait]
impl Broker for FaultyBroker {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    async fn health(&self) -> Health {
        self.inner.health().await
    }

    /// The wrapped broker's history, with the entries the schedule makes undecodable read
    /// back as [`ErrorKind::Serialization`] errors.
    async fn read_range(&self, topic: &str, range: TimeRange) -> Result<HistoryStream> {
        let schedule = self.schedule.clone();
        let entries = self.inner.read_range(topic, range).await?;
        Ok(Box::pin(entries.map(move |entry| match entry {
            Ok(entry) if schedule.undecodable(entry.message.id()) => Err(Error::new(
                ErrorKind::Serialization,
                format!(
                    "injected fault: the entry of {} cannot be decoded",
                    entry.message.id()
                ),
            )),
            other => other,
        })))
    }

    async fn backlog(&self, topic: &str, group: &str) -> Result<helix_messaging_core::Backlog> {
        self.inner.backlog(topic, group).await
    }

    async fn close(&self) -> Result<()> {
        self.inner.close().await
    }
}

/// A spool whose calls fail as its [`FaultSchedule`] says: an append can fail before it is
/// written or after (see the module docs); the other calls fail before they act.
#[derive(Clone)]
pub struct FaultySpool {
    inner: Arc<dyn Spool>,
    schedule: FaultSchedule,
}

impl std::fmt::Debug for FaultySpool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultySpool")
            .field("schedule", &self.schedule)
            .finish_non_exhaustive()
    }
}

impl FaultySpool {
    /// Wrap `inner`.
    pub fn new(inner: Arc<dyn Spool>, schedule: FaultSchedule) -> Self {
        FaultySpool { inner, schedule }
    }
}

#[async_trait]
impl Spool for FaultySpool {
    async fn append(&self, topic: &str, messages: &[Message]) -> Result<i64> {
        let fault = self.schedule.next("spool append");
        faulted(fault, "spool append", self.inner.append(topic, messages)).await
    }

    async fn oldest(&self, limit: usize) -> Result<Vec<SpooledMessage>> {
        let fault = self.schedule.next("spool read");
        faulted(fault, "spool read", self.inner.oldest(limit)).await
    }

    async fn remove(&self, seqs: &[i64]) -> Result<()> {
        let fault = self.schedule.next("spool remove");
        faulted(fault, "spool remove", self.inner.remove(seqs)).await
    }

    async fn refuse(&self, seq: i64, reason: &str) -> Result<()> {
        let fault = self.schedule.next("spool set aside");
        faulted(fault, "spool set aside", self.inner.refuse(seq, reason)).await
    }

    async fn refused(&self, limit: usize) -> Result<Vec<RefusedMessage>> {
        self.inner.refused(limit).await
    }

    async fn release_refused(&self, seq: i64, retry: bool) -> Result<bool> {
        self.inner.release_refused(seq, retry).await
    }

    async fn topics(&self) -> Result<HashMap<String, i64>> {
        self.inner.topics().await
    }

    async fn stats(&self) -> Result<SpoolStats> {
        self.inner.stats().await
    }
}

/// Poll `future` at most `polls` times, yielding to the runtime between polls, then drop
/// it: `None` if it had not finished, which cancels it at whatever await point it reached.
pub async fn cancel_after_polls<F: std::future::Future>(
    future: F,
    polls: usize,
) -> Option<F::Output> {
    let mut future = std::pin::pin!(future);
    for _ in 0..polls {
        if let Some(output) = futures::FutureExt::now_or_never(future.as_mut()) {
            return Some(output);
        }
        tokio::task::yield_now().await;
    }
    None
}

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
    settings: crate::Settings,
}

/// The outcome of a [`SpoolHarness`] run.
#[derive(Debug)]
pub struct PlaneReport {
    backend: String,
    seeds: usize,
    failures: Vec<String>,
}

impl PlaneReport {
    /// Panic with every failing seed's report unless every seed kept the promise.
    pub fn assert_holds(&self) {
        assert!(
            self.failures.is_empty(),
            "the reliability plane on {} broke its promise (rerun one seed with HELIX_PLANE_SEED):\n{}",
            self.backend,
            self.failures.join("\n\n")
        );
        assert!(self.seeds > 0, "no seed ran on {}", self.backend);
    }
}

/// The seeds to run: `HELIX_PLANE_SEED`, else 1 to `HELIX_PLANE_SEEDS` (default 20).
fn seeds() -> Vec<u64> {
    crate::helpers::seeds_from_env("HELIX_PLANE_SEED", "HELIX_PLANE_SEEDS", (1..=20).collect())
}

/// What one seeded run saw, as the reports need it.
trait SeedRun {
    /// The promises broken (empty if every one was kept).
    fn violations(&self) -> Vec<String>;
    /// The run in numbers.
    fn summary(&self) -> String;
    /// The faults applied, in order.
    fn faults(&self) -> &[String];
    /// What was observed, for a failing seed's report.
    fn observed(&self) -> String;
}

/// Run every seed with `run` (a seed and a size); a failing seed is shrunk to the smallest
/// size that still fails, and reported with its faults and what was observed.
async fn run_seeds<R, F, Fut>(backend: &str, what: &str, size: usize, run: F) -> PlaneReport
where
    R: SeedRun,
    F: Fn(u64, usize) -> Fut,
    Fut: std::future::Future<Output = R>,
{
    let seeds = seeds();
    let mut failures = Vec::new();
    for &seed in &seeds {
        let first = run(seed, size).await;
        let violations = first.violations();
        if violations.is_empty() {
            println!(
                "plane[{backend}] {what} seed {seed}: kept its promise ({})",
                first.summary()
            );
            continue;
        }
        let mut shortest = (size, first, violations);
        for smaller in [5, 10, 20, 40] {
            if smaller >= shortest.0 {
                break;
            }
            let again = run(seed, smaller).await;
            let violations = again.violations();
            if !violations.is_empty() {
                shortest = (smaller, again, violations);
                break;
            }
        }
        let (size, failed, violations) = shortest;
        let report = format!(
            "plane[{backend}] {what} seed {seed}: BROKEN with {size} messages ({})\n  violations:\n    {}\n  faults applied:\n    {}\n  {}",
            failed.summary(),
            violations.join("\n    "),
            failed.faults().join("\n    "),
            failed.observed(),
        );
        println!("{report}");
        failures.push(report);
    }
    PlaneReport {
        backend: backend.to_owned(),
        seeds: seeds.len(),
        failures,
    }
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
            settings: crate::Settings::from_env(),
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
        let topics: Vec<String> = (0..3).map(|_| crate::fresh_name("plane")).collect();
        // Observed on the broker itself, through groups that exist before the first publish.
        let mut subscriptions = Vec::new();
        for topic in &topics {
            match broker
                .subscribe(topic, SubscribeOptions::group(crate::fresh_name("watch")))
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

/// Drive a breaker through a seeded sequence of permits, outcomes, abandoned calls,
/// deliveries and time (on a paused tokio clock), then heal: its probe count must never
/// underflow (a panic in debug builds), and once calls succeed again a half-open or open
/// breaker must close. `Err` describes the seed and the steps on a violation.
///
/// # Errors
/// The violation, with the seed and the steps taken.
pub async fn check_breaker(seed: u64) -> std::result::Result<(), String> {
    let interval = Duration::from_secs(1);
    let breaker = CircuitBreaker::new(
        format!("plane-{seed}"),
        BreakerConfig {
            failure_threshold: 2,
            open_interval: interval,
            half_open_probes: 1 + (seed % 2) as u32,
        },
    )
    .map_err(|e| e.to_string())?;
    let down = Error::new(ErrorKind::Connection, "down").with_retryable(true);
    let mut permits = Vec::new();
    let mut steps = Vec::new();
    for step in 0..300u64 {
        let roll = splitmix(seed ^ step.wrapping_mul(0xA24B_AED4_963E_E407));
        let op = roll % 7;
        steps.push(op);
        let outcome = std::panic::AssertUnwindSafe(async {
            match op {
                0 | 1 => {
                    if let Ok(permit) = breaker.acquire() {
                        permits.push(permit);
                    }
                }
                2 if !permits.is_empty() => {
                    let permit = permits.remove(((roll >> 8) as usize) % permits.len());
                    permit.record(None);
                }
                3 if !permits.is_empty() => {
                    let permit = permits.remove(((roll >> 8) as usize) % permits.len());
                    permit.record(Some(&down));
                }
                4 if !permits.is_empty() => {
                    drop(permits.remove(((roll >> 8) as usize) % permits.len()));
                }
                5 => breaker.observe((roll >> 8).is_multiple_of(2).then_some(&down)),
                _ => tokio::time::advance(interval / 2).await,
            }
        });
        if let Err(panic) = futures::FutureExt::catch_unwind(outcome).await {
            let text = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default();
            return Err(format!(
                "breaker seed {seed}: panicked at step {step} ({text}); steps {steps:?}"
            ));
        }
    }
    // Healed: every call abandoned, the interval passed, calls succeed.
    permits.clear();
    tokio::time::advance(interval).await;
    for _ in 0..3 {
        let _ = breaker.call(async { Ok::<(), Error>(()) }).await;
    }
    match breaker.state() {
        BreakerState::Closed => Ok(()),
        state => Err(format!(
            "breaker seed {seed}: still {state:?} after the broker answered again; steps {steps:?}"
        )),
    }
}

/// [`check_breaker`] over every seed (`HELIX_PLANE_SEEDS`, `HELIX_PLANE_SEED`).
///
/// # Panics
/// On the first seed that breaks the breaker's promise.
pub async fn assert_breaker_holds() {
    for seed in seeds() {
        if let Err(violation) = check_breaker(seed).await {
            panic!("{violation}");
        }
    }
}

/// A dead-letter store whose calls fail (a retryable connection error, before the call acts)
/// while it is set down, and otherwise as its [`FaultSchedule`] says, if it has one: before
/// the call acts, after it acted (a write done but reported failed), or late. It counts the
/// inserts tried.
#[derive(Debug)]
pub struct FaultyDeadLetterStore<S> {
    inner: S,
    down: AtomicBool,
    /// Only removals fail.
    removals_down: AtomicBool,
    inserts: std::sync::atomic::AtomicU64,
    schedule: Option<FaultSchedule>,
    /// Entries a fault may have left held, with the version they were left at: claimed by a
    /// call reported failed, held anew by an update reported failed, or not let go or
    /// removed because the write failed before it acted.
    stranded: Mutex<std::collections::HashSet<(String, u64)>>,
}

impl<S> FaultyDeadLetterStore<S> {
    /// Wrap `inner`, up.
    pub fn new(inner: S) -> Self {
        FaultyDeadLetterStore {
            inner,
            down: AtomicBool::new(false),
            removals_down: AtomicBool::new(false),
            inserts: std::sync::atomic::AtomicU64::default(),
            schedule: None,
            stranded: Mutex::default(),
        }
    }

    /// The entries a scheduled fault may have left held until their claims run out (as the
    /// processor intends when a store write fails), each with the version it was left at:
    /// an entry written again since is no longer explained by the fault.
    pub fn stranded(&self) -> std::collections::HashSet<(String, u64)> {
        self.stranded.lock().clone()
    }

    fn fault(&self, what: &str) -> Fault {
        scheduled(self.schedule.as_ref(), what)
    }

    fn strand<'a>(&self, entries: impl IntoIterator<Item = (&'a str, u64)>) {
        self.stranded
            .lock()
            .extend(entries.into_iter().map(|(id, v)| (id.to_owned(), v)));
    }

    /// A claim of kind `what`: one that takes effect and is then reported failed strands
    /// what it claimed.
    async fn claim_call(
        &self,
        what: &str,
        call: impl std::future::Future<Output = Result<Vec<StoredDeadLetter>>>,
    ) -> Result<Vec<StoredDeadLetter>> {
        self.check(what)?;
        match self.fault(what) {
            Fault::AfterTheFact => {
                let claimed = call.await?;
                self.strand(claimed.iter().map(|e| (e.id(), e.version)));
                Err(after_the_fact(what))
            }
            fault => faulted(fault, what, call).await,
        }
    }

    /// A write of kind `what` to `entries` (id and the version it names): one that fails
    /// before it acts strands them at that version; `holding` (an update that holds its
    /// entry, at the next version) strands it if the write took effect and was reported
    /// failed.
    async fn write_call<T>(
        &self,
        what: &str,
        entries: &[(&str, u64)],
        holding: Option<(&str, u64)>,
        call: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        self.check(what)?;
        let fault = self.fault(what);
        match fault {
            Fault::Transient => self.strand(entries.iter().copied()),
            Fault::AfterTheFact => self.strand(holding),
            _ => {}
        }
        faulted(fault, what, call).await
    }

    /// Also fail calls as `schedule` says (each kind of call keyed by what it is, so a seed
    /// replays the same faults).
    #[must_use]
    pub fn with_schedule(mut self, schedule: FaultSchedule) -> Self {
        self.schedule = Some(schedule);
        self
    }

    /// Run `call` (a call of kind `what`) as the store's state and schedule say.
    async fn call<T>(
        &self,
        what: &str,
        call: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        self.check(what)?;
        faulted(self.fault(what), what, call).await
    }

    /// Fail every removal from now on (`true`), the other calls passing through, or pass
    /// removals through again.
    pub fn set_removals_down(&self, down: bool) {
        self.removals_down.store(down, Ordering::SeqCst);
    }

    fn check_removal(&self) -> Result<()> {
        if self.removals_down.load(Ordering::SeqCst) {
            Err(transient("a DLQ removal"))
        } else {
            Ok(())
        }
    }

    /// Fail every call from now on (`true`), or pass them through again.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// Inserts tried so far, failed ones included.
    pub fn inserts_tried(&self) -> u64 {
        self.inserts.load(Ordering::SeqCst)
    }

    fn check(&self, what: &str) -> Result<()> {
        if self.down.load(Ordering::SeqCst) {
            Err(transient(what))
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl<S: DeadLetterStore> DeadLetterStore for FaultyDeadLetterStore<S> {
    async fn insert(&self, entry: StoredDeadLetter) -> Result<bool> {
        self.inserts.fetch_add(1, Ordering::SeqCst);
        // Keyed by entry: a report names the entry an insert failed (or only seemed to) for.
        let what = format!("a DLQ insert of {}", entry.id());
        self.call(&what, self.inner.insert(entry)).await
    }

    async fn get(&self, id: &str) -> Result<Option<StoredDeadLetter>> {
        self.call("a DLQ read", self.inner.get(id)).await
    }

    async fn list(
        &self,
        filter: &DlqFilter,
        limit: usize,
        offset: usize,
    ) -> Result<Vec<StoredDeadLetter>> {
        self.call("a DLQ listing", self.inner.list(filter, limit, offset))
            .await
    }

    async fn count(&self, filter: &DlqFilter) -> Result<u64> {
        self.call("a DLQ count", self.inner.count(filter)).await
    }

    async fn ids(&self, filter: &DlqFilter) -> Result<Vec<String>> {
        self.call("a DLQ selection", self.inner.ids(filter)).await
    }

    async fn claim_due(
        &self,
        now: std::time::SystemTime,
        lease: Duration,
        limit: usize,
    ) -> Result<Vec<StoredDeadLetter>> {
        self.claim_call(
            "a DLQ claim of due entries",
            self.inner.claim_due(now, lease, limit),
        )
        .await
    }

    async fn update(&self, entry: &StoredDeadLetter) -> Result<bool> {
        let holding = entry
            .claimed_until
            .filter(|until| *until > std::time::SystemTime::now())
            .map(|_| (entry.id(), entry.version + 1));
        self.write_call(
            "a DLQ update",
            &[(entry.id(), entry.version)],
            holding,
            self.inner.update(entry),
        )
        .await
    }

    async fn claim(
        &self,
        ids: &[String],
        now: std::time::SystemTime,
        lease: Duration,
    ) -> Result<Vec<StoredDeadLetter>> {
        self.claim_call("a DLQ claim", self.inner.claim(ids, now, lease))
            .await
    }

    async fn remove(&self, id: &str, version: u64) -> Result<bool> {
        self.check_removal()?;
        self.write_call(
            "a DLQ removal",
            &[(id, version)],
            None,
            self.inner.remove(id, version),
        )
        .await
    }

    async fn remove_many(&self, entries: &[(String, u64)]) -> Result<u64> {
        self.check_removal()?;
        let named: Vec<(&str, u64)> = entries.iter().map(|(id, v)| (id.as_str(), *v)).collect();
        self.write_call(
            "a DLQ removal",
            &named,
            None,
            self.inner.remove_many(entries),
        )
        .await
    }

    async fn purge(&self, filter: &DlqFilter) -> Result<u64> {
        self.call("a DLQ purge", self.inner.purge(filter)).await
    }

    async fn groups(&self, filter: &DlqFilter) -> Result<Vec<FailureGroup>> {
        self.call("a DLQ grouping", self.inner.groups(filter)).await
    }

    async fn stats(&self) -> Result<DlqStats> {
        self.call("the DLQ's stats", self.inner.stats()).await
    }
}

/// A replay store that lets other tasks run before each call (as a store across a network
/// does) and whose lease claims and renewals fail (a retryable connection error) while set
/// down, the other calls passing through: a handler cut off from the store's leases.
pub struct FaultyReplayStore {
    inner: Arc<dyn ReplayStore>,
    claims_down: AtomicBool,
    schedule: Option<FaultSchedule>,
}

impl std::fmt::Debug for FaultyReplayStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultyReplayStore")
            .field("claims_down", &self.claims_down)
            .finish_non_exhaustive()
    }
}

impl FaultyReplayStore {
    /// Wrap `inner`, up.
    pub fn new(inner: Arc<dyn ReplayStore>) -> Self {
        FaultyReplayStore {
            inner,
            claims_down: AtomicBool::new(false),
            schedule: None,
        }
    }

    /// Also fail calls as `schedule` says: before a call acts, after it acted (a write done
    /// but reported failed), or late; each kind of call keyed by what it is.
    #[must_use]
    pub fn with_schedule(mut self, schedule: FaultSchedule) -> Self {
        self.schedule = Some(schedule);
        self
    }

    /// Run `call` (of kind `what`) as the schedule says, after letting other tasks run.
    async fn call<T>(
        &self,
        what: &str,
        call: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        tokio::task::yield_now().await;
        faulted(scheduled(self.schedule.as_ref(), what), what, call).await
    }

    /// Fail every claim and renewal from now on (`true`), or pass them through again.
    pub fn set_claims_down(&self, down: bool) {
        self.claims_down.store(down, Ordering::SeqCst);
    }
}

#[async_trait]
impl ReplayStore for FaultyReplayStore {
    async fn create(
        &self,
        record: &ReplayRecord,
        owner: &str,
        duration: Duration,
    ) -> Result<Option<ReplayLease>> {
        self.call(
            "a replay creation",
            self.inner.create(record, owner, duration),
        )
        .await
    }

    async fn save(&self, record: &ReplayRecord, lease: &ReplayLease) -> Result<bool> {
        self.call("a replay checkpoint", self.inner.save(record, lease))
            .await
    }

    async fn load(&self, id: &str) -> Result<Option<ReplayRecord>> {
        self.call("a replay read", self.inner.load(id)).await
    }

    async fn list(&self) -> Result<Vec<ReplayRecord>> {
        self.call("a replay listing", self.inner.list()).await
    }

    async fn remove(&self, id: &str) -> Result<bool> {
        self.call("a replay removal", self.inner.remove(id)).await
    }

    async fn claim(
        &self,
        id: &str,
        owner: &str,
        duration: Duration,
    ) -> Result<Option<ReplayLease>> {
        if self.claims_down.load(Ordering::SeqCst) {
            return Err(transient("a replay lease claim"));
        }
        self.call(
            "a replay lease claim",
            self.inner.claim(id, owner, duration),
        )
        .await
    }

    async fn renew(&self, id: &str, lease: &ReplayLease, duration: Duration) -> Result<bool> {
        if self.claims_down.load(Ordering::SeqCst) {
            return Err(transient("a replay lease renewal"));
        }
        self.call(
            "a replay lease renewal",
            self.inner.renew(id, lease, duration),
        )
        .await
    }

    async fn release(&self, id: &str, lease: &ReplayLease) -> Result<()> {
        self.call("a replay lease release", self.inner.release(id, lease))
            .await
    }
}

/// What one seeded replay run saw.
#[derive(Debug, Default)]
struct ReplayRun {
    /// The source's messages, in order.
    sent: Vec<(String, String)>,
    /// Ids the broker refuses for good.
    refused: std::collections::HashSet<String>,
    /// Ids whose source entry reads back undecodable.
    undecodable: std::collections::HashSet<String>,
    /// The target's copies of this replay, in order: id and key.
    copies: Vec<(String, String)>,
    /// The last progress seen.
    progress: Option<ReplayProgress>,
    /// How each handler ("process") of the run ended.
    processes: Vec<String>,
    faults: Vec<String>,
    problems: Vec<String>,
}

impl SeedRun for ReplayRun {
    fn faults(&self) -> &[String] {
        &self.faults
    }

    fn observed(&self) -> String {
        format!("progress: {:?}", self.progress)
    }

    fn summary(&self) -> String {
        let p = self.progress.as_ref();
        format!(
            "{} messages, {} copies; replayed {:?}, failed {:?} ({} refused, {} undecodable); processes: {}; {} faults",
            self.sent.len(),
            self.copies.len(),
            p.map(|p| p.replayed),
            p.map(|p| p.failed),
            self.refused.len(),
            self.undecodable.len(),
            self.processes.join(", "),
            self.faults.len()
        )
    }

    /// The replay's promises, broken in each of these ways (empty if kept).
    fn violations(&self) -> Vec<String> {
        let mut violations = self.problems.clone();
        let Some(progress) = &self.progress else {
            violations.push("no progress was ever observed".into());
            return violations;
        };
        if progress.status != ReplayStatus::Completed {
            violations.push(format!(
                "the replay ended {} ({:?}), not completed",
                progress.status.as_str(),
                progress.last_error
            ));
            return violations;
        }
        let lost: std::collections::HashSet<&String> =
            self.refused.union(&self.undecodable).collect();
        let total = self.sent.len() as u64;
        let failed = self.sent.iter().filter(|(id, _)| lost.contains(id)).count() as u64;
        if (
            progress.total,
            progress.replayed,
            progress.skipped,
            progress.failed,
        ) != (total, total - failed, 0, failed)
        {
            violations.push(format!(
                "counts: total {} replayed {} skipped {} failed {}; expected total {total}, replayed {}, failed {failed} (the refused and undecodable ones)",
                progress.total,
                progress.replayed,
                progress.skipped,
                progress.failed,
                total - failed
            ));
        }
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for (id, _) in &self.copies {
            *counts.entry(id.as_str()).or_default() += 1;
        }
        for (id, _) in &self.sent {
            let copies = counts.get(id.as_str()).copied().unwrap_or(0);
            match (lost.contains(id), copies) {
                (true, 0) | (false, 1) => {}
                (true, n) => violations.push(format!(
                    "{id} cannot be replayed (refused or undecodable) but has {n} copies"
                )),
                (false, 0) => violations.push(format!("{id} was never copied")),
                (false, n) => violations.push(format!("{id} was copied {n} times")),
            }
        }
        let order = |messages: &mut dyn Iterator<Item = &(String, String)>| {
            let mut keys: BTreeMap<String, Vec<String>> = BTreeMap::new();
            let mut seen = std::collections::HashSet::new();
            for (id, key) in messages {
                if seen.insert(id.clone()) {
                    keys.entry(key.clone()).or_default().push(id.clone());
                }
            }
            keys
        };
        let expected = order(&mut self.sent.iter().filter(|(id, _)| !lost.contains(id)));
        let copied = order(&mut self.copies.iter());
        for (key, ids) in &expected {
            let got = copied.get(key).cloned().unwrap_or_default();
            if &got != ids {
                violations.push(format!(
                    "key {key}: copied in the order {got:?}, the source's is {ids:?}"
                ));
            }
        }
        violations
    }
}

/// Seeded replays over one backend: the source's history is replayed through a
/// [`FaultyBroker`] (transient, ambiguous and delayed publishes, refused messages,
/// undecodable entries), with its checkpoints and leases in a [`FaultyReplayStore`] failing
/// on a schedule of its own (before a call acts, after it acted, or late), by handlers ("processes", each on a runtime of its own) killed at a
/// seeded moment and followed by a new one on the same store, as a restarted service would
/// be; from the fourth on the faults are healed. Checked after each seed: the replay
/// completes; every entry that can be replayed appears in the target exactly once, in the
/// source's order per key; the refused and undecodable ones not at all and counted failed;
/// and `replayed + skipped + failed == total` at every observation, with `total` never past
/// the window.
pub struct ReplayHarness {
    backend: String,
    factory: Factory,
    messages: usize,
}

/// Times a replay process tries a store call its schedule fails before it gives up.
const STORE_TRIES: u32 = 50;

/// Handlers one seeded replay goes through at most.
const PROCESSES: u64 = 6;

impl ReplayHarness {
    /// A harness building a fresh broker of `backend` (one that keeps history) for every
    /// run with `factory`.
    pub fn new<F, Fut>(backend: impl Into<String>, factory: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<Arc<dyn Broker>>> + Send + 'static,
    {
        ReplayHarness {
            backend: backend.into(),
            factory: Arc::new(move || futures::FutureExt::boxed(factory())),
            messages: 60,
        }
    }

    /// Run every seed; a failing seed is shrunk to the fewest messages that still fail.
    pub async fn run(self) -> PlaneReport {
        run_seeds(&self.backend, "replay", self.messages, |seed, messages| {
            self.run_seed(seed, messages)
        })
        .await
    }

    async fn run_seed(&self, seed: u64, messages: usize) -> ReplayRun {
        let mut run = ReplayRun::default();
        let broker = match (self.factory)().await {
            Ok(broker) => broker,
            Err(err) => {
                run.problems.push(format!("creating the broker: {err}"));
                return run;
            }
        };
        let source = crate::fresh_name("plane-replay");
        let target = format!("{source}.copies");
        let from = SystemTime::now() - Duration::from_secs(1);
        let sent: Vec<Message> = (0..messages)
            .map(|i| {
                Message::new(format!("entry {i}"))
                    .with_id(format!("s{seed}-e{i}"))
                    .with_key(format!("k{}", i % 5))
            })
            .collect();
        if let Err(err) = broker
            .publish_batch(&source, sent.clone())
            .await
            .into_result()
        {
            run.problems.push(format!("writing the source: {err}"));
            let _ = broker.close().await;
            return run;
        }
        let to = SystemTime::now() + Duration::from_secs(1);
        let schedule = FaultSchedule::new(seed, 25, 5).with_undecodable(5);
        for message in &sent {
            let id = message.id().to_owned();
            if schedule.refuses(&id) {
                run.refused.insert(id.clone());
            }
            if schedule.undecodable(&id) {
                run.undecodable.insert(id.clone());
            }
            run.sent
                .push((id, message.key().unwrap_or_default().to_owned()));
        }
        let faulty: Arc<dyn Broker> = Arc::new(FaultyBroker::new(broker.clone(), schedule.clone()));
        // The store fails too, less often, on a schedule of its own.
        let store_schedule = FaultSchedule::new(seed ^ 0x5EB1A, 5, 0);
        let store: Arc<dyn ReplayStore> = Arc::new(
            FaultyReplayStore::new(Arc::new(MemoryReplayStore::new()))
                .with_schedule(store_schedule.clone()),
        );
        let roll = splitmix(seed ^ 0x04E5_01A7);
        let config = ReplayConfig {
            publish_attempts: 3,
            retry_delay: Duration::from_millis(1),
            checkpoint_interval: Duration::from_millis((roll % 3) * 5),
            lease: Duration::from_secs(2),
            instance_id: Some("plane".into()),
            ..ReplayConfig::default()
        };
        let request = ReplayRequest::new(&source, from, to)
            .with_id(format!("plane-{seed}"))
            .with_target_topic(&target)
            .with_options(ReplayOptions {
                batch_size: 1 + (roll >> 8) as usize % 7,
                ..ReplayOptions::default()
            });
        for process in 0..PROCESSES {
            if process >= 3 {
                schedule.heal();
                store_schedule.heal();
            }
            // Killed once it has dealt with a seeded share of the window (on any backend,
            // fast or slow, somewhere in the middle of it), the last one never.
            let kill_at =
                (process + 1 < PROCESSES).then(|| splitmix(roll ^ process) % (messages as u64 + 1));
            let outcome = tokio::task::spawn_blocking({
                let (faulty, store, config, request) = (
                    faulty.clone(),
                    store.clone(),
                    config.clone(),
                    request.clone(),
                );
                let window = messages as u64;
                move || {
                    replay_process(
                        faulty,
                        store,
                        config,
                        (request, window),
                        process == 0,
                        kill_at,
                    )
                }
            })
            .await
            .unwrap_or_else(|e| ProcessEnd {
                progress: None,
                how: format!("panicked: {e}"),
                problems: vec![format!("a replay process panicked: {e}")],
            });
            run.processes.push(outcome.how);
            run.problems.extend(outcome.problems);
            if let Some(progress) = outcome.progress {
                let completed = progress.status == ReplayStatus::Completed;
                run.progress = Some(progress);
                if completed {
                    break;
                }
            }
        }
        run.faults = schedule.applied();
        run.faults.extend(store_schedule.applied());
        match read_copies(&broker, &target, from, &request.id).await {
            Ok(copies) => run.copies = copies,
            Err(err) => run.problems.push(format!("reading the target: {err}")),
        }
        let _ = broker.close().await;
        run
    }
}

/// The copies replay `id` published to `target` from `from` on, in order: each one's
/// message id and key.
///
/// # Errors
/// The broker's error reading the target's history.
pub async fn read_copies(
    broker: &Arc<dyn Broker>,
    target: &str,
    from: SystemTime,
    id: &str,
) -> Result<Vec<(String, String)>> {
    Ok(read_history(broker, target, from)
        .await?
        .iter()
        .filter(|message| message.header(HEADER_REPLAY_ID) == Some(id))
        .map(|message| {
            (
                message.id().to_owned(),
                message.key().unwrap_or_default().to_owned(),
            )
        })
        .collect())
}

/// Every message `topic`'s history holds from `from` on (up to a few seconds from now), in
/// order.
///
/// # Errors
/// The broker's error reading the history, or an entry it cannot decode.
pub async fn read_history(
    broker: &Arc<dyn Broker>,
    topic: &str,
    from: SystemTime,
) -> Result<Vec<Arc<Message>>> {
    let range = TimeRange::new(from, SystemTime::now() + Duration::from_secs(5))?;
    let mut entries = broker.read_range(topic, range).await?;
    let mut messages = Vec::new();
    while let Some(entry) = entries.next().await {
        messages.push(entry?.message);
    }
    Ok(messages)
}

/// How one replay process ended.
struct ProcessEnd {
    /// The last progress it saw.
    progress: Option<ReplayProgress>,
    how: String,
    problems: Vec<String>,
}

/// One "process": a handler on a runtime of its own, which starts the replay (`first`) or
/// resumes it (taking it back through its lease, or resuming it when it failed), watches
/// its progress, and is killed (its runtime dropped at whatever await it had reached) once
/// it has seen `kill_at` entries dealt with, or runs until the replay finishes.
fn replay_process(
    broker: Arc<dyn Broker>,
    store: Arc<dyn ReplayStore>,
    config: ReplayConfig,
    (request, window): (ReplayRequest, u64),
    first: bool,
    kill_at: Option<u64>,
) -> ProcessEnd {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            return ProcessEnd {
                progress: None,
                how: "no runtime".into(),
                problems: vec![format!("building a runtime: {err}")],
            };
        }
    };
    let id = request.id.clone();
    let end = runtime.block_on(async move {
        let mut end = ProcessEnd {
            progress: None,
            how: String::new(),
            problems: Vec::new(),
        };
        // The store may fail a call (its schedule): a service retries what it can.
        let mut tries = 0;
        let handler = loop {
            match ReplayHandler::open(broker.clone(), config.clone(), store.clone()).await {
                Ok(handler) => break handler,
                Err(err) if err.is_retryable() && tries < STORE_TRIES => tries += 1,
                Err(err) => {
                    end.how = "could not open".into();
                    end.problems.push(format!("opening a handler: {err}"));
                    return end;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let mut tries = 0;
        let started = loop {
            let started = if first {
                handler.start_replay(request.clone()).await.map(drop)
            } else {
                match handler.get_progress(&id).await {
                    Ok(p) if p.status == ReplayStatus::Failed => {
                        handler.resume_replay(&id).await.map(drop)
                    }
                    Ok(_) => Ok(()),
                    Err(err) => Err(err),
                }
            };
            match started {
                // A creation that took effect although it was reported failed: the replay
                // exists, leased to this handler, whose adopt loop runs it once the lease
                // runs out.
                Err(err) if first && tries > 0 && err.to_string().contains("already exists") => {
                    break Ok(());
                }
                Err(err) if err.is_retryable() && tries < STORE_TRIES => tries += 1,
                other => break other,
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        if let Err(err) = started {
            end.how = format!("could not start: {err}");
            end.problems.push(format!("starting or resuming: {err}"));
            return end;
        }
        let began = std::time::Instant::now();
        let deadline = began + Duration::from_secs(60);
        loop {
            match handler.get_progress(&id).await {
                Ok(p) => {
                    if p.replayed + p.skipped + p.failed != p.total || p.total > window {
                        end.problems.push(format!(
                            "observed replayed {} + skipped {} + failed {}, total {} (the window holds {window})",
                            p.replayed, p.skipped, p.failed, p.total
                        ));
                    }
                    let (finished, total) = (p.status.is_finished(), p.total);
                    end.progress = Some(p);
                    if finished {
                        end.how = format!(
                            "ended {}",
                            end.progress.as_ref().map_or("", |p| p.status.as_str())
                        );
                        return end;
                    }
                    if kill_at.is_some_and(|at| total >= at) {
                        end.how = format!("killed at {total}");
                        return end;
                    }
                }
                // A store call the schedule failed: read again.
                Err(err) if err.is_retryable() => {}
                Err(err) => end.problems.push(format!("reading the progress: {err}")),
            }
            if std::time::Instant::now() > deadline {
                end.how = "stuck".into();
                end.problems.push("the replay did not finish within 60 s".into());
                return end;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    });
    // Killed where it stands: every task is dropped at the await it has reached, its lease
    // kept. Waiting for the runtime's threads to stop makes it a kill: nothing of this
    // process runs on beside the next one.
    runtime.shutdown_timeout(Duration::from_secs(10));
    end
}
