//! Redis-specific behaviour: the reclaimer, restart durability, pub/sub reconnection, TLS,
//! unrouted publishes, undecodable entries. Fault tests run their own `redis-server`.

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{DeleteOnDrop, WAIT, broker, recv, shared_url};
use futures::StreamExt;
use helix_messaging_core::{Broker, ErrorKind, Message, Publisher, SubscribeOptions, Subscriber};
use helix_messaging_redis::{RedisBroker, RedisConfig, RedisMode};
use helix_messaging_testkit::faults::{PrivateRedis, free_port};

fn topic(what: &str) -> String {
    helix_messaging_testkit::fresh_name(what)
}

async fn raw(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reclaimer_hands_a_dead_consumers_entries_to_another_member_after_the_deadline() {
    // Long enough that a loaded machine acks a reclaimed delivery before its own deadline
    // passes (which would rightly reclaim it again).
    let deadline = Duration::from_secs(3);
    let url = shared_url();
    let topic = topic("reclaim");
    let _cleanup = DeleteOnDrop(vec![topic.clone()]);
    let group = "workers";
    let tune = move |c: &mut RedisConfig| c.streams.ack_deadline = deadline;

    let publisher = broker(&url, RedisMode::Streams, tune).await;
    // The group exists before publishing, with no member yet.
    drop(
        publisher
            .subscribe(&topic, SubscribeOptions::group(group))
            .await
            .unwrap(),
    );
    let mut sent = HashSet::new();
    for i in 0..5 {
        let m = Message::new(format!("job {i}"));
        sent.insert(m.id().to_owned());
        publisher.publish(&topic, m).await.unwrap();
    }
    // Entries wait longer than the deadline before anyone reads them: a deadline measured
    // from publish instead of delivery would hand them over at once.
    tokio::time::sleep(deadline * 2).await;

    // A consumer in a runtime of its own takes all five and then "dies": its runtime is
    // dropped, so nothing it would do on a graceful exit runs.
    let (url2, topic2) = (url.clone(), topic.clone());
    let taken_at = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let held = rt.block_on(async move {
            let dying = broker(&url2, RedisMode::Streams, tune).await;
            let mut sub = dying
                .subscribe(&topic2, SubscribeOptions::group(group))
                .await
                .unwrap();
            let mut deliveries = Vec::new();
            for _ in 0..5 {
                deliveries.push(recv(&mut sub).await);
            }
            (dying, sub, deliveries)
        });
        let taken_at = Instant::now();
        drop(rt);
        // A dead process runs no destructors either.
        std::mem::forget(held);
        taken_at
    })
    .join()
    .unwrap();

    let survivor = broker(&url, RedisMode::Streams, tune).await;
    let mut sub = survivor
        .subscribe(&topic, SubscribeOptions::group(group))
        .await
        .unwrap();
    let mut got = HashSet::new();
    for _ in 0..5 {
        let d = recv(&mut sub).await;
        assert!(
            d.info().redelivered,
            "reclaimed delivery is flagged redelivered"
        );
        // At least the second delivery. Exact counting is covered by the conformance suite;
        // here a heavily loaded machine may legitimately let the survivor's own reclaimer
        // take an entry again before the test acks it.
        assert!(
            d.attempt() >= 2,
            "a taken-over entry counts as a further attempt, got {}",
            d.attempt()
        );
        got.insert(d.message().id().to_owned());
        d.ack().await.unwrap();
    }
    let waited = taken_at.elapsed();
    assert_eq!(got, sent, "every entry of the dead consumer was taken over");
    assert!(
        waited >= deadline - Duration::from_millis(100),
        "taken over after {waited:?}, before the {deadline:?} deadline"
    );
    let next = tokio::time::timeout(Duration::from_millis(500), sub.next()).await;
    assert!(next.is_err(), "nothing else arrives");
}

/// A member that leaves hands every entry it still holds back to the group at once, not
/// after the ack deadline: more than one page of the pending list (the hand-back pages by
/// 1,000), each counted as the one delivery it had; and the member is gone from the group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaving_member_hands_back_everything_it_holds_at_once() {
    const HELD: usize = 2_500;
    let url = shared_url();
    let topic = topic("hand-back");
    let _cleanup = DeleteOnDrop(vec![topic.clone()]);
    let group = "leavers";
    // Far beyond the test: only the hand-back can make the entries available again.
    let tune = |c: &mut RedisConfig| c.streams.ack_deadline = Duration::from_secs(600);
    let broker = broker(&url, RedisMode::Streams, tune).await;
    let options = SubscribeOptions::group(group).with_prefetch(HELD);
    let mut leaving = broker.subscribe(&topic, options.clone()).await.unwrap();
    let sent: Vec<Message> = (0..HELD)
        .map(|i| Message::new(format!("held {i}")))
        .collect();
    let report = broker.publish_batch(&topic, sent.clone()).await;
    assert!(report.is_ok(), "{:?}", report.failures());
    let mut held = Vec::with_capacity(HELD);
    for _ in 0..HELD {
        held.push(recv(&mut leaving).await);
    }
    // Unsettled deliveries stay pending; the subscription's end hands them back.
    drop(held);
    drop(leaving);

    let mut staying = broker.subscribe(&topic, options).await.unwrap();
    let mut got = HashSet::new();
    for _ in 0..HELD {
        let d = recv(&mut staying).await;
        assert_eq!(
            d.attempt(),
            2,
            "{} was delivered once before",
            d.message().id()
        );
        got.insert(d.message().id().to_owned());
        d.ack().await.unwrap();
    }
    let expected: HashSet<String> = sent.iter().map(|m| m.id().to_owned()).collect();
    assert_eq!(got, expected, "every held entry came back");

    let consumers: Vec<Vec<redis::Value>> = redis::cmd("XINFO")
        .arg("CONSUMERS")
        .arg(&topic)
        .arg(group)
        .query_async(&mut raw(&url).await)
        .await
        .unwrap();
    let names: Vec<String> = consumers
        .iter()
        .filter_map(|fields| match fields.get(1) {
            Some(redis::Value::BulkString(name)) => Some(String::from_utf8_lossy(name).into()),
            _ => None,
        })
        .filter(|name: &String| name != helix_messaging_redis::REQUEUE_CONSUMER)
        .collect();
    assert_eq!(names.len(), 1, "only the staying member is left: {names:?}");
}

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_connections_work_in_both_modes_and_verify_the_server() {
    let certs = common::temp_dir("certs");
    helix_messaging_testkit::test_certificates(&certs);
    let tls_port = free_port();
    let cert = |f: &str| certs.join(f).display().to_string();
    let (server_pem, server_key, ca_pem) = (cert("server.pem"), cert("server.key"), cert("ca.pem"));
    let tls_port_arg = tls_port.to_string();
    let _server = PrivateRedis::start_with(&[
        "--port",
        "0",
        "--tls-port",
        &tls_port_arg,
        "--tls-cert-file",
        &server_pem,
        "--tls-key-file",
        &server_key,
        "--tls-ca-cert-file",
        &ca_pem,
        "--tls-auth-clients",
        "no",
    ]);
    let url = format!("rediss://127.0.0.1:{tls_port}");

    for mode in [RedisMode::Streams, RedisMode::PubSub] {
        // The envelope carries the id and headers over pub/sub too.
        let broker = broker(&url, mode, |c| {
            c.tls_ca_cert = Some(certs.join("ca.pem"));
            c.pubsub_envelope = true;
        })
        .await;
        assert!(broker.config().uses_tls());
        let topic = topic("tls");
        let mut sub = broker
            .subscribe(&topic, SubscribeOptions::default())
            .await
            .unwrap();
        let m = Message::new("over TLS").with_header("secure", "yes");
        broker.publish(&topic, m.clone()).await.unwrap();
        let d = recv(&mut sub).await;
        assert_eq!(d.message().id(), m.id());
        assert_eq!(d.message().header("secure"), Some("yes"));
        d.ack().await.unwrap();
        broker.close().await.unwrap();
    }

    // Without the CA the server's certificate is not trusted: the connection must fail.
    let config = RedisConfig::new(&url, RedisMode::Streams).unwrap();
    let started = Instant::now();
    let err = RedisBroker::connect(config)
        .await
        .expect_err("untrusted certificate");
    eprintln!(
        "untrusted certificate refused after {:?}: {err}",
        started.elapsed()
    );
    assert!(
        matches!(
            err.kind(),
            ErrorKind::Connection | ErrorKind::Backend | ErrorKind::Config
        ),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&certs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_counts_publishes_that_reached_nobody_and_refuses_requeue() {
    let broker = broker(&shared_url(), RedisMode::PubSub, |_| {}).await;
    let topic = topic("unrouted");
    broker
        .publish(&topic, Message::new("nobody listens"))
        .await
        .unwrap();
    let report = broker
        .publish_batch(&topic, vec![Message::new("a"), Message::new("b")])
        .await;
    assert!(report.is_ok());
    assert_eq!(broker.unrouted_publishes(), 3);

    let mut sub = broker
        .subscribe(&topic, SubscribeOptions::default())
        .await
        .unwrap();
    broker.publish(&topic, Message::new("heard")).await.unwrap();
    assert_eq!(
        broker.unrouted_publishes(),
        3,
        "a publish that reached a subscriber is not counted"
    );
    let d = recv(&mut sub).await;
    let err = d.nack(true).await.expect_err("requeue on pub/sub");
    assert_eq!(err.kind(), ErrorKind::Unsupported);

    let err = broker
        .subscribe(&topic, SubscribeOptions::group("g"))
        .await
        .expect_err("groups on pub/sub");
    assert_eq!(err.kind(), ErrorKind::Unsupported);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_entry_is_reported_and_set_aside_and_the_next_one_delivered() {
    let url = shared_url();
    let broker = broker(&url, RedisMode::Streams, |_| {}).await;
    let topic = topic("undecodable");
    let _cleanup = DeleteOnDrop(vec![topic.clone(), format!("{topic}.undecodable")]);
    let mut sub = broker
        .subscribe(&topic, SubscribeOptions::group("g"))
        .await
        .unwrap();
    let mut conn = raw(&url).await;
    // No payload field (`data`) and no envelope: nothing to deliver.
    let foreign: String = redis::cmd("XADD")
        .arg(&topic)
        .arg("*")
        .arg("note")
        .arg("written by another program")
        .query_async(&mut conn)
        .await
        .unwrap();
    let fine = Message::new("fine");
    broker.publish(&topic, fine.clone()).await.unwrap();

    let first = tokio::time::timeout(WAIT, sub.next())
        .await
        .unwrap()
        .unwrap();
    let err = first.expect_err("undecodable entry is an error on the subscription");
    assert_eq!(err.kind(), ErrorKind::Serialization);
    assert!(err.to_string().contains(&foreign), "{err}");
    assert!(err.to_string().contains(".undecodable"), "{err}");
    let d = recv(&mut sub).await;
    assert_eq!(d.message().id(), fine.id());
    d.ack().await.unwrap();

    let parked: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(format!("{topic}.undecodable"))
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(parked.ids.len(), 1, "the entry was kept, not lost");
    let entry = &parked.ids[0];
    assert_eq!(
        entry.get::<String>("note").as_deref(),
        Some("written by another program")
    );
    assert_eq!(
        entry.get::<String>("helix.source-id").as_deref(),
        Some(foreign.as_str())
    );
    assert!(entry.get::<String>("helix.reason").is_some());
    let pending: redis::streams::StreamPendingReply = redis::cmd("XPENDING")
        .arg(&topic)
        .arg("g")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(pending.count(), 0, "nothing left pending in the group");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claimed_entries_get_their_own_delivery_counts() {
    // A member holds one entry while the two around it are requeued and claimed back
    // together, twice: each claimed entry's attempt is its own delivery count, not a
    // neighbour's.
    let url = shared_url();
    let topic = topic("claim-counts");
    let _cleanup = DeleteOnDrop(vec![topic.clone()]);
    let broker = broker(&url, RedisMode::Streams, |_| {}).await;
    let mut sub = broker
        .subscribe(&topic, SubscribeOptions::group("g").with_prefetch(10))
        .await
        .unwrap();
    let sent: Vec<Message> = (0..3).map(|i| Message::new(format!("m{i}"))).collect();
    for m in &sent {
        broker.publish(&topic, m.clone()).await.unwrap();
    }
    let mut first = Vec::new();
    for _ in 0..3 {
        first.push(recv(&mut sub).await);
    }
    let held = first.remove(1);
    assert_eq!(held.message().id(), sent[1].id());
    let mut out = first;
    for round in 2..=3u32 {
        futures::future::try_join_all(out.iter().map(|d| d.nack(true)))
            .await
            .unwrap();
        out = vec![recv(&mut sub).await, recv(&mut sub).await];
        let mut attempts: Vec<(String, u32)> = out
            .iter()
            .map(|d| (d.message().id().to_owned(), d.attempt()))
            .collect();
        attempts.sort();
        let mut expected = vec![
            (sent[0].id().to_owned(), round),
            (sent[2].id().to_owned(), round),
        ];
        expected.sort();
        assert_eq!(attempts, expected, "attempts after {} requeues", round - 1);
    }
    for d in out {
        d.ack().await.unwrap();
    }
    assert_eq!(held.attempt(), 1);
    held.ack().await.unwrap();
    broker.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trimming_never_cuts_what_a_lagging_group_still_needs() {
    let url = shared_url();
    let topic = topic("trim");
    let _cleanup = DeleteOnDrop(vec![topic.clone()]);
    let broker = broker(&url, RedisMode::Streams, |c| {
        c.streams.max_len = Some(10);
        c.streams.exact_trim = true;
    })
    .await;
    // "slow" exists but reads nothing yet; "fast" reads and acks everything.
    drop(
        broker
            .subscribe(&topic, SubscribeOptions::group("slow"))
            .await
            .unwrap(),
    );
    let mut fast = broker
        .subscribe(&topic, SubscribeOptions::group("fast"))
        .await
        .unwrap();
    let sent: Vec<Message> = (0..50).map(|i| Message::new(format!("m{i}"))).collect();
    broker
        .publish_batch(&topic, sent.clone())
        .await
        .into_result()
        .unwrap();
    for _ in 0..50 {
        recv(&mut fast).await.ack().await.unwrap();
    }
    let report = broker.trim(&topic).await.unwrap();
    assert_eq!(report.removed, 0, "slow has read nothing: {report:?}");
    assert!(report.held_back, "{report:?}");
    assert_eq!(report.length, 50);

    // slow reads 30 and acks 25 of them: the oldest entry it still needs is its 26th.
    let mut slow = broker
        .subscribe(&topic, SubscribeOptions::group("slow").with_prefetch(30))
        .await
        .unwrap();
    let mut held = Vec::new();
    for (i, m) in sent.iter().take(30).enumerate() {
        let d = recv(&mut slow).await;
        assert_eq!(d.message().id(), m.id());
        if i < 25 {
            d.ack().await.unwrap();
        } else {
            held.push(d);
        }
    }
    let report = broker.trim(&topic).await.unwrap();
    assert_eq!(report.removed, 25, "{report:?}");
    assert!(report.held_back, "{report:?}");
    assert_eq!(broker.trimmed_entries(), 25);
    for d in held {
        d.ack().await.unwrap();
    }
    let mut rest = Vec::new();
    for _ in 30..50 {
        let d = recv(&mut slow).await;
        rest.push(d.message().id().to_owned());
        d.ack().await.unwrap();
    }
    let expected: Vec<String> = sent[30..].iter().map(|m| m.id().to_owned()).collect();
    assert_eq!(rest, expected, "slow lost nothing");

    // Everything is read and acked: now the length limit applies.
    let report = broker.trim(&topic).await.unwrap();
    assert_eq!(
        report,
        helix_messaging_redis::TrimReport {
            removed: 15,
            held_back: false,
            length: 10
        }
    );
    broker.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_holds_no_more_unsettled_deliveries_than_its_prefetch() {
    let url = shared_url();
    let topic = topic("pubsub-prefetch");
    let broker = broker(&url, RedisMode::PubSub, |_| {}).await;
    let mut sub = broker
        .subscribe(&topic, SubscribeOptions::default().with_prefetch(2))
        .await
        .unwrap();
    for i in 0..3 {
        broker
            .publish(&topic, Message::new(format!("m{i}")))
            .await
            .unwrap();
    }
    let first = recv(&mut sub).await;
    let second = recv(&mut sub).await;
    let third = tokio::time::timeout(Duration::from_millis(500), sub.next()).await;
    assert!(third.is_err(), "a third delivery while two are unsettled");
    first.ack().await.unwrap();
    let third = recv(&mut sub).await;
    assert_eq!(third.message().payload().as_ref(), b"m2");
    drop(second);
    third.ack().await.unwrap();
    broker.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_read_but_never_received_is_not_counted_as_an_attempt() {
    // XREADGROUP counts a delivery when it reads an entry. One read into the subscription's
    // buffer but not yet received by the application when the subscription ends was never
    // attempted: the next member gets it as attempt 1, while the received one is attempt 2.
    let url = shared_url();
    let topic = topic("read-ahead");
    let _cleanup = DeleteOnDrop(vec![topic.clone()]);
    let broker = broker(&url, RedisMode::Streams, |_| {}).await;
    drop(
        broker
            .subscribe(&topic, SubscribeOptions::group("g"))
            .await
            .unwrap(),
    );
    let sent: Vec<Message> = (0..2).map(|i| Message::new(format!("m{i}"))).collect();
    for m in &sent {
        broker.publish(&topic, m.clone()).await.unwrap();
    }
    let mut first = broker
        .subscribe(&topic, SubscribeOptions::group("g").with_prefetch(2))
        .await
        .unwrap();
    let seen = recv(&mut first).await;
    assert_eq!(seen.message().id(), sent[0].id());
    drop(first);
    drop(seen);
    let mut second = broker
        .subscribe(&topic, SubscribeOptions::group("g"))
        .await
        .unwrap();
    let mut attempts = Vec::new();
    for _ in 0..2 {
        let d = recv(&mut second).await;
        attempts.push((d.message().id().to_owned(), d.attempt()));
        d.ack().await.unwrap();
    }
    attempts.sort();
    let mut expected = vec![(sent[0].id().to_owned(), 2), (sent[1].id().to_owned(), 1)];
    expected.sort();
    assert_eq!(attempts, expected);
    broker.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_drops_a_message_whose_ttl_has_passed_when_the_envelope_carries_it() {
    let url = shared_url();
    let topic = topic("pubsub-ttl");
    let broker = broker(&url, RedisMode::PubSub, |c| c.pubsub_envelope = true).await;
    let mut sub = broker
        .subscribe(&topic, SubscribeOptions::default())
        .await
        .unwrap();
    broker
        .publish(&topic, Message::new("gone").with_ttl(Duration::ZERO))
        .await
        .unwrap();
    let kept = Message::new("kept");
    broker.publish(&topic, kept.clone()).await.unwrap();
    let d = recv(&mut sub).await;
    assert_eq!(
        d.message().id(),
        kept.id(),
        "a TTL of zero is never delivered"
    );
    d.ack().await.unwrap();
    broker.close().await.unwrap();
}

/// A delay longer than the ack deadline: every member's reclaimer keeps the entry from being
/// taken over early, it comes back no sooner than the delay with attempt 2, and it waits in
/// Redis (not in the consumer), so a consumer that crashes meanwhile loses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delay_longer_than_the_ack_deadline_survives_the_consumers_crash() {
    let deadline = Duration::from_millis(800);
    let delay = Duration::from_millis(3_000);
    let url = shared_url();
    let topic = topic("long-delay");
    let group = "workers";
    let _cleanup = DeleteOnDrop(vec![
        topic.clone(),
        format!("{topic}.helix-delayed.{group}"),
    ]);
    let tune = move |c: &mut RedisConfig| {
        c.streams.ack_deadline = deadline;
        c.streams.claim_interval = Duration::from_millis(50);
    };
    let broker = broker(&url, RedisMode::Streams, tune).await;
    let mut first = broker
        .subscribe(&topic, SubscribeOptions::group(group))
        .await
        .unwrap();
    let m = Message::new("wait for it");
    broker.publish(&topic, m.clone()).await.unwrap();
    let d = recv(&mut first).await;
    assert!(d.delays_requeue());
    let requeued_at = Instant::now();
    d.requeue_after(delay).await.unwrap();
    let mut zset = raw(&url).await;
    let held: i64 = redis::cmd("ZCARD")
        .arg(format!("{topic}.helix-delayed.{group}"))
        .query_async(&mut zset)
        .await
        .unwrap();
    assert_eq!(
        held, 1,
        "a delay beyond the ack deadline is scheduled in the sorted set"
    );
    // The consumer crashes right away; another member of the group runs meanwhile.
    drop(first);
    let mut second = broker
        .subscribe(&topic, SubscribeOptions::group(group))
        .await
        .unwrap();
    let again = recv(&mut second).await;
    let waited = requeued_at.elapsed();
    assert_eq!(again.message().id(), m.id());
    assert_eq!(again.attempt(), 2);
    assert!(
        waited >= delay - Duration::from_millis(20),
        "taken over after {waited:?}, before the {delay:?} delay"
    );
    again.ack().await.unwrap();
    let left: i64 = redis::cmd("ZCARD")
        .arg(format!("{topic}.helix-delayed.{group}"))
        .query_async(&mut zset)
        .await
        .unwrap();
    assert_eq!(left, 0, "nothing stays scheduled");
    assert!(
        tokio::time::timeout(deadline * 3, second.next())
            .await
            .is_err(),
        "delivered again after the ack"
    );
}
