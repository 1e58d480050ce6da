//! The admin API's settings: its two tokens, where it listens, TLS, and the transport's
//! limits, from the environment or set in code.

use helix_messaging_core::settings::paired_files;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Variable holding the admin token: every request may carry it, and every request that
/// changes something must.
pub const TOKEN_VAR: &str = "MESSAGING_ADMIN_TOKEN";
/// Variable holding the optional read-only token: health, metrics, listings and progress
/// (every `GET`), and nothing that changes state (403).
pub const READ_TOKEN_VAR: &str = "MESSAGING_ADMIN_READ_TOKEN";
/// Variable holding the address to listen on (default [`DEFAULT_ADDR`]).
pub const ADDR_VAR: &str = "MESSAGING_ADMIN_ADDR";
/// Variable holding the PEM certificate chain to serve TLS with (with [`TLS_KEY_VAR`]).
pub const TLS_CERT_VAR: &str = "MESSAGING_ADMIN_TLS_CERT";
/// Variable holding the PEM private key of [`TLS_CERT_VAR`]'s certificate.
pub const TLS_KEY_VAR: &str = "MESSAGING_ADMIN_TLS_KEY";
/// Variable that, set to `true`, lets [`serve`](crate::transport::serve) listen on an
/// address other than loopback without TLS (behind a proxy that terminates TLS, say).
pub const ALLOW_PLAINTEXT_VAR: &str = "MESSAGING_ADMIN_ALLOW_PLAINTEXT";
/// Loopback only, on HelixAgent's port: exposing the API is a decision, not a default.
pub const DEFAULT_ADDR: &str = "127.0.0.1:7061";
/// Largest request body accepted by default (1 MiB).
pub const DEFAULT_BODY_LIMIT: usize = 1024 * 1024;
/// The shortest token accepted, in bytes: 16 random characters resist guessing over the
/// network; a word does not.
pub const MIN_TOKEN_LEN: usize = 16;
/// How long a client has to send a request's headers, from connecting or from the end of
/// its previous request, before the connection is closed.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a request may take, reading its body included, before it is answered 503.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Most connections open at once; beyond it a new one waits to be accepted.
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
/// Most requests under way at once, the root probes apart; beyond it a request is answered
/// 503 at once rather than queued.
pub const DEFAULT_MAX_CONCURRENT_REQUESTS: usize = 64;

/// What can go wrong setting the admin API up.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// A setting is missing or malformed; the message names the variable.
    #[error("{var}: {reason}")]
    Config {
        /// The variable (or field) at fault.
        var: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The address could not be listened on.
    #[error("admin API: cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The server stopped with an I/O error.
    #[error("admin API: {0}")]
    Serve(#[from] std::io::Error),
    /// The Prometheus recorder could not be installed (another recorder is installed).
    #[error("admin API: cannot install the Prometheus recorder: {0}")]
    Prometheus(String),
}

/// Where the TLS certificate chain and its key are (PEM files).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate chain, leaf first.
    pub cert: PathBuf,
    /// The leaf's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// The admin API's settings.
#[derive(Clone)]
pub struct AdminConfig {
    pub(crate) token: Arc<str>,
    pub(crate) read_token: Option<Arc<str>>,
    /// Where [`serve`](crate::transport::serve) listens.
    pub addr: SocketAddr,
    /// Largest request body, in bytes (413 beyond it).
    pub body_limit: usize,
    /// Serve HTTPS with this certificate rather than plain HTTP.
    pub tls: Option<TlsFiles>,
    /// Let [`serve`](crate::transport::serve) listen beyond loopback without TLS.
    pub allow_plaintext: bool,
    /// See [`DEFAULT_HEADER_READ_TIMEOUT`].
    pub header_read_timeout: Duration,
    /// See [`DEFAULT_REQUEST_TIMEOUT`].
    pub request_timeout: Duration,
    /// See [`DEFAULT_MAX_CONNECTIONS`].
    pub max_connections: usize,
    /// See [`DEFAULT_MAX_CONCURRENT_REQUESTS`].
    pub max_concurrent_requests: usize,
}

impl std::fmt::Debug for AdminConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The tokens are secrets: never printed.
        f.debug_struct("AdminConfig")
            .field("token", &"<redacted>")
            .field(
                "read_token",
                &self.read_token.as_ref().map(|_| "<redacted>"),
            )
            .field("addr", &self.addr)
            .field("body_limit", &self.body_limit)
            .field("tls", &self.tls)
            .field("allow_plaintext", &self.allow_plaintext)
            .field("header_read_timeout", &self.header_read_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("max_connections", &self.max_connections)
            .field("max_concurrent_requests", &self.max_concurrent_requests)
            .finish()
    }
}

/// A token as given, checked: at least [`MIN_TOKEN_LEN`] bytes of printable ASCII (it
/// travels in a header).
fn checked_token(var: &'static str, token: String) -> Result<Arc<str>, AdminError> {
    let token = token.trim();
    if token.len() < MIN_TOKEN_LEN {
        return Err(AdminError::Config {
            var,
            reason: format!(
                "the token is {} bytes long; at least {MIN_TOKEN_LEN} are needed (e.g. `openssl rand -hex 16`)",
                token.len()
            ),
        });
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(AdminError::Config {
            var,
            reason: "the token holds whitespace, a control character or a character beyond ASCII; it travels in an HTTP header, so it is printable ASCII".into(),
        });
    }
    Ok(token.into())
}

impl AdminConfig {
    /// Settings with the admin `token`, no read-only token, on [`DEFAULT_ADDR`] without TLS,
    /// with the default limits.
    ///
    /// # Errors
    /// [`AdminError::Config`] for a token shorter than [`MIN_TOKEN_LEN`] or holding anything
    /// but printable ASCII.
    pub fn new(token: impl Into<String>) -> Result<Self, AdminError> {
        Ok(AdminConfig {
            token: checked_token(TOKEN_VAR, token.into())?,
            read_token: None,
            addr: DEFAULT_ADDR.parse().expect("a valid default address"),
            body_limit: DEFAULT_BODY_LIMIT,
            tls: None,
            allow_plaintext: false,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_concurrent_requests: DEFAULT_MAX_CONCURRENT_REQUESTS,
        })
    }

    /// Also accept `token` for reading: every `GET` (health, metrics, listings, progress),
    /// and a 403 for anything that changes state.
    ///
    /// # Errors
    /// [`AdminError::Config`] naming [`READ_TOKEN_VAR`] for a token shorter than
    /// [`MIN_TOKEN_LEN`], holding anything but printable ASCII, or equal to the admin token (which would make
    /// every holder an admin).
    pub fn with_read_token(mut self, token: impl Into<String>) -> Result<Self, AdminError> {
        let token = checked_token(READ_TOKEN_VAR, token.into())?;
        if token == self.token {
            return Err(AdminError::Config {
                var: READ_TOKEN_VAR,
                reason: format!(
                    "the read-only token is the admin token ({TOKEN_VAR}); give it a token of its own"
                ),
            });
        }
        self.read_token = Some(token);
        Ok(self)
    }

    /// Settings from `MESSAGING_ADMIN_TOKEN` (required), `MESSAGING_ADMIN_READ_TOKEN`,
    /// `MESSAGING_ADMIN_ADDR`, `MESSAGING_ADMIN_TLS_CERT` with `MESSAGING_ADMIN_TLS_KEY`,
    /// and `MESSAGING_ADMIN_ALLOW_PLAINTEXT`.
    ///
    /// # Errors
    /// [`AdminError::Config`] naming the variable that is missing or malformed.
    pub fn from_env() -> Result<Self, AdminError> {
        AdminConfig::from_vars(|var| std::env::var(var).ok())
    }

    /// [`AdminConfig::from_env`] over any lookup (for tests and other config sources).
    ///
    /// # Errors
    /// As [`AdminConfig::from_env`].
    pub fn from_vars(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, AdminError> {
        let set = |var: &str| lookup(var).filter(|v| !v.trim().is_empty());
        let token = set(TOKEN_VAR).ok_or(AdminError::Config {
            var: TOKEN_VAR,
            reason: "not set; the admin API refuses to run without a token".into(),
        })?;
        let mut config = AdminConfig::new(token)?;
        if let Some(read) = set(READ_TOKEN_VAR) {
            config = config.with_read_token(read)?;
        }
        if let Some(addr) = set(ADDR_VAR) {
            config.addr = addr.trim().parse().map_err(|err| AdminError::Config {
                var: ADDR_VAR,
                reason: format!("{addr:?} is not an address like 127.0.0.1:7061: {err}"),
            })?;
        }
        config.tls = paired_files(set, TLS_CERT_VAR, TLS_KEY_VAR)
            .map_err(|unpaired| AdminError::Config {
                var: unpaired.missing,
                reason: unpaired.to_string(),
            })?
            .map(|(cert, key)| TlsFiles {
                cert: cert.into(),
                key: key.into(),
            });
        if let Some(allow) = set(ALLOW_PLAINTEXT_VAR) {
            config.allow_plaintext = match allow.trim().to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" => true,
                "false" | "0" | "no" => false,
                _ => {
                    return Err(AdminError::Config {
                        var: ALLOW_PLAINTEXT_VAR,
                        reason: format!("{allow:?} is not true or false"),
                    });
                }
            };
        }
        Ok(config)
    }
}
