//! Shared measuring: options, payloads that carry their send time, latency histograms,
//! result lines and ratios.
//!
//! The parts: [`options`] (the command line, the shape a comparison drives both sides in and
//! which comparisons run), [`run`] (stamped payloads, latency histograms, a run's result
//! line), [`cpu`] (CPU time of the client, the broker and the machine's steal), [`drive`]
//! (the adapter's and the raw clients' publish and end-to-end runners) and [`compare`]
//! (medians, ratios, and running both sides of every comparison in turn).

mod compare;
mod cpu;
mod drive;
mod options;
mod run;

pub(crate) use compare::{compare_baselines, median, report};
pub(crate) use drive::{
    adapter_publish, in_tasks, one_through, publish_and_consume, publish_batches,
    publish_concurrently, publish_through_window, raw_publishing,
};
pub(crate) use options::{
    Baseline, Batching, Options, PEAK_CALLERS, Pattern, Shape, Side, pattern, scenarios,
};
pub(crate) use run::{Clock, Run, histogram};
