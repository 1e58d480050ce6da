//! The tokens the API takes and the scope each grants, compared in constant time; and the
//! rate limit on logging failed attempts.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::http::Method;
use parking_lot::Mutex;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq;

/// How often, at most, a failed authentication is logged; those in between are counted and
/// the count reported with the next line, so a flood of guesses cannot flood the log.
pub const FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Whether `method` only reads: all the read-only token may do.
pub(crate) fn reads_only(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD)
}

/// Which token a request carried (kept in the request's extensions for the audit trail).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scope {
    /// The admin token: anything.
    Admin,
    /// The read-only token: `GET` and `HEAD` only.
    Read,
}

impl Scope {
    pub(crate) const fn as_str(self) -> &'static str {
        match self {
            Scope::Admin => "admin",
            Scope::Read => "read",
        }
    }
}

/// A token's SHA-256 digest: tokens are compared as digests, all of one length, so neither
/// their content nor their length shows in how long a comparison takes.
type Digest = [u8; 32];

fn digest(token: &str) -> Digest {
    Sha256::digest(token.as_bytes()).into()
}

/// The tokens (as digests), and the rate limit on logging failures.
pub(crate) struct Tokens {
    admin: Digest,
    read: Option<Digest>,
    failures: Mutex<FailureLog>,
}

#[derive(Default)]
struct FailureLog {
    last_logged: Option<Instant>,
    suppressed: u64,
}

impl Tokens {
    pub(crate) fn new(admin: &str, read: Option<&str>) -> Self {
        Tokens {
            admin: digest(admin),
            read: read.map(digest),
            failures: Mutex::default(),
        }
    }

    /// The scope `presented` grants, compared in constant time so the answer's timing does
    /// not leak a token.
    pub(crate) fn scope_of(&self, presented: &str) -> Option<Scope> {
        let presented = digest(presented);
        let matches = |token: &Digest| bool::from(presented.ct_eq(token));
        // Both are compared whatever the first gives, for the same reason.
        let admin = matches(&self.admin);
        let read = self.read.as_ref().is_some_and(matches);
        if admin {
            Some(Scope::Admin)
        } else if read {
            Some(Scope::Read)
        } else {
            None
        }
    }

    /// Log a failed attempt unless one was logged within [`FAILURE_LOG_INTERVAL`].
    pub(crate) fn log_failure(
        &self,
        client: Option<SocketAddr>,
        method: &Method,
        path: &str,
        why: &str,
    ) {
        let suppressed = {
            let mut log = self.failures.lock();
            let now = Instant::now();
            if log
                .last_logged
                .is_some_and(|at| now.duration_since(at) < FAILURE_LOG_INTERVAL)
            {
                log.suppressed += 1;
                return;
            }
            log.last_logged = Some(now);
            std::mem::take(&mut log.suppressed)
        };
        tracing::warn!(
            target: "helix_messaging_admin::auth",
            client = client.map(|c| c.to_string()),
            method = %method,
            path,
            why,
            suppressed,
            "admin API: authentication failed ({suppressed} more since the last such line)"
        );
    }
}
