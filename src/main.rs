//! The binary: parse the command line, start the runtime, run the chosen subcommand
//! ([`commands`]), and turn its error into one line on standard error.

mod commands;

use std::process::ExitCode;

use clap::Parser;

use userpilot_heap_relay::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::TransformWorker) = cli.command {
        // Before any runtime: a worker is one thread answering one pipe, as small as it can be.
        return commands::transform_worker();
    }
    // Before any subcommand builds an HTTP client: reqwest has no crypto provider of its own.
    userpilot_heap_relay::tls::provider();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(commands::run(cli)) {
        Ok(code) => code,
        Err(error) => {
            // A refused configuration lists every problem, one a line: each line says `error:`.
            for line in format!("{error:#}").lines() {
                eprintln!("error: {line}");
            }
            ExitCode::FAILURE
        }
    }
}
