//! The cost of routing (issue 12): the relay with one source (the top-level keys, webhooks at
//! `/webhooks/userpilot`) against the relay with ten (`[sources.s0]`..`[sources.s9]`, their app
//! ids spread over three), in the same harness, run after run.
//!
//! Both relays run side by side for the whole comparison, forwarding to the one fake Heap, with
//! their forwarders paused, so the runs measure what routing adds at ingest (finding the
//! source, checking its secrets, storing into its app id's lane) and not the work of three
//! forwarding lanes instead of one. The ten-source load spreads its webhooks evenly over the ten
//! URLs, each signed with its source's secret. Runs alternate which relay goes first. Then both
//! forwarders are released and every lane drains into the sink, which counts track events per
//! app id: each app id must get every event its sources accepted.
//!
//! [`measure`] is the phase (the suite's, the smoke's and `relay-bench sources`'); [`run_cli`]
//! is that subcommand.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use hyper::{Method, Uri};
use tokio::time::Instant;

use crate::load::{self, Client, Plan, RunResult, Sent};
use crate::procfs;
use crate::report;
use crate::results::{
    Delivery, Machine, Memory, ONE_SOURCE, Results, RoutedSource, Routing, TEN_SOURCES,
};
use crate::server::{self, APP_ID, SECRET, Server, SourceSpec, Sources};
use crate::sink::{Endpoint, Sink};
use crate::suite::{check_answers, progress, tag};

/// Sources of the routing relay, and the app ids they share.
pub const SOURCES: usize = 10;
pub const APP_IDS: usize = 3;

/// `s0`..`s9`, each its own secret; source `i` goes to app id `i * 3 / 10`: s0–s3 →
/// `bench-app-a`, s4–s6 → `bench-app-b`, s7–s9 → `bench-app-c`.
pub fn ten_sources() -> Vec<SourceSpec> {
    (0..SOURCES)
        .map(|i| SourceSpec {
            name: format!("s{i}"),
            // Longer than the relay's 16-character minimum, so it logs no warning.
            secret: format!("bench-source-secret-s{i}"),
            app_id: app_id(i * APP_IDS / SOURCES),
            transform: None,
        })
        .collect()
}

fn app_id(lane: usize) -> String {
    let letter = char::from(b'a' + u8::try_from(lane % 26).unwrap_or(0));
    format!("{APP_ID}-{letter}")
}

/// What one comparison runs.
#[derive(Debug, Clone)]
pub struct Settings {
    pub runs: usize,
    pub duration: f64,
    pub warmup: f64,
    pub concurrency: Vec<usize>,
    pub rates: Vec<u64>,
    pub users: usize,
    /// `heap.events_per_minute` and `heap.identity_events_per_minute` of both relays: high,
    /// so that the drain after the runs is quick.
    pub events_per_minute: u32,
    /// More environment for both relays (the smoke's short linger).
    pub extra_env: Vec<(&'static str, String)>,
}

/// `relay-bench sources`: the comparison alone.
#[derive(clap::Args, Clone)]
pub struct Options {
    /// The relay binary (a release build).
    #[arg(long)]
    pub relay_bin: PathBuf,
    /// Runs of each mode per relay; the report shows their median.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Seconds measured per run.
    #[arg(long, default_value_t = 5.0)]
    pub duration: f64,
    /// Seconds of warm-up before each measured window.
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,
    /// Closed-loop concurrencies (a subset of the ingest phase's).
    #[arg(long, value_delimiter = ',', default_value = "1,32,128")]
    pub concurrency: Vec<usize>,
    /// Open-loop rates, webhooks per second.
    #[arg(long, value_delimiter = ',', default_value = "2000")]
    pub rates: Vec<u64>,
    /// Distinct user ids in the generated webhooks.
    #[arg(long, default_value_t = 2000)]
    pub users: usize,
    /// Heap events per minute (per app id, and per identity) for the drain after the runs.
    #[arg(long, default_value_t = 6_000_000)]
    pub events_per_minute: u32,
    /// Also write the section as Markdown here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Also write every figure as JSON here (`relay-bench render` reads it).
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// The commit measured (shown in the output).
    #[arg(long, default_value = "unknown")]
    pub commit: String,
    /// Folder for the relays' queue files and logs (default: the system temp folder).
    #[arg(long)]
    pub scratch: Option<PathBuf>,
}

impl Options {
    fn settings(&self) -> Settings {
        Settings {
            runs: self.runs,
            duration: self.duration,
            warmup: self.warmup,
            concurrency: self.concurrency.clone(),
            rates: self.rates.clone(),
            users: self.users,
            events_per_minute: self.events_per_minute,
            extra_env: Vec::new(),
        }
    }
}

/// Whether `binary` accepts the ten-source configuration: `Err` with its answer if it refuses
/// `[sources.*]` as an unknown key (a build from before issue 12). Any other refusal is an
/// error of its own: the configuration this harness writes should be valid.
pub fn accepts_sources(binary: &Path, scratch: &Path) -> anyhow::Result<Result<(), String>> {
    let sources = ten_sources();
    match server::check_config(binary, Sources::Named(&sources), scratch)? {
        None => Ok(Ok(())),
        Some(answer)
            if answer.contains("unknown key `sources`")
                || answer.contains("unknown field `sources`") =>
        {
            Ok(Err(answer))
        }
        Some(answer) => bail!("the relay refused the ten-source configuration:\n{answer}"),
    }
}

/// The comparison: both relays, every run, the drain and the count per app id. Clears `sink`
/// first; the returned runs are named [`ONE_SOURCE`] and [`TEN_SOURCES`].
pub async fn measure(
    settings: &Settings,
    client: &Client,
    sink: &Sink,
    relay_bin: &Path,
    scratch: &Path,
) -> anyhow::Result<(Vec<RunResult>, Routing)> {
    if let Err(answer) = accepts_sources(relay_bin, scratch)? {
        bail!(
            "this relay build does not know `[sources.NAME]` yet (issue 12); check-config \
             said:\n{answer}"
        );
    }
    let sources = ten_sources();
    let limit = settings.events_per_minute.to_string();
    let mut env = vec![
        ("RELAY_HEAP__EVENTS_PER_MINUTE", limit.clone()),
        ("RELAY_HEAP__IDENTITY_EVENTS_PER_MINUTE", limit),
    ];
    env.extend(settings.extra_env.iter().cloned());
    sink.clear();
    let one = Server::relay_with(
        client,
        relay_bin,
        &sink.url(),
        Sources::Default,
        &env,
        scratch,
    )
    .await?
    .named(ONE_SOURCE);
    let ten = Server::relay_with(
        client,
        relay_bin,
        &sink.url(),
        Sources::Named(&sources),
        &env,
        scratch,
    )
    .await?
    .named(TEN_SOURCES);

    let one_uris = vec![one.webhook_uri()?];
    let ten_uris = sources
        .iter()
        .map(|source| ten.source_uri(&source.name))
        .collect::<anyhow::Result<Vec<Uri>>>()?;
    // A relay that does not serve a URL answers 404 to everything sent there: say so once,
    // instead of a run of refusals.
    for (relay, uris) in [(&one, &one_uris), (&ten, &ten_uris)] {
        for uri in uris {
            let status = relay.unsigned_post_status(client, uri).await?;
            if status == 404 {
                bail!(
                    "{}: POST {} answered 404: this relay build does not serve that source \
                     (routing by source is issue 12)",
                    relay.name,
                    uri.path()
                );
            }
        }
    }
    for relay in [&one, &ten] {
        relay
            .admin(client, Method::POST, "/admin/forwarder/pause")
            .await?;
    }

    let secrets: Vec<&str> = sources.iter().map(|s| s.secret.as_str()).collect();
    let plan = |server: &Server| Plan {
        warmup: Duration::from_secs_f64(settings.warmup.max(0.0)),
        duration: Duration::from_secs_f64(settings.duration.max(0.0)),
        server_pid: Some(server.pid),
        database_pid: None,
    };
    let window = settings.warmup + settings.duration;
    let mut runs = Vec::new();
    // Per relay: requests to prepare for the next closed-loop run (twice the fastest seen).
    let mut fastest = [8_000.0_f64, 8_000.0_f64];
    let order = |run: usize| if run % 2 == 1 { [0, 1] } else { [1, 0] };
    for &concurrency in &settings.concurrency {
        for run in 1..=settings.runs {
            for index in order(run) {
                let (relay, uris) = if index == 0 {
                    (&one, &one_uris)
                } else {
                    (&ten, &ten_uris)
                };
                let count = (fastest[index] * 2.0 * window) as usize + 1000;
                let pool = prepare(index, count, &secrets, "sources-closed", settings.users)?;
                let mut result =
                    load::closed_to(client, uris, Arc::new(pool), concurrency, plan(relay)).await;
                result.server = relay.name.into();
                result.run = run;
                fastest[index] = fastest[index].max(result.throughput);
                progress(&result);
                check_answers(&result).with_context(|| log_of(relay))?;
                runs.push(result);
            }
        }
    }
    for &rate in &settings.rates {
        for run in 1..=settings.runs {
            for index in order(run) {
                let (relay, uris) = if index == 0 {
                    (&one, &one_uris)
                } else {
                    (&ten, &ten_uris)
                };
                let count = (rate as f64 * (window + 0.5)) as usize + 100;
                let pool = prepare(index, count, &secrets, "sources-open", settings.users)?;
                let mut result =
                    load::open_to(client, uris, Arc::new(pool), rate, plan(relay)).await;
                result.server = relay.name.into();
                result.run = run;
                progress(&result);
                check_answers(&result).with_context(|| log_of(relay))?;
                runs.push(result);
            }
        }
    }

    // What each URL took over all runs.
    let totals = |server: &str, targets: usize| {
        let mut totals = vec![Sent::default(); targets];
        for result in runs.iter().filter(|r| r.server == server) {
            for (total, sent) in totals.iter_mut().zip(&result.sent) {
                total.merge(sent);
            }
        }
        totals
    };
    let one_sent = totals(ONE_SOURCE, 1);
    let ten_sent = totals(TEN_SOURCES, sources.len());

    eprintln!("== routing: both forwarders released, draining every lane");
    let released = Instant::now();
    for relay in [&one, &ten] {
        relay
            .admin(client, Method::POST, "/admin/forwarder/resume")
            .await?;
    }
    let expected: u64 = one_sent
        .iter()
        .chain(&ten_sent)
        .map(|s| s.events + s.failed)
        .sum();
    // Generous: 2,000 events/s (far below either relay's drain), plus a minute.
    let within = Duration::from_secs_f64(expected as f64 / 2000.0 + 60.0);
    let deadline = Instant::now() + within;
    for relay in [&one, &ten] {
        while relay.unsent(client).await? > 0 {
            if Instant::now() > deadline {
                bail!(
                    "{}: its queue did not empty within {within:?}; {}",
                    relay.name,
                    log_of(relay)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let drain_s = released.elapsed().as_secs_f64();

    let deliveries = deliveries(
        &sink.count_by_app_id(Endpoint::Track),
        one_sent.first().copied().unwrap_or_default(),
        &sources,
        &ten_sent,
    );
    for row in deliveries
        .iter()
        .filter(|row| !report::delivered_in_full(row))
    {
        eprintln!(
            "warning: {} app id {:?}: {} track events queued, {} at the fake Heap",
            row.server, row.app_id, row.expected_events, row.delivered_events
        );
    }

    let routing = Routing {
        sources: sources
            .iter()
            .zip(&ten_sent)
            .map(|(source, sent)| RoutedSource {
                name: source.name.clone(),
                app_id: source.app_id.clone(),
                sent: *sent,
            })
            .collect(),
        deliveries,
        events_per_minute: settings.events_per_minute,
        drain_s,
        one_source_peak_mib: procfs::peak_rss_mib(one.pid),
        ten_sources_peak_mib: procfs::peak_rss_mib(ten.pid),
    };
    one.stop().await;
    ten.stop().await;
    Ok((runs, routing))
}

/// Webhooks for relay `index`: 0 the one-source relay (signed with [`SECRET`]), 1 the
/// ten-source relay (spread over its sources).
fn prepare(
    index: usize,
    count: usize,
    secrets: &[&str],
    label: &str,
    users: usize,
) -> anyhow::Result<Vec<load::Prepared>> {
    if index == 0 {
        load::prepare(count, SECRET, &tag(label), users)
    } else {
        load::prepare_spread(count, secrets, &tag(label), users)
    }
}

/// One row per relay and app id: what its sources accepted (`one_sent` for the one-source
/// relay's `default`, `ten_sent[i]` for `sources[i]`) against what the sink got for that app
/// id (`delivered`: requests and events per app id); then a row for each app id the sink got
/// events for that no source has.
fn deliveries(
    delivered: &BTreeMap<String, (usize, usize)>,
    one_sent: Sent,
    sources: &[SourceSpec],
    ten_sent: &[Sent],
) -> Vec<Delivery> {
    let mut lanes: BTreeMap<(String, String), Delivery> = BTreeMap::new();
    let one = std::iter::once((ONE_SOURCE, APP_ID, "default", one_sent));
    let ten = sources.iter().zip(ten_sent).map(|(source, sent)| {
        (
            TEN_SOURCES,
            source.app_id.as_str(),
            source.name.as_str(),
            *sent,
        )
    });
    for (server, app_id, source, sent) in one.chain(ten) {
        let row = lanes
            .entry((server.into(), app_id.into()))
            .or_insert_with(|| delivery(server, app_id));
        row.sources.push(source.into());
        row.webhooks += sent.accepted;
        row.expected_events += sent.events;
        row.unanswered += sent.failed;
        row.refused += sent.refused;
    }
    let mut rows: Vec<Delivery> = lanes.into_values().collect();
    for row in &mut rows {
        if let Some(&(requests, events)) = delivered.get(&row.app_id) {
            row.track_requests = requests as u64;
            row.delivered_events = events as u64;
        }
    }
    for (app_id, &(requests, events)) in delivered {
        if !rows.iter().any(|row| &row.app_id == app_id) {
            rows.push(Delivery {
                track_requests: requests as u64,
                delivered_events: events as u64,
                ..delivery("?", app_id)
            });
        }
    }
    rows
}

fn delivery(server: &str, app_id: &str) -> Delivery {
    Delivery {
        server: server.into(),
        app_id: app_id.into(),
        sources: Vec::new(),
        webhooks: 0,
        expected_events: 0,
        unanswered: 0,
        refused: 0,
        delivered_events: 0,
        track_requests: 0,
    }
}

fn log_of(relay: &Server) -> String {
    format!("{} log (last lines):\n{}", relay.name, relay.log_tail())
}

/// `relay-bench sources`: runs the comparison and prints its section of the report.
pub async fn run_cli(options: Options) -> anyhow::Result<()> {
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
    let (runs, routing) = measure(
        &options.settings(),
        &client,
        &sink,
        &options.relay_bin,
        scratch.path(),
    )
    .await?;
    let results = Results {
        machine: Machine {
            cpu_model: procfs::cpu_model(),
            nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
            kernel: procfs::kernel(),
            load_before,
            load_after: procfs::load_average(),
            commit: options.commit.clone(),
            date,
            total_s: started.elapsed().as_secs_f64(),
        },
        runs_per_mode: options.runs,
        duration_s: options.duration,
        warmup_s: options.warmup,
        users: options.users,
        runs,
        memory: Memory::default(),
        saturation: None,
        live: None,
        limit: None,
        big_drain: None,
        big_drain_watch: None,
        notes: Vec::new(),
        postgres: None,
        routing: Some(routing),
        transforms: None,
        storage: None,
        storage_postgres: None,
    };
    let markdown = report::render_routing_alone(&results);
    println!("{markdown}");
    if let Some(out) = &options.out {
        std::fs::write(out, &markdown)
            .with_context(|| format!("cannot write {}", out.display()))?;
    }
    if let Some(json) = &options.json {
        std::fs::write(json, serde_json::to_string_pretty(&results)?)
            .with_context(|| format!("cannot write {}", json.display()))?;
    }
    let incomplete = results
        .routing
        .iter()
        .flat_map(|r| &r.deliveries)
        .filter(|row| !report::delivered_in_full(row))
        .count();
    if incomplete > 0 {
        bail!("{incomplete} app id(s) did not get every event their sources accepted (see above)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ten_sources_share_three_app_ids_four_three_three() {
        let sources = ten_sources();
        let lanes: Vec<(&str, &str)> = sources
            .iter()
            .map(|s| (s.name.as_str(), s.app_id.as_str()))
            .collect();
        assert_eq!(
            lanes,
            [
                ("s0", "bench-app-a"),
                ("s1", "bench-app-a"),
                ("s2", "bench-app-a"),
                ("s3", "bench-app-a"),
                ("s4", "bench-app-b"),
                ("s5", "bench-app-b"),
                ("s6", "bench-app-b"),
                ("s7", "bench-app-c"),
                ("s8", "bench-app-c"),
                ("s9", "bench-app-c"),
            ]
        );
        let mut secrets: Vec<&str> = sources.iter().map(|s| s.secret.as_str()).collect();
        secrets.sort_unstable();
        secrets.dedup();
        assert_eq!(secrets.len(), SOURCES, "every source has its own secret");
        assert!(secrets.iter().all(|s| s.len() >= 16));
    }
    #[test]
    fn deliveries_group_sources_by_app_id_and_name_a_stray_one() {
        let sources = ten_sources();
        let sent = |accepted: u64| Sent {
            requests: accepted,
            accepted,
            events: accepted * 2,
            ..Sent::default()
        };
        let ten_sent: Vec<Sent> = (1..=10).map(sent).collect();
        let delivered = BTreeMap::from([
            (APP_ID.to_owned(), (1, 14)),
            ("bench-app-a".to_owned(), (2, 20)),
            ("bench-app-b".to_owned(), (1, 30)),
            ("bench-app-c".to_owned(), (1, 53)),
            ("stray".to_owned(), (1, 1)),
        ]);
        let rows = deliveries(&delivered, sent(7), &sources, &ten_sent);
        let summary: Vec<(&str, &str, usize, u64, u64, u64)> = rows
            .iter()
            .map(|r| {
                (
                    r.server.as_str(),
                    r.app_id.as_str(),
                    r.sources.len(),
                    r.webhooks,
                    r.expected_events,
                    r.delivered_events,
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                (ONE_SOURCE, APP_ID, 1, 7, 14, 14),
                (TEN_SOURCES, "bench-app-a", 4, 10, 20, 20),
                (TEN_SOURCES, "bench-app-b", 3, 18, 36, 30),
                (TEN_SOURCES, "bench-app-c", 3, 27, 54, 53),
                ("?", "stray", 0, 0, 0, 1),
            ]
        );
        let complete: Vec<bool> = rows.iter().map(report::delivered_in_full).collect();
        assert_eq!(complete, [true, true, false, false, false]);
    }
}
