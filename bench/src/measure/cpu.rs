//! CPU time from `/proc`: this process's (the client side), the broker's processes', and the
//! machine's ticks stolen by the hypervisor, which tell how far a run's ratio can be trusted.

use std::future::Future;
use std::time::Duration;

/// CPU time spent in a stretch of the benchmark: by this process (the client side, every
/// thread) and by the broker's processes on this machine, found by their command name.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CpuTime {
    client: Duration,
    /// `None` when no process of that name could be read.
    broker: Option<Duration>,
    /// The whole machine's CPU ticks meanwhile, and how many of them the hypervisor gave to
    /// other guests (steal): a run that lost a share of its cores that way is slower on the
    /// side that contends more, so the ratio of that pair is worth less.
    machine_ticks: u64,
    stolen_ticks: u64,
}

/// The longest a run measured by [`CpuTime::of`] (every run of the backends' comparisons)
/// may take. The receive loops being timed have no timeout of their own (a timer per message
/// would be part of what both sides are timed doing), so a run that lost a message would
/// otherwise wait for it forever.
pub(crate) const RUN_LIMIT: Duration = Duration::from_secs(600);

impl CpuTime {
    /// Nothing yet: the start of a total.
    pub(super) const ZERO: CpuTime = CpuTime {
        client: Duration::ZERO,
        broker: Some(Duration::ZERO),
        machine_ticks: 0,
        stolen_ticks: 0,
    };

    /// The CPU time `work` took, on both sides, with its result.
    ///
    /// # Panics
    /// When `work` takes longer than [`RUN_LIMIT`].
    pub(crate) async fn of<T>(broker_process: &str, work: impl Future<Output = T>) -> (T, Self) {
        let (client, broker) = (process_cpu("self"), broker_cpu(broker_process));
        let machine = machine_cpu_ticks();
        let out = tokio::time::timeout(RUN_LIMIT, work)
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "a measured run took longer than {RUN_LIMIT:?}: a message it waits for was lost, or the broker stalled"
                )
            });
        let (machine_ticks, stolen_ticks) = machine_cpu_ticks().zip(machine).map_or(
            (0, 0),
            |((total, stolen), (total0, stolen0))| {
                (total.saturating_sub(total0), stolen.saturating_sub(stolen0))
            },
        );
        let used = CpuTime {
            machine_ticks,
            stolen_ticks,
            client: process_cpu("self")
                .zip(client)
                .map_or(Duration::ZERO, |(after, before)| {
                    after.saturating_sub(before)
                }),
            broker: broker_cpu(broker_process)
                .zip(broker)
                .map(|(after, before)| after.saturating_sub(before)),
        };
        (out, used)
    }

    pub(super) fn add(&mut self, other: CpuTime) {
        self.client += other.client;
        self.broker = self.broker.zip(other.broker).map(|(a, b)| a + b);
        self.machine_ticks += other.machine_ticks;
        self.stolen_ticks += other.stolen_ticks;
    }

    /// Both sides' time, and per 100,000 messages.
    pub(super) fn per(&self, messages: usize) -> String {
        let per_100k = |d: Duration| d.as_secs_f64() * 100_000.0 / messages.max(1) as f64;
        let broker = self.broker.map_or("broker n/a".to_owned(), |b| {
            format!("broker {:.2} s ({:.2}/100k)", b.as_secs_f64(), per_100k(b))
        });
        let steal = if self.machine_ticks == 0 {
            String::new()
        } else {
            format!(
                ", steal {:.0}%",
                100.0 * self.stolen_ticks as f64 / self.machine_ticks as f64
            )
        };
        format!(
            "cpu: client {:.2} s ({:.2}/100k), {broker}{steal}",
            self.client.as_secs_f64(),
            per_100k(self.client)
        )
    }
}

/// The machine's CPU ticks so far, all and stolen, from the `cpu` line of `/proc/stat`
/// (user nice system idle iowait irq softirq steal …).
fn machine_cpu_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let ticks: Vec<u64> = stat
        .lines()
        .next()?
        .strip_prefix("cpu ")?
        .split_whitespace()
        .map(|t| t.parse().ok())
        .collect::<Option<_>>()?;
    // guest and guest_nice (the last two) are already counted in user and nice.
    let total = ticks.iter().take(8).sum();
    Some((total, *ticks.get(7)?))
}

/// User plus system time of process `pid` (`self` for this one), from `/proc/<pid>/stat`.
fn process_cpu(pid: &str) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: count fields after it.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, in clock ticks (100 a second
    // on Linux).
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

/// The CPU time of every process named `name` (its `/proc/<pid>/comm`).
fn broker_cpu(name: &str) -> Option<Duration> {
    let mut total = None;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let pid = entry.file_name();
        let Some(pid) = pid
            .to_str()
            .filter(|p| p.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim_end() == name
            && let Some(cpu) = process_cpu(pid)
        {
            total = Some(total.unwrap_or(Duration::ZERO) + cpu);
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// A run that never ends (a message lost) is stopped at the limit rather than waited for.
    #[tokio::test(start_paused = true)]
    #[should_panic(expected = "a measured run took longer than 600s")]
    async fn a_run_past_the_limit_is_stopped() {
        let run = CpuTime::of("no-such-broker-process", std::future::pending::<()>());
        // Without the limit the run would wait past this bound and fail the test here.
        let _ = tokio::time::timeout(RUN_LIMIT * 2, run).await;
        panic!("not stopped at the limit");
    }

    /// The client's CPU time is this process's and grows with work done; a broker process
    /// that does not exist reads as unknown rather than as zero.
    #[tokio::test]
    async fn cpu_time_counts_this_process_and_knows_a_missing_broker() {
        // Spin until this thread has run 200 ms on a CPU, by the scheduler's own count
        // (nanoseconds in /proc/thread-self/schedstat, a clock CpuTime does not read), not for
        // 200 ms of wall time: on a loaded machine the wall time says little about the CPU
        // a spin gets.
        let on_cpu = || {
            let stat = std::fs::read_to_string("/proc/thread-self/schedstat").expect("schedstat");
            let ns: u64 = stat
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .expect("ns");
            Duration::from_nanos(ns)
        };
        let started = Instant::now();
        let (sum, used) = CpuTime::of("no-such-broker-process", async {
            let from = on_cpu();
            let mut sum = 0u64;
            while on_cpu().saturating_sub(from) < Duration::from_millis(200)
                && started.elapsed() < Duration::from_secs(60)
            {
                for _ in 0..10_000 {
                    sum = std::hint::black_box(sum.wrapping_add(1));
                }
            }
            sum
        })
        .await;
        let wall = started.elapsed();
        assert!(sum > 0);
        // /proc/self/stat counts in 10 ms ticks: allow one either side.
        assert!(
            used.client >= Duration::from_millis(190),
            "200 ms of spinning counted as {:?}",
            used.client
        );
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
        assert!(
            used.client <= wall * cores + Duration::from_millis(20),
            "{:?} of CPU counted in {wall:?} of wall time on {cores} cores",
            used.client
        );
        assert_eq!(used.broker, None);
        assert!(used.per(1).contains("broker n/a"), "{}", used.per(1));
    }
}
