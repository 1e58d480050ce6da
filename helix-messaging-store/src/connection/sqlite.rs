//! The SQLite file every SQLite store uses: opened with a WAL journal and
//! `synchronous = FULL` (a write is on disk before it returns), used off the async threads,
//! and migrated by the schema steps of [`super`].

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use helix_messaging_core::{Error, ErrorKind, Result};
use parking_lot::Mutex;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior};

use super::{Step, VERSIONS_TABLE, latest, pending};

/// A connection shared by the stores in one file (the DLQ and its replay records).
pub(crate) type Shared = Arc<Mutex<Connection>>;

/// Run `f` on `connection` off the async threads; errors name `store` and `what`.
pub(crate) async fn on_connection<T, F>(
    connection: &Shared,
    store: &'static str,
    what: &'static str,
    f: F,
) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
{
    let connection = connection.clone();
    let error =
        |e: &dyn std::fmt::Display| Error::new(ErrorKind::Backend, format!("{store}: {what}: {e}"));
    tokio::task::spawn_blocking(move || f(&mut connection.lock()))
        .await
        .map_err(|e| error(&e))?
        .map_err(|e| error(&e).with_source(e))
}

/// Open (creating if needed) the SQLite file at `path` the way every durable store here
/// uses it: WAL journal, `synchronous = FULL` (a write is on disk before it returns), and a
/// busy timeout for a second connection.
///
/// The page cache is 16 MiB (SQLite's default is 2 MiB): a bulk claim or removal of a
/// thousand entries touches a few hundred pages, which then stay cached instead of being
/// read back. A DLQ redrive's claim of 1,000 entries went from 15 ms to 7–9 ms here.
///
/// The WAL is checkpointed (its pages copied into the file) by a thread of the file's own
/// ([`checkpoint_in_background`]), not by the commit that happens to fill it: done inline,
/// one commit in a few hundred took 16 ms instead of 1–3, and a spool forward or a redrive
/// waits for every commit. A checkpoint moves what is already on disk, so durability is
/// the same. The thread closes its connection within [`CHECKPOINT_EVERY`] of the stores'
/// being dropped; a process that exits sooner leaves the WAL beside the file, which the
/// next open reads (copy both when backing up a file in use).
///
/// # Errors
/// [`ErrorKind::Backend`], naming `store` and the file, when it cannot be opened.
pub(crate) async fn open_file(path: &Path, store: &'static str) -> Result<Shared> {
    let opened = path.to_path_buf();
    let error = move |what: &str, e: Box<dyn std::error::Error + Send + Sync>| {
        Error::new(ErrorKind::Backend, format!("{store}: {what}: {e}")).with_source(e)
    };
    let (connection, checkpointer) =
        tokio::task::spawn_blocking(move || -> Result<(Connection, Connection)> {
            let what = format!("open {}", opened.display());
            let connection = connect(&opened)
                .and_then(|c| c.pragma_update(None, "journal_mode", "WAL").map(|()| c))
                .and_then(|c| c.pragma_update(None, "synchronous", "FULL").map(|()| c))
                .map_err(|e| error(&what, e.into()))?;
            // Opened before the commits stop checkpointing, so a WAL is never left to grow.
            let checkpointer = Connection::open(&opened)
                .and_then(|c| c.pragma_update(None, "synchronous", "FULL").map(|()| c))
                .and_then(|c| c.busy_timeout(RESTART_WAIT).map(|()| c))
                .map_err(|e| error(&what, e.into()))?;
            connection
                .pragma_update(None, "wal_autocheckpoint", 0)
                .map_err(|e| error(&what, e.into()))?;
            Ok((connection, checkpointer))
        })
        .await
        .map_err(|e| error("open", e.into()))??;
    let shared = Arc::new(Mutex::new(connection));
    let file = Arc::downgrade(&shared);
    std::thread::Builder::new()
        .name("helix-sqlite-checkpoint".into())
        .spawn(move || checkpoint_in_background(&checkpointer, &file))
        .map_err(|e| error("starting its checkpoint thread", e.into()))?;
    Ok(shared)
}

/// A second connection to `path`, already opened by [`open_file`], for reads that should not
/// queue behind the stores' commits: in a WAL file a read goes on while another connection
/// commits, seeing everything committed before it began.
///
/// # Errors
/// [`ErrorKind::Backend`], naming `store` and the file, when it cannot be opened.
pub(crate) async fn open_reader(path: &Path, store: &'static str) -> Result<Shared> {
    let opened = path.to_path_buf();
    let connection = tokio::task::spawn_blocking(move || connect(&opened))
        .await
        .map_err(|e| Error::new(ErrorKind::Backend, format!("{store}: open a reader: {e}")))?
        .map_err(|e| {
            Error::new(
                ErrorKind::Backend,
                format!("{store}: open a reader of {}: {e}", path.display()),
            )
            .with_source(e)
        })?;
    Ok(Arc::new(Mutex::new(connection)))
}

/// A connection to `path` as the stores use theirs: a 16 MiB page cache, and a busy timeout
/// for when another connection holds the file.
fn connect(path: &Path) -> rusqlite::Result<Connection> {
    let connection = Connection::open(path)?;
    connection.pragma_update(None, "cache_size", -16384)?;
    connection.busy_timeout(Duration::from_secs(5))?;
    Ok(connection)
}

/// How often the background checkpoint runs.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(50);

/// The WAL's length, in frames (pages), past which a round also brings it back to its start:
/// 16 MiB of 4 KiB pages, where SQLite's own checkpoint on commit kept it before.
const RESTART_AFTER_FRAMES: i64 = 4_000;

/// How long a restart waits for reads under way on other connections; a round that would
/// wait longer leaves the restart to the next.
const RESTART_WAIT: Duration = Duration::from_millis(250);

/// Copy the WAL's pages into the file every [`CHECKPOINT_EVERY`] on `checkpointer`, a
/// connection of its own, until `file` (the stores' connection) is dropped; then close it,
/// which checkpoints what is left.
///
/// Each round is `PASSIVE`: it never waits for, nor holds up, the stores' reads and commits,
/// which go on while it copies. But a WAL starts over only when a commit finds every page of
/// it copied, which under commits that never pause does not happen, so a WAL past
/// [`RESTART_AFTER_FRAMES`] is also `RESTART`ed, between two of the stores' operations (it
/// holds their connection meanwhile): it copies what the passive round left (little), syncs
/// the file, and the next commit writes the WAL from its start. A commit waits for that,
/// and that waits for reads under way on other connections, up to [`RESTART_WAIT`].
fn checkpoint_in_background(checkpointer: &Connection, file: &std::sync::Weak<Mutex<Connection>>) {
    while file.strong_count() > 0 {
        std::thread::sleep(CHECKPOINT_EVERY);
        // A round that fails (the file being checkpointed by a process of its own, say)
        // leaves the WAL as it was: the next round takes it up, and the stores' commits do
        // not depend on it.
        let frames: i64 = checkpointer
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| row.get(1))
            .unwrap_or(0);
        if frames > RESTART_AFTER_FRAMES
            && let Some(file) = file.upgrade()
        {
            // Holding the stores' connection, so no commit of theirs is under way: RESTART,
            // which must have the write lock and cannot queue for it, waits only for reads
            // in progress (the spool's reader), never misses its turn between two commits.
            let _between_commits = file.lock();
            let _ = checkpointer.query_row("PRAGMA wal_checkpoint(RESTART)", [], |_| Ok(()));
        }
    }
}

/// Bring `tables` (the first names the schema's version; the schema makes them all) up to
/// `schema`, recording the version reached. A file already at it is only read; otherwise the
/// steps run in one transaction that holds the write lock from its first read, so two
/// processes opening one file apply them one after the other. A table missing from the file
/// (dropped by hand, say) puts the schema back at version 0, whatever was recorded.
///
/// # Errors
/// [`ErrorKind::Backend`] when a step fails, or the table is recorded at a version newer
/// than `schema`.
pub(crate) async fn migrate(
    connection: &Shared,
    store: &'static str,
    tables: &'static [&'static str],
    schema: &'static [Step],
) -> Result<()> {
    on_connection(connection, store, "migrating the schema", move |c| {
        let table = tables[0];
        if recorded_version(c, tables)? == latest(schema) {
            return Ok(Ok(()));
        }
        let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute_batch(&format!(
            "CREATE TABLE IF NOT EXISTS {VERSIONS_TABLE} (table_name TEXT PRIMARY KEY, version INTEGER NOT NULL)"
        ))?;
        let steps = match pending(store, table, recorded_version(&tx, tables)?, schema) {
            Ok(steps) => steps,
            Err(newer) => return Ok(Err(newer)),
        };
        for step in steps {
            match step {
                Step::Sql(sql) => tx.execute_batch(&Step::sql_for(sql, table))?,
                Step::AddColumn {
                    column,
                    declaration,
                } => add_column(&tx, table, column, declaration)?,
            }
        }
        tx.execute(
            &format!(
                "INSERT INTO {VERSIONS_TABLE} (table_name, version) VALUES (?1, ?2)
                 ON CONFLICT (table_name) DO UPDATE SET version = excluded.version"
            ),
            rusqlite::params![table, latest(schema)],
        )?;
        tx.commit()?;
        Ok(Ok(()))
    })
    .await?
}

/// The version recorded for `tables[0]`: 0 when nothing is recorded, or when any of
/// `tables` is missing from the file.
fn recorded_version(c: &Connection, tables: &[&str]) -> rusqlite::Result<i64> {
    let mut exists =
        c.prepare_cached("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1")?;
    for table in std::iter::once(&VERSIONS_TABLE).chain(tables) {
        if !exists.exists([table])? {
            return Ok(0);
        }
    }
    c.query_row(
        &format!("SELECT version FROM {VERSIONS_TABLE} WHERE table_name = ?1"),
        [tables[0]],
        |row| row.get(0),
    )
    .optional()
    .map(|version| version.unwrap_or(0))
}

/// Adds `column` (declared `declaration`) to `table` when a file written by an earlier
/// version lacks it.
fn add_column(
    c: &Connection,
    table: &str,
    column: &str,
    declaration: &str,
) -> rusqlite::Result<()> {
    let present = c
        .prepare("SELECT 1 FROM pragma_table_info(?1) WHERE name = ?2")?
        .exists([table, column])?;
    if !present {
        c.execute_batch(&format!(
            "ALTER TABLE {table} ADD COLUMN {column} {declaration}"
        ))?;
    }
    Ok(())
}
