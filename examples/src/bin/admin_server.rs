//! The admin API as a service of its own, the process to run beside the application: a hub
//! from the environment, a DLQ processor over its dead-letter topics (on both brokers when
//! tasks and events are on different ones) with a durable SQLite store, a replay handler checkpointing in the same file, and Prometheus metrics, served
//! until Ctrl-C or SIGTERM.
//!
//! ```text
//! export MESSAGING_ADMIN_TOKEN=$(openssl rand -hex 16)
//! cargo run -p helix-messaging-examples --features admin --bin admin_server
//! curl http://127.0.0.1:7061/health
//! curl -H "Authorization: Bearer $MESSAGING_ADMIN_TOKEN" http://127.0.0.1:7061/v1/messaging/health
//! ```
//!
//! The hub's backends come from `MESSAGING_TASK_BACKEND` / `MESSAGING_EVENT_BACKEND` (memory
//! by default), the listener from `MESSAGING_ADMIN_ADDR` (default `127.0.0.1:7061`), the
//! store from `HELIX_DLQ_STORE` (default `helix-dlq.sqlite3` in the working directory).
//! Once listening it prints `listening on <addr>` on stdout.
//!
//! # Stopping
//!
//! SIGTERM (what systemd, Kubernetes and `docker stop` send) and Ctrl-C (SIGINT) stop it the
//! same way: it prints `shutting down on <signal>`, stops accepting connections and gives
//! the requests under way the admin API's grace period
//! ([`SHUTDOWN_GRACE`](helix_messaging::admin::SHUTDOWN_GRACE)) to finish, then stops the
//! DLQ processor (its ingesters finish the letters they hold), the replays and the hub,
//! all within [`SHUTDOWN_TIMEOUT`]. It prints `stopped` and exits 0 when all of that went
//! through, 1 otherwise. Give the supervisor a stop timeout longer than the two together
//! (`terminationGracePeriodSeconds`, `TimeoutStopSec`, `docker stop -t`) so it is not
//! killed half-way.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use helix_messaging::admin::{AdminConfig, Services, install_prometheus};
use helix_messaging::dlq::{DeadLetterSource, Processor, ProcessorConfig, SqliteDeadLetterStore};
use helix_messaging::replay::{ReplayConfig, ReplayHandler};
use helix_messaging::{Error, ErrorKind, Result};

#[tokio::main]
async fn main() -> ExitCode {
    helix_messaging_examples::run_main("info", run()).await
}

/// How long stopping the processor, the replays and the hub may take once the admin API
/// has drained; past it the process exits 1 rather than hang under its supervisor.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(40);

/// A future completing on the first Ctrl-C (SIGINT) or SIGTERM, naming it.
fn stop_signal() -> Result<impl Future<Output = &'static str> + Send + 'static> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        // Both installed now, before the server says it listens, so a signal sent once it
        // does is ours to handle rather than the default action (death by signal);
        // `tokio::signal::ctrl_c` would install its handler only when first polled.
        let installed = |kind: SignalKind, name: &str| {
            signal(kind).map_err(|err| {
                Error::new(ErrorKind::Config, format!("cannot handle {name}: {err}"))
            })
        };
        let mut term = installed(SignalKind::terminate(), "SIGTERM")?;
        let mut int = installed(SignalKind::interrupt(), "SIGINT")?;
        Ok(async move {
            tokio::select! {
                _ = int.recv() => "SIGINT",
                _ = term.recv() => "SIGTERM",
            }
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            let _ = tokio::signal::ctrl_c().await;
            "Ctrl-C"
        })
    }
}

fn admin_error(err: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::Config, err.to_string())
}

async fn run() -> Result<()> {
    // Configuration first: a bad variable is reported before anything connects.
    let config = AdminConfig::from_env().map_err(admin_error)?;
    let store_path =
        std::env::var("HELIX_DLQ_STORE").unwrap_or_else(|_| "helix-dlq.sqlite3".into());
    let prometheus = install_prometheus().map_err(admin_error)?;
    let hub = helix_messaging::hub_from_env().await?;

    let store = SqliteDeadLetterStore::open(&store_path).await?;
    let replay_store = Arc::new(store.replay_store().await?);
    // Each side dead-letters on its own broker: with events elsewhere, their dead letters
    // are read there too and re-driven back there.
    let dlq_topics = hub.config().dead_letters.topics();
    let sources = if hub.shares_one_broker() {
        Vec::new()
    } else {
        vec![DeadLetterSource::new(
            "events",
            hub.event_broker().clone(),
            dlq_topics.clone(),
        )?]
    };
    let processor = Processor::with_sources(
        hub.task_broker().clone(),
        Arc::new(store),
        ProcessorConfig {
            topics: dlq_topics,
            ..ProcessorConfig::default()
        },
        sources,
    )?;
    processor.start().await?;
    let replays = ReplayHandler::open(
        hub.event_broker().clone(),
        ReplayConfig::default(),
        replay_store,
    )
    .await?;

    let addr = config.addr;
    let services = Services::new(hub.clone())
        .with_prometheus(prometheus)
        .with_dlq(processor.clone())
        .with_replay(replays.clone());
    let stop = stop_signal()?;
    // Bound before it says it listens, so a client that reads the line can connect; an
    // address it must not expose is refused before it is bound.
    helix_messaging::admin::check_exposure(&config).map_err(admin_error)?;
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|err| {
        Error::new(
            ErrorKind::Connection,
            format!("admin API: cannot listen on {addr}: {err}"),
        )
    })?;
    let server = tokio::spawn(helix_messaging::admin::serve_listener(
        listener,
        config,
        services,
        async {
            let signal = stop.await;
            println!("shutting down on {signal}");
        },
    ));
    println!("listening on {addr}");
    // The admin API drains first (its own grace), so no request reaches a stopped processor.
    let served = server
        .await
        .map_err(|err| Error::new(ErrorKind::Backend, format!("admin server task: {err}")))?;
    tokio::time::timeout(SHUTDOWN_TIMEOUT, async {
        processor.stop().await;
        replays.shutdown(Duration::from_secs(10)).await?;
        hub.close().await
    })
    .await
    .map_err(|_| {
        Error::new(
            ErrorKind::Timeout,
            format!("the processor, replays and hub did not stop within {SHUTDOWN_TIMEOUT:?}"),
        )
    })??;
    served.map_err(admin_error)?;
    println!("stopped");
    Ok(())
}
