//! Portable topic and group names.

use std::collections::HashSet;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::error::{Error, Result};

/// Longest topic or group name accepted (Kafka's limit, the strictest of the backends).
pub const MAX_NAME_LEN: usize = 249;

/// Check that `name` is a topic or group name every backend accepts: 1 to
/// [`MAX_NAME_LEN`] ASCII letters, digits, `.`, `_` or `-` (Kafka's rule, the strictest).
///
/// # Errors
/// [`ErrorKind::InvalidInput`](crate::error::ErrorKind::InvalidInput) saying what is wrong, with the
/// name and what it names (`what`, e.g. "topic").
pub fn validate_name(what: &str, name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(Error::invalid_input(format!("{what} name is empty")));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(Error::invalid_input(format!(
            "{what} name {name:?} is {} bytes long; at most {MAX_NAME_LEN} are allowed",
            name.len()
        )));
    }
    // A byte outside the set, which includes every byte of a non-ASCII character, fails the
    // name, and only then is the offending character looked for.
    if !all_name_bytes(name.as_bytes())
        && let Some(bad) = name
            .chars()
            .find(|c| !c.is_ascii() || !is_name_byte(*c as u8))
    {
        return Err(Error::invalid_input(format!(
            "{what} name {name:?} contains {bad:?}; only ASCII letters, digits, '.', '_' and '-' are allowed"
        )));
    }
    Ok(())
}

/// Whether every byte of `bytes` may appear in a name. Every publish checks its topic, so
/// the bytes are tested 16 at a time, without stopping at the first bad one (a byte-table
/// walk cost 366 instructions for a 60-byte name): whole blocks of 16, then the 16 bytes
/// ending the name, overlapping the last block, instead of a byte-at-a-time tail.
fn all_name_bytes(bytes: &[u8]) -> bool {
    fn block(block: &[u8; 16]) -> bool {
        block.iter().fold(true, |ok, &b| ok & is_name_byte(b))
    }
    let Some(last) = bytes.last_chunk::<16>() else {
        return bytes.iter().all(|&b| is_name_byte(b));
    };
    let (blocks, _) = bytes.as_chunks::<16>();
    blocks.iter().fold(block(last), |ok, b| ok & block(b))
}

/// Whether `b` may appear in a name: an ASCII letter or digit, `.`, `_` or `-`. Written with
/// comparisons and `&`/`|` only, no branch or table, so a loop over a name vectorises.
const fn is_name_byte(b: u8) -> bool {
    let letter = (b | 0x20).wrapping_sub(b'a') < 26;
    let digit = b.wrapping_sub(b'0') < 10;
    letter | digit | (b == b'.') | (b == b'_') | (b == b'-')
}

/// Check that `message`'s payload fits `limit` bytes, the largest payload `backend` accepts.
///
/// # Errors
/// [`ErrorKind::PayloadTooLarge`](crate::error::ErrorKind::PayloadTooLarge) with both sizes.
pub fn check_payload_size(
    backend: &str,
    message: &crate::message::Message,
    limit: usize,
) -> Result<()> {
    let size = message.payload().len();
    if size > limit {
        return Err(Error::new(
            crate::error::ErrorKind::PayloadTooLarge,
            format!(
                "payload of {size} bytes exceeds the {backend} backend's limit of {limit} bytes"
            ),
        ));
    }
    Ok(())
}

/// Distinct topics labelled by name by default; later ones share [`OTHER_TOPICS`].
pub const DEFAULT_MAX_TOPIC_LABELS: usize = 100;

/// The `topic` label of every topic past the bound.
pub const OTHER_TOPICS: &str = "_other";

/// A bounded set of topic labels: the first topics keep their names, the rest share
/// [`OTHER_TOPICS`], so metrics labelled by topic have a bounded number of series. One
/// [`ObservedBroker`](crate::observe::ObservedBroker) (and its clones) uses one; a
/// [`DeadLetterQueue`](crate::dlq::DeadLetterQueue) can share it.
#[derive(Debug)]
pub struct TopicLabels {
    max: usize,
    seen: Mutex<HashSet<Arc<str>>>,
}

impl TopicLabels {
    /// At most `max` topics labelled by name (0: every topic is [`OTHER_TOPICS`]).
    pub fn new(max: usize) -> Self {
        TopicLabels {
            max,
            seen: Mutex::new(HashSet::new()),
        }
    }

    /// How many topics keep their own label.
    pub fn max(&self) -> usize {
        self.max
    }

    /// The label `topic` is recorded under: its name while there is room or once it has
    /// one, else [`OTHER_TOPICS`].
    pub fn label(&self, topic: &str) -> Arc<str> {
        let mut seen = self.seen.lock();
        if let Some(known) = seen.get(topic) {
            return known.clone();
        }
        if seen.len() < self.max {
            let label: Arc<str> = Arc::from(topic);
            seen.insert(label.clone());
            return label;
        }
        Arc::from(OTHER_TOPICS)
    }
}

impl Default for TopicLabels {
    fn default() -> Self {
        TopicLabels::new(DEFAULT_MAX_TOPIC_LABELS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    #[test]
    fn accepts_seed_names_and_refuses_bad_ones() {
        validate_name("topic", "helixagent.tasks.llm").expect("seed name is valid");
        validate_name("group", "helixagent-workers_2").expect("group name is valid");
        for bad in ["", "a b", "tasks/llm", "ü", &"x".repeat(250)] {
            let err = validate_name("topic", bad).expect_err(bad);
            assert_eq!(err.kind(), ErrorKind::InvalidInput);
            assert!(err.to_string().contains("topic name"), "{err}");
        }
    }

    #[test]
    fn the_byte_test_allows_exactly_the_name_set_of_all_256_bytes() {
        for b in 0..=255u8 {
            let allowed = b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-');
            assert_eq!(is_name_byte(b), allowed, "byte {b:#04x}");
        }
    }

    #[test]
    fn a_bad_character_anywhere_in_a_name_of_any_length_is_found() {
        for len in [1, 15, 16, 17, 31, 32, 33, 60, MAX_NAME_LEN] {
            let good = "a".repeat(len);
            validate_name("topic", &good).expect("letters only");
            for at in 0..len {
                let mut bad = good.clone().into_bytes();
                bad[at] = b'/';
                let bad = String::from_utf8(bad).unwrap();
                let err = validate_name("topic", &bad).expect_err(&bad);
                assert!(err.to_string().contains("'/'"), "{err}");
            }
        }
    }

    #[test]
    fn exactly_ascii_letters_digits_dot_underscore_and_dash_are_allowed() {
        for c in (0u8..128).map(char::from).chain(['é', '\u{2024}']) {
            let name = format!("a{c}b");
            let allowed = c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
            match validate_name("topic", &name) {
                Ok(()) => assert!(allowed, "{name:?} was accepted"),
                Err(err) => {
                    assert!(!allowed, "{name:?} was refused: {err}");
                    assert!(err.to_string().contains(&format!("{c:?}")), "{err}");
                }
            }
        }
    }
}
