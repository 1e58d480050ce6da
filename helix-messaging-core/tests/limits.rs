//! What a client asks of a bulk redrive or a replay is bounded: a request outside the limits
//! is refused with `InvalidInput` naming the field and the limit, before anything starts.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use helix_messaging_core::dlq::{
    CanaryConfig, MAX_CANARY_WATCH, MAX_REDRIVE_BATCH_SIZE, MAX_REDRIVE_RATE, MIN_REDRIVE_RATE,
    MemoryDeadLetterStore, Processor, ProcessorConfig, RedriveRequest,
};
use helix_messaging_core::replay::{
    MAX_REPLAY_BATCH_SIZE, ReplayConfig, ReplayHandler, ReplayOptions, ReplayRequest,
};
use helix_messaging_core::{Broker, ErrorKind};
use helix_messaging_memory::MemoryBroker;

fn processor() -> Processor {
    let broker: Arc<dyn Broker> = Arc::new(MemoryBroker::new());
    Processor::new(
        broker,
        Arc::new(MemoryDeadLetterStore::new()),
        ProcessorConfig::default(),
    )
    .unwrap()
}

async fn refused(processor: &Processor, request: RedriveRequest, names: &[&str]) {
    let err = processor
        .start_redrive(request)
        .await
        .expect_err("outside the limits");
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
    for name in names {
        assert!(err.to_string().contains(name), "{err} names {name}");
    }
    assert!(processor.list_redrives().is_empty(), "nothing started");
}

#[tokio::test]
async fn a_redrive_outside_the_limits_is_refused_naming_the_field_and_the_limit() {
    let processor = processor();
    let over = MAX_REDRIVE_BATCH_SIZE + 1;
    let request = RedriveRequest {
        batch_size: over,
        ..RedriveRequest::default()
    };
    refused(
        &processor,
        request,
        &["batch_size", &MAX_REDRIVE_BATCH_SIZE.to_string()],
    )
    .await;
    for rate in [
        1e-20,
        MIN_REDRIVE_RATE / 2.0,
        MAX_REDRIVE_RATE * 2.0,
        f64::NAN,
        -1.0,
    ] {
        let request = RedriveRequest {
            rate_per_second: Some(rate),
            ..RedriveRequest::default()
        };
        refused(&processor, request, &["rate_per_second"]).await;
    }
    let request = RedriveRequest {
        canary: Some(CanaryConfig {
            count: 1,
            watch: MAX_CANARY_WATCH + Duration::from_millis(1),
        }),
        ..RedriveRequest::default()
    };
    refused(&processor, request, &["watch"]).await;
    // At the limits, a job starts.
    let request = RedriveRequest {
        batch_size: MAX_REDRIVE_BATCH_SIZE,
        rate_per_second: Some(MIN_REDRIVE_RATE),
        canary: Some(CanaryConfig {
            count: 1,
            watch: MAX_CANARY_WATCH,
        }),
        ..RedriveRequest::default()
    };
    processor
        .start_redrive(request)
        .await
        .expect("within the limits");
}

#[tokio::test]
async fn a_replay_outside_the_limits_or_into_its_own_topic_is_refused() {
    let broker: Arc<dyn Broker> = Arc::new(MemoryBroker::new());
    let handler = ReplayHandler::new(broker, ReplayConfig::default());
    let now = SystemTime::now();
    let window = || ReplayRequest::new("orders", now - Duration::from_secs(60), now);
    let too_big = window()
        .with_target_topic("orders.replayed")
        .with_options(ReplayOptions {
            batch_size: MAX_REPLAY_BATCH_SIZE + 1,
            ..ReplayOptions::default()
        });
    let err = handler.start_replay(too_big).await.expect_err("too big");
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    let text = err.to_string();
    assert!(
        text.contains("batch_size") && text.contains(&MAX_REPLAY_BATCH_SIZE.to_string()),
        "{text}"
    );

    // Its own copies would be read again, and copied again, until the window ends.
    let into_itself = window().with_target_topic("orders");
    let err = handler
        .start_replay(into_itself)
        .await
        .expect_err("into its source");
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    assert!(err.to_string().contains("target_topic"), "{err}");
    assert!(
        handler.list_replays().await.unwrap().is_empty(),
        "nothing started"
    );
}

/// A window ending in the future is clamped to the time the replay starts: a replay copies
/// history and finishes, rather than copying live traffic until `to_time`.
#[tokio::test]
async fn a_replay_window_ending_in_the_future_ends_when_the_replay_starts() {
    use helix_messaging_core::replay::ReplayStatus;
    use helix_messaging_core::{Message, Publisher};

    let broker = Arc::new(MemoryBroker::new());
    let from = SystemTime::now() - Duration::from_secs(60);
    for i in 0..2 {
        broker
            .publish("audit", Message::new(format!("m{i}")))
            .await
            .unwrap();
    }
    let handler = ReplayHandler::new(broker.clone(), ReplayConfig::default());
    let asked = SystemTime::now() + Duration::from_secs(3600);
    let request = ReplayRequest::new("audit", from, asked).with_target_topic("audit.replayed");
    let started = handler.start_replay(request).await.unwrap();
    let now = SystemTime::now();
    assert!(started.to_time <= now, "clamped: {:?}", started.to_time);
    // Published after the start: outside the clamped window, never copied.
    broker.publish("audit", Message::new("late")).await.unwrap();
    let done = tokio::time::timeout(Duration::from_secs(10), handler.wait(&started.id))
        .await
        .expect("finished, not waiting for the hour to pass")
        .unwrap();
    assert_eq!(done.status, ReplayStatus::Completed);
    assert_eq!(done.replayed, 2, "{done:?}");
}
