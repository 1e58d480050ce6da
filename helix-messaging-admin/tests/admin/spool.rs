//! The spool endpoints: what the broker refused, listed, retried and discarded over HTTP, and
//! the answers without a fallback spool.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use helix_messaging_core::fallback::{MemorySpool, Spool, SpoolLimits};
use helix_messaging_core::hub::{Hub, HubConfig};
use helix_messaging_core::{Broker, Message, SubscribeOptions};

use crate::common::{Server, call, error_of, json_of, memory_hub};

/// A hub whose task side spools into `spool` (the event side into a spool of its own).
async fn spooling_hub(broker: Arc<dyn Broker>, spool: Arc<MemorySpool>) -> Hub {
    let events: Arc<dyn Spool> = Arc::new(MemorySpool::new(SpoolLimits::default()));
    Hub::new(
        HubConfig::default(),
        broker.clone(),
        broker,
        Some((spool, events)),
    )
    .await
    .unwrap()
}

/// Issue 27, item 1: what the broker refused when it was forwarded is listed, sent again or
/// discarded through the admin API, and health says `degraded` while any is set aside.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_spool_messages_are_listed_retried_and_discarded_over_http() {
    crate::capture::install();
    let broker: Arc<dyn Broker> = Arc::new(helix_messaging_memory::MemoryBroker::new());
    let topic = helix_messaging_testkit::fresh_name("refused");
    let spool = Arc::new(MemorySpool::new(SpoolLimits::default()));
    // Two messages the broker refused when the forwarder sent them, set aside in the spool
    // before this process started.
    let mut seqs = Vec::new();
    for body in ["first", "second"] {
        let seq = spool
            .append(&topic, &[Message::new(body).with_key("k")])
            .await
            .unwrap();
        spool
            .refuse(seq, "rejected by the broker: message too large")
            .await
            .unwrap();
        seqs.push(seq);
    }
    let hub = spooling_hub(broker.clone(), spool).await;
    let s = Server::start(hub, None).await;
    let mut sub = broker
        .subscribe(&topic, SubscribeOptions::group("g"))
        .await
        .unwrap();

    let spools = call(s.get("/v1/messaging/spools")).await;
    assert_eq!(spools["tasks"]["refused"], 2, "{spools}");
    assert_eq!(spools["tasks"]["depth"], 0, "{spools}");
    assert_eq!(spools["events"]["refused"], 0, "{spools}");
    let health = json_of(s.get("/v1/messaging/health").send().await.unwrap()).await;
    assert_eq!(health["status"], "degraded", "{health}");
    assert!(
        health["tasks"]["detail"]
            .as_str()
            .unwrap()
            .contains("2 refused by the broker"),
        "{health}"
    );

    let listed = call(s.get("/v1/messaging/spools/tasks/refused?limit=10")).await;
    assert_eq!(listed["count"], 2, "{listed}");
    let first = &listed["refused"][0];
    assert_eq!(first["seq"], seqs[0]);
    assert_eq!(first["topic"], topic.as_str());
    assert_eq!(first["reason"], "rejected by the broker: message too large");
    assert_eq!(first["message"]["payload"], "first");
    assert_eq!(first["message"]["key"], "k");
    let first_id = first["message_id"].as_str().unwrap().to_owned();

    // Sent again: back in the spool, forwarded to the topic with its id.
    let retried = call(
        s.request(
            reqwest::Method::POST,
            &format!("/v1/messaging/spools/tasks/refused/{}/retry", seqs[0]),
        )
        .header("x-request-id", format!("retry-{topic}")),
    )
    .await;
    assert_eq!(retried["status"], "retried");
    let delivery = tokio::time::timeout(Duration::from_secs(15), sub.next())
        .await
        .expect("the retried message is forwarded within 15 s")
        .expect("open")
        .expect("no stream error");
    assert_eq!(delivery.message().id(), first_id);
    delivery.ack().await.unwrap();

    let discarded = call(
        s.request(
            reqwest::Method::DELETE,
            &format!("/v1/messaging/spools/tasks/refused/{}", seqs[1]),
        )
        .header("x-request-id", format!("discard-{topic}")),
    )
    .await;
    assert_eq!(discarded["status"], "discarded");
    // Each left one audit event naming the side and the seq.
    for (request_id, action, seq) in [
        (format!("retry-{topic}"), "spool.retry", seqs[0]),
        (format!("discard-{topic}"), "spool.discard", seqs[1]),
    ] {
        let events = crate::capture::captured(|e| {
            e.target == helix_messaging_admin::AUDIT_TARGET && e.field("request_id") == request_id
        });
        assert_eq!(events.len(), 1, "{action}: {events:?}");
        assert_eq!(events[0].field("action"), action);
        assert_eq!(events[0].field("ids"), format!("side=tasks,seq={seq}"));
        assert_eq!(events[0].field("outcome"), "done");
    }
    let gone = s
        .request(
            reqwest::Method::DELETE,
            &format!("/v1/messaging/spools/tasks/refused/{}", seqs[1]),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_of(gone).await.0,
        404,
        "a discard is not undone or repeated"
    );
    let listed = call(s.get("/v1/messaging/spools/tasks/refused")).await;
    assert_eq!(listed["count"], 0, "{listed}");
    helix_messaging_testkit::eventually(
        Duration::from_secs(15),
        "health is healthy once nothing is spooled or set aside",
        || {
            let request = s.get("/v1/messaging/health");
            async move {
                let health = json_of(request.send().await.ok()?).await;
                (health["status"] == "healthy").then_some(())
            }
        },
    )
    .await;

    for (method, path, status) in [
        (
            reqwest::Method::GET,
            "/v1/messaging/spools/nowhere/refused",
            404,
        ),
        (
            reqwest::Method::POST,
            "/v1/messaging/spools/tasks/refused/x/retry",
            400,
        ),
        (
            reqwest::Method::GET,
            "/v1/messaging/spools/tasks/refused?limit=0",
            400,
        ),
    ] {
        let response = s.request(method.clone(), path).send().await.unwrap();
        assert_eq!(error_of(response).await.0, status, "{method} {path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_fallback_the_spools_are_null_and_their_refused_lists_404() {
    let s = Server::start(memory_hub().await, None).await;
    let spools = call(s.get("/v1/messaging/spools")).await;
    assert_eq!(spools, serde_json::json!({ "tasks": null, "events": null }));
    let response = s
        .get("/v1/messaging/spools/tasks/refused")
        .send()
        .await
        .unwrap();
    let (status, message) = error_of(response).await;
    assert_eq!(status, 404);
    assert!(message.contains("no fallback spool"), "{message}");
}
