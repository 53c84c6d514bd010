//! Heap outages against the relay binary (contract §3, §7): while Heap answers 503, times out or
//! throttles with 429, the backlog waits in the queue — not in memory — the relay retries at a
//! bounded rate and honours `Retry-After`, and once Heap recovers every accepted event arrives,
//! once per idempotency key, with nothing dead-lettered.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::{
    Answer, FakeHeap, Posted, RelayProcess, eventually, post_concurrently, set_env,
};
use serde_json::{Value, json};
use tokio::sync::Notify;

/// `RELAY_RETRY__INITIAL_BACKOFF_MS` in [`RelayProcess::env`]: after every failed Heap request
/// the forwarder as a whole waits at least this long.
const INITIAL_BACKOFF_MS: u128 = 50;

fn webhook(seq: usize) -> Value {
    json!({
        "timestamp": chrono::Utc::now().timestamp(),
        "data": {
            "type": "nps",
            "score": seq % 11,
            "seq": seq,
            "user": { "user_id": format!("outage-{seq}"), "plan": "pro" },
        },
    })
}

/// Posts webhooks `range` to the relay with 32 concurrent senders; all must be accepted.
async fn post_accepted(
    relay: &RelayProcess,
    bodies: &Arc<Vec<Value>>,
    range: std::ops::Range<usize>,
) {
    let never = Arc::new(Notify::new());
    let outcomes = post_concurrently(
        &relay.client,
        bodies,
        range.collect(),
        32,
        usize::MAX,
        never,
    )
    .await;
    for (seq, outcome) in outcomes {
        assert!(
            matches!(&outcome, Posted::Answered(202, answer) if answer["status"] == "accepted"),
            "seq {seq}: {outcome:?}"
        );
    }
}

/// Each accepted event once: distinct idempotency keys, as many as events.
fn assert_once_each(events: &[Value], expected: usize) {
    let keys: BTreeSet<&str> = events
        .iter()
        .map(|e| e["idempotency_key"].as_str().unwrap())
        .collect();
    assert_eq!(keys.len(), expected);
    assert_eq!(events.len(), expected, "an event was accepted twice");
}

async fn assert_no_dead_letters(relay: &RelayProcess) {
    let (status, answer) = relay
        .admin(reqwest::Method::GET, "/admin/dead-letters")
        .await;
    assert_eq!(status, 200);
    assert_eq!(answer["dead_letters"], json!([]));
}

/// Sum of `relay_heap_requests_total` samples with `status="<status>"`, from `/metrics`.
async fn heap_requests_with_status(relay: &RelayProcess, status: &str) -> f64 {
    let text = reqwest::get(format!("{}/metrics", relay.admin_url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let label = format!("status=\"{status}\"");
    text.lines()
        .filter(|l| l.starts_with("relay_heap_requests_total{") && l.contains(&label))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_heap_outage_keeps_the_backlog_queued_with_bounded_retries_and_flat_memory() {
    const WARM_UP: usize = 50;
    const BACKLOG: usize = 2000;
    let heap = FakeHeap::start().await;
    let down = Arc::new(AtomicBool::new(false));
    let refused: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let (is_down, log) = (down.clone(), refused.clone());
    heap.respond_with(move |_, _| {
        if is_down.load(Ordering::SeqCst) {
            log.lock().unwrap().push(Instant::now());
            Answer::status(503)
        } else {
            Answer::OK
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let mut env = RelayProcess::env(&heap, dir.path());
    set_env(&mut env, "RELAY_HEAP__EVENTS_PER_MINUTE", "1000000");
    let relay = RelayProcess::spawn(&env);
    let bodies: Arc<Vec<Value>> = Arc::new((0..WARM_UP + BACKLOG).map(webhook).collect());

    // Warm up while Heap is healthy, so the first reading includes pools and caches.
    post_accepted(&relay, &bodies, 0..WARM_UP).await;
    heap.wait_for_events(WARM_UP, Duration::from_secs(10)).await;

    // Heap goes down; a backlog arrives and is accepted into the queue.
    let outage_started = Instant::now();
    down.store(true, Ordering::SeqCst);
    let rss_before = relay.rss_kib();
    post_accepted(&relay, &bodies, WARM_UP..WARM_UP + BACKLOG).await;
    let rss_backlog = relay.rss_kib();
    let (_, status) = relay.admin(reqwest::Method::GET, "/admin/status").await;
    let queued = status["queue"]["pending"].as_u64().unwrap()
        + status["queue"]["in_flight"].as_u64().unwrap();
    assert!(
        queued >= BACKLOG as u64,
        "only {queued} records queued: {status}"
    );

    // The relay keeps trying during the outage...
    eventually(Duration::from_secs(20), async || {
        (refused.lock().unwrap().len() >= 8).then_some(())
    })
    .await;
    down.store(false, Ordering::SeqCst);
    let outage = outage_started.elapsed();
    // ...but never faster than one request per initial backoff: each failed request makes the
    // whole forwarder wait at least `retry.initial_backoff_ms` before its next pass. (The
    // exponential growth to `retry.max_backoff_ms` keeps the real count well below that.)
    let requests = refused.lock().unwrap().len();
    let bound = outage.as_millis() / INITIAL_BACKOFF_MS + 2;
    assert!(
        requests as u128 <= bound,
        "{requests} requests in a {outage:?} outage (bound {bound})"
    );
    let rss_growth = rss_backlog.saturating_sub(rss_before);
    assert!(
        rss_growth < 50 * 1024,
        "RSS grew {rss_growth} KiB while {BACKLOG} webhooks waited for Heap"
    );

    // Heap is back: the whole backlog arrives, each event once.
    let recovered = Instant::now();
    let events = heap
        .wait_for_events(WARM_UP + BACKLOG, Duration::from_secs(60))
        .await;
    let drained_in = recovered.elapsed();
    assert_once_each(&events, WARM_UP + BACKLOG);
    assert_no_dead_letters(&relay).await;
    eprintln!(
        "503 outage: {outage:?} with {BACKLOG} webhooks queued; {requests} requests to heap during \
         it ({:.1}/s, bound {bound}); VmRSS {rss_before} KiB before the backlog, {rss_backlog} KiB \
         with it queued (+{rss_growth} KiB), {} KiB after the drain; drained in {drained_in:?}",
        requests as f64 / outage.as_secs_f64(),
        relay.rss_kib(),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heap_timeouts_are_retried_until_heap_answers_in_time() {
    const HUNG: usize = 3;
    let heap = FakeHeap::start().await;
    let arrived = Arc::new(AtomicUsize::new(0));
    let counter = arrived.clone();
    // Track requests only: property updates go in a task of their own, whose requests would
    // otherwise take some of the hung answers, still in flight when the events have arrived.
    heap.respond_with(move |path, _| {
        if path == "/api/track" && counter.fetch_add(1, Ordering::SeqCst) < HUNG {
            // Answers long after the relay gave up; recorded as not accepted.
            Answer {
                status: 504,
                retry_after: None,
                delay: Duration::from_millis(1500),
            }
        } else {
            Answer::OK
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let mut env = RelayProcess::env(&heap, dir.path());
    set_env(&mut env, "RELAY_HEAP__TIMEOUT_MS", "300");
    let relay = RelayProcess::spawn(&env);
    let bodies: Arc<Vec<Value>> = Arc::new((0..20).map(webhook).collect());
    post_accepted(&relay, &bodies, 0..20).await;

    // Every event arrives. (A send that timed out on a slow machine may repeat an event, under
    // the same key: at least once, effectively once.)
    eventually(Duration::from_secs(20), async || {
        let keys: BTreeSet<String> = heap
            .events()
            .iter()
            .map(|e| e["idempotency_key"].as_str().unwrap().to_owned())
            .collect();
        (keys.len() == 20).then_some(())
    })
    .await;
    assert_no_dead_letters(&relay).await;
    assert!(heap_requests_with_status(&relay, "timeout").await >= HUNG as f64);
    eprintln!(
        "timeouts: {HUNG} requests hung past heap.timeout_ms = 300; {} track requests in all; 20 \
         events delivered once each",
        arrived.load(Ordering::SeqCst)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_with_retry_after_is_waited_out_before_the_next_request() {
    const THROTTLED: usize = 2;
    let heap = FakeHeap::start().await;
    let arrivals: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let log = arrivals.clone();
    // Track requests only: property updates go in a task of their own, with their own backoff.
    heap.respond_with(move |path, _| {
        if path != "/api/track" {
            return Answer::OK;
        }
        let mut log = log.lock().unwrap();
        log.push(Instant::now());
        if log.len() <= THROTTLED {
            Answer {
                status: 429,
                retry_after: Some(1),
                delay: Duration::ZERO,
            }
        } else {
            Answer::OK
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let mut env = RelayProcess::env(&heap, dir.path());
    // Retry-After is honoured up to retry.max_backoff_ms; make room for Heap's one second.
    set_env(&mut env, "RELAY_RETRY__MAX_BACKOFF_MS", "1000");
    let relay = RelayProcess::spawn(&env);
    let bodies: Arc<Vec<Value>> = Arc::new((0..10).map(webhook).collect());
    post_accepted(&relay, &bodies, 0..10).await;

    let events = heap.wait_for_events(10, Duration::from_secs(20)).await;
    assert_once_each(&events, 10);
    assert_no_dead_letters(&relay).await;
    let arrivals = arrivals.lock().unwrap().clone();
    let gaps: Vec<Duration> = arrivals
        .windows(2)
        .take(THROTTLED)
        .map(|pair| pair[1] - pair[0])
        .collect();
    assert_eq!(gaps.len(), THROTTLED);
    for gap in &gaps {
        assert!(
            *gap >= Duration::from_secs(1),
            "retried {gap:?} after a 429 with Retry-After: 1"
        );
    }
    eprintln!(
        "429: gaps after each 429 {gaps:?}; {} track requests in all",
        arrivals.len()
    );
}
