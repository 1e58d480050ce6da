//! What the example programs share.

use std::future::Future;
use std::process::ExitCode;

use helix_messaging::logging::log_directives;

/// Log to stderr as `RUST_LOG`, else `LOG_LEVEL` (with `MESSAGING_DEBUG`), else
/// `default_level` says (see [`log_directives`]), run `program`, and turn its outcome into
/// the process's exit code (printing the error). A malformed level is such an error, naming
/// its variable, before `program` starts.
pub async fn run_main(
    default_level: &str,
    program: impl Future<Output = helix_messaging::Result<()>>,
) -> ExitCode {
    let filter =
        log_directives(|name| std::env::var(name).ok(), default_level).and_then(|directives| {
            tracing_subscriber::EnvFilter::try_new(&directives).map_err(|e| {
                helix_messaging::Error::config("RUST_LOG", format!("not a log filter: {e}"))
            })
        });
    let filter = match filter {
        Ok(filter) => filter,
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::FAILURE;
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
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

/// Remove the SQLite database at `path` with its WAL and shared-memory files, ignoring any
/// that is not there. SQLite removes those two itself only when the file's last connection
/// closes, and an example's store can still be held open when it cleans up.
pub fn remove_sqlite_files(path: &std::path::Path) {
    for suffix in ["", "-wal", "-shm"] {
        let mut file = path.as_os_str().to_owned();
        file.push(suffix);
        let _ = std::fs::remove_file(file);
    }
}
