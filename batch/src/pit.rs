//! Batch features for point-in-time rows: each row reads the snapshot at its view's cadence
//! boundary at or before the row's time.

use std::collections::{BTreeSet, HashMap};

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use datafusion::prelude::DataFrame;
use duet_spec::duration::floor_to;
use duet_spec::{Feature, Value, ValueType, View};

use crate::entities::EntityRows;
use crate::publish::{manifest_at, read_snapshot};
use crate::snapshot::{snapshot, value_column};
use crate::store::Location;
use crate::tiles::{TilePlan, compute_tiles};
use crate::{Error, Result};

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
    if !missing.is_empty() {
        tracing::info!(view = %view.name, snapshots = missing.len(), "computing snapshots not found in the store");
        let tiles = std::sync::Arc::new(compute_tiles(&plan, ev).await?);
        let plan = std::sync::Arc::new(plan.clone());
        let computed = tokio::task::spawn_blocking(move || {
            missing
                .into_iter()
                .map(|s| (s, index(snapshot(&tiles, &plan, s))))
                .collect::<Vec<_>>()
        })
        .await
        .map_err(|e| Error::Internal(format!("snapshot task failed: {e}")))?;
        snapshots.extend(computed);
    }
    Ok(wanted
        .iter()
        .map(|f| {
            let values: Vec<Value> = entities
                .keys
                .iter()
                .zip(&entities.ts)
                .map(|(k, t)| {
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
