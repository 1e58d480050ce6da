//! Pub/sub mode: PUBLISH / SUBSCRIBE, at most once.

use std::sync::Arc;

use async_trait::async_trait;
use futures::StreamExt;
use helix_messaging_core::observe::connection::ConnectionState;
use helix_messaging_core::{
    Acknowledge, Delivery, DeliveryInfo, Error, Result, Settlement, StartPosition,
    SubscribeOptions, Subscription, within,
};
use tokio_util::sync::CancellationToken;

use crate::codec;
use crate::config::PUBSUB_NAME;
use crate::error::from_redis;
use crate::shared::Shared;

pub(crate) async fn subscribe(
    shared: &Arc<Shared>,
    topic: &str,
    options: SubscribeOptions,
) -> Result<Subscription> {
    if options.group.is_some() {
        return Err(Error::unsupported(
            PUBSUB_NAME,
            "consumer groups (pub/sub delivers every message to every subscriber; use redis-streams)",
        ));
    }
    if options.start != StartPosition::Latest {
        return Err(Error::unsupported(
            PUBSUB_NAME,
            "starting from history (pub/sub keeps none; use redis-streams)",
        ));
    }
    // Subscribed before returning, so every later publish reaches this subscription.
    let connection = connect(shared, topic).await?;
    let topic: Arc<str> = Arc::from(topic);
    // Pulled by the subscription itself: no task between the connection and the consumer, so
    // a message costs no extra hand-over. The connection is re-made on the next poll after it
    // is lost.
    let state = Puller {
        shared: shared.clone(),
        topic: topic.clone(),
        messages: Some(connection.into_on_message().boxed()),
        cancel: shared.shutdown.child_token(),
        slots: Arc::new(tokio::sync::Semaphore::new(options.prefetch.max(1))),
        state: shared.subscription_state(),
    };
    Ok(Subscription::new(
        topic,
        None,
        Box::pin(futures::stream::unfold(state, Puller::next)),
    ))
}

/// A pub/sub subscription's state: the message stream of its connection, while it has one.
struct Puller {
    shared: Arc<Shared>,
    topic: Arc<str>,
    messages: Option<futures::stream::BoxStream<'static, redis::Msg>>,
    /// Cancelled when the broker closes.
    cancel: CancellationToken,
    /// One per delivery the application may hold unsettled (`prefetch`). Pub/sub cannot make
    /// the server wait: while every slot is taken, what arrives waits in the client.
    slots: Arc<tokio::sync::Semaphore>,
    /// Its connection's share of `messaging_connection_up`.
    state: ConnectionState,
}

impl Puller {
    async fn next(mut self) -> Option<(Result<Delivery>, Self)> {
        loop {
            let Some(messages) = self.messages.as_mut() else {
                tracing::warn!(topic = %self.topic, "Redis pub/sub connection lost; subscribing again");
                let (shared, topic) = (self.shared.clone(), self.topic.clone());
                let fresh = shared
                    .retry_until_cancelled("subscribing again", &self.cancel, || {
                        connect(&shared, &topic)
                    })
                    .await?;
                self.shared.subscription_reconnected(&self.state);
                self.messages = Some(fresh.into_on_message().boxed());
                continue;
            };
            let slot = tokio::select! {
                biased;
                () = self.cancel.cancelled() => return None,
                slot = self.slots.clone().acquire_owned() => slot.ok()?,
            };
            let next = tokio::select! {
                biased;
                () = self.cancel.cancelled() => return None,
                next = messages.next() => next,
            };
            match next {
                Some(message) => {
                    let message = codec::from_pubsub_body(message.get_payload_bytes());
                    // A TTL travels only in the envelope; where it does, an expired message is
                    // dropped as on every other backend.
                    let now = std::time::SystemTime::now();
                    if codec::expired(&message, message.timestamp(), now) {
                        continue;
                    }
                    let acker = PubSubAcker {
                        closed: self.cancel.clone(),
                        _slot: slot,
                    };
                    return Some((Ok(delivery(&self.topic, message, acker)), self));
                }
                None => {
                    self.state.set(false);
                    self.messages = None;
                }
            }
        }
    }
}

async fn connect(shared: &Shared, topic: &str) -> Result<redis::aio::PubSub> {
    let (client, address) = shared.primary.client().await?;
    let doing = format!("connecting to {address} for SUBSCRIBE");
    let mut connection = within(
        shared.config.connect_timeout,
        &doing,
        client.get_async_pubsub(),
    )
    .await?
    .map_err(|e| from_redis(e, &doing))?;
    connection
        .subscribe(topic)
        .await
        .map_err(|e| from_redis(e, format!("SUBSCRIBE {topic}")))?;
    Ok(connection)
}

/// The delivery of a received pub/sub message: always a first attempt.
fn delivery(
    topic: &Arc<str>,
    message: helix_messaging_core::Message,
    acker: PubSubAcker,
) -> Delivery {
    Delivery::new(
        Arc::new(message),
        DeliveryInfo {
            topic: topic.clone(),
            group: None,
            attempt: 1,
            redelivered: false,
            position: None,
        },
        Box::new(acker),
    )
}

/// A pub/sub delivery is final when it arrives: ack and reject have nothing to tell the
/// server, and requeue is impossible. After the broker is closed nothing can be settled, and
/// saying `Ok` would be a lie. Holds a prefetch slot until it is settled or dropped.
struct PubSubAcker {
    /// The broker's shutdown token.
    closed: CancellationToken,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

#[async_trait]
impl Acknowledge for PubSubAcker {
    async fn settle(self: Box<Self>, outcome: Settlement) -> Result<()> {
        if self.closed.is_cancelled() {
            return Err(Error::closed("the redis broker"));
        }
        match outcome {
            Settlement::Ack | Settlement::Reject => Ok(()),
            Settlement::Requeue | Settlement::RequeueAfter(_) => Err(Error::unsupported(
                PUBSUB_NAME,
                "requeue (pub/sub delivers at most once; retry in process or use redis-streams)",
            )),
        }
    }
}
