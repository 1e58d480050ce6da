//! Replay checkpoints in PostgreSQL.

use std::sync::Arc;

use async_trait::async_trait;

use super::{ReplayRecord, ReplayStore};
use crate::Result;
use crate::dlq::postgres::{Database, Param, check_table_name};
use crate::dlq::store::micros;

/// Replay records in a PostgreSQL table (default `helix_replays`). Connect on its own with
/// [`PostgresReplayStore::connect`], or on the DLQ's connection with
/// [`PostgresDeadLetterStore::replay_store`](crate::dlq::PostgresDeadLetterStore::replay_store).
pub struct PostgresReplayStore {
    database: Arc<Database>,
    table: String,
}

impl std::fmt::Debug for PostgresReplayStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The connection string may hold a password.
        f.debug_struct("PostgresReplayStore")
            .field("table", &self.table)
            .finish_non_exhaustive()
    }
}

impl PostgresReplayStore {
    /// Connect with a libpq-style connection string and create the table `helix_replays`
    /// if it is missing.
    ///
    /// # Errors
    /// [`ErrorKind::Connection`](crate::ErrorKind::Connection) when the server cannot be
    /// reached; [`ErrorKind::Backend`](crate::ErrorKind::Backend) when the table cannot be
    /// created.
    pub async fn connect(config: &str) -> Result<Self> {
        PostgresReplayStore::sharing(Database::new(config), "helix_replays".to_owned()).await
    }

    pub(crate) async fn sharing(database: Arc<Database>, table: String) -> Result<Self> {
        check_table_name("replay", &table)?;
        let schema = format!(
            "CREATE TABLE IF NOT EXISTS {table} (
                id TEXT PRIMARY KEY,
                record TEXT NOT NULL,
                updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
                owner TEXT,
                lease_until_us BIGINT
            );"
        );
        database
            .batch_execute("creating the replay table", &schema)
            .await?;
        Ok(PostgresReplayStore { database, table })
    }
}

#[async_trait]
impl ReplayStore for PostgresReplayStore {
    async fn save(&self, record: &ReplayRecord) -> Result<()> {
        let sql = format!(
            "INSERT INTO {} (id, record) VALUES ($1, $2)
             ON CONFLICT (id) DO UPDATE SET record = excluded.record, updated_at = now()",
            self.table
        );
        let params: [Param; 2] = [
            Box::new(record.id().to_owned()),
            Box::new(record.to_json()?),
        ];
        self.database
            .execute("saving a replay", &sql, &params)
            .await
            .map(drop)
    }

    async fn load(&self, id: &str) -> Result<Option<ReplayRecord>> {
        let sql = format!("SELECT record FROM {} WHERE id = $1", self.table);
        let rows = self
            .database
            .query(
                "loading a replay",
                &sql,
                &[Box::new(id.to_owned()) as Param],
            )
            .await?;
        rows.first()
            .map(|row| ReplayRecord::from_json(id, row.get(0)))
            .transpose()
    }

    async fn list(&self) -> Result<Vec<ReplayRecord>> {
        let sql = format!("SELECT id, record FROM {}", self.table);
        let rows = self.database.query("listing replays", &sql, &[]).await?;
        rows.iter()
            .map(|row| ReplayRecord::from_json(row.get(0), row.get(1)))
            .collect()
    }

    async fn claim(
        &self,
        id: &str,
        owner: &str,
        until: std::time::SystemTime,
        now: std::time::SystemTime,
    ) -> Result<bool> {
        let sql = format!(
            "UPDATE {} SET owner = $2, lease_until_us = $3
             WHERE id = $1 AND (owner IS NULL OR owner = $2 OR lease_until_us < $4)",
            self.table
        );
        let params: [Param; 4] = [
            Box::new(id.to_owned()),
            Box::new(owner.to_owned()),
            Box::new(micros(until)),
            Box::new(micros(now)),
        ];
        Ok(self
            .database
            .execute("claiming a replay", &sql, &params)
            .await?
            == 1)
    }

    async fn release(&self, id: &str, owner: &str) -> Result<()> {
        let sql = format!(
            "UPDATE {} SET owner = NULL, lease_until_us = NULL WHERE id = $1 AND owner = $2",
            self.table
        );
        let params: [Param; 2] = [Box::new(id.to_owned()), Box::new(owner.to_owned())];
        self.database
            .execute("releasing a replay", &sql, &params)
            .await
            .map(drop)
    }

    async fn remove(&self, id: &str) -> Result<bool> {
        let sql = format!("DELETE FROM {} WHERE id = $1", self.table);
        let removed = self
            .database
            .execute(
                "removing a replay",
                &sql,
                &[Box::new(id.to_owned()) as Param],
            )
            .await?;
        Ok(removed > 0)
    }
}
