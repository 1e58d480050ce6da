//! Pub/sub mode: PUBLISH / SUBSCRIBE, at most once.

use std::sync::Arc;

use async_trait::async_trait;
use futures::{FutureExt, StreamExt};
use helix_messaging_core::{
    Acknowledge, Delivery, DeliveryInfo, Error, ErrorKind, Result, Settlement, StartPosition,
    SubscribeOptions, Subscription, within,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{PUBSUB_NAME, Shared, codec, error::from_redis};

/// Most messages handed to the subscription stream at once.
const HANDOVER_BATCH: usize = 256;

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
    // Pub/sub cannot pause the server, so the buffer is what absorbs bursts: prefetch
    // messages' worth of batches.
    let (tx, rx) = mpsc::channel(options.prefetch.div_ceil(HANDOVER_BATCH).max(2));
    let cancel = shared.shutdown.child_token();
    shared.tasks.spawn(read_loop(
        shared.clone(),
        topic.clone(),
        connection,
        tx,
        cancel.clone(),
    ));
    Ok(Subscription::new(
        topic,
        None,
        crate::channel_stream(rx, cancel),
    ))
}

async fn connect(shared: &Shared, topic: &str) -> Result<redis::aio::PubSub> {
    let address = shared.config.address();
    let doing = format!("connecting to {address} for SUBSCRIBE");
    let mut connection = within(
        shared.config.connect_timeout,
        &doing,
        shared.client.get_async_pubsub(),
    )
    .await?
    .map_err(|e| from_redis(e, &doing))?;
    connection
        .subscribe(topic)
        .await
        .map_err(|e| from_redis(e, format!("SUBSCRIBE {topic}")))?;
    Ok(connection)
}

/// Forwards messages until cancelled; when the connection drops, reconnects with backoff
/// and subscribes again.
async fn read_loop(
    shared: Arc<Shared>,
    topic: Arc<str>,
    mut connection: redis::aio::PubSub,
    tx: mpsc::Sender<Vec<Result<Delivery>>>,
    cancel: CancellationToken,
) {
    loop {
        {
            let mut messages = connection.on_message();
            loop {
                let next = tokio::select! {
                    () = cancel.cancelled() => return,
                    next = messages.next() => next,
                };
                let Some(message) = next else { break };
                let mut batch = vec![delivery(&topic, message.get_payload_bytes())];
                // Whatever else has already arrived goes in the same hand-over.
                while batch.len() < HANDOVER_BATCH {
                    match messages.next().now_or_never() {
                        Some(Some(message)) => {
                            batch.push(delivery(&topic, message.get_payload_bytes()));
                        }
                        _ => break,
                    }
                }
                let sent = tokio::select! {
                    () = cancel.cancelled() => return,
                    sent = tx.send(batch) => sent,
                };
                if sent.is_err() {
                    return;
                }
            }
        }
        tracing::warn!(%topic, "Redis pub/sub connection lost; subscribing again");
        let reconnected = shared
            .retry_until_cancelled("subscribing again", &cancel, || connect(&shared, &topic))
            .await;
        match reconnected {
            Some(fresh) => connection = fresh,
            None => return,
        }
    }
}

fn delivery(topic: &Arc<str>, payload: &[u8]) -> Result<Delivery> {
    let message = codec::decode(payload).map_err(|e| {
        Error::new(
            ErrorKind::Serialization,
            format!("a message on {topic} was dropped: {}", e.message()),
        )
    })?;
    Ok(Delivery::new(
        Arc::new(message),
        DeliveryInfo {
            topic: topic.clone(),
            group: None,
            attempt: 1,
            redelivered: false,
            position: None,
        },
        Box::new(PubSubAcker),
    ))
}

/// A pub/sub delivery is final when it arrives: ack and reject have nothing to tell the
/// server, and requeue is impossible.
struct PubSubAcker;

#[async_trait]
impl Acknowledge for PubSubAcker {
    async fn settle(self: Box<Self>, outcome: Settlement) -> Result<()> {
        match outcome {
            Settlement::Ack | Settlement::Reject => Ok(()),
            Settlement::Requeue => Err(Error::unsupported(
                PUBSUB_NAME,
                "requeue (pub/sub delivers at most once; retry in process or use redis-streams)",
            )),
        }
    }
}
