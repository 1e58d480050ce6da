//! The application-facing hub (HelixAgent's `messaging.NewHub`): tasks on one broker (the
//! HelixAgent puts them on RabbitMQ), events on another (Kafka), each behind a circuit breaker
//! and, with fallback on, a spool; typed task and event handlers with retry and
//! dead-lettering.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::breaker::{BreakerConfig, BreakerLayer};
use crate::broker::{Broker, GroupAddress, Health, HealthStatus};
use crate::delivery::Envelope;
use crate::dlq::{DeadLetterConfig, DeadLetterLayer, DeadLetterQueue, DeadLetterReason};
use crate::error::{Error, Result};
use crate::fallback::{FallbackBroker, FallbackLayer, Spool, SpoolStats};
use crate::message::{MAX_PRIORITY, MESSAGE_TYPE_HEADER, Message};
use crate::observe::ObserveLayer;
use crate::retry::{RetryLayer, RetryPolicy};
use crate::runner::{HandlerError, Runner};
use crate::stack::BrokerLayer;
use crate::typed::json_handler;

mod task_groups;

use task_groups::TaskQueues;

/// Content type of a task's message.
pub const TASK_CONTENT_TYPE: &str = "application/json";
/// Content type of an event's message: a CloudEvents 1.0 event in structured JSON mode.
pub const EVENT_CONTENT_TYPE: &str = "application/cloudevents+json";

/// A unit of work for one worker (HelixAgent's task message).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Task {
    /// Task id (the message id too).
    pub id: String,
    /// What kind of work (`completion`, …).
    #[serde(rename = "type")]
    pub kind: String,
    /// 0 (lowest) to 10.
    #[serde(default)]
    pub priority: u8,
    /// The work's input.
    #[serde(default)]
    pub payload: serde_json::Value,
    /// Past this time the task is not handled: it is dead-lettered with reason
    /// "deadline exceeded".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<DateTime<Utc>>,
    /// When it was created.
    pub created_at: DateTime<Utc>,
}

impl Task {
    /// A task of `kind` with `payload`, a fresh id, priority 0, no deadline.
    pub fn new(kind: impl Into<String>, payload: serde_json::Value) -> Self {
        Task {
            id: format!("task-{}", uuid::Uuid::new_v4()),
            kind: kind.into(),
            priority: 0,
            payload,
            deadline: None,
            created_at: Utc::now(),
        }
    }

    /// Set the priority (0–10).
    #[must_use]
    pub fn with_priority(mut self, priority: u8) -> Self {
        self.priority = priority;
        self
    }

    /// Set the deadline.
    #[must_use]
    pub fn with_deadline(mut self, deadline: DateTime<Utc>) -> Self {
        self.deadline = Some(deadline);
        self
    }

    fn to_message(&self) -> Result<Message> {
        if self.priority > MAX_PRIORITY {
            return Err(Error::invalid_input(format!(
                "task priority {} is above {MAX_PRIORITY}",
                self.priority
            )));
        }
        let body = serde_json::to_vec(self)
            .map_err(|e| Error::new(crate::error::ErrorKind::Serialization, e.to_string()))?;
        Ok(Message::new(body)
            .with_id(self.id.clone())
            .with_header(MESSAGE_TYPE_HEADER, self.kind.clone())
            .with_content_type(TASK_CONTENT_TYPE)
            .with_priority(self.priority))
    }
}

/// Something that happened (HelixAgent's event message), written as a CloudEvents 1.0 event
/// in structured JSON mode (`specversion`, `id`, `source`, `type`, `subject`, `time`,
/// `datacontenttype`, `data`), so CloudEvents tools read it; `timestamp` (HelixAgent's name)
/// is accepted for `time` on input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Always `"1.0"`.
    #[serde(default = "spec_version")]
    pub specversion: String,
    /// Event id (the message id too).
    pub id: String,
    /// What kind of event (`debate.round.completed`, …).
    #[serde(rename = "type")]
    pub kind: String,
    /// Who emitted it (`debate-service`).
    pub source: String,
    /// What it is about (also the message key: one subject's events keep their order on
    /// the broker; handlers run up to [`HubConfig::concurrency`] at once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// When it happened.
    #[serde(alias = "timestamp")]
    pub time: DateTime<Utc>,
    /// Always `application/json`.
    #[serde(default = "json_type")]
    pub datacontenttype: String,
    /// The event's data.
    #[serde(default)]
    pub data: serde_json::Value,
}

fn spec_version() -> String {
    "1.0".into()
}

fn json_type() -> String {
    "application/json".into()
}

impl Event {
    /// An event of `kind` from `source` with `data`, a fresh id, now.
    pub fn new(
        kind: impl Into<String>,
        source: impl Into<String>,
        data: serde_json::Value,
    ) -> Self {
        Event {
            specversion: spec_version(),
            id: format!("event-{}", uuid::Uuid::new_v4()),
            kind: kind.into(),
            source: source.into(),
            subject: None,
            time: Utc::now(),
            datacontenttype: json_type(),
            data,
        }
    }

    /// Set the subject.
    #[must_use]
    pub fn with_subject(mut self, subject: impl Into<String>) -> Self {
        self.subject = Some(subject.into());
        self
    }

    fn to_message(&self) -> Result<Message> {
        let body = serde_json::to_vec(self)
            .map_err(|e| Error::new(crate::error::ErrorKind::Serialization, e.to_string()))?;
        let mut message = Message::new(body)
            .with_id(self.id.clone())
            .with_header(MESSAGE_TYPE_HEADER, self.kind.clone())
            .with_content_type(EVENT_CONTENT_TYPE);
        if let Some(subject) = &self.subject {
            message = message.with_key(subject.clone());
        }
        Ok(message)
    }
}

/// How the hub is set up.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// Consumer group of task workers (default `helixagent-workers`, `KAFKA_CONSUMER_GROUP`).
    pub task_group: String,
    /// Task queues whose workers' group the hub creates when it starts, so that a task
    /// published to one before any worker runs waits for the first, whoever publishes it
    /// (`MESSAGING_TASK_QUEUES`, comma-separated; default none). A queue the hub publishes to
    /// gets its group before the hub's first task to it in any case (see
    /// [`Hub::publish_task`]); list here the queues other producers publish to as well.
    pub task_queues: Vec<String>,
    /// Where failed tasks and events go (default: HelixAgent's routing, `helixagent.dlq.tasks`
    /// and `helixagent.dlq.events`, else `helixagent.dlq`).
    pub dead_letters: DeadLetterConfig,
    /// Retries before dead-lettering.
    pub retry: RetryPolicy,
    /// The breakers on both brokers.
    pub breaker: BreakerConfig,
    /// Handlers running at once per subscription (default 16; 1 handles a subscription's
    /// messages one after another, in delivery order).
    pub concurrency: usize,
    /// How often each side samples its consumer groups' backlogs into
    /// `messaging_queue_depth` and `messaging_consumer_lag` (default 15 s; zero: never).
    pub backlog_interval: std::time::Duration,
}

impl Default for HubConfig {
    fn default() -> Self {
        HubConfig {
            task_group: "helixagent-workers".into(),
            task_queues: Vec::new(),
            dead_letters: DeadLetterConfig::helixagent(),
            retry: RetryPolicy::new(),
            breaker: BreakerConfig::default(),
            concurrency: 16,
            backlog_interval: crate::observe::DEFAULT_BACKLOG_INTERVAL,
        }
    }
}

/// Counts of what the hub has done (HelixAgent's `GetMetrics`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HubMetrics {
    /// Tasks published (accepted by the broker or the spool).
    pub tasks_published: u64,
    /// Events published.
    pub events_published: u64,
    /// Tasks handled successfully.
    pub tasks_handled: u64,
    /// Events handled successfully.
    pub events_handled: u64,
    /// Tasks dead-lettered because their deadline had passed.
    pub tasks_expired: u64,
}

/// The health of both sides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubHealth {
    /// The worse of the two.
    pub status: HealthStatus,
    /// The task broker's.
    pub tasks: Health,
    /// The event broker's.
    pub events: Health,
}

#[derive(Default)]
struct Counters {
    tasks_published: AtomicU64,
    events_published: AtomicU64,
    tasks_handled: AtomicU64,
    events_handled: AtomicU64,
    tasks_expired: AtomicU64,
}

/// One side of the hub: its broker as the hub uses it (behind a breaker, and behind a
/// fallback when spooled), and the fallback for its spool's figures.
#[derive(Clone)]
struct Side {
    broker: Arc<dyn Broker>,
    fallback: Option<FallbackBroker>,
}

impl Side {
    /// The side named `side` over `broker`: its breakers and spool metrics are labelled
    /// `<side>.<backend>`, so two sides on one backend stay apart.
    async fn new(
        side: &str,
        broker: Arc<dyn Broker>,
        config: &HubConfig,
        spool: Option<Arc<dyn Spool>>,
        task_queues: Option<Arc<TaskQueues>>,
    ) -> Result<Self> {
        let label = format!("{side}.{}", broker.name());
        // Stacked as crate::stack says: counted beneath the breaker and the spool, so a
        // spooled publish is counted when the broker takes it, not when the spool does.
        let mut observed: Arc<dyn Broker> = Arc::new(
            ObserveLayer::new()
                .with_backlog_interval(config.backlog_interval)
                .wrap(broker)
                .await?,
        );
        // Beneath the spool as well, so a task drained from it finds its group created.
        if let Some(queues) = task_queues {
            observed = Arc::new(crate::stack::Guarded::new(observed, queues));
        }
        let breaker = BreakerLayer::new(config.breaker).named(label);
        Ok(match spool {
            Some(spool) => {
                let fallback = FallbackLayer::new(spool)
                    .with_breaker(breaker)
                    .wrap(observed)
                    .await?;
                Side {
                    broker: Arc::new(fallback.clone()),
                    fallback: Some(fallback),
                }
            }
            None => Side {
                broker: Arc::new(breaker.wrap(observed).await?),
                fallback: None,
            },
        })
    }

    async fn spool_stats(&self) -> Result<Option<SpoolStats>> {
        match &self.fallback {
            Some(fallback) => fallback.spool_stats().await.map(Some),
            None => Ok(None),
        }
    }
}

/// One side of the hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum HubSide {
    /// Tasks: one workers' group shares each queue.
    Tasks,
    /// Events: every group gets every event.
    Events,
}

impl HubSide {
    /// `"tasks"` or `"events"`, as the admin API's paths and labels name the sides.
    pub fn as_str(self) -> &'static str {
        match self {
            HubSide::Tasks => "tasks",
            HubSide::Events => "events",
        }
    }
}

/// A consumer group of one topic on one side of the hub, and where its backend keeps it
/// ([`Hub::queues`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubQueue {
    /// The side whose broker holds it.
    pub side: HubSide,
    /// The topic (the task queue's name, for tasks).
    pub topic: String,
    /// The consumer group.
    pub group: String,
    /// The side's backend (`"rabbitmq"`, `"kafka"`, …).
    pub backend: &'static str,
    /// Where that backend keeps the group, as its own tools name it.
    pub address: GroupAddress,
}

/// What each side's fallback spool holds (`None`: that side has no spool).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HubSpoolStats {
    /// The task side's spool.
    pub tasks: Option<SpoolStats>,
    /// The event side's spool.
    pub events: Option<SpoolStats>,
}

/// Tasks and events over two brokers (which may be one), with breakers, optional fallback
/// spools, retry and dead-lettering. Cloning shares it. An application configured from the
/// environment builds it with `helix_messaging::hub_from_env()`.
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use std::sync::Arc;
/// use std::time::Duration;
///
/// use helix_messaging_core::Broker;
/// use helix_messaging_core::hub::{Hub, HubConfig, Task};
/// use helix_messaging_memory::MemoryBroker;
///
/// let broker: Arc<dyn Broker> = Arc::new(MemoryBroker::new());
/// // Tasks and events on one broker here, and no fallback spools.
/// let hub = Hub::new(HubConfig::default(), broker.clone(), broker, None).await?;
/// let (done, mut finished) = tokio::sync::mpsc::unbounded_channel();
/// let workers = hub
///     .subscribe_tasks("llm", move |task: Task, _envelope| {
///         let done = done.clone();
///         async move {
///             done.send(task.kind).ok();
///             Ok(())
///         }
///     })
///     .await?;
/// let task = Task::new("summarise", serde_json::json!({ "document": 42 })).with_priority(7);
/// hub.publish_task("llm", &task).await?;
/// let kind = tokio::time::timeout(Duration::from_secs(5), finished.recv()).await;
/// assert_eq!(kind.expect("handled in time").as_deref(), Some("summarise"));
/// workers.shutdown().await;
/// hub.close().await?;
/// # Ok::<(), helix_messaging_core::Error>(())
/// # }).unwrap();
/// ```
#[derive(Clone)]
pub struct Hub {
    tasks: Side,
    events: Side,
    /// Tasks and events were given one broker: each side dead-letters on it, so one
    /// DLQ processor over it sees both sides' letters.
    one_broker: bool,
    /// The task queues whose workers' group is created before their first publish.
    task_queues: Arc<TaskQueues>,
    /// The (topic, group) of every event subscription made through the hub.
    event_groups: Arc<parking_lot::RwLock<std::collections::BTreeSet<(String, String)>>>,
    config: Arc<HubConfig>,
    counters: Arc<Counters>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("tasks", &self.tasks.broker)
            .field("events", &self.events.broker)
            .finish_non_exhaustive()
    }
}

impl Hub {
    /// A hub over `tasks` and `events` (pass one broker twice for a single backend). With a
    /// spool for a side, that side's publishes are spooled while its broker is away (HelixAgent's
    /// `MESSAGING_FALLBACK_ENABLED`; give each side a spool of its own).
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`](crate::error::ErrorKind::InvalidInput) for a bad breaker
    /// configuration; a spool's error reading what it holds.
    pub async fn new(
        config: HubConfig,
        tasks: Arc<dyn Broker>,
        events: Arc<dyn Broker>,
        spools: Option<(Arc<dyn Spool>, Arc<dyn Spool>)>,
    ) -> Result<Self> {
        let (task_spool, event_spool) = match spools {
            Some((t, e)) => (Some(t), Some(e)),
            None => (None, None),
        };
        let task_queues = Arc::new(TaskQueues::new(&config.task_group));
        for queue in &config.task_queues {
            crate::names::validate_name("task queue", queue)?;
            task_queues.expect(queue);
        }
        // A broker that is away now gets the groups before the first publish to each.
        if let Err(err) = task_queues.create_all(&*tasks).await {
            tracing::warn!(error = %err, "creating the task queues' groups failed; each is created before its first publish");
        }
        Ok(Hub {
            one_broker: Arc::ptr_eq(&tasks, &events),
            tasks: Side::new(
                "tasks",
                tasks,
                &config,
                task_spool,
                Some(task_queues.clone()),
            )
            .await?,
            events: Side::new("events", events, &config, event_spool, None).await?,
            task_queues,
            event_groups: Arc::default(),
            config: Arc::new(config),
            counters: Arc::default(),
        })
    }

    /// How the hub is set up.
    pub fn config(&self) -> &HubConfig {
        &self.config
    }

    /// Whether tasks and events share one broker (the hub was given the same one for both,
    /// as `hub_from_env` does when both sides name one backend). When they do not, each
    /// side's dead letters are on its own broker, and a DLQ processor needs both: the event
    /// broker as a [`DeadLetterSource`](crate::dlq::DeadLetterSource).
    pub fn shares_one_broker(&self) -> bool {
        self.one_broker
    }

    /// The task side's broker, as the hub uses it.
    pub fn task_broker(&self) -> &Arc<dyn Broker> {
        &self.tasks.broker
    }

    /// The event side's broker, as the hub uses it.
    pub fn event_broker(&self) -> &Arc<dyn Broker> {
        &self.events.broker
    }

    /// Publish `task` to `queue`. Before the first task to `queue` reaches the broker, the
    /// workers' group ([`HubConfig::task_group`]) is created on it, so the task waits for the
    /// first worker even when none has subscribed yet (RabbitMQ would refuse it otherwise);
    /// a task spooled while the broker is away gets the group when the spool drains.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`](crate::error::ErrorKind::InvalidInput) for a priority above 10;
    /// the broker's (or, with fallback, the spool's) error.
    pub async fn publish_task(&self, queue: &str, task: &Task) -> Result<()> {
        let message = task.to_message()?;
        crate::names::validate_name("task queue", queue)?;
        self.task_queues.expect(queue);
        self.tasks.broker.publish(queue, message).await?;
        self.counters
            .tasks_published
            .fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Publish `event` to `topic` (keyed by its subject).
    ///
    /// # Errors
    /// The broker's (or, with fallback, the spool's) error.
    pub async fn publish_event(&self, topic: &str, event: &Event) -> Result<()> {
        self.events
            .broker
            .publish(topic, event.to_message()?)
            .await?;
        self.counters
            .events_published
            .fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// A runner on `broker`'s `topic` in `group`, with dead-lettering around retry.
    fn runner(
        &self,
        broker: &Arc<dyn Broker>,
        topic: &str,
        group: &str,
    ) -> Result<crate::runner::RunnerBuilder> {
        let dlq = DeadLetterLayer::new(DeadLetterQueue::new(
            broker.clone(),
            self.config.dead_letters.clone(),
        ));
        Ok(Runner::builder(broker.clone(), topic)
            .group(group)
            .concurrency(self.config.concurrency)
            .layer(dlq)
            .layer(RetryLayer::new(self.config.retry.clone())?))
    }

    /// Handle the tasks of `queue` in the workers' group: each is decoded (an undecodable
    /// one is dead-lettered at once), a task past its deadline is dead-lettered with reason
    /// "deadline exceeded" without reaching `handler`, failures are retried and finally
    /// dead-lettered. Returns the running [`Runner`].
    ///
    /// # Errors
    /// The broker's error subscribing.
    pub async fn subscribe_tasks<F, Fut>(&self, queue: &str, handler: F) -> Result<Runner>
    where
        F: Fn(Task, Envelope) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = std::result::Result<(), HandlerError>> + Send + 'static,
    {
        let counters = self.counters.clone();
        let handler = Arc::new(handler);
        let runner = self
            .runner(&self.tasks.broker, queue, &self.config.task_group)?
            .start(json_handler(move |task: Task, envelope: Envelope| {
                let (counters, handler) = (counters.clone(), handler.clone());
                async move {
                    if task.deadline.is_some_and(|deadline| deadline < Utc::now()) {
                        counters.tasks_expired.fetch_add(1, Ordering::Relaxed);
                        return Err(HandlerError::permanent(format!(
                            "task {} passed its deadline {}",
                            task.id,
                            task.deadline.map(|d| d.to_rfc3339()).unwrap_or_default()
                        ))
                        .with_reason(DeadLetterReason::DeadlineExceeded));
                    }
                    handler(task, envelope).await?;
                    counters.tasks_handled.fetch_add(1, Ordering::Relaxed);
                    Ok(())
                }
            }))
            .await?;
        self.task_queues.subscribed(queue);
        Ok(runner)
    }

    /// Handle the events of `topic` in consumer group `group` (every group gets every
    /// event), decoded, retried and dead-lettered like tasks.
    ///
    /// # Errors
    /// The broker's error subscribing.
    pub async fn subscribe_events<F, Fut>(
        &self,
        topic: &str,
        handler: F,
        group: &str,
    ) -> Result<Runner>
    where
        F: Fn(Event, Envelope) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = std::result::Result<(), HandlerError>> + Send + 'static,
    {
        let counters = self.counters.clone();
        let handler = Arc::new(handler);
        let runner = self
            .runner(&self.events.broker, topic, group)?
            .start(json_handler(move |event: Event, envelope: Envelope| {
                let (counters, handler) = (counters.clone(), handler.clone());
                async move {
                    handler(event, envelope).await?;
                    counters.events_handled.fetch_add(1, Ordering::Relaxed);
                    Ok(())
                }
            }))
            .await?;
        self.event_groups
            .write()
            .insert((topic.to_owned(), group.to_owned()));
        Ok(runner)
    }

    /// The consumer groups this hub knows of, by side, topic and group: the workers' group
    /// of every task queue it has published to, subscribed to or was told of
    /// ([`HubConfig::task_queues`]), and every event subscription made through it; each with
    /// where its backend keeps it.
    pub fn queues(&self) -> Vec<HubQueue> {
        let tasks = self
            .task_queues
            .names()
            .into_iter()
            .map(|queue| self.queue(HubSide::Tasks, &queue, &self.config.task_group));
        let events: Vec<HubQueue> = self
            .event_groups
            .read()
            .iter()
            .map(|(topic, group)| self.queue(HubSide::Events, topic, group))
            .collect();
        let mut queues: Vec<HubQueue> = tasks.chain(events).collect();
        queues.sort_by(|a, b| (a.side, &a.topic, &a.group).cmp(&(b.side, &b.topic, &b.group)));
        queues
    }

    /// Group `group` of `topic` on `side`'s broker, known to the hub or not, with where that
    /// backend keeps it.
    pub fn queue(&self, side: HubSide, topic: &str, group: &str) -> HubQueue {
        let broker = self.side_broker(side);
        HubQueue {
            side,
            topic: topic.to_owned(),
            group: group.to_owned(),
            backend: broker.name(),
            address: broker.group_address(topic, group),
        }
    }

    /// `side`'s broker, as the hub uses it.
    pub fn side_broker(&self, side: HubSide) -> &Arc<dyn Broker> {
        match side {
            HubSide::Tasks => &self.tasks.broker,
            HubSide::Events => &self.events.broker,
        }
    }

    /// Both sides' health (HelixAgent's `HealthCheck`).
    pub async fn health_check(&self) -> HubHealth {
        let (tasks, events) =
            futures::join!(self.tasks.broker.health(), self.events.broker.health());
        HubHealth {
            status: tasks.status.max(events.status),
            tasks,
            events,
        }
    }

    /// The task side's fallback (its spool and what the broker refused from it), if the
    /// side has a spool.
    pub fn task_fallback(&self) -> Option<&FallbackBroker> {
        self.tasks.fallback.as_ref()
    }

    /// The event side's fallback, if the side has a spool.
    pub fn event_fallback(&self) -> Option<&FallbackBroker> {
        self.events.fallback.as_ref()
    }

    /// What the fallback spools hold (both `None` without fallback).
    ///
    /// # Errors
    /// A spool's error.
    pub async fn spool_stats(&self) -> Result<HubSpoolStats> {
        Ok(HubSpoolStats {
            tasks: self.tasks.spool_stats().await?,
            events: self.events.spool_stats().await?,
        })
    }

    /// What the hub has done so far.
    pub fn metrics(&self) -> HubMetrics {
        let c = &self.counters;
        HubMetrics {
            tasks_published: c.tasks_published.load(Ordering::Relaxed),
            events_published: c.events_published.load(Ordering::Relaxed),
            tasks_handled: c.tasks_handled.load(Ordering::Relaxed),
            events_handled: c.events_handled.load(Ordering::Relaxed),
            tasks_expired: c.tasks_expired.load(Ordering::Relaxed),
        }
    }

    /// Close both brokers (once each, also when they are one).
    ///
    /// # Errors
    /// The first close error.
    pub async fn close(&self) -> Result<()> {
        let tasks = self.tasks.broker.close().await;
        let events = self.events.broker.close().await;
        tasks.and(events)
    }
}
