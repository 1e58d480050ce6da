//! The root probes for load balancers and orchestrators: `GET /health` and `GET /ready`,
//! answered without a token with one status word and 200 or 503. The details stay behind a
//! token at `/v1/messaging/health`.

use std::time::Duration;

use tokio::time::Instant;

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use helix_messaging_core::HealthStatus;

use crate::services::AppState;

/// Longest a probe waits for the brokers' health; past it the answer is 503. Shorter than
/// the probe timeouts orchestrators default to (Kubernetes: 1 s is its default, so set the
/// probe's `timeoutSeconds` to 3 or more).
pub const PROBE_HEALTH_TIMEOUT: Duration = Duration::from_secs(2);

fn word(code: StatusCode, word: &'static str) -> Response {
    (
        code,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        )],
        format!("{word}\n"),
    )
        .into_response()
}

/// How long a probe's answer is reused: anybody may ask without a token, so however many
/// ask, the brokers are checked at most once per this.
pub const PROBE_REUSE: Duration = Duration::from_secs(1);

/// The hub's status, `None` when it did not answer in time; checked at most once per
/// [`PROBE_REUSE`] (callers meanwhile wait for the check under way and share it).
async fn hub_status(state: &AppState) -> Option<HealthStatus> {
    let mut last = state.probe.lock().await;
    if let Some((at, status)) = *last
        && at.elapsed() < PROBE_REUSE
    {
        return status;
    }
    let status = tokio::time::timeout(PROBE_HEALTH_TIMEOUT, state.services.hub.health_check())
        .await
        .ok()
        .map(|health| health.status);
    *last = Some((Instant::now(), status));
    status
}

/// `GET /health`: `healthy` or `degraded` (a side runs on its fallback) with 200,
/// `unhealthy` with 503 (also when the brokers do not answer within
/// [`PROBE_HEALTH_TIMEOUT`]).
pub(crate) async fn health(State(state): State<AppState>) -> Response {
    match hub_status(&state).await {
        Some(HealthStatus::Healthy) => word(StatusCode::OK, "healthy"),
        Some(HealthStatus::Degraded) => word(StatusCode::OK, "degraded"),
        Some(HealthStatus::Unhealthy) | None => word(StatusCode::SERVICE_UNAVAILABLE, "unhealthy"),
    }
}

/// `GET /ready`: `ready` with 200 while both sides can take messages (healthy, or degraded
/// onto a fallback), `unready` with 503 otherwise.
pub(crate) async fn ready(State(state): State<AppState>) -> Response {
    match hub_status(&state).await {
        Some(HealthStatus::Healthy | HealthStatus::Degraded) => word(StatusCode::OK, "ready"),
        Some(HealthStatus::Unhealthy) | None => word(StatusCode::SERVICE_UNAVAILABLE, "unready"),
    }
}
