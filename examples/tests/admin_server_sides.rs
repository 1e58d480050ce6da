//! The `admin_server` example with tasks and events on different brokers (memory and the
//! real Redis Streams): a dead letter on the event broker's DLQ topic shows in its DLQ.
#![cfg(all(feature = "admin", feature = "memory", feature = "redis"))]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use helix_messaging::Message;
use helix_messaging::dlq::{EVENT_DLQ_TOPIC, HEADER_ORIGINAL_TOPIC};

const ADMIN_TOKEN: &str = "two-sides-test-token";

/// The body of `GET path` on `addr` with the admin token (HTTP/1.1, one request).
fn get(addr: &str, path: &str) -> String {
    let mut stream = TcpStream::connect(addr).expect("the server accepts");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("an answer");
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_on_the_event_broker_shows_in_the_admin_dlq() {
    let dir = tempfile::tempdir().unwrap();
    let redis = common::redis_in_db(4);
    let (_server, addr) = common::admin_server(&[
        ("MESSAGING_ADMIN_TOKEN", ADMIN_TOKEN.into()),
        ("MESSAGING_TASK_BACKEND", "memory".into()),
        ("MESSAGING_EVENT_BACKEND", "redis-streams".into()),
        ("REDIS_URL", redis.clone().into()),
        ("HELIX_DLQ_STORE", dir.path().join("dlq.sqlite3").into()),
    ]);

    // A dead letter as the hub's event side writes it, on the event broker alone.
    let events = helix_messaging::connect(&redis.replacen("redis://", "redis-streams://", 1))
        .await
        .expect("Redis");
    let topic = helix_messaging_testkit::fresh_name("two-sides-events");
    let failed = Message::new("order 7").with_header(HEADER_ORIGINAL_TOPIC, topic.as_str());
    events.publish(EVENT_DLQ_TOPIC, failed).await.unwrap();

    let path = format!("/v1/messaging/dlq?topic={topic}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let answer = loop {
        let answer = get(&addr, &path);
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        if answer.contains(&format!("\"original_topic\":\"{topic}\"")) {
            break answer;
        }
        assert!(
            Instant::now() < deadline,
            "the event broker's dead letter is not in the admin DLQ within 30 s: {answer}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        answer.contains("\"helix-dlq-source\":\"events\""),
        "the entry remembers it came from the event broker: {answer}"
    );
    events.close().await.unwrap();
}
