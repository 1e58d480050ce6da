//! Which backends exist, which are compiled in, and building them.

use std::fmt::Write as _;
use std::sync::Arc;

use helix_messaging_core::{Broker, Capabilities, Error, Result};

/// A backend this crate knows about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackendInfo {
    /// Value of `MESSAGING_BACKEND` (and URL scheme) selecting it.
    pub name: &'static str,
    /// Cargo feature of `helix-messaging` that compiles it in.
    pub feature: &'static str,
}

/// Every backend the crate can be built with, compiled in or not.
pub const KNOWN_BACKENDS: &[BackendInfo] = &[BackendInfo {
    name: "memory",
    feature: "memory",
}];

/// The compiled-in backends with what each promises.
// One cfg-gated push per backend feature, so `vec![]` cannot express it.
#[allow(clippy::vec_init_then_push)]
pub fn compiled_backends() -> Vec<(BackendInfo, Capabilities)> {
    #[allow(unused_mut)]
    let mut out = Vec::new();
    #[cfg(feature = "memory")]
    out.push((KNOWN_BACKENDS[0], helix_messaging_memory::CAPABILITIES));
    out
}

/// The backend capability table as Markdown, one row per compiled-in backend (the README's
/// table is checked against this).
pub fn capability_table() -> String {
    let columns = Capabilities::NONE.flags();
    let mut out = String::from("| Backend |");
    for (title, _) in columns {
        let _ = write!(out, " {title} |");
    }
    out.push_str("\n|---|");
    for _ in columns {
        out.push_str(":-:|");
    }
    for (info, caps) in compiled_backends() {
        let _ = write!(out, "\n| `{}` |", info.name);
        for (_, supported) in caps.flags() {
            out.push_str(if supported { " ✓ |" } else { " — |" });
        }
    }
    out.push('\n');
    out
}

/// Map a requested backend name to a known, compiled-in backend.
pub(crate) fn resolve(requested: &str, source: &str) -> Result<BackendInfo> {
    let compiled: Vec<&str> = compiled_backends().iter().map(|(b, _)| b.name).collect();
    let compiled_list = if compiled.is_empty() {
        "none (enable a backend feature of helix-messaging)".to_owned()
    } else {
        compiled.join(", ")
    };
    match KNOWN_BACKENDS.iter().find(|b| b.name == requested) {
        Some(known) if compiled.contains(&known.name) => Ok(*known),
        Some(known) => Err(Error::config(
            source,
            format!(
                "backend {:?} is not compiled in; enable the Cargo feature \"{}\" of helix-messaging (compiled-in backends: {compiled_list})",
                known.name, known.feature
            ),
        )),
        None => {
            let known: Vec<String> = KNOWN_BACKENDS
                .iter()
                .map(|b| format!("{} (feature \"{}\")", b.name, b.feature))
                .collect();
            Err(Error::config(
                source,
                format!(
                    "unknown backend {requested:?}; compiled-in backends: {compiled_list}; all backends: {}",
                    known.join(", ")
                ),
            ))
        }
    }
}

/// Build a compiled-in backend, reading its variables through `lookup`.
pub(crate) async fn build(
    backend: BackendInfo,
    lookup: &(impl Fn(&str) -> Option<String> + ?Sized),
) -> Result<Arc<dyn Broker>> {
    let _ = lookup;
    match backend.name {
        #[cfg(feature = "memory")]
        "memory" => Ok(Arc::new(helix_messaging_memory::MemoryBroker::new())),
        other => Err(Error::config(
            "MESSAGING_BACKEND",
            format!("backend {other:?} is not compiled in"),
        )),
    }
}
