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
    let exchange = exchange();
    helix_messaging::from_vars(|name| match name {
        "RABBITMQ_EXCHANGE" => Some(exchange.clone()),
        _ => std::env::var(name).ok(),
    })
    .await
    .expect("MESSAGING_BACKEND broker")
}

/// Delete `topic` and the queues of its `groups`: the stream on Redis Streams, the topic on
/// Kafka, each group's queue on RabbitMQ. Nothing is kept on memory or Redis pub/sub. A
/// failure is reported and otherwise ignored: the figures are already taken.
pub(crate) async fn remove_topic(topic: &str, groups: &[&str]) {
    match backend().as_str() {
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
    if backend() != "rabbitmq" {
        return;
    }
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
