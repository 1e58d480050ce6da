//! A throw-away `redis-server` on a free port, for tests that kill, restart or reconfigure
//! a server: they never touch the machine's Redis on 6379. Killed when dropped, even when the
//! test fails.

#![allow(dead_code, unreachable_pub)]

use std::net::TcpListener;

use futures::StreamExt;
use helix_messaging_core::{Delivery, Subscription};
use helix_messaging_redis::{RedisBroker, RedisConfig, RedisMode};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct TempRedis {
    pub port: u16,
    pub dir: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind a free port")
        .local_addr()
        .unwrap()
        .port()
}

pub fn temp_dir(what: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "helix-redis-{what}-{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

impl TempRedis {
    /// Start a server with `extra` arguments; waits until it accepts connections.
    pub fn start(what: &str, extra: &[&str]) -> TempRedis {
        let port = free_port();
        let dir = temp_dir(what);
        let mut args = vec![
            "--bind".to_owned(),
            "127.0.0.1".to_owned(),
            "--save".to_owned(),
            String::new(),
            "--dir".to_owned(),
            dir.display().to_string(),
        ];
        if !extra.contains(&"--port") {
            args.extend(["--port".to_owned(), port.to_string()]);
        }
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        // A TLS-only server (`--port 0`) is ready when its TLS port listens.
        let listening = extra
            .iter()
            .position(|a| *a == "--tls-port")
            .and_then(|i| extra.get(i + 1))
            .map_or(port, |p| p.parse().expect("--tls-port value"));
        let mut redis = TempRedis {
            port,
            dir,
            args,
            child: None,
        };
        redis.spawn(listening);
        redis
    }

    fn spawn(&mut self, wait_port: u16) {
        let child = Command::new("redis-server")
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server on PATH (scripts/test installs it)");
        self.child = Some(child);
        wait_for_port(wait_port);
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// SIGKILL: a crash, not a shutdown.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start again with the same arguments and data directory.
    pub fn restart(&mut self, wait_port: u16) {
        self.kill();
        self.spawn(wait_port);
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }
}

impl Drop for TempRedis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn wait_for_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "redis-server did not listen on {port}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Longest wait for one expected delivery.
pub const WAIT: Duration = Duration::from_secs(15);

/// The shared server (`REDIS_URL` overrides).
pub fn shared_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// Deletes keys from the shared server when dropped, so a test leaves nothing behind even
/// when it fails.
pub struct DeleteOnDrop(pub Vec<String>);

impl Drop for DeleteOnDrop {
    fn drop(&mut self) {
        if let Ok(mut conn) = redis::Client::open(shared_url()).and_then(|c| c.get_connection()) {
            let _: redis::RedisResult<i64> = redis::cmd("DEL").arg(&self.0).query(&mut conn);
        }
    }
}

/// A broker for `url` in `mode`, with `tune` applied to its settings.
pub async fn broker(
    url: &str,
    mode: RedisMode,
    tune: impl FnOnce(&mut RedisConfig),
) -> RedisBroker {
    let mut config = RedisConfig::new(url, mode).expect("url");
    tune(&mut config);
    RedisBroker::connect(config).await.expect("connect")
}

/// The next delivery, failing the test if none arrives within [`WAIT`] or the stream errs
/// or ends.
pub async fn recv(sub: &mut Subscription) -> Delivery {
    tokio::time::timeout(WAIT, sub.next())
        .await
        .unwrap_or_else(|_| panic!("no delivery on {} within {WAIT:?}", sub.topic()))
        .expect("subscription open")
        .expect("no stream error")
}
