//! Erasures on the postgres queue (contract §12): the scan for a person's webhooks, their
//! erasure, the `erasures` table (schema v5), and scrubbing deleted content from the tables.
//!
//! **Scan.** One statement per page, a plain read (ingest never waits for it): a page of the
//! source's webhooks by id, each with whether a record names the identity as its subject and
//! whether the identity's bytes occur in the body (`position`); only candidates carry their
//! body back.
//!
//! **Erase.** One transaction per chunk: the records of the webhooks are locked in id order
//! (the order in which acks, retries and dead-lettering lock them, so that a forwarder
//! updating records of the same webhooks waits instead of deadlocking), deleted and counted by
//! state, then the bodies are emptied; id, source, digest and received_at stay for
//! deduplication. A replay that read a body before the erasure committed may still requeue
//! what it read: as with a batch already on the wire, the Heap deletion covers it.
//!
//! **Scrub.** A plain `VACUUM webhooks, records, shapes, erasures` on a pool connection,
//! outside any transaction (VACUUM refuses to run in one): its lock (SHARE UPDATE EXCLUSIVE)
//! lets inserts, updates and claims go on. The names are unqualified, so they resolve through
//! the connection's `search_path`, as every other statement of the queue does. It removes
//! every dead row version, so no tuple holds the erased content any more; the bytes may stay
//! in the pages' free space until overwritten, and in WAL and backups until their retention
//! ends (`VACUUM FULL` or pg_repack rewrite the tables, under locks the relay does not take
//! by itself). A role that does not own the tables would have VACUUM skip them with a mere
//! warning, so the scrub checks first and fails instead. VACUUM is not bound by the pool's
//! `statement_timeout` ([`SCRUB_TIMEOUT_MS`] instead): it reads every index of a table with
//! dead rows, which on a large queue takes longer than any one ordinary statement.
//!
//! **Erasures table.** Claims lease with `FOR UPDATE SKIP LOCKED` like records', with
//! `claimed_by` = this replica's `application_name`; an expired lease is due again.

use super::{PostgresQueue, storage};
use crate::queue::prepared::storable;
use crate::queue::{
    ErasureFilter, ErasureRow, ErasureScan, ErasureState, ErasureUpdate, NewErasure, QueueError,
    RecordState, Removed, ScanCandidate,
};

/// The tables an erasure writes, which the scrub vacuums.
const SCRUBBED: [&str; 4] = ["webhooks", "records", "shapes", "erasures"];

/// What the scrub runs (see the module docs).
const SCRUB: &str = "VACUUM webhooks, records, shapes, erasures";

/// Server-side bound on the scrub's VACUUM, instead of the pool's `statement_timeout`.
const SCRUB_TIMEOUT_MS: u64 = 600_000;

/// Which of [`SCRUBBED`] (`$1`) this session may not vacuum: a table it neither owns (nor is
/// a member of its owner), in a database it does not own, without the MAINTAIN privilege
/// (Postgres 17). VACUUM skips those with only a warning.
const NOT_VACUUMABLE: &str = "SELECT t.name FROM unnest($1::text[]) AS t(name)
    LEFT JOIN pg_class c ON c.oid = to_regclass(t.name)
    WHERE c.oid IS NULL OR NOT (
        pg_has_role(c.relowner, 'USAGE')
        OR pg_has_role((SELECT datdba FROM pg_database WHERE datname = current_database()),
                       'USAGE')
        OR (current_setting('server_version_num')::int >= 170000
            AND has_table_privilege(c.oid, 'MAINTAIN')))";

/// One page of the scan: the webhooks of source `$1` above id `$4`, at most `$5`, each with
/// whether a record's subject is `$2` and, for candidates only, the body (`$3`: the identity's
/// bytes).
const SCAN: &str = "SELECT p.id, m.by_subject,
        CASE WHEN m.by_subject OR position($3::bytea in p.body) > 0 THEN p.body END
    FROM (SELECT id, body FROM webhooks WHERE source = $1 AND id > $4 ORDER BY id LIMIT $5) p
    CROSS JOIN LATERAL (SELECT EXISTS (
        SELECT 1 FROM records r WHERE r.webhook_id = p.id AND r.subject = $2) AS by_subject) m
    ORDER BY p.id";

/// Deletes every record of webhooks `$1`, locked in id order first; one row per state with how
/// many.
const DELETE_RECORDS: &str = "WITH gone AS (
    DELETE FROM records WHERE id IN
        (SELECT id FROM records WHERE webhook_id = ANY($1) ORDER BY id FOR UPDATE)
    RETURNING state
)
SELECT state, COUNT(*) FROM gone GROUP BY state";

/// The columns [`row_from`] reads, in its order.
const COLUMNS: &str = "id, source, heap_app_id, identity, identity_sha256, state, removed,
    requested_at, updated_at, deletion_request_id, attempts, last_error, reason, next_attempt_at";

/// The erasures whose Heap part is still to be done: `local_done` with an app id and an
/// identity (`$a` = `local_done`), or `heap_pending` (`$b`). `{a}` and `{b}` are the
/// parameters' numbers.
const CLAIMABLE: &str = "((state = ${a} AND heap_app_id IS NOT NULL AND identity IS NOT NULL)
    OR state = ${b})";

fn claimable(a: usize, b: usize) -> String {
    CLAIMABLE
        .replace("{a}", &a.to_string())
        .replace("{b}", &b.to_string())
}

fn count(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

fn limit(value: usize) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

pub(super) async fn scan(
    queue: &PostgresQueue,
    source: &str,
    identity: &str,
    after_id: i64,
    scan: usize,
) -> Result<ErasureScan, QueueError> {
    if scan == 0 {
        return Ok(ErasureScan::default());
    }
    // Subjects are stored as `storable` spells them; the body holds the bytes as received.
    let subject = storable(identity.to_owned());
    let rows = queue
        .query(
            SCAN,
            &[
                &source,
                &subject,
                &identity.as_bytes(),
                &after_id,
                &limit(scan),
            ],
        )
        .await?;
    let mut page = ErasureScan::default();
    for row in rows {
        let webhook_id: i64 = row.try_get(0).map_err(storage)?;
        page.last_id = Some(webhook_id);
        if let Some(body) = row.try_get::<_, Option<Vec<u8>>>(2).map_err(storage)? {
            page.candidates.push(ScanCandidate {
                webhook_id,
                by_subject: row.try_get(1).map_err(storage)?,
                body: body.into(),
            });
        }
    }
    Ok(page)
}

pub(super) async fn erase_webhooks(
    queue: &PostgresQueue,
    ids: Vec<i64>,
) -> Result<Removed, QueueError> {
    let mut removed = Removed::default();
    if ids.is_empty() {
        return Ok(removed);
    }
    let mut client = queue.client().await?;
    let tx = client.transaction().await.map_err(storage)?;
    for row in tx.query(DELETE_RECORDS, &[&ids]).await.map_err(storage)? {
        let state: i32 = row.try_get(0).map_err(storage)?;
        let deleted = count(row.try_get(1).map_err(storage)?);
        match RecordState::from_stored(i64::from(state)) {
            Some(RecordState::Pending) => removed.pending_records += deleted,
            Some(RecordState::Delivered) => removed.delivered_records += deleted,
            Some(RecordState::Dead) => removed.dead_letters += deleted,
            // Never written; deleted all the same.
            None => {}
        }
    }
    removed.webhooks = tx
        .execute(
            // An already empty body (erased before) is not counted again.
            "UPDATE webhooks SET body = ''::bytea WHERE id = ANY($1) AND length(body) > 0",
            &[&ids],
        )
        .await
        .map_err(storage)?;
    tx.commit().await.map_err(storage)?;
    Ok(removed)
}

pub(super) async fn erase_samples(
    queue: &PostgresQueue,
    source: &str,
    identity: &str,
) -> Result<u64, QueueError> {
    if identity.is_empty() {
        return Ok(0);
    }
    queue
        .execute(
            "UPDATE shapes SET sample = NULL WHERE source = $1 AND position($2 in sample) > 0",
            &[&source, &storable(identity.to_owned())],
        )
        .await
}

pub(super) async fn scrub(queue: &PostgresQueue) -> Result<(), QueueError> {
    let client = queue.client().await?;
    let refused: Vec<String> = client
        .query(NOT_VACUUMABLE, &[&SCRUBBED.as_slice()])
        .await
        .map_err(storage)?
        .iter()
        .map(|row| row.try_get(0))
        .collect::<Result<_, _>>()
        .map_err(storage)?;
    if !refused.is_empty() {
        return Err(QueueError::Storage(format!(
            "postgres: cannot scrub erased content: the relay's role may not vacuum {} \
             (it must own the tables, or have MAINTAIN on them)",
            refused.join(", ")
        )));
    }
    client
        .batch_execute(&format!("SET statement_timeout = {SCRUB_TIMEOUT_MS}"))
        .await
        .map_err(storage)?;
    let vacuumed = client.batch_execute(SCRUB).await.map_err(storage);
    // Back to the session's own bound (the connection's startup options) before the
    // connection serves anything else; one that cannot be reset leaves the pool.
    if client
        .batch_execute("RESET statement_timeout")
        .await
        .is_err()
    {
        drop(deadpool_postgres::Object::take(client));
    }
    vacuumed
}

pub(super) async fn record(queue: &PostgresQueue, erasure: NewErasure) -> Result<i64, QueueError> {
    let removed = serde_json::to_string(&erasure.removed)
        .map_err(|e| QueueError::Storage(format!("erasure counts: {e}")))?;
    let rows = queue
        .query(
            "INSERT INTO erasures (source, heap_app_id, identity, identity_sha256, state,
                                   removed, requested_at, updated_at, next_attempt_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $7, $7)
             RETURNING id",
            &[
                &erasure.source,
                &erasure.heap_app_id,
                &erasure.identity,
                &erasure.identity_sha256,
                &ErasureState::LocalDone.as_str(),
                &removed,
                &erasure.requested_at_ms,
            ],
        )
        .await?;
    match rows.first() {
        Some(row) => row.try_get(0).map_err(storage),
        None => Err(QueueError::Storage("postgres: erasure not recorded".into())),
    }
}

pub(super) async fn list(
    queue: &PostgresQueue,
    filter: ErasureFilter,
) -> Result<Vec<ErasureRow>, QueueError> {
    let state = filter.state.map(ErasureState::as_str);
    let rows = queue
        .query(
            &format!(
                "SELECT {COLUMNS} FROM erasures
                 WHERE ($1::text IS NULL OR source = $1) AND ($2::text IS NULL OR state = $2)
                   AND ($3::bigint IS NULL OR id > $3)
                 ORDER BY id LIMIT $4"
            ),
            &[
                &filter.source,
                &state,
                &filter.after_id,
                &limit(filter.limit),
            ],
        )
        .await?;
    rows.iter().map(row_from).collect()
}

pub(super) async fn claim(
    queue: &PostgresQueue,
    now_ms: i64,
    lease_ms: i64,
    max: usize,
) -> Result<Vec<ErasureRow>, QueueError> {
    if max == 0 {
        return Ok(Vec::new());
    }
    let sql = format!(
        "WITH picked AS (
             SELECT id FROM erasures WHERE {} AND next_attempt_at <= $3
             ORDER BY id LIMIT $4
             FOR UPDATE SKIP LOCKED
         )
         UPDATE erasures e SET claimed = 1, claimed_by = $5, next_attempt_at = $6
         FROM picked WHERE e.id = picked.id
         RETURNING {}",
        claimable(1, 2),
        COLUMNS
            .split(',')
            .map(|column| format!("e.{}", column.trim()))
            .collect::<Vec<_>>()
            .join(", "),
    );
    let rows = queue
        .query(
            &sql,
            &[
                &ErasureState::LocalDone.as_str(),
                &ErasureState::HeapPending.as_str(),
                &now_ms,
                &limit(max),
                &queue.replica,
                &now_ms.saturating_add(lease_ms),
            ],
        )
        .await?;
    // RETURNING keeps no order.
    let mut claimed = rows.iter().map(row_from).collect::<Result<Vec<_>, _>>()?;
    claimed.sort_by_key(|row| row.id);
    Ok(claimed)
}

pub(super) async fn update(
    queue: &PostgresQueue,
    id: i64,
    update: ErasureUpdate,
    now_ms: i64,
) -> Result<(), QueueError> {
    // Every change ends the lease and stamps the time (`$1` id, `$2` now).
    const END: &str = "updated_at = $2, claimed = 0, claimed_by = NULL";
    let heap_pending = ErasureState::HeapPending.as_str();
    let heap_failed = ErasureState::HeapFailed.as_str();
    let done = ErasureState::Done.as_str();
    match update {
        ErasureUpdate::Requested {
            deletion_request_id,
            check_at_ms,
        } => {
            queue
                .execute(
                    &format!(
                        "UPDATE erasures SET state = $3, deletion_request_id = $4,
                         identity = NULL, next_attempt_at = $5, last_error = NULL, {END}
                         WHERE id = $1"
                    ),
                    &[
                        &id,
                        &now_ms,
                        &heap_pending,
                        &storable(deletion_request_id),
                        &check_at_ms,
                    ],
                )
                .await
        }
        ErasureUpdate::Retry { error, at_ms } => {
            queue
                .execute(
                    &format!(
                        "UPDATE erasures SET attempts = attempts + 1, last_error = $3,
                         next_attempt_at = $4, {END}
                         WHERE id = $1"
                    ),
                    &[&id, &now_ms, &storable(error), &at_ms],
                )
                .await
        }
        ErasureUpdate::CheckLater { at_ms } => {
            queue
                .execute(
                    &format!("UPDATE erasures SET next_attempt_at = $3, {END} WHERE id = $1"),
                    &[&id, &now_ms, &at_ms],
                )
                .await
        }
        ErasureUpdate::Failed { reason } => {
            queue
                .execute(
                    &format!(
                        "UPDATE erasures SET state = $3, reason = $4, identity = NULL, {END}
                         WHERE id = $1"
                    ),
                    &[&id, &now_ms, &heap_failed, &storable(reason)],
                )
                .await
        }
        ErasureUpdate::Done => {
            queue
                .execute(
                    &format!(
                        "UPDATE erasures SET state = $3, identity = NULL, {END} WHERE id = $1"
                    ),
                    &[&id, &now_ms, &done],
                )
                .await
        }
    }
    .map(drop)
}

pub(super) async fn next_due_ms(queue: &PostgresQueue) -> Result<Option<i64>, QueueError> {
    let rows = queue
        .query(
            &format!(
                "SELECT MIN(next_attempt_at) FROM erasures WHERE {}",
                claimable(1, 2)
            ),
            &[
                &ErasureState::LocalDone.as_str(),
                &ErasureState::HeapPending.as_str(),
            ],
        )
        .await?;
    match rows.first() {
        Some(row) => row.try_get(0).map_err(storage),
        None => Ok(None),
    }
}

pub(super) async fn still_pending(
    queue: &PostgresQueue,
    ids: Vec<i64>,
) -> Result<Vec<i64>, QueueError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let rows = queue
        .query(
            sql!("SELECT id FROM records WHERE id = ANY($1) AND state = {pending} ORDER BY id"),
            &[&ids],
        )
        .await?;
    rows.iter()
        .map(|row| row.try_get(0))
        .collect::<Result<_, _>>()
        .map_err(storage)
}

/// An erasure from the [`COLUMNS`] of a row.
fn row_from(row: &tokio_postgres::Row) -> Result<ErasureRow, QueueError> {
    let state: String = row.try_get(5).map_err(storage)?;
    let state = ErasureState::parse(&state)
        .ok_or_else(|| QueueError::Storage(format!("postgres: unknown erasure state `{state}`")))?;
    let removed: String = row.try_get(6).map_err(storage)?;
    let removed = serde_json::from_str(&removed)
        .map_err(|e| QueueError::Storage(format!("postgres: erasure counts: {e}")))?;
    let attempts: i32 = row.try_get(10).map_err(storage)?;
    Ok(ErasureRow {
        id: row.try_get(0).map_err(storage)?,
        source: row.try_get(1).map_err(storage)?,
        heap_app_id: row.try_get(2).map_err(storage)?,
        identity: row.try_get(3).map_err(storage)?,
        identity_sha256: row.try_get(4).map_err(storage)?,
        state,
        removed,
        requested_at_ms: row.try_get(7).map_err(storage)?,
        updated_at_ms: row.try_get(8).map_err(storage)?,
        deletion_request_id: row.try_get(9).map_err(storage)?,
        attempts: u32::try_from(attempts).unwrap_or(0),
        last_error: row.try_get(11).map_err(storage)?,
        reason: row.try_get(12).map_err(storage)?,
        next_attempt_at_ms: row.try_get(13).map_err(storage)?,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::time::Duration;

    use bytes::Bytes;
    use sha2::{Digest, Sha256};

    use super::*;
    use crate::heap::wire::{HeapRecord, Outbound, RecordKind, TrackEvent, UserProperties};
    use crate::queue::{Content, DEFAULT_SOURCE, Enqueued, NewWebhook, Queue};
    use crate::shapes::ShapeObservation;

    const T0: i64 = 1_700_000_000_000;
    const LEASE: i64 = 60_000;
    const ALICE: &str = "alice@example.com";

    /// A schema of its own on the server in `RELAY_TEST_POSTGRES_URL`, reached through
    /// `search_path` as the relay's tests reach theirs, and a session to look at it.
    struct Schema {
        admin: tokio_postgres::Client,
        name: String,
        url: String,
    }

    impl Schema {
        async fn fresh() -> Schema {
            let base = std::env::var("RELAY_TEST_POSTGRES_URL").unwrap();
            let (admin, connection) = tokio_postgres::connect(&base, tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(connection);
            let name = format!("relay_erase_{}", uuid::Uuid::new_v4().simple());
            admin
                .batch_execute(&format!("CREATE SCHEMA {name}"))
                .await
                .unwrap();
            let separator = if base.contains('?') { '&' } else { '?' };
            let url = format!("{base}{separator}options=-csearch_path%3D{name}");
            Schema { admin, name, url }
        }

        async fn count(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> i64 {
            let sql = sql.replace("{schema}", &self.name);
            self.admin.query_one(&sql, params).await.unwrap().get(0)
        }

        async fn drop(self) {
            self.admin
                .batch_execute(&format!("DROP SCHEMA {} CASCADE", self.name))
                .await
                .unwrap();
        }
    }

    use tokio_postgres::types::ToSql;

    fn track(key: &str, identity: &str) -> Outbound {
        Outbound {
            key: key.to_owned(),
            record: HeapRecord::Track(TrackEvent {
                identity: identity.to_owned(),
                event: "Userpilot Test".to_owned(),
                timestamp: "2023-11-14T22:13:20Z".to_owned(),
                idempotency_key: key.to_owned(),
                properties: serde_json::Map::new(),
            }),
        }
    }

    fn user(identity: &str) -> Outbound {
        Outbound {
            key: format!("user:{identity}"),
            record: HeapRecord::User(UserProperties {
                identity: identity.to_owned(),
                properties: serde_json::Map::new(),
            }),
        }
    }

    fn webhook(lane: &str, body: &str, content: Content) -> NewWebhook {
        NewWebhook {
            source: DEFAULT_SOURCE.to_owned(),
            app_id: lane.to_owned(),
            digest: Sha256::digest(body.as_bytes()).into(),
            body: Bytes::from(body.to_owned()),
            received_at_ms: T0,
            content,
            shape: None,
        }
    }

    /// `webhook` with a shape whose sample is the body itself.
    fn shaped(webhook: NewWebhook, path: &str) -> NewWebhook {
        let sample = String::from_utf8(webhook.body.to_vec()).unwrap();
        NewWebhook {
            shape: Some(ShapeObservation {
                key: Sha256::digest(path.as_bytes()).into(),
                kind: Some("form".into()),
                action: None,
                paths: vec![format!("{path}:string")],
                sample: Some(sample),
            }),
            ..webhook
        }
    }

    async fn store(queue: &PostgresQueue, webhook: NewWebhook) -> i64 {
        let body = webhook.body.clone();
        assert!(matches!(
            queue.enqueue(webhook).await.unwrap(),
            Enqueued::Accepted { .. } | Enqueued::Quarantined
        ));
        let rows = queue
            .query("SELECT id FROM webhooks WHERE body = $1", &[&body.as_ref()])
            .await
            .unwrap();
        rows[0].get(0)
    }

    fn new_erasure(source: &str, heap: bool, at: i64) -> NewErasure {
        NewErasure {
            source: source.to_owned(),
            heap_app_id: heap.then(|| "app-1".to_owned()),
            identity: heap.then(|| ALICE.to_owned()),
            identity_sha256: hex::encode(Sha256::digest(ALICE.as_bytes())),
            removed: Removed {
                webhooks: 1,
                ..Removed::default()
            },
            requested_at_ms: at,
        }
    }

    /// Rows of any table of the schema whose text (bytea columns in hex) holds the identity.
    async fn rows_holding(schema: &Schema, identity: &str) -> Vec<(String, i64)> {
        let tables = schema
            .admin
            .query(
                "SELECT table_name::text FROM information_schema.tables
                 WHERE table_schema = $1 ORDER BY 1",
                &[&schema.name],
            )
            .await
            .unwrap();
        let hex = hex::encode(identity.as_bytes());
        let mut found = Vec::new();
        for table in tables {
            let table: String = table.get(0);
            let rows = schema
                .count(
                    &format!(
                        "SELECT COUNT(*) FROM {{schema}}.{table} t
                         WHERE position($1 in t::text) > 0 OR position($2 in t::text) > 0"
                    ),
                    &[&identity, &hex],
                )
                .await;
            found.push((table, rows));
        }
        found
    }

    #[cfg_attr(not(postgres_tests), ignore = "needs RELAY_TEST_POSTGRES_URL")]
    #[tokio::test]
    async fn once_erased_and_scrubbed_no_live_row_of_any_table_holds_the_identity() {
        let schema = Schema::fresh().await;
        let queue = PostgresQueue::connect(&schema.url).await.unwrap();
        let lane = format!("lane-{}", schema.name);
        // The person's: by subject and body, by body only, by subject only (the body spells
        // the identity otherwise), and a quarantined webhook of theirs; and someone else's.
        let both = store(
            &queue,
            shaped(
                webhook(
                    &lane,
                    r#"{"user":{"id":"alice@example.com"},"event":"a"}"#,
                    Content::Records(vec![track("k1", ALICE), user(ALICE)]),
                ),
                "user.id",
            ),
        )
        .await;
        let body_only = store(
            &queue,
            webhook(
                &lane,
                r#"{"user":{"id":"bob"},"invited_by":"alice@example.com"}"#,
                Content::Records(vec![track("k2", "bob")]),
            ),
        )
        .await;
        let subject_only = store(
            &queue,
            webhook(
                &lane,
                r#"{"user":{"id":"ALICE@EXAMPLE.COM"}}"#,
                Content::Records(vec![track("k3", ALICE)]),
            ),
        )
        .await;
        let quarantined = store(
            &queue,
            webhook(
                &lane,
                r#"{"oops":"alice@example.com"}"#,
                Content::Quarantined {
                    reason: "unmapped".into(),
                    detail: "no event".into(),
                    subject: ALICE.into(),
                },
            ),
        )
        .await;
        let carol = store(
            &queue,
            shaped(
                webhook(
                    &lane,
                    r#"{"user":{"id":"carol"}}"#,
                    Content::Records(vec![track("k4", "carol")]),
                ),
                "user.uid",
            ),
        )
        .await;
        // Alice's first event delivered, the others pending.
        let claimed = queue
            .claim(&lane, RecordKind::Track, 100, T0, LEASE)
            .await
            .unwrap();
        assert_eq!(claimed.len(), 4);
        let delivered: Vec<i64> = claimed
            .iter()
            .filter(|c| c.json.contains("\"k1\""))
            .map(|c| c.id)
            .collect();
        queue.ack(delivered.clone(), T0).await.unwrap();
        let pending: Vec<i64> = claimed.iter().map(|c| c.id).collect();
        assert_eq!(queue.still_pending(pending.clone()).await.unwrap().len(), 3);

        // The scan, in pages of two.
        let mut candidates = Vec::new();
        let mut after = 0;
        while let Some(last) = {
            let page = queue
                .erasure_scan(DEFAULT_SOURCE, ALICE, after, 2)
                .await
                .unwrap();
            candidates.extend(page.candidates);
            page.last_id
        } {
            after = last;
        }
        let found: Vec<(i64, bool)> = candidates
            .iter()
            .map(|c| (c.webhook_id, c.by_subject))
            .collect();
        assert_eq!(
            found,
            vec![
                (both, true),
                (body_only, false),
                (subject_only, true),
                (quarantined, true)
            ]
        );
        assert_eq!(after, carol);
        assert_eq!(
            candidates[1].body.as_ref(),
            br#"{"user":{"id":"bob"},"invited_by":"alice@example.com"}"#
        );

        // The search finds the person wherever they are stored before the erasure.
        let before = rows_holding(&schema, ALICE).await;
        for table in ["webhooks", "records", "shapes"] {
            assert!(
                before.iter().any(|(t, rows)| t == table && *rows > 0),
                "{before:?}"
            );
        }

        let ids: Vec<i64> = candidates.iter().map(|c| c.webhook_id).collect();
        let removed = queue.erase_webhooks(ids).await.unwrap();
        assert_eq!(
            removed,
            Removed {
                webhooks: 4,
                pending_records: 3,
                delivered_records: 1,
                dead_letters: 1,
                shape_samples: 0,
            }
        );
        assert_eq!(queue.erase_samples(DEFAULT_SOURCE, ALICE).await.unwrap(), 1);
        // Only Carol's event is still to be sent.
        assert_eq!(queue.still_pending(pending).await.unwrap().len(), 1);

        // The Heap part keeps the identity until Heap has been asked.
        let erasure = queue
            .record_erasure(new_erasure(DEFAULT_SOURCE, true, T0))
            .await
            .unwrap();
        assert_eq!(
            rows_holding(&schema, ALICE)
                .await
                .iter()
                .map(|(_, n)| n)
                .sum::<i64>(),
            1
        );
        let claimed = queue.claim_erasures(T0, LEASE, 10).await.unwrap();
        assert_eq!(claimed[0].identity.as_deref(), Some(ALICE));
        let requested = ErasureUpdate::Requested {
            deletion_request_id: "del-1".into(),
            check_at_ms: T0 + 1000,
        };
        queue.update_erasure(erasure, requested, T0).await.unwrap();
        queue.scrub().await.unwrap();

        let holding = rows_holding(&schema, ALICE).await;
        let tables: BTreeSet<&str> = holding.iter().map(|(table, _)| table.as_str()).collect();
        for table in ["webhooks", "records", "shapes", "erasures"] {
            assert!(tables.contains(table), "{holding:?}");
        }
        assert!(holding.iter().all(|(_, rows)| *rows == 0), "{holding:?}");
        // Carol's webhook, record and sample are untouched; Alice's webhooks keep their
        // digests, so a redelivery is a duplicate.
        assert_eq!(
            schema
                .count(
                    "SELECT COUNT(*) FROM {schema}.webhooks w JOIN {schema}.records r
                     ON r.webhook_id = w.id WHERE w.id = $1 AND w.body <> ''::bytea",
                    &[&carol],
                )
                .await,
            1
        );
        assert_eq!(
            schema
                .count(
                    "SELECT COUNT(*) FROM {schema}.shapes WHERE sample IS NOT NULL",
                    &[]
                )
                .await,
            1
        );
        let again = webhook(
            &lane,
            r#"{"user":{"id":"alice@example.com"},"event":"a"}"#,
            Content::Records(vec![track("k1", ALICE)]),
        );
        assert_eq!(queue.enqueue(again).await.unwrap(), Enqueued::Duplicate);
        // The VACUUM ran on this schema's tables, found through the session's search_path.
        let waited = crate::clock::Stopwatch::start();
        loop {
            let vacuumed = schema
                .count(
                    "SELECT COUNT(*) FROM pg_stat_user_tables
                     WHERE schemaname = $1 AND last_vacuum IS NOT NULL
                       AND relname IN ('webhooks', 'records', 'shapes', 'erasures')",
                    &[&schema.name],
                )
                .await;
            if vacuumed == 4 {
                break;
            }
            assert!(
                waited.elapsed() < Duration::from_secs(5),
                "{vacuumed} of 4 tables vacuumed"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        drop(queue);
        schema.drop().await;
    }

    #[cfg_attr(not(postgres_tests), ignore = "needs RELAY_TEST_POSTGRES_URL")]
    #[tokio::test]
    async fn two_replicas_claiming_at_once_never_share_an_erasure() {
        let schema = Schema::fresh().await;
        let one = PostgresQueue::connect(&schema.url).await.unwrap();
        let two = PostgresQueue::connect(&schema.url).await.unwrap();
        for at in 0..40 {
            one.record_erasure(new_erasure(DEFAULT_SOURCE, true, T0 + at))
                .await
                .unwrap();
        }
        let local_only = one
            .record_erasure(new_erasure(DEFAULT_SOURCE, false, T0))
            .await
            .unwrap();
        let (a, b) = tokio::join!(
            one.claim_erasures(T0 + 100, LEASE, 25),
            two.claim_erasures(T0 + 100, LEASE, 25)
        );
        let (a, b) = (a.unwrap(), b.unwrap());
        let ids = |rows: &[ErasureRow]| rows.iter().map(|row| row.id).collect::<BTreeSet<_>>();
        assert!(ids(&a).is_disjoint(&ids(&b)));
        assert_eq!(a.len() + b.len(), 40);
        assert!(!ids(&a).contains(&local_only) && !ids(&b).contains(&local_only));
        // Each lease names its replica, as records' do.
        let mine = schema
            .count(
                "SELECT COUNT(*) FROM {schema}.erasures WHERE claimed = 1 AND claimed_by = $1",
                &[&one.replica_id()],
            )
            .await;
        assert_eq!(mine, a.len() as i64);
        // Leased: nothing is due until the leases end, then everything is again.
        assert!(
            one.claim_erasures(T0 + 100, LEASE, 100)
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            one.next_erasure_due_ms().await.unwrap(),
            Some(T0 + 100 + LEASE)
        );
        let again = two
            .claim_erasures(T0 + 100 + LEASE, LEASE, 100)
            .await
            .unwrap();
        assert_eq!(again.len(), 40);
        drop((one, two));
        schema.drop().await;
    }

    #[cfg_attr(not(postgres_tests), ignore = "needs RELAY_TEST_POSTGRES_URL")]
    #[tokio::test]
    async fn an_erasure_moves_through_its_states_and_is_due_only_while_heap_is_to_be_asked() {
        let schema = Schema::fresh().await;
        let queue = PostgresQueue::connect(&schema.url).await.unwrap();
        let first = queue
            .record_erasure(new_erasure(DEFAULT_SOURCE, true, T0))
            .await
            .unwrap();
        let second = queue
            .record_erasure(new_erasure("other", true, T0 + 1))
            .await
            .unwrap();
        let local = queue
            .record_erasure(new_erasure(DEFAULT_SOURCE, false, T0 + 2))
            .await
            .unwrap();
        assert_eq!(queue.next_erasure_due_ms().await.unwrap(), Some(T0));
        let claimed = queue.claim_erasures(T0 + 5, LEASE, 1).await.unwrap();
        assert_eq!(
            claimed.iter().map(|r| r.id).collect::<Vec<_>>(),
            vec![first]
        );

        let retry = ErasureUpdate::Retry {
            error: "heap 503".into(),
            at_ms: T0 + 500,
        };
        queue.update_erasure(first, retry, T0 + 10).await.unwrap();
        let requested = ErasureUpdate::Requested {
            deletion_request_id: "del-1".into(),
            check_at_ms: T0 + 2000,
        };
        queue
            .update_erasure(first, requested, T0 + 20)
            .await
            .unwrap();
        let failed = ErasureUpdate::Failed {
            reason: "401: unauthorized".into(),
        };
        queue.update_erasure(second, failed, T0 + 30).await.unwrap();
        assert_eq!(queue.next_erasure_due_ms().await.unwrap(), Some(T0 + 2000));
        let later = ErasureUpdate::CheckLater { at_ms: T0 + 3000 };
        queue.update_erasure(first, later, T0 + 40).await.unwrap();

        let all = queue
            .erasures(ErasureFilter {
                limit: 10,
                ..ErasureFilter::default()
            })
            .await
            .unwrap();
        assert_eq!(all.len(), 3);
        let row = &all[0];
        assert_eq!(
            (
                row.state,
                row.identity.as_deref(),
                row.deletion_request_id.as_deref()
            ),
            (ErasureState::HeapPending, None, Some("del-1"))
        );
        assert_eq!(
            (
                row.attempts,
                row.last_error.as_deref(),
                row.next_attempt_at_ms
            ),
            (1, None, T0 + 3000)
        );
        assert_eq!((row.requested_at_ms, row.updated_at_ms), (T0, T0 + 40));
        assert_eq!(row.removed.webhooks, 1);
        assert_eq!(
            (
                all[1].state,
                all[1].identity.as_deref(),
                all[1].reason.as_deref()
            ),
            (ErasureState::HeapFailed, None, Some("401: unauthorized"))
        );
        assert_eq!((all[2].id, all[2].state), (local, ErasureState::LocalDone));

        queue
            .update_erasure(first, ErasureUpdate::Done, T0 + 50)
            .await
            .unwrap();
        assert_eq!(queue.next_erasure_due_ms().await.unwrap(), None);
        assert!(
            queue
                .claim_erasures(FAR, LEASE, 10)
                .await
                .unwrap()
                .is_empty()
        );
        // Filters and paging.
        let listed = |filter: ErasureFilter| {
            let queue = &queue;
            async move {
                let rows = queue.erasures(filter).await.unwrap();
                rows.iter().map(|row| row.id).collect::<Vec<_>>()
            }
        };
        let filter = ErasureFilter {
            limit: 10,
            ..ErasureFilter::default()
        };
        assert_eq!(
            listed(ErasureFilter {
                state: Some(ErasureState::Done),
                ..filter.clone()
            })
            .await,
            vec![first]
        );
        assert_eq!(
            listed(ErasureFilter {
                source: Some(DEFAULT_SOURCE.into()),
                ..filter.clone()
            })
            .await,
            vec![first, local]
        );
        assert_eq!(
            listed(ErasureFilter {
                after_id: Some(first),
                limit: 1,
                ..filter
            })
            .await,
            vec![second]
        );
        drop(queue);
        schema.drop().await;
    }

    const FAR: i64 = T0 + 1_000_000_000;
}
