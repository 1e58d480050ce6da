//! The replay endpoints: start, list, show, cancel.

use std::time::{Duration, SystemTime};

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use helix_messaging_core::replay::{
    ReplayFilter, ReplayHandler, ReplayOptions, ReplayProgress, ReplayRequest,
};

use crate::api;
use crate::dlq::{parse_time, time};
use crate::json::{ApiError, AuditDetail, JsonBody, PathParam};
use crate::services::AppState;

fn handler(state: &AppState) -> Result<&ReplayHandler, ApiError> {
    state.services.replay.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no replay handler is configured for this admin API",
        )
    })
}

/// A replay's progress as the API shows it (times in RFC 3339, `percentage` of the window
/// reached).
fn progress_json(p: &ReplayProgress) -> api::Replay {
    api::Replay {
        id: p.id.clone(),
        status: p.status.as_str().to_owned(),
        topic: p.topic.clone(),
        target_topic: p.target_topic.clone(),
        dry_run: p.dry_run,
        total: p.total,
        replayed: p.replayed,
        skipped: p.skipped,
        failed: p.failed,
        filtered: p.filtered,
        duplicates: p.duplicates,
        by_type: p.by_type.clone(),
        skipped_by_type: p.skipped_by_type.clone(),
        percentage: p.percentage(),
        reached: p.reached.map(time),
        from_time: time(p.from_time),
        to_time: time(p.to_time),
        started_at: time(p.started_at),
        finished_at: p.finished_at.map(time),
        last_error: p.last_error.clone(),
        resumes: p.resumes,
    }
}

/// `POST /v1/messaging/replay`: 202 with the replay's first progress.
pub(crate) async fn start(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<api::ReplayBody>,
) -> Result<Response, ApiError> {
    let replays = handler(&state)?;
    let from: SystemTime = parse_time("from_time", &body.from_time)?;
    let to: SystemTime = parse_time("to_time", &body.to_time)?;
    let defaults = ReplayOptions::default();
    let mut request = ReplayRequest::new(body.topic, from, to)
        .with_filter(ReplayFilter {
            message_types: body.filter.message_types,
            headers: body.filter.headers.into_iter().collect(),
        })
        .with_options(ReplayOptions {
            batch_size: body.options.batch_size.unwrap_or(defaults.batch_size),
            delay_between: body
                .options
                .delay_between_ms
                .map_or(defaults.delay_between, Duration::from_millis),
            dry_run: body.options.dry_run,
            skip_duplicates: body.options.skip_duplicates,
        });
    if let Some(id) = body.id {
        request = request.with_id(id);
    }
    if let Some(target) = body.target_topic {
        request = request.with_target_topic(target);
    }
    let progress = replays.start_replay(request).await?;
    let mut response = (StatusCode::ACCEPTED, Json(progress_json(&progress))).into_response();
    response
        .extensions_mut()
        .insert(AuditDetail(format!("replay {}", progress.id)));
    Ok(response)
}

/// `GET /v1/messaging/replay`: every replay, newest first.
pub(crate) async fn list(State(state): State<AppState>) -> Result<Response, ApiError> {
    let all = handler(&state)?.list_replays().await?;
    Ok(Json(api::Replays {
        count: all.len(),
        replays: all.iter().map(progress_json).collect(),
    })
    .into_response())
}

/// `GET /v1/messaging/replay/{id}`.
pub(crate) async fn show(
    State(state): State<AppState>,
    PathParam(id): PathParam<String>,
) -> Result<Response, ApiError> {
    let progress = handler(&state)?.replay_progress(&id).await?;
    Ok(Json(progress_json(&progress)).into_response())
}

/// `DELETE /v1/messaging/replay/{id}`: asks it to stop (a finished replay stays as it
/// finished); answers with its progress.
pub(crate) async fn cancel(
    State(state): State<AppState>,
    PathParam(id): PathParam<String>,
) -> Result<Response, ApiError> {
    let replays = handler(&state)?;
    replays.cancel_replay(&id).await?;
    let progress = replays.replay_progress(&id).await?;
    Ok(Json(progress_json(&progress)).into_response())
}
