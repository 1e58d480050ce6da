//! The authentication layer: a request's bearer token and what its scope may do — the admin
//! token everything, the read-only token every `GET`. It runs before anything reads a body,
//! so a client without a token cannot hold a request slot. Failed attempts are logged,
//! rate-limited (the tokens module).

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::audit::AuditEntry;
use crate::json::ApiError;
use crate::services::AppState;
use crate::tokens::{Scope, reads_only};

/// The token of an `Authorization` header's `Bearer` credentials (the scheme in any case,
/// as RFC 9110 has it).
fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim_start())
}

pub(crate) async fn authorize(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    let tokens = &state.tokens;
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer);
    let refuse = |why: &'static str| {
        let client = request
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0);
        tokens.log_failure(client, request.method(), request.uri().path(), why);
        ApiError::new(StatusCode::UNAUTHORIZED, why).into_response()
    };
    let scope = match presented {
        None => return refuse("a bearer token is required"),
        Some(token) => match tokens.scope_of(token) {
            Some(scope) => scope,
            None => return refuse("the bearer token is wrong"),
        },
    };
    if scope == Scope::Read && !reads_only(request.method()) {
        // Refused before its body is read, and audited: somebody tried to change something.
        let (mut parts, _body) = request.into_parts();
        let entry = AuditEntry::for_request(&mut parts, scope).await;
        let response = ApiError::new(
            StatusCode::FORBIDDEN,
            "the read-only token cannot change anything; this needs the admin token",
        )
        .into_response();
        entry.finish(&response);
        return response;
    }
    request.extensions_mut().insert(scope);
    next.run(request).await
}
