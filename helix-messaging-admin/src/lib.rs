//! The HTTP admin API of helix-messaging, on axum: HelixAgent's `/v1/messaging/…` endpoints
//! over a [`Hub`](helix_messaging_core::hub::Hub), behind bearer-token auth.
//!
//! [`router`] gives a [`Router`](axum::Router) to mount in an application's own axum app; [`serve`] runs
//! it on its own listener (by default `127.0.0.1:7061`, HelixAgent's port, never every
//! interface unless asked). Served:
//!
//! - `GET /v1/messaging/health`: both sides' health as JSON (`status` is `healthy`,
//!   `degraded` or `unhealthy`; HTTP 503 when unhealthy, so a load balancer's check works);
//! - `GET /v1/messaging/openapi.json`: the OpenAPI 3.0 document of all of this;
//! - `GET /v1/messaging/metrics`: every metric recorded through the `metrics` facade, in the
//!   Prometheus text format (from [`install_prometheus`]'s recorder);
//! - `GET /v1/messaging/dlq?limit&offset` (filters `topic`, `reason`, `type`, `status`,
//!   `original_id`, `from`, `to` in RFC 3339): `{"count", "limit", "offset", "messages"}`,
//!   oldest first (by dead-lettering time, then id: paging with `offset` stays put while new
//!   letters arrive at the end), `count` being every match (HelixAgent's scripts read
//!   `.count`), read with the page in one consistent read. Without `status`, discarded
//!   entries are left out, so `count` is the DLQ depth the `messaging_dlq_messages_total`
//!   gauge shows; `status=discarded` lists them;
//! - `GET /v1/messaging/dlq/{id}`, `POST /v1/messaging/dlq/{id}/reprocess` (optional body
//!   `{"target_topic"}`), `DELETE /v1/messaging/dlq/{id}/discard` and HelixAgent's `DELETE
//!   /v1/messaging/dlq/{id}` (optional body `{"reason"}`): 404 for an unknown id, 400 for
//!   bad input;
//! - `GET /v1/messaging/dlq/groups` (the list's filters, discarded entries left out likewise):
//!   `{"count", "groups"}`, the entries grouped by reason and topic, largest first;
//! - `POST /v1/messaging/dlq/redrives` (body `{"filter": {…the list's filter keys}, "all",
//!   "dry_run", "id", "target_topic", "rate_per_second", "canary": {"count", "watch_ms"},
//!   "batch_size"}`; 202 with its progress), `GET /v1/messaging/dlq/redrives` (`{"count",
//!   "redrives"}`), `GET` and `DELETE /v1/messaging/dlq/redrives/{id}` (progress; cancel):
//!   bulk redrive jobs. A redrive is deliberate: a non-empty `filter`, or `"all": true` for
//!   the whole DLQ (an empty filter without it, or `all` with a filter, is a 400);
//!   `"dry_run": true` answers 200 with `{"dry_run", "total", "count", "groups"}` (the
//!   selection's size and its failure groups), starting nothing. It is paced at
//!   [`DEFAULT_REDRIVE_RATE`](helix_messaging_core::dlq::DEFAULT_REDRIVE_RATE) messages a
//!   second unless `rate_per_second` says otherwise; at most
//!   [`MAX_RUNNING_REDRIVES`](helix_messaging_core::dlq::MAX_RUNNING_REDRIVES) run at once
//!   (429 Too Many Requests beyond); an `id` a listed job has is a 409; finished jobs are
//!   kept up to [`MAX_FINISHED_REDRIVES`](helix_messaging_core::dlq::MAX_FINISHED_REDRIVES);
//! - `POST /v1/messaging/replay` (HelixAgent's body: `topic`, `from_time`, `to_time` in RFC
//!   3339, optional `id`, `target_topic`, `filter` {`message_types`, `headers`}, `options`
//!   {`batch_size`, `delay_between_ms`, `dry_run`, `skip_duplicates`}; 202 with its
//!   progress; 409 for an id in use, 429 while `ReplayConfig::max_active` replays run, by
//!   default [`MAX_RUNNING_REPLAYS`](helix_messaging_core::replay::MAX_RUNNING_REPLAYS)),
//!   `GET /v1/messaging/replay` (`{"count", "replays"}`: running and failed ones, and the
//!   newest [`MAX_FINISHED_REPLAYS`](helix_messaging_core::replay::MAX_FINISHED_REPLAYS)
//!   completed or cancelled), `GET` and `DELETE /v1/messaging/replay/{id}` (progress;
//!   cancel);
//! - `GET /v1/messaging/spools` (each side's fallback spool: `depth`, `refused`, `bytes`,
//!   `oldest`; `null` for a side without one), `GET /v1/messaging/spools/{side}/refused?limit`
//!   (`{"count", "refused"}`: the messages the broker refused when they were forwarded, set
//!   aside with its error), `POST /v1/messaging/spools/{side}/refused/{seq}/retry` (back to
//!   the end of the spool) and `DELETE /v1/messaging/spools/{side}/refused/{seq}` (dropped
//!   for good); `side` is `tasks` or `events`, 404 for a side without a spool or an unknown
//!   `seq`.
//!
//! The bodies are typed in [`api`], the one place the JSON shape is written down; clients
//! read answers into the same types.
//!
//! **Tokens.** Every request under `/v1/messaging` needs `Authorization: Bearer <token>`;
//! a missing or wrong one is 401 (logged, at most once per [`FAILURE_LOG_INTERVAL`]). The
//! admin token (`MESSAGING_ADMIN_TOKEN`) may do anything; the optional read-only token
//! (`MESSAGING_ADMIN_READ_TOKEN`) every `GET` — health, metrics, listings, progress — and
//! gets 403 for anything else. Tokens are at least [`MIN_TOKEN_LEN`] bytes.
//!
//! **Probes.** `GET /health` (`healthy`, `degraded` → 200; `unhealthy` → 503) and
//! `GET /ready` (`ready` → 200; `unready` → 503) answer without a
//! token, with one word, for load balancers and orchestrators.
//!
//! **Audit.** Every authenticated request that would change state emits one `tracing` event
//! at info on [`AUDIT_TARGET`]: its request id (the client's `X-Request-Id`, or a fresh
//! UUID, returned in every answer), the client's address, the token's scope, the action,
//! the ids and the request body, the status and the outcome.
//!
//! **Limits.** Request bodies are bounded ([`AdminConfig::body_limit`], 413 beyond it); a
//! request longer than [`AdminConfig::request_timeout`], or beyond
//! [`AdminConfig::max_concurrent_requests`] under way, is 503. [`serve`] adds a header-read
//! timeout, a cap on connections and TLS, and refuses to listen beyond loopback in plain
//! HTTP unless told to. Errors, unknown paths (404) and wrong methods (405) answer with a
//! JSON body `{"error": {"status": …, "message": …}}`; a malformed JSON body is 400.

pub mod api;
mod audit;
mod auth;
mod config;
mod dlq;
mod json;
mod openapi;
mod openapi_exposure;
mod probes;
mod queues;
mod replay;
mod router;
mod services;
mod spool;
mod tokens;
mod transport;

pub use crate::audit::{AUDIT_TARGET, REQUEST_ID_HEADER};
pub use crate::config::{
    ADDR_VAR, ALLOW_PLAINTEXT_VAR, AdminConfig, AdminError, DEFAULT_ADDR, DEFAULT_BODY_LIMIT,
    DEFAULT_HEADER_READ_TIMEOUT, DEFAULT_MAX_CONCURRENT_REQUESTS, DEFAULT_MAX_CONNECTIONS,
    DEFAULT_REQUEST_TIMEOUT, MIN_TOKEN_LEN, READ_TOKEN_VAR, TLS_CERT_VAR, TLS_KEY_VAR, TOKEN_VAR,
    TlsFiles,
};
pub use crate::probes::{PROBE_HEALTH_TIMEOUT, PROBE_REUSE};
pub use crate::router::{install_prometheus, router};
pub use crate::services::Services;
pub use crate::tokens::FAILURE_LOG_INTERVAL;
pub use crate::transport::{SHUTDOWN_GRACE, check_exposure, serve, serve_listener};
