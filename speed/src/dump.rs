//! `duet speed dump`: every entity's streaming features as of an instant, from the live state
//! and, for instants older than a state holds, the entity's history.

use std::sync::Arc;

use arrow::array::{ArrayRef, BooleanArray, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use duet_batch::snapshot::{arrow_type, value_column};
use duet_spec::Value;

use crate::plan::SpeedPlan;
use crate::processor::{
    entity_of, history_entity_of, history_key, history_key_prefix, state_key_prefix,
};
use crate::store::StateStore;
use crate::{Error, Result};

/// Entities whose state (or history) could be read, with their feature values as of `t`.
pub struct Dump {
    /// Entity keys, sorted.
    pub entities: Vec<String>,
    /// Per entity, one value per plan feature.
    pub values: Vec<Vec<Value>>,
    /// Per entity, whether its values are exact: `t` at or after its state's boundary, or
    /// within its history's reach.
    pub exact: Vec<bool>,
    /// Keys whose state could not be decoded.
    pub corrupt: Vec<String>,
}

/// Reads every entity's state under `prefix` and evaluates it as of `t`. When the spec keeps
/// histories and `t` is older than some state holds (or no state is left), it also reads the
/// histories it needs: those of the states that cannot answer exactly, and of the entities with
/// no state left that had an event within the streaming horizon before `t` (any other entity
/// would show only defaults).
pub async fn dump<S: StateStore>(
    store: &S,
    spec: &duet_spec::Spec,
    plan: &SpeedPlan,
    prefix: &str,
    t: i64,
) -> Result<Dump> {
    let keys = store.keys(&state_key_prefix(prefix)).await?;
    // By entity (keys start with their hash tag), so entities come out sorted by themselves.
    let mut rows: std::collections::BTreeMap<String, Row> = Default::default();
    let mut with_state = std::collections::HashSet::new();
    // The states that cannot answer exactly, kept for a second evaluation with their history.
    let mut inexact: std::collections::HashMap<String, Vec<u8>> = Default::default();
    for chunk in keys.chunks(1000) {
        let values = store.get_many(chunk).await?;
        for (key, v) in chunk.iter().zip(values) {
            let (Some(entity), Some(v)) = (entity_of(prefix, key), v) else {
                continue;
            };
            with_state.insert(entity.to_string());
            let row = match crate::history::evaluate_stored(
                spec,
                plan,
                entity,
                Some(&v.bytes),
                None,
                t,
            ) {
                Ok((values, exact)) => {
                    if !exact {
                        inexact.insert(entity.to_string(), v.bytes);
                    }
                    Row::Values(values, exact)
                }
                Err(_) => Row::Corrupt,
            };
            rows.insert(entity.to_string(), row);
        }
    }
    if plan.history > 0 && (!inexact.is_empty() || with_state.is_empty()) {
        let mut wanted: Vec<String> = inexact.keys().cloned().collect();
        for k in store.keys(&history_key_prefix(prefix)).await? {
            if let Some(entity) = history_entity_of(prefix, &k)
                && !with_state.contains(entity)
            {
                wanted.push(entity.to_string());
            }
        }
        for chunk in wanted.chunks(1000) {
            let histories: Vec<String> = chunk.iter().map(|e| history_key(prefix, e)).collect();
            let (_, read) = store.get_many_with_history(&[], &histories).await?;
            for (entity, history) in chunk.iter().zip(read) {
                let state = inexact.get(entity);
                if state.is_none() && !recent_event(entity, &history, t, plan.horizon) {
                    // No state, and nothing within the horizon before `t`: only defaults.
                    continue;
                }
                let row = match crate::history::evaluate_stored(
                    spec,
                    plan,
                    entity,
                    state.map(Vec::as_slice),
                    Some(&history),
                    t,
                ) {
                    Ok((values, exact)) => Row::Values(values, exact),
                    Err(_) => Row::Corrupt,
                };
                rows.insert(entity.clone(), row);
            }
        }
    }
    let mut out = Dump {
        entities: Vec::new(),
        values: Vec::new(),
        exact: Vec::new(),
        corrupt: Vec::new(),
    };
    for (entity, row) in rows {
        match row {
            Row::Values(values, exact) => {
                out.entities.push(entity);
                out.values.push(values);
                out.exact.push(exact);
            }
            Row::Corrupt => out.corrupt.push(entity),
        }
    }
    Ok(out)
}

/// One entity's evaluation: its values and whether they are exact, or unreadable.
enum Row {
    Values(Vec<Value>, bool),
    Corrupt,
}

/// True when the history `bytes` has an event within `horizon` before `t`; an unreadable one
/// counts as recent, so it is reported rather than skipped.
fn recent_event(entity: &str, bytes: &[u8], t: i64, horizon: i64) -> bool {
    crate::history::read(entity, bytes, t).map_or(true, |h| {
        h.events
            .last()
            .is_some_and(|e| e.ts >= t.saturating_sub(horizon))
    })
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
