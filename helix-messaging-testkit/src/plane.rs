//! The reliability plane under faults: seeded fault-injecting wrappers over a broker and a
//! spool, and runs that check the plane's promises after each seed.
//!
//! [`FaultyBroker`] wraps any `Arc<dyn Broker>` and, per publish, passes it through, fails it
//! transiently (a retryable connection error, before the broker saw it), times it out
//! *after* the broker took it (the ambiguous case), or delays it; a message it refuses
//! ([`ErrorKind::Rejected`]) it refuses every time, as a broker refuses a bad message. Per
//! delivery, it drops it with the connection (requeued, the stream reporting the loss) or
//! delays it. A
//! batch goes over in order, and a transient fault fails the rest of it, as a lost
//! connection does. [`FaultySpool`] does the same to a [`Spool`]'s calls: an append can
//! fail before it is written or after (written, but reported failed). Every decision comes
//! from the seed and, for a publish, the message's id and how often it was tried; for a
//! store call, how many calls of its kind came before. So a seed replays the same faults
//! whatever order the caller and the forwarder interleave in.
//!
//! [`SpoolHarness`] runs seeded programs through a [`FallbackBroker`] over a faulty broker
//! and spool, cancelling some publishes at a seeded await point; the first part of each
//! program is published by a process killed afterwards (its runtime shut down, its
//! forwarder dropped at whatever await it reached, perhaps mid-round) and the rest by a
//! second process on the same spool. It then heals the faults and
//! checks the spool's promise: every publish that returned `Ok` is delivered at least once,
//! with each topic's first deliveries in the order of the `Ok`s, or sits in the set-aside
//! area with the broker's reason; never neither. [`check_breaker`] drives a
//! [`CircuitBreaker`] through seeded permits, outcomes, abandoned calls and time, and checks
//! that its counts never underflow and that a half-open breaker always resolves.
//!
//! On a violation the report names the seed, the shortest failing program (the fewest
//! publishes that still fail) and what was observed. `HELIX_PLANE_SEEDS=n` runs seeds 1 to n
//! (default 20), `HELIX_PLANE_SEED=s` one seed.
//!
//! [`ErrorKind::Rejected`]: helix_messaging_core::ErrorKind::Rejected
//! [`Spool`]: helix_messaging_core::fallback::Spool
//! [`FallbackBroker`]: helix_messaging_core::fallback::FallbackBroker
//! [`CircuitBreaker`]: helix_messaging_core::breaker::CircuitBreaker

mod breaker;
mod broker;
mod dlq;
mod replay;
mod schedule;
mod seeds;
mod spool;
mod stores;

pub use breaker::{assert_breaker_holds, check_breaker};
pub use broker::FaultyBroker;
pub use dlq::DlqHarness;
pub use replay::{ReplayHarness, read_copies, read_history};
pub use schedule::{Fault, FaultSchedule, cancel_after_polls};
pub use seeds::PlaneReport;
pub use spool::SpoolHarness;
pub use stores::{FaultyDeadLetterStore, FaultyReplayStore, FaultySpool};
