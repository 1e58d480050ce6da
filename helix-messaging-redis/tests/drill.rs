//! The failover drill, Streams mode, on a Redis group of the test's own: a primary, one
//! replica and three sentinels (`REDIS_SENTINELS`, `REDIS_SENTINEL_MASTER`). Eight
//! publishers publish 2,500 messages each while a consumer group takes them. At one third
//! of the stream the replica is frozen and cut off for half a second (falling behind, as a
//! replica cut off by its network does), then the primary is killed (`SIGKILL`) and the replica let
//! go; the sentinels promote it, and the killed server is started again once they have (it
//! comes back as the new primary's replica).
//!
//! A publish refused for now (the primary unreachable, a replica's `READONLY`, too few
//! replicas) is made again under the same id for up to a minute, as an application does.
//! What every acknowledged publish became is read back from the stream afterwards.
//!
//! Redis replicates asynchronously: an entry the primary acknowledged and had not yet sent
//! on is lost when it dies. The first drill measures that loss with the defaults (and fails
//! if there is none: then it would show nothing). The
//! second sets `REDIS_MIN_REPLICAS_ACK=1` (a publish resolves once a replica has the entry,
//! Redis' `WAIT`) and passes only when nothing acknowledged is lost.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt;
use helix_messaging_core::{Broker, Message, Publisher, SubscribeOptions, Subscriber, TimeRange};
use helix_messaging_redis::{RedisBroker, RedisConfig, RedisMode};
use helix_messaging_testkit::drill::Drill;
use helix_messaging_testkit::faults::{PrivateRedisSentinels, redis_cli};
use helix_messaging_testkit::{env_lookup, eventually};

const PUBLISHERS: usize = 8;
const EACH: usize = 2_500;
const TOPIC: &str = "drill";
const GROUP: &str = "workers";
/// How long the replica is frozen before the primary dies.
const REPLICA_BEHIND: Duration = Duration::from_millis(500);
/// How long one publish is made again while it is refused for now.
const PUBLISH_PATIENCE: Duration = Duration::from_secs(60);

/// What a drill measured.
struct Figures {
    confirmed: usize,
    lost: usize,
    duplicates: usize,
    resumed: Duration,
}

impl Figures {
    /// What both drills demand: every publish acknowledged in the end, duplicates under
    /// 10%, and a message published after the kill delivered within `resume_limit`.
    fn assert_followed(&self, resume_limit: Duration) {
        assert_eq!(
            self.confirmed,
            PUBLISHERS * EACH,
            "every publish acknowledged"
        );
        assert!(
            self.duplicates <= PUBLISHERS * EACH / 10,
            "{} duplicates",
            self.duplicates
        );
        assert!(
            self.resumed <= resume_limit,
            "delivering again {:?} after the kill",
            self.resumed
        );
    }
}

async fn drill(extra: &[(&str, &str)]) -> Figures {
    let mut group = PrivateRedisSentinels::start();
    let sentinels = group.sentinels();
    let mut vars = vec![
        ("REDIS_SENTINELS", sentinels.as_str()),
        ("REDIS_SENTINEL_MASTER", PrivateRedisSentinels::MASTER),
    ];
    vars.extend_from_slice(extra);
    let mut config = RedisConfig::from_vars(env_lookup(&vars), RedisMode::Streams).unwrap();
    config.max_reconnect_delay = Duration::from_millis(500);
    let broker = Arc::new(RedisBroker::connect(config).await.unwrap());

    let drill = Drill::new(PUBLISH_PATIENCE);
    let sub = broker
        .subscribe(TOPIC, SubscribeOptions::group(GROUP).with_prefetch(500))
        .await
        .unwrap();
    // Acks run concurrently, as a consumer that keeps up acks: a backlog left at the kill
    // would count in the time to deliver again.
    let consumer = drill.record_deliveries(sub, true);

    let publishers: Vec<_> = (0..PUBLISHERS)
        .map(|p| {
            let (broker, drill) = (broker.clone(), drill.clone());
            tokio::spawn(async move {
                for i in 0..EACH {
                    let id = format!("p{p}-m{i}");
                    let message = || Message::new("x");
                    drill.publish(&*broker, TOPIC, &id, message).await;
                }
            })
        })
        .collect();
    let total = PUBLISHERS * EACH;
    eventually(Duration::from_secs(120), "a third published", || async {
        (drill.outcomes.settled() >= total / 3).then_some(())
    })
    .await;
    // The replica falls half a second behind (frozen, its link to the primary dropped) just
    // before the primary dies: what the primary acknowledged meanwhile is on no replica, as
    // with a replica cut off by its network. Asynchronous replication loses exactly that.
    let old_primary = group.primary_port();
    let replica = group
        .servers
        .iter()
        .position(|server| server.port() != old_primary)
        .expect("the replica");
    group.servers[replica].pause();
    // Its link dropped too: what the primary had already sent waits in the frozen
    // replica's socket and would still reach it; from here on nothing does.
    let dropped = redis_cli(old_primary, &["CLIENT", "KILL", "TYPE", "replica"]);
    assert_eq!(dropped.trim(), "1", "the replica's link dropped");
    tokio::time::sleep(REPLICA_BEHIND).await;
    group.primary().crash();
    let killed_at = Instant::now();
    group.servers[replica].resume();
    eventually(
        Duration::from_secs(60),
        "the sentinels promoted the replica",
        || async { (group.primary_port() != old_primary).then_some(()) },
    )
    .await;
    let promoted_in = killed_at.elapsed();
    // Back, the killed server becomes the new primary's replica.
    group
        .servers
        .iter_mut()
        .find(|server| server.port() == old_primary)
        .expect("the killed server")
        .restart();
    for publisher in publishers {
        publisher.await.unwrap();
    }

    // The stream is on the group's primary (the sentinels' choice), not elsewhere.
    let xlen: usize = redis_cli(group.primary_port(), &["XLEN", TOPIC])
        .trim()
        .parse()
        .unwrap_or(0);
    assert!(
        xlen >= total / 2,
        "the primary holds {xlen} entries of {TOPIC}"
    );

    // What the stream holds now, read back whole from the primary.
    let stored: std::collections::HashSet<String> = broker
        .read_range(
            TOPIC,
            TimeRange::new(
                SystemTime::UNIX_EPOCH,
                SystemTime::now() + Duration::from_secs(1),
            )
            .unwrap(),
        )
        .await
        .unwrap()
        .map(|entry| entry.unwrap().message.id().to_owned())
        .collect()
        .await;
    let confirmed = drill.outcomes.acknowledged();
    let lost = confirmed.iter().filter(|id| !stored.contains(*id)).count();
    eventually(
        Duration::from_secs(120),
        "every stored message delivered",
        || async { drill.timeline.all_delivered(&stored).then_some(()) },
    )
    .await;
    let duplicates = drill.timeline.duplicates();
    let resumed = drill
        .timeline
        .resumed_after(killed_at, None)
        .expect("a message published after the kill was delivered");
    eprintln!(
        "drill[redis streams, sentinel failover{}]: published {total}, acknowledged {}, lost {lost}, duplicates {duplicates}, replica promoted {promoted_in:?} after the kill, delivering again {resumed:?} after it; publishes refused for now and made again, by kind: {:?}",
        extra
            .iter()
            .map(|(k, v)| format!(", {k}={v}"))
            .collect::<String>(),
        confirmed.len(),
        drill.outcomes.refused_for_now(),
    );
    broker.close().await.unwrap();
    consumer.await.unwrap();
    Figures {
        confirmed: confirmed.len(),
        lost,
        duplicates,
        resumed,
    }
}

/// With the defaults a failover loses what the primary acknowledged and had not yet
/// replicated (here, half a second of publishes its frozen replica missed); the drill
/// reports how much. The adapter follows the failover: every publish
/// is acknowledged in the end, and delivery resumes on the new primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_is_followed_and_its_loss_without_replica_acks_is_measured() {
    let figures = drill(&[]).await;
    figures.assert_followed(Duration::from_secs(10));
    // What the primary acknowledged while its replica was frozen is gone with it: the drill
    // does show the loss `REDIS_MIN_REPLICAS_ACK` prevents.
    assert!(figures.lost > 0, "nothing lost: the replica was not behind");
}

/// `REDIS_MIN_REPLICAS_ACK=1`: a publish resolves only once the replica has it, so the
/// replica the sentinels promote holds everything acknowledged. Nothing is lost. The price:
/// the promoted replica has no replica of its own until the killed server rejoins as one,
/// and publishes are refused (retryably) until then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_one_replica_ack_a_failover_loses_nothing_acknowledged() {
    let figures = drill(&[("REDIS_MIN_REPLICAS_ACK", "1")]).await;
    // Publishing waits for the killed server to rejoin as a replica.
    figures.assert_followed(Duration::from_secs(60));
    assert_eq!(figures.lost, 0, "acknowledged entries lost");
}

/// Pub/sub through the sentinels, across a planned switchover (`SENTINEL FAILOVER`: the
/// replica becomes primary, the old primary its replica). A `PUBLISH` on the old primary
/// would be taken without a word and reach only its own subscribers: the publishing
/// connection, closed by the switchover, must connect again to the one the sentinels name,
/// not to the address it had. The subscription goes on receiving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_follows_a_planned_switchover() {
    let group = PrivateRedisSentinels::start();
    let sentinels = group.sentinels();
    let mut config = RedisConfig::from_vars(
        env_lookup(&[
            ("REDIS_SENTINELS", sentinels.as_str()),
            ("REDIS_SENTINEL_MASTER", PrivateRedisSentinels::MASTER),
        ]),
        RedisMode::PubSub,
    )
    .unwrap();
    config.max_reconnect_delay = Duration::from_millis(200);
    let broker = RedisBroker::connect(config).await.unwrap();
    let mut sub = broker
        .subscribe("switchover", SubscribeOptions::default())
        .await
        .unwrap();
    // Until the subscription is back on the primary, a publish may reach nobody there:
    // publish until one arrives.
    let publish_until_received = async |sub: &mut helix_messaging_core::Subscription,
                                        label: &str| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            assert!(
                Instant::now() < deadline,
                "nothing arrived on the {label} primary within 30 s"
            );
            let _ = broker
                .publish("switchover", Message::new(label.to_owned()))
                .await;
            if let Ok(Some(Ok(delivery))) =
                tokio::time::timeout(Duration::from_millis(500), sub.next()).await
            {
                return delivery.message().payload().clone();
            }
        }
    };
    let first = group.primary_port();
    assert_eq!(
        publish_until_received(&mut sub, "first").await,
        "first".as_bytes()
    );
    let switched = redis_cli(
        group.sentinel_ports()[0],
        &["SENTINEL", "FAILOVER", PrivateRedisSentinels::MASTER],
    );
    assert_eq!(switched.trim(), "OK");
    eventually(
        Duration::from_secs(30),
        "the sentinels switched the primary",
        || async { (group.primary_port() != first).then_some(()) },
    )
    .await;
    // The publishes went to the new primary. (The subscription may stay on the old one,
    // now a replica: the switchover closes normal clients, not subscribers, and a replica
    // receives every PUBLISH of its primary through replication, so it keeps receiving.)
    let publishes_on = |port: u16| {
        redis_cli(port, &["INFO", "commandstats"])
            .lines()
            .find_map(|line| line.strip_prefix("cmdstat_publish:calls="))
            .and_then(|rest| rest.split(',').next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // What the new primary had run before (as a replica, what replication brought it).
    let before = publishes_on(group.primary_port());
    let switched_at = Instant::now();
    eventually(
        Duration::from_secs(30),
        "a publish on the new primary",
        || async {
            let _ = broker.publish("switchover", Message::new("second")).await;
            (publishes_on(group.primary_port()) > before).then_some(())
        },
    )
    .await;
    eprintln!(
        "switchover: publishing on the new primary {:?} after the sentinels named it",
        switched_at.elapsed()
    );
    // And the subscription goes on receiving (on the new primary, or on the old one once
    // it replicates from the new).
    let third = loop {
        let payload = publish_until_received(&mut sub, "third").await;
        if payload == "third".as_bytes() {
            break payload;
        }
    };
    assert_eq!(third, "third".as_bytes());
    broker.close().await.unwrap();
}
