//! Settling a delivery: the acker every delivery carries, and what the ackers of one reader
//! share.
//!
//! Requeue never writes to the topic (every other group would receive the message again):
//! the record stays unsettled, so no commit passes it, and the reader hands it out again at
//! the head of its buffer with `attempt + 1`. A delivery dropped unsettled is handed out again
//! the same way, so it cannot hold its partition's commits back for good.
//!
//! Apart from the reader: an acker runs wherever the application settles, and reaches the
//! reader only through the channel of records to hand out again ([`Buffered`]); it settles
//! through the offsets, and writes delayed requeues to the group's retry topic.

use std::sync::{Arc, Weak};
use std::time::SystemTime;

use async_trait::async_trait;
use helix_messaging_core::{Acknowledge, Error, ErrorKind, Message, Result, Settlement};
use tokio::sync::{OwnedSemaphorePermit, mpsc};

use crate::config::NAME;
use crate::offsets::{GroupState, reassigned};
use crate::rebalance::GroupConsumer;
use crate::retry_lane::RetryLane;

/// A received record waiting to be handed out.
pub(crate) struct Buffered {
    pub(crate) message: Arc<Message>,
    pub(crate) attempt: u32,
    pub(crate) partition: i32,
    pub(crate) offset: i64,
    pub(crate) generation: u64,
    /// A retry-topic copy is not handed out before this time.
    pub(crate) not_before: Option<SystemTime>,
}

/// What every delivery of one reader settles through: one reference per delivery rather
/// than one per part (each is an atomic count touched on two threads).
pub(crate) struct AckContext {
    /// Weak: a subscription that has ended must be able to leave its group.
    consumer: Weak<GroupConsumer>,
    state: Arc<GroupState>,
    again: mpsc::UnboundedSender<Buffered>,
    topic: Arc<str>,
    retry: Option<Arc<RetryLane>>,
}

impl AckContext {
    /// What the deliveries of `consumer`'s reader settle through, and where that reader
    /// receives the records they hand out again.
    pub(crate) fn new(
        consumer: &Arc<GroupConsumer>,
        state: Arc<GroupState>,
        topic: Arc<str>,
        retry: Option<Arc<RetryLane>>,
    ) -> (Arc<Self>, mpsc::UnboundedReceiver<Buffered>) {
        let (again, again_rx) = mpsc::unbounded_channel();
        let context = Arc::new(AckContext {
            consumer: Arc::downgrade(consumer),
            state,
            again,
            topic,
            retry,
        });
        (context, again_rx)
    }
}

/// Settles one delivery. Holds a prefetch permit until it is dropped.
pub(crate) struct KafkaAcker {
    context: Arc<AckContext>,
    message: Arc<Message>,
    attempt: u32,
    partition: i32,
    offset: i64,
    generation: u64,
    /// Set once the delivery is settled: dropping an unsettled acker hands the record out
    /// again.
    settled: bool,
    _permit: OwnedSemaphorePermit,
}

impl KafkaAcker {
    /// The acker of the delivery of `item`, holding `permit`.
    pub(crate) fn new(
        context: Arc<AckContext>,
        item: &Buffered,
        permit: OwnedSemaphorePermit,
    ) -> Self {
        KafkaAcker {
            context,
            message: item.message.clone(),
            attempt: item.attempt,
            partition: item.partition,
            offset: item.offset,
            generation: item.generation,
            settled: false,
            _permit: permit,
        }
    }

    /// Hand the record out again with the next attempt; `false` if the partition is no longer
    /// assigned here or the subscription has ended (its next owner reads it again from the
    /// committed offset, which has not passed it).
    fn hand_out_again(&self) -> bool {
        let context = &self.context;
        context.state.holds(self.partition, self.generation)
            && context
                .again
                .send(Buffered {
                    message: self.message.clone(),
                    attempt: self.attempt + 1,
                    partition: self.partition,
                    offset: self.offset,
                    generation: self.generation,
                    not_before: None,
                })
                .is_ok()
    }

    /// The error of a settlement after the subscription ended.
    fn ended(&self) -> Error {
        Error::new(
            ErrorKind::NotFound,
            format!(
                "the subscription to {} has ended; the message is redelivered from the committed offset",
                self.context.topic
            ),
        )
    }
}

impl Drop for KafkaAcker {
    fn drop(&mut self) {
        if !self.settled {
            self.hand_out_again();
        }
    }
}

#[async_trait]
impl Acknowledge for KafkaAcker {
    fn delays_requeue(&self) -> bool {
        self.context.retry.is_some()
    }

    /// Everything but a delayed requeue is settled here: an ack or a reject moves the
    /// partition's commit point, a requeue hands the record out again from this process.
    fn settle_now(&mut self, outcome: Settlement) -> Option<Result<()>> {
        if matches!(outcome, Settlement::RequeueAfter(_)) {
            return None;
        }
        self.settled = true;
        let context = &self.context;
        if context.consumer.strong_count() == 0 {
            return Some(Err(self.ended()));
        }
        if outcome == Settlement::Requeue {
            // Rewinding the partition would redeliver everything after the record too, and a
            // copy on the topic would reach every other group: the record stays unsettled
            // (no commit passes it) and is handed out again here.
            return Some(if self.hand_out_again() {
                Ok(())
            } else {
                Err(reassigned(self.partition, &context.topic))
            });
        }
        Some(
            context
                .state
                .settle(self.partition, self.offset, self.generation),
        )
    }

    async fn settle(mut self: Box<Self>, outcome: Settlement) -> Result<()> {
        let Settlement::RequeueAfter(delay) = outcome else {
            // Settled at once (the `Settler` asks `settle_now` first; this is for a caller
            // that does not).
            return self.settle_now(outcome).unwrap_or(Ok(()));
        };
        self.settled = true;
        let context = self.context.clone();
        if context.consumer.strong_count() == 0 {
            return Err(self.ended());
        }
        let lane = context.retry.clone().ok_or_else(|| {
            Error::unsupported(
                NAME,
                "a delayed requeue on a private subscription (named groups have a retry topic)",
            )
        })?;
        let due = SystemTime::now() + delay;
        match lane.send(&self.message, self.attempt, due).await {
            // The copy is on the retry topic: the original is done with.
            Ok(()) => context
                .state
                .settle(self.partition, self.offset, self.generation),
            Err(err) => {
                // A retry that comes early, never one that is lost.
                tracing::warn!(topic = %context.topic, error = %err, "writing the retry copy failed; requeueing at once");
                if self.hand_out_again() {
                    Ok(())
                } else {
                    Err(err)
                }
            }
        }
    }
}
