//! The SQLite queue's single writer: webhooks arriving together are committed together, and one
//! whose insert fails (here: a trigger refuses its row) gets the error while every other
//! webhook of its group is stored and accepted; large claims and acks that end their
//! transactions early to let waiting webhooks in still cover every record.

use std::sync::Arc;

use bytes::Bytes;
use serde_json::json;
use sha2::{Digest, Sha256};
use userpilot_heap_relay::heap::wire::{HeapRecord, Outbound, RecordKind, UserProperties};
use userpilot_heap_relay::queue::sqlite::SqliteQueue;
use userpilot_heap_relay::queue::{Content, Enqueued, NewWebhook, Queue};

fn webhook(n: usize, subject: &str) -> NewWebhook {
    let body = format!("body {n}");
    NewWebhook {
        source: userpilot_heap_relay::queue::DEFAULT_SOURCE.to_owned(),
        app_id: crate::support::APP_ID.to_owned(),
        digest: Sha256::digest(body.as_bytes()).into(),
        body: Bytes::from(body),
        received_at_ms: 1_700_000_000_000,
        shape: None,
        content: Content::Records(vec![Outbound {
            key: format!("key {n}"),
            record: HeapRecord::User(UserProperties {
                identity: subject.to_owned(),
                properties: Default::default(),
            }),
        }]),
    }
}

#[tokio::test]
async fn a_failing_webhook_does_not_take_its_group_down() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("queue.sqlite3");
    let queue = Arc::new(SqliteQueue::open(&path).unwrap());
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute_batch(
            "CREATE TRIGGER poison BEFORE INSERT ON webhooks
             WHEN NEW.body = CAST('body 25' AS BLOB)
             BEGIN SELECT RAISE(ABORT, 'poisoned webhook'); END;",
        )
        .unwrap();

    // Fifty at once: the queue thread takes whatever is waiting as one group.
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..50 {
        let queue = queue.clone();
        let subject = if n == 25 { "poison" } else { "u" };
        // Each with the same shape: only the stored ones may count it.
        let shaped = crate::support::records::shaped(webhook(n, subject), &json!({"n": "x"}));
        tasks.spawn(async move { (n, queue.enqueue(shaped).await) });
    }
    while let Some(joined) = tasks.join_next().await {
        let (n, result) = joined.unwrap();
        match (n, result) {
            (25, Err(error)) => assert!(error.to_string().contains("poisoned webhook")),
            (25, Ok(other)) => panic!("the poisoned webhook was {other:?}"),
            (_, result) => assert_eq!(result.unwrap(), Enqueued::Accepted { events: 0 }),
        }
    }
    let claimed = queue
        .claim(
            crate::support::APP_ID,
            RecordKind::User,
            100,
            1_700_000_000_000,
            60_000,
        )
        .await
        .unwrap();
    assert_eq!(claimed.len(), 49);
    let shapes = queue.shapes(None).await.unwrap();
    assert_eq!(
        (shapes.len(), shapes[0].count),
        (1, 49),
        "the refused webhook's savepoint took its shape with it"
    );
    assert!(claimed.iter().all(|record| record.subject == "u"));
    // The failed webhook left nothing behind: a redelivery is new, not a duplicate.
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute_batch("DROP TRIGGER poison")
        .unwrap();
    assert_eq!(
        queue.enqueue(webhook(25, "u")).await.unwrap(),
        Enqueued::Accepted { events: 0 }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_claims_and_acks_cut_short_by_waiting_webhooks_still_cover_every_record() {
    let dir = tempfile::tempdir().unwrap();
    let queue = Arc::new(SqliteQueue::open(&dir.path().join("queue.sqlite3")).unwrap());
    let at = 1_700_000_000_000;
    for n in 0..2000 {
        queue.enqueue(webhook(n, "u")).await.unwrap();
    }
    // Webhooks keep arriving (due later) while the forwarder claims and acks: its
    // transactions end early to let them in, and go on where they stopped.
    let arrivals = {
        let queue = queue.clone();
        tokio::spawn(async move {
            for n in 2000..2400 {
                let mut later = webhook(n, "later");
                later.received_at_ms = at + 10_000;
                queue.enqueue(later).await.unwrap();
            }
        })
    };
    let claimed = queue
        .claim(
            crate::support::APP_ID,
            RecordKind::User,
            5000,
            at + 5000,
            60_000,
        )
        .await
        .unwrap();
    let ids: Vec<i64> = claimed.iter().map(|record| record.id).collect();
    assert_eq!(claimed.len(), 2000);
    assert!(ids.windows(2).all(|pair| pair[0] < pair[1]), "oldest first");
    queue.ack(ids, at + 5001).await.unwrap();
    arrivals.await.unwrap();
    let stats = queue.stats(at + 5001).await.unwrap();
    assert_eq!(
        (stats.delivered, stats.pending, stats.in_flight),
        (2000, 400, 0)
    );
}
