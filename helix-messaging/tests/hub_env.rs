//! `hub_from_vars`: the variables pick each side's backend and the fallback spools; bad
//! values are named.
#![cfg(all(feature = "memory", feature = "sqlite"))]

use std::sync::Arc;
use std::time::{Duration, Instant};

use helix_messaging::hub::Task;
use helix_messaging::{ErrorKind, HealthStatus, hub_from_vars};
use helix_messaging_testkit::env_lookup;
use parking_lot::Mutex;

/// Workers on `helixagent.tasks.background` handle `task`, published there, exactly once
/// within 10 s; returns them running.
async fn handled_once(hub: &helix_messaging::hub::Hub, task: &Task) -> helix_messaging::Runner {
    let got: Arc<Mutex<Vec<String>>> = Arc::default();
    let sink = got.clone();
    let workers = hub
        .subscribe_tasks("helixagent.tasks.background", move |task: Task, _| {
            let sink = sink.clone();
            async move {
                sink.lock().push(task.id);
                Ok(())
            }
        })
        .await
        .unwrap();
    hub.publish_task("helixagent.tasks.background", task)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.lock().is_empty() {
        assert!(Instant::now() < deadline, "the task was not handled");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(got.lock().clone(), vec![task.id.clone()]);
    workers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_hub_with_fallback_spools_round_trips_tasks() {
    let dir = tempfile::tempdir().unwrap();
    let spool_dir = dir.path().join("spool");
    let spool_dir = spool_dir.to_str().unwrap().to_owned();
    let hub = hub_from_vars(env_lookup(&[
        ("MESSAGING_FALLBACK_ENABLED", "true"),
        ("MESSAGING_FALLBACK_DIR", &spool_dir),
        ("KAFKA_CONSUMER_GROUP", "my-workers"),
    ]))
    .await
    .unwrap();
    for file in ["tasks.sqlite", "events.sqlite"] {
        assert!(
            dir.path().join("spool").join(file).exists(),
            "{file} created"
        );
    }
    assert_eq!(hub.task_broker().name(), "memory");
    assert_eq!(hub.event_broker().name(), "memory");
    let task = Task::new("cleanup", serde_json::json!({ "older_than_days": 30 }));
    let workers = handled_once(&hub, &task).await;
    let health = hub.health_check().await;
    assert_eq!(health.status, HealthStatus::Healthy, "{health:?}");
    assert!(health.tasks.detail.contains("spool empty"), "{health:?}");
    workers.shutdown().await;
    hub.close().await.unwrap();
}

#[tokio::test]
async fn bad_values_name_their_variable() {
    let err = hub_from_vars(env_lookup(&[("MESSAGING_FALLBACK_ENABLED", "maybe")]))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(
        err.to_string().contains("MESSAGING_FALLBACK_ENABLED"),
        "{err}"
    );
    let err = hub_from_vars(env_lookup(&[("MESSAGING_TASK_BACKEND", "carrier-pigeon")]))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("MESSAGING_TASK_BACKEND"), "{err}");
    let err = hub_from_vars(env_lookup(&[
        ("MESSAGING_BACKEND", "memory"),
        ("MESSAGING_EVENT_BACKEND", "smoke-signals"),
    ]))
    .await
    .unwrap_err();
    assert!(err.to_string().contains("MESSAGING_EVENT_BACKEND"), "{err}");
}

/// `MESSAGING_TASK_QUEUES` lists queues whose workers' group exists once the hub has
/// started: another producer's publish to one of them is kept for the first worker.
#[cfg(feature = "rabbitmq")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listed_task_queues_exist_once_the_hub_from_the_environment_has_started() {
    let (first, second) = (
        helix_messaging_testkit::fresh_name("tasks"),
        helix_messaging_testkit::fresh_name("tasks"),
    );
    let group = helix_messaging_testkit::fresh_name("workers");
    let listed = format!(" {first},{second} ,");
    let hub = hub_from_vars(env_lookup(&[
        ("MESSAGING_BACKEND", "rabbitmq"),
        ("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/%2f"),
        ("KAFKA_CONSUMER_GROUP", group.as_str()),
        ("MESSAGING_TASK_QUEUES", listed.as_str()),
    ]))
    .await
    .unwrap();
    assert_eq!(
        hub.config().task_queues,
        vec![first.clone(), second.clone()]
    );
    let other_producer = helix_messaging::connect("amqp://guest:guest@127.0.0.1:5672/%2f")
        .await
        .unwrap();
    for queue in [&first, &second] {
        other_producer
            .publish(queue, helix_messaging::Message::new("early"))
            .await
            .unwrap_or_else(|e| panic!("{queue} has its group: {e}"));
        let backlog = other_producer.backlog(queue, &group).await.unwrap();
        assert_eq!(backlog.waiting, 1, "{queue}: kept for the first worker");
    }
    other_producer.close().await.unwrap();
    hub.close().await.unwrap();
    // Not left on the shared node with their messages.
    for queue in [&first, &second] {
        helix_messaging_testkit::faults::rabbitmqctl(&[
            "delete_queue",
            &format!("{queue}.{group}"),
        ]);
    }
}

/// A publisher restarted during an outage comes up with the spool on: the hub connects in
/// the background, publishes are spooled (durably, bounded by the limit variables) and
/// health says degraded. Without the spool, the unreachable broker is an error at once.
#[cfg(feature = "rabbitmq")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_spool_on_a_hub_starts_while_its_broker_is_unreachable() {
    use helix_messaging::fallback::{Spool, SpoolLimits, SqliteSpool};

    let dir = tempfile::tempdir().unwrap();
    let spool_dir = dir.path().to_str().unwrap().to_owned();
    // Nothing listens on port 1.
    let unreachable = [
        ("MESSAGING_TASK_BACKEND", "rabbitmq"),
        ("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:1/%2f"),
    ];
    let err = hub_from_vars(env_lookup(&unreachable)).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Connection, "{err}");

    let mut vars = unreachable.to_vec();
    vars.extend([
        ("MESSAGING_FALLBACK_ENABLED", "true"),
        ("MESSAGING_FALLBACK_DIR", spool_dir.as_str()),
        ("MESSAGING_FALLBACK_MAX_MESSAGES", "2"),
    ]);
    let hub = tokio::time::timeout(Duration::from_secs(10), hub_from_vars(env_lookup(&vars)))
        .await
        .expect("returns without waiting for the broker")
        .expect("starts with the broker away");
    assert_eq!(hub.task_broker().name(), "rabbitmq");
    let tasks: Vec<Task> = (0..3)
        .map(|i| Task::new("reindex", serde_json::json!({ "n": i })))
        .collect();
    hub.publish_task("helixagent.tasks.background", &tasks[0])
        .await
        .expect("spooled");
    hub.publish_task("helixagent.tasks.background", &tasks[1])
        .await
        .expect("spooled");
    let err = hub
        .publish_task("helixagent.tasks.background", &tasks[2])
        .await
        .expect_err("beyond MESSAGING_FALLBACK_MAX_MESSAGES");
    assert_eq!(err.kind(), ErrorKind::Rejected, "{err}");
    let stats = hub.spool_stats().await.unwrap();
    assert_eq!(stats.tasks.map(|s| s.depth), Some(2));
    assert_eq!(stats.events.map(|s| s.depth), Some(0));
    let health = hub.health_check().await;
    assert_eq!(health.tasks.status, HealthStatus::Degraded, "{health:?}");
    assert!(
        health.tasks.detail.contains("not connected yet"),
        "{health:?}"
    );
    hub.close().await.unwrap();
    drop(hub);

    // On disk, in publish order, with the tasks' ids.
    let spool = SqliteSpool::open(dir.path().join("tasks.sqlite"), SpoolLimits::default())
        .await
        .unwrap();
    let held: Vec<String> = spool
        .oldest(10)
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.message.id().to_owned())
        .collect();
    assert_eq!(held, vec![tasks[0].id.clone(), tasks[1].id.clone()]);
}

#[tokio::test]
async fn malformed_spool_limits_and_breaker_settings_name_their_variable() {
    let dir = tempfile::tempdir().unwrap();
    for (var, value) in [
        ("MESSAGING_FALLBACK_MAX_MESSAGES", "lots"),
        ("MESSAGING_FALLBACK_MAX_BYTES", "0"),
        ("MESSAGING_BREAKER_FAILURE_THRESHOLD", "-1"),
        ("MESSAGING_BREAKER_FAILURE_THRESHOLD", "99999999999"),
        ("MESSAGING_BREAKER_OPEN_MS", "30s"),
        ("MESSAGING_METRICS_BACKLOG_INTERVAL_MS", "soon"),
        ("MESSAGING_TASK_QUEUES", "helixagent.tasks.llm, not a queue"),
    ] {
        let err = hub_from_vars(env_lookup(&[
            ("MESSAGING_FALLBACK_ENABLED", "true"),
            ("MESSAGING_FALLBACK_DIR", dir.path().to_str().unwrap()),
            (var, value),
        ]))
        .await
        .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config);
        assert!(err.to_string().contains(var), "{err}");
    }
}

/// `MESSAGING_ENABLED=false` (HelixAgent's switch for its messaging hub) keeps everything in
/// the process: both sides run on the in-memory backend whatever the backend variables name,
/// nothing connects and nothing is spooled, and tasks are still handled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messaging_disabled_runs_the_hub_in_memory() {
    let dir = tempfile::tempdir().unwrap();
    let spool_dir = dir.path().join("spool");
    let hub = tokio::time::timeout(
        Duration::from_secs(10),
        hub_from_vars(env_lookup(&[
            ("MESSAGING_ENABLED", "false"),
            // Neither is reachable (nor, without their features, compiled in).
            ("MESSAGING_TASK_BACKEND", "rabbitmq"),
            ("MESSAGING_EVENT_BACKEND", "kafka"),
            ("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:1/%2f"),
            ("KAFKA_BROKERS", "127.0.0.1:1"),
            ("MESSAGING_FALLBACK_ENABLED", "true"),
            ("MESSAGING_FALLBACK_DIR", spool_dir.to_str().unwrap()),
        ])),
    )
    .await
    .expect("returns at once")
    .expect("a hub in memory");
    assert_eq!(hub.task_broker().name(), "memory");
    assert_eq!(hub.event_broker().name(), "memory");
    assert!(!spool_dir.exists(), "no spool is opened");
    let workers = handled_once(&hub, &Task::new("cleanup", serde_json::json!({}))).await;
    workers.shutdown().await;
    hub.close().await.unwrap();

    // Enabled (explicitly or by default) uses the backend variables as before.
    let err = hub_from_vars(env_lookup(&[
        ("MESSAGING_ENABLED", "true"),
        ("MESSAGING_TASK_BACKEND", "carrier-pigeon"),
    ]))
    .await
    .unwrap_err();
    assert!(err.to_string().contains("MESSAGING_TASK_BACKEND"), "{err}");
    let err = hub_from_vars(env_lookup(&[("MESSAGING_ENABLED", "perhaps")]))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(err.to_string().contains("MESSAGING_ENABLED"), "{err}");
}
