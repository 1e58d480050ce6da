//! The OpenAPI 3.0 document of the admin API, served at `GET /v1/messaging/openapi.json`.
//!
//! Written out here rather than derived: the handlers answer with hand-shaped JSON. The
//! admin tests check that every operation it names is routed, and a property-based test
//! (schemathesis, `examples/tests/admin_openapi.rs`) checks the running server's answers
//! against it, so the two cannot drift apart unnoticed.

use helix_messaging_core::dlq::{
    DEFAULT_REDRIVE_RATE, MAX_CANARY_WATCH, MAX_FINISHED_REDRIVES, MAX_REDRIVE_BATCH_SIZE,
    MAX_REDRIVE_RATE, MAX_RUNNING_REDRIVES, MIN_REDRIVE_RATE,
};
use helix_messaging_core::dlq::{DeadLetterReason, EntryStatus};
use helix_messaging_core::replay::{
    MAX_FINISHED_REPLAYS, MAX_REPLAY_BATCH_SIZE, MAX_RUNNING_REPLAYS,
};
use serde_json::{Map, Value, json};

use crate::openapi_exposure::exposed;

fn string() -> Value {
    json!({ "type": "string" })
}

/// A topic name as every backend accepts it.
fn name() -> Value {
    json!({
        "type": "string",
        "pattern": format!("^[A-Za-z0-9._-]{{1,{}}}$", helix_messaging_core::MAX_NAME_LEN),
    })
}

/// An optional body field: absent and `null` mean the same.
fn optional(mut schema: Value) -> Value {
    schema["nullable"] = json!(true);
    schema
}

fn nullable_string() -> Value {
    json!({ "type": "string", "nullable": true })
}

fn time() -> Value {
    json!({ "type": "string", "format": "date-time" })
}

fn nullable_time() -> Value {
    json!({ "type": "string", "format": "date-time", "nullable": true })
}

fn count() -> Value {
    json!({ "type": "integer", "minimum": 0 })
}

fn nullable_count() -> Value {
    json!({ "type": "integer", "minimum": 0, "nullable": true })
}

fn reference(name: &str) -> Value {
    json!({ "$ref": format!("#/components/schemas/{name}") })
}

/// An object schema whose every property is required and nothing else is allowed.
fn closed(properties: Value) -> Value {
    let required: Vec<String> = properties
        .as_object()
        .expect("properties are an object")
        .keys()
        .cloned()
        .collect();
    json!({
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": false,
    })
}

/// A request body object: nothing required, unknown fields refused.
fn body(properties: Value) -> Value {
    json!({ "type": "object", "properties": properties, "additionalProperties": false })
}

fn json_content(schema: Value) -> Value {
    json!({ "application/json": { "schema": schema } })
}

fn error(description: &str) -> Value {
    json!({ "description": description, "content": json_content(reference("Error")) })
}

/// The responses every operation can give besides its own.
fn responses(ok_status: &str, ok: Value, errors: &[(&str, &str)]) -> Value {
    let mut all = Map::new();
    all.insert(ok_status.to_owned(), ok);
    all.insert("401".into(), error("The bearer token is missing or wrong."));
    for (status, description) in errors {
        all.insert((*status).to_owned(), error(description));
    }
    Value::Object(all)
}

fn ok_json(description: &str, schema: Value) -> Value {
    json!({ "description": description, "content": json_content(schema) })
}

fn path_id(what: &str) -> Value {
    json!({
        "name": "id", "in": "path", "required": true,
        "description": format!("The {what}'s id."),
        "schema": { "type": "string" },
    })
}

fn query(name: &str, description: &str, schema: Value) -> Value {
    json!({
        "name": name, "in": "query", "required": false,
        "description": description, "schema": schema,
    })
}

/// The DLQ filter's query parameters (list and groups).
fn filter_parameters() -> Vec<Value> {
    vec![
        query("topic", "Only entries that failed on this topic.", string()),
        query(
            "reason",
            "Only this reason, as written in headers or with underscores.",
            json!({ "type": "string", "enum": reasons(true) }),
        ),
        query("type", "Only messages of this type.", string()),
        query(
            "status",
            "Only entries in this status.",
            json!({ "type": "string", "enum": statuses() }),
        ),
        query(
            "original_id",
            "Only the entry of this original message id.",
            string(),
        ),
        query("from", "Dead-lettered at or after (RFC 3339).", time()),
        query("to", "Dead-lettered before (RFC 3339).", time()),
    ]
}

fn reasons(with_underscores: bool) -> Vec<String> {
    let mut all: Vec<String> = DeadLetterReason::ALL
        .iter()
        .map(|r| r.as_str().to_owned())
        .collect();
    if with_underscores {
        all.extend(
            DeadLetterReason::ALL
                .iter()
                .map(|r| r.as_str().replace(' ', "_"))
                .filter(|r| r.contains('_')),
        );
    }
    all
}

fn statuses() -> Vec<&'static str> {
    [
        EntryStatus::Pending,
        EntryStatus::Parked,
        EntryStatus::Discarded,
    ]
    .iter()
    .map(|s| s.as_str())
    .collect()
}

fn schemas() -> Value {
    let side = closed(json!({
        "status": { "type": "string", "enum": ["healthy", "degraded", "unhealthy"] },
        "detail": string(),
    }));
    let entry = closed(json!({
        "id": string(),
        "original_id": string(),
        "original_topic": string(),
        "group": nullable_string(),
        "reason": { "type": "string", "enum": reasons(false) },
        "error": string(),
        "attempts": count(),
        "redrives": count(),
        "first_failure_at": time(),
        "last_failure_at": time(),
        "status": { "type": "string", "enum": statuses() },
        "retries": count(),
        "next_attempt_at": nullable_time(),
        "last_error": nullable_string(),
        "discard_reason": nullable_string(),
        "stored_at": time(),
        "claimed_until": nullable_time(),
        "message": reference("MessageBody"),
    }));
    let message = closed(json!({
        "key": nullable_string(),
        "headers": { "type": "object", "additionalProperties": { "type": "string" } },
        "payload": {
            "type": "string", "nullable": true,
            "description": "The payload as text; null when it is not UTF-8.",
        },
        "payload_size": count(),
    }));
    let spool = closed(json!({
        "depth": count(),
        "refused": count(),
        "bytes": count(),
        "oldest": nullable_time(),
    }));
    let nullable_spool = {
        let mut schema = spool.clone();
        schema["nullable"] = json!(true);
        schema
    };
    let refused = closed(json!({
        "seq": { "type": "integer" },
        "topic": string(),
        "reason": string(),
        "refused_at": time(),
        "message_id": string(),
        "message": reference("MessageBody"),
    }));
    let group = closed(json!({
        "reason": { "type": "string", "enum": reasons(false) },
        "topic": string(),
        "count": count(),
        "oldest": time(),
        "newest": time(),
        "sample_error": string(),
    }));
    let percentage = json!({ "type": "number", "minimum": 0, "maximum": 100 });
    let redrive = closed(json!({
        "id": string(),
        "status": {
            "type": "string",
            "enum": ["running", "watching", "completed", "cancelled", "canary_failed", "failed"],
        },
        "total": count(),
        "redriven": count(),
        "failed": count(),
        "skipped": count(),
        "percentage": percentage,
        "started_at": time(),
        "finished_at": nullable_time(),
        "last_error": nullable_string(),
    }));
    let by_type = json!({ "type": "object", "additionalProperties": count() });
    let replay = closed(json!({
        "id": string(),
        "status": { "type": "string", "enum": ["running", "completed", "cancelled", "failed"] },
        "topic": string(),
        "target_topic": string(),
        "dry_run": { "type": "boolean" },
        "total": count(),
        "replayed": count(),
        "skipped": count(),
        "failed": count(),
        "filtered": count(),
        "duplicates": count(),
        "by_type": by_type,
        "skipped_by_type": by_type,
        "percentage": percentage,
        "reached": nullable_time(),
        "from_time": time(),
        "to_time": time(),
        "started_at": time(),
        "finished_at": nullable_time(),
        "last_error": nullable_string(),
        "resumes": count(),
    }));
    json!({
        "Error": closed(json!({
            "error": closed(json!({
                "status": { "type": "integer", "minimum": 400, "maximum": 599 },
                "message": string(),
            })),
        })),
        "Health": closed(json!({
            "status": { "type": "string", "enum": ["healthy", "degraded", "unhealthy"] },
            "tasks": side,
            "events": side,
        })),
        "DlqEntry": entry,
        "MessageBody": message,
        "Spools": closed(json!({ "tasks": nullable_spool, "events": nullable_spool })),
        "Queues": closed(json!({
            "count": count(),
            "queues": { "type": "array", "items": closed(json!({
                "side": { "type": "string", "enum": ["tasks", "events"] },
                "topic": string(),
                "group": string(),
                "backend": string(),
                "kind": { "type": "string", "enum": ["queue", "consumer group", "stream group", "channel", "group"] },
                "name": string(),
                "source": nullable_string(),
                "waiting": nullable_count(),
                "in_flight": nullable_count(),
                "backlog_error": nullable_string(),
            })) },
        })),
        "RefusedMessages": closed(json!({
            "count": {
                "type": "integer", "minimum": 0,
                "description": "How many are listed here (at most `limit`); the spool's figures give them all.",
            },
            "refused": { "type": "array", "items": refused },
        })),
        "Released": closed(json!({
            "seq": { "type": "integer" },
            "status": { "type": "string", "enum": ["retried", "discarded"] },
        })),
        "DlqPage": closed(json!({
            "count": count(),
            "limit": count(),
            "offset": count(),
            "messages": { "type": "array", "items": reference("DlqEntry") },
        })),
        "Settled": closed(json!({
            "id": string(),
            "status": { "type": "string", "enum": ["reprocessed", "discarded"] },
        })),
        "FailureGroups": closed(json!({
            "count": count(),
            "groups": { "type": "array", "items": group.clone() },
        })),
        "RedriveDryRun": closed(json!({
            "dry_run": { "type": "boolean", "enum": [true] },
            "total": count(),
            "count": count(),
            "groups": { "type": "array", "items": group },
        })),
        "RedriveProgress": redrive,
        "Redrives": closed(json!({
            "count": count(),
            "redrives": { "type": "array", "items": reference("RedriveProgress") },
        })),
        "ReplayProgress": replay,
        "Replays": closed(json!({
            "count": count(),
            "replays": { "type": "array", "items": reference("ReplayProgress") },
        })),
        "ReprocessRequest": body(json!({
            "target_topic": optional(name()),
        })),
        "DiscardRequest": body(json!({ "reason": optional(string()) })),
        "RedriveRequest": {
            "type": "object",
            "additionalProperties": false,
            "description": "Which entries (discarded ones are never selected), where to and how fast. A `filter` with at least one key, or `\"all\": true` to re-drive the whole DLQ (an empty filter without it, or `all` with a filter, is a 400).",
            "properties": {
                "filter": body(json!({
                    "topic": string(),
                    "reason": { "type": "string", "enum": reasons(true) },
                    "type": string(),
                    "status": { "type": "string", "enum": statuses() },
                    "original_id": string(),
                    "from": time(),
                    "to": time(),
                })),
                "all": { "type": "boolean", "description": "Re-drive every entry: required when `filter` is empty or absent, refused with a filter." },
                "dry_run": { "type": "boolean", "description": "Answer 200 with the selection's size (`total`) and failure groups, starting nothing and changing nothing; the body is checked as for a real start." },
                "id": optional(json!({ "type": "string", "minLength": 1, "maxLength": 200, "description": "The job's id (a new UUID when absent); one a listed job has already is a 409." })),
                "target_topic": optional(name()),
                "rate_per_second": optional(json!({ "type": "number", "minimum": MIN_REDRIVE_RATE, "maximum": MAX_REDRIVE_RATE, "default": DEFAULT_REDRIVE_RATE, "description": format!("Most messages published per second; {DEFAULT_REDRIVE_RATE} when absent.") })),
                "canary": optional(closed(json!({ "count": count(), "watch_ms": { "type": "integer", "minimum": 0, "maximum": MAX_CANARY_WATCH.as_millis() as u64 } }))),
                "batch_size": optional(json!({ "type": "integer", "minimum": 1, "maximum": MAX_REDRIVE_BATCH_SIZE })),
            },
        },
        "ReplayRequest": {
            "type": "object",
            "additionalProperties": false,
            "required": ["topic", "from_time", "to_time"],
            "properties": {
                "id": optional(string()),
                "topic": name(),
                "from_time": time(),
                "to_time": time(),
                "target_topic": optional(name()),
                "filter": body(json!({
                    "message_types": { "type": "array", "items": string() },
                    "headers": { "type": "object", "additionalProperties": string() },
                })),
                "options": body(json!({
                    "batch_size": optional(json!({ "type": "integer", "minimum": 1, "maximum": MAX_REPLAY_BATCH_SIZE })),
                    "delay_between_ms": optional(count()),
                    "dry_run": { "type": "boolean" },
                    "skip_duplicates": { "type": "boolean" },
                })),
            },
        },
    })
}

fn request_body(schema: &str, required: bool) -> Value {
    json!({ "required": required, "content": json_content(reference(schema)) })
}

/// The document.
pub(crate) fn document() -> Value {
    let bad = ("400", "Bad input: a malformed value or JSON body.");
    let shape = (
        "422",
        "A well-formed JSON body with unknown or missing fields.",
    );
    let too_large = ("413", "The body is larger than the configured limit.");
    let media = ("415", "The body is not application/json.");
    let missing = ("404", "No such entry, job or replay.");
    let held = (
        "409",
        "A re-drive (an automatic attempt, a reprocess, a bulk redrive) holds the entry right now; try again once it is done.",
    );
    let taken = ("409", "A replay with this id exists already.");
    let redrive_taken = ("409", "A redrive job with this id is listed already.");
    let redrives_busy = format!(
        "{MAX_RUNNING_REDRIVES} redrive jobs are running (MAX_RUNNING_REDRIVES), the most allowed; nothing was started, try again once one has finished."
    );
    let replays_busy = format!(
        "As many replays are running as the handler allows (ReplayConfig::max_active, by default MAX_RUNNING_REPLAYS = {MAX_RUNNING_REPLAYS}); nothing was started, try again once one has finished."
    );
    let no_dlq = (
        "503",
        "No DLQ processor is configured, or the broker is unreachable.",
    );
    let no_replay = ("503", "No replay handler is configured.");
    let start_redrive_responses = {
        let mut all = responses(
            "202",
            ok_json("Started.", reference("RedriveProgress")),
            &[
                bad,
                shape,
                redrive_taken,
                ("429", redrives_busy.as_str()),
                too_large,
                media,
                no_dlq,
            ],
        );
        all["200"] = ok_json(
            "A dry run: what the redrive would select, nothing started.",
            reference("RedriveDryRun"),
        );
        all
    };
    let no_spool = (
        "404",
        "No such side, the side has no fallback spool, or no refused message with this seq.",
    );
    let spool_unreadable = ("503", "The spool could not be read.");
    let side_and_seq = json!([
        {
            "name": "side", "in": "path", "required": true,
            "description": "The hub's side: tasks or events.",
            "schema": { "type": "string" },
        },
        {
            "name": "seq", "in": "path", "required": true,
            "description": "The refused message's place in the spool.",
            "schema": { "type": "integer" },
        },
    ]);
    let unsupported = ("501", "The backend keeps no history to replay.");
    let mut list_parameters = vec![
        query(
            "limit",
            "Entries per page (1 to 1000, default 50).",
            json!({ "type": "integer", "minimum": 1, "maximum": 1000 }),
        ),
        query("offset", "Entries skipped.", count()),
    ];
    list_parameters.extend(filter_parameters());
    let document = json!({
        "openapi": "3.0.3",
        "info": {
            "title": "helix-messaging admin API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Health, metrics, the dead-letter queue, replays and fallback spools of a helix-messaging hub.",
        },
        "security": [{ "bearer": [] }],
        "paths": {
            "/v1/messaging/health": { "get": {
                "operationId": "health",
                "summary": "Both sides' health.",
                "responses": {
                    "200": ok_json("Healthy or degraded.", reference("Health")),
                    "503": ok_json("Unhealthy.", reference("Health")),
                    "401": error("The bearer token is missing or wrong."),
                },
            }},
            "/v1/messaging/metrics": { "get": {
                "operationId": "metrics",
                "summary": "Every recorded metric in the Prometheus text format.",
                "responses": responses("200", json!({
                    "description": "Prometheus text exposition format 0.0.4.",
                    "content": { "text/plain": { "schema": { "type": "string" } } },
                }), &[("503", "No Prometheus recorder is installed.")]),
            }},
            "/v1/messaging/openapi.json": { "get": {
                "operationId": "openapi",
                "summary": "This document.",
                "responses": responses("200", ok_json("The OpenAPI document.", json!({ "type": "object" })), &[]),
            }},
            "/v1/messaging/dlq": { "get": {
                "operationId": "listDeadLetters",
                "summary": "A page of DLQ entries, oldest first, and how many match in all.",
                "description": "Oldest first (by dead-lettering time, then id), so paging with `offset` stays put while new letters arrive at the end. Without `status`, discarded entries are left out: `count` is then the DLQ depth the `messaging_dlq_messages_total` gauge shows (`status=discarded` lists them). The page and `count` come from one consistent read of the store.",
                "parameters": list_parameters,
                "responses": responses("200", ok_json("The page.", reference("DlqPage")), &[bad, no_dlq]),
            }},
            "/v1/messaging/dlq/groups": { "get": {
                "operationId": "failureGroups",
                "summary": "The entries grouped by reason and topic, largest group first.",
                "description": "Without `status`, discarded entries are left out, as in the listing.",
                "parameters": filter_parameters(),
                "responses": responses("200", ok_json("The groups.", reference("FailureGroups")), &[bad, no_dlq]),
            }},
            "/v1/messaging/dlq/redrives": {
                "post": {
                    "operationId": "startRedrive",
                    "summary": "Start a bulk redrive job over the selected entries (or, with dry_run, show what it would select).",
                    "description": format!("A filter, or `\"all\": true`, is required. Paced at {DEFAULT_REDRIVE_RATE} messages a second unless `rate_per_second` says otherwise. At most {MAX_RUNNING_REDRIVES} jobs run at once (429 beyond). Finished jobs are listed up to the newest {MAX_FINISHED_REDRIVES}; older ones are forgotten (404)."),
                    "requestBody": request_body("RedriveRequest", false),
                    "responses": start_redrive_responses,
                },
                "get": {
                    "operationId": "listRedrives",
                    "summary": "Every redrive job, newest first.",
                    "description": format!("Running jobs, and the newest {MAX_FINISHED_REDRIVES} finished ones."),
                    "responses": responses("200", ok_json("The jobs.", reference("Redrives")), &[no_dlq]),
                },
            },
            "/v1/messaging/dlq/redrives/{id}": {
                "parameters": [path_id("redrive job")],
                "get": {
                    "operationId": "getRedrive",
                    "summary": "A redrive job's progress.",
                    "responses": responses("200", ok_json("Its progress.", reference("RedriveProgress")), &[missing, no_dlq]),
                },
                "delete": {
                    "operationId": "cancelRedrive",
                    "summary": "Ask a redrive job to stop.",
                    "responses": responses("200", ok_json("Its progress.", reference("RedriveProgress")), &[missing, no_dlq]),
                },
            },
            "/v1/messaging/dlq/{id}": {
                "parameters": [path_id("DLQ entry")],
                "get": {
                    "operationId": "getDeadLetter",
                    "summary": "One DLQ entry.",
                    "responses": responses("200", ok_json("The entry.", reference("DlqEntry")), &[missing, no_dlq]),
                },
                "delete": {
                    "operationId": "deleteDeadLetter",
                    "summary": "Discard an entry (HelixAgent's form of discard).",
                    "requestBody": request_body("DiscardRequest", false),
                    "responses": responses("200", ok_json("Discarded.", reference("Settled")), &[bad, shape, too_large, media, missing, held, no_dlq]),
                },
            },
            "/v1/messaging/dlq/{id}/reprocess": {
                "parameters": [path_id("DLQ entry")],
                "post": {
                    "operationId": "reprocessDeadLetter",
                    "summary": "Publish the entry's message again and remove the entry.",
                    "requestBody": request_body("ReprocessRequest", false),
                    "responses": responses("200", ok_json("Reprocessed.", reference("Settled")), &[bad, shape, too_large, media, missing, held, no_dlq]),
                },
            },
            "/v1/messaging/dlq/{id}/discard": {
                "parameters": [path_id("DLQ entry")],
                "delete": {
                    "operationId": "discardDeadLetter",
                    "summary": "Mark an entry discarded; it stays listed with the reason.",
                    "requestBody": request_body("DiscardRequest", false),
                    "responses": responses("200", ok_json("Discarded.", reference("Settled")), &[bad, shape, too_large, media, missing, held, no_dlq]),
                },
            },
            "/v1/messaging/queues": { "get": {
                "operationId": "queues",
                "summary": "The consumer groups of the hub's topics: where each backend keeps them (the RabbitMQ queue, the Kafka consumer group, the Redis stream group) and their backlog.",
                "description": "Without parameters, every group the hub knows of: the workers' group of each task queue it published to, subscribed to or was configured with, and each event subscription. A topic the hub knows nothing of is answered with the group it would have (the workers' group on the task side unless side and group say otherwise).",
                "parameters": [
                    query("topic", "Only this topic.", name()),
                    query("group", "Only this consumer group.", name()),
                    query("side", "Only this side.", json!({ "type": "string", "enum": ["tasks", "events"] })),
                ],
                "responses": responses("200", ok_json("The groups.", reference("Queues")), &[bad]),
            }},
            "/v1/messaging/spools": { "get": {
                "operationId": "spools",
                "summary": "What each side's fallback spool holds (null: no spool on that side).",
                "responses": responses("200", ok_json("The figures.", reference("Spools")), &[spool_unreadable]),
            }},
            "/v1/messaging/spools/{side}/refused": {
                "parameters": [side_and_seq[0]],
                "get": {
                    "operationId": "listRefused",
                    "summary": "The messages the broker refused when they were forwarded, set aside with its error, oldest first.",
                    "parameters": [query(
                        "limit",
                        "Messages listed (1 to 1000, default 50).",
                        json!({ "type": "integer", "minimum": 1, "maximum": 1000 }),
                    )],
                    "responses": responses("200", ok_json("The refused messages.", reference("RefusedMessages")), &[bad, no_spool, spool_unreadable]),
                },
            },
            "/v1/messaging/spools/{side}/refused/{seq}": {
                "parameters": side_and_seq,
                "delete": {
                    "operationId": "discardRefused",
                    "summary": "Drop a refused message for good.",
                    "responses": responses("200", ok_json("Discarded.", reference("Released")), &[bad, no_spool, spool_unreadable]),
                },
            },
            "/v1/messaging/spools/{side}/refused/{seq}/retry": {
                "parameters": side_and_seq,
                "post": {
                    "operationId": "retryRefused",
                    "summary": "Send a refused message again: back to the end of the spool, forwarded in its turn.",
                    "responses": responses("200", ok_json("Back in the spool.", reference("Released")), &[bad, no_spool, spool_unreadable]),
                },
            },
            "/v1/messaging/replay": {
                "post": {
                    "operationId": "startReplay",
                    "summary": "Start replaying a window of a topic's history.",
                    "requestBody": request_body("ReplayRequest", true),
                    "description": format!("At most ReplayConfig::max_active replays (by default {MAX_RUNNING_REPLAYS}) run at once (429 beyond)."),
                    "responses": responses("202", ok_json("Started.", reference("ReplayProgress")), &[bad, shape, taken, ("429", replays_busy.as_str()), too_large, media, unsupported, no_replay]),
                },
                "get": {
                    "operationId": "listReplays",
                    "summary": "Every replay, newest first.",
                    "description": format!("Running and failed replays, and the newest {MAX_FINISHED_REPLAYS} completed or cancelled ones; older ones are forgotten (404)."),
                    "responses": responses("200", ok_json("The replays.", reference("Replays")), &[no_replay]),
                },
            },
            "/v1/messaging/replay/{id}": {
                "parameters": [path_id("replay")],
                "get": {
                    "operationId": "getReplay",
                    "summary": "A replay's progress.",
                    "responses": responses("200", ok_json("Its progress.", reference("ReplayProgress")), &[missing, no_replay]),
                },
                "delete": {
                    "operationId": "cancelReplay",
                    "summary": "Ask a replay to stop.",
                    "responses": responses("200", ok_json("Its progress.", reference("ReplayProgress")), &[missing, no_replay]),
                },
            },
        },
        "components": {
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer" } },
            "schemas": schemas(),
        },
    });
    exposed(document)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reference_resolves() {
        let doc = document();
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        let text = doc.to_string();
        for piece in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
            let name = &piece[..piece.find('"').unwrap()];
            assert!(schemas.contains_key(name), "unresolved $ref {name}");
        }
    }
}
