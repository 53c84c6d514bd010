//! Dead-letter operations shared by the admin API and the `dlq` command: list, replay, purge.
//!
//! Replay re-maps each webhook from its original Userpilot body with the *current*
//! configuration, so fixing `heap.identity` or `[mapping]` and replaying repairs quarantined
//! webhooks. Records that were delivered meanwhile keep their keys and are not sent twice.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::heap::mapping::Mapper;
use crate::ingest;
use crate::queue::{Content, DeadLetterFilter, Queue, QueueError};
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
}

#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    #[error("`{0}` must be unix milliseconds or an RFC 3339 time")]
    BadTime(&'static str),
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
    /// The queue filter; `paged` applies the listing's page size.
    pub fn to_filter(&self, paged: bool) -> Result<DeadLetterFilter, FilterError> {
        Ok(DeadLetterFilter {
            ids: self.id.into_iter().collect(),
            reason: self.reason.clone(),
            subject: self.identity.clone(),
            since_ms: parse_time("since", &self.since)?,
            until_ms: parse_time("until", &self.until)?,
            after_id: self.after,
            limit: if paged {
                Some(self.limit.unwrap_or(DEFAULT_PAGE).clamp(1, MAX_PAGE))
            } else {
                self.limit
            },
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
        let Ok(content) = ingest::prepare(mapper, &body, received_at) else {
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
        summary.events += queue.requeue(item, content, now.timestamp_millis()).await?;
    }
    tracing::info!(
        webhooks = summary.webhooks,
        events = summary.events,
        quarantined = summary.quarantined,
        "dead letters replayed"
    );
    Ok(summary)
}
