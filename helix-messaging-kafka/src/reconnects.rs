//! Re-established broker connections, read from librdkafka's statistics.
//!
//! librdkafka reconnects by itself and tells no callback when it does; its statistics
//! (every [`KafkaConfig::statistics_interval`](crate::config::KafkaConfig::statistics_interval))
//! count per broker the connections that were up and were lost (`disconnects`) and give the
//! broker's state. A loss is counted in `messaging_reconnects_total` once the broker is `UP`
//! again. Bootstrap entries (node id −1) are left out: librdkafka drops their connections
//! on purpose once it has learnt the cluster.
//!
//! The same documents set `messaging_connection_up{backend="kafka",connection}` per learnt
//! broker (librdkafka's name for it, `host:port/node`): 1 while its state is `UP`, 0 in any
//! other, summed over this process's clients (the producer and each group consumer).
//!
//! And they count connections made and attempts that failed, in
//! `messaging_connections_total` and `messaging_connection_failures_total`: every
//! connection that came up is either up now or counted in `disconnects` (librdkafka counts
//! only the loss of a connection that was up there), so a broker entry's connections are
//! `disconnects` + (1 if up); its failed attempts are the rest of `connects` (every attempt),
//! less one still under way. Bootstrap entries count too: while the cluster cannot be reached
//! at all, their failed attempts are the only ones there are.

use std::collections::HashMap;

use helix_messaging_core::observe::connection::{
    ConnectionState, count_connection_failures, count_connections,
};
use parking_lot::Mutex;
use rdkafka::ClientContext;
use serde::Deserialize;

/// One librdkafka client's view of its broker connections (each client has its own).
#[derive(Default)]
pub(crate) struct Reconnects {
    brokers: Mutex<HashMap<String, Seen>>,
}

#[derive(Default)]
struct Seen {
    disconnects: u64,
    /// Connections counted in `messaging_connections_total` so far.
    connections: u64,
    /// Failed attempts counted in `messaging_connection_failures_total` so far.
    failures: u64,
    /// Losses not yet counted: the broker is not up again yet.
    pending: u64,
    /// This client's share of the broker's `messaging_connection_up`.
    state: Option<ConnectionState>,
}

#[derive(Deserialize)]
struct Statistics {
    #[serde(default)]
    brokers: HashMap<String, BrokerStatistics>,
}

#[derive(Deserialize)]
struct BrokerStatistics {
    nodeid: i32,
    state: String,
    #[serde(default)]
    disconnects: u64,
    #[serde(default)]
    connects: u64,
}

impl BrokerStatistics {
    fn is_up(&self) -> bool {
        matches!(self.state.as_str(), "UP" | "UPDATE" | "REAUTH")
    }

    /// A connection attempt under way: neither made nor failed yet.
    fn is_connecting(&self) -> bool {
        matches!(
            self.state.as_str(),
            "CONNECT"
                | "SSL_HANDSHAKE"
                | "AUTH_LEGACY"
                | "APIVERSION_QUERY"
                | "AUTH_HANDSHAKE"
                | "AUTH_REQ"
        )
    }

    /// (connections made, attempts failed) so far (see the module docs).
    fn connections(&self) -> (u64, u64) {
        let made = self.disconnects + u64::from(self.is_up());
        let failed = self
            .connects
            .saturating_sub(made)
            .saturating_sub(u64::from(self.is_connecting()));
        (made, failed)
    }
}

impl Reconnects {
    /// Read one statistics document; returns how many reconnects it showed (and counts
    /// them in the metric).
    pub(crate) fn observe(&self, json: &[u8]) -> u64 {
        let stats: Statistics = match serde_json::from_slice(json) {
            Ok(stats) => stats,
            Err(err) => {
                tracing::debug!(error = %err, "unreadable librdkafka statistics");
                return 0;
            }
        };
        let mut seen = self.brokers.lock();
        let mut reconnected = 0;
        let (mut made, mut failed) = (0, 0);
        for (name, broker) in stats.brokers {
            let entry = seen.entry(name.clone()).or_default();
            // Counters only grow: a figure that went back (an attempt that was under way
            // and then came up) waits until it passes what was counted.
            let (connections, failures) = broker.connections();
            made += connections.saturating_sub(entry.connections);
            entry.connections = entry.connections.max(connections);
            failed += failures.saturating_sub(entry.failures);
            entry.failures = entry.failures.max(failures);
            if broker.nodeid < 0 {
                continue;
            }
            entry
                .state
                .get_or_insert_with(|| ConnectionState::new(crate::config::NAME, name))
                .set(broker.state == "UP");
            entry.pending += broker.disconnects.saturating_sub(entry.disconnects);
            entry.disconnects = broker.disconnects;
            if broker.state == "UP" && entry.pending > 0 {
                reconnected += entry.pending;
                entry.pending = 0;
            }
        }
        if reconnected > 0 {
            helix_messaging_core::observe::count_reconnects(crate::config::NAME, reconnected);
        }
        count_connections(crate::config::NAME, made);
        count_connection_failures(crate::config::NAME, failed);
        reconnected
    }
}

/// The context of the adapter's producers: counts their reconnects, and (in `reports`) takes
/// each record's delivery report to its call.
#[derive(Default)]
pub(crate) struct StatsContext {
    reconnects: Reconnects,
}

impl ClientContext for StatsContext {
    fn stats_raw(&self, statistics: &[u8]) {
        self.reconnects.observe(statistics);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(brokers: &[(&str, i32, &str, u64)]) -> Vec<u8> {
        let brokers: serde_json::Map<String, serde_json::Value> = brokers
            .iter()
            .map(|(name, nodeid, state, disconnects)| {
                (
                    (*name).to_owned(),
                    serde_json::json!({"name": name, "nodeid": nodeid, "state": state,
                        "disconnects": disconnects, "connects": 9}),
                )
            })
            .collect();
        serde_json::to_vec(&serde_json::json!({"name": "rdkafka#producer-1", "brokers": brokers}))
            .unwrap()
    }

    #[test]
    fn a_loss_counts_once_the_broker_is_up_again_and_bootstrap_entries_never() {
        let r = Reconnects::default();
        assert_eq!(r.observe(&stats(&[("b:9092/1", 1, "UP", 0)])), 0);
        assert_eq!(
            r.observe(&stats(&[("b:9092/1", 1, "CONNECT", 1)])),
            0,
            "lost, not back yet"
        );
        assert_eq!(r.observe(&stats(&[("b:9092/1", 1, "TRY_CONNECT", 1)])), 0);
        assert_eq!(r.observe(&stats(&[("b:9092/1", 1, "UP", 1)])), 1, "back");
        assert_eq!(r.observe(&stats(&[("b:9092/1", 1, "UP", 1)])), 0, "once");
        assert_eq!(
            r.observe(&stats(&[
                ("b:9092/1", 1, "UP", 3),
                ("b:9092/bootstrap", -1, "INIT", 5)
            ])),
            2,
            "two losses between documents; the bootstrap entry's drops are not reconnects"
        );
        assert_eq!(r.observe(b"not json"), 0);
    }

    /// Connections made and attempts failed, from `connects`, `disconnects` and the state,
    /// bootstrap entries included, each counted once.
    #[test]
    fn connections_and_failed_attempts_are_counted_once_each() {
        use helix_messaging_testkit::recorded::{self, connections};

        recorded::install();
        let figures = || connections(crate::config::NAME);
        let document = |brokers: &[(&str, i32, &str, u64, u64)]| {
            let brokers: serde_json::Map<String, serde_json::Value> = brokers
                .iter()
                .map(|(name, nodeid, state, connects, disconnects)| {
                    (
                        (*name).to_owned(),
                        serde_json::json!({"nodeid": nodeid, "state": state,
                            "connects": connects, "disconnects": disconnects}),
                    )
                })
                .collect();
            serde_json::to_vec(&serde_json::json!({ "brokers": brokers })).unwrap()
        };
        let r = Reconnects::default();
        let start = figures();
        let delta = || {
            let (made, failed) = figures();
            (made - start.0, failed - start.1)
        };
        let boot = "k:9092/bootstrap";
        r.observe(&document(&[(boot, -1, "DOWN", 3, 0)]));
        assert_eq!(
            delta(),
            (0, 3),
            "the cluster unreachable: three failed attempts"
        );
        r.observe(&document(&[(boot, -1, "CONNECT", 4, 0)]));
        assert_eq!(delta(), (0, 3), "an attempt under way is neither");
        r.observe(&document(&[(boot, -1, "UP", 4, 0)]));
        assert_eq!(delta(), (1, 3), "it came up");
        let node = "k:9092/1";
        r.observe(&document(&[(boot, -1, "UP", 4, 0), (node, 1, "UP", 1, 0)]));
        assert_eq!(delta(), (2, 3), "the learnt broker's connection");
        r.observe(&document(&[(node, 1, "UP", 1, 0)]));
        assert_eq!(delta(), (2, 3), "the same document again counts nothing");
        r.observe(&document(&[(node, 1, "TRY_CONNECT", 3, 1)]));
        assert_eq!(
            delta(),
            (2, 5),
            "lost, then two attempts failed (waiting to retry)"
        );
        r.observe(&document(&[(node, 1, "UP", 4, 1)]));
        assert_eq!(delta(), (3, 5), "the next attempt came up");
    }

    #[test]
    fn a_learnt_broker_is_up_in_the_gauge_while_its_state_is_up() {
        use helix_messaging_core::observe::connection::CONNECTION_UP_METRIC;
        use helix_messaging_testkit::recorded::{self, gauge};

        recorded::install();
        let on = [("backend", crate::config::NAME), ("connection", "g:9092/7")];
        let up = || gauge(&recorded::snapshot(), CONNECTION_UP_METRIC, &on);
        let r = Reconnects::default();
        r.observe(&stats(&[("g:9092/7", 7, "UP", 0)]));
        assert_eq!(up(), Some(1.0));
        r.observe(&stats(&[("g:9092/7", 7, "CONNECT", 1)]));
        assert_eq!(up(), Some(0.0), "lost");
        r.observe(&stats(&[("g:9092/7", 7, "UP", 1)]));
        assert_eq!(up(), Some(1.0), "back");
        drop(r);
        assert_eq!(up(), Some(0.0), "a client gone is no connection up");
    }
}
