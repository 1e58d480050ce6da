//! The connection metrics of the real Redis: the publishing connection up while connected,
//! down once closed, and connections and failed attempts counted.

use std::time::Duration;

use helix_messaging_core::Broker;
use helix_messaging_redis::{RedisBroker, RedisConfig, RedisMode, STREAMS_NAME};
use helix_messaging_testkit::recorded::{self, connections, connections_up};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_state_is_up_after_connect_and_down_after_close() {
    recorded::install();
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let config = RedisConfig::new(&url, RedisMode::Streams).expect("REDIS_URL");
    let address = config.address();
    let (before, _) = connections(STREAMS_NAME);
    let broker = RedisBroker::connect(config).await.unwrap();
    assert_eq!(connections_up(STREAMS_NAME, &address), Some(1.0));
    assert_eq!(connections(STREAMS_NAME).0 - before, 1);
    broker.close().await.unwrap();
    assert_eq!(connections_up(STREAMS_NAME, &address), Some(0.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connection_is_counted_as_a_failure() {
    recorded::install();
    // Port 1 on loopback: nothing listens, the connection is refused at once.
    let mut config = RedisConfig::new("redis://127.0.0.1:1", RedisMode::Streams).unwrap();
    config.connect_timeout = Duration::from_secs(5);
    let (_, before) = connections(STREAMS_NAME);
    RedisBroker::connect(config).await.unwrap_err();
    assert_eq!(connections(STREAMS_NAME).1 - before, 1);
}

/// Subscriptions read on connections of their own: each is in `messaging_connection_up`
/// while it is connected. When Redis goes away, each failed attempt to reach it again is
/// counted, the subscription's connection is down, and once Redis is back the reconnect is
/// counted as a connection made and it is up again. Pub/sub is Redis's default mode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pubsub_subscriptions_connection_is_up_down_and_counted_through_an_outage() {
    subscription_through_an_outage(RedisMode::PubSub).await;
}

/// As for pub/sub, with a Streams group's reader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streams_subscriptions_connection_is_up_down_and_counted_through_an_outage() {
    subscription_through_an_outage(RedisMode::Streams).await;
}

async fn subscription_through_an_outage(mode: RedisMode) {
    use helix_messaging_core::{Message, Publisher, SubscribeOptions, Subscriber};
    use helix_messaging_testkit::eventually;
    use helix_messaging_testkit::faults::PrivateRedis;

    recorded::install();
    let mut server = PrivateRedis::start();
    let mut config = RedisConfig::new(&server.url(), mode).unwrap();
    config.max_reconnect_delay = Duration::from_millis(200);
    let address = config.address();
    let broker = RedisBroker::connect(config).await.unwrap();
    let backend = broker.name();
    let up = || connections_up(backend, &address);
    let figures = || connections(backend);
    let options = match mode {
        RedisMode::Streams => SubscribeOptions::group("g"),
        RedisMode::PubSub => SubscribeOptions::default(),
    };
    let mut sub = broker.subscribe("outage", options).await.unwrap();
    assert_eq!(
        up(),
        Some(2.0),
        "the publishing connection and the subscription's"
    );
    let before = figures();

    server.crash();
    // Polled meanwhile, as an application does: a pub/sub subscription learns of the loss,
    // and reconnects, when it is polled.
    polling_until(
        &mut sub,
        "failed attempts counted, subscription down",
        || figures().1 > before.1 && up() == Some(1.0),
    )
    .await;
    server.restart();
    polling_until(&mut sub, "the reconnect counted and up", || {
        figures().0 > before.0 && up() == Some(2.0)
    })
    .await;
    // The publishing connection learns of the outage on its first use, which fails
    // (retryably); pub/sub keeps nothing for a subscriber that is not yet back. So publish
    // until one arrives.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        assert!(
            std::time::Instant::now() < deadline,
            "a message after the outage: not within 20 s"
        );
        if broker
            .publish("outage", Message::new("after"))
            .await
            .is_err()
        {
            continue;
        }
        let next = futures::StreamExt::next(&mut sub);
        if let Ok(delivery) = tokio::time::timeout(Duration::from_millis(500), next).await {
            let delivery = delivery.expect("the subscription goes on").unwrap();
            assert_eq!(delivery.message().payload(), "after".as_bytes());
            // Not what this test is about: an ack's connection may meet the outage on its
            // first use too (failing retryably, the entry redelivered later).
            let _ = delivery.ack().await;
            break;
        }
    }
    drop(sub);
    eventually(
        Duration::from_secs(10),
        "the dropped subscription's share gone",
        || async { (up() == Some(1.0)).then_some(()) },
    )
    .await;
    broker.close().await.unwrap();
}

/// Poll `sub` (expecting nothing) until `done`, failing the test after 30 s.
async fn polling_until(
    sub: &mut helix_messaging_core::Subscription,
    what: &str,
    done: impl Fn() -> bool,
) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not within 30 s"
        );
        let next = futures::StreamExt::next(sub);
        if let Ok(Some(Ok(delivery))) = tokio::time::timeout(Duration::from_millis(100), next).await
        {
            panic!(
                "nothing was published, yet {:?} arrived",
                delivery.message().id()
            );
        }
    }
}
