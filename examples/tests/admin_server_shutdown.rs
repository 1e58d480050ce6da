//! The `admin_server` example as a deployed process: a supervisor (systemd, Kubernetes,
//! docker stop) ends it with SIGTERM, and it must stop as cleanly as on Ctrl-C: requests
//! drained, processor and replays stopped, hub closed, exit status 0.
#![cfg(all(unix, feature = "admin", feature = "memory"))]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use helix_messaging_testkit::faults::free_port;

const ADMIN_TOKEN: &str = "shutdown-test-token";

/// Kills the server when the test ends, however it ends.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The next stdout line within `timeout`, or why there is none.
fn next_line(lines: &Receiver<String>, timeout: Duration) -> Result<String, RecvTimeoutError> {
    lines.recv_timeout(timeout)
}

#[test]
fn sigterm_stops_the_admin_server_cleanly() {
    stops_cleanly_on("TERM");
}

#[test]
fn ctrl_c_stops_the_admin_server_cleanly() {
    stops_cleanly_on("INT");
}

/// Start the server, send it `SIG<signal>` once it listens, and check it drains and exits 0
/// within 20 s, saying so.
fn stops_cleanly_on(signal: &str) {
    let dir = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let mut child = Command::new(env!("CARGO_BIN_EXE_admin_server"))
        .env("MESSAGING_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("MESSAGING_ADMIN_ADDR", &addr)
        .env("MESSAGING_TASK_BACKEND", "memory")
        .env("MESSAGING_EVENT_BACKEND", "memory")
        .env("HELIX_DLQ_STORE", dir.path().join("dlq.sqlite3"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .expect("the admin_server example starts");
    let stdout = child.stdout.take().unwrap();
    let mut server = Running(child);
    let (line_tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if line_tx.send(line).is_err() {
                break;
            }
        }
    });
    let first =
        next_line(&lines, Duration::from_secs(60)).expect("the server said it listens within 60 s");
    assert_eq!(first.trim(), format!("listening on {addr}"));

    let pid = server.0.id().to_string();
    let sent = Command::new("kill")
        .args([&format!("-{signal}"), &pid])
        .status()
        .expect("kill runs");
    assert!(sent.success(), "kill -{signal} {pid}: {sent}");

    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = server.0.try_wait().expect("the child can be waited on") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the server still runs 20 s after SIG{signal}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        status.success(),
        "the server exits 0 on SIG{signal}, not {status}"
    );
    let said: Vec<String> =
        std::iter::from_fn(|| next_line(&lines, Duration::from_secs(5)).ok()).collect();
    assert!(
        said.iter()
            .any(|l| *l == format!("shutting down on SIG{signal}")),
        "the server says why it stops: {said:?}"
    );
    assert_eq!(
        said.last().map(String::as_str),
        Some("stopped"),
        "the server says it stopped, last: {said:?}"
    );
}
