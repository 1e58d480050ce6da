//! The conformance cases. Each takes a [`Ctx`] with a fresh broker and fails by panicking
//! (assertions) or returning a broker error.
//!
//! [`Ctx`]: crate::Ctx

use futures::FutureExt;

use crate::case::{Case, Needs};

mod delivery;
mod handover;
mod history;
mod reliability;
mod replay;
mod settlement;
pub use delivery::*;
pub use handover::*;
pub use history::*;
pub use reliability::*;
pub use replay::*;
pub use settlement::*;

macro_rules! cases {
    ($($name:ident: [$($need:ident),*];)*) => {
        /// Every case, in the order the runner reports them.
        pub const ALL: &[Case] = &[
            $(Case::new(stringify!($name), &[$(Needs::$need),*], |ctx| $name(ctx).boxed()),)*
        ];
    };
}

cases! {
    round_trip: [Metadata];
    batch_publish: [Metadata];
    a_publish_window_delivers_every_message_and_reports_each: [Metadata];
    per_key_ordering: [Metadata, PerKeyOrdering];
    topic_isolation: [Metadata];
    fan_out_to_groups: [ConsumerGroups];
    group_load_sharing: [ConsumerGroups];
    nack_requeue_redelivers: [Redelivery];
    reject_does_not_redeliver: [Metadata];
    double_settle_is_refused: [];
    dropped_subscription_hands_over_unacked: [ConsumerGroups, RedeliverUnacked];
    concurrent_publishers_exactly_once: [Metadata];
    priority_order: [ConsumerGroups, Priority];
    ttl_expiry: [ConsumerGroups, Ttl];
    a_group_created_without_a_member_keeps_what_is_published: [];
    read_range_returns_exactly_the_window: [ReplayByTime];
    new_group_starts_from_earliest: [ConsumerGroups, ReplayByTime];
    invalid_names_are_refused: [];
    oversized_payload_is_refused: [PayloadLimit];
    closed_broker_refuses_work: [];
    requeue_reaches_only_its_group: [ConsumerGroups, Redelivery];
    crash_loop_counts_every_attempt: [ConsumerGroups, RedeliverUnacked];
    prefetch_one_keeps_flowing: [Redelivery];
    a_held_window_fills_to_the_prefetch: [ConsumerGroups];
    live_messages_stamped_before_a_time_start_arrive: [ConsumerGroups, ReplayByTime];
    zero_ttl_is_never_delivered: [Ttl];
    settling_after_close_fails: [];
    prefetched_but_unseen_is_not_an_attempt: [ConsumerGroups, RedeliverUnacked];
    an_owner_that_never_received_it_keeps_its_attempts: [ConsumerGroups, RedeliverUnacked];
    an_ack_past_a_crashed_message_stays_acked: [ConsumerGroups, RedeliverUnacked];
    prefetched_by_two_owners_in_turn_is_no_attempt: [ConsumerGroups, RedeliverUnacked];
    successive_members_of_a_group_lose_nothing: [ConsumerGroups, RedeliverUnacked];
    close_ends_subscriptions_promptly_and_commits_nothing_held: [ConsumerGroups, RedeliverUnacked];
    delayed_requeue_holds_the_message_back: [ConsumerGroups, DelayedRequeue];
    delayed_requeue_is_declared_honestly: [];
    retry_then_dead_letter_after_exact_attempts: [ConsumerGroups, Redelivery];
    undecodable_is_dead_lettered_on_first_delivery: [ConsumerGroups];
    poison_message_does_not_stall_the_others: [ConsumerGroups, Redelivery];
    processor_ingests_lists_and_reprocesses: [ConsumerGroups];
    malformed_payloads_reach_the_dlq_after_one_delivery: [ConsumerGroups];
    replay_copies_exactly_the_window: [ReplayByTime];
    replay_skips_duplicate_ids: [ReplayByTime];
    replay_cancel_stops_within_one_batch: [ReplayByTime];
    replay_resumes_after_restart_without_duplicates: [ReplayByTime];
    replay_is_declared_honestly: [];
    backlog_counts_what_the_group_has_not_finished: [ConsumerGroups, Backlog];
    backlog_is_declared_honestly: [];
}
