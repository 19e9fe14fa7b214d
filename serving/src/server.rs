//! The HTTP server: routes, the merge of batch snapshots with streaming state, readiness,
//! metrics, and the snapshot watcher.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use duet_batch::store::Location;
use duet_spec::duration::floor_to;
use duet_spec::timestamp::{format_ms, parse_rfc3339_ms};
use duet_spec::{Layer, Spec, Value};
use duet_speed::metrics::{Counter, Histogram, LATENCY_BUCKETS};
use duet_speed::plan::SpeedPlan;
use duet_speed::processor::{history_key, state_key};
use duet_speed::store::{AnyStore, StateStore};
use serde_json::Value as J;
use tokio_util::sync::CancellationToken;

use crate::api::{
    ApiError, Cell, EPOCH, FeastRequest, Query as Features, QueryCache, Stamp, Status, Table,
    feast_response, openapi,
};
use crate::served_log::{Served, ServedLog};
use crate::snapshots::{AsOf, LoadedSnapshot, ViewSnapshots};
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
    /// How often to look for a newer snapshot; also how long a past instant with no snapshot
    /// of its own is remembered as such (with the older one that stands for it).
    pub snapshot_poll: Duration,
    /// Longest wait of a request with `as_of` for a past snapshot to be read from the store.
    pub snapshot_load_timeout: Duration,
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
            snapshot_load_timeout: Duration::from_secs(5),
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
    past_snapshot_errors: Counter,
    not_exact: AtomicU64,
    latency: Option<Histogram>,
}

/// What one worker's handlers hold: the shared state, and the worker's own Redis connection.
struct Worker {
    app: Arc<App>,
    state: AnyStore,
    /// The feature lists this worker has resolved.
    queries: QueryCache,
}

/// Everything a request needs.
pub struct App {
    spec: Spec,
    plan: SpeedPlan,
    /// Every feature of the spec, as `GET /v1/features/{user_id}` serves them.
    all: Features,
    views: Vec<Option<Arc<ViewSnapshots>>>,
    store: Location,
    state: AnyStore,
    /// Each serving worker's own connection to the speed layer's state: `/readyz` probes all
    /// of them, since a request may land on any worker.
    links: std::sync::Mutex<Vec<AnyStore>>,
    config: ServeConfig,
    log: Option<ServedLog>,
    /// Every view's name, for the served-feature log.
    view_names: Arc<[String]>,
    metrics: ServeMetrics,
    started: Instant,
    /// `/openapi.json`, rendered once: it depends only on the spec and the limits.
    openapi: axum::body::Bytes,
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
            .map(|v| {
                (v.layer == Layer::Batch)
                    .then(|| Arc::new(ViewSnapshots::new(v.clone(), config.snapshot_poll)))
            })
            .collect();
        for v in views.iter().flatten() {
            if let Err(e) = v.refresh(&store).await {
                tracing::warn!(view = %v.view.name, error = %e, "no snapshot loaded yet");
            }
        }
        let all = Features::new(
            spec.features()
                .map(|(v, f)| {
                    crate::api::resolve_one(&spec, &plan, &format!("{}:{}", v.name, f.name), false)
                })
                .collect::<std::result::Result<_, _>>()
                .map_err(|e| Error::Internal(e.message))?,
            (None, Vec::new(), false),
        );
        let openapi = serde_json::to_vec(&openapi(&spec, config.max_entities))
            .map_err(|e| Error::Internal(format!("cannot render the OpenAPI document: {e}")))?
            .into();
        Ok(Arc::new(App {
            openapi,
            view_names: spec.views.iter().map(|v| v.name.clone()).collect(),
            spec,
            plan,
            all,
            views,
            store,
            state,
            config,
            log,
            links: std::sync::Mutex::new(Vec::new()),
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
        // A load slower than the poll period is followed by one look, not a burst of them.
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
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
        self.links.lock().expect("not poisoned").push(state.clone());
        Router::new()
            .route("/get-online-features", post(online_features))
            .route("/v1/features/{user_id}", get(entity_features))
            .route("/healthz", get(|| async { "ok" }))
            .route("/readyz", get(readyz))
            .route("/metrics", get(metrics))
            .route("/openapi.json", get(openapi_json))
            .fallback(|| async {
                ApiError {
                    status: StatusCode::NOT_FOUND,
                    message: "no such endpoint (see /openapi.json)".into(),
                }
            })
            .method_not_allowed_fallback(|method: Method, uri: axum::http::Uri| async move {
                ApiError {
                    status: StatusCode::METHOD_NOT_ALLOWED,
                    message: format!(
                        "{method} is not allowed on {} (see /openapi.json)",
                        uri.path()
                    ),
                }
            })
            .layer(DefaultBodyLimit::max(self.config.max_body_bytes))
            .with_state(Arc::new(Worker {
                app: self.clone(),
                state,
                queries: QueryCache::default(),
            }))
    }

    fn authorize(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(token) = &self.config.auth_token else {
            return Ok(());
        };
        // The scheme is case-insensitive (RFC 9110), and spaces around the token are ignored.
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, t)| t.trim());
        if given.is_some_and(|t| same_secret(t.as_bytes(), token.as_bytes())) {
            Ok(())
        } else {
            Err(ApiError {
                status: StatusCode::UNAUTHORIZED,
                message: "missing or wrong bearer token: send `Authorization: Bearer <token>`"
                    .into(),
            })
        }
    }

    /// Evaluates `query`'s features for `entities` as of `t` (`explicit`: `t` was requested),
    /// reading streaming state through `state`. Also returns, per batch view used, the as-of
    /// instant of the snapshot the values came from.
    async fn vectors(
        &self,
        state: &AnyStore,
        query: &Features,
        entities: &[impl AsRef<str>],
        t: i64,
        explicit: bool,
    ) -> (Table, Vec<(usize, i64)>) {
        let n = entities.len();
        let mut table = Table {
            rows: n,
            cells: vec![
                Cell {
                    value: Value::Null,
                    status: Status::Invalid,
                    stamp: 0,
                };
                n * query.features.len()
            ],
            stamps: Vec::with_capacity(1 + query.batch.len()),
        };
        // Stamp 0: the instant evaluated.
        table.stamps.push(stamp_of(t));
        if query.streaming {
            let keys: Vec<String> = entities
                .iter()
                .map(|e| state_key(&self.config.prefix, e.as_ref()))
                .collect();
            // A past instant (`as_of`) may be older than what an entity's state holds: then
            // its history, fetched in the same round trip, answers (when the spec keeps one).
            // Not for an instant so recent that every state holds it: a state's boundary
            // trails the watermark by the lateness, and the watermark runs at most the clock
            // skew allowance ahead of this clock.
            let with_history = explicit
                && self.plan.history > 0
                && t < duet_speed::now_ms()
                    .saturating_sub(self.plan.lateness)
                    .saturating_add(duet_speed::processor::MAX_CLOCK_SKEW_MS);
            let fetched = tokio::time::timeout(self.config.redis_timeout, async {
                if with_history {
                    let histories: Vec<String> = entities
                        .iter()
                        .map(|e| history_key(&self.config.prefix, e.as_ref()))
                        .collect();
                    state.get_many_with_history(&keys, &histories).await
                } else {
                    state.get_many(&keys).await.map(|v| (v, Vec::new()))
                }
            })
            .await;
            // Per entity: its features' values, or `None` when its state cannot be read
            // (answered as INVALID, never as defaults). No state: nothing in any window.
            let rows: Option<Vec<Option<Vec<Value>>>> = match fetched {
                Ok(Ok((values, histories))) => {
                    let mut histories = histories.into_iter();
                    Some(
                        values
                            .into_iter()
                            .zip(entities)
                            .map(|(v, e)| {
                                let history = histories.next();
                                self.streaming_row(e.as_ref(), v, history, t)
                            })
                            .collect(),
                    )
                }
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
            for (j, f) in query.features.iter().enumerate() {
                let Some(si) = f.speed_index else { continue };
                let column = &mut table.cells[j * n..(j + 1) * n];
                for (i, cell) in column.iter_mut().enumerate() {
                    // Cells start as INVALID.
                    if let Some(row) = rows.as_ref().and_then(|rows| rows[i].as_ref()) {
                        *cell = Cell::served(row[si], Status::Present, 0);
                    }
                }
            }
        }
        let mut used = Vec::with_capacity(query.batch.len());
        // One wait for past snapshots per request, whatever the number of batch views.
        let deadline = tokio::time::Instant::now() + self.config.snapshot_load_timeout;
        for (vi, cols) in &query.batch {
            let view = self.views[*vi].as_ref().expect("batch views are loaded");
            // `unavailable`: the snapshot for an explicit `as_of` could not be read in time,
            // so the view's features are INVALID rather than answered as not found.
            let (snapshot, unavailable) = if explicit {
                match view
                    .at(
                        &self.store,
                        floor_to(t, view.view.cadence.as_ms()),
                        deadline,
                    )
                    .await
                {
                    AsOf::Found(s) => (Some(s), false),
                    AsOf::Unpublished => (None, false),
                    AsOf::Unavailable(why) => {
                        self.metrics.past_snapshot_errors.add(1);
                        tracing::warn!(view = %view.view.name, as_of = %format_ms(t), reason = %why, "no snapshot for as_of");
                        (None, true)
                    }
                }
            } else {
                (view.current(), false)
            };
            let stamp = u16::try_from(table.stamps.len()).expect("fewer than 65535 batch views");
            if unavailable {
                table.stamps.push(EPOCH_STAMP.with(Stamp::clone));
                for &j in cols {
                    for cell in &mut table.cells[j * n..(j + 1) * n] {
                        // Cells start as INVALID.
                        cell.stamp = stamp;
                    }
                }
                continue;
            }
            match &snapshot {
                Some(s) => {
                    used.push((*vi, s.manifest.as_of_ms));
                    table.stamps.push(s.stamp.clone());
                }
                None => table.stamps.push(EPOCH_STAMP.with(Stamp::clone)),
            }
            let stale = snapshot.as_ref().is_some_and(|s| {
                view.view
                    .ttl
                    .is_some_and(|ttl| t - s.manifest.as_of_ms > ttl.as_ms())
            });
            let status = if stale {
                Status::OutsideMaxAge
            } else {
                Status::Present
            };
            // Each entity's row is looked up once for all of the view's features.
            let rows: Vec<Option<usize>> = match &snapshot {
                Some(s) => entities.iter().map(|e| s.row(e.as_ref())).collect(),
                None => vec![None; n],
            };
            for &j in cols {
                let f = &query.features[j];
                let default = view.view.features[f.index].default;
                let column = &mut table.cells[j * n..(j + 1) * n];
                for (cell, row) in column.iter_mut().zip(&rows) {
                    // No row: the entity is not in the snapshot, or there is no snapshot.
                    *cell = match row.zip(snapshot.as_ref()) {
                        Some((row, s)) => Cell::served(s.value_at(row, f.index), status, stamp),
                        None => Cell {
                            value: default,
                            status: Status::NotFound,
                            stamp,
                        },
                    };
                }
            }
        }
        (table, used)
    }

    /// One entity's streaming values as of `t` from its stored state `v` and, for a past
    /// instant, its history events before `t` (`None`: not fetched); `None` when what is
    /// stored cannot be read.
    fn streaming_row(
        &self,
        entity: &str,
        v: Option<duet_speed::store::Versioned>,
        history: Option<Vec<u8>>,
        t: i64,
    ) -> Option<Vec<Value>> {
        match duet_speed::history::evaluate_stored(
            &self.spec,
            &self.plan,
            entity,
            v.as_ref().map(|v| v.bytes.as_slice()),
            history.as_deref(),
            t,
        ) {
            Ok((values, exact)) => {
                if !exact {
                    self.metrics.not_exact.fetch_add(1, Ordering::Relaxed);
                }
                Some(values)
            }
            Err(err) => {
                self.metrics.corrupt_states.add(1);
                tracing::warn!(entity, error = %err, "unreadable streaming state or history");
                None
            }
        }
    }

    /// One entity's merged vector as a flat JSON object (the join key, then every feature),
    /// as `GET /v1/features/{user_id}` answers it.
    pub async fn entity_vector(&self, entity: &str, t: i64, explicit: bool) -> J {
        self.entity_vector_in(&self.state, entity, t, explicit, true)
            .await
    }

    /// `logged`: the vector goes to the served-feature log (if the entity is sampled); a HEAD
    /// request's does not, since no values went out.
    async fn entity_vector_in(
        &self,
        state: &AnyStore,
        entity: &str,
        t: i64,
        explicit: bool,
        logged: bool,
    ) -> J {
        let entities = [entity];
        let (table, used) = self.vectors(state, &self.all, &entities, t, explicit).await;
        if logged {
            self.log(&self.all, &entities, &table, t, &used);
        }
        let mut out = serde_json::Map::new();
        let key = self
            .spec
            .entities
            .first()
            .map_or("user_id", |e| e.join_key.name());
        out.insert(key.to_string(), J::String(entity.to_string()));
        for (j, f) in self.all.features.iter().enumerate() {
            out.insert(f.column.clone(), table.column(j)[0].json());
        }
        J::Object(out)
    }

    fn log(
        &self,
        query: &Features,
        entities: &[impl AsRef<str>],
        table: &Table,
        t: i64,
        used: &[(usize, i64)],
    ) {
        let Some(log) = &self.log else { return };
        let served_at = duet_speed::now_ms();
        for (i, e) in entities.iter().enumerate() {
            let e = e.as_ref();
            if !log.wants(e) {
                continue;
            }
            // Only the values are copied here: the log's writer task builds the record.
            let values = (0..query.features.len())
                .map(|j| {
                    let c = table.column(j)[i];
                    // As served: a non-finite float went out as null.
                    (c.status != Status::Invalid).then_some(match c.value {
                        Value::Float(x) if !x.is_finite() => Value::Null,
                        v => v,
                    })
                })
                .collect();
            log.record(Served {
                served_at_ms: served_at,
                as_of_ms: t,
                entity: e.to_string(),
                names: query.log_names.clone(),
                values,
                views: self.view_names.clone(),
                snapshots: used.to_vec(),
            });
        }
    }
}

thread_local! {
    /// The last instant formatted on this thread: the requests of one millisecond share it.
    static LAST_STAMP: std::cell::RefCell<Option<(i64, Stamp)>> = const { std::cell::RefCell::new(None) };
    /// The stamp of values from no snapshot.
    static EPOCH_STAMP: Stamp = Stamp::new(EPOCH);
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

/// Compares a given token with the configured one in time that does not depend on where they
/// differ.
fn same_secret(given: &[u8], token: &[u8]) -> bool {
    given.len() == token.len() && given.iter().zip(token).fold(0u8, |d, (a, b)| d | (a ^ b)) == 0
}

/// The `as_of` of a query string. An unencoded `+` of a UTC offset
/// (`?as_of=2026-11-20T13:45:12+05:30`) arrives as a space, since query strings encode spaces
/// as `+`; a space where the offset's sign goes is read as that `+`.
fn query_as_of(text: &str) -> std::borrow::Cow<'_, str> {
    let b = text.as_bytes();
    let n = b.len();
    let offset_after_space = n > 6
        && b[n - 6] == b' '
        && b[n - 5..n - 3].iter().all(u8::is_ascii_digit)
        && b[n - 3] == b':'
        && b[n - 2..].iter().all(u8::is_ascii_digit);
    if offset_after_space {
        format!("{}+{}", &text[..n - 6], &text[n - 5..]).into()
    } else {
        text.into()
    }
}

fn as_of(text: Option<&str>) -> Result<(i64, bool), ApiError> {
    match text {
        None => Ok((duet_speed::now_ms(), false)),
        Some(s) => parse_rfc3339_ms(s)
            .map(|t| (t, true))
            .ok_or_else(|| as_of_error(s)),
    }
}

fn as_of_error(text: &str) -> ApiError {
    ApiError::bad(format!(
        "`as_of` value `{text}` is not RFC 3339, such as 2026-11-20T13:45:12Z"
    ))
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
        let req: FeastRequest<'_> = serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad(format!("bad JSON body: {e}")))?;
        let query = worker.queries.resolve(&app.spec, &app.plan, &req)?;
        let (key, entities) = req.entity_keys(&app.spec, app.config.max_entities)?;
        let (t, explicit) = as_of(req.as_of.as_deref())?;
        let (table, used) = app
            .vectors(&worker.state, &query, &entities, t, explicit)
            .await;
        app.log(&query, &entities, &table, t, &used);
        app.metrics.entities.add(entities.len() as u64);
        let body = feast_response(&req, key, &query, &table);
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
    method: Method,
    headers: HeaderMap,
    user_id: Result<Path<String>, axum::extract::rejection::PathRejection>,
    query: Result<Query<AsOfQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let started = Instant::now();
    let app = &worker.app;
    app.metrics.requests.add(1);
    let result = async {
        app.authorize(&headers)?;
        let Path(user_id) =
            user_id.map_err(|e| ApiError::bad(format!("bad entity key in the path: {e}")))?;
        let Query(q) = query.map_err(|e| ApiError::bad(format!("bad query string: {e}")))?;
        let (t, explicit) = match q.as_of.as_deref() {
            // The message shows the text as it arrived, not as the `+` rule read it.
            Some(text) => parse_rfc3339_ms(&query_as_of(text))
                .map(|t| (t, true))
                .ok_or_else(|| as_of_error(text))?,
            None => as_of(None)?,
        };
        Ok::<_, ApiError>(axum::Json(
            app.entity_vector_in(&worker.state, &user_id, t, explicit, method != Method::HEAD)
                .await,
        ))
    }
    .await;
    finish(app, started, result)
}

async fn openapi_json(State(worker): State<Arc<Worker>>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        worker.app.openapi.clone(),
    )
        .into_response()
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
    // Every worker's connection: ready only when a request answers on whichever worker
    // takes it.
    let links = app.links.lock().expect("not poisoned").clone();
    let key = [format!("{}readyz", app.config.prefix)];
    let probes = links
        .iter()
        .map(|link| tokio::time::timeout(app.config.redis_timeout, link.get_many(&key)));
    let answered = futures::future::join_all(probes)
        .await
        .iter()
        .filter(|p| matches!(p, Ok(Ok(_))))
        .count();
    if answered == links.len() {
        return "ready".into_response();
    }
    ApiError {
        status: StatusCode::SERVICE_UNAVAILABLE,
        message: format!(
            "the speed layer's Redis does not answer on {} of the {} serving workers' connections",
            links.len() - answered,
            links.len()
        ),
    }
    .into_response()
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
        "duet_serve_past_snapshot_errors_total",
        "Batch views of requests with as_of whose snapshot could not be read (failed, not in time, or too many past days being read); their values are INVALID.",
        m.past_snapshot_errors.get(),
    );
    counter(
        "duet_serve_past_snapshot_reads_total",
        "Past snapshots looked up in the store for requests with as_of.",
        app.views
            .iter()
            .flatten()
            .map(|v| v.past_reads.load(Ordering::Relaxed))
            .sum(),
    );
    counter(
        "duet_serve_inexact_total",
        "Streaming values evaluated as of an instant older than an entity's state and history reach.",
        m.not_exact.load(Ordering::Relaxed),
    );
    if let Some(log) = &app.log {
        counter(
            "duet_serve_log_dropped_total",
            "Served-log records lost: the buffer was full, or the store refused the file.",
            log.dropped.load(Ordering::Relaxed),
        );
    }
    let now = duet_speed::now_ms();
    let loaded: Vec<_> = app
        .views
        .iter()
        .flatten()
        .filter_map(|v| Some((&v.view.name, v.current()?)))
        .collect();
    // One gauge family per line of HELP and TYPE, then its sample for every view.
    type Gauge<'a> = &'a dyn Fn(&LoadedSnapshot) -> f64;
    let families: [(&str, &str, Gauge<'_>); 3] = [
        (
            "duet_serve_snapshot_age_seconds",
            "Age of the loaded snapshot.",
            &|s| (now - s.manifest.as_of_ms) as f64 / 1000.0,
        ),
        (
            "duet_serve_snapshot_entities",
            "Entities in the loaded snapshot.",
            &|s| s.len() as f64,
        ),
        (
            "duet_serve_snapshot_bytes",
            "Heap bytes of the loaded snapshot (keys, hash table, values).",
            &|s| s.bytes as f64,
        ),
    ];
    for (family, help, value) in families {
        let _ = writeln!(out, "# HELP {family} {help}\n# TYPE {family} gauge");
        for (view, s) in &loaded {
            let _ = writeln!(out, "{family}{{view=\"{view}\"}} {}", value(s));
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

/// Why `listen` could not be bound: an address that is taken, or not this machine's, is a
/// runtime failure (exit 1); one that cannot be an address at all is bad input (exit 2).
pub fn bind_error(listen: &str, e: std::io::Error) -> Error {
    let message = format!("--listen {listen}: {e}");
    match e.kind() {
        std::io::ErrorKind::AddrInUse
        | std::io::ErrorKind::AddrNotAvailable
        | std::io::ErrorKind::PermissionDenied => Error::Internal(message),
        _ => Error::BadInput(message),
    }
}

/// Binds `listen` and serves until `shutdown`; `on_bound` learns the bound address.
///
/// Connections are accepted here and handed round-robin to `config.workers` threads, each
/// running a single-threaded runtime with its own Redis connection: a request, its Redis round
/// trip and its response then stay on one thread, with no wake-ups across threads (on two
/// cores, 10% more 1-entity requests and 16% more 100-entity requests per second than one
/// shared multi-threaded runtime; see BENCHMARKS.md). On `shutdown` the accept loop stops,
/// and each worker serves the connections already handed to it and finishes the requests in
/// flight before it stops. A worker that ends early (an error, a panic) stops the others and
/// `serve` returns its error, instead of serving on with fewer workers or none.
pub async fn serve(
    app: Arc<App>,
    listen: &str,
    shutdown: CancellationToken,
    on_bound: impl FnOnce(SocketAddr),
) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| bind_error(listen, e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| Error::Internal(e.to_string()))?;
    let mut handoffs = Vec::new();
    let mut workers = Vec::new();
    // Cancelled when any worker ends, whatever the cause (the guard also runs on a panic).
    let worker_ended = CancellationToken::new();
    for i in 0..app.config.workers.max(1) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let app = app.clone();
        let ended = worker_ended.clone();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::Internal(format!("cannot start serving worker {i}: {e}")))?;
        std::thread::Builder::new()
            .name(format!("duet-serve-{i}"))
            .spawn(move || {
                let _ended = ended.drop_guard();
                let result = runtime.block_on(async move {
                    let state = app
                        .state
                        .reopen_lazily()
                        .map_err(|e| Error::Internal(format!("serving worker {i}: {e}")))?;
                    // The worker stops once the accept loop has closed its hand-off and every
                    // connection handed to it has been taken.
                    let drained = CancellationToken::new();
                    let handoff = Handoff {
                        rx,
                        addr,
                        drained: drained.clone(),
                    };
                    axum::serve(handoff, app.router(state))
                        .with_graceful_shutdown(drained.cancelled_owned())
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
    let watching = shutdown.child_token();
    tokio::spawn(app.clone().watch_snapshots(watching.clone()));
    let mut next = 0;
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = worker_ended.cancelled() => break,
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
    watching.cancel();
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
    /// Cancelled once the accept loop has closed the channel and it is empty.
    drained: CancellationToken,
}

impl axum::serve::Listener for Handoff {
    type Io = tokio::net::TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Some((stream, peer)) = self.rx.recv().await else {
                // The accept loop has stopped and every connection handed over has been taken:
                // this worker's graceful shutdown starts.
                self.drained.cancel();
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
