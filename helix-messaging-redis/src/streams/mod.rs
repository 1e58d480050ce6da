//! Streams mode: XADD, consumer groups with XREADGROUP, XACK, requeue via the group's pending
//! list, a reclaimer (XAUTOCLAIM) for entries left pending past the ack deadline, XRANGE
//! replay.
//!
//! Requeue hands an entry to a placeholder consumer ([`REQUEUE_CONSUMER`]) with its idle
//! time set to the maximum (`XCLAIM … TIME 0 JUSTID`, which keeps the delivery count), so the
//! next reclaimer pass of any member takes it at once; that pass increments the delivery
//! count, which is where `attempt` comes from.
//!
//! A delayed requeue is timed by Redis itself, with the same pending list: the entry goes to
//! the requeue consumer with its delivery time set so that it becomes idle past the ack
//! deadline exactly when the delay is over, and the reclaimer takes it then. A delay longer
//! than the ack deadline cannot be expressed that way (Redis refuses delivery times in the
//! future), so such an entry is also put in a sorted set by due time
//! (`<topic>.helix-delayed.<group>`) and kept idle-fresh by every member's reclaimer until
//! it is within the ack deadline of being due. The entry never leaves the group's pending
//! list, so the wait reaches only its group, counts as an attempt, survives any consumer's
//! crash and is never trimmed.
//!
//! The parts, from the ground up: [`entry`] (an entry's XADD, its id and time, XREADGROUP
//! replies) and [`group`] (the group, the names beside it, its backlog); [`reader`] (what a
//! subscription's task and its deliveries share); [`delay`] (the delayed requeue's scripts),
//! [`pending`] (reclaiming and handing back pending entries) and [`acker`] (settling a
//! delivery); [`consumer`] (subscribing and the read loop) on top, and [`history`] (XRANGE
//! replay) beside it.

mod acker;
mod consumer;
mod delay;
mod entry;
mod group;
mod history;
mod pending;
mod reader;

pub use group::REQUEUE_CONSUMER;

pub(crate) use consumer::subscribe;
pub(crate) use entry::xadd;
pub(crate) use group::{backlog, create_latest as create_group};
pub(crate) use history::read_range;
