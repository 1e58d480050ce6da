//! The `admin_server` example with tasks and events on different brokers (memory and the
//! real Redis Streams): a dead letter on the event broker's DLQ topic shows in its DLQ.
#![cfg(all(feature = "admin", feature = "memory", feature = "redis"))]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use helix_messaging::Message;
use helix_messaging::dlq::{EVENT_DLQ_TOPIC, HEADER_ORIGINAL_TOPIC};
use helix_messaging_testkit::faults::free_port;

const ADMIN_TOKEN: &str = "two-sides-test-token";

/// Kills the server when the test ends, however it ends.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

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
    let addr = format!("127.0.0.1:{}", free_port());
    let redis = common::redis_in_db(4);
    let mut child = Command::new(env!("CARGO_BIN_EXE_admin_server"))
        .env("MESSAGING_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("MESSAGING_ADMIN_ADDR", &addr)
        .env("MESSAGING_TASK_BACKEND", "memory")
        .env("MESSAGING_EVENT_BACKEND", "redis-streams")
        .env("REDIS_URL", &redis)
        .env("HELIX_DLQ_STORE", dir.path().join("dlq.sqlite3"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .expect("the admin_server example starts");
    let stdout = child.stdout.take().unwrap();
    let _server = Running(child);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = ready_tx.send(line);
    });
    let line = ready_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the server said it listens within 60 s");
    assert_eq!(line.trim(), format!("listening on {addr}"));

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
