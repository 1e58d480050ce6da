//! Helpers shared by the admin API tests: the `Server` under test, the brokers it runs on,
//! and reading its answers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use helix_messaging_admin::{AdminConfig, Services};
use helix_messaging_core::dlq::{DeadLetter, DeadLetterReason, Processor};
use helix_messaging_core::hub::{Hub, HubConfig};
use helix_messaging_core::{Broker, DeliveryInfo, Message};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::Value;

pub(crate) const TOKEN: &str = "s3cret-admin-token";

pub(crate) struct Server {
    pub(crate) base: String,
    pub(crate) client: reqwest::Client,
    pub(crate) hub: Hub,
}

impl Server {
    pub(crate) async fn start(hub: Hub, prometheus: Option<PrometheusHandle>) -> Server {
        let mut services = Services::new(hub.clone());
        if let Some(handle) = prometheus {
            services = services.with_prometheus(handle);
        }
        Server::with(services, hub).await
    }

    async fn with(services: Services, hub: Hub) -> Server {
        Server::configured(AdminConfig::new(TOKEN).unwrap(), services, hub).await
    }

    pub(crate) async fn configured(config: AdminConfig, services: Services, hub: Hub) -> Server {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        // The real transport: header-read timeout, limits, client addresses, the lot.
        tokio::spawn(async move {
            helix_messaging_admin::serve_listener(
                listener,
                config,
                services,
                std::future::pending(),
            )
            .await
            .unwrap()
        });
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

    pub(crate) fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.client
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(TOKEN)
    }

    pub(crate) fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.client
            .get(format!("{}{path}", self.base))
            .bearer_auth(TOKEN)
    }
}

pub(crate) async fn memory_hub() -> Hub {
    let broker: Arc<dyn Broker> = Arc::new(helix_messaging_memory::MemoryBroker::new());
    Hub::new(HubConfig::default(), broker.clone(), broker, None)
        .await
        .unwrap()
}

pub(crate) async fn error_of(response: reqwest::Response) -> (u16, String) {
    let status = response.status().as_u16();
    let body: Value = response.json().await.expect("a JSON error body");
    assert_eq!(body["error"]["status"], status, "{body}");
    (
        status,
        body["error"]["message"].as_str().unwrap().to_owned(),
    )
}

/// A server whose hub has `broker` on both sides, serving what `add` adds.
pub(crate) async fn over(
    broker: Arc<dyn Broker>,
    config: AdminConfig,
    add: impl FnOnce(Services) -> Services,
) -> Server {
    let hub = Hub::new(HubConfig::default(), broker.clone(), broker, None)
        .await
        .unwrap();
    Server::configured(config, add(Services::new(hub.clone())), hub).await
}

/// Redis Streams on the machine's Redis (`REDIS_URL`).
pub(crate) async fn redis_streams() -> Arc<dyn Broker> {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    helix_messaging::connect(&url.replacen("redis://", "redis-streams://", 1))
        .await
        .expect("Redis")
}

/// The machine's RabbitMQ (`RABBITMQ_URL`).
pub(crate) async fn rabbitmq() -> Arc<dyn Broker> {
    let url = std::env::var("RABBITMQ_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    helix_messaging::connect(&url).await.expect("RabbitMQ")
}

pub(crate) fn uuid_like() -> String {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{nanos:x}")
}

/// Send `request` and read its 200 JSON answer.
pub(crate) async fn call(request: reqwest::RequestBuilder) -> Value {
    json_of(request.send().await.unwrap()).await
}

pub(crate) async fn json_of(response: reqwest::Response) -> Value {
    let status = response.status();
    let path = response.url().path().to_owned();
    let body: Value = response.json().await.unwrap();
    assert_eq!(status, 200, "{path}: {body}");
    body
}

/// Poll the progress at `path` until it is neither running nor watching (15 s at most).
pub(crate) async fn until_done(s: &Server, path: &str) -> Value {
    let what = format!("{path} to finish");
    helix_messaging_testkit::eventually(Duration::from_secs(15), &what, || async {
        let progress = call(s.get(path)).await;
        (progress["status"] != "running" && progress["status"] != "watching").then_some(progress)
    })
    .await
}

/// A dead letter of `message`, failed with `error` on `topic` in group `workers` on its third
/// attempt, at `at`.
pub(crate) fn failed(
    topic: &str,
    message: &Message,
    reason: DeadLetterReason,
    error: &str,
    at: SystemTime,
) -> DeadLetter {
    let info = DeliveryInfo {
        topic: topic.into(),
        group: Some("workers".into()),
        attempt: 3,
        redelivered: true,
        position: None,
    };
    DeadLetter::new(message, &info, reason, error, at, at)
}

/// Ingest into `processor` a letter per payload, failed on `topic` for `reason` just now;
/// their ids.
pub(crate) async fn ingest_failed(
    processor: &Processor,
    topic: &str,
    payloads: &[&str],
    reason: DeadLetterReason,
) -> Vec<String> {
    let mut ids = Vec::new();
    for payload in payloads {
        let letter = failed(
            topic,
            &Message::new(payload.to_string()),
            reason,
            "boom",
            SystemTime::now(),
        );
        ids.push(letter.id.clone());
        assert!(processor.ingest(letter).await.unwrap());
    }
    ids
}
