//! The HTTP API's data: Feast-compatible requests and responses, feature resolution, errors.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use duet_spec::{Layer, Spec};
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
        (
            self.status,
            Json(serde_json::json!({ "error": self.message })),
        )
            .into_response()
    }
}

/// The request body of `POST /get-online-features`, as Feast's clients send it.
#[derive(Debug, Deserialize)]
pub struct FeastRequest {
    /// `view:feature` references.
    #[serde(default)]
    pub features: Option<Vec<String>>,
    /// A feature service; duet serves each view as a service of the same name.
    #[serde(default)]
    pub feature_service: Option<String>,
    /// Join key → values.
    pub entities: serde_json::Map<String, Json_>,
    /// Name columns `view__feature` instead of `feature`.
    #[serde(default)]
    pub full_feature_names: bool,
    /// Evaluate as of this instant (RFC 3339) instead of now.
    #[serde(default)]
    pub as_of: Option<String>,
}

/// One requested feature, resolved.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// Column name in the response.
    pub column: String,
    /// Its view's index in the spec.
    pub view: usize,
    /// The feature's index in its view.
    pub index: usize,
    /// Its layer.
    pub layer: Layer,
    /// Index among the speed plan's features (streaming only).
    pub speed_index: Option<usize>,
}

/// Resolves `view:feature` (or bare `feature`) references, in request order.
pub fn resolve(
    spec: &Spec,
    plan: &duet_speed::plan::SpeedPlan,
    req: &FeastRequest,
) -> Result<Vec<Resolved>, ApiError> {
    // As in Feast, a feature service wins over a feature list.
    let service_refs: Vec<String>;
    let refs: &[String] = match (&req.features, &req.feature_service) {
        (_, Some(service)) => {
            let view = spec.view(service).ok_or_else(|| ApiError {
                status: StatusCode::NOT_FOUND,
                message: format!(
                    "unknown feature service `{service}` (each view is a service: {})",
                    view_names(spec)
                ),
            })?;
            service_refs = view
                .features
                .iter()
                .map(|f| format!("{}:{}", view.name, f.name))
                .collect();
            &service_refs
        }
        (Some(f), None) if !f.is_empty() => f,
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
    Ok(resolved)
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
        view: vi,
        index,
        layer: view.layer,
        speed_index,
    })
}

/// One column of a Feast response.
#[derive(Debug, Serialize)]
pub struct FeastColumn {
    /// Values, one per entity.
    pub values: Vec<Json_>,
    /// `PRESENT`, `NOT_FOUND`, `NULL_VALUE`, `OUTSIDE_MAX_AGE` or `INVALID`.
    pub statuses: Vec<&'static str>,
    /// RFC 3339 times the values are as of.
    pub event_timestamps: Vec<Stamp>,
}

/// An RFC 3339 time in a response, shared by every value as of the same instant (a response
/// holds one per value, mostly the same few).
#[derive(Debug, Clone)]
pub struct Stamp {
    text: std::sync::Arc<str>,
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

impl Serialize for Stamp {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
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

impl FeastResponse {
    /// The response body, byte for byte what serde writes for it, but the statuses (constant
    /// words) and time stamps (checked once) are copied without escaping each one again.
    pub fn to_json(&self) -> Vec<u8> {
        let cells: usize = self.results.iter().map(|c| c.values.len()).sum();
        let mut out = Vec::with_capacity(128 + 48 * cells);
        out.extend_from_slice(b"{\"metadata\":{\"feature_names\":");
        write_array(&mut out, &self.metadata.feature_names, |o, n| {
            write_value(o, n)
        });
        out.extend_from_slice(b"},\"results\":");
        write_array(&mut out, &self.results, |o, c| {
            o.extend_from_slice(b"{\"values\":");
            write_array(o, &c.values, write_value);
            o.extend_from_slice(b",\"statuses\":");
            write_array(o, &c.statuses, |o, s| {
                debug_assert!(s.bytes().all(|b| b.is_ascii_uppercase() || b == b'_'));
                o.push(b'"');
                o.extend_from_slice(s.as_bytes());
                o.push(b'"');
            });
            o.extend_from_slice(b",\"event_timestamps\":");
            write_array(o, &c.event_timestamps, |o, t| t.write_json(o));
            o.push(b'}');
        });
        out.push(b'}');
        out
    }
}

/// A Feast response.
#[derive(Debug, Serialize)]
pub struct FeastResponse {
    /// `{"feature_names": [...]}`.
    pub metadata: Metadata,
    /// One result per column: the join key, then the features.
    pub results: Vec<FeastColumn>,
}

/// Response metadata.
#[derive(Debug, Serialize)]
pub struct Metadata {
    /// Column names.
    pub feature_names: Vec<String>,
}

/// The OpenAPI document of the server.
pub fn openapi() -> Json_ {
    serde_json::json!({
        "openapi": "3.0.3",
        "info": {"title": "duet feature server", "version": env!("CARGO_PKG_VERSION"),
                 "description": "Merged batch and streaming features, Feast-compatible."},
        "paths": {
            "/get-online-features": {"post": {
                "summary": "Feature vectors for many entities (Feast wire format)",
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
        "components": {"schemas": {
            "FeastRequest": {"type": "object", "required": ["entities"], "properties": {
                "features": {"type": "array", "items": {"type": "string"}, "example": ["user_batch:txn_count_90d", "user_realtime:txn_count_1h"]},
                "feature_service": {"type": "string"},
                "entities": {"type": "object", "additionalProperties": {"type": "array", "items": {"oneOf": [{"type": "string"}, {"type": "integer"}]}}},
                "full_feature_names": {"type": "boolean"},
                "as_of": {"type": "string", "format": "date-time"}
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

    #[test]
    fn a_repeated_column_names_its_first_repeat_in_request_order() {
        let spec = duet_spec::load_spec(None).unwrap();
        let plan = duet_speed::plan::SpeedPlan::compile(&spec);
        let req: FeastRequest = serde_json::from_value(serde_json::json!({
            "entities": {"user_id": ["u1"]},
            "features": [
                "user_realtime:txn_count_1h",
                "user_batch:txn_count_90d",
                "txn_count_90d",
                "user_realtime:txn_count_1h",
            ],
        }))
        .unwrap();
        let err = resolve(&spec, &plan, &req).unwrap_err();
        assert!(
            err.message
                .starts_with("feature `txn_count_90d` gives column `txn_count_90d` twice"),
            "{}",
            err.message
        );
        // Distinct columns resolve in request order.
        let req: FeastRequest = serde_json::from_value(serde_json::json!({
            "entities": {"user_id": ["u1"]},
            "features": ["user_batch:txn_count_90d", "txn_count_1h"],
            "full_feature_names": true,
        }))
        .unwrap();
        let got: Vec<String> = resolve(&spec, &plan, &req)
            .unwrap()
            .into_iter()
            .map(|r| r.column)
            .collect();
        assert_eq!(
            got,
            ["user_batch__txn_count_90d", "user_realtime__txn_count_1h"]
        );
    }

    #[test]
    fn the_hand_written_body_is_what_serde_writes() {
        let resp = FeastResponse {
            metadata: Metadata {
                feature_names: vec!["user_id".into(), "a\"b".into(), "ü\n".into()],
            },
            results: vec![
                FeastColumn {
                    values: vec![Json_::from("u\"1\\"), Json_::from(7), Json_::Null],
                    statuses: vec!["PRESENT", "NOT_FOUND", "NULL_VALUE"],
                    event_timestamps: vec![
                        Stamp::new("1970-01-01T00:00:00Z"),
                        Stamp::new("odd \"stamp\"\u{1}"),
                        Stamp::new(""),
                    ],
                },
                FeastColumn {
                    values: vec![Json_::from(1.5), Json_::from(-0.25), Json_::from(1e300)],
                    statuses: vec!["PRESENT", "OUTSIDE_MAX_AGE", "INVALID"],
                    event_timestamps: vec![Stamp::new("2026-12-03T10:00:00.123Z"); 3],
                },
                FeastColumn {
                    values: vec![],
                    statuses: vec![],
                    event_timestamps: vec![],
                },
            ],
        };
        let serde = serde_json::to_vec(&resp).unwrap();
        assert_eq!(
            String::from_utf8(resp.to_json()).unwrap(),
            String::from_utf8(serde).unwrap()
        );
    }
}
