//! Several relay processes on one Postgres queue (the real binary, configured by environment):
//! webhooks spread over two replicas all reach Heap even when one replica is killed mid-stream,
//! while the two together stay within Heap's app rate limit (one forwarder at a time); and a
//! Postgres outage under load answers 503 (webhooks and `/readyz`) without losing any 202'd
//! event, and recovers without restarting the relay. Skipped, saying so, without
//! `RELAY_TEST_POSTGRES_URL`.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::postgres::{Database, Schema};
use crate::support::{Answer, Client, FakeHeap, RelayProcess, eventually};
use futures_util::StreamExt;
use serde_json::Value;

/// Rate limit and batch size of the replicas under test: 50 events a second, bursts of 25.
const EVENTS_PER_MINUTE: u32 = 3000;
const BATCH: usize = 25;

/// The environment of a replica on the Postgres queue at `url`, serving `app_id`.
fn replica_env(
    heap: &FakeHeap,
    dir: &std::path::Path,
    url: &str,
    app_id: &str,
) -> Vec<(String, String)> {
    let mut env = RelayProcess::env(heap, dir);
    env.retain(|(key, _)| key != "RELAY_HEAP__APP_ID");
    env.extend(
        [
            ("RELAY_QUEUE__BACKEND", "postgres".to_owned()),
            ("RELAY_QUEUE__POSTGRES_URL", url.to_owned()),
            // The lock key comes from the app id: unique per test, so tests do not contend.
            ("RELAY_HEAP__APP_ID", app_id.to_owned()),
            (
                "RELAY_HEAP__EVENTS_PER_MINUTE",
                EVENTS_PER_MINUTE.to_string(),
            ),
            ("RELAY_HEAP__BATCH_MAX_EVENTS", BATCH.to_string()),
            ("RELAY_HEAP__USER_PROPERTIES", "false".to_owned()),
            ("RELAY_HEAP__TIMEOUT_MS", "2000".to_owned()),
        ]
        .map(|(k, v)| (k.to_owned(), v)),
    );
    env
}

fn unique_app() -> String {
    format!("app-{}", uuid::Uuid::new_v4().simple())
}

/// A webhook with one track event for identity `user`.
/// A webhook about `user`, timestamped now.
fn body_for(user: &str) -> Value {
    let now = chrono::Utc::now().timestamp();
    let mut samples = userpilot_heap_relay::samples::all(user, now, user);
    samples.swap_remove(0).1
}

/// Posts a signed webhook about `user`; the answer, or `None` when the relay could not be
/// reached.
async fn post(relay: &Client, user: &str) -> Option<(u16, Value)> {
    relay.try_post(&body_for(user)).await.ok()
}

/// Posts webhooks for `users` to `relays` in turn, a few at a time; returns the users whose
/// webhook was answered 202 with one event, and every status seen.
async fn post_all(relays: &[Client], users: Vec<String>) -> (Vec<String>, Vec<u16>) {
    let results: Vec<(String, Option<(u16, Value)>)> =
        futures_util::stream::iter(users.into_iter().enumerate().map(|(i, user)| {
            let relay = relays[i % relays.len()].clone();
            async move {
                let result = post(&relay, &user).await;
                (user, result)
            }
        }))
        .buffer_unordered(8)
        .collect()
        .await;
    let mut accepted = Vec::new();
    let mut statuses = Vec::new();
    for (user, result) in results {
        if let Some((status, answer)) = result {
            statuses.push(status);
            if status == 202 {
                assert_eq!(answer["events"], 1, "{user}: {answer}");
                accepted.push(user);
            }
        }
    }
    (accepted, statuses)
}

/// Identities of the track events Heap accepted, with how often each arrived.
fn delivered(heap: &FakeHeap) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for event in heap.events() {
        *counts
            .entry(event["identity"].as_str().unwrap().to_owned())
            .or_insert(0) += 1;
    }
    counts
}

fn is_leader(relay: &RelayProcess) -> bool {
    relay
        .logs()
        .iter()
        .any(|line| line.contains("this replica now forwards"))
}

/// Asserts that in every span between two track requests Heap received no more events than
/// the rate allows over that span, plus `allowance` (bursts).
fn assert_within_rate(heap: &FakeHeap, per_second: f64, allowance: usize) {
    let requests: Vec<(Instant, usize)> = heap
        .requests()
        .into_iter()
        .filter(|r| r.path == "/api/track" && (200..300).contains(&r.status))
        .map(|r| (r.at, r.body["events"].as_array().map_or(0, Vec::len)))
        .collect();
    for i in 0..requests.len() {
        let mut events = 0;
        for j in i..requests.len() {
            events += requests[j].1;
            let span = requests[j].0.saturating_duration_since(requests[i].0);
            let allowed = per_second * span.as_secs_f64() + allowance as f64;
            assert!(
                events as f64 <= allowed,
                "{events} events in {span:?} (requests {i}..={j}); at most {allowed:.0} allowed"
            );
        }
    }
}

#[cfg_attr(not(postgres_tests), ignore = "needs RELAY_TEST_POSTGRES_URL")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_deliver_every_accepted_event_within_the_rate_when_one_is_killed() {
    let schema = Schema::fresh().await;
    let heap = FakeHeap::start().await;
    let app = unique_app();
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let mut replicas: Vec<RelayProcess> = dirs
        .iter()
        .map(|dir| RelayProcess::spawn(&replica_env(&heap, dir.path(), &schema.url, &app)))
        .collect();
    let clients: Vec<Client> = replicas.iter().map(|r| r.client.clone()).collect();

    // Heap refuses at first, so a backlog builds up: 300 webhooks over both replicas.
    heap.respond_with(|_, _| Answer::status(503));
    let users: Vec<String> = (0..400).map(|i| format!("u{i:03}")).collect();
    let (mut accepted, statuses) = post_all(&clients, users[..300].to_vec()).await;
    assert_eq!(accepted.len(), 300, "statuses: {statuses:?}");

    // Heap is back: a few seconds of draining with both replicas alive.
    heap.respond_with(|_, _| Answer::OK);
    heap.wait_for_events(250, Duration::from_secs(30)).await;

    // Kill the replica that forwards in the middle of a request: Heap holds it, then refuses
    // it, so its batch stays leased to a dead replica. The other replica takes over.
    let leader = eventually(Duration::from_secs(10), async || {
        replicas.iter().position(is_leader)
    })
    .await;
    assert!(
        !is_leader(&replicas[1 - leader]),
        "both replicas claim to forward"
    );
    let in_flight = Arc::new(AtomicBool::new(false));
    let arrived = in_flight.clone();
    heap.respond_with(move |_, _| {
        arrived.store(true, Ordering::SeqCst);
        Answer {
            delay: Duration::from_secs(3),
            ..Answer::status(503)
        }
    });
    eventually(Duration::from_secs(10), async || {
        in_flight.load(Ordering::SeqCst).then_some(())
    })
    .await;
    heap.respond_with(|_, _| Answer::OK);
    replicas[leader].kill();
    let survivor = &replicas[1 - leader];
    let (more, statuses) = post_all(
        std::slice::from_ref(&survivor.client),
        users[300..].to_vec(),
    )
    .await;
    assert_eq!(more.len(), 100, "statuses: {statuses:?}");
    accepted.extend(more);

    // Every accepted event arrives — the dead replica's leased batch too, long before its
    // lease (a minute) ends: the new leader frees the leases of replicas that are gone.
    let heap_view = heap.clone();
    let expected: HashSet<String> = accepted.iter().cloned().collect();
    eventually(Duration::from_secs(30), async move || {
        let seen = delivered(&heap_view);
        expected
            .iter()
            .all(|user| seen.contains_key(user))
            .then_some(())
    })
    .await;
    assert!(is_leader(survivor), "the survivor took over");
    let seen = delivered(&heap);
    let resent: usize = seen.values().map(|n| n - 1).sum();
    assert!(
        resent <= BATCH,
        "only the killed leader's batch in flight may arrive twice; {resent} did"
    );

    // One forwarder at a time: the pair stays within the app's rate, give or take the
    // starting leader's burst, the successor's fresh burst and a batch in flight.
    assert_within_rate(&heap, f64::from(EVENTS_PER_MINUTE) / 60.0, 3 * BATCH);
    drop(replicas);
    schema.drop().await;
}

#[cfg_attr(not(postgres_tests), ignore = "needs RELAY_TEST_POSTGRES_URL")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_outage_answers_503_loses_no_accepted_event_and_recovers_by_itself() {
    let database = Database::fresh().await;
    let heap = FakeHeap::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut relay = RelayProcess::spawn(&replica_env(
        &heap,
        dir.path(),
        &database.url,
        &unique_app(),
    ));
    let ready = async |relay: &Client| relay.get("/readyz").await.0;
    assert_eq!(ready(&relay).await, 200);

    // Load throughout: a webhook every 20 ms, remembering what was answered.
    let answers: Arc<Mutex<Vec<(String, u16)>>> = Arc::default();
    let stop = tokio_util::sync::CancellationToken::new();
    let load = {
        let (answers, stop, client) = (answers.clone(), stop.clone(), relay.client.clone());
        tokio::spawn(async move {
            for i in 0..2000 {
                if stop.is_cancelled() {
                    break;
                }
                let user = format!("o{i:04}");
                if let Some((status, _)) = post(&client, &user).await {
                    answers.lock().unwrap().push((user, status));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let count = |status: u16| {
        let answers = answers.clone();
        move || {
            answers
                .lock()
                .unwrap()
                .iter()
                .filter(|(_, s)| *s == status)
                .count()
        }
    };
    let accepted_so_far = count(202);
    eventually(Duration::from_secs(10), async || {
        (accepted_so_far() >= 10).then_some(())
    })
    .await;

    database.cut_off().await;
    let unavailable = count(503);
    eventually(Duration::from_secs(10), async || {
        (unavailable() >= 10).then_some(())
    })
    .await;
    let started = Instant::now();
    let readiness = ready(&relay).await;
    assert_eq!(readiness, 503, "readyz while Postgres is away");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "readyz took {:?}",
        started.elapsed()
    );

    database.restore().await;
    let accepted_before = count(202)();
    let accepted_now = count(202);
    eventually(Duration::from_secs(15), async || {
        (accepted_now() >= accepted_before + 10).then_some(())
    })
    .await;
    stop.cancel();
    load.await.unwrap();
    // Readiness is cached briefly: it turns 200 again within a few seconds.
    eventually(Duration::from_secs(10), async || {
        match ready(&relay).await {
            200 => Ok(()),
            status => Err(format!("readyz still answers {status}")),
        }
    })
    .await;
    assert!(
        relay.child.try_wait().unwrap().is_none(),
        "the relay was not restarted"
    );

    let answers = answers.lock().unwrap().clone();
    let statuses: HashSet<u16> = answers.iter().map(|(_, s)| *s).collect();
    assert!(
        statuses.is_subset(&HashSet::from([202, 503])),
        "only 202 and 503 expected: {statuses:?}"
    );
    let accepted: HashSet<String> = answers
        .iter()
        .filter(|(_, s)| *s == 202)
        .map(|(user, _)| user.clone())
        .collect();
    let heap_view = heap.clone();
    eventually(Duration::from_secs(30), async move || {
        let seen = delivered(&heap_view);
        accepted
            .iter()
            .all(|user| seen.contains_key(user))
            .then_some(())
    })
    .await;
    let _ = relay.terminate(Duration::from_secs(10)).await;
    database.drop().await;
}
