//! A named group's retry topic, where its delayed requeues wait (see the `reader` module).
//!
//! The readers and ackers that write copies to it hold it, so it sits beneath them; starting
//! its own reader is left to the subscription's lane (the crate root's, built on the reader)
//! through [`StartReader`], so nothing here imports from what is built on it.

use std::sync::{Arc, Weak};
use std::time::SystemTime;

use helix_messaging_core::{Error, Message, Result, StartPosition};

use crate::offsets::GroupState;
use crate::shared::Shared;
use crate::wire;

/// What starts a subscription's readers: its lane.
pub(crate) trait StartReader: Send + Sync {
    /// Create a consumer of `kafka_topic` in group `group_id` and start its reader.
    fn start(
        &self,
        kafka_topic: &str,
        group_id: &str,
        start: StartPosition,
        retry: Option<Arc<RetryLane>>,
    ) -> Result<Arc<GroupState>>;
}

/// A named group's retry topic `<topic>.retry.<group>`: where its delayed requeues wait
/// (see the `reader` module). Its reader starts with the first delayed requeue, or at
/// subscribe when the topic already exists.
pub(crate) struct RetryLane {
    shared: Arc<Shared>,
    /// The subscription's lane, which starts the retry topic's reader.
    lane: Box<dyn StartReader>,
    pub(crate) kafka_topic: String,
    group_id: String,
    started: tokio::sync::OnceCell<()>,
    me: Weak<RetryLane>,
}

impl RetryLane {
    /// `None` when the retry topic's name would be longer than Kafka allows (delayed
    /// requeues of that group are then held by the consumer instead).
    pub(crate) fn new(
        shared: &Arc<Shared>,
        lane: impl StartReader + 'static,
        kafka_topic: &str,
        group: &str,
    ) -> Option<Arc<Self>> {
        let retry_topic = format!("{kafka_topic}.retry.{group}");
        if retry_topic.len() > helix_messaging_core::MAX_NAME_LEN {
            return None;
        }
        Some(Arc::new_cyclic(|me| RetryLane {
            shared: shared.clone(),
            lane: Box::new(lane),
            kafka_topic: retry_topic,
            group_id: format!("{group}.helix-retry"),
            started: tokio::sync::OnceCell::new(),
            me: me.clone(),
        }))
    }

    /// Start reading the retry topic (creating it if needed), once.
    pub(crate) async fn ensure_started(&self) -> Result<()> {
        self.started
            .get_or_try_init(|| async {
                let shared = &self.shared;
                shared
                    .topics
                    .ensure(&shared.config, &self.kafka_topic)
                    .await?;
                self.lane.start(
                    &self.kafka_topic,
                    &self.group_id,
                    StartPosition::Earliest,
                    self.me.upgrade(),
                )?;
                Ok::<(), Error>(())
            })
            .await
            .map(|_| ())
    }

    /// Write a copy of `message`, received at `attempt`, due at `not_before`, and wait for
    /// its delivery report.
    pub(crate) async fn send(
        &self,
        message: &Message,
        attempt: u32,
        not_before: SystemTime,
    ) -> Result<()> {
        self.ensure_started().await?;
        let shared = &self.shared;
        let reports = shared.pending_reports();
        shared
            .enqueue_with(
                &shared.retry_producer()?,
                &self.kafka_topic,
                message,
                wire::retry_headers(message, attempt, not_before),
                reports.slot(0),
            )
            .map_err(|(err, mut refused)| {
                refused.withdraw();
                err
            })?;
        reports.delivered(0, &self.kafka_topic).await
    }
}
