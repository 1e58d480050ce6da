//! What the `admin_server` tests share.

#![allow(dead_code)]

/// The test Redis (`REDIS_URL`, default `redis://127.0.0.1:6379`) in database `db`: every
/// `admin_server` consumes the same well-known DLQ topics, so tests that run one at the same
/// time each take a database of their own, or one's dead letters reach another's DLQ.
pub(crate) fn redis_in_db(db: u8) -> String {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let url = url.trim_end_matches('/');
    let base = match url.rsplit_once('/') {
        Some((head, tail))
            if !tail.is_empty()
                && tail.bytes().all(|b| b.is_ascii_digit())
                && !head.ends_with('/') =>
        {
            head
        }
        _ => url,
    };
    format!("{base}/{db}")
}
