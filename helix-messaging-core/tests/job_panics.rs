//! A panic inside a background job (a bulk redrive, a replay) never leaves it `running`: the
//! job ends `failed`, with the panic's message in its last error.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use helix_messaging_core::dlq::{
    DEFAULT_DLQ_TOPIC, DeadLetter, HEADER_ORIGINAL_TOPIC, MemoryDeadLetterStore, Processor,
    ProcessorConfig, RedriveRequest, RedriveStatus,
};
use helix_messaging_core::replay::{ReplayConfig, ReplayHandler, ReplayRequest, ReplayStatus};
use helix_messaging_core::{
    BatchReport, Broker, Capabilities, Health, HistoryStream, Message, Publisher, Result,
    SubscribeOptions, Subscriber, Subscription, TimeRange, async_trait,
};
use helix_messaging_memory::MemoryBroker;

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

#[async_trait]
impl Subscriber for PanicsOnPublish {
    async fn subscribe(&self, topic: &str, options: SubscribeOptions) -> Result<Subscription> {
        self.0.subscribe(topic, options).await
    }
}

#[async_trait]
impl Broker for PanicsOnPublish {
    fn name(&self) -> &'static str {
        self.0.name()
    }

    fn capabilities(&self) -> Capabilities {
        self.0.capabilities()
    }

    async fn health(&self) -> Health {
        self.0.health().await
    }

    async fn read_range(&self, topic: &str, range: TimeRange) -> Result<HistoryStream> {
        self.0.read_range(topic, range).await
    }

    async fn close(&self) -> Result<()> {
        self.0.close().await
    }
}

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
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let progress = loop {
        let progress = processor.redrive_progress(&job.id).unwrap();
        if progress.status.is_finished() {
            break progress;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still {:?} 10 s later",
            progress.status
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
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
