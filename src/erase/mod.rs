//! Erasing a person (contract §12): every trace of an identity that the relay holds for a
//! source — webhook bodies, pending and delivered records, dead letters, shape samples — is
//! removed, deleted content is scrubbed from the queue's files, and the erasure is recorded,
//! with a Heap deletion to request when the source has an `api_key` (see [`heap`]).
//!
//! The identity itself is never logged or put in a metric label: its SHA-256 is.
//!
//! [`erase`] is the whole local part, in order: scan the source's webhooks page by page
//! (reads only), erase the person's in small transactions, clear the shape samples that hold
//! the identity, record the erasure, scrub the files, answer. A crash in the middle leaves a
//! partial erasure and no `erasures` row: the operator's request failed, and running it again
//! is idempotent (what was erased is gone, the rest is found again). [`ListingParams`] and
//! [`ErasureView`] are `GET /admin/erasures`: the view never holds the identity.

pub mod heap;

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::clock::Stopwatch;
use crate::dead_letters::{DEFAULT_PAGE, MAX_PAGE, rfc3339};
use crate::queue::{
    ErasureFilter, ErasureRow, ErasureState, NewErasure, Queue, QueueError, Removed,
};
use crate::sources::Sources;

/// Webhooks scanned per page of an erasure's scan (each page is one read).
pub const SCAN_PAGE: usize = 2_000;

/// Webhooks erased per transaction: small enough that ingest never waits long behind one.
pub const ERASE_CHUNK: usize = 100;

/// Moves each time this process commits a chunk of an erasure: a forwarder that claimed
/// records before it checks which of them are still pending before sending them. Moved per
/// chunk, not once per erasure, so that the guard acts while a long scan is still going on.
static EPOCH: AtomicU64 = AtomicU64::new(0);

/// Where the erasures of this process stand (see [`EPOCH`]): a forwarder compares it with
/// the value it read when it claimed.
pub fn epoch() -> u64 {
    EPOCH.load(Ordering::SeqCst)
}

/// Hex SHA-256 of an identity: what logs, listings and answers show instead of it.
pub fn identity_sha256(identity: &str) -> String {
    hex::encode(<sha2::Sha256 as sha2::Digest>::digest(identity.as_bytes()))
}

/// Whether a webhook body holds `identity` as a JSON string or number value anywhere (a
/// body that is not JSON: whether its bytes hold it). The scan's byte match finds
/// candidates; this keeps `42` from matching every body with a 42 in a timestamp.
pub fn body_holds(body: &[u8], identity: &str) -> bool {
    match serde_json::from_slice::<Value>(body) {
        Ok(value) => value_holds(&value, identity),
        Err(_) => bytes_hold(body, identity.as_bytes()),
    }
}

/// Whether `value` is, or contains, a string equal to `identity` or a number written as it
/// (numbers keep their text: serde_json's `arbitrary_precision`). Object keys count too: a
/// payload keyed by the person's email is theirs as much as one that names it as a value.
fn value_holds(value: &Value, identity: &str) -> bool {
    match value {
        Value::String(text) => text == identity,
        Value::Number(number) => number.as_str() == identity,
        Value::Array(items) => items.iter().any(|item| value_holds(item, identity)),
        Value::Object(members) => members
            .iter()
            .any(|(key, value)| key == identity || value_holds(value, identity)),
        Value::Null | Value::Bool(_) => false,
    }
}

fn bytes_hold(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty()
        || haystack
            .windows(needle.len())
            .any(|window| window == needle)
}

/// What `POST /admin/erase` and `erase` answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ErasureReport {
    pub erasure_id: i64,
    pub source: String,
    pub identity_sha256: String,
    pub state: ErasureState,
    pub removed: Removed,
    pub heap_deletion: HeapDeletion,
}

/// Whether Heap is asked to delete the user too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HeapDeletion {
    /// Queued: see `GET /admin/erasures`.
    Queued,
    /// The source has no `api_key`: the erasure is local only.
    NotConfigured,
}

/// Progress of a long erasure, for a terminal.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    pub scanned_webhooks: u64,
    pub erased_webhooks: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum EraseError {
    #[error("no source `{0}` is configured or stored")]
    UnknownSource(String),
    #[error("identity must be a non-empty string")]
    EmptyIdentity,
    #[error(transparent)]
    Queue(#[from] QueueError),
}

/// Erases `identity` of `source` (see the module doc) and returns what was removed. `source`
/// may also be one no longer configured whose webhooks are still stored (local only then).
/// `progress` is called after each page of the scan.
pub async fn erase(
    queue: &dyn Queue,
    sources: &Sources,
    source: &str,
    identity: &str,
    now_ms: i64,
    progress: &mut (dyn FnMut(Progress) + Send),
) -> Result<ErasureReport, EraseError> {
    // Exact bytes: an identity with spaces around it is a different identity.
    if identity.is_empty() {
        return Err(EraseError::EmptyIdentity);
    }
    let configured = sources.get(source);
    if configured.is_none()
        && queue
            .erasure_scan(source, identity, 0, 1)
            .await?
            .last_id
            .is_none()
    {
        return Err(EraseError::UnknownSource(source.to_owned()));
    }
    let identity_sha256 = identity_sha256(identity);
    tracing::info!(source, identity_sha256 = %identity_sha256, "erasure requested");
    let started = Stopwatch::start();

    let mut removed = Removed::default();
    let mut done = Progress::default();
    let mut after = 0;
    loop {
        let page = queue
            .erasure_scan(source, identity, after, SCAN_PAGE)
            .await?;
        let Some(last_id) = page.last_id else {
            break;
        };
        // The page looked at up to SCAN_PAGE webhooks with ids in (after, last_id]: a count
        // exact for one source, a bound when sources share the id range.
        let looked_at = u64::try_from(last_id.saturating_sub(after)).unwrap_or(0);
        done.scanned_webhooks += looked_at.min(SCAN_PAGE as u64);
        let theirs: Vec<i64> = page
            .candidates
            .into_iter()
            .filter(|candidate| candidate.by_subject || body_holds(&candidate.body, identity))
            .map(|candidate| candidate.webhook_id)
            .collect();
        for chunk in theirs.chunks(ERASE_CHUNK) {
            removed.add(queue.erase_webhooks(chunk.to_vec()).await?);
            EPOCH.fetch_add(1, Ordering::SeqCst);
            done.erased_webhooks += chunk.len() as u64;
        }
        progress(done);
        after = last_id;
    }
    removed.shape_samples = queue.erase_samples(source, identity).await?;
    EPOCH.fetch_add(1, Ordering::SeqCst);

    // Heap is asked only for a source configured with an api_key now; the identity is kept
    // (in the `erasures` row) only until Heap accepts or refuses.
    let heap_app_id = configured
        .filter(|s| s.api_key.is_some())
        .map(|s| s.app_id.as_str().to_owned());
    let heap_deletion = if heap_app_id.is_some() {
        HeapDeletion::Queued
    } else {
        HeapDeletion::NotConfigured
    };
    let erasure_id = queue
        .record_erasure(NewErasure {
            source: source.to_owned(),
            identity: heap_app_id.as_ref().map(|_| identity.to_owned()),
            heap_app_id,
            identity_sha256: identity_sha256.clone(),
            removed,
            requested_at_ms: now_ms,
        })
        .await?;
    metrics::counter!("relay_erasures_total", "source" => source.to_owned()).increment(1);
    // The answer comes only once deleted content is unreadable in the queue's files.
    queue.scrub().await?;
    tracing::info!(
        source,
        identity_sha256 = %identity_sha256,
        erasure_id,
        webhooks = removed.webhooks,
        pending = removed.pending_records,
        delivered = removed.delivered_records,
        dead_letters = removed.dead_letters,
        shape_samples = removed.shape_samples,
        heap_deletion = heap_deletion.as_str(),
        duration_ms = started.elapsed().as_millis() as u64,
        "erasure done locally"
    );
    Ok(ErasureReport {
        erasure_id,
        source: source.to_owned(),
        identity_sha256,
        state: ErasureState::LocalDone,
        removed,
        heap_deletion,
    })
}

// --- GET /admin/erasures ---------------------------------------------------------------------

/// A listing's query as operators write it: `?source=&state=&after=&limit=`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListingParams {
    pub source: Option<String>,
    /// One of [`ErasureState::ALL`], as stored (`local_done`, ...).
    pub state: Option<String>,
    /// Paging: ids above this one.
    pub after: Option<i64>,
    /// At most this many, [`DEFAULT_PAGE`] by default, [`MAX_PAGE`] at most (as dead letters).
    pub limit: Option<usize>,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ListingError {
    #[error("`limit` must be 1 or more (a listing returns at most {MAX_PAGE})")]
    BadLimit,
    #[error("unknown state `{0}`: the states are {known}", known = known_states())]
    UnknownState(String),
}

fn known_states() -> String {
    ErasureState::ALL.map(ErasureState::as_str).join(", ")
}

impl ListingParams {
    pub fn filter(&self) -> Result<ErasureFilter, ListingError> {
        if self.limit == Some(0) {
            return Err(ListingError::BadLimit);
        }
        let state = match &self.state {
            None => None,
            Some(text) => Some(
                ErasureState::parse(text)
                    .ok_or_else(|| ListingError::UnknownState(text.clone()))?,
            ),
        };
        Ok(ErasureFilter {
            source: self.source.clone(),
            state,
            after_id: self.after,
            limit: self.limit.unwrap_or(DEFAULT_PAGE).min(MAX_PAGE),
        })
    }
}

impl HeapDeletion {
    pub fn as_str(self) -> &'static str {
        match self {
            HeapDeletion::Queued => "queued",
            HeapDeletion::NotConfigured => "not_configured",
        }
    }
}

/// One erasure as `GET /admin/erasures` lists it: times in RFC 3339 and unix ms, and never
/// the identity (only its SHA-256), even while the row still keeps it for Heap.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ErasureView {
    pub id: i64,
    pub source: String,
    pub identity_sha256: String,
    pub state: ErasureState,
    pub heap_deletion: HeapDeletion,
    pub removed: Removed,
    pub requested_at: String,
    pub requested_at_ms: i64,
    pub updated_at: String,
    pub updated_at_ms: i64,
    pub deletion_request_id: Option<String>,
    pub attempts: u32,
    pub last_error: Option<String>,
    pub reason: Option<String>,
    /// When the Heap part is due next; null when nothing is (a local-only erasure,
    /// `heap_failed`, `done`).
    pub next_attempt_at: Option<String>,
}

impl From<ErasureRow> for ErasureView {
    fn from(row: ErasureRow) -> Self {
        // The rows the Heap eraser claims (see `Queue::claim_erasures`).
        let due = match row.state {
            ErasureState::LocalDone => row.heap_app_id.is_some() && row.identity.is_some(),
            ErasureState::HeapPending => true,
            ErasureState::HeapFailed | ErasureState::Done => false,
        };
        Self {
            id: row.id,
            source: row.source,
            identity_sha256: row.identity_sha256,
            state: row.state,
            heap_deletion: if row.heap_app_id.is_some() {
                HeapDeletion::Queued
            } else {
                HeapDeletion::NotConfigured
            },
            removed: row.removed,
            requested_at: rfc3339(row.requested_at_ms),
            requested_at_ms: row.requested_at_ms,
            updated_at: rfc3339(row.updated_at_ms),
            updated_at_ms: row.updated_at_ms,
            deletion_request_id: row.deletion_request_id,
            attempts: row.attempts,
            last_error: row.last_error,
            reason: row.reason,
            next_attempt_at: due.then(|| rfc3339(row.next_attempt_at_ms)),
        }
    }
}

/// The erasures `params` select, as views.
pub async fn list(
    queue: &dyn Queue,
    filter: ErasureFilter,
) -> Result<Vec<ErasureView>, QueueError> {
    Ok(queue
        .erasures(filter)
        .await?
        .into_iter()
        .map(ErasureView::from)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_holds_the_identity_as_a_string_or_number_value_anywhere() {
        let cases: [(&str, &str, bool); 14] = [
            (
                r#"{"user_id":"alice@example.com"}"#,
                "alice@example.com",
                true,
            ),
            (
                r#"{"user":{"props":[1,{"email":"alice@example.com"}]}}"#,
                "alice@example.com",
                true,
            ),
            (r#"{"user_id":42}"#, "42", true),
            (r#"{"ids":[7,42]}"#, "42", true),
            // A number matches as written only: the identity "42" is not 42.0 or 4.2e1.
            (r#"{"score":42.0,"other":4.2e1}"#, "42", false),
            // The bytes `42` inside a longer number, a timestamp or a longer string are not it.
            (r#"{"user_id":"7","at":1700000042123,"n":420}"#, "42", false),
            (
                r#"{"user_id":"7","at":"2024-01-01T00:00:42Z"}"#,
                "42",
                false,
            ),
            (
                r#"{"email":"alice@example.com.evil"}"#,
                "alice@example.com",
                false,
            ),
            // Escapes are read: the stored text is the identity once unescaped.
            (
                r#"{"email":"caf\u00e9@example.com"}"#,
                "café@example.com",
                true,
            ),
            (r#"{"name":"say \"hi\""}"#, r#"say "hi""#, true),
            // An object keyed by the identity holds it too.
            (
                r#"{"users":{"alice@example.com":{"plan":"pro"}}}"#,
                "alice@example.com",
                true,
            ),
            // Booleans and null are no identity's text.
            (r#"{"a":true,"b":null}"#, "true", false),
            // Not JSON: the bytes decide.
            ("user=alice@example.com;plan=pro", "alice@example.com", true),
            ("user=bob@example.com", "alice@example.com", false),
        ];
        for (body, identity, expected) in cases {
            assert_eq!(
                body_holds(body.as_bytes(), identity),
                expected,
                "{body} holds {identity:?}"
            );
        }
        assert!(body_holds(b"\xff\xfe alice \xff", "alice"));
    }

    #[test]
    fn the_identity_sha256_is_the_hex_digest_of_its_bytes() {
        assert_eq!(
            identity_sha256("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    fn row(state: ErasureState, heap_app_id: Option<&str>, identity: Option<&str>) -> ErasureRow {
        ErasureRow {
            id: 7,
            source: "staging".into(),
            heap_app_id: heap_app_id.map(str::to_owned),
            identity: identity.map(str::to_owned),
            identity_sha256: identity_sha256("alice@example.com"),
            state,
            removed: Removed {
                webhooks: 3,
                pending_records: 2,
                delivered_records: 4,
                dead_letters: 1,
                shape_samples: 0,
            },
            requested_at_ms: 1_700_000_000_000,
            updated_at_ms: 1_700_000_001_500,
            deletion_request_id: None,
            attempts: 0,
            last_error: None,
            reason: None,
            next_attempt_at_ms: 1_700_000_000_000,
        }
    }

    #[test]
    fn a_listed_erasure_never_shows_the_identity_even_while_it_is_kept_for_heap() {
        let view = ErasureView::from(row(
            ErasureState::LocalDone,
            Some("100"),
            Some("alice@example.com"),
        ));
        let json = serde_json::to_value(&view).unwrap();
        let text = json.to_string();
        assert!(!text.contains("alice"), "{text}");
        assert!(json.get("identity").is_none(), "{text}");
        assert_eq!(
            json["identity_sha256"],
            identity_sha256("alice@example.com")
        );
        assert_eq!(json["state"], "local_done");
        assert_eq!(json["heap_deletion"], "queued");
        assert_eq!(json["requested_at"], "2023-11-14T22:13:20.000Z");
        assert_eq!(json["requested_at_ms"], 1_700_000_000_000_i64);
        assert_eq!(json["updated_at"], "2023-11-14T22:13:21.500Z");
        assert_eq!(json["next_attempt_at"], "2023-11-14T22:13:20.000Z");
        assert_eq!(json["removed"]["pending_records"], 2);
        assert_eq!(json["deletion_request_id"], Value::Null);
    }

    #[test]
    fn next_attempt_at_is_null_when_nothing_is_due() {
        let next = |row: ErasureRow| serde_json::to_value(ErasureView::from(row)).unwrap();
        let local_only = next(row(ErasureState::LocalDone, None, None));
        assert_eq!(local_only["next_attempt_at"], Value::Null);
        assert_eq!(local_only["heap_deletion"], "not_configured");
        for state in [ErasureState::HeapFailed, ErasureState::Done] {
            assert_eq!(
                next(row(state, Some("100"), None))["next_attempt_at"],
                Value::Null
            );
        }
        let pending = next(row(ErasureState::HeapPending, Some("100"), None));
        assert_eq!(pending["next_attempt_at"], "2023-11-14T22:13:20.000Z");
    }

    #[test]
    fn a_listing_is_paged_as_dead_letters_are_and_an_unknown_state_names_the_known_ones() {
        let filter = ListingParams::default().filter().unwrap();
        assert_eq!(filter.limit, DEFAULT_PAGE);
        assert_eq!(filter.state, None);
        let params = ListingParams {
            source: Some("staging".into()),
            state: Some("heap_pending".into()),
            after: Some(12),
            limit: Some(5_000),
        };
        assert_eq!(
            params.filter().unwrap(),
            ErasureFilter {
                source: Some("staging".into()),
                state: Some(ErasureState::HeapPending),
                after_id: Some(12),
                limit: MAX_PAGE,
            }
        );
        let zero = ListingParams {
            limit: Some(0),
            ..ListingParams::default()
        };
        assert_eq!(zero.filter(), Err(ListingError::BadLimit));
        let unknown = ListingParams {
            state: Some("pending".into()),
            ..ListingParams::default()
        };
        let error = unknown.filter().unwrap_err();
        assert_eq!(
            error.to_string(),
            "unknown state `pending`: the states are local_done, heap_pending, heap_failed, done"
        );
    }

    #[tokio::test]
    async fn an_empty_identity_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let queue = crate::queue::sqlite::SqliteQueue::open(&dir.path().join("queue.db")).unwrap();
        let result = erase(&queue, &Sources::default(), "default", "", 0, &mut |_| {}).await;
        assert!(
            matches!(result, Err(EraseError::EmptyIdentity)),
            "{result:?}"
        );
    }
}
