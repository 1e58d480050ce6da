//! A DLQ store in PostgreSQL, for several service instances sharing one DLQ.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use helix_messaging_core::dlq::{
    DeadLetter, DeadLetterFilter, DeadLetterStats, DeadLetterStore, EntryStatus, FailureGroup,
    StoredDeadLetter,
};
use helix_messaging_core::{Error, ErrorKind, Headers, Message, MessageParts, Result};
use tokio_postgres::Row;

use crate::connection::Step;
use crate::connection::postgres::{Database, Param, check_table_name};
use crate::replay::postgres::PostgresReplayStore;
use crate::sql::{SqlValue, from_micros, micros, set_list, sql_conditions};

const COLUMNS: &str = "id, original_topic, consumer_group, reason, error, attempts, \
    first_failure_us, last_failure_us, redrives, message_id, message_key, payload, headers, \
    message_timestamp_us, content_type, correlation_id, priority, status, retries, \
    next_attempt_us, last_error, discard_reason, stored_us, message_type, claimed_until_us";

/// What a read selects: the written [`COLUMNS`], then the version the store keeps.
const SELECTED: &str = "id, original_topic, consumer_group, reason, error, attempts, \
    first_failure_us, last_failure_us, redrives, message_id, message_key, payload, headers, \
    message_timestamp_us, content_type, correlation_id, priority, status, retries, \
    next_attempt_us, last_error, discard_reason, stored_us, message_type, claimed_until_us, \
    version";

/// How many parameters [`entry_params`] gives: the columns, then the version.
const WRITTEN_VALUES: usize = 26;

/// The table's schema, oldest step first ([`crate::connection`]): the table as it is made
/// today, then the columns tables made before claims lack.
const SCHEMA: &[Step] = &[
    Step::Sql(
        "CREATE TABLE IF NOT EXISTS {table} (
             id TEXT PRIMARY KEY,
             original_topic TEXT NOT NULL,
             consumer_group TEXT,
             reason TEXT NOT NULL,
             error TEXT NOT NULL,
             attempts BIGINT NOT NULL,
             first_failure_us BIGINT NOT NULL,
             last_failure_us BIGINT NOT NULL,
             redrives BIGINT NOT NULL,
             message_id TEXT NOT NULL,
             message_key TEXT,
             payload BYTEA NOT NULL,
             headers TEXT NOT NULL,
             message_timestamp_us BIGINT NOT NULL,
             content_type TEXT,
             correlation_id TEXT,
             priority SMALLINT NOT NULL,
             status TEXT NOT NULL,
             retries BIGINT NOT NULL,
             next_attempt_us BIGINT,
             last_error TEXT,
             discard_reason TEXT,
             stored_us BIGINT NOT NULL,
             message_type TEXT,
             claimed_until_us BIGINT,
             version BIGINT NOT NULL DEFAULT 0
         );
         CREATE INDEX IF NOT EXISTS {table}_by_time ON {table} (last_failure_us, id);
         CREATE INDEX IF NOT EXISTS {table}_due ON {table} (status, next_attempt_us);
         CREATE INDEX IF NOT EXISTS {table}_by_message ON {table} (message_id);",
    ),
    Step::AddColumn {
        column: "claimed_until_us",
        declaration: "BIGINT",
    },
    Step::AddColumn {
        column: "version",
        declaration: "BIGINT NOT NULL DEFAULT 0",
    },
    // As the SQLite store's step 4: the listing leaves discarded entries out, so the status
    // rides in the listing's index.
    Step::Sql(
        "CREATE INDEX IF NOT EXISTS {table}_by_time_status ON {table} (last_failure_us, id, status);
         DROP INDEX IF EXISTS {table}_by_time;",
    ),
];

/// Dead letters in a PostgreSQL table (default `helix_dead_letters`), shared by every
/// processor pointed at it: due re-drives are claimed with `FOR UPDATE SKIP LOCKED`, so two
/// instances never re-drive one entry at the same time. A lost connection is re-established
/// on the next call.
pub struct PostgresDeadLetterStore {
    database: Arc<Database>,
    table: String,
}

impl std::fmt::Debug for PostgresDeadLetterStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The connection string may hold a password.
        f.debug_struct("PostgresDeadLetterStore")
            .field("table", &self.table)
            .finish_non_exhaustive()
    }
}

fn where_clause(filter: &DeadLetterFilter, params: &mut Vec<Param>) -> String {
    let mut clauses = vec!["TRUE".to_owned()];
    for (condition, value) in sql_conditions(filter) {
        params.push(match value {
            SqlValue::Text(s) => Box::new(s),
            SqlValue::Int(n) => Box::new(n),
        });
        clauses.push(format!("{condition} ${}", params.len()));
    }
    clauses.join(" AND ")
}

fn read_entry(row: &Row) -> Result<StoredDeadLetter> {
    let bad = |what: &str, e: &dyn std::fmt::Display| {
        Error::new(
            ErrorKind::Serialization,
            format!("DLQ store (PostgreSQL): unreadable {what}: {e}"),
        )
    };
    let headers: String = row.get(12);
    let headers: Headers = serde_json::from_str(&headers).map_err(|e| bad("headers", &e))?;
    let reason: String = row.get(3);
    let status: String = row.get(17);
    let payload: Vec<u8> = row.get(11);
    let count = |i: usize| u32::try_from(row.get::<_, i64>(i)).unwrap_or(u32::MAX);
    let message = Message::from_parts(MessageParts {
        id: row.get(9),
        key: row.get(10),
        payload: payload.into(),
        headers,
        timestamp: from_micros(row.get(13)),
        content_type: row.get(14),
        correlation_id: row.get(15),
        priority: u8::try_from(row.get::<_, i16>(16)).unwrap_or(0),
        ttl: None,
    });
    Ok(StoredDeadLetter {
        letter: DeadLetter {
            id: row.get(0),
            message,
            original_topic: row.get(1),
            group: row.get(2),
            reason: reason.parse()?,
            error: row.get(4),
            attempts: count(5),
            first_failure_at: from_micros(row.get(6)),
            last_failure_at: from_micros(row.get(7)),
            redrives: count(8),
        },
        status: EntryStatus::parse(&status)?,
        retries: count(18),
        next_attempt_at: row.get::<_, Option<i64>>(19).map(from_micros),
        last_error: row.get(20),
        discard_reason: row.get(21),
        stored_at: from_micros(row.get(22)),
        claimed_until: row.get::<_, Option<i64>>(24).map(from_micros),
        version: row.get::<_, i64>(25).unsigned_abs(),
    })
}

fn entry_params(entry: &StoredDeadLetter) -> Result<Vec<Param>> {
    let l = &entry.letter;
    let m = &l.message;
    let headers = serde_json::to_string(m.headers()).map_err(|e| {
        Error::new(
            ErrorKind::Serialization,
            format!("DLQ store (PostgreSQL): headers: {e}"),
        )
    })?;
    let owned = |s: Option<&str>| s.map(str::to_owned);
    Ok(vec![
        Box::new(l.id.clone()),
        Box::new(l.original_topic.clone()),
        Box::new(l.group.clone()),
        Box::new(l.reason.as_str().to_owned()),
        Box::new(l.error.clone()),
        Box::new(i64::from(l.attempts)),
        Box::new(micros(l.first_failure_at)),
        Box::new(micros(l.last_failure_at)),
        Box::new(i64::from(l.redrives)),
        Box::new(m.id().to_owned()),
        Box::new(owned(m.key())),
        Box::new(m.payload().to_vec()),
        Box::new(headers),
        Box::new(micros(m.timestamp())),
        Box::new(owned(m.content_type())),
        Box::new(owned(m.correlation_id())),
        Box::new(i16::from(m.priority())),
        Box::new(entry.status.as_str().to_owned()),
        Box::new(i64::from(entry.retries)),
        Box::new(entry.next_attempt_at.map(micros)),
        Box::new(entry.last_error.clone()),
        Box::new(entry.discard_reason.clone()),
        Box::new(micros(entry.stored_at)),
        Box::new(owned(l.message_type())),
        Box::new(entry.claimed_until.map(micros)),
        Box::new(i64::try_from(entry.version).unwrap_or(i64::MAX)),
    ])
}

impl PostgresDeadLetterStore {
    /// Connect with a libpq-style connection string (`host=127.0.0.1 user=postgres
    /// dbname=test`, or a `postgresql://` URL) and create the table `helix_dead_letters` if
    /// it is missing.
    ///
    /// # Errors
    /// [`ErrorKind::Config`] for a connection string that cannot be parsed;
    /// [`ErrorKind::Connection`] when the server cannot be reached; [`ErrorKind::Backend`]
    /// when the table cannot be created.
    pub async fn connect(config: &str) -> Result<Self> {
        PostgresDeadLetterStore::connect_table(config, "helix_dead_letters").await
    }

    /// [`PostgresDeadLetterStore::connect`] with another table name (lower-case ASCII
    /// letters, digits and `_`), for several DLQs in one database.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] for a bad table name; otherwise as
    /// [`PostgresDeadLetterStore::connect`].
    pub async fn connect_table(config: &str, table: &str) -> Result<Self> {
        check_table_name("DLQ", table)?;
        let store = PostgresDeadLetterStore {
            database: Database::new(config)?,
            table: table.to_owned(),
        };
        store
            .database
            .migrate("DLQ store (PostgreSQL)", table, SCHEMA)
            .await?;
        Ok(store)
    }

    async fn query(&self, what: &str, sql: &str, params: &[Param]) -> Result<Vec<Row>> {
        self.database.query(what, sql, params).await
    }

    async fn execute(&self, what: &str, sql: &str, params: &[Param]) -> Result<u64> {
        self.database.execute(what, sql, params).await
    }

    /// A replay checkpoint store in the same database, on this store's connection (table
    /// `<dlq table>_replays`), so replays resume from where the DLQ lives.
    ///
    /// # Errors
    /// As [`PostgresReplayStore::connect`](PostgresReplayStore::connect).
    pub async fn replay_store(&self) -> Result<PostgresReplayStore> {
        PostgresReplayStore::sharing(self.database.clone(), format!("{}_replays", self.table)).await
    }

    fn placeholders(n: usize) -> String {
        (1..=n)
            .map(|i| format!("${i}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[async_trait]
impl DeadLetterStore for PostgresDeadLetterStore {
    async fn insert(&self, entry: StoredDeadLetter) -> Result<bool> {
        let params = entry_params(&entry)?;
        let sql = format!(
            "INSERT INTO {} ({COLUMNS}, version) VALUES ({}) ON CONFLICT (id) DO NOTHING",
            self.table,
            Self::placeholders(params.len())
        );
        Ok(self.execute("insert", &sql, &params).await? == 1)
    }

    async fn get(&self, id: &str) -> Result<Option<StoredDeadLetter>> {
        let sql = format!("SELECT {SELECTED} FROM {} WHERE id = $1", self.table);
        let rows = self
            .query("get", &sql, &[Box::new(id.to_owned()) as Param])
            .await?;
        rows.first().map(read_entry).transpose()
    }

    async fn get_many(&self, ids: &[String]) -> Result<Vec<StoredDeadLetter>> {
        let sql = format!(
            "SELECT {SELECTED} FROM {t} JOIN unnest($1::text[]) WITH ORDINALITY AS wanted(id, n) USING (id) ORDER BY wanted.n",
            t = self.table
        );
        let rows = self
            .query("get", &sql, &[Box::new(ids.to_vec()) as Param])
            .await?;
        rows.iter().map(read_entry).collect()
    }

    async fn list(
        &self,
        filter: &DeadLetterFilter,
        limit: usize,
        offset: usize,
    ) -> Result<Vec<StoredDeadLetter>> {
        let mut params = Vec::new();
        let clause = where_clause(filter, &mut params);
        let sql = format!(
            "SELECT {SELECTED} FROM {} WHERE {clause} ORDER BY last_failure_us, id LIMIT {} OFFSET {}",
            self.table,
            i64::try_from(limit).unwrap_or(i64::MAX),
            i64::try_from(offset).unwrap_or(i64::MAX)
        );
        let rows = self.query("list", &sql, &params).await?;
        rows.iter().map(read_entry).collect()
    }

    async fn page(
        &self,
        filter: &DeadLetterFilter,
        limit: usize,
        offset: usize,
    ) -> Result<(Vec<StoredDeadLetter>, u64)> {
        let mut params = Vec::new();
        let clause = where_clause(filter, &mut params);
        let list = format!(
            "SELECT {SELECTED} FROM {} WHERE {clause} ORDER BY last_failure_us, id LIMIT {} OFFSET {}",
            self.table,
            i64::try_from(limit).unwrap_or(i64::MAX),
            i64::try_from(offset).unwrap_or(i64::MAX)
        );
        let count = format!("SELECT COUNT(*) FROM {} WHERE {clause}", self.table);
        // One snapshot: the count is of the state the page was read from.
        let mut read = self
            .database
            .query_snapshot("page", &[(&list, &params), (&count, &params)])
            .await?
            .into_iter();
        let (rows, counted) = (
            read.next().unwrap_or_default(),
            read.next().unwrap_or_default(),
        );
        let entries = rows.iter().map(read_entry).collect::<Result<Vec<_>>>()?;
        let count = counted
            .first()
            .map_or(0, |r| r.get::<_, i64>(0).unsigned_abs());
        Ok((entries, count))
    }

    async fn count(&self, filter: &DeadLetterFilter) -> Result<u64> {
        let mut params = Vec::new();
        let clause = where_clause(filter, &mut params);
        let sql = format!("SELECT COUNT(*) FROM {} WHERE {clause}", self.table);
        let rows = self.query("count", &sql, &params).await?;
        Ok(rows
            .first()
            .map_or(0, |r| r.get::<_, i64>(0).unsigned_abs()))
    }

    async fn ids(&self, filter: &DeadLetterFilter) -> Result<Vec<String>> {
        let mut params = Vec::new();
        let clause = where_clause(filter, &mut params);
        let sql = format!(
            "SELECT id FROM {} WHERE {clause} ORDER BY last_failure_us, id",
            self.table
        );
        let rows = self.query("ids", &sql, &params).await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    async fn claim_due(
        &self,
        now: SystemTime,
        lease: Duration,
        limit: usize,
    ) -> Result<Vec<StoredDeadLetter>> {
        // SKIP LOCKED: an entry another instance is claiming right now is left to it.
        let sql = format!(
            "UPDATE {t} SET next_attempt_us = $2, claimed_until_us = $2, version = version + 1
             WHERE id IN (
                SELECT id FROM {t} WHERE status = 'pending' AND next_attempt_us <= $1
                  AND (claimed_until_us IS NULL OR claimed_until_us <= $1)
                ORDER BY next_attempt_us, id LIMIT $3 FOR UPDATE SKIP LOCKED
            ) RETURNING {SELECTED}",
            t = self.table
        );
        let params: Vec<Param> = vec![
            Box::new(micros(now)),
            Box::new(micros(now + lease)),
            Box::new(i64::try_from(limit).unwrap_or(i64::MAX)),
        ];
        let rows = self.query("claim due entries", &sql, &params).await?;
        rows.iter().map(read_entry).collect()
    }

    async fn claim(
        &self,
        ids: &[String],
        now: SystemTime,
        lease: Duration,
    ) -> Result<Vec<StoredDeadLetter>> {
        // Under READ COMMITTED a second claim of a row waits for the first to commit, then
        // sees it held and leaves it.
        let sql = format!(
            "UPDATE {} SET claimed_until_us = $2, version = version + 1
             WHERE id = ANY($1) AND status != 'discarded'
               AND (claimed_until_us IS NULL OR claimed_until_us <= $3)
             RETURNING {SELECTED}",
            self.table
        );
        let params: Vec<Param> = vec![
            Box::new(ids.to_vec()),
            Box::new(micros(now + lease)),
            Box::new(micros(now)),
        ];
        let rows = self.query("claim entries", &sql, &params).await?;
        let mut claimed: HashMap<String, StoredDeadLetter> = rows
            .iter()
            .map(|row| read_entry(row).map(|e| (e.letter.id.clone(), e)))
            .collect::<Result<_>>()?;
        Ok(ids.iter().filter_map(|id| claimed.remove(id)).collect())
    }

    async fn update(&self, entry: &StoredDeadLetter) -> Result<bool> {
        let params = entry_params(entry)?;
        let sql = format!(
            "UPDATE {} SET {}, version = version + 1 WHERE id = $1 AND version = ${WRITTEN_VALUES}",
            self.table,
            set_list(COLUMNS, '$')
        );
        Ok(self.execute("update", &sql, &params).await? == 1)
    }

    async fn remove(&self, id: &str, version: u64) -> Result<bool> {
        Ok(self.remove_many(&[(id.to_owned(), version)]).await? == 1)
    }

    async fn remove_many(&self, entries: &[(String, u64)]) -> Result<u64> {
        let sql = format!(
            "DELETE FROM {} WHERE (id, version) IN (SELECT * FROM unnest($1::text[], $2::bigint[]))",
            self.table
        );
        let (ids, versions): (Vec<String>, Vec<i64>) = entries
            .iter()
            .map(|(id, v)| (id.clone(), i64::try_from(*v).unwrap_or(i64::MAX)))
            .unzip();
        self.execute(
            "remove",
            &sql,
            &[Box::new(ids) as Param, Box::new(versions)],
        )
        .await
    }

    async fn purge(&self, filter: &DeadLetterFilter) -> Result<u64> {
        let mut params = Vec::new();
        let clause = where_clause(filter, &mut params);
        let sql = format!("DELETE FROM {} WHERE {clause}", self.table);
        self.execute("purge", &sql, &params).await
    }

    async fn groups(&self, filter: &DeadLetterFilter) -> Result<Vec<FailureGroup>> {
        let mut params = Vec::new();
        let clause = where_clause(filter, &mut params);
        let sql = format!(
            "SELECT reason, original_topic, COUNT(*), MIN(last_failure_us), MAX(last_failure_us),
                (ARRAY_AGG(error ORDER BY last_failure_us DESC, id DESC))[1]
             FROM {} WHERE {clause} GROUP BY reason, original_topic
             ORDER BY COUNT(*) DESC, original_topic",
            self.table
        );
        let rows = self.query("group failures", &sql, &params).await?;
        rows.iter()
            .map(|row| {
                Ok(FailureGroup {
                    reason: row.get::<_, String>(0).parse()?,
                    topic: row.get(1),
                    count: row.get::<_, i64>(2).unsigned_abs(),
                    oldest: from_micros(row.get(3)),
                    newest: from_micros(row.get(4)),
                    sample_error: row.get(5),
                })
            })
            .collect()
    }

    async fn stats(&self) -> Result<DeadLetterStats> {
        let sql = format!(
            "SELECT COUNT(*), COUNT(*) FILTER (WHERE status = 'parked'), MIN(last_failure_us)
             FROM {} WHERE status != 'discarded'",
            self.table
        );
        let rows = self.query("stats", &sql, &[]).await?;
        let row = rows.first().ok_or_else(|| {
            Error::new(
                ErrorKind::Backend,
                "DLQ store (PostgreSQL): stats returned no row",
            )
        })?;
        Ok(DeadLetterStats {
            depth: row.get::<_, i64>(0).unsigned_abs(),
            parked: row.get::<_, i64>(1).unsigned_abs(),
            oldest: row.get::<_, Option<i64>>(2).map(from_micros),
        })
    }
}
