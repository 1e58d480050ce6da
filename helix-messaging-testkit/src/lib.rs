//! Conformance suite for helix-messaging backends.
//!
//! Every case is a `pub async fn` in [`cases`] taking a [`Ctx`] (a fresh broker plus timing
//! settings). [`Conformance`] runs the cases a broker's [`Capabilities`] allow, reports the others
//! as skipped (never as passed), and fails if any case fails or if the set of skipped cases is not
//! exactly the one the adapter declared with [`Conformance::expect_skipped`].
//!
//! Every receive has a timeout and every case uses fresh random topic and group names, so the
//! suite can run again and again against one long-lived server.
//!
//! [`Capabilities`]: helix_messaging_core::Capabilities
//!
//! ```no_run
//! # async fn demo() {
//! use std::sync::Arc;
//! use helix_messaging_core::Broker;
//! use helix_messaging_testkit::Conformance;
//!
//! Conformance::new("memory", || async {
//!     Ok(Arc::new(helix_messaging_memory::MemoryBroker::new()) as Arc<dyn Broker>)
//! })
//! .run()
//! .await
//! .assert_passed();
//! # }
//! ```

mod case;
pub mod cases;
mod certs;
pub mod differential;
pub mod drill;
pub mod faults;
mod helpers;
pub mod plane;
pub mod recorded;
pub mod stores;

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use helix_messaging_core::{Broker, Result};

pub use case::{Case, Needs};
pub use certs::test_certificates;
pub use differential::{Differential, DifferentialReport};
pub use helpers::{
    Ctx, MAX_PUBLISH_FUTURE_BYTES, Settings, assert_publish_future_fits_the_allocators_cache,
    env_lookup, eventually, fresh_name, log_to_test_output,
};

/// Result of one case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The case ran and every assertion held.
    Passed,
    /// The case did not run; the reason says which capability is missing.
    Skipped(String),
    /// The case ran and failed; the text says how.
    Failed(String),
}

/// The suite's result for one backend.
#[derive(Debug, Clone)]
pub struct Report {
    /// The backend's name.
    pub backend: String,
    /// Each case's outcome and duration, in suite order.
    pub outcomes: Vec<(&'static str, Outcome, Duration)>,
    /// Cases the adapter declared as skipped, with its justification.
    pub expected_skips: Vec<(&'static str, &'static str)>,
}

impl Report {
    /// Number of cases with `pred` outcome.
    fn count(&self, pred: impl Fn(&Outcome) -> bool) -> usize {
        self.outcomes.iter().filter(|(_, o, _)| pred(o)).count()
    }

    /// Cases that passed.
    pub fn passed(&self) -> usize {
        self.count(|o| *o == Outcome::Passed)
    }

    /// Cases that were skipped.
    pub fn skipped(&self) -> usize {
        self.count(|o| matches!(o, Outcome::Skipped(_)))
    }

    /// Cases that failed.
    pub fn failed(&self) -> usize {
        self.count(|o| matches!(o, Outcome::Failed(_)))
    }

    /// Human-readable summary: a line per case and a closing count.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        for (name, outcome, took) in &self.outcomes {
            let line = match outcome {
                Outcome::Passed => format!("PASS {name} ({} ms)", took.as_millis()),
                Outcome::Skipped(why) => format!("SKIP {name}: {why}"),
                Outcome::Failed(why) => format!("FAIL {name} ({} ms): {why}", took.as_millis()),
            };
            out.push_str(&format!("conformance[{}] {line}\n", self.backend));
        }
        out.push_str(&format!(
            "conformance[{}]: {} cases passed, {} failed, {} skipped\n",
            self.backend,
            self.passed(),
            self.failed(),
            self.skipped()
        ));
        out
    }

    /// Panic (failing the calling test) unless no case failed and the skipped cases are
    /// exactly the declared ones. Prints the summary either way.
    pub fn assert_passed(&self) {
        let summary = self.summary();
        eprint!("{summary}");
        let mut problems = Vec::new();
        for (name, outcome, _) in &self.outcomes {
            let declared = self.expected_skips.iter().any(|(n, _)| n == name);
            match outcome {
                Outcome::Failed(why) => problems.push(format!("{name} failed: {why}")),
                Outcome::Skipped(why) if !declared => problems.push(format!(
                    "{name} was skipped ({why}) but not declared skipped"
                )),
                Outcome::Passed if declared => {
                    problems.push(format!("{name} was declared skipped but ran and passed"))
                }
                _ => {}
            }
        }
        assert!(
            problems.is_empty(),
            "conformance suite for {} did not pass:\n  {}\n{summary}",
            self.backend,
            problems.join("\n  ")
        );
        assert!(
            self.passed() > 0,
            "conformance suite for {} ran no case",
            self.backend
        );
    }
}

use helpers::Factory;
type Cleanup = Arc<dyn Fn(Vec<String>) -> BoxFuture<'static, ()> + Send + Sync>;

/// Runs the conformance suite against one backend.
pub struct Conformance {
    backend: String,
    factory: Factory,
    settings: Settings,
    expected_skips: Vec<(&'static str, &'static str)>,
    excluded: Vec<(&'static str, &'static str)>,
    parallelism: usize,
    only: Option<String>,
    cleanup: Option<Cleanup>,
}

impl Conformance {
    /// A suite for `backend`, building a fresh broker for every case with `factory`.
    ///
    /// The environment variable `HELIX_CONFORMANCE_CASE`, when set, restricts the run to the
    /// case of that name, or to the cases starting with it when it ends in `*` (for
    /// debugging).
    pub fn new<F, Fut>(backend: impl Into<String>, factory: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Arc<dyn Broker>>> + Send + 'static,
    {
        Conformance {
            backend: backend.into(),
            factory: Arc::new(move || factory().boxed()),
            settings: Settings::from_env(),
            expected_skips: Vec::new(),
            excluded: Vec::new(),
            parallelism: 4,
            only: std::env::var("HELIX_CONFORMANCE_CASE").ok(),
            cleanup: None,
        }
    }

    /// Declare that `case` is skipped on this backend, and why. The run fails if a declared
    /// case runs or an undeclared one is skipped.
    #[must_use]
    pub fn expect_skipped(mut self, case: &'static str, why: &'static str) -> Self {
        self.expected_skips.push((case, why));
        self
    }

    /// Do not run `case` against this server although the backend's capabilities allow it,
    /// because the *server* (not the adapter) cannot do what the case needs — for example a
    /// test broker that lacks a feature of the real one. It is reported as skipped with `why`,
    /// never as passed; `why` should name where the case runs instead.
    #[must_use]
    pub fn exclude(mut self, case: &'static str, why: &'static str) -> Self {
        self.excluded.push((case, why));
        self.expected_skips.push((case, why));
        self
    }

    /// Override timing settings.
    #[must_use]
    pub fn settings(mut self, settings: Settings) -> Self {
        self.settings = settings;
        self
    }

    /// After each case, hand the topics it used to `cleanup` (for backends that keep topics
    /// on the server, so repeated runs leave nothing behind). Runs whether the case passed or
    /// failed.
    #[must_use]
    pub fn cleanup<F, Fut>(mut self, cleanup: F) -> Self
    where
        F: Fn(Vec<String>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.cleanup = Some(Arc::new(move |topics| cleanup(topics).boxed()));
        self
    }

    /// How many cases run at once (default 4).
    #[must_use]
    pub fn parallelism(mut self, parallelism: usize) -> Self {
        self.parallelism = parallelism.max(1);
        self
    }

    /// Run the selected cases and return the report (call [`Report::assert_passed`] on it).
    ///
    /// # Panics
    /// If the factory cannot build a broker to read capabilities from: a broker that cannot
    /// be reached is a failure, never a skip.
    pub async fn run(self) -> Report {
        let probe = (self.factory)()
            .await
            .unwrap_or_else(|e| panic!("cannot create a {} broker: {e}", self.backend));
        let caps = probe.capabilities();
        let _ = probe.close().await;

        let selected: Vec<Case> = cases::ALL
            .iter()
            .copied()
            .filter(|c| {
                self.only
                    .as_deref()
                    .is_none_or(|only| match only.strip_suffix('*') {
                        Some(prefix) => c.name.starts_with(prefix),
                        None => c.name == only,
                    })
            })
            .collect();
        let settings = self.settings;
        let factory = self.factory;
        let cleanup = self.cleanup;
        let excluded = self.excluded;
        let outcomes = futures::stream::iter(selected)
            .map(|case| {
                let factory = factory.clone();
                let settings = settings.clone();
                let cleanup = cleanup.clone();
                let exclusion = excluded
                    .iter()
                    .find(|(name, _)| *name == case.name)
                    .map(|(_, why)| *why);
                async move {
                    let started = Instant::now();
                    let outcome = match (exclusion, case.unmet_need(&caps)) {
                        (Some(why), _) => {
                            Outcome::Skipped(format!("excluded for this server: {why}"))
                        }
                        (None, Some(need)) => Outcome::Skipped(format!(
                            "backend does not declare {}",
                            need.describe()
                        )),
                        (None, None) => run_case(case, factory, settings, cleanup).await,
                    };
                    (case.name, outcome, started.elapsed())
                }
            })
            .buffered(self.parallelism)
            .collect()
            .await;
        Report {
            backend: self.backend,
            outcomes,
            expected_skips: self.expected_skips,
        }
    }
}

async fn run_case(
    case: Case,
    factory: Factory,
    settings: Settings,
    cleanup: Option<Cleanup>,
) -> Outcome {
    let broker = match factory().await {
        Ok(broker) => broker,
        Err(e) => return Outcome::Failed(format!("cannot create broker: {e}")),
    };
    let ctx = Ctx::new(broker.clone(), settings.clone()).with_factory(factory);
    let used = ctx.clone();
    let run = AssertUnwindSafe((case.run)(ctx)).catch_unwind();
    let outcome = match tokio::time::timeout(settings.case_timeout, run).await {
        Err(_) => Outcome::Failed(format!("did not finish within {:?}", settings.case_timeout)),
        Ok(Err(panic)) => Outcome::Failed(panic_text(&*panic)),
        Ok(Ok(Err(e))) => Outcome::Failed(format!("broker error: {e}")),
        Ok(Ok(Ok(()))) => Outcome::Passed,
    };
    let _ = broker.close().await;
    if let Some(cleanup) = cleanup {
        cleanup(used.topics_used()).await;
    }
    outcome
}

fn panic_text(panic: &(dyn Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_else(|| "panicked".to_owned())
}
