//! The admin API over real HTTP: a server on a free loopback port, requests with reqwest.

use std::net::SocketAddr;
use std::sync::Arc;

use helix_messaging_admin::{ADDR_VAR, AdminConfig, AdminError, TOKEN_VAR};
use helix_messaging_core::Broker;
use helix_messaging_core::hub::{Hub, HubConfig};
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
        let config = AdminConfig::new(TOKEN).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let app = helix_messaging_admin::router(&config, hub.clone(), prometheus);
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
        memory_hub().await,
        None,
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
    let taken = helix_messaging_admin::serve(config, memory_hub().await, None, async {}).await;
    assert!(matches!(taken, Err(AdminError::Bind { .. })), "{taken:?}");
    stop.send(()).unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(10), server)
        .await
        .expect("stopped within 10 s")
        .unwrap()
        .unwrap();
}
