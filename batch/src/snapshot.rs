//! Folding tiles into windows: a view's values for every entity as of one instant.

use std::sync::Arc;

use arrow::array::{ArrayRef, Float64Builder, Int64Builder, StringBuilder};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use duet_spec::duration::ceil_to;
use duet_spec::reference::rank_key;
use duet_spec::{Agg, Value, ValueType};

use crate::tiles::{CompiledFeature, Recipe, SlotColumns, TilePlan, TileSet};

/// The schema of a view's snapshots: the join key, then one column per feature.
pub fn snapshot_schema(plan: &TilePlan) -> SchemaRef {
    let mut fields = vec![Field::new(&plan.join_key, DataType::Utf8, false)];
    for f in &plan.features {
        let ty = match f.feature.value_type {
            ValueType::Int => DataType::Int64,
            ValueType::Float => DataType::Float64,
        };
        fields.push(Field::new(&f.feature.name, ty, true));
    }
    Arc::new(Schema::new(fields))
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
    let resolution = plan.slots[slot].resolution;
    if agg == Agg::CountDistinct {
        let Some(SlotColumns::Distinct {
            offsets,
            tile,
            keys,
        }) = set.distinct.get(&slot)
        else {
            return None;
        };
        let (a, b) = (offsets[entity], offsets[entity + 1]);
        let tiles = &tile[a..b];
        let lo = a + tiles.partition_point(|t| *t < range.0);
        let hi = a + tiles.partition_point(|t| *t < range.1);
        if lo == hi {
            return None;
        }
        let mut distinct: Vec<&crate::tiles::DistinctKey> = keys[lo..hi].iter().collect();
        distinct.sort_unstable();
        distinct.dedup();
        return Some(distinct.len() as f64);
    }
    let g = set.group(resolution);
    let (a, b) = (g.offsets[entity], g.offsets[entity + 1]);
    let tiles = &g.tile[a..b];
    let lo = a + tiles.partition_point(|t| *t < range.0);
    let hi = a + tiles.partition_point(|t| *t < range.1);
    match g.slots[slot]
        .as_ref()
        .expect("the slot belongs to its resolution's group")
    {
        SlotColumns::Values { v, n } => {
            let count: i64 = n[lo..hi].iter().sum();
            if count == 0 {
                return None;
            }
            let vals = (lo..hi).filter(|i| n[*i] > 0).map(|i| v[i]);
            match agg {
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
        SlotColumns::Distinct { .. } => unreachable!("distinct slots are folded above"),
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
    let range = tile_range(f, s);
    let raw = match &f.recipe {
        Recipe::Measure { agg, slot } => fold(set, plan, *slot, *agg, entity, range),
        Recipe::Ratio { num, den } => {
            let n = fold(set, plan, num.1, num.0, entity, range).or(zero(num.0));
            let d = fold(set, plan, den.1, den.0, entity, range).or(zero(den.0));
            match (n, d) {
                (Some(n), Some(d)) if d != 0.0 => Some(n / d),
                _ => None,
            }
        }
        Recipe::Age { slot, unit } => fold(set, plan, *slot, Agg::Min, entity, range)
            .map(|first| (s - first as i64).div_euclid(*unit) as f64),
        Recipe::PctRank { .. } => unreachable!("population features are ranked in `snapshot`"),
    };
    finish(f, raw)
}

/// The sorted rank keys of a population feature's measure over every entity with an event
/// before `s` (entities whose measure is empty are not part of the population).
pub fn rank_population(set: &TileSet, plan: &TilePlan, f: &CompiledFeature, s: i64) -> Vec<i64> {
    let Recipe::PctRank { of, round } = &f.recipe else {
        return vec![];
    };
    let range = tile_range(f, s);
    let mut keys: Vec<i64> = (0..set.entities.len())
        .filter(|u| set.first_ms[*u] < s)
        .filter_map(|u| fold(set, plan, of.1, of.0, u, range).map(|x| rank_key(x, *round)))
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
pub fn snapshot(set: &TileSet, plan: &TilePlan, s: i64) -> RecordBatch {
    let members: Vec<usize> = (0..set.entities.len())
        .filter(|u| set.first_ms[*u] < s)
        .collect();
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(plan.features.len() + 1);
    let mut keys = StringBuilder::with_capacity(members.len(), members.len() * 10);
    for u in &members {
        keys.append_value(&set.entities[*u]);
    }
    columns.push(Arc::new(keys.finish()));
    for f in &plan.features {
        let values: Vec<Value> = match &f.recipe {
            Recipe::PctRank { of, round } => {
                let range = tile_range(f, s);
                let keyed: Vec<Option<i64>> = members
                    .iter()
                    .map(|u| fold(set, plan, of.1, of.0, *u, range).map(|x| rank_key(x, *round)))
                    .collect();
                let mut sorted: Vec<i64> = keyed.iter().flatten().copied().collect();
                sorted.sort_unstable();
                keyed
                    .iter()
                    .map(|k| {
                        finish(
                            f,
                            k.map(|k| {
                                sorted.partition_point(|x| *x <= k) as f64 / sorted.len() as f64
                            }),
                        )
                    })
                    .collect()
            }
            _ => members
                .iter()
                .map(|u| entity_value(set, plan, f, *u, s))
                .collect(),
        };
        columns.push(value_column(f.feature.value_type, &values));
    }
    RecordBatch::try_new(snapshot_schema(plan), columns).expect("columns match the snapshot schema")
}

/// Values of one type as an Arrow column.
pub fn value_column(ty: ValueType, values: &[Value]) -> ArrayRef {
    match ty {
        ValueType::Int => {
            let mut b = Int64Builder::with_capacity(values.len());
            for v in values {
                match v {
                    Value::Null => b.append_null(),
                    v => b.append_value(v.as_f64().expect("not null") as i64),
                }
            }
            Arc::new(b.finish())
        }
        ValueType::Float => {
            let mut b = Float64Builder::with_capacity(values.len());
            for v in values {
                b.append_option(v.as_f64());
            }
            Arc::new(b.finish())
        }
    }
}
