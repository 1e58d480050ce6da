//! The DLQ processor: a reopened store's entries reprocessed, discarded and purged, automatic
//! re-drive with backoff and parking, the ingester's backoff, per-type handlers, and letters
//! sent before it first ran.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use helix_messaging::dlq::{
    DeadLetter, DeadLetterConfig, DeadLetterFilter, DeadLetterQueue, DeadLetterReason,
    DeadLetterStore, EntryStatus, Processor, ProcessorConfig, SqliteDeadLetterStore,
};
use helix_messaging::{Message, SubscribeOptions};

use crate::support::{broker, eventually, failing_consumer, in_file, name, processor_config, recv};
use helix_messaging_testkit::stores::letter;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reopened_store_can_be_reprocessed_discarded_and_purged() {
    let dir = tempfile::tempdir().unwrap();
    let broker = broker().await;
    let (topic, dlq_topic) = (name("orders"), name("dlq"));
    let config = ProcessorConfig {
        auto_redrive: false,
        ..processor_config(&dlq_topic)
    };
    let processor = Processor::new(
        broker.clone(),
        Arc::new(SqliteDeadLetterStore::open(in_file(&dir)).await.unwrap()),
        config.clone(),
    )
    .unwrap();
    processor.start().await.unwrap();
    let (runner, _) =
        failing_consumer(&broker, &topic, &dlq_topic, DeadLetterReason::Permanent).await;
    let sent: Vec<Message> = (0..3).map(|i| Message::new(format!("order {i}"))).collect();
    for m in &sent {
        broker.publish(&topic, m.clone()).await.unwrap();
    }
    eventually("three dead letters stored", || {
        let processor = processor.clone();
        async move { (processor.stats().await.ok()?.depth == 3).then_some(()) }
    })
    .await;
    runner.shutdown().await;
    processor.stop().await;
    drop(processor);

    // Another process, the same file.
    let store = Arc::new(SqliteDeadLetterStore::open(in_file(&dir)).await.unwrap());
    let processor = Processor::new(broker.clone(), store.clone(), config).unwrap();
    let page = processor
        .list(&DeadLetterFilter::default(), 10, 0)
        .await
        .unwrap();
    assert_eq!(page.count, 3);
    let id_of = |m: &Message| {
        page.entries
            .iter()
            .find(|e| e.letter.message.id() == m.id())
            .map(|e| e.letter.id.clone())
            .expect("entry for a sent message")
    };
    let mut replay = broker
        .subscribe(&topic, SubscribeOptions::group(name("after")))
        .await
        .unwrap();
    processor.reprocess(&id_of(&sent[0]), None).await.unwrap();
    let back = recv(&mut replay).await;
    assert_eq!(back.message().id(), sent[0].id());
    assert_eq!(back.message().payload(), sent[0].payload());
    back.ack().await.unwrap();
    let elsewhere = name("elsewhere");
    let mut other = broker
        .subscribe(&elsewhere, SubscribeOptions::group("g"))
        .await
        .unwrap();
    processor
        .reprocess(&id_of(&sent[1]), Some(&elsewhere))
        .await
        .unwrap();
    assert_eq!(
        recv(&mut other).await.message().id(),
        sent[1].id(),
        "reprocessed into another topic"
    );
    processor
        .discard(&id_of(&sent[2]), "test data")
        .await
        .unwrap();
    let discarded = processor.get(&id_of(&sent[2])).await.unwrap();
    assert_eq!(discarded.status, EntryStatus::Discarded);
    assert_eq!(discarded.discard_reason.as_deref(), Some("test data"));
    assert_eq!(processor.stats().await.unwrap().depth, 0);
    assert_eq!(
        processor
            .purge(&DeadLetterFilter {
                status: Some(EntryStatus::Discarded),
                ..DeadLetterFilter::default()
            })
            .await
            .unwrap(),
        1
    );
    assert_eq!(store.count(&DeadLetterFilter::default()).await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn automatic_redrive_backs_off_then_parks_the_message() {
    let broker = broker().await;
    let (topic, dlq_topic) = (name("flaky"), name("dlq"));
    let dir = tempfile::tempdir().unwrap();
    let processor = Processor::new(
        broker.clone(),
        Arc::new(SqliteDeadLetterStore::open(in_file(&dir)).await.unwrap()),
        processor_config(&dlq_topic),
    )
    .unwrap();
    processor.start().await.unwrap();
    let (runner, calls) = failing_consumer(
        &broker,
        &topic,
        &dlq_topic,
        DeadLetterReason::MaxRetriesExceeded,
    )
    .await;
    let m = Message::new("keeps failing");
    broker.publish(&topic, m.clone()).await.unwrap();
    let parked = eventually("the message parked", || {
        let processor = processor.clone();
        async move {
            let page = processor
                .list(
                    &DeadLetterFilter {
                        status: Some(EntryStatus::Parked),
                        ..DeadLetterFilter::default()
                    },
                    10,
                    0,
                )
                .await
                .ok()?;
            page.entries.into_iter().next()
        }
    })
    .await;
    runner.shutdown().await;
    processor.stop().await;
    assert_eq!(
        parked.letter.message.id(),
        m.id(),
        "the original id survives every trip"
    );
    assert_eq!(parked.letter.redrives, 2, "re-driven max_retries times");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        3,
        "the first delivery and one per re-drive"
    );
    let metrics = processor.metrics();
    assert_eq!(metrics.messages_ingested, 3);
    assert_eq!(metrics.messages_processed, 2, "two re-drives published");
    assert_eq!(metrics.messages_parked, 1);
    assert_eq!(
        processor.stats().await.unwrap().depth,
        1,
        "parked, never lost"
    );
}

/// While its store is down the processor's ingester backs off instead of taking the dead
/// letter back and again in a tight loop; once the store is back the letter is ingested.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ingester_backs_off_while_its_store_is_down() {
    use helix_messaging_testkit::plane::FaultyDeadLetterStore;
    let broker = broker().await;
    let dlq_topic = name("dlq");
    let store = Arc::new(FaultyDeadLetterStore::new(
        helix_messaging::dlq::MemoryDeadLetterStore::new(),
    ));
    let processor =
        Processor::new(broker.clone(), store.clone(), processor_config(&dlq_topic)).unwrap();
    processor.start().await.unwrap();
    store.set_down(true);
    let letter = helix_messaging_testkit::stores::letter(
        "orders",
        DeadLetterReason::MaxRetriesExceeded,
        "order.created",
        std::time::SystemTime::now(),
    );
    broker
        .publish(&dlq_topic, letter.to_message())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let tried = store.inserts_tried();
    assert!(
        (1..=12).contains(&tried),
        "{tried} inserts in 2 s with the store down: it should back off (100 ms doubling)"
    );
    store.set_down(false);
    eventually("ingested once the store is back", || {
        let processor = processor.clone();
        async move { (processor.stats().await.ok()?.depth == 1).then_some(()) }
    })
    .await;
    processor.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_for_the_message_type_is_retried_with_backoff_instead_of_republishing() {
    let broker = broker().await;
    let (topic, dlq_topic) = (name("llm"), name("dlq"));
    let processor = Processor::new(
        broker.clone(),
        Arc::new(helix_messaging::dlq::MemoryDeadLetterStore::new()),
        ProcessorConfig {
            max_retries: 3,
            ..processor_config(&dlq_topic)
        },
    )
    .unwrap();
    let tries = Arc::new(AtomicU32::new(0));
    let counted = tries.clone();
    processor.register_handler("llm.request", move |letter: DeadLetter| {
        let counted = counted.clone();
        async move {
            assert_eq!(letter.message.header("type"), Some("llm.request"));
            if counted.fetch_add(1, Ordering::SeqCst) < 2 {
                return Err("provider still rate-limited".into());
            }
            Ok(())
        }
    });
    processor.start().await.unwrap();
    let mut original = broker
        .subscribe(&topic, SubscribeOptions::group(name("watch")))
        .await
        .unwrap();
    // Permanent failures are parked unless a handler is registered for their type.
    let (runner, _) =
        failing_consumer(&broker, &topic, &dlq_topic, DeadLetterReason::Permanent).await;
    broker
        .publish(
            &topic,
            Message::new("prompt").with_header("type", "llm.request"),
        )
        .await
        .unwrap();
    recv(&mut original).await.ack().await.unwrap();
    eventually("the handler succeeded and the entry is gone", || {
        let (processor, tries) = (processor.clone(), tries.clone());
        async move {
            (tries.load(Ordering::SeqCst) == 3 && processor.stats().await.ok()?.depth == 0)
                .then_some(())
        }
    })
    .await;
    runner.shutdown().await;
    processor.stop().await;
    let metrics = processor.metrics();
    assert_eq!(metrics.messages_retried, 2);
    assert_eq!(metrics.messages_processed, 1);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), original.next())
            .await
            .is_err(),
        "a handled entry is not republished"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn letters_sent_before_the_processor_first_ran_are_ingested() {
    let broker = broker().await;
    let (topic, dlq_topic) = (name("early"), name("dlq"));
    let queue = DeadLetterQueue::new(broker.clone(), DeadLetterConfig::new(&dlq_topic).unwrap());
    let early = letter(
        &topic,
        DeadLetterReason::MaxRetriesExceeded,
        "order.created",
        SystemTime::now(),
    );
    queue.send(&early).await.unwrap();
    let processor = Processor::new(
        broker.clone(),
        Arc::new(helix_messaging::dlq::MemoryDeadLetterStore::new()),
        ProcessorConfig {
            auto_redrive: false,
            ..processor_config(&dlq_topic)
        },
    )
    .unwrap();
    processor.start().await.unwrap();
    let stored = eventually("the early letter ingested", || {
        let processor = processor.clone();
        let id = early.id.clone();
        async move { processor.get(&id).await.ok() }
    })
    .await;
    assert_eq!(stored.letter.message.id(), early.message.id());
    assert_eq!(
        stored.letter.error,
        early.error[..1024],
        "the wire carries the bounded error"
    );
    processor.stop().await;
}
