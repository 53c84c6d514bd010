//! The Postgres schema: its DDL, one migration per version, and [`migrate`], which applies
//! them once under an advisory lock whatever the number of replicas starting together. The
//! stored formats written here are durable: change them only with a new migration.

use deadpool_postgres::Pool;

use super::{QueueError, storage, unavailable};
use crate::queue::spell_states;

/// The schema version this code writes (table `schema_version`). Add a migration to bump it.
const SCHEMA_VERSION: i32 = 5;

/// `pg_advisory_xact_lock` key serializing migrations ("relaymig").
const MIGRATION_LOCK: i64 = 0x7265_6c61_796d_6967;

/// Version 1. Mirrors the SQLite schema, plus `claimed_by` (which replica holds the lease).
/// Migrations are templates: `{pending}` and the others are [`crate::queue::RecordState`]'s
/// integers, spelled by [`spell_states`] when applied.
const SCHEMA_V1: &str = "
CREATE TABLE IF NOT EXISTS webhooks (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    digest      BYTEA  NOT NULL UNIQUE,  -- SHA-256 of the verified body
    body        BYTEA  NOT NULL,         -- the verified body, for replay
    received_at BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS webhooks_received ON webhooks (received_at);
CREATE TABLE IF NOT EXISTS records (
    id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    webhook_id      BIGINT  NOT NULL,
    key             TEXT    NOT NULL UNIQUE,  -- idempotency key (track) or kind:digest
    kind            TEXT    NOT NULL,         -- RecordKind::as_str() or 'webhook' (quarantine)
    subject         TEXT    NOT NULL,         -- identity or account id
    json            TEXT    NOT NULL,         -- element of Heap's bulk array; '' once delivered
    state           INTEGER NOT NULL,         -- {pending} pending, {delivered} delivered, {dead} dead
    claimed         INTEGER NOT NULL DEFAULT 0,
    claimed_by      TEXT,                     -- application_name of the claiming replica
    attempts        INTEGER NOT NULL DEFAULT 0,
    received_at     BIGINT  NOT NULL,
    next_attempt_at BIGINT  NOT NULL,         -- due time, or the lease's end while claimed
    updated_at      BIGINT  NOT NULL,         -- delivered / dead since
    last_error      TEXT,
    dead_reason     TEXT,
    dead_detail     TEXT
);
CREATE INDEX IF NOT EXISTS records_due ON records (kind, next_attempt_at, id) WHERE state = {pending};
CREATE INDEX IF NOT EXISTS records_done ON records (state, updated_at) WHERE state <> {pending};
CREATE INDEX IF NOT EXISTS records_webhook ON records (webhook_id);
CREATE INDEX IF NOT EXISTS records_leased ON records (claimed_by) WHERE state = {pending} AND claimed = 1;
CREATE TABLE IF NOT EXISTS heartbeat (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    at TIMESTAMPTZ NOT NULL
);
";

/// Version 2: a record key is unique within its webhook instead of globally. Keys derive from
/// the webhook's digest, unique already; `(webhook_id, key)` grows at its right edge, where the
/// global index took two random b-tree inserts per webhook. Replay relies on it to skip the
/// records a webhook still has.
const SCHEMA_V2: &str = "
CREATE UNIQUE INDEX IF NOT EXISTS records_webhook_key ON records (webhook_id, key);
ALTER TABLE records DROP CONSTRAINT IF EXISTS records_key_key;
DROP INDEX IF EXISTS records_webhook;
";

/// Version 3: sources and lanes. A webhook belongs to the source it was posted to and is
/// deduplicated per source (`(source, digest)` instead of `digest`); a record belongs to the
/// lane of its Heap app id, and the due index leads with it, so a lane's claims and due times
/// read its own range only. `records_delivered` does the same for the rate budget's count of
/// deliveries. Records from before get the lane `''` until the serving relay adopts them
/// (`records_unassigned`, empty once they are, keeps that cheap at every start). Columns
/// with a constant default: Postgres rewrites no row.
const SCHEMA_V3: &str = "
ALTER TABLE webhooks ADD COLUMN IF NOT EXISTS source TEXT NOT NULL DEFAULT 'default';
CREATE UNIQUE INDEX IF NOT EXISTS webhooks_source_digest ON webhooks (source, digest);
ALTER TABLE webhooks DROP CONSTRAINT IF EXISTS webhooks_digest_key;
ALTER TABLE records ADD COLUMN IF NOT EXISTS app_id TEXT NOT NULL DEFAULT '';
DROP INDEX IF EXISTS records_due;
CREATE INDEX records_due ON records (app_id, kind, next_attempt_at, id) WHERE state = {pending};
CREATE INDEX IF NOT EXISTS records_delivered ON records (app_id, kind, updated_at)
    WHERE state = {delivered};
CREATE INDEX IF NOT EXISTS records_unassigned ON records (id) WHERE app_id = '';
";

/// Version 4: the payload shapes of each source (contract §10.4), upserted in the statement
/// that stores the webhooks they were seen in; as the SQLite table, and as there with no index
/// on `last_seen` (which every webhook moves; without one an update can stay on its page, HOT):
/// a listing sorts the few rows itself.
const SCHEMA_V4: &str = "
CREATE TABLE IF NOT EXISTS shapes (
    key        BYTEA  PRIMARY KEY,  -- the shape's SHA-256, source included
    source     TEXT   NOT NULL,
    kind       TEXT,
    action     TEXT,
    paths      TEXT   NOT NULL,     -- JSON array of path:type
    count      BIGINT NOT NULL,
    first_seen BIGINT NOT NULL,
    last_seen  BIGINT NOT NULL,
    sample     TEXT                 -- JSON text; NULL with capture.samples = off
);
";

/// Version 5: erasures (contract §12), as the SQLite table, plus `claimed_by` as on records.
/// `identity` is kept only while Heap is still to be asked; `next_attempt_at` is the due time,
/// or the lease's end while claimed. `erasures_due` serves the claim's and the due time's
/// `state IN (...) AND next_attempt_at <= now`.
const SCHEMA_V5: &str = "
CREATE TABLE IF NOT EXISTS erasures (
    id                  BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source              TEXT    NOT NULL,
    heap_app_id         TEXT,              -- NULL: local only
    identity            TEXT,              -- only while the Heap request is still to be made
    identity_sha256     TEXT    NOT NULL,
    state               TEXT    NOT NULL,  -- ErasureState::as_str
    removed             TEXT    NOT NULL,  -- JSON of Removed
    requested_at        BIGINT  NOT NULL,
    updated_at          BIGINT  NOT NULL,
    deletion_request_id TEXT,
    attempts            INTEGER NOT NULL DEFAULT 0,
    last_error          TEXT,
    reason              TEXT,
    next_attempt_at     BIGINT  NOT NULL,  -- due time, or the lease's end while claimed
    claimed             INTEGER NOT NULL DEFAULT 0,
    claimed_by          TEXT               -- application_name of the claiming replica
);
CREATE INDEX IF NOT EXISTS erasures_due ON erasures (state, next_attempt_at);
";

const MIGRATIONS: &[(i32, &str)] = &[
    (1, SCHEMA_V1),
    (2, SCHEMA_V2),
    (3, SCHEMA_V3),
    (4, SCHEMA_V4),
    (5, SCHEMA_V5),
];

/// Creates or upgrades the schema, once, whatever the number of replicas starting at once.
pub(super) async fn migrate(pool: &Pool) -> Result<(), QueueError> {
    let mut client = pool.get().await.map_err(unavailable)?;
    let tx = client.transaction().await.map_err(storage)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(storage)?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_version (
             version    INTEGER PRIMARY KEY,
             applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
         )",
    )
    .await
    .map_err(storage)?;
    let current: i32 = tx
        .query_one("SELECT COALESCE(MAX(version), 0) FROM schema_version", &[])
        .await
        .map_err(storage)?
        .try_get(0)
        .map_err(storage)?;
    if current > SCHEMA_VERSION {
        return Err(QueueError::Storage(format!(
            "queue schema version {current} is newer than this relay understands ({SCHEMA_VERSION})"
        )));
    }
    for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
        tx.batch_execute(&spell_states(sql))
            .await
            .map_err(storage)?;
        tx.execute(
            "INSERT INTO schema_version (version) VALUES ($1)",
            &[version],
        )
        .await
        .map_err(storage)?;
        tracing::info!(version, "queue schema migrated");
    }
    tx.commit().await.map_err(storage)
}
