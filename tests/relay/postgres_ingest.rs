//! Postgres ingest: concurrent enqueues committed together as one group (one statement for
//! the whole group) answer exactly what enqueueing them one by one would — new, duplicate
//! (also the same body twice in one group), quarantined, several records with repeated keys —
//! and store exactly that; a webhook Postgres refuses fails alone while its group neighbours
//! are stored (the savepoint fallback); deduplication is per source on both paths (the same
//! body on two sources in one group is two webhooks, each in its lane); and two replicas
//! enqueuing the same webhooks in crossed order at once all succeed (no deadlock). Skipped,
//! saying so, without
//! `RELAY_TEST_POSTGRES_URL`.
//!
//! The group tests run on tokio's single-threaded runtime: tasks spawned together all hand
//! their webhook over before a committer runs, so they land in one group. Each test checks that
//! premise: rows committed by one statement share `xmin`; and the fallback's savepoints, which
//! have an `xmin` each, still insert the group in digest order, unlike the order of arrival.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use sha2::{Digest, Sha256};
use userpilot_heap_relay::heap::wire::{Outbound, RecordKind};
use userpilot_heap_relay::queue::postgres::PostgresQueue;
use userpilot_heap_relay::queue::{
    DEFAULT_SOURCE, DeadLetterFilter, Enqueued, NewWebhook, Queue, QueueError,
};

use crate::support::postgres::{Schema, connect};
use crate::support::records::{self, account, track, user};

const T0: i64 = 1_700_000_000_000;
const FAR: i64 = T0 + 1_000_000_000;

/// A lane of its own, so that claims here never wait on another test's leader.
static LANE: std::sync::LazyLock<String> = std::sync::LazyLock::new(crate::support::postgres::lane);

fn webhook(body: &str, at: i64, records: Vec<Outbound>) -> NewWebhook {
    records::on(DEFAULT_SOURCE, &LANE, records::webhook(body, at, records))
}

fn quarantined(body: &str, at: i64, detail: &str, subject: &str) -> NewWebhook {
    let webhook = records::quarantined(body, at, "unmapped", detail, subject);
    records::on(DEFAULT_SOURCE, &LANE, webhook)
}

/// Enqueues every webhook at once (spawned together, so on the single-threaded runtime they
/// form one group); the results in the same order.
async fn enqueue_together(
    queue: &Arc<PostgresQueue>,
    webhooks: Vec<NewWebhook>,
) -> Vec<Result<Enqueued, QueueError>> {
    let tasks: Vec<_> = webhooks
        .into_iter()
        .map(|webhook| {
            let queue = Arc::clone(queue);
            tokio::spawn(async move { queue.enqueue(webhook).await })
        })
        .collect();
    let mut results = Vec::with_capacity(tasks.len());
    for task in tasks {
        results.push(task.await.unwrap());
    }
    results
}

/// The transactions (`xmin`) that stored the webhooks received at or after `since`.
async fn transactions(client: &tokio_postgres::Client, since: i64) -> i64 {
    client
        .query_one(
            "SELECT COUNT(DISTINCT xmin::text) FROM webhooks WHERE received_at >= $1",
            &[&since],
        )
        .await
        .unwrap()
        .get(0)
}

/// The bodies of the webhooks received at or after `since`, in the order they were inserted
/// (by id), and as sorted by digest.
async fn insert_order(client: &tokio_postgres::Client, since: i64) -> (Vec<String>, Vec<String>) {
    let rows = client
        .query(
            "SELECT convert_from(body, 'UTF8'), digest FROM webhooks WHERE received_at >= $1
             ORDER BY id",
            &[&since],
        )
        .await
        .unwrap();
    let inserted: Vec<(String, Vec<u8>)> =
        rows.iter().map(|row| (row.get(0), row.get(1))).collect();
    let mut by_digest = inserted.clone();
    by_digest.sort_by(|a, b| a.1.cmp(&b.1));
    let bodies = |list: Vec<(String, Vec<u8>)>| list.into_iter().map(|(body, _)| body).collect();
    (bodies(inserted), bodies(by_digest))
}

/// Every stored record as (webhook body, key, kind, subject, state, received_at).
async fn stored_records(
    client: &tokio_postgres::Client,
) -> BTreeSet<(String, String, String, String, i32, i64)> {
    client
        .query(
            "SELECT convert_from(w.body, 'UTF8'), r.key, r.kind, r.subject, r.state,
                    r.received_at
             FROM records r JOIN webhooks w ON w.id = r.webhook_id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| {
            (
                row.get(0),
                row.get(1),
                row.get(2),
                row.get(3),
                row.get(4),
                row.get(5),
            )
        })
        .collect()
}

async fn stored_webhooks(client: &tokio_postgres::Client) -> HashMap<String, i64> {
    client
        .query(
            "SELECT convert_from(body, 'UTF8'), received_at FROM webhooks",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

#[cfg_attr(not(postgres_tests), ignore = "needs RELAY_TEST_POSTGRES_URL")]
#[tokio::test]
async fn a_mixed_group_answers_and_stores_what_one_by_one_enqueues_would() {
    let schema = Schema::fresh().await;
    let queue = Arc::new(schema.queue().await);
    let client = connect(&schema.url).await;

    // Stored before the group, which redelivers them.
    for old in 0..5 {
        let body = format!("old-{old}");
        let result = queue
            .enqueue(webhook(&body, T0, vec![track(&body, "old")]))
            .await
            .unwrap();
        assert_eq!(result, Enqueued::Accepted { events: 1 });
    }

    let at = T0 + 1000;
    let mut group = Vec::new();
    let mut expected = Vec::new();
    let mut expect = |webhook: NewWebhook, result: Enqueued| {
        group.push(webhook);
        expected.push(result);
    };
    for n in 0..20 {
        let body = format!("new-{n}");
        // 0 to 3 records: none, a track event, one of each kind, and a repeated key.
        let (records, events) = match n % 4 {
            0 => (vec![], 0),
            1 => (vec![track(&body, "ann")], 1),
            2 => (vec![track(&body, "bob"), user(&body), account(&body)], 1),
            _ => (
                vec![
                    track(&format!("{body}-a"), "cy"),
                    track(&format!("{body}-b"), "cy"),
                    track(&format!("{body}-a"), "cy"),
                    user(&body),
                ],
                2,
            ),
        };
        expect(
            webhook(&body, at + n, records),
            Enqueued::Accepted { events },
        );
    }
    for old in 0..5 {
        let body = format!("old-{old}");
        expect(
            webhook(&body, at, vec![track(&format!("{body}-again"), "old")]),
            Enqueued::Duplicate,
        );
    }
    // The same body twice in the group: the first is new; the second, with other records and
    // another receive time, is a duplicate and stores nothing.
    for n in 0..5 {
        let body = format!("twice-{n}");
        expect(
            webhook(
                &body,
                at + 100,
                vec![track(&format!("{body}-first"), "dee")],
            ),
            Enqueued::Accepted { events: 1 },
        );
        expect(
            webhook(
                &body,
                at + 200,
                vec![track(&format!("{body}-second"), "dee")],
            ),
            Enqueued::Duplicate,
        );
    }
    for n in 0..13 {
        let body = format!("bad-{n}");
        expect(
            quarantined(&body, at + 300, &format!("detail {n}"), &format!("eve-{n}")),
            Enqueued::Quarantined,
        );
    }
    expect(
        quarantined("bad-0", at + 400, "again", "eve-again"),
        Enqueued::Duplicate,
    );
    expect(
        webhook(
            "wide",
            at,
            (0..30)
                .map(|k| track(&format!("wide-{k}"), "fay"))
                .collect(),
        ),
        Enqueued::Accepted { events: 30 },
    );
    assert_eq!(group.len(), 50);

    let results = enqueue_together(&queue, group.clone()).await;
    for ((webhook, result), expected) in group.iter().zip(&results).zip(&expected) {
        let body = String::from_utf8_lossy(&webhook.body);
        assert_eq!(result.as_ref().ok(), Some(expected), "{body}: {result:?}");
    }
    assert_eq!(
        transactions(&client, at).await,
        1,
        "the test's premise: one group, committed in one transaction"
    );
    // Inserted in digest order (so that concurrent groups take locks in one order), not in the
    // order they arrived.
    let (inserted, by_digest) = insert_order(&client, at).await;
    assert_eq!(inserted, by_digest);

    // Stored: every new webhook once, with its first occurrence's receive time and records.
    let webhooks = stored_webhooks(&client).await;
    assert_eq!(webhooks.len(), 5 + 20 + 5 + 13 + 1);
    for n in 0..5 {
        assert_eq!(webhooks[&format!("old-{n}")], T0);
        assert_eq!(webhooks[&format!("twice-{n}")], at + 100);
    }
    let records = stored_records(&client).await;
    let mut wanted = BTreeSet::new();
    let mut want = |body: &str, key: String, kind: &str, subject: String, state, at| {
        wanted.insert((body.to_owned(), key, kind.to_owned(), subject, state, at));
    };
    for n in 0..5 {
        let body = format!("old-{n}");
        want(&body, body.clone(), "track", "old".into(), 0, T0);
        let body = format!("twice-{n}");
        want(
            &body,
            format!("{body}-first"),
            "track",
            "dee".into(),
            0,
            at + 100,
        );
    }
    for n in 0..20 {
        let body = format!("new-{n}");
        let received = at + n;
        match n % 4 {
            0 => {}
            1 => want(&body, body.clone(), "track", "ann".into(), 0, received),
            2 => {
                want(&body, body.clone(), "track", "bob".into(), 0, received);
                let (user_key, user_subject) = (format!("user:{body}"), format!("user-{body}"));
                want(
                    &body,
                    user_key,
                    "add_user_properties",
                    user_subject,
                    0,
                    received,
                );
                let (account_key, account_id) =
                    (format!("account:{body}"), format!("account-{body}"));
                want(
                    &body,
                    account_key,
                    "add_account_properties",
                    account_id,
                    0,
                    received,
                );
            }
            _ => {
                for suffix in ["a", "b"] {
                    let key = format!("{body}-{suffix}");
                    want(&body, key, "track", "cy".into(), 0, received);
                }
                let (user_key, user_subject) = (format!("user:{body}"), format!("user-{body}"));
                want(
                    &body,
                    user_key,
                    "add_user_properties",
                    user_subject,
                    0,
                    received,
                );
            }
        }
    }
    for n in 0..13 {
        let body = format!("bad-{n}");
        let key = format!(
            "quarantine:{}",
            hex::encode(Sha256::digest(body.as_bytes()))
        );
        want(&body, key, "webhook", format!("eve-{n}"), 2, at + 300);
    }
    for k in 0..30 {
        want("wide", format!("wide-{k}"), "track", "fay".into(), 0, at);
    }
    assert_eq!(records, wanted);

    // The records are what the queue serves: pending ones claimable, quarantines dead letters.
    let tracks = queue
        .claim(&LANE, RecordKind::Track, 1000, FAR, 60_000)
        .await
        .unwrap();
    assert_eq!(tracks.len(), 5 + 5 + 5 + 5 + 10 + 30);
    let letters = queue
        .dead_letters(DeadLetterFilter::default())
        .await
        .unwrap();
    let mut details: Vec<_> = letters
        .iter()
        .map(|l| (l.reason.as_str(), l.detail.clone(), l.subject.clone()))
        .collect();
    details.sort();
    let mut wanted_details: Vec<_> = (0..13)
        .map(|n| ("unmapped", format!("detail {n}"), format!("eve-{n}")))
        .collect();
    wanted_details.sort();
    assert_eq!(details, wanted_details);
    drop(queue);
    schema.drop().await;
}

#[cfg_attr(not(postgres_tests), ignore = "needs RELAY_TEST_POSTGRES_URL")]
#[tokio::test]
async fn a_webhook_postgres_refuses_fails_alone_and_its_group_neighbours_are_stored() {
    let schema = Schema::fresh().await;
    let queue = Arc::new(schema.queue().await);
    let client = connect(&schema.url).await;
    queue
        .enqueue(webhook("old", T0, vec![track("old", "ann")]))
        .await
        .unwrap();

    // A trigger refuses a record about `poison` (and a quarantine whose detail is `poison`),
    // and with it the group's single statement.
    client
        .batch_execute(
            "CREATE FUNCTION poison() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 IF NEW.subject = 'poison' OR NEW.dead_detail = 'poison' THEN
                     RAISE EXCEPTION 'poisoned record';
                 END IF;
                 RETURN NEW;
             END $$;
             CREATE TRIGGER poison BEFORE INSERT ON records
                 FOR EACH ROW EXECUTE FUNCTION poison();",
        )
        .await
        .unwrap();
    let at = T0 + 1000;
    let mut group: Vec<NewWebhook> = (0..10)
        .map(|n| {
            let body = format!("good-{n}");
            webhook(&body, at + n, vec![track(&body, "ann"), user(&body)])
        })
        .collect();
    group.insert(
        3,
        webhook("poisoned-subject", at, vec![track("nul", "poison")]),
    );
    group.insert(7, quarantined("poisoned-detail", at, "poison", "bob"));
    group.push(webhook(
        "good-0",
        at + 50,
        vec![track("good-0-again", "ann")],
    ));
    group.push(webhook("old", at + 50, vec![track("old-again", "ann")]));
    group.push(quarantined("still-quarantined", at, "detail", "cy"));

    // Every webhook of the group carries the same shape: only those stored may count it.
    let shape = serde_json::json!({"data": {"type": "form"}});
    let group = group
        .into_iter()
        .map(|webhook| records::shaped(webhook, &shape))
        .collect();
    let results = enqueue_together(&queue, group).await;
    let (refused, rest): (Vec<_>, Vec<_>) = results
        .into_iter()
        .enumerate()
        .partition(|(position, _)| *position == 3 || *position == 7);
    for (_, result) in refused {
        match result {
            Err(QueueError::Storage(message)) => assert!(message.contains("poisoned"), "{message}"),
            other => panic!("the poisoned webhook should be refused: {other:?}"),
        }
    }
    let rest: Vec<Enqueued> = rest.into_iter().map(|(_, r)| r.unwrap()).collect();
    let mut wanted = vec![Enqueued::Accepted { events: 1 }; 10];
    wanted.extend([
        Enqueued::Duplicate,
        Enqueued::Duplicate,
        Enqueued::Quarantined,
    ]);
    assert_eq!(rest, wanted);
    // The test's premise: the refused webhooks and their neighbours made one group. Each
    // webhook of the redone group has a savepoint, hence an `xmin`, of its own, but the group
    // went in sorted by digest, unlike the order they arrived in.
    let (inserted, by_digest) = insert_order(&client, at).await;
    assert_eq!(inserted, by_digest, "one group, inserted in digest order");
    let arrived: Vec<String> = (0..10).map(|n| format!("good-{n}")).collect();
    let arrived_good: Vec<&String> = by_digest.iter().filter(|b| b.starts_with("good")).collect();
    assert_ne!(
        arrived_good,
        arrived.iter().collect::<Vec<_>>(),
        "arrival order is not digest order"
    );

    let webhooks = stored_webhooks(&client).await;
    let mut bodies: Vec<&str> = webhooks.keys().map(String::as_str).collect();
    bodies.sort_unstable();
    let mut wanted: Vec<String> = (0..10).map(|n| format!("good-{n}")).collect();
    wanted.extend(["old".to_owned(), "still-quarantined".to_owned()]);
    wanted.sort_unstable();
    assert_eq!(bodies, wanted);
    assert_eq!(webhooks["good-0"], at);
    let records = stored_records(&client).await;
    assert_eq!(records.len(), 1 + 10 * 2 + 1);
    let shapes = queue.shapes(None).await.unwrap();
    assert_eq!(shapes.len(), 1);
    assert_eq!(
        shapes[0].count, 11,
        "the ten good webhooks and the quarantined one; not the refused, not the duplicates"
    );
    assert!(records.iter().all(|(_, key, ..)| !key.ends_with("-again")));

    // Nothing is stuck: sent again with new neighbours, the refused webhook fails alone again,
    // and the queue goes on.
    let results = enqueue_together(
        &queue,
        vec![
            webhook("later-1", at + 2000, vec![track("later-1", "dee")]),
            webhook("poisoned-subject", at + 2000, vec![track("nul", "poison")]),
            webhook("later-2", at + 2000, vec![track("later-2", "dee")]),
        ],
    )
    .await;
    assert_eq!(
        results[0].as_ref().ok(),
        Some(&Enqueued::Accepted { events: 1 })
    );
    assert!(matches!(results[1], Err(QueueError::Storage(_))));
    assert_eq!(
        results[2].as_ref().ok(),
        Some(&Enqueued::Accepted { events: 1 })
    );
    let later = queue
        .enqueue(webhook("later-3", at + 3000, vec![track("later-3", "dee")]))
        .await
        .unwrap();
    assert_eq!(later, Enqueued::Accepted { events: 1 });
    drop(queue);
    schema.drop().await;
}

#[cfg_attr(not(postgres_tests), ignore = "needs RELAY_TEST_POSTGRES_URL")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_enqueuing_the_same_webhooks_in_crossed_order_all_succeed() {
    let schema = Schema::fresh().await;
    let one = Arc::new(schema.queue().await);
    let two = Arc::new(schema.queue().await);

    const ROUNDS: usize = 5;
    const BODIES: usize = 60;
    for round in 0..ROUNDS {
        let webhooks: Vec<NewWebhook> = (0..BODIES)
            .map(|n| {
                let body = format!("round-{round}-{n}");
                webhook(&body, T0, vec![track(&body, "ann"), user(&body)])
            })
            .collect();
        // One replica in order, the other in reverse, all at once: without a common lock
        // order, each would wait for the digests the other has inserted.
        let mut reversed = webhooks.clone();
        reversed.reverse();
        let (forward, backward) = tokio::join!(
            enqueue_together(&one, webhooks),
            enqueue_together(&two, reversed)
        );
        let backward: Vec<_> = backward.into_iter().rev().collect();
        for (n, (a, b)) in forward.into_iter().zip(backward).enumerate() {
            let (a, b) = (a.unwrap(), b.unwrap());
            let mut outcomes = [a, b];
            outcomes.sort_by_key(|outcome| *outcome == Enqueued::Duplicate);
            assert_eq!(
                outcomes,
                [Enqueued::Accepted { events: 1 }, Enqueued::Duplicate],
                "round {round}, webhook {n}: stored by exactly one replica"
            );
        }
    }
    assert_eq!(
        schema.count("SELECT COUNT(*) FROM {schema}.webhooks").await,
        (ROUNDS * BODIES) as i64
    );
    assert_eq!(
        schema.count("SELECT COUNT(*) FROM {schema}.records").await,
        (ROUNDS * BODIES * 2) as i64
    );
    drop((one, two));
    schema.drop().await;
}

#[cfg_attr(not(postgres_tests), ignore = "needs RELAY_TEST_POSTGRES_URL")]
#[tokio::test]
async fn the_same_body_on_two_sources_in_one_group_is_two_webhooks_whichever_way_it_goes_in() {
    let schema = Schema::fresh().await;
    let queue = Arc::new(schema.queue().await);
    let client = connect(&schema.url).await;
    let staging_lane = format!("{}-staging", *LANE);
    let on = |source: &str, lane: &str, body: &str, at: i64, key: &str, subject: &str| {
        records::on(
            source,
            lane,
            records::webhook(body, at, vec![track(key, subject)]),
        )
    };
    let stored = async |since: i64| -> Vec<(String, String, String)> {
        client
            .query(
                "SELECT w.source, r.app_id, r.key FROM webhooks w JOIN records r
                 ON r.webhook_id = w.id WHERE w.received_at >= $1 ORDER BY w.source, r.key",
                &[&since],
            )
            .await
            .unwrap()
            .iter()
            .map(|row| (row.get(0), row.get(1), row.get(2)))
            .collect()
    };
    let row = |source: &str, lane: &str, key: &str| (source.into(), lane.into(), key.into());

    // One statement for the group: (source, digest) decides what is new.
    let results = enqueue_together(
        &queue,
        vec![
            on(DEFAULT_SOURCE, &LANE, "same", T0, "a", "ann"),
            on("staging", &staging_lane, "same", T0, "b", "ann"),
            on("staging", &staging_lane, "same", T0, "c", "ann"),
            on(DEFAULT_SOURCE, &LANE, "same", T0, "d", "ann"),
        ],
    )
    .await;
    let results: Vec<Enqueued> = results.into_iter().map(Result::unwrap).collect();
    let accepted = Enqueued::Accepted { events: 1 };
    assert_eq!(
        results,
        [accepted, accepted, Enqueued::Duplicate, Enqueued::Duplicate]
    );
    assert_eq!(transactions(&client, T0).await, 1, "the premise: one group");
    assert_eq!(
        stored(T0).await,
        [
            row(DEFAULT_SOURCE, &LANE, "a"),
            row("staging", &staging_lane, "b")
        ]
    );

    // A webhook the server refuses sends the group down the savepoint-per-webhook path,
    // which decides the same.
    client
        .batch_execute(
            "CREATE FUNCTION poison() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 IF NEW.subject = 'poison' THEN RAISE EXCEPTION 'poisoned record'; END IF;
                 RETURN NEW;
             END $$;
             CREATE TRIGGER poison BEFORE INSERT ON records
                 FOR EACH ROW EXECUTE FUNCTION poison();",
        )
        .await
        .unwrap();
    let later = T0 + 1000;
    let results = enqueue_together(
        &queue,
        vec![
            on(DEFAULT_SOURCE, &LANE, "second", later, "e", "ann"),
            on("qa", &LANE, "second", later, "f", "ann"),
            on("qa", &LANE, "poisoned", later, "p", "poison"),
            on("qa", &LANE, "second", later, "g", "ann"),
            on("staging", &staging_lane, "same", later, "h", "ann"),
        ],
    )
    .await;
    assert!(matches!(results[2], Err(QueueError::Storage(_))));
    let rest: Vec<Enqueued> = [0, 1, 3, 4]
        .into_iter()
        .map(|at| results[at].as_ref().unwrap().to_owned())
        .collect();
    assert_eq!(
        rest,
        [accepted, accepted, Enqueued::Duplicate, Enqueued::Duplicate]
    );
    assert_eq!(
        stored(later).await,
        [row(DEFAULT_SOURCE, &LANE, "e"), row("qa", &LANE, "f")]
    );
    drop(queue);
    schema.drop().await;
}
