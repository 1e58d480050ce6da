//! Replay checkpoints in an embedded SQLite file.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use parking_lot::Mutex;
use rusqlite::{Connection, OptionalExtension, params};

use super::{ReplayRecord, ReplayStore};
use crate::Result;
use crate::dlq::sqlite::{on_connection, open_connection};
use crate::dlq::store::micros;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS helix_replays (
    id TEXT PRIMARY KEY,
    record TEXT NOT NULL,
    updated_us INTEGER NOT NULL,
    owner TEXT,
    lease_until_us INTEGER
);
";

const STORE: &str = "replay store";

/// Replay records in an SQLite file (WAL, `synchronous = FULL`: a checkpoint is on disk
/// before the replay publishes past it). Open it on its own file with
/// [`SqliteReplayStore::open`], or in the DLQ's file with
/// [`SqliteDeadLetterStore::replay_store`](crate::dlq::SqliteDeadLetterStore::replay_store).
#[derive(Clone)]
pub struct SqliteReplayStore {
    connection: Arc<Mutex<Connection>>,
    path: PathBuf,
}

impl std::fmt::Debug for SqliteReplayStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteReplayStore")
            .field("path", &self.path)
            .finish()
    }
}

impl SqliteReplayStore {
    /// Open (creating if needed) the store in the file at `path`.
    ///
    /// # Errors
    /// [`ErrorKind::Backend`](crate::ErrorKind::Backend) when the file cannot be opened or
    /// its table created.
    pub async fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let connection = open_connection(&path, SCHEMA, STORE).await?;
        Ok(SqliteReplayStore { connection, path })
    }

    pub(crate) async fn sharing(connection: Arc<Mutex<Connection>>, path: PathBuf) -> Result<Self> {
        on_connection(&connection, STORE, "creating the table", |c| {
            c.execute_batch(SCHEMA)
        })
        .await?;
        Ok(SqliteReplayStore { connection, path })
    }

    /// The file the store lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[async_trait]
impl ReplayStore for SqliteReplayStore {
    async fn save(&self, record: &ReplayRecord) -> Result<()> {
        let (id, json) = (record.id().to_owned(), record.to_json()?);
        let now = micros(std::time::SystemTime::now());
        on_connection(&self.connection, STORE, "saving a replay", move |c| {
            c.prepare_cached(
                "INSERT INTO helix_replays (id, record, updated_us) VALUES (?1, ?2, ?3)
                 ON CONFLICT (id) DO UPDATE SET record = excluded.record, updated_us = excluded.updated_us",
            )?
            .execute(params![id, json, now])
            .map(drop)
        })
        .await
    }

    async fn load(&self, id: &str) -> Result<Option<ReplayRecord>> {
        let key = id.to_owned();
        let json: Option<String> =
            on_connection(&self.connection, STORE, "loading a replay", move |c| {
                c.prepare_cached("SELECT record FROM helix_replays WHERE id = ?1")?
                    .query_row(params![key], |row| row.get(0))
                    .optional()
            })
            .await?;
        json.map(|json| ReplayRecord::from_json(id, &json))
            .transpose()
    }

    async fn list(&self) -> Result<Vec<ReplayRecord>> {
        let rows: Vec<(String, String)> =
            on_connection(&self.connection, STORE, "listing replays", |c| {
                c.prepare_cached("SELECT id, record FROM helix_replays")?
                    .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?
                    .collect()
            })
            .await?;
        rows.iter()
            .map(|(id, json)| ReplayRecord::from_json(id, json))
            .collect()
    }

    async fn claim(
        &self,
        id: &str,
        owner: &str,
        until: std::time::SystemTime,
        now: std::time::SystemTime,
    ) -> Result<bool> {
        let (key, owner) = (id.to_owned(), owner.to_owned());
        let (until, now) = (micros(until), micros(now));
        on_connection(&self.connection, STORE, "claiming a replay", move |c| {
            c.prepare_cached(
                "UPDATE helix_replays SET owner = ?2, lease_until_us = ?3
                 WHERE id = ?1 AND (owner IS NULL OR owner = ?2 OR lease_until_us < ?4)",
            )?
            .execute(params![key, owner, until, now])
            .map(|n| n == 1)
        })
        .await
    }

    async fn release(&self, id: &str, owner: &str) -> Result<()> {
        let (key, owner) = (id.to_owned(), owner.to_owned());
        on_connection(&self.connection, STORE, "releasing a replay", move |c| {
            c.prepare_cached(
                "UPDATE helix_replays SET owner = NULL, lease_until_us = NULL
                 WHERE id = ?1 AND owner = ?2",
            )?
            .execute(params![key, owner])
            .map(drop)
        })
        .await
    }

    async fn remove(&self, id: &str) -> Result<bool> {
        let key = id.to_owned();
        on_connection(&self.connection, STORE, "removing a replay", move |c| {
            c.prepare_cached("DELETE FROM helix_replays WHERE id = ?1")?
                .execute(params![key])
                .map(|n| n > 0)
        })
        .await
    }
}
