//! The router: every endpoint, behind its token, audit trail and limits, and the root
//! probes in front of them.

use std::sync::Arc;

use axum::error_handling::HandleErrorLayer;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{BoxError, Json, Router};
use helix_messaging_core::observe::LATENCY_BUCKETS;
use helix_messaging_core::{Health, HealthStatus, panic_message};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tower::ServiceBuilder;
use tower::limit::GlobalConcurrencyLimitLayer;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};

use crate::audit::{REQUEST_ID_HEADER, audit};
use crate::auth::authorize;
use crate::config::{AdminConfig, AdminError};
use crate::json::ApiError;
use crate::services::{AppState, Services};
use crate::tokens::Tokens;
use crate::{api, dlq, openapi, probes, queues, replay, spool};

/// Install the `metrics` facade's global recorder as a Prometheus one and return the handle
/// that renders it (give it to [`router`]).
///
/// Every histogram whose name ends in `_seconds` (the project's latency histograms) is
/// rendered as a Prometheus histogram with the bounds of [`LATENCY_BUCKETS`]: without
/// buckets the exporter renders a summary, whose quantiles cannot be aggregated across
/// instances and which `histogram_quantile` cannot read.
///
/// # Errors
/// [`AdminError::Prometheus`] when a recorder is already installed.
pub fn install_prometheus() -> Result<PrometheusHandle, AdminError> {
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), LATENCY_BUCKETS)
        .map_err(|err| AdminError::Prometheus(err.to_string()))?
        .install_recorder()
        .map_err(|err| AdminError::Prometheus(err.to_string()))
}

/// The admin API over `services`, to mount in an axum app or run with [`serve`](crate::serve).
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
/// let app = router(&AdminConfig::new("s3cret-admin-token")?, Services::new(hub));
/// // Mounted in the application's own server (or run on its own with `serve`):
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
/// let addr = listener.local_addr()?;
/// tokio::spawn(async move { axum::serve(listener, app).await });
/// let client = reqwest::Client::builder()
///     .timeout(std::time::Duration::from_secs(10))
///     .build()?;
/// let url = format!("http://{addr}/v1/messaging/health");
/// let health = client.get(&url).bearer_auth("s3cret-admin-token").send().await?;
/// assert_eq!(health.status(), 200);
/// let anonymous = client.get(&url).send().await?;
/// assert_eq!(anonymous.status(), 401);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// # }).unwrap();
/// ```
pub fn router(config: &AdminConfig, services: Services) -> Router {
    let state = AppState {
        services,
        tokens: Arc::new(Tokens::new(&config.token, config.read_token.as_deref())),
        body_limit: config.body_limit,
        probe: Arc::default(),
    };
    let api = Router::new()
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
        .route("/v1/messaging/queues", get(queues::list))
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
        // Audit inside authentication: no body is read before the token is checked.
        .layer(middleware::from_fn_with_state(state.clone(), audit))
        .layer(middleware::from_fn_with_state(state.clone(), authorize))
        // Outermost: a flood is turned away before any other work.
        .layer(
            ServiceBuilder::new()
                .layer(HandleErrorLayer::new(overloaded_or_late))
                .load_shed()
                .layer(GlobalConcurrencyLimitLayer::new(
                    config.max_concurrent_requests.max(1),
                ))
                .timeout(config.request_timeout),
        );
    // The probes stand outside the token and the concurrency limit: a busy API must not
    // fail its load balancer's checks.
    Router::new()
        .route("/health", get(probes::health))
        .route("/ready", get(probes::ready))
        .merge(api)
        // A bug in a handler answers 500 and costs that request alone, not the connection.
        .layer(CatchPanicLayer::custom(panic_answer))
        .layer(PropagateRequestIdLayer::new(HeaderName::from_static(
            REQUEST_ID_HEADER,
        )))
        .layer(SetRequestIdLayer::new(
            HeaderName::from_static(REQUEST_ID_HEADER),
            MakeRequestUuid,
        ))
        .layer(middleware::map_request(drop_unusable_request_id))
        .with_state(state)
}

/// Longest request id taken from a client.
const MAX_CLIENT_REQUEST_ID: usize = 128;

/// A client's `X-Request-Id` is kept when it is at most [`MAX_CLIENT_REQUEST_ID`] letters,
/// digits, `-`, `_`, `.` or `:` (what proxies and tracing systems send); anything else is
/// dropped, and the request gets a fresh UUID, so no client writes what it likes into the
/// audit trail.
async fn drop_unusable_request_id(mut request: Request) -> Request {
    let usable = request.headers().get(REQUEST_ID_HEADER).is_none_or(|id| {
        id.len() <= MAX_CLIENT_REQUEST_ID
            && !id.is_empty()
            && id
                .as_bytes()
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(b))
    });
    if !usable {
        request.headers_mut().remove(REQUEST_ID_HEADER);
    }
    request
}

/// The answer to a request whose handler panicked: the panic's message, logged too.
fn panic_answer(panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let message = panic_message(&*panic);
    tracing::error!(panic = %message, "admin API: a request handler panicked");
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        format!("the request failed inside the server: {message}"),
    )
    .into_response()
}

/// The answer to a request the limits stopped: too many under way, or too slow.
async fn overloaded_or_late(err: BoxError) -> Response {
    if err.is::<tower::timeout::error::Elapsed>() {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the request took longer than the server's request timeout",
        )
        .into_response()
    } else if err.is::<tower::load_shed::error::Overloaded>() {
        let mut response = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many requests under way; try again shortly",
        )
        .into_response();
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        response
    } else {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, err.to_string()).into_response()
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
