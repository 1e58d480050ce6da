//! Benchmark harness: each scenario runs the project's path and the raw client it wraps in the
//! same process, same machine, same run, and prints both and their ratio.
//!
//! ```text
//! cargo run --release -p helix-messaging-bench -- memory [--messages N] [--size BYTES] [--runs R]
//! cargo run --release -p helix-messaging-bench -- redis [--messages N] [--size BYTES] [--runs R]
//! ```
//!
//! `redis` talks to `REDIS_URL` (default `redis://127.0.0.1:6379`).

mod measure;
mod memory;
mod redis;

use std::process::ExitCode;

use measure::Options;

fn usage() -> &'static str {
    "usage: helix-messaging-bench memory|redis [--messages N] [--size BYTES] [--runs R] [--filter NAME]"
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
            let options = Options {
                messages: if options.messages_given {
                    options.messages
                } else {
                    100_000
                },
                ..options
            };
            runtime.block_on(redis::compare(&options));
            ExitCode::SUCCESS
        }
        other => {
            eprintln!("unknown scenario {other:?}\n{}", usage());
            ExitCode::FAILURE
        }
    }
}
