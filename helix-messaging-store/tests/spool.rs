//! The spool contract, the same on the in-memory spool and the SQLite one: order per topic,
//! the bounds, setting aside and releasing, and (SQLite) surviving a reopen.
#![cfg(feature = "sqlite")]

use helix_messaging_core::fallback::{MemorySpool, Spool, SpoolLimits};
use helix_messaging_core::{ErrorKind, Message};
use helix_messaging_store::SqliteSpool;

fn limits() -> SpoolLimits {
    SpoolLimits {
        max_messages: 5,
        max_bytes: 10_000,
    }
}

async fn keeps_order_and_bounds(spool: &dyn Spool) {
    let a: Vec<Message> = (0..3)
        .map(|i| {
            Message::new(format!("a{i}"))
                .with_key("k")
                .with_header("traceparent", "00-1-2-01")
                .with_priority(4)
        })
        .collect();
    spool.append("orders", &a).await.unwrap();
    spool.append("audit", &[Message::new("b0")]).await.unwrap();
    let err = spool
        .append("orders", &[Message::new("c0"), Message::new("c1")])
        .await
        .expect_err("6 > 5");
    assert_eq!(err.kind(), ErrorKind::Rejected);
    assert!(err.to_string().contains("spool is full"), "{err}");
    let big = Message::new(vec![0u8; 20_000]);
    assert_eq!(
        spool.append("x", &[big]).await.unwrap_err().kind(),
        ErrorKind::Rejected,
        "over the byte bound"
    );
    let stats = spool.stats().await.unwrap();
    assert_eq!(stats.depth, 4, "a refused append adds nothing");
    assert!(stats.oldest.is_some());
    let held = spool.oldest(10).await.unwrap();
    let order: Vec<(&str, &str)> = held
        .iter()
        .map(|m| (m.topic.as_str(), m.message.id()))
        .collect();
    let want: Vec<(&str, &str)> = a
        .iter()
        .map(|m| ("orders", m.id()))
        .chain(std::iter::once(("audit", held[3].message.id())))
        .collect();
    assert_eq!(order, want, "spool order");
    assert_eq!(held[0].message, a[0], "every field kept");
    // The forwarder's read-ahead: what follows a seq, in order, up to the limit.
    let after: Vec<i64> = spool
        .oldest_after(held[0].seq, 2)
        .await
        .unwrap()
        .iter()
        .map(|m| m.seq)
        .collect();
    assert_eq!(after, vec![held[1].seq, held[2].seq]);
    assert!(
        spool
            .oldest_after(held[3].seq, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        spool.topics().await.unwrap(),
        [
            ("orders".to_owned(), held[2].seq),
            ("audit".to_owned(), held[3].seq)
        ]
        .into(),
        "the newest waiting seq of each topic"
    );
    // Not consecutive, listed out of order, with a repeat and one not held: exactly those
    // held go.
    spool
        .remove(&[held[1].seq, held[0].seq, held[1].seq, held[3].seq + 100])
        .await
        .unwrap();
    let left = spool.oldest(10).await.unwrap();
    assert_eq!(left.len(), 2);
    assert_eq!(left[0].message.id(), a[2].id());
    assert_eq!(spool.stats().await.unwrap().depth, 2);

    // Set aside: out of the line, listed with its reason, still within the limits.
    spool.refuse(left[0].seq, "refused: no").await.unwrap();
    let stats = spool.stats().await.unwrap();
    assert_eq!((stats.depth, stats.refused), (1, 1), "{stats:?}");
    let refused = spool.refused(10).await.unwrap();
    assert_eq!(refused.len(), 1);
    assert_eq!(
        (
            refused[0].seq,
            refused[0].topic.as_str(),
            refused[0].reason.as_str()
        ),
        (left[0].seq, "orders", "refused: no")
    );
    assert_eq!(refused[0].message, a[2], "every field kept");
    assert_eq!(
        spool.oldest(10).await.unwrap()[0].message.id(),
        left[1].message.id()
    );
    assert_eq!(
        spool.topics().await.unwrap(),
        [("audit".to_owned(), left[1].seq)].into()
    );
    let four: Vec<Message> = (0..4).map(|i| Message::new(format!("d{i}"))).collect();
    assert_eq!(
        spool.append("x", &four).await.unwrap_err().kind(),
        ErrorKind::Rejected,
        "what is set aside counts against the limits"
    );
    assert!(
        !spool.release_refused(left[1].seq, false).await.unwrap(),
        "not set aside"
    );
}

/// A broker that is away with nothing spooled yet is degraded, not down: publishes
/// would be accepted into the spool.

#[tokio::test]
async fn the_memory_spool_keeps_order_and_bounds() {
    keeps_order_and_bounds(&MemorySpool::new(limits())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sqlite_spool_keeps_order_and_bounds_and_survives_reopening() {
    let path = std::env::temp_dir().join(format!(
        "helix-spool-test-{}.sqlite",
        uuid::Uuid::new_v4().simple()
    ));
    let spool = SqliteSpool::open(&path, limits()).await.unwrap();
    keeps_order_and_bounds(&spool).await;
    drop(spool);
    let reopened = SqliteSpool::open(&path, limits()).await.unwrap();
    let stats = reopened.stats().await.unwrap();
    assert_eq!((stats.depth, stats.refused), (1, 1), "kept on disk");
    let refused = reopened.refused(10).await.unwrap();
    assert_eq!(refused[0].message.payload().as_ref(), b"a2");
    assert!(
        reopened
            .release_refused(refused[0].seq, true)
            .await
            .unwrap()
    );
    let waiting = reopened.oldest(10).await.unwrap();
    let payloads: Vec<&[u8]> = waiting
        .iter()
        .map(|m| m.message.payload().as_ref())
        .collect();
    assert_eq!(payloads, [b"b0".as_slice(), b"a2"], "sent again at the end");
    assert!(waiting[1].seq > refused[0].seq);
    assert_eq!(reopened.stats().await.unwrap().refused, 0);
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
}

/// Each topic's newest waiting message, when a topic's messages come in several runs with
/// another topic's between them.
async fn lists_each_topics_newest_across_interleaved_runs(spool: &dyn Spool) {
    let mut newest = std::collections::HashMap::new();
    for (topic, count) in [("a", 2), ("b", 1), ("a", 1), ("c", 1), ("b", 2)] {
        let messages: Vec<Message> = (0..count).map(|i| Message::new(format!("{i}"))).collect();
        newest.insert(
            topic.to_owned(),
            spool.append(topic, &messages).await.unwrap(),
        );
    }
    assert_eq!(spool.topics().await.unwrap(), newest);
    let first_b = spool.oldest(10).await.unwrap()[2].seq;
    spool.remove(&[first_b]).await.unwrap();
    assert_eq!(
        spool.topics().await.unwrap(),
        newest,
        "b's newest still waits"
    );
    let every: Vec<i64> = spool
        .oldest(10)
        .await
        .unwrap()
        .iter()
        .map(|m| m.seq)
        .collect();
    spool.remove(&every).await.unwrap();
    assert!(spool.topics().await.unwrap().is_empty());
}

/// Room for every message of a test that is not about the limits.
fn roomy() -> SpoolLimits {
    SpoolLimits {
        max_messages: 100,
        max_bytes: 100_000,
    }
}

#[tokio::test]
async fn the_memory_spool_lists_each_topics_newest_across_interleaved_runs() {
    lists_each_topics_newest_across_interleaved_runs(&MemorySpool::new(roomy())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sqlite_spool_lists_each_topics_newest_across_interleaved_runs() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spool.sqlite");
    let spool = SqliteSpool::open(path, roomy()).await.unwrap();
    lists_each_topics_newest_across_interleaved_runs(&spool).await;
}

/// A spool file written before the compact metadata form holds each message's metadata as
/// JSON text; opened by this version, its messages are read, forwarded and set aside as
/// whole as the ones spooled now, side by side.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spool_file_with_json_metadata_from_an_earlier_version_is_read_whole() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spool.sqlite");
    let old = Message::new("written before")
        .with_key("k")
        .with_header("traceparent", "00-1-2-01")
        .with_correlation_id("c")
        .with_priority(3)
        .with_ttl(std::time::Duration::from_millis(1500));
    let spool = SqliteSpool::open(&path, limits()).await.unwrap();
    drop(spool);
    {
        // The row as the earlier version wrote it: the payloadless message as JSON text.
        let mut parts = old.clone().into_parts();
        parts.payload = bytes::Bytes::new();
        let json = serde_json::to_string(&Message::from_parts(parts)).unwrap();
        let file = rusqlite::Connection::open(&path).unwrap();
        file.execute(
            "INSERT INTO helix_spool (topic, meta, payload, bytes, spooled_us) VALUES ('orders', ?1, ?2, 14, 0)",
            rusqlite::params![json, old.payload().as_ref()],
        )
        .unwrap();
    }
    let spool = SqliteSpool::open(&path, limits()).await.unwrap();
    let new = Message::new("written now").with_header("h", "v");
    spool
        .append("orders", std::slice::from_ref(&new))
        .await
        .unwrap();
    let waiting = spool.oldest(10).await.unwrap();
    let messages: Vec<&Message> = waiting.iter().map(|m| &m.message).collect();
    assert_eq!(messages, [&old, &new]);
    spool.refuse(waiting[0].seq, "test").await.unwrap();
    assert_eq!(spool.refused(10).await.unwrap()[0].message, old);
}
