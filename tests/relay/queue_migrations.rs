//! Queue files and schemas written by an older relay are upgraded at startup, keeping every
//! record, on SQLite and on Postgres (ignored, with the reason, without
//! `RELAY_TEST_POSTGRES_URL`): schema version 1 (a global unique index on record keys) and
//! version 2 (keys unique per webhook, one digest per body) to version 3 (sources and lanes:
//! deduplication per source, a lane per record). The old databases are built with the DDL
//! those versions wrote (copied here, as it stands in git at the version-2 commit), holding
//! records in every state; after the upgrade every record and webhook is there, of source
//! `default` and lane `''`, until `adopt_unassigned` gives them the serving relay's lane.
//!
//! Version 3 to 4 (the `shapes` table, contract §10.4): a version-3 database is a version-4
//! one without that table, so it is made by this code's queue, with records in every state,
//! and taken back to version 3; after the upgrade every record is in its state and shapes
//! are recorded. Version 5 to 6 (SQLite only: webhooks' records packed into their row) and 6 to
//! 7 (SQLite only: pending and dead records' JSON beside their row) are made the same way.

use bytes::Bytes;
use sha2::{Digest, Sha256};
use userpilot_heap_relay::heap::wire::{HeapRecord, Outbound, RecordKind, UserProperties};
use userpilot_heap_relay::queue::postgres::PostgresQueue;
use userpilot_heap_relay::queue::sqlite::SqliteQueue;
use userpilot_heap_relay::queue::{
    Content, DEFAULT_SOURCE, DeadLetterFilter, Enqueued, NewWebhook, Queue,
};

use crate::support::postgres::{Schema, lane as own_lane};
use crate::support::records::{self, APP};

const T0: i64 = 1_700_000_000_000;

/// Takes a SQLite file of this code back to version 6's records: each JSON in its own row, no
/// `record_json` table (an update that leaves `state` alone fires no trigger).
const RECORD_JSON_INTO_ROWS: &str = "
UPDATE records SET json = (SELECT j.json FROM record_json j WHERE j.id = records.id)
    WHERE id IN (SELECT id FROM record_json);
DROP TRIGGER records_delivered_json; DROP TRIGGER records_forget_json; DROP TABLE record_json;
";

/// A SQLite file of this code at `path` holding records in every state ([`fill_every_state`]),
/// taken back to an older version: `RECORD_JSON_INTO_ROWS`, then `older`. The connection is
/// returned for checks of the old file.
async fn every_state_taken_back(path: &std::path::Path, older: &str) -> rusqlite::Connection {
    {
        let queue = SqliteQueue::open(path).unwrap();
        fill_every_state(&queue, APP).await;
    }
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.execute_batch(RECORD_JSON_INTO_ROWS).unwrap();
    conn.execute_batch(older).unwrap();
    conn
}

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

/// A webhook on source `default` in lane `app_id`.
fn new_webhook(body: &'static str, app_id: &str) -> NewWebhook {
    NewWebhook {
        source: DEFAULT_SOURCE.to_owned(),
        app_id: app_id.to_owned(),
        digest: Sha256::digest(body.as_bytes()).into(),
        body: Bytes::from_static(body.as_bytes()),
        received_at_ms: T0,
        content: Content::Records(vec![user("k"), user("k")]),
        shape: None,
    }
}

/// What every queue upgraded from version 1 must show: the old records as they were once
/// adopted by lane `app_id`, the old webhook still deduplicating, and new webhooks going in
/// under the new key rule.
async fn assert_upgraded(queue: &dyn Queue, app_id: &str) {
    let stats = queue.stats(T0).await.unwrap();
    assert_eq!((stats.pending, stats.delivered, stats.dead), (1, 1, 0));
    assert_eq!(queue.adopt_unassigned(app_id).await.unwrap(), 2);
    let claimed = queue
        .claim(app_id, RecordKind::Track, 10, T0, 60_000)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].json, r#"{"event":"x"}"#);

    let mut old = new_webhook("v1 body", app_id);
    old.content = Content::Records(vec![]);
    assert_eq!(queue.enqueue(old).await.unwrap(), Enqueued::Duplicate);
    assert_eq!(
        queue.enqueue(new_webhook("v2 body", app_id)).await.unwrap(),
        Enqueued::Accepted { events: 0 }
    );
    assert_eq!(
        queue
            .claim(app_id, RecordKind::User, 10, T0, 60_000)
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
    assert_upgraded(&queue, APP).await;
    drop(queue);
    assert_eq!(sqlite_version(&path), 7);
}

fn sqlite_version(path: &std::path::Path) -> i64 {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.query_row("PRAGMA user_version", [], |row| row.get(0))
        .unwrap()
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

    let queue = PostgresQueue::connect(&schema.url).await.unwrap();
    assert_upgraded(&queue, &own_lane()).await;
    assert_eq!(
        schema
            .count("SELECT MAX(version)::BIGINT FROM {schema}.schema_version")
            .await,
        5
    );
    drop(queue);
    schema.drop().await;
}

// ---------------------------------------------------------------------------------------------
// Version 2 to version 3: sources and lanes.

/// Version 2's SQLite DDL, as `schema.rs` wrote it at the version-2 commit (states spelled).
const SQLITE_V2: &str = "
PRAGMA journal_mode = WAL;
CREATE TABLE webhooks (
    id          INTEGER PRIMARY KEY,
    digest      BLOB    NOT NULL UNIQUE,
    body        BLOB    NOT NULL,
    received_at INTEGER NOT NULL
);
CREATE INDEX webhooks_received ON webhooks (received_at);
CREATE TABLE heartbeat (id INTEGER PRIMARY KEY CHECK (id = 1), at INTEGER NOT NULL);
CREATE TABLE records (
    id              INTEGER PRIMARY KEY,
    webhook_id      INTEGER NOT NULL,
    key             TEXT    NOT NULL,
    kind            TEXT    NOT NULL,
    subject         TEXT    NOT NULL,
    json            TEXT    NOT NULL,
    state           INTEGER NOT NULL,
    claimed         INTEGER NOT NULL DEFAULT 0,
    attempts        INTEGER NOT NULL DEFAULT 0,
    received_at     INTEGER NOT NULL,
    next_attempt_at INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    last_error      TEXT,
    dead_reason     TEXT,
    dead_detail     TEXT
);
CREATE UNIQUE INDEX records_webhook_key ON records (webhook_id, key);
CREATE INDEX records_due ON records (kind, next_attempt_at) WHERE state = 0;
CREATE INDEX records_done ON records (state, updated_at) WHERE state <> 0;
PRAGMA user_version = 2;
";

/// Version 2's Postgres DDL: migrations 1 and 2 as `schema.rs` applied them at the version-2
/// commit (states spelled), and their `schema_version` rows.
const POSTGRES_V2: &str = "
CREATE TABLE schema_version (
    version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now());
INSERT INTO schema_version (version) VALUES (1), (2);
CREATE TABLE webhooks (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    digest      BYTEA  NOT NULL UNIQUE,
    body        BYTEA  NOT NULL,
    received_at BIGINT NOT NULL
);
CREATE INDEX webhooks_received ON webhooks (received_at);
CREATE TABLE records (
    id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    webhook_id      BIGINT  NOT NULL,
    key             TEXT    NOT NULL UNIQUE,
    kind            TEXT    NOT NULL,
    subject         TEXT    NOT NULL,
    json            TEXT    NOT NULL,
    state           INTEGER NOT NULL,
    claimed         INTEGER NOT NULL DEFAULT 0,
    claimed_by      TEXT,
    attempts        INTEGER NOT NULL DEFAULT 0,
    received_at     BIGINT  NOT NULL,
    next_attempt_at BIGINT  NOT NULL,
    updated_at      BIGINT  NOT NULL,
    last_error      TEXT,
    dead_reason     TEXT,
    dead_detail     TEXT
);
CREATE INDEX records_due ON records (kind, next_attempt_at, id) WHERE state = 0;
CREATE INDEX records_done ON records (state, updated_at) WHERE state <> 0;
CREATE INDEX records_webhook ON records (webhook_id);
CREATE INDEX records_leased ON records (claimed_by) WHERE state = 0 AND claimed = 1;
CREATE TABLE heartbeat (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    at TIMESTAMPTZ NOT NULL
);
CREATE UNIQUE INDEX records_webhook_key ON records (webhook_id, key);
ALTER TABLE records DROP CONSTRAINT IF EXISTS records_key_key;
DROP INDEX IF EXISTS records_webhook;
";

/// Two version-2 webhooks and a record in every state: webhook 1 with a pending record (due
/// at T0), one leased (claimed, until T0 + 60 s, by a replica that is gone), one delivered and
/// one dead after three attempts; webhook 2 quarantined. `{digest1}` and the others are the
/// backend's spelling of the bodies' digests and the bodies.
const V2_RECORDS: &str = "
INSERT INTO webhooks (digest, body, received_at) VALUES
    ({digest1}, {body1}, 1700000000000),
    ({digest2}, {body2}, 1700000000001);
INSERT INTO records (webhook_id, key, kind, subject, json, state, claimed, attempts,
                     received_at, next_attempt_at, updated_at, last_error, dead_reason,
                     dead_detail)
VALUES (1, 'pending', 'track', 'u1', '{\"event\":\"pending\"}', 0, 0, 0,
        1700000000000, 1700000000000, 1700000000000, NULL, NULL, NULL),
       (1, 'leased', 'track', 'u1', '{\"event\":\"leased\"}', 0, 1, 1,
        1700000000000, 1700000060000, 1700000000000, 'heap answered 503', NULL, NULL),
       (1, 'delivered', 'track', 'u1', '', 1, 0, 0,
        1700000000000, 1700000000000, 1700000000500, NULL, NULL, NULL),
       (1, 'dead', 'add_user_properties', 'u1', '{\"identity\":\"u1\"}', 2, 0, 3,
        1700000000000, 1700000000000, 1700000000900, 'heap answered 500', 'rejected',
        'heap answered 400: bad'),
       (2, 'quarantine', 'webhook', 'eve', '', 2, 0, 0,
        1700000000001, 1700000000001, 1700000000001, NULL, 'no_user_id', 'no user id');
";

const V2_BODY_1: &str = "v2 webhook";
const V2_BODY_2: &str = "v2 quarantined";

fn v2_records(spell_bytes: impl Fn(&[u8]) -> String) -> String {
    V2_RECORDS
        .replace("{digest1}", &spell_bytes(&Sha256::digest(V2_BODY_1)))
        .replace("{digest2}", &spell_bytes(&Sha256::digest(V2_BODY_2)))
        .replace("{body1}", &spell_bytes(V2_BODY_1.as_bytes()))
        .replace("{body2}", &spell_bytes(V2_BODY_2.as_bytes()))
}

/// What every queue upgraded from version 2 must show, adopted by lane `app_id`.
async fn assert_upgraded_from_v2(queue: &dyn Queue, app_id: &str) {
    // Every record is there, in its state, with no lane yet.
    let lanes = queue.lane_stats(T0).await.unwrap();
    assert_eq!(lanes.keys().collect::<Vec<_>>(), [""], "{lanes:?}");
    let old = lanes[""];
    assert_eq!(
        (old.pending, old.in_flight, old.delivered, old.dead),
        (1, 1, 1, 2)
    );
    assert_eq!(old.oldest_pending_received_at_ms, Some(T0));
    assert!(
        queue
            .claim(app_id, RecordKind::Track, 10, T0 + 120_000, 60_000)
            .await
            .unwrap()
            .is_empty(),
        "no lane's before adoption"
    );

    // The dead letters, and the webhooks behind them, are of source `default`, lane ''.
    let letters = queue
        .dead_letters(DeadLetterFilter::default())
        .await
        .unwrap();
    let seen: Vec<_> = letters
        .iter()
        .map(|l| {
            (
                l.source.as_str(),
                l.app_id.as_str(),
                l.kind.as_str(),
                l.reason.as_str(),
                l.detail.as_str(),
                l.attempts,
                l.dead_at_ms,
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            (
                DEFAULT_SOURCE,
                "",
                "add_user_properties",
                "rejected",
                "heap answered 400: bad",
                3,
                T0 + 900
            ),
            (
                DEFAULT_SOURCE,
                "",
                "webhook",
                "no_user_id",
                "no user id",
                0,
                T0 + 1
            ),
        ]
    );
    let detail = queue
        .dead_letter_detail(letters[0].id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(detail.json, r#"{"identity":"u1"}"#);
    assert_eq!(detail.last_error.as_deref(), Some("heap answered 500"));
    assert_eq!(&detail.body[..], V2_BODY_1.as_bytes());
    let by_source = DeadLetterFilter {
        source: Some(DEFAULT_SOURCE.to_owned()),
        ..DeadLetterFilter::default()
    };
    let items = queue.replay_items(by_source, 10).await.unwrap();
    let webhooks: Vec<_> = items
        .iter()
        .map(|item| (item.source.as_str(), &item.body[..], item.received_at_ms))
        .collect();
    assert_eq!(
        webhooks,
        [
            (DEFAULT_SOURCE, V2_BODY_1.as_bytes(), T0),
            (DEFAULT_SOURCE, V2_BODY_2.as_bytes(), T0 + 1)
        ]
    );

    // Adopted: every record, once, into the serving relay's lane.
    assert_eq!(queue.adopt_unassigned(app_id).await.unwrap(), 5);
    assert_eq!(queue.adopt_unassigned(app_id).await.unwrap(), 0);
    let lanes = queue.lane_stats(T0).await.unwrap();
    assert_eq!(lanes.keys().collect::<Vec<_>>(), [app_id]);
    assert_eq!(lanes[app_id], old, "the same records, in the same states");
    let due = queue
        .claim(app_id, RecordKind::Track, 10, T0, 60_000)
        .await
        .unwrap();
    assert_eq!(
        due.iter().map(|c| c.json.as_str()).collect::<Vec<_>>(),
        [r#"{"event":"pending"}"#],
        "the leased one is not due before its lease ends"
    );
    queue
        .ack(due.iter().map(|c| c.id).collect(), T0 + 100)
        .await
        .unwrap();
    let expired = queue
        .claim(app_id, RecordKind::Track, 10, T0 + 60_000, 60_000)
        .await
        .unwrap();
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0].json, r#"{"event":"leased"}"#);
    assert_eq!(expired[0].attempts, 1);
    assert_eq!(
        expired[0].webhook_digest,
        <[u8; 32]>::from(Sha256::digest(V2_BODY_1))
    );
    assert_eq!(
        queue
            .delivered_since(app_id, RecordKind::Track, T0)
            .await
            .unwrap(),
        2,
        "the one delivered before the upgrade and the one after"
    );

    // An old webhook is still recognised, on source `default` only.
    for body in [V2_BODY_1, V2_BODY_2] {
        let again = new_webhook(body, app_id);
        assert_eq!(
            queue.enqueue(again).await.unwrap(),
            Enqueued::Duplicate,
            "{body}"
        );
    }
    let elsewhere = records::on("staging", app_id, new_webhook(V2_BODY_1, app_id));
    assert_eq!(
        queue.enqueue(elsewhere).await.unwrap(),
        Enqueued::Accepted { events: 0 }
    );
    assert_eq!(
        queue
            .claim(app_id, RecordKind::User, 10, T0, 60_000)
            .await
            .unwrap()
            .len(),
        1,
        "the staging webhook's record"
    );
}

#[tokio::test]
async fn a_version_2_sqlite_file_is_upgraded_keeping_every_record_and_webhook() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("queue.sqlite3");
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(SQLITE_V2).unwrap();
        conn.execute_batch(&v2_records(|bytes| format!("X'{}'", hex::encode(bytes))))
            .unwrap();
    }

    let queue = SqliteQueue::open(&path).unwrap();
    assert_eq!(sqlite_version(&path), 7);
    assert_upgraded_from_v2(&queue, APP).await;
    drop(queue);

    // The new layout: per-source deduplication (through the `digests` table since version
    // 6), lane-led indexes, no digest-only index left.
    let conn = rusqlite::Connection::open(&path).unwrap();
    let indexes: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'index' ORDER BY name")
        .unwrap()
        .query_map([], |row| row.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        indexes,
        [
            "erasures_due",
            "records_delivered",
            "records_done",
            "records_due",
            "records_unassigned",
            "records_webhook_key",
            "webhooks_packed",
            "webhooks_received",
        ]
    );
    let due: String = conn
        .query_row(
            "SELECT sql FROM sqlite_master WHERE name = 'records_due'",
            [],
            |row| row.get(0),
        )
        .unwrap();
    assert!(due.contains("(app_id, kind, next_attempt_at)"), "{due}");
}

#[tokio::test]
async fn a_failed_upgrade_leaves_the_version_2_file_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("queue.sqlite3");
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(SQLITE_V2).unwrap();
        conn.execute_batch(&v2_records(|bytes| format!("X'{}'", hex::encode(bytes))))
            .unwrap();
        // A table in the way of the migration's rebuild: it fails half-way.
        conn.execute_batch(
            "CREATE TABLE webhooks_v3 (x INTEGER); INSERT INTO webhooks_v3 VALUES (1);",
        )
        .unwrap();
    }
    assert!(SqliteQueue::open(&path).is_err());

    let conn = rusqlite::Connection::open(&path).unwrap();
    assert_eq!(sqlite_version(&path), 2);
    let columns: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM pragma_table_info('records') WHERE name = 'app_id'",
            [],
            |row| row.get(0),
        )
        .unwrap();
    assert_eq!(columns, 0, "the records table is version 2's, untouched");
    let counts: (i64, i64) = conn
        .query_row(
            "SELECT (SELECT COUNT(*) FROM webhooks), (SELECT COUNT(*) FROM records)",
            [],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .unwrap();
    assert_eq!(counts, (2, 5));
}

#[cfg_attr(not(postgres_tests), ignore = "needs RELAY_TEST_POSTGRES_URL")]
#[tokio::test]
async fn a_version_2_postgres_schema_is_upgraded_keeping_every_record_and_webhook() {
    let schema = Schema::fresh().await;
    let admin = crate::support::postgres::connect(&schema.url).await;
    admin.batch_execute(POSTGRES_V2).await.unwrap();
    admin
        .batch_execute(&v2_records(|bytes| {
            format!("'\\x{}'::bytea", hex::encode(bytes))
        }))
        .await
        .unwrap();
    // The leased record's replica is gone (no session by that name).
    admin
        .batch_execute(
            "UPDATE records SET claimed_by = 'userpilot-heap-relay/gone' WHERE claimed = 1",
        )
        .await
        .unwrap();

    let queue = PostgresQueue::connect(&schema.url).await.unwrap();
    assert_eq!(
        schema
            .count("SELECT MAX(version)::BIGINT FROM {schema}.schema_version")
            .await,
        5
    );
    assert_upgraded_from_v2(&queue, &own_lane()).await;
    // The new layout: lane-led indexes, per-source deduplication.
    let index = |name: &'static str| {
        let admin = &admin;
        async move {
            let row = admin
                .query_opt(
                    "SELECT indexdef FROM pg_indexes
                     WHERE schemaname = current_schema() AND indexname = $1",
                    &[&name],
                )
                .await
                .unwrap();
            row.map(|row| row.get::<_, String>(0)).unwrap_or_default()
        }
    };
    let due = index("records_due").await;
    assert!(due.contains("(app_id, kind, next_attempt_at, id)"), "{due}");
    let delivered = index("records_delivered").await;
    assert!(
        delivered.contains("(app_id, kind, updated_at)"),
        "{delivered}"
    );
    let dedup = index("webhooks_source_digest").await;
    assert!(
        dedup.contains("UNIQUE") && dedup.contains("(source, digest)"),
        "{dedup}"
    );
    assert_eq!(
        schema
            .count(
                "SELECT COUNT(*) FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace
                 WHERE n.nspname = '{schema}' AND c.conname = 'webhooks_digest_key'"
            )
            .await,
        0,
        "the digest-only constraint is gone"
    );
    drop(queue);
    schema.drop().await;
}

/// Webhooks and records in every state, stored through `queue` in lane `app_id`: one track
/// record each delivered, pending (retried), in flight (leased) and dead (refused), and a
/// quarantined webhook.
async fn fill_every_state(queue: &dyn Queue, app_id: &str) {
    let tracks = ["delivered", "retried", "leased", "refused"]
        .map(|key| records::track(key, "u1"))
        .to_vec();
    let webhook = records::on(
        DEFAULT_SOURCE,
        app_id,
        records::webhook("v3 webhook", T0, tracks),
    );
    assert_eq!(
        queue.enqueue(webhook).await.unwrap(),
        Enqueued::Accepted { events: 4 }
    );
    let quarantined = records::quarantined("v3 quarantined", T0, "no_kind", "no kind", "");
    let quarantined = records::on(DEFAULT_SOURCE, app_id, quarantined);
    assert_eq!(
        queue.enqueue(quarantined).await.unwrap(),
        Enqueued::Quarantined
    );
    let claimed = queue
        .claim(app_id, RecordKind::Track, 10, T0, 60_000)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 4);
    let id = |key: &str| {
        claimed
            .iter()
            .find(|c| c.json.contains(&format!("\"{key}\"")))
            .map(|c| c.id)
            .unwrap()
    };
    queue.ack(vec![id("delivered")], T0 + 1).await.unwrap();
    queue
        .retry_at(
            vec![id("retried")],
            T0 + 10,
            true,
            "heap answered 500".into(),
        )
        .await
        .unwrap();
    queue
        .dead_letter(
            vec![id("refused")],
            "rejected".into(),
            "heap answered 400".into(),
            true,
            T0 + 2,
        )
        .await
        .unwrap();
}

/// What a queue upgraded from version 3 must show: every record in its state, the old webhooks
/// still deduplicated, and shapes recorded from now on.
async fn assert_upgraded_from_v3(queue: &dyn Queue, app_id: &str) {
    let stats = queue.lane_stats(T0).await.unwrap()[app_id];
    assert_eq!(
        (stats.pending, stats.in_flight, stats.delivered, stats.dead),
        (1, 1, 1, 2),
        "{stats:?}"
    );
    let reasons: Vec<String> = queue
        .dead_letters(DeadLetterFilter::default())
        .await
        .unwrap()
        .into_iter()
        .map(|letter| letter.reason)
        .collect();
    assert_eq!(reasons, ["rejected", "no_kind"]);
    let again = records::on(
        DEFAULT_SOURCE,
        app_id,
        records::webhook("v3 webhook", T0, vec![]),
    );
    assert_eq!(queue.enqueue(again).await.unwrap(), Enqueued::Duplicate);
    assert!(queue.shapes(None).await.unwrap().is_empty());

    let payload = serde_json::json!({"data": {"type": "form"}});
    let shape = userpilot_heap_relay::shapes::of(&payload, None, None);
    let mut shaped = records::on(
        DEFAULT_SOURCE,
        app_id,
        records::webhook("v4 webhook", T0 + 5, vec![]),
    );
    shaped.shape = Some(userpilot_heap_relay::shapes::ShapeObservation {
        key: shape.key(DEFAULT_SOURCE),
        kind: None,
        action: None,
        paths: shape.paths.clone(),
        sample: None,
    });
    queue.enqueue(shaped).await.unwrap();
    let listed = queue.shapes(None).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!((listed[0].count, listed[0].paths.clone()), (1, shape.paths));
}

#[tokio::test]
async fn a_version_3_sqlite_file_is_upgraded_keeping_every_record_in_its_state() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("queue.sqlite3");
    let older = "DROP TABLE shapes; DROP TABLE erasures; PRAGMA user_version = 3;";
    drop(every_state_taken_back(&path, older).await);
    assert_eq!(sqlite_version(&path), 3);

    let queue = SqliteQueue::open(&path).unwrap();
    assert_upgraded_from_v3(&queue, APP).await;
    drop(queue);
    assert_eq!(sqlite_version(&path), 7);
}

/// Version 5 to 6 (records packed into their webhook's row, digests looked up by their first
/// 8 bytes): a version-5 file is this code's file without the four new columns, the
/// `counters` and `digests` tables, and with
/// version 5's unique `(source, digest)` index instead of the prefix index, so it is made by
/// this code's queue, with records in every state (as rows: the claim unpacked them), and
/// taken back to version 5.
#[tokio::test]
async fn a_version_5_sqlite_file_is_upgraded_keeping_every_record_in_its_state() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("queue.sqlite3");
    {
        let conn = every_state_taken_back(
            &path,
            "DROP TABLE shapes; CREATE TABLE shapes (key BLOB PRIMARY KEY, source TEXT NOT NULL,
                 kind TEXT, action TEXT, paths TEXT NOT NULL, count INTEGER NOT NULL,
                 first_seen INTEGER NOT NULL, last_seen INTEGER NOT NULL, sample TEXT)
                 WITHOUT ROWID;
             DROP INDEX webhooks_packed; DROP TRIGGER webhooks_forget; DROP TABLE digests;
             ALTER TABLE webhooks DROP COLUMN packed_kinds;
             ALTER TABLE webhooks DROP COLUMN packed_count;
             ALTER TABLE webhooks DROP COLUMN packed;
             ALTER TABLE webhooks DROP COLUMN app_id;
             DROP TABLE counters;
             CREATE UNIQUE INDEX webhooks_source_digest ON webhooks (source, digest);
             PRAGMA user_version = 5;",
        )
        .await;
        let columns: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM pragma_table_info('webhooks')",
                [],
                |row| row.get(0),
            )
            .unwrap();
        assert_eq!(columns, 5, "version 5's webhooks table");
    }

    let queue = SqliteQueue::open(&path).unwrap();
    assert_upgraded_from_v3(&queue, APP).await;
    // New webhooks are packed beside the old rows, counted with them and claimed after the
    // old due one (the retried record, due at T0 + 10).
    let fresh = records::on(
        DEFAULT_SOURCE,
        APP,
        records::webhook("v6 webhook", T0 + 20, vec![records::track("new", "u2")]),
    );
    assert_eq!(
        queue.enqueue(fresh).await.unwrap(),
        Enqueued::Accepted { events: 1 }
    );
    assert_eq!(queue.lane_stats(T0).await.unwrap()[APP].pending, 2);
    let claimed = queue
        .claim(APP, RecordKind::Track, 10, T0 + 30_000, 60_000)
        .await
        .unwrap();
    let keys: Vec<bool> = claimed.iter().map(|c| c.json.contains("\"new\"")).collect();
    assert_eq!(
        keys,
        [false, true],
        "the old retried record first, then the new one"
    );
    assert!(
        claimed[1].id > claimed[0].id,
        "new records take ids above the old ones: {claimed:?}"
    );
    drop(queue);
    assert_eq!(sqlite_version(&path), 7);
    let conn = rusqlite::Connection::open(&path).unwrap();
    let index = |name: &str| -> i64 {
        conn.query_row(
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'index' AND name = ?1",
            [name],
            |row| row.get(0),
        )
        .unwrap()
    };
    assert_eq!(
        (index("webhooks_source_digest"), index("webhooks_packed")),
        (0, 1)
    );
    let (webhooks, digests): (i64, i64) = conn
        .query_row(
            "SELECT (SELECT COUNT(*) FROM webhooks), (SELECT COUNT(*) FROM digests)",
            [],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .unwrap();
    assert_eq!(webhooks, 4, "two stored before the upgrade, two after");
    assert_eq!(
        digests, 2,
        "the old ones' digests, filled by the migration; the new ones' are still in memory"
    );
}

/// Version 6 to 7 (the JSON of pending and dead records in `record_json`): a version-6 file is
/// this code's file with each JSON in its record's row and no `record_json`.
#[tokio::test]
async fn a_version_6_sqlite_file_is_upgraded_keeping_every_records_json() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("queue.sqlite3");
    {
        let conn = every_state_taken_back(&path, "PRAGMA user_version = 6;").await;
        let in_rows: i64 = conn
            .query_row("SELECT COUNT(*) FROM records WHERE json <> ''", [], |row| {
                row.get(0)
            })
            .unwrap();
        assert_eq!(in_rows, 3, "the retried, leased and refused records' JSON");
    }

    let queue = SqliteQueue::open(&path).unwrap();
    assert_upgraded_from_v3(&queue, APP).await;
    let fresh = records::on(
        DEFAULT_SOURCE,
        APP,
        records::webhook("v7 webhook", T0 + 20, vec![records::track("new", "u2")]),
    );
    queue.enqueue(fresh).await.unwrap();
    // The old retried and leased records read their JSON from their rows, the new one from
    // `record_json`; delivering them leaves `record_json` empty.
    let claimed = queue
        .claim(APP, RecordKind::Track, 10, T0 + 120_000, 60_000)
        .await
        .unwrap();
    let jsons: Vec<bool> = ["retried", "leased", "new"]
        .iter()
        .map(|key| {
            claimed
                .iter()
                .any(|c| c.json.contains(&format!("\"{key}\"")))
        })
        .collect();
    assert_eq!(jsons, [true, true, true], "{claimed:?}");
    queue
        .ack(claimed.iter().map(|c| c.id).collect(), T0 + 120_001)
        .await
        .unwrap();
    let refused = queue
        .dead_letters(DeadLetterFilter::default())
        .await
        .unwrap()[0]
        .id;
    let detail = queue.dead_letter_detail(refused).await.unwrap().unwrap();
    assert!(detail.json.contains("\"refused\""), "{}", detail.json);
    drop(queue);
    assert_eq!(sqlite_version(&path), 7);
    let conn = rusqlite::Connection::open(&path).unwrap();
    let beside: i64 = conn
        .query_row("SELECT COUNT(*) FROM record_json", [], |row| row.get(0))
        .unwrap();
    assert_eq!(beside, 0, "a delivered record keeps no JSON");
}

#[cfg_attr(not(postgres_tests), ignore = "needs RELAY_TEST_POSTGRES_URL")]
#[tokio::test]
async fn a_version_3_postgres_schema_is_upgraded_keeping_every_record_in_its_state() {
    let schema = Schema::fresh().await;
    let app_id = own_lane();
    {
        let queue = schema.queue().await;
        fill_every_state(&queue, &app_id).await;
    }
    let admin = crate::support::postgres::connect(&schema.url).await;
    admin
        .batch_execute(
            "DROP TABLE shapes, erasures; DELETE FROM schema_version WHERE version >= 4;",
        )
        .await
        .unwrap();

    let queue = PostgresQueue::connect(&schema.url).await.unwrap();
    assert_eq!(
        schema
            .count("SELECT MAX(version)::BIGINT FROM {schema}.schema_version")
            .await,
        5
    );
    assert_upgraded_from_v3(&queue, &app_id).await;
    drop(queue);
    schema.drop().await;
}
