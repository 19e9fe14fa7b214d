//! `duet speed dump`: every entity's streaming features as of an instant, from the live state.

use std::sync::Arc;

use arrow::array::{ArrayRef, BooleanArray, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use duet_batch::snapshot::{arrow_type, value_column};
use duet_spec::Value;

use crate::plan::SpeedPlan;
use crate::processor::{entity_of, state_key_prefix};
use crate::state::EntityState;
use crate::store::StateStore;
use crate::{Error, Result};

/// Entities whose state could be read, with their feature values as of `t`.
pub struct Dump {
    /// Entity keys, sorted.
    pub entities: Vec<String>,
    /// Per entity, one value per plan feature.
    pub values: Vec<Vec<Value>>,
    /// Per entity, whether `t` was at or after its state's boundary.
    pub exact: Vec<bool>,
    /// Keys whose state could not be decoded.
    pub corrupt: Vec<String>,
}

/// Reads every entity's state under `prefix` and evaluates it as of `t`.
pub async fn dump<S: StateStore>(
    store: &S,
    plan: &SpeedPlan,
    prefix: &str,
    t: i64,
) -> Result<Dump> {
    let mut keys = store.keys(&state_key_prefix(prefix)).await?;
    // Keys start with their hash tag; entities come out sorted by themselves.
    keys.sort_by(|a, b| entity_of(prefix, a).cmp(&entity_of(prefix, b)));
    let mut out = Dump {
        entities: Vec::new(),
        values: Vec::new(),
        exact: Vec::new(),
        corrupt: Vec::new(),
    };
    for chunk in keys.chunks(1000) {
        let values = store.get_many(chunk).await?;
        for (key, v) in chunk.iter().zip(values) {
            let (Some(entity), Some(v)) = (entity_of(prefix, key), v) else {
                continue;
            };
            match EntityState::decode(plan, entity, &v.bytes) {
                Ok(state) => {
                    let ev = state.evaluate(plan, t);
                    out.entities.push(entity.to_string());
                    out.values.push(ev.values);
                    out.exact.push(ev.exact);
                }
                Err(_) => out.corrupt.push(entity.to_string()),
            }
        }
    }
    Ok(out)
}

impl Dump {
    /// The dump as a table: the join key, one column per feature, and `exact`.
    pub fn to_batch(&self, plan: &SpeedPlan, join_key: &str) -> Result<RecordBatch> {
        let mut fields = vec![Field::new(join_key, DataType::Utf8, false)];
        let mut columns: Vec<ArrayRef> =
            vec![Arc::new(StringArray::from_iter_values(&self.entities))];
        for (j, f) in plan.features.iter().enumerate() {
            let values: Vec<Value> = self.values.iter().map(|r| r[j]).collect();
            fields.push(Field::new(
                &f.feature.name,
                arrow_type(f.feature.value_type),
                true,
            ));
            columns.push(value_column(f.feature.value_type, &values));
        }
        fields.push(Field::new("exact", DataType::Boolean, false));
        columns.push(Arc::new(BooleanArray::from(self.exact.clone())));
        RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)
            .map_err(|e| Error::Internal(e.to_string()))
    }
}
