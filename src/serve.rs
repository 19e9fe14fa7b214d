//! `duet serve`.

use std::time::Duration;

use duet_serving::served_log::{LogConfig, ServedLog};
use duet_serving::server::{App, ServeConfig, serve};
use duet_speed::store::AnyStore;

use crate::cli::ServeArgs;
use crate::config::{Config, required};
use crate::shutdown::shutdown_token;

pub async fn run(spec: duet_spec::Spec, args: ServeArgs, config: &Config) -> anyhow::Result<()> {
    let store_url = required(&args.store, &config.store, "store")?;
    let redis = required(&args.redis, &config.redis, "redis")?;
    let listen = args
        .listen
        .or(config.listen.clone())
        .unwrap_or_else(|| "127.0.0.1:8080".into());
    let store = duet_batch::store::resolve(&store_url)?;
    let timeout = Duration::from_millis(args.redis_timeout_ms.max(1));
    let state = AnyStore::open_lazily(&redis, timeout.max(Duration::from_secs(2)))?;
    let shutdown = shutdown_token();
    // The log writer stops only after the server has finished its requests in flight, so their
    // records are written too.
    let log_stop = tokio_util::sync::CancellationToken::new();
    let (log, log_task) = if args.log_sample > 0.0 {
        let (log, task) = ServedLog::start(
            store.clone(),
            LogConfig {
                sample: args.log_sample,
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
        max_entities: args.max_entities,
        max_body_bytes: args.max_body_bytes,
        auth_token: args.auth_token.or(config.auth_token.clone()),
        redis_timeout: timeout,
        snapshot_poll: Duration::from_millis(args.snapshot_poll_ms.max(100)),
        snapshot_load_timeout: Duration::from_millis(args.snapshot_load_timeout_ms.max(1)),
        workers: args.workers.map_or_else(
            || ServeConfig::default().workers,
            |n| usize::try_from(n).unwrap_or(1),
        ),
    };
    let app = App::new(spec, store, state, serve_config, log).await?;
    let served = serve(app, &listen, shutdown, |addr| {
        eprintln!("duet serve: listening on http://{addr}")
    })
    .await;
    log_stop.cancel();
    if let Some(t) = log_task {
        let _ = t.await;
    }
    Ok(served?)
}
