//! A broker that connects in the background, so a process can start while its broker is
//! away.
//!
//! A publisher with the fallback spool on must come up during an outage (a restart, a
//! deploy) and take publishes into its spool; an adapter's `connect` fails when the server is
//! unreachable. [`LazyBroker`] holds the connecting in a background task, retried with
//! backoff until it succeeds. Until then every operation fails with a retryable
//! [`ErrorKind::Connection`] error, which a [`BreakerBroker`](crate::breaker::BreakerBroker)
//! counts and a [`FallbackBroker`](crate::fallback::FallbackBroker) answers by spooling.
//! Once connected it is the adapter: the adapter's own reconnecting takes over from there.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use backon::{ExponentialBuilder, Retryable};
use parking_lot::Mutex;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::broker::{
    Backlog, BatchReport, Broker, Health, HistoryStream, Publisher, SubscribeOptions, Subscriber,
    Subscription, TimeRange,
};
use crate::capabilities::Capabilities;
use crate::error::{Error, ErrorKind, Result};
use crate::message::Message;

/// How the first connection is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectRetry {
    /// Wait after the first failed attempt (default 200 ms); it doubles after each failure.
    pub min_delay: Duration,
    /// Longest wait between attempts (default 5 s). Attempts go on until one succeeds, a
    /// non-retryable error ends them, or the broker is closed.
    pub max_delay: Duration,
}

impl Default for ConnectRetry {
    fn default() -> Self {
        ConnectRetry {
            min_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(5),
        }
    }
}

/// Where the connecting stands.
enum Connection {
    /// Attempts go on; the last one failed with this (none yet: `None`).
    Pending(Option<Error>),
    Connected(Arc<dyn Broker>),
    /// A non-retryable error ended the attempts.
    Failed(Error),
    Closed,
}

struct State {
    name: &'static str,
    capabilities: Capabilities,
    connection: Mutex<Connection>,
    /// Bumped whenever `connection` leaves `Pending`, for [`LazyBroker::connected`].
    settled: watch::Sender<bool>,
    stop: CancellationToken,
}

/// A broker connected in the background (see the module docs). Cloning shares it.
#[derive(Clone)]
pub struct LazyBroker {
    state: Arc<State>,
}

impl std::fmt::Debug for LazyBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut out = f.debug_struct("LazyBroker");
        out.field("name", &self.state.name);
        match &*self.state.connection.lock() {
            Connection::Connected(broker) => out.field("broker", broker),
            Connection::Pending(_) => out.field("broker", &"connecting"),
            Connection::Failed(err) => out.field("failed", err),
            Connection::Closed => out.field("broker", &"closed"),
        };
        out.finish()
    }
}

impl LazyBroker {
    /// Start connecting with `connect` in the background, retrying retryable failures as
    /// `retry` says. `name` and `capabilities` stand for the backend until it is connected
    /// (then the adapter's own are reported).
    ///
    /// # Panics
    /// Outside a Tokio runtime (the attempts run on it).
    pub fn new<F, Fut>(
        name: &'static str,
        capabilities: Capabilities,
        retry: ConnectRetry,
        connect: F,
    ) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Arc<dyn Broker>>> + Send + 'static,
    {
        let state = Arc::new(State {
            name,
            capabilities,
            connection: Mutex::new(Connection::Pending(None)),
            settled: watch::Sender::new(false),
            stop: CancellationToken::new(),
        });
        let attempts = state.clone();
        tokio::spawn(async move {
            let backoff = ExponentialBuilder::default()
                .with_min_delay(retry.min_delay)
                .with_max_delay(retry.max_delay.max(retry.min_delay))
                .without_max_times()
                .with_jitter();
            let connecting = (|| connect())
                .retry(backoff)
                .sleep(tokio::time::sleep)
                .when(Error::is_retryable)
                .notify(|err: &Error, wait: Duration| {
                    tracing::warn!(backend = name, error = %err, ?wait, "connecting failed; trying again");
                    if let Connection::Pending(last) = &mut *attempts.connection.lock() {
                        *last = Some(err.copy_without_source());
                    }
                });
            let outcome = tokio::select! {
                () = attempts.stop.cancelled() => return,
                outcome = connecting => outcome,
            };
            let unwanted = {
                let mut connection = attempts.connection.lock();
                match outcome {
                    Ok(broker) if matches!(*connection, Connection::Closed) => Some(broker),
                    Ok(broker) => {
                        tracing::info!(backend = name, "connected");
                        *connection = Connection::Connected(broker);
                        None
                    }
                    Err(err) => {
                        tracing::error!(backend = name, error = %err, "connecting failed for good");
                        *connection = Connection::Failed(err);
                        None
                    }
                }
            };
            if let Some(broker) = unwanted {
                // Closed while the last attempt was under way.
                let _ = broker.close().await;
                return;
            }
            attempts.settled.send_replace(true);
        });
        LazyBroker { state }
    }

    /// The connected adapter, if it is connected.
    pub fn broker(&self) -> Option<Arc<dyn Broker>> {
        match &*self.state.connection.lock() {
            Connection::Connected(broker) => Some(broker.clone()),
            _ => None,
        }
    }

    /// Wait until connected.
    ///
    /// # Errors
    /// The error that ended the attempts; [`ErrorKind::Closed`] when closed first.
    pub async fn connected(&self) -> Result<Arc<dyn Broker>> {
        let mut settled = self.state.settled.subscribe();
        loop {
            match self.current() {
                Ok(broker) => return Ok(broker),
                Err(err) if err.kind() != ErrorKind::Connection || !err.is_retryable() => {
                    return Err(err);
                }
                Err(_) => {}
            }
            if settled.changed().await.is_err() {
                return Err(Error::closed(self.state.name));
            }
        }
    }

    fn current(&self) -> Result<Arc<dyn Broker>> {
        let name = self.state.name;
        match &*self.state.connection.lock() {
            Connection::Connected(broker) => Ok(broker.clone()),
            Connection::Pending(None) => Err(Error::new(
                ErrorKind::Connection,
                format!("{name} is not connected yet (connecting in the background)"),
            )),
            Connection::Pending(Some(last)) => Err(Error::new(
                ErrorKind::Connection,
                format!("{name} is not connected yet (connecting in the background): {last}"),
            )),
            Connection::Failed(err) => Err(Error::new(
                err.kind(),
                format!("{name} could not connect: {err}"),
            )
            .with_retryable(false)),
            Connection::Closed => Err(Error::closed(name)),
        }
    }
}

#[async_trait]
impl Publisher for LazyBroker {
    async fn publish(&self, topic: &str, message: Message) -> Result<()> {
        self.current()?.publish(topic, message).await
    }

    async fn publish_batch(&self, topic: &str, messages: Vec<Message>) -> BatchReport {
        match self.current() {
            Ok(broker) => broker.publish_batch(topic, messages).await,
            Err(err) => BatchReport::all_failed(messages.len(), &err),
        }
    }
}

#[async_trait]
impl Subscriber for LazyBroker {
    async fn subscribe(&self, topic: &str, options: SubscribeOptions) -> Result<Subscription> {
        self.current()?.subscribe(topic, options).await
    }
}

#[async_trait]
impl Broker for LazyBroker {
    fn name(&self) -> &'static str {
        self.state.name
    }

    fn capabilities(&self) -> Capabilities {
        self.broker()
            .map_or(self.state.capabilities, |broker| broker.capabilities())
    }

    async fn health(&self) -> Health {
        match self.current() {
            Ok(broker) => broker.health().await,
            Err(err) => Health::unhealthy(err.to_string()),
        }
    }

    async fn read_range(&self, topic: &str, range: TimeRange) -> Result<HistoryStream> {
        self.current()?.read_range(topic, range).await
    }

    async fn backlog(&self, topic: &str, group: &str) -> Result<Backlog> {
        self.current()?.backlog(topic, group).await
    }

    /// The connected broker's; until it is connected, the plain address.
    fn group_address(&self, topic: &str, group: &str) -> crate::broker::GroupAddress {
        match self.current() {
            Ok(broker) => broker.group_address(topic, group),
            Err(_) => crate::broker::GroupAddress::plain(topic, group),
        }
    }

    async fn create_group(&self, topic: &str, group: &str) -> Result<()> {
        self.current()?.create_group(topic, group).await
    }

    async fn close(&self) -> Result<()> {
        self.state.stop.cancel();
        let previous = std::mem::replace(&mut *self.state.connection.lock(), Connection::Closed);
        self.state.settled.send_replace(true);
        match previous {
            Connection::Connected(broker) => broker.close().await,
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::broker::HealthStatus;

    /// A broker that takes every publish and counts them.
    #[derive(Debug, Default)]
    struct Counting {
        published: AtomicUsize,
        closed: AtomicUsize,
    }

    #[async_trait]
    impl Publisher for Counting {
        async fn publish(&self, _: &str, _: Message) -> Result<()> {
            self.published.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    #[async_trait]
    impl Subscriber for Counting {
        async fn subscribe(&self, _: &str, _: SubscribeOptions) -> Result<Subscription> {
            Err(Error::unsupported("counting", "subscribing"))
        }
    }

    #[async_trait]
    impl Broker for Counting {
        fn name(&self) -> &'static str {
            "counting"
        }
        fn capabilities(&self) -> Capabilities {
            Capabilities {
                durable: true,
                ..Capabilities::NONE
            }
        }
        async fn health(&self) -> Health {
            Health::healthy("up")
        }
        async fn close(&self) -> Result<()> {
            self.closed.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    fn quick() -> ConnectRetry {
        ConnectRetry {
            min_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(5),
        }
    }

    type Attempt = std::future::Ready<Result<Arc<dyn Broker>>>;

    /// Attempts fail with a connection error until `fail_first` have been made.
    fn flaky(
        fail_first: usize,
        inner: Arc<Counting>,
    ) -> (
        Arc<AtomicUsize>,
        impl Fn() -> Attempt + Send + Sync + 'static,
    ) {
        let attempts = Arc::new(AtomicUsize::new(0));
        let counter = attempts.clone();
        let connect = move || {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            std::future::ready(if n < fail_first {
                Err(Error::new(ErrorKind::Connection, format!("refused #{n}")))
            } else {
                Ok(inner.clone() as Arc<dyn Broker>)
            })
        };
        (attempts, connect)
    }

    #[tokio::test]
    async fn operations_fail_as_connection_errors_until_an_attempt_succeeds() {
        let inner = Arc::new(Counting::default());
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let opened = gate.clone();
        let target = inner.clone();
        let lazy = LazyBroker::new("counting", Capabilities::NONE, quick(), move || {
            let (opened, target) = (opened.clone(), target.clone());
            async move {
                let _permit = opened.acquire().await.expect("gate open");
                Ok(target as Arc<dyn Broker>)
            }
        });
        let err = lazy.publish("t", Message::new("early")).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Connection);
        assert!(err.is_retryable(), "{err}");
        assert!(err.to_string().contains("not connected yet"), "{err}");
        let batch = lazy
            .publish_batch("t", vec![Message::new("a"), Message::new("b")])
            .await;
        assert_eq!(batch.failures().len(), 2);
        assert_eq!(lazy.health().await.status, HealthStatus::Unhealthy);
        assert_eq!(lazy.capabilities(), Capabilities::NONE, "the stand-in");
        assert_eq!(inner.published.load(Ordering::SeqCst), 0);

        gate.add_permits(1);
        let connected = tokio::time::timeout(Duration::from_secs(5), lazy.connected())
            .await
            .expect("connected within 5 s")
            .unwrap();
        assert_eq!(connected.name(), "counting");
        lazy.publish("t", Message::new("late")).await.unwrap();
        assert_eq!(inner.published.load(Ordering::SeqCst), 1);
        assert!(
            lazy.capabilities().durable,
            "the adapter's own once connected"
        );
        assert_eq!(lazy.health().await.status, HealthStatus::Healthy);
        lazy.close().await.unwrap();
        assert_eq!(inner.closed.load(Ordering::SeqCst), 1, "closes the adapter");
        let err = lazy.publish("t", Message::new("after")).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Closed);
    }

    #[tokio::test]
    async fn failed_attempts_are_retried_until_one_succeeds() {
        let inner = Arc::new(Counting::default());
        let (attempts, connect) = flaky(3, inner.clone());
        let lazy = LazyBroker::new("counting", Capabilities::NONE, quick(), connect);
        tokio::time::timeout(Duration::from_secs(5), lazy.connected())
            .await
            .expect("connected within 5 s")
            .unwrap();
        assert_eq!(
            attempts.load(Ordering::SeqCst),
            4,
            "three failures, then success"
        );
        lazy.publish("t", Message::new("m")).await.unwrap();
        assert_eq!(inner.published.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_permanent_error_ends_the_attempts_and_is_reported() {
        let attempts = Arc::new(AtomicUsize::new(0));
        let counter = attempts.clone();
        let lazy = LazyBroker::new("counting", Capabilities::NONE, quick(), move || {
            counter.fetch_add(1, Ordering::SeqCst);
            std::future::ready(Err::<Arc<dyn Broker>, _>(Error::config(
                "RABBITMQ_URL",
                "bad credentials",
            )))
        });
        let err = tokio::time::timeout(Duration::from_secs(5), lazy.connected())
            .await
            .expect("settled within 5 s")
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config);
        assert!(err.to_string().contains("bad credentials"), "{err}");
        assert_eq!(attempts.load(Ordering::SeqCst), 1, "not retried");
        let err = lazy.publish("t", Message::new("m")).await.unwrap_err();
        assert!(!err.is_retryable(), "{err}");
        assert_eq!(lazy.health().await.status, HealthStatus::Unhealthy);
    }

    #[tokio::test]
    async fn closing_while_connecting_stops_the_attempts_and_the_last_error_is_reported() {
        let inner = Arc::new(Counting::default());
        let (attempts, connect) = flaky(usize::MAX, inner);
        let lazy = LazyBroker::new("counting", Capabilities::NONE, quick(), connect);
        tokio::time::timeout(Duration::from_secs(5), async {
            while attempts.load(Ordering::SeqCst) < 2 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await
        .expect("attempts made");
        let err = lazy.publish("t", Message::new("m")).await.unwrap_err();
        assert!(
            err.to_string().contains("refused #"),
            "the last attempt's error: {err}"
        );
        lazy.close().await.unwrap();
        let err = lazy.connected().await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Closed);
        let made = attempts.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            attempts.load(Ordering::SeqCst),
            made,
            "no attempts after close"
        );
    }
}
