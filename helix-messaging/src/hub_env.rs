//! Building a [`Hub`] from the environment.

use std::sync::Arc;

use helix_messaging_core::hub::{Hub, HubConfig};
use helix_messaging_core::{Broker, Error, Result};

use crate::{BACKEND_VAR, backends};

/// Backend for tasks (default: `MESSAGING_BACKEND`, else `memory`).
pub const TASK_BACKEND_VAR: &str = "MESSAGING_TASK_BACKEND";
/// Backend for events (default: `MESSAGING_BACKEND`, else `memory`).
pub const EVENT_BACKEND_VAR: &str = "MESSAGING_EVENT_BACKEND";
/// `true` spools publishes while a broker is away (default `false`).
pub const FALLBACK_VAR: &str = "MESSAGING_FALLBACK_ENABLED";
/// Folder of the fallback spools (`tasks.sqlite`, `events.sqlite`; default `helix-spool`).
pub const FALLBACK_DIR_VAR: &str = "MESSAGING_FALLBACK_DIR";
/// Consumer group of task workers (default `helixagent-workers`).
pub const GROUP_VAR: &str = "KAFKA_CONSUMER_GROUP";

/// A [`Hub`] as the environment describes it: `MESSAGING_TASK_BACKEND` and
/// `MESSAGING_EVENT_BACKEND` pick each side's backend (configured from its own variables;
/// one connection when both name the same backend), `MESSAGING_FALLBACK_ENABLED` turns the
/// fallback spools on (in `MESSAGING_FALLBACK_DIR`), `KAFKA_CONSUMER_GROUP` names the
/// workers' group.
///
/// # Errors
/// [`ErrorKind::Config`](crate::ErrorKind::Config) naming the variable for an unknown or
/// not compiled-in backend or a malformed value; connection errors; the spool's error.
pub async fn hub_from_env() -> Result<Hub> {
    hub_from_vars(|name| std::env::var(name).ok()).await
}

/// [`hub_from_env`] reading variables through `lookup`.
///
/// # Errors
/// As [`hub_from_env`].
pub async fn hub_from_vars(lookup: impl Fn(&str) -> Option<String>) -> Result<Hub> {
    let named = |var: &str| {
        lookup(var)
            .map(|v| v.trim().to_ascii_lowercase())
            .filter(|v| !v.is_empty())
    };
    let default = named(BACKEND_VAR).unwrap_or_else(|| "memory".to_owned());
    let (task_name, task_var) = match named(TASK_BACKEND_VAR) {
        Some(name) => (name, TASK_BACKEND_VAR),
        None => (default.clone(), BACKEND_VAR),
    };
    let (event_name, event_var) = match named(EVENT_BACKEND_VAR) {
        Some(name) => (name, EVENT_BACKEND_VAR),
        None => (default, BACKEND_VAR),
    };
    let fallback = match named(FALLBACK_VAR).as_deref() {
        None | Some("false" | "0" | "no" | "off") => false,
        Some("true" | "1" | "yes" | "on") => true,
        Some(other) => {
            return Err(Error::config(
                FALLBACK_VAR,
                format!("expected true or false, got {other:?}"),
            ));
        }
    };
    let task_backend = backends::resolve(&task_name, task_var)?;
    let event_backend = backends::resolve(&event_name, event_var)?;
    let tasks: Arc<dyn Broker> = backends::build(task_backend, &lookup, None).await?;
    let events = if event_name == task_name {
        tasks.clone()
    } else {
        backends::build(event_backend, &lookup, None).await?
    };
    let spools = if fallback {
        Some(spools(&lookup).await?)
    } else {
        None
    };
    let mut config = HubConfig::default();
    if let Some(group) = lookup(GROUP_VAR).filter(|g| !g.trim().is_empty()) {
        config.task_group = group.trim().to_owned();
    }
    Hub::new(config, tasks, events, spools).await
}

#[cfg(feature = "sqlite")]
async fn spools(
    lookup: &impl Fn(&str) -> Option<String>,
) -> Result<(
    Arc<dyn helix_messaging_core::fallback::Spool>,
    Arc<dyn helix_messaging_core::fallback::Spool>,
)> {
    use helix_messaging_core::fallback::{SpoolLimits, SqliteSpool};
    let dir =
        std::path::PathBuf::from(lookup(FALLBACK_DIR_VAR).unwrap_or_else(|| "helix-spool".into()));
    std::fs::create_dir_all(&dir).map_err(|e| {
        Error::config(
            FALLBACK_DIR_VAR,
            format!("cannot create {}: {e}", dir.display()),
        )
    })?;
    let tasks = SqliteSpool::open(dir.join("tasks.sqlite"), SpoolLimits::default()).await?;
    let events = SqliteSpool::open(dir.join("events.sqlite"), SpoolLimits::default()).await?;
    Ok((Arc::new(tasks), Arc::new(events)))
}

#[cfg(not(feature = "sqlite"))]
async fn spools(
    _lookup: &impl Fn(&str) -> Option<String>,
) -> Result<(
    Arc<dyn helix_messaging_core::fallback::Spool>,
    Arc<dyn helix_messaging_core::fallback::Spool>,
)> {
    Err(Error::config(
        FALLBACK_VAR,
        "the durable spool needs the \"sqlite\" feature of helix-messaging",
    ))
}
