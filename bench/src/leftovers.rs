//! What the scenarios that run on any backend (`replay`, `spool`, `redrive`) leave on the
//! broker `MESSAGING_BACKEND` names, removed once they are measured.
//!
//! Left in place, their streams, topics and full group queues pile up from run to run and
//! from session to session on the machine's one broker, which the test suite shares: a
//! RabbitMQ node holding a gigabyte of them recovered its queues so slowly on restart that
//! the suite's outage tests timed out, and runs of a scenario slowed each other down.

use std::sync::Arc;

use helix_messaging::Broker;
use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use lapin::{Connection, ConnectionProperties};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;

/// The backend `MESSAGING_BACKEND` names (memory without one).
pub(crate) fn backend() -> String {
    std::env::var("MESSAGING_BACKEND").unwrap_or_else(|_| "memory".into())
}

/// The exchange this process publishes to on RabbitMQ: its own, so that the replay journal
/// bound to it holds only this process's messages and can go with it.
fn exchange() -> String {
    format!("helix-bench.{}", std::process::id())
}

/// The broker `MESSAGING_BACKEND` names, configured from the environment, except that on
/// RabbitMQ it publishes to an exchange of this process's own (see [`remove_exchange`]).
pub(crate) async fn broker() -> Arc<dyn Broker> {
    broker_from(|name| std::env::var(name).ok()).await
}

/// [`broker`] with its variables read through `lookup`.
async fn broker_from(lookup: impl Fn(&str) -> Option<String>) -> Arc<dyn Broker> {
    let exchange = exchange();
    helix_messaging::from_vars(|name| match name {
        "RABBITMQ_EXCHANGE" => Some(exchange.clone()),
        _ => lookup(name),
    })
    .await
    .expect("MESSAGING_BACKEND broker")
}

/// Delete `topic` and the queues of its `groups`: the stream on Redis Streams, the topic on
/// Kafka, each group's queue on RabbitMQ. Nothing is kept on memory or Redis pub/sub. A
/// failure is reported and otherwise ignored: the figures are already taken.
pub(crate) async fn remove_topic(topic: &str, groups: &[&str]) {
    remove_topic_on(&backend(), topic, groups).await;
}

async fn remove_topic_on(backend: &str, topic: &str, groups: &[&str]) {
    match backend {
        "rabbitmq" => {
            for group in groups {
                rabbitmq_delete(&format!("{topic}.{group}"), Delete::Queue).await;
            }
        }
        "redis-streams" => {
            let url = var_or("REDIS_URL", "redis://127.0.0.1:6379");
            let deleted = async {
                let client = redis::Client::open(url)?;
                let mut connection = client.get_multiplexed_async_connection().await?;
                redis::cmd("DEL")
                    .arg(topic)
                    .query_async::<i64>(&mut connection)
                    .await
            };
            if let Err(err) = deleted.await {
                eprintln!("deleting stream {topic}: {err}");
            }
        }
        "kafka" => {
            let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
                .set(
                    "bootstrap.servers",
                    var_or("KAFKA_BROKERS", "127.0.0.1:9092"),
                )
                .create()
                .expect("Kafka admin client");
            if let Err(err) = admin.delete_topics(&[topic], &AdminOptions::new()).await {
                eprintln!("deleting topic {topic}: {err}");
            }
        }
        _ => {}
    }
}

/// After a scenario's last run on RabbitMQ: delete this process's exchange and, if
/// `RABBITMQ_REPLAY_JOURNAL` made one, its journal stream.
pub(crate) async fn remove_exchange() {
    if backend() == "rabbitmq" {
        remove_rabbitmq_exchange().await;
    }
}

async fn remove_rabbitmq_exchange() {
    let exchange = exchange();
    rabbitmq_delete(&format!("{exchange}.journal"), Delete::Queue).await;
    rabbitmq_delete(&exchange, Delete::Exchange).await;
}

enum Delete {
    Queue,
    Exchange,
}

/// Delete one queue or exchange, on a connection of its own: deleting one that does not
/// exist closes the channel, which would fail whatever came after it on that channel.
async fn rabbitmq_delete(name: &str, what: Delete) {
    let url = var_or("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/%2f");
    let connection = match Connection::connect(&url, ConnectionProperties::default()).await {
        Ok(connection) => connection,
        Err(err) => {
            eprintln!("deleting {name}: {err}");
            return;
        }
    };
    if let Ok(channel) = connection.create_channel().await {
        let deleted = match what {
            Delete::Queue => channel
                .queue_delete(name.into(), QueueDeleteOptions::default())
                .await
                .map(drop),
            Delete::Exchange => {
                channel
                    .exchange_delete(name.into(), ExchangeDeleteOptions::default())
                    .await
            }
        };
        if let Err(err) = deleted {
            // A queue that was never declared (no journal) is not an error worth a line.
            if !err.to_string().contains("NOT_FOUND") {
                eprintln!("deleting {name}: {err}");
            }
        }
    }
    let _ = connection.close(200, "done".into()).await;
}

fn var_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.into())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures::StreamExt;
    use helix_messaging::{Message, SubscribeOptions};
    use lapin::options::{ExchangeDeclareOptions, QueueDeclareOptions};
    use lapin::types::FieldTable;

    use super::*;

    fn fresh_topic() -> String {
        format!("bench.leftovers.{}", uuid::Uuid::new_v4().simple())
    }

    /// Run what a scenario does on `backend`: a group's subscription, one message published
    /// to it and received, then the broker closed and the run's leftovers removed.
    async fn one_run(backend: &str, extra: &[(&str, &str)], topic: &str) {
        let vars: Vec<(String, String)> = [("MESSAGING_BACKEND", backend)]
            .iter()
            .chain(extra)
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let broker = broker_from(|name| {
            vars.iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
                .or_else(|| std::env::var(name).ok())
        })
        .await;
        let mut sink = broker
            .subscribe(topic, SubscribeOptions::group("sink"))
            .await
            .expect("subscribe");
        broker
            .publish(topic, Message::new("x"))
            .await
            .expect("publish");
        let delivery = tokio::time::timeout(Duration::from_secs(10), sink.next())
            .await
            .expect("delivered in time")
            .expect("open")
            .expect("delivery");
        delivery.ack().await.expect("ack");
        drop(sink);
        broker.close().await.expect("close");
        remove_topic_on(backend, topic, &["sink"]).await;
    }

    /// Whether RabbitMQ has a queue (`exchange` false) or an exchange named `name`.
    async fn rabbitmq_has(name: &str, exchange: bool) -> bool {
        let url = var_or("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/%2f");
        let connection = Connection::connect(&url, ConnectionProperties::default())
            .await
            .expect("connect to RabbitMQ");
        let channel = connection.create_channel().await.expect("channel");
        let found = if exchange {
            let passive = ExchangeDeclareOptions {
                passive: true,
                ..ExchangeDeclareOptions::default()
            };
            channel
                .exchange_declare(
                    name.into(),
                    lapin::ExchangeKind::Topic,
                    passive,
                    FieldTable::default(),
                )
                .await
        } else {
            let passive = QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            };
            channel
                .queue_declare(name.into(), passive, FieldTable::default())
                .await
                .map(drop)
        };
        let _ = connection.close(200, "checked".into()).await;
        match found {
            Ok(()) => true,
            Err(err) if err.to_string().contains("NOT_FOUND") => false,
            Err(err) => panic!("looking up {name}: {err}"),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_rabbitmq_run_leaves_no_group_queue_exchange_or_journal() {
        let topic = fresh_topic();
        one_run("rabbitmq", &[("RABBITMQ_REPLAY_JOURNAL", "true")], &topic).await;
        let exchange = exchange();
        assert!(
            rabbitmq_has(&exchange, true).await,
            "the run's exchange stays until the end"
        );
        assert!(!rabbitmq_has(&format!("{topic}.sink"), false).await);
        remove_rabbitmq_exchange().await;
        assert!(!rabbitmq_has(&format!("{exchange}.journal"), false).await);
        assert!(!rabbitmq_has(&exchange, true).await);
        // The broker's own dead-letter queue and the default exchange are not the bench's.
        assert!(rabbitmq_has("helixagent.dlq", false).await);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_redis_streams_run_leaves_no_stream() {
        let topic = fresh_topic();
        one_run("redis-streams", &[], &topic).await;
        let client =
            redis::Client::open(var_or("REDIS_URL", "redis://127.0.0.1:6379")).expect("REDIS_URL");
        let mut connection = client
            .get_multiplexed_async_connection()
            .await
            .expect("connect to Redis");
        let exists: i64 = redis::cmd("EXISTS")
            .arg(&topic)
            .query_async(&mut connection)
            .await
            .expect("EXISTS");
        assert_eq!(exists, 0, "the stream {topic} is still there");
    }
}
