//! The embedded queue: one SQLite file in WAL mode with `synchronous = FULL`, so a committed
//! webhook survives `kill -9` and power loss.
//!
//! One dedicated thread owns the connection and runs every operation in arrival order. Webhooks
//! that arrive while it is busy are committed together in one transaction (group commit): many
//! concurrent webhooks share one fsync instead of paying one each. Should one webhook's insert
//! fail, the group is redone with a savepoint per webhook, so it cannot take its neighbours
//! down with it; if the commit itself fails, every webhook in the group gets the error and none
//! is acknowledged. The forwarder's bookkeeping (claims, acks, retries) shares the thread, and
//! its transactions end early while webhooks wait, so a webhook never waits behind a large one.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};

use async_trait::async_trait;
use bytes::Bytes;
use rusqlite::types::Value;
use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior, params};
use tokio::sync::oneshot;

use super::prepared::{Prepared, Rows, storable};
use super::{
    Claimed, Content, DeadLetter, DeadLetterFilter, Enqueued, FilterValue, NewWebhook,
    QUARANTINE_KIND, Queue, QueueError, QueueStats, ReplayItem,
};
use crate::heap::wire::RecordKind;

/// The schema version this code writes (`PRAGMA user_version`). Bump it with a migration.
const SCHEMA_VERSION: i64 = 2;

/// The most webhooks committed in one transaction.
const MAX_GROUP: usize = 1024;

/// Records a bookkeeping transaction (a claim, ack, retry, dead letter) touches before it looks
/// whether webhooks are waiting for the queue thread, and if so commits early and lets them go
/// first: the thread runs one command at a time. Measured at 2,000 webhooks/s while the
/// forwarder drained a backlog: claims and acks of up to 8,000 property records in one
/// transaction gave a p99 acknowledgement latency of 39–52 ms; transactions of 250 records,
/// 10–13 ms; of 100, 9.4–11 ms (5.2–5.8 ms with the forwarder paused). Always cutting them
/// that small cost forwarding a third of its speed at saturation (more commits rewrite the
/// same pages), hence only while webhooks wait.
const BOOKKEEPING_CHUNK: usize = 100;

/// Rows deleted per pruning statement, so pruning never holds the writer for long.
const PRUNE_CHUNK: i64 = 5000;

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

/// The records table and its indexes; `{table}` is `records`, or the new table a migration
/// fills before renaming it.
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
    state           INTEGER NOT NULL,         -- 0 pending, 1 delivered, 2 dead
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

const RECORDS_INDEXES: &str = "
CREATE UNIQUE INDEX IF NOT EXISTS records_webhook_key ON records (webhook_id, key);
CREATE INDEX IF NOT EXISTS records_due ON records (kind, next_attempt_at) WHERE state = 0;
CREATE INDEX IF NOT EXISTS records_done ON records (state, updated_at) WHERE state <> 0;
";

const PENDING: i64 = 0;
const DELIVERED: i64 = 1;
const DEAD: i64 = 2;

type Reply<T> = oneshot::Sender<Result<T, QueueError>>;

enum Command {
    Enqueue(Prepared, Reply<Enqueued>),
    Call(Box<dyn FnOnce(&mut Connection) + Send>),
}

/// Handle to the queue thread. Cheap to share behind an `Arc`.
pub struct SqliteQueue {
    commands: mpsc::Sender<Command>,
    /// Webhooks sent to the queue thread and not yet taken up by it (see
    /// [`BOOKKEEPING_CHUNK`]).
    waiting: Arc<AtomicUsize>,
    /// A second connection for slow read-only queries (stats, listings). WAL lets it read
    /// while the queue thread writes, so a metrics scrape over a large backlog never stalls
    /// ingest.
    reader: Arc<Mutex<Connection>>,
}

fn storage(error: rusqlite::Error) -> QueueError {
    QueueError::Storage(error.to_string())
}

impl SqliteQueue {
    /// Opens the queue file for the relay that forwards from it: as [`SqliteQueue::open`],
    /// and leases left by a previous process (killed mid-batch) are released at once instead
    /// of when they run out, since only one relay forwards from a SQLite file. Tools (`dlq`)
    /// use `open`, so they never release a running relay's leases.
    pub async fn open_for_serving(path: &Path) -> Result<Self, QueueError> {
        let queue = Self::open(path)?;
        let now = chrono::Utc::now().timestamp_millis();
        queue
            .call(move |conn| {
                conn.execute(
                    "UPDATE records SET claimed = 0, next_attempt_at = MIN(next_attempt_at, ?1)
                     WHERE state = 0 AND claimed = 1",
                    params![now],
                )
            })
            .await?;
        Ok(queue)
    }

    /// Opens (creating when missing) the queue file and starts its thread.
    pub fn open(path: &Path) -> Result<Self, QueueError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                QueueError::Storage(format!("cannot create {}: {e}", dir.display()))
            })?;
        }
        let mut conn = Connection::open(path).map_err(storage)?;
        prepare(&mut conn).map_err(storage)?;
        let (commands, receiver) = mpsc::channel();
        let waiting = Arc::new(AtomicUsize::new(0));
        let taken = Arc::clone(&waiting);
        std::thread::Builder::new()
            .name("sqlite-queue".into())
            .spawn(move || serve(conn, receiver, &taken))
            .map_err(|e| QueueError::Storage(format!("cannot start the queue thread: {e}")))?;
        let reader =
            Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(storage)?;
        reader
            .busy_timeout(std::time::Duration::from_secs(5))
            .map_err(storage)?;
        Ok(Self {
            commands,
            waiting,
            reader: Arc::new(Mutex::new(reader)),
        })
    }

    /// Runs the read-only `op` on the reader connection, off the async runtime's threads.
    async fn read<T: Send + 'static>(
        &self,
        op: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, QueueError> {
        let reader = self.reader.clone();
        tokio::task::spawn_blocking(move || {
            let conn = reader
                .lock()
                .map_err(|_| QueueError::Storage("reader connection poisoned".into()))?;
            op(&conn).map_err(storage)
        })
        .await
        .map_err(|_| QueueError::Closed)?
    }

    /// Runs `sql` — its last parameter a record id, the others `leading` — for each of `ids`,
    /// in as few transactions as webhooks waiting allow (see [`BOOKKEEPING_CHUNK`]).
    async fn update_many(
        &self,
        sql: &'static str,
        ids: Vec<i64>,
        leading: Vec<Value>,
    ) -> Result<(), QueueError> {
        let mut rest = ids;
        while !rest.is_empty() {
            let (ids, leading, waiting) = (rest.clone(), leading.clone(), self.waiting.clone());
            let done = self
                .call(move |conn| {
                    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                    let mut done = 0;
                    {
                        let mut statement = tx.prepare_cached(sql)?;
                        for chunk in ids.chunks(BOOKKEEPING_CHUNK) {
                            for id in chunk {
                                let mut values: Vec<&dyn rusqlite::ToSql> =
                                    leading.iter().map(|v| v as &dyn rusqlite::ToSql).collect();
                                values.push(id);
                                statement.execute(values.as_slice())?;
                            }
                            done += chunk.len();
                            if waiting.load(Ordering::SeqCst) > 0 {
                                break;
                            }
                        }
                    }
                    tx.commit()?;
                    Ok(done)
                })
                .await?;
            rest.drain(..done);
        }
        Ok(())
    }

    /// Runs `op` on the queue thread and waits for its result.
    async fn call<T: Send + 'static>(
        &self,
        op: impl FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, QueueError> {
        let (reply, result) = oneshot::channel();
        let job = Box::new(move |conn: &mut Connection| {
            let _ = reply.send(op(conn).map_err(storage));
        });
        self.commands
            .send(Command::Call(job))
            .map_err(|_| QueueError::Closed)?;
        result.await.map_err(|_| QueueError::Closed)?
    }
}

fn prepare(conn: &mut Connection) -> rusqlite::Result<()> {
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
        tx.execute_batch(&RECORDS.replace("{table}", "records_v2"))?;
        tx.execute_batch(
            "INSERT INTO records_v2 SELECT * FROM records;
             DROP TABLE records;
             ALTER TABLE records_v2 RENAME TO records;",
        )?;
        tracing::info!(from = version, to = SCHEMA_VERSION, "queue schema migrated");
    } else {
        tx.execute_batch(&RECORDS.replace("{table}", "records"))?;
    }
    tx.execute_batch(RECORDS_INDEXES)?;
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    tx.commit()
}

/// The queue thread: runs commands in order, grouping consecutive enqueues into one commit.
fn serve(mut conn: Connection, commands: mpsc::Receiver<Command>, waiting: &AtomicUsize) {
    let mut next: Option<Command> = None;
    loop {
        let command = match next.take() {
            Some(command) => command,
            None => match commands.recv() {
                Ok(command) => command,
                Err(_) => return, // every handle dropped
            },
        };
        match command {
            Command::Call(job) => job(&mut conn),
            Command::Enqueue(webhook, reply) => {
                waiting.fetch_sub(1, Ordering::SeqCst);
                let mut group = vec![(webhook, reply)];
                while group.len() < MAX_GROUP {
                    match commands.try_recv() {
                        Ok(Command::Enqueue(webhook, reply)) => {
                            waiting.fetch_sub(1, Ordering::SeqCst);
                            group.push((webhook, reply));
                        }
                        Ok(other) => {
                            next = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                commit_group(&mut conn, group);
            }
        }
    }
}

/// Commits a group of webhooks with `synchronous = FULL`: the WAL is fsynced before anyone is
/// told "committed", so an acknowledged webhook survives power loss, not only a crash. Every
/// other write (claims, acks, retries, dead letters, replays) commits with NORMAL — no fsync of
/// its own — because losing one to power loss only repeats work: a lost ack resends under the
/// same idempotency key, a lost claim or retry time makes a record due again, a lost replay
/// leaves the dead letter in place. The next webhook commit's fsync persists them anyway.
fn commit_group(conn: &mut Connection, group: Vec<(Prepared, Reply<Enqueued>)>) {
    let outcome = (|| {
        conn.pragma_update(None, "synchronous", "FULL")?;
        let result = insert_group(conn, &group);
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        result
    })();

    match outcome {
        Ok(results) => {
            for ((_, reply), result) in group.into_iter().zip(results) {
                let _ = reply.send(result);
            }
        }
        Err(error) => {
            let message = error.to_string();
            for (_, reply) in group {
                let _ = reply.send(Err(QueueError::Storage(message.clone())));
            }
        }
    }
}

/// One transaction for the group. Inserts do not fail in normal operation (conflicts are
/// `DO NOTHING`), so the group first goes in as it is; only if an insert fails is it redone
/// with a savepoint per webhook, so the failing one cannot take its neighbours down with it.
fn insert_group(
    conn: &mut Connection,
    group: &[(Prepared, Reply<Enqueued>)],
) -> rusqlite::Result<Vec<Result<Enqueued, QueueError>>> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let all: rusqlite::Result<Vec<Enqueued>> = group
        .iter()
        .map(|(webhook, _)| insert_webhook(&tx, webhook))
        .collect();
    if let Ok(results) = all {
        tx.commit()?;
        return Ok(results.into_iter().map(Ok).collect());
    }
    drop(tx); // rolls back

    let mut tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut results = Vec::with_capacity(group.len());
    for (webhook, _) in group {
        let savepoint = tx.savepoint()?;
        let result = insert_webhook(&savepoint, webhook);
        if result.is_ok() {
            savepoint.commit()?;
        } // else: the savepoint rolls back when dropped
        results.push(result.map_err(storage));
    }
    tx.commit()?;
    Ok(results)
}

fn insert_webhook(tx: &Connection, webhook: &Prepared) -> rusqlite::Result<Enqueued> {
    let inserted = tx
        .prepare_cached(
            "INSERT INTO webhooks (digest, body, received_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (digest) DO NOTHING",
        )?
        .execute(params![
            &webhook.digest[..],
            &webhook.body[..],
            webhook.received_at_ms
        ])?;
    if inserted == 0 {
        return Ok(Enqueued::Duplicate);
    }
    let webhook_id = tx.last_insert_rowid();
    let events = insert_rows(
        tx,
        webhook_id,
        webhook.received_at_ms,
        &webhook.rows,
        webhook.received_at_ms,
    )?;
    Ok(webhook.rows.outcome(events))
}

/// Inserts a webhook's records; returns how many track events were new.
fn insert_rows(
    tx: &Connection,
    webhook_id: i64,
    received_at_ms: i64,
    rows: &Rows,
    now_ms: i64,
) -> rusqlite::Result<usize> {
    match rows {
        Rows::Records(rows) => {
            let mut insert = tx.prepare_cached(
                "INSERT INTO records (webhook_id, key, kind, subject, json, state, received_at,
                                      next_attempt_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, 0, ?6, ?7, ?7)
                 ON CONFLICT (webhook_id, key) DO NOTHING",
            )?;
            let mut events = 0;
            for row in rows {
                let new = insert.execute(params![
                    webhook_id,
                    row.key,
                    row.kind.as_str(),
                    row.subject,
                    row.json,
                    received_at_ms,
                    now_ms,
                ])?;
                if new > 0 && row.kind == RecordKind::Track {
                    events += 1;
                }
            }
            Ok(events)
        }
        Rows::Quarantined {
            key,
            reason,
            detail,
            subject,
        } => {
            tx.prepare_cached(
                "INSERT INTO records (webhook_id, key, kind, subject, json, state, received_at,
                                      next_attempt_at, updated_at, dead_reason, dead_detail)
                 VALUES (?1, ?2, ?3, ?4, '', 2, ?5, ?6, ?6, ?7, ?8)
                 ON CONFLICT (webhook_id, key) DO NOTHING",
            )?
            .execute(params![
                webhook_id,
                key,
                QUARANTINE_KIND,
                subject,
                received_at_ms,
                now_ms,
                reason,
                detail,
            ])?;
            Ok(0)
        }
    }
}

/// `WHERE` clause and parameters for a dead-letter filter (always restricted to dead records).
fn filter_sql(filter: &DeadLetterFilter) -> (String, Vec<rusqlite::types::Value>) {
    // `state <> 0` lets SQLite use the partial index `records_done`.
    let mut sql = String::from("r.state <> 0 AND r.state = 2");
    let mut values: Vec<Value> = Vec::new();
    if !filter.ids.is_empty() {
        let marks = vec!["?"; filter.ids.len()].join(",");
        sql.push_str(&format!(" AND r.id IN ({marks})"));
        values.extend(filter.ids.iter().map(|id| Value::Integer(*id)));
    }
    let mut clause = |condition: &str, value: Value| {
        sql.push_str(" AND ");
        sql.push_str(condition);
        values.push(value);
    };
    for (condition, value) in filter.conditions() {
        let value = match value {
            FilterValue::Text(text) => Value::Text(text),
            FilterValue::Integer(int) => Value::Integer(int),
        };
        clause(condition, value);
    }
    (sql, values)
}

fn limit_sql(filter: &DeadLetterFilter) -> String {
    filter
        .limit
        .map(|limit| format!(" LIMIT {limit}"))
        .unwrap_or_default()
}

/// Leases up to `limit` due records of `kind`, oldest first, until `lease_end_ms`, in one
/// transaction that ends early when webhooks are `waiting`; also whether fewer were due.
fn claim_some(
    conn: &mut Connection,
    kind: RecordKind,
    limit: usize,
    now_ms: i64,
    lease_end_ms: i64,
    waiting: &AtomicUsize,
) -> rusqlite::Result<(Vec<Claimed>, bool)> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut claimed: Vec<Claimed> = Vec::new();
    let exhausted = loop {
        let want = (limit - claimed.len()).min(BOOKKEEPING_CHUNK);
        let chunk = {
            let mut select = tx.prepare_cached(
                "SELECT id, subject, json, attempts, received_at FROM records
                 WHERE state = 0 AND kind = ?1 AND next_attempt_at <= ?2
                 ORDER BY next_attempt_at, id LIMIT ?3",
            )?;
            let rows = select.query_map(params![kind.as_str(), now_ms, want as i64], |row| {
                Ok(Claimed {
                    id: row.get(0)?,
                    kind,
                    subject: row.get(1)?,
                    json: row.get(2)?,
                    attempts: row.get(3)?,
                    received_at_ms: row.get(4)?,
                })
            })?;
            rows.collect::<rusqlite::Result<Vec<_>>>()?
        };
        let mut lease = tx
            .prepare_cached("UPDATE records SET claimed = 1, next_attempt_at = ?1 WHERE id = ?2")?;
        for record in &chunk {
            lease.execute(params![lease_end_ms, record.id])?;
        }
        let exhausted = chunk.len() < want;
        claimed.extend(chunk);
        if exhausted || claimed.len() >= limit || waiting.load(Ordering::SeqCst) > 0 {
            break exhausted;
        }
    };
    tx.commit()?;
    Ok((claimed, exhausted))
}

#[async_trait]
impl Queue for SqliteQueue {
    async fn enqueue(&self, webhook: NewWebhook) -> Result<Enqueued, QueueError> {
        let (reply, result) = oneshot::channel();
        let webhook = Command::Enqueue(webhook.into(), reply);
        self.waiting.fetch_add(1, Ordering::SeqCst);
        if self.commands.send(webhook).is_err() {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(QueueError::Closed);
        }
        result.await.map_err(|_| QueueError::Closed)?
    }

    async fn claim(
        &self,
        kind: RecordKind,
        max: usize,
        now_ms: i64,
        lease_ms: i64,
    ) -> Result<Vec<Claimed>, QueueError> {
        // In as few transactions as webhooks waiting allow (see BOOKKEEPING_CHUNK); each takes
        // the oldest due records left, since the ones leased before are no longer due.
        let mut claimed = Vec::new();
        while claimed.len() < max {
            let (limit, waiting) = (max - claimed.len(), self.waiting.clone());
            let (chunk, exhausted) = self
                .call(move |conn| {
                    claim_some(conn, kind, limit, now_ms, now_ms + lease_ms, &waiting)
                })
                .await?;
            claimed.extend(chunk);
            if exhausted {
                break;
            }
        }
        Ok(claimed)
    }

    async fn renew(&self, ids: Vec<i64>, until_ms: i64) -> Result<(), QueueError> {
        self.update_many(
            "UPDATE records SET next_attempt_at = ?1 WHERE state = 0 AND claimed = 1 AND id = ?2",
            ids,
            vec![Value::Integer(until_ms)],
        )
        .await
    }

    async fn ack(&self, ids: Vec<i64>, now_ms: i64) -> Result<(), QueueError> {
        self.update_many(
            "UPDATE records SET state = 1, claimed = 0, json = '', updated_at = ?1
             WHERE state = 0 AND id = ?2",
            ids,
            vec![Value::Integer(now_ms)],
        )
        .await
    }

    async fn retry_at(
        &self,
        ids: Vec<i64>,
        at_ms: i64,
        failed: bool,
        error: String,
    ) -> Result<(), QueueError> {
        let error = failed.then(|| Value::Text(storable(error)));
        self.update_many(
            "UPDATE records SET claimed = 0, next_attempt_at = ?1,
                    attempts = attempts + ?2, last_error = COALESCE(?3, last_error)
             WHERE state = 0 AND id = ?4",
            ids,
            vec![
                Value::Integer(at_ms),
                Value::Integer(i64::from(failed)),
                error.unwrap_or(Value::Null),
            ],
        )
        .await
    }

    async fn dead_letter(
        &self,
        ids: Vec<i64>,
        reason: String,
        detail: String,
        now_ms: i64,
    ) -> Result<(), QueueError> {
        self.update_many(
            "UPDATE records SET state = 2, claimed = 0, dead_reason = ?1, dead_detail = ?2,
                    updated_at = ?3
             WHERE state = 0 AND id = ?4",
            ids,
            vec![
                Value::Text(storable(reason)),
                Value::Text(storable(detail)),
                Value::Integer(now_ms),
            ],
        )
        .await
    }

    async fn stats(&self, _now_ms: i64) -> Result<QueueStats, QueueError> {
        self.read(|conn| {
            let mut stats = QueueStats::default();
            let mut statement = conn.prepare_cached(
                "SELECT state, claimed, COUNT(*), MIN(received_at) FROM records
                 GROUP BY state, claimed",
            )?;
            let mut rows = statement.query([])?;
            while let Some(row) = rows.next()? {
                let (state, claimed, count): (i64, i64, i64) =
                    (row.get(0)?, row.get(1)?, row.get(2)?);
                let count = count as u64;
                match (state, claimed) {
                    (PENDING, 1) => stats.in_flight += count,
                    (PENDING, _) => stats.pending += count,
                    (DELIVERED, _) => stats.delivered += count,
                    (DEAD, _) => stats.dead += count,
                    _ => {}
                }
                if state == PENDING {
                    let oldest: Option<i64> = row.get(3)?;
                    stats.oldest_pending_ms = match (stats.oldest_pending_ms, oldest) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                }
            }
            Ok(stats)
        })
        .await
    }

    async fn ping(&self) -> Result<(), QueueError> {
        self.call(|conn| {
            conn.execute(
                "INSERT INTO heartbeat (id, at) VALUES (1, ?1)
                 ON CONFLICT (id) DO UPDATE SET at = excluded.at",
                params![chrono::Utc::now().timestamp_millis()],
            )
            .map(|_| ())
        })
        .await
    }

    async fn dead_letters(&self, filter: DeadLetterFilter) -> Result<Vec<DeadLetter>, QueueError> {
        self.read(move |conn| {
            let (clause, values) = filter_sql(&filter);
            let sql = format!(
                "SELECT r.id, r.webhook_id, r.kind, COALESCE(r.dead_reason, ''),
                        COALESCE(r.dead_detail, ''), r.subject, r.attempts, r.received_at,
                        r.updated_at
                 FROM records r WHERE {clause} ORDER BY r.id{}",
                limit_sql(&filter)
            );
            let mut statement = conn.prepare(&sql)?;
            let rows = statement.query_map(rusqlite::params_from_iter(values), |row| {
                Ok(DeadLetter {
                    id: row.get(0)?,
                    webhook_id: row.get(1)?,
                    kind: row.get(2)?,
                    reason: row.get(3)?,
                    detail: row.get(4)?,
                    subject: row.get(5)?,
                    attempts: row.get(6)?,
                    received_at_ms: row.get(7)?,
                    dead_at_ms: row.get(8)?,
                })
            })?;
            rows.collect()
        })
        .await
    }

    async fn replay_items(&self, filter: DeadLetterFilter) -> Result<Vec<ReplayItem>, QueueError> {
        self.call(move |conn| {
            let (clause, values) = filter_sql(&filter);
            let sql = format!(
                "SELECT r.id, w.id, w.digest, w.body, w.received_at
                 FROM records r JOIN webhooks w ON w.id = r.webhook_id
                 WHERE {clause} ORDER BY w.id, r.id{}",
                limit_sql(&filter)
            );
            let mut statement = conn.prepare(&sql)?;
            let mut rows = statement.query(rusqlite::params_from_iter(values))?;
            let mut items: Vec<ReplayItem> = Vec::new();
            while let Some(row) = rows.next()? {
                let record_id: i64 = row.get(0)?;
                let webhook_id: i64 = row.get(1)?;
                match items.last_mut() {
                    Some(item) if item.webhook_id == webhook_id => item.dead_ids.push(record_id),
                    _ => {
                        let digest: Vec<u8> = row.get(2)?;
                        let body: Vec<u8> = row.get(3)?;
                        items.push(ReplayItem {
                            webhook_id,
                            digest: digest.try_into().unwrap_or([0; 32]),
                            body: Bytes::from(body),
                            received_at_ms: row.get(4)?,
                            dead_ids: vec![record_id],
                        });
                    }
                }
            }
            Ok(items)
        })
        .await
    }

    async fn requeue(
        &self,
        item: ReplayItem,
        content: Content,
        now_ms: i64,
    ) -> Result<usize, QueueError> {
        let rows = Rows::new(content, &item.digest);
        self.call(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            {
                let mut delete =
                    tx.prepare_cached("DELETE FROM records WHERE id = ?1 AND state = 2")?;
                for id in &item.dead_ids {
                    delete.execute(params![id])?;
                }
            }
            let events = insert_rows(&tx, item.webhook_id, item.received_at_ms, &rows, now_ms)?;
            tx.commit()?;
            Ok(events)
        })
        .await
    }

    async fn purge(&self, filter: DeadLetterFilter) -> Result<u64, QueueError> {
        self.call(move |conn| {
            let (clause, values) = filter_sql(&filter);
            let sql = format!(
                "DELETE FROM records WHERE id IN
                 (SELECT r.id FROM records r WHERE {clause} ORDER BY r.id{})",
                limit_sql(&filter)
            );
            let deleted = conn.execute(&sql, rusqlite::params_from_iter(values))?;
            Ok(deleted as u64)
        })
        .await
    }

    async fn prune(
        &self,
        delivered_before_ms: i64,
        dead_before_ms: i64,
    ) -> Result<u64, QueueError> {
        let mut total = 0;
        // One chunk per call into the thread, so webhooks are never stuck behind a long purge.
        for (sql, cutoff) in [
            (
                "DELETE FROM records WHERE id IN (SELECT id FROM records
                 WHERE state <> 0 AND state = 1 AND updated_at < ?1 LIMIT ?2)",
                delivered_before_ms,
            ),
            (
                "DELETE FROM records WHERE id IN (SELECT id FROM records
                 WHERE state <> 0 AND state = 2 AND updated_at < ?1 LIMIT ?2)",
                dead_before_ms,
            ),
            (
                "DELETE FROM webhooks WHERE id IN (SELECT w.id FROM webhooks w
                 WHERE w.received_at < ?1
                   AND NOT EXISTS (SELECT 1 FROM records r WHERE r.webhook_id = w.id)
                 LIMIT ?2)",
                delivered_before_ms,
            ),
        ] {
            loop {
                let deleted = self
                    .call(move |conn| conn.execute(sql, params![cutoff, PRUNE_CHUNK]))
                    .await?;
                total += deleted as u64;
                if (deleted as i64) < PRUNE_CHUNK {
                    break;
                }
            }
        }
        Ok(total)
    }

    async fn next_due_ms(&self, kind: RecordKind) -> Result<Option<i64>, QueueError> {
        self.call(move |conn| {
            conn.query_row(
                "SELECT MIN(next_attempt_at) FROM records WHERE state = 0 AND kind = ?1",
                params![kind.as_str()],
                |row| row.get(0),
            )
            .optional()
            .map(Option::flatten)
        })
        .await
    }

    async fn delivered_since(&self, kind: RecordKind, since_ms: i64) -> Result<u64, QueueError> {
        // `state <> 0` lets SQLite use the partial index `records_done`.
        self.read(move |conn| {
            conn.query_row(
                "SELECT COUNT(*) FROM records
                 WHERE state <> 0 AND state = 1 AND updated_at >= ?1 AND kind = ?2",
                params![since_ms, kind.as_str()],
                |row| row.get::<_, i64>(0),
            )
        })
        .await
        .map(|count| u64::try_from(count).unwrap_or(0))
    }
}
