//! # duet-spec: one formal definition of every feature
//!
//! The heart of duet. A spec (TOML, see `docs/spec.md`) declares entities, views and features;
//! [`parse_spec`] validates it into a [`Spec`] that the batch layer, the speed layer, the server
//! and the consistency checker all compile from. [`reference::Reference`] is the plain,
//! obviously-correct evaluator that defines what each feature means; the other engines are
//! tested against it. [`event`] holds the event record, its validation rules and its readers.
//!
//! The reference catalog (`catalog.toml`, [`CATALOG`]) is the default spec of every command.

#![deny(missing_docs)]

pub mod diagnostic;
pub mod duration;
pub mod event;
pub mod expr;
pub mod generate;
pub mod model;
mod parse;
pub mod reference;
pub mod timestamp;

use std::path::Path;

pub use diagnostic::{Diagnostic, SpecErrors};
pub use duration::Duration;
pub use model::*;
pub use parse::{DEFAULT_CADENCE, DEFAULT_LATENESS, parse_spec};

/// The reference catalog, shipped as the default spec.
pub const CATALOG: &str = include_str!("../catalog.toml");

/// The name the embedded catalog goes by in messages.
pub const CATALOG_NAME: &str = "catalog.toml";

/// Why a spec could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be read.
    #[error("cannot read spec {path}: {source}")]
    Read {
        /// The path given.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The spec is invalid.
    #[error("{0}")]
    Invalid(#[from] SpecErrors),
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Loads and validates the spec at `path`, or the reference catalog when `path` is `None`.
pub fn load_spec(path: Option<&Path>) -> Result<Spec> {
    match path {
        None => Ok(parse_spec(CATALOG_NAME, CATALOG)?),
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|source| Error::Read {
                path: p.display().to_string(),
                source,
            })?;
            Ok(parse_spec(&p.display().to_string(), &text)?)
        }
    }
}

/// A human-readable listing of a spec's views and features, as `duet spec check` prints it.
pub fn describe(spec: &Spec) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "spec version {} ({})",
        spec.version,
        spec.fingerprint()
    );
    for view in &spec.views {
        let detail = match view.layer {
            Layer::Batch => format!(
                "cadence {}, ttl {}",
                view.cadence,
                view.ttl.map_or("none".to_string(), |t| t.to_string())
            ),
            Layer::Streaming if view.history.as_ms() > 0 => format!(
                "allowed lateness {}, history {}",
                view.allowed_lateness, view.history
            ),
            Layer::Streaming => format!("allowed lateness {}", view.allowed_lateness),
        };
        let _ = writeln!(
            out,
            "view {} ({} layer, entity {} by {}, {detail})",
            view.name,
            view.layer,
            view.entity,
            view.join_key.name()
        );
        for f in &view.features {
            let what = match &f.aggregation {
                Aggregation::Measure(m) => m.to_string(),
                Aggregation::Ratio {
                    numerator,
                    denominator,
                } => format!("ratio of {numerator} to {denominator}"),
                Aggregation::PctRank { of, round } => format!(
                    "pct_rank of {of}{}",
                    round.map_or(String::new(), |r| format!(", rounded to {r} decimals"))
                ),
                Aggregation::Age { filter, unit } => {
                    format!("age in units of {unit} since the first of {filter}")
                }
            };
            let ty = match f.value_type {
                ValueType::Int => "int",
                ValueType::Float => "float",
            };
            let _ = writeln!(
                out,
                "  {:<24} {ty:<5} {what}; {}; none = {}",
                f.name, f.extent, f.default
            );
        }
    }
    out
}
