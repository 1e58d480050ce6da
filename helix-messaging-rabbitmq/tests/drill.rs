//! The node-loss drill, and the conformance suite, on a RabbitMQ cluster of the test's own: three private nodes,
//! quorum queues (`RABBITMQ_QUEUE_TYPE=quorum`), eight publishers with confirms (one
//! connection each, spread over the nodes, every node in `RABBITMQ_CLUSTER_NODES`) and a
//! consumer group of two connections. The node leading the group's queue is killed
//! (`SIGKILL`) at one third of the stream; a second node's application is stopped for 3 s
//! and started again at two thirds (one node of three is then all that runs, so the queue
//! has no quorum until it is back).
//!
//! A publish the broker refused for now (a negative confirm, a connection lost under it) is
//! made again under the same id, as an application does, for up to a minute. The drill
//! passes when every publish is confirmed, none confirmed is lost, duplicates stay bounded
//! and the consumers deliver again soon after each fault: within 10 s of the leader's death,
//! a message first published after it; within 10 s of the stopped node being back
//! (`start_app` returned), a message first published after its return. Until then the queue
//! has no quorum to deliver from, and how long a node takes to start is the broker's time,
//! not the client's. Its figures are printed, the node's start among them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use helix_messaging_core::{Broker, Message, SubscribeOptions, Subscriber};
use helix_messaging_rabbitmq::{RabbitBroker, RabbitConfig};
use helix_messaging_testkit::drill::Drill;
use helix_messaging_testkit::faults::{PrivateRabbitMq, rabbitmqctl};
use helix_messaging_testkit::{Conformance, env_lookup, eventually};

mod common;

const PUBLISHERS: usize = 8;
const EACH: usize = 2_500;
const TOPIC: &str = "drill";
const GROUP: &str = "workers";
/// How long one publish is made again while the broker refuses it for now.
const PUBLISH_PATIENCE: Duration = Duration::from_secs(60);

/// Settings for a connection that starts at `first` and knows every node of `cluster`, with
/// quorum queues and `extra` variables.
fn config_with(
    first: &PrivateRabbitMq,
    cluster: &[PrivateRabbitMq],
    extra: &[(&str, &str)],
) -> RabbitConfig {
    let nodes: Vec<String> = cluster.iter().map(PrivateRabbitMq::address).collect();
    let (url, nodes) = (first.url(), nodes.join(","));
    let mut vars = vec![
        ("RABBITMQ_URL", url.as_str()),
        ("RABBITMQ_CLUSTER_NODES", nodes.as_str()),
        ("RABBITMQ_QUEUE_TYPE", "quorum"),
    ];
    vars.extend_from_slice(extra);
    let mut config = RabbitConfig::from_vars(env_lookup(&vars)).unwrap();
    config.max_reconnect_delay = Duration::from_millis(500);
    config
}

fn config(first: &PrivateRabbitMq, cluster: &[PrivateRabbitMq]) -> RabbitConfig {
    config_with(first, cluster, &[])
}

/// The node leading `queue`, asked of `any` node still up.
fn leader_of(queue: &str, any: &PrivateRabbitMq) -> String {
    let out = rabbitmqctl(&[
        "-n",
        any.node(),
        "list_queues",
        "name",
        "leader",
        "--quiet",
        "--no-table-headers",
    ]);
    out.lines()
        .find_map(|line| {
            let mut words = line.split_whitespace();
            (words.next() == Some(queue)).then(|| words.next().unwrap_or_default().to_owned())
        })
        .unwrap_or_else(|| panic!("{queue} not listed by {}: {out}", any.node()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_queue_leader_loses_no_confirmed_message() {
    common::log_to_test_output();
    let mut cluster = PrivateRabbitMq::cluster(3);
    let queue = format!("{TOPIC}.{GROUP}");
    let drill = Drill::new(PUBLISH_PATIENCE);

    let mut consumers = Vec::new();
    for c in 0..2 {
        let broker = RabbitBroker::connect(config(&cluster[c], &cluster))
            .await
            .unwrap();
        let sub = broker
            .subscribe(TOPIC, SubscribeOptions::group(GROUP).with_prefetch(200))
            .await
            .unwrap();
        consumers.push((drill.record_deliveries(sub, false), broker));
    }
    let kind = rabbitmqctl(&["-n", cluster[0].node(), "list_queues", "name", "type"]);
    assert!(
        kind.lines()
            .any(|l| l.split_whitespace().eq([queue.as_str(), "quorum"])),
        "the group's queue is a quorum queue: {kind}"
    );

    let mut publishers = Vec::new();
    for p in 0..PUBLISHERS {
        let broker = RabbitBroker::connect(config(&cluster[p % 3], &cluster))
            .await
            .unwrap();
        let drill = drill.clone();
        publishers.push(tokio::spawn(async move {
            for i in 0..EACH {
                let id = format!("p{p}-m{i}");
                let message = || Message::new("x");
                drill.publish(&broker, TOPIC, &id, message).await;
            }
            broker.close().await.unwrap();
        }));
    }
    let total = PUBLISHERS * EACH;
    let progress = || drill.outcomes.settled();

    eventually(Duration::from_secs(120), "a third published", || async {
        (progress() >= total / 3).then_some(())
    })
    .await;
    let leader = leader_of(&queue, &cluster[0]);
    let killed = cluster
        .iter()
        .position(|node| node.node() == leader)
        .unwrap_or_else(|| panic!("the leader {leader} is none of the cluster's nodes"));
    cluster[killed].kill();
    let killed_at = Instant::now();
    eprintln!("drill: killed {leader}, the queue's leader");

    eventually(Duration::from_secs(180), "two thirds published", || async {
        (progress() >= 2 * total / 3).then_some(())
    })
    .await;
    let stopped = (killed + 1) % 3;
    cluster[stopped].stop_app();
    let stopped_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let starting = Instant::now();
    cluster[stopped].start_app();
    let back_at = Instant::now();
    eprintln!(
        "drill: stopped {} and started it again; start_app took {:?}",
        cluster[stopped].node(),
        back_at - starting
    );

    for publisher in publishers {
        publisher.await.unwrap();
    }
    let confirmed = drill.outcomes.acknowledged();
    eventually(
        Duration::from_secs(120),
        "every confirmed message delivered",
        || async { drill.timeline.all_delivered(&confirmed).then_some(()) },
    )
    .await;
    let lost = drill.timeline.lost(&confirmed);
    let duplicates = drill.timeline.duplicates();
    let after_kill = drill.timeline.resumed_after(killed_at, None);
    let after_stop = drill.timeline.resumed_after(stopped_at, None);
    let after_back = drill.timeline.resumed_after(back_at, None);
    eprintln!(
        "drill[rabbitmq, 3 nodes, quorum queue]: published {total}, confirmed {}, refused {}, lost {lost}, duplicates {duplicates}, delivering again {after_kill:?} after the leader was killed, and {after_stop:?} after a second node was stopped (3 s), {after_back:?} after it was back; publishes refused for now and made again, by kind: {:?}",
        confirmed.len(),
        drill.outcomes.refused().len(),
        drill.outcomes.refused_for_now(),
    );
    assert_eq!(lost, 0, "confirmed messages lost");
    assert_eq!(
        confirmed.len(),
        total,
        "every publish confirmed within a minute"
    );
    assert!(duplicates <= total / 10, "{duplicates} duplicates");
    for (fault, resumed) in [
        ("leader's death", after_kill),
        ("stopped node's return", after_back),
    ] {
        let resumed = resumed.unwrap_or_else(|| panic!("nothing delivered after the {fault}"));
        assert!(
            resumed <= Duration::from_secs(10),
            "delivering again {resumed:?} after the {fault}"
        );
    }
    for (consumer, broker) in consumers {
        broker.close().await.unwrap();
        consumer.await.unwrap();
    }
}

/// The conformance suite on the cluster, quorum queues (every case but priority, which
/// quorum queues on 3.10 do not take; the history cases read the journal), connected to
/// one node while the group queues' members span all three.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_conformance_suite_passes_on_the_cluster_with_quorum_queues() {
    let cluster = PrivateRabbitMq::cluster(3);
    let config = config_with(
        &cluster[1],
        &cluster,
        &[("RABBITMQ_REPLAY_JOURNAL", "true")],
    );
    assert!(
        !config.capabilities().priority,
        "quorum queues have no priority on 3.10"
    );
    Conformance::new("rabbitmq-quorum-cluster", move || {
        let config = config.clone();
        async move { Ok(Arc::new(RabbitBroker::connect(config).await?) as Arc<dyn Broker>) }
    })
    .expect_skipped(
        "priority_order",
        "quorum queues take no priority on RabbitMQ 3.10",
    )
    .run()
    .await
    .assert_passed();
    // Every group queue the suite declared is a quorum queue with a member on each node;
    // private ones (a subscription without a group, gone with it) and the backend's own
    // queues stay classic.
    let listed = rabbitmqctl(&[
        "-n",
        cluster[0].node(),
        "list_queues",
        "name",
        "type",
        "members",
        "--no-table-headers",
        "--quiet",
    ]);
    let mut groups = 0;
    for line in listed.lines() {
        let mut fields = line.split_whitespace();
        let (Some(name), Some(kind)) = (fields.next(), fields.next()) else {
            continue;
        };
        let backend_own = name.contains(".private-")
            || name.contains(".retry.")
            || name.starts_with("helixagent.");
        if !backend_own {
            groups += 1;
            assert_eq!(kind, "quorum", "{name} is a {kind} queue");
            for node in &cluster {
                assert!(
                    line.contains(node.node()),
                    "{name} has no member on {}",
                    node.node()
                );
            }
        }
    }
    assert!(groups > 10, "the suite declared group queues:\n{listed}");
}
