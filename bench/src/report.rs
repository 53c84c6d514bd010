//! `BENCHMARKS.md` from a suite's [`Results`]: medians of the runs, ratios to the baseline,
//! and the targets of the "Performance" issue with a plain verdict for each.

use std::fmt::Write;

use crate::load::RunResult;
use crate::postgres::Setup;
use crate::suite::{BASELINE, Drain, FRESH, FRESH_POSTGRES, RELAY, RELAY_POSTGRES, Results};

/// Targets of the "Performance" issue.
const MIN_THROUGHPUT_RATIO: f64 = 0.5;
const MAX_P99_MS: f64 = 10.0;
const P99_RATE: u64 = 2000;
const MAX_PEAK_MIB: f64 = 64.0;
const MAX_IDLE_MIB: f64 = 20.0;
const MAX_REQUESTS_PER_1000: f64 = 1.02;

/// Medians over the runs of one server, mode and parameter.
struct Median {
    throughput: f64,
    p50: f64,
    p99: f64,
    p999: f64,
    max: f64,
    /// Server CPU per answered request, µs.
    cpu_per_request_us: Option<f64>,
    /// Server CPU time over wall time (1.0 = one core busy).
    cpu_cores: Option<f64>,
    /// The same for the database server behind the relay (Postgres), when counted.
    database_cpu_per_request_us: Option<f64>,
    database_cpu_cores: Option<f64>,
    client_cores: Option<f64>,
    failed: u64,
    exhausted: bool,
    /// Largest over the runs.
    max_in_flight: u64,
}

fn median(mut values: Vec<f64>) -> Option<f64> {
    values.retain(|v| v.is_finite());
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    Some(if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    })
}

fn summarize(runs: &[RunResult], server: &str, mode: &str, param: u64) -> Option<Median> {
    let runs: Vec<&RunResult> = runs
        .iter()
        .filter(|r| r.server == server && r.mode == mode && r.param == param)
        .collect();
    if runs.is_empty() {
        return None;
    }
    let of = |f: &dyn Fn(&RunResult) -> f64| median(runs.iter().map(|r| f(r)).collect());
    let optional =
        |f: &dyn Fn(&RunResult) -> Option<f64>| median(runs.iter().filter_map(|r| f(r)).collect());
    Some(Median {
        throughput: of(&|r| r.throughput).unwrap_or(0.0),
        p50: of(&|r| r.p50_ms).unwrap_or(f64::NAN),
        p99: of(&|r| r.p99_ms).unwrap_or(f64::NAN),
        p999: of(&|r| r.p999_ms).unwrap_or(f64::NAN),
        max: of(&|r| r.max_ms).unwrap_or(f64::NAN),
        cpu_per_request_us: optional(&|r| {
            r.server_cpu_s.map(|cpu| cpu * 1e6 / (r.ok().max(1) as f64))
        }),
        cpu_cores: optional(&|r| r.server_cpu_s.map(|cpu| cpu / r.elapsed_s)),
        database_cpu_per_request_us: optional(&|r| {
            r.database_cpu_s
                .map(|cpu| cpu * 1e6 / (r.ok().max(1) as f64))
        }),
        database_cpu_cores: optional(&|r| r.database_cpu_s.map(|cpu| cpu / r.elapsed_s)),
        client_cores: optional(&|r| r.client_cpu_s.map(|cpu| cpu / r.elapsed_s)),
        failed: runs.iter().map(|r| r.refused + r.failed).sum(),
        exhausted: runs.iter().any(|r| r.exhausted),
        max_in_flight: runs.iter().map(|r| r.max_in_flight).max().unwrap_or(0),
    })
}

fn params(runs: &[RunResult], mode: &str) -> Vec<u64> {
    let mut params: Vec<u64> = runs
        .iter()
        .filter(|r| r.mode == mode)
        .map(|r| r.param)
        .collect();
    params.sort_unstable();
    params.dedup();
    params
}

fn num(value: f64) -> String {
    if !value.is_finite() {
        return "–".into();
    }
    // Thousands separators for readability.
    let rounded = value.round() as i64;
    let digits = rounded.abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if rounded < 0 { format!("-{out}") } else { out }
}

fn ms(value: f64) -> String {
    if !value.is_finite() {
        "–".into()
    } else if value < 10.0 {
        format!("{value:.2}")
    } else {
        format!("{value:.1}")
    }
}

fn mib(value: Option<f64>) -> String {
    value.map_or("–".into(), |v| format!("{v:.1} MiB"))
}

fn opt(value: Option<f64>, digits: usize) -> String {
    value.map_or("–".into(), |v| format!("{v:.digits$}"))
}

/// How a server of the runs is named in the tables.
fn label(server: &str) -> &str {
    match server {
        RELAY => "relay, SQLite",
        RELAY_POSTGRES => "relay, Postgres",
        FRESH => "fresh relay, SQLite",
        FRESH_POSTGRES => "fresh relay, Postgres",
        other => other,
    }
}

/// The Postgres paragraph: what was measured, and whether its commits were durable.
fn postgres_paragraph(out: &mut String, setup: Option<&Setup>, nproc: usize) {
    let Some(pg) = setup else {
        let _ = writeln!(
            out,
            "**Postgres** was not measured in this run. `bash bench/run.sh` measures it when \
             Postgres is installed (it sets up a durable cluster with `bench/postgres.sh`; \
             `--no-postgres` skips it); or pass `--postgres postgres://...` to \
             `relay-bench suite`.\n"
        );
        return;
    };
    let data = pg
        .data_directory
        .as_ref()
        .map_or(String::new(), |dir| format!(", data in `{dir}`"));
    let _ = write!(
        out,
        "**Postgres.** The relay on Postgres is the same binary with \
         `RELAY_QUEUE__BACKEND=postgres` (group commit, a pool of 16 connections), its queue in \
         the database `{}` (dropped and created again at the start, empty; the relay creates its \
         schema) on PostgreSQL {} at `{}` over loopback TCP{data}. Settings read from the server \
         at bench time: `fsync = {}`, `synchronous_commit = {}`, `full_page_writes = {}`, \
         `wal_sync_method = {}`, `shared_buffers = {}`, `max_connections = {}`. ",
        pg.database,
        pg.version,
        pg.address,
        pg.fsync,
        pg.synchronous_commit,
        pg.full_page_writes,
        pg.wal_sync_method,
        pg.shared_buffers,
        pg.max_connections,
    );
    if pg.fsync != "on" {
        let _ = write!(
            out,
            "**These commits were not durable**: with `fsync = {}` Postgres never forces its \
             writes to disk, so a crash of the machine could lose or corrupt webhooks already \
             answered 202; these figures flatter Postgres against SQLite, whose commits are \
             synced. ",
            pg.fsync
        );
    } else if pg.synchronous_commit == "off" {
        let _ = write!(
            out,
            "**These commits were not durable**: with `synchronous_commit = off` a 202 may \
             precede the flush of its commit's WAL, so a crash of the machine could lose the \
             last webhooks answered 202; these figures flatter Postgres against SQLite, whose \
             commits are synced. "
        );
    } else {
        let _ = write!(
            out,
            "Commits are durable: each 202 follows a commit whose WAL was flushed to disk, as \
             with SQLite. "
        );
    }
    if pg.full_page_writes != "on" {
        let _ = write!(
            out,
            "With `full_page_writes = {}` a crash during a page write can leave a torn page \
             that recovery cannot repair. ",
            pg.full_page_writes
        );
    }
    let cpu = if pg.cpu_counted {
        "Its CPU (the postmaster and all its processes, including those that ended during a \
         window) is in the \"Postgres CPU\" columns, not in the relay's; its background work \
         (checkpoints, autovacuum) may spill into the runs that follow, whichever server they \
         measure."
    } else {
        "Its CPU is not counted (the server is not a process of this machine, or could not be \
         identified as one)."
    };
    let _ = writeln!(
        out,
        "The server runs on the same {nproc}-core machine as everything else. {cpu} Forwarding, \
         memory-probe and targets below are measured on SQLite only.\n"
    );
}

fn latencies(m: &Median) -> String {
    format!("{} / {} / {}", ms(m.p50), ms(m.p99), ms(m.p999))
}

fn flags(m: &Median) -> String {
    let mut flags = String::new();
    if m.failed > 0 {
        let _ = write!(flags, " ⚠ {} not 202", m.failed);
    }
    if m.exhausted {
        flags.push_str(" †");
    }
    flags
}

/// `relay-bench render`: the report from a suite's saved JSON.
pub fn render_file(json: &std::path::Path, out: &std::path::Path) -> anyhow::Result<()> {
    let results: Results = serde_json::from_str(&std::fs::read_to_string(json)?)?;
    std::fs::write(out, render(&results))?;
    Ok(())
}

pub fn render(results: &Results) -> String {
    let mut out = String::new();
    let m = &results.machine;
    let runs = &results.runs;
    let _ = writeln!(out, "# Benchmarks\n");
    let _ = writeln!(
        out,
        "Generated by `bench/run.sh` (the harness in `bench/`); do not edit by hand. Re-run with \
         `bash bench/run.sh` (about {} minutes, plus the release builds).\n",
        (m.total_s / 60.0).ceil().max(1.0)
    );
    let _ = writeln!(out, "| | |\n|---|---|");
    let _ = writeln!(out, "| Date | {} |", m.date);
    let _ = writeln!(out, "| Commit | `{}` |", m.commit);
    let _ = writeln!(out, "| CPU | {} × {} |", m.nproc, m.cpu_model);
    let _ = writeln!(out, "| Kernel | {} |", m.kernel);
    let _ = writeln!(
        out,
        "| Load average (1/5/15 min) | {} before, {} after |",
        m.load_before, m.load_after
    );
    let _ = writeln!(
        out,
        "| Runs | median of {} runs per mode, {} s measured after {} s warm-up; {} distinct users |",
        results.runs_per_mode, results.duration_s, results.warmup_s, results.users
    );
    let _ = writeln!(out, "| Suite time | {:.0} s |\n", m.total_s);

    let _ = writeln!(
        out,
        "**Noise.** This is a shared {}-core virtual machine: other engineers' builds and tests \
         ran at the same time (see the load average), and the load generator, the fake Heap and \
         the server under test share the same cores. Absolute figures are therefore low and \
         noisy; compare the **ratios** to the baseline, which ran interleaved with the relay \
         (run 1 baseline, run 1 relay on SQLite, run 1 relay on Postgres when measured, run 2 \
         baseline, ...) and suffered the same noise.\n",
        m.nproc
    );

    let _ = writeln!(out, "## Method\n");
    let _ = writeln!(
        out,
        "- **Requests**: unique, realistic webhooks of every kind (`samples::all` with varying \
         user ids and nonces), serialized and signed with `userpilot::sign` before each run. \
         HTTP/1.1 keep-alive connections (hyper's pooled client, `TCP_NODELAY`).\n\
         - **Baseline**: a bare axum server (`relay-bench baseline`) answering 202 with the \
         relay's body to the same requests, doing no work: same framework, runtime and \
         response, no verification, decoding, mapping or storage.\n\
         - **Relay**: the release binary, configured by environment only (`RELAY_*`), SQLite \
         queue in a temporary folder on the machine's disk (WAL, `synchronous = FULL`: every \
         202 follows a durable commit), `RELAY_LOG__LEVEL=warn`, forwarding to a fake Heap in \
         the harness at the default limit (15,000 events/min). The ingest runs are repeated \
         with the queue on Postgres (see **Postgres** below).\n\
         - **Closed loop**: N workers, each sending its next request when the previous one is \
         answered: maximum throughput (requests answered 202 per second). Latency there is \
         service time.\n\
         - **Open loop**: requests due at a fixed rate; latency measured from each request's \
         *intended* send time (coordinated-omission-correct: a stall is charged to every request \
         queued behind it), recorded in an HDR histogram. The scheduler wakes on tokio's 1 ms \
         timer, so up to ~1 ms of the figures is the generator's own timing, for both servers.\n\
         - **CPU**: utime + stime of the server process (`/proc/<pid>/stat`) over the measured \
         window; for Postgres, of the postmaster and its children (live ones, plus the \
         `cutime` + `cstime` of those it reaped). **Memory**: `VmRSS` idle (1 s after start) and `VmHWM` (peak) after all load \
         (`/proc/<pid>/status`).\n\
         - **Forwarding**: the fake Heap answers 200 at once and logs each request's time, \
         endpoint and array length.\n"
    );
    let stored_before_open = |server: &str| -> u64 {
        runs.iter()
            .filter(|r| r.server == server && r.mode == "closed")
            .map(|r| r.accepted)
            .sum()
    };
    if stored_before_open(RELAY) > 0 {
        let postgres = match stored_before_open(RELAY_POSTGRES) {
            0 => String::new(),
            stored => format!(
                " The relay on Postgres likewise keeps one database through its runs: more than \
                 {} stored webhooks before its open-loop runs.",
                num(stored as f64)
            ),
        };
        let _ = writeln!(
            out,
            "**Database size.** One relay process serves all ingest runs, and it keeps every \
             webhook (for redelivery deduplication, `queue.dedup_window_secs`, 7 days by \
             default), so its database grows through the runs as it would in production: the \
             open-loop runs, which come after the closed-loop ones, ran against more than {} \
             stored webhooks (those counted inside measured windows alone).{postgres}\n",
            num(stored_before_open(RELAY) as f64)
        );
    }
    postgres_paragraph(&mut out, results.postgres.as_ref(), m.nproc);

    // The servers of the ingest runs, in the order they ran; Postgres columns if it was measured.
    let servers: Vec<&str> = [BASELINE, RELAY, RELAY_POSTGRES]
        .into_iter()
        .filter(|name| runs.iter().any(|r| r.server == *name))
        .collect();
    let with_postgres = runs.iter().any(|r| r.server == RELAY_POSTGRES);
    let database_columns = |m: &Median, per_request: bool| {
        if !with_postgres {
            return String::new();
        }
        let cores = opt(m.database_cpu_cores, 2);
        if per_request {
            format!(" {} | {cores} |", opt(m.database_cpu_per_request_us, 0))
        } else {
            format!(" {cores} |")
        }
    };

    // Closed loop.
    let _ = writeln!(out, "## Ingest throughput (closed loop)\n");
    let _ = writeln!(
        out,
        "| Concurrency | Server | req/s | / baseline | p50 / p99 / p99.9 ms | Server CPU µs/req | Server CPU (cores) |{} Generator CPU (cores) |",
        if with_postgres {
            " Postgres CPU µs/req | Postgres CPU (cores) |"
        } else {
            ""
        }
    );
    let _ = writeln!(
        out,
        "|---:|---|---:|---:|---:|---:|---:|{}---:|",
        if with_postgres { "---:|---:|" } else { "" }
    );
    // Best throughput of each server, and the concurrency it came at.
    let mut best: Vec<(&str, f64, u64)> = Vec::new();
    for param in params(runs, "closed") {
        let Some(b) = summarize(runs, BASELINE, "closed", param) else {
            continue;
        };
        for &server in &servers {
            let Some(r) = summarize(runs, server, "closed", param) else {
                continue;
            };
            match best.iter_mut().find(|(name, _, _)| *name == server) {
                Some(entry) if entry.1 >= r.throughput => {}
                Some(entry) => *entry = (server, r.throughput, param),
                None => best.push((server, r.throughput, param)),
            }
            let ratio = if server == BASELINE {
                "–".to_owned()
            } else {
                format!("{:.2}", r.throughput / b.throughput.max(1e-9))
            };
            let _ = writeln!(
                out,
                "| {param} | {} | {}{} | {ratio} | {} | {} | {} |{} {} |",
                label(server),
                num(r.throughput),
                flags(&r),
                latencies(&r),
                opt(r.cpu_per_request_us, 0),
                opt(r.cpu_cores, 2),
                database_columns(&r, true),
                opt(r.client_cores, 2),
            );
        }
    }
    let best_of = |server: &str| {
        best.iter()
            .find(|(name, _, _)| *name == server)
            .map(|&(_, throughput, param)| (throughput, param))
    };
    let (best_baseline, best_relay) = (best_of(BASELINE), best_of(RELAY));
    let _ = writeln!(
        out,
        "\n† the prepared requests ran out before the window ended; that run's window was \
         shortened (its rate is still requests / measured seconds).\n"
    );
    let cost = |server: &str| {
        best_of(server)
            .and_then(|(_, param)| summarize(runs, server, "closed", param))
            .filter(|m| m.cpu_per_request_us.is_some())
    };
    if let (Some(b), Some(r)) = (
        cost(BASELINE).and_then(|m| m.cpu_per_request_us),
        cost(RELAY).and_then(|m| m.cpu_per_request_us),
    ) {
        let _ = write!(
            out,
            "**CPU cost.** At its best concurrency the relay on SQLite used {r:.0} µs of CPU per \
             webhook and the baseline {b:.0} µs ({:.1}×). On {} cores with nothing else running, \
             CPU alone would cap the relay near {} webhooks/s (cores ÷ CPU per webhook, ignoring \
             the load generator's share), if its single SQLite writer thread (about two thirds \
             of its CPU in a profile) did not saturate first.",
            r / b.max(1e-9),
            m.nproc,
            num(m.nproc as f64 * 1e6 / r.max(1e-9)),
        );
        if let Some(p) = cost(RELAY_POSTGRES)
            && let Some(relay_us) = p.cpu_per_request_us
        {
            let database = match p.database_cpu_per_request_us {
                Some(db) => format!(
                    " and the Postgres server {db:.0} µs more: {:.0} µs per webhook together \
                     ({:.1}× the baseline; the two share the machine's {} cores)",
                    relay_us + db,
                    (relay_us + db) / b.max(1e-9),
                    m.nproc
                ),
                None => " (the Postgres server's CPU not counted)".into(),
            };
            let _ = write!(
                out,
                " On Postgres, at its best concurrency, the relay used {relay_us:.0} µs per \
                 webhook{database}."
            );
        }
        let _ = writeln!(out, "\n");
    }

    // Open loop.
    let _ = writeln!(out, "## Ack latency at fixed rates (open loop)\n");
    let _ = writeln!(
        out,
        "Latency from the intended send time to the 202 answer, milliseconds.\n"
    );
    let _ = writeln!(
        out,
        "| Rate /s | Server | Achieved /s | p50 / p99 / p99.9 / max | p99 − baseline p99 | Server CPU (cores) |{} Most in flight |",
        if with_postgres {
            " Postgres CPU (cores) |"
        } else {
            ""
        }
    );
    let _ = writeln!(
        out,
        "|---:|---|---:|---:|---:|---:|{}---:|",
        if with_postgres { "---:|" } else { "" }
    );
    for param in params(runs, "open") {
        let baseline = summarize(runs, BASELINE, "open", param);
        for &server in &servers {
            let Some(r) = summarize(runs, server, "open", param) else {
                continue;
            };
            let over_baseline = match &baseline {
                Some(b) if server != BASELINE => ms(r.p99 - b.p99),
                _ => "–".into(),
            };
            let _ = writeln!(
                out,
                "| {} | {} | {}{} | {} / {} | {over_baseline} | {} |{} {} |",
                num(param as f64),
                label(server),
                num(r.throughput),
                flags(&r),
                latencies(&r),
                ms(r.max),
                opt(r.cpu_cores, 2),
                database_columns(&r, false),
                num(r.max_in_flight as f64),
            );
        }
    }
    for param in params(runs, "open") {
        for (server, what) in [(FRESH, "SQLite"), (FRESH_POSTGRES, "Postgres")] {
            if let Some(f) = summarize(runs, server, "open", param) {
                let database = f
                    .database_cpu_cores
                    .map_or(String::new(), |c| format!(", Postgres CPU {c:.2} cores"));
                let _ = writeln!(
                    out,
                    "\nThe same at {} /s on a **fresh relay on {what} (empty queue)**: p50 / p99 / \
                     p99.9 / max {} / {} ms, {} /s achieved{}, relay CPU {} cores{database}.",
                    num(param as f64),
                    latencies(&f),
                    ms(f.max),
                    num(f.throughput),
                    flags(&f),
                    opt(f.cpu_cores, 2),
                );
            }
        }
    }
    let _ = writeln!(
        out,
        "\n\"Most in flight\": the most requests outstanding at once in any run (each holds \
         its own HTTP/1.1 connection); it grows when the server falls behind the rate. \
         \"not 202\": requests answered otherwise (the relay's 503 when it cannot take more) or \
         not answered within 10 s.\n"
    );

    // Memory.
    let mem = &results.memory;
    let _ = writeln!(out, "## Memory (resident set)\n");
    // The relay on Postgres gets a column when it was measured.
    let postgres_mib = |value: Option<f64>| {
        if with_postgres {
            format!(" {} |", mib(value))
        } else {
            String::new()
        }
    };
    let no_postgres = postgres_mib(None);
    let _ = writeln!(
        out,
        "| | Baseline | Relay{} |\n|---|---:|---:|{}",
        if with_postgres {
            " (SQLite) | Relay (Postgres)"
        } else {
            ""
        },
        if with_postgres { "---:|" } else { "" }
    );
    let _ = writeln!(
        out,
        "| Idle, 1 s after start (`VmRSS`) | {} | {} |{}",
        mib(mem.baseline_idle_mib),
        mib(mem.relay_idle_mib),
        postgres_mib(mem.relay_postgres_idle_mib)
    );
    let most_in_flight = |server: &str| {
        runs.iter()
            .filter(|r| r.server == server)
            .map(|r| r.max_in_flight)
            .max()
            .unwrap_or(0)
    };
    let _ = writeln!(
        out,
        "| Peak during the ingest runs (`VmHWM`); most connections at once: baseline {}, relay {}{} | {} | {} |{}",
        num(most_in_flight(BASELINE) as f64),
        num(most_in_flight(RELAY) as f64),
        if with_postgres {
            format!(
                ", relay on Postgres {}",
                num(most_in_flight(RELAY_POSTGRES) as f64)
            )
        } else {
            String::new()
        },
        mib(mem.baseline_peak_mib),
        mib(mem.relay_peak_mib),
        postgres_mib(mem.relay_postgres_peak_mib)
    );
    let _ = writeln!(
        out,
        "| After the ingest runs (`VmRSS`) | – | {} |{no_postgres}",
        mib(mem.relay_after_load_mib)
    );
    let _ = writeln!(
        out,
        "| Peak while forwarding at saturation and live (`VmHWM`) | – | {} |{no_postgres}",
        mib(mem.forwarding_peak_mib)
    );
    if mem.drain_peak_mib.is_some() {
        let _ = writeln!(
            out,
            "| Peak during the large backlog drain (`VmHWM`) | – | {} |{no_postgres}",
            mib(mem.drain_peak_mib)
        );
    }
    let _ = writeln!(out);
    if !mem.by_connections.is_empty() {
        let _ = writeln!(
            out,
            "Peak RSS of a fresh relay against the number of concurrent connections (closed \
             loop, 2 s at each count, rising; HTTP/1.1, so one request in flight per \
             connection):\n"
        );
        let _ = writeln!(
            out,
            "| Connections | Peak RSS | req/s | p99 ms |\n|---:|---:|---:|---:|"
        );
        for level in &mem.by_connections {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} |",
                num(level.connections as f64),
                mib(level.peak_mib),
                num(level.throughput),
                ms(level.p99_ms)
            );
        }
        let _ = writeln!(out);
    }

    // Forwarding.
    let _ = writeln!(out, "## Forwarding to Heap\n");
    let drains: Vec<(&str, &Drain)> = [
        (
            "Backlog released at saturation",
            results.saturation.as_ref(),
        ),
        ("Live: ingest and forwarding at once", results.live.as_ref()),
        (
            "Backlog under a low limit",
            results.limit.as_ref().map(|l| &l.drain),
        ),
        ("Large backlog (opt-in)", results.big_drain.as_ref()),
    ]
    .into_iter()
    .filter_map(|(label, drain)| drain.map(|d| (label, d)))
    .collect();
    if drains.is_empty() {
        let _ = writeln!(out, "Not measured in this run.\n");
    } else {
        let _ = writeln!(
            out,
            "| | Webhooks | Track events | Forwarded events/s | `/api/track` requests | Mean batch | Full batches (1,000) | Track requests per 1,000 events | All Heap requests per 1,000 events | User-property requests | Relay CPU s |"
        );
        let _ = writeln!(
            out,
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        for (label, d) in &drains {
            let _ = writeln!(
                out,
                "| {label} | {} | {} | {} | {} | {:.0} | {} | {:.3} | {:.3} | {} | {} |",
                num(d.webhooks as f64),
                num(d.track_events as f64),
                num(d.events_per_s),
                num(d.track_requests as f64),
                d.mean_batch,
                num(d.full_batches as f64),
                d.track_requests_per_1000,
                d.all_requests_per_1000,
                num(d.user_requests as f64),
                opt(d.relay_cpu_s, 1),
            );
        }
        let _ = writeln!(
            out,
            "\n\"Backlog\" rows: the webhooks are queued with the forwarder paused \
             (`POST /admin/forwarder/pause`), then released; events/s runs from the release to \
             the last event received. \"Live\": closed loop at 32 in flight for {} s while the \
             forwarder runs, until the queue is empty. Saturation and live use \
             `RELAY_HEAP__EVENTS_PER_MINUTE` high enough not to bind.\n",
            results.duration_s
        );
        if let Some(live) = &results.live {
            let _ = writeln!(
                out,
                "Ingest while forwarding live: {} webhooks/s (32 in flight).\n",
                num(live.ingest_per_s)
            );
        }
    }
    if let Some(limit) = &results.limit {
        let _ = writeln!(out, "### Rate limit\n");
        let _ = writeln!(
            out,
            "`RELAY_HEAP__EVENTS_PER_MINUTE={}`; the relay's budget is a burst of {} events (one \
             full batch) then {:.1} events/s. {} events drained over {:.1} s.\n",
            limit.configured_per_min,
            limit.burst,
            limit.configured_per_min as f64 / 60.0,
            num(limit.drain.track_events as f64),
            limit.span_s
        );
        let _ = writeln!(out, "| | Measured | Allowed |\n|---|---:|---:|");
        let _ = writeln!(
            out,
            "| Steady rate after the first batch | {} events/min | {} events/min |",
            num(limit.steady_per_min),
            num(limit.configured_per_min as f64)
        );
        let _ = writeln!(
            out,
            "| Worst excess over burst + rate × t, at any arrival | {:.1} events | ≤ 0 |",
            limit.worst_excess_events
        );
        let _ = writeln!(
            out,
            "| Most events in any 10 s window | {} | {} (limit/6) + {} burst |\n",
            num(limit.max_in_10s as f64),
            num(limit.configured_per_min as f64 / 6.0),
            limit.burst
        );
        let _ = writeln!(
            out,
            "The limiter is a token bucket (GCRA) whose burst is one batch: over any window of \
             T seconds it sends at most burst + limit × T / 60 events. Over a 60 s window that \
             is the limit plus one batch ({} events above it): Heap's documented limit is per \
             minute, and whether Heap counts a leading burst against it is not documented.\n",
            limit.burst
        );
    }

    // Targets.
    let _ = writeln!(out, "## Targets\n");
    let _ = writeln!(out, "| Target | Measured | Verdict |\n|---|---|---|");
    let verdict = |met: bool| if met { "**met**" } else { "**not met**" };
    match (best_baseline, best_relay) {
        (Some((b, bc)), Some((r, rc))) => {
            let ratio = r / b.max(1e-9);
            let _ = writeln!(
                out,
                "| Ingest with durable SQLite commit ≥ 50% of baseline throughput | best relay {} req/s (at {rc}) / best baseline {} req/s (at {bc}) = {:.0}% | {} |",
                num(r),
                num(b),
                ratio * 100.0,
                verdict(ratio >= MIN_THROUGHPUT_RATIO)
            );
        }
        _ => {
            let _ = writeln!(
                out,
                "| Ingest ≥ 50% of baseline throughput | – | not measured |"
            );
        }
    }
    let kept_up = |m: &Median| m.throughput >= P99_RATE as f64 * 0.98 && m.failed == 0;
    match summarize(runs, RELAY, "open", P99_RATE) {
        Some(r) => {
            let fresh = summarize(runs, FRESH, "open", P99_RATE);
            let fresh_text = fresh.as_ref().map_or(String::new(), |f| {
                format!(
                    "; on an empty database p99 {} ms (p99.9 {} ms)",
                    ms(f.p99),
                    ms(f.p999)
                )
            });
            let fresh_verdict = fresh.as_ref().map_or(String::new(), |f| {
                format!(
                    "; {} on an empty database",
                    verdict(f.p99 <= MAX_P99_MS && kept_up(f))
                )
            });
            let _ = writeln!(
                out,
                "| p99 ack latency ≤ 10 ms at 2,000 webhooks/s | p99 {} ms (p99.9 {} ms), {} /s achieved, with the database grown by the earlier runs{fresh_text} | {} with the grown database{fresh_verdict} |",
                ms(r.p99),
                ms(r.p999),
                num(r.throughput),
                verdict(r.p99 <= MAX_P99_MS && kept_up(&r)),
            );
        }
        None => {
            let _ = writeln!(
                out,
                "| p99 ack latency ≤ 10 ms at 2,000 webhooks/s | – | not measured |"
            );
        }
    }
    let peak = [mem.relay_peak_mib, mem.forwarding_peak_mib]
        .into_iter()
        .flatten()
        .fold(None, |acc: Option<f64>, v| {
            Some(acc.map_or(v, |a| a.max(v)))
        });
    match peak {
        Some(peak) => {
            let over: Vec<String> = mem
                .by_connections
                .iter()
                .filter(|level| level.peak_mib.is_some_and(|p| p > MAX_PEAK_MIB))
                .map(|level| {
                    format!(
                        "{} at {} connections",
                        mib(level.peak_mib),
                        num(level.connections as f64)
                    )
                })
                .collect();
            let (over_text, over_verdict) = if over.is_empty() {
                (String::new(), String::new())
            } else {
                (
                    format!("; memory probe: {}", over.join(", ")),
                    " at the suite's load; **not met** with that many connections".to_owned(),
                )
            };
            let _ = writeln!(
                out,
                "| Peak RSS ≤ 64 MiB under max load | {peak:.1} MiB (ingest runs, up to {} connections at once; forwarding at saturation){over_text} | {}{over_verdict} |",
                num(most_in_flight(RELAY) as f64),
                verdict(peak <= MAX_PEAK_MIB)
            );
        }
        None => {
            let _ = writeln!(
                out,
                "| Peak RSS ≤ 64 MiB under max load | – | not measured |"
            );
        }
    }
    match mem.relay_idle_mib {
        Some(idle) => {
            let _ = writeln!(
                out,
                "| RSS ≤ 20 MiB idle | {idle:.1} MiB | {} |",
                verdict(idle <= MAX_IDLE_MIB)
            );
        }
        None => {
            let _ = writeln!(out, "| RSS ≤ 20 MiB idle | – | not measured |");
        }
    }
    match &results.saturation {
        Some(d) => {
            let _ = writeln!(
                out,
                "| ≤ 1.02 Heap requests per 1,000 events at saturation | {:.3} `/api/track` requests per 1,000 events (mean batch {:.0}); {:.3} counting the `add_user_properties` requests too | {} for `/api/track`; {} counting every Heap request |",
                d.track_requests_per_1000,
                d.mean_batch,
                d.all_requests_per_1000,
                verdict(d.track_requests_per_1000 <= MAX_REQUESTS_PER_1000),
                verdict(d.all_requests_per_1000 <= MAX_REQUESTS_PER_1000),
            );
        }
        None => {
            let _ = writeln!(
                out,
                "| ≤ 1.02 Heap requests per 1,000 events at saturation | – | not measured |"
            );
        }
    }
    match &results.limit {
        Some(l) => {
            // Arrival times are taken at the sink, a network hop after the limiter decided;
            // allow 1% of a batch for that jitter.
            let tolerance = l.burst as f64 * 0.01;
            let reached = l.steady_per_min >= l.configured_per_min as f64 * 0.95;
            let respected = l.worst_excess_events <= tolerance;
            let _ = writeln!(
                out,
                "| Configured Heap rate limit reached but not exceeded | steady {} events/min of {} configured ({:.1}%); worst excess over the budget {:.1} events | {} |",
                num(l.steady_per_min),
                num(l.configured_per_min as f64),
                l.steady_per_min * 100.0 / l.configured_per_min.max(1) as f64,
                l.worst_excess_events,
                verdict(reached && respected)
            );
        }
        None => {
            let _ = writeln!(
                out,
                "| Configured Heap rate limit reached but not exceeded | – | not measured |"
            );
        }
    }
    match &results.big_drain {
        Some(d) => {
            let _ = writeln!(
                out,
                "| Backlog drain of {} events | {:.0} s at {} events/s; peak RSS {} | measured |",
                num(d.track_events as f64),
                d.drain_s,
                num(d.events_per_s),
                mib(mem.drain_peak_mib)
            );
        }
        None => {
            let _ = writeln!(
                out,
                "| Backlog drain of 1,000,000 events | – | not measured (opt-in: `bash bench/run.sh --drain 1000000`, long) |"
            );
        }
    }
    let _ = writeln!(out);
    for note in &results.notes {
        let _ = writeln!(out, "{note}\n");
    }

    // Every run.
    let _ = writeln!(out, "## Every run\n");
    let _ = writeln!(out, "<details><summary>{} runs</summary>\n", runs.len());
    let _ = writeln!(
        out,
        "| Server | Mode | N | Run | req/s | p50 | p99 | p99.9 | max | Server CPU s |{} Generator CPU s | Accepted | Refused | Failed | Events |",
        if with_postgres {
            " Postgres CPU s |"
        } else {
            ""
        }
    );
    let _ = writeln!(
        out,
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|{}---:|---:|---:|---:|---:|",
        if with_postgres { "---:|" } else { "" }
    );
    for r in runs {
        let database = if with_postgres {
            format!(" {} |", opt(r.database_cpu_s, 2))
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {}{} | {} | {} | {} | {} | {} |{database} {} | {} | {} | {} | {} |",
            r.server,
            r.mode,
            r.param,
            r.run,
            num(r.throughput),
            if r.exhausted { " †" } else { "" },
            ms(r.p50_ms),
            ms(r.p99_ms),
            ms(r.p999_ms),
            ms(r.max_ms),
            opt(r.server_cpu_s, 2),
            opt(r.client_cpu_s, 2),
            r.accepted,
            r.refused,
            r.failed,
            r.events,
        );
    }
    let _ = writeln!(out, "\n</details>");
    let _ = writeln!(
        out,
        "\nMedians above are taken per column over the runs, so one row's figures may come \
         from different runs."
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(vec![]), None);
    }

    fn run(server: &str, mode: &str, param: u64, throughput: f64) -> RunResult {
        RunResult {
            server: server.into(),
            mode: mode.into(),
            param,
            run: 1,
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
            p99_ms: 2.0,
            p999_ms: 3.0,
            max_ms: 4.0,
            mean_ms: 1.0,
            server_cpu_s: Some(0.5),
            client_cpu_s: Some(0.1),
            database_cpu_s: (server == RELAY_POSTGRES).then_some(0.25),
            exhausted: false,
            max_in_flight: 8,
        }
    }

    fn setup(fsync: &str, synchronous_commit: &str) -> Setup {
        Setup {
            address: "127.0.0.1:5434".into(),
            database: "relay_bench".into(),
            version: "15.18".into(),
            fsync: fsync.into(),
            synchronous_commit: synchronous_commit.into(),
            full_page_writes: "on".into(),
            wal_sync_method: "fdatasync".into(),
            shared_buffers: "128MB".into(),
            max_connections: "100".into(),
            data_directory: None,
            cpu_counted: true,
        }
    }

    fn report(servers: &[&str], postgres: Option<Setup>) -> String {
        let mut runs = Vec::new();
        for &server in servers {
            runs.push(run(server, "closed", 8, 1000.0));
            runs.push(run(server, "open", 1000, 1000.0));
        }
        render(&Results {
            machine: crate::suite::Machine {
                cpu_model: "test".into(),
                nproc: 2,
                kernel: "test".into(),
                load_before: String::new(),
                load_after: String::new(),
                commit: "test".into(),
                date: "today".into(),
                total_s: 60.0,
            },
            runs_per_mode: 1,
            duration_s: 1.0,
            warmup_s: 0.0,
            users: 10,
            runs,
            memory: crate::suite::Memory::default(),
            saturation: None,
            live: None,
            limit: None,
            big_drain: None,
            notes: Vec::new(),
            postgres,
        })
    }

    #[test]
    fn postgres_rows_and_settings_appear_beside_sqlite() {
        let markdown = report(&[BASELINE, RELAY, RELAY_POSTGRES], Some(setup("on", "on")));
        for expected in [
            "| 8 | relay, SQLite | 1,000 | 1.00 |",
            "| 8 | relay, Postgres | 1,000 | 1.00 | 1.00 / 2.00 / 3.00 | 500 | 0.50 | 250 | 0.25 |",
            "| 1,000 | relay, Postgres | 1,000 | 1.00 / 2.00 / 3.00 / 4.00 | 0.00 | 0.50 | 0.25 |",
            "Postgres CPU µs/req",
            "`fsync = on`, `synchronous_commit = on`, `full_page_writes = on`",
            "Commits are durable",
            "| relay-postgres | closed | 8 | 1 |",
        ] {
            assert!(
                markdown.contains(expected),
                "{expected:?} missing in:\n{markdown}"
            );
        }
        assert!(!markdown.contains("not durable"));
    }

    #[test]
    fn commits_without_fsync_or_synchronous_commit_are_called_not_durable() {
        let no_fsync = report(&[BASELINE, RELAY, RELAY_POSTGRES], Some(setup("off", "on")));
        assert!(no_fsync.contains("**These commits were not durable**: with `fsync = off`"));
        let asynchronous = report(&[BASELINE, RELAY, RELAY_POSTGRES], Some(setup("on", "off")));
        assert!(
            asynchronous
                .contains("**These commits were not durable**: with `synchronous_commit = off`")
        );
    }

    #[test]
    fn without_postgres_the_report_says_how_to_measure_it() {
        let markdown = report(&[BASELINE, RELAY], None);
        assert!(markdown.contains("**Postgres** was not measured in this run."));
        assert!(!markdown.contains("Postgres CPU"));
        assert!(markdown.contains("| 8 | baseline | 1,000 | – |"));
    }

    #[test]
    fn numbers_get_thousands_separators() {
        assert_eq!(num(1234567.4), "1,234,567");
        assert_eq!(num(999.0), "999");
        assert_eq!(num(-1500.0), "-1,500");
    }
}
