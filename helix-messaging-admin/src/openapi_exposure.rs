//! What the OpenAPI document says about exposure, the same for every endpoint: the two
//! tokens, the 403 a read-only token gets for a write, the 503 of the transport's limits,
//! the request id, and the root probes that need no token.

use serde_json::{Value, json};

use crate::audit::REQUEST_ID_HEADER;
use crate::config::{
    DEFAULT_BODY_LIMIT, DEFAULT_HEADER_READ_TIMEOUT, DEFAULT_MAX_CONCURRENT_REQUESTS,
    DEFAULT_REQUEST_TIMEOUT, MIN_TOKEN_LEN,
};

fn error(description: &str) -> Value {
    json!({
        "description": description,
        "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } },
    })
}

/// A root probe: one word, 200 or 503, no token.
fn probe(operation: &str, summary: &str, ok: (&str, &[&str]), down: (&str, &[&str])) -> Value {
    let word = |(description, words): (&str, &[&str])| {
        json!({
            "description": description,
            "content": { "text/plain": { "schema": {
                "type": "string",
                "enum": words.iter().map(|w| format!("{w}\n")).collect::<Vec<_>>(),
            } } },
        })
    };
    json!({ "get": {
        "operationId": operation,
        "summary": summary,
        "security": [],
        "responses": { "200": word(ok), "503": word(down) },
    }})
}

/// `document` with the exposure rules added to every operation, and the root probes.
pub(crate) fn exposed(mut document: Value) -> Value {
    let request_id = json!({
        "description": "The request's id: the client's own X-Request-Id, or a fresh UUID. The audit trail carries it.",
        "schema": { "type": "string" },
    });
    if let Some(paths) = document["paths"].as_object_mut() {
        for item in paths.values_mut() {
            let Some(item) = item.as_object_mut() else {
                continue;
            };
            for (method, operation) in item.iter_mut() {
                // A path item also holds its shared `parameters`, which is no operation.
                let Some(responses) = operation
                    .get_mut("responses")
                    .and_then(Value::as_object_mut)
                else {
                    continue;
                };
                if method != "get" {
                    responses.insert(
                        "403".into(),
                        error("The read-only token cannot change anything; this needs the admin token."),
                    );
                }
                responses.entry("503").or_insert_with(|| {
                    error("Too many requests under way, or the request took longer than the request timeout.")
                });
                for response in responses.values_mut() {
                    response["headers"][REQUEST_ID_HEADER] = request_id.clone();
                }
            }
        }
        paths.insert(
            "/health".into(),
            probe(
                "probeHealth",
                "For load balancers: the hub's status in one word, without a token.",
                (
                    "Healthy, or degraded onto a fallback.",
                    &["healthy", "degraded"],
                ),
                (
                    "Unhealthy, or the brokers did not answer in time.",
                    &["unhealthy"],
                ),
            ),
        );
        paths.insert(
            "/ready".into(),
            probe(
                "probeReady",
                "For orchestrators: whether the hub can take messages, in one word, without a token.",
                ("Ready.", &["ready"]),
                ("Not ready: a side can take no messages.", &["unready"]),
            ),
        );
    }
    document["components"]["securitySchemes"]["bearer"]["description"] = json!(format!(
        "The admin token (MESSAGING_ADMIN_TOKEN) may do anything; the read-only token (MESSAGING_ADMIN_READ_TOKEN) every GET, and gets 403 for anything else. Each is at least {MIN_TOKEN_LEN} bytes. Requests take at most {} s each and {DEFAULT_MAX_CONCURRENT_REQUESTS} are under way at once by default; beyond either the answer is 503 (with Retry-After when too many are under way). Request bodies stop at {} bytes by default (413). A client sends its request headers within {} s of connecting or of its previous answer, or is disconnected.",
        DEFAULT_REQUEST_TIMEOUT.as_secs(),
        DEFAULT_BODY_LIMIT,
        DEFAULT_HEADER_READ_TIMEOUT.as_secs()
    ));
    document
}
