//! Faults on a private `redis-server`: a crash and restart loses no accepted message, and
//! subscriptions and publishers reconnect after `CLIENT KILL`, each reconnect counted.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use helix_messaging_core::{Message, Publisher, SubscribeOptions, Subscriber};
use helix_messaging_redis::{RedisBroker, RedisConfig, RedisMode};
use helix_messaging_testkit::faults::PrivateRedis;

use crate::common::{WAIT, broker, recv};
use crate::{raw, topic};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_lose_no_accepted_message_across_a_server_crash_and_restart() {
    const MESSAGES: usize = 3_000;
    let mut server = PrivateRedis::start();
    let url = server.url();
    let topic = topic("restart");
    let tune = |c: &mut RedisConfig| {
        c.streams.ack_deadline = Duration::from_secs(2);
        c.max_reconnect_delay = Duration::from_millis(500);
        c.response_timeout = Duration::from_secs(2);
    };
    let consumer = broker(&url, RedisMode::Streams, tune).await;
    let mut sub = consumer
        .subscribe(&topic, SubscribeOptions::group("g").with_prefetch(200))
        .await
        .unwrap();
    let received: Arc<Mutex<Vec<String>>> = Arc::default();
    let collector = {
        let received = received.clone();
        tokio::spawn(async move {
            while let Some(item) = sub.next().await {
                let Ok(d) = item else { continue };
                received.lock().unwrap().push(d.message().id().to_owned());
                // An ack lost to the crash only means a redelivery, counted below.
                let _ = d.ack().await;
            }
        })
    };

    let publisher = broker(&url, RedisMode::Streams, tune).await;
    let mut accepted = Vec::new();
    let mut refused = 0;
    for i in 0..MESSAGES {
        if i == MESSAGES / 3 {
            server.crash();
            tokio::time::sleep(Duration::from_millis(300)).await;
            server.restart();
        }
        let m = Message::new(format!("event {i}")).with_id(format!("m{i}"));
        match publisher.publish(&topic, m).await {
            Ok(()) => accepted.push(format!("m{i}")),
            Err(err) => {
                assert!(err.is_retryable(), "outage errors are retryable: {err}");
                refused += 1;
            }
        }
    }
    let wanted: HashSet<String> = accepted.iter().cloned().collect();
    let all_in = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let got: HashSet<String> = received.lock().unwrap().iter().cloned().collect();
            if wanted.is_subset(&got) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let got = received.lock().unwrap().clone();
    let unique: HashSet<&String> = got.iter().collect();
    let missing: Vec<&String> = accepted.iter().filter(|id| !unique.contains(id)).collect();
    eprintln!(
        "restart test: {} accepted, {refused} refused during the outage, {} received, {} duplicates, {} missing",
        accepted.len(),
        got.len(),
        got.len() - unique.len(),
        missing.len()
    );
    assert!(
        all_in.is_ok(),
        "accepted messages never delivered: {missing:?}"
    );
    assert!(
        refused < MESSAGES / 2,
        "the publisher recovered after the restart"
    );
    collector.abort();
}

/// A broker in `mode` on a private server of its own (with the metrics recorder installed),
/// subscribed with `options` to a fresh topic that has delivered one message ("before",
/// acked).
async fn subscribed_on_a_private_server(
    mode: RedisMode,
    options: SubscribeOptions,
) -> (
    PrivateRedis,
    RedisBroker,
    String,
    helix_messaging_core::Subscription,
) {
    helix_messaging_testkit::recorded::install();
    let server = PrivateRedis::start_with(&["--appendonly", "no"]);
    let topic = topic("kill");
    let broker = broker(&server.url(), mode, |_| {}).await;
    let mut sub = broker.subscribe(&topic, options).await.unwrap();
    broker
        .publish(&topic, Message::new("before"))
        .await
        .unwrap();
    let before = recv(&mut sub).await;
    assert_eq!(before.message().payload().as_ref(), b"before");
    before.ack().await.unwrap();
    (server, broker, topic, sub)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_subscriber_is_back_within_five_seconds_after_client_kill() {
    let reconnects_before = helix_messaging_testkit::recorded::reconnects("redis");
    let (server, broker, topic, mut sub) =
        subscribed_on_a_private_server(RedisMode::PubSub, SubscribeOptions::default()).await;
    let url = server.url();

    let before = pubsub_client_ids(&url).await;
    assert_eq!(before.len(), 1, "one subscriber connection: {before:?}");
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(&mut raw(&url).await)
        .await
        .unwrap();
    assert_eq!(killed, 1, "the subscriber's connection was killed");
    let killed_at = Instant::now();

    // Probes published until one arrives show when the subscription is back; probes sent
    // while it was down are lost, as pub/sub promises.
    let back = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            broker.publish(&topic, Message::new("probe")).await.unwrap();
            if let Ok(Some(Ok(_))) =
                tokio::time::timeout(Duration::from_millis(100), sub.next()).await
            {
                return;
            }
        }
    })
    .await;
    assert!(
        back.is_ok(),
        "subscriber not back within 5 s of CLIENT KILL"
    );
    eprintln!(
        "pub/sub subscriber back {:?} after CLIENT KILL",
        killed_at.elapsed()
    );
    let after_ids = pubsub_client_ids(&url).await;
    assert_eq!(after_ids.len(), 1, "{after_ids:?}");
    assert_ne!(after_ids, before, "the subscriber is on a new connection");
    assert_eq!(
        helix_messaging_testkit::recorded::reconnects("redis") - reconnects_before,
        1,
        "the subscriber's reconnect is counted, once"
    );

    // The publishing connection: the first publish after its kill may meet the dead
    // connection (a retryable error); the one that then goes through counts the reconnect.
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("normal")
        .query_async(&mut raw(&url).await)
        .await
        .unwrap();
    assert_eq!(killed, 1, "the publishing connection");
    let deadline = Instant::now() + WAIT;
    while let Err(err) = broker.publish(&topic, Message::new("probe")).await {
        assert!(err.is_retryable(), "{err}");
        assert!(
            Instant::now() < deadline,
            "no publish within {WAIT:?}: {err}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        helix_messaging_testkit::recorded::reconnects("redis") - reconnects_before,
        2,
        "and the publisher's"
    );

    let after = Message::new("after");
    broker.publish(&topic, after.clone()).await.unwrap();
    loop {
        // Bare pub/sub payloads (the default) carry no id: the payload tells them apart.
        let d = recv(&mut sub).await;
        if d.message().payload() == after.payload() {
            break;
        }
        assert_eq!(d.message().payload().as_ref(), b"probe");
    }
}

/// After `CLIENT KILL` of its reading connection, a Streams subscription reads again, and
/// that reconnect is counted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streams_readers_reconnect_is_counted_after_client_kill() {
    let reconnects_before = helix_messaging_testkit::recorded::reconnects("redis-streams");
    let (server, broker, topic, mut sub) =
        subscribed_on_a_private_server(RedisMode::Streams, SubscribeOptions::group("g")).await;
    let url = server.url();

    // The reader is the connection blocked in XREADGROUP.
    let reader = tokio::time::timeout(WAIT, async {
        loop {
            let list: String = redis::cmd("CLIENT")
                .arg("LIST")
                .query_async(&mut raw(&url).await)
                .await
                .unwrap();
            let blocked = list
                .lines()
                .find(|line| line.contains("cmd=xreadgroup"))
                .and_then(|line| line.split(' ').find_map(|f| f.strip_prefix("id=")))
                .map(str::to_owned);
            if let Some(id) = blocked {
                return id;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("a connection blocked in XREADGROUP");
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("ID")
        .arg(&reader)
        .query_async(&mut raw(&url).await)
        .await
        .unwrap();
    assert_eq!(killed, 1);
    let after = Message::new("after");
    broker.publish(&topic, after.clone()).await.unwrap();
    let d = recv(&mut sub).await;
    assert_eq!(d.message().id(), after.id());
    d.ack().await.unwrap();
    assert_eq!(
        helix_messaging_testkit::recorded::reconnects("redis-streams") - reconnects_before,
        1,
        "the reader's reconnect"
    );
}

/// Ids of the server's pub/sub client connections.
async fn pubsub_client_ids(url: &str) -> Vec<String> {
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(&mut raw(url).await)
        .await
        .unwrap();
    list.lines()
        .filter_map(|line| line.split(' ').find_map(|f| f.strip_prefix("id=")))
        .map(str::to_owned)
        .collect()
}
