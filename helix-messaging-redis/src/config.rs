//! Configuration: from code or from HelixAgent's environment variables. The password never
//! appears in `Debug`, `Display`, logs or errors.
//!
//! The two modes' names and what each promises stand here too, beside [`RedisMode`]: a
//! configuration's capabilities start from them, and every other module can name a mode
//! without reaching up to the crate root.

use helix_messaging_core::settings::paired_files;
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
    /// client certificate and key for mutual TLS, both or neither), `REDIS_STREAM_PAYLOAD_FIELD` and
    /// `REDIS_PUBSUB_ENVELOPE` (`true` / `false`).
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
        Ok(config)
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
        let read = |var: &'static str, path: &PathBuf| {
            std::fs::read(path)
                .map_err(|e| Error::config(var, format!("cannot read {}: {e}", path.display())))
        };
        let built = if self.tls_ca_cert.is_none() && self.tls_client.is_none() {
            redis::Client::open(self.info.clone())
        } else {
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
            redis::Client::build_with_tls(
                self.info.clone(),
                redis::TlsCertificates {
                    client_tls,
                    root_cert,
                },
            )
        };
        built.map_err(|e| {
            Error::config(
                "REDIS_URL",
                format!("cannot build a client for {}", self.address()),
            )
            .with_source(e)
        })
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
            .finish()
    }
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
    fn malformed_variables_are_named() {
        for (pairs, variable) in [
            (vec![("REDIS_PORT", "sixty")], "REDIS_PORT"),
            (vec![("REDIS_DB", "first")], "REDIS_DB"),
            (vec![("REDIS_URL", "http://nope")], "REDIS_URL"),
        ] {
            let err = RedisConfig::from_vars(vars(&pairs), RedisMode::PubSub).expect_err(variable);
            assert_eq!(err.kind(), ErrorKind::Config);
            assert!(err.to_string().contains(variable), "{err}");
        }
    }
}
