//! The audit trail: one structured `tracing` event at info, target
//! `helix_messaging_admin::audit`, for every authenticated request that would change state
//! (reprocess, discard, redrive start or cancel, replay start or cancel, spool retry or
//! discard), whatever its outcome — also when it is cut short by its timeout or a panic.

use std::net::SocketAddr;

use axum::body::{Body, to_bytes};
use axum::extract::{ConnectInfo, MatchedPath, RawPathParams, Request, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use crate::json::{ApiError, AuditDetail};
use crate::services::AppState;
use crate::tokens::{Scope, reads_only};

/// The `tracing` target of audit events, to route them to a log of their own.
pub const AUDIT_TARGET: &str = "helix_messaging_admin::audit";
/// The header carrying a request's id: the client's if it sent a usable one, else a fresh
/// UUID; it is in every answer and in the request's audit event.
pub const REQUEST_ID_HEADER: &str = "x-request-id";
/// Longest request body quoted in an audit event; the rest is elided.
const QUOTED_BODY: usize = 1024;

/// The action an endpoint performs, by method and route.
fn action(method: &str, route: Option<&str>) -> String {
    let named = match (method, route.unwrap_or_default()) {
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

/// One request's audit event, written once: by [`finish`](AuditEntry::finish) with the
/// answer, or, when the request is dropped before it answers (its timeout, a panic), as
/// `failed` when this is dropped.
pub(crate) struct AuditEntry {
    request_id: String,
    client: Option<String>,
    scope: Scope,
    action: String,
    ids: String,
    request: Option<String>,
    written: bool,
}

impl AuditEntry {
    /// The entry of the request whose head is `parts`, made with `scope`.
    pub(crate) async fn for_request(parts: &mut Parts, scope: Scope) -> AuditEntry {
        let route = parts
            .extensions
            .get::<MatchedPath>()
            .map(|p| p.as_str().to_owned());
        let ids = match axum::RequestPartsExt::extract::<RawPathParams>(parts).await {
            Ok(params) => params
                .iter()
                .map(|(name, value)| format!("{name}={value}"))
                .collect::<Vec<_>>()
                .join(","),
            Err(_) => String::new(),
        };
        AuditEntry {
            request_id: parts
                .headers
                .get(REQUEST_ID_HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned(),
            client: parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| c.0.to_string()),
            scope,
            action: action(parts.method.as_str(), route.as_deref()),
            ids,
            request: None,
            written: false,
        }
    }

    fn write(&mut self, status: Option<u16>, outcome: &str, detail: Option<&str>) {
        self.written = true;
        tracing::info!(
            target: AUDIT_TARGET,
            request_id = self.request_id,
            client = self.client,
            scope = self.scope.as_str(),
            action = self.action,
            ids = self.ids,
            request = self.request,
            status,
            outcome,
            detail,
            "admin API action"
        );
    }

    /// Write the event with `response`'s status and [`AuditDetail`].
    pub(crate) fn finish(mut self, response: &Response) {
        let status = response.status();
        let outcome = if status.is_success() {
            "done"
        } else if status.is_client_error() {
            "refused"
        } else {
            "failed"
        };
        let detail = response
            .extensions()
            .get::<AuditDetail>()
            .map(|d| quoted(&d.0));
        self.write(Some(status.as_u16()), outcome, detail.as_deref());
    }
}

impl Drop for AuditEntry {
    fn drop(&mut self) {
        if !self.written {
            self.write(
                None,
                "failed",
                Some("cut short before it answered (its timeout, or a panic); what it did before is not known here"),
            );
        }
    }
}

/// The audit layer, inside authentication: only requests with a valid token reach it.
pub(crate) async fn audit(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let scope = request.extensions().get::<Scope>().copied();
    let (false, Some(scope)) = (reads_only(request.method()), scope) else {
        return next.run(request).await;
    };
    let (mut parts, body) = request.into_parts();
    let mut entry = AuditEntry::for_request(&mut parts, scope).await;
    // Read whole (within the body limit) so it can be quoted, then handed on unchanged.
    let Ok(bytes) = to_bytes(body, state.body_limit).await else {
        let response = ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the request body is over {} bytes, or could not be read",
                state.body_limit
            ),
        )
        .into_response();
        entry.finish(&response);
        return response;
    };
    entry.request = quote_body(&bytes);
    let response = next
        .run(Request::from_parts(parts, Body::from(bytes)))
        .await;
    entry.finish(&response);
    response
}
