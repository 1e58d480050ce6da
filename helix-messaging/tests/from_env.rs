//! Backend selection from `MESSAGING_BACKEND` and URLs.

use helix_messaging::{ErrorKind, HealthStatus, from_vars};
use helix_messaging_testkit::env_lookup as vars;

#[tokio::test]
async fn unset_or_empty_backend_means_memory() {
    for lookup in [vars(&[]), vars(&[("MESSAGING_BACKEND", "  ")])] {
        let broker = from_vars(lookup).await.expect("memory broker");
        assert_eq!(broker.name(), "memory");
        assert_eq!(broker.health().await.status, HealthStatus::Healthy);
    }
}

#[tokio::test]
async fn backend_name_is_case_insensitive() {
    let broker = from_vars(vars(&[("MESSAGING_BACKEND", "Memory")]))
        .await
        .expect("memory broker");
    assert_eq!(broker.name(), "memory");
}

#[tokio::test]
async fn unknown_backend_names_the_variable_and_lists_compiled_in_backends() {
    let err = from_vars(vars(&[("MESSAGING_BACKEND", "nope")]))
        .await
        .expect_err("unknown backend");
    assert_eq!(err.kind(), ErrorKind::Config);
    let text = err.to_string();
    assert!(text.contains("MESSAGING_BACKEND"), "{text}");
    assert!(text.contains("\"nope\""), "{text}");
    assert!(text.contains("compiled-in backends: memory"), "{text}");
}

#[tokio::test]
async fn connect_picks_the_backend_from_the_url_scheme() {
    let broker = helix_messaging::connect("memory://").await.expect("memory");
    assert_eq!(broker.name(), "memory");
    let err = helix_messaging::connect("localhost:5672")
        .await
        .expect_err("no scheme");
    assert_eq!(err.kind(), ErrorKind::Config);
    let err = helix_messaging::connect("gopher://x")
        .await
        .expect_err("unknown scheme");
    assert!(
        err.to_string().contains("unknown backend \"gopher\""),
        "{err}"
    );
}

#[test]
fn every_enabled_backend_feature_compiles_in_its_backends() {
    let compiled: Vec<&str> = helix_messaging::compiled_backends()
        .iter()
        .map(|(info, _)| info.name)
        .collect();
    for info in helix_messaging::KNOWN_BACKENDS {
        let enabled = match info.feature {
            "memory" => cfg!(feature = "memory"),
            "redis" => cfg!(feature = "redis"),
            "rabbitmq" => cfg!(feature = "rabbitmq"),
            "kafka" => cfg!(feature = "kafka"),
            other => panic!("feature {other:?} is missing from this test"),
        };
        assert_eq!(
            compiled.contains(&info.name),
            enabled,
            "backend {} (feature {:?}): compiled in = {}, feature on = {enabled}",
            info.name,
            info.feature,
            compiled.contains(&info.name)
        );
    }
}
