//! `duet check` names exactly the entities and features that known faults break, with the
//! right cause, and passes (exit 0) on clean data.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use duet_spec::duration::{DAY_MS, MINUTE_MS};
use duet_spec::event::parse_json_event;
use duet_spec::generate::{GenerateOptions, generate, write_jsonl, write_parquet};
use duet_spec::timestamp::format_ms;

use crate::common::*;
use crate::http::Server;
use crate::kafka::*;
use crate::speed::{speed_run, wait_ok};

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

struct World {
    lines: Vec<Vec<u8>>,
    now: i64,
}

/// Two days of events for 40 users ending five minutes ago, written to `dir/events`.
fn world(dir: &Path) -> World {
    let now = now_ms();
    let mut opts = GenerateOptions::new(40, 2, now - 5 * MINUTE_MS, 77);
    opts.events = Some(8000);
    let records = generate(&opts);
    std::fs::create_dir_all(dir.join("events")).unwrap();
    write_parquet(
        &records,
        77,
        std::fs::File::create(dir.join("events/log.parquet")).unwrap(),
    )
    .unwrap();
    let mut buf = Vec::new();
    write_jsonl(&records, 77, &mut buf).unwrap();
    let lines = buf
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(<[u8]>::to_vec)
        .collect();
    World { lines, now }
}

fn user_of(line: &[u8]) -> Option<(String, i64)> {
    parse_json_event(line)
        .ok()
        .map(|e| (e.user_id.into_owned(), e.ts))
}

fn check(
    dir: &Path,
    store: &str,
    prefix: &str,
    topic: &str,
    report: &Path,
) -> (i32, serde_json::Value) {
    let out = run(&[
        "check",
        "--as-of",
        &format_ms(now_ms()),
        "--events",
        &s(&dir.join("events")),
        "--store",
        store,
        "--redis",
        &redis_url(),
        "--prefix",
        prefix,
        "--report",
        &s(report),
        "--brokers",
        &brokers(),
        "--topic",
        topic,
    ]);
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(report.join("report.json")).unwrap())
            .unwrap();
    assert!(report.join("report.html").exists());
    (out.status.code().unwrap(), json)
}

/// `(entity, cause)` of every mismatching example per feature of a report section.
fn flagged(section: &serde_json::Value) -> BTreeMap<String, BTreeSet<(String, String)>> {
    let mut out = BTreeMap::new();
    for f in section["features"].as_array().unwrap() {
        let examples: BTreeSet<(String, String)> = f["examples"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["entity"].as_str().unwrap().to_string(),
                    e["cause"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        if !examples.is_empty() {
            out.insert(f["feature"].as_str().unwrap().to_string(), examples);
        }
    }
    out
}

fn publish(dir: &Path, store: &str, as_of: i64) {
    expect_status(
        &run(&[
            "batch",
            "run",
            "--as-of",
            &format_ms(as_of),
            "--events",
            &s(&dir.join("events")),
            "--store",
            store,
            "--no-progress",
        ]),
        0,
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn check_names_injected_faults_and_passes_clean_data() {
    let dir = tempfile::tempdir().unwrap();
    let w = world(dir.path());
    let today = w.now / DAY_MS * DAY_MS;
    let recent: BTreeSet<String> = w
        .lines
        .iter()
        .filter_map(|l| user_of(l))
        .filter(|(_, ts)| *ts > w.now - 45 * MINUTE_MS)
        .map(|(u, _)| u)
        .collect();
    let mut picks = recent.into_iter();
    let (a, b, c, d) = (
        picks.next().unwrap(),
        picks.next().unwrap(),
        picks.next().unwrap(),
        picks.next().unwrap(),
    );

    // Clean run first: everything reaches Kafka, snapshots are current.
    let clean_topic = unique("check-clean");
    let clean_prefix = format!("{}:", unique("clean"));
    let clean_store = s(&dir.path().join("clean-store"));
    create_topic(&clean_topic, 2).await;
    produce(&clean_topic, &crate::speed::keyed(&w.lines)).await;
    wait_ok(
        speed_run(
            &clean_topic,
            &unique("g"),
            &clean_prefix,
            &["--exit-when-idle", "2"],
        ),
        Duration::from_secs(180),
    );
    publish(dir.path(), &clean_store, today);
    let (code, report) = check(
        dir.path(),
        &clean_store,
        &clean_prefix,
        &clean_topic,
        &dir.path().join("clean-report"),
    );
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["ok"], true);
    assert!(
        flagged(&report["state"]).is_empty(),
        "{:#}",
        report["state"]
    );
    assert!(report["state"]["items"].as_u64().unwrap() >= 4);

    // Faulty run.
    let topic = unique("check-faults");
    let prefix = format!("{}:", unique("faults"));
    let store = s(&dir.path().join("store"));
    create_topic(&topic, 2).await;
    // Fault 1: A's last 50 minutes are in the log but never reach Kafka.
    let sent: Vec<Vec<u8>> = w
        .lines
        .iter()
        .filter(|l| !user_of(l).is_some_and(|(u, ts)| u == a && ts > w.now - 50 * MINUTE_MS))
        .cloned()
        .collect();
    produce(&topic, &crate::speed::keyed(&sent)).await;
    // Fault 3: very late purchases of C, sent after the watermark passed them.
    let late_ts = w.now - 40 * MINUTE_MS;
    let late: Vec<Vec<u8>> = (0..3)
        .map(|i| format!("{{\"event_id\": \"late-{i}\", \"user_id\": \"{c}\", \"event_type\": \"purchase\", \"amount\": {}.5, \"ts\": {}}}", 10 + i, late_ts + i * 1000).into_bytes())
        .collect();
    let group = unique("g");
    wait_ok(
        speed_run(&topic, &group, &prefix, &["--exit-when-idle", "2"]),
        Duration::from_secs(180),
    );
    produce(&topic, &crate::speed::keyed(&late)).await;
    wait_ok(
        speed_run(&topic, &group, &prefix, &["--exit-when-idle", "2"]),
        Duration::from_secs(180),
    );
    std::fs::write(dir.path().join("events/late.jsonl"), late.join(&b'\n')).unwrap();
    // Fault 2: B's state is overwritten with garbage.
    let client = redis::Client::open(redis_url()).unwrap();
    let mut con = client.get_connection().unwrap();
    let mut garbage = 1u64.to_be_bytes().to_vec();
    garbage.extend_from_slice(b"\x07not a state");
    let _: () = redis::cmd("SET")
        .arg(duet_speed::processor::state_key(&prefix, &b))
        .arg(garbage)
        .query(&mut con)
        .unwrap();
    // Fault 4: D is served from yesterday's snapshot, today's is published afterwards.
    publish(dir.path(), &store, today - DAY_MS);
    {
        let server = Server::over(&store, &prefix, &["--log-sample", "1"]);
        let (status, body) = server.request("GET", &format!("/v1/features/{d}"), None, &[]);
        assert_eq!(status, 200, "{body}");
        server.stop_gracefully();
    }
    publish(dir.path(), &store, today);

    let (code, report) = check(
        dir.path(),
        &store,
        &prefix,
        &topic,
        &dir.path().join("report"),
    );
    assert_eq!(code, 1, "a broken feature must fail the check");
    assert_eq!(report["ok"], false);
    let state = flagged(&report["state"]);
    let mut by_entity: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for examples in state.values() {
        for (e, cause) in examples {
            by_entity
                .entry(e.clone())
                .or_default()
                .insert(cause.clone());
        }
    }
    assert_eq!(
        by_entity.keys().cloned().collect::<BTreeSet<_>>(),
        [a.clone(), b.clone(), c.clone()].into_iter().collect(),
        "{state:#?}"
    );
    assert_eq!(
        by_entity[&a],
        ["not_in_kafka".to_string()].into_iter().collect(),
        "{state:#?}"
    );
    assert_eq!(
        by_entity[&b],
        ["corrupt_state".to_string()].into_iter().collect(),
        "{state:#?}"
    );
    assert_eq!(
        by_entity[&c],
        ["late_events".to_string()].into_iter().collect(),
        "{state:#?}"
    );
    assert_eq!(
        state.len(),
        6,
        "B's corruption breaks every streaming feature: {state:#?}"
    );
    let served = flagged(&report["served"]);
    assert!(!served.is_empty(), "the stale snapshot must show");
    for (feature, examples) in &served {
        assert!(
            ![
                "txn_count_1h",
                "txn_sum_1h",
                "event_count_10m",
                "session_event_count",
                "session_duration_s",
                "last_purchase_amount"
            ]
            .contains(&feature.as_str()),
            "{served:#?}"
        );
        assert_eq!(
            examples,
            &[(d.clone(), "stale_snapshot".to_string())]
                .into_iter()
                .collect(),
            "{served:#?}"
        );
    }
    clean_redis(&prefix);
    clean_redis(&clean_prefix);
}
