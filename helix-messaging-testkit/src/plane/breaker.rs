//! The breaker check: a [`CircuitBreaker`] driven through seeded permits, outcomes,
//! abandoned calls and time on a paused clock, and its counts and recovery checked. Its own
//! module: it needs no broker, only the seeds.

use std::time::Duration;

use helix_messaging_core::breaker::{BreakerConfig, BreakerState, CircuitBreaker};
use helix_messaging_core::{Error, ErrorKind};

use super::seeds::seeds;
use crate::differential::splitmix;

/// Drive a breaker through a seeded sequence of permits, outcomes, abandoned calls,
/// deliveries and time (on a paused tokio clock), then heal: its probe count must never
/// underflow (a panic in debug builds), and once calls succeed again a half-open or open
/// breaker must close. `Err` describes the seed and the steps on a violation.
///
/// # Errors
/// The violation, with the seed and the steps taken.
pub async fn check_breaker(seed: u64) -> std::result::Result<(), String> {
    let interval = Duration::from_secs(1);
    let breaker = CircuitBreaker::new(
        format!("plane-{seed}"),
        BreakerConfig {
            failure_threshold: 2,
            open_interval: interval,
            half_open_probes: 1 + (seed % 2) as u32,
        },
    )
    .map_err(|e| e.to_string())?;
    let down = Error::new(ErrorKind::Connection, "down").with_retryable(true);
    let mut permits = Vec::new();
    let mut steps = Vec::new();
    for step in 0..300u64 {
        let roll = splitmix(seed ^ step.wrapping_mul(0xA24B_AED4_963E_E407));
        let op = roll % 7;
        steps.push(op);
        let outcome = std::panic::AssertUnwindSafe(async {
            match op {
                0 | 1 => {
                    if let Ok(permit) = breaker.acquire() {
                        permits.push(permit);
                    }
                }
                2 if !permits.is_empty() => {
                    let permit = permits.remove(((roll >> 8) as usize) % permits.len());
                    permit.record(None);
                }
                3 if !permits.is_empty() => {
                    let permit = permits.remove(((roll >> 8) as usize) % permits.len());
                    permit.record(Some(&down));
                }
                4 if !permits.is_empty() => {
                    drop(permits.remove(((roll >> 8) as usize) % permits.len()));
                }
                5 => breaker.observe((roll >> 8).is_multiple_of(2).then_some(&down)),
                _ => tokio::time::advance(interval / 2).await,
            }
        });
        if let Err(panic) = futures::FutureExt::catch_unwind(outcome).await {
            let text = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default();
            return Err(format!(
                "breaker seed {seed}: panicked at step {step} ({text}); steps {steps:?}"
            ));
        }
    }
    // Healed: every call abandoned, the interval passed, calls succeed.
    permits.clear();
    tokio::time::advance(interval).await;
    for _ in 0..3 {
        let _ = breaker.call(async { Ok::<(), Error>(()) }).await;
    }
    match breaker.state() {
        BreakerState::Closed => Ok(()),
        state => Err(format!(
            "breaker seed {seed}: still {state:?} after the broker answered again; steps {steps:?}"
        )),
    }
}

/// [`check_breaker`] over every seed (`HELIX_PLANE_SEEDS`, `HELIX_PLANE_SEED`).
///
/// # Panics
/// On the first seed that breaks the breaker's promise.
pub async fn assert_breaker_holds() {
    for seed in seeds() {
        if let Err(violation) = check_breaker(seed).await {
            panic!("{violation}");
        }
    }
}
