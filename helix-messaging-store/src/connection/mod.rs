//! How the stores reach their databases, in one place: the SQLite file's opening and pragmas,
//! the PostgreSQL pool, and the schema migrations both apply.
//!
//! **Migrations.** A table's schema is a list of [`Step`]s, oldest first. The number of steps
//! applied is recorded per table in `helix_schema_versions`, and opening a store applies only
//! the steps after it. Every step is also safe to apply to a table that already has it
//! (`CREATE … IF NOT EXISTS`, a column added only when missing), because databases written
//! before versions were recorded carry no version: for them every step runs, and the ones
//! they already have change nothing. A table recorded at a version newer than this build
//! knows is refused rather than written to with an older idea of its columns.

#[cfg(feature = "postgres")]
pub(crate) mod postgres;
#[cfg(feature = "sqlite")]
pub(crate) mod sqlite;

use helix_messaging_core::{Error, ErrorKind, Result};

/// The table that records how many [`Step`]s of each table's schema have been applied.
const VERSIONS_TABLE: &str = "helix_schema_versions";

/// One step of a table's schema.
pub(crate) enum Step {
    /// SQL run as one batch; `{table}` in it stands for the table's name.
    Sql(&'static str),
    /// A column that tables made by an earlier version lack. It is looked up before it is
    /// added: on PostgreSQL `ALTER TABLE` takes the table's strongest lock and needs its owner.
    AddColumn {
        /// The column's name.
        column: &'static str,
        /// Its type and constraints, as in `ALTER TABLE … ADD COLUMN`.
        declaration: &'static str,
    },
}

impl Step {
    /// The step's SQL for `table` (a [`Step::Sql`]'s batch).
    fn sql_for(sql: &str, table: &str) -> String {
        sql.replace("{table}", table)
    }
}

/// The steps of `schema` still to apply to a table recorded at `recorded`.
///
/// # Errors
/// [`ErrorKind::Backend`] when the table was recorded at a version newer than `schema`.
fn pending<'a>(store: &str, table: &str, recorded: i64, schema: &'a [Step]) -> Result<&'a [Step]> {
    let applied = usize::try_from(recorded).unwrap_or(0);
    schema.get(applied..).ok_or_else(|| {
        Error::new(
            ErrorKind::Backend,
            format!(
                "{store}: table {table} is at schema version {recorded}, newer than the {} this build knows; open it with the newer build",
                schema.len()
            ),
        )
    })
}

/// The version to record once `schema` is applied.
fn latest(schema: &[Step]) -> i64 {
    i64::try_from(schema.len()).unwrap_or(i64::MAX)
}
