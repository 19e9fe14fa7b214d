#!/usr/bin/env python3
"""Checks the DuckDB baseline against the golden expected answer.

    verify_duckdb_baseline.py [--golden tests/golden] [--days N] [--jsonl]

1. training: duckdb_training.sql on golden events + entities vs expected.parquet (every row,
   every feature; integers exact, floats relative 1e-9, nulls equal, row order and input columns).
2. batch: duckdb_batch.sql at every S = floor_day(ts) of the expected rows (or the first N with
   --days) vs the batch columns of the expected rows with that S; users absent from the snapshot
   must have the "none" values (0 / null) in expected.
3. --jsonl: the same training run reading events.jsonl.gz must give the same output.
Exits 1 on any mismatch.
"""
import argparse
import math
import os
import sys

import duckdb

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import duckdb_baseline as bl  # noqa: E402

STREAM = ["txn_count_1h", "txn_sum_1h", "event_count_10m", "session_event_count",
          "session_duration_s", "last_purchase_amount"]
BATCH = ["txn_count_90d", "avg_txn_amount_30d_v1", "avg_txn_amount_30d_v2", "max_txn_amount_90d",
         "refund_rate_90d", "active_days_30d", "account_age_days", "spend_pct_rank_30d"]
BATCH_NONE = {"txn_count_90d": 0, "active_days_30d": 0}


def same(a, b, is_float):
    if a is None or b is None:
        return a is None and b is None
    if is_float:
        a, b = float(a), float(b)
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return a == b or abs(a - b) <= 1e-9 * max(abs(a), abs(b))
    return a == b and type(a) is type(b) or (isinstance(a, int) and isinstance(b, int) and a == b)


def compare_tables(got, exp, cols, key, label, max_show=10):
    """got/exp: pyarrow tables with the same row order. Returns the number of mismatching cells."""
    bad = 0
    for c in cols:
        is_float = str(exp.schema.field(c).type).startswith(("double", "float"))
        gt, et = str(got.schema.field(c).type), str(exp.schema.field(c).type)
        if gt != et:
            print(f"[{label}] type of {c}: got {gt}, expected {et}")
            bad += 1
        g, e = got.column(c).to_pylist(), exp.column(c).to_pylist()
        for i, (x, y) in enumerate(zip(g, e)):
            if not same(x, y, is_float):
                bad += 1
                if bad <= max_show:
                    print(f"[{label}] {key[i]} {c}: got {x!r}, expected {y!r}")
    return bad


def run_training(golden, events_name):
    con = bl.connect(None)
    prelude, query = bl.load_sql("duckdb_training.sql")
    bl.bind_inputs(con, prelude, os.path.join(golden, events_name), os.path.join(golden, "entities.parquet"))
    _, _, table = bl.run(con, query, None)
    return table


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--golden", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "golden"))
    ap.add_argument("--days", type=int)
    ap.add_argument("--jsonl", action="store_true")
    args = ap.parse_args()
    g = args.golden
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    exp = bl.fetch_table(con.execute(f"SELECT * FROM read_parquet('{g}/expected.parquet')"))
    ents = bl.fetch_table(con.execute(f"SELECT * FROM read_parquet('{g}/entities.parquet')"))
    failures = 0

    # 1. training
    got = run_training(g, "events.parquet")
    want_cols = ents.column_names + STREAM + BATCH
    if got.column_names != want_cols:
        print(f"[training] columns {got.column_names} != {want_cols}")
        failures += 1
    if got.num_rows != exp.num_rows:
        print(f"[training] rows {got.num_rows} != {exp.num_rows}")
        failures += 1
    else:
        for c in ents.column_names:
            if got.column(c).to_pylist() != ents.column(c).to_pylist():
                print(f"[training] input column {c} changed (order or values)")
                failures += 1
        keys = [f"row {r}" for r in got.column("row_id").to_pylist()]
        bad = compare_tables(got, exp, ["row_id", "user_id", "ts"] + STREAM + BATCH, keys, "training")
        print(f"training: {got.num_rows} rows x {len(STREAM + BATCH)} features, mismatching cells: {bad}")
        failures += bad

    # 2. batch at each S
    days = con.execute(f"""SELECT DISTINCT time_bucket(INTERVAL 1 day, ts) AS s
                           FROM read_parquet('{g}/expected.parquet') ORDER BY s""").fetchall()
    days = [d[0] for d in days][: args.days] if args.days else [d[0] for d in days]
    prelude, query = bl.load_sql("duckdb_batch.sql")
    total_rows = total_bad = 0
    for (s,) in [(d,) for d in days]:
        bcon = bl.connect(None)
        bcon.execute("SET VARIABLE as_of = ?", [s.isoformat()])
        bl.bind_inputs(bcon, prelude, os.path.join(g, "events.parquet"))
        _, _, snap = bl.run(bcon, query, None)
        bcon.register("snap", snap)
        bcon.register("exp", exp)
        # expected rows with this S, left-joined to the snapshot; absent users -> none values
        cols = ", ".join(
            f"coalesce(snap.{c}, {BATCH_NONE[c]}) AS {c}" if c in BATCH_NONE else f"snap.{c}" for c in BATCH)
        joined = bl.fetch_table(bcon.execute(f"""
            SELECT exp.row_id, {cols}, (snap.user_id IS NULL) AS absent
            FROM exp LEFT JOIN snap USING (user_id)
            WHERE time_bucket(INTERVAL 1 day, exp.ts) = ?::TIMESTAMPTZ
            ORDER BY exp.row_id""", [s.isoformat()]))
        expd = bl.fetch_table(bcon.execute(f"""
            SELECT row_id, {", ".join(BATCH)} FROM exp
            WHERE time_bucket(INTERVAL 1 day, ts) = ?::TIMESTAMPTZ ORDER BY row_id""", [s.isoformat()]))
        keys = [f"S={s.date()} row {r}" for r in expd.column("row_id").to_pylist()]
        total_bad += compare_tables(joined, expd, BATCH, keys, "batch")
        total_rows += expd.num_rows
    print(f"batch: {len(days)} snapshots, {total_rows} expected rows x {len(BATCH)} features, "
          f"mismatching cells: {total_bad}")
    failures += total_bad

    # 3. JSON lines input gives the same answer
    if args.jsonl:
        gj = run_training(g, "events.jsonl.gz")
        # float sums may differ in the last bits (summation order), so compare with tolerance
        bad = compare_tables(gj, got, got.column_names, [f"row {i}" for i in range(gj.num_rows)], "jsonl")
        print(f"jsonl: training from events.jsonl.gz vs the Parquet run, mismatching cells: {bad}")
        failures += bad

    print("RESULT:", "MATCH" if failures == 0 else f"MISMATCH ({failures})")
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
