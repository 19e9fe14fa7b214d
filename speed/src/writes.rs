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
        let watermarks: HashMap<i32, i64> = partitions
            .filter_map(|p| Some((*p, *all.get(p)?)))
            .filter(|(_, w)| *w != i64::MIN)
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
    /// Per write: its entity and counts.
    pub(crate) entries: Vec<(Text, ApplyCounts)>,
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
            for ((entity, counts), ok) in entries.into_iter().zip(results) {
                if ok {
                    out.count(counts);
                    out.written += 1;
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
            let keys: Vec<String> = lost.iter().map(|e| state_key(&prefix, e)).collect();
            let stored = retrying("the reads", || store.get_many(&keys)).await?;
            let mut events = replay.events_of(&lost);
            let work: Vec<(Text, Grouped, Option<Versioned>)> = lost
                .into_iter()
                .zip(stored)
                .map(|(entity, value)| {
                    // (Every lost entity has events in the batch; without, the fallback
                    // expiry applies.)
                    let evs = events.remove(&entity).unwrap_or(Grouped {
                        mixed: true,
                        ..Grouped::default()
                    });
                    (entity, evs, value)
                })
                .collect();
            let recomputed = par_map(work, PAR_MIN, |(entity, events, value)| {
                let (version, mut state) = settle.decode(&entity, value);
                let s = settle.settle(&mut state, events);
                (entity, version, s)
            });
            writes = Vec::with_capacity(recomputed.len());
            entries = Vec::with_capacity(recomputed.len());
            for (entity, version, mut s) in recomputed {
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
                    entries.push((entity.clone(), s.counts));
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
