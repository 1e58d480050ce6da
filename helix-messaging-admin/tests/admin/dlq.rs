//! The DLQ endpoints: listing, showing, reprocessing and discarding entries, failure groups
//! and bulk redrive jobs, on the real Redis Streams and RabbitMQ.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use helix_messaging_admin::AdminConfig;
use helix_messaging_core::dlq::{
    DeadLetterReason, MemoryDeadLetterStore, Processor, ProcessorConfig,
};
use helix_messaging_core::{Broker, Message, SubscribeOptions};
use serde_json::Value;

use crate::common::{
    Server, TOKEN, call, error_of, failed, json_of, memory_hub, over, rabbitmq, redis_streams,
    until_done, uuid_like,
};

/// A DLQ processor over a broker, holding `letters` (failed on `topic`).
pub(crate) struct Dlq {
    pub(crate) server: Server,
    pub(crate) broker: Arc<dyn Broker>,
    pub(crate) topic: String,
    pub(crate) ids: Vec<String>,
    pub(crate) processor: Processor,
}

/// A DLQ server on the real Redis Streams.
async fn dlq_server(config: AdminConfig, letters: &[(&str, DeadLetterReason)]) -> Dlq {
    dlq_server_on(redis_streams().await, config, letters).await
}

pub(crate) async fn dlq_server_on(
    broker: Arc<dyn Broker>,
    config: AdminConfig,
    letters: &[(&str, DeadLetterReason)],
) -> Dlq {
    let processor = Processor::new(
        broker.clone(),
        Arc::new(MemoryDeadLetterStore::new()),
        ProcessorConfig::default(),
    )
    .unwrap();
    let topic = format!("admin.dlq.{}", uuid_like());
    let mut ids = Vec::new();
    for (payload, reason) in letters {
        let message = Message::new(payload.to_string()).with_header("type", "admin.test");
        let letter = failed(&topic, &message, *reason, "boom", SystemTime::now());
        ids.push(letter.id.clone());
        assert!(processor.ingest(letter).await.unwrap());
    }
    Dlq {
        server: over(broker.clone(), config, |s| s.with_dlq(processor.clone())).await,
        broker,
        topic,
        ids,
        processor,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dlq_listing_pages_filters_and_counts_every_match() {
    let dlq = dlq_server(
        AdminConfig::new(TOKEN).unwrap(),
        &[
            ("one", DeadLetterReason::Permanent),
            ("two", DeadLetterReason::Permanent),
            ("three", DeadLetterReason::Undecodable),
        ],
    )
    .await;
    let s = &dlq.server;
    let page = call(s.get("/v1/messaging/dlq?limit=2")).await;
    assert_eq!(page["count"], 3, "{page}");
    assert_eq!(page["messages"].as_array().unwrap().len(), 2, "{page}");
    let rest = call(s.get("/v1/messaging/dlq?limit=2&offset=2")).await;
    assert_eq!(rest["messages"].as_array().unwrap().len(), 1, "{rest}");
    let mut seen: Vec<String> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .chain(rest["messages"].as_array().unwrap())
        .map(|m| m["id"].as_str().unwrap().to_owned())
        .collect();
    seen.sort();
    let mut ids = dlq.ids.clone();
    ids.sort();
    assert_eq!(seen, ids, "the pages hold every entry once");

    let undecodable = call(s.get("/v1/messaging/dlq?reason=undecodable_payload")).await;
    assert_eq!(undecodable["count"], 1, "{undecodable}");
    let entry = &undecodable["messages"][0];
    assert_eq!(entry["message"]["payload"], "three");
    assert_eq!(entry["original_topic"], dlq.topic.as_str());
    assert_eq!(entry["reason"], "undecodable payload");
    assert_eq!(
        entry["status"], "parked",
        "no handler for a permanent failure"
    );
    let by_topic = format!(
        "/v1/messaging/dlq?topic={}&status=parked&from=2000-01-01T00:00:00Z",
        dlq.topic
    );
    assert_eq!(call(s.get(&by_topic)).await["count"], 3);

    for (query, var) in [
        ("limit=abc", "limit"),
        ("limit=0", "limit"),
        ("limit=5000", "limit"),
        ("offset=-1", "offset"),
        ("reason=bogus", "reason"),
        ("from=yesterday", "from"),
        ("status=lost", "unknown DLQ entry status"),
    ] {
        let response = s
            .get(&format!("/v1/messaging/dlq?{query}"))
            .send()
            .await
            .unwrap();
        let (status, message) = error_of(response).await;
        assert_eq!(status, 400, "{query}");
        assert!(message.contains(var), "{query}: {message}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_is_shown_reprocessed_to_its_topic_and_then_gone() {
    let dlq = dlq_server(
        AdminConfig::new(TOKEN).unwrap(),
        &[("again", DeadLetterReason::MaxRetriesExceeded)],
    )
    .await;
    let s = &dlq.server;
    let id = &dlq.ids[0];
    let entry = call(s.get(&format!("/v1/messaging/dlq/{id}"))).await;
    assert_eq!(entry["id"], id.as_str());
    assert_eq!(entry["attempts"], 3);
    assert_eq!(entry["message"]["headers"]["type"], "admin.test");
    let original_id = entry["original_id"].as_str().unwrap().to_owned();

    let mut sub = dlq
        .broker
        .subscribe(&dlq.topic, SubscribeOptions::group("workers"))
        .await
        .unwrap();
    let path = format!("/v1/messaging/dlq/{id}/reprocess");
    let done = call(s.request(reqwest::Method::POST, &path)).await;
    assert_eq!(done["status"], "reprocessed");
    let delivery = tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .expect("the reprocessed message within 10 s")
        .unwrap()
        .unwrap();
    assert_eq!(delivery.message().id(), original_id, "it keeps its id");
    assert_eq!(&delivery.message().payload()[..], b"again");
    delivery.ack().await.unwrap();

    let gone = s
        .get(&format!("/v1/messaging/dlq/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(gone).await.0, 404);
    let again = s
        .request(reqwest::Method::POST, &path)
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(again).await.0, 404, "reprocessing twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_reprocess_bodies_are_400_or_413_and_keep_the_entry() {
    let mut config = AdminConfig::new(TOKEN).unwrap();
    config.body_limit = 256;
    let dlq = dlq_server(config, &[("kept", DeadLetterReason::Permanent)]).await;
    let s = &dlq.server;
    let path = format!("/v1/messaging/dlq/{}/reprocess", dlq.ids[0]);
    let post = |body: String| {
        s.request(reqwest::Method::POST, &path)
            .header("content-type", "application/json")
            .body(body)
    };
    let malformed = post("{\"target_topic\": ".into()).send().await.unwrap();
    assert_eq!(error_of(malformed).await.0, 400);
    let unknown_field = post("{\"topic\": \"x\"}".into()).send().await.unwrap();
    assert_eq!(error_of(unknown_field).await.0, 422);
    let bad_topic = post("{\"target_topic\": \"not a topic!\"}".into())
        .send()
        .await
        .unwrap();
    let (status, message) = error_of(bad_topic).await;
    assert_eq!(status, 400);
    assert!(message.contains("target topic"), "{message}");
    let huge = post(format!("{{\"target_topic\": \"{}\"}}", "a".repeat(1000)))
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(huge).await.0, 413);
    let entry = s
        .get(&format!("/v1/messaging/dlq/{}", dlq.ids[0]))
        .send()
        .await
        .unwrap();
    let entry = json_of(entry).await;
    assert_eq!(entry["retries"], 0, "nothing was attempted: {entry}");
    assert_eq!(
        entry["status"], "parked",
        "still there (a permanent failure without a handler is parked): {entry}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discarding_keeps_the_entry_listed_with_its_reason_and_unknown_ids_are_404() {
    let dlq = dlq_server(
        AdminConfig::new(TOKEN).unwrap(),
        &[
            ("a", DeadLetterReason::Permanent),
            ("b", DeadLetterReason::Permanent),
        ],
    )
    .await;
    let s = &dlq.server;
    let (first, second) = (&dlq.ids[0], &dlq.ids[1]);
    let done = call(
        s.request(
            reqwest::Method::DELETE,
            &format!("/v1/messaging/dlq/{first}/discard"),
        )
        .json(&serde_json::json!({"reason": "bad data"})),
    )
    .await;
    assert_eq!(done["status"], "discarded");
    let entry = call(s.get(&format!("/v1/messaging/dlq/{first}"))).await;
    assert_eq!(entry["status"], "discarded");
    assert_eq!(entry["discard_reason"], "bad data");
    // HelixAgent's form, without a body.
    call(s.request(
        reqwest::Method::DELETE,
        &format!("/v1/messaging/dlq/{second}"),
    ))
    .await;
    let discarded = call(s.get("/v1/messaging/dlq?status=discarded")).await;
    assert_eq!(discarded["count"], 2, "{discarded}");
    let reprocess = s
        .request(
            reqwest::Method::POST,
            &format!("/v1/messaging/dlq/{first}/reprocess"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_of(reprocess).await.0,
        400,
        "a discarded entry is not reprocessed"
    );
    for (method, path) in [
        (reqwest::Method::GET, "/v1/messaging/dlq/nope"),
        (reqwest::Method::DELETE, "/v1/messaging/dlq/nope/discard"),
        (reqwest::Method::DELETE, "/v1/messaging/dlq/nope"),
        (reqwest::Method::POST, "/v1/messaging/dlq/nope/reprocess"),
    ] {
        let response = s.request(method.clone(), path).send().await.unwrap();
        assert_eq!(error_of(response).await.0, 404, "{method} {path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_dlq_processor_its_endpoints_are_503() {
    let server = Server::start(memory_hub().await, None).await;
    let response = server.get("/v1/messaging/dlq").send().await.unwrap();
    assert_eq!(error_of(response).await.0, 503);
}

/// Failure groups and a bulk redrive job over HTTP, with every error path.
async fn groups_and_bulk_redrives_over_http(broker: Arc<dyn Broker>) {
    let dlq = dlq_server_on(
        broker,
        AdminConfig::new(TOKEN).unwrap(),
        &[
            ("p1", DeadLetterReason::Permanent),
            ("p2", DeadLetterReason::Permanent),
            ("p3", DeadLetterReason::Permanent),
            ("u1", DeadLetterReason::Undecodable),
            ("u2", DeadLetterReason::Undecodable),
        ],
    )
    .await;
    let s = &dlq.server;
    let groups = call(s.get("/v1/messaging/dlq/groups")).await;
    assert_eq!(groups["count"], 2, "{groups}");
    assert_eq!(
        groups["groups"][0]["reason"], "permanent failure",
        "{groups}"
    );
    assert_eq!(groups["groups"][0]["count"], 3, "largest first: {groups}");
    assert_eq!(groups["groups"][0]["topic"], dlq.topic.as_str());
    assert_eq!(groups["groups"][0]["sample_error"], "boom");
    assert_eq!(groups["groups"][1]["count"], 2, "{groups}");
    let undecodable = call(s.get("/v1/messaging/dlq/groups?reason=undecodable_payload")).await;
    assert_eq!(undecodable["count"], 1, "{undecodable}");

    let mut sub = dlq
        .broker
        .subscribe(&dlq.topic, SubscribeOptions::group("workers"))
        .await
        .unwrap();
    let started = s
        .request(reqwest::Method::POST, "/v1/messaging/dlq/redrives")
        .json(&serde_json::json!({
            "filter": {"reason": "permanent_failure"},
            "batch_size": 2,
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(started.status(), 202);
    let started: Value = started.json().await.unwrap();
    assert_eq!(started["total"], 3, "{started}");
    let id = started["id"].as_str().unwrap().to_owned();
    let done = until_done(s, &format!("/v1/messaging/dlq/redrives/{id}")).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["redriven"], 3, "{done}");
    assert_eq!(done["percentage"], 100.0, "{done}");
    let mut payloads = Vec::new();
    for _ in 0..3 {
        let delivery = tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await
            .expect("a re-driven message within 10 s")
            .unwrap()
            .unwrap();
        payloads.push(String::from_utf8(delivery.message().payload().to_vec()).unwrap());
        delivery.ack().await.unwrap();
    }
    payloads.sort();
    assert_eq!(payloads, ["p1", "p2", "p3"]);
    let left = call(s.get("/v1/messaging/dlq")).await;
    assert_eq!(left["count"], 2, "the undecodable ones stay: {left}");
    let jobs = call(s.get("/v1/messaging/dlq/redrives")).await;
    assert_eq!(jobs["count"], 1, "{jobs}");
    assert_eq!(jobs["redrives"][0]["id"], id.as_str());

    // A slow job, cancelled: it stops with what it had re-driven.
    let slow = s
        .request(reqwest::Method::POST, "/v1/messaging/dlq/redrives")
        .json(&serde_json::json!({"all": true, "rate_per_second": 0.5, "batch_size": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(slow.status(), 202);
    let slow: Value = slow.json().await.unwrap();
    let slow_id = slow["id"].as_str().unwrap();
    let path = format!("/v1/messaging/dlq/redrives/{slow_id}");
    call(s.request(reqwest::Method::DELETE, &path)).await;
    let cancelled = until_done(s, &path).await;
    assert_eq!(cancelled["status"], "cancelled", "{cancelled}");
    assert!(
        cancelled["redriven"].as_u64().unwrap() < 2,
        "cancelled before the rate let both go: {cancelled}"
    );

    let unknown = "/v1/messaging/dlq/redrives/no-such-job";
    for method in [reqwest::Method::GET, reqwest::Method::DELETE] {
        let response = s.request(method.clone(), unknown).send().await.unwrap();
        assert_eq!(error_of(response).await.0, 404, "{method} {unknown}");
    }
    for (body, what) in [
        (r#"{"filter": {"bogus": "x"}}"#, "bogus"),
        (r#"{"filter": {"reason": "bogus"}}"#, "reason"),
        (r#"{"filter": {"from": "yesterday"}}"#, "from"),
        (r#"{"all": true, "rate_per_second": -1}"#, "rate_per_second"),
        (r#"{"all": true, "batch_size": 0}"#, "batch_size"),
        (r#"{"all": true, "target_topic": ""}"#, "target topic"),
        (r#"{"filter": "#, "JSON"),
    ] {
        let response = s
            .request(reqwest::Method::POST, "/v1/messaging/dlq/redrives")
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let (status, message) = error_of(response).await;
        assert_eq!(status, 400, "{body}: {message}");
        assert!(message.contains(what), "{body}: {message}");
    }
    let wrong_shape = s
        .request(reqwest::Method::POST, "/v1/messaging/dlq/redrives")
        .json(&serde_json::json!({"colour": "red"}))
        .send()
        .await
        .unwrap();
    let (status, message) = error_of(wrong_shape).await;
    assert_eq!(
        status, 422,
        "well-formed JSON of the wrong shape: {message}"
    );
    assert!(message.contains("colour"), "{message}");
    let bad_group = s
        .get("/v1/messaging/dlq/groups?from=yesterday")
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(bad_group).await.0, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_and_bulk_redrives_over_http_on_redis_streams() {
    groups_and_bulk_redrives_over_http(redis_streams().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_and_bulk_redrives_over_http_on_rabbitmq() {
    groups_and_bulk_redrives_over_http(rabbitmq().await).await;
}

/// A redrive outside the limits is a 400 naming the field and its limit, and starts nothing
/// (a `rate_per_second` of 1e-20 used to start a job that would wait a year for its second
/// batch, `running` all along).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redrive_outside_the_limits_is_400_and_starts_nothing() {
    let dlq = dlq_server(
        AdminConfig::new(TOKEN).unwrap(),
        &[("p1", DeadLetterReason::Permanent)],
    )
    .await;
    let s = &dlq.server;
    for (body, says) in [
        (
            serde_json::json!({"all": true, "batch_size": 10_001}),
            "batch_size",
        ),
        (
            serde_json::json!({"all": true, "rate_per_second": 1e-20}),
            "rate_per_second",
        ),
        (
            serde_json::json!({"all": true, "rate_per_second": 1e9}),
            "rate_per_second",
        ),
        (
            serde_json::json!({"all": true, "canary": {"count": 1, "watch_ms": 3_600_001}}),
            "watch",
        ),
    ] {
        let response = s
            .request(reqwest::Method::POST, "/v1/messaging/dlq/redrives")
            .json(&body)
            .send()
            .await
            .unwrap();
        let (status, message) = error_of(response).await;
        assert_eq!(status, 400, "{body}: {message}");
        assert!(message.contains(says), "{body}: {message}");
    }
    let jobs = call(s.get("/v1/messaging/dlq/redrives")).await;
    assert_eq!(jobs["count"], 0, "nothing was started: {jobs}");
}
