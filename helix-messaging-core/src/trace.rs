//! Trace context through messages: `tracing` spans named and attributed after the
//! OpenTelemetry messaging conventions, and the W3C `traceparent` / `tracestate` headers
//! written and read as the W3C Trace Context recommendation says (written here against the
//! OpenTelemetry API alone: a library does not pick the application's OpenTelemetry SDK).
//!
//! What carries a trace across a broker:
//!
//! - [`ObservedBroker`](crate::observe::ObservedBroker) opens a `publish {topic}` span
//!   (`otel.kind = producer`) for every publish and writes its context into the message's
//!   `traceparent` header;
//! - the [`Runner`](crate::Runner) opens a `process {topic}` span (`otel.kind = consumer`)
//!   around the handler, a child of the context the message carries, and a `settle {topic}`
//!   span around the ack / nack / reject;
//! - dead-lettering opens a `dead_letter {dlq topic}` span inside the process span and stamps
//!   the dead letter with it; a re-drive, a replay copy and a spooled message each get a
//!   `redrive` / `replay` / `spool` span, a child of the context the message carried, and
//!   carry that one on. So a consumer of a re-driven, replayed or once-spooled message
//!   continues the original publisher's trace.
//!
//! **Which parent a span takes**: the current span's context when there is one (a publish
//! inside a request handler belongs to the request), else the context the message carries
//! (a spool forwarder, a redrive job and a runner's handler task have no current span).
//!
//! Nothing here exports spans: the application installs a `tracing` subscriber with the
//! [`tracing_opentelemetry`] layer and an OpenTelemetry tracer of its choice. Without that
//! layer the spans are ordinary `tracing` spans (or nothing, when no subscriber wants
//! them) and no header is written; a `traceparent` a message already carries is kept.

use std::future::Future;
use std::str::FromStr;

use opentelemetry::Context;
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};

use tracing::field::Empty;
use tracing::{Instrument, Span};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::error::{Error, Result};
use crate::message::{Headers, Message};

/// The W3C trace-context header holding the trace id and the sending span's id.
pub const TRACEPARENT_HEADER: &str = "traceparent";
/// The W3C trace-context header holding vendor state, written when the context has any.
pub const TRACESTATE_HEADER: &str = "tracestate";

/// The context `message` carries in its trace-context headers: the sender's span as a
/// remote parent within the current OpenTelemetry context, or the current context unchanged
/// (no valid span) when the headers are missing or malformed.
pub fn carried_context(message: &Message) -> Context {
    let current = Context::current();
    match read_traceparent(message.headers()) {
        Some(sender) => current.with_remote_span_context(sender),
        None => current,
    }
}

/// The `traceparent` version written; later versions are read by their first four fields.
const TRACEPARENT_VERSION: u8 = 0;

/// The span context in `headers`' `traceparent` (with its `tracestate`), read by the W3C
/// Trace Context rules: lower-case hex fields, version `ff` invalid, version `00` exactly four
/// fields, only the sampled flag kept, an unreadable `tracestate` read as empty, and an
/// all-zero trace or span id no context.
fn read_traceparent(headers: &Headers) -> Option<SpanContext> {
    let value = headers.get(TRACEPARENT_HEADER)?.trim();
    let fields: Vec<&str> = value.split_terminator('-').collect();
    let [version, trace_id, span_id, flags, ..] = fields[..] else {
        return None;
    };
    let version = u8::from_str_radix(version, 16).ok()?;
    if version == u8::MAX || (version == TRACEPARENT_VERSION && fields.len() != 4) {
        return None;
    }
    if [trace_id, span_id, flags]
        .iter()
        .any(|field| field.chars().any(|c| c.is_ascii_uppercase()))
    {
        return None;
    }
    let flags = TraceFlags::new(u8::from_str_radix(flags, 16).ok()?) & TraceFlags::SAMPLED;
    let state = headers
        .get(TRACESTATE_HEADER)
        .and_then(|state| TraceState::from_str(state).ok())
        .unwrap_or_default();
    let sender = SpanContext::new(
        TraceId::from_hex(trace_id).ok()?,
        SpanId::from_hex(span_id).ok()?,
        flags,
        true,
        state,
    );
    sender.is_valid().then_some(sender)
}

/// Write `span`'s context into `message`'s trace-context headers, replacing what was there.
/// A span without an OpenTelemetry context (no layer installed, or disabled) writes nothing
/// and leaves the headers as they were.
pub fn stamp(message: &mut Message, span: &Span) {
    if span.is_disabled() {
        return;
    }
    stamp_context(message, &span.context());
}

/// Write `cx` into `message`'s trace-context headers, replacing what was there; an invalid
/// context writes nothing. For stamping many messages with one span: its context is then
/// looked up once.
pub fn stamp_context(message: &mut Message, cx: &Context) {
    if !cx.span().span_context().is_valid() {
        return;
    }
    let span = cx.span();
    let sender = span.span_context();
    let headers = message.headers_mut();
    headers.insert(
        TRACEPARENT_HEADER.to_owned(),
        format!(
            "{TRACEPARENT_VERSION:02x}-{}-{}-{:02x}",
            sender.trace_id(),
            sender.span_id(),
            sender.trace_flags() & TraceFlags::SAMPLED
        ),
    );
    let state = sender.trace_state().header();
    if state.is_empty() {
        headers.remove(TRACESTATE_HEADER);
    } else {
        headers.insert(TRACESTATE_HEADER.to_owned(), state);
    }
}

/// Run `work` inside `span`, marking the span failed ([`record_error`]) when it fails.
pub async fn in_span<T>(span: Span, work: impl Future<Output = Result<T>>) -> Result<T> {
    let outcome = work.instrument(span.clone()).await;
    if let Err(err) = &outcome {
        record_error(&span, err);
    }
    outcome
}

/// The span for publishing `message` to `topic` on the `system` backend (`publish {topic}`,
/// a producer span). Its parent is the current span, else the context `message` carries.
pub fn publish_span(system: &str, topic: &str, message: &Message) -> Span {
    let span = tracing::info_span!(
        "publish",
        otel.name = %format_args!("publish {topic}"),
        otel.kind = "producer",
        otel.status_code = Empty,
        error.type = Empty,
        messaging.system = system,
        messaging.operation.type = "send",
        messaging.operation.name = "publish",
        messaging.destination.name = topic,
        messaging.message.id = message.id(),
        messaging.message.body.size = message.payload().len(),
    );
    adopt(&span, message);
    span
}

/// The span for publishing `count` messages to `topic` at once (`publish {topic}` with
/// `messaging.batch.message_count`), a child of the current span.
pub fn batch_publish_span(system: &str, topic: &str, count: usize) -> Span {
    tracing::info_span!(
        "publish",
        otel.name = %format_args!("publish {topic}"),
        otel.kind = "producer",
        otel.status_code = Empty,
        error.type = Empty,
        messaging.system = system,
        messaging.operation.type = "send",
        messaging.operation.name = "publish",
        messaging.destination.name = topic,
        messaging.batch.message_count = count,
    )
}

/// The span for handling one delivery (`process {topic}`, a consumer span): a child of the
/// current span, else of the context the message carries. `system` is the backend's name
/// when the subscription knows it.
pub fn process_span(
    system: Option<&str>,
    topic: &str,
    group: Option<&str>,
    attempt: u32,
    message: &Message,
) -> Span {
    let span = tracing::info_span!(
        "process",
        otel.name = %format_args!("process {topic}"),
        otel.kind = "consumer",
        otel.status_code = Empty,
        error.type = Empty,
        messaging.system = system,
        messaging.operation.type = "process",
        messaging.operation.name = "process",
        messaging.destination.name = topic,
        messaging.consumer.group.name = group,
        messaging.message.id = message.id(),
        messaging.message.body.size = message.payload().len(),
        messaging.message.delivery_attempt = attempt,
    );
    adopt(&span, message);
    span
}

/// The span for settling a delivery of `topic` (`settle {topic}`) with `operation`
/// (`"ack"`, `"nack"`, `"reject"`), a child of the current (process) span.
pub fn settle_span(topic: &str, operation: &'static str) -> Span {
    tracing::info_span!(
        "settle",
        otel.name = %format_args!("settle {topic}"),
        otel.status_code = Empty,
        error.type = Empty,
        messaging.operation.type = "settle",
        messaging.operation.name = operation,
        messaging.destination.name = topic,
    )
}

/// The span for dead-lettering `message` of `original_topic` to `dlq_topic` for `reason`,
/// a child of the current (process) span, else of the context the message carries.
pub fn dead_letter_span(
    original_topic: &str,
    dlq_topic: &str,
    reason: &str,
    message: &Message,
) -> Span {
    let span = tracing::info_span!(
        "dead_letter",
        otel.name = %format_args!("dead_letter {dlq_topic}"),
        otel.kind = "producer",
        otel.status_code = Empty,
        error.type = Empty,
        messaging.operation.type = "send",
        messaging.operation.name = "dead_letter",
        messaging.destination.name = dlq_topic,
        messaging.message.id = message.id(),
        helix.original_topic = original_topic,
        helix.dlq.reason = reason,
    );
    adopt(&span, message);
    span
}

/// How a message is copied onward: the name of its span ([`stamp_copy`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyKind {
    /// A dead letter re-driven to its topic.
    Redrive,
    /// A message replayed from history into a target topic.
    Replay,
    /// A publish the broker could not take, kept in the fallback spool.
    Spool,
}

impl CopyKind {
    /// The span's (and the OpenTelemetry operation's) name.
    pub const fn name(self) -> &'static str {
        match self {
            CopyKind::Redrive => "redrive",
            CopyKind::Replay => "replay",
            CopyKind::Spool => "spool",
        }
    }
}

/// Open a `{copy} {topic}` span (an OpenTelemetry "create" operation) as a child of the
/// current span, else of the context `message` carries, and stamp `message` with it: the
/// copy's consumer continues the trace through it. The span ends when this returns.
pub fn stamp_copy(copy: CopyKind, topic: &str, message: &mut Message) {
    let span = tracing::info_span!(
        "copy",
        otel.name = %format_args!("{} {topic}", copy.name()),
        otel.kind = "producer",
        messaging.operation.type = "create",
        messaging.operation.name = copy.name(),
        messaging.destination.name = topic,
        messaging.message.id = message.id(),
    );
    adopt(&span, message);
    stamp(message, &span);
}

/// Mark `span` as failed with `error` (OpenTelemetry status ERROR, `error.type` the kind).
pub fn record_error(span: &Span, error: &Error) {
    span.record("otel.status_code", "ERROR");
    span.record("error.type", error.kind().label());
}

/// Give `span` the context `message` carries as its parent, unless there is a current span
/// (which `tracing` already made its parent).
fn adopt(span: &Span, message: &Message) {
    if span.is_disabled() || !message.headers().contains_key(TRACEPARENT_HEADER) {
        return;
    }
    if Span::current().context().span().span_context().is_valid() {
        return;
    }
    let carried = carried_context(message);
    if carried.span().span_context().is_valid() {
        // Fails only without the OpenTelemetry layer, where there is no parent to set.
        let _ = span.set_parent(carried);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_carried_traceparent_is_read_and_a_malformed_one_is_no_context() {
        let message = Message::new("x").with_header(
            TRACEPARENT_HEADER,
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        );
        let cx = carried_context(&message);
        let span = cx.span();
        let carried = span.span_context();
        assert!(carried.is_valid());
        assert!(carried.is_remote());
        assert_eq!(
            carried.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(carried.span_id().to_string(), "00f067aa0ba902b7");

        let broken = Message::new("x").with_header(TRACEPARENT_HEADER, "not a traceparent");
        assert!(!carried_context(&broken).span().span_context().is_valid());
    }

    #[test]
    fn traceparents_are_read_by_the_w3c_rules() {
        let read = |traceparent: &str| {
            let message = Message::new("x").with_header(TRACEPARENT_HEADER, traceparent);
            read_traceparent(message.headers()).map(|cx| {
                (
                    cx.trace_id().to_string(),
                    cx.span_id().to_string(),
                    cx.trace_flags().is_sampled(),
                )
            })
        };
        let (trace, span) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
        let valid = Some((trace.to_owned(), span.to_owned(), true));
        assert_eq!(read(&format!("00-{trace}-{span}-01")), valid);
        assert_eq!(read(&format!(" 00-{trace}-{span}-01 ")), valid, "trimmed");
        assert_eq!(
            read(&format!("cc-{trace}-{span}-09-what-comes")),
            valid,
            "a later version"
        );
        assert_eq!(
            read(&format!("00-{trace}-{span}-02")),
            Some((trace.to_owned(), span.to_owned(), false)),
            "only the sampled flag is kept"
        );
        for bad in [
            format!("00-{trace}-{span}-01-extra"),
            format!("ff-{trace}-{span}-01"),
            format!("00-{}-{span}-01", trace.to_uppercase()),
            format!("00-{trace}-{}-01", span.to_uppercase()),
            format!("00-00000000000000000000000000000000-{span}-01"),
            format!("00-{trace}-0000000000000000-01"),
            format!("00-{trace}-{span}"),
            format!("zz-{trace}-{span}-01"),
        ] {
            assert_eq!(read(&bad), None, "{bad}");
        }
    }

    #[test]
    fn a_context_is_written_as_traceparent_and_its_state_only_when_it_has_any() {
        let sender = SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
            SpanId::from_hex("00f067aa0ba902b7").unwrap(),
            TraceFlags::SAMPLED,
            false,
            TraceState::default(),
        );
        let mut message = Message::new("x").with_header(TRACESTATE_HEADER, "old=1");
        stamp_context(
            &mut message,
            &Context::new().with_remote_span_context(sender.clone()),
        );
        assert_eq!(
            message.header(TRACEPARENT_HEADER),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        );
        assert_eq!(message.header(TRACESTATE_HEADER), None, "replaced by none");

        let with_state = SpanContext::new(
            sender.trace_id(),
            sender.span_id(),
            sender.trace_flags(),
            false,
            TraceState::from_str("vendor=abc,other=1").unwrap(),
        );
        stamp_context(
            &mut message,
            &Context::new().with_remote_span_context(with_state),
        );
        assert_eq!(
            message.header(TRACESTATE_HEADER),
            Some("vendor=abc,other=1")
        );
        let read = read_traceparent(message.headers()).unwrap();
        assert_eq!(read.trace_state().get("vendor"), Some("abc"), "read back");
    }

    #[test]
    fn without_an_opentelemetry_layer_a_carried_traceparent_is_kept() {
        let original = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let mut message = Message::new("x").with_header(TRACEPARENT_HEADER, original);
        stamp_copy(CopyKind::Replay, "t", &mut message);
        let span = publish_span("memory", "t", &message);
        stamp(&mut message, &span);
        assert_eq!(message.header(TRACEPARENT_HEADER), Some(original));
    }
}
