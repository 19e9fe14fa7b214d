#!/usr/bin/env python3
"""Batch-layer benchmark: duet against DuckDB on the same generated Parquet, side by side.

Prints, in one run: `duet batch run` vs DuckDB computing the same view (target <= 1.0x), a
120-day `duet batch backfill` vs one `batch run` (target <= 3x), a 1M-row `duet training-set`
vs DuckDB (target <= 1.0x), and peak memory of each duet command (target < 4 GiB).

    python3 bench/run_batch.py --duet target/release/duet [--events 10000000] [--users 1000000]

`batch run` and its DuckDB query are short and this machine's timings vary from run to run, so
they run alternately `--rounds` times (default 3) and the median of each is reported, with the
range; the backfill and the training set run once.

It makes its own virtualenv (.bench-venv, duckdb + pyarrow) and data directory (bench-data/).
"""
import argparse, datetime as dt, json, os, re, subprocess, sys, time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
VENV = os.path.join(ROOT, ".bench-venv")


def venv_python():
    py = os.path.join(VENV, "bin", "python")
    if not os.path.exists(py):
        subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
        subprocess.run([py, "-m", "pip", "install", "-q", "duckdb", "pyarrow", "confluent-kafka"], check=True)
    return py


def timed(cmd, env=None):
    """Runs cmd under /usr/bin/time -v; returns (seconds, peak MiB, stdout). Pending writes
    (an earlier command's files) are flushed first, so their write-back is not timed here."""
    os.sync()
    t = time.time()
    p = subprocess.run(["/usr/bin/time", "-v"] + cmd, capture_output=True, text=True, env=env)
    secs = time.time() - t
    if p.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{p.stderr[-3000:]}")
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)
    return secs, (int(m.group(1)) / 1024 if m else float("nan")), p.stdout


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--duet", default=os.path.join(ROOT, "target/release/duet"))
    ap.add_argument("--events", type=int, default=10_000_000)
    ap.add_argument("--users", type=int, default=1_000_000)
    ap.add_argument("--days", type=int, default=210)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--data", default=os.path.join(ROOT, "bench-data"))
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    py = venv_python()
    os.makedirs(args.data, exist_ok=True)
    end = "2026-11-01T00:00:00Z"
    as_of = "2026-11-01"
    events = os.path.join(args.data, f"events-{args.events}-{args.users}.parquet")
    rows = {}
    if not os.path.exists(events):
        secs, mem, _ = timed([args.duet, "generate", "--users", str(args.users), "--days", str(args.days),
                              "--events", str(args.events), "--end", end, "--out", events])
        rows["generate"] = (secs, mem)
        print(f"generated {args.events} events for {args.users} users in {secs:.1f}s", file=sys.stderr)

    store = os.path.join(args.data, "store-run")
    runs, ducks = [], []
    for _ in range(max(1, args.rounds)):
        subprocess.run(["rm", "-rf", store], check=True)
        runs.append(timed([args.duet, "batch", "run", "--as-of", as_of, "--events", events, "--store", store, "--no-progress"]))
        os.sync()
        out = subprocess.run([py, os.path.join(HERE, "duckdb_baseline.py"), "batch", "--events", events, "--as-of", as_of + "T00:00:00Z"],
                             capture_output=True, text=True, check=True)
        ducks.append(json.loads(out.stdout.strip().splitlines()[-1])["seconds"])
    run_secs = sorted(r[0] for r in runs)
    rows["duet batch run"] = (run_secs[len(run_secs) // 2], max(r[1] for r in runs))
    duck_batch = sorted(ducks)[len(ducks) // 2]

    store2 = os.path.join(args.data, "store-backfill")
    subprocess.run(["rm", "-rf", store2], check=True)
    start = (dt.date.fromisoformat(as_of) - dt.timedelta(days=119)).isoformat()
    secs_bf, mem_bf, _ = timed([args.duet, "batch", "backfill", "--from", start, "--to", as_of, "--events", events,
                                "--store", store2, "--no-progress"])
    rows["duet batch backfill (120 days)"] = (secs_bf, mem_bf)

    entities = os.path.join(args.data, f"entities-{args.rows}.parquet")
    if not os.path.exists(entities):
        subprocess.run([py, "-c", f"""
import pyarrow as pa, pyarrow.parquet as pq, random
random.seed(5)
end = 1793491200000  # 2026-11-01
n = {args.rows}
users = ['u%07d' % random.randrange({args.users}) for _ in range(n)]
ts = [end - random.randrange(30 * 86400000) for _ in range(n)]
pq.write_table(pa.table({{'row_id': list(range(n)), 'user_id': users,
  'ts': pa.array(ts, pa.timestamp('ms', tz='UTC')), 'label': [random.randrange(2) for _ in range(n)]}}), '{entities}')
"""], check=True)
    train_out = os.path.join(args.data, "train.parquet")
    secs_tr, mem_tr, _ = timed([args.duet, "training-set", "--entities", entities, "--events", events, "--out", train_out])
    rows["duet training-set (1M rows)"] = (secs_tr, mem_tr)
    os.sync()
    out = subprocess.run([py, os.path.join(HERE, "duckdb_baseline.py"), "training", "--events", events, "--entities", entities],
                         capture_output=True, text=True, check=True)
    duck_train = json.loads(out.stdout.strip().splitlines()[-1])["seconds"]

    print(f"batch benchmark: {args.events:,} events, {args.users:,} users, {os.cpu_count()} cores")
    print(f"  {'command':<34} {'seconds':>8} {'peak MiB':>9}")
    for k, (s, m) in rows.items():
        print(f"  {k:<34} {s:>8.1f} {m:>9.0f}")
    print(f"  {'DuckDB, same view':<34} {duck_batch:>8.1f}")
    print(f"  {'DuckDB, same training rows':<34} {duck_train:>8.1f}")
    b = rows["duet batch run"][0]
    if len(runs) > 1:
        print(f"  (batch run and DuckDB: median of {len(runs)} alternating rounds; duet {run_secs[0]:.1f}-{run_secs[-1]:.1f} s, "
              f"DuckDB {min(ducks):.1f}-{max(ducks):.1f} s, per-round ratios "
              + ", ".join(f"{r[0] / d:.2f}" for r, d in zip(runs, ducks)) + ")")
    print(f"  batch run / DuckDB        {b / duck_batch:6.2f}x  (target <= 1.0x)")
    print(f"  backfill / batch run      {secs_bf / b:6.2f}x  (target <= 3x)")
    print(f"  training-set / DuckDB     {secs_tr / duck_train:6.2f}x  (target <= 1.0x)")
    peak = max(m for _, m in rows.values())
    print(f"  peak memory               {peak:6.0f} MiB (target < 4096)")


if __name__ == "__main__":
    main()
