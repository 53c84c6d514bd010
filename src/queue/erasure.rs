//! What the queue stores and answers for an erasure (contract §12): the scan that finds a
//! person's webhooks, the counts of what was removed, and the `erasures` table's rows and
//! state changes. The backends implement them; [`crate::erase`] drives them.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// One page of the scan behind an erasure.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ErasureScan {
    /// The webhooks of the page that may hold the identity, by id ascending.
    pub candidates: Vec<ScanCandidate>,
    /// The highest webhook id the page looked at: the next page starts after it. `None`:
    /// nothing was left to scan.
    pub last_id: Option<i64>,
}

/// A webhook that may be the person's: a record names the identity as its subject (then it
/// is), or the identity's bytes occur in the body (then [`crate::erase::body_holds`] decides).
#[derive(Debug, Clone, PartialEq)]
pub struct ScanCandidate {
    pub webhook_id: i64,
    pub by_subject: bool,
    pub body: Bytes,
}

/// What an erasure removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Removed {
    /// Webhooks whose stored body was erased (their digest stays, for deduplication).
    pub webhooks: u64,
    pub pending_records: u64,
    pub delivered_records: u64,
    pub dead_letters: u64,
    /// Shape samples cleared (the shape itself, which holds no value, stays).
    pub shape_samples: u64,
}

impl Removed {
    pub fn add(&mut self, other: Removed) {
        self.webhooks += other.webhooks;
        self.pending_records += other.pending_records;
        self.delivered_records += other.delivered_records;
        self.dead_letters += other.dead_letters;
        self.shape_samples += other.shape_samples;
    }
}

/// Where an erasure stands (stored as its `as_str`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErasureState {
    /// Erased from the relay. Final when no Heap deletion was asked for; otherwise the Heap
    /// deletion request is still to be made (or retried).
    LocalDone,
    /// Heap accepted the deletion request (`deletion_request_id`) and has not finished it.
    HeapPending,
    /// Heap refused the deletion request, or could never be asked (`reason`).
    HeapFailed,
    /// Heap says the deletion is complete.
    Done,
}

impl ErasureState {
    pub const ALL: [ErasureState; 4] = [
        ErasureState::LocalDone,
        ErasureState::HeapPending,
        ErasureState::HeapFailed,
        ErasureState::Done,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErasureState::LocalDone => "local_done",
            ErasureState::HeapPending => "heap_pending",
            ErasureState::HeapFailed => "heap_failed",
            ErasureState::Done => "done",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|state| state.as_str() == text)
    }
}

/// An erasure to record, once its local part is committed.
#[derive(Debug, Clone, PartialEq)]
pub struct NewErasure {
    pub source: String,
    /// The Heap app id to delete the user from; `None`: local only (the source has no
    /// `api_key`).
    pub heap_app_id: Option<String>,
    /// The identity, kept only while Heap is still to be asked (with `heap_app_id`); cleared
    /// once Heap accepts or refuses. `None` for a local-only erasure.
    pub identity: Option<String>,
    /// Hex SHA-256 of the identity: what logs and listings show instead.
    pub identity_sha256: String,
    pub removed: Removed,
    pub requested_at_ms: i64,
}

/// A stored erasure, as `GET /admin/erasures` lists it (timestamps rendered by the caller).
#[derive(Debug, Clone, PartialEq)]
pub struct ErasureRow {
    pub id: i64,
    pub source: String,
    pub heap_app_id: Option<String>,
    /// Present only while the Heap deletion is still to be requested.
    pub identity: Option<String>,
    pub identity_sha256: String,
    pub state: ErasureState,
    pub removed: Removed,
    pub requested_at_ms: i64,
    pub updated_at_ms: i64,
    pub deletion_request_id: Option<String>,
    /// Heap requests that failed and were retried.
    pub attempts: u32,
    /// The last retried failure (a 5xx, 429 or timeout), for humans.
    pub last_error: Option<String>,
    /// Why the Heap deletion failed for good (`heap_failed`).
    pub reason: Option<String>,
    /// When the Heap work is due next (request, retry or status check).
    pub next_attempt_at_ms: i64,
}

/// Which erasures a listing returns: all of them, paged by id ascending.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ErasureFilter {
    pub source: Option<String>,
    pub state: Option<ErasureState>,
    /// Only ids above this one.
    pub after_id: Option<i64>,
    pub limit: usize,
}

/// A change of an erasure's Heap part, applied by [`crate::queue::Queue::update_erasure`].
#[derive(Debug, Clone, PartialEq)]
pub enum ErasureUpdate {
    /// Heap accepted the deletion: `heap_pending`, the identity cleared, the status due to be
    /// checked at `check_at_ms`.
    Requested {
        deletion_request_id: String,
        check_at_ms: i64,
    },
    /// A failure worth retrying (5xx, 429, timeout): attempts + 1, due again at `at_ms`.
    Retry { error: String, at_ms: i64 },
    /// Heap still works on it: check again at `at_ms` (attempts unchanged).
    CheckLater { at_ms: i64 },
    /// Refused for good: `heap_failed` with the reason, the identity cleared.
    Failed { reason: String },
    /// Heap says complete: `done`.
    Done,
}
