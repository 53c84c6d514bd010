//! The pipeline from verified bytes to what the queue stores (contract §10): the source's
//! transform, then [`translate`] on each of its outputs. The webhook handler, dead-letter
//! replay and preview all call [`prepare`], so a replay or a preview does exactly what a
//! fresh delivery does under the configuration in force.
//!
//! No transform, or exactly `.`: the body is translated in-process, as it was received, with
//! no worker involved. Otherwise the body goes to a transform worker ([`Transforms`]) and:
//! - each output object is decoded and mapped as if Userpilot had sent it, and the records of
//!   all outputs are concatenated (the caller commits them in one webhook). Output 0 keeps the
//!   webhook's digest (so `.` and no transform give the same idempotency keys); output `i > 0`
//!   maps with `sha256(digest || "\n" || i)` so its keys differ. If any output cannot be
//!   mapped, the whole webhook is quarantined with that output's reason, so a replay after a
//!   fix repairs it whole;
//! - no output: [`Prepared::Filtered`], nothing is queued;
//! - a non-object output, a runtime error, a run over 100 ms or a worker that died: the
//!   webhook is quarantined as `transform_error` with the error in its detail.
//!
//! It must not decide HTTP answers (the handler does) nor touch the queue.

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

use crate::dead_letters::Reason;
use crate::queue::Content;
use crate::sources::Source;
use crate::transform::{PoolError, Transform, Transforms};
use crate::translate::{self, InvalidJson};
use crate::userpilot::Verified;

/// The longest error text kept in a `transform_error` letter's detail (a program's own
/// `error(.)` could carry the whole payload).
const MAX_DETAIL_CHARS: usize = 1000;

/// What a verified webhook becomes.
#[derive(Debug)]
pub enum Prepared {
    /// Records to queue, or a quarantine reason: stored either way.
    Content(Content),
    /// The transform had no output: nothing to store (202 `filtered`).
    Filtered,
}

/// Why a webhook cannot be prepared now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrepareError {
    /// The body is not a JSON object: the sender's mistake (400, not stored).
    #[error("body is not a JSON object")]
    InvalidJson,
    /// Every transform worker is busy: try again later (503 + `Retry-After`).
    #[error("{0}")]
    Busy(String),
    /// The relay could not run the transform (no worker could start): its fault, try later.
    #[error("{0}")]
    Unavailable(String),
}

impl From<InvalidJson> for PrepareError {
    fn from(_: InvalidJson) -> Self {
        PrepareError::InvalidJson
    }
}

/// Turns a verified webhook of `source` into what the queue stores for it, running the
/// source's transform on the workers of `transforms` (the generation `source` belongs to).
pub async fn prepare(
    source: &Source,
    body: &Verified,
    received_at: DateTime<Utc>,
    transforms: &Transforms,
) -> Result<Prepared, PrepareError> {
    let slot = match &source.transform {
        Transform::Identity => {
            let content = translate::webhook(&source.mapper, body, received_at)?;
            return Ok(Prepared::Content(content));
        }
        Transform::Jq { slot, .. } => *slot,
    };
    let outputs = match transforms.run(slot, body.bytes()).await {
        Ok(outputs) => outputs,
        Err(PoolError::NotAnObject) => return Err(PrepareError::InvalidJson),
        Err(error @ PoolError::Busy(_)) => return Err(PrepareError::Busy(error.to_string())),
        Err(error @ PoolError::Spawn(_)) => {
            return Err(PrepareError::Unavailable(error.to_string()));
        }
        Err(error) => return Ok(Prepared::Content(transform_error(&error.to_string()))),
    };
    let outputs: Vec<&RawValue> = match serde_json::from_slice(&outputs) {
        Ok(outputs) => outputs,
        Err(error) => {
            return Ok(Prepared::Content(transform_error(&format!(
                "an output is not JSON: {error}"
            ))));
        }
    };
    if outputs.is_empty() {
        return Ok(Prepared::Filtered);
    }
    let digest = body.digest();
    let mut records = Vec::new();
    for (index, output) in outputs.iter().enumerate() {
        // The worker's output derives from verified bytes only; it is decoded as they are.
        let output = Verified::from_queue(Bytes::copy_from_slice(output.get().as_bytes()));
        let key = output_digest(&digest, index);
        match translate::webhook_as(&source.mapper, &output, &key, received_at) {
            Ok(Content::Records(mapped)) => records.extend(mapped),
            Ok(quarantined @ Content::Quarantined { .. }) => {
                return Ok(Prepared::Content(quarantined));
            }
            Err(InvalidJson) => {
                return Ok(Prepared::Content(transform_error(&format!(
                    "output {index} is not a JSON object"
                ))));
            }
        }
    }
    Ok(Prepared::Content(Content::Records(records)))
}

/// The digest output `index` maps under: the webhook's own for output 0.
pub fn output_digest(digest: &[u8; 32], index: usize) -> [u8; 32] {
    if index == 0 {
        return *digest;
    }
    let mut hasher = Sha256::new();
    hasher.update(digest);
    hasher.update(b"\n");
    hasher.update(index.to_string().as_bytes());
    hasher.finalize().into()
}

fn transform_error(detail: &str) -> Content {
    let detail = match detail.char_indices().nth(MAX_DETAIL_CHARS) {
        Some((end, _)) => format!("{}…", &detail[..end]),
        None => detail.to_owned(),
    };
    Content::Quarantined {
        reason: Reason::TransformError.as_str().into(),
        detail,
        subject: String::new(),
    }
}
