//! `driftwatch-collector`: parses arguments, sets up logging, runs the command on a tokio
//! runtime and maps the outcome to an exit code (0 ok, 64 configuration error, 1 anything
//! else; `audit verify`: 1 chain broken, 2 could not verify). Everything else is library code (`driftwatch_collector::cli`).

use std::process::ExitCode;

use clap::Parser;
use driftwatch_collector::cli::{Cli, Failure, run};
use driftwatch_collector::logging;

/// mimalloc instead of glibc's malloc. The ingest allocates and frees each report's items
/// (hundreds of small objects beside buffers of a hundred KiB) on two worker threads; glibc
/// spent about 40 % of the collector's CPU in `_int_malloc`, `unlink_chunk` and
/// `malloc_consolidate` there. Measured in docs/benchmarks.md (branch perf8): ingest peaks
/// about +15 % on PostgreSQL and +80 % on SQLite, a lower p99 acknowledgement latency at a
/// higher paced rate; the price is memory (10,000 idle agents: 765 MiB instead of 474 MiB).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// sysexits EX_USAGE / EX_CONFIG territory: systemd's `RestartPreventExitStatus=64` stops a
/// restart loop on a bad configuration.
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init("info");
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("driftwatch-collector: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Config(e)) => {
            eprintln!("driftwatch-collector: configuration: {e}");
            ExitCode::from(EXIT_CONFIG)
        }
        Err(Failure::ChainBroken(e)) => {
            eprintln!("driftwatch-collector: audit log BROKEN: {e}");
            ExitCode::FAILURE
        }
        Err(Failure::VerifyTrouble(e)) => {
            eprintln!("driftwatch-collector: {e:#}");
            ExitCode::from(2)
        }
        Err(Failure::Other(e)) => {
            eprintln!("driftwatch-collector: {e:#}");
            ExitCode::FAILURE
        }
    }
}
