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

use std::process::Command;

const ADMIN_TOKEN: &str = "openapi-test-token";
const READ_TOKEN: &str = "openapi-read-token-01";

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
    let (server, addr) = common::admin_server(&[
        ("MESSAGING_ADMIN_TOKEN", ADMIN_TOKEN.into()),
        ("MESSAGING_ADMIN_READ_TOKEN", READ_TOKEN.into()),
        ("MESSAGING_TASK_BACKEND", "redis-streams".into()),
        ("MESSAGING_EVENT_BACKEND", "redis-streams".into()),
        ("REDIS_URL", common::redis_in_db(2).into()),
        ("HELIX_DLQ_STORE", dir.path().join("dlq.sqlite3").into()),
        // The task and event sides spool, so the spool endpoints answer from real spools.
        ("MESSAGING_FALLBACK_ENABLED", "true".into()),
        ("MESSAGING_FALLBACK_DIR", dir.path().join("spool").into()),
    ]);

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
            Some(23),
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
