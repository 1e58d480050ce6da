//! Replay by time range: the stream read back with XRANGE, page by page, as history entries.

use std::sync::Arc;

use helix_messaging_core::{
    Error, ErrorKind, HistoryEntry, HistoryStream, Position, Result, TimeRange,
};
use redis::streams::{StreamId, StreamRangeReply};

use super::entry::{ceil_ms, id_time};
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
    let pages = futures::stream::unfold(first, move |next| {
        let shared = shared.clone();
        let topic = topic.clone();
        let end = end.clone();
        async move {
            let start = next?;
            let mut commands = shared.commands.clone();
            let page: Result<StreamRangeReply> = redis::cmd("XRANGE")
                .arg(&*topic)
                .arg(&start)
                .arg(&end)
                .arg("COUNT")
                .arg(RANGE_PAGE)
                .query_async(&mut commands)
                .await
                .map_err(|e| from_redis(e, format!("XRANGE on {topic}")));
            match page {
                Err(err) => Some((vec![Err(err)], None)),
                Ok(page) => {
                    let following = (page.ids.len() == RANGE_PAGE)
                        .then(|| page.ids.last().map(|e| format!("({}", e.id)))
                        .flatten();
                    let entries = page
                        .ids
                        .into_iter()
                        .map(|entry| {
                            history_entry(&topic, entry, &shared.config.streams.payload_field)
                        })
                        .collect();
                    Some((entries, following))
                }
            }
        }
    });
    Box::pin(futures::StreamExt::flat_map(pages, futures::stream::iter))
}

fn history_entry(topic: &str, entry: StreamId, payload_field: &str) -> Result<HistoryEntry> {
    let recorded_at = id_time(&entry.id);
    let mut fields: Vec<(String, redis::Value)> = entry.map.into_iter().collect();
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
