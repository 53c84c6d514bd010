//! The shared queue: PostgreSQL, for several relay replicas behind one load balancer. Same
//! model and semantics as [`super::sqlite`] (the reference): a `webhooks` table (unique
//! (source, digest), verified body) and a `records` table (unique key within its webhook, the
//! lane `app_id`, [`RecordState`] pending / delivered / dead, `next_attempt_at` = due time, or
//! the lease's end while claimed). All times are unix
//! milliseconds passed in by the caller, except the heartbeat, which uses the server's clock.
//!
//! **Ingest.** [`COMMITTERS`] background tasks commit concurrent [`Queue::enqueue`] calls in
//! groups (group commit): a committer takes the webhooks waiting, up to [`MAX_GROUP`], and
//! stores the whole group in one statement (its new webhooks, then all their records) that
//! commits on its own: one round trip and one flush per group, and while a committer waits for
//! it, another takes the next group. A caller hears back only after the commit. Deduplication
//! is `INSERT ... ON CONFLICT (source, digest) DO NOTHING`, which holds across replicas; of the
//! same body on the same source twice in one group, the first is new and the second a duplicate. If the server refuses
//! the statement for something in it (a value Postgres cannot store), the group is redone in
//! one transaction with a savepoint per webhook, so the webhook at fault fails alone. If the
//! connection breaks or the commit fails, every webhook of the group gets the error (a 503):
//! none is acknowledged unless committed. Every group, on every replica, inserts its webhooks
//! in (source, digest) order, so two transactions inserting the same new bodies take the dedup
//! index's locks in the same order: one waits for the other and then finds duplicates, and they cannot
//! deadlock. (Records cannot collide across transactions: their keys are unique per webhook.)
//!
//! **Claims.** `SELECT ... FOR UPDATE SKIP LOCKED` picks due records and the same statement
//! leases them (`claimed = 1`, `next_attempt_at` = lease end, `claimed_by` = this replica), so
//! two claimers never get the same record. An expired lease makes a record claimable again;
//! there is no reset at startup as with SQLite, since other replicas may hold live leases.
//!
//! **One forwarder per lane at a time (leadership).** Heap's rate limits are per app id, and
//! each replica's limiter only knows its own traffic, so only one replica forwards a lane (an
//! app id) at a time: the one holding the session-level advisory lock
//! `pg_try_advisory_lock(leader_lock_key(app_id))` ([`leader_lock_key`]). Every lane's lock
//! lives on one dedicated connection per replica, so replicas may lead different lanes.
//! [`Queue::claim`]`(app_id, ..)` tries (or keeps) that lane's lock, at most every
//! [`LEADER_CHECK_EVERY`] per lane, and returns nothing on a replica that does not hold it
//! (and [`Queue::next_due_ms`] tells its forwarder nothing is due in that lane). The leader
//! probes its dedicated connection at the same pace; if it breaks, every lane's leadership is
//! dropped at once (the server has released the locks with the session). A killed replica's
//! session ends, so another replica takes over each of its lanes at its next claim, within
//! about two seconds. The dead leader's claimed records come back when their lease expires —
//! or sooner: every connection of a replica carries
//! `application_name = userpilot-heap-relay/<replica id>`, and a lane's leader, when it takes
//! over and then every probe, releases the lane's leases whose replica has no session left
//! (`pg_stat_activity`). A replica that is alive but lost only its dedicated connection keeps
//! its leases until they expire, so its batch in flight is not sent twice. A new leader's
//! forwarder charges its rate budget with what the lane delivered in the last minute
//! ([`Queue::delivered_since`]), so a takeover does not reset Heap's budget. The gauge
//! `relay_queue_leader{app_id}` is 1 on the replica that forwards that lane.
//! Consequences: the lock key space is per database (two deployments sharing one database
//! and one app id would share its leadership); no transaction-pooling proxy (pgbouncer in
//! transaction mode) in front, since session locks need sessions; replicas' clocks should
//! agree to well within a lease.
//!
//! **TLS.** `sslmode` in the URL means what it means to libpq (rustls underneath):
//! `disable`: plain text; `prefer` (the default): TLS if the server offers it, else plain;
//! `require`: TLS or no connection, the certificate not checked (encrypted, but not proof of
//! who answers); `verify-ca`: TLS with a certificate signed by a trusted root; `verify-full`: the
//! same, and issued for the host named in the URL. Trusted roots: those in the PEM file
//! `sslrootcert=PATH` (only those; as in libpq, naming one makes `prefer` and `require` check
//! the chain too), else the system's CA certificates (the OpenSSL locations, `SSL_CERT_FILE`,
//! `SSL_CERT_DIR`), so an operator's private CA works once installed there; on a system with
//! none, the Mozilla roots built in. `sslrootcert=system` names the system's explicitly and, as
//! in libpq 16, implies `verify-full`. A failed check fails the connection: it never falls
//! back to plain text. Unlike libpq: no `allow`; `~/.postgresql/root.crt` is not read; a failed
//! handshake under `prefer` is an error, not a retry in the clear; no client certificates; and
//! a key=value connection string (not a URL) knows only `disable`, `prefer` and `require`.
//!
//! **Failures.** Pool waits, connects and recycles are bounded by [`CONNECT_TIMEOUT`], statements
//! by `statement_timeout`; while Postgres is unreachable every call fails quickly with
//! [`QueueError::Storage`] (webhooks get 503, `/readyz` 503), and the pool reconnects by itself
//! when it is back. Migrations run at startup in one transaction under an advisory lock, so
//! replicas starting together apply them once.
//!
//! **Erasures** (contract §12, schema v5): a person's webhooks are found by a read-only scan,
//! erased a chunk per transaction (records deleted, body emptied, digest kept), and the tables
//! are then vacuumed (plain VACUUM: inserts and claims go on) so that no row version holds the
//! erased content; see `erasure` for what VACUUM does not reach (free space, WAL, backups).
//!
//! Here: the handle ([`PostgresQueue`]), its pool and the [`Queue`] operations; group commit
//! lives in `ingest`, leadership in `leader`, erasures in `erasure`, the DDL and migrations in
//! `schema`, `sslmode` in `tls`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio_postgres::types::ToSql;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::prepared::{Prepared, Rows, storable};
use super::{
    Claimed, Content, DeadLetter, DeadLetterCount, DeadLetterDetail, DeadLetterFilter, Enqueued,
    ErasureFilter, ErasureRow, ErasureScan, ErasureUpdate, FilterValue, NewErasure, NewWebhook,
    Queue, QueueError, QueueStats, Removed, ReplayItem,
};
use crate::clock::{Clock, SystemClock};
use crate::heap::wire::RecordKind;
use crate::shapes::{ShapeRow, StoredShape};

mod erasure;
mod ingest;
mod leader;
mod schema;
mod tls;

pub use leader::{LEADER_CHECK_EVERY, leader_lock_key};
use leader::{Leadership, ROLE_FOLLOWER, ROLE_LEADER};

/// Connections in the pool (the dedicated leadership connection is extra).
const POOL_SIZE: usize = 16;

/// Bound on waiting for a pooled connection, on connecting, and on recycling one.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Server-side bound on any one statement.
const STATEMENT_TIMEOUT_MS: u64 = 10_000;

/// The most webhooks committed in one transaction. A group goes in as one statement whatever
/// its size, but the fallback gives each webhook a savepoint, and Postgres slows every session
/// down once a transaction has more than 64 subtransactions. Larger groups would save little:
/// with [`COMMITTERS`] groups in flight at once, 256 webhooks are being committed already.
const MAX_GROUP: usize = 64;

/// Group-commit tasks, each committing one group at a time on a connection of its own, so that
/// one group's wait for the server's flush (and the network) overlaps the next group's work.
/// Measured (relay-bench, 32 webhooks in flight, the durable cluster on a 2-core machine): with
/// commits made to take 3 ms (`commit_delay`), as on a database across a network, 1, 2 and 4
/// committers took 3,450, 3,750 and 4,950 webhooks/s; with the local disk's 0.1 ms flush,
/// where the machine's CPU is the limit and smaller groups cost more of it, 15,100, 12,200 and
/// 10,300/s (medians of 2 to 5 runs). A shared database is across a network, hence 4. They
/// hold at most 4 of the pool's [`POOL_SIZE`] connections.
pub const COMMITTERS: usize = 4;

/// Rows deleted per pruning statement.
const PRUNE_CHUNK: i64 = 5000;

/// Prefix of `application_name`, followed by the replica id.
const APPLICATION: &str = "userpilot-heap-relay/";

/// Leases the oldest due records of lane `$6` and kind `$1` at `$2`, at most `$3`, until `$4`
/// for replica `$5`: a range of `records_due`, skipping records another claim has locked.
pub(crate) const CLAIM_DUE: &str = "WITH picked AS (
    SELECT id, next_attempt_at AS due FROM records
    WHERE state = {pending} AND app_id = $6 AND kind = $1 AND next_attempt_at <= $2
    ORDER BY next_attempt_at, id LIMIT $3
    FOR UPDATE SKIP LOCKED
)
UPDATE records r SET claimed = 1, claimed_by = $5, next_attempt_at = $4
FROM picked WHERE r.id = picked.id
RETURNING r.id, r.subject, r.json, r.attempts, r.received_at, picked.due,
    (SELECT w.digest FROM webhooks w WHERE w.id = r.webhook_id),
    (SELECT w.received_at FROM webhooks w WHERE w.id = r.webhook_id)";

/// Counts delivered records of lane `$3` and kind `$1` acknowledged since `$2`: a range of
/// `records_delivered`.
pub(crate) const DELIVERED_SINCE: &str = "SELECT COUNT(*) FROM records
    WHERE state = {delivered} AND app_id = $3 AND kind = $1 AND updated_at >= $2";

/// When the earliest pending record of lane `$1` and kind `$2` is due: the first entry of its
/// range of `records_due`.
pub(crate) const NEXT_DUE: &str = "SELECT MIN(next_attempt_at) FROM records
    WHERE state = {pending} AND app_id = $1 AND kind = $2";

type Reply<T> = oneshot::Sender<Result<T, QueueError>>;
type Param = Box<dyn ToSql + Sync + Send>;

fn storage(error: tokio_postgres::Error) -> QueueError {
    match error.as_db_error() {
        Some(db) => {
            QueueError::Storage(format!("postgres: {} ({})", db.message(), db.code().code()))
        }
        None => match std::error::Error::source(&error) {
            Some(cause) => QueueError::Storage(format!("postgres: {error}: {cause}")),
            None => QueueError::Storage(format!("postgres: {error}")),
        },
    }
}

fn unavailable(error: deadpool_postgres::PoolError) -> QueueError {
    match error {
        deadpool_postgres::PoolError::Backend(error) => storage(error),
        other => QueueError::Storage(format!("postgres unavailable: {other}")),
    }
}

fn timed_out(what: &str) -> QueueError {
    QueueError::Storage(format!("postgres: {what} timed out"))
}

/// Handle to the shared queue. Cheap to share behind an `Arc`.
pub struct PostgresQueue {
    pool: Pool,
    config: tokio_postgres::Config,
    /// TLS for the dedicated session, as for the pool's.
    connector: MakeRustlsConnect,
    enqueues: mpsc::Sender<ingest::Waiting>,
    /// This replica's `application_name`, also stored in `claimed_by`.
    replica: String,
    leadership: Mutex<Leadership>,
    /// Each lane's role at its last check ([`ROLE_LEADER`] or [`ROLE_FOLLOWER`]; none before
    /// the first), read without waiting for a check in progress.
    roles: std::sync::Mutex<HashMap<String, u8>>,
    /// Paces the leadership checks (see [`LEADER_CHECK_EVERY`]).
    clock: Arc<dyn Clock>,
}

impl PostgresQueue {
    /// Connects, applies migrations and starts the group-commit tasks. Leadership is per lane,
    /// taken by the claims themselves.
    pub async fn connect(url: &str) -> Result<Self, QueueError> {
        Self::connect_with_clock(url, Arc::new(SystemClock)).await
    }

    /// [`PostgresQueue::connect`] on the given clock.
    pub async fn connect_with_clock(url: &str, clock: Arc<dyn Clock>) -> Result<Self, QueueError> {
        let (url, requested) = tls::take_params(url)?;
        let mut config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| QueueError::Storage(format!("postgres_url: {e}")))?;
        let tls = tls::Tls::resolve(requested, config.get_ssl_mode())?;
        config.ssl_mode(tls.wire_mode());
        let connector = tls.connector()?;
        let replica = format!("{APPLICATION}{}", uuid::Uuid::new_v4().simple());
        let options = format!(
            "{} -c statement_timeout={STATEMENT_TIMEOUT_MS}",
            config.get_options().unwrap_or_default()
        );
        config
            .application_name(&replica)
            .options(options.trim_start())
            .connect_timeout(CONNECT_TIMEOUT)
            .keepalives_idle(Duration::from_secs(10))
            .keepalives_interval(Duration::from_secs(2))
            .keepalives_retries(3);
        #[cfg(any(target_os = "linux", target_os = "android"))]
        config.tcp_user_timeout(Duration::from_secs(10));

        let manager = Manager::from_config(
            config.clone(),
            connector.clone(),
            ManagerConfig {
                // A closed connection is noticed by `is_closed`; a broken one fails its next
                // statement, which then closes it.
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(CONNECT_TIMEOUT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .recycle_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|e| QueueError::Storage(format!("postgres pool: {e}")))?;
        schema::migrate(&pool).await?;

        let (enqueues, receiver) = mpsc::channel(COMMITTERS * MAX_GROUP);
        let receiver = Arc::new(Mutex::new(receiver));
        for _ in 0..COMMITTERS {
            tokio::spawn(ingest::group_commit(pool.clone(), Arc::clone(&receiver)));
        }
        Ok(Self {
            pool,
            config,
            connector,
            enqueues,
            replica,
            leadership: Mutex::default(),
            roles: std::sync::Mutex::default(),
            clock,
        })
    }

    /// Whether this replica held lane `app_id`'s leader lock at its last check.
    pub fn is_leader(&self, app_id: &str) -> bool {
        self.role(app_id) == Some(ROLE_LEADER)
    }

    fn role(&self, app_id: &str) -> Option<u8> {
        self.roles
            .lock()
            .ok()
            .and_then(|roles| roles.get(app_id).copied())
    }

    /// This replica's id as seen by Postgres (`application_name`).
    pub fn replica_id(&self) -> &str {
        &self.replica
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, QueueError> {
        self.pool.get().await.map_err(unavailable)
    }

    /// Runs one statement on a pooled connection; returns the rows affected.
    async fn execute(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64, QueueError> {
        let client = self.client().await?;
        let statement = client.prepare_cached(sql).await.map_err(storage)?;
        client.execute(&statement, params).await.map_err(storage)
    }

    async fn query(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, QueueError> {
        let client = self.client().await?;
        let statement = client.prepare_cached(sql).await.map_err(storage)?;
        client.query(&statement, params).await.map_err(storage)
    }
}

/// `WHERE` clause and parameters for a dead-letter filter (always restricted to dead records).
fn filter_sql(filter: &DeadLetterFilter) -> (String, Vec<Param>) {
    let mut sql = String::from(sql!("r.state = {dead}"));
    let mut values: Vec<Param> = Vec::new();
    // `?` in the condition becomes the parameter's `$n`.
    let mut clause = |condition: &str, value: Param| {
        values.push(value);
        sql.push_str(" AND ");
        sql.push_str(&condition.replace('?', &format!("${}", values.len())));
    };
    if !filter.ids.is_empty() {
        clause("r.id = ANY(?)", Box::new(filter.ids.clone()));
    }
    for (condition, value) in filter.conditions() {
        let value: Param = match value {
            FilterValue::Text(text) => Box::new(text),
            FilterValue::Integer(int) => Box::new(int),
        };
        clause(condition, value);
    }
    (sql, values)
}

/// ` LIMIT $n` when the filter has a limit, bound as the next parameter (so the statement
/// text, which the connection caches, does not vary with the limit).
fn limit_sql(filter: &DeadLetterFilter, values: &mut Vec<Param>) -> String {
    match filter.limit {
        Some(limit) => {
            values.push(Box::new(i64::try_from(limit).unwrap_or(i64::MAX)));
            format!(" LIMIT ${}", values.len())
        }
        None => String::new(),
    }
}

fn refs(values: &[Param]) -> Vec<&(dyn ToSql + Sync)> {
    values
        .iter()
        .map(|value| value.as_ref() as &(dyn ToSql + Sync))
        .collect()
}

/// A dead letter from the first eleven columns of a row: id, webhook id, kind, reason, detail,
/// subject, attempts, received at, dead at, source, app id (the listing's and the detail's
/// common part).
fn dead_letter_from(row: &tokio_postgres::Row) -> Result<DeadLetter, tokio_postgres::Error> {
    Ok(DeadLetter {
        id: row.try_get(0)?,
        webhook_id: row.try_get(1)?,
        source: row.try_get(9)?,
        app_id: row.try_get(10)?,
        kind: row.try_get(2)?,
        reason: row.try_get(3)?,
        detail: row.try_get(4)?,
        subject: row.try_get(5)?,
        attempts: attempts(row.try_get(6)?),
        received_at_ms: row.try_get(7)?,
        dead_at_ms: row.try_get(8)?,
    })
}

fn attempts(value: i32) -> u32 {
    u32::try_from(value).unwrap_or(0)
}

#[async_trait]
impl Queue for PostgresQueue {
    async fn enqueue(&self, webhook: NewWebhook) -> Result<Enqueued, QueueError> {
        let (reply, result) = oneshot::channel();
        self.enqueues
            .send((Prepared::from(webhook), reply))
            .await
            .map_err(|_| QueueError::Closed)?;
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
        if max == 0 || !self.lead(app_id, now_ms).await? {
            return Ok(Vec::new());
        }
        let rows = self
            .query(
                sql!(CLAIM_DUE),
                &[
                    &kind.as_str(),
                    &now_ms,
                    &(max as i64),
                    &(now_ms + lease_ms),
                    &self.replica,
                    &app_id,
                ],
            )
            .await?;
        let mut claimed = Vec::with_capacity(rows.len());
        for row in rows {
            let due: i64 = row.try_get(5).map_err(storage)?;
            let record = Claimed {
                id: row.try_get(0).map_err(storage)?,
                kind,
                subject: row.try_get(1).map_err(storage)?,
                json: row.try_get(2).map_err(storage)?,
                attempts: attempts(row.try_get(3).map_err(storage)?),
                received_at_ms: row.try_get(4).map_err(storage)?,
                // Trace links derive from it; a missing one or one of another length (never
                // written) reads as zeros, which only makes a link point nowhere.
                webhook_digest: row
                    .try_get::<_, Option<&[u8]>>(6)
                    .map_err(storage)?
                    .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
                    .unwrap_or([0; 32]),
                webhook_received_at_ms: row
                    .try_get::<_, Option<i64>>(7)
                    .map_err(storage)?
                    .unwrap_or_default(),
            };
            claimed.push((due, record));
        }
        claimed.sort_by_key(|(due, record)| (*due, record.id));
        Ok(claimed.into_iter().map(|(_, record)| record).collect())
    }

    async fn renew(&self, ids: Vec<i64>, until_ms: i64) -> Result<(), QueueError> {
        self.execute(
            sql!(
                "UPDATE records SET next_attempt_at = $1
                 WHERE state = {pending} AND claimed = 1 AND id = ANY($2)"
            ),
            &[&until_ms, &ids],
        )
        .await
        .map(drop)
    }

    async fn ack(&self, ids: Vec<i64>, now_ms: i64) -> Result<(), QueueError> {
        self.execute(
            sql!(
                "UPDATE records SET state = {delivered}, claimed = 0, claimed_by = NULL, json = '',
                 updated_at = $1
                 WHERE state = {pending} AND id = ANY($2)"
            ),
            &[&now_ms, &ids],
        )
        .await
        .map(drop)
    }

    async fn retry_at(
        &self,
        ids: Vec<i64>,
        at_ms: i64,
        failed: bool,
        error: String,
    ) -> Result<(), QueueError> {
        let error = storable(error);
        let attempts = i32::from(failed);
        let error = failed.then_some(error);
        self.execute(
            sql!(
                "UPDATE records SET claimed = 0, claimed_by = NULL, next_attempt_at = $1,
                 attempts = attempts + $2, last_error = COALESCE($3, last_error)
                 WHERE state = {pending} AND id = ANY($4)"
            ),
            &[&at_ms, &attempts, &error, &ids],
        )
        .await
        .map(drop)
    }

    async fn dead_letter(
        &self,
        ids: Vec<i64>,
        reason: String,
        detail: String,
        failed: bool,
        now_ms: i64,
    ) -> Result<(), QueueError> {
        let (reason, detail) = (storable(reason), storable(detail));
        let attempts = i32::from(failed);
        self.execute(
            sql!(
                "UPDATE records SET state = {dead}, claimed = 0, claimed_by = NULL,
                        dead_reason = $1, dead_detail = $2, updated_at = $3,
                        attempts = attempts + $4
                 WHERE state = {pending} AND id = ANY($5)"
            ),
            &[&reason, &detail, &now_ms, &attempts, &ids],
        )
        .await
        .map(drop)
    }

    /// A range of the partial index `records_delivered` (`(app_id, kind, updated_at)` of the
    /// delivered records): only the lane's deliveries of the window are read.
    async fn delivered_since(
        &self,
        app_id: &str,
        kind: RecordKind,
        since_ms: i64,
    ) -> Result<u64, QueueError> {
        let rows = self
            .query(sql!(DELIVERED_SINCE), &[&kind.as_str(), &since_ms, &app_id])
            .await?;
        let count: i64 = match rows.first() {
            Some(row) => row.try_get(0).map_err(storage)?,
            None => 0,
        };
        Ok(u64::try_from(count).unwrap_or(0))
    }

    async fn next_due_ms(&self, app_id: &str, kind: RecordKind) -> Result<Option<i64>, QueueError> {
        // A follower has nothing to send: its forwarder sleeps until the next claim, which
        // is when it tries the lane's lock again.
        if self.role(app_id) == Some(ROLE_FOLLOWER) {
            return Ok(None);
        }
        let rows = self
            .query(sql!(NEXT_DUE), &[&app_id, &kind.as_str()])
            .await?;
        match rows.first() {
            Some(row) => row.try_get(0).map_err(storage),
            None => Ok(None),
        }
    }

    async fn stats(&self, now_ms: i64) -> Result<QueueStats, QueueError> {
        Ok(QueueStats::sum(self.lane_stats(now_ms).await?.values()))
    }

    async fn lane_stats(&self, _now_ms: i64) -> Result<BTreeMap<String, QueueStats>, QueueError> {
        let rows = self
            .query(
                "SELECT app_id, state, claimed, COUNT(*), MIN(received_at) FROM records
                 GROUP BY app_id, state, claimed",
                &[],
            )
            .await?;
        let mut lanes: BTreeMap<String, QueueStats> = BTreeMap::new();
        for row in rows {
            let app_id: String = row.try_get(0).map_err(storage)?;
            let state: i32 = row.try_get(1).map_err(storage)?;
            let claimed: i32 = row.try_get(2).map_err(storage)?;
            let count = row.try_get::<_, i64>(3).map_err(storage)?;
            let oldest: Option<i64> = row.try_get(4).map_err(storage)?;
            lanes.entry(app_id).or_default().add(
                i64::from(state),
                i64::from(claimed),
                u64::try_from(count).unwrap_or(0),
                oldest,
            );
        }
        Ok(lanes)
    }

    /// Through `records_unassigned`, which holds only the records not yet adopted.
    async fn adopt_unassigned(&self, app_id: &str) -> Result<u64, QueueError> {
        if app_id.is_empty() {
            return Ok(0);
        }
        self.execute(
            "UPDATE records SET app_id = $1 WHERE app_id = ''",
            &[&app_id],
        )
        .await
    }

    async fn ping(&self) -> Result<(), QueueError> {
        self.execute(
            "INSERT INTO heartbeat (id, at) VALUES (1, now())
             ON CONFLICT (id) DO UPDATE SET at = excluded.at",
            &[],
        )
        .await
        .map(drop)
    }

    async fn dead_letters(&self, filter: DeadLetterFilter) -> Result<Vec<DeadLetter>, QueueError> {
        let (clause, mut values) = filter_sql(&filter);
        let limit = limit_sql(&filter, &mut values);
        let sql = format!(
            "SELECT r.id, r.webhook_id, r.kind, COALESCE(r.dead_reason, ''),
                    COALESCE(r.dead_detail, ''), r.subject, r.attempts, r.received_at,
                    r.updated_at,
                    COALESCE((SELECT w.source FROM webhooks w WHERE w.id = r.webhook_id), ''),
                    r.app_id
             FROM records r WHERE {clause} ORDER BY r.id{limit}"
        );
        let rows = self.query(&sql, &refs(&values)).await?;
        rows.iter()
            .map(dead_letter_from)
            .collect::<Result<_, tokio_postgres::Error>>()
            .map_err(storage)
    }

    async fn dead_letter_detail(&self, id: i64) -> Result<Option<DeadLetterDetail>, QueueError> {
        let rows = self
            .query(
                sql!(
                    "SELECT r.id, r.webhook_id, r.kind, COALESCE(r.dead_reason, ''),
                            COALESCE(r.dead_detail, ''), r.subject, r.attempts, r.received_at,
                            r.updated_at, w.source, r.app_id, r.json, r.last_error, w.body
                     FROM records r JOIN webhooks w ON w.id = r.webhook_id
                     WHERE r.state = {dead} AND r.id = $1"
                ),
                &[&id],
            )
            .await?;
        let Some(row) = rows.first() else {
            return Ok(None);
        };
        let detail = || -> Result<DeadLetterDetail, tokio_postgres::Error> {
            Ok(DeadLetterDetail {
                letter: dead_letter_from(row)?,
                json: row.try_get(11)?,
                last_error: row.try_get(12)?,
                body: Bytes::from(row.try_get::<_, Vec<u8>>(13)?),
            })
        };
        detail().map(Some).map_err(storage)
    }

    async fn count_dead_letters(
        &self,
        filter: DeadLetterFilter,
    ) -> Result<DeadLetterCount, QueueError> {
        let (clause, mut values) = filter_sql(&filter);
        let limit = limit_sql(&filter, &mut values);
        // In replay's order, so that a limit counts the webhooks a replay would take.
        let sql = format!(
            "SELECT COUNT(*), COUNT(DISTINCT s.webhook_id) FROM
             (SELECT r.id, r.webhook_id FROM records r WHERE {clause}
              ORDER BY r.webhook_id, r.id{limit}) s"
        );
        let rows = self.query(&sql, &refs(&values)).await?;
        let count = |column: usize| -> Result<u64, QueueError> {
            let value: i64 = rows
                .first()
                .map(|row| row.try_get(column))
                .transpose()
                .map_err(storage)?
                .unwrap_or(0);
            Ok(u64::try_from(value).unwrap_or(0))
        };
        Ok(DeadLetterCount {
            dead_letters: count(0)?,
            webhooks: count(1)?,
        })
    }

    async fn replay_items(
        &self,
        filter: DeadLetterFilter,
        webhooks: usize,
    ) -> Result<Vec<ReplayItem>, QueueError> {
        let (clause, mut values) = filter_sql(&filter);
        values.push(Box::new(i64::try_from(webhooks).unwrap_or(i64::MAX)));
        let page = values.len();
        // The filter's `$n` twice: once to choose the page's webhooks, once for their records.
        let sql = format!(
            "SELECT r.id, w.id, w.digest, w.body, w.received_at, w.source
             FROM records r JOIN webhooks w ON w.id = r.webhook_id
             WHERE {clause} AND r.webhook_id IN
               (SELECT DISTINCT r.webhook_id FROM records r WHERE {clause}
                ORDER BY r.webhook_id LIMIT ${page})
             ORDER BY w.id, r.id"
        );
        let rows = self.query(&sql, &refs(&values)).await?;
        let mut items: Vec<ReplayItem> = Vec::new();
        for row in rows {
            let record_id: i64 = row.try_get(0).map_err(storage)?;
            let webhook_id: i64 = row.try_get(1).map_err(storage)?;
            match items.last_mut() {
                Some(item) if item.webhook_id == webhook_id => item.dead_ids.push(record_id),
                _ => {
                    let digest: Vec<u8> = row.try_get(2).map_err(storage)?;
                    let body: Vec<u8> = row.try_get(3).map_err(storage)?;
                    items.push(ReplayItem {
                        webhook_id,
                        source: row.try_get(5).map_err(storage)?,
                        digest: digest.try_into().unwrap_or([0; 32]),
                        body: Bytes::from(body),
                        received_at_ms: row.try_get(4).map_err(storage)?,
                        dead_ids: vec![record_id],
                    });
                }
            }
        }
        Ok(items)
    }

    async fn requeue(
        &self,
        item: ReplayItem,
        content: Content,
        app_id: &str,
        now_ms: i64,
    ) -> Result<usize, QueueError> {
        let lane = storable(app_id.to_owned());
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(storage)?;
        tx.execute(
            sql!("DELETE FROM records WHERE id = ANY($1) AND state = {dead}"),
            &[&item.dead_ids],
        )
        .await
        .map_err(storage)?;
        let rows = Rows::new(content, &item.digest);
        let events = ingest::insert_rows(
            &tx,
            item.webhook_id,
            &lane,
            item.received_at_ms,
            &rows,
            now_ms,
        )
        .await?;
        tx.commit().await.map_err(storage)?;
        Ok(events)
    }

    async fn shapes(&self, source: Option<String>) -> Result<Vec<StoredShape>, QueueError> {
        let rows = self
            .query(
                "SELECT key, source, kind, action, paths, count, first_seen, last_seen, sample
                 FROM shapes WHERE $1::text IS NULL OR source = $1
                 ORDER BY last_seen DESC, key",
                &[&source],
            )
            .await?;
        rows.iter()
            .map(|row| {
                Ok(StoredShape::from(ShapeRow {
                    key: row.try_get(0)?,
                    source: row.try_get(1)?,
                    kind: row.try_get(2)?,
                    action: row.try_get(3)?,
                    paths: row.try_get(4)?,
                    count: row.try_get(5)?,
                    first_seen_ms: row.try_get(6)?,
                    last_seen_ms: row.try_get(7)?,
                    sample: row.try_get(8)?,
                }))
            })
            .collect::<Result<_, tokio_postgres::Error>>()
            .map_err(storage)
    }

    async fn shape_keys(&self) -> Result<Vec<(String, [u8; 32])>, QueueError> {
        let rows = self.query("SELECT source, key FROM shapes", &[]).await?;
        let mut keys = Vec::with_capacity(rows.len());
        for row in &rows {
            let key: Vec<u8> = row.try_get(1).map_err(storage)?;
            if let Ok(key) = <[u8; 32]>::try_from(key.as_slice()) {
                keys.push((row.try_get(0).map_err(storage)?, key));
            }
        }
        Ok(keys)
    }

    async fn purge(&self, filter: DeadLetterFilter) -> Result<u64, QueueError> {
        let (clause, mut values) = filter_sql(&filter);
        let limit = limit_sql(&filter, &mut values);
        let sql = format!(
            "DELETE FROM records WHERE id IN
                 (SELECT r.id FROM records r WHERE {clause} ORDER BY r.id{limit})"
        );
        self.execute(&sql, &refs(&values)).await
    }

    async fn prune(
        &self,
        delivered_before_ms: i64,
        dead_before_ms: i64,
    ) -> Result<u64, QueueError> {
        let mut total = 0;
        // In chunks, skipping rows another replica is pruning at the same time.
        for (sql, cutoff) in [
            (
                sql!(
                    "DELETE FROM records WHERE id IN (SELECT id FROM records
                     WHERE state = {delivered} AND updated_at < $1 LIMIT $2 FOR UPDATE SKIP LOCKED)"
                ),
                delivered_before_ms,
            ),
            (
                sql!(
                    "DELETE FROM records WHERE id IN (SELECT id FROM records
                     WHERE state = {dead} AND updated_at < $1 LIMIT $2 FOR UPDATE SKIP LOCKED)"
                ),
                dead_before_ms,
            ),
            (
                "DELETE FROM webhooks WHERE id IN (SELECT w.id FROM webhooks w
                 WHERE w.received_at < $1
                   AND NOT EXISTS (SELECT 1 FROM records r WHERE r.webhook_id = w.id)
                 LIMIT $2 FOR UPDATE SKIP LOCKED)",
                delivered_before_ms,
            ),
        ] {
            loop {
                let deleted = self.execute(sql, &[&cutoff, &PRUNE_CHUNK]).await?;
                total += deleted;
                if (deleted as i64) < PRUNE_CHUNK {
                    break;
                }
            }
        }
        Ok(total)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// What the server's planner makes of `sql` with `params`, on a queue schema holding
    /// 30,000 records in three lanes.
    #[cfg_attr(not(postgres_tests), ignore = "needs RELAY_TEST_POSTGRES_URL")]
    #[tokio::test]
    async fn claims_due_times_and_deliveries_read_indexes_that_lead_with_the_lane() {
        let base = std::env::var("RELAY_TEST_POSTGRES_URL").unwrap();
        let (admin, connection) = tokio_postgres::connect(&base, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        let schema = format!("relay_plan_{}", uuid::Uuid::new_v4().simple());
        admin
            .batch_execute(&format!("CREATE SCHEMA {schema}"))
            .await
            .unwrap();
        let separator = if base.contains('?') { '&' } else { '?' };
        let url = format!("{base}{separator}options=-csearch_path%3D{schema}");
        let queue = PostgresQueue::connect(&url).await.unwrap();
        admin
            .batch_execute(&format!(
                "SET search_path = {schema};
                 INSERT INTO webhooks (source, digest, body, received_at)
                 SELECT 'default', sha256(i::text::bytea), 'x', i FROM generate_series(1, 3000) i;
                 INSERT INTO records (webhook_id, app_id, key, kind, subject, json, state,
                                      received_at, next_attempt_at, updated_at)
                 SELECT i % 3000 + 1, 'app-' || (i % 3), 'k' || i,
                        CASE WHEN i % 2 = 0 THEN 'track' ELSE 'add_user_properties' END,
                        'u', '{{}}', i % 3, i, i, i
                 FROM generate_series(1, 30000) i;
                 ANALYZE records;"
            ))
            .await
            .unwrap();
        let plan = async |sql: &str, params: &[&(dyn ToSql + Sync)]| -> String {
            let rows = admin
                .query(&format!("EXPLAIN {sql}"), params)
                .await
                .unwrap();
            let lines: Vec<String> = rows.iter().map(|row| row.get(0)).collect();
            lines.join("\n")
        };
        let (lane, track, max, until) = ("app-1", "track", 100_i64, 40_000_i64);
        let claim = plan(
            sql!(CLAIM_DUE),
            &[&track, &20_000_i64, &max, &until, &"replica", &lane],
        )
        .await;
        // The lane in the index condition: a range of the index, not a filter on its rows.
        let by_lane = |plan: &str, index: &str| {
            (plan.contains(&format!("using {index}")) || plan.contains(&format!("on {index}")))
                && plan
                    .lines()
                    .any(|line| line.contains("Index Cond: ((app_id = 'app-1'"))
        };
        assert!(by_lane(&claim, "records_due"), "{claim}");
        let due = plan(sql!(NEXT_DUE), &[&lane, &track]).await;
        assert!(by_lane(&due, "records_due"), "{due}");
        let delivered = plan(sql!(DELIVERED_SINCE), &[&track, &25_000_i64, &lane]).await;
        assert!(by_lane(&delivered, "records_delivered"), "{delivered}");
        admin
            .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
            .await
            .unwrap();
        drop(queue);
    }

    #[test]
    fn the_leader_lock_key_depends_on_the_app_id_only() {
        assert_eq!(leader_lock_key("app-1"), leader_lock_key("app-1"));
        assert_ne!(leader_lock_key("app-1"), leader_lock_key("app-2"));
    }

    #[test]
    fn dead_letter_filters_number_their_parameters_in_order() {
        let filter = DeadLetterFilter {
            ids: vec![1, 2],
            source: None,
            reason: Some("rejected".into()),
            subject: None,
            since_ms: Some(10),
            until_ms: None,
            after_id: Some(5),
            limit: Some(3),
            after_webhook_id: None,
        };
        let (sql, mut values) = filter_sql(&filter);
        assert_eq!(
            sql,
            "r.state = 2 AND r.id = ANY($1) AND r.dead_reason = $2 AND r.updated_at >= $3 \
             AND r.id > $4"
        );
        assert_eq!(limit_sql(&filter, &mut values), " LIMIT $5");
        assert_eq!(values.len(), 5);
    }
}
