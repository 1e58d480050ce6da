//! The admin API over real HTTP: a server on a free loopback port, requests with reqwest.
//!
//! This file holds health, authentication, errors, metrics, settings, serving and the OpenAPI
//! document; the DLQ, replay and spool endpoints have modules of their own, and `common` the
//! helpers they share.

mod capture;
mod common;
mod contract;
mod dlq;
mod exposure;
mod jobs;
mod queues;
mod replay;
mod spool;

use std::sync::Arc;
use std::time::Duration;

use common::{
    Server, TOKEN, call, error_of, ingest_failed, memory_hub, over, redis_streams, uuid_like,
};
use helix_messaging_admin::{
    ADDR_VAR, ALLOW_PLAINTEXT_VAR, AdminConfig, AdminError, MIN_TOKEN_LEN, READ_TOKEN_VAR,
    Services, TLS_CERT_VAR, TLS_KEY_VAR, TOKEN_VAR, TlsFiles,
};
use helix_messaging_core::dlq::{
    DeadLetterReason, MemoryDeadLetterStore, Processor, ProcessorConfig,
};
use helix_messaging_core::replay::{ReplayConfig, ReplayHandler};
use helix_messaging_core::{Broker, Message};
use serde_json::Value;

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

/// An id that is not UTF-8 in a path gets the JSON error every other bad request gets, not
/// axum's plain-text rejection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_that_are_not_utf8_get_the_json_error() {
    let server = Server::start(memory_hub().await, None).await;
    for path in [
        "/v1/messaging/dlq/%FF%FE",
        "/v1/messaging/replay/%C3%28",
        "/v1/messaging/spools/%FF/refused",
    ] {
        let response = server.get(path).send().await.unwrap();
        let status = response.status().as_u16();
        let body: Value = response.json().await.expect("a JSON body");
        assert_eq!(status, 400, "{path}: {body}");
        assert_eq!(body["error"]["status"], 400, "{path}: {body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{path}: {body}"
        );
    }
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
    // One task for workers of a queue of its own (the depth queue's gauges stay at 0), so a
    // delivery is timed.
    let timed = hub
        .subscribe_tasks("admin.metrics.latency", |_task, _envelope| async { Ok(()) })
        .await
        .unwrap();
    hub.publish_task("admin.metrics.latency", &task)
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
    // Latency is a Prometheus histogram (buckets, aggregatable across instances), not a
    // summary of one process's quantiles.
    until_metric(
        &server,
        "messaging_delivery_latency_seconds_bucket{backend=\"memory\",topic=\"admin.metrics.latency\",le=\"+Inf\"}",
        "1",
    )
    .await;
    // The worker's ack, and the publish's duration, in the Prometheus text too.
    until_metric(
        &server,
        "messaging_messages_acked_total{backend=\"memory\",topic=\"admin.metrics.latency\"}",
        "1",
    )
    .await;
    let text = call_text(&server).await;
    assert!(
        text.contains("messaging_publish_latency_seconds_bucket{backend=\"memory\",le=\"+Inf\"}"),
        "{text}"
    );
    let buckets: Vec<&str> = text
        .lines()
        .filter(|l| {
            l.starts_with("messaging_delivery_latency_seconds_bucket{")
                && l.contains("topic=\"admin.metrics.latency\"")
        })
        .collect();
    assert_eq!(
        buckets.len(),
        helix_messaging_core::observe::LATENCY_BUCKETS.len() + 1,
        "one line per documented bucket and +Inf: {buckets:?}"
    );
    assert!(
        text.contains("# TYPE messaging_delivery_latency_seconds histogram"),
        "{text}"
    );
    assert!(
        !text.contains("quantile="),
        "no summary is rendered:\n{text}"
    );
    workers.shutdown().await;
    timed.shutdown().await;
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

/// The Prometheus text at `/v1/messaging/metrics` now.
async fn call_text(server: &Server) -> String {
    let response = server.get("/v1/messaging/metrics").send().await.unwrap();
    assert_eq!(response.status(), 200);
    response.text().await.unwrap()
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
    let ids = ingest_failed(
        &processor,
        &topic,
        &["one", "two"],
        DeadLetterReason::MaxRetriesExceeded,
    )
    .await;
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
    // The gauge, the listing's count and the store's depth agree: a discarded entry no
    // longer counts towards any of them, and is listed when asked for by its status.
    let path = format!("/v1/messaging/dlq/{}/discard", ids[1]);
    call(server.request(reqwest::Method::DELETE, &path)).await;
    until_metric(&server, "messaging_dlq_messages_total", "0").await;
    let listed = call(server.get("/v1/messaging/dlq")).await;
    assert_eq!(listed["count"], 0, "as the gauge: {listed}");
    assert_eq!(processor.stats().await.unwrap().depth, 0);
    let discarded = call(server.get("/v1/messaging/dlq?status=discarded")).await;
    assert_eq!(discarded["count"], 1, "{discarded}");
    assert_eq!(
        discarded["messages"][0]["status"], "discarded",
        "{discarded}"
    );

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
    let text = call_text(&server).await;
    assert!(
        !text.contains("quantile="),
        "no summary is rendered:\n{text}"
    );
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
    const LONG: &str = "0123456789abcdef";
    const READ: &str = "read-only-0123456789";
    let config = AdminConfig::from_vars(vars(&[(TOKEN_VAR, LONG)])).unwrap();
    assert_eq!(config.addr.to_string(), "127.0.0.1:7061");
    assert_eq!(config.tls, None);
    assert!(!config.allow_plaintext);
    let config = AdminConfig::from_vars(vars(&[
        (TOKEN_VAR, LONG),
        (READ_TOKEN_VAR, READ),
        (ADDR_VAR, "0.0.0.0:9000"),
        (TLS_CERT_VAR, "/etc/admin/cert.pem"),
        (TLS_KEY_VAR, "/etc/admin/key.pem"),
        (ALLOW_PLAINTEXT_VAR, "true"),
    ]))
    .unwrap();
    assert_eq!(config.addr.to_string(), "0.0.0.0:9000");
    assert_eq!(
        config.tls,
        Some(TlsFiles {
            cert: "/etc/admin/cert.pem".into(),
            key: "/etc/admin/key.pem".into()
        })
    );
    assert!(config.allow_plaintext);
    let printed = format!("{config:?}");
    assert!(
        !printed.contains(LONG) && !printed.contains(READ),
        "the tokens are not printed: {printed}"
    );
    for (pairs, var) in [
        (&[][..], TOKEN_VAR),
        (&[(TOKEN_VAR, "  ")][..], TOKEN_VAR),
        // Shorter than MIN_TOKEN_LEN.
        (&[(TOKEN_VAR, "0123456789abcde")][..], TOKEN_VAR),
        (&[(TOKEN_VAR, "0123456789 abcdef")][..], TOKEN_VAR),
        (&[(TOKEN_VAR, "pässwort-0123456789")][..], TOKEN_VAR),
        (
            &[(TOKEN_VAR, LONG), (READ_TOKEN_VAR, "short")][..],
            READ_TOKEN_VAR,
        ),
        (
            &[(TOKEN_VAR, LONG), (READ_TOKEN_VAR, LONG)][..],
            READ_TOKEN_VAR,
        ),
        (&[(TOKEN_VAR, LONG), (ADDR_VAR, "localhost")][..], ADDR_VAR),
        (
            &[(TOKEN_VAR, LONG), (TLS_CERT_VAR, "/c.pem")][..],
            TLS_KEY_VAR,
        ),
        (
            &[(TOKEN_VAR, LONG), (TLS_KEY_VAR, "/k.pem")][..],
            TLS_CERT_VAR,
        ),
        (
            &[(TOKEN_VAR, LONG), (ALLOW_PLAINTEXT_VAR, "maybe")][..],
            ALLOW_PLAINTEXT_VAR,
        ),
    ] {
        match AdminConfig::from_vars(vars(pairs)) {
            Err(err @ AdminError::Config { var: named, .. }) => {
                assert_eq!(named, var, "{pairs:?}: {err}");
                assert!(err.to_string().starts_with(var), "{err}");
            }
            other => panic!("{pairs:?}: {other:?}"),
        }
    }
    let short = AdminConfig::new("0123456789abcde").unwrap_err().to_string();
    assert!(
        short.contains(&MIN_TOKEN_LEN.to_string()),
        "the error names the minimum: {short}"
    );
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
            let body: Value = if success && path.ends_with("/metrics") || !path.starts_with("/v1/")
            {
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
            // The root probes answer anybody; every other operation needs a token.
            if operation["security"] == serde_json::json!([]) {
                assert!(!path.starts_with("/v1/"), "{path} is open to anybody");
                continue;
            }
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
    assert_eq!(
        operations, 24,
        "every operation of the API, the root probes included"
    );
}
