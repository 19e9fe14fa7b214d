//! The `duet` binary: parses the command line and config, sets up logging, and calls the
//! libraries. Exit status: 0 success, 1 runtime failure, 2 bad input or usage.

mod cli;
mod config;
mod demo;
mod serve;
mod shutdown;
mod speed;

use std::process::ExitCode;

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
    let args = <cli::Cli as clap::Parser>::parse();
    cli::init_tracing(args.log_json);
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
    match runtime.block_on(cli::run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = exit_code(&e);
            let first = e.to_string();
            eprintln!("duet: {first}");
            ExitCode::from(code)
        }
    }
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
