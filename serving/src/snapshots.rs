//! The batch side: each batch view's newest snapshot, held in memory in a compact columnar
//! form and swapped atomically when a newer one is published.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{Float64Type, Int64Type};
use duet_batch::publish::{Manifest, latest_manifest, manifest_at, read_snapshot};
use duet_batch::store::Location;
use duet_spec::{Value, ValueType, View};

use crate::{Error, Result};

/// One feature column of a loaded snapshot.
enum Column {
    Int(arrow::array::Int64Array),
    Float(arrow::array::Float64Array),
    Missing,
}

/// A snapshot in memory: rows by key, one typed column per feature of the view.
pub struct LoadedSnapshot {
    /// Its manifest.
    pub manifest: Manifest,
    rows: HashMap<Box<str>, u32>,
    columns: Vec<Column>,
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
        let schema = match batches.first() {
            Some(b) => b.schema(),
            None => {
                return Ok(LoadedSnapshot {
                    manifest,
                    rows: HashMap::new(),
                    columns: view.features.iter().map(|_| Column::Missing).collect(),
                    bytes: 0,
                });
            }
        };
        let batch = arrow::compute::concat_batches(&schema, batches)
            .map_err(|e| Error::Internal(e.to_string()))?;
        let keys = batch.column(0).as_string::<i32>();
        let mut rows = HashMap::with_capacity(batch.num_rows());
        let mut bytes = 0;
        for i in 0..batch.num_rows() {
            let k: Box<str> = keys.value(i).into();
            bytes += k.len() + 16 + 8;
            rows.insert(k, i as u32);
        }
        let columns = view
            .features
            .iter()
            .map(|f| match (batch.column_by_name(&f.name), f.value_type) {
                (Some(c), ValueType::Int) => Column::Int(c.as_primitive::<Int64Type>().clone()),
                (Some(c), ValueType::Float) => {
                    Column::Float(c.as_primitive::<Float64Type>().clone())
                }
                (None, _) => Column::Missing,
            })
            .collect::<Vec<_>>();
        bytes += columns
            .iter()
            .map(|c| match c {
                Column::Int(a) => a.get_array_memory_size(),
                Column::Float(a) => a.get_array_memory_size(),
                Column::Missing => 0,
            })
            .sum::<usize>();
        Ok(LoadedSnapshot {
            manifest,
            rows,
            columns,
            bytes,
        })
    }

    /// Entities held.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// True when no entity is held.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Feature `index`'s value for `key`, or `None` when the entity is not in the snapshot.
    pub fn value(&self, key: &str, index: usize) -> Option<Value> {
        let row = *self.rows.get(key)? as usize;
        Some(match &self.columns[index] {
            Column::Int(a) if a.is_valid(row) => Value::Int(a.value(row)),
            Column::Float(a) if a.is_valid(row) => Value::Float(a.value(row)),
            _ => Value::Null,
        })
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
