//! `duet training-set`: point-in-time correct rows for entity files.

use std::sync::Arc;

use arrow::array::ArrayRef;
use arrow::datatypes::{Field, Schema};
use arrow::record_batch::RecordBatch;
use duet_spec::event::events_from_batch;
use duet_spec::reference::Reference;
use duet_spec::{Feature, Spec, Value, View};
use object_store::ObjectStoreExt;
use serde::Serialize;

use crate::entities::{EntityRows, read_entities};
use crate::log::read_event_log;
use crate::snapshot::{arrow_type, value_column};
use crate::store::resolve;
use crate::{Error, Result};

/// Which engine computes the rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// The batch layer's DataFusion plans.
    DataFusion,
    /// The reference evaluator (slow, obviously correct).
    Reference,
}

/// What `duet training-set` was asked to do.
#[derive(Debug, Clone)]
pub struct TrainingRequest {
    /// The entity file.
    pub entities: String,
    /// Where to write the rows (`.parquet` or `.csv`).
    pub out: String,
    /// Features to compute, as `feature` or `view:feature`; `None` for all.
    pub features: Option<Vec<String>>,
    /// The engine.
    pub engine: Engine,
    /// The offline event log.
    pub events: String,
    /// The snapshot store (batch features are read from it when present).
    pub store: Option<String>,
}

/// What a training-set run produced.
#[derive(Debug, Clone, Serialize)]
pub struct TrainingSummary {
    /// Rows written.
    pub rows: usize,
    /// Feature columns written.
    pub features: Vec<String>,
    /// Valid events read (duplicates included).
    pub valid_events: u64,
    /// Invalid events skipped.
    pub invalid_events: u64,
    /// Where the invalid records were written with their reasons (beside the output).
    pub dead_letters: Option<String>,
}

/// Writes the invalid records of the log beside the training set, as `<out>.dead-letters.jsonl`.
async fn write_dead_letters_beside(
    out: &str,
    dead: &[duet_spec::event::DeadLetter],
) -> Result<Option<String>> {
    if dead.is_empty() {
        return Ok(None);
    }
    let url = format!("{out}.dead-letters.jsonl");
    let loc = resolve(&url)?;
    let mut text = String::new();
    for d in dead {
        text.push_str(&d.to_json_line());
        text.push('\n');
    }
    loc.store
        .put(&loc.prefix, text.into_bytes().into())
        .await
        .map_err(|e| Error::Storage(format!("cannot write {url}: {e}")))?;
    Ok(Some(url))
}

/// Resolves requested feature names (`feature` or `view:feature`) against the spec, in the
/// order requested; `None` selects every feature in spec order.
pub fn select_features<'s>(
    spec: &'s Spec,
    names: Option<&[String]>,
) -> Result<Vec<(&'s View, &'s Feature)>> {
    let Some(names) = names else {
        return Ok(spec.features().collect());
    };
    names
        .iter()
        .map(|n| {
            let (view, feature) = match n.split_once(':') {
                Some((v, f)) => (Some(v), f),
                None => (None, n.as_str()),
            };
            spec.feature(feature)
                .filter(|(v, _)| view.is_none_or(|name| v.name == name))
                .ok_or_else(|| {
                    let known: Vec<String> = spec
                        .features()
                        .map(|(v, f)| format!("{}:{}", v.name, f.name))
                        .collect();
                    Error::BadInput(format!(
                        "--features: unknown feature `{n}` (known: {})",
                        known.join(", ")
                    ))
                })
        })
        .collect()
}

/// Builds one Arrow column per feature from row-major values.
pub fn feature_columns(
    features: &[(&View, &Feature)],
    rows: &[Vec<Value>],
) -> Vec<(Field, ArrayRef)> {
    features
        .iter()
        .enumerate()
        .map(|(j, (_, f))| {
            let values: Vec<Value> = rows.iter().map(|r| r[j]).collect();
            (
                Field::new(&f.name, arrow_type(f.value_type), true),
                value_column(f.value_type, &values),
            )
        })
        .collect()
}

/// The input columns followed by the feature columns.
pub fn with_features(
    source: &str,
    entities: &EntityRows,
    columns: Vec<(Field, ArrayRef)>,
) -> Result<RecordBatch> {
    let mut fields: Vec<Field> = entities
        .batch
        .schema()
        .fields()
        .iter()
        .map(|f| f.as_ref().clone())
        .collect();
    let mut arrays: Vec<ArrayRef> = entities.batch.columns().to_vec();
    for (f, a) in columns {
        if fields.iter().any(|x| x.name() == f.name()) {
            return Err(Error::BadInput(format!(
                "--entities {source}: the input already has a column named `{}`; rename it or leave the feature out",
                f.name()
            )));
        }
        fields.push(f);
        arrays.push(a);
    }
    RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays)
        .map_err(|e| Error::Internal(e.to_string()))
}

/// Computes training rows with the reference evaluator.
pub async fn reference_training_set(spec: &Spec, req: &TrainingRequest) -> Result<TrainingSummary> {
    let features = select_features(spec, req.features.as_deref())?;
    let join_key = features
        .first()
        .map_or("user_id", |(v, _)| v.join_key.name());
    let entities = read_entities(&req.entities, join_key).await?;
    let log = read_event_log(&req.events).await?;
    let events = log.batches.iter().flat_map(events_from_batch).collect();
    let rows: Vec<Vec<Value>> = tokio::task::block_in_place(|| {
        let reference = Reference::new(spec, events);
        entities
            .keys
            .iter()
            .zip(&entities.ts)
            .map(|(k, t)| reference.point_in_time(&features, k, *t))
            .collect()
    });
    let batch = with_features(&req.entities, &entities, feature_columns(&features, &rows))?;
    write_table(&req.out, &batch).await?;
    Ok(TrainingSummary {
        rows: batch.num_rows(),
        features: features.iter().map(|(_, f)| f.name.clone()).collect(),
        valid_events: log.valid,
        invalid_events: log.invalid.total(),
        dead_letters: write_dead_letters_beside(&req.out, &log.dead_letters).await?,
    })
}

/// Computes training rows with DataFusion: streaming features exactly as of each row's time,
/// batch features from the snapshot at the view's cadence boundary at or before it (read from
/// the store when published with the same definition, computed from tiles otherwise).
pub async fn datafusion_training_set(
    spec: &Spec,
    req: &TrainingRequest,
) -> Result<TrainingSummary> {
    let features = select_features(spec, req.features.as_deref())?;
    let join_key = features
        .first()
        .map_or("user_id", |(v, _)| v.join_key.name());
    // Shared with the streaming features' task (see below).
    let entities = Arc::new(read_entities(&req.entities, join_key).await?);
    let mut log = read_event_log(&req.events).await?;
    let (valid_events, invalid_events) = (log.valid, log.invalid.total());
    let dead = std::mem::take(&mut log.dead_letters);
    let ctx = crate::tiles::session();
    let before = entities
        .ts
        .iter()
        .copied()
        .max()
        .map_or(i64::MIN, |t| t.saturating_add(1));
    let ev = crate::tiles::deduplicated_events(&ctx, log.batches, before).await?;
    let streaming: Vec<(&View, &Feature)> = features
        .iter()
        .copied()
        .filter(|(v, _)| v.layer == duet_spec::Layer::Streaming)
        .collect();
    let started = std::time::Instant::now();
    // The streaming features are computed on a task of their own, beside the batch ones: each
    // computation leaves a core idle part of the time.
    let streaming_task = {
        let owned: Vec<(View, Feature)> = streaming
            .iter()
            .map(|(v, f)| ((*v).clone(), (*f).clone()))
            .collect();
        let (ctx, ev) = (ctx.clone(), ev.clone());
        let entities = entities.clone();
        tokio::spawn(async move {
            let features: Vec<(&View, &Feature)> = owned.iter().map(|(v, f)| (v, f)).collect();
            let columns =
                crate::asof::streaming_as_of(&ctx, ev, &entities.keys, &entities.ts, &features)
                    .await?;
            tracing::debug!(
                ms = started.elapsed().as_millis() as u64,
                features = features.len(),
                "streaming features computed"
            );
            Ok::<_, Error>(columns)
        })
    };
    let batch_columns = async {
        let store = req.store.as_deref().map(resolve).transpose()?;
        let mut by_name: std::collections::HashMap<String, ArrayRef> = Default::default();
        for view in spec.views_of(duet_spec::Layer::Batch) {
            let wanted: Vec<&Feature> = features
                .iter()
                .filter(|(v, _)| v.name == view.name)
                .map(|(_, f)| *f)
                .collect();
            if wanted.is_empty() {
                continue;
            }
            let values =
                crate::pit::batch_values(view, &wanted, &entities, ev.clone(), store.as_ref())
                    .await?;
            for (f, col) in wanted.iter().zip(values) {
                by_name.insert(f.name.clone(), col);
            }
        }
        tracing::debug!(
            ms = started.elapsed().as_millis() as u64,
            "batch features computed"
        );
        Ok::<_, Error>(by_name)
    }
    .await;
    let mut by_name = match batch_columns {
        Ok(by_name) => by_name,
        Err(e) => {
            streaming_task.abort();
            return Err(e);
        }
    };
    let streaming_cols = streaming_task
        .await
        .map_err(|e| Error::Internal(format!("computing the streaming features failed: {e}")))??;
    by_name.extend(
        streaming
            .iter()
            .zip(streaming_cols)
            .map(|((_, f), c)| (f.name.clone(), c)),
    );
    let columns = features
        .iter()
        .map(|(_, f)| {
            (
                Field::new(&f.name, arrow_type(f.value_type), true),
                by_name[&f.name].clone(),
            )
        })
        .collect();
    let batch = with_features(&req.entities, &entities, columns)?;
    write_table(&req.out, &batch).await?;
    tracing::debug!(
        ms = started.elapsed().as_millis() as u64,
        "training set written"
    );
    Ok(TrainingSummary {
        rows: batch.num_rows(),
        features: features.iter().map(|(_, f)| f.name.clone()).collect(),
        valid_events,
        invalid_events,
        dead_letters: write_dead_letters_beside(&req.out, &dead).await?,
    })
}

/// Writes a table as Parquet, or CSV when `url` ends in `.csv`.
pub async fn write_table(url: &str, batch: &RecordBatch) -> Result<()> {
    let loc = resolve(url)?;
    let mut buf = Vec::new();
    if url.ends_with(".csv") {
        let mut w = arrow::csv::WriterBuilder::new()
            .with_header(true)
            .build(&mut buf);
        w.write(batch).map_err(|e| Error::Internal(e.to_string()))?;
    } else {
        let mut w = parquet::arrow::ArrowWriter::try_new(&mut buf, batch.schema(), None)
            .map_err(|e| Error::Internal(e.to_string()))?;
        w.write(batch).map_err(|e| Error::Internal(e.to_string()))?;
        w.close().map_err(|e| Error::Internal(e.to_string()))?;
    }
    if let Some(parent) = local_parent(url) {
        std::fs::create_dir_all(parent)
            .map_err(|e| Error::Storage(format!("cannot create {}: {e}", parent.display())))?;
    }
    loc.store
        .put(&loc.prefix, buf.into())
        .await
        .map_err(|e| Error::Storage(format!("cannot write {url}: {e}")))?;
    Ok(())
}

fn local_parent(url: &str) -> Option<&std::path::Path> {
    if url.contains("://") && !url.starts_with("file://") {
        return None;
    }
    std::path::Path::new(url.strip_prefix("file://").unwrap_or(url))
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
}
