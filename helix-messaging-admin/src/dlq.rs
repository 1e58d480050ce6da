//! The DLQ endpoints: list, show, reprocess, discard, failure groups and bulk redrive jobs.

use std::borrow::Cow;
use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use axum::Json;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, SecondsFormat, Utc};
use helix_messaging_core::dlq::{
    CanaryConfig, DEFAULT_REDRIVE_RATE, DeadLetterFilter, DeadLetterReason, EntryStatus,
    FailureGroup, Processor, RedriveProgress, RedriveRequest, StoredDeadLetter,
};

use crate::api;
use crate::json::{ApiError, AuditDetail, JsonBody, PathParam};
use crate::services::AppState;

/// Entries per page unless `limit` says otherwise.
const DEFAULT_LIMIT: usize = 50;
/// The largest page: a bigger listing is paged with `offset`.
const MAX_LIMIT: usize = 1000;

fn processor(state: &AppState) -> Result<&Processor, ApiError> {
    state.services.dlq.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no DLQ processor is configured for this admin API",
        )
    })
}

pub(crate) fn time(t: SystemTime) -> String {
    DateTime::<Utc>::from(t).to_rfc3339_opts(SecondsFormat::Millis, true)
}

pub(crate) fn parse_time(var: &str, value: &str) -> Result<SystemTime, ApiError> {
    DateTime::parse_from_rfc3339(value)
        .map(SystemTime::from)
        .map_err(|err| {
            ApiError::bad_request(format!(
                "{var}: {value:?} is not an RFC 3339 time such as 2026-01-02T03:04:05Z: {err}"
            ))
        })
}

fn number(var: &str, value: Option<&String>, default: usize) -> Result<usize, ApiError> {
    match value {
        None => Ok(default),
        Some(v) => v
            .parse()
            .map_err(|_| ApiError::bad_request(format!("{var}: {v:?} is not a whole number"))),
    }
}

/// One entry as the API shows it, borrowed from the stored entry (a listing of 1,000
/// entries copies no payload). The payload is shown as text when it is UTF-8
/// (`payload_size` always gives its length in bytes).
pub(crate) fn entry_json(entry: &StoredDeadLetter) -> api::Entry<'_> {
    let letter = &entry.letter;
    let message = &letter.message;
    api::Entry {
        id: Cow::Borrowed(&letter.id),
        original_id: Cow::Borrowed(message.id()),
        original_topic: Cow::Borrowed(&letter.original_topic),
        group: letter.group.as_deref().map(Cow::Borrowed),
        reason: Cow::Borrowed(letter.reason.as_str()),
        error: Cow::Borrowed(&letter.error),
        attempts: letter.attempts,
        redrives: letter.redrives,
        first_failure_at: time(letter.first_failure_at),
        last_failure_at: time(letter.last_failure_at),
        status: Cow::Borrowed(entry.status.as_str()),
        retries: entry.retries,
        next_attempt_at: entry.next_attempt_at.map(time),
        last_error: entry.last_error.as_deref().map(Cow::Borrowed),
        discard_reason: entry.discard_reason.as_deref().map(Cow::Borrowed),
        stored_at: time(entry.stored_at),
        claimed_until: entry.claimed_until.map(time),
        message: message_json(message),
    }
}

/// A message's key, headers and payload as the API shows them (the payload as text when it
/// is UTF-8).
pub(crate) fn message_json(message: &helix_messaging_core::Message) -> api::EntryMessage<'_> {
    api::EntryMessage {
        key: message.key().map(Cow::Borrowed),
        headers: Cow::Borrowed(message.headers()),
        payload: std::str::from_utf8(message.payload())
            .ok()
            .map(Cow::Borrowed),
        payload_size: message.payload().len(),
    }
}

/// The keys a DLQ filter is read from.
const FILTER_KEYS: [&str; 7] = [
    "topic",
    "reason",
    "type",
    "status",
    "original_id",
    "from",
    "to",
];

/// A [`DeadLetterFilter`] from `topic`, `reason` (as written in headers, or with underscores),
/// `type`, `status`, `original_id`, `from` and `to` (RFC 3339); other keys are ignored.
/// Without a `status`, discarded entries are left out: a listing's `count` is then the DLQ
/// depth the `messaging_dlq_messages_total` gauge shows (`status=discarded` lists them).
fn filter_from(query: &HashMap<String, String>) -> Result<DeadLetterFilter, ApiError> {
    let reason = match query.get("reason") {
        None => None,
        Some(r) => Some(
            DeadLetterReason::ALL
                .into_iter()
                // As written in headers ("undecodable payload") or with underscores, which
                // need no escaping in a URL.
                .find(|known| known.as_str() == r || known.as_str().replace(' ', "_") == *r)
                .ok_or_else(|| {
                    let known: Vec<&str> =
                        DeadLetterReason::ALL.iter().map(|k| k.as_str()).collect();
                    ApiError::bad_request(format!("reason: {r:?} is not one of {known:?}"))
                })?,
        ),
    };
    let status = match query.get("status") {
        None => None,
        Some(s) => Some(EntryStatus::parse(s).map_err(ApiError::from)?),
    };
    Ok(DeadLetterFilter {
        topic: query.get("topic").cloned(),
        reason,
        message_type: query.get("type").cloned(),
        status,
        original_id: query.get("original_id").cloned(),
        from: query
            .get("from")
            .map(|v| parse_time("from", v))
            .transpose()?,
        to: query.get("to").map(|v| parse_time("to", v)).transpose()?,
        exclude_discarded: status.is_none(),
    })
}

/// The `limit` query parameter of a listing: 1 to 1000, [`DEFAULT_LIMIT`] when absent.
pub(crate) fn limit_param(query: &HashMap<String, String>) -> Result<usize, ApiError> {
    let limit = number("limit", query.get("limit"), DEFAULT_LIMIT)?;
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::bad_request(format!(
            "limit: {limit} is outside 1..={MAX_LIMIT}"
        )));
    }
    Ok(limit)
}

/// `GET /v1/messaging/dlq?limit&offset&topic&reason&type&status&original_id&from&to`: a
/// page, oldest first (paging with `offset` stays put while new letters arrive at the end),
/// and `count`, every match, read with the page in one consistent read.
pub(crate) async fn list(
    State(state): State<AppState>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let dlq = processor(&state)?;
    let limit = limit_param(&query)?;
    let offset = number("offset", query.get("offset"), 0)?;
    let filter = filter_from(&query)?;
    let page = dlq.list(&filter, limit, offset).await?;
    Ok(Json(api::Page {
        count: page.count,
        limit: page.limit,
        offset: page.offset,
        messages: page.entries.iter().map(entry_json).collect(),
    })
    .into_response())
}

/// `GET /v1/messaging/dlq/{id}`.
pub(crate) async fn show(
    State(state): State<AppState>,
    PathParam(id): PathParam<String>,
) -> Result<Response, ApiError> {
    let entry = processor(&state)?.get(&id).await?;
    Ok(Json(entry_json(&entry)).into_response())
}

/// `POST /v1/messaging/dlq/{id}/reprocess`, body `{"target_topic": …}` or none.
pub(crate) async fn reprocess(
    State(state): State<AppState>,
    PathParam(id): PathParam<String>,
    body: Option<JsonBody<api::ReprocessBody>>,
) -> Result<Response, ApiError> {
    let body = body.map(|b| b.0).unwrap_or_default();
    processor(&state)?
        .reprocess(&id, body.target_topic.as_deref())
        .await?;
    Ok(Json(api::Ack {
        id,
        status: "reprocessed".into(),
    })
    .into_response())
}

/// `DELETE /v1/messaging/dlq/{id}/discard` (and HelixAgent's `DELETE /v1/messaging/dlq/{id}`),
/// body `{"reason": …}` or none.
pub(crate) async fn discard(
    State(state): State<AppState>,
    PathParam(id): PathParam<String>,
    body: Option<JsonBody<api::DiscardBody>>,
) -> Result<Response, ApiError> {
    let body = body.map(|b| b.0).unwrap_or_default();
    let reason = body
        .reason
        .unwrap_or_else(|| "discarded through the admin API".into());
    processor(&state)?.discard(&id, &reason).await?;
    Ok(Json(api::Ack {
        id,
        status: "discarded".into(),
    })
    .into_response())
}

fn group_json(group: &FailureGroup) -> api::Group<'_> {
    api::Group {
        reason: Cow::Borrowed(group.reason.as_str()),
        topic: Cow::Borrowed(&group.topic),
        count: group.count,
        oldest: time(group.oldest),
        newest: time(group.newest),
        sample_error: Cow::Borrowed(&group.sample_error),
    }
}

/// `GET /v1/messaging/dlq/groups?topic&reason&type&status&original_id&from&to`: the entries
/// grouped by reason and topic, largest group first.
pub(crate) async fn groups(
    State(state): State<AppState>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let groups = processor(&state)?
        .failure_groups(&filter_from(&query)?)
        .await?;
    Ok(Json(api::Groups {
        count: groups.len(),
        groups: groups.iter().map(group_json).collect(),
    })
    .into_response())
}

/// A redrive job's progress as the API shows it.
pub(crate) fn redrive_json(progress: &RedriveProgress) -> api::Redrive {
    api::Redrive {
        id: progress.id.clone(),
        status: progress.status.as_str().to_owned(),
        total: progress.total,
        redriven: progress.redriven,
        failed: progress.failed,
        skipped: progress.skipped,
        percentage: progress.percentage(),
        started_at: time(progress.started_at),
        finished_at: progress.finished_at.map(time),
        last_error: progress.last_error.clone(),
    }
}

/// The request a redrive body asks for; a 400 for a body that is not deliberate about what
/// it selects (no filter without `all`, not both).
fn redrive_request(body: api::RedriveBody) -> Result<RedriveRequest, ApiError> {
    if let Some(unknown) = body
        .filter
        .keys()
        .find(|k| !FILTER_KEYS.contains(&k.as_str()))
    {
        return Err(ApiError::bad_request(format!(
            "filter: unknown key {unknown:?}; known keys are {FILTER_KEYS:?}"
        )));
    }
    match (body.filter.is_empty(), body.all) {
        (true, false) => {
            return Err(ApiError::bad_request(
                "filter: empty, which would re-drive the whole DLQ; pass \"all\": true to mean that, or a filter (see \"dry_run\": true to look first)",
            ));
        }
        (false, true) => {
            return Err(ApiError::bad_request(
                "all: true contradicts the filter given; pass one or the other",
            ));
        }
        _ => {}
    }
    if body.batch_size == Some(0) {
        return Err(ApiError::bad_request("batch_size: must be at least 1"));
    }
    let defaults = RedriveRequest::default();
    Ok(RedriveRequest {
        filter: filter_from(&body.filter.into_iter().collect())?,
        target_topic: body.target_topic,
        rate_per_second: Some(body.rate_per_second.unwrap_or(DEFAULT_REDRIVE_RATE)),
        canary: body.canary.map(|c| CanaryConfig {
            count: c.count,
            watch: Duration::from_millis(c.watch_ms),
        }),
        batch_size: body.batch_size.unwrap_or(defaults.batch_size),
        id: body.id,
    })
}

/// `POST /v1/messaging/dlq/redrives`: start a bulk redrive job; 202 with its progress. With
/// `"dry_run": true`, 200 with what it would re-drive (`dry_run`, `total`, and the failure
/// groups as `GET /v1/messaging/dlq/groups` gives them), starting nothing.
pub(crate) async fn start_redrive(
    State(state): State<AppState>,
    body: Option<JsonBody<api::RedriveBody>>,
) -> Result<Response, ApiError> {
    let body = body.map(|b| b.0).unwrap_or_default();
    let dry_run = body.dry_run;
    let request = redrive_request(body)?;
    let dlq = processor(&state)?;
    if dry_run {
        let preview = dlq.preview_redrive(&request).await?;
        return Ok(Json(api::RedrivePreview {
            dry_run: true,
            total: preview.total,
            count: preview.groups.len(),
            groups: preview.groups.iter().map(group_json).collect(),
        })
        .into_response());
    }
    let started = dlq.start_redrive(request).await?;
    // Read again: a small job may be further along than when it started (or, finished and
    // pruned already, only as it started).
    let progress = dlq.redrive_progress(&started.id).unwrap_or(started);
    let mut response = (StatusCode::ACCEPTED, Json(redrive_json(&progress))).into_response();
    response
        .extensions_mut()
        .insert(AuditDetail(format!("job {}", progress.id)));
    Ok(response)
}

/// `GET /v1/messaging/dlq/redrives`: every job, newest first.
pub(crate) async fn list_redrives(State(state): State<AppState>) -> Result<Response, ApiError> {
    let jobs = processor(&state)?.list_redrives();
    Ok(Json(api::Redrives {
        count: jobs.len(),
        redrives: jobs.iter().map(redrive_json).collect(),
    })
    .into_response())
}

/// `GET /v1/messaging/dlq/redrives/{id}`.
pub(crate) async fn show_redrive(
    State(state): State<AppState>,
    PathParam(id): PathParam<String>,
) -> Result<Response, ApiError> {
    let progress = processor(&state)?.redrive_progress(&id)?;
    Ok(Json(redrive_json(&progress)).into_response())
}

/// `DELETE /v1/messaging/dlq/redrives/{id}`: ask the job to stop; its progress.
pub(crate) async fn cancel_redrive(
    State(state): State<AppState>,
    PathParam(id): PathParam<String>,
) -> Result<Response, ApiError> {
    let dlq = processor(&state)?;
    dlq.cancel_redrive(&id)?;
    Ok(Json(redrive_json(&dlq.redrive_progress(&id)?)).into_response())
}
