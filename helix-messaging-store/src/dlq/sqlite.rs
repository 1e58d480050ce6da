//! A durable DLQ store in an embedded SQLite file.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use helix_messaging_core::dlq::{
    DeadLetter, DeadLetterFilter, DeadLetterStats, DeadLetterStore, EntryStatus, FailureGroup,
    StoredDeadLetter,
};
use helix_messaging_core::{Error, ErrorKind, Headers, Message, MessageParts, Result};
use rusqlite::types::Value;
use rusqlite::{Connection, OptionalExtension, Row, params_from_iter};

use crate::connection::Step;
use crate::connection::sqlite::{Shared, migrate, on_connection, open_file};
use crate::replay::sqlite::SqliteReplayStore;
use crate::sql::{SqlValue, from_micros, micros, set_list, sql_conditions};

/// The table's schema, oldest step first ([`crate::connection`]): the table as it is made
/// today, then the columns files written before claims lack.
const SCHEMA: &[Step] = &[
    Step::Sql(
        "CREATE TABLE IF NOT EXISTS helix_dead_letters (
             id TEXT PRIMARY KEY,
             original_topic TEXT NOT NULL,
             consumer_group TEXT,
             reason TEXT NOT NULL,
             error TEXT NOT NULL,
             attempts INTEGER NOT NULL,
             first_failure_us INTEGER NOT NULL,
             last_failure_us INTEGER NOT NULL,
             redrives INTEGER NOT NULL,
             message_id TEXT NOT NULL,
             message_key TEXT,
             payload BLOB NOT NULL,
             headers TEXT NOT NULL,
             message_timestamp_us INTEGER NOT NULL,
             content_type TEXT,
             correlation_id TEXT,
             priority INTEGER NOT NULL,
             message_type TEXT,
             status TEXT NOT NULL,
             retries INTEGER NOT NULL,
             next_attempt_us INTEGER,
             last_error TEXT,
             discard_reason TEXT,
             stored_us INTEGER NOT NULL,
             version INTEGER NOT NULL DEFAULT 0,
             claimed_until_us INTEGER
         );
         CREATE INDEX IF NOT EXISTS helix_dead_letters_by_time ON helix_dead_letters (last_failure_us, id);
         CREATE INDEX IF NOT EXISTS helix_dead_letters_due ON helix_dead_letters (status, next_attempt_us);
         CREATE INDEX IF NOT EXISTS helix_dead_letters_by_message ON helix_dead_letters (message_id);",
    ),
    Step::AddColumn {
        column: "version",
        declaration: "INTEGER NOT NULL DEFAULT 0",
    },
    Step::AddColumn {
        column: "claimed_until_us",
        declaration: "INTEGER",
    },
    // The listing leaves discarded entries out: with the status in the time index, a page
    // and its count are read from the index alone rather than every row before the page.
    Step::Sql(
        "CREATE INDEX IF NOT EXISTS helix_dead_letters_by_time_status
             ON helix_dead_letters (last_failure_us, id, status);
         DROP INDEX IF EXISTS helix_dead_letters_by_time;",
    ),
];

const COLUMNS: &str = "id, original_topic, consumer_group, reason, error, attempts, first_failure_us, \
    last_failure_us, redrives, message_id, message_key, payload, headers, message_timestamp_us, \
    content_type, correlation_id, priority, status, retries, next_attempt_us, last_error, \
    discard_reason, stored_us, version, claimed_until_us";

/// How many columns [`COLUMNS`] names, which is where a claim finds the `rowid` it selects
/// after them (counted from the commas: the list names plain columns only).
const COLUMN_COUNT: usize = {
    let bytes = COLUMNS.as_bytes();
    let (mut commas, mut i) = (0, 0);
    while i < bytes.len() {
        if bytes[i] == b',' {
            commas += 1;
        }
        i += 1;
    }
    commas + 1
};

const STORE: &str = "DLQ store";

/// Dead letters in an SQLite file (WAL journal, `synchronous = FULL`: every write is on disk
/// before it returns), surviving restarts of the process. One process at a time should
/// write to a file; several instances sharing one DLQ use the PostgreSQL store.
#[derive(Clone)]
pub struct SqliteDeadLetterStore {
    connection: Shared,
    path: PathBuf,
}

impl std::fmt::Debug for SqliteDeadLetterStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteDeadLetterStore")
            .field("path", &self.path)
            .finish()
    }
}

/// The filter as a `WHERE` clause (always present, `1 = 1` when empty) and its parameters.
fn where_clause(filter: &DeadLetterFilter) -> (String, Vec<Value>) {
    let mut clauses = vec!["1 = 1".to_owned()];
    let mut values = Vec::new();
    for (condition, value) in sql_conditions(filter) {
        values.push(match value {
            SqlValue::Text(s) => Value::Text(s),
            SqlValue::Int(n) => Value::Integer(n),
        });
        clauses.push(format!("{condition} ?{}", values.len()));
    }
    (clauses.join(" AND "), values)
}

fn read_entry(row: &Row<'_>) -> rusqlite::Result<StoredDeadLetter> {
    let text_err = |i: usize, e: Error| {
        rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, Box::new(e))
    };
    let headers: String = row.get(12)?;
    let headers: Headers = serde_json::from_str(&headers).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(12, rusqlite::types::Type::Text, Box::new(e))
    })?;
    let reason: String = row.get(3)?;
    let status: String = row.get(17)?;
    let payload: Vec<u8> = row.get(11)?;
    let message = Message::from_parts(MessageParts {
        id: row.get(9)?,
        key: row.get(10)?,
        payload: payload.into(),
        headers,
        timestamp: from_micros(row.get(13)?),
        content_type: row.get(14)?,
        correlation_id: row.get(15)?,
        priority: row.get(16)?,
        ttl: None,
    });
    Ok(StoredDeadLetter {
        letter: DeadLetter {
            id: row.get(0)?,
            message,
            original_topic: row.get(1)?,
            group: row.get(2)?,
            reason: reason.parse().map_err(|e| text_err(3, e))?,
            error: row.get(4)?,
            attempts: row.get(5)?,
            first_failure_at: from_micros(row.get(6)?),
            last_failure_at: from_micros(row.get(7)?),
            redrives: row.get(8)?,
        },
        status: EntryStatus::parse(&status).map_err(|e| text_err(17, e))?,
        retries: row.get(18)?,
        next_attempt_at: row.get::<_, Option<i64>>(19)?.map(from_micros),
        last_error: row.get(20)?,
        discard_reason: row.get(21)?,
        stored_at: from_micros(row.get(22)?),
        version: row.get::<_, i64>(23)?.unsigned_abs(),
        claimed_until: row.get::<_, Option<i64>>(24)?.map(from_micros),
    })
}

/// Claim, one after the other, each of `ids` that exists, is not discarded and that nothing
/// holds at `now`: hold it until `until`, its version one up (and, with
/// `moving_next_attempt`, its next attempt moved to `until` too), and return the entries as
/// the claim leaves them. The update and the entries returned are written side by side here,
/// so the two cannot drift apart.
///
/// Each row is read, then updated by its rowid, rather than updated with `RETURNING`:
/// SQLite collects a statement's `RETURNING` rows in a temporary table of its own, opened
/// and closed (with its own page cache) for every statement, which was about a third of a
/// claim's instructions. Read and held one id at a time, an id asked for twice is found
/// held the second time, as an `UPDATE` would find it. The caller's transaction holds the
/// write lock from its start, so no other connection changes a row between its read and
/// its update.
fn claim_ids(
    tx: &rusqlite::Transaction<'_>,
    ids: Vec<String>,
    now: i64,
    until: i64,
    moving_next_attempt: bool,
) -> rusqlite::Result<Vec<StoredDeadLetter>> {
    // A version at the integer's end is left unclaimed: one more would be stored as a real
    // number, which no read of the entry could take back.
    let update = format!(
        "UPDATE helix_dead_letters SET {}claimed_until_us = ?1, version = version + 1 \
         WHERE rowid = ?2 AND version < {}",
        if moving_next_attempt {
            "next_attempt_us = ?1, "
        } else {
            ""
        },
        i64::MAX
    );
    let select = format!(
        "SELECT {COLUMNS}, rowid FROM helix_dead_letters \
         WHERE id = ?1 AND status != 'discarded' \
           AND (claimed_until_us IS NULL OR claimed_until_us <= ?2)"
    );
    let mut select = tx.prepare_cached(&select)?;
    let mut update = tx.prepare_cached(&update)?;
    let mut claimed = Vec::with_capacity(ids.len());
    for id in ids {
        let Some((mut entry, rowid)) = select
            .query_row(rusqlite::params![id, now], |row| {
                Ok((read_entry(row)?, row.get::<_, i64>(COLUMN_COUNT)?))
            })
            .optional()?
        else {
            continue;
        };
        if update.execute(rusqlite::params![until, rowid])? == 1 {
            entry.version += 1;
            entry.claimed_until = Some(from_micros(until));
            if moving_next_attempt {
                entry.next_attempt_at = entry.claimed_until;
            }
            claimed.push(entry);
        }
    }
    Ok(claimed)
}

fn entry_values(entry: &StoredDeadLetter) -> Result<Vec<Value>> {
    let l = &entry.letter;
    let m = &l.message;
    let text = |s: &str| Value::Text(s.to_owned());
    let opt = |s: Option<&str>| s.map_or(Value::Null, |s| Value::Text(s.to_owned()));
    let headers = serde_json::to_string(m.headers())
        .map_err(|e| Error::new(ErrorKind::Serialization, format!("DLQ store: headers: {e}")))?;
    Ok(vec![
        text(&l.id),
        text(&l.original_topic),
        opt(l.group.as_deref()),
        text(l.reason.as_str()),
        text(&l.error),
        Value::Integer(l.attempts.into()),
        Value::Integer(micros(l.first_failure_at)),
        Value::Integer(micros(l.last_failure_at)),
        Value::Integer(l.redrives.into()),
        text(m.id()),
        opt(m.key()),
        Value::Blob(m.payload().to_vec()),
        Value::Text(headers),
        Value::Integer(micros(m.timestamp())),
        opt(m.content_type()),
        opt(m.correlation_id()),
        Value::Integer(m.priority().into()),
        opt(l.message_type()),
        Value::Text(entry.status.as_str().to_owned()),
        Value::Integer(entry.retries.into()),
        entry
            .next_attempt_at
            .map_or(Value::Null, |t| Value::Integer(micros(t))),
        opt(entry.last_error.as_deref()),
        opt(entry.discard_reason.as_deref()),
        Value::Integer(micros(entry.stored_at)),
        entry
            .claimed_until
            .map_or(Value::Null, |t| Value::Integer(micros(t))),
        Value::Integer(i64::try_from(entry.version).unwrap_or(i64::MAX)),
    ])
}

/// The columns [`entry_values`] gives, in its order; the entry's version follows them.
const WRITTEN_COLUMNS: &str = "id, original_topic, consumer_group, reason, error, attempts, \
    first_failure_us, last_failure_us, redrives, message_id, message_key, payload, headers, \
    message_timestamp_us, content_type, correlation_id, priority, message_type, status, retries, \
    next_attempt_us, last_error, discard_reason, stored_us, claimed_until_us";

/// How many values [`entry_values`] gives: the written columns, then the version.
const WRITTEN_VALUES: usize = 26;

impl SqliteDeadLetterStore {
    /// Open (creating if needed) the store in the file at `path`.
    ///
    /// # Errors
    /// [`ErrorKind::Backend`] when the file cannot be opened or its schema created.
    pub async fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let connection = open_file(&path, STORE).await?;
        migrate(&connection, STORE, &["helix_dead_letters"], SCHEMA).await?;
        Ok(SqliteDeadLetterStore { connection, path })
    }

    /// A replay checkpoint store in the same file, sharing this store's connection (so
    /// replays resume from the same database the DLQ survives in).
    ///
    /// # Errors
    /// [`ErrorKind::Backend`] when the replay table cannot be created.
    pub async fn replay_store(&self) -> Result<SqliteReplayStore> {
        SqliteReplayStore::sharing(self.connection.clone(), self.path.clone()).await
    }

    /// The file the store lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn run<T, F>(&self, what: &'static str, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        on_connection(&self.connection, STORE, what, f).await
    }

    async fn select(
        &self,
        what: &'static str,
        tail: String,
        values: Vec<Value>,
    ) -> Result<Vec<StoredDeadLetter>> {
        self.run(what, move |c| {
            let sql = format!("SELECT {COLUMNS} FROM helix_dead_letters WHERE {tail}");
            let mut statement = c.prepare_cached(&sql)?;
            let rows = statement.query_map(params_from_iter(values), read_entry)?;
            rows.collect()
        })
        .await
    }
}

#[async_trait]
impl DeadLetterStore for SqliteDeadLetterStore {
    async fn insert(&self, entry: StoredDeadLetter) -> Result<bool> {
        let values = entry_values(&entry)?;
        self.run("insert", move |c| {
            let placeholders: Vec<String> = (1..=values.len()).map(|i| format!("?{i}")).collect();
            let sql = format!(
                "INSERT OR IGNORE INTO helix_dead_letters ({WRITTEN_COLUMNS}, version) VALUES ({})",
                placeholders.join(", ")
            );
            Ok(c.prepare_cached(&sql)?.execute(params_from_iter(values))? == 1)
        })
        .await
    }

    async fn get(&self, id: &str) -> Result<Option<StoredDeadLetter>> {
        let id = id.to_owned();
        self.run("get", move |c| {
            let sql = format!("SELECT {COLUMNS} FROM helix_dead_letters WHERE id = ?1");
            c.prepare_cached(&sql)?
                .query_row([id], read_entry)
                .optional()
        })
        .await
    }

    async fn get_many(&self, ids: &[String]) -> Result<Vec<StoredDeadLetter>> {
        let ids = ids.to_vec();
        self.run("get", move |c| {
            let sql = format!("SELECT {COLUMNS} FROM helix_dead_letters WHERE id = ?1");
            let mut statement = c.prepare_cached(&sql)?;
            let mut found = Vec::with_capacity(ids.len());
            for id in ids {
                if let Some(entry) = statement.query_row([id], read_entry).optional()? {
                    found.push(entry);
                }
            }
            Ok(found)
        })
        .await
    }

    async fn list(
        &self,
        filter: &DeadLetterFilter,
        limit: usize,
        offset: usize,
    ) -> Result<Vec<StoredDeadLetter>> {
        let (clause, values) = where_clause(filter);
        // The page's rows are picked by rowid first: skipping `offset` rows then walks the
        // (last_failure_us, id) index alone instead of reading every skipped entry whole.
        let tail = format!(
            "rowid IN (SELECT rowid FROM helix_dead_letters WHERE {clause} \
             ORDER BY last_failure_us, id LIMIT {} OFFSET {}) ORDER BY last_failure_us, id",
            i64::try_from(limit).unwrap_or(i64::MAX),
            i64::try_from(offset).unwrap_or(i64::MAX)
        );
        self.select("list", tail, values).await
    }

    async fn page(
        &self,
        filter: &DeadLetterFilter,
        limit: usize,
        offset: usize,
    ) -> Result<(Vec<StoredDeadLetter>, u64)> {
        let (clause, values) = where_clause(filter);
        self.run("page", move |c| {
            // One read transaction: the count is of the state the page was read from, even
            // with another connection writing the file.
            let tx = c.transaction()?;
            let list = format!(
                "SELECT {COLUMNS} FROM helix_dead_letters WHERE rowid IN (SELECT rowid FROM \
                 helix_dead_letters WHERE {clause} ORDER BY last_failure_us, id LIMIT {} OFFSET {}) \
                 ORDER BY last_failure_us, id",
                i64::try_from(limit).unwrap_or(i64::MAX),
                i64::try_from(offset).unwrap_or(i64::MAX)
            );
            let entries = tx
                .prepare_cached(&list)?
                .query_map(params_from_iter(values.iter()), read_entry)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let count = format!("SELECT COUNT(*) FROM helix_dead_letters WHERE {clause}");
            let count = tx
                .prepare_cached(&count)?
                .query_row(params_from_iter(values.iter()), |row| row.get::<_, i64>(0))?
                .unsigned_abs();
            tx.commit()?;
            Ok((entries, count))
        })
        .await
    }

    async fn count(&self, filter: &DeadLetterFilter) -> Result<u64> {
        let (clause, values) = where_clause(filter);
        self.run("count", move |c| {
            let sql = format!("SELECT COUNT(*) FROM helix_dead_letters WHERE {clause}");
            c.prepare_cached(&sql)?
                .query_row(params_from_iter(values), |row| row.get::<_, i64>(0))
                .map(|n| n.unsigned_abs())
        })
        .await
    }

    async fn ids(&self, filter: &DeadLetterFilter) -> Result<Vec<String>> {
        let (clause, values) = where_clause(filter);
        self.run("ids", move |c| {
            let sql = format!(
                "SELECT id FROM helix_dead_letters WHERE {clause} ORDER BY last_failure_us, id"
            );
            let mut statement = c.prepare_cached(&sql)?;
            let rows = statement.query_map(params_from_iter(values), |row| row.get(0))?;
            rows.collect()
        })
        .await
    }

    async fn claim_due(
        &self,
        now: SystemTime,
        lease: Duration,
        limit: usize,
    ) -> Result<Vec<StoredDeadLetter>> {
        let (now, until) = (micros(now), micros(now + lease));
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.run("claim due entries", move |c| {
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let due: Vec<String> = {
                let mut statement = tx.prepare_cached(
                    "SELECT id FROM helix_dead_letters \
                     WHERE status = 'pending' AND next_attempt_us <= ?1 \
                       AND (claimed_until_us IS NULL OR claimed_until_us <= ?1) \
                     ORDER BY next_attempt_us, id LIMIT ?2",
                )?;
                let rows = statement.query_map(rusqlite::params![now, limit], |row| row.get(0))?;
                rows.collect::<rusqlite::Result<_>>()?
            };
            let claimed = claim_ids(&tx, due, now, until, true)?;
            tx.commit()?;
            Ok(claimed)
        })
        .await
    }

    async fn claim(
        &self,
        ids: &[String],
        now: SystemTime,
        lease: Duration,
    ) -> Result<Vec<StoredDeadLetter>> {
        let (ids, now, until) = (ids.to_vec(), micros(now), micros(now + lease));
        self.run("claim entries", move |c| {
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let claimed = claim_ids(&tx, ids, now, until, false)?;
            tx.commit()?;
            Ok(claimed)
        })
        .await
    }

    async fn update(&self, entry: &StoredDeadLetter) -> Result<bool> {
        let values = entry_values(entry)?;
        self.run("update", move |c| {
            let sql = format!(
                "UPDATE helix_dead_letters SET {}, version = version + 1 \
                 WHERE id = ?1 AND version = ?{WRITTEN_VALUES}",
                set_list(WRITTEN_COLUMNS, '?')
            );
            Ok(c.prepare_cached(&sql)?.execute(params_from_iter(values))? == 1)
        })
        .await
    }

    async fn remove(&self, id: &str, version: u64) -> Result<bool> {
        let removed = self.remove_many(&[(id.to_owned(), version)]).await?;
        Ok(removed == 1)
    }

    async fn remove_many(&self, entries: &[(String, u64)]) -> Result<u64> {
        let entries = entries.to_vec();
        self.run("remove", move |c| {
            // One transaction: one sync to disk for the whole batch.
            let tx = c.transaction()?;
            let mut removed = 0;
            {
                let mut delete = tx.prepare_cached(
                    "DELETE FROM helix_dead_letters WHERE id = ?1 AND version = ?2",
                )?;
                for (id, version) in entries {
                    let version = i64::try_from(version).unwrap_or(i64::MAX);
                    removed += delete.execute(rusqlite::params![id, version])? as u64;
                }
            }
            tx.commit()?;
            Ok(removed)
        })
        .await
    }

    async fn purge(&self, filter: &DeadLetterFilter) -> Result<u64> {
        let (clause, values) = where_clause(filter);
        self.run("purge", move |c| {
            let sql = format!("DELETE FROM helix_dead_letters WHERE {clause}");
            Ok(c.execute(&sql, params_from_iter(values))? as u64)
        })
        .await
    }

    async fn groups(&self, filter: &DeadLetterFilter) -> Result<Vec<FailureGroup>> {
        let (clause, values) = where_clause(filter);
        let rows = self
            .run("group failures", move |c| {
                // The sample error is the newest entry's (of two at once, the greater id's),
                // picked by rank: beside both MIN() and MAX(), SQLite takes a bare column
                // from any row of the group.
                let sql = format!(
                    "SELECT reason, original_topic, COUNT(*), MIN(last_failure_us), \
                     MAX(last_failure_us), MAX(CASE WHEN newest = 1 THEN error END) \
                     FROM (SELECT reason, original_topic, last_failure_us, error, \
                           ROW_NUMBER() OVER (PARTITION BY reason, original_topic \
                                              ORDER BY last_failure_us DESC, id DESC) AS newest \
                           FROM helix_dead_letters WHERE {clause}) \
                     GROUP BY reason, original_topic ORDER BY COUNT(*) DESC, original_topic"
                );
                let mut statement = c.prepare_cached(&sql)?;
                let rows = statement.query_map(params_from_iter(values), |row| {
                    Ok((
                        row.get::<_, String>(0)?,
                        row.get::<_, String>(1)?,
                        row.get::<_, i64>(2)?,
                        row.get::<_, i64>(3)?,
                        row.get::<_, i64>(4)?,
                        row.get::<_, String>(5)?,
                    ))
                })?;
                rows.collect::<rusqlite::Result<Vec<_>>>()
            })
            .await?;
        rows.into_iter()
            .map(|(reason, topic, count, oldest, newest, sample_error)| {
                Ok(FailureGroup {
                    reason: reason.parse()?,
                    topic,
                    count: count.unsigned_abs(),
                    oldest: from_micros(oldest),
                    newest: from_micros(newest),
                    sample_error,
                })
            })
            .collect()
    }

    async fn stats(&self) -> Result<DeadLetterStats> {
        self.run("stats", |c| {
            c.prepare_cached(
                "SELECT COUNT(*), COALESCE(SUM(status = 'parked'), 0), MIN(last_failure_us) \
                 FROM helix_dead_letters WHERE status != 'discarded'",
            )?
            .query_row([], |row| {
                Ok(DeadLetterStats {
                    depth: row.get::<_, i64>(0)?.unsigned_abs(),
                    parked: row.get::<_, i64>(1)?.unsigned_abs(),
                    oldest: row.get::<_, Option<i64>>(2)?.map(from_micros),
                })
            })
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table as versions before claims wrote it: no `version`, no `claimed_until_us`.
    const EARLIER_SCHEMA: &str = "
    CREATE TABLE helix_dead_letters (
        id TEXT PRIMARY KEY, original_topic TEXT NOT NULL, consumer_group TEXT,
        reason TEXT NOT NULL, error TEXT NOT NULL, attempts INTEGER NOT NULL,
        first_failure_us INTEGER NOT NULL, last_failure_us INTEGER NOT NULL,
        redrives INTEGER NOT NULL, message_id TEXT NOT NULL, message_key TEXT,
        payload BLOB NOT NULL, headers TEXT NOT NULL, message_timestamp_us INTEGER NOT NULL,
        content_type TEXT, correlation_id TEXT, priority INTEGER NOT NULL, message_type TEXT,
        status TEXT NOT NULL, retries INTEGER NOT NULL, next_attempt_us INTEGER,
        last_error TEXT, discard_reason TEXT, stored_us INTEGER NOT NULL
    );
    INSERT INTO helix_dead_letters VALUES ('dl-1', 'orders', 'workers', 'max retries exceeded',
        'boom', 4, 1, 2, 0, 'm-1', NULL, x'7031', '{}', 3, NULL, NULL, 0, NULL, 'pending', 0,
        NULL, NULL, NULL, 4);";

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_file_written_before_claims_opens_and_its_entries_can_be_claimed() {
        let path = std::env::temp_dir().join(format!("helix-dlq-{}.sqlite", uuid::Uuid::new_v4()));
        Connection::open(&path)
            .unwrap()
            .execute_batch(EARLIER_SCHEMA)
            .unwrap();
        let store = SqliteDeadLetterStore::open(&path).await.unwrap();
        // A second opener finds the columns there.
        let again = SqliteDeadLetterStore::open(&path).await.unwrap();
        let entry = store.get("dl-1").await.unwrap().expect("kept");
        assert_eq!((entry.version, entry.claimed_until), (0, None));
        let now = SystemTime::now();
        let claimed = again
            .claim(&["dl-1".to_owned()], now, Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(claimed.len(), 1);
        assert_eq!(claimed[0].version, 1);
        assert!(claimed[0].is_claimed(now));
        drop((store, again));
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
    }
}
