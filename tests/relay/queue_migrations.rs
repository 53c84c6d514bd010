//! Queue files and schemas written by an older relay are upgraded at startup, keeping every
//! record: schema version 1 (a global unique index on record keys) to version 2 (keys unique
//! per webhook), on SQLite and on Postgres (ignored, with the reason, without
//! `RELAY_TEST_POSTGRES_URL`).

use bytes::Bytes;
use sha2::{Digest, Sha256};
use userpilot_heap_relay::heap::wire::{HeapRecord, Outbound, RecordKind, UserProperties};
use userpilot_heap_relay::queue::postgres::PostgresQueue;
use userpilot_heap_relay::queue::sqlite::SqliteQueue;
use userpilot_heap_relay::queue::{Content, Enqueued, NewWebhook, Queue};

use crate::support::postgres::Schema;

const T0: i64 = 1_700_000_000_000;

/// The records of one version-1 webhook: `delivered` (sent before the upgrade) and `pending`.
const V1_RECORDS: &str = "
INSERT INTO webhooks (digest, body, received_at) VALUES ({digest}, {body}, 1700000000000);
INSERT INTO records (webhook_id, key, kind, subject, json, state, received_at, next_attempt_at,
                     updated_at)
VALUES (1, 'delivered', 'track', 'u1', '', 1, 1700000000000, 1700000000000, 1700000000000),
       (1, 'pending', 'track', 'u1', '{\"event\":\"x\"}', 0, 1700000000000, 1700000000000,
        1700000000000);
";

fn user(key: &str) -> Outbound {
    Outbound {
        key: key.to_owned(),
        record: HeapRecord::User(UserProperties {
            identity: "u1".to_owned(),
            properties: Default::default(),
        }),
    }
}

fn new_webhook(body: &'static str) -> NewWebhook {
    NewWebhook {
        digest: Sha256::digest(body.as_bytes()).into(),
        body: Bytes::from_static(body.as_bytes()),
        received_at_ms: T0,
        content: Content::Records(vec![user("k"), user("k")]),
    }
}

/// What every upgraded queue must show: the old records as they were, the old webhook still
/// deduplicating, and new webhooks going in under the new key rule.
async fn assert_upgraded(queue: &dyn Queue) {
    let stats = queue.stats(T0).await.unwrap();
    assert_eq!((stats.pending, stats.delivered, stats.dead), (1, 1, 0));
    let claimed = queue
        .claim(RecordKind::Track, 10, T0, 60_000)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].json, r#"{"event":"x"}"#);

    let mut old = new_webhook("v1 body");
    old.content = Content::Records(vec![]);
    assert_eq!(queue.enqueue(old).await.unwrap(), Enqueued::Duplicate);
    assert_eq!(
        queue.enqueue(new_webhook("v2 body")).await.unwrap(),
        Enqueued::Accepted { events: 0 }
    );
    assert_eq!(
        queue
            .claim(RecordKind::User, 10, T0, 60_000)
            .await
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test]
async fn a_version_1_sqlite_file_is_upgraded_keeping_its_records() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("queue.sqlite3");
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             CREATE TABLE webhooks (
                 id INTEGER PRIMARY KEY, digest BLOB NOT NULL UNIQUE, body BLOB NOT NULL,
                 received_at INTEGER NOT NULL);
             CREATE TABLE records (
                 id INTEGER PRIMARY KEY, webhook_id INTEGER NOT NULL,
                 key TEXT NOT NULL UNIQUE, kind TEXT NOT NULL, subject TEXT NOT NULL,
                 json TEXT NOT NULL, state INTEGER NOT NULL, claimed INTEGER NOT NULL DEFAULT 0,
                 attempts INTEGER NOT NULL DEFAULT 0, received_at INTEGER NOT NULL,
                 next_attempt_at INTEGER NOT NULL, updated_at INTEGER NOT NULL,
                 last_error TEXT, dead_reason TEXT, dead_detail TEXT);
             CREATE INDEX records_due ON records (kind, next_attempt_at) WHERE state = 0;
             CREATE INDEX records_done ON records (state, updated_at) WHERE state <> 0;
             CREATE INDEX records_webhook ON records (webhook_id);
             CREATE INDEX webhooks_received ON webhooks (received_at);
             CREATE TABLE heartbeat (id INTEGER PRIMARY KEY CHECK (id = 1), at INTEGER NOT NULL);
             PRAGMA user_version = 1;",
        )
        .unwrap();
        let digest = hex::encode(Sha256::digest(b"v1 body"));
        conn.execute_batch(
            &V1_RECORDS
                .replace("{digest}", &format!("X'{digest}'"))
                .replace("{body}", "X'00'"),
        )
        .unwrap();
    }

    let queue = SqliteQueue::open(&path).unwrap();
    assert_upgraded(&queue).await;
    drop(queue);

    let conn = rusqlite::Connection::open(&path).unwrap();
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |row| row.get(0))
        .unwrap();
    assert_eq!(version, 2);
}

#[cfg_attr(not(postgres_tests), ignore = "needs RELAY_TEST_POSTGRES_URL")]
#[tokio::test]
async fn a_version_1_postgres_schema_is_upgraded_keeping_its_records() {
    let schema = Schema::fresh().await;
    let admin = crate::support::postgres::connect(&schema.url).await;
    admin
        .batch_execute(
            "CREATE TABLE schema_version (
                 version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now());
             INSERT INTO schema_version (version) VALUES (1);
             CREATE TABLE webhooks (
                 id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                 digest BYTEA NOT NULL UNIQUE, body BYTEA NOT NULL, received_at BIGINT NOT NULL);
             CREATE INDEX webhooks_received ON webhooks (received_at);
             CREATE TABLE records (
                 id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, webhook_id BIGINT NOT NULL,
                 key TEXT NOT NULL UNIQUE, kind TEXT NOT NULL, subject TEXT NOT NULL,
                 json TEXT NOT NULL, state INTEGER NOT NULL, claimed INTEGER NOT NULL DEFAULT 0,
                 claimed_by TEXT, attempts INTEGER NOT NULL DEFAULT 0,
                 received_at BIGINT NOT NULL, next_attempt_at BIGINT NOT NULL,
                 updated_at BIGINT NOT NULL, last_error TEXT, dead_reason TEXT,
                 dead_detail TEXT);
             CREATE INDEX records_due ON records (kind, next_attempt_at, id) WHERE state = 0;
             CREATE INDEX records_done ON records (state, updated_at) WHERE state <> 0;
             CREATE INDEX records_webhook ON records (webhook_id);
             CREATE INDEX records_leased ON records (claimed_by) WHERE state = 0 AND claimed = 1;
             CREATE TABLE heartbeat (id INTEGER PRIMARY KEY CHECK (id = 1),
                                     at TIMESTAMPTZ NOT NULL);",
        )
        .await
        .unwrap();
    let digest = hex::encode(Sha256::digest(b"v1 body"));
    admin
        .batch_execute(
            &V1_RECORDS
                .replace("{digest}", &format!("'\\x{digest}'::bytea"))
                .replace("{body}", "'\\x00'::bytea"),
        )
        .await
        .unwrap();

    let queue = PostgresQueue::connect(&schema.url, fastrand::i64(..))
        .await
        .unwrap();
    assert_upgraded(&queue).await;
    assert_eq!(
        schema
            .count("SELECT MAX(version)::BIGINT FROM {schema}.schema_version")
            .await,
        2
    );
    drop(queue);
    schema.drop().await;
}
