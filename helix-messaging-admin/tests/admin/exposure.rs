//! Safe to expose: the two token scopes, the root probes, the transport's timeouts and
//! limits, TLS, the refusal to serve plain HTTP beyond loopback, the audit trail and the
//! rate-limited authentication log. Every check runs over real HTTP against `serve`.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use helix_messaging_admin::{
    ADDR_VAR, AUDIT_TARGET, AdminConfig, AdminError, Services, TlsFiles, serve,
};
use helix_messaging_core::Message;
use helix_messaging_core::dlq::{
    DeadLetterReason, MemoryDeadLetterStore, Processor, ProcessorConfig,
};
use helix_messaging_core::replay::{ReplayConfig, ReplayHandler};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::capture;
use crate::common::{
    Server, TOKEN, error_of, failed, ingest_failed, memory_hub, redis_streams, uuid_like,
};

const READ_TOKEN: &str = "read-only-token-0123";

/// A server configured by `config` over a memory hub.
async fn memory_server(config: AdminConfig) -> Server {
    let hub = memory_hub().await;
    Server::configured(config, Services::new(hub.clone()), hub).await
}

/// A server on the real Redis Streams with a DLQ holding two letters and a replay handler,
/// taking both tokens.
async fn scoped_server(config: AdminConfig) -> (Server, Vec<String>) {
    let broker = redis_streams().await;
    let processor = Processor::new(
        broker.clone(),
        Arc::new(MemoryDeadLetterStore::new()),
        ProcessorConfig::default(),
    )
    .unwrap();
    let topic = format!("admin.scoped.{}", uuid_like());
    let ids = ingest_failed(
        &processor,
        &topic,
        &["one", "two"],
        DeadLetterReason::Permanent,
    )
    .await;
    let replays = ReplayHandler::new(broker.clone(), ReplayConfig::default());
    let hub = helix_messaging_core::hub::Hub::new(
        helix_messaging_core::hub::HubConfig::default(),
        broker.clone(),
        broker,
        None,
    )
    .await
    .unwrap();
    let services = Services::new(hub.clone())
        .with_dlq(processor)
        .with_replay(replays);
    (Server::configured(config, services, hub).await, ids)
}

async fn listing(s: &Server) -> Value {
    s.get("/v1/messaging/dlq")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn both_tokens() -> AdminConfig {
    AdminConfig::new(TOKEN)
        .unwrap()
        .with_read_token(READ_TOKEN)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_read_token_reads_everything_and_changes_nothing() {
    let (s, ids) = scoped_server(both_tokens()).await;
    let as_reader = |method: reqwest::Method, path: &str| {
        s.client
            .request(method, format!("{}{path}", s.base))
            .bearer_auth(READ_TOKEN)
    };
    for path in [
        "/v1/messaging/health",
        "/v1/messaging/openapi.json",
        "/v1/messaging/dlq",
        "/v1/messaging/dlq/groups",
        &format!("/v1/messaging/dlq/{}", ids[0]),
        "/v1/messaging/dlq/redrives",
        "/v1/messaging/replay",
        "/v1/messaging/spools",
    ] {
        let response = as_reader(reqwest::Method::GET, path).send().await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
    }
    // The scheme's case does not matter (RFC 9110).
    let lower = s
        .client
        .get(format!("{}/v1/messaging/dlq", s.base))
        .header("authorization", format!("bearer {READ_TOKEN}"))
        .send()
        .await
        .unwrap();
    assert_eq!(lower.status(), 200);
    let before = listing(&s).await;
    assert_eq!(before["count"], 2, "{before}");
    let now = chrono::Utc::now().to_rfc3339();
    for (method, path, body) in [
        (
            reqwest::Method::POST,
            format!("/v1/messaging/dlq/{}/reprocess", ids[0]),
            None,
        ),
        (
            reqwest::Method::DELETE,
            format!("/v1/messaging/dlq/{}", ids[0]),
            None,
        ),
        (
            reqwest::Method::DELETE,
            format!("/v1/messaging/dlq/{}/discard", ids[0]),
            None,
        ),
        (
            reqwest::Method::POST,
            "/v1/messaging/dlq/redrives".to_owned(),
            Some(json!({"filter": {"reason": "permanent"}})),
        ),
        (
            reqwest::Method::DELETE,
            "/v1/messaging/dlq/redrives/some-job".to_owned(),
            None,
        ),
        (
            reqwest::Method::POST,
            "/v1/messaging/replay".to_owned(),
            Some(json!({"topic": "admin.scoped.src", "from_time": now, "to_time": now})),
        ),
        (
            reqwest::Method::DELETE,
            "/v1/messaging/replay/some-replay".to_owned(),
            None,
        ),
        (
            reqwest::Method::POST,
            "/v1/messaging/spools/tasks/refused/1/retry".to_owned(),
            None,
        ),
        (
            reqwest::Method::DELETE,
            "/v1/messaging/spools/tasks/refused/1".to_owned(),
            None,
        ),
    ] {
        let mut request = as_reader(method.clone(), &path);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let (status, message) = error_of(request.send().await.unwrap()).await;
        assert_eq!(status, 403, "{method} {path}: {message}");
        assert!(message.contains("admin token"), "{message}");
    }
    // Nothing changed.
    assert_eq!(listing(&s).await, before);
    // The admin token still changes things, and a third token is nobody.
    let reprocessed = s
        .request(
            reqwest::Method::POST,
            &format!("/v1/messaging/dlq/{}/reprocess", ids[0]),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(reprocessed.status(), 200);
    let stranger = s
        .client
        .get(format!("{}/v1/messaging/dlq", s.base))
        .bearer_auth("somebody-else-0123456789")
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(stranger).await.0, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_root_probes_answer_without_a_token_with_one_word() {
    let s = Server::start(memory_hub().await, None).await;
    let anonymous = |path: &str| s.client.get(format!("{}{path}", s.base)).send();
    for (path, word) in [("/health", "healthy"), ("/ready", "ready")] {
        let response = anonymous(path).await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
        assert!(
            response.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/plain"),
            "{path}"
        );
        assert_eq!(
            response.text().await.unwrap(),
            format!("{word}\n"),
            "{path}"
        );
    }
    // The details stay behind the token.
    let details = anonymous("/v1/messaging/health").await.unwrap();
    assert_eq!(error_of(details).await.0, 401);

    s.hub.close().await.unwrap();
    for (path, word) in [("/health", "unhealthy"), ("/ready", "unready")] {
        // The last finding is reused for up to PROBE_REUSE.
        let within = helix_messaging_admin::PROBE_REUSE + Duration::from_secs(5);
        let text = helix_messaging_testkit::eventually(within, path, || async {
            let response = anonymous(path).await.unwrap();
            (response.status() == 503).then_some(response.text().await.unwrap())
        })
        .await;
        assert_eq!(text, format!("{word}\n"), "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serving_plain_http_beyond_loopback_is_refused_and_says_why() {
    capture::install();
    let mut config = AdminConfig::new(TOKEN).unwrap();
    // Not bound: the refusal comes first. A documentation address, never reachable.
    config.addr = "192.0.2.7:7061".parse().unwrap();
    let services = Services::new(memory_hub().await);
    let refused = tokio::time::timeout(
        Duration::from_secs(10),
        serve(config.clone(), services.clone(), std::future::pending()),
    )
    .await
    .expect("refused at once");
    match refused {
        Err(err @ AdminError::Config { var, .. }) => {
            assert_eq!(var, ADDR_VAR);
            let text = err.to_string();
            assert!(
                text.contains("MESSAGING_ADMIN_TLS_CERT")
                    && text.contains("MESSAGING_ADMIN_ALLOW_PLAINTEXT"),
                "says how to fix it: {text}"
            );
        }
        other => panic!("{other:?}"),
    }
    let logged = capture::captured(|e| {
        e.level == tracing::Level::ERROR && e.field("addr") == "192.0.2.7:7061"
    });
    assert_eq!(logged.len(), 1, "one log line says why: {logged:?}");
    assert!(
        logged[0].field("message").contains("in the clear"),
        "{logged:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_is_served_from_the_configured_pem_files() {
    let dir = std::env::temp_dir().join(format!("helix-admin-tls-{}", uuid_like()));
    std::fs::create_dir_all(&dir).unwrap();
    helix_messaging_testkit::test_certificates(&dir);
    let mut config = AdminConfig::new(TOKEN).unwrap();
    config.tls = Some(TlsFiles {
        cert: dir.join("server.pem"),
        key: dir.join("server.key"),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let services = Services::new(memory_hub().await);
    tokio::spawn(helix_messaging_admin::serve_listener(
        listener,
        config,
        services,
        std::future::pending(),
    ));
    let ca = reqwest::Certificate::from_pem(&std::fs::read(dir.join("ca.pem")).unwrap()).unwrap();
    let client = reqwest::Client::builder()
        .use_rustls_tls()
        .add_root_certificate(ca)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let response = client
        .get(format!("https://localhost:{port}/v1/messaging/health"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    // Plain HTTP to the TLS port gets no answer.
    let plain = client
        .get(format!("http://127.0.0.1:{port}/health"))
        .send()
        .await;
    assert!(plain.is_err(), "{plain:?}");
    // A client that does not trust the CA is turned away by its own check.
    let untrusting = reqwest::Client::builder()
        .use_rustls_tls()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let err = untrusting
        .get(format!("https://localhost:{port}/health"))
        .send()
        .await
        .expect_err("an unknown issuer");
    assert!(err.is_connect(), "{err:?}");

    // Files that are not what they claim are refused, naming the variable.
    let mut config = AdminConfig::new(TOKEN).unwrap();
    config.tls = Some(TlsFiles {
        cert: dir.join("server.key"),
        key: dir.join("server.key"),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let refused = helix_messaging_admin::serve_listener(
        listener,
        config,
        Services::new(memory_hub().await),
        std::future::pending(),
    )
    .await;
    assert!(
        matches!(
            &refused,
            Err(AdminError::Config {
                var: "MESSAGING_ADMIN_TLS_CERT",
                ..
            })
        ),
        "{refused:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Read from `stream` until the server closes it or `within` passes; what was read.
async fn read_until_closed(stream: &mut TcpStream, within: Duration) -> Option<Vec<u8>> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0) | Err(_)) => return Some(got),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_finishes_its_headers_is_disconnected() {
    let mut config = AdminConfig::new(TOKEN).unwrap();
    config.header_read_timeout = Duration::from_millis(500);
    let s = memory_server(config).await;
    let addr = s.base.trim_start_matches("http://").to_owned();
    let mut silent = TcpStream::connect(&addr).await.unwrap();
    let mut partial = TcpStream::connect(&addr).await.unwrap();
    partial
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    for stream in [&mut silent, &mut partial] {
        let closed = read_until_closed(stream, Duration::from_secs(10)).await;
        assert!(closed.is_some(), "still open after 10 s");
    }
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "closed by the timeout, not at once: {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_over_its_time_or_beyond_the_concurrency_limit_gets_503() {
    capture::install();
    let mut config = AdminConfig::new(TOKEN).unwrap();
    config.request_timeout = Duration::from_millis(500);
    config.max_concurrent_requests = 1;
    let s = memory_server(config).await;
    let addr = s.base.trim_start_matches("http://").to_owned();
    // A body announced and never sent holds the one slot until the request timeout.
    let hold = || async {
        let mut slow = TcpStream::connect(&addr).await.unwrap();
        slow.write_all(
            format!(
                "POST /v1/messaging/replay HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\
                 Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"topic\""
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        slow
    };
    let mut slow = hold().await;
    // Ask until a request is turned away. Until the slow request holds the slot another may
    // get in, and one that is under way as the slow request arrives turns *it* away: then
    // (its answer is readable) it is sent again.
    let deadline = Instant::now() + Duration::from_secs(10);
    let turned_away = loop {
        let response = s.get("/v1/messaging/openapi.json").send().await.unwrap();
        if response.status() == 503 {
            break response;
        }
        let mut byte = [0u8; 1];
        match slow.try_read(&mut byte) {
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {}
            _ => slow = hold().await,
        }
        assert!(
            Instant::now() < deadline,
            "a second request while the slot is held is refused"
        );
    };
    assert_eq!(turned_away.headers()["retry-after"], "1");
    let (status, message) = error_of(turned_away).await;
    assert_eq!(status, 503);
    assert!(message.contains("too many requests"), "{message}");
    // The probes stand outside the limit.
    let probe = s
        .client
        .get(format!("{}/health", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(probe.status(), 200);

    let answer = read_until_closed(&mut slow, Duration::from_secs(10))
        .await
        .expect("answered and closed within 10 s");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("request timeout"), "{answer}");
    // Cut short by its timeout, it is still in the audit trail, as failed.
    let request_id = answer
        .lines()
        .find_map(|l| l.strip_prefix("x-request-id: "))
        .expect("the answer names its request id")
        .trim()
        .to_owned();
    let events =
        capture::captured(|e| e.target == AUDIT_TARGET && e.field("request_id") == request_id);
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].field("outcome"), "failed", "{events:?}");
    assert_eq!(events[0].field("action"), "replay.start", "{events:?}");
    assert!(
        events[0].field("detail").contains("cut short"),
        "{events:?}"
    );
    // The slot is free again.
    let after = s.get("/v1/messaging/openapi.json").send().await.unwrap();
    assert_eq!(after.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_idle_half_open_connections_neither_exhaust_the_server_nor_delay_a_probe() {
    let mut config = AdminConfig::new(TOKEN).unwrap();
    config.header_read_timeout = Duration::from_secs(3);
    let s = memory_server(config).await;
    let addr = s.base.trim_start_matches("http://").to_owned();
    let mut idle = Vec::with_capacity(1000);
    for i in 0..1000 {
        let mut stream = TcpStream::connect(&addr).await.unwrap();
        if i % 2 == 0 {
            // Half of them start a request and never finish its headers.
            stream
                .write_all(b"GET /v1/messaging/dlq HTTP/1.1\r\nHost: x\r\n")
                .await
                .unwrap();
        }
        idle.push(stream);
    }
    let probe_timeout = Duration::from_secs(2);
    let probes = reqwest::Client::builder()
        .timeout(probe_timeout)
        .build()
        .unwrap();
    for path in ["/health", "/ready"] {
        let response = probes
            .get(format!("{}{path}", s.base))
            .send()
            .await
            .unwrap_or_else(|err| panic!("{path} within {probe_timeout:?}: {err}"));
        assert_eq!(response.status(), 200, "{path}");
    }
    let api = s.get("/v1/messaging/health").send().await.unwrap();
    assert_eq!(api.status(), 200);
    // And the server lets every one of them go after the header-read timeout.
    for stream in &mut idle {
        assert!(
            read_until_closed(stream, Duration::from_secs(15))
                .await
                .is_some(),
            "an idle connection outlived the header-read timeout"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_state_changing_request_leaves_one_audit_event_with_its_request_id() {
    capture::install();
    let (s, ids) = scoped_server(both_tokens()).await;
    let tag = uuid_like();
    let now = chrono::Utc::now();
    let (from, to) = (
        (now - chrono::Duration::minutes(1)).to_rfc3339(),
        now.to_rfc3339(),
    );
    let replay_id = format!("audit-{tag}");
    let cases = [
        (
            "dlq.reprocess",
            reqwest::Method::POST,
            format!("/v1/messaging/dlq/{}/reprocess", ids[0]),
            None,
            200,
        ),
        (
            "dlq.discard",
            reqwest::Method::DELETE,
            format!("/v1/messaging/dlq/{}/discard", ids[1]),
            Some(json!({"reason": "audited"})),
            200,
        ),
        (
            "dlq.redrive.start",
            reqwest::Method::POST,
            "/v1/messaging/dlq/redrives".to_owned(),
            Some(json!({"filter": {"topic": "admin.audit.none"}})),
            202,
        ),
        (
            "dlq.redrive.cancel",
            reqwest::Method::DELETE,
            "/v1/messaging/dlq/redrives/no-such-job".to_owned(),
            None,
            404,
        ),
        (
            "replay.start",
            reqwest::Method::POST,
            "/v1/messaging/replay".to_owned(),
            Some(
                json!({"id": replay_id, "topic": format!("admin.audit.{tag}"), "from_time": from, "to_time": to}),
            ),
            202,
        ),
        (
            "replay.cancel",
            reqwest::Method::DELETE,
            format!("/v1/messaging/replay/{replay_id}"),
            None,
            200,
        ),
    ];
    for (i, (action, method, path, body, status)) in cases.into_iter().enumerate() {
        let request_id = format!("audit-{tag}-{i}");
        let mut request = s
            .request(method.clone(), &path)
            .header("x-request-id", &request_id);
        if let Some(body) = &body {
            request = request.json(body);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), status, "{method} {path}");
        assert_eq!(response.headers()["x-request-id"], request_id.as_str());
        let events =
            capture::captured(|e| e.target == AUDIT_TARGET && e.field("request_id") == request_id);
        assert_eq!(events.len(), 1, "{action}: one event: {events:?}");
        let event = &events[0];
        assert_eq!(event.level, tracing::Level::INFO);
        assert_eq!(event.field("action"), action, "{event:?}");
        assert_eq!(event.field("scope"), "admin", "{event:?}");
        assert!(event.field("client").starts_with("127.0.0.1:"), "{event:?}");
        assert_eq!(event.field("status"), status.to_string(), "{event:?}");
        let outcome = if status < 300 { "done" } else { "refused" };
        assert_eq!(event.field("outcome"), outcome, "{event:?}");
        if path.contains(&ids[0]) || path.contains(&ids[1]) || path.contains(&replay_id) {
            let id = path.split('/').nth(4).unwrap();
            assert!(event.field("ids").contains(id), "{event:?}");
        }
        if let Some(body) = &body {
            let quoted: Value = serde_json::from_str(event.field("request")).unwrap();
            assert_eq!(&quoted, body, "{event:?}");
        }
    }
    // A refused write is audited with the scope that tried it; a read is not audited; a
    // request without an id of its own gets a fresh one.
    let response = s
        .client
        .post(format!("{}/v1/messaging/dlq/{}/reprocess", s.base, ids[0]))
        .bearer_auth(READ_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    let generated = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(generated.len(), 36, "a UUID: {generated}");
    let events =
        capture::captured(|e| e.target == AUDIT_TARGET && e.field("request_id") == generated);
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].field("scope"), "read");
    assert_eq!(events[0].field("outcome"), "refused");
    // An id a client should not choose is replaced by a fresh one.
    for unusable in ["has spaces in it", &"x".repeat(200)] {
        let response = s
            .request(
                reqwest::Method::DELETE,
                "/v1/messaging/replay/no-such-replay",
            )
            .header("x-request-id", unusable)
            .send()
            .await
            .unwrap();
        let id = response.headers()["x-request-id"].to_str().unwrap();
        assert_eq!(id.len(), 36, "a UUID, not {unusable:?}: {id}");
    }
    let read = s
        .get("/v1/messaging/dlq")
        .header("x-request-id", format!("read-{tag}"))
        .send()
        .await
        .unwrap();
    assert_eq!(read.status(), 200);
    assert!(
        capture::captured(|e| e.field("request_id") == format!("read-{tag}")).is_empty(),
        "reads are not audited"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_authentication_is_logged_but_cannot_flood_the_log() {
    capture::install();
    let s = Server::start(memory_hub().await, None).await;
    let path = format!("/v1/messaging/dlq/guess-{}", uuid_like());
    for _ in 0..50 {
        let response = s
            .client
            .get(format!("{}{path}", s.base))
            .bearer_auth("a-wrong-guess-0123456789")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 401);
    }
    let logged = capture::captured(|e| e.field("path") == path);
    assert_eq!(logged.len(), 1, "{logged:?}");
    assert_eq!(logged[0].level, tracing::Level::WARN);
    assert_eq!(logged[0].field("why"), "the bearer token is wrong");
    assert!(logged[0].field("client").starts_with("127.0.0.1:"));
    // The guess itself is never logged.
    assert!(!format!("{logged:?}").contains("a-wrong-guess"));
}

const BOOM: &str = "the health check exploded";

/// How [`OddHealth`] answers a health check: [`NORMAL`], [`PANIC`] or [`HANG`] (normal
/// while the hub is built; each test runs in a process of its own under nextest).
static HEALTH: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(NORMAL);
/// How many health checks [`OddHealth`] has answered.
static CHECKS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
const NORMAL: u8 = 0;
const PANIC: u8 = 1;
const HANG: u8 = 2;

/// The memory broker, except that its health check panics or never answers when told to.
#[derive(Debug)]
struct OddHealth(helix_messaging_memory::MemoryBroker);

#[helix_messaging_core::async_trait]
impl helix_messaging_core::Publisher for OddHealth {
    async fn publish(&self, topic: &str, message: Message) -> helix_messaging_core::Result<()> {
        self.0.publish(topic, message).await
    }
}

#[helix_messaging_core::async_trait]
impl helix_messaging_core::Subscriber for OddHealth {
    async fn subscribe(
        &self,
        topic: &str,
        options: helix_messaging_core::SubscribeOptions,
    ) -> helix_messaging_core::Result<helix_messaging_core::Subscription> {
        self.0.subscribe(topic, options).await
    }
}

#[helix_messaging_core::async_trait]
impl helix_messaging_core::Broker for OddHealth {
    fn name(&self) -> &'static str {
        self.0.name()
    }

    fn capabilities(&self) -> helix_messaging_core::Capabilities {
        self.0.capabilities()
    }

    async fn health(&self) -> helix_messaging_core::Health {
        CHECKS.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        match HEALTH.load(std::sync::atomic::Ordering::Acquire) {
            PANIC => panic!("{BOOM}"),
            HANG => std::future::pending().await,
            _ => self.0.health().await,
        }
    }

    async fn close(&self) -> helix_messaging_core::Result<()> {
        self.0.close().await
    }
}

/// A handler that panics answers 500 with the API's JSON error, and the server goes on
/// serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_request_gets_a_500_and_the_server_serves_on() {
    let broker: Arc<dyn helix_messaging_core::Broker> =
        Arc::new(OddHealth(helix_messaging_memory::MemoryBroker::new()));
    let s = crate::common::over(broker, AdminConfig::new(TOKEN).unwrap(), |s| s).await;
    HEALTH.store(PANIC, std::sync::atomic::Ordering::Release);
    let response = s
        .get("/v1/messaging/health")
        .send()
        .await
        .expect("an answer, not a dropped connection");
    let (status, message) = error_of(response).await;
    assert_eq!(status, 500);
    assert!(message.contains(BOOM), "{message}");
    HEALTH.store(NORMAL, std::sync::atomic::Ordering::Release);
    let health = s.get("/v1/messaging/health").send().await.unwrap();
    assert_eq!(health.status(), 200);
}

/// A probe never waits on brokers that do not answer: past `PROBE_HEALTH_TIMEOUT` it says
/// `unhealthy` / `unready` with 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_answers_503_when_the_brokers_do_not_answer_in_time() {
    let broker: Arc<dyn helix_messaging_core::Broker> =
        Arc::new(OddHealth(helix_messaging_memory::MemoryBroker::new()));
    let s = crate::common::over(broker, AdminConfig::new(TOKEN).unwrap(), |s| s).await;
    HEALTH.store(HANG, std::sync::atomic::Ordering::Release);
    for (path, word) in [("/health", "unhealthy"), ("/ready", "unready")] {
        let response = s
            .client
            .get(format!("{}{path}", s.base))
            .timeout(helix_messaging_admin::PROBE_HEALTH_TIMEOUT + Duration::from_secs(3))
            .send()
            .await
            .unwrap_or_else(|err| panic!("{path} answers: {err}"));
        assert_eq!(response.status(), 503, "{path}");
        assert_eq!(response.text().await.unwrap(), format!("{word}\n"));
    }
}

/// Beyond `max_connections`, a new connection waits to be accepted until one closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_beyond_the_cap_waits_until_one_closes() {
    let mut config = AdminConfig::new(TOKEN).unwrap();
    config.max_connections = 2;
    let s = memory_server(config).await;
    let addr = s.base.trim_start_matches("http://").to_owned();
    let first = TcpStream::connect(&addr).await.unwrap();
    let _second = TcpStream::connect(&addr).await.unwrap();
    let mut probe = {
        let url = format!("{}/health", s.base);
        let client = s.client.clone();
        tokio::spawn(async move { client.get(url).send().await.map(|r| r.status()) })
    };
    // Both slots are held (for the 10 s header-read timeout): the third is not served.
    let waited = tokio::time::timeout(Duration::from_millis(500), &mut probe).await;
    assert!(waited.is_err(), "served beyond the cap: {waited:?}");
    drop(first);
    let status = tokio::time::timeout(Duration::from_secs(10), probe)
        .await
        .expect("served once a slot is free")
        .unwrap();
    assert_eq!(status.unwrap(), 200);
}

/// A client without a token is answered 401 before its body is read, so it cannot hold a
/// request slot; nor can the read-only token with a write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_the_right_token_cannot_hold_a_request_slot() {
    let mut config = both_tokens();
    config.max_concurrent_requests = 1;
    let s = memory_server(config).await;
    let addr = s.base.trim_start_matches("http://").to_owned();
    for authorization in [
        "",
        "Authorization: Bearer wrong-token-0123456789\r\n",
        &format!("Authorization: Bearer {READ_TOKEN}\r\n"),
    ] {
        let mut stalled = TcpStream::connect(&addr).await.unwrap();
        stalled
            .write_all(
                format!(
                    "POST /v1/messaging/replay HTTP/1.1\r\nHost: x\r\n{authorization}\
                     Content-Type: application/json\r\nContent-Length: 1000000\r\n\r\n{{"
                )
                .as_bytes(),
            )
            .await
            .unwrap();
        // Answered at once, its body never read.
        let mut head = [0u8; 12];
        tokio::time::timeout(Duration::from_secs(10), stalled.read_exact(&mut head))
            .await
            .expect("answered without its body")
            .unwrap();
        let head = String::from_utf8_lossy(&head).into_owned();
        let expected = if authorization.contains(READ_TOKEN) {
            "403"
        } else {
            "401"
        };
        assert!(head.ends_with(expected), "{authorization:?}: {head}");
        // The one slot is free for the admin.
        let admin = s.get("/v1/messaging/openapi.json").send().await.unwrap();
        assert_eq!(admin.status(), 200, "{authorization:?}");
    }
}

/// An answer of any size reaches the client whole: the audit trail never reads it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_answer_to_a_write_arrives_whole() {
    let broker = redis_streams().await;
    let processor = Processor::new(
        broker.clone(),
        Arc::new(MemoryDeadLetterStore::new()),
        ProcessorConfig::default(),
    )
    .unwrap();
    let tag = uuid_like();
    // 80 groups, each with a sample error of 1,000 characters: well over 64 KiB of JSON.
    for i in 0..80 {
        let letter = failed(
            &format!("admin.large.{tag}.{i}"),
            &Message::new("x"),
            DeadLetterReason::Permanent,
            &"e".repeat(1000),
            SystemTime::now(),
        );
        assert!(processor.ingest(letter).await.unwrap());
    }
    let s = crate::common::over(broker, AdminConfig::new(TOKEN).unwrap(), |s| {
        s.with_dlq(processor)
    })
    .await;
    let response = s
        .request(reqwest::Method::POST, "/v1/messaging/dlq/redrives")
        .json(&json!({"all": true, "dry_run": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body = response.bytes().await.unwrap();
    assert!(body.len() > 64 * 1024, "{} bytes", body.len());
    let preview: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(preview["count"], 80);
    assert_eq!(preview["total"], 80);
}

/// However many ask the probes, without a token, the brokers are checked at most once per
/// `PROBE_REUSE`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_share_one_broker_check_per_reuse_period() {
    let broker: Arc<dyn helix_messaging_core::Broker> =
        Arc::new(OddHealth(helix_messaging_memory::MemoryBroker::new()));
    let s = crate::common::over(broker, AdminConfig::new(TOKEN).unwrap(), |s| s).await;
    let before = CHECKS.load(std::sync::atomic::Ordering::Acquire);
    let started = Instant::now();
    let probes = (0..50).map(|i| {
        let url = format!(
            "{}{}",
            s.base,
            if i % 2 == 0 { "/health" } else { "/ready" }
        );
        let client = s.client.clone();
        async move { client.get(url).send().await.unwrap().status() }
    });
    for status in futures::future::join_all(probes).await {
        assert_eq!(status, 200);
    }
    let checks = CHECKS.load(std::sync::atomic::Ordering::Acquire) - before;
    // The hub checks both sides (one broker here, asked once per side) per probe check.
    let periods =
        started.elapsed().as_secs_f64() / helix_messaging_admin::PROBE_REUSE.as_secs_f64();
    let most = 2 * (periods.ceil() as usize + 1);
    assert!(
        (1..=most).contains(&checks),
        "{checks} broker checks for 50 probes in {:?}",
        started.elapsed()
    );
}
