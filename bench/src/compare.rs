//! `relay-bench compare`: two relay binaries, old and new, on the storage path (issue 17), in
//! the same harness, run after run, with the baseline measured in the same runs.
//!
//! Each run measures the baseline (closed loop at each concurrency), then both binaries, one
//! after the other, alternating which goes first (run 1: old then new; run 2: new then old;
//! ...) so that drifting background load hits both alike. Each binary starts on a fresh SQLite
//! queue in a temporary folder with its forwarder paused (`POST /admin/forwarder/pause`; a
//! build without that endpoint forwards to the fake Heap at the default Heap limit, and the
//! section says so), and gets: closed-loop ingest at each concurrency (throughput, p99, relay
//! CPU per webhook from `/proc`), then its queue filled to `--grown` stored webhooks and an
//! open loop at `--rate` (p50 / p99 / max from the intended send times), then its queue's
//! stored bytes per webhook ([`crate::storage`]). The relay stops after each, and its queue
//! folder goes with it.
//!
//! The section it prints is kept in `BENCHMARKS.md` when the suite writes the report again
//! ([`crate::section::KEPT`]).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, ensure};
use hyper::Method;
use serde::{Deserialize, Serialize};

use crate::load::{self, Client, Plan, RunResult};
use crate::procfs;
use crate::report::{self, MAX_CPU_US, MAX_P99_MS, MIN_THROUGHPUT_RATIO, median};
use crate::results::BASELINE;
use crate::section::{self, Occasion};
use crate::server::{SECRET, Server};
use crate::sink::Sink;
use crate::storage::{self, MAX_BYTES_PER_WEBHOOK, Storage};
use crate::suite::{check_answers, progress, queue_backlog, tag};

/// The section's heading (and the key [`crate::section::KEPT`] keeps it by).
pub const HEADING: &str = "## Storage path: old binary against new";

/// The two binaries, as they are named in runs and tables.
const OLD: &str = "old";
const NEW: &str = "new";

/// `relay-bench compare`.
#[derive(clap::Args, Clone)]
pub struct Options {
    /// The relay binary before the change (a release build; keep a copy outside target/,
    /// which the next build overwrites).
    #[arg(long)]
    pub old_bin: PathBuf,
    /// The relay binary after the change.
    #[arg(long)]
    pub new_bin: PathBuf,
    /// What the old binary is (a commit, a branch), shown in the section.
    #[arg(long, default_value = "")]
    pub old_label: String,
    /// Runs; each measures both binaries, alternating which goes first.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Seconds measured per window.
    #[arg(long, default_value_t = 5.0)]
    pub duration: f64,
    /// Seconds of warm-up before each measured window.
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,
    /// Closed-loop concurrencies.
    #[arg(long, value_delimiter = ',', default_value = "32,128")]
    pub concurrency: Vec<usize>,
    /// Webhooks stored in the queue before the open loop (those of the closed loops count).
    #[arg(long, default_value_t = 200_000)]
    pub grown: usize,
    /// Open-loop rate on the grown queue, webhooks per second.
    #[arg(long, default_value_t = report::P99_RATE)]
    pub rate: u64,
    /// Distinct user ids in the generated webhooks.
    #[arg(long, default_value_t = 2000)]
    pub users: usize,
    /// Also write the section as Markdown here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Also write every figure as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// The commit of the new binary (shown in the section).
    #[arg(long, default_value = "unknown")]
    pub commit: String,
    /// Folder for the relays' queue files and logs (default: the system temp folder).
    #[arg(long)]
    pub scratch: Option<PathBuf>,
}

/// What one comparison runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Settings {
    pub runs: usize,
    pub duration_s: f64,
    pub warmup_s: f64,
    pub concurrency: Vec<usize>,
    pub grown: usize,
    pub rate: u64,
    pub users: usize,
    /// More environment for both binaries (the smoke's short linger).
    #[serde(skip)]
    pub extra_env: Vec<(&'static str, String)>,
}

/// A binary measured, as found on disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Binary {
    pub name: String,
    pub path: String,
    pub label: String,
    pub bytes: Option<u64>,
    pub modified: Option<String>,
}

impl Binary {
    pub fn describe(name: &str, path: &Path, label: &str) -> Self {
        let metadata = std::fs::metadata(path).ok();
        Binary {
            name: name.into(),
            path: path.display().to_string(),
            label: label.into(),
            bytes: metadata.as_ref().map(|m| m.len()),
            modified: metadata.and_then(|m| m.modified().ok()).map(|time| {
                chrono::DateTime::<chrono::Utc>::from(time)
                    .format("%Y-%m-%d %H:%M UTC")
                    .to_string()
            }),
        }
    }
}

/// One binary in one run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BinaryRun {
    /// [`OLD`] or [`NEW`].
    pub binary: String,
    pub run: usize,
    /// 1 if it went first in its run, 2 if second.
    pub position: usize,
    /// Whether its forwarder was paused (else it forwarded at the default Heap limit).
    pub paused: bool,
    /// Closed loop at each concurrency, in order.
    pub closed: Vec<RunResult>,
    /// Webhooks in its queue when the open loop started, and how long filling it took.
    pub stored_before_open: u64,
    pub fill_s: f64,
    pub open: RunResult,
    /// Its queue at the end (`None` if it could not be read).
    pub storage: Option<Storage>,
    pub peak_rss_mib: Option<f64>,
}

/// Every figure of one comparison: what `--json` saves.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Comparison {
    pub header: String,
    pub settings: Settings,
    pub old: Binary,
    pub new: Binary,
    /// The baseline's closed loops, every run and concurrency (`run` set).
    pub baseline: Vec<RunResult>,
    pub binaries: Vec<BinaryRun>,
}

/// Runs the comparison.
pub async fn measure(
    settings: &Settings,
    client: &Client,
    sink: &Sink,
    binaries: [(&str, &Path); 2],
    scratch: &Path,
) -> anyhow::Result<(Vec<RunResult>, Vec<BinaryRun>)> {
    ensure!(settings.runs > 0, "--runs must be at least 1");
    let baseline = Server::baseline(client, scratch).await?;
    let mut baseline_runs = Vec::new();
    let mut measured = Vec::new();
    // Requests to prepare per second of a closed loop, per server (baseline, then the two
    // binaries): a guess to start, then the fastest seen so far.
    let mut fastest = [20_000.0_f64, 8_000.0, 8_000.0];
    for run in 1..=settings.runs {
        eprintln!("== compare: run {run} of {}", settings.runs);
        for &concurrency in &settings.concurrency {
            let mut result = closed_loop(client, settings, &baseline, concurrency, fastest[0])
                .await
                .with_context(|| log_of(&baseline))?;
            fastest[0] = fastest[0].max(result.throughput);
            result.server = BASELINE.into();
            result.run = run;
            progress(&result);
            baseline_runs.push(result);
        }
        let order = if run % 2 == 1 { [0, 1] } else { [1, 0] };
        for (position, index) in order.into_iter().enumerate() {
            let (name, binary) = binaries[index];
            let measured_run = measure_binary(
                settings,
                client,
                sink,
                (name, binary),
                run,
                &mut fastest[index + 1],
                scratch,
            )
            .await?;
            measured.push(BinaryRun {
                position: position + 1,
                ..measured_run
            });
        }
    }
    baseline.stop().await;
    Ok((baseline_runs, measured))
}

/// One binary's share of a run, on a fresh queue.
async fn measure_binary(
    settings: &Settings,
    client: &Client,
    sink: &Sink,
    (name, binary): (&str, &Path),
    run: usize,
    fastest: &mut f64,
    scratch: &Path,
) -> anyhow::Result<BinaryRun> {
    let relay = Server::relay(client, binary, &sink.url(), &settings.extra_env, scratch)
        .await
        .with_context(|| format!("the {name} binary, {}", binary.display()))?;
    let paused = match relay
        .admin(client, Method::POST, "/admin/forwarder/pause")
        .await
    {
        Ok(_) => true,
        Err(error) => {
            eprintln!(
                "warning: {name}: its forwarder could not be paused ({error:#}); it forwards \
                 to the fake Heap at the default limit"
            );
            false
        }
    };
    let mut closed = Vec::new();
    for &concurrency in &settings.concurrency {
        let mut result = closed_loop(client, settings, &relay, concurrency, *fastest)
            .await
            .with_context(|| log_of(&relay))?;
        *fastest = fastest.max(result.throughput);
        result.server = name.into();
        result.run = run;
        progress(&result);
        closed.push(result);
    }

    // Grown: the queue filled to `grown` webhooks, as fast as it takes them.
    let queue = relay.queue_file()?;
    let stored = storage::sqlite_webhooks(queue.clone()).await?;
    let missing = settings.grown.saturating_sub(stored as usize);
    let fill_s = if missing > 0 {
        eprintln!(
            "   {name}: filling its queue from {stored} to {} webhooks",
            settings.grown
        );
        queue_backlog(client, &relay, missing, settings.users)
            .await
            .with_context(|| log_of(&relay))?
            .elapsed_s
    } else {
        0.0
    };
    let stored_before_open = storage::sqlite_webhooks(queue.clone()).await?;
    let count =
        (settings.rate as f64 * (settings.warmup_s + settings.duration_s + 0.5)) as usize + 100;
    let pool = load::prepare(count, SECRET, &tag("compare-open"), settings.users)?;
    let mut open = load::open(
        client,
        &relay.webhook_uri()?,
        Arc::new(pool),
        settings.rate,
        plan(settings, &relay),
    )
    .await;
    open.server = name.into();
    open.run = run;
    progress(&open);
    check_answers(&open).with_context(|| log_of(&relay))?;

    let storage = storage::sqlite_queue(queue)
        .await
        .inspect_err(|error| eprintln!("warning: {name}: its queue's size: {error:#}"))
        .ok();
    if let Some(s) = &storage {
        eprintln!(
            "   {name}: {} webhooks stored, {:.0} bytes per webhook",
            s.webhooks,
            s.bytes_per_webhook().unwrap_or(f64::NAN)
        );
    }
    let peak_rss_mib = procfs::peak_rss_mib(relay.pid);
    relay.stop().await;
    Ok(BinaryRun {
        binary: name.into(),
        run,
        position: 0,
        paused,
        closed,
        stored_before_open,
        fill_s,
        open,
        storage,
        peak_rss_mib,
    })
}

fn plan(settings: &Settings, server: &Server) -> Plan {
    Plan {
        warmup: Duration::from_secs_f64(settings.warmup_s.max(0.0)),
        duration: Duration::from_secs_f64(settings.duration_s.max(0.0)),
        server_pid: Some(server.pid),
        database_pid: None,
    }
}

/// A closed loop at `concurrency`, with requests prepared for `guess` per second (twice that,
/// over the warm-up and the window, so that a run rarely runs out; one that does is flagged).
async fn closed_loop(
    client: &Client,
    settings: &Settings,
    server: &Server,
    concurrency: usize,
    guess: f64,
) -> anyhow::Result<RunResult> {
    let window = settings.warmup_s + settings.duration_s;
    let count = (guess * 2.0 * window) as usize + 1000;
    let pool = load::prepare(count, SECRET, &tag("compare-closed"), settings.users)?;
    let result = load::closed(
        client,
        &server.webhook_uri()?,
        Arc::new(pool),
        concurrency,
        plan(settings, server),
    )
    .await;
    check_answers(&result)?;
    Ok(result)
}

fn log_of(server: &Server) -> String {
    format!("{} log (last lines):\n{}", server.name, server.log_tail())
}

/// Relay CPU per webhook answered in the window, µs.
fn cpu_us(run: &RunResult) -> Option<f64> {
    run.server_cpu_s
        .map(|cpu| cpu * 1e6 / run.ok().max(1) as f64)
}

impl Comparison {
    fn of(&self, binary: &str) -> impl Iterator<Item = &BinaryRun> {
        self.binaries.iter().filter(move |b| b.binary == binary)
    }

    /// The median over runs of `f` for `binary`.
    fn median(&self, binary: &str, f: impl Fn(&BinaryRun) -> Option<f64>) -> Option<f64> {
        median(self.of(binary).filter_map(f).collect())
    }

    fn closed<'a>(&self, run: &'a BinaryRun, concurrency: usize) -> Option<&'a RunResult> {
        run.closed.iter().find(|r| r.param == concurrency as u64)
    }

    /// The baseline's throughput at `concurrency` in run `run`.
    fn baseline(&self, run: usize, concurrency: usize) -> Option<f64> {
        self.baseline
            .iter()
            .find(|r| r.run == run && r.param == concurrency as u64)
            .map(|r| r.throughput)
    }

    /// A binary run's throughput at `concurrency` over the baseline's in the same run.
    fn to_baseline(&self, run: &BinaryRun, concurrency: usize) -> Option<f64> {
        let relay = self.closed(run, concurrency)?.throughput;
        let baseline = self.baseline(run.run, concurrency)?;
        (baseline > 0.0).then(|| relay / baseline)
    }
}

/// One row of the medians table: label, old, new, how to print them, the target.
struct Row {
    label: String,
    old: Option<f64>,
    new: Option<f64>,
    format: fn(f64) -> String,
    target: String,
}

fn whole(value: f64) -> String {
    report::num(value)
}

fn two(value: f64) -> String {
    format!("{value:.2}")
}

/// The section.
pub fn render(comparison: &Comparison) -> String {
    let c = comparison;
    let s = &c.settings;
    let mut out = String::new();
    let _ = writeln!(out, "{HEADING}\n");
    if !c.header.is_empty() {
        let _ = writeln!(out, "{}\n", c.header);
    }
    let describe = |b: &Binary| {
        let mut parts = Vec::new();
        if !b.label.is_empty() {
            parts.push(b.label.clone());
        }
        if let Some(bytes) = b.bytes {
            parts.push(report::bytes(bytes));
        }
        if let Some(modified) = &b.modified {
            parts.push(format!("built {modified}"));
        }
        format!("`{}` ({})", b.path, parts.join(", "))
    };
    let unpaused: Vec<&str> = [OLD, NEW]
        .into_iter()
        .filter(|name| c.of(name).any(|b| !b.paused))
        .collect();
    let forwarder = if unpaused.is_empty() {
        "forwarder paused (`POST /admin/forwarder/pause`)".to_owned()
    } else {
        format!(
            "forwarder paused (`POST /admin/forwarder/pause`), except for the {} binary, which \
             has no such endpoint and forwarded to the fake Heap at the default Heap limit",
            unpaused.join(" and the ")
        )
    };
    let concurrencies: Vec<String> = s.concurrency.iter().map(|c| c.to_string()).collect();
    let _ = writeln!(
        out,
        "Old binary {}; new binary {}. {}, alternating which binary goes first (run 1: \
         old then new; run 2: new then old; ...), each binary on a fresh SQLite queue in a \
         temporary folder, {forwarder}; the baseline is measured at the start of each run. Per \
         binary and run: closed loop at {} in flight ({} s measured after {} s warm-up each), \
         then its queue filled to {} stored webhooks (32 in flight) and an open loop at {} \
         webhooks/s (latency from the intended send time), then its queue's size: SQLite pages \
         in use, (`page_count` − `freelist_count`) × `page_size`, read beside the running relay, \
         over the webhooks stored. Medians of the runs; \"/ baseline\" is the median of each \
         run's ratio to the baseline in the same run. Run it with \
         `bash bench/run.sh --compare OLD_BIN`.\n",
        describe(&c.old),
        describe(&c.new),
        match s.runs {
            1 => "1 run".to_owned(),
            runs => format!("{runs} runs"),
        },
        concurrencies.join(" and "),
        s.duration_s,
        s.warmup_s,
        report::num(s.grown as f64),
        report::num(s.rate as f64),
    );

    let mut rows = Vec::new();
    for &concurrency in &s.concurrency {
        let closed = |f: fn(&RunResult) -> Option<f64>| {
            move |b: &BinaryRun| {
                b.closed
                    .iter()
                    .find(|r| r.param == concurrency as u64)
                    .and_then(f)
            }
        };
        let label = |what: &str| format!("Closed loop, {concurrency} in flight: {what}");
        rows.push(Row {
            label: label("webhooks/s"),
            old: c.median(OLD, closed(|r| Some(r.throughput))),
            new: c.median(NEW, closed(|r| Some(r.throughput))),
            format: whole,
            target: String::new(),
        });
        rows.push(Row {
            label: label("/ baseline"),
            old: c.median(OLD, |b| c.to_baseline(b, concurrency)),
            new: c.median(NEW, |b| c.to_baseline(b, concurrency)),
            format: two,
            target: format!("≥ {MIN_THROUGHPUT_RATIO} (at the best concurrency)"),
        });
        rows.push(Row {
            label: label("p99 ms"),
            old: c.median(OLD, closed(|r| Some(r.p99_ms))),
            new: c.median(NEW, closed(|r| Some(r.p99_ms))),
            format: report::ms,
            target: String::new(),
        });
        rows.push(Row {
            label: label("relay CPU µs per webhook"),
            old: c.median(OLD, closed(cpu_us)),
            new: c.median(NEW, closed(cpu_us)),
            format: whole,
            target: format!("≤ {MAX_CPU_US} (at the best concurrency)"),
        });
    }
    let open_label = |what: &str| {
        format!(
            "Grown queue ({} stored), open loop {} /s: {what}",
            report::num(s.grown as f64),
            report::num(s.rate as f64)
        )
    };
    for (what, f, target) in [
        (
            "p50 ms",
            (|b: &BinaryRun| Some(b.open.p50_ms)) as fn(&BinaryRun) -> Option<f64>,
            String::new(),
        ),
        ("p99 ms", |b| Some(b.open.p99_ms), format!("≤ {MAX_P99_MS}")),
        ("max ms", |b| Some(b.open.max_ms), String::new()),
        ("achieved /s", |b| Some(b.open.throughput), String::new()),
    ] {
        rows.push(Row {
            label: open_label(what),
            old: c.median(OLD, f),
            new: c.median(NEW, f),
            format: if what == "achieved /s" {
                whole
            } else {
                report::ms
            },
            target,
        });
    }
    let stored = |b: &BinaryRun| b.storage.as_ref().and_then(Storage::bytes_per_webhook);
    rows.push(Row {
        label: "Stored bytes per webhook, at the end".into(),
        old: c.median(OLD, stored),
        new: c.median(NEW, stored),
        format: whole,
        target: format!("≤ {}", report::num(MAX_BYTES_PER_WEBHOOK)),
    });
    let wal = |b: &BinaryRun| {
        b.storage
            .as_ref()
            .and_then(|s| s.wal_bytes)
            .map(|w| w as f64 / f64::from(1 << 20))
    };
    rows.push(Row {
        label: "WAL on disk at the end, MiB".into(),
        old: c.median(OLD, wal),
        new: c.median(NEW, wal),
        format: |v| format!("{v:.1}"),
        target: String::new(),
    });
    rows.push(Row {
        label: "Peak resident set, MiB".into(),
        old: c.median(OLD, |b| b.peak_rss_mib),
        new: c.median(NEW, |b| b.peak_rss_mib),
        format: |v| format!("{v:.1}"),
        target: String::new(),
    });

    let _ = writeln!(
        out,
        "| Measure | Old | New | New / old | Target (issue 17) |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---|");
    for row in &rows {
        let show = |v: Option<f64>| v.map_or("–".into(), row.format);
        let ratio = match (row.old, row.new) {
            (Some(old), Some(new)) if old > 0.0 => format!("{:.2}", new / old),
            _ => "–".into(),
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {ratio} | {} |",
            row.label,
            show(row.old),
            show(row.new),
            row.target
        );
    }
    let _ = writeln!(out);

    write_breakdown(&mut out, c);

    // Every run.
    let _ = write!(
        out,
        "Every run (µs: relay CPU per webhook):\n\n| Run | Binary |"
    );
    for concurrency in &s.concurrency {
        let _ = write!(out, " {concurrency} in flight: req/s, p99 ms, µs |");
    }
    let _ = writeln!(
        out,
        " Stored before the open loop (filled in) | Open loop p50 / p99 / max ms | Bytes per webhook | WAL |"
    );
    let _ = writeln!(
        out,
        "|---:|---|{}---:|---|---:|---:|",
        "---|".repeat(s.concurrency.len())
    );
    for run in 1..=s.runs {
        let _ = write!(out, "| {run} | baseline |");
        for &concurrency in &s.concurrency {
            let figures = c
                .baseline
                .iter()
                .find(|r| r.run == run && r.param == concurrency as u64);
            let _ = write!(out, " {} |", figures.map_or("–".into(), closed_cell));
        }
        let _ = writeln!(out, " | | | |");
        let mut in_run: Vec<&BinaryRun> = c.binaries.iter().filter(|b| b.run == run).collect();
        in_run.sort_by_key(|b| b.position);
        for b in in_run {
            let _ = write!(
                out,
                "| {run} | {}{} |",
                b.binary,
                if b.position == 1 { " (first)" } else { "" }
            );
            for &concurrency in &s.concurrency {
                let _ = write!(
                    out,
                    " {} |",
                    c.closed(b, concurrency).map_or("–".into(), closed_cell)
                );
            }
            let _ = writeln!(
                out,
                " {} ({:.0} s) | {} / {} / {}{} | {} | {} |",
                report::num(b.stored_before_open as f64),
                b.fill_s,
                report::ms(b.open.p50_ms),
                report::ms(b.open.p99_ms),
                report::ms(b.open.max_ms),
                not_202(&b.open),
                b.storage
                    .as_ref()
                    .and_then(Storage::bytes_per_webhook)
                    .map_or("–".into(), whole),
                b.storage
                    .as_ref()
                    .and_then(|s| s.wal_bytes)
                    .map_or("–".into(), report::bytes),
            );
        }
    }
    let _ = writeln!(
        out,
        "\n† the prepared requests ran out before the window ended (the window was shortened). \
         ⚠ requests answered otherwise than 202, or not within 10 s.\n"
    );
    out
}

/// Where each binary's bytes go, per table and index, in its last run (from `dbstat`).
fn write_breakdown(out: &mut String, c: &Comparison) {
    let last = |binary: &str| {
        c.of(binary)
            .filter_map(|b| b.storage.as_ref())
            .last()
            .filter(|s| s.webhooks > 0 && !s.objects.is_empty())
    };
    let (Some(old), Some(new)) = (last(OLD), last(NEW)) else {
        return;
    };
    // Every name either has, in the order of the new binary's sizes, then the old one's.
    let mut names: Vec<&str> = new.objects.iter().map(|o| o.name.as_str()).collect();
    for object in &old.objects {
        if !names.contains(&object.name.as_str()) {
            names.push(&object.name);
        }
    }
    let per_webhook = |s: &Storage, name: &str| {
        s.objects
            .iter()
            .find(|o| o.name == name)
            .map_or("–".into(), |o| whole(o.bytes as f64 / s.webhooks as f64))
    };
    let _ = writeln!(
        out,
        "Stored bytes per webhook by table and index (SQLite's `dbstat`, each binary's last \
         run: old {} webhooks, new {}):\n\n| Table or index | Old | New |\n|---|---:|---:|",
        report::num(old.webhooks as f64),
        report::num(new.webhooks as f64)
    );
    // Tables and indexes under half a byte per webhook in both (empty ones) are left out.
    let small = |s: &Storage, name: &str| {
        s.objects
            .iter()
            .find(|o| o.name == name)
            .is_none_or(|o| (o.bytes as f64) < s.webhooks as f64 / 2.0)
    };
    for name in names {
        if small(old, name) && small(new, name) {
            continue;
        }
        let _ = writeln!(
            out,
            "| `{name}` | {} | {} |",
            per_webhook(old, name),
            per_webhook(new, name)
        );
    }
    let _ = writeln!(out);
}

/// " ⚠ N not 202" when a run had requests refused or unanswered (within 10 s).
fn not_202(r: &RunResult) -> String {
    match r.refused + r.failed {
        0 => String::new(),
        n => format!(" ⚠ {} not 202", report::num(n as f64)),
    }
}

/// A closed-loop run's figures in one cell.
fn closed_cell(r: &RunResult) -> String {
    format!(
        "{}{}{}, {}, {}",
        report::num(r.throughput),
        if r.exhausted { " †" } else { "" },
        not_202(r),
        report::ms(r.p99_ms),
        cpu_us(r).map_or("–".into(), whole)
    )
}

/// `relay-bench compare`: measures, prints the section, writes it and its figures.
pub async fn run_cli(options: Options) -> anyhow::Result<()> {
    for path in [&options.old_bin, &options.new_bin] {
        ensure!(path.is_file(), "{}: no such binary", path.display());
    }
    let scratch = section::scratch(options.scratch.as_ref())?;
    let client = load::client();
    let sink = Sink::start().await?;
    let occasion = Occasion::now();
    let settings = Settings {
        runs: options.runs,
        duration_s: options.duration,
        warmup_s: options.warmup,
        concurrency: options.concurrency.clone(),
        grown: options.grown,
        rate: options.rate,
        users: options.users,
        extra_env: Vec::new(),
    };
    let (baseline, binaries) = measure(
        &settings,
        &client,
        &sink,
        [
            (OLD, options.old_bin.as_path()),
            (NEW, options.new_bin.as_path()),
        ],
        scratch.path(),
    )
    .await?;
    let comparison = Comparison {
        header: occasion.header(&options.commit),
        settings,
        old: Binary::describe(OLD, &options.old_bin, &options.old_label),
        new: Binary::describe(NEW, &options.new_bin, &format!("commit {}", options.commit)),
        baseline,
        binaries,
    };
    let markdown = render(&comparison);
    section::publish(
        &markdown,
        &comparison,
        options.out.as_deref(),
        options.json.as_deref(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::StoredObject;

    fn result(server: &str, mode: &str, param: u64, run: usize, throughput: f64) -> RunResult {
        RunResult {
            server: server.into(),
            mode: mode.into(),
            param,
            run,
            elapsed_s: 1.0,
            completed: throughput as u64,
            accepted: throughput as u64,
            duplicate: 0,
            quarantined: 0,
            refused: 0,
            failed: 0,
            events: throughput as u64,
            throughput,
            p50_ms: 1.0,
            p99_ms: 4.0,
            p999_ms: 5.0,
            max_ms: 6.0,
            mean_ms: 1.5,
            server_cpu_s: Some(throughput * 50e-6),
            client_cpu_s: None,
            database_cpu_s: None,
            exhausted: false,
            max_in_flight: 32,
            sent: Vec::new(),
        }
    }

    fn binary_run(binary: &str, run: usize, position: usize, throughput: f64) -> BinaryRun {
        BinaryRun {
            binary: binary.into(),
            run,
            position,
            paused: true,
            closed: vec![result(binary, "closed", 32, run, throughput)],
            stored_before_open: 1000,
            fill_s: 1.0,
            open: result(binary, "open", 2000, run, 2000.0),
            storage: Some(Storage {
                backend: "sqlite".into(),
                webhooks: 1000,
                records: 2000,
                bytes: if binary == OLD { 1_500_000 } else { 500_000 },
                page_size: Some(4096),
                file_bytes: None,
                wal_bytes: Some(1 << 20),
                other_files_bytes: 0,
                objects: vec![StoredObject {
                    name: "webhooks".into(),
                    bytes: 400_000,
                }],
            }),
            peak_rss_mib: Some(40.0),
        }
    }

    #[test]
    fn the_section_shows_medians_ratios_and_every_run_in_its_order() {
        let comparison = Comparison {
            header: "Measured today.".into(),
            settings: Settings {
                runs: 2,
                duration_s: 1.0,
                warmup_s: 0.5,
                concurrency: vec![32],
                grown: 1000,
                rate: 2000,
                users: 10,
                extra_env: Vec::new(),
            },
            old: Binary::describe(OLD, Path::new("/nonexistent/old"), "v1"),
            new: Binary::describe(NEW, Path::new("/nonexistent/new"), "commit abc"),
            baseline: vec![
                result(BASELINE, "closed", 32, 1, 10_000.0),
                result(BASELINE, "closed", 32, 2, 20_000.0),
            ],
            binaries: vec![
                binary_run(OLD, 1, 1, 2_000.0),
                binary_run(NEW, 1, 2, 4_000.0),
                binary_run(NEW, 2, 1, 6_000.0),
                binary_run(OLD, 2, 2, 2_000.0),
            ],
        };
        let markdown = render(&comparison);
        for expected in [
            "## Storage path: old binary against new\n\nMeasured today.\n",
            "Old binary `/nonexistent/old` (v1); new binary `/nonexistent/new` (commit abc).",
            "| Closed loop, 32 in flight: webhooks/s | 2,000 | 5,000 | 2.50 |  |",
            // Per-run ratios: old 0.2 and 0.1, new 0.4 and 0.3.
            "| Closed loop, 32 in flight: / baseline | 0.15 | 0.35 | 2.33 | ≥ 0.4 (at the best concurrency) |",
            "| Closed loop, 32 in flight: relay CPU µs per webhook | 50 | 50 | 1.00 | ≤ 40",
            "| Grown queue (1,000 stored), open loop 2,000 /s: p99 ms | 4.00 | 4.00 | 1.00 | ≤ 10 |",
            "| Stored bytes per webhook, at the end | 1,500 | 500 | 0.33 | ≤ 600 |",
            "| `webhooks` | 400 | 400 |",
            "| 1 | old (first) | 2,000, 4.00, 50 | 1,000 (1 s) | 1.00 / 4.00 / 6.00 | 1,500 | 1.0 MiB |",
            "| 2 | baseline | 20,000, 4.00, 50 | | | | |\n| 2 | new (first) |",
        ] {
            assert!(
                markdown.contains(expected),
                "{expected:?} missing in:\n{markdown}"
            );
        }
        assert!(!markdown.contains("except for the"));
    }
}
