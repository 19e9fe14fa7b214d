//! # duet-check: the nightly proof that batch, speed and serving agree
//!
//! Two comparisons, both against a recomputation from the offline event log with the batch
//! layer's DataFusion engine: the speed layer's live state as of an instant (every entity),
//! and the serving layer's sampled log of answered vectors (each point in time). Every
//! disagreement outside a feature's tolerance is counted and, where the evidence allows,
//! given a cause. The result is a self-contained HTML page and the same in JSON.

pub mod evidence;
pub mod report;
pub mod stats;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray};
use arrow::datatypes::{Float64Type, Int64Type};
use duet_batch::entities::EntityRows;
use duet_batch::log::read_event_log;
use duet_batch::store::resolve;
use duet_spec::duration::floor_to;
use duet_spec::timestamp::format_ms;
use duet_spec::{Extent, Feature, Layer, Spec, Value, ValueType, View};
use duet_speed::plan::SpeedPlan;
use duet_speed::processor::stats_key;
use duet_speed::store::{AnyStore, StateStore};
use serde::{Deserialize, Serialize};

use crate::evidence::Evidence;
use crate::stats::FeatureStats;

/// What can go wrong while checking.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad flags or inputs.
    #[error("{0}")]
    BadInput(String),
    /// A layer could not be read.
    #[error("{0}")]
    Read(String),
}

impl Error {
    /// True when the user's input is at fault (exit status 2).
    pub fn is_bad_input(&self) -> bool {
        matches!(self, Error::BadInput(_))
    }
}

impl From<duet_batch::Error> for Error {
    fn from(e: duet_batch::Error) -> Self {
        if e.is_bad_input() {
            Error::BadInput(e.to_string())
        } else {
            Error::Read(e.to_string())
        }
    }
}

impl From<duet_speed::Error> for Error {
    fn from(e: duet_speed::Error) -> Self {
        if e.is_bad_input() {
            Error::BadInput(e.to_string())
        } else {
            Error::Read(e.to_string())
        }
    }
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What to check.
#[derive(Debug, Clone)]
pub struct CheckRequest {
    /// The instant the speed layer's state is compared as of.
    pub as_of: i64,
    /// The offline event log.
    pub events: String,
    /// The snapshot store (also holds the served log and past reports).
    pub store: String,
    /// The speed layer's state.
    pub redis: String,
    /// Its key prefix.
    pub prefix: String,
    /// Where to write `report.html` and `report.json`.
    pub report_dir: PathBuf,
    /// Kafka, to tell events that never reached it from late ones.
    pub kafka: Option<(String, String)>,
    /// Largest mismatch rate a feature may have and still pass.
    pub max_mismatch_rate: f64,
}

/// One comparison (speed state, or served log).
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Section {
    /// What was compared.
    pub description: String,
    /// Entities (state) or logged vectors (served).
    pub items: u64,
    /// Per feature.
    pub features: Vec<FeatureStats>,
}

/// The whole report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// As of (RFC 3339).
    pub as_of: String,
    /// As of, epoch ms.
    pub as_of_ms: i64,
    /// When the report was made.
    pub generated_at: String,
    /// The speed layer's state against the offline log.
    pub state: Section,
    /// The served log against the offline log.
    pub served: Section,
    /// The speed layer's own counters (applied, duplicates, late, invalid_*).
    pub speed_counters: BTreeMap<String, i64>,
    /// Whether Kafka was read to classify causes.
    pub kafka_compared: bool,
    /// Largest mismatch rate allowed.
    pub max_mismatch_rate: f64,
    /// True when every feature passed.
    pub ok: bool,
    /// Per earlier report (oldest first): as of and per-feature mismatch rates.
    pub trend: Vec<TrendPoint>,
}

/// One earlier report, for the trend chart.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrendPoint {
    /// As of.
    pub as_of: String,
    /// `view:feature` → mismatch rate (state and served combined).
    pub rates: BTreeMap<String, f64>,
}

/// Runs the check against the speed layer's state at `req.redis` and writes the report.
pub async fn run_check(spec: &Spec, req: &CheckRequest) -> Result<Report> {
    let state = AnyStore::open(&req.redis, std::time::Duration::from_secs(5)).await?;
    run_check_with(spec, req, &state).await
}

/// Runs the check against an already open state store (the embedded demo's memory store).
pub async fn run_check_with(spec: &Spec, req: &CheckRequest, state: &AnyStore) -> Result<Report> {
    let store_loc = resolve(&req.store)?;
    let plan = SpeedPlan::compile(spec);
    tracing::info!(events = %req.events, "reading the offline log");
    let log = read_event_log(&req.events).await?;
    let ctx = duet_batch::tiles::session();
    let served_records = duet_serving::served_log::read_all(&store_loc).await?;
    let before = served_records
        .iter()
        .map(|r| r.as_of_ms)
        .max()
        .unwrap_or(i64::MIN)
        .max(req.as_of)
        .saturating_add(1);
    let ev = duet_batch::tiles::deduplicated_events(&ctx, log.batches.clone(), before).await?;
    let counters: BTreeMap<String, i64> = state
        .counters(&stats_key(&req.prefix))
        .await?
        .into_iter()
        .collect();
    let evidence = Evidence::gather(
        &log,
        req.kafka.as_ref(),
        *counters.get("late").unwrap_or(&0),
    )
    .await?;

    tracing::info!("comparing the speed layer's state");
    let streaming: Vec<(&View, &Feature)> = spec
        .features()
        .filter(|(v, _)| v.layer == Layer::Streaming)
        .collect();
    let dump = duet_speed::dump::dump(state, spec, &plan, &req.prefix, req.as_of).await?;
    let mut entities: Vec<String> = dump.entities.clone();
    entities.extend(dump.corrupt.iter().cloned());
    entities.extend(evidence.active_entities(req.as_of - plan.horizon, req.as_of));
    entities.sort();
    entities.dedup();
    let times = vec![req.as_of; entities.len()];
    let expected =
        duet_batch::asof::streaming_as_of(&ctx, ev.clone(), &entities, &times, &streaming).await?;
    let in_dump: HashMap<&str, usize> = dump
        .entities
        .iter()
        .enumerate()
        .map(|(i, e)| (e.as_str(), i))
        .collect();
    let corrupt: HashSet<&str> = dump.corrupt.iter().map(String::as_str).collect();
    let mut state_stats = Vec::new();
    for (j, (view, f)) in streaming.iter().enumerate() {
        let mut st = FeatureStats::new(&view.name, &f.name);
        let si = plan
            .features
            .iter()
            .position(|x| x.feature.name == f.name)
            .expect("planned");
        for (i, e) in entities.iter().enumerate() {
            let actual = match in_dump.get(e.as_str()) {
                Some(&k) => dump.values[k][si],
                None if corrupt.contains(e.as_str()) => Value::Null,
                None => f.default,
            };
            let exp = value_at(&expected[j], i, f.value_type);
            st.add(&f.tolerance, actual, exp, e, req.as_of, || {
                if corrupt.contains(e.as_str()) {
                    "corrupt_state".into()
                } else if in_dump.get(e.as_str()).is_some_and(|k| !dump.exact[*k]) {
                    "as_of_before_state_boundary".into()
                } else {
                    evidence.classify(e, window(f, req.as_of), in_dump.contains_key(e.as_str()))
                }
            });
        }
        st.finish(req.max_mismatch_rate);
        state_stats.push(st);
    }

    tracing::info!(records = served_records.len(), "comparing the served log");
    let served_stats = served_section(
        spec,
        &ctx,
        ev,
        &store_loc,
        &served_records,
        &evidence,
        req.max_mismatch_rate,
    )
    .await?;

    let previous = report::previous_reports(&store_loc).await;
    let mut report = Report {
        as_of: format_ms(req.as_of),
        as_of_ms: req.as_of,
        generated_at: format_ms(duet_speed::now_ms()),
        state: Section {
            description: format!(
                "speed layer state (prefix `{}`) as of {} against the offline log",
                req.prefix,
                format_ms(req.as_of)
            ),
            items: entities.len() as u64,
            features: state_stats,
        },
        served: Section {
            description: "served-feature log against point-in-time recomputation".into(),
            items: served_records.len() as u64,
            features: served_stats,
        },
        speed_counters: counters,
        kafka_compared: req.kafka.is_some(),
        max_mismatch_rate: req.max_mismatch_rate,
        ok: true,
        trend: previous,
    };
    report.ok = report
        .state
        .features
        .iter()
        .chain(&report.served.features)
        .all(|f| f.ok);
    report::write(&report, &req.report_dir, &store_loc).await?;
    Ok(report)
}

/// The time range whose events decide a feature as of `t`.
fn window(f: &Feature, t: i64) -> (i64, i64) {
    let lookback = match f.extent {
        Extent::Sliding { window, resolution } => window.as_ms() + resolution.as_ms(),
        Extent::Recent { ttl } => ttl.as_ms(),
        Extent::Session { gap } => gap.as_ms() * 48,
        Extent::AllHistory => i64::MAX / 4,
    };
    (t.saturating_sub(lookback), t)
}

fn value_at(col: &ArrayRef, i: usize, ty: ValueType) -> Value {
    if col.is_null(i) {
        return Value::Null;
    }
    match ty {
        ValueType::Int => Value::Int(col.as_primitive::<Int64Type>().value(i)),
        ValueType::Float => Value::Float(col.as_primitive::<Float64Type>().value(i)),
    }
}

async fn served_section(
    spec: &Spec,
    ctx: &datafusion::prelude::SessionContext,
    ev: datafusion::prelude::DataFrame,
    store: &duet_batch::store::Location,
    records: &[duet_serving::served_log::ServedRecord],
    evidence: &Evidence,
    max_rate: f64,
) -> Result<Vec<FeatureStats>> {
    let keys: Vec<String> = records.iter().map(|r| r.entity.clone()).collect();
    let times: Vec<i64> = records.iter().map(|r| r.as_of_ms).collect();
    let mut out = Vec::new();
    if records.is_empty() {
        return Ok(out);
    }
    let streaming: Vec<(&View, &Feature)> = spec
        .features()
        .filter(|(v, _)| v.layer == Layer::Streaming)
        .collect();
    let stream_cols =
        duet_batch::asof::streaming_as_of(ctx, ev.clone(), &keys, &times, &streaming).await?;
    let mut expected: HashMap<String, ArrayRef> = streaming
        .iter()
        .zip(stream_cols)
        .map(|((_, f), c)| (f.name.clone(), c))
        .collect();
    let rows = EntityRows {
        batch: arrow::record_batch::RecordBatch::new_empty(Arc::new(
            arrow::datatypes::Schema::empty(),
        )),
        keys: keys.clone(),
        ts: times.clone(),
    };
    for view in spec.views_of(Layer::Batch) {
        let wanted: Vec<&Feature> = view.features.iter().collect();
        let cols =
            duet_batch::pit::batch_values(view, &wanted, &rows, ev.clone(), Some(store)).await?;
        for (f, c) in wanted.iter().zip(cols) {
            expected.insert(f.name.clone(), c);
        }
    }
    for (view, f) in spec.features() {
        let mut st = FeatureStats::new(&view.name, &f.name);
        let col = &expected[&f.name];
        for (i, r) in records.iter().enumerate() {
            let Some(actual) = r.values.get(&f.name) else {
                continue;
            };
            let exp = value_at(col, i, f.value_type);
            st.add(
                &f.tolerance,
                *actual,
                exp,
                &r.entity,
                r.as_of_ms,
                || match view.layer {
                    Layer::Batch => {
                        let s = floor_to(r.as_of_ms, view.cadence.as_ms());
                        match r.snapshots.get(&view.name) {
                            None => "missing_snapshot".into(),
                            Some(used) if *used < s => "stale_snapshot".into(),
                            Some(_) => "snapshot_differs_from_log".into(),
                        }
                    }
                    Layer::Streaming => evidence.classify(&r.entity, window(f, r.as_of_ms), true),
                },
            );
        }
        st.finish(max_rate);
        out.push(st);
    }
    Ok(out)
}
