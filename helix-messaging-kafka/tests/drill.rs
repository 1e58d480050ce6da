//! The node-loss drill on librdkafka's mock cluster: three brokers, a topic whose three
//! partitions are replicated on all of them, eight publishers waiting for every
//! acknowledgement and a consumer group taking everything. The broker leading partition 0
//! (and the group's coordinator) is lost at one third of the stream, its leadership and
//! the coordinator move to another broker, as an election does; it comes back at two thirds
//! and leads again.
//!
//! It passes when no acknowledged message is lost, duplicates stay bounded, partition 0
//! delivers again within 10 s of each fault and the group's commits resume (nothing left
//! uncommitted at the end). Its figures are printed. Three JVM brokers are too heavy for
//! every CI run; this is the same scenario on the mock (see the README's reliability
//! section).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use helix_messaging_core::{Broker, Message, Position, Publisher, SubscribeOptions, Subscriber};
use helix_messaging_kafka::KafkaBroker;
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
    common::log_to_stderr();
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
    // Commits resumed: once the consumer has acknowledged everything, nothing is left
    // uncommitted for the group.
    helix_messaging_testkit::eventually(
        Duration::from_secs(60),
        "the group's commits caught up",
        || async {
            let backlog = broker.backlog(TOPIC, GROUP).await.ok()?;
            (backlog.waiting == 0).then_some(())
        },
    )
    .await;
    broker.close().await.unwrap();
    consumer.await.unwrap();
}
