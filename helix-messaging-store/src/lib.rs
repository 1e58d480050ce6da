//! Durable stores for helix-messaging: the stores the reliability plane keeps its state in,
//! on SQLite (feature `sqlite`, the default: an embedded file, WAL, `synchronous = FULL`) and
//! on PostgreSQL (feature `postgres`: a pooled connection, shared by several instances).
//!
//! | trait (in `helix-messaging-core`) | SQLite | PostgreSQL |
//! |---|---|---|
//! | [`DeadLetterStore`](helix_messaging_core::dlq::DeadLetterStore) | `SqliteDeadLetterStore` | `PostgresDeadLetterStore` |
//! | [`ReplayStore`](helix_messaging_core::replay::ReplayStore) | `SqliteReplayStore` (or the DLQ's file, `SqliteDeadLetterStore::replay_store`) | `PostgresReplayStore` (or the DLQ's database) |
//! | [`Spool`](helix_messaging_core::fallback::Spool) | `SqliteSpool` | — |
//!
//! The in-memory implementations stay in the core, which has no SQL in it. Applications name
//! these through the `helix-messaging` facade (`helix_messaging::dlq::SqliteDeadLetterStore`
//! and so on), behind the same features.
//!
//! How the crate stacks: `connection` (opening a file or a pool, and the schema migrations
//! with a recorded version per table) and `sql` (how every store writes filters and times)
//! at the bottom; the replay stores on them; the DLQ stores, which can hand out a replay
//! store on their own connection, above those; the spool beside them.
//!
//! ```
//! # #[cfg(feature = "sqlite")]
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use helix_messaging_core::dlq::DeadLetterStore;
//! use helix_messaging_store::SqliteDeadLetterStore;
//!
//! let dir = std::env::temp_dir().join(format!("helix-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir).unwrap();
//! let store = SqliteDeadLetterStore::open(dir.join("dlq.sqlite")).await.unwrap();
//! assert_eq!(store.stats().await.unwrap().depth, 0);
//! let replays = store.replay_store().await.unwrap(); // the same file
//! # drop((store, replays));
//! # std::fs::remove_dir_all(&dir).unwrap();
//! # });
//! ```

#[cfg(any(feature = "sqlite", feature = "postgres"))]
mod connection;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
mod dlq;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
mod replay;
#[cfg(feature = "sqlite")]
mod spool;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
mod sql;

#[cfg(feature = "postgres")]
pub use dlq::postgres::PostgresDeadLetterStore;
#[cfg(feature = "sqlite")]
pub use dlq::sqlite::SqliteDeadLetterStore;
#[cfg(feature = "postgres")]
pub use replay::postgres::PostgresReplayStore;
#[cfg(feature = "sqlite")]
pub use replay::sqlite::SqliteReplayStore;
#[cfg(feature = "sqlite")]
pub use spool::sqlite::SqliteSpool;
