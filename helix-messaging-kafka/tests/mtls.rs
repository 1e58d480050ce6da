//! Kafka over TLS with a client certificate: a private Apache Kafka node (KRaft, its own
//! ports and data directory, the jars `scripts/test` caches) whose only client listener is
//! SSL with `ssl.client.auth=required`, stopped when the test ends however it ends.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use helix_messaging_core::{Broker, Message, Publisher, SubscribeOptions, Subscriber};
use helix_messaging_kafka::{KafkaBroker, KafkaConfig};
use helix_messaging_testkit::faults::free_port;

/// Apache Kafka's jars as `scripts/services.sh` caches them.
fn kafka_libs() -> PathBuf {
    let cache = std::env::var("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache"))
        .join("helix-messaging");
    std::fs::read_dir(&cache)
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e}; run scripts/test, which fetches Kafka",
                cache.display()
            )
        })
        .filter_map(Result::ok)
        .map(|e| e.path().join("libs"))
        .find(|libs| libs.join(".complete").exists())
        .expect("Apache Kafka's jars (scripts/test fetches them once per machine)")
}

/// A private Kafka node; killed, and its directory removed, when dropped.
struct PrivateKafka {
    child: Child,
    dir: PathBuf,
    port: u16,
}

impl Drop for PrivateKafka {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn java(libs: &Path) -> Command {
    let mut java = Command::new("java");
    java.arg("-cp").arg(format!("{}/*", libs.display()));
    java
}

impl PrivateKafka {
    fn start(certs: &Path) -> PrivateKafka {
        let libs = kafka_libs();
        let dir = std::env::temp_dir().join(format!(
            "helix-kafka-mtls-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(dir.join("data")).unwrap();
        // Kafka reads a PEM keystore as the key followed by its certificate.
        let keystore = dir.join("keystore.pem");
        std::fs::write(
            &keystore,
            std::fs::read_to_string(certs.join("server.key")).unwrap()
                + &std::fs::read_to_string(certs.join("server.pem")).unwrap(),
        )
        .unwrap();
        let (port, controller) = (free_port(), free_port());
        let properties = format!(
            "process.roles=broker,controller\nnode.id=1\n\
             controller.quorum.voters=1@127.0.0.1:{controller}\n\
             listeners=SSL://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller}\n\
             advertised.listeners=SSL://127.0.0.1:{port}\n\
             controller.listener.names=CONTROLLER\ninter.broker.listener.name=SSL\n\
             listener.security.protocol.map=CONTROLLER:PLAINTEXT,SSL:SSL\n\
             log.dirs={data}\nnum.partitions=1\nauto.create.topics.enable=true\n\
             offsets.topic.replication.factor=1\ntransaction.state.log.replication.factor=1\n\
             transaction.state.log.min.isr=1\nshare.coordinator.state.topic.replication.factor=1\n\
             share.coordinator.state.topic.min.isr=1\ngroup.initial.rebalance.delay.ms=0\n\
             ssl.client.auth=required\nssl.keystore.type=PEM\nssl.keystore.location={keystore}\n\
             ssl.truststore.type=PEM\nssl.truststore.location={ca}\n\
             ssl.endpoint.identification.algorithm=\n",
            data = dir.join("data").display(),
            keystore = keystore.display(),
            ca = certs.join("ca.pem").display(),
        );
        let config = dir.join("server.properties");
        std::fs::write(&config, properties).unwrap();
        let formatted = java(&libs)
            .args([
                "kafka.tools.StorageTool",
                "format",
                "--ignore-formatted",
                "-t",
            ])
            .arg("MkU3OEVBNTcwNTJENDM2Qk")
            .arg("-c")
            .arg(&config)
            .output()
            .expect("java runs");
        assert!(
            formatted.status.success(),
            "formatting the storage: {}",
            String::from_utf8_lossy(&formatted.stderr)
        );
        let child = java(&libs)
            .args(["-Xms256m", "-Xmx512m", "kafka.Kafka"])
            .arg(&config)
            .stdout(std::fs::File::create(dir.join("kafka.log")).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .expect("java runs");
        let node = PrivateKafka { child, dir, port };
        let deadline = Instant::now() + Duration::from_secs(90);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "the private Kafka did not listen within 90 s: {}",
                std::fs::read_to_string(node.dir.join("kafka.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
        node
    }
}

fn config_from(vars: &[(&str, String)]) -> KafkaConfig {
    let mut config =
        KafkaConfig::from_vars(|v| vars.iter().find(|(k, _)| *k == v).map(|(_, x)| x.clone()))
            .unwrap();
    let timings = common::config_for(&config.brokers);
    config.fetch_wait_max = timings.fetch_wait_max;
    config.session_timeout = timings.session_timeout;
    config.heartbeat_interval = timings.heartbeat_interval;
    config.shutdown_grace = timings.shutdown_grace;
    config
}

/// Brokers that require a client certificate are reached with `KAFKA_SSL_CERTIFICATE_LOCATION`
/// and `KAFKA_SSL_KEY_LOCATION`; without them a publish is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssl_with_a_client_certificate_reaches_brokers_that_require_one() {
    let certs = std::env::temp_dir().join(format!(
        "helix-kafka-certs-{}",
        uuid::Uuid::new_v4().simple()
    ));
    helix_messaging_testkit::test_certificates(&certs);
    let node = PrivateKafka::start(&certs);
    let file = |name: &str| certs.join(name).display().to_string();
    let brokers = format!("127.0.0.1:{}", node.port);
    let config = config_from(&[
        ("KAFKA_BROKERS", brokers.clone()),
        ("KAFKA_SECURITY_PROTOCOL", "ssl".into()),
        ("KAFKA_SSL_CA_LOCATION", file("ca.pem")),
        ("KAFKA_SSL_CERTIFICATE_LOCATION", file("client.pem")),
        ("KAFKA_SSL_KEY_LOCATION", file("client.key")),
    ]);
    let broker = KafkaBroker::connect(config)
        .await
        .expect("connect over mutual TLS");
    let topic = helix_messaging_testkit::fresh_name("mtls");
    let mut sub = broker
        .subscribe(
            &topic,
            SubscribeOptions::group("mtls")
                .with_start(helix_messaging_core::StartPosition::Earliest),
        )
        .await
        .unwrap();
    let m = Message::new("mutual");
    broker.publish(&topic, m.clone()).await.unwrap();
    let d = common::recv(&mut sub).await;
    assert_eq!(d.message().id(), m.id());
    d.ack().await.unwrap();
    broker.close().await.unwrap();

    // Without the client certificate the brokers end every handshake: nothing is published.
    let mut without = config_from(&[
        ("KAFKA_BROKERS", brokers),
        ("KAFKA_SECURITY_PROTOCOL", "ssl".into()),
        ("KAFKA_SSL_CA_LOCATION", file("ca.pem")),
    ]);
    without.publish_timeout = Duration::from_secs(5);
    let refused = match KafkaBroker::connect(without).await {
        Err(err) => err,
        Ok(broker) => broker
            .publish(&topic, Message::new("anonymous"))
            .await
            .expect_err("no client certificate"),
    };
    assert!(
        matches!(
            refused.kind(),
            helix_messaging_core::ErrorKind::Connection | helix_messaging_core::ErrorKind::Timeout
        ),
        "refused for the wrong reason: {refused}"
    );
    drop(node);
    let _ = std::fs::remove_dir_all(&certs);
}
