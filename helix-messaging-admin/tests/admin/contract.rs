//! The wire shape of every answer, field by field: the keys each JSON object carries are
//! pinned here (as they were before the typed contract), and every answer reads into its
//! `helix_messaging_admin::api` type and writes back to the very same JSON, so a client
//! reading those types sees all the server said.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::SystemTime;

use helix_messaging_admin::api;
use helix_messaging_admin::{AdminConfig, Services};
use helix_messaging_core::Broker;
use helix_messaging_core::dlq::{
    DeadLetter, DeadLetterReason, MemoryDeadLetterStore, Processor, ProcessorConfig,
};
use helix_messaging_core::fallback::{MemorySpool, Spool, SpoolLimits};
use helix_messaging_core::hub::{Hub, HubConfig};
use helix_messaging_core::replay::{ReplayConfig, ReplayHandler};
use helix_messaging_core::{DeliveryInfo, Message};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::common::{Server, TOKEN, call, until_done};

/// The keys of the JSON object `value` (which must be one).
fn keys(value: &Value) -> BTreeSet<&str> {
    value
        .as_object()
        .unwrap_or_else(|| panic!("a JSON object: {value}"))
        .keys()
        .map(String::as_str)
        .collect()
}

/// `value` reads into a `T` that writes back to the same JSON.
fn round_trips<T: Serialize + DeserializeOwned>(value: &Value) {
    let typed: T =
        serde_json::from_value(value.clone()).unwrap_or_else(|err| panic!("{err}: {value}"));
    assert_eq!(&serde_json::to_value(&typed).unwrap(), value);
}

fn set<'a>(names: &[&'a str]) -> BTreeSet<&'a str> {
    names.iter().copied().collect()
}

const MESSAGE_KEYS: [&str; 4] = ["key", "headers", "payload", "payload_size"];
const ENTRY_KEYS: [&str; 18] = [
    "id",
    "original_id",
    "original_topic",
    "group",
    "reason",
    "error",
    "attempts",
    "redrives",
    "first_failure_at",
    "last_failure_at",
    "status",
    "retries",
    "next_attempt_at",
    "last_error",
    "discard_reason",
    "stored_at",
    "claimed_until",
    "message",
];
const REDRIVE_KEYS: [&str; 10] = [
    "id",
    "status",
    "total",
    "redriven",
    "failed",
    "skipped",
    "percentage",
    "started_at",
    "finished_at",
    "last_error",
];
const REPLAY_KEYS: [&str; 21] = [
    "id",
    "status",
    "topic",
    "target_topic",
    "dry_run",
    "total",
    "replayed",
    "skipped",
    "failed",
    "filtered",
    "duplicates",
    "by_type",
    "skipped_by_type",
    "percentage",
    "reached",
    "from_time",
    "to_time",
    "started_at",
    "finished_at",
    "last_error",
    "resumes",
];

/// Everything the API serves, over the memory broker: a DLQ of two entries, replays, and a
/// spool holding one refused message on the task side.
async fn full_server() -> (Server, Vec<String>) {
    let broker: Arc<dyn Broker> = Arc::new(helix_messaging_memory::MemoryBroker::new());
    let topic = helix_messaging_testkit::fresh_name("contract");
    broker
        .publish(&topic, Message::new("history").with_header("type", "t"))
        .await
        .unwrap();
    let processor = Processor::new(
        broker.clone(),
        Arc::new(MemoryDeadLetterStore::new()),
        ProcessorConfig::default(),
    )
    .unwrap();
    // The letters failed on a topic of their own, so their re-drives stay out of `topic`.
    let tasks = format!("{topic}.tasks");
    let info = DeliveryInfo {
        topic: tasks.as_str().into(),
        group: Some("workers".into()),
        attempt: 1,
        redelivered: false,
        position: None,
    };
    let mut ids = Vec::new();
    for payload in ["one", "two"] {
        let now = SystemTime::now();
        let message = Message::new(payload).with_key("k").with_header("type", "t");
        let letter = DeadLetter::new(
            &message,
            &info,
            DeadLetterReason::Permanent,
            "boom",
            now,
            now,
        );
        ids.push(letter.id.clone());
        processor.ingest(letter).await.unwrap();
    }
    let spool = Arc::new(MemorySpool::new(SpoolLimits::default()));
    let seq = spool.append(&topic, &[Message::new("big")]).await.unwrap();
    spool.refuse(seq, "too large").await.unwrap();
    let events: Arc<dyn Spool> = Arc::new(MemorySpool::new(SpoolLimits::default()));
    let hub = Hub::new(
        HubConfig::default(),
        broker.clone(),
        broker.clone(),
        Some((spool, events)),
    )
    .await
    .unwrap();
    let services = Services::new(hub.clone())
        .with_dlq(processor)
        .with_replay(ReplayHandler::new(broker, ReplayConfig::default()));
    let server = Server::configured(AdminConfig::new(TOKEN).unwrap(), services, hub).await;
    ids.extend([topic, tasks]);
    (server, ids)
}

/// Every answer of the API carries exactly the keys it carried before the typed contract.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_keeps_its_exact_json_keys() {
    let (s, ids) = full_server().await;
    let (first, second, topic, tasks) = (&ids[0], &ids[1], &ids[2], &ids[3]);

    let health = call(s.get("/v1/messaging/health")).await;
    assert_eq!(keys(&health), set(&["status", "tasks", "events"]));
    assert_eq!(keys(&health["tasks"]), set(&["status", "detail"]));
    round_trips::<api::Health>(&health);

    let page = call(s.get("/v1/messaging/dlq?limit=10")).await;
    assert_eq!(keys(&page), set(&["count", "limit", "offset", "messages"]));
    assert_eq!(keys(&page["messages"][0]), set(&ENTRY_KEYS));
    assert_eq!(keys(&page["messages"][0]["message"]), set(&MESSAGE_KEYS));
    round_trips::<api::Page<'static>>(&page);
    let entry = call(s.get(&format!("/v1/messaging/dlq/{first}"))).await;
    assert_eq!(keys(&entry), set(&ENTRY_KEYS));
    round_trips::<api::Entry<'static>>(&entry);

    let groups = call(s.get("/v1/messaging/dlq/groups")).await;
    assert_eq!(keys(&groups), set(&["count", "groups"]));
    assert_eq!(
        keys(&groups["groups"][0]),
        set(&[
            "reason",
            "topic",
            "count",
            "oldest",
            "newest",
            "sample_error"
        ])
    );
    round_trips::<api::Groups<'static>>(&groups);

    let discarded = call(s.request(
        reqwest::Method::DELETE,
        &format!("/v1/messaging/dlq/{second}/discard"),
    ))
    .await;
    assert_eq!(keys(&discarded), set(&["id", "status"]));
    round_trips::<api::Ack>(&discarded);
    let reprocessed = call(s.request(
        reqwest::Method::POST,
        &format!("/v1/messaging/dlq/{first}/reprocess"),
    ))
    .await;
    assert_eq!(keys(&reprocessed), set(&["id", "status"]));
    round_trips::<api::Ack>(&reprocessed);

    let response = s
        .request(reqwest::Method::POST, "/v1/messaging/dlq/redrives")
        .json(&serde_json::json!({"filter": {"topic": tasks}}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let started: Value = response.json().await.unwrap();
    assert_eq!(keys(&started), set(&REDRIVE_KEYS));
    round_trips::<api::Redrive>(&started);
    let done = until_done(
        &s,
        &format!(
            "/v1/messaging/dlq/redrives/{}",
            started["id"].as_str().unwrap()
        ),
    )
    .await;
    assert_eq!(keys(&done), set(&REDRIVE_KEYS));
    round_trips::<api::Redrive>(&done);
    let redrives = call(s.get("/v1/messaging/dlq/redrives")).await;
    assert_eq!(keys(&redrives), set(&["count", "redrives"]));
    assert_eq!(keys(&redrives["redrives"][0]), set(&REDRIVE_KEYS));
    round_trips::<api::Redrives>(&redrives);

    let response = s
        .request(reqwest::Method::POST, "/v1/messaging/replay")
        .json(&serde_json::json!({
            "id": "contract-replay",
            "topic": topic,
            "from_time": "2000-01-01T00:00:00Z",
            "to_time": "2100-01-01T00:00:00Z",
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let started: Value = response.json().await.unwrap();
    assert_eq!(keys(&started), set(&REPLAY_KEYS));
    round_trips::<api::Replay>(&started);
    let done = until_done(&s, "/v1/messaging/replay/contract-replay").await;
    assert_eq!(keys(&done), set(&REPLAY_KEYS));
    round_trips::<api::Replay>(&done);
    assert_eq!(done["by_type"]["t"], 1, "{done}");
    let replays = call(s.get("/v1/messaging/replay")).await;
    assert_eq!(keys(&replays), set(&["count", "replays"]));
    assert_eq!(keys(&replays["replays"][0]), set(&REPLAY_KEYS));
    round_trips::<api::Replays>(&replays);

    let spools = call(s.get("/v1/messaging/spools")).await;
    assert_eq!(keys(&spools), set(&["tasks", "events"]));
    assert_eq!(
        keys(&spools["tasks"]),
        set(&["depth", "refused", "bytes", "oldest"])
    );
    round_trips::<api::Spools>(&spools);
    let refused = call(s.get("/v1/messaging/spools/tasks/refused")).await;
    assert_eq!(keys(&refused), set(&["count", "refused"]));
    let one = &refused["refused"][0];
    assert_eq!(
        keys(one),
        set(&[
            "seq",
            "topic",
            "reason",
            "refused_at",
            "message_id",
            "message"
        ])
    );
    assert_eq!(keys(&one["message"]), set(&MESSAGE_KEYS));
    round_trips::<api::RefusedList<'static>>(&refused);
    let seq = one["seq"].as_i64().unwrap();
    let dropped = call(s.request(
        reqwest::Method::DELETE,
        &format!("/v1/messaging/spools/tasks/refused/{seq}"),
    ))
    .await;
    assert_eq!(keys(&dropped), set(&["seq", "status"]));
    round_trips::<api::SpoolAck>(&dropped);

    let missing = s.get("/v1/messaging/dlq/nope").send().await.unwrap();
    assert_eq!(missing.status(), 404);
    let error: Value = missing.json().await.unwrap();
    assert_eq!(keys(&error), set(&["error"]));
    assert_eq!(keys(&error["error"]), set(&["status", "message"]));
    round_trips::<api::ErrorBody>(&error);
}
