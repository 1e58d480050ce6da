//! Comparing the two sides: medians and ratios, and running every comparison of a scenario
//! against both raw baselines, the sides taking turns, with every run and the summary printed.

use std::future::Future;

use super::cpu::CpuTime;
use super::options::{Baseline, Options, Side};
use super::run::Run;

/// The run with the median rate.
pub(crate) fn median(mut runs: Vec<Run>) -> Run {
    runs.sort_by(|a, b| a.rate().total_cmp(&b.rate()));
    runs.swap_remove(runs.len() / 2)
}

/// Print the median of each side and the ratio project / raw.
pub(crate) fn report(raw_label: &str, raw: Vec<Run>, ours_label: &str, ours: Vec<Run>) -> f64 {
    let raw = median(raw);
    let ours = median(ours);
    let ratio = ours.rate() / raw.rate();
    println!("median of runs:");
    println!("  {}", raw.line(raw_label));
    println!("  {}", ours.line(ours_label));
    println!("  ratio {ours_label} / {raw_label}: {ratio:.2}x");
    ratio
}

/// Whether a comparison named `name` runs under `--filter filter`: names containing it, or
/// with a leading `=`, exactly that name (`=publish` without `publish, 256 callers`).
fn filter_matches(filter: &str, name: &str) -> bool {
    match filter.strip_prefix('=') {
        Some(exact) => name == exact,
        None => name.contains(filter),
    }
}

/// The adapter's rate over the raw side's in each run, both sides of a run measured back to
/// back: pairs share the machine's state of the moment (another guest's load, the broker's
/// warmth), which the medians of each side taken apart do not.
fn pair_ratios(raw: &[Run], ours: &[Run]) -> Vec<f64> {
    raw.iter()
        .zip(ours)
        .map(|(raw, ours)| ours.rate() / raw.rate())
        .collect()
}

/// The median of `values` (the mean of the middle two for an even count); 0 for none.
fn median_of(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// The scenario [`Baseline::Owned`] applies to.
const OWNED_SCENARIO: &str = "end to end";

/// Run every scenario of `scenarios` against the like-for-like and the minimal raw baselines
/// (like for like first), and end to end against [`Baseline::Owned`] when `--baseline owned`
/// asks for it, `options.runs` times each, and print every run, the medians, the ratios and
/// a summary line.
/// `raw(scenario, baseline)` and `ours(scenario)` measure one run; a scenario is its index
/// in `scenarios`.
pub(crate) async fn compare_baselines<R, RF, O, OF>(
    options: &Options,
    raw_name: &str,
    broker_process: &str,
    scenarios: &[&str],
    raw: R,
    ours: O,
) where
    R: Fn(usize, Baseline) -> RF,
    RF: Future<Output = Run>,
    O: Fn(usize) -> OF,
    OF: Future<Output = Run>,
{
    let comparisons = [Baseline::LikeForLike, Baseline::Minimal, Baseline::Owned]
        .into_iter()
        .flat_map(|baseline| {
            scenarios
                .iter()
                .enumerate()
                .filter_map(move |(scenario, name)| {
                    let name = match baseline {
                        Baseline::LikeForLike => (*name).to_owned(),
                        Baseline::Minimal => format!("{name} vs minimal raw"),
                        // Only asked for, and only where a consumer hands records over.
                        Baseline::Owned if *name == OWNED_SCENARIO => {
                            format!("{name} vs owned raw")
                        }
                        Baseline::Owned => return None,
                    };
                    Some((name, scenario, baseline))
                })
        });
    let mut results = Vec::new();
    // Time each side ran: the client's and the broker's CPU time, per run and in all.
    let measured = |label: &str, run: &Run, cpu: CpuTime, totals: &mut CpuTime| {
        println!("{}   {}", run.line(label), cpu.per(run.messages));
        totals.add(cpu);
    };
    for (name, scenario, baseline) in comparisons {
        if options.filter.as_deref().is_some_and(|f| !filter_matches(f, &name))
            || options.baseline.is_some_and(|b| b != baseline)
            || (baseline == Baseline::Owned && options.baseline != Some(Baseline::Owned))
            // The adapter's run does not depend on the raw baseline: once is enough.
            || (options.side == Some(Side::Adapter) && baseline == Baseline::Minimal)
        {
            continue;
        }
        let (raw_label, ours_label) = (format!("{raw_name} {name}"), format!("adapter {name}"));
        let (mut raw_runs, mut our_runs) = (Vec::new(), Vec::new());
        let (mut raw_cpu, mut our_cpu) = (CpuTime::ZERO, CpuTime::ZERO);
        if let Some(side) = options.side {
            let mut total = CpuTime::ZERO;
            let mut messages = 0;
            for run in 1..=options.runs {
                let (label, (r, cpu)) = match side {
                    Side::Adapter => (
                        &ours_label,
                        CpuTime::of(broker_process, ours(scenario)).await,
                    ),
                    Side::Raw => (
                        &raw_label,
                        CpuTime::of(broker_process, raw(scenario, baseline)).await,
                    ),
                };
                measured(&format!("run {run}: {label}"), &r, cpu, &mut total);
                messages += r.messages;
            }
            println!("  all runs, {}", total.per(messages));
            continue;
        }
        if options.runs > 1 {
            // One unmeasured run of each side first: the first runs of a scenario are slow on
            // both sides (the broker's and the client's allocations, connections, page
            // faults), and with a handful of runs that skews whichever side's runs fall in
            // that period.
            let (r, _) = CpuTime::of(broker_process, raw(scenario, baseline)).await;
            println!("{}", r.line(&format!("warm-up: {raw_label}")));
            let (o, _) = CpuTime::of(broker_process, ours(scenario)).await;
            println!("{}", o.line(&format!("warm-up: {ours_label}")));
        }
        for run in 1..=options.runs {
            // Every other run the adapter goes first: a broker that slows as it fills or warms
            // up (a JVM's JIT, Tansu's in-memory topics) would otherwise favour one side.
            if run % 2 == 0 {
                let (o, cpu) = CpuTime::of(broker_process, ours(scenario)).await;
                measured(&format!("run {run}: {ours_label}"), &o, cpu, &mut our_cpu);
                our_runs.push(o);
            }
            let (r, cpu) = CpuTime::of(broker_process, raw(scenario, baseline)).await;
            measured(&format!("run {run}: {raw_label}"), &r, cpu, &mut raw_cpu);
            raw_runs.push(r);
            if run % 2 == 1 {
                let (o, cpu) = CpuTime::of(broker_process, ours(scenario)).await;
                measured(&format!("run {run}: {ours_label}"), &o, cpu, &mut our_cpu);
                our_runs.push(o);
            }
        }
        let messages: usize = raw_runs.iter().map(|r| r.messages).sum();
        let pairs = pair_ratios(&raw_runs, &our_runs);
        let ratio = report(&raw_label, raw_runs, &ours_label, our_runs);
        if pairs.len() > 1 {
            let shown: Vec<String> = pairs.iter().map(|r| format!("{r:.2}")).collect();
            println!(
                "  each run's pair (adapter / raw, run back to back): median {:.2}x [{}]",
                median_of(&pairs),
                shown.join(" ")
            );
        }
        println!(
            "  all runs, raw {}; adapter {}",
            raw_cpu.per(messages),
            our_cpu.per(messages)
        );
        results.push((name, ratio));
    }
    let summary: Vec<String> = results
        .iter()
        .map(|(name, ratio)| format!("{name} {ratio:.2}x"))
        .collect();
    println!(
        "target >= 0.95x raw (like for like; the other baselines show what their difference costs); measured: {}",
        summary.join(", ")
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::measure::run::histogram;
    use std::time::Duration;

    #[test]
    fn a_filter_matches_part_of_a_name_or_with_equals_the_whole_name() {
        assert!(filter_matches("publish", "publish, 256 callers"));
        assert!(filter_matches("=publish", "publish"));
        assert!(!filter_matches("=publish", "publish, 256 callers"));
        assert!(!filter_matches("streams", "publish"));
    }

    #[test]
    fn pairs_are_taken_run_by_run_and_their_median_is_the_middle() {
        let run = |seconds: f64| Run {
            messages: 100,
            elapsed: Duration::from_secs_f64(seconds),
            latency: histogram(),
        };
        let raw = [run(1.0), run(2.0), run(1.0)];
        let ours = [run(2.0), run(2.0), run(0.5)];
        assert_eq!(pair_ratios(&raw, &ours), vec![0.5, 1.0, 2.0]);
        assert_eq!(median_of(&[2.0, 0.5, 1.0]), 1.0);
        assert_eq!(median_of(&[1.0, 2.0]), 1.5);
        assert_eq!(median_of(&[]), 0.0);
    }
}
