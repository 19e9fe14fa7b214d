//! `duet demo`: the whole Lambda loop on embedded defaults — local-disk store, an in-process
//! Kafka-protocol broker (librdkafka's mock cluster), in-memory speed-layer state (or a real
//! Kafka and Redis when given) — then it keeps serving.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use duet_spec::duration::{DAY_MS, HOUR_MS, floor_to};
use duet_spec::generate::{GenerateOptions, generate, write_jsonl, write_parquet};
use duet_spec::timestamp::format_ms;
use duet_speed::consumer::SpeedConfig;
use duet_speed::metrics::SpeedMetrics;
use duet_speed::plan::SpeedPlan;
use duet_speed::store::{AnyStore, MemoryStore};
use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use crate::cli::DemoArgs;
use crate::shutdown::shutdown_token;

fn step(n: u32, started: Instant, what: &str) {
    eprintln!("[{n}/6 {:>5.1}s] {what}", started.elapsed().as_secs_f64());
}

/// A one-line JSON summary of a consistency report.
pub fn summary_json(r: &duet_check::Report) -> serde_json::Value {
    let section = |s: &duet_check::Section| {
        serde_json::json!({
            "compared": s.items,
            "features_out_of_tolerance": s.features.iter().filter(|f| !f.ok).map(|f| format!("{}:{}", f.view, f.feature)).collect::<Vec<_>>(),
            "mismatches": s.features.iter().map(|f| f.mismatches).sum::<u64>(),
        })
    };
    serde_json::json!({"ok": r.ok, "as_of": r.as_of, "state": section(&r.state), "served": section(&r.served)})
}

pub async fn run(spec: duet_spec::Spec, args: DemoArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    // A taken or malformed --listen address is reported now, not after the demo's work.
    drop(
        std::net::TcpListener::bind(&args.listen)
            .map_err(|e| duet_serving::server::bind_error(&args.listen, e))?,
    );
    let dir = std::path::absolute(&args.dir)?;
    let events_dir = dir.join("events");
    let store_dir = dir.join("store");
    std::fs::create_dir_all(&events_dir)
        .with_context(|| format!("cannot create {}", events_dir.display()))?;
    let now = duet_speed::now_ms();
    let live_from = now - 2 * HOUR_MS;

    step(
        1,
        started,
        &format!(
            "generating {} days of history for {} users",
            args.days, args.users
        ),
    );
    let history = GenerateOptions::new(args.users, args.days, live_from, 42);
    let records = generate(&history);
    let file = std::fs::File::create(events_dir.join("history.parquet"))?;
    write_parquet(&records, 42, std::io::BufWriter::new(file))?;
    // The live stream is archived by the speed layer; an earlier run's archive is stale.
    let _ = std::fs::remove_dir_all(events_dir.join("archive"));

    step(
        2,
        started,
        "backfilling a week of daily batch snapshots with DataFusion",
    );
    let today = floor_to(now, DAY_MS);
    let job = duet_batch::run::BatchJob {
        events: events_dir.join("history.parquet").display().to_string(),
        store: store_dir.display().to_string(),
        as_of: (0..7).rev().map(|d| today - d * DAY_MS).collect(),
        retain: 400,
        progress: true,
    };
    let report = duet_batch::run::run_batch(&spec, &job).await?;
    eprintln!(
        "      {} snapshots, {} valid events, {} duplicates, {} invalid (dead letters in {})",
        report.snapshots.len(),
        report.valid_events,
        report.duplicates,
        report.invalid.values().sum::<u64>(),
        report.dead_letters.as_deref().unwrap_or("-")
    );

    step(
        3,
        started,
        "streaming the last two hours of events through the speed layer",
    );
    let mock;
    let brokers = match &args.brokers {
        Some(b) => b.clone(),
        None => {
            mock = rdkafka::mocking::MockCluster::new(1)
                .context("cannot start the in-process Kafka broker")?;
            mock.create_topic("events", 3, 1)?;
            mock.create_topic("events.dead-letters", 1, 1)?;
            mock.bootstrap_servers()
        }
    };
    let mut live = GenerateOptions::new(args.users, 1, now, 7);
    live.events = Some(args.users * 20);
    let live_records: Vec<_> = generate(&live)
        .into_iter()
        .filter(|e| e.ts >= live_from)
        .collect();
    let mut lines = Vec::new();
    write_jsonl(&live_records, 7, &mut lines)?;
    let produced = produce(&brokers, "events", &lines).await?;
    let state = match &args.redis {
        Some(url) => AnyStore::open(url, Duration::from_secs(5)).await?,
        None => AnyStore::Memory(MemoryStore::new()),
    };
    let plan = Arc::new(SpeedPlan::compile(&spec));
    let metrics = Arc::new(SpeedMetrics::default());
    let shutdown = shutdown_token();
    let speed_config = SpeedConfig {
        brokers: brokers.clone(),
        topic: "events".into(),
        group: "duet-demo".into(),
        prefix: "duet-demo:".into(),
        dead_letter_topic: Some("events.dead-letters".into()),
        exit_when_idle: None,
        max_batch: 5000,
        flush_interval: Duration::from_millis(50),
        archive: Some(events_dir.join("archive").display().to_string()),
        kafka_options: vec![("session.timeout.ms".into(), "6000".into())],
    };
    let speed = tokio::spawn(duet_speed::consumer::run(
        plan.clone(),
        state.clone(),
        speed_config,
        metrics.clone(),
        shutdown.clone(),
    ));
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let seen = metrics.events.get()
            + metrics.duplicates.get()
            + metrics.late.get()
            + metrics
                .invalid
                .lock()
                .expect("not poisoned")
                .values()
                .sum::<u64>();
        if seen >= produced {
            break;
        }
        if speed.is_finished() {
            match speed.await {
                Ok(Err(e)) => anyhow::bail!("the speed layer stopped: {e}"),
                _ => anyhow::bail!("the speed layer stopped early"),
            }
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the speed layer consumed {seen} of {produced} events in 90 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "      {produced} messages consumed: {} applied, {} duplicates, {} late",
        metrics.events.get(),
        metrics.duplicates.get(),
        metrics.late.get()
    );

    step(4, started, "starting the feature server");
    let store = duet_batch::store::resolve(&store_dir.display().to_string())?;
    let (log, _log_task) = duet_serving::served_log::ServedLog::start(
        store.clone(),
        duet_serving::served_log::LogConfig {
            sample: 1.0,
            max_files: 200,
            flush_every: Duration::from_millis(200),
            capacity: 10_000,
        },
        shutdown.clone(),
    );
    let serve_config = duet_serving::server::ServeConfig {
        prefix: "duet-demo:".into(),
        ..Default::default()
    };
    let app =
        duet_serving::server::App::new(spec.clone(), store, state.clone(), serve_config, Some(log))
            .await?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let (serve_app, listen, serve_shutdown) = (app.clone(), args.listen.clone(), shutdown.clone());
    let server = tokio::spawn(async move {
        duet_serving::server::serve(serve_app, &listen, serve_shutdown, move |addr| {
            let _ = tx.send(addr);
        })
        .await
    });
    let addr = match rx.await {
        Ok(addr) => addr,
        // The server ended before it listened (the address was taken since the check above):
        // its error says why.
        Err(_) => {
            return Err(match server.await {
                Ok(Err(e)) => e.into(),
                Ok(Ok(())) => anyhow::anyhow!("the server stopped before it listened"),
                Err(e) => anyhow::anyhow!("the server failed: {e}"),
            });
        }
    };

    step(
        5,
        started,
        "merged feature vectors (batch snapshot + live state), as served",
    );
    let mut active: Vec<u32> = live_records.iter().rev().map(|e| e.user).collect();
    active.dedup();
    active.truncate(3);
    let mut sample_user = String::new();
    for u in active {
        let user = format!("u{u:07}");
        let v = app.entity_vector(&user, duet_speed::now_ms(), false).await;
        println!("{}", serde_json::to_string_pretty(&v)?);
        sample_user = user;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    step(
        6,
        started,
        "consistency check: speed state and served vectors against the offline log",
    );
    let check = duet_check::CheckRequest {
        as_of: duet_speed::now_ms(),
        events: events_dir.display().to_string(),
        store: store_dir.display().to_string(),
        redis: args.redis.clone().unwrap_or_else(|| "memory://".into()),
        prefix: "duet-demo:".into(),
        report_dir: dir.join("report"),
        kafka: Some((brokers.clone(), "events".into())),
        max_mismatch_rate: 0.0,
    };
    let report = duet_check::run_check_with(&spec, &check, &state).await?;
    print_summary(&report, &dir.join("report").join("report.html"));
    eprintln!(
        "      demo ready in {:.1}s",
        started.elapsed().as_secs_f64()
    );

    if args.no_serve {
        shutdown.cancel();
    } else {
        println!("\nServing on http://{addr} (Ctrl-C to stop). Try:");
        println!("  curl http://{addr}/v1/features/{sample_user}");
        println!(
            "  curl -X POST http://{addr}/get-online-features -d '{{\"features\": [\"user_batch:txn_count_90d\", \"user_realtime:txn_count_1h\"], \"entities\": {{\"user_id\": [\"{sample_user}\"]}}}}'"
        );
    }
    let _ = server.await;
    let _ = speed.await;
    Ok(())
}

fn print_summary(r: &duet_check::Report, html: &Path) {
    println!("\nConsistency: {}", if r.ok { "PASS" } else { "FAIL" });
    for (name, section) in [("speed state", &r.state), ("served", &r.served)] {
        let worst = section
            .features
            .iter()
            .map(|f| f.mismatch_rate)
            .fold(0.0f64, f64::max);
        println!(
            "  {name:<12} {} compared, {} features, {} mismatching values, worst mismatch rate {:.4}%",
            section.items,
            section.features.len(),
            section.features.iter().map(|f| f.mismatches).sum::<u64>(),
            100.0 * worst
        );
    }
    println!("  report: {}", html.display());
}

async fn produce(brokers: &str, topic: &str, lines: &[u8]) -> anyhow::Result<u64> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "5")
        .create()
        .context("cannot create a Kafka producer")?;
    let mut pending = Vec::new();
    for line in lines.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        let key = duet_spec::event::parse_json_event(line)
            .ok()
            .map(|e| e.user_id.into_owned());
        let mut record = FutureRecord::to(topic).payload(line);
        if let Some(k) = &key {
            record = record.key(k);
        }
        match producer.send_result(record) {
            Ok(d) => pending.push(d),
            Err((e, _)) => anyhow::bail!("cannot produce to {topic} on {brokers}: {e}"),
        }
    }
    let n = pending.len() as u64;
    for d in pending {
        match d.await {
            Ok(Ok(_)) => {}
            Ok(Err((e, _))) => anyhow::bail!("cannot produce to {topic}: {e}"),
            Err(_) => anyhow::bail!("cannot produce to {topic}: delivery cancelled"),
        }
    }
    producer.flush(Duration::from_secs(30))?;
    eprintln!(
        "      produced {n} messages to `{topic}` at {brokers} ({})",
        format_ms(duet_speed::now_ms())
    );
    Ok(n)
}
