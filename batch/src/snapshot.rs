//! Folding tiles into windows: a view's values for every entity as of one instant.

use std::sync::Arc;

use arrow::array::{
    ArrayRef, BooleanArray, BooleanBufferBuilder, Float64Array, Int64Array, PrimitiveArray,
};
use arrow::buffer::{BooleanBuffer, NullBuffer};
use arrow::datatypes::{DataType, Field, Float64Type, Int64Type, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use duet_spec::duration::ceil_to;
use duet_spec::reference::rank_key;
use duet_spec::{Agg, Value, ValueType};

use crate::tiles::{CompiledFeature, DistinctKey, Recipe, SlotColumns, TilePlan, TileSet};

/// The schema of a view's snapshots: the join key, then one column per feature.
pub fn snapshot_schema(plan: &TilePlan) -> SchemaRef {
    let mut fields = vec![Field::new(&plan.join_key, DataType::Utf8, false)];
    for f in &plan.features {
        fields.push(Field::new(
            &f.feature.name,
            arrow_type(f.feature.value_type),
            true,
        ));
    }
    Arc::new(Schema::new(fields))
}

/// The Arrow type of a feature's values.
pub fn arrow_type(ty: ValueType) -> DataType {
    match ty {
        ValueType::Int => DataType::Int64,
        ValueType::Float => DataType::Float64,
    }
}

/// The tile index range `[lo, hi)` a feature covers as of `s`.
fn tile_range(f: &CompiledFeature, s: i64) -> (i64, i64) {
    let hi = ceil_to(s, f.resolution) / f.resolution;
    (f.window_tiles.map_or(i64::MIN, |w| hi - w), hi)
}

/// A measure folded over one entity's tiles in a range: `None` when nothing matched.
fn fold(
    set: &TileSet,
    plan: &TilePlan,
    slot: usize,
    agg: Agg,
    entity: usize,
    range: (i64, i64),
) -> Option<f64> {
    Folder::new(set, plan, slot, agg, range).fold(entity, &mut Vec::new())
}

/// A tile range over one table of tiles: where each entity's tiles in the range are.
#[derive(Clone, Copy)]
struct Window<'a> {
    range: (i64, i64),
    /// Per entity, where its rows start in `tile`.
    offsets: &'a [usize],
    tile: &'a [i64],
}

impl Window<'_> {
    /// Rows `[lo, hi)` of the table: `entity`'s tiles inside the range.
    fn span(&self, entity: usize) -> (usize, usize) {
        let (a, b) = (self.offsets[entity], self.offsets[entity + 1]);
        let tiles = &self.tile[a..b];
        let hi = tiles.partition_point(|t| *t < self.range.1);
        let lo = tiles[..hi].partition_point(|t| *t < self.range.0);
        (a + lo, a + hi)
    }

    /// Whether both windows find the same rows for every entity.
    fn same(&self, other: &Window<'_>) -> bool {
        self.range == other.range && std::ptr::eq(self.tile, other.tile)
    }
}

/// One measure over one tile range, with its slot's columns looked up once: a snapshot folds
/// the same measure for every entity, so only the entity's own tiles are searched per call.
struct Folder<'a> {
    agg: Agg,
    window: Window<'a>,
    /// Which of the snapshot's distinct windows this is (see [`snapshot`]).
    span: usize,
    columns: &'a SlotColumns,
}

impl<'a> Folder<'a> {
    fn new(set: &'a TileSet, plan: &TilePlan, slot: usize, agg: Agg, range: (i64, i64)) -> Self {
        if agg == Agg::CountDistinct {
            let columns = set
                .distinct
                .get(&slot)
                .expect("every distinct slot has its table");
            let SlotColumns::Distinct { offsets, tile, .. } = columns else {
                unreachable!("distinct tables hold distinct columns")
            };
            return Folder {
                agg,
                window: Window {
                    range,
                    offsets,
                    tile,
                },
                span: 0,
                columns,
            };
        }
        let g = set.group(plan.slots[slot].resolution);
        Folder {
            agg,
            window: Window {
                range,
                offsets: &g.offsets,
                tile: &g.tile,
            },
            span: 0,
            columns: g.slots[slot]
                .as_ref()
                .expect("the slot belongs to its resolution's group"),
        }
    }

    /// The measure for `entity`: `None` when nothing matched. `scratch` is a buffer for
    /// `count_distinct`'s keys that the caller reuses across entities.
    fn fold(&self, entity: usize, scratch: &mut Vec<&'a DistinctKey>) -> Option<f64> {
        self.fold_in(self.window.span(entity), scratch)
    }

    /// The measure over rows `[lo, hi)` of the folder's table (an entity's [`Window::span`]).
    fn fold_in(&self, (lo, hi): (usize, usize), scratch: &mut Vec<&'a DistinctKey>) -> Option<f64> {
        if lo == hi {
            return None;
        }
        match self.columns {
            SlotColumns::Distinct { keys, .. } => match hi - lo {
                1 => Some(1.0),
                _ => {
                    scratch.clear();
                    scratch.extend(&keys[lo..hi]);
                    scratch.sort_unstable();
                    scratch.dedup();
                    Some(scratch.len() as f64)
                }
            },
            SlotColumns::Values { v, n } => {
                let count: i64 = n[lo..hi].iter().sum();
                if count == 0 {
                    return None;
                }
                let vals = (lo..hi).filter(|i| n[*i] > 0).map(|i| v[i]);
                match self.agg {
                    Agg::Count => Some(count as f64),
                    Agg::Sum => Some(vals.sum()),
                    Agg::Mean => Some(vals.sum::<f64>() / count as f64),
                    Agg::Min => vals.reduce(f64::min),
                    Agg::Max => vals.reduce(f64::max),
                    _ => unreachable!("value slots serve count, sum, mean, min and max"),
                }
            }
            SlotColumns::Last { t, v } => (lo..hi)
                .filter(|i| t[*i] != i64::MIN)
                .max_by_key(|i| t[*i])
                .map(|i| v[i]),
            SlotColumns::First { t } => t[lo..hi]
                .iter()
                .copied()
                .filter(|x| *x != i64::MAX)
                .min()
                .map(|x| x as f64),
        }
    }
}

/// A feature's recipe as of one instant, with its folders made once for every entity.
enum Prepared<'a> {
    Measure(Folder<'a>),
    Ratio { num: Folder<'a>, den: Folder<'a> },
    Age { first: Folder<'a>, unit: i64 },
    PctRank { of: Folder<'a> },
}

impl<'a> Prepared<'a> {
    fn new(set: &'a TileSet, plan: &TilePlan, f: &CompiledFeature, s: i64) -> Self {
        let range = tile_range(f, s);
        let folder = |(agg, slot): (Agg, usize)| Folder::new(set, plan, slot, agg, range);
        match &f.recipe {
            Recipe::Measure { agg, slot } => Prepared::Measure(folder((*agg, *slot))),
            Recipe::Ratio { num, den } => Prepared::Ratio {
                num: folder(*num),
                den: folder(*den),
            },
            Recipe::Age { slot, unit } => Prepared::Age {
                first: folder((Agg::Min, *slot)),
                unit: *unit,
            },
            Recipe::PctRank { of, .. } => Prepared::PctRank { of: folder(*of) },
        }
    }

    /// Its folders (one or two), in a fixed order.
    fn folders_mut(&mut self) -> impl Iterator<Item = &mut Folder<'a>> {
        let (first, second) = match self {
            Prepared::Measure(m) => (m, None),
            Prepared::Ratio { num, den } => (num, Some(den)),
            Prepared::Age { first, .. } => (first, None),
            Prepared::PctRank { of, .. } => (of, None),
        };
        std::iter::once(first).chain(second)
    }

    /// The part of a feature's value that depends only on the tiles in its windows, for the
    /// entity whose rows in each of the snapshot's windows are `spans`: the measure, the ratio,
    /// the earliest time for an age, the ranked measure for a population feature.
    fn folded(&self, spans: &[(usize, usize)], scratch: &mut Vec<&'a DistinctKey>) -> Option<f64> {
        let mut fold = |f: &Folder<'a>| f.fold_in(spans[f.span], scratch);
        match self {
            Prepared::Measure(m) => fold(m),
            Prepared::Ratio { num, den } => {
                let n = fold(num).or(zero(num.agg));
                let d = fold(den).or(zero(den.agg));
                match (n, d) {
                    (Some(n), Some(d)) if d != 0.0 => Some(n / d),
                    _ => None,
                }
            }
            Prepared::Age { first, .. } => fold(first),
            Prepared::PctRank { of, .. } => fold(of),
        }
    }

    /// The raw value of a non-population feature as of `s` (`spans` as for
    /// [`Prepared::folded`]).
    fn raw(
        &self,
        spans: &[(usize, usize)],
        s: i64,
        scratch: &mut Vec<&'a DistinctKey>,
    ) -> Option<f64> {
        let folded = self.folded(spans, scratch);
        match self {
            Prepared::Age { unit, .. } => age(folded, s, *unit),
            Prepared::PctRank { .. } => {
                unreachable!("population features are ranked over every entity")
            }
            _ => folded,
        }
    }
}

/// A window's bit in a set of windows (see [`Snapshots::at`]): windows past the 63rd share the
/// last bit, so a change in any of them refolds the features of all of them.
fn window_bit(window: usize) -> u64 {
    1 << window.min(63)
}

/// Whole units from the earliest time to `s`.
fn age(first: Option<f64>, s: i64, unit: i64) -> Option<f64> {
    first.map(|first| whole_units(first, s, unit) as f64)
}

/// Whole units from `first` to `s`.
fn whole_units(first: f64, s: i64, unit: i64) -> i64 {
    (s - first as i64).div_euclid(unit)
}

fn zero(agg: Agg) -> Option<f64> {
    matches!(agg, Agg::Count | Agg::CountDistinct | Agg::Sum).then_some(0.0)
}

fn finish(f: &CompiledFeature, raw: Option<f64>) -> Value {
    match raw {
        None => f.feature.default,
        Some(x) => match f.feature.value_type {
            ValueType::Int => Value::Int(x as i64),
            ValueType::Float => Value::Float(x),
        },
    }
}

/// The value of a non-population feature for one entity as of `s`.
pub fn entity_value(
    set: &TileSet,
    plan: &TilePlan,
    f: &CompiledFeature,
    entity: usize,
    s: i64,
) -> Value {
    let mut prepared = Prepared::new(set, plan, f, s);
    let mut spans = [(0, 0); 2];
    for (i, folder) in prepared.folders_mut().enumerate() {
        folder.span = i;
        spans[i] = folder.window.span(entity);
    }
    finish(f, prepared.raw(&spans, s, &mut Vec::new()))
}

/// The sorted rank keys of a population feature's measure over every entity with an event
/// before `s` (entities whose measure is empty are not part of the population).
pub fn rank_population(set: &TileSet, plan: &TilePlan, f: &CompiledFeature, s: i64) -> Vec<i64> {
    let Recipe::PctRank { of, round } = &f.recipe else {
        return vec![];
    };
    let of = Folder::new(set, plan, of.1, of.0, tile_range(f, s));
    let mut scratch = Vec::new();
    let mut keys: Vec<i64> = (0..set.entities.len())
        .filter(|u| set.first_ms[*u] < s)
        .filter_map(|u| of.fold(u, &mut scratch).map(|x| rank_key(x, *round)))
        .collect();
    radix_sort(&mut keys, |k| *k);
    keys
}

/// A population feature's value for one entity, given the population's sorted keys.
pub fn ranked_value(
    set: &TileSet,
    plan: &TilePlan,
    f: &CompiledFeature,
    entity: usize,
    s: i64,
    population: &[i64],
) -> Value {
    let Recipe::PctRank { of, round } = &f.recipe else {
        return entity_value(set, plan, f, entity, s);
    };
    let k = fold(set, plan, of.1, of.0, entity, tile_range(f, s)).map(|x| rank_key(x, *round));
    finish(
        f,
        k.map(|k| population.partition_point(|x| *x <= k) as f64 / population.len() as f64),
    )
}

/// Every entity with an event before `s`, with every feature of the plan as of `s`.
/// Entities are in sorted order. `s` must be on a tile boundary of every resolution, or the
/// instant the tiles were cut at.
pub fn snapshot(set: &TileSet, plan: &TilePlan, s: i64) -> RecordBatch {
    Snapshots::new(set, plan).at(s)
}

/// Snapshots of one view at successive instants over the same tiles (a backfill's midnights).
///
/// Each feature's value is the fold of an entity's tiles in its windows, then a step that
/// depends on the instant (an age) or on the whole population (a rank). The folded parts are
/// kept for every entity, and from one instant to the next only the entities with a tile that
/// enters or leaves one of the windows are folded again: a day of a 90-day backfill moves
/// the windows past a few percent of the tiles, not all of them. Of such an entity, only the
/// features reading a window that gained or lost one of its tiles are folded again: a tile
/// leaving the 30-day window leaves the 90-day features as they were. A feature not folded
/// again has exactly the tiles it had in each of its windows, so its folded value is the same
/// bits a fresh fold gives (no running sums, so no rounding drift). The first instant, and any
/// step that would refold most entities, folds them all.
pub struct Snapshots<'a> {
    set: &'a TileSet,
    plan: &'a TilePlan,
    /// The instant `folded` holds, once there is one.
    at: Option<i64>,
    /// Per feature, per entity: what its value as of `at` keeps from the fold.
    folded: Vec<Kept>,
    /// Per table of tiles (by the address of its tile column): its entities by tile, or
    /// `None` when its tiles span too many indices to list.
    by_tile: Vec<(usize, Option<ByTile>)>,
    /// Entities folded by the last [`Snapshots::at`].
    refolded: usize,
    /// Above how many changed entities a snapshot folds them all (`None`: half of them).
    limit: Option<usize>,
}

impl<'a> Snapshots<'a> {
    /// Nothing folded yet.
    pub fn new(set: &'a TileSet, plan: &'a TilePlan) -> Self {
        Snapshots {
            set,
            plan,
            at: None,
            folded: plan.features.iter().map(Kept::new).collect(),
            by_tile: Vec::new(),
            refolded: 0,
            limit: None,
        }
    }

    /// Folds only the changed entities unless more than `entities` changed (by default, more
    /// than half of them: folding all is then as cheap).
    pub fn refolding_at_most(mut self, entities: usize) -> Self {
        self.limit = Some(entities);
        self
    }

    /// How many entities the last snapshot folded, some of their features or all (the other
    /// entities kept all their folded values).
    pub fn refolded(&self) -> usize {
        self.refolded
    }

    /// The snapshot as of `s` (see [`snapshot`]).
    pub fn at(&mut self, s: i64) -> RecordBatch {
        let (set, plan) = (self.set, self.plan);
        let mut prepared: Vec<Prepared<'a>> = plan
            .features
            .iter()
            .map(|f| Prepared::new(set, plan, f, s))
            .collect();
        // Folders over the same table and range share their window: each entity's rows in it
        // are searched once for all of them.
        let mut windows: Vec<Window<'a>> = Vec::new();
        // Each folder's window (by index in `windows`), with the feature it folds for.
        let mut uses: Vec<(usize, &CompiledFeature)> = Vec::new();
        // Per feature: the windows its folders read, as bits (see `window_bit`).
        let mut reads = vec![0u64; plan.features.len()];
        for ((p, f), read) in prepared.iter_mut().zip(&plan.features).zip(&mut reads) {
            for folder in p.folders_mut() {
                folder.span = match windows.iter().position(|w| w.same(&folder.window)) {
                    Some(i) => i,
                    None => {
                        windows.push(folder.window);
                        windows.len() - 1
                    }
                };
                uses.push((folder.span, f));
                *read |= window_bit(folder.span);
            }
        }
        let n = set.entities.len();
        let changed = self.at.and_then(|old| self.changed(old, &windows, &uses));
        if changed.is_none() {
            for column in &mut self.folded {
                column.reset(n);
            }
        }
        let mut spans = vec![(0, 0); windows.len()];
        let mut scratch = Vec::new();
        // Refolds entity `u`'s features that read a window among `moved` (bits as in `reads`):
        // the others have the same rows in every window they read, so the same values.
        let mut refold = |u: usize, moved: u64| {
            let needed = reads
                .iter()
                .filter(|r| *r & moved != 0)
                .fold(0, |m, r| m | r);
            for (i, (span, w)) in spans.iter_mut().zip(&windows).enumerate() {
                if needed & window_bit(i) != 0 {
                    *span = w.span(u);
                }
            }
            // Every feature to refold while the entity's tiles are in cache.
            for (((p, column), f), r) in prepared
                .iter()
                .zip(&mut self.folded)
                .zip(&plan.features)
                .zip(&reads)
            {
                if r & moved != 0 {
                    column.set(u, f, p.folded(&spans, &mut scratch));
                }
            }
        };
        self.refolded = match &changed {
            None => {
                (0..n).for_each(|u| refold(u, u64::MAX));
                n
            }
            Some(by_window) => {
                let mut count = 0;
                for word in 0..n.div_ceil(64) {
                    let mut b = by_window.iter().fold(0, |m, bits| m | bits[word]);
                    while b != 0 {
                        let at = b.trailing_zeros();
                        let moved = by_window
                            .iter()
                            .enumerate()
                            .filter(|(_, bits)| bits[word] & (1 << at) != 0)
                            .fold(0, |m, (i, _)| m | window_bit(i));
                        refold(word * 64 + at as usize, moved);
                        b &= b - 1;
                        count += 1;
                    }
                }
                count
            }
        };
        self.at = Some(s);
        self.assemble(s)
    }

    /// Per window of `windows`, the entities whose rows in it differ between `old` and the
    /// instant of `uses` (each folder's window, by index, with its feature), as bit sets;
    /// `None` when folding every entity is as cheap (or a table has no index by tile).
    fn changed(
        &mut self,
        old: i64,
        windows: &[Window<'a>],
        uses: &[(usize, &CompiledFeature)],
    ) -> Option<Vec<Vec<u64>>> {
        let n = self.set.entities.len();
        let limit = self.limit.unwrap_or(n / 2);
        // (window at the new instant, range at `old`), each once.
        let mut moves: Vec<(usize, (i64, i64))> = Vec::new();
        for (w, f) in uses {
            let before = tile_range(f, old);
            if !moves.contains(&(*w, before)) {
                moves.push((*w, before));
            }
        }
        let mut by_window = vec![vec![0u64; n.div_ceil(64)]; windows.len()];
        let mut marked = 0usize;
        for (i, (a, b)) in moves {
            let w = &windows[i];
            let (c, d) = w.range;
            let index = self.index(w)?;
            let bits = &mut by_window[i];
            // The rows that enter or leave: tiles in either range but not both.
            for (lo, hi) in [(a.min(c), a.max(c)), (b.min(d), b.max(d))] {
                let entities = index.entities(lo, hi);
                marked += entities.len();
                if marked > limit {
                    return None;
                }
                for e in entities {
                    bits[*e as usize / 64] |= 1 << (*e % 64);
                }
            }
        }
        Some(by_window)
    }

    /// The index by tile of `w`'s table, built on first use.
    fn index(&mut self, w: &Window<'a>) -> Option<&ByTile> {
        let key = w.tile.as_ptr() as usize;
        let at = match self.by_tile.iter().position(|(k, _)| *k == key) {
            Some(i) => i,
            None => {
                self.by_tile.push((key, ByTile::new(w.offsets, w.tile)));
                self.by_tile.len() - 1
            }
        };
        self.by_tile[at].1.as_ref()
    }

    /// The snapshot's columns from the folded values: every entity with an event before `s`.
    fn assemble(&self, s: i64) -> RecordBatch {
        let (set, plan) = (self.set, self.plan);
        let mask = BooleanArray::new(
            BooleanBuffer::collect_bool(set.first_ms.len(), |u| set.first_ms[u] < s),
            None,
        );
        let mut members: Vec<usize> = Vec::with_capacity(mask.true_count());
        members.extend(mask.values().set_indices());
        let mut columns: Vec<ArrayRef> = Vec::with_capacity(plan.features.len() + 1);
        columns.push(
            arrow::compute::filter(set.key_array(), &mask).expect("the mask matches the entities"),
        );
        for (f, kept) in plan.features.iter().zip(&self.folded) {
            columns.push(match (kept, &f.recipe) {
                (Kept::Folded(folded), Recipe::PctRank { round, .. }) => {
                    let keys: Vec<Option<i64>> = members
                        .iter()
                        .map(|u| folded[*u].map(|x| rank_key(x, *round)))
                        .collect();
                    let ranks = cume_dist(&keys);
                    let raw = keys.iter().zip(ranks).map(|(k, r)| k.map(|_| r));
                    finished_column(f, raw, members.len())
                }
                // An integer age without a default, the usual kind: straight into its column,
                // with no `Value` per entity (a backfill assembles one per day over every
                // entity). The same numbers as `age` and `finish` give.
                (Kept::Folded(folded), Recipe::Age { unit, .. })
                    if f.feature.value_type == ValueType::Int
                        && f.feature.default == Value::Null =>
                {
                    let ages = members
                        .iter()
                        .map(|u| folded[*u].map(|first| whole_units(first, s, *unit)));
                    primitive_column::<Int64Type>(ages, members.len())
                }
                (Kept::Folded(folded), Recipe::Age { unit, .. }) => {
                    let raw = members.iter().map(|u| age(folded[*u], s, *unit));
                    finished_column(f, raw, members.len())
                }
                (Kept::Folded(_), _) => unreachable!("only ages and ranks keep folded values"),
                (Kept::Ints { values, valid }, _) => {
                    let (values, nulls) = gather(values, valid, &members);
                    Arc::new(Int64Array::new(values, nulls))
                }
                (Kept::Floats { values, valid }, _) => {
                    let (values, nulls) = gather(values, valid, &members);
                    Arc::new(Float64Array::new(values, nulls))
                }
            });
        }
        RecordBatch::try_new(snapshot_schema(plan), columns)
            .expect("columns match the snapshot schema")
    }
}

/// The members' kept values and validity, in member order (no null buffer when none is null):
/// read straight from the kept columns, which stay with the next instant.
fn gather<T: arrow::datatypes::ArrowNativeType>(
    values: &[T],
    valid: &BooleanBufferBuilder,
    members: &[usize],
) -> (arrow::buffer::ScalarBuffer<T>, Option<NullBuffer>) {
    let out: Vec<T> = members.iter().map(|u| values[*u]).collect();
    let nulls = NullBuffer::new(BooleanBuffer::collect_bool(members.len(), |i| {
        valid.get_bit(members[i])
    }));
    (out.into(), (nulls.null_count() > 0).then_some(nulls))
}

/// What a snapshot keeps of one feature for every entity between instants.
enum Kept {
    /// An integer measure or ratio: its value, final whatever the instant.
    Ints {
        values: Vec<i64>,
        valid: BooleanBufferBuilder,
    },
    /// A float measure or ratio: its value, final whatever the instant.
    Floats {
        values: Vec<f64>,
        valid: BooleanBufferBuilder,
    },
    /// An age's earliest time or a rank's measure, finished per instant.
    Folded(Vec<Option<f64>>),
}

impl Kept {
    fn new(f: &CompiledFeature) -> Kept {
        match (&f.recipe, f.feature.value_type) {
            (Recipe::Age { .. } | Recipe::PctRank { .. }, _) => Kept::Folded(Vec::new()),
            (_, ValueType::Int) => Kept::Ints {
                values: Vec::new(),
                valid: BooleanBufferBuilder::new(0),
            },
            (_, ValueType::Float) => Kept::Floats {
                values: Vec::new(),
                valid: BooleanBufferBuilder::new(0),
            },
        }
    }

    /// `n` entities, none of them folded.
    fn reset(&mut self, n: usize) {
        match self {
            Kept::Ints { values, valid } => {
                values.clear();
                values.resize(n, 0);
                *valid = BooleanBufferBuilder::new(n);
                valid.append_n(n, false);
            }
            Kept::Floats { values, valid } => {
                values.clear();
                values.resize(n, 0.0);
                *valid = BooleanBufferBuilder::new(n);
                valid.append_n(n, false);
            }
            Kept::Folded(v) => {
                v.clear();
                v.resize(n, None);
            }
        }
    }

    /// Entity `u`'s folded part of feature `f` (see [`Prepared::folded`]); for a measure or
    /// ratio, its value as [`finish`] gives it.
    fn set(&mut self, u: usize, f: &CompiledFeature, folded: Option<f64>) {
        match self {
            Kept::Ints { values, valid } => {
                let x = int_value(finish(f, folded));
                values[u] = x.unwrap_or(0);
                valid.set_bit(u, x.is_some());
            }
            Kept::Floats { values, valid } => {
                let x = finish(f, folded).as_f64();
                values[u] = x.unwrap_or(0.0);
                valid.set_bit(u, x.is_some());
            }
            Kept::Folded(v) => v[u] = folded,
        }
    }
}

/// A value as an integer column holds it.
fn int_value(v: Value) -> Option<i64> {
    match v {
        Value::Null => None,
        Value::Int(i) => Some(i),
        Value::Float(x) => Some(x as i64),
    }
}

/// A feature's column from its raw values: [`finish`] applied to each.
fn finished_column(
    f: &CompiledFeature,
    raw: impl Iterator<Item = Option<f64>>,
    len: usize,
) -> ArrayRef {
    typed_column(f.feature.value_type, raw.map(|x| finish(f, x)), len)
}

/// Values as an Arrow column of type `ty` (floats cut to integers in an integer column; no
/// null buffer when nothing is null).
fn typed_column(ty: ValueType, values: impl Iterator<Item = Value>, len: usize) -> ArrayRef {
    match ty {
        ValueType::Int => primitive_column::<Int64Type>(values.map(int_value), len),
        ValueType::Float => primitive_column::<Float64Type>(values.map(Value::as_f64), len),
    }
}

/// `len` optional values as an Arrow column (no null buffer when nothing is null).
fn primitive_column<T: arrow::datatypes::ArrowPrimitiveType>(
    values: impl Iterator<Item = Option<T::Native>>,
    len: usize,
) -> ArrayRef {
    let mut v = Vec::with_capacity(len);
    let mut valid = BooleanBufferBuilder::new(len);
    for x in values {
        v.push(x.unwrap_or_default());
        valid.append(x.is_some());
    }
    let nulls = NullBuffer::new(valid.finish());
    let nulls = (nulls.null_count() > 0).then_some(nulls);
    Arc::new(PrimitiveArray::<T>::new(v.into(), nulls))
}

/// One table's entities grouped by tile index: `entities[starts[i]..starts[i + 1]]` have a
/// row at tile `base + i`, ascending.
struct ByTile {
    base: i64,
    starts: Vec<usize>,
    entities: Vec<u32>,
}

impl ByTile {
    /// Indexes a table whose entity `u`'s rows are `offsets[u]..offsets[u + 1]` of `tile`;
    /// `None` when its tiles span more indices than it has rows (minute tiles over years,
    /// say), where the index would cost more than it saves.
    fn new(offsets: &[usize], tile: &[i64]) -> Option<ByTile> {
        let (Some(lo), Some(hi)) = (tile.iter().min(), tile.iter().max()) else {
            return Some(ByTile {
                base: 0,
                starts: vec![0],
                entities: Vec::new(),
            });
        };
        let span = usize::try_from(hi.checked_sub(*lo)?).ok()?.checked_add(1)?;
        if span > tile.len().max(1 << 16) || offsets.len() > u32::MAX as usize {
            return None;
        }
        let mut starts = vec![0usize; span + 1];
        for t in tile {
            starts[(t - lo) as usize + 1] += 1;
        }
        for i in 0..span {
            starts[i + 1] += starts[i];
        }
        let mut next = starts.clone();
        let mut entities = vec![0u32; tile.len()];
        for u in 0..offsets.len().saturating_sub(1) {
            for t in &tile[offsets[u]..offsets[u + 1]] {
                let at = &mut next[(t - lo) as usize];
                entities[*at] = u as u32;
                *at += 1;
            }
        }
        Some(ByTile {
            base: *lo,
            starts,
            entities,
        })
    }

    /// The entities with a row at a tile in `[lo, hi)` (an entity once per such row).
    fn entities(&self, lo: i64, hi: i64) -> &[u32] {
        let last = self.starts.len() - 1;
        let at = |t: i64| {
            usize::try_from(t.saturating_sub(self.base))
                .unwrap_or(0)
                .min(last)
        };
        let (a, b) = (at(lo), at(hi));
        if a >= b {
            return &[];
        }
        &self.entities[self.starts[a]..self.starts[b]]
    }
}

/// For each key present, the fraction of present keys `<=` it (its cumulative distribution);
/// `NaN` where the key is absent.
fn cume_dist(keys: &[Option<i64>]) -> Vec<f64> {
    let mut order: Vec<(i64, u32)> = keys
        .iter()
        .enumerate()
        .filter_map(|(i, k)| k.map(|k| (k, i as u32)))
        .collect();
    sort_by_key(&mut order);
    let n = order.len() as f64;
    let mut out = vec![f64::NAN; keys.len()];
    let mut i = 0;
    while i < order.len() {
        // The run of keys equal to this one: a step past each, not a search of the rest.
        let mut j = i + 1;
        while j < order.len() && order[j].0 == order[i].0 {
            j += 1;
        }
        let rank = j as f64 / n;
        for (_, at) in &order[i..j] {
            out[*at as usize] = rank;
        }
        i = j;
    }
    out
}

/// Sorts `(key, position)` pairs by key (the order of equal keys is unspecified).
fn sort_by_key(pairs: &mut Vec<(i64, u32)>) {
    radix_sort(pairs, |p| p.0);
}

/// Sorts items by an integer key (the order of equal keys is unspecified). A backfill ranks a
/// whole population every midnight, and a training set once per day its rows span, so large
/// inputs take a radix sort: one counting pass, then one scatter per byte of the key that not
/// every key shares (rounded sums use three or four of the eight).
pub(crate) fn radix_sort<T: Copy + Default>(items: &mut Vec<T>, key: impl Fn(&T) -> i64) {
    if items.len() < 4096 {
        items.sort_unstable_by_key(&key);
        return;
    }
    // Flipping the sign bit orders signed keys as unsigned ones.
    let bits = |item: &T| (key(item) as u64) ^ (1 << 63);
    let mut counts = vec![[0usize; 256]; 8];
    for item in items.iter() {
        let b = bits(item);
        for (byte, c) in counts.iter_mut().enumerate() {
            c[((b >> (8 * byte)) & 0xff) as usize] += 1;
        }
    }
    let mut spare = vec![T::default(); items.len()];
    for (byte, c) in counts.iter().enumerate() {
        if c.contains(&items.len()) {
            continue;
        }
        let mut next = [0usize; 256];
        let mut at = 0;
        for (d, n) in c.iter().enumerate() {
            next[d] = at;
            at += n;
        }
        for item in items.iter() {
            let d = ((bits(item) >> (8 * byte)) & 0xff) as usize;
            spare[next[d]] = *item;
            next[d] += 1;
        }
        std::mem::swap(items, &mut spare);
    }
}

/// Values of one type as an Arrow column.
pub fn value_column(ty: ValueType, values: &[Value]) -> ArrayRef {
    typed_column(ty, values.iter().copied(), values.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_radix_sort_orders_keys_like_the_standard_sort() {
        // Signed keys, ties, and keys that differ only in high bytes, above the radix threshold.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut pairs: Vec<(i64, u32)> = (0..20_000u32)
            .map(|i| {
                let r = next();
                let k = match i % 4 {
                    0 => (r % 1000) as i64 - 500,
                    1 => r as i64,
                    2 => ((r % 7) as i64) << 40,
                    _ => -((r % 100_000) as i64),
                };
                (k, i)
            })
            .collect();
        let mut expected: Vec<i64> = pairs.iter().map(|p| p.0).collect();
        expected.sort_unstable();
        let positions: std::collections::HashSet<u32> = pairs.iter().map(|p| p.1).collect();
        sort_by_key(&mut pairs);
        assert_eq!(pairs.iter().map(|p| p.0).collect::<Vec<_>>(), expected);
        let after: std::collections::HashSet<u32> = pairs.iter().map(|p| p.1).collect();
        assert_eq!(after, positions, "every position is kept once");
        // Bare keys, as a rank population sorts them.
        let mut keys: Vec<i64> = expected.iter().rev().copied().collect();
        radix_sort(&mut keys, |k| *k);
        assert_eq!(keys, expected);
    }

    #[test]
    fn entities_by_tile_are_found_in_any_range() {
        // Entity 0 at tiles 3 and 5, entity 1 at 4, entity 2 none, entity 3 at 3 and 9.
        let offsets = [0, 2, 3, 3, 5];
        let tile = [3, 5, 4, 3, 9];
        let index = ByTile::new(&offsets, &tile).expect("a small span is indexed");
        assert_eq!(index.entities(3, 4), &[0, 3]);
        assert_eq!(index.entities(4, 6), &[1, 0]);
        assert_eq!(index.entities(i64::MIN, i64::MAX), &[0, 3, 1, 0, 3]);
        assert_eq!(index.entities(6, 9), &[] as &[u32]);
        assert_eq!(index.entities(10, 20), &[] as &[u32]);
        assert_eq!(index.entities(5, 3), &[] as &[u32]);
        assert_eq!(index.entities(-5, 4), &[0, 3]);
        // Tiles spread over more indices than rows are not indexed.
        let spread = [0, 1 << 40];
        assert!(ByTile::new(&[0, 1, 2], &spread).is_none());
        // No tiles at all.
        let empty = ByTile::new(&[0, 0], &[]).expect("indexed");
        assert_eq!(empty.entities(i64::MIN, i64::MAX), &[] as &[u32]);
    }

    #[test]
    fn cume_dist_gives_ties_the_fraction_at_or_below_them() {
        let keys = [Some(5), None, Some(1), Some(5), Some(3)];
        let ranks = cume_dist(&keys);
        assert_eq!(ranks[0], 1.0);
        assert!(ranks[1].is_nan());
        assert_eq!(ranks[2], 0.25);
        assert_eq!(ranks[3], 1.0);
        assert_eq!(ranks[4], 0.5);
    }
}
