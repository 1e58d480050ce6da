//! The faults themselves: what a faulty wrapper does to one call ([`Fault`]), the seeded
//! [`FaultSchedule`] that decides it, and the few helpers every wrapper shares to act on
//! it (the injected errors, and running a call as its fault says). Apart from the wrappers
//! so that the broker, the stores and the harnesses all build on one source of faults.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use helix_messaging_core::{Error, ErrorKind, Result};
use parking_lot::Mutex;

use crate::differential::splitmix;

/// What a faulty wrapper does to one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Nothing: the call goes through.
    Pass,
    /// A retryable connection error before the call reaches the wrapped broker or store.
    Transient,
    /// The call goes through, then fails with a retryable timeout: the ambiguous case.
    AfterTheFact,
    /// The call goes through after this long.
    Delay(Duration),
}

/// A seeded source of faults shared by the wrappers of one run. Cloning shares it.
#[derive(Debug, Clone)]
pub struct FaultSchedule {
    seed: u64,
    /// Percent of calls that get a fault while the schedule is active.
    rate: u64,
    /// Percent of messages the broker refuses for good.
    refuse_rate: u64,
    /// Percent of history entries read back as undecodable.
    undecodable_rate: u64,
    active: Arc<AtomicBool>,
    /// Calls so far per key (a message id, or a kind of store call).
    calls: Arc<Mutex<HashMap<String, u64>>>,
    applied: Arc<Mutex<Vec<String>>>,
}

impl FaultSchedule {
    /// Faults on about `rate` percent of calls and refusals of about `refuse_rate` percent of
    /// messages, from `seed`.
    pub fn new(seed: u64, rate: u64, refuse_rate: u64) -> Self {
        FaultSchedule {
            seed,
            rate,
            refuse_rate,
            undecodable_rate: 0,
            active: Arc::new(AtomicBool::new(true)),
            calls: Arc::default(),
            applied: Arc::default(),
        }
    }

    /// The fault for the next call about `key` (a message id, or a kind of store call).
    pub fn next(&self, key: &str) -> Fault {
        let call = {
            let mut calls = self.calls.lock();
            let n = calls.entry(key.to_owned()).or_default();
            *n += 1;
            *n
        };
        if !self.active.load(Ordering::SeqCst) {
            return Fault::Pass;
        }
        let roll = splitmix(hash(self.seed, key) ^ call.wrapping_mul(0xD6E8_FEB8_6659_FD93));
        if roll % 100 >= self.rate {
            return Fault::Pass;
        }
        let fault = match (roll >> 8) % 3 {
            0 => Fault::Transient,
            1 => Fault::AfterTheFact,
            _ => Fault::Delay(Duration::from_millis((roll >> 16) % 30)),
        };
        self.applied
            .lock()
            .push(format!("{key}, call {call}: {fault:?}"));
        fault
    }

    /// Whether the broker refuses the message `id` (always the same answer for an id, and
    /// also once the schedule is healed: a refusal is the message's, not the moment's).
    pub fn refuses(&self, id: &str) -> bool {
        hash(self.seed ^ 0x5EED, id) % 100 < self.refuse_rate
    }

    /// Also read about `rate` percent of history entries back as undecodable (always the same
    /// entries, by message id), as a backend does with an entry it cannot decode.
    #[must_use]
    pub fn with_undecodable(mut self, rate: u64) -> Self {
        self.undecodable_rate = rate;
        self
    }

    /// Whether the history entry of message `id` reads back as undecodable.
    pub fn undecodable(&self, id: &str) -> bool {
        hash(self.seed ^ 0xDEC0DE, id) % 100 < self.undecodable_rate
    }

    /// No more faults from now on (refusals stay).
    pub fn heal(&self) {
        self.active.store(false, Ordering::SeqCst);
    }

    /// The faults applied so far, in order.
    pub fn applied(&self) -> Vec<String> {
        self.applied.lock().clone()
    }
}

pub(super) fn hash(seed: u64, key: &str) -> u64 {
    key.bytes().fold(seed, |h, b| splitmix(h ^ u64::from(b)))
}

pub(super) fn transient(what: &str) -> Error {
    Error::new(
        ErrorKind::Connection,
        format!("injected fault: {what} lost the connection"),
    )
    .with_retryable(true)
}

pub(super) fn after_the_fact(what: &str) -> Error {
    Error::new(
        ErrorKind::Timeout,
        format!("injected fault: {what} timed out after it was done"),
    )
    .with_retryable(true)
}

/// The fault `schedule` (if a wrapper has one) gives the next call of kind `what`.
pub(super) fn scheduled(schedule: Option<&FaultSchedule>, what: &str) -> Fault {
    schedule.map_or(Fault::Pass, |schedule| schedule.next(what))
}

/// Run `call` as `fault` says.
pub(super) async fn faulted<T>(
    fault: Fault,
    what: &str,
    call: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    match fault {
        Fault::Pass => call.await,
        Fault::Transient => Err(transient(what)),
        Fault::AfterTheFact => {
            call.await?;
            Err(after_the_fact(what))
        }
        Fault::Delay(by) => {
            tokio::time::sleep(by).await;
            call.await
        }
    }
}

/// Poll `future` at most `polls` times, yielding to the runtime between polls, then drop
/// it: `None` if it had not finished, which cancels it at whatever await point it reached.
pub async fn cancel_after_polls<F: std::future::Future>(
    future: F,
    polls: usize,
) -> Option<F::Output> {
    let mut future = std::pin::pin!(future);
    for _ in 0..polls {
        if let Some(output) = futures::FutureExt::now_or_never(future.as_mut()) {
            return Some(output);
        }
        tokio::task::yield_now().await;
    }
    None
}
