//! Which backends exist, which are compiled in, and building them.

use std::fmt::Write as _;
use std::sync::Arc;

use helix_messaging_core::lazy::{ConnectRetry, LazyBroker};
use helix_messaging_core::{Broker, Capabilities, Error, Result};

/// A backend this crate knows about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackendInfo {
    /// Value of `MESSAGING_BACKEND` (and URL scheme) selecting it.
    pub name: &'static str,
    /// Cargo feature of `helix-messaging` that compiles it in.
    pub feature: &'static str,
}

/// Environment variable choosing the backend (`memory` when unset or empty).
pub const BACKEND_VAR: &str = "MESSAGING_BACKEND";

/// Every backend the crate can be built with, compiled in or not.
pub const KNOWN_BACKENDS: &[BackendInfo] = &[
    BackendInfo {
        name: "memory",
        feature: "memory",
    },
    BackendInfo {
        name: "redis",
        feature: "redis",
    },
    BackendInfo {
        name: "redis-streams",
        feature: "redis",
    },
    BackendInfo {
        name: "rabbitmq",
        feature: "rabbitmq",
    },
    BackendInfo {
        name: "kafka",
        feature: "kafka",
    },
];

/// The compiled-in backends with what each promises.
// One cfg-gated push per backend feature, so `vec![]` cannot express it.
#[allow(clippy::vec_init_then_push)]
pub fn compiled_backends() -> Vec<(BackendInfo, Capabilities)> {
    #[allow(unused_mut)]
    let mut out = Vec::new();
    #[cfg(feature = "memory")]
    out.push((KNOWN_BACKENDS[0], helix_messaging_memory::CAPABILITIES));
    #[cfg(feature = "redis")]
    out.push((
        KNOWN_BACKENDS[1],
        helix_messaging_redis::PUBSUB_CAPABILITIES,
    ));
    #[cfg(feature = "redis")]
    out.push((
        KNOWN_BACKENDS[2],
        helix_messaging_redis::STREAMS_CAPABILITIES,
    ));
    #[cfg(feature = "rabbitmq")]
    out.push((KNOWN_BACKENDS[3], helix_messaging_rabbitmq::CAPABILITIES));
    #[cfg(feature = "kafka")]
    out.push((KNOWN_BACKENDS[4], helix_messaging_kafka::CAPABILITIES));
    out
}

/// The backend capability table as Markdown, one row per compiled-in backend (the README's
/// table is checked against this).
pub fn capability_table() -> String {
    let columns = Capabilities::NONE.flags();
    let mut out = String::from("| Backend |");
    for (title, _) in columns {
        let _ = write!(out, " {title} |");
    }
    out.push_str("\n|---|");
    for _ in columns {
        out.push_str(":-:|");
    }
    for (info, caps) in compiled_backends() {
        let _ = write!(out, "\n| `{}` |", info.name);
        for (_, supported) in caps.flags() {
            out.push_str(if supported { " ✓ |" } else { " — |" });
        }
    }
    out.push('\n');
    out
}

/// Map a requested backend name to a known, compiled-in backend.
pub(crate) fn resolve(requested: &str, source: &str) -> Result<BackendInfo> {
    let compiled: Vec<&str> = compiled_backends().iter().map(|(b, _)| b.name).collect();
    let compiled_list = if compiled.is_empty() {
        "none (enable a backend feature of helix-messaging)".to_owned()
    } else {
        compiled.join(", ")
    };
    match KNOWN_BACKENDS.iter().find(|b| b.name == requested) {
        Some(known) if compiled.contains(&known.name) => Ok(*known),
        Some(known) => Err(Error::config(
            source,
            format!(
                "backend {:?} is not compiled in; enable the Cargo feature \"{}\" of helix-messaging (compiled-in backends: {compiled_list})",
                known.name, known.feature
            ),
        )),
        None => {
            let known: Vec<String> = KNOWN_BACKENDS
                .iter()
                .map(|b| format!("{} (feature \"{}\")", b.name, b.feature))
                .collect();
            Err(Error::config(
                source,
                format!(
                    "unknown backend {requested:?}; compiled-in backends: {compiled_list}; all backends: {}",
                    known.join(", ")
                ),
            ))
        }
    }
}

/// A compiled-in backend with its settings read, not yet connected.
#[derive(Clone)]
pub(crate) enum Configured {
    #[cfg(feature = "memory")]
    Memory,
    #[cfg(feature = "redis")]
    Redis(helix_messaging_redis::RedisConfig),
    #[cfg(feature = "rabbitmq")]
    RabbitMq(helix_messaging_rabbitmq::RabbitConfig),
    #[cfg(feature = "kafka")]
    Kafka(helix_messaging_kafka::KafkaConfig),
}

impl Configured {
    /// Read `backend`'s settings through `lookup`, or from `url` when given (from
    /// [`crate::connect`]).
    pub(crate) fn read(
        backend: BackendInfo,
        lookup: &(impl Fn(&str) -> Option<String> + ?Sized),
        url: Option<&str>,
    ) -> Result<Self> {
        let _ = (lookup, url);
        match backend.name {
            #[cfg(feature = "memory")]
            "memory" => Ok(Configured::Memory),
            #[cfg(feature = "redis")]
            "redis" | "redis-streams" => {
                use helix_messaging_redis::{RedisConfig, RedisMode};
                let mode = if backend.name == "redis" {
                    RedisMode::PubSub
                } else {
                    RedisMode::Streams
                };
                Ok(Configured::Redis(match url {
                    Some(url) => RedisConfig::new(url, mode)?,
                    None => RedisConfig::from_vars(lookup, mode)?,
                }))
            }
            #[cfg(feature = "rabbitmq")]
            "rabbitmq" => {
                use helix_messaging_rabbitmq::RabbitConfig;
                Ok(Configured::RabbitMq(match url {
                    Some(url) => RabbitConfig::new(url)?,
                    None => RabbitConfig::from_vars(lookup)?,
                }))
            }
            #[cfg(feature = "kafka")]
            "kafka" => {
                use helix_messaging_kafka::KafkaConfig;
                let mut config = KafkaConfig::from_vars(lookup)?;
                // kafka://host:9092[,host:9092…]: the part after the scheme is the broker list.
                if let Some(url) = url {
                    config.brokers = url
                        .split_once("://")
                        .map_or(url, |(_, rest)| rest)
                        .trim_end_matches('/')
                        .to_owned();
                }
                Ok(Configured::Kafka(config))
            }
            other => Err(Error::config(
                "MESSAGING_BACKEND",
                format!("backend {other:?} is not compiled in"),
            )),
        }
    }

    /// Connect now.
    pub(crate) async fn connect(self) -> Result<Arc<dyn Broker>> {
        match self {
            #[cfg(feature = "memory")]
            Configured::Memory => Ok(Arc::new(helix_messaging_memory::MemoryBroker::new())),
            #[cfg(feature = "redis")]
            Configured::Redis(config) => Ok(Arc::new(
                helix_messaging_redis::RedisBroker::connect(config).await?,
            )),
            #[cfg(feature = "rabbitmq")]
            Configured::RabbitMq(config) => Ok(Arc::new(
                helix_messaging_rabbitmq::RabbitBroker::connect(config).await?,
            )),
            #[cfg(feature = "kafka")]
            Configured::Kafka(config) => Ok(Arc::new(
                helix_messaging_kafka::KafkaBroker::connect(config).await?,
            )),
        }
    }

    /// Connect in the background ([`LazyBroker`]): the broker is returned at once and
    /// fails its operations with connection errors until connected. The memory broker,
    /// which has nothing to reach, is connected at once.
    // With no networked backend compiled in (memory alone, or nothing), every arm returns
    // and the lazy path is unreachable.
    #[cfg_attr(
        not(any(feature = "redis", feature = "rabbitmq", feature = "kafka")),
        allow(unreachable_code, unused_variables)
    )]
    pub(crate) async fn connect_in_background(self, name: &'static str) -> Result<Arc<dyn Broker>> {
        let capabilities = match self.clone() {
            #[cfg(feature = "memory")]
            Configured::Memory => return self.connect().await,
            #[cfg(feature = "redis")]
            Configured::Redis(config) => config.capabilities(),
            #[cfg(feature = "rabbitmq")]
            Configured::RabbitMq(config) => config.capabilities(),
            #[cfg(feature = "kafka")]
            Configured::Kafka(config) => config.capabilities(),
        };
        Ok(Arc::new(LazyBroker::new(
            name,
            capabilities,
            ConnectRetry::default(),
            move || self.clone().connect(),
        )))
    }
}

/// Build a compiled-in backend, reading its variables through `lookup`, or from `url` when
/// given (from [`crate::connect`]).
pub(crate) async fn build(
    backend: BackendInfo,
    lookup: &(impl Fn(&str) -> Option<String> + ?Sized),
    url: Option<&str>,
) -> Result<Arc<dyn Broker>> {
    Configured::read(backend, lookup, url)?.connect().await
}

/// Map a URL to the backend its scheme selects and the URL the backend's client reads
/// (`redis-streams://` becomes `redis://` for the Streams mode of the Redis backend).
pub(crate) fn from_url(url: &str) -> Result<(BackendInfo, String)> {
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(Error::config(
            "url",
            "no scheme; expected something like memory://, redis://host:6379, redis-streams://host:6379, amqp://host:5672 or kafka://host:9092",
        ));
    };
    let scheme = scheme.to_ascii_lowercase();
    let (backend, client_scheme) = match scheme.as_str() {
        "redis" | "rediss" => ("redis", scheme.clone()),
        "redis-streams" => ("redis-streams", "redis".to_owned()),
        "rediss-streams" => ("redis-streams", "rediss".to_owned()),
        "amqp" | "amqps" => ("rabbitmq", scheme.clone()),
        "kafka" => ("kafka", scheme.clone()),
        other => (other, other.to_owned()),
    };
    let backend = resolve(backend, "url scheme")?;
    Ok((backend, format!("{client_scheme}://{rest}")))
}
