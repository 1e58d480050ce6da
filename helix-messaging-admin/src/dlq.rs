//! The DLQ endpoints: list, show, reprocess, discard, failure groups and bulk redrive jobs.

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
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::json::{ApiError, JsonBody, PathParam};
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

/// One entry as JSON. The payload is shown as text when it is UTF-8 (`payload_size` always
/// gives its length in bytes).
pub(crate) fn entry_json(entry: &StoredDeadLetter) -> EntryJson<'_> {
    let letter = &entry.letter;
    let message = &letter.message;
    EntryJson {
        id: &letter.id,
        original_id: message.id(),
        original_topic: &letter.original_topic,
        group: letter.group.as_deref(),
        reason: letter.reason.as_str(),
        error: &letter.error,
        attempts: letter.attempts,
        redrives: letter.redrives,
        first_failure_at: time(letter.first_failure_at),
        last_failure_at: time(letter.last_failure_at),
        status: entry.status.as_str(),
        retries: entry.retries,
        next_attempt_at: entry.next_attempt_at.map(time),
        last_error: entry.last_error.as_deref(),
        discard_reason: entry.discard_reason.as_deref(),
        stored_at: time(entry.stored_at),
        claimed_until: entry.claimed_until.map(time),
        message: message_json(message),
    }
}

/// A message's key, headers and payload as JSON (the payload as text when it is UTF-8).
pub(crate) fn message_json(message: &helix_messaging_core::Message) -> MessageJson<'_> {
    MessageJson {
        key: message.key(),
        headers: message.headers(),
        payload: std::str::from_utf8(message.payload()).ok(),
        payload_size: message.payload().len(),
    }
}

/// A DLQ entry as the API shows it, serialized straight from the stored entry (a listing of
/// 1,000 entries builds no intermediate JSON tree).
#[derive(Serialize)]
pub(crate) struct EntryJson<'a> {
    id: &'a str,
    original_id: &'a str,
    original_topic: &'a str,
    group: Option<&'a str>,
    reason: &'a str,
    error: &'a str,
    attempts: u32,
    redrives: u32,
    first_failure_at: String,
    last_failure_at: String,
    status: &'a str,
    retries: u32,
    next_attempt_at: Option<String>,
    last_error: Option<&'a str>,
    discard_reason: Option<&'a str>,
    stored_at: String,
    claimed_until: Option<String>,
    message: MessageJson<'a>,
}

#[derive(Serialize)]
pub(crate) struct MessageJson<'a> {
    key: Option<&'a str>,
    headers: &'a std::collections::BTreeMap<String, String>,
    payload: Option<&'a str>,
    payload_size: usize,
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
    #[derive(Serialize)]
    struct PageJson<'a> {
        count: u64,
        limit: usize,
        offset: usize,
        messages: Vec<EntryJson<'a>>,
    }
    Ok(Json(PageJson {
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

/// The optional body of a reprocess request.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReprocessBody {
    /// Publish there instead of the topic it failed on.
    target_topic: Option<String>,
}

/// The optional body of a discard request.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DiscardBody {
    /// Why (kept with the entry).
    reason: Option<String>,
}

/// `POST /v1/messaging/dlq/{id}/reprocess`, body `{"target_topic": …}` or none.
pub(crate) async fn reprocess(
    State(state): State<AppState>,
    PathParam(id): PathParam<String>,
    body: Option<crate::json::JsonBody<ReprocessBody>>,
) -> Result<Response, ApiError> {
    let body = body.map(|b| b.0).unwrap_or_default();
    processor(&state)?
        .reprocess(&id, body.target_topic.as_deref())
        .await?;
    Ok(Json(json!({ "id": id, "status": "reprocessed" })).into_response())
}

/// `DELETE /v1/messaging/dlq/{id}/discard` (and HelixAgent's `DELETE /v1/messaging/dlq/{id}`),
/// body `{"reason": …}` or none.
pub(crate) async fn discard(
    State(state): State<AppState>,
    PathParam(id): PathParam<String>,
    body: Option<crate::json::JsonBody<DiscardBody>>,
) -> Result<Response, ApiError> {
    let body = body.map(|b| b.0).unwrap_or_default();
    let reason = body
        .reason
        .unwrap_or_else(|| "discarded through the admin API".into());
    processor(&state)?.discard(&id, &reason).await?;
    Ok(Json(json!({ "id": id, "status": "discarded" })).into_response())
}

fn group_json(group: &FailureGroup) -> Value {
    json!({
        "reason": group.reason.as_str(),
        "topic": group.topic,
        "count": group.count,
        "oldest": time(group.oldest),
        "newest": time(group.newest),
        "sample_error": group.sample_error,
    })
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
    Ok(Json(json!({
        "count": groups.len(),
        "groups": groups.iter().map(group_json).collect::<Vec<_>>(),
    }))
    .into_response())
}

pub(crate) fn redrive_json(progress: &RedriveProgress) -> Value {
    json!({
        "id": progress.id,
        "status": progress.status.as_str(),
        "total": progress.total,
        "redriven": progress.redriven,
        "failed": progress.failed,
        "skipped": progress.skipped,
        "percentage": progress.percentage(),
        "started_at": time(progress.started_at),
        "finished_at": progress.finished_at.map(time),
        "last_error": progress.last_error,
    })
}

/// The body of `POST /v1/messaging/dlq/redrives`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RedriveBody {
    /// Which entries: the list endpoint's filter keys (`topic`, `reason`, `type`, `status`,
    /// `original_id`, `from`, `to`). Empty only with `all`.
    #[serde(default)]
    filter: HashMap<String, String>,
    /// Re-drive every entry: required when `filter` is empty, refused with one.
    #[serde(default)]
    all: bool,
    /// Answer with what would be re-driven (its count and failure groups), starting nothing.
    #[serde(default)]
    dry_run: bool,
    /// The job's id (a new UUID when absent); an id in use is a 409.
    id: Option<String>,
    /// Publish there instead of each message's original topic.
    target_topic: Option<String>,
    /// Most messages per second ([`DEFAULT_REDRIVE_RATE`] when absent).
    rate_per_second: Option<f64>,
    /// Re-drive this many first, watch them, then the rest.
    #[serde(default, deserialize_with = "crate::json::optional_object")]
    canary: Option<CanaryBody>,
    /// Messages per published batch.
    batch_size: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CanaryBody {
    count: usize,
    watch_ms: u64,
}

/// The request a redrive body asks for; a 400 for a body that is not deliberate about what
/// it selects (no filter without `all`, not both).
fn redrive_request(body: RedriveBody) -> Result<RedriveRequest, ApiError> {
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
        filter: filter_from(&body.filter)?,
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
    body: Option<JsonBody<RedriveBody>>,
) -> Result<Response, ApiError> {
    let body = body.map(|b| b.0).unwrap_or_default();
    let dry_run = body.dry_run;
    let request = redrive_request(body)?;
    let dlq = processor(&state)?;
    if dry_run {
        let preview = dlq.preview_redrive(&request).await?;
        return Ok(Json(json!({
            "dry_run": true,
            "total": preview.total,
            "count": preview.groups.len(),
            "groups": preview.groups.iter().map(group_json).collect::<Vec<_>>(),
        }))
        .into_response());
    }
    let started = dlq.start_redrive(request).await?;
    // Read again: a small job may be further along than when it started (or, finished and
    // pruned already, only as it started).
    let progress = dlq.redrive_progress(&started.id).unwrap_or(started);
    Ok((StatusCode::ACCEPTED, Json(redrive_json(&progress))).into_response())
}

/// `GET /v1/messaging/dlq/redrives`: every job, newest first.
pub(crate) async fn list_redrives(State(state): State<AppState>) -> Result<Response, ApiError> {
    let jobs = processor(&state)?.list_redrives();
    Ok(Json(json!({
        "count": jobs.len(),
        "redrives": jobs.iter().map(redrive_json).collect::<Vec<_>>(),
    }))
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
