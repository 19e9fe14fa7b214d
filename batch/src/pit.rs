//! Batch features for point-in-time rows: each row reads the snapshot at its view's cadence
//! boundary at or before the row's time.

use std::collections::{BTreeSet, HashMap};

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use datafusion::prelude::DataFrame;
use duet_spec::duration::floor_to;
use duet_spec::{Feature, Value, ValueType, View};

use crate::entities::EntityRows;
use crate::par::par_map;
use crate::publish::{manifest_at, read_snapshot};
use crate::snapshot::{rank_population, ranked_value, value_column};
use crate::store::Location;
use crate::tiles::{Recipe, TilePlan, compute_tiles};
use crate::{Error, Result};

/// Entity rows per parallel task when batch values are computed.
const ROWS_PER_TASK: usize = 64 * 1024;

/// A snapshot's rows indexed by key.
struct Indexed {
    batch: RecordBatch,
    rows: HashMap<String, usize>,
}

fn index(batch: RecordBatch) -> Indexed {
    let keys = batch.column(0).as_string::<i32>();
    let rows = (0..batch.num_rows())
        .map(|i| (keys.value(i).to_string(), i))
        .collect();
    Indexed { batch, rows }
}

/// The values of `wanted` (features of batch `view`) for every entity row.
pub async fn batch_values(
    view: &View,
    wanted: &[&Feature],
    entities: &EntityRows,
    ev: DataFrame,
    store: Option<&Location>,
) -> Result<Vec<ArrayRef>> {
    let cadence = view.cadence.as_ms();
    let instants: BTreeSet<i64> = entities.ts.iter().map(|t| floor_to(*t, cadence)).collect();
    let plan = TilePlan::compile(view);
    let mut snapshots: HashMap<i64, Indexed> = HashMap::new();
    let mut missing = Vec::new();
    for s in &instants {
        let published = match store {
            Some(store) => manifest_at(store, &view.name, *s).await?,
            None => None,
        };
        let usable = published.filter(|m| {
            wanted.iter().all(|f| {
                m.features
                    .iter()
                    .any(|x| x.name == f.name && x.fingerprint == f.fingerprint())
            })
        });
        match usable {
            Some(m) => {
                let store = store.expect("a manifest came from the store");
                let batches = read_snapshot(store, &m).await?;
                let schema = batches
                    .first()
                    .map(|b| b.schema())
                    .unwrap_or_else(|| crate::snapshot::snapshot_schema(&plan));
                let batch = arrow::compute::concat_batches(&schema, &batches)
                    .map_err(|e| Error::Internal(e.to_string()))?;
                snapshots.insert(*s, index(batch));
            }
            None => missing.push(*s),
        }
    }
    // computed[j][row]: feature j's value for rows whose snapshot was not published.
    let mut computed: Vec<Vec<Option<Value>>> = vec![Vec::new(); wanted.len()];
    if !missing.is_empty() {
        tracing::info!(view = %view.name, instants = missing.len(), "computing batch values not found in the store");
        let tiles = std::sync::Arc::new(compute_tiles(&plan, ev).await?);
        let plan = std::sync::Arc::new(plan.clone());
        let missing: std::collections::HashSet<i64> = missing.into_iter().collect();
        let (keys, ts) = (entities.keys.clone(), entities.ts.clone());
        let wanted_idx: Vec<usize> = wanted
            .iter()
            .map(|f| {
                plan.features
                    .iter()
                    .position(|c| c.feature.name == f.name)
                    .expect("feature of the view")
            })
            .collect();
        computed = tokio::task::spawn_blocking(move || {
            // Only the rows' own (entity, instant) pairs are folded; a rank needs its population
            // once per instant. Both run on every core.
            let ranked: Vec<(usize, i64)> = wanted_idx
                .iter()
                .filter(|fi| matches!(plan.features[**fi].recipe, Recipe::PctRank { .. }))
                .flat_map(|fi| missing.iter().map(move |s| (*fi, *s)))
                .collect();
            let populations: HashMap<(usize, i64), Vec<i64>> = ranked
                .clone()
                .into_iter()
                .zip(par_map(ranked, 2, |(fi, s)| {
                    rank_population(&tiles, &plan, &plan.features[fi], s)
                }))
                .collect();
            let width = wanted_idx.len();
            if width == 0 {
                return Vec::new();
            }
            let chunks: Vec<(usize, usize)> = (0..keys.len())
                .step_by(ROWS_PER_TASK)
                .map(|lo| (lo, (lo + ROWS_PER_TASK).min(keys.len())))
                .collect();
            // Per chunk of rows, row-major: each row's values of the wanted features.
            let parts = par_map(chunks, 2, |(lo, hi)| {
                let mut values: Vec<Option<Value>> = Vec::with_capacity((hi - lo) * width);
                for (k, t) in keys[lo..hi].iter().zip(&ts[lo..hi]) {
                    let s = floor_to(*t, cadence);
                    if !missing.contains(&s) {
                        values.extend(std::iter::repeat_n(None, width));
                        continue;
                    }
                    let entity = tiles
                        .entities
                        .binary_search(k)
                        .ok()
                        .filter(|u| tiles.first_ms[*u] < s);
                    for &fi in &wanted_idx {
                        let f = &plan.features[fi];
                        values.push(Some(match entity {
                            None => f.feature.default,
                            Some(u) => {
                                let population =
                                    populations.get(&(fi, s)).map_or(&[][..], Vec::as_slice);
                                ranked_value(&tiles, &plan, f, u, s, population)
                            }
                        }));
                    }
                }
                values
            });
            let mut out: Vec<Vec<Option<Value>>> =
                (0..width).map(|_| Vec::with_capacity(keys.len())).collect();
            for part in parts {
                for row in part.chunks(width) {
                    for (column, v) in out.iter_mut().zip(row) {
                        column.push(*v);
                    }
                }
            }
            out
        })
        .await
        .map_err(|e| Error::Internal(format!("batch value task failed: {e}")))?;
    }
    Ok(wanted
        .iter()
        .enumerate()
        .map(|(j, f)| {
            let values: Vec<Value> = entities
                .keys
                .iter()
                .zip(&entities.ts)
                .enumerate()
                .map(|(row, (k, t))| {
                    if let Some(v) = computed[j].get(row).copied().flatten() {
                        return v;
                    }
                    let snap = &snapshots[&floor_to(*t, cadence)];
                    let Some(&row) = snap.rows.get(k) else {
                        return f.default;
                    };
                    let col = snap
                        .batch
                        .column_by_name(&f.name)
                        .expect("snapshot has the feature");
                    if col.is_null(row) {
                        Value::Null
                    } else {
                        match f.value_type {
                            ValueType::Int => Value::Int(
                                col.as_primitive::<arrow::datatypes::Int64Type>().value(row),
                            ),
                            ValueType::Float => Value::Float(
                                col.as_primitive::<arrow::datatypes::Float64Type>()
                                    .value(row),
                            ),
                        }
                    }
                })
                .collect();
            value_column(f.value_type, &values)
        })
        .collect())
}
