//! Delivery reports, gathered per publishing call.
//!
//! rdkafka's `FutureProducer` gives every record a oneshot channel of its own: an allocation
//! for the channel besides the boxed sender, the whole report (a copy of a failed record
//! included) moved through it, and a wake-up of the publishing task whenever it waits on a
//! record whose report is not in yet. A call here counts its records instead: the producer's
//! delivery callback settles each record's [`Slot`] in the call's [`Reports`], which keeps
//! only the failures and wakes the call once, when the last report is in.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::Poll;

use futures::task::AtomicWaker;

use helix_messaging_core::{Error, Result};
use rdkafka::error::KafkaError;
use rdkafka::producer::{DeliveryResult, ProducerContext, ThreadedProducer};

use crate::error::publishing;
use crate::reconnects::StatsContext;

/// The adapter's producers: each record's report settles its [`Slot`]; their statistics
/// count their reconnects.
pub(crate) type HelixProducer = ThreadedProducer<StatsContext>;

impl ProducerContext for StatsContext {
    type DeliveryOpaque = Box<Slot>;

    fn delivery(&self, result: &DeliveryResult<'_>, mut slot: Box<Slot>) {
        slot.settle(match result {
            Ok(_) => None,
            Err((err, _)) => Some(Failure::Refused(err.clone())),
        });
    }
}

/// Why a record was not delivered.
enum Failure {
    /// The producer reported this error.
    Refused(KafkaError),
    /// The record's slot was dropped without a report or a withdrawal: the call was dropped
    /// before it handed the record over. (Records still in the producer when it is destroyed
    /// get a report of their purge; any left after that are never reported, their slots
    /// never dropped, as rdkafka's own futures never resolved then.)
    Unreported,
}

/// The reports of one publishing call's records, shared by the call and the producer's
/// delivery callbacks.
#[derive(Default)]
pub(crate) struct Reports {
    /// Records handed to the producer (or about to be) whose report is not in yet.
    outstanding: AtomicUsize,
    /// The records that failed, by the key their slot was made with.
    failures: parking_lot::Mutex<Vec<(usize, Failure)>>,
    /// How many failures were ever recorded: a verdict reads this rather than locking the
    /// list, which is nearly always empty.
    failed: AtomicUsize,
    /// The call waiting for its reports, woken when `outstanding` comes down to 0. One
    /// waiter: a `Notify` cost a lock on every report's way in and out of its waiter list
    /// (about 750–800 instructions a `publish`). Reads waiting for dropped calls poll instead
    /// ([`all_in_by_polling`]).
    waiter: AtomicWaker,
}

impl Reports {
    /// The slot of one more record, reported under `key`. Counted from now: a record the
    /// producer refuses has its slot withdrawn ([`Slot::withdraw`]).
    pub(crate) fn slot(self: &Arc<Self>, key: usize) -> Box<Slot> {
        self.outstanding.fetch_add(1, Ordering::AcqRel);
        Box::new(Slot {
            reports: Some(self.clone()),
            key,
        })
    }

    fn settle(&self, key: usize, failure: Option<Failure>) {
        if let Some(failure) = failure {
            self.failures.lock().push((key, failure));
            self.failed.fetch_add(1, Ordering::AcqRel);
        }
        if self.outstanding.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.waiter.wake();
        }
    }

    pub(crate) fn is_in(&self) -> bool {
        self.outstanding.load(Ordering::Acquire) == 0
    }

    /// Wait until every slot made so far is settled. One waiter at a time: the call that
    /// made the slots.
    async fn all_in(&self) {
        std::future::poll_fn(|cx| {
            if self.is_in() {
                return Poll::Ready(());
            }
            self.waiter.register(cx.waker());
            // Checked again once registered: the last report may have come in between.
            if self.is_in() {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await;
    }
}

/// One record's place in its call's [`Reports`]: the producer's delivery opaque. Settled by
/// the record's report, withdrawn when the producer refuses the record, and settled as
/// [`Failure::Unreported`] when dropped otherwise.
pub(crate) struct Slot {
    reports: Option<Arc<Reports>>,
    key: usize,
}

impl Slot {
    /// Settle with `failure` (`None`: delivered), once.
    fn settle(&mut self, failure: Option<Failure>) {
        if let Some(reports) = self.reports.take() {
            reports.settle(self.key, failure);
        }
    }

    /// Take the record out of its call's count without a verdict: the producer refused it,
    /// and the caller reports that error itself (a failure recorded here would only make
    /// every other verdict of the call search the failures).
    pub(crate) fn withdraw(&mut self) {
        self.settle(None);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.settle(Some(Failure::Unreported));
    }
}

/// Delivery reports of records whose publishers stopped waiting for them, until they are in.
///
/// Dropping a publish does not take its records back from the producer, which still
/// delivers them: a replay run stopped mid-publish (killed, or its lease lost) leaves its
/// copies there, and the run resuming it on the same handle searches the target for the
/// copies published before. A history read waits for these first
/// ([`Shared::settle`](crate::shared::Shared::settle)), or it would miss such a copy and the
/// replay publish it twice.
#[derive(Default)]
pub(crate) struct Unsettled(parking_lot::Mutex<Vec<Arc<Reports>>>);

impl Unsettled {
    fn keep(&self, reports: Arc<Reports>) {
        let mut held = self.0.lock();
        Self::prune(&mut held);
        held.push(reports);
    }

    /// The calls whose reports are not all in yet.
    pub(crate) fn in_flight(&self) -> Vec<Arc<Reports>> {
        let mut held = self.0.lock();
        Self::prune(&mut held);
        held.clone()
    }

    /// Let go of the calls whose reports are all in: only what is in flight is held.
    fn prune(held: &mut Vec<Arc<Reports>>) {
        held.retain(|r| !r.is_in());
    }
}

/// Wait until the reports of every call of `calls` are in. Polled every 5 ms: each call's
/// waker is its own, and the calls waited for here were dropped (reads after a dropped
/// publish are rare).
pub(crate) async fn all_in_by_polling(calls: &[Arc<Reports>]) {
    while !calls.iter().all(|reports| reports.is_in()) {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

/// A publishing call's reports, as the call holds them: dropped before they are all in, they
/// are kept in the handle's [`Unsettled`], for history reads to wait for.
pub(crate) struct PendingReports {
    reports: Arc<Reports>,
    unsettled: Arc<Unsettled>,
}

impl PendingReports {
    pub(crate) fn new(unsettled: Arc<Unsettled>) -> Self {
        PendingReports {
            reports: Arc::default(),
            unsettled,
        }
    }

    /// The slot of the record reported under `key`.
    pub(crate) fn slot(&self, key: usize) -> Box<Slot> {
        self.reports.slot(key)
    }

    /// The producer's verdict on the record whose slot was made with `key`, once the report
    /// of every record whose slot was made so far is in.
    ///
    /// One verdict of a call is awaited at a time (as `BatchReport::pipelined` awaits its
    /// acknowledgements, in order): the call has one waker. Two awaited together would leave
    /// one of them unwoken.
    ///
    /// # Errors
    /// The producer's error for the record, described as publishing to `kafka_topic`;
    /// [`ErrorKind::Closed`](helix_messaging_core::ErrorKind::Closed) when its slot was
    /// dropped without a report ([`Failure::Unreported`]).
    pub(crate) async fn delivered(&self, key: usize, kafka_topic: &str) -> Result<()> {
        self.reports.all_in().await;
        if self.reports.failed.load(Ordering::Acquire) == 0 {
            return Ok(());
        }
        // Failures are few: a list searched by key.
        let failure = {
            let mut failures = self.reports.failures.lock();
            let found = failures.iter().position(|(k, _)| *k == key);
            found.map(|at| failures.swap_remove(at).1)
        };
        match failure {
            None => Ok(()),
            Some(Failure::Refused(err)) => Err(publishing(err, kafka_topic)),
            Some(Failure::Unreported) => Err(Error::closed("the kafka producer")),
        }
    }
}

impl Drop for PendingReports {
    fn drop(&mut self) {
        if !self.reports.is_in() {
            self.unsettled.keep(self.reports.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::types::RDKafkaErrorCode;

    #[tokio::test]
    async fn each_record_gets_its_own_verdict_once_every_report_is_in() {
        let unsettled = Arc::new(Unsettled::default());
        let pending = PendingReports::new(unsettled.clone());
        let (mut first, mut second, third) = (pending.slot(0), pending.slot(1), pending.slot(2));
        first.settle(None);
        second.settle(Some(Failure::Refused(KafkaError::MessageProduction(
            RDKafkaErrorCode::MessageSizeTooLarge,
        ))));
        let waiting = tokio::spawn(async move {
            [
                pending.delivered(0, "t").await.map_err(|e| e.kind()),
                pending.delivered(1, "t").await.map_err(|e| e.kind()),
                pending.delivered(2, "t").await.map_err(|e| e.kind()),
            ]
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "a report is still out");
        // The producer let the third record go without a report.
        drop(third);
        let outcomes = tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("every report is in")
            .unwrap();
        assert_eq!(outcomes[0], Ok(()));
        assert!(
            outcomes[1].is_err() && outcomes[1] != Err(helix_messaging_core::ErrorKind::Closed)
        );
        assert_eq!(outcomes[2], Err(helix_messaging_core::ErrorKind::Closed));
        assert!(unsettled.in_flight().is_empty());
    }

    #[tokio::test]
    async fn a_withdrawn_record_is_out_of_the_count_and_leaves_the_others_verdicts_alone() {
        let pending = PendingReports::new(Arc::default());
        let (mut refused, mut delivered) = (pending.slot(0), pending.slot(1));
        refused.withdraw();
        delivered.settle(None);
        drop((refused, delivered));
        tokio::time::timeout(std::time::Duration::from_secs(5), pending.delivered(1, "t"))
            .await
            .expect("no report is out")
            .expect("the delivered record's verdict");
        assert_eq!(pending.reports.failed.load(Ordering::Acquire), 0);
    }

    #[tokio::test]
    async fn a_call_dropped_before_it_handed_a_record_over_holds_no_read_up() {
        let unsettled = Arc::new(Unsettled::default());
        let pending = PendingReports::new(unsettled.clone());
        // Made, and dropped with the call before the producer took it (a full queue).
        let slot = pending.slot(0);
        drop(pending);
        assert_eq!(unsettled.in_flight().len(), 1);
        drop(slot);
        assert!(unsettled.in_flight().is_empty());
    }

    #[tokio::test]
    async fn a_call_dropped_before_its_reports_are_in_is_kept_until_they_are() {
        let unsettled = Arc::new(Unsettled::default());
        let pending = PendingReports::new(unsettled.clone());
        let mut slot = pending.slot(0);
        drop(pending);
        let held = unsettled.in_flight();
        assert_eq!(held.len(), 1, "the call's report is still out");
        let waiting = tokio::spawn(async move { all_in_by_polling(&held).await });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "the call's report is still out");
        slot.settle(None);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("the wait ends once the report is in")
            .unwrap();
        assert!(unsettled.in_flight().is_empty());
    }
}
