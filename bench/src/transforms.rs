//! The cost of transforms (issue 13, contract §10): one relay with four sources that differ
//! only in their jq program — none, the identity `.`, `. | .` (the same, through a worker) and
//! a realistic reshaping program ([`RESHAPE`]) — driven in turn, run after run, in the same harness. Its figure is the CPU
//! per webhook of each against the source without a program (target: at most 10 µs more).
//!
//! A transform runs in worker processes of the relay (children of the relay binary: a program
//! that never ends or overflows the stack must not take the relay with it), so the CPU counted
//! is the relay's whole process tree ([`procfs::tree_cpu_seconds`], through the plan's
//! tree-measured pid) over the requests completed in the window; the relay's own process is
//! shown beside it, the rest being the workers. The forwarder is paused for the comparison (the
//! sources share one lane, so forwarding would only add the same work to each), then
//! released, and every event must reach the sink. Beside it, each program is run alone in the
//! harness's own process ([`in_process_us`]): what it costs with no process boundary, so the
//! report can say which part of a source's cost is the program and which is the boundary.
//!
//! [`measure`] is the phase (the smoke's and `relay-bench transforms`'); [`run_cli`] is that
//! subcommand.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use hyper::{Method, Uri};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::load::{self, Client, Plan, RunResult};
use crate::section::{self, Occasion};
use crate::server::{self, APP_ID, Server, SourceSpec, Sources};
use crate::sink::{Endpoint, Sink};
use crate::suite::{check_answers, progress, tag};
use userpilot_heap_relay::{samples, transform};

/// A reshaping program of the kind an operator writes when Userpilot's payloads drift: keys
/// renamed with a fallback, a value normalised, a field dropped, a constant added. On the
/// harness's samples (already in the shape the decoder knows) it yields the same events, so
/// the sources do the same work apart from the program.
pub const RESHAPE: &str = r#"{
  timestamp: (.timestamp // .ts),
  data: (.data
    | .user = {user_id: (.user.user_id // .user.id), email: .user.email, plan: .user.plan}
    | if .action then .action |= ascii_downcase else . end
    | del(.hostname)
    | . + {environment: "production"})
}"#;

/// The sources: `(name, label in the report, program)`. `. | .` does what `.` does, but is
/// not recognised as the identity, so it goes to a worker: its cost is the floor of any real
/// program, the worker's round trip (the payload through a pipe, parsed and printed there,
/// its output read back and parsed again) with next to no evaluation.
pub const MODES: [(&str, &str, Option<&str>); 4] = [
    ("plain", "no transform", None),
    ("identity", "`.`", Some(".")),
    (
        ROUND_TRIP,
        "`. \\| .` (a worker's round trip)",
        Some(". | ."),
    ),
    ("reshape", "reshaping program", Some(RESHAPE)),
];

/// The source whose program, `. | .`, measures a worker's round trip alone.
const ROUND_TRIP: &str = "roundtrip";

/// The target: a transform may add at most this much CPU per webhook.
pub const TARGET_US: f64 = 10.0;

fn specs() -> Vec<SourceSpec> {
    MODES
        .iter()
        .map(|(name, _, program)| SourceSpec {
            name: (*name).to_owned(),
            secret: format!("bench-transform-secret-{name}"),
            app_id: APP_ID.to_owned(),
            transform: program.map(str::to_owned),
        })
        .collect()
}

/// What one comparison runs.
#[derive(Debug, Clone)]
pub struct Settings {
    pub runs: usize,
    pub duration: f64,
    pub warmup: f64,
    pub concurrency: usize,
    pub users: usize,
    /// Runs of each program in the harness's own process, per round ([`in_process_us`]).
    pub in_process_runs: usize,
    /// More environment for the relay (the smoke's short linger).
    pub extra_env: Vec<(&'static str, String)>,
}

/// `relay-bench transforms`: the comparison alone.
#[derive(clap::Args, Clone)]
pub struct Options {
    /// The relay binary (a release build).
    #[arg(long)]
    pub relay_bin: PathBuf,
    /// Runs of each source; the report shows their median.
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Seconds measured per run.
    #[arg(long, default_value_t = 3.0)]
    pub duration: f64,
    /// Seconds of warm-up before each measured window.
    #[arg(long, default_value_t = 0.5)]
    pub warmup: f64,
    /// Closed-loop concurrency.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Distinct user ids in the generated webhooks.
    #[arg(long, default_value_t = 2000)]
    pub users: usize,
    /// Also write the section as Markdown here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Also write every figure as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// The commit measured (shown in the output).
    #[arg(long, default_value = "unknown")]
    pub commit: String,
    /// Folder for the relay's queue file and log (default: the system temp folder).
    #[arg(long)]
    pub scratch: Option<PathBuf>,
}

/// One source's figures over its runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModeFigures {
    pub source: String,
    pub label: String,
    pub program: Option<String>,
    /// Median over the runs of the relay's process tree CPU per completed webhook, µs.
    pub tree_cpu_us: f64,
    /// The same for the relay's own process alone, µs.
    pub relay_cpu_us: f64,
    /// Median of `tree_cpu_us` minus the no-transform source's, run by run, µs.
    pub over_plain_us: f64,
    pub throughput: f64,
    pub p99_ms: f64,
    /// Every run's tree CPU per webhook, µs, in order.
    pub per_run_us: Vec<f64>,
    /// The program run alone in the harness's own process (jaq's reader, evaluation and
    /// writer on the harness's payloads, no worker, no relay), µs per run: the least any way
    /// of running it can cost. `None` for no program and `.`, which the relay does not run.
    #[serde(default)]
    pub in_process_us: Option<f64>,
}

/// The comparison's result.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Comparison {
    pub modes: Vec<ModeFigures>,
    pub runs: usize,
    pub duration_s: f64,
    pub concurrency: usize,
    pub events_delivered: u64,
    pub events_expected: u64,
    pub runs_detail: Vec<RunResult>,
    /// Runs per round of each program's in-process figure.
    #[serde(default)]
    pub in_process_runs: usize,
}

/// Whether `binary` accepts a source with a `transform`: `Err` with its answer if it does not
/// know the key (a build from before issue 13).
pub fn accepts_transforms(binary: &Path, scratch: &Path) -> anyhow::Result<Result<(), String>> {
    let specs = specs();
    match server::check_config(binary, Sources::Named(&specs), scratch)? {
        None => Ok(Ok(())),
        Some(answer) if answer.contains("transform") => Ok(Err(answer)),
        Some(answer) => bail!("the relay refused the transforms configuration:\n{answer}"),
    }
}

/// CPU per completed webhook of a run, µs: `(tree, relay alone)`.
fn per_webhook_us(result: &RunResult) -> (f64, f64) {
    let completed = result.completed.max(1) as f64;
    let us = |seconds: Option<f64>| seconds.map_or(f64::NAN, |s| s * 1e6 / completed);
    (us(result.database_cpu_s), us(result.server_cpu_s))
}

fn median(values: &[f64]) -> f64 {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted.sort_by(f64::total_cmp);
    let middle = sorted.len() / 2;
    if sorted.len() % 2 == 1 {
        sorted[middle]
    } else {
        (sorted[middle - 1] + sorted[middle]) / 2.0
    }
}

/// The least a program costs: µs per run of [`transform::run_bytes`] in this process, on the
/// payloads the load generator sends, median of [`IN_PROCESS_ROUNDS`] rounds. The worker runs
/// the same function, so the rest of a source's cost over no transform is the process
/// boundary's.
fn in_process_us(program: &str, runs: usize) -> anyhow::Result<f64> {
    let compiled = transform::compile(program).map_err(|e| anyhow::anyhow!("{e}"))?;
    let now = chrono::Utc::now().timestamp();
    let bodies = samples::all("bench-user-00001", now, "in-process")
        .into_iter()
        .map(|(_, body)| serde_json::to_vec(&body))
        .collect::<Result<Vec<_>, _>>()?;
    let runs = runs.max(1);
    let mut rounds = Vec::with_capacity(IN_PROCESS_ROUNDS);
    for _ in 0..IN_PROCESS_ROUNDS {
        let started = std::time::Instant::now();
        for i in 0..runs {
            let outputs = transform::run_bytes(&compiled, &bodies[i % bodies.len()]);
            std::hint::black_box(outputs.map(|o| o.map(|o| o.len())).ok());
        }
        rounds.push(started.elapsed().as_secs_f64() * 1e6 / runs as f64);
    }
    Ok(median(&rounds))
}

const IN_PROCESS_ROUNDS: usize = 5;

/// Runs per round of [`in_process_us`] in a measurement (the smoke runs a few).
pub const IN_PROCESS_RUNS: usize = 10_000;

/// Heap limits of the measured relay, per minute: high, so that the drain is quick.
const DRAIN_LIMIT: u32 = 6_000_000;

/// The comparison: the relay, every run of every source, the drain and the count. Clears
/// `sink` first.
pub async fn measure(
    settings: &Settings,
    client: &Client,
    sink: &Sink,
    relay_bin: &Path,
    scratch: &Path,
) -> anyhow::Result<Comparison> {
    if let Err(answer) = accepts_transforms(relay_bin, scratch)? {
        bail!(
            "this relay build does not know `[sources.NAME] transform` yet (issue 13); \
             check-config said:\n{answer}"
        );
    }
    let specs = specs();
    sink.clear();
    // Before the relay starts, so that nothing else of the harness runs beside it.
    let mut floors = Vec::with_capacity(MODES.len());
    for (_, _, program) in MODES {
        floors.push(match program {
            Some(program) if !transform::is_identity(program) => {
                Some(in_process_us(program, settings.in_process_runs)?)
            }
            _ => None,
        });
    }
    // The drain after the runs must not wait on Heap's default limits (hundreds of thousands
    // of events at 250/s): the comparison is of ingest, and the drain only counts.
    let mut env = vec![
        ("RELAY_HEAP__EVENTS_PER_MINUTE", DRAIN_LIMIT.to_string()),
        (
            "RELAY_HEAP__IDENTITY_EVENTS_PER_MINUTE",
            DRAIN_LIMIT.to_string(),
        ),
    ];
    env.extend(settings.extra_env.iter().cloned());
    let relay = Server::relay_with(
        client,
        relay_bin,
        &sink.url(),
        Sources::Named(&specs),
        &env,
        scratch,
    )
    .await?
    .named("relay-transforms");
    let uris = specs
        .iter()
        .map(|spec| relay.source_uri(&spec.name))
        .collect::<anyhow::Result<Vec<Uri>>>()?;
    relay
        .admin(client, Method::POST, "/admin/forwarder/pause")
        .await?;

    let plan = Plan {
        warmup: Duration::from_secs_f64(settings.warmup.max(0.0)),
        duration: Duration::from_secs_f64(settings.duration.max(0.0)),
        server_pid: Some(relay.pid),
        // The relay's process tree: itself and its transform workers.
        database_pid: Some(relay.pid),
    };
    let window = settings.warmup + settings.duration;
    let mut fastest = [4_000.0_f64; MODES.len()];
    let mut by_mode: Vec<Vec<RunResult>> = vec![Vec::new(); MODES.len()];
    let mut expected = 0u64;
    for run in 1..=settings.runs {
        // Each run starts with another source, so none always goes first (warmest or coldest).
        for step in 0..MODES.len() {
            let index = (run + step) % MODES.len();
            let spec = &specs[index];
            let count = (fastest[index] * 2.0 * window) as usize + 1000;
            let label = format!("transforms-{}", spec.name);
            let pool = load::prepare(count, &spec.secret, &tag(&label), settings.users)?;
            let mut result = load::closed_to(
                client,
                std::slice::from_ref(&uris[index]),
                Arc::new(pool),
                settings.concurrency,
                plan,
            )
            .await;
            result.server = format!("transform {}", spec.name);
            result.run = run;
            fastest[index] = fastest[index].max(result.throughput);
            progress(&result);
            check_answers(&result).with_context(|| log_of(&relay))?;
            expected += result.sent.iter().map(|s| s.events + s.failed).sum::<u64>();
            by_mode[index].push(result);
        }
    }

    eprintln!("== transforms: forwarder released, draining");
    relay
        .admin(client, Method::POST, "/admin/forwarder/resume")
        .await?;
    let within = Duration::from_secs_f64(expected as f64 / 2000.0 + 60.0);
    let deadline = Instant::now() + within;
    while relay.unsent(client).await? > 0 {
        if Instant::now() > deadline {
            bail!(
                "its queue did not empty within {within:?}; {}",
                log_of(&relay)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let delivered: u64 = sink
        .count_by_app_id(Endpoint::Track)
        .values()
        .map(|&(_, events)| events as u64)
        .sum();
    relay.stop().await;

    let plain: Vec<f64> = by_mode[0].iter().map(|r| per_webhook_us(r).0).collect();
    let modes = MODES
        .iter()
        .zip(&by_mode)
        .zip(floors)
        .map(|(((name, label, program), results), in_process_us)| {
            let tree: Vec<f64> = results.iter().map(|r| per_webhook_us(r).0).collect();
            let own: Vec<f64> = results.iter().map(|r| per_webhook_us(r).1).collect();
            let over: Vec<f64> = tree.iter().zip(&plain).map(|(t, p)| t - p).collect();
            ModeFigures {
                source: (*name).to_owned(),
                label: (*label).to_owned(),
                program: program.map(str::to_owned),
                tree_cpu_us: median(&tree),
                relay_cpu_us: median(&own),
                over_plain_us: median(&over),
                throughput: median(&results.iter().map(|r| r.throughput).collect::<Vec<_>>()),
                p99_ms: median(&results.iter().map(|r| r.p99_ms).collect::<Vec<_>>()),
                per_run_us: tree,
                in_process_us,
            }
        })
        .collect();
    Ok(Comparison {
        modes,
        runs: settings.runs,
        duration_s: settings.duration,
        concurrency: settings.concurrency,
        events_delivered: delivered,
        events_expected: expected,
        runs_detail: by_mode.into_iter().flatten().collect(),
        in_process_runs: settings.in_process_runs,
    })
}

fn log_of(relay: &Server) -> String {
    format!("{} log (last lines):\n{}", relay.name, relay.log_tail())
}

/// The section of the report.
pub fn render(comparison: &Comparison, header: &str) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "## Transforms: the CPU cost per webhook\n");
    if !header.is_empty() {
        let _ = writeln!(out, "{header}\n");
    }
    let _ = writeln!(
        out,
        "One relay, four sources differing only in their program, driven in turn ({} runs \
         each, {} s closed loop at concurrency {}; each run starts with another source), \
         forwarder paused. CPU is the relay's whole process tree (its transform workers \
         included) per webhook answered in the window; median of the runs. Target: at most \
         {TARGET_US} µs over no transform. The last column is the program run alone in the \
         harness's process on the same payloads (jaq's reader, evaluation and writer, what a \
         worker does per webhook; wall time, median of {IN_PROCESS_ROUNDS} rounds of \
         {}): what the program costs with no process boundary at all.\n",
        comparison.runs, comparison.duration_s, comparison.concurrency, comparison.in_process_runs
    );
    let _ = writeln!(
        out,
        "| source | program | CPU µs / webhook | of which the relay | over no transform | \
         throughput (req/s) | p99 (ms) | verdict | the program alone, in-process (µs) |"
    );
    let _ = writeln!(out, "|---|---|---:|---:|---:|---:|---:|---|---:|");
    for mode in &comparison.modes {
        let verdict = if mode.program.is_none() {
            "baseline"
        } else if mode.over_plain_us <= TARGET_US {
            "within target"
        } else {
            "over target"
        };
        let _ = writeln!(
            out,
            "| `{}` | {} | {:.1} | {:.1} | {:+.1} | {:.0} | {:.2} | {verdict} | {} |",
            mode.source,
            mode.label,
            mode.tree_cpu_us,
            mode.relay_cpu_us,
            mode.over_plain_us,
            mode.throughput,
            mode.p99_ms,
            mode.in_process_us
                .map_or_else(|| "–".to_owned(), |us| format!("{us:.1}"))
        );
    }
    let _ = writeln!(
        out,
        "\nEvery run, tree CPU µs per webhook: {}.",
        comparison
            .modes
            .iter()
            .map(|m| format!(
                "`{}` {}",
                m.source,
                m.per_run_us
                    .iter()
                    .map(|v| format!("{v:.1}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
            .collect::<Vec<_>>()
            .join("; ")
    );
    let _ = writeln!(
        out,
        "Delivered after the runs: {} of {} track events.\n",
        comparison.events_delivered, comparison.events_expected
    );
    let _ = writeln!(out, "The reshaping program:\n\n```jq\n{RESHAPE}\n```");
    out
}

/// The row of the report's targets table.
pub fn target_row(comparison: &Comparison) -> String {
    // The target is for `.` and the reshaping program; the round trip is shown beside them as
    // the floor every real program pays.
    let over: Vec<&ModeFigures> = comparison
        .modes
        .iter()
        .filter(|m| m.program.is_some() && m.source != ROUND_TRIP)
        .collect();
    let mut measured = over
        .iter()
        .map(|m| format!("{} {:+.1} µs", m.label, m.over_plain_us))
        .collect::<Vec<_>>()
        .join(", ");
    measured.push_str(" (relay and its workers, median of the runs)");
    if let Some(floor) = comparison.modes.iter().find(|m| m.source == ROUND_TRIP) {
        measured.push_str(&format!(
            "; the worker's round trip alone {:+.1} µs",
            floor.over_plain_us
        ));
    }
    let alone = over
        .iter()
        .filter_map(|m| m.in_process_us.map(|us| format!("{} {us:.1} µs", m.label)))
        .collect::<Vec<_>>();
    if !alone.is_empty() {
        measured.push_str(&format!(
            "; the program alone, in-process, no worker: {}",
            alone.join(", ")
        ));
    }
    let verdicts = over
        .iter()
        .map(|m| {
            let met = if m.over_plain_us <= TARGET_US {
                "**met**"
            } else {
                "**not met**"
            };
            format!("{} {met}", m.label)
        })
        .collect::<Vec<_>>()
        .join("; ");
    format!(
        "| Cost of a transform (issue 13): ≤ {TARGET_US} µs CPU per webhook over no transform, \
         for `.` and a reshaping program | {measured} | {verdicts} |"
    )
}

/// `relay-bench transforms`: runs the comparison and prints its section of the report.
pub async fn run_cli(options: Options) -> anyhow::Result<()> {
    let scratch = section::scratch(options.scratch.as_ref())?;
    let client = load::client();
    let sink = Sink::start().await?;
    let occasion = Occasion::now();
    let settings = Settings {
        runs: options.runs,
        duration: options.duration,
        warmup: options.warmup,
        concurrency: options.concurrency,
        users: options.users,
        in_process_runs: IN_PROCESS_RUNS,
        extra_env: Vec::new(),
    };
    let comparison = measure(
        &settings,
        &client,
        &sink,
        &options.relay_bin,
        scratch.path(),
    )
    .await?;
    let header = occasion.header(&options.commit);
    let markdown = render(&comparison, &header);
    section::publish(
        &markdown,
        &comparison,
        options.out.as_deref(),
        options.json.as_deref(),
    )?;
    if comparison.events_delivered < comparison.events_expected {
        bail!(
            "{} of {} track events reached the sink",
            comparison.events_delivered,
            comparison.events_expected
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sources_differ_only_in_their_program() {
        let specs = specs();
        let programs: Vec<Option<&str>> = specs.iter().map(|s| s.transform.as_deref()).collect();
        assert_eq!(programs, [None, Some("."), Some(". | ."), Some(RESHAPE)]);
        assert!(specs.iter().all(|s| s.app_id == APP_ID));
        assert!(specs.iter().all(|s| s.secret.len() >= 16));
    }

    #[test]
    fn the_section_and_the_target_row_say_which_program_meets_the_target() {
        let mode = |(source, label, program): (&str, &str, Option<&str>), over: f64| ModeFigures {
            source: source.to_owned(),
            label: label.to_owned(),
            program: program.map(str::to_owned),
            tree_cpu_us: 100.0 + over,
            relay_cpu_us: 100.0,
            over_plain_us: over,
            throughput: 1000.0,
            p99_ms: 5.0,
            per_run_us: vec![100.0 + over],
            in_process_us: (over > 10.0).then_some(over / 2.0),
        };
        let comparison = Comparison {
            modes: vec![
                mode(MODES[0], 0.0),
                mode(MODES[1], 0.4),
                mode(MODES[2], 15.0),
                mode(MODES[3], 21.0),
            ],
            runs: 1,
            duration_s: 3.0,
            concurrency: 8,
            events_delivered: 10,
            events_expected: 10,
            runs_detail: Vec::new(),
            in_process_runs: 100,
        };
        let section = render(&comparison, "");
        assert!(section.contains("| `plain` | no transform | 100.0 | 100.0 | +0.0 |"));
        assert!(
            section.contains("| `identity` | `.` | 100.4 |"),
            "{section}"
        );
        assert!(
            section.contains("+0.4 | 1000 | 5.00 | within target |"),
            "{section}"
        );
        assert!(
            section.contains("+21.0 | 1000 | 5.00 | over target | 10.5 |"),
            "{section}"
        );
        assert!(
            section.contains("+0.4 | 1000 | 5.00 | within target | – |"),
            "{section}"
        );
        let row = target_row(&comparison);
        assert!(
            row.contains(
                "`.` +0.4 µs, reshaping program +21.0 µs (relay and its workers, median of the \
                 runs); the worker's round trip alone +15.0 µs; the program alone, in-process, \
                 no worker: reshaping program 10.5 µs |"
            ),
            "{row}"
        );
        assert!(
            row.contains("`.` **met**; reshaping program **not met**"),
            "{row}"
        );
    }

    #[test]
    fn the_median_skips_missing_figures() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, f64::NAN, 2.0, 3.0]), 2.5);
        assert!(median(&[f64::NAN]).is_nan());
    }
}
