//! What the `admin_server` tests share.

#![allow(dead_code)]

/// The test Redis (`REDIS_URL`, default `redis://127.0.0.1:6379`) in database `db`: every
/// `admin_server` consumes the same well-known DLQ topics, so tests that run one at the same
/// time each take a database of their own, or one's dead letters reach another's DLQ.
pub(crate) fn redis_in_db(db: u8) -> String {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let url = url.trim_end_matches('/');
    let base = match url.rsplit_once('/') {
        Some((head, tail))
            if !tail.is_empty()
                && tail.bytes().all(|b| b.is_ascii_digit())
                && !head.ends_with('/') =>
        {
            head
        }
        _ => url,
    };
    format!("{base}/{db}")
}

/// A child process, killed when the test ends however it ends.
pub(crate) struct Running(pub(crate) std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The `admin_server` example with `env` (on a free loopback port, logging warnings), once
/// it has said it listens (within 60 s); it and its address.
pub(crate) fn admin_server(env: &[(&str, std::ffi::OsString)]) -> (Running, String) {
    use std::io::BufRead as _;

    let addr = format!("127.0.0.1:{}", helix_messaging_testkit::faults::free_port());
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_admin_server"))
        .envs(env.iter().map(|(k, v)| (*k, v)))
        .env("MESSAGING_ADMIN_ADDR", &addr)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("the admin_server example starts");
    let stdout = child.stdout.take().unwrap();
    let server = Running(child);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufReader::new(stdout).read_line(&mut line);
        let _ = ready_tx.send(line);
    });
    let line = ready_rx
        .recv_timeout(std::time::Duration::from_secs(60))
        .expect("the server said it listens within 60 s");
    assert_eq!(line.trim(), format!("listening on {addr}"));
    (server, addr)
}
