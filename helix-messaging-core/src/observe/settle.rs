//! Counting how the deliveries of an observed subscription are settled.

use async_trait::async_trait;

use crate::delivery::{Acknowledge, Delivery, Settlement, Settler};
use crate::error::Result;

/// The counter of deliveries acknowledged (label `backend`, `topic`).
pub const ACKED_METRIC: &str = "messaging_messages_acked_total";

/// The counter of deliveries negatively acknowledged (labels `backend`, `topic`, and
/// `requeue`: `"true"` for a requeue, delayed or not, `"false"` for a reject).
pub const NACKED_METRIC: &str = "messaging_messages_nacked_total";

/// The counter handles of one subscription's settlements, looked up once per subscription
/// so that a settlement only bumps them.
#[derive(Clone)]
pub(super) struct SettleCounters {
    acked: metrics::Counter,
    requeued: metrics::Counter,
    rejected: metrics::Counter,
}

impl SettleCounters {
    pub(super) fn new(labels: &[(&'static str, String); 2]) -> Self {
        let [backend, topic] = labels.clone();
        let nacked = |requeue: &'static str| {
            metrics::counter!(
                NACKED_METRIC,
                &[
                    backend.clone(),
                    topic.clone(),
                    ("requeue", requeue.to_owned())
                ]
            )
        };
        SettleCounters {
            acked: metrics::counter!(ACKED_METRIC, labels),
            requeued: nacked("true"),
            rejected: nacked("false"),
        }
    }

    /// `delivery`, settled through a handle that counts what the broker accepted.
    pub(super) fn wrap(&self, delivery: Delivery) -> Delivery {
        let (envelope, settler) = delivery.into_parts();
        Delivery::new(
            envelope.message,
            envelope.info,
            Box::new(Counted {
                settler,
                counters: self.clone(),
            }),
        )
    }
}

/// A delivery's own settle handle, counting each settlement its backend accepted (a failed
/// one is not counted: the backend redelivers it by its own rules).
struct Counted {
    settler: Settler,
    counters: SettleCounters,
}

#[async_trait]
impl Acknowledge for Counted {
    async fn settle(self: Box<Self>, outcome: Settlement) -> Result<()> {
        self.settler.settle(outcome).await?;
        match outcome {
            Settlement::Ack => self.counters.acked.increment(1),
            Settlement::Requeue | Settlement::RequeueAfter(_) => {
                self.counters.requeued.increment(1)
            }
            Settlement::Reject => self.counters.rejected.increment(1),
        }
        Ok(())
    }

    fn delays_requeue(&self) -> bool {
        self.settler.delays_requeue()
    }
}
