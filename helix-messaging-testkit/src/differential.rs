//! Differential mode: one seeded program of publishes and settlements, run against the
//! memory reference and against a real backend, with what every group received compared.
//!
//! A program publishes messages with a few keys, then lets each consumer group (and a
//! private subscription) consume them one at a time (prefetch 1). What a consumer does with a
//! delivery — ack, requeue, reject, or crash (drop the delivery and its subscription
//! unsettled, then subscribe again) — is a function of the seed, the group, the message and
//! its attempt, never of timing, so both brokers face the same decisions. Per group it records
//! every delivery's attempt and redelivered flag, how each message ended, and the order of
//! first deliveries per key; any difference from the reference is a failure. Decisions a
//! backend's capabilities rule out are replaced by an ack on both sides.
//!
//! On a mismatch the report names the seed and the shortest prefix of the program (fewest
//! messages) that still disagrees, found by running shorter programs again.
//!
//! ```no_run
//! # async fn demo() {
//! use std::sync::Arc;
//! use helix_messaging_core::Broker;
//! use helix_messaging_testkit::Differential;
//!
//! Differential::new("memory", || async {
//!     Ok(Arc::new(helix_messaging_memory::MemoryBroker::new()) as Arc<dyn Broker>)
//! })
//! .run()
//! .await
//! .assert_agrees();
//! # }
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt};
use helix_messaging_core::{Broker, Capabilities, Message, Result, SubscribeOptions, Subscription};

use crate::helpers::{Settings, fresh_name};

/// Seeds run by default (`HELIX_DIFFERENTIAL_SEEDS` overrides with a count of seeds
/// `1..=n`, `HELIX_DIFFERENTIAL_SEED` with one seed).
pub const DEFAULT_SEEDS: &[u64] = &[1, 2, 3, 4, 5];

/// Longest time spent looking for a shorter disagreeing program.
const SHRINK_BUDGET: Duration = Duration::from_secs(60);

/// Deliveries of one message past this attempt are acked by every consumer, so a program
/// always ends.
const LAST_DECIDED_ATTEMPT: u32 = 4;

/// What a consumer does with one delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Ack it.
    Ack,
    /// `nack(true)`.
    Requeue,
    /// Reject it.
    Reject,
    /// Drop it and its subscription unsettled, then subscribe again.
    Crash,
}

/// The decision for `message` at `attempt` in consumer `consumer` of program `seed`.
pub fn decide(seed: u64, consumer: usize, message: usize, attempt: u32) -> Action {
    if attempt > LAST_DECIDED_ATTEMPT {
        return Action::Ack;
    }
    let roll = splitmix(
        seed ^ (consumer as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ (message as u64).wrapping_mul(0xC2B2_AE3D_27D4_EB4F)
            ^ u64::from(attempt).wrapping_mul(0x1656_67B1_9E37_79F9),
    ) % 100;
    match roll {
        0..55 => Action::Ack,
        55..72 => Action::Requeue,
        72..84 => Action::Reject,
        _ => Action::Crash,
    }
}

pub(crate) fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The shape of a program: how many messages, keys and named groups.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Messages published.
    pub messages: usize,
    /// Distinct keys (messages cycle through them; every fourth has none).
    pub keys: usize,
    /// Named consumer groups (each consumed by one member at a time).
    pub groups: usize,
}

impl Default for Shape {
    fn default() -> Self {
        Shape {
            messages: 12,
            keys: 3,
            groups: 2,
        }
    }
}

/// The key of message `index`.
fn key_of(shape: Shape, index: usize) -> Option<String> {
    (index % 4 != 3).then(|| format!("k{}", index % shape.keys.max(1)))
}

/// What one consumer (a named group, or the private subscription) saw.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Seen {
    /// Every delivery of each message, in order: (attempt, redelivered).
    pub deliveries: BTreeMap<usize, Vec<(u32, bool)>>,
    /// How each message ended: its last action (ack or reject).
    pub outcome: BTreeMap<usize, Action>,
    /// Messages in the order of their first delivery, per key.
    pub first_by_key: BTreeMap<String, Vec<usize>>,
    /// Problems met while consuming: a message that never came, a delivery after the end,
    /// a stream error.
    pub problems: Vec<String>,
}

/// Everything a program run observed, per consumer ("g0", "g1", …, "private").
pub type Observation = BTreeMap<String, Seen>;

use crate::helpers::Factory;

/// Runs programs against a backend and the memory reference; see the module docs.
pub struct Differential {
    backend: String,
    factory: Factory,
    seeds: Vec<u64>,
    shape: Shape,
    settings: Settings,
    no_crashes: Option<&'static str>,
}

impl Differential {
    /// Compare the brokers `factory` makes (a fresh one per run) with the memory reference,
    /// for the seeds in [`DEFAULT_SEEDS`] or those the environment names.
    pub fn new<F, Fut>(backend: impl Into<String>, factory: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Arc<dyn Broker>>> + Send + 'static,
    {
        Differential {
            backend: backend.into(),
            factory: Arc::new(move || factory().boxed()),
            seeds: seeds_from_env(),
            shape: Shape::default(),
            settings: Settings::from_env(),
            no_crashes: None,
        }
    }

    /// Run these seeds instead.
    #[must_use]
    pub fn seeds(mut self, seeds: impl IntoIterator<Item = u64>) -> Self {
        self.seeds = seeds.into_iter().collect();
        self
    }

    /// Programs of this shape.
    #[must_use]
    pub fn shape(mut self, shape: Shape) -> Self {
        self.shape = shape;
        self
    }

    /// Consumers never crash: for a test server that cannot keep what crash recovery needs
    /// (say what, and where it is tested instead). Crashes become acks on both sides.
    #[must_use]
    pub fn without_crashes(mut self, why: &'static str) -> Self {
        self.no_crashes = Some(why);
        self
    }

    /// Run every seed; the report says which agreed and, for those that did not, the
    /// shortest disagreeing program.
    pub async fn run(self) -> DifferentialReport {
        let probe = (self.factory)()
            .await
            .unwrap_or_else(|e| panic!("cannot create a {} broker: {e}", self.backend));
        let mut caps = probe.capabilities();
        let _ = probe.close().await;
        if self.no_crashes.is_some() {
            caps.redeliver_unacked = false;
        }
        let reference: Factory = Arc::new(|| {
            async { Ok(Arc::new(helix_messaging_memory::MemoryBroker::new()) as Arc<dyn Broker>) }
                .boxed()
        });
        let mut outcomes = Vec::new();
        for &seed in &self.seeds {
            let run = |messages: usize| {
                let shape = Shape {
                    messages,
                    ..self.shape
                };
                let (reference, subject) = (reference.clone(), self.factory.clone());
                let settings = self.settings.clone();
                // The reference delivers at once: a short watch for strays is enough there.
                let reference_settings = Settings {
                    quiet_period: Duration::from_millis(20),
                    ..settings.clone()
                };
                async move {
                    let expected =
                        observe(&reference, seed, shape, caps, &reference_settings).await;
                    let got = observe(&subject, seed, shape, caps, &settings).await;
                    (expected, got)
                }
            };
            let (expected, got) = run(self.shape.messages).await;
            if expected == got {
                outcomes.push((seed, None));
                continue;
            }
            // The shortest program that still disagrees: decisions depend only on the seed,
            // consumer, message and attempt, so a shorter program is a prefix of this one.
            // Bounded in time: a disagreeing backend may wait out a receive timeout per run.
            let shrinking = Instant::now();
            let mut shortest = (self.shape.messages, expected, got);
            for messages in 1..self.shape.messages {
                if shrinking.elapsed() > SHRINK_BUDGET {
                    break;
                }
                let (expected, got) = run(messages).await;
                if expected != got {
                    shortest = (messages, expected, got);
                    break;
                }
            }
            outcomes.push((seed, Some(shortest)));
            // One disagreement is the verdict; the seeds after it would only take time.
            break;
        }
        DifferentialReport {
            backend: self.backend,
            shape: self.shape,
            caps,
            no_crashes: self.no_crashes,
            outcomes,
        }
    }
}

fn seeds_from_env() -> Vec<u64> {
    crate::helpers::seeds_from_env(
        "HELIX_DIFFERENTIAL_SEED",
        "HELIX_DIFFERENTIAL_SEEDS",
        DEFAULT_SEEDS.to_vec(),
    )
}

/// The shortest disagreeing program's message count, with what the reference and the
/// backend observed.
type Disagreement = (usize, Observation, Observation);

/// The result of [`Differential::run`].
#[derive(Debug)]
pub struct DifferentialReport {
    backend: String,
    shape: Shape,
    caps: Capabilities,
    no_crashes: Option<&'static str>,
    /// Per seed: `None` when the backend agreed, else the shortest disagreeing program's
    /// message count with what the reference and the backend observed.
    outcomes: Vec<(u64, Option<Disagreement>)>,
}

impl DifferentialReport {
    /// Seeds whose programs agreed.
    pub fn agreed(&self) -> usize {
        self.outcomes.iter().filter(|(_, o)| o.is_none()).count()
    }

    /// Panic with the seed, the shortest disagreeing program and both observations unless
    /// every seed agreed.
    pub fn assert_agrees(&self) {
        let mut text = String::new();
        for (seed, outcome) in &self.outcomes {
            match outcome {
                None => text.push_str(&format!(
                    "differential[{}] seed {seed}: agrees with memory\n",
                    self.backend
                )),
                Some((messages, expected, got)) => {
                    let shape = Shape {
                        messages: *messages,
                        ..self.shape
                    };
                    text.push_str(&format!(
                        "differential[{}] seed {seed}: DIFFERS from memory; shortest program ({messages} messages):\n{}",
                        self.backend,
                        Program { seed: *seed, shape, caps: self.caps },
                    ));
                    let consumers: std::collections::BTreeSet<&String> =
                        expected.keys().chain(got.keys()).collect();
                    for consumer in consumers {
                        let (want, have) = (expected.get(consumer), got.get(consumer));
                        if want != have {
                            text.push_str(&format!(
                                "  {consumer}:\n    memory:  {}\n    {}: {}\n",
                                render(want),
                                self.backend,
                                render(have)
                            ));
                        }
                    }
                }
            }
        }
        if let Some(why) = self.no_crashes {
            text.push_str(&format!(
                "differential[{}]: consumers did not crash: {why}\n",
                self.backend
            ));
        }
        eprint!("{text}");
        assert_eq!(
            self.agreed(),
            self.outcomes.len(),
            "{} disagrees with the memory reference (rerun one seed with HELIX_DIFFERENTIAL_SEED):\n{text}",
            self.backend
        );
        assert!(!self.outcomes.is_empty(), "no seed was run");
    }
}

/// One consumer's observation on a line: `m3 1,2r→Ack` (attempts, `r` where flagged
/// redelivered, the outcome), then the first-delivery order per key and any problems.
fn render(seen: Option<&Seen>) -> String {
    let Some(seen) = seen else {
        return "nothing".to_owned();
    };
    let mut parts: Vec<String> = seen
        .deliveries
        .iter()
        .map(|(index, deliveries)| {
            let attempts: Vec<String> = deliveries
                .iter()
                .map(|(a, r)| format!("{a}{}", if *r { "r" } else { "" }))
                .collect();
            let end = seen
                .outcome
                .get(index)
                .map_or("unfinished".to_owned(), |o| format!("{o:?}"));
            format!("m{index} {}→{end}", attempts.join(","))
        })
        .collect();
    for (key, order) in &seen.first_by_key {
        let order: Vec<String> = order.iter().map(|i| format!("m{i}")).collect();
        parts.push(format!("{key} order {}", order.join(",")));
    }
    parts.extend(seen.problems.iter().map(|p| format!("PROBLEM {p}")));
    parts.join(" | ")
}

/// A program, printable as the operations it performs.
struct Program {
    seed: u64,
    shape: Shape,
    caps: Capabilities,
}

impl fmt::Display for Program {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Program { seed, shape, caps } = self;
        writeln!(
            f,
            "  seed {seed}: create groups g0..g{}, subscribe private",
            shape.groups.saturating_sub(1)
        )?;
        for index in 0..shape.messages {
            writeln!(f, "  publish m{index} key {:?}", key_of(*shape, index))?;
        }
        for (consumer, name) in consumer_names(*shape, caps).iter().enumerate() {
            let decisions: Vec<String> = (0..shape.messages)
                .map(|index| {
                    let steps: Vec<String> = (1..=LAST_DECIDED_ATTEMPT + 1)
                        .map(|attempt| {
                            format!(
                                "{:?}",
                                allowed(decide(*seed, consumer, index, attempt), caps, name)
                            )
                        })
                        .collect();
                    format!("m{index}: {}", steps.join(" → "))
                })
                .collect();
            writeln!(
                f,
                "  {name} consumes, deciding per attempt: {}",
                decisions.join("; ")
            )?;
        }
        Ok(())
    }
}

/// The consumers a program has: the named groups where the backend has groups, and the
/// private subscription.
fn consumer_names(shape: Shape, caps: &Capabilities) -> Vec<String> {
    let groups = if caps.consumer_groups {
        shape.groups
    } else {
        0
    };
    (0..groups)
        .map(|g| format!("g{g}"))
        .chain(std::iter::once("private".to_owned()))
        .collect()
}

/// `action` where the backend can do it, else an ack. A private subscription cannot crash
/// and come back: its group goes with it.
fn allowed(action: Action, caps: &Capabilities, consumer: &str) -> Action {
    match action {
        Action::Requeue if !caps.redelivery => Action::Ack,
        Action::Crash if !caps.redeliver_unacked || consumer == "private" => Action::Ack,
        other => other,
    }
}

/// Run the program `seed` of `shape` on a fresh broker from `factory`.
async fn observe(
    factory: &Factory,
    seed: u64,
    shape: Shape,
    caps: Capabilities,
    settings: &Settings,
) -> Observation {
    let mut observation = Observation::new();
    let broker = match factory().await {
        Ok(broker) => broker,
        Err(err) => {
            observation
                .entry("broker".into())
                .or_default()
                .problems
                .push(format!("cannot create: {err}"));
            return observation;
        }
    };
    let topic = fresh_name("differential");
    let names = consumer_names(shape, &caps);
    let groups: Vec<String> = names
        .iter()
        .map(|name| fresh_name(&format!("diff-{name}")))
        .collect();
    let mut private = None;
    for (name, group) in names.iter().zip(&groups) {
        let options = if name == "private" {
            SubscribeOptions::default().with_prefetch(1)
        } else {
            SubscribeOptions::group(group).with_prefetch(1)
        };
        match bounded(settings, broker.subscribe(&topic, options)).await {
            Ok(sub) if name == "private" => private = Some(sub),
            Ok(sub) => drop(sub),
            Err(err) => observation
                .entry(name.clone())
                .or_default()
                .problems
                .push(format!("subscribe: {err}")),
        }
    }
    // One batch: where the broker batches records (Kafka), a group resuming after a crash
    // fetches from inside a batch, which is part of what is compared.
    let messages: Vec<Message> = (0..shape.messages)
        .map(|index| {
            let message = Message::new(format!("m{index}")).with_id(format!("m{index}"));
            match key_of(shape, index) {
                Some(key) => message.with_key(key),
                None => message,
            }
        })
        .collect();
    let report = bounded(settings, async {
        Ok(broker.publish_batch(&topic, messages).await)
    })
    .await;
    let failures: Vec<String> = match report {
        Ok(report) => report
            .failures()
            .iter()
            .map(|(index, err)| format!("publish m{index}: {err}"))
            .collect(),
        Err(err) => vec![format!("publish: {err}")],
    };
    if !failures.is_empty() {
        observation
            .entry("publisher".into())
            .or_default()
            .problems
            .extend(failures);
    }
    for (consumer, (name, group)) in names.iter().zip(&groups).enumerate() {
        let seen = observation.entry(name.clone()).or_default();
        let options = SubscribeOptions::group(group).with_prefetch(1);
        let sub = if name == "private" {
            private.take()
        } else {
            None
        };
        consume(
            &broker,
            &topic,
            options,
            sub,
            ConsumerPlan {
                seed,
                consumer,
                name,
                shape,
                caps: &caps,
            },
            settings,
            seen,
        )
        .await;
    }
    let _ = bounded(settings, broker.close()).await;
    observation.retain(|_, seen| *seen != Seen::default());
    observation
}

struct ConsumerPlan<'a> {
    seed: u64,
    consumer: usize,
    name: &'a str,
    shape: Shape,
    caps: &'a Capabilities,
}

/// `operation`, failing with a timeout error after the receive timeout: a program must end
/// whatever the backend does.
async fn bounded<T>(settings: &Settings, operation: impl Future<Output = Result<T>>) -> Result<T> {
    helix_messaging_core::within(settings.receive_timeout, "a broker operation", operation).await?
}

/// Consume until every message has ended (acked or rejected), then watch for a stray one.
async fn consume(
    broker: &Arc<dyn Broker>,
    topic: &str,
    options: SubscribeOptions,
    sub: Option<Subscription>,
    plan: ConsumerPlan<'_>,
    settings: &Settings,
    seen: &mut Seen,
) {
    let subscribe = || bounded(settings, broker.subscribe(topic, options.clone()));
    let mut sub = match sub {
        Some(sub) => sub,
        None => match subscribe().await {
            Ok(sub) => sub,
            Err(err) => {
                seen.problems.push(format!("subscribe: {err}"));
                return;
            }
        },
    };
    while seen.outcome.len() < plan.shape.messages {
        let next = tokio::time::timeout(settings.receive_timeout, sub.next()).await;
        let delivery = match next {
            Ok(Some(Ok(delivery))) => delivery,
            Ok(Some(Err(err))) => {
                seen.problems.push(format!("stream error: {err}"));
                continue;
            }
            Ok(None) => {
                seen.problems.push("subscription ended".into());
                return;
            }
            Err(_) => {
                let missing: Vec<usize> = (0..plan.shape.messages)
                    .filter(|i| !seen.outcome.contains_key(i))
                    .collect();
                seen.problems.push(format!(
                    "nothing within {:?}; unfinished: {missing:?}",
                    settings.receive_timeout
                ));
                return;
            }
        };
        let Some(index) = delivery
            .message()
            .id()
            .strip_prefix('m')
            .and_then(|i| i.parse::<usize>().ok())
        else {
            seen.problems.push(format!(
                "a message of no program: {}",
                delivery.message().id()
            ));
            continue;
        };
        let attempt = delivery.attempt();
        seen.deliveries
            .entry(index)
            .or_default()
            .push((attempt, delivery.info().redelivered));
        if let Some(key) = delivery.message().key()
            && !seen
                .first_by_key
                .get(key)
                .is_some_and(|order| order.contains(&index))
        {
            seen.first_by_key
                .entry(key.to_owned())
                .or_default()
                .push(index);
        }
        if seen.outcome.contains_key(&index) {
            seen.problems
                .push(format!("m{index} delivered again after it ended"));
        }
        // Attempts that do not grow would loop for ever: past the last decided attempt's
        // worth of deliveries, the message is acked whatever its attempt says.
        let delivered = seen.deliveries.get(&index).map_or(0, Vec::len);
        let action = if delivered > LAST_DECIDED_ATTEMPT as usize + 1 {
            seen.problems.push(format!(
                "m{index} delivered {delivered} times, attempt {attempt}"
            ));
            Action::Ack
        } else {
            allowed(
                decide(plan.seed, plan.consumer, index, attempt),
                plan.caps,
                plan.name,
            )
        };
        let settled = match action {
            Action::Ack => bounded(settings, delivery.ack()).await,
            Action::Reject => bounded(settings, delivery.reject()).await,
            Action::Requeue => bounded(settings, delivery.nack(true)).await,
            Action::Crash => {
                // A process that dies loses its subscription and its delivery together: the
                // subscription first, so nothing is read ahead into the freed slot meanwhile.
                drop(sub);
                drop(delivery);
                sub = match subscribe().await {
                    Ok(sub) => sub,
                    Err(err) => {
                        seen.problems
                            .push(format!("subscribe after a crash: {err}"));
                        return;
                    }
                };
                Ok(())
            }
        };
        if let Err(err) = settled {
            seen.problems
                .push(format!("{action:?} m{index} attempt {attempt}: {err}"));
        }
        if matches!(action, Action::Ack | Action::Reject) {
            seen.outcome.insert(index, action);
        }
    }
    if let Ok(Some(next)) = tokio::time::timeout(settings.quiet_period, sub.next()).await {
        let what = match next {
            Ok(d) => format!("{} attempt {}", d.message().id(), d.attempt()),
            Err(err) => err.to_string(),
        };
        seen.problems
            .push(format!("delivery after every message ended: {what}"));
    }
    if !plan.caps.per_key_ordering {
        seen.first_by_key.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions_depend_only_on_their_inputs_and_all_occur() {
        let mut counts = BTreeMap::new();
        for message in 0..400 {
            let action = decide(7, 1, message, 1);
            assert_eq!(action, decide(7, 1, message, 1));
            *counts.entry(format!("{action:?}")).or_insert(0) += 1;
        }
        assert_eq!(counts.len(), 4, "{counts:?}");
        assert_eq!(decide(7, 1, 3, LAST_DECIDED_ATTEMPT + 1), Action::Ack);
    }
}
