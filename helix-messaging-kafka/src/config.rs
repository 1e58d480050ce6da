//! Configuration from code or from HelixAgent's variables. Secrets (the SASL password and any
//! passed-through property that looks like one) never appear in `Debug`, logs or errors.

use helix_messaging_core::settings::paired_files;
use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use helix_messaging_core::{Capabilities, Error, Result};
use rdkafka::ClientConfig;

/// Largest payload accepted by default: 4 MiB. Topics this backend creates allow records of
/// this size plus room for headers; Kafka's own default (1 MB) would refuse a 1 MiB payload.
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 4 * 1024 * 1024;

/// Backend name reported by [`Broker::name`](helix_messaging_core::Broker::name) and selected
/// by `MESSAGING_BACKEND=kafka`.
pub const NAME: &str = "kafka";

/// What the Kafka backend promises.
pub const CAPABILITIES: Capabilities = Capabilities {
    metadata: true,
    durable: true,
    redelivery: true,
    consumer_groups: true,
    per_key_ordering: true,
    // Partitions are logs: there is no reordering by priority.
    priority: false,
    // Enforced when a message is read: an expired one is skipped.
    ttl: true,
    // A dropped subscription leaves its group, and its partitions resume from the committed
    // offset, which never passes an unsettled message.
    redeliver_unacked: true,
    replay_by_time: true,
    native_dlq: false,
    // Named groups: copies wait on the group's retry topic (see the `reader` module).
    delayed_requeue: true,
    backlog: true,
    max_payload_bytes: Some(DEFAULT_MAX_PAYLOAD_BYTES),
};

/// Room for key and headers on top of the payload in a record.
const RECORD_OVERHEAD_BYTES: usize = 64 * 1024;

/// Producer compression codec (`compression.type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// No compression (default).
    #[default]
    None,
    /// gzip.
    Gzip,
    /// Snappy.
    Snappy,
    /// LZ4.
    Lz4,
}

impl Compression {
    fn as_str(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Snappy => "snappy",
            Compression::Lz4 => "lz4",
        }
    }
}

/// Settings of the Kafka backend.
#[derive(Clone)]
pub struct KafkaConfig {
    /// Bootstrap servers, comma-separated `host:port` (`KAFKA_BROKERS`, default
    /// `localhost:9092`).
    pub brokers: String,
    /// Prepended to every topic name with a dot: topic `events` is Kafka topic
    /// `helixagent.events` with prefix `helixagent` (`KAFKA_TOPIC_PREFIX`, default none).
    pub topic_prefix: Option<String>,
    /// HelixAgent's default consumer group (`KAFKA_CONSUMER_GROUP`, default
    /// `helixagent-workers`), for `SubscribeOptions::group(config.default_group())`. A
    /// subscription that names no group gets a private group of its own, as on every backend.
    pub consumer_group: String,
    /// `client.id` (`KAFKA_CLIENT_ID`, default `helix-messaging`).
    pub client_id: String,
    /// Most messages per produce batch (`batch.num.messages`; `KAFKA_BATCH_SIZE`, default
    /// 10,000 as librdkafka).
    pub batch_size: u32,
    /// How long the producer waits to fill a batch (`linger.ms`; `KAFKA_LINGER_MS`, default
    /// 5 ms as librdkafka).
    pub linger: Duration,
    /// Compression codec (`KAFKA_COMPRESSION`: none, gzip, snappy, lz4).
    pub compression: Compression,
    /// `security.protocol` (`KAFKA_SECURITY_PROTOCOL`: plaintext, ssl, sasl_plaintext,
    /// sasl_ssl; default plaintext).
    pub security_protocol: String,
    /// `sasl.mechanism` (`KAFKA_SASL_MECHANISM`, e.g. `SCRAM-SHA-512` as in HelixAgent).
    pub sasl_mechanism: Option<String>,
    /// `sasl.username` (`KAFKA_SASL_USERNAME`).
    pub sasl_username: Option<String>,
    sasl_password: Option<String>,
    /// `ssl.ca.location`: PEM file of the CA that signed the brokers' certificates
    /// (`KAFKA_SSL_CA_LOCATION`).
    pub ssl_ca_location: Option<String>,
    /// `ssl.certificate.location` and `ssl.key.location`: PEM files of the client
    /// certificate and its key, for brokers that require one (`ssl.client.auth=required`;
    /// `KAFKA_SSL_CERTIFICATE_LOCATION`, `KAFKA_SSL_KEY_LOCATION`, both or neither).
    pub ssl_client: Option<(String, String)>,
    /// Any other librdkafka property, applied last (so it wins). Values of keys containing
    /// `password`, `secret` or `key` are redacted in `Debug`.
    pub properties: BTreeMap<String, String>,
    /// Partitions of topics created on first use that HelixAgent's topic tables
    /// ([`KafkaTopic::helixagent`](crate::KafkaTopic::helixagent)) do not list. Default 3.
    pub default_partitions: i32,
    /// Replication factor of topics the adapter creates (`KAFKA_REPLICATION_FACTOR`). `None`
    /// (default) leaves it to the brokers' `default.replication.factor`, so a production
    /// cluster's own durability setting applies (HelixAgent's clusters use 3).
    pub replication_factor: Option<i32>,
    /// `min.insync.replicas` of topics the adapter creates (`KAFKA_MIN_INSYNC_REPLICAS`):
    /// with the producer's `acks=all`, a publish succeeds only once this many replicas
    /// have it. `None` (default) leaves it to the brokers' own setting.
    pub min_insync_replicas: Option<i32>,
    /// Largest payload accepted, in bytes. Default [`DEFAULT_MAX_PAYLOAD_BYTES`].
    pub max_payload_bytes: usize,
    /// Longest wait for a publish's delivery report (`message.timeout.ms`; the producer retries
    /// within it). Default 30 s.
    pub publish_timeout: Duration,
    /// Longest wait for metadata, topic creation, offset lookups and commits. Default 10 s.
    pub request_timeout: Duration,
    /// `fetch.wait.max.ms`: how long a fetch waits for data. Default 100 ms (librdkafka's
    /// 500 ms adds that much latency to an idle topic).
    pub fetch_wait_max: Duration,
    /// `session.timeout.ms`: a member silent this long leaves its group
    /// (`KAFKA_SESSION_TIMEOUT_MS`). Default 45 s.
    pub session_timeout: Duration,
    /// `heartbeat.interval.ms` (`KAFKA_HEARTBEAT_INTERVAL_MS`); below the session timeout.
    /// Default 3 s.
    pub heartbeat_interval: Duration,
    /// Most records a subscription holds unsettled (handed out and buffered), when its
    /// options keep the default prefetch (`KAFKA_MAX_POLL_RECORDS`, default 100).
    ///
    /// librdkafka has no `max.poll.records`: its consumer returns one record per poll and
    /// prefetches by bytes. What the Java setting bounds, how much a consumer takes on
    /// before it asks for more, is here the subscription's prefetch window: the reader
    /// pauses fetching once this many records are out or buffered, and resumes as they are
    /// settled.
    pub max_poll_records: usize,
    /// Largest difference expected between publishers' clocks and the brokers': a read by
    /// time starts this much earlier and filters on the records' timestamps. Default 5 s.
    pub clock_skew: Duration,
    /// When a subscription ends, how long deliveries still out may take to be settled before
    /// the consumer commits and leaves its group. Default 5 s.
    pub shutdown_grace: Duration,
    /// `statistics.interval.ms`: how often each client reads librdkafka's statistics, from
    /// which broker connections lost and re-established are counted in
    /// `messaging_reconnects_total` (so also how late a reconnect may be counted). Default
    /// 5 s; zero turns the statistics, and the count, off.
    pub statistics_interval: Duration,
}

impl KafkaConfig {
    /// What a broker connected with these settings promises (its
    /// [`Broker::capabilities`](helix_messaging_core::Broker::capabilities)), known before
    /// connecting.
    pub fn capabilities(&self) -> helix_messaging_core::Capabilities {
        helix_messaging_core::Capabilities {
            max_payload_bytes: Some(self.max_payload_bytes),
            ..CAPABILITIES
        }
    }

    /// Settings for the cluster at `brokers`, defaults otherwise.
    pub fn new(brokers: impl Into<String>) -> Self {
        KafkaConfig {
            brokers: brokers.into(),
            topic_prefix: None,
            consumer_group: "helixagent-workers".to_owned(),
            client_id: "helix-messaging".to_owned(),
            batch_size: 10_000,
            linger: Duration::from_millis(5),
            compression: Compression::None,
            security_protocol: "plaintext".to_owned(),
            sasl_mechanism: None,
            sasl_username: None,
            sasl_password: None,
            ssl_ca_location: None,
            ssl_client: None,
            properties: BTreeMap::new(),
            default_partitions: 3,
            replication_factor: None,
            min_insync_replicas: None,
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
            publish_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(10),
            fetch_wait_max: Duration::from_millis(100),
            session_timeout: Duration::from_secs(45),
            heartbeat_interval: Duration::from_secs(3),
            max_poll_records: helix_messaging_core::DEFAULT_PREFETCH,
            clock_skew: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(5),
            statistics_interval: Duration::from_secs(5),
        }
    }

    /// Settings from the process environment; see [`KafkaConfig::from_vars`].
    ///
    /// # Errors
    /// As [`KafkaConfig::from_vars`].
    pub fn from_env() -> Result<Self> {
        KafkaConfig::from_vars(|name| std::env::var(name).ok())
    }

    /// Settings from variables read through `lookup`: `KAFKA_BROKERS`, `KAFKA_TOPIC_PREFIX`,
    /// `KAFKA_CONSUMER_GROUP` (HelixAgent's), plus `KAFKA_CLIENT_ID`, `KAFKA_BATCH_SIZE`,
    /// `KAFKA_LINGER_MS`, `KAFKA_COMPRESSION`, `KAFKA_SECURITY_PROTOCOL`,
    /// `KAFKA_SASL_MECHANISM`, `KAFKA_SASL_USERNAME`, `KAFKA_SASL_PASSWORD`,
    /// `KAFKA_SSL_CA_LOCATION`, `KAFKA_SSL_CERTIFICATE_LOCATION`, `KAFKA_SSL_KEY_LOCATION`,
    /// `KAFKA_REPLICATION_FACTOR`, `KAFKA_MIN_INSYNC_REPLICAS`,
    /// `KAFKA_SESSION_TIMEOUT_MS`, `KAFKA_HEARTBEAT_INTERVAL_MS`, `KAFKA_MAX_POLL_RECORDS`.
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
        let mut config =
            KafkaConfig::new(var("KAFKA_BROKERS").unwrap_or_else(|| "localhost:9092".into()));
        if config.brokers.split(',').any(|b| b.trim().is_empty()) {
            return Err(Error::config(
                "KAFKA_BROKERS",
                "expected comma-separated host:port pairs with none empty",
            ));
        }
        config.topic_prefix = var("KAFKA_TOPIC_PREFIX");
        if let Some(group) = var("KAFKA_CONSUMER_GROUP") {
            config.consumer_group = group;
        }
        if let Some(id) = var("KAFKA_CLIENT_ID") {
            config.client_id = id;
        }
        if let Some(size) = var("KAFKA_BATCH_SIZE") {
            config.batch_size = size.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
                Error::config(
                    "KAFKA_BATCH_SIZE",
                    format!("expected a whole number of messages above 0, got {size:?}"),
                )
            })?;
        }
        if let Some(linger) = var("KAFKA_LINGER_MS") {
            config.linger = Duration::from_millis(linger.parse().map_err(|_| {
                Error::config(
                    "KAFKA_LINGER_MS",
                    format!("expected a whole number of milliseconds, got {linger:?}"),
                )
            })?);
        }
        if let Some(codec) = var("KAFKA_COMPRESSION") {
            config.compression = match codec.to_ascii_lowercase().as_str() {
                "none" => Compression::None,
                "gzip" => Compression::Gzip,
                "snappy" => Compression::Snappy,
                "lz4" => Compression::Lz4,
                _ => {
                    return Err(Error::config(
                        "KAFKA_COMPRESSION",
                        format!("expected none, gzip, snappy or lz4, got {codec:?}"),
                    ));
                }
            };
        }
        if let Some(protocol) = var("KAFKA_SECURITY_PROTOCOL") {
            let lower = protocol.to_ascii_lowercase();
            if !["plaintext", "ssl", "sasl_plaintext", "sasl_ssl"].contains(&lower.as_str()) {
                return Err(Error::config(
                    "KAFKA_SECURITY_PROTOCOL",
                    format!(
                        "expected plaintext, ssl, sasl_plaintext or sasl_ssl, got {protocol:?}"
                    ),
                ));
            }
            config.security_protocol = lower;
        }
        config.sasl_mechanism = var("KAFKA_SASL_MECHANISM");
        config.sasl_username = var("KAFKA_SASL_USERNAME");
        config.sasl_password = var("KAFKA_SASL_PASSWORD");
        config.ssl_ca_location = var("KAFKA_SSL_CA_LOCATION");
        config.ssl_client = paired_files(
            var,
            "KAFKA_SSL_CERTIFICATE_LOCATION",
            "KAFKA_SSL_KEY_LOCATION",
        )?;
        if let Some(factor) = var("KAFKA_REPLICATION_FACTOR") {
            config.replication_factor = match factor.as_str() {
                "default" => None,
                n => Some(n.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
                    Error::config(
                        "KAFKA_REPLICATION_FACTOR",
                        format!(
                            "expected a whole number above 0, or `default` for the brokers' own, got {factor:?}"
                        ),
                    )
                })?),
            };
        }
        if let Some(ms) = var("KAFKA_SESSION_TIMEOUT_MS") {
            config.session_timeout = positive_ms("KAFKA_SESSION_TIMEOUT_MS", &ms)?;
        }
        if let Some(ms) = var("KAFKA_HEARTBEAT_INTERVAL_MS") {
            config.heartbeat_interval = positive_ms("KAFKA_HEARTBEAT_INTERVAL_MS", &ms)?;
        }
        // librdkafka refuses this only when a consumer is created, far from the variables.
        if config.heartbeat_interval >= config.session_timeout {
            return Err(Error::config(
                "KAFKA_HEARTBEAT_INTERVAL_MS",
                format!(
                    "must be below the session timeout ({} ms), got {} ms",
                    config.session_timeout.as_millis(),
                    config.heartbeat_interval.as_millis()
                ),
            ));
        }
        if let Some(records) = var("KAFKA_MAX_POLL_RECORDS") {
            config.max_poll_records = records.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
                Error::config(
                    "KAFKA_MAX_POLL_RECORDS",
                    format!("expected a whole number of records above 0, got {records:?}"),
                )
            })?;
        }
        if let Some(replicas) = var("KAFKA_MIN_INSYNC_REPLICAS") {
            config.min_insync_replicas =
                Some(replicas.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
                    Error::config(
                        "KAFKA_MIN_INSYNC_REPLICAS",
                        format!("expected a whole number of replicas above 0, got {replicas:?}"),
                    )
                })?);
        }
        Ok(config)
    }

    /// Set the SASL password (kept out of `Debug`).
    #[must_use]
    pub fn with_sasl_password(mut self, password: impl Into<String>) -> Self {
        self.sasl_password = Some(password.into());
        self
    }

    /// The group named by `KAFKA_CONSUMER_GROUP`, for applications that subscribe with the
    /// HelixAgent's default group.
    pub fn default_group(&self) -> &str {
        &self.consumer_group
    }

    /// The Kafka topic for `topic`.
    pub fn kafka_topic(&self, topic: &str) -> String {
        self.kafka_topic_ref(topic).into_owned()
    }

    /// [`KafkaConfig::kafka_topic`] without a copy when there is no prefix (every publish
    /// names its topic).
    pub(crate) fn kafka_topic_ref<'a>(&self, topic: &'a str) -> std::borrow::Cow<'a, str> {
        match &self.topic_prefix {
            Some(prefix) => std::borrow::Cow::Owned(format!("{prefix}.{topic}")),
            None => std::borrow::Cow::Borrowed(topic),
        }
    }

    /// The largest record the producer sends and topics this backend creates accept.
    pub(crate) fn max_record_bytes(&self) -> usize {
        self.max_payload_bytes + RECORD_OVERHEAD_BYTES
    }

    /// Properties every client shares: servers, identity, security, then the pass-through.
    fn common(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers)
            .set("client.id", &self.client_id)
            .set("security.protocol", &self.security_protocol);
        if let Some(mechanism) = &self.sasl_mechanism {
            c.set("sasl.mechanism", mechanism);
        }
        if let Some(user) = &self.sasl_username {
            c.set("sasl.username", user);
        }
        if let Some(password) = &self.sasl_password {
            c.set("sasl.password", password);
        }
        if let Some(ca) = &self.ssl_ca_location {
            c.set("ssl.ca.location", ca);
        }
        if let Some((cert, key)) = &self.ssl_client {
            c.set("ssl.certificate.location", cert)
                .set("ssl.key.location", key);
        }
        if !self.statistics_interval.is_zero() {
            c.set(
                "statistics.interval.ms",
                self.statistics_interval.as_millis().to_string(),
            );
        }
        c
    }

    fn finish(&self, mut c: ClientConfig) -> ClientConfig {
        for (key, value) in &self.properties {
            c.set(key, value);
        }
        c
    }

    /// The producer's properties: acks from every in-sync replica, idempotence (no duplicates
    /// or reordering from the producer's own retries), retries within the publish timeout.
    pub(crate) fn producer(&self) -> ClientConfig {
        let mut c = self.common();
        c.set("acks", "all")
            .set("enable.idempotence", "true")
            .set("message.timeout.ms", millis(self.publish_timeout))
            .set("linger.ms", millis(self.linger))
            .set("batch.num.messages", self.batch_size.to_string())
            .set("compression.type", self.compression.as_str())
            .set("message.max.bytes", self.max_record_bytes().to_string());
        self.finish(c)
    }

    /// A group consumer's properties: offsets are stored by the adapter (only up to what is
    /// settled) and committed by librdkafka in the background and on revoke and close.
    pub(crate) fn consumer(&self, group: &str) -> ClientConfig {
        let mut c = self.common();
        c.set("group.id", group)
            .set("enable.auto.commit", "true")
            .set("auto.commit.interval.ms", "1000")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false")
            .set("fetch.wait.max.ms", millis(self.fetch_wait_max))
            .set("session.timeout.ms", millis(self.session_timeout))
            .set("heartbeat.interval.ms", millis(self.heartbeat_interval))
            .set(
                "fetch.message.max.bytes",
                self.max_record_bytes().to_string(),
            );
        self.finish(c)
    }

    /// A reader without a group (history reads): assigns partitions itself, commits nothing.
    pub(crate) fn reader(&self) -> ClientConfig {
        let mut c = self.common();
        c.set(
            "group.id",
            format!("helix-reader-{}", uuid::Uuid::new_v4().simple()),
        )
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        // Each partition has its own queue in a history read, and this bounds each: a read
        // holds at most this much per partition however long the window.
        .set(
            "queued.max.messages.kbytes",
            (self.max_record_bytes() / 1024 + 1).max(4096).to_string(),
        )
        .set("queued.min.messages", "10000")
        .set("fetch.wait.max.ms", millis(self.fetch_wait_max))
        .set(
            "fetch.message.max.bytes",
            self.max_record_bytes().to_string(),
        );
        self.finish(c)
    }

    /// The admin client's properties. Its metadata requests never create topics: topics are
    /// created with this backend's partitions and limits, not the broker's defaults.
    pub(crate) fn admin(&self) -> ClientConfig {
        let mut c = self.common();
        c.set("allow.auto.create.topics", "false");
        self.finish(c)
    }
}

/// A positive number of milliseconds from `variable`.
fn positive_ms(variable: &str, value: &str) -> Result<Duration> {
    value
        .parse::<u64>()
        .ok()
        .filter(|ms| *ms > 0)
        .map(Duration::from_millis)
        .ok_or_else(|| {
            Error::config(
                variable,
                format!("expected a whole number of milliseconds above 0, got {value:?}"),
            )
        })
}

fn millis(d: Duration) -> String {
    d.as_millis().to_string()
}

impl KafkaConfig {
    /// Every value of this configuration that must never be shown: the SASL password and
    /// the values of secret-like properties.
    fn secret_values(&self) -> impl Iterator<Item = &str> {
        self.sasl_password
            .as_deref()
            .into_iter()
            .chain(
                self.properties
                    .iter()
                    .filter(|(k, _)| secret(k))
                    .map(|(_, v)| v.as_str()),
            )
            .filter(|v| !v.is_empty())
    }

    /// An error librdkafka reported while a client was created from this configuration.
    /// librdkafka echoes the offending property's value (`... sasl.oauthbearer.client.secret
    /// <value>`), so the text is rebuilt with every secret value redacted, and the original
    /// error is not kept as the source (its text is the unredacted one).
    pub(crate) fn client_error(&self, err: rdkafka::error::KafkaError, doing: &str) -> Error {
        let mut text = match &err {
            rdkafka::error::KafkaError::ClientConfig(_, description, key, _value) => {
                format!("invalid Kafka client property {key}: {description}")
            }
            other => other.to_string(),
        };
        for value in self.secret_values() {
            text = text.replace(value, "<redacted>");
        }
        Error::new(
            helix_messaging_core::ErrorKind::Config,
            format!("{doing}: {text}"),
        )
    }
}

/// Whether a property's value must not be shown.
fn secret(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    ["password", "secret", "key"]
        .iter()
        .any(|s| key.contains(s))
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let properties: BTreeMap<&str, &str> = self
            .properties
            .iter()
            .map(|(k, v)| {
                let shown = if secret(k) { "<redacted>" } else { v.as_str() };
                (k.as_str(), shown)
            })
            .collect();
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("topic_prefix", &self.topic_prefix)
            .field("consumer_group", &self.consumer_group)
            .field("client_id", &self.client_id)
            .field("batch_size", &self.batch_size)
            .field("linger", &self.linger)
            .field("compression", &self.compression)
            .field("security_protocol", &self.security_protocol)
            .field("sasl_mechanism", &self.sasl_mechanism)
            .field("sasl_username", &self.sasl_username)
            .field(
                "sasl_password",
                &self.sasl_password.as_ref().map(|_| "<redacted>"),
            )
            .field("ssl_ca_location", &self.ssl_ca_location)
            .field("ssl_client", &self.ssl_client)
            .field("properties", &properties)
            .field("default_partitions", &self.default_partitions)
            .field("replication_factor", &self.replication_factor)
            .field("min_insync_replicas", &self.min_insync_replicas)
            .field("max_payload_bytes", &self.max_payload_bytes)
            .field("publish_timeout", &self.publish_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("fetch_wait_max", &self.fetch_wait_max)
            .field("session_timeout", &self.session_timeout)
            .field("heartbeat_interval", &self.heartbeat_interval)
            .field("max_poll_records", &self.max_poll_records)
            .field("clock_skew", &self.clock_skew)
            .field("shutdown_grace", &self.shutdown_grace)
            .field("statistics_interval", &self.statistics_interval)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use helix_messaging_core::ErrorKind;
    use helix_messaging_testkit::env_lookup as vars;

    #[test]
    fn seed_variables_and_tuning_are_read() {
        let config = KafkaConfig::from_vars(vars(&[
            ("KAFKA_BROKERS", "k1:9092,k2:9092"),
            ("KAFKA_TOPIC_PREFIX", "helixagent"),
            ("KAFKA_CONSUMER_GROUP", "analytics-workers"),
            ("KAFKA_BATCH_SIZE", "100"),
            ("KAFKA_LINGER_MS", "10"),
            ("KAFKA_COMPRESSION", "LZ4"),
            ("KAFKA_SECURITY_PROTOCOL", "SASL_SSL"),
            ("KAFKA_SASL_MECHANISM", "SCRAM-SHA-512"),
            ("KAFKA_SASL_USERNAME", "helixagent"),
            ("KAFKA_SASL_PASSWORD", "s3cr3t-pw"),
        ]))
        .unwrap();
        assert_eq!(config.brokers, "k1:9092,k2:9092");
        assert_eq!(config.kafka_topic("tasks"), "helixagent.tasks");
        assert_eq!(config.default_group(), "analytics-workers");
        assert_eq!(config.batch_size, 100);
        assert_eq!(config.linger, Duration::from_millis(10));
        assert_eq!(config.compression, Compression::Lz4);
        assert_eq!(config.security_protocol, "sasl_ssl");
        let producer = config.producer();
        assert_eq!(producer.get("acks"), Some("all"));
        assert_eq!(producer.get("enable.idempotence"), Some("true"));
        assert_eq!(producer.get("sasl.password"), Some("s3cr3t-pw"));
        assert_eq!(producer.get("batch.num.messages"), Some("100"));
        let defaults = KafkaConfig::from_vars(vars(&[])).unwrap();
        assert_eq!(defaults.brokers, "localhost:9092");
        assert_eq!(defaults.kafka_topic("tasks"), "tasks");
        assert_eq!(defaults.default_group(), "helixagent-workers");
    }

    #[test]
    fn secrets_never_show() {
        let mut config = KafkaConfig::new("k:9092").with_sasl_password("s3cr3t-pw");
        config
            .properties
            .insert("ssl.key.password".into(), "k3y-pw".into());
        config
            .properties
            .insert("socket.keepalive.enable".into(), "true".into());
        let shown = format!("{config:?}");
        assert!(
            !shown.contains("s3cr3t-pw") && !shown.contains("k3y-pw"),
            "{shown}"
        );
        assert!(shown.contains("socket.keepalive.enable"), "{shown}");
    }

    #[test]
    fn malformed_variables_are_named() {
        for (pairs, variable) in [
            (vec![("KAFKA_BROKERS", "a:1,,b:2")], "KAFKA_BROKERS"),
            (vec![("KAFKA_BATCH_SIZE", "0")], "KAFKA_BATCH_SIZE"),
            (vec![("KAFKA_LINGER_MS", "soon")], "KAFKA_LINGER_MS"),
            (vec![("KAFKA_COMPRESSION", "brotli")], "KAFKA_COMPRESSION"),
            (
                vec![("KAFKA_SECURITY_PROTOCOL", "tls")],
                "KAFKA_SECURITY_PROTOCOL",
            ),
            (
                vec![("KAFKA_REPLICATION_FACTOR", "0")],
                "KAFKA_REPLICATION_FACTOR",
            ),
            (
                vec![("KAFKA_SESSION_TIMEOUT_MS", "30s")],
                "KAFKA_SESSION_TIMEOUT_MS",
            ),
            (
                vec![("KAFKA_HEARTBEAT_INTERVAL_MS", "0")],
                "KAFKA_HEARTBEAT_INTERVAL_MS",
            ),
            (
                vec![("KAFKA_MAX_POLL_RECORDS", "0")],
                "KAFKA_MAX_POLL_RECORDS",
            ),
            (
                vec![("KAFKA_MIN_INSYNC_REPLICAS", "none")],
                "KAFKA_MIN_INSYNC_REPLICAS",
            ),
            // librdkafka refuses a heartbeat not below the session timeout when the consumer
            // is created; the variables are checked against each other here instead.
            (
                vec![
                    ("KAFKA_SESSION_TIMEOUT_MS", "3000"),
                    ("KAFKA_HEARTBEAT_INTERVAL_MS", "3000"),
                ],
                "KAFKA_HEARTBEAT_INTERVAL_MS",
            ),
        ] {
            let err = KafkaConfig::from_vars(vars(&pairs)).expect_err(variable);
            assert_eq!(err.kind(), ErrorKind::Config);
            assert!(err.to_string().contains(variable), "{err}");
        }
    }

    #[test]
    fn group_timings_poll_bound_and_min_insync_replicas_are_read() {
        let config = KafkaConfig::from_vars(vars(&[
            ("KAFKA_SESSION_TIMEOUT_MS", "30000"),
            ("KAFKA_HEARTBEAT_INTERVAL_MS", "10000"),
            ("KAFKA_MAX_POLL_RECORDS", "500"),
            ("KAFKA_MIN_INSYNC_REPLICAS", "2"),
        ]))
        .unwrap();
        assert_eq!(config.session_timeout, Duration::from_secs(30));
        assert_eq!(config.heartbeat_interval, Duration::from_secs(10));
        assert_eq!(config.max_poll_records, 500);
        assert_eq!(config.min_insync_replicas, Some(2));
        let consumer = config.consumer("g");
        assert_eq!(consumer.get("session.timeout.ms"), Some("30000"));
        assert_eq!(consumer.get("heartbeat.interval.ms"), Some("10000"));
        let defaults = KafkaConfig::from_vars(vars(&[])).unwrap();
        assert_eq!(defaults.session_timeout, Duration::from_secs(45));
        assert_eq!(defaults.heartbeat_interval, Duration::from_secs(3));
        assert_eq!(
            defaults.max_poll_records,
            helix_messaging_core::DEFAULT_PREFETCH
        );
        assert_eq!(defaults.min_insync_replicas, None);
    }

    #[test]
    fn replication_factor_defaults_to_the_brokers_own() {
        assert_eq!(KafkaConfig::new("k:9092").replication_factor, None);
        let three = KafkaConfig::from_vars(vars(&[("KAFKA_REPLICATION_FACTOR", "3")])).unwrap();
        assert_eq!(three.replication_factor, Some(3));
        let default =
            KafkaConfig::from_vars(vars(&[("KAFKA_REPLICATION_FACTOR", "default")])).unwrap();
        assert_eq!(default.replication_factor, None);
    }
}
