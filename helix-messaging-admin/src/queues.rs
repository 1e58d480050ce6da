//! `GET /v1/messaging/queues`: the consumer groups of the hub's topics, where each backend
//! keeps them (the RabbitMQ queue, the Kafka consumer group, the Redis stream group) and
//! how far behind each is, so an operator can go from a topic in the runbooks to the name
//! the broker's own tools take.

use std::collections::HashMap;

use axum::Json;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use helix_messaging_core::hub::{HubQueue, HubSide};
use helix_messaging_core::validate_name;

use crate::api;
use crate::json::ApiError;
use crate::services::AppState;

/// The side a `side` parameter names (default tasks).
fn side_param(query: &HashMap<String, String>) -> Result<Option<HubSide>, ApiError> {
    match query.get("side").map(String::as_str) {
        None => Ok(None),
        Some("tasks") => Ok(Some(HubSide::Tasks)),
        Some("events") => Ok(Some(HubSide::Events)),
        Some(other) => Err(ApiError::bad_request(format!(
            "side: {other:?} is neither \"tasks\" nor \"events\""
        ))),
    }
}

/// A `topic` or `group` parameter, checked as the brokers check names.
fn name_param<'a>(
    query: &'a HashMap<String, String>,
    what: &str,
) -> Result<Option<&'a str>, ApiError> {
    let Some(name) = query.get(what) else {
        return Ok(None);
    };
    validate_name(what, name).map_err(|e| ApiError::bad_request(e.message().to_owned()))?;
    Ok(Some(name))
}

/// `GET /v1/messaging/queues?topic&group&side`: every group the hub knows of (the workers'
/// group of each task queue, each event subscription), narrowed by the parameters. A
/// `topic` the hub knows nothing of is answered with the group it would have: the workers'
/// group on the task side unless `side` and `group` say otherwise.
pub(crate) async fn list(
    State(state): State<AppState>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let hub = &state.services.hub;
    let side = side_param(&query)?;
    let topic = name_param(&query, "topic")?;
    let group = name_param(&query, "group")?;
    let mut queues: Vec<HubQueue> = hub
        .queues()
        .into_iter()
        .filter(|q| side.is_none_or(|side| q.side == side))
        .filter(|q| topic.is_none_or(|topic| q.topic == topic))
        .filter(|q| group.is_none_or(|group| q.group == group))
        .collect();
    if let (true, Some(topic)) = (queues.is_empty(), topic) {
        let side = side.unwrap_or(HubSide::Tasks);
        let group = match (group, side) {
            (Some(group), _) => group,
            (None, HubSide::Tasks) => hub.config().task_group.as_str(),
            (None, HubSide::Events) => {
                return Err(ApiError::bad_request(
                    "group: the hub knows no event group of this topic; name one",
                ));
            }
        };
        queues.push(hub.queue(side, topic, group));
    }
    let queues = futures::future::join_all(queues.into_iter().map(|queue| async move {
        let backlog = hub
            .side_broker(queue.side)
            .backlog(&queue.topic, &queue.group)
            .await;
        queue_json(queue, backlog)
    }))
    .await;
    Ok(Json(api::Queues {
        count: queues.len(),
        queues,
    })
    .into_response())
}

fn queue_json(
    queue: HubQueue,
    backlog: helix_messaging_core::Result<helix_messaging_core::Backlog>,
) -> api::Queue {
    let (waiting, in_flight, backlog_error) = match backlog {
        Ok(backlog) => (Some(backlog.waiting), backlog.in_flight, None),
        Err(err) => (None, None, Some(err.to_string())),
    };
    api::Queue {
        side: queue.side.as_str().to_owned(),
        topic: queue.topic,
        group: queue.group,
        backend: queue.backend.to_owned(),
        kind: queue.address.kind.to_owned(),
        name: queue.address.name,
        source: queue.address.source,
        waiting,
        in_flight,
        backlog_error,
    }
}
