//! Cases for the members of one group in turn: unacked deliveries handed over, attempts
//! counted across crashes and kept across owners that only prefetched, an ack past a
//! crashed message, successive members, and a close that commits nothing held. Together
//! because they share the helpers that start a group and its next member.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use futures::StreamExt;
use helix_messaging_core::{Message, Result, SubscribeOptions};

use crate::helpers::{Ctx, fresh_name};

/// Unacked deliveries of a dropped subscription go to the next member of the group.
pub async fn dropped_subscription_hands_over_unacked(ctx: Ctx) -> Result<()> {
    let topic = ctx.topic("handover");
    let group = fresh_name("g");
    let mut first = ctx
        .subscribe(&topic, SubscribeOptions::group(&group).with_prefetch(10))
        .await;
    let mut sent = HashSet::new();
    for i in 0..5 {
        let m = Message::new(format!("job {i}")).with_key("jobs");
        sent.insert(m.id().to_owned());
        ctx.publish(&topic, m).await;
    }
    let held = ctx.recv_n(&mut first, 5).await;
    let held_ids: HashSet<String> = held.iter().map(|d| d.message().id().to_owned()).collect();
    assert_eq!(held_ids, sent);
    drop(held);
    drop(first);

    let mut second = ctx.subscribe(&topic, SubscribeOptions::group(&group)).await;
    let got: HashSet<String> = ctx.recv_ack_ids(&mut second, 5).await.into_iter().collect();
    assert_eq!(got, sent, "every unacked message was handed over");
    ctx.expect_quiet(&mut second).await;
    Ok(())
}

/// A consumer that crashes (drops its delivery and subscription unsettled) again and again
/// sees the attempt count go 1, 2, 3, 4, 5: a retry limit can be reached.
pub async fn crash_loop_counts_every_attempt(ctx: Ctx) -> Result<()> {
    let topic = ctx.topic("crash-loop");
    let group = fresh_name("g");
    ctx.create_group(&topic, &group).await?;
    let m = Message::new("poison").with_key("k");
    ctx.publish(&topic, m.clone()).await;
    for expected in 1..=5u32 {
        let mut sub = ctx
            .subscribe(&topic, SubscribeOptions::group(&group).with_prefetch(1))
            .await;
        let d = ctx.recv(&mut sub).await;
        assert_eq!(d.message().id(), m.id());
        assert_eq!(
            d.attempt(),
            expected,
            "attempt after {} crashes",
            expected - 1
        );
        assert_eq!(d.info().redelivered, expected > 1, "redelivered flag");
        if expected == 5 {
            d.ack().await?;
            ctx.expect_quiet(&mut sub).await;
        }
        // The crash: neither settled nor kept.
        drop(d);
        drop(sub);
    }
    Ok(())
}

/// A fresh topic, a group created on it, and `n` messages `m0`, `m1`, … of one key
/// published to it, in order.
async fn a_group_with_messages(
    ctx: &Ctx,
    what: &str,
    n: usize,
) -> Result<(String, String, Vec<Message>)> {
    let topic = ctx.topic(what);
    let group = fresh_name("g");
    ctx.create_group(&topic, &group).await?;
    let sent: Vec<Message> = (0..n)
        .map(|i| Message::new(format!("m{i}")).with_key("k"))
        .collect();
    for m in &sent {
        ctx.publish(&topic, m.clone()).await;
    }
    Ok((topic, group, sent))
}

/// A member of `group` that ends without taking anything, after time enough to prefetch
/// what waits, as a member busy elsewhere would.
async fn a_member_that_only_prefetches(ctx: &Ctx, topic: &str, group: &str) {
    let member = ctx.subscribe(topic, SubscribeOptions::group(group)).await;
    tokio::time::sleep(ctx.settings.quiet_period).await;
    drop(member);
}

/// The next member of `group` receives `m` at `attempt` (redelivered past the first), and
/// then nothing more.
async fn the_next_member_receives(
    ctx: &Ctx,
    topic: &str,
    group: &str,
    m: &Message,
    attempt: u32,
    why: &str,
) -> Result<()> {
    let mut next = ctx.subscribe(topic, SubscribeOptions::group(group)).await;
    let d = ctx.recv(&mut next).await;
    assert_eq!(d.message().id(), m.id());
    assert_eq!(
        (d.attempt(), d.info().redelivered),
        (attempt, attempt > 1),
        "{why}"
    );
    d.ack().await?;
    ctx.expect_quiet(&mut next).await;
    Ok(())
}

/// Attempts survive an owner that never received the message: after a crash at attempt 1,
/// a subscription that ends without taking anything (it may have prefetched the message, or
/// not fetched it yet) leaves the next one to receive it at attempt 2, not 1 again.
pub async fn an_owner_that_never_received_it_keeps_its_attempts(ctx: Ctx) -> Result<()> {
    let (topic, group, sent) = a_group_with_messages(&ctx, "unseen-owner", 1).await?;
    let mut first = ctx
        .subscribe(&topic, SubscribeOptions::group(&group).with_prefetch(1))
        .await;
    let d = ctx.recv(&mut first).await;
    assert_eq!((d.message().id(), d.attempt()), (sent[0].id(), 1));
    drop(first);
    drop(d);
    a_member_that_only_prefetches(&ctx, &topic, &group).await;
    the_next_member_receives(
        &ctx,
        &topic,
        &group,
        &sent[0],
        2,
        "the second owner never received it: its attempt 1 must not be forgotten",
    )
    .await
}

/// A message two members in turn only prefetched (each ended without taking anything)
/// reaches the third at attempt 1: no one has attempted it.
pub async fn prefetched_by_two_owners_in_turn_is_no_attempt(ctx: Ctx) -> Result<()> {
    let (topic, group, sent) = a_group_with_messages(&ctx, "prefetched-twice", 1).await?;
    for _ in 0..2 {
        a_member_that_only_prefetches(&ctx, &topic, &group).await;
    }
    the_next_member_receives(&ctx, &topic, &group, &sent[0], 1, "never attempted").await
}

/// A consumer that acks a later message and then crashes holding an earlier one of the same
/// key: the next consumer of the group receives the earlier one again, and never the one
/// that was acked (on Kafka the commit cannot pass the held message, so this is on the
/// adapter).
pub async fn an_ack_past_a_crashed_message_stays_acked(ctx: Ctx) -> Result<()> {
    let (topic, group, sent) = a_group_with_messages(&ctx, "ack-past-crash", 3).await?;
    let mut first = ctx
        .subscribe(&topic, SubscribeOptions::group(&group).with_prefetch(3))
        .await;
    let mut got = ctx.recv_n(&mut first, 3).await;
    let ids: Vec<&str> = got.iter().map(|d| d.message().id()).collect();
    let want: Vec<&str> = sent.iter().map(Message::id).collect();
    assert_eq!(ids, want, "in order");
    let held = got.remove(0);
    for d in got {
        d.ack().await?;
    }
    drop(first);
    drop(held);
    let mut next = ctx.subscribe(&topic, SubscribeOptions::group(&group)).await;
    let d = ctx.recv(&mut next).await;
    assert_eq!(
        (d.message().id(), d.attempt()),
        (sent[0].id(), 2),
        "the held one comes back"
    );
    d.ack().await?;
    ctx.expect_quiet(&mut next).await;
    Ok(())
}

/// Members of one group that follow each other, each taking its share, acking it and
/// leaving (with more prefetched than it took), lose nothing between them and repeat
/// nothing: 5,000 messages from 50 concurrent publishers, five members of 1,000 each.
pub async fn successive_members_of_a_group_lose_nothing(ctx: Ctx) -> Result<()> {
    const PUBLISHERS: usize = 50;
    const EACH: usize = 100;
    const MEMBERS: usize = 5;
    let total = PUBLISHERS * EACH;
    let topic = ctx.topic("successive");
    let group = fresh_name("g");
    ctx.create_group(&topic, &group).await?;
    let publishing = (0..PUBLISHERS).map(|p| {
        let (ctx, topic) = (ctx.clone(), topic.clone());
        async move {
            for i in 0..EACH {
                ctx.publish(
                    &topic,
                    Message::new(format!("p{p} m{i}")).with_key(format!("p{p}")),
                )
                .await;
            }
        }
    });
    // Published while the members consume: a bounded backend holds publishers back until
    // there is room.
    let publishing = tokio::spawn(futures::future::join_all(publishing));
    let mut seen = HashSet::new();
    for member in 0..MEMBERS {
        let mut sub = ctx.subscribe(&topic, SubscribeOptions::group(&group)).await;
        for _ in 0..total / MEMBERS {
            let d = ctx.recv(&mut sub).await;
            let id = d.message().id().to_owned();
            d.ack().await?;
            assert!(
                seen.insert(id.clone()),
                "member {member} received {id} again"
            );
        }
        drop(sub);
    }
    publishing.await.expect("the publishers finished");
    assert_eq!(seen.len(), total, "every message, once");
    let mut last = ctx.subscribe(&topic, SubscribeOptions::group(&group)).await;
    ctx.expect_quiet(&mut last).await;
    Ok(())
}

/// Closing the broker ends its subscriptions within a few seconds, whatever their
/// deliveries' state (one is held unsettled here), and, on a durable backend, commits
/// nothing they held: another process's member of the group receives the held message
/// again, and not the acked one.
pub async fn close_ends_subscriptions_promptly_and_commits_nothing_held(ctx: Ctx) -> Result<()> {
    /// How long a subscription may outlive `close()` returning.
    const AFTER_CLOSE: Duration = Duration::from_secs(1);
    /// How long `close()` plus that may take in all, with a delivery held.
    const IN_ALL: Duration = Duration::from_secs(10);
    let (topic, group, sent) = a_group_with_messages(&ctx, "close-ends", 3).await?;
    let mut sub = ctx
        .subscribe(&topic, SubscribeOptions::group(&group).with_prefetch(2))
        .await;
    let held = ctx.recv(&mut sub).await;
    assert_eq!(held.message().id(), sent[0].id());
    let acked = ctx.recv(&mut sub).await;
    assert_eq!(acked.message().id(), sent[1].id());
    acked.ack().await?;

    let started = std::time::Instant::now();
    ctx.broker.close().await?;
    let closed_in = started.elapsed();
    let drained = tokio::time::timeout(AFTER_CLOSE, async {
        // Deliveries handed over before the close may still come out; then it ends.
        while sub.next().await.is_some() {}
    })
    .await;
    assert!(
        drained.is_ok(),
        "the subscription was still open {AFTER_CLOSE:?} after close() returned (in {closed_in:?})"
    );
    assert!(
        started.elapsed() <= IN_ALL,
        "close() and the end of the subscription took {:?}",
        started.elapsed()
    );
    drop(held);
    if !ctx.broker.capabilities().durable {
        // Another broker of an in-process backend shares nothing with this one.
        return Ok(());
    }

    let other = ctx.another_broker().await?;
    let mut next = other
        .subscribe(&topic, SubscribeOptions::group(&group))
        .await?;
    let mut ids = Vec::new();
    for _ in 0..2 {
        let d = ctx.recv(&mut next).await;
        ids.push(d.message().id().to_owned());
        d.ack().await?;
    }
    ctx.expect_quiet(&mut next).await;
    other.close().await?;
    let want = vec![sent[0].id().to_owned(), sent[2].id().to_owned()];
    assert_eq!(
        ids, want,
        "the held message again, then the one never taken; not the acked one"
    );
    Ok(())
}

/// A subscription that ends with one delivery received and others only prefetched (read
/// from the broker, never handed to the application) hands all of them over, and only the
/// one the application saw counts as an attempt.
pub async fn prefetched_but_unseen_is_not_an_attempt(ctx: Ctx) -> Result<()> {
    let (topic, group, sent) = a_group_with_messages(&ctx, "unseen", 3).await?;
    let mut first = ctx
        .subscribe(&topic, SubscribeOptions::group(&group).with_prefetch(3))
        .await;
    let seen = ctx.recv(&mut first).await;
    assert_eq!(seen.message().id(), sent[0].id());
    // Give the others time to be prefetched, as they would be by a busy consumer.
    tokio::time::sleep(ctx.settings.quiet_period).await;
    drop(first);
    drop(seen);
    let mut next = ctx.subscribe(&topic, SubscribeOptions::group(&group)).await;
    let mut attempts = BTreeMap::new();
    for d in ctx.recv_n(&mut next, 3).await {
        attempts.insert(d.message().id().to_owned(), d.attempt());
        d.ack().await?;
    }
    let expected: BTreeMap<String, u32> = sent
        .iter()
        .enumerate()
        .map(|(i, m)| (m.id().to_owned(), if i == 0 { 2 } else { 1 }))
        .collect();
    assert_eq!(attempts, expected, "only the received one was attempted");
    ctx.expect_quiet(&mut next).await;
    Ok(())
}
