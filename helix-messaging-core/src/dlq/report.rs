//! What the [`Processor`](super::Processor) reports: its counts and pages of entries.

use super::store::{FailureGroup, StoredDeadLetter};

/// What the processor has done since it was created (HelixAgent's `GetMetrics()`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProcessorMetrics {
    /// Dead letters ingested from the DLQ topics.
    pub messages_ingested: u64,
    /// Entries resolved: re-driven to their topic (automatically, by an operator or a bulk
    /// job) or handled by a registered handler.
    pub messages_processed: u64,
    /// Automatic re-drives that failed and were scheduled again.
    pub messages_retried: u64,
    /// Entries an operator discarded.
    pub messages_discarded: u64,
    /// Entries parked: re-drives used up, or not worth re-driving automatically.
    pub messages_parked: u64,
}

/// One page of a listing, oldest first (by dead-lettering time, then id: a page read with
/// `offset` stays put while new letters arrive, which go at the end), with the number of
/// entries the filter matches in all (the count HelixAgent's scripts read as `.count`).
///
/// The page and the count come from one consistent read of the store
/// ([`DeadLetterStore::page`](super::DeadLetterStore::page)). Which entries count is the
/// filter's business: with [`DeadLetterFilter::exclude_discarded`](super::DeadLetterFilter::exclude_discarded)
/// set (as the admin API does when no `status` is asked for), the count is the DLQ depth the
/// `messaging_dlq_messages_total` gauge shows for the same entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterPage {
    /// The entries on this page.
    pub entries: Vec<StoredDeadLetter>,
    /// Entries matching the filter in all (as of the same read as `entries`).
    pub count: u64,
    /// The page size asked for.
    pub limit: usize,
    /// Entries skipped before this page.
    pub offset: usize,
}

/// What a bulk redrive would re-drive, read without starting it
/// ([`Processor::preview_redrive`](super::Processor::preview_redrive)): its selection, grouped
/// as [`Processor::failure_groups`](super::Processor::failure_groups) groups it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedrivePreview {
    /// Entries the redrive would select (the sum of the groups' counts): the `total` the job
    /// would start with, were the DLQ to stay as it is.
    pub total: u64,
    /// The selection by reason and topic, largest group first.
    pub groups: Vec<FailureGroup>,
}
