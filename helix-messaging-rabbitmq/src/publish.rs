//! The publish machinery, as methods of [`Shared`]: a publish (of a [`Message`], or of a
//! payload with its AMQP properties as they are) and the broker's verdict on it, and the
//! copies by which a requeue, a delayed requeue and a re-counted redelivery carry their
//! attempt count. The consumer and the acker publish those copies, so this stands below them.
//!
//! A publish has no deadline of its own: its caller bounds it, most by
//! [`Shared::within_publish_timeout`];
//! [`Publisher::publish`](helix_messaging_core::Publisher::publish) bounds a publish and its
//! confirm together, under one timer.

use std::time::Duration;

use helix_messaging_core::{Error, ErrorKind, Message, Result, check_payload_size};
use lapin::Confirmation;
use lapin::options::{BasicPublishOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};

use crate::config::NAME;
use crate::shared::Shared;
use crate::wire;

impl Shared {
    /// The deadline of a publish (or of its confirm) that starts now: the publish timeout
    /// from now.
    fn publish_deadline(&self) -> tokio::time::Instant {
        tokio::time::Instant::now() + self.config().publish_timeout
    }

    /// Start publishing `message`; the returned future resolves with the broker's verdict.
    /// Without a usable connection this fails at once with a retryable error. It has no
    /// deadline: its caller bounds it (most through [`Shared::within_publish_timeout`]).
    pub(crate) async fn start_publish(
        &self,
        exchange: &str,
        routing_key: &str,
        message: &Message,
        attempts_so_far: Option<u32>,
    ) -> Result<lapin::PublisherConfirm> {
        check_payload_size(NAME, message, self.config().max_payload_bytes)?;
        self.start_publish_raw(
            exchange,
            routing_key,
            message.payload(),
            wire::properties(message, attempts_so_far),
        )
        .await
    }

    /// [`Shared::start_publish`] of a payload with its AMQP properties as they are (copies of
    /// received messages).
    ///
    /// No deadline here, not even an optional one: a deadline awaited in a branch of its own
    /// made this future hold the timer and a second copy of lapin's (large) publish future
    /// beside the branch that awaits in place, on the path of every single publish (its
    /// future grew from 1,680 to 3,760 bytes). Callers with a deadline wrap it instead.
    pub(crate) async fn start_publish_raw(
        &self,
        exchange: &str,
        routing_key: &str,
        payload: &[u8],
        properties: lapin::BasicProperties,
    ) -> Result<lapin::PublisherConfirm> {
        let link = self.link()?;
        let publisher = link.publisher().await?;
        publisher
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                payload,
                properties,
            )
            .await
            .map_err(|e| self.connection_error(e, format!("publishing to {routing_key}")))
    }

    /// `step` of a publish to `routing_key` (a [`Shared::start_publish`], a confirm),
    /// failing with [`Shared::publish_timed_out`] past the publish timeout from now.
    pub(crate) fn within_publish_timeout<T>(
        &self,
        routing_key: &str,
        step: impl Future<Output = Result<T>>,
    ) -> impl Future<Output = Result<T>> {
        self.by_publish_deadline(self.publish_deadline(), routing_key, step)
    }

    /// `step` of a publish to `routing_key`, failing with [`Shared::publish_timed_out`] past
    /// `deadline`.
    pub(crate) async fn by_publish_deadline<T>(
        &self,
        deadline: tokio::time::Instant,
        routing_key: &str,
        step: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        tokio::time::timeout_at(deadline, step)
            .await
            .map_err(|_| self.publish_timed_out(routing_key))?
    }

    /// Publish a copy straight to `queue` (the default exchange) and wait for its confirm: how
    /// a requeue and a re-counted redelivery carry their attempt count.
    pub(crate) async fn copy_to_queue(
        &self,
        queue: &str,
        payload: &[u8],
        properties: lapin::BasicProperties,
    ) -> Result<()> {
        let confirm = self
            .within_publish_timeout(
                queue,
                self.start_publish_raw("", queue, payload, properties),
            )
            .await?;
        self.confirmed(queue, confirm).await
    }

    /// Publish a copy to `queue`'s retry queue for `delay` (rounded up to a step of
    /// [`delay_step`]): a queue whose message TTL is that step and which dead-letters back to
    /// `queue`, so the broker holds the message meanwhile. The retry queue is declared each
    /// time, which also renews its `x-expires` (it goes away a minute after its last use,
    /// always after the messages in it have left).
    pub(crate) async fn delay_to_queue(
        &self,
        queue: &str,
        payload: &[u8],
        properties: lapin::BasicProperties,
        delay: Duration,
    ) -> Result<()> {
        let step = delay_step(delay);
        let retry_queue = format!("{queue}.retry.{step}");
        let mut arguments = FieldTable::default();
        arguments.insert("x-message-ttl".into(), AMQPValue::LongUInt(step));
        arguments.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString("".into()),
        );
        arguments.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(queue.into()),
        );
        arguments.insert(
            "x-expires".into(),
            AMQPValue::LongUInt(step.saturating_add(60_000)),
        );
        let link = self.link()?;
        let declare = async {
            link.publisher()
                .await?
                .queue_declare(
                    retry_queue.as_str().into(),
                    QueueDeclareOptions {
                        durable: true,
                        ..QueueDeclareOptions::default()
                    },
                    arguments,
                )
                .await
                .map_err(|e| self.connection_error(e, format!("declaring {retry_queue}")))
        };
        tokio::time::timeout(self.config().publish_timeout, declare)
            .await
            .map_err(|_| self.publish_timed_out(&retry_queue))??;
        self.copy_to_queue(&retry_queue, payload, wire::delayed(properties))
            .await
    }

    pub(crate) fn publish_timed_out(&self, routing_key: &str) -> Error {
        Error::new(
            ErrorKind::Timeout,
            format!(
                "no confirm for a publish to {routing_key} within {:?} (connection lost or broker blocked); whether it was stored is unknown",
                self.config().publish_timeout
            ),
        )
    }

    /// The broker's verdict on one publish, within the publish timeout.
    pub(crate) async fn confirmed(
        &self,
        routing_key: &str,
        confirm: lapin::PublisherConfirm,
    ) -> Result<()> {
        self.within_publish_timeout(routing_key, self.verdict(routing_key, confirm))
            .await
    }

    /// [`Shared::confirmed`] without its timeout.
    pub(crate) async fn verdict(
        &self,
        routing_key: &str,
        confirm: lapin::PublisherConfirm,
    ) -> Result<()> {
        let confirmation = confirm.await.map_err(|e| {
            self.connection_error(
                e,
                format!("waiting for the confirm of a publish to {routing_key}"),
            )
        })?;
        match confirmation {
            Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
            Confirmation::Ack(Some(returned)) => Err(Error::new(
                ErrorKind::Rejected,
                format!(
                    "unroutable: no queue is bound to {routing_key} on exchange {:?} (no consumer group exists for the topic); the broker returned it ({} {})",
                    returned.delivery.exchange.as_str(),
                    returned.reply_code,
                    returned.reply_text
                ),
            )),
            Confirmation::Nack(_) => Err(Error::new(
                ErrorKind::Rejected,
                format!(
                    "the broker refused to store a message for {routing_key} (negative confirm)"
                ),
            )
            .with_retryable(true)),
        }
    }
}

/// The retry-queue TTL a delay is rounded up to, in milliseconds: steps of at most a
/// third (10, 12, 15, 20, 25, 30, 40, 50, 60, 80 times a power of ten, at least 10 ms), so a
/// group needs few retry queues however its delays are jittered.
fn delay_step(delay: Duration) -> u32 {
    const STEPS: [u64; 10] = [10, 12, 15, 20, 25, 30, 40, 50, 60, 80];
    let wanted = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
    let mut scale = 1u64;
    while scale <= u64::from(u32::MAX) {
        if let Some(step) = STEPS.iter().map(|s| s * scale).find(|s| *s >= wanted) {
            return u32::try_from(step).unwrap_or(u32::MAX);
        }
        scale *= 10;
    }
    u32::MAX
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future `f` returns, without calling it.
    fn future_size<A, B, F>(_: &impl FnOnce(A, B) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// The hot path's publish future holds lapin's publish future once, not a second copy of
    /// it beside a timer (see [`Shared::start_publish_raw`]). The bound leaves room for this
    /// crate's own state (about 600 bytes), not for another copy.
    #[test]
    fn a_publish_future_holds_lapins_once() {
        // The closures name their arguments' lifetime, so each returns one type of future.
        let ours = future_size(&|shared: &'static Shared, message: &'static Message| {
            shared.start_publish("", "", message, None)
        });
        let lapins = future_size(
            &|channel: &'static lapin::Channel, payload: &'static [u8]| {
                channel.basic_publish(
                    "".into(),
                    "".into(),
                    BasicPublishOptions::default(),
                    payload,
                    lapin::BasicProperties::default(),
                )
            },
        );
        assert!(
            ours <= lapins + 1024,
            "start_publish's future is {ours} bytes, lapin's publish future {lapins}"
        );
    }
}
