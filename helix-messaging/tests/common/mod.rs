//! Helpers the DLQ tests share.

#![allow(dead_code, unreachable_pub)]

use std::time::{Duration, SystemTime};

use helix_messaging::dlq::{DeadLetter, DeadLetterReason};
use helix_messaging::{DeliveryInfo, Message};

/// A dead letter of a message of type `kind` that failed on `topic` in group `workers` at
/// `at` (first failing 3 s before), after 4 attempts, with an error longer than any header.
pub fn letter(topic: &str, reason: DeadLetterReason, kind: &str, at: SystemTime) -> DeadLetter {
    let info = DeliveryInfo {
        topic: topic.into(),
        group: Some("workers".into()),
        attempt: 4,
        redelivered: true,
        position: None,
    };
    let message = Message::new(format!("payload of a {kind}"))
        .with_key("k-1")
        .with_header("type", kind)
        .with_header("lang", "日本語")
        .with_header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .with_content_type("application/json")
        .with_correlation_id("corr")
        .with_priority(7);
    DeadLetter::new(
        &message,
        &info,
        reason,
        &format!("{kind} failed: {}", "x".repeat(5_000)),
        at - Duration::from_secs(3),
        at,
    )
}
