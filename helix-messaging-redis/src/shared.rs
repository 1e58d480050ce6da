//! The broker's state that both modes share: the settings, the connections and the tasks,
//! with what every part of the adapter asks of it (the broker's name and whether it is still
//! open, reconnecting with backoff, a subscription's stream over its task's batches).
//!
//! It stands below pub/sub mode, Streams mode and trimming, which all work on it, so none of
//! them has to import the broker that they make up.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use helix_messaging_core::observe::connection::{
    ConnectionState, count_connection, count_connection_failure,
};
use helix_messaging_core::{Error, Result};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use std::sync::Arc;

use crate::config::{PUBSUB_NAME, RedisConfig, RedisMode, STREAMS_NAME};
use crate::primary::{Connection, Primary};
use crate::trim::Trimmer;

/// What both modes share.
pub(crate) struct Shared {
    pub(crate) config: RedisConfig,
    /// Where connections go (the configured server, or the primary the sentinels name).
    pub(crate) primary: Arc<Primary>,
    /// Commands that do not block: publish, group management. Reconnects by itself.
    pub(crate) commands: Connection,
    /// Streams acks, on a connection of their own (made by the first group subscription):
    /// behind a large pipelined publish on `commands` they would wait for all of it, and
    /// the prefetch window they free with them.
    pub(crate) acks_connection: tokio::sync::OnceCell<Connection>,
    /// Cancelled on close; every subscription task holds a child.
    pub(crate) shutdown: CancellationToken,
    pub(crate) tasks: TaskTracker,
    pub(crate) closed: AtomicBool,
    pub(crate) unrouted: AtomicU64,
    /// Streams trimming, with what it has removed since connecting.
    pub(crate) trimmer: Trimmer,
    /// Subscriptions currently without a working connection (health reports degraded).
    pub(crate) reconnecting: AtomicUsize,
    /// The publishing connection was lost: the connection manager reconnects on the next
    /// command, and the first publish that succeeds after it counts the reconnect.
    pub(crate) commands_lost: AtomicBool,
    /// `messaging_connection_up` of the publishing connection: down from a publish that
    /// found it lost until one gets through again, and from close.
    pub(crate) commands_state: ConnectionState,
}

impl Shared {
    /// The state of a broker just connected with `config`: `primary` makes its
    /// connections, `commands` is the first of them.
    pub(crate) fn new(config: RedisConfig, primary: Arc<Primary>, commands: Connection) -> Self {
        let commands_state = ConnectionState::new(backend_name(config.mode), primary.address());
        commands_state.set(true);
        Shared {
            commands_state,
            config,
            primary,
            commands,
            acks_connection: tokio::sync::OnceCell::new(),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            closed: AtomicBool::new(false),
            unrouted: AtomicU64::new(0),
            trimmer: Trimmer::new(),
            reconnecting: AtomicUsize::new(0),
            commands_lost: AtomicBool::new(false),
        }
    }

    pub(crate) fn name(&self) -> &'static str {
        backend_name(self.config.mode)
    }

    pub(crate) fn ensure_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            Err(Error::closed(format!("the {} broker", self.name())))
        } else {
            Ok(())
        }
    }

    /// A lost connection (publishing, or a subscription's) is back: counted in
    /// `messaging_reconnects_total`.
    pub(crate) fn count_reconnect(&self) {
        helix_messaging_core::observe::count_reconnect(self.name());
    }

    /// A subscription's share of `messaging_connection_up`, up: subscriptions read on
    /// connections of their own, each counted beside the publishing one.
    pub(crate) fn subscription_state(&self) -> ConnectionState {
        let state = ConnectionState::new(self.name(), self.primary.address());
        state.set(true);
        state
    }

    /// A subscription's lost connection is back: a reconnect, a connection made, and up.
    pub(crate) fn subscription_reconnected(&self, state: &ConnectionState) {
        self.count_reconnect();
        count_connection(self.name());
        state.set(true);
    }

    /// Exponential backoff for reconnect loops, capped by the configuration.
    fn reconnect_backoff(&self) -> ExponentialBuilder {
        ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(50))
            .with_max_delay(self.config.max_reconnect_delay)
            .with_jitter()
            .without_max_times()
    }

    /// Run `attempt` until it succeeds, backing off between failures, or until `cancel`
    /// fires (`None`). Counts the subscription as reconnecting meanwhile, and each failed
    /// attempt in `messaging_connection_failures_total`.
    pub(crate) async fn retry_until_cancelled<T, F, Fut>(
        &self,
        what: &str,
        cancel: &CancellationToken,
        attempt: F,
    ) -> Option<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        self.reconnecting.fetch_add(1, Ordering::Relaxed);
        let retried = attempt
            .retry(self.reconnect_backoff())
            .sleep(tokio::time::sleep)
            .notify(|err: &Error, wait: Duration| {
                // Each attempt to reach the server again that failed.
                count_connection_failure(self.name());
                tracing::warn!(error = %err, ?wait, "{what} failed; retrying");
            });
        let outcome = tokio::select! {
            () = cancel.cancelled() => None,
            result = retried => result.ok(),
        };
        self.reconnecting.fetch_sub(1, Ordering::Relaxed);
        outcome
    }
}

/// The backend name of a broker in `mode`.
pub(crate) fn backend_name(mode: RedisMode) -> &'static str {
    match mode {
        RedisMode::PubSub => PUBSUB_NAME,
        RedisMode::Streams => STREAMS_NAME,
    }
}

/// A subscription's stream over the batches its task hands over; dropping the stream cancels
/// the task.
pub(crate) fn channel_stream<T: Send + 'static>(
    rx: tokio::sync::mpsc::Receiver<Vec<Result<T>>>,
    cancel: CancellationToken,
) -> futures::stream::BoxStream<'static, Result<T>> {
    let inbox = Inbox {
        cancel,
        rx,
        buffered: std::collections::VecDeque::new(),
    };
    Box::pin(futures::stream::unfold(inbox, |mut inbox| async move {
        loop {
            if let Some(item) = inbox.buffered.pop_front() {
                return Some((item, inbox));
            }
            let batch = inbox.rx.recv().await?;
            inbox.buffered.extend(batch);
        }
    }))
}

/// What a subscription's stream holds: the deliveries handed over and not yet taken.
struct Inbox<T> {
    cancel: CancellationToken,
    rx: tokio::sync::mpsc::Receiver<Vec<Result<T>>>,
    buffered: std::collections::VecDeque<Result<T>>,
}

impl<T> Drop for Inbox<T> {
    /// The task is cancelled before the deliveries still held here are dropped: dropping one
    /// frees a slot of the prefetch window, and a reader woken by that while not yet
    /// cancelled would read one more batch from the server, left pending on a consumer that
    /// is gone until it is claimed (seen in CI as two entries read ahead of a dropped
    /// subscription instead of one).
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}
