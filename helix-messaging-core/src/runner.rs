//! Handler-style consumption: run an async handler for every delivery of a topic, with bounded
//! concurrency, settlement from the handler's result, layers around the handler and a graceful
//! shutdown. This is HelixAgent's `SubscribeTasks(queue, handler)`.

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use futures::{FutureExt, StreamExt};
use tokio::sync::Semaphore;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::broker::{SubscribeOptions, Subscriber};
use crate::delivery::{Envelope, Settler};
use crate::error::{BoxError, Error, ErrorKind, Result};
use crate::trace;

// The reason is the runner's: it reports why a handler gave a message up. The dead-letter
// plane above uses it (and re-exports it as `dlq::DeadLetterReason`); nothing below it
// needs the DLQ.
/// Why a message was dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DeadLetterReason {
    /// Every attempt the retry policy allows failed.
    MaxRetriesExceeded,
    /// The handler said the message can never be processed.
    Permanent,
    /// The payload could not be decoded into the handler's type.
    Undecodable,
    /// A task's deadline passed before it was handled.
    DeadlineExceeded,
    /// Found on a DLQ topic without (readable) helix failure headers: put there by another
    /// client or by the broker's own dead-lettering.
    Unknown,
}

impl DeadLetterReason {
    /// Every reason, in a fixed order.
    pub const ALL: [DeadLetterReason; 5] = [
        DeadLetterReason::MaxRetriesExceeded,
        DeadLetterReason::Permanent,
        DeadLetterReason::Undecodable,
        DeadLetterReason::DeadlineExceeded,
        DeadLetterReason::Unknown,
    ];

    /// The reason as written to headers and stores.
    pub const fn as_str(self) -> &'static str {
        match self {
            DeadLetterReason::MaxRetriesExceeded => "max retries exceeded",
            DeadLetterReason::Permanent => "permanent failure",
            DeadLetterReason::Undecodable => "undecodable payload",
            DeadLetterReason::DeadlineExceeded => "deadline exceeded",
            DeadLetterReason::Unknown => "unknown",
        }
    }

    /// Whether an automatic re-drive can help: not for a payload that cannot be decoded or
    /// a message its handler declared unprocessable (those wait for an operator).
    pub const fn worth_redriving(self) -> bool {
        matches!(
            self,
            DeadLetterReason::MaxRetriesExceeded | DeadLetterReason::DeadlineExceeded
        )
    }
}

impl fmt::Display for DeadLetterReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for DeadLetterReason {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        DeadLetterReason::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| {
                Error::invalid_input(format!(
                    "unknown dead-letter reason {s:?}; expected one of: {}",
                    DeadLetterReason::ALL
                        .map(DeadLetterReason::as_str)
                        .join(", ")
                ))
            })
    }
}

/// Default number of handlers running at once.
pub const DEFAULT_CONCURRENCY: usize = 10;

/// Default time in-flight handlers get to finish on shutdown (HelixAgent allows 30 s).
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);

/// Whether a handler failure may succeed on another attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// May succeed later: the message is requeued (or retried by a retry layer).
    Transient,
    /// Will never succeed: the message is rejected (or dead-lettered by a DLQ layer).
    Permanent,
}

/// Why a handler did not process a message.
///
/// Any `std::error::Error` converts into a transient `HandlerError`, so `?` works inside
/// handlers; use [`HandlerError::permanent`] for a message that can never be processed.
pub struct HandlerError {
    kind: FailureKind,
    error: BoxError,
    retry_after: Option<Duration>,
    reason: Option<DeadLetterReason>,
    first_failure: Option<SystemTime>,
}

impl HandlerError {
    fn with_kind(kind: FailureKind, error: BoxError) -> Self {
        HandlerError {
            kind,
            error,
            retry_after: None,
            reason: None,
            first_failure: None,
        }
    }

    /// A failure that may succeed on another attempt.
    pub fn transient(error: impl Into<BoxError>) -> Self {
        HandlerError::with_kind(FailureKind::Transient, error.into())
    }

    /// A failure that will never succeed (invalid request, …): with a
    /// [`DeadLetterLayer`](crate::dlq::DeadLetterLayer) it is dead-lettered at once with
    /// reason [`DeadLetterReason::Permanent`].
    pub fn permanent(error: impl Into<BoxError>) -> Self {
        HandlerError::with_kind(FailureKind::Permanent, error.into())
    }

    /// A payload that cannot be decoded into the handler's type: permanent, dead-lettered on
    /// its first delivery with reason [`DeadLetterReason::Undecodable`].
    pub fn undecodable(error: impl Into<BoxError>) -> Self {
        HandlerError::permanent(error).with_reason(DeadLetterReason::Undecodable)
    }

    /// A permanent failure with this dead-letter reason.
    #[must_use]
    pub fn with_reason(mut self, reason: DeadLetterReason) -> Self {
        self.kind = FailureKind::Permanent;
        self.reason = Some(reason);
        self
    }

    /// Ask for the next attempt no sooner than `delay` from now (a transient failure only;
    /// the retry layer sets it from its backoff). The runner settles with
    /// [`Settler::requeue_after`] where the backend holds delayed requeues, and otherwise keeps
    /// the delivery unsettled for the delay without occupying a handler slot.
    #[must_use]
    pub fn with_retry_after(mut self, delay: Duration) -> Self {
        self.retry_after = Some(delay);
        self
    }

    /// Record when this message first failed (the retry layer does, for the dead letter).
    #[must_use]
    pub fn with_first_failure(mut self, at: SystemTime) -> Self {
        self.first_failure = Some(at);
        self
    }

    /// The delay asked for before the next attempt, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }

    /// Why the message should be dead-lettered: the reason given, or
    /// [`DeadLetterReason::Permanent`] for a permanent failure without one. `None` for a
    /// transient failure.
    pub fn dead_letter_reason(&self) -> Option<DeadLetterReason> {
        match self.kind {
            FailureKind::Permanent => Some(self.reason.unwrap_or(DeadLetterReason::Permanent)),
            FailureKind::Transient => None,
        }
    }

    /// When the message first failed, if a layer recorded it.
    pub fn first_failure(&self) -> Option<SystemTime> {
        self.first_failure
    }

    /// Transient or permanent.
    pub fn kind(&self) -> FailureKind {
        self.kind
    }

    /// Whether the failure is permanent.
    pub fn is_permanent(&self) -> bool {
        self.kind == FailureKind::Permanent
    }

    /// The underlying error.
    pub fn error(&self) -> &(dyn StdError + Send + Sync + 'static) {
        &*self.error
    }

    /// Take the underlying error.
    pub fn into_error(self) -> BoxError {
        self.error
    }
}

impl<E: StdError + Send + Sync + 'static> From<E> for HandlerError {
    fn from(error: E) -> Self {
        HandlerError::transient(error)
    }
}

impl fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerError")
            .field("kind", &self.kind)
            .field("error", &self.error)
            .field("retry_after", &self.retry_after)
            .field("reason", &self.reason)
            .finish()
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            FailureKind::Transient => "transient",
            FailureKind::Permanent => "permanent",
        };
        write!(f, "{kind} handler failure: {}", self.error)
    }
}

/// Processes one message. `Ok` acks it; `Err` hands it to the failure path (requeue for a
/// transient failure, reject for a permanent one, unless a layer decides otherwise).
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Handle one delivered message.
    ///
    /// # Errors
    /// A [`HandlerError`] saying whether another attempt may succeed.
    async fn handle(&self, envelope: Envelope) -> Result<(), HandlerError>;
}

/// A handler as a shareable trait object.
pub type BoxHandler = Arc<dyn Handler>;

/// A shared handler is a handler: lets one handler value (with its state) serve several
/// runners, and lets a [`BoxHandler`] be started directly.
#[async_trait]
impl<H: Handler + ?Sized> Handler for Arc<H> {
    async fn handle(&self, envelope: Envelope) -> Result<(), HandlerError> {
        (**self).handle(envelope).await
    }
}

/// Wraps a handler in another (retry, dead-lettering, metrics, tracing, …). Layers are the
/// seam the reliability pieces plug into: a layer sees every envelope and the inner handler's
/// result, and may turn a failure into success (after dead-lettering it, say) or vice versa.
pub trait Layer: Send + Sync + 'static {
    /// Return a handler that wraps `inner`.
    fn layer(&self, inner: BoxHandler) -> BoxHandler;
}

/// A [`Handler`] made from an async closure; build it with [`handler_fn`].
pub struct HandlerFn<F>(F);

/// Turn `Fn(Envelope) -> impl Future<Output = Result<(), HandlerError>>` into a [`Handler`].
///
/// ```
/// use helix_messaging_core::{handler_fn, Envelope, HandlerError};
///
/// let handler = handler_fn(|envelope: Envelope| async move {
///     let text = std::str::from_utf8(envelope.message.payload())
///         .map_err(HandlerError::permanent)?;
///     println!("got {text}");
///     Ok(())
/// });
/// # let _ = handler;
/// ```
pub fn handler_fn<F, Fut>(f: F) -> HandlerFn<F>
where
    F: Fn(Envelope) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    HandlerFn(f)
}

#[async_trait]
impl<F, Fut> Handler for HandlerFn<F>
where
    F: Fn(Envelope) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    async fn handle(&self, envelope: Envelope) -> Result<(), HandlerError> {
        (self.0)(envelope).await
    }
}

/// Counts of what a [`Runner`] did, returned when it stops.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunReport {
    /// Handler succeeded; delivery acked.
    pub acked: u64,
    /// Handler failed transiently (or panicked); delivery requeued.
    pub requeued: u64,
    /// Handler failed transiently and asked for a delay: delivery requeued after it (by the
    /// broker where it holds delayed requeues, otherwise by the runner holding it meanwhile).
    pub delayed: u64,
    /// Handler failed permanently; delivery rejected.
    pub rejected: u64,
    /// Handler was still running when the shutdown timeout passed; delivery requeued.
    pub interrupted: u64,
    /// Settlements the broker refused (the backend redelivers those by its own rules).
    pub settle_errors: u64,
    /// Errors the subscription stream reported.
    pub stream_errors: u64,
}

#[derive(Default)]
struct Counters {
    acked: AtomicU64,
    requeued: AtomicU64,
    delayed: AtomicU64,
    rejected: AtomicU64,
    interrupted: AtomicU64,
    settle_errors: AtomicU64,
    stream_errors: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> RunReport {
        RunReport {
            acked: self.acked.load(Ordering::Relaxed),
            requeued: self.requeued.load(Ordering::Relaxed),
            delayed: self.delayed.load(Ordering::Relaxed),
            rejected: self.rejected.load(Ordering::Relaxed),
            interrupted: self.interrupted.load(Ordering::Relaxed),
            settle_errors: self.settle_errors.load(Ordering::Relaxed),
            stream_errors: self.stream_errors.load(Ordering::Relaxed),
        }
    }
}

/// Configures a [`Runner`]; start it with [`RunnerBuilder::start`].
pub struct RunnerBuilder {
    subscriber: Arc<dyn Subscriber>,
    topic: String,
    options: SubscribeOptions,
    concurrency: usize,
    shutdown_timeout: Duration,
    layers: Vec<Arc<dyn Layer>>,
}

impl RunnerBuilder {
    /// Subscribe options (group, prefetch, start). Prefetch is raised to the concurrency if
    /// lower, so no handler slot starves.
    #[must_use]
    pub fn options(mut self, options: SubscribeOptions) -> Self {
        self.options = options;
        self
    }

    /// Join consumer group `group`.
    #[must_use]
    pub fn group(mut self, group: impl Into<String>) -> Self {
        self.options.group = Some(group.into());
        self
    }

    /// Most handlers running at once (at least 1; default [`DEFAULT_CONCURRENCY`]).
    #[must_use]
    pub fn concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = concurrency.max(1);
        self
    }

    /// How long in-flight handlers may run after shutdown is requested (default
    /// [`DEFAULT_SHUTDOWN_TIMEOUT`]).
    #[must_use]
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_timeout = timeout;
        self
    }

    /// Wrap the handler in `layer`. The first layer added is the outermost.
    #[must_use]
    pub fn layer(mut self, layer: impl Layer) -> Self {
        self.layers.push(Arc::new(layer));
        self
    }

    /// Subscribe and start handling deliveries in the background (needs a Tokio runtime).
    ///
    /// # Errors
    /// The subscribe error, if subscribing failed.
    pub async fn start(self, handler: impl Handler) -> Result<Runner> {
        let mut options = self.options;
        options.prefetch = options.prefetch.max(self.concurrency);
        let subscription = self.subscriber.subscribe(&self.topic, options).await?;
        let handler = self
            .layers
            .iter()
            .rev()
            .fold(Arc::new(handler) as BoxHandler, |inner, layer| {
                layer.layer(inner)
            });
        let stop = CancellationToken::new();
        let counters = Arc::new(Counters::default());
        let run = RunLoop {
            handler,
            concurrency: self.concurrency,
            shutdown_timeout: self.shutdown_timeout,
            stop: stop.clone(),
            interrupt: CancellationToken::new(),
            counters: counters.clone(),
        };
        let task = tokio::spawn(run.run(subscription));
        Ok(Runner {
            stop,
            counters,
            task,
        })
    }
}

/// Runs a handler over a topic until shut down (or until the subscription ends, e.g. because
/// the broker was closed).
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use std::sync::Arc;
/// use std::time::Duration;
///
/// use helix_messaging_core::{Broker, Envelope, Message, Runner, handler_fn};
/// use helix_messaging_memory::MemoryBroker;
///
/// let broker: Arc<dyn Broker> = Arc::new(MemoryBroker::new());
/// let (seen, mut orders) = tokio::sync::mpsc::unbounded_channel();
/// let runner = Runner::builder(broker.clone(), "orders")
///     .group("billing")
///     .concurrency(4)
///     .start(handler_fn(move |order: Envelope| {
///         let seen = seen.clone();
///         async move {
///             seen.send(order.message.id().to_owned()).ok();
///             Ok(()) // acked; Err(HandlerError::transient(..)) requeues, ::permanent(..) rejects
///         }
///     }))
///     .await?;
/// let order = Message::new("order 1");
/// broker.publish("orders", order.clone()).await?;
/// let handled = tokio::time::timeout(Duration::from_secs(5), orders.recv()).await;
/// assert_eq!(handled.expect("handled in time").as_deref(), Some(order.id()));
/// let report = runner.shutdown().await; // in-flight work finishes first
/// assert_eq!(report.acked, 1);
/// # Ok::<(), helix_messaging_core::Error>(())
/// # }).unwrap();
/// ```
pub struct Runner {
    stop: CancellationToken,
    counters: Arc<Counters>,
    task: JoinHandle<()>,
}

impl Runner {
    /// Configure a runner for `topic` on `subscriber` (any `Arc<dyn Broker>` coerces).
    pub fn builder(subscriber: Arc<dyn Subscriber>, topic: impl Into<String>) -> RunnerBuilder {
        RunnerBuilder {
            subscriber,
            topic: topic.into(),
            options: SubscribeOptions::default(),
            concurrency: DEFAULT_CONCURRENCY,
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
            layers: Vec::new(),
        }
    }

    /// What the runner has done so far.
    pub fn report(&self) -> RunReport {
        self.counters.snapshot()
    }

    /// Whether the runner has stopped (shut down, or its subscription ended).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Stop gracefully: stop fetching, let in-flight handlers finish within the shutdown
    /// timeout, requeue (never reject) the deliveries of handlers still running after it,
    /// then drop the subscription, which returns fetched-but-unstarted deliveries to the group.
    pub async fn shutdown(self) -> RunReport {
        self.stop.cancel();
        self.wait().await
    }

    /// Wait until the runner stops by itself (its subscription ended) and return its report.
    pub async fn wait(self) -> RunReport {
        if let Err(err) = self.task.await {
            tracing::error!(error = %err, "handler runner task failed");
        }
        self.counters.snapshot()
    }
}

struct RunLoop {
    handler: BoxHandler,
    concurrency: usize,
    shutdown_timeout: Duration,
    stop: CancellationToken,
    interrupt: CancellationToken,
    counters: Arc<Counters>,
}

impl RunLoop {
    async fn run(self, mut subscription: crate::broker::Subscription) {
        let slots = Arc::new(Semaphore::new(self.concurrency));
        let mut tasks = JoinSet::new();
        loop {
            // A slot is taken before fetching, so the runner never pulls more deliveries than
            // it can start handling.
            let slot = tokio::select! {
                biased;
                () = self.stop.cancelled() => break,
                slot = slots.clone().acquire_owned() => slot.expect("semaphore is never closed"),
            };
            let next = tokio::select! {
                biased;
                () = self.stop.cancelled() => break,
                next = subscription.next() => next,
            };
            let delivery = match next {
                None => break,
                Some(Err(err)) => {
                    self.counters.stream_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(topic = subscription.topic(), error = %err, "subscription reported an error");
                    continue;
                }
                Some(Ok(delivery)) => delivery,
            };
            let (envelope, settler) = delivery.into_parts();
            let span = trace::process_span(
                subscription.system(),
                &envelope.info.topic,
                envelope.info.group.as_deref(),
                envelope.info.attempt,
                &envelope.message,
            );
            tasks.spawn(
                handle_one(
                    self.handler.clone(),
                    envelope,
                    settler,
                    Tokens {
                        stop: self.stop.clone(),
                        interrupt: self.interrupt.clone(),
                    },
                    self.counters.clone(),
                    slot,
                )
                .instrument(span),
            );
            while tasks.try_join_next().is_some() {}
        }

        let drained = tokio::time::timeout(self.shutdown_timeout, async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                topic = subscription.topic(),
                still_running = tasks.len(),
                "shutdown timeout passed; requeueing deliveries of handlers still running"
            );
            self.interrupt.cancel();
            while tasks.join_next().await.is_some() {}
        }
        // Dropping the subscription only now keeps deliveries in flight until their handlers
        // have settled them.
        drop(subscription);
    }
}

struct Tokens {
    /// Shutdown requested: a delivery held for a delayed retry is requeued at once.
    stop: CancellationToken,
    /// Shutdown timeout passed: running handlers are abandoned and their deliveries requeued.
    interrupt: CancellationToken,
}

async fn handle_one(
    handler: BoxHandler,
    envelope: Envelope,
    settler: Settler,
    tokens: Tokens,
    counters: Arc<Counters>,
    slot: tokio::sync::OwnedSemaphorePermit,
) {
    let message_id = envelope.message.id().to_owned();
    let topic = envelope.info.topic.clone();
    let outcome = tokio::select! {
        biased;
        () = tokens.interrupt.cancelled() => None,
        result = AssertUnwindSafe(handler.handle(envelope)).catch_unwind() => Some(result),
    };
    let failure = |what: &'static str| {
        let span = tracing::Span::current();
        span.record("otel.status_code", "ERROR");
        span.record("error.type", what);
    };
    let (settled, counter) = match outcome {
        None => (
            settle(&topic, "nack", settler.nack(true)).await,
            &counters.interrupted,
        ),
        Some(Ok(Ok(()))) => (settle(&topic, "ack", settler.ack()).await, &counters.acked),
        Some(Ok(Err(err))) if err.is_permanent() => {
            failure("permanent_handler_failure");
            tracing::warn!(%topic, message_id, error = %err, "handler failed permanently; rejecting");
            (
                settle(&topic, "reject", settler.reject()).await,
                &counters.rejected,
            )
        }
        Some(Ok(Err(err))) => {
            failure("transient_handler_failure");
            match err.retry_after().filter(|d| !d.is_zero()) {
                Some(delay) => {
                    tracing::debug!(%topic, message_id, error = %err, ?delay, "handler failed; requeueing after a delay");
                    // The handler slot is free from here on: a waiting retry never blocks others.
                    drop(slot);
                    (
                        settle(&topic, "nack", requeue_after(&settler, delay, &tokens.stop)).await,
                        &counters.delayed,
                    )
                }
                None => {
                    tracing::debug!(%topic, message_id, error = %err, "handler failed; requeueing");
                    (
                        settle(&topic, "nack", settler.nack(true)).await,
                        &counters.requeued,
                    )
                }
            }
        }
        Some(Err(_panic)) => {
            failure("panic");
            tracing::error!(%topic, message_id, "handler panicked; requeueing");
            (
                settle(&topic, "nack", settler.nack(true)).await,
                &counters.requeued,
            )
        }
    };
    counter.fetch_add(1, Ordering::Relaxed);
    if let Err(err) = settled {
        counters.settle_errors.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%topic, message_id, error = %err, "could not settle delivery");
    }
}

/// Run one settlement inside its `settle` span.
async fn settle(
    topic: &str,
    operation: &'static str,
    settlement: impl Future<Output = Result<()>>,
) -> Result<()> {
    trace::in_span(trace::settle_span(topic, operation), settlement).await
}

/// Requeue after `delay`: by the broker where it holds delayed requeues, otherwise by keeping
/// the delivery unsettled here for the delay (it then holds a prefetch place, not a handler
/// slot) and requeueing at once if the runner shuts down meanwhile.
async fn requeue_after(settler: &Settler, delay: Duration, stop: &CancellationToken) -> Result<()> {
    match settler.requeue_after(delay).await {
        Err(err) if err.kind() == ErrorKind::Unsupported => {
            tokio::select! {
                () = stop.cancelled() => {}
                () = tokio::time::sleep(delay) => {}
            }
            settler.nack(true).await
        }
        other => other,
    }
}
