//! The attempts codec: what a commit writes into its offset's metadata, and how the next
//! owner of the partition reads it back.
//!
//! Attempts survive a change of owner: every commit carries, in the offset's metadata, the
//! attempt each unsettled record had reached when the application received it
//! ([`offset_metadata`]), and the next owner of the partition continues from there. The
//! metadata also names the records settled above the commit point (acked past one still
//! out), which the next owner settles without delivering them again.
//!
//! Apart from the offsets it describes: it is a text format with a size limit, and knows
//! nothing of partitions or trackers.

use std::collections::BTreeMap;

/// Prefix of the offset metadata this adapter commits.
const ATTEMPTS_PREFIX: &str = "helix-attempts:";

/// Kafka brokers keep 4096 bytes of offset metadata by default (`offset.metadata.max.bytes`);
/// the list stays well below, keeping the lowest offsets (the next owner's first records).
const ATTEMPTS_METADATA_MAX: usize = 3000;

/// What the offset metadata says about a record at or after the commit point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OffsetNote {
    /// Still out, attempted this many times.
    Attempts(u32),
    /// Settled, and so is every record up to this offset (inclusive).
    Settled(i64),
}

/// `helix-attempts:<offset>=<attempts>,<from>-<to>,…` in offset order: the attempts of the
/// records still out, and the ranges settled above the commit point. Past the size limit
/// the highest entries are left out: their records are then delivered again, as they would
/// be without the metadata (at least once).
pub(crate) fn offset_metadata(notes: impl IntoIterator<Item = (i64, OffsetNote)>) -> String {
    let mut notes = notes.into_iter().peekable();
    let mut out = String::new();
    if notes.peek().is_none() {
        return out;
    }
    out.push_str(ATTEMPTS_PREFIX);
    for (i, (offset, note)) in notes.enumerate() {
        let sep = if i == 0 { "" } else { "," };
        let entry = match note {
            OffsetNote::Attempts(attempts) => format!("{sep}{offset}={attempts}"),
            OffsetNote::Settled(to) => format!("{sep}{offset}-{to}"),
        };
        if out.len() + entry.len() > ATTEMPTS_METADATA_MAX {
            break;
        }
        out.push_str(&entry);
    }
    out
}

/// The metadata of [`offset_metadata`], read back.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct PriorOffsets {
    /// Attempts of records still out.
    pub(crate) attempts: BTreeMap<i64, u32>,
    /// Settled ranges (inclusive), in offset order.
    pub(crate) settled: Vec<(i64, i64)>,
}

/// The inverse of [`offset_metadata`]; anything else (another client's metadata) says
/// nothing.
pub(crate) fn parse_attempts_metadata(metadata: &str) -> PriorOffsets {
    let mut prior = PriorOffsets::default();
    let Some(list) = metadata.strip_prefix(ATTEMPTS_PREFIX) else {
        return prior;
    };
    for entry in list.split(',') {
        if let Some((offset, attempts)) = entry.split_once('=') {
            if let (Ok(offset), Ok(attempts)) = (offset.parse(), attempts.parse()) {
                prior.attempts.insert(offset, attempts);
            }
        } else if let Some((from, to)) = entry.split_once('-')
            && let (Ok(from), Ok(to)) = (from.parse::<i64>(), to.parse::<i64>())
            && from <= to
        {
            prior.settled.push((from, to));
        }
    }
    prior.settled.sort_unstable();
    prior
}
