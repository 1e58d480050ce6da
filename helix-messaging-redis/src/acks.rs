//! Coalescing a consumer group's acks into few round trips.
//!
//! Every delivery is settled on its own, and an application acking many at once would
//! otherwise cost the server one `XACK` command each: on a busy server that per-command cost,
//! not the acking itself, bounds how fast a group can consume. Acks of one subscription go to
//! one task instead, which sends whatever has queued while the previous round trip was out as
//! one command (a few such commands may be out at once). Nothing waits for company: an ack
//! that finds the task idle goes out at once.
//! Each ack still resolves only once the server has answered for its own entry, with its own
//! result (whether the entry was still pending).

use std::sync::Arc;

use helix_messaging_core::{Error, Result};
use redis::aio::ConnectionManager;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::error::from_redis;

/// Most entries one round trip acks.
const MAX_BATCH: usize = 1_024;

/// Round trips out at once: a few, so acks keep flowing while a busy server answers one.
const MAX_IN_FLIGHT: usize = 4;

/// Ack several ids in one script call and tell which were no longer pending (a plain `XACK`
/// of several ids only counts them together): each id is acked on its own, which measured
/// cheaper on the server than listing the pending ones first with `XCLAIM … JUSTID`. KEYS:
/// stream. ARGV: group, ids. Returns the 1-based positions of the ids that were not pending,
/// usually none, so the reply stays small.
const ACK_SCRIPT: &str = r"
local missing = {}
for i = 2, #ARGV do
  if redis.call('XACK', KEYS[1], ARGV[1], ARGV[i]) == 0 then missing[#missing + 1] = i - 1 end
end
return missing
";

static ACK: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(ACK_SCRIPT));

type Waiting = (String, oneshot::Sender<Result<bool>>);

/// The acking side of one subscription's group: cheap to share among its deliveries.
pub(crate) struct Acks {
    queue: mpsc::UnboundedSender<Waiting>,
}

impl Acks {
    /// Start the task that sends `group`'s acks on `topic`. It ends once every handle is
    /// dropped, or at `shutdown` (failing what is still queued as closed).
    pub(crate) fn start(
        commands: ConnectionManager,
        topic: Arc<str>,
        group: Arc<str>,
        shutdown: CancellationToken,
    ) -> Self {
        let (queue, waiting) = mpsc::unbounded_channel();
        tokio::spawn(send_acks(commands, topic, group, waiting, shutdown));
        Acks { queue }
    }

    /// Ack `id`: `Ok(true)` once the server removed it from the group's pending list,
    /// `Ok(false)` if it was not pending (already acked).
    ///
    /// # Errors
    /// The server's error for the round trip that carried it; [`ErrorKind::Closed`] once
    /// the broker is closed.
    pub(crate) async fn ack(&self, id: String) -> Result<bool> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send((id, reply))
            .map_err(|_| Error::closed("the redis broker"))?;
        answer
            .await
            .unwrap_or_else(|_| Err(Error::closed("the redis broker")))
    }
}

async fn send_acks(
    commands: ConnectionManager,
    topic: Arc<str>,
    group: Arc<str>,
    mut waiting: mpsc::UnboundedReceiver<Waiting>,
    shutdown: CancellationToken,
) {
    let mut in_flight = futures::stream::FuturesUnordered::new();
    loop {
        let mut batch: Vec<Waiting> = Vec::new();
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            Some(()) = futures::StreamExt::next(&mut in_flight) => continue,
            received = waiting.recv_many(&mut batch, MAX_BATCH), if in_flight.len() < MAX_IN_FLIGHT => {
                if received == 0 {
                    // Every handle is gone; answer what is still out, then end.
                    while futures::StreamExt::next(&mut in_flight).await.is_some() {}
                    return;
                }
                in_flight.push(send_batch(commands.clone(), topic.clone(), group.clone(), batch));
            }
        }
    }
    // Closed: nothing more is sent.
    drop(in_flight);
    waiting.close();
    let mut rest = Vec::new();
    while let Ok(item) = waiting.try_recv() {
        rest.push(item);
    }
    fail_all(&mut rest, &Error::closed("the redis broker"));
}

/// Ack one batch and answer each of its waiters.
async fn send_batch(
    mut commands: ConnectionManager,
    topic: Arc<str>,
    group: Arc<str>,
    mut batch: Vec<Waiting>,
) {
    // Per waiter: whether its entry was still pending.
    let acked: redis::RedisResult<Vec<bool>> = if let [(id, _)] = batch.as_slice() {
        redis::cmd("XACK")
            .arg(&*topic)
            .arg(&*group)
            .arg(id)
            .query_async(&mut commands)
            .await
            .map(|count: i64| vec![count > 0])
    } else {
        let mut call = ACK.key(&*topic);
        call.arg(&*group);
        for (id, _) in &batch {
            call.arg(id);
        }
        call.invoke_async(&mut commands)
            .await
            .map(|missing: Vec<usize>| {
                let mut pending = vec![true; batch.len()];
                for position in missing {
                    if let Some(slot) = position.checked_sub(1).and_then(|i| pending.get_mut(i)) {
                        *slot = false;
                    }
                }
                pending
            })
    };
    match acked {
        Ok(pending) => {
            for ((_, reply), was_pending) in batch.drain(..).zip(pending) {
                let _ = reply.send(Ok(was_pending));
            }
        }
        Err(err) => {
            let err = from_redis(err, format!("XACK on {topic}"));
            fail_all(&mut batch, &err);
        }
    }
}

/// Answer every waiting ack with (a copy of) `err`.
fn fail_all(batch: &mut Vec<Waiting>, err: &Error) {
    for (_, reply) in batch.drain(..) {
        let copy =
            Error::new(err.kind(), err.message().to_owned()).with_retryable(err.is_retryable());
        let _ = reply.send(Err(copy));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use helix_messaging_core::ErrorKind;

    /// Against the machine's Redis (`REDIS_URL`): acks sent together each get their own
    /// answer, including one for an entry that was no longer pending.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn acks_sent_together_each_get_their_own_answer() {
        let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        let client = redis::Client::open(url).unwrap();
        let mut commands = ConnectionManager::new(client).await.expect("Redis");
        let topic = format!("acks-test.{}", uuid::Uuid::new_v4().simple());
        let _: () = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&topic)
            .arg("g")
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut commands)
            .await
            .unwrap();
        let mut ids = Vec::new();
        for i in 0..500 {
            let id: String = redis::cmd("XADD")
                .arg(&topic)
                .arg("*")
                .arg("n")
                .arg(i)
                .query_async(&mut commands)
                .await
                .unwrap();
            ids.push(id);
        }
        let _: redis::Value = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg("g")
            .arg("c")
            .arg("STREAMS")
            .arg(&topic)
            .arg(">")
            .query_async(&mut commands)
            .await
            .unwrap();
        // Every tenth entry is settled already.
        for id in ids.iter().step_by(10) {
            let _: i64 = redis::cmd("XACK")
                .arg(&topic)
                .arg("g")
                .arg(id)
                .query_async(&mut commands)
                .await
                .unwrap();
        }
        let acks = Acks::start(
            commands.clone(),
            Arc::from(topic.as_str()),
            Arc::from("g"),
            CancellationToken::new(),
        );
        let answers = futures::future::join_all(ids.iter().map(|id| acks.ack(id.clone()))).await;
        for (i, answer) in answers.into_iter().enumerate() {
            assert_eq!(answer.unwrap(), i % 10 != 0, "entry {i}");
        }
        let pending: (i64, redis::Value, redis::Value, redis::Value) = redis::cmd("XPENDING")
            .arg(&topic)
            .arg("g")
            .query_async(&mut commands)
            .await
            .unwrap();
        assert_eq!(pending.0, 0, "nothing left pending");
        let _: i64 = redis::cmd("DEL")
            .arg(&topic)
            .query_async(&mut commands)
            .await
            .unwrap();
    }

    /// Once the broker shuts down, queued and later acks fail as closed instead of hanging.
    #[tokio::test]
    async fn acks_after_shutdown_fail_as_closed() {
        let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        let client = redis::Client::open(url).unwrap();
        let commands = ConnectionManager::new(client).await.expect("Redis");
        let shutdown = CancellationToken::new();
        let acks = Acks::start(commands, Arc::from("t"), Arc::from("g"), shutdown.clone());
        shutdown.cancel();
        let answer = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            acks.ack("1-0".to_owned()),
        )
        .await
        .expect("an answer within 5 s");
        assert_eq!(answer.unwrap_err().kind(), ErrorKind::Closed);
    }
}
