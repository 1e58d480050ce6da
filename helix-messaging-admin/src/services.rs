//! What the API serves ([`Services`]) and the state every handler is given with it.

use std::sync::Arc;

use tokio::time::Instant;

use helix_messaging_core::HealthStatus;
use helix_messaging_core::dlq::Processor;
use helix_messaging_core::hub::Hub;
use helix_messaging_core::replay::ReplayHandler;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::tokens::Tokens;

/// What the admin API serves: the hub, and optionally the Prometheus handle and the DLQ
/// processor (without them their endpoints answer 503).
#[derive(Clone)]
pub struct Services {
    pub(crate) hub: Hub,
    pub(crate) prometheus: Option<PrometheusHandle>,
    pub(crate) dlq: Option<Processor>,
    pub(crate) replay: Option<ReplayHandler>,
}

impl Services {
    /// The hub's health; no metrics, no DLQ.
    pub fn new(hub: Hub) -> Self {
        Services {
            hub,
            prometheus: None,
            dlq: None,
            replay: None,
        }
    }

    /// Render `handle` at `/v1/messaging/metrics`.
    #[must_use]
    pub fn with_prometheus(mut self, handle: PrometheusHandle) -> Self {
        self.prometheus = Some(handle);
        self
    }

    /// Serve the DLQ endpoints from `processor`.
    #[must_use]
    pub fn with_dlq(mut self, processor: Processor) -> Self {
        self.dlq = Some(processor);
        self
    }

    /// Serve the replay endpoints from `handler`.
    #[must_use]
    pub fn with_replay(mut self, handler: ReplayHandler) -> Self {
        self.replay = Some(handler);
        self
    }
}

/// The root probes' last finding, and when it was made.
pub(crate) type ProbeCache = tokio::sync::Mutex<Option<(Instant, Option<HealthStatus>)>>;

#[derive(Clone)]
pub(crate) struct AppState {
    pub(crate) services: Services,
    pub(crate) tokens: Arc<Tokens>,
    /// Largest request body, in bytes.
    pub(crate) body_limit: usize,
    /// The root probes' last finding, shared by every caller for a moment.
    pub(crate) probe: Arc<ProbeCache>,
}
