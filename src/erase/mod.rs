//! Erasing a person (contract §12): every trace of an identity that the relay holds for a
//! source — webhook bodies, pending and delivered records, dead letters, shape samples — is
//! removed, deleted content is scrubbed from the queue's files, and the erasure is recorded,
//! with a Heap deletion to request when the source has an `api_key` (see [`heap`]).
//!
//! The identity itself is never logged or put in a metric label: its SHA-256 is.
//!
//! BASE SKELETON: the signatures below are the interface others build on; the helper owning
//! this module implements the bodies.

pub mod heap;

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

use crate::queue::{ErasureState, Queue, QueueError, Removed};
use crate::sources::Sources;

/// Webhooks scanned per page of an erasure's scan (each page is one read).
pub const SCAN_PAGE: usize = 2_000;

/// Webhooks erased per transaction: small enough that ingest never waits long behind one.
pub const ERASE_CHUNK: usize = 100;

/// Erasures committed by this process so far: a forwarder that claimed records before an
/// erasure checks which of them are still pending before sending them.
static EPOCH: AtomicU64 = AtomicU64::new(0);

/// How many erasures this process has committed (see [`EPOCH`]).
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
pub fn body_holds(_body: &[u8], _identity: &str) -> bool {
    false // BASE
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
pub async fn erase(
    _queue: &dyn Queue,
    _sources: &Sources,
    _source: &str,
    _identity: &str,
    _now_ms: i64,
    _progress: &mut (dyn FnMut(Progress) + Send),
) -> Result<ErasureReport, EraseError> {
    Err(EraseError::EmptyIdentity) // BASE
}
