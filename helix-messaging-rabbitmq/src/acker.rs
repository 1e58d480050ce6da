//! The acker: how the application settles a delivery ([`Acknowledge`] for RabbitMQ), and
//! the application's [`Delivery`] that carries it. An ack or reject settles the delivery on
//! its channel; a requeue, delayed or not, first publishes a copy carrying the attempt count.

use std::sync::Arc;

use async_trait::async_trait;
use helix_messaging_core::{Acknowledge, Delivery, Message, Result, Settlement};

use crate::consumer::{AckAction, ConsumerContext, settle_delivery};
use crate::wire;

impl ConsumerContext {
    /// The delivery the application gets; `unseen` as from [`ConsumerContext::screen`].
    pub(crate) fn delivery(
        self: Arc<Self>,
        mut delivery: lapin::message::Delivery,
        unseen: bool,
    ) -> Delivery {
        let mut received = wire::received(&mut delivery);
        if unseen {
            received.attempt = received.attempt.saturating_sub(1).max(1);
        }
        let message = Arc::new(received.message);
        Delivery::new(
            message.clone(),
            helix_messaging_core::DeliveryInfo {
                topic: self.topic.clone(),
                group: self.group.clone(),
                attempt: received.attempt,
                redelivered: received.attempt > 1,
                position: Some(helix_messaging_core::Position::DeliveryTag(
                    delivery.delivery_tag,
                )),
            },
            Box::new(RabbitAcker {
                acker: delivery.acker,
                context: self,
                message,
                attempt: received.attempt,
            }),
        )
    }
}

struct RabbitAcker {
    acker: lapin::Acker,
    context: Arc<ConsumerContext>,
    message: Arc<Message>,
    attempt: u32,
}

#[async_trait]
impl Acknowledge for RabbitAcker {
    fn delays_requeue(&self) -> bool {
        true
    }

    async fn settle(self: Box<Self>, outcome: Settlement) -> Result<()> {
        let queue = &self.context.queue;
        let action = match outcome {
            Settlement::Ack => AckAction::Ack,
            Settlement::Reject => AckAction::Reject,
            Settlement::RequeueAfter(delay) => {
                // As a requeue, but through the retry queue: the broker holds the copy for
                // the delay, then dead-letters it back to this group's queue alone. If the
                // copy fails the delivery is requeued at once: a retry that comes early,
                // never one that is lost.
                let properties = wire::properties(&self.message, Some(self.attempt));
                let copied = self
                    .context
                    .shared
                    .delay_to_queue(queue, self.message.payload(), properties, delay)
                    .await;
                match copied {
                    Ok(()) => AckAction::Ack,
                    Err(err) => {
                        tracing::warn!(queue, error = %err, "delayed requeue copy failed; requeueing natively");
                        AckAction::Requeue
                    }
                }
            }
            Settlement::Requeue => {
                // A copy carrying the attempt count, then the original acked: classic queues
                // keep no delivery count, so this is how the next attempt knows its number.
                // The copy is bounded by the publish timeout on its own, so the original is
                // always settled one way or the other afterwards.
                let properties = wire::properties(&self.message, Some(self.attempt));
                let copied = self
                    .context
                    .shared
                    .copy_to_queue(queue, self.message.payload(), properties)
                    .await;
                match copied {
                    Ok(()) => AckAction::Ack,
                    Err(err) => {
                        tracing::warn!(queue, error = %err, "requeue copy failed; requeueing natively");
                        AckAction::Requeue
                    }
                }
            }
        };
        settle_delivery(&self.context, &self.acker, action).await
    }
}
