//! Lanes (contract §9, Isolation): each Heap app id is forwarded in its own lane, with its own
//! rate-limit budget, batches, backoff and pause. Two sources deliver to two app ids of one fake
//! Heap; app id A is in trouble — an outage (503, each answer held), a 429 storm with a long
//! `Retry-After`, or a 400 for every event — while B's deliveries are timed from the webhook's
//! 202 to the fake Heap's receipt. B must stay within the linger plus a margin far below what
//! A's trouble would cost it if the lanes were one, and A's events must arrive (or become A's
//! dead letters) once that is over. Each lane's budget is its own; pausing one app id holds
//! only its lane.
//!
//! The measured latencies are printed (`cargo test --test relay lanes:: -- --nocapture`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};
use tokio::sync::Notify;

use crate::support::{
    Answer, Client, FakeHeap, Posted, Relay, eventually, flow_started, post_concurrently,
};

const WAIT: Duration = Duration::from_secs(10);

const A: &str = "app-a";
const A_SECRET: &str = "lane-a-secret-0001";
const B: &str = "app-b";
const B_SECRET: &str = "lane-b-secret-0001";

/// `heap.batch_linger_ms` of the test base.
const LINGER: Duration = Duration::from_millis(10);
/// What B's delivery may take beyond the linger on a loaded two-core test machine. Each kind of
/// trouble at A holds A's lane at least twice as long as this (a held answer, a Retry-After),
/// so B waiting behind A fails the test.
const MARGIN: Duration = Duration::from_millis(750);

/// B's webhooks during A's trouble, one every [`SPACING`].
const PROBES: usize = 20;
const SPACING: Duration = Duration::from_millis(100);

/// Sources `a` (app id [`A`]) and `b` (app id [`B`]) over the test base; `heap` is more of the
/// `[heap]` table. Property updates are off: one webhook, one record, one track event.
fn two_lanes(heap: &str) -> String {
    format!(
        r#"
[heap]
user_properties = false
{heap}
[sources.a]
secrets = ["{A_SECRET}"]
app_id = "{A}"
[sources.b]
secrets = ["{B_SECRET}"]
app_id = "{B}"
"#
    )
}

fn lane_a(relay: &Relay) -> Client {
    relay.source("a", A_SECRET)
}

fn lane_b(relay: &Relay) -> Client {
    relay.source("b", B_SECRET)
}

fn seq_of(event: &Value) -> u64 {
    event["properties"]["seq"].as_u64().unwrap()
}

async fn post_accepted(client: &Client, body: &Value) {
    let (status, answer) = client.post(body).await;
    assert_eq!(status, 202, "{}: {answer}", client.webhook_path);
    assert_eq!(answer["status"], "accepted", "{}", client.webhook_path);
}

/// Posts [`PROBES`] webhooks to source `b`, spaced, and returns how long each took from its 202
/// to the fake Heap's receipt of its event.
async fn time_lane_b(relay: &Relay, heap: &FakeHeap) -> Vec<Duration> {
    let probe = |seq| flow_started("lane-b", seq);
    time_probes(&lane_b(relay), heap, B, 1000..1000 + PROBES, probe).await
}

/// Posts `probe(seq)` for each of `seqs` through `client`, spaced, and returns how long each
/// took from its 202 to the fake Heap's receipt of its event for `app_id`.
async fn time_probes(
    client: &Client,
    heap: &FakeHeap,
    app_id: &str,
    seqs: std::ops::Range<usize>,
    probe: impl Fn(usize) -> Value,
) -> Vec<Duration> {
    let mut answered = BTreeMap::new();
    for seq in seqs {
        post_accepted(client, &probe(seq)).await;
        answered.insert(seq as u64, Instant::now());
        tokio::time::sleep(SPACING).await; // spacing the probes, not waiting for work
    }
    let received: BTreeMap<u64, Instant> = eventually(WAIT, async || {
        let received: BTreeMap<u64, Instant> = heap
            .events_received_for(app_id)
            .into_iter()
            .map(|(at, event)| (seq_of(&event), at))
            .filter(|(seq, _)| answered.contains_key(seq))
            .collect();
        if received.len() == answered.len() {
            Ok(received)
        } else {
            Err(format!(
                "{} of {} probes at Heap for {app_id}",
                received.len(),
                answered.len()
            ))
        }
    })
    .await;
    answered
        .iter()
        .map(|(seq, at)| received[seq].saturating_duration_since(*at))
        .collect()
}

/// Prints B's latencies and checks the slowest against the linger plus [`MARGIN`].
fn assert_b_within_linger(what: &str, mut latencies: Vec<Duration>) {
    latencies.sort();
    let p50 = latencies[latencies.len() / 2];
    let max = *latencies.last().unwrap();
    eprintln!(
        "lane {B} while {A} {what}: {} deliveries, 202 -> Heap p50 {p50:?}, max {max:?} \
         (linger {LINGER:?}, allowed {:?})",
        latencies.len(),
        LINGER + MARGIN
    );
    assert!(
        max <= LINGER + MARGIN,
        "B's delivery took {max:?} while {A} {what} (p50 {p50:?}): the lanes are not isolated"
    );
}

/// Responds `trouble` to every request for app id A while `down` is set, 200 otherwise.
fn a_in_trouble(heap: &FakeHeap, trouble: Answer) -> Arc<AtomicBool> {
    let down = Arc::new(AtomicBool::new(true));
    let is_down = down.clone();
    heap.respond_with(move |_, body| {
        if body["app_id"] == A && is_down.load(Ordering::SeqCst) {
            trouble
        } else {
            Answer::OK
        }
    });
    down
}

/// A's webhooks before its trouble is over: they must all arrive once it is.
const A_WEBHOOKS: usize = 5;

/// The scenario of the outage and 429 tests: A's webhooks are accepted while A's Heap refuses
/// them; once A has refused a request, B is timed; then A recovers and everything of A's
/// arrives, once each.
async fn b_keeps_delivering_while_a_refuses(what: &str, trouble: Answer) {
    let heap = FakeHeap::start().await;
    let down = a_in_trouble(&heap, trouble);
    let relay = Relay::start(&heap, &two_lanes("")).await;
    for seq in 0..A_WEBHOOKS {
        post_accepted(&lane_a(&relay), &flow_started("lane-a", seq)).await;
    }
    eventually(WAIT, async || {
        heap.requests_for(A)
            .iter()
            .any(|r| r.status == trouble.status)
    })
    .await;

    let latencies = time_lane_b(&relay, &heap).await;
    assert!(
        heap.events_for(A).is_empty(),
        "A's Heap accepted events during its trouble"
    );
    down.store(false, Ordering::SeqCst);
    let recovered = Instant::now();
    let events = heap.wait_for_events_for(A, A_WEBHOOKS, WAIT).await;
    eprintln!(
        "lane {A} delivered its {A_WEBHOOKS} events {:?} after it recovered from {what}",
        recovered.elapsed()
    );
    let seqs: BTreeSet<u64> = events.iter().map(seq_of).collect();
    assert_eq!(seqs, (0..A_WEBHOOKS as u64).collect(), "{events:?}");
    assert_eq!(
        events.len(),
        A_WEBHOOKS,
        "an event of A's was accepted twice"
    );
    relay.stop().await;
    assert_b_within_linger(what, latencies);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_outage_at_one_app_id_does_not_delay_another_app_ids_deliveries() {
    // Every 503 is held 1.5 s: A's lane spends the outage waiting on Heap.
    let trouble = Answer {
        delay: Duration::from_millis(1500),
        ..Answer::status(503)
    };
    b_keeps_delivering_while_a_refuses("answers 503 (each held 1.5 s)", trouble).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_429_storm_at_one_app_id_does_not_delay_another_app_ids_deliveries() {
    // The relay honours Retry-After: A's lane waits 3 s after each 429.
    let trouble = Answer {
        retry_after: Some(3),
        ..Answer::status(429)
    };
    b_keeps_delivering_while_a_refuses("answers 429 with Retry-After: 3", trouble).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_400_for_every_event_at_one_app_id_dead_letters_there_only_and_does_not_delay_another() {
    const REFUSED: usize = 2;
    let heap = FakeHeap::start().await;
    // Held 1 s each: isolating two refused records takes A's lane two or three requests.
    let _always = a_in_trouble(
        &heap,
        Answer {
            delay: Duration::from_secs(1),
            ..Answer::status(400)
        },
    );
    let relay = Relay::start(&heap, &two_lanes("")).await;
    for seq in 0..REFUSED {
        post_accepted(&lane_a(&relay), &flow_started("lane-a", seq)).await;
    }
    let latencies = time_lane_b(&relay, &heap).await;

    let letters = eventually(WAIT, async || {
        let (_, listing) = relay.admin(Method::GET, "/admin/dead-letters").await;
        let letters = listing["dead_letters"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if letters.len() >= REFUSED {
            Ok(letters)
        } else {
            Err(format!("dead letters: {listing}"))
        }
    })
    .await;
    assert_eq!(letters.len(), REFUSED, "{letters:?}");
    for letter in &letters {
        assert_eq!(
            (&letter["app_id"], &letter["source"], &letter["reason"]),
            (&json!(A), &json!("a"), &json!("rejected")),
            "{letter}"
        );
    }
    let (_, of_b) = relay
        .admin(Method::GET, "/admin/dead-letters?source=b")
        .await;
    assert_eq!(of_b["dead_letters"], json!([]), "{of_b}");
    assert!(heap.events_for(A).is_empty());
    assert_eq!(heap.events_for(B).len(), PROBES, "B's events, once each");
    relay.stop().await;
    assert_b_within_linger("answers 400 to every event (each held 1 s)", latencies);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_app_id_keeps_its_own_rate_budget() {
    // 60 a minute: a lane may send a burst of 60 at once, then one a second.
    const PER_MINUTE: usize = 60;
    const BURST: usize = 100;
    let heap = FakeHeap::start().await;
    let relay = Relay::start(
        &heap,
        &two_lanes(&format!("events_per_minute = {PER_MINUTE}")),
    )
    .await;
    // Both lanes' backlogs are queued while everything is paused, so both start at once.
    let (status, _) = relay.admin(Method::POST, "/admin/forwarder/pause").await;
    assert_eq!(status, 200);
    let never = Arc::new(Notify::new());
    for (client, name) in [(lane_a(&relay), "burst-a"), (lane_b(&relay), "burst-b")] {
        let bodies: Arc<Vec<Value>> =
            Arc::new((0..BURST).map(|seq| flow_started(name, seq)).collect());
        let posted = post_concurrently(
            &client,
            &bodies,
            (0..BURST).collect(),
            4,
            usize::MAX,
            never.clone(),
        )
        .await;
        assert!(
            posted
                .iter()
                .all(|(_, outcome)| matches!(outcome, Posted::Answered(202, _))),
            "{name}: {posted:?}"
        );
    }
    assert!(heap.requests().is_empty(), "sent while paused");
    let (status, _) = relay.admin(Method::POST, "/admin/forwarder/resume").await;
    assert_eq!(status, 200);

    // Each lane sends its own burst...
    eventually(WAIT, async || {
        let counts = (heap.events_for(A).len(), heap.events_for(B).len());
        if counts.0 >= PER_MINUTE && counts.1 >= PER_MINUTE {
            Ok(())
        } else {
            Err(format!("events at (A, B): {counts:?}"))
        }
    })
    .await;
    // ...and, watched for a second more, no more than its own budget in its first second.
    tokio::time::sleep(Duration::from_secs(1)).await; // observing the rate, not waiting for work
    let first_second = |app_id: &str| {
        let arrivals = heap.events_received_for(app_id);
        let start = arrivals.iter().map(|(at, _)| *at).min().unwrap();
        arrivals
            .iter()
            .filter(|(at, _)| at.duration_since(start) < Duration::from_secs(1))
            .count()
    };
    let (a, b) = (first_second(A), first_second(B));
    eprintln!(
        "rate budgets of {PER_MINUTE}/min: first second at {A}: {a}, at {B}: {b}; totals so far \
         {} and {}",
        heap.events_for(A).len(),
        heap.events_for(B).len()
    );
    // Within its own budget: the burst, plus the one event a second that comes back.
    for (app_id, count) in [(A, a), (B, b)] {
        assert!(
            count <= PER_MINUTE + 1,
            "{app_id} got {count} events in its first second (budget {PER_MINUTE}/min)"
        );
    }
    assert!(
        a + b > PER_MINUTE + 1,
        "together {} events in the first second: the lanes share one budget",
        a + b
    );
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pausing_one_app_id_holds_only_its_lane_and_resuming_releases_it() {
    let heap = FakeHeap::start().await;
    let relay = Relay::start(&heap, &two_lanes("")).await;
    let (status, _) = relay
        .admin(Method::POST, &format!("/admin/forwarder/pause?app_id={A}"))
        .await;
    assert_eq!(status, 200);
    for seq in 0..3 {
        post_accepted(&lane_a(&relay), &flow_started("paused-a", seq)).await;
    }
    for seq in 0..3 {
        post_accepted(&lane_b(&relay), &flow_started("running-b", seq)).await;
    }
    // B's webhooks, posted after A's, arrive; A's do not.
    heap.wait_for_events_for(B, 3, WAIT).await;
    let status = relay
        .wait_for_status(WAIT, |s| s["lanes"][A]["queue"]["pending"] == 3)
        .await;
    assert_eq!(status["lanes"][A]["forwarder"], "paused", "{status}");
    assert_eq!(status["lanes"][B]["forwarder"], "running", "{status}");
    assert!(heap.requests_for(A).is_empty(), "A sent while paused");

    let (status, _) = relay
        .admin(Method::POST, &format!("/admin/forwarder/resume?app_id={A}"))
        .await;
    assert_eq!(status, 200);
    let events = heap.wait_for_events_for(A, 3, WAIT).await;
    let seqs: BTreeSet<u64> = events.iter().map(seq_of).collect();
    assert_eq!(seqs, (0..3).collect());
    let status = relay
        .wait_for_status(WAIT, |s| s["lanes"][A]["forwarder"] == "running")
        .await;
    assert_eq!(status["lanes"][B]["forwarder"], "running", "{status}");
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pausing_or_resuming_an_unknown_app_id_is_404_and_pauses_nothing() {
    let heap = FakeHeap::start().await;
    let relay = Relay::start(&heap, &two_lanes("")).await;
    for verb in ["pause", "resume"] {
        let (status, answer) = relay
            .admin(
                Method::POST,
                &format!("/admin/forwarder/{verb}?app_id=no-such-app"),
            )
            .await;
        assert_eq!(
            (status, answer),
            (404, json!({"error": "unknown_app_id"})),
            "{verb}"
        );
    }
    post_accepted(&lane_a(&relay), &flow_started("after-404", 0)).await;
    post_accepted(&lane_b(&relay), &flow_started("after-404", 1)).await;
    heap.wait_for_events_for(A, 1, WAIT).await;
    heap.wait_for_events_for(B, 1, WAIT).await;
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_outage_of_the_property_endpoint_does_not_delay_track_events() {
    // A lane forwards track events and property updates in tasks of their own: while Heap's
    // `add_user_properties` answers 503 (each held 1.5 s) and the property task backs off
    // 5 s between attempts, track events still arrive within the linger.
    let heap = FakeHeap::start().await;
    let down = Arc::new(AtomicBool::new(true));
    heap.respond_with({
        let down = down.clone();
        move |path, _| {
            if path == "/api/add_user_properties" && down.load(Ordering::SeqCst) {
                Answer {
                    delay: Duration::from_millis(1500),
                    ..Answer::status(503)
                }
            } else {
                Answer::OK
            }
        }
    });
    let relay = Relay::start(
        &heap,
        "[retry]\ninitial_backoff_ms = 5000\nmax_backoff_ms = 5000\n",
    )
    .await;
    let client = &relay.client;
    let with_email = |seq: usize| {
        let mut body = flow_started("props", seq);
        body["data"]["user"]["email"] = json!(format!("props-{seq}@example.com"));
        body
    };
    post_accepted(client, &with_email(0)).await;
    eventually(WAIT, async || {
        heap.requests()
            .iter()
            .any(|r| r.path == "/api/add_user_properties" && r.status == 503)
    })
    .await;
    // The lane shows the property task's backoff (and the deadline fails the test otherwise).
    relay
        .wait_for_status(WAIT, |status| status["forwarder"] == "backing_off")
        .await;

    let app_id = crate::support::APP_ID;
    let latencies = time_probes(client, &heap, app_id, 1..PROBES + 1, with_email).await;
    // Once the endpoint is back, every webhook's properties arrive too.
    down.store(false, Ordering::SeqCst);
    let users = heap
        .wait_for_accepted("/api/add_user_properties", "users", PROBES + 1, WAIT)
        .await;
    assert_eq!(users.len(), PROBES + 1);
    relay.stop().await;
    let max = latencies.iter().max().copied().unwrap();
    eprintln!("track events while add_user_properties is down: max 202 -> Heap {max:?}");
    assert!(
        max <= LINGER + MARGIN,
        "a track event took {max:?} while the property endpoint was down: the kinds are not isolated"
    );
}
