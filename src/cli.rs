//! Command-line surface (CONTRACT.md). Each command parses its flags and calls a library.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use duet_batch::run::{BatchJob, run_batch};
use duet_batch::training::{
    Engine, TrainingRequest, datafusion_training_set, reference_training_set,
};
use duet_spec::generate::{GenerateOptions, generate, write_jsonl, write_parquet};

use crate::BadInput;
use crate::config::{Config, required, setting};

/// duet: one feature spec, computed in batch and in streaming, served merged.
#[derive(Debug, Parser)]
#[command(name = "duet", version, about)]
pub struct Cli {
    /// Config file (TOML); flags and DUET_* variables override it.
    #[arg(long, global = true, env = "DUET_CONFIG")]
    pub config: Option<PathBuf>,
    /// Feature spec; defaults to the reference catalog shipped with duet.
    #[arg(long, global = true, env = "DUET_SPEC")]
    pub spec: Option<String>,
    /// Log as JSON lines instead of text; `--log-json=false` logs text even when the config
    /// file says otherwise.
    #[arg(
        long,
        global = true,
        env = "DUET_LOG_JSON",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub log_json: Option<bool>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Work with feature specs.
    #[command(subcommand)]
    Spec(SpecCommand),
    /// Write deterministic synthetic events (.parquet or .jsonl).
    Generate(GenerateArgs),
    /// Build point-in-time correct training rows for an entity file.
    TrainingSet(TrainingArgs),
    /// Compute and publish batch snapshots.
    #[command(subcommand)]
    Batch(BatchCommand),
    /// The speed layer.
    #[command(subcommand)]
    Speed(SpeedCommand),
    /// Serve merged features over HTTP.
    Serve(ServeArgs),
    /// Prove the layers agree: the consistency report.
    Check(CheckArgs),
    /// The whole system end to end on embedded defaults, with no setup.
    Demo(DemoArgs),
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Compare the speed layer's state as of this instant (RFC 3339; default now).
    #[arg(long)]
    pub as_of: Option<String>,
    /// The offline event log.
    #[arg(long, env = "DUET_EVENTS")]
    pub events: Option<String>,
    /// The snapshot store (holds the served log and earlier reports too).
    #[arg(long, env = "DUET_STORE")]
    pub store: Option<String>,
    /// Redis URL of the speed layer's state.
    #[arg(long, env = "DUET_REDIS")]
    pub redis: Option<String>,
    /// Key prefix of the speed layer's state.
    #[arg(long, env = "DUET_PREFIX")]
    pub prefix: Option<String>,
    /// Directory for report.html and report.json.
    #[arg(long)]
    pub report: PathBuf,
    /// Kafka bootstrap servers, to tell events that never reached Kafka from late ones.
    #[arg(long, env = "DUET_BROKERS")]
    pub brokers: Option<String>,
    /// The event topic (with --brokers).
    #[arg(long, env = "DUET_TOPIC")]
    pub topic: Option<String>,
    /// Largest mismatch rate a feature may have and still pass, from 0 to 1 [default: 0].
    #[arg(long, env = "DUET_MAX_MISMATCH_RATE", value_parser = fraction)]
    pub max_mismatch_rate: Option<f64>,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Working directory for the demo's event log and snapshot store.
    #[arg(long, default_value = "duet-demo")]
    pub dir: PathBuf,
    /// Users in the generated history.
    #[arg(long, default_value_t = 2000)]
    pub users: u64,
    /// Days of history.
    #[arg(long, default_value_t = 35)]
    pub days: u64,
    /// Address the demo serves on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: String,
    /// A real Kafka instead of the in-process broker.
    #[arg(long)]
    pub brokers: Option<String>,
    /// A real Redis instead of in-memory state.
    #[arg(long)]
    pub redis: Option<String>,
    /// Stop after printing the summary instead of serving on.
    #[arg(long)]
    pub no_serve: bool,
}

#[derive(Debug, Subcommand)]
pub enum SpeedCommand {
    /// Consume events from Kafka and keep streaming features in Redis.
    Run(SpeedRunArgs),
    /// Write every entity's streaming features as of an instant.
    Dump(SpeedDumpArgs),
}

#[derive(Debug, Args)]
pub struct SpeedRunArgs {
    /// Kafka bootstrap servers (host:port[,host:port]).
    #[arg(long, env = "DUET_BROKERS")]
    pub brokers: Option<String>,
    /// The event topic.
    #[arg(long, env = "DUET_TOPIC")]
    pub topic: Option<String>,
    /// The consumer group.
    #[arg(long, env = "DUET_GROUP")]
    pub group: Option<String>,
    /// Redis URL (redis://host:port/db).
    #[arg(long, env = "DUET_REDIS")]
    pub redis: Option<String>,
    /// Key prefix of the state.
    #[arg(long, env = "DUET_PREFIX")]
    pub prefix: Option<String>,
    /// Stop once caught up for this many seconds.
    #[arg(long, env = "DUET_EXIT_WHEN_IDLE", value_parser = seconds)]
    pub exit_when_idle: Option<f64>,
    /// Topic for invalid records (default: `<topic>.dead-letters`; `none` to only count them).
    #[arg(long, env = "DUET_DEAD_LETTER_TOPIC")]
    pub dead_letter_topic: Option<String>,
    /// Archive consumed events to this offline log (Parquet by UTC date and hour).
    #[arg(long, env = "DUET_ARCHIVE")]
    pub archive: Option<String>,
    /// Admin address for /metrics and /healthz.
    #[arg(long, env = "DUET_ADMIN")]
    pub admin: Option<String>,
    /// Largest batch of messages per flush (under a backlog, larger batches write each entity's
    /// state once for more of its events) [default: 500000].
    #[arg(long, env = "DUET_MAX_BATCH", value_parser = at_least_one::<usize>)]
    pub max_batch: Option<usize>,
    /// Longest wait before a partial batch is flushed, in milliseconds [default: 50].
    #[arg(long, env = "DUET_FLUSH_MS", value_parser = at_least_one::<u64>)]
    pub flush_ms: Option<u64>,
}

#[derive(Debug, Args)]
pub struct SpeedDumpArgs {
    /// Redis URL.
    #[arg(long, env = "DUET_REDIS")]
    pub redis: Option<String>,
    /// Key prefix of the state.
    #[arg(long, env = "DUET_PREFIX")]
    pub prefix: Option<String>,
    /// Evaluate as of this instant (RFC 3339), default now.
    #[arg(long)]
    pub as_of: Option<String>,
    /// Output: .parquet or .csv.
    #[arg(long)]
    pub out: String,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The snapshot store.
    #[arg(long, env = "DUET_STORE")]
    pub store: Option<String>,
    /// Redis URL of the speed layer's state.
    #[arg(long, env = "DUET_REDIS")]
    pub redis: Option<String>,
    /// Listen address.
    #[arg(long, env = "DUET_LISTEN")]
    pub listen: Option<String>,
    /// Key prefix of the speed layer's state.
    #[arg(long, env = "DUET_PREFIX")]
    pub prefix: Option<String>,
    /// Most entities per request [default: 1000].
    #[arg(long, env = "DUET_MAX_ENTITIES", value_parser = at_least_one::<usize>)]
    pub max_entities: Option<usize>,
    /// Largest request body in bytes [default: 1048576].
    #[arg(long, env = "DUET_MAX_BODY_BYTES", value_parser = at_least_one::<usize>)]
    pub max_body_bytes: Option<usize>,
    /// Require `Authorization: Bearer <token>`.
    #[arg(long, env = "DUET_AUTH_TOKEN")]
    pub auth_token: Option<String>,
    /// Longest wait for Redis per request, in milliseconds [default: 200].
    #[arg(long, env = "DUET_REDIS_TIMEOUT_MS")]
    pub redis_timeout_ms: Option<u64>,
    /// How often to look for a newer snapshot, in milliseconds [default: 5000].
    #[arg(long, env = "DUET_SNAPSHOT_POLL_MS")]
    pub snapshot_poll_ms: Option<u64>,
    /// Longest wait of a request with `as_of` for a past snapshot to be read from the store,
    /// in milliseconds (its batch features are INVALID after it; the read goes on)
    /// [default: 5000].
    #[arg(long, env = "DUET_SNAPSHOT_LOAD_TIMEOUT_MS")]
    pub snapshot_load_timeout_ms: Option<u64>,
    /// Threads serving requests, each with its own Redis connection (default: one per core).
    #[arg(long, env = "DUET_SERVE_WORKERS", value_parser = worker_count)]
    pub workers: Option<u32>,
    /// Fraction of entities whose served vectors are logged for `duet check`, from 0 (no log)
    /// to 1 (every entity) [default: 0.01].
    #[arg(long, env = "DUET_LOG_SAMPLE", value_parser = fraction)]
    pub log_sample: Option<f64>,
}

#[derive(Debug, Subcommand)]
pub enum BatchCommand {
    /// Publish one snapshot of every batch view as of an instant.
    Run(BatchRunArgs),
    /// Publish one snapshot per cadence boundary (UTC midnight) in [from, to].
    Backfill(BackfillArgs),
}

#[derive(Debug, Args)]
pub struct BatchLocations {
    /// The offline event log: a file, directory or glob; local, file://, s3:// or memory://.
    #[arg(long, env = "DUET_EVENTS")]
    pub events: Option<String>,
    /// The snapshot store: local, file://, s3:// or memory://.
    #[arg(long, env = "DUET_STORE")]
    pub store: Option<String>,
    /// Snapshots kept per view; older ones are deleted after a successful run [default: 400].
    #[arg(long, env = "DUET_RETAIN", value_parser = at_least_one::<usize>)]
    pub retain: Option<usize>,
    /// Never draw progress bars (structured logs only); `--no-progress=false` draws them on a
    /// terminal even when the config file says otherwise.
    #[arg(
        long,
        env = "DUET_NO_PROGRESS",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub no_progress: Option<bool>,
}

#[derive(Debug, Args)]
pub struct BatchRunArgs {
    /// The instant the snapshot is as of: RFC 3339 or a date (its UTC midnight). An instant
    /// between cadence boundaries gives the snapshot of the boundary before it (the one a
    /// lookup at that instant is served from).
    #[arg(long)]
    pub as_of: String,
    #[command(flatten)]
    pub loc: BatchLocations,
}

#[derive(Debug, Args)]
pub struct BackfillArgs {
    /// First date (RFC 3339 or a date).
    #[arg(long)]
    pub from: String,
    /// Last date, inclusive.
    #[arg(long)]
    pub to: String,
    #[command(flatten)]
    pub loc: BatchLocations,
}

#[derive(Debug, Subcommand)]
pub enum SpecCommand {
    /// Validate a spec and print its views and features.
    Check,
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Number of users.
    #[arg(long, default_value_t = 1000)]
    pub users: u64,
    /// Days of history.
    #[arg(long, default_value_t = 30)]
    pub days: u64,
    /// End of the event times: RFC 3339, a date, or `now`.
    #[arg(long, default_value = "2026-11-01T00:00:00Z")]
    pub end: String,
    /// Seed; the same seed gives the same events.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Number of distinct valid events (default: 4 per user per day).
    #[arg(long)]
    pub events: Option<u64>,
    /// Output file: .parquet or .jsonl.
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Debug, Args)]
pub struct TrainingArgs {
    /// Entity rows: Parquet or CSV with the join key and `ts`.
    #[arg(long)]
    pub entities: String,
    /// Output: .parquet (or .csv).
    #[arg(long)]
    pub out: String,
    /// Comma-separated features (`feature` or `view:feature`); default all.
    #[arg(long, value_delimiter = ',')]
    pub features: Option<Vec<String>>,
    /// Engine computing the rows.
    #[arg(long, value_enum, default_value = "datafusion")]
    pub engine: EngineArg,
    /// The offline event log.
    #[arg(long, env = "DUET_EVENTS")]
    pub events: Option<String>,
    /// The snapshot store.
    #[arg(long, env = "DUET_STORE")]
    pub store: Option<String>,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum EngineArg {
    Datafusion,
    Reference,
}

/// Whether log lines still go to stderr: closed when the command's cause is printed.
static LOGS_OPEN: std::sync::Mutex<bool> = std::sync::Mutex::new(true);

/// Stderr for log lines while [`LOGS_OPEN`]; after that they are dropped. A line is written
/// whole under the lock, so none can come out after the cause.
struct LogWriter;

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let open = LOGS_OPEN.lock().unwrap_or_else(|e| e.into_inner());
        if *open {
            std::io::stderr().write_all(buf)?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// Prints a failed command's one-line cause as stderr's last line: log lines of tasks still
/// running (a connection retrying, a background read) are dropped from here on.
pub fn print_cause(cause: &str) {
    let mut open = LOGS_OPEN.lock().unwrap_or_else(|e| e.into_inner());
    *open = false;
    eprintln!("{cause}");
}

/// Whether log lines are JSON (set once, by [`init_tracing`]).
static JSON_LOGS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// A line on stderr that scripts wait for (such as the server's address), printed whatever
/// `RUST_LOG` says: as is in text mode, and as a JSON object shaped like the log lines (with
/// its message under `fields.message`) when they are JSON, so a JSON log stays JSON throughout.
pub fn announce(message: &str) {
    if JSON_LOGS.load(std::sync::atomic::Ordering::Relaxed) {
        let line = serde_json::json!({
            "timestamp": duet_spec::timestamp::format_ms(duet_speed::now_ms()),
            "level": "INFO",
            "fields": { "message": message },
            "target": "duet",
        });
        eprintln!("{line}");
    } else {
        eprintln!("{message}");
    }
}

/// Sets up `tracing`: text (coloured only on a terminal, so a log file or a pipe gets plain
/// text), JSON lines when asked; `RUST_LOG` filters. Lines go to stderr until a failed
/// command's cause is printed ([`print_cause`]).
pub fn init_tracing(json: bool) {
    use std::io::IsTerminal;
    JSON_LOGS.store(json, std::sync::atomic::Ordering::Relaxed);
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(|| LogWriter);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn load_spec(cli_spec: &Option<String>, config: &Config) -> anyhow::Result<duet_spec::Spec> {
    let path = cli_spec.clone().or_else(|| config.spec.clone());
    Ok(duet_spec::load_spec(
        path.as_deref().map(std::path::Path::new),
    )?)
}

/// Runs the command with the config file as loaded (once: it may be a pipe) before logging
/// started.
pub async fn run(cli: Cli, config: anyhow::Result<Config>) -> anyhow::Result<()> {
    let config = config?;
    match cli.command {
        Command::Spec(SpecCommand::Check) => {
            let spec = load_spec(&cli.spec, &config)?;
            print!("{}", duet_spec::describe(&spec));
            Ok(())
        }
        Command::Generate(args) => run_generate(args).await,
        Command::Speed(SpeedCommand::Run(args)) => {
            let spec = load_spec(&cli.spec, &config)?;
            crate::speed::run(spec, args, &config).await
        }
        Command::Speed(SpeedCommand::Dump(args)) => {
            let spec = load_spec(&cli.spec, &config)?;
            crate::speed::dump(spec, args, &config).await
        }
        Command::Serve(args) => {
            let spec = load_spec(&cli.spec, &config)?;
            crate::serve::run(spec, args, &config).await
        }
        Command::Check(args) => {
            let spec = load_spec(&cli.spec, &config)?;
            run_check(spec, args, &config).await
        }
        Command::Demo(args) => {
            let spec = load_spec(&cli.spec, &config)?;
            crate::demo::run(spec, args).await
        }
        Command::Batch(cmd) => {
            let spec = load_spec(&cli.spec, &config)?;
            let (loc, as_of) = match cmd {
                BatchCommand::Run(a) => {
                    let t = instant(&a.as_of, "--as-of")?;
                    (a.loc, vec![t])
                }
                BatchCommand::Backfill(a) => {
                    let from = instant(&a.from, "--from")?;
                    let to = instant(&a.to, "--to")?;
                    (a.loc, duet_batch::run::backfill_instants(&spec, from, to)?)
                }
            };
            let job = BatchJob {
                events: required(&loc.events, &config.events, "events")?,
                store: required(&loc.store, &config.store, "store")?,
                as_of,
                retain: setting(
                    loc.retain,
                    config.retain,
                    &config,
                    "retain",
                    at_least_one,
                    400,
                )?,
                progress: !loc.no_progress.or(config.no_progress).unwrap_or(false),
            };
            let report = run_batch(&spec, &job).await?;
            println!("{}", serde_json::to_string(&report)?);
            Ok(())
        }
        Command::TrainingSet(args) => {
            let spec = load_spec(&cli.spec, &config)?;
            let req = TrainingRequest {
                entities: args.entities,
                out: args.out,
                features: args.features,
                engine: match args.engine {
                    EngineArg::Datafusion => Engine::DataFusion,
                    EngineArg::Reference => Engine::Reference,
                },
                events: required(&args.events, &config.events, "events")?,
                store: args.store.or(config.store),
            };
            let summary = match req.engine {
                Engine::Reference => reference_training_set(&spec, &req).await?,
                Engine::DataFusion => datafusion_training_set(&spec, &req).await?,
            };
            println!("{}", serde_json::to_string(&summary)?);
            Ok(())
        }
    }
}

async fn run_check(spec: duet_spec::Spec, args: CheckArgs, config: &Config) -> anyhow::Result<()> {
    let as_of = match &args.as_of {
        Some(t) => instant(t, "--as-of")?,
        None => duet_speed::now_ms(),
    };
    let kafka = match (
        args.brokers.or(config.brokers.clone()),
        args.topic.or(config.topic.clone()),
    ) {
        (Some(b), Some(t)) => Some((b, t)),
        _ => None,
    };
    let req = duet_check::CheckRequest {
        as_of,
        events: required(&args.events, &config.events, "events")?,
        store: required(&args.store, &config.store, "store")?,
        redis: required(&args.redis, &config.redis, "redis")?,
        prefix: args
            .prefix
            .or(config.prefix.clone())
            .unwrap_or_else(|| "duet:".into()),
        report_dir: args.report.clone(),
        kafka,
        max_mismatch_rate: setting(
            args.max_mismatch_rate,
            config.max_mismatch_rate,
            config,
            "max_mismatch_rate",
            fraction,
            0.0,
        )?,
    };
    let report = duet_check::run_check(&spec, &req).await?;
    println!("{}", crate::demo::summary_json(&report));
    if !report.ok {
        let failing: Vec<String> = report
            .state
            .features
            .iter()
            .chain(&report.served.features)
            .filter(|f| !f.ok)
            .map(|f| format!("{}:{}", f.view, f.feature))
            .collect();
        anyhow::bail!(
            "consistency check failed: {} out of tolerance ({}); see {}",
            failing.len(),
            failing.join(", "),
            args.report.join("report.html").display()
        );
    }
    Ok(())
}

pub fn instant(text: &str, flag: &str) -> anyhow::Result<i64> {
    duet_spec::timestamp::parse_instant(text).ok_or_else(|| {
        BadInput(format!(
            "{flag} `{text}`: not a date (2026-11-20) or RFC 3339 time (2026-11-20T00:00:00Z)"
        ))
        .into()
    })
}

async fn run_generate(args: GenerateArgs) -> anyhow::Result<()> {
    let end_ms = if args.end == "now" {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .context("the clock is before 1970")?
            .as_millis() as i64
    } else {
        duet_spec::timestamp::parse_instant(&args.end).ok_or_else(|| {
            BadInput(format!(
                "--end `{}`: not RFC 3339, a date, or `now`",
                args.end
            ))
        })?
    };
    let ext = args.out.extension().and_then(|e| e.to_str()).unwrap_or("");
    if !matches!(ext, "parquet" | "jsonl") {
        return Err(BadInput(format!(
            "--out {}: the file name must end in .parquet or .jsonl",
            args.out.display()
        ))
        .into());
    }
    let mut opts = GenerateOptions::new(args.users, args.days, end_ms, args.seed);
    opts.events = args.events;
    let out = args.out.clone();
    let count = tokio::task::spawn_blocking(move || -> anyhow::Result<usize> {
        let records = generate(&opts);
        if let Some(dir) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let file = std::fs::File::create(&out)
            .with_context(|| format!("cannot create {}", out.display()))?;
        let w = std::io::BufWriter::with_capacity(1 << 20, file);
        if out.extension().is_some_and(|e| e == "parquet") {
            write_parquet(&records, opts.seed, w)?;
        } else {
            write_jsonl(&records, opts.seed, w)?;
        }
        Ok(records.len())
    })
    .await??;
    announce(&format!("wrote {count} records to {}", args.out.display()));
    Ok(())
}

/// A count of at least one.
pub(crate) fn at_least_one<T>(s: &str) -> Result<T, String>
where
    T: std::str::FromStr + PartialOrd + From<u8>,
    T::Err: std::fmt::Display,
{
    match s.parse::<T>() {
        Ok(n) if n < T::from(1) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("`{s}` is not a whole number: {e}")),
    }
}

/// A number of seconds, 0 or more.
pub(crate) fn seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x >= 0.0 && std::time::Duration::try_from_secs_f64(x).is_ok() => Ok(x),
        Ok(_) => Err(format!("`{s}` is not a number of seconds, 0 or more")),
        Err(e) => Err(format!("`{s}` is not a number: {e}")),
    }
}

/// A number of serving threads, from 1 to 1024.
pub(crate) fn worker_count(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(n) if (1..=1024).contains(&n) => Ok(n),
        Ok(_) => Err("must be from 1 to 1024".into()),
        Err(e) => Err(format!("`{s}` is not a whole number: {e}")),
    }
}

/// A fraction from 0 to 1.
pub(crate) fn fraction(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if (0.0..=1.0).contains(&x) => Ok(x),
        Ok(_) => Err(format!("`{s}` is not between 0 and 1")),
        Err(e) => Err(format!("`{s}` is not a number: {e}")),
    }
}
