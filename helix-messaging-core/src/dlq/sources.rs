//! Dead letters from more than one broker: a hub whose tasks and events are on different
//! brokers dead-letters each side on its own broker, so one processor ingests the DLQ
//! topics of each and re-drives a letter to the broker it came from.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::config::ProcessorConfig;
use super::letter::{DeadLetter, HEADER_SOURCE};
use super::processor::Processor;
use super::source::DeadLetterSource;
use super::store::DeadLetterStore;
use crate::broker::{Broker, StartPosition, SubscribeOptions};
use crate::delivery::Envelope;
use crate::error::{Error, Result};
use crate::runner::{Runner, handler_fn};

/// One DLQ topic to ingest: the source's name (`None`: the processor's own broker), its
/// broker, the topic.
type Ingested = (Option<Arc<str>>, Arc<dyn Broker>, String);

impl Processor {
    /// A processor over `broker` (its `config.topics`, as [`Processor::new`]) and over each
    /// of `sources` too: their dead letters are listed with the rest and re-driven (by
    /// [`reprocess`](Processor::reprocess), the automatic re-drive or a bulk redrive) to the
    /// broker they were found on.
    ///
    /// # Errors
    /// [`ErrorKind::Config`](crate::ErrorKind::Config) for a field of `config` out of range;
    /// [`ErrorKind::InvalidInput`](crate::ErrorKind::InvalidInput) when two sources share a
    /// name.
    pub fn with_sources(
        broker: Arc<dyn Broker>,
        store: Arc<dyn DeadLetterStore>,
        config: ProcessorConfig,
        sources: Vec<DeadLetterSource>,
    ) -> Result<Self> {
        for (i, source) in sources.iter().enumerate() {
            if sources[..i].iter().any(|s| s.name == source.name) {
                return Err(Error::invalid_input(format!(
                    "two dead-letter sources are named {}",
                    source.name
                )));
            }
        }
        Processor::assemble(broker, store, config, sources)
    }

    /// The extra sources this processor was given.
    pub fn sources(&self) -> &[DeadLetterSource] {
        &self.inner.sources
    }

    /// The broker `letter` is re-driven to: the one it was ingested from.
    ///
    /// # Errors
    /// [`ErrorKind::Config`](crate::ErrorKind::Config) when it names a source this
    /// processor was not given.
    pub(super) fn broker_for(&self, letter: &DeadLetter) -> Result<&Arc<dyn Broker>> {
        let Some(name) = letter.source() else {
            return Ok(&self.inner.broker);
        };
        self.inner
            .sources
            .iter()
            .find(|s| s.name == name)
            .map(|s| &s.broker)
            .ok_or_else(|| {
                Error::config(
                    "sources",
                    format!(
                        "dead letter {} came from the broker named {name}, which this processor was not given",
                        letter.id
                    ),
                )
            })
    }

    /// One ingesting runner per DLQ topic of the processor's broker and of each source.
    ///
    /// # Errors
    /// The subscribe error (the runners started before it are shut down).
    pub(super) async fn start_ingesters(&self) -> Result<Vec<Runner>> {
        // Collected before the first await: a borrowing iterator held across it would keep
        // the future from being `Send`.
        let mut wanted: Vec<Ingested> = self
            .config()
            .topics
            .iter()
            .map(|topic| (None, self.inner.broker.clone(), topic.clone()))
            .collect();
        for source in &self.inner.sources {
            let name: Arc<str> = Arc::from(source.name.as_str());
            for topic in &source.topics {
                wanted.push((Some(name.clone()), source.broker.clone(), topic.clone()));
            }
        }
        let mut ingesters = Vec::new();
        for (source, broker, topic) in wanted {
            match self.ingester(source, &broker, &topic).await {
                Ok(runner) => ingesters.push(runner),
                Err(err) => {
                    for runner in ingesters {
                        runner.shutdown().await;
                    }
                    return Err(err);
                }
            }
        }
        Ok(ingesters)
    }

    /// Ingests `topic` of `broker`, marking each letter with `source`.
    async fn ingester(
        &self,
        source: Option<Arc<str>>,
        broker: &Arc<dyn Broker>,
        topic: &str,
    ) -> Result<Runner> {
        let processor = self.clone();
        let dlq_topic: Arc<str> = Arc::from(topic);
        let handler = handler_fn(move |envelope: Envelope| {
            let processor = processor.clone();
            let dlq_topic = dlq_topic.clone();
            let source = source.clone();
            async move {
                let mut letter = DeadLetter::from_message(&envelope.message, &dlq_topic);
                if let Some(source) = source {
                    letter.message = letter.message.with_header(HEADER_SOURCE, &*source);
                }
                match processor.ingest(letter).await {
                    Ok(_) => {
                        processor.inner.ingest_failures.store(0, Ordering::Relaxed);
                        Ok(())
                    }
                    Err(err) => Err(processor.back_off_ingesting(&dlq_topic, err).await),
                }
            }
        });
        // A group created now starts from what the topic retains, where it can: letters
        // sent before the processor first ran are ingested too.
        let start = if broker.capabilities().replay_by_time {
            StartPosition::Earliest
        } else {
            StartPosition::Latest
        };
        let options = SubscribeOptions::group(self.config().group.clone()).with_start(start);
        Runner::builder(broker.clone(), topic)
            .options(options)
            .start(handler)
            .await
    }
}
