//! Connection state, connections made and attempts that failed, per backend: what the
//! adapters report of their connections to the broker.
//!
//! - `messaging_connection_up` (gauge; labels `backend`, `connection`, the address): the
//!   connections of that backend to that address that are up now, so 1 while a broker's
//!   connection is up and 0 once it is lost or closed (more than 1 only when several
//!   brokers of one process connect to the same address);
//! - `messaging_connections_total` (counter; label `backend`): connections established,
//!   the first one and every reconnect;
//! - `messaging_connection_failures_total` (counter; label `backend`): connection attempts
//!   that failed, each retry of a reconnect counted.

use std::sync::atomic::{AtomicBool, Ordering};

/// The gauge of connections up (see the module docs).
pub const CONNECTION_UP_METRIC: &str = "messaging_connection_up";

/// The counter of connections established (see the module docs).
pub const CONNECTIONS_METRIC: &str = "messaging_connections_total";

/// The counter of failed connection attempts (see the module docs).
pub const CONNECTION_FAILURES_METRIC: &str = "messaging_connection_failures_total";

/// Count one connection of `backend` established, in [`CONNECTIONS_METRIC`].
pub fn count_connection(backend: &'static str) {
    count_connections(backend, 1);
}

/// Count `n` connections of `backend` established, in [`CONNECTIONS_METRIC`] (registering
/// the series even for 0).
pub fn count_connections(backend: &'static str, n: u64) {
    metrics::counter!(CONNECTIONS_METRIC, "backend" => backend).increment(n);
}

/// Count one failed connection attempt of `backend`, in [`CONNECTION_FAILURES_METRIC`].
pub fn count_connection_failure(backend: &'static str) {
    count_connection_failures(backend, 1);
}

/// Count `n` failed connection attempts of `backend`, in [`CONNECTION_FAILURES_METRIC`]
/// (registering the series even for 0).
pub fn count_connection_failures(backend: &'static str, n: u64) {
    metrics::counter!(CONNECTION_FAILURES_METRIC, "backend" => backend).increment(n);
}

/// One connection's share of [`CONNECTION_UP_METRIC`]: [`ConnectionState::set`] adds it
/// to the gauge when it comes up and takes it away when it goes down, and dropping it
/// takes it away, so a broker that is dropped without closing leaves no stale 1 behind.
#[derive(Debug)]
pub struct ConnectionState {
    gauge: metrics::Gauge,
    up: AtomicBool,
}

impl ConnectionState {
    /// The state of `backend`'s connection to `connection` (an address without
    /// credentials), down until [`ConnectionState::set`] says otherwise.
    pub fn new(backend: &'static str, connection: impl Into<String>) -> Self {
        let connection: String = connection.into();
        let gauge = metrics::gauge!(
            CONNECTION_UP_METRIC,
            "backend" => backend,
            "connection" => connection
        );
        // Registers the series at 0, so a connection that never came up shows as down.
        gauge.increment(0.0);
        ConnectionState {
            gauge,
            up: AtomicBool::new(false),
        }
    }

    /// The connection is up (`true`) or down; a repeat of the current state changes nothing.
    pub fn set(&self, up: bool) {
        if self.up.swap(up, Ordering::AcqRel) != up {
            self.gauge.increment(if up { 1.0 } else { -1.0 });
        }
    }

    /// Whether it was last reported up.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }
}

impl Drop for ConnectionState {
    fn drop(&mut self) {
        self.set(false);
    }
}
