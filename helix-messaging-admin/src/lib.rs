//! The HTTP admin API of helix-messaging, on axum: HelixAgent's `/v1/messaging/…` endpoints
//! over a [`Hub`](helix_messaging_core::hub::Hub), behind bearer-token auth.
//!
//! [`router`] gives a [`Router`] to mount in an application's own axum app; [`serve`] runs
//! it on its own listener (by default `127.0.0.1:7061`, HelixAgent's port, never every
//! interface unless asked). Served:
//!
//! - `GET /v1/messaging/health`: both sides' health as JSON (`status` is `healthy`,
//!   `degraded` or `unhealthy`; HTTP 503 when unhealthy, so a load balancer's check works);
//! - `GET /v1/messaging/openapi.json`: the OpenAPI 3.0 document of all of this;
//! - `GET /v1/messaging/metrics`: every metric recorded through the `metrics` facade, in the
//!   Prometheus text format (from [`install_prometheus`]'s recorder);
//! - `GET /v1/messaging/dlq?limit&offset` (filters `topic`, `reason`, `type`, `status`,
//!   `original_id`, `from`, `to` in RFC 3339): `{"count", "limit", "offset", "messages"}`,
//!   `count` being every match (HelixAgent's scripts read `.count`);
//! - `GET /v1/messaging/dlq/{id}`, `POST /v1/messaging/dlq/{id}/reprocess` (optional body
//!   `{"target_topic"}`), `DELETE /v1/messaging/dlq/{id}/discard` and HelixAgent's `DELETE
//!   /v1/messaging/dlq/{id}` (optional body `{"reason"}`): 404 for an unknown id, 400 for
//!   bad input;
//! - `GET /v1/messaging/dlq/groups` (the list's filters): `{"count", "groups"}`, the
//!   entries grouped by reason and topic, largest first;
//! - `POST /v1/messaging/dlq/redrives` (body `{"filter": {…the list's filter keys},
//!   "target_topic", "rate_per_second", "canary": {"count", "watch_ms"}, "batch_size"}`, all
//!   optional; 202 with its progress), `GET /v1/messaging/dlq/redrives` (`{"count",
//!   "redrives"}`), `GET` and `DELETE /v1/messaging/dlq/redrives/{id}` (progress; cancel):
//!   bulk redrive jobs;
//! - `POST /v1/messaging/replay` (HelixAgent's body: `topic`, `from_time`, `to_time` in RFC
//!   3339, optional `id`, `target_topic`, `filter` {`message_types`, `headers`}, `options`
//!   {`batch_size`, `delay_between_ms`, `dry_run`, `skip_duplicates`}; 202 with its
//!   progress), `GET /v1/messaging/replay` (`{"count", "replays"}`), `GET` and `DELETE
//!   /v1/messaging/replay/{id}` (progress; cancel);
//! - `GET /v1/messaging/spools` (each side's fallback spool: `depth`, `refused`, `bytes`,
//!   `oldest`; `null` for a side without one), `GET /v1/messaging/spools/{side}/refused?limit`
//!   (`{"count", "refused"}`: the messages the broker refused when they were forwarded, set
//!   aside with its error), `POST /v1/messaging/spools/{side}/refused/{seq}/retry` (back to
//!   the end of the spool) and `DELETE /v1/messaging/spools/{side}/refused/{seq}` (dropped
//!   for good); `side` is `tasks` or `events`, 404 for a side without a spool or an unknown
//!   `seq`.
//!
//! The bodies are typed in [`api`], the one place the JSON shape is written down; clients
//! read answers into the same types.
//!
//! Every request needs `Authorization: Bearer <token>` (the token from
//! `MESSAGING_ADMIN_TOKEN`); a missing or wrong one is 401. Errors, unknown paths (404) and
//! wrong methods (405) answer with a JSON body `{"error": {"status": …, "message": …}}`.
//! Request bodies are bounded ([`AdminConfig::body_limit`], 413 beyond it); a malformed
//! JSON body is 400.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

pub mod api;
mod dlq;
mod json;
mod openapi;
mod replay;
mod services;
mod spool;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use helix_messaging_core::{Health, HealthStatus};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use subtle::ConstantTimeEq;

use crate::json::ApiError;
use crate::services::AppState;
pub use crate::services::Services;

/// Variable holding the bearer token every request must carry.
pub const TOKEN_VAR: &str = "MESSAGING_ADMIN_TOKEN";
/// Variable holding the address to listen on (default [`DEFAULT_ADDR`]).
pub const ADDR_VAR: &str = "MESSAGING_ADMIN_ADDR";
/// Loopback only, on HelixAgent's port: exposing the API is a decision, not a default.
pub const DEFAULT_ADDR: &str = "127.0.0.1:7061";
/// Largest request body accepted by default (1 MiB).
pub const DEFAULT_BODY_LIMIT: usize = 1024 * 1024;

/// What can go wrong setting the admin API up.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// A setting is missing or malformed; the message names the variable.
    #[error("{var}: {reason}")]
    Config {
        /// The variable (or field) at fault.
        var: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The address could not be listened on.
    #[error("admin API: cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The server stopped with an I/O error.
    #[error("admin API: {0}")]
    Serve(#[from] std::io::Error),
    /// The Prometheus recorder could not be installed (another recorder is installed).
    #[error("admin API: cannot install the Prometheus recorder: {0}")]
    Prometheus(String),
}

/// The admin API's settings.
#[derive(Clone)]
pub struct AdminConfig {
    token: Arc<str>,
    /// Where [`serve`] listens.
    pub addr: SocketAddr,
    /// Largest request body, in bytes.
    pub body_limit: usize,
}

impl std::fmt::Debug for AdminConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The token is a secret: never printed.
        f.debug_struct("AdminConfig")
            .field("token", &"<redacted>")
            .field("addr", &self.addr)
            .field("body_limit", &self.body_limit)
            .finish()
    }
}

impl AdminConfig {
    /// Settings with `token`, on [`DEFAULT_ADDR`] with [`DEFAULT_BODY_LIMIT`].
    ///
    /// # Errors
    /// [`AdminError::Config`] for an empty or blank token.
    pub fn new(token: impl Into<String>) -> Result<Self, AdminError> {
        let token = token.into();
        if token.trim().is_empty() {
            return Err(AdminError::Config {
                var: TOKEN_VAR,
                reason: "the admin token is empty; every request must carry one".into(),
            });
        }
        Ok(AdminConfig {
            token: token.into(),
            addr: DEFAULT_ADDR.parse().expect("a valid default address"),
            body_limit: DEFAULT_BODY_LIMIT,
        })
    }

    /// Settings from `MESSAGING_ADMIN_TOKEN` (required) and `MESSAGING_ADMIN_ADDR`.
    ///
    /// # Errors
    /// [`AdminError::Config`] naming the variable that is missing or malformed.
    pub fn from_env() -> Result<Self, AdminError> {
        AdminConfig::from_vars(|var| std::env::var(var).ok())
    }

    /// [`AdminConfig::from_env`] over any lookup (for tests and other config sources).
    ///
    /// # Errors
    /// As [`AdminConfig::from_env`].
    pub fn from_vars(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, AdminError> {
        let token = lookup(TOKEN_VAR).ok_or(AdminError::Config {
            var: TOKEN_VAR,
            reason: "not set; the admin API refuses to run without a token".into(),
        })?;
        let mut config = AdminConfig::new(token)?;
        if let Some(addr) = lookup(ADDR_VAR).filter(|a| !a.trim().is_empty()) {
            config.addr = addr.trim().parse().map_err(|err| AdminError::Config {
                var: ADDR_VAR,
                reason: format!("{addr:?} is not an address like 127.0.0.1:7061: {err}"),
            })?;
        }
        Ok(config)
    }
}

/// Install the `metrics` facade's global recorder as a Prometheus one and return the handle
/// that renders it (give it to [`router`]).
///
/// # Errors
/// [`AdminError::Prometheus`] when a recorder is already installed.
pub fn install_prometheus() -> Result<PrometheusHandle, AdminError> {
    PrometheusBuilder::new()
        .install_recorder()
        .map_err(|err| AdminError::Prometheus(err.to_string()))
}

/// The admin API over `services`, to mount in an axum app or run with [`serve`].
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use std::sync::Arc;
///
/// use helix_messaging_admin::{AdminConfig, Services, router};
/// use helix_messaging_core::Broker;
/// use helix_messaging_core::hub::{Hub, HubConfig};
/// use helix_messaging_memory::MemoryBroker;
///
/// let broker: Arc<dyn Broker> = Arc::new(MemoryBroker::new());
/// let hub = Hub::new(HubConfig::default(), broker.clone(), broker, None).await?;
/// let app = router(&AdminConfig::new("s3cret")?, Services::new(hub));
/// // Mounted in the application's own server (or run on its own with `serve`):
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
/// let addr = listener.local_addr()?;
/// tokio::spawn(async move { axum::serve(listener, app).await });
/// let client = reqwest::Client::builder()
///     .timeout(std::time::Duration::from_secs(10))
///     .build()?;
/// let url = format!("http://{addr}/v1/messaging/health");
/// let health = client.get(&url).bearer_auth("s3cret").send().await?;
/// assert_eq!(health.status(), 200);
/// let anonymous = client.get(&url).send().await?;
/// assert_eq!(anonymous.status(), 401);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// # }).unwrap();
/// ```
pub fn router(config: &AdminConfig, services: Services) -> Router {
    let state = AppState {
        services,
        token: config.token.clone(),
    };
    Router::new()
        .route("/v1/messaging/health", get(health))
        .route("/v1/messaging/metrics", get(metrics_text))
        .route(
            "/v1/messaging/openapi.json",
            get(|| async { Json(openapi::document()) }),
        )
        .route("/v1/messaging/dlq", get(dlq::list))
        .route("/v1/messaging/dlq/groups", get(dlq::groups))
        .route(
            "/v1/messaging/dlq/redrives",
            post(dlq::start_redrive).get(dlq::list_redrives),
        )
        .route(
            "/v1/messaging/dlq/redrives/{id}",
            get(dlq::show_redrive).delete(dlq::cancel_redrive),
        )
        .route(
            "/v1/messaging/dlq/{id}",
            get(dlq::show).delete(dlq::discard),
        )
        .route("/v1/messaging/dlq/{id}/reprocess", post(dlq::reprocess))
        .route("/v1/messaging/dlq/{id}/discard", delete(dlq::discard))
        .route("/v1/messaging/spools", get(spool::stats))
        .route("/v1/messaging/spools/{side}/refused", get(spool::refused))
        .route(
            "/v1/messaging/spools/{side}/refused/{seq}",
            delete(spool::discard),
        )
        .route(
            "/v1/messaging/spools/{side}/refused/{seq}/retry",
            post(spool::retry),
        )
        .route(
            "/v1/messaging/replay",
            post(replay::start).get(replay::list),
        )
        .route(
            "/v1/messaging/replay/{id}",
            get(replay::show).delete(replay::cancel),
        )
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such endpoint") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed on this endpoint",
            )
        })
        .layer(DefaultBodyLimit::max(config.body_limit))
        .layer(middleware::from_fn_with_state(state.clone(), authorize))
        .with_state(state)
}

/// Serve [`router`] on `config.addr` until `shutdown` completes, then finish the requests
/// under way.
///
/// # Errors
/// [`AdminError::Bind`] when the address cannot be listened on, [`AdminError::Serve`] when
/// the server fails.
pub async fn serve(
    config: AdminConfig,
    services: Services,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AdminError> {
    let listener = tokio::net::TcpListener::bind(config.addr)
        .await
        .map_err(|source| AdminError::Bind {
            addr: config.addr,
            source,
        })?;
    tracing::info!(addr = %config.addr, "admin API listening");
    axum::serve(listener, router(&config, services))
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}

async fn authorize(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match presented {
        None => {
            ApiError::new(StatusCode::UNAUTHORIZED, "a bearer token is required").into_response()
        }
        // Compared in constant time, so the answer's timing does not leak the token.
        Some(token) if bool::from(token.as_bytes().ct_eq(state.token.as_bytes())) => {
            next.run(request).await
        }
        Some(_) => {
            ApiError::new(StatusCode::UNAUTHORIZED, "the bearer token is wrong").into_response()
        }
    }
}

fn status_name(status: HealthStatus) -> &'static str {
    match status {
        HealthStatus::Healthy => "healthy",
        HealthStatus::Degraded => "degraded",
        HealthStatus::Unhealthy => "unhealthy",
    }
}

fn side_health(health: Health) -> api::SideHealth {
    api::SideHealth {
        status: status_name(health.status).to_owned(),
        detail: health.detail,
    }
}

async fn health(State(state): State<AppState>) -> Response {
    let health = state.services.hub.health_check().await;
    let code = match health.status {
        HealthStatus::Unhealthy => StatusCode::SERVICE_UNAVAILABLE,
        HealthStatus::Healthy | HealthStatus::Degraded => StatusCode::OK,
    };
    let body = api::Health {
        status: status_name(health.status).to_owned(),
        tasks: side_health(health.tasks),
        events: side_health(health.events),
    };
    (code, Json(body)).into_response()
}

async fn metrics_text(State(state): State<AppState>) -> Response {
    match &state.services.prometheus {
        Some(handle) => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            )],
            handle.render(),
        )
            .into_response(),
        None => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no Prometheus recorder is installed (see install_prometheus)",
        )
        .into_response(),
    }
}
