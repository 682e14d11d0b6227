//! `driftwatch-agent`: parse arguments, run, print the error chain.

use std::process::ExitCode;

use clap::Parser;
use driftwatch_agent::cli::{self, Cli};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("driftwatch-agent: error: {e:#}");
            ExitCode::from(cli::EXIT_ERROR)
        }
    }
}
