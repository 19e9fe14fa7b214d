//! The JSON-lines reader: one event object per line, decoded without building a DOM.

use std::borrow::Cow;
use std::fmt;

use arrow::record_batch::RecordBatch;
use serde::Deserializer;
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, Visitor};

use super::{AMOUNT_TYPES, DeadLetter, EventBatchBuilder, InvalidCounts, InvalidReason, validate};
use crate::timestamp::parse_rfc3339_ms;

/// The largest record accepted; longer lines are invalid (`too_large`).
pub const MAX_LINE_BYTES: usize = 256 * 1024;

/// A JSON scalar as found, borrowed from the input where possible.
enum Scalar<'a> {
    Null,
    Str(Cow<'a, str>),
    Int(i64),
    Float(f64),
    Other,
}

struct ScalarVisitor;

impl<'de> Visitor<'de> for ScalarVisitor {
    type Value = Scalar<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Scalar::Null)
    }
    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(Scalar::Null)
    }
    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Scalar::Other)
    }
    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(Scalar::Int(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(i64::try_from(v).map_or(Scalar::Float(v as f64), Scalar::Int))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
        Ok(Scalar::Float(v))
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Scalar::Str(Cow::Borrowed(v)))
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Scalar::Str(Cow::Owned(v.to_string())))
    }
    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(Scalar::Str(Cow::Owned(v)))
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Scalar::Other)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Scalar::Other)
    }
}

impl<'de> de::Deserialize<'de> for Scalar<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ScalarVisitor)
    }
}

/// The five fields of an event as found in one JSON object.
#[derive(Default)]
struct RawEvent<'a> {
    event_id: Option<Scalar<'a>>,
    user_id: Option<Scalar<'a>>,
    event_type: Option<Scalar<'a>>,
    amount: Option<Scalar<'a>>,
    ts: Option<Scalar<'a>>,
}

struct RawVisitor;

impl<'de> Visitor<'de> for RawVisitor {
    type Value = RawEvent<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an event object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut raw = RawEvent::default();
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            let slot = match key.as_ref() {
                "event_id" => &mut raw.event_id,
                "user_id" => &mut raw.user_id,
                "event_type" => &mut raw.event_type,
                "amount" => &mut raw.amount,
                "ts" => &mut raw.ts,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                    continue;
                }
            };
            *slot = Some(map.next_value_seed(ScalarSeed)?);
        }
        Ok(raw)
    }
}

struct ScalarSeed;

impl<'de> DeserializeSeed<'de> for ScalarSeed {
    type Value = Scalar<'de>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(ScalarVisitor)
    }
}

/// A decoded, valid event borrowing its text from the input line.
#[derive(Debug, Clone, PartialEq)]
pub struct JsonEvent<'a> {
    /// `event_id`
    pub event_id: Cow<'a, str>,
    /// `user_id`
    pub user_id: Cow<'a, str>,
    /// `event_type`
    pub event_type: Cow<'a, str>,
    /// `amount` (always `None` for event types other than purchase and refund)
    pub amount: Option<f64>,
    /// `ts` in epoch milliseconds
    pub ts: i64,
}

impl JsonEvent<'_> {
    /// The event, owning its text (short text is kept inline, without an allocation).
    pub fn to_event(&self) -> super::Event {
        super::Event {
            event_id: (*self.event_id).into(),
            user_id: (*self.user_id).into(),
            event_type: (*self.event_type).into(),
            amount: self.amount,
            ts: self.ts,
        }
    }
}

fn text<'a>(
    s: Option<Scalar<'a>>,
    name: &'static str,
) -> Result<Option<Cow<'a, str>>, InvalidReason> {
    match s {
        None | Some(Scalar::Null) => Ok(None),
        Some(Scalar::Str(s)) => Ok(Some(s)),
        Some(_) => Err(InvalidReason::WrongType(name)),
    }
}

/// Decodes and validates one JSON event. On failure returns the reason and, for JSON syntax
/// errors, the parser's message.
pub fn parse_json_event(line: &[u8]) -> Result<JsonEvent<'_>, (InvalidReason, Option<String>)> {
    if line.len() > MAX_LINE_BYTES {
        return Err((InvalidReason::TooLarge, None));
    }
    let mut de = serde_json::Deserializer::from_slice(line);
    let raw = de
        .deserialize_map(RawVisitor)
        .and_then(|raw| de.end().map(|()| raw))
        .map_err(|e| (InvalidReason::Json, Some(format!("not a JSON object: {e}"))))?;
    let bare = |r| (r, None);
    let event_id = text(raw.event_id, "event_id").map_err(bare)?;
    let user_id = text(raw.user_id, "user_id").map_err(bare)?;
    let event_type = text(raw.event_type, "event_type").map_err(bare)?;
    let ts = match raw.ts {
        None | Some(Scalar::Null) => None,
        Some(Scalar::Str(s)) => {
            Some(parse_rfc3339_ms(&s).ok_or((InvalidReason::BadTimestamp, None))?)
        }
        Some(Scalar::Int(i)) if super::epoch_ms_in_range(i) => Some(i),
        Some(Scalar::Float(x)) if x.fract() == 0.0 && x.abs() < super::MAX_EPOCH_MS as f64 => {
            Some(x as i64)
        }
        Some(Scalar::Int(_) | Scalar::Float(_)) => return Err((InvalidReason::BadTimestamp, None)),
        Some(Scalar::Other) => return Err((InvalidReason::WrongType("ts"), None)),
    };
    let amount = match raw.amount {
        None | Some(Scalar::Null) => Ok(None),
        Some(Scalar::Int(i)) => Ok(Some(i as f64)),
        Some(Scalar::Float(x)) => Ok(Some(x)),
        Some(_) => Err(()),
    };
    validate(
        event_id.as_deref(),
        user_id.as_deref(),
        event_type.as_deref(),
        amount,
        ts,
    )
    .map_err(bare)?;
    let event_type = event_type.expect("validated");
    let amount = if AMOUNT_TYPES.contains(&event_type.as_ref()) {
        amount.expect("validated")
    } else {
        None
    };
    Ok(JsonEvent {
        event_id: event_id.expect("validated"),
        user_id: user_id.expect("validated"),
        event_type,
        amount,
        ts: ts.expect("validated"),
    })
}

/// Decodes JSON lines into Arrow batches of valid events, counting and keeping invalid ones.
pub struct JsonLinesDecoder {
    source: String,
    line_no: u64,
    builder: EventBatchBuilder,
    batch_rows: usize,
    batches: Vec<RecordBatch>,
    /// Invalid records, in input order.
    pub dead_letters: Vec<DeadLetter>,
    /// Invalid records by reason.
    pub invalid: InvalidCounts,
    /// Valid records decoded.
    pub valid: u64,
}

impl JsonLinesDecoder {
    /// A decoder for lines read from `source` (used in dead letters), emitting batches of
    /// `batch_rows` events.
    pub fn new(source: &str, batch_rows: usize) -> Self {
        JsonLinesDecoder {
            source: source.to_string(),
            line_no: 0,
            builder: EventBatchBuilder::with_capacity(batch_rows),
            batch_rows,
            batches: Vec::new(),
            dead_letters: Vec::new(),
            invalid: InvalidCounts::default(),
            valid: 0,
        }
    }

    /// Starts line numbering after `lines` lines (for a chunk that starts mid-file).
    pub fn skip_lines(&mut self, lines: u64) {
        self.line_no += lines;
    }

    /// Decodes every complete line of `chunk`; the chunk must end at a line boundary or at the
    /// end of the input. Blank lines are skipped without being counted.
    pub fn decode(&mut self, chunk: &[u8]) {
        for line in chunk.split(|&b| b == b'\n') {
            self.line_no += 1;
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.iter().all(|b| b.is_ascii_whitespace()) {
                continue;
            }
            self.decode_line(line);
        }
        // `split` yields one empty piece after a trailing newline: it is not a line.
        if chunk.last() == Some(&b'\n') {
            self.line_no -= 1;
        }
    }

    fn decode_line(&mut self, line: &[u8]) {
        match parse_json_event(line) {
            Ok(e) => {
                self.builder
                    .append(&e.event_id, &e.user_id, &e.event_type, e.amount, e.ts);
                self.valid += 1;
                if self.builder.len() >= self.batch_rows {
                    self.batches.push(self.builder.finish());
                }
            }
            Err((reason, detail)) => {
                self.invalid.add(reason);
                self.dead_letters.push(DeadLetter::new(
                    &self.source,
                    self.line_no,
                    reason,
                    detail,
                    line,
                ));
            }
        }
    }

    /// Takes the complete batches decoded so far.
    pub fn take_batches(&mut self) -> Vec<RecordBatch> {
        std::mem::take(&mut self.batches)
    }

    /// Flushes the last partial batch and returns every batch not yet taken.
    pub fn finish(&mut self) -> Vec<RecordBatch> {
        if !self.builder.is_empty() {
            self.batches.push(self.builder.finish());
        }
        self.take_batches()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_valid_lines() {
        let e = parse_json_event(br#"{"event_id": "e1", "user_id": "u1", "event_type": "purchase", "amount": 12.5, "ts": "2026-11-20T13:45:12.123+05:30"}"#).unwrap();
        assert_eq!(e.amount, Some(12.5));
        assert_eq!(e.ts, parse_rfc3339_ms("2026-11-20T08:15:12.123Z").unwrap());
        let e = parse_json_event(br#"{"ts": 1000, "event_type": "view", "amount": "x", "user_id": "u\u0031", "event_id": "e2", "extra": [1, {"a": 2}]}"#).unwrap();
        assert_eq!((e.ts, e.amount, e.user_id.as_ref()), (1000, None, "u1"));
    }

    #[test]
    fn names_the_reason() {
        let reason = |s: &[u8]| parse_json_event(s).unwrap_err().0;
        assert_eq!(reason(b"not json"), InvalidReason::Json);
        assert_eq!(reason(b"[1,2]"), InvalidReason::Json);
        assert_eq!(
            reason(br#"{"event_id": "e"} trailing"#),
            InvalidReason::Json
        );
        assert_eq!(
            reason(br#"{"user_id": "u", "event_type": "view", "ts": 1}"#),
            InvalidReason::Missing("event_id")
        );
        assert_eq!(
            reason(br#"{"event_id": "e", "user_id": null, "event_type": "view", "ts": 1}"#),
            InvalidReason::Missing("user_id")
        );
        assert_eq!(
            reason(br#"{"event_id": "e", "user_id": "", "event_type": "view", "ts": 1}"#),
            InvalidReason::Empty("user_id")
        );
        assert_eq!(
            reason(br#"{"event_id": 7, "user_id": "u", "event_type": "view", "ts": 1}"#),
            InvalidReason::WrongType("event_id")
        );
        assert_eq!(
            reason(
                br#"{"event_id": "e", "user_id": "u", "event_type": "view", "ts": "yesterday"}"#
            ),
            InvalidReason::BadTimestamp
        );
        assert_eq!(
            reason(br#"{"event_id": "e", "user_id": "u", "event_type": "view", "ts": 1.5}"#),
            InvalidReason::BadTimestamp
        );
        assert_eq!(
            reason(br#"{"event_id": "e", "user_id": "u", "event_type": "view"}"#),
            InvalidReason::Missing("ts")
        );
        assert_eq!(
            reason(br#"{"event_id": "e", "user_id": "u", "event_type": "purchase", "ts": 1}"#),
            InvalidReason::AmountMissing
        );
        assert_eq!(reason(br#"{"event_id": "e", "user_id": "u", "event_type": "refund", "amount": -1, "ts": 1}"#), InvalidReason::AmountNegative);
        assert_eq!(reason(br#"{"event_id": "e", "user_id": "u", "event_type": "refund", "amount": "3", "ts": 1}"#), InvalidReason::WrongType("amount"));
    }

    #[test]
    fn decoder_counts_and_keeps_line_numbers() {
        let mut d = JsonLinesDecoder::new("f.jsonl", 2);
        d.decode(b"{\"event_id\":\"a\",\"user_id\":\"u\",\"event_type\":\"view\",\"ts\":1}\n\ngarbage\n{\"event_id\":\"b\",\"user_id\":\"u\",\"event_type\":\"view\",\"ts\":2}\n");
        d.decode(b"{\"event_id\":\"c\",\"user_id\":\"u\",\"event_type\":\"view\",\"ts\":3}");
        let rows: usize = d.finish().iter().map(|b| b.num_rows()).sum();
        assert_eq!(rows, 3);
        assert_eq!(d.valid, 3);
        assert_eq!(d.invalid.total(), 1);
        assert_eq!(d.dead_letters[0].position, 3);
        assert_eq!(d.dead_letters[0].original, "garbage");
    }

    #[test]
    fn epoch_milliseconds_out_of_range_are_bad_timestamps() {
        for ts in [
            i64::MIN.to_string(),
            i64::MAX.to_string(),
            "253402300800000".into(),
        ] {
            let line =
                format!(r#"{{"event_id": "e", "user_id": "u", "event_type": "view", "ts": {ts}}}"#);
            assert_eq!(
                parse_json_event(line.as_bytes()).unwrap_err().0,
                InvalidReason::BadTimestamp,
                "{ts}"
            );
        }
    }
}

#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    fn fields() -> impl Strategy<Value = String> {
        let key = prop::sample::select(vec![
            "event_id",
            "user_id",
            "event_type",
            "amount",
            "ts",
            "x",
        ]);
        let value = prop_oneof![
            Just("null".to_string()),
            Just("\"purchase\"".to_string()),
            Just("\"2026-11-20T13:45:12.123+05:30\"".to_string()),
            any::<i64>().prop_map(|i| i.to_string()),
            any::<f64>().prop_map(|f| format!("{f:?}")),
            "[a-z0-9]{0,8}".prop_map(|s| format!("\"{s}\"")),
            Just("[1, {\"a\": []}]".to_string()),
        ];
        prop::collection::vec((key, value), 0..7).prop_map(|kv| {
            let body: Vec<String> = kv.iter().map(|(k, v)| format!("\"{k}\": {v}")).collect();
            format!("{{{}}}", body.join(", "))
        })
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_json_event(&bytes);
            let mut d = JsonLinesDecoder::new("fuzz", 16);
            d.decode(&bytes);
            let rows: u64 = d.finish().iter().map(|b| b.num_rows() as u64).sum();
            let lines = bytes
                .split(|b| *b == b'\n')
                .filter(|l| !l.strip_suffix(b"\r").unwrap_or(l).iter().all(|b| b.is_ascii_whitespace()))
                .count() as u64;
            // Nothing is lost silently: every non-blank line is either an event or a dead letter.
            prop_assert_eq!(rows + d.invalid.total(), lines);
            prop_assert_eq!(d.dead_letters.len() as u64, d.invalid.total());
        }

        #[test]
        fn object_shaped_lines_are_decoded_or_explained(line in fields()) {
            match parse_json_event(line.as_bytes()) {
                Ok(e) => {
                    prop_assert!(!e.event_id.is_empty() && !e.user_id.is_empty() && !e.event_type.is_empty());
                    if AMOUNT_TYPES.contains(&e.event_type.as_ref()) {
                        prop_assert!(e.amount.is_some_and(|a| a.is_finite() && a >= 0.0));
                    } else {
                        prop_assert!(e.amount.is_none());
                    }
                }
                Err((reason, _)) => prop_assert!(!reason.code().is_empty()),
            }
        }
    }
}
