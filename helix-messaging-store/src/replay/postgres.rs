//! Replay checkpoints in PostgreSQL.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use helix_messaging_core::Result;
use helix_messaging_core::replay::{ReplayLease, ReplayRecord, ReplayStore};

use crate::connection::Step;
use crate::connection::postgres::{Database, Param, check_table_name};
use crate::sql::{lease_micros, stored_epoch};

/// The table's schema, oldest step first ([`crate::connection`]): the table as it is made
/// today, then the lease epoch tables made before leases had epochs lack.
const SCHEMA: &[Step] = &[
    Step::Sql(
        "CREATE TABLE IF NOT EXISTS {table} (
             id TEXT PRIMARY KEY,
             record TEXT NOT NULL,
             updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
             owner TEXT,
             lease_until_us BIGINT,
             lease_epoch BIGINT NOT NULL DEFAULT 0
         );",
    ),
    Step::AddColumn {
        column: "lease_epoch",
        declaration: "BIGINT NOT NULL DEFAULT 0",
    },
];

/// Replay records in a PostgreSQL table (default `helix_replays`). Connect on its own with
/// [`PostgresReplayStore::connect`], or on the DLQ's connection with
/// [`PostgresDeadLetterStore::replay_store`](crate::PostgresDeadLetterStore::replay_store).
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
    /// [`ErrorKind::Config`](helix_messaging_core::ErrorKind::Config) for a connection string that cannot be
    /// parsed; [`ErrorKind::Connection`](helix_messaging_core::ErrorKind::Connection) when the server cannot be
    /// reached; [`ErrorKind::Backend`](helix_messaging_core::ErrorKind::Backend) when the table cannot be
    /// created.
    pub async fn connect(config: &str) -> Result<Self> {
        PostgresReplayStore::sharing(Database::new(config)?, "helix_replays".to_owned()).await
    }

    pub(crate) async fn sharing(database: Arc<Database>, table: String) -> Result<Self> {
        check_table_name("replay", &table)?;
        database.migrate("replay store", &table, SCHEMA).await?;
        Ok(PostgresReplayStore { database, table })
    }
}

/// The server's clock, in microseconds since the Unix epoch: every handler sharing the
/// database judges leases by it.
const NOW_US: &str = "(extract(epoch from clock_timestamp()) * 1000000)::bigint";

#[async_trait]
impl ReplayStore for PostgresReplayStore {
    async fn create(
        &self,
        record: &ReplayRecord,
        owner: &str,
        duration: Duration,
    ) -> Result<Option<ReplayLease>> {
        let sql = format!(
            "INSERT INTO {} (id, record, owner, lease_epoch, lease_until_us)
             VALUES ($1, $2, $3, 1, {NOW_US} + $4) ON CONFLICT (id) DO NOTHING",
            self.table
        );
        let params: [Param; 4] = [
            Box::new(record.id().to_owned()),
            Box::new(record.to_json()?),
            Box::new(owner.to_owned()),
            Box::new(lease_micros(duration)),
        ];
        let created = self
            .database
            .execute("creating a replay", &sql, &params)
            .await?
            == 1;
        Ok(created.then(|| ReplayLease {
            owner: owner.to_owned(),
            epoch: 1,
        }))
    }

    async fn save(&self, record: &ReplayRecord, lease: &ReplayLease) -> Result<bool> {
        let sql = format!(
            "UPDATE {} SET record = $2, updated_at = now()
             WHERE id = $1 AND owner = $3 AND lease_epoch = $4",
            self.table
        );
        let params: [Param; 4] = [
            Box::new(record.id().to_owned()),
            Box::new(record.to_json()?),
            Box::new(lease.owner.clone()),
            Box::new(stored_epoch(lease)),
        ];
        Ok(self
            .database
            .execute("saving a replay", &sql, &params)
            .await?
            == 1)
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
        duration: Duration,
    ) -> Result<Option<ReplayLease>> {
        let sql = format!(
            "UPDATE {} SET owner = $2, lease_epoch = lease_epoch + 1,
                 lease_until_us = {NOW_US} + $3
             WHERE id = $1 AND (owner IS NULL OR owner = $2 OR lease_until_us < {NOW_US})
             RETURNING lease_epoch",
            self.table
        );
        let params: [Param; 3] = [
            Box::new(id.to_owned()),
            Box::new(owner.to_owned()),
            Box::new(lease_micros(duration)),
        ];
        let rows = self
            .database
            .query("claiming a replay", &sql, &params)
            .await?;
        Ok(rows.first().map(|row| ReplayLease {
            owner: owner.to_owned(),
            epoch: u64::try_from(row.get::<_, i64>(0)).unwrap_or(0),
        }))
    }

    async fn renew(&self, id: &str, lease: &ReplayLease, duration: Duration) -> Result<bool> {
        let sql = format!(
            "UPDATE {} SET lease_until_us = {NOW_US} + $4
             WHERE id = $1 AND owner = $2 AND lease_epoch = $3",
            self.table
        );
        let params: [Param; 4] = [
            Box::new(id.to_owned()),
            Box::new(lease.owner.clone()),
            Box::new(stored_epoch(lease)),
            Box::new(lease_micros(duration)),
        ];
        Ok(self
            .database
            .execute("renewing a replay's lease", &sql, &params)
            .await?
            == 1)
    }

    async fn release(&self, id: &str, lease: &ReplayLease) -> Result<()> {
        let sql = format!(
            "UPDATE {} SET owner = NULL, lease_until_us = NULL
             WHERE id = $1 AND owner = $2 AND lease_epoch = $3",
            self.table
        );
        let params: [Param; 3] = [
            Box::new(id.to_owned()),
            Box::new(lease.owner.clone()),
            Box::new(stored_epoch(lease)),
        ];
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
