//! The example programs run end to end on the embedded memory broker (each checks its own
//! results and exits non-zero when something is off).

use std::process::Command;
use std::time::Instant;

fn run(program: &str) -> String {
    let started = Instant::now();
    let output = Command::new(program)
        .env("MESSAGING_BACKEND", "memory")
        .env_remove("HELIX_REPLAY_STORE")
        .env_remove("HELIX_DLQ_STORE")
        .env_remove("MESSAGING_TASK_BACKEND")
        .env_remove("MESSAGING_EVENT_BACKEND")
        .env_remove("MESSAGING_FALLBACK_ENABLED")
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{program} failed after {:?}:\n{stdout}\n{}",
        started.elapsed(),
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// Assert that the SQLite file the example named on the line starting with `prefix` is gone,
/// with its WAL and shared-memory files: an example that made its own store in the temp
/// directory leaves nothing of it there.
fn assert_store_removed(out: &str, prefix: &str) {
    let path = out
        .lines()
        .find_map(|line| line.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no line starting {prefix:?} in:\n{out}"))
        .trim();
    for file in [
        path.to_owned(),
        format!("{path}-wal"),
        format!("{path}-shm"),
    ] {
        assert!(
            !std::path::Path::new(&file).exists(),
            "{file} is left behind"
        );
    }
}

#[test]
fn the_replay_example_replays_what_its_dry_run_counted() {
    let out = run(env!("CARGO_BIN_EXE_replay"));
    assert!(out.contains("backend: memory"), "{out}");
    assert!(
        out.contains("holds 80 copies (the dry run said 80)"),
        "{out}"
    );
    assert!(out.contains("cancelled replay: cancelled"), "{out}");
    assert_store_removed(&out, "checkpoints in ");
}

#[test]
fn the_dlq_example_runs() {
    let out = run(env!("CARGO_BIN_EXE_dlq"));
    assert!(out.contains("backend: memory"), "{out}");
    assert_store_removed(&out, "DLQ store: ");
}

#[test]
fn the_hub_example_handles_tasks_and_events() {
    let out = run(env!("CARGO_BIN_EXE_hub"));
    assert!(out.contains("tasks on memory, events on memory"), "{out}");
    assert!(out.contains("tasks_handled: 3"), "{out}");
    assert!(out.contains("tasks_expired: 1"), "{out}");
    assert!(out.contains("events_handled: 2"), "{out}");
}

/// The programs' log level comes from `LOG_LEVEL` (HelixAgent's) when `RUST_LOG` is unset,
/// and a malformed one stops the program before it starts, naming the variable.
#[test]
fn a_malformed_log_level_is_named_and_stops_the_program() {
    for (var, value) in [("LOG_LEVEL", "verbose"), ("MESSAGING_DEBUG", "very")] {
        let output = Command::new(env!("CARGO_BIN_EXE_quickstart"))
            .env("MESSAGING_BACKEND", "memory")
            .env_remove("RUST_LOG")
            .env(var, value)
            .output()
            .expect("running quickstart");
        assert!(!output.status.success(), "{var}={value} was accepted");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(var), "{stderr}");
        assert!(output.stdout.is_empty(), "the program ran: {output:?}");
    }
}
