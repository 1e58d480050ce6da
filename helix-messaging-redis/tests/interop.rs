//! Plain clients and helix on the same Redis: what `redis-cli` writes is consumed with its
//! payload, and what helix writes is readable by `redis-cli` as it is. Runs against the shared
//! server on 127.0.0.1:6379 (`REDIS_URL` overrides); `redis-cli` comes with the server's
//! package, which `scripts/test` installs.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use helix_messaging_core::{Broker, Message, Publisher, SubscribeOptions, Subscriber};
use helix_messaging_redis::{RedisBroker, RedisConfig, RedisMode};

mod common;

use common::{DeleteOnDrop, WAIT, recv, shared_url as url};

/// Run `redis-cli` with `args` against the test server, failing the test if it fails.
fn redis_cli(args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .arg("-u")
        .arg(url())
        .arg("--raw")
        .args(args)
        .output()
        .expect("redis-cli on PATH (it comes with redis-server)");
    assert!(
        out.status.success(),
        "redis-cli {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

async fn connect(mode: RedisMode, tune: impl FnOnce(&mut RedisConfig)) -> RedisBroker {
    common::broker(&url(), mode, tune).await
}

/// The next line `redis-cli` printed.
async fn next_line(lines: &mut tokio::sync::mpsc::UnboundedReceiver<String>) -> String {
    tokio::time::timeout(WAIT, lines.recv())
        .await
        .expect("redis-cli printed in time")
        .expect("redis-cli still running")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_xadd_is_consumed_with_its_payload() {
    let topic = helix_messaging_testkit::fresh_name("plain-xadd");
    let custom = helix_messaging_testkit::fresh_name("plain-xadd-body");
    let _cleanup = DeleteOnDrop(vec![topic.clone(), custom.clone()]);
    let broker = connect(RedisMode::Streams, |_| {}).await;
    let mut sub = broker
        .subscribe(&topic, SubscribeOptions::group("g"))
        .await
        .unwrap();
    let entry_id = redis_cli(&[
        "XADD",
        &topic,
        "*",
        "data",
        r#"{"a":1}"#,
        "source",
        "billing",
    ]);
    let d = recv(&mut sub).await;
    assert_eq!(d.message().payload().as_ref(), br#"{"a":1}"#);
    assert_eq!(d.message().header("source"), Some("billing"));
    assert_eq!(
        d.message().id(),
        entry_id.trim(),
        "the entry id names a plain message"
    );
    assert_eq!(d.attempt(), 1);
    d.ack().await.unwrap();

    // Another payload field, by configuration.
    let other = connect(RedisMode::Streams, |c| {
        c.streams.payload_field = "body".into()
    })
    .await;
    let mut sub = other
        .subscribe(&custom, SubscribeOptions::group("g"))
        .await
        .unwrap();
    redis_cli(&["XADD", &custom, "*", "body", "plain text"]);
    let d = recv(&mut sub).await;
    assert_eq!(d.message().payload().as_ref(), b"plain text");
    d.ack().await.unwrap();
    broker.close().await.unwrap();
    other.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_xrange_reader_sees_the_payload_as_it_is() {
    let topic = helix_messaging_testkit::fresh_name("plain-xrange");
    let _cleanup = DeleteOnDrop(vec![topic.clone()]);
    let broker = connect(RedisMode::Streams, |_| {}).await;
    let json = r#"{"order":42,"total":"9.99"}"#;
    let m = Message::new(json)
        .with_header("type", "order.created")
        .with_content_type("application/json");
    broker.publish(&topic, m.clone()).await.unwrap();
    let lines: Vec<String> = redis_cli(&["XRANGE", &topic, "-", "+"])
        .lines()
        .map(str::to_owned)
        .collect();
    let value_of = |field: &str| {
        let at = lines
            .iter()
            .position(|l| l == field)
            .unwrap_or_else(|| panic!("no field {field} in {lines:?}"));
        lines[at + 1].clone()
    };
    assert_eq!(
        value_of("data"),
        json,
        "the payload field holds the payload as it is"
    );
    assert_eq!(
        value_of("type"),
        "order.created",
        "headers are fields of their own"
    );
    assert_eq!(value_of("helix.id"), m.id());
    assert_eq!(value_of("helix.content-type"), "application/json");
    broker.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_publish_is_delivered_with_its_body() {
    let channel = helix_messaging_testkit::fresh_name("plain-publish");
    for envelope in [false, true] {
        let broker = connect(RedisMode::PubSub, |c| c.pubsub_envelope = envelope).await;
        let mut sub = broker
            .subscribe(&channel, SubscribeOptions::default())
            .await
            .unwrap();
        let receivers = redis_cli(&["PUBLISH", &channel, r#"{"a":1}"#]);
        assert_eq!(receivers.trim(), "1", "the helix subscriber is listening");
        let d = recv(&mut sub).await;
        assert_eq!(
            d.message().payload().as_ref(),
            br#"{"a":1}"#,
            "delivered, not dropped (envelope {envelope})"
        );
        d.ack().await.unwrap();
        broker.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_subscribers_read_helix_publishes_as_they_are() {
    let channel = helix_messaging_testkit::fresh_name("plain-subscriber");
    let mut child = Command::new("redis-cli")
        .arg("-u")
        .arg(url())
        .arg("--raw")
        .args(["SUBSCRIBE", &channel])
        .stdout(Stdio::piped())
        .spawn()
        .expect("redis-cli on PATH");
    let stdout = child.stdout.take().expect("piped stdout");
    let (lines_tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    // `subscribe`, the channel, the subscription count: then it is listening.
    for expected in ["subscribe", channel.as_str(), "1"] {
        assert_eq!(next_line(&mut lines).await, expected);
    }
    // For subscribers that are not helix: the bare payload.
    let broker = connect(RedisMode::PubSub, |c| c.pubsub_envelope = false).await;
    let json = r#"{"event":"ping"}"#;
    broker
        .publish(&channel, Message::new(json).with_header("h", "v"))
        .await
        .unwrap();
    for expected in ["message", channel.as_str(), json] {
        assert_eq!(
            next_line(&mut lines).await,
            expected,
            "the body is the payload as it is"
        );
    }
    let _ = child.kill();
    let _ = child.wait();
    broker.close().await.unwrap();
}
