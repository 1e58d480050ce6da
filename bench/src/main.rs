//! Benchmark harness: each scenario runs the project's path and the raw client it wraps in the
//! same process, same machine, same run, and prints both and their ratio.
//!
//! ```text
//! cargo run --release -p helix-messaging-bench -- memory [--messages N] [--size BYTES] [--runs R]
//! cargo run --release -p helix-messaging-bench -- redis [--messages N] [--size BYTES] [--runs R]
//! cargo run --release -p helix-messaging-bench -- rabbitmq [--messages N] [--size BYTES] [--runs R]
//! cargo run --release -p helix-messaging-bench -- kafka [--messages N] [--size BYTES] [--runs R]
//! cargo run --release -p helix-messaging-bench -- layers [--messages N] [--runs R]
//! cargo run --release -p helix-messaging-bench -- redrive [--messages N] [--runs R]
//! cargo run --release -p helix-messaging-bench -- replay [--messages N] [--size BYTES] [--runs R]
//! cargo run --release -p helix-messaging-bench -- replay-peak [--messages N] [--size BYTES]
//! cargo run --release -p helix-messaging-bench -- spool [--messages N] [--size BYTES] [--runs R]
//! cargo run --release -p helix-messaging-bench -- admin-dlq [--messages N] [--size BYTES] [--runs R]
//! ```
//!
//! `--peak` on `memory`, `redis`, `rabbitmq` and `kafka` drives both sides at their best
//! instead of like for like at batches of 100: the raw client with deep pipelines, a window
//! of confirms or every delivery report outstanding, against the adapter's large
//! `publish_batch`, 256 concurrent `publish` callers, and a consumer acking every delivery
//! with 256 acks in flight.
//!
//! `--side adapter` (or `raw`) runs one side of each comparison only, for a profiler
//! (`valgrind --tool=callgrind`, `perf record`); it prints no ratio. The adapter's side of a
//! scenario is the same against either raw baseline, so it runs once. `--baseline like` (or
//! `minimal`) compares against one raw baseline only: a raw profile of one scenario is then
//! one run, not the like-for-like and the minimal run added together.
//!
//! `redis` talks to `REDIS_URL` (default `redis://127.0.0.1:6379`), `rabbitmq` to
//! `RABBITMQ_URL` (default `amqp://guest:guest@127.0.0.1:5672/%2f`), `kafka` to `KAFKA_BROKERS`
//! (default `127.0.0.1:9092`).

mod admin;
mod kafka;
mod layers;
mod leftovers;
mod measure;
mod memory;
mod rabbitmq;
mod redis;
mod replay;
mod spool;

use std::process::ExitCode;

use measure::Options;

fn usage() -> &'static str {
    "usage: helix-messaging-bench memory|redis|rabbitmq|kafka|layers|redrive|replay|replay-peak|spool|admin-dlq [--messages N] [--size BYTES] [--runs R] [--filter NAME|=NAME] [--peak] [--side adapter|raw] [--baseline like|minimal|owned] [--chunk N] [--prefetch N]"
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(scenario) = args.first() else {
        eprintln!("{}", usage());
        return ExitCode::FAILURE;
    };
    let options = match Options::parse(&args[1..]) {
        Ok(options) => options,
        Err(err) => {
            eprintln!("{err}\n{}", usage());
            return ExitCode::FAILURE;
        }
    };
    if options.baseline == Some(measure::Baseline::Owned) && scenario != "kafka" {
        eprintln!("--baseline owned is Kafka's end to end only\n{}", usage());
        return ExitCode::FAILURE;
    }
    // `RUST_LOG=helix_messaging_rabbitmq=debug` shows what an adapter is doing during a run.
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    match scenario.as_str() {
        "memory" => {
            runtime.block_on(memory::compare(&options));
            ExitCode::SUCCESS
        }
        "redis" => {
            runtime.block_on(redis::compare(&options.default_messages(100_000)));
            ExitCode::SUCCESS
        }
        "kafka" => {
            runtime.block_on(kafka::compare(&options.default_messages(100_000)));
            ExitCode::SUCCESS
        }
        "layers" => {
            runtime.block_on(layers::compare_layers(&options.default_messages(200_000)));
            ExitCode::SUCCESS
        }
        "replay" => {
            runtime.block_on(replay::compare(&options.default_messages(100_000)));
            ExitCode::SUCCESS
        }
        "spool" => {
            runtime.block_on(spool::compare(&options.default_messages(20_000)));
            ExitCode::SUCCESS
        }
        "replay-peak" => {
            runtime.block_on(replay::peak_memory(&options.default_messages(1_000_000)));
            ExitCode::SUCCESS
        }
        "redrive" => {
            runtime.block_on(layers::compare_redrive(&options.default_messages(10_000)));
            ExitCode::SUCCESS
        }
        "admin-dlq" => {
            runtime.block_on(admin::compare(&options.default_messages(10_000)));
            ExitCode::SUCCESS
        }
        "rabbitmq" => {
            runtime.block_on(rabbitmq::compare(&options.default_messages(50_000)));
            ExitCode::SUCCESS
        }
        other => {
            eprintln!("unknown scenario {other:?}\n{}", usage());
            ExitCode::FAILURE
        }
    }
}
