//! The load generator.
//!
//! Requests are prepared before a run: unique realistic webhooks of every kind
//! (`samples::all` with varying user ids and nonces), serialized and signed, so a run spends
//! its time sending, not building. They go out over keep-alive HTTP/1.1 connections (hyper's
//! pooled client, `TCP_NODELAY`).
//!
//! - Closed loop: `concurrency` workers each send the next request as soon as the previous one
//!   was answered. Gives the maximum throughput; latency here is service time.
//! - Open loop: requests are due at a fixed rate, each at its intended time `start + i / rate`,
//!   whether or not earlier ones were answered. Latency is measured from the intended time, not
//!   from when the request actually left, so a server that stalls is charged for the requests
//!   that queued behind the stall (no coordinated omission).
//!
//! A run has a warm-up (connections open, caches fill), then a measured window: only requests
//! completed (closed loop) or due (open loop) inside the window count.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::Uri;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use userpilot_heap_relay::{samples, userpilot};

use crate::procfs;

/// One webhook ready to send.
pub struct Prepared {
    pub body: Bytes,
    pub signature: HeaderValue,
}

/// `count` unique signed webhooks, every kind mixed, from `users` distinct users. `tag` makes
/// the bodies unique across runs (the relay would answer "duplicate" to a repeated body).
pub fn prepare(
    count: usize,
    secret: &str,
    tag: &str,
    users: usize,
) -> anyhow::Result<Vec<Prepared>> {
    let now = chrono::Utc::now().timestamp();
    let mut rng = fastrand::Rng::with_seed(count as u64 ^ tag.len() as u64);
    let mut prepared = Vec::with_capacity(count + 16);
    let mut round = 0u64;
    while prepared.len() < count {
        let user = format!("bench-user-{:05}", rng.usize(..users.max(1)));
        let nonce = format!("{tag}-{round}");
        round += 1;
        for (_, body) in samples::all(&user, now, &nonce) {
            let body = serde_json::to_vec(&body)?;
            let signature = userpilot::sign(&body, secret, now);
            prepared.push(Prepared {
                body: Bytes::from(body),
                signature: HeaderValue::from_str(&signature)?,
            });
        }
    }
    prepared.truncate(count);
    rng.shuffle(&mut prepared);
    Ok(prepared)
}

pub type Client = HyperClient<HttpConnector, Full<Bytes>>;

/// A pooled keep-alive client: one connection per concurrent request, reused.
pub fn client() -> Client {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    HyperClient::builder(TokioExecutor::new())
        .pool_max_idle_per_host(usize::MAX)
        .pool_idle_timeout(Duration::from_secs(60))
        .build(connector)
}

/// How long one request may take before it counts as failed.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// What became of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// 202 `accepted`, with the number of Heap events the relay queued.
    Accepted {
        events: u64,
    },
    Duplicate,
    Quarantined,
    /// Any other status.
    Refused(u16),
    /// Connection error or timeout.
    Failed,
}

#[derive(Deserialize)]
struct Answer {
    status: Option<String>,
    events: Option<u64>,
}

pub async fn send(client: &Client, uri: &Uri, item: &Prepared) -> Outcome {
    let request = Request::post(uri.clone())
        .header(CONTENT_TYPE, "application/json")
        .header("x-signature", item.signature.clone())
        .body(Full::new(item.body.clone()));
    let Ok(request) = request else {
        return Outcome::Failed;
    };
    let exchange = async {
        let response = client.request(request).await.ok()?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.ok()?.to_bytes();
        Some((status, body))
    };
    let Ok(Some((status, body))) = tokio::time::timeout(REQUEST_TIMEOUT, exchange).await else {
        return Outcome::Failed;
    };
    if status != 202 {
        return Outcome::Refused(status);
    }
    match serde_json::from_slice::<Answer>(&body) {
        Ok(Answer {
            status: Some(s), ..
        }) if s == "duplicate" => Outcome::Duplicate,
        Ok(Answer {
            status: Some(s), ..
        }) if s == "quarantined" => Outcome::Quarantined,
        Ok(Answer { events, .. }) => Outcome::Accepted {
            events: events.unwrap_or(0),
        },
        Err(_) => Outcome::Accepted { events: 0 },
    }
}

/// Outcomes and latencies of a run (or part of one).
#[derive(Clone)]
pub struct Tally {
    /// Microseconds.
    pub latency: Histogram<u64>,
    pub accepted: u64,
    pub duplicate: u64,
    pub quarantined: u64,
    pub refused: u64,
    pub failed: u64,
    pub events: u64,
}

/// Microseconds from 1 µs to 10 min, 3 significant digits; longer values are clamped.
fn histogram() -> Histogram<u64> {
    // Constant, valid bounds: this cannot fail.
    #[allow(clippy::expect_used)]
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

impl Tally {
    pub fn new() -> Self {
        Self {
            latency: histogram(),
            accepted: 0,
            duplicate: 0,
            quarantined: 0,
            refused: 0,
            failed: 0,
            events: 0,
        }
    }

    pub fn record(&mut self, outcome: Outcome, latency: Duration) {
        match outcome {
            Outcome::Accepted { events } => {
                self.accepted += 1;
                self.events += events;
            }
            Outcome::Duplicate => self.duplicate += 1,
            Outcome::Quarantined => self.quarantined += 1,
            Outcome::Refused(_) => self.refused += 1,
            Outcome::Failed => self.failed += 1,
        }
        let micros = u64::try_from(latency.as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        self.latency.saturating_record(micros);
    }

    pub fn merge(&mut self, other: &Tally) {
        let _ = self.latency.add(&other.latency);
        self.accepted += other.accepted;
        self.duplicate += other.duplicate;
        self.quarantined += other.quarantined;
        self.refused += other.refused;
        self.failed += other.failed;
        self.events += other.events;
    }

    /// Requests answered 202 (accepted, duplicate or quarantined).
    pub fn ok(&self) -> u64 {
        self.accepted + self.duplicate + self.quarantined
    }

    pub fn completed(&self) -> u64 {
        self.ok() + self.refused + self.failed
    }
}

/// One run's figures.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunResult {
    pub server: String,
    /// "closed" or "open".
    pub mode: String,
    /// Concurrency (closed) or target rate per second (open).
    pub param: u64,
    pub run: usize,
    pub elapsed_s: f64,
    pub completed: u64,
    pub accepted: u64,
    pub duplicate: u64,
    pub quarantined: u64,
    pub refused: u64,
    pub failed: u64,
    /// Heap events the relay reported queuing (from its 202 answers).
    pub events: u64,
    /// Requests answered 202 per second of the measured window.
    pub throughput: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
    /// CPU time the server process used in the window.
    pub server_cpu_s: Option<f64>,
    /// CPU time this process (load generator) used in the window.
    pub client_cpu_s: Option<f64>,
    /// CPU time the database server behind the relay (Postgres: all its processes) used in
    /// the window, when it runs on this machine.
    #[serde(default)]
    pub database_cpu_s: Option<f64>,
    /// The prepared requests ran out before the window ended (the window was shortened).
    pub exhausted: bool,
    /// Most requests in flight at once (each on its own connection): the concurrency in
    /// closed loop; in open loop, how far requests piled up while the server lagged.
    pub max_in_flight: u64,
}

impl RunResult {
    /// Requests answered 202 (accepted, duplicate or quarantined).
    pub fn ok(&self) -> u64 {
        self.accepted + self.duplicate + self.quarantined
    }

    fn from_tally(mode: &str, param: u64, tally: &Tally, elapsed: Duration) -> Self {
        let ms = |micros: u64| micros as f64 / 1000.0;
        let elapsed_s = elapsed.as_secs_f64().max(1e-9);
        let h = &tally.latency;
        RunResult {
            server: String::new(),
            mode: mode.into(),
            param,
            run: 0,
            elapsed_s,
            completed: tally.completed(),
            accepted: tally.accepted,
            duplicate: tally.duplicate,
            quarantined: tally.quarantined,
            refused: tally.refused,
            failed: tally.failed,
            events: tally.events,
            throughput: tally.ok() as f64 / elapsed_s,
            p50_ms: ms(h.value_at_quantile(0.50)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
            mean_ms: h.mean() / 1000.0,
            server_cpu_s: None,
            client_cpu_s: None,
            database_cpu_s: None,
            exhausted: false,
            max_in_flight: 0,
        }
    }
}

/// The timing of a run, and whose CPU to measure.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    pub warmup: Duration,
    pub duration: Duration,
    pub server_pid: Option<u32>,
    /// The database server's parent process (the Postgres postmaster), whose whole process
    /// tree is measured ([`procfs::tree_cpu_seconds`]).
    pub database_pid: Option<u32>,
}

/// CPU seconds of the server, this process and the database, read at the start of the window.
struct CpuMark {
    server: Option<f64>,
    client: Option<f64>,
    database: Option<f64>,
}

/// CPU seconds used in the window.
struct CpuUsed {
    server: Option<f64>,
    client: Option<f64>,
    database: Option<f64>,
}

impl CpuMark {
    fn take(plan: &Plan) -> Self {
        CpuMark {
            server: plan.server_pid.and_then(procfs::cpu_seconds),
            client: procfs::cpu_seconds(std::process::id()),
            database: plan.database_pid.and_then(procfs::tree_cpu_seconds),
        }
    }

    fn since(&self, plan: &Plan) -> CpuUsed {
        let now = CpuMark::take(plan);
        let used = |after: Option<f64>, before: Option<f64>| after.zip(before).map(|(b, a)| b - a);
        CpuUsed {
            server: used(now.server, self.server),
            client: used(now.client, self.client),
            database: used(now.database, self.database),
        }
    }
}

impl RunResult {
    fn set_cpu(&mut self, cpu: CpuUsed) {
        self.server_cpu_s = cpu.server;
        self.client_cpu_s = cpu.client;
        self.database_cpu_s = cpu.database;
    }
}

/// Closed loop: `concurrency` workers, each with one request in flight at all times.
pub async fn closed(
    client: &Client,
    uri: &Uri,
    pool: Arc<Vec<Prepared>>,
    concurrency: usize,
    plan: Plan,
) -> RunResult {
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let window_start = start + plan.warmup;
    let window_end = window_start + plan.duration;
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let (client, uri, pool, next) = (client.clone(), uri.clone(), pool.clone(), next.clone());
        workers.spawn(async move {
            let mut tally = Tally::new();
            let mut exhausted_at = None;
            loop {
                let sent = Instant::now();
                if sent >= window_end {
                    break;
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(item) = pool.get(i) else {
                    exhausted_at = Some(sent);
                    break;
                };
                let outcome = send(&client, &uri, item).await;
                let done = Instant::now();
                if done >= window_start && done <= window_end {
                    tally.record(outcome, done - sent);
                }
            }
            (tally, exhausted_at)
        });
    }
    tokio::time::sleep_until(window_start).await;
    let mark = CpuMark::take(&plan);
    // Wake at the end of the window, or earlier if every worker is done (requests ran out).
    let mut tally = Tally::new();
    let mut exhausted_at: Option<Instant> = None;
    let mut cpu = None;
    let mut results = Vec::new();
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(window_end), if cpu.is_none() => {
                cpu = Some(mark.since(&plan));
            }
            joined = workers.join_next() => match joined {
                Some(Ok(result)) => results.push(result),
                Some(Err(_)) => {}
                None => break,
            },
        }
    }
    let end = if cpu.is_some() {
        window_end
    } else {
        Instant::now()
    };
    let cpu = cpu.unwrap_or_else(|| mark.since(&plan));
    for (part, exhausted) in &results {
        tally.merge(part);
        if let Some(at) = exhausted {
            exhausted_at = Some(exhausted_at.map_or(*at, |e: Instant| e.min(*at)));
        }
    }
    let end = exhausted_at.map_or(end, |at| at.min(end)).max(window_start);
    let mut result =
        RunResult::from_tally("closed", concurrency as u64, &tally, end - window_start);
    result.exhausted = exhausted_at.is_some_and(|at| at < window_end);
    result.max_in_flight = concurrency as u64;
    result.set_cpu(cpu);
    result
}

/// The most requests in flight in open loop; past it, sending waits (and the wait counts as
/// latency, since latency runs from the intended time).
const MAX_IN_FLIGHT: usize = 4096;

/// Open loop: one request every `1 / rate` seconds, latency from its intended send time.
pub async fn open(
    client: &Client,
    uri: &Uri,
    pool: Arc<Vec<Prepared>>,
    rate: u64,
    plan: Plan,
) -> RunResult {
    let rate = rate.max(1);
    let start = Instant::now() + Duration::from_millis(20);
    let window_start = start + plan.warmup;
    let window_end = window_start + plan.duration;
    let permits = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut in_flight = tokio::task::JoinSet::new();
    let mut tally = Tally::new();
    let mut mark = None;
    let mut exhausted = false;
    let mut max_in_flight = 0;
    for i in 0u64.. {
        let intended = start + Duration::from_secs_f64(i as f64 / rate as f64);
        if intended >= window_end {
            break;
        }
        if mark.is_none() && intended >= window_start {
            tokio::time::sleep_until(window_start).await;
            mark = Some(CpuMark::take(&plan));
        }
        let Some(_) = pool.get(i as usize) else {
            exhausted = true;
            break;
        };
        tokio::time::sleep_until(intended).await;
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        max_in_flight = max_in_flight.max(MAX_IN_FLIGHT - permits.available_permits());
        let (client, uri, pool) = (client.clone(), uri.clone(), pool.clone());
        in_flight.spawn(async move {
            let outcome = match pool.get(i as usize) {
                Some(item) => send(&client, &uri, item).await,
                None => Outcome::Failed,
            };
            drop(permit);
            (intended, outcome, Instant::now())
        });
        while let Some(joined) = in_flight.try_join_next() {
            if let Ok((intended, outcome, done)) = joined
                && intended >= window_start
            {
                tally.record(outcome, done - intended);
            }
        }
    }
    let mark = mark.unwrap_or_else(|| CpuMark::take(&plan));
    tokio::time::sleep_until(window_end).await;
    let cpu = mark.since(&plan);
    while let Some(joined) = in_flight.join_next().await {
        if let Ok((intended, outcome, done)) = joined
            && intended >= window_start
        {
            tally.record(outcome, done - intended);
        }
    }
    let mut result = RunResult::from_tally("open", rate, &tally, plan.duration);
    result.exhausted = exhausted;
    result.max_in_flight = max_in_flight as u64;
    result.set_cpu(cpu);
    result
}

/// `relay-bench load`: one run against any URL.
#[derive(clap::Args)]
pub struct Options {
    /// The webhook URL, e.g. http://127.0.0.1:8080/webhooks/userpilot
    #[arg(long)]
    url: String,
    /// The webhook secret to sign with.
    #[arg(long)]
    secret: String,
    /// Closed loop with this many requests in flight.
    #[arg(long, conflicts_with = "rate")]
    concurrency: Option<usize>,
    /// Open loop at this many requests per second.
    #[arg(long)]
    rate: Option<u64>,
    /// Seconds measured (after the warm-up).
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Requests to prepare (closed loop stops early when they run out).
    #[arg(long, default_value_t = 100_000)]
    requests: usize,
    /// Distinct user ids.
    #[arg(long, default_value_t = 2000)]
    users: usize,
    /// Server process whose CPU time to report.
    #[arg(long)]
    pid: Option<u32>,
}

pub async fn run_cli(options: Options) -> anyhow::Result<()> {
    let uri: Uri = options.url.parse().context("--url")?;
    let tag = format!(
        "cli-{}",
        chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0)
    );
    let pool = Arc::new(prepare(
        options.requests,
        &options.secret,
        &tag,
        options.users,
    )?);
    let plan = Plan {
        warmup: Duration::from_secs_f64(options.warmup),
        duration: Duration::from_secs_f64(options.duration),
        server_pid: options.pid,
        database_pid: None,
    };
    let client = client();
    let result = match options.rate {
        Some(rate) => open(&client, &uri, pool, rate, plan).await,
        None => closed(&client, &uri, pool, options.concurrency.unwrap_or(8), plan).await,
    };
    println!("{}", serde_json::to_string_pretty(&result)?);
    Ok(())
}
