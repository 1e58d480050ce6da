//! What every case uses: fresh names, receives with timeouts, quiet checks.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use helix_messaging_core::{Broker, Delivery, Result, SubscribeOptions, Subscription};

/// Timing of the suite. Real brokers need more patience than the memory one; every value can
/// be set from the environment (milliseconds).
#[derive(Debug, Clone)]
pub struct Settings {
    /// Longest wait for one expected delivery (`HELIX_TESTKIT_RECEIVE_TIMEOUT_MS`, default
    /// 15,000).
    pub receive_timeout: Duration,
    /// How long to watch for a delivery that must not come (`HELIX_TESTKIT_QUIET_MS`,
    /// default 500).
    pub quiet_period: Duration,
    /// Longest run of one case (`HELIX_TESTKIT_CASE_TIMEOUT_MS`, default 120,000).
    pub case_timeout: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            receive_timeout: Duration::from_secs(15),
            quiet_period: Duration::from_millis(500),
            case_timeout: Duration::from_secs(120),
        }
    }
}

impl Settings {
    /// Defaults, overridden by the `HELIX_TESTKIT_*_MS` variables that are set.
    ///
    /// # Panics
    /// If a variable is set but is not a whole number of milliseconds (naming the variable).
    pub fn from_env() -> Self {
        fn ms(var: &str, default: Duration) -> Duration {
            match std::env::var(var) {
                Err(_) => default,
                Ok(v) => Duration::from_millis(v.trim().parse().unwrap_or_else(|_| {
                    panic!("{var}: expected a whole number of milliseconds, got {v:?}")
                })),
            }
        }
        let d = Settings::default();
        Settings {
            receive_timeout: ms("HELIX_TESTKIT_RECEIVE_TIMEOUT_MS", d.receive_timeout),
            quiet_period: ms("HELIX_TESTKIT_QUIET_MS", d.quiet_period),
            case_timeout: ms("HELIX_TESTKIT_CASE_TIMEOUT_MS", d.case_timeout),
        }
    }
}

/// A variable lookup over fixed pairs, for testing `from_vars`-style configuration without
/// touching the process environment.
pub fn env_lookup(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> + use<> {
    let map: std::collections::HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    move |name| map.get(name).cloned()
}

/// Send the log to the test's output, filtered by `RUST_LOG` or, without it, by `default`
/// (for example `"helix_messaging_rabbitmq=info"`: an adapter's reconnects and re-created
/// consumers), so a failing fault test shows what supervision was doing. Only the first
/// call in a test binary installs it; later ones do nothing.
pub fn log_to_test_output(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// A random name with a readable prefix, unique per call, valid on every backend.
pub fn fresh_name(prefix: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("hm-test.{prefix}.{}", &id[..12])
}

/// The seeds a seeded mode runs: the one `one` names, else `1..=n` for the `n` that `count`
/// names, else `default`.
///
/// # Panics
/// When a variable is set to something that is not a whole number, naming it.
pub(crate) fn seeds_from_env(one: &str, count: &str, default: Vec<u64>) -> Vec<u64> {
    if let Ok(seed) = std::env::var(one) {
        return vec![
            seed.trim()
                .parse()
                .unwrap_or_else(|_| panic!("{one}: expected a whole number, got {seed:?}")),
        ];
    }
    match std::env::var(count) {
        Ok(n) => {
            let n: u64 = n
                .trim()
                .parse()
                .unwrap_or_else(|_| panic!("{count}: expected a number of seeds, got {n:?}"));
            (1..=n).collect()
        }
        Err(_) => default,
    }
}

/// Builds a fresh broker of the backend under test.
pub(crate) type Factory =
    Arc<dyn Fn() -> futures::future::BoxFuture<'static, Result<Arc<dyn Broker>>> + Send + Sync>;

/// What a case gets: a fresh broker and the timing settings, plus helpers.
#[derive(Clone)]
pub struct Ctx {
    /// The broker under test (closed by the runner after the case).
    pub broker: Arc<dyn Broker>,
    /// Timing settings.
    pub settings: Settings,
    /// Every topic handed out by [`Ctx::topic`], for the adapter's cleanup afterwards.
    topics: Arc<std::sync::Mutex<Vec<String>>>,
    /// Builds more brokers of the same backend, for [`Ctx::another_broker`].
    factory: Option<Factory>,
}

impl std::fmt::Debug for Ctx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ctx")
            .field("broker", &self.broker.name())
            .field("settings", &self.settings)
            .finish()
    }
}

impl Ctx {
    /// Wrap a broker.
    pub fn new(broker: Arc<dyn Broker>, settings: Settings) -> Self {
        Ctx {
            broker,
            settings,
            topics: Arc::default(),
            factory: None,
        }
    }

    /// The same, able to build more brokers of the backend with `factory`.
    pub(crate) fn with_factory(mut self, factory: Factory) -> Self {
        self.factory = Some(factory);
        self
    }

    /// Another broker of the backend under test, as a second process would have it (the
    /// case closes it).
    ///
    /// # Errors
    /// The factory's error; [`ErrorKind::Unsupported`](helix_messaging_core::ErrorKind) for a
    /// context made with [`Ctx::new`], which has no factory.
    pub async fn another_broker(&self) -> Result<Arc<dyn Broker>> {
        match &self.factory {
            Some(factory) => factory().await,
            None => Err(helix_messaging_core::Error::new(
                helix_messaging_core::ErrorKind::Unsupported,
                "this test context cannot build another broker: it was made with Ctx::new, without a factory",
            )),
        }
    }

    /// A fresh topic name (remembered, so the runner can have it cleaned up).
    pub fn topic(&self, what: &str) -> String {
        let name = fresh_name(what);
        self.topics
            .lock()
            .expect("topic list lock")
            .push(name.clone());
        name
    }

    /// The topics handed out so far.
    pub fn topics_used(&self) -> Vec<String> {
        self.topics.lock().expect("topic list lock").clone()
    }

    /// Subscribe, panicking with context on error.
    pub async fn subscribe(&self, topic: &str, options: SubscribeOptions) -> Subscription {
        self.broker
            .subscribe(topic, options)
            .await
            .unwrap_or_else(|e| panic!("subscribe to {topic}: {e}"))
    }

    /// The next delivery, failing the case if none arrives within the receive timeout, the
    /// stream reports an error or ends.
    pub async fn recv(&self, sub: &mut Subscription) -> Delivery {
        match tokio::time::timeout(self.settings.receive_timeout, sub.next()).await {
            Err(_) => panic!(
                "no delivery on {} within {:?}",
                sub.topic(),
                self.settings.receive_timeout
            ),
            Ok(None) => panic!("subscription to {} ended unexpectedly", sub.topic()),
            Ok(Some(Err(e))) => panic!("subscription to {} reported: {e}", sub.topic()),
            Ok(Some(Ok(delivery))) => delivery,
        }
    }

    /// `n` deliveries, each within the receive timeout.
    pub async fn recv_n(&self, sub: &mut Subscription, n: usize) -> Vec<Delivery> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(self.recv(sub).await);
        }
        out
    }

    /// Receive `n` deliveries, acking each, and return their message ids in arrival order.
    pub async fn recv_ack_ids(&self, sub: &mut Subscription, n: usize) -> Vec<String> {
        let mut ids = Vec::with_capacity(n);
        for _ in 0..n {
            let d = self.recv(sub).await;
            ids.push(d.message().id().to_owned());
            d.ack().await.expect("ack");
        }
        ids
    }

    /// Fail the case if a delivery arrives during the quiet period.
    pub async fn expect_quiet(&self, sub: &mut Subscription) {
        if let Ok(next) = tokio::time::timeout(self.settings.quiet_period, sub.next()).await {
            match next {
                Some(Ok(d)) => panic!(
                    "unexpected delivery on {}: id {} (attempt {})",
                    sub.topic(),
                    d.message().id(),
                    d.attempt()
                ),
                Some(Err(e)) => panic!("subscription to {} reported: {e}", sub.topic()),
                None => panic!("subscription to {} ended unexpectedly", sub.topic()),
            }
        }
    }

    /// Publish, panicking with context on error.
    pub async fn publish(&self, topic: &str, message: helix_messaging_core::Message) {
        let id = message.id().to_owned();
        self.broker
            .publish(topic, message)
            .await
            .unwrap_or_else(|e| panic!("publish {id} to {topic}: {e}"));
    }

    /// Create the named group (so it retains what is published while it has no member) with
    /// [`Broker::create_group`](helix_messaging_core::Broker::create_group).
    pub async fn create_group(&self, topic: &str, group: &str) -> Result<()> {
        self.broker.create_group(topic, group).await
    }
}

/// Poll `check` every 20 ms until it returns `Some`, and return that; panics (failing the
/// test) with `what` if it has not within `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Most bytes a publish's future may take. The `Publisher` trait boxes each publish's
/// future, and glibc serves chunks up to 1,032 bytes from a per-thread cache: a larger
/// future takes the allocator's slow path on every publish.
pub const MAX_PUBLISH_FUTURE_BYTES: usize = 1_024;

/// Check that `publisher`'s publish future fits [`MAX_PUBLISH_FUTURE_BYTES`]. The future is
/// built and dropped, never polled: nothing is published.
///
/// # Panics
/// When it is larger.
pub fn assert_publish_future_fits_the_allocators_cache(
    publisher: &dyn helix_messaging_core::Publisher,
) {
    let publishing = publisher.publish("size", helix_messaging_core::Message::new("x"));
    let size = std::mem::size_of_val(&*publishing);
    assert!(
        size <= MAX_PUBLISH_FUTURE_BYTES,
        "a publish's future is {size} bytes"
    );
}
