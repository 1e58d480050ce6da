//! A panic inside a background job (a bulk redrive, a replay) never leaves it `running`: the
//! job ends `failed`, with the panic's message in its last error.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use helix_messaging_core::dlq::{
    DEFAULT_DLQ_TOPIC, DeadLetter, HEADER_ORIGINAL_TOPIC, MemoryDeadLetterStore, Processor,
    ProcessorConfig, RedriveRequest, RedriveStatus,
};
use helix_messaging_core::replay::{ReplayConfig, ReplayHandler, ReplayRequest, ReplayStatus};
use helix_messaging_core::{BatchReport, Broker, Message, Publisher, Result, async_trait};
use helix_messaging_memory::MemoryBroker;

mod common;

const BOOM: &str = "the publish path exploded";

/// The memory broker, except that publishing panics.
#[derive(Debug)]
struct PanicsOnPublish(MemoryBroker);

#[async_trait]
impl Publisher for PanicsOnPublish {
    async fn publish(&self, _: &str, _: Message) -> Result<()> {
        panic!("{BOOM}");
    }

    async fn publish_batch(&self, _: &str, _: Vec<Message>) -> BatchReport {
        panic!("{BOOM}");
    }
}

common::memory_underneath!(PanicsOnPublish);

#[tokio::test]
async fn a_redrive_that_panics_ends_failed_with_the_panics_message() {
    let broker: Arc<dyn Broker> = Arc::new(PanicsOnPublish(MemoryBroker::new()));
    let config = ProcessorConfig {
        auto_redrive: false,
        ..ProcessorConfig::default()
    };
    let store = Arc::new(MemoryDeadLetterStore::new());
    let processor = Processor::new(broker, store, config).unwrap();
    let failed = Message::new("order 7").with_header(HEADER_ORIGINAL_TOPIC, "orders");
    processor
        .ingest(DeadLetter::from_message(&failed, DEFAULT_DLQ_TOPIC))
        .await
        .unwrap();
    let job = processor
        .start_redrive(RedriveRequest::default())
        .await
        .unwrap();
    let progress = common::redrive_finished(&processor, &job.id, Duration::from_secs(10)).await;
    assert_eq!(progress.status, RedriveStatus::Failed, "{progress:?}");
    let error = progress.last_error.unwrap_or_default();
    assert!(error.contains(BOOM), "{error}");
}

#[tokio::test]
async fn a_replay_that_panics_ends_failed_with_the_panics_message() {
    let memory = MemoryBroker::new();
    let from = SystemTime::now() - Duration::from_secs(60);
    memory.publish("audit", Message::new("m0")).await.unwrap();
    let broker: Arc<dyn Broker> = Arc::new(PanicsOnPublish(memory));
    let handler = ReplayHandler::new(broker, ReplayConfig::default());
    let request =
        ReplayRequest::new("audit", from, SystemTime::now()).with_target_topic("audit.replayed");
    let started = handler.start_replay(request).await.unwrap();
    let done = tokio::time::timeout(Duration::from_secs(10), handler.wait(&started.id))
        .await
        .expect("the replay ended, not left running")
        .unwrap();
    assert_eq!(done.status, ReplayStatus::Failed, "{done:?}");
    let error = done.last_error.unwrap_or_default();
    assert!(error.contains(BOOM), "{error}");
}
