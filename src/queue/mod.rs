//! The durable queue between the webhook handler and the forwarder, behind one trait with an
//! embedded backend ([`sqlite`], one relay) and a shared one ([`postgres`], several replicas).
//!
//! Model: a *webhook* row keeps the verified Userpilot body (for deduplication and for replay,
//! which re-maps from it). Each webhook owns *records*: one per Heap track event / user / account
//! update, or one quarantine record when it could not be mapped. A record is `pending`,
//! `delivered` or `dead`. Claiming a pending record leases it by moving its `next_attempt_at`
//! to the lease's end, so a crashed worker's records come back by themselves; ack, retry and
//! dead-letter end the lease. All times are unix milliseconds and come in as arguments.
//!
//! Sources and lanes (schema v3): a webhook belongs to the *source* it was posted to, and
//! deduplication is per source (the same body on two sources is two webhooks). Each record
//! belongs to a *lane*, the Heap app id it is forwarded to (`records.app_id`): claims, due
//! times and the rate budget's `delivered_since` are per lane, so one app id's backlog never
//! stands in another's way. Records stored before v3 have the lane `''` until the serving
//! relay adopts them ([`Queue::adopt_unassigned`]).
//!
//! Shapes (schema v4, contract §10.4): a webhook may carry the shape of its payload
//! ([`crate::shapes`]); it is upserted into `shapes` (count + 1, last seen, latest sample) in
//! the same transaction as the webhook, never in a round trip of its own, and only when the
//! webhook is new (a duplicate delivery is not counted again).

/// The SQL text `template` (a constant) with `{pending}`, `{delivered}` and `{dead}` spelled as
/// the [`RecordState`]s' stored integers, made once per call site and kept as a `&'static str`
/// (statements are prepared from it, and cached). Literals, not bound parameters: SQLite uses
/// a partial index (`WHERE state = 0`) only for a query that names the same literal.
macro_rules! sql {
    ($template:expr) => {{
        const TEMPLATE: &str = $template;
        static SQL: std::sync::LazyLock<String> =
            std::sync::LazyLock::new(|| $crate::queue::spell_states(TEMPLATE));
        SQL.as_str()
    }};
}

mod erasure;
pub mod postgres;
mod prepared;
pub mod sqlite;

use std::collections::BTreeMap;

use async_trait::async_trait;
use bytes::Bytes;
use serde::Serialize;

use crate::heap::wire::{Outbound, RecordKind};
use crate::shapes::{ShapeObservation, StoredShape};

/// The `kind` of a quarantine record: a webhook that could not be mapped to Heap records.
pub const QUARANTINE_KIND: &str = "webhook";

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("queue storage failed: {0}")]
    Storage(String),
    #[error("queue is closed")]
    Closed,
    /// Another relay serves this SQLite file (`sqlite::lock`): the whole message, naming the
    /// file and, when known, that relay's PID.
    #[error("{0}")]
    InUse(String),
}

/// Where a record is in its life, stored as an integer in `records.state` by both backends.
/// The integers are a durable format (files and databases hold them): never renumber them.
/// SQL text spells them through [`spell_states`] (the `sql!` macro), never by hand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum RecordState {
    /// Waiting to be sent, due at `next_attempt_at` (or leased until then while `claimed`).
    Pending = 0,
    /// Acknowledged by Heap at `updated_at`.
    Delivered = 1,
    /// A dead letter since `updated_at`: refused, expired, or quarantined at ingest.
    Dead = 2,
}

impl RecordState {
    /// The integer stored in `records.state`.
    pub const fn stored(self) -> i32 {
        self as i32
    }

    /// The state a stored integer stands for; `None` for one this code never writes.
    pub fn from_stored(stored: i64) -> Option<Self> {
        [Self::Pending, Self::Delivered, Self::Dead]
            .into_iter()
            .find(|state| i64::from(state.stored()) == stored)
    }
}

/// `template` with `{pending}`, `{delivered}` and `{dead}` replaced by the stored integers.
pub(crate) fn spell_states(template: &str) -> String {
    [
        ("{pending}", RecordState::Pending),
        ("{delivered}", RecordState::Delivered),
        ("{dead}", RecordState::Dead),
    ]
    .into_iter()
    .fold(template.to_owned(), |sql, (name, state)| {
        sql.replace(name, &state.stored().to_string())
    })
}

/// The source of webhooks stored before sources existed (schema v2, whose migration spells it
/// as a literal), and of the top-level configuration keys.
pub use crate::config::DEFAULT_SOURCE;
pub use erasure::{
    ErasureFilter, ErasureRow, ErasureScan, ErasureState, ErasureUpdate, NewErasure, Removed,
    ScanCandidate,
};

/// A verified webhook and what the mapper made of it.
#[derive(Debug, Clone)]
pub struct NewWebhook {
    /// The source it was posted to: deduplication is per source.
    pub source: String,
    /// The lane its records go to: the source's Heap app id.
    pub app_id: String,
    /// SHA-256 of the body: a redelivery of the same body is a duplicate.
    pub digest: [u8; 32],
    pub body: Bytes,
    pub received_at_ms: i64,
    pub content: Content,
    /// The payload's shape, stored in the webhook's commit; `None`: not recorded (the
    /// source's shapes are full, or the caller records none).
    pub shape: Option<ShapeObservation>,
}

#[derive(Debug, Clone)]
pub enum Content {
    Records(Vec<Outbound>),
    /// Kept as a dead letter with this reason (and detail for humans).
    Quarantined {
        reason: String,
        detail: String,
        subject: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueued {
    Accepted { events: usize },
    Duplicate,
    Quarantined,
}

/// A leased record, ready to send.
#[derive(Debug, Clone, PartialEq)]
pub struct Claimed {
    pub id: i64,
    pub kind: RecordKind,
    /// Identity (or account id): the per-identity rate limit's key.
    pub subject: String,
    /// The element of Heap's bulk array, as JSON.
    pub json: String,
    /// Failed attempts so far.
    pub attempts: u32,
    pub received_at_ms: i64,
    /// The SHA-256 of the webhook the record came from and when that webhook was received:
    /// what the link from a Heap request's span to the webhook's span derives from
    /// ([`crate::traces`]). The webhook's time, not the record's: a replayed record's
    /// `received_at_ms` restarts its age at the replay.
    pub webhook_digest: [u8; 32],
    pub webhook_received_at_ms: i64,
}

/// A dead letter as the admin API shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeadLetter {
    pub id: i64,
    pub webhook_id: i64,
    /// The source its webhook was posted to.
    pub source: String,
    /// The lane it was to be forwarded in (`''`: stored before schema v3, never adopted).
    pub app_id: String,
    /// `track`, `add_user_properties`, `add_account_properties`, or `webhook` (quarantined).
    pub kind: String,
    pub reason: String,
    pub detail: String,
    pub subject: String,
    pub attempts: u32,
    pub received_at_ms: i64,
    pub dead_at_ms: i64,
}

/// One dead letter with what it was made of (`dlq show`, `GET /admin/dead-letters/{id}`).
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetterDetail {
    pub letter: DeadLetter,
    /// The record as stored: the element of Heap's bulk array it would have been sent as; empty
    /// for a quarantined webhook, which has none.
    pub json: String,
    /// The error of the last failed attempt that was retried, if any (the one that killed the
    /// record is its `detail`).
    pub last_error: Option<String>,
    /// The verified Userpilot body of its webhook, as received.
    pub body: Bytes,
}

/// How many dead letters a filter selects, and of how many webhooks (a dry run, a replay's
/// progress).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DeadLetterCount {
    pub dead_letters: u64,
    pub webhooks: u64,
}

/// Which dead letters an admin operation applies to. Empty fields match everything.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeadLetterFilter {
    pub ids: Vec<i64>,
    /// Only dead letters of webhooks posted to this source.
    pub source: Option<String>,
    pub reason: Option<String>,
    pub subject: Option<String>,
    /// Dead since (inclusive) / until (exclusive), unix ms.
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
    /// Paging: only ids above this one.
    pub after_id: Option<i64>,
    pub limit: Option<usize>,
    /// Paging a replay: only records of webhooks with ids above this one.
    pub after_webhook_id: Option<i64>,
}

/// A value bound into a dead-letter filter condition.
#[derive(Debug, Clone, PartialEq)]
pub enum FilterValue {
    Text(String),
    Integer(i64),
}

impl DeadLetterFilter {
    /// The filter's scalar conditions on records aliased `r`, each SQL with one `?` for its
    /// value, shared by the backends. `ids` and `limit` are left to each backend, which spell
    /// lists and limits differently.
    pub fn conditions(&self) -> Vec<(&'static str, FilterValue)> {
        let mut conditions = Vec::new();
        if let Some(source) = &self.source {
            // A primary-key lookup per dead letter: the source lives on the webhook.
            conditions.push((
                "(SELECT w.source FROM webhooks w WHERE w.id = r.webhook_id) = ?",
                FilterValue::Text(source.clone()),
            ));
        }
        if let Some(reason) = &self.reason {
            conditions.push(("r.dead_reason = ?", FilterValue::Text(reason.clone())));
        }
        if let Some(subject) = &self.subject {
            conditions.push(("r.subject = ?", FilterValue::Text(subject.clone())));
        }
        if let Some(since) = self.since_ms {
            conditions.push(("r.updated_at >= ?", FilterValue::Integer(since)));
        }
        if let Some(until) = self.until_ms {
            conditions.push(("r.updated_at < ?", FilterValue::Integer(until)));
        }
        if let Some(after) = self.after_id {
            conditions.push(("r.id > ?", FilterValue::Integer(after)));
        }
        if let Some(after) = self.after_webhook_id {
            conditions.push(("r.webhook_id > ?", FilterValue::Integer(after)));
        }
        conditions
    }
}

/// A quarantined or dead-lettered webhook taken out for replay: the caller re-maps `body`
/// and hands the result to [`Queue::requeue`].
#[derive(Debug, Clone)]
pub struct ReplayItem {
    pub webhook_id: i64,
    /// The source its webhook was posted to (whose mapping and app id a replay uses now).
    pub source: String,
    pub digest: [u8; 32],
    pub body: Bytes,
    pub received_at_ms: i64,
    /// The dead records of this webhook that the filter selected.
    pub dead_ids: Vec<i64>,
}

/// Queue records by state. The counts are of *records* — one per track event, per user or
/// account property update, per quarantined webhook — not of webhooks, and not of the track
/// events a webhook's 202 answer counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct QueueStats {
    /// Waiting to be sent (including scheduled retries).
    pub pending: u64,
    /// Leased by a worker right now.
    pub in_flight: u64,
    pub delivered: u64,
    pub dead: u64,
    /// When the oldest record not yet delivered (pending or in flight) was received, unix ms:
    /// a point in time, not an age.
    pub oldest_pending_received_at_ms: Option<i64>,
}

impl QueueStats {
    /// Counts `count` records of one `(state, claimed)` group, the oldest received at
    /// `oldest`: how both backends fold their `GROUP BY state, claimed` rows.
    pub(crate) fn add(&mut self, state: i64, claimed: i64, count: u64, oldest: Option<i64>) {
        let state = RecordState::from_stored(state);
        match (state, claimed) {
            (Some(RecordState::Pending), 1) => self.in_flight += count,
            (Some(RecordState::Pending), _) => self.pending += count,
            (Some(RecordState::Delivered), _) => self.delivered += count,
            (Some(RecordState::Dead), _) => self.dead += count,
            _ => {}
        }
        if state == Some(RecordState::Pending) {
            self.oldest_pending_received_at_ms = match (self.oldest_pending_received_at_ms, oldest)
            {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
    }

    /// The counts of several lanes together.
    pub fn sum<'a>(lanes: impl IntoIterator<Item = &'a QueueStats>) -> QueueStats {
        lanes
            .into_iter()
            .fold(QueueStats::default(), |mut all, lane| {
                all.pending += lane.pending;
                all.in_flight += lane.in_flight;
                all.delivered += lane.delivered;
                all.dead += lane.dead;
                all.oldest_pending_received_at_ms = match (
                    all.oldest_pending_received_at_ms,
                    lane.oldest_pending_received_at_ms,
                ) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                all
            })
    }

    /// How long the oldest record not yet delivered has waited at `now_ms`, in seconds.
    pub fn oldest_pending_age_seconds(&self, now_ms: i64) -> Option<f64> {
        self.oldest_pending_received_at_ms
            .map(|received| (now_ms - received).max(0) as f64 / 1000.0)
    }
}

#[async_trait]
pub trait Queue: Send + Sync + 'static {
    /// Stores a webhook and its records in one committed transaction. Returns only after the
    /// commit: the caller may then acknowledge the webhook.
    async fn enqueue(&self, webhook: NewWebhook) -> Result<Enqueued, QueueError>;

    /// Leases up to `max` pending records of lane `app_id` and `kind` that are due at
    /// `now_ms`, oldest first, until `now_ms + lease_ms`.
    async fn claim(
        &self,
        app_id: &str,
        kind: RecordKind,
        max: usize,
        now_ms: i64,
        lease_ms: i64,
    ) -> Result<Vec<Claimed>, QueueError>;

    /// Extends the lease of records still in flight (a slow Heap call).
    async fn renew(&self, ids: Vec<i64>, until_ms: i64) -> Result<(), QueueError>;

    /// Marks records delivered.
    async fn ack(&self, ids: Vec<i64>, now_ms: i64) -> Result<(), QueueError>;

    /// Returns records to the queue, due again at `at_ms`. `failed` counts an attempt (a Heap
    /// failure); without it the records were only held back (rate limit, shutdown).
    async fn retry_at(
        &self,
        ids: Vec<i64>,
        at_ms: i64,
        failed: bool,
        error: String,
    ) -> Result<(), QueueError>;

    /// Moves records to the dead letters. `failed` counts the attempt that killed them (Heap
    /// refused the record), as [`Queue::retry_at`] counts one; without it they died unsent
    /// (too old to send), and their count stays that of the attempts before.
    async fn dead_letter(
        &self,
        ids: Vec<i64>,
        reason: String,
        detail: String,
        failed: bool,
        now_ms: i64,
    ) -> Result<(), QueueError>;

    /// How many records of lane `app_id` and `kind` were acknowledged at or after `since_ms`:
    /// what Heap already received in its current rate window, so a restarted forwarder
    /// starts within the budget.
    async fn delivered_since(
        &self,
        app_id: &str,
        kind: RecordKind,
        since_ms: i64,
    ) -> Result<u64, QueueError>;

    /// When the earliest pending record of lane `app_id` and `kind` is due (or its lease
    /// ends), if any: how long the forwarder may sleep.
    async fn next_due_ms(&self, app_id: &str, kind: RecordKind) -> Result<Option<i64>, QueueError>;

    /// Queue stats of all lanes together.
    async fn stats(&self, now_ms: i64) -> Result<QueueStats, QueueError>;

    /// Queue stats per app id (lanes with any record), for /admin/status and
    /// relay_queue_depth{app_id}.
    async fn lane_stats(&self, now_ms: i64) -> Result<BTreeMap<String, QueueStats>, QueueError>;

    /// Gives records stored before schema v3 (app_id '') to `app_id`; returns how many.
    async fn adopt_unassigned(&self, app_id: &str) -> Result<u64, QueueError>;

    /// A real write round trip: does the queue accept writes right now?
    async fn ping(&self) -> Result<(), QueueError>;

    async fn dead_letters(&self, filter: DeadLetterFilter) -> Result<Vec<DeadLetter>, QueueError>;

    /// One dead letter by id with its record, last error and webhook body; `None` when no dead
    /// letter has that id.
    async fn dead_letter_detail(&self, id: i64) -> Result<Option<DeadLetterDetail>, QueueError>;

    /// How many dead letters `filter` selects (its `limit` included), and of how many webhooks.
    async fn count_dead_letters(
        &self,
        filter: DeadLetterFilter,
    ) -> Result<DeadLetterCount, QueueError>;

    /// A page of the webhooks behind the selected dead letters, for replay: the first
    /// `webhooks` of them by id, each with all its selected dead records, so that a webhook is
    /// never split between pages. `filter.limit` is not applied here (the caller counts
    /// records across pages); page on with `filter.after_webhook_id`, the last item's webhook.
    async fn replay_items(
        &self,
        filter: DeadLetterFilter,
        webhooks: usize,
    ) -> Result<Vec<ReplayItem>, QueueError>;

    /// Replaces a webhook's selected dead records with freshly mapped content, in lane
    /// `app_id` (the source's app id now). Records whose key already exists (delivered or
    /// still pending) are left as they are.
    async fn requeue(
        &self,
        item: ReplayItem,
        content: Content,
        app_id: &str,
        now_ms: i64,
    ) -> Result<usize, QueueError>;

    /// The stored shapes, of `source` only when given, newest (last seen) first.
    async fn shapes(&self, source: Option<String>) -> Result<Vec<StoredShape>, QueueError>;

    /// Every stored shape's (source, key): what the request path's index starts from.
    async fn shape_keys(&self) -> Result<Vec<(String, [u8; 32])>, QueueError>;

    /// Deletes the selected dead letters; returns how many.
    async fn purge(&self, filter: DeadLetterFilter) -> Result<u64, QueueError>;

    /// Forgets delivered records acknowledged before `delivered_before_ms`, dead letters that
    /// died before `dead_before_ms`, and webhooks with nothing left that arrived before
    /// `delivered_before_ms` (after which a redelivery is no longer recognised).
    async fn prune(&self, delivered_before_ms: i64, dead_before_ms: i64)
    -> Result<u64, QueueError>;

    // Erasures (contract §12), driven by `crate::erase`.

    /// One page of an erasure's scan: looks at up to `scan` webhooks of `source` with ids
    /// above `after_id`, in id order, and returns those that may hold `identity` (a record
    /// with it as subject, or its bytes in the body). Reads only: ingest never waits for it.
    async fn erasure_scan(
        &self,
        source: &str,
        identity: &str,
        after_id: i64,
        scan: usize,
    ) -> Result<ErasureScan, QueueError>;

    /// Erases webhooks in one transaction: every record of theirs (pending, delivered, dead)
    /// deleted, their body emptied; id, source, digest and received_at stay, so a redelivery
    /// is still a duplicate. Returns what was removed (`shape_samples` 0).
    async fn erase_webhooks(&self, ids: Vec<i64>) -> Result<Removed, QueueError>;

    /// Clears the sample of each of `source`'s shapes whose text holds `identity`; returns
    /// how many.
    async fn erase_samples(&self, source: &str, identity: &str) -> Result<u64, QueueError>;

    /// Makes deleted content unreadable in the backend's files, and returns once it is: the
    /// SQLite queue zeroes content as it deletes it (`secure_delete`), then checkpoints and
    /// truncates its WAL; the Postgres queue vacuums the tables erasures touch.
    async fn scrub(&self) -> Result<(), QueueError>;

    /// Records an erasure whose local part is committed, `local_done`; returns its id. Its
    /// Heap part, if any, is due at once.
    async fn record_erasure(&self, erasure: NewErasure) -> Result<i64, QueueError>;

    /// The erasures `filter` selects, by id ascending.
    async fn erasures(&self, filter: ErasureFilter) -> Result<Vec<ErasureRow>, QueueError>;

    /// Leases up to `max` erasures whose Heap part is due at `now_ms` — `local_done` with a
    /// Heap app id and an identity (to request), or `heap_pending` (to check) — until
    /// `now_ms + lease_ms`, oldest first: among replicas, one handles each.
    async fn claim_erasures(
        &self,
        now_ms: i64,
        lease_ms: i64,
        max: usize,
    ) -> Result<Vec<ErasureRow>, QueueError>;

    /// Applies `update` to erasure `id` (updated at `now_ms`) and ends its lease.
    async fn update_erasure(
        &self,
        id: i64,
        update: ErasureUpdate,
        now_ms: i64,
    ) -> Result<(), QueueError>;

    /// When the earliest Heap part of an erasure is due (or its lease ends), if any.
    async fn next_erasure_due_ms(&self) -> Result<Option<i64>, QueueError>;

    /// Which of `ids` are still pending records: an erasure may have removed some of a
    /// forwarder's claimed records before they were sent.
    async fn still_pending(&self, ids: Vec<i64>) -> Result<Vec<i64>, QueueError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_states_keep_their_stored_integers() {
        // A durable format: files and databases written by earlier versions hold these.
        let stored = [
            (RecordState::Pending, 0),
            (RecordState::Delivered, 1),
            (RecordState::Dead, 2),
        ];
        for (state, integer) in stored {
            assert_eq!(state.stored(), integer, "{state:?}");
            assert_eq!(RecordState::from_stored(i64::from(integer)), Some(state));
        }
        assert_eq!(RecordState::from_stored(3), None);
        assert_eq!(
            spell_states("state IN ({pending}, {delivered}) OR state = {dead}"),
            "state IN (0, 1) OR state = 2"
        );
        assert_eq!(sql!("WHERE state = {pending}"), "WHERE state = 0");
    }
}
