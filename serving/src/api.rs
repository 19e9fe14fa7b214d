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
    let refs: Vec<String> = match (&req.features, &req.feature_service) {
        (_, Some(service)) => {
            let view = spec.view(service).ok_or_else(|| ApiError {
                status: StatusCode::NOT_FOUND,
                message: format!(
                    "unknown feature service `{service}` (each view is a service: {})",
                    view_names(spec)
                ),
            })?;
            view.features
                .iter()
                .map(|f| format!("{}:{}", view.name, f.name))
                .collect()
        }
        (Some(f), None) if !f.is_empty() => f.clone(),
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
    let mut seen = std::collections::HashSet::new();
    for (r, f) in refs.iter().zip(&resolved) {
        if !seen.insert(f.column.as_str()) {
            return Err(ApiError::bad(format!(
                "feature `{r}` gives column `{}` twice: list each feature once{}",
                f.column,
                if req.full_feature_names {
                    ""
                } else {
                    ", or set \"full_feature_names\": true for features of the same name in two views"
                }
            )));
        }
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
    pub event_timestamps: Vec<String>,
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
