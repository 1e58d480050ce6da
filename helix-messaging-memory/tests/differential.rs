//! The memory broker against itself: the differential mode's own check (a program always
//! ends, and the same program observes the same thing twice).

use std::sync::Arc;

use helix_messaging_core::Broker;
use helix_messaging_memory::MemoryBroker;
use helix_messaging_testkit::Differential;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_agrees_with_itself() {
    Differential::new("memory", || async {
        Ok(Arc::new(MemoryBroker::new()) as Arc<dyn Broker>)
    })
    .run()
    .await
    .assert_agrees();
}
