//! The batch side: each batch view's newest snapshot, held in memory in a compact columnar
//! form and swapped atomically when a newer one is published.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use arrow::array::{AsArray, RecordBatch};
use arrow::datatypes::{Float64Type, Int64Type};
use duet_batch::publish::{Manifest, latest_manifest, manifest_at, read_snapshot};
use duet_batch::store::Location;
use duet_spec::{Value, ValueType, View};

use crate::api::Stamp;
use crate::{Error, Result};

/// How one feature of a loaded snapshot is held.
#[derive(Clone, Copy)]
enum Kind {
    Int,
    Float,
    /// Not in the snapshot's file (always null).
    Missing,
}

/// A snapshot in memory: rows by key, and each row's feature values side by side, so one
/// entity's vector is read from one or two cache lines.
pub struct LoadedSnapshot {
    /// Its manifest.
    pub manifest: Manifest,
    /// Its as-of instant, as the responses' time stamps write it.
    pub stamp: Stamp,
    rows: HashMap<Box<str>, u32, foldhash::fast::RandomState>,
    kinds: Vec<Kind>,
    /// Words per row: the presence bits of the features, then one value per feature (the bits
    /// of an `i64` or an `f64`).
    width: usize,
    cells: Vec<u64>,
    /// Approximate heap bytes held.
    pub bytes: usize,
}

impl LoadedSnapshot {
    /// Builds the in-memory form of a snapshot's rows for `view`'s features.
    pub fn build(
        view: &View,
        manifest: Manifest,
        batches: &[RecordBatch],
    ) -> Result<LoadedSnapshot> {
        let features = view.features.len();
        let mask_words = features.div_ceil(64);
        let width = mask_words + features;
        let Some(schema) = batches.first().map(|b| b.schema()) else {
            return Ok(LoadedSnapshot {
                stamp: Stamp::new(&manifest.as_of),
                manifest,
                rows: HashMap::default(),
                kinds: vec![Kind::Missing; features],
                width,
                cells: Vec::new(),
                bytes: 0,
            });
        };
        let batch = arrow::compute::concat_batches(&schema, batches)
            .map_err(|e| Error::Internal(e.to_string()))?;
        let n = batch.num_rows();
        let keys = batch.column(0).as_string::<i32>();
        let mut rows = HashMap::with_capacity_and_hasher(n, Default::default());
        let mut bytes = 0;
        for i in 0..n {
            let k: Box<str> = keys.value(i).into();
            bytes += k.len() + 16 + 8;
            rows.insert(k, i as u32);
        }
        let mut kinds = Vec::with_capacity(features);
        let mut cells = vec![0u64; n * width];
        for (j, f) in view.features.iter().enumerate() {
            let column = batch.column_by_name(&f.name);
            let kind = match (column, f.value_type) {
                (Some(_), ValueType::Int) => Kind::Int,
                (Some(_), ValueType::Float) => Kind::Float,
                (None, _) => Kind::Missing,
            };
            kinds.push(kind);
            let Some(c) = column else { continue };
            let (word, bit) = (j / 64, 1u64 << (j % 64));
            let mut put = |row: usize, v: Option<u64>| {
                if let Some(v) = v {
                    cells[row * width + word] |= bit;
                    cells[row * width + mask_words + j] = v;
                }
            };
            match kind {
                Kind::Int => {
                    for (row, v) in c.as_primitive::<Int64Type>().iter().enumerate() {
                        put(row, v.map(|v| v as u64));
                    }
                }
                Kind::Float => {
                    for (row, v) in c.as_primitive::<Float64Type>().iter().enumerate() {
                        put(row, v.map(f64::to_bits));
                    }
                }
                Kind::Missing => {}
            }
        }
        bytes += cells.len() * 8;
        Ok(LoadedSnapshot {
            stamp: Stamp::new(&manifest.as_of),
            manifest,
            rows,
            kinds,
            width,
            cells,
            bytes,
        })
    }

    /// Entities held.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// True when the snapshot holds no entity.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Feature `index`'s value for `key`, or `None` when the entity is not in the snapshot.
    pub fn value(&self, key: &str, index: usize) -> Option<Value> {
        Some(self.value_at(self.row(key)?, index))
    }

    /// The row of `key`, when the entity is in the snapshot.
    pub fn row(&self, key: &str) -> Option<usize> {
        self.rows.get(key).map(|r| *r as usize)
    }

    /// Feature `index`'s value in `row` (from [`LoadedSnapshot::row`]).
    pub fn value_at(&self, row: usize, index: usize) -> Value {
        let cells = &self.cells[row * self.width..(row + 1) * self.width];
        if cells[index / 64] & (1u64 << (index % 64)) == 0 {
            return Value::Null;
        }
        // The presence words come first (see `build`).
        let v = cells[self.width - self.kinds.len() + index];
        match self.kinds[index] {
            Kind::Int => Value::Int(v as i64),
            Kind::Float => Value::Float(f64::from_bits(v)),
            Kind::Missing => Value::Null,
        }
    }
}

/// Snapshots of one batch view: the newest, swapped in place, and a few older ones for
/// requests `as_of` the past.
pub struct ViewSnapshots {
    /// The view.
    pub view: View,
    current: ArcSwapOption<LoadedSnapshot>,
    past: std::sync::Mutex<Vec<Arc<LoadedSnapshot>>>,
}

const PAST_KEPT: usize = 4;

impl ViewSnapshots {
    /// No snapshot loaded yet.
    pub fn new(view: View) -> Self {
        ViewSnapshots {
            view,
            current: ArcSwapOption::empty(),
            past: Default::default(),
        }
    }

    /// The newest loaded snapshot.
    pub fn current(&self) -> Option<Arc<LoadedSnapshot>> {
        self.current.load_full()
    }

    /// Loads the newest published snapshot if it is newer than the one held; returns true when
    /// it swapped. Requests in flight keep the snapshot they started with.
    pub async fn refresh(&self, store: &Location) -> Result<bool> {
        let Some(manifest) = latest_manifest(store, &self.view.name)
            .await
            .map_err(Error::Batch)?
        else {
            return Ok(false);
        };
        if let Some(cur) = self.current.load_full()
            && cur.manifest.as_of_ms == manifest.as_of_ms
            && cur.manifest.run_id == manifest.run_id
        {
            return Ok(false);
        }
        let loaded = self.load(store, manifest).await?;
        tracing::info!(view = %self.view.name, as_of = %loaded.manifest.as_of, entities = loaded.len(), bytes = loaded.bytes, "snapshot loaded");
        self.current.store(Some(Arc::new(loaded)));
        Ok(true)
    }

    async fn load(&self, store: &Location, manifest: Manifest) -> Result<LoadedSnapshot> {
        let batches = read_snapshot(store, &manifest)
            .await
            .map_err(Error::Batch)?;
        let view = self.view.clone();
        tokio::task::spawn_blocking(move || LoadedSnapshot::build(&view, manifest, &batches))
            .await
            .map_err(|e| Error::Internal(e.to_string()))?
    }

    /// The snapshot as of exactly `s`: the current one, a cached past one, or one read from
    /// the store; `None` when none was published for `s`.
    pub async fn at(&self, store: &Location, s: i64) -> Result<Option<Arc<LoadedSnapshot>>> {
        if let Some(cur) = self.current()
            && cur.manifest.as_of_ms == s
        {
            return Ok(Some(cur));
        }
        if let Some(p) = self
            .past
            .lock()
            .expect("not poisoned")
            .iter()
            .find(|p| p.manifest.as_of_ms == s)
        {
            return Ok(Some(p.clone()));
        }
        let Some(manifest) = manifest_at(store, &self.view.name, s)
            .await
            .map_err(Error::Batch)?
        else {
            return Ok(None);
        };
        let loaded = Arc::new(self.load(store, manifest).await?);
        let mut past = self.past.lock().expect("not poisoned");
        past.push(loaded.clone());
        if past.len() > PAST_KEPT {
            past.remove(0);
        }
        Ok(Some(loaded))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{ArrayRef, Float64Array, Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};

    use super::*;

    fn manifest() -> Manifest {
        serde_json::from_value(serde_json::json!({
            "view": "v", "as_of": "2026-12-01T00:00:00Z", "as_of_ms": 1_796_083_200_000i64,
            "join_key": "user_id", "spec_version": 1, "spec_fingerprint": "f", "features": [],
            "rows": 3, "data": "d", "data_bytes": 0, "inputs": [], "valid_events": 0,
            "duplicates": 0, "invalid": {}, "invalid_total": 0, "run_id": "r", "duration_ms": 0,
            "created_at": "2026-12-01T00:00:00Z", "duet_version": "0"
        }))
        .unwrap()
    }

    /// A view of `n` features alternating int and float, and a batch holding every other one.
    fn wide(n: usize) -> (View, RecordBatch) {
        let spec = duet_spec::parse_spec("catalog.toml", duet_spec::CATALOG).unwrap();
        let mut view = spec.view("user_batch").unwrap().clone();
        let template = view.features[0].clone();
        view.features = (0..n)
            .map(|j| {
                let mut f = template.clone();
                f.name = format!("f{j}");
                f.value_type = if j % 2 == 0 {
                    ValueType::Int
                } else {
                    ValueType::Float
                };
                f
            })
            .collect();
        let mut fields = vec![Field::new("user_id", DataType::Utf8, false)];
        let mut columns: Vec<ArrayRef> = vec![Arc::new(StringArray::from(vec!["a", "b", "c"]))];
        for j in (0..n).filter(|j| j % 3 != 2) {
            let name = format!("f{j}");
            if j % 2 == 0 {
                fields.push(Field::new(&name, DataType::Int64, true));
                let base = j as i64;
                columns.push(Arc::new(Int64Array::from(vec![
                    Some(base),
                    None,
                    Some(-base),
                ])));
            } else {
                fields.push(Field::new(&name, DataType::Float64, true));
                let base = j as f64 + 0.5;
                columns.push(Arc::new(Float64Array::from(vec![
                    None,
                    Some(base),
                    Some(-base),
                ])));
            }
        }
        let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).unwrap();
        (view, batch)
    }

    #[test]
    fn every_value_null_and_missing_column_reads_back() {
        for n in [1, 8, 64, 65, 130] {
            let (view, batch) = wide(n);
            let s = LoadedSnapshot::build(&view, manifest(), &[batch]).unwrap();
            assert_eq!(s.len(), 3);
            assert_eq!(s.value("zz", 0), None, "absent entity");
            for j in 0..n {
                let got: Vec<Value> = ["a", "b", "c"]
                    .iter()
                    .map(|k| s.value(k, j).unwrap())
                    .collect();
                let want = if j % 3 == 2 {
                    vec![Value::Null; 3]
                } else if j % 2 == 0 {
                    let b = j as i64;
                    vec![Value::Int(b), Value::Null, Value::Int(-b)]
                } else {
                    let b = j as f64 + 0.5;
                    vec![Value::Null, Value::Float(b), Value::Float(-b)]
                };
                assert_eq!(got, want, "{n} features, feature {j}");
            }
        }
    }

    #[test]
    fn an_empty_snapshot_has_no_rows() {
        let (view, _) = wide(3);
        let s = LoadedSnapshot::build(&view, manifest(), &[]).unwrap();
        assert!(s.is_empty());
        assert_eq!(s.value("a", 0), None);
    }
}
