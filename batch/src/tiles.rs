//! Tiles: per-entity partial aggregates at each feature's resolution, computed once by a
//! DataFusion plan compiled from the spec, then folded into windows by [`crate::snapshot`].
//!
//! A batch view compiles into *slots*: one partial aggregate (a count, a sum with its count, a
//! min, a max, a latest value, the earliest time, or a set of distinct values) per distinct
//! (aggregation, filter, value, resolution). Features share slots: `txn_count_90d` and the
//! denominator of `refund_rate_90d` read the same purchase-count tiles.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{DataType, Float64Type, Int64Type};
use datafusion::datasource::MemTable;
use datafusion::functions_aggregate::expr_fn::{count, max, min, sum};
use datafusion::prelude::{
    DataFrame, Expr, ExprFunctionExt, SessionConfig, SessionContext, cast, col, lit,
};
use duet_spec::expr::Expr as DExpr;
use duet_spec::{Agg, Aggregation, Extent, Feature, Filter, Measure, View};

use crate::par::par_map;
use crate::translate::{MS, filter_expr, floor_div, value_expr};
use crate::{Error, Result};

/// What one slot keeps per tile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SlotKind {
    /// Number of matching events.
    Count,
    /// Sum of the value and the number of non-null values.
    Sum,
    /// Smallest value (and the number of non-null values).
    Min,
    /// Largest value (and the number of non-null values).
    Max,
    /// The value of the latest matching event with a value, and its time.
    Last,
    /// The distinct values (kept in a table of their own).
    Distinct,
    /// The earliest time of a matching event.
    First,
}

/// One partial aggregate of the plan.
#[derive(Debug, Clone, PartialEq)]
pub struct Slot {
    /// What it keeps.
    pub kind: SlotKind,
    /// Which events it reads.
    pub filter: Filter,
    /// What it aggregates, if anything.
    pub value: Option<DExpr>,
    /// Tile size in milliseconds.
    pub resolution: i64,
}

/// How a feature's value is folded from slots.
#[derive(Debug, Clone, PartialEq)]
pub enum Recipe {
    /// One measure over a window of tiles.
    Measure {
        /// The aggregation.
        agg: Agg,
        /// The slot read.
        slot: usize,
    },
    /// A ratio of two measures.
    Ratio {
        /// Numerator aggregation and slot.
        num: (Agg, usize),
        /// Denominator aggregation and slot.
        den: (Agg, usize),
    },
    /// Cumulative-distribution rank of a measure over the population.
    PctRank {
        /// The ranked aggregation and its slot.
        of: (Agg, usize),
        /// Decimal places before ranking.
        round: Option<u32>,
    },
    /// Whole units since the earliest matching event.
    Age {
        /// The slot holding earliest times.
        slot: usize,
        /// The unit in milliseconds.
        unit: i64,
    },
}

/// A feature compiled for the batch layer: its recipe and window.
#[derive(Debug, Clone)]
pub struct CompiledFeature {
    /// The feature.
    pub feature: Feature,
    /// How to fold it.
    pub recipe: Recipe,
    /// Window length in tiles (`None`: all history).
    pub window_tiles: Option<i64>,
    /// Tile size in milliseconds.
    pub resolution: i64,
}

/// A batch view compiled into slots and recipes.
#[derive(Debug, Clone)]
pub struct TilePlan {
    /// The view's name.
    pub view: String,
    /// The join key column.
    pub join_key: String,
    /// The slots, in first-use order.
    pub slots: Vec<Slot>,
    /// The features, in view order.
    pub features: Vec<CompiledFeature>,
    /// Distinct slots whose value is the same for every event of a tile (such as
    /// `utc_date(ts)` over daily tiles), each with the count slot of its filter: their distinct
    /// values are one per tile with a matching event, taken from the tile query instead of a
    /// distinct query of their own.
    pub per_tile: HashMap<usize, usize>,
}

impl TilePlan {
    /// Compiles a batch view.
    pub fn compile(view: &View) -> TilePlan {
        let mut plan = TilePlan {
            view: view.name.clone(),
            join_key: view.join_key.name().to_string(),
            slots: Vec::new(),
            features: Vec::new(),
            per_tile: HashMap::new(),
        };
        for f in &view.features {
            let (window_tiles, resolution) = match f.extent {
                Extent::Sliding { window, resolution } => (
                    Some(window.as_ms() / resolution.as_ms()),
                    resolution.as_ms(),
                ),
                _ => (None, view.cadence.as_ms()),
            };
            let recipe = match &f.aggregation {
                Aggregation::Measure(m) => Recipe::Measure {
                    agg: m.agg,
                    slot: plan.slot_for(m, resolution),
                },
                Aggregation::Ratio {
                    numerator,
                    denominator,
                } => Recipe::Ratio {
                    num: (numerator.agg, plan.slot_for(numerator, resolution)),
                    den: (denominator.agg, plan.slot_for(denominator, resolution)),
                },
                Aggregation::PctRank { of, round } => Recipe::PctRank {
                    of: (of.agg, plan.slot_for(of, resolution)),
                    round: *round,
                },
                Aggregation::Age { filter, unit } => Recipe::Age {
                    slot: plan.add_slot(Slot {
                        kind: SlotKind::First,
                        filter: filter.clone(),
                        value: None,
                        resolution,
                    }),
                    unit: unit.as_ms(),
                },
            };
            plan.features.push(CompiledFeature {
                feature: f.clone(),
                recipe,
                window_tiles,
                resolution,
            });
        }
        for i in 0..plan.slots.len() {
            let slot = &plan.slots[i];
            let constant = slot.kind == SlotKind::Distinct
                && slot
                    .value
                    .as_ref()
                    .is_some_and(|v| constant_per_tile(v, slot.resolution));
            if constant {
                let count = Slot {
                    kind: SlotKind::Count,
                    filter: slot.filter.clone(),
                    value: None,
                    resolution: slot.resolution,
                };
                let c = plan.add_slot(count);
                plan.per_tile.insert(i, c);
            }
        }
        plan
    }

    fn slot_for(&mut self, m: &Measure, resolution: i64) -> usize {
        let kind = match m.agg {
            Agg::Count => SlotKind::Count,
            Agg::Sum | Agg::Mean => SlotKind::Sum,
            Agg::Min => SlotKind::Min,
            Agg::Max => SlotKind::Max,
            Agg::Last => SlotKind::Last,
            Agg::CountDistinct => SlotKind::Distinct,
            Agg::Duration => unreachable!("validated: sessions are streaming only"),
        };
        self.add_slot(Slot {
            kind,
            filter: m.filter.clone(),
            value: m.value.clone(),
            resolution,
        })
    }

    fn add_slot(&mut self, slot: Slot) -> usize {
        if let Some(i) = self.slots.iter().position(|s| *s == slot) {
            return i;
        }
        self.slots.push(slot);
        self.slots.len() - 1
    }

    /// The distinct tile resolutions, ascending.
    pub fn resolutions(&self) -> Vec<i64> {
        let mut r: Vec<i64> = self.slots.iter().map(|s| s.resolution).collect();
        r.sort_unstable();
        r.dedup();
        r
    }

    /// The tile query for one resolution, over the deduplicated events `ev`.
    pub fn tile_query(&self, ev: DataFrame, resolution: i64) -> Result<DataFrame> {
        let mut aggs: Vec<Expr> = vec![min(col(MS)).alias("first_ms")];
        for (i, slot) in self.slots.iter().enumerate() {
            if slot.resolution != resolution || slot.kind == SlotKind::Distinct {
                continue;
            }
            aggs.extend(slot_aggregates(i, slot)?);
        }
        ev.with_column("tile", floor_div(col(MS), resolution))
            .and_then(|df| df.aggregate(vec![col(&self.join_key), col("tile")], aggs))
            .map_err(df_err)
    }

    /// The distinct-values query of a `Distinct` slot.
    pub fn distinct_query(&self, ev: DataFrame, slot: usize) -> Result<DataFrame> {
        let s = &self.slots[slot];
        let value = value_expr(
            s.value
                .as_ref()
                .expect("validated: count_distinct has a value"),
        )?;
        ev.filter(filter_expr(&s.filter))
            .and_then(|df| {
                df.select(vec![
                    col(&self.join_key),
                    floor_div(col(MS), s.resolution).alias("tile"),
                    value.alias("v"),
                ])
            })
            .and_then(|df| df.filter(col("v").is_not_null()))
            .and_then(|df| df.distinct())
            .map_err(df_err)
    }
}

/// Whether `e` has one value over each tile of `resolution` (epoch-aligned milliseconds): it
/// reads no event field except the time, and the time only through `utc_date` or `utc_hour`
/// of a unit the tile divides.
fn constant_per_tile(e: &DExpr, resolution: i64) -> bool {
    use duet_spec::duration::{DAY_MS, HOUR_MS};
    use duet_spec::expr::{Field, Func};
    match e {
        DExpr::Number(_) => true,
        DExpr::Field(_) => false,
        DExpr::Call(f @ (Func::UtcDate | Func::UtcHour), args) => {
            let unit = if *f == Func::UtcDate { DAY_MS } else { HOUR_MS };
            matches!(args.as_slice(), [DExpr::Field(Field::Ts)]) && unit % resolution == 0
        }
        DExpr::Call(_, args) => args.iter().all(|a| constant_per_tile(a, resolution)),
        DExpr::Binary(_, a, b) => {
            constant_per_tile(a, resolution) && constant_per_tile(b, resolution)
        }
        DExpr::Neg(a) => constant_per_tile(a, resolution),
    }
}

fn df_err(e: datafusion::error::DataFusionError) -> Error {
    Error::Internal(format!("query failed: {e}"))
}

fn slot_aggregates(i: usize, slot: &Slot) -> Result<Vec<Expr>> {
    let keep = filter_expr(&slot.filter);
    let v = || -> Result<Expr> {
        value_expr(
            slot.value
                .as_ref()
                .expect("validated: the aggregation has a value"),
        )
    };
    let filtered = |agg: Expr, pred: Expr| agg.filter(pred).build().map_err(df_err);
    Ok(match slot.kind {
        SlotKind::Count => vec![filtered(count(lit(1)), keep)?.alias(format!("s{i}_n"))],
        SlotKind::Sum | SlotKind::Min | SlotKind::Max => {
            let value = v()?;
            let agg = match slot.kind {
                SlotKind::Sum => sum(value.clone()),
                SlotKind::Min => min(value.clone()),
                _ => max(value.clone()),
            };
            vec![
                filtered(agg, keep.clone())?.alias(format!("s{i}_v")),
                filtered(count(value), keep)?.alias(format!("s{i}_n")),
            ]
        }
        SlotKind::Last => {
            let value = v()?;
            let pred = keep.and(value.clone().is_not_null());
            vec![
                filtered(max(col(MS)), pred.clone())?.alias(format!("s{i}_t")),
                crate::asof::latest_where(value, pred)?.alias(format!("s{i}_v")),
            ]
        }
        SlotKind::First => vec![filtered(min(col(MS)), keep)?.alias(format!("s{i}_t"))],
        SlotKind::Distinct => vec![],
    })
}

/// A DataFusion session sized for this machine.
pub fn session() -> SessionContext {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    SessionContext::new_with_config(
        SessionConfig::new()
            .with_target_partitions(cores)
            .with_batch_size(64 * 1024),
    )
}

/// Keeps the first record of each `event_id` among events with `ts < before`, in input order;
/// returns the kept batches and the number of duplicates dropped. Duplicates are exact copies,
/// so which copy is kept does not matter; keeping the first makes it deterministic.
///
/// Runs on every core: the ids are hashed in parallel, then one set per shard keeps the ids
/// whose hash falls in it, walking the events in input order, so each shard keeps the first
/// record of each of its ids.
pub fn dedupe_batches(batches: Vec<RecordBatch>, before: i64) -> (Vec<RecordBatch>, u64) {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    dedupe_on(batches, before, threads.clamp(1, 16))
}

/// Each batch's keys hashed once, batches split among the threads: deduplication and the
/// entity index place keys in shards and look them up by these hashes.
fn hash_keys(
    hasher: &foldhash::fast::RandomState,
    columns: &[&arrow::array::StringArray],
) -> Vec<Vec<u64>> {
    use std::hash::BuildHasher;
    par_map(columns.iter().collect(), 2, |keys| {
        keys.iter()
            .map(|k| hasher.hash_one(k.unwrap_or("")))
            .collect()
    })
}

/// An event id with its hash computed once: the set's hasher passes the hash through.
struct Prehashed<'a> {
    hash: u64,
    id: &'a str,
}

impl std::hash::Hash for Prehashed<'_> {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

impl PartialEq for Prehashed<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash && self.id == other.id
    }
}

impl Eq for Prehashed<'_> {}

/// The hasher of a set of [`Prehashed`] ids: the hash is the one they carry.
#[derive(Default)]
struct PassThrough(u64);

impl std::hash::Hasher for PassThrough {
    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is called by `Prehashed`; this keeps any other use correct.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }

    fn write_u64(&mut self, x: u64) {
        self.0 = x;
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

fn dedupe_on(batches: Vec<RecordBatch>, before: i64, shards: usize) -> (Vec<RecordBatch>, u64) {
    use arrow::array::BooleanArray;
    use arrow::buffer::{BooleanBuffer, Buffer};
    let hasher = foldhash::fast::RandomState::default();
    let ids: Vec<_> = batches
        .iter()
        .map(|b| b.column(0).as_string::<i32>())
        .collect();
    let ts: Vec<_> = batches
        .iter()
        .map(|b| {
            b.column(4)
                .as_primitive::<arrow::datatypes::TimestampMillisecondType>()
                .values()
        })
        .collect();
    let hashes = hash_keys(&hasher, &ids);
    let total: usize = batches.iter().map(|b| b.num_rows()).sum();
    // Per shard: per batch, the bits of the records it keeps; and the duplicates it dropped.
    let kept_by_shard: Vec<(Vec<Vec<u64>>, u64)> = par_map((0..shards).collect(), 2, |shard| {
        let mut seen = PrehashedSet::with_capacity_and_hasher(
            total / shards + total / (8 * shards) + 16,
            Default::default(),
        );
        let mut dropped = 0u64;
        let mut bits = Vec::with_capacity(ids.len());
        for ((ids, ts), hashes) in ids.iter().zip(&ts).zip(&hashes) {
            let mut words = vec![0u64; ids.len().div_ceil(64)];
            for (i, h) in hashes.iter().enumerate() {
                if shard_of(*h, shards) != shard || ts[i] >= before {
                    continue;
                }
                if seen.insert(Prehashed {
                    hash: *h,
                    id: ids.value(i),
                }) {
                    words[i / 64] |= 1 << (i % 64);
                } else {
                    dropped += 1;
                }
            }
            bits.push(words);
        }
        (bits, dropped)
    });
    drop(hashes);
    let dropped = kept_by_shard.iter().map(|(_, d)| d).sum();
    let masks: Vec<BooleanArray> = batches
        .iter()
        .enumerate()
        .map(|(bi, b)| {
            let mut words = vec![0u64; b.num_rows().div_ceil(64)];
            for (bits, _) in &kept_by_shard {
                for (w, x) in words.iter_mut().zip(&bits[bi]) {
                    *w |= x;
                }
            }
            BooleanArray::new(
                BooleanBuffer::new(Buffer::from_vec(words), 0, b.num_rows()),
                None,
            )
        })
        .collect();
    drop(kept_by_shard);
    // The filters, batches split among the threads.
    let kept = par_map(batches.iter().zip(&masks).collect(), 2, |(b, m)| {
        arrow::compute::filter_record_batch(b, m).expect("mask matches the batch")
    })
    .into_iter()
    .filter(|b| b.num_rows() > 0)
    .collect();
    (kept, dropped)
}

/// Registers validated event batches and returns them deduplicated by `event_id` (see
/// [`dedupe_batches`]), restricted to `ts < before`, with `ms` (epoch milliseconds) added.
pub async fn deduplicated_events(
    ctx: &SessionContext,
    batches: Vec<RecordBatch>,
    before: i64,
) -> Result<DataFrame> {
    let (kept, _) = tokio::task::spawn_blocking(move || dedupe_batches(batches, before))
        .await
        .map_err(|e| Error::Internal(format!("deduplication failed: {e}")))?;
    events_table(ctx, kept).await
}

/// Registers deduplicated event batches as a table with `ms` added.
pub async fn events_table(ctx: &SessionContext, batches: Vec<RecordBatch>) -> Result<DataFrame> {
    let schema = duet_spec::event::event_schema();
    let parts = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut partitions: Vec<Vec<RecordBatch>> = vec![Vec::new(); parts];
    for (i, b) in batches.into_iter().enumerate() {
        partitions[i % parts].push(b);
    }
    let table = MemTable::try_new(schema, partitions).map_err(df_err)?;
    static TABLES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let name = format!(
        "events_{}",
        TABLES.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    ctx.register_table(name.as_str(), Arc::new(table))
        .map_err(df_err)?;
    let df = ctx.table(name.as_str()).await.map_err(df_err)?;
    df.with_column(MS, cast(col("ts"), DataType::Int64))
        .map_err(df_err)
}

/// The tiles of one resolution, grouped by entity: `offsets[u]..offsets[u + 1]` are entity
/// `u`'s tiles, ascending.
#[derive(Debug, Default)]
pub struct GroupTiles {
    /// Tile size in milliseconds.
    pub resolution: i64,
    /// Per entity, where its tiles start (one more entry than entities).
    pub offsets: Vec<usize>,
    /// Tile indices (`floor(ts / resolution)`).
    pub tile: Vec<i64>,
    /// Per slot (by slot index; `None` for slots of other resolutions): its partial columns.
    pub slots: Vec<Option<SlotColumns>>,
}

/// The partial aggregates of one slot, one entry per tile (or per distinct row).
#[derive(Debug, PartialEq)]
pub enum SlotColumns {
    /// Count, sum, min, max: the value (unused for counts) and the number of values.
    Values {
        /// Sum, min or max (0 where `n` is 0).
        v: Vec<f64>,
        /// Matching events (counts) or non-null values.
        n: Vec<i64>,
    },
    /// Latest value and its time (`i64::MIN` where none).
    Last {
        /// Time of the latest matching event with a value.
        t: Vec<i64>,
        /// Its value.
        v: Vec<f64>,
    },
    /// Earliest matching time (`i64::MAX` where none).
    First {
        /// The earliest time.
        t: Vec<i64>,
    },
    /// Distinct values: `offsets` per entity into `tile` and `keys`.
    Distinct {
        /// Per entity, where its rows start.
        offsets: Vec<usize>,
        /// The tile of each row.
        tile: Vec<i64>,
        /// The value of each row, as a comparable key.
        keys: Vec<DistinctKey>,
    },
}

/// A value compared by `count_distinct`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DistinctKey {
    /// A number, by its bits (with -0 folded into 0).
    Num(u64),
    /// Text.
    Text(Box<str>),
}

impl DistinctKey {
    /// The key of a number.
    fn number(x: f64) -> DistinctKey {
        DistinctKey::Num(if x == 0.0 { 0 } else { x.to_bits() })
    }

    /// The key of a value; `None` for null, which is not counted.
    fn of(v: duet_spec::expr::Scalar<'_>) -> Option<DistinctKey> {
        use duet_spec::expr::Scalar;
        match v {
            Scalar::Null => None,
            Scalar::Number(x) => Some(DistinctKey::number(x)),
            Scalar::Text(t) => Some(DistinctKey::Text(t.into())),
            Scalar::Timestamp(t) => Some(DistinctKey::number(t as f64)),
        }
    }
}

/// Every tile of a view, for entities in sorted order.
#[derive(Debug, Default)]
pub struct TileSet {
    /// The entities, sorted.
    pub entities: Vec<String>,
    /// The earliest event time of each entity.
    pub first_ms: Vec<i64>,
    /// Tiles per resolution.
    pub groups: Vec<GroupTiles>,
    /// Distinct-value slots (their columns are `SlotColumns::Distinct`).
    pub distinct: HashMap<usize, SlotColumns>,
    /// `entities` as an Arrow column, built on first use ([`TileSet::key_array`]).
    keys: std::sync::OnceLock<arrow::array::ArrayRef>,
}

impl TileSet {
    /// The group holding tiles of `resolution`.
    pub fn group(&self, resolution: i64) -> &GroupTiles {
        self.groups
            .iter()
            .find(|g| g.resolution == resolution)
            .expect("every resolution of the plan has a group")
    }

    /// The entities as an Arrow string column, built once and shared by every snapshot.
    pub fn key_array(&self) -> &arrow::array::ArrayRef {
        self.keys
            .get_or_init(|| Arc::new(arrow::array::StringArray::from_iter_values(&self.entities)))
    }
}

/// Runs the plan's tile queries over deduplicated events and gathers the results by entity.
pub async fn compute_tiles(plan: &TilePlan, ev: DataFrame) -> Result<TileSet> {
    let started = std::time::Instant::now();
    let mut raw_groups = Vec::new();
    for r in plan.resolutions() {
        let batches = plan
            .tile_query(ev.clone(), r)?
            .collect()
            .await
            .map_err(df_err)?;
        raw_groups.push((r, batches));
    }
    let mut raw_distinct = Vec::new();
    for (i, s) in plan.slots.iter().enumerate() {
        if s.kind == SlotKind::Distinct && !plan.per_tile.contains_key(&i) {
            raw_distinct.push((
                i,
                plan.distinct_query(ev.clone(), i)?
                    .collect()
                    .await
                    .map_err(df_err)?,
            ));
        }
    }
    tracing::debug!(
        ms = started.elapsed().as_millis() as u64,
        "distinct queries"
    );
    let plan = plan.clone();
    let gathered = tokio::task::spawn_blocking(move || gather(&plan, raw_groups, raw_distinct))
        .await
        .map_err(|e| Error::Internal(format!("tile gathering failed: {e}")))?;
    tracing::debug!(
        ms = started.elapsed().as_millis() as u64,
        entities = gathered.entities.len(),
        "tiles gathered"
    );
    Ok(gathered)
}

/// One row of a query result: (entity index, tile, batch, row).
type RowRef = (u32, i64, u32, u32);

/// The hash shard of a key hashed to `hash`: bits a hash map does not use to place or tag an
/// entry.
fn shard_of(hash: u64, shards: usize) -> usize {
    ((hash >> 40) as usize) % shards
}

/// A map from hashed keys whose hasher passes the carried hash through.
type PrehashedMap<'a, V> = HashMap<Prehashed<'a>, V, std::hash::BuildHasherDefault<PassThrough>>;

/// A set of hashed keys whose hasher passes the carried hash through.
type PrehashedSet<'a> =
    std::collections::HashSet<Prehashed<'a>, std::hash::BuildHasherDefault<PassThrough>>;

/// One shard of an [`EntityIndex`] as built: its keys with their numbers, and the keys sorted
/// with their numbers.
type ShardKeys<'a> = (PrehashedMap<'a, u32>, Vec<(&'a str, u32)>);

/// Every entity key of the query results, sorted, and the position of each key in that order.
///
/// Built on every core: each thread keeps the keys of one hash shard, numbered as they come,
/// and sorts them; the shards' sorted keys are then merged, which numbers them globally.
struct EntityIndex<'a> {
    /// The keys, sorted.
    entities: Vec<&'a str>,
    hasher: foldhash::fast::RandomState,
    /// Per shard: each of its keys and its number within the shard.
    shards: Vec<PrehashedMap<'a, u32>>,
    /// Per shard: the position in `entities` of each key, by its number within the shard.
    positions: Vec<Vec<u32>>,
}

impl<'a> EntityIndex<'a> {
    /// Indexes the keys of `columns`, hashed by `hasher` into `hashes` (see [`hash_keys`]).
    fn build(
        hasher: foldhash::fast::RandomState,
        columns: &[&'a arrow::array::StringArray],
        hashes: &[Vec<u64>],
        shards: usize,
    ) -> Self {
        let rows: usize = columns.iter().map(|c| c.len()).sum();
        let built: Vec<ShardKeys<'a>> = par_map((0..shards).collect(), 2, |shard| {
            let mut map = PrehashedMap::with_capacity_and_hasher(
                rows / (2 * shards) + 16,
                Default::default(),
            );
            let mut keys = Vec::with_capacity(rows / (2 * shards) + 16);
            for (column, hashes) in columns.iter().zip(hashes) {
                for (r, &hash) in hashes.iter().enumerate() {
                    if shard_of(hash, shards) != shard {
                        continue;
                    }
                    let id = column.value(r);
                    let next = keys.len() as u32;
                    if let std::collections::hash_map::Entry::Vacant(v) =
                        map.entry(Prehashed { hash, id })
                    {
                        v.insert(next);
                        keys.push((id, next));
                    }
                }
            }
            keys.sort_unstable_by_key(|k| k.0);
            (map, keys)
        });
        // A key belongs to one shard only, so the merge meets no equal keys.
        let total = built.iter().map(|(_, keys)| keys.len()).sum();
        let mut entities = Vec::with_capacity(total);
        let mut positions: Vec<Vec<u32>> = built.iter().map(|(_, k)| vec![0; k.len()]).collect();
        let mut heads = vec![0usize; built.len()];
        loop {
            let mut best: Option<(usize, &str)> = None;
            for (s, (_, keys)) in built.iter().enumerate() {
                if let Some((k, _)) = keys.get(heads[s])
                    && best.is_none_or(|(_, b)| *k < b)
                {
                    best = Some((s, k));
                }
            }
            let Some((s, _)) = best else { break };
            let (k, number) = built[s].1[heads[s]];
            positions[s][number as usize] = entities.len() as u32;
            entities.push(k);
            heads[s] += 1;
        }
        EntityIndex {
            entities,
            hasher,
            shards: built.into_iter().map(|(map, _)| map).collect(),
            positions,
        }
    }

    /// The position of a key of the results, hashed to `hash` by the index's hasher.
    fn position(&self, hash: u64, id: &str) -> u32 {
        let s = shard_of(hash, self.shards.len());
        self.positions[s][self.shards[s][&Prehashed { hash, id }] as usize]
    }
}

/// The key column of each batch.
fn key_columns<'a>(
    batches: impl Iterator<Item = &'a RecordBatch>,
    key: &str,
) -> Vec<&'a arrow::array::StringArray> {
    batches
        .map(|b| {
            b.column_by_name(key)
                .expect("key column")
                .as_string::<i32>()
        })
        .collect()
}

/// The rows of a result, ordered by entity then tile; `hashes` are its batches' keys hashed by
/// the index's hasher. Built on every core: the batches are split among the threads, each row
/// goes to the part of its entity's range, and the parts (consecutive entity ranges) are
/// sorted side by side.
fn sorted_rows(
    batches: &[RecordBatch],
    key: &str,
    hashes: &[Vec<u64>],
    index: &EntityIndex<'_>,
) -> Vec<RowRef> {
    let parts = index.shards.len().max(1);
    let n = index.entities.len().max(1);
    let part_of = |u: u32| u as usize * parts / n;
    let per_batch: Vec<Vec<Vec<RowRef>>> = par_map(
        batches.iter().zip(hashes).enumerate().collect(),
        2,
        |(bi, (b, hashes))| {
            let keys = b
                .column_by_name(key)
                .expect("key column")
                .as_string::<i32>();
            let tiles = b
                .column_by_name("tile")
                .expect("tile column")
                .as_primitive::<Int64Type>();
            let mut out: Vec<Vec<RowRef>> = (0..parts)
                .map(|_| Vec::with_capacity(b.num_rows() / parts + 16))
                .collect();
            for (r, &hash) in hashes.iter().enumerate() {
                let u = index.position(hash, keys.value(r));
                out[part_of(u)].push((u, tiles.value(r), bi as u32, r as u32));
            }
            out
        },
    );
    let mut by_part: Vec<Vec<RowRef>> = (0..parts)
        .map(|p| Vec::with_capacity(per_batch.iter().map(|b| b[p].len()).sum()))
        .collect();
    for batch in per_batch {
        for (part, rows) in by_part.iter_mut().zip(batch) {
            part.extend(rows);
        }
    }
    par_map(by_part, 2, |mut rows| {
        rows.sort_unstable_by_key(|r| (r.0, r.1));
        rows
    })
    .concat()
}

fn gather(
    plan: &TilePlan,
    raw_groups: Vec<(i64, Vec<RecordBatch>)>,
    raw_distinct: Vec<(usize, Vec<RecordBatch>)>,
) -> TileSet {
    let started = std::time::Instant::now();
    let key = plan.join_key.as_str();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    // Every key is hashed once, for the index and for sorting the rows.
    let hasher = foldhash::fast::RandomState::default();
    let columns = key_columns(raw_groups.iter().flat_map(|(_, b)| b.iter()), key);
    let hashes = hash_keys(&hasher, &columns);
    let index = EntityIndex::build(hasher, &columns, &hashes, threads.clamp(1, 16));
    let entities = &index.entities;
    tracing::debug!(
        ms = started.elapsed().as_millis() as u64,
        entities = entities.len(),
        "entity index built"
    );
    let mut hashes = hashes.as_slice();
    let group_rows: Vec<(i64, &Vec<RecordBatch>, Vec<RowRef>)> = raw_groups
        .iter()
        .map(|(r, b)| {
            let (own, rest) = hashes.split_at(b.len());
            hashes = rest;
            (*r, b, sorted_rows(b, key, own, &index))
        })
        .collect();
    tracing::debug!(
        ms = started.elapsed().as_millis() as u64,
        "tile rows sorted"
    );
    let mut set = TileSet {
        entities: entities.iter().map(|e| e.to_string()).collect(),
        first_ms: vec![i64::MAX; entities.len()],
        ..Default::default()
    };
    let offsets_of = |rows: &[RowRef]| {
        let mut offsets = vec![0usize; entities.len() + 1];
        for r in rows {
            offsets[r.0 as usize + 1] += 1;
        }
        for i in 0..entities.len() {
            offsets[i + 1] += offsets[i];
        }
        offsets
    };
    for (resolution, batches, rows) in &group_rows {
        let mut g = GroupTiles {
            resolution: *resolution,
            offsets: offsets_of(rows),
            tile: rows.iter().map(|r| r.1).collect(),
            slots: (0..plan.slots.len()).map(|_| None).collect(),
        };
        let first = |b: &RecordBatch| {
            b.column_by_name("first_ms")
                .expect("first_ms")
                .as_primitive::<Int64Type>()
                .clone()
        };
        let firsts: Vec<_> = batches.iter().map(first).collect();
        for r in rows {
            let u = r.0 as usize;
            set.first_ms[u] = set.first_ms[u].min(firsts[r.2 as usize].value(r.3 as usize));
        }
        // The slots' columns, one slot per thread at a time.
        let wanted: Vec<usize> = (0..plan.slots.len())
            .filter(|&i| {
                let slot = &plan.slots[i];
                slot.resolution == *resolution && slot.kind != SlotKind::Distinct
            })
            .collect();
        let columns = par_map(wanted.clone(), 2, |i| {
            slot_columns(i, plan.slots[i].kind, batches, rows)
        });
        for (i, c) in wanted.into_iter().zip(columns) {
            g.slots[i] = Some(c);
        }
        set.groups.push(g);
    }
    tracing::debug!(
        ms = started.elapsed().as_millis() as u64,
        "tile columns gathered"
    );
    for (&i, &count) in &plan.per_tile {
        set.distinct
            .insert(i, per_tile_distinct(plan, i, &set.groups, count));
    }
    for (i, batches) in &raw_distinct {
        let hashes = hash_keys(&index.hasher, &key_columns(batches.iter(), key));
        let rows = sorted_rows(batches, key, &hashes, &index);
        let values: Vec<&arrow::array::ArrayRef> = batches
            .iter()
            .map(|b| b.column_by_name("v").expect("v column"))
            .collect();
        let chunks: Vec<&[RowRef]> = rows.chunks(64 * 1024).collect();
        let keys = par_map(chunks, 2, |chunk| {
            chunk
                .iter()
                .map(|r| {
                    let (col, row) = (values[r.2 as usize], r.3 as usize);
                    match col.data_type() {
                        DataType::Utf8 => {
                            DistinctKey::Text(col.as_string::<i32>().value(row).into())
                        }
                        _ => DistinctKey::number(col.as_primitive::<Float64Type>().value(row)),
                    }
                })
                .collect::<Vec<_>>()
        })
        .concat();
        set.distinct.insert(
            *i,
            SlotColumns::Distinct {
                offsets: offsets_of(&rows),
                tile: rows.iter().map(|r| r.1).collect(),
                keys,
            },
        );
    }
    tracing::debug!(
        ms = started.elapsed().as_millis() as u64,
        "distinct values gathered"
    );
    set
}

/// The distinct values of slot `i`, whose value is constant over each tile
/// ([`TilePlan::per_tile`]): one row per tile where its count slot `count` matched, with the
/// value at the tile's start.
fn per_tile_distinct(
    plan: &TilePlan,
    i: usize,
    groups: &[GroupTiles],
    count: usize,
) -> SlotColumns {
    let slot = &plan.slots[i];
    let value = slot
        .value
        .as_ref()
        .expect("validated: count_distinct has a value");
    let g = groups
        .iter()
        .find(|g| g.resolution == slot.resolution)
        .expect("every resolution of the plan has a group");
    let Some(SlotColumns::Values { n, .. }) = &g.slots[count] else {
        unreachable!("a count slot holds values")
    };
    let mut at_tile: HashMap<i64, Option<DistinctKey>, foldhash::fast::RandomState> =
        HashMap::default();
    let mut key_of = |tile: i64| {
        at_tile
            .entry(tile)
            .or_insert_with(|| {
                let start = duet_spec::event::Event {
                    event_id: Default::default(),
                    user_id: Default::default(),
                    event_type: Default::default(),
                    amount: None,
                    ts: tile.saturating_mul(slot.resolution),
                };
                DistinctKey::of(value.eval(&start))
            })
            .clone()
    };
    let mut offsets = Vec::with_capacity(g.offsets.len());
    let (mut tile, mut keys) = (Vec::new(), Vec::new());
    offsets.push(0);
    for span in g.offsets.windows(2) {
        let rows = span[0]..span[1];
        for (&t, &count) in g.tile[rows.clone()].iter().zip(&n[rows]) {
            if count > 0
                && let Some(k) = key_of(t)
            {
                tile.push(t);
                keys.push(k);
            }
        }
        offsets.push(tile.len());
    }
    SlotColumns::Distinct {
        offsets,
        tile,
        keys,
    }
}

fn slot_columns(i: usize, kind: SlotKind, batches: &[RecordBatch], rows: &[RowRef]) -> SlotColumns {
    let f64_col = |name: String| -> Vec<arrow::array::Float64Array> {
        batches
            .iter()
            .map(|b| {
                let c = b.column_by_name(&name).expect("slot column");
                arrow::compute::cast(c, &DataType::Float64)
                    .expect("numeric")
                    .as_primitive::<Float64Type>()
                    .clone()
            })
            .collect()
    };
    let i64_col = |name: String| -> Vec<arrow::array::Int64Array> {
        batches
            .iter()
            .map(|b| {
                b.column_by_name(&name)
                    .expect("slot column")
                    .as_primitive::<Int64Type>()
                    .clone()
            })
            .collect()
    };
    let opt_f = |cols: &[arrow::array::Float64Array], r: &RowRef| {
        let c = &cols[r.2 as usize];
        if c.is_null(r.3 as usize) {
            None
        } else {
            Some(c.value(r.3 as usize))
        }
    };
    let opt_i = |cols: &[arrow::array::Int64Array], r: &RowRef| {
        let c = &cols[r.2 as usize];
        if c.is_null(r.3 as usize) {
            None
        } else {
            Some(c.value(r.3 as usize))
        }
    };
    match kind {
        SlotKind::Count => {
            let n = i64_col(format!("s{i}_n"));
            SlotColumns::Values {
                v: vec![0.0; rows.len()],
                n: rows.iter().map(|r| opt_i(&n, r).unwrap_or(0)).collect(),
            }
        }
        SlotKind::Sum | SlotKind::Min | SlotKind::Max => {
            let (v, n) = (f64_col(format!("s{i}_v")), i64_col(format!("s{i}_n")));
            SlotColumns::Values {
                v: rows.iter().map(|r| opt_f(&v, r).unwrap_or(0.0)).collect(),
                n: rows.iter().map(|r| opt_i(&n, r).unwrap_or(0)).collect(),
            }
        }
        SlotKind::Last => {
            let (t, v) = (i64_col(format!("s{i}_t")), f64_col(format!("s{i}_v")));
            SlotColumns::Last {
                t: rows
                    .iter()
                    .map(|r| opt_i(&t, r).unwrap_or(i64::MIN))
                    .collect(),
                v: rows.iter().map(|r| opt_f(&v, r).unwrap_or(0.0)).collect(),
            }
        }
        SlotKind::First => {
            let t = i64_col(format!("s{i}_t"));
            SlotColumns::First {
                t: rows
                    .iter()
                    .map(|r| opt_i(&t, r).unwrap_or(i64::MAX))
                    .collect(),
            }
        }
        SlotKind::Distinct => unreachable!("distinct slots have their own table"),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{Float64Array, StringArray, TimestampMillisecondArray};

    use super::*;

    /// Batches of events whose ids repeat within and across batches.
    fn events(seed: u64, batches: usize) -> Vec<RecordBatch> {
        let mut x = seed;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        (0..batches)
            .map(|_| {
                let n = (next() % 300) as usize;
                let ids: Vec<String> = (0..n).map(|_| format!("e{}", next() % 400)).collect();
                let ts: Vec<i64> = (0..n).map(|_| (next() % 1000) as i64).collect();
                RecordBatch::try_new(
                    duet_spec::event::event_schema(),
                    vec![
                        Arc::new(StringArray::from(ids.clone())),
                        Arc::new(StringArray::from(ids.clone())),
                        Arc::new(StringArray::from(vec!["purchase"; n])),
                        Arc::new(Float64Array::from(
                            (0..n).map(|i| i as f64).collect::<Vec<_>>(),
                        )),
                        Arc::new(TimestampMillisecondArray::from(ts).with_timezone("UTC")),
                    ],
                )
                .unwrap()
            })
            .collect()
    }

    /// The records kept, one at a time, by a plain walk over the input: (event_id, amount).
    fn plain(batches: &[RecordBatch], before: i64) -> (Vec<(String, f64)>, u64) {
        let mut seen = std::collections::HashSet::new();
        let (mut kept, mut dropped) = (Vec::new(), 0);
        for b in batches {
            let ids = b.column(0).as_string::<i32>();
            let amount = b.column(3).as_primitive::<Float64Type>();
            let ts = b
                .column(4)
                .as_primitive::<arrow::datatypes::TimestampMillisecondType>();
            for i in 0..b.num_rows() {
                if ts.value(i) >= before {
                    continue;
                }
                if seen.insert(ids.value(i).to_string()) {
                    kept.push((ids.value(i).to_string(), amount.value(i)));
                } else {
                    dropped += 1;
                }
            }
        }
        (kept, dropped)
    }

    #[test]
    fn values_constant_over_a_tile_are_recognised() {
        use duet_spec::duration::{DAY_MS, HOUR_MS, MINUTE_MS};
        let constant = |text: &str, resolution: i64| {
            constant_per_tile(&DExpr::parse(text).unwrap(), resolution)
        };
        assert!(constant("utc_date(ts)", DAY_MS));
        assert!(constant("utc_date(ts)", 6 * HOUR_MS));
        assert!(!constant("utc_date(ts)", 7 * HOUR_MS));
        assert!(!constant("utc_date(ts)", 2 * DAY_MS));
        assert!(constant("utc_hour(ts)", HOUR_MS));
        assert!(constant("utc_hour(ts)", 10 * MINUTE_MS));
        assert!(!constant("utc_hour(ts)", DAY_MS));
        assert!(constant("utc_date(ts) * 24 + utc_hour(ts)", HOUR_MS));
        assert!(!constant("utc_date(ts) * 24 + utc_hour(ts)", DAY_MS));
        assert!(!constant("amount", MINUTE_MS));
        assert!(!constant("utc_date(ts) + amount", DAY_MS));
        assert!(!constant("event_type", DAY_MS));
    }

    #[test]
    fn sharded_dedupe_keeps_the_first_of_each_id_in_input_order() {
        for seed in 1..20u64 {
            let batches = events(seed * 7919, 1 + (seed as usize % 9));
            for before in [0, 500, 1000] {
                let want = plain(&batches, before);
                for shards in [1, 2, 3, 16] {
                    let (kept, dropped) = dedupe_on(batches.clone(), before, shards);
                    let got: Vec<(String, f64)> = kept
                        .iter()
                        .flat_map(|b| {
                            let ids = b.column(0).as_string::<i32>();
                            let amount = b.column(3).as_primitive::<Float64Type>();
                            (0..b.num_rows())
                                .map(|i| (ids.value(i).to_string(), amount.value(i)))
                                .collect::<Vec<_>>()
                        })
                        .collect();
                    assert_eq!(
                        (got, dropped),
                        want,
                        "seed {seed}, before {before}, {shards} shards"
                    );
                    assert!(kept.iter().all(|b| b.num_rows() > 0));
                }
            }
        }
    }
}
