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
//!
//! A queue file removed or replaced under the running relay is noticed after the next webhook
//! commit or readiness ping (`file`): from then on webhooks are refused, never acknowledged
//! into an unlinked file. A file that is not an SQLite database fails at open, naming it.
//!
//! A webhook is stored as one row, its records packed into it (`packed`): a 202 waits for one
//! row, not for a row and index entries per record, and not for a random insert into a digest
//! index either (`dedup` keeps the newest digests in memory and writes them in sorted
//! batches). The forwarder unpacks a lane's oldest webhooks into record rows when it claims
//! from the lane, in the claim's transaction; from then on each record has its own state,
//! attempts and dead letter. Counts and due times see packed records as pending. A record
//! row's JSON is kept beside it, in `record_json`, and dropped when it is delivered (see
//! `schema::RECORD_JSON`): a row that shrank would leave a gap in its page.
//!
//! Why nothing acknowledged is lost with this layout, at each step:
//! - *Arrival.* The webhook's row (its digest with it), its packed records and the ids its
//!   records will take are one transaction, committed with `synchronous = FULL` before the
//!   202: after `kill -9` or a power loss the whole row is in the WAL, or the webhook was never
//!   acknowledged (and Userpilot's delivery failed or is retried).
//! - *Unpacking.* Record rows are inserted and the packed value cleared in the same
//!   transaction (the claim's, `synchronous = NORMAL`). A crash before that commit leaves the
//!   webhook packed, and the next claim unpacks it again under the same ids; a power loss
//!   may lose a NORMAL commit that was not yet synced, with the same result. No state holds the
//!   records twice or nowhere.
//! - *Sending and acknowledging.* As before: a lost lease or ack repeats a send under the same
//!   idempotency key. A record's JSON enters `record_json` in the statement sequence that
//!   inserts its row and leaves it by a trigger of the statement that delivers or deletes the
//!   row, so a commit holds both or neither.
//! - *Ids.* The counter row moves in the transaction that uses the ids, so a rolled-back
//!   webhook (or a lost NORMAL commit) gives its ids back with it, and no two records ever
//!   take one id.
//!
//! Here: the handle ([`SqliteQueue`]) and the [`Queue`] operations, which send their work to
//! the thread or, for slow reads, run on a second read-only connection. The thread and its
//! transactions live in `writer`, the DDL and migrations in `schema`, the packing in `packed`,
//! deduplication in `dedup`, the file's identity in `file`.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};

use async_trait::async_trait;
use bytes::Bytes;
use rusqlite::types::Value;
use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior, params};
use tokio::sync::oneshot;

use super::prepared::{Rows, storable};
use super::{
    Claimed, Content, DeadLetter, DeadLetterCount, DeadLetterDetail, DeadLetterFilter, Enqueued,
    ErasureFilter, ErasureRow, ErasureScan, ErasureUpdate, FilterValue, NewErasure, NewWebhook,
    Queue, QueueError, QueueStats, Removed, ReplayItem,
};
use crate::clock::{Clock, SystemClock};
use crate::heap::wire::RecordKind;
use crate::shapes::{ShapeRow, StoredShape};

mod dedup;
mod erasure;
mod file;
mod lock;
mod packed;
mod schema;
mod writer;

use file::QueueFile;
use lock::ServingLock;

use writer::{Command, Wanted, claim_some, insert_rows};

/// Records a bookkeeping transaction (a claim, ack, retry, dead letter) touches before it looks
/// whether webhooks are waiting for the queue thread, and if so commits early and lets them go
/// first: the thread runs one command at a time. Measured at 2,000 webhooks/s while the
/// forwarder drained a backlog: claims and acks of up to 8,000 property records in one
/// transaction gave a p99 acknowledgement latency of 39–52 ms; transactions of 250 records,
/// 10–13 ms; of 100, 9.4–11 ms (5.2–5.8 ms with the forwarder paused). Always cutting them
/// that small cost forwarding a third of its speed at saturation (more commits rewrite the
/// same pages), hence only while webhooks wait. Giving way to the lane's other forwarding task
/// too (`forwarder::control`) was measured and undone: on a 200,000-webhook drain, 6,659
/// events/s and 92 µs of relay CPU per event against 7,074 and 70 without (3 runs each).
const BOOKKEEPING_CHUNK: usize = 100;

/// Rows deleted per pruning statement, so pruning never holds the writer for long.
const PRUNE_CHUNK: i64 = 5000;

/// Counts delivered records of lane `?3` and kind `?1` acknowledged (`updated_at`) since `?2`.
pub(super) const DELIVERED_SINCE: &str = "SELECT COUNT(*) FROM records
    WHERE state = {delivered} AND app_id = ?3 AND kind = ?1 AND updated_at >= ?2";

/// When the earliest pending record of lane `?1` and kind `?2` is due: the first entry of its
/// range of `records_due`.
pub(super) const NEXT_DUE: &str = "SELECT MIN(next_attempt_at) FROM records
    WHERE state = {pending} AND app_id = ?1 AND kind = ?2";

/// When the oldest packed webhook of lane `?1` holding a record of the kind whose bit is `?2`
/// arrived: its records are due then (see `writer::unpack_some`). Read from `webhooks_packed`
/// alone, from the lane's oldest entry on: the first in a lane whose webhooks carry the kind,
/// the whole range in one whose webhooks never do (only the forwarder's idle wait asks).
pub(super) const NEXT_PACKED: &str = "SELECT received_at FROM webhooks
    WHERE packed_count > 0 AND app_id = ?1 AND packed_kinds & ?2 <> 0 ORDER BY id LIMIT 1";

/// Records by lane and state, for [`Queue::stats`] and [`Queue::lane_stats`]: the records
/// table's, then the packed ones, all pending and unclaimed (one row per lane, from the
/// covering `webhooks_packed`).
const STATS: &str = "SELECT app_id, state, claimed, COUNT(*), MIN(received_at) FROM records
    GROUP BY app_id, state, claimed
    UNION ALL
    SELECT app_id, {pending}, 0, SUM(packed_count), MIN(received_at) FROM webhooks
    WHERE packed_count > 0 GROUP BY app_id";

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
    /// The file as opened: webhooks are refused once its path names another (or none).
    file: Arc<QueueFile>,
    /// Dates the heartbeat and the release of leases at start.
    clock: Arc<dyn Clock>,
    /// Held by the serving relay only (`lock`): a second one on the same file refuses to start.
    _serving: Option<ServingLock>,
}

/// Creates the folder of the queue file `path` when missing.
fn create_folder(path: &Path) -> Result<(), QueueError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| QueueError::Storage(format!("cannot create {}: {e}", dir.display())))?;
    }
    Ok(())
}

fn storage(error: rusqlite::Error) -> QueueError {
    QueueError::Storage(error.to_string())
}

impl SqliteQueue {
    /// Opens the queue file for the relay that forwards from it: as [`SqliteQueue::open`],
    /// and leases left by a previous process (killed mid-batch, or mid-way through an
    /// erasure's Heap request) are released at once instead of when they run out, since only one relay forwards from a SQLite file. That one relay
    /// is made sure of first: the exclusive lock on `<path>.lock` (`lock`) is taken before the
    /// file is opened, and a second relay fails here, naming the holder's PID. Tools (`dlq`)
    /// use `open`, which takes no lock, so they work beside the relay and never release its
    /// leases.
    pub async fn open_for_serving(path: &Path) -> Result<Self, QueueError> {
        Self::open_for_serving_with_clock(path, Arc::new(SystemClock)).await
    }

    /// [`SqliteQueue::open_for_serving`] on the given clock.
    pub async fn open_for_serving_with_clock(
        path: &Path,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, QueueError> {
        create_folder(path)?;
        let serving = ServingLock::acquire(path)?;
        let mut queue = Self::open_with_clock(path, clock)?;
        queue._serving = Some(serving);
        let now = queue.clock.now_ms();
        queue
            .call(move |conn| {
                conn.execute(
                    sql!(
                        "UPDATE records SET claimed = 0, next_attempt_at = MIN(next_attempt_at, ?1)
                         WHERE state = {pending} AND claimed = 1"
                    ),
                    params![now],
                )?;
                // The same for erasures whose Heap request a killed relay was making: the
                // serving lock says no other process works on them.
                conn.execute(
                    "UPDATE erasures SET claimed = 0, next_attempt_at = MIN(next_attempt_at, ?1)
                     WHERE claimed = 1",
                    params![now],
                )
            })
            .await?;
        Ok(queue)
    }

    /// Opens (creating when missing) the queue file and starts its thread.
    pub fn open(path: &Path) -> Result<Self, QueueError> {
        Self::open_with_clock(path, Arc::new(SystemClock))
    }

    /// [`SqliteQueue::open`] on the given clock. Every error names the file: a file that is
    /// not an SQLite database (its header overwritten, say) fails here, not at the first
    /// webhook.
    pub fn open_with_clock(path: &Path, clock: Arc<dyn Clock>) -> Result<Self, QueueError> {
        create_folder(path)?;
        let in_file = |error: rusqlite::Error| {
            QueueError::Storage(format!("queue file {}: {error}", path.display()))
        };
        let mut conn = Connection::open(path).map_err(in_file)?;
        schema::prepare(&mut conn).map_err(in_file)?;
        let reader =
            Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(in_file)?;
        reader
            .busy_timeout(std::time::Duration::from_secs(5))
            .map_err(in_file)?;
        schema::stable_plans(&reader).map_err(in_file)?;
        // After the connections: they keep the database, its WAL and shared memory open, so
        // SQLite never recreates them under the names recorded.
        let file = Arc::new(QueueFile::record(path)?);
        let (commands, receiver) = mpsc::channel();
        let waiting = Arc::new(AtomicUsize::new(0));
        let (taken, checked) = (Arc::clone(&waiting), Arc::clone(&file));
        std::thread::Builder::new()
            .name("sqlite-queue".into())
            .spawn(move || writer::serve(conn, receiver, &taken, &checked))
            .map_err(|e| QueueError::Storage(format!("cannot start the queue thread: {e}")))?;
        Ok(Self {
            commands,
            waiting,
            reader: Arc::new(Mutex::new(reader)),
            file,
            clock,
            _serving: None,
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

/// `WHERE` clause and parameters for a dead-letter filter (always restricted to dead records).
fn filter_sql(filter: &DeadLetterFilter) -> (String, Vec<rusqlite::types::Value>) {
    // `state <> 0` lets SQLite use the partial index `records_done`.
    let mut sql = String::from(sql!("r.state <> {pending} AND r.state = {dead}"));
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

#[async_trait]
impl Queue for SqliteQueue {
    async fn enqueue(&self, webhook: NewWebhook) -> Result<Enqueued, QueueError> {
        // The queue thread checks the file after each commit; once it is lost, refuse here.
        self.file.refuse_if_lost()?;
        let (reply, result) = oneshot::channel();
        let webhook = Command::Enqueue(Box::new(webhook.into()), reply);
        self.waiting.fetch_add(1, Ordering::SeqCst);
        if self.commands.send(webhook).is_err() {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(QueueError::Closed);
        }
        result.await.map_err(|_| QueueError::Closed)?
    }

    async fn claim(
        &self,
        app_id: &str,
        kind: RecordKind,
        max: usize,
        now_ms: i64,
        lease_ms: i64,
    ) -> Result<Vec<Claimed>, QueueError> {
        // In as few transactions as webhooks waiting allow (see BOOKKEEPING_CHUNK); each takes
        // the oldest due records left, since the ones leased before are no longer due.
        // It unpacks at most as many webhooks as it wants records (see `writer::claim_some`).
        let mut claimed = Vec::new();
        let mut unpack = max;
        while claimed.len() < max {
            let records = max - claimed.len();
            let wanted = Wanted { records, unpack };
            let (lane, waiting) = (app_id.to_owned(), self.waiting.clone());
            let some = self
                .call(move |conn| {
                    let lease_end = now_ms + lease_ms;
                    claim_some(conn, &lane, kind, wanted, now_ms, lease_end, &waiting)
                })
                .await?;
            claimed.extend(some.records);
            unpack -= some.unpacked;
            if some.exhausted {
                break;
            }
        }
        Ok(claimed)
    }

    async fn renew(&self, ids: Vec<i64>, until_ms: i64) -> Result<(), QueueError> {
        self.update_many(
            sql!(
                "UPDATE records SET next_attempt_at = ?1
                 WHERE state = {pending} AND claimed = 1 AND id = ?2"
            ),
            ids,
            vec![Value::Integer(until_ms)],
        )
        .await
    }

    async fn ack(&self, ids: Vec<i64>, now_ms: i64) -> Result<(), QueueError> {
        self.update_many(
            sql!(
                "UPDATE records SET state = {delivered}, claimed = 0, json = '', updated_at = ?1
                 WHERE state = {pending} AND id = ?2"
            ),
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
            sql!(
                "UPDATE records SET claimed = 0, next_attempt_at = ?1,
                 attempts = attempts + ?2, last_error = COALESCE(?3, last_error)
                 WHERE state = {pending} AND id = ?4"
            ),
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
        failed: bool,
        now_ms: i64,
    ) -> Result<(), QueueError> {
        self.update_many(
            sql!(
                "UPDATE records SET state = {dead}, claimed = 0, dead_reason = ?1, dead_detail = ?2,
                        updated_at = ?3, attempts = attempts + ?4
                 WHERE state = {pending} AND id = ?5"
            ),
            ids,
            vec![
                Value::Text(storable(reason)),
                Value::Text(storable(detail)),
                Value::Integer(now_ms),
                Value::Integer(i64::from(failed)),
            ],
        )
        .await
    }

    /// A range of the partial index `records_delivered` (`(app_id, kind, updated_at)` of the
    /// delivered records): only the lane's deliveries of the window are read.
    async fn delivered_since(
        &self,
        app_id: &str,
        kind: RecordKind,
        since_ms: i64,
    ) -> Result<u64, QueueError> {
        let lane = app_id.to_owned();
        self.read(move |conn| {
            conn.prepare_cached(sql!(DELIVERED_SINCE))?
                .query_row(params![kind.as_str(), since_ms, lane], |row| {
                    row.get::<_, i64>(0)
                })
                .map(|count| count as u64)
        })
        .await
    }

    async fn stats(&self, now_ms: i64) -> Result<QueueStats, QueueError> {
        Ok(QueueStats::sum(self.lane_stats(now_ms).await?.values()))
    }

    async fn lane_stats(&self, _now_ms: i64) -> Result<BTreeMap<String, QueueStats>, QueueError> {
        self.read(|conn| {
            let mut lanes: BTreeMap<String, QueueStats> = BTreeMap::new();
            let mut statement = conn.prepare_cached(sql!(STATS))?;
            let mut rows = statement.query([])?;
            while let Some(row) = rows.next()? {
                let count: i64 = row.get(3)?;
                lanes.entry(row.get(0)?).or_default().add(
                    row.get(1)?,
                    row.get(2)?,
                    count as u64,
                    row.get(4)?,
                );
            }
            Ok(lanes)
        })
        .await
    }

    /// Through `records_unassigned`, which holds only the records not yet adopted, and the
    /// lane `''` of `webhooks_packed` for records still packed.
    async fn adopt_unassigned(&self, app_id: &str) -> Result<u64, QueueError> {
        let lane = app_id.to_owned();
        self.call(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let rows = tx.execute(
                "UPDATE records SET app_id = ?1 WHERE app_id = '' AND ?1 <> ''",
                params![lane],
            )?;
            let packed: i64 = tx.query_row(
                "SELECT COALESCE(SUM(packed_count), 0) FROM webhooks
                 WHERE packed_count > 0 AND app_id = '' AND ?1 <> ''",
                params![lane],
                |row| row.get(0),
            )?;
            tx.execute(
                "UPDATE webhooks SET app_id = ?1 WHERE packed_count > 0 AND app_id = '' AND ?1 <> ''",
                params![lane],
            )?;
            tx.commit()?;
            Ok(rows as u64 + packed as u64)
        })
        .await
    }

    /// A heartbeat write, then whether the path still names the file written to (a write to
    /// a removed file succeeds, and is lost at the next start).
    async fn ping(&self) -> Result<(), QueueError> {
        let (now, file) = (self.clock.now_ms(), Arc::clone(&self.file));
        self.call(move |conn| {
            conn.execute(
                "INSERT INTO heartbeat (id, at) VALUES (1, ?1)
                 ON CONFLICT (id) DO UPDATE SET at = excluded.at",
                params![now],
            )?;
            Ok(file.check())
        })
        .await?
    }

    async fn dead_letters(&self, filter: DeadLetterFilter) -> Result<Vec<DeadLetter>, QueueError> {
        self.read(move |conn| {
            let (clause, values) = filter_sql(&filter);
            let sql = format!(
                "SELECT r.id, r.webhook_id, r.kind, COALESCE(r.dead_reason, ''),
                        COALESCE(r.dead_detail, ''), r.subject, r.attempts, r.received_at,
                        r.updated_at,
                        COALESCE((SELECT w.source FROM webhooks w WHERE w.id = r.webhook_id), ''),
                        r.app_id
                 FROM records r WHERE {clause} ORDER BY r.id{}",
                limit_sql(&filter)
            );
            let mut statement = conn.prepare(&sql)?;
            let rows = statement.query_map(rusqlite::params_from_iter(values), dead_letter_from)?;
            rows.collect()
        })
        .await
    }

    async fn dead_letter_detail(&self, id: i64) -> Result<Option<DeadLetterDetail>, QueueError> {
        self.read(move |conn| {
            conn.prepare_cached(sql!(
                "SELECT r.id, r.webhook_id, r.kind, COALESCE(r.dead_reason, ''),
                        COALESCE(r.dead_detail, ''), r.subject, r.attempts, r.received_at,
                        r.updated_at, w.source, r.app_id,
                        COALESCE((SELECT j.json FROM record_json j WHERE j.id = r.id), r.json),
                        r.last_error, w.body
                 FROM records r JOIN webhooks w ON w.id = r.webhook_id
                 WHERE r.state <> {pending} AND r.state = {dead} AND r.id = ?1"
            ))?
            .query_row(params![id], |row| {
                Ok(DeadLetterDetail {
                    letter: dead_letter_from(row)?,
                    json: row.get(11)?,
                    last_error: row.get(12)?,
                    body: Bytes::from(row.get::<_, Vec<u8>>(13)?),
                })
            })
            .optional()
        })
        .await
    }

    async fn count_dead_letters(
        &self,
        filter: DeadLetterFilter,
    ) -> Result<DeadLetterCount, QueueError> {
        self.read(move |conn| {
            let (clause, values) = filter_sql(&filter);
            // In replay's order, so that a limit counts the webhooks a replay would take.
            let sql = format!(
                "SELECT COUNT(*), COUNT(DISTINCT webhook_id) FROM
                 (SELECT r.id, r.webhook_id FROM records r WHERE {clause}
                  ORDER BY r.webhook_id, r.id{})",
                limit_sql(&filter)
            );
            conn.query_row(&sql, rusqlite::params_from_iter(values), |row| {
                Ok(DeadLetterCount {
                    dead_letters: row.get::<_, i64>(0)? as u64,
                    webhooks: row.get::<_, i64>(1)? as u64,
                })
            })
        })
        .await
    }

    async fn replay_items(
        &self,
        filter: DeadLetterFilter,
        webhooks: usize,
    ) -> Result<Vec<ReplayItem>, QueueError> {
        self.call(move |conn| {
            // The filter twice: once to choose the page's webhooks (walking the
            // `(webhook_id, key)` index from the last page on), once for their selected records.
            let (clause, mut values) = filter_sql(&filter);
            values.extend(values.clone());
            let sql = format!(
                "SELECT r.id, w.id, w.digest, w.body, w.received_at, w.source
                 FROM records r JOIN webhooks w ON w.id = r.webhook_id
                 WHERE {clause} AND r.webhook_id IN
                   (SELECT DISTINCT r.webhook_id FROM records r WHERE {clause}
                    ORDER BY r.webhook_id LIMIT {webhooks})
                 ORDER BY w.id, r.id"
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
                            source: row.get(5)?,
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
        app_id: &str,
        now_ms: i64,
    ) -> Result<usize, QueueError> {
        let rows = Rows::new(content, &item.digest);
        let lane = storable(app_id.to_owned());
        self.call(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            {
                let mut delete = tx
                    .prepare_cached(sql!("DELETE FROM records WHERE id = ?1 AND state = {dead}"))?;
                for id in &item.dead_ids {
                    delete.execute(params![id])?;
                }
            }
            let events = insert_rows(
                &tx,
                item.webhook_id,
                &lane,
                item.received_at_ms,
                &rows,
                now_ms,
            )?;
            tx.commit()?;
            Ok(events)
        })
        .await
    }

    async fn shapes(&self, source: Option<String>) -> Result<Vec<StoredShape>, QueueError> {
        self.read(move |conn| {
            let mut select = conn.prepare_cached(
                "SELECT key, source, kind, action, paths, count, first_seen, last_seen, sample
                 FROM shapes WHERE ?1 IS NULL OR source = ?1 ORDER BY last_seen DESC, key",
            )?;
            let rows = select.query_map(params![source], |row| {
                Ok(StoredShape::from(ShapeRow {
                    key: row.get(0)?,
                    source: row.get(1)?,
                    kind: row.get(2)?,
                    action: row.get(3)?,
                    paths: row.get(4)?,
                    count: row.get(5)?,
                    first_seen_ms: row.get(6)?,
                    last_seen_ms: row.get(7)?,
                    sample: row.get(8)?,
                }))
            })?;
            rows.collect()
        })
        .await
    }

    async fn shape_keys(&self) -> Result<Vec<(String, [u8; 32])>, QueueError> {
        self.read(|conn| {
            let mut select = conn.prepare_cached("SELECT source, key FROM shapes")?;
            let rows = select.query_map([], |row| {
                let key: Vec<u8> = row.get(1)?;
                Ok((row.get(0)?, <[u8; 32]>::try_from(key.as_slice()).ok()))
            })?;
            let keys = rows.collect::<rusqlite::Result<Vec<(String, Option<[u8; 32]>)>>>()?;
            Ok(keys
                .into_iter()
                .filter_map(|(source, key)| Some((source, key?)))
                .collect())
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
                sql!(
                    "DELETE FROM records WHERE id IN (SELECT id FROM records
                     WHERE state <> {pending} AND state = {delivered} AND updated_at < ?1 LIMIT ?2)"
                ),
                delivered_before_ms,
            ),
            (
                sql!(
                    "DELETE FROM records WHERE id IN (SELECT id FROM records
                     WHERE state <> {pending} AND state = {dead} AND updated_at < ?1 LIMIT ?2)"
                ),
                dead_before_ms,
            ),
            (
                "DELETE FROM webhooks WHERE id IN (SELECT w.id FROM webhooks w
                 WHERE w.received_at < ?1 AND w.packed_count = 0
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

    async fn next_due_ms(&self, app_id: &str, kind: RecordKind) -> Result<Option<i64>, QueueError> {
        let lane = app_id.to_owned();
        self.call(move |conn| {
            let record: Option<i64> = conn
                .prepare_cached(sql!(NEXT_DUE))?
                .query_row(params![lane, kind.as_str()], |row| row.get(0))?;
            let packed: Option<i64> = conn
                .prepare_cached(NEXT_PACKED)?
                .query_row(params![lane, packed::kind_bit(kind)], |row| row.get(0))
                .optional()?;
            Ok(record.into_iter().chain(packed).min())
        })
        .await
    }
    async fn erasure_scan(
        &self,
        source: &str,
        identity: &str,
        after_id: i64,
        scan: usize,
    ) -> Result<ErasureScan, QueueError> {
        erasure::scan(self, source, identity, after_id, scan).await
    }

    async fn erase_webhooks(&self, ids: Vec<i64>) -> Result<Removed, QueueError> {
        erasure::erase_webhooks(self, ids).await
    }

    async fn erase_samples(&self, source: &str, identity: &str) -> Result<u64, QueueError> {
        erasure::erase_samples(self, source, identity).await
    }

    async fn scrub(&self) -> Result<(), QueueError> {
        erasure::scrub(self).await
    }

    async fn record_erasure(&self, erasure: NewErasure) -> Result<i64, QueueError> {
        erasure::record(self, erasure).await
    }

    async fn erasures(&self, filter: ErasureFilter) -> Result<Vec<ErasureRow>, QueueError> {
        erasure::list(self, filter).await
    }

    async fn claim_erasures(
        &self,
        now_ms: i64,
        lease_ms: i64,
        max: usize,
    ) -> Result<Vec<ErasureRow>, QueueError> {
        erasure::claim(self, now_ms, lease_ms, max).await
    }

    async fn update_erasure(
        &self,
        id: i64,
        update: ErasureUpdate,
        now_ms: i64,
    ) -> Result<(), QueueError> {
        erasure::update(self, id, update, now_ms).await
    }

    async fn next_erasure_due_ms(&self) -> Result<Option<i64>, QueueError> {
        erasure::next_due_ms(self).await
    }

    async fn still_pending(&self, ids: Vec<i64>) -> Result<Vec<i64>, QueueError> {
        erasure::still_pending(self, ids).await
    }
}

/// A dead letter from the first eleven columns of a row: id, webhook id, kind, reason, detail,
/// subject, attempts, received at, dead at, source, app id (the listing's and the detail's
/// common part).
fn dead_letter_from(row: &rusqlite::Row<'_>) -> rusqlite::Result<DeadLetter> {
    Ok(DeadLetter {
        id: row.get(0)?,
        webhook_id: row.get(1)?,
        source: row.get(9)?,
        app_id: row.get(10)?,
        kind: row.get(2)?,
        reason: row.get(3)?,
        detail: row.get(4)?,
        subject: row.get(5)?,
        attempts: row.get(6)?,
        received_at_ms: row.get(7)?,
        dead_at_ms: row.get(8)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What SQLite's planner makes of `sql` on a fresh queue file.
    fn plan(sql: &str) -> String {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("queue.sqlite3");
        drop(SqliteQueue::open(&path).unwrap());
        // Planned as the queue's own connections plan: without looking at bound values.
        let conn = Connection::open(&path).unwrap();
        schema::stable_plans(&conn).unwrap();
        let mut statement = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        let parameters = rusqlite::params_from_iter(
            ["track", "0", "10", "app-1"]
                .iter()
                .take(statement.parameter_count()),
        );
        let rows = statement
            .query_map(parameters, |row| row.get::<_, String>(3))
            .unwrap();
        rows.map(Result::unwrap).collect::<Vec<_>>().join("; ")
    }

    #[test]
    fn delivered_since_reads_its_lanes_range_of_the_delivered_index_not_the_table() {
        let plan = plan(sql!(DELIVERED_SINCE));
        assert!(
            plan.contains(
                "USING COVERING INDEX records_delivered (app_id=? AND kind=? AND updated_at>?)"
            ),
            "{plan}"
        );
    }

    #[test]
    fn claims_read_their_lanes_range_of_the_due_index_not_the_table() {
        let plan = plan(sql!(writer::CLAIM_DUE));
        assert!(
            plan.contains("USING INDEX records_due (app_id=? AND kind=? AND next_attempt_at<?)"),
            "{plan}"
        );
    }

    #[test]
    fn next_due_reads_the_first_entry_of_its_lanes_range_of_the_due_index() {
        let plan = plan(sql!(NEXT_DUE));
        assert!(
            plan.contains("USING COVERING INDEX records_due (app_id=? AND kind=?)"),
            "{plan}"
        );
    }

    #[test]
    fn a_digest_is_looked_up_by_its_prefix_then_its_row() {
        let plan = plan(
            "SELECT EXISTS (SELECT 1 FROM digests d JOIN webhooks w ON w.id = d.webhook_id
             WHERE d.prefix = ?1 AND w.digest = ?2 AND w.source = ?3)",
        );
        assert!(
            plan.contains("SEARCH d USING PRIMARY KEY (prefix=?)")
                && plan.contains("SEARCH w USING INTEGER PRIMARY KEY (rowid=?)"),
            "{plan}"
        );
    }

    #[test]
    fn packed_webhooks_are_read_through_their_lanes_range_of_the_packed_index() {
        let next = plan(NEXT_PACKED);
        assert!(
            next.contains("USING COVERING INDEX webhooks_packed (app_id=?)"),
            "{next}"
        );
        let unpack = plan(
            "SELECT id, received_at, packed, digest FROM webhooks
             WHERE packed_count > 0 AND app_id = ?1 ORDER BY id LIMIT ?2",
        );
        assert!(
            unpack.contains("USING INDEX webhooks_packed (app_id=?)"),
            "{unpack}"
        );
        assert!(!unpack.contains("TEMP B-TREE"), "no sort: {unpack}");
        let stats = plan(sql!(STATS));
        assert!(
            stats.contains("USING COVERING INDEX webhooks_packed"),
            "{stats}"
        );
    }

    #[test]
    fn adopting_reads_the_unassigned_index_not_the_table() {
        let plan = plan("UPDATE records SET app_id = ?1 WHERE app_id = '' AND ?1 <> ''");
        assert!(plan.contains("records_unassigned"), "{plan}");
    }

    #[test]
    fn a_file_that_is_not_a_database_fails_at_open_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("queue.sqlite3");
        // A queue file closed cleanly (no WAL left whose copy of page 1 would stand in for it).
        let conn = Connection::open(&path).unwrap();
        schema::prepare(&mut { conn }).unwrap();
        assert!(!dir.path().join("queue.sqlite3-wal").exists());
        // The 100-byte header overwritten, as by a stray `dd` or a restore gone wrong.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[..100].fill(b'x');
        std::fs::write(&path, bytes).unwrap();
        let error = SqliteQueue::open(&path).err().unwrap().to_string();
        assert!(error.contains(&path.display().to_string()), "{error}");
        assert!(error.contains("not a database"), "{error}");
    }
}
