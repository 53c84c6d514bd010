//! Dead-letter operations shared by the admin API and the `dlq` command: list, replay, purge,
//! and the rule that decides what they apply to ([`FilterParams::listing`],
//! [`FilterParams::selection`]): a replay or purge without a scope is refused, never taken to
//! mean "every dead letter".
//!
//! Replay re-maps each webhook from its original Userpilot body with the *current*
//! configuration, so fixing `heap.identity` or `[mapping]` and replaying repairs quarantined
//! webhooks. Records that were delivered meanwhile keep their keys and are not sent twice.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::heap::mapping::Mapper;
use crate::queue::{Content, DeadLetterFilter, Queue, QueueError, ReplayItem};
use crate::translate;
use crate::userpilot::Verified;

/// The most dead letters one listing returns.
pub const MAX_PAGE: usize = 1000;
pub const DEFAULT_PAGE: usize = 100;

/// A filter as operators write it (query string or CLI flags).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterParams {
    /// One dead letter by id.
    pub id: Option<i64>,
    pub reason: Option<String>,
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
    #[error(
        "no dead letters selected: give one `id`, a filter (`reason`, `identity`, `since`, \
         `until`, `after`, `limit`), or `all` to take every dead letter"
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
        Ok(DeadLetterFilter {
            ids: self.id.into_iter().collect(),
            reason: self.reason.clone(),
            subject: self.identity.clone(),
            since_ms: parse_time("since", &self.since)?,
            until_ms: parse_time("until", &self.until)?,
            after_id: self.after,
            limit: self.limit,
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
}

/// Re-maps and requeues the webhooks behind the selected dead letters.
pub async fn replay(
    queue: &dyn Queue,
    mapper: &Mapper,
    filter: DeadLetterFilter,
    now: DateTime<Utc>,
) -> Result<ReplaySummary, QueueError> {
    let mut summary = ReplaySummary::default();
    for item in queue.replay_items(filter).await? {
        let received_at = DateTime::from_timestamp_millis(item.received_at_ms).unwrap_or(now);
        let body = Verified::from_queue(item.body.clone());
        let Ok(content) = translate::webhook(mapper, &body, received_at) else {
            // Stored bodies were valid JSON objects when they were accepted; one that is not
            // (a corrupted file?) is left as it is for a human to look at.
            tracing::error!(
                webhook = item.webhook_id,
                "stored webhook body is not JSON; left in the dead letters"
            );
            continue;
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
        summary.events += queue.requeue(item, content, now_ms).await?;
    }
    tracing::info!(
        webhooks = summary.webhooks,
        events = summary.events,
        quarantined = summary.quarantined,
        "dead letters replayed"
    );
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

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
