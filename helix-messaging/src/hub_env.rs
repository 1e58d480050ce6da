//! Building a [`Hub`] from the environment.

use std::sync::Arc;

use helix_messaging_core::hub::{Hub, HubConfig};
use helix_messaging_core::{Broker, Error, Result};

use crate::backends::{self, BACKEND_VAR, Configured};

/// `false` turns messaging to brokers off (HelixAgent's switch for its messaging hub): the
/// hub runs both sides on the in-memory backend, connects to nothing and spools nothing,
/// whatever the backend variables say (default `true`).
pub const ENABLED_VAR: &str = "MESSAGING_ENABLED";
/// Backend for tasks (default: `MESSAGING_BACKEND`, else `memory`).
pub const TASK_BACKEND_VAR: &str = "MESSAGING_TASK_BACKEND";
/// Backend for events (default: `MESSAGING_BACKEND`, else `memory`).
pub const EVENT_BACKEND_VAR: &str = "MESSAGING_EVENT_BACKEND";
/// `true` spools publishes while a broker is away (default `false`).
pub const FALLBACK_VAR: &str = "MESSAGING_FALLBACK_ENABLED";
/// Folder of the fallback spools (`tasks.sqlite`, `events.sqlite`; default `helix-spool`).
pub const FALLBACK_DIR_VAR: &str = "MESSAGING_FALLBACK_DIR";
/// Most messages each fallback spool holds (default 100,000); beyond it publishes fail.
pub const FALLBACK_MAX_MESSAGES_VAR: &str = "MESSAGING_FALLBACK_MAX_MESSAGES";
/// Most payload and header bytes each fallback spool holds (default 268,435,456, 256 MiB).
pub const FALLBACK_MAX_BYTES_VAR: &str = "MESSAGING_FALLBACK_MAX_BYTES";
/// Failures in a row that open a hub side's circuit breaker (default 5).
pub const BREAKER_FAILURES_VAR: &str = "MESSAGING_BREAKER_FAILURE_THRESHOLD";
/// Milliseconds an open breaker fails fast before a probe (default 30,000). Spooled
/// publishes are forwarded from the first successful probe on, so this is also how long
/// after a broker is back the spool may wait.
pub const BREAKER_OPEN_MS_VAR: &str = "MESSAGING_BREAKER_OPEN_MS";
/// Milliseconds between samples of the consumer groups' backlogs into
/// `messaging_queue_depth` and `messaging_consumer_lag` (default 15,000).
pub const BACKLOG_INTERVAL_MS_VAR: &str = "MESSAGING_METRICS_BACKLOG_INTERVAL_MS";
/// Consumer group of task workers (default `helixagent-workers`).
pub const GROUP_VAR: &str = "KAFKA_CONSUMER_GROUP";
/// Task queues, comma-separated, whose workers' group the hub creates when it starts
/// ([`HubConfig::task_queues`]; default none).
pub const TASK_QUEUES_VAR: &str = "MESSAGING_TASK_QUEUES";

/// A [`Hub`] as the environment describes it: `MESSAGING_TASK_BACKEND` and
/// `MESSAGING_EVENT_BACKEND` pick each side's backend (configured from its own variables;
/// one connection when both name the same backend), `MESSAGING_FALLBACK_ENABLED` turns the
/// fallback spools on (in `MESSAGING_FALLBACK_DIR`, bounded by
/// `MESSAGING_FALLBACK_MAX_MESSAGES` and `MESSAGING_FALLBACK_MAX_BYTES`),
/// `MESSAGING_BREAKER_FAILURE_THRESHOLD` and `MESSAGING_BREAKER_OPEN_MS` tune the circuit
/// breakers, `MESSAGING_METRICS_BACKLOG_INTERVAL_MS` sets how often backlogs are sampled
/// into the queue-depth and lag gauges, `KAFKA_CONSUMER_GROUP` names the workers' group and
/// `MESSAGING_TASK_QUEUES` lists the task queues whose group is created at start.
/// `MESSAGING_ENABLED=false` runs both sides on the in-memory backend instead, reading no
/// broker's variables and opening no spool.
///
/// With the spools on, the hub is returned even while a broker is unreachable: it connects
/// in the background ([`LazyBroker`](crate::lazy::LazyBroker)) and publishes are spooled
/// until it is connected. Without them an unreachable broker is an error here.
///
/// # Errors
/// [`ErrorKind::Config`](crate::ErrorKind::Config) naming the variable for an unknown or
/// not compiled-in backend or a malformed value; connection errors (without the spools);
/// the spool's error.
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
    let flag = |var: &str| match named(var).as_deref() {
        None => Ok(None),
        Some("false" | "0" | "no" | "off") => Ok(Some(false)),
        Some("true" | "1" | "yes" | "on") => Ok(Some(true)),
        Some(other) => Err(Error::config(
            var,
            format!("expected true or false, got {other:?}"),
        )),
    };
    let enabled = flag(ENABLED_VAR)?.unwrap_or(true);
    let fallback = flag(FALLBACK_VAR)?.unwrap_or(false);
    // Disabled, HelixAgent keeps its work in the process: the brokers' variables are not
    // read (an unreachable or half-configured broker must not stop it starting), and with
    // nothing to be away there is nothing to spool.
    let ((task_name, task_var), (event_name, event_var), fallback) = if enabled {
        let default = named(BACKEND_VAR).unwrap_or_else(|| "memory".to_owned());
        let task = match named(TASK_BACKEND_VAR) {
            Some(name) => (name, TASK_BACKEND_VAR),
            None => (default.clone(), BACKEND_VAR),
        };
        let event = match named(EVENT_BACKEND_VAR) {
            Some(name) => (name, EVENT_BACKEND_VAR),
            None => (default, BACKEND_VAR),
        };
        (task, event, fallback)
    } else {
        let memory = ("memory".to_owned(), ENABLED_VAR);
        (memory.clone(), memory, false)
    };
    let mut config = HubConfig::default();
    let failures = positive(
        &lookup,
        BREAKER_FAILURES_VAR,
        config.breaker.failure_threshold.into(),
    )?;
    config.breaker.failure_threshold = u32::try_from(failures)
        .map_err(|_| Error::config(BREAKER_FAILURES_VAR, format!("{failures} is too large")))?;
    config.breaker.open_interval =
        positive_ms(&lookup, BREAKER_OPEN_MS_VAR, config.breaker.open_interval)?;
    config.backlog_interval =
        positive_ms(&lookup, BACKLOG_INTERVAL_MS_VAR, config.backlog_interval)?;
    if let Some(group) = lookup(GROUP_VAR).filter(|g| !g.trim().is_empty()) {
        config.task_group = group.trim().to_owned();
    }
    if let Some(queues) = lookup(TASK_QUEUES_VAR) {
        for queue in queues.split(',').map(str::trim).filter(|q| !q.is_empty()) {
            crate::validate_name("task queue", queue)
                .map_err(|e| Error::config(TASK_QUEUES_VAR, e.message().to_owned()))?;
            config.task_queues.push(queue.to_owned());
        }
    }
    let task_backend = backends::resolve(&task_name, task_var)?;
    let event_backend = backends::resolve(&event_name, event_var)?;
    // Every setting is read, and every malformed one reported, before anything connects.
    let task_config = Configured::read(task_backend, &lookup, None)?;
    let event_config = if event_name == task_name {
        None
    } else {
        Some(Configured::read(event_backend, &lookup, None)?)
    };
    let spools = if fallback {
        Some(spools(&lookup).await?)
    } else {
        None
    };
    // With the spool on, a hub starts while its brokers are away (a restart during an
    // outage) and spools until they are reachable; without it, an unreachable broker is an
    // error now.
    let connect = |config: Configured, name: &'static str| async move {
        if fallback {
            config.connect_in_background(name).await
        } else {
            config.connect().await
        }
    };
    let tasks: Arc<dyn Broker> = connect(task_config, task_backend.name).await?;
    let events = match event_config {
        Some(config) => connect(config, event_backend.name).await?,
        None => tasks.clone(),
    };
    Hub::new(config, tasks, events, spools).await
}

#[cfg(feature = "sqlite")]
async fn spools(
    lookup: &impl Fn(&str) -> Option<String>,
) -> Result<(
    Arc<dyn helix_messaging_core::fallback::Spool>,
    Arc<dyn helix_messaging_core::fallback::Spool>,
)> {
    use helix_messaging_core::fallback::SpoolLimits;
    use helix_messaging_store::SqliteSpool;
    let dir =
        std::path::PathBuf::from(lookup(FALLBACK_DIR_VAR).unwrap_or_else(|| "helix-spool".into()));
    std::fs::create_dir_all(&dir).map_err(|e| {
        Error::config(
            FALLBACK_DIR_VAR,
            format!("cannot create {}: {e}", dir.display()),
        )
    })?;
    let defaults = SpoolLimits::default();
    let limits = SpoolLimits {
        max_messages: positive(lookup, FALLBACK_MAX_MESSAGES_VAR, defaults.max_messages)?,
        max_bytes: positive(lookup, FALLBACK_MAX_BYTES_VAR, defaults.max_bytes)?,
    };
    let tasks = SqliteSpool::open(dir.join("tasks.sqlite"), limits).await?;
    let events = SqliteSpool::open(dir.join("events.sqlite"), limits).await?;
    Ok((Arc::new(tasks), Arc::new(events)))
}

/// A positive whole number from `var`, or `default` when it is unset or empty.
fn positive(lookup: &impl Fn(&str) -> Option<String>, var: &str, default: u64) -> Result<u64> {
    match lookup(var).map(|v| v.trim().replace('_', "")) {
        None => Ok(default),
        Some(v) if v.is_empty() => Ok(default),
        Some(v) => v.parse::<u64>().ok().filter(|n| *n > 0).ok_or_else(|| {
            Error::config(var, format!("expected a positive whole number, got {v:?}"))
        }),
    }
}

/// A positive number of milliseconds from `var`, or `default` when it is unset or empty.
fn positive_ms(
    lookup: &impl Fn(&str) -> Option<String>,
    var: &str,
    default: std::time::Duration,
) -> Result<std::time::Duration> {
    let default = u64::try_from(default.as_millis()).unwrap_or(u64::MAX);
    positive(lookup, var, default).map(std::time::Duration::from_millis)
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
