//! What a run records: payloads that carry their send time, so latency is read off each
//! delivery; latency histograms; and a measured run with its result line.

use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use hdrhistogram::Histogram;

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
