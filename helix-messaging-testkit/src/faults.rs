//! Fault helpers for tests that take a broker away: stopping and starting the shared
//! RabbitMQ node's application (started again even when the test fails, unless the test
//! runner kills the test), vhosts of a test's own, a private Redis server (its own port,
//! append-only file on) that a test may crash and restart without touching the machine's
//! Redis, RabbitMQ nodes of a test's own and, with the `kafka` feature, a cluster of Apache
//! Kafka brokers of a test's own (`PrivateKafkaCluster`) whose brokers a test may kill and
//! restart.
//!
//! Every helper panics when its tool fails: a fault that cannot be injected is a failed
//! test, never a skipped one.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Run `rabbitmqctl` with `args`, returning its output.
///
/// # Panics
/// When it cannot be run, fails, or has not finished within two minutes.
pub fn rabbitmqctl(args: &[&str]) -> String {
    run_within("rabbitmqctl", args, Duration::from_secs(120)).unwrap_or_else(|e| panic!("{e}"))
}

/// Starts the RabbitMQ application when dropped, so a test that stopped it (and failed
/// before starting it) leaves it running.
#[derive(Debug)]
pub struct KeepRabbitMqRunning;

impl Drop for KeepRabbitMqRunning {
    fn drop(&mut self) {
        if let Err(e) = start_rabbitmq_app() {
            eprintln!("KeepRabbitMqRunning: {e}");
        }
    }
}

/// Stop the RabbitMQ application (the Erlang node stays up; hold a [`KeepRabbitMqRunning`]
/// so a failing test starts it again).
///
/// # Panics
/// When `rabbitmqctl stop_app` fails.
pub async fn stop_rabbitmq() {
    tokio::task::spawn_blocking(|| rabbitmqctl(&["stop_app"]))
        .await
        .expect("rabbitmqctl stop_app ran");
}

/// Start the RabbitMQ application and wait until it serves again.
///
/// A `start_app` that has not finished within 30 s (seen twice in CI: the test then held
/// the node down past its own timeout, and every later RabbitMQ test failed with it) is
/// given up on: the node is killed and started afresh, its log printed, so the test goes
/// on against a running broker and the rest of the suite too.
///
/// # Panics
/// When neither the application nor a restarted node serves within their limits.
pub async fn start_rabbitmq() {
    tokio::task::spawn_blocking(start_rabbitmq_app)
        .await
        .expect("rabbitmqctl start_app ran")
        .unwrap_or_else(|e| panic!("{e}"));
}

/// `rabbitmqctl args`, given up on (and every process it started killed) if it has not
/// finished within `limit`.
fn rabbitmqctl_within(args: &[&str], limit: Duration) -> Result<(), String> {
    run_within("rabbitmqctl", args, limit).map(drop)
}

/// What `program args` printed, or why it failed; given up on (and every process it
/// started killed) if it has not finished within `limit`.
///
/// Run as root, Debian's RabbitMQ commands run as `su rabbitmq -c …`, in a session of their
/// own: a signal to the command or to its process group leaves its Erlang VM running, and
/// a reader of a pipe the VM holds waits as long as the VM does. So the command writes to
/// files, not pipes, and at the limit the whole tree of processes under it is killed.
fn run_within(program: &str, args: &[&str], limit: Duration) -> Result<String, String> {
    let base = std::env::temp_dir().join(format!("{program}-{}", uuid::Uuid::new_v4().simple()));
    let (out_path, err_path) = (base.with_extension("out"), base.with_extension("err"));
    let file = |path: &PathBuf| {
        std::fs::File::create(path).map_err(|e| format!("creating {}: {e}", path.display()))
    };
    let out = file(&out_path)?;
    let err = file(&err_path).inspect_err(|_| {
        let _ = std::fs::remove_file(&out_path);
    })?;
    let spawned = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("running {program} {args:?} (scripts/test installs it): {e}"));
    let read = |path: &PathBuf| {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let _ = std::fs::remove_file(path);
        text
    };
    let status = spawned.and_then(|mut child| {
        let deadline = Instant::now() + limit;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return Ok(status),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                gave_up => {
                    kill_process_tree(child.id());
                    // The root is not reaped before this, so its pid is still its own: killed
                    // here too, should `kill` have failed to run.
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(match gave_up {
                        Err(e) => format!("waiting for {program} {args:?}: {e}"),
                        _ => format!("{program} {args:?} did not finish within {limit:?}"),
                    });
                }
            }
        }
    });
    let (stdout, stderr) = (read(&out_path), read(&err_path));
    match status {
        Ok(status) if status.success() => Ok(stdout),
        Ok(_) => Err(format!("{program} {args:?} failed: {stderr}")),
        Err(e) => Err(format!("{e}: {stderr}")),
    }
}

/// SIGKILL to `root` and every process descended from it, found through `/proc`, so
/// descendants that left `root`'s session go too. Processes already orphaned (reparented to
/// PID 1) are not found; a descendant that exits between the scan and the kill leaves a pid
/// that could in principle be reused meanwhile, a window of microseconds.
fn kill_process_tree(root: u32) {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Some(ppid) = process_status(pid)
                .and_then(|fields| fields.split_whitespace().nth(1)?.parse::<u32>().ok())
            else {
                continue;
            };
            parents.push((pid, ppid));
        }
    }
    let mut tree = vec![root];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        tree.extend(
            parents
                .iter()
                .filter(|(_, ppid)| *ppid == parent)
                .map(|(pid, _)| *pid),
        );
        i += 1;
    }
    let _ = Command::new("kill")
        .arg("-KILL")
        .args(tree.iter().map(u32::to_string))
        .stderr(Stdio::null())
        .status();
}

/// The fields of `/proc/<pid>/stat` after the command's name, from the state on (`S 1 …`:
/// state, parent, …); `None` when there is no such process. The name may hold spaces and
/// parentheses; the fields after its last `)` do not.
fn process_status(pid: u32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')').map(|(_, fields)| fields.to_owned())
}

/// The machine's node: `start_app`, or when that does not finish, a node started afresh.
fn start_rabbitmq_app() -> Result<(), String> {
    // Both take a second or two when the node is well.
    let limit = Duration::from_secs(30);
    let started = rabbitmqctl_within(&["start_app"], limit)
        .and_then(|()| rabbitmqctl_within(&["await_startup", "--timeout", "30"], limit));
    let Err(why) = started else {
        return Ok(());
    };
    eprintln!(
        "RabbitMQ: {why}; killing the node and starting it again. The end of its log:\n{}",
        rabbitmq_log_tail()
    );
    restart_rabbitmq_node().map_err(|e| format!("{why}, and then {e}"))
}

/// The last lines of the machine node's log, for a failure report.
fn rabbitmq_log_tail() -> String {
    let Ok(logs) = std::fs::read_dir("/var/log/rabbitmq") else {
        return "(no /var/log/rabbitmq)".into();
    };
    let mut text = String::new();
    for log in logs.flatten() {
        let name = log.file_name().to_string_lossy().into_owned();
        if name.starts_with("rabbit@") && name.ends_with(".log") {
            text += &file_tail(&log.path(), 40);
        }
    }
    text
}

/// Kill the machine's node (its pid file is `/var/lib/rabbitmq/mnesia/<node>.pid`, as
/// Debian's package lays it out) and start it detached, as `scripts/services.sh` does.
fn restart_rabbitmq_node() -> Result<(), String> {
    let mut killed = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/var/lib/rabbitmq/mnesia") {
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("rabbit@") && name.ends_with(".pid") {
                let pid = std::fs::read_to_string(entry.path()).unwrap_or_default();
                let pid = pid.trim().to_owned();
                let _ = Command::new("kill")
                    .args(["-9", &pid])
                    .stderr(Stdio::null())
                    .status();
                killed.push(pid);
            }
        }
    }
    // Until the killed VM is gone (or a zombie): with the application stopped the port is
    // closed already, and a node started beside the old VM clashes with it.
    let deadline = Instant::now() + Duration::from_secs(30);
    let alive = |pid: &String| {
        pid.parse()
            .ok()
            .and_then(process_status)
            .is_some_and(|fields| !fields.trim_start().starts_with('Z'))
    };
    while killed.iter().any(alive) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    run_within("rabbitmq-server", &["-detached"], Duration::from_secs(60))?;
    // `await_startup` fails at once until the node answers at all, so it is retried.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if rabbitmqctl_within(
            &["await_startup", "--timeout", "60"],
            Duration::from_secs(70),
        )
        .is_ok()
            && port_open(5672)
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the restarted node did not serve within 120 s; its log:\n{}",
                rabbitmq_log_tail()
            ));
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Whether something accepts connections on `port` of 127.0.0.1 (within a second).
fn port_open(port: u16) -> bool {
    TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_secs(1),
    )
    .is_ok()
}

/// The last `lines` lines of the file at `path` (empty when it cannot be read).
fn file_tail(path: &std::path::Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A RabbitMQ vhost of the test's own (guest may use it), deleted when dropped.
#[derive(Debug)]
pub struct TestVhost(pub String);

impl TestVhost {
    /// Create `<prefix>-<random>`.
    ///
    /// # Panics
    /// When `rabbitmqctl` fails.
    pub fn new(prefix: &str) -> TestVhost {
        let name = format!("{prefix}-{}", uuid::Uuid::new_v4().simple());
        rabbitmqctl(&["add_vhost", &name]);
        rabbitmqctl(&["set_permissions", "-p", &name, "guest", ".*", ".*", ".*"]);
        TestVhost(name)
    }

    /// `amqp://guest:guest@127.0.0.1:5672/<vhost>`.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:5672/{}", self.0)
    }
}

impl Drop for TestVhost {
    fn drop(&mut self) {
        let _ = rabbitmqctl_within(&["delete_vhost", &self.0], Duration::from_secs(60));
    }
}

/// A free TCP port on 127.0.0.1 (free when asked; a test binds it soon after).
///
/// # Panics
/// When no port can be bound.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// A RabbitMQ node of the test's own: its own node name, AMQP and distribution ports, data
/// and log folders and an empty plugin list, beside the machine's node (which it does not
/// join). [`PrivateRabbitMq::kill`] kills it with SIGKILL, as a node dies; dropping it kills
/// it too and removes its folders.
#[derive(Debug)]
pub struct PrivateRabbitMq {
    node: String,
    port: u16,
    dir: PathBuf,
    server: Option<Child>,
}

impl PrivateRabbitMq {
    /// Start one and wait until it is up (`rabbitmqctl await_startup`, retried as
    /// `scripts/services.sh` does).
    ///
    /// # Panics
    /// When it cannot be started or is not up within 90 s.
    pub fn start() -> PrivateRabbitMq {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("helix-private-rabbitmq-{port}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("log")).expect("a folder for the private node");
        std::fs::write(dir.join("enabled_plugins"), "[].\n").expect("its plugin list");
        // Debian's `rabbitmq-server` run as root drops to the `rabbitmq` user, which must
        // own the node's folders.
        let _ = Command::new("chown")
            .args(["-R", "rabbitmq:rabbitmq"])
            .arg(&dir)
            .status();
        let node = format!("helix{port}@localhost");
        let log = std::fs::File::create(dir.join("server.out")).expect("its output file");
        let server = Command::new("rabbitmq-server")
            .env("RABBITMQ_NODENAME", &node)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", port.to_string())
            .env("RABBITMQ_DIST_PORT", free_port().to_string())
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
            .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", dir.join("advanced.config"))
            .env("RABBITMQ_PID_FILE", dir.join("node.pid"))
            .stdout(log.try_clone().expect("its output file"))
            .stderr(log)
            .spawn()
            .expect("rabbitmq-server on PATH (scripts/test installs RabbitMQ)");
        let mut rabbit = PrivateRabbitMq {
            node,
            port,
            dir,
            server: Some(server),
        };
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let exited = rabbit
                .server
                .as_mut()
                .and_then(|server| server.try_wait().ok().flatten());
            if let Some(status) = exited {
                let out =
                    std::fs::read_to_string(rabbit.dir.join("server.out")).unwrap_or_default();
                panic!(
                    "the private RabbitMQ node {} exited ({status}):\n{out}",
                    rabbit.node
                );
            }
            let up = rabbitmqctl_within(
                &["-n", &rabbit.node, "await_startup", "--timeout", "10"],
                Duration::from_secs(20),
            )
            .is_ok();
            if up {
                return rabbit;
            }
            if Instant::now() >= deadline {
                let out =
                    std::fs::read_to_string(rabbit.dir.join("server.out")).unwrap_or_default();
                rabbit.kill();
                panic!(
                    "the private RabbitMQ node {} was not up within 90 s:\n{out}",
                    rabbit.node
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// `amqp://guest:guest@127.0.0.1:<port>/%2f`.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// Its AMQP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its node name, for `rabbitmqctl -n`.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Kill the node with SIGKILL (its Erlang VM, which the node reports), as a node dies.
    /// Once killed, nothing more is done.
    pub fn kill(&mut self) {
        let Some(mut server) = self.server.take() else {
            return;
        };
        let pid = run_within(
            "rabbitmqctl",
            &["-n", &self.node, "eval", "os:getpid()."],
            Duration::from_secs(20),
        )
        .ok()
        .map(|out| out.trim().trim_matches('"').to_owned())
        .or_else(|| std::fs::read_to_string(self.dir.join("node.pid")).ok());
        if let Some(pid) = pid {
            let _ = Command::new("kill")
                .args(["-9", pid.trim()])
                .stderr(Stdio::null())
                .status();
        }
        let _ = server.kill();
        let _ = server.wait();
    }
}

impl PrivateRabbitMq {
    /// Start `nodes` private nodes and join every one after the first to the first's
    /// cluster (`stop_app`, `join_cluster`, `start_app`).
    ///
    /// # Panics
    /// As [`PrivateRabbitMq::start`], or when a node cannot join.
    pub fn cluster(nodes: usize) -> Vec<PrivateRabbitMq> {
        let cluster: Vec<PrivateRabbitMq> = (0..nodes).map(|_| PrivateRabbitMq::start()).collect();
        for node in &cluster[1..] {
            rabbitmqctl(&["-n", node.node(), "stop_app"]);
            rabbitmqctl(&["-n", node.node(), "join_cluster", cluster[0].node()]);
            rabbitmqctl(&["-n", node.node(), "start_app"]);
        }
        cluster
    }

    /// Stop the RabbitMQ application on this node, leaving its VM running (a graceful stop).
    ///
    /// # Panics
    /// When `rabbitmqctl` fails.
    pub fn stop_app(&self) {
        rabbitmqctl(&["-n", self.node(), "stop_app"]);
    }

    /// Start the application again after [`PrivateRabbitMq::stop_app`].
    ///
    /// # Panics
    /// When `rabbitmqctl` fails.
    pub fn start_app(&self) {
        rabbitmqctl(&["-n", self.node(), "start_app"]);
    }

    /// `host:port` of its AMQP listener, as `RABBITMQ_CLUSTER_NODES` takes it.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for PrivateRabbitMq {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A `redis-server` of the test's own on a free port, with the append-only file on and
/// fsynced before every reply (`appendfsync always`): what it acknowledged survives
/// [`PrivateRedis::crash`]. Killed, and its files removed, when dropped.
#[derive(Debug)]
pub struct PrivateRedis {
    port: u16,
    dir: PathBuf,
    /// The settings after the defaults (later ones win), kept for restarts.
    extra: Vec<String>,
    server: Option<Child>,
}

impl PrivateRedis {
    /// Start one and wait until it answers.
    ///
    /// # Panics
    /// When `redis-server` cannot be started or does not answer within 30 s.
    pub fn start() -> PrivateRedis {
        PrivateRedis::start_with(&[])
    }

    /// Start one with `extra` settings after the defaults (they win: `--appendonly no`, or
    /// `--port 0 --tls-port N …` for a TLS-only server, which is ready once `N` listens).
    ///
    /// # Panics
    /// When `redis-server` cannot be started or does not answer within 30 s.
    pub fn start_with(extra: &[&str]) -> PrivateRedis {
        let dir = std::env::temp_dir().join(format!(
            "helix-private-redis-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).expect("a folder for the private Redis");
        let mut redis = PrivateRedis {
            port: free_port(),
            dir,
            extra: extra.iter().map(|s| (*s).to_owned()).collect(),
            server: None,
        };
        redis.restart();
        redis
    }

    /// Its plain port (unused when `extra` set `--port 0`).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Freeze it (SIGSTOP): it holds its connections and answers nothing, as a server
    /// stalled by its machine does, until [`PrivateRedis::resume`]. A replica frozen so
    /// falls behind its primary.
    ///
    /// # Panics
    /// When it is not running or `kill` fails.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Let it run again after [`PrivateRedis::pause`].
    ///
    /// # Panics
    /// As [`PrivateRedis::pause`].
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let pid = self.server.as_ref().expect("a running server").id();
        let sent = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .expect("kill on PATH");
        assert!(sent.success(), "kill {signal} {pid} failed");
    }

    /// Kill it with SIGKILL (a crash: nothing is flushed beyond what was fsynced).
    pub fn crash(&mut self) {
        if let Some(mut server) = self.server.take() {
            let _ = server.kill();
            let _ = server.wait();
        }
    }

    /// Start it again on the same port and folder with the same settings (it reloads its
    /// append-only file) and wait until it answers; a running server is crashed first.
    ///
    /// # Panics
    /// When it cannot be started or does not answer within 30 s.
    pub fn restart(&mut self) {
        self.crash();
        let server = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--dir",
                self.dir.to_str().expect("a UTF-8 temp path"),
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server on PATH (scripts/test installs Redis)");
        self.server = Some(server);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.answers() {
            assert!(
                Instant::now() < deadline,
                "the private Redis on port {} did not answer within 30 s",
                self.port
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether it answers PING with PONG (not while it is still loading its file); a
    /// TLS-only server, whether its TLS port listens.
    fn answers(&self) -> bool {
        let tls_port = self
            .extra
            .iter()
            .position(|a| a == "--tls-port")
            .and_then(|i| self.extra.get(i + 1));
        if let Some(port) = tls_port {
            let port: u16 = port.parse().expect("a --tls-port number");
            return TcpStream::connect(("127.0.0.1", port)).is_ok();
        }
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
        let mut reply = [0u8; 16];
        stream.write_all(b"PING\r\n").is_ok()
            && stream
                .read(&mut reply)
                .is_ok_and(|n| reply[..n].starts_with(b"+PONG"))
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.crash();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Redis primary, one replica and three sentinels (Debian's `redis-sentinel`), each
/// on free ports of its own, the sentinels watching the primary as `helix` with a quorum of
/// two and a one-second down-after: what `REDIS_SENTINELS` and `REDIS_SENTINEL_MASTER` are
/// for. Both data servers keep an fsynced append-only file. Everything is killed and
/// removed when dropped.
#[derive(Debug)]
pub struct PrivateRedisSentinels {
    /// The servers, the first one primary when started. Which one is primary after a
    /// failover: [`PrivateRedisSentinels::primary_port`].
    pub servers: Vec<PrivateRedis>,
    sentinel_ports: Vec<u16>,
    sentinels: Vec<Child>,
    dir: PathBuf,
}

impl PrivateRedisSentinels {
    /// The name the sentinels know the primary by.
    pub const MASTER: &'static str = "helix";

    /// Start the primary, its replica and three sentinels, and wait until the replica is in
    /// sync and every sentinel sees the replica and the two other sentinels.
    ///
    /// # Panics
    /// When a process cannot be started or the group is not formed within 60 s.
    pub fn start() -> PrivateRedisSentinels {
        let primary = PrivateRedis::start();
        let primary_port = primary.port().to_string();
        let replica = PrivateRedis::start_with(&["--replicaof", "127.0.0.1", &primary_port]);
        let dir = std::env::temp_dir().join(format!(
            "helix-private-sentinels-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).expect("a folder for the sentinels");
        let mut group = PrivateRedisSentinels {
            servers: vec![primary, replica],
            sentinel_ports: Vec::new(),
            sentinels: Vec::new(),
            dir,
        };
        for i in 0..3 {
            let port = free_port();
            // A sentinel rewrites its configuration file as it learns: one each.
            let conf = group.dir.join(format!("sentinel-{i}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\ndir {dir}\n\
                     sentinel monitor {master} 127.0.0.1 {primary_port} 2\n\
                     sentinel down-after-milliseconds {master} 1000\n\
                     sentinel failover-timeout {master} 5000\n\
                     sentinel parallel-syncs {master} 1\n",
                    dir = group.dir.display(),
                    master = Self::MASTER,
                ),
            )
            .expect("a sentinel's configuration");
            let sentinel = Command::new("redis-sentinel")
                .arg(&conf)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-sentinel on PATH (scripts/test installs it)");
            group.sentinels.push(sentinel);
            group.sentinel_ports.push(port);
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let replica_in_sync = redis_cli(group.servers[1].port(), &["INFO", "replication"])
                .contains("master_link_status:up");
            let sentinels_formed = group.sentinel_ports.iter().all(|port| {
                let master = redis_cli(*port, &["SENTINEL", "MASTER", Self::MASTER]);
                let field = |name: &str| {
                    let mut lines = master.lines();
                    lines.find(|l| l.trim() == name)?;
                    lines.next().map(|v| v.trim().to_owned())
                };
                field("num-slaves").as_deref() == Some("1")
                    && field("num-other-sentinels").as_deref() == Some("2")
            });
            if replica_in_sync && sentinels_formed {
                return group;
            }
            assert!(
                Instant::now() < deadline,
                "the sentinel group did not form within 60 s"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The sentinels as `REDIS_SENTINELS` takes them: `127.0.0.1:<port>,…`.
    pub fn sentinels(&self) -> String {
        self.sentinel_ports
            .iter()
            .map(|port| format!("127.0.0.1:{port}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The sentinels' ports.
    pub fn sentinel_ports(&self) -> &[u16] {
        &self.sentinel_ports
    }

    /// The port of the server the first sentinel names primary now.
    ///
    /// # Panics
    /// When the sentinel does not answer with an address.
    pub fn primary_port(&self) -> u16 {
        let reply = redis_cli(
            self.sentinel_ports[0],
            &["SENTINEL", "get-master-addr-by-name", Self::MASTER],
        );
        reply
            .lines()
            .nth(1)
            .and_then(|port| port.trim().parse().ok())
            .unwrap_or_else(|| panic!("no primary address from the sentinel: {reply:?}"))
    }

    /// The server that is primary now.
    ///
    /// # Panics
    /// As [`PrivateRedisSentinels::primary_port`], or when it is none of the servers.
    pub fn primary(&mut self) -> &mut PrivateRedis {
        let port = self.primary_port();
        self.servers
            .iter_mut()
            .find(|server| server.port() == port)
            .unwrap_or_else(|| panic!("the primary on port {port} is none of the servers"))
    }
}

impl Drop for PrivateRedisSentinels {
    fn drop(&mut self) {
        for sentinel in &mut self.sentinels {
            let _ = sentinel.kill();
            let _ = sentinel.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Redis Cluster of the test's own: three primaries (no replicas) on free ports, each
/// with its own folder and fsynced append-only file, the slots spread over them with
/// `redis-cli --cluster create`. Everything is killed and removed when dropped.
#[derive(Debug)]
pub struct PrivateRedisCluster {
    /// The nodes.
    pub nodes: Vec<PrivateRedis>,
}

impl PrivateRedisCluster {
    /// Start three nodes, create the cluster, and wait until every node reports it ok.
    ///
    /// # Panics
    /// When a node cannot be started, `redis-cli --cluster create` fails, or the cluster is
    /// not ok within 60 s.
    pub fn start() -> PrivateRedisCluster {
        let nodes: Vec<PrivateRedis> = (0..3)
            .map(|_| {
                // The bus port is chosen too: by default it is the port plus 10,000, which
                // for a port above 55535 Redis refuses (and may be taken).
                let bus = free_port().to_string();
                PrivateRedis::start_with(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "2000",
                    "--cluster-port",
                    &bus,
                ])
            })
            .collect();
        let addresses: Vec<String> = nodes
            .iter()
            .map(|node| format!("127.0.0.1:{}", node.port()))
            .collect();
        let created = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli on PATH (scripts/test installs it)");
        assert!(
            created.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&created.stdout),
            String::from_utf8_lossy(&created.stderr)
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        while !nodes
            .iter()
            .all(|node| redis_cli(node.port(), &["CLUSTER", "INFO"]).contains("cluster_state:ok"))
        {
            assert!(
                Instant::now() < deadline,
                "the cluster was not ok within 60 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        PrivateRedisCluster { nodes }
    }

    /// The nodes as `REDIS_CLUSTER_NODES` takes them: `127.0.0.1:<port>,…`.
    pub fn addresses(&self) -> String {
        self.nodes
            .iter()
            .map(|node| format!("127.0.0.1:{}", node.port()))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// `redis-cli -p <port> <args>`'s output, as it prints it (empty when it cannot be run or
/// reach the port: a check on the output then fails).
pub fn redis_cli(port: u16, args: &[&str]) -> String {
    Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
        .unwrap_or_default()
}

/// Publish a batch of `count` messages to `topic` while the broker takes none, and check
/// that every one fails with a retryable timeout within `limit`: a batch must not wait a
/// publish timeout per message, one after another. Returns the messages' ids, which the
/// broker may still store once it takes publishes again.
///
/// # Panics
/// When a message does not fail, fails otherwise, or the batch takes `limit` or longer.
pub async fn assert_batch_times_out(
    publisher: &dyn helix_messaging_core::Publisher,
    topic: &str,
    count: usize,
    limit: Duration,
) -> Vec<String> {
    let batch: Vec<helix_messaging_core::Message> = (0..count)
        .map(|i| helix_messaging_core::Message::new(format!("batch message {i}, refused")))
        .collect();
    let ids = batch.iter().map(|m| m.id().to_owned()).collect();
    let started = Instant::now();
    let report = publisher.publish_batch(topic, batch).await;
    let took = started.elapsed();
    assert_eq!(report.failures().len(), count, "{:?}", report.failures());
    for (_, err) in report.failures() {
        assert_retryable_timeout(err);
    }
    assert!(
        took < limit,
        "a batch of {count} took {took:?}: {:?}",
        report.failures()
    );
    ids
}

/// Check that `err` is a timeout the caller may retry: what a publish the broker does not
/// take within the publish timeout must be.
///
/// # Panics
/// When it is of another kind or not retryable.
pub fn assert_retryable_timeout(err: &helix_messaging_core::Error) {
    assert_eq!(
        err.kind(),
        helix_messaging_core::ErrorKind::Timeout,
        "{err}"
    );
    assert!(err.is_retryable(), "{err}");
}

pub use outage::{Outage, OutageSwitch, outage};

mod outage {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use async_trait::async_trait;
    use helix_messaging_core::stack::{Guarded, PublishGuard};
    use helix_messaging_core::{Broker, Error, ErrorKind, Result};

    /// A broker that is away while its [`OutageSwitch`] says so: publishing and creating
    /// groups fail with a retryable [`ErrorKind::Connection`] error, as they do against a
    /// broker that cannot be reached; subscriptions and everything else pass to the real
    /// broker. For tests of what the layers above do during an outage without stopping a
    /// shared server.
    pub type Outage = Guarded<OutageSwitch>;

    /// Whether an [`Outage`]'s broker is away.
    #[derive(Debug)]
    pub struct OutageSwitch(AtomicBool);

    impl OutageSwitch {
        /// Take the broker away (`true`) or bring it back.
        pub fn set_down(&self, down: bool) {
            self.0.store(down, Ordering::SeqCst);
        }

        fn check(&self) -> Result<()> {
            if self.0.load(Ordering::SeqCst) {
                Err(Error::new(ErrorKind::Connection, "broker is away"))
            } else {
                Ok(())
            }
        }
    }

    /// `inner`, away (`down`) or reachable, until [`OutageSwitch::set_down`] says otherwise
    /// (reach it with [`Guarded::guard`]).
    pub fn outage(inner: Arc<dyn Broker>, down: bool) -> Outage {
        Guarded::new(inner, OutageSwitch(AtomicBool::new(down)))
    }

    #[async_trait]
    impl PublishGuard for OutageSwitch {
        async fn before_publish(&self, _inner: &dyn Broker, _topic: &str) -> Result<()> {
            self.check()
        }

        async fn before_create_group(&self, _inner: &dyn Broker, _topic: &str) -> Result<()> {
            self.check()
        }
    }
}

#[cfg(feature = "kafka")]
pub use kafka_cluster::PrivateKafkaCluster;

#[cfg(feature = "kafka")]
mod kafka_cluster {
    use std::collections::BTreeSet;
    use std::fs::File;
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    use rdkafka::ClientConfig;
    use rdkafka::consumer::{BaseConsumer, Consumer};

    use super::{file_tail, free_port, port_open};

    /// The release whose jars `ensure_kafka` in `scripts/services.sh` caches (its
    /// `KAFKA_VERSION`): the brokers the test suite runs on.
    const KAFKA_VERSION: &str = "4.1.1";
    /// How long a whole cluster may take to serve: three brokers took 10 to 14 s, formatting
    /// included, on a machine of two cores that also ran the test broker.
    const START_LIMIT: Duration = Duration::from_secs(120);
    /// How long one restarted broker may take to serve again (it recovers its logs, which
    /// a SIGKILL left unclean, and catches up on the metadata).
    const RESTART_LIMIT: Duration = Duration::from_secs(90);
    /// Lines of a broker's output shown when it fails.
    const LOG_TAIL_LINES: usize = 40;

    /// One broker of a [`PrivateKafkaCluster`].
    #[derive(Debug)]
    struct Node {
        id: i32,
        port: u16,
        controller_port: u16,
        dir: PathBuf,
        jvm: Option<Child>,
    }

    impl Node {
        fn address(&self) -> String {
            format!("127.0.0.1:{}", self.port)
        }

        fn properties(&self) -> PathBuf {
            self.dir.join("server.properties")
        }

        fn output(&self) -> PathBuf {
            self.dir.join("server.out")
        }

        /// The end of its output (every run of it: a restart appends).
        fn log_tail(&self) -> String {
            file_tail(&self.output(), LOG_TAIL_LINES)
        }

        fn kill(&mut self) {
            if let Some(mut jvm) = self.jvm.take() {
                // `Child::kill` is SIGKILL: the broker flushes nothing, as when a machine dies.
                let _ = jvm.kill();
                let _ = jvm.wait();
            }
        }
    }

    /// Apache Kafka brokers of a test's own, in KRaft combined mode (every node is a broker
    /// and one of the controller quorum's voters), from the jars `scripts/services.sh`
    /// caches, beside the machine's broker (which they do not join). Each node has its own
    /// client and controller ports, data folder and a small heap (`-Xms256m -Xmx512m`);
    /// internal topics are replicated on up to three of them, as in production.
    ///
    /// Brokers are named by their ids, 1 to n. [`PrivateKafkaCluster::kill`] kills one with
    /// SIGKILL, as a machine dies; [`PrivateKafkaCluster::restart`] starts it again on its
    /// ports and data. Dropping the cluster kills every JVM and removes the folders, also
    /// when the test panics.
    ///
    /// Its methods block (starting, waiting for the metadata): from an async test, call them
    /// in `tokio::task::block_in_place` so the runtime's other tasks go on meanwhile.
    #[derive(Debug)]
    pub struct PrivateKafkaCluster {
        dir: PathBuf,
        libs: PathBuf,
        nodes: Vec<Node>,
    }

    impl PrivateKafkaCluster {
        /// Start `brokers` nodes with the base settings and wait until they serve.
        ///
        /// # Panics
        /// As [`PrivateKafkaCluster::start_with`].
        pub fn start(brokers: usize) -> PrivateKafkaCluster {
            PrivateKafkaCluster::start_with(brokers, &[])
        }

        /// Start `brokers` nodes and wait until every one serves: its client port open and
        /// the cluster's metadata listing all of them (registered with the controller and
        /// unfenced). Their settings are `scripts/kafka/server.properties` (the test broker's),
        /// then each node's own (id, the quorum's voters, listeners, data folder, replication
        /// of the internal topics), then `settings`: a later key wins.
        ///
        /// # Panics
        /// When the jars are not cached (`scripts/test` caches them), storage cannot be
        /// formatted, a broker exits, or the cluster does not serve within 120 s; the end of
        /// each broker's output is in the message.
        pub fn start_with(brokers: usize, settings: &[(&str, &str)]) -> PrivateKafkaCluster {
            assert!(brokers >= 1, "a cluster needs a broker");
            let libs = kafka_libs();
            assert!(
                libs.join(".complete").exists(),
                "Apache Kafka {KAFKA_VERSION}'s jars are not in {}: run scripts/test, or \
                 `source scripts/services.sh && ensure_kafka`, to fetch them",
                libs.display()
            );
            let dir = std::env::temp_dir().join(format!(
                "helix-private-kafka-{}",
                uuid::Uuid::new_v4().simple()
            ));
            let ports = distinct_free_ports(2 * brokers);
            let nodes: Vec<Node> = (0..brokers)
                .map(|i| Node {
                    id: i32::try_from(i + 1).expect("a few brokers"),
                    port: ports[2 * i],
                    controller_port: ports[2 * i + 1],
                    dir: dir.join(format!("broker-{}", i + 1)),
                    jvm: None,
                })
                .collect();
            // Built before anything starts, so a panic from here on drops it: JVMs killed,
            // folders removed.
            let mut cluster = PrivateKafkaCluster { dir, libs, nodes };
            cluster.write_properties(settings);
            cluster.format_storage();
            for i in 0..cluster.nodes.len() {
                cluster.launch(i);
            }
            cluster.wait_until_serving(START_LIMIT);
            cluster
        }

        /// Every broker's client listener, comma-separated, as `bootstrap.servers` takes it.
        pub fn bootstrap_servers(&self) -> String {
            let addresses: Vec<String> = self.nodes.iter().map(Node::address).collect();
            addresses.join(",")
        }

        /// The brokers' ids, 1 to n.
        pub fn broker_ids(&self) -> Vec<i32> {
            self.nodes.iter().map(|node| node.id).collect()
        }

        /// Kill broker `id`'s JVM with SIGKILL and wait until it is gone. Nothing is done
        /// when it is not running.
        ///
        /// # Panics
        /// When the cluster has no broker `id`.
        pub fn kill(&mut self, id: i32) {
            let i = self.index(id);
            self.nodes[i].kill();
        }

        /// Start broker `id` again on its ports and data folder (a running one is killed
        /// first) and wait until the cluster's metadata lists it, and every other running
        /// broker, again.
        ///
        /// # Panics
        /// When the cluster has no broker `id`, a broker exits, or the cluster does not
        /// serve with it within 90 s.
        pub fn restart(&mut self, id: i32) {
            let i = self.index(id);
            self.nodes[i].kill();
            self.launch(i);
            self.wait_until_serving(RESTART_LIMIT);
        }

        /// The broker leading `partition` of `topic` in the running brokers' metadata, `None`
        /// while it has none (an election under way).
        ///
        /// # Panics
        /// When no running broker answers within 10 s, or the metadata lists no such
        /// partition.
        pub fn partition_leader(&self, topic: &str, partition: i32) -> Option<i32> {
            let metadata = self
                .metadata_client()
                .fetch_metadata(Some(topic), Duration::from_secs(10))
                .unwrap_or_else(|e| panic!("the metadata of {topic}: {e}"));
            let leader = metadata
                .topics()
                .iter()
                .find(|t| t.name() == topic)
                .and_then(|t| t.partitions().iter().find(|p| p.id() == partition))
                .unwrap_or_else(|| panic!("{topic} has no partition {partition}"))
                .leader();
            (leader >= 0).then_some(leader)
        }

        fn index(&self, id: i32) -> usize {
            self.nodes
                .iter()
                .position(|node| node.id == id)
                .unwrap_or_else(|| panic!("the cluster has no broker {id}"))
        }

        /// Each node's `server.properties`: the test broker's, then the node's own settings
        /// (Kafka reads the file with `java.util.Properties`, where a repeated key's last
        /// value wins), then `settings`.
        fn write_properties(&self, settings: &[(&str, &str)]) {
            let base = std::fs::read_to_string(scripts_kafka().join("server.properties"))
                .expect("scripts/kafka/server.properties");
            let voters: Vec<String> = self
                .nodes
                .iter()
                .map(|node| format!("{}@127.0.0.1:{}", node.id, node.controller_port))
                .collect();
            let replicas = self.nodes.len().min(3);
            let min_in_sync = replicas.min(2);
            for node in &self.nodes {
                std::fs::create_dir_all(&node.dir).expect("a folder for a private broker");
                let data = node.dir.join("data");
                let mut text = base.clone();
                text += &format!(
                    "\n# A node of a private cluster of {nodes} (helix-messaging-testkit).\n\
                     node.id={id}\n\
                     controller.quorum.voters={voters}\n\
                     listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller}\n\
                     advertised.listeners=PLAINTEXT://127.0.0.1:{port}\n\
                     log.dirs={data}\n\
                     default.replication.factor={replicas}\n\
                     offsets.topic.replication.factor={replicas}\n\
                     transaction.state.log.replication.factor={replicas}\n\
                     transaction.state.log.min.isr={min_in_sync}\n\
                     share.coordinator.state.topic.replication.factor={replicas}\n\
                     share.coordinator.state.topic.min.isr={min_in_sync}\n",
                    nodes = self.nodes.len(),
                    id = node.id,
                    voters = voters.join(","),
                    port = node.port,
                    controller = node.controller_port,
                    data = data.display(),
                );
                for (key, value) in settings {
                    text += &format!("{key}={value}\n");
                }
                std::fs::write(node.properties(), text).expect("a private broker's settings");
            }
        }

        /// Format every node's storage for one new cluster id (the three `StorageTool`s run
        /// at once: each is a JVM start).
        fn format_storage(&self) {
            let cluster_id = new_cluster_id();
            let formats: Vec<(&Node, Child)> = self
                .nodes
                .iter()
                .map(|node| {
                    let log = File::create(node.dir.join("format.out")).expect("a format log");
                    let child = self
                        .java()
                        .args(["kafka.tools.StorageTool", "format", "-t", &cluster_id, "-c"])
                        .arg(node.properties())
                        .stdout(log.try_clone().expect("a format log"))
                        .stderr(log)
                        .spawn()
                        .expect("java on PATH (scripts/test installs it)");
                    (node, child)
                })
                .collect();
            for (node, mut child) in formats {
                let status = child.wait().expect("StorageTool ran");
                assert!(
                    status.success(),
                    "formatting broker {}'s storage failed ({status}):\n{}",
                    node.id,
                    std::fs::read_to_string(node.dir.join("format.out")).unwrap_or_default()
                );
            }
        }

        /// `java` with the release's jars and the test broker's logging (INFO to stdout).
        fn java(&self) -> Command {
            let mut java = Command::new("java");
            java.arg("-cp")
                .arg(format!("{}/*", self.libs.display()))
                .arg(format!(
                    "-Dlog4j2.configurationFile={}",
                    scripts_kafka().join("log4j2.yaml").display()
                ))
                .stdin(Stdio::null());
            java
        }

        /// Start node `i`'s JVM, its output appended to its `server.out`.
        fn launch(&mut self, i: usize) {
            let node = &self.nodes[i];
            let out = File::options()
                .create(true)
                .append(true)
                .open(node.output())
                .expect("a private broker's output file");
            let jvm = self
                .java()
                .args(["-Xms256m", "-Xmx512m", "-XX:+UseG1GC", "kafka.Kafka"])
                .arg(node.properties())
                .stdout(out.try_clone().expect("a private broker's output file"))
                .stderr(out)
                .spawn()
                .expect("java on PATH (scripts/test installs it)");
            self.nodes[i].jvm = Some(jvm);
        }

        /// Wait until every running broker's port is open and the metadata lists exactly the
        /// running brokers.
        fn wait_until_serving(&mut self, limit: Duration) {
            let deadline = Instant::now() + limit;
            loop {
                self.assert_running_brokers_alive();
                let running: BTreeSet<i32> = self
                    .nodes
                    .iter()
                    .filter(|node| node.jvm.is_some())
                    .map(|node| node.id)
                    .collect();
                let ports_open = self
                    .nodes
                    .iter()
                    .filter(|node| node.jvm.is_some())
                    .all(|node| port_open(node.port));
                let not_yet = if ports_open {
                    match self
                        .metadata_client()
                        .fetch_metadata(None, Duration::from_secs(2))
                    {
                        Ok(metadata) => {
                            let listed: BTreeSet<i32> =
                                metadata.brokers().iter().map(|b| b.id()).collect();
                            if listed == running {
                                return;
                            }
                            format!("the metadata lists brokers {listed:?}")
                        }
                        Err(e) => format!("metadata: {e}"),
                    }
                } else {
                    "a client port is not open yet".to_owned()
                };
                if Instant::now() >= deadline {
                    panic!(
                        "the private Kafka cluster did not serve brokers {running:?} within \
                         {limit:?} ({not_yet}); {}",
                        self.log_tails()
                    );
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }

        /// Panic, with its output, when a broker that should be running has exited.
        fn assert_running_brokers_alive(&mut self) {
            let exited = self.nodes.iter_mut().find_map(|node| {
                let status = node.jvm.as_mut()?.try_wait().ok().flatten()?;
                node.jvm = None;
                Some((node.id, status))
            });
            if let Some((id, status)) = exited {
                panic!(
                    "private Kafka broker {id} exited ({status}); {}",
                    self.log_tails()
                );
            }
        }

        fn log_tails(&self) -> String {
            self.nodes
                .iter()
                .map(|node| {
                    format!(
                        "the end of broker {}'s output ({}):\n{}",
                        node.id,
                        node.output().display(),
                        node.log_tail()
                    )
                })
                .collect::<Vec<_>>()
                .join("\n")
        }

        /// A client bootstrapped from the running brokers (a dead one in the list costs a
        /// failed connection on every metadata request).
        fn metadata_client(&self) -> BaseConsumer {
            let running: Vec<String> = self
                .nodes
                .iter()
                .filter(|node| node.jvm.is_some())
                .map(Node::address)
                .collect();
            ClientConfig::new()
                .set("bootstrap.servers", running.join(","))
                .create()
                .expect("an rdkafka client for the metadata")
        }
    }

    impl Drop for PrivateKafkaCluster {
        fn drop(&mut self) {
            for node in &mut self.nodes {
                node.kill();
            }
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// Where `ensure_kafka` in `scripts/services.sh` leaves the release's jars:
    /// `${XDG_CACHE_HOME:-$HOME/.cache}/helix-messaging/kafka-<version>/libs`.
    fn kafka_libs() -> PathBuf {
        let cache = std::env::var_os("XDG_CACHE_HOME")
            .filter(|dir| !dir.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache")
            });
        cache
            .join("helix-messaging")
            .join(format!("kafka-{KAFKA_VERSION}"))
            .join("libs")
    }

    /// `scripts/kafka` of this workspace: the test broker's settings and logging.
    fn scripts_kafka() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/kafka")
    }

    /// `count` ports, free when asked and all different (two asks may get the same port).
    fn distinct_free_ports(count: usize) -> Vec<u16> {
        let mut ports: Vec<u16> = Vec::with_capacity(count);
        while ports.len() < count {
            let port = free_port();
            if !ports.contains(&port) {
                ports.push(port);
            }
        }
        ports
    }

    /// A cluster id as Kafka writes one (`kafka-storage random-uuid`): 16 random bytes in
    /// URL-safe base64 without padding. One starting with `-` is drawn again, as Kafka does,
    /// since the command line would take it for an option.
    fn new_cluster_id() -> String {
        loop {
            let id = base64_url(uuid::Uuid::new_v4().as_bytes());
            if !id.starts_with('-') {
                return id;
            }
        }
    }

    fn base64_url(bytes: &[u8]) -> String {
        const ALPHABET: &[u8; 64] =
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut text = String::with_capacity(bytes.len().div_ceil(3) * 4);
        for chunk in bytes.chunks(3) {
            let word = chunk
                .iter()
                .enumerate()
                .fold(0u32, |word, (i, b)| word | (u32::from(*b) << (16 - 8 * i)));
            // A chunk of n bytes carries n + 1 characters; the rest would be padding.
            for i in 0..=chunk.len() {
                text.push(char::from(ALPHABET[((word >> (18 - 6 * i)) & 63) as usize]));
            }
        }
        text
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn cluster_ids_are_url_safe_base64_of_sixteen_bytes() {
            // RFC 4648's test vectors, in the URL-safe alphabet without padding.
            assert_eq!(base64_url(b"f"), "Zg");
            assert_eq!(base64_url(b"fo"), "Zm8");
            assert_eq!(base64_url(b"foo"), "Zm9v");
            assert_eq!(base64_url(b"foobar"), "Zm9vYmFy");
            assert_eq!(base64_url(&[0xfb, 0xff]), "-_8");
            let id = new_cluster_id();
            assert_eq!(id.len(), 22, "{id}");
            assert!(!id.starts_with('-'), "{id}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CI failure of 2026-12-07: the drill's `start_app` never returned and the node stayed
    /// down for the rest of the suite. Debian's `rabbitmqctl` runs the CLI under `su -c`, in a
    /// session of its own, so a signal to `rabbitmqctl` (or its process group) leaves the
    /// CLI's Erlang VM running, holding any pipe it was given.
    #[test]
    fn a_rabbitmqctl_past_its_limit_is_given_up_on_with_everything_it_started() {
        let started = Instant::now();
        // The node sleeps; the CLI waits for its answer for 20 s. The number marks the CLI's
        // command line, to look for it afterwards.
        let marker = u32::from_le_bytes(uuid::Uuid::new_v4().as_bytes()[..4].try_into().unwrap());
        let expression = format!("timer:sleep(20000), {marker}.");
        let outcome = rabbitmqctl_within(&["eval", &expression], Duration::from_secs(2));
        let took = started.elapsed();
        let err = outcome.expect_err("the eval outlasts its limit");
        assert!(err.contains("did not finish within"), "{err}");
        assert!(
            took < Duration::from_secs(15),
            "given up on after {took:?}, not at its 2 s limit"
        );
        let survivors = || -> Vec<String> {
            std::fs::read_dir("/proc")
                .unwrap()
                .flatten()
                .filter_map(|entry| std::fs::read(entry.path().join("cmdline")).ok())
                .map(|cmdline| String::from_utf8_lossy(&cmdline).replace('\0', " "))
                .filter(|cmdline| cmdline.contains(&expression))
                .collect()
        };
        // A killed process's command line goes when it has exited, not when `kill` returns.
        let gone_by = Instant::now() + Duration::from_secs(3);
        while !survivors().is_empty() && Instant::now() < gone_by {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(survivors().is_empty(), "still running: {:?}", survivors());
    }

    /// The way out when `start_app` hangs: the machine's node killed and started afresh.
    /// (In the `rabbitmq-node` test group: nothing else uses the node meanwhile.)
    ///
    /// Run by hand only (`--run-ignored`): in a CI run on 2026-12-07 the node started afresh
    /// after the whole suite stayed booting (recovering vhost `/`) past the 120 s limit, and
    /// every RabbitMQ test after it failed; a test that can take the shared node down for
    /// the rest of the suite costs more than it proves.
    #[test]
    #[ignore = "kills the machine's RabbitMQ node; run by hand"]
    fn the_machines_node_killed_and_restarted_serves_again() {
        restart_rabbitmq_node().unwrap();
        assert!(port_open(5672), "AMQP is served");
        let status = rabbitmqctl(&["status"]);
        assert!(status.contains("RabbitMQ version"), "{status}");
    }
}
