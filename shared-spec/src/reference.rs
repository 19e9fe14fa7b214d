//! The reference evaluator: the executable definition of what every feature means.
//!
//! It is deliberately plain — it keeps every event and recomputes each value from scratch — so
//! that it can be read against REFERENCE_CATALOG.md line by line. The batch and speed layers
//! are tested against it.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::duration::{ceil_to, floor_to};
use crate::event::{Event, dedupe};
use crate::expr::Scalar;
use crate::model::{
    Agg, Aggregation, Extent, Feature, Layer, Measure, Spec, Value, ValueType, View,
};

/// Every valid event of one spec's entities, deduplicated and sorted, ready to be evaluated.
pub struct Reference<'s> {
    spec: &'s Spec,
    /// Events per join-key value, sorted by `(ts, event_id)`.
    by_entity: HashMap<String, Vec<Event>>,
    snapshots: std::sync::Mutex<HashMap<(String, i64), std::sync::Arc<Snapshot>>>,
}

/// A batch view's values for every entity, as of one instant.
pub type Snapshot = BTreeMap<String, Vec<Value>>;

impl<'s> Reference<'s> {
    /// Indexes `events` (valid, possibly duplicated, in any order) for evaluation.
    pub fn new(spec: &'s Spec, events: Vec<Event>) -> Self {
        let mut by_entity: HashMap<String, Vec<Event>> = HashMap::new();
        for e in dedupe(events) {
            by_entity.entry(e.user_id.to_string()).or_default().push(e);
        }
        Reference {
            spec,
            by_entity,
            snapshots: Default::default(),
        }
    }

    /// The spec being evaluated.
    pub fn spec(&self) -> &'s Spec {
        self.spec
    }

    /// Every entity with at least one event.
    pub fn entities(&self) -> impl Iterator<Item = &str> {
        self.by_entity.keys().map(String::as_str)
    }

    fn events_before(&self, entity: &str, t: i64) -> &[Event] {
        let all = self.by_entity.get(entity).map_or(&[][..], Vec::as_slice);
        &all[..all.partition_point(|e| e.ts < t)]
    }

    /// The value of a feature that does not depend on other entities, for `entity` as of `t`.
    /// Population features (`pct_rank`) need [`Reference::batch_snapshot`].
    pub fn value(&self, feature: &Feature, entity: &str, t: i64) -> Value {
        let events = self.events_before(entity, t);
        let raw = match &feature.aggregation {
            Aggregation::Measure(m) => measure(m, covered(&feature.extent, events, t)),
            Aggregation::Ratio {
                numerator,
                denominator,
            } => {
                let covered = covered(&feature.extent, events, t);
                let num = measure(numerator, covered.clone()).or(zero(numerator.agg));
                let den = measure(denominator, covered).or(zero(denominator.agg));
                match (num, den) {
                    (Some(n), Some(d)) if d != 0.0 => Some(n / d),
                    _ => None,
                }
            }
            Aggregation::Age { filter, unit } => events
                .iter()
                .find(|e| filter.accepts(e))
                .map(|first| (t - first.ts).div_euclid(unit.as_ms()) as f64),
            Aggregation::PctRank { .. } => {
                panic!("pct_rank ranks a population: use Reference::batch_snapshot")
            }
        };
        finish(feature, raw)
    }

    /// Every entity's values of a batch `view` as of `t` (entities with at least one event
    /// before `t`), including population features.
    pub fn batch_snapshot(&self, view: &View, t: i64) -> std::sync::Arc<Snapshot> {
        let key = (view.name.clone(), t);
        if let Some(s) = self.snapshots.lock().expect("not poisoned").get(&key) {
            return s.clone();
        }
        let mut snapshot: Snapshot = BTreeMap::new();
        let entities: Vec<&str> = self
            .by_entity
            .iter()
            .filter(|(_, evs)| evs.first().is_some_and(|e| e.ts < t))
            .map(|(k, _)| k.as_str())
            .collect();
        for e in &entities {
            snapshot.insert(e.to_string(), Vec::with_capacity(view.features.len()));
        }
        for feature in &view.features {
            match &feature.aggregation {
                Aggregation::PctRank { of, round } => {
                    let keyed: Vec<(&str, Option<i64>)> = entities
                        .iter()
                        .map(|e| {
                            let evs = self.events_before(e, t);
                            let v = measure(of, covered(&feature.extent, evs, t));
                            (*e, v.map(|x| rank_key(x, *round)))
                        })
                        .collect();
                    let mut sorted: Vec<i64> = keyed.iter().filter_map(|(_, k)| *k).collect();
                    sorted.sort_unstable();
                    for (e, k) in keyed {
                        let v = k.map(|k| {
                            sorted.partition_point(|x| *x <= k) as f64 / sorted.len() as f64
                        });
                        snapshot
                            .get_mut(e)
                            .expect("listed")
                            .push(finish(feature, v));
                    }
                }
                _ => {
                    for e in &entities {
                        let v = self.value(feature, e, t);
                        snapshot.get_mut(*e).expect("listed").push(v);
                    }
                }
            }
        }
        let snapshot = std::sync::Arc::new(snapshot);
        self.snapshots
            .lock()
            .expect("not poisoned")
            .insert(key, snapshot.clone());
        snapshot
    }

    /// A point-in-time row: the named features for `entity` at `t`. Streaming features are
    /// evaluated exactly as of `t`; batch features come from the snapshot at the view's cadence
    /// boundary at or before `t` (`floor_day(t)` for daily views).
    pub fn point_in_time(
        &self,
        features: &[(&View, &Feature)],
        entity: &str,
        t: i64,
    ) -> Vec<Value> {
        features
            .iter()
            .map(|(view, feature)| match view.layer {
                Layer::Streaming => self.value(feature, entity, t),
                Layer::Batch => {
                    let s = floor_to(t, view.cadence.as_ms());
                    let idx = view
                        .features
                        .iter()
                        .position(|f| f.name == feature.name)
                        .expect("feature belongs to its view");
                    self.batch_snapshot(view, s)
                        .get(entity)
                        .map_or(feature.default, |vals| vals[idx])
                }
            })
            .collect()
    }
}

/// The events an extent covers as of `t`, from `events` (all before `t`, sorted).
fn covered<'e>(extent: &Extent, events: &'e [Event], t: i64) -> Vec<&'e Event> {
    match extent {
        Extent::AllHistory => events.iter().collect(),
        Extent::Sliding { window, resolution } => {
            let lower = ceil_to(t, resolution.as_ms()) - window.as_ms();
            events.iter().filter(|e| e.ts >= lower).collect()
        }
        Extent::Recent { ttl } => events.iter().filter(|e| t - e.ts <= ttl.as_ms()).collect(),
        Extent::Session { gap } => {
            let Some(last) = events.last() else {
                return vec![];
            };
            if t - last.ts > gap.as_ms() {
                return vec![];
            }
            let mut start = events.len() - 1;
            while start > 0 && events[start].ts - events[start - 1].ts <= gap.as_ms() {
                start -= 1;
            }
            events[start..].iter().collect()
        }
    }
}

/// The raw value of a measure over covered events: `None` when nothing matched.
fn measure(m: &Measure, events: Vec<&Event>) -> Option<f64> {
    if m.agg == Agg::Duration {
        let (first, last) = (events.first()?, events.last()?);
        return Some((last.ts - first.ts) as f64 / 1000.0);
    }
    let matching: Vec<&Event> = events.into_iter().filter(|e| m.filter.accepts(e)).collect();
    if m.agg == Agg::Count {
        return (!matching.is_empty()).then_some(matching.len() as f64);
    }
    let value = m
        .value
        .as_ref()
        .expect("validated: the aggregation has a value");
    let values: Vec<(&Event, Scalar<'_>)> = matching
        .into_iter()
        .map(|e| (e, value.eval(e)))
        .filter(|(_, v)| *v != Scalar::Null)
        .collect();
    if values.is_empty() {
        return None;
    }
    let nums = || values.iter().filter_map(|(_, v)| v.as_f64());
    match m.agg {
        Agg::Sum => Some(nums().sum()),
        Agg::Mean => Some(nums().sum::<f64>() / values.len() as f64),
        Agg::Min => nums().reduce(f64::min),
        Agg::Max => nums().reduce(f64::max),
        Agg::CountDistinct => {
            let distinct: HashSet<String> = values.iter().map(|(_, v)| distinct_key(*v)).collect();
            Some(distinct.len() as f64)
        }
        Agg::Last => values
            .iter()
            .max_by(|(a, _), (b, _)| a.ts.cmp(&b.ts).then_with(|| a.event_id.cmp(&b.event_id)))
            .and_then(|(_, v)| v.as_f64()),
        Agg::Count | Agg::Duration => unreachable!("handled above"),
    }
}

/// The key under which `count_distinct` compares values.
pub fn distinct_key(v: Scalar<'_>) -> String {
    match v {
        // 0.0 and -0.0 are the same value.
        Scalar::Number(0.0) => "n0".to_string(),
        Scalar::Number(x) => format!("n{x}"),
        Scalar::Text(s) => format!("t{s}"),
        Scalar::Timestamp(t) => format!("ts{t}"),
        Scalar::Null => "null".to_string(),
    }
}

/// The value of an empty measure inside a ratio: 0 for counts and sums, none otherwise.
fn zero(agg: Agg) -> Option<f64> {
    matches!(agg, Agg::Count | Agg::CountDistinct | Agg::Sum).then_some(0.0)
}

/// The integer a `pct_rank` compares: the value scaled by `10^round`, rounded to a millionth,
/// then rounded half away from zero (or the value's bits order-preserved when not rounded).
///
/// The first rounding makes the key independent of the order a sum was added in: the same
/// amounts can add up to 116.5 or to 116.49999999999999, which would round to 117 and 116.
pub fn rank_key(x: f64, round: Option<u32>) -> i64 {
    match round {
        Some(d) => {
            let scaled = x * 10f64.powi(d as i32);
            // Beyond 2^53 / 10^6 a millionth is below the value's precision: no first rounding.
            let snapped = if scaled.abs() < 9e9 {
                (scaled * 1e6).round() / 1e6
            } else {
                scaled
            };
            snapped.round() as i64
        }
        None => {
            let bits = x.to_bits() as i64;
            if bits < 0 { bits ^ i64::MAX } else { bits }
        }
    }
}

/// Applies the feature's type and default to a raw value.
fn finish(feature: &Feature, raw: Option<f64>) -> Value {
    match raw {
        None => feature.default,
        Some(x) => match feature.value_type {
            ValueType::Int => Value::Int(x as i64),
            ValueType::Float => Value::Float(x),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::rank_key;

    #[test]
    fn a_rank_key_does_not_depend_on_the_order_of_a_sum() {
        // The same four amounts, added in two orders, differ in the last bit.
        let a: f64 = [18.77, 49.1, 6.09, 42.54].iter().sum();
        let b: f64 = [6.09, 42.54, 49.1, 18.77].iter().sum();
        assert_ne!(a, b);
        assert_eq!(rank_key(a, Some(0)), 117);
        assert_eq!(rank_key(b, Some(0)), 117);
        // Half away from zero, at any number of decimals.
        assert_eq!(rank_key(-116.5, Some(0)), -117);
        assert_eq!(rank_key(0.125, Some(2)), 13);
        assert_eq!(rank_key(0.124, Some(2)), 12);
        assert_eq!(rank_key(1.23456789, Some(9)), 1_234_567_890);
        // A mean of cents on an exact half cent: 1.005 * 100 is 100.49999999999999 in binary.
        assert_eq!(rank_key((1.00 + 1.01) / 2.0, Some(2)), 101);
        // Large values keep their halves.
        assert_eq!(rank_key(10_000_000_000_019.5, Some(0)), 10_000_000_000_020);
        // Unrounded keys keep the order of the values.
        assert!(rank_key(-1.0, None) < rank_key(-0.5, None));
        assert!(rank_key(-0.5, None) < rank_key(0.0, None));
        assert!(rank_key(0.0, None) < rank_key(1e-300, None));
    }
}
