//! The whole benchmark, in phases, each against fresh server processes:
//!
//! 1. Ingest: the baseline and the relay on SQLite (default Heap limits, forwarding to the
//!    sink) and, with `--postgres`, the relay on Postgres; closed loop at each concurrency, then
//!    open loop at each rate; runs interleaved (baseline, SQLite, Postgres, baseline, ...) so
//!    drifting background load hits all alike. Idle RSS before, peak RSS (VmHWM) after, and
//!    each relay's queue size per stored webhook ([`crate::storage`]). Then the highest rate
//!    again on fresh relays (empty queues).
//! 2. Forwarding at saturation: a relay with a high Heap limit; a backlog is queued while the
//!    forwarder is paused, then released: Heap requests per 1,000 events and drain rate. Then
//!    live: ingest and forwarding at once.
//! 3. Rate limit: a relay with a low limit drains a backlog; the sink's arrival times show
//!    whether the limit was reached and never exceeded.
//! 4. Routing (issue 12, [`crate::sources`]): the relay with 1 source against the relay with
//!    10 sources over 3 app ids, interleaved, then every event counted at its app id
//!    (`--no-sources` skips it).
//! 5. Optionally (`--drain N`), a large backlog drained at `--drain-limit` events/min, its
//!    resident set sampled every second, and ingest measured while it drains.
//!
//! The report replaces `--out`, keeping the sections only a subcommand of their own measures
//! (`erase`, `compare`; [`section::keep`]).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use hyper::Method;
use tokio::time::Instant;

use crate::load::{self, Client, Plan, RunResult};
use crate::postgres::BenchDatabase;
use crate::procfs;
use crate::report;
use crate::results::{
    ConnectionsMemory, Drain, DrainWatch, FRESH, FRESH_POSTGRES, LimitCheck, Machine, Memory,
    RELAY, RELAY_POSTGRES, Results,
};
use crate::section;
use crate::server::{SECRET, Server, postgres_queue};
use crate::sink::{Endpoint, Sink, summarize};
use crate::sources;
use crate::storage;
use crate::transforms;

#[derive(clap::Args, Clone)]
pub struct Options {
    /// The relay binary (a release build).
    #[arg(long)]
    pub relay_bin: PathBuf,
    /// Runs of each mode; the report shows their median.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Seconds measured per run.
    #[arg(long, default_value_t = 5.0)]
    pub duration: f64,
    /// Seconds of warm-up before each measured window.
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,
    /// Closed-loop concurrencies.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32,128")]
    pub concurrency: Vec<usize>,
    /// Open-loop rates, webhooks per second.
    #[arg(long, value_delimiter = ',', default_value = "500,1000,2000")]
    pub rates: Vec<u64>,
    /// Distinct user ids in the generated webhooks.
    #[arg(long, default_value_t = 2000)]
    pub users: usize,
    /// Connection counts for the memory probe (closed loop at each, on a fresh relay).
    #[arg(long, value_delimiter = ',', default_value = "32,128,512,2048")]
    pub memory_connections: Vec<usize>,
    /// Webhooks queued for the forwarding-at-saturation measurement.
    #[arg(long, default_value_t = 50_000)]
    pub backlog: usize,
    /// Heap events per minute configured for the saturation measurement (high enough that
    /// the relay itself, not its rate limiter, is the bottleneck).
    #[arg(long, default_value_t = 6_000_000)]
    pub saturation_limit: u32,
    /// Heap events per minute configured for the rate-limit check.
    #[arg(long, default_value_t = 30_000)]
    pub limit: u32,
    /// Webhooks queued for the rate-limit check.
    #[arg(long, default_value_t = 7_500)]
    pub limit_backlog: usize,
    /// Also queue this many webhooks and time their drain (slow: e.g. 1000000 takes many
    /// minutes). Off by default.
    #[arg(long)]
    pub drain: Option<usize>,
    /// Heap events per minute configured for the large drain (the rate it should hold).
    #[arg(long, default_value_t = 600_000)]
    pub drain_limit: u32,
    /// Where the report goes.
    #[arg(long, default_value = "BENCHMARKS.md")]
    pub out: PathBuf,
    /// Also write every figure as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// The commit measured (shown in the report).
    #[arg(long, default_value = "unknown")]
    pub commit: String,
    /// Folder for the relay's queue files and logs (default: the system temp folder).
    #[arg(long)]
    pub scratch: Option<PathBuf>,
    /// Also measure ingest with the relay's queue on this Postgres server (a postgres:// URL
    /// whose role may create databases; `bash bench/postgres.sh` sets up a durable one). The
    /// harness works in its own database, `--postgres-database`, dropped and created again.
    #[arg(long, env = "RELAY_BENCH_POSTGRES_URL", hide_env_values = true)]
    pub postgres: Option<String>,
    /// The harness's database on the `--postgres` server: dropped at the start and the end.
    #[arg(long, default_value = "relay_bench")]
    pub postgres_database: String,
    /// Closed-loop concurrencies of the routing comparison (1 source against 10).
    #[arg(long, value_delimiter = ',', default_value = "1,32,128")]
    pub sources_concurrency: Vec<usize>,
    /// Open-loop rates of the routing comparison.
    #[arg(long, value_delimiter = ',', default_value = "2000")]
    pub sources_rates: Vec<u64>,
    /// Skip the routing comparison (for a relay build that does not route by source).
    #[arg(long)]
    pub no_sources: bool,
    /// Closed-loop concurrency of the transforms comparison (no program, `.`, reshaping).
    #[arg(long, default_value_t = 8)]
    pub transforms_concurrency: usize,
    /// Skip the transforms comparison.
    #[arg(long)]
    pub no_transforms: bool,
}

/// Heap's largest bulk request, the relay's default `heap.batch_max_events`.
const FULL_BATCH: usize = 1000;

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.0))
}

/// A unique tag for generated webhooks.
pub(crate) fn tag(label: &str) -> String {
    format!(
        "{label}-{}",
        chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default()
    )
}

pub async fn run(options: Options) -> anyhow::Result<()> {
    let started = Instant::now();
    let scratch = match &options.scratch {
        Some(dir) => tempfile::Builder::new()
            .prefix("relay-bench")
            .tempdir_in(dir)?,
        None => tempfile::Builder::new().prefix("relay-bench").tempdir()?,
    };
    let client = load::client();
    let sink = Sink::start().await?;
    let load_before = procfs::load_average();
    let date = chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string();

    let mut results = Results {
        machine: Machine {
            cpu_model: procfs::cpu_model(),
            nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
            kernel: procfs::kernel(),
            load_before,
            load_after: String::new(),
            commit: options.commit.clone(),
            date,
            total_s: 0.0,
        },
        runs_per_mode: options.runs,
        duration_s: options.duration,
        warmup_s: options.warmup,
        users: options.users,
        runs: Vec::new(),
        memory: Memory::default(),
        saturation: None,
        live: None,
        limit: None,
        big_drain: None,
        big_drain_watch: None,
        notes: Vec::new(),
        postgres: None,
        routing: None,
        transforms: None,
        storage: None,
        storage_postgres: None,
    };

    let database = match &options.postgres {
        Some(url) => {
            let database = BenchDatabase::create(url, &options.postgres_database).await?;
            let setup = database.setup().await?;
            eprintln!(
                "== postgres {} at {}, database {}: fsync {}, synchronous_commit {}, \
                 full_page_writes {}{}",
                setup.version,
                setup.address,
                setup.database,
                setup.fsync,
                setup.synchronous_commit,
                setup.full_page_writes,
                if setup.durable() {
                    ""
                } else {
                    " (NOT durable)"
                }
            );
            results.postgres = Some(setup);
            Some(database)
        }
        None => None,
    };
    let database = database.as_ref();
    ingest_phase(
        &options,
        &client,
        &sink,
        scratch.path(),
        database,
        &mut results,
    )
    .await?;
    fresh_latency_phase(
        &options,
        &client,
        &sink,
        scratch.path(),
        database,
        &mut results,
    )
    .await?;
    if let Some(database) = database
        && let Err(error) = database.drop_database().await
    {
        eprintln!("warning: {error:#}");
    }
    memory_phase(&options, &client, &sink, scratch.path(), &mut results).await?;
    forwarding_phase(&options, &client, &sink, scratch.path(), &mut results).await?;
    limit_phase(&options, &client, &sink, scratch.path(), &mut results).await?;
    if !options.no_sources {
        routing_phase(&options, &client, &sink, scratch.path(), &mut results).await?;
    }
    if !options.no_transforms {
        transforms_phase(&options, &client, &sink, scratch.path(), &mut results).await?;
    }
    if let Some(webhooks) = options.drain {
        big_drain_phase(
            &options,
            &client,
            &sink,
            scratch.path(),
            webhooks,
            &mut results,
        )
        .await?;
    }

    results.machine.load_after = procfs::load_average();
    results.machine.total_s = started.elapsed().as_secs_f64();
    if let Some(path) = &options.json {
        std::fs::write(path, serde_json::to_string_pretty(&results)?)?;
    }
    // Sections measured alone and pasted into the report by hand stay as they were.
    let previous = std::fs::read_to_string(&options.out).unwrap_or_default();
    let markdown = section::keep(&previous, &report::render(&results));
    std::fs::write(&options.out, markdown)
        .with_context(|| format!("cannot write {}", options.out.display()))?;
    eprintln!(
        "wrote {} in {:.0} s",
        options.out.display(),
        results.machine.total_s
    );
    Ok(())
}

/// Phase 1: closed and open loop against the baseline and the relay, on SQLite and (with
/// `database`) on Postgres. Each relay keeps one queue through all its runs, which grows.
async fn ingest_phase(
    options: &Options,
    client: &Client,
    sink: &Sink,
    scratch: &std::path::Path,
    database: Option<&BenchDatabase>,
    results: &mut Results,
) -> anyhow::Result<()> {
    eprintln!(
        "== ingest: baseline, relay on SQLite{}",
        if database.is_some() {
            ", relay on Postgres"
        } else {
            ""
        }
    );
    let baseline = Server::baseline(client, scratch).await?;
    let relay = Server::relay(client, &options.relay_bin, &sink.url(), &[], scratch).await?;
    let relay_postgres = match database {
        Some(database) => Some(
            Server::relay(
                client,
                &options.relay_bin,
                &sink.url(),
                &postgres_queue(&database.url),
                scratch,
            )
            .await?
            .named(RELAY_POSTGRES),
        ),
        None => None,
    };
    // Let them settle (the relay's first forwarder pass, allocator warm-up) before "idle".
    tokio::time::sleep(Duration::from_secs(1)).await;
    results.memory.baseline_idle_mib = procfs::rss_mib(baseline.pid);
    results.memory.relay_idle_mib = procfs::rss_mib(relay.pid);
    results.memory.relay_postgres_idle_mib =
        relay_postgres.as_ref().and_then(|r| procfs::rss_mib(r.pid));

    let mut servers = vec![&baseline, &relay];
    servers.extend(relay_postgres.as_ref());
    let plan = |server: &Server| Plan {
        warmup: secs(options.warmup),
        duration: secs(options.duration),
        server_pid: Some(server.pid),
        database_pid: database
            .filter(|_| server.name == RELAY_POSTGRES)
            .and_then(|d| d.postmaster),
    };
    let window = options.warmup + options.duration;
    // Requests prepared per closed-loop run: twice the fastest rate seen so far for that
    // server (a guess to start), so a run rarely runs out; if it does, its window is shortened
    // and the run is flagged.
    let mut fastest = [20_000.0_f64, 8_000.0_f64, 8_000.0_f64];
    for &concurrency in &options.concurrency {
        for run in 1..=options.runs {
            for (index, &server) in servers.iter().enumerate() {
                let count = (fastest[index] * 2.0 * window) as usize + 1000;
                let pool = load::prepare(count, SECRET, &tag("closed"), options.users)?;
                let uri = server.webhook_uri()?;
                let mut result =
                    load::closed(client, &uri, Arc::new(pool), concurrency, plan(server)).await;
                result.server = server.name.into();
                result.run = run;
                fastest[index] = fastest[index].max(result.throughput);
                progress(&result);
                check_answers(&result).with_context(|| {
                    format!("{} log (last lines):\n{}", server.name, server.log_tail())
                })?;
                results.runs.push(result);
            }
        }
    }
    for &rate in &options.rates {
        for run in 1..=options.runs {
            for &server in &servers {
                let count = (rate as f64 * (window + 0.5)) as usize + 100;
                let pool = load::prepare(count, SECRET, &tag("open"), options.users)?;
                let uri = server.webhook_uri()?;
                let mut result = load::open(client, &uri, Arc::new(pool), rate, plan(server)).await;
                result.server = server.name.into();
                result.run = run;
                progress(&result);
                check_answers(&result).with_context(|| {
                    format!("{} log (last lines):\n{}", server.name, server.log_tail())
                })?;
                results.runs.push(result);
            }
        }
    }
    results.memory.baseline_peak_mib = procfs::peak_rss_mib(baseline.pid);
    results.memory.relay_peak_mib = procfs::peak_rss_mib(relay.pid);
    results.memory.relay_after_load_mib = procfs::rss_mib(relay.pid);
    results.memory.relay_postgres_peak_mib = relay_postgres
        .as_ref()
        .and_then(|r| procfs::peak_rss_mib(r.pid));
    // Stored bytes per webhook (issue 17): the queues as the runs left them, read beside the
    // running relays. A figure that cannot be read is a warning, not a failed suite.
    results.storage = relay
        .queue_file()
        .map(storage::sqlite_queue)?
        .await
        .inspect_err(|error| eprintln!("warning: the SQLite queue's size: {error:#}"))
        .ok();
    if let Some(database) = database {
        results.storage_postgres = storage::postgres_queue(&database.url)
            .await
            .inspect_err(|error| eprintln!("warning: the Postgres queue's size: {error:#}"))
            .ok();
    }
    for stored in results.storage.iter().chain(&results.storage_postgres) {
        eprintln!(
            "   {} queue: {} webhooks, {} bytes in use, {:.0} bytes per webhook",
            stored.backend,
            stored.webhooks,
            stored.bytes,
            stored.bytes_per_webhook().unwrap_or(f64::NAN)
        );
    }
    for relay in servers.iter().skip(1) {
        let warnings = relay.log_tail();
        if !warnings.trim().is_empty() {
            eprintln!("{} log (last lines):\n{warnings}", relay.name);
        }
    }
    baseline.stop().await;
    relay.stop().await;
    if let Some(relay) = relay_postgres {
        relay.stop().await;
    }
    Ok(())
}

/// Phase 1b: the highest open-loop rate again, on fresh relays (empty queues: the Postgres
/// database is dropped and created again), since the ingest relays' queues have grown by then.
async fn fresh_latency_phase(
    options: &Options,
    client: &Client,
    sink: &Sink,
    scratch: &std::path::Path,
    database: Option<&BenchDatabase>,
    results: &mut Results,
) -> anyhow::Result<()> {
    let Some(rate) = options.rates.iter().copied().max() else {
        return Ok(());
    };
    eprintln!("== open loop at {rate}/s on fresh relays (empty queues)");
    let relay = Server::relay(client, &options.relay_bin, &sink.url(), &[], scratch)
        .await?
        .named(FRESH);
    let relay_postgres = match database {
        Some(database) => {
            database.recreate().await?;
            Some(
                Server::relay(
                    client,
                    &options.relay_bin,
                    &sink.url(),
                    &postgres_queue(&database.url),
                    scratch,
                )
                .await?
                .named(FRESH_POSTGRES),
            )
        }
        None => None,
    };
    let mut servers = vec![&relay];
    servers.extend(relay_postgres.as_ref());
    for run in 1..=options.runs {
        for &server in &servers {
            let count = (rate as f64 * (options.warmup + options.duration + 0.5)) as usize + 100;
            let pool = load::prepare(count, SECRET, &tag("fresh"), options.users)?;
            let plan = Plan {
                warmup: secs(options.warmup),
                duration: secs(options.duration),
                server_pid: Some(server.pid),
                database_pid: database
                    .filter(|_| server.name == FRESH_POSTGRES)
                    .and_then(|d| d.postmaster),
            };
            let mut result =
                load::open(client, &server.webhook_uri()?, Arc::new(pool), rate, plan).await;
            result.server = server.name.into();
            result.run = run;
            progress(&result);
            check_answers(&result).with_context(|| {
                format!("{} log (last lines):\n{}", server.name, server.log_tail())
            })?;
            results.runs.push(result);
        }
    }
    relay.stop().await;
    if let Some(relay) = relay_postgres {
        relay.stop().await;
    }
    Ok(())
}

/// Phase 1c: peak memory against the number of connections, on a fresh relay.
async fn memory_phase(
    options: &Options,
    client: &Client,
    sink: &Sink,
    scratch: &std::path::Path,
    results: &mut Results,
) -> anyhow::Result<()> {
    if options.memory_connections.is_empty() {
        return Ok(());
    }
    eprintln!("== memory against connections");
    let relay = Server::relay(client, &options.relay_bin, &sink.url(), &[], scratch).await?;
    let mut levels = options.memory_connections.clone();
    levels.sort_unstable();
    for connections in levels {
        let pool = load::prepare(40_000, SECRET, &tag("memory"), options.users)?;
        let plan = Plan {
            warmup: Duration::from_millis(500),
            duration: Duration::from_secs(2),
            server_pid: Some(relay.pid),
            database_pid: None,
        };
        let uri = relay.webhook_uri()?;
        let result = load::closed(client, &uri, Arc::new(pool), connections, plan).await;
        let peak_mib = procfs::peak_rss_mib(relay.pid);
        eprintln!(
            "   {connections} connections: peak RSS {:.1} MiB, {:.0} req/s",
            peak_mib.unwrap_or(f64::NAN),
            result.throughput
        );
        results.memory.by_connections.push(ConnectionsMemory {
            connections,
            peak_mib,
            throughput: result.throughput,
            p99_ms: result.p99_ms,
        });
    }
    relay.stop().await;
    Ok(())
}

pub(crate) fn progress(result: &RunResult) {
    let unit = if result.mode == "closed" { "c" } else { "rate" };
    eprintln!(
        "{:<20} {} {unit}={:<5} run {}: {:>8.0} req/s  p50 {:>7.2} ms  p99 {:>7.2} ms  p99.9 {:>7.2} ms  cpu {:>5.2} s{}{}",
        result.server,
        result.mode,
        result.param,
        result.run,
        result.throughput,
        result.p50_ms,
        result.p99_ms,
        result.p999_ms,
        result.server_cpu_s.unwrap_or(f64::NAN),
        if result.refused + result.failed > 0 {
            format!("  ({} refused, {} failed)", result.refused, result.failed)
        } else {
            String::new()
        },
        if result.exhausted {
            "  (ran out of requests)"
        } else {
            ""
        },
    );
}

/// The relay must accept (not deduplicate or quarantine) every generated webhook.
pub(crate) fn check_answers(result: &RunResult) -> anyhow::Result<()> {
    if result.ok() == 0 {
        bail!(
            "{} {} {}: no request succeeded ({} refused, {} failed)",
            result.server,
            result.mode,
            result.param,
            result.refused,
            result.failed
        );
    }
    if result.duplicate + result.quarantined > 0 {
        bail!(
            "{}: {} duplicates and {} quarantined among generated webhooks",
            result.server,
            result.duplicate,
            result.quarantined
        );
    }
    Ok(())
}

/// Queues `webhooks` unique webhooks as fast as the relay takes them (32 in flight), in chunks
/// signed just before they are sent (signatures are only valid for a few minutes).
pub(crate) async fn queue_backlog(
    client: &Client,
    relay: &Server,
    webhooks: usize,
    users: usize,
) -> anyhow::Result<RunResult> {
    const CHUNK: usize = 100_000;
    let uri = relay.webhook_uri()?;
    let mut total: Option<RunResult> = None;
    let mut left = webhooks;
    while left > 0 {
        let count = left.min(CHUNK);
        left -= count;
        let pool = load::prepare(count, SECRET, &tag("backlog"), users)?;
        let plan = Plan {
            warmup: Duration::ZERO,
            duration: Duration::from_secs(3600),
            server_pid: Some(relay.pid),
            database_pid: None,
        };
        let part = load::closed(client, &uri, Arc::new(pool), 32, plan).await;
        if part.accepted != count as u64 {
            bail!(
                "queuing the backlog: {} of {count} accepted ({} duplicate, {} quarantined, {} refused, {} failed)",
                part.accepted,
                part.duplicate,
                part.quarantined,
                part.refused,
                part.failed
            );
        }
        total = Some(match total {
            None => part,
            Some(mut sum) => {
                sum.elapsed_s += part.elapsed_s;
                sum.accepted += part.accepted;
                sum.completed += part.completed;
                sum.events += part.events;
                sum
            }
        });
        if webhooks > CHUNK {
            eprintln!("   queued {} of {webhooks}", webhooks - left);
        }
    }
    total.context("empty backlog")
}

/// Waits (polling) until the sink has `events` track events and the relay's queue is empty.
async fn wait_delivered(
    client: &Client,
    sink: &Sink,
    relay: &Server,
    events: u64,
    within: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    while (sink.count(Endpoint::Track).1 as u64) < events {
        if Instant::now() > deadline {
            bail!(
                "the sink got {} of {events} events within {within:?}; relay log:\n{}",
                sink.count(Endpoint::Track).1,
                relay.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // User-property records travel in their own lane; wait for the queue to empty.
    while relay.unsent(client).await? > 0 {
        if Instant::now() > deadline {
            bail!("the relay's queue did not empty within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// What the sink saw of a drain of `events` track events released at `released`.
fn drain_figures(
    sink: &Sink,
    ingest: &RunResult,
    released: Instant,
    relay_cpu_s: Option<f64>,
) -> Drain {
    let released = released.into_std();
    let hits = sink.hits();
    let (track_requests, track_events) = summarize(&hits, Endpoint::Track);
    let (user_requests, users) = summarize(&hits, Endpoint::UserProperties);
    let (account_requests, _) = summarize(&hits, Endpoint::AccountProperties);
    let last_track = hits
        .iter()
        .filter(|hit| hit.endpoint == Endpoint::Track)
        .map(|hit| hit.at)
        .max()
        .unwrap_or(released);
    let drain_s = last_track
        .saturating_duration_since(released)
        .as_secs_f64()
        .max(1e-9);
    let per_1000 = |requests: usize| requests as f64 * 1000.0 / (track_events.max(1) as f64);
    Drain {
        webhooks: ingest.accepted,
        events: ingest.events,
        ingest_s: ingest.elapsed_s,
        ingest_per_s: ingest.accepted as f64 / ingest.elapsed_s.max(1e-9),
        drain_s,
        events_per_s: track_events as f64 / drain_s,
        track_requests,
        track_events,
        user_requests,
        users,
        account_requests,
        track_requests_per_1000: per_1000(track_requests),
        all_requests_per_1000: per_1000(track_requests + user_requests + account_requests),
        mean_batch: track_events as f64 / track_requests.max(1) as f64,
        full_batches: hits
            .iter()
            .filter(|hit| hit.endpoint == Endpoint::Track && hit.items >= FULL_BATCH)
            .count(),
        relay_cpu_s,
    }
}

/// Queues a backlog with the forwarder paused, releases it and times the drain.
pub(crate) async fn backlog_drain(
    client: &Client,
    sink: &Sink,
    relay: &Server,
    webhooks: usize,
    users: usize,
    events_per_minute: u32,
) -> anyhow::Result<Drain> {
    relay
        .admin(client, Method::POST, "/admin/forwarder/pause")
        .await?;
    let ingest = queue_backlog(client, relay, webhooks, users).await?;
    sink.clear();
    let cpu_before = procfs::cpu_seconds(relay.pid);
    let released = Instant::now();
    relay
        .admin(client, Method::POST, "/admin/forwarder/resume")
        .await?;
    // Generous: the limit's pace, or 2,000 events/s, whichever is slower, plus a minute.
    let pace = (events_per_minute as f64 / 60.0).min(2000.0);
    let within = Duration::from_secs_f64(ingest.events as f64 / pace + 60.0);
    wait_delivered(client, sink, relay, ingest.events, within).await?;
    let cpu = procfs::cpu_seconds(relay.pid)
        .zip(cpu_before)
        .map(|(after, before)| after - before);
    Ok(drain_figures(sink, &ingest, released, cpu))
}

/// Phase 2: forwarding at saturation (a released backlog), then live.
async fn forwarding_phase(
    options: &Options,
    client: &Client,
    sink: &Sink,
    scratch: &std::path::Path,
    results: &mut Results,
) -> anyhow::Result<()> {
    eprintln!(
        "== forwarding at saturation: {} webhooks queued, then released (limit {}/min)",
        options.backlog, options.saturation_limit
    );
    let limit = [(
        "RELAY_HEAP__EVENTS_PER_MINUTE",
        options.saturation_limit.to_string(),
    )];
    let relay = Server::relay(client, &options.relay_bin, &sink.url(), &limit, scratch).await?;
    let drain = backlog_drain(
        client,
        sink,
        &relay,
        options.backlog,
        options.users,
        options.saturation_limit,
    )
    .await?;
    eprintln!(
        "   {} events in {:.2} s ({:.0}/s): {} track requests ({:.3} per 1000 events), {} user-property requests",
        drain.track_events,
        drain.drain_s,
        drain.events_per_s,
        drain.track_requests,
        drain.track_requests_per_1000,
        drain.user_requests
    );
    results.saturation = Some(drain);

    eprintln!("== forwarding live: closed loop (32) while the forwarder runs");
    sink.clear();
    let window = options.duration;
    let pool = load::prepare(
        (8000.0 * window) as usize + 1000,
        SECRET,
        &tag("live"),
        options.users,
    )?;
    let plan = Plan {
        warmup: Duration::ZERO,
        duration: secs(window),
        server_pid: Some(relay.pid),
        database_pid: None,
    };
    let cpu_before = procfs::cpu_seconds(relay.pid);
    let released = Instant::now();
    let mut ingest = load::closed(client, &relay.webhook_uri()?, Arc::new(pool), 32, plan).await;
    ingest.server = RELAY.into();
    // Only the requests answered inside the window are counted by `closed`; the few answered
    // after it are accepted too, so wait for the relay's own count of queued events instead.
    let within = Duration::from_secs(120);
    let deadline = Instant::now() + within;
    while relay.unsent(client).await? > 0 {
        if Instant::now() > deadline {
            bail!("live forwarding did not catch up within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let cpu = procfs::cpu_seconds(relay.pid)
        .zip(cpu_before)
        .map(|(after, before)| after - before);
    let live = drain_figures(sink, &ingest, released, cpu);
    eprintln!(
        "   ingest {:.0} webhooks/s while forwarding; {} track requests for {} events ({:.3} per 1000)",
        live.ingest_per_s, live.track_requests, live.track_events, live.track_requests_per_1000
    );
    results.live = Some(live);
    results.memory.forwarding_peak_mib = procfs::peak_rss_mib(relay.pid);
    relay.stop().await;
    Ok(())
}

/// Phase 3: a low Heap limit, reached but not exceeded.
async fn limit_phase(
    options: &Options,
    client: &Client,
    sink: &Sink,
    scratch: &std::path::Path,
    results: &mut Results,
) -> anyhow::Result<()> {
    eprintln!(
        "== rate limit: {} webhooks drained at {} events/min",
        options.limit_backlog, options.limit
    );
    let env = [("RELAY_HEAP__EVENTS_PER_MINUTE", options.limit.to_string())];
    let relay = Server::relay(client, &options.relay_bin, &sink.url(), &env, scratch).await?;
    let drain = backlog_drain(
        client,
        sink,
        &relay,
        options.limit_backlog,
        options.users,
        options.limit,
    )
    .await?;
    relay.stop().await;

    // The relay's budget: a burst of one full batch (heap.batch_max_events, 1000 by default,
    // at most the limit), then `limit / 60` events a second.
    let burst = options.limit.min(FULL_BATCH as u32);
    let rate = options.limit as f64 / 60.0;
    let mut track: Vec<_> = sink
        .hits()
        .into_iter()
        .filter(|hit| hit.endpoint == Endpoint::Track)
        .collect();
    track.sort_by_key(|hit| hit.at);
    let (Some(first), Some(last)) = (track.first().copied(), track.last().copied()) else {
        bail!("the rate-limit drain delivered nothing");
    };
    let mut delivered = 0usize;
    let mut worst = f64::MIN;
    for hit in &track {
        delivered += hit.items;
        let bound = burst as f64 + rate * hit.at.duration_since(first.at).as_secs_f64();
        worst = worst.max(delivered as f64 - bound);
    }
    let span_s = last.at.duration_since(first.at).as_secs_f64();
    let steady_per_min = if span_s > 0.0 {
        (delivered - first.items) as f64 / span_s * 60.0
    } else {
        0.0
    };
    let mut max_in_10s = 0;
    for (i, start) in track.iter().enumerate() {
        let in_window: usize = track[i..]
            .iter()
            .take_while(|hit| hit.at.duration_since(start.at) < Duration::from_secs(10))
            .map(|hit| hit.items)
            .sum();
        max_in_10s = max_in_10s.max(in_window);
    }
    eprintln!(
        "   steady {steady_per_min:.0} events/min (limit {}), worst excess over the budget {worst:.1} events",
        options.limit
    );
    results.limit = Some(LimitCheck {
        configured_per_min: options.limit,
        burst,
        drain,
        steady_per_min,
        worst_excess_events: worst,
        max_in_10s,
        span_s,
    });
    Ok(())
}

/// Phase 4: the cost of routing, 1 source against 10 over 3 app ids ([`sources::measure`]).
async fn routing_phase(
    options: &Options,
    client: &Client,
    sink: &Sink,
    scratch: &std::path::Path,
    results: &mut Results,
) -> anyhow::Result<()> {
    eprintln!(
        "== routing: 1 source against {} sources over {} app ids",
        sources::SOURCES,
        sources::APP_IDS
    );
    let settings = sources::Settings {
        runs: options.runs,
        duration: options.duration,
        warmup: options.warmup,
        concurrency: options.sources_concurrency.clone(),
        rates: options.sources_rates.clone(),
        users: options.users,
        events_per_minute: options.saturation_limit,
        extra_env: Vec::new(),
    };
    let (runs, routing) =
        sources::measure(&settings, client, sink, &options.relay_bin, scratch).await?;
    results.runs.extend(runs);
    results.routing = Some(routing);
    Ok(())
}

/// Phase 4b: the cost of transforms, no program against `.` and a reshaping program
/// ([`transforms::measure`]). A build that does not know `transform` yet is noted, not failed.
async fn transforms_phase(
    options: &Options,
    client: &Client,
    sink: &Sink,
    scratch: &std::path::Path,
    results: &mut Results,
) -> anyhow::Result<()> {
    if let Err(answer) = transforms::accepts_transforms(&options.relay_bin, scratch)? {
        eprintln!("== transforms: not measured, this build does not know `transform`: {answer}");
        return Ok(());
    }
    eprintln!("== transforms: no program, `.` and a reshaping program");
    let settings = transforms::Settings {
        runs: options.runs.max(3),
        duration: options.duration,
        warmup: options.warmup,
        concurrency: options.transforms_concurrency,
        users: options.users,
        in_process_runs: transforms::IN_PROCESS_RUNS,
        extra_env: Vec::new(),
    };
    let comparison =
        transforms::measure(&settings, client, sink, &options.relay_bin, scratch).await?;
    results.transforms = Some(comparison);
    Ok(())
}

/// Phase 5 (opt-in): a large backlog.
async fn big_drain_phase(
    options: &Options,
    client: &Client,
    sink: &Sink,
    scratch: &std::path::Path,
    webhooks: usize,
    results: &mut Results,
) -> anyhow::Result<()> {
    eprintln!("== large backlog: {webhooks} webhooks queued, then released");
    let limit = [(
        "RELAY_HEAP__EVENTS_PER_MINUTE",
        options.drain_limit.to_string(),
    )];
    let relay = Server::relay(client, &options.relay_bin, &sink.url(), &limit, scratch).await?;
    relay
        .admin(client, Method::POST, "/admin/forwarder/pause")
        .await?;
    let backlog = queue_backlog(client, &relay, webhooks, options.users).await?;
    eprintln!(
        "   queued in {:.0} s ({:.0}/s); releasing",
        backlog.elapsed_s,
        backlog.accepted as f64 / backlog.elapsed_s.max(1e-9)
    );
    sink.clear();
    let cpu_before = procfs::cpu_seconds(relay.pid);
    let released = Instant::now();
    relay
        .admin(client, Method::POST, "/admin/forwarder/resume")
        .await?;

    // Resident set once a second until the drain ends.
    let (stop_sampling, mut stop) = tokio::sync::oneshot::channel::<()>();
    let sampler = tokio::spawn({
        let pid = relay.pid;
        async move {
            let mut samples = Vec::new();
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = tick.tick() => samples.extend(procfs::rss_mib(pid)),
                    _ = &mut stop => return samples,
                }
            }
        }
    });

    // Ingest while it drains: the latency target's rate, then full speed.
    let uri = relay.webhook_uri()?;
    let plan = || Plan {
        warmup: secs(options.warmup),
        duration: secs(options.duration),
        server_pid: Some(relay.pid),
        database_pid: None,
    };
    let count = (report::P99_RATE as f64 * (options.warmup + options.duration) * 1.2) as usize;
    let pool = Arc::new(load::prepare(
        count,
        SECRET,
        &tag("drain-open"),
        options.users,
    )?);
    let mut open = load::open(client, &uri, pool, report::P99_RATE, plan()).await;
    open.server = "relay (draining)".into();
    let pool = Arc::new(load::prepare(
        400_000,
        SECRET,
        &tag("drain-closed"),
        options.users,
    )?);
    let mut closed = load::closed(client, &uri, pool, 32, plan()).await;
    closed.server = "relay (draining)".into();
    let events = backlog.events + open.events + closed.events;

    let pace = (options.drain_limit as f64 / 60.0).min(2000.0);
    let within = Duration::from_secs_f64(events as f64 / pace + 60.0);
    wait_delivered(client, sink, &relay, events, within).await?;
    let _ = stop_sampling.send(());
    let rss_mib = sampler.await.unwrap_or_default();
    let cpu = procfs::cpu_seconds(relay.pid)
        .zip(cpu_before)
        .map(|(after, before)| after - before);
    let drain = drain_figures(sink, &backlog, released, cpu);
    eprintln!(
        "   {} events drained in {:.1} s ({:.0}/s of {:.0}/s configured); ingest while draining: \
         {:.0}/s closed loop, p99 {:.2} ms at {}/s",
        drain.track_events,
        drain.drain_s,
        drain.events_per_s,
        options.drain_limit as f64 / 60.0,
        closed.throughput,
        open.p99_ms,
        report::P99_RATE
    );
    results.memory.drain_peak_mib = procfs::peak_rss_mib(relay.pid);
    results.big_drain = Some(drain);
    results.big_drain_watch = Some(DrainWatch {
        events_per_minute: options.drain_limit,
        rss_mib,
        ingest: vec![open, closed],
    });
    relay.stop().await;
    Ok(())
}
