//! Replay checkpoints in the DLQ's SQLite file survive a killed process: the resumed replay
//! publishes nothing twice.
#![cfg(feature = "sqlite")]

use std::sync::Arc;

use futures::FutureExt;
use helix_messaging_core::replay::{MemoryReplayStore, ReplayStore};
use helix_messaging_store::{SqliteDeadLetterStore, SqliteReplayStore};
use helix_messaging_testkit::stores::{
    OpenStore, a_killed_replay_resumes_without_publishing_twice,
    check_finished_replays_are_pruned_oldest_first, replay_store_round_trips,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_killed_mid_run_resumes_from_the_dlq_sqlite_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("helix.db");
    let open: OpenStore = Arc::new(move || {
        let path = path.clone();
        async move {
            // The DLQ's file, opened afresh each time as a new process would.
            let dlq = SqliteDeadLetterStore::open(&path).await.unwrap();
            Arc::new(dlq.replay_store().await.unwrap()) as Arc<dyn ReplayStore>
        }
        .boxed()
    });
    a_killed_replay_resumes_without_publishing_twice(open).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sqlite_replay_store_round_trips_records() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteReplayStore::open(dir.path().join("replays.db"))
        .await
        .unwrap();
    replay_store_round_trips(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_replay_store_round_trips_records() {
    replay_store_round_trips(&MemoryReplayStore::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_replays_are_pruned_oldest_first_in_sqlite_and_memory() {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = SqliteReplayStore::open(dir.path().join("replays.db"))
        .await
        .unwrap();
    check_finished_replays_are_pruned_oldest_first(&sqlite).await;
    check_finished_replays_are_pruned_oldest_first(&MemoryReplayStore::new()).await;
}
