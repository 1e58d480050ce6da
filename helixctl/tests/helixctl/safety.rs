//! Issue 29, helixctl's side: the token from a file, https with a custom CA, ids with
//! reserved characters reaching exactly their entry, errors as JSON under `--json`, a bulk
//! redrive of everything only when asked with `--all`. Against an admin API over the memory
//! broker.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use helix_messaging_admin::api::{
    Ack, Entry, ErrorBody, Redrive, RedrivePreview, Redrives, Replay,
};
use helix_messaging_admin::{AdminConfig, Services};
use helix_messaging_core::Broker;
use helix_messaging_core::dlq::{
    DeadLetter, DeadLetterReason, MemoryDeadLetterStore, Processor, ProcessorConfig,
};
use helix_messaging_core::hub::{Hub, HubConfig};
use helix_messaging_core::replay::{ReplayConfig, ReplayHandler};
use helix_messaging_core::{DeliveryInfo, Message};

use crate::common::{TOKEN, failed, helixctl, helixctl_with, ok_json};

/// Ids with every character a path gives meaning to, and the neighbour a mangled path would
/// reach instead.
const ODD_IDS: [&str; 4] = ["x/../other", "id#", "a?b", "sp ace"];
const NEIGHBOUR: &str = "other";

/// An admin API over the memory broker, whose DLQ holds an entry for each of [`ODD_IDS`] and
/// [`NEIGHBOUR`], with that id, and whose `topic` holds two messages.
async fn memory_services() -> (Services, Arc<dyn Broker>, String) {
    let broker: Arc<dyn Broker> = Arc::new(helix_messaging_memory::MemoryBroker::new());
    let topic = format!("ctl.safety.{}", unique());
    for i in 0..2 {
        broker
            .publish(&topic, Message::new(format!("h{i}")))
            .await
            .unwrap();
    }
    let processor = Processor::new(
        broker.clone(),
        Arc::new(MemoryDeadLetterStore::new()),
        ProcessorConfig::default(),
    )
    .unwrap();
    let info = DeliveryInfo {
        topic: format!("{topic}.tasks").into(),
        group: Some("workers".into()),
        attempt: 1,
        redelivered: false,
        position: None,
    };
    for id in ODD_IDS.into_iter().chain([NEIGHBOUR]) {
        let now = SystemTime::now();
        let mut letter = DeadLetter::new(
            &Message::new(format!("payload of {id}")),
            &info,
            DeadLetterReason::Permanent,
            "refused",
            now,
            now,
        );
        // Stored under a chosen id, as a DLQ store of another system might hold it.
        letter.id = id.to_owned();
        processor.ingest(letter).await.unwrap();
    }
    let hub = Hub::new(HubConfig::default(), broker.clone(), broker.clone(), None)
        .await
        .unwrap();
    let services = Services::new(hub)
        .with_dlq(processor)
        .with_replay(ReplayHandler::new(
            broker.clone(),
            // Room for a running replay per id.
            ReplayConfig {
                max_active: 8,
                ..ReplayConfig::default()
            },
        ));
    (services, broker, topic)
}

fn unique() -> u128 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// Serve `services` over plain http on a free port.
async fn serve_http(services: Services) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(helix_messaging_admin::serve_listener(
        listener,
        AdminConfig::new(TOKEN).unwrap(),
        services,
        std::future::pending(),
    ));
    url
}

fn entry(out: &std::process::Output) -> Entry<'static> {
    serde_json::from_value(ok_json(out)).expect("an entry")
}

async fn show(url: &str, id: &str) -> Entry<'static> {
    entry(&helixctl(url, Some(TOKEN), &["dlq", "show", id, "--json"]).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_ids_with_reserved_characters_reach_exactly_their_entry() {
    let (services, _broker, _topic) = memory_services().await;
    let url = serve_http(services).await;
    for id in ODD_IDS {
        let shown = show(&url, id).await;
        assert_eq!(shown.id, id, "dlq show {id:?}");
        assert_eq!(
            shown.message.payload.as_deref(),
            Some(&*format!("payload of {id}"))
        );
    }
    for (i, id) in ODD_IDS.into_iter().enumerate() {
        let out = if i % 2 == 0 {
            helixctl(&url, Some(TOKEN), &["dlq", "discard", id, "--json"]).await
        } else {
            helixctl(&url, Some(TOKEN), &["dlq", "reprocess", id, "--json"]).await
        };
        let ack: Ack = serde_json::from_value(ok_json(&out)).unwrap();
        assert_eq!(ack.id, id);
        if i % 2 == 0 {
            assert_eq!(show(&url, id).await.status, "discarded", "{id:?}");
        } else {
            let gone = helixctl(&url, Some(TOKEN), &["dlq", "show", id]).await;
            failed(&gone, 1, "404");
        }
        let neighbour = show(&url, NEIGHBOUR).await;
        assert_eq!(
            neighbour.status, "parked",
            "{id:?} left {NEIGHBOUR:?} untouched"
        );
    }
    // `.` and `..` are path segments whatever their encoding: refused before any request.
    failed(
        &helixctl(&url, Some(TOKEN), &["dlq", "discard", ".."]).await,
        2,
        "..",
    );
    assert_eq!(show(&url, NEIGHBOUR).await.status, "parked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_ids_with_reserved_characters_reach_exactly_their_replay() {
    let (services, _broker, topic) = memory_services().await;
    let url = serve_http(services).await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    // Replays that stay running (one message a minute), so a cancel that reached the wrong
    // one would show.
    for id in ODD_IDS.into_iter().chain([NEIGHBOUR]) {
        let response = client
            .post(format!("{url}/v1/messaging/replay"))
            .bearer_auth(TOKEN)
            .json(&serde_json::json!({
                "id": id,
                "topic": topic,
                "from_time": "2000-01-01T00:00:00Z",
                "to_time": "2100-01-01T00:00:00Z",
                "options": {"batch_size": 1, "delay_between_ms": 60_000},
            }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202, "{id:?}");
    }
    for id in ODD_IDS {
        let status =
            progress(&helixctl(&url, Some(TOKEN), &["replay", "status", id, "--json"]).await);
        assert_eq!(status.id, id);
        let cancelled =
            progress(&helixctl(&url, Some(TOKEN), &["replay", "cancel", id, "--json"]).await);
        assert_eq!(cancelled.id, id);
        // A cancel asks the replay to stop; it stops at its next step.
        until_replay_status(&url, id, "cancelled").await;
        let neighbour = progress(
            &helixctl(
                &url,
                Some(TOKEN),
                &["replay", "status", NEIGHBOUR, "--json"],
            )
            .await,
        );
        assert_eq!(
            neighbour.status, "running",
            "{id:?} left {NEIGHBOUR:?} running"
        );
    }
    let out = helixctl(
        &url,
        Some(TOKEN),
        &["replay", "cancel", NEIGHBOUR, "--json"],
    )
    .await;
    assert_eq!(progress(&out).id, NEIGHBOUR);
    until_replay_status(&url, NEIGHBOUR, "cancelled").await;
}

fn progress(out: &std::process::Output) -> Replay {
    serde_json::from_value(ok_json(out)).expect("a replay's progress")
}

/// Poll `helixctl replay status id` until it says `status` (15 s at most).
async fn until_replay_status(url: &str, id: &str, status: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let now = progress(&helixctl(url, Some(TOKEN), &["replay", "status", id, "--json"]).await);
        assert_eq!(now.id, id);
        if now.status == status {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "replay {id:?} is {} after 15 s, not {status}",
            now.status
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A file in the system's temporary directory holding `content`, removed when dropped.
struct TempFile(std::path::PathBuf);

impl TempFile {
    fn new(name: &str, content: &str) -> TempFile {
        let path = std::env::temp_dir().join(format!("helixctl-{}-{name}", unique()));
        std::fs::write(&path, content).unwrap();
        TempFile(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_comes_from_a_flag_a_file_or_the_environment_flags_first() {
    let (services, _broker, _topic) = memory_services().await;
    let url = serve_http(services).await;
    let file = TempFile::new("token", &format!("  {TOKEN}\n"));
    let empty = TempFile::new("empty", " \n");
    let missing = std::env::temp_dir().join(format!("helixctl-missing-{}", unique()));
    let missing = missing.to_str().unwrap();

    let ok = |out: std::process::Output| {
        assert!(
            out.status.success(),
            "{:?}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    };
    ok(helixctl_with(&url, &["health", "--token-file", file.path()], &[]).await);
    ok(helixctl_with(
        &url,
        &["health", "--token", TOKEN],
        &[("MESSAGING_ADMIN_TOKEN", "wrong")],
    )
    .await);
    // A flag beats either variable.
    ok(helixctl_with(
        &url,
        &["health", "--token-file", file.path()],
        &[("MESSAGING_ADMIN_TOKEN", "wrong")],
    )
    .await);
    ok(helixctl_with(
        &url,
        &["health", "--token", TOKEN],
        &[("MESSAGING_ADMIN_TOKEN_FILE", missing)],
    )
    .await);
    ok(helixctl_with(
        &url,
        &["health"],
        &[("MESSAGING_ADMIN_TOKEN_FILE", file.path())],
    )
    .await);
    ok(helixctl_with(&url, &["health"], &[("MESSAGING_ADMIN_TOKEN", TOKEN)]).await);

    failed(
        &helixctl_with(
            &url,
            &["health", "--token", TOKEN, "--token-file", file.path()],
            &[],
        )
        .await,
        2,
        "--token-file",
    );
    failed(
        &helixctl_with(&url, &["health", "--token-file", empty.path()], &[]).await,
        2,
        "--token-file",
    );
    failed(
        &helixctl_with(&url, &["health", "--token-file", missing], &[]).await,
        2,
        "--token-file",
    );
    failed(
        &helixctl_with(
            &url,
            &["health"],
            &[("MESSAGING_ADMIN_TOKEN_FILE", missing)],
        )
        .await,
        2,
        "MESSAGING_ADMIN_TOKEN_FILE",
    );
    let help = helixctl_with(&url, &["--help"], &[]).await;
    let help = String::from_utf8(help.stdout).unwrap();
    for says in ["--token-file", "MESSAGING_ADMIN_TOKEN_FILE", "precedence"] {
        assert!(help.contains(says), "--help says {says:?}: {help}");
    }
}

/// The admin API over https (the server's own TLS, from PEM files), its certificate issued
/// by a CA of its own; the CA's PEM, and the files, kept until the test ends.
async fn serve_https(services: Services) -> (String, String, [TempFile; 2]) {
    let ca_params = {
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "helixctl test CA");
        p
    };
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap())
        .unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&key, &*ca)
        .unwrap();
    let files = [
        TempFile::new("server.pem", &cert.pem()),
        TempFile::new("server.key", &key.serialize_pem()),
    ];
    let mut config = AdminConfig::new(TOKEN).unwrap();
    config.tls = Some(helix_messaging_admin::TlsFiles {
        cert: files[0].0.clone(),
        key: files[1].0.clone(),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    tokio::spawn(helix_messaging_admin::serve_listener(
        listener,
        config,
        services,
        std::future::pending(),
    ));
    (url, ca.pem(), files)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_a_custom_ca_and_a_clear_certificate_error_without_it() {
    let (services, _broker, _topic) = memory_services().await;
    let (url, ca_pem, _files) = serve_https(services).await;
    let ca = TempFile::new("ca.pem", &ca_pem);

    let health = ok_json(
        &helixctl(
            &url,
            Some(TOKEN),
            &["health", "--json", "--ca-cert", ca.path()],
        )
        .await,
    );
    assert_eq!(health["status"], "healthy", "{health}");
    let by_env = helixctl_with(
        &url,
        &["health"],
        &[
            ("MESSAGING_ADMIN_TOKEN", TOKEN),
            ("MESSAGING_ADMIN_CA_CERT", ca.path()),
        ],
    )
    .await;
    assert!(
        by_env.status.success(),
        "{}",
        String::from_utf8_lossy(&by_env.stderr)
    );

    let untrusted = helixctl(&url, Some(TOKEN), &["health"]).await;
    failed(&untrusted, 4, "certificate");
    failed(&untrusted, 4, "--ca-cert");
    let missing = format!("{}.missing", ca.path());
    failed(
        &helixctl(&url, Some(TOKEN), &["health", "--ca-cert", &missing]).await,
        2,
        "--ca-cert",
    );
}

/// What a failed `--json` run printed: nothing on stdout, a JSON error on stderr.
fn json_error(out: &std::process::Output, code: i32) -> ErrorBody {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{stderr}");
    assert!(
        out.stdout.is_empty(),
        "stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    serde_json::from_slice(&out.stderr)
        .unwrap_or_else(|err| panic!("{err}: a JSON error on stderr: {stderr}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_json_every_failure_is_a_json_error_on_stderr() {
    let (services, _broker, _topic) = memory_services().await;
    let url = serve_http(services).await;

    let missing = json_error(
        &helixctl(&url, Some(TOKEN), &["dlq", "show", "nope", "--json"]).await,
        1,
    );
    assert_eq!(missing.error.status, Some(404));
    assert!(missing.error.message.contains("nope"), "{missing:?}");
    let wrong = json_error(
        &helixctl(&url, Some("wrong"), &["health", "--json"]).await,
        3,
    );
    assert_eq!(wrong.error.status, Some(401));
    let none = json_error(&helixctl(&url, None, &["health", "--json"]).await, 3);
    assert_eq!(none.error.status, None);
    assert!(none.error.message.contains("no token"), "{none:?}");

    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let nowhere = json_error(
        &helixctl(
            &format!("http://{free}"),
            Some(TOKEN),
            &["health", "--json"],
        )
        .await,
        4,
    );
    assert_eq!(nowhere.error.status, None);
    assert!(
        nowhere.error.message.contains("cannot reach"),
        "{nowhere:?}"
    );

    let usage = json_error(
        &helixctl(&url, Some(TOKEN), &["dlq", "frobnicate", "--json"]).await,
        2,
    );
    assert_eq!(usage.error.status, None);
    let usage = json_error(
        &helixctl(&url, Some(TOKEN), &["dlq", "redrive", "start", "--json"]).await,
        2,
    );
    assert!(usage.error.message.contains("--all"), "{usage:?}");

    // Without --json, text as before.
    failed(
        &helixctl(&url, Some(TOKEN), &["dlq", "show", "nope"]).await,
        1,
        "helixctl: 404",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redrive_without_a_filter_needs_all() {
    let (services, _broker, _topic) = memory_services().await;
    let url = serve_http(services).await;
    failed(
        &helixctl(&url, Some(TOKEN), &["dlq", "redrive", "start"]).await,
        2,
        "--all",
    );
    let jobs: Redrives = serde_json::from_value(ok_json(
        &helixctl(&url, Some(TOKEN), &["dlq", "redrive", "list", "--json"]).await,
    ))
    .unwrap();
    assert_eq!(jobs.count, 0, "nothing was started: {jobs:?}");
    failed(
        &helixctl(
            &url,
            Some(TOKEN),
            &["dlq", "redrive", "start", "--all", "--topic", "t"],
        )
        .await,
        2,
        "--all",
    );

    // A dry run shows the selection and starts nothing.
    let preview: RedrivePreview<'static> = serde_json::from_value(ok_json(
        &helixctl(
            &url,
            Some(TOKEN),
            &["dlq", "redrive", "start", "--all", "--dry-run", "--json"],
        )
        .await,
    ))
    .unwrap();
    assert!(preview.dry_run);
    assert_eq!(preview.total, 5, "{preview:?}");
    assert_eq!(
        preview.groups.iter().map(|g| g.count).sum::<u64>(),
        5,
        "{preview:?}"
    );
    let text = helixctl(
        &url,
        Some(TOKEN),
        &["dlq", "redrive", "start", "--all", "--dry-run"],
    )
    .await;
    assert!(
        text.status.success(),
        "{}",
        String::from_utf8_lossy(&text.stderr)
    );
    let text = String::from_utf8(text.stdout).unwrap();
    assert!(text.contains("5 entries would be re-driven"), "{text}");
    let jobs: Redrives = serde_json::from_value(ok_json(
        &helixctl(&url, Some(TOKEN), &["dlq", "redrive", "list", "--json"]).await,
    ))
    .unwrap();
    assert_eq!(jobs.count, 0, "a dry run starts nothing: {jobs:?}");

    let done: Redrive = serde_json::from_value(ok_json(
        &helixctl(
            &url,
            Some(TOKEN),
            &[
                "dlq",
                "redrive",
                "start",
                "--all",
                "--id",
                "everything",
                "--rate",
                "1000",
                "--wait",
                "--json",
            ],
        )
        .await,
    ))
    .unwrap();
    assert_eq!(done.id, "everything");
    assert_eq!(done.status, "completed", "{done:?}");
    assert_eq!(done.total, 5, "every entry: {done:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_list_help_says_oldest_first() {
    let out = helixctl("http://127.0.0.1:9", None, &["dlq", "--help"]).await;
    let help = String::from_utf8(out.stdout).unwrap();
    assert!(help.contains("oldest first"), "{help}");
    assert!(!help.contains("newest first"), "{help}");
}
