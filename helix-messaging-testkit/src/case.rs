//! One conformance case ([`Case`]) and the capabilities it needs ([`Needs`]). Apart from
//! the runner in the crate root so that [`cases`](crate::cases) can list its cases without
//! importing from the runner, which imports that list.

use futures::future::BoxFuture;
use helix_messaging_core::{Capabilities, Result};

use crate::helpers::Ctx;

/// A capability a case needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Needs {
    /// [`Capabilities::metadata`].
    Metadata,
    /// [`Capabilities::redelivery`].
    Redelivery,
    /// [`Capabilities::consumer_groups`].
    ConsumerGroups,
    /// [`Capabilities::per_key_ordering`].
    PerKeyOrdering,
    /// [`Capabilities::priority`].
    Priority,
    /// [`Capabilities::ttl`].
    Ttl,
    /// [`Capabilities::redeliver_unacked`].
    RedeliverUnacked,
    /// [`Capabilities::replay_by_time`].
    ReplayByTime,
    /// [`Capabilities::max_payload_bytes`] is set.
    PayloadLimit,
    /// [`Capabilities::delayed_requeue`].
    DelayedRequeue,
    /// [`Capabilities::backlog`].
    Backlog,
}

impl Needs {
    /// Whether `caps` provide this.
    pub fn met_by(self, caps: &Capabilities) -> bool {
        match self {
            Needs::Metadata => caps.metadata,
            Needs::Redelivery => caps.redelivery,
            Needs::ConsumerGroups => caps.consumer_groups,
            Needs::PerKeyOrdering => caps.per_key_ordering,
            Needs::Priority => caps.priority,
            Needs::Ttl => caps.ttl,
            Needs::RedeliverUnacked => caps.redeliver_unacked,
            Needs::ReplayByTime => caps.replay_by_time,
            Needs::PayloadLimit => caps.max_payload_bytes.is_some(),
            Needs::DelayedRequeue => caps.delayed_requeue,
            Needs::Backlog => caps.backlog,
        }
    }

    pub(crate) fn describe(self) -> &'static str {
        match self {
            Needs::Metadata => "a message's id, key and headers kept end to end",
            Needs::Redelivery => "redelivery",
            Needs::ConsumerGroups => "consumer groups",
            Needs::PerKeyOrdering => "per-key ordering",
            Needs::Priority => "priority",
            Needs::Ttl => "TTL",
            Needs::RedeliverUnacked => "redelivery of unacked messages",
            Needs::ReplayByTime => "replay by time",
            Needs::PayloadLimit => "a payload limit",
            Needs::DelayedRequeue => "delayed requeue",
            Needs::Backlog => "backlog reporting",
        }
    }
}

type CaseFn = fn(Ctx) -> BoxFuture<'static, Result<()>>;

/// One conformance case: a name, what it needs, and the function.
#[derive(Clone, Copy)]
pub struct Case {
    /// Unique name (the function's name in [`cases`](crate::cases)).
    pub name: &'static str,
    /// Capabilities the case needs; it is skipped on a backend lacking any.
    pub needs: &'static [Needs],
    pub(crate) run: CaseFn,
}

impl std::fmt::Debug for Case {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Case")
            .field("name", &self.name)
            .field("needs", &self.needs)
            .finish()
    }
}

impl Case {
    pub(crate) const fn new(name: &'static str, needs: &'static [Needs], run: CaseFn) -> Self {
        Case { name, needs, run }
    }

    /// The first need `caps` do not meet, if any.
    pub fn unmet_need(&self, caps: &Capabilities) -> Option<Needs> {
        self.needs.iter().copied().find(|n| !n.met_by(caps))
    }
}
