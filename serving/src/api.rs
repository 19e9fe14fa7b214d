//! The HTTP API's data: Feast-compatible requests and responses, feature resolution, errors.
//!
//! A request is read borrowing its strings from the body, its feature list is resolved once per
//! distinct list (see [`QueryCache`]), and the response is written straight from a grid of
//! typed cells: the server's work per request is a few allocations, not one per value.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use duet_spec::{Layer, Spec, Value};
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json_;

/// An error answered as `{"error": "..."}` with a status code; never leaks internals.
#[derive(Debug)]
pub struct ApiError {
    /// The status.
    pub status: StatusCode,
    /// What is wrong, naming the field or feature.
    pub message: String,
}

impl ApiError {
    /// A 400.
    pub fn bad(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (
            self.status,
            Json(serde_json::json!({ "error": self.message })),
        )
            .into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            // Tells the client which scheme to use (RFC 6750).
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer realm=\"duet\""),
            );
        }
        response
    }
}

/// A string of the request: borrowed from the body unless it held escapes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Text<'a>(pub Cow<'a, str>);

impl std::ops::Deref for Text<'_> {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Borrowed(s)))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(s.to_owned())))
            }
            fn visit_string<E: de::Error>(self, s: String) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(s)))
            }
        }
        d.deserialize_str(V)
    }
}

/// The request body of `POST /get-online-features`, as Feast's clients send it.
#[derive(Debug, Deserialize)]
pub struct FeastRequest<'a> {
    /// `view:feature` references.
    #[serde(default, borrow)]
    pub features: Option<Vec<Text<'a>>>,
    /// A feature service; duet serves each view as a service of the same name.
    #[serde(default, borrow)]
    pub feature_service: Option<Text<'a>>,
    /// Join key → values, in the order sent.
    #[serde(borrow)]
    pub entities: Entities<'a>,
    /// Name columns `view__feature` instead of `feature`.
    #[serde(default)]
    pub full_feature_names: bool,
    /// Evaluate as of this instant (RFC 3339) instead of now.
    #[serde(default, borrow)]
    pub as_of: Option<Text<'a>>,
}

/// The `entities` object: each join key sent, with what was sent for it.
#[derive(Debug, Default)]
pub struct Entities<'a>(pub Vec<(Text<'a>, Sent<'a>)>);

/// What was sent for one join key.
#[derive(Debug)]
pub enum Sent<'a> {
    /// A list of keys.
    List(Vec<Key<'a>>),
    /// Anything but a list (its JSON type, as an error names it).
    Other(&'static str),
}

/// One entity key as sent.
#[derive(Debug)]
pub enum Key<'a> {
    /// A string.
    Str(Text<'a>),
    /// An integer.
    Int(i64),
    /// An integer above `i64::MAX`.
    UInt(u64),
    /// A whole number written as a float (`5.0`, `5e0`), as keys from a float column arrive:
    /// refused, with the integer to send instead (up to `u64::MAX`, so 128 bits).
    WholeFloat(i128),
    /// Any other JSON value (its type, as an error names it).
    Other(&'static str),
}

/// Reads any JSON value, keeping only its type's name (for errors).
struct TypeOf;

impl<'de> Visitor<'de> for TypeOf {
    type Value = &'static str;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok("a boolean")
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok("an integer")
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok("an integer")
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
        // An integer too large for 64 bits arrives as a float.
        const TWO_63: f64 = 9_223_372_036_854_775_808.0;
        Ok(if v.fract() != 0.0 {
            "a non-integer number"
        } else if v >= 2.0 * TWO_63 || v <= -TWO_63 {
            "a number outside the 64-bit integer range"
        } else {
            "a number"
        })
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Ok("a string")
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok("null")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok("a list")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok("an object")
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Key<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or an integer")
            }
            fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Self::Value, E> {
                Ok(Key::Str(Text(Cow::Borrowed(s))))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
                Ok(Key::Str(Text(Cow::Owned(s.to_owned()))))
            }
            fn visit_string<E: de::Error>(self, s: String) -> Result<Self::Value, E> {
                Ok(Key::Str(Text(Cow::Owned(s))))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                Ok(Key::Int(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Ok(i64::try_from(v).map_or(Key::UInt(v), Key::Int))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
                TypeOf.visit_bool(v).map(Key::Other)
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
                match TypeOf.visit_f64(v)? {
                    // Whole and within -2^63..2^64, so the cast is exact.
                    "a number" => Ok(Key::WholeFloat(v as i128)),
                    kind => Ok(Key::Other(kind)),
                }
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                TypeOf.visit_unit().map(Key::Other)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
                TypeOf.visit_seq(seq).map(Key::Other)
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                TypeOf.visit_map(map).map(Key::Other)
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Sent<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Sent<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a list of keys")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut keys = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
                while let Some(k) = seq.next_element()? {
                    keys.push(k);
                }
                Ok(Sent::List(keys))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
                TypeOf.visit_bool(v).map(Sent::Other)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                TypeOf.visit_i64(v).map(Sent::Other)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                TypeOf.visit_u64(v).map(Sent::Other)
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
                TypeOf.visit_f64(v).map(Sent::Other)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                TypeOf.visit_str(v).map(Sent::Other)
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                TypeOf.visit_unit().map(Sent::Other)
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                TypeOf.visit_map(map).map(Sent::Other)
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Entities<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Entities<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object of join keys, such as {\"user_id\": [\"u1\"]}")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::with_capacity(1);
                while let Some(entry) = map.next_entry()? {
                    out.push(entry);
                }
                Ok(Entities(out))
            }
        }
        d.deserialize_map(V)
    }
}

impl FeastRequest<'_> {
    /// The join key and the entity keys of the request, checked against the spec's join keys
    /// and `max` (strings as sent; integers in decimal).
    pub fn entity_keys(
        &self,
        spec: &Spec,
        max: usize,
    ) -> Result<(&str, Vec<Cow<'_, str>>), ApiError> {
        let keys: Vec<&str> = spec.entities.iter().map(|e| e.join_key.name()).collect();
        let sent = self.entities.0.as_slice();
        let repeated = (1..sent.len()).find(|i| sent[..*i].iter().any(|(k, _)| *k == sent[*i].0));
        if let Some(key) = repeated.map(|i| &sent[i].0) {
            return Err(ApiError::bad(format!(
                "`entities` holds the join key `{}` more than once: send its values in one list",
                &**key
            )));
        }
        let [(key, sent)] = self.entities.0.as_slice() else {
            return Err(ApiError::bad(format!(
                "`entities` must hold exactly one join key ({}), with a list of values",
                keys.join(", ")
            )));
        };
        if !keys.contains(&&**key) {
            return Err(ApiError::bad(format!(
                "unknown join key `{}` in `entities`: use {}",
                &**key,
                keys.join(", ")
            )));
        }
        let key = &**key;
        let Sent::List(values) = sent else {
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
        let entities = values
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Key::Str(s) => Ok(Cow::Borrowed(&**s)),
                Key::Int(n) => Ok(Cow::Owned(n.to_string())),
                Key::UInt(n) => Ok(Cow::Owned(n.to_string())),
                Key::WholeFloat(n) => Err(ApiError::bad(format!(
                    "`entities.{key}[{i}]` is {n} written as a float, expected a string or an integer (send {n})"
                ))),
                Key::Other(kind) => Err(ApiError::bad(format!(
                    "`entities.{key}[{i}]` is {kind}, expected a string or an integer"
                ))),
            })
            .collect::<Result<_, _>>()?;
        Ok((key, entities))
    }

    /// The keys sent for the (single, checked) join key.
    fn sent_keys(&self) -> &[Key<'_>] {
        match self.entities.0.first() {
            Some((_, Sent::List(keys))) => keys,
            _ => &[],
        }
    }
}

/// One requested feature, resolved.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// Column name in the response.
    pub column: String,
    /// The feature's name in its view (as the served-feature log records it).
    pub name: String,
    /// Its view's index in the spec.
    pub view: usize,
    /// The feature's index in its view.
    pub index: usize,
    /// Its layer.
    pub layer: Layer,
    /// Index among the speed plan's features (streaming only).
    pub speed_index: Option<usize>,
}

/// A resolved feature list: what a request asks for, worked out once per distinct list.
#[derive(Debug)]
pub struct Query {
    /// The features, in request order.
    pub features: Vec<Resolved>,
    /// Whether any feature is streaming.
    pub streaming: bool,
    /// The batch features by view: the view's index, and the features' indices in `features`.
    pub batch: Vec<(usize, Vec<usize>)>,
    /// The column names as JSON, each preceded by a comma (they follow the join key's name).
    names_json: Vec<u8>,
    /// The features' names, shared with the served-feature log's records.
    pub log_names: Arc<[String]>,
    /// What it was resolved from (a cache hit compares it).
    from: (Option<String>, Vec<String>, bool),
}

impl Query {
    /// The query of `features`.
    pub fn new(features: Vec<Resolved>, from: (Option<String>, Vec<String>, bool)) -> Query {
        let mut batch: Vec<(usize, Vec<usize>)> = Vec::new();
        for (j, f) in features.iter().enumerate() {
            if f.layer == Layer::Batch {
                match batch.iter_mut().find(|(v, _)| *v == f.view) {
                    Some((_, cols)) => cols.push(j),
                    None => batch.push((f.view, vec![j])),
                }
            }
        }
        batch.sort_by_key(|(v, _)| *v);
        let mut names_json = Vec::new();
        for f in &features {
            names_json.push(b',');
            write_value(&mut names_json, f.column.as_str());
        }
        Query {
            streaming: features.iter().any(|f| f.layer == Layer::Streaming),
            log_names: features.iter().map(|f| f.name.clone()).collect(),
            features,
            batch,
            names_json,
            from,
        }
    }

    fn is_for(&self, req: &FeastRequest<'_>) -> bool {
        let (service, refs, full) = &self.from;
        *full == req.full_feature_names
            && service.as_deref() == req.feature_service.as_deref()
            && match (&req.feature_service, &req.features) {
                (Some(_), _) => true,
                (None, Some(f)) => {
                    refs.len() == f.len() && refs.iter().zip(f).all(|(a, b)| a == &**b)
                }
                (None, None) => refs.is_empty(),
            }
    }
}

/// Resolved feature lists by what they were resolved from: one per worker thread, so a
/// request's lookup touches no memory another thread writes. Bounded: when full it starts over.
#[derive(Default)]
pub struct QueryCache {
    entries: std::sync::Mutex<Vec<(u64, Arc<Query>)>>,
}

/// Distinct feature lists a worker keeps resolved.
const QUERIES_KEPT: usize = 256;

impl QueryCache {
    /// The resolved features of `req`: from the cache, or resolved (and kept when valid).
    pub fn resolve(
        &self,
        spec: &Spec,
        plan: &duet_speed::plan::SpeedPlan,
        req: &FeastRequest<'_>,
    ) -> Result<Arc<Query>, ApiError> {
        let hash = request_hash(req);
        {
            let entries = self.entries.lock().expect("not poisoned");
            if let Some((_, q)) = entries.iter().find(|(h, q)| *h == hash && q.is_for(req)) {
                return Ok(q.clone());
            }
        }
        let q = Arc::new(resolve(spec, plan, req)?);
        let mut entries = self.entries.lock().expect("not poisoned");
        if entries.len() >= QUERIES_KEPT {
            entries.clear();
        }
        entries.push((hash, q.clone()));
        Ok(q)
    }
}

fn request_hash(req: &FeastRequest<'_>) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = foldhash::fast::FixedState::with_seed(0x0d0e).build_hasher();
    h.write_u8(u8::from(req.full_feature_names));
    match (&req.feature_service, &req.features) {
        (Some(s), _) => {
            h.write_u8(1);
            h.write(s.as_bytes());
        }
        (None, features) => {
            h.write_u8(2);
            for f in features.iter().flatten() {
                h.write_usize(f.len());
                h.write(f.as_bytes());
            }
        }
    }
    h.finish()
}

/// Resolves `view:feature` (or bare `feature`) references, in request order.
pub fn resolve(
    spec: &Spec,
    plan: &duet_speed::plan::SpeedPlan,
    req: &FeastRequest<'_>,
) -> Result<Query, ApiError> {
    // As in Feast, a feature service wins over a feature list.
    let refs: Vec<String> = match (&req.features, &req.feature_service) {
        (_, Some(service)) => {
            let view = spec.view(service).ok_or_else(|| ApiError {
                status: StatusCode::NOT_FOUND,
                message: format!(
                    "unknown feature service `{}` (each view is a service: {})",
                    &**service,
                    view_names(spec)
                ),
            })?;
            view.features
                .iter()
                .map(|f| format!("{}:{}", view.name, f.name))
                .collect()
        }
        (Some(f), None) if !f.is_empty() => f.iter().map(|r| r.to_string()).collect(),
        _ => {
            return Err(ApiError::bad(
                "`features` must list at least one `view:feature` (or give `feature_service`)",
            ));
        }
    };
    let resolved: Vec<Resolved> = refs
        .iter()
        .map(|r| resolve_one(spec, plan, r, req.full_feature_names))
        .collect::<Result<_, _>>()?;
    // Two columns of one name would be ambiguous to every client (Feast refuses them too).
    // Sorted names side by side: no hashing for the usual few dozen features.
    let mut names: Vec<(&str, usize)> = resolved
        .iter()
        .enumerate()
        .map(|(i, f)| (f.column.as_str(), i))
        .collect();
    names.sort_unstable();
    // The first feature, in request order, whose column an earlier one already gave.
    let twice = names
        .windows(2)
        .filter(|w| w[0].0 == w[1].0)
        .map(|w| w[1].1)
        .min();
    if let Some(i) = twice {
        return Err(ApiError::bad(format!(
            "feature `{}` gives column `{}` twice: list each feature once{}",
            refs[i],
            resolved[i].column,
            if req.full_feature_names {
                ""
            } else {
                ", or set \"full_feature_names\": true for features of the same name in two views"
            }
        )));
    }
    let from = match &req.feature_service {
        Some(s) => (Some(s.to_string()), Vec::new(), req.full_feature_names),
        None => (None, refs, req.full_feature_names),
    };
    Ok(Query::new(resolved, from))
}

fn view_names(spec: &Spec) -> String {
    spec.views
        .iter()
        .map(|v| v.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Resolves one reference.
pub fn resolve_one(
    spec: &Spec,
    plan: &duet_speed::plan::SpeedPlan,
    r: &str,
    full: bool,
) -> Result<Resolved, ApiError> {
    let (view_name, feature) = match r.split_once(':') {
        Some((v, f)) => (Some(v), f),
        None => (None, r),
    };
    let not_found = || ApiError {
        status: StatusCode::NOT_FOUND,
        message: format!(
            "unknown feature `{r}`: features are named `view:feature`, such as `user_batch:txn_count_90d`"
        ),
    };
    let (vi, view) = spec
        .views
        .iter()
        .enumerate()
        .find(|(_, v)| {
            view_name.is_none_or(|n| n == v.name) && v.features.iter().any(|f| f.name == feature)
        })
        .ok_or_else(not_found)?;
    let index = view
        .features
        .iter()
        .position(|f| f.name == feature)
        .ok_or_else(not_found)?;
    let speed_index = plan
        .features
        .iter()
        .position(|f| f.view == view.name && f.feature.name == feature);
    Ok(Resolved {
        column: if full {
            format!("{}__{}", view.name, feature)
        } else {
            feature.to_string()
        },
        name: feature.to_string(),
        view: vi,
        index,
        layer: view.layer,
        speed_index,
    })
}

/// A value's status in a Feast response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// A value.
    Present,
    /// The entity is not in the snapshot, or there is no snapshot: the feature's default.
    NotFound,
    /// A null value.
    NullValue,
    /// From a snapshot older than the view's TTL.
    OutsideMaxAge,
    /// The streaming state could not be read.
    Invalid,
}

impl Status {
    /// Its name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Present => "PRESENT",
            Status::NotFound => "NOT_FOUND",
            Status::NullValue => "NULL_VALUE",
            Status::OutsideMaxAge => "OUTSIDE_MAX_AGE",
            Status::Invalid => "INVALID",
        }
    }
}

/// One value of a response.
#[derive(Debug, Clone, Copy)]
pub struct Cell {
    /// The value (a non-finite float is written as null).
    pub value: Value,
    /// Its status.
    pub status: Status,
    /// Its time stamp: an index into [`Table::stamps`].
    pub stamp: u16,
}

impl Cell {
    /// A value served with `status` (PRESENT or OUTSIDE_MAX_AGE); a PRESENT value that is null
    /// on the wire is NULL_VALUE.
    pub fn served(value: Value, status: Status, stamp: u16) -> Cell {
        let null = match value {
            Value::Null => true,
            Value::Int(_) => false,
            Value::Float(x) => !x.is_finite(),
        };
        Cell {
            value,
            status: if null && status == Status::Present {
                Status::NullValue
            } else {
                status
            },
            stamp,
        }
    }

    /// The value as JSON (a non-finite float is null).
    pub fn json(&self) -> Json_ {
        match self.value {
            Value::Null => Json_::Null,
            Value::Int(i) => Json_::from(i),
            Value::Float(x) => serde_json::Number::from_f64(x).map_or(Json_::Null, Json_::Number),
        }
    }

    fn write_json(&self, out: &mut Vec<u8>) {
        match self.value {
            Value::Null => out.extend_from_slice(b"null"),
            Value::Int(i) => write_value(out, &i),
            // serde writes a non-finite float as null, as the JSON of `Cell::json`.
            Value::Float(x) => write_value(out, &x),
        }
    }
}

/// The features' values for the entities of a request: column by column, one cell per entity.
#[derive(Debug)]
pub struct Table {
    /// Entities per column.
    pub rows: usize,
    /// `rows` cells per feature, feature after feature.
    pub cells: Vec<Cell>,
    /// The time stamps the cells point at.
    pub stamps: Vec<Stamp>,
}

impl Table {
    /// Column `j`'s cells.
    pub fn column(&self, j: usize) -> &[Cell] {
        &self.cells[j * self.rows..(j + 1) * self.rows]
    }
}

/// An RFC 3339 time in a response, shared by every value as of the same instant (a response
/// holds one per value, mostly the same few).
#[derive(Debug, Clone)]
pub struct Stamp {
    text: Arc<str>,
    /// Nothing in it needs escaping in JSON.
    plain: bool,
}

impl Stamp {
    /// A stamp of `text`.
    pub fn new(text: &str) -> Stamp {
        Stamp {
            text: text.into(),
            plain: text.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\'),
        }
    }

    /// Its text.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    fn write_json(&self, out: &mut Vec<u8>) {
        if self.plain {
            out.push(b'"');
            out.extend_from_slice(self.text.as_bytes());
            out.push(b'"');
        } else {
            write_value(out, &*self.text);
        }
    }
}

fn write_value(out: &mut Vec<u8>, v: &(impl Serialize + ?Sized)) {
    serde_json::to_writer(out, v).expect("JSON values and strings always serialize into a Vec");
}

/// Writes `items` as a JSON array, each with `item`.
fn write_array<T>(out: &mut Vec<u8>, items: &[T], mut item: impl FnMut(&mut Vec<u8>, &T)) {
    out.push(b'[');
    for (i, x) in items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        item(out, x);
    }
    out.push(b']');
}

/// The time stamp of the join key's column.
pub const EPOCH: &str = "1970-01-01T00:00:00Z";

/// The Feast response body for `req`, whose join key is `key`: the join key's column (the keys
/// as sent), then the query's columns from `table`. Byte for byte what serde writes for the
/// equivalent `serde_json::Value` (tested below).
pub fn feast_response(req: &FeastRequest<'_>, key: &str, query: &Query, table: &Table) -> Vec<u8> {
    let mut out = Vec::with_capacity(160 + query.names_json.len() + 40 * table.cells.len());
    out.extend_from_slice(b"{\"metadata\":{\"feature_names\":[");
    write_value(&mut out, key);
    out.extend_from_slice(&query.names_json);
    out.extend_from_slice(b"]},\"results\":[");
    // The join key as sent (a Feast client decodes an integer key back as an integer).
    let sent = req.sent_keys();
    out.extend_from_slice(b"{\"values\":");
    write_array(&mut out, sent, |o, k| match k {
        Key::Str(s) => write_value(o, &**s),
        Key::Int(n) => write_value(o, n),
        Key::UInt(n) => write_value(o, n),
        Key::Other(_) | Key::WholeFloat(_) => o.extend_from_slice(b"null"),
    });
    out.extend_from_slice(b",\"statuses\":");
    write_array(&mut out, sent, |o, _| o.extend_from_slice(b"\"PRESENT\""));
    out.extend_from_slice(b",\"event_timestamps\":");
    write_array(&mut out, sent, |o, _| {
        o.push(b'"');
        o.extend_from_slice(EPOCH.as_bytes());
        o.push(b'"');
    });
    out.push(b'}');
    for j in 0..query.features.len() {
        let cells = table.column(j);
        out.extend_from_slice(b",{\"values\":");
        write_array(&mut out, cells, |o, c| c.write_json(o));
        out.extend_from_slice(b",\"statuses\":");
        write_array(&mut out, cells, |o, c| {
            o.push(b'"');
            o.extend_from_slice(c.status.as_str().as_bytes());
            o.push(b'"');
        });
        out.extend_from_slice(b",\"event_timestamps\":");
        write_array(&mut out, cells, |o, c| {
            table.stamps[usize::from(c.stamp)].write_json(o)
        });
        out.push(b'}');
    }
    out.extend_from_slice(b"]}");
    out
}

/// The OpenAPI document of a server for `spec` that takes at most `max_entities` keys per
/// request: the request schema names the spec's join keys and both limits.
pub fn openapi(spec: &Spec, max_entities: usize) -> Json_ {
    let keys: serde_json::Map<String, Json_> = spec
        .entities
        .iter()
        .map(|e| {
            let int = serde_json::json!({"type": "integer",
                "minimum": i64::MIN, "maximum": u64::MAX});
            let key = serde_json::json!({"type": "array", "minItems": 1, "maxItems": max_entities,
                "items": {"oneOf": [{"type": "string"}, int]}});
            (e.join_key.name().to_string(), key)
        })
        .collect();
    let entities = serde_json::json!({"type": "object",
        "description": format!("Exactly one join key, with 1 to {max_entities} entity keys (strings, or integers sent as their decimal text)."),
        "minProperties": 1, "maxProperties": 1, "additionalProperties": false,
        "properties": keys});
    let references: Vec<String> = spec
        .views
        .iter()
        .flat_map(|v| {
            v.features
                .iter()
                .map(move |f| format!("{}:{}", v.name, f.name))
        })
        .collect();
    let services: Vec<&str> = spec.views.iter().map(|v| v.name.as_str()).collect();
    serde_json::json!({
        "openapi": "3.0.3",
        "info": {"title": "duet feature server", "version": env!("CARGO_PKG_VERSION"),
                 "description": "Merged batch and streaming features, Feast-compatible."},
        "paths": {
            "/get-online-features": {"post": {
                "summary": "Feature vectors for many entities (Feast wire format)",
                "security": [{"bearer": []}, {}],
                "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/FeastRequest"}}}},
                "responses": {
                    "200": {"description": "One result per column", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/FeastResponse"}}}},
                    "400": {"description": "Bad request", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}},
                    "401": {"description": "Missing or wrong bearer token", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}},
                    "404": {"description": "Unknown feature", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}},
                    "413": {"description": "Body too large", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
                }}},
            "/v1/features/{user_id}": {"get": {
                "summary": "One entity's merged vector as a flat object",
                "security": [{"bearer": []}, {}],
                "parameters": [
                    {"name": "user_id", "in": "path", "required": true, "schema": {"type": "string"}},
                    {"name": "as_of", "in": "query", "required": false, "schema": {"type": "string", "format": "date-time"}}
                ],
                "responses": {
                    "200": {"description": "Feature name to value", "content": {"application/json": {"schema": {"type": "object", "additionalProperties": true}}}},
                    "400": {"description": "Bad request", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}},
                    "401": {"description": "Missing or wrong bearer token", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
                }}},
            "/healthz": {"get": {"summary": "Liveness", "responses": {"200": {"description": "alive"}}}},
            "/readyz": {"get": {"summary": "Ready once every batch view has a snapshot and Redis answers",
                "responses": {"200": {"description": "ready"}, "503": {"description": "not ready", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "text exposition"}}}},
            "/openapi.json": {"get": {"summary": "This document", "responses": {"200": {"description": "OpenAPI 3"}}}}
        },
        "components": {
          "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
              "description": "Required on the feature endpoints when the server has a token (`--auth-token`, `DUET_AUTH_TOKEN` or `auth_token` in the config file); the other endpoints never need it."}},
          "schemas": {
            // `features` and `feature_service` may be null (as Feast's own server takes them);
            // at least one of them must hold something, and a service wins over a list.
            "FeastRequest": {"type": "object", "required": ["entities"],
              "anyOf": [
                {"required": ["feature_service"], "properties": {"feature_service": {"type": "string", "enum": services}}},
                {"required": ["features"], "properties": {"features": {"type": "array", "minItems": 1, "uniqueItems": true,
                    "items": {"type": "string", "enum": references}}}}
              ],
              "properties": {
                "features": {"type": "array", "nullable": true, "items": {"type": "string"},
                    "description": "`view:feature` references; an unknown one is a 404, two giving the same column a 400. Ignored when `feature_service` is given. (The server also takes a bare feature name, meaning the first view in spec order that has it; this schema lists only the `view:feature` form, since a bare name and its reference give the same column.)",
                    "example": ["user_batch:txn_count_90d", "user_realtime:txn_count_1h"]},
                "feature_service": {"type": "string", "nullable": true,
                    "description": "A view's name: all of its features. An unknown one is a 404."},
                "entities": entities,
                "full_feature_names": {"type": "boolean"},
                "as_of": {"type": "string", "format": "date-time", "nullable": true,
                    "description": "Evaluate as of this instant (RFC 3339, any UTC offset; a leap second, `:60`, is refused) instead of now. Batch features come from the snapshot of its cadence boundary, or the newest published before it (OUTSIDE_MAX_AGE when older than the view's TTL)."}
            }},
            "FeastResponse": {"type": "object", "properties": {
                "metadata": {"type": "object", "properties": {"feature_names": {"type": "array", "items": {"type": "string"}}}},
                "results": {"type": "array", "items": {"type": "object", "properties": {
                    "values": {"type": "array", "items": {}},
                    "statuses": {"type": "array", "items": {"type": "string", "enum": ["PRESENT", "NOT_FOUND", "NULL_VALUE", "OUTSIDE_MAX_AGE", "INVALID"]}},
                    "event_timestamps": {"type": "array", "items": {"type": "string"}}
                }}}
            }},
            "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}
        }}
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec_and_plan() -> (Spec, duet_speed::plan::SpeedPlan) {
        let spec = duet_spec::load_spec(None).unwrap();
        let plan = duet_speed::plan::SpeedPlan::compile(&spec);
        (spec, plan)
    }

    #[test]
    fn a_repeated_column_names_its_first_repeat_in_request_order() {
        let (spec, plan) = spec_and_plan();
        let body = serde_json::json!({
            "entities": {"user_id": ["u1"]},
            "features": [
                "user_realtime:txn_count_1h",
                "user_batch:txn_count_90d",
                "txn_count_90d",
                "user_realtime:txn_count_1h",
            ],
        })
        .to_string();
        let req: FeastRequest<'_> = serde_json::from_str(&body).unwrap();
        let err = resolve(&spec, &plan, &req).unwrap_err();
        assert!(
            err.message
                .starts_with("feature `txn_count_90d` gives column `txn_count_90d` twice"),
            "{}",
            err.message
        );
        // Distinct columns resolve in request order.
        let body = serde_json::json!({
            "entities": {"user_id": ["u1"]},
            "features": ["user_batch:txn_count_90d", "txn_count_1h"],
            "full_feature_names": true,
        })
        .to_string();
        let req: FeastRequest<'_> = serde_json::from_str(&body).unwrap();
        let got: Vec<String> = resolve(&spec, &plan, &req)
            .unwrap()
            .features
            .into_iter()
            .map(|r| r.column)
            .collect();
        assert_eq!(
            got,
            ["user_batch__txn_count_90d", "user_realtime__txn_count_1h"]
        );
    }

    #[test]
    fn strings_are_borrowed_from_the_body_unless_escaped() {
        let body = r#"{"features": ["user_batch:txn_count_90d", "txn_count_1\u0068"],
                       "entities": {"user_id": ["u1", "u\"2"]}}"#;
        let req: FeastRequest<'_> = serde_json::from_str(body).unwrap();
        let f = req.features.as_ref().unwrap();
        assert!(matches!(f[0].0, Cow::Borrowed("user_batch:txn_count_90d")));
        assert!(matches!(&f[1].0, Cow::Owned(s) if s == "txn_count_1h"));
        let (spec, _) = spec_and_plan();
        let (key, entities) = req.entity_keys(&spec, 10).unwrap();
        assert_eq!(key, "user_id");
        assert!(matches!(entities[0], Cow::Borrowed("u1")));
        assert_eq!(entities[1], "u\"2");
    }

    #[test]
    fn bad_entities_are_named() {
        let (spec, _) = spec_and_plan();
        let err = |body: &str| {
            let req: FeastRequest<'_> = serde_json::from_str(body).unwrap();
            req.entity_keys(&spec, 3).unwrap_err().message
        };
        assert_eq!(
            err(r#"{"entities": {"user_id": ["u1", 2.5]}}"#),
            "`entities.user_id[1]` is a non-integer number, expected a string or an integer"
        );
        for (sent, kind) in [
            (
                "18446744073709551616",
                "a number outside the 64-bit integer range",
            ),
            (
                "-9223372036854775809",
                "a number outside the 64-bit integer range",
            ),
            (
                "-1254673126156149719040",
                "a number outside the 64-bit integer range",
            ),
            ("1e300", "a number outside the 64-bit integer range"),
            ("-0.5", "a non-integer number"),
            ("true", "a boolean"),
            ("null", "null"),
            ("[1]", "a list"),
            ("{\"a\": [1]}", "an object"),
        ] {
            assert_eq!(
                err(&format!(
                    r#"{{"entities": {{"user_id": ["u1", "u2", {sent}]}}}}"#
                )),
                format!("`entities.user_id[2]` is {kind}, expected a string or an integer")
            );
        }
        // A whole number written as a float (a pandas float column's keys) is refused with
        // the integer to send; the bounds of the 64-bit range stay "outside".
        for (sent, n) in [
            ("5.0", "5"),
            ("5e0", "5"),
            ("-0.0", "0"),
            ("1.5e3", "1500"),
            ("-9.2e18", "-9200000000000000000"),
            ("1e19", "10000000000000000000"),
        ] {
            assert_eq!(
                err(&format!(r#"{{"entities": {{"user_id": [{sent}]}}}}"#)),
                format!(
                    "`entities.user_id[0]` is {n} written as a float, expected a string or an integer (send {n})"
                )
            );
        }
        assert_eq!(
            err(r#"{"entities": {"user_id": 5.0}}"#),
            "`entities.user_id` must be a list, such as [\"u1\", \"u2\"]"
        );
        assert_eq!(
            err(r#"{"entities": {"user_id": "u1"}}"#),
            "`entities.user_id` must be a list, such as [\"u1\", \"u2\"]"
        );
        assert_eq!(
            err(r#"{"entities": {"user_id": []}}"#),
            "`entities.user_id` is empty"
        );
        assert_eq!(
            err(r#"{"entities": {"user_id": ["a", "b", "c", "d"]}}"#),
            "too many entities: 4 in one request, at most 3"
        );
        assert!(
            err(r#"{"entities": {"account": ["a"]}}"#).starts_with("unknown join key `account`")
        );
        assert!(
            err(r#"{"entities": {}}"#).starts_with("`entities` must hold exactly one join key")
        );
        assert!(
            err(r#"{"entities": {"user_id": ["a"], "user_id2": ["b"]}}"#)
                .starts_with("`entities` must hold exactly one join key")
        );
        assert_eq!(
            err(r#"{"entities": {"user_id": ["a"], "user_id": ["b"]}}"#),
            "`entities` holds the join key `user_id` more than once: send its values in one list"
        );
        // Integers are keys in decimal, up to u64.
        let req: FeastRequest<'_> =
            serde_json::from_str(r#"{"entities": {"user_id": [-7, 18446744073709551615]}}"#)
                .unwrap();
        let (_, keys) = req.entity_keys(&spec, 3).unwrap();
        assert_eq!(keys, ["-7", "18446744073709551615"]);
        // Not an object at all: a JSON error.
        assert!(serde_json::from_str::<FeastRequest<'_>>(r#"{"entities": ["u1"]}"#).is_err());
    }

    #[test]
    fn the_cache_resolves_each_distinct_list_once() {
        let (spec, plan) = spec_and_plan();
        let cache = QueryCache::default();
        let ask = |body: &str| {
            let req: FeastRequest<'_> = serde_json::from_str(body).unwrap();
            cache.resolve(&spec, &plan, &req)
        };
        let a = ask(r#"{"features": ["txn_count_1h", "user_batch:txn_count_90d"], "entities": {"user_id": ["u1"]}}"#).unwrap();
        let again = ask(r#"{"features": ["txn_count_1h", "user_batch:txn_count_90d"], "entities": {"user_id": ["u2"]}}"#).unwrap();
        assert!(Arc::ptr_eq(&a, &again));
        let swapped = ask(r#"{"features": ["user_batch:txn_count_90d", "txn_count_1h"], "entities": {"user_id": ["u1"]}}"#).unwrap();
        assert!(!Arc::ptr_eq(&a, &swapped));
        assert_eq!(swapped.features[0].column, "txn_count_90d");
        let full = ask(r#"{"features": ["txn_count_1h", "user_batch:txn_count_90d"], "full_feature_names": true, "entities": {"user_id": ["u1"]}}"#).unwrap();
        assert_eq!(full.features[0].column, "user_realtime__txn_count_1h");
        // A feature service wins over a feature list, as in Feast.
        let service = ask(r#"{"feature_service": "user_batch", "features": ["txn_count_1h"], "entities": {"user_id": ["u1"]}}"#).unwrap();
        assert!(service.features.iter().all(|f| f.layer == Layer::Batch));
        assert!(!service.streaming);
        assert_eq!(service.batch.len(), 1);
        let other = ask(r#"{"feature_service": "user_realtime", "entities": {"user_id": ["u1"]}}"#)
            .unwrap();
        assert!(other.streaming && other.batch.is_empty());
        // Errors are answered every time, never kept.
        for _ in 0..2 {
            let e = ask(r#"{"features": ["nope"], "entities": {"user_id": ["u1"]}}"#).unwrap_err();
            assert_eq!(e.status, StatusCode::NOT_FOUND);
        }
        // Bounded: more distinct lists than it keeps start it over, and all still resolve.
        let all: Vec<(String, String)> = spec
            .features()
            .map(|(v, f)| (v.name.clone(), f.name.clone()))
            .collect();
        let n = all.len();
        for i in 0..(QUERIES_KEPT + 40) {
            let a = i % n;
            let b = (a + 1 + (i / n) % (n - 1)) % n;
            let first = if i / (n * (n - 1)) % 2 == 1 {
                format!("{}:{}", all[a].0, all[a].1)
            } else {
                all[a].1.clone()
            };
            let body = serde_json::json!({
                "features": [first, format!("{}:{}", all[b].0, all[b].1)],
                "entities": {"user_id": ["u1"]},
            })
            .to_string();
            let req: FeastRequest<'_> = serde_json::from_str(&body).unwrap();
            cache.resolve(&spec, &plan, &req).unwrap();
        }
        assert!(cache.entries.lock().unwrap().len() <= QUERIES_KEPT);
    }

    #[test]
    fn the_hand_written_body_is_what_serde_writes() {
        let (spec, plan) = spec_and_plan();
        let body = r#"{"features": ["txn_count_1h", "user_batch:txn_count_90d"],
                       "entities": {"user_id": ["u\"1\\", 7, 18446744073709551615]}}"#;
        let req: FeastRequest<'_> = serde_json::from_str(body).unwrap();
        let query = resolve(&spec, &plan, &req).unwrap();
        let table = Table {
            rows: 3,
            cells: vec![
                Cell::served(Value::Int(3), Status::Present, 0),
                Cell::served(Value::Null, Status::Present, 1),
                Cell::served(Value::Float(f64::NAN), Status::Present, 2),
                Cell::served(Value::Float(1.5), Status::OutsideMaxAge, 2),
                Cell::served(Value::Float(-0.25), Status::NotFound, 0),
                Cell {
                    value: Value::Float(1e300),
                    status: Status::Invalid,
                    stamp: 1,
                },
            ],
            stamps: vec![
                Stamp::new("2026-12-03T10:00:00.123Z"),
                Stamp::new("odd \"stamp\"\u{1}"),
                Stamp::new(""),
            ],
        };
        assert_eq!(table.cells[1].status, Status::NullValue);
        assert_eq!(table.cells[2].status, Status::NullValue);
        let expected = serde_json::json!({
            "metadata": {"feature_names": ["user_id", "txn_count_1h", "txn_count_90d"]},
            "results": [
                {"values": ["u\"1\\", 7, 18446744073709551615u64],
                 "statuses": ["PRESENT", "PRESENT", "PRESENT"],
                 "event_timestamps": [EPOCH, EPOCH, EPOCH]},
                {"values": [3, null, null],
                 "statuses": ["PRESENT", "NULL_VALUE", "NULL_VALUE"],
                 "event_timestamps": ["2026-12-03T10:00:00.123Z", "odd \"stamp\"\u{1}", ""]},
                {"values": [1.5, -0.25, 1e300],
                 "statuses": ["OUTSIDE_MAX_AGE", "NOT_FOUND", "INVALID"],
                 "event_timestamps": ["", "2026-12-03T10:00:00.123Z", "odd \"stamp\"\u{1}"]},
            ],
        });
        assert_eq!(
            String::from_utf8(feast_response(&req, "user_id", &query, &table)).unwrap(),
            serde_json::to_string(&expected).unwrap()
        );
        assert_eq!(table.cells[2].json(), Json_::Null);
        assert_eq!(table.cells[3].json(), serde_json::json!(1.5));
    }
}
