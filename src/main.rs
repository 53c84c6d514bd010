//! The binary: parse the command line, start the runtime, run the chosen subcommand
//! ([`commands`]), and turn its error into one line on standard error.

mod commands;

use std::process::ExitCode;

use clap::Parser;

use userpilot_heap_relay::cli::{Cli, Command};

/// mimalloc, not glibc's allocator: a webhook's buffers are allocated on the tokio workers and
/// freed on the queue thread, which glibc's per-thread arenas pay for (17 % of the
/// relay's CPU in the profile of BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's options, set before the first allocation, which the runtime makes before `main`:
/// hence a constructor (an `.init_array` entry, as the `ctor` crate makes), not a line in
/// `main`, and not `MIMALLOC_…` variables, which every deployment would have to remember.
/// - Arenas committed as they are used, not when reserved: eagerly, an idle relay's resident
///   set doubled (15 to 30 MiB).
/// - Arenas reserved 64 MiB at a time, not 1 GiB: a transform worker caps its address space at
///   1 GiB (`transform::worker`), which one default arena would take whole, and the worker
///   then fails to start its thread.
/// - Freed memory given back to the kernel at once, not after 10 ms: peak resident set at 512
///   connections 55.8–57.9 MiB with the delay, 51.8–52.6 MiB without (the suite's 64 MiB rule
///   had been exceeded by 0.9 MiB), for 1–6 % more CPU per webhook (BENCHMARKS.md).
///
/// ELF only (`.init_array`); elsewhere mimalloc runs with its defaults.
#[cfg(target_os = "linux")]
mod allocator_options {
    use libmimalloc_sys::{mi_option_set, mi_option_t};

    /// The options' numbers in mimalloc.h (v3), which libmimalloc-sys names no constants for.
    const ARENA_EAGER_COMMIT: mi_option_t = 4;
    const PURGE_DELAY: mi_option_t = 15;
    const ARENA_RESERVE: mi_option_t = 23;
    /// In KiB, as mimalloc takes sizes.
    const ARENA_RESERVE_KIB: std::ffi::c_long = 64 * 1024;

    extern "C" fn configure() {
        // SAFETY: sets three integer options of mimalloc's; nothing else runs yet.
        unsafe {
            mi_option_set(ARENA_EAGER_COMMIT, 0);
            mi_option_set(ARENA_RESERVE, ARENA_RESERVE_KIB);
            mi_option_set(PURGE_DELAY, 0);
        }
    }

    #[used]
    #[unsafe(link_section = ".init_array")]
    static CONFIGURE: extern "C" fn() = configure;
}

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
