//! The validated spec: what every layer compiles from.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

use crate::duration::Duration;
use crate::expr::{Expr, Field};

/// A parsed and validated feature spec.
#[derive(Debug, Clone, Serialize)]
pub struct Spec {
    /// The spec's version number, recorded in every snapshot made from it.
    pub version: u32,
    /// The entities features are keyed by.
    pub entities: Vec<Entity>,
    /// The views, in file order.
    pub views: Vec<View>,
}

/// Something features describe, such as a user.
#[derive(Debug, Clone, Serialize)]
pub struct Entity {
    /// The entity's name.
    pub name: String,
    /// The event field that identifies an instance of the entity.
    pub join_key: Field,
}

/// Which layer computes a view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Layer {
    /// Daily (or other cadence) snapshots computed by `duet batch`.
    Batch,
    /// Kept fresh by `duet speed run`, exact as of any instant.
    Streaming,
}

impl fmt::Display for Layer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Layer::Batch => "batch",
            Layer::Streaming => "streaming",
        })
    }
}

/// A group of features computed by one layer for one entity.
#[derive(Debug, Clone, Serialize)]
pub struct View {
    /// The view's name, used in `view:feature` references.
    pub name: String,
    /// The entity's name.
    pub entity: String,
    /// The entity's join key.
    pub join_key: Field,
    /// The layer computing the view.
    pub layer: Layer,
    /// Batch: how old a snapshot may be before its values are `OUTSIDE_MAX_AGE`.
    pub ttl: Option<Duration>,
    /// Batch: the spacing of snapshots (snapshots are taken at multiples of it, from the epoch).
    pub cadence: Duration,
    /// Streaming: how far behind the watermark an event may arrive and still count.
    pub allowed_lateness: Duration,
    /// Streaming: how far behind the watermark the speed layer keeps every accepted event
    /// beside the entity's state, so that evaluations as of earlier instants (the server's
    /// `as_of`) stay exact that far back. Zero: none kept. Part of the streaming state's
    /// fingerprint: a history must hold every event since the state's first, so changing it
    /// needs a new prefix. Not serialized when zero, so a spec without one keeps the
    /// fingerprint it had before `history` existed.
    #[serde(skip_serializing_if = "Duration::is_zero")]
    pub history: Duration,
    /// The features, in file order.
    pub features: Vec<Feature>,
}

/// The type of a feature's values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ValueType {
    /// A 64-bit integer.
    Int,
    /// A 64-bit float.
    Float,
}

/// A feature value.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, serde::Deserialize)]
#[serde(untagged)]
pub enum Value {
    /// No value.
    Null,
    /// An integer.
    Int(i64),
    /// A float.
    Float(f64),
}

impl Value {
    /// The value as a float, `None` for null.
    pub fn as_f64(self) -> Option<f64> {
        match self {
            Value::Null => None,
            Value::Int(i) => Some(i as f64),
            Value::Float(x) => Some(x),
        }
    }

    /// True for [`Value::Null`].
    pub fn is_null(self) -> bool {
        matches!(self, Value::Null)
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Null => f.write_str("null"),
            Value::Int(i) => write!(f, "{i}"),
            Value::Float(x) => write!(f, "{x}"),
        }
    }
}

/// How far two computations of a feature may differ and still agree.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Tolerance {
    /// Largest allowed absolute difference.
    pub absolute: f64,
    /// Largest allowed difference relative to the larger magnitude.
    pub relative: f64,
}

impl Tolerance {
    /// Values must be equal.
    pub const EXACT: Tolerance = Tolerance {
        absolute: 0.0,
        relative: 0.0,
    };

    /// True when `a` and `b` agree: both null, or both numbers within either bound.
    pub fn agrees(&self, a: Value, b: Value) -> bool {
        match (a.as_f64(), b.as_f64()) {
            (None, None) => true,
            (Some(x), Some(y)) => {
                let d = (x - y).abs();
                x == y || d <= self.absolute || d <= self.relative * x.abs().max(y.abs())
            }
            _ => false,
        }
    }
}

/// Which events a measure looks at: those whose text fields hold one of the listed values.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Filter {
    /// Field → accepted values; empty means every event.
    pub conditions: BTreeMap<&'static str, Vec<String>>,
    #[serde(skip)]
    fields: Vec<(Field, Vec<String>)>,
}

impl Filter {
    /// A filter keeping events whose `field` is one of `values`, for every listed field.
    pub fn new(conditions: Vec<(Field, Vec<String>)>) -> Filter {
        Filter {
            conditions: conditions
                .iter()
                .map(|(f, v)| (f.name(), v.clone()))
                .collect(),
            fields: conditions,
        }
    }

    /// True when the filter keeps every event.
    pub fn is_all(&self) -> bool {
        self.fields.is_empty()
    }

    /// The conditions, as (field, accepted values).
    pub fn conditions(&self) -> &[(Field, Vec<String>)] {
        &self.fields
    }

    /// True when `event` passes the filter.
    pub fn accepts(&self, event: &crate::event::Event) -> bool {
        self.fields.iter().all(|(field, values)| {
            let v: &str = match field {
                Field::EventId => &event.event_id,
                Field::UserId => &event.user_id,
                Field::EventType => &event.event_type,
                Field::Amount | Field::Ts => return false,
            };
            values.iter().any(|x| x == v)
        })
    }
}

impl fmt::Display for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_all() {
            return f.write_str("all events");
        }
        for (i, (field, values)) in self.fields.iter().enumerate() {
            if i > 0 {
                f.write_str(" and ")?;
            }
            write!(f, "{} in [{}]", field.name(), values.join(", "))?;
        }
        Ok(())
    }
}

/// The primitive aggregation of a measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Agg {
    /// Number of matching events.
    Count,
    /// Sum of the value over matching events.
    Sum,
    /// Mean of the value over matching events.
    Mean,
    /// Smallest value.
    Min,
    /// Largest value.
    Max,
    /// Number of distinct values.
    CountDistinct,
    /// The value of the latest matching event (by `ts`, ties broken by the greatest `event_id`).
    Last,
    /// Session only: `last_ts - first_ts` of the session in seconds.
    Duration,
}

impl Agg {
    /// The aggregation's name in specs.
    pub fn name(self) -> &'static str {
        match self {
            Agg::Count => "count",
            Agg::Sum => "sum",
            Agg::Mean => "mean",
            Agg::Min => "min",
            Agg::Max => "max",
            Agg::CountDistinct => "count_distinct",
            Agg::Last => "last",
            Agg::Duration => "duration",
        }
    }

    /// True when the aggregation reads a value expression.
    pub fn needs_value(self) -> bool {
        !matches!(self, Agg::Count | Agg::Duration)
    }

    /// The type of the aggregation's result.
    pub fn value_type(self) -> ValueType {
        match self {
            Agg::Count | Agg::CountDistinct => ValueType::Int,
            _ => ValueType::Float,
        }
    }
}

/// One primitive aggregation over filtered events.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Measure {
    /// The aggregation.
    pub agg: Agg,
    /// Which events it looks at.
    pub filter: Filter,
    /// What it aggregates (absent for `count` and `duration`).
    #[serde(serialize_with = "serialize_expr")]
    pub value: Option<Expr>,
}

fn serialize_expr<S: serde::Serializer>(e: &Option<Expr>, s: S) -> Result<S::Ok, S::Error> {
    match e {
        Some(e) => s.serialize_some(&e.to_string()),
        None => s.serialize_none(),
    }
}

impl fmt::Display for Measure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.value {
            Some(v) => write!(f, "{}({v}) over {}", self.agg.name(), self.filter),
            None => write!(f, "{} over {}", self.agg.name(), self.filter),
        }
    }
}

/// Which events, relative to the evaluation instant `T`, a feature covers.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Extent {
    /// `ceil_R(T) - window <= ts < T`.
    Sliding {
        /// The window `W`.
        window: Duration,
        /// The resolution `R` (divides `W`).
        resolution: Duration,
    },
    /// Every event with `ts < T`.
    AllHistory,
    /// The current session: events separated by gaps of at most `gap`, holding the latest event
    /// before `T`, and only while `T - last_ts <= gap`.
    Session {
        /// The largest gap inside a session.
        gap: Duration,
    },
    /// `T - ttl <= ts < T` (used by `last` with a `ttl`).
    Recent {
        /// How long a value stays valid.
        ttl: Duration,
    },
}

impl Extent {
    /// How far before `T` the oldest event this extent can read lies, if bounded.
    pub fn lookback(&self) -> Option<Duration> {
        match self {
            Extent::Sliding { window, .. } => Some(*window),
            Extent::Recent { ttl } => Some(*ttl),
            Extent::Session { .. } | Extent::AllHistory => None,
        }
    }
}

impl fmt::Display for Extent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Extent::Sliding { window, resolution } => {
                write!(f, "window {window} at resolution {resolution}")
            }
            Extent::AllHistory => f.write_str("all history"),
            Extent::Session { gap } => write!(f, "current session (gap {gap})"),
            Extent::Recent { ttl } => write!(f, "last {ttl}"),
        }
    }
}

/// What a feature computes.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Aggregation {
    /// One measure.
    Measure(Measure),
    /// `numerator / denominator`; null when the denominator is null or zero.
    Ratio {
        /// The numerator.
        numerator: Measure,
        /// The denominator.
        denominator: Measure,
    },
    /// Cumulative-distribution rank over every entity for which `of` is not null: the fraction
    /// whose value (rounded to `round` decimals) is `<=` this entity's. Batch only.
    PctRank {
        /// The ranked measure.
        of: Measure,
        /// Decimal places the measure is rounded to before ranking.
        round: Option<u32>,
    },
    /// `floor((T - first_ts) / unit)`, `first_ts` the earliest matching event before `T`.
    /// Batch only.
    Age {
        /// Which events count.
        filter: Filter,
        /// The unit of the result.
        unit: Duration,
    },
}

impl Aggregation {
    /// The aggregation's name in specs.
    pub fn name(&self) -> &'static str {
        match self {
            Aggregation::Measure(m) => m.agg.name(),
            Aggregation::Ratio { .. } => "ratio",
            Aggregation::PctRank { .. } => "pct_rank",
            Aggregation::Age { .. } => "age",
        }
    }

    /// The primitive measures the aggregation is built from.
    pub fn measures(&self) -> Vec<&Measure> {
        match self {
            Aggregation::Measure(m) => vec![m],
            Aggregation::Ratio {
                numerator,
                denominator,
            } => vec![numerator, denominator],
            Aggregation::PctRank { of, .. } => vec![of],
            Aggregation::Age { .. } => vec![],
        }
    }
}

/// One served feature.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Feature {
    /// The served name: `base_name`, or `base_name_v{version}` when versioned.
    pub name: String,
    /// The name as written in the spec.
    pub base_name: String,
    /// The explicit version, if any.
    pub version: Option<u32>,
    /// What it computes.
    pub aggregation: Aggregation,
    /// Which events it covers.
    pub extent: Extent,
    /// The value's type.
    pub value_type: ValueType,
    /// The value when there is nothing to aggregate ("none").
    pub default: Value,
    /// The consistency tolerance.
    pub tolerance: Tolerance,
}

impl Feature {
    /// A stable digest of everything that defines the feature's values. Two features with the
    /// same fingerprint compute the same numbers.
    pub fn fingerprint(&self) -> String {
        use sha2::Digest;
        let canonical = serde_json::json!({
            "aggregation": &self.aggregation,
            "extent": &self.extent,
            "value_type": &self.value_type,
            "default": &self.default,
        });
        hex::encode(&sha2::Sha256::digest(canonical.to_string().as_bytes())[..8])
    }
}

impl Spec {
    /// The view called `name`.
    pub fn view(&self, name: &str) -> Option<&View> {
        self.views.iter().find(|v| v.name == name)
    }

    /// The views of one layer.
    pub fn views_of(&self, layer: Layer) -> impl Iterator<Item = &View> {
        self.views.iter().filter(move |v| v.layer == layer)
    }

    /// Every feature with its view, in file order.
    pub fn features(&self) -> impl Iterator<Item = (&View, &Feature)> {
        self.views
            .iter()
            .flat_map(|v| v.features.iter().map(move |f| (v, f)))
    }

    /// The feature with served name `name`, with its view.
    pub fn feature(&self, name: &str) -> Option<(&View, &Feature)> {
        self.features().find(|(_, f)| f.name == name)
    }

    /// A digest of the whole spec's meaning (views, features, versions).
    pub fn fingerprint(&self) -> String {
        use sha2::Digest;
        let text = serde_json::to_string(self).expect("a spec always serializes");
        hex::encode(&sha2::Sha256::digest(text.as_bytes())[..8])
    }
}
