//! Events as Arrow record batches: building them, and normalizing batches read from Parquet
//! (any string, numeric and timestamp encodings) into the validated event schema.

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, Float64Array, Float64Builder, StringArray, StringBuilder,
    TimestampMillisecondArray, TimestampMillisecondBuilder,
};
use arrow::compute::cast;
use arrow::datatypes::{
    DataType, Float64Type, Int64Type, TimeUnit, TimestampMicrosecondType, TimestampMillisecondType,
    TimestampNanosecondType, TimestampSecondType,
};
use arrow::error::ArrowError;
use arrow::record_batch::RecordBatch;

use super::{
    AMOUNT_TYPES, DeadLetter, Event, InvalidCounts, InvalidReason, event_schema, validate,
};
use crate::timestamp::parse_rfc3339_ms;

/// Appends valid events into the columns of the event schema.
pub struct EventBatchBuilder {
    event_id: StringBuilder,
    user_id: StringBuilder,
    event_type: StringBuilder,
    amount: Float64Builder,
    ts: TimestampMillisecondBuilder,
    len: usize,
}

impl EventBatchBuilder {
    /// A builder sized for `rows` events.
    pub fn with_capacity(rows: usize) -> Self {
        EventBatchBuilder {
            event_id: StringBuilder::with_capacity(rows, rows * 16),
            user_id: StringBuilder::with_capacity(rows, rows * 8),
            event_type: StringBuilder::with_capacity(rows, rows * 8),
            amount: Float64Builder::with_capacity(rows),
            ts: TimestampMillisecondBuilder::with_capacity(rows).with_timezone("UTC"),
            len: 0,
        }
    }

    /// Appends one event; the caller has validated it.
    pub fn append(
        &mut self,
        event_id: &str,
        user_id: &str,
        event_type: &str,
        amount: Option<f64>,
        ts: i64,
    ) {
        self.event_id.append_value(event_id);
        self.user_id.append_value(user_id);
        self.event_type.append_value(event_type);
        self.amount.append_option(amount);
        self.ts.append_value(ts);
        self.len += 1;
    }

    /// Events appended since the last [`finish`](Self::finish).
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing was appended since the last [`finish`](Self::finish).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The appended events as one batch; the builder starts over empty.
    pub fn finish(&mut self) -> RecordBatch {
        self.len = 0;
        RecordBatch::try_new(
            event_schema(),
            vec![
                Arc::new(self.event_id.finish()),
                Arc::new(self.user_id.finish()),
                Arc::new(self.event_type.finish()),
                Arc::new(self.amount.finish()),
                Arc::new(self.ts.finish()),
            ],
        )
        .expect("builders match the event schema")
    }
}

/// The result of normalizing one batch read from a columnar file.
pub struct Normalized {
    /// The valid events, in the event schema.
    pub batch: RecordBatch,
    /// The invalid rows.
    pub dead_letters: Vec<DeadLetter>,
    /// Invalid rows by reason.
    pub invalid: InvalidCounts,
}

/// Converts a batch with the event fields in any common encoding (Utf8/LargeUtf8/Utf8View or
/// dictionary text; any numeric amount; timestamps of any unit and zone, epoch-millisecond
/// integers or RFC 3339 text) into the event schema, applying the validation rules.
/// `first_row` is the 1-based row number of the batch's first row within `source`.
/// Fails only when a column is absent or of a type that cannot hold the field.
pub fn normalize_batch(
    batch: &RecordBatch,
    source: &str,
    first_row: u64,
) -> Result<Normalized, String> {
    let column = |name: &str| {
        batch
            .column_by_name(name)
            .cloned()
            .ok_or_else(|| format!("{source}: no column `{name}` (events need event_id, user_id, event_type, amount, ts)"))
    };
    let text = |name: &str| -> Result<StringArray, String> {
        let c = column(name)?;
        cast(&c, &DataType::Utf8)
            .map(|a| a.as_string::<i32>().clone())
            .map_err(|e| {
                format!(
                    "{source}: column `{name}` of type {} is not text: {e}",
                    c.data_type()
                )
            })
    };
    let event_id = text("event_id")?;
    let user_id = text("user_id")?;
    let event_type = text("event_type")?;
    let amount_col = column("amount")?;
    let amount: Float64Array = match amount_col.data_type() {
        t if t.is_numeric() || *t == DataType::Null => cast(&amount_col, &DataType::Float64)
            .map_err(|e| format!("{source}: column `amount` cannot be read as a number: {e}"))?
            .as_primitive::<Float64Type>()
            .clone(),
        t => {
            return Err(format!(
                "{source}: column `amount` has type {t}, expected a number"
            ));
        }
    };
    let ts = timestamps(&column("ts")?, source)?;

    let mut b = EventBatchBuilder::with_capacity(batch.num_rows());
    let mut dead_letters = Vec::new();
    let mut invalid = InvalidCounts::default();
    fn opt(a: &StringArray, i: usize) -> Option<&str> {
        if a.is_null(i) { None } else { Some(a.value(i)) }
    }
    for (i, &t) in ts.iter().enumerate() {
        let (id, user, ty) = (opt(&event_id, i), opt(&user_id, i), opt(&event_type, i));
        let amt = if amount.is_null(i) {
            None
        } else {
            Some(amount.value(i))
        };
        let checked = match t {
            Err(reason) => Err(reason),
            Ok(t) => validate(id, user, ty, Ok(amt), t),
        };
        match checked {
            Ok(()) => {
                let ty = ty.expect("validated");
                let amt = if AMOUNT_TYPES.contains(&ty) {
                    amt
                } else {
                    None
                };
                b.append(
                    id.expect("validated"),
                    user.expect("validated"),
                    ty,
                    amt,
                    t.expect("validated").expect("validated"),
                );
            }
            Err(reason) => {
                invalid.add(reason);
                let original = serde_json::json!({
                    "event_id": id, "user_id": user, "event_type": ty,
                    "amount": amt.map(|a| if a.is_finite() { serde_json::json!(a) } else { serde_json::json!(a.to_string()) }),
                    "ts": match t { Ok(Some(ms)) => serde_json::json!(ms), _ => serde_json::Value::Null },
                });
                dead_letters.push(DeadLetter::new(
                    source,
                    first_row + i as u64,
                    reason,
                    None,
                    original.to_string().as_bytes(),
                ));
            }
        }
    }
    Ok(Normalized {
        batch: b.finish(),
        dead_letters,
        invalid,
    })
}

/// Per row: `Ok(Some(ms))`, `Ok(None)` for null, or `Err` for unparsable text.
fn timestamps(
    col: &ArrayRef,
    source: &str,
) -> Result<Vec<Result<Option<i64>, InvalidReason>>, String> {
    let n = col.len();
    // Out-of-range times are invalid records, as in JSON: later arithmetic must not overflow.
    let from_prim = |v: Vec<Option<Option<i64>>>| {
        v.into_iter()
            .map(|t| match t {
                None => Ok(None),
                Some(Some(ms)) if super::epoch_ms_in_range(ms) => Ok(Some(ms)),
                Some(_) => Err(InvalidReason::BadTimestamp),
            })
            .collect::<Vec<_>>()
    };
    Ok(match col.data_type() {
        DataType::Timestamp(unit, _) => {
            let scaled: Vec<Option<Option<i64>>> = match unit {
                TimeUnit::Second => col
                    .as_primitive::<TimestampSecondType>()
                    .iter()
                    .map(|v| v.map(|s| s.checked_mul(1000)))
                    .collect(),
                TimeUnit::Millisecond => col
                    .as_primitive::<TimestampMillisecondType>()
                    .iter()
                    .map(|v| v.map(Some))
                    .collect(),
                TimeUnit::Microsecond => col
                    .as_primitive::<TimestampMicrosecondType>()
                    .iter()
                    .map(|v| v.map(|u| Some(u.div_euclid(1000))))
                    .collect(),
                TimeUnit::Nanosecond => col
                    .as_primitive::<TimestampNanosecondType>()
                    .iter()
                    .map(|v| v.map(|u| Some(u.div_euclid(1_000_000))))
                    .collect(),
            };
            from_prim(scaled)
        }
        DataType::Int64 | DataType::Int32 | DataType::UInt32 | DataType::UInt64 => {
            let c =
                cast(col, &DataType::Int64).map_err(|e| format!("{source}: column `ts`: {e}"))?;
            from_prim(
                c.as_primitive::<Int64Type>()
                    .iter()
                    .map(|v| v.map(Some))
                    .collect(),
            )
        }
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View | DataType::Dictionary(_, _) => {
            let c = cast(col, &DataType::Utf8)
                .map_err(|e: ArrowError| format!("{source}: column `ts`: {e}"))?;
            let s = c.as_string::<i32>();
            (0..n)
                .map(|i| {
                    if s.is_null(i) {
                        Ok(None)
                    } else {
                        parse_rfc3339_ms(s.value(i))
                            .map(Some)
                            .ok_or(InvalidReason::BadTimestamp)
                    }
                })
                .collect()
        }
        t => {
            return Err(format!(
                "{source}: column `ts` has type {t}, expected a timestamp, epoch milliseconds or RFC 3339 text"
            ));
        }
    })
}

/// The events of a batch in the event schema, as owned records.
pub fn events_from_batch(batch: &RecordBatch) -> Vec<Event> {
    let s = |i: usize| batch.column(i).as_string::<i32>();
    let (id, user, ty) = (s(0), s(1), s(2));
    let amount = batch.column(3).as_primitive::<Float64Type>();
    let ts: &TimestampMillisecondArray = batch.column(4).as_primitive::<TimestampMillisecondType>();
    (0..batch.num_rows())
        .map(|i| Event {
            event_id: id.value(i).into(),
            user_id: user.value(i).into(),
            event_type: ty.value(i).into(),
            amount: if amount.is_null(i) {
                None
            } else {
                Some(amount.value(i))
            },
            ts: ts.value(i),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, LargeStringArray};
    use arrow::datatypes::{Field, Schema};

    #[test]
    fn normalizes_other_encodings_and_validates() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("event_id", DataType::LargeUtf8, true),
            Field::new("user_id", DataType::LargeUtf8, true),
            Field::new("event_type", DataType::LargeUtf8, true),
            Field::new("amount", DataType::Int64, true),
            Field::new("ts", DataType::Utf8, true),
        ]));
        let batch = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(LargeStringArray::from(vec![
                    Some("a"),
                    Some("b"),
                    None,
                    Some("d"),
                ])),
                Arc::new(LargeStringArray::from(vec!["u", "u", "u", "u"])),
                Arc::new(LargeStringArray::from(vec![
                    "purchase", "purchase", "view", "view",
                ])),
                Arc::new(Int64Array::from(vec![Some(5), Some(-1), None, Some(3)])),
                Arc::new(StringArray::from(vec![
                    "1970-01-01T00:00:01Z",
                    "1970-01-01T00:00:02Z",
                    "1970-01-01T00:00:03Z",
                    "1970-01-01T00:00:04+01:00",
                ])),
            ],
        )
        .unwrap();
        let n = normalize_batch(&batch, "x.parquet", 1).unwrap();
        let events = events_from_batch(&n.batch);
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].amount, Some(5.0));
        assert_eq!(
            events[1].amount, None,
            "amounts of other event types are ignored"
        );
        assert_eq!(events[1].ts, 4000 - 3_600_000);
        assert_eq!(n.invalid.total(), 2);
        assert_eq!(n.dead_letters[0].reason, "amount_negative");
        assert_eq!(n.dead_letters[0].position, 2);
        assert_eq!(n.dead_letters[1].reason, "missing_event_id");
    }

    #[test]
    fn missing_column_is_an_error_naming_the_file() {
        let schema = Arc::new(Schema::new(vec![Field::new(
            "event_id",
            DataType::Utf8,
            true,
        )]));
        let batch =
            RecordBatch::try_new(schema, vec![Arc::new(StringArray::from(vec!["a"]))]).unwrap();
        let err = normalize_batch(&batch, "x.parquet", 1).err().unwrap();
        assert!(
            err.contains("x.parquet") && err.contains("user_id"),
            "{err}"
        );
    }
}
