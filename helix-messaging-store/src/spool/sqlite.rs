//! The fallback spool in an embedded SQLite file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;
use helix_messaging_core::fallback::{
    RefusedMessage, Spool, SpoolLimits, SpoolStats, SpooledMessage, spooled_size,
};
use helix_messaging_core::{Message, Result};
use parking_lot::Mutex;
use rusqlite::{Connection, OptionalExtension, params};

use super::meta;
use crate::connection::Step;
use crate::connection::sqlite::{Shared, migrate, on_connection, open_file, open_reader};
use crate::sql::{from_micros, micros};

/// The spool's schema, oldest step first ([`crate::connection`]).
const SCHEMA: &[Step] = &[Step::Sql(
    "CREATE TABLE IF NOT EXISTS helix_spool (
             seq INTEGER PRIMARY KEY AUTOINCREMENT,
             topic TEXT NOT NULL,
             meta TEXT NOT NULL,
             payload BLOB NOT NULL,
             bytes INTEGER NOT NULL,
             spooled_us INTEGER NOT NULL
         );
         CREATE TABLE IF NOT EXISTS helix_spool_refused (
             seq INTEGER PRIMARY KEY,
             topic TEXT NOT NULL,
             meta TEXT NOT NULL,
             payload BLOB NOT NULL,
             bytes INTEGER NOT NULL,
             spooled_us INTEGER NOT NULL,
             refused_us INTEGER NOT NULL,
             reason TEXT NOT NULL
         );",
)];

/// What the file holds, counted once at open and then kept in memory (SQLite counts by
/// scanning the tables).
#[derive(Debug, Clone, Copy, Default)]
struct Held {
    /// Messages waiting and set aside: both count against the limits.
    messages: u64,
    /// Their bytes.
    bytes: u64,
    /// Of the messages, those set aside.
    refused: u64,
}

const STORE: &str = "fallback spool";

/// Spooled publishes in an SQLite file (WAL, `synchronous = FULL`: an append is on disk
/// before it returns), surviving a crash of the process. One process at a time should use a
/// file.
#[derive(Clone)]
pub struct SqliteSpool {
    connection: Shared,
    /// Reads the forwarder's next batch and the spool's age without waiting for a commit
    /// (a removal's, an append's) on `connection`.
    reader: Shared,
    path: PathBuf,
    limits: SpoolLimits,
    held: Arc<Mutex<Held>>,
}

impl std::fmt::Debug for SqliteSpool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteSpool")
            .field("path", &self.path)
            .field("limits", &self.limits)
            .finish()
    }
}

fn count(c: &Connection) -> rusqlite::Result<Held> {
    let mut held = Held::default();
    for (table, refused) in [("helix_spool", false), ("helix_spool_refused", true)] {
        let (messages, bytes) = c
            .prepare_cached(&format!(
                "SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM {table}"
            ))?
            .query_row([], |row| {
                Ok((row.get::<_, i64>(0)? as u64, row.get::<_, i64>(1)? as u64))
            })?;
        held.messages += messages;
        held.bytes += bytes;
        if refused {
            held.refused = messages;
        }
    }
    Ok(held)
}

impl SqliteSpool {
    /// Open (creating if needed) the spool in the file at `path`; what it already holds
    /// stays, to be forwarded.
    ///
    /// # Errors
    /// [`ErrorKind::Backend`](helix_messaging_core::ErrorKind::Backend) when the file cannot be
    /// opened or its table created.
    pub async fn open(path: impl AsRef<Path>, limits: SpoolLimits) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let connection = open_file(&path, STORE).await?;
        migrate(
            &connection,
            STORE,
            &["helix_spool", "helix_spool_refused"],
            SCHEMA,
        )
        .await?;
        let held = on_connection(&connection, STORE, "counting", |c| count(c)).await?;
        let reader = open_reader(&path, STORE).await?;
        Ok(SqliteSpool {
            connection,
            reader,
            path,
            limits,
            held: Arc::new(Mutex::new(held)),
        })
    }

    /// The file the spool lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[async_trait]
impl Spool for SqliteSpool {
    async fn append(&self, topic: &str, messages: &[Message]) -> Result<i64> {
        if messages.is_empty() {
            return Ok(0);
        }
        let rows: Vec<(Vec<u8>, Bytes, u64)> = messages
            .iter()
            .map(|m| Ok((meta::encode(m)?, m.payload().clone(), spooled_size(m))))
            .collect::<Result<_>>()?;
        let (topic, count) = (topic.to_owned(), messages.len());
        let bytes: u64 = rows.iter().map(|r| r.2).sum();
        let now = micros(SystemTime::now());
        let (held, limits) = (self.held.clone(), self.limits);
        // The counts change in the same blocking task as the file, the room being checked
        // and taken there too (one task at a time holds the connection, so concurrent
        // appends never overshoot): a caller that goes away, or a runtime shut down before
        // the task started, cannot leave them out of step with it.
        on_connection(&self.connection, STORE, "appending", move |c| {
            {
                let held = held.lock();
                let stats = SpoolStats {
                    depth: held.messages.saturating_sub(held.refused),
                    refused: held.refused,
                    bytes: held.bytes,
                    oldest: None,
                };
                if let Err(full) = limits.admit(stats, count, bytes) {
                    return Ok(Err(full));
                }
            }
            let tx = c.transaction()?;
            {
                let mut insert = tx.prepare_cached(
                    "INSERT INTO helix_spool (topic, meta, payload, bytes, spooled_us) VALUES (?1, ?2, ?3, ?4, ?5)",
                )?;
                for (meta, payload, bytes) in &rows {
                    insert.execute(params![topic, meta, payload.as_ref(), *bytes as i64, now])?;
                }
            }
            let newest = tx.last_insert_rowid();
            tx.commit()?;
            let mut held = held.lock();
            held.messages += count as u64;
            held.bytes += bytes;
            Ok(Ok(newest))
        })
        .await?
    }

    async fn oldest(&self, limit: usize) -> Result<Vec<SpooledMessage>> {
        self.oldest_after(i64::MIN, limit).await
    }

    async fn oldest_after(&self, after: i64, limit: usize) -> Result<Vec<SpooledMessage>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        on_connection(&self.reader, STORE, "reading", move |c| {
            c.prepare_cached(
                "SELECT seq, topic, meta, payload FROM helix_spool WHERE seq > ?1 ORDER BY seq LIMIT ?2",
            )?
            .query_map(params![after, limit], |row| {
                Ok(SpooledMessage {
                    seq: row.get(0)?,
                    topic: row.get(1)?,
                    message: meta::decode(row.get_ref(2)?, row.get(3)?, 2)?,
                })
            })?
            .collect()
        })
        .await
    }

    async fn remove(&self, seqs: &[i64]) -> Result<()> {
        let ranges = contiguous_ranges(seqs);
        let held = self.held.clone();
        on_connection(&self.connection, STORE, "removing", move |c| {
            let tx = c.transaction()?;
            let (mut removed, mut freed) = (0u64, 0u64);
            {
                // One statement per run of consecutive sequence numbers (a forwarded chunk
                // of one topic is one run): a statement per message made removing a chunk
                // of 1,000 slower than publishing it.
                let mut delete = tx.prepare_cached(
                    "DELETE FROM helix_spool WHERE seq BETWEEN ?1 AND ?2 RETURNING bytes",
                )?;
                for (first, last) in &ranges {
                    let mut rows = delete.query(params![first, last])?;
                    while let Some(row) = rows.next()? {
                        removed += 1;
                        freed += row.get::<_, i64>(0)? as u64;
                    }
                }
            }
            tx.commit()?;
            let mut held = held.lock();
            held.messages = held.messages.saturating_sub(removed);
            held.bytes = held.bytes.saturating_sub(freed);
            Ok(())
        })
        .await
    }

    async fn refuse(&self, seq: i64, reason: &str) -> Result<()> {
        let (reason, now) = (reason.to_owned(), micros(SystemTime::now()));
        let held = self.held.clone();
        on_connection(&self.connection, STORE, "setting a message aside", move |c| {
            let tx = c.transaction()?;
            let moved = tx.prepare_cached(
                "INSERT INTO helix_spool_refused (seq, topic, meta, payload, bytes, spooled_us, refused_us, reason)
                 SELECT seq, topic, meta, payload, bytes, spooled_us, ?2, ?3 FROM helix_spool WHERE seq = ?1",
            )?
            .execute(params![seq, now, reason])?;
            tx.prepare_cached("DELETE FROM helix_spool WHERE seq = ?1")?
                .execute(params![seq])?;
            tx.commit()?;
            if moved > 0 {
                held.lock().refused += 1;
            }
            Ok(())
        })
        .await
    }

    async fn refused(&self, limit: usize) -> Result<Vec<RefusedMessage>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        on_connection(&self.connection, STORE, "listing what is set aside", move |c| {
            c.prepare_cached(
                "SELECT seq, topic, meta, payload, reason, refused_us FROM helix_spool_refused ORDER BY seq LIMIT ?1",
            )?
            .query_map(params![limit], |row| {
                Ok(RefusedMessage {
                    seq: row.get(0)?,
                    topic: row.get(1)?,
                    message: meta::decode(row.get_ref(2)?, row.get(3)?, 2)?,
                    reason: row.get(4)?,
                    refused_at: from_micros(row.get(5)?),
                })
            })?
            .collect()
        })
        .await
    }

    async fn release_refused(&self, seq: i64, retry: bool) -> Result<bool> {
        let now = micros(SystemTime::now());
        let held = self.held.clone();
        on_connection(&self.connection, STORE, "releasing a set-aside message", move |c| {
            let tx = c.transaction()?;
            if retry {
                // AUTOINCREMENT: the new seq is above every seq ever given, this one's too.
                tx.prepare_cached(
                    "INSERT INTO helix_spool (topic, meta, payload, bytes, spooled_us)
                     SELECT topic, meta, payload, bytes, ?2 FROM helix_spool_refused WHERE seq = ?1",
                )?
                .execute(params![seq, now])?;
            }
            let bytes: Option<i64> = tx
                .prepare_cached("DELETE FROM helix_spool_refused WHERE seq = ?1 RETURNING bytes")?
                .query_row(params![seq], |row| row.get(0))
                .optional()?;
            tx.commit()?;
            let Some(bytes) = bytes else {
                return Ok(false);
            };
            let mut held = held.lock();
            held.refused = held.refused.saturating_sub(1);
            if !retry {
                held.messages = held.messages.saturating_sub(1);
                held.bytes = held.bytes.saturating_sub(bytes as u64);
            }
            Ok(true)
        })
        .await
    }

    async fn topics(&self) -> Result<HashMap<String, i64>> {
        on_connection(&self.connection, STORE, "listing topics", |c| {
            // One pass in spool order, kept here rather than in SQL: `GROUP BY topic` sorts
            // every row by its topic first, while a spool's rows come in runs of one topic,
            // so comparing each with the run before finds the newest of each cheaply.
            let mut topics: HashMap<String, i64> = HashMap::new();
            let mut current: Option<(String, i64)> = None;
            let mut statement =
                c.prepare_cached("SELECT topic, seq FROM helix_spool ORDER BY seq")?;
            let mut rows = statement.query([])?;
            while let Some(row) = rows.next()? {
                let (topic, seq) = (row.get_ref(0)?.as_str()?, row.get::<_, i64>(1)?);
                match current.as_mut() {
                    Some((name, newest)) if name == topic => *newest = seq,
                    _ => {
                        if let Some((name, newest)) = current.replace((topic.to_owned(), seq)) {
                            topics.insert(name, newest);
                        }
                    }
                }
            }
            if let Some((name, newest)) = current {
                topics.insert(name, newest);
            }
            Ok(topics)
        })
        .await
    }

    async fn stats(&self) -> Result<SpoolStats> {
        let oldest: Option<i64> = on_connection(&self.reader, STORE, "reading its age", |c| {
            c.prepare_cached("SELECT spooled_us FROM helix_spool ORDER BY seq LIMIT 1")?
                .query_row([], |row| row.get(0))
                .optional()
        })
        .await?;
        let held = *self.held.lock();
        Ok(SpoolStats {
            depth: held.messages.saturating_sub(held.refused),
            refused: held.refused,
            bytes: held.bytes,
            oldest: oldest.map(from_micros),
        })
    }
}

/// `seqs` as runs of consecutive numbers, each `(first, last)`, in order, without repeats.
fn contiguous_ranges(seqs: &[i64]) -> Vec<(i64, i64)> {
    let mut sorted = seqs.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut ranges: Vec<(i64, i64)> = Vec::new();
    for seq in sorted {
        match ranges.last_mut() {
            Some((_, last)) if *last + 1 == seq => *last = seq,
            _ => ranges.push((seq, seq)),
        }
    }
    ranges
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use helix_messaging_core::Message;
    use helix_messaging_core::fallback::{Spool, SpoolLimits};

    use super::{SqliteSpool, contiguous_ranges};

    /// The forwarder reads its next batch, and the gauges the spool's age, while a removal or
    /// an append holds the stores' connection (a durable commit, a checkpoint in the old
    /// days): reads have a connection of their own.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reads_do_not_wait_for_the_connection_that_commits() {
        let dir = tempfile::tempdir().unwrap();
        let limits = SpoolLimits {
            max_messages: 100,
            max_bytes: 1_000_000,
        };
        let spool = SqliteSpool::open(dir.path().join("spool.sqlite"), limits)
            .await
            .unwrap();
        spool.append("orders", &[Message::new("a")]).await.unwrap();
        let held = spool.connection.clone();
        let (locked, unlock) = (
            std::sync::Arc::new(tokio::sync::Notify::new()),
            std::sync::Arc::new(std::sync::Barrier::new(2)),
        );
        let holder = std::thread::spawn({
            let (locked, unlock) = (locked.clone(), unlock.clone());
            move || {
                let _busy = held.lock();
                locked.notify_one();
                unlock.wait();
            }
        });
        locked.notified().await;
        let read = tokio::time::timeout(Duration::from_secs(2), async {
            (spool.oldest(10).await, spool.stats().await)
        })
        .await;
        unlock.wait();
        holder.join().unwrap();
        let (waiting, stats) = read.expect("reads went on while the writer was busy");
        assert_eq!(waiting.unwrap().len(), 1);
        assert!(stats.unwrap().oldest.is_some());
    }

    #[test]
    fn sequence_numbers_group_into_runs() {
        assert_eq!(contiguous_ranges(&[]), vec![]);
        assert_eq!(
            contiguous_ranges(&[7, 3, 4, 5, 9, 8, 3, 12]),
            vec![(3, 5), (7, 9), (12, 12)]
        );
    }
}
