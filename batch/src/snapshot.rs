//! Folding tiles into windows: a view's values for every entity as of one instant.

use std::sync::Arc;

use arrow::array::{ArrayRef, BooleanArray, Float64Builder, Int64Builder};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
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
    PctRank { of: Folder<'a>, round: Option<u32> },
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
            Recipe::PctRank { of, round } => Prepared::PctRank {
                of: folder(*of),
                round: *round,
            },
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

    /// The raw value of a non-population feature as of `s`, for the entity whose rows in each
    /// of the snapshot's windows are `spans`.
    fn raw(
        &self,
        spans: &[(usize, usize)],
        s: i64,
        scratch: &mut Vec<&'a DistinctKey>,
    ) -> Option<f64> {
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
            Prepared::Age { first, unit } => {
                fold(first).map(|first| (s - first as i64).div_euclid(*unit) as f64)
            }
            Prepared::PctRank { .. } => {
                unreachable!("population features are ranked over every entity")
            }
        }
    }

    /// The rank key of a population feature's measure (`spans` as for [`Prepared::raw`]).
    fn rank_key(
        &self,
        spans: &[(usize, usize)],
        scratch: &mut Vec<&'a DistinctKey>,
    ) -> Option<i64> {
        let Prepared::PctRank { of, round } = self else {
            unreachable!("only population features have rank keys")
        };
        of.fold_in(spans[of.span], scratch)
            .map(|x| rank_key(x, *round))
    }
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
    keys.sort_unstable();
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
///
/// A backfill calls this once per midnight over the same tiles, so it does no work per entity
/// beyond the fold itself: the key column is filtered from the set's prebuilt one, values go
/// straight into column builders, `count_distinct` reuses one buffer, and a population
/// feature is ranked by one sort and one pass instead of a search per entity.
pub fn snapshot(set: &TileSet, plan: &TilePlan, s: i64) -> RecordBatch {
    let mask: BooleanArray = set.first_ms.iter().map(|t| Some(*t < s)).collect();
    let members: Vec<usize> = mask.values().set_indices().collect();
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(plan.features.len() + 1);
    columns.push(
        arrow::compute::filter(set.key_array(), &mask).expect("the mask matches the entities"),
    );
    let mut prepared: Vec<Prepared<'_>> = plan
        .features
        .iter()
        .map(|f| Prepared::new(set, plan, f, s))
        .collect();
    // Folders over the same table and range share their window: each entity's rows in it are
    // searched once for all of them.
    let mut windows: Vec<Window<'_>> = Vec::new();
    for p in &mut prepared {
        for folder in p.folders_mut() {
            folder.span = match windows.iter().position(|w| w.same(&folder.window)) {
                Some(i) => i,
                None => {
                    windows.push(folder.window);
                    windows.len() - 1
                }
            };
        }
    }
    let mut spans = vec![(0, 0); windows.len()];
    let mut builders: Vec<ColumnBuilder> = plan
        .features
        .iter()
        .map(|f| ColumnBuilder::new(f.feature.value_type, members.len()))
        .collect();
    // Rank keys of the population features, ranked once every entity has one.
    let mut keyed: Vec<Vec<Option<i64>>> = prepared
        .iter()
        .map(|p| match p {
            Prepared::PctRank { .. } => Vec::with_capacity(members.len()),
            _ => Vec::new(),
        })
        .collect();
    let mut scratch = Vec::new();
    // Entity by entity, every feature: an entity's tiles are read from memory once, not once
    // per feature.
    for &u in &members {
        for (span, w) in spans.iter_mut().zip(&windows) {
            *span = w.span(u);
        }
        for (j, p) in prepared.iter().enumerate() {
            match p {
                Prepared::PctRank { .. } => keyed[j].push(p.rank_key(&spans, &mut scratch)),
                _ => builders[j].push(finish(&plan.features[j], p.raw(&spans, s, &mut scratch))),
            }
        }
    }
    for (j, keys) in keyed.iter().enumerate() {
        if let Prepared::PctRank { .. } = prepared[j] {
            let f = &plan.features[j];
            for (k, r) in keys.iter().zip(cume_dist(keys)) {
                builders[j].push(finish(f, k.map(|_| r)));
            }
        }
    }
    columns.extend(builders.into_iter().map(ColumnBuilder::finish));
    RecordBatch::try_new(snapshot_schema(plan), columns).expect("columns match the snapshot schema")
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
        let j = i + order[i..].partition_point(|(k, _)| *k == order[i].0);
        let rank = j as f64 / n;
        for (_, at) in &order[i..j] {
            out[*at as usize] = rank;
        }
        i = j;
    }
    out
}

/// Sorts `(key, position)` pairs by key (the order of equal keys is unspecified). A backfill
/// ranks a whole population every midnight, so large inputs take a radix sort: one counting
/// pass, then one scatter per byte of the key that not every key shares (rounded sums use
/// three or four of the eight).
fn sort_by_key(pairs: &mut Vec<(i64, u32)>) {
    if pairs.len() < 4096 {
        pairs.sort_unstable();
        return;
    }
    // Flipping the sign bit orders signed keys as unsigned ones.
    let bits = |k: i64| (k as u64) ^ (1 << 63);
    let mut counts = vec![[0usize; 256]; 8];
    for (k, _) in pairs.iter() {
        let b = bits(*k);
        for (byte, c) in counts.iter_mut().enumerate() {
            c[((b >> (8 * byte)) & 0xff) as usize] += 1;
        }
    }
    let mut spare = vec![(0i64, 0u32); pairs.len()];
    for (byte, c) in counts.iter().enumerate() {
        if c.contains(&pairs.len()) {
            continue;
        }
        let mut next = [0usize; 256];
        let mut at = 0;
        for (d, n) in c.iter().enumerate() {
            next[d] = at;
            at += n;
        }
        for p in pairs.iter() {
            let d = ((bits(p.0) >> (8 * byte)) & 0xff) as usize;
            spare[next[d]] = *p;
            next[d] += 1;
        }
        std::mem::swap(pairs, &mut spare);
    }
}

/// Builds one feature's column value by value.
enum ColumnBuilder {
    Int(Int64Builder),
    Float(Float64Builder),
}

impl ColumnBuilder {
    fn new(ty: ValueType, capacity: usize) -> Self {
        match ty {
            ValueType::Int => ColumnBuilder::Int(Int64Builder::with_capacity(capacity)),
            ValueType::Float => ColumnBuilder::Float(Float64Builder::with_capacity(capacity)),
        }
    }

    fn push(&mut self, v: Value) {
        match self {
            ColumnBuilder::Int(b) => match v {
                Value::Null => b.append_null(),
                Value::Int(i) => b.append_value(i),
                Value::Float(x) => b.append_value(x as i64),
            },
            ColumnBuilder::Float(b) => b.append_option(v.as_f64()),
        }
    }

    fn finish(self) -> ArrayRef {
        match self {
            ColumnBuilder::Int(mut b) => Arc::new(b.finish()),
            ColumnBuilder::Float(mut b) => Arc::new(b.finish()),
        }
    }
}

/// Values of one type as an Arrow column.
pub fn value_column(ty: ValueType, values: &[Value]) -> ArrayRef {
    let mut column = ColumnBuilder::new(ty, values.len());
    for v in values {
        column.push(*v);
    }
    column.finish()
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
