//! Erasures on the sqlite queue (contract §12): the scan for a person's webhooks, their
//! erasure, the `erasures` table, and scrubbing deleted content from the files.
//!
//! BASE STUB: the helper implementing this backend replaces every function body.

use super::SqliteQueue;
use crate::queue::{
    ErasureFilter, ErasureRow, ErasureScan, ErasureUpdate, NewErasure, QueueError, Removed,
};

fn missing() -> QueueError {
    QueueError::Storage("erasures are not implemented on this backend yet".into())
}

pub(super) async fn scan(
    _queue: &SqliteQueue,
    _source: &str,
    _identity: &str,
    _after_id: i64,
    _scan: usize,
) -> Result<ErasureScan, QueueError> {
    Err(missing())
}

pub(super) async fn erase_webhooks(_queue: &SqliteQueue, _ids: Vec<i64>) -> Result<Removed, QueueError> {
    Err(missing())
}

pub(super) async fn erase_samples(
    _queue: &SqliteQueue,
    _source: &str,
    _identity: &str,
) -> Result<u64, QueueError> {
    Err(missing())
}

pub(super) async fn scrub(_queue: &SqliteQueue) -> Result<(), QueueError> {
    Err(missing())
}

pub(super) async fn record(_queue: &SqliteQueue, _erasure: NewErasure) -> Result<i64, QueueError> {
    Err(missing())
}

pub(super) async fn list(
    _queue: &SqliteQueue,
    _filter: ErasureFilter,
) -> Result<Vec<ErasureRow>, QueueError> {
    Err(missing())
}

pub(super) async fn claim(
    _queue: &SqliteQueue,
    _now_ms: i64,
    _lease_ms: i64,
    _max: usize,
) -> Result<Vec<ErasureRow>, QueueError> {
    Err(missing())
}

pub(super) async fn update(
    _queue: &SqliteQueue,
    _id: i64,
    _update: ErasureUpdate,
    _now_ms: i64,
) -> Result<(), QueueError> {
    Err(missing())
}

pub(super) async fn next_due_ms(_queue: &SqliteQueue) -> Result<Option<i64>, QueueError> {
    Err(missing())
}

pub(super) async fn still_pending(_queue: &SqliteQueue, _ids: Vec<i64>) -> Result<Vec<i64>, QueueError> {
    Err(missing())
}
