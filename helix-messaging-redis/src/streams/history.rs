//! Replay by time range: the stream read back with XRANGE, page by page, as history entries.

use std::sync::Arc;
use std::time::Duration;

use helix_messaging_core::{
    Error, ErrorKind, HistoryEntry, HistoryStream, Position, Result, TimeRange,
};

use super::entry::{RawEntry, ceil_ms, id_time, parse_range_reply};
use crate::codec;
use crate::error::from_redis;
use crate::shared::Shared;

/// Entries read per XRANGE page when reading history.
const RANGE_PAGE: usize = 500;

pub(crate) fn read_range(shared: Arc<Shared>, topic: &str, range: TimeRange) -> HistoryStream {
    let topic: Arc<str> = Arc::from(topic);
    let end_ms = ceil_ms(range.to());
    let start = format!("{}-0", ceil_ms(range.from()));
    // Exclusive end: entries recorded before `to`, i.e. with an id time below ceil(to).
    let end = format!("({end_ms}-0");
    let first = (end_ms > 0).then_some(start);
    // The read gets a connection of its own, made by its first page and kept while it reads:
    // a replay reads and publishes at once, and on the shared `commands` connection each
    // page's large reply would hold up the publishes' replies queued behind it.
    let pages = futures::stream::unfold((first, None), move |(next, connection)| {
        let shared = shared.clone();
        let topic = topic.clone();
        let end = end.clone();
        async move {
            let start = next?;
            let mut commands = match connection {
                Some(connection) => connection,
                None => match shared.primary.connect(Duration::ZERO).await {
                    Ok(connection) => connection,
                    Err(err) => {
                        let err = Error::new(
                            err.kind(),
                            format!("XRANGE on {topic}: connecting: {}", err.message()),
                        )
                        .with_source(err);
                        return Some((vec![Err(err)], (None, None)));
                    }
                },
            };
            let page = redis::cmd("XRANGE")
                .arg(&*topic)
                .arg(&start)
                .arg(&end)
                .arg("COUNT")
                .arg(RANGE_PAGE)
                .query_async(&mut commands)
                .await
                .map_err(|e| from_redis(e, format!("XRANGE on {topic}")))
                .and_then(|reply| {
                    // The whole page is lost, not one entry: not a `Serialization` error,
                    // which a replay counts as one undecodable entry and reads on past.
                    parse_range_reply(reply).map_err(|e| {
                        Error::new(
                            ErrorKind::Backend,
                            format!("XRANGE on {topic}: {}", e.message()),
                        )
                    })
                });
            match page {
                Err(err) => Some((vec![Err(err)], (None, None))),
                Ok(page) => {
                    let following = (page.len() == RANGE_PAGE)
                        .then(|| page.last().map(|e| format!("({}", e.id)))
                        .flatten();
                    let entries = page
                        .into_iter()
                        .map(|entry| {
                            history_entry(&topic, entry, &shared.config.streams.payload_field)
                        })
                        .collect();
                    Some((entries, (following, Some(commands))))
                }
            }
        }
    });
    Box::pin(futures::StreamExt::flat_map(pages, futures::stream::iter))
}

fn history_entry(topic: &str, entry: RawEntry, payload_field: &str) -> Result<HistoryEntry> {
    let recorded_at = id_time(&entry.id);
    let mut fields = entry.fields;
    let message = codec::from_stream_fields(&entry.id, recorded_at, &mut fields, payload_field)
        .map_err(|e| {
            Error::new(
                ErrorKind::Serialization,
                format!(
                    "entry {} on {topic} cannot be decoded: {}",
                    entry.id,
                    e.message()
                ),
            )
        })?;
    Ok(HistoryEntry {
        message: Arc::new(message),
        recorded_at,
        position: Some(Position::StreamId(entry.id)),
    })
}
