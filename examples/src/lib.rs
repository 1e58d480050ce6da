//! What the example programs share.

use std::future::Future;
use std::process::ExitCode;

/// Log to stderr at `default_level` unless `RUST_LOG` says otherwise, run `program`, and turn its
/// outcome into the process's exit code (printing the error).
pub async fn run_main(
    default_level: &str,
    program: impl Future<Output = helix_messaging::Result<()>>,
) -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default_level.into()),
        )
        // Logs stay out of the programs' output, which tests and scripts read.
        .with_writer(std::io::stderr)
        .init();
    match program.await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}
