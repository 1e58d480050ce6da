//! The audit trail: one structured `tracing` event at info, target
//! `helix_messaging_admin::audit`, for every authenticated request that would change state
//! (reprocess, discard, redrive start or cancel, replay start or cancel, spool retry or
//! discard), whatever its outcome.

use std::net::SocketAddr;

use axum::body::{Body, to_bytes};
use axum::extract::{ConnectInfo, MatchedPath, RawPathParams, Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use crate::auth::Scope;
use crate::json::ApiError;
use crate::services::AppState;

/// The `tracing` target of audit events, to route them to a log of their own.
pub const AUDIT_TARGET: &str = "helix_messaging_admin::audit";
/// The header carrying a request's id: the client's if it sent one, else a fresh UUID; it is
/// in every answer and in the request's audit event.
pub const REQUEST_ID_HEADER: &str = "x-request-id";
/// Longest request body quoted in an audit event; the rest is elided.
const QUOTED_BODY: usize = 1024;
/// Largest answer body read back to quote its outcome (the state-changing endpoints answer
/// with a few hundred bytes).
const ANSWER_LIMIT: usize = 64 * 1024;

/// The action an endpoint performs, by method and route.
fn action(method: &Method, route: Option<&str>) -> String {
    let named = match (method.as_str(), route.unwrap_or_default()) {
        ("POST", "/v1/messaging/dlq/{id}/reprocess") => "dlq.reprocess",
        ("DELETE", "/v1/messaging/dlq/{id}" | "/v1/messaging/dlq/{id}/discard") => "dlq.discard",
        ("POST", "/v1/messaging/dlq/redrives") => "dlq.redrive.start",
        ("DELETE", "/v1/messaging/dlq/redrives/{id}") => "dlq.redrive.cancel",
        ("POST", "/v1/messaging/replay") => "replay.start",
        ("DELETE", "/v1/messaging/replay/{id}") => "replay.cancel",
        ("POST", "/v1/messaging/spools/{side}/refused/{seq}/retry") => "spool.retry",
        ("DELETE", "/v1/messaging/spools/{side}/refused/{seq}") => "spool.discard",
        _ => "",
    };
    if named.is_empty() {
        format!("{method} {}", route.unwrap_or("<no such endpoint>"))
    } else {
        named.to_owned()
    }
}

/// At most [`QUOTED_BODY`] bytes of `text`, cut at a character boundary.
fn quoted(text: &str) -> String {
    if text.len() <= QUOTED_BODY {
        return text.to_owned();
    }
    let mut end = QUOTED_BODY;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes in all)", &text[..end], text.len())
}

/// A body as it is quoted: compact JSON, or what it is when it is not JSON.
fn quote_body(bytes: &[u8]) -> Option<String> {
    if bytes.is_empty() {
        return None;
    }
    Some(match serde_json::from_slice::<Value>(bytes) {
        Ok(value) => quoted(&value.to_string()),
        Err(_) => format!("<{} bytes, not JSON>", bytes.len()),
    })
}

pub(crate) async fn audit(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if matches!(*request.method(), Method::GET | Method::HEAD) {
        return next.run(request).await;
    }
    let method = request.method().clone();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned());
    let client = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.to_string());
    let request_id = request
        .headers()
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let (mut parts, body) = request.into_parts();
    let ids: Vec<String> = match axum::RequestPartsExt::extract::<RawPathParams>(&mut parts).await {
        Ok(params) => params
            .iter()
            .map(|(name, value)| format!("{name}={value}"))
            .collect(),
        Err(_) => Vec::new(),
    };
    // Read whole (within the body limit) so it can be quoted, then handed on unchanged.
    let Ok(bytes) = to_bytes(body, state.body_limit).await else {
        return ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the request body is over {} bytes, or could not be read",
                state.body_limit
            ),
        )
        .into_response();
    };
    let quoted_request = quote_body(&bytes);
    let response = next
        .run(Request::from_parts(parts, Body::from(bytes)))
        .await;
    let Some(scope) = response.extensions().get::<Scope>().copied() else {
        // Not authenticated: the authentication log has it (rate-limited), not the audit.
        return response;
    };
    let status = response.status();
    let (parts, body) = response.into_parts();
    let answer = to_bytes(body, ANSWER_LIMIT).await.unwrap_or_default();
    let answer_json: Option<Value> = serde_json::from_slice(&answer).ok();
    let outcome = if status.is_success() {
        "done"
    } else if status.is_client_error() {
        "refused"
    } else {
        "failed"
    };
    let detail = answer_json.as_ref().and_then(|a| {
        a["error"]["message"]
            .as_str()
            .or_else(|| a["id"].as_str())
            .map(quoted)
    });
    tracing::info!(
        target: AUDIT_TARGET,
        request_id,
        client,
        scope = scope.as_str(),
        action = action(&method, route.as_deref()),
        ids = ids.join(","),
        request = quoted_request,
        status = status.as_u16(),
        outcome,
        detail,
        "admin API action"
    );
    Response::from_parts(parts, Body::from(answer))
}
