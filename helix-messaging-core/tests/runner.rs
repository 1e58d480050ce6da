//! The handler runner: settlement from results, bounded concurrency, layers, shutdown.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use helix_messaging_core::{
    BoxHandler, Broker, Envelope, Handler, HandlerError, Layer, Message, Publisher, RunReport,
    Runner, SubscribeOptions, Subscriber, async_trait, handler_fn,
};
use helix_messaging_memory::MemoryBroker;
use tokio::sync::Notify;

const WAIT: Duration = Duration::from_secs(10);

/// Poll `runner.report()` until `done` holds, failing after [`WAIT`].
async fn wait_for(runner: &Runner, what: &str, done: impl Fn(&RunReport) -> bool) {
    let waited = tokio::time::timeout(WAIT, async {
        while !done(&runner.report()) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(
        waited.is_ok(),
        "{what}: report stuck at {:?}",
        runner.report()
    );
}

fn broker() -> Arc<MemoryBroker> {
    Arc::new(MemoryBroker::new())
}

/// Publish messages "0" to "n-1" to `topic`, returning them.
async fn publish_numbered(broker: &MemoryBroker, topic: &str, n: usize) -> Vec<Message> {
    let mut sent = Vec::with_capacity(n);
    for i in 0..n {
        let m = Message::new(format!("{i}"));
        broker.publish(topic, m.clone()).await.unwrap();
        sent.push(m);
    }
    sent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_decide_settlement() {
    let broker = broker();
    let attempts_seen = Arc::new(Mutex::new(Vec::new()));
    let seen = attempts_seen.clone();
    let runner = Runner::builder(broker.clone(), "tasks")
        .group("workers")
        .start(handler_fn(move |env: Envelope| {
            let seen = seen.clone();
            async move {
                let body = std::str::from_utf8(env.message.payload())
                    .map_err(HandlerError::permanent)?
                    .to_owned();
                seen.lock().unwrap().push((body.clone(), env.info.attempt));
                match body.as_str() {
                    "flaky" if env.info.attempt == 1 => Err(HandlerError::transient("not yet")),
                    "poison" => Err(HandlerError::permanent("cannot parse")),
                    _ => Ok(()),
                }
            }
        }))
        .await
        .expect("runner starts");
    for body in ["ok", "flaky", "poison"] {
        broker.publish("tasks", Message::new(body)).await.unwrap();
    }
    wait_for(&runner, "all settled", |r| r.acked == 2 && r.rejected == 1).await;
    let report = runner.shutdown().await;
    assert_eq!(report.requeued, 1, "{report:?}");
    assert_eq!(report.interrupted, 0);
    assert_eq!(report.settle_errors, 0);
    let mut seen = attempts_seen.lock().unwrap().clone();
    seen.sort();
    assert_eq!(
        seen,
        vec![
            ("flaky".to_owned(), 1),
            ("flaky".to_owned(), 2),
            ("ok".to_owned(), 1),
            ("poison".to_owned(), 1)
        ]
    );
    assert_eq!(
        broker.topic_stats("tasks").depth,
        0,
        "nothing left queued or unacked"
    );
}

/// A handler that counts how many run at once and blocks until released.
struct Gate {
    running: AtomicUsize,
    max: AtomicUsize,
    release: Notify,
    released: std::sync::atomic::AtomicBool,
}

impl Gate {
    fn new() -> Arc<Self> {
        Arc::new(Gate {
            running: AtomicUsize::new(0),
            max: AtomicUsize::new(0),
            release: Notify::new(),
            released: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Wait (bounded) until `n` handlers are running at once.
    async fn wait_until_running(&self, n: usize) {
        let started = tokio::time::timeout(WAIT, async {
            while self.running.load(Ordering::SeqCst) < n {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        assert!(started.is_ok(), "{n} handlers did not start");
    }

    fn open(&self) {
        self.released.store(true, Ordering::SeqCst);
        self.release.notify_waiters();
    }
}

#[async_trait]
impl Handler for Gate {
    async fn handle(&self, _envelope: Envelope) -> Result<(), HandlerError> {
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.max.fetch_max(now, Ordering::SeqCst);
        let released = self.release.notified();
        if !self.released.load(Ordering::SeqCst) {
            released.await;
        }
        self.running.fetch_sub(1, Ordering::SeqCst);
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_is_bounded() {
    let broker = broker();
    let gate = Gate::new();
    let runner = Runner::builder(broker.clone(), "bounded")
        .concurrency(3)
        .start(gate.clone())
        .await
        .unwrap();
    publish_numbered(&broker, "bounded", 10).await;
    gate.wait_until_running(3).await;
    // Give a fourth handler every chance to start if the bound were broken.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(gate.max.load(Ordering::SeqCst), 3);
    gate.open();
    wait_for(&runner, "all acked", |r| r.acked == 10).await;
    assert_eq!(
        gate.max.load(Ordering::SeqCst),
        3,
        "never more than 3 at once"
    );
    runner.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_in_flight_handlers_finish() {
    let broker = broker();
    let gate = Gate::new();
    let runner = Runner::builder(broker.clone(), "graceful")
        .group("g")
        .concurrency(4)
        .shutdown_timeout(WAIT)
        .start(gate.clone())
        .await
        .unwrap();
    publish_numbered(&broker, "graceful", 4).await;
    gate.wait_until_running(4).await;
    let shutdown = tokio::spawn(runner.shutdown());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !shutdown.is_finished(),
        "shutdown waits for in-flight handlers"
    );
    gate.open();
    let report = shutdown.await.unwrap();
    assert_eq!(report.acked, 4, "{report:?}");
    assert_eq!(report.interrupted, 0);
    assert_eq!(broker.topic_stats("graceful").depth, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handlers_past_the_shutdown_timeout_are_requeued_not_rejected() {
    let broker = broker();
    let gate = Gate::new(); // never opened: handlers hang
    let runner = Runner::builder(broker.clone(), "stuck")
        .group("g")
        .concurrency(2)
        .shutdown_timeout(Duration::from_millis(100))
        .start(gate.clone())
        .await
        .unwrap();
    let sent = publish_numbered(&broker, "stuck", 2).await;
    gate.wait_until_running(2).await;
    let report = tokio::time::timeout(WAIT, runner.shutdown())
        .await
        .expect("shutdown is bounded by its timeout");
    assert_eq!(report.interrupted, 2, "{report:?}");
    assert_eq!(report.rejected, 0);

    let mut sub = broker
        .subscribe("stuck", SubscribeOptions::group("g"))
        .await
        .unwrap();
    let mut ids = Vec::new();
    for _ in 0..2 {
        let d = tokio::time::timeout(WAIT, sub.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(
            d.attempt(),
            2,
            "interrupted delivery comes back as a redelivery"
        );
        ids.push(d.message().id().to_owned());
        d.ack().await.unwrap();
    }
    ids.sort();
    let mut expected: Vec<String> = sent.iter().map(|m| m.id().to_owned()).collect();
    expected.sort();
    assert_eq!(ids, expected);
}

/// Records every envelope whose handler failed permanently and reports success instead:
/// the shape the DLQ layer takes.
struct CatchPermanent {
    caught: Arc<Mutex<Vec<String>>>,
    order: Arc<Mutex<Vec<&'static str>>>,
    name: &'static str,
}

struct CatchPermanentHandler {
    inner: BoxHandler,
    caught: Arc<Mutex<Vec<String>>>,
    order: Arc<Mutex<Vec<&'static str>>>,
    name: &'static str,
}

impl Layer for CatchPermanent {
    fn layer(&self, inner: BoxHandler) -> BoxHandler {
        Arc::new(CatchPermanentHandler {
            inner,
            caught: self.caught.clone(),
            order: self.order.clone(),
            name: self.name,
        })
    }
}

#[async_trait]
impl Handler for CatchPermanentHandler {
    async fn handle(&self, envelope: Envelope) -> Result<(), HandlerError> {
        self.order.lock().unwrap().push(self.name);
        let id = envelope.message.id().to_owned();
        match self.inner.handle(envelope).await {
            Err(e) if e.is_permanent() => {
                self.caught.lock().unwrap().push(id);
                Ok(())
            }
            other => other,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layers_wrap_the_handler_outermost_first_and_can_change_the_outcome() {
    let broker = broker();
    let caught = Arc::new(Mutex::new(Vec::new()));
    let order = Arc::new(Mutex::new(Vec::new()));
    let layer = |name| CatchPermanent {
        caught: caught.clone(),
        order: order.clone(),
        name,
    };
    let runner = Runner::builder(broker.clone(), "layered")
        .group("g")
        .layer(layer("outer"))
        .layer(layer("inner"))
        .start(handler_fn(|_env: Envelope| async {
            Err(HandlerError::permanent("never works"))
        }))
        .await
        .unwrap();
    let m = Message::new("x");
    broker.publish("layered", m.clone()).await.unwrap();
    wait_for(&runner, "acked by the layer", |r| r.acked == 1).await;
    let report = runner.shutdown().await;
    assert_eq!(
        report.rejected, 0,
        "the layer turned the failure into success"
    );
    assert_eq!(*caught.lock().unwrap(), vec![m.id().to_owned()]);
    assert_eq!(*order.lock().unwrap(), vec!["outer", "inner"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_requeues_and_the_runner_keeps_going() {
    let broker = broker();
    let runner = Runner::builder(broker.clone(), "panics")
        .group("g")
        .start(handler_fn(|env: Envelope| async move {
            assert!(env.info.attempt > 1, "first attempt panics");
            Ok(())
        }))
        .await
        .unwrap();
    broker.publish("panics", Message::new("x")).await.unwrap();
    wait_for(&runner, "second attempt acked", |r| r.acked == 1).await;
    let report = runner.shutdown().await;
    assert_eq!(report.requeued, 1, "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runner_stops_when_the_broker_closes() {
    let broker = broker();
    let runner = Runner::builder(broker.clone(), "closing")
        .start(handler_fn(|_env: Envelope| async { Ok(()) }))
        .await
        .unwrap();
    broker.close().await.unwrap();
    let report = tokio::time::timeout(WAIT, runner.wait())
        .await
        .expect("runner ends with its subscription");
    assert_eq!(report, RunReport::default());
}
