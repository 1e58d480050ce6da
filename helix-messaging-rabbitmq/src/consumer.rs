//! The subscription side: what a subscription is, how its queue and consumer are set up on
//! a connection (and again on every new one), the stream of its deliveries, the channel they
//! share, and how a delivery is screened and settled before and after the application sees it.
//!
//! The stream yields deliveries as the broker sent them, each with the context it arrived in;
//! the acker module (above this one) turns each into the application's
//! [`Delivery`](helix_messaging_core::Delivery).

use std::sync::Arc;

use futures::StreamExt;
use helix_messaging_core::{Error, ErrorKind, Result, within};
use lapin::Channel;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    BasicRejectOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};

use crate::error::from_lapin;
use crate::link::{Link, Supervisor};
use crate::shared::Shared;
use crate::topology::{Queue, QueueType};
use crate::wire;

/// What a subscription is, so it can be re-created on a new connection.
pub(crate) struct SubscriptionSpec {
    /// The topic, or the queue's name for
    /// [`RabbitBroker::consume`](crate::RabbitBroker::consume).
    pub(crate) topic: Arc<str>,
    pub(crate) group: Option<Arc<str>>,
    pub(crate) prefetch: u16,
    /// Consume this declared queue as it is instead of declaring and binding a group queue.
    pub(crate) declared_queue: bool,
    /// The queue of a subscription without a group, `<topic>.private-<uuid>`: named here so
    /// that a reconnect declares the same queue again instead of a new, empty one.
    pub(crate) private_queue: Option<String>,
}

impl SubscriptionSpec {
    /// The name of a named group's queue, `<topic>.<group>`; `None` for a private
    /// subscription (see [`SubscriptionSpec::private_queue`]).
    pub(crate) fn group_queue(&self) -> Option<String> {
        self.group
            .as_ref()
            .map(|group| format!("{}.{group}", self.topic))
    }
}

/// Declare the queue, bind it, set the prefetch and start consuming on a new channel, within
/// the connect timeout (a broker that is still starting may never answer).
pub(crate) async fn open_consumer(
    shared: &Shared,
    spec: &SubscriptionSpec,
    link: &Link,
) -> Result<(Channel, lapin::Consumer, String)> {
    within(
        shared.config().connect_timeout,
        format!("setting up the consumer for {}", spec.topic),
        open_consumer_unbounded(shared, spec, link),
    )
    .await?
}

async fn open_consumer_unbounded(
    shared: &Shared,
    spec: &SubscriptionSpec,
    link: &Link,
) -> Result<(Channel, lapin::Consumer, String)> {
    let lapin_err = |e, doing: String| shared.connection_error(e, doing);
    let channel = link
        .connection
        .create_channel()
        .await
        .map_err(|e| lapin_err(e, "opening a consumer channel".into()))?;
    channel
        .basic_qos(spec.prefetch, BasicQosOptions::default())
        .await
        .map_err(|e| lapin_err(e, "setting the prefetch".into()))?;
    let queue_name = if spec.declared_queue {
        spec.topic.to_string()
    } else {
        declare_group_queue(shared, spec, &channel).await?
    };
    let consumer = channel
        .basic_consume(
            queue_name.as_str().into(),
            format!("helix-{}", uuid::Uuid::new_v4().simple()).into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| lapin_err(e, format!("consuming from {queue_name}")))?;
    Ok((channel, consumer, queue_name))
}

/// Declare the subscription's queue and bind it to its topic; returns the queue's name.
pub(crate) async fn declare_group_queue(
    shared: &Shared,
    spec: &SubscriptionSpec,
    channel: &Channel,
) -> Result<String> {
    let config = shared.config();
    let lapin_err = |e, doing: String| shared.connection_error(e, doing);
    let private = spec.group.is_none();
    let name = spec
        .group_queue()
        .or_else(|| spec.private_queue.clone())
        .unwrap_or_default();
    let mut queue = match (private, config.queue_type) {
        (false, QueueType::Quorum) => Queue::quorum(name),
        _ => Queue::classic(name),
    };
    if queue.queue_type == QueueType::Classic && config.max_priority > 0 {
        queue = queue.max_priority(config.max_priority);
    }
    if let Some(dlq) = &config.dead_letter_queue {
        queue = queue.dead_letter_to_queue(dlq.as_str());
    }
    let mut arguments = queue.arguments();
    let expires = if private {
        Some(config.private_queue_expires)
    } else {
        config.group_queue_expires
    };
    if let Some(expires) = expires {
        arguments.insert(
            "x-expires".into(),
            AMQPValue::LongUInt(u32::try_from(expires.as_millis()).unwrap_or(u32::MAX)),
        );
    }
    // A private queue is neither exclusive nor auto-delete: either would delete it with a
    // lost connection, and with it what was published until the reconnect.
    let declared = channel
        .queue_declare(
            queue.name.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            arguments,
        )
        .await
        .map_err(|e| lapin_err(e, format!("declaring queue {:?}", queue.name)))?;
    let queue_name = declared.name().as_str().to_owned();
    // Bound before returning, so every later publish to the topic reaches the queue.
    channel
        .queue_bind(
            queue_name.as_str().into(),
            config.exchange.as_str().into(),
            (*spec.topic).into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| lapin_err(e, format!("binding {queue_name} to {}", spec.topic)))?;
    Ok(queue_name)
}

/// A delivery that [`ConsumerContext::screen`] let through: the context it arrived in, the
/// delivery, and whether it is an unseen return (see [`ConsumerContext::delivery`]).
pub(crate) type Screened = (Arc<ConsumerContext>, lapin::message::Delivery, bool);

/// A subscription's consumer, re-created on a new connection when the old one is lost. Its
/// channel belongs to the [`ConsumerContext`], which its deliveries share.
pub(crate) struct ConsumerStream {
    /// The consumer, while it has one.
    current: Option<Current>,
    context: Arc<ConsumerContext>,
    spec: SubscriptionSpec,
    /// Set once an unrecoverable failure has been reported: the stream then ends.
    finished: bool,
}

impl ConsumerStream {
    /// The stream of a consumer just opened on `link` (by [`open_consumer`]).
    pub(crate) fn new(
        shared: &Arc<Shared>,
        spec: SubscriptionSpec,
        link: Arc<Link>,
        queue: String,
        channel: Channel,
        consumer: lapin::Consumer,
    ) -> Self {
        ConsumerStream {
            current: Some(Current::new(consumer.clone(), link, &shared.supervisor)),
            context: Arc::new(ConsumerContext::new(
                shared, &spec, queue, channel, consumer,
            )),
            spec,
            finished: false,
        }
    }

    /// The next delivery to hand out, as [`Screened`].
    pub(crate) async fn next(mut self) -> Option<(Result<Screened>, Self)> {
        let supervisor = self.context.shared.supervisor.clone();
        loop {
            if self.finished || supervisor.is_closed() {
                return None;
            }
            let Some(current) = self.current.as_mut() else {
                // Lost: wait for a new connection and rebuild on it.
                let Some(link) = supervisor.wait_usable().await else {
                    if supervisor.is_closed() {
                        return None;
                    }
                    self.finished = true;
                    return Some((Err(supervisor.unavailable()), self));
                };
                match open_consumer(&self.context.shared, &self.spec, &link).await {
                    Ok((channel, consumer, queue)) => {
                        tracing::info!(%queue, "consumer re-created on the new connection");
                        self.current = Some(Current::new(consumer.clone(), link, &supervisor));
                        self.context = Arc::new(ConsumerContext::new(
                            &self.context.shared,
                            &self.spec,
                            queue,
                            channel,
                            consumer,
                        ));
                    }
                    Err(err) if err.is_retryable() => {
                        tracing::warn!(error = %err, "re-creating the consumer failed; retrying");
                        tokio::time::sleep(supervisor.config().reconnect_delay).await;
                    }
                    Err(err) => {
                        self.finished = true;
                        return Some((Err(err), self));
                    }
                }
                continue;
            };
            let next = tokio::select! {
                next = current.consumer.next() => next,
                () = &mut current.link_lost => None,
            };
            match next {
                Some(Ok(delivery)) => {
                    if let Some((delivery, unseen)) = self.context.screen(delivery).await {
                        return Some((Ok((self.context.clone(), delivery, unseen)), self));
                    }
                }
                // After close, the channel's end shows up as an error or an end: that is the
                // end of the subscription, not something to report.
                _ if supervisor.is_closed() => return None,
                lost => {
                    let why = match lost {
                        Some(Err(err)) => err.to_string(),
                        _ => "consumer cancelled".to_owned(),
                    };
                    tracing::warn!(queue = %self.context.queue, why, "consumer lost; re-creating it");
                    self.release();
                    // Starts reconnecting if the connection itself is gone.
                    let _ = supervisor.usable();
                }
            }
        }
    }

    /// Give up the lost consumer and close its channel now: its deliveries are being
    /// returned to the queue anyway.
    fn release(&mut self) {
        self.current = None;
        self.context.channel.close(false);
    }
}

/// A live consumer and the watch on the link it was created on.
struct Current {
    consumer: lapin::Consumer,
    /// Resolves once the link is replaced or found unusable: a consumer does not always learn
    /// that its connection died. Made once per consumer rather than once per delivery.
    link_lost: futures::future::BoxFuture<'static, ()>,
}

impl Current {
    fn new(consumer: lapin::Consumer, link: Arc<Link>, supervisor: &Arc<Supervisor>) -> Self {
        let supervisor = supervisor.clone();
        let link_lost = Box::pin(async move {
            tokio::select! {
                () = supervisor.replaced(&link) => {}
                // The last resort: a periodic look at the link itself.
                () = async {
                    while link.usable() {
                        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    }
                } => {}
            }
        });
        Current {
            consumer,
            link_lost,
        }
    }
}

/// A consumer's channel. It stays open while the subscription or any of its unsettled
/// deliveries is alive, so a delivery can still be settled after its subscription was dropped
/// (`stream.take(n).for_each_concurrent(..)` drops the stream before the last acks); once
/// neither is left it is closed, and RabbitMQ returns whatever is still unacked. A private
/// subscription's queue is deleted then too.
struct ConsumerChannel {
    parts: std::sync::Mutex<Option<(Channel, lapin::Consumer)>>,
    private_queue: Option<String>,
    /// Where unseen returns are remembered: the broker and the consumer's queue.
    returns: (Arc<Shared>, String),
}

impl ConsumerChannel {
    fn new(
        channel: Channel,
        consumer: lapin::Consumer,
        private_queue: Option<String>,
        returns: (Arc<Shared>, String),
    ) -> Self {
        ConsumerChannel {
            parts: std::sync::Mutex::new(Some((channel, consumer))),
            private_queue,
            returns,
        }
    }

    /// Close the channel; with `finished`, the subscription is over and its private queue
    /// goes too (a lost consumer keeps it, for the consumer that replaces it).
    fn close(&self, finished: bool) {
        let parts = self
            .parts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some((channel, consumer)) = parts {
            let delete = self.private_queue.clone().filter(|_| finished);
            let returns = (finished && delete.is_none()).then(|| self.returns.clone());
            close_consumer(channel, consumer, delete, returns);
        }
    }
}

impl Drop for ConsumerChannel {
    fn drop(&mut self) {
        self.close(true);
    }
}

/// Close `channel` in the background, then drop `consumer`: dropped earlier, lapin would
/// cancel it concurrently with the close, and the failed cancel can surface as an error
/// elsewhere on the connection. Closing the channel returns its unacked deliveries. With
/// `delete`, that queue is deleted first. With `returns`, the consumer is cancelled first and
/// what it had prefetched but not handed out is remembered as unseen (see [`Shared::unseen`]),
/// so those returns keep their place in the queue and are not counted as attempts.
pub(crate) fn close_consumer(
    channel: Channel,
    mut consumer: lapin::Consumer,
    delete: Option<String>,
    returns: Option<(Arc<Shared>, String)>,
) {
    if !channel.status().connected() {
        return;
    }
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(async move {
            if let Some((shared, queue)) = returns
                && channel
                    .basic_cancel(consumer.tag(), BasicCancelOptions::default())
                    .await
                    .is_ok()
            {
                // After cancel-ok nothing more arrives: what the consumer still yields was
                // prefetched and never handed out.
                while let Ok(Some(Ok(delivery))) =
                    tokio::time::timeout(std::time::Duration::from_millis(500), consumer.next())
                        .await
                {
                    if let Some(id) = wire::message_id(&delivery.properties) {
                        shared.note_unseen(&queue, id, wire::uncounted_redelivery(&delivery));
                    }
                }
            }
            if let Some(queue) = delete
                && let Err(err) = channel
                    .queue_delete(queue.as_str().into(), Default::default())
                    .await
            {
                tracing::debug!(%queue, error = %err, "deleting a private queue");
            }
            if let Err(err) = channel.close(200, "consumer dropped".into()).await {
                tracing::debug!(error = %err, "closing a consumer channel");
            }
            drop(consumer);
        });
    }
}

/// What every delivery of one subscription shares.
pub(crate) struct ConsumerContext {
    pub(crate) shared: Arc<Shared>,
    pub(crate) topic: Arc<str>,
    pub(crate) group: Option<Arc<str>>,
    pub(crate) queue: String,
    channel: ConsumerChannel,
}

impl ConsumerContext {
    fn new(
        shared: &Arc<Shared>,
        spec: &SubscriptionSpec,
        queue: String,
        channel: Channel,
        consumer: lapin::Consumer,
    ) -> Self {
        ConsumerContext {
            shared: shared.clone(),
            topic: spec.topic.clone(),
            group: spec.group.clone(),
            channel: ConsumerChannel::new(
                channel,
                consumer,
                spec.private_queue.clone(),
                (shared.clone(), queue.clone()),
            ),
            queue,
        }
    }

    /// What must happen to a delivery before the application sees it: `None` when it was
    /// dealt with here.
    ///
    /// - Its TTL has passed: acked and dropped (never dead-lettered).
    /// - A native redelivery the queue does not count (a classic queue after a consumer
    ///   crashed or its channel closed): a copy with the attempt that was lost counted is
    ///   published to the queue and the original acked, so a crash loop climbs 1, 2, 3, …
    ///   and reaches a retry limit. If the copy fails, the delivery is handed out with its
    ///   estimated attempt instead.
    /// - A return of one this broker's subscriptions had prefetched and never handed out:
    ///   delivered in its place, its redelivered flag no attempt (`Some((delivery, true))`).
    async fn screen(
        &self,
        delivery: lapin::message::Delivery,
    ) -> Option<(lapin::message::Delivery, bool)> {
        let queue = &self.queue;
        if wire::expired(&delivery.properties, std::time::SystemTime::now()) {
            if let Err(err) = settle_delivery(self, &delivery.acker, AckAction::Ack).await {
                tracing::warn!(queue, error = %err, "dropping an expired message failed");
            }
            return None;
        }
        if !wire::uncounted_redelivery(&delivery) {
            return Some((delivery, false));
        }
        // Returned unseen by a subscription of this broker: not an attempt, and it keeps its
        // place in the queue; unless it was a return not counted yet when that subscription
        // prefetched it (a crashed consumer's), which is counted now as it would have been
        // there.
        if let Some(id) = wire::message_id(&delivery.properties)
            && self.shared.take_unseen(queue, &id) == Some(false)
        {
            return Some((delivery, true));
        }
        let counted = wire::attempts_in_header(&delivery.properties) + 1;
        let properties = wire::with_attempts(&delivery.properties, counted);
        let copied = self
            .shared
            .copy_to_queue(queue, &delivery.data, properties)
            .await;
        match copied {
            Ok(()) => {
                // If this fails the broker returns the original as well: a duplicate, never
                // a loss.
                if let Err(err) = settle_delivery(self, &delivery.acker, AckAction::Ack).await {
                    tracing::warn!(queue, error = %err, "acking a re-counted redelivery failed");
                }
                None
            }
            Err(err) => {
                tracing::warn!(queue, error = %err, "re-counting a redelivery failed; delivering it with an estimated attempt");
                Some((delivery, false))
            }
        }
    }
}

/// What a settlement is doing, for its errors: "settling (Ack) a delivery from <queue>".
struct Settling<'a> {
    action: AckAction,
    queue: &'a str,
}

impl std::fmt::Display for Settling<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "settling ({:?}) a delivery from {}",
            self.action, self.queue
        )
    }
}

/// What to tell the broker about one delivery.
#[derive(Debug, Clone, Copy)]
pub(crate) enum AckAction {
    Ack,
    Reject,
    /// Back to the queue natively (the redelivered flag is set).
    Requeue,
}

/// Settle one delivery on its channel. A settlement lapin refuses because the channel is
/// closed (the broker then returns the delivery to its queue) is an error, never `Ok`; one
/// on a channel whose connection just died may never be answered, so it is bounded by the
/// publish timeout.
pub(crate) async fn settle_delivery(
    context: &ConsumerContext,
    acker: &lapin::Acker,
    action: AckAction,
) -> Result<()> {
    let queue = &context.queue;
    // After close nothing is sent: an ack written to a connection being torn down can wait
    // for the whole timeout (seen once under load) instead of failing.
    if context.shared.supervisor.is_closed() {
        return Err(Error::closed("the rabbitmq broker"));
    }
    // Written out only for an error: a settlement is made for every delivery.
    let doing = Settling { action, queue };
    let settle = async {
        match action {
            AckAction::Ack => acker.ack(BasicAckOptions::default()).await,
            AckAction::Reject => acker.reject(BasicRejectOptions { requeue: false }).await,
            AckAction::Requeue => {
                acker
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..BasicNackOptions::default()
                    })
                    .await
            }
        }
    };
    let done = within(context.shared.config().publish_timeout, &doing, settle)
        .await?
        .map_err(|e| from_lapin(e, &doing))?;
    if done {
        return Ok(());
    }
    let supervisor = &context.shared.supervisor;
    if supervisor.is_closed() {
        return Err(Error::closed("the rabbitmq broker"));
    }
    Err(Error::new(
        ErrorKind::Connection,
        format!(
            "{doing}: its channel is closed, so nothing was settled; the broker returns the message to {queue}"
        ),
    )
    .with_retryable(false))
}
