//! Kafka-specific behaviour: commits that never pass an unsettled message, a group member
//! joining and leaving mid-stream (against Tansu), and a broker outage (rdkafka's in-process
//! `MockCluster`).

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use helix_messaging_core::{
    Broker, Message, Position, Publisher, SubscribeOptions, Subscriber, Subscription,
};
use helix_messaging_kafka::{KafkaBroker, KafkaConfig, KafkaTopic};
use helix_messaging_testkit::fresh_name;
use rdkafka::consumer::{BaseConsumer, Consumer};

use common::recv;

/// Partitions of `topic` as the cluster at `brokers` reports them.
fn partitions(brokers: &str, topic: &str) -> usize {
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    metadata.topics()[0].partitions().len()
}

/// A topic of one partition on `broker`'s cluster, under a fresh name starting with
/// `prefix`.
async fn one_partition_topic(broker: &KafkaBroker, prefix: &str) -> String {
    let topic = fresh_name(prefix);
    broker
        .create_topics(&[KafkaTopic::new(&topic, 1)])
        .await
        .unwrap();
    topic
}

/// Acks all but the second of five messages, latest first; the group must resume at the
/// unsettled one.
async fn check_commits_stop_at_the_unsettled_message(
    config: KafkaConfig,
    mock: Option<&rdkafka::mocking::MockCluster<'_, rdkafka::producer::DefaultProducerContext>>,
) {
    let broker = KafkaBroker::connect(config).await.unwrap();
    let topic = fresh_name("commits");
    // The mock cluster does not answer CreateTopics.
    match mock {
        Some(cluster) => cluster.create_topic(&topic, 1, 1).unwrap(),
        None => broker
            .create_topics(&[KafkaTopic::new(&topic, 1)])
            .await
            .unwrap(),
    }
    // Tansu 0.6 serves nothing to a fetch that starts inside a record batch, which the
    // resumed group does here: there each message is a batch of its own.
    let batch = mock.is_some() || !common::on_tansu();
    let group = fresh_name("g");
    let mut first = broker
        .subscribe(&topic, SubscribeOptions::group(&group))
        .await
        .unwrap();
    let sent: Vec<Message> = (0..5).map(|i| Message::new(format!("m{i}"))).collect();
    if batch {
        broker
            .publish_batch(&topic, sent.clone())
            .await
            .into_result()
            .unwrap();
    } else {
        for m in &sent {
            broker.publish(&topic, m.clone()).await.unwrap();
        }
    }
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(recv(&mut first).await);
    }
    for (i, d) in held.iter().enumerate().rev() {
        if i != 1 {
            d.ack().await.unwrap();
        }
    }
    drop(held);
    drop(first);

    // The group resumes at the unsettled message: it comes again, and nothing else does
    // (the commit cannot pass it, but its metadata names what was acked after it).
    let mut second = broker
        .subscribe(&topic, SubscribeOptions::group(&group))
        .await
        .unwrap();
    let d = recv(&mut second).await;
    assert_eq!((d.message().id(), d.attempt()), (sent[1].id(), 2));
    d.ack().await.unwrap();
    let quiet = tokio::time::timeout(Duration::from_secs(1), second.next()).await;
    assert!(quiet.is_err(), "acked messages came back: {quiet:?}");
    drop(second);

    // Everything is settled now: a third member gets nothing.
    let mut third = broker
        .subscribe(&topic, SubscribeOptions::group(&group))
        .await
        .unwrap();
    let quiet = tokio::time::timeout(Duration::from_secs(1), third.next()).await;
    assert!(quiet.is_err(), "all committed");
    broker.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_out_of_order_never_commits_past_an_unsettled_message() {
    common::log_to_test_output();
    check_commits_stop_at_the_unsettled_message(common::config(), None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_stop_at_the_unsettled_message_inside_a_batch_too() {
    common::log_to_test_output();
    // The same on librdkafka's mock broker, which serves fetches from inside a record batch.
    let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
    let config = common::config_for(&cluster.bootstrap_servers());
    check_commits_stop_at_the_unsettled_message(config, Some(&cluster)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_topic_table_is_created_with_its_partitions() {
    let mut config = common::config();
    let prefix = fresh_name("seeds");
    config.topic_prefix = Some(prefix.clone());
    let broker = KafkaBroker::connect(config.clone()).await.unwrap();
    broker
        .create_topics(&KafkaTopic::helixagent())
        .await
        .unwrap();
    // Declaring again leaves them as they are.
    broker
        .create_topics(&KafkaTopic::helixagent())
        .await
        .unwrap();
    for (name, expected) in [
        ("helixagent.stream.tokens", 12),
        ("helixagent.events.audit", 6),
        ("helixagent.dlq.tasks", 3),
    ] {
        let full = format!("{prefix}.{name}");
        assert_eq!(partitions(&config.brokers, &full), expected, "{full}");
    }
    broker.close().await.unwrap();
}

/// `create_group` commits the group's start at the end of each partition from outside the
/// group: what was published before is not the group's, what follows is. The address names
/// the Kafka consumer group on the prefixed topic, as `kafka-consumer-groups` takes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_created_from_outside_starts_at_the_end_and_is_named_as_kafka_names_it() {
    let mut config = common::config();
    let prefix = fresh_name("created");
    config.topic_prefix = Some(prefix.clone());
    let broker = KafkaBroker::connect(config).await.unwrap();
    let (topic, group) = (fresh_name("tasks"), fresh_name("workers"));
    broker
        .publish(&topic, Message::new("before"))
        .await
        .unwrap();
    broker.create_group(&topic, &group).await.unwrap();
    for body in ["after 1", "after 2"] {
        broker.publish(&topic, Message::new(body)).await.unwrap();
    }
    assert_eq!(broker.backlog(&topic, &group).await.unwrap().waiting, 2);
    let address = broker.group_address(&topic, &group);
    assert_eq!(
        (address.kind, address.name.as_str(), address.source),
        (
            "consumer group",
            group.as_str(),
            Some(format!("topic {prefix}.{topic}"))
        )
    );
    broker.close().await.unwrap();
}

/// Receives and acks everything on `sub`, recording ids; stops when `stop` is dropped.
fn consume(
    mut sub: Subscription,
    seen: Arc<Mutex<HashMap<String, usize>>>,
    count: Arc<AtomicUsize>,
) -> (
    tokio::task::JoinHandle<()>,
    tokio::sync::oneshot::Sender<()>,
) {
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = &mut stopped => return,
                next = sub.next() => match next {
                    Some(Ok(d)) => {
                        *seen.lock().unwrap().entry(d.message().id().to_owned()).or_default() += 1;
                        count.fetch_add(1, Ordering::SeqCst);
                        // A partition revoked meanwhile refuses the ack; its new owner gets
                        // the message again (counted as a duplicate).
                        let _ = d.ack().await;
                    }
                    Some(Err(err)) => eprintln!("subscription reported: {err}"),
                    None => return,
                }
            }
        }
    });
    (task, stop)
}

async fn wait_until(what: &str, limit: Duration, cond: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not reached within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_joining_and_leaving_mid_stream_loses_nothing() {
    const MESSAGES: usize = 10_000;
    common::log_to_test_output();
    let mut config = common::config();
    if common::on_tansu() {
        // After a rebalance or a pause a member fetches from the first offset it has not
        // received, and Tansu 0.6 serves nothing to a fetch that starts inside a record
        // batch, which would stall the partition for good: one record per batch there.
        config.batch_size = 1;
    }
    let broker = KafkaBroker::connect(config).await.unwrap();
    let topic = fresh_name("rebalance");
    broker
        .create_topics(&[KafkaTopic::new(&topic, 4)])
        .await
        .unwrap();
    let group = fresh_name("g");
    let seen: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let count = Arc::new(AtomicUsize::new(0));
    let first = broker
        .subscribe(&topic, SubscribeOptions::group(&group).with_prefetch(50))
        .await
        .unwrap();
    let (first_task, _first_stop) = consume(first, seen.clone(), count.clone());

    let ids: Vec<String> = (0..MESSAGES).map(|i| format!("m{i:05}")).collect();
    let publisher = {
        let broker = broker.clone();
        let topic = topic.clone();
        let ids = ids.clone();
        tokio::spawn(async move {
            for chunk in ids.chunks(100) {
                let batch = chunk
                    .iter()
                    .map(|id| Message::new("x").with_id(id.clone()).with_key(id.clone()))
                    .collect();
                broker
                    .publish_batch(&topic, batch)
                    .await
                    .into_result()
                    .unwrap();
                // Spread the stream out so the rebalances land in the middle of it.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    wait_until("a third received", Duration::from_secs(60), || {
        count.load(Ordering::SeqCst) >= MESSAGES / 3
    })
    .await;
    let second = broker
        .subscribe(&topic, SubscribeOptions::group(&group).with_prefetch(50))
        .await
        .unwrap();
    let second_count = Arc::new(AtomicUsize::new(0));
    let (second_task, second_stop) = consume(second, seen.clone(), second_count.clone());
    wait_until("two thirds received", Duration::from_secs(60), || {
        count.load(Ordering::SeqCst) + second_count.load(Ordering::SeqCst) >= 2 * MESSAGES / 3
    })
    .await;
    // The second member leaves: its subscription is dropped.
    drop(second_stop);
    second_task.await.unwrap();
    publisher.await.unwrap();

    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while seen.lock().unwrap().len() < MESSAGES {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of {MESSAGES} distinct messages received within 90 s",
            seen.lock().unwrap().len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seen = seen.lock().unwrap().clone();
    let duplicates: usize = seen.values().map(|n| n - 1).sum();
    eprintln!(
        "rebalance: {MESSAGES} published, {} distinct received, {duplicates} duplicates; the second member processed {}",
        seen.len(),
        second_count.load(Ordering::SeqCst)
    );
    for id in &ids {
        assert!(seen.contains_key(id), "{id} was never processed");
    }
    assert!(
        second_count.load(Ordering::SeqCst) > 0,
        "the second member took part"
    );
    broker.close().await.unwrap();
    first_task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_loses_no_acknowledged_message() {
    common::log_to_test_output();
    const MESSAGES: usize = 3_000;
    let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
    let topic = "outage";
    cluster.create_topic(topic, 4, 1).unwrap();
    let mut config = common::config_for(&cluster.bootstrap_servers());
    config.publish_timeout = Duration::from_secs(60);
    config.statistics_interval = Duration::from_millis(100);
    helix_messaging_testkit::recorded::install();
    let broker = KafkaBroker::connect(config).await.unwrap();
    let seen: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let count = Arc::new(AtomicUsize::new(0));
    let sub = broker
        .subscribe(topic, SubscribeOptions::group("g").with_prefetch(200))
        .await
        .unwrap();
    let (consumer, _stop) = consume(sub, seen.clone(), count.clone());

    let published = Arc::new(AtomicUsize::new(0));
    let publisher = {
        let broker = broker.clone();
        let published = published.clone();
        tokio::spawn(async move {
            let mut accepted = Vec::new();
            let mut refused = 0;
            for batch in 0..MESSAGES / 100 {
                let ids: Vec<String> = (0..100).map(|i| format!("m{}", batch * 100 + i)).collect();
                let messages = ids
                    .iter()
                    .map(|id| Message::new("x").with_id(id.clone()))
                    .collect();
                let report = broker.publish_batch(topic, messages).await;
                let failed: Vec<usize> = report.failures().iter().map(|(i, _)| *i).collect();
                refused += failed.len();
                accepted.extend(
                    ids.into_iter()
                        .enumerate()
                        .filter(|(i, _)| !failed.contains(i))
                        .map(|(_, id)| id),
                );
                published.fetch_add(100, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (accepted, refused)
        })
    };
    wait_until("a third published", Duration::from_secs(60), || {
        published.load(Ordering::SeqCst) >= MESSAGES / 3
    })
    .await;
    // Steady traffic (dozens of statistics documents by now) counted no reconnect.
    assert_eq!(
        helix_messaging_testkit::recorded::reconnects(helix_messaging_kafka::NAME),
        0,
        "no reconnect before the outage"
    );
    cluster.broker_down(1).unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    cluster.broker_up(1).unwrap();
    let (accepted, refused) = publisher.await.unwrap();

    wait_until(
        "every accepted message received",
        Duration::from_secs(90),
        || {
            let seen = seen.lock().unwrap();
            accepted.iter().all(|id| seen.contains_key(id))
        },
    )
    .await;
    let duplicates: usize = seen.lock().unwrap().values().map(|n| n - 1).sum();
    eprintln!(
        "outage: {} accepted, {refused} refused, {} received, {duplicates} duplicates",
        accepted.len(),
        count.load(Ordering::SeqCst)
    );
    assert!(!accepted.is_empty());
    // The producer and the group's consumer each lost the broker and are back on it.
    wait_until("both reconnects counted", Duration::from_secs(10), || {
        helix_messaging_testkit::recorded::reconnects(helix_messaging_kafka::NAME) >= 2
    })
    .await;
    // Closing ends the subscription (committed, out of the group) while the cluster is up.
    broker.close().await.unwrap();
    consumer.await.unwrap();
}

/// A batch whose records the producer cannot take (its queue full, the broker down) fails
/// within one publish timeout: once one record waited the timeout out, the rest fail at once
/// instead of each waiting its own, one after another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_the_producer_cannot_take_fails_within_one_publish_timeout() {
    common::log_to_test_output();
    let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
    let topic = "full-queue";
    cluster.create_topic(topic, 1, 1).unwrap();
    let mut config = common::config_for(&cluster.bootstrap_servers());
    config.publish_timeout = Duration::from_secs(1);
    // Room for one record: the second waits for the first's delivery report.
    config
        .properties
        .insert("queue.buffering.max.messages".into(), "1".into());
    let broker = KafkaBroker::connect(config).await.unwrap();
    broker
        .publish(topic, Message::new("while up"))
        .await
        .unwrap();

    cluster.broker_down(1).unwrap();
    // The record in the queue fails by librdkafka's message timeout, checked about once a
    // second, so its report takes up to twice the timeout; five records each waiting for
    // room in turn took 9.4 s.
    helix_messaging_testkit::faults::assert_batch_times_out(
        &broker,
        topic,
        5,
        Duration::from_secs(4),
    )
    .await;
    cluster.broker_up(1).unwrap();
    broker.close().await.unwrap();
}

/// With the topic lookup's slow path inline, the future was 1,128 bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_future_fits_the_allocators_per_thread_cache() {
    let broker = KafkaBroker::connect(common::config()).await.unwrap();
    helix_messaging_testkit::assert_publish_future_fits_the_allocators_cache(&broker);
    broker.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_secret_property_never_shows_its_value() {
    // librdkafka refuses the property and echoes it with its value; the adapter's error must
    // carry neither that value nor the SASL password, in its text or its source chain.
    let mut config = common::config().with_sasl_password("PASSWORD-5678");
    config
        .properties
        .insert("hm.test.client.secret".into(), "TOPSECRET-1234".into());
    let err = KafkaBroker::connect(config)
        .await
        .expect_err("librdkafka refuses an unknown property");
    assert_eq!(err.kind(), helix_messaging_core::ErrorKind::Config);
    let mut shown = format!("{err} {err:?}");
    let mut source = std::error::Error::source(&err);
    while let Some(cause) = source {
        shown.push_str(&format!(" {cause} {cause:?}"));
        source = cause.source();
    }
    assert!(
        shown.contains("hm.test.client.secret"),
        "names the property: {shown}"
    );
    assert!(
        !shown.contains("TOPSECRET-1234"),
        "leaks the secret: {shown}"
    );
    assert!(
        !shown.contains("PASSWORD-5678"),
        "leaks the password: {shown}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_loop_counts_every_attempt_across_owners() {
    // The attempts of a record still out travel in the committed offset's metadata, as
    // Apache Kafka stores it. Tansu 0.6 drops commit metadata (its OffsetFetch answers
    // offsets only), so this runs on librdkafka's mock cluster, which keeps it as Kafka does.
    //
    // Each owner is a process of its own that ends (closes its connection) before the next
    // starts. Ending while the next one joins is a different case: Kafka takes the leaving
    // member's commit while the group prepares its rebalance, but the mock cluster refuses
    // every commit once a new member has asked to join, so there the attempt would be lost
    // to the mock, not to the adapter.
    common::log_to_test_output();
    let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
    let config = common::config_for(&cluster.bootstrap_servers());
    let publisher = KafkaBroker::connect(config.clone()).await.unwrap();
    let topic = fresh_name("crash-loop");
    cluster.create_topic(&topic, 1, 1).unwrap();
    let group = fresh_name("g");
    let owner = KafkaBroker::connect(config.clone()).await.unwrap();
    drop(
        owner
            .subscribe(&topic, SubscribeOptions::group(&group))
            .await
            .unwrap(),
    );
    owner.close().await.unwrap();
    // Behind the poison message, two more in the same record batch: the group resumes inside
    // it every time.
    let sent: Vec<Message> = (0..3).map(|i| Message::new(format!("m{i}"))).collect();
    publisher
        .publish_batch(&topic, sent.clone())
        .await
        .into_result()
        .unwrap();
    for expected in 1..=5u32 {
        let owner = KafkaBroker::connect(config.clone()).await.unwrap();
        let mut sub = owner
            .subscribe(&topic, SubscribeOptions::group(&group).with_prefetch(1))
            .await
            .unwrap();
        let d = recv(&mut sub).await;
        assert_eq!(d.message().id(), sent[0].id());
        assert_eq!(
            d.attempt(),
            expected,
            "attempt after {} crashes",
            expected - 1
        );
        assert_eq!(d.info().redelivered, expected > 1);
        if expected == 5 {
            d.ack().await.unwrap();
            for m in &sent[1..] {
                let next = recv(&mut sub).await;
                assert_eq!(next.message().id(), m.id());
                assert_eq!(
                    next.attempt(),
                    1,
                    "a record never handed out is on attempt 1"
                );
                next.ack().await.unwrap();
            }
        } else {
            drop(d);
        }
        drop(sub);
        owner.close().await.unwrap();
    }
    publisher.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_dropped_unsettled_comes_back_and_commits_move_on() {
    // Dropped without a settlement, a delivery would otherwise hold its partition's commit
    // point for good: it is handed out again, and once settled the group moves past it.
    common::log_to_test_output();
    let broker = KafkaBroker::connect(common::config()).await.unwrap();
    let topic = one_partition_topic(&broker, "dropped").await;
    let group = fresh_name("g");
    let mut sub = broker
        .subscribe(&topic, SubscribeOptions::group(&group))
        .await
        .unwrap();
    let sent: Vec<Message> = (0..2).map(|i| Message::new(format!("m{i}"))).collect();
    for m in &sent {
        broker.publish(&topic, m.clone()).await.unwrap();
    }
    let first = recv(&mut sub).await;
    assert_eq!(first.message().id(), sent[0].id());
    drop(first);
    let mut got = Vec::new();
    for _ in 0..2 {
        let d = recv(&mut sub).await;
        got.push((d.message().id().to_owned(), d.attempt()));
        d.ack().await.unwrap();
    }
    got.sort();
    let mut expected = vec![(sent[0].id().to_owned(), 2), (sent[1].id().to_owned(), 1)];
    expected.sort();
    assert_eq!(got, expected);
    drop(sub);

    // Everything is settled: the group's committed offset moves past both records. Read
    // without joining the group (a join right after a member left can wait out a rebalance).
    let brokers = broker.config().brokers.clone();
    let committed = tokio::task::spawn_blocking(move || {
        let reader: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("group.id", &group)
            .create()
            .unwrap();
        let mut partition = rdkafka::TopicPartitionList::new();
        partition.add_partition(&topic, 0);
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        loop {
            let offset = reader
                .committed_offsets(partition.clone(), Duration::from_secs(5))
                .ok()
                .and_then(|c| c.find_partition(&topic, 0).map(|e| e.offset()));
            if offset == Some(rdkafka::Offset::Offset(2)) || std::time::Instant::now() > deadline {
                return offset;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    })
    .await
    .unwrap();
    assert_eq!(
        committed,
        Some(rdkafka::Offset::Offset(2)),
        "the commit point moved past the dropped delivery"
    );
    broker.close().await.unwrap();
}

/// Delayed requeues wait on the group's retry topic: a copy that is not due pauses only its
/// own partition (a shorter delay on another partition comes back first), every copy comes
/// back no sooner than its delay with the next attempt, and a copy written just before the
/// consumer's process went away is read by the group's next member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_requeues_pause_only_their_partition_and_survive_the_consumer() {
    common::log_to_test_output();
    let mut config = common::config();
    if common::on_tansu() {
        // Tansu 0.6 serves nothing to a fetch that starts inside a record batch.
        config.batch_size = 1;
    }
    let topic = helix_messaging_testkit::fresh_name("delayed");
    let group = helix_messaging_testkit::fresh_name("g");
    let broker = KafkaBroker::connect(config.clone()).await.unwrap();
    let mut sub = broker
        .subscribe(&topic, SubscribeOptions::group(&group))
        .await
        .unwrap();
    // Keys landing on different partitions (the retry topic has as many, and the same
    // partitioner places the copies alike).
    let mut by_partition: std::collections::BTreeMap<i32, Message> = Default::default();
    for i in 0..24 {
        let m = Message::new(format!("probe {i}")).with_key(format!("key-{i}"));
        broker.publish(&topic, m.clone()).await.unwrap();
        let d = common::recv(&mut sub).await;
        if let Some(Position::Offset { partition, .. }) = d.info().position {
            by_partition.entry(partition).or_insert(m);
        }
        d.ack().await.unwrap();
        if by_partition.len() >= 2 {
            break;
        }
    }
    let mut two = by_partition.into_values();
    let (slow, fast) = (
        two.next().expect("a partition"),
        two.next().expect("another partition"),
    );
    let slow = slow.with_id(uuid::Uuid::new_v4().to_string());
    let fast = fast.with_id(uuid::Uuid::new_v4().to_string());
    broker.publish(&topic, slow.clone()).await.unwrap();
    broker.publish(&topic, fast.clone()).await.unwrap();
    let started = Instant::now();
    let mut delays = std::collections::HashMap::new();
    delays.insert(slow.id().to_owned(), Duration::from_millis(4_000));
    delays.insert(fast.id().to_owned(), Duration::from_millis(500));
    for _ in 0..2 {
        let d = common::recv(&mut sub).await;
        assert!(d.delays_requeue());
        d.requeue_after(delays[d.message().id()]).await.unwrap();
    }
    let first = common::recv(&mut sub).await;
    assert_eq!(
        first.message().id(),
        fast.id(),
        "the short delay on the other partition comes back first"
    );
    assert_eq!(first.attempt(), 2);
    assert!(
        started.elapsed() >= Duration::from_millis(480),
        "early: {:?}",
        started.elapsed()
    );
    assert!(
        started.elapsed() < Duration::from_millis(4_000),
        "the long delay held up another partition"
    );
    first.ack().await.unwrap();
    let slow_back = common::recv(&mut sub).await;
    assert_eq!(slow_back.message().id(), slow.id());
    assert!(
        started.elapsed() >= Duration::from_millis(3_980),
        "early: {:?}",
        started.elapsed()
    );
    assert_eq!(slow_back.attempt(), 2);
    // Delayed again, then this process "dies" with the copy on the retry topic.
    let requeued_at = Instant::now();
    slow_back
        .requeue_after(Duration::from_millis(1_500))
        .await
        .unwrap();
    drop(sub);
    broker.close().await.unwrap();

    let next = KafkaBroker::connect(config).await.unwrap();
    let mut sub = next
        .subscribe(&topic, SubscribeOptions::group(&group))
        .await
        .unwrap();
    let again = common::recv(&mut sub).await;
    assert_eq!(
        again.message().id(),
        slow.id(),
        "the waiting copy reaches the next member"
    );
    assert_eq!(again.attempt(), 3);
    assert!(
        requeued_at.elapsed() >= Duration::from_millis(1_480),
        "early: {:?}",
        requeued_at.elapsed()
    );
    assert_eq!(again.message().key(), slow.key());
    again.ack().await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(1_000), sub.next())
            .await
            .is_err(),
        "delivered again after the ack"
    );
    next.close().await.unwrap();
}

/// A topic of HelixAgent's tables created on first use gets the table's partitions and
/// retention (not the flat default), and `KAFKA_MIN_INSYNC_REPLICAS` is set on every topic
/// created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_created_on_first_use_follow_the_seed_tables_and_min_insync_replicas() {
    let mut config = common::config();
    let prefix = fresh_name("firstuse");
    config.topic_prefix = Some(prefix.clone());
    // 1, not the documents' 2: the test cluster has one broker, and the value must still be
    // seen set on the topic rather than inherited.
    config.min_insync_replicas = Some(1);
    let broker = KafkaBroker::connect(config.clone()).await.unwrap();
    for (topic, expected, retention) in [
        ("helixagent.tasks", 4, None),
        ("helixagent.events", 8, None),
        ("helixagent.debates", 2, None),
        ("helixagent.stream.tokens", 12, Some("3600000")),
        ("unlisted", 3, None),
    ] {
        broker
            .publish(topic, Message::new("first use"))
            .await
            .unwrap();
        let full = format!("{prefix}.{topic}");
        assert_eq!(partitions(&config.brokers, &full), expected, "{full}");
        if let Some(ms) = retention {
            let (value, _) = common::topic_setting(&config.brokers, &full, "retention.ms").await;
            assert_eq!(value.as_deref(), Some(ms), "{full}");
        }
        let (value, source) =
            common::topic_setting(&config.brokers, &full, "min.insync.replicas").await;
        assert_eq!(value.as_deref(), Some("1"), "{full}");
        assert!(source.contains("DynamicTopic"), "{full}: set from {source}");
    }
    broker.close().await.unwrap();
}

/// `KAFKA_SESSION_TIMEOUT_MS`, `KAFKA_HEARTBEAT_INTERVAL_MS` and `KAFKA_MAX_POLL_RECORDS`
/// from the environment make a consumer the real cluster accepts, which then receives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_consumer_with_the_seed_timings_receives() {
    let brokers = common::brokers();
    let config = KafkaConfig::from_vars(helix_messaging_testkit::env_lookup(&[
        ("KAFKA_BROKERS", brokers.as_str()),
        ("KAFKA_SESSION_TIMEOUT_MS", "10000"),
        ("KAFKA_HEARTBEAT_INTERVAL_MS", "1000"),
        ("KAFKA_MAX_POLL_RECORDS", "2"),
    ]))
    .unwrap();
    let broker = KafkaBroker::connect(config).await.unwrap();
    let topic = one_partition_topic(&broker, "timings").await;
    let mut sub = broker
        .subscribe(&topic, SubscribeOptions::group(fresh_name("g")))
        .await
        .unwrap();
    for i in 0..3 {
        broker
            .publish(&topic, Message::new(format!("m{i}")))
            .await
            .unwrap();
    }
    // Two unsettled at most: the third waits until one is acked.
    let first = recv(&mut sub).await;
    let second = recv(&mut sub).await;
    let held = tokio::time::timeout(Duration::from_secs(1), sub.next()).await;
    assert!(held.is_err(), "a third delivery past the bound: {held:?}");
    first.ack().await.unwrap();
    let third = recv(&mut sub).await;
    assert_eq!(third.message().payload().as_ref(), b"m2");
    second.ack().await.unwrap();
    third.ack().await.unwrap();
    drop(sub);
    broker.close().await.unwrap();
}

/// A record the producer took is in a history read of its topic that begins after, though
/// its publisher stopped waiting for the delivery report: a replay run killed mid-publish
/// leaves its copy in the producer it shares with the run that resumes it, which searches
/// the target for the copies published before and, not finding this one, published it
/// twice (plane replay seed 16). The record lingers in the producer for 2 s, far longer than
/// the read takes, unless the read waits for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_history_read_sees_a_record_whose_publisher_stopped_waiting() {
    let mut config = common::config();
    config.linger = Duration::from_secs(2);
    let broker = KafkaBroker::connect(config).await.unwrap();
    let topic = one_partition_topic(&broker, "abandoned-publish").await;
    let from = std::time::SystemTime::now() - Duration::from_secs(1);
    // The topic is known, so one poll hands the record to the producer; the publish is then
    // waiting for its report, and is dropped.
    let publish = broker.publish(&topic, Message::new("x").with_id("abandoned"));
    assert!(
        futures::FutureExt::now_or_never(publish).is_none(),
        "the record lingers in the producer"
    );
    let range = helix_messaging_core::TimeRange::new(
        from,
        std::time::SystemTime::now() + Duration::from_secs(1),
    )
    .unwrap();
    let read = tokio::time::timeout(Duration::from_secs(20), async {
        let mut entries = broker.read_range(&topic, range).await.unwrap();
        let mut ids = Vec::new();
        while let Some(entry) = entries.next().await {
            ids.push(entry.unwrap().message.id().to_owned());
        }
        ids
    })
    .await
    .expect("the read ends within 20 s");
    assert_eq!(read, ["abandoned"]);
    broker.close().await.unwrap();
}

/// Records cross to and from other Kafka clients as plain records (the crate's and the
/// README's promise). A record another producer wrote, with no helix headers, is received
/// as it is: its key, its headers, its payload, the record timestamp, and the id
/// `<topic>-<partition>@<offset>`. A message published here reads, to a plain consumer, as
/// a record with the payload as value, the key as key, the application's headers as record
/// headers and the id in `x-helix-id`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_cross_to_and_from_other_clients_as_plain_records() {
    use rdkafka::Message as _;
    use rdkafka::message::{Header, Headers as _, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord};

    let brokers = common::brokers();
    let broker = KafkaBroker::connect(common::config()).await.unwrap();
    let topic = one_partition_topic(&broker, "plain-records").await;
    let mut sub = broker
        .subscribe(&topic, SubscribeOptions::group(fresh_name("g")))
        .await
        .unwrap();

    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .unwrap();
    let stamped_ms = 1_700_000_000_123_i64;
    let written = producer
        .send(
            FutureRecord::to(&topic)
                .key("plain-key")
                .payload("from a plain producer")
                .timestamp(stamped_ms)
                .headers(OwnedHeaders::new().insert(Header {
                    key: "origin",
                    value: Some("elsewhere"),
                })),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    let (partition, offset) = (written.partition, written.offset);
    let delivery = recv(&mut sub).await;
    let message = delivery.message();
    assert_eq!(message.id(), format!("{topic}-{partition}@{offset}"));
    assert_eq!(message.payload().as_ref(), b"from a plain producer");
    assert_eq!(message.key(), Some("plain-key"));
    assert_eq!(message.header("origin"), Some("elsewhere"));
    assert_eq!(
        message.timestamp(),
        std::time::UNIX_EPOCH + Duration::from_millis(stamped_ms as u64)
    );
    assert_eq!(
        delivery.info().position,
        Some(Position::Offset { partition, offset })
    );
    delivery.ack().await.unwrap();
    drop(sub);

    let sent = Message::new("from helix")
        .with_key("helix-key")
        .with_header("origin", "here");
    broker.publish(&topic, sent.clone()).await.unwrap();
    let consumer: rdkafka::consumer::StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", fresh_name("plain-reader"))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[&topic]).unwrap();
    let record = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let record = consumer.recv().await.expect("a record");
            if record.payload() == Some(b"from helix".as_slice()) {
                break record.detach();
            }
        }
    })
    .await
    .expect("the published message within 20 s");
    assert_eq!(record.key(), Some(b"helix-key".as_slice()));
    let headers = record.headers().expect("record headers");
    let header = |name: &str| {
        headers
            .iter()
            .find(|h| h.key == name)
            .and_then(|h| h.value)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    };
    assert_eq!(header("origin").as_deref(), Some("here"));
    assert_eq!(header("x-helix-id").as_deref(), Some(sent.id()));
    broker.close().await.unwrap();
}
