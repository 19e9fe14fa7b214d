-- DuckDB baseline: duet's batch snapshot `user_batch` as of one UTC midnight S.
--
-- Parameters (DuckDB variables, set before running this script):
--   SET VARIABLE events_path = 'tests/golden/events.parquet';   -- a Parquet file or glob
--   SET VARIABLE as_of       = '2026-09-01T00:00:00Z';          -- S, a UTC midnight
-- then, in a duckdb shell started in the repository root:  .read bench/duckdb_batch.sql
-- bench/duckdb_baseline.py runs this file (and replaces `events_raw` for JSON lines input).
--
-- Input contract: a relation `events_raw(event_id, user_id, event_type, amount DOUBLE, ts)`,
-- `ts` a TIMESTAMP WITH TIME ZONE (or a TIMESTAMP meaning UTC). The prelude below defines it
-- from `events_path`; everything after the `-- @query` marker is the single query.
--
-- Semantics (shared/REFERENCE_CATALOG.md): invalid rows dropped, duplicates (same event_id)
-- counted once, windows [S - W, S) with R = 1 day; one row per user with a valid event before S.
-- All time arithmetic is in integer epoch milliseconds (t = epoch_ms(ts)), UTC.

SET TimeZone = 'UTC';
CREATE OR REPLACE TEMP VIEW events_raw AS
SELECT event_id, user_id, event_type, amount, ts
FROM read_parquet(getvariable('events_path'));

-- @query
WITH params AS (
    SELECT epoch_ms(CAST(getvariable('as_of') AS TIMESTAMPTZ)) AS s, CAST(86400000 AS BIGINT) AS d
),
-- Valid events before S, deduplicated by event_id (duplicates are exact copies, so any copy
-- represents the event). Amount is kept only for purchase/refund.
ev AS (
    SELECT event_id,
        any_value(user_id) AS user_id,
        any_value(event_type) AS event_type,
        any_value(CASE WHEN event_type IN ('purchase', 'refund') THEN amount END) AS amount,
        any_value(epoch_ms(ts)) AS t
    FROM events_raw
    WHERE event_id <> '' AND user_id <> '' AND event_type <> '' AND ts IS NOT NULL
      AND (event_type NOT IN ('purchase', 'refund')
           OR (amount IS NOT NULL AND isfinite(amount) AND amount >= 0))
      AND epoch_ms(ts) < (SELECT s FROM params)
    GROUP BY event_id
),
agg AS (
    SELECT
        ev.user_id,
        count(*) FILTER (WHERE event_type = 'purchase' AND t >= s - 90 * d)               AS txn_count_90d,
        avg(amount) FILTER (WHERE event_type = 'purchase' AND t >= s - 30 * d)            AS avg_txn_amount_30d_v1,
        avg(least(amount, 1000.0)) FILTER (WHERE event_type = 'purchase' AND t >= s - 30 * d) AS avg_txn_amount_30d_v2,
        max(amount) FILTER (WHERE event_type = 'purchase' AND t >= s - 90 * d)            AS max_txn_amount_90d,
        count(*) FILTER (WHERE event_type = 'refund' AND t >= s - 90 * d)                 AS refunds_90d,
        count(DISTINCT CAST(floor(t / 86400000.0) AS BIGINT)) FILTER (WHERE t >= s - 30 * d) AS active_days_30d,
        CAST((s - min(t)) // d AS BIGINT)                                                 AS account_age_days,
        sum(amount) FILTER (WHERE event_type = 'purchase' AND t >= s - 30 * d)            AS spend_30d
    FROM ev CROSS JOIN params
    GROUP BY ev.user_id, s, d
)
SELECT
    user_id,
    txn_count_90d,
    avg_txn_amount_30d_v1,
    avg_txn_amount_30d_v2,
    max_txn_amount_90d,
    CASE WHEN txn_count_90d > 0 THEN CAST(refunds_90d AS DOUBLE) / txn_count_90d END AS refund_rate_90d,
    active_days_30d,
    account_age_days,
    -- cume_dist among users with >= 1 purchase in 30d, over the 30-day sum rounded to cents
    CASE WHEN spend_30d IS NOT NULL THEN
        cume_dist() OVER (PARTITION BY spend_30d IS NULL
                          ORDER BY CAST(round(spend_30d * 100) AS BIGINT))
    END AS spend_pct_rank_30d
FROM agg
ORDER BY user_id
