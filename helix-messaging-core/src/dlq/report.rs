//! What the [`Processor`](super::Processor) reports: its counts and pages of entries.

use super::store::StoredDeadLetter;

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

/// One page of a listing, with the number of entries the filter matches in all (the count
/// HelixAgent's scripts read as `.count`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterPage {
    /// The entries on this page.
    pub entries: Vec<StoredDeadLetter>,
    /// Entries matching the filter in all.
    pub count: u64,
    /// The page size asked for.
    pub limit: usize,
    /// Entries skipped before this page.
    pub offset: usize,
}
