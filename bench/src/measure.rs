//! Shared measuring: options, payloads that carry their send time, latency histograms,
//! result lines and ratios.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use futures::StreamExt;
use hdrhistogram::Histogram;
use helix_messaging::{Message, Publisher, Subscription};

/// Command-line options shared by every scenario.
#[derive(Debug, Clone)]
pub(crate) struct Options {
    pub(crate) messages: usize,
    pub(crate) size: usize,
    pub(crate) runs: usize,
    /// Whether `--messages` was given (scenarios have different defaults).
    pub(crate) messages_given: bool,
    /// Only comparisons whose name contains this run (`--filter`).
    pub(crate) filter: Option<String>,
    /// `--peak`: each side at its best instead of like for like at batches of 100 (see
    /// [`Shape`]), plus many concurrent `publish` callers against the raw client's peak.
    pub(crate) peak: bool,
    /// `--side adapter|raw`: run one side only, for a profiler (no ratio is printed).
    pub(crate) side: Option<Side>,
    /// `--baseline like|minimal`: compare against one raw baseline only.
    pub(crate) baseline: Option<Baseline>,
    /// `--chunk N`: the adapter's `publish_batch` calls carry N messages each instead of the
    /// shape's (see [`Batching`]).
    pub(crate) chunk: Option<usize>,
    /// `--prefetch N`: the adapter's subscriptions hold up to N unsettled deliveries instead
    /// of the shape's (the raw clients have no such window).
    pub(crate) prefetch: Option<usize>,
}

/// One side of a comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    Adapter,
    Raw,
}

impl Options {
    pub(crate) fn parse(args: &[String]) -> Result<Self, String> {
        let mut options = Options {
            messages: 1_000_000,
            size: 256,
            runs: 3,
            messages_given: false,
            filter: None,
            peak: false,
            side: None,
            baseline: None,
            chunk: None,
            prefetch: None,
        };
        let mut it = args.iter();
        while let Some(flag) = it.next() {
            if flag == "--peak" {
                options.peak = true;
                continue;
            }
            if flag == "--side" {
                options.side = match it.next().map(String::as_str) {
                    Some("adapter") => Some(Side::Adapter),
                    Some("raw") => Some(Side::Raw),
                    _ => return Err("--side needs adapter or raw".into()),
                };
                continue;
            }
            if flag == "--baseline" {
                options.baseline = match it.next().map(String::as_str) {
                    Some("like") => Some(Baseline::LikeForLike),
                    Some("minimal") => Some(Baseline::Minimal),
                    _ => return Err("--baseline needs like or minimal".into()),
                };
                continue;
            }
            if flag == "--filter" {
                let value = it.next().ok_or("--filter needs a value")?;
                options.filter = Some(value.clone());
                continue;
            }
            let value = it
                .next()
                .ok_or_else(|| format!("{flag} needs a value"))?
                .replace('_', "");
            let number: usize = value
                .parse()
                .map_err(|_| format!("{flag}: expected a whole number, got {value:?}"))?;
            match flag.as_str() {
                "--messages" => {
                    options.messages = number.max(1);
                    options.messages_given = true;
                }
                "--size" => options.size = number.max(8),
                "--runs" => options.runs = number.max(1),
                "--chunk" => options.chunk = Some(number.max(1)),
                "--prefetch" => options.prefetch = Some(number.max(1)),
                other => return Err(format!("unknown flag {other}")),
            }
        }
        Ok(options)
    }

    /// These options with `messages` as the count unless `--messages` was given.
    pub(crate) fn default_messages(&self, messages: usize) -> Options {
        Options {
            messages: if self.messages_given {
                self.messages
            } else {
                messages
            },
            ..self.clone()
        }
    }
}

/// How a comparison drives both sides: messages handed over before their acknowledgements
/// are awaited (`publish_batch` size, pipeline depth, confirms or delivery reports in
/// flight), deliveries a consumer may hold, and acks in flight.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Shape {
    pub(crate) batch: usize,
    /// Messages per `publish_batch` call within a batch (see [`Batching`]).
    pub(crate) chunk: usize,
    pub(crate) prefetch: usize,
    pub(crate) acks_in_flight: usize,
}

/// How the adapter hands over a window of messages before awaiting their acknowledgements:
/// in `publish_batch` calls of `chunk`, each started as soon as it is built.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Batching {
    pub(crate) window: usize,
    pub(crate) chunk: usize,
}

impl Batching {
    /// One `publish_batch` call per window of `size`.
    pub(crate) const fn whole(size: usize) -> Batching {
        Batching {
            window: size,
            chunk: size,
        }
    }
}

/// Concurrent `publish` callers in peak mode (the 256 tasks).
pub(crate) const PEAK_CALLERS: usize = 256;

impl Shape {
    /// The like-for-like shape with `prefetch`: batches of 100, 64 acks in flight.
    pub(crate) const fn like_for_like(prefetch: usize) -> Shape {
        Shape {
            batch: 100,
            chunk: 100,
            prefetch,
            acks_in_flight: 64,
        }
    }

    /// `normal` unless `options.peak`, then `peak`; with `--chunk`, that many messages per
    /// `publish_batch` call (at most a batch).
    pub(crate) fn pick(options: &Options, normal: Shape, peak: Shape) -> Shape {
        let shape = if options.peak { peak } else { normal };
        Shape {
            chunk: options.chunk.unwrap_or(shape.chunk).clamp(1, shape.batch),
            prefetch: options.prefetch.unwrap_or(shape.prefetch),
            ..shape
        }
    }

    /// How the adapter publishes a batch.
    pub(crate) fn batching(&self) -> Batching {
        Batching {
            window: self.batch,
            chunk: self.chunk,
        }
    }
}

/// The publish and end-to-end comparisons every broker runs; at peak also the adapter's
/// concurrent `publish` callers against as many raw callers, each awaiting its own
/// acknowledgement (scenario 2).
pub(crate) fn scenarios(options: &Options) -> &'static [&'static str] {
    if options.peak {
        &["publish", "end to end", "publish, 256 callers"]
    } else {
        &["publish", "end to end"]
    }
}

/// An adapter's publish-only run: [`publish_batches`] as `batching` says, or with
/// `concurrent` [`publish_concurrently`].
pub(crate) async fn adapter_publish<P: Publisher + Clone + 'static>(
    publisher: &P,
    topic: &str,
    n: usize,
    batching: Batching,
    concurrent: bool,
    clock: Clock,
) -> Histogram<u64> {
    if concurrent {
        publish_concurrently(publisher, topic, n, clock).await
    } else {
        publish_batches(publisher, topic, n, batching, clock).await
    }
}

/// Split `n` among `tasks` tasks, each running `task(its index, its count)`, and merge the
/// histograms they return.
pub(crate) async fn in_tasks<F, Fut>(tasks: usize, n: usize, task: F) -> Histogram<u64>
where
    F: Fn(usize, usize) -> Fut,
    Fut: Future<Output = Histogram<u64>> + Send + 'static,
{
    let handles: Vec<_> = (0..tasks)
        .map(|i| {
            // The first `n % tasks` tasks take one more, so exactly `n` go out.
            let count = n / tasks + usize::from(i < n % tasks);
            tokio::spawn(task(i, count))
        })
        .collect();
    let mut merged = histogram();
    for handle in handles {
        merged.add(handle.await.expect("task")).expect("histogram");
    }
    merged
}

/// A raw client's publish-only run: `publish(n, batch)`, or with `concurrent`
/// `publish(its count, 1)` in each of [`PEAK_CALLERS`] tasks, so every caller awaits one
/// acknowledgement at a time.
pub(crate) async fn raw_publishing<F, Fut>(
    n: usize,
    batch: usize,
    concurrent: bool,
    publish: F,
) -> Histogram<u64>
where
    F: Fn(usize, usize) -> Fut,
    Fut: Future<Output = Histogram<u64>> + Send + 'static,
{
    if concurrent {
        in_tasks(PEAK_CALLERS, n, |_, count| publish(count, 1)).await
    } else {
        publish(n, batch).await
    }
}

/// Publish `n` stamped messages from [`PEAK_CALLERS`] tasks, each awaiting one `publish` at
/// a time. Returns every publish's round trip.
pub(crate) async fn publish_concurrently<P: Publisher + Clone + 'static>(
    publisher: &P,
    topic: &str,
    n: usize,
    clock: Clock,
) -> Histogram<u64> {
    in_tasks(PEAK_CALLERS, n, |_, count| {
        let (publisher, topic) = (publisher.clone(), topic.to_owned());
        async move {
            let mut round_trips = histogram();
            for _ in 0..count {
                let sent = Instant::now();
                publisher
                    .publish(&topic, Message::new(clock.stamped_payload()))
                    .await
                    .expect("publish");
                round_trips.saturating_record(sent.elapsed().as_nanos() as u64);
            }
            round_trips
        }
    })
    .await
}

/// Builds payloads of a fixed size whose first 8 bytes are the send time (nanoseconds since
/// the clock's base), so both sides of a comparison pay the same cost to stamp and read them.
#[derive(Clone, Copy)]
pub(crate) struct Clock {
    base: Instant,
    size: usize,
}

impl Clock {
    pub(crate) fn new(size: usize) -> Self {
        Clock {
            base: Instant::now(),
            size,
        }
    }

    pub(crate) fn stamped_payload(&self) -> Bytes {
        let mut buf = BytesMut::with_capacity(self.size);
        buf.put_u64(self.base.elapsed().as_nanos() as u64);
        buf.resize(self.size, 0xA5);
        buf.freeze()
    }

    pub(crate) fn latency_ns(&self, payload: &[u8]) -> u64 {
        let sent = u64::from_be_bytes(payload[..8].try_into().expect("stamped payload"));
        (self.base.elapsed().as_nanos() as u64).saturating_sub(sent)
    }
}

/// Latency histogram in nanoseconds.
pub(crate) fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("histogram bounds")
}

/// One measured run.
#[derive(Debug, Clone)]
pub(crate) struct Run {
    pub(crate) messages: usize,
    pub(crate) elapsed: Duration,
    pub(crate) latency: Histogram<u64>,
}

impl Run {
    pub(crate) fn rate(&self) -> f64 {
        self.messages as f64 / self.elapsed.as_secs_f64()
    }

    pub(crate) fn line(&self, label: &str) -> String {
        format!(
            "{label:<34} {:>12.0} msg/s   p50 {:>9}   p99 {:>9}   ({} msgs in {:.3} s)",
            self.rate(),
            fmt_ns(self.latency.value_at_quantile(0.50)),
            fmt_ns(self.latency.value_at_quantile(0.99)),
            self.messages,
            self.elapsed.as_secs_f64()
        )
    }
}

fn fmt_ns(ns: u64) -> String {
    if ns >= 1_000_000 {
        format!("{:.2} ms", ns as f64 / 1e6)
    } else {
        format!("{:.1} µs", ns as f64 / 1e3)
    }
}

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

impl CpuTime {
    /// Nothing yet: the start of a total.
    const ZERO: CpuTime = CpuTime {
        client: Duration::ZERO,
        broker: Some(Duration::ZERO),
        machine_ticks: 0,
        stolen_ticks: 0,
    };

    /// The CPU time `work` took, on both sides, with its result.
    pub(crate) async fn of<T>(broker_process: &str, work: impl Future<Output = T>) -> (T, Self) {
        let (client, broker) = (process_cpu("self"), broker_cpu(broker_process));
        let machine = machine_cpu_ticks();
        let out = work.await;
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

    fn add(&mut self, other: CpuTime) {
        self.client += other.client;
        self.broker = self.broker.zip(other.broker).map(|(a, b)| a + b);
        self.machine_ticks += other.machine_ticks;
        self.stolen_ticks += other.stolen_ticks;
    }

    /// Both sides' time, and per 100,000 messages.
    fn per(&self, messages: usize) -> String {
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

/// Publish `n` stamped messages with `publish_batch`, a window of `batching.window` at a
/// time: each window in calls of `batching.chunk`, each call started as soon as its messages
/// are built (so they go to the client while the next chunk is built, as a raw loop hands
/// over each record as it builds it), and every call's report awaited before the next
/// window. Returns the round trip of every window.
pub(crate) async fn publish_batches<P: Publisher + ?Sized>(
    publisher: &P,
    topic: &str,
    n: usize,
    batching: Batching,
    clock: Clock,
) -> Histogram<u64> {
    let mut round_trips = histogram();
    let mut sent = 0;
    while sent < n {
        let window_started = Instant::now();
        let count = batching.window.min(n - sent);
        let mut in_flight = Vec::new();
        let mut left = count;
        while left > 0 {
            let take = batching.chunk.min(left);
            left -= take;
            let messages = (0..take)
                .map(|_| Message::new(clock.stamped_payload()))
                .collect();
            let mut publishing = publisher.publish_batch(topic, messages);
            // Polled once here: a backend hands the batch to its client on the first poll.
            match futures::poll!(&mut publishing) {
                std::task::Poll::Ready(report) => report.into_result().expect("publish_batch"),
                std::task::Poll::Pending => in_flight.push(publishing),
            }
        }
        for report in futures::future::join_all(in_flight).await {
            report.into_result().expect("publish_batch");
        }
        round_trips.saturating_record(window_started.elapsed().as_nanos() as u64);
        sent += count;
    }
    round_trips
}

/// An adapter's end-to-end run: `n` stamped messages published with [`publish_batches`] in
/// the background while `subscription` receives and acks them ([`consume_and_ack`]); timed
/// from the first publish to the last delivery.
pub(crate) async fn publish_and_consume<P: Publisher + Clone + 'static>(
    publisher: &P,
    topic: &str,
    subscription: Subscription,
    n: usize,
    batching: Batching,
    clock: Clock,
    acks_in_flight: usize,
) -> Run {
    let started = Instant::now();
    let producer = {
        let publisher = publisher.clone();
        let topic = topic.to_owned();
        tokio::spawn(async move { publish_batches(&publisher, &topic, n, batching, clock).await })
    };
    let latency = consume_and_ack(subscription, n, clock, acks_in_flight).await;
    let elapsed = started.elapsed();
    producer.await.expect("producer task");
    Run {
        messages: n,
        elapsed,
        latency,
    }
}

/// Receive `n` deliveries from `subscription`, recording each one's latency and acking it,
/// up to `acks_in_flight` acks at once; with 1, each is acked before the next is taken.
async fn consume_and_ack(
    subscription: Subscription,
    n: usize,
    clock: Clock,
    acks_in_flight: usize,
) -> Histogram<u64> {
    if acks_in_flight == 1 {
        // The loop a raw consumer runs: no task per ack.
        let mut latency = histogram();
        let mut deliveries = subscription.take(n);
        while let Some(delivery) = deliveries.next().await {
            let delivery = delivery.expect("delivery");
            latency.saturating_record(clock.latency_ns(delivery.message().payload()));
            delivery.ack().await.expect("ack");
        }
        return latency;
    }
    let latency = Arc::new(Mutex::new(histogram()));
    subscription
        .take(n)
        .for_each_concurrent(acks_in_flight, |delivery| {
            let latency = latency.clone();
            async move {
                let delivery = delivery.expect("delivery");
                let ns = clock.latency_ns(delivery.message().payload());
                latency.lock().expect("histogram").saturating_record(ns);
                delivery.ack().await.expect("ack");
            }
        })
        .await;
    latency.lock().expect("histogram").clone()
}

/// What the raw side of a comparison carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Baseline {
    /// The metadata the adapter carries per message (and, where it matters, its queue
    /// arguments): the ratio is the adapter's own overhead, the target's comparison.
    LikeForLike,
    /// Bare payloads: the ratio adds what the metadata costs.
    Minimal,
}

/// Run every scenario of `scenarios` against both raw baselines (like for like first),
/// `options.runs` times each, and print every run, the medians, the ratios and a summary line.
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
    let comparisons = [Baseline::LikeForLike, Baseline::Minimal]
        .into_iter()
        .flat_map(|baseline| {
            scenarios.iter().enumerate().map(move |(scenario, name)| {
                let name = match baseline {
                    Baseline::LikeForLike => (*name).to_owned(),
                    Baseline::Minimal => format!("{name} vs minimal raw"),
                };
                (name, scenario, baseline)
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
        "target >= 0.95x raw (like for like); measured: {}",
        summary.join(", ")
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|a| (*a).to_owned()).collect()
    }

    #[test]
    fn side_picks_one_side_and_refuses_anything_else() {
        let options = Options::parse(&args(&["--side", "adapter", "--runs", "2"])).unwrap();
        assert_eq!(options.side, Some(Side::Adapter));
        assert_eq!(options.runs, 2);
        let options = Options::parse(&args(&["--side", "raw"])).unwrap();
        assert_eq!(options.side, Some(Side::Raw));
        assert!(Options::parse(&args(&["--side", "both"])).is_err());
        assert_eq!(Options::parse(&[]).unwrap().side, None);
    }

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

    #[test]
    fn baseline_picks_one_raw_baseline_and_refuses_anything_else() {
        let options = Options::parse(&args(&["--baseline", "like"])).unwrap();
        assert_eq!(options.baseline, Some(Baseline::LikeForLike));
        let options = Options::parse(&args(&["--baseline", "minimal"])).unwrap();
        assert_eq!(options.baseline, Some(Baseline::Minimal));
        assert!(Options::parse(&args(&["--baseline", "both"])).is_err());
        assert_eq!(Options::parse(&[]).unwrap().baseline, None);
    }

    #[test]
    fn chunk_sets_the_messages_per_publish_batch_call_up_to_a_batch() {
        let peak = Shape {
            batch: 10_000,
            chunk: 1_000,
            prefetch: 10,
            acks_in_flight: 1,
        };
        let pick = |list: &[&str]| {
            let options = Options::parse(&args(list)).unwrap();
            Shape::pick(&options, Shape::like_for_like(10), peak).batching()
        };
        let default = pick(&["--peak"]);
        assert_eq!((default.window, default.chunk), (10_000, 1_000));
        let given = pick(&["--peak", "--chunk", "250"]);
        assert_eq!((given.window, given.chunk), (10_000, 250));
        let whole = pick(&["--peak", "--chunk", "50000"]);
        assert_eq!((whole.window, whole.chunk), (10_000, 10_000));
        let like = pick(&["--chunk", "250"]);
        assert_eq!((like.window, like.chunk), (100, 100));
        assert!(Options::parse(&args(&["--chunk", "many"])).is_err());
    }

    #[test]
    fn prefetch_overrides_the_shapes_window() {
        let shape = |list: &[&str]| {
            let options = Options::parse(&args(list)).unwrap();
            Shape::pick(&options, Shape::like_for_like(10), Shape::like_for_like(20)).prefetch
        };
        assert_eq!(shape(&[]), 10);
        assert_eq!(shape(&["--peak"]), 20);
        assert_eq!(shape(&["--peak", "--prefetch", "100"]), 100);
        assert_eq!(shape(&["--prefetch", "0"]), 1, "at least one");
    }

    /// In chunks, every message goes out exactly once and in order, and each window is one
    /// round trip.
    #[tokio::test]
    async fn publish_batches_in_chunks_sends_every_message_once_in_order() {
        use helix_messaging::memory::MemoryBroker;
        use helix_messaging::{SubscribeOptions, Subscriber};

        let broker = MemoryBroker::new();
        let mut subscription = broker
            .subscribe("chunks", SubscribeOptions::default())
            .await
            .unwrap();
        let batching = Batching {
            window: 1_000,
            chunk: 300,
        };
        let round_trips = publish_batches(&broker, "chunks", 2_500, batching, Clock::new(64)).await;
        assert_eq!(round_trips.len(), 3, "windows of 1,000, 1,000 and 500");
        let mut last_sent = 0;
        for _ in 0..2_500 {
            let delivery = tokio::time::timeout(Duration::from_secs(5), subscription.next())
                .await
                .expect("a delivery within 5 s")
                .expect("the subscription is open")
                .unwrap();
            let payload = delivery.message().payload();
            let sent = u64::from_be_bytes(payload[..8].try_into().unwrap());
            assert!(sent >= last_sent, "out of order");
            last_sent = sent;
            delivery.ack().await.unwrap();
        }
        let extra = tokio::time::timeout(Duration::from_millis(100), subscription.next()).await;
        assert!(extra.is_err(), "no message beyond the 2,500 published");
    }

    /// The client's CPU time is this process's and grows with work done; a broker process
    /// that does not exist reads as unknown rather than as zero.
    #[tokio::test]
    async fn cpu_time_counts_this_process_and_knows_a_missing_broker() {
        let (sum, used) = CpuTime::of("no-such-broker-process", async {
            let started = Instant::now();
            let mut sum = 0u64;
            while started.elapsed() < Duration::from_millis(200) {
                sum = std::hint::black_box(sum.wrapping_add(1));
            }
            sum
        })
        .await;
        assert!(sum > 0);
        assert!(
            used.client >= Duration::from_millis(100),
            "200 ms of spinning counted as {:?}",
            used.client
        );
        assert_eq!(used.broker, None);
        assert!(used.per(1).contains("broker n/a"), "{}", used.per(1));
    }
}
