//! `GET /v1/messaging/queues`: the groups the hub knows of, narrowed by topic, group and
//! side, and clear 400s for bad parameters (the names the brokers' tools take are checked
//! on the real brokers in helixctl's tests).

use crate::common::{Server, call, error_of, memory_hub};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hubs_groups_are_listed_and_narrowed_and_bad_parameters_named() {
    let hub = memory_hub().await;
    let queue = helix_messaging_testkit::fresh_name("tasks");
    let topic = helix_messaging_testkit::fresh_name("events");
    let task = helix_messaging_core::hub::Task::new("t", serde_json::json!({}));
    hub.publish_task(&queue, &task).await.unwrap();
    let audit = hub
        .subscribe_events(&topic, |_event, _envelope| async { Ok(()) }, "audit")
        .await
        .unwrap();
    let s = Server::start(hub.clone(), None).await;

    let all = call(s.get("/v1/messaging/queues")).await;
    assert_eq!(all["count"], 2, "{all}");
    let tasks = &all["queues"][0];
    assert_eq!(
        (
            &tasks["side"],
            &tasks["topic"],
            &tasks["group"],
            &tasks["kind"]
        ),
        (
            &"tasks".into(),
            &queue.as_str().into(),
            &"helixagent-workers".into(),
            &"group".into()
        ),
        "{all}"
    );
    assert_eq!(
        tasks["waiting"], 1,
        "the task waits for the first worker: {all}"
    );
    assert_eq!(all["queues"][1]["topic"], topic, "{all}");
    assert_eq!(all["queues"][1]["group"], "audit", "{all}");

    let events = call(s.get("/v1/messaging/queues?side=events")).await;
    assert_eq!(events["count"], 1, "{events}");
    let unknown = call(s.get("/v1/messaging/queues?side=events&topic=elsewhere&group=g")).await;
    assert_eq!(unknown["count"], 1, "{unknown}");
    assert_eq!(unknown["queues"][0]["waiting"], 0, "{unknown}");

    for (query, names) in [
        ("side=sideways", "side"),
        ("topic=has%20space", "topic"),
        ("group=a/b", "group"),
        ("side=events&topic=elsewhere", "group"),
    ] {
        let response = s
            .get(&format!("/v1/messaging/queues?{query}"))
            .send()
            .await
            .unwrap();
        let (status, message) = error_of(response).await;
        assert_eq!(status, 400, "{query}: {message}");
        assert!(message.contains(names), "{query}: {message}");
    }
    audit.shutdown().await;
}
