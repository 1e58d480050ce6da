//! Portable topic and group names.

use crate::{Error, Result};

/// Longest topic or group name accepted (Kafka's limit, the strictest of the backends).
pub const MAX_NAME_LEN: usize = 249;

/// Check that `name` is a topic or group name every backend accepts: 1 to
/// [`MAX_NAME_LEN`] ASCII letters, digits, `.`, `_` or `-` (Kafka's rule, the strictest).
///
/// # Errors
/// [`ErrorKind::InvalidInput`](crate::ErrorKind::InvalidInput) saying what is wrong, with the
/// name and what it names (`what`, e.g. "topic").
pub fn validate_name(what: &str, name: &str) -> Result<()> {
    /// The bytes a name may have: ASCII letters, digits, `.`, `_` and `-`.
    const NAME_BYTES: [bool; 256] = {
        let mut allowed = [false; 256];
        let mut b = 0;
        while b < 256 {
            let c = b as u8;
            allowed[b] = c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-');
            b += 1;
        }
        allowed
    };
    if name.is_empty() {
        return Err(Error::invalid_input(format!("{what} name is empty")));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(Error::invalid_input(format!(
            "{what} name {name:?} is {} bytes long; at most {MAX_NAME_LEN} are allowed",
            name.len()
        )));
    }
    // Checked byte by byte (every publish checks its topic): a byte outside the set, which
    // includes every byte of a non-ASCII character, fails the name, and only then is the
    // offending character looked for.
    if !name.bytes().all(|b| NAME_BYTES[usize::from(b)])
        && let Some(bad) = name
            .chars()
            .find(|c| !c.is_ascii() || !NAME_BYTES[*c as usize])
    {
        return Err(Error::invalid_input(format!(
            "{what} name {name:?} contains {bad:?}; only ASCII letters, digits, '.', '_' and '-' are allowed"
        )));
    }
    Ok(())
}

/// Check that `message`'s payload fits `limit` bytes, the largest payload `backend` accepts.
///
/// # Errors
/// [`ErrorKind::PayloadTooLarge`](crate::ErrorKind::PayloadTooLarge) with both sizes.
pub fn check_payload_size(backend: &str, message: &crate::Message, limit: usize) -> Result<()> {
    let size = message.payload().len();
    if size > limit {
        return Err(Error::new(
            crate::ErrorKind::PayloadTooLarge,
            format!(
                "payload of {size} bytes exceeds the {backend} backend's limit of {limit} bytes"
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

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
