//! The hub over two real brokers: tasks on RabbitMQ, events on Redis Streams.
#![cfg(all(feature = "rabbitmq", feature = "redis"))]

use std::sync::Arc;
use std::time::{Duration, Instant};

use helix_messaging::dlq::{DeadLetterConfig, HEADER_ORIGINAL_ID, HEADER_REASON};
use helix_messaging::hub::{Event, Hub, HubConfig, Task};
use helix_messaging::{HealthStatus, Message, SubscribeOptions};
use helix_messaging_testkit::fresh_name;
use parking_lot::Mutex;

async fn until(what: &str, check: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check() {
        assert!(Instant::now() < deadline, "{what}: not within 30 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_on_rabbitmq_and_events_on_redis_streams_round_trip() {
    let rabbitmq = std::env::var("RABBITMQ_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let redis = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let tasks = helix_messaging::connect(&rabbitmq).await.expect("RabbitMQ");
    let events = helix_messaging::connect(&redis.replacen("redis://", "redis-streams://", 1))
        .await
        .expect("Redis");
    assert_eq!((tasks.name(), events.name()), ("rabbitmq", "redis-streams"));
    let dlq = fresh_name("hub-dlq");
    let hub = Hub::new(
        HubConfig {
            task_group: fresh_name("workers"),
            dead_letters: DeadLetterConfig::new(&dlq).unwrap(),
            ..HubConfig::default()
        },
        tasks.clone(),
        events.clone(),
        None,
    )
    .await
    .unwrap();
    let queue = fresh_name("tasks");
    let topic = fresh_name("events");
    let mut dead = tasks
        .subscribe(&dlq, SubscribeOptions::group("inspect"))
        .await
        .unwrap();

    let handled: Arc<Mutex<Vec<Task>>> = Arc::default();
    let sink = handled.clone();
    let workers = hub
        .subscribe_tasks(&queue, move |task: Task, _| {
            let sink = sink.clone();
            async move {
                sink.lock().push(task);
                Ok(())
            }
        })
        .await
        .unwrap();
    let seen: Arc<Mutex<Vec<(Event, serde_json::Value)>>> = Arc::default();
    let sink = seen.clone();
    let audit = hub
        .subscribe_events(
            &topic,
            move |event: Event, envelope| {
                let sink = sink.clone();
                async move {
                    let wire: serde_json::Value =
                        serde_json::from_slice(envelope.message.payload()).unwrap();
                    sink.lock().push((event, wire));
                    Ok(())
                }
            },
            "audit",
        )
        .await
        .unwrap();

    let sent: Vec<Task> = (0..5u8)
        .map(|i| Task::new("completion", serde_json::json!({ "n": i })).with_priority(i * 2))
        .collect();
    for task in &sent {
        hub.publish_task(&queue, task).await.unwrap();
    }
    let expired = Task::new("completion", serde_json::json!({}))
        .with_deadline(chrono::Utc::now() - chrono::Duration::seconds(5));
    hub.publish_task(&queue, &expired).await.unwrap();
    let too_high = Task::new("completion", serde_json::json!({})).with_priority(11);
    assert!(
        hub.publish_task(&queue, &too_high).await.is_err(),
        "priority above 10"
    );
    let garbage = Message::new("not a task");
    hub.task_broker()
        .publish(&queue, garbage.clone())
        .await
        .unwrap();
    let events_sent: Vec<Event> = (0..5)
        .map(|i| {
            Event::new(
                "debate.round.completed",
                "debate-service",
                serde_json::json!({ "round": i }),
            )
            .with_subject("debate-789")
        })
        .collect();
    for event in &events_sent {
        hub.publish_event(&topic, event).await.unwrap();
    }

    until("5 tasks handled", || handled.lock().len() == 5).await;
    until("5 events handled", || seen.lock().len() == 5).await;
    let mut got = handled.lock().clone();
    got.sort_by_key(|t| t.id.clone());
    let mut want = sent.clone();
    want.sort_by_key(|t| t.id.clone());
    assert_eq!(got, want, "every field of every task");
    let seen = seen.lock().clone();
    // Handlers run concurrently (HubConfig::concurrency), so compare as sets.
    let mut got_events: Vec<Event> = seen.iter().map(|(e, _)| e.clone()).collect();
    got_events.sort_by_key(|e| e.id.clone());
    let mut want_events = events_sent.clone();
    want_events.sort_by_key(|e| e.id.clone());
    assert_eq!(got_events, want_events, "every field of every event");
    let wire = &seen[0].1;
    for attribute in [
        "specversion",
        "id",
        "source",
        "type",
        "subject",
        "time",
        "datacontenttype",
        "data",
    ] {
        assert!(
            wire.get(attribute).is_some(),
            "CloudEvents attribute {attribute}: {wire}"
        );
    }
    assert_eq!(wire["specversion"], "1.0");

    // The expired task and the undecodable message are dead-lettered, with their reasons.
    let mut reasons = std::collections::HashMap::new();
    for _ in 0..2 {
        let d = tokio::time::timeout(Duration::from_secs(30), futures::StreamExt::next(&mut dead))
            .await
            .expect("a dead letter within 30 s")
            .unwrap()
            .unwrap();
        reasons.insert(
            d.message()
                .header(HEADER_ORIGINAL_ID)
                .unwrap_or_default()
                .to_owned(),
            d.message()
                .header(HEADER_REASON)
                .unwrap_or_default()
                .to_owned(),
        );
        d.ack().await.unwrap();
    }
    assert_eq!(reasons[expired.id.as_str()], "deadline exceeded");
    assert_eq!(reasons[garbage.id()], "undecodable payload");

    let metrics = hub.metrics();
    assert_eq!(
        (
            metrics.tasks_published,
            metrics.tasks_handled,
            metrics.tasks_expired
        ),
        (6, 5, 1)
    );
    assert_eq!((metrics.events_published, metrics.events_handled), (5, 5));
    let health = hub.health_check().await;
    assert_eq!(health.status, HealthStatus::Healthy, "{health:?}");
    workers.shutdown().await;
    audit.shutdown().await;
    drop(dead);
    hub.close().await.unwrap();
}

fn rabbitmq_url() -> String {
    std::env::var("RABBITMQ_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// The test RabbitMQ.
async fn rabbitmq() -> Arc<dyn helix_messaging::Broker> {
    helix_messaging::connect(&rabbitmq_url())
        .await
        .expect("RabbitMQ")
}

/// Workers that record the tasks they handle.
async fn recording_workers(
    hub: &Hub,
    queue: &str,
) -> (helix_messaging::Runner, Arc<Mutex<Vec<Task>>>) {
    let handled: Arc<Mutex<Vec<Task>>> = Arc::default();
    let sink = handled.clone();
    let workers = hub
        .subscribe_tasks(queue, move |task: Task, _| {
            let sink = sink.clone();
            async move {
                sink.lock().push(task);
                Ok(())
            }
        })
        .await
        .unwrap();
    (workers, handled)
}

/// A hub with `tasks` on both sides, a workers' group of its own, `task_queues` and `spools`.
async fn workers_hub(
    tasks: Arc<dyn helix_messaging::Broker>,
    task_queues: Vec<String>,
    spools: Option<(
        Arc<dyn helix_messaging::fallback::Spool>,
        Arc<dyn helix_messaging::fallback::Spool>,
    )>,
) -> Hub {
    let config = HubConfig {
        task_group: fresh_name("workers"),
        task_queues,
        ..HubConfig::default()
    };
    Hub::new(config, tasks.clone(), tasks, spools)
        .await
        .unwrap()
}

/// The first worker to subscribe to `queue` handles `task`, and only it; then the hub closes.
async fn first_worker_handles(hub: Hub, queue: &str, task: &Task) {
    let (workers, handled) = recording_workers(&hub, queue).await;
    until("the task handled", || handled.lock().len() == 1).await;
    assert_eq!(handled.lock().as_slice(), std::slice::from_ref(task));
    workers.shutdown().await;
    hub.close().await.unwrap();
}

/// RabbitMQ refuses a publish no queue is bound for: before its first publish to a queue the
/// hub creates the workers' group, so the task waits for the first worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_published_before_the_first_worker_subscribes_waits_for_it() {
    let tasks = rabbitmq().await;
    let hub = workers_hub(tasks, Vec::new(), None).await;
    let queue = fresh_name("tasks");
    let early = Task::new("summarise", serde_json::json!({ "document": 1 }));
    hub.publish_task(&queue, &early)
        .await
        .expect("kept for the first worker");
    first_worker_handles(hub, &queue, &early).await;
}

/// The queues listed in `HubConfig::task_queues` exist once the hub has started: even a
/// producer that does not go through the hub can publish to them before any worker runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_task_queues_exist_once_the_hub_has_started() {
    let tasks = rabbitmq().await;
    let (listed, unlisted) = (fresh_name("tasks"), fresh_name("tasks"));
    let hub = workers_hub(tasks.clone(), vec![listed.clone()], None).await;
    let task = Task::new("verify", serde_json::json!({}));
    let as_message = || Message::new(serde_json::to_vec(&task).unwrap()).with_id(task.id.clone());
    tasks
        .publish(&listed, as_message())
        .await
        .expect("the listed queue's group exists");
    let refused = tasks
        .publish(&unlisted, as_message())
        .await
        .expect_err("nothing is bound for a queue the hub was not told of");
    assert_eq!(refused.kind(), helix_messaging::ErrorKind::Rejected);
    first_worker_handles(hub, &listed, &task).await;
}

/// A task spooled while the broker was away, before its queue's group existed, is not
/// refused when the spool drains: the group is created first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_spooled_before_its_queue_existed_reaches_the_first_worker() {
    use helix_messaging::fallback::{MemorySpool, SpoolLimits};
    use helix_messaging_testkit::faults::outage;

    let real = rabbitmq().await;
    let away = Arc::new(outage(real, true));
    let tasks: Arc<dyn helix_messaging::Broker> = away.clone();
    let spool = || -> Arc<dyn helix_messaging::fallback::Spool> {
        Arc::new(MemorySpool::new(SpoolLimits::default()))
    };
    let hub = workers_hub(tasks, Vec::new(), Some((spool(), spool()))).await;
    let queue = fresh_name("tasks");
    let task = Task::new("notify", serde_json::json!({ "to": "ops" }));
    hub.publish_task(&queue, &task).await.expect("spooled");
    let fallback = hub.task_fallback().unwrap().clone();
    assert_eq!(fallback.spool_stats().await.unwrap().depth, 1, "spooled");
    away.guard().set_down(false);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let stats = fallback.spool_stats().await.unwrap();
        assert_eq!(
            stats.refused,
            0,
            "refused on drain: {:?}",
            fallback.refused(10).await
        );
        if stats.depth == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the spool drained: not within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first_worker_handles(hub, &queue, &task).await;
}

/// A task queue whose queue went away under the hub (an operator deleted it, or it expired)
/// is created again: the task that found it gone is refused as unroutable, the next is
/// kept for the first worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_queue_deleted_under_the_hub_is_created_again() {
    let tasks = rabbitmq().await;
    let hub = workers_hub(tasks, Vec::new(), None).await;
    let queue = fresh_name("tasks");
    let rabbit_queue = format!("{queue}.{}", hub.config().task_group);
    let task = || Task::new("index", serde_json::json!({}));
    hub.publish_task(&queue, &task()).await.unwrap();
    helix_messaging_testkit::faults::rabbitmqctl(&["delete_queue", &rabbit_queue]);
    let refused = hub.publish_task(&queue, &task()).await.unwrap_err();
    assert_eq!(
        refused.kind(),
        helix_messaging::ErrorKind::Rejected,
        "{refused}"
    );
    let kept = task();
    hub.publish_task(&queue, &kept)
        .await
        .expect("its group created again");
    first_worker_handles(hub, &queue, &kept).await;
}
