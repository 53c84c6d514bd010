//! Dead-letter operations shared by the admin API and the `dlq` command: list, replay, purge,
//! and the rule that decides what they apply to ([`FilterParams::listing`],
//! [`FilterParams::selection`]): a replay or purge without a scope is refused, never taken to
//! mean "every dead letter".
//!
//! Replay re-maps each webhook from its original Userpilot body with the *current*
//! configuration of its source, so fixing `heap.identity` or `[mapping]` and replaying repairs
//! quarantined webhooks; it also runs the source's *current* transform ([`prepare`]), so a
//! `transform_error`, `no_kind` or `no_user_id` letter becomes events once the program is
//! fixed, and one the program now filters out leaves no dead letter. The fresh records join
//! the lane of the source's current app id.
//! Records that were delivered meanwhile keep their keys and are not sent twice. A webhook
//! whose source is no longer configured is left in the dead letters, and counted.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::ingest::{PrepareError, Prepared, prepare};
use crate::queue::{
    Content, DeadLetter, DeadLetterDetail, DeadLetterFilter, Queue, QueueError, ReplayItem,
};
use crate::sources::Sources;
use crate::userpilot::Verified;

/// Why a record is a dead letter: the `reason` stored with it, listed in one place. Every
/// producer spells its reason from here (the mapper through [`Unmappable::reason`], [`crate::translate`],
/// the forwarder), filters accept only these, and docs/operations.md §5 says what to do for
/// each. The codes are a durable format (stored in queues, used in metric labels and
/// operators' scripts): never rename one.
///
/// [`Unmappable::reason`]: crate::heap::mapping::Unmappable::reason
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Quarantined on arrival: no user id anywhere in the payload.
    NoUserId,
    /// Quarantined on arrival: the user lacks the property `heap.identity` names.
    NoIdentity,
    /// Quarantined on arrival: the identity is longer than Heap accepts.
    IdentityTooLong,
    /// Quarantined on arrival: the payload names no event kind.
    NoKind,
    /// Quarantined on arrival: the source's transform failed on the payload (a runtime
    /// error, an output that is not an object, a run over 100 ms, a worker that died).
    TransformError,
    /// Heap refused the record alone with a permanent error.
    Rejected,
    /// Not delivered within `retry.max_event_age_secs`.
    Expired,
}

impl Reason {
    /// Every reason, in the order docs/operations.md lists them.
    pub const ALL: [Reason; 7] = [
        Reason::NoUserId,
        Reason::NoIdentity,
        Reason::IdentityTooLong,
        Reason::NoKind,
        Reason::TransformError,
        Reason::Rejected,
        Reason::Expired,
    ];

    /// The stored code.
    pub const fn as_str(self) -> &'static str {
        match self {
            Reason::NoUserId => "no_user_id",
            Reason::NoIdentity => "no_identity",
            Reason::IdentityTooLong => "identity_too_long",
            Reason::NoKind => "no_kind",
            Reason::TransformError => "transform_error",
            Reason::Rejected => "rejected",
            Reason::Expired => "expired",
        }
    }

    /// The reason a stored code stands for.
    pub fn from_code(code: &str) -> Option<Reason> {
        Reason::ALL
            .into_iter()
            .find(|reason| reason.as_str() == code)
    }

    /// The codes, comma-separated, for messages.
    pub fn known() -> String {
        Reason::ALL.map(Reason::as_str).join(", ")
    }
}

/// The most dead letters one listing returns.
pub const MAX_PAGE: usize = 1000;
pub const DEFAULT_PAGE: usize = 100;
/// Webhooks a replay re-maps per page (see [`replay_with_progress`]).
pub const REPLAY_PAGE: usize = 500;

/// A filter as operators write it (query string or CLI flags).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterParams {
    /// One dead letter by id.
    pub id: Option<i64>,
    pub reason: Option<String>,
    /// The source the webhook came to (contract §9).
    pub source: Option<String>,
    /// The Heap identity (or account id).
    pub identity: Option<String>,
    /// Dead since / until: unix milliseconds or RFC 3339.
    pub since: Option<String>,
    pub until: Option<String>,
    /// Paging: ids above this one.
    pub after: Option<i64>,
    pub limit: Option<usize>,
    /// Replay or purge: every dead letter the other fields select, even with none of them set.
    #[serde(default)]
    pub all: bool,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    #[error("`{0}` must be unix milliseconds or an RFC 3339 time")]
    BadTime(&'static str),
    #[error("`limit` must be 1 or more (a listing returns at most {MAX_PAGE})")]
    BadLimit,
    #[error("unknown reason `{0}`: the reasons are {known}", known = Reason::known())]
    UnknownReason(String),
    #[error(
        "no dead letters selected: give one `id`, a filter (`reason`, `source`, `identity`, \
         `since`, `until`, `after`, `limit`), or `all` to take every dead letter"
    )]
    NoScope,
}

fn parse_time(field: &'static str, value: &Option<String>) -> Result<Option<i64>, FilterError> {
    let Some(value) = value else {
        return Ok(None);
    };
    if let Ok(ms) = value.trim().parse::<i64>() {
        return Ok(Some(ms));
    }
    DateTime::parse_from_rfc3339(value.trim())
        .map(|t| Some(t.timestamp_millis()))
        .map_err(|_| FilterError::BadTime(field))
}

impl FilterParams {
    /// The filter of a listing: a page of at most [`MAX_PAGE`], [`DEFAULT_PAGE`] by default.
    pub fn listing(&self) -> Result<DeadLetterFilter, FilterError> {
        let mut filter = self.to_filter()?;
        filter.limit = Some(filter.limit.unwrap_or(DEFAULT_PAGE).min(MAX_PAGE));
        Ok(filter)
    }

    /// The filter of a replay or purge. Without an `id`, a filter or `all`, nothing is selected:
    /// an empty query string (a script's missing variable) must not delete every dead letter.
    pub fn selection(&self) -> Result<DeadLetterFilter, FilterError> {
        if !self.all && !self.has_filter() {
            return Err(FilterError::NoScope);
        }
        self.to_filter()
    }

    fn has_filter(&self) -> bool {
        self.id.is_some()
            || self.reason.is_some()
            || self.source.is_some()
            || self.identity.is_some()
            || self.since.is_some()
            || self.until.is_some()
            || self.after.is_some()
            || self.limit.is_some()
    }

    fn to_filter(&self) -> Result<DeadLetterFilter, FilterError> {
        if self.limit == Some(0) {
            return Err(FilterError::BadLimit);
        }
        // Today an unknown reason would silently match nothing (a typo, or a reason renamed in
        // an old runbook): say which exist instead.
        if let Some(reason) = &self.reason
            && Reason::from_code(reason).is_none()
        {
            return Err(FilterError::UnknownReason(reason.clone()));
        }
        Ok(DeadLetterFilter {
            ids: self.id.into_iter().collect(),
            reason: self.reason.clone(),
            source: self.source.clone(),
            subject: self.identity.clone(),
            since_ms: parse_time("since", &self.since)?,
            until_ms: parse_time("until", &self.until)?,
            after_id: self.after,
            limit: self.limit,
            after_webhook_id: None,
        })
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ReplaySummary {
    /// Webhooks re-mapped.
    pub webhooks: usize,
    /// Track events queued again.
    pub events: usize,
    /// Webhooks that still cannot be mapped (quarantined again, with the current reason).
    pub quarantined: usize,
    /// Webhooks the current transform has no output for: their dead letters are removed and
    /// nothing is queued, as for a fresh delivery (counted in `webhooks` too).
    #[serde(skip_serializing_if = "is_zero")]
    pub filtered: usize,
    /// Webhooks left in the dead letters because no transform worker was free (or could
    /// start): replay them again later.
    #[serde(skip_serializing_if = "is_zero")]
    pub busy: usize,
    /// Webhooks of a source no longer configured: left in the dead letters as they were.
    #[serde(skip_serializing_if = "is_zero")]
    pub unknown_source: usize,
}

fn is_zero(count: &usize) -> bool {
    *count == 0
}

/// Re-maps and requeues the webhooks behind the selected dead letters.
pub async fn replay(
    queue: &dyn Queue,
    sources: &Sources,
    filter: DeadLetterFilter,
    now: DateTime<Utc>,
) -> Result<ReplaySummary, QueueError> {
    replay_with_progress(queue, sources, filter, now, &mut |_| {}).await
}

/// [`replay`], calling `progress` with the summary so far after each page of
/// [`REPLAY_PAGE`] webhooks. Pages keep memory bounded whatever the replay's size, and a
/// webhook is never split between pages: its records are requeued together. A page starts
/// after the last page's webhook, so what a replay queues again (a webhook quarantined anew
/// is a dead letter again) is never taken up twice by the same replay.
pub async fn replay_with_progress(
    queue: &dyn Queue,
    sources: &Sources,
    filter: DeadLetterFilter,
    now: DateTime<Utc>,
    progress: &mut (dyn FnMut(&ReplaySummary) + Send),
) -> Result<ReplaySummary, QueueError> {
    let mut summary = ReplaySummary::default();
    // The filter's `limit` counts dead letters across pages, in the pages' order.
    let mut left = filter.limit.unwrap_or(usize::MAX);
    let mut page = DeadLetterFilter {
        limit: None,
        ..filter
    };
    while left > 0 {
        let mut items = queue.replay_items(page.clone(), REPLAY_PAGE).await?;
        let Some(last) = items.last() else {
            break;
        };
        page.after_webhook_id = Some(last.webhook_id);
        let mut taken = Vec::with_capacity(items.len());
        for mut item in items.drain(..) {
            if left == 0 {
                break;
            }
            item.dead_ids.truncate(left);
            left -= item.dead_ids.len();
            taken.push(item);
        }
        replay_page(queue, sources, taken, now, &mut summary).await?;
        progress(&summary);
    }
    tracing::info!(
        webhooks = summary.webhooks,
        events = summary.events,
        quarantined = summary.quarantined,
        filtered = summary.filtered,
        busy = summary.busy,
        unknown_source = summary.unknown_source,
        "dead letters replayed"
    );
    Ok(summary)
}

async fn replay_page(
    queue: &dyn Queue,
    sources: &Sources,
    items: Vec<ReplayItem>,
    now: DateTime<Utc>,
    summary: &mut ReplaySummary,
) -> Result<(), QueueError> {
    for item in items {
        let Some(source) = sources.get(&item.source) else {
            tracing::warn!(
                webhook = item.webhook_id,
                source = %item.source,
                "the webhook's source is no longer configured; left in the dead letters"
            );
            summary.unknown_source += 1;
            continue;
        };
        let received_at = DateTime::from_timestamp_millis(item.received_at_ms).unwrap_or(now);
        let body = Verified::from_queue(item.body.clone());
        // The current transform, on the workers of the configuration replay runs under.
        let prepared = match prepare(source, &body, received_at, sources.transforms()).await {
            Ok(prepared) => prepared,
            Err(PrepareError::InvalidJson) => {
                // Stored bodies were valid JSON objects when they were accepted; one that is
                // not (a corrupted file?) is left as it is for a human to look at.
                tracing::error!(
                    webhook = item.webhook_id,
                    "stored webhook body is not JSON; left in the dead letters"
                );
                continue;
            }
            Err(error @ (PrepareError::Busy(_) | PrepareError::Unavailable(_))) => {
                tracing::warn!(
                    webhook = item.webhook_id,
                    %error,
                    "transform not run; left in the dead letters"
                );
                summary.busy += 1;
                continue;
            }
        };
        let content = match prepared {
            Prepared::Content(content) => content,
            Prepared::Filtered => {
                // Requeueing no records removes the dead ones: the webhook is done with.
                summary.filtered += 1;
                Content::Records(Vec::new())
            }
        };
        if matches!(content, Content::Quarantined { .. }) {
            summary.quarantined += 1;
        }
        summary.webhooks += 1;
        // The events keep the time they happened (mapped above from the original receipt), but
        // `retry.max_event_age_secs` counts from the replay: the operator's replay is a new
        // chance, and an `expired` letter must not expire again before its first attempt.
        let now_ms = now.timestamp_millis();
        let item = ReplayItem {
            received_at_ms: now_ms,
            ..item
        };
        summary.events += queue
            .requeue(item, content, source.app_id.as_str(), now_ms)
            .await?;
    }
    Ok(())
}

/// One dead letter as `dlq show` prints it and `GET /admin/dead-letters/{id}` answers: the
/// listing's fields, the times also in RFC 3339, what Heap would have received (`record`),
/// the error of the last retried attempt, and the original Userpilot body (`webhook`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeadLetterView {
    #[serde(flatten)]
    pub letter: DeadLetter,
    pub received_at: String,
    pub dead_at: String,
    /// The element of Heap's bulk array as stored (a track event, a user or account
    /// properties update); null for a quarantined webhook, which was never mapped.
    pub record: Option<serde_json::Value>,
    /// The last failed attempt that was retried (Heap's status and answer, or the network
    /// error); the attempt that killed the record is `detail`.
    pub last_error: Option<String>,
    /// The verified Userpilot body as received: JSON, or a string for bytes that are not.
    pub webhook: serde_json::Value,
}

/// Unix ms as RFC 3339 in UTC with milliseconds (empty for a time out of range).
pub(crate) fn rfc3339(ms: i64) -> String {
    DateTime::from_timestamp_millis(ms).map_or_else(String::new, |t| {
        t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    })
}

fn json_or_text(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes)
        .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(bytes).into_owned()))
}

impl From<DeadLetterDetail> for DeadLetterView {
    fn from(detail: DeadLetterDetail) -> Self {
        let record = (!detail.json.is_empty()).then(|| json_or_text(detail.json.as_bytes()));
        Self {
            received_at: rfc3339(detail.letter.received_at_ms),
            dead_at: rfc3339(detail.letter.dead_at_ms),
            letter: detail.letter,
            record,
            last_error: detail.last_error.filter(|e| !e.is_empty()),
            webhook: json_or_text(&detail.body),
        }
    }
}

/// One dead letter by id, as [`DeadLetterView`]; `None` when there is none with that id.
pub async fn show(queue: &dyn Queue, id: i64) -> Result<Option<DeadLetterView>, QueueError> {
    Ok(queue
        .dead_letter_detail(id)
        .await?
        .map(DeadLetterView::from))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn replay_runs_the_current_transform_repairing_or_filtering_out_each_letter() {
        use crate::config::Settings;
        use crate::queue::NewWebhook;
        use crate::queue::sqlite::SqliteQueue;
        use sha2::{Digest, Sha256};

        let dir = tempfile::tempdir().unwrap();
        let queue = SqliteQueue::open(&dir.path().join("queue.db")).unwrap();
        let user = r#"{"user_id": "u1"}"#;
        let bodies = [
            format!(r#"{{"wrapped": {{"data": {{"type": "nps", "score": 9, "user": {user}}}}}}}"#),
            r#"{"noise": true}"#.to_owned(),
        ];
        // Both were quarantined under an older, broken program.
        for body in &bodies {
            let webhook = NewWebhook {
                shape: None,
                source: "s".into(),
                app_id: "7".into(),
                digest: Sha256::digest(body.as_bytes()).into(),
                body: bytes::Bytes::from(body.clone()),
                received_at_ms: 1_726_742_461_000,
                content: Content::Quarantined {
                    reason: Reason::TransformError.as_str().into(),
                    detail: "jq error: boom".into(),
                    subject: String::new(),
                },
            };
            queue.enqueue(webhook).await.unwrap();
        }
        let fixed = Settings::from_toml(
            "[sources.s]\nsecrets = [\"secret-s-0000000001\"]\napp_id = \"7\"\n\
             transform = \"select(.noise | not) | .wrapped\"\n",
        )
        .unwrap();
        let sources = Sources::from_settings(&fixed).unwrap();
        let scope = DeadLetterFilter {
            reason: Some("transform_error".into()),
            ..DeadLetterFilter::default()
        };
        let now = DateTime::from_timestamp(1_726_742_500, 0).unwrap();
        let summary = replay(&queue, &sources, scope, now).await.unwrap();
        assert_eq!(
            summary,
            ReplaySummary {
                webhooks: 2,
                events: 1,
                quarantined: 0,
                filtered: 1,
                ..ReplaySummary::default()
            }
        );
        let left = queue
            .count_dead_letters(DeadLetterFilter::default())
            .await
            .unwrap();
        assert_eq!(left.dead_letters, 0, "the filtered letter must not stay");
    }

    #[test]
    fn a_replay_or_purge_without_scope_is_refused() {
        assert_eq!(
            FilterParams::default().selection(),
            Err(FilterError::NoScope)
        );
    }

    #[test]
    fn an_id_a_filter_or_all_is_a_scope() {
        let by_id = FilterParams {
            id: Some(7),
            ..FilterParams::default()
        };
        assert_eq!(by_id.selection().unwrap().ids, vec![7]);
        let by_reason = FilterParams {
            reason: Some("rejected".into()),
            ..FilterParams::default()
        };
        assert_eq!(
            by_reason.selection().unwrap().reason.as_deref(),
            Some("rejected")
        );
        let all = FilterParams {
            all: true,
            ..FilterParams::default()
        };
        assert_eq!(all.selection().unwrap(), DeadLetterFilter::default());
    }

    #[test]
    fn a_listing_is_paged_and_needs_no_scope() {
        assert_eq!(
            FilterParams::default().listing().unwrap().limit,
            Some(DEFAULT_PAGE)
        );
        let huge = FilterParams {
            limit: Some(MAX_PAGE + 5),
            ..FilterParams::default()
        };
        assert_eq!(huge.listing().unwrap().limit, Some(MAX_PAGE));
    }

    #[test]
    fn every_reason_a_producer_writes_is_a_known_reason_with_a_stable_code() {
        use crate::heap::mapping::Unmappable;
        let codes: Vec<&str> = Reason::ALL.map(Reason::as_str).to_vec();
        assert_eq!(
            codes,
            [
                "no_user_id",
                "no_identity",
                "identity_too_long",
                "no_kind",
                "transform_error",
                "rejected",
                "expired"
            ]
        );
        for unmappable in [
            Unmappable::NoUserId,
            Unmappable::NoIdentity("email".into()),
            Unmappable::IdentityTooLong,
        ] {
            assert!(
                Reason::from_code(unmappable.reason()).is_some(),
                "{unmappable:?}"
            );
        }
        for reason in Reason::ALL {
            assert_eq!(Reason::from_code(reason.as_str()), Some(reason));
        }
    }

    #[test]
    fn an_unknown_reason_is_an_error_listing_the_known_ones() {
        let typo = FilterParams {
            reason: Some("no_identiy".into()),
            ..FilterParams::default()
        };
        let error = typo.listing().unwrap_err();
        assert_eq!(error, FilterError::UnknownReason("no_identiy".into()));
        assert_eq!(
            error.to_string(),
            "unknown reason `no_identiy`: the reasons are no_user_id, no_identity, \
             identity_too_long, no_kind, transform_error, rejected, expired"
        );
        assert_eq!(typo.selection(), Err(error));
    }

    #[test]
    fn a_view_parses_the_body_and_record_and_dates_the_times() {
        let view = DeadLetterView::from(DeadLetterDetail {
            letter: DeadLetter {
                source: "default".into(),
                app_id: "app-1".into(),
                id: 7,
                webhook_id: 3,
                kind: "track".into(),
                reason: "rejected".into(),
                detail: "heap answered 400: no".into(),
                subject: "alice".into(),
                attempts: 2,
                received_at_ms: 1_700_000_000_000,
                dead_at_ms: 1_700_000_000_250,
            },
            json: r#"{"identity":"alice","event":"E"}"#.into(),
            last_error: Some(String::new()),
            body: bytes::Bytes::from_static(b"\xffnot json"),
        });
        let json = serde_json::to_value(&view).unwrap();
        assert_eq!(json["id"], 7);
        assert_eq!(json["received_at"], "2023-11-14T22:13:20.000Z");
        assert_eq!(json["dead_at"], "2023-11-14T22:13:20.250Z");
        assert_eq!(json["record"]["identity"], "alice");
        assert_eq!(json["last_error"], serde_json::Value::Null);
        assert_eq!(json["webhook"], "\u{fffd}not json");
    }

    #[test]
    fn a_limit_of_zero_is_an_error_not_one_row() {
        let zero = FilterParams {
            limit: Some(0),
            ..FilterParams::default()
        };
        assert_eq!(zero.listing(), Err(FilterError::BadLimit));
        assert_eq!(zero.selection(), Err(FilterError::BadLimit));
    }

    #[test]
    fn times_are_unix_ms_or_rfc3339() {
        let params = FilterParams {
            since: Some("1700000000000".into()),
            until: Some("2023-11-14T22:13:20Z".into()),
            ..FilterParams::default()
        };
        let filter = params.listing().unwrap();
        assert_eq!(filter.since_ms, Some(1_700_000_000_000));
        assert_eq!(filter.until_ms, Some(1_700_000_000_000));
        let bad = FilterParams {
            since: Some("yesterday".into()),
            ..FilterParams::default()
        };
        assert_eq!(bad.listing(), Err(FilterError::BadTime("since")));
    }
}
