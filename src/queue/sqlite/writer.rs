//! The queue thread, the only writer of the file: it runs commands in arrival order, commits
//! the webhooks waiting together (group commit, `synchronous = FULL`), and runs the
//! forwarder's bookkeeping transactions between groups (see [`super`]). It never waits for
//! anything but the database.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;

use rusqlite::{Connection, TransactionBehavior, params};
use tokio::sync::oneshot;

use super::dedup::Dedup;
use super::file::QueueFile;
use super::packed::{self, Beside};
use super::{BOOKKEEPING_CHUNK, storage};
use crate::heap::wire::RecordKind;
use crate::queue::prepared::{Prepared, Row, Rows, StorableShape};
use crate::queue::{Claimed, Enqueued, QUARANTINE_KIND, QueueError};

/// The most webhooks committed in one transaction.
pub(super) const MAX_GROUP: usize = 1024;

pub(super) type Reply<T> = oneshot::Sender<Result<T, QueueError>>;

pub(super) enum Command {
    /// Boxed: a webhook is much larger than a call, and commands wait in a channel.
    Enqueue(Box<Prepared>, Reply<Enqueued>),
    Call(Box<dyn FnOnce(&mut Connection) + Send>),
}

/// The queue thread: runs commands in order, grouping consecutive enqueues into one commit.
pub(super) fn serve(
    mut conn: Connection,
    commands: mpsc::Receiver<Command>,
    waiting: &AtomicUsize,
    file: &QueueFile,
) {
    let mut dedup = Dedup::default();
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
                commit_group(&mut conn, group, file, &mut dedup);
                if dedup.wants_merge()
                    && let Err(error) = dedup.merge_some(&mut conn)
                {
                    // Its entries stay in memory and the merge is tried again after the next
                    // group: deduplication goes on meanwhile.
                    tracing::warn!(%error, "queue: writing digests failed; retrying later");
                }
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
///
/// After the commit, and before anyone hears of it, the group makes sure the path still names
/// the file it went into (see [`QueueFile`]): one `stat` of each of the three files, a few
/// microseconds against the commit's fsync. A group committed into a removed file is answered
/// with the error, so nothing is acknowledged that the next start would not find.
fn commit_group(
    conn: &mut Connection,
    group: Vec<(Box<Prepared>, Reply<Enqueued>)>,
    file: &QueueFile,
    dedup: &mut Dedup,
) {
    let outcome = (|| {
        // Prepared once (a pragma is a statement like any other), not parsed per group.
        conn.prepare_cached("PRAGMA synchronous = FULL")?
            .execute([])?;
        let result = insert_group(conn, &group, dedup);
        conn.prepare_cached("PRAGMA synchronous = NORMAL")?
            .execute([])?;
        result
    })();

    match outcome.map(|results| (results, file.check())) {
        Ok((_, Err(lost))) => {
            let message = lost.to_string();
            for (_, reply) in group {
                let _ = reply.send(Err(QueueError::Storage(message.clone())));
            }
        }
        Ok((results, Ok(()))) => {
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
    group: &[(Box<Prepared>, Reply<Enqueued>)],
    dedup: &mut Dedup,
) -> rusqlite::Result<Vec<Result<Enqueued, QueueError>>> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut ids = Ids::read(&tx)?;
    let all: rusqlite::Result<Vec<Enqueued>> = group
        .iter()
        .map(|(webhook, _)| insert_webhook(&tx, webhook, dedup, &mut ids))
        .collect();
    if let Ok(results) = all {
        let stored = group
            .iter()
            .zip(&results)
            .filter(|(_, r)| **r != Enqueued::Duplicate);
        upsert_shapes(&tx, stored.map(|((webhook, _), _)| &**webhook))?;
        ids.store(&tx)?;
        tx.commit()?;
        return Ok(results.into_iter().map(Ok).collect());
    }
    drop(tx); // rolls back

    let mut tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut ids = Ids::read(&tx)?;
    let mut results = Vec::with_capacity(group.len());
    for (webhook, _) in group {
        let savepoint = tx.savepoint()?;
        let result = insert_webhook(&savepoint, webhook, dedup, &mut ids);
        if result.is_ok() {
            savepoint.commit()?;
        } // else: the savepoint rolls back when dropped, and its ids stay unused
        results.push(result.map_err(storage));
    }
    let stored = group
        .iter()
        .zip(&results)
        .filter(|(_, result)| matches!(result, Ok(enqueued) if *enqueued != Enqueued::Duplicate));
    upsert_shapes(&tx, stored.map(|((webhook, _), _)| &**webhook))?;
    ids.store(&tx)?;
    tx.commit()?;
    Ok(results)
}

/// Record ids handed out during one group's transaction: the file's counter
/// (`counters.next_record_id`) read when the transaction starts and written before it commits,
/// so that a group costs two statements on the counter, not one per webhook. The transaction
/// holds SQLite's write lock throughout: a `dlq` command in another process takes its ids
/// before or after, never in between.
struct Ids {
    next: i64,
}

impl Ids {
    fn read(tx: &Connection) -> rusqlite::Result<Self> {
        let next = tx
            .prepare_cached("SELECT value FROM counters WHERE name = 'next_record_id'")?
            .query_row([], |row| row.get(0))?;
        Ok(Ids { next })
    }

    fn take(&mut self, count: usize) -> i64 {
        let first = self.next;
        self.next += count as i64;
        first
    }

    fn store(&self, tx: &Connection) -> rusqlite::Result<()> {
        tx.prepare_cached("UPDATE counters SET value = ?1 WHERE name = 'next_record_id'")?
            .execute(params![self.next])?;
        Ok(())
    }
}

/// Stores one webhook, in the group's transaction (or its savepoint). A webhook noted by
/// `dedup` whose transaction then rolls back leaves a stale entry there, which matches no row.
fn insert_webhook(
    tx: &Connection,
    webhook: &Prepared,
    dedup: &mut Dedup,
    ids: &mut Ids,
) -> rusqlite::Result<Enqueued> {
    if dedup.is_known(tx, &webhook.source, &webhook.digest)? {
        return Ok(Enqueued::Duplicate);
    }
    // Records travel packed in the webhook's row (see `packed`); a quarantined webhook's one
    // dead letter is a record row at once, since no claim would ever unpack it. A key is
    // stored once per webhook, the first record under it kept, as the records table does.
    let distinct: Vec<&Row> = match &webhook.rows {
        Rows::Records(rows) => {
            let mut keys = HashSet::new();
            rows.iter().filter(|row| keys.insert(&row.key)).collect()
        }
        Rows::Quarantined { .. } => Vec::new(),
    };
    let packed = match distinct.is_empty() {
        true => None,
        false => Some(packed::pack(
            &distinct,
            Beside {
                digest: &webhook.digest,
                body: &webhook.body,
            },
            ids.take(distinct.len()),
        )),
    };
    let kinds = distinct
        .iter()
        .fold(0, |kinds, row| kinds | packed::kind_bit(row.kind));
    tx.prepare_cached(
        "INSERT INTO webhooks (source, digest, body, received_at, app_id, packed, packed_count,
         packed_kinds) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?
    .execute(params![
        webhook.source,
        &webhook.digest[..],
        &webhook.body[..],
        webhook.received_at_ms,
        packed.as_ref().map(|_| &webhook.app_id),
        packed,
        distinct.len() as i64,
        kinds,
    ])?;
    let webhook_id = tx.last_insert_rowid();
    dedup.note(&webhook.digest, webhook_id);
    let events = match &webhook.rows {
        Rows::Records(_) => distinct
            .iter()
            .filter(|row| row.kind == RecordKind::Track)
            .count(),
        quarantined @ Rows::Quarantined { .. } => {
            let (at, app_id) = (webhook.received_at_ms, &webhook.app_id);
            insert_rows_from(tx, ids.take(1), webhook_id, app_id, at, quarantined, at)?
        }
    };
    Ok(webhook.rows.outcome(events))
}

/// Unpacks the records of at most `max` packed webhooks of lane `app_id`, oldest first, into
/// record rows due at their webhook's arrival (as if stored then); returns how many webhooks it
/// unpacked. In the caller's transaction: a webhook's records become rows and leave its row in
/// the same commit, so a crash leaves them in one place or the other, never both or neither.
/// Packed records that do not unpack (never written: only a damaged file holds them) fail the
/// claim naming the webhook, as any unreadable row fails the statement that reads it.
pub(super) fn unpack_some(tx: &Connection, app_id: &str, max: usize) -> rusqlite::Result<usize> {
    let webhooks = {
        let mut select = tx.prepare_cached(
            "SELECT id, received_at, packed, digest, body FROM webhooks
             WHERE packed_count > 0 AND app_id = ?1 ORDER BY id LIMIT ?2",
        )?;
        let rows = select.query_map(params![app_id, max as i64], |row| {
            let digest = digest(row.get::<_, Option<Vec<u8>>>(3)?.as_deref());
            Ok((
                row.get::<_, i64>(0)?,
                row.get::<_, i64>(1)?,
                row.get::<_, Vec<u8>>(2)?,
                digest,
                row.get::<_, Vec<u8>>(4)?,
            ))
        })?;
        rows.collect::<rusqlite::Result<Vec<_>>>()?
    };
    let mut emptied = tx.prepare_cached(
        "UPDATE webhooks SET packed = NULL, packed_count = 0, packed_kinds = 0, app_id = NULL
         WHERE id = ?1",
    )?;
    for (id, received_at, bytes, digest, body) in &webhooks {
        let unpacked = packed::unpack(bytes, Beside { digest, body }).map_err(|damaged| {
            let error = format!("webhook {id}: {damaged}");
            rusqlite::Error::FromSqlConversionFailure(2, rusqlite::types::Type::Blob, error.into())
        })?;
        let rows = Rows::Records(unpacked.rows);
        let at = *received_at;
        insert_rows_from(tx, unpacked.first_id, *id, app_id, at, &rows, at)?;
        emptied.execute(params![id])?;
    }
    Ok(webhooks.len())
}

/// Counts the shapes of the group's stored webhooks, one upsert per distinct shape: a group's
/// webhooks are mostly of a few shapes. A shape's sample and kind are the last webhook's.
fn upsert_shapes<'a>(
    tx: &Connection,
    stored: impl Iterator<Item = &'a Prepared>,
) -> rusqlite::Result<()> {
    let mut seen: HashMap<(&str, [u8; 32]), Sighting<'a>> = HashMap::new();
    for webhook in stored {
        let Some(shape) = &webhook.shape else {
            continue;
        };
        let at = webhook.received_at_ms;
        seen.entry((&webhook.source, shape.key))
            .and_modify(|s| {
                s.count += 1;
                s.first = s.first.min(at);
                s.last = s.last.max(at);
                s.shape = shape;
            })
            .or_insert(Sighting {
                shape,
                count: 1,
                first: at,
                last: at,
            });
    }
    let mut upsert = tx.prepare_cached(
        "INSERT INTO shapes (key, source, kind, action, paths, count, first_seen, last_seen,
         sample) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
         ON CONFLICT (key) DO UPDATE SET count = count + excluded.count,
             first_seen = MIN(first_seen, excluded.first_seen),
             last_seen = MAX(last_seen, excluded.last_seen), sample = excluded.sample",
    )?;
    for ((source, _), s) in seen {
        upsert.execute(params![
            &s.shape.key[..],
            source,
            s.shape.kind,
            s.shape.action,
            s.shape.paths,
            s.count,
            s.first,
            s.last,
            s.shape.sample,
        ])?;
    }
    Ok(())
}

/// A shape seen in a group: how often and when, and its last sighting's columns.
struct Sighting<'a> {
    shape: &'a StorableShape,
    count: i64,
    first: i64,
    last: i64,
}

/// Takes `count` record ids from the file's counter (`counters.next_record_id`, schema version
/// 6) and returns the first, for a transaction outside a group (a replay); a group takes its
/// ids through [`Ids`]. Every record row gets its id from the counter, whenever it is
/// inserted, so ids follow arrival: a webhook's packed records, unpacked later, take the ids
/// taken for them when it arrived, before the ones of a quarantined webhook that came after it.
fn take_ids(tx: &Connection, count: usize) -> rusqlite::Result<i64> {
    tx.prepare_cached(
        "UPDATE counters SET value = value + ?1 WHERE name = 'next_record_id'
         RETURNING value - ?1",
    )?
    .query_row(params![count as i64], |row| row.get(0))
}

/// Inserts a webhook's records into lane `app_id` under new ids; returns how many track
/// events were new.
pub(super) fn insert_rows(
    tx: &Connection,
    webhook_id: i64,
    app_id: &str,
    received_at_ms: i64,
    rows: &Rows,
    now_ms: i64,
) -> rusqlite::Result<usize> {
    let count = match rows {
        Rows::Records(rows) => rows.len(),
        Rows::Quarantined { .. } => 1,
    };
    let first_id = take_ids(tx, count)?;
    insert_rows_from(
        tx,
        first_id,
        webhook_id,
        app_id,
        received_at_ms,
        rows,
        now_ms,
    )
}

/// [`insert_rows`] under the ids from `first_id` on, taken before (the n-th row takes
/// `first_id + n`; a row skipped as a key its webhook has leaves its id unused).
fn insert_rows_from(
    tx: &Connection,
    first_id: i64,
    webhook_id: i64,
    app_id: &str,
    received_at_ms: i64,
    rows: &Rows,
    now_ms: i64,
) -> rusqlite::Result<usize> {
    match rows {
        Rows::Records(rows) => {
            let mut insert = tx.prepare_cached(sql!(
                "INSERT INTO records (id, webhook_id, key, kind, subject, json, state,
                 received_at, next_attempt_at, updated_at, app_id)
                 VALUES (?8, ?1, ?2, ?3, ?4, '', {pending}, ?5, ?6, ?6, ?7)
                 ON CONFLICT (webhook_id, key) DO NOTHING"
            ))?;
            // The JSON beside the row (see `schema::RECORD_JSON`), only for a row inserted.
            let mut json =
                tx.prepare_cached("INSERT INTO record_json (id, json) VALUES (?1, ?2)")?;
            let mut events = 0;
            for (id, row) in (first_id..).zip(rows) {
                let new = insert.execute(params![
                    webhook_id,
                    row.key,
                    row.kind.as_str(),
                    row.subject,
                    received_at_ms,
                    now_ms,
                    app_id,
                    id,
                ])?;
                if new == 0 {
                    continue;
                }
                json.execute(params![id, row.json])?;
                if row.kind == RecordKind::Track {
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
            tx.prepare_cached(sql!(
                "INSERT INTO records (id, webhook_id, key, kind, subject, json, state,
                 received_at, next_attempt_at, updated_at, dead_reason, dead_detail, app_id)
                 VALUES (?10, ?1, ?2, ?3, ?4, '', {dead}, ?5, ?6, ?6, ?7, ?8, ?9)
                 ON CONFLICT (webhook_id, key) DO NOTHING"
            ))?
            .execute(params![
                webhook_id,
                key,
                QUARANTINE_KIND,
                subject,
                received_at_ms,
                now_ms,
                reason,
                detail,
                app_id,
                first_id,
            ])?;
            Ok(0)
        }
    }
}

/// The oldest due records of lane `?4` and kind `?1` at `?2`, at most `?3`: a range of the
/// partial index `records_due` (`app_id, kind, next_attempt_at`), which only a statement
/// naming its `state = 0` literal may use. Each with its webhook's digest (one primary-key lookup), which trace links derive from; a subquery,
/// not a join, so that a record is claimed even if its webhook row were missing.
pub(super) const CLAIM_DUE: &str = "SELECT id, subject,
    COALESCE((SELECT j.json FROM record_json j WHERE j.id = records.id), json), attempts,
    received_at,
    (SELECT w.digest FROM webhooks w WHERE w.id = records.webhook_id),
    (SELECT w.received_at FROM webhooks w WHERE w.id = records.webhook_id) FROM records
    WHERE state = {pending} AND app_id = ?4 AND kind = ?1 AND next_attempt_at <= ?2
    ORDER BY next_attempt_at, id LIMIT ?3";

/// A stored digest; a missing one or one of another length (never written) reads as zeros,
/// which only makes a trace link point nowhere.
fn digest(stored: Option<&[u8]>) -> [u8; 32] {
    stored
        .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
        .unwrap_or([0; 32])
}

/// What a claim still wants: records to lease, and packed webhooks it may unpack to find them.
#[derive(Debug, Clone, Copy)]
pub(super) struct Wanted {
    pub records: usize,
    pub unpack: usize,
}

/// What one [`claim_some`] did: the records leased, whether fewer were due than wanted (and
/// nothing more may be unpacked), how many webhooks it unpacked.
pub(super) struct ClaimedSome {
    pub records: Vec<Claimed>,
    pub exhausted: bool,
    pub unpacked: usize,
}

/// Leases up to `wanted.records` due records of lane `app_id` and `kind`, oldest first, until
/// `lease_end_ms`, in one transaction that ends early when webhooks are `waiting`. Before each
/// chunk it unpacks as many of the lane's packed webhooks as the chunk wants records (each
/// has at least one, of this kind or another; those of another kind wait as rows for that
/// kind's claim), up to `wanted.unpack` in all, so that a claim of a kind that few webhooks
/// carry cannot unpack a whole backlog ahead of the forwarder.
pub(super) fn claim_some(
    conn: &mut Connection,
    app_id: &str,
    kind: RecordKind,
    wanted: Wanted,
    now_ms: i64,
    lease_end_ms: i64,
    waiting: &AtomicUsize,
) -> rusqlite::Result<ClaimedSome> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut claimed: Vec<Claimed> = Vec::new();
    let mut unpacked = 0;
    let exhausted = loop {
        let want = (wanted.records - claimed.len()).min(BOOKKEEPING_CHUNK);
        let unpack = want.min(wanted.unpack - unpacked);
        let some = if unpack > 0 {
            unpack_some(&tx, app_id, unpack)?
        } else {
            0
        };
        unpacked += some;
        let chunk = {
            let mut select = tx.prepare_cached(sql!(CLAIM_DUE))?;
            let rows =
                select.query_map(params![kind.as_str(), now_ms, want as i64, app_id], |row| {
                    Ok(Claimed {
                        id: row.get(0)?,
                        kind,
                        subject: row.get(1)?,
                        json: row.get(2)?,
                        attempts: row.get(3)?,
                        received_at_ms: row.get(4)?,
                        webhook_digest: digest(row.get::<_, Option<Vec<u8>>>(5)?.as_deref()),
                        webhook_received_at_ms: row.get::<_, Option<i64>>(6)?.unwrap_or_default(),
                    })
                })?;
            rows.collect::<rusqlite::Result<Vec<_>>>()?
        };
        let mut lease = tx
            .prepare_cached("UPDATE records SET claimed = 1, next_attempt_at = ?1 WHERE id = ?2")?;
        for record in &chunk {
            lease.execute(params![lease_end_ms, record.id])?;
        }
        // Fewer due than wanted, and nothing more to unpack that could make up the rest.
        let more_packed = unpack > 0 && some == unpack;
        let exhausted = chunk.len() < want && !more_packed;
        claimed.extend(chunk);
        if exhausted || claimed.len() >= wanted.records || waiting.load(Ordering::SeqCst) > 0 {
            break exhausted;
        }
    };
    tx.commit()?;
    Ok(ClaimedSome {
        records: claimed,
        exhausted,
        unpacked,
    })
}
