//! Per-feature comparison statistics.

use std::collections::BTreeMap;

use duet_spec::{Tolerance, Value};
use serde::{Deserialize, Serialize};

/// One disagreeing value, kept as an example.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Example {
    /// The entity.
    pub entity: String,
    /// The instant compared (RFC 3339).
    pub as_of: String,
    /// What the layer under test holds or served.
    pub actual: Value,
    /// What the recomputation from the offline log says.
    pub expected: Value,
    /// The cause found.
    pub cause: String,
}

/// How one feature compared.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct FeatureStats {
    /// The feature.
    pub feature: String,
    /// Its view.
    pub view: String,
    /// Values compared.
    pub compared: u64,
    /// Values outside the tolerance.
    pub mismatches: u64,
    /// Actual null where a value was expected.
    pub missing: u64,
    /// Actual value where null was expected.
    pub extra: u64,
    /// Mean absolute difference over values present on both sides.
    pub mean_abs_diff: f64,
    /// Largest absolute difference.
    pub max_abs_diff: f64,
    /// Symmetric mean absolute percentage error, in percent.
    pub smape: f64,
    /// Mismatches by cause.
    pub causes: BTreeMap<String, u64>,
    /// Some mismatching entities.
    pub examples: Vec<Example>,
    /// Mismatches / compared.
    pub mismatch_rate: f64,
    /// True when the feature stayed within tolerance everywhere.
    pub ok: bool,
    #[serde(skip)]
    sum_diff: f64,
    #[serde(skip)]
    sum_smape: f64,
    #[serde(skip)]
    both: u64,
}

const EXAMPLES_KEPT: usize = 20;

impl FeatureStats {
    /// Empty statistics of a feature.
    pub fn new(view: &str, feature: &str) -> Self {
        FeatureStats {
            feature: feature.into(),
            view: view.into(),
            ok: true,
            ..Default::default()
        }
    }

    /// Compares one value; returns true when it agrees. `cause` explains a disagreement.
    pub fn add(
        &mut self,
        tol: &Tolerance,
        actual: Value,
        expected: Value,
        entity: &str,
        as_of: i64,
        cause: impl FnOnce() -> String,
    ) -> bool {
        self.compared += 1;
        if let (Some(a), Some(e)) = (actual.as_f64(), expected.as_f64()) {
            let d = (a - e).abs();
            self.sum_diff += d;
            self.max_abs_diff = self.max_abs_diff.max(d);
            let denom = (a.abs() + e.abs()) / 2.0;
            self.sum_smape += if denom == 0.0 { 0.0 } else { d / denom };
            self.both += 1;
        }
        if tol.agrees(actual, expected) {
            return true;
        }
        self.mismatches += 1;
        match (actual, expected) {
            (Value::Null, e) if !e.is_null() => self.missing += 1,
            (a, Value::Null) if !a.is_null() => self.extra += 1,
            _ => {}
        }
        let cause = cause();
        *self.causes.entry(cause.clone()).or_default() += 1;
        if self.examples.len() < EXAMPLES_KEPT {
            self.examples.push(Example {
                entity: entity.into(),
                as_of: duet_spec::timestamp::format_ms(as_of),
                actual,
                expected,
                cause,
            });
        }
        false
    }

    /// Computes the rates; `max_rate` is the largest mismatch rate still considered ok.
    pub fn finish(&mut self, max_rate: f64) {
        self.mean_abs_diff = if self.both == 0 {
            0.0
        } else {
            self.sum_diff / self.both as f64
        };
        self.smape = if self.both == 0 {
            0.0
        } else {
            100.0 * self.sum_smape / self.both as f64
        };
        self.mismatch_rate = if self.compared == 0 {
            0.0
        } else {
            self.mismatches as f64 / self.compared as f64
        };
        self.ok = self.mismatch_rate <= max_rate;
    }
}
