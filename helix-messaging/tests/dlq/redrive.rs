//! Bulk redrive jobs: the frozen selection, the rate limit (the canary watch included), the
//! counts when removals fail, the canary, and cancelling.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use helix_messaging::dlq::{
    CanaryConfig, DeadLetter, DeadLetterFilter, DeadLetterReason, MemoryDeadLetterStore, Processor,
    ProcessorConfig, RedriveProgress, RedriveRequest, RedriveStatus, SqliteDeadLetterStore,
    StoredDeadLetter,
};
use helix_messaging::{Broker, SubscribeOptions};

use crate::common;
use crate::support::{broker, failing_consumer, in_file, name, processor_config, recv};
use helix_messaging_testkit::stores::letter;

/// A processor of `broker` with a DLQ store in memory and the tests' settings.
fn memory_processor(broker: Arc<dyn Broker>) -> Processor {
    Processor::new(
        broker,
        Arc::new(MemoryDeadLetterStore::new()),
        processor_config(&name("dlq")),
    )
    .unwrap()
}

/// Stores `n` dead letters of `topic` directly (as the processor would have ingested them).
async fn stored_letters(processor: &Processor, topic: &str, n: usize) -> Vec<DeadLetter> {
    let t0 = SystemTime::now() - Duration::from_secs(3_600);
    let mut out = Vec::new();
    for i in 0..n {
        let l = letter(
            topic,
            DeadLetterReason::MaxRetriesExceeded,
            "order.created",
            t0 + Duration::from_millis(i as u64),
        );
        processor
            .store()
            .insert(StoredDeadLetter::received(l.clone(), SystemTime::now()))
            .await
            .unwrap();
        out.push(l);
    }
    out
}

/// A processor on the embedded broker whose DLQ store (in memory) fails every removal,
/// with `n` letters of `topic` stored.
struct Unremovable {
    broker: Arc<dyn Broker>,
    topic: String,
    store: Arc<helix_messaging_testkit::plane::FaultyDeadLetterStore<MemoryDeadLetterStore>>,
    processor: Processor,
    letters: Vec<DeadLetter>,
}

impl Unremovable {
    async fn new(what: &str, n: usize) -> Self {
        let broker = broker().await;
        let topic = name(what);
        let store = Arc::new(helix_messaging_testkit::plane::FaultyDeadLetterStore::new(
            MemoryDeadLetterStore::new(),
        ));
        let processor = Processor::new(
            broker.clone(),
            store.clone(),
            processor_config(&name("dlq")),
        )
        .unwrap();
        let letters = stored_letters(&processor, &topic, n).await;
        store.set_removals_down(true);
        Unremovable {
            broker,
            topic,
            store,
            processor,
            letters,
        }
    }
}

/// The job failed at a removal, `redriven` having gone out, none failed or skipped.
fn failed_at_a_removal(progress: &RedriveProgress, redriven: u64) {
    assert_eq!(progress.status, RedriveStatus::Failed, "{progress:?}");
    assert_eq!(
        (progress.redriven, progress.failed, progress.skipped),
        (redriven, 0, 0),
        "{progress:?}"
    );
    assert!(
        progress
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("removal")),
        "{progress:?}"
    );
}

/// Re-drive `count` entries first and watch them for `watch`.
fn canary(count: usize, watch: Duration) -> Option<CanaryConfig> {
    Some(CanaryConfig { count, watch })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_redrive_keeps_its_rate_and_its_frozen_selection() {
    let broker = broker().await;
    let topic = name("bulk");
    let dir = tempfile::tempdir().unwrap();
    let processor = Processor::new(
        broker.clone(),
        Arc::new(SqliteDeadLetterStore::open(in_file(&dir)).await.unwrap()),
        processor_config(&name("dlq")),
    )
    .unwrap();
    let letters = stored_letters(&processor, &topic, 200).await;
    drop(processor);
    // The redrive runs in a later process, on the reopened file.
    let processor = Processor::new(
        broker.clone(),
        Arc::new(SqliteDeadLetterStore::open(in_file(&dir)).await.unwrap()),
        processor_config(&name("dlq")),
    )
    .unwrap();
    let mut sub = broker
        .subscribe(&topic, SubscribeOptions::group("g"))
        .await
        .unwrap();
    let started = Instant::now();
    let job = processor
        .start_redrive(RedriveRequest {
            rate_per_second: Some(100.0),
            ..RedriveRequest::default()
        })
        .await
        .unwrap();
    // Dead-lettered after the job started: not part of its selection.
    let late = stored_letters(&processor, &topic, 1).await;
    let progress = common::redrive_finished(&processor, &job.id).await;
    let took = started.elapsed();
    assert_eq!(progress.status, RedriveStatus::Completed);
    assert_eq!(
        (
            progress.total,
            progress.redriven,
            progress.failed,
            progress.skipped
        ),
        (200, 200, 0, 0)
    );
    assert!((progress.percentage() - 100.0).abs() < f64::EPSILON);
    assert!(
        took >= Duration::from_millis(1_900),
        "200 messages at 100/s took only {took:?}"
    );
    let mut got = Vec::new();
    for _ in 0..200 {
        let d = recv(&mut sub).await;
        got.push(d.message().id().to_owned());
        d.ack().await.unwrap();
    }
    let expected: Vec<String> = letters.iter().map(|l| l.message.id().to_owned()).collect();
    assert_eq!(got, expected, "re-driven in DLQ order");
    let left = processor
        .list(&DeadLetterFilter::default(), 10, 0)
        .await
        .unwrap();
    assert_eq!(left.count, 1);
    assert_eq!(
        left.entries[0].letter.id, late[0].id,
        "only the late letter stays"
    );
    assert_eq!(processor.list_redrives().len(), 1);
}

/// The rate limit holds over every window of the run, the canary watch included: the time
/// spent watching is not banked and spent in one burst afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_redrive_keeps_its_rate_after_the_canary_watch() {
    const RATE: f64 = 20.0;
    let broker = broker().await;
    let topic = name("paced");
    let processor = memory_processor(broker.clone());
    stored_letters(&processor, &topic, 30).await;
    let mut sub = broker
        .subscribe(&topic, SubscribeOptions::group("g"))
        .await
        .unwrap();
    let job = processor
        .start_redrive(RedriveRequest {
            rate_per_second: Some(RATE),
            canary: canary(1, Duration::from_secs(1)),
            ..RedriveRequest::default()
        })
        .await
        .unwrap();
    let mut arrivals = Vec::new();
    for _ in 0..30 {
        recv(&mut sub).await.ack().await.unwrap();
        arrivals.push(Instant::now());
    }
    assert_eq!(
        common::redrive_finished(&processor, &job.id).await.status,
        RedriveStatus::Completed
    );
    // Half a second holds RATE / 2 messages, plus one chunk (RATE / 20) that may start at
    // its beginning and a little for the scheduler.
    let window = Duration::from_millis(500);
    let most = (RATE / 2.0) as usize + 1 + 2;
    for (i, at) in arrivals.iter().enumerate() {
        let within = arrivals[i..].iter().filter(|t| **t < *at + window).count();
        assert!(
            within <= most,
            "{within} re-driven within {window:?} from the {i}th at {RATE}/s (at most {most})"
        );
    }
}

/// When the store cannot remove what was re-driven, the job's counts still add up to its
/// selection: what went out counts as re-driven, and the job fails saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redrive_whose_removals_fail_still_counts_what_went_out() {
    let scene = Unremovable::new("unremovable", 10).await;
    let processor = scene.processor;
    // Unpaced: the ten go out as one batch, whose removal fails.
    let progress = common::unpaced_redrive(&processor).await;
    // Published, so re-driven, though still in the store.
    failed_at_a_removal(&progress, 10);
}

/// An unpaced redrive claims and removes whole groups of batches at a time: across several
/// groups every entry still goes out once, in DLQ order, and leaves the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unpaced_redrive_of_several_groups_delivers_each_entry_once_and_empties_the_store() {
    use helix_messaging_testkit::plane::read_history;
    const ENTRIES: usize = 2_100;
    let broker = broker().await;
    let topic = name("grouped");
    let dir = tempfile::tempdir().unwrap();
    let processor = Processor::new(
        broker.clone(),
        Arc::new(SqliteDeadLetterStore::open(in_file(&dir)).await.unwrap()),
        processor_config(&name("dlq")),
    )
    .unwrap();
    let letters = stored_letters(&processor, &topic, ENTRIES).await;
    let from = SystemTime::now() - Duration::from_secs(1);
    let progress = common::unpaced_redrive(&processor).await;
    assert_eq!(progress.status, RedriveStatus::Completed, "{progress:?}");
    assert_eq!(
        (progress.redriven, progress.failed, progress.skipped),
        (ENTRIES as u64, 0, 0),
        "{progress:?}"
    );
    let got: Vec<String> = read_history(&broker, &topic, from)
        .await
        .unwrap()
        .iter()
        .map(|m| m.id().to_owned())
        .collect();
    let expected: Vec<String> = letters.iter().map(|l| l.message.id().to_owned()).collect();
    assert_eq!(got, expected, "each once, in DLQ order");
    let left = processor
        .list(&DeadLetterFilter::default(), 10, 0)
        .await
        .unwrap();
    assert_eq!(left.count, 0, "every re-driven entry left the store");
}

/// An unpaced redrive removes a group while it publishes the next one. When a removal fails
/// it stops once the group under way is out: nothing past it is claimed or published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redrive_stops_at_a_failed_removal_once_the_group_under_way_is_out() {
    use helix_messaging::dlq::DeadLetterStore;
    use helix_messaging_testkit::plane::read_history;
    // Three groups of 1,000: the first's removal fails while the second is published.
    let from = SystemTime::now() - Duration::from_secs(1);
    let Unremovable {
        broker,
        topic,
        store,
        processor,
        letters,
    } = Unremovable::new("unremovable-groups", 2_100).await;
    let progress = common::unpaced_redrive(&processor).await;
    // The first two groups went out.
    failed_at_a_removal(&progress, 2_000);
    let published = read_history(&broker, &topic, from).await.unwrap();
    let expected: Vec<&str> = letters[..2_000].iter().map(|l| l.message.id()).collect();
    let got: Vec<&str> = published.iter().map(|m| m.id()).collect();
    assert_eq!(got, expected, "the first two groups, once each");
    let now = SystemTime::now();
    for letter in &letters[2_000..] {
        let entry = store.get(&letter.id).await.unwrap().expect("still stored");
        assert!(
            !entry.is_claimed(now),
            "{} was claimed past the failure",
            letter.id
        );
    }
}

/// A redrive whose canary cannot be re-driven fails, leaving everything else in the DLQ,
/// instead of going on without a canary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redrive_whose_canary_cannot_go_out_fails_and_re_drives_nothing() {
    use helix_messaging_testkit::plane::{FaultSchedule, FaultyBroker};
    // A broker that refuses every message.
    let refusing: Arc<dyn helix_messaging::Broker> = Arc::new(FaultyBroker::new(
        broker().await,
        FaultSchedule::new(1, 0, 100),
    ));
    let processor = memory_processor(refusing);
    stored_letters(&processor, &name("no-canary"), 5).await;
    let job = processor
        .start_redrive(RedriveRequest {
            canary: canary(1, Duration::from_millis(200)),
            ..RedriveRequest::default()
        })
        .await
        .unwrap();
    let progress = common::redrive_finished(&processor, &job.id).await;
    assert_eq!(progress.status, RedriveStatus::Failed, "{progress:?}");
    assert_eq!(
        (progress.redriven, progress.failed),
        (0, 1),
        "only the canary was tried"
    );
    assert!(
        progress
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("canary")),
        "{progress:?}"
    );
    assert_eq!(
        processor.stats().await.unwrap().depth,
        5,
        "all still in the DLQ"
    );
}

/// A canary dead-lettered again by a consumer whose clock runs an hour behind the
/// processor's still fails the canary: it is recognised by its redrive count, not by when
/// its failure was stamped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_failing_on_a_host_with_a_slow_clock_still_stops_the_redrive() {
    let broker = broker().await;
    let topic = name("skewed");
    let processor = memory_processor(broker.clone());
    let letters = stored_letters(&processor, &topic, 5).await;
    let mut sub = broker
        .subscribe(&topic, SubscribeOptions::group("g"))
        .await
        .unwrap();
    let job = processor
        .start_redrive(RedriveRequest {
            canary: canary(1, Duration::from_secs(2)),
            ..RedriveRequest::default()
        })
        .await
        .unwrap();
    let canary = recv(&mut sub).await;
    assert_eq!(canary.message().id(), letters[0].message.id());
    // The consumer fails it again (a dead letter of the copy, which carries one more
    // redrive), and stamps the failure by its own clock.
    let mut again = letters[0].clone();
    again.id = uuid::Uuid::new_v4().to_string();
    again.redrives += 1;
    again.last_failure_at = SystemTime::now() - Duration::from_secs(3_600);
    again.first_failure_at = again.last_failure_at;
    canary.ack().await.unwrap();
    processor.ingest(again).await.unwrap();
    let progress = common::redrive_finished(&processor, &job.id).await;
    assert_eq!(progress.status, RedriveStatus::CanaryFailed, "{progress:?}");
    assert_eq!(progress.redriven, 1, "only the canary went out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_that_fails_again_stops_the_redrive_and_a_cancel_stops_it_too() {
    let broker = broker().await;
    let (topic, dlq_topic) = (name("canary"), name("dlq"));
    let dir = tempfile::tempdir().unwrap();
    let config = ProcessorConfig {
        auto_redrive: false,
        ..processor_config(&dlq_topic)
    };
    let open = || async { Arc::new(SqliteDeadLetterStore::open(in_file(&dir)).await.unwrap()) };
    let earlier = Processor::new(broker.clone(), open().await, config.clone()).unwrap();
    stored_letters(&earlier, &topic, 20).await;
    drop(earlier);
    // The jobs run in a later process, on the reopened file.
    let processor = Processor::new(broker.clone(), open().await, config).unwrap();
    processor.start().await.unwrap();
    let (runner, calls) =
        failing_consumer(&broker, &topic, &dlq_topic, DeadLetterReason::Permanent).await;
    let job = processor
        .start_redrive(RedriveRequest {
            canary: canary(2, Duration::from_millis(1_500)),
            ..RedriveRequest::default()
        })
        .await
        .unwrap();
    let progress = common::redrive_finished(&processor, &job.id).await;
    assert_eq!(progress.status, RedriveStatus::CanaryFailed);
    assert_eq!(progress.redriven, 2, "only the canaries went out");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    let stats = processor.stats().await.unwrap();
    assert_eq!(stats.depth, 20, "18 untouched and the 2 canaries back");
    runner.shutdown().await;

    // Nobody fails now, but the job is cancelled early.
    let job = processor
        .start_redrive(RedriveRequest {
            rate_per_second: Some(10.0),
            ..RedriveRequest::default()
        })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(350)).await;
    processor.cancel_redrive(&job.id).unwrap();
    let progress = common::redrive_finished(&processor, &job.id).await;
    assert_eq!(progress.status, RedriveStatus::Cancelled);
    assert!(
        progress.redriven >= 1 && progress.redriven < 20,
        "redriven {} before the cancel",
        progress.redriven
    );
    assert_eq!(
        processor.stats().await.unwrap().depth,
        20 - progress.redriven,
        "what was not re-driven stays"
    );
    processor.stop().await;
}
