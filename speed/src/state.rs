//! One entity's streaming state, and its evaluation as of any instant.
//!
//! Events at or after the entity's *boundary* `B` are kept as records; everything older is
//! folded into partial aggregates: tiles at each resolution, the last session of each session
//! gap, and the latest value of each `last` feature. `B` only moves forward, always stays at or
//! behind the committed watermark minus the allowed lateness once the state is written (so an
//! event that can still be accepted, or replayed after a crash, is never older than `B`), and is
//! aligned to every tile resolution. Evaluation as of any `T >= B` is therefore exact: complete
//! tiles before `B`, plus the records in `[B, T)`.

use std::collections::VecDeque;

use duet_spec::duration::{ceil_to, floor_to};
use duet_spec::event::{Event, Text};
use duet_spec::expr::Scalar;
use duet_spec::reference::distinct_key;
use duet_spec::{Agg, Extent, Measure, Value, ValueType};

use crate::codec::{Corrupt, Reader, Writer};
use crate::plan::{FeatureRecipe, Home, SpeedPlan};

/// The latest matching event of a measure.
#[derive(Debug, Clone, PartialEq)]
pub struct Latest {
    /// Its time.
    pub ts: i64,
    /// Its id (breaks ties at equal times: the greatest wins).
    pub id: Text,
    /// Its value.
    pub value: f64,
}

impl Latest {
    fn newer_than(&self, other: &Latest) -> bool {
        other.older_than(self.ts, &self.id)
    }

    /// True when an event at `ts` with id `id` is newer than this one.
    fn older_than(&self, ts: i64, id: &str) -> bool {
        (self.ts, self.id.as_str()) < (ts, id)
    }
}

/// The partial aggregate of one measure over some events.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Partial {
    /// Matching events (for `count`) or matching non-null values (otherwise).
    pub n: i64,
    /// Sum of values.
    pub sum: f64,
    /// Smallest value (meaningful when `n > 0`).
    pub min: f64,
    /// Largest value (meaningful when `n > 0`).
    pub max: f64,
    /// Latest value.
    pub last: Option<Latest>,
    /// Distinct value keys, sorted.
    pub distinct: Vec<String>,
}

impl Partial {
    /// Adds one event.
    pub fn add(&mut self, m: &Measure, e: &Event) {
        if !m.filter.accepts(e) {
            return;
        }
        let Some(value) = &m.value else {
            self.n += 1;
            return;
        };
        let v = value.eval(e);
        if v == Scalar::Null {
            return;
        }
        match m.agg {
            Agg::CountDistinct => {
                let k = distinct_key(v);
                if let Err(at) = self.distinct.binary_search(&k) {
                    self.distinct.insert(at, k);
                }
                self.n += 1;
            }
            _ => {
                let x = v.as_f64().unwrap_or(0.0);
                self.absorb(x, 1);
                // The id is copied only when the event becomes the latest.
                if m.agg == Agg::Last
                    && self
                        .last
                        .as_ref()
                        .is_none_or(|l| l.older_than(e.ts, &e.event_id))
                {
                    self.last = Some(Latest {
                        ts: e.ts,
                        id: e.event_id.clone(),
                        value: x,
                    });
                }
            }
        }
    }

    fn absorb(&mut self, x: f64, n: i64) {
        if self.n == 0 {
            self.min = x;
            self.max = x;
        } else {
            self.min = self.min.min(x);
            self.max = self.max.max(x);
        }
        self.sum += x;
        self.n += n;
    }

    /// Combines another partial of the same measure.
    pub fn merge(&mut self, o: &Partial) {
        if o.n == 0 {
            return;
        }
        if self.n == 0 {
            self.min = o.min;
            self.max = o.max;
        } else {
            self.min = self.min.min(o.min);
            self.max = self.max.max(o.max);
        }
        self.sum += o.sum;
        self.n += o.n;
        if let Some(l) = &o.last
            && self.last.as_ref().is_none_or(|s| l.newer_than(s))
        {
            self.last = Some(l.clone());
        }
        for k in &o.distinct {
            if let Err(at) = self.distinct.binary_search(k) {
                self.distinct.insert(at, k.clone());
            }
        }
    }

    /// The measure's value: `None` when nothing matched.
    pub fn value(&self, agg: Agg) -> Option<f64> {
        if self.n == 0 {
            return None;
        }
        Some(match agg {
            Agg::Count => self.n as f64,
            Agg::Sum => self.sum,
            Agg::Mean => self.sum / self.n as f64,
            Agg::Min => self.min,
            Agg::Max => self.max,
            Agg::CountDistinct => self.distinct.len() as f64,
            Agg::Last => self.last.as_ref()?.value,
            Agg::Duration => unreachable!("durations are read from the session"),
        })
    }

    fn encode(&self, agg: Agg, w: &mut Writer) {
        w.i(self.n);
        if self.n == 0 {
            return;
        }
        match agg {
            Agg::Count => {}
            Agg::Sum | Agg::Mean => w.f(self.sum),
            Agg::Min => w.f(self.min),
            Agg::Max => w.f(self.max),
            Agg::Last => {
                let l = self
                    .last
                    .as_ref()
                    .expect("a last partial with values has a latest");
                w.i(l.ts);
                w.s(&l.id);
                w.f(l.value);
            }
            Agg::CountDistinct => {
                w.u(self.distinct.len() as u64);
                for k in &self.distinct {
                    w.s(k);
                }
            }
            Agg::Duration => {}
        }
    }

    fn decode(agg: Agg, r: &mut Reader<'_>) -> Result<Partial, Corrupt> {
        let mut p = Partial {
            n: r.i()?,
            ..Partial::default()
        };
        if p.n == 0 {
            return Ok(p);
        }
        match agg {
            Agg::Count | Agg::Duration => {}
            Agg::Sum | Agg::Mean => p.sum = r.f()?,
            Agg::Min => p.min = r.f()?,
            Agg::Max => p.max = r.f()?,
            Agg::Last => {
                p.last = Some(Latest {
                    ts: r.i()?,
                    id: r.s()?,
                    value: r.f()?,
                })
            }
            Agg::CountDistinct => {
                let n = r.count()?;
                for _ in 0..n {
                    p.distinct.push(r.s()?);
                }
            }
        }
        Ok(p)
    }
}

/// One resolution group's tiles: `(tile index, partials of the group's slots)`, sorted by
/// index without repeats. Folding appends after the newest tile and trimming drops the oldest,
/// so a deque does both in constant time, and a sorted search answers window ranges.
pub type Tiles = VecDeque<(i64, Vec<Partial>)>;

/// The partials of tile `idx`, created empty (`slots` of them) when the tile is absent.
fn tile_mut(tiles: &mut Tiles, idx: i64, slots: usize) -> &mut Vec<Partial> {
    let at = match tiles.back() {
        None => 0,
        Some((last, _)) if *last < idx => tiles.len(),
        Some(_) => tiles.partition_point(|(k, _)| *k < idx),
    };
    if tiles.get(at).is_none_or(|(k, _)| *k != idx) {
        tiles.insert(at, (idx, vec![Partial::default(); slots]));
    }
    &mut tiles[at].1
}

/// True when two event ids are equal. Ids of one source mostly share their length and leading
/// bytes and differ at the end, so the last byte is compared before the whole.
fn same_id(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.as_bytes().last() == b.as_bytes().last() && a == b
}

/// The last session of a gap group that ended before the boundary.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionSummary {
    /// Its first event time.
    pub first: i64,
    /// Its last event time.
    pub last: i64,
    /// Partials of the group's session slots.
    pub partials: Vec<Partial>,
}

/// What applying several events did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApplyCounts {
    /// Events that now count.
    pub applied: u64,
    /// Events whose id already counts.
    pub duplicates: u64,
    /// Events older than the state can still take.
    pub late: u64,
}

/// What applying an event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The event now counts.
    Applied,
    /// An event with the same id already counts.
    Duplicate,
    /// The event is older than the state can still take.
    Late,
}

/// One entity's state.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct EntityState {
    /// Events before this instant are folded into partials.
    pub boundary: i64,
    /// Events at or after the boundary, sorted by `(ts, event_id)`.
    pub records: Vec<Event>,
    /// Per resolution group: its tiles, oldest first.
    pub tiles: Vec<Tiles>,
    /// Per session group: the last session before the boundary.
    pub sessions: Vec<Option<SessionSummary>>,
    /// Per latest-value slot: the latest matching event before the boundary.
    pub recent: Vec<Option<Latest>>,
}

impl EntityState {
    /// An empty state for `plan`, taking events from `boundary` on.
    pub fn new(plan: &SpeedPlan, boundary: i64) -> Self {
        EntityState {
            boundary,
            records: Vec::new(),
            tiles: vec![Tiles::new(); plan.resolutions.len()],
            sessions: vec![None; plan.gaps.len()],
            recent: vec![None; plan.recent_slots.len()],
        }
    }

    /// True when nothing is kept.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
            && self.tiles.iter().all(Tiles::is_empty)
            && self.sessions.iter().all(Option::is_none)
            && self.recent.iter().all(Option::is_none)
    }

    /// Applies one valid event (its `user_id` is this entity).
    pub fn apply(&mut self, e: &Event) -> Outcome {
        let c = self.apply_all(vec![e.clone()]);
        if c.applied == 1 {
            Outcome::Applied
        } else if c.duplicates == 1 {
            Outcome::Duplicate
        } else {
            Outcome::Late
        }
    }

    /// Applies many valid events of this entity at once, as applying them one by one in order
    /// would (the first copy of an id counts), in O(n log n); the events that count move into
    /// the state. Returns how many were applied, duplicates and late.
    pub fn apply_all(&mut self, events: Vec<Event>) -> ApplyCounts {
        let mut counts = ApplyCounts::default();
        // Decide first (borrowing), then move the events that count.
        let mut keep = vec![false; events.len()];
        if self.records.len() + events.len() <= 16 || events.len() <= 2 {
            // Few ids, or one or two new ones: comparing them directly beats hashing.
            for (i, e) in events.iter().enumerate() {
                if e.ts < self.boundary {
                    counts.late += 1;
                } else if self
                    .records
                    .iter()
                    .any(|r| same_id(&r.event_id, &e.event_id))
                    || events[..i]
                        .iter()
                        .zip(&keep)
                        .any(|(f, k)| *k && same_id(&f.event_id, &e.event_id))
                {
                    counts.duplicates += 1;
                } else {
                    keep[i] = true;
                }
            }
        } else {
            // Index the batch's ids (the first copy of each), then look every kept record up
            // in that index: a busy entity keeps hundreds of records, and only the few new
            // events need a table of their own.
            let mut first: std::collections::HashMap<&str, usize, foldhash::fast::RandomState> =
                std::collections::HashMap::with_capacity_and_hasher(
                    events.len(),
                    Default::default(),
                );
            for (i, e) in events.iter().enumerate() {
                if e.ts < self.boundary {
                    counts.late += 1;
                } else {
                    match first.entry(e.event_id.as_str()) {
                        std::collections::hash_map::Entry::Occupied(_) => counts.duplicates += 1,
                        std::collections::hash_map::Entry::Vacant(v) => {
                            v.insert(i);
                            keep[i] = true;
                        }
                    }
                }
            }
            // Record ids are distinct, so each kept first copy is matched at most once; should a
            // state ever hold an id twice, the copy is still counted once.
            if !first.is_empty() {
                for r in &self.records {
                    if let Some(&i) = first.get(r.event_id.as_str())
                        && std::mem::replace(&mut keep[i], false)
                    {
                        counts.duplicates += 1;
                    }
                }
            }
        }
        let fresh = keep.iter().filter(|k| **k).count();
        counts.applied = fresh as u64;
        if fresh > 0 {
            let order = |a: &Event, b: &Event| {
                (a.ts, a.event_id.as_str()).cmp(&(b.ts, b.event_id.as_str()))
            };
            let old = self.records.len();
            self.records.reserve(fresh);
            self.records.extend(
                events
                    .into_iter()
                    .zip(keep)
                    .filter_map(|(e, k)| k.then_some(e)),
            );
            // Events mostly arrive in time order: sort only when the new ones are not already
            // in order after the kept ones.
            let in_order = self.records[old.saturating_sub(1)..]
                .windows(2)
                .all(|w| order(&w[0], &w[1]).is_lt());
            if !in_order {
                self.records.sort_by(order);
            }
        }
        counts
    }

    /// Moves the boundary forward to `to` (aligned down to the plan's alignment), folding older
    /// records into partials and dropping what no evaluation at or after the boundary can read.
    pub fn advance(&mut self, plan: &SpeedPlan, to: i64) {
        let to = floor_to(to, plan.alignment);
        if to <= self.boundary {
            return;
        }
        let k = self.records.partition_point(|r| r.ts < to);
        let folded = &self.records[..k];
        for (g, r) in plan.resolutions.iter().enumerate() {
            let slots = &plan.tile_slots[g];
            // Tiles older than this can serve no window from `to` on: records for them are not
            // folded, and the group's older tiles are dropped after the fold.
            let oldest_needed = (to - plan.group_windows[g]).div_euclid(*r);
            // Records are in time order: one tile lookup per run of records in the same tile.
            let mut rest = folded;
            while let Some(first) = rest.first() {
                let idx = first.ts.div_euclid(*r);
                let run = rest.partition_point(|e| e.ts.div_euclid(*r) == idx);
                if idx >= oldest_needed {
                    let tile = tile_mut(&mut self.tiles[g], idx, slots.len());
                    for e in &rest[..run] {
                        for (p, s) in tile.iter_mut().zip(slots) {
                            p.add(&plan.slots[*s].measure, e);
                        }
                    }
                }
                rest = &rest[run..];
            }
            let tiles = &mut self.tiles[g];
            while tiles.front().is_some_and(|(idx, _)| *idx < oldest_needed) {
                tiles.pop_front();
            }
        }
        for e in folded {
            for (g, gap) in plan.gaps.iter().enumerate() {
                let slots = &plan.session_slots[g];
                let current = &mut self.sessions[g];
                let continues = current.as_ref().is_some_and(|s| e.ts - s.last <= *gap);
                if !continues {
                    *current = Some(SessionSummary {
                        first: e.ts,
                        last: e.ts,
                        partials: vec![Partial::default(); slots.len()],
                    });
                }
                let s = current.as_mut().expect("set above");
                s.last = e.ts;
                for (p, slot) in s.partials.iter_mut().zip(slots) {
                    p.add(&plan.slots[*slot].measure, e);
                }
            }
        }
        // Records are in `(ts, event_id)` order, the order in which a latest value is newer:
        // the last folded record a latest-value slot takes is the newest it can get.
        for (i, slot) in plan.recent_slots.iter().enumerate() {
            let m = &plan.slots[*slot].measure;
            let latest = folded.iter().rev().find_map(|e| {
                let mut p = Partial::default();
                p.add(m, e);
                p.last
            });
            if let Some(l) = latest
                && self.recent[i].as_ref().is_none_or(|cur| l.newer_than(cur))
            {
                self.recent[i] = Some(l);
            }
        }
        self.records.drain(..k);
        self.boundary = to;
        for (g, gap) in plan.gaps.iter().enumerate() {
            if self.sessions[g]
                .as_ref()
                .is_some_and(|s| to - s.last > *gap)
            {
                self.sessions[g] = None;
            }
        }
        for (i, slot) in plan.recent_slots.iter().enumerate() {
            let ttl = plan.recent_ttl(*slot);
            if self.recent[i].as_ref().is_some_and(|l| to - l.ts > ttl) {
                self.recent[i] = None;
            }
        }
    }

    /// The last instant at which anything in this state can still count, if any.
    pub fn relevant_until(&self, plan: &SpeedPlan) -> Option<i64> {
        let mut until: Option<i64> = None;
        let mut bump = |t: i64| until = Some(until.map_or(t, |u| u.max(t)));
        if let Some(r) = self.records.last() {
            bump(r.ts + plan.horizon);
        }
        for (g, tiles) in self.tiles.iter().enumerate() {
            if let Some((idx, _)) = tiles.back() {
                bump((idx + 1) * plan.resolutions[g] + plan.group_windows[g]);
            }
        }
        for (g, s) in self.sessions.iter().enumerate() {
            if let Some(s) = s {
                bump(s.last + plan.gaps[g]);
            }
        }
        for (i, l) in self.recent.iter().enumerate() {
            if let Some(l) = l {
                bump(l.ts + plan.recent_ttl(plan.recent_slots[i]));
            }
        }
        until
    }

    /// Every streaming feature as of `t`, in plan order. Exact for `t >= boundary`; for earlier
    /// instants the result reflects what the state still holds and `exact` is false.
    pub fn evaluate(&self, plan: &SpeedPlan, t: i64) -> Evaluation {
        let values = plan
            .features
            .iter()
            .map(|f| {
                let raw = match f.recipe {
                    FeatureRecipe::Measure(s) => self.measure(plan, s, &f.feature.extent, t),
                    FeatureRecipe::Ratio(n, d) => {
                        let zero = |s: usize| {
                            matches!(
                                plan.slots[s].measure.agg,
                                Agg::Count | Agg::CountDistinct | Agg::Sum
                            )
                            .then_some(0.0)
                        };
                        let num = self.measure(plan, n, &f.feature.extent, t).or(zero(n));
                        let den = self.measure(plan, d, &f.feature.extent, t).or(zero(d));
                        match (num, den) {
                            (Some(a), Some(b)) if b != 0.0 => Some(a / b),
                            _ => None,
                        }
                    }
                };
                match raw {
                    None => f.feature.default,
                    Some(x) => match f.feature.value_type {
                        ValueType::Int => Value::Int(x as i64),
                        ValueType::Float => Value::Float(x),
                    },
                }
            })
            .collect();
        Evaluation {
            values,
            exact: t >= self.boundary,
        }
    }

    fn measure(&self, plan: &SpeedPlan, slot: usize, extent: &Extent, t: i64) -> Option<f64> {
        let m = &plan.slots[slot].measure;
        let before_t = &self.records[..self.records.partition_point(|r| r.ts < t)];
        match (&plan.slots[slot].home, extent) {
            (Home::Tiles(g), Extent::Sliding { window, resolution }) => {
                let r = resolution.as_ms();
                let lower = ceil_to(t, r) - window.as_ms();
                let pos = plan.tile_slots[*g]
                    .iter()
                    .position(|s| *s == slot)
                    .expect("slot in group");
                let mut acc = Partial::default();
                let first_tile = lower.div_euclid(r);
                let last_tile = t.min(self.boundary).div_euclid(r);
                if first_tile < last_tile {
                    let tiles = &self.tiles[*g];
                    let from = tiles.partition_point(|(k, _)| *k < first_tile);
                    let to = tiles.partition_point(|(k, _)| *k < last_tile);
                    for (_, partials) in tiles.range(from..to) {
                        acc.merge(&partials[pos]);
                    }
                }
                for e in before_t.iter().filter(|e| e.ts >= lower) {
                    acc.add(m, e);
                }
                acc.value(m.agg)
            }
            (Home::Recent, Extent::Recent { ttl }) => {
                let mut acc = Partial::default();
                for e in before_t.iter().filter(|e| t - e.ts <= ttl.as_ms()) {
                    acc.add(m, e);
                }
                let i = plan
                    .recent_slots
                    .iter()
                    .position(|s| *s == slot)
                    .expect("recent slot");
                let old = self.recent[i]
                    .as_ref()
                    .filter(|l| l.ts < t && t - l.ts <= ttl.as_ms());
                match (acc.last, old) {
                    (Some(l), _) => Some(l.value),
                    (None, Some(o)) => Some(o.value),
                    (None, None) => None,
                }
            }
            (Home::Session(g), Extent::Session { gap }) => {
                let gap = gap.as_ms();
                let pos = plan.session_slots[*g]
                    .iter()
                    .position(|s| *s == slot)
                    .expect("slot in group");
                let summary = self.sessions[*g].as_ref().filter(|s| s.last < t);
                let (first, mut acc, events): (i64, Partial, &[Event]) = match before_t.last() {
                    Some(last) if t - last.ts <= gap => {
                        let mut i = before_t.len() - 1;
                        while i > 0 && before_t[i].ts - before_t[i - 1].ts <= gap {
                            i -= 1;
                        }
                        let run = &before_t[i..];
                        match summary.filter(|s| i == 0 && run[0].ts - s.last <= gap) {
                            Some(s) => (s.first, s.partials[pos].clone(), run),
                            None => (run[0].ts, Partial::default(), run),
                        }
                    }
                    Some(_) => return None,
                    None => match summary.filter(|s| t - s.last <= gap) {
                        Some(s) => (s.first, s.partials[pos].clone(), &[]),
                        None => return None,
                    },
                };
                if m.agg == Agg::Duration {
                    let last = events
                        .last()
                        .map_or_else(|| summary.map_or(first, |s| s.last), |e| e.ts);
                    return Some((last - first) as f64 / 1000.0);
                }
                for e in events {
                    acc.add(m, e);
                }
                acc.value(m.agg)
            }
            (home, extent) => unreachable!("slot home {home:?} does not serve extent {extent:?}"),
        }
    }

    /// Encodes the state (a format byte, then its parts).
    pub fn encode(&self, plan: &SpeedPlan) -> Vec<u8> {
        let tiles: usize = self.tiles.iter().map(Tiles::len).sum();
        let mut w = Writer::with_capacity(96 + 48 * self.records.len() + 24 * tiles);
        w.u(FORMAT);
        w.i(self.boundary);
        w.u(self.records.len() as u64);
        let mut prev = self.boundary;
        for e in &self.records {
            w.i(e.ts.wrapping_sub(prev));
            prev = e.ts;
            w.s(&e.event_id);
            w.s(&e.event_type);
            w.b(e.amount.is_some());
            if let Some(a) = e.amount {
                w.f(a);
            }
        }
        for (g, tiles) in self.tiles.iter().enumerate() {
            w.u(tiles.len() as u64);
            for (idx, partials) in tiles {
                w.i(*idx);
                for (p, s) in partials.iter().zip(&plan.tile_slots[g]) {
                    p.encode(plan.slots[*s].measure.agg, &mut w);
                }
            }
        }
        for (g, s) in self.sessions.iter().enumerate() {
            w.b(s.is_some());
            if let Some(s) = s {
                w.i(s.first);
                w.i(s.last);
                for (p, slot) in s.partials.iter().zip(&plan.session_slots[g]) {
                    p.encode(plan.slots[*slot].measure.agg, &mut w);
                }
            }
        }
        for l in &self.recent {
            w.b(l.is_some());
            if let Some(l) = l {
                w.i(l.ts);
                w.s(&l.id);
                w.f(l.value);
            }
        }
        w.buf
    }

    /// Decodes a state of `entity` written by [`EntityState::encode`] under the same plan.
    pub fn decode(plan: &SpeedPlan, entity: &str, bytes: &[u8]) -> Result<EntityState, Corrupt> {
        let mut r = Reader::new(bytes);
        if r.u()? != FORMAT {
            return Err(Corrupt(0));
        }
        let boundary = r.i()?;
        let mut state = EntityState::new(plan, boundary);
        let n = r.count()?;
        let mut prev = boundary;
        for _ in 0..n {
            let ts = prev.wrapping_add(r.i()?);
            prev = ts;
            let event_id = r.s()?;
            let event_type = r.s()?;
            let amount = if r.b()? { Some(r.f()?) } else { None };
            state.records.push(Event {
                event_id,
                user_id: entity.into(),
                event_type,
                amount,
                ts,
            });
        }
        for g in 0..plan.resolutions.len() {
            let n = r.count()?;
            for _ in 0..n {
                let idx = r.i()?;
                let partials = plan.tile_slots[g]
                    .iter()
                    .map(|s| Partial::decode(plan.slots[*s].measure.agg, &mut r))
                    .collect::<Result<Vec<_>, _>>()?;
                *tile_mut(&mut state.tiles[g], idx, 0) = partials;
            }
        }
        for g in 0..plan.gaps.len() {
            if r.b()? {
                let (first, last) = (r.i()?, r.i()?);
                let partials = plan.session_slots[g]
                    .iter()
                    .map(|s| Partial::decode(plan.slots[*s].measure.agg, &mut r))
                    .collect::<Result<Vec<_>, _>>()?;
                state.sessions[g] = Some(SessionSummary {
                    first,
                    last,
                    partials,
                });
            }
        }
        for i in 0..plan.recent_slots.len() {
            if r.b()? {
                state.recent[i] = Some(Latest {
                    ts: r.i()?,
                    id: r.s()?,
                    value: r.f()?,
                });
            }
        }
        if !r.done() {
            return Err(Corrupt(bytes.len()));
        }
        Ok(state)
    }
}

/// The state's encoding version.
const FORMAT: u64 = 1;

/// Feature values as of an instant.
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    /// One value per streaming feature, in plan order.
    pub values: Vec<Value>,
    /// False when the instant is older than the state's boundary.
    pub exact: bool,
}
