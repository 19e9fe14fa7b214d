//! The `duet` binary: parses the command line and config, sets up logging, and calls the
//! libraries. Exit status: 0 success, 1 runtime failure, 2 bad input or usage.

mod cli;
mod config;
mod demo;
mod serve;
mod shutdown;
mod speed;

use std::process::ExitCode;

/// The speed layer and the server allocate small records on every core; glibc's allocator
/// spent a third of the speed layer's time in its arena locks and consolidation. jemalloc keeps
/// freed pages for a while (its decay), so a flush reuses the previous flush's memory instead
/// of faulting in fresh zeroed pages.
///
/// Its options are compiled in (`.cargo/config.toml`):
/// - `oversize_threshold:0`: by default, allocations of 8 MiB and more come from an arena of
///   their own that returns freed pages to the kernel at once, so every large buffer faults in
///   fresh zeroed pages. A backfill makes about ten such buffers per snapshot (columns, rank
///   keys, the encoded file); with the threshold off they reuse freed memory like any other
///   allocation. Measured on a 120-day backfill: 2.9M page faults down to 0.9M, 5-15% faster.
/// - `background_thread:true`: decayed pages go back to the kernel on jemalloc's own thread,
///   not inside whichever allocation or request triggers it.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// An error caused by the user's input (exit status 2).
#[derive(Debug)]
pub struct BadInput(pub String);

impl std::fmt::Display for BadInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BadInput {}

fn main() -> ExitCode {
    let args = match <cli::Cli as clap::Parser>::try_parse() {
        Ok(args) => args,
        Err(e) => return usage_error(e),
    };
    // The config file is read once, before logging starts (its `log_json` decides the log
    // format). A file that cannot be read is reported by the command, once logging is set up.
    let config = config::Config::load(args.config.as_deref());
    let file_json = config.as_ref().ok().and_then(|c| c.log_json);
    cli::init_tracing(args.log_json.or(file_json).unwrap_or(false));
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("duet: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(cli::run(args, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = exit_code(&e);
            // The whole chain on one line: "cannot create out.parquet: Permission denied",
            // and the last line: tasks still running log no more.
            cli::print_cause(&format!("duet: {e:#}"));
            ExitCode::from(code)
        }
    }
}

/// `--help` and `--version` print as clap formats them; a usage mistake is one line naming the
/// flag or value at fault, with exit status 2.
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        let _ = e.print();
        return ExitCode::from(
            if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                2
            } else {
                0
            },
        );
    }
    // clap's text: the error, perhaps the missing arguments and a tip, then usage. Keep all but
    // the usage, on one line.
    let text = e.render().to_string();
    let first = text
        .lines()
        .map(str::trim)
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    let first = first.trim_start_matches("error: ");
    eprintln!("duet: {first} (see --help)");
    ExitCode::from(2)
}

/// 2 when the user's input is at fault, 1 otherwise.
fn exit_code(e: &anyhow::Error) -> u8 {
    let bad = e.downcast_ref::<BadInput>().is_some()
        || e.downcast_ref::<duet_spec::Error>().is_some()
        || e.downcast_ref::<duet_batch::Error>()
            .is_some_and(|b| b.is_bad_input())
        || e.downcast_ref::<duet_speed::Error>()
            .is_some_and(|b| b.is_bad_input())
        || e.downcast_ref::<duet_serving::Error>()
            .is_some_and(|b| b.is_bad_input())
        || e.downcast_ref::<duet_check::Error>()
            .is_some_and(|b| b.is_bad_input());
    if bad { 2 } else { 1 }
}
