//! What the scenarios that run on any backend (`replay`, `spool`, `redrive`) leave on the
//! broker `MESSAGING_BACKEND` names, removed once they are measured.
//!
//! Left in place, their streams, topics and full group queues pile up from run to run and
//! from session to session on the machine's one broker, which the test suite shares: a
//! RabbitMQ node holding a gigabyte of them recovered its queues so slowly on restart that
//! the suite's outage tests timed out, and runs of a scenario slowed each other down.

use std::sync::{Arc, OnceLock};

use helix_messaging::Broker;
use helix_messaging::kafka::KafkaConfig;
use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;

/// The backend `MESSAGING_BACKEND` names (memory without one), read as the library reads it.
pub(crate) fn backend() -> String {
    std::env::var("MESSAGING_BACKEND")
        .map(|v| v.trim().to_ascii_lowercase())
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "memory".into())
}

/// A topic of its own for one run (`bench.<what>.<uuid>`), to be removed with
/// [`remove_topic`] once the run is measured.
pub(crate) fn fresh(what: &str) -> String {
    format!("bench.{what}.{}", uuid::Uuid::new_v4().simple())
}

/// The exchange this process publishes to on RabbitMQ: its own, so that the replay journal
/// bound to it holds only this process's messages and can go with it. A UUID besides the
/// process id keeps two machines' processes apart on one broker.
fn exchange() -> String {
    static EXCHANGE: OnceLock<String> = OnceLock::new();
    EXCHANGE
        .get_or_init(|| {
            format!(
                "helix-bench.{}.{}",
                std::process::id(),
                &uuid::Uuid::new_v4().simple().to_string()[..8]
            )
        })
        .clone()
}

/// The broker `MESSAGING_BACKEND` names, configured from the environment, except that on
/// RabbitMQ it publishes to an exchange of this process's own (see [`remove_exchange`]).
pub(crate) async fn broker() -> Arc<dyn Broker> {
    broker_from(|name| std::env::var(name).ok()).await
}

/// [`broker`] with its variables read through `lookup`.
async fn broker_from(lookup: impl Fn(&str) -> Option<String>) -> Arc<dyn Broker> {
    let exchange = exchange();
    if let Some(theirs) = lookup("RABBITMQ_EXCHANGE") {
        static SAID: OnceLock<()> = OnceLock::new();
        SAID.get_or_init(|| {
            eprintln!("RABBITMQ_EXCHANGE={theirs} is not used: the bench publishes to {exchange}");
        });
    }
    helix_messaging::from_vars(|name| match name {
        "RABBITMQ_EXCHANGE" => Some(exchange.clone()),
        _ => lookup(name),
    })
    .await
    .expect("MESSAGING_BACKEND broker")
}

/// Delete `topic` and the queues of its `groups`: the stream on Redis Streams, the topic on
/// Kafka, each group's queue on RabbitMQ. Nothing is kept on memory or Redis pub/sub. The
/// raw connections this takes read `RABBITMQ_URL`, `REDIS_URL` and `KAFKA_BROKERS`, as the
/// bench's raw clients do: what it does not find there (another vhost, database or
/// cluster) is reported, as is any failure, and otherwise ignored, since the figures are
/// already taken.
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
            let url = crate::redis::url();
            let deleted = async {
                let client = redis::Client::open(url.as_str())?;
                let mut connection = client.get_multiplexed_async_connection().await?;
                redis::cmd("DEL")
                    .arg(topic)
                    .query_async::<i64>(&mut connection)
                    .await
            };
            match deleted.await {
                Ok(1) => {}
                Ok(_) => eprintln!("deleting stream {topic}: not found at {url}"),
                Err(err) => eprintln!("deleting stream {topic}: {err}"),
            }
        }
        "kafka" => kafka_delete(topic).await,
        _ => {}
    }
}

/// Delete the Kafka topic the adapter made for `topic` (its `KAFKA_TOPIC_PREFIX` applied).
async fn kafka_delete(topic: &str) {
    let config = match KafkaConfig::from_vars(|name| std::env::var(name).ok()) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("deleting topic {topic}: {err}");
            return;
        }
    };
    let name = config.kafka_topic(topic);
    let admin: AdminClient<DefaultClientContext> = match ClientConfig::new()
        .set("bootstrap.servers", &config.brokers)
        .create()
    {
        Ok(admin) => admin,
        Err(err) => {
            eprintln!("deleting topic {name}: {err}");
            return;
        }
    };
    match admin.delete_topics(&[&name], &AdminOptions::new()).await {
        Ok(results) => {
            for (failed, code) in results.into_iter().filter_map(Result::err) {
                eprintln!("deleting topic {failed}: {code}");
            }
        }
        Err(err) => eprintln!("deleting topic {name}: {err}"),
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
    rabbitmq_delete(&format!("{exchange}.journal"), Delete::Journal).await;
    rabbitmq_delete(&exchange, Delete::Exchange).await;
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Delete {
    Queue,
    /// A queue that is there only when the scenario ran with the journal on.
    Journal,
    Exchange,
}

/// Delete one queue or exchange. RabbitMQ deletes one that is not there without a word, so
/// it is looked up first, on a channel of its own (a failed lookup closes its channel): not
/// finding what the bench made means the cleanup is looking at another vhost than the
/// broker used, which is reported.
async fn rabbitmq_delete(name: &str, what: Delete) {
    let connection =
        match Connection::connect(&crate::rabbitmq::url(), ConnectionProperties::default()).await {
            Ok(connection) => connection,
            Err(err) => {
                eprintln!("deleting {name}: {err}");
                return;
            }
        };
    let deleted = async {
        if !rabbitmq_has(&connection.create_channel().await?, name, what).await? {
            if what != Delete::Journal {
                eprintln!("deleting {name}: not found in the vhost of RABBITMQ_URL");
            }
            return Ok(());
        }
        let channel = connection.create_channel().await?;
        match what {
            Delete::Queue | Delete::Journal => channel
                .queue_delete(name.into(), QueueDeleteOptions::default())
                .await
                .map(drop),
            Delete::Exchange => {
                channel
                    .exchange_delete(name.into(), ExchangeDeleteOptions::default())
                    .await
            }
        }
    };
    if let Err(err) = deleted.await {
        eprintln!("deleting {name}: {err}");
    }
    let _ = connection.close(200, "done".into()).await;
}

/// Whether `name` exists (a passive declaration on `channel`, which a refusal closes).
async fn rabbitmq_has(channel: &Channel, name: &str, what: Delete) -> lapin::Result<bool> {
    let found = match what {
        Delete::Exchange => {
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
        }
        Delete::Queue | Delete::Journal => {
            let passive = QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            };
            channel
                .queue_declare(name.into(), passive, FieldTable::default())
                .await
                .map(drop)
        }
    };
    match found {
        Ok(()) => Ok(true),
        Err(err) if is_not_found(&err) => Ok(false),
        Err(err) => Err(err),
    }
}

fn is_not_found(err: &lapin::Error) -> bool {
    matches!(
        err.kind(),
        lapin::ErrorKind::ProtocolError(amqp) if *amqp.kind()
            == lapin::protocol::AMQPErrorKind::Soft(lapin::protocol::AMQPSoftError::NOTFOUND)
    )
}

#[cfg(test)]
mod tests {
    use std::future::Future;

    use futures::FutureExt;
    use helix_messaging::rabbitmq::RabbitConfig;
    use helix_messaging::{Message, SubscribeOptions};

    use super::*;

    /// Run `checks`; if one fails, remove what the run made before the test fails with it,
    /// so that a failing test leaves nothing behind either.
    async fn checked(checks: impl Future<Output = ()>, clean_up: impl Future<Output = ()>) {
        if let Err(panic) = std::panic::AssertUnwindSafe(checks).catch_unwind().await {
            clean_up.await;
            std::panic::resume_unwind(panic);
        }
    }

    /// What a scenario's run does on `backend`: a group's subscription, one message
    /// published to it and received, then the broker closed.
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
        crate::measure::one_through(&*broker, topic, &mut sink, Message::new("x")).await;
        drop(sink);
        broker.close().await.expect("close");
    }

    /// Whether RabbitMQ's vhost of `RABBITMQ_URL` has `name`.
    async fn rabbitmq_holds(name: &str, what: Delete) -> bool {
        let connection =
            Connection::connect(&crate::rabbitmq::url(), ConnectionProperties::default())
                .await
                .expect("connect to RabbitMQ");
        let channel = connection.create_channel().await.expect("channel");
        let found = rabbitmq_has(&channel, name, what).await.expect("lookup");
        let _ = connection.close(200, "checked".into()).await;
        found
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_rabbitmq_run_leaves_no_group_queue_exchange_or_journal() {
        let topic = fresh("leftovers");
        let (exchange, queue) = (exchange(), format!("{topic}.sink"));
        let journal = format!("{exchange}.journal");
        let checks = async {
            one_run("rabbitmq", &[("RABBITMQ_REPLAY_JOURNAL", "true")], &topic).await;
            for (name, what) in [
                (&queue, Delete::Queue),
                (&journal, Delete::Queue),
                (&exchange, Delete::Exchange),
            ] {
                assert!(rabbitmq_holds(name, what).await, "the run made {name}");
            }
            remove_topic_on("rabbitmq", &topic, &["sink"]).await;
            assert!(!rabbitmq_holds(&queue, Delete::Queue).await);
            assert!(
                rabbitmq_holds(&exchange, Delete::Exchange).await,
                "the exchange stays until the scenario's last run"
            );
            remove_rabbitmq_exchange().await;
            assert!(!rabbitmq_holds(&journal, Delete::Queue).await);
            assert!(!rabbitmq_holds(&exchange, Delete::Exchange).await);
            // The adapter's own dead-letter queue, declared on every connection, is not the
            // bench's to remove.
            let config = RabbitConfig::from_env().expect("RabbitMQ settings");
            if let Some(dlq) = &config.dead_letter_queue {
                assert!(rabbitmq_holds(dlq, Delete::Queue).await, "{dlq} kept");
            }
        };
        checked(checks, async {
            remove_topic_on("rabbitmq", &topic, &["sink"]).await;
            remove_rabbitmq_exchange().await;
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_redis_streams_run_leaves_no_stream() {
        let topic = fresh("leftovers");
        let checks = async {
            one_run("redis-streams", &[], &topic).await;
            let client = redis::Client::open(crate::redis::url()).expect("REDIS_URL");
            let mut connection = client
                .get_multiplexed_async_connection()
                .await
                .expect("connect to Redis");
            let mut exists = async || -> i64 {
                redis::cmd("EXISTS")
                    .arg(&topic)
                    .query_async(&mut connection)
                    .await
                    .expect("EXISTS")
            };
            assert_eq!(exists().await, 1, "the run made {topic}");
            remove_topic_on("redis-streams", &topic, &["sink"]).await;
            assert_eq!(exists().await, 0, "{topic} is still there");
        };
        checked(checks, remove_topic_on("redis-streams", &topic, &["sink"])).await;
    }
}
