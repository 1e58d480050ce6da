//! Both Redis modes run the conformance suite against the real server on 127.0.0.1:6379
//! (`REDIS_URL` overrides). A server that cannot be reached fails the test.

use std::sync::Arc;
use std::time::Duration;

use helix_messaging_core::Broker;
use helix_messaging_redis::{RedisBroker, RedisConfig, RedisMode};
use helix_messaging_testkit::Conformance;
use helix_messaging_testkit::faults::{PrivateRedisCluster, redis_cli};

/// Delete the streams (and their `.undecodable` companions) a case created.
async fn delete_topics(topics: Vec<String>) {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let Ok(mut conn) = redis::Client::open(url)
        .expect("REDIS_URL")
        .get_multiplexed_async_connection()
        .await
    else {
        return;
    };
    let keys: Vec<String> = topics
        .iter()
        .flat_map(|t| [t.clone(), format!("{t}.undecodable")])
        .collect();
    if !keys.is_empty() {
        let _: redis::RedisResult<i64> = redis::cmd("DEL").arg(&keys).query_async(&mut conn).await;
    }
}

fn config(mode: RedisMode) -> RedisConfig {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let mut config = RedisConfig::new(&url, mode).expect("REDIS_URL");
    // Short enough for the hand-over case to finish quickly, long enough that no case's
    // held delivery is reclaimed while it is being examined.
    config.streams.ack_deadline = Duration::from_secs(10);
    config
}

/// What `MESSAGING_BACKEND=redis-streams` gives with nothing else set (the 60 s ack
/// deadline included: a dropped subscription hands its entries over at once, so no case
/// waits it out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_streams_pass_the_conformance_suite() {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    streams_suite(RedisConfig::new(&url, RedisMode::Streams).expect("REDIS_URL")).await;
}

async fn streams_suite(config: RedisConfig) {
    streams_conformance("redis-streams", config)
        .cleanup(delete_topics)
        .run()
        .await
        .assert_passed();
}

fn streams_conformance(name: &str, config: RedisConfig) -> Conformance {
    Conformance::new(name, move || {
        let config = config.clone();
        async move { Ok(Arc::new(RedisBroker::connect(config).await?) as Arc<dyn Broker>) }
    })
    // Streams have no priority: entries are read in append order.
    .expect_skipped(
        "priority_order",
        "Redis Streams deliver in append order; no priorities",
    )
}

/// Streams mode on a Redis Cluster of the test's own (three primaries,
/// `REDIS_CLUSTER_NODES`): each topic's stream on the node owning its slot, through
/// redis-rs' cluster client. The cluster goes away with the test, and its keys with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_streams_pass_the_conformance_suite_on_a_cluster() {
    let cluster = PrivateRedisCluster::start();
    let config = RedisConfig::from_vars(
        helix_messaging_testkit::env_lookup(&[("REDIS_CLUSTER_NODES", &cluster.addresses())]),
        RedisMode::Streams,
    )
    .unwrap();
    streams_conformance("redis-streams-cluster", config)
        .run()
        .await
        .assert_passed();
    // The suite's topics are spread over the nodes, each stream on its slot's owner.
    let holding = cluster
        .nodes
        .iter()
        .filter(|node| {
            redis_cli(node.port(), &["DBSIZE"])
                .trim()
                .parse::<u64>()
                .unwrap_or(0)
                > 0
        })
        .count();
    assert_eq!(holding, 3, "every node holds some of the suite's streams");
}

/// Pub/sub is at most once: the cases that need groups, redelivery or history are skipped.
fn at_most_once(suite: Conformance) -> Conformance {
    let at_most_once =
        "Redis pub/sub is at most once: no consumer groups, no redelivery, no history";
    suite
        .expect_skipped("fan_out_to_groups", at_most_once)
        .expect_skipped("group_load_sharing", at_most_once)
        .expect_skipped("nack_requeue_redelivers", at_most_once)
        .expect_skipped("dropped_subscription_hands_over_unacked", at_most_once)
        .expect_skipped("priority_order", at_most_once)
        .expect_skipped("ttl_expiry", at_most_once)
        .expect_skipped("read_range_returns_exactly_the_window", at_most_once)
        .expect_skipped("new_group_starts_from_earliest", at_most_once)
        .expect_skipped("requeue_reaches_only_its_group", at_most_once)
        .expect_skipped("crash_loop_counts_every_attempt", at_most_once)
        .expect_skipped("prefetch_one_keeps_flowing", at_most_once)
        .expect_skipped("a_held_window_fills_to_the_prefetch", at_most_once)
        .expect_skipped(
            "live_messages_stamped_before_a_time_start_arrive",
            at_most_once,
        )
        .expect_skipped("zero_ttl_is_never_delivered", at_most_once)
        .expect_skipped("prefetched_but_unseen_is_not_an_attempt", at_most_once)
        .expect_skipped(
            "an_owner_that_never_received_it_keeps_its_attempts",
            at_most_once,
        )
        .expect_skipped("an_ack_past_a_crashed_message_stays_acked", at_most_once)
        .expect_skipped(
            "prefetched_by_two_owners_in_turn_is_no_attempt",
            at_most_once,
        )
        .expect_skipped("successive_members_of_a_group_lose_nothing", at_most_once)
        .expect_skipped(
            "close_ends_subscriptions_promptly_and_commits_nothing_held",
            at_most_once,
        )
        .expect_skipped("delayed_requeue_holds_the_message_back", at_most_once)
        .expect_skipped("retry_then_dead_letter_after_exact_attempts", at_most_once)
        .expect_skipped(
            "undecodable_is_dead_lettered_on_first_delivery",
            at_most_once,
        )
        .expect_skipped("poison_message_does_not_stall_the_others", at_most_once)
        .expect_skipped("processor_ingests_lists_and_reprocesses", at_most_once)
        .expect_skipped(
            "malformed_payloads_reach_the_dlq_after_one_delivery",
            at_most_once,
        )
        .expect_skipped("replay_copies_exactly_the_window", at_most_once)
        .expect_skipped("replay_skips_duplicate_ids", at_most_once)
        .expect_skipped("replay_cancel_stops_within_one_batch", at_most_once)
        .expect_skipped(
            "replay_resumes_after_restart_without_duplicates",
            at_most_once,
        )
        .expect_skipped(
            "backlog_counts_what_the_group_has_not_finished",
            at_most_once,
        )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_pubsub_passes_the_conformance_suite() {
    // The default configuration, envelope on: every field the cases check travels.
    at_most_once(Conformance::new("redis", || async {
        Ok(Arc::new(RedisBroker::connect(config(RedisMode::PubSub)).await?) as Arc<dyn Broker>)
    }))
    .cleanup(delete_topics)
    .run()
    .await
    .assert_passed();
}

/// With the envelope off (`REDIS_PUBSUB_ENVELOPE=false`) a channel carries the bare payload
/// for subscribers that are not helix: the capabilities say no metadata, and the cases that
/// need it are skipped for that reason; the rest hold. `interop.rs` checks the bytes
/// against redis-cli.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_pubsub_with_bare_payloads_keeps_what_it_declares() {
    let bare = || {
        let mut config = config(RedisMode::PubSub);
        config.pubsub_envelope = false;
        config
    };
    assert!(
        !bare().capabilities().metadata,
        "bare payloads carry no metadata"
    );
    let no_metadata = "a bare payload carries no id, key or headers: ids are fresh on delivery";
    at_most_once(Conformance::new("redis", move || async move {
        Ok(Arc::new(RedisBroker::connect(bare()).await?) as Arc<dyn Broker>)
    }))
    .expect_skipped("round_trip", no_metadata)
    .expect_skipped("batch_publish", no_metadata)
    .expect_skipped(
        "a_publish_window_delivers_every_message_and_reports_each",
        no_metadata,
    )
    .expect_skipped("per_key_ordering", no_metadata)
    .expect_skipped("topic_isolation", no_metadata)
    .expect_skipped("reject_does_not_redeliver", no_metadata)
    .expect_skipped("concurrent_publishers_exactly_once", no_metadata)
    .cleanup(delete_topics)
    .run()
    .await
    .assert_passed();
}
