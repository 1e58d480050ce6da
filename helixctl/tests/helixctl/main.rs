//! `helixctl` run as a process against a running admin API over the real Redis Streams
//! (DLQ processor, replay handler), and `tail` on the real Redis; `safety` holds issue 29's
//! tests (tokens, https, ids in paths, JSON errors), `common` the helpers they share.

mod common;
mod safety;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use helix_messaging_admin::{AdminConfig, Services};
use helix_messaging_core::dlq::{
    DeadLetter, DeadLetterReason, MemoryDeadLetterStore, Processor, ProcessorConfig,
};
use helix_messaging_core::hub::{Hub, HubConfig};
use helix_messaging_core::replay::{ReplayConfig, ReplayHandler};
use helix_messaging_core::{Broker, DeliveryInfo, Message, SubscribeOptions};
use serde_json::Value;

use crate::common::{TOKEN, failed, helixctl, ok_json};

struct Fixture {
    url: String,
    broker: Arc<dyn Broker>,
    dead: Vec<String>,
    /// Holds 4 messages.
    topic: String,
    /// Where the dead letters failed.
    tasks: String,
}

fn redis_streams_url() -> String {
    std::env::var("REDIS_URL")
        .unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
        .replacen("redis://", "redis-streams://", 1)
}

/// A name no earlier run used (the Redis is shared).
fn fresh(prefix: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{prefix}.{nanos}")
}

/// An admin API on a free port over the real Redis Streams, whose `topic` holds 4 messages
/// and whose DLQ holds 2 entries.
async fn fixture() -> Fixture {
    let broker = helix_messaging::connect(&redis_streams_url())
        .await
        .expect("Redis");
    let topic = fresh("ctl.events");
    let tasks = fresh("ctl.tasks");
    for i in 0..4 {
        broker
            .publish(&topic, Message::new(format!("e{i}")))
            .await
            .unwrap();
    }
    let processor = Processor::new(
        broker.clone(),
        Arc::new(MemoryDeadLetterStore::new()),
        ProcessorConfig::default(),
    )
    .unwrap();
    let info = DeliveryInfo {
        topic: tasks.as_str().into(),
        group: Some("workers".into()),
        attempt: 1,
        redelivered: false,
        position: None,
    };
    let mut dead = Vec::new();
    for payload in ["first", "second"] {
        let now = SystemTime::now();
        let letter = DeadLetter::new(
            &Message::new(payload),
            &info,
            DeadLetterReason::Permanent,
            "refused",
            now,
            now,
        );
        dead.push(letter.id.clone());
        processor.ingest(letter).await.unwrap();
    }
    let hub = Hub::new(HubConfig::default(), broker.clone(), broker.clone(), None)
        .await
        .unwrap();
    let services = Services::new(hub)
        .with_dlq(processor)
        .with_replay(ReplayHandler::new(broker.clone(), ReplayConfig::default()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(helix_messaging_admin::serve_listener(
        listener,
        AdminConfig::new(TOKEN).unwrap(),
        services,
        std::future::pending(),
    ));
    Fixture {
        url,
        broker,
        dead,
        topic,
        tasks,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_in_text_and_json_and_clear_failures_for_auth_and_connection() {
    let f = fixture().await;
    let text = helixctl(&f.url, Some(TOKEN), &["health"]).await;
    assert!(text.status.success());
    let text = String::from_utf8(text.stdout).unwrap();
    assert!(text.starts_with("healthy\ntasks:  healthy"), "{text}");
    let json = ok_json(&helixctl(&f.url, Some(TOKEN), &["health", "--json"]).await);
    assert_eq!(json["events"]["status"], "healthy");

    let wrong = helixctl(&f.url, Some("nope"), &["health"]).await;
    failed(&wrong, 3, "authentication failed");
    failed(&helixctl(&f.url, None, &["health"]).await, 3, "no token");
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let nowhere = format!("http://{free}");
    failed(
        &helixctl(&nowhere, Some(TOKEN), &["health"]).await,
        4,
        "cannot reach the admin API",
    );
    failed(
        &helixctl(&f.url, Some(TOKEN), &["dlq", "frobnicate"]).await,
        2,
        "",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_list_show_reprocess_and_discard() {
    let f = fixture().await;
    let page = ok_json(&helixctl(&f.url, Some(TOKEN), &["dlq", "list", "--json"]).await);
    assert_eq!(page["count"], 2, "{page}");
    let text = helixctl(&f.url, Some(TOKEN), &["dlq", "list", "--limit", "1"]).await;
    let text = String::from_utf8(text.stdout).unwrap();
    assert_eq!(text.lines().count(), 2, "the count and one entry: {text}");
    assert!(text.starts_with("2 entries\n"), "{text}");

    let (first, second) = (f.dead[0].as_str(), f.dead[1].as_str());
    let entry = ok_json(&helixctl(&f.url, Some(TOKEN), &["dlq", "show", first, "--json"]).await);
    assert_eq!(entry["message"]["payload"], "first");

    let mut sub = f
        .broker
        .subscribe(&f.tasks, SubscribeOptions::group("workers"))
        .await
        .unwrap();
    let out = helixctl(&f.url, Some(TOKEN), &["dlq", "reprocess", first]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim(),
        format!("{first} reprocessed")
    );
    let delivery = tokio::time::timeout(Duration::from_secs(10), futures_next(&mut sub))
        .await
        .expect("the reprocessed message within 10 s");
    assert_eq!(&delivery.message().payload()[..], b"first");
    delivery.ack().await.unwrap();

    let done = ok_json(
        &helixctl(
            &f.url,
            Some(TOKEN),
            &["dlq", "discard", second, "--reason", "bad data", "--json"],
        )
        .await,
    );
    assert_eq!(done["status"], "discarded");
    let entry = ok_json(&helixctl(&f.url, Some(TOKEN), &["dlq", "show", second, "--json"]).await);
    assert_eq!(entry["discard_reason"], "bad data");
    failed(
        &helixctl(&f.url, Some(TOKEN), &["dlq", "show", first]).await,
        1,
        "404",
    );
}

async fn futures_next(
    sub: &mut helix_messaging_core::Subscription,
) -> helix_messaging_core::Delivery {
    use futures::StreamExt;
    sub.next().await.expect("open").expect("a delivery")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_groups_and_redrive_start_wait_status_list_and_cancel() {
    let f = fixture().await;
    let groups = ok_json(&helixctl(&f.url, Some(TOKEN), &["dlq", "groups", "--json"]).await);
    assert_eq!(groups["count"], 1, "{groups}");
    assert_eq!(groups["groups"][0]["count"], 2, "{groups}");
    let text = helixctl(&f.url, Some(TOKEN), &["dlq", "groups", "--topic", &f.tasks]).await;
    let text = String::from_utf8(text.stdout).unwrap();
    assert!(
        text.starts_with("1 groups\n     2  permanent failure  "),
        "{text}"
    );
    let none = ok_json(
        &helixctl(
            &f.url,
            Some(TOKEN),
            &["dlq", "groups", "--reason", "undecodable_payload", "--json"],
        )
        .await,
    );
    assert_eq!(none["count"], 0, "{none}");

    let mut sub = f
        .broker
        .subscribe(&f.tasks, SubscribeOptions::group("workers"))
        .await
        .unwrap();
    let done = ok_json(
        &helixctl(
            &f.url,
            Some(TOKEN),
            &[
                "dlq",
                "redrive",
                "start",
                "--topic",
                &f.tasks,
                "--batch-size",
                "1",
                "--wait",
                "--json",
            ],
        )
        .await,
    );
    assert_eq!(done["status"], "completed", "--wait follows it: {done}");
    assert_eq!(done["redriven"], 2, "{done}");
    let mut payloads = Vec::new();
    for _ in 0..2 {
        let delivery = tokio::time::timeout(Duration::from_secs(10), futures_next(&mut sub))
            .await
            .expect("a re-driven message within 10 s");
        payloads.push(String::from_utf8(delivery.message().payload().to_vec()).unwrap());
        delivery.ack().await.unwrap();
    }
    payloads.sort();
    assert_eq!(payloads, ["first", "second"]);
    let id = done["id"].as_str().unwrap();
    let status = helixctl(&f.url, Some(TOKEN), &["dlq", "redrive", "status", id]).await;
    let status = String::from_utf8(status.stdout).unwrap();
    assert!(
        status.starts_with(&format!("{id}  completed  total 2  redriven 2")),
        "{status}"
    );
    let all = ok_json(&helixctl(&f.url, Some(TOKEN), &["dlq", "redrive", "list", "--json"]).await);
    assert_eq!(all["count"], 1, "{all}");
    let cancelled = ok_json(
        &helixctl(
            &f.url,
            Some(TOKEN),
            &["dlq", "redrive", "cancel", id, "--json"],
        )
        .await,
    );
    assert_eq!(
        cancelled["status"], "completed",
        "a finished job stays finished"
    );
    failed(
        &helixctl(&f.url, Some(TOKEN), &["dlq", "redrive", "status", "nope"]).await,
        1,
        "404",
    );
    failed(
        &helixctl(
            &f.url,
            Some(TOKEN),
            &[
                "dlq", "redrive", "start", "--topic", &f.tasks, "--rate", "0",
            ],
        )
        .await,
        1,
        "rate_per_second",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_start_wait_status_list_and_cancel() {
    let f = fixture().await;
    let started = ok_json(
        &helixctl(
            &f.url,
            Some(TOKEN),
            &[
                "replay",
                "start",
                "--topic",
                &f.topic,
                "--from",
                "2000-01-01T00:00:00Z",
                "--to",
                "2100-01-01T00:00:00Z",
                "--id",
                "ctl-replay",
                "--wait",
                "--json",
            ],
        )
        .await,
    );
    assert_eq!(
        started["status"], "completed",
        "--wait follows it to the end: {started}"
    );
    assert_eq!(started["replayed"], 4, "{started}");
    let status = helixctl(&f.url, Some(TOKEN), &["replay", "status", "ctl-replay"]).await;
    let status = String::from_utf8(status.stdout).unwrap();
    let expected = format!(
        "ctl-replay  completed  {0} -> {0}.replay  total 4  replayed 4",
        f.topic
    );
    assert!(status.starts_with(&expected), "{status}");
    let all = ok_json(&helixctl(&f.url, Some(TOKEN), &["replay", "list", "--json"]).await);
    assert_eq!(all["count"], 1);
    let cancelled = ok_json(
        &helixctl(
            &f.url,
            Some(TOKEN),
            &["replay", "cancel", "ctl-replay", "--json"],
        )
        .await,
    );
    assert_eq!(
        cancelled["status"], "completed",
        "a finished replay stays finished"
    );
    failed(
        &helixctl(&f.url, Some(TOKEN), &["replay", "status", "nope"]).await,
        1,
        "404",
    );
    failed(
        &helixctl(
            &f.url,
            Some(TOKEN),
            &[
                "replay", "start", "--topic", "t", "--from", "soon", "--to", "later",
            ],
        )
        .await,
        1,
        "400",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_prints_what_is_published_on_redis_streams() {
    // Streams: they carry the message id (plain pub/sub carries the payload alone).
    let redis = redis_streams_url();
    let topic = fresh("ctl.tail");
    let mut child = Command::new(env!("CARGO_BIN_EXE_helixctl"))
        .args(["tail", &topic, "--broker", &redis, "--count", "2", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let ready = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        stderr.read_line(&mut line).unwrap();
        line
    });
    let line = tokio::time::timeout(Duration::from_secs(30), ready)
        .await
        .expect("tail subscribed within 30 s")
        .unwrap();
    assert!(line.starts_with("tailing"), "{line}");
    let broker = helix_messaging::connect(&redis).await.unwrap();
    for payload in ["one", "two"] {
        broker
            .publish(
                &topic,
                Message::new(payload).with_id(format!("id-{payload}")),
            )
            .await
            .unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let output = tokio::task::spawn_blocking(move || {
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                let mut out = String::new();
                std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut out).unwrap();
                return Some((status, out));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    })
    .await
    .unwrap();
    let (status, out) = output.expect("tail stopped after 2 messages within 30 s");
    assert!(status.success());
    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert_eq!(lines[0]["payload"], "one");
    assert_eq!(lines[1]["id"], "id-two");
    broker.close().await.unwrap();
}

/// helixctl logs as `RUST_LOG`, else `LOG_LEVEL` with `MESSAGING_DEBUG`, say; a malformed
/// value is a usage error naming the variable, before anything is asked of the API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_log_level_is_a_usage_error_naming_it() {
    for (var, value) in [("LOG_LEVEL", "verbose"), ("MESSAGING_DEBUG", "very")] {
        let out = common::helixctl_with(
            "http://127.0.0.1:1",
            &["--json", "health"],
            &[(var, value), ("MESSAGING_ADMIN_TOKEN", TOKEN)],
        )
        .await;
        failed(&out, 2, var);
    }
}

/// The runbooks name RabbitMQ queues (`rabbitmqadmin get queue=helixagent.tasks.llm`);
/// `helixctl queues` goes from a task queue or event topic to the name the broker's own
/// tools take, with its backlog, and `rabbitmqctl` finds that queue holding those tasks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queues_shows_each_topics_group_by_the_name_the_brokers_tools_take() {
    let rabbitmq = helix_messaging::connect(
        &std::env::var("RABBITMQ_URL")
            .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into()),
    )
    .await
    .expect("RabbitMQ");
    let redis = helix_messaging::connect(&redis_streams_url())
        .await
        .expect("Redis");
    let (queue, unused, topic) = (fresh("ctl.tasks"), fresh("ctl.tasks"), fresh("ctl.events"));
    let workers = fresh("ctl-workers");
    let hub = Hub::new(
        HubConfig {
            task_group: workers.clone(),
            task_queues: vec![queue.clone()],
            ..HubConfig::default()
        },
        rabbitmq,
        redis,
        None,
    )
    .await
    .unwrap();
    for n in 0..3 {
        let task = helix_messaging_core::hub::Task::new("llm", serde_json::json!({ "n": n }));
        hub.publish_task(&queue, &task).await.unwrap();
    }
    let audit = hub
        .subscribe_events(&topic, |_event, _envelope| async { Ok(()) }, "audit")
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(helix_messaging_admin::serve_listener(
        listener,
        AdminConfig::new(TOKEN).unwrap(),
        Services::new(hub.clone()),
        std::future::pending(),
    ));

    let rabbit_queue = format!("{queue}.{workers}");
    let out = helixctl(&url, Some(TOKEN), &["queues"]).await;
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.starts_with("2 queues\n"), "{text}");
    assert!(
        text.contains(&format!(
            "tasks  {queue}  group {workers}  →  rabbitmq queue {rabbit_queue} (exchange helixagent, routing key {queue})  waiting 3"
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "events  {topic}  group audit  →  redis-streams stream group audit (stream {topic})  waiting 0  in flight 0"
        )),
        "{text}"
    );
    let listed = helix_messaging_testkit::faults::rabbitmqctl(&["list_queues", "name", "messages"]);
    assert!(
        listed
            .lines()
            .any(|line| line.split_whitespace().eq([rabbit_queue.as_str(), "3"])),
        "rabbitmqctl lists {rabbit_queue} with 3 messages:\n{listed}"
    );

    // A queue the hub knows nothing of: the group it would have.
    let json = ok_json(&helixctl(&url, Some(TOKEN), &["queues", &unused, "--json"]).await);
    assert_eq!(json["count"], 1, "{json}");
    assert_eq!(
        json["queues"][0]["name"],
        format!("{unused}.{workers}"),
        "{json}"
    );
    assert_eq!(json["queues"][0]["waiting"], 0, "{json}");
    let json =
        ok_json(&helixctl(&url, Some(TOKEN), &["queues", "--side", "events", "--json"]).await);
    assert_eq!(json["count"], 1, "{json}");
    assert_eq!(json["queues"][0]["kind"], "stream group", "{json}");
    failed(
        &helixctl(&url, Some(TOKEN), &["queues", "not a topic"]).await,
        1,
        "topic",
    );
    audit.shutdown().await;
    hub.close().await.unwrap();
    // Not left on the shared node with its tasks.
    helix_messaging_testkit::faults::rabbitmqctl(&["delete_queue", &rabbit_queue]);
}
