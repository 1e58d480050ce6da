use super::*;
use crate::fallback::spool::{MemorySpool, SpoolLimits, SpooledMessage};

#[tokio::test]
async fn an_open_breaker_with_an_empty_spool_is_degraded() {
    use crate::breaker::BreakerConfig;
    // Up, accepting everything.
    let breaker = BreakerBroker::new(
        Arc::new(Scripted::default()),
        BreakerConfig {
            failure_threshold: 1,
            ..BreakerConfig::default()
        },
    )
    .unwrap();
    let fallback = FallbackBroker::new(
        breaker,
        Arc::new(MemorySpool::new(SpoolLimits::default())),
        ForwardConfig::default(),
    )
    .await
    .unwrap();
    assert_eq!(fallback.health().await.status, HealthStatus::Healthy);
    fallback
        .breaker_broker()
        .publish_breaker()
        .observe(Some(&Error::new(ErrorKind::Connection, "refused")));
    let health = fallback.health().await;
    assert_eq!(health.status, HealthStatus::Degraded, "{health:?}");
    assert!(health.detail.contains("spool empty"), "{health:?}");
    fallback.close().await.unwrap();
}

/// A broker whose availability the test switches, which refuses payloads saying
/// "poison" for good and records what it accepted, in order.
#[derive(Debug, Default)]
struct Scripted {
    down: std::sync::atomic::AtomicBool,
    closed: std::sync::atomic::AtomicBool,
    accepted: Mutex<Vec<(String, String)>>,
    /// Payloads "busy" answered with a retryable refusal so far (RabbitMQ's negative
    /// confirm while a quorum queue elects its leader).
    busy_refusals: std::sync::atomic::AtomicUsize,
}

impl Scripted {
    fn set_down(&self, down: bool) {
        self.down.store(down, std::sync::atomic::Ordering::SeqCst);
    }

    fn accepted(&self) -> Vec<(String, String)> {
        self.accepted.lock().clone()
    }
}

#[async_trait]
impl Publisher for Scripted {
    async fn publish(&self, topic: &str, message: Message) -> Result<()> {
        if self.down.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(
                Error::new(ErrorKind::Connection, "connection refused").with_retryable(true)
            );
        }
        if self.closed.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(Error::closed("the scripted broker"));
        }
        let payload = String::from_utf8_lossy(message.payload()).into_owned();
        if payload == "poison" {
            return Err(Error::new(ErrorKind::Rejected, "the broker refuses poison"));
        }
        if payload == "busy"
            && self
                .busy_refusals
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
                < 2
        {
            return Err(
                Error::new(ErrorKind::Rejected, "negative confirm, for now").with_retryable(true)
            );
        }
        self.accepted.lock().push((topic.to_owned(), payload));
        Ok(())
    }
}

#[async_trait]
impl Subscriber for Scripted {
    async fn subscribe(&self, _: &str, _: SubscribeOptions) -> Result<Subscription> {
        Err(Error::unsupported("scripted", "subscribing"))
    }
}

#[async_trait]
impl Broker for Scripted {
    fn name(&self) -> &'static str {
        "scripted"
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities::NONE
    }
    async fn health(&self) -> Health {
        Health::healthy("up")
    }
    async fn read_range(&self, _: &str, _: TimeRange) -> Result<HistoryStream> {
        Err(Error::unsupported("scripted", "history"))
    }
    async fn close(&self) -> Result<()> {
        Ok(())
    }
}

/// A fallback broker over `broker` whose breaker never opens (so every publish is tried
/// on the broker first) and whose forwarder retries every 10 ms.
async fn fallback_over(broker: Arc<Scripted>, spool: Arc<dyn Spool>) -> FallbackBroker {
    fallback_retrying(broker, spool, Duration::from_millis(10)).await
}

/// The same, retrying every `retry_interval`.
async fn fallback_retrying(
    broker: Arc<Scripted>,
    spool: Arc<dyn Spool>,
    retry_interval: Duration,
) -> FallbackBroker {
    use crate::breaker::BreakerConfig;
    let breaker = BreakerBroker::new(
        broker,
        BreakerConfig {
            failure_threshold: 1_000_000,
            ..BreakerConfig::default()
        },
    )
    .unwrap();
    let config = ForwardConfig {
        batch_size: 100,
        retry_interval,
    };
    FallbackBroker::new(breaker, spool, config).await.unwrap()
}

/// Wait (at most 5 s) until `done` holds.
async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within 5 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn payloads(accepted: &[(String, String)], topic: &str) -> Vec<String> {
    accepted
        .iter()
        .filter(|(t, _)| t == topic)
        .map(|(_, p)| p.clone())
        .collect()
}

/// A spooled message the broker refuses for good is set aside with the broker's reason
/// (listed, counted, reported as degraded health), and everything behind it, on its
/// topic and on others, is forwarded; it can be discarded or sent again.
#[tokio::test]
async fn a_refused_message_is_set_aside_and_the_rest_keeps_flowing() {
    let broker = Arc::new(Scripted::default());
    let fallback = fallback_over(broker.clone(), Arc::new(MemorySpool::default())).await;
    broker.set_down(true);
    for (topic, payload) in [("a", "a1"), ("a", "poison"), ("a", "a2"), ("b", "b1")] {
        fallback
            .publish(topic, Message::new(payload))
            .await
            .unwrap();
    }
    assert_eq!(
        fallback.spool_stats().await.unwrap().depth,
        4,
        "all spooled"
    );
    broker.set_down(false);
    eventually("everything but the refused message forwarded", || {
        broker.accepted().len() == 3
    })
    .await;
    let accepted = broker.accepted();
    assert_eq!(payloads(&accepted, "a"), ["a1", "a2"], "in order");
    assert_eq!(payloads(&accepted, "b"), ["b1"]);
    // Later publishes go straight to the broker again.
    fallback.publish("a", Message::new("a3")).await.unwrap();
    assert_eq!(payloads(&broker.accepted(), "a"), ["a1", "a2", "a3"]);

    let stats = fallback.spool_stats().await.unwrap();
    assert_eq!((stats.depth, stats.refused), (0, 1), "{stats:?}");
    let refused = fallback.refused(10).await.unwrap();
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0].topic, "a");
    assert_eq!(refused[0].message.payload().as_ref(), b"poison");
    assert!(
        refused[0].reason.contains("refuses poison"),
        "{:?}",
        refused[0]
    );
    let health = fallback.health().await;
    assert_eq!(health.status, HealthStatus::Degraded, "{health:?}");
    assert!(health.detail.contains("1 refused"), "{health:?}");

    // Sent again, it is refused again and set aside again; discarded, it is gone.
    assert!(fallback.retry_refused(refused[0].seq).await.unwrap());
    let mut again = Vec::new();
    for _ in 0..200 {
        again = fallback.refused(10).await.unwrap();
        if again.len() == 1 && again[0].seq != refused[0].seq {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(again.len(), 1, "set aside again");
    assert_ne!(again[0].seq, refused[0].seq, "a new place in the spool");
    assert!(
        !fallback.discard_refused(refused[0].seq).await.unwrap(),
        "no longer there"
    );
    assert!(fallback.discard_refused(again[0].seq).await.unwrap());
    assert_eq!(fallback.spool_stats().await.unwrap().refused, 0);
    assert_eq!(fallback.health().await.status, HealthStatus::Healthy);
    fallback.close().await.unwrap();
}

/// A refusal the broker says is for now (retryable: RabbitMQ's negative confirm while a
/// quorum queue elects its leader) is no refusal of the message: it stays spooled and goes
/// again, and is not set aside for an operator.
#[tokio::test]
async fn a_refusal_for_now_is_forwarded_again_not_set_aside() {
    let broker = Arc::new(Scripted::default());
    let fallback = fallback_over(broker.clone(), Arc::new(MemorySpool::default())).await;
    broker.set_down(true);
    fallback.publish("a", Message::new("busy")).await.unwrap();
    fallback.publish("a", Message::new("after")).await.unwrap();
    broker.set_down(false);
    eventually("the message refused for now forwarded", || {
        payloads(&broker.accepted(), "a").contains(&"busy".to_owned())
    })
    .await;
    let mut stats = fallback.spool_stats().await.unwrap();
    for _ in 0..200 {
        if stats.depth == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
        stats = fallback.spool_stats().await.unwrap();
    }
    assert_eq!(
        (stats.depth, stats.refused),
        (0, 0),
        "nothing set aside: {stats:?}"
    );
    assert_eq!(
        broker
            .busy_refusals
            .load(std::sync::atomic::Ordering::SeqCst),
        3,
        "refused twice, then taken"
    );
    fallback.close().await.unwrap();
}

/// A forward that meets a closed broker (the process is shutting down) keeps the
/// messages spooled for the next process: closing is not the broker refusing them.
#[tokio::test]
async fn a_closed_broker_sets_nothing_aside() {
    let broker = Arc::new(Scripted::default());
    let spool = Arc::new(MemorySpool::default());
    let fallback = fallback_retrying(broker.clone(), spool, Duration::from_secs(3600)).await;
    broker.set_down(true);
    fallback.publish("t", Message::new("kept")).await.unwrap();
    broker.set_down(false);
    broker
        .closed
        .store(true, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(fallback.forward_once().await.unwrap(), 0);
    let stats = fallback.spool_stats().await.unwrap();
    assert_eq!((stats.depth, stats.refused), (1, 0), "{stats:?}");
    fallback.close().await.unwrap();
}

/// An empty batch spools nothing and leaves the topic's order alone.
#[tokio::test]
async fn an_empty_batch_spools_nothing() {
    let broker = Arc::new(Scripted::default());
    let spool = Arc::new(MemorySpool::default());
    let fallback = fallback_over(broker.clone(), spool).await;
    broker.set_down(true);
    fallback.publish("a", Message::new("a1")).await.unwrap();
    let report = fallback.publish_batch("b", Vec::new()).await;
    assert!(report.failures().is_empty());
    assert!(!fallback.spooled_behind("b"), "b has nothing waiting");
    fallback.close().await.unwrap();
}

/// A publish that the broker would refuse for its name is refused at once, never spooled
/// with `Ok`.
#[tokio::test]
async fn a_bad_name_is_refused_before_spooling() {
    let broker = Arc::new(Scripted::default());
    let fallback = fallback_over(broker.clone(), Arc::new(MemorySpool::default())).await;
    broker.set_down(true);
    let err = fallback
        .publish("bad topic!", Message::new("x"))
        .await
        .expect_err("an invalid name");
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
    let report = fallback
        .publish_batch("bad topic!", vec![Message::new("x")])
        .await;
    assert_eq!(report.failures().len(), 1);
    assert_eq!(fallback.spool_stats().await.unwrap().depth, 0);
    fallback.close().await.unwrap();
}

/// A memory spool scripted by the test: its appends can pause once they are durable until
/// the test lets them go on, or take effect and then be reported failed (a commit whose
/// answer was lost); its figures can be unreadable.
#[derive(Debug, Default)]
struct ScriptedSpool {
    inner: MemorySpool,
    pausing: bool,
    appends_reported_failed: bool,
    figures_unreadable: bool,
    committed: Notify,
    resume: Notify,
    appends: std::sync::atomic::AtomicUsize,
}

impl ScriptedSpool {
    fn pausing() -> Self {
        ScriptedSpool {
            pausing: true,
            ..ScriptedSpool::default()
        }
    }
}

#[async_trait]
impl Spool for ScriptedSpool {
    async fn append(&self, topic: &str, messages: &[Message]) -> Result<i64> {
        let seq = self.inner.append(topic, messages).await?;
        self.appends
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if self.pausing {
            self.committed.notify_one();
            self.resume.notified().await;
        }
        if self.appends_reported_failed {
            return Err(
                Error::new(ErrorKind::Timeout, "the commit's answer was lost").with_retryable(true),
            );
        }
        Ok(seq)
    }
    async fn oldest(&self, limit: usize) -> Result<Vec<SpooledMessage>> {
        self.inner.oldest(limit).await
    }
    async fn oldest_after(&self, after: i64, limit: usize) -> Result<Vec<SpooledMessage>> {
        self.inner.oldest_after(after, limit).await
    }
    async fn remove(&self, seqs: &[i64]) -> Result<()> {
        self.inner.remove(seqs).await
    }
    async fn refuse(&self, seq: i64, reason: &str) -> Result<()> {
        self.inner.refuse(seq, reason).await
    }
    async fn refused(&self, limit: usize) -> Result<Vec<RefusedMessage>> {
        self.inner.refused(limit).await
    }
    async fn release_refused(&self, seq: i64, retry: bool) -> Result<bool> {
        self.inner.release_refused(seq, retry).await
    }
    async fn topics(&self) -> Result<HashMap<String, i64>> {
        self.inner.topics().await
    }
    async fn stats(&self) -> Result<SpoolStats> {
        if self.figures_unreadable {
            return Err(Error::new(
                ErrorKind::Backend,
                "the spool's figures cannot be read",
            ));
        }
        self.inner.stats().await
    }
}

/// A publish whose caller went away after the spool had it still holds the topic's
/// order: a later publish to the topic is spooled behind it, not sent ahead (the
/// forwarder retries only hourly here, so nothing but the topic's marks keeps the order).
#[tokio::test]
async fn a_publish_cancelled_after_spooling_is_not_overtaken() {
    let broker = Arc::new(Scripted::default());
    let spool = Arc::new(ScriptedSpool::pausing());
    let fallback =
        fallback_retrying(broker.clone(), spool.clone(), Duration::from_secs(3600)).await;
    broker.set_down(true);
    let publish = fallback.publish("t", Message::new("first"));
    tokio::select! {
        _ = publish => panic!("the append is paused"),
        () = spool.committed.notified() => {}
    }
    // The caller is gone; the spool has the message. The append goes on by itself, and
    // the forwarder's first round finds the broker still down (its next is in an hour).
    spool.resume.notify_one();
    tokio::time::sleep(Duration::from_millis(50)).await;
    broker.set_down(false);
    let second = fallback.publish("t", Message::new("second"));
    tokio::pin!(second);
    loop {
        tokio::select! {
            result = &mut second => { result.unwrap(); break; }
            () = spool.committed.notified() => spool.resume.notify_one(),
        }
    }
    eventually("both forwarded", || broker.accepted().len() == 2).await;
    assert_eq!(payloads(&broker.accepted(), "t"), ["first", "second"]);
    fallback.close().await.unwrap();
}

/// A message forwarded before its append has returned leaves nothing behind: the topic's
/// next publish goes straight to the broker.
#[tokio::test]
async fn a_message_forwarded_before_its_append_returns_leaves_the_topic_unspooled() {
    let broker = Arc::new(Scripted::default());
    let spool = Arc::new(ScriptedSpool::pausing());
    let fallback = fallback_over(broker.clone(), spool.clone()).await;
    broker.set_down(true);
    let publishing = {
        let fallback = fallback.clone();
        tokio::spawn(async move { fallback.publish("t", Message::new("first")).await })
    };
    spool.committed.notified().await;
    broker.set_down(false);
    assert_eq!(
        fallback.forward_once().await.unwrap(),
        1,
        "forwarded meanwhile"
    );
    spool.resume.notify_one();
    publishing.await.unwrap().unwrap();
    tokio::time::timeout(
        Duration::from_secs(2),
        fallback.publish("t", Message::new("second")),
    )
    .await
    .expect("straight to the broker, not into the (paused) spool")
    .unwrap();
    assert_eq!(payloads(&broker.accepted(), "t"), ["first", "second"]);
    assert_eq!(
        spool.appends.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the second publish went straight to the broker"
    );
    fallback.close().await.unwrap();
}

/// A message the spool took although its append was reported failed is forwarded once
/// the broker is back: the forwarder is woken for it, and a spool whose figures cannot
/// be read counts as holding something. Found by the plane harness (a process killed and
/// restarted on its spool, memory, seed 9): the forwarder slept for an hour beside it.
#[tokio::test]
async fn a_message_spooled_by_an_append_reported_failed_is_still_forwarded() {
    // The forwarder is asleep when the append fails: only a wake-up brings it back.
    let readable = ScriptedSpool {
        appends_reported_failed: true,
        ..ScriptedSpool::default()
    };
    spooled_by_an_append_reported_failed_is_forwarded(readable).await;
    // It is woken, finds the broker down, and cannot tell whether anything waits.
    let unreadable = ScriptedSpool {
        appends_reported_failed: true,
        figures_unreadable: true,
        ..ScriptedSpool::default()
    };
    spooled_by_an_append_reported_failed_is_forwarded(unreadable).await;
}

async fn spooled_by_an_append_reported_failed_is_forwarded(spool: ScriptedSpool) {
    let broker = Arc::new(Scripted::default());
    let fallback = fallback_over(broker.clone(), Arc::new(spool)).await;
    // Idle: the forwarder has found nothing and rests until woken.
    tokio::time::sleep(Duration::from_millis(50)).await;
    broker.set_down(true);
    let published = fallback.publish("t", Message::new("kept")).await;
    assert_eq!(published.unwrap_err().kind(), ErrorKind::Timeout);
    // The forwarder tries while the broker is still down, then looks whether anything
    // waits before it rests.
    tokio::time::sleep(Duration::from_millis(100)).await;
    broker.set_down(false);
    eventually("the spooled message forwarded", || {
        payloads(&broker.accepted(), "t") == ["kept"]
    })
    .await;
    fallback.close().await.unwrap();
}
