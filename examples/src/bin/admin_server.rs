//! The admin API as a service of its own: a hub from the environment, a DLQ processor over
//! its dead-letter topics with a durable SQLite store, a replay handler checkpointing in
//! the same file, and Prometheus metrics, served until Ctrl-C.
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

use std::process::ExitCode;
use std::sync::Arc;

use helix_messaging::admin::{AdminConfig, Services, install_prometheus};
use helix_messaging::dlq::{Processor, ProcessorConfig, SqliteDeadLetterStore};
use helix_messaging::hub::HubConfig;
use helix_messaging::replay::{ReplayConfig, ReplayHandler};
use helix_messaging::{Error, ErrorKind, Result};

#[tokio::main]
async fn main() -> ExitCode {
    helix_messaging_examples::run_main("info", run()).await
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
    let processor = Processor::new(
        hub.task_broker().clone(),
        Arc::new(store),
        ProcessorConfig {
            topics: HubConfig::default().dead_letters.topics(),
            ..ProcessorConfig::default()
        },
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
    let server = tokio::spawn(helix_messaging::admin::serve(config, services, async {
        let _ = tokio::signal::ctrl_c().await;
    }));
    println!("listening on {addr}");
    let served = server
        .await
        .map_err(|err| Error::new(ErrorKind::Backend, format!("admin server task: {err}")))?;
    processor.stop().await;
    replays.shutdown(std::time::Duration::from_secs(10)).await?;
    hub.close().await?;
    served.map_err(admin_error)
}
