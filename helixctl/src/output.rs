//! What helixctl prints: an answer as JSON or as text lines, and a failure as the API's JSON
//! error or a line.

use helix_messaging_admin::api::{Entry, Group, Health, Queue, Redrive, Replay};
use serde::Serialize;

use crate::client::Failure;

/// Print `value` on stdout: its JSON with `--json`, else `text` of it.
pub(crate) fn print<T: Serialize>(json_out: bool, value: &T, text: impl FnOnce(&T) -> String) {
    if json_out {
        println!("{}", pretty(value));
    } else {
        println!("{}", text(value));
    }
}

/// `value` as indented JSON.
pub(crate) fn pretty<T: Serialize>(value: &T) -> String {
    serde_json::to_string_pretty(value).expect("the API's types serialize")
}

/// Print `failure` on stderr: with `--json` the API's error shape on one line (stdout stays
/// for answers, so a script reading it never mistakes an error for one), else a line.
pub(crate) fn report(json_out: bool, failure: &Failure) {
    if json_out {
        let body = serde_json::to_string(&failure.body()).expect("an error body serializes");
        eprintln!("{body}");
    } else {
        eprintln!("helixctl: {}", failure.text());
    }
}

/// A DLQ entry on one line.
pub(crate) fn entry_line(e: &Entry<'_>) -> String {
    format!(
        "{}  {}  {}  {}  attempts {}  {}",
        e.id, e.status, e.original_topic, e.reason, e.attempts, e.error,
    )
}

/// A failure group on one line.
pub(crate) fn group_line(g: &Group<'_>) -> String {
    format!(
        "{:>6}  {}  {}  newest {}  {}",
        g.count, g.reason, g.topic, g.newest, g.sample_error,
    )
}

/// A replay's progress on one line.
pub(crate) fn replay_line(p: &Replay) -> String {
    format!(
        "{}  {}  {} -> {}  total {}  replayed {}  skipped {}  failed {}",
        p.id, p.status, p.topic, p.target_topic, p.total, p.replayed, p.skipped, p.failed,
    )
}

/// A redrive job's progress on one line.
pub(crate) fn redrive_line(p: &Redrive) -> String {
    format!(
        "{}  {}  total {}  redriven {}  skipped {}  failed {}{}",
        p.id,
        p.status,
        p.total,
        p.redriven,
        p.skipped,
        p.failed,
        p.last_error
            .as_deref()
            .map(|e| format!("  last error: {e}"))
            .unwrap_or_default(),
    )
}

/// A consumer group as one line: side, topic and group, then the backend's own name for it
/// (`rabbitmq queue helixagent.tasks.llm.helixagent-workers`) and its backlog.
pub(crate) fn queue_line(q: &Queue) -> String {
    let backlog = match (q.waiting, q.in_flight, &q.backlog_error) {
        (Some(waiting), Some(in_flight), _) => format!("waiting {waiting}  in flight {in_flight}"),
        (Some(waiting), None, _) => format!("waiting {waiting}"),
        (None, _, Some(error)) => format!("backlog unknown: {error}"),
        (None, _, None) => "backlog unknown".to_owned(),
    };
    format!(
        "{}  {}  group {}  →  {} {} {}{}  {backlog}",
        q.side,
        q.topic,
        q.group,
        q.backend,
        q.kind,
        q.name,
        q.source
            .as_deref()
            .map(|s| format!(" ({s})"))
            .unwrap_or_default(),
    )
}

/// Health as text: the overall status, then each side's with its detail.
pub(crate) fn health_text(h: &Health) -> String {
    format!(
        "{}\ntasks:  {} ({})\nevents: {} ({})",
        h.status, h.tasks.status, h.tasks.detail, h.events.status, h.events.detail,
    )
}

/// A list as text: `{count} {what}`, then a line per item.
pub(crate) fn list_text<T>(
    count: impl std::fmt::Display,
    what: &str,
    items: &[T],
    line: impl Fn(&T) -> String,
) -> String {
    let mut out = format!("{count} {what}");
    for item in items {
        out.push('\n');
        out.push_str(&line(item));
    }
    out
}
