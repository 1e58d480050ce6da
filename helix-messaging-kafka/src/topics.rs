//! Topics: created on first use or from a declared list, plus HelixAgent's topic table.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use helix_messaging_core::{Error, ErrorKind, Result};
use parking_lot::Mutex;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::RDKafkaErrorCode;

use crate::config::KafkaConfig;
use crate::error::{blocking, from_kafka};

/// A topic to create, with its partitions and retention.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaTopic {
    /// Its name as the application uses it (the topic prefix is added).
    pub name: String,
    /// Number of partitions.
    pub partitions: i32,
    /// `retention.ms`: records older than this are deleted. `None` keeps the broker default.
    pub retention: Option<Duration>,
}

impl KafkaTopic {
    /// A topic named `name` with `partitions` partitions and the broker's retention.
    pub fn new(name: impl Into<String>, partitions: i32) -> Self {
        KafkaTopic {
            name: name.into(),
            partitions,
            retention: None,
        }
    }

    /// Set the retention.
    #[must_use]
    pub fn retention(mut self, retention: Duration) -> Self {
        self.retention = Some(retention);
        self
    }

    /// HelixAgent's topic table (full names, for a configuration without a topic prefix):
    ///
    /// | topic | partitions | retention |
    /// |---|---|---|
    /// | `helixagent.events.llm.responses` | 6 | 7 days |
    /// | `helixagent.events.debate.rounds` | 6 | 7 days |
    /// | `helixagent.events.verification.results` | 3 | 30 days |
    /// | `helixagent.events.provider.health` | 3 | 1 day |
    /// | `helixagent.events.audit` | 6 | 90 days |
    /// | `helixagent.events.metrics` | 3 | 1 day |
    /// | `helixagent.events.errors` | 3 | 30 days |
    /// | `helixagent.stream.tokens` | 12 | 1 hour |
    /// | `helixagent.dlq.tasks` | 3 | 30 days |
    /// | `helixagent.dlq.events` | 3 | 30 days |
    pub fn helixagent() -> Vec<KafkaTopic> {
        const HOUR: u64 = 3600;
        const DAY: u64 = 24 * HOUR;
        [
            ("helixagent.events.llm.responses", 6, 7 * DAY),
            ("helixagent.events.debate.rounds", 6, 7 * DAY),
            ("helixagent.events.verification.results", 3, 30 * DAY),
            ("helixagent.events.provider.health", 3, DAY),
            ("helixagent.events.audit", 6, 90 * DAY),
            ("helixagent.events.metrics", 3, DAY),
            ("helixagent.events.errors", 3, 30 * DAY),
            ("helixagent.stream.tokens", 12, HOUR),
            ("helixagent.dlq.tasks", 3, 30 * DAY),
            ("helixagent.dlq.events", 3, 30 * DAY),
        ]
        .into_iter()
        .map(|(name, partitions, secs)| {
            KafkaTopic::new(name, partitions).retention(Duration::from_secs(secs))
        })
        .collect()
    }

    /// The topics HelixAgent's Kafka guide says it creates itself (full names; the guide
    /// gives no retention, so the brokers' applies):
    ///
    /// | topic | partitions |
    /// |---|---|
    /// | `helixagent.tasks` | 4 |
    /// | `helixagent.events` | 8 |
    /// | `helixagent.completions` | 4 |
    /// | `helixagent.debates` | 2 |
    pub fn helixagent_auto_created() -> Vec<KafkaTopic> {
        [
            ("helixagent.tasks", 4),
            ("helixagent.events", 8),
            ("helixagent.completions", 4),
            ("helixagent.debates", 2),
        ]
        .into_iter()
        .map(|(name, partitions)| KafkaTopic::new(name, partitions))
        .collect()
    }

    /// The entry of HelixAgent's tables ([`KafkaTopic::helixagent`],
    /// [`KafkaTopic::helixagent_auto_created`]) for `name`, if they list it.
    pub fn listed(name: &str) -> Option<KafkaTopic> {
        KafkaTopic::helixagent()
            .into_iter()
            .chain(KafkaTopic::helixagent_auto_created())
            .find(|t| t.name == name)
    }
}

/// Creates topics and remembers which exist, so only a topic's first use costs a request.
pub(crate) struct Topics {
    admin: Arc<AdminClient<DefaultClientContext>>,
    /// A set ordered by name rather than hashed: every publish looks its topic up, and a
    /// few comparisons cost less than hashing the name.
    known: Mutex<BTreeSet<String>>,
}

impl Topics {
    pub(crate) fn new(config: &KafkaConfig) -> Result<Self> {
        let admin = config
            .admin()
            .create()
            .map_err(|e| config.client_error(e, "creating the Kafka admin client"))?;
        Ok(Topics {
            admin: Arc::new(admin),
            known: Mutex::default(),
        })
    }

    /// Make sure the Kafka topic `name` exists, creating it with the configured defaults.
    pub(crate) async fn ensure(&self, config: &KafkaConfig, name: &str) -> Result<()> {
        if self.known.lock().contains(name) {
            return Ok(());
        }
        // Boxed: asking the cluster (metadata, then perhaps a creation) is a large future,
        // and every publish's future would carry its size for the few that need it. At over
        // 1 KiB, a publish's future missed the allocator's per-thread cache on every call.
        Box::pin(self.learn(config, name)).await
    }

    /// [`Topics::ensure`] for a topic not known yet: find it on the cluster, or create it.
    async fn learn(&self, config: &KafkaConfig, name: &str) -> Result<()> {
        if self.exists(config, name).await? {
            self.known.lock().insert(name.to_owned());
            return Ok(());
        }
        // The tables name topics in full, as HelixAgent (prefix `helixagent`) has them; under
        // another prefix a topic the application names in full is found too.
        let unprefixed = config
            .topic_prefix
            .as_deref()
            .and_then(|prefix| name.strip_prefix(prefix)?.strip_prefix('.'));
        let topic =
            match KafkaTopic::listed(name).or_else(|| unprefixed.and_then(KafkaTopic::listed)) {
                Some(listed) => KafkaTopic {
                    name: name.to_owned(),
                    ..listed
                },
                None => KafkaTopic::new(name, config.default_partitions),
            };
        self.create(config, std::slice::from_ref(&topic)).await
    }

    /// Whether the cluster's metadata lists topic `name` (the admin client never asks the
    /// broker to create it on the way).
    pub(crate) async fn exists(&self, config: &KafkaConfig, name: &str) -> Result<bool> {
        self.listed_within(name, config.request_timeout).await
    }

    /// [`Topics::exists`], the metadata request bounded by `timeout`.
    async fn listed_within(&self, name: &str, timeout: Duration) -> Result<bool> {
        let admin = self.admin.clone();
        let topic = name.to_owned();
        blocking("reading topic metadata", move || {
            let metadata = admin
                .inner()
                .fetch_metadata(Some(&topic), timeout)
                .map_err(|e| from_kafka(e, format!("reading the metadata of {topic}")))?;
            Ok(metadata
                .topics()
                .iter()
                .any(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty()))
        })
        .await
    }

    /// Create `topics` (Kafka names); one that exists already is left as it is.
    pub(crate) async fn create(&self, config: &KafkaConfig, topics: &[KafkaTopic]) -> Result<()> {
        let max_bytes = config.max_record_bytes().to_string();
        let min_insync = config.min_insync_replicas.map(|n| n.to_string());
        let retention: Vec<Option<String>> = topics
            .iter()
            .map(|t| t.retention.map(|r| r.as_millis().to_string()))
            .collect();
        let new: Vec<NewTopic<'_>> = topics
            .iter()
            .zip(&retention)
            .map(|(t, retention)| {
                let mut topic = NewTopic::new(
                    &t.name,
                    t.partitions,
                    // -1: the brokers' `default.replication.factor`.
                    TopicReplication::Fixed(config.replication_factor.unwrap_or(-1)),
                )
                .set("max.message.bytes", &max_bytes);
                if let Some(ms) = retention {
                    topic = topic.set("retention.ms", ms);
                }
                if let Some(replicas) = &min_insync {
                    topic = topic.set("min.insync.replicas", replicas);
                }
                topic
            })
            .collect();
        let options = AdminOptions::new()
            .request_timeout(Some(config.request_timeout))
            .operation_timeout(Some(config.request_timeout));
        let results = helix_messaging_core::within(
            config.request_timeout,
            "creating topics",
            self.admin.create_topics(&new, &options),
        )
        .await?
        .map_err(|e| from_kafka(e, "creating topics"))?;
        // A topic another client is creating right now answers "already exists" too, and
        // may be as fresh as one created here: both are waited for.
        let mut created = Vec::new();
        for result in results {
            match result {
                Ok(name) | Err((name, RDKafkaErrorCode::TopicAlreadyExists)) => created.push(name),
                Err((name, code)) => {
                    return Err(Error::new(
                        ErrorKind::Rejected,
                        format!("creating topic {name:?}: {code}"),
                    ));
                }
            }
        }
        let deadline = tokio::time::Instant::now() + config.request_timeout;
        for name in created {
            self.await_metadata(&name, deadline).await;
            self.known.lock().insert(name);
        }
        Ok(())
    }

    /// Wait, until `deadline` (one for every topic of a creation), until the brokers' metadata
    /// lists the topic just created: the controller answers a creation before every broker
    /// has it, and a consumer subscribing meanwhile is told the topic does not exist (seen on
    /// a loaded machine as `UnknownTopicOrPartition` on fresh subscriptions). A topic still
    /// missing then is left to the clients' own metadata refresh.
    async fn await_metadata(&self, name: &str, deadline: tokio::time::Instant) {
        let mut pause = Duration::from_millis(10);
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                tracing::warn!(topic = name, "a created topic is not in the metadata yet");
                return;
            }
            if let Ok(true) = self.listed_within(name, left).await {
                return;
            }
            tokio::time::sleep(pause.min(left)).await;
            pause = (pause * 2).min(Duration::from_millis(200));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seed_table_has_its_partitions_and_retention() {
        let topics = KafkaTopic::helixagent();
        assert_eq!(topics.len(), 10);
        let tokens = topics
            .iter()
            .find(|t| t.name == "helixagent.stream.tokens")
            .expect("token stream");
        assert_eq!(tokens.partitions, 12);
        assert_eq!(tokens.retention, Some(Duration::from_secs(3600)));
        let audit = topics
            .iter()
            .find(|t| t.name == "helixagent.events.audit")
            .expect("audit");
        assert_eq!(audit.retention, Some(Duration::from_secs(90 * 86_400)));
    }

    #[test]
    fn both_seed_tables_are_looked_up_by_name() {
        assert_eq!(
            KafkaTopic::listed("helixagent.events").map(|t| t.partitions),
            Some(8)
        );
        assert_eq!(
            KafkaTopic::listed("helixagent.debates").map(|t| t.partitions),
            Some(2)
        );
        assert_eq!(
            KafkaTopic::listed("helixagent.dlq.tasks").map(|t| t.retention),
            Some(Some(Duration::from_secs(30 * 86_400)))
        );
        assert_eq!(KafkaTopic::listed("helixagent.unlisted"), None);
    }
}
