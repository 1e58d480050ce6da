//! Where the adapter's connections go: the configured server or, with sentinels
//! (`REDIS_SENTINELS`), the primary they name, followed through a failover.
//!
//! redis-rs' connection manager reconnects to the address it was made for, which after a
//! failover is a dead server, or, restarted, a stale primary the sentinels are about to
//! demote (whose writes the resync then throws away). So every connection of the broker is
//! a [`Connection`]: a connection manager that, once a command finds the server gone or no
//! longer primary, is replaced (once, for all of its clones) by one to the server the
//! sentinels name at that moment, checked with `ROLE`. Without sentinels none of this
//! happens and a command costs one atomic load more than on the manager itself.
//!
//! With `REDIS_CLUSTER_NODES` a connection is redis-rs' cluster connection instead, which
//! routes each command to the node owning its key's slot and follows the cluster's own
//! failovers and slot moves (`MOVED`, `ASK`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::FutureExt;
use helix_messaging_core::{Error, ErrorKind, Result};
use redis::aio::{ConnectionLike, ConnectionManager};
use redis::{Cmd, Pipeline, RedisError, RedisFuture, Value};

use crate::config::RedisConfig;
use crate::error::from_redis;
use crate::shared::manager_config;

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

    /// A client for the primary: with sentinels, the one they name now.
    ///
    /// # Errors
    /// With sentinels, none answered with a primary.
    pub(crate) async fn client(&self) -> Result<redis::Client> {
        if !self.config.sentinels.is_empty() {
            let target = ask_sentinels(&self.config).await?;
            let mut current = self.current.write();
            if current.address != target.address {
                tracing::warn!(from = %current.address, to = %target.address, "the sentinels name another primary; moving there");
            }
            *current = target;
        }
        Ok(self.current.read().client.clone())
    }

    /// The address of the primary last found, without credentials.
    pub(crate) fn address(&self) -> String {
        self.current.read().address.clone()
    }

    /// After a command to the primary failed with `err`: with sentinels, when the error
    /// says the connection is gone or the server no longer takes writes, every connection
    /// connects again, to the server they name then.
    pub(crate) fn after_error(&self, err: &RedisError) {
        if !self.config.sentinels.is_empty()
            && (lost_the_connection(err) || no_longer_primary(err) || err.is_timeout())
        {
            self.generation.fetch_add(1, Ordering::AcqRel);
        }
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
                current: tokio::sync::Mutex::new((generation, manager.clone())),
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
        let client = self.client().await?;
        let address = self.address();
        let connected = async {
            let mut manager = client
                .get_connection_manager_with_config(manager_config(&self.config, blocking))
                .await?;
            if !self.config.sentinels.is_empty() {
                // A sentinel's answer can lag behind a failover; the server knows its role.
                let role: Vec<Value> = redis::cmd("ROLE").query_async(&mut manager).await?;
                if !matches!(role.first(), Some(Value::BulkString(r)) if r == b"master") {
                    return Err(RedisError::from((
                        redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly),
                        "the server the sentinels named is not a primary (yet)",
                    )));
                }
            }
            Ok(Link::Single(manager))
        };
        let r = connected.await;
        // Not an error of a connection in use: the connections that asked for this one
        // still want a new one and try again on their next command, with no new generation
        // (which would have every other connection, already moved, connect again too).
        r.map_err(|err| from_redis(err, format!("connecting to {address}")))
    }
}

/// Whether `err` says the connection to the server is gone.
fn lost_the_connection(err: &RedisError) -> bool {
    err.is_io_error() || err.is_connection_dropped() || err.is_connection_refusal()
}

/// Whether `err` says the server is no longer (or not yet) a primary that takes writes.
fn no_longer_primary(err: &RedisError) -> bool {
    matches!(err.code(), Some("READONLY" | "MASTERDOWN" | "LOADING"))
}

/// Ask each sentinel in turn which server is the primary; the first answer wins.
async fn ask_sentinels(config: &RedisConfig) -> Result<Target> {
    let master = config
        .sentinel_master
        .as_deref()
        .ok_or_else(|| Error::config("REDIS_SENTINEL_MASTER", "required with REDIS_SENTINELS"))?;
    let mut failures = Vec::new();
    for (host, port) in &config.sentinels {
        let asked = async {
            let sentinel = redis::Client::open((host.as_str(), *port))?;
            let mut connection = tokio::time::timeout(
                config.connect_timeout,
                sentinel.get_multiplexed_async_connection(),
            )
            .await
            .map_err(|_| RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut)))??;
            redis::cmd("SENTINEL")
                .arg("get-master-addr-by-name")
                .arg(master)
                .query_async::<Option<(String, u16)>>(&mut connection)
                .await
        };
        match asked.await {
            Ok(Some((host, port))) => {
                let info = config.info_at(&host, port);
                let client = config.client_for(&info)?;
                let address = format!("redis://{host}:{port}");
                return Ok(Target { client, address });
            }
            Ok(None) => failures.push(format!("{host}:{port} knows no primary {master:?}")),
            Err(err) => failures.push(format!("{host}:{port}: {err}")),
        }
    }
    Err(Error::new(
        ErrorKind::Connection,
        format!(
            "no sentinel named the primary {master:?}: {}",
            failures.join("; ")
        ),
    )
    .with_retryable(true))
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
    Single(ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl ConnectionLike for Link {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Link::Single(manager) => manager.req_packed_command(cmd),
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
            Link::Cluster(cluster) => cluster.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Link::Single(manager) => manager.get_db(),
            Link::Cluster(cluster) => cluster.get_db(),
        }
    }
}

/// The cluster's client: its nodes with the configured password and TLS settings.
fn cluster_client(config: &RedisConfig) -> Result<redis::cluster::ClusterClient> {
    let nodes: Vec<redis::ConnectionInfo> = config
        .cluster_nodes
        .iter()
        .map(|(host, port)| config.info_at(host, *port))
        .collect();
    let builder = redis::cluster::ClusterClient::builder(nodes)
        .connection_timeout(config.connect_timeout)
        .response_timeout(config.response_timeout);
    if config.tls_ca_cert.is_some() || config.tls_client.is_some() {
        // redis-rs takes certificates for a cluster only with its rustls backend; this
        // crate uses native-tls. `rediss://` with the system's trust store still works.
        return Err(Error::config(
            "REDIS_CLUSTER_NODES",
            "REDIS_TLS_CA_CERT and REDIS_TLS_CERT / REDIS_TLS_KEY are not supported with a Redis Cluster; use certificates the system trusts",
        ));
    }
    builder.build().map_err(|e| {
        Error::config(
            "REDIS_CLUSTER_NODES",
            "cannot build a client for the cluster's nodes",
        )
        .with_source(e)
    })
}

/// What a connection's clones share: the manager for the newest primary.
struct Slot {
    primary: Arc<Primary>,
    blocking: Duration,
    current: tokio::sync::Mutex<(u64, Link)>,
}

impl Connection {
    /// Move to the current primary if the sentinels named another since this clone last
    /// looked: the first clone to notice connects, the others take its manager.
    async fn follow(&mut self) -> std::result::Result<(), RedisError> {
        let newest = self.slot.primary.generation.load(Ordering::Acquire);
        if newest == self.generation {
            return Ok(());
        }
        let mut current = self.slot.current.lock().await;
        if current.0 != newest {
            let manager = self
                .slot
                .primary
                .manager(self.slot.blocking)
                .await
                .map_err(|e| {
                    // A connection-like error, so the caller's handling (and ours) applies.
                    RedisError::from(std::io::Error::new(
                        std::io::ErrorKind::ConnectionRefused,
                        e.to_string(),
                    ))
                })?;
            *current = (newest, manager);
        }
        (self.generation, self.manager) = (current.0, current.1.clone());
        Ok(())
    }
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        async move {
            self.follow().await?;
            let reply = self.manager.req_packed_command(cmd).await;
            if let Err(err) = &reply {
                self.slot.primary.after_error(err);
            }
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
        async move {
            self.follow().await?;
            let reply = self
                .manager
                .req_packed_commands(pipeline, offset, count)
                .await;
            if let Err(err) = &reply {
                self.slot.primary.after_error(err);
            }
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

    /// A connection to the server at `url`, for tests of the parts that take one.
    pub(crate) async fn connect_to(url: &str) -> Connection {
        let config = RedisConfig::new(url, RedisMode::Streams).expect("a Redis URL");
        Arc::new(Primary::locate(&config).await.expect("a client"))
            .connect(Duration::ZERO)
            .await
            .expect("Redis")
    }
}
