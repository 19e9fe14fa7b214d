//! The speed layer's engine, independent of Kafka: it takes a batch of messages in partition
//! order, keeps watermarks, drops late events, and applies the rest to entity states with
//! compare-and-set writes. Applying the same messages twice changes nothing (events are
//! deduplicated by id inside each state), so replaying after a crash is harmless.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use duet_spec::event::{DeadLetter, Event, InvalidCounts, parse_json_event};

use crate::plan::SpeedPlan;
use crate::state::{EntityState, Outcome};
use crate::store::{CasWrite, StateStore, Versioned};
use crate::{Error, Result};

/// Events this far ahead of the wall clock still count but do not advance the watermark, so
/// one producer with a broken clock cannot make every other event late.
pub const MAX_CLOCK_SKEW_MS: i64 = 5 * 60 * 1000;

/// Extra time a key lives beyond the last instant its state can matter.
const KEY_GRACE_MS: i64 = 60_000;

/// How many entity states the processor keeps decoded between batches.
const CACHE_LIMIT: usize = 500_000;

/// One consumed message.
#[derive(Debug, Clone)]
pub struct Message {
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// The value: one JSON event.
    pub payload: Option<Vec<u8>>,
    /// Producer timestamp (epoch ms), when known.
    pub timestamp_ms: Option<i64>,
}

/// What one batch did.
#[derive(Debug, Default)]
pub struct BatchOutcome {
    /// Events that now count.
    pub applied: u64,
    /// Events dropped as duplicates.
    pub duplicates: u64,
    /// Events dropped for arriving later than the allowed lateness.
    pub late: u64,
    /// Invalid records by reason.
    pub invalid: InvalidCounts,
    /// Invalid records, to be sent to the dead-letter topic.
    pub dead_letters: Vec<DeadLetter>,
    /// Per partition: the next offset to consume and the watermark, to commit together.
    pub commit: BTreeMap<i32, (i64, i64)>,
    /// Accepted events with their partition (kept for the archive), in partition order.
    pub accepted: Vec<(i32, Event)>,
    /// Per partition: the batch's first offset.
    pub first_offsets: BTreeMap<i32, i64>,
    /// Entity states written.
    pub written: u64,
    /// Compare-and-set conflicts resolved by reloading.
    pub conflicts: u64,
}

/// Watermarks and cached states of the partitions this process owns.
pub struct Processor<S: StateStore> {
    plan: Arc<SpeedPlan>,
    store: S,
    prefix: String,
    topic: String,
    watermarks: HashMap<i32, i64>,
    committed: HashMap<i32, i64>,
    cache: HashMap<String, (u64, EntityState)>,
    archive: bool,
    /// Partitions owned (when a consumer manages assignment) and when each last had a message.
    owned: Option<HashMap<i32, std::time::Instant>>,
}

/// A partition without messages for this long stops holding the state boundary back.
pub const IDLE_PARTITION: std::time::Duration = std::time::Duration::from_secs(30);

/// The Redis key of an entity's state.
pub fn state_key(prefix: &str, entity: &str) -> String {
    format!("{prefix}s:{entity}")
}

/// The entity of a state key.
pub fn entity_of<'k>(prefix: &str, key: &'k str) -> Option<&'k str> {
    key.strip_prefix(prefix)?.strip_prefix("s:")
}

/// The counters hash the speed layer keeps beside its state.
pub fn stats_key(prefix: &str) -> String {
    format!("{prefix}stats")
}

impl<S: StateStore> Processor<S> {
    /// A processor writing states under `prefix` for messages of `topic`.
    pub fn new(plan: Arc<SpeedPlan>, store: S, prefix: &str, topic: &str) -> Self {
        Processor {
            plan,
            store,
            prefix: prefix.to_string(),
            topic: topic.to_string(),
            watermarks: HashMap::new(),
            committed: HashMap::new(),
            cache: HashMap::new(),
            archive: false,
            owned: None,
        }
    }

    /// Keep accepted events in [`BatchOutcome::accepted`].
    pub fn keep_accepted(&mut self, yes: bool) {
        self.archive = yes;
    }

    /// The store written to.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// Takes ownership of a partition whose committed watermark is `wm` (none for a fresh one).
    pub fn assign(&mut self, partition: i32, wm: Option<i64>) {
        self.owned
            .get_or_insert_with(HashMap::new)
            .insert(partition, std::time::Instant::now());
        match wm {
            Some(wm) => {
                self.watermarks.insert(partition, wm);
                self.committed.insert(partition, wm);
            }
            None => {
                self.watermarks.remove(&partition);
                self.committed.remove(&partition);
            }
        }
        // Another process may have written these entities meanwhile.
        self.cache.clear();
    }

    /// Drops cached states (after a failed write their versions may be stale).
    pub fn forget_cache(&mut self) {
        self.cache.clear();
    }

    /// Gives a partition up.
    pub fn revoke(&mut self, partition: i32) {
        if let Some(owned) = &mut self.owned {
            owned.remove(&partition);
        }
        self.watermarks.remove(&partition);
        self.committed.remove(&partition);
        self.cache.clear();
    }

    /// Records that the offsets and watermarks of `outcome` are now committed.
    pub fn committed(&mut self, outcome: &BatchOutcome) {
        for (p, (_, wm)) in &outcome.commit {
            self.committed.insert(*p, *wm);
        }
    }

    /// The watermark of every owned partition.
    pub fn watermarks(&self) -> &HashMap<i32, i64> {
        &self.watermarks
    }

    /// The instant states may fold up to: behind every committed watermark by the lateness.
    ///
    /// Every owned partition holds the boundary back until its watermark is committed, unless it
    /// has been idle for [`IDLE_PARTITION`]: a partition whose events lag would otherwise find
    /// its entities' boundaries already past them.
    fn boundary_target(&self) -> Option<i64> {
        if let Some(owned) = &self.owned {
            let waiting = owned.iter().any(|(p, seen)| {
                !self.committed.contains_key(p) && seen.elapsed() < IDLE_PARTITION
            });
            if waiting {
                return None;
            }
        }
        self.committed
            .values()
            .min()
            .map(|wm| wm.saturating_sub(self.plan.lateness))
    }

    /// Processes messages (in offset order within each partition).
    /// On failure the watermarks are as before, so processing the same messages again makes
    /// the same lateness decisions.
    pub async fn process(&mut self, messages: &[Message], now_ms: i64) -> Result<BatchOutcome> {
        let saved = self.watermarks.clone();
        let result = self.process_inner(messages, now_ms).await;
        if result.is_err() {
            self.watermarks = saved;
        }
        result
    }

    async fn process_inner(&mut self, messages: &[Message], now_ms: i64) -> Result<BatchOutcome> {
        let mut out = BatchOutcome::default();
        let mut by_entity: BTreeMap<String, Vec<Event>> = BTreeMap::new();
        let parsed_all = par_map(messages.iter().collect(), |m: &Message| match &m.payload {
            Some(p) => parse_json_event(p).map(|e| Event {
                event_id: e.event_id.into_owned(),
                user_id: e.user_id.into_owned(),
                event_type: e.event_type.into_owned(),
                amount: e.amount,
                ts: e.ts,
            }),
            None => Err((
                duet_spec::event::InvalidReason::Json,
                Some("empty message".into()),
            )),
        });
        let now = std::time::Instant::now();
        for (m, parsed) in messages.iter().zip(parsed_all) {
            if let Some(seen) = self.owned.as_mut().and_then(|o| o.get_mut(&m.partition)) {
                *seen = now;
            }
            out.first_offsets.entry(m.partition).or_insert(m.offset);
            let entry = out
                .commit
                .entry(m.partition)
                .or_insert((m.offset + 1, i64::MIN));
            entry.0 = entry.0.max(m.offset + 1);
            let event = match parsed {
                Ok(e) => e,
                Err((reason, detail)) => {
                    out.invalid.add(reason);
                    let source = format!("{}/{}", self.topic, m.partition);
                    out.dead_letters.push(DeadLetter::new(
                        &source,
                        m.offset as u64,
                        reason,
                        detail,
                        m.payload.as_deref().unwrap_or_default(),
                    ));
                    continue;
                }
            };
            let wm = self.watermarks.entry(m.partition).or_insert(i64::MIN);
            if *wm != i64::MIN && event.ts < wm.saturating_sub(self.plan.lateness) {
                out.late += 1;
                continue;
            }
            if event.ts <= now_ms + MAX_CLOCK_SKEW_MS {
                *wm = (*wm).max(event.ts);
            }
            if self.archive {
                out.accepted.push((m.partition, event.clone()));
            }
            by_entity
                .entry(event.user_id.clone())
                .or_default()
                .push(event);
        }
        for (p, entry) in out.commit.iter_mut() {
            entry.1 = self.watermarks.get(p).copied().unwrap_or(i64::MIN);
        }
        if !by_entity.is_empty() {
            self.write(by_entity, &mut out).await?;
        }
        Ok(out)
    }

    async fn write(
        &mut self,
        by_entity: BTreeMap<String, Vec<Event>>,
        out: &mut BatchOutcome,
    ) -> Result<()> {
        let target = self.boundary_target();
        let reference_now = self.watermarks.values().copied().max().unwrap_or(i64::MIN);
        let mut pending: Vec<String> = by_entity.keys().cloned().collect();
        for attempt in 0..8 {
            let missing: Vec<String> = pending
                .iter()
                .filter(|e| !self.cache.contains_key(*e))
                .cloned()
                .collect();
            if !missing.is_empty() {
                let keys: Vec<String> =
                    missing.iter().map(|e| state_key(&self.prefix, e)).collect();
                let loaded = self.store.get_many(&keys).await?;
                for (entity, value) in missing.into_iter().zip(loaded) {
                    let state = self.decode(&entity, value, target);
                    self.cache.insert(entity, state);
                }
            }
            let mut writes = Vec::with_capacity(pending.len());
            let mut next_states = Vec::with_capacity(pending.len());
            // Taken out of the cache: put back once written, reloaded if the write loses.
            let work: Vec<(String, u64, EntityState)> = pending
                .iter()
                .map(|e| {
                    let (version, state) = self.cache.remove(e).expect("loaded above");
                    (e.clone(), version, state)
                })
                .collect();
            let plan = &self.plan;
            let prepared = par_map(work, |(entity, version, mut state)| {
                let mut counts = [0u64; 3];
                for e in &by_entity[&entity] {
                    counts[match state.apply(e) {
                        Outcome::Applied => 0,
                        Outcome::Duplicate => 1,
                        Outcome::Late => 2,
                    }] += 1;
                }
                if let Some(t) = target {
                    state.advance(plan, t);
                }
                let (value, ttl_ms) = match state.relevant_until(plan) {
                    None => (None, 1),
                    Some(until) => {
                        let left = until
                            .saturating_add(plan.lateness)
                            .saturating_sub(reference_now)
                            .max(0);
                        (Some(state.encode(plan)), (left + KEY_GRACE_MS) as u64)
                    }
                };
                (entity, version, state, counts, value, ttl_ms)
            });
            for (entity, version, state, counts, value, ttl_ms) in prepared {
                let expected = (version > 0).then_some(version);
                if value.is_none() && expected.is_none() {
                    self.cache.insert(entity, (0, state));
                    out.applied += counts[0];
                    out.duplicates += counts[1];
                    out.late += counts[2];
                    continue;
                }
                let deleted = value.is_none();
                writes.push(CasWrite {
                    key: state_key(&self.prefix, &entity),
                    expected,
                    value,
                    ttl_ms,
                });
                next_states.push((entity, state, counts, deleted, version));
            }
            let results = self.store.put_many(&writes).await?;
            let mut retry = Vec::new();
            for ((entity, state, counts, deleted, version), ok) in
                next_states.into_iter().zip(results)
            {
                if ok {
                    out.applied += counts[0];
                    out.duplicates += counts[1];
                    out.late += counts[2];
                    out.written += 1;
                    if self.cache.len() > CACHE_LIMIT {
                        self.cache.clear();
                    }
                    if deleted {
                        self.cache
                            .insert(entity, (0, EntityState::new(&self.plan, state.boundary)));
                    } else {
                        self.cache.insert(entity, (version + 1, state));
                    }
                } else {
                    retry.push(entity);
                }
            }
            if retry.is_empty() {
                return Ok(());
            }
            out.conflicts += retry.len() as u64;
            tracing::debug!(
                attempt,
                entities = retry.len(),
                "state changed underneath; reloading"
            );
            pending = retry;
        }
        Err(Error::Redis(format!(
            "{} entity states kept changing underneath this process (another writer?)",
            pending.len()
        )))
    }

    fn decode(
        &self,
        entity: &str,
        value: Option<Versioned>,
        target: Option<i64>,
    ) -> (u64, EntityState) {
        match value {
            None => (0, EntityState::new(&self.plan, target.unwrap_or(i64::MIN))),
            Some(v) => match EntityState::decode(&self.plan, entity, &v.bytes) {
                Ok(state) => (v.version, state),
                Err(e) => {
                    tracing::error!(entity, error = %e, "unreadable state; starting the entity over");
                    (
                        v.version,
                        EntityState::new(&self.plan, target.unwrap_or(i64::MIN)),
                    )
                }
            },
        }
    }
}

/// Maps `f` over `items` on every core, keeping the order; small inputs stay on this thread.
fn par_map<T: Send, R: Send>(items: Vec<T>, f: impl Fn(T) -> R + Sync) -> Vec<R> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cores < 2 || items.len() < 4096 {
        return items.into_iter().map(f).collect();
    }
    let per = items.len().div_ceil(cores);
    let mut chunks: Vec<Vec<T>> = Vec::with_capacity(cores);
    let mut items = items.into_iter();
    loop {
        let chunk: Vec<T> = items.by_ref().take(per).collect();
        if chunk.is_empty() {
            break;
        }
        chunks.push(chunk);
    }
    let f = &f;
    std::thread::scope(|scope| {
        let handles: Vec<_> = chunks
            .into_iter()
            .map(|chunk| scope.spawn(move || chunk.into_iter().map(f).collect::<Vec<R>>()))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("workers do not panic"))
            .collect()
    })
}
