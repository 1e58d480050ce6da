//! Behaviour specific to the memory broker's configuration: ack deadline, backpressure,
//! retention, private groups, TTL accounting.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt;
use helix_messaging_core::{
    Broker, Delivery, ErrorKind, Message, Publisher, SubscribeOptions, Subscriber, Subscription,
    TimeRange,
};
use helix_messaging_memory::{MemoryBroker, MemoryConfig};

const WAIT: Duration = Duration::from_secs(10);

async fn recv(sub: &mut Subscription) -> Delivery {
    tokio::time::timeout(WAIT, sub.next())
        .await
        .expect("delivery within timeout")
        .expect("subscription open")
        .expect("no stream error")
}

/// A broker with `config` and an existing group "g" on topic "t" with no member, so what is
/// published waits there.
async fn broker_with_group(config: MemoryConfig) -> MemoryBroker {
    let broker = MemoryBroker::with_config(config);
    drop(
        broker
            .subscribe("t", SubscribeOptions::group("g"))
            .await
            .unwrap(),
    );
    broker
}

/// Publish messages "0", "1", … to topic "t", each publish awaited.
async fn publish_numbered(broker: &MemoryBroker, count: usize) {
    for i in 0..count {
        broker
            .publish("t", Message::new(format!("{i}")))
            .await
            .unwrap();
    }
}

async fn history(broker: &MemoryBroker, topic: &str) -> Vec<String> {
    let range = TimeRange::new(SystemTime::UNIX_EPOCH, SystemTime::now() + WAIT).unwrap();
    broker
        .read_range(topic, range)
        .await
        .unwrap()
        .map(|e| e.unwrap().message.id().to_owned())
        .collect()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_deadline_is_measured_from_delivery_not_publish() {
    let deadline = Duration::from_millis(300);
    let broker = MemoryBroker::with_config(MemoryConfig {
        ack_deadline: Some(deadline),
        ..MemoryConfig::default()
    });
    let group = SubscribeOptions::group("g");
    drop(broker.subscribe("t", group.clone()).await.unwrap());
    let m = Message::new("slow");
    broker.publish("t", m.clone()).await.unwrap();
    // The message waits longer than the deadline before anyone takes it; a deadline measured
    // from publish would already have passed.
    tokio::time::sleep(deadline * 2).await;

    let mut first = broker.subscribe("t", group.clone()).await.unwrap();
    let held = recv(&mut first).await;
    let delivered_at = Instant::now();
    assert_eq!(held.attempt(), 1);

    let mut second = broker.subscribe("t", group).await.unwrap();
    let again = recv(&mut second).await;
    let waited = delivered_at.elapsed();
    assert_eq!(again.message().id(), m.id());
    assert_eq!(again.attempt(), 2);
    assert!(again.info().redelivered);
    assert!(
        waited >= deadline - Duration::from_millis(20),
        "redelivered after {waited:?}, before the {deadline:?} deadline"
    );
    let late = held.ack().await.expect_err("ack after the deadline");
    assert_eq!(late.kind(), ErrorKind::NotFound);
    again.ack().await.unwrap();
    assert_eq!(broker.topic_stats("t").depth, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_group_makes_publish_wait_then_time_out_without_dropping() {
    let broker = broker_with_group(MemoryConfig {
        max_queue_depth: 3,
        publish_timeout: Duration::from_millis(200),
        ..MemoryConfig::default()
    })
    .await;
    publish_numbered(&broker, 3).await;
    let started = Instant::now();
    let err = broker
        .publish("t", Message::new("one too many"))
        .await
        .expect_err("group is full");
    assert_eq!(err.kind(), ErrorKind::Timeout);
    assert!(err.is_retryable());
    assert!(
        err.to_string().contains("\"g\" is full (3 messages)"),
        "{err}"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(200),
        "publish waited first"
    );

    let batch = broker
        .publish_batch("t", vec![Message::new("a"), Message::new("b")])
        .await;
    assert_eq!(batch.succeeded(), 0);
    assert_eq!(batch.failures().len(), 2);
    assert_eq!(
        broker.topic_stats("t").depth,
        3,
        "the refused messages were not enqueued"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_publish_completes_when_an_ack_frees_room() {
    let broker = MemoryBroker::with_config(MemoryConfig {
        max_queue_depth: 2,
        publish_timeout: WAIT,
        ..MemoryConfig::default()
    });
    let mut sub = broker
        .subscribe("t", SubscribeOptions::group("g"))
        .await
        .unwrap();
    let sent: Vec<Message> = (0..4).map(|i| Message::new(format!("{i}"))).collect();
    let publisher = {
        let broker = broker.clone();
        let sent = sent.clone();
        tokio::spawn(async move { broker.publish_batch("t", sent).await })
    };
    let mut got = Vec::new();
    for _ in 0..4 {
        let d = recv(&mut sub).await;
        got.push(d.message().id().to_owned());
        d.ack().await.unwrap();
    }
    let report = tokio::time::timeout(WAIT, publisher)
        .await
        .unwrap()
        .unwrap();
    assert!(report.is_ok(), "{:?}", report.failures());
    let expected: Vec<String> = sent.iter().map(|m| m.id().to_owned()).collect();
    assert_eq!(got, expected, "all delivered, in order");
}

/// The publish timeout bounds each wait for room, not the whole batch: a batch whose
/// messages each get room within the timeout goes through, however long it takes in all
/// (the contract of `Publisher::publish_batch`: it fails once a message is not taken in
/// time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_that_gets_room_within_each_timeout_goes_through_however_long_in_all() {
    let timeout = Duration::from_millis(300);
    let broker = MemoryBroker::with_config(MemoryConfig {
        max_queue_depth: 2,
        publish_timeout: timeout,
        ..MemoryConfig::default()
    });
    let mut sub = broker
        .subscribe("t", SubscribeOptions::group("g"))
        .await
        .unwrap();
    // One ack every 100 ms: each wait is about that, the batch takes about 800 ms.
    let consumer = tokio::spawn(async move {
        for _ in 0..10 {
            let d = recv(&mut sub).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
            d.ack().await.unwrap();
        }
    });
    let started = Instant::now();
    let sent: Vec<Message> = (0..10).map(|i| Message::new(format!("{i}"))).collect();
    let report = broker.publish_batch("t", sent).await;
    assert!(
        report.is_ok(),
        "after {:?}: {:?}",
        started.elapsed(),
        report.failures()
    );
    assert!(
        started.elapsed() > timeout,
        "the batch did wait past one timeout in all"
    );
    tokio::time::timeout(WAIT, consumer).await.unwrap().unwrap();
}

/// Lets every spawned task run until it waits (on the current-thread runtime, a task runs
/// when the test task yields).
async fn let_spawned_tasks_run() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(flavor = "current_thread")]
async fn every_publisher_waiting_for_room_goes_on_as_acks_free_it() {
    const CAPACITY: usize = 4;
    const WAITING: usize = 20;
    let broker = MemoryBroker::with_config(MemoryConfig {
        max_queue_depth: CAPACITY,
        publish_timeout: WAIT,
        ..MemoryConfig::default()
    });
    let mut sub = broker
        .subscribe("t", SubscribeOptions::group("g").with_prefetch(100))
        .await
        .unwrap();
    for i in 0..CAPACITY {
        broker
            .publish("t", Message::new(format!("fill {i}")))
            .await
            .unwrap();
    }
    let publishers: Vec<_> = (0..WAITING)
        .map(|i| {
            let broker = broker.clone();
            tokio::spawn(async move {
                broker
                    .publish("t", Message::new(format!("waits {i}")))
                    .await
            })
        })
        .collect();
    let_spawned_tasks_run().await;
    assert!(
        publishers.iter().all(|p| !p.is_finished()),
        "the group is full, so every publisher waits"
    );
    // Each ack frees one slot; one waiting publisher takes it. None may be left asleep
    // beside room freed while another was being woken.
    for _ in 0..CAPACITY + WAITING {
        recv(&mut sub).await.ack().await.unwrap();
    }
    for publisher in publishers {
        tokio::time::timeout(WAIT, publisher)
            .await
            .expect("the publisher went on before its timeout")
            .unwrap()
            .expect("published");
    }
    assert_eq!(broker.topic_stats("t").depth, 0, "every message acked");
}

#[tokio::test(flavor = "current_thread")]
async fn dropping_a_private_subscription_lets_a_waiting_publisher_go_on() {
    let broker = MemoryBroker::with_config(MemoryConfig {
        max_queue_depth: 1,
        publish_timeout: WAIT,
        ..MemoryConfig::default()
    });
    let sub = broker
        .subscribe("t", SubscribeOptions::default())
        .await
        .unwrap();
    broker.publish("t", Message::new("fills it")).await.unwrap();
    let waiting = {
        let broker = broker.clone();
        tokio::spawn(async move { broker.publish("t", Message::new("waits")).await })
    };
    let_spawned_tasks_run().await;
    assert!(!waiting.is_finished(), "the private group is full");
    drop(sub);
    // Well before the publish timeout: the room went with the group, not with a deadline.
    tokio::time::timeout(Duration::from_secs(2), waiting)
        .await
        .expect("the publisher is woken when the group goes away")
        .unwrap()
        .expect("published");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_wakes_a_publisher_waiting_for_room() {
    let broker = broker_with_group(MemoryConfig {
        max_queue_depth: 1,
        publish_timeout: WAIT,
        ..MemoryConfig::default()
    })
    .await;
    broker.publish("t", Message::new("fills it")).await.unwrap();
    let waiting = {
        let broker = broker.clone();
        tokio::spawn(async move { broker.publish("t", Message::new("waits")).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    broker.close().await.unwrap();
    let err = tokio::time::timeout(Duration::from_secs(2), waiting)
        .await
        .expect("close wakes the publisher")
        .unwrap()
        .expect_err("publish fails");
    assert_eq!(err.kind(), ErrorKind::Closed);
}

#[tokio::test]
async fn retained_log_keeps_the_newest_messages_up_to_the_count() {
    let broker = MemoryBroker::with_config(MemoryConfig {
        retention_messages: 5,
        ..MemoryConfig::default()
    });
    let sent: Vec<Message> = (0..8).map(|i| Message::new(format!("{i}"))).collect();
    for m in &sent {
        broker.publish("t", m.clone()).await.unwrap();
    }
    let expected: Vec<String> = sent[3..].iter().map(|m| m.id().to_owned()).collect();
    assert_eq!(history(&broker, "t").await, expected);
}

#[tokio::test]
async fn retained_log_drops_messages_older_than_the_age_limit() {
    let broker = MemoryBroker::with_config(MemoryConfig {
        retention_age: Some(Duration::from_millis(100)),
        ..MemoryConfig::default()
    });
    broker.publish("t", Message::new("old")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(250)).await;
    let fresh = Message::new("fresh");
    broker.publish("t", fresh.clone()).await.unwrap();
    assert_eq!(history(&broker, "t").await, vec![fresh.id().to_owned()]);
}

#[tokio::test]
async fn zero_retention_keeps_no_history() {
    let broker = MemoryBroker::with_config(MemoryConfig {
        retention_messages: 0,
        ..MemoryConfig::default()
    });
    broker.publish("t", Message::new("x")).await.unwrap();
    assert!(history(&broker, "t").await.is_empty());
}

#[tokio::test]
async fn a_private_group_goes_away_with_its_subscription() {
    let broker = MemoryBroker::new();
    let sub = broker
        .subscribe("t", SubscribeOptions::default())
        .await
        .unwrap();
    broker
        .publish("t", Message::new("seen by the private group"))
        .await
        .unwrap();
    assert_eq!(broker.topic_stats("t").depth, 1);
    drop(sub);
    assert_eq!(
        broker.topic_stats("t").depth,
        0,
        "nothing held for a gone subscriber"
    );
    broker
        .publish("t", Message::new("nobody listens"))
        .await
        .unwrap();
    assert_eq!(broker.topic_stats("t").depth, 0);
}

#[tokio::test]
async fn expired_messages_are_counted() {
    let broker = broker_with_group(MemoryConfig::default()).await;
    broker
        .publish("t", Message::new("x").with_ttl(Duration::from_millis(10)))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut sub = broker
        .subscribe("t", SubscribeOptions::group("g"))
        .await
        .unwrap();
    let next = tokio::time::timeout(Duration::from_millis(200), sub.next()).await;
    assert!(next.is_err(), "expired message was delivered");
    assert_eq!(broker.topic_stats("t").expired, 1);
    assert_eq!(broker.topic_stats("t").depth, 0);
}

#[tokio::test]
async fn prefetch_bounds_unacked_deliveries_per_subscription() {
    let broker = Arc::new(MemoryBroker::new());
    let mut sub = broker
        .subscribe("t", SubscribeOptions::group("g").with_prefetch(2))
        .await
        .unwrap();
    publish_numbered(&broker, 3).await;
    let a = recv(&mut sub).await;
    let _b = recv(&mut sub).await;
    let third = tokio::time::timeout(Duration::from_millis(200), sub.next()).await;
    assert!(
        third.is_err(),
        "a third delivery arrived with two unacked and prefetch 2"
    );
    a.ack().await.unwrap();
    let c = recv(&mut sub).await;
    assert_eq!(c.message().payload().as_ref(), b"2");
}

#[tokio::test]
async fn health_reports_closed_broker_as_unhealthy() {
    let broker = MemoryBroker::new();
    assert_eq!(
        broker.health().await.status,
        helix_messaging_core::HealthStatus::Healthy
    );
    broker.close().await.unwrap();
    broker.close().await.expect("close is idempotent");
    assert_eq!(
        broker.health().await.status,
        helix_messaging_core::HealthStatus::Unhealthy
    );
}

#[tokio::test]
async fn expired_messages_make_room_in_a_full_group() {
    let broker = broker_with_group(MemoryConfig {
        max_queue_depth: 3,
        publish_timeout: Duration::from_millis(100),
        ..MemoryConfig::default()
    })
    .await;
    let keeper = Message::new("no ttl");
    broker.publish("t", keeper.clone()).await.unwrap();
    for ttl_ms in [30, 60] {
        let m = Message::new("short-lived").with_ttl(Duration::from_millis(ttl_ms));
        broker.publish("t", m).await.unwrap();
    }
    // Full now; once both TTLs have passed, their room is reclaimed without any consumer.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let late = Message::new("fits after the purge");
    broker
        .publish("t", late.clone())
        .await
        .expect("room was reclaimed");
    assert_eq!(broker.topic_stats("t").expired, 2);
    assert_eq!(broker.topic_stats("t").depth, 2);

    let mut sub = broker
        .subscribe("t", SubscribeOptions::group("g"))
        .await
        .unwrap();
    for expected in [&keeper, &late] {
        let d = recv(&mut sub).await;
        assert_eq!(d.message().id(), expected.id());
        d.ack().await.unwrap();
    }
}

/// At 1,424 bytes, publish + ack ran at 0.50x of a tokio channel in `bench/`'s peak mode;
/// at 592, 0.67x.
#[test]
fn a_publish_future_fits_the_allocators_per_thread_cache() {
    helix_messaging_testkit::assert_publish_future_fits_the_allocators_cache(&MemoryBroker::new());
}

/// Publishers admitted without the topic lock, racing each other, never fill a group past
/// its bound: exactly the bound's worth of publishes succeed, the rest time out, and the
/// group holds each message that succeeded.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_publishers_never_overfill_a_group() {
    const BOUND: usize = 500;
    for round in 0..10 {
        let broker = Arc::new(
            broker_with_group(MemoryConfig {
                max_queue_depth: BOUND,
                publish_timeout: Duration::from_millis(20),
                ..MemoryConfig::default()
            })
            .await,
        );
        let tasks: Vec<_> = (0..8)
            .map(|task| {
                let broker = broker.clone();
                tokio::spawn(async move {
                    let mut ok = 0usize;
                    for i in 0..70 {
                        let message = Message::new(format!("{task}-{i}"));
                        let published = if i % 3 == 0 {
                            broker.publish_batch("t", vec![message]).await.into_result()
                        } else {
                            broker.publish("t", message).await
                        };
                        match published {
                            Ok(()) => ok += 1,
                            Err(err) => assert_eq!(err.kind(), ErrorKind::Timeout, "{err}"),
                        }
                    }
                    ok
                })
            })
            .collect();
        let mut succeeded = 0;
        for task in tasks {
            succeeded += task.await.unwrap();
        }
        assert_eq!(succeeded, BOUND, "round {round}: publishes that succeeded");
        assert_eq!(
            broker.backlog("t", "g").await.unwrap().waiting,
            BOUND as u64,
            "round {round}: the group holds every message that succeeded, and no more"
        );
    }
}

/// A message published without the topic lock is in the broker once `publish` returns:
/// each reader sees it at once, the first to look after the publish, with no consumer having
/// taken the lock since.
#[tokio::test]
async fn a_published_message_is_seen_by_every_reader_at_once() {
    type Reader = fn(MemoryBroker, String) -> futures::future::BoxFuture<'static, ()>;
    let readers: [(&str, Reader); 4] = [
        ("backlog", |broker, _| {
            Box::pin(async move {
                assert_eq!(broker.backlog("t", "g").await.unwrap().waiting, 1);
            })
        }),
        ("topic_stats", |broker, _| {
            Box::pin(async move { assert_eq!(broker.topic_stats("t").depth, 1) })
        }),
        ("read_range", |broker, id| {
            Box::pin(async move { assert_eq!(history(&broker, "t").await, vec![id]) })
        }),
        ("subscribe from the earliest", |broker, id| {
            Box::pin(async move {
                let mut late = broker
                    .subscribe(
                        "t",
                        SubscribeOptions::group("late")
                            .with_start(helix_messaging_core::StartPosition::Earliest),
                    )
                    .await
                    .unwrap();
                assert_eq!(recv(&mut late).await.message().id(), id);
            })
        }),
    ];
    for (name, read) in readers {
        let broker = broker_with_group(MemoryConfig::default()).await;
        let message = Message::new("here");
        let id = message.id().to_owned();
        broker.publish("t", message).await.unwrap();
        eprintln!("reader: {name}");
        read(broker, id).await;
    }
}

/// A publisher waiting for room goes on as soon as there is room, even when other publishes
/// went into the inbox meanwhile: they are counted once, not once in the group and again as
/// waiting to be entered.
#[tokio::test(flavor = "current_thread")]
async fn a_waiting_publisher_goes_on_while_others_publish_into_the_room() {
    let broker = MemoryBroker::with_config(MemoryConfig {
        max_queue_depth: 3,
        publish_timeout: Duration::from_secs(600),
        ..MemoryConfig::default()
    });
    let mut group = broker
        .subscribe("t", SubscribeOptions::group("g").with_prefetch(10))
        .await
        .unwrap();
    let private = broker
        .subscribe("t", SubscribeOptions::default())
        .await
        .unwrap();
    publish_numbered(&broker, 3).await;
    let waiting = {
        let broker = broker.clone();
        tokio::spawn(async move { broker.publish("t", Message::new("waits")).await })
    };
    let_spawned_tasks_run().await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(recv(&mut group).await);
    }
    for delivery in held {
        delivery.ack().await.unwrap();
    }
    let_spawned_tasks_run().await;
    assert!(!waiting.is_finished(), "the private group is still full");
    // The full private group goes away, waking the waiting publisher, and two more
    // publishes take room without the lock before it runs: 2 of 3 in "g", room for it.
    drop(private);
    broker.publish("t", Message::new("first")).await.unwrap();
    broker.publish("t", Message::new("second")).await.unwrap();
    tokio::time::timeout(WAIT, waiting)
        .await
        .expect("the waiting publish went on while there was room")
        .unwrap()
        .unwrap();
    assert_eq!(broker.backlog("t", "g").await.unwrap().waiting, 3);
}

/// A group that joins from the earliest message, while publishers race to fill the topic,
/// never holds more than its bound: what it takes from the log leaves room for what was
/// admitted to the inbox before it joined.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_group_joining_from_the_earliest_never_holds_more_than_its_bound() {
    const BOUND: usize = 64;
    let broker = Arc::new(MemoryBroker::with_config(MemoryConfig {
        max_queue_depth: BOUND,
        publish_timeout: Duration::from_millis(5),
        ..MemoryConfig::default()
    }));
    publish_numbered(&broker, BOUND).await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let publishers: Vec<_> = (0..3)
        .map(|_| {
            let broker = broker.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let batch = (0..8).map(|i| Message::new(format!("{i}"))).collect();
                    let _ = broker.publish_batch("t", batch).await;
                    tokio::task::yield_now().await;
                }
            })
        })
        .collect();
    let mut fullest = 0;
    for _ in 0..3_000 {
        let joined = broker
            .subscribe(
                "t",
                SubscribeOptions::default()
                    .with_start(helix_messaging_core::StartPosition::Earliest),
            )
            .await
            .unwrap();
        // The private group is the topic's only one: the topic's depth is its own.
        fullest = fullest.max(broker.topic_stats("t").depth);
        drop(joined);
        if fullest > BOUND {
            break;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for publisher in publishers {
        publisher.await.unwrap();
    }
    assert!(
        fullest <= BOUND,
        "a group held {fullest}, past its bound of {BOUND}"
    );
}

static PAYLOADS_FREED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// A payload that counts when it is freed.
struct Counted(Vec<u8>);

impl AsRef<[u8]> for Counted {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        PAYLOADS_FREED.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Messages retention drops from the log are freed even when nothing is published after
/// them: at most 256 wait for the next publish, and closing the broker frees those too.
#[tokio::test]
async fn messages_past_retention_are_freed_without_another_publish() {
    let broker = MemoryBroker::with_config(MemoryConfig {
        retention_messages: 1,
        ..MemoryConfig::default()
    });
    for _ in 0..1_000 {
        let payload = bytes::Bytes::from_owner(Counted(vec![0; 1024]));
        broker.publish("t", Message::new(payload)).await.unwrap();
    }
    // A reader enters whatever waits in the inbox: retention drops all but the newest.
    assert_eq!(history(&broker, "t").await.len(), 1);
    let freed = PAYLOADS_FREED.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        freed >= 999 - 256,
        "{freed} of the 999 messages past retention freed"
    );
    broker.close().await.unwrap();
    assert_eq!(
        PAYLOADS_FREED.load(std::sync::atomic::Ordering::SeqCst),
        999,
        "closing frees every message past retention"
    );
}
