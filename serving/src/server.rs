//! The HTTP server: routes, the merge of batch snapshots with streaming state, readiness,
//! metrics, and the snapshot watcher.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use duet_batch::store::Location;
use duet_spec::duration::floor_to;
use duet_spec::timestamp::{format_ms, parse_rfc3339_ms};
use duet_spec::{Layer, Spec, Value};
use duet_speed::metrics::{Counter, Histogram, LATENCY_BUCKETS};
use duet_speed::plan::SpeedPlan;
use duet_speed::processor::state_key;
use duet_speed::state::EntityState;
use duet_speed::store::{AnyStore, StateStore};
use serde_json::Value as J;
use tokio_util::sync::CancellationToken;

use crate::api::{
    ApiError, FeastColumn, FeastRequest, FeastResponse, Metadata, Resolved, Stamp, openapi, resolve,
};
use crate::served_log::{ServedLog, ServedRecord};
use crate::snapshots::ViewSnapshots;
use crate::{Error, Result};

/// Settings of `duet serve`.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Key prefix of the speed layer's state.
    pub prefix: String,
    /// Most entities in one request.
    pub max_entities: usize,
    /// Largest request body in bytes.
    pub max_body_bytes: usize,
    /// Bearer token required on feature endpoints, if set.
    pub auth_token: Option<String>,
    /// Longest wait for Redis before streaming features fail.
    pub redis_timeout: Duration,
    /// How often to look for a newer snapshot.
    pub snapshot_poll: Duration,
    /// Single-threaded workers serving connections, each with its own Redis connection.
    pub workers: usize,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            prefix: "duet:".into(),
            max_entities: 1000,
            max_body_bytes: 1 << 20,
            auth_token: None,
            redis_timeout: Duration::from_millis(200),
            snapshot_poll: Duration::from_secs(5),
            workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }
}

#[derive(Default)]
struct ServeMetrics {
    requests: Counter,
    errors_4xx: Counter,
    entities: Counter,
    redis_errors: Counter,
    corrupt_states: Counter,
    swaps: Counter,
    not_exact: AtomicU64,
    latency: Option<Histogram>,
}

/// What one worker's handlers hold: the shared state, and the worker's own Redis connection.
struct Worker {
    app: Arc<App>,
    state: AnyStore,
}

/// Everything a request needs.
pub struct App {
    spec: Spec,
    plan: SpeedPlan,
    views: Vec<Option<Arc<ViewSnapshots>>>,
    store: Location,
    state: AnyStore,
    config: ServeConfig,
    log: Option<ServedLog>,
    metrics: ServeMetrics,
    started: Instant,
}

impl App {
    /// Builds the server's state: loads the newest snapshot of every batch view (absent ones
    /// make the server not ready until published).
    pub async fn new(
        spec: Spec,
        store: Location,
        state: AnyStore,
        config: ServeConfig,
        log: Option<ServedLog>,
    ) -> Result<Arc<App>> {
        let plan = SpeedPlan::compile(&spec);
        let views: Vec<Option<Arc<ViewSnapshots>>> = spec
            .views
            .iter()
            .map(|v| (v.layer == Layer::Batch).then(|| Arc::new(ViewSnapshots::new(v.clone()))))
            .collect();
        for v in views.iter().flatten() {
            if let Err(e) = v.refresh(&store).await {
                tracing::warn!(view = %v.view.name, error = %e, "no snapshot loaded yet");
            }
        }
        Ok(Arc::new(App {
            spec,
            plan,
            views,
            store,
            state,
            config,
            log,
            metrics: ServeMetrics {
                latency: Some(Histogram::new(LATENCY_BUCKETS)),
                ..Default::default()
            },
            started: Instant::now(),
        }))
    }

    /// Looks for newer snapshots every `snapshot_poll` until `shutdown`.
    pub async fn watch_snapshots(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(self.config.snapshot_poll);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {
                    for v in self.views.iter().flatten() {
                        match v.refresh(&self.store).await {
                            Ok(true) => self.metrics.swaps.add(1),
                            Ok(false) => {}
                            Err(e) => tracing::warn!(view = %v.view.name, error = %e, "could not check for a newer snapshot"),
                        }
                    }
                }
            }
        }
    }

    /// The router of one worker, which reads streaming state through `state`.
    fn router(self: &Arc<Self>, state: AnyStore) -> Router {
        Router::new()
            .route("/get-online-features", post(online_features))
            .route("/v1/features/{user_id}", get(entity_features))
            .route("/healthz", get(|| async { "ok" }))
            .route("/readyz", get(readyz))
            .route("/metrics", get(metrics))
            .route("/openapi.json", get(|| async { axum::Json(openapi()) }))
            .fallback(|| async {
                ApiError {
                    status: StatusCode::NOT_FOUND,
                    message: "no such endpoint (see /openapi.json)".into(),
                }
            })
            .layer(DefaultBodyLimit::max(self.config.max_body_bytes))
            .with_state(Arc::new(Worker {
                app: self.clone(),
                state,
            }))
    }

    fn authorize(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(token) = &self.config.auth_token else {
            return Ok(());
        };
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given == Some(token.as_str()) {
            Ok(())
        } else {
            Err(ApiError {
                status: StatusCode::UNAUTHORIZED,
                message: "missing or wrong bearer token: send `Authorization: Bearer <token>`"
                    .into(),
            })
        }
    }

    /// Evaluates resolved features for `entities` as of `t` (`explicit`: `t` was requested),
    /// reading streaming state through `state`.
    async fn vectors(
        &self,
        state: &AnyStore,
        features: &[Resolved],
        entities: &[String],
        t: i64,
        explicit: bool,
    ) -> (Vec<FeastColumn>, BTreeMap<String, i64>) {
        let mut used: BTreeMap<String, i64> = BTreeMap::new();
        let n = entities.len();
        let mut columns: Vec<FeastColumn> = features
            .iter()
            .map(|_| FeastColumn {
                values: Vec::with_capacity(n),
                statuses: Vec::with_capacity(n),
                event_timestamps: Vec::with_capacity(n),
            })
            .collect();
        let now_text = stamp_of(t);
        if features.iter().any(|f| f.layer == Layer::Streaming) {
            let keys: Vec<String> = entities
                .iter()
                .map(|e| state_key(&self.config.prefix, e))
                .collect();
            let fetched =
                tokio::time::timeout(self.config.redis_timeout, state.get_many(&keys)).await;
            // Per entity: `Ok(None)` when it has no state (nothing in any window), `Err` when its
            // state cannot be read (answered as INVALID, never as defaults).
            let states: Option<Vec<Result<Option<EntityState>, ()>>> = match fetched {
                Ok(Ok(values)) => Some(
                    values
                        .into_iter()
                        .zip(entities)
                        .map(|(v, e)| match v {
                            None => Ok(None),
                            Some(v) => EntityState::decode(&self.plan, e, &v.bytes)
                                .map(Some)
                                .map_err(|err| {
                                    self.metrics.corrupt_states.add(1);
                                    tracing::warn!(entity = %e, error = %err, "unreadable streaming state");
                                }),
                        })
                        .collect(),
                ),
                Ok(Err(e)) => {
                    self.metrics.redis_errors.add(1);
                    tracing::warn!(error = %e, "streaming state unavailable");
                    None
                }
                Err(_) => {
                    self.metrics.redis_errors.add(1);
                    tracing::warn!(timeout = ?self.config.redis_timeout, "streaming state timed out");
                    None
                }
            };
            let evaluated: Option<Vec<Option<Vec<Value>>>> = states.map(|states| {
                states
                    .iter()
                    .map(|s| match s {
                        Ok(Some(s)) => {
                            let ev = s.evaluate(&self.plan, t);
                            if !ev.exact {
                                self.metrics.not_exact.fetch_add(1, Ordering::Relaxed);
                            }
                            Some(ev.values)
                        }
                        Ok(None) => Some(
                            self.plan
                                .features
                                .iter()
                                .map(|f| f.feature.default)
                                .collect(),
                        ),
                        Err(()) => None,
                    })
                    .collect()
            });
            for (f, col) in features.iter().zip(columns.iter_mut()) {
                let Some(si) = f.speed_index else { continue };
                for i in 0..n {
                    match evaluated.as_ref().and_then(|rows| rows[i].as_ref()) {
                        Some(row) => push(col, row[si], "PRESENT", &now_text),
                        None => {
                            col.values.push(J::Null);
                            col.statuses.push("INVALID");
                            col.event_timestamps.push(now_text.clone());
                        }
                    }
                }
            }
        }
        let mut by_view: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for (j, f) in features.iter().enumerate() {
            if f.layer == Layer::Batch {
                by_view.entry(f.view).or_default().push(j);
            }
        }
        for (vi, cols) in by_view {
            let view = self.views[vi].as_ref().expect("batch views are loaded");
            let snapshot = if explicit {
                view.at(&self.store, floor_to(t, view.view.cadence.as_ms()))
                    .await
                    .unwrap_or_else(|e| {
                        tracing::warn!(error = %e, "cannot read the snapshot for as_of");
                        None
                    })
            } else {
                view.current()
            };
            if let Some(s) = &snapshot {
                used.insert(view.view.name.clone(), s.manifest.as_of_ms);
            }
            let stale = snapshot.as_ref().is_some_and(|s| {
                view.view
                    .ttl
                    .is_some_and(|ttl| t - s.manifest.as_of_ms > ttl.as_ms())
            });
            let snapshot_stamp = Stamp::new(
                snapshot
                    .as_ref()
                    .map_or(EPOCH, |s| s.manifest.as_of.as_str()),
            );
            // Each entity's row is looked up once for all of the view's features.
            let rows: Vec<Option<usize>> = match &snapshot {
                Some(s) => entities.iter().map(|e| s.row(e)).collect(),
                None => vec![None; n],
            };
            for j in cols {
                let f = &features[j];
                let default = view.view.features[f.index].default;
                for row in &rows {
                    // No row: the entity is not in the snapshot, or there is no snapshot.
                    match row.zip(snapshot.as_ref()) {
                        Some((row, s)) => push(
                            &mut columns[j],
                            s.value_at(row, f.index),
                            if stale { "OUTSIDE_MAX_AGE" } else { "PRESENT" },
                            &snapshot_stamp,
                        ),
                        None => {
                            columns[j].values.push(json_value(default));
                            columns[j].statuses.push("NOT_FOUND");
                            columns[j].event_timestamps.push(snapshot_stamp.clone());
                        }
                    }
                }
            }
        }
        (columns, used)
    }

    /// One entity's merged vector as a flat JSON object (the join key, then every feature),
    /// as `GET /v1/features/{user_id}` answers it.
    pub async fn entity_vector(&self, entity: &str, t: i64, explicit: bool) -> J {
        self.entity_vector_in(&self.state, entity, t, explicit)
            .await
    }

    async fn entity_vector_in(&self, state: &AnyStore, entity: &str, t: i64, explicit: bool) -> J {
        let features: Vec<Resolved> = self
            .spec
            .features()
            .map(|(v, f)| {
                crate::api::resolve_one(
                    &self.spec,
                    &self.plan,
                    &format!("{}:{}", v.name, f.name),
                    false,
                )
            })
            .collect::<Result<_, _>>()
            .expect("every spec feature resolves");
        let entities = vec![entity.to_string()];
        let (columns, snapshots) = self.vectors(state, &features, &entities, t, explicit).await;
        self.log(&features, &entities, &columns, t, &snapshots);
        let mut out = serde_json::Map::new();
        let key = self
            .spec
            .entities
            .first()
            .map_or("user_id", |e| e.join_key.name());
        out.insert(key.to_string(), J::String(entity.to_string()));
        for (f, c) in features.iter().zip(columns) {
            out.insert(
                f.column.clone(),
                c.values.into_iter().next().unwrap_or(J::Null),
            );
        }
        J::Object(out)
    }

    fn log(
        &self,
        features: &[Resolved],
        entities: &[String],
        columns: &[FeastColumn],
        t: i64,
        snapshots: &BTreeMap<String, i64>,
    ) {
        let Some(log) = &self.log else { return };
        let served_at = duet_speed::now_ms();
        for (i, e) in entities.iter().enumerate() {
            if !log.wants(e) {
                continue;
            }
            let values = features
                .iter()
                .zip(columns)
                .filter(|(_, c)| c.statuses[i] != "INVALID")
                .map(|(f, c)| {
                    let name = self.spec.views[f.view].features[f.index].name.clone();
                    let v = match &c.values[i] {
                        J::Null => Value::Null,
                        J::Number(x) if x.is_i64() => Value::Int(x.as_i64().expect("i64")),
                        J::Number(x) => Value::Float(x.as_f64().unwrap_or(f64::NAN)),
                        _ => Value::Null,
                    };
                    (name, v)
                })
                .collect();
            log.record(ServedRecord {
                served_at_ms: served_at,
                as_of_ms: t,
                entity: e.clone(),
                values,
                snapshots: snapshots.clone(),
            });
        }
    }
}

const EPOCH: &str = "1970-01-01T00:00:00Z";

thread_local! {
    /// The last instant formatted on this thread: the requests of one millisecond share it.
    static LAST_STAMP: std::cell::RefCell<Option<(i64, Stamp)>> = const { std::cell::RefCell::new(None) };
}

/// `t` as an RFC 3339 stamp.
fn stamp_of(t: i64) -> Stamp {
    LAST_STAMP.with(|last| {
        let mut last = last.borrow_mut();
        match &*last {
            Some((at, stamp)) if *at == t => stamp.clone(),
            _ => {
                let stamp = Stamp::new(&format_ms(t));
                *last = Some((t, stamp.clone()));
                stamp
            }
        }
    })
}

fn json_value(v: Value) -> J {
    match v {
        Value::Null => J::Null,
        Value::Int(i) => J::from(i),
        Value::Float(x) => serde_json::Number::from_f64(x).map_or(J::Null, J::Number),
    }
}

/// Appends a value: `status` (PRESENT or OUTSIDE_MAX_AGE) unless a PRESENT value is null.
fn push(col: &mut FeastColumn, v: Value, status: &'static str, ts: &Stamp) {
    let j = json_value(v);
    col.statuses.push(if j.is_null() && status == "PRESENT" {
        "NULL_VALUE"
    } else {
        status
    });
    col.values.push(j);
    col.event_timestamps.push(ts.clone());
}

fn entity_values(req: &FeastRequest, spec: &Spec, max: usize) -> Result<Vec<String>, ApiError> {
    let keys: Vec<&str> = spec.entities.iter().map(|e| e.join_key.name()).collect();
    if req.entities.len() != 1 {
        return Err(ApiError::bad(format!(
            "`entities` must hold exactly one join key ({}), with a list of values",
            keys.join(", ")
        )));
    }
    let (key, values) = req.entities.iter().next().expect("one entry");
    if !keys.contains(&key.as_str()) {
        return Err(ApiError::bad(format!(
            "unknown join key `{key}` in `entities`: use {}",
            keys.join(", ")
        )));
    }
    let J::Array(values) = values else {
        return Err(ApiError::bad(format!(
            "`entities.{key}` must be a list, such as [\"u1\", \"u2\"]"
        )));
    };
    if values.is_empty() {
        return Err(ApiError::bad(format!("`entities.{key}` is empty")));
    }
    if values.len() > max {
        return Err(ApiError::bad(format!(
            "too many entities: {} in one request, at most {max}",
            values.len()
        )));
    }
    values
        .iter()
        .enumerate()
        .map(|(i, v)| match v {
            J::String(s) => Ok(s.clone()),
            J::Number(n) if n.is_i64() || n.is_u64() => Ok(n.to_string()),
            other => Err(ApiError::bad(format!(
                "`entities.{key}[{i}]` is {}, expected a string or an integer",
                type_name(other)
            ))),
        })
        .collect()
}

fn type_name(v: &J) -> &'static str {
    match v {
        J::Null => "null",
        J::Bool(_) => "a boolean",
        J::Number(_) => "a non-integer number",
        J::String(_) => "a string",
        J::Array(_) => "a list",
        J::Object(_) => "an object",
    }
}

fn as_of(text: Option<&str>) -> Result<(i64, bool), ApiError> {
    match text {
        None => Ok((duet_speed::now_ms(), false)),
        Some(s) => parse_rfc3339_ms(s).map(|t| (t, true)).ok_or_else(|| {
            ApiError::bad(format!(
                "`as_of` value `{s}` is not RFC 3339, such as 2026-11-20T13:45:12Z"
            ))
        }),
    }
}

async fn online_features(
    State(worker): State<Arc<Worker>>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let started = Instant::now();
    let app = &worker.app;
    app.metrics.requests.add(1);
    let result = async {
        app.authorize(&headers)?;
        let body = body.map_err(|e| ApiError {
            status: e.status(),
            message: if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                format!(
                    "request body larger than {} bytes",
                    app.config.max_body_bytes
                )
            } else {
                format!("cannot read the request body: {e}")
            },
        })?;
        let req: FeastRequest = serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad(format!("bad JSON body: {e}")))?;
        let features = resolve(&app.spec, &app.plan, &req)?;
        let entities = entity_values(&req, &app.spec, app.config.max_entities)?;
        let (t, explicit) = as_of(req.as_of.as_deref())?;
        let key_name = req.entities.keys().next().expect("validated").clone();
        let (columns, snapshots) = app
            .vectors(&worker.state, &features, &entities, t, explicit)
            .await;
        app.log(&features, &entities, &columns, t, &snapshots);
        app.metrics.entities.add(entities.len() as u64);
        let mut names = vec![key_name];
        names.extend(features.iter().map(|f| f.column.clone()));
        let mut results = Vec::with_capacity(columns.len() + 1);
        results.push(FeastColumn {
            statuses: vec!["PRESENT"; entities.len()],
            event_timestamps: vec![Stamp::new(EPOCH); entities.len()],
            // The join key as sent (a Feast client decodes an integer key back as an integer).
            values: match req.entities.values().next() {
                Some(J::Array(sent)) => sent.clone(),
                _ => entities.into_iter().map(J::String).collect(),
            },
        });
        results.extend(columns);
        let body = FeastResponse {
            metadata: Metadata {
                feature_names: names,
            },
            results,
        }
        .to_json();
        Ok::<_, ApiError>(([(header::CONTENT_TYPE, "application/json")], body))
    }
    .await;
    finish(app, started, result)
}

fn finish(app: &App, started: Instant, result: Result<impl IntoResponse, ApiError>) -> Response {
    if let Some(h) = &app.metrics.latency {
        h.observe(started.elapsed().as_secs_f64());
    }
    match result {
        Ok(r) => r.into_response(),
        Err(e) => {
            app.metrics.errors_4xx.add(1);
            e.into_response()
        }
    }
}

#[derive(serde::Deserialize)]
struct AsOfQuery {
    as_of: Option<String>,
}

async fn entity_features(
    State(worker): State<Arc<Worker>>,
    headers: HeaderMap,
    Path(user_id): Path<String>,
    query: Result<Query<AsOfQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let started = Instant::now();
    let app = &worker.app;
    app.metrics.requests.add(1);
    let result = async {
        app.authorize(&headers)?;
        let Query(q) = query.map_err(|e| ApiError::bad(format!("bad query string: {e}")))?;
        let (t, explicit) = as_of(q.as_of.as_deref())?;
        Ok::<_, ApiError>(axum::Json(
            app.entity_vector_in(&worker.state, &user_id, t, explicit)
                .await,
        ))
    }
    .await;
    finish(app, started, result)
}

async fn readyz(State(worker): State<Arc<Worker>>) -> Response {
    let app = &worker.app;
    let missing: Vec<&str> = app
        .views
        .iter()
        .flatten()
        .filter(|v| v.current().is_none())
        .map(|v| v.view.name.as_str())
        .collect();
    if !missing.is_empty() {
        return ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: format!("no snapshot loaded yet for {}", missing.join(", ")),
        }
        .into_response();
    }
    let probe = tokio::time::timeout(
        app.config.redis_timeout,
        worker
            .state
            .get_many(&[format!("{}readyz", app.config.prefix)]),
    )
    .await;
    match probe {
        Ok(Ok(_)) => "ready".into_response(),
        _ => ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: "the speed layer's Redis does not answer".into(),
        }
        .into_response(),
    }
}

async fn metrics(State(worker): State<Arc<Worker>>) -> Response {
    let app = &worker.app;
    use std::fmt::Write;
    let m = &app.metrics;
    let mut out = String::new();
    let mut counter = |name: &str, help: &str, v: u64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
        );
    };
    counter(
        "duet_serve_requests_total",
        "Feature requests.",
        m.requests.get(),
    );
    counter(
        "duet_serve_request_errors_total",
        "Requests answered with a 4xx.",
        m.errors_4xx.get(),
    );
    counter(
        "duet_serve_entities_total",
        "Entities served.",
        m.entities.get(),
    );
    counter(
        "duet_serve_redis_errors_total",
        "Requests whose streaming state failed or timed out.",
        m.redis_errors.get(),
    );
    counter(
        "duet_serve_corrupt_states_total",
        "Streaming states that could not be decoded (answered as INVALID).",
        m.corrupt_states.get(),
    );
    counter(
        "duet_serve_snapshot_swaps_total",
        "Newer snapshots swapped in.",
        m.swaps.get(),
    );
    counter(
        "duet_serve_inexact_total",
        "Streaming values evaluated before an entity's state boundary.",
        m.not_exact.load(Ordering::Relaxed),
    );
    if let Some(log) = &app.log {
        counter(
            "duet_serve_log_dropped_total",
            "Served-log records dropped because the buffer was full.",
            log.dropped.load(Ordering::Relaxed),
        );
    }
    let now = duet_speed::now_ms();
    let _ = writeln!(
        out,
        "# HELP duet_serve_snapshot_age_seconds Age of the loaded snapshot.\n# TYPE duet_serve_snapshot_age_seconds gauge"
    );
    for v in app.views.iter().flatten() {
        if let Some(s) = v.current() {
            let _ = writeln!(
                out,
                "duet_serve_snapshot_age_seconds{{view=\"{}\"}} {}",
                v.view.name,
                (now - s.manifest.as_of_ms) as f64 / 1000.0
            );
            let _ = writeln!(
                out,
                "duet_serve_snapshot_entities{{view=\"{}\"}} {}",
                v.view.name,
                s.len()
            );
            let _ = writeln!(
                out,
                "duet_serve_snapshot_bytes{{view=\"{}\"}} {}",
                v.view.name, s.bytes
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP duet_serve_uptime_seconds Time since start.\n# TYPE duet_serve_uptime_seconds gauge\nduet_serve_uptime_seconds {}",
        app.started.elapsed().as_secs()
    );
    if let Some(h) = &m.latency {
        h.render(
            &mut out,
            "duet_serve_request_seconds",
            "Time to answer a feature request.",
        );
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

/// Binds `listen` and serves until `shutdown`; `on_bound` learns the bound address.
///
/// Connections are accepted here and handed round-robin to `config.workers` threads, each
/// running a single-threaded runtime with its own Redis connection: a request, its Redis round
/// trip and its response then stay on one thread, with no wake-ups across threads (on two
/// cores, 10% more 1-entity requests and 16% more 100-entity requests per second than one
/// shared multi-threaded runtime; see BENCHMARKS.md). On `shutdown` the workers stop taking
/// connections and finish the requests in flight.
pub async fn serve(
    app: Arc<App>,
    listen: &str,
    shutdown: CancellationToken,
    on_bound: impl FnOnce(SocketAddr),
) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| Error::BadInput(format!("--listen {listen}: {e}")))?;
    let addr = listener
        .local_addr()
        .map_err(|e| Error::Internal(e.to_string()))?;
    let mut handoffs = Vec::new();
    let mut workers = Vec::new();
    for i in 0..app.config.workers.max(1) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let (app, shutdown) = (app.clone(), shutdown.clone());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::Internal(format!("cannot start serving worker {i}: {e}")))?;
        std::thread::Builder::new()
            .name(format!("duet-serve-{i}"))
            .spawn(move || {
                let result = runtime.block_on(async move {
                    let state = app
                        .state
                        .reopen_lazily()
                        .map_err(|e| Error::Internal(format!("serving worker {i}: {e}")))?;
                    axum::serve(Handoff { rx, addr }, app.router(state))
                        .with_graceful_shutdown(shutdown.cancelled_owned())
                        .await
                        .map_err(|e| Error::Internal(format!("server failed: {e}")))
                });
                let _ = done_tx.send(result);
            })
            .map_err(|e| Error::Internal(format!("cannot start serving worker {i}: {e}")))?;
        handoffs.push(tx);
        workers.push(done_rx);
    }
    on_bound(addr);
    tracing::info!(%addr, workers = workers.len(), "serving features");
    tokio::spawn(app.clone().watch_snapshots(shutdown.clone()));
    let mut next = 0;
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted.and_then(|(s, peer)| {
            s.set_nodelay(true)?;
            Ok((s.into_std()?, peer))
        }) {
            Ok(stream) => stream,
            Err(e) => {
                // Out of file descriptors, or a connection reset before it was accepted: go on.
                tracing::warn!(error = %e, "cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if handoffs[next].send(stream).is_err() {
            break;
        }
        next = (next + 1) % handoffs.len();
    }
    drop(listener);
    drop(handoffs);
    let mut result = Ok(());
    for w in workers {
        let outcome = w
            .await
            .unwrap_or_else(|_| Err(Error::Internal("a serving worker stopped".into())));
        if result.is_ok() {
            result = outcome;
        }
    }
    result
}

/// A worker's side of the accept loop: the connections handed to it.
struct Handoff {
    rx: tokio::sync::mpsc::UnboundedReceiver<(std::net::TcpStream, SocketAddr)>,
    addr: SocketAddr,
}

impl axum::serve::Listener for Handoff {
    type Io = tokio::net::TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Some((stream, peer)) = self.rx.recv().await else {
                // The accept loop has stopped: shutdown is under way, which ends this worker.
                return std::future::pending().await;
            };
            match tokio::net::TcpStream::from_std(stream) {
                Ok(s) => return (s, peer),
                Err(e) => tracing::warn!(error = %e, "cannot take over a connection"),
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.addr)
    }
}
