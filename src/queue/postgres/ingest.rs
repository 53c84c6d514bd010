//! Ingest: the group-commit tasks that turn concurrent [`Queue::enqueue`] calls into one
//! statement per group, and the savepoint-per-webhook fallback when the server refuses a group
//! (see [`super`] for the guarantees). A caller hears back only after its group committed.
//!
//! [`Queue::enqueue`]: crate::queue::Queue::enqueue

use std::collections::HashMap;
use std::sync::Arc;

use deadpool_postgres::Pool;
use tokio::sync::{Mutex, mpsc};

use super::{MAX_GROUP, QueueError, Reply, storage, unavailable};
use crate::heap::wire::RecordKind;
use crate::queue::prepared::{Prepared, Rows};
use crate::queue::{Enqueued, QUARANTINE_KIND, RecordState};

pub(super) type Waiting = (Prepared, Reply<Enqueued>);

/// What deduplication compares: the same body on two sources is two webhooks.
fn dedup_key(webhook: &Prepared) -> (&str, &[u8; 32]) {
    (&webhook.source, &webhook.digest)
}

/// One group-commit task (of [`COMMITTERS`]): takes the webhooks waiting, commits them
/// together, answers each.
pub(super) async fn group_commit(pool: Pool, waiting: Arc<Mutex<mpsc::Receiver<Waiting>>>) {
    while let Some(mut group) = next_group(&waiting).await {
        // (Source, digest) order, in which every transaction takes the dedup index's locks:
        // see the module docs. The sort is stable: of equal keys, the first to arrive stays
        // first.
        group.sort_by(|(a, _), (b, _)| dedup_key(a).cmp(&dedup_key(b)));
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

/// The group in one statement: its new webhooks (in (source, digest) order), then every record
/// of each. Answers one row per webhook inserted: its source and digest and how many of its
/// track events were new. A (source, digest) without a row was there already. As a single statement outside a transaction block
/// it commits by itself, before the server answers `ReadyForQuery`, which is what the driver
/// waits for: a commit failure comes back as this statement's error, and nothing of the group
/// is acknowledged unless a commit succeeds.
const INSERT_GROUP: &str = "
WITH w AS (
    INSERT INTO webhooks (source, digest, body, received_at)
    SELECT u.source, u.digest, u.body, u.received_at
    FROM UNNEST($13::text[], $1::bytea[], $2::bytea[], $3::bigint[])
         WITH ORDINALITY AS u(source, digest, body, received_at, n)
    ORDER BY u.n
    ON CONFLICT (source, digest) DO NOTHING
    RETURNING id, source, digest, received_at
), r AS (
    INSERT INTO records (webhook_id, key, kind, subject, json, state, received_at,
                         next_attempt_at, updated_at, dead_reason, dead_detail, app_id)
    SELECT w.id, u.key, u.kind, u.subject, u.json, u.state, w.received_at, w.received_at,
           w.received_at, u.dead_reason, u.dead_detail, u.app_id
    FROM UNNEST($14::text[], $4::bytea[], $5::text[], $6::text[], $7::text[], $8::text[],
                $9::integer[], $10::text[], $11::text[], $15::text[])
             WITH ORDINALITY AS u(source, digest, key, kind, subject, json, state, dead_reason,
                                  dead_detail, app_id, n)
         JOIN w ON w.source = u.source AND w.digest = u.digest
    ORDER BY u.n
    ON CONFLICT (webhook_id, key) DO NOTHING
    RETURNING webhook_id, kind
), s AS (
    INSERT INTO shapes AS t (key, source, kind, action, paths, count, first_seen, last_seen,
                             sample)
    SELECT u.shape_key, (array_agg(u.source))[1], (array_agg(u.kind))[1],
           (array_agg(u.action))[1], (array_agg(u.paths))[1], COUNT(*), MIN(w.received_at),
           MAX(w.received_at), (array_agg(u.sample ORDER BY w.received_at DESC, u.n DESC))[1]
    FROM UNNEST($13::text[], $1::bytea[], $16::bytea[], $17::text[], $18::text[],
                $19::text[], $20::text[])
             WITH ORDINALITY AS u(source, digest, shape_key, kind, action, paths, sample, n)
         JOIN w ON w.source = u.source AND w.digest = u.digest
    WHERE u.shape_key IS NOT NULL
    GROUP BY u.shape_key
    ORDER BY u.shape_key
    ON CONFLICT (key) DO UPDATE SET count = t.count + EXCLUDED.count,
        first_seen = LEAST(t.first_seen, EXCLUDED.first_seen),
        last_seen = GREATEST(t.last_seen, EXCLUDED.last_seen), sample = EXCLUDED.sample
)
SELECT w.source, w.digest, COUNT(r.kind) FILTER (WHERE r.kind = $12)
FROM w LEFT JOIN r ON r.webhook_id = w.id
GROUP BY w.source, w.digest";

/// Shapes (`s`): the group's new webhooks that carry one, one row per shape key — a statement
/// may not upsert a row twice, so sightings in one group are summed, the latest sample kept —
/// taken in key order, so two groups lock shared shape rows in the same order.
///
/// Inserts a group sorted by (source, digest) with [`INSERT_GROUP`] (its webhooks in that
/// order: `ORDER BY u.n`); the outcome of each webhook, in order. Of equal (source, digest)
/// only the first goes in; the others are duplicates, as they would be one after the other.
async fn insert_group(
    client: &deadpool_postgres::Object,
    group: &[&Prepared],
) -> Result<Vec<Enqueued>, tokio_postgres::Error> {
    let mut sources: Vec<&str> = Vec::with_capacity(group.len());
    let mut digests: Vec<&[u8]> = Vec::with_capacity(group.len());
    let mut bodies: Vec<&[u8]> = Vec::with_capacity(group.len());
    let mut received: Vec<i64> = Vec::with_capacity(group.len());
    // One entry per record of every webhook, named by the webhook's source and digest.
    let mut owner_sources: Vec<&str> = Vec::new();
    let mut owners: Vec<&[u8]> = Vec::new();
    let mut lanes: Vec<&str> = Vec::new();
    let mut keys: Vec<&str> = Vec::new();
    let mut kinds: Vec<&str> = Vec::new();
    let mut subjects: Vec<&str> = Vec::new();
    let mut jsons: Vec<&str> = Vec::new();
    let mut states: Vec<i32> = Vec::new();
    let mut reasons: Vec<Option<&str>> = Vec::new();
    let mut details: Vec<Option<&str>> = Vec::new();
    // One entry per webhook, as `sources`: its shape's columns, NULL without one.
    let mut shape_keys: Vec<Option<&[u8]>> = Vec::with_capacity(group.len());
    let mut shape_kinds: Vec<Option<&str>> = Vec::with_capacity(group.len());
    let mut shape_actions: Vec<Option<&str>> = Vec::with_capacity(group.len());
    let mut shape_paths: Vec<Option<&str>> = Vec::with_capacity(group.len());
    let mut shape_samples: Vec<Option<&str>> = Vec::with_capacity(group.len());
    for webhook in first_of_each_key(group) {
        let shape = webhook.shape.as_ref();
        shape_keys.push(shape.map(|shape| &shape.key[..]));
        shape_kinds.push(shape.and_then(|shape| shape.kind.as_deref()));
        shape_actions.push(shape.and_then(|shape| shape.action.as_deref()));
        shape_paths.push(shape.map(|shape| shape.paths.as_str()));
        shape_samples.push(shape.and_then(|shape| shape.sample.as_deref()));
        sources.push(&webhook.source);
        digests.push(&webhook.digest);
        bodies.push(&webhook.body);
        received.push(webhook.received_at_ms);
        match &webhook.rows {
            Rows::Records(rows) => {
                for row in rows {
                    owner_sources.push(&webhook.source);
                    owners.push(&webhook.digest);
                    lanes.push(&webhook.app_id);
                    keys.push(&row.key);
                    kinds.push(row.kind.as_str());
                    subjects.push(&row.subject);
                    jsons.push(&row.json);
                    states.push(RecordState::Pending.stored());
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
                owner_sources.push(&webhook.source);
                owners.push(&webhook.digest);
                lanes.push(&webhook.app_id);
                keys.push(key);
                kinds.push(QUARANTINE_KIND);
                subjects.push(subject);
                jsons.push("");
                states.push(RecordState::Dead.stored());
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
                &sources,
                &owner_sources,
                &lanes,
                &shape_keys,
                &shape_kinds,
                &shape_actions,
                &shape_paths,
                &shape_samples,
            ],
        )
        .await?;
    let mut inserted: HashMap<(&str, &[u8]), usize> = HashMap::with_capacity(rows.len());
    for row in &rows {
        let events: i64 = row.try_get(2)?;
        inserted.insert(
            (row.try_get(0)?, row.try_get(1)?),
            usize::try_from(events).unwrap_or(0),
        );
    }

    let mut previous: Option<(&str, &[u8; 32])> = None;
    let mut outcomes = Vec::with_capacity(group.len());
    for webhook in group {
        let first = previous != Some(dedup_key(webhook));
        previous = Some(dedup_key(webhook));
        outcomes.push(
            match inserted.get(&(webhook.source.as_str(), &webhook.digest[..])) {
                Some(&events) if first => webhook.rows.outcome(events),
                _ => Enqueued::Duplicate,
            },
        );
    }
    Ok(outcomes)
}

/// The first webhook of each run of equal (source, digest) in a group sorted by them.
fn first_of_each_key<'a>(group: &'a [&'a Prepared]) -> impl Iterator<Item = &'a Prepared> {
    group.iter().enumerate().filter_map(|(at, webhook)| {
        let repeated = at > 0 && dedup_key(group[at - 1]) == dedup_key(webhook);
        (!repeated).then_some(*webhook)
    })
}

/// The fallback: the group in one transaction, each webhook in its own savepoint (in the
/// group's (source, digest) order, as [`insert_group`] would), so one failure cannot take its
/// neighbours down. [`MAX_GROUP`] keeps the savepoints within Postgres's 64 cached subtransactions.
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
            "INSERT INTO webhooks (source, digest, body, received_at) VALUES ($4, $1, $2, $3)
             ON CONFLICT (source, digest) DO NOTHING RETURNING id",
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
                &webhook.source,
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
        &webhook.app_id,
        webhook.received_at_ms,
        &webhook.rows,
        webhook.received_at_ms,
    )
    .await?;
    if let Some(shape) = &webhook.shape {
        let statement = tx
            .prepare_cached(
                "INSERT INTO shapes AS t (key, source, kind, action, paths, count, first_seen,
                 last_seen, sample) VALUES ($1, $2, $3, $4, $5, 1, $6, $6, $7)
                 ON CONFLICT (key) DO UPDATE SET count = t.count + 1,
                     first_seen = LEAST(t.first_seen, EXCLUDED.first_seen),
                     last_seen = GREATEST(t.last_seen, EXCLUDED.last_seen),
                     sample = EXCLUDED.sample",
            )
            .await
            .map_err(storage)?;
        tx.execute(
            &statement,
            &[
                &&shape.key[..],
                &webhook.source,
                &shape.kind,
                &shape.action,
                &shape.paths,
                &webhook.received_at_ms,
                &shape.sample,
            ],
        )
        .await
        .map_err(storage)?;
    }
    Ok(webhook.rows.outcome(events))
}

/// Inserts a webhook's records into lane `app_id` in one statement; returns how many track
/// events were new.
pub(super) async fn insert_rows(
    tx: &deadpool_postgres::Transaction<'_>,
    webhook_id: i64,
    app_id: &str,
    received_at_ms: i64,
    rows: &Rows,
    now_ms: i64,
) -> Result<usize, QueueError> {
    match rows {
        Rows::Records(rows) if rows.is_empty() => Ok(0),
        Rows::Records(rows) => {
            let statement = tx
                .prepare_cached(sql!(
                    "INSERT INTO records (webhook_id, key, kind, subject, json, state,
                     received_at, next_attempt_at, updated_at, app_id)
                     SELECT $1, u.key, u.kind, u.subject, u.json, {pending}, $6, $7, $7, $8
                     FROM UNNEST($2::text[], $3::text[], $4::text[], $5::text[])
                     WITH ORDINALITY AS u(key, kind, subject, json, n)
                     ORDER BY u.n
                     ON CONFLICT (webhook_id, key) DO NOTHING
                     RETURNING kind"
                ))
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
                        &app_id,
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
                .prepare_cached(sql!(
                    "INSERT INTO records (webhook_id, key, kind, subject, json, state,
                     received_at, next_attempt_at, updated_at,
                     dead_reason, dead_detail, app_id)
                     VALUES ($1, $2, $3, $4, '', {dead}, $5, $6, $6, $7, $8, $9)
                     ON CONFLICT (webhook_id, key) DO NOTHING"
                ))
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
                    &app_id,
                ],
            )
            .await
            .map_err(storage)?;
            Ok(0)
        }
    }
}
