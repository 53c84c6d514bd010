//! The delivery path step by step (contract §3, §7), driven through the library with a manual
//! clock and a fixed jitter: expiry, retry times stored in the queue (and surviving a reopen),
//! `Retry-After` and the 429 floor, isolation of refused records, property updates merged per
//! user, an erasure committing mid-pass keeping its records out of the pass's later requests —
//! and retention: pruning forgets delivered webhooks (which may then be accepted again)
//! but keeps pending work and dead letters until their own retention ends.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::support::{Answer, FakeHeap, RelayProcess, eventually, set_env};
use bytes::Bytes;
use serde_json::{Value, json};
use userpilot_heap_relay::clock::ManualClock;
use userpilot_heap_relay::config::AppId;
use userpilot_heap_relay::forwarder::limits::Limits;
use userpilot_heap_relay::forwarder::retry::{Backoff, THROTTLED_FLOOR};
use userpilot_heap_relay::forwarder::{Control, Forwarder, ForwarderConfig, Pass};
use userpilot_heap_relay::heap::client::HeapClient;
use userpilot_heap_relay::heap::mapping::{Mapper, MappingSettings};
use userpilot_heap_relay::heap::wire::RecordKind;
use userpilot_heap_relay::queue::sqlite::SqliteQueue;
use userpilot_heap_relay::queue::{DeadLetterFilter, Enqueued, NewWebhook, Queue};
use userpilot_heap_relay::translate;
use userpilot_heap_relay::userpilot::Verified;

/// 2026-01-01T00:00:00Z.
const T0: i64 = 1_767_225_600_000;
const MAX_AGE_MS: i64 = 3_600_000;

/// A flow-started webhook of user `u<seq>` (or of no user at all: quarantined).
fn body(seq: usize, with_user: bool) -> Bytes {
    let mut data = json!({ "type": "flow", "action": "started", "flow_id": "fl_1", "seq": seq });
    if with_user {
        data["user"] = json!({ "user_id": format!("u{seq}"), "plan": "pro" });
    }
    Bytes::from(serde_json::to_vec(&json!({ "timestamp": T0 / 1000, "data": data })).unwrap())
}

/// Maps and enqueues a webhook as the handler would, received at `at_ms`.
async fn enqueue(queue: &dyn Queue, mapper: &Mapper, body: Bytes, at_ms: i64) -> Enqueued {
    let verified = Verified::from_queue(body.clone());
    let received_at = chrono::DateTime::from_timestamp_millis(at_ms).unwrap();
    let content = translate::webhook(mapper, &verified, received_at).unwrap();
    queue
        .enqueue(NewWebhook {
            source: userpilot_heap_relay::queue::DEFAULT_SOURCE.to_owned(),
            app_id: crate::support::APP_ID.to_owned(),
            digest: verified.digest(),
            body,
            received_at_ms: at_ms,
            content,
            shape: None,
        })
        .await
        .unwrap()
}

/// Track events only (no user property records), identity = user id.
fn track_only() -> Mapper {
    Mapper::new("user_id", false, false, &MappingSettings::default())
}

/// A forwarder on its own queue file, a manual clock at [`T0`], a fixed jitter and a fake Heap.
struct Harness {
    heap: FakeHeap,
    queue: Arc<SqliteQueue>,
    clock: ManualClock,
    forwarder: Forwarder,
    mapper: Mapper,
    dir: tempfile::TempDir,
    /// Whether the forwarder is the one forwarding (as the Postgres leader would be).
    leading: Arc<AtomicBool>,
}

impl Harness {
    async fn start(jitter: f64) -> Self {
        let heap = FakeHeap::start().await;
        let dir = tempfile::tempdir().unwrap();
        let queue = Arc::new(SqliteQueue::open(&dir.path().join("queue.sqlite3")).unwrap());
        let clock = ManualClock::at_ms(T0);
        let app_id = AppId::try_from(crate::support::APP_ID.to_owned()).unwrap();
        let client = HeapClient::new(
            &heap.url().parse().unwrap(),
            &app_id,
            Duration::from_secs(5),
            Arc::new(clock.clone()),
        )
        .unwrap();
        let config = ForwarderConfig {
            linger: Duration::ZERO,
            backoff: Backoff {
                initial: Duration::from_secs(1),
                max: Duration::from_secs(60),
            },
            max_event_age: Duration::from_millis(MAX_AGE_MS as u64),
            lease: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(1),
        };
        let forwarder = Forwarder::new(
            queue.clone(),
            client,
            Arc::new(clock.clone()),
            Limits::new(
                NonZeroU32::new(15_000).unwrap(),
                NonZeroU32::new(1_000).unwrap(),
                NonZeroU32::new(1_000).unwrap(),
                Arc::new(clock.clone()),
            ),
            config,
            Arc::new(Control::default()),
        )
        .with_jitter(move || jitter);
        let leading = Arc::new(AtomicBool::new(true));
        let forwarder = forwarder.with_leadership({
            let leading = leading.clone();
            move || leading.load(Ordering::SeqCst)
        });
        Harness {
            heap,
            queue,
            clock,
            forwarder,
            mapper: track_only(),
            dir,
            leading,
        }
    }

    async fn enqueue(&self, seq: usize) {
        let at = self.now();
        let outcome = enqueue(self.queue.as_ref(), &self.mapper, body(seq, true), at).await;
        assert_eq!(outcome, Enqueued::Accepted { events: 1 });
    }

    fn now(&self) -> i64 {
        use userpilot_heap_relay::clock::Clock;
        self.clock.now_ms()
    }

    async fn step(&mut self) -> Pass {
        self.forwarder
            .forward_once(RecordKind::Track)
            .await
            .unwrap()
    }

    async fn next_due(&self) -> Option<i64> {
        self.queue
            .next_due_ms(crate::support::APP_ID, RecordKind::Track)
            .await
            .unwrap()
    }

    async fn dead(&self) -> Vec<userpilot_heap_relay::queue::DeadLetter> {
        self.queue
            .dead_letters(DeadLetterFilter::default())
            .await
            .unwrap()
    }
}

fn seqs(events: &[Value]) -> Vec<u64> {
    events
        .iter()
        .map(|e| e["properties"]["seq"].as_u64().unwrap())
        .collect()
}

#[tokio::test]
async fn an_event_older_than_max_event_age_is_dead_lettered_as_expired_without_being_sent() {
    let mut h = Harness::start(0.5).await;
    h.enqueue(0).await; // will be one millisecond too old
    h.clock.advance_ms(1);
    h.enqueue(1).await; // exactly max_event_age old: still sent
    h.clock.advance_ms(MAX_AGE_MS);

    let pass = h.step().await;
    assert_eq!((pass.claimed, pass.delivered, pass.dead), (2, 1, 1));
    assert_eq!(seqs(&h.heap.events()), [1]);
    let dead = h.dead().await;
    assert_eq!(dead.len(), 1);
    assert_eq!(
        (dead[0].reason.as_str(), dead[0].subject.as_str()),
        ("expired", "u0")
    );
    assert!(
        dead[0].detail.contains("max_event_age_secs"),
        "{}",
        dead[0].detail
    );
}

#[tokio::test]
async fn becoming_the_forwarder_first_charges_the_app_budget_with_the_last_minutes_deliveries() {
    // 15,000/min: each event delivered in the last minute costs 4 ms of waiting, on the clock.
    let mut h = Harness::start(0.5).await;
    h.leading.store(false, Ordering::SeqCst);
    for seq in 0..50 {
        h.enqueue(seq).await;
    }
    assert_eq!(
        h.step().await.delivered,
        50,
        "delivered by the forwarder before"
    );

    h.leading.store(true, Ordering::SeqCst);
    for seq in 50..60 {
        h.enqueue(seq).await;
    }
    assert_eq!(h.step().await.delivered, 10);
    assert_eq!(h.now(), T0 + 50 * 4, "waited for the 50 delivered before");

    h.enqueue(60).await;
    assert_eq!(h.step().await.delivered, 1);
    assert_eq!(
        h.now(),
        T0 + 200,
        "still forwarding: nothing to learn again"
    );

    // Losing and regaining the lead charges again, for all 61 of the last minute.
    h.leading.store(false, Ordering::SeqCst);
    assert_eq!(h.step().await.claimed, 0);
    h.leading.store(true, Ordering::SeqCst);
    h.enqueue(61).await;
    assert_eq!(h.step().await.delivered, 1);
    assert_eq!(h.now(), T0 + 200 + 61 * 4);
    assert_eq!(h.heap.events().len(), 62);
}

#[tokio::test]
async fn a_retryable_failure_stores_the_next_attempt_time_in_the_queue() {
    // Full jitter picks a quarter of the ceiling: 250 ms after the first failure (ceiling 1 s),
    // 500 ms after the second (ceiling 2 s).
    let mut h = Harness::start(0.25).await;
    h.heap.respond_with(|_, _| Answer::status(503));
    h.enqueue(0).await;

    let pass = h.step().await;
    assert_eq!((pass.claimed, pass.retried), (1, 1));
    assert_eq!(
        pass.backoff,
        Some(Duration::from_secs(1)),
        "never below retry.initial"
    );
    assert_eq!(h.next_due().await, Some(T0 + 250));
    assert_eq!(h.step().await.claimed, 0, "claimable before its time");
    h.clock.advance_ms(249);
    assert_eq!(h.step().await.claimed, 0, "claimable before its time");

    h.clock.advance_ms(1);
    let pass = h.step().await;
    assert_eq!((pass.claimed, pass.retried), (1, 1));
    assert_eq!(h.next_due().await, Some(T0 + 250 + 500));

    h.heap.respond_with(|_, _| Answer::OK);
    h.clock.advance_ms(500);
    assert_eq!(h.step().await.delivered, 1);
    assert_eq!(h.heap.requests().len(), 3);
    assert_eq!(seqs(&h.heap.events()), [0]);
    assert_eq!(h.next_due().await, None);
}

#[tokio::test]
async fn the_next_attempt_time_survives_reopening_the_queue() {
    let mut h = Harness::start(0.25).await;
    h.heap.respond_with(|_, _| Answer::status(503));
    h.enqueue(0).await;
    h.step().await;
    let path = h.dir.path().join("queue.sqlite3");
    let Harness {
        queue,
        forwarder,
        dir,
        ..
    } = h;
    drop((queue, forwarder));

    let reopened = SqliteQueue::open(&path).unwrap();
    assert_eq!(
        reopened
            .next_due_ms(crate::support::APP_ID, RecordKind::Track)
            .await
            .unwrap(),
        Some(T0 + 250)
    );
    assert!(
        reopened
            .claim(
                crate::support::APP_ID,
                RecordKind::Track,
                10,
                T0 + 249,
                1000
            )
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        reopened
            .claim(
                crate::support::APP_ID,
                RecordKind::Track,
                10,
                T0 + 250,
                1000
            )
            .await
            .unwrap()
            .len(),
        1
    );
    drop(dir);
}

#[tokio::test]
async fn retry_after_and_the_429_floor_raise_the_stored_next_attempt() {
    // With a zero jitter only Heap's answer sets the wait.
    let mut h = Harness::start(0.0).await;
    h.heap.respond_with(|_, _| Answer {
        status: 503,
        retry_after: Some(3),
        delay: Duration::ZERO,
    });
    h.enqueue(0).await;
    assert_eq!(h.step().await.backoff, Some(Duration::from_secs(3)));
    assert_eq!(h.next_due().await, Some(T0 + 3_000));

    h.heap.respond_with(|_, _| Answer::status(429));
    h.clock.advance_ms(3_000);
    assert_eq!(h.step().await.backoff, Some(THROTTLED_FLOOR));
    assert_eq!(
        h.next_due().await,
        Some(T0 + 3_000 + THROTTLED_FLOOR.as_millis() as i64)
    );
}

#[tokio::test]
async fn a_refused_batch_is_split_in_one_pass_and_only_the_bad_record_dies() {
    let mut h = Harness::start(0.5).await;
    h.heap.respond_with(|_, body| {
        let bad = body["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["properties"]["seq"] == 2);
        if bad { Answer::status(400) } else { Answer::OK }
    });
    for seq in 0..5 {
        h.enqueue(seq).await;
    }
    let pass = h.step().await;
    assert_eq!(
        (pass.claimed, pass.delivered, pass.dead, pass.retried),
        (5, 4, 1, 0)
    );
    let mut delivered = seqs(&h.heap.events());
    delivered.sort();
    assert_eq!(delivered, [0, 1, 3, 4]);
    let dead = h.dead().await;
    assert_eq!((dead.len(), dead[0].reason.as_str()), (1, "rejected"));
    assert_eq!(dead[0].detail, "heap answered 400: refused");
}

#[tokio::test]
async fn a_pass_renews_its_lease_only_once_a_quarter_of_it_is_spent() {
    // The lease is 60 s: a request more than 15 s after the claim renews its records first.
    // Heap refuses the batch with seq 2 and takes 10 s per answer (on the clock), so the
    // split sends requests at T0, T0 + 10 s, T0 + 20 s, ...; each notes the leases it sees.
    let mut h = Harness::start(0.5).await;
    let file = h.dir.path().join("queue.sqlite3");
    let clock = h.clock.clone();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    h.heap.respond_with({
        let seen = seen.clone();
        move |_, body| {
            let reader = rusqlite::Connection::open(&file).unwrap();
            let lease_end: i64 = reader
                .query_row(
                    "SELECT MAX(next_attempt_at) FROM records WHERE claimed = 1",
                    [],
                    |row| row.get(0),
                )
                .unwrap();
            seen.lock().unwrap().push(lease_end);
            clock.advance_ms(10_000);
            let events = body["events"].as_array().unwrap();
            let bad = events.iter().any(|e| e["properties"]["seq"] == 2);
            if bad { Answer::status(400) } else { Answer::OK }
        }
    });
    for seq in 0..5 {
        h.enqueue(seq).await;
    }
    let pass = h.step().await;
    assert_eq!((pass.delivered, pass.dead), (4, 1));
    let seen = seen.lock().unwrap().clone();
    assert!(seen.len() >= 3, "{seen:?}");
    // The claim's lease, unrenewed at T0 and T0 + 10 s; renewed at T0 + 20 s.
    assert_eq!(seen[..3], [T0 + 60_000, T0 + 60_000, T0 + 20_000 + 60_000]);
}

#[tokio::test]
async fn heap_failing_while_a_refused_batch_is_split_retries_every_half() {
    let mut h = Harness::start(0.5).await;
    let mut answered = 0;
    h.heap.respond_with(move |_, _| {
        answered += 1;
        if answered == 1 {
            Answer::status(400)
        } else {
            Answer::status(503)
        }
    });
    for seq in 0..4 {
        h.enqueue(seq).await;
    }
    let pass = h.step().await;
    assert_eq!(
        (pass.claimed, pass.retried, pass.dead, pass.delivered),
        (4, 4, 0, 0)
    );
    assert_eq!(
        h.heap.requests().len(),
        2,
        "the second half was sent into a failing Heap"
    );
    assert!(h.dead().await.is_empty());
    let stats = h.queue.stats(h.now()).await.unwrap();
    assert_eq!((stats.pending, stats.in_flight), (4, 0));
}

/// Webhooks in every state at [`T0`], on a queue that keeps user property records too:
/// `0` fully delivered; `1` track delivered, user record still pending; `2` track dead, user
/// delivered; `3` quarantined (no user).
async fn queue_in_every_state() -> (SqliteQueue, Mapper, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let queue = SqliteQueue::open(&dir.path().join("queue.sqlite3")).unwrap();
    let mapper = Mapper::new("user_id", true, false, &MappingSettings::default());
    for seq in 0..3 {
        let outcome = enqueue(&queue, &mapper, body(seq, true), T0).await;
        assert_eq!(outcome, Enqueued::Accepted { events: 1 });
    }
    assert_eq!(
        enqueue(&queue, &mapper, body(3, false), T0).await,
        Enqueued::Quarantined
    );

    let id_of = |claimed: &[userpilot_heap_relay::queue::Claimed], subject: &str| {
        claimed.iter().find(|c| c.subject == subject).unwrap().id
    };
    let track = queue
        .claim(crate::support::APP_ID, RecordKind::Track, 10, T0, 1000)
        .await
        .unwrap();
    let users = queue
        .claim(crate::support::APP_ID, RecordKind::User, 10, T0, 1000)
        .await
        .unwrap();
    assert_eq!((track.len(), users.len()), (3, 3));
    queue
        .ack(vec![id_of(&track, "u0"), id_of(&track, "u1")], T0)
        .await
        .unwrap();
    queue
        .dead_letter(
            vec![id_of(&track, "u2")],
            "rejected".into(),
            "heap answered 400".into(),
            false,
            T0,
        )
        .await
        .unwrap();
    queue
        .ack(vec![id_of(&users, "u0"), id_of(&users, "u2")], T0)
        .await
        .unwrap();
    queue
        .retry_at(vec![id_of(&users, "u1")], T0 + 60_000, true, "503".into())
        .await
        .unwrap();
    (queue, mapper, dir)
}

#[tokio::test]
async fn pruning_forgets_delivered_records_and_emptied_webhooks_but_keeps_pending_and_dead() {
    let (queue, mapper, _dir) = queue_in_every_state().await;
    // Past the dedup window, within the dead-letter retention.
    let pruned = queue.prune(T0 + 1, T0 - 1).await.unwrap();
    assert_eq!(pruned, 4 + 1, "four delivered records and webhook 0");
    let stats = queue.stats(T0).await.unwrap();
    assert_eq!((stats.delivered, stats.pending, stats.dead), (0, 1, 2));
    let dead = queue
        .dead_letters(DeadLetterFilter::default())
        .await
        .unwrap();
    let reasons: Vec<&str> = dead.iter().map(|d| d.reason.as_str()).collect();
    assert_eq!(reasons, ["rejected", "no_user_id"]);

    // Webhook 0 is forgotten: a redelivery is new again. The others are still recognised.
    let later = T0 + 10;
    assert_eq!(
        enqueue(&queue, &mapper, body(0, true), later).await,
        Enqueued::Accepted { events: 1 }
    );
    for (seq, with_user) in [(1, true), (2, true), (3, false)] {
        assert_eq!(
            enqueue(&queue, &mapper, body(seq, with_user), later).await,
            Enqueued::Duplicate,
            "webhook {seq}"
        );
    }
    let track = queue
        .claim(crate::support::APP_ID, RecordKind::Track, 10, later, 1000)
        .await
        .unwrap();
    assert_eq!(
        track.len(),
        1,
        "the redelivered webhook's event is queued to be sent again"
    );
    assert_eq!(track[0].subject, "u0");
}

#[tokio::test]
async fn dead_letters_are_pruned_after_their_own_retention_and_their_webhooks_with_them() {
    let (queue, mapper, _dir) = queue_in_every_state().await;
    let pruned = queue.prune(T0 + 1, T0 + 1).await.unwrap();
    assert_eq!(
        pruned,
        4 + 2 + 3,
        "delivered and dead records, webhooks 0, 2 and 3"
    );
    let stats = queue.stats(T0).await.unwrap();
    assert_eq!((stats.delivered, stats.pending, stats.dead), (0, 1, 0));
    assert!(
        queue
            .dead_letters(DeadLetterFilter::default())
            .await
            .unwrap()
            .is_empty()
    );

    let later = T0 + 10;
    assert_eq!(
        enqueue(&queue, &mapper, body(2, true), later).await,
        Enqueued::Accepted { events: 1 }
    );
    assert_eq!(
        enqueue(&queue, &mapper, body(3, false), later).await,
        Enqueued::Quarantined
    );
    assert_eq!(
        enqueue(&queue, &mapper, body(1, true), later).await,
        Enqueued::Duplicate
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_dedup_window_a_restart_forgets_delivered_webhooks() {
    let heap = FakeHeap::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut env = RelayProcess::env(&heap, dir.path());
    // The window may not be shorter than the signature tolerance, so both are one second.
    set_env(&mut env, "RELAY_QUEUE__DEDUP_WINDOW_SECS", "1");
    set_env(&mut env, "RELAY_USERPILOT__TOLERANCE_SECS", "1");
    let webhook: Value = serde_json::from_slice(&body(7, true)).unwrap();

    let mut relay = RelayProcess::spawn(&env);
    let (_, answer) = relay.post(&webhook).await;
    assert_eq!(answer["status"], "accepted");
    heap.wait_for_events(1, Duration::from_secs(10)).await;
    let delivered_at = std::time::Instant::now();
    let (_, answer) = relay.post(&webhook).await;
    assert_eq!(
        answer["status"], "duplicate",
        "remembered until the next pruning run"
    );
    let (code, _) = relay.terminate(Duration::from_secs(10)).await;
    assert!(code.success());

    // Pruning runs at startup, then every minute: restart once the window has passed.
    eventually(Duration::from_secs(5), async || {
        delivered_at.elapsed() > Duration::from_millis(1200)
    })
    .await;
    let relay = RelayProcess::spawn(&env);
    eventually(Duration::from_secs(10), async || {
        let (_, status) = relay.admin(reqwest::Method::GET, "/admin/status").await;
        match status["queue"]["delivered"].as_u64().unwrap() {
            0 => Ok(()),
            delivered => Err(format!("{delivered} delivered records not pruned yet")),
        }
    })
    .await;
    let (_, answer) = relay.post(&webhook).await;
    assert_eq!(answer["status"], "accepted");
    let events = heap.wait_for_events(2, Duration::from_secs(10)).await;
    assert_eq!(
        events[0]["idempotency_key"], events[1]["idempotency_key"],
        "sent again, under the same key for Heap to drop"
    );
}

#[tokio::test]
async fn property_updates_about_one_user_reach_heap_merged_with_the_latest_winning() {
    let mut h = Harness::start(0.0).await;
    let mapper = Mapper::new("user_id", true, false, &MappingSettings::default());
    let update = |seq: usize, user: &str, plan: &str, extra: Value| {
        let mut data = json!({ "type": "flow", "action": "started", "flow_id": "fl_1",
                               "seq": seq, "user": { "user_id": user, "plan": plan } });
        data["user"]
            .as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        Bytes::from(serde_json::to_vec(&json!({ "timestamp": T0 / 1000, "data": data })).unwrap())
    };
    let webhooks = [
        update(1, "u1", "free", json!({ "email": "a@x.io" })),
        update(2, "u2", "trial", json!({})),
        update(3, "u1", "pro", json!({})),
    ];
    for (i, body) in webhooks.into_iter().enumerate() {
        enqueue(h.queue.as_ref(), &mapper, body, T0 - 10 + i as i64).await;
    }

    let pass = h.forwarder.forward_once(RecordKind::User).await.unwrap();
    assert_eq!((pass.claimed, pass.delivered), (3, 3));
    let requests: Vec<_> = h
        .heap
        .requests()
        .into_iter()
        .filter(|r| r.path == "/api/add_user_properties")
        .collect();
    assert_eq!(requests.len(), 1);
    let users = requests[0].body["users"].as_array().unwrap().clone();
    assert_eq!(users.len(), 2, "one entry per user: {users:?}");
    assert_eq!(users[0]["identity"], "u1");
    assert_eq!(users[0]["properties"]["plan"], "pro");
    assert_eq!(users[0]["properties"]["email"], "a@x.io");
    assert_eq!(users[1]["identity"], "u2");
    assert_eq!(h.queue.stats(T0).await.unwrap().delivered, 3);
}

#[tokio::test]
async fn a_replayed_expired_letter_is_sent_instead_of_expiring_again() {
    use userpilot_heap_relay::clock::Clock;
    let mut h = Harness::start(0.5).await;
    h.enqueue(0).await;
    h.clock.advance_ms(MAX_AGE_MS + 1);
    let pass = h.step().await;
    assert_eq!((pass.claimed, pass.dead), (1, 1));
    assert_eq!(h.dead().await[0].reason, "expired");

    let expired = DeadLetterFilter {
        reason: Some("expired".into()),
        ..DeadLetterFilter::default()
    };
    let summary = userpilot_heap_relay::dead_letters::replay(
        h.queue.as_ref(),
        &crate::support::default_source(h.mapper.clone()),
        expired,
        h.clock.now(),
    )
    .await
    .unwrap();
    assert_eq!(summary.events, 1);
    let pass = h.step().await;
    assert_eq!(
        (pass.claimed, pass.delivered, pass.dead),
        (1, 1, 0),
        "the age limit counts from the replay"
    );
    let events = h.heap.events();
    assert_eq!(seqs(&events), [0]);
    let timestamp = events[0]["timestamp"].as_str().unwrap();
    assert!(
        timestamp.starts_with("2026-01-01T00:00:00"),
        "the event keeps the time it happened: {timestamp}"
    );
}

/// An erasure that commits while a pass is under way (here: while Heap answers its first
/// request) keeps what it deleted out of every later request of that pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erasure_during_a_pass_keeps_its_records_out_of_every_later_request() {
    let mut h = Harness::start(0.5).await;
    for seq in 0..3 {
        h.enqueue(seq).await;
    }
    let queue = h.queue.clone();
    let mut first = true;
    h.heap.respond_with(move |_, _| {
        if !std::mem::take(&mut first) {
            return Answer::OK;
        }
        // The whole batch is refused, so the pass splits it and sends its halves; meanwhile
        // u2 is erased.
        tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(async {
                let sources = userpilot_heap_relay::sources::Sources::default();
                let report = userpilot_heap_relay::erase::erase(
                    queue.as_ref(),
                    &sources,
                    userpilot_heap_relay::queue::DEFAULT_SOURCE,
                    "u2",
                    T0,
                    &mut |_| {},
                )
                .await
                .unwrap();
                assert_eq!(report.removed.pending_records, 1);
            })
        });
        Answer::status(400)
    });
    let pass = h.step().await;
    assert_eq!((pass.claimed, pass.dead), (3, 0), "{pass:?}");
    let requests = h.heap.requests();
    assert!(requests.len() >= 3, "the refused batch was not split");
    let later: Vec<i64> = requests[1..]
        .iter()
        .flat_map(|r| r.body["events"].as_array().unwrap().clone())
        .map(|e| e["properties"]["seq"].as_i64().unwrap())
        .collect();
    assert!(!later.contains(&2), "an erased record was sent: {later:?}");
    let mut delivered = later;
    delivered.sort();
    assert_eq!(delivered, [0, 1]);
}
