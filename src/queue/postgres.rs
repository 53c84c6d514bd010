//! The shared queue: PostgreSQL, for several relay replicas behind one load balancer. Same
//! model and semantics as [`super::sqlite`] (the reference): a `webhooks` table (unique digest,
//! verified body) and a `records` table (unique key, state 0 pending / 1 delivered / 2 dead,
//! `next_attempt_at` = due time, or the lease's end while claimed). All times are unix
//! milliseconds passed in by the caller, except the heartbeat, which uses the server's clock.
//!
//! **Ingest.** [`COMMITTERS`] background tasks commit concurrent [`Queue::enqueue`] calls in
//! groups (group commit): a committer takes the webhooks waiting, up to [`MAX_GROUP`], and
//! stores the whole group in one statement (its new webhooks, then all their records) that
//! commits on its own: one round trip and one flush per group, and while a committer waits for
//! it, another takes the next group. A caller hears back only after the commit. Deduplication
//! is `INSERT ... ON CONFLICT (digest) DO NOTHING`, which holds across replicas; of the same
//! body twice in one group, the first is new and the second a duplicate. If the server refuses
//! the statement for something in it (a value Postgres cannot store), the group is redone in
//! one transaction with a savepoint per webhook, so the webhook at fault fails alone. If the
//! connection breaks or the commit fails, every webhook of the group gets the error (a 503):
//! none is acknowledged unless committed. Every group, on every replica, inserts its webhooks
//! in digest order, so two transactions inserting the same new bodies take the digest index's
//! locks in the same order: one waits for the other and then finds duplicates, and they cannot
//! deadlock. (Records cannot collide across transactions: their keys are unique per webhook.)
//!
//! **Claims.** `SELECT ... FOR UPDATE SKIP LOCKED` picks due records and the same statement
//! leases them (`claimed = 1`, `next_attempt_at` = lease end, `claimed_by` = this replica), so
//! two claimers never get the same record. An expired lease makes a record claimable again;
//! there is no reset at startup as with SQLite, since other replicas may hold live leases.
//!
//! **One forwarder at a time (leadership).** Heap's rate limits are per app id, and each
//! replica's limiter only knows its own traffic, so only one replica forwards at a time: the
//! one holding the session-level advisory lock `pg_try_advisory_lock(lock_key)` (derive the key
//! from the app id with [`leader_lock_key`]) on a dedicated connection. [`Queue::claim`]
//! returns nothing on the other replicas, which retry the lock at most every
//! [`LEADER_CHECK_EVERY`] (and [`Queue::next_due_ms`] tells their forwarder nothing is due).
//! The leader probes its dedicated connection at the same pace; if it breaks, leadership is
//! dropped at once (the server has released the lock with the session). A killed replica's
//! session ends, so another replica takes over at its next claim, within about two seconds.
//! The dead leader's claimed records come back when their lease expires — or sooner: every
//! connection of a replica carries `application_name = userpilot-heap-relay/<replica id>`, and
//! the leader, when it takes over and then every probe, releases leases whose replica has no
//! session left (`pg_stat_activity`). A replica that is alive but lost only its dedicated
//! connection keeps its leases until they expire, so its batch in flight is not sent twice.
//! A new leader's forwarder charges its rate budget with what was delivered in the last
//! minute ([`Queue::delivered_since`]), so a takeover does not reset Heap's budget. The gauge
//! `relay_queue_leader` is 1 on the replica that forwards.
//! Consequences: one app id per database (the lock key space is per database); no
//! transaction-pooling proxy (pgbouncer in transaction mode) in front, since session locks need
//! sessions; replicas' clocks should agree to well within a lease.
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

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use sha2::{Digest, Sha256};
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio_postgres::types::ToSql;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::prepared::{Prepared, Rows, storable};
use super::{
    Claimed, Content, DeadLetter, DeadLetterFilter, Enqueued, FilterValue, NewWebhook,
    QUARANTINE_KIND, Queue, QueueError, QueueStats, ReplayItem,
};
use crate::heap::wire::RecordKind;

/// The schema version this code writes (table `schema_version`). Add a migration to bump it.
const SCHEMA_VERSION: i32 = 2;

/// `pg_advisory_xact_lock` key serializing migrations ("relaymig").
const MIGRATION_LOCK: i64 = 0x7265_6c61_796d_6967;

/// Connections in the pool (the dedicated leadership connection is extra).
const POOL_SIZE: usize = 16;

/// Bound on waiting for a pooled connection, on connecting, and on recycling one.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Server-side bound on any one statement.
const STATEMENT_TIMEOUT_MS: u64 = 10_000;

/// How often a follower retries the leader lock, and the leader probes its connection.
pub const LEADER_CHECK_EVERY: Duration = Duration::from_secs(1);

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

/// Version 1. Mirrors the SQLite schema, plus `claimed_by` (which replica holds the lease).
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
    state           INTEGER NOT NULL,         -- 0 pending, 1 delivered, 2 dead
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
CREATE INDEX IF NOT EXISTS records_due ON records (kind, next_attempt_at, id) WHERE state = 0;
CREATE INDEX IF NOT EXISTS records_done ON records (state, updated_at) WHERE state <> 0;
CREATE INDEX IF NOT EXISTS records_webhook ON records (webhook_id);
CREATE INDEX IF NOT EXISTS records_leased ON records (claimed_by) WHERE state = 0 AND claimed = 1;
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

const MIGRATIONS: &[(i32, &str)] = &[(1, SCHEMA_V1), (2, SCHEMA_V2)];

/// Releases the leases of replicas that have no session left; `$1` now, `$2` this replica.
const RELEASE_ORPHANS: &str = "
UPDATE records SET claimed = 0, claimed_by = NULL, next_attempt_at = LEAST(next_attempt_at, $1)
WHERE state = 0 AND claimed = 1 AND claimed_by IS DISTINCT FROM $2
  AND NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.application_name = records.claimed_by)";

const PENDING: i32 = 0;
const DELIVERED: i32 = 1;
const DEAD: i32 = 2;

const ROLE_UNKNOWN: u8 = 0;
const ROLE_LEADER: u8 = 1;
const ROLE_FOLLOWER: u8 = 2;

type Reply<T> = oneshot::Sender<Result<T, QueueError>>;
type Param = Box<dyn ToSql + Sync + Send>;

/// The advisory-lock key for leadership among the replicas serving `app_id`.
pub fn leader_lock_key(app_id: &str) -> i64 {
    let digest = Sha256::digest(format!("userpilot-heap-relay leader {app_id}").as_bytes());
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(bytes)
}

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

/// The dedicated session that holds the leader lock.
#[derive(Default)]
struct Leadership {
    session: Option<tokio_postgres::Client>,
    leading: bool,
    /// When the lock was last tried (follower) or the session last probed (leader).
    checked_at: Option<Instant>,
}

/// Handle to the shared queue. Cheap to share behind an `Arc`.
pub struct PostgresQueue {
    pool: Pool,
    config: tokio_postgres::Config,
    /// TLS for the dedicated session, as for the pool's.
    connector: MakeRustlsConnect,
    enqueues: mpsc::Sender<Waiting>,
    lock_key: i64,
    /// This replica's `application_name`, also stored in `claimed_by`.
    replica: String,
    leadership: Mutex<Leadership>,
    role: AtomicU8,
}

impl PostgresQueue {
    /// Connects, applies migrations and starts the group-commit tasks. `lock_key` names the
    /// leadership lock: replicas sharing an app id pass the same key ([`leader_lock_key`]).
    pub async fn connect(url: &str, lock_key: i64) -> Result<Self, QueueError> {
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
        migrate(&pool).await?;

        let (enqueues, receiver) = mpsc::channel(COMMITTERS * MAX_GROUP);
        let receiver = Arc::new(Mutex::new(receiver));
        for _ in 0..COMMITTERS {
            tokio::spawn(group_commit(pool.clone(), Arc::clone(&receiver)));
        }
        Ok(Self {
            pool,
            config,
            connector,
            enqueues,
            lock_key,
            replica,
            leadership: Mutex::default(),
            role: AtomicU8::new(ROLE_UNKNOWN),
        })
    }

    /// Whether this replica held the leader lock at its last check.
    pub fn is_leader(&self) -> bool {
        self.role.load(Ordering::Relaxed) == ROLE_LEADER
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

    /// Whether this replica may forward now; tries to become (or checks it still is) the
    /// leader at most every [`LEADER_CHECK_EVERY`]. `now_ms` dates released orphan leases.
    async fn lead(&self, now_ms: i64) -> Result<bool, QueueError> {
        let mut state = self.leadership.lock().await;
        if state
            .session
            .as_ref()
            .is_some_and(tokio_postgres::Client::is_closed)
        {
            if state.leading {
                tracing::warn!("leader connection closed; no longer forwarding");
            }
            self.step_down(&mut state);
            // Try to reconnect right away rather than after the check interval.
            state.checked_at = None;
        }
        if state
            .checked_at
            .is_some_and(|at| at.elapsed() < LEADER_CHECK_EVERY)
        {
            return Ok(state.leading);
        }
        state.checked_at = Some(Instant::now());
        let outcome = self.check_leadership(&mut state, now_ms).await;
        if outcome.is_err() {
            if state.leading {
                tracing::warn!("leader connection failed; no longer forwarding");
            }
            self.step_down(&mut state);
        }
        outcome
    }

    fn step_down(&self, state: &mut Leadership) {
        // Dropping the client ends the session, and with it the lock, if the server still
        // has it.
        state.session = None;
        state.leading = false;
        self.set_role(ROLE_FOLLOWER);
    }

    fn set_role(&self, role: u8) {
        self.role.store(role, Ordering::Relaxed);
        metrics::gauge!("relay_queue_leader").set(if role == ROLE_LEADER { 1.0 } else { 0.0 });
    }

    async fn check_leadership(
        &self,
        state: &mut Leadership,
        now_ms: i64,
    ) -> Result<bool, QueueError> {
        let session = match state.session.take() {
            Some(session) => session,
            None => self.open_session().await?,
        };
        let session = state.session.insert(session);
        if !state.leading {
            let row = tokio::time::timeout(
                CONNECT_TIMEOUT,
                session.query_one("SELECT pg_try_advisory_lock($1)", &[&self.lock_key]),
            )
            .await
            .map_err(|_| timed_out("leader lock"))?
            .map_err(storage)?;
            if !row.try_get::<_, bool>(0).map_err(storage)? {
                self.set_role(ROLE_FOLLOWER);
                return Ok(false);
            }
            state.leading = true;
            self.set_role(ROLE_LEADER);
            tracing::info!(replica = %self.replica, "this replica now forwards (queue leader)");
        }
        // The probe: proves the session alive and frees the leases of replicas that are gone.
        let released = tokio::time::timeout(
            CONNECT_TIMEOUT,
            session.execute(RELEASE_ORPHANS, &[&now_ms, &self.replica]),
        )
        .await
        .map_err(|_| timed_out("leader probe"))?
        .map_err(storage)?;
        if released > 0 {
            tracing::info!(
                records = released,
                "released the leases of a replica that is gone"
            );
        }
        Ok(true)
    }

    async fn open_session(&self) -> Result<tokio_postgres::Client, QueueError> {
        let (client, connection) =
            tokio::time::timeout(CONNECT_TIMEOUT, self.config.connect(self.connector.clone()))
                .await
                .map_err(|_| timed_out("connect"))?
                .map_err(storage)?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "leader connection ended");
            }
        });
        Ok(client)
    }
}

/// Creates or upgrades the schema, once, whatever the number of replicas starting at once.
async fn migrate(pool: &Pool) -> Result<(), QueueError> {
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
        tx.batch_execute(sql).await.map_err(storage)?;
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

type Waiting = (Prepared, Reply<Enqueued>);

/// One group-commit task (of [`COMMITTERS`]): takes the webhooks waiting, commits them
/// together, answers each.
async fn group_commit(pool: Pool, waiting: Arc<Mutex<mpsc::Receiver<Waiting>>>) {
    while let Some(mut group) = next_group(&waiting).await {
        // Digest order, in which every transaction takes the digest index's locks: see the
        // module docs. The sort is stable: of equal digests, the first to arrive stays first.
        group.sort_by_key(|(webhook, _)| webhook.digest);
        let webhooks: Vec<&Prepared> = group.iter().map(|(webhook, _)| webhook).collect();
        match commit_group(&pool, &webhooks).await {
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
}

/// The next group: the first webhook to arrive and whatever else is waiting, up to
/// [`MAX_GROUP`]. One committer takes a group at a time; the others commit theirs meanwhile.
async fn next_group(waiting: &Mutex<mpsc::Receiver<Waiting>>) -> Option<Vec<Waiting>> {
    let mut receiver = waiting.lock().await;
    let first = receiver.recv().await?;
    let mut group = vec![first];
    while group.len() < MAX_GROUP {
        match receiver.try_recv() {
            Ok(next) => group.push(next),
            Err(_) => break,
        }
    }
    Some(group)
}

/// Commits a group sorted by digest and answers for each webhook, in order. The whole group
/// goes in as one statement, committed on its own (one round trip). If the server refuses
/// that statement for something in it (a value Postgres will not store, say), the group is
/// redone with a savepoint per webhook, so the webhook at fault fails alone. `Err`: the group
/// is not (or not known to be) committed, and every webhook gets the error.
async fn commit_group(
    pool: &Pool,
    group: &[&Prepared],
) -> Result<Vec<Result<Enqueued, QueueError>>, QueueError> {
    let mut client = pool.get().await.map_err(unavailable)?;
    match insert_group(&client, group).await {
        Ok(results) => return Ok(results.into_iter().map(Ok).collect()),
        Err(error) if redo_singly(&client, &error) => {
            let error = storage(error);
            tracing::debug!(
                %error,
                webhooks = group.len(),
                "group refused; redoing it webhook by webhook"
            );
        }
        Err(error) => return Err(storage(error)),
    }
    commit_singly(&mut client, group).await
}

/// Whether a group whose statement failed is worth redoing webhook by webhook: the server
/// refused the statement (bad data, a deadlock, a serialization failure) and the session is
/// fine. Not when the connection broke, and not when the server is short of resources, shutting
/// down, cancelled the statement (`statement_timeout`) or failed itself: the redo would fail
/// the same way, only more slowly.
fn redo_singly(client: &tokio_postgres::Client, error: &tokio_postgres::Error) -> bool {
    let Some(code) = error.code() else {
        return false;
    };
    let class = code.code().get(..2);
    !client.is_closed() && !matches!(class, Some("08" | "53" | "57" | "58" | "XX"))
}

/// The group in one statement: its new webhooks (in digest order), then every record of each.
/// Answers one row per webhook inserted: its digest and how many of its track events were new.
/// A digest without a row was there already. As a single statement outside a transaction block
/// it commits by itself, before the server answers `ReadyForQuery`, which is what the driver
/// waits for: a commit failure comes back as this statement's error, and nothing of the group
/// is acknowledged unless a commit succeeds.
const INSERT_GROUP: &str = "
WITH w AS (
    INSERT INTO webhooks (digest, body, received_at)
    SELECT u.digest, u.body, u.received_at
    FROM UNNEST($1::bytea[], $2::bytea[], $3::bigint[]) AS u(digest, body, received_at)
    ORDER BY u.digest
    ON CONFLICT (digest) DO NOTHING
    RETURNING id, digest, received_at
), r AS (
    INSERT INTO records (webhook_id, key, kind, subject, json, state, received_at,
                         next_attempt_at, updated_at, dead_reason, dead_detail)
    SELECT w.id, u.key, u.kind, u.subject, u.json, u.state, w.received_at, w.received_at,
           w.received_at, u.dead_reason, u.dead_detail
    FROM UNNEST($4::bytea[], $5::text[], $6::text[], $7::text[], $8::text[], $9::integer[],
                $10::text[], $11::text[])
             WITH ORDINALITY AS u(digest, key, kind, subject, json, state, dead_reason,
                                  dead_detail, n)
         JOIN w ON w.digest = u.digest
    ORDER BY u.n
    ON CONFLICT (webhook_id, key) DO NOTHING
    RETURNING webhook_id, kind
)
SELECT w.digest, COUNT(r.kind) FILTER (WHERE r.kind = $12)
FROM w LEFT JOIN r ON r.webhook_id = w.id
GROUP BY w.digest";

/// Inserts a group sorted by digest with [`INSERT_GROUP`]; the outcome of each webhook, in
/// order. Of equal digests only the first goes in; the others are duplicates, as they would be
/// one after the other.
async fn insert_group(
    client: &deadpool_postgres::Object,
    group: &[&Prepared],
) -> Result<Vec<Enqueued>, tokio_postgres::Error> {
    let mut digests: Vec<&[u8]> = Vec::with_capacity(group.len());
    let mut bodies: Vec<&[u8]> = Vec::with_capacity(group.len());
    let mut received: Vec<i64> = Vec::with_capacity(group.len());
    // One entry per record of every webhook, named by the webhook's digest.
    let mut owners: Vec<&[u8]> = Vec::new();
    let mut keys: Vec<&str> = Vec::new();
    let mut kinds: Vec<&str> = Vec::new();
    let mut subjects: Vec<&str> = Vec::new();
    let mut jsons: Vec<&str> = Vec::new();
    let mut states: Vec<i32> = Vec::new();
    let mut reasons: Vec<Option<&str>> = Vec::new();
    let mut details: Vec<Option<&str>> = Vec::new();
    for webhook in first_of_each_digest(group) {
        digests.push(&webhook.digest);
        bodies.push(&webhook.body);
        received.push(webhook.received_at_ms);
        match &webhook.rows {
            Rows::Records(rows) => {
                for row in rows {
                    owners.push(&webhook.digest);
                    keys.push(&row.key);
                    kinds.push(row.kind.as_str());
                    subjects.push(&row.subject);
                    jsons.push(&row.json);
                    states.push(PENDING);
                    reasons.push(None);
                    details.push(None);
                }
            }
            Rows::Quarantined {
                key,
                reason,
                detail,
                subject,
            } => {
                owners.push(&webhook.digest);
                keys.push(key);
                kinds.push(QUARANTINE_KIND);
                subjects.push(subject);
                jsons.push("");
                states.push(DEAD);
                reasons.push(Some(reason));
                details.push(Some(detail));
            }
        }
    }

    let statement = client.prepare_cached(INSERT_GROUP).await?;
    let rows = client
        .query(
            &statement,
            &[
                &digests,
                &bodies,
                &received,
                &owners,
                &keys,
                &kinds,
                &subjects,
                &jsons,
                &states,
                &reasons,
                &details,
                &RecordKind::Track.as_str(),
            ],
        )
        .await?;
    let mut inserted: HashMap<&[u8], usize> = HashMap::with_capacity(rows.len());
    for row in &rows {
        let events: i64 = row.try_get(1)?;
        inserted.insert(row.try_get(0)?, usize::try_from(events).unwrap_or(0));
    }

    let mut previous: Option<&[u8; 32]> = None;
    let mut outcomes = Vec::with_capacity(group.len());
    for webhook in group {
        let first = previous != Some(&webhook.digest);
        previous = Some(&webhook.digest);
        outcomes.push(match inserted.get(&webhook.digest[..]) {
            Some(&events) if first => webhook.rows.outcome(events),
            _ => Enqueued::Duplicate,
        });
    }
    Ok(outcomes)
}

/// The first webhook of each run of equal digests in a group sorted by digest.
fn first_of_each_digest<'a>(group: &'a [&'a Prepared]) -> impl Iterator<Item = &'a Prepared> {
    group.iter().enumerate().filter_map(|(at, webhook)| {
        let repeated = at > 0 && group[at - 1].digest == webhook.digest;
        (!repeated).then_some(*webhook)
    })
}

/// The fallback: the group in one transaction, each webhook in its own savepoint (in the
/// group's digest order, as [`insert_group`] would), so one failure cannot take its neighbours
/// down. [`MAX_GROUP`] keeps the savepoints within Postgres's 64 cached subtransactions.
async fn commit_singly(
    client: &mut deadpool_postgres::Object,
    group: &[&Prepared],
) -> Result<Vec<Result<Enqueued, QueueError>>, QueueError> {
    let mut tx = client.transaction().await.map_err(storage)?;
    let mut results = Vec::with_capacity(group.len());
    for webhook in group {
        let savepoint = tx.savepoint("webhook").await.map_err(storage)?;
        match insert_webhook(&savepoint, webhook).await {
            Ok(result) => {
                savepoint.commit().await.map_err(storage)?;
                results.push(Ok(result));
            }
            Err(error) => {
                savepoint.rollback().await.map_err(storage)?;
                results.push(Err(error));
            }
        }
    }
    tx.commit().await.map_err(storage)?;
    Ok(results)
}

async fn insert_webhook(
    tx: &deadpool_postgres::Transaction<'_>,
    webhook: &Prepared,
) -> Result<Enqueued, QueueError> {
    let statement = tx
        .prepare_cached(
            "INSERT INTO webhooks (digest, body, received_at) VALUES ($1, $2, $3)
             ON CONFLICT (digest) DO NOTHING RETURNING id",
        )
        .await
        .map_err(storage)?;
    let row = tx
        .query_opt(
            &statement,
            &[
                &&webhook.digest[..],
                &&webhook.body[..],
                &webhook.received_at_ms,
            ],
        )
        .await
        .map_err(storage)?;
    let Some(row) = row else {
        return Ok(Enqueued::Duplicate);
    };
    let webhook_id: i64 = row.try_get(0).map_err(storage)?;
    let events = insert_rows(
        tx,
        webhook_id,
        webhook.received_at_ms,
        &webhook.rows,
        webhook.received_at_ms,
    )
    .await?;
    Ok(webhook.rows.outcome(events))
}

/// Inserts a webhook's records in one statement; returns how many track events were new.
async fn insert_rows(
    tx: &deadpool_postgres::Transaction<'_>,
    webhook_id: i64,
    received_at_ms: i64,
    rows: &Rows,
    now_ms: i64,
) -> Result<usize, QueueError> {
    match rows {
        Rows::Records(rows) if rows.is_empty() => Ok(0),
        Rows::Records(rows) => {
            let statement = tx
                .prepare_cached(
                    "INSERT INTO records (webhook_id, key, kind, subject, json, state,
                                          received_at, next_attempt_at, updated_at)
                     SELECT $1, u.key, u.kind, u.subject, u.json, 0, $6, $7, $7
                     FROM UNNEST($2::text[], $3::text[], $4::text[], $5::text[])
                          WITH ORDINALITY AS u(key, kind, subject, json, n)
                     ORDER BY u.n
                     ON CONFLICT (webhook_id, key) DO NOTHING
                     RETURNING kind",
                )
                .await
                .map_err(storage)?;
            let keys: Vec<&str> = rows.iter().map(|row| row.key.as_str()).collect();
            let kinds: Vec<&str> = rows.iter().map(|row| row.kind.as_str()).collect();
            let subjects: Vec<&str> = rows.iter().map(|row| row.subject.as_str()).collect();
            let jsons: Vec<&str> = rows.iter().map(|row| row.json.as_str()).collect();
            let inserted = tx
                .query(
                    &statement,
                    &[
                        &webhook_id,
                        &keys,
                        &kinds,
                        &subjects,
                        &jsons,
                        &received_at_ms,
                        &now_ms,
                    ],
                )
                .await
                .map_err(storage)?;
            let track = RecordKind::Track.as_str();
            let mut events = 0;
            for row in inserted {
                if row.try_get::<_, &str>(0).map_err(storage)? == track {
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
            let statement = tx
                .prepare_cached(
                    "INSERT INTO records (webhook_id, key, kind, subject, json, state,
                                          received_at, next_attempt_at, updated_at,
                                          dead_reason, dead_detail)
                     VALUES ($1, $2, $3, $4, '', 2, $5, $6, $6, $7, $8)
                     ON CONFLICT (webhook_id, key) DO NOTHING",
                )
                .await
                .map_err(storage)?;
            tx.execute(
                &statement,
                &[
                    &webhook_id,
                    key,
                    &QUARANTINE_KIND,
                    subject,
                    &received_at_ms,
                    &now_ms,
                    reason,
                    detail,
                ],
            )
            .await
            .map_err(storage)?;
            Ok(0)
        }
    }
}

/// `WHERE` clause and parameters for a dead-letter filter (always restricted to dead records).
fn filter_sql(filter: &DeadLetterFilter) -> (String, Vec<Param>) {
    let mut sql = String::from("r.state = 2");
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
        kind: RecordKind,
        max: usize,
        now_ms: i64,
        lease_ms: i64,
    ) -> Result<Vec<Claimed>, QueueError> {
        if max == 0 || !self.lead(now_ms).await? {
            return Ok(Vec::new());
        }
        let rows = self
            .query(
                "WITH picked AS (
                     SELECT id, next_attempt_at AS due FROM records
                     WHERE state = 0 AND kind = $1 AND next_attempt_at <= $2
                     ORDER BY next_attempt_at, id LIMIT $3
                     FOR UPDATE SKIP LOCKED
                 )
                 UPDATE records r SET claimed = 1, claimed_by = $5, next_attempt_at = $4
                 FROM picked WHERE r.id = picked.id
                 RETURNING r.id, r.subject, r.json, r.attempts, r.received_at, picked.due",
                &[
                    &kind.as_str(),
                    &now_ms,
                    &(max as i64),
                    &(now_ms + lease_ms),
                    &self.replica,
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
            };
            claimed.push((due, record));
        }
        claimed.sort_by_key(|(due, record)| (*due, record.id));
        Ok(claimed.into_iter().map(|(_, record)| record).collect())
    }

    async fn renew(&self, ids: Vec<i64>, until_ms: i64) -> Result<(), QueueError> {
        self.execute(
            "UPDATE records SET next_attempt_at = $1
             WHERE state = 0 AND claimed = 1 AND id = ANY($2)",
            &[&until_ms, &ids],
        )
        .await
        .map(drop)
    }

    async fn ack(&self, ids: Vec<i64>, now_ms: i64) -> Result<(), QueueError> {
        self.execute(
            "UPDATE records SET state = 1, claimed = 0, claimed_by = NULL, json = '',
                    updated_at = $1
             WHERE state = 0 AND id = ANY($2)",
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
            "UPDATE records SET claimed = 0, claimed_by = NULL, next_attempt_at = $1,
                    attempts = attempts + $2, last_error = COALESCE($3, last_error)
             WHERE state = 0 AND id = ANY($4)",
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
        now_ms: i64,
    ) -> Result<(), QueueError> {
        let (reason, detail) = (storable(reason), storable(detail));
        self.execute(
            "UPDATE records SET state = 2, claimed = 0, claimed_by = NULL, dead_reason = $1,
                    dead_detail = $2, updated_at = $3
             WHERE state = 0 AND id = ANY($4)",
            &[&reason, &detail, &now_ms, &ids],
        )
        .await
        .map(drop)
    }

    async fn next_due_ms(&self, kind: RecordKind) -> Result<Option<i64>, QueueError> {
        // A follower has nothing to send: its forwarder sleeps until the next claim, which
        // is when it tries the lock again.
        if self.role.load(Ordering::Relaxed) == ROLE_FOLLOWER {
            return Ok(None);
        }
        let rows = self
            .query(
                "SELECT MIN(next_attempt_at) FROM records WHERE state = 0 AND kind = $1",
                &[&kind.as_str()],
            )
            .await?;
        match rows.first() {
            Some(row) => row.try_get(0).map_err(storage),
            None => Ok(None),
        }
    }

    async fn stats(&self, _now_ms: i64) -> Result<QueueStats, QueueError> {
        let rows = self
            .query(
                "SELECT state, claimed, COUNT(*), MIN(received_at) FROM records
                 GROUP BY state, claimed",
                &[],
            )
            .await?;
        let mut stats = QueueStats::default();
        for row in rows {
            let state: i32 = row.try_get(0).map_err(storage)?;
            let claimed: i32 = row.try_get(1).map_err(storage)?;
            let count = row.try_get::<_, i64>(2).map_err(storage)? as u64;
            match (state, claimed) {
                (PENDING, 1) => stats.in_flight += count,
                (PENDING, _) => stats.pending += count,
                (DELIVERED, _) => stats.delivered += count,
                (DEAD, _) => stats.dead += count,
                _ => {}
            }
            if state == PENDING {
                let oldest: Option<i64> = row.try_get(3).map_err(storage)?;
                stats.oldest_pending_ms = match (stats.oldest_pending_ms, oldest) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
            }
        }
        Ok(stats)
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
                    r.updated_at
             FROM records r WHERE {clause} ORDER BY r.id{limit}"
        );
        let rows = self.query(&sql, &refs(&values)).await?;
        rows.iter()
            .map(|row| {
                Ok(DeadLetter {
                    id: row.try_get(0)?,
                    webhook_id: row.try_get(1)?,
                    kind: row.try_get(2)?,
                    reason: row.try_get(3)?,
                    detail: row.try_get(4)?,
                    subject: row.try_get(5)?,
                    attempts: attempts(row.try_get(6)?),
                    received_at_ms: row.try_get(7)?,
                    dead_at_ms: row.try_get(8)?,
                })
            })
            .collect::<Result<_, tokio_postgres::Error>>()
            .map_err(storage)
    }

    async fn replay_items(&self, filter: DeadLetterFilter) -> Result<Vec<ReplayItem>, QueueError> {
        let (clause, mut values) = filter_sql(&filter);
        let limit = limit_sql(&filter, &mut values);
        let sql = format!(
            "SELECT r.id, w.id, w.digest, w.body, w.received_at
             FROM records r JOIN webhooks w ON w.id = r.webhook_id
             WHERE {clause} ORDER BY w.id, r.id{limit}"
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
        now_ms: i64,
    ) -> Result<usize, QueueError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(storage)?;
        tx.execute(
            "DELETE FROM records WHERE id = ANY($1) AND state = 2",
            &[&item.dead_ids],
        )
        .await
        .map_err(storage)?;
        let rows = Rows::new(content, &item.digest);
        let events = insert_rows(&tx, item.webhook_id, item.received_at_ms, &rows, now_ms).await?;
        tx.commit().await.map_err(storage)?;
        Ok(events)
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
                "DELETE FROM records WHERE id IN (SELECT id FROM records
                 WHERE state = 1 AND updated_at < $1 LIMIT $2 FOR UPDATE SKIP LOCKED)",
                delivered_before_ms,
            ),
            (
                "DELETE FROM records WHERE id IN (SELECT id FROM records
                 WHERE state = 2 AND updated_at < $1 LIMIT $2 FOR UPDATE SKIP LOCKED)",
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

    async fn delivered_since(&self, kind: RecordKind, since_ms: i64) -> Result<u64, QueueError> {
        let rows = self
            .query(
                "SELECT COUNT(*) FROM records
                 WHERE state <> 0 AND state = 1 AND updated_at >= $1 AND kind = $2",
                &[&since_ms, &kind.as_str()],
            )
            .await?;
        let count: i64 = match rows.first() {
            Some(row) => row.try_get(0).map_err(storage)?,
            None => 0,
        };
        Ok(u64::try_from(count).unwrap_or(0))
    }
}

/// TLS for every connection: libpq's `sslmode` and `sslrootcert` over rustls (see the module
/// docs). tokio-postgres itself knows only `disable`, `prefer` and `require`, so the URL's
/// `sslmode` and `sslrootcert` are taken out of it here and the rest is handed over.
mod tls {
    use std::sync::Arc;

    use rustls::client::WebPkiServerVerifier;
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::crypto::CryptoProvider;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use rustls::{
        CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
    };
    use tokio_postgres::config::SslMode as WireMode;
    use tokio_postgres_rustls::MakeRustlsConnect;

    use super::QueueError;

    /// `sslmode` and `sslrootcert` as the URL's query spelled them.
    #[derive(Debug, Default, PartialEq, Eq)]
    pub(super) struct Requested {
        pub(super) sslmode: Option<String>,
        pub(super) sslrootcert: Option<String>,
    }

    /// libpq's `sslmode`, but `allow`.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub(super) enum Mode {
        Disable,
        Prefer,
        Require,
        VerifyCa,
        VerifyFull,
    }

    /// Where the trusted roots come from.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub(super) enum Roots {
        /// The system's CA certificates, or the bundled Mozilla roots where it has none.
        System,
        /// `sslrootcert=PATH`: the PEM certificates in that file, and only those.
        File(String),
    }

    /// What is checked of the server's certificate.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub(super) enum Check {
        /// Nothing: encrypted, but anyone on the path could pose as the server.
        Nothing,
        /// Signed by a trusted root, whatever host name it names (`verify-ca`).
        Chain(Roots),
        /// Signed by a trusted root and issued for the host connected to (`verify-full`).
        Full(Roots),
    }

    #[derive(Debug, PartialEq, Eq)]
    pub(super) struct Tls {
        pub(super) mode: Mode,
        pub(super) check: Check,
    }

    fn invalid(message: impl std::fmt::Display) -> QueueError {
        QueueError::Storage(format!("postgres_url: {message}"))
    }

    /// Takes `sslmode` and `sslrootcert` out of a `postgres://` URL's query; a key=value
    /// connection string is returned as it is (tokio-postgres reads its `sslmode`).
    pub(super) fn take_params(url: &str) -> Result<(String, Requested), QueueError> {
        let mut requested = Requested::default();
        let Some(rest) = url
            .strip_prefix("postgres://")
            .or_else(|| url.strip_prefix("postgresql://"))
        else {
            return Ok((url.to_owned(), requested));
        };
        // Where tokio-postgres looks: the query starts at the first `?` after the credentials,
        // which end at the first `@`.
        let after_credentials = url.len() - rest.len() + rest.find('@').map_or(0, |at| at + 1);
        let Some(query_at) = url[after_credentials..]
            .find('?')
            .map(|at| after_credentials + at)
        else {
            return Ok((url.to_owned(), requested));
        };
        let mut kept = Vec::new();
        for pair in url[query_at + 1..].split('&') {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let slot = match decode(key).as_deref() {
                Some("sslmode") => &mut requested.sslmode,
                Some("sslrootcert") => &mut requested.sslrootcert,
                _ => {
                    kept.push(pair);
                    continue;
                }
            };
            *slot =
                Some(decode(value).ok_or_else(|| {
                    invalid("sslmode or sslrootcert is not percent-encoded UTF-8")
                })?);
        }
        let mut stripped = url[..query_at].to_owned();
        if !kept.is_empty() {
            stripped.push('?');
            stripped.push_str(&kept.join("&"));
        }
        Ok((stripped, requested))
    }

    /// Percent-decoding as tokio-postgres does it (`+` stays `+`).
    fn decode(text: &str) -> Option<String> {
        let bytes = text.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            let hex = bytes
                .get(i + 1..i + 3)
                .filter(|hex| hex.iter().all(u8::is_ascii_hexdigit));
            match (bytes[i], hex) {
                (b'%', Some(hex)) => {
                    out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
                    i += 3;
                }
                (byte, _) => {
                    out.push(byte);
                    i += 1;
                }
            }
        }
        String::from_utf8(out).ok()
    }

    impl Tls {
        /// What the URL asks for; `parsed` is the `sslmode` tokio-postgres read (the default,
        /// `prefer`, unless a key=value string set it).
        pub(super) fn resolve(requested: Requested, parsed: WireMode) -> Result<Self, QueueError> {
            let roots = match requested.sslrootcert.as_deref() {
                None | Some("") => None,
                Some("system") => Some(Roots::System),
                Some(path) => Some(Roots::File(path.to_owned())),
            };
            let mode = match requested.sslmode.as_deref() {
                Some("disable") => Mode::Disable,
                Some("prefer") => Mode::Prefer,
                Some("require") => Mode::Require,
                Some("verify-ca") => Mode::VerifyCa,
                Some("verify-full") => Mode::VerifyFull,
                Some("allow") => {
                    return Err(invalid(
                        "sslmode=allow is not supported (prefer, require, verify-ca, verify-full)",
                    ));
                }
                Some(other) => {
                    return Err(invalid(format!(
                        "invalid sslmode {other:?} (disable, prefer, require, verify-ca, \
                         verify-full)"
                    )));
                }
                // As libpq: naming the system's roots asks for a full check.
                None if roots == Some(Roots::System) => Mode::VerifyFull,
                None => match parsed {
                    WireMode::Disable => Mode::Disable,
                    WireMode::Require => Mode::Require,
                    _ => Mode::Prefer,
                },
            };
            if roots == Some(Roots::System) && mode != Mode::VerifyFull {
                return Err(invalid(
                    "sslrootcert=system needs sslmode=verify-full (or no sslmode)",
                ));
            }
            let check = match (mode, roots) {
                (Mode::Disable, _) => Check::Nothing,
                (Mode::VerifyFull, roots) => Check::Full(roots.unwrap_or(Roots::System)),
                (Mode::VerifyCa, roots) => Check::Chain(roots.unwrap_or(Roots::System)),
                // As libpq: a root certificate named makes `prefer` and `require` check the
                // chain too.
                (Mode::Prefer | Mode::Require, Some(roots)) => Check::Chain(roots),
                (Mode::Prefer | Mode::Require, None) => Check::Nothing,
            };
            Ok(Self { mode, check })
        }

        /// The `sslmode` tokio-postgres negotiates with: the verify modes require TLS.
        pub(super) fn wire_mode(&self) -> WireMode {
            match self.mode {
                Mode::Disable => WireMode::Disable,
                Mode::Prefer => WireMode::Prefer,
                Mode::Require | Mode::VerifyCa | Mode::VerifyFull => WireMode::Require,
            }
        }

        /// The connector for the pool and the leader's session; loads the roots once.
        pub(super) fn connector(&self) -> Result<MakeRustlsConnect, QueueError> {
            // The process's provider if one was installed, else the one rustls is built with
            // here (aws-lc-rs, as for reqwest).
            let provider = CryptoProvider::get_default()
                .cloned()
                .unwrap_or_else(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()));
            let verifier: Arc<dyn ServerCertVerifier> = match &self.check {
                Check::Nothing => Arc::new(Unverified(Arc::clone(&provider))),
                Check::Chain(roots) => Arc::new(ChainOnly(webpki(roots, &provider)?)),
                Check::Full(roots) => webpki(roots, &provider)?,
            };
            let config = ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| invalid(format!("TLS: {e}")))?
                .dangerous()
                .with_custom_certificate_verifier(verifier)
                .with_no_client_auth();
            Ok(MakeRustlsConnect::new(config))
        }
    }

    fn webpki(
        roots: &Roots,
        provider: &Arc<CryptoProvider>,
    ) -> Result<Arc<WebPkiServerVerifier>, QueueError> {
        WebPkiServerVerifier::builder_with_provider(Arc::new(load(roots)?), Arc::clone(provider))
            .build()
            .map_err(|e| invalid(format!("TLS roots: {e}")))
    }

    fn load(roots: &Roots) -> Result<RootCertStore, QueueError> {
        let mut store = RootCertStore::empty();
        match roots {
            Roots::File(path) => {
                let certs = CertificateDer::pem_file_iter(path)
                    .and_then(Iterator::collect::<Result<Vec<_>, _>>)
                    .map_err(|e| invalid(format!("sslrootcert {path}: {e}")))?;
                for cert in certs {
                    store
                        .add(cert)
                        .map_err(|e| invalid(format!("sslrootcert {path}: {e}")))?;
                }
                if store.is_empty() {
                    return Err(invalid(format!("sslrootcert {path}: no certificate in it")));
                }
            }
            Roots::System => {
                let found = rustls_native_certs::load_native_certs();
                let (added, _unparsable) = store.add_parsable_certificates(found.certs);
                if added == 0 {
                    tracing::warn!(
                        errors = ?found.errors,
                        "no system CA certificates; checking the postgres server against the \
                         bundled Mozilla roots"
                    );
                    store.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
                }
            }
        }
        Ok(store)
    }

    /// `prefer` and `require`: any certificate goes, but the handshake must still be signed
    /// by its key.
    #[derive(Debug)]
    struct Unverified(Arc<CryptoProvider>);

    impl ServerCertVerifier for Unverified {
        fn verify_server_cert(
            &self,
            _end_entity: &CertificateDer<'_>,
            _intermediates: &[CertificateDer<'_>],
            _server_name: &ServerName<'_>,
            _ocsp_response: &[u8],
            _now: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }

    /// `verify-ca`: the full check but for the host name. webpki checks the chain (validity
    /// dates included) before the name, so a name error means the chain was good.
    #[derive(Debug)]
    struct ChainOnly(Arc<WebPkiServerVerifier>);

    impl ServerCertVerifier for ChainOnly {
        fn verify_server_cert(
            &self,
            end_entity: &CertificateDer<'_>,
            intermediates: &[CertificateDer<'_>],
            server_name: &ServerName<'_>,
            ocsp_response: &[u8],
            now: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            match self.0.verify_server_cert(
                end_entity,
                intermediates,
                server_name,
                ocsp_response,
                now,
            ) {
                Err(rustls::Error::InvalidCertificate(
                    CertificateError::NotValidForName
                    | CertificateError::NotValidForNameContext { .. },
                )) => Ok(ServerCertVerified::assertion()),
                other => other,
            }
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            self.0.verify_tls12_signature(message, cert, dss)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            self.0.verify_tls13_signature(message, cert, dss)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.supported_verify_schemes()
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn requested(sslmode: Option<&str>, sslrootcert: Option<&str>) -> Requested {
            Requested {
                sslmode: sslmode.map(str::to_owned),
                sslrootcert: sslrootcert.map(str::to_owned),
            }
        }

        #[test]
        fn sslmode_and_sslrootcert_are_taken_out_of_the_query_and_the_rest_kept() {
            let (url, taken) = take_params(
                "postgres://u:p@db:5432/relay?options=-csearch_path%3Dx&sslmode=verify-full\
                 &sslrootcert=%2Fetc%2Fca.pem&application_name=a",
            )
            .unwrap();
            assert_eq!(
                url,
                "postgres://u:p@db:5432/relay?options=-csearch_path%3Dx&application_name=a"
            );
            assert_eq!(taken, requested(Some("verify-full"), Some("/etc/ca.pem")));

            let (url, taken) = take_params("postgresql://db/relay?sslmode=require").unwrap();
            assert_eq!(url, "postgresql://db/relay");
            assert_eq!(taken, requested(Some("require"), None));
        }

        #[test]
        fn urls_without_those_parameters_and_key_value_strings_pass_unchanged() {
            for url in [
                "postgres://u:p@db/relay",
                "postgres://u:p@db/relay?connect_timeout=3",
                "postgres://u:p?ss@db/relay",
                "host=db user=relay sslmode=require",
            ] {
                let (same, taken) = take_params(url).unwrap();
                assert_eq!(same, url);
                assert_eq!(taken, Requested::default());
            }
        }

        #[test]
        fn a_question_mark_in_the_password_does_not_start_the_query() {
            let (url, taken) = take_params("postgres://u:p?x@db/relay?sslmode=disable").unwrap();
            assert_eq!(url, "postgres://u:p?x@db/relay");
            assert_eq!(taken, requested(Some("disable"), None));
        }

        #[test]
        fn sslmodes_resolve_as_in_libpq() {
            use Check::{Chain, Full, Nothing};
            let file = || Roots::File("/ca.pem".to_owned());
            let cases = [
                (None, None, WireMode::Prefer, Mode::Prefer, Nothing),
                (None, None, WireMode::Require, Mode::Require, Nothing),
                (None, None, WireMode::Disable, Mode::Disable, Nothing),
                (
                    Some("disable"),
                    Some("/ca.pem"),
                    WireMode::Prefer,
                    Mode::Disable,
                    Nothing,
                ),
                (
                    Some("prefer"),
                    None,
                    WireMode::Prefer,
                    Mode::Prefer,
                    Nothing,
                ),
                (
                    Some("require"),
                    None,
                    WireMode::Prefer,
                    Mode::Require,
                    Nothing,
                ),
                (
                    Some("require"),
                    Some(""),
                    WireMode::Prefer,
                    Mode::Require,
                    Nothing,
                ),
                (
                    Some("require"),
                    Some("/ca.pem"),
                    WireMode::Prefer,
                    Mode::Require,
                    Chain(file()),
                ),
                (
                    Some("prefer"),
                    Some("/ca.pem"),
                    WireMode::Prefer,
                    Mode::Prefer,
                    Chain(file()),
                ),
                (
                    Some("verify-ca"),
                    None,
                    WireMode::Prefer,
                    Mode::VerifyCa,
                    Chain(Roots::System),
                ),
                (
                    Some("verify-ca"),
                    Some("/ca.pem"),
                    WireMode::Prefer,
                    Mode::VerifyCa,
                    Chain(file()),
                ),
                (
                    Some("verify-full"),
                    None,
                    WireMode::Prefer,
                    Mode::VerifyFull,
                    Full(Roots::System),
                ),
                (
                    Some("verify-full"),
                    Some("/ca.pem"),
                    WireMode::Prefer,
                    Mode::VerifyFull,
                    Full(file()),
                ),
                (
                    Some("verify-full"),
                    Some("system"),
                    WireMode::Prefer,
                    Mode::VerifyFull,
                    Full(Roots::System),
                ),
                (
                    None,
                    Some("system"),
                    WireMode::Prefer,
                    Mode::VerifyFull,
                    Full(Roots::System),
                ),
            ];
            for (sslmode, sslrootcert, parsed, mode, check) in cases {
                let tls = Tls::resolve(requested(sslmode, sslrootcert), parsed).unwrap();
                assert_eq!(
                    tls,
                    Tls { mode, check },
                    "sslmode={sslmode:?} sslrootcert={sslrootcert:?}"
                );
            }
        }

        #[test]
        fn verify_modes_require_tls_on_the_wire() {
            for (sslmode, wire) in [
                ("disable", WireMode::Disable),
                ("prefer", WireMode::Prefer),
                ("require", WireMode::Require),
                ("verify-ca", WireMode::Require),
                ("verify-full", WireMode::Require),
            ] {
                let tls = Tls::resolve(requested(Some(sslmode), None), WireMode::Prefer).unwrap();
                assert_eq!(tls.wire_mode(), wire, "{sslmode}");
            }
        }

        #[test]
        fn unsupported_or_contradictory_settings_are_refused_by_name() {
            for (sslmode, sslrootcert, expected) in [
                (Some("allow"), None, "sslmode=allow is not supported"),
                (Some("verify_full"), None, "invalid sslmode \"verify_full\""),
                (Some("require"), Some("system"), "sslrootcert=system needs"),
                (
                    Some("verify-ca"),
                    Some("system"),
                    "sslrootcert=system needs",
                ),
            ] {
                let error = Tls::resolve(requested(sslmode, sslrootcert), WireMode::Prefer)
                    .unwrap_err()
                    .to_string();
                assert!(error.contains(expected), "{error}");
            }
        }

        #[test]
        fn a_missing_or_empty_root_certificate_file_is_an_error_naming_it() {
            let dir = tempfile::tempdir().unwrap();
            let missing = dir.path().join("missing.pem").display().to_string();
            let empty = dir.path().join("empty.pem");
            std::fs::write(&empty, "not a certificate\n").unwrap();
            let empty = empty.display().to_string();
            for path in [&missing, &empty] {
                let tls = Tls {
                    mode: Mode::VerifyFull,
                    check: Check::Full(Roots::File(path.clone())),
                };
                let error = tls.connector().err().unwrap().to_string();
                assert!(error.contains(&format!("sslrootcert {path}")), "{error}");
            }
        }

        #[test]
        fn the_system_roots_load() {
            let tls = Tls {
                mode: Mode::VerifyFull,
                check: Check::Full(Roots::System),
            };
            assert!(!load(&Roots::System).unwrap().is_empty());
            tls.connector().unwrap();
        }

        #[test]
        fn percent_decoding_matches_tokio_postgres() {
            assert_eq!(decode("%2Fa%2fb").as_deref(), Some("/a/b"));
            assert_eq!(decode("a+b%").as_deref(), Some("a+b%"));
            assert_eq!(decode("%zz%4").as_deref(), Some("%zz%4"));
            assert_eq!(decode("%C3%A9").as_deref(), Some("é"));
            assert_eq!(decode("%FF"), None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_leader_lock_key_depends_on_the_app_id_only() {
        assert_eq!(leader_lock_key("app-1"), leader_lock_key("app-1"));
        assert_ne!(leader_lock_key("app-1"), leader_lock_key("app-2"));
    }

    #[test]
    fn dead_letter_filters_number_their_parameters_in_order() {
        let filter = DeadLetterFilter {
            ids: vec![1, 2],
            reason: Some("rejected".into()),
            subject: None,
            since_ms: Some(10),
            until_ms: None,
            after_id: Some(5),
            limit: Some(3),
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
