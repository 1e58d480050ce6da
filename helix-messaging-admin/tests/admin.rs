//! The admin API over real HTTP: a server on a free loopback port, requests with reqwest.

use std::net::SocketAddr;
use std::sync::Arc;

use helix_messaging_admin::{ADDR_VAR, AdminConfig, AdminError, Services, TOKEN_VAR};
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use helix_messaging_core::dlq::{
    DeadLetter, DeadLetterReason, MemoryDeadLetterStore, Processor, ProcessorConfig,
};
use helix_messaging_core::fallback::{MemorySpool, Spool, SpoolLimits};
use helix_messaging_core::hub::{Hub, HubConfig};
use helix_messaging_core::replay::{ReplayConfig, ReplayHandler};
use helix_messaging_core::{Broker, DeliveryInfo, Message, SubscribeOptions};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::Value;

const TOKEN: &str = "s3cret-admin-token";

struct Server {
    base: String,
    client: reqwest::Client,
    hub: Hub,
}

impl Server {
    async fn start(hub: Hub, prometheus: Option<PrometheusHandle>) -> Server {
        let mut services = Services::new(hub.clone());
        if let Some(handle) = prometheus {
            services = services.with_prometheus(handle);
        }
        Server::with(services, hub).await
    }

    async fn with(services: Services, hub: Hub) -> Server {
        Server::configured(AdminConfig::new(TOKEN).unwrap(), services, hub).await
    }

    async fn configured(config: AdminConfig, services: Services, hub: Hub) -> Server {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let app = helix_messaging_admin::router(&config, services);
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let client = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(10))
            .build()
            .unwrap();
        Server {
            base: format!("http://{addr}"),
            client,
            hub,
        }
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.client
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(TOKEN)
    }

    fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.client
            .get(format!("{}{path}", self.base))
            .bearer_auth(TOKEN)
    }
}

async fn memory_hub() -> Hub {
    let broker: Arc<dyn Broker> = Arc::new(helix_messaging_memory::MemoryBroker::new());
    Hub::new(HubConfig::default(), broker.clone(), broker, None)
        .await
        .unwrap()
}

async fn error_of(response: reqwest::Response) -> (u16, String) {
    let status = response.status().as_u16();
    let body: Value = response.json().await.expect("a JSON error body");
    assert_eq!(body["error"]["status"], status, "{body}");
    (
        status,
        body["error"]["message"].as_str().unwrap().to_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_both_sides_and_turns_503_when_a_side_is_down() {
    let server = Server::start(memory_hub().await, None).await;
    let response = server.get("/v1/messaging/health").send().await.unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], "healthy", "{body}");
    assert_eq!(body["tasks"]["status"], "healthy", "{body}");
    assert_eq!(body["events"]["status"], "healthy", "{body}");

    server.hub.close().await.unwrap();
    let response = server.get("/v1/messaging/health").send().await.unwrap();
    assert_eq!(response.status(), 503);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], "unhealthy", "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_needs_the_right_bearer_token() {
    let server = Server::start(memory_hub().await, None).await;
    for path in [
        "/v1/messaging/health",
        "/v1/messaging/metrics",
        "/v1/nothing",
    ] {
        let url = format!("{}{path}", server.base);
        let response = server.client.get(&url).send().await.unwrap();
        assert_eq!(response.headers()["www-authenticate"], "Bearer", "{path}");
        let (status, message) = error_of(response).await;
        assert_eq!(
            (status, message.as_str()),
            (401, "a bearer token is required"),
            "{path}"
        );

        let response = server
            .client
            .get(&url)
            .bearer_auth("guess")
            .send()
            .await
            .unwrap();
        assert_eq!(
            error_of(response).await,
            (401, "the bearer token is wrong".into()),
            "{path}"
        );

        let response = server
            .client
            .get(&url)
            .basic_auth("admin", Some(TOKEN))
            .send()
            .await
            .unwrap();
        assert_eq!(
            error_of(response).await.0,
            401,
            "basic auth is not a bearer token: {path}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_paths_and_wrong_methods_get_json_errors() {
    let server = Server::start(memory_hub().await, None).await;
    let response = server.get("/v1/messaging/nothing").send().await.unwrap();
    assert_eq!(error_of(response).await.0, 404);
    let response = server
        .client
        .post(format!("{}/v1/messaging/health", server.base))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(response).await.0, 405);
    let response = server.get("/v1/messaging/metrics").send().await.unwrap();
    assert_eq!(error_of(response).await.0, 503, "no recorder installed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_the_prometheus_text_of_what_the_hub_recorded() {
    let prometheus = helix_messaging_admin::install_prometheus().unwrap();
    let hub = memory_hub().await;
    let task = helix_messaging_core::hub::Task::new("admin-test", serde_json::json!({"n": 1}));
    hub.publish_task("admin.metrics.tasks", &task)
        .await
        .unwrap();
    // The task workers' group is sampled into the backlog gauges as soon as it subscribes.
    let workers = hub
        .subscribe_tasks("admin.metrics.depth", |_task, _envelope| async { Ok(()) })
        .await
        .unwrap();
    let server = Server::start(hub, Some(prometheus)).await;
    let response = server.get("/v1/messaging/metrics").send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4"),
    );
    let text = response.text().await.unwrap();
    let line = text
        .lines()
        .find(|l| {
            l.starts_with("messaging_messages_published_total{")
                && l.contains("topic=\"admin.metrics.tasks\"")
        })
        .unwrap_or_else(|| panic!("no published count in:\n{text}"));
    assert!(line.contains("backend=\"memory\""), "{line}");
    assert!(line.ends_with(" 1"), "{line}");

    for gauge in ["messaging_queue_depth", "messaging_consumer_lag"] {
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        loop {
            let text = server
                .get("/v1/messaging/metrics")
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            let sampled = text.lines().any(|l| {
                l.starts_with(&format!("{gauge}{{"))
                    && l.contains("topic=\"admin.metrics.depth\"")
                    && l.contains("group=\"helixagent-workers\"")
                    && l.ends_with(" 0")
            });
            if sampled {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no {gauge} of the workers' group within 15 s in:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    workers.shutdown().await;
}

/// Poll `/metrics` until a line starting with `prefix` ends with ` value` (15 s at most).
async fn until_metric(server: &Server, prefix: &str, value: &str) {
    let what = format!("{prefix} of {value} in /v1/messaging/metrics");
    let line_end = format!(" {value}");
    helix_messaging_testkit::eventually(Duration::from_secs(15), &what, || async {
        let response = server.get("/v1/messaging/metrics").send().await.ok()?;
        let text = response.text().await.ok()?;
        text.lines()
            .any(|l| l.starts_with(prefix) && l.ends_with(&line_end))
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_and_replay_metrics_are_the_seeds_names_in_the_prometheus_text() {
    let prometheus = helix_messaging_admin::install_prometheus().unwrap();
    let broker = redis_streams().await;
    let dlq_topic = format!("admin.metrics.dlq.{}", uuid_like());
    let processor = Processor::new(
        broker.clone(),
        Arc::new(MemoryDeadLetterStore::new()),
        ProcessorConfig {
            topics: vec![dlq_topic],
            poll_interval: Duration::from_millis(50),
            auto_redrive: false,
            ..ProcessorConfig::default()
        },
    )
    .unwrap();
    processor.start().await.unwrap();
    let topic = format!("admin.metrics.failed.{}", uuid_like());
    let info = DeliveryInfo {
        topic: topic.as_str().into(),
        group: Some("workers".into()),
        attempt: 3,
        redelivered: true,
        position: None,
    };
    let mut ids = Vec::new();
    for payload in ["one", "two"] {
        let now = SystemTime::now();
        let letter = DeadLetter::new(
            &Message::new(payload),
            &info,
            DeadLetterReason::MaxRetriesExceeded,
            "boom",
            now,
            now,
        );
        ids.push(letter.id.clone());
        assert!(processor.ingest(letter).await.unwrap());
    }
    for payload in ["history 1", "history 2"] {
        broker.publish(&topic, Message::new(payload)).await.unwrap();
    }
    let replays = ReplayHandler::new(broker.clone(), ReplayConfig::default());
    let server = over(broker.clone(), AdminConfig::new(TOKEN).unwrap(), |s| {
        s.with_dlq(processor.clone())
            .with_replay(replays)
            .with_prometheus(prometheus)
    })
    .await;
    // The DLQ's depth gauge carries HelixAgent's name `messaging_dlq_messages_total`.
    until_metric(&server, "messaging_dlq_messages_total", "2").await;
    let path = format!("/v1/messaging/dlq/{}/reprocess", ids[0]);
    call(server.request(reqwest::Method::POST, &path)).await;
    until_metric(&server, "messaging_dlq_reprocessed_total", "1").await;
    until_metric(&server, "messaging_dlq_messages_total", "1").await;
    // The gauge, the listing and the store's depth agree: a discarded entry stays listed
    // but no longer counts towards the depth.
    let path = format!("/v1/messaging/dlq/{}/discard", ids[1]);
    call(server.request(reqwest::Method::DELETE, &path)).await;
    until_metric(&server, "messaging_dlq_messages_total", "0").await;
    let listed = call(server.get("/v1/messaging/dlq")).await;
    assert_eq!(listed["count"], 1, "{listed}");
    assert_eq!(listed["messages"][0]["status"], "discarded", "{listed}");
    assert_eq!(processor.stats().await.unwrap().depth, 0);

    // One copy, then a pause of a minute before the next batch: running until cancelled.
    let body = serde_json::json!({
        "id": "admin-metrics-replay",
        "topic": topic,
        "from_time": "2000-01-01T00:00:00Z",
        "to_time": "2100-01-01T00:00:00Z",
        "target_topic": format!("{topic}.copy"),
        "options": {"batch_size": 1, "delay_between_ms": 60000}
    });
    let response = server
        .request(reqwest::Method::POST, "/v1/messaging/replay")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    until_metric(&server, "messaging_replay_active", "1").await;
    call(server.request(
        reqwest::Method::DELETE,
        "/v1/messaging/replay/admin-metrics-replay",
    ))
    .await;
    until_metric(&server, "messaging_replay_active", "0").await;
    processor.stop().await;
}

#[test]
fn settings_come_from_the_environment_and_name_the_bad_variable() {
    let vars = |pairs: &'static [(&'static str, &'static str)]| {
        move |var: &str| {
            pairs
                .iter()
                .find(|(k, _)| *k == var)
                .map(|(_, v)| (*v).to_owned())
        }
    };
    let config = AdminConfig::from_vars(vars(&[(TOKEN_VAR, "t")])).unwrap();
    assert_eq!(config.addr.to_string(), "127.0.0.1:7061");
    assert!(
        !format!("{config:?}").contains("\"t\""),
        "the token is not printed"
    );
    let config =
        AdminConfig::from_vars(vars(&[(TOKEN_VAR, "t"), (ADDR_VAR, "0.0.0.0:9000")])).unwrap();
    assert_eq!(config.addr.to_string(), "0.0.0.0:9000");
    for (pairs, var) in [
        (&[][..], TOKEN_VAR),
        (&[(TOKEN_VAR, "  ")][..], TOKEN_VAR),
        (&[(TOKEN_VAR, "t"), (ADDR_VAR, "localhost")][..], ADDR_VAR),
    ] {
        match AdminConfig::from_vars(vars(pairs)) {
            Err(err @ AdminError::Config { var: named, .. }) => {
                assert_eq!(named, var);
                assert!(err.to_string().starts_with(var), "{err}");
            }
            other => panic!("{pairs:?}: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_listens_where_configured_refuses_a_taken_address_and_stops_on_shutdown() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut config = AdminConfig::new(TOKEN).unwrap();
    config.addr = format!("127.0.0.1:{port}").parse().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(helix_messaging_admin::serve(
        config.clone(),
        Services::new(memory_hub().await),
        async {
            let _ = stopped.await;
        },
    ));
    let client = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}/v1/messaging/health");
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match client.get(&url).bearer_auth(TOKEN).send().await {
            Ok(response) => {
                assert_eq!(response.status(), 200);
                break;
            }
            Err(err) => {
                assert!(tokio::time::Instant::now() < deadline, "not serving: {err}");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
    }
    let taken =
        helix_messaging_admin::serve(config, Services::new(memory_hub().await), async {}).await;
    assert!(matches!(taken, Err(AdminError::Bind { .. })), "{taken:?}");
    stop.send(()).unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(10), server)
        .await
        .expect("stopped within 10 s")
        .unwrap()
        .unwrap();
}

/// A server whose hub has `broker` on both sides, serving what `add` adds.
async fn over(
    broker: Arc<dyn Broker>,
    config: AdminConfig,
    add: impl FnOnce(Services) -> Services,
) -> Server {
    let hub = Hub::new(HubConfig::default(), broker.clone(), broker, None)
        .await
        .unwrap();
    Server::configured(config, add(Services::new(hub.clone())), hub).await
}

/// A DLQ processor over a broker, holding `letters` (failed on `topic`).
struct Dlq {
    server: Server,
    broker: Arc<dyn Broker>,
    topic: String,
    ids: Vec<String>,
}

/// Redis Streams on the machine's Redis (`REDIS_URL`).
async fn redis_streams() -> Arc<dyn Broker> {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    helix_messaging::connect(&url.replacen("redis://", "redis-streams://", 1))
        .await
        .expect("Redis")
}

/// The machine's RabbitMQ (`RABBITMQ_URL`).
async fn rabbitmq() -> Arc<dyn Broker> {
    let url = std::env::var("RABBITMQ_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    helix_messaging::connect(&url).await.expect("RabbitMQ")
}

/// A DLQ server on the real Redis Streams.
async fn dlq_server(config: AdminConfig, letters: &[(&str, DeadLetterReason)]) -> Dlq {
    dlq_server_on(redis_streams().await, config, letters).await
}

async fn dlq_server_on(
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
    let info = DeliveryInfo {
        topic: topic.as_str().into(),
        group: Some("workers".into()),
        attempt: 3,
        redelivered: true,
        position: None,
    };
    let mut ids = Vec::new();
    for (payload, reason) in letters {
        let message = Message::new(payload.to_string()).with_header("type", "admin.test");
        let now = SystemTime::now();
        let letter = DeadLetter::new(&message, &info, *reason, "boom", now, now);
        ids.push(letter.id.clone());
        assert!(processor.ingest(letter).await.unwrap());
    }
    Dlq {
        server: over(broker.clone(), config, |s| s.with_dlq(processor)).await,
        broker,
        topic,
        ids,
    }
}

fn uuid_like() -> String {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{nanos:x}")
}

/// Send `request` and read its 200 JSON answer.
async fn call(request: reqwest::RequestBuilder) -> Value {
    json_of(request.send().await.unwrap()).await
}

async fn json_of(response: reqwest::Response) -> Value {
    let status = response.status();
    let path = response.url().path().to_owned();
    let body: Value = response.json().await.unwrap();
    assert_eq!(status, 200, "{path}: {body}");
    body
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

/// Poll the progress at `path` until it is neither running nor watching (15 s at most).
async fn until_done(s: &Server, path: &str) -> Value {
    let what = format!("{path} to finish");
    helix_messaging_testkit::eventually(Duration::from_secs(15), &what, || async {
        let progress = call(s.get(path)).await;
        (progress["status"] != "running" && progress["status"] != "watching").then_some(progress)
    })
    .await
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
        .json(&serde_json::json!({"rate_per_second": 0.5, "batch_size": 1}))
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
        (r#"{"rate_per_second": -1}"#, "rate_per_second"),
        (r#"{"batch_size": 0}"#, "batch_size"),
        (r#"{"target_topic": ""}"#, "target topic"),
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

/// Every operation the served OpenAPI document names is routed, answers with a status the
/// document gives for it, and an error body of the documented shape.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_in_the_openapi_document_is_served_as_documented() {
    let broker: Arc<dyn Broker> = Arc::new(helix_messaging_memory::MemoryBroker::new());
    let processor = Processor::new(
        broker.clone(),
        Arc::new(MemoryDeadLetterStore::new()),
        ProcessorConfig::default(),
    )
    .unwrap();
    let replays = ReplayHandler::new(broker.clone(), ReplayConfig::default());
    let s = over(broker, AdminConfig::new(TOKEN).unwrap(), |s| {
        s.with_dlq(processor).with_replay(replays)
    })
    .await;
    let doc = call(s.get("/v1/messaging/openapi.json")).await;
    assert_eq!(doc["openapi"], "3.0.3");
    let paths = doc["paths"].as_object().unwrap();
    let mut operations = 0;
    for (path, item) in paths {
        for (method, operation) in item.as_object().unwrap() {
            let method = match method.as_str() {
                "get" => reqwest::Method::GET,
                "post" => reqwest::Method::POST,
                "delete" => reqwest::Method::DELETE,
                "parameters" => continue,
                other => panic!("{path}: unexpected method {other}"),
            };
            operations += 1;
            let concrete = path
                .replace("{id}", "no-such-id")
                .replace("{side}", "tasks")
                .replace("{seq}", "999999");
            let response = s.request(method.clone(), &concrete).send().await.unwrap();
            let success = response.status().is_success();
            let status = response.status().as_u16().to_string();
            let documented = &operation["responses"][&status];
            assert!(
                documented.is_object(),
                "{method} {path}: {status} is not documented"
            );
            let body: Value = if success && path.ends_with("/metrics") {
                Value::Null
            } else {
                response.json().await.unwrap()
            };
            if !success {
                assert_ne!(
                    body["error"]["message"], "no such endpoint",
                    "{method} {path} is documented but not routed"
                );
                assert_ne!(status, "405", "{method} {path}: method not routed");
            }
            // Without its own `Authorization` header, every operation is refused.
            let anonymous = s
                .client
                .request(method.clone(), format!("{}{concrete}", s.base))
                .send()
                .await
                .unwrap();
            assert_eq!(anonymous.status(), 401, "{method} {path}");
            assert!(operation["responses"]["401"].is_object(), "{method} {path}");
        }
    }
    assert_eq!(operations, 21, "every operation of the API");
}

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
    let retried = call(s.request(
        reqwest::Method::POST,
        &format!("/v1/messaging/spools/tasks/refused/{}/retry", seqs[0]),
    ))
    .await;
    assert_eq!(retried["status"], "retried");
    let delivery = tokio::time::timeout(Duration::from_secs(15), sub.next())
        .await
        .expect("the retried message is forwarded within 15 s")
        .expect("open")
        .expect("no stream error");
    assert_eq!(delivery.message().id(), first_id);
    delivery.ack().await.unwrap();

    let discarded = call(s.request(
        reqwest::Method::DELETE,
        &format!("/v1/messaging/spools/tasks/refused/{}", seqs[1]),
    ))
    .await;
    assert_eq!(discarded["status"], "discarded");
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
