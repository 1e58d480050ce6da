//! What every durable store must keep, as checks a store's own tests run on it: the
//! `helix-messaging-store` crate on SQLite and PostgreSQL, the facade's tests on the in-memory
//! stores and over real brokers. One set of checks, so every store is held to the same
//! promises.

use std::time::{Duration, SystemTime};

use helix_messaging_core::dlq::{DeadLetter, DeadLetterReason};
use helix_messaging_core::{DeliveryInfo, Message};

/// A dead letter of a message of type `kind` that failed on `topic` in group `workers` at
/// `at` (first failing 3 s before), after 4 attempts, with an error longer than any header.
pub fn letter(topic: &str, reason: DeadLetterReason, kind: &str, at: SystemTime) -> DeadLetter {
    let info = DeliveryInfo {
        topic: topic.into(),
        group: Some("workers".into()),
        attempt: 4,
        redelivered: true,
        position: None,
    };
    let message = Message::new(format!("payload of a {kind}"))
        .with_key("k-1")
        .with_header("type", kind)
        .with_header("lang", "日本語")
        .with_header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .with_content_type("application/json")
        .with_correlation_id("corr")
        .with_priority(7);
    DeadLetter::new(
        &message,
        &info,
        reason,
        &format!("{kind} failed: {}", "x".repeat(5_000)),
        at - Duration::from_secs(3),
        at,
    )
}

/// Opens the same replay store again (as a restarted process would).
pub type OpenStore = std::sync::Arc<
    dyn Fn() -> futures::future::BoxFuture<
            'static,
            std::sync::Arc<dyn helix_messaging_core::replay::ReplayStore>,
        > + Send
        + Sync,
>;

/// A replay of 3,000 messages on the memory broker is killed mid-run (its runtime shut down
/// under it, at whatever await it had reached: a publish, a checkpoint write), then resumed
/// by a handler opened on the same store: every message of the window reaches the target
/// exactly once, in order per key, and the progress adds up.
pub async fn a_killed_replay_resumes_without_publishing_twice(open_store: OpenStore) {
    use futures::StreamExt;
    use helix_messaging_core::replay::{
        HEADER_REPLAY_ID, ReplayConfig, ReplayHandler, ReplayOptions, ReplayRequest, ReplayStatus,
    };
    use helix_messaging_core::{Broker, TimeRange};
    use std::collections::HashMap;
    use std::sync::Arc;

    const TOTAL: usize = 3000;
    let broker: Arc<dyn Broker> = Arc::new(helix_messaging_memory::MemoryBroker::new());
    let from = SystemTime::now() - Duration::from_secs(1);
    let sent: Vec<Message> = (0..TOTAL)
        .map(|i| Message::new(format!("event {i}")).with_key(format!("k{}", i % 7)))
        .collect();
    broker
        .publish_batch("audit", sent.clone())
        .await
        .into_result()
        .unwrap();
    let to = SystemTime::now() + Duration::from_secs(1);
    // The killed process never gives its lease back: a short one lets the restarted
    // process take the replay over within a second.
    let config = ReplayConfig {
        checkpoint_interval: Duration::from_millis(20),
        lease: Duration::from_millis(500),
        ..ReplayConfig::default()
    };
    let request = ReplayRequest::new("audit", from, to)
        .with_id("audit-backfill")
        .with_target_topic("audit.replay")
        .with_options(ReplayOptions {
            batch_size: 20,
            delay_between: Duration::from_millis(2),
            skip_duplicates: true,
            ..ReplayOptions::default()
        });

    // The first process: killed once a third is replayed.
    let (first_broker, first_store, first_config) =
        (broker.clone(), open_store.clone(), config.clone());
    let at_kill = in_a_process_killed_after(async move {
        let handler = ReplayHandler::open(first_broker, first_config, first_store().await)
            .await
            .unwrap();
        handler.start_replay(request).await.unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let p = handler.replay_progress("audit-backfill").await.unwrap();
            if p.replayed >= (TOTAL / 3) as u64 {
                return p.replayed;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "a third not replayed in time: {p:?}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    assert!(at_kill < TOTAL as u64, "killed midway");

    // The restarted process.
    let handler = ReplayHandler::open(broker.clone(), config, open_store().await)
        .await
        .unwrap();
    let done = tokio::time::timeout(Duration::from_secs(60), handler.wait("audit-backfill"))
        .await
        .expect("the resumed replay finished in time")
        .unwrap();
    assert_eq!(done.status, ReplayStatus::Completed, "{done:?}");
    assert_eq!(done.resumes, 1, "{done:?}");
    assert_eq!(
        (done.total, done.replayed),
        (TOTAL as u64, TOTAL as u64),
        "{done:?}"
    );
    assert_eq!(done.replayed + done.skipped + done.failed, done.total);

    let range = TimeRange::new(from, SystemTime::now() + Duration::from_secs(1)).unwrap();
    let copies: Vec<_> = broker
        .read_range("audit.replay", range)
        .await
        .unwrap()
        .map(|e| e.unwrap())
        .collect()
        .await;
    let mut counts: HashMap<String, usize> = HashMap::new();
    for copy in &copies {
        assert_eq!(
            copy.message.header(HEADER_REPLAY_ID),
            Some("audit-backfill")
        );
        *counts.entry(copy.message.id().to_owned()).or_default() += 1;
    }
    let twice = counts.values().filter(|n| **n > 1).count();
    assert_eq!(twice, 0, "{twice} messages published twice across the kill");
    assert_eq!(counts.len(), TOTAL, "every message of the window published");
    let order = |messages: &mut dyn Iterator<Item = &Message>| {
        let mut keys: HashMap<String, Vec<String>> = HashMap::new();
        for m in messages {
            keys.entry(m.key().unwrap().to_owned())
                .or_default()
                .push(m.id().to_owned());
        }
        keys
    };
    assert_eq!(
        order(&mut copies.iter().map(|e| &*e.message)),
        order(&mut sent.iter()),
        "per-key order kept across the kill"
    );
}

/// Save, load, list, overwrite and remove a replay record.
pub async fn replay_store_round_trips(store: &dyn helix_messaging_core::replay::ReplayStore) {
    use helix_messaging_core::replay::{Checkpoint, ReplayRecord, ReplayRequest, ReplayStatus};

    let now = SystemTime::now();
    let request = ReplayRequest::new("orders", now - Duration::from_secs(3600), now)
        .with_id(format!("r-{}", std::process::id()));
    let mut progress = helix_messaging_core::replay::ReplayProgress {
        id: request.id.clone(),
        status: ReplayStatus::Running,
        topic: "orders".into(),
        target_topic: request.target(),
        dry_run: false,
        total: 10,
        replayed: 7,
        skipped: 3,
        failed: 0,
        filtered: 3,
        duplicates: 0,
        by_type: [("order.created".to_owned(), 7)].into(),
        skipped_by_type: [("(untyped)".to_owned(), 3)].into(),
        reached: Some(now - Duration::from_secs(60)),
        from_time: request.from_time,
        to_time: request.to_time,
        started_at: now,
        finished_at: None,
        last_error: None,
        resumes: 0,
    };
    let mut record = ReplayRecord {
        request: request.clone(),
        progress: progress.clone(),
        checkpoint: Checkpoint {
            frontier: [(0, (41, 0)), (2, (1_700_000_000_123, 4))].into(),
            in_flight_since: Some(now),
        },
    };
    let id = request.id.as_str();
    let lease = Duration::from_secs(30);
    let a = store
        .create(&record, "a", lease)
        .await
        .unwrap()
        .expect("a new id is created, leased to its creator");
    assert_eq!(
        store.create(&record, "b", lease).await.unwrap(),
        None,
        "an existing id is not created again"
    );
    assert_eq!(store.load(&request.id).await.unwrap(), Some(record.clone()));
    assert_eq!(
        store.claim("no-such-replay", "a", lease).await.unwrap(),
        None,
        "unknown id"
    );
    assert_eq!(
        store.claim(id, "b", lease).await.unwrap(),
        None,
        "held by a"
    );
    assert!(store.renew(id, &a, lease).await.unwrap(), "a renews it");
    progress.status = ReplayStatus::Completed;
    progress.finished_at = Some(SystemTime::now());
    record.progress = progress;
    record.checkpoint.in_flight_since = None;
    assert!(
        store.save(&record, &a).await.unwrap(),
        "written under a's lease"
    );
    let listed = store.list().await.unwrap();
    assert_eq!(
        listed
            .iter()
            .filter(|r| r.id() == request.id)
            .collect::<Vec<_>>(),
        vec![&record],
        "overwritten, listed once"
    );
    // The same name claiming again (a restarted process) takes it with a new epoch, which
    // fences off the earlier holding.
    let again = store.claim(id, "a", lease).await.unwrap().expect("a again");
    assert!(again.epoch > a.epoch, "{again:?} after {a:?}");
    let mut stale = record.clone();
    stale.progress.total = 999;
    assert!(
        !store.save(&stale, &a).await.unwrap(),
        "the earlier holding writes nothing"
    );
    assert!(!store.renew(id, &a, lease).await.unwrap(), "nor renews");
    store.release(id, &a).await.unwrap();
    assert_eq!(
        store.claim(id, "b", lease).await.unwrap(),
        None,
        "nor releases: still held"
    );
    assert_eq!(store.load(id).await.unwrap(), Some(record.clone()));
    // A lease that runs out (the store's clock) can be taken by another holder, whose
    // epoch fences off the first one's writes.
    store.release(id, &again).await.unwrap();
    let short = store
        .claim(id, "c", Duration::from_millis(50))
        .await
        .unwrap()
        .expect("free after release");
    tokio::time::sleep(Duration::from_millis(120)).await;
    let d = store
        .claim(id, "d", lease)
        .await
        .unwrap()
        .expect("d takes it once c's lease has run out");
    assert!(
        !store.save(&stale, &short).await.unwrap(),
        "c is fenced off"
    );
    assert!(!store.renew(id, &short, lease).await.unwrap());
    assert!(store.save(&record, &d).await.unwrap());
    store.release(id, &d).await.unwrap();
    assert!(
        !store.save(&record, &d).await.unwrap(),
        "nothing is written once released"
    );
    assert!(store.remove(&request.id).await.unwrap());
    assert!(!store.remove(&request.id).await.unwrap());
    assert_eq!(store.load(&request.id).await.unwrap(), None);
}

/// A failure group's sample error is the error of its newest failure, and of two failures
/// at the same time, the one with the greater id: the same on every store, whatever order
/// the entries were written in (here newest first, so it is neither the first nor the last
/// row written).
pub async fn check_the_sample_error_is_the_newest_failures(
    store: &dyn helix_messaging_core::dlq::DeadLetterStore,
    topic: &str,
) {
    use helix_messaging_core::dlq::{DeadLetterFilter, StoredDeadLetter};
    let t0 = SystemTime::now() - Duration::from_secs(600);
    for (id, secs, error) in [
        ("a", 30, "newest, a"),
        ("c", 10, "older"),
        ("b", 30, "newest, b"),
        ("d", 0, "oldest"),
    ] {
        let mut l = letter(
            topic,
            DeadLetterReason::MaxRetriesExceeded,
            "order.created",
            t0 + Duration::from_secs(secs),
        );
        l.id = format!("{topic}-{id}");
        l.error = error.into();
        assert!(
            store
                .insert(StoredDeadLetter::received(l, SystemTime::now()))
                .await
                .unwrap()
        );
    }
    let filter = DeadLetterFilter {
        topic: Some(topic.into()),
        ..DeadLetterFilter::default()
    };
    let groups = store.groups(&filter).await.unwrap();
    assert_eq!(groups.len(), 1, "{groups:?}");
    assert_eq!(groups[0].count, 4);
    assert_eq!(
        groups[0].sample_error, "newest, b",
        "the newest failure's error; of two at once, the greater id's"
    );
}

/// A DLQ store's claims and versions (issue 27, item 8), the same on every store: a claim
/// holds only entries that exist, are not discarded and that nothing holds; a held entry is
/// neither claimed again nor due until its hold runs out; an update or a removal naming a
/// version the entry has left takes no effect.
pub async fn check_claims_hold_entries_and_versions_fence_writes(
    store: &dyn helix_messaging_core::dlq::DeadLetterStore,
    topic: &str,
) {
    use helix_messaging_core::dlq::{EntryStatus, StoredDeadLetter};
    let now = SystemTime::now();
    let lease = Duration::from_secs(60);
    let after_the_hold = now + lease + Duration::from_secs(1);
    let mut ids = Vec::new();
    for i in 0..4u64 {
        let at = now - Duration::from_secs(100 - i);
        let l = letter(
            topic,
            DeadLetterReason::MaxRetriesExceeded,
            "order.created",
            at,
        );
        let mut entry = StoredDeadLetter::received(l, now);
        if i == 3 {
            entry.next_attempt_at = Some(now - Duration::from_secs(1));
        }
        ids.push(entry.id().to_owned());
        assert!(store.insert(entry).await.unwrap());
    }
    let read = |id: &str| {
        let id = id.to_owned();
        async move { store.get(&id).await.unwrap().expect("stored") }
    };
    let stale = read(&ids[2]).await;
    assert_eq!((stale.version, stale.claimed_until), (0, None));
    let mut discarded = read(&ids[2]).await;
    discarded.status = EntryStatus::Discarded;
    assert!(store.update(&discarded).await.unwrap());
    assert!(
        !store.update(&stale).await.unwrap(),
        "a copy read before the discard overwrote it"
    );
    assert_eq!(read(&ids[2]).await.status, EntryStatus::Discarded);
    assert_eq!(read(&ids[2]).await.version, 1);

    let wanted = vec![
        ids[1].clone(),
        "missing".to_owned(),
        ids[2].clone(),
        ids[0].clone(),
    ];
    let claimed = store.claim(&wanted, now, lease).await.unwrap();
    let claimed_ids: Vec<&str> = claimed.iter().map(|e| e.id()).collect();
    assert_eq!(
        claimed_ids,
        vec![ids[1].as_str(), ids[0].as_str()],
        "the entries that exist and are not discarded, in the order asked"
    );
    for entry in &claimed {
        assert_eq!(entry.version, 1, "a claim is a write");
        assert!(entry.is_claimed(now) && !entry.is_claimed(after_the_hold));
        assert_eq!(read(entry.id()).await, *entry, "returned as stored");
    }
    assert!(
        store.claim(&wanted, now, lease).await.unwrap().is_empty(),
        "held entries are not claimed twice"
    );
    // One id asked for twice in one claim: held once, returned once, as stored.
    let once = store
        .claim(&[ids[3].clone(), ids[3].clone()], now, lease)
        .await
        .unwrap();
    assert_eq!(once.len(), 1, "an id asked for twice is claimed once");
    assert_eq!(once[0].version, 1);
    assert_eq!(read(&ids[3]).await, once[0], "returned as stored");
    assert!(
        !store
            .update(&stale_copy(&read(&ids[0]).await))
            .await
            .unwrap(),
        "an update naming an older version"
    );
    assert!(!store.remove(&ids[0], 0).await.unwrap());
    assert_eq!(
        store
            .remove_many(&[(ids[0].clone(), 1), (ids[1].clone(), 0)])
            .await
            .unwrap(),
        1,
        "only the entry still at the version named"
    );
    assert!(store.get(&ids[0]).await.unwrap().is_none());
    assert_eq!(read(&ids[1]).await.version, 1);

    // Held by the claim above, a due entry is not due; its hold run out, it is claimed
    // again.
    assert!(store.claim_due(now, lease, 10).await.unwrap().is_empty());
    let due = store.claim_due(after_the_hold, lease, 10).await.unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].id(), ids[3]);
    assert_eq!(due[0].version, 2);
    assert!(due[0].is_claimed(after_the_hold));
    assert_eq!(read(&ids[3]).await, due[0], "returned as stored");
    let again = store
        .claim(&[ids[1].clone()], after_the_hold, lease)
        .await
        .unwrap();
    assert_eq!(again.len(), 1, "a hold that ran out is taken over");
    assert_eq!(again[0].version, 2);
    assert_eq!(read(&ids[1]).await, again[0], "returned as stored");
    // Let go: an update clearing the hold, from the holder's copy.
    let mut released = again[0].clone();
    released.claimed_until = None;
    assert!(store.update(&released).await.unwrap());
    assert_eq!(read(&ids[1]).await.claimed_until, None);
    assert_eq!(read(&ids[1]).await.version, 3);
}

/// `entry` as it was one write earlier.
fn stale_copy(
    entry: &helix_messaging_core::dlq::StoredDeadLetter,
) -> helix_messaging_core::dlq::StoredDeadLetter {
    let mut stale = entry.clone();
    stale.version -= 1;
    stale.claimed_until = None;
    stale
}

/// Run `work` as a process of its own would (a runtime of its own, on its own thread), then
/// kill it once `work` returns: every task it spawned is dropped at the await it reached,
/// nothing given back. Returns what `work` returned.
pub fn in_a_process_killed_after<T: Send + 'static>(
    work: impl std::future::Future<Output = T> + Send + 'static,
) -> T {
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let out = runtime.block_on(work);
        runtime.shutdown_background();
        out
    })
    .join()
    .expect("the process ran")
}

/// A page and its count are one read, equal to a listing and a count of the same filter; a
/// filter leaving discarded entries out leaves them out of the page, the count, the ids and
/// the groups alike, on every store (issue 29).
pub async fn check_a_page_and_its_count_leave_discarded_entries_out_alike(
    store: &dyn helix_messaging_core::dlq::DeadLetterStore,
    topic: &str,
) {
    use helix_messaging_core::dlq::{DeadLetterFilter, EntryStatus, StoredDeadLetter};
    let t0 = SystemTime::now() - Duration::from_secs(600);
    let mut ids = Vec::new();
    for secs in 0..5 {
        let l = letter(
            topic,
            DeadLetterReason::Permanent,
            "order.created",
            t0 + Duration::from_secs(secs),
        );
        ids.push(l.id.clone());
        let mut entry = StoredDeadLetter::received(l, SystemTime::now());
        if secs == 1 {
            entry.status = EntryStatus::Discarded;
        }
        assert!(store.insert(entry).await.unwrap());
    }
    let every = DeadLetterFilter {
        topic: Some(topic.into()),
        ..DeadLetterFilter::default()
    };
    let (page, count) = store.page(&every, 2, 1).await.unwrap();
    assert_eq!(count, 5);
    assert_eq!(
        page,
        store.list(&every, 2, 1).await.unwrap(),
        "as a listing"
    );
    let undiscarded = DeadLetterFilter {
        exclude_discarded: true,
        ..every.clone()
    };
    let (page, count) = store.page(&undiscarded, 10, 0).await.unwrap();
    assert_eq!(count, 4, "the discarded entry is not counted");
    let listed: Vec<&str> = page.iter().map(StoredDeadLetter::id).collect();
    let expected: Vec<&str> = [0, 2, 3, 4].iter().map(|&i| ids[i].as_str()).collect();
    assert_eq!(listed, expected, "oldest first, the discarded one left out");
    assert_eq!(store.count(&undiscarded).await.unwrap(), 4);
    assert_eq!(store.ids(&undiscarded).await.unwrap(), expected);
    let groups = store.groups(&undiscarded).await.unwrap();
    assert_eq!(groups.iter().map(|g| g.count).sum::<u64>(), 4);
    let discarded_only = DeadLetterFilter {
        status: Some(EntryStatus::Discarded),
        ..undiscarded
    };
    assert_eq!(
        store.count(&discarded_only).await.unwrap(),
        0,
        "contradictory"
    );
}

/// A replay store forgets completed and cancelled records beyond the newest `keep`, the
/// oldest finished first, and never a running or failed one (issue 29). `store` must hold no
/// other finished records (they would be pruned too).
pub async fn check_finished_replays_are_pruned_oldest_first(
    store: &dyn helix_messaging_core::replay::ReplayStore,
) {
    use helix_messaging_core::replay::{Checkpoint, ReplayRecord, ReplayRequest, ReplayStatus};
    let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let tag = format!("prune-{}-{nanos}", std::process::id());
    let record = |n: u64, status: ReplayStatus| {
        let request = ReplayRequest::new("orders", start, start + Duration::from_secs(10))
            .with_id(format!("{tag}-{n}"));
        ReplayRecord {
            progress: helix_messaging_core::replay::ReplayProgress {
                id: request.id.clone(),
                status,
                topic: "orders".into(),
                target_topic: request.target(),
                dry_run: false,
                total: 0,
                replayed: 0,
                skipped: 0,
                failed: 0,
                filtered: 0,
                duplicates: 0,
                by_type: Default::default(),
                skipped_by_type: Default::default(),
                reached: None,
                from_time: start,
                to_time: start + Duration::from_secs(10),
                started_at: start,
                finished_at: status.is_finished().then(|| start + Duration::from_secs(n)),
                last_error: None,
                resumes: 0,
            },
            request,
            checkpoint: Checkpoint::default(),
        }
    };
    let lease = Duration::from_secs(30);
    // Created newest first, so the order pruned is not the order written.
    for (n, status) in [
        (5, ReplayStatus::Completed),
        (4, ReplayStatus::Cancelled),
        (3, ReplayStatus::Completed),
        (2, ReplayStatus::Failed),
        (1, ReplayStatus::Completed),
        (0, ReplayStatus::Running),
    ] {
        store.create(&record(n, status), "a", lease).await.unwrap();
    }
    let mut removed = store.prune_finished(2).await.unwrap();
    removed.sort();
    assert_eq!(removed, [format!("{tag}-1"), format!("{tag}-3")]);
    let mut left: Vec<String> = store
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.request.id)
        .filter(|id| id.starts_with(&tag))
        .collect();
    left.sort();
    let expected: Vec<String> = [0, 2, 4, 5].iter().map(|n| format!("{tag}-{n}")).collect();
    assert_eq!(
        left, expected,
        "running and failed kept, the newest two finished"
    );
}
