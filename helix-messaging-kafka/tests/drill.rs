//! The node-loss drill, in two settings: on librdkafka's mock cluster (every CI run) and on
//! three Apache Kafka brokers of the test's own (ignored by default: three JVMs are too heavy
//! for every CI run; see the README's reliability section for the command and its figures).
//!
//! On the mock: three brokers, a topic whose three partitions are replicated on all of
//! them, eight publishers waiting for every acknowledgement and a consumer group taking
//! everything. The broker leading partition 0 (and the group's coordinator) is lost at one
//! third of the stream, its leadership and the coordinator move to another broker, as an
//! election does; it comes back at two thirds and leads again.
//!
//! On the JVM brokers (Kafka 4.1.1 in KRaft mode, each node broker and controller): the
//! same topic, replication factor 3 and `min.insync.replicas` 2 set by the adapter's topic
//! creation, and the same stream. The broker leading partition 0 is killed (SIGKILL) at one
//! third, and started again on its data at two thirds; Kafka itself fences it, elects new
//! leaders and moves the group's coordinator, and once it is back gives it partition 0
//! again (a preferred-leader election). The brokers detect a dead one faster than Kafka's
//! defaults do (`JVM_CLUSTER_SETTINGS` says how, and why).
//!
//! Both pass when no acknowledged message is lost, duplicates stay bounded, deliveries
//! resume within 10 s of each fault and the group's commits resume (nothing left
//! uncommitted at the end). Their figures are printed.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use helix_messaging_core::{Broker, Message, Position, Publisher, SubscribeOptions, Subscriber};
use helix_messaging_kafka::{KafkaBroker, KafkaConfig, KafkaTopic};
use helix_messaging_testkit::drill::Drill;
use helix_messaging_testkit::faults::PrivateKafkaCluster;
use parking_lot::Mutex;
use rdkafka::mocking::{MockCluster, MockCoordinator};

mod common;

const PUBLISHERS: usize = 8;
const EACH: usize = 2_500;
const TOPIC: &str = "drill";
const GROUP: &str = "drill-workers";

/// What the consumer saw: how often each id arrived, and when partition 0 last delivered.
#[derive(Default)]
struct Seen {
    times: HashMap<String, usize>,
    partition_zero: Vec<Instant>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_partition_leader_loses_no_acknowledged_message() {
    common::log_to_test_output();
    let cluster = MockCluster::new(3).unwrap();
    cluster.create_topic(TOPIC, 3, 3).unwrap();
    for (partition, leader) in [(0, 1), (1, 2), (2, 3)] {
        cluster
            .partition_leader(TOPIC, partition, Some(leader))
            .unwrap();
    }
    cluster
        .coordinator(MockCoordinator::Group(GROUP.into()), 1)
        .unwrap();
    let mut config = common::config_for(&cluster.bootstrap_servers());
    config.publish_timeout = Duration::from_secs(60);
    let broker = Arc::new(KafkaBroker::connect(config).await.unwrap());

    let seen: Arc<Mutex<Seen>> = Arc::default();
    let mut sub = broker
        .subscribe(TOPIC, SubscribeOptions::group(GROUP).with_prefetch(500))
        .await
        .unwrap();
    let consumer = {
        let seen = seen.clone();
        tokio::spawn(async move {
            while let Some(next) = sub.next().await {
                let Ok(delivery) = next else { continue };
                {
                    let mut seen = seen.lock();
                    *seen
                        .times
                        .entry(delivery.message().id().to_owned())
                        .or_default() += 1;
                    if let Some(Position::Offset { partition: 0, .. }) = delivery.info().position {
                        seen.partition_zero.push(Instant::now());
                    }
                }
                // A partition moved meanwhile refuses the ack; its new owner gets the
                // message again (a duplicate, counted).
                let _ = delivery.ack().await;
            }
        })
    };

    let confirmed = Arc::new(Mutex::new(Vec::<String>::new()));
    let refused = Arc::new(Mutex::new(0usize));
    let publishers: Vec<_> = (0..PUBLISHERS)
        .map(|p| {
            let (broker, confirmed, refused) = (broker.clone(), confirmed.clone(), refused.clone());
            tokio::spawn(async move {
                for i in 0..EACH {
                    let id = format!("p{p}-m{i}");
                    // Keyed so that every partition, 0 included, carries traffic.
                    let message = Message::new("x")
                        .with_id(id.clone())
                        .with_key(format!("k{i}"));
                    match broker.publish(TOPIC, message).await {
                        Ok(()) => confirmed.lock().push(id),
                        Err(_) => *refused.lock() += 1,
                    }
                }
            })
        })
        .collect();
    let total = PUBLISHERS * EACH;
    let progress = || confirmed.lock().len() + *refused.lock();
    helix_messaging_testkit::eventually(Duration::from_secs(120), "a third published", || async {
        (progress() >= total / 3).then_some(())
    })
    .await;
    // The leader of partition 0, and the group's coordinator, is lost; as an election would,
    // the partition and the coordinator move to broker 2.
    let lost_at = Instant::now();
    cluster.broker_down(1).unwrap();
    cluster.partition_leader(TOPIC, 0, Some(2)).unwrap();
    cluster
        .coordinator(MockCoordinator::Group(GROUP.into()), 2)
        .unwrap();
    helix_messaging_testkit::eventually(
        Duration::from_secs(120),
        "two thirds published",
        || async { (progress() >= 2 * total / 3).then_some(()) },
    )
    .await;
    cluster.broker_up(1).unwrap();
    // Back, it leads again, as a preferred-leader election gives it back its partition.
    cluster.partition_leader(TOPIC, 0, Some(1)).unwrap();
    cluster
        .coordinator(MockCoordinator::Group(GROUP.into()), 1)
        .unwrap();
    let back_at = Instant::now();
    for publisher in publishers {
        publisher.await.unwrap();
    }
    let confirmed = confirmed.lock().clone();
    helix_messaging_testkit::eventually(
        Duration::from_secs(120),
        "every acknowledged message received",
        || async {
            let seen = seen.lock();
            confirmed
                .iter()
                .all(|id| seen.times.contains_key(id))
                .then_some(())
        },
    )
    .await;

    let resumed_after = |fault: Instant| {
        seen.lock()
            .partition_zero
            .iter()
            .find(|t| **t > fault)
            .map(|t| t.duration_since(fault))
    };
    let (after_loss, after_return) = (resumed_after(lost_at), resumed_after(back_at));
    let duplicates: usize = seen.lock().times.values().map(|n| n - 1).sum();
    let lost = {
        let seen = seen.lock();
        confirmed
            .iter()
            .filter(|id| !seen.times.contains_key(*id))
            .count()
    };
    eprintln!(
        "drill[kafka mock, 3 brokers]: published {total}, acknowledged {}, refused {}, lost {lost}, duplicates {duplicates}, partition 0 delivering again {after_loss:?} after the loss and {after_return:?} after the return",
        confirmed.len(),
        total - confirmed.len(),
    );
    assert_eq!(lost, 0, "acknowledged messages lost");
    assert!(duplicates <= total / 10, "{duplicates} duplicates");
    for (fault, resumed) in [("loss", after_loss), ("return", after_return)] {
        let resumed =
            resumed.unwrap_or_else(|| panic!("partition 0 never delivered after the {fault}"));
        assert!(
            resumed <= Duration::from_secs(10),
            "partition 0 delivered again {resumed:?} after the {fault}"
        );
    }
    commits_caught_up(&broker).await;
    broker.close().await.unwrap();
    consumer.await.unwrap();
}

/// How long one publish is made again, under the same id, while the cluster refuses it for
/// now (a partition without a leader, too few replicas in sync).
const PUBLISH_PATIENCE: Duration = Duration::from_secs(60);
/// The last messages of each publisher wait until the restarted broker leads partition 0
/// again, so that its return happens mid-stream too, however fast the rest went.
const AFTER_THE_RETURN: usize = 100;
/// Longest a fault may hold deliveries up.
const RESUME_LIMIT: Duration = Duration::from_secs(10);

/// The JVM cluster's failure detection and leadership return, which Kafka's defaults
/// leave slow for a drill that must resume within [`RESUME_LIMIT`]:
/// - `broker.session.timeout.ms` 3 s (default 9 s): the controller fences a silent broker,
///   taking it out of every ISR and its partitions' leadership, only after this; until then
///   every partition it replicates takes no `acks=all` write (the leader waits for it) and
///   its consumers see nothing new. With 9 s, deliveries resumed 10.8 s after the kill
///   (the one run with the group's own timings, below).
/// - `broker.heartbeat.interval.ms` 500 ms (default 2 s), well within that session.
/// - `leader.imbalance.check.interval.seconds` 1 (default 300): the restarted broker leads
///   its partitions again within the drill, a second leadership move to live through.
const JVM_CLUSTER_SETTINGS: &[(&str, &str)] = &[
    ("broker.session.timeout.ms", "3000"),
    ("broker.heartbeat.interval.ms", "500"),
    ("leader.imbalance.check.interval.seconds", "1"),
];

/// The replicas and in-sync replicas of every partition of `topic`, by partition.
fn replication(brokers: &str, topic: &str) -> Vec<(i32, Vec<i32>, Vec<i32>)> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let client: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    let metadata = client
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    metadata.topics()[0]
        .partitions()
        .iter()
        .map(|p| (p.id(), p.replicas().to_vec(), p.isr().to_vec()))
        .collect()
}

/// The same drill on three Apache Kafka 4.1.1 brokers of the test's own (KRaft, each node
/// broker and controller): replication factor 3 and `min.insync.replicas` 2 set by the
/// adapter's topic creation; partition 0's leader SIGKILLed at one third, started again on
/// its data at two thirds, and leading partition 0 again before the stream ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "three JVM brokers: run with cargo nextest run -p helix-messaging-kafka --test drill --run-ignored only"]
async fn three_jvm_brokers_lose_no_acknowledged_message_when_a_leader_dies() {
    common::log_to_test_output();
    let drill_began = Instant::now();
    let mut cluster =
        tokio::task::block_in_place(|| PrivateKafkaCluster::start_with(3, JVM_CLUSTER_SETTINGS));
    let cluster_up = drill_began.elapsed();
    let mut config = common::config_for(&cluster.bootstrap_servers());
    // The group's own timings (45 s session, 3 s heartbeats), not the tests' 6 s session:
    // the coordinator answers a member's heartbeats on the connection its commits use, one
    // request after another, and a commit waits for every in-sync replica of the group's
    // offsets partition, the dead broker too until the controller fences it. With Kafka's
    // 9 s fencing, a 6 s session ran out first: the member was dropped, rejoined, and
    // waited another 6 s for its old self to expire (13.5 s without deliveries).
    let production = KafkaConfig::new(config.brokers.clone());
    config.session_timeout = production.session_timeout;
    config.heartbeat_interval = production.heartbeat_interval;
    config.replication_factor = Some(3);
    config.min_insync_replicas = Some(2);
    let broker = Arc::new(KafkaBroker::connect(config.clone()).await.unwrap());
    broker
        .create_topics(&[KafkaTopic::new(TOPIC, 3)])
        .await
        .unwrap();
    for (partition, replicas, in_sync) in replication(&config.brokers, TOPIC) {
        assert_eq!(replicas.len(), 3, "partition {partition}'s replicas");
        assert_eq!(in_sync.len(), 3, "partition {partition}'s in-sync replicas");
    }
    let (min_in_sync, _) =
        common::topic_setting(&config.brokers, TOPIC, "min.insync.replicas").await;
    assert_eq!(min_in_sync.as_deref(), Some("2"));

    let drill = Drill::new(PUBLISH_PATIENCE);
    let sub = broker
        .subscribe(TOPIC, SubscribeOptions::group(GROUP).with_prefetch(500))
        .await
        .unwrap();
    let consumer = drill.record_deliveries(sub, false);

    let (leader_returned, returned) = tokio::sync::watch::channel(false);
    let publishers: Vec<_> = (0..PUBLISHERS)
        .map(|p| {
            let (broker, drill, mut returned) = (broker.clone(), drill.clone(), returned.clone());
            tokio::spawn(async move {
                for i in 0..EACH {
                    if i == EACH - AFTER_THE_RETURN {
                        tokio::time::timeout(
                            Duration::from_secs(240),
                            returned.wait_for(|returned| *returned),
                        )
                        .await
                        .expect("partition 0's leader returned within 240 s")
                        .expect("the drill is still running");
                    }
                    let id = format!("p{p}-m{i}");
                    // Keyed so that every partition, 0 included, carries traffic.
                    let message = || Message::new("x").with_key(format!("k{i}"));
                    drill.publish(&*broker, TOPIC, &id, message).await;
                }
            })
        })
        .collect();
    let total = PUBLISHERS * EACH;
    let progress = || drill.outcomes.settled();

    helix_messaging_testkit::eventually(Duration::from_secs(120), "a third published", || async {
        (progress() >= total / 3).then_some(())
    })
    .await;
    let leader = tokio::task::block_in_place(|| cluster.partition_leader(TOPIC, 0))
        .expect("partition 0 has a leader");
    tokio::task::block_in_place(|| cluster.kill(leader));
    let killed_at = Instant::now();
    eprintln!("drill: killed broker {leader}, partition 0's leader");

    helix_messaging_testkit::eventually(
        Duration::from_secs(180),
        "two thirds published",
        || async { (progress() >= 2 * total / 3).then_some(()) },
    )
    .await;
    let restarted_at = Instant::now();
    tokio::task::block_in_place(|| cluster.restart(leader));
    let serving_again_after = restarted_at.elapsed();
    // Polled every 100 ms: each look is a new metadata client, too dear for `eventually`'s
    // 20 ms on two cores busy with three brokers.
    let return_deadline = Instant::now() + Duration::from_secs(60);
    while tokio::task::block_in_place(|| cluster.partition_leader(TOPIC, 0)) != Some(leader) {
        assert!(
            Instant::now() < return_deadline,
            "broker {leader} did not lead partition 0 again within 60 s of serving"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let returned_at = Instant::now();
    leader_returned.send_replace(true);
    eprintln!(
        "drill: broker {leader} served again {serving_again_after:?} after its restart and led partition 0 again {:?} after it",
        returned_at - restarted_at
    );

    for publisher in publishers {
        publisher.await.unwrap();
    }
    let published_by = drill_began.elapsed();
    let confirmed = drill.outcomes.acknowledged();
    helix_messaging_testkit::eventually(
        Duration::from_secs(120),
        "every acknowledged message delivered",
        || async { drill.timeline.all_delivered(&confirmed).then_some(()) },
    )
    .await;
    commits_caught_up(&broker).await;

    let lost = drill.timeline.lost(&confirmed);
    let duplicates = drill.timeline.duplicates();
    let after_kill =
        [None, Some(0)].map(|partition| drill.timeline.resumed_after(killed_at, partition));
    let after_restart = drill.timeline.resumed_after(restarted_at, None);
    let after_return = drill.timeline.resumed_after(returned_at, Some(0));
    eprintln!(
        "drill[kafka 4.1.1, 3 JVM brokers, RF 3, min ISR 2]: published {total}, acknowledged {}, refused {}, lost {lost}, duplicates {duplicates}, delivering again {:?} after partition 0's leader was killed (partition 0: {:?}), {after_restart:?} after its restart (serving again {serving_again_after:?} after it) and {after_return:?} on partition 0 after it led partition 0 again ({:?} after the restart); publishes refused for now and made again: {:?}; cluster up in {cluster_up:?}, stream published by {published_by:?}, drill {:?}",
        confirmed.len(),
        drill.outcomes.refused().len(),
        after_kill[0],
        after_kill[1],
        returned_at - restarted_at,
        drill.outcomes.refused_for_now(),
        drill_began.elapsed(),
    );
    assert_eq!(lost, 0, "acknowledged messages lost");
    assert_eq!(
        confirmed.len(),
        total,
        "every publish acknowledged within a minute"
    );
    assert!(duplicates <= total / 10, "{duplicates} duplicates");
    for (fault, resumed) in [
        ("kill", after_kill[0]),
        ("kill, on partition 0", after_kill[1]),
        ("restart", after_restart),
        ("return of partition 0's leadership", after_return),
    ] {
        let resumed = resumed.unwrap_or_else(|| panic!("nothing delivered after the {fault}"));
        assert!(
            resumed <= RESUME_LIMIT,
            "delivering again {resumed:?} after the {fault}"
        );
    }
    broker.close().await.unwrap();
    consumer.await.unwrap();
}

/// Commits resumed: once the consumer has acknowledged everything, nothing is left
/// uncommitted for the group (within a minute).
async fn commits_caught_up(broker: &KafkaBroker) {
    helix_messaging_testkit::eventually(
        Duration::from_secs(60),
        "the group's commits caught up",
        || async {
            let backlog = broker.backlog(TOPIC, GROUP).await.ok()?;
            (backlog.waiting == 0).then_some(())
        },
    )
    .await;
}
