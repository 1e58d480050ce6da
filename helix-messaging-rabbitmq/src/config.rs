//! Configuration from code or from HelixAgent's variables. The password never appears in
//! `Debug`, `Display`, logs or errors (lapin's URI type prints it, so it stays inside).

use helix_messaging_core::settings::{self, paired_files};
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use helix_messaging_core::{Capabilities, DEFAULT_PREFETCH, Error, Result};
use lapin::uri::{AMQPAuthority, AMQPScheme, AMQPUri, AMQPUserInfo};

use crate::topology::{ExchangeType, Queue, Topology};

/// Largest payload accepted by default: 32 MiB (RabbitMQ's own limit is 128 MiB; messages
/// that large hurt every queue they pass through).
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 32 * 1024 * 1024;

/// Backend name reported by [`Broker::name`](helix_messaging_core::Broker::name) and selected
/// by `MESSAGING_BACKEND=rabbitmq`.
pub const NAME: &str = "rabbitmq";

/// What the RabbitMQ backend promises.
pub const CAPABILITIES: Capabilities = Capabilities {
    metadata: true,
    durable: true,
    redelivery: true,
    consumer_groups: true,
    per_key_ordering: true,
    priority: true,
    ttl: true,
    redeliver_unacked: true,
    // Needs the replay journal, which is off by default; see `RabbitConfig::replay_journal`.
    replay_by_time: false,
    native_dlq: true,
    delayed_requeue: true,
    backlog: true,
    max_payload_bytes: Some(DEFAULT_MAX_PAYLOAD_BYTES),
};

/// Connection and topology settings of the RabbitMQ backend.
#[derive(Clone)]
pub struct RabbitConfig {
    uri: AMQPUri,
    /// Durable topic exchange every topic is published to, with the topic as routing key
    /// (`RABBITMQ_EXCHANGE`, default `helixagent` as in HelixAgent).
    pub exchange: String,
    /// Unacked deliveries per subscription when its options keep the default prefetch
    /// (`RABBITMQ_PREFETCH_COUNT`, default 100).
    pub prefetch_count: u16,
    /// Wait for the broker's publisher confirm before a publish resolves
    /// (`RABBITMQ_PUBLISHER_CONFIRM`, default true). Without it a publish resolves once
    /// written to the socket and the backend does not promise durability.
    pub publisher_confirm: bool,
    /// `x-max-priority` of group queues (classic queues; RabbitMQ 3.10 has no priorities on
    /// quorum queues). `RABBITMQ_MAX_PRIORITY`, default 10, HelixAgent's range; 0 makes plain
    /// queues, which the broker handles faster (about 15% more throughput in `bench/`) but
    /// which deliver in publish order whatever the priority (the capabilities then say so).
    pub max_priority: u8,
    /// The type of group queues (`RABBITMQ_QUEUE_TYPE`: `classic`, the default, or
    /// `quorum`; `RABBITMQ_HA_MODE`, the documents' mirroring setting, asks for quorum
    /// queues, RabbitMQ's replicated queues since classic mirroring was removed). Quorum
    /// queues take no priority on RabbitMQ 3.10: [`RabbitConfig::capabilities`] then says
    /// so. Private queues (a subscription without a group) and the backend's own queues stay
    /// classic.
    pub queue_type: crate::topology::QueueType,
    /// Delete a group's queue after it has had no consumer for this long (`x-expires`).
    /// `None` (default) keeps groups until deleted by an operator.
    pub group_queue_expires: Option<Duration>,
    /// How long a private subscription's queue outlives a lost connection (`x-expires`): it
    /// is named by the subscription, not the server, so a reconnect finds it again with what
    /// was published meanwhile. Dropping the subscription deletes it at once. Default 10 min.
    pub private_queue_expires: Duration,
    /// Largest payload accepted, in bytes. Default [`DEFAULT_MAX_PAYLOAD_BYTES`].
    pub max_payload_bytes: usize,
    /// PEM file of the CA that signed an `amqps://` server's certificate, when the system
    /// trust store does not cover it (`RABBITMQ_TLS_CA_CERT`).
    pub tls_ca_cert: Option<PathBuf>,
    /// PEM files of the client certificate and its PKCS#8 key, for a listener that requires
    /// one (`RABBITMQ_TLS_CERT`, `RABBITMQ_TLS_KEY`; both or neither). With
    /// `?auth_mechanism=external` in the URL the certificate is also the login (SASL
    /// EXTERNAL, RabbitMQ's `rabbitmq_auth_mechanism_ssl`).
    pub tls_client: Option<(PathBuf, PathBuf)>,
    /// Longest wait to connect (`RABBITMQ_CONNECT_TIMEOUT`). Default 10 s.
    pub connect_timeout: Duration,
    /// Longest wait for a publish and its confirm (`RABBITMQ_PUBLISH_TIMEOUT`); past it the publish fails with a
    /// retryable [`ErrorKind::Timeout`](helix_messaging_core::ErrorKind::Timeout) instead of
    /// hanging (its outcome is then unknown). Default 30 s.
    pub publish_timeout: Duration,
    /// AMQP heartbeat: a dead peer is noticed after about twice this. Default 10 s.
    pub heartbeat: Duration,
    /// Reconnection attempts after the connection is lost before giving up
    /// (`RABBITMQ_MAX_RECONNECT_ATTEMPTS`). Default 100
    /// (about eight minutes at the maximum delay).
    pub reconnect_attempts: usize,
    /// First pause between reconnection attempts; it doubles up to
    /// [`RabbitConfig::max_reconnect_delay`] (`RABBITMQ_RECONNECT_DELAY`, which raises that
    /// cap to itself when above it). Default 100 ms.
    pub reconnect_delay: Duration,
    /// Longest pause between reconnection attempts. Default 5 s.
    pub max_reconnect_delay: Duration,
    /// Queue that rejected messages of every consumer group are dead-lettered to
    /// (`x-dead-letter-exchange` `""`, `x-dead-letter-routing-key` this name), declared
    /// with HelixAgent's limits (7 days, 100,000 messages). `RABBITMQ_DEAD_LETTER_QUEUE`,
    /// default `helixagent.dlq`; `none` turns dead-lettering off, and `reject` then drops.
    pub dead_letter_queue: Option<String>,
    /// Keep every published message in a stream queue (`<exchange>.journal`, bound to the
    /// exchange with `#`), which makes history readable by time range and lets a new group
    /// start from it (`RABBITMQ_REPLAY_JOURNAL`, default false: it writes every message a
    /// second time). With it on, no publish is unroutable: the journal takes every one.
    pub replay_journal: bool,
    /// How long the journal keeps messages (its `x-max-age`). Default 7 days.
    pub journal_max_age: Duration,
    /// Other nodes of the cluster, `(host, port)`, tried in order after the URL's own when
    /// it cannot be reached, on the first connect and on every reconnect
    /// (`RABBITMQ_CLUSTER_NODES`; credentials, vhost and TLS are the URL's). Default none.
    pub cluster_nodes: Vec<(String, u16)>,
    /// Largest difference expected between the publishers' clocks and the broker's: a read
    /// of the journal starts this much before the window, since the journal is positioned by
    /// the broker's append time and the window filtered by the message timestamps. Default 5 s.
    pub journal_clock_skew: Duration,
}

/// The group queues' type from `RABBITMQ_QUEUE_TYPE` and the documents' `RABBITMQ_HA_MODE`
/// (`all`, `exactly` or `nodes` asked classic queues to be mirrored; quorum queues are what
/// replicates a queue now, so any of them means quorum; `none` or unset means nothing).
fn queue_type(
    queue_type: Option<String>,
    ha_mode: Option<String>,
) -> Result<crate::topology::QueueType> {
    use crate::topology::QueueType;
    let replicated = match ha_mode.as_deref().map(str::trim) {
        None | Some("" | "none") => false,
        Some("all" | "exactly" | "nodes") => true,
        Some(other) => {
            return Err(Error::config(
                "RABBITMQ_HA_MODE",
                format!("expected all, exactly, nodes or none, got {other:?}"),
            ));
        }
    };
    match (queue_type.as_deref().map(str::trim), replicated) {
        (None | Some(""), false) => Ok(QueueType::Classic),
        (None | Some("") | Some("quorum"), true) | (Some("quorum"), false) => Ok(QueueType::Quorum),
        (Some("classic"), false) => Ok(QueueType::Classic),
        (Some("classic"), true) => Err(Error::config(
            "RABBITMQ_QUEUE_TYPE",
            "classic, while RABBITMQ_HA_MODE asks for replicated queues: RabbitMQ replicates quorum queues, not classic ones",
        )),
        (Some(other), _) => Err(Error::config(
            "RABBITMQ_QUEUE_TYPE",
            format!("expected classic or quorum, got {other:?}"),
        )),
    }
}

impl RabbitConfig {
    /// What a broker connected with these settings promises (its
    /// [`Broker::capabilities`](helix_messaging_core::Broker::capabilities)), known before
    /// connecting.
    pub fn capabilities(&self) -> helix_messaging_core::Capabilities {
        helix_messaging_core::Capabilities {
            durable: self.publisher_confirm,
            priority: self.max_priority > 0
                && self.queue_type == crate::topology::QueueType::Classic,
            replay_by_time: self.replay_journal,
            native_dlq: self.dead_letter_queue.is_some(),
            max_payload_bytes: Some(self.max_payload_bytes),
            ..CAPABILITIES
        }
    }

    /// Settings for the server at `uri` (`amqp://user:password@host:port/vhost`), defaults
    /// otherwise.
    ///
    /// # Errors
    /// [`ErrorKind::Config`](helix_messaging_core::ErrorKind::Config) when the URI does not
    /// parse (the URI itself is not repeated: it may hold a password).
    pub fn new(uri: &str) -> Result<Self> {
        let mut uri: AMQPUri = uri.parse().map_err(|_| {
            Error::config(
                "RABBITMQ_URL",
                "not a valid AMQP URI; expected amqp://user:password@host:port/vhost or amqps://…",
            )
        })?;
        // `amqp://host:5672/` (HelixAgent's documented form) names vhost "" under the AMQP
        // URI spec, which lapin follows and every broker refuses; the Go client reads it as
        // the default vhost `/`, and so does this backend. No vhost can be named "".
        if uri.vhost.is_empty() {
            uri.vhost = "/".to_owned();
        }
        Ok(RabbitConfig::with_uri(uri))
    }

    fn with_uri(uri: AMQPUri) -> Self {
        RabbitConfig {
            uri,
            exchange: "helixagent".to_owned(),
            prefetch_count: DEFAULT_PREFETCH as u16,
            publisher_confirm: true,
            max_priority: 10,
            queue_type: crate::topology::QueueType::Classic,
            group_queue_expires: None,
            private_queue_expires: Duration::from_secs(600),
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
            tls_ca_cert: None,
            tls_client: None,
            connect_timeout: Duration::from_secs(10),
            publish_timeout: Duration::from_secs(30),
            heartbeat: Duration::from_secs(10),
            reconnect_attempts: 100,
            reconnect_delay: Duration::from_millis(100),
            max_reconnect_delay: Duration::from_secs(5),
            dead_letter_queue: Some(crate::topology::HELIXAGENT_DLQ.to_owned()),
            replay_journal: false,
            journal_max_age: Duration::from_secs(7 * 24 * 3600),
            journal_clock_skew: Duration::from_secs(5),
            cluster_nodes: Vec::new(),
        }
    }

    /// Name of the journal stream of [`RabbitConfig::replay_journal`].
    pub fn journal_queue(&self) -> String {
        format!("{}.journal", self.exchange)
    }

    /// What this backend itself needs declared on every connection: the exchange, the
    /// dead-letter queue and the journal, as configured.
    pub(crate) fn base_topology(&self) -> Topology {
        let mut topology = Topology::new().exchange(self.exchange.as_str(), ExchangeType::Topic);
        if let Some(dlq) = &self.dead_letter_queue {
            let mut queue = Topology::helixagent_dlq(dlq);
            // Replicated like the group queues that dead-letter to it: a classic queue lives
            // on one node, and with that node gone every reconnect's declaration would fail.
            queue.queue_type = self.queue_type;
            topology = topology.queue(queue);
        }
        if self.replay_journal {
            let journal = self.journal_queue();
            topology = topology
                .queue(Queue::stream(&journal, self.journal_max_age))
                .bind(journal, self.exchange.as_str(), "#");
        }
        topology
    }

    /// Settings from the process environment; see [`RabbitConfig::from_vars`].
    ///
    /// # Errors
    /// As [`RabbitConfig::from_vars`].
    pub fn from_env() -> Result<Self> {
        RabbitConfig::from_vars(|name| std::env::var(name).ok())
    }

    /// Settings from variables read through `lookup`: `RABBITMQ_URL`, or else
    /// `RABBITMQ_HOST` (default `localhost`), `RABBITMQ_PORT` (5672), `RABBITMQ_USER`
    /// (`guest`), `RABBITMQ_PASSWORD` (`guest`), `RABBITMQ_VHOST` (`/`); plus
    /// `RABBITMQ_EXCHANGE`, `RABBITMQ_PREFETCH_COUNT`, `RABBITMQ_PUBLISHER_CONFIRM`,
    /// `RABBITMQ_TLS_CA_CERT`, `RABBITMQ_MAX_PRIORITY`, `RABBITMQ_DEAD_LETTER_QUEUE`,
    /// `RABBITMQ_REPLAY_JOURNAL`, and HelixAgent's connection settings
    /// `RABBITMQ_CONNECT_TIMEOUT`, `RABBITMQ_PUBLISH_TIMEOUT`, `RABBITMQ_RECONNECT_DELAY`
    /// (durations such as `500ms`, `30s`, `2m`) and `RABBITMQ_MAX_RECONNECT_ATTEMPTS`.
    ///
    /// # Errors
    /// [`ErrorKind::Config`](helix_messaging_core::ErrorKind::Config) naming the malformed
    /// variable.
    pub fn from_vars(lookup: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let var = |name: &str| {
            lookup(name)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let mut config = match var("RABBITMQ_URL") {
            Some(url) => RabbitConfig::new(&url)?,
            None => {
                let port = match var("RABBITMQ_PORT") {
                    None => 5672,
                    Some(p) => p.parse::<u16>().map_err(|_| {
                        Error::config(
                            "RABBITMQ_PORT",
                            format!("expected a port number, got {p:?}"),
                        )
                    })?,
                };
                RabbitConfig::with_uri(AMQPUri {
                    scheme: AMQPScheme::AMQP,
                    authority: AMQPAuthority {
                        userinfo: AMQPUserInfo {
                            username: var("RABBITMQ_USER").unwrap_or_else(|| "guest".into()),
                            password: var("RABBITMQ_PASSWORD").unwrap_or_else(|| "guest".into()),
                        },
                        host: var("RABBITMQ_HOST").unwrap_or_else(|| "localhost".into()),
                        port,
                    },
                    vhost: var("RABBITMQ_VHOST").unwrap_or_else(|| "/".into()),
                    query: Default::default(),
                })
            }
        };
        config.tls_ca_cert = var("RABBITMQ_TLS_CA_CERT").map(PathBuf::from);
        config.tls_client = paired_files(var, "RABBITMQ_TLS_CERT", "RABBITMQ_TLS_KEY")?
            .map(|(cert, key)| (PathBuf::from(cert), PathBuf::from(key)));
        if let Some(exchange) = var("RABBITMQ_EXCHANGE") {
            config.exchange = exchange;
        }
        if let Some(prefetch) = var("RABBITMQ_PREFETCH_COUNT") {
            config.prefetch_count =
                prefetch
                    .parse::<u16>()
                    .ok()
                    .filter(|p| *p > 0)
                    .ok_or_else(|| {
                        Error::config(
                            "RABBITMQ_PREFETCH_COUNT",
                            format!("expected a whole number from 1 to 65535, got {prefetch:?}"),
                        )
                    })?;
        }
        if let Some(confirm) = var("RABBITMQ_PUBLISHER_CONFIRM") {
            config.publisher_confirm = flag("RABBITMQ_PUBLISHER_CONFIRM", &confirm)?;
        }
        if let Some(max) = var("RABBITMQ_MAX_PRIORITY") {
            config.max_priority = max.parse::<u8>().map_err(|_| {
                Error::config(
                    "RABBITMQ_MAX_PRIORITY",
                    format!("expected a whole number from 0 (no priorities) to 255, got {max:?}"),
                )
            })?;
        }
        if let Some(journal) = var("RABBITMQ_REPLAY_JOURNAL") {
            config.replay_journal = flag("RABBITMQ_REPLAY_JOURNAL", &journal)?;
        }
        if let Some(dlq) = var("RABBITMQ_DEAD_LETTER_QUEUE") {
            config.dead_letter_queue = (!dlq.eq_ignore_ascii_case("none")).then_some(dlq);
        }
        if let Some(timeout) = var("RABBITMQ_CONNECT_TIMEOUT") {
            config.connect_timeout = duration("RABBITMQ_CONNECT_TIMEOUT", &timeout)?;
        }
        config.queue_type = queue_type(var("RABBITMQ_QUEUE_TYPE"), var("RABBITMQ_HA_MODE"))?;
        if let Some(nodes) = var("RABBITMQ_CLUSTER_NODES") {
            config.cluster_nodes = cluster_nodes(&nodes, config.uri.authority.port)?;
        }
        if let Some(timeout) = var("RABBITMQ_PUBLISH_TIMEOUT") {
            config.publish_timeout = duration("RABBITMQ_PUBLISH_TIMEOUT", &timeout)?;
        }
        if let Some(attempts) = var("RABBITMQ_MAX_RECONNECT_ATTEMPTS") {
            config.reconnect_attempts = attempts.parse::<usize>().map_err(|_| {
                Error::config(
                    "RABBITMQ_MAX_RECONNECT_ATTEMPTS",
                    format!("expected a whole number of attempts, got {attempts:?}"),
                )
            })?;
        }
        if let Some(delay) = var("RABBITMQ_RECONNECT_DELAY") {
            config.reconnect_delay = duration("RABBITMQ_RECONNECT_DELAY", &delay)?;
            // HelixAgent waits this delay before every attempt: a delay above the cap raises
            // the cap rather than being cut to it.
            config.max_reconnect_delay = config.max_reconnect_delay.max(config.reconnect_delay);
        }
        Ok(config)
    }

    /// Where the server is, without the password (`amqp://user@host:port/vhost`).
    pub fn address(&self) -> String {
        let scheme = match self.uri.scheme {
            AMQPScheme::AMQP => "amqp",
            AMQPScheme::AMQPS => "amqps",
        };
        let a = &self.uri.authority;
        format!(
            "{scheme}://{}@{}:{}/{}",
            a.userinfo.username, a.host, a.port, self.uri.vhost
        )
    }

    /// The TLS settings for the connection: the configured CA, if any.
    pub(crate) fn tls(&self) -> Result<lapin::tcp::OwnedTLSConfig> {
        let cert_chain = match &self.tls_ca_cert {
            None => None,
            Some(path) => Some(std::fs::read_to_string(path).map_err(|e| {
                Error::config(
                    "RABBITMQ_TLS_CA_CERT",
                    format!("cannot read {}: {e}", path.display()),
                )
            })?),
        };
        let read = |var: &'static str, path: &PathBuf| {
            std::fs::read(path)
                .map_err(|e| Error::config(var, format!("cannot read {}: {e}", path.display())))
        };
        let identity = match &self.tls_client {
            Some((cert, key)) => Some(lapin::tcp::OwnedIdentity::PKCS8 {
                pem: read("RABBITMQ_TLS_CERT", cert)?,
                key: read("RABBITMQ_TLS_KEY", key)?,
            }),
            None => None,
        };
        Ok(lapin::tcp::OwnedTLSConfig {
            identity,
            cert_chain,
        })
    }

    pub(crate) fn uri(&self) -> AMQPUri {
        let mut uri = self.uri.clone();
        uri.query.heartbeat = Some(u16::try_from(self.heartbeat.as_secs()).unwrap_or(u16::MAX));
        uri
    }

    /// The URI of every node to try, in order: the URL's, then each of
    /// [`RabbitConfig::cluster_nodes`] with the URL's credentials, vhost and settings.
    pub(crate) fn node_uris(&self) -> Vec<AMQPUri> {
        let first = self.uri();
        let others = self.cluster_nodes.iter().map(|(host, port)| {
            let mut uri = first.clone();
            uri.authority.host.clone_from(host);
            uri.authority.port = *port;
            uri
        });
        std::iter::once(first.clone()).chain(others).collect()
    }
}

/// `RABBITMQ_CLUSTER_NODES`: comma-separated nodes, each `host`, `host:port`, an
/// `amqp://` or `amqps://` URL (its host and port are taken) or an Erlang node name
/// `rabbit@host` as the documents write them; `default_port` where none is given.
fn cluster_nodes(nodes: &str, default_port: u16) -> Result<Vec<(String, u16)>> {
    let bad = |node: &str, why: &str| {
        Error::config(
            "RABBITMQ_CLUSTER_NODES",
            format!("{node:?}: {why}; expected host, host:port, amqp://host:port or rabbit@host"),
        )
    };
    let mut parsed = Vec::new();
    for node in nodes.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let (host, port) = if node.contains("://") {
            let uri: AMQPUri = node
                .parse()
                .map_err(|_| bad(node, "not a valid AMQP URI"))?;
            (uri.authority.host, uri.authority.port)
        } else {
            // The documents' `rabbit@host` names the node's host.
            let host_port = node.rsplit_once('@').map_or(node, |(_, host)| host);
            settings::host_and_port(host_port, default_port).map_err(|why| bad(node, why))?
        };
        if host.is_empty() {
            return Err(bad(node, "no host"));
        }
        parsed.push((host, port));
    }
    Ok(parsed)
}

/// A positive duration variable's value, written as HelixAgent's configuration writes them:
/// a whole number with a unit, `ms`, `s`, `m` or `h` (`500ms`, `30s`, `2m`).
fn duration(variable: &str, value: &str) -> Result<Duration> {
    let bad = || {
        Error::config(
            variable,
            format!("expected a positive duration such as 500ms, 30s or 2m, got {value:?}"),
        )
    };
    let lower = value.to_ascii_lowercase();
    let digits = lower.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (number, unit) = lower.split_at(digits);
    let number: u64 = number.parse().map_err(|_| bad())?;
    let parsed = match unit {
        "ms" => Duration::from_millis(number),
        "s" => Duration::from_secs(number),
        "m" => Duration::from_secs(number.saturating_mul(60)),
        "h" => Duration::from_secs(number.saturating_mul(3600)),
        _ => return Err(bad()),
    };
    if parsed.is_zero() {
        return Err(bad());
    }
    Ok(parsed)
}

/// A boolean variable's value.
fn flag(variable: &str, value: &str) -> Result<bool> {
    match value.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(Error::config(
            variable,
            format!("expected true or false, got {value:?}"),
        )),
    }
}

impl fmt::Debug for RabbitConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitConfig")
            .field("address", &self.address())
            .field("cluster_nodes", &self.cluster_nodes)
            .field("password", &"<redacted>")
            .field("exchange", &self.exchange)
            .field("prefetch_count", &self.prefetch_count)
            .field("publisher_confirm", &self.publisher_confirm)
            .field("max_priority", &self.max_priority)
            .field("group_queue_expires", &self.group_queue_expires)
            .field("private_queue_expires", &self.private_queue_expires)
            .field("max_payload_bytes", &self.max_payload_bytes)
            .field("tls_ca_cert", &self.tls_ca_cert)
            .field("tls_client", &self.tls_client)
            .field("connect_timeout", &self.connect_timeout)
            .field("publish_timeout", &self.publish_timeout)
            .field("heartbeat", &self.heartbeat)
            .field("reconnect_attempts", &self.reconnect_attempts)
            .field("reconnect_delay", &self.reconnect_delay)
            .field("max_reconnect_delay", &self.max_reconnect_delay)
            .field("dead_letter_queue", &self.dead_letter_queue)
            .field("replay_journal", &self.replay_journal)
            .field("journal_max_age", &self.journal_max_age)
            .field("journal_clock_skew", &self.journal_clock_skew)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use helix_messaging_core::ErrorKind;
    use helix_messaging_testkit::env_lookup as vars;

    #[test]
    fn password_never_shows() {
        let config = RabbitConfig::new("amqp://app:s3cr3t-pw@mq.internal:5673/prod").unwrap();
        let shown = format!("{config:?} {}", config.address());
        assert!(!shown.contains("s3cr3t-pw"), "{shown}");
        assert_eq!(config.address(), "amqp://app@mq.internal:5673/prod");
        let err = RabbitConfig::new("amqp://app:s3cr3t-pw@host:notaport/").expect_err("bad URI");
        assert!(!err.to_string().contains("s3cr3t-pw"), "{err}");
    }

    #[test]
    fn seed_variables_build_the_connection() {
        let config = RabbitConfig::from_vars(vars(&[
            ("RABBITMQ_HOST", "10.0.0.5"),
            ("RABBITMQ_PORT", "5673"),
            ("RABBITMQ_USER", "helixagent"),
            ("RABBITMQ_PASSWORD", "pa/ss@word"),
            ("RABBITMQ_VHOST", "/"),
            ("RABBITMQ_PREFETCH_COUNT", "25"),
            ("RABBITMQ_PUBLISHER_CONFIRM", "false"),
            ("RABBITMQ_TLS_CA_CERT", "/etc/helix/ca.pem"),
            ("RABBITMQ_REPLAY_JOURNAL", "true"),
            ("RABBITMQ_DEAD_LETTER_QUEUE", "none"),
            ("RABBITMQ_MAX_PRIORITY", "0"),
        ]))
        .unwrap();
        assert_eq!(config.address(), "amqp://helixagent@10.0.0.5:5673//");
        assert_eq!(config.uri.authority.userinfo.password, "pa/ss@word");
        assert_eq!(config.prefetch_count, 25);
        assert!(!config.publisher_confirm);
        assert_eq!(config.tls_ca_cert, Some(PathBuf::from("/etc/helix/ca.pem")));
        assert!(config.replay_journal);
        assert_eq!(config.dead_letter_queue, None);
        assert_eq!(config.max_priority, 0);
        let defaults = RabbitConfig::from_vars(vars(&[])).unwrap();
        assert_eq!(defaults.address(), "amqp://guest@localhost:5672//");
        assert!(defaults.publisher_confirm);
        assert_eq!(defaults.exchange, "helixagent");
        assert_eq!(
            defaults.dead_letter_queue.as_deref(),
            Some("helixagent.dlq")
        );
        assert!(!defaults.replay_journal);
    }

    #[test]
    fn an_empty_url_path_is_the_default_vhost() {
        for url in [
            "amqp://user:pass@localhost:5672/",
            "amqp://user:pass@localhost:5672",
            "amqp://user:pass@localhost:5672/%2f",
        ] {
            let config = RabbitConfig::new(url).unwrap();
            assert_eq!(config.uri.vhost, "/", "{url}");
        }
        let named = RabbitConfig::new("amqp://user:pass@localhost:5672/prod").unwrap();
        assert_eq!(named.uri.vhost, "prod");
    }

    #[test]
    fn timeouts_and_reconnects_come_from_their_variables() {
        let config = RabbitConfig::from_vars(vars(&[
            ("RABBITMQ_CONNECT_TIMEOUT", "30s"),
            ("RABBITMQ_PUBLISH_TIMEOUT", "1500ms"),
            ("RABBITMQ_MAX_RECONNECT_ATTEMPTS", "10"),
            ("RABBITMQ_RECONNECT_DELAY", "5s"),
        ]))
        .unwrap();
        assert_eq!(config.connect_timeout, Duration::from_secs(30));
        assert_eq!(config.publish_timeout, Duration::from_millis(1500));
        assert_eq!(config.reconnect_attempts, 10);
        assert_eq!(config.reconnect_delay, Duration::from_secs(5));
        // HelixAgent waits the same delay between every attempt; a delay above the cap
        // raises the cap, so 5 s is waited each time rather than cut to the 5 s default.
        assert!(config.max_reconnect_delay >= config.reconnect_delay);
        let slow = RabbitConfig::from_vars(vars(&[("RABBITMQ_RECONNECT_DELAY", "1m")])).unwrap();
        assert_eq!(slow.reconnect_delay, Duration::from_secs(60));
        assert_eq!(slow.max_reconnect_delay, Duration::from_secs(60));
        let defaults = RabbitConfig::from_vars(vars(&[])).unwrap();
        assert_eq!(defaults.connect_timeout, Duration::from_secs(10));
        assert_eq!(defaults.publish_timeout, Duration::from_secs(30));
        assert_eq!(defaults.reconnect_attempts, 100);
        assert_eq!(defaults.reconnect_delay, Duration::from_millis(100));
    }

    #[test]
    fn cluster_nodes_are_read_in_every_form_the_documents_use() {
        let config = RabbitConfig::from_vars(vars(&[
            ("RABBITMQ_URL", "amqp://u:p@node1:5673/prod"),
            (
                "RABBITMQ_CLUSTER_NODES",
                "rabbit@node2, node3:5680,amqp://x:y@node4:5699/other,node5",
            ),
        ]))
        .unwrap();
        assert_eq!(
            config.cluster_nodes,
            vec![
                ("node2".to_owned(), 5673),
                ("node3".to_owned(), 5680),
                ("node4".to_owned(), 5699),
                ("node5".to_owned(), 5673),
            ]
        );
        let uris = config.node_uris();
        assert_eq!(uris.len(), 5);
        assert_eq!(
            (uris[2].authority.host.as_str(), uris[2].authority.port),
            ("node3", 5680)
        );
        assert_eq!(uris[2].vhost, "prod", "the URL's vhost on every node");
        assert_eq!(
            uris[3].authority.userinfo.username, "u",
            "and its credentials"
        );
        let ipv6 = RabbitConfig::from_vars(vars(&[(
            "RABBITMQ_CLUSTER_NODES",
            "[::1]:5680,[fd00::2], ,",
        )]))
        .unwrap();
        assert_eq!(
            ipv6.cluster_nodes,
            vec![("::1".to_owned(), 5680), ("fd00::2".to_owned(), 5672)]
        );
        for wrong in ["node:port", "fd00::2", "[::1", "[::1]x"] {
            let err =
                RabbitConfig::from_vars(vars(&[("RABBITMQ_CLUSTER_NODES", wrong)])).unwrap_err();
            assert!(
                err.message().starts_with("RABBITMQ_CLUSTER_NODES"),
                "{wrong}: {err}"
            );
        }
    }

    #[test]
    fn the_queue_type_and_the_documents_ha_mode_pick_quorum_queues() {
        use crate::topology::QueueType;
        let of = |pairs: &[(&str, &str)]| RabbitConfig::from_vars(vars(pairs)).unwrap();
        assert_eq!(of(&[]).queue_type, QueueType::Classic);
        assert!(of(&[]).capabilities().priority);
        let quorum = of(&[("RABBITMQ_QUEUE_TYPE", "quorum")]);
        assert_eq!(quorum.queue_type, QueueType::Quorum);
        assert!(
            !quorum.capabilities().priority,
            "no priority on quorum queues"
        );
        for mode in ["all", "exactly", "nodes"] {
            assert_eq!(
                of(&[("RABBITMQ_HA_MODE", mode)]).queue_type,
                QueueType::Quorum
            );
        }
        assert_eq!(
            of(&[("RABBITMQ_HA_MODE", "none")]).queue_type,
            QueueType::Classic
        );
    }

    #[test]
    fn malformed_variables_are_named() {
        for (pairs, variable) in [
            (vec![("RABBITMQ_PORT", "amqp")], "RABBITMQ_PORT"),
            (
                vec![("RABBITMQ_PREFETCH_COUNT", "0")],
                "RABBITMQ_PREFETCH_COUNT",
            ),
            (
                vec![("RABBITMQ_PUBLISHER_CONFIRM", "maybe")],
                "RABBITMQ_PUBLISHER_CONFIRM",
            ),
            (
                vec![("RABBITMQ_MAX_PRIORITY", "300")],
                "RABBITMQ_MAX_PRIORITY",
            ),
            (
                vec![("RABBITMQ_REPLAY_JOURNAL", "sometimes")],
                "RABBITMQ_REPLAY_JOURNAL",
            ),
            (
                vec![("RABBITMQ_QUEUE_TYPE", "stream")],
                "RABBITMQ_QUEUE_TYPE",
            ),
            (vec![("RABBITMQ_HA_MODE", "everywhere")], "RABBITMQ_HA_MODE"),
            (
                vec![
                    ("RABBITMQ_QUEUE_TYPE", "classic"),
                    ("RABBITMQ_HA_MODE", "all"),
                ],
                "RABBITMQ_QUEUE_TYPE",
            ),
            (vec![("RABBITMQ_URL", "http://x")], "RABBITMQ_URL"),
            (
                vec![("RABBITMQ_CONNECT_TIMEOUT", "30")],
                "RABBITMQ_CONNECT_TIMEOUT",
            ),
            (
                vec![("RABBITMQ_CONNECT_TIMEOUT", "0s")],
                "RABBITMQ_CONNECT_TIMEOUT",
            ),
            (
                vec![("RABBITMQ_PUBLISH_TIMEOUT", "soon")],
                "RABBITMQ_PUBLISH_TIMEOUT",
            ),
            (
                vec![("RABBITMQ_MAX_RECONNECT_ATTEMPTS", "-1")],
                "RABBITMQ_MAX_RECONNECT_ATTEMPTS",
            ),
            (
                vec![("RABBITMQ_RECONNECT_DELAY", "5x")],
                "RABBITMQ_RECONNECT_DELAY",
            ),
        ] {
            let err = RabbitConfig::from_vars(vars(&pairs)).expect_err(variable);
            assert_eq!(err.kind(), ErrorKind::Config);
            assert!(err.to_string().contains(variable), "{err}");
        }
    }
}
