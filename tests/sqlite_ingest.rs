//! The SQLite queue's group commit: webhooks arriving together are committed together, and one
//! whose insert fails (here: a trigger refuses its record) gets the error while every other
//! webhook of its group is stored and accepted.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use bytes::Bytes;
use sha2::{Digest, Sha256};
use userpilot_heap_relay::heap::wire::{HeapRecord, Outbound, RecordKind, UserProperties};
use userpilot_heap_relay::queue::sqlite::SqliteQueue;
use userpilot_heap_relay::queue::{Content, Enqueued, NewWebhook, Queue};

fn webhook(n: usize, subject: &str) -> NewWebhook {
    let body = format!("body {n}");
    NewWebhook {
        digest: Sha256::digest(body.as_bytes()).into(),
        body: Bytes::from(body),
        received_at_ms: 1_700_000_000_000,
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
            "CREATE TRIGGER poison BEFORE INSERT ON records WHEN NEW.subject = 'poison'
             BEGIN SELECT RAISE(ABORT, 'poisoned record'); END;",
        )
        .unwrap();

    // Fifty at once: the queue thread takes whatever is waiting as one group.
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..50 {
        let queue = queue.clone();
        let subject = if n == 25 { "poison" } else { "u" };
        tasks.spawn(async move { (n, queue.enqueue(webhook(n, subject)).await) });
    }
    while let Some(joined) = tasks.join_next().await {
        let (n, result) = joined.unwrap();
        match (n, result) {
            (25, Err(error)) => assert!(error.to_string().contains("poisoned record")),
            (25, Ok(other)) => panic!("the poisoned webhook was {other:?}"),
            (_, result) => assert_eq!(result.unwrap(), Enqueued::Accepted { events: 0 }),
        }
    }
    let claimed = queue
        .claim(RecordKind::User, 100, 1_700_000_000_000, 60_000)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 49);
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
