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
//!
//! A run may spread its requests over several URLs (one per relay source, each webhook signed
//! with its source's secret: [`prepare_spread`], [`closed_to`], [`open_to`]); besides the
//! window's figures it then counts every answer of the run per URL ([`RunResult::sent`]), so
//! what each source accepted can be checked against what reached Heap.

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
    /// Which of the run's URLs it goes to (0 when there is one).
    pub target: usize,
}

/// `count` unique signed webhooks, every kind mixed, from `users` distinct users. `tag` makes
/// the bodies unique across runs (the relay would answer "duplicate" to a repeated body).
pub fn prepare(
    count: usize,
    secret: &str,
    tag: &str,
    users: usize,
) -> anyhow::Result<Vec<Prepared>> {
    prepare_spread(count, &[secret], tag, users)
}

/// Like [`prepare`], spread evenly over `secrets.len()` URLs: after the shuffle, webhook `i`
/// goes to URL `i % n`, signed with `secrets[i % n]`, so every URL gets the same number (give or
/// take one) and the same mix of kinds, in random order.
pub fn prepare_spread(
    count: usize,
    secrets: &[&str],
    tag: &str,
    users: usize,
) -> anyhow::Result<Vec<Prepared>> {
    anyhow::ensure!(!secrets.is_empty(), "no secret to sign with");
    let now = chrono::Utc::now().timestamp();
    let mut rng = fastrand::Rng::with_seed(count as u64 ^ tag.len() as u64);
    let mut bodies = Vec::with_capacity(count + 16);
    let mut round = 0u64;
    while bodies.len() < count {
        let user = format!("bench-user-{:05}", rng.usize(..users.max(1)));
        let nonce = format!("{tag}-{round}");
        round += 1;
        for (_, body) in samples::all(&user, now, &nonce) {
            bodies.push(serde_json::to_vec(&body)?);
        }
    }
    bodies.truncate(count);
    rng.shuffle(&mut bodies);
    bodies
        .into_iter()
        .enumerate()
        .map(|(i, body)| {
            let target = i % secrets.len();
            let signature = userpilot::sign(&body, secrets[target], now);
            Ok(Prepared {
                body: Bytes::from(body),
                signature: HeaderValue::from_str(&signature)?,
                target,
            })
        })
        .collect()
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

/// Every answer of a run to one of its URLs: the warm-up's and those after the window too
/// (unlike the window's figures), so that it says exactly what the server took.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sent {
    pub requests: u64,
    /// Answered 202 `accepted`.
    pub accepted: u64,
    /// Heap events the relay said it queued for those.
    pub events: u64,
    /// Answered 202 `duplicate` or `quarantined`.
    pub not_queued: u64,
    pub refused: u64,
    /// Not answered (connection error or timeout): the server may have queued them anyway.
    pub failed: u64,
}

impl Sent {
    fn add(&mut self, outcome: Outcome) {
        self.requests += 1;
        match outcome {
            Outcome::Accepted { events } => {
                self.accepted += 1;
                self.events += events;
            }
            Outcome::Duplicate | Outcome::Quarantined => self.not_queued += 1,
            Outcome::Refused(_) => self.refused += 1,
            Outcome::Failed => self.failed += 1,
        }
    }

    pub fn merge(&mut self, other: &Sent) {
        self.requests += other.requests;
        self.accepted += other.accepted;
        self.events += other.events;
        self.not_queued += other.not_queued;
        self.refused += other.refused;
        self.failed += other.failed;
    }
}

/// Records `outcome` for URL `target` in `sent` (one entry per URL).
fn count_sent(sent: &mut [Sent], target: usize, outcome: Outcome) {
    if let Some(entry) = sent.get_mut(target) {
        entry.add(outcome);
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
    /// Every answer of the run, per URL in the order given ([`Sent`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sent: Vec<Sent>,
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
            sent: Vec::new(),
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
    closed_to(client, std::slice::from_ref(uri), pool, concurrency, plan).await
}

/// [`closed`] over several URLs: each request goes to `targets[request.target]`.
pub async fn closed_to(
    client: &Client,
    targets: &[Uri],
    pool: Arc<Vec<Prepared>>,
    concurrency: usize,
    plan: Plan,
) -> RunResult {
    let targets: Arc<[Uri]> = targets.into();
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let window_start = start + plan.warmup;
    let window_end = window_start + plan.duration;
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let (client, targets, pool, next) =
            (client.clone(), targets.clone(), pool.clone(), next.clone());
        workers.spawn(async move {
            let mut tally = Tally::new();
            let mut sent_to = vec![Sent::default(); targets.len()];
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
                let outcome = match targets.get(item.target) {
                    Some(uri) => send(&client, uri, item).await,
                    None => Outcome::Failed,
                };
                count_sent(&mut sent_to, item.target, outcome);
                let done = Instant::now();
                if done >= window_start && done <= window_end {
                    tally.record(outcome, done - sent);
                }
            }
            (tally, exhausted_at, sent_to)
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
    let mut sent = vec![Sent::default(); targets.len()];
    for (part, exhausted, part_sent) in &results {
        tally.merge(part);
        for (total, part) in sent.iter_mut().zip(part_sent) {
            total.merge(part);
        }
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
    result.sent = sent;
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
    open_to(client, std::slice::from_ref(uri), pool, rate, plan).await
}

/// [`open`] over several URLs: each request goes to `targets[request.target]`.
pub async fn open_to(
    client: &Client,
    targets: &[Uri],
    pool: Arc<Vec<Prepared>>,
    rate: u64,
    plan: Plan,
) -> RunResult {
    let targets: Arc<[Uri]> = targets.into();
    let mut sent = vec![Sent::default(); targets.len()];
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
        let (client, targets, pool) = (client.clone(), targets.clone(), pool.clone());
        in_flight.spawn(async move {
            let (target, outcome) = match pool.get(i as usize) {
                Some(item) => match targets.get(item.target) {
                    Some(uri) => (item.target, send(&client, uri, item).await),
                    None => (item.target, Outcome::Failed),
                },
                None => (0, Outcome::Failed),
            };
            drop(permit);
            (intended, target, outcome, Instant::now())
        });
        while let Some(joined) = in_flight.try_join_next() {
            if let Ok((intended, target, outcome, done)) = joined {
                count_sent(&mut sent, target, outcome);
                if intended >= window_start {
                    tally.record(outcome, done - intended);
                }
            }
        }
    }
    let mark = mark.unwrap_or_else(|| CpuMark::take(&plan));
    tokio::time::sleep_until(window_end).await;
    let cpu = mark.since(&plan);
    while let Some(joined) = in_flight.join_next().await {
        if let Ok((intended, target, outcome, done)) = joined {
            count_sent(&mut sent, target, outcome);
            if intended >= window_start {
                tally.record(outcome, done - intended);
            }
        }
    }
    let mut result = RunResult::from_tally("open", rate, &tally, plan.duration);
    result.exhausted = exhausted;
    result.max_in_flight = max_in_flight as u64;
    result.set_cpu(cpu);
    result.sent = sent;
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

#[cfg(test)]
mod tests {
    use super::*;
    use axum::Router;
    use axum::http::StatusCode;
    use axum::routing::post;
    use userpilot_heap_relay::secret::Secret;
    use userpilot_heap_relay::userpilot::verify;

    #[test]
    fn a_spread_signs_each_webhook_with_its_urls_secret_and_shares_them_evenly() {
        let secrets = [
            "spread-secret-zero",
            "spread-secret-one",
            "spread-secret-two",
        ];
        let pool = prepare_spread(100, &secrets, "spread", 10).unwrap();
        assert_eq!(pool.len(), 100);
        let now = chrono::Utc::now().timestamp();
        let mut per_target = [0; 3];
        for item in &pool {
            per_target[item.target] += 1;
            let header = Some(item.signature.as_bytes());
            let own = [Secret::new(secrets[item.target])];
            assert!(verify(item.body.clone(), header, &own, 300, now).is_ok());
            let others: Vec<Secret> = (0..secrets.len())
                .filter(|&i| i != item.target)
                .map(|i| Secret::new(secrets[i]))
                .collect();
            assert!(verify(item.body.clone(), header, &others, 300, now).is_err());
        }
        assert_eq!(per_target, [34, 33, 33]);
    }

    /// A server answering 202 with 1 event at `/a` and 2 events at `/b`; the two URLs.
    async fn two_urls() -> [Uri; 2] {
        let answer = |events: u64| {
            move || async move {
                (
                    StatusCode::ACCEPTED,
                    format!(r#"{{"status":"accepted","events":{events}}}"#),
                )
            }
        };
        let app = Router::new()
            .route("/a", post(answer(1)))
            .route("/b", post(answer(2)));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        [
            format!("http://{addr}/a").parse().unwrap(),
            format!("http://{addr}/b").parse().unwrap(),
        ]
    }

    #[tokio::test]
    async fn a_closed_run_counts_every_answer_per_url() {
        let urls = two_urls().await;
        let pool = Arc::new(prepare_spread(200, &["s-a", "s-b"], "closed-to", 10).unwrap());
        let plan = Plan {
            warmup: Duration::ZERO,
            duration: Duration::from_secs(30),
            server_pid: None,
            database_pid: None,
        };
        let result = closed_to(&client(), &urls, pool, 4, plan).await;
        assert!(result.exhausted);
        assert_eq!(result.sent.len(), 2);
        let [a, b] = [result.sent[0], result.sent[1]];
        assert_eq!((a.requests, a.accepted, a.events), (100, 100, 100));
        assert_eq!((b.requests, b.accepted, b.events), (100, 100, 200));
        assert_eq!(result.accepted, 200);
        assert_eq!(result.events, 300);
    }

    #[tokio::test]
    async fn an_open_run_counts_its_warm_up_per_url_but_not_in_its_window() {
        let urls = two_urls().await;
        let pool = Arc::new(prepare_spread(60, &["s-a", "s-b"], "open-to", 10).unwrap());
        // 200/s: the first 20 requests are due in the warm-up, the next 40 in the window,
        // then the pool runs out.
        let plan = Plan {
            warmup: Duration::from_millis(100),
            duration: Duration::from_secs(1),
            server_pid: None,
            database_pid: None,
        };
        let result = open_to(&client(), &urls, pool, 200, plan).await;
        assert!(result.exhausted);
        let sent: u64 = result.sent.iter().map(|s| s.accepted).sum();
        assert_eq!(sent, 60);
        assert_eq!(result.sent[0].events + result.sent[1].events, 30 + 60);
        assert_eq!(result.accepted, 40);
    }
}
