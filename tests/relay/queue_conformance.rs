//! One conformance suite for the `Queue` trait, written once against `Arc<dyn Queue>` and run
//! on both backends: SQLite (a temp dir) and Postgres (a fresh schema per test on the server in
//! `RELAY_TEST_POSTGRES_URL`; ignored, with the reason, when it is not set). It covers enqueue
//! (accepted, duplicate, quarantined, keys unique per webhook, NUL characters), claim order /
//! max / due time, leases (expiry, renew), ack, retry with and without an attempt, dead
//! letters (with the attempts that led to them) and their filters and paging, replay +
//! requeue, purge, prune, stats, next_due_ms, delivered_since and ping.
//!
//! Sources and lanes (schema v3): claims, due times and deliveries never cross lanes, lane
//! stats, the same body on two sources is two webhooks, dead letters carry and filter by their
//! source, requeue into a given lane, adoption of records without a lane.
//!
//! Shapes (schema v4): stored in the webhook's commit with count and first/last seen, not
//! counted again for a duplicate, summed when one group commits several sightings, listed
//! newest first and by source, their keys loadable for the request path's index.
//!
//! Erasures (schema v5, contract §12): a scan pages a source's webhooks by id, finding them
//! by a record's subject or the identity's bytes in the body; erasing webhooks deletes all
//! their records (counted by state) and empties their bodies while a redelivery stays a
//! duplicate; only matching samples of the source are cleared; erasures are recorded,
//! listed, filtered and paged; claims lease only erasures with Heap work due, each update
//! does what it says; the next due time; which claimed records are still pending.
//!
//! Postgres only: concurrent claimers never share a record, one leader per lane with a
//! fast takeover of a gone replica's leases, two replicas leading two lanes at once, migrations racing at startup, and failing fast
//! while the database is unreachable, then recovering without a restart.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::{Digest, Sha256};
use userpilot_heap_relay::heap::wire::{Outbound, RecordKind};
use userpilot_heap_relay::queue::postgres::PostgresQueue;
use userpilot_heap_relay::queue::sqlite::SqliteQueue;
use userpilot_heap_relay::queue::{
    Claimed, Content, DEFAULT_SOURCE, DeadLetterFilter, Enqueued, ErasureFilter, ErasureRow,
    ErasureScan, ErasureState, ErasureUpdate, NewErasure, NewWebhook, Queue, QueueError, Removed,
};
use userpilot_heap_relay::shapes;

use serde_json::json;

use crate::support::eventually;
use crate::support::postgres::{Database, Schema, lane as own_lane};
use crate::support::records::{self, APP, user};

/// A fixed "now" for the tests; every time is an offset from it.
const T0: i64 = 1_700_000_000_000;
const LEASE: i64 = 60_000;
const FAR: i64 = T0 + 1_000_000_000;
/// Migrations the Postgres backend has (one `schema_version` row each once applied).
const MIGRATIONS: i64 = 5;

// ---------------------------------------------------------------------------------------------
// Building blocks

tokio::task_local! {
    /// The lane the suite's webhooks go to and its claims read: [`APP`] on SQLite, one of the
    /// test's own on Postgres, whose leader locks every test on the server shares.
    static LANE: String;
}

/// The current test's lane.
fn lane() -> String {
    LANE.with(Clone::clone)
}

/// A webhook on source `default` in the test's lane.
fn webhook(body: &str, at: i64, records: Vec<Outbound>) -> NewWebhook {
    records::on(DEFAULT_SOURCE, &lane(), records::webhook(body, at, records))
}

fn track(key: &str) -> Outbound {
    records::track(key, &format!("user-{key}"))
}

fn quarantined(body: &str, at: i64, reason: &str, subject: &str) -> NewWebhook {
    let webhook = records::quarantined(body, at, reason, &format!("{reason} detail"), subject);
    records::on(DEFAULT_SOURCE, &lane(), webhook)
}

/// The idempotency keys of claimed track records, in claim order.
fn keys(claimed: &[Claimed]) -> Vec<String> {
    claimed
        .iter()
        .map(|c| {
            let json: Value = serde_json::from_str(&c.json).unwrap();
            json["idempotency_key"].as_str().unwrap().to_owned()
        })
        .collect()
}

fn ids(claimed: &[Claimed]) -> Vec<i64> {
    claimed.iter().map(|c| c.id).collect()
}

async fn claim_all(queue: &Arc<dyn Queue>, kind: RecordKind, now: i64) -> Vec<Claimed> {
    queue.claim(&lane(), kind, 1000, now, LEASE).await.unwrap()
}

/// Stores `webhook`; the backend must not fail.
async fn store(queue: &Arc<dyn Queue>, webhook: NewWebhook) -> Enqueued {
    queue.enqueue(webhook).await.unwrap()
}

/// Every track record claimable at `now`.
async fn tracks(queue: &Arc<dyn Queue>, now: i64) -> Vec<Claimed> {
    claim_all(queue, RecordKind::Track, now).await
}

async fn dead_ids(queue: &Arc<dyn Queue>, filter: DeadLetterFilter) -> Vec<i64> {
    let letters = queue.dead_letters(filter).await.unwrap();
    letters.iter().map(|l| l.id).collect()
}

use records::shaped;

// ---------------------------------------------------------------------------------------------
// The suite: each function states one behaviour of every backend.

async fn a_new_webhook_is_accepted_with_its_track_event_count(queue: Arc<dyn Queue>) {
    let result = store(
        &queue,
        webhook("w1", T0, vec![track("a"), track("b"), user("a")]),
    )
    .await;
    assert_eq!(result, Enqueued::Accepted { events: 2 });
    assert_eq!(queue.stats(T0).await.unwrap().pending, 3);
    let users = claim_all(&queue, RecordKind::User, T0).await;
    assert_eq!(users.len(), 1);
    assert_eq!(users[0].subject, "user-a");
}

async fn a_redelivered_body_is_a_duplicate_and_stores_nothing(queue: Arc<dyn Queue>) {
    store(&queue, webhook("w1", T0, vec![track("a")])).await;
    let again = store(&queue, webhook("w1", T0 + 5, vec![track("a")])).await;
    assert_eq!(again, Enqueued::Duplicate);
    assert_eq!(queue.stats(T0).await.unwrap().pending, 1);
}

async fn a_record_key_is_stored_once_per_webhook(queue: Arc<dyn Queue>) {
    // Keys derive from the body's digest, so only one webhook can carry a given key; within it
    // the key is unique (replay relies on that to skip records the webhook still has).
    let result = store(
        &queue,
        webhook("w1", T0, vec![track("a"), track("a"), track("b")]),
    )
    .await;
    assert_eq!(result, Enqueued::Accepted { events: 2 });
    assert_eq!(keys(&tracks(&queue, T0).await), ["a", "b"]);
}

async fn text_with_nul_characters_is_stored_and_sent_intact(queue: Arc<dyn Queue>) {
    // Postgres's TEXT cannot hold U+0000; the lookup columns get U+FFFD instead, on both
    // backends, while the record sent to Heap keeps the identity as it came.
    let result = store(
        &queue,
        webhook("w1", T0, vec![records::track("a", "x\u{0}y")]),
    )
    .await;
    assert_eq!(result, Enqueued::Accepted { events: 1 });
    let claimed = tracks(&queue, T0).await;
    assert_eq!(claimed[0].subject, "x\u{FFFD}y");
    let sent: Value = serde_json::from_str(&claimed[0].json).unwrap();
    assert_eq!(sent["identity"], "x\u{0}y");
    queue
        .dead_letter(
            ids(&claimed),
            "rejected".into(),
            "heap said \u{0}".into(),
            false,
            T0,
        )
        .await
        .unwrap();
    let dead = queue
        .dead_letters(DeadLetterFilter::default())
        .await
        .unwrap();
    assert_eq!(dead[0].detail, "heap said \u{FFFD}");
}

async fn a_quarantined_webhook_is_kept_as_a_dead_letter_of_kind_webhook(queue: Arc<dyn Queue>) {
    let result = store(&queue, quarantined("bad", T0 + 3, "unmapped", "carol")).await;
    assert_eq!(result, Enqueued::Quarantined);
    let letters = queue
        .dead_letters(DeadLetterFilter::default())
        .await
        .unwrap();
    assert_eq!(letters.len(), 1);
    let letter = &letters[0];
    assert_eq!(letter.kind, "webhook");
    assert_eq!(letter.reason, "unmapped");
    assert_eq!(letter.detail, "unmapped detail");
    assert_eq!(letter.subject, "carol");
    assert_eq!((letter.received_at_ms, letter.dead_at_ms), (T0 + 3, T0 + 3));
    assert_eq!(queue.stats(T0).await.unwrap().dead, 1);
    for kind in RecordKind::ALL {
        assert!(claim_all(&queue, kind, FAR).await.is_empty());
    }
    let again = store(&queue, quarantined("bad", T0 + 9, "unmapped", "carol")).await;
    assert_eq!(again, Enqueued::Duplicate);
}

async fn claims_are_oldest_first_per_kind_and_at_most_max(queue: Arc<dyn Queue>) {
    store(&queue, webhook("late", T0 + 2, vec![track("k1")])).await;
    store(&queue, webhook("early", T0, vec![track("k2"), user("u")])).await;
    store(
        &queue,
        webhook("middle", T0 + 1, vec![track("k3"), track("k4")]),
    )
    .await;
    let first = queue
        .claim(&lane(), RecordKind::Track, 3, T0 + 10, LEASE)
        .await
        .unwrap();
    assert_eq!(keys(&first), ["k2", "k3", "k4"]);
    assert_eq!(first[0].kind, RecordKind::Track);
    assert_eq!(first[0].subject, "user-k2");
    assert_eq!((first[0].attempts, first[0].received_at_ms), (0, T0));
    let second = queue
        .claim(&lane(), RecordKind::Track, 3, T0 + 10, LEASE)
        .await
        .unwrap();
    assert_eq!(keys(&second), ["k1"]);
    assert!(tracks(&queue, T0 + 10).await.is_empty());
    assert_eq!(claim_all(&queue, RecordKind::User, T0 + 10).await.len(), 1);
}

/// A claim that ends inside a webhook takes only what it wants of it: the webhook's other
/// records wait, unleased, for the next claim of their kind, and a record due again (a retry)
/// takes its place among the webhooks not yet claimed by its due time.
async fn a_claim_ending_inside_a_webhook_leaves_its_other_records_due(queue: Arc<dyn Queue>) {
    store(&queue, webhook("first", T0, vec![track("r")])).await;
    let retried = tracks(&queue, T0).await;
    queue
        .retry_at(ids(&retried), T0 + 5, true, "503".into())
        .await
        .unwrap();
    store(
        &queue,
        webhook("w", T0 + 1, vec![track("a"), track("b"), user("u")]),
    )
    .await;
    store(&queue, webhook("later", T0 + 9, vec![track("c")])).await;
    let first = queue
        .claim(&lane(), RecordKind::Track, 2, T0 + 10, LEASE)
        .await
        .unwrap();
    assert_eq!(keys(&first), ["a", "b"]);
    let stats = queue.stats(T0 + 10).await.unwrap();
    assert_eq!((stats.in_flight, stats.pending), (2, 3));
    let second = queue
        .claim(&lane(), RecordKind::Track, 1, T0 + 10, LEASE)
        .await
        .unwrap();
    assert_eq!(keys(&second), ["r"]);
    assert_eq!(second[0].attempts, 1);
    assert_eq!(keys(&tracks(&queue, T0 + 10).await), ["c"]);
    let users = claim_all(&queue, RecordKind::User, T0 + 10).await;
    assert_eq!(users.len(), 1);
    assert_eq!(users[0].received_at_ms, T0 + 1);
    let stats = queue.stats(T0 + 10).await.unwrap();
    assert_eq!((stats.in_flight, stats.pending), (5, 0));
    let again = tracks(&queue, T0 + 10 + LEASE).await;
    assert_eq!(keys(&again), ["r", "a", "b", "c"]); // all due at once: in id order
}

async fn large_claims_and_acks_take_every_record_oldest_first(queue: Arc<dyn Queue>) {
    // More than one bookkeeping chunk of the SQLite backend (which splits them into several
    // transactions): the result must not show it.
    for n in 0..300 {
        let key = format!("k{n:03}");
        store(&queue, webhook(&key, T0 + n, vec![track(&key)])).await;
    }
    let claimed = queue
        .claim(&lane(), RecordKind::Track, 260, T0 + 300, LEASE)
        .await
        .unwrap();
    let wanted: Vec<String> = (0..260).map(|n| format!("k{n:03}")).collect();
    assert_eq!(keys(&claimed), wanted);
    queue.ack(ids(&claimed), T0 + 301).await.unwrap();
    let stats = queue.stats(T0 + 301).await.unwrap();
    assert_eq!(
        (stats.delivered, stats.pending, stats.in_flight),
        (260, 40, 0)
    );
    let rest = tracks(&queue, T0 + 301).await;
    assert_eq!(keys(&rest).first().map(String::as_str), Some("k260"));
    assert_eq!(rest.len(), 40);
}

async fn records_are_not_claimed_before_they_are_due(queue: Arc<dyn Queue>) {
    store(&queue, webhook("w", T0 + 100, vec![track("a")])).await;
    assert!(tracks(&queue, T0 + 99).await.is_empty());
    let claimed = tracks(&queue, T0 + 100).await;
    queue
        .retry_at(ids(&claimed), T0 + 500, false, String::new())
        .await
        .unwrap();
    assert!(tracks(&queue, T0 + 499).await.is_empty());
    assert_eq!(keys(&tracks(&queue, T0 + 500).await), ["a"]);
}

async fn an_expired_lease_makes_its_records_claimable_again(queue: Arc<dyn Queue>) {
    store(&queue, webhook("w", T0, vec![track("a")])).await;
    let claimed = queue
        .claim(&lane(), RecordKind::Track, 10, T0, 1000)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    assert!(tracks(&queue, T0 + 999).await.is_empty());
    let again = tracks(&queue, T0 + 1000).await;
    assert_eq!(ids(&again), ids(&claimed));
}

async fn renew_extends_the_lease_of_records_in_flight(queue: Arc<dyn Queue>) {
    store(&queue, webhook("w", T0, vec![track("a")])).await;
    let claimed = queue
        .claim(&lane(), RecordKind::Track, 10, T0, 1000)
        .await
        .unwrap();
    queue.renew(ids(&claimed), T0 + 5000).await.unwrap();
    assert!(tracks(&queue, T0 + 2000).await.is_empty());
    assert_eq!(tracks(&queue, T0 + 5000).await.len(), 1);
}

async fn acked_records_are_delivered_and_never_claimed_again(queue: Arc<dyn Queue>) {
    store(&queue, webhook("w", T0, vec![track("a"), track("b")])).await;
    let claimed = tracks(&queue, T0).await;
    queue.ack(vec![claimed[0].id], T0 + 1).await.unwrap();
    let stats = queue.stats(T0 + 1).await.unwrap();
    assert_eq!((stats.delivered, stats.in_flight), (1, 1));
    assert_eq!(keys(&tracks(&queue, FAR).await), ["b"]);
}

async fn retry_counts_an_attempt_only_for_a_failure(queue: Arc<dyn Queue>) {
    store(&queue, webhook("w", T0, vec![track("a")])).await;
    let claimed = tracks(&queue, T0).await;
    queue
        .retry_at(ids(&claimed), T0 + 10, true, "heap answered 503".into())
        .await
        .unwrap();
    let stats = queue.stats(T0).await.unwrap();
    assert_eq!((stats.pending, stats.in_flight), (1, 0));
    let claimed = tracks(&queue, T0 + 10).await;
    assert_eq!(claimed[0].attempts, 1);
    queue
        .retry_at(ids(&claimed), T0 + 20, false, String::new())
        .await
        .unwrap();
    let claimed = tracks(&queue, T0 + 20).await;
    assert_eq!(claimed[0].attempts, 1);
    queue
        .dead_letter(
            ids(&claimed),
            "rejected".into(),
            "no".into(),
            false,
            T0 + 30,
        )
        .await
        .unwrap();
    let letters = queue
        .dead_letters(DeadLetterFilter::default())
        .await
        .unwrap();
    assert_eq!(letters[0].attempts, 1);
}

async fn dead_letters_count_every_failed_attempt_the_last_one_included(queue: Arc<dyn Queue>) {
    queue
        .enqueue(webhook("w", T0, vec![track("refused"), track("expired")]))
        .await
        .unwrap();
    // Three failed requests, each due again 10 ms later.
    let failures = 3;
    let mut now = T0;
    for _ in 0..failures {
        let claimed = claim_all(&queue, RecordKind::Track, now).await;
        assert_eq!(claimed.len(), 2);
        now += 10;
        queue
            .retry_at(ids(&claimed), now, true, "heap answered 503".into())
            .await
            .unwrap();
    }
    let claimed = claim_all(&queue, RecordKind::Track, now).await;
    assert_eq!(
        claimed.iter().map(|c| c.attempts).collect::<Vec<_>>(),
        [failures; 2]
    );
    let by_key = |key: &str| claimed[keys(&claimed).iter().position(|k| k == key).unwrap()].id;
    // Refused by Heap on a fourth request: that request counts. Too old to send: no request.
    queue
        .dead_letter(
            vec![by_key("refused")],
            "rejected".into(),
            "400".into(),
            true,
            now,
        )
        .await
        .unwrap();
    queue
        .dead_letter(
            vec![by_key("expired")],
            "expired".into(),
            "old".into(),
            false,
            now,
        )
        .await
        .unwrap();
    let letters = queue
        .dead_letters(DeadLetterFilter::default())
        .await
        .unwrap();
    let attempts: Vec<(String, u32)> = letters
        .iter()
        .map(|l| (l.reason.clone(), l.attempts))
        .collect();
    assert_eq!(
        attempts,
        [
            ("rejected".to_owned(), failures + 1),
            ("expired".to_owned(), failures)
        ]
    );
}

async fn delivered_since_counts_the_acks_of_one_kind_from_the_window_start(queue: Arc<dyn Queue>) {
    queue
        .enqueue(webhook(
            "w",
            T0,
            vec![track("a"), track("b"), track("c"), track("d"), user("u")],
        ))
        .await
        .unwrap();
    let tracks = claim_all(&queue, RecordKind::Track, T0).await;
    let users = claim_all(&queue, RecordKind::User, T0).await;
    let id = |key: &str| tracks[keys(&tracks).iter().position(|k| k == key).unwrap()].id;
    queue.ack(vec![id("a")], T0 + 10).await.unwrap();
    queue.ack(vec![id("b"), id("c")], T0 + 20).await.unwrap();
    queue.ack(ids(&users), T0 + 20).await.unwrap();
    // Dead at T0 + 30, and still pending: neither was received by Heap.
    queue
        .dead_letter(vec![id("d")], "rejected".into(), "no".into(), true, T0 + 30)
        .await
        .unwrap();

    let since = |kind, at| {
        let queue = Arc::clone(&queue);
        async move { queue.delivered_since(&lane(), kind, at).await.unwrap() }
    };
    assert_eq!(since(RecordKind::Track, T0).await, 3);
    assert_eq!(since(RecordKind::Track, T0 + 10).await, 3, "inclusive");
    assert_eq!(since(RecordKind::Track, T0 + 11).await, 2);
    assert_eq!(since(RecordKind::Track, T0 + 21).await, 0);
    assert_eq!(since(RecordKind::User, T0).await, 1);
    assert_eq!(since(RecordKind::Account, T0).await, 0);
}

async fn dead_lettered_records_leave_the_queue_with_their_reason(queue: Arc<dyn Queue>) {
    store(&queue, webhook("w", T0, vec![track("a"), track("b")])).await;
    let claimed = tracks(&queue, T0).await;
    queue
        .dead_letter(
            vec![claimed[1].id],
            "rejected".into(),
            "heap answered 400".into(),
            false,
            T0 + 7,
        )
        .await
        .unwrap();
    let letters = queue
        .dead_letters(DeadLetterFilter::default())
        .await
        .unwrap();
    assert_eq!(letters.len(), 1);
    let letter = &letters[0];
    assert_eq!(letter.id, claimed[1].id);
    assert_eq!(letter.kind, "track");
    assert_eq!(
        (letter.reason.as_str(), letter.detail.as_str()),
        ("rejected", "heap answered 400")
    );
    assert_eq!(letter.subject, "user-b");
    assert_eq!((letter.received_at_ms, letter.dead_at_ms), (T0, T0 + 7));
    let stats = queue.stats(T0).await.unwrap();
    assert_eq!((stats.dead, stats.in_flight), (1, 1));
    queue.ack(vec![claimed[1].id], T0 + 8).await.unwrap();
    assert_eq!(
        queue.stats(T0).await.unwrap().delivered,
        0,
        "a dead record stays dead"
    );
    assert_eq!(keys(&tracks(&queue, FAR).await), ["a"]);
}

/// Dead letters a (alice, rejected, T0+100), b (bob, expired, T0+200), c (alice, rejected,
/// T0+300) and the quarantined q (carol, unmapped, T0+5), in id order a < b < c < q.
async fn four_dead_letters(queue: &Arc<dyn Queue>) -> [i64; 4] {
    store(
        queue,
        webhook(
            "w1",
            T0,
            vec![records::track("a", "alice"), records::track("b", "bob")],
        ),
    )
    .await;
    store(queue, webhook("w2", T0, vec![records::track("c", "alice")])).await;
    store(queue, quarantined("w3", T0 + 5, "unmapped", "carol")).await;
    let claimed = claim_all(queue, RecordKind::Track, T0).await;
    let [a, b, c] = [claimed[0].id, claimed[1].id, claimed[2].id];
    for (id, reason, at) in [
        (a, "rejected", 100),
        (b, "expired", 200),
        (c, "rejected", 300),
    ] {
        queue
            .dead_letter(vec![id], reason.into(), "why".into(), false, T0 + at)
            .await
            .unwrap();
    }
    let all = dead_ids(queue, DeadLetterFilter::default()).await;
    assert_eq!(all.len(), 4);
    assert_eq!(&all[..3], [a, b, c]);
    [a, b, c, all[3]]
}

async fn dead_letters_filter_by_reason_subject_and_time_and_page_by_id(queue: Arc<dyn Queue>) {
    let [a, b, c, q] = four_dead_letters(&queue).await;
    let filter = |f: fn(&mut DeadLetterFilter)| {
        let mut filter = DeadLetterFilter::default();
        f(&mut filter);
        filter
    };
    let cases: Vec<(DeadLetterFilter, Vec<i64>)> = vec![
        (filter(|f| f.reason = Some("rejected".into())), vec![a, c]),
        (filter(|f| f.subject = Some("alice".into())), vec![a, c]),
        (filter(|f| f.subject = Some("carol".into())), vec![q]),
        (filter(|f| f.since_ms = Some(T0 + 200)), vec![b, c]),
        (filter(|f| f.until_ms = Some(T0 + 200)), vec![a, q]),
        (
            filter(|f| {
                f.since_ms = Some(T0 + 100);
                f.until_ms = Some(T0 + 300);
            }),
            vec![a, b],
        ),
        (
            filter(|f| {
                f.reason = Some("rejected".into());
                f.since_ms = Some(T0 + 150);
            }),
            vec![c],
        ),
        (filter(|f| f.limit = Some(2)), vec![a, b]),
        (filter(|f| f.reason = Some("nothing".into())), vec![]),
    ];
    for (filter, expected) in cases {
        assert_eq!(
            dead_ids(&queue, filter.clone()).await,
            expected,
            "{filter:?}"
        );
    }
    let by_ids = DeadLetterFilter {
        ids: vec![b, q],
        ..DeadLetterFilter::default()
    };
    assert_eq!(dead_ids(&queue, by_ids).await, [b, q]);
    // Paging: after_id + limit walks every letter once.
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = DeadLetterFilter {
            after_id: after,
            limit: Some(3),
            ..DeadLetterFilter::default()
        };
        let page = dead_ids(&queue, page).await;
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 3);
        after = page.last().copied();
        seen.extend(page);
    }
    assert_eq!(seen, [a, b, c, q]);
}

async fn requeue_replaces_dead_records_and_leaves_delivered_siblings_alone(queue: Arc<dyn Queue>) {
    store(&queue, webhook("w1", T0, vec![track("a"), track("b")])).await;
    let claimed = tracks(&queue, T0).await;
    queue.ack(vec![claimed[0].id], T0 + 1).await.unwrap();
    queue
        .dead_letter(
            vec![claimed[1].id],
            "rejected".into(),
            "no".into(),
            false,
            T0 + 1,
        )
        .await
        .unwrap();

    let items = queue
        .replay_items(DeadLetterFilter::default(), 100)
        .await
        .unwrap();
    assert_eq!(items.len(), 1);
    let item = items[0].clone();
    assert_eq!(item.dead_ids, [claimed[1].id]);
    assert_eq!(&item.body[..], b"w1");
    assert_eq!(item.digest, <[u8; 32]>::from(Sha256::digest(b"w1")));
    assert_eq!(item.received_at_ms, T0);

    // The re-mapped content has both records again: a (delivered) is a conflict, ignored.
    let events = queue
        .requeue(
            item,
            Content::Records(vec![track("a"), track("b")]),
            &lane(),
            T0 + 50,
        )
        .await
        .unwrap();
    assert_eq!(events, 1);
    let stats = queue.stats(T0 + 50).await.unwrap();
    assert_eq!((stats.pending, stats.delivered, stats.dead), (1, 1, 0));
    assert!(tracks(&queue, T0 + 49).await.is_empty());
    let again = tracks(&queue, T0 + 50).await;
    assert_eq!(keys(&again), ["b"]);
    assert_eq!(again[0].received_at_ms, T0);
}

async fn a_replayed_quarantine_becomes_pending_records(queue: Arc<dyn Queue>) {
    store(&queue, quarantined("bad", T0, "unmapped", "carol")).await;
    store(&queue, quarantined("worse", T0, "invalid", "dave")).await;
    let selected = DeadLetterFilter {
        reason: Some("unmapped".into()),
        ..DeadLetterFilter::default()
    };
    let items = queue.replay_items(selected, 100).await.unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(&items[0].body[..], b"bad");
    let events = queue
        .requeue(
            items[0].clone(),
            Content::Records(vec![track("x"), user("x")]),
            &lane(),
            T0 + 9,
        )
        .await
        .unwrap();
    assert_eq!(events, 1);
    let left = queue
        .dead_letters(DeadLetterFilter::default())
        .await
        .unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].reason, "invalid");
    assert_eq!(keys(&tracks(&queue, T0 + 9).await), ["x"]);
    assert_eq!(claim_all(&queue, RecordKind::User, T0 + 9).await.len(), 1);
}

async fn a_dead_letter_shows_its_record_last_error_and_webhook_body(queue: Arc<dyn Queue>) {
    store(&queue, webhook("w1", T0, vec![track("a"), track("b")])).await;
    let claimed = tracks(&queue, T0).await;
    let [a, b] = [claimed[0].id, claimed[1].id];
    queue
        .retry_at(vec![a], T0 + 10, true, "heap answered 503: busy".into())
        .await
        .unwrap();
    tracks(&queue, T0 + 10).await;
    queue
        .dead_letter(
            vec![a],
            "rejected".into(),
            "heap answered 400: bad".into(),
            true,
            T0 + 20,
        )
        .await
        .unwrap();
    store(&queue, quarantined("w2", T0 + 5, "no_kind", "carol")).await;
    let q = dead_ids(&queue, DeadLetterFilter::default()).await[1];

    let shown = queue.dead_letter_detail(a).await.unwrap().unwrap();
    assert_eq!(shown.letter.id, a);
    assert_eq!(shown.letter.reason, "rejected");
    assert_eq!(shown.letter.detail, "heap answered 400: bad");
    assert_eq!(shown.letter.attempts, 2);
    assert_eq!(
        (shown.letter.received_at_ms, shown.letter.dead_at_ms),
        (T0, T0 + 20)
    );
    assert_eq!(shown.last_error.as_deref(), Some("heap answered 503: busy"));
    assert_eq!(&shown.body[..], b"w1");
    let record: Value = serde_json::from_str(&shown.json).unwrap();
    assert_eq!(record["idempotency_key"], "a");
    assert_eq!(record["identity"], "user-a");

    // A quarantined webhook has no record, only its body.
    let shown = queue.dead_letter_detail(q).await.unwrap().unwrap();
    assert_eq!(
        (shown.letter.kind.as_str(), shown.json.as_str()),
        ("webhook", "")
    );
    assert_eq!(shown.last_error, None);
    assert_eq!(&shown.body[..], b"w2");
    // A record that is not dead (b is still leased) and an id that does not exist are none.
    assert_eq!(queue.dead_letter_detail(b).await.unwrap(), None);
    assert_eq!(queue.dead_letter_detail(q + 1000).await.unwrap(), None);
}

async fn dead_letters_are_counted_with_their_webhooks_as_filtered(queue: Arc<dyn Queue>) {
    // a and b belong to webhook w1, c to w2, q to w3.
    let [a, _, c, _] = four_dead_letters(&queue).await;
    store(&queue, webhook("pending", T0, vec![track("p")])).await;
    let count = |f: fn(&mut DeadLetterFilter)| {
        let mut filter = DeadLetterFilter::default();
        f(&mut filter);
        let queue = queue.clone();
        async move {
            let count = queue.count_dead_letters(filter).await.unwrap();
            (count.dead_letters, count.webhooks)
        }
    };
    assert_eq!(count(|_| {}).await, (4, 3));
    assert_eq!(count(|f| f.reason = Some("rejected".into())).await, (2, 2));
    assert_eq!(count(|f| f.subject = Some("alice".into())).await, (2, 2));
    assert_eq!(count(|f| f.limit = Some(2)).await, (2, 1));
    assert_eq!(count(|f| f.limit = Some(3)).await, (3, 2));
    assert_eq!(count(|f| f.reason = Some("nothing".into())).await, (0, 0));
    let by_ids = DeadLetterFilter {
        ids: vec![a, c],
        ..DeadLetterFilter::default()
    };
    let by_ids = queue.count_dead_letters(by_ids).await.unwrap();
    assert_eq!((by_ids.dead_letters, by_ids.webhooks), (2, 2));
}

async fn replay_items_come_in_pages_of_whole_webhooks(queue: Arc<dyn Queue>) {
    let [a, b, c, q] = four_dead_letters(&queue).await;
    let mut pages = Vec::new();
    let mut page = DeadLetterFilter::default();
    loop {
        let items = queue.replay_items(page.clone(), 2).await.unwrap();
        let Some(last) = items.last() else {
            break;
        };
        page.after_webhook_id = Some(last.webhook_id);
        pages.push(
            items
                .iter()
                .map(|i| (i.body.to_vec(), i.dead_ids.clone()))
                .collect::<Vec<_>>(),
        );
    }
    assert_eq!(
        pages,
        [
            vec![(b"w1".to_vec(), vec![a, b]), (b"w2".to_vec(), vec![c])],
            vec![(b"w3".to_vec(), vec![q])],
        ]
    );
    // A page of one webhook still carries all of its selected records; the filter applies.
    let one = queue
        .replay_items(DeadLetterFilter::default(), 1)
        .await
        .unwrap();
    assert_eq!(one.len(), 1);
    assert_eq!(one[0].dead_ids, [a, b]);
    let rejected = DeadLetterFilter {
        reason: Some("rejected".into()),
        ..DeadLetterFilter::default()
    };
    let items = queue.replay_items(rejected, 1).await.unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0].dead_ids, [a]);
}

async fn purge_deletes_only_the_selected_dead_letters(queue: Arc<dyn Queue>) {
    let [_, b, _, q] = four_dead_letters(&queue).await;
    store(&queue, webhook("pending", T0, vec![track("p")])).await;
    let rejected = DeadLetterFilter {
        reason: Some("rejected".into()),
        ..DeadLetterFilter::default()
    };
    assert_eq!(queue.purge(rejected).await.unwrap(), 2);
    assert_eq!(dead_ids(&queue, DeadLetterFilter::default()).await, [b, q]);
    let one = DeadLetterFilter {
        limit: Some(1),
        ..DeadLetterFilter::default()
    };
    assert_eq!(queue.purge(one).await.unwrap(), 1);
    assert_eq!(dead_ids(&queue, DeadLetterFilter::default()).await, [q]);
    assert_eq!(queue.purge(DeadLetterFilter::default()).await.unwrap(), 1);
    let stats = queue.stats(T0).await.unwrap();
    assert_eq!(
        (stats.dead, stats.pending),
        (0, 1),
        "pending records are never purged"
    );
}

async fn prune_forgets_old_delivered_and_dead_records_then_their_webhooks(queue: Arc<dyn Queue>) {
    store(&queue, webhook("delivered", T0, vec![track("d")])).await;
    store(&queue, webhook("dead", T0, vec![track("x")])).await;
    store(&queue, webhook("pending", T0, vec![track("p")])).await;
    store(&queue, webhook("recent", T0 + 50, vec![track("r")])).await;
    let claimed = tracks(&queue, T0 + 50).await;
    let by_key = |key: &str| claimed[keys(&claimed).iter().position(|k| k == key).unwrap()].id;
    queue.ack(vec![by_key("d")], T0 + 10).await.unwrap();
    queue.ack(vec![by_key("r")], T0 + 60).await.unwrap();
    queue
        .dead_letter(
            vec![by_key("x")],
            "rejected".into(),
            "no".into(),
            false,
            T0 + 20,
        )
        .await
        .unwrap();
    queue
        .retry_at(vec![by_key("p")], T0 + 100, true, "503".into())
        .await
        .unwrap();

    // Delivered before T0+15 go; dead letters before T0+15 stay (x died at T0+20).
    let pruned = queue.prune(T0 + 15, T0 + 15).await.unwrap();
    assert_eq!(pruned, 2, "d's record and its webhook");
    let stats = queue.stats(T0).await.unwrap();
    assert_eq!((stats.delivered, stats.dead, stats.pending), (1, 1, 1));
    assert_eq!(
        store(&queue, webhook("delivered", T0 + 70, vec![track("d")])).await,
        Enqueued::Accepted { events: 1 },
        "a forgotten webhook is accepted again"
    );
    for body in ["dead", "pending", "recent"] {
        assert_eq!(
            store(&queue, webhook(body, T0 + 70, vec![])).await,
            Enqueued::Duplicate,
            "{body} is still remembered"
        );
    }

    // Later cutoffs: x's dead letter and its webhook go, so do r's record (delivered at
    // T0+60) and its webhook (received at T0+50).
    let pruned = queue.prune(T0 + 65, T0 + 25).await.unwrap();
    assert_eq!(pruned, 4, "x and its webhook, r and its webhook");
    let stats = queue.stats(T0).await.unwrap();
    assert_eq!((stats.delivered, stats.dead, stats.pending), (0, 0, 2));
    assert!(
        dead_ids(&queue, DeadLetterFilter::default())
            .await
            .is_empty()
    );
    assert_eq!(
        store(&queue, webhook("pending", T0 + 80, vec![])).await,
        Enqueued::Duplicate,
        "a webhook with pending records is never forgotten"
    );
}

async fn stats_count_each_state_and_the_oldest_pending(queue: Arc<dyn Queue>) {
    assert_eq!(queue.stats(T0).await.unwrap(), Default::default());
    store(
        &queue,
        webhook("w1", T0 + 5, vec![track("a"), track("b"), user("a")]),
    )
    .await;
    store(&queue, webhook("w2", T0 + 9, vec![track("c")])).await;
    store(&queue, quarantined("q", T0 + 1, "unmapped", "carol")).await;
    let claimed = queue
        .claim(&lane(), RecordKind::Track, 2, T0 + 10, LEASE)
        .await
        .unwrap();
    queue.ack(vec![claimed[0].id], T0 + 11).await.unwrap();
    let stats = queue.stats(T0 + 11).await.unwrap();
    assert_eq!(stats.pending, 2, "c and the user record");
    assert_eq!(stats.in_flight, 1, "b");
    assert_eq!(stats.delivered, 1);
    assert_eq!(stats.dead, 1);
    assert_eq!(stats.oldest_pending_received_at_ms, Some(T0 + 5));
}

async fn next_due_is_the_earliest_due_time_or_lease_end(queue: Arc<dyn Queue>) {
    assert_eq!(
        queue.next_due_ms(&lane(), RecordKind::Track).await.unwrap(),
        None
    );
    store(&queue, webhook("w1", T0 + 7, vec![track("a"), user("a")])).await;
    store(&queue, webhook("w2", T0 + 9, vec![track("b")])).await;
    assert_eq!(
        queue.next_due_ms(&lane(), RecordKind::Track).await.unwrap(),
        Some(T0 + 7)
    );
    assert_eq!(
        queue.next_due_ms(&lane(), RecordKind::User).await.unwrap(),
        Some(T0 + 7)
    );
    assert_eq!(
        queue
            .next_due_ms(&lane(), RecordKind::Account)
            .await
            .unwrap(),
        None
    );
    let claimed = queue
        .claim(&lane(), RecordKind::Track, 1, T0 + 10, 1000)
        .await
        .unwrap();
    assert_eq!(
        queue.next_due_ms(&lane(), RecordKind::Track).await.unwrap(),
        Some(T0 + 9)
    );
    let rest = queue
        .claim(&lane(), RecordKind::Track, 1, T0 + 10, 1000)
        .await
        .unwrap();
    assert_eq!(
        queue.next_due_ms(&lane(), RecordKind::Track).await.unwrap(),
        Some(T0 + 1010),
        "the lease's end"
    );
    queue.ack(ids(&claimed), T0 + 11).await.unwrap();
    queue
        .retry_at(ids(&rest), T0 + 5000, false, String::new())
        .await
        .unwrap();
    assert_eq!(
        queue.next_due_ms(&lane(), RecordKind::Track).await.unwrap(),
        Some(T0 + 5000)
    );
    queue.ack(ids(&rest), T0 + 12).await.unwrap();
    assert_eq!(
        queue.next_due_ms(&lane(), RecordKind::Track).await.unwrap(),
        None
    );
}

async fn ping_succeeds_while_the_queue_accepts_writes(queue: Arc<dyn Queue>) {
    queue.ping().await.unwrap();
    queue.ping().await.unwrap();
}

async fn claims_due_times_and_deliveries_never_cross_lanes(queue: Arc<dyn Queue>) {
    let other = format!("{}-other", lane());
    store(&queue, webhook("w1", T0, vec![track("a"), user("a")])).await;
    let theirs = records::on(
        DEFAULT_SOURCE,
        &other,
        webhook("w2", T0 + 1, vec![track("b")]),
    );
    store(&queue, theirs).await;
    store(&queue, webhook("w3", T0 + 2, vec![track("c")])).await;

    assert_eq!(
        queue.next_due_ms(&other, RecordKind::Track).await.unwrap(),
        Some(T0 + 1)
    );
    assert_eq!(
        queue.next_due_ms(&other, RecordKind::User).await.unwrap(),
        None
    );
    let claimed = claim_all(&queue, RecordKind::Track, FAR).await;
    assert_eq!(keys(&claimed), ["a", "c"], "only this lane's records");
    let other_claimed = queue
        .claim(&other, RecordKind::Track, 1000, FAR, LEASE)
        .await
        .unwrap();
    assert_eq!(keys(&other_claimed), ["b"]);
    assert!(
        queue
            .claim(&other, RecordKind::User, 1000, FAR, LEASE)
            .await
            .unwrap()
            .is_empty(),
        "the user record is this lane's"
    );
    assert!(claim_all(&queue, RecordKind::Track, FAR).await.is_empty());

    queue.ack(ids(&claimed), T0 + 10).await.unwrap();
    queue.ack(ids(&other_claimed), T0 + 10).await.unwrap();
    let delivered = |app_id: String| {
        let queue = queue.clone();
        async move {
            queue
                .delivered_since(&app_id, RecordKind::Track, T0)
                .await
                .unwrap()
        }
    };
    assert_eq!(delivered(lane()).await, 2);
    assert_eq!(delivered(other.clone()).await, 1);
    assert_eq!(delivered(format!("{}-none", lane())).await, 0);
}

async fn lane_stats_count_each_app_id_apart_and_stats_all_of_them(queue: Arc<dyn Queue>) {
    let other = format!("{}-other", lane());
    store(&queue, webhook("w1", T0, vec![track("a"), track("b")])).await;
    let theirs = records::on(
        DEFAULT_SOURCE,
        &other,
        webhook("w2", T0 - 5, vec![track("c")]),
    );
    store(&queue, theirs).await;
    store(&queue, quarantined("bad", T0 + 1, "unmapped", "carol")).await;
    let claimed = queue
        .claim(&lane(), RecordKind::Track, 1, T0 + 10, LEASE)
        .await
        .unwrap();
    queue.ack(ids(&claimed), T0 + 11).await.unwrap();

    let lanes = queue.lane_stats(T0 + 20).await.unwrap();
    assert_eq!(
        lanes.keys().cloned().collect::<Vec<_>>(),
        {
            let mut names = vec![lane(), other.clone()];
            names.sort();
            names
        },
        "lanes with any record"
    );
    let mine = lanes[&lane()];
    assert_eq!(
        (mine.pending, mine.in_flight, mine.delivered, mine.dead),
        (1, 0, 1, 1)
    );
    assert_eq!(mine.oldest_pending_received_at_ms, Some(T0));
    let theirs = lanes[&other];
    assert_eq!((theirs.pending, theirs.delivered, theirs.dead), (1, 0, 0));
    assert_eq!(theirs.oldest_pending_received_at_ms, Some(T0 - 5));
    let all = queue.stats(T0 + 20).await.unwrap();
    assert_eq!((all.pending, all.delivered, all.dead), (2, 1, 1));
    assert_eq!(all.oldest_pending_received_at_ms, Some(T0 - 5));
}

async fn the_same_body_on_two_sources_is_two_webhooks(queue: Arc<dyn Queue>) {
    let on = |source: &str, at: i64| {
        records::on(source, &lane(), webhook("same body", at, vec![track("a")]))
    };
    assert_eq!(
        store(&queue, on(DEFAULT_SOURCE, T0)).await,
        Enqueued::Accepted { events: 1 }
    );
    assert_eq!(
        store(&queue, on("staging", T0 + 1)).await,
        Enqueued::Accepted { events: 1 }
    );
    assert_eq!(
        store(&queue, on("staging", T0 + 2)).await,
        Enqueued::Duplicate
    );
    assert_eq!(
        store(&queue, on(DEFAULT_SOURCE, T0 + 3)).await,
        Enqueued::Duplicate
    );
    assert_eq!(queue.stats(T0).await.unwrap().pending, 2);
    assert_eq!(tracks(&queue, T0 + 5).await.len(), 2);
}

async fn dead_letters_carry_their_source_and_lane_and_filter_by_source(queue: Arc<dyn Queue>) {
    let staging = |webhook: NewWebhook| records::on("staging", &lane(), webhook);
    store(&queue, quarantined("bad", T0, "unmapped", "carol")).await;
    store(
        &queue,
        staging(quarantined("bad", T0 + 1, "unmapped", "carol")),
    )
    .await;
    store(
        &queue,
        staging(quarantined("worse", T0 + 2, "invalid", "dave")),
    )
    .await;

    let all = queue
        .dead_letters(DeadLetterFilter::default())
        .await
        .unwrap();
    let sources: Vec<(&str, &str)> = all
        .iter()
        .map(|l| (l.source.as_str(), l.app_id.as_str()))
        .collect();
    let mine = lane();
    assert_eq!(
        sources,
        [
            (DEFAULT_SOURCE, mine.as_str()),
            ("staging", mine.as_str()),
            ("staging", mine.as_str())
        ]
    );
    let detail = queue.dead_letter_detail(all[1].id).await.unwrap().unwrap();
    assert_eq!(detail.letter, all[1]);

    let of = |source: &str| DeadLetterFilter {
        source: Some(source.to_owned()),
        ..DeadLetterFilter::default()
    };
    let staged = queue.dead_letters(of("staging")).await.unwrap();
    assert_eq!(
        staged
            .iter()
            .map(|l| l.subject.as_str())
            .collect::<Vec<_>>(),
        ["carol", "dave"]
    );
    assert!(queue.dead_letters(of("qa")).await.unwrap().is_empty());
    let counted = queue.count_dead_letters(of("staging")).await.unwrap();
    assert_eq!((counted.dead_letters, counted.webhooks), (2, 2));
    let items = queue.replay_items(of(DEFAULT_SOURCE), 10).await.unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0].source, DEFAULT_SOURCE);
    assert_eq!(items[0].dead_ids, [all[0].id]);
    let staged_items = queue.replay_items(of("staging"), 10).await.unwrap();
    assert!(staged_items.iter().all(|item| item.source == "staging"));
    assert_eq!(staged_items.len(), 2);

    assert_eq!(queue.purge(of("staging")).await.unwrap(), 2);
    assert_eq!(
        dead_ids(&queue, DeadLetterFilter::default()).await,
        [all[0].id],
        "the default source's dead letter is left"
    );
}

async fn a_requeued_webhook_goes_to_the_lane_it_is_given(queue: Arc<dyn Queue>) {
    let other = format!("{}-other", lane());
    store(&queue, quarantined("bad", T0, "unmapped", "carol")).await;
    let item = queue
        .replay_items(DeadLetterFilter::default(), 10)
        .await
        .unwrap()
        .remove(0);
    let content = Content::Records(vec![track("x")]);
    assert_eq!(
        queue.requeue(item, content, &other, T0 + 5).await.unwrap(),
        1
    );
    assert!(claim_all(&queue, RecordKind::Track, FAR).await.is_empty());
    let moved = queue
        .claim(&other, RecordKind::Track, 10, FAR, LEASE)
        .await
        .unwrap();
    assert_eq!(keys(&moved), ["x"]);
}

async fn records_without_a_lane_are_adopted_once_by_the_given_app_id(queue: Arc<dyn Queue>) {
    // Records stored before lanes existed have the lane '' (the migration tests make them the
    // real way; here they are stored so).
    let unassigned = |webhook: NewWebhook| records::on(DEFAULT_SOURCE, "", webhook);
    store(
        &queue,
        unassigned(webhook("old", T0, vec![track("a"), user("a")])),
    )
    .await;
    store(
        &queue,
        unassigned(quarantined("bad", T0, "unmapped", "carol")),
    )
    .await;
    store(&queue, webhook("new", T0 + 1, vec![track("b")])).await;
    assert_eq!(keys(&tracks(&queue, FAR).await), ["b"], "'' is no lane's");
    assert_eq!(queue.adopt_unassigned("").await.unwrap(), 0);

    assert_eq!(queue.adopt_unassigned(&lane()).await.unwrap(), 3);
    assert_eq!(queue.adopt_unassigned(&lane()).await.unwrap(), 0, "once");
    assert_eq!(
        queue
            .adopt_unassigned(&format!("{}-other", lane()))
            .await
            .unwrap(),
        0
    );
    assert_eq!(keys(&tracks(&queue, FAR).await), ["a"]);
    let lanes = queue.lane_stats(T0).await.unwrap();
    assert_eq!(lanes.keys().cloned().collect::<Vec<_>>(), [lane()]);
    assert_eq!(lanes[&lane()].dead, 1);
}

// ---------------------------------------------------------------------------------------------
// Both backends run every function above.

async fn shapes_are_stored_with_their_webhook_counted_and_listed_newest_first(
    queue: Arc<dyn Queue>,
) {
    let a = json!({"data": {"type": "form", "answer": "yes"}});
    let a_later = json!({"data": {"type": "form", "answer": "a longer answer"}});
    let b = json!({"data": {"type": "form", "score": 9}});
    store(&queue, shaped(webhook("s1", T0, vec![track("a")]), &a)).await;
    let other = records::on("other", &lane(), webhook("s3", T0 + 5, vec![track("c")]));
    store(&queue, shaped(other, &b)).await;
    store(
        &queue,
        shaped(webhook("s2", T0 + 10, vec![track("b")]), &a_later),
    )
    .await;
    // A redelivery of s1 is not another sighting.
    let again = store(&queue, shaped(webhook("s1", T0 + 20, vec![track("a")]), &a)).await;
    assert_eq!(again, Enqueued::Duplicate);

    let listed = queue.shapes(None).await.unwrap();
    assert_eq!(listed.len(), 2, "{listed:?}");
    let (first, second) = (&listed[0], &listed[1]);
    assert_eq!((first.source.as_str(), first.count), (DEFAULT_SOURCE, 2));
    assert_eq!((first.first_seen_ms, first.last_seen_ms), (T0, T0 + 10));
    assert_eq!(first.kind.as_deref(), Some("form"));
    assert!(
        first.paths.contains(&"data.answer:string".to_owned()),
        "{first:?}"
    );
    assert_eq!(
        first.sample,
        Some(json!({"data": {"type": "form", "answer": "<string:15>"}})),
        "the latest sample, redacted"
    );
    assert_eq!((second.source.as_str(), second.count), ("other", 1));
    assert_eq!(
        (second.first_seen_ms, second.last_seen_ms),
        (T0 + 5, T0 + 5)
    );

    let of_other = queue.shapes(Some("other".into())).await.unwrap();
    assert_eq!(of_other, vec![second.clone()]);
    let mut keys: Vec<(String, String)> = queue
        .shape_keys()
        .await
        .unwrap()
        .into_iter()
        .map(|(source, key)| (source, hex::encode(key)))
        .collect();
    keys.sort();
    let mut expected: Vec<(String, String)> = listed
        .iter()
        .map(|shape| (shape.source.clone(), shape.key.clone()))
        .collect();
    expected.sort();
    assert_eq!(keys, expected);
}

async fn sightings_committed_together_are_all_counted(queue: Arc<dyn Queue>) {
    let payload = json!({"data": {"type": "form"}});
    // Concurrent enqueues share group commits: one statement then holds several sightings of
    // one shape, which must add up, not collide.
    let stores = (0..40).map(|n| {
        let queue = queue.clone();
        let webhook = shaped(
            webhook(&format!("g{n}"), T0 + n, vec![track(&format!("g{n}"))]),
            &payload,
        );
        async move { queue.enqueue(webhook).await.unwrap() }
    });
    futures_util::future::join_all(stores).await;
    let listed = queue.shapes(None).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].count, 40);
    assert_eq!(
        (listed[0].first_seen_ms, listed[0].last_seen_ms),
        (T0, T0 + 39)
    );
}

async fn a_webhook_without_a_shape_records_none_and_off_keeps_no_sample(queue: Arc<dyn Queue>) {
    store(&queue, webhook("plain", T0, vec![track("a")])).await;
    assert!(queue.shapes(None).await.unwrap().is_empty());
    let mut unsampled = shaped(webhook("off", T0, vec![track("b")]), &json!({"x": 1}));
    if let Some(shape) = unsampled.shape.as_mut() {
        shape.sample = None;
    }
    store(&queue, unsampled).await;
    let listed = queue.shapes(None).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].sample, None);
}

// ---------------------------------------------------------------------------------------------
// Erasures (schema v5, contract §12).

/// A webhook on `source` in the test's lane, one track event of `identity` per key.
fn of(source: &str, body: &str, at: i64, identity: &str, keys: &[&str]) -> NewWebhook {
    let tracks = keys.iter().map(|k| records::track(k, identity)).collect();
    records::on(source, &lane(), records::webhook(body, at, tracks))
}

/// The ids of every webhook of `source`, in order, as single-webhook scan pages report them.
async fn webhook_ids(queue: &Arc<dyn Queue>, source: &str) -> Vec<i64> {
    let (mut ids, mut after) = (Vec::new(), 0);
    while let Some(last) = queue
        .erasure_scan(source, "nobody", after, 1)
        .await
        .unwrap()
        .last_id
    {
        ids.push(last);
        after = last;
    }
    ids
}

fn new_erasure(source: &str, identity: &str, heap: bool, at: i64) -> NewErasure {
    NewErasure {
        source: source.to_owned(),
        heap_app_id: heap.then(|| "heap-app".to_owned()),
        identity: heap.then(|| identity.to_owned()),
        identity_sha256: hex::encode(Sha256::digest(identity.as_bytes())),
        removed: Removed {
            webhooks: 3,
            pending_records: 2,
            delivered_records: 4,
            dead_letters: 1,
            shape_samples: 1,
        },
        requested_at_ms: at,
    }
}

fn every_erasure() -> ErasureFilter {
    ErasureFilter {
        limit: 100,
        ..ErasureFilter::default()
    }
}

async fn erasure(queue: &Arc<dyn Queue>, id: i64) -> ErasureRow {
    let rows = queue.erasures(every_erasure()).await.unwrap();
    rows.into_iter().find(|row| row.id == id).unwrap()
}

fn erasure_ids(rows: &[ErasureRow]) -> Vec<i64> {
    rows.iter().map(|row| row.id).collect()
}

async fn an_erasure_scan_finds_webhooks_by_record_subject_and_by_body_bytes_in_pages(
    queue: Arc<dyn Queue>,
) {
    // a: erin's record and body; b: erin only in the body; (other source: never); c: erin's
    // record only; d: bob's; q: a quarantine that resolved erin.
    store(
        &queue,
        of(DEFAULT_SOURCE, r#"{"user":"erin"}"#, T0, "erin", &["a"]),
    )
    .await;
    let b_body = r#"{"note":"bob wrote to erin"}"#;
    store(&queue, of(DEFAULT_SOURCE, b_body, T0, "bob", &["b"])).await;
    store(
        &queue,
        of("other", r#"{"user":"erin"}"#, T0, "erin", &["e"]),
    )
    .await;
    store(&queue, of(DEFAULT_SOURCE, r#"{"x":1}"#, T0, "erin", &["c"])).await;
    store(
        &queue,
        of(DEFAULT_SOURCE, r#"{"user":"bob"}"#, T0, "bob", &["d"]),
    )
    .await;
    store(&queue, quarantined(r#"{"q":"?"}"#, T0, "unmapped", "erin")).await;
    let ids = webhook_ids(&queue, DEFAULT_SOURCE).await;
    assert_eq!(ids.len(), 5, "the other source's webhook is not scanned");
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    let [a, b, c, d, q] = ids[..] else { panic!() };

    let mut pages = Vec::new();
    let mut after = 0;
    loop {
        let page = queue
            .erasure_scan(DEFAULT_SOURCE, "erin", after, 2)
            .await
            .unwrap();
        let Some(last) = page.last_id else {
            assert!(page.candidates.is_empty());
            break;
        };
        after = last;
        pages.push(page);
    }
    let last_ids: Vec<Option<i64>> = pages.iter().map(|p| p.last_id).collect();
    assert_eq!(last_ids, [Some(b), Some(d), Some(q)]);
    let found: Vec<Vec<(i64, bool)>> = pages
        .iter()
        .map(|p| {
            p.candidates
                .iter()
                .map(|c| (c.webhook_id, c.by_subject))
                .collect()
        })
        .collect();
    assert_eq!(
        found,
        [
            vec![(a, true), (b, false)],
            vec![(c, true)],
            vec![(q, true)]
        ]
    );
    assert_eq!(pages[0].candidates[1].body, b_body.as_bytes());
    assert_eq!(pages[1].candidates[0].body, &br#"{"x":1}"#[..]);

    // One webhook is enough to tell that a source has any; an unknown one has none.
    let first = queue
        .erasure_scan(DEFAULT_SOURCE, "erin", 0, 1)
        .await
        .unwrap();
    assert_eq!(first.last_id, Some(a));
    let none = queue.erasure_scan("nowhere", "erin", 0, 10).await.unwrap();
    assert_eq!(none, ErasureScan::default());
}

async fn erasing_webhooks_deletes_all_their_records_and_bodies_but_keeps_their_digests(
    queue: Arc<dyn Queue>,
) {
    let mut w1 = of(DEFAULT_SOURCE, "erin's", T0, "erin", &["a", "b", "c"]);
    if let Content::Records(records) = &mut w1.content {
        records.push(user("erin"));
    }
    store(&queue, w1.clone()).await;
    store(
        &queue,
        quarantined("erin's bad one", T0, "unmapped", "erin"),
    )
    .await;
    store(
        &queue,
        webhook("bob's", T0, vec![records::track("k", "bob")]),
    )
    .await;
    // Of erin's tracks: a delivered, b dead, c in flight; her user record pending.
    let claimed = tracks(&queue, T0).await;
    let erins: Vec<&Claimed> = claimed.iter().filter(|c| c.subject == "erin").collect();
    queue.ack(vec![erins[0].id], T0).await.unwrap();
    queue
        .dead_letter(vec![erins[1].id], "rejected".into(), "no".into(), true, T0)
        .await
        .unwrap();
    let ids = webhook_ids(&queue, DEFAULT_SOURCE).await;

    let removed = queue.erase_webhooks(ids[..2].to_vec()).await.unwrap();
    assert_eq!(
        removed,
        Removed {
            webhooks: 2,
            pending_records: 2,
            delivered_records: 1,
            dead_letters: 2,
            shape_samples: 0,
        }
    );
    let stats = queue.stats(T0).await.unwrap();
    assert_eq!(
        (stats.pending + stats.in_flight, stats.delivered, stats.dead),
        (1, 0, 0),
        "only bob's record is left"
    );
    assert!(
        queue
            .dead_letters(DeadLetterFilter::default())
            .await
            .unwrap()
            .is_empty()
    );
    assert!(claim_all(&queue, RecordKind::User, FAR).await.is_empty());
    let left = tracks(&queue, FAR).await;
    assert_eq!(
        left.iter().map(|c| c.subject.as_str()).collect::<Vec<_>>(),
        ["bob"]
    );

    // The rows stay, emptied: nothing of erin is found again, bob's body is whole.
    assert_eq!(webhook_ids(&queue, DEFAULT_SOURCE).await, ids);
    let again = queue
        .erasure_scan(DEFAULT_SOURCE, "erin", 0, 10)
        .await
        .unwrap();
    assert!(again.candidates.is_empty(), "{again:?}");
    let bobs = queue
        .erasure_scan(DEFAULT_SOURCE, "bob", 0, 10)
        .await
        .unwrap();
    assert_eq!(bobs.candidates.len(), 1);
    assert_eq!(bobs.candidates[0].body, &b"bob's"[..]);

    // A redelivery of an erased webhook is a duplicate; erasing again removes nothing.
    assert_eq!(store(&queue, w1).await, Enqueued::Duplicate);
    let quarantine = quarantined("erin's bad one", T0 + 5, "unmapped", "erin");
    assert_eq!(store(&queue, quarantine).await, Enqueued::Duplicate);
    let twice = queue.erase_webhooks(ids[..2].to_vec()).await.unwrap();
    assert_eq!(twice, Removed::default());
    assert_eq!(
        queue.erase_webhooks(Vec::new()).await.unwrap(),
        Removed::default()
    );
}

async fn erasing_samples_clears_only_the_matching_samples_of_the_source(queue: Arc<dyn Queue>) {
    let full = |webhook: NewWebhook, payload: Value| {
        let mut shaped = shaped(webhook, &payload);
        if let Some(shape) = shaped.shape.as_mut() {
            shape.sample = shapes::sample(&payload, shapes::Samples::Full);
        }
        shaped
    };
    let erins = json!({"data": {"user": "erin"}});
    let bobs = json!({"data": {"who": "bob", "score": 3}});
    store(
        &queue,
        full(webhook("s1", T0, vec![track("a")]), erins.clone()),
    )
    .await;
    store(
        &queue,
        full(webhook("s2", T0 + 1, vec![track("b")]), bobs.clone()),
    )
    .await;
    let elsewhere = records::on("other", &lane(), webhook("s3", T0 + 2, vec![track("c")]));
    store(&queue, full(elsewhere, erins.clone())).await;
    let before = queue.shapes(None).await.unwrap();

    assert_eq!(
        queue.erase_samples(DEFAULT_SOURCE, "erin").await.unwrap(),
        1
    );
    let after = queue.shapes(None).await.unwrap();
    assert_eq!(after.len(), 3);
    for (old, new) in before.iter().zip(&after) {
        assert_eq!(
            (&old.key, &old.paths, old.count),
            (&new.key, &new.paths, new.count)
        );
        let cleared = new.source == DEFAULT_SOURCE && old.sample.as_ref() == Some(&erins);
        assert_eq!(new.sample.is_none(), cleared, "{new:?}");
    }
    assert_eq!(
        queue.erase_samples(DEFAULT_SOURCE, "erin").await.unwrap(),
        0
    );
    assert_eq!(
        queue.erase_samples(DEFAULT_SOURCE, "nobody").await.unwrap(),
        0
    );
}

async fn erasures_are_recorded_listed_filtered_and_paged_by_id(queue: Arc<dyn Queue>) {
    let local = queue
        .record_erasure(new_erasure(DEFAULT_SOURCE, "erin", false, T0))
        .await
        .unwrap();
    let heap = queue
        .record_erasure(new_erasure(DEFAULT_SOURCE, "bob", true, T0 + 1))
        .await
        .unwrap();
    let other = queue
        .record_erasure(new_erasure("other", "carol", true, T0 + 2))
        .await
        .unwrap();
    assert!(local < heap && heap < other);

    let all = queue.erasures(every_erasure()).await.unwrap();
    assert_eq!(erasure_ids(&all), [local, heap, other]);
    let expected = new_erasure(DEFAULT_SOURCE, "bob", true, T0 + 1);
    assert_eq!(
        all[1],
        ErasureRow {
            id: heap,
            source: expected.source,
            heap_app_id: expected.heap_app_id,
            identity: expected.identity,
            identity_sha256: expected.identity_sha256,
            state: ErasureState::LocalDone,
            removed: expected.removed,
            requested_at_ms: T0 + 1,
            updated_at_ms: T0 + 1,
            deletion_request_id: None,
            attempts: 0,
            last_error: None,
            reason: None,
            next_attempt_at_ms: T0 + 1,
        }
    );
    assert_eq!(
        (all[0].heap_app_id.as_deref(), all[0].identity.as_deref()),
        (None, None)
    );

    let select = |source: Option<&str>, state: Option<ErasureState>, after_id, limit| {
        let queue = queue.clone();
        let filter = ErasureFilter {
            source: source.map(str::to_owned),
            state,
            after_id,
            limit,
        };
        async move { erasure_ids(&queue.erasures(filter).await.unwrap()) }
    };
    assert_eq!(select(Some("other"), None, None, 100).await, [other]);
    assert_eq!(
        select(Some(DEFAULT_SOURCE), None, None, 100).await,
        [local, heap]
    );
    let local_done = Some(ErasureState::LocalDone);
    assert_eq!(
        select(None, local_done, None, 100).await,
        [local, heap, other]
    );
    assert!(
        select(None, Some(ErasureState::HeapPending), None, 100)
            .await
            .is_empty()
    );
    assert_eq!(select(None, None, Some(local), 1).await, [heap]);
    assert_eq!(select(None, None, Some(heap), 1).await, [other]);
    assert!(select(None, None, Some(other), 1).await.is_empty());
}

async fn claimed_erasures_are_leased_and_local_only_or_finished_ones_never(queue: Arc<dyn Queue>) {
    let record = |identity: &str, heap: bool, at: i64| {
        let queue = queue.clone();
        let erasure = new_erasure(DEFAULT_SOURCE, identity, heap, at);
        async move { queue.record_erasure(erasure).await.unwrap() }
    };
    let local = record("l", false, T0).await;
    let first = record("a", true, T0).await;
    let later = record("b", true, T0 + 10).await;
    let failed = record("f", true, T0).await;
    let done = record("d", true, T0).await;
    let pending = record("p", true, T0).await;
    let failure = ErasureUpdate::Failed {
        reason: "401".into(),
    };
    queue.update_erasure(failed, failure, T0).await.unwrap();
    queue
        .update_erasure(done, ErasureUpdate::Done, T0)
        .await
        .unwrap();
    let requested = ErasureUpdate::Requested {
        deletion_request_id: "req-p".into(),
        check_at_ms: T0 + 5,
    };
    queue.update_erasure(pending, requested, T0).await.unwrap();

    let claimed = queue.claim_erasures(T0, LEASE, 10).await.unwrap();
    assert_eq!(erasure_ids(&claimed), [first]);
    assert_eq!(claimed[0].identity.as_deref(), Some("a"));
    assert_eq!(
        claimed[0].next_attempt_at_ms,
        T0 + LEASE,
        "due again when the lease ends"
    );
    // Later: the due ones, oldest first and at most max; the leased one is not due again.
    let one = queue.claim_erasures(T0 + 20, LEASE, 1).await.unwrap();
    assert_eq!(erasure_ids(&one), [later]);
    let rest = queue.claim_erasures(T0 + 20, LEASE, 10).await.unwrap();
    assert_eq!(erasure_ids(&rest), [pending]);
    assert_eq!(rest[0].state, ErasureState::HeapPending);
    assert!(
        queue
            .claim_erasures(T0 + 30, LEASE, 10)
            .await
            .unwrap()
            .is_empty()
    );
    // The first lease ends: claimed again; then all three, never the other three.
    let expired = queue.claim_erasures(T0 + LEASE, LEASE, 10).await.unwrap();
    assert_eq!(erasure_ids(&expired), [first]);
    let all = queue.claim_erasures(FAR, LEASE, 10).await.unwrap();
    assert_eq!(erasure_ids(&all), [first, later, pending]);
    let untouched = erasure(&queue, local).await;
    assert_eq!(
        untouched.next_attempt_at_ms, T0,
        "a local-only erasure is never leased"
    );
}

async fn each_erasure_update_changes_what_it_says_and_ends_the_lease(queue: Arc<dyn Queue>) {
    let id = queue
        .record_erasure(new_erasure(DEFAULT_SOURCE, "erin", true, T0))
        .await
        .unwrap();
    assert_eq!(
        erasure_ids(&queue.claim_erasures(T0, LEASE, 10).await.unwrap()),
        [id]
    );

    let retry = ErasureUpdate::Retry {
        error: "503 Service Unavailable".into(),
        at_ms: T0 + 100,
    };
    queue.update_erasure(id, retry, T0 + 1).await.unwrap();
    let row = erasure(&queue, id).await;
    assert_eq!(row.state, ErasureState::LocalDone);
    assert_eq!(
        (row.attempts, row.last_error.as_deref()),
        (1, Some("503 Service Unavailable"))
    );
    assert_eq!(
        (row.next_attempt_at_ms, row.updated_at_ms),
        (T0 + 100, T0 + 1)
    );
    assert_eq!(
        row.identity.as_deref(),
        Some("erin"),
        "kept until Heap is asked"
    );
    // Due at the retry time, long before the lease would have ended.
    let claimed = queue.claim_erasures(T0 + 100, LEASE, 10).await.unwrap();
    assert_eq!(erasure_ids(&claimed), [id]);

    let requested = ErasureUpdate::Requested {
        deletion_request_id: "req-1".into(),
        check_at_ms: T0 + 200,
    };
    queue.update_erasure(id, requested, T0 + 101).await.unwrap();
    let row = erasure(&queue, id).await;
    assert_eq!(row.state, ErasureState::HeapPending);
    assert_eq!(row.deletion_request_id.as_deref(), Some("req-1"));
    assert_eq!((row.identity, row.last_error), (None, None));
    assert_eq!((row.attempts, row.next_attempt_at_ms), (1, T0 + 200));
    assert_eq!(row.updated_at_ms, T0 + 101);

    let claimed = queue.claim_erasures(T0 + 200, LEASE, 10).await.unwrap();
    assert_eq!(erasure_ids(&claimed), [id]);
    let later = ErasureUpdate::CheckLater { at_ms: T0 + 300 };
    queue.update_erasure(id, later, T0 + 201).await.unwrap();
    let row = erasure(&queue, id).await;
    assert_eq!((row.state, row.attempts), (ErasureState::HeapPending, 1));
    assert_eq!(
        (row.next_attempt_at_ms, row.updated_at_ms),
        (T0 + 300, T0 + 201)
    );
    assert_eq!(
        erasure_ids(&queue.claim_erasures(T0 + 300, LEASE, 10).await.unwrap()),
        [id]
    );

    queue
        .update_erasure(id, ErasureUpdate::Done, T0 + 301)
        .await
        .unwrap();
    let row = erasure(&queue, id).await;
    assert_eq!(
        (row.state, row.updated_at_ms),
        (ErasureState::Done, T0 + 301)
    );
    assert_eq!(row.deletion_request_id.as_deref(), Some("req-1"));

    let refused = queue
        .record_erasure(new_erasure(DEFAULT_SOURCE, "bob", true, T0))
        .await
        .unwrap();
    let failure = ErasureUpdate::Failed {
        reason: "401 Unauthorized: bad key".into(),
    };
    queue
        .update_erasure(refused, failure, T0 + 2)
        .await
        .unwrap();
    let row = erasure(&queue, refused).await;
    assert_eq!(row.state, ErasureState::HeapFailed);
    assert_eq!(row.reason.as_deref(), Some("401 Unauthorized: bad key"));
    assert_eq!((row.identity, row.updated_at_ms), (None, T0 + 2));
    assert!(
        queue
            .claim_erasures(FAR, LEASE, 10)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn next_erasure_due_is_the_earliest_claimable_due_time_or_lease_end(queue: Arc<dyn Queue>) {
    assert_eq!(queue.next_erasure_due_ms().await.unwrap(), None);
    let record = |heap: bool, at: i64| {
        let queue = queue.clone();
        let erasure = new_erasure(DEFAULT_SOURCE, "erin", heap, at);
        async move { queue.record_erasure(erasure).await.unwrap() }
    };
    record(false, T0).await;
    assert_eq!(
        queue.next_erasure_due_ms().await.unwrap(),
        None,
        "local only"
    );
    let late = record(true, T0 + 50).await;
    assert_eq!(queue.next_erasure_due_ms().await.unwrap(), Some(T0 + 50));
    record(true, T0 + 30).await;
    assert_eq!(queue.next_erasure_due_ms().await.unwrap(), Some(T0 + 30));
    queue.claim_erasures(T0 + 40, LEASE, 1).await.unwrap();
    assert_eq!(queue.next_erasure_due_ms().await.unwrap(), Some(T0 + 50));
    let requested = ErasureUpdate::Requested {
        deletion_request_id: "req".into(),
        check_at_ms: FAR,
    };
    queue
        .update_erasure(late, requested, T0 + 41)
        .await
        .unwrap();
    assert_eq!(
        queue.next_erasure_due_ms().await.unwrap(),
        Some(T0 + 40 + LEASE),
        "the lease's end"
    );
    let failure = ErasureUpdate::Failed {
        reason: "no".into(),
    };
    let claimed = queue.claim_erasures(FAR, LEASE, 10).await.unwrap();
    assert_eq!(claimed.len(), 2);
    for erasure in claimed {
        queue
            .update_erasure(erasure.id, failure.clone(), FAR)
            .await
            .unwrap();
    }
    assert_eq!(queue.next_erasure_due_ms().await.unwrap(), None);
}

async fn still_pending_keeps_only_the_ids_of_pending_records(queue: Arc<dyn Queue>) {
    store(
        &queue,
        webhook(
            "w1",
            T0,
            vec![track("a"), track("b"), track("c"), track("d")],
        ),
    )
    .await;
    let claimed = tracks(&queue, T0).await;
    let [a, b, c, d] = ids(&claimed)[..] else {
        panic!()
    };
    queue.ack(vec![a], T0).await.unwrap();
    queue
        .dead_letter(vec![b], "rejected".into(), "no".into(), true, T0)
        .await
        .unwrap();
    queue
        .retry_at(vec![d], T0 + 10, true, "503".into())
        .await
        .unwrap();
    // c is in flight, d waits for its retry: both still pending; a made-up id is not.
    let mut still = queue
        .still_pending(vec![a, b, c, d, d + 1000])
        .await
        .unwrap();
    still.sort();
    assert_eq!(still, [c, d]);
    assert!(queue.still_pending(Vec::new()).await.unwrap().is_empty());
    let webhooks = webhook_ids(&queue, DEFAULT_SOURCE).await;
    queue.erase_webhooks(webhooks).await.unwrap();
    assert!(queue.still_pending(vec![c, d]).await.unwrap().is_empty());
}

async fn sqlite_queue() -> (Arc<dyn Queue>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let queue = SqliteQueue::open(&dir.path().join("queue.sqlite3")).unwrap();
    (Arc::new(queue), dir)
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $name() {
                    let (queue, _dir) = super::sqlite_queue().await;
                    super::LANE.scope(super::APP.to_owned(), super::$name(queue)).await;
                }
            )*
        }

        mod postgres {
            $(
                #[cfg_attr(not(postgres_tests), ignore = "needs RELAY_TEST_POSTGRES_URL")]
                #[tokio::test]
                async fn $name() {
                    let schema = super::Schema::fresh().await;
                    let queue = std::sync::Arc::new(schema.queue().await);
                    super::LANE.scope(super::own_lane(), super::$name(queue)).await;
                    schema.drop().await;
                }
            )*
        }
    };
}

conformance!(
    a_new_webhook_is_accepted_with_its_track_event_count,
    a_redelivered_body_is_a_duplicate_and_stores_nothing,
    a_record_key_is_stored_once_per_webhook,
    text_with_nul_characters_is_stored_and_sent_intact,
    a_quarantined_webhook_is_kept_as_a_dead_letter_of_kind_webhook,
    claims_are_oldest_first_per_kind_and_at_most_max,
    a_claim_ending_inside_a_webhook_leaves_its_other_records_due,
    large_claims_and_acks_take_every_record_oldest_first,
    records_are_not_claimed_before_they_are_due,
    an_expired_lease_makes_its_records_claimable_again,
    renew_extends_the_lease_of_records_in_flight,
    acked_records_are_delivered_and_never_claimed_again,
    retry_counts_an_attempt_only_for_a_failure,
    dead_letters_count_every_failed_attempt_the_last_one_included,
    delivered_since_counts_the_acks_of_one_kind_from_the_window_start,
    dead_lettered_records_leave_the_queue_with_their_reason,
    dead_letters_filter_by_reason_subject_and_time_and_page_by_id,
    requeue_replaces_dead_records_and_leaves_delivered_siblings_alone,
    a_replayed_quarantine_becomes_pending_records,
    purge_deletes_only_the_selected_dead_letters,
    a_dead_letter_shows_its_record_last_error_and_webhook_body,
    dead_letters_are_counted_with_their_webhooks_as_filtered,
    replay_items_come_in_pages_of_whole_webhooks,
    prune_forgets_old_delivered_and_dead_records_then_their_webhooks,
    stats_count_each_state_and_the_oldest_pending,
    next_due_is_the_earliest_due_time_or_lease_end,
    ping_succeeds_while_the_queue_accepts_writes,
    claims_due_times_and_deliveries_never_cross_lanes,
    lane_stats_count_each_app_id_apart_and_stats_all_of_them,
    the_same_body_on_two_sources_is_two_webhooks,
    dead_letters_carry_their_source_and_lane_and_filter_by_source,
    a_requeued_webhook_goes_to_the_lane_it_is_given,
    records_without_a_lane_are_adopted_once_by_the_given_app_id,
    shapes_are_stored_with_their_webhook_counted_and_listed_newest_first,
    sightings_committed_together_are_all_counted,
    a_webhook_without_a_shape_records_none_and_off_keeps_no_sample,
    an_erasure_scan_finds_webhooks_by_record_subject_and_by_body_bytes_in_pages,
    erasing_webhooks_deletes_all_their_records_and_bodies_but_keeps_their_digests,
    erasing_samples_clears_only_the_matching_samples_of_the_source,
    erasures_are_recorded_listed_filtered_and_paged_by_id,
    claimed_erasures_are_leased_and_local_only_or_finished_ones_never,
    each_erasure_update_changes_what_it_says_and_ends_the_lease,
    next_erasure_due_is_the_earliest_claimable_due_time_or_lease_end,
    still_pending_keeps_only_the_ids_of_pending_records,
);

// ---------------------------------------------------------------------------------------------
// Postgres only: several replicas on one database.

async fn enqueue_tracks(
    queue: &PostgresQueue,
    app_id: &str,
    webhooks: usize,
    per_webhook: usize,
) -> usize {
    for w in 0..webhooks {
        let records = (0..per_webhook)
            .map(|r| track(&format!("k{w}-{r}")))
            .collect();
        let webhook = records::webhook(&format!("w{w}-{app_id}"), T0 + w as i64, records);
        let result = queue
            .enqueue(records::on(DEFAULT_SOURCE, app_id, webhook))
            .await
            .unwrap();
        assert_eq!(
            result,
            Enqueued::Accepted {
                events: per_webhook
            }
        );
    }
    webhooks * per_webhook
}

#[cfg_attr(not(postgres_tests), ignore = "needs RELAY_TEST_POSTGRES_URL")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_claimers_never_get_the_same_record() {
    let schema = Schema::fresh().await;
    let lane = own_lane();
    // One leader, claiming from two tasks at once on connections of its pool: only the claim
    // statement (`FOR UPDATE SKIP LOCKED`) keeps them apart.
    let queue = Arc::new(schema.queue().await);
    let total = enqueue_tracks(&queue, &lane, 40, 10).await;

    let claimer = |queue: Arc<PostgresQueue>, lane: String| {
        tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                let batch = queue
                    .claim(&lane, RecordKind::Track, 7, FAR, LEASE)
                    .await
                    .unwrap();
                if batch.is_empty() {
                    return mine;
                }
                mine.extend(ids(&batch));
            }
        })
    };
    let (a, b) = tokio::join!(
        claimer(queue.clone(), lane.clone()),
        claimer(queue.clone(), lane.clone())
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert!(queue.is_leader(&lane));
    let a_set: HashSet<i64> = a.iter().copied().collect();
    let b_set: HashSet<i64> = b.iter().copied().collect();
    assert_eq!(a_set.len(), a.len(), "no record twice to one claimer");
    assert_eq!(b_set.len(), b.len());
    assert!(a_set.is_disjoint(&b_set), "a record claimed by both");
    assert_eq!(a.len() + b.len(), total, "every record claimed once");
    assert_eq!(queue.stats(FAR).await.unwrap().in_flight, total as u64);
    drop(queue);
    schema.drop().await;
}

#[cfg_attr(not(postgres_tests), ignore = "needs RELAY_TEST_POSTGRES_URL")]
#[tokio::test]
async fn one_replica_leads_a_lane_and_a_successor_frees_a_gone_leaders_leases() {
    let schema = Schema::fresh().await;
    let lane = own_lane();
    let first = schema.queue().await;
    let second = schema.queue().await;
    enqueue_tracks(&first, &lane, 3, 2).await;

    let leased = first
        .claim(&lane, RecordKind::Track, 4, T0 + 10, LEASE)
        .await
        .unwrap();
    assert_eq!(leased.len(), 4);
    assert!(first.is_leader(&lane));
    assert!(
        second
            .claim(&lane, RecordKind::Track, 100, T0 + 10, LEASE)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(!second.is_leader(&lane));
    assert_eq!(
        second.next_due_ms(&lane, RecordKind::Track).await.unwrap(),
        None
    );

    // The leader goes away (its sessions end) with four records leased for another minute.
    drop(first);
    // Claiming at T0 + 20, long before those leases end (T0 + 10 + LEASE): the successor
    // gets the two unleased records and, once the gone leader's sessions are gone from
    // `pg_stat_activity`, its four leased ones.
    let mut claimed = HashSet::new();
    eventually(Duration::from_secs(10), async || {
        let batch = second
            .claim(&lane, RecordKind::Track, 100, T0 + 20, LEASE)
            .await
            .unwrap();
        for id in ids(&batch) {
            assert!(
                claimed.insert(id),
                "record {id} claimed twice by the successor"
            );
        }
        match claimed.len() {
            6 => Ok(()),
            n => Err(format!("{n} of 6 records claimed")),
        }
    })
    .await;
    assert!(second.is_leader(&lane));
    assert!(ids(&leased).iter().all(|id| claimed.contains(id)));
    drop(second);
    schema.drop().await;
}

#[cfg_attr(not(postgres_tests), ignore = "needs RELAY_TEST_POSTGRES_URL")]
#[tokio::test]
async fn two_replicas_lead_two_different_lanes_at_once_each_claiming_only_its_own() {
    let schema = Schema::fresh().await;
    let (a, b) = (own_lane(), own_lane());
    let one = schema.queue().await;
    let two = schema.queue().await;
    let in_a = enqueue_tracks(&one, &a, 3, 2).await;
    let in_b = enqueue_tracks(&one, &b, 2, 2).await;

    // Replica one takes lane a first, replica two lane b: each then leads one lane.
    let one_a = one
        .claim(&a, RecordKind::Track, 100, T0 + 10, LEASE)
        .await
        .unwrap();
    let two_b = two
        .claim(&b, RecordKind::Track, 100, T0 + 10, LEASE)
        .await
        .unwrap();
    assert_eq!((one_a.len(), two_b.len()), (in_a, in_b));
    assert!(one.is_leader(&a) && two.is_leader(&b), "both lead at once");
    // Neither gets the other's lane: it is led already.
    assert!(
        one.claim(&b, RecordKind::Track, 100, FAR, LEASE)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        two.claim(&a, RecordKind::Track, 100, FAR, LEASE)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(!one.is_leader(&b) && !two.is_leader(&a));
    assert_eq!(one.next_due_ms(&b, RecordKind::Track).await.unwrap(), None);
    assert!(one.is_leader(&a), "following one lane leaves the other led");
    // What each claimed is of its lane only.
    let of = |claimed: &[Claimed]| claimed.iter().map(|c| c.id).collect::<HashSet<_>>();
    assert!(of(&one_a).is_disjoint(&of(&two_b)));
    let sessions = schema
        .count(&format!(
            "SELECT COUNT(DISTINCT a.application_name) FROM pg_locks l
             JOIN pg_stat_activity a ON a.pid = l.pid
             WHERE l.locktype = 'advisory' AND l.granted
               AND a.application_name IN ('{}', '{}')",
            one.replica_id(),
            two.replica_id()
        ))
        .await;
    assert_eq!(sessions, 2, "each replica's session holds a lane's lock");
    drop((one, two));
    schema.drop().await;
}

#[cfg_attr(not(postgres_tests), ignore = "needs RELAY_TEST_POSTGRES_URL")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_starting_together_migrate_the_schema_once() {
    let schema = Schema::fresh().await;
    let starts = (0..4).map(|_| {
        let url = schema.url.clone();
        tokio::spawn(async move { PostgresQueue::connect(&url).await })
    });
    let mut queues = Vec::new();
    for start in starts {
        queues.push(start.await.unwrap().unwrap());
    }
    assert_eq!(
        schema
            .count("SELECT COUNT(*) FROM {schema}.schema_version")
            .await,
        MIGRATIONS
    );
    // And a later start finds it done.
    queues.push(schema.queue().await);
    assert_eq!(
        schema
            .count("SELECT COUNT(*) FROM {schema}.schema_version")
            .await,
        MIGRATIONS
    );
    queues[0].ping().await.unwrap();
    drop(queues);
    schema.drop().await;
}

fn assert_storage_error<T: std::fmt::Debug>(result: Result<T, QueueError>, what: &str) {
    match result {
        Err(QueueError::Storage(_)) => {}
        other => panic!("{what}: expected a storage error, got {other:?}"),
    }
}

#[cfg_attr(not(postgres_tests), ignore = "needs RELAY_TEST_POSTGRES_URL")]
#[tokio::test]
async fn while_postgres_is_unreachable_calls_fail_fast_and_then_recover_without_restart() {
    let database = Database::fresh().await;
    let queue = PostgresQueue::connect(&database.url).await.unwrap();
    let webhook = |body: &str, records| records::webhook(body, T0, records);
    queue
        .enqueue(webhook("before", vec![track("a")]))
        .await
        .unwrap();
    assert_eq!(claim_all_pg(&queue, T0).await.len(), 1);

    database.cut_off().await;
    let quickly = Duration::from_secs(6);
    let started = Instant::now();
    assert_storage_error(queue.ping().await, "ping");
    assert_storage_error(
        queue.enqueue(webhook("during", vec![track("b")])).await,
        "enqueue",
    );
    assert_storage_error(queue.stats(T0).await, "stats");
    assert_storage_error(queue.ack(vec![1], T0).await, "ack");
    assert_storage_error(
        queue.next_due_ms(APP, RecordKind::Track).await,
        "next_due_ms",
    );
    assert!(
        started.elapsed() < quickly,
        "storage errors took {:?}",
        started.elapsed()
    );
    // The leader connection was cut too: within a check interval, claiming fails as well.
    let failed_claim = eventually(Duration::from_secs(5), async || {
        queue
            .claim(APP, RecordKind::Track, 10, FAR, LEASE)
            .await
            .err()
    })
    .await;
    assert!(matches!(failed_claim, QueueError::Storage(_)));

    database.restore().await;
    eventually(Duration::from_secs(10), async || queue.ping().await).await;
    assert_eq!(
        queue
            .enqueue(webhook("after", vec![track("c")]))
            .await
            .unwrap(),
        Enqueued::Accepted { events: 1 }
    );
    let claimed = eventually(Duration::from_secs(10), async || {
        let claimed = queue
            .claim(APP, RecordKind::Track, 10, FAR, LEASE)
            .await
            .ok()?;
        (!claimed.is_empty()).then_some(claimed)
    })
    .await;
    assert_eq!(
        keys(&claimed),
        ["c", "a"],
        "c due since T0, a since its lease ran out"
    );
    drop(queue);
    database.drop().await;
}

async fn claim_all_pg(queue: &PostgresQueue, now: i64) -> Vec<Claimed> {
    queue
        .claim(APP, RecordKind::Track, 1000, now, LEASE)
        .await
        .unwrap()
}

#[tokio::test]
async fn connecting_to_a_server_that_is_not_there_fails_fast() {
    // Needs no server: a port nothing listens on.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let started = Instant::now();
    let result =
        PostgresQueue::connect(&format!("postgres://relay:relay@127.0.0.1:{port}/relay")).await;
    assert!(matches!(result, Err(QueueError::Storage(_))));
    assert!(started.elapsed() < Duration::from_secs(6));
}
