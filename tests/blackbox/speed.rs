//! The speed layer against a real Kafka-protocol broker (tansu; librdkafka's own broker where
//! records must be deleted) and a real Redis: exactly once across kill -9 and restarts, shared
//! partitions, bad input that never stalls it, and messages deleted before it read them.

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use arrow::array::{Array, AsArray};
use arrow::datatypes::{Float64Type, Int64Type};
use duet_spec::event::parse_json_event;
use duet_spec::generate::{GenerateOptions, generate, write_jsonl};
use duet_spec::reference::Reference;
use duet_spec::{Layer, Value};

use crate::common::*;
use crate::kafka::*;

const HOUR: i64 = 3_600_000;

/// Generated JSON lines (with duplicates and invalid records) and the valid events among them.
pub fn generated(
    users: u64,
    events: u64,
    end_ms: i64,
    seed: u64,
) -> (Vec<Vec<u8>>, Vec<duet_spec::event::Event>) {
    let mut opts = GenerateOptions::new(users, 1, end_ms, seed);
    opts.events = Some(events);
    let mut buf = Vec::new();
    write_jsonl(&generate(&opts), seed, &mut buf).unwrap();
    let lines: Vec<Vec<u8>> = buf
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(<[u8]>::to_vec)
        .collect();
    let valid = lines
        .iter()
        .filter_map(|l| parse_json_event(l).ok())
        .map(|e| e.to_event())
        .collect();
    (lines, valid)
}

/// Records keyed by their user (or unkeyed when the line has none).
pub fn keyed(lines: &[Vec<u8>]) -> Vec<(Option<String>, Vec<u8>)> {
    lines
        .iter()
        .map(|l| {
            (
                parse_json_event(l).ok().map(|e| e.user_id.into_owned()),
                l.clone(),
            )
        })
        .collect()
}

pub fn speed_run(topic: &str, group: &str, prefix: &str, extra: &[&str]) -> Child {
    speed_run_at(&brokers(), topic, group, prefix, extra)
}

/// [`speed_run`] against the broker at `brokers`.
pub fn speed_run_at(
    brokers: &str,
    topic: &str,
    group: &str,
    prefix: &str,
    extra: &[&str],
) -> Child {
    let mut c = duet();
    c.args([
        "speed",
        "run",
        "--brokers",
        brokers,
        "--topic",
        topic,
        "--group",
        group,
        "--redis",
        &redis_url(),
        "--prefix",
        prefix,
    ])
    .args(extra)
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    c.spawn().expect("duet speed run starts")
}

/// Waits for a speed run to end well, and returns its stderr.
pub fn wait_ok(mut child: Child, limit: Duration) -> String {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            use std::io::Read;
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            assert!(status.success(), "speed run failed ({status}):\n{err}");
            return err;
        }
        if start.elapsed() > limit {
            child.kill().unwrap();
            let out = child.wait_with_output().unwrap();
            panic!(
                "speed run did not finish within {limit:?}:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Dumps streaming state as of `t` and compares every feature of every user with the reference.
pub fn assert_state_matches(prefix: &str, valid: Vec<duet_spec::event::Event>, t: i64, dir: &Path) {
    assert_state_matches_under(None, prefix, valid, t, dir)
}

/// [`assert_state_matches`] for the spec at `spec` (`None`: the catalog).
pub fn assert_state_matches_under(
    spec_path: Option<&Path>,
    prefix: &str,
    valid: Vec<duet_spec::event::Event>,
    t: i64,
    dir: &Path,
) {
    let spec = duet_spec::load_spec(spec_path).unwrap();
    let out = dir.join(format!("{}.parquet", prefix.trim_end_matches(':')));
    let as_of = duet_spec::timestamp::format_ms(t);
    let mut args = vec![
        "speed".to_string(),
        "dump".into(),
        "--redis".into(),
        redis_url(),
        "--prefix".into(),
        prefix.into(),
        "--as-of".into(),
        as_of.clone(),
        "--out".into(),
        s(&out),
    ];
    if let Some(path) = spec_path {
        args.extend(["--spec".into(), s(path)]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (stdout, _) = expect_status(&run(&args), 0);
    let summary: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(summary["inexact"], 0, "{summary}");
    assert_eq!(summary["corrupt"], serde_json::json!([]), "{summary}");
    let batch = read_parquet(&out);
    let users: Vec<String> = valid
        .iter()
        .map(|e| e.user_id.to_string())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let reference = Reference::new(&spec, valid);
    let keys = batch.column(0).as_string::<i32>();
    let rows: std::collections::HashMap<&str, usize> =
        (0..batch.num_rows()).map(|i| (keys.value(i), i)).collect();
    let mut compared = 0;
    for (view, f) in spec.features().filter(|(v, _)| v.layer == Layer::Streaming) {
        let _ = view;
        let col = batch.column_by_name(&f.name).unwrap();
        for u in &users {
            let expected = reference.value(f, u, t);
            let got = match rows.get(u.as_str()) {
                None => f.default,
                Some(&i) if col.is_null(i) => Value::Null,
                Some(&i) => match expected {
                    Value::Int(_) => Value::Int(col.as_primitive::<Int64Type>().value(i)),
                    _ => Value::Float(col.as_primitive::<Float64Type>().value(i)),
                },
            };
            let ok = match (expected, got) {
                (Value::Float(a), Value::Float(b)) => (a - b).abs() <= 1e-9 * a.abs().max(1.0),
                (Value::Int(a), Value::Float(b)) => a as f64 == b,
                (a, b) => a == b,
            };
            assert!(
                ok,
                "{} of {u} as of {as_of}: reference {expected:?}, speed layer {got:?}",
                f.name
            );
            compared += 1;
        }
    }
    assert!(compared > 100, "{compared}");
}

pub fn read_parquet(path: &Path) -> arrow::record_batch::RecordBatch {
    let file = std::fs::File::open(path).unwrap();
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap();
    let batches: Vec<_> = reader.map(Result::unwrap).collect();
    arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap()
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

#[tokio::test(flavor = "multi_thread")]
async fn exactly_once_across_kill_9_restarts() {
    let topic = unique("speed-kill");
    let prefix = format!("{}:", unique("kill"));
    create_topic(&topic, 3).await;
    let end = now_ms() - HOUR;
    let (lines, valid) = generated(300, 40_000, end, 11);
    produce_unbatched(&topic, &keyed(&lines)).await;
    let group = unique("g");
    // Kill the process at arbitrary instants: mid-batch, mid-write, mid-commit.
    for (i, pause) in [700u64, 1300, 450, 1900, 900].iter().enumerate() {
        let mut child = speed_run(&topic, &group, &prefix, &[]);
        std::thread::sleep(Duration::from_millis(*pause + 400 * i as u64));
        child.kill().unwrap();
        child.wait().unwrap();
    }
    // The killed members leave the group when the broker's session timeout (10 s) expires.
    // One still listed as a member holds its partitions until then, and the last run may be
    // caught up and idle without them: it runs again until the group has consumed them all.
    std::thread::sleep(Duration::from_secs(11));
    for runs in 1.. {
        wait_ok(
            speed_run(&topic, &group, &prefix, &["--exit-when-idle", "2"]),
            Duration::from_secs(180),
        );
        if group_caught_up(&topic, &group, 3) {
            break;
        }
        assert!(runs < 4, "{runs} runs left partitions unconsumed");
    }
    let dir = tempfile::tempdir().unwrap();
    let t = valid.iter().map(|e| e.ts).max().unwrap() + 1;
    assert_state_matches(&prefix, valid.clone(), t, dir.path());
    assert_state_matches(&prefix, valid.clone(), t + 25 * 60_000, dir.path());
    // Long before the watermark, where the states no longer hold the events: the histories
    // the killed processes appended to answer, exactly once.
    let mut times: Vec<i64> = valid.iter().map(|e| e.ts).collect();
    times.sort();
    assert_state_matches(&prefix, valid, times[times.len() / 3], dir.path());
    clean_redis(&prefix);
}

/// Members joining a group one after another while its first members still consume: every
/// join takes each member's partitions back and hands them out again, mid-stream. A member
/// whose new assignment's first messages arrived before it handled the revocation (in the same
/// turn of its loop) dropped them with the revoked partitions' buffered messages, and never
/// read them again. The records are produced one per record batch: tansu answers a fetch from
/// inside a batch with the batches after it (see `produce_unbatched`).
#[tokio::test(flavor = "multi_thread")]
async fn rebalances_while_consuming_lose_no_message() {
    let topic = unique("speed-rebalance");
    let prefix = format!("{}:", unique("rebalance"));
    create_topic(&topic, 6).await;
    let end = now_ms() - HOUR;
    let (lines, valid) = generated(300, 60_000, end, 17);
    produce_unbatched(&topic, &keyed(&lines)).await;
    let group = unique("g");
    // Small batches, so that consuming outlasts the joins.
    let args = ["--exit-when-idle", "3", "--max-batch", "50"];
    let mut members = Vec::new();
    for _ in 0..4 {
        members.push(speed_run(&topic, &group, &prefix, &args));
        std::thread::sleep(Duration::from_millis(700));
    }
    let logs: Vec<String> = members
        .into_iter()
        .map(|m| wait_ok(m, Duration::from_secs(180)))
        .collect();
    let revoked = logs
        .iter()
        .map(|l| l.matches("partitions revoked").count())
        .sum::<usize>();
    assert!(revoked > 0, "no member had its partitions taken back");
    // Members go idle and leave one by one; one may leave just as partitions come its way.
    for runs in 1.. {
        if group_caught_up(&topic, &group, 6) {
            break;
        }
        assert!(runs < 4, "{runs} runs left partitions unconsumed");
        wait_ok(
            speed_run(&topic, &group, &prefix, &["--exit-when-idle", "2"]),
            Duration::from_secs(180),
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let t = valid.iter().map(|e| e.ts).max().unwrap() + 1;
    assert_state_matches(&prefix, valid.clone(), t, dir.path());
    // Further back, from the histories: every event counted once.
    let mut times: Vec<i64> = valid.iter().map(|e| e.ts).collect();
    times.sort();
    for i in [1, 2, 3] {
        assert_state_matches(
            &prefix,
            valid.clone(),
            times[times.len() * i / 4],
            dir.path(),
        );
    }
    clean_redis(&prefix);
}

/// One partition hours behind another, as when a group catches up: the lagging partition's
/// states outlive a pause longer than a minute (they expired a minute after their write,
/// counted from the leading partition's watermark), so a session that goes on after the pause
/// counts its events from before it.
#[tokio::test(flavor = "multi_thread")]
async fn a_lagging_partition_keeps_its_states_across_a_pause() {
    let topic = unique("speed-lag");
    let prefix = format!("{}:", unique("lag"));
    create_topic(&topic, 2).await;
    let lead = now_ms() - HOUR;
    let lag = lead - 5 * HOUR;
    let record = |p: i32, user: &str, i: i64, ts: i64| {
        let line = serde_json::json!({
            "event_id": format!("{user}-{i}"), "user_id": user, "event_type": "view", "ts": ts,
        });
        (p, user.to_string(), serde_json::to_vec(&line).unwrap())
    };
    // Ten users on each partition (and enough features compared), their events in time order.
    let users = |stem: &'static str| (0..10).map(move |u| format!("{stem}{u}"));
    let session = |from: i64, to: i64| -> Vec<_> {
        (from..to)
            .flat_map(|i| users("lagging").map(move |u| (u, i)))
            .map(|(u, i)| record(1, &u, i, lag + i * 60_000))
            .collect()
    };
    let leading: Vec<_> = (0..10)
        .flat_map(|i| users("leading").map(move |u| (u, i)))
        .map(|(u, i)| record(0, &u, i, lead + i * 60_000))
        .collect();
    // The leading partition first, so that its watermark is known when the lagging one's
    // first session events are written.
    let runs = [leading, session(0, 20), session(20, 40)];
    let group = unique("g");
    for (i, records) in runs.iter().enumerate() {
        if i == 2 {
            // Longer than a key's minute of grace.
            tokio::time::sleep(Duration::from_secs(65)).await;
        }
        produce_placed(&topic, records).await;
        wait_ok(
            speed_run(&topic, &group, &prefix, &["--exit-when-idle", "2"]),
            Duration::from_secs(120),
        );
    }
    let valid: Vec<_> = runs
        .iter()
        .flatten()
        .map(|(_, _, line)| parse_json_event(line).unwrap().to_event())
        .collect();
    let dir = tempfile::tempdir().unwrap();
    assert_state_matches(&prefix, valid.clone(), lag + 40 * 60_000, dir.path());
    assert_state_matches(&prefix, valid, lead + 10 * 60_000, dir.path());
    clean_redis(&prefix);
}

/// A stop longer than a state key's time to live: keys expire by the wall clock while the
/// watermark stands still, so the states of entities whose features still count are gone when
/// the layer comes back. Their next events rebuild them from their histories; before, they
/// started empty states that answered, as exact, as if the entities had no earlier events.
/// The catalog with a lateness of one second, so that keys live about a minute.
#[tokio::test(flavor = "multi_thread")]
async fn states_that_expire_during_a_stop_are_rebuilt_from_their_histories() {
    let topic = unique("speed-stop");
    let prefix = format!("{}:", unique("stop"));
    create_topic(&topic, 1).await;
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("spec.toml");
    let catalog = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("shared-spec/catalog.toml"),
    )
    .unwrap();
    assert!(catalog.contains("allowed_lateness = \"10m\""));
    std::fs::write(
        &spec,
        catalog.replace("allowed_lateness = \"10m\"", "allowed_lateness = \"1s\""),
    )
    .unwrap();
    let spec_arg = s(&spec);
    let base = (now_ms() - 3 * HOUR) / 60_000 * 60_000 + 30_000;
    // Every user buys at `base`; a last event moves the watermark to four seconds before those
    // purchases stop counting (the catalog's 2-hour `last_purchase_amount`), so the states'
    // keys live about 65 seconds: four, the lateness, and a minute of grace.
    let wm = base + 2 * HOUR - 4_000;
    let record = |user: &str, id: &str, kind: &str, amount: Option<f64>, ts: i64| {
        let mut line = serde_json::json!({
            "event_id": id, "user_id": user, "event_type": kind, "ts": ts,
        });
        if let Some(a) = amount {
            line["amount"] = a.into();
        }
        (0, user.to_string(), serde_json::to_vec(&line).unwrap())
    };
    let users: Vec<String> = (0..20).map(|u| format!("stopped{u:02}")).collect();
    let mut before: Vec<_> = users
        .iter()
        .enumerate()
        .map(|(i, u)| {
            record(
                u,
                &format!("{u}-buy"),
                "purchase",
                Some(i as f64 + 1.0),
                base,
            )
        })
        .collect();
    before.push(record("clock", "clock-1", "view", None, wm));
    // After the stop, every user views a second after the watermark.
    let after: Vec<_> = users
        .iter()
        .map(|u| record(u, &format!("{u}-view"), "view", None, wm + 1_000))
        .collect();
    let group = unique("g");
    let args = ["--exit-when-idle", "2", "--spec", &spec_arg];
    produce_placed(&topic, &before).await;
    wait_ok(
        speed_run(&topic, &group, &prefix, &args),
        Duration::from_secs(120),
    );
    let client = redis::Client::open(redis_url()).unwrap();
    let mut con = client.get_connection().unwrap();
    let key = duet_speed::processor::state_key(&prefix, &users[0]);
    let ttl: i64 = redis::cmd("PTTL").arg(&key).query(&mut con).unwrap();
    assert!(
        (1..=75_000).contains(&ttl),
        "{key} lives {ttl} ms: the purchases and the last event were not written together"
    );
    // The stop: every user's key expires.
    tokio::time::sleep(Duration::from_millis(ttl as u64 + 2_000)).await;
    let exists: i64 = redis::cmd("EXISTS").arg(&key).query(&mut con).unwrap();
    assert_eq!(exists, 0, "{key} outlived its expiry");
    produce_placed(&topic, &after).await;
    wait_ok(
        speed_run(&topic, &group, &prefix, &args),
        Duration::from_secs(120),
    );
    let valid: Vec<_> = before
        .iter()
        .chain(&after)
        .map(|(_, _, line)| parse_json_event(line).unwrap().to_event())
        .collect();
    // Each user's purchase still counts, then no longer does.
    for t in [wm + 2_000, base + 2 * HOUR + 1] {
        assert_state_matches_under(Some(&spec), &prefix, valid.clone(), t, dir.path());
    }
    clean_redis(&prefix);
}

#[tokio::test(flavor = "multi_thread")]
async fn two_processes_share_the_partitions() {
    let topic = unique("speed-share");
    let prefix = format!("{}:", unique("share"));
    create_topic(&topic, 4).await;
    let (lines, valid) = generated(120, 8_000, now_ms() - 2 * HOUR, 5);
    let group = unique("g");
    let a = speed_run(&topic, &group, &prefix, &["--exit-when-idle", "4"]);
    let b = speed_run(&topic, &group, &prefix, &["--exit-when-idle", "4"]);
    std::thread::sleep(Duration::from_secs(2));
    produce(&topic, &keyed(&lines)).await;
    wait_ok(a, Duration::from_secs(180));
    wait_ok(b, Duration::from_secs(180));
    let dir = tempfile::tempdir().unwrap();
    let t = valid.iter().map(|e| e.ts).max().unwrap() + 1;
    assert_state_matches(&prefix, valid, t, dir.path());
    clean_redis(&prefix);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_is_dead_lettered_and_never_stalls() {
    let topic = unique("speed-bad");
    let prefix = format!("{}:", unique("bad"));
    create_topic(&topic, 2).await;
    let (lines, valid) = generated(40, 1_500, now_ms() - HOUR, 3);
    let mut records = keyed(&lines);
    let garbage: Vec<(Option<String>, Vec<u8>)> = vec![
        (Some("u1".into()), vec![0xff, 0xfe, 0x00, 0x12]),
        (
            Some("u1".into()),
            b"{\"event_id\": 5, \"user_id\": \"u1\", \"event_type\": \"view\", \"ts\": 1}".to_vec(),
        ),
        (None, b"not json at all".to_vec()),
        (
            Some("u2".into()),
            format!(
                "{{\"event_id\": \"big\", \"pad\": \"{}\"}}",
                "x".repeat(300 * 1024)
            )
            .into_bytes(),
        ),
        (None, Vec::new()),
    ];
    let mid = records.len() / 2;
    records.splice(mid..mid, garbage);
    produce(&topic, &records).await;
    let group = unique("g");
    let dlq = format!("{topic}.dead-letters");
    wait_ok(
        speed_run(
            &topic,
            &group,
            &prefix,
            &["--exit-when-idle", "2", "--dead-letter-topic", &dlq],
        ),
        Duration::from_secs(120),
    );
    let dir = tempfile::tempdir().unwrap();
    let t = valid.iter().map(|e| e.ts).max().unwrap() + 1;
    assert_state_matches(&prefix, valid, t, dir.path());
    // Every invalid record reached the dead-letter topic with its reason.
    let invalid_in_input = lines
        .iter()
        .filter(|l| parse_json_event(l).is_err())
        .count()
        + 5;
    let reasons = consume_all(&dlq, invalid_in_input).await;
    assert!(
        reasons.len() >= invalid_in_input,
        "{} dead letters for {invalid_in_input} invalid records",
        reasons.len()
    );
    for r in ["invalid_json", "wrong_type_event_id", "too_large"] {
        assert!(
            reasons.iter().any(|x| x == r),
            "no dead letter with reason {r}: {reasons:?}"
        );
    }
    clean_redis(&prefix);
}

async fn consume_all(topic: &str, at_least: usize) -> Vec<String> {
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::message::Message;
    let c: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", unique("dlq-reader"))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    c.subscribe(&[topic]).unwrap();
    let mut reasons = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while reasons.len() < at_least && Instant::now() < deadline {
        if let Ok(Ok(m)) = tokio::time::timeout(Duration::from_secs(5), c.recv()).await {
            let v: serde_json::Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
            reasons.push(v["reason"].as_str().unwrap().to_string());
        }
    }
    reasons
}

/// Messages deleted before the speed layer read them. A new group on a trimmed topic notes
/// where it starts, counts no loss, and its state holds exactly the retained events; a later
/// run resuming past the log's start reports nothing; a group whose committed offset the
/// broker deleted past names the lost offsets.
///
/// The broker here is librdkafka's own, run inside this test process and reached over TCP like
/// any broker: tansu 0.6.0 never deletes records (its storage engines leave `DeleteRecords`
/// unimplemented), while librdkafka's keeps at most 5 MB per partition and drops the oldest
/// batches beyond that, as Kafka's retention does.
#[tokio::test(flavor = "multi_thread")]
async fn messages_deleted_before_the_layer_read_them_are_reported() {
    let mock = rdkafka::mocking::MockCluster::new(1).unwrap();
    let topic = "events";
    mock.create_topic(topic, 1, 1).unwrap();
    mock.create_topic("events.dead-letters", 1, 1).unwrap();
    let mock_brokers = mock.bootstrap_servers();
    let prefix = format!("{}:", unique("lost"));
    let group = unique("g");
    let (lines, _) = generated(300, 50_000, now_ms() - HOUR, 17);
    let bytes: usize = lines.iter().map(Vec::len).sum();
    assert!(
        bytes > 6 << 20,
        "{bytes} bytes: not enough to overflow the broker's 5 MB"
    );
    produce_to(&mock_brokers, topic, &keyed(&lines)).await;
    let consumer: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &mock_brokers)
        .create()
        .unwrap();
    use rdkafka::consumer::Consumer;
    let watermarks = || {
        consumer
            .fetch_watermarks(topic, 0, Duration::from_secs(10))
            .unwrap()
    };
    let (start, end) = watermarks();
    assert_eq!(end, lines.len() as i64);
    assert!(start > 0, "the broker kept every message");

    let run = || {
        wait_ok(
            speed_run_at(
                &mock_brokers,
                topic,
                &group,
                &prefix,
                &["--exit-when-idle", "2"],
            ),
            Duration::from_secs(180),
        )
    };
    // The line naming a field set, or `None`.
    let line_with = |err: &str, text: &str, fields: &[String]| -> Option<String> {
        let line = err.lines().find(|l| l.contains(text))?;
        let words: Vec<&str> = line.split_whitespace().collect();
        for field in fields {
            assert!(words.contains(&field.as_str()), "no {field}: {line}");
        }
        Some(line.to_string())
    };
    const LOST: &str = "gone from the broker";
    const NEW: &str = "a new group starts at the oldest offset";

    // A new group: where it starts is noted, no loss is claimed.
    let err = run();
    let fields = ["partition=0".to_string(), format!("start={start}")];
    line_with(&err, NEW, &fields).unwrap_or_else(|| panic!("no note of the start:\n{err}"));
    assert!(!err.contains(LOST), "{err}");
    // The state holds the retained events, and only those.
    let retained: Vec<_> = lines[start as usize..]
        .iter()
        .filter_map(|l| parse_json_event(l).ok())
        .map(|e| e.to_event())
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let t = retained.iter().map(|e| e.ts).max().unwrap() + 1;
    assert_state_matches(&prefix, retained, t, dir.path());

    // Resumed past the log's start: nothing to say.
    let err = run();
    assert!(!err.contains(LOST) && !err.contains(NEW), "{err}");

    // The broker drops past the group's committed offset (`end`): those offsets are lost.
    produce_to(&mock_brokers, topic, &keyed(&lines)).await;
    let (start_now, _) = watermarks();
    assert!(start_now > end, "{start_now} <= {end}");
    let err = run();
    let fields = [
        "partition=0".to_string(),
        format!("from={end}"),
        format!("to={start_now}"),
    ];
    line_with(&err, LOST, &fields).unwrap_or_else(|| panic!("no warning of the loss:\n{err}"));
    clean_redis(&prefix);
}
