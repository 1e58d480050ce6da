//! The admin API against its own OpenAPI document, property-based: the `admin_server`
//! example runs over the real Redis Streams, and schemathesis (from PyPI) loads the
//! document the server serves and sends it generated requests, valid and invalid, checking
//! every answer (status codes, content types, response schemas, no server errors, invalid
//! input refused, authentication enforced).
//!
//! `scripts/test` installs schemathesis into its own virtualenv and names it in
//! `SCHEMATHESIS`; without it this test fails, naming what to install.
#![cfg(all(feature = "admin", feature = "redis"))]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use helix_messaging_testkit::faults::free_port;

const ADMIN_TOKEN: &str = "openapi-test-token";
const READ_TOKEN: &str = "openapi-read-token-01";

/// Kills the server when the test ends, however it ends.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_running_admin_api_keeps_to_its_openapi_document() {
    let schemathesis = std::env::var("SCHEMATHESIS").unwrap_or_else(|_| "schemathesis".into());
    let version = Command::new(&schemathesis).arg("--version").output();
    assert!(
        version.as_ref().is_ok_and(|out| out.status.success()),
        "schemathesis is not installed ({schemathesis:?}: {version:?}); `pip install schemathesis` \
         or run scripts/test, which installs it and sets SCHEMATHESIS"
    );

    let dir = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let redis = common::redis_in_db(2);
    let mut child = Command::new(env!("CARGO_BIN_EXE_admin_server"))
        .env("MESSAGING_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("MESSAGING_ADMIN_READ_TOKEN", READ_TOKEN)
        .env("MESSAGING_ADMIN_ADDR", &addr)
        .env("MESSAGING_TASK_BACKEND", "redis-streams")
        .env("MESSAGING_EVENT_BACKEND", "redis-streams")
        .env("REDIS_URL", redis)
        .env("HELIX_DLQ_STORE", dir.path().join("dlq.sqlite3"))
        // The task and event sides spool, so the spool endpoints answer from real spools.
        .env("MESSAGING_FALLBACK_ENABLED", "true")
        .env("MESSAGING_FALLBACK_DIR", dir.path().join("spool"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .expect("the admin_server example starts");
    let stdout = child.stdout.take().unwrap();
    let server = Running(child);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = ready_tx.send(line);
    });
    let line = ready_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the server said it listens within 60 s");
    assert_eq!(line.trim(), format!("listening on {addr}"));

    // Once with each token: the read-only one must get a documented answer (403 for a
    // write) from every operation too.
    for token in [ADMIN_TOKEN, READ_TOKEN] {
        let report = schemathesis_run(&schemathesis, dir.path(), &addr, token);
        // Every operation but the document's own (schemathesis leaves out the URL it
        // loaded the schema from) was tested, the two root probes included.
        let tested = report
            .lines()
            .find_map(|l| l.trim().strip_prefix("Tested: "))
            .and_then(|n| n.trim().parse::<u32>().ok());
        assert_eq!(
            tested,
            Some(22),
            "operations tested with {token}:\n{report}"
        );
    }
    drop(server);
}

/// One schemathesis run against the server at `addr` with `token`; its report, once it
/// found nothing wrong.
fn schemathesis_run(schemathesis: &str, dir: &std::path::Path, addr: &str, token: &str) -> String {
    let out = Command::new(schemathesis)
        .current_dir(dir)
        .args([
            "--no-color",
            "run",
            &format!("http://{addr}/v1/messaging/openapi.json"),
            "--header",
            &format!("Authorization: Bearer {token}"),
            "--checks",
            "all",
            // A request can be valid by the schema and still wrong (a window ending before
            // it starts, an id that does not exist): refusing it is right, so "valid
            // requests are accepted" is not a property of this API.
            "--exclude-checks",
            "positive_data_acceptance",
            "--phases",
            "examples,coverage,fuzzing",
            "--max-examples",
            "50",
            // Reproducible in CI; change it locally to explore.
            "--seed",
            "20261202",
            "--request-timeout",
            "10",
        ])
        .output()
        .expect("schemathesis runs");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "schemathesis found failures:\n{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    report.into_owned()
}
