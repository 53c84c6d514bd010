//! Erasures on the sqlite queue (contract §12): the scan for a person's webhooks, their
//! erasure, the `erasures` table, and scrubbing deleted content from the files.
//!
//! Scans run on the read-only connection, one short read per page, so ingest never waits for
//! them; everything that writes is one call into the queue thread (one transaction). Deleted
//! content is zeroed as it is deleted (`secure_delete`, see `schema::prepare`), so once a
//! `TRUNCATE` checkpoint has copied the erasure's pages into the database file and emptied
//! the WAL ([`scrub`]), neither file holds the erased bytes. Erasures commit with the
//! writer's NORMAL synchronous: the checkpoint syncs the database file, and the erasure is
//! only answered after it.

use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use super::{SqliteQueue, packed};
use crate::queue::prepared::storable;
use crate::queue::{
    ErasureFilter, ErasureRow, ErasureScan, ErasureState, ErasureUpdate, NewErasure, QueueError,
    Removed, ScanCandidate,
};

/// Checkpoint attempts while a reader blocks it, each waiting at most [`CHECKPOINT_WAIT`] on
/// the queue thread, with [`CHECKPOINT_PAUSE`] between them (off the thread, so webhooks go
/// on): about 2 s in all before [`scrub`] gives up.
const CHECKPOINT_ATTEMPTS: u32 = 10;
const CHECKPOINT_WAIT: Duration = Duration::from_millis(100);
const CHECKPOINT_PAUSE: Duration = Duration::from_millis(100);

/// The writer's busy timeout outside a checkpoint (as `schema::prepare` sets it).
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The erasures whose Heap part is still to do: a request to make (`local_done` with an app id
/// and the identity) or a status to check (`heap_pending`).
const CLAIMABLE: &str = "((state = 'local_done' AND heap_app_id IS NOT NULL
    AND identity IS NOT NULL) OR state = 'heap_pending')";

/// One page of the scan: every webhook of source `?1` after id `?2`, at most `?3`, by id, with
/// whether a record names the identity (`?4`, as the subject column stores it) and, for
/// candidates only, the body: by subject, or holding the identity's bytes (`?5`, a blob, so
/// `instr` compares bytes). `+source`: the rowid range in id order, not the `(source, digest)`
/// index, which would read the source's whole range in digest order on every page (other
/// sources' rows are passed over, once per erasure). The byte match sees the identity as the
/// body spells it: one the sender escaped in its JSON (`\"`, `\u00e9`) is found only through
/// a record's subject. Packed records (not yet unpacked into rows) are returned when they hold
/// the subject's bytes (`?6`), and their subjects compared after unpacking them.
const SCAN: &str = "SELECT id, by_subject,
        CASE WHEN by_subject OR instr(body, ?5) > 0 OR instr(packed, ?6) > 0 THEN body END,
        CASE WHEN instr(packed, ?6) > 0 THEN packed END
    FROM (SELECT id, body, packed,
                 EXISTS (SELECT 1 FROM records r WHERE r.webhook_id = webhooks.id
                         AND r.subject = ?4) AS by_subject
          FROM webhooks WHERE id > ?2 AND +source = ?1 ORDER BY id LIMIT ?3)
    ORDER BY id";

const COLUMNS: &str = "id, source, heap_app_id, identity, identity_sha256, state, removed,
    requested_at, updated_at, deletion_request_id, attempts, last_error, reason, next_attempt_at";

fn conversion(
    column: usize,
    error: impl std::error::Error + Send + Sync + 'static,
) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(column, rusqlite::types::Type::Text, Box::new(error))
}

#[derive(Debug, thiserror::Error)]
#[error("unknown erasure state `{0}`")]
struct UnknownState(String);

/// An erasure from a row of [`COLUMNS`].
fn erasure_from(row: &rusqlite::Row<'_>) -> rusqlite::Result<ErasureRow> {
    let state: String = row.get(5)?;
    let removed: String = row.get(6)?;
    Ok(ErasureRow {
        id: row.get(0)?,
        source: row.get(1)?,
        heap_app_id: row.get(2)?,
        identity: row.get(3)?,
        identity_sha256: row.get(4)?,
        state: ErasureState::parse(&state).ok_or_else(|| conversion(5, UnknownState(state)))?,
        removed: serde_json::from_str(&removed).map_err(|e| conversion(6, e))?,
        requested_at_ms: row.get(7)?,
        updated_at_ms: row.get(8)?,
        deletion_request_id: row.get(9)?,
        attempts: row.get(10)?,
        last_error: row.get(11)?,
        reason: row.get(12)?,
        next_attempt_at_ms: row.get(13)?,
    })
}

pub(super) async fn scan(
    queue: &SqliteQueue,
    source: &str,
    identity: &str,
    after_id: i64,
    scan: usize,
) -> Result<ErasureScan, QueueError> {
    let (source, subject) = (source.to_owned(), storable(identity.to_owned()));
    let bytes = identity.as_bytes().to_vec();
    let subject_bytes = subject.as_bytes().to_vec();
    queue
        .read(move |conn| {
            let mut select = conn.prepare_cached(SCAN)?;
            let mut rows = select.query(params![
                source,
                after_id,
                i64::try_from(scan).unwrap_or(i64::MAX),
                subject,
                bytes,
                subject_bytes
            ])?;
            let mut page = ErasureScan::default();
            while let Some(row) = rows.next()? {
                let webhook_id: i64 = row.get(0)?;
                page.last_id = Some(webhook_id);
                if let Some(body) = row.get::<_, Option<Vec<u8>>>(2)? {
                    // Damaged packed records name nobody; the body's match still stands.
                    let packed_by_subject = row
                        .get::<_, Option<Vec<u8>>>(3)?
                        .and_then(|packed| packed::subjects(&packed).ok())
                        .is_some_and(|subjects| subjects.contains(&subject));
                    page.candidates.push(ScanCandidate {
                        webhook_id,
                        by_subject: row.get::<_, bool>(1)? || packed_by_subject,
                        body: body.into(),
                    });
                }
            }
            Ok(page)
        })
        .await
}

pub(super) async fn erase_webhooks(
    queue: &SqliteQueue,
    ids: Vec<i64>,
) -> Result<Removed, QueueError> {
    if ids.is_empty() {
        return Ok(Removed::default());
    }
    queue
        .call(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let mut removed = Removed::default();
            {
                let mut count = tx.prepare_cached(sql!(
                    "SELECT COUNT(*) FILTER (WHERE state = {pending}),
                            COUNT(*) FILTER (WHERE state = {delivered}),
                            COUNT(*) FILTER (WHERE state = {dead})
                     FROM records WHERE webhook_id = ?1"
                ))?;
                let mut delete = tx.prepare_cached("DELETE FROM records WHERE webhook_id = ?1")?;
                // Packed records are pending ones that have no row yet.
                let mut count_packed = tx.prepare_cached(
                    "SELECT packed_count FROM webhooks WHERE id = ?1 AND packed_count > 0",
                )?;
                let mut unpacked = tx.prepare_cached(
                    "UPDATE webhooks SET packed = NULL, packed_count = 0, packed_kinds = 0,
                     app_id = NULL WHERE id = ?1 AND packed_count > 0",
                )?;
                // An already empty body (erased before) is not counted again.
                let mut empty = tx.prepare_cached(
                    "UPDATE webhooks SET body = x'' WHERE id = ?1 AND length(body) > 0",
                )?;
                for id in &ids {
                    let (pending, delivered, dead) = count.query_row(params![id], |row| {
                        Ok((
                            row.get::<_, i64>(0)?,
                            row.get::<_, i64>(1)?,
                            row.get::<_, i64>(2)?,
                        ))
                    })?;
                    let packed: Option<i64> = count_packed
                        .query_row(params![id], |row| row.get(0))
                        .optional()?;
                    removed.pending_records += (pending + packed.unwrap_or(0)) as u64;
                    unpacked.execute(params![id])?;
                    removed.delivered_records += delivered as u64;
                    removed.dead_letters += dead as u64;
                    delete.execute(params![id])?;
                    removed.webhooks += empty.execute(params![id])? as u64;
                }
            }
            tx.commit()?;
            Ok(removed)
        })
        .await
}

pub(super) async fn erase_samples(
    queue: &SqliteQueue,
    source: &str,
    identity: &str,
) -> Result<u64, QueueError> {
    let (source, identity) = (source.to_owned(), identity.to_owned());
    queue
        .call(move |conn| {
            let cleared = conn.execute(
                "UPDATE shapes SET sample = NULL
                 WHERE source = ?1 AND sample IS NOT NULL AND instr(sample, ?2) > 0",
                params![source, identity],
            )?;
            Ok(cleared as u64)
        })
        .await
}

/// One `TRUNCATE` checkpoint, waiting at most [`CHECKPOINT_WAIT`] for readers: whether it
/// completed (the WAL copied into the synced database file and truncated to nothing).
fn checkpoint(conn: &mut Connection) -> rusqlite::Result<bool> {
    conn.busy_timeout(CHECKPOINT_WAIT)?;
    let outcome = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |row| {
        row.get::<_, i64>(0)
    });
    conn.busy_timeout(BUSY_TIMEOUT)?;
    match outcome {
        Ok(busy) => Ok(busy == 0),
        // Another connection's write lock (a `dlq` or `erase` beside the relay) can also
        // surface as an error rather than as the busy column.
        Err(rusqlite::Error::SqliteFailure(error, _))
            if matches!(
                error.code,
                rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
            ) =>
        {
            Ok(false)
        }
        Err(error) => Err(error),
    }
}

pub(super) async fn scrub(queue: &SqliteQueue) -> Result<(), QueueError> {
    for attempt in 1..=CHECKPOINT_ATTEMPTS {
        if queue.call(checkpoint).await? {
            return Ok(());
        }
        if attempt < CHECKPOINT_ATTEMPTS {
            tokio::time::sleep(CHECKPOINT_PAUSE).await;
        }
    }
    Err(QueueError::Storage(format!(
        "cannot scrub the queue file: its WAL checkpoint blocked by a reader for {} attempts; \
         the erased content may still be in the WAL until the next checkpoint",
        CHECKPOINT_ATTEMPTS
    )))
}

pub(super) async fn record(queue: &SqliteQueue, erasure: NewErasure) -> Result<i64, QueueError> {
    let removed = serde_json::to_string(&erasure.removed)
        .map_err(|e| QueueError::Storage(format!("cannot store an erasure's counts: {e}")))?;
    queue
        .call(move |conn| {
            conn.prepare_cached(
                "INSERT INTO erasures (source, heap_app_id, identity, identity_sha256, state,
                     removed, requested_at, updated_at, next_attempt_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7, ?7)",
            )?
            .execute(params![
                erasure.source,
                erasure.heap_app_id,
                erasure.identity,
                erasure.identity_sha256,
                ErasureState::LocalDone.as_str(),
                removed,
                erasure.requested_at_ms,
            ])?;
            Ok(conn.last_insert_rowid())
        })
        .await
}

pub(super) async fn list(
    queue: &SqliteQueue,
    filter: ErasureFilter,
) -> Result<Vec<ErasureRow>, QueueError> {
    queue
        .read(move |conn| {
            let mut select = conn.prepare_cached(&format!(
                "SELECT {COLUMNS} FROM erasures
                 WHERE (?1 IS NULL OR source = ?1) AND (?2 IS NULL OR state = ?2) AND id > ?3
                 ORDER BY id LIMIT ?4"
            ))?;
            let rows = select.query_map(
                params![
                    filter.source,
                    filter.state.map(ErasureState::as_str),
                    filter.after_id.unwrap_or(i64::MIN),
                    i64::try_from(filter.limit).unwrap_or(i64::MAX),
                ],
                erasure_from,
            )?;
            rows.collect()
        })
        .await
}

pub(super) async fn claim(
    queue: &SqliteQueue,
    now_ms: i64,
    lease_ms: i64,
    max: usize,
) -> Result<Vec<ErasureRow>, QueueError> {
    let lease_end = now_ms.saturating_add(lease_ms);
    queue
        .call(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let mut claimed = {
                let mut select = tx.prepare_cached(&format!(
                    "SELECT {COLUMNS} FROM erasures
                     WHERE {CLAIMABLE} AND next_attempt_at <= ?1 ORDER BY id LIMIT ?2"
                ))?;
                let rows = select.query_map(
                    params![now_ms, i64::try_from(max).unwrap_or(i64::MAX)],
                    erasure_from,
                )?;
                rows.collect::<rusqlite::Result<Vec<_>>>()?
            };
            {
                let mut lease = tx.prepare_cached(
                    "UPDATE erasures SET claimed = 1, next_attempt_at = ?1 WHERE id = ?2",
                )?;
                for erasure in &mut claimed {
                    lease.execute(params![lease_end, erasure.id])?;
                    erasure.next_attempt_at_ms = lease_end;
                }
            }
            tx.commit()?;
            Ok(claimed)
        })
        .await
}

pub(super) async fn update(
    queue: &SqliteQueue,
    id: i64,
    update: ErasureUpdate,
    now_ms: i64,
) -> Result<(), QueueError> {
    queue
        .call(move |conn| {
            // ?1 the id, ?2 now; each change ends the lease.
            let ended = "updated_at = ?2, claimed = 0";
            match update {
                ErasureUpdate::Requested {
                    deletion_request_id,
                    check_at_ms,
                } => conn.execute(
                    &format!(
                        "UPDATE erasures SET {ended}, state = ?3, deletion_request_id = ?4,
                         identity = NULL, next_attempt_at = ?5, last_error = NULL WHERE id = ?1"
                    ),
                    params![
                        id,
                        now_ms,
                        ErasureState::HeapPending.as_str(),
                        deletion_request_id,
                        check_at_ms
                    ],
                ),
                ErasureUpdate::Retry { error, at_ms } => conn.execute(
                    &format!(
                        "UPDATE erasures SET {ended}, attempts = attempts + 1, last_error = ?3,
                         next_attempt_at = ?4 WHERE id = ?1"
                    ),
                    params![id, now_ms, error, at_ms],
                ),
                ErasureUpdate::CheckLater { at_ms } => conn.execute(
                    &format!("UPDATE erasures SET {ended}, next_attempt_at = ?3 WHERE id = ?1"),
                    params![id, now_ms, at_ms],
                ),
                ErasureUpdate::Failed { reason } => conn.execute(
                    &format!(
                        "UPDATE erasures SET {ended}, state = ?3, reason = ?4, identity = NULL
                         WHERE id = ?1"
                    ),
                    params![id, now_ms, ErasureState::HeapFailed.as_str(), reason],
                ),
                ErasureUpdate::Done => conn.execute(
                    &format!("UPDATE erasures SET {ended}, state = ?3 WHERE id = ?1"),
                    params![id, now_ms, ErasureState::Done.as_str()],
                ),
            }?;
            Ok(())
        })
        .await
}

pub(super) async fn next_due_ms(queue: &SqliteQueue) -> Result<Option<i64>, QueueError> {
    queue
        .read(|conn| {
            conn.prepare_cached(&format!(
                "SELECT MIN(next_attempt_at) FROM erasures WHERE {CLAIMABLE}"
            ))?
            .query_row([], |row| row.get(0))
            .optional()
            .map(Option::flatten)
        })
        .await
}

pub(super) async fn still_pending(
    queue: &SqliteQueue,
    ids: Vec<i64>,
) -> Result<Vec<i64>, QueueError> {
    if ids.is_empty() {
        return Ok(ids);
    }
    queue
        .read(move |conn| {
            let mut pending = conn.prepare_cached(sql!(
                "SELECT 1 FROM records WHERE id = ?1 AND state = {pending}"
            ))?;
            let mut still = Vec::with_capacity(ids.len());
            for id in ids {
                if pending.exists(params![id])? {
                    still.push(id);
                }
            }
            Ok(still)
        })
        .await
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use bytes::Bytes;
    use serde_json::{Map, json};
    use sha2::{Digest, Sha256};

    use super::*;
    use crate::heap::wire::{HeapRecord, Outbound, RecordKind, TrackEvent};
    use crate::queue::{Content, NewWebhook, Queue};
    use crate::shapes::ShapeObservation;

    const T0: i64 = 1_700_000_000_000;

    /// A webhook of source `default` with `body`, one track event of `identity` carrying
    /// `properties`, and a full sample of the body.
    fn webhook(body: &str, identity: &str, properties: serde_json::Value) -> NewWebhook {
        let digest: [u8; 32] = Sha256::digest(body.as_bytes()).into();
        let properties: Map<String, serde_json::Value> =
            serde_json::from_value(properties).unwrap();
        NewWebhook {
            source: "default".into(),
            app_id: "app-1".into(),
            digest,
            body: Bytes::from(body.to_owned()),
            received_at_ms: T0,
            content: Content::Records(vec![Outbound {
                key: format!("key-{identity}"),
                record: HeapRecord::Track(TrackEvent {
                    identity: identity.into(),
                    event: "Userpilot Test".into(),
                    timestamp: "2023-11-14T22:13:20Z".into(),
                    idempotency_key: format!("key-{identity}"),
                    properties,
                }),
            }]),
            shape: Some(ShapeObservation {
                key: digest,
                kind: Some("form".into()),
                action: None,
                paths: vec!["user_id:string".into()],
                sample: Some(body.to_owned()),
            }),
        }
    }

    /// The bytes of the database file and of its WAL, as on disk.
    fn on_disk(path: &Path) -> (Vec<u8>, Vec<u8>) {
        let mut wal = path.as_os_str().to_owned();
        wal.push("-wal");
        let database = std::fs::read(path).unwrap();
        (database, std::fs::read(wal).unwrap_or_default())
    }

    fn holds(bytes: &[u8], text: &str) -> bool {
        bytes
            .windows(text.len())
            .any(|window| window == text.as_bytes())
    }

    /// Erases every webhook of `identity` the scan finds as the erase module does (one page,
    /// all candidates), its samples, and scrubs.
    async fn erase(queue: &SqliteQueue, identity: &str) -> Removed {
        let page = scan(queue, "default", identity, 0, 1000).await.unwrap();
        let ids = page.candidates.iter().map(|c| c.webhook_id).collect();
        let mut removed = erase_webhooks(queue, ids).await.unwrap();
        removed.shape_samples = erase_samples(queue, "default", identity).await.unwrap();
        scrub(queue).await.unwrap();
        removed
    }

    #[tokio::test]
    async fn after_an_erasure_and_scrub_neither_file_holds_the_identity_but_others_stay() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("queue.sqlite3");
        let queue = SqliteQueue::open(&path).unwrap();
        let (gone, kept) = ("erase-me-7f3a9c41", "keep-me-51d2e0b7");
        for (n, identity) in [gone, kept, gone].into_iter().enumerate() {
            let body = format!(r#"{{"user_id":"{identity}","n":{n}}}"#);
            let props = json!({"email": format!("{identity}@example.com")});
            queue
                .enqueue(webhook(&body, identity, props))
                .await
                .unwrap();
        }
        // One of them delivered, one dead: every state goes.
        let claimed = queue
            .claim("app-1", RecordKind::Track, 10, T0, 60_000)
            .await
            .unwrap();
        queue.ack(vec![claimed[0].id], T0).await.unwrap();
        queue
            .dead_letter(
                vec![claimed[2].id],
                "rejected".into(),
                gone.into(),
                true,
                T0,
            )
            .await
            .unwrap();
        let (database, wal) = on_disk(&path);
        assert!(
            holds(&database, gone) || holds(&wal, gone),
            "written at all"
        );

        let removed = erase(&queue, gone).await;
        assert_eq!(
            (
                removed.webhooks,
                removed.delivered_records,
                removed.dead_letters
            ),
            (2, 1, 1)
        );
        assert_eq!(
            removed.shape_samples, 2,
            "each webhook has its own shape here"
        );

        let (database, wal) = on_disk(&path);
        assert!(wal.is_empty(), "the WAL is truncated: {} bytes", wal.len());
        assert!(
            !holds(&database, gone),
            "the erased identity is in the database file"
        );
        assert!(
            holds(&database, kept),
            "another user's identity was removed too"
        );
    }

    #[tokio::test]
    async fn an_acked_records_old_json_is_zeroed_so_no_later_erasure_needs_to_find_it() {
        // The ack empties `json`; the record row (its subject) stays until erased. What the
        // JSON alone held — an email here — must be gone from the file, though the erasure
        // only deletes a row whose JSON is already ''. Later records share its page, so the
        // freed space is a hole between cells; the email is not at the JSON's end, which the
        // emptied (shorter) record would overwrite in that hole anyway.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("queue.sqlite3");
        let queue = SqliteQueue::open(&path).unwrap();
        let (identity, email) = ("user-3e9d", "only-in-json-0c4f2a@example.com");
        let mut delivered = webhook(
            r#"{"user_id":"user-3e9d"}"#,
            identity,
            json!({"email": email, "padding": "x".repeat(200)}),
        );
        delivered.shape = None;
        queue.enqueue(delivered).await.unwrap();
        for n in 0..3 {
            let neighbour = webhook(&format!(r#"{{"n":{n}}}"#), &format!("other-{n}"), json!({}));
            queue.enqueue(neighbour).await.unwrap();
        }
        scrub(&queue).await.unwrap();
        assert!(
            holds(&on_disk(&path).0, email),
            "the JSON is in the file before the ack"
        );
        let claimed = queue
            .claim("app-1", RecordKind::Track, 10, T0, 60_000)
            .await
            .unwrap();
        assert_eq!(claimed[0].subject, identity);
        queue.ack(vec![claimed[0].id], T0).await.unwrap();

        let removed = erase(&queue, identity).await;
        assert_eq!((removed.webhooks, removed.delivered_records), (1, 1));
        let (database, wal) = on_disk(&path);
        assert!(!holds(&database, email) && !holds(&wal, email));
        assert!(!holds(&database, identity));
        assert!(holds(&database, "other-2"), "the neighbours stay");
        drop(queue);

        // Without secure_delete, the same ack, erasure and checkpoint leave the JSON behind in
        // the page's free space: that is why every writing connection turns it on.
        let control = dir.path().join("control.sqlite3");
        let json = json!({"email": email, "padding": "x".repeat(200)}).to_string();
        let mut conn = Connection::open(&control).unwrap();
        super::super::schema::prepare(&mut conn).unwrap();
        conn.pragma_update(None, "secure_delete", "OFF").unwrap();
        conn.execute_batch(&crate::queue::spell_states(&format!(
            "INSERT INTO records (webhook_id, key, kind, subject, json, state, received_at,
                 next_attempt_at, updated_at)
             VALUES (1, 'k', 'track', '{identity}', '{json}', {{pending}}, 0, 0, 0),
                    (2, 'k', 'track', 'other-0', '{{}}', {{pending}}, 0, 0, 0),
                    (3, 'k', 'track', 'other-1', '{{}}', {{pending}}, 0, 0, 0);
             PRAGMA wal_checkpoint(TRUNCATE);
             UPDATE records SET state = {{delivered}}, json = '' WHERE webhook_id = 1;
             DELETE FROM records WHERE webhook_id = 1;
             PRAGMA wal_checkpoint(TRUNCATE);"
        )))
        .unwrap();
        let (database, _) = on_disk(&control);
        assert!(
            holds(&database, email),
            "control: the bytes stay without it"
        );
    }

    #[tokio::test]
    async fn scans_read_the_webhooks_in_id_order_not_the_digest_index() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("queue.sqlite3");
        drop(SqliteQueue::open(&path).unwrap());
        let conn = Connection::open(&path).unwrap();
        let mut statement = conn.prepare(&format!("EXPLAIN QUERY PLAN {SCAN}")).unwrap();
        let plan = statement
            .query_map(
                params!["default", 0, 10, "x", b"x".to_vec(), b"x".to_vec()],
                |row| row.get::<_, String>(3),
            )
            .unwrap()
            .map(Result::unwrap)
            .collect::<Vec<_>>()
            .join("; ");
        assert!(
            plan.contains("webhooks USING INTEGER PRIMARY KEY (rowid>?)"),
            "{plan}"
        );
        assert!(!plan.contains("webhooks_dedup"), "{plan}");
    }

    #[tokio::test]
    async fn a_version_4_file_gets_the_erasures_table() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("queue.sqlite3");
        drop(SqliteQueue::open(&path).unwrap());
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch("DROP TABLE erasures; PRAGMA user_version = 4;")
            .unwrap();
        drop(conn);
        let queue = SqliteQueue::open(&path).unwrap();
        let filter = ErasureFilter {
            limit: 10,
            ..ErasureFilter::default()
        };
        assert!(list(&queue, filter).await.unwrap().is_empty());
        drop(queue);
        let conn = Connection::open(&path).unwrap();
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |row| row.get(0))
            .unwrap();
        assert_eq!(version, super::super::schema::SCHEMA_VERSION);
        let secure: i64 = {
            let mut conn = conn;
            super::super::schema::prepare(&mut conn).unwrap();
            conn.query_row("PRAGMA secure_delete", [], |row| row.get(0))
                .unwrap()
        };
        assert_eq!(secure, 1, "prepare turns secure_delete on");
    }

    #[tokio::test]
    async fn a_relay_restarted_after_kill_9_takes_up_the_erasures_its_predecessor_had_claimed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("queue.sqlite3");
        let queue = SqliteQueue::open_for_serving(&path).await.unwrap();
        // Real times: opening for serving releases leases as of the clock's now.
        let now = crate::clock::Clock::now_ms(&crate::clock::SystemClock);
        let erasure = NewErasure {
            source: "default".into(),
            heap_app_id: Some("app-1".into()),
            identity: Some("someone".into()),
            identity_sha256: crate::erase::identity_sha256("someone"),
            removed: Removed::default(),
            requested_at_ms: now,
        };
        let id = record(&queue, erasure).await.unwrap();
        let lease = 300_000;
        assert_eq!(claim(&queue, now, lease, 10).await.unwrap().len(), 1);
        assert!(claim(&queue, now + 1, lease, 10).await.unwrap().is_empty());
        // Killed mid-request: the lease is still in the file when the next relay opens it.
        drop(queue);
        let queue = SqliteQueue::open_for_serving(&path).await.unwrap();
        let later = crate::clock::Clock::now_ms(&crate::clock::SystemClock);
        assert!(later < now + lease, "the old lease would still run");
        let claimed = claim(&queue, later, lease, 10).await.unwrap();
        assert_eq!(claimed.iter().map(|e| e.id).collect::<Vec<_>>(), [id]);
    }

    #[tokio::test]
    async fn scrub_gives_up_with_an_error_while_a_reader_holds_the_wal_then_succeeds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("queue.sqlite3");
        let queue = SqliteQueue::open(&path).unwrap();
        let body = r#"{"user_id":"held-8a1f"}"#;
        let mut held = webhook(body, "held-8a1f", json!({}));
        held.shape = None;
        queue.enqueue(held).await.unwrap();
        // A reader (a `dlq` beside the relay, say) in a transaction on the current snapshot.
        let reader = Connection::open(&path).unwrap();
        reader.execute_batch("BEGIN").unwrap();
        let _: i64 = reader
            .query_row("SELECT COUNT(*) FROM webhooks", [], |row| row.get(0))
            .unwrap();
        let page = scan(&queue, "default", "held-8a1f", 0, 10).await.unwrap();
        let ids = page.candidates.iter().map(|c| c.webhook_id).collect();
        erase_webhooks(&queue, ids).await.unwrap();

        let error = scrub(&queue).await.unwrap_err().to_string();
        assert!(error.contains("blocked by a reader"), "{error}");
        assert!(!on_disk(&path).1.is_empty(), "the WAL was not truncated");
        reader.execute_batch("COMMIT").unwrap();
        scrub(&queue).await.unwrap();
        let (database, wal) = on_disk(&path);
        assert!(wal.is_empty() && !holds(&database, "held-8a1f"));
    }
}
