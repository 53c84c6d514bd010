//! `relay-bench drain`: the drain of a backlog alone (issue 17), for one relay binary or an old
//! and a new one alternating: each run queues `--webhooks` webhooks with the forwarder paused
//! on a fresh SQLite queue, releases it at `--limit` events/min and times the drain into the
//! fake Heap, with the relay's CPU per track event over the drain. Nothing is ingested while
//! it drains (the suite's `--drain` measures that); this is the forwarder and its bookkeeping
//! on a grown queue, as fast as the limit lets it.

use std::path::PathBuf;

use crate::load;
use crate::results::Drain;
use crate::section;
use crate::server::Server;
use crate::sink::Sink;
use crate::suite::backlog_drain;

/// `relay-bench drain`.
#[derive(clap::Args, Clone)]
pub struct Options {
    /// The relay binary to measure (with `--old-bin`, the new one).
    #[arg(long)]
    pub relay_bin: PathBuf,
    /// An older binary, measured in the same runs, alternating which goes first.
    #[arg(long)]
    pub old_bin: Option<PathBuf>,
    /// Webhooks queued before the release.
    #[arg(long, default_value_t = 200_000)]
    pub webhooks: usize,
    /// Heap events per minute configured for the drain.
    #[arg(long, default_value_t = 600_000)]
    pub limit: u32,
    /// Runs.
    #[arg(long, default_value_t = 1)]
    pub runs: usize,
    /// Distinct user ids in the generated webhooks.
    #[arg(long, default_value_t = 2000)]
    pub users: usize,
    /// Folder for the relays' queue files and logs (default: the system temp folder).
    #[arg(long)]
    pub scratch: Option<PathBuf>,
    /// More environment for the relays, `KEY=VALUE` (repeatable), e.g. `RELAY_LOG__LEVEL=info`.
    #[arg(long = "env", value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// Copy each relay's log here, as `<run>-<binary>.log`.
    #[arg(long)]
    pub logs: Option<PathBuf>,
}

fn parse_env(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(key, value)| (key.to_owned(), value.to_owned()))
        .ok_or_else(|| format!("{text:?} is not KEY=VALUE"))
}

/// Runs the drains and prints a line per drain and the medians.
pub async fn run_cli(options: Options) -> anyhow::Result<()> {
    let client = load::client();
    let sink = Sink::start().await?;
    let mut binaries = vec![("new", options.relay_bin.clone())];
    if let Some(old) = &options.old_bin {
        binaries.insert(0, ("old", old.clone()));
    }
    let mut figures: Vec<(&str, Drain)> = Vec::new();
    for run in 0..options.runs {
        let mut order = binaries.clone();
        if run % 2 == 1 {
            order.reverse();
        }
        for (name, bin) in order {
            let scratch = section::scratch(options.scratch.as_ref())?;
            let mut env = vec![("RELAY_HEAP__EVENTS_PER_MINUTE", options.limit.to_string())];
            env.extend(options.env.iter().map(|(k, v)| (k.as_str(), v.clone())));
            let relay = Server::relay(&client, &bin, &sink.url(), &env, scratch.path()).await?;
            let drain = backlog_drain(
                &client,
                &sink,
                &relay,
                options.webhooks,
                options.users,
                options.limit,
            )
            .await?;
            if let Some(logs) = &options.logs {
                std::fs::create_dir_all(logs)?;
                std::fs::copy(
                    relay.log_path(),
                    logs.join(format!("{}-{name}.log", run + 1)),
                )?;
            }
            relay.stop().await;
            let cpu_us = drain
                .relay_cpu_s
                .map(|cpu| cpu * 1e6 / drain.track_events.max(1) as f64);
            eprintln!(
                "run {} {name}: queued at {:.0}/s; {} events drained in {:.1} s: {:.0}/s \
                 ({:.1} % of {:.0}/s), relay CPU {} µs per event",
                run + 1,
                drain.ingest_per_s,
                drain.track_events,
                drain.drain_s,
                drain.events_per_s,
                100.0 * drain.events_per_s * 60.0 / f64::from(options.limit),
                f64::from(options.limit) / 60.0,
                cpu_us.map_or("?".into(), |us| format!("{us:.1}")),
            );
            figures.push((name, drain));
        }
    }
    for (name, _) in &binaries {
        let rates = figures
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, d)| d.events_per_s)
            .collect();
        let median = crate::report::median(rates).unwrap_or(f64::NAN);
        println!("{name}: median {median:.0} events/s");
    }
    Ok(())
}
