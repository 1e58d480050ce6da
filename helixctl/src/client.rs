//! Talking to the admin API: the token and trust settings, requests with ids put safely into
//! paths, and answers read into the admin API's own types (`helix_messaging_admin::api`).

use std::path::Path;
use std::time::Duration;

use helix_messaging_admin::api::ErrorBody;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde::de::DeserializeOwned;
use serde_json::Value;

/// Why a command failed, and the exit status that says so.
#[derive(Debug)]
pub(crate) enum Failure {
    /// The API refused or failed the request (exit 1); `status` is the HTTP status, if
    /// there was an answer.
    Api {
        /// The answer's HTTP status.
        status: Option<u16>,
        /// Why.
        message: String,
    },
    /// No token, or the API refused it (exit 3).
    Auth {
        /// The answer's HTTP status (401), if there was an answer.
        status: Option<u16>,
        /// Why.
        message: String,
    },
    /// The API or the broker could not be reached (exit 4).
    Unreachable(String),
    /// Bad usage: a flag's value or combination (exit 2, as clap's own usage errors).
    Usage(String),
}

impl Failure {
    /// A failure without an HTTP answer.
    pub(crate) fn api(message: impl Into<String>) -> Self {
        Failure::Api {
            status: None,
            message: message.into(),
        }
    }

    /// The process's exit status for it.
    pub(crate) fn exit_code(&self) -> u8 {
        match self {
            Failure::Api { .. } => 1,
            Failure::Usage(_) => 2,
            Failure::Auth { .. } => 3,
            Failure::Unreachable(_) => 4,
        }
    }

    /// The line printed without `--json`: the HTTP status first when there was one.
    pub(crate) fn text(&self) -> String {
        match self {
            Failure::Api {
                status: Some(status),
                message,
            } => format!("{status}: {message}"),
            Failure::Api { message, .. }
            | Failure::Auth { message, .. }
            | Failure::Unreachable(message)
            | Failure::Usage(message) => message.clone(),
        }
    }

    /// The JSON printed with `--json`: the API's own error shape.
    pub(crate) fn body(&self) -> ErrorBody {
        match self {
            Failure::Api { status, message } | Failure::Auth { status, message } => {
                ErrorBody::new(*status, message.clone())
            }
            Failure::Unreachable(message) | Failure::Usage(message) => {
                ErrorBody::new(None, message.clone())
            }
        }
    }
}

/// Where the token came from when none of `--token`, `--token-file` is given.
pub(crate) const TOKEN_VAR: &str = "MESSAGING_ADMIN_TOKEN";
/// The variable naming a token file, read when nothing else gives the token.
pub(crate) const TOKEN_FILE_VAR: &str = "MESSAGING_ADMIN_TOKEN_FILE";

/// The bearer token, by the precedence `--help` documents: `--token` or `--token-file`
/// (clap refuses both), then [`TOKEN_VAR`], then the file [`TOKEN_FILE_VAR`] names.
/// Variables are read through `var`, and an empty one counts as unset.
pub(crate) fn token(
    flag: Option<String>,
    file_flag: Option<&Path>,
    var: impl Fn(&str) -> Option<String>,
) -> Result<String, Failure> {
    if let Some(token) = flag {
        if token.trim().is_empty() {
            return Err(Failure::Usage("--token: the token is empty".into()));
        }
        // Trimmed as the server trims its own: a pasted token often carries a newline.
        return Ok(token.trim().to_owned());
    }
    if let Some(path) = file_flag {
        return token_file("--token-file", path);
    }
    let var = |name: &str| var(name).filter(|v| !v.trim().is_empty());
    if let Some(token) = var(TOKEN_VAR) {
        return Ok(token.trim().to_owned());
    }
    if let Some(path) = var(TOKEN_FILE_VAR) {
        return token_file(TOKEN_FILE_VAR, Path::new(&path));
    }
    Err(Failure::Auth {
        status: None,
        message: format!(
            "no token: pass --token or --token-file, or set {TOKEN_VAR} or {TOKEN_FILE_VAR}"
        ),
    })
}

/// The token in the file at `path` (`source` names where the path came from), trimmed of
/// surrounding whitespace: files written by `echo` or an editor end with a newline.
fn token_file(source: &str, path: &Path) -> Result<String, Failure> {
    let content = std::fs::read_to_string(path).map_err(|err| {
        Failure::Usage(format!(
            "{source}: cannot read the token file {}: {err}",
            path.display()
        ))
    })?;
    let token = content.trim();
    if token.is_empty() {
        return Err(Failure::Usage(format!(
            "{source}: the token file {} is empty",
            path.display()
        )));
    }
    Ok(token.to_owned())
}

/// Everything but RFC 3986's unreserved characters: `/`, `?`, `#`, `%` and the rest are
/// data inside an id, never path syntax.
const PATH_SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// `id` as one percent-encoded path segment.
///
/// # Errors
/// [`Failure::Usage`] for an empty id, `.` or `..`: URL parsers resolve those (encoded or
/// not) as relative segments, so no request could name them.
pub(crate) fn segment(id: &str) -> Result<String, Failure> {
    if id.is_empty() || id == "." || id == ".." {
        return Err(Failure::Usage(format!(
            "the id {id:?} cannot be put in a URL path"
        )));
    }
    Ok(utf8_percent_encode(id, PATH_SEGMENT).to_string())
}

/// `key=value` pairs for a query string, percent-encoded.
pub(crate) fn query(pairs: &[(&str, Option<String>)]) -> String {
    let mut url = reqwest::Url::parse("http://query.invalid/").expect("a valid URL");
    {
        let mut q = url.query_pairs_mut();
        for (k, v) in pairs {
            if let Some(v) = v {
                q.append_pair(k, v);
            }
        }
    }
    url.query().map(|q| format!("?{q}")).unwrap_or_default()
}

/// A client of one admin API.
pub(crate) struct Api {
    client: reqwest::Client,
    base: String,
    token: String,
}

impl Api {
    /// A client of the API at `base` sending `token`, trusting the CA certificates in the
    /// PEM file `ca_cert` besides the public roots.
    pub(crate) fn new(
        base: String,
        token: String,
        ca_cert: Option<&Path>,
    ) -> Result<Self, Failure> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(30));
        if let Some(path) = ca_cert {
            for cert in ca_certificates(path)? {
                builder = builder.add_root_certificate(cert);
            }
        }
        let client = builder
            .build()
            .map_err(|err| Failure::Usage(format!("the HTTP client: {}", chain(&err))))?;
        Ok(Api {
            client,
            base,
            token,
        })
    }

    /// Send `method` to `path` with `body`, and read the answer as a `T`.
    pub(crate) async fn call<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<T, Failure> {
        let url = format!("{}{path}", self.base.trim_end_matches('/'));
        let mut request = self.client.request(method, &url).bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request
            .send()
            .await
            .map_err(|err| unreachable(&self.base, &err))?;
        let status = response.status().as_u16();
        let text = response.text().await.map_err(|err| {
            Failure::Unreachable(format!("the admin API's answer broke off: {}", chain(&err)))
        })?;
        // Health answers 503 with a body worth showing when a side is down.
        let answered =
            (200..300).contains(&status) || (status == 503 && path == "/v1/messaging/health");
        if answered {
            return serde_json::from_str(&text).map_err(|err| {
                Failure::api(format!(
                    "the admin API answered {status} with a body helixctl does not read \
                     ({err}): {text}"
                ))
            });
        }
        let message = serde_json::from_str::<ErrorBody>(&text)
            .map(|body| body.error.message)
            .unwrap_or(text);
        Err(if status == 401 {
            Failure::Auth {
                status: Some(status),
                message: format!(
                    "authentication failed ({message}): check --token, --token-file, \
                     {TOKEN_VAR} or {TOKEN_FILE_VAR}"
                ),
            }
        } else {
            Failure::Api {
                status: Some(status),
                message,
            }
        })
    }

    /// `GET path`, read as a `T`.
    pub(crate) async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, Failure> {
        self.call(reqwest::Method::GET, path, None).await
    }
}

/// The certificates in the PEM file at `path`.
fn ca_certificates(path: &Path) -> Result<Vec<reqwest::Certificate>, Failure> {
    let flag = "--ca-cert (MESSAGING_ADMIN_CA_CERT)";
    let pem = std::fs::read(path)
        .map_err(|err| Failure::Usage(format!("{flag}: cannot read {}: {err}", path.display())))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|err| {
        Failure::Usage(format!(
            "{flag}: {} is not a PEM certificate: {}",
            path.display(),
            chain(&err)
        ))
    })?;
    if certs.is_empty() {
        return Err(Failure::Usage(format!(
            "{flag}: {} holds no PEM certificate",
            path.display()
        )));
    }
    Ok(certs)
}

/// A failed request as [`Failure::Unreachable`], with every cause: reqwest's own message
/// alone ("error sending request") does not say whether DNS, TCP or TLS failed.
fn unreachable(base: &str, err: &reqwest::Error) -> Failure {
    let causes = chain(err);
    let hint = if causes.to_lowercase().contains("certificate") {
        " (a server certificate issued by a CA of your own is trusted with --ca-cert or \
         MESSAGING_ADMIN_CA_CERT)"
    } else {
        ""
    };
    Failure::Unreachable(format!(
        "cannot reach the admin API at {base}: {causes}{hint}"
    ))
}

/// `err` and its sources, each said once.
fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let said = cause.to_string();
        if !text.contains(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::client::{Failure, TOKEN_FILE_VAR, TOKEN_VAR, segment, token};

    #[test]
    fn ids_are_one_segment_with_only_unreserved_characters_left_as_they_are() {
        let cases = [
            ("x/../other", "x%2F..%2Fother"),
            ("id#", "id%23"),
            ("a?b", "a%3Fb"),
            ("sp ace", "sp%20ace"),
            ("50%", "50%25"),
            ("é", "%C3%A9"),
            ("A-z_0.9~", "A-z_0.9~"),
        ];
        for (id, encoded) in cases {
            assert_eq!(segment(id).unwrap(), encoded, "{id:?}");
        }
        for id in ["", ".", ".."] {
            assert!(matches!(segment(id), Err(Failure::Usage(_))), "{id:?}");
        }
    }

    #[test]
    fn the_token_flag_beats_the_file_flag_beats_the_variables() {
        let vars = |name: &str| match name {
            TOKEN_VAR => Some("from-var".to_owned()),
            TOKEN_FILE_VAR => Some("/nonexistent/token".to_owned()),
            _ => None,
        };
        assert_eq!(token(Some("flag".into()), None, vars).unwrap(), "flag");
        assert_eq!(token(None, None, vars).unwrap(), "from-var");
        let file = |name: &str| (name == TOKEN_FILE_VAR).then(|| "/nonexistent/token".to_owned());
        match token(None, None, file) {
            Err(Failure::Usage(message)) => assert!(message.contains(TOKEN_FILE_VAR), "{message}"),
            other => panic!("{other:?}"),
        }
        match token(None, Some(Path::new("/nonexistent/token")), vars) {
            Err(Failure::Usage(message)) => assert!(message.contains("--token-file"), "{message}"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            token(None, None, |_| None),
            Err(Failure::Auth { status: None, .. })
        ));
    }
}
