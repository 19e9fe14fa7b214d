//! `duet speed run`: the Kafka loop around the [`Processor`].
//!
//! `select!` over the message stream, the running flush, a flush tick and the shutdown token.
//! Receiving never waits for a flush: while one batch is written (see [`crate::flush`]), the
//! next accumulates, and it is flushed as soon as the running flush ends (group commit), so
//! under load batches grow with the time a flush takes and each entity's state is written once
//! per batch rather than once per event. Flushes run one at a time, in order. Each commits its
//! offsets together with each partition's watermark in the commit metadata, so a restarted or
//! newly assigned process resumes with the same lateness decisions.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::{FutureExt, StreamExt};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Message as _, Timestamp};
use rdkafka::producer::FutureProducer;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::archive::Archive;
use crate::flush::{Checkpoints, Committed, Prepared, Sinks, WM_PREFIX, commit, flush, prepare};
use crate::metrics::SpeedMetrics;
use crate::plan::SpeedPlan;
use crate::processor::{Message, Processor};
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

pub(crate) struct GroupContext {
    tx: mpsc::UnboundedSender<RebalanceEvent>,
    topic: String,
    metrics: Arc<SpeedMetrics>,
    owned: Arc<Mutex<BTreeSet<i32>>>,
}

impl ClientContext for GroupContext {
    /// Reaching a partition's end is reported as an event on the consumer's stream (it marks the
    /// partition caught up), not as an error.
    fn error(&self, error: KafkaError, reason: &str) {
        if !matches!(
            error,
            KafkaError::PartitionEOF(_)
                | KafkaError::Global(rdkafka::types::RDKafkaErrorCode::PartitionEOF)
        ) {
            tracing::error!(error = %error, reason, "librdkafka error");
        }
    }

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
            Rebalance::Assign(tpl) => {
                let parts: Vec<i32> = parts(tpl);
                self.owned.lock().expect("not poisoned").extend(&parts);
                RebalanceEvent::Assigned(parts)
            }
            Rebalance::Revoke(tpl) => {
                let parts: Vec<i32> = parts(tpl);
                let mut owned = self.owned.lock().expect("not poisoned");
                for p in &parts {
                    owned.remove(p);
                }
                RebalanceEvent::Revoked(parts)
            }
            Rebalance::Error(e) => {
                tracing::warn!(error = %e, "rebalance error");
                return;
            }
        };
        let _ = self.tx.send(event);
    }
}

pub(crate) fn kafka(e: rdkafka::error::KafkaError) -> Error {
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
    let owned = Arc::new(Mutex::new(BTreeSet::new()));
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
            owned: owned.clone(),
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

    // The processor reads states through a connection of its own, so that the next batch's
    // reads do not wait behind the previous batch's writes.
    let reads = store.own_connection().await?;
    let mut processor = Processor::new(plan.clone(), reads, &config.prefix, &config.topic);
    let archive = match &config.archive {
        Some(url) => {
            processor.keep_accepted(true);
            Some(Archive::open(url)?)
        }
        None => None,
    };
    let losses = LossCheck::start(&cc, &config.topic, metrics.clone(), owned.clone());
    let sinks = Arc::new(Sinks {
        consumer: consumer.clone(),
        producer,
        checkpoints: Checkpoints::new(&config),
        metrics: metrics.clone(),
        owned,
        losses,
        config,
    });
    let config = &sinks.config;
    let mut stages = Stages::new(processor, archive);
    let mut buffer: Vec<Message> = Vec::new();
    let mut oldest: Option<Instant> = None;
    let mut tick = tokio::time::interval(config.flush_interval.min(Duration::from_millis(50)));
    let mut idle_tick = tokio::time::interval(Duration::from_millis(250));
    let mut assigned: BTreeMap<i32, ()> = BTreeMap::new();
    // Partitions whose end the consumer has reached and that have had no message since.
    let mut at_end: BTreeSet<i32> = BTreeSet::new();
    let mut caught_up_since: Option<Instant> = None;
    let mut payloads = Payloads::default();
    // What the consumer delivered after a rebalance callback, kept until the rebalance has
    // been handled.
    let mut held = Delivered::Nothing;
    // One stream for the whole run: `recv` makes a stream per message, registering and
    // unregistering a waker under a lock each time.
    let mut messages = consumer.stream();
    loop {
        let room = buffer.len() < config.max_batch;
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            done = async { stages.preparing.as_mut().expect("guarded").await }, if stages.preparing.is_some() => {
                stages.preparing = None;
                stages.prepared(done)?;
            }
            done = async { stages.committing.as_mut().expect("guarded").await }, if stages.committing.is_some() => {
                stages.committing = None;
                stages.committed(done)?;
            }
            received = messages.next(), if room => {
                let mut next = Some(received.expect("kafka message streams never end"));
                let mut taken = 0;
                let mut received_messages = 0;
                // Take what is already waiting without going around the select each time.
                while let Some(received) = next.take() {
                    taken += 1;
                    let delivered = match received {
                        Ok(m) => Delivered::Message(Message {
                            partition: m.partition(),
                            offset: m.offset(),
                            payload: m.payload().map(|p| payloads.copy(p)),
                            timestamp_ms: match m.timestamp() {
                                Timestamp::CreateTime(t) | Timestamp::LogAppendTime(t) => Some(t),
                                Timestamp::NotAvailable => None,
                            },
                        }),
                        Err(KafkaError::PartitionEOF(p)) => Delivered::End(p),
                        Err(e) => {
                            tracing::warn!(error = %e, "consumer error");
                            Delivered::Nothing
                        }
                    };
                    if !rebalances.is_empty() {
                        // librdkafka ran rebalance callbacks while this turn polled the stream
                        // (a callback makes the poll return nothing, and the select polls it
                        // again), so this belongs to the new assignment: it waits until the
                        // rebalance has been handled below. Buffered, it would be taken for a
                        // message of the old assignment and dropped with the revoked
                        // partitions' messages, while its partition's fetch position is already
                        // past it.
                        tracing::debug!("a message arrived before its rebalance was handled");
                        held = delivered;
                        break;
                    }
                    received_messages += delivered.keep(&mut buffer, &mut at_end);
                    if buffer.len() < config.max_batch && taken < DRAIN {
                        next = messages.next().now_or_never().flatten();
                    }
                }
                metrics.received.add(received_messages);
                if !buffer.is_empty() {
                    oldest.get_or_insert_with(Instant::now);
                    caught_up_since = None;
                }
            }
            _ = tick.tick() => {}
            _ = idle_tick.tick() => {
                // A partition is caught up once the consumer reported reaching its end, or when
                // the broker's fetch responses show nothing beyond the committed offset (a
                // partition taken over at its end reports no end again).
                let caught_up = !assigned.is_empty() && {
                    let lag = metrics.lag.lock().expect("not poisoned");
                    assigned
                        .keys()
                        .all(|p| at_end.contains(p) || lag.get(p) == Some(&0))
                };
                if caught_up && buffer.is_empty() && stages.idle() {
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
        stages.start_commit(&store, &sinks);
        if !rebalances.is_empty() {
            // Partitions change hands only between batches.
            let (processor, archive) = stages.drain(&store, &sinks).await?;
            for (p, committed) in handle_rebalances(
                &mut rebalances,
                &sinks,
                processor,
                &mut buffer,
                &mut assigned,
                &mut at_end,
                true,
            )
            .await?
            {
                if let Some(a) = archive {
                    a.recover(p, committed).await?;
                }
            }
        }
        let kept = std::mem::take(&mut held).keep(&mut buffer, &mut at_end);
        if kept > 0 {
            metrics.received.add(kept);
            oldest.get_or_insert_with(Instant::now);
            caught_up_since = None;
        }
        let due = oldest.is_some_and(|t| t.elapsed() >= config.flush_interval);
        if !buffer.is_empty() && (!room || due) && stages.can_prepare() {
            // The next batch is likely as large as this one: sized up front, its buffer is not
            // copied over and over as it grows.
            let next = Vec::with_capacity(buffer.len());
            stages.start_prepare(std::mem::replace(&mut buffer, next));
            oldest = None;
        }
    }
    let (processor, archive) = stages.drain(&store, &sinks).await?;
    handle_rebalances(
        &mut rebalances,
        &sinks,
        processor,
        &mut buffer,
        &mut assigned,
        &mut at_end,
        false,
    )
    .await?;
    if !buffer.is_empty() {
        flush(processor, &sinks, buffer, archive.as_mut()).await?;
    }
    tracing::info!("speed layer stopped after a final flush and commit");
    Ok(())
}

/// The two stages of the batches in flight: at most one being prepared (it holds the
/// processor), one prepared and waiting, and one being committed (it holds the archive).
/// Preparing the next batch overlaps with committing the previous one; commits happen one at a
/// time, in order, and what each tells the processor reaches it before its next batch.
struct Stages<S: StateStore> {
    processor: Option<Processor<S>>,
    archive: Option<Option<Archive>>,
    preparing: Option<tokio::task::JoinHandle<(Processor<S>, Result<Prepared>)>>,
    waiting: Option<Prepared>,
    committing: Option<tokio::task::JoinHandle<(Option<Archive>, Result<Committed>)>>,
    settled: Vec<Committed>,
}

fn joined<T>(r: std::result::Result<T, tokio::task::JoinError>) -> Result<T> {
    r.map_err(|e| Error::Internal(format!("a flush task failed: {e}")))
}

impl<S: StateStore + Clone> Stages<S> {
    fn new(processor: Processor<S>, archive: Option<Archive>) -> Self {
        Stages {
            processor: Some(processor),
            archive: Some(archive),
            preparing: None,
            waiting: None,
            committing: None,
            settled: Vec::new(),
        }
    }

    /// Nothing in flight.
    fn idle(&self) -> bool {
        self.preparing.is_none() && self.waiting.is_none() && self.committing.is_none()
    }

    /// A new batch can be prepared: the processor is here and no prepared batch waits.
    fn can_prepare(&self) -> bool {
        self.processor.is_some() && self.waiting.is_none()
    }

    fn prepared(
        &mut self,
        done: std::result::Result<(Processor<S>, Result<Prepared>), tokio::task::JoinError>,
    ) -> Result<()> {
        let (mut processor, result) = joined(done)?;
        for c in self.settled.drain(..) {
            c.settle(&mut processor);
        }
        self.processor = Some(processor);
        self.waiting = Some(result?);
        Ok(())
    }

    fn committed(
        &mut self,
        done: std::result::Result<(Option<Archive>, Result<Committed>), tokio::task::JoinError>,
    ) -> Result<()> {
        let (archive, result) = joined(done)?;
        self.archive = Some(archive);
        let c = result?;
        match &mut self.processor {
            Some(p) => c.settle(p),
            None => self.settled.push(c),
        }
        Ok(())
    }

    fn start_prepare(&mut self, messages: Vec<Message>) {
        let mut processor = self.processor.take().expect("can_prepare");
        self.preparing = Some(tokio::spawn(async move {
            let result = prepare(&mut processor, messages).await;
            (processor, result)
        }));
    }

    /// Starts committing the waiting batch when no commit runs.
    fn start_commit(&mut self, store: &S, sinks: &Arc<Sinks>) {
        if self.committing.is_some() || self.waiting.is_none() {
            return;
        }
        let prepared = self.waiting.take().expect("checked");
        let mut archive = self.archive.take().expect("no commit runs");
        let (store, sinks) = (store.clone(), sinks.clone());
        self.committing = Some(tokio::spawn(async move {
            let result = commit(&store, &sinks, prepared, archive.as_mut()).await;
            (archive, result)
        }));
    }

    /// Waits for every batch in flight to be committed; the processor and archive are home
    /// afterwards.
    async fn drain(
        &mut self,
        store: &S,
        sinks: &Arc<Sinks>,
    ) -> Result<(&mut Processor<S>, &mut Option<Archive>)> {
        loop {
            if let Some(h) = self.preparing.take() {
                self.prepared(h.await)?;
            }
            self.start_commit(store, sinks);
            match self.committing.take() {
                Some(h) => self.committed(h.await)?,
                None => break,
            }
        }
        Ok((
            self.processor.as_mut().expect("home"),
            self.archive.as_mut().expect("home"),
        ))
    }
}

/// Received payloads, copied side by side into shared buffers of [`PAYLOAD_CHUNK`] bytes: one
/// allocation per few thousand messages instead of one per message. A buffer is freed once it
/// has been replaced and the last message cut from it is dropped (after the state writes of the
/// last batch holding one): about two batches' payloads plus one buffer at most.
#[derive(Default)]
struct Payloads {
    chunk: BytesMut,
}

/// The size of a [`Payloads`] buffer.
const PAYLOAD_CHUNK: usize = 4 << 20;

/// Payloads larger than this get an allocation of their own, so that the room a buffer leaves
/// unused when it is replaced stays under 1/16 of it.
const OWN_ALLOCATION: usize = PAYLOAD_CHUNK / 16;

impl Payloads {
    fn copy(&mut self, payload: &[u8]) -> Bytes {
        if payload.len() > OWN_ALLOCATION {
            return Bytes::copy_from_slice(payload);
        }
        if self.chunk.capacity() < payload.len() {
            self.chunk = BytesMut::with_capacity(PAYLOAD_CHUNK);
        }
        self.chunk.extend_from_slice(payload);
        self.chunk.split().freeze()
    }
}

/// Most messages taken in one turn of the receiving loop (the loop then looks at flushes,
/// rebalances and the shutdown token again).
const DRAIN: usize = 4096;

/// One thing the consumer delivered, copied out of librdkafka's buffers.
#[derive(Default)]
enum Delivered {
    /// Nothing to keep (an error, logged).
    #[default]
    Nothing,
    /// A message.
    Message(Message),
    /// The consumer reached the end of a partition.
    End(i32),
}

impl Delivered {
    /// Buffers a message or notes a partition's end; returns the number of messages buffered.
    fn keep(self, buffer: &mut Vec<Message>, at_end: &mut BTreeSet<i32>) -> u64 {
        match self {
            Delivered::Nothing => 0,
            Delivered::Message(m) => {
                at_end.remove(&m.partition);
                buffer.push(m);
                1
            }
            Delivered::End(p) => {
                at_end.insert(p);
                0
            }
        }
    }
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
    sinks: &Sinks,
    processor: &mut Processor<impl StateStore>,
    buffer: &mut Vec<Message>,
    assigned: &mut BTreeMap<i32, ()>,
    at_end: &mut BTreeSet<i32>,
    check_losses: bool,
) -> Result<Vec<(i32, Option<i64>)>> {
    let (consumer, topic, checkpoints) = (&sinks.consumer, &sinks.config.topic, &sinks.checkpoints);
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
                let mut resumes = Vec::new();
                for e in committed.elements() {
                    let offset = match e.offset() {
                        Offset::Offset(o) => Some(o),
                        _ => None,
                    };
                    if e.error().is_ok() {
                        resumes.push((e.partition(), offset));
                    }
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
                if check_losses {
                    report_losses(sinks, resumes);
                }
            }
        }
    }
    Ok(newly)
}

/// Sends newly assigned partitions, with the offset the group resumes from (`None`: no
/// committed offset), to the [`LossCheck`].
fn report_losses(sinks: &Sinks, resumes: Vec<(i32, Option<i64>)>) {
    if let Some(losses) = &sinks.losses
        && !resumes.is_empty()
    {
        // The worker only stops with the process.
        let _ = losses.tx.send(resumes);
    }
}

/// Checks whether newly assigned partitions lost messages: compares where each one's log
/// starts on the broker (the oldest offset it still holds) with the offset the group resumes
/// from, and reports what was deleted before the layer read it, a warning naming the offsets
/// and `duet_speed_lost_messages_total` (each range counted once per process). A new group
/// starting after the log's start is only noted: it holds nothing older, and rebuilding from
/// what Kafka retains is what it is for.
///
/// One thread does it for the whole run, with a client of its own outside the group: a slow
/// answer (a partition without a leader costs the 15 s timeout, and then the rest of that
/// assignment is skipped) neither holds up consuming nor keeps the group's consumer open when
/// the process stops. A partition revoked meanwhile is skipped.
pub(crate) struct LossCheck {
    tx: std::sync::mpsc::Sender<Vec<(i32, Option<i64>)>>,
}

impl LossCheck {
    /// Starts the check with the group consumer's settings `cc` (without its group); `None`,
    /// with a warning, when its client or thread cannot be made.
    fn start(
        cc: &ClientConfig,
        topic: &str,
        metrics: Arc<SpeedMetrics>,
        owned: Arc<Mutex<BTreeSet<i32>>>,
    ) -> Option<LossCheck> {
        let mut cc = cc.clone();
        cc.remove("group.id")
            .remove("statistics.interval.ms")
            .remove("enable.partition.eof");
        let client: BaseConsumer = match cc.create() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "cannot start the check for deleted messages");
                return None;
            }
        };
        let (tx, rx) = std::sync::mpsc::channel::<Vec<(i32, Option<i64>)>>();
        let topic = topic.to_string();
        let check = move || {
            // Per partition, the offset up to which lost messages were counted.
            let mut counted: std::collections::HashMap<i32, i64> = Default::default();
            while let Ok(resumes) = rx.recv() {
                for (p, resume) in resumes {
                    if !owned.lock().expect("not poisoned").contains(&p) {
                        continue;
                    }
                    let start = match client.fetch_watermarks(&topic, p, Duration::from_secs(15)) {
                        Ok((low, _)) => low,
                        Err(e) => {
                            tracing::warn!(
                                partition = p,
                                error = %e,
                                "cannot read where the partition's log starts, so cannot tell \
                                 whether messages were deleted before the speed layer read them \
                                 (this assignment's other partitions are not checked either)"
                            );
                            break;
                        }
                    };
                    match resume {
                        Some(from) if start > from => {
                            tracing::warn!(
                                partition = p,
                                from,
                                to = start,
                                "messages the speed layer never consumed are gone from the \
                                 broker (deleted by retention while the group was stopped or \
                                 behind): their events (offsets from..to, `to` excluded) are \
                                 missing from the state and the histories"
                            );
                            let new_from = counted.get(&p).map_or(from, |&c| c.max(from));
                            if start > new_from {
                                metrics.lost.add((start - new_from) as u64);
                                counted.insert(p, start);
                            }
                        }
                        None if start > 0 => tracing::info!(
                            partition = p,
                            start,
                            "a new group starts at the oldest offset the broker still holds: \
                             the state and the histories hold nothing older"
                        ),
                        _ => {}
                    }
                }
            }
        };
        match std::thread::Builder::new()
            .name("duet-loss-check".into())
            .spawn(check)
        {
            Ok(_) => Some(LossCheck { tx }),
            Err(e) => {
                tracing::warn!(error = %e, "cannot start the check for deleted messages");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_are_cut_from_shared_buffers_and_large_ones_get_their_own() {
        let mut payloads = Payloads::default();
        let small: Vec<Vec<u8>> = (0..20_000u32)
            .map(|i| format!("{{\"event_id\": \"e{i}\"}}").into_bytes())
            .collect();
        let copies: Vec<Bytes> = small.iter().map(|p| payloads.copy(p)).collect();
        for (c, p) in copies.iter().zip(&small) {
            assert_eq!(c, p);
        }
        // Consecutive small payloads sit side by side in one buffer.
        assert_eq!(
            copies[0].as_ptr().wrapping_add(copies[0].len()),
            copies[1].as_ptr()
        );
        // About 400 KB of payloads: one buffer, not one allocation each.
        let distinct_buffers = copies
            .windows(2)
            .filter(|w| w[0].as_ptr().wrapping_add(w[0].len()) != w[1].as_ptr())
            .count();
        assert_eq!(distinct_buffers, 0);

        // A buffer holds PAYLOAD_CHUNK bytes; the payload that does not fit starts a new one.
        let mut payloads = Payloads::default();
        let filler = vec![7u8; OWN_ALLOCATION];
        let full: Vec<Bytes> = (0..PAYLOAD_CHUNK / OWN_ALLOCATION)
            .map(|_| payloads.copy(&filler))
            .collect();
        assert!(full.iter().all(|c| *c == filler));
        assert!(
            full.windows(2)
                .all(|w| w[0].as_ptr().wrapping_add(OWN_ALLOCATION) == w[1].as_ptr())
        );
        assert_eq!(payloads.chunk.capacity(), 0);
        let next = payloads.copy(&filler);
        assert_eq!(next, filler);
        assert_ne!(
            full[full.len() - 1].as_ptr().wrapping_add(OWN_ALLOCATION),
            next.as_ptr()
        );
        assert_eq!(payloads.chunk.capacity(), PAYLOAD_CHUNK - OWN_ALLOCATION);

        // A large payload is copied on its own and the shared buffer is kept.
        let room = payloads.chunk.capacity();
        let large = vec![1u8; OWN_ALLOCATION + 1];
        assert_eq!(payloads.copy(&large), large);
        assert_eq!(payloads.chunk.capacity(), room);
        // An empty payload stays empty.
        assert!(payloads.copy(b"").is_empty());
    }
}
