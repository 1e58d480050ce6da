//! The broker's state that every part of this adapter shares: the supervised connection and
//! the memory of deliveries returned unseen, with what all of them ask of it (is the broker
//! open, which link is usable, what a lapin error means for the connection).
//!
//! It stands below the publish machinery, the consumer and the acker, which all work on it,
//! so none of them has to import the broker they make up.

use std::sync::Arc;

use helix_messaging_core::{Error, ErrorKind, Result};

use crate::config::RabbitConfig;
use crate::error::from_lapin;
use crate::link::{Link, Supervisor};

/// What a [`RabbitBroker`](crate::RabbitBroker) and everything it started share.
pub(crate) struct Shared {
    pub(crate) supervisor: Arc<Supervisor>,
    /// Messages (queue, message id) a subscription of this broker had prefetched but never
    /// handed to the application when it ended: they come back flagged redelivered, and are
    /// not an attempt.
    /// Each says whether the delivery was itself a redelivery not counted yet when it was
    /// prefetched (returned by an earlier consumer that had received it): that return is
    /// still an attempt to count.
    unseen: std::sync::Mutex<std::collections::HashMap<(String, String), bool>>,
}

/// Most remembered unseen returns; past it the memory starts over (those returns then count
/// as attempts, as they would in another process).
const UNSEEN_MAX: usize = 100_000;

impl Shared {
    pub(crate) fn new(supervisor: Arc<Supervisor>) -> Self {
        Shared {
            supervisor,
            unseen: std::sync::Mutex::default(),
        }
    }

    pub(crate) fn config(&self) -> &RabbitConfig {
        self.supervisor.config()
    }

    fn unseen(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<(String, String), bool>> {
        self.unseen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn note_unseen(&self, queue: &str, id: String, uncounted: bool) {
        let mut unseen = self.unseen();
        if unseen.len() >= UNSEEN_MAX {
            unseen.clear();
        }
        // A return noted earlier and prefetched again unseen comes back flagged redelivered
        // by its own earlier return, not by an attempt: what the first note said stands.
        unseen
            .entry((queue.to_owned(), id))
            .and_modify(|earlier| *earlier &= uncounted)
            .or_insert(uncounted);
    }

    /// Whether `id` came back unseen from a subscription of this broker: `Some(uncounted)`
    /// as noted by [`Shared::note_unseen`].
    pub(crate) fn take_unseen(&self, queue: &str, id: &str) -> Option<bool> {
        self.unseen().remove(&(queue.to_owned(), id.to_owned()))
    }

    pub(crate) fn ensure_open(&self) -> Result<()> {
        if self.supervisor.is_closed() {
            Err(Error::closed("the rabbitmq broker"))
        } else {
            Ok(())
        }
    }

    /// The link if it is usable now; otherwise a retryable error (and reconnecting starts).
    pub(crate) fn link(&self) -> Result<Arc<Link>> {
        self.supervisor
            .usable()
            .ok_or_else(|| self.supervisor.unavailable())
    }

    /// A lapin error met on the live connection: map it, and start reconnecting when it means
    /// the connection is gone.
    pub(crate) fn connection_error(
        &self,
        err: lapin::Error,
        doing: impl std::fmt::Display,
    ) -> Error {
        let err = from_lapin(err, doing);
        // A channel the server closed reports itself as a connection error too; only a
        // connection that is really down is replaced (which tears down every consumer).
        if err.kind() == ErrorKind::Connection {
            let _ = self.supervisor.usable();
        }
        err
    }
}
