//! [`ReplayHarness`]: seeded replays through a [`FaultyBroker`] with their checkpoints and
//! leases in a [`FaultyReplayStore`], by handlers killed and restarted at seeded moments,
//! and the replay's promises checked after each seed; with the readers of a topic's history
//! the harnesses and the backends' tests count copies with.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use helix_messaging_core::replay::{
    HEADER_REPLAY_ID, MemoryReplayStore, ReplayConfig, ReplayHandler, ReplayOptions,
    ReplayProgress, ReplayRequest, ReplayStatus, ReplayStore,
};
use helix_messaging_core::{Broker, Message, Result, TimeRange};

use super::broker::FaultyBroker;
use super::schedule::FaultSchedule;
use super::seeds::{PlaneReport, SeedRun, run_seeds};
use super::stores::FaultyReplayStore;
use crate::differential::splitmix;
use crate::helpers::{Factory, fresh_name};

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
        let source = fresh_name("plane-replay");
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
                match handler.replay_progress(&id).await {
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
            match handler.replay_progress(&id).await {
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
