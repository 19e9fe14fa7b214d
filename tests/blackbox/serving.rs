//! `duet serve` as Feast clients and operators see it: the golden answer through `as_of`, the
//! Feast wire format, errors, auth, Redis outages, snapshot swaps under load, fuzzed bodies.

use std::path::Path;
use std::time::{Duration, Instant};

use arrow::array::{Array, AsArray};
use arrow::datatypes::{Float64Type, Int64Type, TimestampMicrosecondType};

use crate::common::*;
use crate::http::Server;
use crate::kafka::*;
use crate::speed::{read_parquet, wait_ok};

/// The golden JSON lines, in file order.
fn golden_lines() -> Vec<Vec<u8>> {
    let out = std::process::Command::new("gzip")
        .args(["-dc", &s(&golden("events.jsonl.gz"))])
        .output()
        .expect("gzip is installed");
    out.stdout
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(<[u8]>::to_vec)
        .collect()
}

fn backfill(store: &str, from: &str, to: &str) {
    expect_status(
        &run(&[
            "batch",
            "backfill",
            "--from",
            from,
            "--to",
            to,
            "--events",
            &s(&golden("events.parquet")),
            "--store",
            store,
            "--no-progress",
        ]),
        0,
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn golden_answer_through_http_as_of() {
    // The shipped catalog, as is: its 10-minute lateness keeps only the last minutes of events
    // in each state, and its 400-day `history` keeps every event beside it, so any `as_of` in
    // the golden months is answered exactly.
    let dir = tempfile::tempdir().unwrap();
    let store = s(&dir.path().join("store"));
    let expected = read_parquet(&golden("expected.parquet"));
    backfill(&store, "2026-06-20", "2026-10-01");

    let topic = unique("golden");
    let prefix = format!("{}:", unique("golden"));
    create_topic(&topic, 3).await;
    produce(&topic, &crate::speed::keyed(&golden_lines())).await;
    let child = {
        let mut c = duet();
        c.args([
            "speed",
            "run",
            "--brokers",
            &brokers(),
            "--topic",
            &topic,
            "--group",
            &unique("g"),
            "--redis",
            &redis_url(),
            "--prefix",
            &prefix,
            "--exit-when-idle",
            "2",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
        c.spawn().unwrap()
    };
    wait_ok(child, Duration::from_secs(300));

    let server = Server::start(
        &[],
        &[
            "--store",
            &store,
            "--redis",
            &redis_url(),
            "--prefix",
            &prefix,
            "--log-sample",
            "0",
            // Each request is a new connection, handed round-robin to the workers: all three,
            // each with its own Redis connection, must serve the same values.
            "--workers",
            "3",
        ],
    );
    let names: Vec<String> = expected
        .schema()
        .fields()
        .iter()
        .skip(3)
        .map(|f| f.name().clone())
        .collect();
    let refs: Vec<String> = names
        .iter()
        .map(|n| {
            let view = if [
                "txn_count_1h",
                "txn_sum_1h",
                "event_count_10m",
                "session_event_count",
                "session_duration_s",
                "last_purchase_amount",
            ]
            .contains(&n.as_str())
            {
                "user_realtime"
            } else {
                "user_batch"
            };
            format!("{view}:{n}")
        })
        .collect();
    let users = expected
        .column_by_name("user_id")
        .unwrap()
        .as_string::<i32>();
    let ts = expected
        .column_by_name("ts")
        .unwrap()
        .as_primitive::<TimestampMicrosecondType>();
    let mut checked = 0;
    for row in 0..expected.num_rows() {
        let as_of = duet_spec::timestamp::format_ms(ts.value(row) / 1000);
        let (status, body) = server.features(&serde_json::json!({
            "features": refs, "entities": {"user_id": [users.value(row)]}, "as_of": as_of,
        }));
        assert_eq!(status, 200, "{body}");
        for (j, name) in names.iter().enumerate() {
            let got = &body["results"][j + 1]["values"][0];
            let col = expected.column_by_name(name).unwrap();
            let ok = if col.is_null(row)
                || (col.data_type() == &arrow::datatypes::DataType::Float64
                    && col.as_primitive::<Float64Type>().value(row).is_nan())
            {
                got.is_null()
            } else if col.data_type() == &arrow::datatypes::DataType::Int64 {
                got.as_i64() == Some(col.as_primitive::<Int64Type>().value(row))
            } else {
                let e = col.as_primitive::<Float64Type>().value(row);
                got.as_f64()
                    .is_some_and(|g| (g - e).abs() <= 1e-9 * e.abs().max(1e-300))
            };
            assert!(
                ok,
                "row {row} {name} as of {as_of}: expected {:?}, served {got}",
                arrow::util::display::array_value_to_string(col, row)
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 2000 * 14);
    // Every streaming value came from a state or a history that reached its instant.
    let (_, metrics) = server.request("GET", "/metrics", None, &[]);
    assert!(
        metrics.contains("\nduet_serve_inexact_total 0\n"),
        "{metrics}"
    );
    // `speed dump` as of a golden instant months before the watermark reads the histories
    // too: every user's streaming features, exact and equal to the reference evaluator's.
    let valid: Vec<duet_spec::event::Event> = golden_lines()
        .iter()
        .filter_map(|l| duet_spec::event::parse_json_event(l).ok())
        .map(|e| e.to_event())
        .collect();
    let t = duet_spec::timestamp::parse_instant("2026-08-01T00:20:00Z").unwrap();
    crate::speed::assert_state_matches(&prefix, valid, t, dir.path());
    clean_redis(&prefix);
}

/// The message of the JSON error `server` answers to `method path`, which must have `status`.
fn error_of(server: &Server, method: &str, path: &str, status: u16) -> String {
    let (got, text) = server.request(method, path, None, &[]);
    assert_eq!(got, status, "{method} {path}: {text}");
    let body: serde_json::Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {text}"));
    body["error"]
        .as_str()
        .unwrap_or_else(|| panic!("{method} {path}: no `error`: {text}"))
        .to_string()
}

/// The whole response, status line and headers included, to a `GET` of `path` without headers.
fn raw_get(addr: &str, path: &str) -> String {
    let mut raw = std::net::TcpStream::connect(addr).unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
    std::io::Write::write_all(&mut raw, request.as_bytes()).unwrap();
    let mut response = String::new();
    std::io::Read::read_to_string(&mut raw, &mut response).unwrap();
    response
}

/// `duet batch run --as-of <as_of>` over the golden events into `store`.
fn batch_run(store: &str, as_of: &str) -> std::process::Output {
    run(&[
        "batch",
        "run",
        "--as-of",
        as_of,
        "--events",
        &s(&golden("events.parquet")),
        "--store",
        store,
        "--no-progress",
    ])
}

fn one_snapshot_store(dir: &Path) -> String {
    let store = s(&dir.join("store"));
    expect_status(&batch_run(&store, "2026-09-01"), 0);
    store
}

/// `as_of` an instant whose day has no snapshot: served from the newest snapshot before it, as
/// a server running then would have, stale by its age; with none before it, not found. A batch
/// run given an instant between midnights publishes that midnight's snapshot.
#[test]
fn as_of_a_day_without_its_snapshot_is_served_from_the_one_before() {
    let dir = tempfile::tempdir().unwrap();
    let store = one_snapshot_store(dir.path());
    let (stdout, stderr) = expect_status(&batch_run(&store, "2026-08-30T15:20:00+02:00"), 0);
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let published: Vec<&str> = report["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["as_of"].as_str().unwrap())
        .collect();
    assert_eq!(published, ["2026-08-30T00:00:00.000Z"], "{stdout}");
    assert!(
        stderr
            .contains("is not a cadence boundary: the snapshot is as of 2026-08-30T00:00:00.000Z"),
        "{stderr}"
    );
    let server = Server::over(&store, &format!("{}:", unique("before")), &[]);
    let users = ["u0000071", "u0000203", "u0000006", "nobody"];
    let batch = |as_of: &str| {
        let (status, body) = server.features(&serde_json::json!({
            "feature_service": "user_batch", "entities": {"user_id": users}, "as_of": as_of,
        }));
        assert_eq!(status, 200, "{as_of}: {body}");
        body["results"].as_array().unwrap()[1..].to_vec()
    };
    let column = |results: &[serde_json::Value], key: &str| -> Vec<serde_json::Value> {
        results.iter().map(|r| r[key].clone()).collect()
    };
    // (as_of, the snapshot its day is served from, its status for a known user)
    let cases = [
        ("2026-08-30T12:00:00Z", "2026-08-30T00:00:00Z", "PRESENT"),
        ("2026-08-31T05:00:00Z", "2026-08-30T00:00:00Z", "PRESENT"),
        // 36 hours old is within the TTL; a millisecond more is not.
        (
            "2026-08-31T13:00:00+01:00",
            "2026-08-30T00:00:00Z",
            "PRESENT",
        ),
        (
            "2026-08-31T13:00:00.001+01:00",
            "2026-08-30T00:00:00Z",
            "OUTSIDE_MAX_AGE",
        ),
        ("2026-09-01T08:00:00Z", "2026-09-01T00:00:00Z", "PRESENT"),
        ("2026-09-02T10:00:00Z", "2026-09-01T00:00:00Z", "PRESENT"),
        (
            "2026-09-03T10:00:00Z",
            "2026-09-01T00:00:00Z",
            "OUTSIDE_MAX_AGE",
        ),
    ];
    let own = [batch(cases[0].0), batch(cases[4].0)];
    assert_ne!(
        column(&own[0], "values"),
        column(&own[1], "values"),
        "the two snapshots differ"
    );
    for (as_of, from, status) in cases {
        let results = batch(as_of);
        let expected = &own[usize::from(from.starts_with("2026-09"))];
        assert_eq!(
            column(&results, "values"),
            column(expected, "values"),
            "{as_of}"
        );
        for r in &results {
            let statuses = r["statuses"].as_array().unwrap();
            assert_eq!(statuses[3], "NOT_FOUND", "{as_of}: {r}");
            for st in &statuses[..3] {
                assert!(st == status || st == "NULL_VALUE", "{as_of}: {r}");
            }
            assert!(statuses[..3].iter().any(|st| st == status), "{as_of}: {r}");
            let stamp = r["event_timestamps"][0].as_str().unwrap();
            assert_eq!(
                duet_spec::timestamp::parse_rfc3339_ms(stamp),
                duet_spec::timestamp::parse_rfc3339_ms(from),
                "{as_of}: {r}"
            );
        }
    }
    // Before the first snapshot: nothing to serve from.
    for r in batch("2026-08-29T23:59:59.999Z") {
        for st in r["statuses"].as_array().unwrap() {
            assert_eq!(st, "NOT_FOUND", "{r}");
        }
    }
}

#[test]
fn feast_client_format_and_errors() {
    let dir = tempfile::tempdir().unwrap();
    let store = one_snapshot_store(dir.path());
    let prefix = format!("{}:", unique("fmt"));
    let server = Server::over(
        &store,
        &prefix,
        &["--max-entities", "3", "--max-body-bytes", "2000"],
    );
    // Exactly what Feast's RemoteOnlineStore sends (sdk/python/feast/infra/online_stores/remote.py).
    let (status, body) = server.features(&serde_json::json!({
        "entities": {"user_id": ["u0000071", "nobody"]},
        "full_feature_names": false,
        "include_feature_view_version_metadata": false,
        "features": ["user_batch:txn_count_90d", "user_realtime:txn_count_1h", "user_batch:avg_txn_amount_30d_v2"],
    }));
    assert_eq!(status, 200, "{body}");
    // Decoded as Feast's _build_online_response_from_json does.
    let names: Vec<&str> = body["metadata"]["feature_names"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "user_id",
            "txn_count_90d",
            "txn_count_1h",
            "avg_txn_amount_30d_v2"
        ]
    );
    let results = body["results"].as_array().unwrap();
    assert_eq!(results.len(), 4);
    for r in results {
        assert_eq!(r["values"].as_array().unwrap().len(), 2);
        for st in r["statuses"].as_array().unwrap() {
            assert!(
                ["PRESENT", "NOT_FOUND", "NULL_VALUE", "OUTSIDE_MAX_AGE"]
                    .contains(&st.as_str().unwrap()),
                "{st}"
            );
        }
        for t in r["event_timestamps"].as_array().unwrap() {
            assert!(
                duet_spec::timestamp::parse_rfc3339_ms(t.as_str().unwrap()).is_some(),
                "{t}"
            );
        }
    }
    assert_eq!(
        results[0]["values"],
        serde_json::json!(["u0000071", "nobody"])
    );
    // The snapshot is months old: present, but outside its max age.
    assert_eq!(results[1]["statuses"][0], "OUTSIDE_MAX_AGE");
    assert_eq!(results[1]["statuses"][1], "NOT_FOUND");
    assert_eq!(results[1]["values"][1], 0);
    assert_eq!(results[3]["values"][1], serde_json::Value::Null);
    // Byte for byte what Feast's RemoteOnlineStore posts (`_construct_online_read_api_json_request`:
    // `json.dumps` of one view's features and one join key, sent by `requests` with
    // `data=`, so without a content type), decoded as it decodes it: a value is read only
    // when its status is PRESENT, and the event time is `results[1].event_timestamps[0]`
    // parsed by `datetime.fromisoformat` after replacing `Z` with `+00:00`.
    let raw = br#"{"features": ["user_batch:txn_count_90d", "user_batch:avg_txn_amount_30d_v2"], "entities": {"user_id": ["u0000071", "nobody"]}}"#;
    let (status, text) = server.request("POST", "/get-online-features", Some(raw), &[]);
    assert_eq!(status, 200, "{text}");
    let body: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        body["metadata"]["feature_names"],
        serde_json::json!(["user_id", "txn_count_90d", "avg_txn_amount_30d_v2"])
    );
    let stamp = body["results"][1]["event_timestamps"][0].as_str().unwrap();
    let iso = stamp.replace('Z', "+00:00");
    let (date, time) = iso.split_once('T').unwrap();
    assert!(
        date.len() == 10 && time.ends_with("+00:00") && time.len() >= 14,
        "fromisoformat needs YYYY-MM-DDTHH:MM:SS[.ffffff]+00:00, got {stamp}"
    );
    let fraction = time[8..time.len() - 6].strip_prefix('.').unwrap_or("");
    assert!(
        matches!(fraction.len(), 0 | 3 | 6) && fraction.bytes().all(|b| b.is_ascii_digit()),
        "{stamp}"
    );
    for (j, r) in body["results"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .skip(1)
    {
        assert_eq!(r["values"].as_array().unwrap().len(), 2, "{j}: {r}");
        assert_eq!(r["statuses"].as_array().unwrap().len(), 2, "{j}: {r}");
    }
    // Full feature names.
    let (_, body) = server.features(&serde_json::json!({"entities": {"user_id": ["u1"]}, "full_feature_names": true, "features": ["user_batch:txn_count_90d"]}));
    assert_eq!(
        body["metadata"]["feature_names"][1],
        "user_batch__txn_count_90d"
    );
    // Feature services are views, and win over a feature list as in Feast; the join key comes
    // back as it was sent (an integer stays an integer).
    let (status, body) = server.features(&serde_json::json!({
        "entities": {"user_id": [1001]},
        "feature_service": "user_realtime",
        "features": ["user_batch:txn_count_90d"],
    }));
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["metadata"]["feature_names"].as_array().unwrap().len(),
        7
    );
    assert_eq!(body["results"][0]["values"], serde_json::json!([1001]));
    // A streaming state that cannot be decoded is INVALID, never defaults presented as values.
    {
        let client = redis::Client::open(redis_url()).unwrap();
        let mut con = client.get_connection().unwrap();
        let mut garbage = 1u64.to_be_bytes().to_vec();
        garbage.extend_from_slice(b"\x07not a state");
        let _: () = redis::cmd("SET")
            .arg(duet_speed::processor::state_key(&prefix, "u0000071"))
            .arg(garbage)
            .query(&mut con)
            .unwrap();
    }
    let (status, body) = server.features(&serde_json::json!({
        "entities": {"user_id": ["u0000071", "nobody"]},
        "features": ["user_realtime:txn_count_1h"],
    }));
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["results"][1]["statuses"],
        serde_json::json!(["INVALID", "PRESENT"])
    );
    assert_eq!(body["results"][1]["values"], serde_json::json!([null, 0]));
    assert!(
        server
            .request("GET", "/metrics", None, &[])
            .1
            .to_string()
            .contains("duet_serve_corrupt_states_total 1"),
    );
    clean_redis(&prefix);

    let cases: Vec<(serde_json::Value, u16, &str)> = vec![
        (
            serde_json::json!({"entities": {"user_id": ["u"]}, "features": ["user_batch:nope"]}),
            404,
            "unknown feature `user_batch:nope`",
        ),
        (
            serde_json::json!({"entities": {"user_id": ["a", "b", "c", "d"]}, "features": ["user_batch:txn_count_90d"]}),
            400,
            "too many entities",
        ),
        (
            serde_json::json!({"entities": {"user_id": [true]}, "features": ["user_batch:txn_count_90d"]}),
            400,
            "`entities.user_id[0]` is a boolean",
        ),
        (
            serde_json::json!({"entities": {"account": ["x"]}, "features": ["user_batch:txn_count_90d"]}),
            400,
            "unknown join key `account`",
        ),
        (
            serde_json::json!({"entities": {"user_id": ["x"]}, "features": []}),
            400,
            "`features` must list",
        ),
        (
            serde_json::json!({"entities": {"user_id": ["x"]}, "features": ["user_batch:txn_count_90d"], "as_of": "yesterday"}),
            400,
            "`as_of` value `yesterday`",
        ),
        (
            serde_json::json!({"entities": "u1", "features": ["user_batch:txn_count_90d"]}),
            400,
            "bad JSON body",
        ),
        (
            serde_json::json!({"entities": {"user_id": ["x"]}, "features": ["user_batch:txn_count_90d", "txn_count_90d"]}),
            400,
            "gives column `txn_count_90d` twice",
        ),
    ];
    for (req, code, msg) in cases {
        let (status, body) = server.features(&req);
        assert_eq!(status, code, "{req} -> {body}");
        assert!(
            body["error"].as_str().unwrap().contains(msg),
            "{req} -> {body}"
        );
    }
    let (status, text) = server.request("POST", "/get-online-features", Some(b"{not json"), &[]);
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("\"error\""), "{text}");
    let big = vec![b' '; 5000];
    let (status, text) = server.request("POST", "/get-online-features", Some(&big), &[]);
    assert_eq!(status, 413, "{text}");
    assert!(text.contains("larger than 2000 bytes"), "{text}");
    // A wrong method, and an entity key that does not decode: JSON errors naming the problem.
    assert_eq!(
        error_of(&server, "GET", "/get-online-features", 405),
        "GET is not allowed on /get-online-features (see /openapi.json)"
    );
    let head = raw_get(&server.addr, "/get-online-features");
    assert!(
        head.to_ascii_lowercase().contains("\r\nallow: post\r\n"),
        "{head}"
    );
    let err = error_of(&server, "DELETE", "/v1/features/u0000071", 405);
    assert!(err.contains("DELETE is not allowed"), "{err}");
    let err = error_of(&server, "GET", "/v1/features/%FF", 400);
    assert!(err.starts_with("bad entity key in the path"), "{err}");
    let err = error_of(&server, "GET", "/nowhere", 404);
    assert!(err.contains("no such endpoint"), "{err}");

    let (status, text) = server.request("GET", "/v1/features/u0000071", None, &[]);
    assert_eq!(status, 200, "{text}");
    let flat: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(flat["user_id"], "u0000071");
    assert_eq!(flat.as_object().unwrap().len(), 15);
    assert_eq!(server.request("GET", "/healthz", None, &[]).0, 200);
    assert_eq!(server.request("GET", "/readyz", None, &[]).0, 200);
    let (status, openapi) = server.request("GET", "/openapi.json", None, &[]);
    assert_eq!(status, 200);
    assert!(openapi.contains("\"/get-online-features\""));
    // The request schema states the server's limits: its join key, and `--max-entities 3`.
    let openapi: serde_json::Value = serde_json::from_str(&openapi).unwrap();
    let request = &openapi["components"]["schemas"]["FeastRequest"];
    let entities = &request["properties"]["entities"];
    assert_eq!(entities["additionalProperties"], false, "{entities}");
    assert_eq!(entities["maxProperties"], 1, "{entities}");
    assert_eq!(
        entities["properties"]["user_id"]["maxItems"], 3,
        "{entities}"
    );
    assert_eq!(
        entities["properties"]["user_id"]["minItems"], 1,
        "{entities}"
    );
    let features = request["anyOf"][1]["properties"]["features"]["items"]["enum"]
        .as_array()
        .unwrap();
    assert_eq!(features.len(), 14, "{features:?}");
    assert!(features.contains(&"user_realtime:txn_count_1h".into()));
    let (status, metrics) = server.request("GET", "/metrics", None, &[]);
    assert_eq!(status, 200);
    assert!(metrics.contains("duet_serve_requests_total"), "{metrics}");
    assert!(
        metrics.contains("duet_serve_snapshot_age_seconds{view=\"user_batch\"}"),
        "{metrics}"
    );
    // Every sample follows its own family's TYPE line, and no family is split.
    let mut seen = std::collections::HashSet::new();
    let mut current = String::new();
    for line in metrics.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            current = rest.split(' ').next().unwrap().to_string();
            assert!(seen.insert(current.clone()), "{current} twice: {metrics}");
        } else if !line.starts_with('#') && !line.is_empty() {
            let name = line.split(['{', ' ']).next().unwrap();
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|f| *f == current))
                .unwrap_or(name);
            assert_eq!(family, current, "{line} outside its family: {metrics}");
        }
    }
    let bytes = metrics
        .lines()
        .find_map(|l| l.strip_prefix("duet_serve_snapshot_bytes{view=\"user_batch\"} "))
        .unwrap_or_else(|| panic!("{metrics}"));
    assert!(bytes.parse::<u64>().unwrap() > 0, "{metrics}");
}

#[test]
fn bearer_token_guards_features() {
    let dir = tempfile::tempdir().unwrap();
    let store = one_snapshot_store(dir.path());
    // With JSON logs (checked at the end: the address line is JSON too).
    let server = Server::start(
        &["--log-json"],
        &[
            "--store",
            &store,
            "--redis",
            &redis_url(),
            "--auth-token",
            "s3cret",
        ],
    );
    let body =
        br#"{"entities": {"user_id": ["u0000071"]}, "features": ["user_batch:txn_count_90d"]}"#;
    let (status, text) = server.request("POST", "/get-online-features", Some(body), &[]);
    assert_eq!(status, 401, "{text}");
    assert!(!text.contains("txn_count_90d"), "{text}");
    let (status, _) = server.request(
        "POST",
        "/get-online-features",
        Some(body),
        &[("authorization", "Bearer wrong")],
    );
    assert_eq!(status, 401);
    let (status, text) = server.request(
        "POST",
        "/get-online-features",
        Some(body),
        &[("authorization", "Bearer s3cret")],
    );
    assert_eq!(status, 200, "{text}");
    assert_eq!(
        server.request("GET", "/v1/features/u0000071", None, &[]).0,
        401
    );
    // The scheme's case and the spaces around the token do not matter (RFC 9110).
    for given in ["bearer s3cret", "BEARER  s3cret ", "Bearer\ts3cret"] {
        let (status, text) = server.request(
            "POST",
            "/get-online-features",
            Some(body),
            &[("authorization", given)],
        );
        let expected = if given.contains('\t') { 401 } else { 200 };
        assert_eq!(status, expected, "{given:?}: {text}");
    }
    for given in ["Basic czNjcmV0", "Bearer s3cre", "Bearer s3cretX", "Bearer"] {
        let (status, _) = server.request(
            "POST",
            "/get-online-features",
            Some(body),
            &[("authorization", given)],
        );
        assert_eq!(status, 401, "{given:?}");
    }
    // A 401 names the scheme to use.
    let head = raw_get(&server.addr, "/v1/features/u0000071");
    assert!(head.starts_with("HTTP/1.1 401"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("\r\nwww-authenticate: bearer realm=\"duet\"\r\n"),
        "{head}"
    );
    // A UTC offset's `+` written unencoded in the query string (where `+` means a space) is
    // still the offset: the same instant as the snapshot's, written three ways.
    let auth = [("authorization", "Bearer s3cret")];
    let answers: Vec<(u16, String)> = [
        "2026-09-01T00:00:00Z",
        "2026-09-01T05:30:00%2B05:30",
        "2026-09-01T05:30:00+05:30",
    ]
    .iter()
    .map(|t| {
        server.request(
            "GET",
            &format!("/v1/features/u0000071?as_of={t}"),
            None,
            &auth,
        )
    })
    .collect();
    assert_eq!(answers[0].0, 200, "{}", answers[0].1);
    assert!(answers[0].1.contains("txn_count_90d"), "{}", answers[0].1);
    assert_eq!(answers[1], answers[0]);
    assert_eq!(answers[2], answers[0]);
    let (status, text) = server.request(
        "GET",
        "/v1/features/u0000071?as_of=2026-09-01+05:30",
        None,
        &auth,
    );
    assert_eq!(status, 400, "{text}");
    // The message shows the value as it arrived.
    assert!(text.contains("`2026-09-01 05:30`"), "{text}");
    let lines = server.log_lines();
    assert!(
        lines.iter().any(|l| l.contains("listening on")),
        "{lines:?}"
    );
    for line in lines {
        assert!(
            serde_json::from_str::<serde_json::Value>(&line).is_ok_and(|v| v.is_object()),
            "not JSON: {line}"
        );
    }
}

/// Starts a server over one snapshot and the Redis at `redis`, which fails (refuses, or never
/// answers): three requests in a row get their batch values and `INVALID` streaming ones, each
/// within 2 s, and `/readyz` answers 503 within 2 s.
fn serves_batch_and_fails_streaming_fast(redis: &str, timeout_ms: &str) {
    let dir = tempfile::tempdir().unwrap();
    let store = one_snapshot_store(dir.path());
    let server = Server::start(
        &[],
        &[
            "--store",
            &store,
            "--redis",
            redis,
            "--redis-timeout-ms",
            timeout_ms,
        ],
    );
    for _ in 0..3 {
        let started = Instant::now();
        let (status, body) = server.features(&serde_json::json!({
            "entities": {"user_id": ["u0000071"]},
            "features": ["user_batch:txn_count_90d", "user_realtime:txn_count_1h"],
        }));
        let took = started.elapsed();
        assert!(took < Duration::from_secs(2), "{took:?}");
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["results"][1]["statuses"][0], "OUTSIDE_MAX_AGE");
        assert!(body["results"][1]["values"][0].as_i64().unwrap() > 0);
        assert_eq!(body["results"][2]["statuses"][0], "INVALID");
        assert_eq!(body["results"][2]["values"][0], serde_json::Value::Null);
    }
    let started = Instant::now();
    assert_eq!(server.request("GET", "/readyz", None, &[]).0, 503);
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[test]
fn redis_unreachable_serves_batch_and_fails_streaming_fast() {
    serves_batch_and_fails_streaming_fast("redis://127.0.0.1:1/0", "100");
}

/// A Redis URL whose server accepts connections and never answers: no error ever arrives,
/// only silence. Also returns the connections it has accepted.
fn silent_redis() -> (
    String,
    std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
) {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let held = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let keep = held.clone();
    std::thread::spawn(move || {
        for c in silent.incoming().flatten() {
            keep.lock().unwrap().push(c);
        }
    });
    (format!("redis://127.0.0.1:{port}/0"), held)
}

#[test]
fn a_redis_that_never_answers_fails_streaming_features_within_the_timeout() {
    let (url, held) = silent_redis();
    serves_batch_and_fails_streaming_fast(&url, "150");
    assert!(
        !held.lock().unwrap().is_empty(),
        "the server never connected"
    );
}

#[test]
fn requests_in_flight_at_shutdown_are_answered_and_logged() {
    // Requests wait for a Redis that never answers, and the server is stopped meanwhile.
    let (url, _held) = silent_redis();
    let dir = tempfile::tempdir().unwrap();
    let store = one_snapshot_store(dir.path());
    let server = Server::start(
        &[],
        &[
            "--store",
            &store,
            "--redis",
            &url,
            "--redis-timeout-ms",
            "1500",
            "--log-sample",
            "1",
        ],
    );
    let entities = ["u0000071", "u0000072", "u0000073"];
    let clients: Vec<_> = entities
        .iter()
        .map(|e| {
            let (addr, e) = (server.addr.clone(), e.to_string());
            std::thread::spawn(move || {
                let body = serde_json::json!({
                    "entities": {"user_id": [e]},
                    "features": ["user_batch:txn_count_90d", "user_realtime:txn_count_1h"],
                });
                crate::http::request(
                    &addr,
                    "POST",
                    "/get-online-features",
                    Some(body.to_string().as_bytes()),
                    &[],
                )
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(400));
    server.stop_gracefully();
    for c in clients {
        let (status, text) = c.join().unwrap();
        assert_eq!(status, 200, "{text}");
        assert!(text.contains("INVALID"), "{text}");
    }
    // Every one of them is in the served log, written after they were answered.
    let mut logged = std::collections::BTreeSet::new();
    for f in std::fs::read_dir(Path::new(&store).join("served_log")).unwrap() {
        for line in std::fs::read_to_string(f.unwrap().path()).unwrap().lines() {
            let r: serde_json::Value = serde_json::from_str(line).unwrap();
            logged.insert(r["entity"].as_str().unwrap().to_string());
        }
    }
    assert_eq!(
        logged,
        entities.iter().map(|e| e.to_string()).collect(),
        "served log"
    );
}

#[test]
fn snapshot_swap_under_load_drops_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = one_snapshot_store(dir.path());
    let server = Server::start(
        &[],
        &[
            "--store",
            &store,
            "--redis",
            &redis_url(),
            "--snapshot-poll-ms",
            "100",
            "--workers",
            "3",
        ],
    );
    let addr = server.addr.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let (addr, stop) = (addr.clone(), stop.clone());
            std::thread::spawn(move || {
                let body = br#"{"entities": {"user_id": ["u0000071", "u0000145"]}, "features": ["user_batch:txn_count_90d", "user_batch:spend_pct_rank_30d"]}"#;
                let mut stamps = std::collections::BTreeSet::new();
                let mut n = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let (status, text) = crate::http::request(&addr, "POST", "/get-online-features", Some(body), &[]);
                    assert_eq!(status, 200, "{text}");
                    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
                    stamps.insert(v["results"][1]["event_timestamps"][0].as_str().unwrap().to_string());
                    n += 1;
                }
                (n, stamps)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    expect_status(
        &run(&[
            "batch",
            "run",
            "--as-of",
            "2026-09-15",
            "--events",
            &s(&golden("events.parquet")),
            "--store",
            &store,
            "--no-progress",
        ]),
        0,
    );
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut seen = std::collections::BTreeSet::new();
    let mut total = 0;
    for w in workers {
        let (n, stamps) = w.join().expect("no failed request");
        total += n;
        seen.extend(stamps);
    }
    assert!(total > 50, "{total}");
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        ["2026-09-01T00:00:00.000Z", "2026-09-15T00:00:00.000Z"]
    );
}

/// Schemathesis (PyPI; `scripts/test` installs it and names it in `DUET_TEST_SCHEMATHESIS`)
/// generates requests from `/openapi.json`, valid and invalid, and checks every answer against
/// the document: no 5xx, only documented statuses, content types and response schemas, requests
/// the schema allows accepted and requests it forbids refused.
#[test]
fn schemathesis_finds_no_failure_against_the_openapi_document() {
    let st = std::env::var("DUET_TEST_SCHEMATHESIS").unwrap_or_else(|_| "st".into());
    let dir = tempfile::tempdir().unwrap();
    let store = one_snapshot_store(dir.path());
    let prefix = format!("{}:", unique("st"));
    let server = Server::over(&store, &prefix, &["--max-entities", "5"]);
    let out = std::process::Command::new(&st)
        .args([
            "--no-color",
            "run",
            &format!("http://{}/openapi.json", server.addr),
            "--checks",
            "all",
            "--max-time",
            "40",
            "--workers",
            "2",
            "--continue-on-failure",
            "--generation-database",
            "none",
        ])
        .current_dir(dir.path())
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run schemathesis as `{st}` ({e}): run ./scripts/test, which installs it, \
                 or set DUET_TEST_SCHEMATHESIS to its `st`"
            )
        });
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "schemathesis failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // It generated requests (more than a few hundred in 40 s).
    let generated: usize = stdout
        .lines()
        .find_map(|l| l.trim().split_once(" generated"))
        .and_then(|(n, _)| n.trim().parse().ok())
        .unwrap_or(0);
    assert!(generated > 200, "{stdout}");
}

#[test]
fn fuzzed_bodies_never_get_a_5xx() {
    use proptest::prelude::*;
    let dir = tempfile::tempdir().unwrap();
    let store = one_snapshot_store(dir.path());
    let server = Server::start(&[], &["--store", &store, "--redis", &redis_url()]);
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>()
            .prop_filter("finite", |x| x.is_finite())
            .prop_map(serde_json::Value::from),
        prop::sample::select(vec![
            "user_batch:txn_count_90d",
            "user_realtime:txn_count_1h",
            "u0000071",
            "user_id",
            "",
            "2026-09-01T00:00:00Z",
            "\u{0}\u{ffff}"
        ])
        .prop_map(serde_json::Value::from),
    ];
    let value = leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(serde_json::Value::from),
            prop::collection::btree_map(
                prop::sample::select(vec![
                    "features",
                    "entities",
                    "user_id",
                    "as_of",
                    "feature_service",
                    "full_feature_names",
                    "x"
                ])
                .prop_map(String::from),
                inner,
                0..5
            )
            .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    });
    let mut runner = proptest::test_runner::TestRunner::new(proptest::test_runner::Config {
        cases: 300,
        ..Default::default()
    });
    runner
        .run(
            &(value, prop::collection::vec(any::<u8>(), 0..64)),
            |(v, junk)| {
                let (status, text) = server.request(
                    "POST",
                    "/get-online-features",
                    Some(v.to_string().as_bytes()),
                    &[],
                );
                prop_assert!((200..500).contains(&status), "{v} -> {status} {text}");
                let (status, _) = server.request("POST", "/get-online-features", Some(&junk), &[]);
                prop_assert!((200..500).contains(&status));
                // The entity endpoint with fuzzed keys and query strings, and other methods.
                let enc = |bytes: &[u8]| -> String {
                    bytes
                        .iter()
                        .map(|b| match b {
                            b'a'..=b'z' | b'0'..=b'9' => char::from(*b).to_string(),
                            _ => format!("%{b:02X}"),
                        })
                        .collect()
                };
                let key = enc(&junk);
                let query = match v.as_str() {
                    Some(s) => format!("?as_of={}", enc(s.as_bytes())),
                    None => format!("?as_of={}&x={}", enc(v.to_string().as_bytes()), enc(&junk)),
                };
                let method = ["GET", "PUT", "DELETE", "PATCH"][junk.len() % 4];
                for (m, path) in [
                    ("GET", format!("/v1/features/{key}{query}")),
                    (method, format!("/v1/features/{key}")),
                    (method, "/get-online-features".to_string()),
                ] {
                    let (status, text) = server.request(m, &path, None, &[]);
                    prop_assert!(
                        (200..500).contains(&status),
                        "{m} {path} -> {status} {text}"
                    );
                    if status >= 400 {
                        let err: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
                            TestCaseError::fail(format!("{m} {path} -> {status} {text}: {e}"))
                        })?;
                        prop_assert!(err["error"].is_string(), "{m} {path} -> {text}");
                    }
                }
                Ok(())
            },
        )
        .unwrap();
}

#[test]
fn serve_refuses_settings_out_of_range() {
    for (flag, value) in [
        ("--log-sample", "1.5"),
        ("--log-sample", "-0.1"),
        ("--max-entities", "0"),
        ("--max-body-bytes", "0"),
    ] {
        // A Redis URL duet refuses: were the value accepted, `serve` would still exit 2 at once
        // (for `--redis`) instead of serving, and the message check below would fail.
        let out = run(&[
            "serve",
            "--store",
            "/nonexistent",
            "--redis",
            "nope://redis",
            // `--flag=value`: a negative value would otherwise read as another flag.
            &format!("{flag}={value}"),
        ]);
        expect_status(&out, 2);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(flag), "{flag} {value}: {err}");
        assert!(
            err.contains("not between 0 and 1") || err.contains("must be at least 1"),
            "{flag} {value}: {err}"
        );
    }
}

/// A listen address that is taken is a runtime failure (exit 1), one that is not an address
/// bad input (exit 2); both name `--listen` in one line.
#[test]
fn serve_tells_a_taken_address_from_a_malformed_one() {
    let dir = tempfile::tempdir().unwrap();
    let store = one_snapshot_store(dir.path());
    let redis = redis_url();
    expect_listen_refused(&[
        "serve",
        "--store",
        &store,
        "--redis",
        &redis,
        "--prefix",
        "listen-test:",
    ]);
}

#[test]
fn serve_settings_come_from_the_config_file_below_flags() {
    let dir = tempfile::tempdir().unwrap();
    let store = one_snapshot_store(dir.path());
    let config = dir.path().join("duet.toml");
    std::fs::write(
        &config,
        "max_entities = 2\nmax_body_bytes = 4096\nlog_sample = 1.0\nserve_workers = 1\nsnapshot_poll_ms = 1000\n",
    )
    .unwrap();
    let config = config.display().to_string();
    let three = serde_json::json!({
        "entities": {"user_id": ["u0000071", "u0000072", "u0000073"]},
        "features": ["user_batch:txn_count_90d"],
    });
    let server = Server::start(
        &["--config", &config],
        &["--store", &store, "--redis", &redis_url()],
    );
    let (status, body) = server.features(&three);
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("at most 2"),
        "{body}"
    );
    let big = format!(
        r#"{{"entities": {{"user_id": ["u0000071"]}}, "features": ["user_batch:txn_count_90d"], "pad": "{}"}}"#,
        "x".repeat(5000)
    );
    let (status, text) = server.request("POST", "/get-online-features", Some(big.as_bytes()), &[]);
    assert_eq!(status, 413, "{text}");
    // `log_sample = 1.0`: every entity answered is in the served log once the server stops.
    let (status, body) = server.features(&serde_json::json!({
        "entities": {"user_id": ["u0000071"]},
        "features": ["user_batch:txn_count_90d"],
    }));
    assert_eq!(status, 200, "{body}");
    // A HEAD request is answered as a GET but sends no values, so it is not logged.
    let (status, text) = server.request("HEAD", "/v1/features/u0000072", None, &[]);
    assert_eq!((status, text.as_str()), (200, ""));
    let (status, text) = server.request("GET", "/v1/features/u0000073", None, &[]);
    assert_eq!(status, 200, "{text}");
    server.stop_gracefully();
    let logged: Vec<String> = std::fs::read_dir(dir.path().join("store/served_log"))
        .unwrap()
        .map(|f| std::fs::read_to_string(f.unwrap().path()).unwrap())
        .collect();
    let logged = logged.concat();
    assert!(logged.contains("\"u0000071\""), "{logged}");
    assert!(logged.contains("\"u0000073\""), "{logged}");
    assert!(!logged.contains("\"u0000072\""), "{logged}");
    // A flag wins over the file.
    let server = Server::start(
        &["--config", &config],
        &[
            "--store",
            &store,
            "--redis",
            &redis_url(),
            "--max-entities",
            "3",
        ],
    );
    let (status, body) = server.features(&three);
    assert_eq!(status, 200, "{body}");
    drop(server);
    // A value out of range in the file is refused, naming the file and the key.
    for (line, key) in [
        ("max_entities = 0", "max_entities"),
        ("log_sample = 1.5", "log_sample"),
        ("serve_workers = 0", "serve_workers"),
    ] {
        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, format!("{line}\n")).unwrap();
        // A Redis URL duet refuses: were the value accepted, `serve` would exit 2 at once for
        // `--redis` instead of serving, and the message check below would fail.
        let out = run(&[
            "--config",
            &bad.display().to_string(),
            "serve",
            "--store",
            "/nonexistent",
            "--redis",
            "nope://redis",
        ]);
        expect_status(&out, 2);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("bad.toml") && err.contains(&format!("`{key}`")),
            "{line}: {err}"
        );
    }
}

#[test]
fn serve_refuses_zero_workers() {
    let out = run(&[
        "serve",
        "--store",
        "/nonexistent",
        "--redis",
        &redis_url(),
        "--workers",
        "0",
    ]);
    expect_status(&out, 2);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--workers"), "{err}");
}
