//! The SQLite file's schema and connection settings: the DDL, [`SCHEMA_VERSION`] in
//! `PRAGMA user_version`, the migrations between versions, and the pragmas every writing
//! connection runs with. The tables' layout is a durable format: change it only with a
//! migration.

use rusqlite::{Connection, TransactionBehavior};

use crate::queue::spell_states;

/// The schema version this code writes (`PRAGMA user_version`). Bump it with a migration.
pub(super) const SCHEMA_VERSION: i64 = 2;

/// Pages of SQLite's own cache (negative: KiB), 16 MiB. The digest index takes random inserts;
/// with SQLite's default 2 MiB, a queue holding a week of webhooks read most of its pages back
/// from the kernel on every insert.
const CACHE_KIB: i64 = 16 * 1024;

const WEBHOOKS: &str = "
CREATE TABLE IF NOT EXISTS webhooks (
    id          INTEGER PRIMARY KEY,
    digest      BLOB    NOT NULL UNIQUE,  -- SHA-256 of the verified body
    body        BLOB    NOT NULL,         -- the verified body, for replay
    received_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS webhooks_received ON webhooks (received_at);
CREATE TABLE IF NOT EXISTS heartbeat (id INTEGER PRIMARY KEY CHECK (id = 1), at INTEGER NOT NULL);
";

/// The records table; `{table}` is `records`, or the new table a migration fills before
/// renaming it. A template, as every statement naming a state: `{pending}` and the others
/// are [`crate::queue::RecordState`]'s integers, spelled by [`spell_states`].
///
/// A key is unique within its webhook, not globally: keys derive from the webhook's digest,
/// which is unique already, so `(webhook_id, key)` — appended in id order, one right-hand leaf
/// page per commit — does the job that a global index on random keys did at two random b-tree
/// inserts per webhook (schema version 1). Replay relies on it to skip records a webhook
/// still has.
const RECORDS: &str = "
CREATE TABLE IF NOT EXISTS {table} (
    id              INTEGER PRIMARY KEY,
    webhook_id      INTEGER NOT NULL,
    key             TEXT    NOT NULL,         -- idempotency key (track) or kind:digest
    kind            TEXT    NOT NULL,         -- RecordKind::as_str() or 'webhook' (quarantine)
    subject         TEXT    NOT NULL,         -- identity or account id
    json            TEXT    NOT NULL,         -- element of Heap's bulk array; '' once delivered
    state           INTEGER NOT NULL,         -- {pending} pending, {delivered} delivered, {dead} dead
    claimed         INTEGER NOT NULL DEFAULT 0,
    attempts        INTEGER NOT NULL DEFAULT 0,
    received_at     INTEGER NOT NULL,
    next_attempt_at INTEGER NOT NULL,         -- due time, or the lease's end while claimed
    updated_at      INTEGER NOT NULL,         -- delivered / dead since
    last_error      TEXT,
    dead_reason     TEXT,
    dead_detail     TEXT
);
";

/// The records' indexes. The partial ones serve only statements that name the same state
/// literal as their `WHERE`, which holds because both are spelled from one template.
const RECORDS_INDEXES: &str = "
CREATE UNIQUE INDEX IF NOT EXISTS records_webhook_key ON records (webhook_id, key);
CREATE INDEX IF NOT EXISTS records_due ON records (kind, next_attempt_at) WHERE state = {pending};
CREATE INDEX IF NOT EXISTS records_done ON records (state, updated_at) WHERE state <> {pending};
";

pub(super) fn prepare(conn: &mut Connection) -> rusqlite::Result<()> {
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // Durability is chosen per transaction (see `commit_group`): webhooks commit with FULL,
    // the forwarder's bookkeeping with NORMAL.
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    // Temporary b-trees (statement journals of the per-webhook savepoints) in memory: measured
    // 18 % less CPU on the writer thread. Checkpoints stay on the writer (SQLite's default
    // every 1,000 pages): a separate checkpointing thread measured a worse p99 on a large file.
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    conn.pragma_update(None, "cache_size", -CACHE_KIB)?;
    migrate(conn)
}

/// Brings the file to [`SCHEMA_VERSION`] in one transaction (a crash leaves the old version),
/// under SQLite's write lock, so a `dlq` command opening the file at the same time waits.
fn migrate(conn: &mut Connection) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let version: i64 = tx.pragma_query_value(None, "user_version", |row| row.get(0))?;
    if version > SCHEMA_VERSION {
        return Err(rusqlite::Error::InvalidParameterName(format!(
            "queue schema version {version} is newer than this relay understands ({SCHEMA_VERSION})"
        )));
    }
    if version == SCHEMA_VERSION {
        return Ok(());
    }
    tx.execute_batch(WEBHOOKS)?;
    if version == 1 {
        // Version 1 declared `key UNIQUE` on the column, which only a rebuild can drop.
        tx.execute_batch(&spell_states(RECORDS).replace("{table}", "records_v2"))?;
        tx.execute_batch(
            "INSERT INTO records_v2 SELECT * FROM records;
             DROP TABLE records;
             ALTER TABLE records_v2 RENAME TO records;",
        )?;
        tracing::info!(from = version, to = SCHEMA_VERSION, "queue schema migrated");
    } else {
        tx.execute_batch(&spell_states(RECORDS).replace("{table}", "records"))?;
    }
    tx.execute_batch(&spell_states(RECORDS_INDEXES))?;
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    tx.commit()
}
