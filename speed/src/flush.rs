//! One flush of the speed layer, in two stages that can overlap with the neighbouring
//! batches': [`prepare`] runs a batch through the [`Processor`] (parsing, lateness, new entity
//! states: CPU), and [`commit`] writes its states to the store, then its dead letters, archive
//! files and watermark checkpoints, and last its offsets (I/O). Batches are committed one at a
//! time and in order. A crash anywhere before the offsets are committed replays the batch,
//! which the states' event-id deduplication makes harmless.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicI64, Ordering};
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
use crate::writes::StateWrites;
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
    /// Where newly assigned partitions go to be checked for deleted messages (`None`: the
    /// check could not start).
    pub(crate) losses: Option<crate::consumer::LossCheck>,
}

/// A batch through the processor, its states not yet written.
pub(crate) struct Prepared {
    outcome: BatchOutcome,
    writes: StateWrites,
    /// Producer timestamps of its messages, for the produce-to-visible latency.
    stamps: Vec<i64>,
    /// Every owned partition's watermark after the batch.
    watermarks: Vec<(i32, i64)>,
    started: Instant,
}

/// What a committed batch tells the processor: the entities whose cached states are stale.
pub(crate) struct Committed {
    reloaded: Vec<duet_spec::event::Text>,
}

impl Committed {
    /// Tells the processor.
    pub(crate) fn settle<S: StateStore>(self, processor: &mut Processor<S>) {
        processor.forget(&self.reloaded);
    }
}

/// Runs a batch through the processor (which retries a failing state store with a growing
/// pause while it loads states).
pub(crate) async fn prepare<S: StateStore>(
    processor: &mut Processor<S>,
    messages: Vec<Message>,
) -> Result<Prepared> {
    let started = Instant::now();
    let stamps = messages.iter().filter_map(|m| m.timestamp_ms).collect();
    let (outcome, writes) = processor.prepare(messages, crate::now_ms()).await?;
    Ok(Prepared {
        outcome,
        writes,
        stamps,
        watermarks: processor
            .watermarks()
            .iter()
            .map(|(p, w)| (*p, *w))
            .collect(),
        started,
    })
}

/// Writes a prepared batch's states, then its dead letters, archive files and checkpoints, and
/// last its offsets.
pub(crate) async fn commit<S: StateStore>(
    store: &S,
    sinks: &Sinks,
    prepared: Prepared,
    archive: Option<&mut Archive>,
) -> Result<Committed> {
    let Sinks {
        consumer,
        producer,
        config,
        metrics,
        checkpoints,
        owned,
        losses: _,
    } = sinks;
    let Prepared {
        mut outcome,
        writes,
        stamps,
        watermarks,
        started,
    } = prepared;
    let t0 = Instant::now();
    let states = writes.len();
    let reloaded = writes.apply(store, &mut outcome).await?;
    let t_states = t0.elapsed();
    let visible = crate::now_ms();
    for t in stamps {
        metrics
            .freshness_seconds
            .observe((visible - t) as f64 / 1000.0);
    }
    send_dead_letters(producer.as_ref(), config, &outcome).await?;
    if let Some(archive) = archive {
        archive.write(&outcome).await?;
    }
    checkpoints.save(store, &outcome).await?;
    // A partition revoked while its batch was in flight is not committed: its next owner reads
    // the batch again. (With none left, there is nothing to commit; librdkafka refuses an
    // empty commit.)
    {
        let owned = owned.lock().expect("not poisoned");
        outcome.commit.retain(|p, _| owned.contains(p));
    }
    let mut backoff = Duration::from_millis(100);
    while !outcome.commit.is_empty()
        && let Err(e) = commit_offsets(consumer, &config.topic, &outcome).await
    {
        if backoff > Duration::from_secs(30) {
            return Err(e);
        }
        tracing::warn!(error = %e, retry_in = ?backoff, "offset commit failed; retrying");
        tokio::time::sleep(backoff).await;
        backoff *= 2;
    }
    record(store, config, metrics, &outcome, &watermarks).await;
    tracing::debug!(
        states,
        write = ?t_states,
        rest = ?(t0.elapsed() - t_states),
        "batch committed"
    );
    metrics
        .flush_seconds
        .observe(started.elapsed().as_secs_f64());
    Ok(Committed { reloaded })
}

/// Both stages at once, for the last batch before stopping.
pub(crate) async fn flush<S: StateStore>(
    processor: &mut Processor<S>,
    sinks: &Sinks,
    messages: Vec<Message>,
    archive: Option<&mut Archive>,
) -> Result<()> {
    let prepared = prepare(processor, messages).await?;
    let committed = commit(processor.store(), sinks, prepared, archive).await?;
    committed.settle(processor);
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

async fn commit_offsets(
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
    store: &S,
    config: &SpeedConfig,
    metrics: &SpeedMetrics,
    o: &BatchOutcome,
    watermarks: &[(i32, i64)],
) {
    metrics.events.add(o.applied);
    metrics.duplicates.add(o.duplicates);
    metrics.late.add(o.late);
    metrics.conflicts.add(o.conflicts);
    if o.rebuilt > 0 {
        metrics.rebuilt.add(o.rebuilt);
        metrics.rebuilt_partially.add(o.rebuilt_partially);
        // Each at most once a minute: a catch-up rebuilds states in many batches in a row.
        static INFO: AtomicI64 = AtomicI64::new(i64::MIN);
        static WARNING: AtomicI64 = AtomicI64::new(i64::MIN);
        let due = |last: &AtomicI64| {
            let now = crate::now_ms();
            let at = last.load(Ordering::Relaxed);
            now.saturating_sub(at) >= 60_000
                && last
                    .compare_exchange(at, now, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
        };
        let (total, partial) = (metrics.rebuilt.get(), metrics.rebuilt_partially.get());
        if o.rebuilt_partially > 0 && due(&WARNING) {
            tracing::warn!(
                total,
                partial,
                "rebuilt absent states from their histories; some histories did not reach back the streaming horizon, so those states may miss events"
            );
        } else if o.rebuilt > o.rebuilt_partially && due(&INFO) {
            tracing::info!(
                total,
                "rebuilt absent states from their histories: their partitions' watermarks trail the clock, so their keys may have expired while still needed"
            );
        }
    }
    metrics.flushes.add(1);
    {
        let mut inv = metrics.invalid.lock().expect("not poisoned");
        for (k, v) in &o.invalid.0 {
            *inv.entry(k.clone()).or_default() += v;
        }
    }
    {
        let mut wm = metrics.watermark.lock().expect("not poisoned");
        for (p, w) in watermarks {
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
    if let Err(e) = store
        .add_counters(&stats_key(&config.prefix), &counts)
        .await
    {
        tracing::warn!(error = %e, "could not update the speed layer's counters");
    }
}
