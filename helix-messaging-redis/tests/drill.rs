//! The failover drill, Streams mode, on a Redis group of the test's own: a primary, one
//! replica and three sentinels (`REDIS_SENTINELS`, `REDIS_SENTINEL_MASTER`). Eight
//! publishers publish 2,500 messages each while a consumer group takes them; the primary is
//! killed (`SIGKILL`) at one third of the stream, the sentinels promote the replica, and the
//! killed server is started again once they have (it comes back as the new primary's
//! replica).
//!
//! A publish refused for now (the primary unreachable, a replica's `READONLY`, too few
//! replicas) is made again under the same id for up to a minute, as an application does.
//! What every acknowledged publish became is read back from the stream afterwards.
//!
//! Redis replicates asynchronously: an entry the primary acknowledged and had not yet sent
//! on is lost when it dies. The first drill measures that loss with the defaults. The
//! second sets `REDIS_MIN_REPLICAS_ACK=1` (a publish resolves once a replica has the entry,
//! Redis' `WAIT`) and passes only when nothing acknowledged is lost.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt;
use helix_messaging_core::{Broker, Message, Publisher, SubscribeOptions, Subscriber, TimeRange};
use helix_messaging_redis::{RedisBroker, RedisConfig, RedisMode};
use helix_messaging_testkit::faults::PrivateRedisSentinels;
use helix_messaging_testkit::{env_lookup, eventually};

const PUBLISHERS: usize = 8;
const EACH: usize = 2_500;
const TOPIC: &str = "drill";
const GROUP: &str = "workers";
/// How long one publish is made again while it is refused for now.
const PUBLISH_PATIENCE: Duration = Duration::from_secs(60);

/// When each message was first published and first delivered, and how many copies came.
#[derive(Default)]
struct Timeline {
    first_publish: HashMap<String, Instant>,
    first_delivery: HashMap<String, Instant>,
    copies: usize,
}

/// What a drill measured.
struct Figures {
    confirmed: usize,
    lost: usize,
    duplicates: usize,
    resumed: Duration,
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

    let timeline: Arc<Mutex<Timeline>> = Arc::default();
    let mut sub = broker
        .subscribe(TOPIC, SubscribeOptions::group(GROUP).with_prefetch(500))
        .await
        .unwrap();
    let consumer = {
        let timeline = timeline.clone();
        tokio::spawn(async move {
            while let Some(next) = sub.next().await {
                let Ok(delivery) = next else { continue };
                {
                    let mut timeline = timeline.lock().unwrap();
                    timeline.copies += 1;
                    timeline
                        .first_delivery
                        .entry(delivery.message().id().to_owned())
                        .or_insert_with(Instant::now);
                }
                // Acked concurrently (the prefetch window bounds how many are out), as a
                // consumer that keeps up does: a backlog left at the kill would count in the
                // time to deliver again.
                tokio::spawn(async move {
                    let _ = delivery.ack().await;
                });
            }
        })
    };

    let confirmed = Arc::new(Mutex::new(Vec::<String>::new()));
    let confirmed_at = Arc::new(Mutex::new(Vec::<Instant>::new()));
    let refused_for_now = Arc::new(Mutex::new(HashMap::<String, usize>::new()));
    let publishers: Vec<_> = (0..PUBLISHERS)
        .map(|p| {
            let (broker, confirmed, refused_for_now, timeline, confirmed_at) = (
                broker.clone(),
                confirmed.clone(),
                refused_for_now.clone(),
                timeline.clone(),
                confirmed_at.clone(),
            );
            tokio::spawn(async move {
                for i in 0..EACH {
                    let id = format!("p{p}-m{i}");
                    let started = Instant::now();
                    timeline
                        .lock()
                        .unwrap()
                        .first_publish
                        .insert(id.clone(), started);
                    loop {
                        let message = Message::new("x").with_id(id.clone());
                        match broker.publish(TOPIC, message).await {
                            Ok(()) => {
                                confirmed.lock().unwrap().push(id);
                                confirmed_at.lock().unwrap().push(Instant::now());
                                break;
                            }
                            Err(e) if e.is_retryable() && started.elapsed() < PUBLISH_PATIENCE => {
                                // Counted by kind: the messages carry ports and ids.
                                let kind = format!("{:?}", e.kind());
                                *refused_for_now.lock().unwrap().entry(kind).or_default() += 1;
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                            Err(e) => panic!("{id} refused for good: {e}"),
                        }
                    }
                }
            })
        })
        .collect();
    let total = PUBLISHERS * EACH;
    eventually(Duration::from_secs(120), "a third published", || async {
        (confirmed.lock().unwrap().len() >= total / 3).then_some(())
    })
    .await;
    let old_primary = group.primary_port();
    group.primary().crash();
    let killed_at = Instant::now();
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
    let xlen = std::process::Command::new("redis-cli")
        .args(["-p", &group.primary_port().to_string(), "XLEN", TOPIC])
        .output()
        .expect("redis-cli");
    let xlen: usize = String::from_utf8_lossy(&xlen.stdout)
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
    let confirmed = confirmed.lock().unwrap().clone();
    let lost = confirmed.iter().filter(|id| !stored.contains(*id)).count();
    eventually(
        Duration::from_secs(120),
        "every stored message delivered",
        || async {
            let timeline = timeline.lock().unwrap();
            stored
                .iter()
                .all(|id| timeline.first_delivery.contains_key(id))
                .then_some(())
        },
    )
    .await;
    let (duplicates, resumed) = {
        let timeline = timeline.lock().unwrap();
        let resumed = timeline
            .first_publish
            .iter()
            .filter(|(_, published)| **published > killed_at)
            .filter_map(|(id, _)| timeline.first_delivery.get(id))
            .min()
            .map(|delivered| delivered.duration_since(killed_at))
            .expect("a message published after the kill was delivered");
        (timeline.copies - timeline.first_delivery.len(), resumed)
    };
    eprintln!(
        "drill[redis streams, sentinel failover{}]: published {total}, acknowledged {}, lost {lost}, duplicates {duplicates}, replica promoted {promoted_in:?} after the kill, delivering again {resumed:?} after it; publishes refused for now and made again: {:?}",
        extra
            .iter()
            .map(|(k, v)| format!(", {k}={v}"))
            .collect::<String>(),
        confirmed.len(),
        refused_for_now.lock().unwrap(),
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

/// With the defaults a failover may lose what the primary acknowledged and had not yet
/// replicated; the drill reports how much. The adapter follows the failover: every publish
/// is acknowledged in the end, and delivery resumes on the new primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_is_followed_and_its_loss_without_replica_acks_is_measured() {
    let figures = drill(&[]).await;
    assert_eq!(
        figures.confirmed,
        PUBLISHERS * EACH,
        "every publish acknowledged"
    );
    // Asynchronous replication on loopback leaves a few milliseconds of publishes behind at
    // most. (Writing to the killed primary once it was back, before the sentinels demoted
    // it, lost 905 here: the resync threw them away.)
    assert!(figures.lost <= 200, "{} lost", figures.lost);
    assert!(
        figures.duplicates <= PUBLISHERS * EACH / 10,
        "{} duplicates",
        figures.duplicates
    );
    assert!(
        figures.resumed <= Duration::from_secs(10),
        "delivering again {:?} after the kill",
        figures.resumed
    );
}

/// `REDIS_MIN_REPLICAS_ACK=1`: a publish resolves only once the replica has it, so the
/// replica the sentinels promote holds everything acknowledged. Nothing is lost. The price:
/// the promoted replica has no replica of its own until the killed server rejoins as one,
/// and publishes are refused (retryably) until then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_one_replica_ack_a_failover_loses_nothing_acknowledged() {
    let figures = drill(&[("REDIS_MIN_REPLICAS_ACK", "1")]).await;
    assert_eq!(
        figures.confirmed,
        PUBLISHERS * EACH,
        "every publish acknowledged"
    );
    assert_eq!(figures.lost, 0, "acknowledged entries lost");
    assert!(
        figures.duplicates <= PUBLISHERS * EACH / 10,
        "{} duplicates",
        figures.duplicates
    );
    assert!(
        figures.resumed <= Duration::from_secs(60),
        "delivering again {:?} after the kill",
        figures.resumed
    );
}
