//! `driftwatch`: the operator CLI. Parse arguments, run, print the error chain.

use std::process::ExitCode;

use clap::Parser;
use driftwatch_collector::cli_client::{self, Cli};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("driftwatch: error: cannot start the async runtime: {e}");
            return ExitCode::from(cli_client::EXIT_ERROR);
        }
    };
    match runtime.block_on(cli_client::run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("driftwatch: error: {e:#}");
            ExitCode::from(cli_client::EXIT_ERROR)
        }
    }
}
