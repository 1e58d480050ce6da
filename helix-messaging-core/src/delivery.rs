//! A received message and the handle that settles it with the broker.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;

use crate::error::{Error, ErrorKind, Result};
use crate::message::Message;

/// Where a delivery sits in its backend, for diagnostics and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Position {
    /// A Kafka partition and offset.
    Offset {
        /// Partition number.
        partition: i32,
        /// Offset inside the partition.
        offset: i64,
    },
    /// A Redis stream entry id (`<ms>-<seq>`).
    StreamId(String),
    /// An AMQP delivery tag (unique per channel).
    DeliveryTag(u64),
    /// A backend-assigned sequence number (the memory broker's publish order).
    Sequence(u64),
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Position::Offset { partition, offset } => {
                write!(f, "partition {partition} offset {offset}")
            }
            Position::StreamId(id) => write!(f, "stream id {id}"),
            Position::DeliveryTag(tag) => write!(f, "delivery tag {tag}"),
            Position::Sequence(seq) => write!(f, "sequence {seq}"),
        }
    }
}

/// Facts about one delivery of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryInfo {
    /// The topic the message was received from.
    pub topic: Arc<str>,
    /// The consumer group it was delivered to, if the subscription named one.
    pub group: Option<Arc<str>>,
    /// 1 on the first delivery, incremented on every redelivery.
    pub attempt: u32,
    /// Whether this message was delivered before (to this or another group member).
    pub redelivered: bool,
    /// Where the message sits in the backend, when it has such a notion.
    pub position: Option<Position>,
}

/// How a delivery is settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settlement {
    /// Processed: remove it for good.
    Ack,
    /// Not processed: hand it out again (to any member of the group), attempt + 1.
    Requeue,
    /// Not processed: hand it out again to the same group, attempt + 1, but not before this
    /// delay has passed. Only sent to an [`Acknowledge`] whose
    /// [`delays_requeue`](Acknowledge::delays_requeue) is true.
    RequeueAfter(Duration),
    /// Not processable: remove it without redelivery; backends with a native dead-letter
    /// route send it there.
    Reject,
}

/// Backend side of settlement, implemented by each adapter once per delivery.
///
/// Adapters implement this; applications call [`Delivery::ack`] and friends instead.
#[async_trait]
pub trait Acknowledge: Send + Sync + 'static {
    /// Tell the broker the outcome. Called at most once per delivery (the [`Settler`]
    /// guarantees it).
    ///
    /// # Errors
    /// The backend's error when it could not record the outcome (connection lost, delivery
    /// no longer held because its subscription closed or its ack deadline passed, …). The
    /// message is then redelivered by the backend's own rules.
    async fn settle(self: Box<Self>, outcome: Settlement) -> Result<()>;

    /// Settle without awaiting anything, where recording `outcome` needs no I/O (a local
    /// commit point, an in-process queue): `Some` with the outcome's result, and
    /// [`settle`](Acknowledge::settle) is not called; `None` when `outcome` needs
    /// `settle`, having changed nothing. The [`Settler`] asks this first: a settlement done
    /// here costs no boxed future. The default settles nothing here.
    fn settle_now(&mut self, outcome: Settlement) -> Option<Result<()>> {
        let _ = outcome;
        None
    }

    /// Whether this delivery can be settled with [`Settlement::RequeueAfter`]: the backend
    /// holds the message back itself, without the consumer keeping it (the backend declares
    /// [`Capabilities::delayed_requeue`](crate::Capabilities::delayed_requeue)).
    fn delays_requeue(&self) -> bool {
        false
    }
}

/// The settle-once handle of a delivery.
///
/// Settling is defined exactly once: the first `ack`, `nack` or `reject` reaches the broker,
/// every later call returns [`ErrorKind::AlreadySettled`] and changes nothing. A settlement
/// whose backend call fails is final too; the backend redelivers by its own rules.
///
/// Dropping an unsettled `Settler` tells the broker nothing: the message stays in flight until
/// its subscription is dropped or the backend's ack deadline passes, and is then redelivered.
pub struct Settler {
    acker: Mutex<Option<Box<dyn Acknowledge>>>,
}

impl Settler {
    /// Wrap a backend acknowledger.
    pub fn new(acker: Box<dyn Acknowledge>) -> Self {
        Settler {
            acker: Mutex::new(Some(acker)),
        }
    }

    /// The backend acknowledger, unless already settled: for a wrapper that adds to what
    /// settling does while keeping the backend's own fast path
    /// ([`Acknowledge::settle_now`]).
    pub(crate) fn into_acker(self) -> Option<Box<dyn Acknowledge>> {
        self.acker.into_inner()
    }

    /// Whether this delivery has been settled (successfully or not).
    pub fn is_settled(&self) -> bool {
        self.acker.lock().is_none()
    }

    /// Settle with `outcome`.
    ///
    /// # Errors
    /// [`ErrorKind::AlreadySettled`] on a second call; otherwise the backend's error.
    pub async fn settle(&self, outcome: Settlement) -> Result<()> {
        let outcome = match outcome {
            Settlement::RequeueAfter(delay) if delay.is_zero() => Settlement::Requeue,
            other => other,
        };
        let acker = {
            let mut slot = self.acker.lock();
            if let (Settlement::RequeueAfter(_), Some(acker)) = (outcome, slot.as_ref())
                && !acker.delays_requeue()
            {
                return Err(Error::new(
                    ErrorKind::Unsupported,
                    "this backend cannot delay a requeue (Capabilities::delayed_requeue is false); the delivery is still unsettled",
                ));
            }
            slot.take()
        };
        match acker {
            Some(mut acker) => match acker.settle_now(outcome) {
                Some(settled) => settled,
                None => acker.settle(outcome).await,
            },
            None => Err(Error::new(
                ErrorKind::AlreadySettled,
                format!("cannot {outcome:?}: the delivery was already settled"),
            )),
        }
    }

    /// Processed successfully: remove the message.
    ///
    /// # Errors
    /// As [`Settler::settle`].
    pub async fn ack(&self) -> Result<()> {
        self.settle(Settlement::Ack).await
    }

    /// Whether [`Settler::requeue_after`] is available for this delivery: the backend holds a
    /// delayed requeue itself ([`Acknowledge::delays_requeue`], declared by
    /// [`Capabilities::delayed_requeue`](crate::Capabilities::delayed_requeue)).
    pub fn delays_requeue(&self) -> bool {
        self.acker
            .lock()
            .as_ref()
            .is_some_and(|a| a.delays_requeue())
    }

    /// [`Settler::delays_requeue`], under its name before 0.2.
    #[deprecated(since = "0.2.0", note = "renamed `delays_requeue`")]
    pub fn can_delay(&self) -> bool {
        self.delays_requeue()
    }

    /// Not processed: hand the message out again to this delivery's group (any member),
    /// attempt + 1 ([`Settlement::Requeue`]).
    ///
    /// # Errors
    /// As [`Settler::settle`]; [`ErrorKind::Unsupported`] from backends without redelivery.
    pub async fn requeue(&self) -> Result<()> {
        self.settle(Settlement::Requeue).await
    }

    /// Not processed: hand the message out again to this delivery's group, attempt + 1, once
    /// `delay` has passed ([`Settlement::RequeueAfter`]). The broker holds it meanwhile:
    /// nothing in this process waits, and a crash of this process loses nothing. A zero delay
    /// is a plain requeue.
    ///
    /// # Errors
    /// [`ErrorKind::Unsupported`] when the backend cannot delay a requeue (see
    /// [`Settler::delays_requeue`]); the delivery is then still unsettled and can be settled
    /// otherwise. Otherwise as [`Settler::settle`].
    pub async fn requeue_after(&self, delay: Duration) -> Result<()> {
        self.settle(Settlement::RequeueAfter(delay)).await
    }

    /// [`Settler::requeue_after`], under its name before 0.2.
    ///
    /// # Errors
    /// As [`Settler::requeue_after`].
    #[deprecated(since = "0.2.0", note = "renamed `requeue_after`")]
    pub async fn nack_after(&self, delay: Duration) -> Result<()> {
        self.requeue_after(delay).await
    }

    /// HelixAgent's settlement by flag: `requeue = true` is [`Settler::requeue`],
    /// `requeue = false` is [`Settler::reject`].
    ///
    /// # Errors
    /// As [`Settler::settle`]; [`ErrorKind::Unsupported`] from backends without redelivery.
    pub async fn nack(&self, requeue: bool) -> Result<()> {
        self.settle(if requeue {
            Settlement::Requeue
        } else {
            Settlement::Reject
        })
        .await
    }

    /// Not processable: remove without redelivery (to the native dead-letter route where the
    /// backend has one).
    ///
    /// # Errors
    /// As [`Settler::settle`].
    pub async fn reject(&self) -> Result<()> {
        self.settle(Settlement::Reject).await
    }
}

impl fmt::Debug for Settler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settler")
            .field("settled", &self.is_settled())
            .finish()
    }
}

/// A message with its delivery facts, without the settle handle: cheap to clone and to hand
/// to a handler.
#[derive(Debug, Clone)]
pub struct Envelope {
    /// The message as published.
    pub message: Arc<Message>,
    /// Facts about this delivery.
    pub info: DeliveryInfo,
}

/// A delivery not yet assembled: its message, its facts and its acker, unboxed. An adapter
/// whose reading task is not the application's hands deliveries over in this form and
/// assembles them with [`UnboxedDelivery::into_delivery`] where the application takes them,
/// so that the acker's box is allocated on the application's task, usually the thread that
/// settles and frees it, rather than on the reading task's.
///
/// Dropped unassembled, its acker is dropped as an unsettled delivery's is.
#[derive(Debug)]
pub struct UnboxedDelivery<A> {
    /// The message.
    pub message: Arc<Message>,
    /// Facts about the delivery.
    pub info: DeliveryInfo,
    /// What settles it.
    pub acker: A,
}

impl<A: Acknowledge> UnboxedDelivery<A> {
    /// The delivery, its acker boxed here.
    pub fn into_delivery(self) -> Delivery {
        Delivery::new(self.message, self.info, Box::new(self.acker))
    }
}

/// A message received from a [`Subscription`](crate::Subscription), to be settled with
/// [`ack`](Delivery::ack), [`nack`](Delivery::nack) or [`reject`](Delivery::reject).
///
/// See [`Settler`] for what settling twice and dropping unsettled mean.
#[derive(Debug)]
pub struct Delivery {
    envelope: Envelope,
    settler: Settler,
}

impl Delivery {
    /// Assemble a delivery (adapters do this).
    pub fn new(message: Arc<Message>, info: DeliveryInfo, acker: Box<dyn Acknowledge>) -> Self {
        Delivery {
            envelope: Envelope { message, info },
            settler: Settler::new(acker),
        }
    }

    /// The message.
    pub fn message(&self) -> &Message {
        &self.envelope.message
    }

    /// Facts about this delivery (topic, attempt, redelivered, position).
    pub fn info(&self) -> &DeliveryInfo {
        &self.envelope.info
    }

    /// Shorthand for `info().attempt`: 1 on first delivery.
    pub fn attempt(&self) -> u32 {
        self.envelope.info.attempt
    }

    /// Split into the message part and the settle handle, so a handler can own the message
    /// while the caller keeps the right to settle.
    pub fn into_parts(self) -> (Envelope, Settler) {
        (self.envelope, self.settler)
    }

    /// Whether this delivery has been settled.
    pub fn is_settled(&self) -> bool {
        self.settler.is_settled()
    }

    /// See [`Settler::ack`].
    ///
    /// # Errors
    /// As [`Settler::settle`].
    pub async fn ack(&self) -> Result<()> {
        self.settler.ack().await
    }

    /// See [`Settler::requeue`].
    ///
    /// # Errors
    /// As [`Settler::settle`].
    pub async fn requeue(&self) -> Result<()> {
        self.settler.requeue().await
    }

    /// See [`Settler::nack`].
    ///
    /// # Errors
    /// As [`Settler::settle`].
    pub async fn nack(&self, requeue: bool) -> Result<()> {
        self.settler.nack(requeue).await
    }

    /// See [`Settler::reject`].
    ///
    /// # Errors
    /// As [`Settler::settle`].
    pub async fn reject(&self) -> Result<()> {
        self.settler.reject().await
    }

    /// See [`Settler::requeue_after`].
    ///
    /// # Errors
    /// As [`Settler::requeue_after`].
    pub async fn requeue_after(&self, delay: Duration) -> Result<()> {
        self.settler.requeue_after(delay).await
    }

    /// See [`Settler::delays_requeue`].
    pub fn delays_requeue(&self) -> bool {
        self.settler.delays_requeue()
    }

    /// [`Delivery::requeue_after`], under its name before 0.2.
    ///
    /// # Errors
    /// As [`Settler::requeue_after`].
    #[deprecated(since = "0.2.0", note = "renamed `requeue_after`")]
    pub async fn nack_after(&self, delay: Duration) -> Result<()> {
        self.requeue_after(delay).await
    }

    /// [`Delivery::delays_requeue`], under its name before 0.2.
    #[deprecated(since = "0.2.0", note = "renamed `delays_requeue`")]
    pub fn can_delay(&self) -> bool {
        self.delays_requeue()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Counting(Arc<AtomicUsize>);

    #[async_trait]
    impl Acknowledge for Counting {
        async fn settle(self: Box<Self>, _outcome: Settlement) -> Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    fn unboxed(calls: &Arc<AtomicUsize>) -> UnboxedDelivery<Counting> {
        UnboxedDelivery {
            message: Arc::new(Message::new("x")),
            info: DeliveryInfo {
                topic: "t".into(),
                group: None,
                attempt: 1,
                redelivered: false,
                position: Some(Position::Sequence(7)),
            },
            acker: Counting(calls.clone()),
        }
    }

    fn delivery(calls: &Arc<AtomicUsize>) -> Delivery {
        unboxed(calls).into_delivery()
    }

    /// Assembled, an unboxed delivery is the delivery it describes and its acker settles it;
    /// dropped unassembled, its acker is dropped unsettled, as an unsettled delivery's is.
    #[tokio::test]
    async fn an_unboxed_delivery_assembles_into_its_delivery_or_drops_its_acker() {
        let calls = Arc::new(AtomicUsize::new(0));
        let mut parts = unboxed(&calls);
        parts.message = Arc::new(Message::new("y").with_id("m-1"));
        parts.info.group = Some("g".into());
        parts.info.attempt = 3;
        parts.info.redelivered = true;
        let delivery = parts.into_delivery();
        assert_eq!(delivery.message().id(), "m-1");
        assert_eq!(delivery.message().payload().as_ref(), b"y");
        assert_eq!(&*delivery.info().topic, "t");
        assert_eq!(delivery.info().group.as_deref(), Some("g"));
        assert_eq!(delivery.attempt(), 3);
        assert!(delivery.info().redelivered);
        assert_eq!(delivery.info().position, Some(Position::Sequence(7)));
        delivery.ack().await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(Arc::strong_count(&calls), 1, "settled, then let go");

        let held = unboxed(&calls);
        assert_eq!(Arc::strong_count(&calls), 2);
        drop(held);
        assert_eq!(calls.load(Ordering::SeqCst), 1, "never settled");
        assert_eq!(Arc::strong_count(&calls), 1, "its acker dropped");
    }

    #[tokio::test]
    async fn second_settlement_is_refused_and_never_reaches_the_backend() {
        let calls = Arc::new(AtomicUsize::new(0));
        let d = delivery(&calls);
        d.ack().await.expect("first ack");
        assert!(d.is_settled());
        let again = d.ack().await.expect_err("second ack must fail");
        assert_eq!(again.kind(), ErrorKind::AlreadySettled);
        let nack = d.nack(true).await.expect_err("nack after ack must fail");
        assert_eq!(nack.kind(), ErrorKind::AlreadySettled);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    /// Acks at once, anything else through `settle`; counts each path.
    struct AcksAtOnce {
        at_once: Arc<AtomicUsize>,
        awaited: Arc<AtomicUsize>,
    }

    #[async_trait]
    impl Acknowledge for AcksAtOnce {
        async fn settle(self: Box<Self>, _outcome: Settlement) -> Result<()> {
            self.awaited.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }

        fn settle_now(&mut self, outcome: Settlement) -> Option<Result<()>> {
            (outcome == Settlement::Ack).then(|| {
                self.at_once.fetch_add(1, Ordering::SeqCst);
                Ok(())
            })
        }
    }

    #[tokio::test]
    async fn a_settlement_made_at_once_is_not_made_again_and_the_rest_are_awaited() {
        let (at_once, awaited) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let settler = || {
            Settler::new(Box::new(AcksAtOnce {
                at_once: at_once.clone(),
                awaited: awaited.clone(),
            }))
        };
        let acked = settler();
        acked.ack().await.expect("ack");
        assert_eq!(
            (
                at_once.load(Ordering::SeqCst),
                awaited.load(Ordering::SeqCst)
            ),
            (1, 0)
        );
        let again = acked.ack().await.expect_err("second ack must fail");
        assert_eq!(again.kind(), ErrorKind::AlreadySettled);
        let requeued = settler();
        requeued.nack(true).await.expect("requeue");
        assert_eq!(
            (
                at_once.load(Ordering::SeqCst),
                awaited.load(Ordering::SeqCst)
            ),
            (1, 1)
        );
        assert!(requeued.is_settled());
    }

    #[test]
    fn position_displays_readably() {
        assert_eq!(
            Position::Offset {
                partition: 2,
                offset: 40
            }
            .to_string(),
            "partition 2 offset 40"
        );
    }
}
