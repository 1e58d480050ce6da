//! What a subscription's task and its deliveries' ackers share, and acking through it: the
//! read loop, the reclaimer, the delayed requeue and settlement all work on one [`Reader`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize};

use helix_messaging_core::Result;
use tokio::sync::Notify;

use crate::acks::{Acks, EntryId};
use crate::error::from_redis;
use crate::shared::Shared;

/// What a subscription's task and its deliveries' ackers share.
pub(super) struct Reader {
    pub(super) shared: Arc<Shared>,
    pub(super) topic: Arc<str>,
    pub(super) group: Arc<str>,
    /// The group as reported in deliveries (`None` for a private subscription).
    pub(super) reported_group: Option<Arc<str>>,
    pub(super) consumer: String,
    pub(super) prefetch: usize,
    /// Deliveries handed out and not yet settled or dropped.
    pub(super) outstanding: AtomicUsize,
    /// Woken when settlements free the first slot of a full window, or half the window: the
    /// two points the reader waits for (not on every settlement, which would wake it once
    /// per delivery), and by a requeue.
    pub(super) slot_freed: Notify,
    /// Set by a requeue so the next pass claims at once, from the start of the pending list.
    pub(super) requeued: AtomicBool,
    /// Entries the application has received and not settled. XREADGROUP counts a delivery
    /// when it reads an entry, but one still on its way to the application when the
    /// subscription ends was never seen: handing it back, its count is set back by one.
    /// Kept as [`EntryId`]s: inserting and removing one per delivery costs no allocation.
    pub(super) received: parking_lot::Mutex<std::collections::HashSet<EntryId>>,
    /// Where its deliveries' acks go, to be sent together.
    pub(super) acks: Acks,
}

/// Ack `id` for `reader`'s group: whether it was still pending.
pub(super) async fn ack(reader: &Reader, id: &str) -> Result<bool> {
    if let Some(key) = EntryId::parse(id) {
        return reader.acks.ack(key).await;
    }
    // Not an id Redis makes, so not one the ack task can carry: acked on its own, as given.
    let acked: i64 = redis::cmd("XACK")
        .arg(&*reader.topic)
        .arg(&*reader.group)
        .arg(id)
        .query_async(&mut reader.shared.commands.clone())
        .await
        .map_err(|e| from_redis(e, format!("XACK of {id} on {}", reader.topic)))?;
    Ok(acked > 0)
}
