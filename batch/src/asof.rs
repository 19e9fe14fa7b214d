//! Streaming features exactly as of arbitrary instants, with DataFusion: the engine behind
//! point-in-time training rows and the consistency checker's recomputation.
//!
//! Each row `(key, t)` joins the entity's events in `[t - lookback, t)`; windows are filters on
//! that join. Sessions are numbered once with window functions (a gap greater than the session
//! gap starts a new one) and carry running aggregates, so a row reads its current session from
//! the latest event before `t`. They are numbered over the events that can decide a row's
//! session: those from a gap before the earliest row's lookback, and the whole history of the
//! entities whose session was open then ([`session_events`]).

use std::sync::Arc;

use arrow::array::{ArrayRef, Int64Array, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use datafusion::common::JoinType;
use datafusion::functions_aggregate::expr_fn::{count, count_distinct, last_value, max, min, sum};
use datafusion::functions_aggregate::{
    count::count_udaf, first_last::last_value_udaf, min_max::max_udaf, min_max::min_udaf,
    sum::sum_udaf,
};
use datafusion::logical_expr::WindowFrame;
use datafusion::logical_expr::expr::{NullTreatment, WindowFunction};
use datafusion::prelude::{DataFrame, Expr, ExprFunctionExt, SessionContext, cast, col, lit, when};
use duet_spec::{Agg, Aggregation, Extent, Feature, Measure, Value, ValueType, View};

use crate::translate::{MS, filter_expr, null_f64, value_expr};
use crate::{Error, Result};

fn df_err(e: datafusion::error::DataFusionError) -> Error {
    Error::Internal(format!("query failed: {e}"))
}

/// The largest distance before `t` any of the features reads.
fn lookback(features: &[(&View, &Feature)]) -> i64 {
    features
        .iter()
        .map(|(_, f)| match f.extent {
            Extent::Session { gap } => gap.as_ms(),
            e => e.lookback().map_or(i64::MAX / 4, |d| d.as_ms()),
        })
        .max()
        .unwrap_or(0)
}

/// Session counts and session starts as running aggregates over the events in entity order
/// (the order the sessions were numbered in, so the plan sorts the events once). They run over
/// all entities at once, without a partition per entity: every entity's first event starts a
/// session, so the latest start so far is always the entity's own.
/// - a session's first time is the time of the latest event, so far, that starts a session;
/// - a session count is the running count so far, less the running count before the latest
///   session start. Counts only grow, so that is the largest "count before" of any start so far.
fn by_entity(
    ev: DataFrame,
    key: &str,
    counts: &[(usize, Expr, Expr)],
    firsts: &[(usize, Expr)],
    copies: &mut Vec<(String, String)>,
) -> Result<DataFrame> {
    if counts.is_empty() && firsts.is_empty() {
        return Ok(ev);
    }
    let mut first_windows: Vec<(Expr, String)> = Vec::new();
    for (j, at_start) in firsts {
        let w = in_event_order(last_value_udaf(), at_start.clone(), key, true)?;
        match first_windows.iter().find(|(e, _)| *e == w) {
            Some((_, name)) => copies.push((format!("f{j}_first"), name.clone())),
            None => first_windows.push((w, format!("f{j}_first"))),
        }
    }
    let mut stage = first_windows;
    // Counts of one filter under different session gaps share their running count.
    let mut cumulative = Vec::with_capacity(counts.len());
    for (j, _, x) in counts {
        let w = in_event_order(sum_udaf(), x.clone(), key, false)?;
        match stage.iter().find(|(e, _)| *e == w) {
            Some((_, name)) => cumulative.push(name.clone()),
            None => {
                stage.push((w, format!("f{j}_cum")));
                cumulative.push(format!("f{j}_cum"));
            }
        }
    }
    let ev = ev
        .window(stage.into_iter().map(|(e, name)| e.alias(name)).collect())
        .map_err(df_err)?;
    if counts.is_empty() {
        return Ok(ev);
    }
    let mut before = Vec::new();
    for ((j, started, x), cum) in counts.iter().zip(&cumulative) {
        let at_start = when(started.clone(), col(cum) - x.clone())
            .end()
            .map_err(df_err)?;
        before
            .push(in_event_order(max_udaf(), at_start, key, false)?.alias(format!("f{j}_before")));
    }
    let mut ev = ev.window(before).map_err(df_err)?;
    for ((j, _, _), cum) in counts.iter().zip(&cumulative) {
        ev = ev
            .with_column(
                &format!("f{j}_sess"),
                col(cum) - col(format!("f{j}_before")),
            )
            .map_err(df_err)?;
    }
    Ok(ev)
}

/// The event order: by entity, then `(ms, event_id)`.
fn event_order(key: &str) -> Vec<datafusion::logical_expr::SortExpr> {
    vec![
        col(key).sort(true, false),
        col(MS).sort(true, false),
        col("event_id").sort(true, false),
    ]
}

/// Running aggregate over all events in event order, without partitions: DataFusion's window
/// node keeps state per partition, which costs more than the aggregate when entities have a
/// few events each.
fn in_event_order(
    fun: Arc<datafusion::logical_expr::AggregateUDF>,
    arg: Expr,
    key: &str,
    ignore_nulls: bool,
) -> Result<Expr> {
    running_over(fun, arg, vec![], event_order(key), ignore_nulls)
}

/// Running aggregate over an entity's current session, ordered by `(ms, event_id)`.
fn running(
    fun: Arc<datafusion::logical_expr::AggregateUDF>,
    arg: Expr,
    partition: Vec<Expr>,
    ignore_nulls: bool,
) -> Result<Expr> {
    let order = vec![col(MS).sort(true, false), col("event_id").sort(true, false)];
    running_over(fun, arg, partition, order, ignore_nulls)
}

/// Running aggregate (rows from the partition's first to the current one) in `order`.
fn running_over(
    fun: Arc<datafusion::logical_expr::AggregateUDF>,
    arg: Expr,
    partition: Vec<Expr>,
    order: Vec<datafusion::logical_expr::SortExpr>,
    ignore_nulls: bool,
) -> Result<Expr> {
    let w = Expr::from(WindowFunction::new(fun, vec![arg]))
        .partition_by(partition)
        .order_by(order)
        .window_frame(WindowFrame::new(Some(true)));
    let w = if ignore_nulls {
        w.null_treatment(NullTreatment::IgnoreNulls)
    } else {
        w
    };
    w.build().map_err(df_err)
}

/// The session gaps of `features`, in milliseconds, ascending, each once.
fn session_gaps(features: &[(&View, &Feature)]) -> Vec<i64> {
    let mut gaps: Vec<i64> = features
        .iter()
        .filter_map(|(_, f)| match f.extent {
            Extent::Session { gap } => Some(gap.as_ms()),
            _ => None,
        })
        .collect();
    gaps.sort_unstable();
    gaps.dedup();
    gaps
}

/// The events that decide every session feature at events from `from` on, when the largest
/// session gap is `gap`: the events from `from - gap` on, and every event of the entities whose
/// session at `from` began before it.
///
/// An event at or after `from` starts a session when the entity's event before it is more
/// than a gap older. That event is either at or after `from - gap`, and so kept, or older, and
/// then the event starts a session whether it is kept or not. So every session start from
/// `from` on is seen. An entity's sessions from `from` on then hold only kept events, unless
/// its first event at or after `from` continues a session: its event before it is at most
/// `gap` older. Those entities, found from the events in `[from - gap, from + gap)`, keep their
/// whole history, however far back the session reaches.
async fn session_events(ev: DataFrame, key: &str, from: i64, gap: i64) -> Result<DataFrame> {
    let near = from.saturating_sub(gap);
    let open = ev
        .clone()
        .filter(
            col(MS)
                .gt_eq(lit(near))
                .and(col(MS).lt(lit(from.saturating_add(gap)))),
        )
        .and_then(|df| {
            let before = max(col(MS)).filter(col(MS).lt(lit(from))).build()?;
            let after = min(col(MS)).filter(col(MS).gt_eq(lit(from))).build()?;
            df.aggregate(
                vec![col(key)],
                vec![before.alias("before_ms"), after.alias("after_ms")],
            )
        })
        .and_then(|df| df.filter((col("after_ms") - col("before_ms")).lt_eq(lit(gap))))
        .and_then(|df| df.select(vec![col(key)]))
        .map_err(df_err)?
        .collect()
        .await
        .map_err(df_err)?;
    let mut continuing: Vec<Expr> = Vec::new();
    for b in &open {
        let keys = b
            .column(0)
            .as_any()
            .downcast_ref::<StringArray>()
            .ok_or_else(|| Error::Internal("entity keys are not strings".into()))?;
        continuing.extend(keys.iter().flatten().map(lit));
    }
    tracing::debug!(
        continuing = continuing.len(),
        "entities whose session at the earliest row's lookback began before it"
    );
    let keep = col(MS).gt_eq(lit(near));
    let keep = if continuing.is_empty() {
        keep
    } else {
        keep.or(col(key).in_list(continuing, false))
    };
    ev.filter(keep).map_err(df_err)
}

/// Adds session columns for every session feature: `g{gap}_sid` numbers sessions (each number
/// is one entity's), and `f{j}_sess` (plus `f{j}_sess_n`) holds the feature's running value in
/// its session.
async fn with_sessions(
    ev: DataFrame,
    key: &str,
    features: &[(&View, &Feature)],
) -> Result<DataFrame> {
    let gaps = session_gaps(features);
    if gaps.is_empty() {
        return Ok(ev);
    }
    // The event before, in event order (its entity's, unless the event is its entity's first).
    let prev = |c: &str, alias: &str| -> Result<Expr> {
        Ok(
            datafusion::functions_window::expr_fn::lag(col(c), Some(1), None)
                .order_by(event_order(key))
                .build()
                .map_err(df_err)?
                .alias(alias),
        )
    };
    let mut ev = ev
        .window(vec![prev(MS, "prev_ms")?, prev(key, "prev_key")?])
        .map_err(df_err)?;
    // Session numbers partition the other session aggregates; counts and durations run over
    // the entity's events (`by_entity`) and need none.
    let numbered: Vec<i64> = features
        .iter()
        .filter_map(|(_, f)| match (f.extent, &f.aggregation) {
            (Extent::Session { gap }, Aggregation::Measure(m))
                if !matches!(m.agg, Agg::Count | Agg::Duration) =>
            {
                Some(gap.as_ms())
            }
            _ => None,
        })
        .collect();
    for gap in &gaps {
        let starts = when(
            col("prev_key")
                .is_null()
                .or(col("prev_key").not_eq(col(key)))
                .or((col(MS) - col("prev_ms")).gt(lit(*gap))),
            lit(1i64),
        )
        .otherwise(lit(0i64))
        .map_err(df_err)?;
        ev = ev
            .with_column(&format!("g{gap}_new"), starts)
            .map_err(df_err)?;
        if numbered.contains(gap) {
            ev = ev
                .window(vec![
                    // Numbered over all entities: a session's number is unique.
                    in_event_order(sum_udaf(), col(format!("g{gap}_new")), key, false)?
                        .alias(format!("g{gap}_sid")),
                ])
                .map_err(df_err)?;
        }
    }
    // One window node per session grouping: DataFusion plans a window node per sort key.
    let mut windows: std::collections::BTreeMap<i64, Vec<(Expr, String)>> =
        std::collections::BTreeMap::new();
    let mut copies: Vec<(String, String)> = Vec::new();
    let mut durations = Vec::new();
    // Session counts: (feature, "the event starts a session", counted 1 or 0).
    let mut counts: Vec<(usize, Expr, Expr)> = Vec::new();
    // Session durations: (feature, the event's time where it starts a session).
    let mut firsts: Vec<(usize, Expr)> = Vec::new();
    for (j, (_, f)) in features.iter().enumerate() {
        let (Extent::Session { gap }, Aggregation::Measure(m)) = (f.extent, &f.aggregation) else {
            continue;
        };
        let part = vec![col(key), col(format!("g{}_sid", gap.as_ms()))];
        let keep = filter_expr(&m.filter);
        let v = || -> Result<Expr> { value_expr(m.value.as_ref().expect("validated")) };
        // Whether the event starts a session (read by counts and durations).
        let started = col(format!("g{}_new", gap.as_ms())).eq(lit(1i64));
        let (value, n) = match m.agg {
            // Counts and durations run over the entity's events, not its sessions: the same
            // order as the session numbering, so no second sort (see `by_entity` below).
            Agg::Count => {
                let x = when(keep, lit(1i64)).otherwise(lit(0i64)).map_err(df_err)?;
                match counts.iter().find(|(_, s, y)| *s == started && *y == x) {
                    Some((first, _, _)) => {
                        copies.push((format!("f{j}_sess"), format!("f{first}_sess")))
                    }
                    None => counts.push((j, started.clone(), x)),
                }
                continue;
            }
            Agg::Duration => {
                durations.push(j);
                firsts.push((j, when(started, col(MS)).end().map_err(df_err)?));
                continue;
            }
            Agg::Sum | Agg::Mean | Agg::Min | Agg::Max => {
                let x = when(keep.clone(), v()?)
                    .otherwise(null_f64())
                    .map_err(df_err)?;
                let fun = match m.agg {
                    Agg::Sum | Agg::Mean => sum_udaf(),
                    Agg::Min => min_udaf(),
                    _ => max_udaf(),
                };
                (
                    running(fun, x.clone(), part.clone(), false)?,
                    Some(running(count_udaf(), x, part.clone(), false)?),
                )
            }
            Agg::Last => {
                let x = when(keep, v()?).otherwise(null_f64()).map_err(df_err)?;
                (running(last_value_udaf(), x, part.clone(), true)?, None)
            }
            Agg::CountDistinct => unreachable!("validated: not over sessions"),
        };
        let group = windows.entry(gap.as_ms()).or_default();
        let name = if m.agg == Agg::Duration {
            format!("f{j}_first")
        } else {
            format!("f{j}_sess")
        };
        // Identical window expressions are computed once (DataFusion keeps one of each); a
        // second feature asking for one gets a copy of the first's column.
        let mut add = |expr: Expr, name: String| match group.iter().find(|(e, _)| *e == expr) {
            Some((_, first)) => copies.push((name, first.clone())),
            None => group.push((expr, name)),
        };
        add(value, name);
        if let Some(n) = n {
            add(n, format!("f{j}_sess_n"));
        }
    }
    let mut ev = ev;
    for (_, group) in windows {
        ev = ev
            .window(group.into_iter().map(|(e, name)| e.alias(name)).collect())
            .map_err(df_err)?;
    }
    ev = by_entity(ev, key, &counts, &firsts, &mut copies)?;
    for (name, first) in copies {
        ev = ev.with_column(&name, col(first)).map_err(df_err)?;
    }
    // A window function must stand alone in its projection: the session's first time comes
    // out of the window, the duration is derived from it afterwards.
    for j in durations {
        let duration = cast(col(MS) - col(format!("f{j}_first")), DataType::Float64) / lit(1000.0);
        ev = ev
            .with_column(&format!("f{j}_sess"), duration)
            .map_err(df_err)?;
    }
    Ok(ev)
}

/// The lower time bound of a feature's extent for a row at `t` (column `t`).
fn lower_bound(extent: &Extent) -> Expr {
    match extent {
        Extent::Sliding { window, resolution } => {
            // ceil_R(t) with Euclidean remainders, so instants before 1970 round up too.
            let r = resolution.as_ms();
            col("t") + ((lit(0i64) - col("t")) % lit(r) + lit(r)) % lit(r) - lit(window.as_ms())
        }
        Extent::Recent { ttl } => col("t") - lit(ttl.as_ms()),
        Extent::Session { gap } => col("t") - lit(gap.as_ms()),
        Extent::AllHistory => lit(i64::MIN),
    }
}

/// The value of `v` at the latest row (by `(ms, event_id)`) where `pred` holds; null when it
/// holds nowhere. Written without an aggregate FILTER: DataFusion 55 mis-merges `last_value`
/// ordered aggregates that carry a FILTER across partitions, so matching rows are ordered last
/// instead.
pub fn latest_where(v: Expr, pred: Expr) -> Result<Expr> {
    let matched = when(pred.clone(), lit(1i64))
        .otherwise(lit(0i64))
        .map_err(df_err)?;
    let value = when(pred, v)
        .otherwise(lit(datafusion::scalar::ScalarValue::Null))
        .map_err(df_err)?;
    let order = vec![
        matched.sort(true, false),
        col(MS).sort(true, false),
        col("event_id").sort(true, false),
    ];
    Ok(last_value(value, order))
}

/// Aggregates of one measure for one row: `(value, n)` where `n` counts what matched.
fn measure_aggs(m: &Measure, within: Expr, alias: &str) -> Result<Vec<Expr>> {
    let keep = filter_expr(&m.filter).and(within);
    let build = |agg: Expr, pred: Expr| agg.filter(pred).build().map_err(df_err);
    Ok(match m.agg {
        Agg::Count => vec![build(count(lit(1)), keep)?.alias(format!("{alias}_n"))],
        Agg::CountDistinct => {
            // The filter goes inside: DataFusion 55 drops an aggregate FILTER on a DISTINCT
            // count when it plans it in two phases.
            let v = value_expr(m.value.as_ref().expect("validated"))?;
            let kept = when(keep, v)
                .otherwise(lit(datafusion::scalar::ScalarValue::Null))
                .map_err(df_err)?;
            vec![count_distinct(kept).alias(format!("{alias}_n"))]
        }
        Agg::Sum | Agg::Mean | Agg::Min | Agg::Max => {
            let v = value_expr(m.value.as_ref().expect("validated"))?;
            let agg = match m.agg {
                Agg::Sum | Agg::Mean => sum(v.clone()),
                Agg::Min => min(v.clone()),
                _ => max(v.clone()),
            };
            vec![
                build(agg, keep.clone())?.alias(format!("{alias}_v")),
                build(count(v), keep)?.alias(format!("{alias}_n")),
            ]
        }
        Agg::Last => {
            let v = value_expr(m.value.as_ref().expect("validated"))?;
            let keep = keep.and(v.clone().is_not_null());
            vec![
                latest_where(v, keep.clone())?.alias(format!("{alias}_v")),
                build(count(lit(1)), keep)?.alias(format!("{alias}_n")),
            ]
        }
        Agg::Duration => unreachable!("duration exists only over sessions"),
    })
}

/// The raw value of a measure from its aggregates: null when nothing matched (or, with
/// `zero_when_empty`, 0 for counts and sums, as ratios read them).
fn measure_value(m: &Measure, alias: &str, zero_when_empty: bool) -> Result<Expr> {
    let n = col(format!("{alias}_n"));
    let empty = n.clone().eq(lit(0i64));
    let zero = zero_when_empty && matches!(m.agg, Agg::Count | Agg::CountDistinct | Agg::Sum);
    let none = if zero { lit(0.0) } else { null_f64() };
    let v = match m.agg {
        Agg::Count | Agg::CountDistinct => cast(n.clone(), DataType::Float64),
        Agg::Mean => col(format!("{alias}_v")) / cast(n.clone(), DataType::Float64),
        _ => col(format!("{alias}_v")),
    };
    when(empty, none).otherwise(v).map_err(df_err)
}

/// The per-row query: one column `f{j}` per feature, ordered by row.
fn rows_query(
    ev: DataFrame,
    rows: DataFrame,
    key: &str,
    features: &[(&View, &Feature)],
) -> Result<DataFrame> {
    let lb = lookback(features);
    let join_filter = col(MS).lt(col("t")).and(col(MS).gt_eq(col("t") - lit(lb)));
    let joined = rows
        .join(ev, JoinType::Left, &["row_key"], &[key], Some(join_filter))
        .map_err(df_err)?;
    let mut aggs = Vec::new();
    for (j, (_, f)) in features.iter().enumerate() {
        let within = col(MS).gt_eq(lower_bound(&f.extent));
        match (&f.aggregation, f.extent) {
            (Aggregation::Measure(m), Extent::Session { .. }) => {
                let latest = |c: String| latest_where(col(c), within.clone());
                aggs.push(latest(format!("f{j}_sess"))?.alias(format!("f{j}_v")));
                if matches!(m.agg, Agg::Sum | Agg::Mean | Agg::Min | Agg::Max) {
                    aggs.push(latest(format!("f{j}_sess_n"))?.alias(format!("f{j}_n")));
                }
            }
            (Aggregation::Measure(m), _) => aggs.extend(measure_aggs(m, within, &format!("f{j}"))?),
            (
                Aggregation::Ratio {
                    numerator,
                    denominator,
                },
                _,
            ) => {
                aggs.extend(measure_aggs(
                    numerator,
                    within.clone(),
                    &format!("f{j}num"),
                )?);
                aggs.extend(measure_aggs(denominator, within, &format!("f{j}den"))?);
            }
            (Aggregation::PctRank { .. } | Aggregation::Age { .. }, _) => {
                return Err(Error::Internal(format!("{} is a batch feature", f.name)));
            }
        }
    }
    let grouped = joined
        .aggregate(vec![col("row_idx")], aggs)
        .map_err(df_err)?;
    let mut outputs = vec![col("row_idx")];
    for (j, (_, f)) in features.iter().enumerate() {
        let raw = match (&f.aggregation, f.extent) {
            (Aggregation::Measure(m), Extent::Session { .. }) => {
                let v = col(format!("f{j}_v"));
                match m.agg {
                    Agg::Count => when(v.clone().eq(lit(0i64)), null_f64())
                        .otherwise(cast(v, DataType::Float64))
                        .map_err(df_err)?,
                    Agg::Sum | Agg::Min | Agg::Max | Agg::Mean => {
                        let n = col(format!("f{j}_n"));
                        let value = if m.agg == Agg::Mean {
                            v / cast(n.clone(), DataType::Float64)
                        } else {
                            v
                        };
                        when(n.clone().is_null().or(n.eq(lit(0i64))), null_f64())
                            .otherwise(value)
                            .map_err(df_err)?
                    }
                    _ => v,
                }
            }
            (Aggregation::Measure(m), _) => measure_value(m, &format!("f{j}"), false)?,
            (
                Aggregation::Ratio {
                    numerator,
                    denominator,
                },
                _,
            ) => {
                let num = measure_value(numerator, &format!("f{j}num"), true)?;
                let den = measure_value(denominator, &format!("f{j}den"), true)?;
                when(
                    den.clone().is_null().or(den.clone().eq(lit(0.0))),
                    null_f64(),
                )
                .otherwise(num / den)
                .map_err(df_err)?
            }
            _ => unreachable!("refused above"),
        };
        let default = match f.default {
            Value::Null => null_f64(),
            v => lit(v.as_f64().expect("not null")),
        };
        let value = datafusion::functions::core::expr_fn::coalesce(vec![raw, default]);
        let typed = match f.value_type {
            ValueType::Int => cast(value, DataType::Int64),
            ValueType::Float => cast(value, DataType::Float64),
        };
        outputs.push(typed.alias(format!("f{j}")));
    }
    grouped
        .select(outputs)
        .and_then(|df| df.sort(vec![col("row_idx").sort(true, false)]))
        .map_err(df_err)
}

/// Evaluates streaming `features` for each `(keys[i], ts[i])` exactly as of `ts[i]`, from the
/// deduplicated events `ev` (as produced by [`crate::tiles::deduplicated_events`]). Returns one
/// column per feature, in row order.
pub async fn streaming_as_of(
    ctx: &SessionContext,
    ev: DataFrame,
    keys: &[String],
    ts: &[i64],
    features: &[(&View, &Feature)],
) -> Result<Vec<ArrayRef>> {
    if features.is_empty() {
        return Ok(vec![]);
    }
    let key = features[0].0.join_key.name();
    let schema = Arc::new(Schema::new(vec![
        Field::new("row_idx", DataType::Int64, false),
        Field::new("row_key", DataType::Utf8, false),
        Field::new("t", DataType::Int64, false),
    ]));
    let batch = RecordBatch::try_new(
        schema,
        vec![
            Arc::new(Int64Array::from_iter_values(0..keys.len() as i64)),
            Arc::new(StringArray::from_iter_values(keys)),
            Arc::new(Int64Array::from(ts.to_vec())),
        ],
    )
    .map_err(|e| Error::Internal(e.to_string()))?;
    let rows = ctx.read_batch(batch).map_err(df_err)?;
    // A row joins its entity's events in `[t - lookback, t)`: no row reads an event before
    // `from`.
    let earliest = ts.iter().min().copied().unwrap_or(0);
    let from = earliest.saturating_sub(lookback(features));
    let ev = match session_gaps(features).last() {
        // Sessions are numbered over the events that can decide them (which sorts every event
        // given), and only the rows' entities' events can count: the others are left out first.
        Some(&gap) => session_events(ev, key, from, gap)
            .await?
            .join(
                rows.clone().select(vec![col("row_key")]).map_err(df_err)?,
                JoinType::LeftSemi,
                &[key],
                &["row_key"],
                None,
            )
            .map_err(df_err)?,
        None => ev,
    };
    let ev = with_sessions(ev, key, features).await?;
    let ev = ev.filter(col(MS).gt_eq(lit(from))).map_err(df_err)?;
    let plan = rows_query(ev, rows, key, features)?
        .create_physical_plan()
        .await
        .map_err(df_err)?;
    let result = datafusion::physical_plan::collect(plan.clone(), ctx.task_ctx())
        .await
        .map_err(df_err)?;
    tracing::trace!(
        plan = %datafusion::physical_plan::display::DisplayableExecutionPlan::with_metrics(
            plan.as_ref()
        )
        .indent(true),
        "streaming features' plan, with the time each step took"
    );
    let result = arrow::compute::concat_batches(&result[0].schema(), &result)
        .map_err(|e| Error::Internal(e.to_string()))?;
    Ok((0..features.len())
        .map(|j| result.column(j + 1).clone())
        .collect())
}
