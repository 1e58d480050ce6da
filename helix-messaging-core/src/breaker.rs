//! A circuit breaker for broker calls, and a [`Broker`] that puts one on publishing and one
//! on consuming.
//!
//! Closed, calls go through and consecutive broker failures are counted; at
//! [`BreakerConfig::failure_threshold`] the breaker opens and calls fail fast (retryable
//! [`ErrorKind::Connection`]) for [`BreakerConfig::open_interval`]; then it is half-open and
//! lets [`BreakerConfig::half_open_probes`] calls through: a success closes it, a failure
//! opens it again. Only failures that say the broker is in trouble count
//! ([`ErrorKind::Connection`], [`ErrorKind::Timeout`], [`ErrorKind::Backend`]); a refused
//! message (bad input, too large, rejected) is the caller's, not the broker's.
//!
//! State is visible through [`CircuitBreaker::state`], in [`BreakerBroker`]'s health, and as
//! the gauge `messaging_circuit_breaker_state` (0 closed, 1 half-open, 2 open; label
//! `breaker`) with the counter `messaging_circuit_breaker_opened_total`.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use parking_lot::Mutex;
use tokio::time::Instant;

use crate::broker::{
    Backlog, BatchReport, Broker, Health, HealthStatus, HistoryStream, Publisher, SubscribeOptions,
    Subscriber, Subscription, TimeRange,
};
use crate::capabilities::Capabilities;
use crate::error::{Error, ErrorKind, Result};
use crate::message::Message;
use crate::stack::BrokerLayer;

/// When a breaker opens and how it recovers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Consecutive broker failures that open the breaker (default 5).
    pub failure_threshold: u32,
    /// How long it stays open before letting a probe through (default 30 s).
    pub open_interval: Duration,
    /// Calls let through at once while half-open (default 1).
    pub half_open_probes: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            failure_threshold: 5,
            open_interval: Duration::from_secs(30),
            half_open_probes: 1,
        }
    }
}

impl BreakerConfig {
    fn validate(&self) -> Result<()> {
        if self.failure_threshold == 0 || self.half_open_probes == 0 {
            return Err(Error::invalid_input(
                "breaker: failure_threshold and half_open_probes must be at least 1",
            ));
        }
        if self.open_interval.is_zero() {
            return Err(Error::invalid_input(
                "breaker: open_interval must be longer than zero",
            ));
        }
        Ok(())
    }
}

/// Where a breaker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls go through.
    Closed,
    /// Probing: a few calls go through to see whether the broker is back.
    HalfOpen,
    /// Calls fail fast.
    Open,
}

impl BreakerState {
    /// The state as shown.
    pub const fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::HalfOpen => "half-open",
            BreakerState::Open => "open",
        }
    }

    const fn gauge(self) -> f64 {
        match self {
            BreakerState::Closed => 0.0,
            BreakerState::HalfOpen => 1.0,
            BreakerState::Open => 2.0,
        }
    }
}

/// Whether `err` says the broker is in trouble (and so counts against it).
pub fn is_broker_failure(err: &Error) -> bool {
    matches!(
        err.kind(),
        ErrorKind::Connection | ErrorKind::Timeout | ErrorKind::Backend
    )
}

struct State {
    state: BreakerState,
    consecutive_failures: u32,
    opened_at: Option<Instant>,
    /// Probes out in the current half-open period.
    probes: u32,
    /// Counts half-open periods: a probe permit of an earlier one is no probe any more.
    period: u64,
    last_error: Option<String>,
}

impl State {
    /// Whether a permit taken as a probe in `period` is a probe of the current half-open
    /// period (the breaker may have closed and opened again since it was taken).
    fn is_current_probe(&self, period: Option<u64>) -> bool {
        self.state == BreakerState::HalfOpen && period == Some(self.period)
    }
}

struct Inner {
    name: String,
    config: BreakerConfig,
    state: Mutex<State>,
}

/// A circuit breaker (see the module docs). Cloning shares it.
#[derive(Clone)]
pub struct CircuitBreaker {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for CircuitBreaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("name", &self.inner.name)
            .field("state", &self.state())
            .finish()
    }
}

/// Leave to make one call through a breaker; report its outcome with
/// [`Permit::record`]. Dropped unrecorded (the call was abandoned), it counts for nothing.
/// A probe's permit is a probe only of the half-open period it was taken in: abandoned or
/// failed later, it counts for nothing; its success, like any call's, shows the broker
/// answers and closes a half-open breaker.
#[derive(Debug)]
pub struct Permit {
    breaker: CircuitBreaker,
    /// The half-open period this permit is a probe of; `None` for a call of a closed
    /// breaker.
    probe: Option<u64>,
    recorded: bool,
}

impl Permit {
    /// Report the call's outcome: `Some(err)` for a failure, `None` for a success.
    pub fn record(mut self, failure: Option<&Error>) {
        self.recorded = true;
        self.breaker.record(self.probe, failure);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if !self.recorded {
            let mut state = self.breaker.inner.state.lock();
            if state.is_current_probe(self.probe) {
                state.probes = state.probes.saturating_sub(1);
            }
        }
    }
}

impl CircuitBreaker {
    /// A closed breaker named `name` (the metrics label).
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] for a zero threshold, probe count or interval.
    pub fn new(name: impl Into<String>, config: BreakerConfig) -> Result<Self> {
        config.validate()?;
        let breaker = CircuitBreaker {
            inner: Arc::new(Inner {
                name: name.into(),
                config,
                state: Mutex::new(State {
                    state: BreakerState::Closed,
                    consecutive_failures: 0,
                    opened_at: None,
                    probes: 0,
                    period: 0,
                    last_error: None,
                }),
            }),
        };
        breaker.publish_state(BreakerState::Closed);
        Ok(breaker)
    }

    /// The breaker's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The current state (an open breaker whose interval has passed reads as half-open).
    pub fn state(&self) -> BreakerState {
        let mut state = self.inner.state.lock();
        self.advance(&mut state);
        state.state
    }

    /// The failure that last opened or kept the breaker open, if it is not closed.
    pub fn last_error(&self) -> Option<String> {
        let state = self.inner.state.lock();
        (state.state != BreakerState::Closed)
            .then(|| state.last_error.clone())
            .flatten()
    }

    fn advance(&self, state: &mut State) {
        if state.state == BreakerState::Open
            && state
                .opened_at
                .is_some_and(|at| at.elapsed() >= self.inner.config.open_interval)
        {
            state.state = BreakerState::HalfOpen;
            state.probes = 0;
            state.period += 1;
            self.publish_state(BreakerState::HalfOpen);
        }
    }

    fn publish_state(&self, state: BreakerState) {
        metrics::gauge!("messaging_circuit_breaker_state", "breaker" => self.inner.name.clone())
            .set(state.gauge());
    }

    /// Leave to make a call.
    ///
    /// # Errors
    /// A retryable [`ErrorKind::Connection`] while the breaker is open (or half-open with
    /// its probes out), saying when it will let a call through again.
    pub fn acquire(&self) -> Result<Permit> {
        let mut state = self.inner.state.lock();
        self.advance(&mut state);
        let probe = match state.state {
            BreakerState::Closed => None,
            BreakerState::HalfOpen if state.probes < self.inner.config.half_open_probes => {
                state.probes += 1;
                Some(state.period)
            }
            BreakerState::HalfOpen | BreakerState::Open => {
                let retry_in = state
                    .opened_at
                    .map(|at| self.inner.config.open_interval.saturating_sub(at.elapsed()))
                    .unwrap_or_default();
                let cause = state.last_error.as_deref().unwrap_or("broker failures");
                return Err(Error::new(
                    ErrorKind::Connection,
                    format!(
                        "circuit breaker {} is {} (after {} consecutive failures; the last: {cause}); next probe in {retry_in:?}",
                        self.inner.name,
                        state.state.as_str(),
                        state.consecutive_failures,
                    ),
                )
                .with_retryable(true));
            }
        };
        Ok(Permit {
            breaker: self.clone(),
            probe,
            recorded: false,
        })
    }

    fn record(&self, probe: Option<u64>, failure: Option<&Error>) {
        let mut state = self.inner.state.lock();
        // A probe of an earlier half-open period reports like any other call.
        let probe = state.is_current_probe(probe);
        if probe {
            state.probes = state.probes.saturating_sub(1);
        }
        match failure.filter(|err| is_broker_failure(err)) {
            None => {
                if state.state != BreakerState::Closed
                    && (probe || state.state == BreakerState::HalfOpen)
                {
                    tracing::info!(breaker = %self.inner.name, "circuit breaker closed: the broker answers again");
                    state.state = BreakerState::Closed;
                    state.opened_at = None;
                    self.publish_state(BreakerState::Closed);
                }
                if state.state == BreakerState::Closed {
                    state.consecutive_failures = 0;
                    state.last_error = None;
                }
            }
            Some(err) => {
                state.consecutive_failures += 1;
                state.last_error = Some(err.to_string());
                let opens = match state.state {
                    BreakerState::Closed => {
                        state.consecutive_failures >= self.inner.config.failure_threshold
                    }
                    BreakerState::HalfOpen => probe,
                    BreakerState::Open => false,
                };
                if opens {
                    tracing::warn!(breaker = %self.inner.name, failures = state.consecutive_failures, error = %err, "circuit breaker opened");
                    state.state = BreakerState::Open;
                    state.opened_at = Some(Instant::now());
                    metrics::counter!("messaging_circuit_breaker_opened_total", "breaker" => self.inner.name.clone()).increment(1);
                    self.publish_state(BreakerState::Open);
                }
            }
        }
    }

    /// Take an outcome seen without asking leave (a delivery, or an error a subscription
    /// reported): a delivery shows the broker answers, so it closes the breaker.
    pub fn observe(&self, failure: Option<&Error>) {
        match failure.filter(|err| is_broker_failure(err)) {
            Some(err) => self.record(None, Some(err)),
            None => {
                let mut state = self.inner.state.lock();
                if state.state != BreakerState::Closed {
                    tracing::info!(breaker = %self.inner.name, "circuit breaker closed: a delivery arrived");
                    state.state = BreakerState::Closed;
                    state.opened_at = None;
                    self.publish_state(BreakerState::Closed);
                }
                state.consecutive_failures = 0;
                state.last_error = None;
            }
        }
    }

    /// Run `call` through the breaker.
    ///
    /// # Errors
    /// The breaker's error while open (without running `call`), else `call`'s.
    pub async fn call<T>(&self, call: impl std::future::Future<Output = Result<T>>) -> Result<T> {
        let permit = self.acquire()?;
        let outcome = call.await;
        permit.record(outcome.as_ref().err());
        outcome
    }
}

/// A broker with a breaker on publishing (publish, publish_batch) and one on consuming
/// (subscribe, history reads, and the errors a subscription reports). While the publish
/// breaker is open, publishes fail fast; health reports the breakers. Build it with
/// [`BreakerBroker::new`] or, stacked with the other wrappers, [`BreakerLayer`].
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use std::sync::Arc;
/// use std::time::Duration;
///
/// use helix_messaging_core::breaker::{BreakerBroker, BreakerConfig, BreakerState};
/// use helix_messaging_core::{Error, ErrorKind, Message, Publisher};
/// use helix_messaging_memory::MemoryBroker;
///
/// let memory = Arc::new(MemoryBroker::new());
/// let config = BreakerConfig {
///     failure_threshold: 1,
///     open_interval: Duration::from_secs(30),
///     ..BreakerConfig::default()
/// };
/// let guarded = BreakerBroker::new(memory, config)?;
/// guarded.publish("orders", Message::new("one")).await?;
/// // A publish the broker fails with a connection error (what a lost server gives):
/// let permit = guarded.publish_breaker().acquire()?;
/// permit.record(Some(&Error::new(ErrorKind::Connection, "connection reset")));
/// assert_eq!(guarded.publish_breaker().state(), BreakerState::Open);
/// let fast = guarded.publish("orders", Message::new("three")).await.unwrap_err();
/// assert_eq!(fast.kind(), ErrorKind::Connection); // failed fast, retryable
/// # Ok::<(), helix_messaging_core::Error>(())
/// # }).unwrap();
/// ```
#[derive(Debug, Clone)]
pub struct BreakerBroker {
    inner: Arc<dyn Broker>,
    name: Arc<str>,
    publish: CircuitBreaker,
    consume: CircuitBreaker,
}

/// Builds [`BreakerBroker`]s, as a [`BrokerLayer`] (see [`crate::stack`] for where it
/// stacks).
#[derive(Debug, Clone, PartialEq)]
pub struct BreakerLayer {
    config: BreakerConfig,
    name: Option<Arc<str>>,
}

impl BreakerLayer {
    /// Breakers with `config`, named after the backend ([`BreakerBroker::new`]).
    pub fn new(config: BreakerConfig) -> Self {
        BreakerLayer { config, name: None }
    }

    /// Breakers named `<name>.publish` and `<name>.consume` ([`BreakerBroker::named`]).
    pub fn named(mut self, name: impl Into<Arc<str>>) -> Self {
        self.name = Some(name.into());
        self
    }
}

#[async_trait]
impl BrokerLayer for BreakerLayer {
    type Wrapped = BreakerBroker;

    async fn wrap(&self, inner: Arc<dyn Broker>) -> Result<BreakerBroker> {
        match &self.name {
            Some(name) => BreakerBroker::named(inner, name.clone(), self.config),
            None => BreakerBroker::new(inner, self.config),
        }
    }
}

impl BreakerBroker {
    /// Wrap `inner`, with breakers named `<backend>.publish` and `<backend>.consume`.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] for a bad [`BreakerConfig`].
    pub fn new(inner: Arc<dyn Broker>, config: BreakerConfig) -> Result<Self> {
        let name = inner.name();
        BreakerBroker::named(inner, name, config)
    }

    /// Wrap `inner`, with breakers named `<name>.publish` and `<name>.consume`: for more
    /// than one wrapper of a backend in a process (the hub's task and event sides), whose
    /// metrics would otherwise be one series.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] for a bad [`BreakerConfig`].
    pub fn named(
        inner: Arc<dyn Broker>,
        name: impl Into<Arc<str>>,
        config: BreakerConfig,
    ) -> Result<Self> {
        let name = name.into();
        Ok(BreakerBroker {
            publish: CircuitBreaker::new(format!("{name}.publish"), config)?,
            consume: CircuitBreaker::new(format!("{name}.consume"), config)?,
            name,
            inner,
        })
    }

    /// The name its breakers are named after (`<backend>` unless given).
    pub fn label(&self) -> &str {
        &self.name
    }

    /// The breaker on publishing.
    pub fn publish_breaker(&self) -> &CircuitBreaker {
        &self.publish
    }

    /// The breaker on consuming.
    pub fn consume_breaker(&self) -> &CircuitBreaker {
        &self.consume
    }
}

#[async_trait]
impl Publisher for BreakerBroker {
    async fn publish(&self, topic: &str, message: Message) -> Result<()> {
        self.publish.call(self.inner.publish(topic, message)).await
    }

    async fn publish_batch(&self, topic: &str, messages: Vec<Message>) -> BatchReport {
        let permit = match self.publish.acquire() {
            Ok(permit) => permit,
            Err(err) => return BatchReport::all_failed(messages.len(), &err),
        };
        let report = self.inner.publish_batch(topic, messages).await;
        // Any accepted message says the broker answers; a batch refused whole by the broker
        // counts as one failure.
        let failure = (report.succeeded() == 0)
            .then(|| report.failures().first().map(|(_, err)| err))
            .flatten();
        permit.record(failure);
        report
    }
}

#[async_trait]
impl Subscriber for BreakerBroker {
    async fn subscribe(&self, topic: &str, options: SubscribeOptions) -> Result<Subscription> {
        let subscription = self
            .consume
            .call(self.inner.subscribe(topic, options))
            .await?;
        let topic: Arc<str> = Arc::from(subscription.topic());
        let group = subscription.group().map(Arc::from);
        let breaker = self.consume.clone();
        // Deliveries and reported errors keep the consume breaker's state current.
        let observed = subscription.inspect(move |item| breaker.observe(item.as_ref().err()));
        Ok(Subscription::new(topic, group, Box::pin(observed)))
    }
}

#[async_trait]
impl Broker for BreakerBroker {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    async fn health(&self) -> Health {
        let inner = self.inner.health().await;
        let breakers = [&self.publish, &self.consume];
        let detail = format!(
            "{}; breakers: {}",
            inner.detail,
            breakers
                .iter()
                .map(|b| format!("{} {}", b.name(), b.state().as_str()))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let status = breakers
            .iter()
            .map(|b| match b.state() {
                BreakerState::Closed => HealthStatus::Healthy,
                BreakerState::HalfOpen => HealthStatus::Degraded,
                BreakerState::Open => HealthStatus::Unhealthy,
            })
            .fold(inner.status, Ord::max);
        Health { status, detail }
    }

    async fn read_range(&self, topic: &str, range: TimeRange) -> Result<HistoryStream> {
        self.consume.call(self.inner.read_range(topic, range)).await
    }

    async fn backlog(&self, topic: &str, group: &str) -> Result<Backlog> {
        // A read-only probe: it neither trips nor waits for the consume breaker.
        self.inner.backlog(topic, group).await
    }

    fn group_address(&self, topic: &str, group: &str) -> crate::broker::GroupAddress {
        self.inner.group_address(topic, group)
    }

    async fn create_group(&self, topic: &str, group: &str) -> Result<()> {
        // Set-up, not traffic: it neither trips nor waits for the breakers.
        self.inner.create_group(topic, group).await
    }

    async fn close(&self) -> Result<()> {
        self.inner.close().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn down() -> Error {
        Error::new(ErrorKind::Connection, "connection refused")
    }

    fn breaker(threshold: u32) -> CircuitBreaker {
        CircuitBreaker::new(
            "test",
            BreakerConfig {
                failure_threshold: threshold,
                open_interval: Duration::from_secs(10),
                half_open_probes: 1,
            },
        )
        .unwrap()
    }

    async fn fail(b: &CircuitBreaker) -> Result<()> {
        b.call(async { Err::<(), _>(down()) }).await
    }

    async fn succeed(b: &CircuitBreaker) -> Result<()> {
        b.call(async { Ok(()) }).await
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_consecutive_broker_failures_only() {
        let b = breaker(3);
        fail(&b).await.unwrap_err();
        fail(&b).await.unwrap_err();
        succeed(&b).await.unwrap();
        // The success reset the count; refusals of the message are not the broker's fault.
        for _ in 0..5 {
            b.call(async { Err::<(), _>(Error::invalid_input("bad topic")) })
                .await
                .unwrap_err();
        }
        fail(&b).await.unwrap_err();
        fail(&b).await.unwrap_err();
        assert_eq!(b.state(), BreakerState::Closed);
        fail(&b).await.unwrap_err();
        assert_eq!(b.state(), BreakerState::Open);
        assert!(b.last_error().unwrap().contains("connection refused"));
    }

    #[tokio::test(start_paused = true)]
    async fn open_fails_fast_then_one_probe_decides() {
        let b = breaker(1);
        fail(&b).await.unwrap_err();
        let calls = std::sync::atomic::AtomicUsize::new(0);
        let counted = || async {
            calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok::<(), Error>(())
        };
        let err = b.call(counted()).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Connection);
        assert!(err.is_retryable());
        assert!(
            err.to_string().contains("circuit breaker test is open"),
            "{err}"
        );
        assert_eq!(
            calls.load(std::sync::atomic::Ordering::Relaxed),
            0,
            "failed fast"
        );

        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(b.state(), BreakerState::HalfOpen);
        let probe = b.acquire().unwrap();
        b.acquire().expect_err("one probe at a time");
        // A failed probe opens it again for a whole interval.
        probe.record(Some(&down()));
        assert_eq!(b.state(), BreakerState::Open);
        tokio::time::advance(Duration::from_secs(9)).await;
        assert_eq!(b.state(), BreakerState::Open);
        tokio::time::advance(Duration::from_secs(1)).await;
        // An abandoned probe gives its place back.
        drop(b.acquire().unwrap());
        succeed(&b).await.unwrap();
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.last_error(), None);
    }

    /// A probe permit that outlives its half-open period (the breaker closed and opened again
    /// meanwhile) neither underflows the probe count when it is dropped or recorded, nor
    /// takes the place of the new period's probe: the breaker still lets one probe through
    /// and closes on its success.
    #[tokio::test(start_paused = true)]
    async fn a_probe_from_an_earlier_half_open_period_counts_for_nothing() {
        for record_it in [false, true] {
            let b = breaker(1);
            fail(&b).await.unwrap_err();
            tokio::time::advance(Duration::from_secs(10)).await;
            let stale = b.acquire().expect("the half-open probe");
            // A delivery closes it, a failure opens it again, and a new half-open period
            // begins while the old probe is still out.
            b.observe(None);
            fail(&b).await.unwrap_err();
            tokio::time::advance(Duration::from_secs(10)).await;
            assert_eq!(b.state(), BreakerState::HalfOpen);
            let probe = b.acquire().expect("the new period's probe");
            if record_it {
                stale.record(Some(&down()));
            } else {
                drop(stale);
            }
            assert_eq!(
                b.state(),
                BreakerState::HalfOpen,
                "the stale probe decides nothing"
            );
            b.acquire()
                .expect_err("the new probe is still out: one at a time");
            probe.record(None);
            assert_eq!(b.state(), BreakerState::Closed, "record_it = {record_it}");
            // And the count is sound: the next half-open period has its probe again.
            fail(&b).await.unwrap_err();
            tokio::time::advance(Duration::from_secs(10)).await;
            succeed(&b).await.unwrap();
            assert_eq!(b.state(), BreakerState::Closed);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_delivery_closes_it() {
        let b = breaker(1);
        fail(&b).await.unwrap_err();
        assert_eq!(b.state(), BreakerState::Open);
        b.observe(None);
        assert_eq!(b.state(), BreakerState::Closed);
        b.observe(Some(&down()));
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[test]
    fn bad_settings_are_refused() {
        for config in [
            BreakerConfig {
                failure_threshold: 0,
                ..BreakerConfig::default()
            },
            BreakerConfig {
                half_open_probes: 0,
                ..BreakerConfig::default()
            },
            BreakerConfig {
                open_interval: Duration::ZERO,
                ..BreakerConfig::default()
            },
        ] {
            assert_eq!(
                CircuitBreaker::new("x", config).unwrap_err().kind(),
                ErrorKind::InvalidInput
            );
        }
    }
}
