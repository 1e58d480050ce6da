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

use std::collections::HashMap;

use helix_messaging_core::observe::connection::ConnectionState;
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
        for (name, broker) in stats.brokers {
            if broker.nodeid < 0 {
                continue;
            }
            let entry = seen.entry(name.clone()).or_default();
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
        reconnected
    }
}

/// The context of the adapter's producers: counts their reconnects.
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
