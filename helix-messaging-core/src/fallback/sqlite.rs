//! The fallback spool in an embedded SQLite file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::Mutex;
use rusqlite::{Connection, OptionalExtension, params};

use super::{Spool, SpoolLimits, SpoolStats, SpooledMessage, full, spooled_size};
use crate::dlq::sqlite::{on_connection, open_connection};
use crate::dlq::store::{from_micros, micros};
use crate::{Error, ErrorKind, Message, Result};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS helix_spool (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    meta TEXT NOT NULL,
    payload BLOB NOT NULL,
    bytes INTEGER NOT NULL,
    spooled_us INTEGER NOT NULL
);
";

const STORE: &str = "fallback spool";

/// Spooled publishes in an SQLite file (WAL, `synchronous = FULL`: an append is on disk
/// before it returns), surviving a crash of the process. One process at a time should use a
/// file.
#[derive(Clone)]
pub struct SqliteSpool {
    connection: Arc<Mutex<Connection>>,
    path: PathBuf,
    limits: SpoolLimits,
    /// Messages and bytes held: counted once at open, then kept here (SQLite counts by
    /// scanning the table).
    held: Arc<Mutex<(u64, u64)>>,
}

impl std::fmt::Debug for SqliteSpool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteSpool")
            .field("path", &self.path)
            .field("limits", &self.limits)
            .finish()
    }
}

/// The message without its payload, as JSON (the payload has a column of its own).
fn meta(message: &Message) -> Result<String> {
    let mut parts = message.clone().into_parts();
    parts.payload = Bytes::new();
    serde_json::to_string(&Message::from_parts(parts)).map_err(|e| {
        Error::new(
            ErrorKind::Serialization,
            format!("spooling message {}: {e}", message.id()),
        )
    })
}

fn restore(meta: &str, payload: Vec<u8>) -> rusqlite::Result<Message> {
    let bare: Message = serde_json::from_str(meta).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(2, rusqlite::types::Type::Text, Box::new(e))
    })?;
    let mut parts = bare.into_parts();
    parts.payload = payload.into();
    Ok(Message::from_parts(parts))
}

fn count(c: &Connection) -> rusqlite::Result<(u64, u64)> {
    c.prepare_cached("SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM helix_spool")?
        .query_row([], |row| {
            Ok((row.get::<_, i64>(0)? as u64, row.get::<_, i64>(1)? as u64))
        })
}

impl SqliteSpool {
    /// Open (creating if needed) the spool in the file at `path`; what it already holds
    /// stays, to be forwarded.
    ///
    /// # Errors
    /// [`ErrorKind::Backend`] when the file cannot be opened or its table created.
    pub async fn open(path: impl AsRef<Path>, limits: SpoolLimits) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let connection = open_connection(&path, SCHEMA, STORE).await?;
        let held = on_connection(&connection, STORE, "counting", |c| count(c)).await?;
        Ok(SqliteSpool {
            connection,
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
    async fn append(&self, topic: &str, messages: &[Message]) -> Result<()> {
        let rows: Vec<(String, Bytes, u64)> = messages
            .iter()
            .map(|m| Ok((meta(m)?, m.payload().clone(), spooled_size(m))))
            .collect::<Result<_>>()?;
        let (topic, count) = (topic.to_owned(), messages.len());
        let bytes: u64 = rows.iter().map(|r| r.2).sum();
        {
            // Room is reserved before writing, so concurrent appends never overshoot.
            let mut held = self.held.lock();
            let (depth, held_bytes) = *held;
            if depth + count as u64 > self.limits.max_messages
                || held_bytes + bytes > self.limits.max_bytes
            {
                let stats = SpoolStats {
                    depth,
                    bytes: held_bytes,
                    oldest: None,
                };
                return Err(full(self.limits, stats, count, bytes));
            }
            held.0 += count as u64;
            held.1 += bytes;
        }
        let now = micros(SystemTime::now());
        let written = on_connection(&self.connection, STORE, "appending", move |c| {
            let tx = c.transaction()?;
            {
                let mut insert = tx.prepare_cached(
                    "INSERT INTO helix_spool (topic, meta, payload, bytes, spooled_us) VALUES (?1, ?2, ?3, ?4, ?5)",
                )?;
                for (meta, payload, bytes) in &rows {
                    insert.execute(params![topic, meta, payload.as_ref(), *bytes as i64, now])?;
                }
            }
            tx.commit()
        })
        .await;
        if written.is_err() {
            let mut held = self.held.lock();
            held.0 -= count as u64;
            held.1 -= bytes;
        }
        written
    }

    async fn oldest(&self, limit: usize) -> Result<Vec<SpooledMessage>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        on_connection(&self.connection, STORE, "reading", move |c| {
            c.prepare_cached(
                "SELECT seq, topic, meta, payload FROM helix_spool ORDER BY seq LIMIT ?1",
            )?
            .query_map(params![limit], |row| {
                let meta: String = row.get(2)?;
                Ok(SpooledMessage {
                    seq: row.get(0)?,
                    topic: row.get(1)?,
                    message: restore(&meta, row.get(3)?)?,
                })
            })?
            .collect()
        })
        .await
    }

    async fn remove(&self, seqs: &[i64]) -> Result<()> {
        let seqs = seqs.to_vec();
        let (removed, freed) = on_connection(&self.connection, STORE, "removing", move |c| {
            let tx = c.transaction()?;
            let (mut removed, mut freed) = (0u64, 0u64);
            {
                let mut delete =
                    tx.prepare_cached("DELETE FROM helix_spool WHERE seq = ?1 RETURNING bytes")?;
                for seq in &seqs {
                    if let Some(bytes) = delete
                        .query_row(params![seq], |row| row.get::<_, i64>(0))
                        .optional()?
                    {
                        removed += 1;
                        freed += bytes as u64;
                    }
                }
            }
            tx.commit()?;
            Ok((removed, freed))
        })
        .await?;
        let mut held = self.held.lock();
        held.0 = held.0.saturating_sub(removed);
        held.1 = held.1.saturating_sub(freed);
        Ok(())
    }

    async fn topics(&self) -> Result<HashMap<String, u64>> {
        on_connection(&self.connection, STORE, "listing topics", |c| {
            c.prepare_cached("SELECT topic, COUNT(*) FROM helix_spool GROUP BY topic")?
                .query_map([], |row| Ok((row.get(0)?, row.get::<_, i64>(1)? as u64)))?
                .collect()
        })
        .await
    }

    async fn stats(&self) -> Result<SpoolStats> {
        let oldest: Option<i64> = on_connection(&self.connection, STORE, "reading its age", |c| {
            c.prepare_cached("SELECT spooled_us FROM helix_spool ORDER BY seq LIMIT 1")?
                .query_row([], |row| row.get(0))
                .optional()
        })
        .await?;
        let (depth, bytes) = *self.held.lock();
        Ok(SpoolStats {
            depth,
            bytes,
            oldest: oldest.map(from_micros),
        })
    }
}
