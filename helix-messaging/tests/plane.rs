//! The reliability plane under seeded faults with the durable spool: the fallback spool's
//! promise on the memory backend, spooling to a fresh `SqliteSpool` file every run
//! (`HELIX_PLANE_SEEDS=n` runs seeds 1..=n, default 20; `HELIX_PLANE_SEED=s` one seed).
#![cfg(feature = "sqlite")]

use std::sync::Arc;

use helix_messaging::fallback::{Spool, SpoolLimits, SqliteSpool};
use helix_messaging_testkit::plane::SpoolHarness;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sqlite_spool_keeps_every_acknowledged_publish_under_faults() {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    SpoolHarness::new("memory, SQLite spool", || async {
        helix_messaging::connect("memory://").await
    })
    .spooling_to(move || {
        let path = dir
            .path()
            .join(format!("{}.sqlite", uuid::Uuid::new_v4().simple()));
        async move {
            Ok(Arc::new(SqliteSpool::open(path, SpoolLimits::default()).await?) as Arc<dyn Spool>)
        }
    })
    .run()
    .await
    .assert_holds();
}
