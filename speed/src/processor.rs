//! The speed layer's engine, independent of Kafka: it takes a batch of messages in partition
//! order, keeps watermarks, drops late events, and applies the rest to entity states, whose
//! new versions it hands out as compare-and-set writes ([`StateWrites`]). Applying the same
//! messages twice changes nothing (events are deduplicated by id inside each state), so
//! replaying after a crash is harmless.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use duet_batch::par::par_map;
use duet_spec::event::{DeadLetter, Event, InvalidCounts, Text, parse_json_event};

use crate::Result;
use crate::plan::SpeedPlan;
use crate::state::{ApplyCounts, EntityState};
use crate::store::{CasWrite, StateStore};
use crate::writes::{Expiry, Rebuilt, Settle, Stale, StateWrites};

/// Events this far ahead of the wall clock still count but do not advance the watermark, so
/// one producer with a broken clock cannot make every other event late.
pub const MAX_CLOCK_SKEW_MS: i64 = 5 * 60 * 1000;

/// How many entity states the processor keeps decoded between batches.
const CACHE_LIMIT: usize = 500_000;

/// A batch's accepted events grouped by entity.
pub(crate) type ByEntity = HashMap<Text, Grouped, foldhash::fast::RandomState>;

/// One entity's accepted events of a batch, and the partition they came from.
#[derive(Debug, Default)]
pub(crate) struct Grouped {
    pub(crate) events: Vec<Event>,
    /// The partition of the first event.
    pub(crate) partition: i32,
    /// Some event came from another partition (events not keyed by `user_id`).
    pub(crate) mixed: bool,
}

/// One consumed message.
#[derive(Debug, Clone)]
pub struct Message {
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// The value: one JSON event. Consumed from Kafka, it is a slice of a buffer shared with
    /// the messages received around it.
    pub payload: Option<bytes::Bytes>,
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
    /// Absent states rebuilt from their entities' histories and written (their keys may have
    /// expired early: the partition's watermark trailed the clock by over half a minute, or it
    /// had none).
    pub rebuilt: u64,
    /// Of those, states whose history did not reach back the streaming horizon: they may miss
    /// events.
    pub rebuilt_partially: u64,
}

impl BatchOutcome {
    /// Counts a written state rebuilt `how`.
    pub(crate) fn count_rebuilt(&mut self, how: Rebuilt) {
        match how {
            Rebuilt::No => {}
            Rebuilt::Whole => self.rebuilt += 1,
            Rebuilt::Partial => {
                self.rebuilt += 1;
                self.rebuilt_partially += 1;
            }
        }
    }

    /// Adds what applying one entity's events did.
    pub(crate) fn count(&mut self, c: ApplyCounts) {
        self.applied += c.applied;
        self.duplicates += c.duplicates;
        self.late += c.late;
    }
}

/// Watermarks and cached states of the partitions this process owns.
pub struct Processor<S: StateStore> {
    plan: Arc<SpeedPlan>,
    store: S,
    prefix: String,
    topic: String,
    watermarks: HashMap<i32, i64>,
    cache: HashMap<Text, (u64, EntityState), foldhash::fast::RandomState>,
    /// Entities in the last batch: the next batch's grouping is sized for as many.
    last_entities: usize,
    archive: bool,
    /// Partitions owned (when a consumer manages assignment) and when each last had a message.
    owned: Option<HashMap<i32, std::time::Instant>>,
}

/// A partition without messages for this long stops holding the state boundary back.
pub const IDLE_PARTITION: std::time::Duration = std::time::Duration::from_secs(30);

/// Entity states are spread over this many hash tags (`{0}` to `{1023}`): a flush writes
/// the states of one tag with one compare-and-set call, which Redis Cluster allows because
/// keys of one tag share a hash slot, while the tags still spread over a cluster's nodes.
pub const STATE_TAGS: u64 = 1024;

/// The hash tag of an entity: FNV-1a of its key, so every process and version agrees.
fn state_tag(entity: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in entity.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h % STATE_TAGS
}

/// The Redis key of an entity's state: `<prefix>s:{<tag>}<entity>`.
pub fn state_key(prefix: &str, entity: &str) -> String {
    entity_key(prefix, "s:{", entity)
}

/// The Redis key of an entity's history (see [`crate::history`]): `<prefix>h:{<tag>}<entity>`,
/// in its state's hash slot.
pub fn history_key(prefix: &str, entity: &str) -> String {
    entity_key(prefix, "h:{", entity)
}

/// `<prefix><kind><tag>}<entity>`.
fn entity_key(prefix: &str, kind: &str, entity: &str) -> String {
    // Built by hand: one is made per entity of every batch and request, and `format!` costs
    // several times as much.
    let mut tag = state_tag(entity);
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    loop {
        start -= 1;
        digits[start] = b'0' + (tag % 10) as u8;
        tag /= 10;
        if tag == 0 {
            break;
        }
    }
    let digits = std::str::from_utf8(&digits[start..]).expect("ASCII digits");
    let mut key =
        String::with_capacity(prefix.len() + kind.len() + 1 + digits.len() + entity.len());
    key.push_str(prefix);
    key.push_str(kind);
    key.push_str(digits);
    key.push('}');
    key.push_str(entity);
    key
}

/// The prefix every state key under `prefix` starts with.
pub fn state_key_prefix(prefix: &str) -> String {
    format!("{prefix}s:")
}

/// The prefix every history key under `prefix` starts with.
pub fn history_key_prefix(prefix: &str) -> String {
    format!("{prefix}h:")
}

/// The entity of a state key.
pub fn entity_of<'k>(prefix: &str, key: &'k str) -> Option<&'k str> {
    entity_of_kind(prefix, "s:{", key)
}

/// The entity of a history key.
pub fn history_entity_of<'k>(prefix: &str, key: &'k str) -> Option<&'k str> {
    entity_of_kind(prefix, "h:{", key)
}

/// The entity of a `<prefix><kind><tag>}<entity>` key (see [`entity_key`]).
fn entity_of_kind<'k>(prefix: &str, kind: &str, key: &'k str) -> Option<&'k str> {
    let tagged = key.strip_prefix(prefix)?.strip_prefix(kind)?;
    let (tag, entity) = tagged.split_once('}')?;
    tag.bytes().all(|b| b.is_ascii_digit()).then_some(entity)
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
            cache: HashMap::default(),
            last_entities: 0,
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
            Some(wm) => self.watermarks.insert(partition, wm),
            None => self.watermarks.remove(&partition),
        };
        // Another process may have written these entities meanwhile.
        self.cache.clear();
    }

    /// Gives a partition up.
    pub fn revoke(&mut self, partition: i32) {
        if let Some(owned) = &mut self.owned {
            owned.remove(&partition);
        }
        self.watermarks.remove(&partition);
        self.cache.clear();
    }

    /// Drops the cached states of `entities` (their stored versions moved on).
    pub fn forget(&mut self, entities: &[Text]) {
        for e in entities {
            self.cache.remove(e);
        }
    }

    /// The watermark of every owned partition.
    pub fn watermarks(&self) -> &HashMap<i32, i64> {
        &self.watermarks
    }

    /// The instant a batch's states may fold up to: behind, by the lateness, every watermark
    /// the partitions had before the batch (`before`).
    ///
    /// Those watermarks are committed before the batch's states are written: batches commit one
    /// at a time and in order, and a batch whose commit fails stops the process before any later
    /// batch writes. So a state never folds past what a replay from the committed offsets can
    /// still accept. (With the last *committed* watermarks instead, a pipelined batch would keep
    /// one more batch's worth of raw records in every state it writes.)
    ///
    /// Every owned partition holds the boundary back until it has a watermark, unless it has
    /// been idle for [`IDLE_PARTITION`]: a partition whose events lag would otherwise find its
    /// entities' boundaries already past them.
    fn boundary_target(&self, before: &HashMap<i32, i64>) -> Option<i64> {
        if let Some(owned) = &self.owned {
            let waiting = owned
                .iter()
                .any(|(p, seen)| !before.contains_key(p) && seen.elapsed() < IDLE_PARTITION);
            if waiting {
                return None;
            }
        }
        before
            .values()
            .min()
            .map(|wm| wm.saturating_sub(self.plan.lateness))
    }

    /// Processes messages (in offset order within each partition) and writes the states.
    /// On failure the watermarks are as before, so processing the same messages again makes
    /// the same lateness decisions. The batch's offsets and watermarks
    /// ([`BatchOutcome::commit`]) must be committed before the next batch's states are written
    /// (see [`Processor::prepare`]).
    pub async fn process(&mut self, messages: Vec<Message>, now_ms: i64) -> Result<BatchOutcome> {
        let (mut outcome, writes) = self.prepare(messages, now_ms).await?;
        match writes.apply(&self.store, &mut outcome).await {
            Ok(reloaded) => {
                self.forget(&reloaded);
                Ok(outcome)
            }
            Err(e) => {
                self.cache.clear();
                Err(e)
            }
        }
    }

    /// Processes messages (in offset order within each partition) up to the state writes,
    /// which the caller applies ([`StateWrites::apply`]) before the batch's offsets are
    /// committed. The cache already holds the written states, as if every write succeeds; the
    /// entities [`StateWrites::apply`] reports must be [forgotten](Processor::forget). On
    /// failure the watermarks are as before.
    ///
    /// The states fold up to the watermarks the partitions had before this batch, minus the
    /// lateness: the caller commits every earlier batch's offsets and watermarks before it
    /// applies this batch's writes (or stops), so a replay from the committed offsets never
    /// brings an unapplied event older than a state's boundary.
    pub async fn prepare(
        &mut self,
        messages: Vec<Message>,
        now_ms: i64,
    ) -> Result<(BatchOutcome, StateWrites)> {
        let saved = self.watermarks.clone();
        let result = self.process_inner(messages, now_ms, &saved).await;
        if result.is_err() {
            self.watermarks = saved;
            self.cache.clear();
        }
        result
    }

    async fn process_inner(
        &mut self,
        messages: Vec<Message>,
        now_ms: i64,
        before: &HashMap<i32, i64>,
    ) -> Result<(BatchOutcome, StateWrites)> {
        let t0 = std::time::Instant::now();
        let mut out = BatchOutcome::default();
        let mut by_entity =
            ByEntity::with_capacity_and_hasher(self.last_entities, Default::default());
        let parsed_all = par_map(messages.iter().collect(), PAR_MIN, parse_message);
        let now = std::time::Instant::now();
        let t_parse = t0.elapsed();
        // Positions of the accepted events, to parse them again should a write lose.
        let mut accepted = Vec::with_capacity(messages.len());
        // Messages come in runs of one partition: its bookkeeping is looked up once per run.
        let mut run: Option<Run> = None;
        for (i, (m, parsed)) in messages.iter().zip(parsed_all).enumerate() {
            if run.as_ref().is_none_or(|r| r.partition != m.partition) {
                if let Some(r) = run.take() {
                    self.end_run(r, &mut out);
                }
                if let Some(seen) = self.owned.as_mut().and_then(|o| o.get_mut(&m.partition)) {
                    *seen = now;
                }
                out.first_offsets.entry(m.partition).or_insert(m.offset);
                run = Some(Run {
                    partition: m.partition,
                    next: m.offset + 1,
                    watermark: self.watermarks.get(&m.partition).copied(),
                });
            }
            let r = run.as_mut().expect("set above");
            r.next = r.next.max(m.offset + 1);
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
            let wm = r.watermark.get_or_insert(i64::MIN);
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
            accepted.push(i as u32);
            group(&mut by_entity, m.partition, event);
        }
        if let Some(r) = run.take() {
            self.end_run(r, &mut out);
        }
        for (p, entry) in out.commit.iter_mut() {
            entry.1 = self.watermarks.get(p).copied().unwrap_or(i64::MIN);
        }
        let t_group = t0.elapsed();
        let entities = by_entity.len();
        self.last_entities = entities;
        let writes = self
            .states(
                by_entity,
                Replay { messages, accepted },
                before,
                (now_ms, t0),
                &mut out,
            )
            .await?;
        tracing::debug!(
            messages = writes.replay.messages.len(),
            entities,
            writes = writes.len(),
            parse = ?t_parse,
            group = ?(t_group - t_parse),
            states = ?(t0.elapsed() - t_group),
            "batch prepared"
        );
        Ok((out, writes))
    }

    /// Ends a run of one partition's messages: its watermark and next offset.
    fn end_run(&mut self, r: Run, out: &mut BatchOutcome) {
        if let Some(wm) = r.watermark {
            self.watermarks.insert(r.partition, wm);
        }
        let entry = out.commit.entry(r.partition).or_insert((r.next, i64::MIN));
        entry.0 = entry.0.max(r.next);
    }

    /// The batch's new entity states, from the cache (loading the missing ones), as writes.
    async fn states(
        &mut self,
        by_entity: ByEntity,
        replay: Replay,
        before: &HashMap<i32, i64>,
        clock: (i64, std::time::Instant),
        out: &mut BatchOutcome,
    ) -> Result<StateWrites> {
        let now_ms = clock.0;
        let newest = self.watermarks.values().copied().max().unwrap_or(i64::MIN);
        let settle = Settle {
            plan: self.plan.clone(),
            target: self.boundary_target(before),
            expiry: Expiry::new(&self.watermarks, out.commit.keys(), now_ms),
            history_header: crate::history::header(crate::history::keep_from(&self.plan, newest)),
            stale: Stale::new(before, out.commit.keys()),
            clock,
        };
        let missing: Vec<(&Text, &Grouped)> = by_entity
            .iter()
            .filter(|(e, _)| !self.cache.contains_key(*e))
            .collect();
        // The entities whose states were rebuilt (counted once written).
        let mut rebuilt: HashMap<Text, Rebuilt, foldhash::fast::RandomState> = HashMap::default();
        if !missing.is_empty() {
            let loaded = settle.load(&self.store, &self.prefix, &missing).await?;
            for ((entity, _), (version, state, how)) in missing.into_iter().zip(loaded) {
                if how != Rebuilt::No {
                    rebuilt.insert(entity.clone(), how);
                }
                self.cache.insert(entity.clone(), (version, state));
            }
        }
        if self.cache.len() > CACHE_LIMIT + by_entity.len() {
            // Keep this batch's entities; the others are read again when next needed.
            self.cache.retain(|e, _| by_entity.contains_key(e));
        }
        let work: Vec<(Text, Grouped, u64, EntityState)> = by_entity
            .into_iter()
            .map(|(e, grouped)| {
                let (version, state) = self.cache.remove(&e).expect("loaded above");
                (e, grouped, version, state)
            })
            .collect();
        let settled = par_map(work, PAR_MIN, |(entity, grouped, version, mut state)| {
            let s = settle.settle(&mut state, grouped);
            (entity, version, state, s)
        });
        let mut writes = Vec::with_capacity(settled.len());
        let mut entries = Vec::with_capacity(settled.len());
        for (entity, version, state, mut s) in settled {
            let history =
                settle.history_write(&self.prefix, &entity, std::mem::take(&mut s.history));
            let expected = (version > 0).then_some(version);
            match (&s.value, expected) {
                (None, None) if history.is_none() => {
                    // Nothing stored and nothing to store.
                    out.count(s.counts);
                    self.cache.insert(entity, (0, state));
                    continue;
                }
                (None, None) => {
                    // Nothing to store but events for the history: a write that keeps the key
                    // absent carries them.
                    self.cache.insert(entity.clone(), (0, state));
                }
                (None, Some(_)) => {
                    let fresh = EntityState::new(&self.plan, state.boundary);
                    self.cache.insert(entity.clone(), (0, fresh));
                }
                (Some(_), _) => {
                    self.cache.insert(entity.clone(), (version + 1, state));
                }
            }
            writes.push(CasWrite {
                key: state_key(&self.prefix, &entity),
                expected,
                value: s.value,
                ttl_ms: s.ttl_ms,
                history,
            });
            let how = rebuilt.remove(&entity).unwrap_or_default();
            entries.push((entity, s.counts, how));
        }
        Ok(StateWrites {
            settle,
            prefix: self.prefix.clone(),
            replay,
            writes,
            entries,
        })
    }
}

/// One partition's bookkeeping while a batch runs through its messages.
struct Run {
    partition: i32,
    /// The next offset to consume.
    next: i64,
    /// The watermark (`None` until the partition has had a valid event).
    watermark: Option<i64>,
}

/// A batch's messages and the positions of its accepted events: a write that loses is
/// recomputed from them (parsing is deterministic, so the same events come back).
pub(crate) struct Replay {
    pub(crate) messages: Vec<Message>,
    pub(crate) accepted: Vec<u32>,
}

impl Replay {
    /// The accepted events of `entities`, grouped by entity, in batch order.
    pub(crate) fn events_of(&self, entities: &[Text]) -> ByEntity {
        let wanted: std::collections::HashSet<&str, foldhash::fast::RandomState> =
            entities.iter().map(Text::as_str).collect();
        let mut out = ByEntity::default();
        for &i in &self.accepted {
            let m = &self.messages[i as usize];
            if let Ok(e) = parse_message(m)
                && wanted.contains(e.user_id.as_str())
            {
                group(&mut out, m.partition, e);
            }
        }
        out
    }
}

/// Adds `event`, from `partition`, to its entity's events; the key is copied once per entity,
/// not once per event.
fn group(by_entity: &mut ByEntity, partition: i32, event: Event) {
    match by_entity.get_mut(event.user_id.as_str()) {
        Some(g) => {
            g.mixed |= g.partition != partition;
            g.events.push(event);
        }
        None => {
            by_entity.insert(
                event.user_id.clone(),
                Grouped {
                    events: vec![event],
                    partition,
                    mixed: false,
                },
            );
        }
    }
}

/// A message's event, or why it is invalid.
fn parse_message(
    m: &Message,
) -> std::result::Result<Event, (duet_spec::event::InvalidReason, Option<String>)> {
    match &m.payload {
        Some(p) => parse_json_event(p).map(|e| e.to_event()),
        None => Err((
            duet_spec::event::InvalidReason::Json,
            Some("empty message".into()),
        )),
    }
}

/// Inputs of fewer items than this are mapped on the calling thread ([`par_map`]): each item
/// is cheap, so splitting a small input costs more than it saves.
pub(crate) const PAR_MIN: usize = 4096;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_keys_carry_the_entity_s_tag_and_give_the_entity_back() {
        for entity in ["", "u0000001", "u0000071", "ü-ß/{x}", &"x".repeat(300)] {
            let key = state_key("p:", entity);
            let tag = state_tag(entity);
            assert_eq!(key, format!("p:s:{{{tag}}}{entity}"));
            assert_eq!(entity_of("p:", &key), Some(entity));
        }
        // Every tag, from one digit to four, round-trips.
        let mut seen = std::collections::HashSet::new();
        for i in 0..20_000 {
            let entity = format!("u{i}");
            let key = state_key("", &entity);
            seen.insert(state_tag(&entity));
            assert_eq!(key, format!("s:{{{}}}{entity}", state_tag(&entity)));
        }
        assert_eq!(seen.len() as u64, STATE_TAGS);
    }
}
