//! The PostgreSQL pool the PostgreSQL stores share, and their schema migrations.

use std::sync::Arc;
use std::time::Duration;

use helix_messaging_core::{Error, ErrorKind, Result};
use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Row, Transaction};

use super::{Step, VERSIONS_TABLE, latest, pending};

/// A query parameter.
pub(crate) type Param = Box<dyn ToSql + Send + Sync>;

/// A pool of PostgreSQL connections shared by the stores that use the same database (the
/// DLQ and its replay checkpoints). Each call takes a connection of its own, so a slow or
/// blocked call (a long listing, a table another client has locked) holds up only itself,
/// never a replay's lease renewal. A lost connection is replaced on the next call.
pub(crate) struct Database {
    pool: deadpool_postgres::Pool,
}

/// Connections a store opens at most.
const POOL_SIZE: usize = 8;

impl Database {
    /// A pool for the libpq-style connection string `config`; it connects on first use.
    ///
    /// # Errors
    /// [`ErrorKind::Config`] for a connection string that cannot be parsed.
    pub(crate) fn new(config: &str) -> Result<Arc<Self>> {
        let parsed: tokio_postgres::Config = config.parse().map_err(|e| {
            Error::new(
                ErrorKind::Config,
                format!("PostgreSQL connection string: {e}"),
            )
        })?;
        let manager = deadpool_postgres::Manager::from_config(
            parsed,
            NoTls,
            deadpool_postgres::ManagerConfig {
                recycling_method: deadpool_postgres::RecyclingMethod::Fast,
            },
        );
        let pool = deadpool_postgres::Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .create_timeout(Some(Duration::from_secs(10)))
            .wait_timeout(Some(Duration::from_secs(30)))
            .build()
            .map_err(|e| Error::new(ErrorKind::Config, format!("PostgreSQL pool: {e}")))?;
        Ok(Arc::new(Database { pool }))
    }

    /// A connection of the pool, connecting first when none is idle.
    async fn connection(&self) -> Result<deadpool_postgres::Object> {
        self.pool.get().await.map_err(|e| match e {
            deadpool_postgres::PoolError::Backend(e) => db_error("connecting", e),
            other => Error::new(
                ErrorKind::Connection,
                format!("DLQ store (PostgreSQL): connecting: {other}"),
            )
            .with_retryable(true),
        })
    }

    /// Bring `table` up to `schema` in one transaction, recording the version reached; a
    /// table already there is only read. An advisory lock makes concurrent openers (several instances starting at once) apply the
    /// steps one after the other. A table missing from the database (dropped by hand, say)
    /// counts as version 0, whatever was recorded for it.
    ///
    /// # Errors
    /// [`ErrorKind::Connection`] when the server cannot be reached; [`ErrorKind::Backend`]
    /// when a step fails, or the table is recorded at a version newer than `schema`.
    pub(crate) async fn migrate(&self, store: &str, table: &str, schema: &[Step]) -> Result<()> {
        let what = "migrating the schema";
        let recorded_sql = format!(
            "SELECT v.version FROM {VERSIONS_TABLE} v
             WHERE v.table_name = $1 AND to_regclass($1) IS NOT NULL"
        );
        let mut client = self.connection().await?;
        // Up to date, the usual start: only read, without the lock or any DDL. Before the
        // versions table exists the read fails, which means the same as a stale version.
        if let Ok(Some(row)) = client.query_opt(&recorded_sql, &[&table]).await
            && row.get::<_, i64>(0) == latest(schema)
        {
            return Ok(());
        }
        let tx = client.transaction().await.map_err(|e| db_error(what, e))?;
        let recorded = async {
            tx.execute(
                &format!("SELECT pg_advisory_xact_lock(hashtext('{VERSIONS_TABLE}'))"),
                &[],
            )
            .await?;
            tx.batch_execute(&format!(
                "CREATE TABLE IF NOT EXISTS {VERSIONS_TABLE} (table_name TEXT PRIMARY KEY, version BIGINT NOT NULL)"
            ))
            .await?;
            let row = tx.query_opt(&recorded_sql, &[&table]).await?;
            Ok(row.map_or(0, |row| row.get::<_, i64>(0)))
        }
        .await
        .map_err(|e| db_error(what, e))?;
        let steps = pending(store, table, recorded, schema)?;
        if steps.is_empty() {
            // Up to date: nothing to write, so a role that may only use the table starts too.
            return tx.commit().await.map_err(|e| db_error(what, e));
        }
        for step in steps {
            match step {
                Step::Sql(sql) => tx.batch_execute(&Step::sql_for(sql, table)).await,
                Step::AddColumn {
                    column,
                    declaration,
                } => add_column(&tx, table, column, declaration).await,
            }
            .map_err(|e| db_error(what, e))?;
        }
        tx.execute(
            &format!(
                "INSERT INTO {VERSIONS_TABLE} (table_name, version) VALUES ($1, $2)
                 ON CONFLICT (table_name) DO UPDATE SET version = excluded.version"
            ),
            &[&table, &latest(schema)],
        )
        .await
        .map_err(|e| db_error(what, e))?;
        tx.commit().await.map_err(|e| db_error(what, e))
    }

    pub(crate) async fn query(&self, what: &str, sql: &str, params: &[Param]) -> Result<Vec<Row>> {
        self.connection()
            .await?
            .query(sql, &refs(params))
            .await
            .map_err(|e| db_error(what, e))
    }

    /// Run each of `queries` in one `REPEATABLE READ`, read-only transaction: every one
    /// sees the same snapshot of the database, whatever commits meanwhile. Their rows, in
    /// order.
    pub(crate) async fn query_snapshot(
        &self,
        what: &str,
        queries: &[(&str, &[Param])],
    ) -> Result<Vec<Vec<Row>>> {
        let mut client = self.connection().await?;
        let tx = client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(|e| db_error(what, e))?;
        let mut all = Vec::with_capacity(queries.len());
        for (sql, params) in queries {
            let rows = tx
                .query(*sql, &refs(params))
                .await
                .map_err(|e| db_error(what, e))?;
            all.push(rows);
        }
        tx.commit().await.map_err(|e| db_error(what, e))?;
        Ok(all)
    }

    pub(crate) async fn execute(&self, what: &str, sql: &str, params: &[Param]) -> Result<u64> {
        self.connection()
            .await?
            .execute(sql, &refs(params))
            .await
            .map_err(|e| db_error(what, e))
    }
}

pub(crate) fn db_error(what: &str, err: tokio_postgres::Error) -> Error {
    let kind = if err.is_closed() {
        ErrorKind::Connection
    } else {
        ErrorKind::Backend
    };
    Error::new(kind, format!("DLQ store (PostgreSQL): {what}: {err}"))
        .with_retryable(err.is_closed())
        .with_source(err)
}

/// `table` is usable as an unquoted table name.
pub(crate) fn check_table_name(what: &str, table: &str) -> Result<()> {
    let valid = !table.is_empty()
        && table.len() <= 63
        && table
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !table.starts_with(|c: char| c.is_ascii_digit());
    if valid {
        Ok(())
    } else {
        Err(Error::invalid_input(format!(
            "{what} table name {table:?}: use 1 to 63 lower-case ASCII letters, digits and '_', not starting with a digit"
        )))
    }
}

fn refs(params: &[Param]) -> Vec<&(dyn ToSql + Sync)> {
    params.iter().map(|p| &**p as &(dyn ToSql + Sync)).collect()
}

/// Adds `column` (declared `declaration`) to `table` when a table made by an earlier
/// version lacks it; looked up first, since `ALTER TABLE` takes the table's strongest lock.
async fn add_column(
    tx: &Transaction<'_>,
    table: &str,
    column: &str,
    declaration: &str,
) -> std::result::Result<(), tokio_postgres::Error> {
    let present = tx
        .query_opt(
            "SELECT 1 FROM information_schema.columns
             WHERE table_schema = current_schema() AND table_name = $1 AND column_name = $2",
            &[&table, &column],
        )
        .await?;
    if present.is_none() {
        tx.batch_execute(&format!(
            "ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column} {declaration}"
        ))
        .await?;
    }
    Ok(())
}
