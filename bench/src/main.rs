//! relay-bench: the benchmark harness of userpilot-heap-relay (see `BENCHMARKS.md` and
//! `bench/run.sh`).
//!
//! - [`load`]: pre-signed unique webhooks of every kind, driven at a URL in closed loop (fixed
//!   concurrency, for throughput) or open loop (fixed rate, latency measured from the intended
//!   send time so a stalled server cannot hide its queueing delay).
//! - [`sink`]: a fake Heap that answers 200 and counts requests and events.
//! - [`baseline`]: a bare axum server answering 202 with no work, the yardstick for ratios.
//! - [`postgres`]: the harness's own database on a Postgres server (for the relay on
//!   Postgres), and the server's durability settings as measured.
//! - [`sources`]: the relay with 1 source against the relay with 10 sources over 3 app ids
//!   (the cost of routing), a phase of the suite and a subcommand of its own.
//! - [`transforms`]: one relay with a source without a jq program, one with `.` and one with a
//!   reshaping program (the cost of transforms), a subcommand of its own and a phase of the
//!   smoke.
//! - [`erase`]: erasing one person (10,000 stored webhooks among others) while webhooks are
//!   posted at a fixed rate: the erasure's duration and the ingest latency during it against
//!   the same load without one; a subcommand of its own and a phase of the smoke.
//! - [`storage`]: a relay queue's stored bytes per webhook (SQLite pages in use, read beside
//!   the running relay; Postgres relation sizes), measured after the suite's ingest runs.
//! - [`compare`]: two relay binaries, old and new, on the storage path (ingest, a grown queue,
//!   stored bytes), alternating, with the baseline; a subcommand of its own and a phase of the
//!   smoke. [`section`] keeps its section (and the erasure's) in `BENCHMARKS.md`.
//! - [`suite`]: runs everything against the relay binary (on SQLite, and on Postgres with
//!   `--postgres`) and the baseline and writes the report ([`report`]) from its figures
//!   ([`results`]); [`smoke`] is the seconds-long version CI runs.

mod baseline;
mod compare;
mod drain;
mod erase;
mod load;
mod postgres;
mod procfs;
mod report;
mod results;
mod section;
mod server;
mod sink;
mod smoke;
mod sources;
mod storage;
mod suite;
mod transforms;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "relay-bench",
    about = "Benchmark harness for userpilot-heap-relay"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The whole benchmark: baseline and relay, every mode, forwarding; writes the report.
    Suite(suite::Options),
    /// The cost of routing alone: 1 source against 10 sources over 3 app ids; prints its
    /// section of the report.
    Sources(sources::Options),
    /// The cost of transforms alone: no program, `.` and a reshaping program, CPU per
    /// webhook; prints its section of the report.
    Transforms(transforms::Options),
    /// The cost of an erasure alone: erasing one person under a fixed-rate load, against the
    /// same load without; prints its section of the report.
    Erase(erase::Options),
    /// The storage path of two relay binaries, old against new, alternating, with the
    /// baseline; prints its section of the report.
    Compare(compare::Options),
    /// The drain of a backlog alone, for one binary or an old and a new one alternating.
    Drain(drain::Options),
    /// A seconds-long end-to-end check that the harness still works (for CI).
    Smoke {
        /// The relay binary to run.
        #[arg(long)]
        relay_bin: PathBuf,
    },
    /// The baseline server: answers 202 to `POST /webhooks/userpilot` and does nothing else.
    Baseline {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
    },
    /// One load run against any URL (prints the result as JSON).
    Load(load::Options),
    /// Renders the report again from the JSON a suite saved with `--json`.
    Render {
        #[arg(long)]
        json: PathBuf,
        #[arg(long, default_value = "BENCHMARKS.md")]
        out: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
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
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Suite(options) => suite::run(options).await,
            Command::Sources(options) => sources::run_cli(options).await,
            Command::Transforms(options) => transforms::run_cli(options).await,
            Command::Erase(options) => erase::run_cli(options).await,
            Command::Compare(options) => compare::run_cli(options).await,
            Command::Drain(options) => drain::run_cli(options).await,
            Command::Smoke { relay_bin } => smoke::run(&relay_bin).await,
            Command::Baseline { listen } => baseline::serve(listen).await,
            Command::Load(options) => load::run_cli(options).await,
            Command::Render { json, out } => report::render_file(&json, &out),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
