//! Running the helixctl binary and reading what it printed.

use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;

/// The token of every admin API these tests start.
pub(crate) const TOKEN: &str = "ctl-token-0123456789";

/// Run helixctl with `args` against `url`, the token in `MESSAGING_ADMIN_TOKEN` when given.
pub(crate) async fn helixctl(url: &str, token: Option<&str>, args: &[&str]) -> Output {
    let env: Vec<(&str, &str)> = token
        .map(|t| ("MESSAGING_ADMIN_TOKEN", t))
        .into_iter()
        .collect();
    helixctl_with(url, args, &env).await
}

/// Run helixctl with `args` against `url` and only the helixctl variables in `env` (off the
/// runtime's threads: the server runs on them), giving up after 60 s.
pub(crate) async fn helixctl_with(url: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_helixctl"));
    command.args(["--url", url]).args(args);
    for var in [
        "MESSAGING_ADMIN_TOKEN",
        "MESSAGING_ADMIN_TOKEN_FILE",
        "MESSAGING_ADMIN_CA_CERT",
        "HELIXCTL_URL",
    ] {
        command.env_remove(var);
    }
    command.envs(env.iter().copied());
    tokio::time::timeout(
        Duration::from_secs(60),
        tokio::task::spawn_blocking(move || command.output().expect("helixctl runs")),
    )
    .await
    .expect("helixctl finished within 60 s")
    .unwrap()
}

/// The JSON a successful run printed on stdout.
pub(crate) fn ok_json(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "{:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON on stdout")
}

/// The run failed with exit status `code`, saying `says` on stderr.
pub(crate) fn failed(out: &Output, code: i32, says: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{stderr}");
    assert!(stderr.contains(says), "{stderr}");
}
