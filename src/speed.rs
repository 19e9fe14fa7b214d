//! `duet speed run` and `duet speed dump`.

use std::sync::Arc;
use std::time::Duration;

use duet_speed::consumer::SpeedConfig;
use duet_speed::metrics::SpeedMetrics;
use duet_speed::plan::SpeedPlan;
use duet_speed::store::AnyStore;

use crate::cli::{SpeedDumpArgs, SpeedRunArgs, at_least_one, instant, seconds};
use crate::config::{Config, optional_setting, required, setting};
use crate::shutdown::shutdown_token;

const REDIS_TIMEOUT: Duration = Duration::from_secs(5);

pub async fn run(spec: duet_spec::Spec, args: SpeedRunArgs, config: &Config) -> anyhow::Result<()> {
    let topic = required(&args.topic, &config.topic, "topic")?;
    let brokers = required(&args.brokers, &config.brokers, "brokers")?;
    let redis = required(&args.redis, &config.redis, "redis")?;
    let dead_letter_topic = match args.dead_letter_topic.or(config.dead_letter_topic.clone()) {
        Some(t) if t == "none" => None,
        Some(t) => Some(t),
        None => Some(format!("{topic}.dead-letters")),
    };
    let speed = SpeedConfig {
        brokers,
        group: args
            .group
            .or(config.group.clone())
            .unwrap_or_else(|| "duet-speed".into()),
        prefix: args
            .prefix
            .or(config.prefix.clone())
            .unwrap_or_else(|| "duet:".into()),
        dead_letter_topic,
        // None: run forever.
        exit_when_idle: optional_setting(
            args.exit_when_idle,
            config.exit_when_idle,
            config,
            "exit_when_idle",
            seconds,
        )?
        .map(Duration::from_secs_f64),
        max_batch: setting(
            args.max_batch,
            config.max_batch,
            config,
            "max_batch",
            at_least_one,
            500_000,
        )?,
        flush_interval: Duration::from_millis(setting(
            args.flush_ms,
            config.flush_ms,
            config,
            "flush_ms",
            at_least_one,
            50,
        )?),
        archive: args.archive.or(config.archive.clone()),
        kafka_options: Vec::new(),
        topic,
    };
    let store = AnyStore::open(&redis, REDIS_TIMEOUT).await?;
    let plan = Arc::new(SpeedPlan::compile(&spec));
    let metrics = Arc::new(SpeedMetrics::default());
    let shutdown = shutdown_token();
    if let Some(addr) = args.admin.or(config.admin.clone()) {
        duet_speed::admin::start(&addr, metrics.clone(), shutdown.clone()).await?;
    }
    duet_speed::consumer::run(plan, store, speed, metrics, shutdown).await?;
    Ok(())
}

pub async fn dump(
    spec: duet_spec::Spec,
    args: SpeedDumpArgs,
    config: &Config,
) -> anyhow::Result<()> {
    let redis = required(&args.redis, &config.redis, "redis")?;
    let prefix = args
        .prefix
        .or(config.prefix.clone())
        .unwrap_or_else(|| "duet:".into());
    let t = match &args.as_of {
        Some(text) => instant(text, "--as-of")?,
        None => duet_speed::now_ms(),
    };
    let store = AnyStore::open(&redis, REDIS_TIMEOUT).await?;
    let plan = SpeedPlan::compile(&spec);
    let d = duet_speed::dump::dump(&store, &spec, &plan, &prefix, t).await?;
    let join_key = spec
        .entities
        .first()
        .map_or("user_id", |e| e.join_key.name());
    let batch = d.to_batch(&plan, join_key)?;
    duet_batch::training::write_table(&args.out, &batch).await?;
    let inexact = d.exact.iter().filter(|e| !**e).count();
    println!(
        "{}",
        serde_json::json!({"entities": d.entities.len(), "as_of": duet_spec::timestamp::format_ms(t), "inexact": inexact, "corrupt": d.corrupt})
    );
    Ok(())
}
