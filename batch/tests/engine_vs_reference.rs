//! The DataFusion engine equals the reference evaluator on random specs and random streams:
//! batch snapshots (tiles folded into windows, ranks over the population) and streaming
//! features exactly as of arbitrary instants.

use arrow::array::{Array, ArrayRef, AsArray};
use arrow::datatypes::{Float64Type, Int64Type};
use duet_batch::snapshot::{Snapshots, snapshot};
use duet_batch::tiles::{TilePlan, compute_tiles, deduplicated_events, session};
use duet_spec::event::{Event, EventBatchBuilder};
use duet_spec::reference::Reference;
use duet_spec::{Feature, Layer, Value, ValueType, View, parse_spec};
use proptest::prelude::*;

const HOUR: i64 = 3_600_000;
const DAY: i64 = 24 * HOUR;
const T0: i64 = 1_780_012_800_000; // a UTC midnight

fn arb_spec() -> impl Strategy<Value = String> {
    let batch = (
        0usize..10,
        1i64..8,
        prop::sample::select(vec![1i64, 6, 24]),
        0usize..3,
    );
    let stream = (
        0usize..6,
        1i64..10,
        prop::sample::select(vec![1i64, 5]),
        0usize..3,
    );
    (prop::collection::vec(batch, 1..6), prop::collection::vec(stream, 1..5)).prop_map(|(bf, sf)| {
        let filters = ["", "where = { event_type = [\"purchase\"] }\n", "where = { event_type = [\"refund\", \"view\"] }\n"];
        let mut t = String::from("[[entity]]\nname = \"user\"\njoin_key = \"user_id\"\n\n[[view]]\nname = \"b\"\nentity = \"user\"\nlayer = \"batch\"\n");
        for (i, (kind, k, r, f)) in bf.into_iter().enumerate() {
            let window = format!("window = \"{}h\"\nresolution = \"{r}h\"\n", k * r);
            let body = match kind {
                0 => format!("aggregation = \"count\"\n{}{window}", filters[f]),
                1 => format!("aggregation = \"sum\"\nvalue = \"amount\"\n{}{window}", filters[1]),
                2 => format!("aggregation = \"mean\"\nvalue = \"min(amount, 40)\"\n{}{window}", filters[1]),
                3 => format!("aggregation = \"min\"\nvalue = \"amount * 2 - 1\"\n{}{window}", filters[1]),
                // Values constant over a tile or not, depending on the resolution.
                4 => format!("aggregation = \"count_distinct\"\nvalue = \"{}\"\n{}{window}", ["utc_hour(ts)", "utc_date(ts)", "event_type", "utc_date(ts) * 24 + utc_hour(ts)"][k as usize % 4], filters[f]),
                5 => format!("aggregation = \"last\"\nvalue = \"amount\"\n{}{window}", filters[1]),
                6 => format!("aggregation = \"ratio\"\nnumerator = {{ aggregation = \"count\", where = {{ event_type = [\"refund\"] }} }}\ndenominator = {{ aggregation = \"count\", where = {{ event_type = [\"purchase\"] }} }}\n{window}"),
                7 => format!("aggregation = \"pct_rank\"\nof = {{ aggregation = \"sum\", value = \"amount\", where = {{ event_type = [\"purchase\"] }} }}\nround = {}\n{window}", f),
                8 => format!("aggregation = \"age\"\nunit = \"{}h\"\n{}", r, filters[f]),
                _ => format!("aggregation = \"max\"\nvalue = \"amount\"\n{}", filters[1]),
            };
            t.push_str(&format!("\n[[view.feature]]\nname = \"b{i}\"\n{body}"));
        }
        t.push_str("\n[[view]]\nname = \"s\"\nentity = \"user\"\nlayer = \"streaming\"\n");
        for (i, (kind, k, r, f)) in sf.into_iter().enumerate() {
            let window = format!("window = \"{}m\"\nresolution = \"{r}m\"\n", k * r * 6);
            let body = match kind {
                0 => format!("aggregation = \"count\"\n{}{window}", filters[f]),
                1 => format!("aggregation = \"sum\"\nvalue = \"amount\"\n{}{window}", filters[1]),
                2 => format!("aggregation = \"count\"\n{}session_gap = \"{}m\"\n", filters[f], k * 5),
                3 => format!("aggregation = \"duration\"\nsession_gap = \"{}m\"\n", k * 5),
                4 => format!("aggregation = \"last\"\nvalue = \"amount\"\n{}ttl = \"{}m\"\n", filters[1], k * 10),
                _ => format!("aggregation = \"count_distinct\"\nvalue = \"event_type\"\n{window}"),
            };
            t.push_str(&format!("\n[[view.feature]]\nname = \"s{i}\"\n{body}"));
        }
        t
    })
}

fn arb_events() -> impl Strategy<Value = Vec<Event>> {
    let e = (0u8..6, 0usize..4, 0i64..(6 * DAY), 1u32..5000, 0u8..15);
    prop::collection::vec(e, 1..120).prop_map(|raw| {
        let types = ["login", "view", "purchase", "refund"];
        let mut out = Vec::new();
        for (i, (u, ty, off, cents, dup)) in raw.into_iter().enumerate() {
            let e = Event {
                event_id: format!("e{i:03}").into(),
                user_id: format!("u{u}").into(),
                event_type: types[ty].into(),
                amount: (ty >= 2).then_some(cents as f64 / 100.0),
                ts: T0 + off / 60_000 * 60_000,
            };
            if dup == 0 {
                out.push(e.clone());
            }
            out.push(e);
        }
        out
    })
}

fn batch_of(events: &[Event]) -> arrow::record_batch::RecordBatch {
    let mut b = EventBatchBuilder::with_capacity(events.len());
    for e in events {
        b.append(&e.event_id, &e.user_id, &e.event_type, e.amount, e.ts);
    }
    b.finish()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// The streaming `features` of `events` (deduplicated) as of each `(keys[i], times[i])`, by
/// the DataFusion engine: one column per feature.
fn streaming_columns(
    rt: &tokio::runtime::Runtime,
    events: &[Event],
    keys: &[String],
    times: &[i64],
    features: &[(&View, &Feature)],
) -> Vec<ArrayRef> {
    rt.block_on(async {
        let ctx = session();
        let ev = deduplicated_events(&ctx, vec![batch_of(events)], i64::MAX)
            .await
            .unwrap();
        duet_batch::asof::streaming_as_of(&ctx, ev, keys, times, features)
            .await
            .unwrap()
    })
}

fn agree(a: Value, b: Value) -> bool {
    match (a, b) {
        (Value::Float(x), Value::Float(y)) => (x - y).abs() <= 1e-9 * x.abs().max(1.0),
        (x, y) => x == y,
    }
}

fn value_at(col: &dyn Array, i: usize, ty: ValueType) -> Value {
    if col.is_null(i) {
        return Value::Null;
    }
    match ty {
        ValueType::Int => Value::Int(col.as_primitive::<Int64Type>().value(i)),
        ValueType::Float => Value::Float(col.as_primitive::<Float64Type>().value(i)),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn datafusion_equals_reference(text in arb_spec(), events in arb_events(), before_1970 in any::<bool>(), days in prop::collection::vec(0i64..8, 1..6), probes in prop::collection::vec((0usize..1000, prop::sample::select(vec![0i64, 1, 5, 6, 10, 12, 15, 18, 24, 25, 30, 36, 42, 48, 50, 54, 60, -6, -30]), -1i64..2), 1..24)) {
        let spec = parse_spec("random.toml", &text).unwrap();
        // The same stream moved before 1970 (negative epoch times round the same way).
        let shift = if before_1970 { -2 * T0 } else { 0 };
        let events: Vec<Event> = events.into_iter().map(|e| Event { ts: e.ts + shift, ..e }).collect();
        let reference = Reference::new(&spec, events.clone());
        let rt = runtime();
        let view = spec.views_of(Layer::Batch).next().unwrap();
        let plan = TilePlan::compile(view);
        let instants: Vec<i64> = days.iter().map(|d| T0 + shift + d * DAY).collect();
        let before = *instants.iter().max().unwrap();
        let tiles = rt.block_on(async {
            let ctx = session();
            let ev = deduplicated_events(&ctx, vec![batch_of(&events)], before).await.unwrap();
            compute_tiles(&plan, ev).await.unwrap()
        });
        // Distinct values constant over a tile are taken from the tile query: the same as a
        // distinct query of their own would give.
        if !plan.per_tile.is_empty() {
            let mut queried = plan.clone();
            queried.per_tile.clear();
            let by_query = rt.block_on(async {
                let ctx = session();
                let ev = deduplicated_events(&ctx, vec![batch_of(&events)], before).await.unwrap();
                compute_tiles(&queried, ev).await.unwrap()
            });
            for slot in plan.per_tile.keys() {
                prop_assert_eq!(&tiles.distinct[slot], &by_query.distinct[slot], "slot {}\n{}", slot, text);
            }
        }
        // A backfill's snapshots: each folded from the one before, forwards or backwards.
        let mut successive = Snapshots::new(&tiles, &plan).refolding_at_most(usize::MAX);
        for s in &instants {
            let got = snapshot(&tiles, &plan, *s);
            prop_assert_eq!(&successive.at(*s), &got, "folded from the instant before, as of {}\n{}", s, text);
            let expected = reference.batch_snapshot(view, *s);
            prop_assert_eq!(got.num_rows(), expected.len());
            let keys = got.column(0).as_string::<i32>();
            for row in 0..got.num_rows() {
                let values = &expected[keys.value(row)];
                for (j, f) in view.features.iter().enumerate() {
                    let v = value_at(got.column(j + 1).as_ref(), row, f.value_type);
                    prop_assert!(agree(values[j], v), "{} of {} as of {}: reference {:?}, datafusion {:?}\n{}", f.name, keys.value(row), s, values[j], v, text);
                }
            }
        }
        let streaming: Vec<_> = spec.features().filter(|(v, _)| v.layer == Layer::Streaming).collect();
        // Probe near events, on the minute grid and a millisecond either side of it.
        let near: Vec<&Event> = probes.iter().map(|(i, _, _)| &events[i % events.len()]).collect();
        let keys: Vec<String> = near.iter().map(|e| e.user_id.to_string()).collect();
        let times: Vec<i64> = probes.iter().zip(&near).map(|((_, m, ms), e)| e.ts + m * 60_000 + ms).collect();
        let cols = streaming_columns(&rt, &events, &keys, &times, &streaming);
        for (j, (_, f)) in streaming.iter().enumerate() {
            for i in 0..keys.len() {
                let expected = reference.value(f, &keys[i], times[i]);
                let got = value_at(cols[j].as_ref(), i, f.value_type);
                prop_assert!(agree(expected, got), "{} of {} as of {}: reference {:?}, datafusion {:?}\n{}", f.name, keys[i], times[i], expected, got, text);
            }
        }
    }
}

/// Sessions that chain back before the earliest row's lookback, with gaps at and around each
/// session gap: the streaming features equal the reference's however far back a row's session
/// began.
const CHAINS: &str = r#"
[[entity]]
name = "user"
join_key = "user_id"

[[view]]
name = "s"
entity = "user"
layer = "streaming"

[[view.feature]]
name = "events_in_session"
aggregation = "count"
session_gap = "30m"

[[view.feature]]
name = "session_length"
aggregation = "duration"
session_gap = "30m"

[[view.feature]]
name = "purchases_in_short_session"
aggregation = "count"
where = { event_type = ["purchase"] }
session_gap = "10m"

[[view.feature]]
name = "spend_in_long_session"
aggregation = "sum"
value = "amount"
where = { event_type = ["purchase"] }
session_gap = "45m"

[[view.feature]]
name = "last_amount_in_session"
aggregation = "last"
value = "amount"
where = { event_type = ["purchase", "refund"] }
session_gap = "20m"

[[view.feature]]
name = "events_3h"
aggregation = "count"
window = "3h"
resolution = "1m"
"#;

fn arb_chains() -> impl Strategy<Value = Vec<Event>> {
    const MIN: i64 = 60_000;
    // Gaps at, just under and just over each session gap, and long breaks.
    let gaps = vec![
        0,
        1,
        MIN,
        7 * MIN,
        10 * MIN - 1,
        10 * MIN,
        10 * MIN + 1,
        20 * MIN,
        20 * MIN + 1,
        30 * MIN - 1,
        30 * MIN,
        30 * MIN + 1,
        45 * MIN,
        45 * MIN + 1,
        3 * HOUR,
    ];
    let user = (
        0i64..HOUR,
        prop::collection::vec(
            (prop::sample::select(gaps), 0usize..4, 1u32..5000, 0u8..12),
            1..80,
        ),
    );
    prop::collection::vec(user, 1..4).prop_map(|users| {
        let types = ["login", "view", "purchase", "refund"];
        let mut out = Vec::new();
        for (u, (start, steps)) in users.into_iter().enumerate() {
            let mut ts = T0 + start;
            for (i, (gap, ty, cents, dup)) in steps.into_iter().enumerate() {
                ts += gap;
                let e = Event {
                    event_id: format!("u{u}e{i:03}").into(),
                    user_id: format!("u{u}").into(),
                    event_type: types[ty].into(),
                    amount: (ty >= 2).then_some(cents as f64 / 100.0),
                    ts,
                };
                if dup == 0 {
                    out.push(e.clone());
                }
                out.push(e);
            }
        }
        out
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn sessions_reaching_back_before_the_earliest_row(events in arb_chains(), probes in prop::collection::vec((0usize..1000, prop::sample::select(vec![0i64, 1, -1, 60_000, 600_000, 1_800_000, 1_800_001, 2_700_000, 3 * HOUR, 3 * HOUR + 1]), any::<bool>()), 1..12)) {
        let spec = parse_spec("chains.toml", CHAINS).unwrap();
        let reference = Reference::new(&spec, events.clone());
        let streaming: Vec<_> = spec.features().collect();
        // Rows at, after and (by the 3h window's lookback) before events, so that the earliest
        // row's lookback falls inside sessions, at their edges, or between them.
        let near: Vec<&Event> = probes.iter().map(|(i, _, _)| &events[i % events.len()]).collect();
        let keys: Vec<String> = near.iter().map(|e| e.user_id.to_string()).collect();
        let times: Vec<i64> = probes.iter().zip(&near).map(|((_, d, later), e)| if *later { e.ts + d } else { e.ts - d }).collect();
        let rt = runtime();
        let cols = streaming_columns(&rt, &events, &keys, &times, &streaming);
        for (j, (_, f)) in streaming.iter().enumerate() {
            for i in 0..keys.len() {
                let expected = reference.value(f, &keys[i], times[i]);
                let got = value_at(cols[j].as_ref(), i, f.value_type);
                prop_assert!(agree(expected, got), "{} of {} as of {}: reference {:?}, datafusion {:?}", f.name, keys[i], times[i], expected, got);
            }
        }
    }
}

/// A session whose events are exactly one gap apart continues across the earliest row's
/// lookback, and reaches back further than a gap before it.
#[test]
fn a_session_chained_at_exactly_the_gap_across_the_earliest_lookback() {
    const MIN: i64 = 60_000;
    let spec = parse_spec("chains.toml", CHAINS).unwrap();
    let streaming: Vec<_> = spec.features().collect();
    let t = T0 + 10 * HOUR;
    let events: Vec<Event> = (0..8)
        .map(|i| Event {
            event_id: format!("e{i}").into(),
            user_id: "u0".into(),
            event_type: "purchase".into(),
            amount: Some(1.0 + i as f64),
            ts: t + (i - 1) * 45 * MIN,
        })
        .collect();
    let reference = Reference::new(&spec, events.clone());
    let rt = runtime();
    // The chain's events are 45 minutes apart, from t - 45m to t + 4h30m. The earliest row (of
    // an entity without events) puts the lookback (3h) at `from`, just after an event of the
    // chain, between two, or exactly on one; the chain's row is after the last event.
    for from in [t + 1, t + 30 * MIN, t + 45 * MIN] {
        let keys = vec!["nobody".to_string(), "u0".to_string()];
        let times = vec![from + 3 * HOUR, t + 270 * MIN + 1];
        assert!(times[0] < times[1]);
        let cols = streaming_columns(&rt, &events, &keys, &times, &streaming);
        for (j, (_, f)) in streaming.iter().enumerate() {
            let expected = reference.value(f, "u0", times[1]);
            let got = value_at(cols[j].as_ref(), 1, f.value_type);
            assert!(
                agree(expected, got),
                "{} as of {} (lookback from {from}): reference {expected:?}, datafusion {got:?}",
                f.name,
                times[1]
            );
        }
        // The whole chain is one session under the 45-minute gap: 1 + 2 + ... + 8.
        assert_eq!(
            value_at(cols[3].as_ref(), 1, ValueType::Float),
            Value::Float(36.0)
        );
    }
}
