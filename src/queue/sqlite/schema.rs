//! The SQLite file's schema and connection settings: the DDL, [`SCHEMA_VERSION`] in
//! `PRAGMA user_version`, the migrations between versions, and the pragmas every writing
//! connection runs with. The tables' layout is a durable format: change it only with a
//! migration.

use rusqlite::{Connection, TransactionBehavior};

use crate::queue::spell_states;

/// The schema version this code writes (`PRAGMA user_version`). Bump it with a migration.
pub(super) const SCHEMA_VERSION: i64 = 7;

/// Pages of SQLite's own cache (negative: KiB), 16 MiB. The deduplication index takes random
/// inserts; with SQLite's default 2 MiB, a queue holding a week of webhooks read most of its
/// pages back from the kernel on every insert.
const CACHE_KIB: i64 = 16 * 1024;

/// The webhooks table; `{table}` as for [`RECORDS`]. Deduplication is per source (schema
/// version 3): the same body posted to two sources is two webhooks. Version 2 declared
/// `digest UNIQUE` on the column, which only a rebuild can drop.
///
/// Since version 6 a new webhook is this one row: its records wait in `packed` (see
/// `packed`), with their lane and count beside them, until the forwarder claims from the lane
/// and unpacks them into the records table (`packed` is NULL from then on, and for every
/// webhook stored before version 6).
const WEBHOOKS: &str = "
CREATE TABLE IF NOT EXISTS {table} (
    id           INTEGER PRIMARY KEY,
    source       TEXT    NOT NULL DEFAULT 'default',  -- the source it was posted to
    digest       BLOB    NOT NULL,                    -- SHA-256 of the verified body
    body         BLOB    NOT NULL,                    -- the verified body, for replay
    received_at  INTEGER NOT NULL,
    app_id       TEXT,                                -- the lane of its packed records
    packed       BLOB,                                -- its records until unpacked, or NULL
    packed_count INTEGER NOT NULL DEFAULT 0,          -- records in `packed`; 0 when NULL
    packed_kinds INTEGER NOT NULL DEFAULT 0           -- their kinds, one bit each
);
";

/// The webhooks' indexes. Both take their entries at the right-hand end: no index on the
/// request path takes random inserts (see [`DIGESTS`] for deduplication). `webhooks_packed`
/// lists each lane's packed webhooks in id order with what the counts and due times need; it
/// is partial on `packed_count > 0` (never NULL `packed`) so that its own columns decide
/// membership and those reads never touch the table. Entries are appended at a lane's end and
/// removed from its start.
const WEBHOOKS_INDEXES: &str = "
CREATE INDEX IF NOT EXISTS webhooks_received ON webhooks (received_at);
CREATE INDEX IF NOT EXISTS webhooks_packed
    ON webhooks (app_id, id, received_at, packed_count, packed_kinds) WHERE packed_count > 0;
CREATE TABLE IF NOT EXISTS heartbeat (id INTEGER PRIMARY KEY CHECK (id = 1), at INTEGER NOT NULL);
";

/// Every stored webhook's digest prefix (its first 8 bytes) and id, in prefix order (schema
/// version 6): what deduplication looks a body up by, for webhooks up to
/// `counters.digests_through`. The webhooks after it are looked up in memory, and written here
/// in sorted batches (`dedup`), so that a page of this table is written once per batch rather
/// than once per webhook: the random inserts of a digest index were half of a webhook's cost.
/// A deleted webhook takes its entry with it (the trigger).
const DIGESTS: &str = "
CREATE TABLE IF NOT EXISTS digests (
    prefix     BLOB    NOT NULL,
    webhook_id INTEGER NOT NULL,
    PRIMARY KEY (prefix, webhook_id)
) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS webhooks_forget AFTER DELETE ON webhooks BEGIN
    DELETE FROM digests WHERE prefix = substr(OLD.digest, 1, 8) AND webhook_id = OLD.id;
END;
";

/// Counters of the file (schema version 6), each started where the file stands: the id the
/// next record row takes (`next_record_id`, see `writer::take_ids`), and the last webhook id
/// whose digest is in [`DIGESTS`] (`digests_through`), after the migration put every stored
/// webhook's there.
const COUNTERS: &str = "
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
INSERT OR IGNORE INTO counters (name, value)
    VALUES ('next_record_id', COALESCE((SELECT MAX(id) FROM records), 0) + 1);
INSERT OR IGNORE INTO counters (name, value)
    VALUES ('digests_through', COALESCE((SELECT MAX(id) FROM webhooks), 0));
";

/// Fills [`DIGESTS`] from every stored webhook, in the table's order (the migration to 6).
const FILL_DIGESTS: &str = "
INSERT OR IGNORE INTO digests (prefix, webhook_id)
    SELECT substr(digest, 1, 8), id FROM webhooks ORDER BY 1, 2;
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
    app_id          TEXT    NOT NULL DEFAULT '',  -- the lane (Heap app id); '' before v3
    key             TEXT    NOT NULL,         -- idempotency key (track) or kind:digest
    kind            TEXT    NOT NULL,         -- RecordKind::as_str() or 'webhook' (quarantine)
    subject         TEXT    NOT NULL,         -- identity or account id
    json            TEXT    NOT NULL,         -- element of Heap's bulk array (before v7); else ''
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
///
/// Per lane (schema version 3): the due index leads with `app_id`, so a claim or a due time
/// reads its own lane's range only, however large another lane's backlog; `records_delivered`
/// does the same for the rate budget's count of deliveries (`delivered_since`), which the
/// lane-blind `records_done` (pruning, dead letters) could only filter row by row.
/// `records_unassigned` holds only records stored before v3 until they are adopted, so
/// adopting them reads nothing at every later start.
const RECORDS_INDEXES: &str = "
CREATE UNIQUE INDEX IF NOT EXISTS records_webhook_key ON records (webhook_id, key);
CREATE INDEX IF NOT EXISTS records_due ON records (app_id, kind, next_attempt_at)
    WHERE state = {pending};
CREATE INDEX IF NOT EXISTS records_done ON records (state, updated_at) WHERE state <> {pending};
CREATE INDEX IF NOT EXISTS records_delivered ON records (app_id, kind, updated_at)
    WHERE state = {delivered};
CREATE INDEX IF NOT EXISTS records_unassigned ON records (id) WHERE app_id = '';
";

/// The JSON of each pending or dead record (schema version 7), beside its row rather than in
/// it: a delivered record keeps its row (its key, subject and times, until pruned) but not its
/// JSON, and a JSON cut out of a row leaves a gap in its page that SQLite does not reclaim (a
/// delivered webhook's records took 830 bytes of pages for 280 of data). Here the entries are
/// appended in id order and deleted by the ack in about that order, so whole pages are freed
/// and reused. The triggers keep the table to the records that still need their JSON, whatever
/// statement delivers or deletes a record. Rows stored before version 7 keep their JSON in
/// `records.json`, which readers fall back to.
const RECORD_JSON: &str = "
CREATE TABLE IF NOT EXISTS record_json (id INTEGER PRIMARY KEY, json TEXT NOT NULL);
CREATE TRIGGER IF NOT EXISTS records_delivered_json AFTER UPDATE OF state ON records
    WHEN NEW.state = {delivered} BEGIN
    DELETE FROM record_json WHERE id = NEW.id;
END;
CREATE TRIGGER IF NOT EXISTS records_forget_json AFTER DELETE ON records BEGIN
    DELETE FROM record_json WHERE id = OLD.id;
END;
";

/// The payload shapes of each source (schema version 4, contract §10.4), upserted in the
/// commit of the webhook they were seen in. `key` is the shape's SHA-256 (source included);
/// `paths` a JSON array of `path:type`; `sample` JSON text, NULL with `capture.samples = off`.
/// Without rowid and without a second index: the key is the table's one b-tree, so an upsert
/// writes one entry; a listing sorts the few rows (at most `capture.max_shapes_per_source` per
/// source) by `last_seen` itself, which every webhook moves.
const SHAPES: &str = "
CREATE TABLE IF NOT EXISTS shapes (
    key        BLOB    PRIMARY KEY,
    source     TEXT    NOT NULL,
    kind       TEXT,
    action     TEXT,
    paths      TEXT    NOT NULL,
    count      INTEGER NOT NULL,
    first_seen INTEGER NOT NULL,
    last_seen  INTEGER NOT NULL,
    sample     TEXT
) WITHOUT ROWID;
";

/// The erasures of people (schema version 5, contract §12): one row per erasure whose local
/// part is committed, and the state of its Heap part. `identity` is kept only while Heap is
/// still to be asked, and cleared (zeroed, see `secure_delete` in [`prepare`]) once Heap
/// accepts or refuses; `removed` is the JSON of [`crate::queue::Removed`]; `next_attempt_at`
/// is the due time, or the lease's end while `claimed`. The index serves the due queries
/// (claims, the next due time), which name the states.
const ERASURES: &str = "
CREATE TABLE IF NOT EXISTS erasures (
    id                  INTEGER PRIMARY KEY,
    source              TEXT    NOT NULL,
    heap_app_id         TEXT,              -- NULL: local only
    identity            TEXT,              -- only while the Heap request is still to be made
    identity_sha256     TEXT    NOT NULL,
    state               TEXT    NOT NULL,  -- ErasureState::as_str
    removed             TEXT    NOT NULL,  -- JSON of Removed
    requested_at        INTEGER NOT NULL,
    updated_at          INTEGER NOT NULL,
    deletion_request_id TEXT,
    attempts            INTEGER NOT NULL DEFAULT 0,
    last_error          TEXT,
    reason              TEXT,
    next_attempt_at     INTEGER NOT NULL,  -- due time, or the lease's end while claimed
    claimed             INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS erasures_due ON erasures (state, next_attempt_at);
";

/// Version 2's records columns, in order: what a rebuild from version 1 copies.
const RECORDS_V2_COLUMNS: &str = "id, webhook_id, key, kind, subject, json, state, claimed, \
    attempts, received_at, next_attempt_at, updated_at, last_error, dead_reason, dead_detail";

/// Prepared statements kept per connection. rusqlite keeps 16 by default, fewer than the
/// queue thread's statements: the least recently used was evicted and parsed again, and a
/// profile at 64 webhooks in flight showed SQLite's parser on the queue thread.
const STATEMENT_CACHE: usize = 64;

pub(super) fn prepare(conn: &mut Connection) -> rusqlite::Result<()> {
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    stable_plans(conn)?;
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
    // Deleted and overwritten content is zeroed in the pages, always, not only during an
    // erasure (contract §12): an ack (dropping `record_json`), a prune or a purge would otherwise leave
    // the old bytes in the pages' free space, where no later erasure can find them to remove
    // them. The erasure's checkpoint (`scrub`) then leaves no copy in the WAL either.
    conn.pragma_update(None, "secure_delete", "ON")?;
    migrate(conn)
}

/// Plans that do not depend on bound values (SQLite's query planner stability guarantee). By
/// default SQLite prepares a statement again when a value bound to it could change its plan —
/// here, any parameter compared with a partial index's condition — and the dedup lookup was
/// parsed and planned anew on every webhook: 16 % of the relay's CPU in a profile. Every query
/// that needs a partial index names the index's condition as a literal, as the plan tests
/// check, so a plan chosen once is the plan wanted.
pub(super) fn stable_plans(conn: &Connection) -> rusqlite::Result<()> {
    conn.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
        true,
    )?;
    Ok(())
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
    let records = |table: &str| spell_states(RECORDS).replace("{table}", table);
    let webhooks = |table: &str| WEBHOOKS.replace("{table}", table);
    match version {
        0 => {
            tx.execute_batch(&webhooks("webhooks"))?;
            tx.execute_batch(&records("records"))?;
        }
        1 | 2 => {
            if version == 1 {
                // Version 1 declared `key UNIQUE` on the column, which only a rebuild can drop.
                tx.execute_batch(&records("records_v3"))?;
                tx.execute_batch(&format!(
                    "INSERT INTO records_v3 ({RECORDS_V2_COLUMNS})
                     SELECT {RECORDS_V2_COLUMNS} FROM records;
                     DROP TABLE records;
                     ALTER TABLE records_v3 RENAME TO records;"
                ))?;
            } else {
                // A new column with a constant default: SQLite rewrites no row.
                tx.execute_batch("ALTER TABLE records ADD COLUMN app_id TEXT NOT NULL DEFAULT ''")?;
                // Re-made below, leading with the lane.
                tx.execute_batch("DROP INDEX IF EXISTS records_due")?;
            }
            // Every webhook keeps its id (records point at it) and becomes source `default`.
            tx.execute_batch(&webhooks("webhooks_v3"))?;
            tx.execute_batch(
                "INSERT INTO webhooks_v3 (id, source, digest, body, received_at)
                 SELECT id, 'default', digest, body, received_at FROM webhooks;
                 DROP TABLE webhooks;
                 ALTER TABLE webhooks_v3 RENAME TO webhooks;",
            )?;
            tracing::info!(from = version, to = SCHEMA_VERSION, "queue schema migrated");
        }
        // Version 4 only adds the shapes table, version 5 the erasures table, made below;
        // version 6 packs new webhooks' records into their row (columns with constant
        // defaults: SQLite rewrites no row) and keeps digests in their own table (below).
        3..=5 => {
            for (column, declared) in [
                ("app_id", "TEXT"),
                ("packed", "BLOB"),
                ("packed_count", "INTEGER NOT NULL DEFAULT 0"),
                ("packed_kinds", "INTEGER NOT NULL DEFAULT 0"),
            ] {
                add_column(&tx, "webhooks", column, declared)?;
            }
            tx.execute_batch("DROP INDEX IF EXISTS webhooks_source_digest")?;
            tracing::info!(from = version, to = SCHEMA_VERSION, "queue schema migrated");
        }
        // Version 7 only adds `record_json`, made below.
        6 => tracing::info!(from = version, to = SCHEMA_VERSION, "queue schema migrated"),
        _ => {
            return Err(rusqlite::Error::InvalidParameterName(format!(
                "queue schema version {version} is unknown to this relay"
            )));
        }
    }
    tx.execute_batch(WEBHOOKS_INDEXES)?;
    tx.execute_batch(&spell_states(RECORDS_INDEXES))?;
    tx.execute_batch(SHAPES)?;
    tx.execute_batch(ERASURES)?;
    if version < 6 {
        tx.execute_batch(DIGESTS)?;
        tx.execute_batch(FILL_DIGESTS)?;
    }
    tx.execute_batch(COUNTERS)?;
    tx.execute_batch(&spell_states(RECORD_JSON))?;
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    tx.commit()
}

/// Adds `column` to `table` unless it has one of that name already (a file whose version was
/// set back by hand, as tests of older versions do).
fn add_column(tx: &Connection, table: &str, column: &str, declared: &str) -> rusqlite::Result<()> {
    let present: bool = tx.query_row(
        "SELECT COUNT(*) > 0 FROM pragma_table_info(?1) WHERE name = ?2",
        rusqlite::params![table, column],
        |row| row.get(0),
    )?;
    if !present {
        tx.execute_batch(&format!(
            "ALTER TABLE {table} ADD COLUMN {column} {declared}"
        ))?;
    }
    Ok(())
}
