//! The foundation's surface: `duet spec check`, `duet generate`, and the reference engine.

use crate::common::*;

#[test]
fn spec_check_accepts_the_catalog() {
    let (stdout, _) = expect_status(&run(&["spec", "check"]), 0);
    assert!(
        stdout.contains("view user_realtime (streaming layer"),
        "{stdout}"
    );
    assert!(stdout.contains("spend_pct_rank_30d"), "{stdout}");
    let shipped =
        s(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("shared-spec/catalog.toml"));
    let (again, _) = expect_status(&run(&["spec", "check", "--spec", &shipped]), 0);
    assert_eq!(stdout, again);
}

#[test]
fn spec_check_refuses_a_bad_spec_with_its_location() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    let text = duet_catalog().replace(
        "window = \"90d\"\nresolution = \"1d\"",
        "window = \"90d\"\nresolution = \"7d\"",
    );
    std::fs::write(&path, text).unwrap();
    let (_, stderr) = expect_status(&run(&["spec", "check", "--spec", &s(&path)]), 2);
    let first = stderr.lines().next().unwrap();
    assert!(
        first.starts_with(&format!("duet: {}:", path.display())),
        "{stderr}"
    );
    assert!(
        first.contains("window 90d is not a multiple of its resolution 7d"),
        "{stderr}"
    );

    let (_, stderr) = expect_status(
        &run(&["spec", "check", "--spec", "/nonexistent/spec.toml"]),
        2,
    );
    assert!(stderr.contains("/nonexistent/spec.toml"), "{stderr}");
}

fn duet_catalog() -> String {
    std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("shared-spec/catalog.toml"),
    )
    .unwrap()
}

#[test]
fn generate_is_deterministic_in_both_formats() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.jsonl");
    let b = dir.path().join("b.jsonl");
    for p in [&a, &b] {
        expect_status(
            &run(&[
                "generate",
                "--users",
                "50",
                "--days",
                "5",
                "--seed",
                "9",
                "--out",
                &s(p),
            ]),
            0,
        );
    }
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    let pq = dir.path().join("c.parquet");
    expect_status(
        &run(&[
            "generate",
            "--users",
            "50",
            "--days",
            "5",
            "--seed",
            "9",
            "--out",
            &s(&pq),
        ]),
        0,
    );
    assert!(std::fs::metadata(&pq).unwrap().len() > 1000);
    let (_, stderr) = expect_status(
        &run(&["generate", "--users", "5", "--days", "1", "--out", "x.csv"]),
        2,
    );
    assert!(stderr.contains("--out x.csv"), "{stderr}");
}

#[test]
fn reference_training_set_through_the_binary() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("rows.parquet");
    let (stdout, _) = expect_status(
        &run(&[
            "training-set",
            "--engine",
            "reference",
            "--entities",
            &s(&golden("entities.csv")),
            "--events",
            &s(&golden("events.parquet")),
            "--features",
            "user_realtime:txn_count_1h,spend_pct_rank_30d",
            "--out",
            &s(&out),
        ]),
        0,
    );
    let summary: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(summary["rows"], 2000);
    assert_eq!(
        summary["features"],
        serde_json::json!(["txn_count_1h", "spend_pct_rank_30d"])
    );
    // The golden log's invalid records are counted and written beside the output.
    let invalid = summary["invalid_events"].as_u64().unwrap();
    assert!(invalid > 0, "{summary}");
    let dead = std::fs::read_to_string(format!("{}.dead-letters.jsonl", s(&out))).unwrap();
    assert_eq!(dead.lines().count() as u64, invalid);
    let first: serde_json::Value = serde_json::from_str(dead.lines().next().unwrap()).unwrap();
    assert!(
        first["reason"].is_string() && first["original"].is_string(),
        "{first}"
    );

    let (_, stderr) = expect_status(
        &run(&[
            "training-set",
            "--engine",
            "reference",
            "--entities",
            &s(&golden("entities.csv")),
            "--events",
            &s(&golden("events.parquet")),
            "--features",
            "txn_count_2h",
            "--out",
            &s(&out),
        ]),
        2,
    );
    assert!(
        stderr.contains("unknown feature `txn_count_2h`"),
        "{stderr}"
    );
}

#[test]
fn demo_runs_end_to_end_on_embedded_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(&[
        "demo",
        "--dir",
        &s(&dir.path().join("demo")),
        "--users",
        "300",
        "--days",
        "10",
        "--listen",
        "127.0.0.1:0",
        "--no-serve",
    ]);
    let (stdout, stderr) = expect_status(&out, 0);
    assert!(stderr.contains("[6/6"), "{stderr}");
    assert!(stdout.contains("\"txn_count_90d\""), "{stdout}");
    assert!(stdout.contains("\"session_event_count\""), "{stdout}");
    assert!(stdout.contains("Consistency: PASS"), "{stdout}\n{stderr}");
    assert!(dir.path().join("demo/report/report.html").exists());
    assert!(
        dir.path().join("demo/events/archive").exists(),
        "the speed layer archives what it consumed"
    );
}

/// A taken `--listen` address fails the demo at once, naming the address and the cause, before
/// it generates anything; a malformed one is a usage mistake.
#[test]
fn demo_refuses_a_taken_listen_address_before_its_work() {
    let dir = tempfile::tempdir().unwrap();
    let demo_dir = s(&dir.path().join("demo"));
    for (listen, stderr) in expect_listen_refused(&["demo", "--dir", &demo_dir]) {
        assert!(!stderr.contains("[1/6"), "{listen}: {stderr}");
        assert!(!dir.path().join("demo").exists(), "{listen}");
    }
}

#[test]
fn usage_mistakes_are_one_line_naming_the_flag() {
    let cases: [(&[&str], &str); 4] = [
        (&["batch", "run", "--as-off", "2026-11-20"], "--as-off"),
        (
            &["batch", "run", "--events", "e", "--store", "s"],
            "--as-of",
        ),
        (
            &[
                "speed",
                "run",
                "--exit-when-idle=-1",
                "--brokers",
                "b",
                "--topic",
                "t",
                "--redis",
                "redis://127.0.0.1:1",
            ],
            "--exit-when-idle",
        ),
        (
            &[
                "generate", "--users", "many", "--days", "1", "--out", "x.jsonl",
            ],
            "--users",
        ),
    ];
    for (args, flag) in cases {
        let (_, stderr) = expect_status(&run(args), 2);
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{args:?}: {stderr}");
        assert!(
            lines[0].starts_with("duet: ") && lines[0].contains(flag),
            "{args:?}: {stderr}"
        );
    }
    // Help is still the full text, with success.
    let (stdout, _) = expect_status(&run(&["batch", "run", "--help"]), 0);
    assert!(stdout.contains("--as-of"), "{stdout}");
}

/// The batch, speed and check settings come from a flag, a `DUET_*` variable or the config
/// file, in that order; a value out of range is refused wherever it comes from, naming it.
#[test]
fn settings_come_from_flags_variables_or_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("duet.toml");
    std::fs::write(&config, "retain = 2\nno_progress = true\n").unwrap();
    let config = s(&config);
    let events = s(&golden("events.parquet"));
    // Four days backfilled: the file keeps 2, the variable (above the file) 3, the flag
    // (above both) 4.
    let expired = |store: &str, env: Option<&str>, flag: &[&str]| {
        let mut cmd = duet();
        if let Some(retain) = env {
            cmd.env("DUET_RETAIN", retain);
        }
        let args = [
            &["--config", &config, "batch", "backfill"][..],
            &["--from", "2026-08-01", "--to", "2026-08-04"],
            &["--events", &events, "--store", store],
            flag,
        ]
        .concat();
        let (stdout, _) = expect_status(&cmd.args(&args).output().unwrap(), 0);
        let report: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
        report["expired"].as_array().unwrap().len()
    };
    let store = |name: &str| s(&dir.path().join(name));
    assert_eq!(expired(&store("a"), None, &[]), 2);
    assert_eq!(expired(&store("b"), Some("3"), &[]), 1);
    assert_eq!(expired(&store("c"), Some("3"), &["--retain", "4"]), 0);

    // Out of range in the file: refused, naming the file and the key. Each command is given
    // a Redis URL or store it would refuse next, so a value let through fails the check on
    // the message.
    let speed = [
        "speed",
        "run",
        "--brokers",
        "127.0.0.1:1",
        "--topic",
        "t",
        "--redis",
        "nope://redis",
    ];
    let check = [
        "check",
        "--events",
        "/nonexistent",
        "--store",
        "/nonexistent",
        "--redis",
        "nope://redis",
        "--report",
        "/nonexistent/report",
    ];
    let backfill = [
        "batch",
        "backfill",
        "--from",
        "2026-08-01",
        "--to",
        "2026-08-02",
        "--events",
        "/nonexistent",
        "--store",
        "/nonexistent",
    ];
    let cases: [(&str, &str, &[&str]); 5] = [
        ("max_batch = 0", "max_batch", &speed),
        ("flush_ms = 0", "flush_ms", &speed),
        ("exit_when_idle = -1.0", "exit_when_idle", &speed),
        ("max_mismatch_rate = 1.5", "max_mismatch_rate", &check),
        ("retain = 0", "retain", &backfill),
    ];
    let bad = dir.path().join("bad.toml");
    for (line, key, args) in cases {
        std::fs::write(&bad, format!("{line}\n")).unwrap();
        let out = run(&[&["--config", &s(&bad)][..], args].concat());
        let (_, stderr) = expect_status(&out, 2);
        assert!(
            stderr.contains("bad.toml") && stderr.contains(&format!("`{key}` =")),
            "{line}: {stderr}"
        );
    }
    // A flag or variable is used instead of the file's value, which is then not even checked:
    // these runs get past the settings and fail on the Redis URL or the store.
    // (the file's line, a flag, a variable, the command)
    type Overridden<'a> = (
        &'a str,
        &'a [&'a str],
        Option<(&'a str, &'a str)>,
        &'a [&'a str],
    );
    let overridden: [Overridden<'_>; 5] = [
        ("max_batch = 0", &["--max-batch", "10"], None, &speed),
        ("flush_ms = 0", &[], Some(("DUET_FLUSH_MS", "20")), &speed),
        (
            "exit_when_idle = -1.0",
            &["--exit-when-idle", "1"],
            None,
            &speed,
        ),
        (
            "max_mismatch_rate = 1.5",
            &[],
            Some(("DUET_MAX_MISMATCH_RATE", "0.5")),
            &check,
        ),
        ("retain = 0", &["--retain", "3"], None, &backfill),
    ];
    for (line, flag, var, args) in overridden {
        std::fs::write(&bad, format!("{line}\n")).unwrap();
        let mut cmd = duet();
        if let Some((name, value)) = var {
            cmd.env(name, value);
        }
        let out = cmd
            .args([&["--config", &s(&bad)][..], args, flag].concat())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.code() != Some(0) && !stderr.contains("bad.toml"),
            "{line}: {stderr}"
        );
    }
    // `no_progress` takes any boolean spelling from the variable, and the flag can say false.
    let d = store("d");
    for (var, flag) in [
        (Some("yes"), None),
        (Some("0"), None),
        (None, Some("--no-progress=false")),
    ] {
        let mut cmd = duet();
        if let Some(value) = var {
            cmd.env("DUET_NO_PROGRESS", value);
        }
        let args = [
            &["--config", &config, "batch", "run", "--as-of", "2026-08-01"][..],
            &["--events", &events, "--store", &d],
            flag.as_slice(),
        ]
        .concat();
        expect_status(&cmd.args(&args).output().unwrap(), 0);
    }
    // `log_json` from the file (read before logging starts), overridden by the variable or
    // `--log-json=false`; the variable alone also turns it on, and a bare `--log-json` (before
    // the command or after it) beats a variable that says no.
    let json_config = dir.path().join("json.toml");
    std::fs::write(&json_config, "log_json = true\n").unwrap();
    let json_config = s(&json_config);
    for (file, var, flag, json) in [
        (true, None, None, true),
        (true, Some("no"), None, false),
        (true, None, Some("--log-json=false"), false),
        (false, Some("1"), None, true),
        (false, None, None, false),
        (false, Some("0"), Some("--log-json"), true),
        (false, Some("off"), Some("before"), true),
    ] {
        let mut cmd = duet();
        if let Some(value) = var {
            cmd.env("DUET_LOG_JSON", value);
        }
        if file {
            cmd.args(["--config", &json_config]);
        }
        let (flag, before) = match flag {
            Some("before") => (None, true),
            other => (other, false),
        };
        if before {
            cmd.arg("--log-json");
        }
        let args = [
            &["batch", "run", "--as-of", "2026-08-01"][..],
            &["--events", &events, "--store", &d],
            flag.as_slice(),
        ]
        .concat();
        let (_, stderr) = expect_status(&cmd.args(&args).output().unwrap(), 0);
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert!(!lines.is_empty(), "no log lines");
        for line in lines {
            let parsed =
                serde_json::from_str::<serde_json::Value>(line).is_ok_and(|v| v.is_object());
            assert_eq!(parsed, json, "{file} {var:?} {flag:?}: {line}");
        }
    }
    // A config file that can be read only once (a pipe): its `log_json` and its locations
    // both apply.
    let mut child = duet()
        .args([
            "--config",
            "/dev/stdin",
            "batch",
            "run",
            "--as-of",
            "2026-08-01",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        write!(
            stdin,
            "log_json = true\nevents = {:?}\nstore = {:?}\n",
            events,
            store("e")
        )
        .unwrap();
    }
    let (_, stderr) = expect_status(&child.wait_with_output().unwrap(), 0);
    assert!(
        !stderr.trim().is_empty()
            && stderr
                .lines()
                .all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()),
        "{stderr}"
    );
    // Out of range in a variable: refused, naming its flag.
    for (var, value, flag, args) in [
        ("DUET_MAX_BATCH", "0", "--max-batch", &speed[..]),
        ("DUET_FLUSH_MS", "x", "--flush-ms", &speed),
        (
            "DUET_MAX_MISMATCH_RATE",
            "-0.1",
            "--max-mismatch-rate",
            &check,
        ),
        ("DUET_RETAIN", "0", "--retain", &backfill),
        ("DUET_NO_PROGRESS", "maybe", "--no-progress", &backfill),
        ("DUET_LOG_JSON", "maybe", "--log-json", &backfill),
        ("DUET_EXIT_WHEN_IDLE", "-1", "--exit-when-idle", &speed),
    ] {
        let out = duet().env(var, value).args(args).output().unwrap();
        let (_, stderr) = expect_status(&out, 2);
        assert!(stderr.contains(flag), "{var}={value}: {stderr}");
    }
}
