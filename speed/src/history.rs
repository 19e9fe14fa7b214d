//! An entity's history: every event the speed layer accepted for it, kept beside its state (a
//! Redis string `<prefix>h:{<tag>}<entity>`) for the spec's `history`, so that the streaming
//! features can be evaluated exactly as of instants older than the state's boundary, which
//! only holds what evaluations from there on can read.
//!
//! A history is a header record (the instant from which it holds every event) followed by
//! length-prefixed event records, appended batch by batch: a write costs Redis one append,
//! whatever the number of events. Events are appended in the same script call as the state
//! write that counts them, atomically (both or neither), so a state that counts an event has it
//! in its history. A batch written again after a crash appends its events again; readers
//! deduplicate by event id, as every reader of the log does.
//! "Exact" means exact over the events the speed layer consumed: after a rebuild from Kafka's
//! retention, a history does not know about events older than the oldest retained one.

use duet_spec::Value;
use duet_spec::event::Event;
use duet_spec::reference::Reference;

use crate::codec::{Corrupt, Reader, Writer};
use crate::plan::SpeedPlan;

/// The first byte of an encoded event.
const FORMAT: u64 = 1;

/// The first byte of a history's header record.
const HEADER: u64 = 0;

/// Extra time a history key lives beyond its last write's horizon.
const KEY_GRACE_MS: i64 = 60_000;

/// Encoded event records, each prefixed with its length, ready to append to a history.
#[derive(Default)]
pub struct Records {
    out: Writer,
    /// One record at a time, before its length is known (reused).
    scratch: Writer,
}

impl Records {
    /// Adds one event.
    pub fn push(&mut self, e: &Event) {
        self.scratch.buf.clear();
        encode_into(e, &mut self.scratch);
        self.out.u(self.scratch.buf.len() as u64);
        self.out.buf.extend_from_slice(&self.scratch.buf);
    }

    /// The bytes to append.
    pub fn into_bytes(self) -> Vec<u8> {
        self.out.buf
    }
}

/// The header record a new history starts with: it holds every event from `from` on.
pub fn header(from: i64) -> Vec<u8> {
    let mut record = Writer::default();
    record.u(HEADER);
    record.i(from);
    let mut w = Writer::default();
    w.u(record.buf.len() as u64);
    w.buf.extend_from_slice(&record.buf);
    w.buf
}

/// A history as read: its events before an instant, in time order (repeated events included),
/// and the instant from which it holds every event (`None`: no history).
#[derive(Debug, Default, PartialEq)]
pub struct History {
    /// The events.
    pub events: Vec<Event>,
    /// Every event at or after this instant is held.
    pub from: Option<i64>,
}

/// Reads the history bytes of `entity` (empty: no history): its events before `before`.
pub fn read(entity: &str, bytes: &[u8], before: i64) -> Result<History, Corrupt> {
    let mut out = History::default();
    let mut r = Reader::new(bytes);
    while !r.done() {
        let len = r.count()?;
        let start = r.position();
        let record = r.bytes(len)?;
        if record.first() == Some(&(HEADER as u8)) {
            let mut h = Reader::new(record);
            h.u()?;
            out.from = Some(h.i()?);
            if !h.done() {
                return Err(Corrupt(start + h.position()));
            }
        } else {
            let e = decode(entity, record).map_err(|Corrupt(at)| Corrupt(start + at))?;
            if e.ts < before {
                out.events.push(e);
            }
        }
    }
    if out.from.is_none() && !bytes.is_empty() {
        return Err(Corrupt(0));
    }
    out.events.sort_by_key(|e| e.ts);
    Ok(out)
}

/// Appends one event's encoding to `w`.
fn encode_into(e: &Event, w: &mut Writer) {
    w.u(FORMAT);
    w.i(e.ts);
    w.s(&e.event_id);
    w.s(&e.event_type);
    w.b(e.amount.is_some());
    if let Some(a) = e.amount {
        w.f(a);
    }
}

/// An event record of `entity`, as [`Records`] writes it (without its length).
pub fn decode(entity: &str, bytes: &[u8]) -> Result<Event, Corrupt> {
    let mut r = Reader::new(bytes);
    if r.u()? != FORMAT {
        return Err(Corrupt(0));
    }
    let ts = r.i()?;
    let event_id = r.s()?;
    let event_type = r.s()?;
    let amount = if r.b()? { Some(r.f()?) } else { None };
    if !r.done() {
        return Err(Corrupt(bytes.len()));
    }
    Ok(Event {
        event_id,
        user_id: entity.into(),
        event_type,
        amount,
        ts,
    })
}

/// The instant from which a history created while the newest watermark is `watermark` holds
/// every event: one created for an entity's first events holds them all, and one created
/// again after its key expired (no write for `history` of wall-clock time) holds every event
/// from `history` behind the watermark on, as long as the watermark kept up with the clock (a
/// stop longer than `history` breaks that claim; see docs/architecture.md).
pub fn keep_from(plan: &SpeedPlan, watermark: i64) -> i64 {
    watermark.saturating_sub(plan.history)
}

/// How long a history key written now lives: the spec's `history` and a minute.
pub fn ttl_ms(plan: &SpeedPlan) -> u64 {
    plan.history.saturating_add(KEY_GRACE_MS).max(1) as u64
}

/// Every streaming feature of `entity` as of `t`, in plan order, and whether the values are
/// exact, from what the store holds for it: its encoded state (`None`: no state) and, when
/// fetched, its history events before `t`.
///
/// - No state and no history: the layer keeps no event of the entity, so every feature's
///   default (exact).
/// - A state, `t` at or after its boundary: the state's values (exact).
/// - `t` older than the state's boundary, or no state: the history's, when there is one;
///   exact when the history holds every event the values at `t` can depend on (from `t` minus
///   the streaming horizon on; a session is followed only as far back as the history reaches).
///   Without a history, the state's values, not exact.
pub fn evaluate_stored(
    spec: &duet_spec::Spec,
    plan: &SpeedPlan,
    entity: &str,
    state: Option<&[u8]>,
    history: Option<&[u8]>,
    t: i64,
) -> Result<(Vec<Value>, bool), Corrupt> {
    let from_history = |bytes: &[u8]| -> Result<Option<(Vec<Value>, bool)>, Corrupt> {
        let h = read(entity, bytes, t)?;
        let Some(from) = h.from else {
            return Ok(None);
        };
        let complete = t.saturating_sub(plan.horizon) >= from;
        Ok(Some((evaluate(spec, plan, entity, h.events, t), complete)))
    };
    let Some(bytes) = state else {
        if let Some(answer) = history.map(from_history).transpose()?.flatten() {
            return Ok(answer);
        }
        return Ok((
            plan.features.iter().map(|f| f.feature.default).collect(),
            true,
        ));
    };
    let state = crate::state::EntityState::decode(plan, entity, bytes)?;
    let ev = state.evaluate(plan, t);
    if ev.exact {
        return Ok((ev.values, true));
    }
    match history.map(from_history).transpose()?.flatten() {
        Some(answer) => Ok(answer),
        None => Ok((ev.values, false)),
    }
}

/// Every streaming feature of `entity` as of `t`, in plan order, from its events before `t`
/// (any order, repeats allowed): the reference evaluator's answer over them.
pub fn evaluate(
    spec: &duet_spec::Spec,
    plan: &SpeedPlan,
    entity: &str,
    events: Vec<Event>,
    t: i64,
) -> Vec<Value> {
    let reference = Reference::new(spec, events);
    plan.features
        .iter()
        .map(|f| reference.value(&f.feature, entity, t))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One event's record, without its length.
    fn encode(e: &Event) -> Vec<u8> {
        let mut w = Writer::default();
        encode_into(e, &mut w);
        w.buf
    }

    #[test]
    fn an_event_survives_its_encoding_and_damage_is_refused() {
        let e = Event {
            event_id: "e-1".into(),
            user_id: "u1".into(),
            event_type: "purchase".into(),
            amount: Some(12.5),
            ts: 1_782_000_000_123,
        };
        let bytes = encode(&e);
        assert_eq!(decode("u1", &bytes).unwrap(), e);
        let view = Event {
            amount: None,
            event_type: "view".into(),
            ts: -5,
            ..e.clone()
        };
        assert_eq!(decode("u1", &encode(&view)).unwrap(), view);
        // Truncated, extended, or of another format: refused, never misread.
        assert!(decode("u1", &bytes[..bytes.len() - 1]).is_err());
        assert!(decode("u1", &[bytes.as_slice(), &[0]].concat()).is_err());
        assert!(decode("u1", &[&[2], &bytes[1..]].concat()).is_err());
    }

    #[test]
    fn a_history_reads_back_in_time_order_up_to_the_instant() {
        let e = |id: &str, ts: i64| Event {
            event_id: id.into(),
            user_id: "u1".into(),
            event_type: "view".into(),
            amount: None,
            ts,
        };
        let mut first = Records::default();
        first.push(&e("b", 20));
        first.push(&e("a", 10));
        let mut second = Records::default();
        second.push(&e("c", 30));
        second.push(&e("b", 20));
        let bytes = [header(-5), first.into_bytes(), second.into_bytes()].concat();
        let h = read("u1", &bytes, 30).unwrap();
        assert_eq!(h.from, Some(-5));
        let ids: Vec<&str> = h.events.iter().map(|e| e.event_id.as_str()).collect();
        // Before 30 (exclusive), in time order, the repeated `b` twice (readers deduplicate).
        assert_eq!(ids, ["a", "b", "b"]);
        assert_eq!(read("u1", &[], 30).unwrap(), History::default());
        // A history without its header, or cut short, is refused.
        assert!(read("u1", &bytes[header(-5).len()..], 30).is_err());
        assert!(read("u1", &bytes[..bytes.len() - 1], 30).is_err());
    }
}
