//! The speed layer's state, fed random disordered and duplicated streams in random batches
//! with commits in between, evaluates every streaming feature exactly as the reference does.

use std::collections::BTreeSet;
use std::sync::Arc;

use duet_spec::event::Event;
use duet_spec::reference::Reference;
use duet_spec::{Layer, Value, parse_spec};
use duet_speed::history;
use duet_speed::plan::SpeedPlan;
use duet_speed::processor::{Message, Processor, history_key, state_key};
use duet_speed::state::EntityState;
use duet_speed::store::{MemoryStore, StateStore};
use proptest::prelude::*;

const MIN: i64 = 60_000;
/// A minute-aligned instant, so event times fall exactly on tile edges.
const T0: i64 = 1_780_000_020_000;

/// A random streaming spec: windows, sessions and latest values over random filters.
/// The speed layer's value agrees with the reference's: floats to 1e-9 relative, the rest exactly.
fn agree(expected: Value, got: Value) -> bool {
    match (expected, got) {
        (Value::Float(a), Value::Float(b)) => (a - b).abs() <= 1e-9 * a.abs().max(1.0),
        (a, b) => a == b,
    }
}

/// Asserts that `values`, a state's evaluation of `user` as of `t`, agree with the reference
/// feature by feature; `context` names the case in the message. Returns the features compared.
fn assert_agrees(
    plan: &SpeedPlan,
    reference: &Reference<'_>,
    user: &str,
    t: i64,
    values: &[Value],
    context: impl Fn() -> String,
) -> usize {
    for (f, v) in plan.features.iter().zip(values) {
        let expected = reference.value(&f.feature, user, t);
        assert!(
            agree(expected, *v),
            "{}: {} of {user} at T0{:+}ms: reference {expected:?}, speed {v:?}",
            context(),
            f.feature.name,
            t - T0
        );
    }
    values.len()
}

fn arb_spec() -> impl Strategy<Value = String> {
    let feature = (
        0usize..9,
        1i64..13,
        prop::sample::select(vec![1i64, 5]),
        prop::sample::select(vec![5i64, 30]),
        0usize..4,
    );
    (prop::collection::vec(feature, 1..7), any::<bool>()).prop_map(|(features, history)| {
        let mut text = String::from(
            "[[entity]]\nname = \"user\"\njoin_key = \"user_id\"\n\n[[view]]\nname = \"rt\"\nentity = \"user\"\nlayer = \"streaming\"\nallowed_lateness = \"10m\"\n",
        );
        if history {
            text.push_str("history = \"1d\"\n");
        }
        let filters = ["", "where = { event_type = [\"purchase\"] }\n", "where = { event_type = [\"view\", \"login\"] }\n", "where = { event_type = [\"refund\", \"purchase\"] }\n"];
        for (i, (kind, k, r, gap, filt)) in features.into_iter().enumerate() {
            let window = format!("window = \"{}m\"\nresolution = \"{r}m\"\n", k * r);
            let session = format!("session_gap = \"{gap}m\"\n");
            let body = match kind {
                0 => format!("aggregation = \"count\"\n{}{window}", filters[filt]),
                1 => format!("aggregation = \"sum\"\nvalue = \"amount\"\n{}{window}", filters[2 - filt.min(1)]),
                2 => format!("aggregation = \"mean\"\nvalue = \"min(amount, 50)\"\n{}{window}", filters[1]),
                3 => format!("aggregation = \"max\"\nvalue = \"amount\"\n{}{window}", filters[3]),
                4 => format!("aggregation = \"count_distinct\"\nvalue = \"event_type\"\n{}{window}", filters[filt]),
                5 => format!("aggregation = \"count\"\n{}{session}", filters[filt]),
                6 => format!("aggregation = \"duration\"\n{session}"),
                7 => format!("aggregation = \"last\"\nvalue = \"amount\"\n{}ttl = \"{}m\"\n", filters[3], k * 10),
                _ => format!(
                    "aggregation = \"ratio\"\nnumerator = {{ aggregation = \"count\", where = {{ event_type = [\"refund\"] }} }}\ndenominator = {{ aggregation = \"sum\", value = \"amount\", where = {{ event_type = [\"purchase\"] }} }}\n{window}"
                ),
            };
            text.push_str(&format!("\n[[view.feature]]\nname = \"f{i}\"\n{body}"));
        }
        text
    })
}

/// Random events over 4 users and 2 hours, duplicated at random, in an order disordered by
/// less than the allowed lateness.
fn arb_stream() -> impl Strategy<Value = Vec<Event>> {
    let event = (
        0u8..4,
        0usize..4,
        0i64..(2 * 60 * MIN),
        0u32..10_000,
        0i64..(9 * MIN),
        0u8..20,
    );
    prop::collection::vec(event, 1..160).prop_map(|raw| {
        let types = ["login", "view", "purchase", "refund"];
        let mut keyed = Vec::new();
        for (i, (user, ty, offset, cents, jitter, dup)) in raw.into_iter().enumerate() {
            // Times on a 30-second grid, clustered, put events exactly on tile edges, window
            // bounds and session gaps.
            let ts = T0 + (offset / (7 * MIN) * (7 * MIN) + offset % (3 * MIN)) / 30_000 * 30_000;
            let e = Event {
                event_id: format!("e{i:04}").into(),
                user_id: format!("u{user}").into(),
                event_type: types[ty].into(),
                amount: (ty >= 2).then_some(cents as f64 / 100.0),
                ts,
            };
            keyed.push((ts + jitter, e.clone()));
            if dup == 0 {
                keyed.push((ts + jitter + 1, e));
            }
        }
        keyed.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.event_id.cmp(&b.1.event_id)));
        keyed.into_iter().map(|(_, e)| e).collect()
    })
}

fn to_json(e: &Event) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "event_id": e.event_id, "user_id": e.user_id, "event_type": e.event_type,
        "amount": e.amount, "ts": e.ts,
    }))
    .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn state_equals_reference(spec_text in arb_spec(), stream in arb_stream(), cuts in prop::collection::vec(1usize..40, 1..20), probes in prop::collection::vec((0i64..360, -1i64..2), 1..10)) {
        let spec = parse_spec("random.toml", &spec_text).unwrap();
        let plan = Arc::new(SpeedPlan::compile(&spec));
        let store = MemoryStore::new();
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let mut processor = Processor::new(plan.clone(), store.clone(), "t:", "events");
        let messages: Vec<Message> = stream.iter().enumerate().map(|(i, e)| Message {
            partition: 0, offset: i as i64, payload: Some(to_json(e).into()), timestamp_ms: None,
        }).collect();
        let mut rest = &messages[..];
        let mut cut = cuts.iter().cycle();
        while !rest.is_empty() {
            let n = (*cut.next().unwrap()).min(rest.len());
            let outcome = rt.block_on(processor.process(rest[..n].to_vec(), T0 + 24 * 60 * MIN)).unwrap();
            prop_assert_eq!(outcome.late, 0);
            rest = &rest[n..];
        }
        stored_states_match_reference(&rt, &store, &plan, &spec, &spec_text, &stream, &probes)?;
        prop_assert!(spec.views_of(Layer::Streaming).count() == 1);
    }
}

/// Every user's stored state, evaluated at the probes, equals the reference over `stream`.
/// When the spec keeps a `history`, each user's history holds every one of its events (once
/// deduplicated), and the probes older than the state's boundary are answered from it, exactly.
fn stored_states_match_reference(
    rt: &tokio::runtime::Runtime,
    store: &MemoryStore,
    plan: &SpeedPlan,
    spec: &duet_spec::Spec,
    spec_text: &str,
    stream: &[Event],
    probes: &[(i64, i64)],
) -> Result<(), TestCaseError> {
    let plan = &plan;
    let reference = Reference::new(spec, stream.to_vec());
    let end = stream.iter().map(|e| e.ts).max().unwrap();
    for user in ["u0", "u1", "u2", "u3"] {
        let (mut states, mut histories) = rt
            .block_on(
                store.get_many_with_history(&[state_key("t:", user)], &[history_key("t:", user)]),
            )
            .unwrap();
        let (stored, history) = (states.pop().unwrap(), histories.pop().unwrap());
        if plan.history > 0 {
            let held: BTreeSet<String> = history::read(user, &history, i64::MAX)
                .unwrap()
                .events
                .iter()
                .map(|e| e.event_id.to_string())
                .collect();
            let sent: BTreeSet<String> = stream
                .iter()
                .filter(|e| e.user_id.as_str() == user)
                .map(|e| e.event_id.to_string())
                .collect();
            prop_assert_eq!(held, sent, "the history of {}", user);
        } else {
            prop_assert!(history.is_empty());
        }
        let state = match &stored {
            Some(v) => EntityState::decode(plan, user, &v.bytes).unwrap(),
            None => EntityState::new(plan, i64::MIN),
        };
        for (steps, nudge) in probes {
            let t = (end - 150 * MIN) / 30_000 * 30_000 + steps * 30_000 + nudge;
            let got = if plan.history > 0 {
                let state = stored.as_ref().map(|v| v.bytes.as_slice());
                history::evaluate_stored(spec, plan, user, state, Some(&history), t).unwrap()
            } else if t < state.boundary {
                continue;
            } else {
                let got = state.evaluate(plan, t);
                (got.values, got.exact)
            };
            prop_assert!(got.1, "{} at {}: not exact", user, t);
            for (f, v) in plan.features.iter().zip(got.0) {
                let expected = reference.value(&f.feature, user, t);
                if std::env::var("DEBUG_PROP").is_ok() {
                    eprintln!("{} {user} {t} {expected:?} {v:?}", f.feature.name);
                }
                prop_assert!(
                    agree(expected, v),
                    "{} for {user} at {t}: reference {expected:?}, speed {v:?}\n{spec_text}",
                    f.feature.name
                );
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// A batch is prepared before the previous one's writes are applied (the speed layer's
    /// pipeline), and a second process (a zombie after a rebalance) writes the same batches
    /// first: every write of the first process then loses, is recomputed from the stored state,
    /// and still nothing counts twice.
    #[test]
    fn overlapped_batches_and_a_second_writer_count_once(spec_text in arb_spec(), stream in arb_stream(), cuts in prop::collection::vec(1usize..40, 1..20), zombie in prop::collection::vec(any::<bool>(), 1..20), probes in prop::collection::vec((0i64..360, -1i64..2), 1..10)) {
        let spec = parse_spec("random.toml", &spec_text).unwrap();
        let plan = Arc::new(SpeedPlan::compile(&spec));
        let store = MemoryStore::new();
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let mut a = Processor::new(plan.clone(), store.clone(), "t:", "events");
        let mut b = Processor::new(plan.clone(), store.clone(), "t:", "events");
        let messages: Vec<Message> = stream.iter().enumerate().map(|(i, e)| Message {
            partition: 0, offset: i as i64, payload: Some(to_json(e).into()), timestamp_ms: None,
        }).collect();
        let mut batches = Vec::new();
        let mut rest = &messages[..];
        let mut cut = cuts.iter().cycle();
        while !rest.is_empty() {
            let n = (*cut.next().unwrap()).min(rest.len());
            batches.push(&rest[..n]);
            rest = &rest[n..];
        }
        let now = T0 + 24 * 60 * MIN;
        let mut in_flight = None;
        for (i, batch) in batches.iter().enumerate() {
            let (outcome, writes) = rt.block_on(a.prepare(batch.to_vec(), now)).unwrap();
            if let Some((mut prev_outcome, prev_writes, zombie_first)) = in_flight.take() {
                apply(&rt, &mut a, &mut b, &store, &mut prev_outcome, prev_writes, zombie_first, batches[i - 1], now);
            }
            in_flight = Some((outcome, writes, zombie[i % zombie.len()]));
        }
        if let Some((mut outcome, writes, zombie_first)) = in_flight.take() {
            apply(&rt, &mut a, &mut b, &store, &mut outcome, writes, zombie_first, batches[batches.len() - 1], now);
        }
        stored_states_match_reference(&rt, &store, &plan, &spec, &spec_text, &stream, &probes)?;
    }
}

/// Applies `writes` of processor `a`, after the zombie `b` processed the same batch when
/// `zombie_first`, then tells `a` which of its cached states are stale.
#[allow(clippy::too_many_arguments)]
fn apply(
    rt: &tokio::runtime::Runtime,
    a: &mut Processor<MemoryStore>,
    b: &mut Processor<MemoryStore>,
    store: &MemoryStore,
    outcome: &mut duet_speed::processor::BatchOutcome,
    writes: duet_speed::writes::StateWrites,
    zombie_first: bool,
    batch: &[Message],
    now: i64,
) {
    if zombie_first {
        rt.block_on(b.process(batch.to_vec(), now)).unwrap();
    }
    let conflicts_before = outcome.conflicts;
    let to_write = writes.len();
    let reloaded = rt.block_on(writes.apply(store, outcome)).unwrap();
    if zombie_first && to_write > 0 {
        assert!(
            outcome.conflicts > conflicts_before,
            "the zombie's writes made every write lose"
        );
    }
    a.forget(&reloaded);
}

#[test]
fn catalog_update_plan() {
    let spec = duet_spec::load_spec(None).unwrap();
    insta::assert_snapshot!(SpeedPlan::compile(&spec).to_string());
}

/// Events on the exact edges of windows, tiles, the session gap and the TTL, folded at every
/// possible boundary, evaluated at every edge instant: the state agrees with the reference.
#[test]
fn edges_match_reference_at_every_boundary() {
    let spec = duet_spec::load_spec(None).unwrap();
    let plan = SpeedPlan::compile(&spec);
    let ev = |id: &str, ty: &str, amount: Option<f64>, ts: i64| Event {
        event_id: id.into(),
        user_id: "u".into(),
        event_type: ty.into(),
        amount,
        ts,
    };
    let events = vec![
        ev("a", "purchase", Some(10.0), T0),
        ev("b", "view", None, T0 + 30 * MIN),
        ev("c", "purchase", Some(20.0), T0 + 60 * MIN),
        ev("d", "purchase", Some(5.0), T0 + 60 * MIN),
        ev("e", "login", None, T0 + 90 * MIN + 1),
        ev("f", "purchase", Some(7.5), T0 + 150 * MIN),
        ev("g", "view", None, T0 + 179 * MIN + 59_999),
    ];
    let reference = Reference::new(&spec, events.clone());
    let mut probes: Vec<i64> = Vec::new();
    for e in &events {
        for d in [0, 10 * MIN, 30 * MIN, 60 * MIN, 120 * MIN] {
            for nudge in [-1, 0, 1] {
                probes.push(e.ts + d + nudge);
            }
        }
    }
    let mut checked = 0;
    for b in (0..=300).map(|m| T0 - 10 * MIN + m * MIN) {
        let mut state = EntityState::new(&plan, i64::MIN);
        for e in &events {
            state.apply(e);
        }
        state.advance(&plan, b);
        let state = EntityState::decode(&plan, "u", &state.encode(&plan)).unwrap();
        for &t in probes.iter().filter(|t| **t >= b) {
            let got = state.evaluate(&plan, t);
            checked += assert_agrees(&plan, &reference, "u", t, &got.values, || {
                format!("boundary T0{:+}ms", b - T0)
            });
        }
    }
    assert!(checked > 10_000, "{checked}");
}

/// A message on `partition` at `offset`: a view by `user` at `ts`.
fn view_message(partition: i32, offset: i64, user: &str, ts: i64) -> Message {
    let e = Event {
        event_id: format!("{user}-{offset}").into(),
        user_id: user.into(),
        event_type: "view".into(),
        amount: None,
        ts,
    };
    Message {
        partition,
        offset,
        payload: Some(to_json(&e).into()),
        timestamp_ms: None,
    }
}

/// What the processor tests below run with: the catalog's plan, an empty store, a runtime to
/// drive the processor, and the processing time (a day after `T0`).
fn catalog_processing() -> (Arc<SpeedPlan>, MemoryStore, tokio::runtime::Runtime, i64) {
    let spec = duet_spec::load_spec(None).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    (
        Arc::new(SpeedPlan::compile(&spec)),
        MemoryStore::new(),
        rt,
        T0 + 24 * 60 * MIN,
    )
}

/// The state stored for `user` under the prefix `t:`, decoded.
fn stored_state(
    rt: &tokio::runtime::Runtime,
    store: &MemoryStore,
    plan: &SpeedPlan,
    user: &str,
) -> EntityState {
    let v = rt
        .block_on(store.get_many(&[state_key("t:", user)]))
        .unwrap()
        .pop()
        .unwrap()
        .expect("stored");
    EntityState::decode(plan, user, &v.bytes).unwrap()
}

/// A batch's states fold up to the watermark from *before* the batch, minus the lateness: a
/// pipelined batch does not keep the previous batch's events as raw records. A process that
/// dies after writing a batch's states but before committing its offsets is replaced by one
/// that resumes from the previous batch's commit: replaying the batch then finds every event
/// among the records (a duplicate, not late) and leaves the state as it was.
#[test]
fn a_replay_after_a_crash_before_the_commit_counts_duplicates() {
    let (plan, store, rt, now) = catalog_processing();
    let messages: Vec<Message> = (0..120)
        .map(|i| {
            let purchase = i % 3 == 0;
            let e = Event {
                event_id: format!("e{i}").into(),
                user_id: "u1".into(),
                event_type: if purchase { "purchase" } else { "view" }.into(),
                amount: purchase.then_some(i as f64),
                ts: T0 + i * MIN,
            };
            Message {
                partition: 0,
                offset: i,
                payload: Some(to_json(&e).into()),
                timestamp_ms: None,
            }
        })
        .collect();
    let (first, second) = messages.split_at(60);
    let stored = || stored_state(&rt, &store, &plan, "u1");

    let mut a = Processor::new(plan.clone(), store.clone(), "t:", "events");
    let one = rt.block_on(a.process(first.to_vec(), now)).unwrap();
    let wm_one = one.commit[&0].1;
    assert_eq!(wm_one, T0 + 59 * MIN);
    let two = rt.block_on(a.process(second.to_vec(), now)).unwrap();
    assert_eq!((two.applied, two.duplicates, two.late), (60, 0, 0));
    let written = stored();
    assert_eq!(written.boundary, wm_one - plan.lateness);
    // Batch one's events from the boundary on (minutes 49 to 59), and batch two's.
    assert_eq!(written.records.len(), 11 + 60);

    // The process dies before committing batch two; another resumes from batch one's commit.
    let mut b = Processor::new(plan.clone(), store.clone(), "t:", "events");
    b.assign(0, Some(wm_one));
    let replay = rt.block_on(b.process(second.to_vec(), now)).unwrap();
    assert_eq!((replay.applied, replay.duplicates, replay.late), (0, 60, 0));
    assert_eq!(stored(), written);
}

/// One partition hours behind another (a group catching up): the lagging partition's entities
/// keep their keys for as long as their own partition's events can still reach them, not a
/// minute, as counting from the other partition's watermark gave. An expired key would bring
/// the next event an empty state claiming to hold every event (a session counted from the
/// middle, as exact). The leading partition's keys, in the same batch, live no longer than its
/// own watermark needs.
#[test]
fn a_lagging_partition_s_keys_live_as_long_as_its_own_events_need() {
    let (plan, store, rt, now) = catalog_processing();
    let ahead = T0 + 10 * 60 * MIN;
    // The time a key has to live beyond its state's last relevant instant counted from `wm`.
    let needed = |user: &str, wm: i64| {
        let until = stored_state(&rt, &store, &plan, user)
            .relevant_until(&plan)
            .unwrap();
        std::time::Duration::from_millis((until + plan.lateness - wm) as u64)
    };
    let left = |user: &str| store.expires_in(&state_key("t:", user)).expect("alive");
    let mut p = Processor::new(plan.clone(), store.clone(), "t:", "events");

    // Both partitions in one batch; then the lagging one alone.
    let mut first: Vec<Message> = (0..30)
        .map(|i| view_message(1, i, "behind", T0 + i * MIN))
        .collect();
    first.push(view_message(0, 0, "ahead", ahead));
    rt.block_on(p.process(first, now)).unwrap();
    let wm = T0 + 29 * MIN;
    assert!(
        left("behind") >= needed("behind", wm),
        "{:?}",
        left("behind")
    );
    let second = (30..40)
        .map(|i| view_message(1, i, "behind", T0 + i * MIN))
        .collect();
    rt.block_on(p.process(second, now)).unwrap();
    let wm = T0 + 39 * MIN;
    assert!(
        left("behind") >= needed("behind", wm),
        "{:?} left, {:?} needed",
        left("behind"),
        needed("behind", wm)
    );
    assert!(left("behind") > std::time::Duration::from_millis(plan.horizon as u64));

    // Each entity's key counts from its own partition's watermark: the lagging partition in
    // the same batch does not stretch the leading one's keys by hours.
    let third = vec![
        view_message(1, 40, "behind", T0 + 40 * MIN),
        view_message(0, 1, "ahead", ahead + MIN),
    ];
    rt.block_on(p.process(third, now)).unwrap();
    let limit = needed("ahead", ahead + MIN) + std::time::Duration::from_secs(60);
    assert!(left("ahead") <= limit, "{:?} > {limit:?}", left("ahead"));
    assert!(left("behind") >= needed("behind", T0 + 40 * MIN));
}

/// A first batch whose every event is further ahead of the clock than the skew allowed: the
/// partition gets no watermark, and the key's expiry counts from the processing time (it used
/// to overflow, counted from no watermark at all).
#[test]
fn a_key_whose_events_are_all_ahead_of_the_clock_expires_from_the_processing_time() {
    let (plan, store, rt, now) = catalog_processing();
    let ts = now + 10 * MIN;
    let m = view_message(0, 0, "u1", ts);
    let mut p = Processor::new(plan.clone(), store.clone(), "t:", "events");
    let out = rt.block_on(p.process(vec![m], now)).unwrap();
    assert_eq!((out.applied, out.commit[&0].1), (1, i64::MIN));
    let left = store.expires_in(&state_key("t:", "u1")).expect("alive");
    let most = ts + plan.horizon + plan.lateness + MIN - now;
    assert!(
        left <= std::time::Duration::from_millis(most as u64),
        "{left:?}"
    );
    assert!(
        left >= std::time::Duration::from_millis(plan.horizon as u64),
        "{left:?}"
    );
}

/// A key expires by the wall clock, counted from its partition's watermark: while the
/// watermark stands still (the layer stopped, or no events came) the key of a state that still
/// counts can expire. The next event of its entity finds no state: it is rebuilt from the
/// entity's history, not started empty (which would claim, as exact, that the entity had no
/// earlier events). Both ways a state is found absent: read by a restarted process, and by a
/// running one whose cached copy's write then loses.
#[test]
fn a_state_whose_key_expired_while_the_watermark_stood_still_is_rebuilt_from_its_history() {
    let (plan, _, rt, _) = catalog_processing();
    let spec = duet_spec::load_spec(None).unwrap();
    let ev = |id: &str, user: &str, kind: &str, amount: Option<f64>, ts: i64| Event {
        event_id: id.into(),
        user_id: user.into(),
        event_type: kind.into(),
        amount,
        ts,
    };
    let message = |offset: i64, e: &Event| Message {
        partition: 0,
        offset,
        payload: Some(to_json(e).into()),
        timestamp_ms: None,
    };
    // u1 buys at T0 and views in the next minutes; another user's event moves the watermark to
    // 110 minutes, ten before u1's purchase stops counting (the catalog's 2-hour `last`). u3's
    // only event stopped counting long before that watermark.
    let first = vec![
        ev("z", "u3", "purchase", Some(9.0), T0 - 180 * MIN),
        ev("a", "u1", "purchase", Some(5.0), T0),
        ev("b", "u1", "view", None, T0 + MIN),
        ev("c", "u1", "view", None, T0 + 2 * MIN),
        ev("d", "u2", "view", None, T0 + 110 * MIN),
    ];
    let wm = T0 + 110 * MIN;
    // Half an hour later (a stop, or a stall), u1 and u3 buy again. u3's history holds nothing
    // that still counts: its key had rightly expired, and its state starts empty.
    let next = [
        ev("e", "u1", "view", None, T0 + 111 * MIN),
        ev("y", "u3", "purchase", Some(1.0), T0 + 111 * MIN),
    ];
    let stopped = wm + 30 * MIN;
    let mut all = first.clone();
    all.extend(next.iter().cloned());
    let reference = Reference::new(&spec, all);
    let check = |plan: &SpeedPlan, store: &MemoryStore, how: &str| {
        for user in ["u1", "u3"] {
            let state = stored_state(&rt, store, plan, user);
            for t in [next[0].ts, next[0].ts + 1, T0 + 119 * MIN, T0 + 121 * MIN] {
                let got = state.evaluate(plan, t);
                assert!(got.exact, "{how}: {user} not exact at T0{:+}ms", t - T0);
                assert_agrees(plan, &reference, user, t, &got.values, || how.to_string());
            }
        }
    };
    let first_batch = |plan: &Arc<SpeedPlan>, store: &MemoryStore| {
        let mut p = Processor::new(plan.clone(), store.clone(), "t:", "events");
        let messages = first.iter().enumerate().map(|(i, e)| message(i as i64, e));
        let out = rt.block_on(p.process(messages.collect(), wm)).unwrap();
        assert_eq!((out.applied, out.rebuilt), (5, 0));
        // Expired early (u1), as by a stop of over ten minutes plus the lateness, or rightly
        // (u3).
        store.expire(&state_key("t:", "u1"));
        store.expire(&state_key("t:", "u3"));
        p
    };
    let messages = || {
        next.iter()
            .enumerate()
            .map(|(i, e)| message(first.len() as i64 + i as i64, e))
            .collect::<Vec<_>>()
    };
    let restart = |plan: &Arc<SpeedPlan>, store: &MemoryStore, now: i64| {
        let mut restarted = Processor::new(plan.clone(), store.clone(), "t:", "events");
        restarted.assign(0, Some(wm));
        rt.block_on(restarted.process(messages(), now)).unwrap()
    };

    // A restarted process reads the absent state.
    let store = MemoryStore::new();
    drop(first_batch(&plan, &store));
    let out = restart(&plan, &store, stopped);
    assert_eq!((out.applied, out.rebuilt, out.rebuilt_partially), (2, 1, 0));
    check(&plan, &store, "restarted");

    // A running process holds the state in its cache: its write finds the key gone.
    let store = MemoryStore::new();
    let mut running = first_batch(&plan, &store);
    let out = rt.block_on(running.process(messages(), stopped)).unwrap();
    assert_eq!((out.applied, out.conflicts, out.rebuilt), (2, 2, 1));
    check(&plan, &store, "running");

    // A `history` shorter than the streaming horizon: the rebuilt state is counted as possibly
    // missing events (here it misses none: the history was created with the first ones).
    let short = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared-spec/catalog.toml"),
    )
    .unwrap()
    .replace("history = \"400d\"", "history = \"1h\"");
    let short = Arc::new(SpeedPlan::compile(
        &parse_spec("short.toml", &short).unwrap(),
    ));
    assert_eq!(short.history, 60 * MIN);
    let store = MemoryStore::new();
    drop(first_batch(&short, &store));
    let out = restart(&short, &store, stopped);
    assert_eq!((out.applied, out.rebuilt, out.rebuilt_partially), (2, 1, 1));
    check(&short, &store, "short history");

    // A group without checkpoints (its partition has no watermark yet, the boundary is not
    // known): the state is rebuilt, and an event of the batch older than the history's header
    // and oldest event is still taken, as an empty state would.
    let store = MemoryStore::new();
    drop(first_batch(&short, &store));
    let old = ev("x", "u1", "view", None, T0 - 10 * MIN);
    let mut unchecked = Processor::new(short.clone(), store.clone(), "t:", "events");
    let out = rt
        .block_on(unchecked.process(vec![message(9, &old)], stopped))
        .unwrap();
    assert_eq!((out.applied, out.late, out.rebuilt), (1, 0, 1));
    let state = stored_state(&rt, &store, &short, "u1");
    let mut events = first.clone();
    events.push(old.clone());
    let reference = Reference::new(&spec, events);
    for t in [T0 - 5 * MIN, T0 + 3 * MIN, T0 + 111 * MIN] {
        let got = state.evaluate(&short, t);
        assert_agrees(&short, &reference, "u1", t, &got.values, || {
            "no watermark".into()
        });
    }

    // The same with the catalog's 400-day history: rebuilt whole.
    let store = MemoryStore::new();
    drop(first_batch(&plan, &store));
    let mut unchecked = Processor::new(plan.clone(), store.clone(), "t:", "events");
    let out = rt
        .block_on(unchecked.process(vec![message(9, &old)], stopped))
        .unwrap();
    assert_eq!((out.applied, out.rebuilt, out.rebuilt_partially), (1, 1, 0));

    // The cost side: with the watermark within half a minute of the clock, no key can have
    // expired early, and an absent state's history is not read.
    let store = MemoryStore::new();
    drop(first_batch(&plan, &store));
    let out = restart(&plan, &store, wm + 20_000);
    assert_eq!((out.applied, out.rebuilt), (2, 0));
}

/// Events up to the allowed clock skew ahead of the wall clock move the watermark ahead of it.
/// A key's expiry then counts from the clock, not from that watermark: counted from it, the
/// key expired that much too soon once the watermark moved with the clock again, while its
/// state still counted.
#[test]
fn a_key_written_while_events_run_ahead_of_the_clock_lives_as_long_as_the_clock_needs() {
    let (plan, store, rt, now) = catalog_processing();
    let ts = now + 4 * MIN;
    let mut p = Processor::new(plan.clone(), store.clone(), "t:", "events");
    let out = rt
        .block_on(p.process(vec![view_message(0, 0, "u1", ts)], now))
        .unwrap();
    assert_eq!(out.commit[&0].1, ts);
    let until = stored_state(&rt, &store, &plan, "u1")
        .relevant_until(&plan)
        .unwrap();
    // Until the watermark, moving with the clock from here on, passes that instant plus the
    // lateness (a second less: the clock moved on since the batch read it).
    let needed = until + plan.lateness - now - 1_000;
    let left = store.expires_in(&state_key("t:", "u1")).expect("alive");
    assert!(
        left >= std::time::Duration::from_millis(needed as u64),
        "{left:?} left, {needed} ms needed"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Applying a batch at once (ids indexed in a table when the batch is large) counts and
    /// keeps exactly what applying its events one by one does (ids compared directly): the
    /// first copy of an id counts, later copies and copies of kept records are duplicates,
    /// events before the boundary are late.
    #[test]
    fn a_batch_counts_as_its_events_one_by_one(
        kept in prop::collection::vec((0u8..60, 0i64..30), 0..80),
        batch in prop::collection::vec((0u8..60, 0i64..30), 1..60),
        boundary in 0i64..5,
    ) {
        let spec = duet_spec::load_spec(None).unwrap();
        let plan = SpeedPlan::compile(&spec);
        let ev = |id: u8, minute: i64| Event {
            event_id: format!("e{id:03}").into(),
            user_id: "u".into(),
            event_type: "view".into(),
            amount: None,
            ts: T0 + minute * MIN + i64::from(id),
        };
        let mut base = EntityState::new(&plan, T0 + boundary * MIN);
        base.apply_all(kept.iter().map(|&(id, m)| ev(id, m)).collect());
        let events: Vec<Event> = batch.iter().map(|&(id, m)| ev(id, m)).collect();
        let mut at_once = base.clone();
        let counts = at_once.apply_all(events.clone());
        let mut one_by_one = base;
        let (mut applied, mut duplicates, mut late) = (0, 0, 0);
        for e in &events {
            match one_by_one.apply(e) {
                duet_speed::state::Outcome::Applied => applied += 1,
                duet_speed::state::Outcome::Duplicate => duplicates += 1,
                duet_speed::state::Outcome::Late => late += 1,
            }
        }
        prop_assert_eq!((counts.applied, counts.duplicates, counts.late), (applied, duplicates, late));
        prop_assert_eq!(at_once, one_by_one);
    }
}

/// Tiles stored out of order or twice (a foreign or damaged value) decode sorted, the last
/// copy of an index winning, as a map insert would do.
#[test]
fn tiles_stored_out_of_order_decode_sorted_with_the_last_copy_winning() {
    use duet_speed::codec::Writer;
    let spec = duet_spec::load_spec(None).unwrap();
    let plan = SpeedPlan::compile(&spec);
    assert_eq!(plan.resolutions.len(), 1, "the catalog has one tile group");
    let slots = plan.tile_slots[0].len();
    let mut w = Writer::default();
    w.u(1); // format
    w.i(T0);
    w.u(0); // records
    let stored = [(5i64, 1i64), (3, 2), (5, 3), (1, 4)];
    w.u(stored.len() as u64);
    for (idx, n) in stored {
        w.i(idx);
        for s in &plan.tile_slots[0] {
            // Every partial holds `n` events, and a value where its aggregation keeps one.
            w.i(n);
            match plan.slots[*s].measure.agg {
                duet_spec::Agg::Count => {}
                duet_spec::Agg::Sum
                | duet_spec::Agg::Mean
                | duet_spec::Agg::Min
                | duet_spec::Agg::Max => w.f(n as f64),
                other => panic!("the catalog keeps no {other:?} in tiles"),
            }
        }
    }
    for _ in &plan.gaps {
        w.b(false);
    }
    for _ in &plan.recent_slots {
        w.b(false);
    }
    let state = EntityState::decode(&plan, "u", &w.buf).unwrap();
    let got: Vec<(i64, i64)> = state.tiles[0]
        .iter()
        .map(|(idx, partials)| {
            assert_eq!(partials.len(), slots);
            (*idx, partials[0].n)
        })
        .collect();
    assert_eq!(got, vec![(1, 4), (3, 2), (5, 3)]);
}
