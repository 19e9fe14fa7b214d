-- DuckDB baseline: duet's point-in-time training set.
--
-- For every entity row (user_id, ts, ...): the 6 streaming features of `user_realtime` exactly
-- as of ts, and the 8 batch features of `user_batch` from the snapshot S = floor_day(ts), every
-- needed snapshot computed inside the query. Input columns are kept, in input row order.
--
-- Parameters (DuckDB variables, set before running this script):
--   SET VARIABLE events_path   = 'tests/golden/events.parquet';
--   SET VARIABLE entities_path = 'tests/golden/entities.parquet';
-- then, in a duckdb shell started in the repository root:  .read bench/duckdb_training.sql
-- bench/duckdb_baseline.py runs this file (and replaces the input views for JSON lines / CSV).
--
-- Input contract:
--   events_raw(event_id, user_id, event_type, amount DOUBLE, ts TIMESTAMPTZ)
--   entities_raw(<any columns>, user_id, ts TIMESTAMPTZ, _rn BIGINT)  -- _rn = input row order
-- Everything after the `-- @query` marker is the single query. Times are integer epoch ms, UTC.

SET TimeZone = 'UTC';
CREATE OR REPLACE TEMP VIEW events_raw AS
SELECT event_id, user_id, event_type, amount, ts
FROM read_parquet(getvariable('events_path'));
CREATE OR REPLACE TEMP VIEW entities_raw AS
SELECT * EXCLUDE (file_row_number), file_row_number AS _rn
FROM read_parquet(getvariable('entities_path'), file_row_number = true);

-- @query
WITH
-- ---------------------------------------------------------------- valid, deduplicated events
-- (duplicates are exact copies, so any copy represents the event)
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
    GROUP BY event_id
),
ent AS (
    SELECT _rn, user_id, epoch_ms(ts) AS t
    FROM entities_raw
    WHERE user_id IS NOT NULL AND ts IS NOT NULL
),
-- ---------------------------------------------------------------- streaming (speed layer)
-- Sessions: each user's events sorted by (t, event_id); a gap > 30 min starts a new session.
ev_seq AS (
    SELECT *,
        CASE WHEN lag(t) OVER w IS NULL OR t - lag(t) OVER w > 1800000 THEN 1 END AS new_sess,
        row_number() OVER w AS seq
    FROM ev
    WINDOW w AS (PARTITION BY user_id ORDER BY t, event_id)
),
-- One stream per user: events at key 2t+1, entity rows at key 2T, so an entity row sorts before
-- the events at its own instant and a frame ending "1 PRECEDING" is exactly ts < T.
stream AS (
    SELECT user_id, 2 * t + 1 AS o, event_id AS ek, t, NULL::BIGINT AS _rn,
           1 AS is_ev,
           CASE WHEN event_type = 'purchase' THEN 1 END AS p_one,
           CASE WHEN event_type = 'purchase' THEN amount END AS p_amount,
           CASE WHEN event_type = 'purchase' THEN t END AS p_t,
           seq,
           CASE WHEN new_sess = 1 THEN t END AS sess_start,
           CASE WHEN new_sess = 1 THEN seq END AS sess_start_seq,
           0::BIGINT AS off_1h, 0::BIGINT AS off_10m
    FROM ev_seq
    UNION ALL
    SELECT user_id, 2 * t AS o, NULL AS ek, t, _rn,
           NULL, NULL, NULL, NULL, NULL, NULL, NULL,
           -- window start L = ceil_minute(T) - W; frame keys [2L, 2T - 1]
           2 * t - 2 * (CAST(ceil(t / 60000.0) AS BIGINT) * 60000 - 3600000) AS off_1h,
           2 * t - 2 * (CAST(ceil(t / 60000.0) AS BIGINT) * 60000 - 600000)  AS off_10m
    FROM ent
),
stream_feat AS (
    SELECT _rn, t,
        count(p_one)   OVER (PARTITION BY user_id ORDER BY o RANGE BETWEEN off_1h PRECEDING AND 1 PRECEDING)  AS txn_count_1h,
        sum(p_amount)  OVER (PARTITION BY user_id ORDER BY o RANGE BETWEEN off_1h PRECEDING AND 1 PRECEDING)  AS txn_sum_1h,
        count(is_ev)   OVER (PARTITION BY user_id ORDER BY o RANGE BETWEEN off_10m PRECEDING AND 1 PRECEDING) AS event_count_10m,
        last_value(CASE WHEN is_ev = 1 THEN t END IGNORE NULLS) OVER wl AS last_t,
        -- the latest event's session: its first event, and its position in the session
        last_value(sess_start IGNORE NULLS) OVER wl AS sess_start,
        last_value(seq IGNORE NULLS) OVER wl - last_value(sess_start_seq IGNORE NULLS) OVER wl + 1 AS sess_idx,
        last_value(p_t IGNORE NULLS)        OVER wl AS lp_t,
        last_value(p_amount IGNORE NULLS)   OVER wl AS lp_amount,
        is_ev
    FROM stream
    WINDOW wl AS (PARTITION BY user_id ORDER BY o, ek ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)
    QUALIFY is_ev IS NULL
),
-- ---------------------------------------------------------------- batch (daily snapshots)
days AS (SELECT DISTINCT CAST(floor(t / 86400000.0) AS BIGINT) AS sday FROM ent),
first_seen AS (SELECT user_id, min(t) AS first_t FROM ev GROUP BY user_id),
daily AS (
    SELECT user_id, CAST(floor(t / 86400000.0) AS BIGINT) AS day,
        count(*) FILTER (WHERE event_type = 'purchase')                  AS p_cnt,
        sum(amount) FILTER (WHERE event_type = 'purchase')               AS p_sum,
        sum(least(amount, 1000.0)) FILTER (WHERE event_type = 'purchase') AS p_sum_cap,
        max(amount) FILTER (WHERE event_type = 'purchase')               AS p_max,
        count(*) FILTER (WHERE event_type = 'refund')                    AS r_cnt
    FROM ev
    WHERE t < (SELECT max(sday) * 86400000 FROM days)
    GROUP BY ALL
),
-- spend_pct_rank_30d needs, for every needed S, the 30-day spend of every user with a purchase
-- in [S - 30d, S); the other batch features only the (user, S) pairs of the entity rows.
-- Each is an aggregate of the user's daily rows in [S - W, S).
spend_rank AS (
    SELECT user_id, sday,
        cume_dist() OVER (PARTITION BY sday ORDER BY CAST(round(spend_30d * 100) AS BIGINT)) AS spend_pct_rank_30d
    FROM (
        SELECT daily.user_id, days.sday, sum(daily.p_sum) AS spend_30d
        FROM daily JOIN days ON days.sday BETWEEN daily.day + 1 AND daily.day + 30
        WHERE daily.p_cnt > 0
        GROUP BY daily.user_id, days.sday
    )
),
ent_pairs AS (
    SELECT DISTINCT user_id, CAST(floor(t / 86400000.0) AS BIGINT) AS sday FROM ent
),
roll AS (
    SELECT p.user_id, p.sday,
        coalesce(sum(d.p_cnt), 0)                                         AS p_cnt90,
        max(d.p_max)                                                      AS p_max90,
        coalesce(sum(d.r_cnt), 0)                                         AS r_cnt90,
        coalesce(sum(d.p_cnt) FILTER (WHERE d.day >= p.sday - 30), 0)     AS p_cnt30,
        sum(d.p_sum) FILTER (WHERE d.day >= p.sday - 30)                  AS p_sum30,
        sum(d.p_sum_cap) FILTER (WHERE d.day >= p.sday - 30)              AS p_sum_cap30,
        count(d.day) FILTER (WHERE d.day >= p.sday - 30)                  AS active30
    FROM ent_pairs p
    LEFT JOIN daily d ON d.user_id = p.user_id AND d.day BETWEEN p.sday - 90 AND p.sday - 1
    GROUP BY p.user_id, p.sday
),
batch AS (
    SELECT roll.user_id, roll.sday,
        CAST(p_cnt90 AS BIGINT)                                              AS txn_count_90d,
        CASE WHEN p_cnt30 > 0 THEN p_sum30 / p_cnt30 END                     AS avg_txn_amount_30d_v1,
        CASE WHEN p_cnt30 > 0 THEN p_sum_cap30 / p_cnt30 END                 AS avg_txn_amount_30d_v2,
        p_max90                                                              AS max_txn_amount_90d,
        CASE WHEN p_cnt90 > 0 THEN CAST(r_cnt90 AS DOUBLE) / p_cnt90 END     AS refund_rate_90d,
        CAST(active30 AS BIGINT)                                             AS active_days_30d,
        CAST((roll.sday * 86400000 - first_t) // 86400000 AS BIGINT)         AS account_age_days,
        spend_rank.spend_pct_rank_30d
    FROM roll
    JOIN first_seen USING (user_id)
    LEFT JOIN spend_rank ON spend_rank.user_id = roll.user_id AND spend_rank.sday = roll.sday
    WHERE first_seen.first_t < roll.sday * 86400000
)
-- ---------------------------------------------------------------- training rows
SELECT
    e.* EXCLUDE (_rn),
    coalesce(s.txn_count_1h, 0)                                   AS txn_count_1h,
    coalesce(s.txn_sum_1h, 0.0)                                   AS txn_sum_1h,
    coalesce(s.event_count_10m, 0)                                AS event_count_10m,
    CASE WHEN s.t - s.last_t <= 1800000 THEN s.sess_idx ELSE 0 END                         AS session_event_count,
    CASE WHEN s.t - s.last_t <= 1800000 THEN (s.last_t - s.sess_start) / 1000.0 ELSE 0.0 END AS session_duration_s,
    CASE WHEN s.t - s.lp_t <= 7200000 THEN s.lp_amount END        AS last_purchase_amount,
    coalesce(b.txn_count_90d, 0)                                  AS txn_count_90d,
    b.avg_txn_amount_30d_v1,
    b.avg_txn_amount_30d_v2,
    b.max_txn_amount_90d,
    b.refund_rate_90d,
    coalesce(b.active_days_30d, 0)                                AS active_days_30d,
    b.account_age_days,
    b.spend_pct_rank_30d
FROM entities_raw e
LEFT JOIN stream_feat s ON s._rn = e._rn
LEFT JOIN batch b
       ON b.user_id = e.user_id
      AND b.sday = CAST(floor(epoch_ms(e.ts) / 86400000.0) AS BIGINT)
ORDER BY e._rn
