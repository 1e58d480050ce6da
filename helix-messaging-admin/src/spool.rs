//! The fallback spool endpoints: what each side's spool holds, and the messages the broker
//! refused when they were forwarded (set aside, never dropped): list them, send one again,
//! or discard it.

use std::borrow::Cow;
use std::collections::HashMap;

use axum::Json;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use helix_messaging_core::fallback::{FallbackBroker, RefusedMessage, SpoolStats};

use crate::api;
use crate::dlq::{limit_param, message_json, time};
use crate::json::{ApiError, PathParam};
use crate::services::AppState;

/// The hub's sides, as the paths name them.
const SIDES: [&str; 2] = ["tasks", "events"];

/// The fallback of `side`: 404 for a side that does not exist or has no spool.
fn fallback<'a>(state: &'a AppState, side: &str) -> Result<&'a FallbackBroker, ApiError> {
    let hub = &state.services.hub;
    let fallback = match side {
        "tasks" => hub.task_fallback(),
        "events" => hub.event_fallback(),
        other => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!("no hub side {other:?}; the sides are {SIDES:?}"),
            ));
        }
    };
    fallback.ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("the {side} side has no fallback spool (MESSAGING_FALLBACK_ENABLED is off)"),
        )
    })
}

/// A spool that could not be read or written: 503, the store is what is down.
fn unreadable(err: helix_messaging_core::Error) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("the fallback spool: {err}"),
    )
}

fn seq_of(seq: &str) -> Result<i64, ApiError> {
    seq.parse()
        .map_err(|_| ApiError::bad_request(format!("seq: {seq:?} is not a whole number")))
}

fn stats_json(stats: &SpoolStats) -> api::SpoolStats {
    api::SpoolStats {
        depth: stats.depth,
        refused: stats.refused,
        bytes: stats.bytes,
        oldest: stats.oldest.map(time),
    }
}

fn refused_json(refused: &RefusedMessage) -> api::Refused<'_> {
    api::Refused {
        seq: refused.seq,
        topic: Cow::Borrowed(&refused.topic),
        reason: Cow::Borrowed(&refused.reason),
        refused_at: time(refused.refused_at),
        message_id: Cow::Borrowed(refused.message.id()),
        message: message_json(&refused.message),
    }
}

/// `GET /v1/messaging/spools`: each side's spool figures (`null` for a side without one).
pub(crate) async fn stats(State(state): State<AppState>) -> Result<Response, ApiError> {
    let stats = state.services.hub.spool_stats().await.map_err(unreadable)?;
    Ok(Json(api::Spools {
        tasks: stats.tasks.as_ref().map(stats_json),
        events: stats.events.as_ref().map(stats_json),
    })
    .into_response())
}

/// `GET /v1/messaging/spools/{side}/refused?limit=50`: the messages set aside, oldest first.
pub(crate) async fn refused(
    State(state): State<AppState>,
    PathParam(side): PathParam<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let fallback = fallback(&state, &side)?;
    let limit = limit_param(&query)?;
    let refused = fallback.refused(limit).await.map_err(unreadable)?;
    Ok(Json(api::RefusedList {
        count: refused.len(),
        refused: refused.iter().map(refused_json).collect(),
    })
    .into_response())
}

/// `POST /v1/messaging/spools/{side}/refused/{seq}/retry`: back to the end of the spool, to
/// be forwarded again.
pub(crate) async fn retry(
    State(state): State<AppState>,
    PathParam((side, seq)): PathParam<(String, String)>,
) -> Result<Response, ApiError> {
    let fallback = fallback(&state, &side)?;
    let seq = seq_of(&seq)?;
    let found = fallback.retry_refused(seq).await.map_err(unreadable)?;
    released(found, seq, "retried")
}

/// `DELETE /v1/messaging/spools/{side}/refused/{seq}`: dropped for good.
pub(crate) async fn discard(
    State(state): State<AppState>,
    PathParam((side, seq)): PathParam<(String, String)>,
) -> Result<Response, ApiError> {
    let fallback = fallback(&state, &side)?;
    let seq = seq_of(&seq)?;
    let found = fallback.discard_refused(seq).await.map_err(unreadable)?;
    released(found, seq, "discarded")
}

fn released(found: bool, seq: i64, status: &str) -> Result<Response, ApiError> {
    if !found {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no refused message with seq {seq} in this spool"),
        ));
    }
    Ok(Json(api::SpoolAck {
        seq,
        status: status.to_owned(),
    })
    .into_response())
}
