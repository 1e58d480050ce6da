//! Configuration: from code or from HelixAgent's environment variables. The password never
//! appears in `Debug`, `Display`, logs or errors.
//!
//! The two modes' names and what each promises stand here too, beside [`RedisMode`]: a
//! configuration's capabilities start from them, and every other module can name a mode
//! without reaching up to the crate root.

use helix_messaging_core::settings::{self, paired_files};
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use helix_messaging_core::{Capabilities, Error, Result};
use redis::{ConnectionAddr, ConnectionInfo, IntoConnectionInfo};

/// Which Redis feature carries the messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisMode {
    /// PUBLISH / SUBSCRIBE: at most once, no persistence, no consumer groups, no redelivery.
    PubSub,
    /// Streams (XADD / XREADGROUP / XACK): persistent, consumer groups, redelivery, replay.
    Streams,
}

/// Streams-mode tuning. Every field has a default ([`StreamsConfig::default`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamsConfig {
    /// Trim each stream to about this many entries, never below what a consumer group has
    /// not yet read or acked (see the `trim` module); `None` keeps everything. Default
    /// 1,000,000. This bounds what replay can read back.
    pub max_len: Option<usize>,
    /// Trim exactly instead of approximately (whole radix-tree nodes, cheaper on the
    /// server). Default false.
    pub exact_trim: bool,
    /// How often, at most, each stream is trimmed (after a publish to it). Default 1 s.
    pub trim_interval: Duration,
    /// How long one XREADGROUP waits for new entries. Also bounds how long a requeued
    /// message waits before a member picks it up. Default 200 ms.
    pub block: Duration,
    /// How long a delivery may stay unacked, measured from its delivery, before another
    /// member's reclaimer (XAUTOCLAIM) takes it over. Default 60 s.
    pub ack_deadline: Duration,
    /// How often each subscription looks for requeued or abandoned entries to claim.
    /// Default 250 ms.
    pub claim_interval: Duration,
    /// The entry field that holds the payload, as it is (`REDIS_STREAM_PAYLOAD_FIELD`).
    /// Plain clients' entries (`XADD s * data <json>`) are read from it, and plain `XRANGE`
    /// readers find helix's payloads in it. Default `data`.
    pub payload_field: String,
}

impl Default for StreamsConfig {
    fn default() -> Self {
        StreamsConfig {
            max_len: Some(1_000_000),
            exact_trim: false,
            trim_interval: Duration::from_secs(1),
            block: Duration::from_millis(200),
            ack_deadline: Duration::from_secs(60),
            claim_interval: Duration::from_millis(250),
            payload_field: "data".to_owned(),
        }
    }
}

/// Largest payload accepted by default: 64 MiB (Redis itself allows 512 MB per value, but
/// values that large stall the server).
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 64 * 1024 * 1024;

/// Backend name of pub/sub mode (the value of `MESSAGING_BACKEND`).
pub const PUBSUB_NAME: &str = "redis";
/// Backend name of Streams mode (the value of `MESSAGING_BACKEND`).
pub const STREAMS_NAME: &str = "redis-streams";

/// What pub/sub mode promises: delivery to whoever is subscribed right now, in publish order.
pub const PUBSUB_CAPABILITIES: Capabilities = Capabilities {
    // With the envelope (the default); a bare payload carries none.
    metadata: true,
    per_key_ordering: true,
    max_payload_bytes: Some(DEFAULT_MAX_PAYLOAD_BYTES),
    ..Capabilities::NONE
};

/// What Streams mode promises. Durability is the server's: entries survive a restart when
/// Redis persists (AOF, ideally `appendfsync always`).
pub const STREAMS_CAPABILITIES: Capabilities = Capabilities {
    metadata: true,
    durable: true,
    redelivery: true,
    consumer_groups: true,
    per_key_ordering: true,
    priority: false,
    ttl: true,
    redeliver_unacked: true,
    replay_by_time: true,
    native_dlq: false,
    delayed_requeue: true,
    backlog: true,
    max_payload_bytes: Some(DEFAULT_MAX_PAYLOAD_BYTES),
};

/// Connection and behaviour settings of the Redis backend.
#[derive(Clone)]
pub struct RedisConfig {
    info: ConnectionInfo,
    /// Pub/sub or Streams.
    pub mode: RedisMode,
    /// PEM file of the CA that signed the server's certificate, for `rediss://` servers
    /// whose certificate the system trust store does not cover.
    pub tls_ca_cert: Option<PathBuf>,
    /// PEM files of the client certificate and its PKCS#8 key, for a server that requires
    /// one (mutual TLS, `tls-auth-clients yes`). Both or neither.
    pub tls_client: Option<(PathBuf, PathBuf)>,
    /// Largest payload accepted, in bytes. Default [`DEFAULT_MAX_PAYLOAD_BYTES`].
    pub max_payload_bytes: usize,
    /// Longest wait to establish a connection. Default 5 s.
    pub connect_timeout: Duration,
    /// Longest wait for a command's reply. Default 10 s.
    pub response_timeout: Duration,
    /// Longest pause between reconnection attempts (they back off exponentially from
    /// 50 ms). Default 5 s.
    pub max_reconnect_delay: Duration,
    /// Streams-mode tuning.
    pub streams: StreamsConfig,
    /// Pub/sub: publish helix's MessagePack envelope (id, key, headers with the trace
    /// context and `type`, timestamp, …) rather than the bare payload
    /// (`REDIS_PUBSUB_ENVELOPE`). On by default: a channel carries nothing but a body, and
    /// without the envelope every delivery gets a new id and loses its headers, key,
    /// priority and correlation id, which retries, the DLQ's handlers by type, tracing and
    /// deduplication depend on. Turn it off when the channel's subscribers are not helix (they
    /// then read the body as it is). A subscriber recognises the envelope either way, and a
    /// plain message is delivered with its body as the payload. Default true.
    pub pubsub_envelope: bool,
    /// Sentinels that name the primary (`REDIS_SENTINELS`, `host:port,…`; a host alone is
    /// port 26379). When set, the URL's host and port are not used: every connection goes
    /// to the primary the first answering sentinel names for [`RedisConfig::sentinel_master`],
    /// and after a failover to the one it names then. The URL's password, database and TLS
    /// settings still apply to the primary. Empty by default.
    pub sentinels: Vec<(String, u16)>,
    /// The name the sentinels know the primary by (`REDIS_SENTINEL_MASTER`); required with
    /// [`RedisConfig::sentinels`].
    pub sentinel_master: Option<String>,
    /// Nodes of a Redis Cluster to start from (`REDIS_CLUSTER_NODES`, `host:port,…`): when
    /// set, Streams mode talks to the cluster through redis-rs' cluster client, each
    /// topic's stream on the node that owns its slot, and the URL's host and port are not
    /// used (its password and TLS settings are). Pub/sub mode refuses it (see
    /// [`RedisConfig::from_vars`]). Empty by default.
    pub cluster_nodes: Vec<(String, u16)>,
    /// Replicas that must hold a published entry before its publish resolves
    /// (`REDIS_MIN_REPLICAS_ACK`, Redis' `WAIT` after the publish). Redis replicates
    /// asynchronously: without this, an entry the primary acknowledged and had not yet sent
    /// on is lost when a failover promotes a replica. With N, a publish that fewer than N
    /// replicas confirmed within [`RedisConfig::min_replicas_timeout`] fails retryably (the
    /// entry is on the primary and may be published twice when retried). The `WAIT` runs on
    /// the broker's shared command connection, whose other commands (publishes, group
    /// creation, backlog, health) queue behind it for up to one replication round trip.
    /// Streams mode only; 0 (the default) is off.
    pub min_replicas_ack: usize,
    /// How long a publish waits for [`RedisConfig::min_replicas_ack`] replicas
    /// (`REDIS_MIN_REPLICAS_TIMEOUT_MS`). Default 1 s.
    pub min_replicas_timeout: Duration,
}

impl RedisConfig {
    /// What a broker connected with these settings promises (its
    /// [`Broker::capabilities`](helix_messaging_core::Broker::capabilities)), known before
    /// connecting.
    pub fn capabilities(&self) -> helix_messaging_core::Capabilities {
        let base = match self.mode {
            RedisMode::PubSub => PUBSUB_CAPABILITIES,
            RedisMode::Streams => STREAMS_CAPABILITIES,
        };
        helix_messaging_core::Capabilities {
            max_payload_bytes: Some(self.max_payload_bytes),
            // A channel carries only what is published on it: without the envelope, the
            // payload.
            metadata: base.metadata && (self.mode == RedisMode::Streams || self.pubsub_envelope),
            ..base
        }
    }

    /// Settings for the server at `url` (`redis://[user:password@]host[:port][/db]`, or
    /// `rediss://` for TLS), defaults otherwise.
    ///
    /// # Errors
    /// [`ErrorKind::Config`](helix_messaging_core::ErrorKind::Config) when the URL does not
    /// parse (the URL itself is not repeated: it may hold a password).
    pub fn new(url: &str, mode: RedisMode) -> Result<Self> {
        let info = url.into_connection_info().map_err(|_| {
            Error::config(
                "REDIS_URL",
                "not a valid Redis URL; expected redis://[user:password@]host[:port][/db] or rediss://…",
            )
        })?;
        Ok(RedisConfig::with_info(info, mode))
    }

    fn with_info(info: ConnectionInfo, mode: RedisMode) -> Self {
        RedisConfig {
            info,
            mode,
            tls_ca_cert: None,
            tls_client: None,
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
            connect_timeout: Duration::from_secs(5),
            response_timeout: Duration::from_secs(10),
            max_reconnect_delay: Duration::from_secs(5),
            streams: StreamsConfig::default(),
            pubsub_envelope: true,
            sentinels: Vec::new(),
            sentinel_master: None,
            cluster_nodes: Vec::new(),
            min_replicas_ack: 0,
            min_replicas_timeout: Duration::from_secs(1),
        }
    }

    /// Settings from the process environment; see [`RedisConfig::from_vars`].
    ///
    /// # Errors
    /// As [`RedisConfig::from_vars`].
    pub fn from_env(mode: RedisMode) -> Result<Self> {
        RedisConfig::from_vars(|name| std::env::var(name).ok(), mode)
    }

    /// Settings from variables read through `lookup`: `REDIS_URL`, or else `REDIS_HOST`
    /// (default `localhost`), `REDIS_PORT` (default 6379), `REDIS_PASSWORD`, `REDIS_DB`;
    /// plus `REDIS_TLS_CA_CERT` (a PEM file path), `REDIS_TLS_CERT` and `REDIS_TLS_KEY` (the
    /// client certificate and key for mutual TLS, both or neither), `REDIS_STREAM_PAYLOAD_FIELD`,
    /// `REDIS_PUBSUB_ENVELOPE` (`true` / `false`), `REDIS_SENTINELS` with
    /// `REDIS_SENTINEL_MASTER`, `REDIS_CLUSTER_NODES`, `REDIS_MIN_REPLICAS_ACK` and
    /// `REDIS_MIN_REPLICAS_TIMEOUT_MS`.
    ///
    /// `REDIS_CLUSTER_NODES` is refused in pub/sub mode: a subscription reads one node's
    /// connection, and a Redis Cluster forwards every `PUBLISH` to every node over its bus,
    /// so pub/sub gains nothing from the cluster but its cost. Use a single server (or
    /// Sentinel) for pub/sub, Streams for the cluster.
    ///
    /// # Errors
    /// [`ErrorKind::Config`](helix_messaging_core::ErrorKind::Config) naming the variable
    /// that is malformed.
    pub fn from_vars(lookup: impl Fn(&str) -> Option<String>, mode: RedisMode) -> Result<Self> {
        let var = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());
        let mut config = match var("REDIS_URL") {
            Some(url) => RedisConfig::new(url.trim(), mode)?,
            None => {
                let host = var("REDIS_HOST").unwrap_or_else(|| "localhost".to_owned());
                let port = match var("REDIS_PORT") {
                    None => 6379,
                    Some(p) => p.trim().parse::<u16>().map_err(|_| {
                        Error::config("REDIS_PORT", format!("expected a port number, got {p:?}"))
                    })?,
                };
                let mut redis = (host.trim(), port)
                    .into_connection_info()
                    .map_err(|_| {
                        Error::config("REDIS_HOST", format!("not a valid host: {host:?}"))
                    })?
                    .redis_settings()
                    .clone();
                if let Some(password) = var("REDIS_PASSWORD") {
                    redis = redis.set_password(password);
                }
                if let Some(db) = var("REDIS_DB") {
                    let db = db.trim().parse::<i64>().map_err(|_| {
                        Error::config(
                            "REDIS_DB",
                            format!("expected a database number, got {db:?}"),
                        )
                    })?;
                    redis = redis.set_db(db);
                }
                let info = (host.trim(), port)
                    .into_connection_info()
                    .map_err(|_| {
                        Error::config("REDIS_HOST", format!("not a valid host: {host:?}"))
                    })?
                    .set_redis_settings(redis);
                RedisConfig::with_info(info, mode)
            }
        };
        config.tls_ca_cert = var("REDIS_TLS_CA_CERT").map(PathBuf::from);
        config.tls_client = paired_files(var, "REDIS_TLS_CERT", "REDIS_TLS_KEY")?
            .map(|(cert, key)| (PathBuf::from(cert), PathBuf::from(key)));
        if let Some(field) = var("REDIS_STREAM_PAYLOAD_FIELD") {
            let field = field.trim();
            if field.starts_with(crate::codec::RESERVED_PREFIX) {
                return Err(Error::config(
                    "REDIS_STREAM_PAYLOAD_FIELD",
                    format!(
                        "{field:?} starts with {:?}, which is reserved for helix's metadata fields",
                        crate::codec::RESERVED_PREFIX
                    ),
                ));
            }
            config.streams.payload_field = field.to_owned();
        }
        if let Some(envelope) = var("REDIS_PUBSUB_ENVELOPE") {
            config.pubsub_envelope = match envelope.trim().to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" => true,
                "false" | "0" | "no" => false,
                _ => {
                    return Err(Error::config(
                        "REDIS_PUBSUB_ENVELOPE",
                        format!("expected true or false, got {envelope:?}"),
                    ));
                }
            };
        }
        if let Some(list) = var("REDIS_SENTINELS") {
            config.sentinels = parse_nodes("REDIS_SENTINELS", &list, 26379)?;
        }
        config.sentinel_master = var("REDIS_SENTINEL_MASTER").map(|m| m.trim().to_owned());
        if let Some(list) = var("REDIS_CLUSTER_NODES") {
            config.cluster_nodes = parse_nodes("REDIS_CLUSTER_NODES", &list, 6379)?;
        }
        if let Some(n) = var("REDIS_MIN_REPLICAS_ACK") {
            config.min_replicas_ack = n.trim().parse().map_err(|_| {
                Error::config(
                    "REDIS_MIN_REPLICAS_ACK",
                    format!("expected a number of replicas, got {n:?}"),
                )
            })?;
        }
        if let Some(ms) = var("REDIS_MIN_REPLICAS_TIMEOUT_MS") {
            let ms: u64 = ms.trim().parse().map_err(|_| {
                Error::config(
                    "REDIS_MIN_REPLICAS_TIMEOUT_MS",
                    format!("expected milliseconds, got {ms:?}"),
                )
            })?;
            config.min_replicas_timeout = Duration::from_millis(ms);
        }
        config.validate()?;
        Ok(config)
    }

    /// Check that the settings go together (what [`RedisConfig::from_vars`] and
    /// [`RedisBroker::connect`](crate::RedisBroker::connect) check).
    ///
    /// # Errors
    /// [`ErrorKind::Config`](helix_messaging_core::ErrorKind::Config) naming the variable at
    /// fault: sentinels without the primary's name or the other way round; a cluster in
    /// pub/sub mode (a subscription reads one node, and the cluster forwards every
    /// `PUBLISH` to every node over its bus, so pub/sub gains nothing from it), with
    /// sentinels, with a database other than 0 (a cluster has only database 0), or with
    /// certificate files (redis-rs takes a cluster's only with rustls); replica
    /// acknowledgements in pub/sub mode (nothing kept to replicate) or with a zero timeout
    /// (`WAIT n 0` waits forever, holding every command queued behind it).
    pub fn validate(&self) -> Result<()> {
        match (self.sentinels.is_empty(), &self.sentinel_master) {
            (false, None) => {
                return Err(Error::config(
                    "REDIS_SENTINEL_MASTER",
                    "required with REDIS_SENTINELS: the name the sentinels know the primary by",
                ));
            }
            (true, Some(_)) => {
                return Err(Error::config(
                    "REDIS_SENTINELS",
                    "required with REDIS_SENTINEL_MASTER: the sentinels to ask (host:port,…)",
                ));
            }
            _ => {}
        }
        if !self.cluster_nodes.is_empty() {
            let refused = if self.mode == RedisMode::PubSub {
                Some(
                    "pub/sub mode does not run on a Redis Cluster (a subscription reads one node; the cluster forwards every PUBLISH to every node): use redis-streams, or one server or Sentinel for pub/sub",
                )
            } else if !self.sentinels.is_empty() {
                Some(
                    "a Redis Cluster fails over by itself; REDIS_SENTINELS is for a primary with replicas, not both",
                )
            } else if self.info.redis_settings().db() != 0 {
                Some("a Redis Cluster has only database 0; the URL or REDIS_DB names another")
            } else if self.tls_ca_cert.is_some() || self.tls_client.is_some() {
                // redis-rs takes certificates for a cluster only with its rustls backend;
                // this crate uses native-tls.
                Some(
                    "REDIS_TLS_CA_CERT and REDIS_TLS_CERT / REDIS_TLS_KEY are not supported with a Redis Cluster; use certificates the system trusts",
                )
            } else {
                None
            };
            if let Some(why) = refused {
                return Err(Error::config("REDIS_CLUSTER_NODES", why));
            }
        }
        if self.min_replicas_ack > 0 {
            if self.mode == RedisMode::PubSub {
                return Err(Error::config(
                    "REDIS_MIN_REPLICAS_ACK",
                    "applies to Streams mode only: pub/sub keeps nothing to replicate",
                ));
            }
            if self.min_replicas_timeout.is_zero() {
                return Err(Error::config(
                    "REDIS_MIN_REPLICAS_TIMEOUT_MS",
                    "must be above 0: WAIT with 0 waits forever",
                ));
            }
        }
        Ok(())
    }

    /// The connection settings for the server at `host:port`: the configured ones (password,
    /// database, TLS) with another address, for a primary a sentinel names.
    pub(crate) fn info_at(&self, host: &str, port: u16) -> ConnectionInfo {
        let addr = match self.info.addr() {
            ConnectionAddr::TcpTls {
                insecure,
                tls_params,
                ..
            } => ConnectionAddr::TcpTls {
                host: host.to_owned(),
                port,
                insecure: *insecure,
                tls_params: tls_params.clone(),
            },
            _ => ConnectionAddr::Tcp(host.to_owned(), port),
        };
        self.info.clone().set_addr(addr)
    }

    /// Where the server is, without credentials (`redis://host:port/db`, `rediss://…`).
    pub fn address(&self) -> String {
        let db = self.info.redis_settings().db();
        match self.info.addr() {
            ConnectionAddr::Tcp(host, port) => format!("redis://{host}:{port}/{db}"),
            ConnectionAddr::TcpTls { host, port, .. } => format!("rediss://{host}:{port}/{db}"),
            ConnectionAddr::Unix(path) => format!("redis+unix://{}", path.display()),
            other => format!("{other}"),
        }
    }

    /// Whether the connection uses TLS.
    pub fn uses_tls(&self) -> bool {
        matches!(self.info.addr(), ConnectionAddr::TcpTls { .. })
    }

    pub(crate) fn client(&self) -> Result<redis::Client> {
        self.client_for(&self.info)
    }

    /// A client for the server `info` describes, with the configured TLS files.
    pub(crate) fn client_for(&self, info: &ConnectionInfo) -> Result<redis::Client> {
        let built = match self.tls_certificates()? {
            None => redis::Client::open(info.clone()),
            Some(certificates) => redis::Client::build_with_tls(info.clone(), certificates),
        };
        built.map_err(|e| {
            Error::config(
                "REDIS_URL",
                format!("cannot build a client for {}", self.address()),
            )
            .with_source(e)
        })
    }

    /// The configured CA and client certificate, read from their files; `None` when neither
    /// is set (the system's trust store then applies to `rediss://`).
    pub(crate) fn tls_certificates(&self) -> Result<Option<redis::TlsCertificates>> {
        if self.tls_ca_cert.is_none() && self.tls_client.is_none() {
            return Ok(None);
        }
        let read = |var: &'static str, path: &PathBuf| {
            std::fs::read(path)
                .map_err(|e| Error::config(var, format!("cannot read {}: {e}", path.display())))
        };
        let root_cert = self
            .tls_ca_cert
            .as_ref()
            .map(|path| read("REDIS_TLS_CA_CERT", path))
            .transpose()?;
        let client_tls = match &self.tls_client {
            Some((cert, key)) => Some(redis::ClientTlsConfig {
                client_cert: read("REDIS_TLS_CERT", cert)?,
                client_key: read("REDIS_TLS_KEY", key)?,
            }),
            None => None,
        };
        Ok(Some(redis::TlsCertificates {
            client_tls,
            root_cert,
        }))
    }
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let password = self.info.redis_settings().password().map(|_| "<redacted>");
        f.debug_struct("RedisConfig")
            .field("address", &self.address())
            .field("username", &self.info.redis_settings().username())
            .field("password", &password)
            .field("mode", &self.mode)
            .field("tls_ca_cert", &self.tls_ca_cert)
            .field("tls_client", &self.tls_client)
            .field("max_payload_bytes", &self.max_payload_bytes)
            .field("connect_timeout", &self.connect_timeout)
            .field("response_timeout", &self.response_timeout)
            .field("max_reconnect_delay", &self.max_reconnect_delay)
            .field("streams", &self.streams)
            .field("pubsub_envelope", &self.pubsub_envelope)
            .field("sentinels", &self.sentinels)
            .field("sentinel_master", &self.sentinel_master)
            .field("cluster_nodes", &self.cluster_nodes)
            .field("min_replicas_ack", &self.min_replicas_ack)
            .field("min_replicas_timeout", &self.min_replicas_timeout)
            .finish()
    }
}

/// A list of servers in `variable`: `host:port`, `[v6]:port` or a host alone
/// (`default_port`), comma separated.
fn parse_nodes(variable: &str, list: &str, default_port: u16) -> Result<Vec<(String, u16)>> {
    list.split(',')
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
        .map(|entry| {
            settings::host_and_port(entry, default_port).map_err(|why| {
                Error::config(
                    variable,
                    format!("{entry:?}: {why}; expected host:port entries separated by commas"),
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use helix_messaging_core::ErrorKind;
    use helix_messaging_testkit::env_lookup as vars;

    #[test]
    fn password_never_shows_in_debug_or_errors() {
        let config = RedisConfig::new(
            "redis://app:s3cr3t-pw@cache.internal:6380/2",
            RedisMode::Streams,
        )
        .unwrap();
        let shown = format!("{config:?} {}", config.address());
        assert!(!shown.contains("s3cr3t-pw"), "{shown}");
        assert!(shown.contains("<redacted>"));
        assert_eq!(config.address(), "redis://cache.internal:6380/2");

        let err = RedisConfig::new("redis://app:s3cr3t-pw@bad host:x/", RedisMode::PubSub)
            .expect_err("malformed URL");
        assert!(!err.to_string().contains("s3cr3t-pw"), "{err}");
    }

    #[test]
    fn host_port_password_and_db_come_from_the_seed_variables() {
        let config = RedisConfig::from_vars(
            vars(&[
                ("REDIS_HOST", "10.1.2.3"),
                ("REDIS_PORT", "6390"),
                ("REDIS_PASSWORD", "pw"),
                ("REDIS_DB", "4"),
            ]),
            RedisMode::PubSub,
        )
        .unwrap();
        assert_eq!(config.address(), "redis://10.1.2.3:6390/4");
        assert_eq!(config.info.redis_settings().password(), Some("pw"));
        let defaults = RedisConfig::from_vars(vars(&[]), RedisMode::PubSub).unwrap();
        assert_eq!(defaults.address(), "redis://localhost:6379/0");
    }

    #[test]
    fn url_wins_over_host_and_port_and_tls_is_recognised() {
        let config = RedisConfig::from_vars(
            vars(&[
                ("REDIS_URL", "rediss://example.com:6390"),
                ("REDIS_HOST", "ignored"),
            ]),
            RedisMode::Streams,
        )
        .unwrap();
        assert!(config.uses_tls());
        assert_eq!(config.address(), "rediss://example.com:6390/0");
    }

    #[test]
    fn sentinels_cluster_nodes_and_replica_acks_come_from_their_variables() {
        let config = RedisConfig::from_vars(
            vars(&[
                ("REDIS_URL", "redis://:pw@ignored:1/3"),
                ("REDIS_SENTINELS", "10.0.0.1:26380, sentinel-b, [::1]:26381"),
                ("REDIS_SENTINEL_MASTER", "mymaster"),
                ("REDIS_MIN_REPLICAS_ACK", "1"),
                ("REDIS_MIN_REPLICAS_TIMEOUT_MS", "250"),
            ]),
            RedisMode::Streams,
        )
        .unwrap();
        assert_eq!(
            config.sentinels,
            [
                ("10.0.0.1".to_owned(), 26380),
                ("sentinel-b".to_owned(), 26379),
                ("::1".to_owned(), 26381)
            ]
        );
        assert_eq!(config.sentinel_master.as_deref(), Some("mymaster"));
        assert_eq!(config.min_replicas_ack, 1);
        assert_eq!(config.min_replicas_timeout, Duration::from_millis(250));
        // The primary a sentinel names keeps the URL's password and database.
        let at = config.info_at("10.9.9.9", 7000);
        assert_eq!(at.addr(), &ConnectionAddr::Tcp("10.9.9.9".into(), 7000));
        assert_eq!(at.redis_settings().password(), Some("pw"));
        assert_eq!(at.redis_settings().db(), 3);
        let defaults = RedisConfig::from_vars(vars(&[]), RedisMode::Streams).unwrap();
        assert!(defaults.sentinels.is_empty());
        assert!(defaults.cluster_nodes.is_empty());
        let cluster = RedisConfig::from_vars(
            vars(&[("REDIS_CLUSTER_NODES", "10.0.0.1:7000,10.0.0.2")]),
            RedisMode::Streams,
        )
        .unwrap();
        assert_eq!(
            cluster.cluster_nodes,
            [("10.0.0.1".to_owned(), 7000), ("10.0.0.2".to_owned(), 6379)]
        );
        let both = RedisConfig::from_vars(
            vars(&[
                ("REDIS_CLUSTER_NODES", "a:1"),
                ("REDIS_SENTINELS", "b:2"),
                ("REDIS_SENTINEL_MASTER", "m"),
            ]),
            RedisMode::Streams,
        )
        .expect_err("a cluster and sentinels");
        assert!(both.to_string().contains("REDIS_CLUSTER_NODES"), "{both}");
        for (pairs, variable) in [
            (
                vec![
                    ("REDIS_MIN_REPLICAS_ACK", "1"),
                    ("REDIS_MIN_REPLICAS_TIMEOUT_MS", "0"),
                ],
                "REDIS_MIN_REPLICAS_TIMEOUT_MS",
            ),
            (
                vec![("REDIS_CLUSTER_NODES", "a:1"), ("REDIS_DB", "2")],
                "REDIS_CLUSTER_NODES",
            ),
            (
                vec![
                    ("REDIS_CLUSTER_NODES", "a:1"),
                    ("REDIS_TLS_CA_CERT", "/ca.pem"),
                ],
                "REDIS_CLUSTER_NODES",
            ),
            (vec![("REDIS_SENTINELS", "::1")], "REDIS_SENTINELS"),
        ] {
            let err = RedisConfig::from_vars(vars(&pairs), RedisMode::Streams).expect_err(variable);
            assert!(err.to_string().contains(variable), "{err}");
        }
        // Settings made in code are checked on connecting too.
        let mut in_code = RedisConfig::new("redis://127.0.0.1:6379", RedisMode::PubSub).unwrap();
        in_code.min_replicas_ack = 1;
        assert!(in_code.validate().is_err());
        assert_eq!(defaults.min_replicas_ack, 0);
    }

    #[test]
    fn malformed_variables_are_named() {
        for (pairs, variable) in [
            (vec![("REDIS_PORT", "sixty")], "REDIS_PORT"),
            (vec![("REDIS_DB", "first")], "REDIS_DB"),
            (vec![("REDIS_URL", "http://nope")], "REDIS_URL"),
            (vec![("REDIS_SENTINELS", "a:b")], "REDIS_SENTINELS"),
            (vec![("REDIS_SENTINELS", "a:1")], "REDIS_SENTINEL_MASTER"),
            (vec![("REDIS_SENTINEL_MASTER", "m")], "REDIS_SENTINELS"),
            // Pub/sub (the mode this test reads in) does not run on a cluster.
            (vec![("REDIS_CLUSTER_NODES", "a:1")], "REDIS_CLUSTER_NODES"),
            (vec![("REDIS_CLUSTER_NODES", "a:b")], "REDIS_CLUSTER_NODES"),
            (
                vec![("REDIS_MIN_REPLICAS_ACK", "two")],
                "REDIS_MIN_REPLICAS_ACK",
            ),
            (
                vec![("REDIS_MIN_REPLICAS_TIMEOUT_MS", "1s")],
                "REDIS_MIN_REPLICAS_TIMEOUT_MS",
            ),
        ] {
            let err = RedisConfig::from_vars(vars(&pairs), RedisMode::PubSub).expect_err(variable);
            assert_eq!(err.kind(), ErrorKind::Config);
            assert!(err.to_string().contains(variable), "{err}");
        }
    }
}
