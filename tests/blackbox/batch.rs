//! `duet batch` as cron sees it: snapshots published atomically on local disk and on a real
//! S3 server, idempotent reruns, retention, a lease, refused redefinitions, and clear errors
//! naming bad inputs — never a partial snapshot.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::*;

fn events() -> String {
    s(&golden("events.parquet"))
}

fn batch_run(as_of: &str, events: &str, store: &str, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "batch",
        "run",
        "--as-of",
        as_of,
        "--events",
        events,
        "--store",
        store,
        "--no-progress",
    ];
    args.extend_from_slice(extra);
    run(&args)
}

/// The published manifests of `user_batch` under a local store, as a reader sees them: a name
/// with `#` is a write object_store has staged and not yet renamed into place (a job killed
/// mid-write leaves one), which its listings skip.
fn commits(store: &Path) -> Vec<serde_json::Value> {
    let dir = store.join("snapshots/user_batch/commits");
    let mut out: Vec<serde_json::Value> = std::fs::read_dir(&dir)
        .map(|d| {
            d.map(|e| e.unwrap().path())
                .filter(|p| !p.to_string_lossy().contains('#'))
                .map(|p| serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap())
                .collect()
        })
        .unwrap_or_default();
    out.sort_by_key(|m: &serde_json::Value| m["as_of_ms"].as_i64().unwrap());
    out
}

fn data_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(data_files(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Every published manifest points to a complete, readable data file with its row count.
fn assert_store_consistent(store: &Path) {
    for m in commits(store) {
        let data = store.join(m["data"].as_str().unwrap());
        let batch = crate::speed::read_parquet(&data);
        assert_eq!(batch.num_rows() as u64, m["rows"].as_u64().unwrap(), "{m}");
    }
}

#[test]
fn run_publishes_a_manifest_and_reruns_replace_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let (stdout, _) = expect_status(&batch_run("2026-09-01", &events(), &s(&store), &[]), 0);
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(report["snapshots"][0]["as_of"], "2026-09-01T00:00:00.000Z");
    let m = &commits(&store)[0];
    for key in [
        "spec_version",
        "spec_fingerprint",
        "rows",
        "inputs",
        "invalid",
        "duplicates",
        "duration_ms",
        "as_of",
    ] {
        assert!(!m[key].is_null(), "manifest lacks {key}: {m}");
    }
    assert_eq!(m["invalid_total"], 39);
    assert!(m["duplicates"].as_u64().unwrap() > 0);
    assert_eq!(
        m["inputs"][0]["size"],
        std::fs::metadata(golden("events.parquet")).unwrap().len()
    );
    let dead = store.join(report["dead_letters"].as_str().unwrap());
    assert_eq!(std::fs::read_to_string(dead).unwrap().lines().count(), 39);
    // Rerunning the same instant replaces the snapshot; the old data is cleaned up.
    expect_status(&batch_run("2026-09-01", &events(), &s(&store), &[]), 0);
    let again = commits(&store);
    assert_eq!(again.len(), 1);
    assert_ne!(again[0]["run_id"], m["run_id"]);
    let files = data_files(&store.join("snapshots/user_batch/runs"));
    assert_eq!(
        files.len(),
        1,
        "the replaced run's data is deleted: {files:?}"
    );
    assert_store_consistent(&store);
}

#[test]
fn backfill_and_retention() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let (stdout, _) = expect_status(
        &run(&[
            "batch",
            "backfill",
            "--from",
            "2026-08-01",
            "--to",
            "2026-08-10",
            "--events",
            &events(),
            "--store",
            &s(&store),
            "--retain",
            "4",
            "--no-progress",
        ]),
        0,
    );
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(report["snapshots"].as_array().unwrap().len(), 10);
    assert_eq!(report["expired"].as_array().unwrap().len(), 6);
    let kept: Vec<String> = commits(&store)
        .iter()
        .map(|m| m["as_of"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        kept,
        [
            "2026-08-07T00:00:00.000Z",
            "2026-08-08T00:00:00.000Z",
            "2026-08-09T00:00:00.000Z",
            "2026-08-10T00:00:00.000Z"
        ]
    );
    assert_store_consistent(&store);
}

#[test]
fn bad_inputs_are_named_and_publish_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let bad = dir.path().join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::copy(golden("events.parquet"), bad.join("a.parquet")).unwrap();
    std::fs::write(bad.join("b.parquet"), b"PAR1 this is not parquet").unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "run".into(),
                "--as-of".into(),
                "2026-09-01".into(),
                "--events".into(),
                s(&bad),
            ],
            "b.parquet: not a readable Parquet file",
        ),
        (
            vec![
                "run".into(),
                "--as-of".into(),
                "2026-09-01".into(),
                "--events".into(),
                s(&dir.path().join("nowhere")),
            ],
            "no event files found",
        ),
        (
            vec![
                "run".into(),
                "--as-of".into(),
                "2999-01-01".into(),
                "--events".into(),
                events(),
            ],
            "is in the future",
        ),
        (
            vec![
                "run".into(),
                "--as-of".into(),
                "yesterday".into(),
                "--events".into(),
                events(),
            ],
            "--as-of `yesterday`",
        ),
        (
            vec![
                "backfill".into(),
                "--from".into(),
                "2026-09-10".into(),
                "--to".into(),
                "2026-09-01".into(),
                "--events".into(),
                events(),
            ],
            "--from 2026-09-10T00:00:00.000Z is after --to",
        ),
    ];
    for (args, msg) in cases {
        let mut full: Vec<String> = vec!["batch".into()];
        full.extend(args);
        full.extend(["--store".into(), s(&store), "--no-progress".into()]);
        let argv: Vec<&str> = full.iter().map(String::as_str).collect();
        let (_, stderr) = expect_status(&run(&argv), 2);
        let cause = stderr.trim().lines().last().unwrap_or_default();
        assert!(
            cause.starts_with("duet: ") && cause.contains(msg),
            "one-line cause naming the input: {argv:?}: {stderr}"
        );
    }
    assert!(commits(&store).is_empty(), "nothing may be published");
    // Garbage lines in JSON are counted and skipped, not fatal.
    let json = dir.path().join("events.jsonl");
    std::fs::write(&json, "{\"event_id\":\"a\",\"user_id\":\"u\",\"event_type\":\"purchase\",\"amount\":5,\"ts\":\"2026-08-30T10:00:00Z\"}\n\u{1}garbage\n{\"broken\": \n").unwrap();
    let (stdout, _) = expect_status(&batch_run("2026-09-01", &s(&json), &s(&store), &[]), 0);
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(report["invalid"]["invalid_json"], 2);
    assert_eq!(report["snapshots"][0]["rows"], 1);
    // An empty log publishes an empty snapshot (the entities simply have no history).
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    std::fs::write(empty.join("none.jsonl"), "").unwrap();
    let (stdout, _) = expect_status(&batch_run("2026-09-02", &s(&empty), &s(&store), &[]), 0);
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(report["snapshots"][0]["rows"], 0);
}

#[test]
fn a_changed_definition_needs_a_new_version() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    expect_status(&batch_run("2026-09-01", &events(), &s(&store), &[]), 0);
    let catalog = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("shared-spec/catalog.toml"),
    )
    .unwrap();
    let changed = dir.path().join("changed.toml");
    std::fs::write(
        &changed,
        catalog.replace(
            "value = \"min(amount, 1000)\"",
            "value = \"min(amount, 500)\"",
        ),
    )
    .unwrap();
    let (_, stderr) = expect_status(
        &run(&[
            "--spec",
            &s(&changed),
            "batch",
            "run",
            "--as-of",
            "2026-09-02",
            "--events",
            &events(),
            "--store",
            &s(&store),
            "--no-progress",
        ]),
        2,
    );
    assert!(
        stderr.contains(
            "feature `avg_txn_amount_30d_v2` of view `user_batch` has changed definition"
        ),
        "{stderr}"
    );
    assert!(stderr.contains("`version = 3`"), "{stderr}");
    let versioned = dir.path().join("versioned.toml");
    let v3 = catalog.replace(
        "[[view.feature]]\nname = \"max_txn_amount_90d\"",
        "[[view.feature]]\nname = \"avg_txn_amount_30d\"\nversion = 3\naggregation = \"mean\"\nvalue = \"min(amount, 500)\"\nwhere = { event_type = [\"purchase\"] }\nwindow = \"30d\"\nresolution = \"1d\"\n\n[[view.feature]]\nname = \"max_txn_amount_90d\"",
    );
    std::fs::write(&versioned, v3).unwrap();
    expect_status(
        &run(&[
            "--spec",
            &s(&versioned),
            "batch",
            "run",
            "--as-of",
            "2026-09-02",
            "--events",
            &events(),
            "--store",
            &s(&store),
            "--no-progress",
        ]),
        0,
    );
    let latest = commits(&store).pop().unwrap();
    let names: Vec<&str> = latest["features"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"avg_txn_amount_30d_v2") && names.contains(&"avg_txn_amount_30d_v3"),
        "{names:?}"
    );
}

#[test]
fn concurrent_runs_are_refused_by_the_lease() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let first = duet()
        .args([
            "batch",
            "backfill",
            "--from",
            "2026-07-01",
            "--to",
            "2026-09-30",
            "--events",
            &events(),
            "--store",
            &s(&store),
            "--no-progress",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let lease = store.join("_lease/batch.json");
    for _ in 0..200 {
        if lease.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(lease.exists(), "the first run takes the lease");
    let (_, stderr) = expect_status(&batch_run("2026-09-01", &events(), &s(&store), &[]), 1);
    assert!(
        stderr.contains("another batch job holds the lease"),
        "{stderr}"
    );
    let out = first.wait_with_output().unwrap();
    assert!(out.status.success());
    assert!(!lease.exists(), "the lease is released");
    assert_store_consistent(&store);
}

#[test]
fn kill_9_at_any_instant_never_leaves_a_partial_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    expect_status(
        &run(&[
            "batch",
            "backfill",
            "--from",
            "2026-08-01",
            "--to",
            "2026-08-03",
            "--events",
            &events(),
            "--store",
            &s(&store),
            "--no-progress",
        ]),
        0,
    );
    let before = commits(&store);
    for delay in [50u64, 150, 300, 450, 700, 1000, 1400] {
        let mut child = duet()
            .args([
                "batch",
                "backfill",
                "--from",
                "2026-08-01",
                "--to",
                "2026-09-30",
                "--events",
                &events(),
                "--store",
                &s(&store),
                "--no-progress",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay));
        let _ = child.kill();
        let _ = child.wait();
        assert_store_consistent(&store);
        assert!(commits(&store).len() >= before.len());
    }
    // The dead runs' lease is taken over at once (same host, dead pid) and the store heals.
    expect_status(
        &run(&[
            "batch",
            "backfill",
            "--from",
            "2026-08-01",
            "--to",
            "2026-08-05",
            "--events",
            &events(),
            "--store",
            &s(&store),
            "--no-progress",
        ]),
        0,
    );
    assert_store_consistent(&store);
}

/// A private s3s-fs on a free port, killed on drop.
struct S3 {
    child: std::process::Child,
    endpoint: String,
    root: tempfile::TempDir,
}

impl S3 {
    fn start() -> S3 {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("duet")).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("s3s-fs")
            .args([
                "--host",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--access-key",
                "test",
                "--secret-key",
                "testtest",
                &s(root.path()),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("s3s-fs is installed (scripts/test installs it)");
        let endpoint = format!("http://127.0.0.1:{port}");
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        S3 {
            child,
            endpoint,
            root,
        }
    }

    fn env(&self, c: &mut Command) {
        c.env("AWS_ENDPOINT_URL", &self.endpoint)
            .env("AWS_ALLOW_HTTP", "true")
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "testtest")
            .env("AWS_REGION", "us-east-1");
    }
}

impl Drop for S3 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_same_on_a_real_s3_server_and_a_clear_error_when_it_stops() {
    let s3 = S3::start();
    std::fs::create_dir_all(s3.root.path().join("duet/events")).unwrap();
    std::fs::copy(
        golden("events.parquet"),
        s3.root.path().join("duet/events/part-0.parquet"),
    )
    .unwrap();
    let mut c = duet();
    s3.env(&mut c);
    let out = c
        .args([
            "batch",
            "backfill",
            "--from",
            "2026-08-30",
            "--to",
            "2026-09-01",
            "--events",
            "s3://duet/events",
            "--store",
            "s3://duet/store",
            "--no-progress",
        ])
        .output()
        .unwrap();
    let (stdout, _) = expect_status(&out, 0);
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(report["snapshots"].as_array().unwrap().len(), 3);
    assert_eq!(
        report["invalid"]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_u64().unwrap())
            .sum::<u64>(),
        39
    );
    let local = s3.root.path().join("duet/store");
    assert_eq!(commits(&local).len(), 3);
    assert_store_consistent(&local);
    // Training rows read the snapshots back from S3 and match the golden answer.
    let out_path = tempfile::tempdir().unwrap();
    let rows = out_path.path().join("rows.parquet");
    let mut c = duet();
    s3.env(&mut c);
    let out = c
        .args([
            "training-set",
            "--entities",
            &s(&golden("entities.parquet")),
            "--events",
            "s3://duet/events",
            "--store",
            "s3://duet/store",
            "--features",
            "txn_count_90d,spend_pct_rank_30d",
            "--out",
            &s(&rows),
        ])
        .output()
        .unwrap();
    expect_status(&out, 0);

    // Stop the server: listing, reading and writing fail; the command says so and publishes nothing.
    let endpoint = s3.endpoint.clone();
    drop(s3);
    let mut c = duet();
    c.env("AWS_ENDPOINT_URL", &endpoint)
        .env("AWS_ALLOW_HTTP", "true")
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "testtest")
        .env("AWS_REGION", "us-east-1");
    let out = c
        .args([
            "batch",
            "run",
            "--as-of",
            "2026-09-02",
            "--events",
            "s3://duet/events",
            "--store",
            "s3://duet/store",
            "--no-progress",
        ])
        .output()
        .unwrap();
    let (_, stderr) = expect_status(&out, 1);
    let cause = stderr.trim().lines().last().unwrap_or_default();
    assert!(
        cause.starts_with("duet: ")
            && (cause.contains("s3://duet/store") || cause.contains("s3://duet/events")),
        "{stderr}"
    );
}
