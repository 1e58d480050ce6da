//! The replay endpoints: a replay started over HTTP copies its window and reports progress;
//! bad requests and unknown ids.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use helix_messaging_admin::AdminConfig;
use helix_messaging_core::replay::{ReplayConfig, ReplayHandler};
use helix_messaging_core::{Broker, Message, SubscribeOptions};
use serde_json::Value;

use crate::common::{Server, TOKEN, call, error_of, over, redis_streams, until_done, uuid_like};

/// A replay handler over the real Redis Streams, whose `topic` holds `n` messages.
async fn replay_server(n: usize) -> (Server, Arc<dyn Broker>, String) {
    let broker = redis_streams().await;
    let topic = format!("admin.replay.{}", uuid_like());
    for i in 0..n {
        let kind = if i % 2 == 0 { "even" } else { "odd" };
        broker
            .publish(
                &topic,
                Message::new(format!("m{i}")).with_header("type", kind),
            )
            .await
            .unwrap();
    }
    let replays = ReplayHandler::new(broker.clone(), ReplayConfig::default());
    let config = AdminConfig::new(TOKEN).unwrap();
    let server = over(broker.clone(), config, |s| s.with_replay(replays)).await;
    (server, broker, topic)
}

async fn until_finished(s: &Server, id: &str) -> Value {
    until_done(s, &format!("/v1/messaging/replay/{id}")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_started_over_http_copies_the_window_and_reports_progress() {
    let (s, broker, topic) = replay_server(6).await;
    let target = format!("{topic}.copy");
    let mut copies = broker
        .subscribe(&target, SubscribeOptions::group("readers"))
        .await
        .unwrap();
    let body = serde_json::json!({
        "id": "admin-replay-1",
        "topic": topic,
        "from_time": "2000-01-01T00:00:00Z",
        "to_time": "2100-01-01T00:00:00Z",
        "target_topic": target,
        "filter": {"message_types": ["even"]},
        "options": {"batch_size": 2}
    });
    let response = s
        .request(reqwest::Method::POST, "/v1/messaging/replay")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let started: Value = response.json().await.unwrap();
    assert_eq!(started["id"], "admin-replay-1");
    let done = until_finished(&s, "admin-replay-1").await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(
        (done["total"].as_u64(), done["replayed"].as_u64()),
        (Some(6), Some(3)),
        "{done}"
    );
    assert_eq!(done["filtered"], 3, "{done}");
    assert_eq!(done["by_type"]["even"], 3, "{done}");
    let mut payloads = Vec::new();
    for _ in 0..3 {
        let d = tokio::time::timeout(Duration::from_secs(10), copies.next())
            .await
            .expect("a copy within 10 s")
            .unwrap()
            .unwrap();
        payloads.push(String::from_utf8(d.message().payload().to_vec()).unwrap());
        d.ack().await.unwrap();
    }
    assert_eq!(payloads, ["m0", "m2", "m4"]);

    let listed = call(s.get("/v1/messaging/replay")).await;
    assert_eq!(listed["count"], 1, "{listed}");
    assert_eq!(listed["replays"][0]["id"], "admin-replay-1");
    // Cancelling a finished replay leaves it as it finished.
    let cancelled = call(s.request(
        reqwest::Method::DELETE,
        "/v1/messaging/replay/admin-replay-1",
    ))
    .await;
    assert_eq!(cancelled["status"], "completed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_replay_requests_are_400_and_unknown_ids_404() {
    let (s, _broker, topic) = replay_server(1).await;
    let post = |body: String| {
        s.request(reqwest::Method::POST, "/v1/messaging/replay")
            .header("content-type", "application/json")
            .body(body)
    };
    let window = |from: &str, to: &str| {
        serde_json::json!({"topic": topic, "from_time": from, "to_time": to}).to_string()
    };
    for (body, want, says) in [
        (
            window("yesterday", "2100-01-01T00:00:00Z"),
            400,
            "from_time",
        ),
        (
            window("2000-01-01T00:00:00Z", "2000-13-01T00:00:00Z"),
            400,
            "to_time",
        ),
        (
            window("2100-01-01T00:00:00Z", "2000-01-01T00:00:00Z"),
            400,
            "",
        ),
        ("{\"topic\": ".to_owned(), 400, ""),
        (
            serde_json::json!({"topic": topic, "from_time": "2000-01-01T00:00:00Z",
                "to_time": "2000-01-02T00:00:00Z", "options": {"batch_size": 10_001}})
            .to_string(),
            400,
            "batch_size",
        ),
        (
            serde_json::json!({"topic": topic, "from_time": "2000-01-01T00:00:00Z",
                "to_time": "2000-01-02T00:00:00Z", "target_topic": topic})
            .to_string(),
            400,
            "target_topic",
        ),
        ("{\"topic\": \"t\"}".to_owned(), 422, "from_time"),
    ] {
        let (status, message) = error_of(post(body.clone()).send().await.unwrap()).await;
        assert_eq!(status, want, "{body}: {message}");
        assert!(message.contains(says), "{body}: {message}");
    }
    for method in [reqwest::Method::GET, reqwest::Method::DELETE] {
        let response = s
            .request(method.clone(), "/v1/messaging/replay/nope")
            .send()
            .await
            .unwrap();
        assert_eq!(error_of(response).await.0, 404, "{method}");
    }
    let listed = call(s.get("/v1/messaging/replay")).await;
    assert_eq!(listed["count"], 0, "nothing was started: {listed}");
}

/// Starting a replay under an id already used is a 409, and the first one is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_id_already_used_is_409() {
    let (s, _broker, topic) = replay_server(2).await;
    let body = serde_json::json!({
        "id": "twice",
        "topic": topic,
        "from_time": "2000-01-01T00:00:00Z",
        "to_time": "2100-01-01T00:00:00Z",
        "target_topic": format!("{topic}.copy"),
    });
    let post = || {
        s.request(reqwest::Method::POST, "/v1/messaging/replay")
            .json(&body)
            .send()
    };
    assert_eq!(post().await.unwrap().status(), 202);
    let (status, message) = error_of(post().await.unwrap()).await;
    assert_eq!(status, 409, "{message}");
    assert!(message.contains("twice"), "{message}");
    let done = until_finished(&s, "twice").await;
    assert_eq!(done["status"], "completed", "{done}");
}
