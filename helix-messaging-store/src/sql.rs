//! What every SQL store here writes the same way: filter conditions, `SET` lists, times as
//! microseconds, lease lengths and epochs as signed 64-bit columns.

use std::time::{Duration, SystemTime};

use helix_messaging_core::dlq::{DeadLetterFilter, EntryStatus};
use helix_messaging_core::replay::ReplayLease;

/// A value a SQL store binds for a filter condition.
pub(crate) enum SqlValue {
    Text(String),
    Int(i64),
}

/// `filter` as SQL conditions (`"<column> <operator>"` and the value to bind), the same for
/// every SQL store; an empty list matches everything.
pub(crate) fn sql_conditions(filter: &DeadLetterFilter) -> Vec<(&'static str, SqlValue)> {
    let text = |s: &str| SqlValue::Text(s.to_owned());
    let mut out = Vec::new();
    if let Some(topic) = &filter.topic {
        out.push(("original_topic =", text(topic)));
    }
    if let Some(reason) = filter.reason {
        out.push(("reason =", text(reason.as_str())));
    }
    if let Some(message_type) = &filter.message_type {
        out.push(("message_type =", text(message_type)));
    }
    if let Some(status) = filter.status {
        out.push(("status =", text(status.as_str())));
    }
    if let Some(id) = &filter.original_id {
        out.push(("message_id =", text(id)));
    }
    if let Some(from) = filter.from {
        out.push(("last_failure_us >=", SqlValue::Int(micros(from))));
    }
    if let Some(to) = filter.to {
        out.push(("last_failure_us <", SqlValue::Int(micros(to))));
    }
    if filter.exclude_discarded {
        out.push(("status <>", text(EntryStatus::Discarded.as_str())));
    }
    out
}

/// `col2 = <p>2, col3 = <p>3, …` for every column after the first (the id, bound as
/// `<p>1`) of the comma-separated `columns`: the `SET` list of an update by id, with
/// placeholders written `<p>N` (`?` for SQLite, `$` for PostgreSQL).
pub(crate) fn set_list(columns: &str, placeholder: char) -> String {
    columns
        .split(',')
        .map(str::trim)
        .enumerate()
        .skip(1)
        .map(|(i, column)| format!("{column} = {placeholder}{}", i + 1))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Microseconds since the epoch, as SQL stores keep times.
pub(crate) fn micros(t: SystemTime) -> i64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// The inverse of [`micros`].
pub(crate) fn from_micros(us: i64) -> SystemTime {
    std::time::UNIX_EPOCH + Duration::from_micros(u64::try_from(us).unwrap_or(0))
}

/// A lease's length in microseconds, as the SQL stores add it to their clock.
pub(crate) fn lease_micros(duration: Duration) -> i64 {
    i64::try_from(duration.as_micros()).unwrap_or(i64::MAX)
}

/// The lease's epoch as the SQL stores keep it (a signed 64-bit column).
pub(crate) fn stored_epoch(lease: &ReplayLease) -> i64 {
    i64::try_from(lease.epoch).unwrap_or(i64::MAX)
}
