//! amqps against a RabbitMQ TLS listener that the test starts at run time on a free port,
//! with a CA and server certificate it generates; the listener is stopped afterwards, even
//! when the test fails. No broker configuration file is touched.

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use helix_messaging_core::{Broker, Message, Publisher, SubscribeOptions, Subscriber};
use helix_messaging_rabbitmq::{RabbitBroker, RabbitConfig};

fn run(program: &str, args: &[&str], dir: &Path) {
    let status = Command::new(program)
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(status.success(), "{program} {args:?} failed");
}

/// A fresh directory with a test CA and a server certificate for 127.0.0.1.
fn certificates() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("helix-amqps-{}", uuid::Uuid::new_v4().simple()));
    helix_messaging_testkit::test_certificates(&dir);
    dir
}

/// A TLS listener on the running broker; stopped when dropped.
struct TlsListener {
    port: u16,
    certs: PathBuf,
}

impl TlsListener {
    fn start() -> TlsListener {
        TlsListener::start_with("{verify, verify_none}, {fail_if_no_peer_cert, false}")
    }

    /// A listener with `verification`, an Erlang `ssl` option list's tail.
    fn start_with(verification: &str) -> TlsListener {
        let certs = certificates();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let file = |name: &str| certs.join(name).display().to_string();
        let expr = format!(
            "rabbit_networking:start_ssl_listener({port}, [{{cacertfile, \"{}\"}}, {{certfile, \"{}\"}}, {{keyfile, \"{}\"}}, {verification}], 1, 1).",
            file("ca.pem"),
            file("server.pem"),
            file("server.key")
        );
        run("rabbitmqctl", &["eval", &expr], &certs);
        TlsListener { port, certs }
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        let expr = format!("rabbit_networking:stop_tcp_listener({}).", self.port);
        let _ = Command::new("rabbitmqctl").args(["eval", &expr]).output();
        let _ = std::fs::remove_dir_all(&self.certs);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_with_the_test_ca_round_trips_and_an_untrusted_certificate_is_refused() {
    let listener = TlsListener::start();
    let url = format!("amqps://guest:guest@127.0.0.1:{}/%2f", listener.port);

    let mut config = RabbitConfig::new(&url).unwrap();
    config.tls_ca_cert = Some(listener.certs.join("ca.pem"));
    config.group_queue_expires = common::config().group_queue_expires;
    let broker = RabbitBroker::connect(config)
        .await
        .expect("amqps connection");
    assert!(broker.config().address().starts_with("amqps://"));
    let topic = helix_messaging_testkit::fresh_name("tls");
    let mut sub = broker
        .subscribe(
            &topic,
            SubscribeOptions::group(helix_messaging_testkit::fresh_name("g")),
        )
        .await
        .unwrap();
    let m = Message::new("over TLS").with_header("secure", "yes");
    broker.publish(&topic, m.clone()).await.unwrap();
    let d = common::recv(&mut sub).await;
    assert_eq!(d.message().id(), m.id());
    assert_eq!(d.message().header("secure"), Some("yes"));
    d.ack().await.unwrap();
    broker.close().await.unwrap();

    // Without the test CA the server's certificate is not trusted.
    let mut untrusted = RabbitConfig::new(&url).unwrap();
    untrusted.connect_timeout = Duration::from_secs(5);
    let err = RabbitBroker::connect(untrusted)
        .await
        .expect_err("untrusted certificate");
    assert!(
        err.to_string().contains("certificate verify failed"),
        "refused for the wrong reason: {err}"
    );
}

/// The broker's settings for SASL EXTERNAL (the certificate's common name is the user),
/// made for one test and undone afterwards, even when it fails: the plugin, the mechanism
/// offered beside PLAIN, the login taken from the common name, and the user.
struct ExternalAuth {
    user: &'static str,
}

impl ExternalAuth {
    fn enable(user: &'static str) -> ExternalAuth {
        let dir = std::env::temp_dir();
        run(
            "rabbitmq-plugins",
            &["enable", "--online", "rabbitmq_auth_mechanism_ssl"],
            &dir,
        );
        run(
            "rabbitmqctl",
            &[
                "eval",
                // EXTERNAL also checks the node's own TLS options ask for a peer certificate.
                "application:set_env(rabbit, auth_mechanisms, ['PLAIN', 'AMQPLAIN', 'EXTERNAL']), application:set_env(rabbit, ssl_cert_login_from, common_name), application:set_env(rabbit, ssl_options, [{verify, verify_peer}, {fail_if_no_peer_cert, true}]).",
            ],
            &dir,
        );
        let password = uuid::Uuid::new_v4().simple().to_string();
        run("rabbitmqctl", &["add_user", user, &password], &dir);
        run(
            "rabbitmqctl",
            &["set_permissions", "-p", "/", user, ".*", ".*", ".*"],
            &dir,
        );
        ExternalAuth { user }
    }
}

impl Drop for ExternalAuth {
    fn drop(&mut self) {
        let quiet = |args: &[&str]| {
            let _ = Command::new(args[0]).args(&args[1..]).output();
        };
        quiet(&["rabbitmqctl", "delete_user", self.user]);
        quiet(&[
            "rabbitmqctl",
            "eval",
            "application:set_env(rabbit, auth_mechanisms, ['PLAIN', 'AMQPLAIN']), application:unset_env(rabbit, ssl_cert_login_from), application:set_env(rabbit, ssl_options, []).",
        ]);
        quiet(&[
            "rabbitmq-plugins",
            "disable",
            "--online",
            "rabbitmq_auth_mechanism_ssl",
        ]);
    }
}

/// A listener that requires a client certificate (`verify_peer`, `fail_if_no_peer_cert`) is
/// reached with `tls_client` (`RABBITMQ_TLS_CERT` / `RABBITMQ_TLS_KEY`), logging in with SASL
/// EXTERNAL as the certificate's common name; without the certificate the handshake fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_with_a_client_certificate_logs_in_with_sasl_external() {
    let listener = TlsListener::start_with("{verify, verify_peer}, {fail_if_no_peer_cert, true}");
    let _auth = ExternalAuth::enable("helix-test-client");
    // No user or password in the URL: the certificate is the credential.
    let url = format!(
        "amqps://127.0.0.1:{}/%2f?auth_mechanism=external",
        listener.port
    );
    let file = |name: &str| listener.certs.join(name).display().to_string();
    let vars = [
        ("RABBITMQ_URL", url.clone()),
        ("RABBITMQ_TLS_CA_CERT", file("ca.pem")),
        ("RABBITMQ_TLS_CERT", file("client.pem")),
        ("RABBITMQ_TLS_KEY", file("client.key")),
    ];
    let mut config =
        RabbitConfig::from_vars(|v| vars.iter().find(|(k, _)| *k == v).map(|(_, x)| x.clone()))
            .unwrap();
    config.group_queue_expires = common::config().group_queue_expires;
    let broker = RabbitBroker::connect(config)
        .await
        .expect("amqps with a client certificate");
    let topic = helix_messaging_testkit::fresh_name("mtls");
    let mut sub = broker
        .subscribe(
            &topic,
            SubscribeOptions::group(helix_messaging_testkit::fresh_name("g")),
        )
        .await
        .unwrap();
    let m = Message::new("mutual");
    broker.publish(&topic, m.clone()).await.unwrap();
    let d = common::recv(&mut sub).await;
    assert_eq!(d.message().id(), m.id());
    d.ack().await.unwrap();
    broker.close().await.unwrap();

    // Without a client certificate the server ends the handshake.
    let mut without = RabbitConfig::new(&url).unwrap();
    without.tls_ca_cert = Some(listener.certs.join("ca.pem"));
    without.connect_timeout = Duration::from_secs(5);
    let err = RabbitBroker::connect(without)
        .await
        .expect_err("no client certificate");
    assert!(
        matches!(
            err.kind(),
            helix_messaging_core::ErrorKind::Connection | helix_messaging_core::ErrorKind::Backend
        ),
        "{err}"
    );
}
