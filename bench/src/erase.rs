//! The cost of an erasure (issue 14, contract §12): a relay on SQLite holding `stored`
//! webhooks of one person among `others` of other users, erased through `POST /admin/erase`
//! while a load generator posts webhooks at a fixed rate (open loop, latency from the intended
//! send time). Its figures: how long the erasure took, and the p50/p99/max ingest latency of
//! the requests due while it ran, against the same load without an erasure, in the same
//! harness and relay, the two windows alternating run after run (each run erases a person of
//! its own, seeded before it). The answer time of a lone webhook (one group commit with its
//! fsync, closed loop at concurrency 1) is shown for reference.
//!
//! The forwarder is paused throughout: its claims and acks would add writer work that differs
//! from window to window; the erasure deletes pending records as it would delivered ones.
//!
//! [`measure`] is the phase (the smoke's and `relay-bench erase`'); [`run_cli`] is that
//! subcommand.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, Uri};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::time::Instant;
use userpilot_heap_relay::{samples, userpilot};

use crate::load::{self, Client, Outcome, Plan, Prepared};
use crate::section::{self, Occasion};
use crate::server::{ADMIN_TOKEN, SECRET, Server};
use crate::sink::Sink;
use crate::suite::tag;

/// What one measurement runs.
#[derive(Debug, Clone)]
pub struct Settings {
    pub runs: usize,
    /// Webhooks of the person erased in each run.
    pub stored: usize,
    /// Webhooks of other users, stored once before the runs.
    pub others: usize,
    /// Webhooks per second of the concurrent load.
    pub rate: u64,
    /// Seconds of load before the erasure is asked for (and before the plain window).
    pub warmup: f64,
    /// Seconds of the plain window; the erasure's window lasts at least as long, and until
    /// the erasure has answered.
    pub window: f64,
    /// The longest erasure the load is prepared for, seconds (the load's webhooks are signed
    /// before the window: it cannot make more while it runs).
    pub max_erase: f64,
    /// More environment for the relay.
    pub extra_env: Vec<(&'static str, String)>,
}

/// `relay-bench erase`: the measurement alone.
#[derive(clap::Args, Clone)]
pub struct Options {
    /// The relay binary (a release build).
    #[arg(long)]
    pub relay_bin: PathBuf,
    /// Runs: each erases a person of its own, and has a plain window beside it.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Stored webhooks of the person erased in each run.
    #[arg(long, default_value_t = 10_000)]
    pub stored: usize,
    /// Stored webhooks of other users.
    #[arg(long, default_value_t = 40_000)]
    pub others: usize,
    /// Webhooks per second posted during the windows.
    #[arg(long, default_value_t = 1000)]
    pub rate: u64,
    /// Seconds of load before the erasure (or the plain window) starts.
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,
    /// Seconds of the plain window (the erasure's lasts as long at least).
    #[arg(long, default_value_t = 5.0)]
    pub window: f64,
    /// The longest erasure the load is prepared for, seconds.
    #[arg(long, default_value_t = 60.0)]
    pub max_erase: f64,
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

/// Latency of the requests due in one span of a window.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Latency {
    pub requests: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// One run: its erasure and its plain window.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Run {
    pub run: usize,
    pub erase_first: bool,
    pub erase_ms: f64,
    /// The erasure's answer (`removed`, `erasure_id`, ...).
    pub answer: Value,
    /// Requests due while the erasure ran.
    pub during_erase: Latency,
    /// Requests due in the erasure's whole window (the erasure and what followed it).
    pub erase_window: Latency,
    /// Requests due in the plain window.
    pub plain: Latency,
}

/// The measurement's result.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Measurement {
    pub runs: Vec<Run>,
    pub stored: usize,
    pub others: usize,
    pub rate: u64,
    pub warmup_s: f64,
    pub window_s: f64,
    /// A lone webhook's answer (closed loop, concurrency 1): one group commit each.
    pub lone_webhook: Latency,
}

/// One request of an open-loop window: when it was due (from the window's start), its latency
/// from then, and its outcome.
struct Sample {
    due: Duration,
    latency: Duration,
    outcome: Outcome,
}

/// `count` unique signed webhooks of `identity`, every kind mixed.
fn prepare_for(identity: &str, count: usize, tag: &str) -> anyhow::Result<Vec<Prepared>> {
    let now = chrono::Utc::now().timestamp();
    let mut prepared = Vec::with_capacity(count);
    ensure!(!samples::all(identity, now, tag).is_empty(), "no samples");
    for round in 0.. {
        for (_, body) in samples::all(identity, now, &format!("{tag}-{round}")) {
            if prepared.len() == count {
                return Ok(prepared);
            }
            let body = serde_json::to_vec(&body)?;
            let signature = userpilot::sign(&body, SECRET, now);
            prepared.push(Prepared {
                body: Bytes::from(body),
                signature: signature.parse()?,
                target: 0,
            });
        }
    }
    Ok(prepared)
}

/// Stores `pool` as fast as the relay takes it; fails unless every webhook was accepted.
async fn store(client: &Client, relay: &Server, pool: Vec<Prepared>) -> anyhow::Result<()> {
    let count = pool.len() as u64;
    let plan = Plan {
        warmup: Duration::ZERO,
        duration: Duration::from_secs(3600),
        server_pid: None,
        database_pid: None,
    };
    let result = load::closed(client, &relay.webhook_uri()?, Arc::new(pool), 16, plan).await;
    ensure!(
        result.accepted == count,
        "seeding: {} of {count} webhooks accepted ({} duplicate, {} quarantined, {} refused, {} \
         failed); relay log:\n{}",
        result.accepted,
        result.duplicate,
        result.quarantined,
        result.refused,
        result.failed,
        relay.log_tail()
    );
    Ok(())
}

/// Open loop over `pool` at `rate` until `stop` says so (or the pool runs out: an error).
async fn open_loop(
    client: Client,
    uri: Uri,
    pool: Arc<Vec<Prepared>>,
    rate: u64,
    start: Instant,
    stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<Vec<Sample>> {
    let mut in_flight = tokio::task::JoinSet::new();
    for i in 0..pool.len() {
        if *stop.borrow() {
            break;
        }
        let due = Duration::from_secs_f64(i as f64 / rate.max(1) as f64);
        tokio::time::sleep_until(start + due).await;
        let (client, uri, shared) = (client.clone(), uri.clone(), pool.clone());
        in_flight.spawn(async move {
            let outcome = match shared.get(i) {
                Some(item) => load::send(&client, &uri, item).await,
                None => Outcome::Failed,
            };
            Sample {
                due,
                latency: Instant::now() - (start + due),
                outcome,
            }
        });
        if i + 1 == pool.len() {
            bail!("the load's webhooks ran out: the erasure took longer than --max-erase");
        }
    }
    let mut samples = Vec::with_capacity(pool.len());
    while let Some(joined) = in_flight.join_next().await {
        samples.push(joined?);
    }
    Ok(samples)
}

/// The latency of the samples due in `[from, to)`.
fn latency(samples: &[Sample], from: Duration, to: Duration) -> Latency {
    // Constant, valid bounds: this cannot fail.
    #[allow(clippy::expect_used)]
    let mut histogram =
        Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds");
    for sample in samples.iter().filter(|s| s.due >= from && s.due < to) {
        let micros = u64::try_from(sample.latency.as_micros()).unwrap_or(u64::MAX);
        histogram.saturating_record(micros.max(1));
    }
    let ms = |micros: u64| micros as f64 / 1000.0;
    Latency {
        requests: histogram.len(),
        p50_ms: ms(histogram.value_at_quantile(0.5)),
        p99_ms: ms(histogram.value_at_quantile(0.99)),
        max_ms: ms(histogram.max()),
    }
}

/// `POST /admin/erase` with a JSON body: status and answer.
async fn post_erase(
    client: &Client,
    relay: &Server,
    identity: &str,
) -> anyhow::Result<(u16, Value)> {
    let base = relay.admin_url.as_deref().context("no admin port")?;
    let body = serde_json::to_vec(&json!({ "source": "default", "identity": identity }))?;
    let request = Request::builder()
        .method(Method::POST)
        .uri(format!("{base}/admin/erase"))
        .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))?;
    let response = tokio::time::timeout(Duration::from_secs(600), client.request(request))
        .await
        .context("the erasure did not answer within 600 s")??;
    let status = response.status().as_u16();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, serde_json::from_slice(&body).unwrap_or(Value::Null)))
}

/// One window of load: with `erase = Some(identity)` the erasure is asked for after the
/// warm-up and the window lasts until it answered (and `window` at least). Returns the samples,
/// the erasure's span (from the window's start) and its answer.
async fn window(
    client: &Client,
    relay: &Server,
    settings: &Settings,
    label: &str,
    erase: Option<&str>,
) -> anyhow::Result<(Vec<Sample>, Option<(Duration, Duration, Value)>)> {
    // Enough webhooks for the longest erasure prepared for.
    let seconds = settings.warmup + settings.window.max(settings.max_erase) + 1.0;
    let count = (settings.rate as f64 * seconds) as usize;
    let pool = Arc::new(load::prepare(count, SECRET, &tag(label), 2000)?);
    let start = Instant::now() + Duration::from_millis(20);
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let load = tokio::spawn(open_loop(
        client.clone(),
        relay.webhook_uri()?,
        pool,
        settings.rate,
        start,
        stopped,
    ));
    let warmup = Duration::from_secs_f64(settings.warmup);
    tokio::time::sleep_until(start + warmup).await;
    let erased = match erase {
        Some(identity) => {
            let began = Instant::now() - start;
            let (status, answer) = post_erase(client, relay, identity).await?;
            let ended = Instant::now() - start;
            ensure!(
                status == 200,
                "POST /admin/erase answered {status}: {answer}; relay log:\n{}",
                relay.log_tail()
            );
            Some((began, ended, answer))
        }
        None => None,
    };
    let end = erased
        .as_ref()
        .map_or(warmup, |(_, ended, _)| *ended)
        .max(warmup + Duration::from_secs_f64(settings.window));
    tokio::time::sleep_until(start + end).await;
    let _ = stop.send(true);
    let samples = load.await??;
    let bad = samples
        .iter()
        .filter(|s| !matches!(s.outcome, Outcome::Accepted { .. }))
        .count();
    ensure!(
        bad == 0,
        "{label}: {bad} of {} webhooks not accepted; relay log:\n{}",
        samples.len(),
        relay.log_tail()
    );
    Ok((samples, erased))
}

/// The measurement: the relay, the seeding, every run, the lone-webhook reference.
pub async fn measure(
    settings: &Settings,
    client: &Client,
    sink: &Sink,
    relay_bin: &std::path::Path,
    scratch: &std::path::Path,
) -> anyhow::Result<Measurement> {
    let relay = Server::relay(client, relay_bin, &sink.url(), &settings.extra_env, scratch)
        .await?
        .named("relay-erase");
    relay
        .admin(client, Method::POST, "/admin/forwarder/pause")
        .await?;
    eprintln!(
        "== erase: storing {} webhooks of other users",
        settings.others
    );
    store(
        client,
        &relay,
        load::prepare(settings.others, SECRET, &tag("erase-others"), 2000)?,
    )
    .await?;

    let plan = Plan {
        warmup: Duration::from_millis(200),
        duration: Duration::from_secs(2),
        server_pid: None,
        database_pid: None,
    };
    let pool = Arc::new(load::prepare(200_000, SECRET, &tag("erase-lone"), 2000)?);
    let lone = load::closed(client, &relay.webhook_uri()?, pool, 1, plan).await;
    let lone_webhook = Latency {
        requests: lone.completed,
        p50_ms: lone.p50_ms,
        p99_ms: lone.p99_ms,
        max_ms: lone.max_ms,
    };

    let mut runs = Vec::new();
    for run in 1..=settings.runs {
        let identity = format!("erase-bench-person-{run}-{}", tag("id"));
        eprintln!(
            "== erase run {run}: storing {} webhooks of {identity}",
            settings.stored
        );
        store(
            client,
            &relay,
            prepare_for(&identity, settings.stored, &tag("erase-person"))?,
        )
        .await?;
        // Runs alternate which window goes first, so neither is always the warmer one.
        let erase_first = run % 2 == 1;
        let mut erased = None;
        let mut plain = None;
        for erasing in [erase_first, !erase_first] {
            if erasing {
                erased =
                    Some(window(client, &relay, settings, "erase-load", Some(&identity)).await?);
            } else {
                plain = Some(window(client, &relay, settings, "plain-load", None).await?);
            }
        }
        let (Some((erase_samples, Some((began, ended, answer)))), Some((plain_samples, _))) =
            (erased, plain)
        else {
            bail!("run {run}: a window is missing");
        };
        ensure!(
            answer["removed"]["webhooks"] == settings.stored as u64,
            "run {run}: the erasure removed {} webhooks, not the {} stored: {answer}",
            answer["removed"]["webhooks"],
            settings.stored
        );
        let warmup = Duration::from_secs_f64(settings.warmup);
        let result = Run {
            run,
            erase_first,
            erase_ms: (ended - began).as_secs_f64() * 1000.0,
            during_erase: latency(&erase_samples, began, ended),
            erase_window: latency(&erase_samples, warmup, Duration::MAX),
            plain: latency(&plain_samples, warmup, Duration::MAX),
            answer,
        };
        eprintln!(
            "erase run {run}: erased in {:.0} ms; during it p50 {:.2} p99 {:.2} max {:.2} ms \
             ({} requests); plain p50 {:.2} p99 {:.2} max {:.2} ms",
            result.erase_ms,
            result.during_erase.p50_ms,
            result.during_erase.p99_ms,
            result.during_erase.max_ms,
            result.during_erase.requests,
            result.plain.p50_ms,
            result.plain.p99_ms,
            result.plain.max_ms
        );
        runs.push(result);
    }
    relay.stop().await;
    Ok(Measurement {
        runs,
        stored: settings.stored,
        others: settings.others,
        rate: settings.rate,
        warmup_s: settings.warmup,
        window_s: settings.window,
        lone_webhook,
    })
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut sorted: Vec<f64> = values.filter(|v| v.is_finite()).collect();
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

/// The section of the report.
pub fn render(measurement: &Measurement, header: &str) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "## Erasure: erasing one person under load\n");
    if !header.is_empty() {
        let _ = writeln!(out, "{header}\n");
    }
    let _ = writeln!(
        out,
        "The relay on SQLite holding {} webhooks of other users and, in each run, {} of the \
         person erased (`POST /admin/erase`, local only), forwarder paused, while webhooks are \
         posted at {}/s (open loop, latency from the intended send time). Each run has an \
         erasure window and a plain window ({} s after a {} s warm-up) under the same load, \
         alternating which goes first. A lone webhook's answer (one group commit and its fsync, \
         concurrency 1): p50 {:.2} ms, p99 {:.2} ms.\n",
        measurement.others,
        measurement.stored,
        measurement.rate,
        measurement.window_s,
        measurement.warmup_s,
        measurement.lone_webhook.p50_ms,
        measurement.lone_webhook.p99_ms
    );
    let _ = writeln!(
        out,
        "| run | first | erasure (ms) | during the erasure p50 / p99 / max (ms) | requests | \
         erasure window p50 / p99 / max (ms) | plain window p50 / p99 / max (ms) |"
    );
    let _ = writeln!(out, "|---:|---|---:|---|---:|---|---|");
    let triple = |l: &Latency| format!("{:.2} / {:.2} / {:.2}", l.p50_ms, l.p99_ms, l.max_ms);
    for run in &measurement.runs {
        let _ = writeln!(
            out,
            "| {} | {} | {:.0} | {} | {} | {} | {} |",
            run.run,
            if run.erase_first { "erasure" } else { "plain" },
            run.erase_ms,
            triple(&run.during_erase),
            run.during_erase.requests,
            triple(&run.erase_window),
            triple(&run.plain)
        );
    }
    let runs = &measurement.runs;
    let _ = writeln!(
        out,
        "\nMedian of the runs: erasure {:.0} ms; during it p99 {:.2} ms against {:.2} ms \
         without (max {:.2} against {:.2}).",
        median(runs.iter().map(|r| r.erase_ms)),
        median(runs.iter().map(|r| r.during_erase.p99_ms)),
        median(runs.iter().map(|r| r.plain.p99_ms)),
        median(runs.iter().map(|r| r.during_erase.max_ms)),
        median(runs.iter().map(|r| r.plain.max_ms)),
    );
    out
}

/// `relay-bench erase`: runs the measurement and prints its section of the report.
pub async fn run_cli(options: Options) -> anyhow::Result<()> {
    let scratch = section::scratch(options.scratch.as_ref())?;
    let client = load::client();
    let sink = Sink::start().await?;
    let occasion = Occasion::now();
    let settings = Settings {
        runs: options.runs,
        stored: options.stored,
        others: options.others,
        rate: options.rate,
        warmup: options.warmup,
        window: options.window,
        max_erase: options.max_erase,
        extra_env: Vec::new(),
    };
    let measurement = measure(
        &settings,
        &client,
        &sink,
        &options.relay_bin,
        scratch.path(),
    )
    .await?;
    let header = occasion.header(&options.commit);
    let markdown = render(&measurement, &header);
    section::publish(
        &markdown,
        &measurement,
        options.out.as_deref(),
        options.json.as_deref(),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(due_ms: u64, latency_ms: u64) -> Sample {
        Sample {
            due: Duration::from_millis(due_ms),
            latency: Duration::from_millis(latency_ms),
            outcome: Outcome::Accepted { events: 1 },
        }
    }

    #[test]
    fn latency_counts_only_the_requests_due_in_the_span() {
        let samples = [sample(0, 100), sample(10, 1), sample(20, 2), sample(30, 50)];
        let during = latency(
            &samples,
            Duration::from_millis(10),
            Duration::from_millis(30),
        );
        assert_eq!(during.requests, 2);
        assert!((during.max_ms - 2.0).abs() < 0.01, "{during:?}");
        assert!((during.p50_ms - 1.0).abs() < 0.01, "{during:?}");
    }

    #[test]
    fn the_persons_webhooks_are_all_theirs_and_unique() {
        let pool = prepare_for("bench-person", 50, "t").unwrap();
        assert_eq!(pool.len(), 50);
        let bodies: std::collections::HashSet<&Bytes> = pool.iter().map(|p| &p.body).collect();
        assert_eq!(bodies.len(), 50);
        for item in &pool {
            assert!(String::from_utf8_lossy(&item.body).contains("bench-person"));
        }
    }

    #[test]
    fn the_section_shows_every_run_and_the_medians() {
        let l = |p50, p99, max| Latency {
            requests: 100,
            p50_ms: p50,
            p99_ms: p99,
            max_ms: max,
        };
        let measurement = Measurement {
            runs: vec![Run {
                run: 1,
                erase_first: true,
                erase_ms: 812.0,
                answer: Value::Null,
                during_erase: l(1.5, 9.0, 12.0),
                erase_window: l(1.2, 7.0, 12.0),
                plain: l(1.0, 3.0, 4.0),
            }],
            stored: 10_000,
            others: 40_000,
            rate: 1000,
            warmup_s: 1.0,
            window_s: 5.0,
            lone_webhook: l(0.8, 1.9, 2.0),
        };
        let section = render(&measurement, "");
        assert!(
            section.contains("| 1 | erasure | 812 | 1.50 / 9.00 / 12.00 | 100 | 1.20 / 7.00 / 12.00 | 1.00 / 3.00 / 4.00 |"),
            "{section}"
        );
        assert!(
            section.contains("erasure 812 ms; during it p99 9.00 ms against 3.00 ms"),
            "{section}"
        );
        assert!(section.contains("p50 0.80 ms"), "{section}");
    }
}
