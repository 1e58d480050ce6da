//! Background jobs against a broker whose publishes are slow.
//!
//! - A replay reads its next batch, and makes its copies, while the previous batch is being
//!   published: a copy made ahead still carries the time it is published, which a resumed
//!   replay relies on to find it (Kafka reads a time range by the records' own timestamps).
//! - An unpaced redrive claims several batches at once: each batch still has the whole
//!   `processing_timeout`, as a batch claimed on its own would.
//! - An unpaced redrive cancelled between two groups leaves nothing held: what it claimed
//!   ahead and did not publish can be re-driven at once.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use helix_messaging_core::dlq::{
    DEFAULT_DLQ_TOPIC, DeadLetter, DeadLetterFilter, HEADER_ORIGINAL_TOPIC, MemoryDeadLetterStore,
    Processor, ProcessorConfig, RedriveProgress, RedriveRequest, RedriveStatus,
};
use helix_messaging_core::replay::{
    ReplayConfig, ReplayHandler, ReplayOptions, ReplayRequest, ReplayStatus,
};
use helix_messaging_core::{
    BatchReport, Broker, Message, Publisher, Result, TimeRange, async_trait,
};
use helix_messaging_memory::MemoryBroker;

mod common;

/// How long each publish takes: long enough for the replay to read ahead meanwhile.
const PUBLISH_TAKES: Duration = Duration::from_millis(20);
/// The pause between batches: longer than any copy may wait between being made and sent.
const BETWEEN_BATCHES: Duration = Duration::from_millis(400);

/// The memory broker, except that a publish takes [`PUBLISH_TAKES`] before it is made.
#[derive(Debug)]
struct SlowPublish(MemoryBroker);

#[async_trait]
impl Publisher for SlowPublish {
    async fn publish(&self, topic: &str, message: Message) -> Result<()> {
        tokio::time::sleep(PUBLISH_TAKES).await;
        self.0.publish(topic, message).await
    }

    async fn publish_batch(&self, topic: &str, messages: Vec<Message>) -> BatchReport {
        tokio::time::sleep(PUBLISH_TAKES).await;
        self.0.publish_batch(topic, messages).await
    }
}

common::memory_underneath!(SlowPublish);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_made_ahead_carry_the_time_they_are_published() {
    const WINDOW: usize = 300;
    let memory = MemoryBroker::new();
    let from = SystemTime::now() - Duration::from_secs(60);
    for i in 0..WINDOW {
        memory
            .publish("audit", Message::new(format!("m{i}")))
            .await
            .unwrap();
    }
    let to = SystemTime::now() + Duration::from_millis(1);
    let broker: Arc<dyn Broker> = Arc::new(SlowPublish(memory));
    let handler = ReplayHandler::new(broker.clone(), ReplayConfig::default());
    let request = ReplayRequest::new("audit", from, to)
        .with_target_topic("audit.replayed")
        .with_options(ReplayOptions {
            batch_size: 100,
            delay_between: BETWEEN_BATCHES,
            ..ReplayOptions::default()
        });
    let id = handler.start_replay(request).await.unwrap().id;
    let done = tokio::time::timeout(Duration::from_secs(30), handler.wait(&id))
        .await
        .expect("the replay finished within 30 s")
        .unwrap();
    assert_eq!(done.status, ReplayStatus::Completed, "{done:?}");
    assert_eq!(done.replayed as usize, WINDOW, "{done:?}");

    let range = TimeRange::new(from, SystemTime::now() + Duration::from_secs(5)).unwrap();
    let mut copies = broker.read_range("audit.replayed", range).await.unwrap();
    let mut seen = 0;
    while let Some(entry) = copies.next().await {
        let entry = entry.unwrap();
        let waited = entry
            .recorded_at
            .duration_since(entry.message.timestamp())
            .unwrap_or_default();
        assert!(
            waited < BETWEEN_BATCHES / 2,
            "copy {} was stamped {waited:?} before the broker took it",
            entry.message.id()
        );
        seen += 1;
    }
    assert_eq!(seen, WINDOW);
}

/// A processor on the slow broker holding `letters` dead letters of `orders`, and the
/// unpaced redrive of them it has started.
async fn unpaced_redrive(
    letters: usize,
    processing_timeout: Duration,
) -> (Processor, RedriveProgress) {
    let broker: Arc<dyn Broker> = Arc::new(SlowPublish(MemoryBroker::new()));
    let config = ProcessorConfig {
        auto_redrive: false,
        processing_timeout,
        ..ProcessorConfig::default()
    };
    let processor = Processor::new(broker, Arc::new(MemoryDeadLetterStore::new()), config).unwrap();
    for i in 0..letters {
        let failed =
            Message::new(format!("order {i}")).with_header(HEADER_ORIGINAL_TOPIC, "orders");
        processor
            .ingest(DeadLetter::from_message(&failed, DEFAULT_DLQ_TOPIC))
            .await
            .unwrap();
    }
    let job = processor
        .start_redrive(RedriveRequest {
            rate_per_second: None,
            ..RedriveRequest::default()
        })
        .await
        .unwrap();
    (processor, job)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_batch_of_a_grouped_redrive_has_the_whole_processing_timeout() {
    // Five batches of 100 in one claimed group: together they take five publishes, longer
    // than one timeout, each well within it.
    const LETTERS: usize = 500;
    let timeout = PUBLISH_TAKES * 3;
    let (processor, job) = unpaced_redrive(LETTERS, timeout).await;
    let progress = common::redrive_finished(&processor, &job.id, Duration::from_secs(30)).await;
    assert_eq!(progress.status, RedriveStatus::Completed, "{progress:?}");
    assert_eq!(
        (progress.redriven, progress.failed, progress.skipped),
        (LETTERS as u64, 0, 0),
        "{progress:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unpaced_redrive_cancelled_midway_holds_nothing_it_did_not_publish() {
    // Three claimed groups of 1,000, each ten slow batches: the cancel lands while the
    // first is being published.
    const LETTERS: usize = 3_000;
    let (processor, job) =
        unpaced_redrive(LETTERS, ProcessorConfig::default().processing_timeout).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while processor.redrive_progress(&job.id).unwrap().redriven == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "nothing re-driven in 10 s"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    processor.cancel_redrive(&job.id).unwrap();
    let progress = common::redrive_finished(&processor, &job.id, Duration::from_secs(30)).await;
    assert_eq!(progress.status, RedriveStatus::Cancelled, "{progress:?}");
    assert!(
        progress.redriven > 0 && (progress.redriven as usize) < LETTERS,
        "{progress:?}"
    );
    let left = processor
        .store()
        .list(&DeadLetterFilter::default(), usize::MAX, 0)
        .await
        .unwrap();
    assert_eq!(
        left.len() + progress.redriven as usize,
        LETTERS,
        "{progress:?}"
    );
    let now = SystemTime::now();
    let held = left.iter().filter(|entry| !entry.claimable(now)).count();
    assert_eq!(
        held, 0,
        "entries still held after the job ended: {progress:?}"
    );
}
