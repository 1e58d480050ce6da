//! Tasks and events on different brokers: the processor ingests the dead letters of both,
//! and re-drives each to the broker it came from.

use std::sync::Arc;

use futures::{FutureExt, StreamExt};
use helix_messaging::dlq::{
    DeadLetter, DeadLetterFilter, DeadLetterSource, HEADER_ORIGINAL_TOPIC, HEADER_SOURCE,
    MemoryDeadLetterStore, Processor, ProcessorConfig, RedriveRequest, RedriveStatus,
    StoredDeadLetter,
};
use helix_messaging::hub::{Event, Hub, HubConfig};
use helix_messaging::retry::RetryPolicy;
use helix_messaging::{Broker, ErrorKind, HandlerError, Message, SubscribeOptions, Subscription};

use crate::common;
use crate::support::{broker, eventually, name, recv};

/// A hub with its tasks and events on two brokers, a processor over both, and one event
/// dead-lettered (on the event broker) and ingested.
struct TwoBrokers {
    tasks: Arc<dyn Broker>,
    events: Arc<dyn Broker>,
    hub: Hub,
    processor: Processor,
    topic: String,
    entry: StoredDeadLetter,
}

impl TwoBrokers {
    async fn with_an_event_dead_letter() -> TwoBrokers {
        let (tasks, events) = (broker().await, broker().await);
        let config = HubConfig {
            retry: RetryPolicy::new().with_max_retries(0),
            ..HubConfig::default()
        };
        let dlq_topics = config.dead_letters.topics();
        let hub = Hub::new(config, tasks.clone(), events.clone(), None)
            .await
            .unwrap();
        let processor = Processor::with_sources(
            tasks.clone(),
            Arc::new(MemoryDeadLetterStore::new()),
            ProcessorConfig {
                topics: dlq_topics.clone(),
                auto_redrive: false,
                ..ProcessorConfig::default()
            },
            vec![DeadLetterSource::new("events", events.clone(), dlq_topics).unwrap()],
        )
        .unwrap();
        // Started first: the embedded broker keeps nothing for a group not yet created.
        processor.start().await.unwrap();

        let topic = name("orders-events");
        let consumer = hub
            .subscribe_events(
                &topic,
                |_event: Event, _envelope| async { Err(HandlerError::permanent("broken")) },
                "projections",
            )
            .await
            .unwrap();
        let event = Event::new("order.created", "shop", serde_json::json!({ "n": 1 }));
        hub.publish_event(&topic, &event).await.unwrap();
        let entry = eventually("the event's dead letter is listed", || {
            let processor = processor.clone();
            async move {
                let page = processor
                    .list(&DeadLetterFilter::default(), 10, 0)
                    .await
                    .unwrap();
                page.entries.into_iter().next()
            }
        })
        .await;
        consumer.shutdown().await;
        TwoBrokers {
            tasks,
            events,
            hub,
            processor,
            topic,
            entry,
        }
    }

    /// Subscriptions to the original topic on the event broker and on the task broker.
    async fn watch_both(&self) -> (Subscription, Subscription) {
        let options = SubscribeOptions::default;
        (
            self.events.subscribe(&self.topic, options()).await.unwrap(),
            self.tasks.subscribe(&self.topic, options()).await.unwrap(),
        )
    }

    async fn close(self) {
        self.processor.stop().await;
        self.hub.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_dead_letter_on_the_event_broker_is_listed_and_reprocessed_there() {
    let setup = TwoBrokers::with_an_event_dead_letter().await;
    assert_eq!(setup.entry.letter.original_topic, setup.topic);
    assert_eq!(setup.entry.letter.source(), Some("events"));

    let (mut on_events, mut on_tasks) = setup.watch_both().await;
    let processor = &setup.processor;
    processor
        .reprocess(&setup.entry.letter.id, None)
        .await
        .unwrap();
    let again = recv(&mut on_events).await;
    assert_eq!(again.message().id(), setup.entry.letter.message.id());
    assert_eq!(
        again.message().header(HEADER_SOURCE),
        None,
        "where the processor found it is not part of the message"
    );
    // One publish per reprocess: the copy that reached the event broker is the only one.
    assert!(
        on_tasks.next().now_or_never().is_none(),
        "nothing is re-driven onto the task broker"
    );
    assert_eq!(processor.stats().await.unwrap().depth, 0);
    setup.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_redrive_sends_an_event_dead_letter_to_the_event_broker() {
    let setup = TwoBrokers::with_an_event_dead_letter().await;
    let (mut on_events, mut on_tasks) = setup.watch_both().await;
    let job = setup
        .processor
        .start_redrive(RedriveRequest::default())
        .await
        .unwrap();
    let progress = common::redrive_finished(&setup.processor, &job.id).await;
    assert_eq!(progress.status, RedriveStatus::Completed);
    assert_eq!((progress.redriven, progress.failed), (1, 0));
    let again = recv(&mut on_events).await;
    assert_eq!(again.message().id(), setup.entry.letter.message.id());
    assert!(
        on_tasks.next().now_or_never().is_none(),
        "nothing is re-driven onto the task broker"
    );
    setup.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_from_a_source_the_processor_lacks_is_not_redriven_elsewhere() {
    let broker = broker().await;
    let processor = Processor::new(
        broker.clone(),
        Arc::new(MemoryDeadLetterStore::new()),
        ProcessorConfig {
            auto_redrive: false,
            ..ProcessorConfig::default()
        },
    )
    .unwrap();
    let topic = name("orders");
    let failed = Message::new("order 7").with_header(HEADER_ORIGINAL_TOPIC, topic.as_str());
    let mut letter = DeadLetter::from_message(&failed, "helixagent.dlq");
    letter.message = letter.message.with_header(HEADER_SOURCE, "events");
    processor.ingest(letter.clone()).await.unwrap();
    let mut sub = broker
        .subscribe(&topic, SubscribeOptions::default())
        .await
        .unwrap();
    let err = processor.reprocess(&letter.id, None).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    assert!(err.to_string().contains("events"), "{err}");
    assert!(sub.next().now_or_never().is_none(), "nothing was published");
    assert_eq!(
        processor.stats().await.unwrap().depth,
        1,
        "the letter stays in the DLQ"
    );
}

#[test]
fn sources_are_named_once() {
    let broker: Arc<dyn Broker> = Arc::new(helix_messaging::memory::MemoryBroker::new());
    let source = || DeadLetterSource::new("events", broker.clone(), vec!["dlq".into()]).unwrap();
    let err = Processor::with_sources(
        broker.clone(),
        Arc::new(MemoryDeadLetterStore::new()),
        ProcessorConfig::default(),
        vec![source(), source()],
    )
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
    assert!(DeadLetterSource::new("events", broker, Vec::new()).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_says_whether_its_sides_share_a_broker() {
    let (one, other) = (broker().await, broker().await);
    let shared = Hub::new(HubConfig::default(), one.clone(), one.clone(), None)
        .await
        .unwrap();
    assert!(shared.shares_one_broker());
    let apart = Hub::new(HubConfig::default(), one, other, None)
        .await
        .unwrap();
    assert!(!apart.shares_one_broker());
    // Both sides on the default backend: one connection.
    let from_vars = helix_messaging::hub_from_vars(|_| None).await.unwrap();
    assert!(from_vars.shares_one_broker());
    for hub in [shared, apart, from_vars] {
        hub.close().await.unwrap();
    }
}
