#!/usr/bin/env python3
"""DuckDB baseline for duet's batch benchmark.

    duckdb_baseline.py batch    --events P --as-of ISO [--out P]
    duckdb_baseline.py training --events P --entities P [--out P]

Runs bench/duckdb_batch.sql or bench/duckdb_training.sql (the SQL is the whole computation; this
script only binds the inputs) and prints one JSON line to stdout:

    {"engine": "duckdb", "task": "batch", "seconds": 1.23, "rows": 456, "threads": 8}

`seconds` is wall time from the start of the query (reading the inputs included) to the last row
materialised, or written when --out is given (Parquet, or CSV if the name ends in .csv).
DuckDB uses all cores by default (--threads overrides).

Inputs: events as Parquet (file or glob) or JSON lines (.jsonl / .json / .ndjson, optionally .gz);
entities as Parquet or CSV. Needs `pip install duckdb pyarrow`.
"""
import argparse
import json
import os
import re
import sys
import time
import warnings

import duckdb

HERE = os.path.dirname(os.path.abspath(__file__))
MARKER = "-- @query"

# JSON lines: validated like duet's decoder (shared-spec/src/event/json.rs): text fields must be
# JSON strings, ts an RFC 3339 string with offset (fraction truncated to ms) or integral epoch ms,
# amount a JSON number. Lines that are not JSON objects become all-NULL rows and are dropped
# by the query's validity filter.
JSONL_EVENTS_VIEW = r"""
CREATE OR REPLACE TEMP VIEW events_raw AS
WITH raw AS (
    SELECT json AS j FROM read_json_objects(getvariable('events_path'),
                                            format = 'newline_delimited', ignore_errors = true)
), f AS (
    SELECT
        CASE WHEN json_type(j, '$.event_id')   = 'VARCHAR' THEN j ->> '$.event_id'   END AS event_id,
        CASE WHEN json_type(j, '$.user_id')    = 'VARCHAR' THEN j ->> '$.user_id'    END AS user_id,
        CASE WHEN json_type(j, '$.event_type') = 'VARCHAR' THEN j ->> '$.event_type' END AS event_type,
        json_type(j, '$.amount') AS amount_type,
        CASE WHEN json_type(j, '$.amount') IN ('BIGINT', 'UBIGINT', 'DOUBLE')
             THEN TRY_CAST(j ->> '$.amount' AS DOUBLE) END AS amount,
        json_type(j, '$.ts') AS ts_type,
        j ->> '$.ts' AS ts_text
    FROM raw
)
SELECT event_id, user_id, event_type,
    -- a non-numeric amount on a purchase/refund makes the record invalid: map it to NULL
    CASE WHEN amount_type IS NULL OR amount_type IN ('NULL', 'BIGINT', 'UBIGINT', 'DOUBLE')
         THEN amount
         WHEN event_type IN ('purchase', 'refund') THEN NULL END AS amount,
    CASE
        WHEN ts_type IN ('BIGINT', 'UBIGINT')
            THEN make_timestamp(TRY_CAST(ts_text AS BIGINT) * 1000)::TIMESTAMPTZ
        WHEN ts_type = 'DOUBLE' AND TRY_CAST(ts_text AS DOUBLE) = floor(TRY_CAST(ts_text AS DOUBLE))
            THEN make_timestamp(CAST(TRY_CAST(ts_text AS DOUBLE) AS BIGINT) * 1000)::TIMESTAMPTZ
        WHEN ts_type = 'VARCHAR'
             AND regexp_full_match(ts_text,
                 '\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})')
            THEN TRY_CAST(regexp_replace(ts_text, '(\.\d{3})\d+', '\1') AS TIMESTAMPTZ)
    END AS ts
FROM f
"""

CSV_ENTITIES_VIEW = r"""
CREATE OR REPLACE TEMP VIEW entities_raw AS
SELECT * REPLACE (CAST(ts AS TIMESTAMPTZ) AS ts), row_number() OVER () - 1 AS _rn
FROM read_csv(getvariable('entities_path'), header = true, auto_detect = true)
"""


def is_jsonl(path):
    p = path.lower()
    for gz in ("", ".gz", ".zst"):
        for ext in (".jsonl", ".json", ".ndjson"):
            if p.endswith(ext + gz):
                return True
    return False


def load_sql(name):
    with open(os.path.join(HERE, name)) as f:
        text = f.read()
    # the marker is a line of its own; the header comments only mention it inline
    prelude, query = re.split(r"^" + re.escape(MARKER) + r"[ \t]*$", text, maxsplit=1, flags=re.M)
    return prelude, query.strip().rstrip(";")


def connect(threads):
    con = duckdb.connect(":memory:")
    if threads:
        con.execute(f"SET threads = {int(threads)}")
    con.execute("SET TimeZone = 'UTC'")
    return con


def prelude_statements(prelude):
    """The prelude's statements, comment lines removed."""
    body = "\n".join(l for l in prelude.splitlines() if not l.lstrip().startswith("--"))
    return [st.strip() for st in body.split(";") if st.strip()]


def bind_inputs(con, prelude, events, entities=None):
    """Sets the path variables and defines events_raw / entities_raw: the SQL file's own Parquet
    views, or the JSON lines / CSV readers below in their place."""
    con.execute("SET VARIABLE events_path = ?", [events])
    if entities is not None:
        con.execute("SET VARIABLE entities_path = ?", [entities])
    json_events = is_jsonl(events)
    csv_entities = entities is not None and entities.lower().endswith((".csv", ".csv.gz"))
    for st in prelude_statements(prelude):
        if json_events and re.search(r"\bVIEW\s+events_raw\b", st, re.I):
            st = JSONL_EVENTS_VIEW
        elif csv_entities and re.search(r"\bVIEW\s+entities_raw\b", st, re.I):
            st = CSV_ENTITIES_VIEW
        con.execute(st)


def fetch_table(result):
    """The result as a pyarrow Table (DuckDB 1.x names it fetch_arrow_table, 2.x to_arrow_table)."""
    for name in ("to_arrow_table", "fetch_arrow_table", "arrow"):
        if hasattr(result, name):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # DB-API results warn about an extra copy
                table = getattr(result, name)()
            return table.read_all() if hasattr(table, "read_all") else table
    raise RuntimeError("no Arrow fetch method on this duckdb result")


def run(con, query, out):
    """Runs the query, materialising or writing every row; returns (seconds, rows, table)."""
    start = time.perf_counter()
    if out:
        fmt = "CSV, HEADER" if out.lower().endswith(".csv") else "PARQUET"
        out_sql = out.replace("'", "''")
        rows = con.execute(f"COPY ({query}) TO '{out_sql}' (FORMAT {fmt})").fetchone()[0]
        table = None
    else:
        table = fetch_table(con.sql(query))
        rows = table.num_rows
    return time.perf_counter() - start, rows, table


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="task", required=True)
    b = sub.add_parser("batch", help="one batch snapshot as of a UTC midnight")
    b.add_argument("--events", required=True)
    b.add_argument("--as-of", required=True, help="S, an ISO time (UTC midnight), e.g. 2026-09-01T00:00:00Z")
    b.add_argument("--out")
    b.add_argument("--threads", type=int)
    t = sub.add_parser("training", help="point-in-time training set for entity rows")
    t.add_argument("--events", required=True)
    t.add_argument("--entities", required=True)
    t.add_argument("--out")
    t.add_argument("--threads", type=int)
    args = ap.parse_args(argv)

    con = connect(args.threads)
    if args.task == "batch":
        prelude, query = load_sql("duckdb_batch.sql")
        con.execute("SET VARIABLE as_of = ?", [args.as_of])
        check = con.execute(
            "SELECT epoch_ms(CAST(getvariable('as_of') AS TIMESTAMPTZ)) % 86400000").fetchone()[0]
        if check != 0:
            ap.error(f"--as-of {args.as_of} is not a UTC midnight")
        bind_inputs(con, prelude, args.events)
    else:
        prelude, query = load_sql("duckdb_training.sql")
        bind_inputs(con, prelude, args.events, args.entities)

    seconds, rows, _ = run(con, query, args.out)
    threads = con.execute("SELECT current_setting('threads')").fetchone()[0]
    print(json.dumps({"engine": "duckdb", "task": args.task, "seconds": round(seconds, 6),
                      "rows": int(rows), "threads": int(threads)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
