//! `driftwatch-gen OUT_DIR`: man pages and shell completions of `driftwatch-agent`,
//! `driftwatch-collector` and `driftwatch`, generated from their clap definitions (the same
//! ones the binaries parse with), for the packages. A build tool: the daemons do not depend on
//! clap_mangen or clap_complete.
//!
//! Writes `OUT_DIR/man/NAME/NAME.1` and one page per subcommand
//! (`driftwatch-agent-baseline-create.1`), one directory per program so that each package takes
//! its own, and `OUT_DIR/completions/{bash,zsh,fish}/` in the file names each shell loads on
//! demand (`NAME`, `_NAME`, `NAME.fish`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Command, CommandFactory};
use clap_complete::Shell;

fn commands() -> Vec<Command> {
    vec![
        driftwatch_agent::cli::Cli::command(),
        driftwatch_collector::cli::Cli::command(),
        driftwatch_collector::cli_client::Cli::command(),
    ]
}

/// Writes the page of `cmd` (named `name`) and of every subcommand below it.
fn man_pages(cmd: &Command, name: &str, dir: &Path) -> std::io::Result<usize> {
    // Subcommand pages are named after their whole command line ("driftwatch-agent-baseline-create").
    // clap takes names as &'static str unless its "string" feature is on, which would change
    // the daemons' clap build; a short-lived build tool can leak a few names instead.
    let static_name: &'static str = Box::leak(name.to_string().into_boxed_str());
    let mut cmd = cmd.clone().name(static_name);
    cmd.build();
    let mut buf = Vec::new();
    clap_mangen::Man::new(cmd.clone()).render(&mut buf)?;
    std::fs::write(dir.join(format!("{name}.1")), buf)?;
    let mut n = 1;
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        n += man_pages(sub, &format!("{name}-{}", sub.get_name()), dir)?;
    }
    Ok(n)
}

fn generate(out: &Path) -> std::io::Result<()> {
    for cmd in commands() {
        let name = cmd.get_name().to_string();
        let man = out.join("man").join(&name);
        std::fs::create_dir_all(&man)?;
        let n = man_pages(&cmd, &name, &man)?;
        for (shell, dir) in [
            (Shell::Bash, "bash"),
            (Shell::Zsh, "zsh"),
            (Shell::Fish, "fish"),
        ] {
            let d = out.join("completions").join(dir);
            std::fs::create_dir_all(&d)?;
            let written = clap_complete::generate_to(shell, &mut cmd.clone(), &name, &d)?;
            // bash-completion loads "NAME" (not "NAME.bash") from its completions directory.
            if shell == Shell::Bash {
                std::fs::rename(&written, d.join(&name))?;
            }
        }
        println!("{name}: {n} man pages, bash/zsh/fish completions");
    }
    Ok(())
}

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let (Some(out), None) = (args.next(), args.next()) else {
        eprintln!("usage: driftwatch-gen OUT_DIR");
        return ExitCode::from(2);
    };
    match generate(&PathBuf::from(out)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("driftwatch-gen: {e}");
            ExitCode::FAILURE
        }
    }
}
