//! A batch's entity-state writes: computed by the [`crate::processor::Processor`] from its
//! cached states, then applied to the store with compare-and-set. A write that loses (another
//! writer, or a retry after a failure, changed the key) is recomputed from the stored state and
//! the batch's events of that entity, and tried again; states deduplicate events by id, so
//! recomputing never counts an event twice. A write carries its entity's new history events
//! (when the spec keeps a `history`), appended in the same atomic step only if it applies.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use duet_batch::par::par_map;
use duet_spec::event::Text;

use crate::plan::SpeedPlan;
use crate::processor::{BatchOutcome, Grouped, PAR_MIN, Replay, history_key, state_key};
use crate::state::{ApplyCounts, EntityState};
use crate::store::{CasWrite, HistoryWrite, StateStore, Versioned};
use crate::{Error, Result};

/// Extra time a key lives beyond the last instant its state can matter.
const KEY_GRACE_MS: i64 = 60_000;

/// The longest expiry a state key is given (a thousand years): beyond the relevance of any
/// state a sensible spec keeps, and far within what Redis accepts (an expiry whose instant
/// overflows is refused, and the write would be retried forever).
const MAX_KEY_TTL_MS: i64 = 1_000 * 365 * 24 * 3_600_000;

/// The watermarks key expiries count from.
///
/// A key must outlive every event its entity's partition can still accept, so its expiry counts
/// from that partition's watermark. Counted from the newest watermark of all (as it was), a
/// partition lagging hours behind another (a group catching up) had its entities' keys expire
/// a minute after each write while their events still came, and the next event started an
/// empty state that claimed to hold every event.
#[derive(Clone)]
pub(crate) struct Expiry {
    /// The watermark of each partition of the batch that has one.
    watermarks: HashMap<i32, i64>,
    /// For an entity whose events came from several partitions (not keyed by `user_id`), or
    /// from one without a watermark yet: the oldest of the batch's, or else the wall clock.
    fallback: i64,
}

impl Expiry {
    /// Expiries for a batch of `partitions`, given every partition's watermark, at `now_ms`.
    pub(crate) fn new<'p>(
        all: &HashMap<i32, i64>,
        partitions: impl Iterator<Item = &'p i32>,
        now_ms: i64,
    ) -> Self {
        // A watermark ahead of the clock (events up to the allowed skew early) counts as the
        // clock: counted from the watermark, a key would expire up to the skew too soon once
        // the watermark moved with the clock again.
        let watermarks: HashMap<i32, i64> = partitions
            .filter_map(|p| Some((*p, *all.get(p)?)))
            .filter(|(_, w)| *w != i64::MIN)
            .map(|(p, w)| (p, w.min(now_ms)))
            .collect();
        let fallback = watermarks.values().copied().min().unwrap_or(now_ms);
        Expiry {
            watermarks,
            fallback,
        }
    }

    /// The watermark the expiry of an entity with `grouped` events counts from.
    fn watermark(&self, grouped: &Grouped) -> i64 {
        match self.watermarks.get(&grouped.partition) {
            Some(w) if !grouped.mixed => *w,
            _ => self.fallback,
        }
    }
}

/// The partitions of a batch whose states' keys may have expired while still needed, so that
/// an absent state is rebuilt from its history rather than started empty.
///
/// A key written while its partition's watermark stood `lag` behind the wall clock (never less
/// than zero: expiries count from the clock when the watermark is ahead of it, see
/// [`Expiry::new`]) expires the lateness plus [`KEY_GRACE_MS`] after a watermark still `lag`
/// behind the clock would pass the last instant its state can count. So while a partition's
/// watermark trails the wall clock by at most the grace, every absent key was rightly gone.
/// When it trails by more (the layer was stopped, the producers held their events back, or the
/// layer falls behind), some keys may have expired while their states still counted: their
/// entities' absent states are rebuilt from their histories. So are those of a partition
/// without a watermark before the batch (a group without checkpoints, on a prefix that may hold
/// states).
#[derive(Clone, Default)]
pub(crate) struct Stale {
    /// The watermark each partition of the batch had before it (`None`: none yet).
    before: HashMap<i32, Option<i64>>,
}

impl Stale {
    /// For a batch of `partitions`, given every partition's watermark before the batch.
    pub(crate) fn new<'p>(
        before: &HashMap<i32, i64>,
        partitions: impl Iterator<Item = &'p i32>,
    ) -> Self {
        Stale {
            before: partitions
                .map(|p| (*p, before.get(p).copied().filter(|w| *w != i64::MIN)))
                .collect(),
        }
    }

    /// The watermark that decides what an entity with `grouped` events can still receive: its
    /// partition's before the batch, or the oldest of the batch's for events from several
    /// partitions; `None` when one of them has none yet.
    fn watermark(&self, grouped: &Grouped) -> Option<i64> {
        if grouped.mixed {
            self.before
                .values()
                .try_fold(i64::MAX, |min, w| w.map(|w| min.min(w)))
        } else {
            self.before.get(&grouped.partition).copied().flatten()
        }
    }

    /// True when the key of an entity with `grouped` events may have expired early by `now_ms`:
    /// its watermark trails the clock by more than half the grace, or is unknown. (The other
    /// half absorbs steps of this host's clock between a write and this read; Redis counts an
    /// expiry from when it receives the write, which only lengthens it.)
    fn suspect(&self, grouped: &Grouped, now_ms: i64) -> bool {
        self.watermark(grouped)
            .is_none_or(|wm| now_ms.saturating_sub(wm) > KEY_GRACE_MS / 2)
    }
}

/// Whether a loaded state was rebuilt from its entity's history.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) enum Rebuilt {
    /// Read from its key, or started empty.
    #[default]
    No,
    /// Rebuilt from a history that holds every event it can need.
    Whole,
    /// Rebuilt from a history that does not reach back the streaming horizon before the state's
    /// boundary (a `history` shorter than the horizon): it may miss events.
    Partial,
}

/// Histories read in one round trip while rebuilding states: each can hold a long `history`'s
/// events, so a catch-up batch's are read a few at a time.
const HISTORIES_PER_READ: usize = 256;

/// Attempts at a write that keeps losing before the batch fails.
const ATTEMPTS: usize = 8;

/// How one batch moves entity states forward.
#[derive(Clone)]
pub(crate) struct Settle {
    pub(crate) plan: Arc<SpeedPlan>,
    /// The boundary states fold up to, when one is known.
    pub(crate) target: Option<i64>,
    /// Where key expiries count from.
    pub(crate) expiry: Expiry,
    /// The header a history created in this batch starts with (the same for every entity).
    pub(crate) history_header: Vec<u8>,
    /// Whose absent states may have expired early.
    pub(crate) stale: Stale,
    /// The batch's wall-clock reading (epoch ms) and the instant it was taken.
    pub(crate) clock: (i64, std::time::Instant),
}

/// A state after a batch: applied/duplicate/late counts, and the bytes to store with their
/// expiry (`None`: nothing in the state can count any more; the key goes); and the batch's
/// events the state accepted (or already had), encoded for the entity's history.
pub(crate) struct Settled {
    pub(crate) counts: ApplyCounts,
    pub(crate) value: Option<Vec<u8>>,
    pub(crate) ttl_ms: u64,
    pub(crate) history: Vec<u8>,
}

impl Settle {
    /// Applies an entity's events of the batch to its state and encodes the result.
    pub(crate) fn settle(&self, state: &mut EntityState, grouped: Grouped) -> Settled {
        let plan = &self.plan;
        let watermark = self.expiry.watermark(&grouped);
        let events = grouped.events;
        // What the history keeps: every event the state does not refuse as late (duplicates
        // included: readers deduplicate).
        let history = if plan.history > 0 {
            let mut records = crate::history::Records::default();
            for e in events.iter().filter(|e| e.ts >= state.boundary) {
                records.push(e);
            }
            records.into_bytes()
        } else {
            Vec::new()
        };
        let counts = state.apply_all(events);
        if let Some(t) = self.target {
            state.advance(plan, t);
        }
        let (value, ttl_ms) = match state.relevant_until(plan) {
            None => (None, 1),
            Some(until) => {
                let left = until
                    .saturating_add(plan.lateness)
                    .saturating_sub(watermark)
                    .saturating_add(KEY_GRACE_MS)
                    .clamp(KEY_GRACE_MS, MAX_KEY_TTL_MS);
                (Some(state.encode(plan)), left as u64)
            }
        };
        Settled {
            counts,
            value,
            ttl_ms,
            history,
        }
    }

    /// The write adding `events` (settled for `entity` in this batch) to its history; `None`
    /// when there are none.
    pub(crate) fn history_write(
        &self,
        prefix: &str,
        entity: &str,
        records: Vec<u8>,
    ) -> Option<HistoryWrite> {
        (!records.is_empty()).then(|| HistoryWrite {
            key: history_key(prefix, entity),
            records,
            header: self.history_header.clone(),
            ttl_ms: crate::history::ttl_ms(&self.plan),
        })
    }

    /// The wall clock now (epoch ms), from the batch's reading.
    fn now_ms(&self) -> i64 {
        let (at, since) = self.clock;
        at.saturating_add(since.elapsed().as_millis() as i64)
    }

    /// The stored states of `entities` (with their events of the batch) and their versions: a
    /// fresh state where none is stored or it is unreadable, except that an absent state whose
    /// key may have expired while it still counted ([`Stale`]) is rebuilt from the entity's
    /// history, when the spec keeps one.
    pub(crate) async fn load<S: StateStore>(
        &self,
        store: &S,
        prefix: &str,
        entities: &[(&Text, &Grouped)],
    ) -> Result<Vec<(u64, EntityState, Rebuilt)>> {
        let keys: Vec<String> = entities.iter().map(|(e, _)| state_key(prefix, e)).collect();
        let values = retrying("the state reads", || store.get_many(&keys)).await?;
        let mut suspects = Vec::new();
        if self.plan.history > 0 {
            // The clock read after the states: a key that expired before their read is seen.
            let now = self.now_ms();
            suspects = values
                .iter()
                .zip(entities)
                .enumerate()
                .filter(|(_, (v, (_, grouped)))| v.is_none() && self.stale.suspect(grouped, now))
                .map(|(i, _)| i)
                .collect();
        }
        let mut loaded: Vec<(u64, EntityState, Rebuilt)> = entities
            .iter()
            .zip(values)
            .map(|((entity, _), value)| {
                let (version, state) = self.decode(entity, value);
                (version, state, Rebuilt::No)
            })
            .collect();
        for chunk in suspects.chunks(HISTORIES_PER_READ) {
            let history_keys: Vec<String> = chunk
                .iter()
                .map(|&i| history_key(prefix, entities[i].0))
                .collect();
            let (_, histories) = retrying("the history reads", || {
                store.get_many_with_history(&[], &history_keys)
            })
            .await?;
            let work: Vec<(usize, Vec<u8>)> = chunk
                .iter()
                .copied()
                .zip(histories)
                .filter(|(_, bytes)| !bytes.is_empty())
                .collect();
            // Few, but each replays a whole history: spread over the cores from a few on.
            let rebuilt = par_map(work, 8, |(i, bytes)| {
                let (entity, grouped) = entities[i];
                (i, self.rebuild(entity, grouped, &bytes))
            });
            for (i, state) in rebuilt {
                if let Some((state, how)) = state {
                    loaded[i].1 = state;
                    loaded[i].2 = how;
                }
            }
        }
        Ok(loaded)
    }

    /// The state of `entity` (with `grouped` events in the batch) rebuilt from its history's
    /// `bytes`: every event the history holds, applied to an empty state, folded up to the
    /// batch's boundary. `None` when the history cannot be read, or nothing in it still counts
    /// (the key had rightly expired).
    fn rebuild(
        &self,
        entity: &str,
        grouped: &Grouped,
        bytes: &[u8],
    ) -> Option<(EntityState, Rebuilt)> {
        let plan = &self.plan;
        let h = match crate::history::read(entity, bytes, i64::MAX) {
            Ok(h) => h,
            Err(e) => {
                tracing::error!(entity, error = %e, "unreadable history; the entity's state starts over");
                return None;
            }
        };
        let from = h.from?;
        let watermark = self.stale.watermark(grouped);
        // The batch's boundary; while it is unknown (an owned partition has no watermark yet),
        // the entity's own partition's watermark before the batch, less the lateness, for no
        // older event of the entity can still be accepted. (That holds for events keyed by
        // `user_id`, as [`Expiry`] assumes too; an entity whose events come from several
        // partitions is not folded until the boundary is known.)
        let fold = self.target.or_else(|| {
            watermark
                .filter(|_| !grouped.mixed)
                .map(|w| w.saturating_sub(plan.lateness))
        });
        // Taking events from the history's oldest event, the batch's oldest or the fold,
        // whichever is earliest: none of the history's events, nor the batch's, is refused as
        // late (a partition without a watermark yet has accepted them all).
        let oldest_in_batch = grouped.events.iter().map(|e| e.ts).min();
        let start = [h.events.first().map(|e| e.ts), oldest_in_batch, fold]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(from);
        let mut state = EntityState::new(plan, start);
        state.apply_all(h.events);
        if let Some(t) = fold {
            state.advance(plan, t);
        }
        let until = state.relevant_until(plan)?;
        if watermark.is_some_and(|w| until.saturating_add(plan.lateness) < w) {
            return None;
        }
        let how = if from <= state.boundary.saturating_sub(plan.horizon) {
            Rebuilt::Whole
        } else {
            Rebuilt::Partial
        };
        Some((state, how))
    }

    /// The state stored for `entity` (a fresh one when absent or unreadable) and its version.
    pub(crate) fn decode(&self, entity: &str, value: Option<Versioned>) -> (u64, EntityState) {
        let fresh = || EntityState::new(&self.plan, self.target.unwrap_or(i64::MIN));
        match value {
            None => (0, fresh()),
            Some(v) => match EntityState::decode(&self.plan, entity, &v.bytes) {
                Ok(state) => (v.version, state),
                Err(e) => {
                    tracing::error!(entity, error = %e, "unreadable state; starting the entity over");
                    (v.version, fresh())
                }
            },
        }
    }
}

/// A batch's state writes, computed but not yet applied.
pub struct StateWrites {
    pub(crate) settle: Settle,
    pub(crate) prefix: String,
    pub(crate) replay: Replay,
    pub(crate) writes: Vec<CasWrite>,
    /// Per write: its entity, counts, and whether its state was rebuilt from its history.
    pub(crate) entries: Vec<(Text, ApplyCounts, Rebuilt)>,
}

impl StateWrites {
    /// Entity writes: states to write or delete, or history events to append.
    pub fn len(&self) -> usize {
        self.writes.len()
    }

    /// True when the batch changes no stored state or history.
    pub fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }

    /// Applies the writes, recomputing those that lose; counts go into `out`. Store failures
    /// are retried with a growing pause (a write that landed before the failure then loses, and
    /// its recomputation finds its events already counted). Returns the entities whose state was
    /// reloaded: cached copies of them are stale.
    pub async fn apply<S: StateStore>(
        self,
        store: &S,
        out: &mut BatchOutcome,
    ) -> Result<Vec<Text>> {
        let StateWrites {
            settle,
            prefix,
            replay,
            mut writes,
            mut entries,
        } = self;
        let mut reloaded = Vec::new();
        for attempt in 0..ATTEMPTS {
            let results = retrying("the writes", || store.put_many(&writes)).await?;
            let mut lost = Vec::new();
            for ((entity, counts, how), ok) in entries.into_iter().zip(results) {
                if ok {
                    out.count(counts);
                    out.written += 1;
                    out.count_rebuilt(how);
                } else {
                    lost.push(entity);
                }
            }
            if lost.is_empty() {
                return Ok(reloaded);
            }
            out.conflicts += lost.len() as u64;
            tracing::debug!(
                attempt,
                entities = lost.len(),
                "state changed underneath; reloading"
            );
            let mut events = replay.events_of(&lost);
            let grouped: Vec<Grouped> = lost
                .iter()
                .map(|entity| {
                    // (Every lost entity has events in the batch; without, the fallback
                    // expiry applies.)
                    events.remove(entity).unwrap_or(Grouped {
                        mixed: true,
                        ..Grouped::default()
                    })
                })
                .collect();
            let which: Vec<(&Text, &Grouped)> = lost.iter().zip(&grouped).collect();
            // A key that expired since the batch read it (or while it was cached) is rebuilt
            // here as well.
            let stored = settle.load(store, &prefix, &which).await?;
            let work: Vec<(Text, Grouped, (u64, EntityState, Rebuilt))> = lost
                .into_iter()
                .zip(grouped)
                .zip(stored)
                .map(|((entity, events), stored)| (entity, events, stored))
                .collect();
            let recomputed = par_map(
                work,
                PAR_MIN,
                |(entity, events, (version, mut state, how))| {
                    let s = settle.settle(&mut state, events);
                    (entity, version, s, how)
                },
            );
            writes = Vec::with_capacity(recomputed.len());
            entries = Vec::with_capacity(recomputed.len());
            for (entity, version, mut s, how) in recomputed {
                let expected = (version > 0).then_some(version);
                // The stored state may hold a boundary other than the cached one: its history
                // gets the events it accepts, with it.
                let history =
                    settle.history_write(&prefix, &entity, std::mem::take(&mut s.history));
                if s.value.is_none() && expected.is_none() && history.is_none() {
                    out.count(s.counts);
                } else {
                    writes.push(CasWrite {
                        key: state_key(&prefix, &entity),
                        expected,
                        value: s.value,
                        ttl_ms: s.ttl_ms,
                        history,
                    });
                    entries.push((entity.clone(), s.counts, how));
                }
                reloaded.push(entity);
            }
            if writes.is_empty() {
                return Ok(reloaded);
            }
        }
        Err(Error::Redis(format!(
            "{} entity states kept changing underneath this process (another writer?)",
            writes.len()
        )))
    }
}

/// Pause before the first retry of a failed store call; it doubles up to [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(100);
const MAX_PAUSE: Duration = Duration::from_secs(5);

/// Runs `call` until the state store stops failing (a Redis error), pausing longer each time;
/// `what` names the retried work in the log. Other errors are returned at once.
pub(crate) async fn retrying<T, F: Future<Output = Result<T>>>(
    what: &str,
    mut call: impl FnMut() -> F,
) -> Result<T> {
    let mut pause = FIRST_PAUSE;
    loop {
        match call().await {
            Err(Error::Redis(e)) => {
                tracing::warn!(error = %e, retry_in = ?pause, "state store failed; retrying {what}");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(MAX_PAUSE);
            }
            other => return other,
        }
    }
}
