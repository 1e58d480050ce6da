//! Issue 29, over HTTP: destructive actions are deliberate (a redrive of everything says
//! `"all": true`, a dry run shows the selection first, a redrive is paced by default, a
//! double click re-drives nothing twice), jobs are bounded (429 beyond the most running, 409
//! for an id in use, finished ones pruned), and the DLQ listing keeps its contract (oldest
//! first; `count` agrees with the depth gauge on discarded entries).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use helix_messaging_admin::AdminConfig;
use helix_messaging_core::dlq::{
    DeadLetterReason, MAX_FINISHED_REDRIVES, MAX_RUNNING_REDRIVES, MemoryDeadLetterStore,
    Processor, ProcessorConfig,
};
use helix_messaging_core::replay::{
    MAX_FINISHED_REPLAYS, MAX_RUNNING_REPLAYS, ReplayConfig, ReplayHandler,
};
use helix_messaging_core::{Broker, Message, SubscribeOptions};
use serde_json::{Value, json};

use crate::common::{
    Server, TOKEN, call, error_of, failed, over, redis_streams, until_done, uuid_like,
};
use crate::dlq::{Dlq, dlq_server_on};

fn memory() -> Arc<dyn Broker> {
    Arc::new(helix_messaging_memory::MemoryBroker::new())
}

async fn permanent(broker: Arc<dyn Broker>, payloads: &[&str]) -> Dlq {
    let letters: Vec<(&str, DeadLetterReason)> = payloads
        .iter()
        .map(|p| (*p, DeadLetterReason::Permanent))
        .collect();
    dlq_server_on(broker, AdminConfig::new(TOKEN).unwrap(), &letters).await
}

fn post_redrive(s: &Server, body: &Value) -> reqwest::RequestBuilder {
    s.request(reqwest::Method::POST, "/v1/messaging/dlq/redrives")
        .json(body)
}

/// Start a redrive; its 202 answer.
async fn started(s: &Server, body: &Value) -> Value {
    let response = post_redrive(s, body).send().await.unwrap();
    let status = response.status();
    let answer: Value = response.json().await.unwrap();
    assert_eq!(status, 202, "{body}: {answer}");
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redrive_of_everything_needs_all_true_and_all_with_a_filter_is_refused() {
    let dlq = permanent(memory(), &["a", "b"]).await;
    let s = &dlq.server;
    let no_body = s
        .request(reqwest::Method::POST, "/v1/messaging/dlq/redrives")
        .send()
        .await
        .unwrap();
    for (response, what) in [
        (no_body, "no body"),
        (post_redrive(s, &json!({})).send().await.unwrap(), "{}"),
        (
            post_redrive(s, &json!({"filter": {}, "rate_per_second": 10}))
                .send()
                .await
                .unwrap(),
            "an empty filter",
        ),
    ] {
        let (status, message) = error_of(response).await;
        assert_eq!(status, 400, "{what}: {message}");
        assert!(
            message.contains("\"all\": true") && message.contains("filter"),
            "{what}: {message}"
        );
    }
    let both = post_redrive(s, &json!({"all": true, "filter": {"topic": dlq.topic}}))
        .send()
        .await
        .unwrap();
    let (status, message) = error_of(both).await;
    assert_eq!(status, 400, "{message}");
    assert!(message.contains("contradicts"), "{message}");
    let jobs = call(s.get("/v1/messaging/dlq/redrives")).await;
    assert_eq!(jobs["count"], 0, "nothing was started: {jobs}");
    assert_eq!(call(s.get("/v1/messaging/dlq")).await["count"], 2);

    let job = started(s, &json!({"all": true, "rate_per_second": 1000})).await;
    let done = until_done(
        s,
        &format!("/v1/messaging/dlq/redrives/{}", job["id"].as_str().unwrap()),
    )
    .await;
    assert_eq!(
        (done["status"].as_str(), done["redriven"].as_u64()),
        (Some("completed"), Some(2)),
        "{done}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_shows_the_selection_and_its_groups_and_publishes_and_changes_nothing() {
    let dlq = dlq_server_on(
        redis_streams().await,
        AdminConfig::new(TOKEN).unwrap(),
        &[
            ("p1", DeadLetterReason::Permanent),
            ("p2", DeadLetterReason::Permanent),
            ("p3", DeadLetterReason::Permanent),
            ("u1", DeadLetterReason::Undecodable),
        ],
    )
    .await;
    let s = &dlq.server;
    call(s.request(
        reqwest::Method::DELETE,
        &format!("/v1/messaging/dlq/{}", dlq.ids[2]),
    ))
    .await;
    let mut sub = dlq
        .broker
        .subscribe(&dlq.topic, SubscribeOptions::group("workers"))
        .await
        .unwrap();
    let before = call(s.get("/v1/messaging/dlq?limit=100")).await;

    let dry = call(post_redrive(s, &json!({"all": true, "dry_run": true}))).await;
    assert_eq!(dry["dry_run"], true, "{dry}");
    assert_eq!(
        dry["total"], 3,
        "the discarded entry is not selected: {dry}"
    );
    let groups = call(s.get("/v1/messaging/dlq/groups")).await;
    assert_eq!(dry["count"], groups["count"], "{dry} / {groups}");
    assert_eq!(
        dry["groups"], groups["groups"],
        "the groups' shape and content"
    );
    assert_eq!(dry["count"], 2, "{dry}");
    let permanent = call(post_redrive(
        s,
        &json!({"filter": {"reason": "permanent_failure"}, "dry_run": true}),
    ))
    .await;
    assert_eq!(permanent["total"], 2, "{permanent}");
    assert_eq!(permanent["groups"][0]["count"], 2, "{permanent}");
    let refused = post_redrive(
        s,
        &json!({"all": true, "dry_run": true, "batch_size": 10_001}),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(
        error_of(refused).await.0,
        400,
        "checked as the redrive itself"
    );
    let not_deliberate = post_redrive(s, &json!({"dry_run": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(not_deliberate).await.0, 400, "the same body rules");

    let jobs = call(s.get("/v1/messaging/dlq/redrives")).await;
    assert_eq!(jobs["count"], 0, "no job was started: {jobs}");
    let after = call(s.get("/v1/messaging/dlq?limit=100")).await;
    assert_eq!(after, before, "no entry changed");
    // Nothing was published: the first message the topic delivers after the dry runs is the
    // one a real redrive of u1 publishes afterwards.
    let undecodable =
        json!({"filter": {"original_id": message_id_of(&before, "u1")}, "rate_per_second": 1000});
    started(s, &undecodable).await;
    let first = tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .expect("the real redrive's message within 10 s")
        .unwrap()
        .unwrap();
    assert_eq!(
        &first.message().payload()[..],
        b"u1",
        "the dry runs published nothing"
    );
    first.ack().await.unwrap();
}

fn message_id_of(page: &Value, payload: &str) -> String {
    page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["message"]["payload"] == payload)
        .map(|m| m["original_id"].as_str().unwrap().to_owned())
        .unwrap_or_else(|| panic!("{payload} listed in {page}"))
}

/// A body without `rate_per_second` is paced at `DEFAULT_REDRIVE_RATE` (100 a second): 250
/// entries take at least 2.45 s (the pacer lets a chunk go only after the previous one's
/// share of a second), where an unpaced redrive on the memory broker takes milliseconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redrive_without_a_rate_is_paced_at_the_default_rate() {
    let payloads: Vec<String> = (0..250).map(|i| format!("m{i}")).collect();
    let payloads: Vec<&str> = payloads.iter().map(String::as_str).collect();
    let dlq = permanent(memory(), &payloads).await;
    let s = &dlq.server;
    let job = started(s, &json!({"all": true})).await;
    let done = until_done(
        s,
        &format!("/v1/messaging/dlq/redrives/{}", job["id"].as_str().unwrap()),
    )
    .await;
    assert_eq!(done["redriven"], 250, "{done}");
    let at = |field: &str| {
        let text = done[field].as_str().unwrap();
        chrono::DateTime::parse_from_rfc3339(text).unwrap()
    };
    let took = at("finished_at") - at("started_at");
    assert!(
        took >= chrono::TimeDelta::milliseconds(2_400),
        "paced at 100 a second: took {took}"
    );
}

/// A double click: two redrives of the same selection started at once never publish an
/// entry twice (each is claimed before it is published).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_redrives_of_one_selection_started_at_once_publish_each_entry_once() {
    const N: usize = 40;
    let payloads: Vec<String> = (0..N).map(|i| format!("m{i}")).collect();
    let payloads: Vec<&str> = payloads.iter().map(String::as_str).collect();
    let dlq = permanent(redis_streams().await, &payloads).await;
    let s = &dlq.server;
    let mut sub = dlq
        .broker
        .subscribe(&dlq.topic, SubscribeOptions::group("workers"))
        .await
        .unwrap();
    let body =
        json!({"filter": {"topic": dlq.topic}, "rate_per_second": 1_000_000, "batch_size": 4});
    let (one, two) = tokio::join!(started(s, &body), started(s, &body));
    let mut redriven = 0;
    for job in [one, two] {
        let done = until_done(
            s,
            &format!("/v1/messaging/dlq/redrives/{}", job["id"].as_str().unwrap()),
        )
        .await;
        assert_eq!(done["status"], "completed", "{done}");
        redriven += done["redriven"].as_u64().unwrap();
    }
    assert_eq!(redriven, N as u64, "each entry re-driven by one job");
    let mut seen = HashSet::new();
    for _ in 0..N {
        let delivery = tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await
            .expect("a re-driven message within 10 s")
            .unwrap()
            .unwrap();
        let payload = String::from_utf8(delivery.message().payload().to_vec()).unwrap();
        assert!(seen.insert(payload.clone()), "{payload} delivered twice");
        delivery.ack().await.unwrap();
    }
    assert_eq!(seen.len(), N);
    // Both jobs had every publish confirmed before they finished: a copy more would be in the
    // stream already.
    let extra = tokio::time::timeout(Duration::from_millis(500), sub.next()).await;
    assert!(
        extra.is_err(),
        "no message delivered a second time: {extra:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_redrive_more_than_the_most_running_is_429_and_an_id_in_use_409() {
    // Each job re-drives one entry at once and the next a hundred seconds later: with more
    // entries than jobs, each stays running.
    let payloads: Vec<String> = (0..10).map(|i| format!("m{i}")).collect();
    let payloads: Vec<&str> = payloads.iter().map(String::as_str).collect();
    let dlq = permanent(memory(), &payloads).await;
    let s = &dlq.server;
    let slow = |id: &str| json!({"all": true, "id": id, "rate_per_second": 0.01, "batch_size": 1});
    for i in 0..MAX_RUNNING_REDRIVES {
        let job = started(s, &slow(&format!("slow-{i}"))).await;
        assert_eq!(job["id"], format!("slow-{i}"), "the id given: {job}");
    }
    let busy = post_redrive(s, &slow("one-more")).send().await.unwrap();
    assert_eq!(busy.headers()["retry-after"], "1", "when to try again");
    let (status, message) = error_of(busy).await;
    assert_eq!(status, 429, "{message}");
    assert!(
        message.contains("MAX_RUNNING_REDRIVES")
            && message.contains(&MAX_RUNNING_REDRIVES.to_string()),
        "{message}"
    );
    let taken = post_redrive(s, &slow("slow-0")).send().await.unwrap();
    let (status, message) = error_of(taken).await;
    assert_eq!(status, 409, "{message}");
    assert!(message.contains("slow-0"), "{message}");
    let listed = call(s.get("/v1/messaging/dlq/redrives")).await;
    assert_eq!(
        listed["count"], MAX_RUNNING_REDRIVES,
        "nothing more started: {listed}"
    );

    for i in 0..MAX_RUNNING_REDRIVES {
        let path = format!("/v1/messaging/dlq/redrives/slow-{i}");
        call(s.request(reqwest::Method::DELETE, &path)).await;
        assert_eq!(until_done(s, &path).await["status"], "cancelled");
    }
    let again = post_redrive(s, &slow("slow-1")).send().await.unwrap();
    assert_eq!(
        error_of(again).await.0,
        409,
        "a finished job's id stays taken while it is listed"
    );
    let job = started(s, &json!({"all": true, "rate_per_second": 1000})).await;
    until_done(
        s,
        &format!("/v1/messaging/dlq/redrives/{}", job["id"].as_str().unwrap()),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_replay_more_than_the_most_running_is_429() {
    let broker = memory();
    let topic = format!("admin.jobs.{}", uuid_like());
    for i in 0..3 {
        broker
            .publish(&topic, Message::new(format!("h{i}")))
            .await
            .unwrap();
    }
    let replays = ReplayHandler::new(broker.clone(), ReplayConfig::default());
    let s = over(broker, AdminConfig::new(TOKEN).unwrap(), |s| {
        s.with_replay(replays)
    })
    .await;
    // One message a minute: each stays running.
    let slow = |id: &str| {
        json!({
            "id": id,
            "topic": topic,
            "from_time": "2000-01-01T00:00:00Z",
            "to_time": "2100-01-01T00:00:00Z",
            "options": {"batch_size": 1, "delay_between_ms": 60_000},
        })
    };
    let start = |body: Value| {
        s.request(reqwest::Method::POST, "/v1/messaging/replay")
            .json(&body)
    };
    for i in 0..MAX_RUNNING_REPLAYS {
        let response = start(slow(&format!("slow-{i}"))).send().await.unwrap();
        assert_eq!(response.status(), 202);
    }
    let busy = start(slow("one-more")).send().await.unwrap();
    let (status, message) = error_of(busy).await;
    assert_eq!(status, 429, "{message}");
    assert!(message.contains("MAX_RUNNING_REPLAYS"), "{message}");
    let unknown = s.get("/v1/messaging/replay/one-more").send().await.unwrap();
    assert_eq!(error_of(unknown).await.0, 404, "nothing was started");
    for i in 0..MAX_RUNNING_REPLAYS {
        let path = format!("/v1/messaging/replay/slow-{i}");
        call(s.request(reqwest::Method::DELETE, &path)).await;
        assert_eq!(until_done(&s, &path).await["status"], "cancelled");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_redrives_are_pruned_to_the_most_kept() {
    let dlq = permanent(memory(), &[]).await;
    let s = &dlq.server;
    let mut ids = Vec::new();
    for i in 0..MAX_FINISHED_REDRIVES + 3 {
        let id = format!("empty-{i:03}");
        started(s, &json!({"all": true, "id": id})).await;
        until_done(s, &format!("/v1/messaging/dlq/redrives/{id}")).await;
        ids.push(id);
    }
    let listed = call(s.get("/v1/messaging/dlq/redrives")).await;
    assert_eq!(
        listed["count"], MAX_FINISHED_REDRIVES,
        "{}",
        listed["count"]
    );
    for forgotten in &ids[..3] {
        let gone = s
            .get(&format!("/v1/messaging/dlq/redrives/{forgotten}"))
            .send()
            .await
            .unwrap();
        assert_eq!(
            error_of(gone).await.0,
            404,
            "{forgotten}: the oldest are pruned"
        );
    }
    call(s.get(&format!("/v1/messaging/dlq/redrives/{}", ids[3]))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_replays_are_pruned_to_the_most_kept() {
    let broker = memory();
    let topic = format!("admin.jobs.{}", uuid_like());
    broker.publish(&topic, Message::new("one")).await.unwrap();
    let replays = ReplayHandler::new(broker.clone(), ReplayConfig::default());
    let s = over(broker, AdminConfig::new(TOKEN).unwrap(), |s| {
        s.with_replay(replays)
    })
    .await;
    let mut ids = Vec::new();
    for i in 0..MAX_FINISHED_REPLAYS + 2 {
        let id = format!("r-{i:03}");
        let body = json!({
            "id": id,
            "topic": topic,
            "from_time": "2000-01-01T00:00:00Z",
            "to_time": "2100-01-01T00:00:00Z",
        });
        let response = s
            .request(reqwest::Method::POST, "/v1/messaging/replay")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202);
        until_done(&s, &format!("/v1/messaging/replay/{id}")).await;
        ids.push(id);
    }
    // Pruned once a replay has ended, just after it shows as ended.
    helix_messaging_testkit::eventually(Duration::from_secs(10), "the replays pruned", || async {
        let listed = call(s.get("/v1/messaging/replay")).await;
        (listed["count"] == MAX_FINISHED_REPLAYS).then_some(())
    })
    .await;
    for forgotten in &ids[..2] {
        let gone = s
            .get(&format!("/v1/messaging/replay/{forgotten}"))
            .send()
            .await
            .unwrap();
        assert_eq!(
            error_of(gone).await.0,
            404,
            "{forgotten}: the oldest are pruned"
        );
    }
    call(s.get(&format!("/v1/messaging/replay/{}", ids[2]))).await;
}

/// Letters failed at the given times (seconds before now), ingested in the order given.
async fn ingested_at(processor: &Processor, topic: &str, ages: &[u64]) -> Vec<String> {
    let mut payloads = Vec::new();
    for age in ages {
        let at = SystemTime::now() - Duration::from_secs(*age);
        let payload = format!("{age}s ago");
        let letter = failed(
            topic,
            &Message::new(payload.clone()),
            DeadLetterReason::Permanent,
            "boom",
            at,
        );
        assert!(processor.ingest(letter).await.unwrap());
        payloads.push(payload);
    }
    payloads
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dlq_is_listed_oldest_first_as_documented() {
    let broker = memory();
    let processor = Processor::new(
        broker.clone(),
        Arc::new(MemoryDeadLetterStore::new()),
        ProcessorConfig::default(),
    )
    .unwrap();
    ingested_at(&processor, "admin.order", &[20, 40, 10, 30]).await;
    let s = over(broker, AdminConfig::new(TOKEN).unwrap(), |s| {
        s.with_dlq(processor)
    })
    .await;
    let payloads = |page: &Value| -> Vec<String> {
        page["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["message"]["payload"].as_str().unwrap().to_owned())
            .collect()
    };
    let all = call(s.get("/v1/messaging/dlq")).await;
    assert_eq!(
        payloads(&all),
        ["40s ago", "30s ago", "20s ago", "10s ago"],
        "{all}"
    );
    let second_page = call(s.get("/v1/messaging/dlq?limit=2&offset=2")).await;
    assert_eq!(payloads(&second_page), ["20s ago", "10s ago"]);
    let openapi = call(s.get("/v1/messaging/openapi.json")).await;
    let summary = openapi["paths"]["/v1/messaging/dlq"]["get"]["summary"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        summary.contains("oldest first"),
        "documented as served: {summary}"
    );
    assert!(!summary.contains("newest"), "{summary}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listing_count_leaves_discarded_entries_out_as_the_depth_gauge_does() {
    let dlq = permanent(memory(), &["a", "b", "c"]).await;
    let s = &dlq.server;
    call(
        s.request(
            reqwest::Method::DELETE,
            &format!("/v1/messaging/dlq/{}", dlq.ids[0]),
        )
        .json(&json!({"reason": "handled by hand"})),
    )
    .await;
    let listing = call(s.get("/v1/messaging/dlq")).await;
    // The gauge `messaging_dlq_messages_total` is set to this depth on every poll.
    let depth = dlq.processor.stats().await.unwrap().depth;
    assert_eq!(depth, 2);
    assert_eq!(listing["count"], depth, "{listing}");
    assert_eq!(
        listing["messages"].as_array().unwrap().len(),
        2,
        "the page agrees: {listing}"
    );
    let discarded = call(s.get("/v1/messaging/dlq?status=discarded")).await;
    assert_eq!(
        discarded["count"], 1,
        "asked for, they are listed: {discarded}"
    );
    assert_eq!(
        discarded["messages"][0]["discard_reason"],
        "handled by hand"
    );
    let groups = call(s.get("/v1/messaging/dlq/groups")).await;
    assert_eq!(groups["groups"][0]["count"], 2, "{groups}");
}
