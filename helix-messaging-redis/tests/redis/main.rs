//! Redis-specific behaviour: the reclaimer, restart durability, pub/sub reconnection, TLS,
//! unrouted publishes, undecodable entries. Fault tests run their own `redis-server`.
//!
//! This file holds TLS and pub/sub and the helpers the modules share; `streams` the Streams
//! groups (reclaimer, hand-back, undecodable entries, delivery counts, trimming, delays),
//! `faults` a private server crashed and restarted or its connections killed.

#[path = "../common/mod.rs"]
mod common;
mod faults;
mod streams;

use std::time::{Duration, Instant};

use common::{broker, recv, shared_url};
use futures::StreamExt;
use helix_messaging_core::{Broker, ErrorKind, Message, Publisher, SubscribeOptions, Subscriber};
use helix_messaging_redis::{RedisBroker, RedisConfig, RedisMode};
use helix_messaging_testkit::faults::{PrivateRedis, free_port};

fn topic(what: &str) -> String {
    helix_messaging_testkit::fresh_name(what)
}

async fn raw(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// A server that requires a client certificate (`--tls-auth-clients yes`) is reached with
/// `tls_client_cert` / `tls_client_key` (`REDIS_TLS_CERT` / `REDIS_TLS_KEY`), in both modes,
/// and refuses a client without one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_presents_the_client_certificate_a_server_requires() {
    let certs = common::temp_dir("mtls");
    helix_messaging_testkit::test_certificates(&certs);
    let tls_port = free_port();
    let cert = |f: &str| certs.join(f).display().to_string();
    let tls_port_arg = tls_port.to_string();
    let _server = PrivateRedis::start_with(&[
        "--port",
        "0",
        "--tls-port",
        &tls_port_arg,
        "--tls-cert-file",
        &cert("server.pem"),
        "--tls-key-file",
        &cert("server.key"),
        "--tls-ca-cert-file",
        &cert("ca.pem"),
        "--tls-auth-clients",
        "yes",
    ]);
    let url = format!("rediss://127.0.0.1:{tls_port}");
    // From the environment's names, as an operator sets them.
    let vars = [
        ("REDIS_URL", url.clone()),
        ("REDIS_TLS_CA_CERT", cert("ca.pem")),
        ("REDIS_TLS_CERT", cert("client.pem")),
        ("REDIS_TLS_KEY", cert("client.key")),
    ];
    for mode in [RedisMode::Streams, RedisMode::PubSub] {
        let mut config = RedisConfig::from_vars(
            |v| vars.iter().find(|(k, _)| *k == v).map(|(_, x)| x.clone()),
            mode,
        )
        .unwrap();
        config.pubsub_envelope = true;
        let broker = RedisBroker::connect(config).await.unwrap();
        let topic = topic("mtls");
        let mut sub = broker
            .subscribe(&topic, SubscribeOptions::default())
            .await
            .unwrap();
        let m = Message::new("mutual");
        broker.publish(&topic, m.clone()).await.unwrap();
        let d = recv(&mut sub).await;
        assert_eq!(d.message().id(), m.id());
        d.ack().await.unwrap();
        broker.close().await.unwrap();
    }
    // Without the client certificate the server refuses the handshake.
    let mut config = RedisConfig::new(&url, RedisMode::Streams).unwrap();
    config.tls_ca_cert = Some(certs.join("ca.pem"));
    config.connect_timeout = Duration::from_secs(5);
    let err = RedisBroker::connect(config)
        .await
        .expect_err("no client certificate");
    assert!(
        matches!(err.kind(), ErrorKind::Connection | ErrorKind::Backend),
        "{err}"
    );
    // A key without its certificate is a configuration error naming the variable.
    let half = [
        ("REDIS_URL", url.clone()),
        ("REDIS_TLS_KEY", cert("client.key")),
    ];
    let err = RedisConfig::from_vars(
        |v| half.iter().find(|(k, _)| *k == v).map(|(_, x)| x.clone()),
        RedisMode::Streams,
    )
    .map(|_| ())
    .expect_err("a key without a certificate");
    assert!(err.to_string().contains("REDIS_TLS_CERT"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_connections_work_in_both_modes_and_verify_the_server() {
    let certs = common::temp_dir("certs");
    helix_messaging_testkit::test_certificates(&certs);
    let tls_port = free_port();
    let cert = |f: &str| certs.join(f).display().to_string();
    let (server_pem, server_key, ca_pem) = (cert("server.pem"), cert("server.key"), cert("ca.pem"));
    let tls_port_arg = tls_port.to_string();
    let _server = PrivateRedis::start_with(&[
        "--port",
        "0",
        "--tls-port",
        &tls_port_arg,
        "--tls-cert-file",
        &server_pem,
        "--tls-key-file",
        &server_key,
        "--tls-ca-cert-file",
        &ca_pem,
        "--tls-auth-clients",
        "no",
    ]);
    let url = format!("rediss://127.0.0.1:{tls_port}");

    for mode in [RedisMode::Streams, RedisMode::PubSub] {
        // The envelope carries the id and headers over pub/sub too.
        let broker = broker(&url, mode, |c| {
            c.tls_ca_cert = Some(certs.join("ca.pem"));
            c.pubsub_envelope = true;
        })
        .await;
        assert!(broker.config().uses_tls());
        let topic = topic("tls");
        let mut sub = broker
            .subscribe(&topic, SubscribeOptions::default())
            .await
            .unwrap();
        let m = Message::new("over TLS").with_header("secure", "yes");
        broker.publish(&topic, m.clone()).await.unwrap();
        let d = recv(&mut sub).await;
        assert_eq!(d.message().id(), m.id());
        assert_eq!(d.message().header("secure"), Some("yes"));
        d.ack().await.unwrap();
        broker.close().await.unwrap();
    }

    // Without the CA the server's certificate is not trusted: the connection must fail.
    let config = RedisConfig::new(&url, RedisMode::Streams).unwrap();
    let started = Instant::now();
    let err = RedisBroker::connect(config)
        .await
        .expect_err("untrusted certificate");
    eprintln!(
        "untrusted certificate refused after {:?}: {err}",
        started.elapsed()
    );
    assert!(
        matches!(
            err.kind(),
            ErrorKind::Connection | ErrorKind::Backend | ErrorKind::Config
        ),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&certs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_counts_publishes_that_reached_nobody_and_refuses_requeue() {
    let broker = broker(&shared_url(), RedisMode::PubSub, |_| {}).await;
    let topic = topic("unrouted");
    broker
        .publish(&topic, Message::new("nobody listens"))
        .await
        .unwrap();
    let report = broker
        .publish_batch(&topic, vec![Message::new("a"), Message::new("b")])
        .await;
    assert!(report.is_ok());
    assert_eq!(broker.unrouted_publishes(), 3);

    let mut sub = broker
        .subscribe(&topic, SubscribeOptions::default())
        .await
        .unwrap();
    broker.publish(&topic, Message::new("heard")).await.unwrap();
    assert_eq!(
        broker.unrouted_publishes(),
        3,
        "a publish that reached a subscriber is not counted"
    );
    let d = recv(&mut sub).await;
    let err = d.nack(true).await.expect_err("requeue on pub/sub");
    assert_eq!(err.kind(), ErrorKind::Unsupported);

    let err = broker
        .subscribe(&topic, SubscribeOptions::group("g"))
        .await
        .expect_err("groups on pub/sub");
    assert_eq!(err.kind(), ErrorKind::Unsupported);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_holds_no_more_unsettled_deliveries_than_its_prefetch() {
    let url = shared_url();
    let topic = topic("pubsub-prefetch");
    let broker = broker(&url, RedisMode::PubSub, |_| {}).await;
    let mut sub = broker
        .subscribe(&topic, SubscribeOptions::default().with_prefetch(2))
        .await
        .unwrap();
    for i in 0..3 {
        broker
            .publish(&topic, Message::new(format!("m{i}")))
            .await
            .unwrap();
    }
    let first = recv(&mut sub).await;
    let second = recv(&mut sub).await;
    let third = tokio::time::timeout(Duration::from_millis(500), sub.next()).await;
    assert!(third.is_err(), "a third delivery while two are unsettled");
    first.ack().await.unwrap();
    let third = recv(&mut sub).await;
    assert_eq!(third.message().payload().as_ref(), b"m2");
    drop(second);
    third.ack().await.unwrap();
    broker.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_drops_a_message_whose_ttl_has_passed_when_the_envelope_carries_it() {
    let url = shared_url();
    let topic = topic("pubsub-ttl");
    let broker = broker(&url, RedisMode::PubSub, |c| c.pubsub_envelope = true).await;
    let mut sub = broker
        .subscribe(&topic, SubscribeOptions::default())
        .await
        .unwrap();
    broker
        .publish(&topic, Message::new("gone").with_ttl(Duration::ZERO))
        .await
        .unwrap();
    let kept = Message::new("kept");
    broker.publish(&topic, kept.clone()).await.unwrap();
    let d = recv(&mut sub).await;
    assert_eq!(
        d.message().id(),
        kept.id(),
        "a TTL of zero is never delivered"
    );
    d.ack().await.unwrap();
    broker.close().await.unwrap();
}
