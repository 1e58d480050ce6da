//! An SQLite store's WAL is copied into its file by a thread of the file's own, not by the
//! commit that fills it, and that thread lets go of the file once the store is dropped.
#![cfg(feature = "sqlite")]

use std::path::Path;
use std::time::{Duration, Instant};

use helix_messaging_core::Message;
use helix_messaging_core::fallback::{Spool, SpoolLimits};
use helix_messaging_store::SqliteSpool;

const WAIT: Duration = Duration::from_secs(10);

fn limits() -> SpoolLimits {
    SpoolLimits {
        max_messages: 10_000,
        max_bytes: 100_000_000,
    }
}

fn size(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

/// A few hundred kilobytes, far below any size at which a commit would checkpoint, reach the
/// file itself while the store is open and idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_is_written_reaches_the_file_while_the_store_is_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spool.sqlite");
    let spool = SqliteSpool::open(&path, limits()).await.unwrap();
    let messages: Vec<Message> = (0..300).map(|_| Message::new(vec![7u8; 1_000])).collect();
    spool.append("orders", &messages).await.unwrap();
    let deadline = Instant::now() + WAIT;
    while size(&path) < 300_000 {
        assert!(
            Instant::now() < deadline,
            "the file holds {} bytes after {WAIT:?}: the WAL was not checkpointed",
            size(&path)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(spool.oldest(1_000).await.unwrap().len(), 300);
}

/// Once the store is dropped nothing holds the file open: the last connection's close
/// checkpoints the WAL and deletes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_store_leaves_no_connection_behind() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spool.sqlite");
    let wal = dir.path().join("spool.sqlite-wal");
    let spool = SqliteSpool::open(&path, limits()).await.unwrap();
    spool
        .append("orders", &[Message::new("one")])
        .await
        .unwrap();
    assert!(wal.exists(), "a WAL while the store is open");
    drop(spool);
    let deadline = Instant::now() + WAIT;
    while wal.exists() {
        assert!(
            Instant::now() < deadline,
            "the WAL is still there {WAIT:?} after the store was dropped: a connection stayed open"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let reopened = SqliteSpool::open(&path, limits()).await.unwrap();
    assert_eq!(reopened.oldest(10).await.unwrap().len(), 1);
}

/// Under writes that never pause, the WAL is still brought back to its start: it stays
/// within a few checkpoints' worth of pages however much goes through the file (a PASSIVE
/// checkpoint alone copies the pages but never lets the WAL start over while commits keep
/// coming).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wal_stays_bounded_under_writes_that_never_pause() {
    // Well above where it stays (16 MiB and one round of writes), well below the 155 MB it
    // reached with passive rounds alone.
    const LIMIT: u64 = 96 * 1024 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spool.sqlite");
    let wal = dir.path().join("spool.sqlite-wal");
    let spool = SqliteSpool::open(
        &path,
        SpoolLimits {
            max_messages: 1_000_000,
            max_bytes: 1 << 40,
        },
    )
    .await
    .unwrap();
    let batch: Vec<Message> = (0..100).map(|_| Message::new(vec![3u8; 4_000])).collect();
    let mut largest = 0;
    // About 120 MB in all, each batch forwarded (removed) as the next is appended, as a
    // spool under load is.
    for _ in 0..300 {
        spool.append("orders", &batch).await.unwrap();
        let waiting = spool.oldest(100).await.unwrap();
        let seqs: Vec<i64> = waiting.iter().map(|m| m.seq).collect();
        spool.remove(&seqs).await.unwrap();
        largest = largest.max(size(&wal));
    }
    assert!(
        largest < LIMIT,
        "the WAL reached {largest} bytes with about 120 MB written"
    );
}
