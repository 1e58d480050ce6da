//! Replay checkpoints in an embedded SQLite file.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use helix_messaging_core::Result;
use helix_messaging_core::replay::{ReplayLease, ReplayRecord, ReplayStore};
use rusqlite::{OptionalExtension, params};

use crate::connection::Step;
use crate::connection::sqlite::{Shared, migrate, on_connection, open_file};
use crate::sql::{lease_micros, stored_epoch};

/// The table's schema, oldest step first ([`crate::connection`]): the table as it is made
/// today, then the lease epoch files written before leases had epochs lack.
const SCHEMA: &[Step] = &[
    Step::Sql(
        "CREATE TABLE IF NOT EXISTS helix_replays (
             id TEXT PRIMARY KEY,
             record TEXT NOT NULL,
             updated_us INTEGER NOT NULL,
             owner TEXT,
             lease_until_us INTEGER,
             lease_epoch INTEGER NOT NULL DEFAULT 0
         );",
    ),
    Step::AddColumn {
        column: "lease_epoch",
        declaration: "INTEGER NOT NULL DEFAULT 0",
    },
];

/// The store's clock, in microseconds since the Unix epoch: every handler sharing the file
/// judges leases by it.
const NOW_US: &str = "CAST(unixepoch('subsec') * 1000000 AS INTEGER)";

const STORE: &str = "replay store";

/// Replay records in an SQLite file (WAL, `synchronous = FULL`: a checkpoint is on disk
/// before the replay publishes past it). Open it on its own file with
/// [`SqliteReplayStore::open`], or in the DLQ's file with
/// [`SqliteDeadLetterStore::replay_store`](crate::SqliteDeadLetterStore::replay_store).
#[derive(Clone)]
pub struct SqliteReplayStore {
    connection: Shared,
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
    /// [`ErrorKind::Backend`](helix_messaging_core::ErrorKind::Backend) when the file cannot be opened or
    /// its table created.
    pub async fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let connection = open_file(&path, STORE).await?;
        SqliteReplayStore::sharing(connection, path).await
    }

    pub(crate) async fn sharing(connection: Shared, path: PathBuf) -> Result<Self> {
        migrate(&connection, STORE, &["helix_replays"], SCHEMA).await?;
        Ok(SqliteReplayStore { connection, path })
    }

    /// The file the store lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[async_trait]
impl ReplayStore for SqliteReplayStore {
    async fn create(
        &self,
        record: &ReplayRecord,
        owner: &str,
        duration: Duration,
    ) -> Result<Option<ReplayLease>> {
        let (id, json) = (record.id().to_owned(), record.to_json()?);
        let holder = owner.to_owned();
        let created = on_connection(&self.connection, STORE, "creating a replay", move |c| {
            c.prepare_cached(&format!(
                "INSERT INTO helix_replays (id, record, updated_us, owner, lease_epoch, lease_until_us)
                 VALUES (?1, ?2, {NOW_US}, ?3, 1, {NOW_US} + ?4)
                 ON CONFLICT (id) DO NOTHING"
            ))?
            .execute(params![id, json, holder, lease_micros(duration)])
            .map(|n| n == 1)
        })
        .await?;
        Ok(created.then(|| ReplayLease {
            owner: owner.to_owned(),
            epoch: 1,
        }))
    }

    async fn save(&self, record: &ReplayRecord, lease: &ReplayLease) -> Result<bool> {
        let (id, json) = (record.id().to_owned(), record.to_json()?);
        let (owner, epoch) = (lease.owner.clone(), stored_epoch(lease));
        on_connection(&self.connection, STORE, "saving a replay", move |c| {
            c.prepare_cached(&format!(
                "UPDATE helix_replays SET record = ?2, updated_us = {NOW_US}
                 WHERE id = ?1 AND owner = ?3 AND lease_epoch = ?4"
            ))?
            .execute(params![id, json, owner, epoch])
            .map(|n| n == 1)
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
        duration: Duration,
    ) -> Result<Option<ReplayLease>> {
        let (key, holder) = (id.to_owned(), owner.to_owned());
        let epoch: Option<i64> =
            on_connection(&self.connection, STORE, "claiming a replay", move |c| {
                c.prepare_cached(&format!(
                    "UPDATE helix_replays
                     SET owner = ?2, lease_epoch = lease_epoch + 1, lease_until_us = {NOW_US} + ?3
                     WHERE id = ?1 AND (owner IS NULL OR owner = ?2 OR lease_until_us < {NOW_US})
                     RETURNING lease_epoch"
                ))?
                .query_row(params![key, holder, lease_micros(duration)], |row| {
                    row.get(0)
                })
                .optional()
            })
            .await?;
        Ok(epoch.map(|epoch| ReplayLease {
            owner: owner.to_owned(),
            epoch: u64::try_from(epoch).unwrap_or(0),
        }))
    }

    async fn renew(&self, id: &str, lease: &ReplayLease, duration: Duration) -> Result<bool> {
        let (key, owner, epoch) = (id.to_owned(), lease.owner.clone(), stored_epoch(lease));
        on_connection(
            &self.connection,
            STORE,
            "renewing a replay's lease",
            move |c| {
                c.prepare_cached(&format!(
                    "UPDATE helix_replays SET lease_until_us = {NOW_US} + ?4
                 WHERE id = ?1 AND owner = ?2 AND lease_epoch = ?3"
                ))?
                .execute(params![key, owner, epoch, lease_micros(duration)])
                .map(|n| n == 1)
            },
        )
        .await
    }

    async fn release(&self, id: &str, lease: &ReplayLease) -> Result<()> {
        let (key, owner, epoch) = (id.to_owned(), lease.owner.clone(), stored_epoch(lease));
        on_connection(&self.connection, STORE, "releasing a replay", move |c| {
            c.prepare_cached(
                "UPDATE helix_replays SET owner = NULL, lease_until_us = NULL
                 WHERE id = ?1 AND owner = ?2 AND lease_epoch = ?3",
            )?
            .execute(params![key, owner, epoch])
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
