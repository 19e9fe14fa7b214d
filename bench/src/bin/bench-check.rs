//! `duet check` at scale: a day of events for 1M users streamed through the speed layer into
//! Redis, a batch snapshot, every user served once with all 14 features (all logged), then one
//! timed `duet check` over the whole state and the whole served log. The baseline printed
//! beside it is the time `duet speed run` took to build the same state from Kafka.
//!
//! Usage: bench-check --duet target/release/duet [--brokers 127.0.0.1:9092]
//!        [--redis redis://127.0.0.1:6379] [--users 1000000] [--events 5000000]

use std::process::Command;
use std::time::Instant;

use duet_bench::kafka::{create_topic, delete_topics, preload};
use duet_bench::{
    Conn, arg, delete_prefix, duet, metric, metrics, now_ms, peak_rss_mib, request,
    speed_until_idle, start_serve,
};
use duet_spec::generate::{GenerateOptions, generate, write_jsonl};
use duet_spec::timestamp::format_ms;

/// Runs `duet args` under `/usr/bin/time -v`; returns seconds and peak MiB.
fn timed(bin: &str, args: &[&str]) -> (f64, f64, std::process::Output) {
    let t = Instant::now();
    let out = Command::new("/usr/bin/time")
        .arg("-v")
        .arg(bin)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("/usr/bin/time runs");
    let secs = t.elapsed().as_secs_f64();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    (secs, peak_rss_mib(&stderr).unwrap_or(f64::NAN), out)
}

#[tokio::main]
async fn main() {
    let bin = arg("--duet", "target/release/duet");
    let brokers = arg("--brokers", "127.0.0.1:9092");
    let redis = arg("--redis", "redis://127.0.0.1:6379");
    let users: u64 = arg("--users", "1000000").parse().expect("--users");
    let n: u64 = arg("--events", "5000000").parse().expect("--events");
    let run = now_ms();
    let dir = std::env::temp_dir().join(format!("duet-bench-check-{run}"));
    std::fs::create_dir_all(dir.join("events")).expect("temp dir");
    let d = |p: &str| dir.join(p).display().to_string();

    // A day of events ending a minute ago, in the offline log and in a topic.
    let end = now_ms() - 60_000;
    let t = Instant::now();
    let mut opts = GenerateOptions::new(users, 1, end, 17);
    opts.events = Some(n);
    let mut text = Vec::new();
    write_jsonl(&generate(&opts), 17, &mut text).expect("in memory");
    std::fs::write(d("events/day.jsonl"), &text).expect("write the log");
    let lines: Vec<&[u8]> = text
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .collect();
    eprintln!(
        "generated {} records for {users} users in {:.1}s",
        lines.len(),
        t.elapsed().as_secs_f64()
    );
    let topic = format!("bench-check-{run}");
    create_topic(&brokers, &topic, 4).await;
    let t = Instant::now();
    preload(&brokers, &topic, &lines);
    eprintln!("preloaded the topic in {:.1}s", t.elapsed().as_secs_f64());
    drop(lines);
    drop(text);

    let prefix = format!("benchcheck{run}:");
    let t = Instant::now();
    speed_until_idle(&bin, &brokers, &topic, &redis, &prefix);
    // The speed layer waits 2 s of idleness before it exits.
    let speed_secs = t.elapsed().as_secs_f64() - 2.0;
    eprintln!("speed layer built the state in {speed_secs:.1}s");
    duet(
        &bin,
        &[
            "batch",
            "run",
            "--as-of",
            &format_ms(end / 86_400_000 * 86_400_000),
            "--events",
            &d("events"),
            "--store",
            &d("store"),
            "--no-progress",
        ],
    );

    // Serve every user once with all features, every vector logged.
    let addr = "127.0.0.1:18091";
    let mut server = start_serve(&bin, [&d("store"), &redis, &prefix, addr], "1");
    let mut conn = Conn::open(addr).await;
    let ids: Vec<String> = (0..users).map(|u| format!("u{u:07}")).collect();
    let t = Instant::now();
    for chunk in ids.chunks(1000) {
        assert_eq!(conn.post(&request(addr, chunk)).await, 200);
    }
    eprintln!(
        "served {} users in {:.1}s",
        ids.len(),
        t.elapsed().as_secs_f64()
    );
    let scrape = metrics(addr).await;
    let dropped = metric(&scrape, "duet_serve_log_dropped_total");
    // SIGTERM: the server writes what its log still buffers, then exits.
    let _ = Command::new("kill").arg(server.id().to_string()).status();
    let _ = server.wait();

    let (secs, peak, out) = timed(
        &bin,
        &[
            "check",
            "--as-of",
            &format_ms(now_ms()),
            "--events",
            &d("events"),
            "--store",
            &d("store"),
            "--redis",
            &redis,
            "--prefix",
            &prefix,
            "--report",
            &d("report"),
            "--brokers",
            &brokers,
            "--topic",
            &topic,
        ],
    );
    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("report/report.json")).expect("report.json"),
    )
    .expect("report.json is JSON");
    let state_items = report["state"]["items"].as_u64().unwrap_or(0);
    let state_features = report["state"]["features"].as_array().map_or(0, Vec::len);
    let served_items = report["served"]["items"].as_u64().unwrap_or(0);
    let served_features = report["served"]["features"].as_array().map_or(0, Vec::len);

    // Clean up the state this run wrote.
    let client = redis::Client::open(redis.as_str()).expect("redis url");
    if let Ok(mut con) = client.get_connection() {
        delete_prefix(&mut con, &prefix);
    }

    println!(
        "consistency check benchmark ({n} events, {users} users, {} cores)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "  speed layer state compared   {state_items:>9} entities x {state_features} features"
    );
    println!(
        "  served vectors compared      {served_items:>9} vectors  x {served_features} features ({dropped:.0} dropped by the server's log buffer)"
    );
    println!(
        "  duet check                   {secs:>9.1} s   peak {peak:.0} MiB   exit {}",
        out.status.code().unwrap_or(-1)
    );
    println!(
        "  duet speed run, same state   {speed_secs:>9.1} s   (building what the check re-derives)"
    );
    println!("  ratio check / speed run      {:>9.2}", secs / speed_secs);
    println!(
        "  result: {}",
        if report["ok"].as_bool() == Some(true) {
            "every feature within tolerance"
        } else {
            "some feature out of tolerance (see the report)"
        }
    );
    println!("  report: {}", dir.join("report/report.html").display());
    delete_topics(&brokers, &[&topic]).await;
}
