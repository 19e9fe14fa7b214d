//! `duet batch run` and `duet batch backfill`: read the log once, compute tiles once, publish
//! one snapshot per requested instant.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use duet_spec::duration::floor_to;
use duet_spec::timestamp::format_ms;
use duet_spec::{Layer, Spec};
use futures::{StreamExt, TryStreamExt};
use serde::Serialize;

use crate::lease::{Lease, now_ms};
use crate::log::read_event_log;
use crate::progress::Progress;
use crate::publish::{
    Manifest, ManifestFeature, commit, encode_snapshot, enforce_retention, list_manifests,
    write_data, write_dead_letters,
};
use crate::snapshot::Snapshots;
use crate::store::resolve;
use crate::tiles::{TilePlan, compute_tiles, dedupe_batches, events_table, session};
use crate::{Error, Result};

/// What to compute.
#[derive(Debug, Clone)]
pub struct BatchJob {
    /// The offline event log.
    pub events: String,
    /// The snapshot store.
    pub store: String,
    /// The instants to publish snapshots as of, ascending.
    pub as_of: Vec<i64>,
    /// Snapshots kept per view.
    pub retain: usize,
    /// Draw progress bars (on a terminal) instead of logging stages.
    pub progress: bool,
}

/// One published snapshot.
#[derive(Debug, Clone, Serialize)]
pub struct Published {
    /// The view.
    pub view: String,
    /// As of (RFC 3339).
    pub as_of: String,
    /// Entities.
    pub rows: u64,
    /// The manifest's location.
    pub manifest: String,
}

/// What a batch job did.
#[derive(Debug, Clone, Serialize)]
pub struct BatchReport {
    /// The run's id.
    pub run_id: String,
    /// Snapshots published.
    pub snapshots: Vec<Published>,
    /// Input files read.
    pub input_files: usize,
    /// Valid records read (duplicates included).
    pub valid_events: u64,
    /// Duplicate records dropped.
    pub duplicates: u64,
    /// Invalid records by reason.
    pub invalid: BTreeMap<String, u64>,
    /// Where the invalid records were written, relative to the store.
    pub dead_letters: Option<String>,
    /// Snapshots deleted by retention.
    pub expired: Vec<String>,
    /// Wall-clock milliseconds.
    pub duration_ms: u64,
}

/// The UTC-midnight (cadence-boundary) instants in `[from, to]`.
pub fn backfill_instants(spec: &Spec, from: i64, to: i64) -> Result<Vec<i64>> {
    if from > to {
        return Err(Error::BadInput(format!(
            "--from {} is after --to {}: give the earlier date first",
            format_ms(from),
            format_ms(to)
        )));
    }
    let cadence = spec
        .views_of(Layer::Batch)
        .map(|v| v.cadence.as_ms())
        .max()
        .ok_or_else(|| Error::BadInput("the spec has no batch views".into()))?;
    let first = if floor_to(from, cadence) == from {
        from
    } else {
        floor_to(from, cadence) + cadence
    };
    Ok((0..)
        .map(|i| first + i * cadence)
        .take_while(|s| *s <= to)
        .collect())
}

fn run_id() -> String {
    format!(
        "{}-{}",
        format_ms(now_ms()).replace([':', '.'], ""),
        std::process::id()
    )
}

/// The job with each instant moved back to a cadence boundary (of the shortest cadence: UTC
/// midnight for the catalog), with a warning: snapshots are only ever as of boundaries, as the
/// catalog defines them, and an instant between two gets the snapshot a lookup at that instant
/// is served from.
fn on_boundaries(job: &BatchJob, views: &[&duet_spec::View]) -> BatchJob {
    let cadence = views
        .iter()
        .map(|v| v.cadence.as_ms())
        .min()
        .expect("batch views");
    let mut as_of: Vec<i64> = job
        .as_of
        .iter()
        .map(|&t| {
            let s = floor_to(t, cadence);
            if s != t {
                tracing::warn!(
                    "--as-of {} is not a cadence boundary: the snapshot is as of {}, the one a lookup at that instant is served from",
                    format_ms(t),
                    format_ms(s)
                );
            }
            s
        })
        .collect();
    as_of.sort_unstable();
    as_of.dedup();
    BatchJob {
        as_of,
        ..job.clone()
    }
}

/// Runs a batch job over every batch view of the spec.
pub async fn run_batch(spec: &Spec, job: &BatchJob) -> Result<BatchReport> {
    let started = Instant::now();
    let now = now_ms();
    if let Some(future) = job.as_of.iter().find(|t| **t > now) {
        return Err(Error::BadInput(format!(
            "--as-of {} is in the future: a snapshot must only see events that can no longer change",
            format_ms(*future)
        )));
    }
    if job.as_of.is_empty() {
        return Err(Error::BadInput("no snapshot instants to compute".into()));
    }
    let views: Vec<_> = spec.views_of(Layer::Batch).collect();
    if views.is_empty() {
        return Err(Error::BadInput(
            "the spec has no batch views: nothing to compute".into(),
        ));
    }
    let job = &on_boundaries(job, &views);
    let store = resolve(&job.store)?;
    let run_id = run_id();
    let progress = Progress::new(job.progress);
    let lease = Lease::acquire(&store, "batch", &run_id).await?;
    let result = run_locked(spec, job, &store, &run_id, &views, &progress, started).await;
    lease.release().await;
    progress.finish();
    result
}

#[allow(clippy::too_many_arguments)]
async fn run_locked(
    spec: &Spec,
    job: &BatchJob,
    store: &crate::store::Location,
    run_id: &str,
    views: &[&duet_spec::View],
    progress: &Progress,
    started: Instant,
) -> Result<BatchReport> {
    for view in views {
        refuse_redefinitions(store, view).await?;
    }
    progress.stage(&format!("reading events from {}", job.events));
    let log = read_event_log(&job.events).await?;
    tracing::info!(
        files = log.files.len(),
        valid = log.valid,
        invalid = log.invalid.total(),
        "read the event log"
    );
    if log.valid == 0 {
        tracing::warn!(events = %job.events, "the event log holds no valid events: snapshots will be empty");
    }
    let dead_letters = if log.dead_letters.is_empty() {
        None
    } else {
        Some(write_dead_letters(store, run_id, &log.dead_letters).await?)
    };
    let before = *job.as_of.iter().max().expect("non-empty");
    let ctx = session();
    let mut published = Vec::new();
    let mut expired = Vec::new();
    progress.stage("deduplicating events");
    let batches = log.batches.clone();
    let (kept, duplicates) = tokio::task::spawn_blocking(move || dedupe_batches(batches, before))
        .await
        .map_err(|e| Error::Internal(format!("deduplication failed: {e}")))?;
    for view in views {
        progress.stage(&format!("computing tiles of view {}", view.name));
        let plan = TilePlan::compile(view);
        let ev = events_table(&ctx, kept.clone()).await?;
        let tiles = compute_tiles(&plan, ev).await?;
        let tiles = std::sync::Arc::new(tiles);
        let plan = std::sync::Arc::new(plan);
        progress.bar(
            job.as_of.len() as u64,
            &format!("publishing snapshots of {}", view.name),
        );
        // One thread folds the instants in order, each from the one before (a snapshot refolds
        // only the entities whose windows gained or lost a tile); the snapshots it hands over
        // are encoded and written two at a time, beside it.
        let (tx, rx) =
            tokio::sync::mpsc::channel::<(i64, arrow::record_batch::RecordBatch, Duration, usize)>(
                1,
            );
        let instants = job.as_of.clone();
        let folding = {
            let (tiles, plan) = (tiles.clone(), plan.clone());
            tokio::task::spawn_blocking(move || {
                let mut snapshots = Snapshots::new(&tiles, &plan);
                for s in instants {
                    let t = Instant::now();
                    let batch = snapshots.at(s);
                    let refolded = snapshots.refolded();
                    if tx.blocking_send((s, batch, t.elapsed(), refolded)).is_err() {
                        // The writer stopped on an error, which it reports.
                        break;
                    }
                }
            })
        };
        let folded =
            futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|x| (x, rx)) });
        let manifests: Result<Vec<Manifest>> = folded
            .map(|(s, batch, fold, refolded)| {
                let log = &log;
                async move {
                    let t = Instant::now();
                    let rows = batch.num_rows();
                    let parquet = tokio::task::spawn_blocking(move || encode_snapshot(&batch))
                        .await
                        .map_err(|e| Error::Internal(format!("snapshot task failed: {e}")))??;
                    let encoded = t.elapsed();
                    let (data, data_bytes) =
                        write_data(store, &view.name, run_id, s, parquet).await?;
                    tracing::debug!(
                        as_of = %format_ms(s),
                        refolded,
                        fold_ms = fold.as_millis() as u64,
                        encode_ms = encoded.as_millis() as u64,
                        write_ms = (t.elapsed() - encoded).as_millis() as u64,
                        "snapshot"
                    );
                    let manifest = Manifest {
                        view: view.name.clone(),
                        as_of: format_ms(s),
                        as_of_ms: s,
                        join_key: view.join_key.name().to_string(),
                        spec_version: spec.version,
                        spec_fingerprint: spec.fingerprint(),
                        features: view
                            .features
                            .iter()
                            .map(|f| ManifestFeature {
                                name: f.name.clone(),
                                value_type: match f.value_type {
                                    duet_spec::ValueType::Int => "int".into(),
                                    duet_spec::ValueType::Float => "float".into(),
                                },
                                fingerprint: f.fingerprint(),
                            })
                            .collect(),
                        rows: rows as u64,
                        data,
                        data_bytes,
                        inputs: log.files.clone(),
                        valid_events: log.valid,
                        duplicates,
                        invalid: log.invalid.0.clone(),
                        invalid_total: log.invalid.total(),
                        run_id: run_id.to_string(),
                        duration_ms: started.elapsed().as_millis() as u64,
                        created_at: format_ms(now_ms()),
                        duet_version: env!("CARGO_PKG_VERSION").to_string(),
                    };
                    commit(store, &manifest).await?;
                    progress.inc();
                    Ok::<_, Error>(manifest)
                }
            })
            .buffered(2)
            .try_collect()
            .await;
        folding
            .await
            .map_err(|e| Error::Internal(format!("snapshot folding failed: {e}")))?;
        let manifests = manifests?;
        if manifests.len() != job.as_of.len() {
            return Err(Error::Internal(format!(
                "{} of {} snapshots of view {} were computed",
                manifests.len(),
                job.as_of.len(),
                view.name
            )));
        }
        for m in manifests {
            published.push(Published {
                view: m.view.clone(),
                as_of: m.as_of.clone(),
                rows: m.rows,
                manifest: format!(
                    "snapshots/{}/commits/{}.json",
                    m.view,
                    crate::publish::as_of_key(m.as_of_ms)
                ),
            });
        }
        expired.extend(enforce_retention(store, &view.name, job.retain, run_id).await?);
    }
    Ok(BatchReport {
        run_id: run_id.to_string(),
        snapshots: published,
        input_files: log.files.len(),
        valid_events: log.valid,
        duplicates,
        invalid: log.invalid.0.clone(),
        dead_letters,
        expired,
        duration_ms: started.elapsed().as_millis() as u64,
    })
}

/// Refuses to publish a feature whose definition differs from the one that made the view's
/// existing snapshots under the same name.
async fn refuse_redefinitions(
    store: &crate::store::Location,
    view: &duet_spec::View,
) -> Result<()> {
    let manifests = list_manifests(store, &view.name).await?;
    for f in &view.features {
        let fp = f.fingerprint();
        if let Some(old) = manifests.iter().find(|m| {
            m.features
                .iter()
                .any(|x| x.name == f.name && x.fingerprint != fp)
        }) {
            let next = f.version.map_or(2, |v| v + 1);
            return Err(Error::BadInput(format!(
                "feature `{}` of view `{}` has changed definition since the snapshot as of {} in {} was made: \
                 publish the new definition as a new version (`version = {next}` in the spec) so both are served side by side",
                f.name, view.name, old.as_of, store.url
            )));
        }
    }
    Ok(())
}
