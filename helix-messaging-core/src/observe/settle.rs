//! Counting how the deliveries of an observed subscription are settled.

use async_trait::async_trait;

use crate::delivery::{Acknowledge, Delivery, Settlement};
use crate::error::{Error, ErrorKind, Result};

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
        // A delivery reaches this wrapper as the backend made it, never settled yet; were
        // it settled, settling it again says so as it would have.
        let acker = settler
            .into_acker()
            .unwrap_or_else(|| Box::new(AlreadySettled));
        Delivery::new(
            envelope.message,
            envelope.info,
            Box::new(Counted {
                acker,
                counters: self.clone(),
            }),
        )
    }

    fn count(&self, outcome: Settlement) {
        match outcome {
            Settlement::Ack => self.acked.increment(1),
            Settlement::Requeue | Settlement::RequeueAfter(_) => self.requeued.increment(1),
            Settlement::Reject => self.rejected.increment(1),
        }
    }
}

/// The acknowledger of a delivery settled before it was wrapped.
struct AlreadySettled;

#[async_trait]
impl Acknowledge for AlreadySettled {
    async fn settle(self: Box<Self>, outcome: Settlement) -> Result<()> {
        Err(Error::new(
            ErrorKind::AlreadySettled,
            format!("cannot {outcome:?}: the delivery was already settled"),
        ))
    }
}

/// A delivery's own acknowledger, counting each settlement its backend accepted (a failed
/// one is not counted: the backend redelivers it by its own rules). It keeps the backend's
/// synchronous path: a settlement the backend makes at once costs no future here either.
struct Counted {
    acker: Box<dyn Acknowledge>,
    counters: SettleCounters,
}

#[async_trait]
impl Acknowledge for Counted {
    async fn settle(self: Box<Self>, outcome: Settlement) -> Result<()> {
        let Counted { acker, counters } = *self;
        acker.settle(outcome).await?;
        counters.count(outcome);
        Ok(())
    }

    fn settle_now(&mut self, outcome: Settlement) -> Option<Result<()>> {
        let settled = self.acker.settle_now(outcome)?;
        if settled.is_ok() {
            self.counters.count(outcome);
        }
        Some(settled)
    }

    fn delays_requeue(&self) -> bool {
        self.acker.delays_requeue()
    }
}
