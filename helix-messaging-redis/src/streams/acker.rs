//! Settling a delivery: ack or reject, requeue now or after a delay, and the prefetch slot
//! that a delivery frees when it is dropped, settled or not.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use async_trait::async_trait;
use helix_messaging_core::{Acknowledge, Error, ErrorKind, Result, Settlement};

use super::delay::DELAY;
use super::group::{REQUEUE_CONSUMER, delayed_key};
use super::reader::Reader;
use crate::acks::EntryId;
use crate::error::from_redis;

/// `XCLAIM` to the requeue consumer with maximal idle time and the delivery count kept.
fn requeue_cmd(topic: &str, group: &str, ids: &[EntryId]) -> redis::Cmd {
    let mut cmd = redis::cmd("XCLAIM");
    cmd.arg(topic)
        .arg(group)
        .arg(REQUEUE_CONSUMER)
        .arg(0)
        .arg(ids)
        .arg("TIME")
        .arg(0)
        .arg("JUSTID");
    cmd
}

pub(super) struct StreamAcker {
    pub(super) reader: Arc<Reader>,
    pub(super) key: EntryId,
}

#[async_trait]
impl Acknowledge for StreamAcker {
    fn delays_requeue(&self) -> bool {
        true
    }

    async fn settle(mut self: Box<Self>, outcome: Settlement) -> Result<()> {
        self.reader.shared.ensure_open()?;
        self.reader.received.lock().remove(&self.key);
        match outcome {
            Settlement::Ack | Settlement::Reject => match self.reader.acks.ack(self.key).await? {
                true => Ok(()),
                false => Err(self.not_pending()),
            },
            Settlement::RequeueAfter(delay) => {
                let reader = &self.reader;
                let mut commands = reader.shared.commands.clone();
                let deadline_ms = reader.shared.config.streams.ack_deadline.as_millis() as u64;
                let held: i64 = DELAY
                    .key(&*reader.topic)
                    .key(delayed_key(
                        &reader.shared.config,
                        &reader.topic,
                        &reader.group,
                    ))
                    .arg(&*reader.group)
                    .arg(REQUEUE_CONSUMER)
                    .arg(self.key)
                    .arg(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX))
                    .arg(deadline_ms)
                    .invoke_async(&mut commands)
                    .await
                    .map_err(|e| {
                        from_redis(
                            e,
                            format!("delayed requeue of {} on {}", self.key, reader.topic),
                        )
                    })?;
                if held == 0 {
                    return Err(self.not_pending());
                }
                Ok(())
            }
            Settlement::Requeue => {
                let reader = &self.reader;
                let mut commands = reader.shared.commands.clone();
                let ids = [self.key];
                let claimed: Vec<String> = requeue_cmd(&reader.topic, &reader.group, &ids)
                    .query_async(&mut commands)
                    .await
                    .map_err(|e| {
                        from_redis(e, format!("requeue {} on {}", self.key, reader.topic))
                    })?;
                if claimed.is_empty() {
                    return Err(self.not_pending());
                }
                reader.requeued.store(true, Ordering::Release);
                reader.slot_freed.notify_one();
                Ok(())
            }
        }
    }
}

impl StreamAcker {
    fn not_pending(&self) -> Error {
        Error::new(
            ErrorKind::NotFound,
            format!(
                "entry {} on {} is no longer pending for group {} (already settled, or taken over by another member after the ack deadline)",
                self.key, self.reader.topic, self.reader.group
            ),
        )
    }
}

impl Drop for StreamAcker {
    /// Settled or not, the delivery no longer occupies a prefetch slot; an unsettled one stays
    /// pending and is reclaimed after the ack deadline.
    fn drop(&mut self) {
        let reader = &self.reader;
        let before = reader.outstanding.fetch_sub(1, Ordering::AcqRel);
        // Each count is passed by exactly one decrement, so each point wakes the reader once.
        let room = reader.prefetch.saturating_sub(before.saturating_sub(1));
        if room == 1 || room == reader.prefetch.div_ceil(2) {
            reader.slot_freed.notify_one();
        }
    }
}
