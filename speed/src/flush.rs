//! One flush of the speed layer: a batch of messages through the [`Processor`] into the state
//! store, then its dead letters, archive files and watermark checkpoints, and last its offsets.
//! A crash anywhere before the commit replays the batch, which the states' event-id
//! deduplication makes harmless.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

use crate::archive::Archive;
use crate::consumer::{GroupContext, SpeedConfig, kafka};
use crate::metrics::SpeedMetrics;
use crate::processor::{BatchOutcome, Message, Processor, stats_key};
use crate::store::StateStore;
use crate::{Error, Result};

/// Commit metadata carrying a partition's watermark.
pub(crate) const WM_PREFIX: &str = "duet-wm=";

/// Watermarks saved beside the state, for brokers that do not return commit metadata (the
/// Kafka protocol allows it; some implementations drop it). Per partition the last two
/// `(next offset, watermark)` pairs are kept: the commit that follows a save may fail, and a
/// restart then resumes from the previous one.
pub(crate) struct Checkpoints {
    key: String,
}

impl Checkpoints {
    pub(crate) fn new(config: &SpeedConfig) -> Self {
        Checkpoints {
            key: format!("{}wm:{}:{}", config.prefix, config.group, config.topic),
        }
    }

    pub(crate) async fn load<S: StateStore>(
        &self,
        store: &S,
    ) -> Result<std::collections::HashMap<String, String>> {
        store.fields(&self.key).await
    }

    fn parse(v: Option<&String>) -> Option<(i64, i64)> {
        let (o, w) = v?.split_once(':')?;
        Some((o.parse().ok()?, w.parse().ok()?))
    }

    /// The watermark saved for `partition` at exactly the committed offset, or else at the
    /// newest offset before it.
    pub(crate) fn watermark_at(
        saved: &std::collections::HashMap<String, String>,
        partition: i32,
        committed: Option<i64>,
    ) -> Option<i64> {
        let committed = committed?;
        [
            saved.get(&format!("{partition}.last")),
            saved.get(&format!("{partition}.prev")),
        ]
        .into_iter()
        .filter_map(Self::parse)
        .filter(|(o, _)| *o <= committed)
        .max_by_key(|(o, _)| *o)
        .map(|(_, w)| w)
    }

    async fn save<S: StateStore>(&self, store: &S, outcome: &BatchOutcome) -> Result<()> {
        let saved = store.fields(&self.key).await?;
        let mut fields = Vec::new();
        for (p, (next, wm)) in &outcome.commit {
            if *wm == i64::MIN {
                continue;
            }
            if let Some(last) = saved.get(&format!("{p}.last")) {
                fields.push((format!("{p}.prev"), last.clone()));
            }
            fields.push((format!("{p}.last"), format!("{next}:{wm}")));
        }
        store.set_fields(&self.key, &fields).await
    }
}

/// Where a flush's results go: offsets to Kafka, dead letters to their topic, watermarks beside
/// the state, counts to the metrics. Shared by the receiving loop and the flush task.
pub(crate) struct Sinks {
    pub(crate) consumer: Arc<StreamConsumer<GroupContext>>,
    pub(crate) producer: Option<FutureProducer>,
    pub(crate) config: SpeedConfig,
    pub(crate) metrics: Arc<SpeedMetrics>,
    pub(crate) checkpoints: Checkpoints,
    /// Partitions this member owns now (kept by the rebalance callback): a flush that started
    /// before a partition was revoked does not commit its offsets.
    pub(crate) owned: Arc<Mutex<BTreeSet<i32>>>,
}

/// Processes one batch: states first (compare-and-set), then dead letters, archive and
/// watermark checkpoints, and only then the offsets. A failed state write retries the whole
/// batch (states deduplicate events by id, so a retry never counts twice).
pub(crate) async fn flush<S: StateStore>(
    processor: &mut Processor<S>,
    sinks: &Sinks,
    messages: Vec<Message>,
    archive: Option<&mut Archive>,
) -> Result<()> {
    let Sinks {
        consumer,
        producer,
        config,
        metrics,
        checkpoints,
        owned,
    } = sinks;
    let started = Instant::now();
    let mut backoff = Duration::from_millis(100);
    let mut outcome = loop {
        match processor.process(&messages, crate::now_ms()).await {
            Ok(o) => break o,
            Err(Error::Redis(e)) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "state store failed; retrying the batch");
                processor.forget_cache();
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(e),
        }
    };
    let visible = crate::now_ms();
    for t in messages.iter().filter_map(|m| m.timestamp_ms) {
        metrics
            .freshness_seconds
            .observe((visible - t) as f64 / 1000.0);
    }
    drop(messages);
    send_dead_letters(producer.as_ref(), config, &outcome).await?;
    if let Some(archive) = archive {
        archive.write(&outcome).await?;
    }
    checkpoints.save(processor.store(), &outcome).await?;
    {
        let owned = owned.lock().expect("not poisoned");
        outcome.commit.retain(|p, _| owned.contains(p));
    }
    let mut backoff = Duration::from_millis(100);
    while let Err(e) = commit(consumer, &config.topic, &outcome).await {
        if backoff > Duration::from_secs(30) {
            return Err(e);
        }
        tracing::warn!(error = %e, retry_in = ?backoff, "offset commit failed; retrying");
        tokio::time::sleep(backoff).await;
        backoff *= 2;
    }
    processor.committed(&outcome);
    record(processor, config, metrics, &outcome).await;
    metrics
        .flush_seconds
        .observe(started.elapsed().as_secs_f64());
    Ok(())
}

async fn send_dead_letters(
    producer: Option<&FutureProducer>,
    config: &SpeedConfig,
    outcome: &BatchOutcome,
) -> Result<()> {
    if outcome.dead_letters.is_empty() {
        return Ok(());
    }
    for d in &outcome.dead_letters {
        tracing::debug!(source = %d.source, offset = d.position, reason = %d.reason, "invalid record");
    }
    tracing::warn!(
        count = outcome.dead_letters.len(),
        topic = config.dead_letter_topic.as_deref().unwrap_or("(none)"),
        reasons = ?outcome.invalid.0,
        "invalid records dead-lettered"
    );
    let (Some(producer), Some(topic)) = (producer, &config.dead_letter_topic) else {
        return Ok(());
    };
    let sends = outcome.dead_letters.iter().map(|d| {
        let key = format!("{}@{}", d.source, d.position);
        let payload = d.to_json_line();
        async move {
            producer
                .send(
                    FutureRecord::to(topic).key(&key).payload(&payload),
                    Duration::from_secs(30),
                )
                .await
                .map(|_| ())
                .map_err(|(e, _)| {
                    Error::Kafka(format!("cannot send a dead letter to `{topic}`: {e}"))
                })
        }
    });
    futures::future::try_join_all(sends).await?;
    Ok(())
}

async fn commit(
    consumer: &Arc<StreamConsumer<GroupContext>>,
    topic: &str,
    outcome: &BatchOutcome,
) -> Result<()> {
    let mut tpl = TopicPartitionList::new();
    for (p, (next, wm)) in &outcome.commit {
        let mut e = tpl.add_partition(topic, *p);
        e.set_offset(Offset::Offset(*next)).map_err(kafka)?;
        if *wm != i64::MIN {
            e.set_metadata(format!("{WM_PREFIX}{wm}"));
        }
    }
    let c = consumer.clone();
    tokio::task::spawn_blocking(move || c.commit(&tpl, CommitMode::Sync))
        .await
        .map_err(|e| Error::Internal(e.to_string()))?
        .map_err(kafka)
}

async fn record<S: StateStore>(
    processor: &Processor<S>,
    config: &SpeedConfig,
    metrics: &SpeedMetrics,
    o: &BatchOutcome,
) {
    metrics.events.add(o.applied);
    metrics.duplicates.add(o.duplicates);
    metrics.late.add(o.late);
    metrics.conflicts.add(o.conflicts);
    metrics.flushes.add(1);
    {
        let mut inv = metrics.invalid.lock().expect("not poisoned");
        for (k, v) in &o.invalid.0 {
            *inv.entry(k.clone()).or_default() += v;
        }
    }
    {
        let mut wm = metrics.watermark.lock().expect("not poisoned");
        for (p, w) in processor.watermarks() {
            wm.insert(*p, *w);
        }
    }
    let mut counts: Vec<(String, i64)> = vec![
        ("applied".into(), o.applied as i64),
        ("duplicates".into(), o.duplicates as i64),
        ("late".into(), o.late as i64),
    ];
    counts.extend(
        o.invalid
            .0
            .iter()
            .map(|(k, v)| (format!("invalid_{k}"), *v as i64)),
    );
    counts.retain(|(_, v)| *v != 0);
    if let Err(e) = processor
        .store()
        .add_counters(&stats_key(&config.prefix), &counts)
        .await
    {
        tracing::warn!(error = %e, "could not update the speed layer's counters");
    }
}
