//! `duet speed run`: the Kafka loop around the [`Processor`].
//!
//! `select!` over the message stream, a flush tick and the shutdown token. A flush writes the
//! batch's states (compare-and-set, one key each), sends its dead letters, and only then
//! commits the batch's offsets to Kafka — together with each partition's watermark in the
//! commit metadata, so a restarted or newly assigned process resumes with the same lateness
//! decisions. A crash between the state writes and the commit replays the batch, which the
//! states' event-id deduplication makes harmless.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::KafkaError;
use rdkafka::message::{Message as _, Timestamp};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::archive::Archive;
use crate::metrics::SpeedMetrics;
use crate::plan::SpeedPlan;
use crate::processor::{BatchOutcome, Message, Processor, stats_key};
use crate::store::StateStore;
use crate::{Error, Result};

/// Settings of one speed-layer process.
#[derive(Debug, Clone)]
pub struct SpeedConfig {
    /// Kafka bootstrap servers.
    pub brokers: String,
    /// The event topic.
    pub topic: String,
    /// The consumer group.
    pub group: String,
    /// Key prefix of the state in the store.
    pub prefix: String,
    /// Topic receiving invalid records (`None`: not sent anywhere but counted and logged).
    pub dead_letter_topic: Option<String>,
    /// Stop after being caught up this long.
    pub exit_when_idle: Option<Duration>,
    /// Largest batch.
    pub max_batch: usize,
    /// Longest time a message waits before its batch is flushed.
    pub flush_interval: Duration,
    /// Offline log to archive consumed events to.
    pub archive: Option<String>,
    /// Extra librdkafka settings (`key=value`).
    pub kafka_options: Vec<(String, String)>,
}

enum RebalanceEvent {
    Assigned(Vec<i32>),
    Revoked(Vec<i32>),
}

struct GroupContext {
    tx: mpsc::UnboundedSender<RebalanceEvent>,
    topic: String,
    metrics: Arc<SpeedMetrics>,
}

impl ClientContext for GroupContext {
    /// Lag per partition from librdkafka's statistics: the high watermark the broker states in
    /// its fetch responses against the committed offset (a separate offsets query is not used;
    /// some Kafka-protocol brokers answer it with the first offset of the newest batch).
    fn stats(&self, statistics: rdkafka::Statistics) {
        let Some(topic) = statistics.topics.get(&self.topic) else {
            return;
        };
        let mut lag = self.metrics.lag.lock().expect("not poisoned");
        lag.clear();
        for (p, stats) in &topic.partitions {
            if *p >= 0 && stats.desired && stats.hi_offset >= 0 {
                let position = stats.committed_offset.max(0);
                lag.insert(*p, (stats.hi_offset - position).max(0));
            }
        }
    }
}

impl ConsumerContext for GroupContext {
    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let parts =
            |tpl: &TopicPartitionList| tpl.elements().iter().map(|e| e.partition()).collect();
        let event = match rebalance {
            Rebalance::Assign(tpl) => RebalanceEvent::Assigned(parts(tpl)),
            Rebalance::Revoke(tpl) => RebalanceEvent::Revoked(parts(tpl)),
            Rebalance::Error(e) => {
                tracing::warn!(error = %e, "rebalance error");
                return;
            }
        };
        let _ = self.tx.send(event);
    }
}

const WM_PREFIX: &str = "duet-wm=";

/// Watermarks saved beside the state, for brokers that do not return commit metadata (the
/// Kafka protocol allows it; some implementations drop it). Per partition the last two
/// `(next offset, watermark)` pairs are kept: the commit that follows a save may fail, and a
/// restart then resumes from the previous one.
struct Checkpoints {
    key: String,
}

impl Checkpoints {
    fn new(config: &SpeedConfig) -> Self {
        Checkpoints {
            key: format!("{}wm:{}:{}", config.prefix, config.group, config.topic),
        }
    }

    async fn load<S: StateStore>(
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
    fn watermark_at(
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

fn kafka(e: rdkafka::error::KafkaError) -> Error {
    Error::Kafka(e.to_string())
}

/// Runs the speed layer until `shutdown` is cancelled or, with `exit_when_idle`, until it has
/// been caught up long enough. Flushes and commits before returning.
pub async fn run<S: StateStore + Clone>(
    plan: Arc<SpeedPlan>,
    store: S,
    config: SpeedConfig,
    metrics: Arc<SpeedMetrics>,
    shutdown: CancellationToken,
) -> Result<()> {
    let claimed = store
        .claim(&format!("{}spec", config.prefix), &plan.spec_fingerprint)
        .await?;
    if claimed != plan.spec_fingerprint {
        return Err(Error::BadInput(format!(
            "the state under prefix `{}` was built by a different spec (fingerprint {claimed}, this spec {}): \
             use another --prefix for the new spec, or delete the old state",
            config.prefix, plan.spec_fingerprint
        )));
    }
    let (tx, mut rebalances) = mpsc::unbounded_channel();
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", &config.brokers)
        .set("group.id", &config.group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000")
        .set("fetch.wait.max.ms", "20")
        .set("queued.max.messages.kbytes", "262144")
        .set("enable.partition.eof", "true")
        .set("statistics.interval.ms", "1000");
    for (k, v) in &config.kafka_options {
        cc.set(k, v);
    }
    let consumer: Arc<StreamConsumer<GroupContext>> = Arc::new(
        cc.create_with_context(GroupContext {
            tx,
            topic: config.topic.clone(),
            metrics: metrics.clone(),
        })
        .map_err(|e| Error::BadInput(format!("--brokers `{}`: {e}", config.brokers)))?,
    );
    check_topic(&consumer, &config).await?;
    let producer: Option<FutureProducer> = match &config.dead_letter_topic {
        Some(_) => Some(
            ClientConfig::new()
                .set("bootstrap.servers", &config.brokers)
                .set("message.timeout.ms", "30000")
                .create()
                .map_err(kafka)?,
        ),
        None => None,
    };
    if let Some(dlq) = &config.dead_letter_topic {
        let (c, topic) = (consumer.clone(), dlq.clone());
        let exists = tokio::task::spawn_blocking(move || {
            c.fetch_metadata(Some(&topic), Duration::from_secs(10))
                .is_ok_and(|md| {
                    md.topics().iter().any(|t| {
                        t.name() == topic && t.error().is_none() && !t.partitions().is_empty()
                    })
                })
        })
        .await
        .map_err(|e| Error::Internal(e.to_string()))?;
        if !exists {
            ensure_topic(&config.brokers, dlq).await?;
        }
    }
    consumer.subscribe(&[&config.topic]).map_err(kafka)?;
    tracing::info!(topic = %config.topic, group = %config.group, brokers = %config.brokers, "speed layer started");

    let mut processor = Processor::new(plan.clone(), store.clone(), &config.prefix, &config.topic);
    let mut archive = match &config.archive {
        Some(url) => {
            processor.keep_accepted(true);
            Some(Archive::open(url)?)
        }
        None => None,
    };
    let checkpoints = Checkpoints::new(&config);
    let sinks = Sinks {
        consumer: &consumer,
        producer: producer.as_ref(),
        config: &config,
        metrics: &metrics,
        checkpoints: &checkpoints,
    };
    let mut buffer: Vec<Message> = Vec::with_capacity(config.max_batch);
    let mut oldest: Option<Instant> = None;
    let mut tick = tokio::time::interval(config.flush_interval.min(Duration::from_millis(50)));
    let mut idle_tick = tokio::time::interval(Duration::from_millis(250));
    let mut assigned: BTreeMap<i32, ()> = BTreeMap::new();
    // Partitions whose end the consumer has reached and that have had no message since.
    let mut at_end: BTreeSet<i32> = BTreeSet::new();
    let mut caught_up_since: Option<Instant> = None;
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            received = consumer.recv() => {
                match received {
                    Ok(m) => {
                        at_end.remove(&m.partition());
                        buffer.push(Message {
                            partition: m.partition(),
                            offset: m.offset(),
                            payload: m.payload().map(<[u8]>::to_vec),
                            timestamp_ms: match m.timestamp() {
                                Timestamp::CreateTime(t) | Timestamp::LogAppendTime(t) => Some(t),
                                Timestamp::NotAvailable => None,
                            },
                        });
                        oldest.get_or_insert_with(Instant::now);
                        caught_up_since = None;
                    }
                    Err(KafkaError::PartitionEOF(p)) => {
                        at_end.insert(p);
                    }
                    Err(e) => tracing::warn!(error = %e, "consumer error"),
                }
            }
            _ = tick.tick() => {}
            _ = idle_tick.tick() => {
                let caught_up = !assigned.is_empty() && assigned.keys().all(|p| at_end.contains(p));
                if caught_up && buffer.is_empty() {
                    caught_up_since.get_or_insert_with(Instant::now);
                } else {
                    caught_up_since = None;
                }
                if let (Some(idle), Some(since)) = (config.exit_when_idle, caught_up_since)
                    && since.elapsed() >= idle
                {
                    tracing::info!(idle_secs = idle.as_secs_f64(), "caught up and idle; stopping");
                    break;
                }
            }
        }
        for (p, committed) in handle_rebalances(
            &mut rebalances,
            &consumer,
            &config.topic,
            &mut processor,
            &mut buffer,
            &mut assigned,
            &mut at_end,
            &checkpoints,
        )
        .await?
        {
            if let Some(a) = &archive {
                a.recover(p, committed).await?;
            }
        }
        let due = oldest.is_some_and(|t| t.elapsed() >= config.flush_interval);
        if buffer.len() >= config.max_batch || (due && !buffer.is_empty()) {
            flush(&mut processor, &sinks, &mut buffer, archive.as_mut()).await?;
            oldest = None;
        }
    }
    handle_rebalances(
        &mut rebalances,
        &consumer,
        &config.topic,
        &mut processor,
        &mut buffer,
        &mut assigned,
        &mut at_end,
        &checkpoints,
    )
    .await?;
    if !buffer.is_empty() {
        flush(&mut processor, &sinks, &mut buffer, archive.as_mut()).await?;
    }
    tracing::info!("speed layer stopped after a final flush and commit");
    Ok(())
}

async fn check_topic(
    consumer: &Arc<StreamConsumer<GroupContext>>,
    config: &SpeedConfig,
) -> Result<()> {
    let c = consumer.clone();
    let topic = config.topic.clone();
    let md = tokio::task::spawn_blocking(move || {
        c.fetch_metadata(Some(&topic), Duration::from_secs(15))
    })
    .await
    .map_err(|e| Error::Internal(e.to_string()))?
    .map_err(|e| Error::Kafka(format!("cannot reach brokers {}: {e}", config.brokers)))?;
    let ok = md
        .topics()
        .iter()
        .any(|t| t.name() == config.topic && t.error().is_none() && !t.partitions().is_empty());
    if !ok {
        return Err(Error::BadInput(format!(
            "--topic `{}` does not exist on {}: create it first (for example `tansu topic create {} --partitions 3`)",
            config.topic, config.brokers, config.topic
        )));
    }
    Ok(())
}

/// Creates `topic` (one partition) unless it exists.
async fn ensure_topic(brokers: &str, topic: &str) -> Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .map_err(kafka)?;
    let results = admin
        .create_topics(
            &[NewTopic::new(topic, 1, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(15))),
        )
        .await
        .map_err(kafka)?;
    for r in results {
        match r {
            Ok(_) => tracing::info!(topic, "created the dead-letter topic"),
            Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, e)) => {
                return Err(Error::Kafka(format!(
                    "cannot create the dead-letter topic `{t}`: {e}"
                )));
            }
        }
    }
    Ok(())
}

async fn handle_rebalances(
    rebalances: &mut mpsc::UnboundedReceiver<RebalanceEvent>,
    consumer: &Arc<StreamConsumer<GroupContext>>,
    topic: &str,
    processor: &mut Processor<impl StateStore>,
    buffer: &mut Vec<Message>,
    assigned: &mut BTreeMap<i32, ()>,
    at_end: &mut BTreeSet<i32>,
    checkpoints: &Checkpoints,
) -> Result<Vec<(i32, Option<i64>)>> {
    let mut newly = Vec::new();
    while let Ok(event) = rebalances.try_recv() {
        match event {
            RebalanceEvent::Revoked(parts) => {
                tracing::info!(?parts, "partitions revoked");
                buffer.retain(|m| !parts.contains(&m.partition));
                for p in parts {
                    processor.revoke(p);
                    assigned.remove(&p);
                    at_end.remove(&p);
                }
            }
            RebalanceEvent::Assigned(parts) => {
                let mut tpl = TopicPartitionList::new();
                for p in &parts {
                    tpl.add_partition(topic, *p);
                }
                let c = consumer.clone();
                let committed = tokio::task::spawn_blocking(move || {
                    c.committed_offsets(tpl, Duration::from_secs(15))
                })
                .await
                .map_err(|e| Error::Internal(e.to_string()))?
                .map_err(kafka)?;
                let saved = checkpoints.load(processor.store()).await?;
                for e in committed.elements() {
                    let offset = match e.offset() {
                        Offset::Offset(o) => Some(o),
                        _ => None,
                    };
                    let wm = e
                        .metadata()
                        .strip_prefix(WM_PREFIX)
                        .and_then(|v| v.parse::<i64>().ok())
                        .or_else(|| Checkpoints::watermark_at(&saved, e.partition(), offset));
                    tracing::info!(partition = e.partition(), offset = ?e.offset(), watermark = ?wm, "partition assigned");
                    processor.assign(e.partition(), wm);
                    assigned.insert(e.partition(), ());
                    newly.push((e.partition(), offset));
                }
            }
        }
    }
    Ok(newly)
}

/// Where a flush's results go: offsets to Kafka, dead letters to their topic, watermarks beside
/// the state, counts to the metrics.
struct Sinks<'a> {
    consumer: &'a Arc<StreamConsumer<GroupContext>>,
    producer: Option<&'a FutureProducer>,
    config: &'a SpeedConfig,
    metrics: &'a SpeedMetrics,
    checkpoints: &'a Checkpoints,
}

async fn flush<S: StateStore>(
    processor: &mut Processor<S>,
    sinks: &Sinks<'_>,
    buffer: &mut Vec<Message>,
    archive: Option<&mut Archive>,
) -> Result<()> {
    let Sinks {
        consumer,
        producer,
        config,
        metrics,
        checkpoints,
    } = *sinks;
    let started = Instant::now();
    let messages = std::mem::take(buffer);
    let stamps: Vec<i64> = messages.iter().filter_map(|m| m.timestamp_ms).collect();
    let mut backoff = Duration::from_millis(100);
    let outcome = loop {
        // Reprocessing after a failure is safe: states deduplicate events by id.
        match processor.process(messages.clone(), crate::now_ms()).await {
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
    for t in stamps {
        metrics
            .freshness_seconds
            .observe((visible - t) as f64 / 1000.0);
    }
    send_dead_letters(producer, config, &outcome).await?;
    if let Some(archive) = archive {
        archive.write(&outcome).await?;
    }
    checkpoints.save(processor.store(), &outcome).await?;
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
