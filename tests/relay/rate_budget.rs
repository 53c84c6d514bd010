//! Heap's per-app rate limit holds across restarts (contract §3): the relay binary is killed
//! with `kill -9` and restarted several times within one rate window, over a backlog far larger
//! than the budget, and in no sliding minute does the fake Heap receive more track events than
//! `heap.events_per_minute` plus one batch. (A restart used to start with a fresh budget, so
//! each one added a batch at once.) The same holds on Postgres when the leader — the replica
//! that forwards — is killed again and again and another replica takes over.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::postgres::Schema;
use crate::support::{
    Client, FakeHeap, Posted, Received, RelayProcess, eventually, post_concurrently, set_env,
};
use serde_json::Value;
use tokio::sync::Notify;

/// A low budget so the test runs in seconds: 10 events a second after a batch at once.
const PER_MINUTE: usize = 600;
const BATCH: usize = 100;
/// Far more than the relays may send while the test runs.
const BACKLOG: usize = 2_000;
/// Kills after the first relay's, each after [`LIFETIME`].
const RESTARTS: usize = 7;
const LIFETIME: Duration = Duration::from_millis(1_500);
const WINDOW: Duration = Duration::from_secs(60);

fn webhook(seq: usize) -> Value {
    crate::support::flow_started("budget", seq)
}

/// Track events in each request Heap received, with when it was received.
fn track_arrivals(requests: &[Received]) -> Vec<(Instant, usize)> {
    let mut arrivals: Vec<(Instant, usize)> = requests
        .iter()
        .filter(|r| r.path == "/api/track")
        .map(|r| (r.at, r.body["events"].as_array().map_or(0, Vec::len)))
        .collect();
    arrivals.sort_by_key(|(at, _)| *at);
    arrivals
}

/// The most events received within any `window` (starting at some request).
fn busiest_window(arrivals: &[(Instant, usize)], window: Duration) -> usize {
    let mut busiest = 0;
    for (start, (from, _)) in arrivals.iter().enumerate() {
        let in_window: usize = arrivals[start..]
            .iter()
            .take_while(|(at, _)| at.duration_since(*from) < window)
            .map(|(_, events)| events)
            .sum();
        busiest = busiest.max(in_window);
    }
    busiest
}

fn total(arrivals: &[(Instant, usize)]) -> usize {
    arrivals.iter().map(|(_, events)| events).sum()
}

/// The test relay's environment with the low budget.
fn budget_env(heap: &FakeHeap, dir: &std::path::Path) -> Vec<(String, String)> {
    let mut env = RelayProcess::env(heap, dir);
    set_env(
        &mut env,
        "RELAY_HEAP__EVENTS_PER_MINUTE",
        &PER_MINUTE.to_string(),
    );
    set_env(&mut env, "RELAY_HEAP__BATCH_MAX_EVENTS", &BATCH.to_string());
    set_env(&mut env, "RELAY_HEAP__USER_PROPERTIES", "false");
    env
}

/// Posts the backlog to the relay at `url`; all of it must be accepted.
async fn post_backlog(client: &Client) {
    let bodies: Arc<Vec<Value>> = Arc::new((0..BACKLOG).map(webhook).collect());
    let posted = post_concurrently(
        client,
        &bodies,
        (0..BACKLOG).collect(),
        8,
        BACKLOG,
        Arc::new(Notify::new()),
    )
    .await;
    let accepted = posted
        .iter()
        .filter(|(_, outcome)| matches!(outcome, Posted::Answered(202, _)))
        .count();
    assert_eq!(accepted, BACKLOG, "the backlog was not all accepted");
}

/// After the restarts: waits for the forwarder to send a full batch more than had arrived
/// (it does once the minute's budget is paid back), watches two seconds more, and checks the
/// busiest minute at Heap.
async fn assert_busiest_minute_within_budget(heap: &FakeHeap, first_delivery: Instant, what: &str) {
    let before = total(&track_arrivals(&heap.requests()));
    heap.wait_for_events(before + BATCH, Duration::from_secs(75))
        .await;
    let resumed_after = first_delivery.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await; // observing the rate, not waiting for work
    let arrivals = track_arrivals(&heap.requests());
    let busiest = busiest_window(&arrivals, WINDOW);
    let observed = arrivals.last().unwrap().0.duration_since(first_delivery);
    eprintln!(
        "rate budget across {what}: {} track events in {observed:?} (before the last forwarder \
         resumed: {before}, resumed after {resumed_after:?}); busiest {WINDOW:?} window: \
         {busiest} events (limit {PER_MINUTE} + batch {BATCH})",
        total(&arrivals),
    );
    assert!(
        busiest <= PER_MINUTE + BATCH,
        "Heap received {busiest} events within {WINDOW:?} (limit {PER_MINUTE} + one batch {BATCH})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restarts_within_a_minute_keep_heaps_budget_within_one_minute_plus_one_batch() {
    let heap = FakeHeap::start().await;
    let dir = tempfile::tempdir().unwrap();
    let env = budget_env(&heap, dir.path());

    // The backlog goes in through the first relay, which forwards meanwhile.
    let mut relay = RelayProcess::spawn(&env);
    post_backlog(&relay).await;
    heap.wait_for_events(1, Duration::from_secs(20)).await;
    let first_delivery = track_arrivals(&heap.requests())[0].0;

    for _ in 0..RESTARTS {
        relay.kill();
        relay = RelayProcess::spawn(&env);
        tokio::time::sleep(LIFETIME).await; // the relay's lifetime, not a wait for work
    }
    let restarts_took = first_delivery.elapsed();
    assert!(
        restarts_took < WINDOW,
        "the restarts took {restarts_took:?}: not within one rate window"
    );
    let what = format!("{RESTARTS} kill -9 restarts in {restarts_took:?}");
    assert_busiest_minute_within_budget(&heap, first_delivery, &what).await;
    relay.kill();
}

/// Whether a replica has taken the lead (it logs so when it does; in this test a replica
/// only loses the lead by being killed).
fn leads(relay: &RelayProcess) -> bool {
    relay
        .logs()
        .iter()
        .any(|line| line.contains("this replica now forwards"))
}

#[cfg_attr(not(postgres_tests), ignore = "needs RELAY_TEST_POSTGRES_URL")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_leader_changes_within_a_minute_keep_heaps_budget_within_a_minute_plus_a_batch() {
    let schema = Schema::fresh().await;
    let heap = FakeHeap::start().await;
    let app_id = format!("app-{}", uuid::Uuid::new_v4().simple());
    let dirs: Vec<tempfile::TempDir> = (0..RESTARTS + 2)
        .map(|_| tempfile::tempdir().unwrap())
        .collect();
    let env = |dir: &tempfile::TempDir| {
        let mut env = budget_env(&heap, dir.path());
        set_env(&mut env, "RELAY_QUEUE__BACKEND", "postgres");
        set_env(&mut env, "RELAY_QUEUE__POSTGRES_URL", &schema.url);
        // The lock key comes from the app id: unique per test, so tests do not contend.
        set_env(&mut env, "RELAY_HEAP__APP_ID", &app_id);
        env
    };
    let mut replicas = vec![
        RelayProcess::spawn(&env(&dirs[0])),
        RelayProcess::spawn(&env(&dirs[1])),
    ];
    post_backlog(&replicas[0]).await;
    heap.wait_for_events(1, Duration::from_secs(20)).await;
    let first_delivery = track_arrivals(&heap.requests())[0].0;

    // Kill the leader; a new replica joins, so two are always alive; the survivor takes over.
    for round in 0..RESTARTS {
        let leader = eventually(Duration::from_secs(10), async || {
            replicas.iter().position(leads)
        })
        .await;
        replicas.remove(leader).kill();
        replicas.push(RelayProcess::spawn(&env(&dirs[round + 2])));
        eventually(Duration::from_secs(10), async || {
            replicas.iter().position(leads)
        })
        .await;
    }
    let changes_took = first_delivery.elapsed();
    assert!(
        changes_took < WINDOW,
        "the leader changes took {changes_took:?}: not within one rate window"
    );
    let what = format!("{RESTARTS} Postgres leader changes (kill -9) in {changes_took:?}");
    assert_busiest_minute_within_budget(&heap, first_delivery, &what).await;
    drop(replicas);
    schema.drop().await;
}
