//! The log level of the shipped programs (`admin_server`, `helixctl`) from HelixAgent's
//! variables, as a `tracing_subscriber::EnvFilter` directive string (so this crate needs no
//! subscriber of its own).

use helix_messaging_core::{Error, Result};

/// The standard Rust filter variable; when set it wins over the two below.
pub const RUST_LOG_VAR: &str = "RUST_LOG";
/// Level of every crate: `error`, `warn`, `info`, `debug` or `trace` (HelixAgent's `LOG_LEVEL`).
pub const LOG_LEVEL_VAR: &str = "LOG_LEVEL";
/// `true` logs helix-messaging's own crates at `debug` whatever `LOG_LEVEL` says.
pub const MESSAGING_DEBUG_VAR: &str = "MESSAGING_DEBUG";

/// Targets of this project's crates and programs. A directive's target matches every module
/// path it prefixes, so `helix_messaging` covers each `helix_messaging_*` crate too.
const HELIX_TARGETS: &[&str] = &["helix_messaging", "helixctl", "admin_server"];

/// The filter directives the variables read through `lookup` describe: `RUST_LOG` as it is
/// when set; otherwise `LOG_LEVEL` (or `default_level` when unset), with
/// `helix_messaging…=debug` added when `MESSAGING_DEBUG` is true. `RUST_LOG` is taken whole
/// because it is the finer tool: whoever sets it has said what they want per crate.
///
/// # Errors
/// [`ErrorKind::Config`](helix_messaging_core::ErrorKind::Config) naming `LOG_LEVEL` or
/// `MESSAGING_DEBUG` when its value is not one of those listed.
pub fn log_directives(
    lookup: impl Fn(&str) -> Option<String>,
    default_level: &str,
) -> Result<String> {
    let var = |name: &str| {
        lookup(name)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    };
    // Both are checked even under RUST_LOG, so a typo is reported rather than silently
    // ignored once RUST_LOG is unset.
    let level = match var(LOG_LEVEL_VAR) {
        None => default_level.to_owned(),
        Some(level) => match level.to_ascii_lowercase().as_str() {
            l @ ("error" | "warn" | "info" | "debug" | "trace" | "off") => l.to_owned(),
            // Go's loggers (logrus, zap) spell it so.
            "warning" => "warn".to_owned(),
            _ => {
                return Err(Error::config(
                    LOG_LEVEL_VAR,
                    format!("expected error, warn, info, debug or trace, got {level:?}"),
                ));
            }
        },
    };
    let debug = match var(MESSAGING_DEBUG_VAR) {
        None => false,
        Some(flag) => match flag.to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => true,
            "false" | "0" | "no" | "off" => false,
            _ => {
                return Err(Error::config(
                    MESSAGING_DEBUG_VAR,
                    format!("expected true or false, got {flag:?}"),
                ));
            }
        },
    };
    if let Some(filter) = var(RUST_LOG_VAR) {
        return Ok(filter);
    }
    let mut directives = level;
    if debug {
        for target in HELIX_TARGETS {
            directives.push_str(&format!(",{target}=debug"));
        }
    }
    Ok(directives)
}

#[cfg(test)]
mod tests {
    use super::*;
    use helix_messaging_core::ErrorKind;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> + use<> {
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        }
    }

    #[test]
    fn rust_log_wins_then_log_level_then_the_default() {
        assert_eq!(log_directives(vars(&[]), "info").unwrap(), "info");
        assert_eq!(
            log_directives(vars(&[("LOG_LEVEL", "DEBUG")]), "info").unwrap(),
            "debug"
        );
        assert_eq!(
            log_directives(vars(&[("LOG_LEVEL", "warning")]), "info").unwrap(),
            "warn"
        );
        assert_eq!(
            log_directives(
                vars(&[("RUST_LOG", "lapin=trace"), ("LOG_LEVEL", "error")]),
                "info"
            )
            .unwrap(),
            "lapin=trace"
        );
    }

    #[test]
    fn messaging_debug_raises_the_helix_crates_only() {
        let directives = log_directives(
            vars(&[("LOG_LEVEL", "warn"), ("MESSAGING_DEBUG", "true")]),
            "info",
        )
        .unwrap();
        assert_eq!(
            directives,
            "warn,helix_messaging=debug,helixctl=debug,admin_server=debug"
        );
        assert_eq!(
            log_directives(vars(&[("MESSAGING_DEBUG", "false")]), "info").unwrap(),
            "info"
        );
    }

    #[test]
    fn malformed_values_name_their_variable() {
        for (pairs, variable) in [
            (vec![("LOG_LEVEL", "verbose")], "LOG_LEVEL"),
            (vec![("MESSAGING_DEBUG", "very")], "MESSAGING_DEBUG"),
            (
                vec![("RUST_LOG", "info"), ("LOG_LEVEL", "loud")],
                "LOG_LEVEL",
            ),
        ] {
            let err = log_directives(vars(&pairs), "info").expect_err(variable);
            assert_eq!(err.kind(), ErrorKind::Config);
            assert!(err.to_string().contains(variable), "{err}");
        }
    }
}
