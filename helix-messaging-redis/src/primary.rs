//! Where the adapter's connections go: the configured server or, with sentinels
//! (`REDIS_SENTINELS`), the primary they name, followed through a failover.
//!
//! redis-rs' connection manager reconnects by itself, even while idle, to the address it
//! was made for: after a failover a dead server; restarted, a stale primary the sentinels
//! are about to demote (whose writes the resync then throws away); after a switchover a
//! replica, which takes a `PUBLISH` without a word. So every connection of the broker is a
//! [`Connection`]. Without sentinels it is a connection manager (or the cluster client),
//! and a command goes straight to it, past one branch. With sentinels it is a
//! plain multiplexed connection to the primary they named, checked with `ROLE` (trusted as
//! named when the user may not run `ROLE`), that never reconnects by itself: once a command
//! finds it gone, silent or on a server no longer primary (`READONLY`, `MASTERDOWN`,
//! `LOADING`), it is replaced (once, for all of its clones) by one to the server the
//! sentinels name at that moment. Pub/sub subscriptions ask the sentinels each time they
//! connect, without the `ROLE` check (a subscribed connection runs no other command).
//!
//! With `REDIS_CLUSTER_NODES` a connection is redis-rs' cluster connection instead, which
//! routes each command to the node owning its key's slot and follows the cluster's own
//! failovers and slot moves (`MOVED`, `ASK`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::FutureExt;
use helix_messaging_core::{Error, ErrorKind, Result};
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::{Cmd, Pipeline, RedisError, RedisFuture, Value};

use crate::config::RedisConfig;
use crate::error::{from_redis, lost_the_connection, not_primary};

/// The server connections go to, and how it is found.
pub(crate) struct Primary {
    config: RedisConfig,
    /// With `REDIS_CLUSTER_NODES`: the cluster's client (connections then go to the cluster,
    /// never to `current`).
    cluster: Option<redis::cluster::ClusterClient>,
    /// Bumped each time a connection to the primary is lost or finds it no longer primary:
    /// every [`Connection`] then connects again, to the server the sentinels name.
    generation: AtomicU64,
    /// The server last found: the configured one, or the sentinels' latest answer.
    current: parking_lot::RwLock<Target>,
}

/// One primary: the client that connects to it, and its address for errors and logs.
#[derive(Clone)]
struct Target {
    client: redis::Client,
    address: String,
}

impl Target {
    fn into_parts(self) -> (redis::Client, String) {
        (self.client, self.address)
    }
}

impl Primary {
    /// The configured server, or the primary the sentinels name now.
    ///
    /// # Errors
    /// A client that cannot be built ([`ErrorKind::Config`]); with sentinels, none that
    /// answered with a primary ([`ErrorKind::Connection`], retryable).
    pub(crate) async fn locate(config: &RedisConfig) -> Result<Primary> {
        let cluster = if config.cluster_nodes.is_empty() {
            None
        } else {
            Some(cluster_client(config)?)
        };
        let target = if cluster.is_some() {
            Target {
                client: config.client()?,
                address: config
                    .cluster_nodes
                    .iter()
                    .map(|(host, port)| format!("{host}:{port}"))
                    .collect::<Vec<_>>()
                    .join(","),
            }
        } else if config.sentinels.is_empty() {
            Target {
                client: config.client()?,
                address: config.address(),
            }
        } else {
            ask_sentinels(config).await?
        };
        Ok(Primary {
            config: config.clone(),
            cluster,
            generation: AtomicU64::new(0),
            current: parking_lot::RwLock::new(target),
        })
    }

    /// A client for the primary and its address: with sentinels, the one they name now
    /// (both from the same answer, whatever other connections asked meanwhile).
    ///
    /// # Errors
    /// With sentinels, none answered with a primary.
    pub(crate) async fn client(&self) -> Result<(redis::Client, String)> {
        if !self.follows_sentinels() {
            let current = self.current.read();
            return Ok((current.client.clone(), current.address.clone()));
        }
        let target = match ask_sentinels(&self.config).await {
            Ok(target) => target,
            Err(err) => {
                // With no sentinel answering, the last primary they named is the best
                // guess; the connection's ROLE check tells whether it still is one.
                tracing::warn!(error = %err, "no sentinel answered; trying the last primary they named");
                return Ok(self.current.read().clone().into_parts());
            }
        };
        {
            let mut current = self.current.write();
            if current.address != target.address {
                tracing::warn!(from = %current.address, to = %target.address, "the sentinels name another primary; moving there");
            }
            *current = target.clone();
        }
        Ok((target.client, target.address))
    }

    /// Whether connections follow the sentinels' choice of primary (else they stay with
    /// the configured server, or the cluster client follows the cluster).
    fn follows_sentinels(&self) -> bool {
        !self.config.sentinels.is_empty()
    }

    /// The address of the primary last found, without credentials.
    pub(crate) fn address(&self) -> String {
        self.current.read().address.clone()
    }

    /// After a command on a connection of `generation` met `failure`: with sentinels, when
    /// it says the connection is gone, silent, or the server no longer takes writes, every
    /// connection connects again, to the server they name then. Only the first failure of a
    /// generation moves them: those of connections already replaced, or of commands that
    /// were out together, do not start another round.
    fn after_failure(&self, generation: u64, failure: Failure) {
        if !self.follows_sentinels() || failure == Failure::Other {
            return;
        }
        let _ = self.generation.compare_exchange(
            generation,
            generation + 1,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }

    /// A connection to the primary whose commands may block on the server for up to
    /// `blocking` (a blocking read's timeout).
    ///
    /// # Errors
    /// The server cannot be reached, or (with sentinels) the one they name is not primary.
    pub(crate) async fn connect(self: &Arc<Self>, blocking: Duration) -> Result<Connection> {
        let generation = self.generation.load(Ordering::Acquire);
        let manager = self.manager(blocking).await?;
        Ok(Connection {
            slot: Arc::new(Slot {
                primary: self.clone(),
                blocking,
                current: parking_lot::RwLock::new((generation, manager.clone())),
                connecting: tokio::sync::Mutex::new(()),
            }),
            generation,
            manager,
        })
    }

    async fn manager(&self, blocking: Duration) -> Result<Link> {
        if let Some(cluster) = &self.cluster {
            let config = redis::cluster::ClusterConfig::new()
                .set_connection_timeout(self.config.connect_timeout)
                .set_response_timeout(self.config.response_timeout + blocking);
            return cluster
                .get_async_connection_with_config(config)
                .await
                .map(Link::Cluster)
                .map_err(|err| {
                    from_redis(err, format!("connecting to the cluster {}", self.address()))
                });
        }
        let (client, address) = self.client().await?;
        let doing = || format!("connecting to {address}");
        if !self.follows_sentinels() {
            return client
                .get_connection_manager_with_config(manager_config(&self.config, blocking))
                .await
                .map(Link::Single)
                .map_err(|err| from_redis(err, doing()));
        }
        // With sentinels, a plain multiplexed connection: a connection manager reconnects
        // by itself, even while idle, to the address it was made for; after a switchover
        // that is a replica, which takes a PUBLISH without a word (and keeps it from the
        // primary's subscribers). Lost, this connection fails its next command instead, and
        // is replaced by one to the server the sentinels name.
        let connection_config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.config.connect_timeout))
            .set_response_timeout(Some(self.config.response_timeout + blocking));
        let mut connection = client
            .get_multiplexed_async_connection_with_config(&connection_config)
            .await
            .map_err(|err| from_redis(err, doing()))?;
        // A sentinel's answer can lag behind a failover; the server knows its role.
        match redis::cmd("ROLE")
            .query_async::<Vec<Value>>(&mut connection)
            .await
        {
            Ok(role) if matches!(role.first(), Some(Value::BulkString(r)) if r == b"master") => {}
            Ok(_) => {
                return Err(Error::new(
                    ErrorKind::Connection,
                    format!(
                        "{}: the server the sentinels named is not a primary (yet)",
                        doing()
                    ),
                )
                .with_retryable(true));
            }
            // ROLE is an @admin command: a user without it trusts the sentinels.
            Err(err) if err.code() == Some("NOPERM") => {
                tracing::warn!(%address, "ROLE not permitted; trusting the sentinels' answer");
            }
            Err(err) => return Err(from_redis(err, doing())),
        }
        // A failure here is not one of a connection in use: the connections that asked for
        // this one try again on their next command, with no new generation.
        Ok(Link::Direct(connection))
    }
}

/// How a connection manager of this broker connects and reconnects; `blocking` is the
/// longest a command on it blocks on the server (a blocking read's timeout), added to the
/// response timeout. (With sentinels the broker uses no connection manager.)
fn manager_config(config: &RedisConfig, blocking: Duration) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(config.connect_timeout))
        .set_response_timeout(Some(config.response_timeout + blocking))
        .set_max_delay(config.max_reconnect_delay)
        .set_number_of_retries(6)
}

/// What a failed command says about the server it went to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// The connection is gone, or the server stayed silent past the response timeout.
    Lost,
    /// The server answered that it is not (or not yet) a primary that takes writes.
    NotPrimary,
    /// Anything else: the server is there and primary.
    Other,
}

impl Failure {
    fn of_error(err: &RedisError) -> Failure {
        if lost_the_connection(err) || err.is_timeout() {
            Failure::Lost
        } else if err.code().is_some_and(not_primary) {
            Failure::NotPrimary
        } else {
            Failure::Other
        }
    }

    /// A reply's: redis-rs hands a server's error back as a value (a `ServerError`, made an
    /// `Err` only where the caller converts it), in a pipeline's reply item by item.
    fn of_value(value: &Value) -> Failure {
        match value {
            Value::ServerError(err) if not_primary(err.code()) => Failure::NotPrimary,
            _ => Failure::Other,
        }
    }

    fn of_values(values: &[Value]) -> Failure {
        values
            .iter()
            .map(Failure::of_value)
            .find(|failure| *failure != Failure::Other)
            .unwrap_or(Failure::Other)
    }
}

/// Ask every sentinel at once which server is the primary; the first answer wins (a
/// sentinel that is down or slow costs nothing while another answers).
async fn ask_sentinels(config: &RedisConfig) -> Result<Target> {
    let master = config
        .sentinel_master
        .as_deref()
        .ok_or_else(|| Error::config("REDIS_SENTINEL_MASTER", "required with REDIS_SENTINELS"))?;
    let asks = config.sentinels.iter().map(|(host, port)| {
        Box::pin(async move {
            let asked = async {
                let sentinel = redis::Client::open((host.as_str(), *port))?;
                let mut connection = tokio::time::timeout(
                    config.connect_timeout,
                    sentinel.get_multiplexed_async_connection(),
                )
                .await
                .map_err(|_| {
                    RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut))
                })??;
                redis::cmd("SENTINEL")
                    .arg("get-master-addr-by-name")
                    .arg(master)
                    .query_async::<Option<(String, u16)>>(&mut connection)
                    .await
            };
            match asked.await {
                Ok(Some(primary)) => Ok(primary),
                Ok(None) => Err(format!("{host}:{port} knows no primary {master:?}")),
                Err(err) => Err(format!("{host}:{port}: {err}")),
            }
        })
    });
    let answer = futures::future::select_ok(asks).await;
    match answer {
        Ok(((host, port), _)) => {
            let info = config.info_at(&host, port);
            let client = config.client_for(&info)?;
            let address = if host.contains(':') {
                format!("[{host}]:{port}")
            } else {
                format!("{host}:{port}")
            };
            Ok(Target { client, address })
        }
        Err(last) => Err(Error::new(
            ErrorKind::Connection,
            format!("no sentinel named the primary {master:?} (the last to answer: {last})"),
        )
        .with_retryable(true)),
    }
}

/// A connection to the primary, cheap to clone (clones share one connection), that moves to
/// a new primary after a failover.
#[derive(Clone)]
pub(crate) struct Connection {
    slot: Arc<Slot>,
    /// The primary generation `manager` connects to.
    generation: u64,
    manager: Link,
}

/// A connection to one server, or to a cluster.
#[derive(Clone)]
enum Link {
    /// One server, reconnecting by itself (no sentinels).
    Single(ConnectionManager),
    /// The primary the sentinels named, never reconnecting by itself.
    Direct(redis::aio::MultiplexedConnection),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl ConnectionLike for Link {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Link::Single(manager) => manager.req_packed_command(cmd),
            Link::Direct(connection) => connection.req_packed_command(cmd),
            Link::Cluster(cluster) => cluster.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Link::Single(manager) => manager.req_packed_commands(pipeline, offset, count),
            Link::Direct(connection) => connection.req_packed_commands(pipeline, offset, count),
            Link::Cluster(cluster) => cluster.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Link::Single(manager) => manager.get_db(),
            Link::Direct(connection) => connection.get_db(),
            Link::Cluster(cluster) => cluster.get_db(),
        }
    }
}

/// The cluster's client: its nodes with the configured password and TLS mode
/// ([`RedisConfig::validate`] refuses certificate files with a cluster).
fn cluster_client(config: &RedisConfig) -> Result<redis::cluster::ClusterClient> {
    let nodes: Vec<redis::ConnectionInfo> = config
        .cluster_nodes
        .iter()
        .map(|(host, port)| config.info_at(host, *port))
        .collect();
    let builder = redis::cluster::ClusterClient::builder(nodes)
        .connection_timeout(config.connect_timeout)
        .response_timeout(config.response_timeout);
    builder.build().map_err(|e| {
        Error::config(
            "REDIS_CLUSTER_NODES",
            "cannot build a client for the cluster's nodes",
        )
        .with_source(e)
    })
}

/// What a connection's clones share: the manager for the newest primary, read without
/// waiting; connecting a new one is done by one clone at a time.
struct Slot {
    primary: Arc<Primary>,
    blocking: Duration,
    current: parking_lot::RwLock<(u64, Link)>,
    connecting: tokio::sync::Mutex<()>,
}

impl Connection {
    /// Move to the current primary if connections were told to since this clone last
    /// looked: the first clone to notice connects, the others take its connection.
    async fn follow(&mut self) -> std::result::Result<(), RedisError> {
        let newest = self.slot.primary.generation.load(Ordering::Acquire);
        if newest == self.generation {
            return Ok(());
        }
        if !self.take_current(newest) {
            let slot = self.slot.clone();
            let _connecting = slot.connecting.lock().await;
            if !self.take_current(newest) {
                let link = self
                    .slot
                    .primary
                    .manager(self.slot.blocking)
                    .await
                    .map_err(|e| {
                        // A connection-like error, so the callers' handling applies.
                        RedisError::from(std::io::Error::new(
                            std::io::ErrorKind::ConnectionRefused,
                            e.to_string(),
                        ))
                    })?;
                *self.slot.current.write() = (newest, link.clone());
                (self.generation, self.manager) = (newest, link);
            }
        }
        Ok(())
    }

    /// Take the shared connection if it is of generation `newest` (or later).
    fn take_current(&mut self, newest: u64) -> bool {
        let current = self.slot.current.read();
        if current.0 < newest {
            return false;
        }
        (self.generation, self.manager) = (current.0, current.1.clone());
        true
    }

    /// What the reply to a command on this connection says about the server.
    fn observe(&self, failure: Failure) {
        self.slot.primary.after_failure(self.generation, failure);
    }
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        if !self.slot.primary.follows_sentinels() {
            // Nothing to follow: the manager's own (boxed) future, with no second one.
            return self.manager.req_packed_command(cmd);
        }
        async move {
            self.follow().await?;
            let reply = self.manager.req_packed_command(cmd).await;
            self.observe(match &reply {
                Ok(value) => Failure::of_value(value),
                Err(err) => Failure::of_error(err),
            });
            reply
        }
        .boxed()
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        if !self.slot.primary.follows_sentinels() {
            return self.manager.req_packed_commands(pipeline, offset, count);
        }
        async move {
            self.follow().await?;
            let reply = self
                .manager
                .req_packed_commands(pipeline, offset, count)
                .await;
            self.observe(match &reply {
                Ok(values) => Failure::of_values(values),
                Err(err) => Failure::of_error(err),
            });
            reply
        }
        .boxed()
    }

    fn get_db(&self) -> i64 {
        self.manager.get_db()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::RedisMode;

    fn reply(resp: &[u8]) -> Value {
        redis::parse_redis_value(resp).expect("a RESP reply")
    }

    /// A server that is not primary says so in its reply's value, not in an `Err`: the
    /// replies that mean "go to the primary" are told from any other.
    #[test]
    fn replies_that_say_the_server_is_not_primary_are_recognised() {
        for code in ["READONLY", "MASTERDOWN", "LOADING"] {
            let value = reply(format!("-{code} not now\r\n").as_bytes());
            assert_eq!(Failure::of_value(&value), Failure::NotPrimary, "{code}");
            let pipeline = [reply(b"+OK\r\n"), value];
            assert_eq!(Failure::of_values(&pipeline), Failure::NotPrimary, "{code}");
        }
        for other in [
            &b"-ERR wrong\r\n"[..],
            b"-NOGROUP none\r\n",
            b"+OK\r\n",
            b":1\r\n",
        ] {
            assert_eq!(Failure::of_value(&reply(other)), Failure::Other);
        }
        let refused = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert_eq!(Failure::of_error(&refused), Failure::Lost);
        // As an error (where a caller converted the value), READONLY is a connection error
        // worth retrying: the next attempt goes to the primary.
        let readonly: RedisError =
            match reply(b"-READONLY You can't write against a read only replica.\r\n") {
                Value::ServerError(err) => err.into(),
                other => panic!("{other:?}"),
            };
        assert_eq!(Failure::of_error(&readonly), Failure::NotPrimary);
        let mapped = from_redis(readonly, "publishing");
        assert_eq!(mapped.kind(), ErrorKind::Connection);
        assert!(mapped.is_retryable());
    }

    /// A connection to the server at `url`, for tests of the parts that take one.
    pub(crate) async fn connect_to(url: &str) -> Connection {
        let config = RedisConfig::new(url, RedisMode::Streams).expect("a Redis URL");
        Arc::new(Primary::locate(&config).await.expect("a client"))
            .connect(Duration::ZERO)
            .await
            .expect("Redis")
    }
}
