//! `duet serve`.

use std::time::Duration;

use duet_serving::served_log::{LogConfig, ServedLog};
use duet_serving::server::{App, ServeConfig, serve};
use duet_speed::store::AnyStore;

use crate::cli::{ServeArgs, at_least_one, fraction, worker_count};
use crate::config::{Config, required, setting};
use crate::shutdown::shutdown_token;

pub async fn run(spec: duet_spec::Spec, args: ServeArgs, config: &Config) -> anyhow::Result<()> {
    let store_url = required(&args.store, &config.store, "store")?;
    let redis = required(&args.redis, &config.redis, "redis")?;
    let listen = args
        .listen
        .or(config.listen.clone())
        .unwrap_or_else(|| "127.0.0.1:8080".into());
    let any = |s: &str| s.parse::<u64>().map_err(|e| e.to_string());
    let defaults = ServeConfig::default();
    let millis = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let max_entities = setting(
        args.max_entities,
        config.max_entities,
        config,
        "max_entities",
        at_least_one,
        defaults.max_entities,
    )?;
    let max_body_bytes = setting(
        args.max_body_bytes,
        config.max_body_bytes,
        config,
        "max_body_bytes",
        at_least_one,
        defaults.max_body_bytes,
    )?;
    let redis_timeout_ms = setting(
        args.redis_timeout_ms,
        config.redis_timeout_ms,
        config,
        "redis_timeout_ms",
        any,
        millis(defaults.redis_timeout),
    )?;
    let snapshot_poll_ms = setting(
        args.snapshot_poll_ms,
        config.snapshot_poll_ms,
        config,
        "snapshot_poll_ms",
        any,
        millis(defaults.snapshot_poll),
    )?;
    let snapshot_load_timeout_ms = setting(
        args.snapshot_load_timeout_ms,
        config.snapshot_load_timeout_ms,
        config,
        "snapshot_load_timeout_ms",
        any,
        millis(defaults.snapshot_load_timeout),
    )?;
    let log_sample = setting(
        args.log_sample,
        config.log_sample,
        config,
        "log_sample",
        fraction,
        0.01,
    )?;
    let workers = setting(
        args.workers,
        config.serve_workers,
        config,
        "serve_workers",
        worker_count,
        u32::try_from(defaults.workers).unwrap_or(1),
    )?;
    let store = duet_batch::store::resolve(&store_url)?;
    let timeout = Duration::from_millis(redis_timeout_ms.max(1));
    let state = AnyStore::open_lazily(&redis, timeout.max(Duration::from_secs(2)))?;
    let shutdown = shutdown_token();
    // The log writer stops only after the server has finished its requests in flight, so their
    // records are written too.
    let log_stop = tokio_util::sync::CancellationToken::new();
    let (log, log_task) = if log_sample > 0.0 {
        let (log, task) = ServedLog::start(
            store.clone(),
            LogConfig {
                sample: log_sample,
                max_files: 2000,
                flush_every: Duration::from_secs(10),
                capacity: 100_000,
            },
            log_stop.clone(),
        );
        (Some(log), Some(task))
    } else {
        (None, None)
    };
    let serve_config = ServeConfig {
        prefix: args
            .prefix
            .or(config.prefix.clone())
            .unwrap_or_else(|| "duet:".into()),
        max_entities,
        max_body_bytes,
        auth_token: args.auth_token.or(config.auth_token.clone()),
        redis_timeout: timeout,
        snapshot_poll: Duration::from_millis(snapshot_poll_ms.max(100)),
        snapshot_load_timeout: Duration::from_millis(snapshot_load_timeout_ms.max(1)),
        workers: usize::try_from(workers).unwrap_or(1),
    };
    let app = App::new(spec, store, state, serve_config, log).await?;
    let served = serve(app, &listen, shutdown, |addr| {
        crate::cli::announce(&format!("duet serve: listening on http://{addr}"))
    })
    .await;
    log_stop.cancel();
    if let Some(t) = log_task {
        let _ = t.await;
    }
    Ok(served?)
}
