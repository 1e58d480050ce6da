//! The memory broker runs the whole conformance suite; it declares every capability, so no
//! case may be skipped.

use std::sync::Arc;

use helix_messaging_core::Broker;
use helix_messaging_memory::MemoryBroker;
use helix_messaging_testkit::Conformance;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_broker_passes_the_conformance_suite() {
    Conformance::new("memory", || async {
        Ok(Arc::new(MemoryBroker::new()) as Arc<dyn Broker>)
    })
    .parallelism(8)
    .run()
    .await
    .assert_passed();
}
