//! Events: the one record type every layer reads, its validation rules, and its readers.
//!
//! A record that breaks a rule is *invalid*: it is counted by [`InvalidReason`], kept as a
//! [`DeadLetter`] with the original text, and never stops the reader.

mod columnar;
mod json;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use arrow::datatypes::{DataType, Field as ArrowField, Schema, SchemaRef, TimeUnit};
use serde::Serialize;

pub use columnar::{EventBatchBuilder, events_from_batch, normalize_batch};
pub use json::{JsonLinesDecoder, MAX_LINE_BYTES, parse_json_event};

/// An event's text field. Ids, users and types are short: up to 24 bytes are kept inline,
/// without an allocation of their own (longer text is allocated as a `String` would be).
pub type Text = compact_str::CompactString;

/// One valid event.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Event {
    /// Identity: two records with the same id are the same event.
    pub event_id: Text,
    /// The user the event belongs to.
    pub user_id: Text,
    /// `login`, `view`, `purchase`, `refund`, or any other type.
    pub event_type: Text,
    /// The amount; always present, finite and `>= 0` for purchases and refunds.
    pub amount: Option<f64>,
    /// Event time, epoch milliseconds UTC.
    pub ts: i64,
}

/// Epoch milliseconds beyond this magnitude (year 10000) are not event times.
const MAX_EPOCH_MS: i64 = 253_402_300_800_000;

/// True when `ms` can be an event time (within year 10000 either side of the epoch).
fn epoch_ms_in_range(ms: i64) -> bool {
    ms.unsigned_abs() < MAX_EPOCH_MS.unsigned_abs()
}

/// Event types whose `amount` is required and must be `>= 0`.
pub const AMOUNT_TYPES: [&str; 2] = ["purchase", "refund"];

/// Why a record is invalid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum InvalidReason {
    /// The bytes are not a JSON object (syntax error, bad UTF-8, or another JSON value).
    Json,
    /// The record is larger than the reader accepts.
    TooLarge,
    /// A required field is absent or null.
    Missing(&'static str),
    /// A required text field is empty.
    Empty(&'static str),
    /// A field has the wrong JSON type.
    WrongType(&'static str),
    /// `ts` is neither RFC 3339 with an offset nor integer epoch milliseconds.
    BadTimestamp,
    /// A purchase or refund without an amount.
    AmountMissing,
    /// A purchase or refund with a negative amount.
    AmountNegative,
    /// A purchase or refund whose amount is NaN or infinite.
    AmountNotFinite,
}

impl InvalidReason {
    /// A short, stable label for counters and metrics, such as `missing_user_id`.
    pub fn code(self) -> String {
        match self {
            InvalidReason::Json => "invalid_json".into(),
            InvalidReason::TooLarge => "too_large".into(),
            InvalidReason::Missing(f) => format!("missing_{f}"),
            InvalidReason::Empty(f) => format!("empty_{f}"),
            InvalidReason::WrongType(f) => format!("wrong_type_{f}"),
            InvalidReason::BadTimestamp => "bad_ts".into(),
            InvalidReason::AmountMissing => "amount_missing".into(),
            InvalidReason::AmountNegative => "amount_negative".into(),
            InvalidReason::AmountNotFinite => "amount_not_finite".into(),
        }
    }
}

impl fmt::Display for InvalidReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InvalidReason::Json => f.write_str("not a JSON object"),
            InvalidReason::TooLarge => write!(f, "record larger than {MAX_LINE_BYTES} bytes"),
            InvalidReason::Missing(field) => {
                write!(f, "required field `{field}` is missing or null")
            }
            InvalidReason::Empty(field) => write!(f, "required field `{field}` is empty"),
            InvalidReason::WrongType(field) => write!(f, "field `{field}` has the wrong type"),
            InvalidReason::BadTimestamp => f.write_str(
                "`ts` is neither RFC 3339 with a UTC offset nor integer epoch milliseconds",
            ),
            InvalidReason::AmountMissing => f.write_str("purchase/refund without an `amount`"),
            InvalidReason::AmountNegative => {
                f.write_str("purchase/refund with a negative `amount`")
            }
            InvalidReason::AmountNotFinite => {
                f.write_str("purchase/refund with a NaN or infinite `amount`")
            }
        }
    }
}

/// An invalid record, kept with where it came from and its original text.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeadLetter {
    /// Where the record was read: a file, or `topic/partition@offset`.
    pub source: String,
    /// 1-based line (JSON lines) or row (Parquet) within the source; offset for Kafka.
    pub position: u64,
    /// The reason code (see [`InvalidReason::code`]).
    pub reason: String,
    /// A sentence describing the reason.
    pub detail: String,
    /// The original record (lossy UTF-8, truncated to 64 KiB).
    pub original: String,
}

impl DeadLetter {
    /// A dead letter for `original` read at `source`/`position`.
    pub fn new(
        source: &str,
        position: u64,
        reason: InvalidReason,
        detail: Option<String>,
        original: &[u8],
    ) -> Self {
        const KEEP: usize = 64 * 1024;
        let cut = &original[..original.len().min(KEEP)];
        DeadLetter {
            source: source.to_string(),
            position,
            reason: reason.code(),
            detail: detail.unwrap_or_else(|| reason.to_string()),
            original: String::from_utf8_lossy(cut).into_owned(),
        }
    }

    /// The dead letter as one JSON line (without the newline).
    pub fn to_json_line(&self) -> String {
        serde_json::to_string(self).expect("dead letters always serialize")
    }
}

/// Counts of invalid records by reason code.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct InvalidCounts(pub BTreeMap<String, u64>);

impl InvalidCounts {
    /// Counts one more record invalid for `reason`.
    pub fn add(&mut self, reason: InvalidReason) {
        *self.0.entry(reason.code()).or_default() += 1;
    }

    /// Adds every count of `other`.
    pub fn merge(&mut self, other: &InvalidCounts) {
        for (k, v) in &other.0 {
            *self.0.entry(k.clone()).or_default() += v;
        }
    }

    /// The number of invalid records.
    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }
}

/// Applies the catalog's rules to a decoded record. Text fields are given as found (`None` when
/// absent or null); `amount` is `Err(())` when present with a non-numeric type.
pub fn validate(
    event_id: Option<&str>,
    user_id: Option<&str>,
    event_type: Option<&str>,
    amount: Result<Option<f64>, ()>,
    ts: Option<i64>,
) -> Result<(), InvalidReason> {
    for (name, v) in [
        ("event_id", event_id),
        ("user_id", user_id),
        ("event_type", event_type),
    ] {
        match v {
            None => return Err(InvalidReason::Missing(name)),
            Some("") => return Err(InvalidReason::Empty(name)),
            Some(_) => {}
        }
    }
    if ts.is_none() {
        return Err(InvalidReason::Missing("ts"));
    }
    if AMOUNT_TYPES.contains(&event_type.unwrap_or_default()) {
        match amount {
            Err(()) => return Err(InvalidReason::WrongType("amount")),
            Ok(None) => return Err(InvalidReason::AmountMissing),
            Ok(Some(a)) if !a.is_finite() => return Err(InvalidReason::AmountNotFinite),
            Ok(Some(a)) if a < 0.0 => return Err(InvalidReason::AmountNegative),
            Ok(Some(_)) => {}
        }
    }
    Ok(())
}

/// The Arrow schema of validated events, as every layer stores them.
pub fn event_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        ArrowField::new("event_id", DataType::Utf8, false),
        ArrowField::new("user_id", DataType::Utf8, false),
        ArrowField::new("event_type", DataType::Utf8, false),
        ArrowField::new("amount", DataType::Float64, true),
        ArrowField::new(
            "ts",
            DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
            false,
        ),
    ]))
}

/// Sorts events by `(ts, event_id)` and keeps the first record of each `event_id`.
pub fn dedupe(mut events: Vec<Event>) -> Vec<Event> {
    let mut seen = std::collections::HashSet::with_capacity(events.len());
    events.retain(|e| seen.insert(e.event_id.clone()));
    events.sort_by(|a, b| a.ts.cmp(&b.ts).then_with(|| a.event_id.cmp(&b.event_id)));
    events
}
