//! What a test recorded through the [`metrics`](https://docs.rs/metrics) facade, read back
//! from an in-process recorder.
//!
//! [`install`] puts one recorder in place for the test process (once; later calls reuse
//! it). Unlike `metrics-util`'s debugging recorder, reading does not reset anything: a
//! counter is the total so far, a gauge its last value, a histogram every value recorded.
//! nextest runs each test in a process of its own; under `cargo test` tests share the
//! recorder, so compare before and after, or use labels of the test's own.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use metrics_util::registry::{AtomicStorage, Registry};

/// Keeps every metric in an atomic registry for as long as the process runs.
struct Cumulative(Arc<Registry<Key, AtomicStorage>>);

impl Recorder for Cumulative {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        self.0
            .get_or_create_counter(key, |c| Counter::from_arc(c.clone()))
    }

    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        self.0
            .get_or_create_gauge(key, |g| Gauge::from_arc(g.clone()))
    }

    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        self.0
            .get_or_create_histogram(key, |h| Histogram::from_arc(h.clone()))
    }
}

fn registry() -> &'static Registry<Key, AtomicStorage> {
    static REGISTRY: OnceLock<Arc<Registry<Key, AtomicStorage>>> = OnceLock::new();
    REGISTRY.get_or_init(|| {
        let registry = Arc::new(Registry::atomic());
        metrics::set_global_recorder(Cumulative(registry.clone()))
            .expect("no other metrics recorder is installed in this test process");
        registry
    })
}

/// Install the recorder (before anything records what the test reads).
///
/// # Panics
/// When another recorder was installed in this process first.
pub fn install() {
    registry();
}

/// A recorded value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// A counter's total.
    Counter(u64),
    /// A gauge's last value.
    Gauge(f64),
    /// Every value a histogram recorded.
    Histogram(Vec<f64>),
}

/// Every value recorded so far, by metric name and its labels sorted by key.
pub type Recorded = HashMap<(String, Vec<(String, String)>), Value>;

fn key_of(key: &Key) -> (String, Vec<(String, String)>) {
    let mut labels: Vec<(String, String)> = key
        .labels()
        .map(|l| (l.key().to_owned(), l.value().to_owned()))
        .collect();
    labels.sort();
    (key.name().to_owned(), labels)
}

/// Everything recorded so far (installing the recorder if need be).
pub fn snapshot() -> Recorded {
    let registry = registry();
    let mut recorded = Recorded::new();
    registry.visit_counters(|key, c| {
        recorded.insert(key_of(key), Value::Counter(c.load(Ordering::Acquire)));
    });
    registry.visit_gauges(|key, g| {
        let value = f64::from_bits(g.load(Ordering::Acquire));
        recorded.insert(key_of(key), Value::Gauge(value));
    });
    registry.visit_histograms(|key, h| {
        recorded.insert(key_of(key), Value::Histogram(h.data()));
    });
    recorded
}

/// `pairs` as a [`Recorded`] key's labels.
pub fn labels(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut labels: Vec<(String, String)> = pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    labels.sort();
    labels
}

/// The counter `name` with exactly these labels; 0 when it was never recorded.
///
/// # Panics
/// When `name` with these labels is not a counter.
pub fn counter(recorded: &Recorded, name: &str, pairs: &[(&str, &str)]) -> u64 {
    match recorded.get(&(name.to_owned(), labels(pairs))) {
        None => 0,
        Some(Value::Counter(n)) => *n,
        Some(other) => panic!("{name} {pairs:?} is not a counter: {other:?}"),
    }
}

/// The gauge `name` with exactly these labels, if it was set.
///
/// # Panics
/// When `name` with these labels is not a gauge.
pub fn gauge(recorded: &Recorded, name: &str, pairs: &[(&str, &str)]) -> Option<f64> {
    match recorded.get(&(name.to_owned(), labels(pairs)))? {
        Value::Gauge(v) => Some(*v),
        other => panic!("{name} {pairs:?} is not a gauge: {other:?}"),
    }
}

/// `messaging_connections_total` and `messaging_connection_failures_total` of `backend` so
/// far: (connections made, attempts failed).
pub fn connections(backend: &str) -> (u64, u64) {
    use helix_messaging_core::observe::connection::{
        CONNECTION_FAILURES_METRIC, CONNECTIONS_METRIC,
    };
    let now = snapshot();
    let on = [("backend", backend)];
    (
        counter(&now, CONNECTIONS_METRIC, &on),
        counter(&now, CONNECTION_FAILURES_METRIC, &on),
    )
}

/// `messaging_connection_up` of `backend`'s connections to `connection`, if it was set.
pub fn connections_up(backend: &str, connection: &str) -> Option<f64> {
    gauge(
        &snapshot(),
        helix_messaging_core::observe::connection::CONNECTION_UP_METRIC,
        &[("backend", backend), ("connection", connection)],
    )
}

/// `messaging_reconnects_total` of `backend` so far.
pub fn reconnects(backend: &str) -> u64 {
    counter(
        &snapshot(),
        helix_messaging_core::observe::RECONNECTS_METRIC,
        &[("backend", backend)],
    )
}
