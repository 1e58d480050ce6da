//! The shipped monitoring (`monitoring/`): the alert rules pass `promtool check rules` and
//! their unit tests (`promtool test rules`), the example scrape configuration is valid, and a
//! real Prometheus scraping a running `admin_server` under load answers every query of every
//! dashboard panel with series — a panel naming a metric the project does not export fails.
//!
//! `scripts/test` installs Prometheus and promtool from Debian's packages; without them these
//! tests fail, naming what to install.
#![cfg(all(feature = "admin", feature = "redis"))]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use helix_messaging_testkit::faults::free_port;
use serde_json::Value;

use common::Running;

const ADMIN_TOKEN: &str = "monitoring-admin-token";
const READ_TOKEN: &str = "monitoring-read-token";

fn monitoring() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../monitoring")
}

/// Run `tool` with `args` in `dir`; its output, once it succeeded.
fn run(tool: &str, args: &[&str], dir: &Path) -> Output {
    let out = Command::new(tool)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|err| {
            panic!(
                "{tool} is not installed ({err}); `apt-get install prometheus` or run scripts/test"
            )
        });
    assert!(
        out.status.success(),
        "{tool} {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn the_alert_rules_pass_promtool_and_their_unit_tests() {
    let dir = monitoring().join("prometheus");
    let checked = run("promtool", &["check", "rules", "alerts.yml"], &dir);
    let text = String::from_utf8_lossy(&checked.stdout);
    assert!(text.contains("SUCCESS: 6 rules found"), "{text}");
    // Each alert fires on a series over its threshold for its `for:` and stays quiet on one
    // under it (alerts_test.yml).
    let tested = run("promtool", &["test", "rules", "alerts_test.yml"], &dir);
    assert!(String::from_utf8_lossy(&tested.stdout).contains("SUCCESS"));
}

#[test]
fn the_example_scrape_configuration_is_valid() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("helix-read-token");
    std::fs::write(&token, READ_TOKEN).unwrap();
    let shipped = std::fs::read_to_string(monitoring().join("prometheus/prometheus.yml")).unwrap();
    // The shipped file names the token where an operator keeps it; here, a file of the test's.
    let config = shipped.replace("/etc/prometheus/helix-read-token", token.to_str().unwrap());
    assert_ne!(config, shipped, "the example names a credentials file");
    std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
    std::fs::copy(
        monitoring().join("prometheus/alerts.yml"),
        dir.path().join("alerts.yml"),
    )
    .unwrap();
    run(
        "promtool",
        &["check", "config", "prometheus.yml"],
        dir.path(),
    );
}

/// Every query of every panel of the shipped dashboard, with the panel's title.
fn panel_queries() -> Vec<(String, String)> {
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(monitoring().join("dashboards/messaging-dashboard.json")).unwrap(),
    )
    .expect("the dashboard is JSON");
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            queries.push((
                panel["title"].as_str().unwrap().to_owned(),
                target["expr"].as_str().unwrap().to_owned(),
            ));
        }
    }
    queries
}

#[test]
fn the_dashboard_has_the_runbooks_panels() {
    let titles: Vec<String> = panel_queries().into_iter().map(|(t, _)| t).collect();
    for wanted in [
        "Throughput",
        "Queue depth",
        "Consumer lag",
        "DLQ status",
        "latency percentiles",
        "Circuit breaker",
        "spool",
        "Replay",
        "Reconnects",
    ] {
        assert!(
            titles.iter().any(|t| t.contains(wanted)),
            "no panel on {wanted}: {titles:?}"
        );
    }
}

/// The `admin_server` example on the real Redis Streams, with both tokens, the fallback
/// spools, and backlogs sampled every half second; its address once it listens.
fn admin_server(dir: &Path) -> (Running, String) {
    common::admin_server(&[
        ("MESSAGING_ADMIN_TOKEN", ADMIN_TOKEN.into()),
        ("MESSAGING_ADMIN_READ_TOKEN", READ_TOKEN.into()),
        ("MESSAGING_TASK_BACKEND", "redis-streams".into()),
        ("MESSAGING_EVENT_BACKEND", "redis-streams".into()),
        ("REDIS_URL", common::redis_in_db(3).into()),
        ("HELIX_DLQ_STORE", dir.join("dlq.sqlite3").into()),
        ("MESSAGING_FALLBACK_ENABLED", "true".into()),
        ("MESSAGING_FALLBACK_DIR", dir.join("spool").into()),
        ("MESSAGING_METRICS_BACKLOG_INTERVAL_MS", "500".into()),
    ])
}

/// Prometheus on a loopback port scraping `target` every second with the read token; its
/// base URL.
fn prometheus(dir: &Path, target: &str) -> (Running, String) {
    let port = free_port();
    let token = dir.join("read-token");
    std::fs::write(&token, READ_TOKEN).unwrap();
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
         scrape_configs:\n  - job_name: helix-messaging\n    metrics_path: /v1/messaging/metrics\n    \
         authorization:\n      type: Bearer\n      credentials_file: {}\n    \
         static_configs:\n      - targets: [\"{target}\"]\n",
        token.display()
    );
    let config_file = dir.join("prometheus.yml");
    std::fs::write(&config_file, config).unwrap();
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", config_file.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("tsdb").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
        .spawn()
        .expect("prometheus is installed (`apt-get install prometheus`, or run scripts/test)");
    (Running(child), format!("http://127.0.0.1:{port}"))
}

/// Poll `check` every 250 ms until it gives `Some`, for at most `within`.
async fn eventually<T, F: std::future::Future<Output = Option<T>>>(
    within: Duration,
    what: &str,
    mut check: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_panel_returns_series_from_a_real_prometheus_scraping_the_server() {
    use helix_messaging::Message;

    let dir = tempfile::tempdir().unwrap();
    let (_server, addr) = admin_server(dir.path());
    let (_prometheus, prometheus_url) = prometheus(dir.path(), &addr);
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let admin = |method: reqwest::Method, path: &str| {
        client
            .request(method, format!("http://{addr}{path}"))
            .bearer_auth(ADMIN_TOKEN)
    };

    // A short load on the real broker: dead letters published to the DLQ topic the server's
    // processor consumes (deliveries, their latency, the DLQ's depth), one reprocessed
    // (a publish), and a replay started (replay activity).
    let redis = common::redis_in_db(3);
    let broker = helix_messaging::connect(&redis.replacen("redis://", "redis-streams://", 1))
        .await
        .expect("Redis");
    let topic = format!("monitoring.{}", uuid::Uuid::new_v4().simple());
    let dlq_topic = helix_messaging::dlq::DEFAULT_DLQ_TOPIC;
    for i in 0..20 {
        let letter = Message::new(format!("failed {i}"))
            .with_header(helix_messaging::dlq::HEADER_ORIGINAL_TOPIC, &topic);
        broker.publish(dlq_topic, letter).await.unwrap();
    }
    let listing: Value = eventually(Duration::from_secs(30), "the DLQ ingests", || async {
        let listing: Value = admin(reqwest::Method::GET, "/v1/messaging/dlq")
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        (listing["count"].as_u64()? >= 20).then_some(listing)
    })
    .await;
    let id = listing["messages"][0]["id"].as_str().unwrap();
    let reprocessed = admin(
        reqwest::Method::POST,
        &format!("/v1/messaging/dlq/{id}/reprocess"),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(reprocessed.status(), 200);
    let now = chrono::Utc::now();
    let replay = admin(reqwest::Method::POST, "/v1/messaging/replay")
        .json(&serde_json::json!({
            "topic": topic,
            "from_time": (now - chrono::Duration::minutes(5)).to_rfc3339(),
            "to_time": now.to_rfc3339(),
            "target_topic": format!("{topic}.replayed"),
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(replay.status(), 202);

    // Every panel's every query answers with series once Prometheus has a few scrapes; the
    // ones that never do are named together.
    let mut missing = panel_queries();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !missing.is_empty() && Instant::now() < deadline {
        let mut still = Vec::new();
        for (panel, query) in missing {
            let answer: Option<Value> = async {
                client
                    .get(format!("{prometheus_url}/api/v1/query"))
                    .query(&[("query", query.as_str())])
                    .send()
                    .await
                    .ok()?
                    .json()
                    .await
                    .ok()
            }
            .await;
            if let Some(answer) = &answer {
                assert_ne!(
                    answer["status"], "error",
                    "panel {panel:?}: {query}: {answer}"
                );
            }
            let has_series = answer
                .as_ref()
                .and_then(|a| a["data"]["result"].as_array())
                .is_some_and(|series| !series.is_empty());
            if !has_series {
                still.push((panel, query));
            }
        }
        missing = still;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        missing.is_empty(),
        "panels whose queries return no series after 60 s of scraping: {missing:#?}"
    );
}
