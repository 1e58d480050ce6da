//! Streams groups: the reclaimer, a leaving member's hand-back, undecodable entries, each
//! entry's own delivery count, trimming behind a lagging group, and delays past the ack
//! deadline.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use futures::StreamExt;
use helix_messaging_core::{Broker, ErrorKind, Message, Publisher, SubscribeOptions, Subscriber};
use helix_messaging_redis::{RedisConfig, RedisMode};

use crate::common::{DeleteOnDrop, DeleteOnDropAt, WAIT, broker, recv, shared_url};
use crate::{raw, topic};

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

/// An entry that reaches a member's last blocking read after the subscription was dropped
/// is handed back to the group, and the backlog counts it as waiting, not in flight: nobody
/// holds it. (The dropped reader's `XREADGROUP` stays blocked on the server, so the
/// hand-back queued behind it runs only once the entry has arrived.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_read_after_the_member_left_waits_rather_than_in_flight() {
    // A database no other test uses: the probe below tells this test's blocked reader from
    // the other tests' by the database in its `CLIENT LIST` line (run in parallel, another
    // test's blocked read let it go on before its own reader had read anything).
    const DATABASE: &str = "7";
    let mut url = redis::parse_redis_url(&shared_url()).expect("REDIS_URL is a redis URL");
    assert!(
        matches!(url.scheme(), "redis" | "rediss"),
        "this test picks its database by the URL's path, which a {} URL does not hold",
        url.scheme()
    );
    url.set_path(DATABASE);
    let url = url.to_string();
    let topic = topic("late-read");
    let _cleanup = DeleteOnDropAt(url.clone(), vec![topic.clone()]);
    let group = "late";
    // A long block keeps the dropped reader's read on the server while the test publishes.
    let broker = broker(&url, RedisMode::Streams, |c| {
        c.streams.block = Duration::from_secs(10);
    })
    .await;
    let sub = broker
        .subscribe(&topic, SubscribeOptions::group(group))
        .await
        .unwrap();
    let mut probe = raw(&url).await;
    let deadline = Instant::now() + WAIT;
    loop {
        let clients: String = redis::cmd("CLIENT")
            .arg("LIST")
            .query_async(&mut probe)
            .await
            .unwrap();
        if clients.lines().any(|c| {
            c.contains("cmd=xreadgroup")
                && c.contains("flags=b")
                && c.split(' ').any(|field| field == format!("db={DATABASE}"))
        }) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the reader never blocked: {clients}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(sub);
    broker.publish(&topic, Message::new("late")).await.unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        let backlog = broker.backlog(&topic, group).await.unwrap();
        // The late read did happen: the placeholder holds the entry it handed back (an
        // entry nobody read would also count as waiting, proving nothing).
        let pending: redis::Value = redis::cmd("XPENDING")
            .arg(&topic)
            .arg(group)
            .query_async(&mut probe)
            .await
            .unwrap();
        let held = format!("{pending:?}").contains(helix_messaging_redis::REQUEUE_CONSUMER);
        if held && backlog.waiting == 1 && backlog.in_flight == Some(0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the entry should wait for the group, nobody holds it: {backlog:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `REDIS_MIN_REPLICAS_ACK` on a server with no replica: the publish fails retryably, as a
/// timeout that names the setting, after the timeout it allows, and the entry is on the
/// primary all the same (a retry stores it again, as a new stream entry with the same
/// message id, which is what consumers deduplicate by).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_that_too_few_replicas_confirmed_fails_retryably() {
    let url = shared_url();
    let topic = topic("min-replicas");
    let _cleanup = DeleteOnDrop(vec![topic.clone()]);
    let tune = |c: &mut RedisConfig| {
        c.min_replicas_ack = 1;
        c.min_replicas_timeout = Duration::from_millis(200);
    };
    let publisher = broker(&url, RedisMode::Streams, tune).await;
    let started = Instant::now();
    let err = publisher
        .publish(&topic, Message::new("on the primary only"))
        .await
        .expect_err("no replica confirms it");
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
    assert!(err.is_retryable(), "{err}");
    assert!(err.to_string().contains("REDIS_MIN_REPLICAS_ACK"), "{err}");
    assert!(started.elapsed() >= Duration::from_millis(200));
    let stored: usize = redis::cmd("XLEN")
        .arg(&topic)
        .query_async(&mut raw(&url).await)
        .await
        .unwrap();
    assert_eq!(stored, 1);
}
