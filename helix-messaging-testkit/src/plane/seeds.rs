//! Running a harness over its seeds: which seeds run (`HELIX_PLANE_SEED`,
//! `HELIX_PLANE_SEEDS`), what a seeded run must tell ([`SeedRun`]), the run over every seed
//! that shrinks a failing one to its shortest program, and the [`PlaneReport`] it ends in.
//! Shared by the spool, replay and DLQ harnesses and the breaker check.

use crate::helpers::seeds_from_env;

/// The outcome of a [`SpoolHarness`](crate::plane::SpoolHarness) run.
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
pub(super) fn seeds() -> Vec<u64> {
    seeds_from_env("HELIX_PLANE_SEED", "HELIX_PLANE_SEEDS", (1..=20).collect())
}

/// What one seeded run saw, as the reports need it.
pub(super) trait SeedRun {
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
pub(super) async fn run_seeds<R, F, Fut>(
    backend: &str,
    what: &str,
    size: usize,
    run: F,
) -> PlaneReport
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
