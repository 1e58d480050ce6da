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

use crate::primary::Connection;
use helix_messaging_core::{Error, Result};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::error::{from_redis, has_code};

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

/// A stream entry id (`<ms>-<seq>`) as its two numbers: ordered as the ids are, hashed and
/// handed around without an allocation, and written into a command as the text Redis gave.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct EntryId {
    ms: u64,
    seq: u64,
}

impl EntryId {
    /// The id in Redis' text form; `None` for anything else.
    pub(crate) fn parse(id: &str) -> Option<Self> {
        let (ms, seq) = id.split_once('-')?;
        Some(EntryId {
            ms: ms.parse().ok()?,
            seq: seq.parse().ok()?,
        })
    }
}

impl std::fmt::Display for EntryId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

impl redis::ToRedisArgs for EntryId {
    fn write_redis_args<W: ?Sized + redis::RedisWrite>(&self, out: &mut W) {
        use std::io::Write as _;
        // Straight into the command's buffer: writing to a Vec cannot fail.
        let _ = write!(out.writer_for_next_arg(), "{}-{}", self.ms, self.seq);
    }
}

type Waiting = (EntryId, oneshot::Sender<Result<bool>>);

/// The acking side of one subscription's group: cheap to share among its deliveries.
pub(crate) struct Acks {
    queue: mpsc::UnboundedSender<Waiting>,
}

impl Acks {
    /// Start the task that sends `group`'s acks on `topic`. It ends once every handle is
    /// dropped, or at `shutdown` (failing what is still queued as closed).
    pub(crate) fn start(
        commands: Connection,
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
    pub(crate) async fn ack(&self, id: EntryId) -> Result<bool> {
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
    commands: Connection,
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
    mut commands: Connection,
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
        // The script call is written as one command, each id straight into its buffer (a
        // `ScriptInvocation` holds every argument in a buffer of its own, then copies them).
        let mut call = redis::Cmd::with_capacity(
            5 + batch.len(),
            64 + topic.len() + group.len() + 42 * batch.len(),
        );
        call.arg("EVALSHA")
            .arg(ACK.get_hash())
            .arg(1)
            .arg(&*topic)
            .arg(&*group);
        for (id, _) in &batch {
            call.arg(id);
        }
        let missing: redis::RedisResult<Vec<usize>> = match call.query_async(&mut commands).await {
            // The server lost its script cache (a restart, SCRIPT FLUSH): load it, once more.
            Err(err) if has_code(&err, "NOSCRIPT") => match ACK.load_async(&mut commands).await {
                Ok(_) => call.query_async(&mut commands).await,
                Err(err) => Err(err),
            },
            answer => answer,
        };
        missing.map(|missing| {
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
        let mut commands = crate::primary::tests::connect_to(&url).await;
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
        // The acks of several ids are one script call by its hash: with the server's script
        // cache emptied, the call loads the script and goes through all the same.
        let _: () = redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query_async(&mut commands)
            .await
            .unwrap();
        let acks = Acks::start(
            commands.clone(),
            Arc::from(topic.as_str()),
            Arc::from("g"),
            CancellationToken::new(),
        );
        let answers = futures::future::join_all(
            ids.iter()
                .map(|id: &String| acks.ack(EntryId::parse(id).expect("a Redis entry id"))),
        )
        .await;
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
        let commands = crate::primary::tests::connect_to(&url).await;
        let shutdown = CancellationToken::new();
        let acks = Acks::start(commands, Arc::from("t"), Arc::from("g"), shutdown.clone());
        shutdown.cancel();
        let answer = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            acks.ack(EntryId::parse("1-0").unwrap()),
        )
        .await
        .expect("an answer within 5 s");
        assert_eq!(answer.unwrap_err().kind(), ErrorKind::Closed);
    }
}
