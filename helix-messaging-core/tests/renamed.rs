//! The names renamed in 0.2 still compile and mean what they meant (deprecated, so code written
//! against 0.1 builds with warnings rather than errors).
#![allow(deprecated)]

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use helix_messaging_core::dlq::{
    DeadLetter, DeadLetterConfig, DeadLetterFilter, DeadLetterPage, DeadLetterStats, DlqFilter,
    DlqHandler, DlqPage, DlqStats, MemoryDeadLetterStore, Processor, ProcessorConfig,
};
use helix_messaging_core::{
    BoxError, Broker, Message, Publisher, SubscribeOptions, Subscriber, async_trait,
};
use helix_messaging_memory::MemoryBroker;

struct ByHand;

#[async_trait]
impl DlqHandler for ByHand {
    async fn handle(&self, _letter: DeadLetter) -> Result<(), BoxError> {
        Ok(())
    }
}

#[test]
fn the_old_dlq_names_are_the_new_types() {
    let filter: DlqFilter = DeadLetterFilter::default();
    assert_eq!(filter, DlqFilter::default());
    let _: Option<DlqStats> = None::<DeadLetterStats>;
    let _: Option<DlqPage> = None::<DeadLetterPage>;
    assert_eq!(
        DeadLetterConfig::seeds().topics(),
        DeadLetterConfig::helixagent().topics()
    );
    let broker: Arc<dyn Broker> = Arc::new(MemoryBroker::new());
    let processor = Processor::new(
        broker,
        Arc::new(MemoryDeadLetterStore::new()),
        ProcessorConfig::default(),
    )
    .unwrap();
    processor.register_handler("t", ByHand);
}

#[tokio::test]
async fn the_old_settlement_names_requeue_after_a_delay() {
    let broker = MemoryBroker::new();
    let mut sub = broker
        .subscribe("orders", SubscribeOptions::group("g"))
        .await
        .unwrap();
    broker.publish("orders", Message::new("one")).await.unwrap();
    let first = next(&mut sub).await;
    assert_eq!(first.can_delay(), first.delays_requeue());
    assert!(first.can_delay(), "the memory broker delays requeues");
    first.nack_after(Duration::from_millis(10)).await.unwrap();
    let again = next(&mut sub).await;
    assert_eq!(again.attempt(), 2);
    again.ack().await.unwrap();
}

async fn next(sub: &mut helix_messaging_core::Subscription) -> helix_messaging_core::Delivery {
    tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .expect("delivered in time")
        .expect("open")
        .unwrap()
}
