//! `hub_from_vars`: the variables pick each side's backend and the fallback spools; bad
//! values are named.
#![cfg(all(feature = "memory", feature = "sqlite"))]

use std::sync::Arc;
use std::time::{Duration, Instant};

use helix_messaging::hub::Task;
use helix_messaging::{ErrorKind, HealthStatus, hub_from_vars};
use helix_messaging_testkit::env_lookup;
use parking_lot::Mutex;

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
    let task = Task::new("cleanup", serde_json::json!({ "older_than_days": 30 }));
    hub.publish_task("helixagent.tasks.background", &task)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.lock().is_empty() {
        assert!(Instant::now() < deadline, "the task was not handled");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(got.lock().clone(), vec![task.id.clone()]);
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
