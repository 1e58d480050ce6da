//! Retry with exponential backoff and jitter: HelixAgent's `MaxRetries`, `RetryDelay`,
//! `RetryBackoffMultiplier` and `MaxRetryDelay`, as a policy and as a runner [`Layer`].

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use backon::{BackoffBuilder, ExponentialBuilder};
use parking_lot::Mutex;

use crate::delivery::Envelope;
use crate::error::{Error, Result};
use crate::runner::DeadLetterReason;
use crate::runner::{BoxHandler, Handler, HandlerError, Layer};

/// How often and how patiently a failing message is retried.
///
/// A message is attempted at most `max_retries + 1` times. The wait before retry `n` (1-based)
/// is `retry_delay * retry_backoff_multiplier^(n-1)`, capped at `max_retry_delay`, plus up to
/// the same again of random jitter when `jitter` is on, capped at `max_retry_delay` again.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Retries after the first attempt (HelixAgent's default: 3).
    pub max_retries: u32,
    /// Wait before the first retry (default 1 s).
    pub retry_delay: Duration,
    /// Factor the wait grows by per retry (default 2.0; at least 1.0).
    pub retry_backoff_multiplier: f32,
    /// Longest wait (default 30 s).
    pub max_retry_delay: Duration,
    /// Spread retries randomly so a burst of failures does not come back as a burst.
    pub jitter: bool,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_retries: 3,
            retry_delay: Duration::from_secs(1),
            retry_backoff_multiplier: 2.0,
            max_retry_delay: Duration::from_secs(30),
            jitter: true,
        }
    }
}

impl RetryPolicy {
    /// HelixAgent's defaults (3 retries, 1 s doubling up to 30 s, with jitter).
    pub fn new() -> Self {
        RetryPolicy::default()
    }

    /// Set `max_retries`.
    #[must_use]
    pub fn with_max_retries(mut self, max_retries: u32) -> Self {
        self.max_retries = max_retries;
        self
    }

    /// Set `retry_delay`.
    #[must_use]
    pub fn with_retry_delay(mut self, delay: Duration) -> Self {
        self.retry_delay = delay;
        self
    }

    /// Set `retry_backoff_multiplier`.
    #[must_use]
    pub fn with_backoff_multiplier(mut self, multiplier: f32) -> Self {
        self.retry_backoff_multiplier = multiplier;
        self
    }

    /// Set `max_retry_delay`.
    #[must_use]
    pub fn with_max_retry_delay(mut self, delay: Duration) -> Self {
        self.max_retry_delay = delay;
        self
    }

    /// Turn jitter on or off.
    #[must_use]
    pub fn with_jitter(mut self, jitter: bool) -> Self {
        self.jitter = jitter;
        self
    }

    /// Check the fields.
    ///
    /// # Errors
    /// [`ErrorKind::Config`](crate::ErrorKind::Config) naming the field: a multiplier below
    /// 1.0 or not finite, or a `max_retry_delay` below `retry_delay`.
    pub fn validate(&self) -> Result<()> {
        if !self.retry_backoff_multiplier.is_finite() || self.retry_backoff_multiplier < 1.0 {
            return Err(Error::config(
                "retry_backoff_multiplier",
                format!(
                    "must be a finite number of at least 1.0, got {}",
                    self.retry_backoff_multiplier
                ),
            ));
        }
        if self.max_retry_delay < self.retry_delay {
            return Err(Error::config(
                "max_retry_delay",
                format!(
                    "must be at least retry_delay ({:?}), got {:?}",
                    self.retry_delay, self.max_retry_delay
                ),
            ));
        }
        Ok(())
    }

    fn backoff(&self) -> ExponentialBuilder {
        let builder = ExponentialBuilder::default()
            .with_min_delay(self.retry_delay)
            .with_factor(self.retry_backoff_multiplier.max(1.0))
            .with_max_delay(self.max_retry_delay)
            .without_max_times();
        if self.jitter {
            builder.with_jitter()
        } else {
            builder
        }
    }

    /// The wait before retry number `retry` (1 for the first retry), or `None` once
    /// `max_retries` are used up.
    pub fn delay_before_retry(&self, retry: u32) -> Option<Duration> {
        if retry == 0 || retry > self.max_retries {
            return None;
        }
        let delay = self
            .backoff()
            .build()
            .nth(retry as usize - 1)
            .unwrap_or(self.max_retry_delay);
        // Whole microseconds: the f32 factor leaves nanosecond dust (200.000003 ms).
        let delay = Duration::from_micros(u64::try_from(delay.as_micros()).unwrap_or(u64::MAX));
        Some(delay.min(self.max_retry_delay))
    }
}

/// First-failure times of messages being retried, so the dead letter can say when the
/// trouble began. Bounded: the oldest entries make room (a message retried by another
/// instance never comes back here to be removed). Removal leaves the key's slot in `order`
/// behind, tagged with the entry's generation, so it costs nothing; eviction skips slots
/// whose entry is gone or newer.
struct FirstFailures {
    at: HashMap<String, (SystemTime, u64)>,
    order: VecDeque<(String, u64)>,
    capacity: usize,
    generation: u64,
}

impl FirstFailures {
    fn key(topic: &str, group: Option<&str>, id: &str) -> String {
        format!("{topic}\u{0}{}\u{0}{id}", group.unwrap_or(""))
    }

    fn note(&mut self, key: String, now: SystemTime) -> SystemTime {
        if let Some((at, _)) = self.at.get(&key) {
            return *at;
        }
        if self.order.len() >= self.capacity
            && let Some((oldest, generation)) = self.order.pop_front()
            && self.at.get(&oldest).is_some_and(|(_, g)| *g == generation)
        {
            self.at.remove(&oldest);
        }
        self.generation += 1;
        self.order.push_back((key.clone(), self.generation));
        self.at.insert(key, (now, self.generation));
        now
    }

    fn take(&mut self, key: &str) -> Option<SystemTime> {
        self.at.remove(key).map(|(at, _)| at)
    }
}

/// How many messages' first-failure times a [`RetryLayer`] remembers.
pub const FIRST_FAILURE_CAPACITY: usize = 65_536;

/// A runner [`Layer`] that retries transient failures with a [`RetryPolicy`].
///
/// A transient failure on attempt `n <= max_retries` is requeued after the policy's delay
/// (held by the broker where it can, see [`HandlerError::with_retry_after`]); the failure on
/// attempt `max_retries + 1` becomes permanent with reason
/// [`DeadLetterReason::MaxRetriesExceeded`], which a
/// [`DeadLetterLayer`](crate::dlq::DeadLetterLayer) outside this one dead-letters. Permanent
/// failures pass through untouched. Attempts are the broker's delivery attempts, so the count
/// holds across consumers and restarts.
///
/// Add the dead-letter layer first (outermost), then this one:
/// `Runner::builder(..).layer(dead_letter).layer(retry)`.
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use std::sync::Arc;
/// use std::time::Duration;
///
/// use helix_messaging_core::retry::{RetryLayer, RetryPolicy};
/// use helix_messaging_core::{Broker, Envelope, HandlerError, Message, Runner, handler_fn};
/// use helix_messaging_memory::MemoryBroker;
///
/// let broker: Arc<dyn Broker> = Arc::new(MemoryBroker::new());
/// let retry = RetryLayer::new(RetryPolicy {
///     max_retries: 3,
///     retry_delay: Duration::from_millis(10),
///     ..RetryPolicy::default()
/// })?;
/// let (done, mut finished) = tokio::sync::mpsc::unbounded_channel();
/// let runner = Runner::builder(broker.clone(), "jobs")
///     .group("workers")
///     .layer(retry)
///     .start(handler_fn(move |job: Envelope| {
///         let done = done.clone();
///         async move {
///             // Fails twice (the broker counts the attempts), then works.
///             if job.info.attempt < 3 {
///                 return Err(HandlerError::transient("the model is busy"));
///             }
///             done.send(job.info.attempt).ok();
///             Ok(())
///         }
///     }))
///     .await?;
/// broker.publish("jobs", Message::new("summarise")).await?;
/// let attempt = tokio::time::timeout(Duration::from_secs(5), finished.recv()).await;
/// assert_eq!(attempt.expect("done in time"), Some(3));
/// runner.shutdown().await;
/// # Ok::<(), helix_messaging_core::Error>(())
/// # }).unwrap();
/// ```
#[derive(Clone)]
pub struct RetryLayer {
    policy: Arc<RetryPolicy>,
    first_failures: Arc<Mutex<FirstFailures>>,
}

impl RetryLayer {
    /// A layer applying `policy`.
    ///
    /// # Errors
    /// As [`RetryPolicy::validate`].
    pub fn new(policy: RetryPolicy) -> Result<Self> {
        policy.validate()?;
        Ok(RetryLayer {
            policy: Arc::new(policy),
            first_failures: Arc::new(Mutex::new(FirstFailures {
                at: HashMap::new(),
                order: VecDeque::new(),
                capacity: FIRST_FAILURE_CAPACITY,
                generation: 0,
            })),
        })
    }

    /// The policy.
    pub fn policy(&self) -> &RetryPolicy {
        &self.policy
    }
}

impl Layer for RetryLayer {
    fn layer(&self, inner: BoxHandler) -> BoxHandler {
        Arc::new(Retrying {
            inner,
            layer: self.clone(),
        })
    }
}

struct Retrying {
    inner: BoxHandler,
    layer: RetryLayer,
}

#[async_trait]
impl Handler for Retrying {
    async fn handle(&self, envelope: Envelope) -> Result<(), HandlerError> {
        let attempt = envelope.info.attempt;
        // Cheap reference-counted copies: the key is only built when a message fails or
        // succeeds after failing.
        let who = (
            envelope.info.topic.clone(),
            envelope.info.group.clone(),
            envelope.message.clone(),
        );
        let key = || FirstFailures::key(&who.0, who.1.as_deref(), who.2.id());
        match self.inner.handle(envelope).await {
            Ok(()) => {
                if attempt > 1 {
                    self.layer.first_failures.lock().take(&key());
                }
                Ok(())
            }
            Err(err) if err.is_permanent() => Err(err),
            Err(err) => {
                let now = SystemTime::now();
                match self.layer.policy.delay_before_retry(attempt) {
                    Some(delay) => {
                        self.layer.first_failures.lock().note(key(), now);
                        Err(err.with_retry_after(delay))
                    }
                    None => {
                        let first = self.layer.first_failures.lock().take(&key()).unwrap_or(now);
                        Err(err
                            .with_reason(DeadLetterReason::MaxRetriesExceeded)
                            .with_first_failure(first))
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_by_the_multiplier_and_stop_at_the_cap() {
        let policy = RetryPolicy::new()
            .with_max_retries(6)
            .with_retry_delay(Duration::from_millis(100))
            .with_backoff_multiplier(2.0)
            .with_max_retry_delay(Duration::from_millis(500))
            .with_jitter(false);
        let delays: Vec<_> = (1..=7).map(|n| policy.delay_before_retry(n)).collect();
        let ms = |v: u64| Some(Duration::from_millis(v));
        assert_eq!(
            delays,
            vec![ms(100), ms(200), ms(400), ms(500), ms(500), ms(500), None]
        );
    }

    #[test]
    fn jitter_stays_between_the_delay_and_twice_it_and_under_the_cap() {
        let policy = RetryPolicy::new()
            .with_max_retries(3)
            .with_retry_delay(Duration::from_millis(100))
            .with_max_retry_delay(Duration::from_millis(300));
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..200 {
            let first = policy.delay_before_retry(1).expect("first retry");
            assert!(first >= Duration::from_millis(100) && first <= Duration::from_millis(200));
            seen.insert(first);
            let third = policy.delay_before_retry(3).expect("third retry");
            assert!(third <= Duration::from_millis(300));
        }
        assert!(seen.len() > 10, "jitter should spread delays, saw {seen:?}");
    }

    #[test]
    fn first_failures_stay_bounded_and_evict_only_the_oldest_live_entry() {
        let mut memory = FirstFailures {
            at: HashMap::new(),
            order: VecDeque::new(),
            capacity: 3,
            generation: 0,
        };
        let t = |s: u64| SystemTime::UNIX_EPOCH + Duration::from_secs(s);
        memory.note("a".into(), t(1));
        memory.note("b".into(), t(2));
        assert_eq!(memory.take("a"), Some(t(1)));
        // "a" comes back: its old slot must not evict the new entry.
        memory.note("a".into(), t(3));
        memory.note("c".into(), t(4));
        assert_eq!(
            memory.note("b".into(), t(9)),
            t(2),
            "a known key keeps its first time"
        );
        memory.note("d".into(), t(5));
        assert!(memory.at.len() <= 3 && memory.order.len() <= 3);
        assert_eq!(
            memory.take("a"),
            Some(t(3)),
            "the re-noted key survived its stale slot"
        );
        assert_eq!(memory.take("c"), Some(t(4)));
        assert_eq!(memory.take("d"), Some(t(5)));
    }

    #[test]
    fn bad_fields_are_named() {
        let err = RetryPolicy::new()
            .with_backoff_multiplier(0.5)
            .validate()
            .expect_err("multiplier below 1");
        assert!(err.to_string().contains("retry_backoff_multiplier"));
        let err = RetryPolicy::new()
            .with_max_retry_delay(Duration::from_millis(1))
            .validate()
            .expect_err("cap below delay");
        assert!(err.to_string().contains("max_retry_delay"));
    }
}
