//! Seeded DLQ programs: automatic attempts, reprocesses, discards and bulk redrives of one
//! DLQ running at once over a [`FaultyBroker`], and the DLQ's promises checked afterwards.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use helix_messaging_core::dlq::{
    CanaryConfig, DeadLetter, DeadLetterFilter, DeadLetterReason, DeadLetterStore, EntryStatus,
    MemoryDeadLetterStore, Processor, ProcessorConfig, RedriveProgress, RedriveRequest,
    RedriveStatus, StoredDeadLetter,
};
use helix_messaging_core::{Broker, DeliveryInfo, Message, Result};
use parking_lot::Mutex;

use super::broker::FaultyBroker;
use super::replay::read_history;
use super::schedule::{FaultSchedule, cancel_after_polls, hash};
use super::seeds::{PlaneReport, SeedRun, run_seeds};
use super::stores::FaultyDeadLetterStore;
use crate::differential::splitmix;
use crate::helpers::{Factory, eventually, fresh_name};

/// The message type a registered handler re-drives (the others are republished).
const HANDLED_TYPE: &str = "plane.handled";

/// Dead letters sent to the DLQ topic for the running processor to ingest.
const INGESTED: usize = 6;

/// Entries only paced jobs select.
const PACED_ENTRIES: usize = 12;

/// A paced job's rate, messages a second; it sends chunks of `rate / 20`.
const PACED_RATE: f64 = 40.0;

/// How far a paced job's sends may run ahead of its rate: one chunk (sent at once), and
/// the time between a chunk's due moment and its first send (its claim in the store, which
/// the faults can delay by up to 30 ms).
const PACED_CHUNK: f64 = 2.0;
const PACED_LATENCY: Duration = Duration::from_millis(50);

/// Seeded DLQ programs over one backend. Each seed stores dead letters (some with a
/// registered handler for their type, some due for an automatic re-drive), starts the
/// processor (ingesting dead letters sent to its topic meanwhile, through deliveries the
/// faulty broker drops with the connection or delays, and re-driving what is due) and runs,
/// all at once and at seeded moments, automatic attempts, reprocesses, discards and two bulk
/// redrive jobs over the whole DLQ, through a [`FaultyBroker`] (transient, ambiguous and
/// delayed publishes) and a [`FaultyDeadLetterStore`] with a schedule of its own (store calls
/// failing before they act, after, or late); some reprocess, discard and redrive calls are
/// cancelled at a seeded await point. Checked afterwards:
///
/// - every entry, and every dead letter sent to the DLQ topic, is in the DLQ or was
///   delivered (a copy on its topic, or handled by its handler): never neither;
/// - a discard that returned `Ok` is never undone: the entry is still there, discarded;
/// - no message is delivered twice (by two jobs, a job and an attempt, a reprocess and an
///   attempt) unless a publish of it timed out after the broker took it (the ambiguous
///   case, where at-least-once is the promise);
/// - a completed job's counts add up to its selection (a job a store failure stopped, to no
///   more than it), and no entry is still held by a re-drive once every call (a cancelled
///   reprocess's own task included) has ended, unless a store fault left it so (a claim
///   reported failed after it took effect, a let-go or a removal that failed);
/// - the store's count, listing and depth agree;
/// - a paced job (every program has one, over entries only paced jobs select, with a canary
///   watch) keeps its rate over every window of its sends, the watch included: run against
///   a pacer that banked idle time (issue 27, item 6), 10 of seeds 1–20 broke here.
pub struct DlqHarness {
    backend: String,
    factory: Factory,
    entries: usize,
}

impl DlqHarness {
    /// A harness building a fresh broker of `backend` (one that keeps history, where the
    /// copies are counted) for every run with `factory`.
    pub fn new<F, Fut>(backend: impl Into<String>, factory: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<Arc<dyn Broker>>> + Send + 'static,
    {
        DlqHarness {
            backend: backend.into(),
            factory: Arc::new(move || futures::FutureExt::boxed(factory())),
            entries: 24,
        }
    }

    /// Run every seed; a failing seed is shrunk to the fewest entries that still fail.
    pub async fn run(self) -> PlaneReport {
        run_seeds(&self.backend, "dlq", self.entries, |seed, entries| {
            self.run_seed(seed, entries)
        })
        .await
    }

    async fn run_seed(&self, seed: u64, entries: usize) -> DlqRun {
        let mut run = DlqRun::default();
        let broker = match (self.factory)().await {
            Ok(broker) => broker,
            Err(err) => {
                run.problems.push(format!("creating the broker: {err}"));
                return run;
            }
        };
        let schedule = FaultSchedule::new(seed, 20, 0);
        let faulty = Arc::new(FaultyBroker::new(broker.clone(), schedule.clone()));
        let topic = fresh_name("plane-dlq-target");
        // Each paced job re-drives to a topic of its own, so its sends can be told apart.
        let mut paced_topics = Vec::new();
        let from = SystemTime::now() - Duration::from_secs(1);
        // Entries that failed on a topic of their own, not due: only the paced jobs select
        // them (the other jobs select `topic`'s), and a reprocess or a discard may hit them.
        let slow = format!("{topic}.slow");
        let memory = MemoryDeadLetterStore::new();
        let mut ids = Vec::new();
        for i in 0..entries + PACED_ENTRIES {
            let entry = if i < entries {
                dead_letter(seed, i, &topic)
            } else {
                let mut entry = dead_letter(seed, i, &slow);
                entry.next_attempt_at = None;
                entry
            };
            run.entries
                .insert(entry.id().to_owned(), entry.letter.message.id().to_owned());
            ids.push(entry.id().to_owned());
            if let Err(err) = memory.insert(entry).await {
                run.problems.push(format!("storing entry {i}: {err}"));
                return run;
            }
        }
        // The store fails too, less often: before a call acts, after it acted, or late.
        let store_schedule = FaultSchedule::new(seed ^ 0x5_70BE, 6, 0);
        let store =
            Arc::new(FaultyDeadLetterStore::new(memory).with_schedule(store_schedule.clone()));
        let processor = match Processor::new(
            faulty.clone(),
            store.clone(),
            ProcessorConfig {
                topics: vec![fresh_name("plane-dlq")],
                retry_delay: Duration::from_millis(5),
                max_retry_delay: Duration::from_millis(20),
                max_retries: 4,
                processing_timeout: Duration::from_secs(5),
                batch_size: 8,
                // The poller's first round runs at start, the next after the run: automatic
                // attempts come from the program's own calls, so the store's fault counters
                // advance with the program, not with the clock, and a seed replays.
                poll_interval: Duration::from_secs(3600),
                ..ProcessorConfig::default()
            },
        ) {
            Ok(processor) => processor,
            Err(err) => {
                run.problems.push(format!("creating the processor: {err}"));
                return run;
            }
        };
        let handled = Arc::new(Mutex::new(HashMap::<String, usize>::new()));
        register_handler(&processor, seed, handled.clone());
        // Running: it ingests its DLQ topic through the faulty broker (deliveries dropped
        // with the connection, or late).
        if let Err(err) = processor.start().await {
            run.problems.push(format!("starting the processor: {err}"));
            return run;
        }
        let dlq_topic = processor.config().topics[0].clone();
        for i in 0..INGESTED {
            let letter = dead_letter(seed, entries + PACED_ENTRIES + i, &topic).letter;
            run.ingested
                .insert(letter.id.clone(), letter.message.id().to_owned());
            if let Err(err) = broker.publish(&dlq_topic, letter.to_message()).await {
                run.problems.push(format!("dead-lettering {i}: {err}"));
                processor.stop().await;
                return run;
            }
        }

        let outcomes = Arc::new(Mutex::new(Vec::<Op>::new()));
        let mut calls = Vec::new();
        // One paced job in every program, plus those the rolls add.
        let paced_job = |step: u64, paced_topics: &mut Vec<String>| {
            let target = format!("{topic}.paced-{step}");
            paced_topics.push(target.clone());
            RedriveRequest {
                filter: DeadLetterFilter {
                    topic: Some(slow.clone()),
                    ..DeadLetterFilter::default()
                },
                target_topic: Some(target),
                rate_per_second: Some(PACED_RATE),
                // Its rate must hold over every window, the canary's watch included.
                canary: Some(CanaryConfig {
                    count: 2,
                    watch: Duration::from_millis(200),
                }),
                batch_size: 4,
                id: None,
            }
        };
        let first_paced = paced_job(u64::MAX, &mut paced_topics);
        {
            let processor = processor.clone();
            let outcomes = outcomes.clone();
            calls.push(tokio::spawn(async move {
                let started = processor.start_redrive(first_paced).await;
                outcomes
                    .lock()
                    .push(Op::Redrive(finished(Some(started.map(|job| job.id)))));
            }));
        }
        for step in 0..entries as u64 {
            let roll =
                splitmix(seed.wrapping_mul(0x9E37_79B9) ^ step.wrapping_mul(0xA24B_AED4_963E_E407));
            let wait = Duration::from_millis(roll % 15);
            let target = ids[((roll >> 8) % ids.len() as u64) as usize].clone();
            // A few calls are dropped at a seeded await point, as a caller that goes away.
            let polls = (roll >> 24)
                .is_multiple_of(6)
                .then_some(((roll >> 32) % 12) as usize + 1);
            let (processor, outcomes) = (processor.clone(), outcomes.clone());
            let kind = (roll >> 16) % 5;
            let paced = (kind == 4 && (roll >> 40).is_multiple_of(3))
                .then(|| paced_job(step, &mut paced_topics));
            let main_topic = topic.clone();
            calls.push(tokio::spawn(async move {
                tokio::time::sleep(wait).await;
                let op = match kind {
                    0 | 1 => Op::Attempts(processor.process_due().await.map_err(|e| e.to_string())),
                    2 => {
                        let call = processor.reprocess(&target, None);
                        let outcome = finished(cancellable(call, polls).await);
                        Op::Reprocess(target, outcome)
                    }
                    3 => {
                        let call = processor.discard(&target, "the plane harness discards it");
                        let outcome = finished(cancellable(call, polls).await);
                        Op::Discard(target, outcome)
                    }
                    _ => {
                        let request = paced.unwrap_or_else(|| RedriveRequest {
                            filter: DeadLetterFilter {
                                topic: Some(main_topic),
                                ..DeadLetterFilter::default()
                            },
                            batch_size: 4,
                            // Unpaced, as fast as the faulty broker confirms.
                            rate_per_second: None,
                            ..RedriveRequest::default()
                        });
                        let call = processor.start_redrive(request);
                        Op::Redrive(finished(
                            cancellable(call, polls)
                                .await
                                .map(|started| started.map(|job| job.id)),
                        ))
                    }
                };
                outcomes.lock().push(op);
            }));
        }
        for call in calls {
            if let Err(err) = call.await {
                run.problems.push(format!("a call panicked: {err}"));
            }
        }
        let jobs = eventually(
            Duration::from_secs(60),
            "every redrive job finished",
            || {
                let jobs = processor.list_redrives();
                async move { jobs.iter().all(|j| j.status.is_finished()).then_some(jobs) }
            },
        )
        .await;
        // Ingested: each dead letter is in the store, or already delivered (its entry
        // re-driven and removed). The ingest count alone would miss one whose insert took
        // effect but was reported failed.
        let until = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let waiting = not_ingested(
                &run.ingested,
                store.as_ref(),
                &broker,
                &topic,
                from,
                &handled,
            )
            .await;
            if waiting.is_empty() {
                break;
            }
            if tokio::time::Instant::now() >= until {
                run.problems.push(format!(
                    "dead letters sent to the DLQ topic and not ingested within 30 s: {waiting:?}"
                ));
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        processor.stop().await;
        schedule.heal();
        store_schedule.heal();

        run.operations = outcomes.lock().iter().map(Op::describe).collect();
        run.discarded = outcomes
            .lock()
            .iter()
            .filter_map(|op| match op {
                Op::Discard(id, Outcome::Ok(())) => Some(id.clone()),
                _ => None,
            })
            .collect();
        run.jobs = jobs;
        run.faults = schedule.applied();
        run.ambiguous = run
            .faults
            .iter()
            .filter(|f| f.ends_with("AfterTheFact"))
            .filter_map(|f| f.split(", call").next().map(str::to_owned))
            .collect();
        let store_faults = store_schedule.applied();
        // An insert that took effect but was reported failed leaves the dead letter on its
        // topic, to be ingested again, perhaps after its entry was re-driven and removed:
        // twice, at least once, as an ambiguous publish is.
        for (letter, message) in &run.ingested {
            let key = format!("a DLQ insert of {letter}");
            if store_faults
                .iter()
                .any(|f| f.starts_with(&key) && f.ends_with("AfterTheFact"))
            {
                run.ambiguous.insert(message.clone());
            }
        }
        run.faults.extend(store_faults);
        // A claim that took effect but was reported failed, or a removal or a let-go that
        // failed, leaves its entries held until their claims run out: as designed.
        run.stranded = store.stranded();
        // A cancelled reprocess goes on to its end in a task of its own: wait (a while) for
        // what such tasks still hold; what is held after that is reported.
        let until = tokio::time::Instant::now() + Duration::from_secs(5);
        while tokio::time::Instant::now() < until && any_held(store.as_ref(), &run.stranded).await {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The store first, then the target: an entry a late task removes after the store was
        // read was published before, so the target read next has its copy.
        if let Err(err) = run.read_store(store.as_ref()).await {
            run.problems.push(format!("reading the DLQ store: {err}"));
        }
        run.handled = handled.lock().clone();
        for target in [&topic, &slow].into_iter().chain(&paced_topics) {
            match copies(&broker, target, from).await {
                Ok(copies) => {
                    for (id, n) in copies {
                        *run.copies.entry(id).or_default() += n;
                    }
                }
                Err(err) => run
                    .problems
                    .push(format!("reading {target}'s history: {err}")),
            }
        }
        run.paced_sends = paced_topics.iter().map(|t| faulty.taken_at(t)).collect();
        let _ = broker.close().await;
        run
    }
}

/// The dead letters of `ingested` (letter id → message id) neither in `store` nor delivered
/// (a copy on `topic` since `from`, or handled).
async fn not_ingested(
    ingested: &BTreeMap<String, String>,
    store: &dyn DeadLetterStore,
    broker: &Arc<dyn Broker>,
    topic: &str,
    from: SystemTime,
    handled: &Mutex<HashMap<String, usize>>,
) -> Vec<String> {
    let mut missing = Vec::new();
    for (letter, message) in ingested {
        let stored = matches!(store.get(letter).await, Ok(Some(_)));
        if !stored && !handled.lock().contains_key(message) {
            missing.push((letter, message));
        }
    }
    if missing.is_empty() {
        return Vec::new();
    }
    // Only for letters neither stored nor handled: the target's history is read whole.
    let copies = copies(broker, topic, from).await.unwrap_or_default();
    missing
        .into_iter()
        .filter(|(_, message)| !copies.contains_key(*message))
        .map(|(letter, _)| letter.clone())
        .collect()
}

/// Whether a re-drive holds any entry now, `stranded` ones (still at the version a fault
/// left them at) aside; a store that cannot say counts as no.
async fn any_held(store: &dyn DeadLetterStore, stranded: &HashSet<(String, u64)>) -> bool {
    let now = SystemTime::now();
    store
        .list(&DeadLetterFilter::default(), usize::MAX, 0)
        .await
        .is_ok_and(|entries| {
            entries
                .iter()
                .any(|e| e.is_claimed(now) && !stranded.contains(&(e.id().to_owned(), e.version)))
        })
}

/// A handler for [`HANDLED_TYPE`] that takes a few milliseconds and fails about a third of
/// its calls (seeded by message id and call), counting the successes per message id.
fn register_handler(processor: &Processor, seed: u64, handled: Arc<Mutex<HashMap<String, usize>>>) {
    let calls = Arc::new(Mutex::new(HashMap::<String, u64>::new()));
    processor.register_handler(HANDLED_TYPE, move |letter: DeadLetter| {
        let (handled, calls) = (handled.clone(), calls.clone());
        async move {
            let id = letter.message.id().to_owned();
            let call = {
                let mut calls = calls.lock();
                let n = calls.entry(id.clone()).or_default();
                *n += 1;
                *n
            };
            let roll = splitmix(hash(seed ^ 0x4A4D, &id) ^ call);
            tokio::time::sleep(Duration::from_millis(roll % 8)).await;
            if roll.is_multiple_of(3) {
                return Err("the plane harness's handler fails this call".into());
            }
            *handled.lock().entry(id).or_default() += 1;
            Ok(())
        }
    });
}

/// Entry `i` of a seed: every third one of the handled type; every other one due for an
/// automatic re-drive now.
fn dead_letter(seed: u64, i: usize, topic: &str) -> StoredDeadLetter {
    let kind = if i.is_multiple_of(3) {
        HANDLED_TYPE
    } else {
        "plane.plain"
    };
    let message = Message::new(format!("dead letter {i}"))
        .with_id(format!("s{seed}-d{i}"))
        .with_header("type", kind);
    let info = DeliveryInfo {
        topic: topic.into(),
        group: Some("plane".into()),
        attempt: 3,
        redelivered: true,
        position: None,
    };
    let now = SystemTime::now();
    let at = now - Duration::from_secs(60) + Duration::from_millis(i as u64);
    let letter = DeadLetter::new(
        &message,
        &info,
        DeadLetterReason::MaxRetriesExceeded,
        "failed in the plane harness",
        at,
        at,
    );
    let mut entry = StoredDeadLetter::received(letter, now);
    if i.is_multiple_of(2) {
        entry.next_attempt_at = Some(now - Duration::from_millis(1));
    }
    entry
}

async fn cancellable<T>(
    call: impl std::future::Future<Output = Result<T>>,
    polls: Option<usize>,
) -> Option<Result<T>> {
    match polls {
        Some(polls) => cancel_after_polls(call, polls).await,
        None => Some(call.await),
    }
}

fn finished<T>(outcome: Option<Result<T>>) -> Outcome<T> {
    match outcome {
        Some(Ok(value)) => Outcome::Ok(value),
        Some(Err(err)) => Outcome::Failed(err.to_string()),
        None => Outcome::Cancelled,
    }
}

/// A window in which a paced job's sends ran ahead of its rate, if there is one: `n` sends
/// between two instants `d` apart, where the pace allows `rate × (d + latency)` plus one
/// chunk.
fn burst(sends: &[tokio::time::Instant]) -> Option<String> {
    let mut sends = sends.to_vec();
    sends.sort();
    for (i, first) in sends.iter().enumerate() {
        for (j, last) in sends.iter().enumerate().skip(i) {
            let n = (j - i + 1) as f64;
            let span = last.duration_since(*first);
            let allowed = PACED_RATE * (span + PACED_LATENCY).as_secs_f64() + PACED_CHUNK;
            if n > allowed {
                return Some(format!(
                    "a paced redrive sent {n} messages within {span:?}, more than {allowed:.1} at {PACED_RATE}/s"
                ));
            }
        }
    }
    None
}

/// Copies on `topic` since `from`, per message id.
async fn copies(
    broker: &Arc<dyn Broker>,
    topic: &str,
    from: SystemTime,
) -> Result<HashMap<String, usize>> {
    let mut copies = HashMap::new();
    for message in read_history(broker, topic, from).await? {
        *copies.entry(message.id().to_owned()).or_default() += 1;
    }
    Ok(copies)
}

enum Outcome<T> {
    Ok(T),
    Failed(String),
    Cancelled,
}

impl<T: std::fmt::Debug> Outcome<T> {
    fn describe(&self) -> String {
        match self {
            Outcome::Ok(value) => format!("ok {value:?}"),
            Outcome::Failed(err) => format!("failed: {err}"),
            Outcome::Cancelled => "cancelled".to_owned(),
        }
    }
}

/// One call of a program and how it ended.
enum Op {
    Attempts(std::result::Result<usize, String>),
    Reprocess(String, Outcome<()>),
    Discard(String, Outcome<()>),
    Redrive(Outcome<String>),
}

impl Op {
    fn describe(&self) -> String {
        match self {
            Op::Attempts(Ok(n)) => format!("attempts: {n} due"),
            Op::Attempts(Err(err)) => format!("attempts: failed: {err}"),
            Op::Reprocess(id, outcome) => format!("reprocess {id}: {}", outcome.describe()),
            Op::Discard(id, outcome) => format!("discard {id}: {}", outcome.describe()),
            Op::Redrive(outcome) => format!("redrive: {}", outcome.describe()),
        }
    }
}

/// What one seeded DLQ program saw.
#[derive(Default)]
struct DlqRun {
    problems: Vec<String>,
    faults: Vec<String>,
    /// Entry id → its message's id.
    entries: BTreeMap<String, String>,
    operations: Vec<String>,
    /// Entries whose discard returned `Ok`.
    discarded: Vec<String>,
    jobs: Vec<RedriveProgress>,
    /// Copies on the target per message id.
    copies: HashMap<String, usize>,
    /// Handler successes per message id.
    handled: HashMap<String, usize>,
    /// Message ids a publish of which timed out after the broker took it.
    ambiguous: HashSet<String>,
    /// Entries a store fault may have left held until their claims run out, with the
    /// version it left them at.
    stranded: HashSet<(String, u64)>,
    /// When the broker took each send of each paced job.
    paced_sends: Vec<Vec<tokio::time::Instant>>,
    /// The store at the end: entry id → status, whether a re-drive still holds it, and
    /// its version.
    left: BTreeMap<String, (EntryStatus, bool, u64)>,
    /// The messages of the entries in the store at the end.
    left_messages: HashSet<String>,
    /// The dead letters sent to the DLQ topic: letter id → its message's id.
    ingested: BTreeMap<String, String>,
    /// The store's count, its listing's length, and its depth.
    counted: (u64, usize, u64),
}

impl DlqRun {
    async fn read_store(&mut self, store: &dyn DeadLetterStore) -> Result<()> {
        let all = DeadLetterFilter::default();
        let listed = store.list(&all, usize::MAX, 0).await?;
        let now = SystemTime::now();
        self.left = listed
            .iter()
            .map(|e| (e.id().to_owned(), (e.status, e.is_claimed(now), e.version)))
            .collect();
        self.left_messages = listed
            .iter()
            .map(|e| e.letter.message.id().to_owned())
            .collect();
        self.counted = (
            store.count(&all).await?,
            listed.len(),
            store.stats().await?.depth,
        );
        Ok(())
    }
}

impl SeedRun for DlqRun {
    fn faults(&self) -> &[String] {
        &self.faults
    }

    fn observed(&self) -> String {
        format!(
            "operations:\n    {}\n  jobs: {:?}\n  left: {:?}\n  copies: {:?}\n  handled: {:?}",
            self.operations.join("\n    "),
            self.jobs
                .iter()
                .map(|j| (j.status, j.total, j.redriven, j.failed, j.skipped))
                .collect::<Vec<_>>(),
            self.left,
            self.copies,
            self.handled
        )
    }

    fn summary(&self) -> String {
        let delivered: usize =
            self.copies.values().sum::<usize>() + self.handled.values().sum::<usize>();
        format!(
            "{} entries, {} calls, {} jobs (paced sends {:?}); {delivered} delivered, {} left ({} discarded); {} faults ({} ambiguous)",
            self.entries.len(),
            self.operations.len(),
            self.jobs.len(),
            self.paced_sends.iter().map(Vec::len).collect::<Vec<_>>(),
            self.left.len(),
            self.discarded.len(),
            self.faults.len(),
            self.ambiguous.len()
        )
    }

    fn violations(&self) -> Vec<String> {
        let mut violations = self.problems.clone();
        for (entry, message) in &self.entries {
            let copies = self.copies.get(message).copied().unwrap_or(0);
            let handled = self.handled.get(message).copied().unwrap_or(0);
            if !self.left.contains_key(entry) && copies + handled == 0 {
                violations.push(format!(
                    "entry {entry} (message {message}) is neither in the DLQ nor delivered"
                ));
            }
            if copies + handled > 1 && !self.ambiguous.contains(message) {
                violations.push(format!(
                    "message {message} was delivered {} times ({copies} copies, handled {handled} times) with no ambiguous publish",
                    copies + handled
                ));
            }
        }
        for (entry, (_, held, version)) in &self.left {
            if *held && !self.stranded.contains(&(entry.clone(), *version)) {
                violations.push(format!(
                    "entry {entry} is still held by a re-drive 5 s after every call ended, and no store fault explains it"
                ));
            }
        }
        for message in self.ingested.values() {
            let delivered = self.copies.get(message).copied().unwrap_or(0)
                + self.handled.get(message).copied().unwrap_or(0);
            if delivered == 0 && !self.left_messages.contains(message) {
                violations.push(format!(
                    "dead letter {message}, sent to the DLQ topic, is neither in the DLQ nor delivered"
                ));
            }
            if delivered > 1 && !self.ambiguous.contains(message) {
                violations.push(format!(
                    "dead letter {message} was delivered {delivered} times with no ambiguous publish"
                ));
            }
        }
        for entry in &self.discarded {
            match self.left.get(entry) {
                Some((EntryStatus::Discarded, _, _)) => {}
                other => violations.push(format!(
                    "the discard of {entry} returned Ok but the entry is {other:?} at the end: undone"
                )),
            }
        }
        for job in &self.jobs {
            // A job that stopped early (a store failure, a failed canary) dealt with part of
            // its selection; one that completed, with all of it.
            let dealt = job.redriven + job.failed + job.skipped;
            let adds_up = if job.status == RedriveStatus::Completed {
                dealt == job.total
            } else {
                dealt <= job.total
            };
            if !adds_up {
                violations.push(format!(
                    "redrive {} ({}): redriven {} + failed {} + skipped {} != total {}",
                    job.id,
                    job.status.as_str(),
                    job.redriven,
                    job.failed,
                    job.skipped,
                    job.total
                ));
            }
        }
        violations.extend(self.paced_sends.iter().filter_map(|sends| burst(sends)));
        let (count, listed, depth) = self.counted;
        let pending = self
            .left
            .values()
            .filter(|(status, _, _)| *status != EntryStatus::Discarded)
            .count() as u64;
        if count != listed as u64 || depth != pending {
            violations.push(format!(
                "the store disagrees with itself: count {count}, listed {listed}, depth {depth} with {pending} not discarded"
            ));
        }
        violations
    }
}
