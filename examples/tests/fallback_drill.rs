//! The fallback drill, against the real RabbitMQ (its application stopped and started) and
//! Redis Streams (a private server, crashed and restarted): 10,000 publishes made while the
//! broker is away, the publisher killed with SIGKILL partway and started again, then the
//! broker back. Afterwards every publish is accounted for:
//! `delivered + dead-lettered + rejected-to-caller == published`, nothing rejected is
//! delivered, and nothing accepted is missing.
//!
//! The publisher is the `spool_publisher` program (the hub from the environment, fallback
//! on, spool bounded at 9,000 messages so the last publishes are refused loudly). The
//! consumer is a hub in this test: every tenth task has a 500 ms deadline the outage makes
//! it miss, every tenth event is poison its handler refuses; both kinds are dead-lettered.
#![cfg(all(feature = "rabbitmq", feature = "redis"))]

use std::collections::{BTreeSet, HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use helix_messaging::dlq::{DeadLetterConfig, HEADER_ORIGINAL_ID, HEADER_REASON};
use helix_messaging::hub::{Event, Hub, HubConfig, Task};
use helix_messaging::{HandlerError, SubscribeOptions};
use helix_messaging_testkit::eventually;
use helix_messaging_testkit::faults::{
    KeepRabbitMqRunning, PrivateRedis, TestVhost, start_rabbitmq, stop_rabbitmq,
};

const PUBLISHES: u64 = 10_000;
const SPOOL_LIMIT: u64 = 9_000;
/// The first publisher is killed once this many publishes have an outcome.
const KILL_AFTER: usize = 4_000;

/// What the publisher processes printed.
#[derive(Default)]
struct Printed {
    ok: BTreeSet<u64>,
    /// Index and the error the caller got.
    rejected: Vec<(u64, String)>,
    published: bool,
    drained: bool,
}

impl Printed {
    fn outcomes(&self) -> usize {
        self.ok.len() + self.rejected.len()
    }

    fn last(&self) -> Option<u64> {
        let last_rejected = self.rejected.iter().map(|(i, _)| *i).max();
        self.ok.iter().next_back().copied().max(last_rejected)
    }
}

/// A publisher process, killed when dropped so a failing drill leaves none behind.
struct Publisher(Child);

impl Drop for Publisher {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A `spool_publisher` process whose output is read into `printed` as it comes.
fn spawn_publisher(
    env: &[(String, String)],
    args: &[&str],
    printed: &Arc<Mutex<Printed>>,
) -> Publisher {
    let mut child = Command::new(env!("CARGO_BIN_EXE_spool_publisher"))
        .args(args)
        .env_remove("MESSAGING_BACKEND")
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("SPOOL_PUBLISHER_DRAIN_SECS", "240")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spool_publisher runs");
    let stdout = child.stdout.take().expect("piped");
    let printed = printed.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            let mut printed = printed.lock().unwrap();
            let mut words = line.splitn(3, ' ');
            match (words.next(), words.next(), words.next()) {
                (Some("ok"), Some(i), None) => {
                    printed.ok.insert(i.parse().expect("an index"));
                }
                (Some("rejected"), Some(i), Some(err)) => {
                    printed
                        .rejected
                        .push((i.parse().expect("an index"), err.to_owned()));
                }
                (Some("published"), _, _) => printed.published = true,
                (Some("drained"), None, None) => printed.drained = true,
                _ => panic!("unexpected publisher output: {line}"),
            }
        }
    });
    Publisher(child)
}

/// The drill's waits for its stages, all together. A drill whose stages overrun fails here,
/// where unwinding starts the broker again, rather than being killed with the broker down
/// for the rest of the suite: the runner's limit for this binary (12 minutes, in
/// `.config/nextest.toml`) leaves room after it for taking the broker away and bringing it
/// back, which are bounded apart (a hung `start_app` is given up on and the node started
/// afresh, a few minutes at worst).
const DRILL_LIMIT: Duration = Duration::from_secs(270);

/// Wait until `check` holds, for at most `limit` and never past `deadline` (the testkit's
/// `eventually`, for a plain condition). Says how long it took, so a slow drill's output
/// shows where its time went.
async fn until(what: &str, limit: Duration, deadline: Instant, check: impl Fn() -> bool) {
    let started = Instant::now();
    let left = deadline.saturating_duration_since(started);
    assert!(
        !left.is_zero(),
        "{what}: the drill's {DRILL_LIMIT:?} ran out before it"
    );
    let limit = limit.min(left);
    eventually(limit, what, || std::future::ready(check().then_some(()))).await;
    eprintln!("{what}: {:?}", started.elapsed());
}

/// The broker taken away and brought back.
enum Outage {
    RabbitMq(KeepRabbitMqRunning),
    Redis(PrivateRedis),
}

impl Outage {
    async fn begin(&mut self) {
        match self {
            Outage::RabbitMq(_) => stop_rabbitmq().await,
            Outage::Redis(redis) => redis.crash(),
        }
    }

    async fn end(&mut self) {
        match self {
            Outage::RabbitMq(_) => start_rabbitmq().await,
            Outage::Redis(redis) => redis.restart(),
        }
    }
}

/// Which side of the hub the drill exercises.
#[derive(Clone, Copy, PartialEq)]
enum Side {
    Tasks,
    Events,
}

/// Ids the consumer handled (and how many copies in all) and dead-lettered (id → reason).
#[derive(Default)]
struct Consumed {
    handled: HashSet<String>,
    copies: usize,
    dead: HashMap<String, String>,
}

impl Consumed {
    fn handle(&mut self, id: String) {
        self.copies += 1;
        self.handled.insert(id);
    }
}

async fn drill(
    side: Side,
    broker_url: &str,
    mut outage: Outage,
    publisher_env: Vec<(String, String)>,
) {
    let deadline = Instant::now() + DRILL_LIMIT;
    let run = format!("drill{}", uuid::Uuid::new_v4().simple());
    let topic = match side {
        Side::Tasks => "helixagent.tasks.drill",
        Side::Events => "helixagent.events.drill",
    };
    let dlq_topic = format!("{topic}.dlq");
    let broker = helix_messaging::connect(broker_url)
        .await
        .expect("the broker");
    let memory = helix_messaging::connect("memory://").await.unwrap();
    let (tasks, events) = match side {
        Side::Tasks => (broker.clone(), memory),
        Side::Events => (memory, broker.clone()),
    };
    let hub = Hub::new(
        HubConfig {
            task_group: "drill-workers".into(),
            dead_letters: DeadLetterConfig::new(&dlq_topic).unwrap(),
            ..HubConfig::default()
        },
        tasks,
        events,
        None,
    )
    .await
    .unwrap();
    let consumed: Arc<Mutex<Consumed>> = Arc::default();
    let mut dead = broker
        .subscribe(&dlq_topic, SubscribeOptions::group("inspect"))
        .await
        .unwrap();
    let sink = consumed.clone();
    tokio::spawn(async move {
        while let Some(item) = dead.next().await {
            let Ok(d) = item else { continue };
            let m = d.message();
            let id = m.header(HEADER_ORIGINAL_ID).unwrap_or_default().to_owned();
            let reason = m.header(HEADER_REASON).unwrap_or_default().to_owned();
            sink.lock().unwrap().dead.insert(id, reason);
            let _ = d.ack().await;
        }
    });
    let sink = consumed.clone();
    let runner = match side {
        Side::Tasks => hub
            .subscribe_tasks(topic, move |task: Task, _| {
                let sink = sink.clone();
                async move {
                    sink.lock().unwrap().handle(task.id);
                    Ok(())
                }
            })
            .await
            .unwrap(),
        Side::Events => hub
            .subscribe_events(
                topic,
                move |event: Event, _| {
                    let sink = sink.clone();
                    async move {
                        if event.data["poison"] == true {
                            return Err(HandlerError::permanent("poison event"));
                        }
                        sink.lock().unwrap().handle(event.id);
                        Ok(())
                    }
                },
                "drill-audit",
            )
            .await
            .unwrap(),
    };

    let began = Instant::now();
    outage.begin().await;
    eprintln!("broker taken away: {:?}", began.elapsed());
    let spool = tempfile::tempdir().unwrap();
    let mut env = publisher_env;
    env.extend([
        ("MESSAGING_FALLBACK_ENABLED".into(), "true".into()),
        (
            "MESSAGING_FALLBACK_DIR".into(),
            spool.path().display().to_string(),
        ),
        (
            "MESSAGING_FALLBACK_MAX_MESSAGES".into(),
            SPOOL_LIMIT.to_string(),
        ),
        // The spool forwards from the first successful probe on; the default 30 s open
        // interval would have the drill wait most of it after the broker is back.
        ("MESSAGING_BREAKER_OPEN_MS".into(), "2000".into()),
    ]);
    let kind = match side {
        Side::Tasks => "tasks",
        Side::Events => "events",
    };
    let to = PUBLISHES.to_string();
    let printed: Arc<Mutex<Printed>> = Arc::default();
    let mut first = spawn_publisher(&env, &[kind, topic, &run, "0", &to], &printed);
    until(
        "the first publisher's outcomes",
        Duration::from_secs(120),
        deadline,
        || printed.lock().unwrap().outcomes() >= KILL_AFTER,
    )
    .await;
    first.0.kill().expect("SIGKILL");
    first.0.wait().unwrap();
    let killed_at = {
        let printed = printed.lock().unwrap();
        assert!(!printed.published, "killed before it finished");
        printed.last().expect("outcomes printed")
    };
    // The publish it may have been killed in is made again, under the same id.
    let from = (killed_at + 1).to_string();
    let mut second = spawn_publisher(&env, &[kind, topic, &run, &from, &to], &printed);
    until(
        "the second publisher's publishes",
        Duration::from_secs(180),
        deadline,
        || printed.lock().unwrap().published,
    )
    .await;
    // Every deadline task (500 ms) expires in the outage.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let ending = Instant::now();
    outage.end().await;
    eprintln!("broker back: {:?}", ending.elapsed());
    let started = Instant::now();
    until(
        "the spool forwarded",
        Duration::from_secs(240),
        deadline,
        || printed.lock().unwrap().drained,
    )
    .await;
    let forwarded_in = started.elapsed();
    let status = second.0.wait().unwrap();
    assert!(status.success(), "the second publisher failed: {status}");

    let (ok, rejected) = {
        let printed = printed.lock().unwrap();
        (printed.ok.clone(), printed.rejected.clone())
    };
    let rejected_ids: BTreeSet<u64> = rejected.iter().map(|(i, _)| *i).collect();
    assert_eq!(
        ok.len() + rejected.len(),
        PUBLISHES as usize,
        "one outcome per publish"
    );
    assert!(ok.is_disjoint(&rejected_ids));
    for (i, err) in &rejected {
        assert!(err.contains("spool is full"), "publish {i} refused: {err}");
    }
    // The publish the kill interrupted may have been spooled too, taking one place.
    let refused = rejected.len() as u64;
    assert!(
        (PUBLISHES - SPOOL_LIMIT..=PUBLISHES - SPOOL_LIMIT + 1).contains(&refused),
        "{refused} refused"
    );
    let id = |i: &u64| format!("{run}-{i}");
    let accepted: BTreeSet<String> = ok.iter().map(id).collect();
    until(
        "every accepted publish delivered or dead-lettered",
        Duration::from_secs(180),
        deadline,
        || {
            let consumed = consumed.lock().unwrap();
            accepted
                .iter()
                .all(|id| consumed.dead.contains_key(id) || consumed.handled.contains(id))
        },
    )
    .await;
    runner.shutdown().await;

    let consumed = std::mem::take(&mut *consumed.lock().unwrap());
    let handled: BTreeSet<String> = consumed.handled.iter().cloned().collect();
    let dead: BTreeSet<String> = consumed.dead.keys().cloned().collect();
    let duplicates = consumed.copies - handled.len();
    eprintln!(
        "{kind} drill: {PUBLISHES} published, {} delivered ({duplicates} duplicate copies), {} dead-lettered, {refused} rejected to the caller; publisher killed after publish {killed_at}; spool forwarded {forwarded_in:?} after the broker was back",
        handled.len(),
        dead.len()
    );
    assert!(
        handled.is_disjoint(&dead),
        "handled or dead-lettered, not both"
    );
    let all: BTreeSet<String> = handled.union(&dead).cloned().collect();
    assert_eq!(all, accepted, "exactly the accepted publishes arrived");
    assert_eq!(
        handled.len() + dead.len() + rejected.len(),
        PUBLISHES as usize,
        "delivered + dead-lettered + rejected-to-caller == published"
    );
    let want_dead: BTreeSet<String> = ok.iter().filter(|i| *i % 10 == 0).map(id).collect();
    assert_eq!(
        dead, want_dead,
        "the expired tasks or poison events, only they"
    );
    let want_reason = match side {
        Side::Tasks => "deadline exceeded",
        Side::Events => "permanent failure",
    };
    for (id, reason) in &consumed.dead {
        assert_eq!(reason, want_reason, "{id}");
    }
    assert!(
        ok.iter().any(|i| *i < killed_at),
        "the killed publisher's spooled publishes were forwarded by the second"
    );
    hub.close().await.unwrap();
    broker.close().await.unwrap();
}

/// Tasks on RabbitMQ, its application stopped for the whole publishing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drill_on_rabbitmq_accounts_for_every_publish() {
    let vhost = TestVhost::new("helix-drill");
    let url = vhost.url();
    drill(
        Side::Tasks,
        &url,
        Outage::RabbitMq(KeepRabbitMqRunning),
        vec![
            ("MESSAGING_TASK_BACKEND".into(), "rabbitmq".into()),
            ("MESSAGING_EVENT_BACKEND".into(), "memory".into()),
            ("RABBITMQ_URL".into(), url.clone()),
        ],
    )
    .await;
}

/// Events on Redis Streams, a private server crashed for the whole publishing and
/// restarted from its append-only file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drill_on_redis_streams_accounts_for_every_publish() {
    let redis = PrivateRedis::start();
    let url = redis.url();
    drill(
        Side::Events,
        &url.replacen("redis://", "redis-streams://", 1),
        Outage::Redis(redis),
        vec![
            ("MESSAGING_TASK_BACKEND".into(), "memory".into()),
            ("MESSAGING_EVENT_BACKEND".into(), "redis-streams".into()),
            ("REDIS_URL".into(), url.clone()),
        ],
    )
    .await;
}
