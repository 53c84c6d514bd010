//! The `X-Signature` check (SPEC §2.1): HMAC-SHA256 over `raw body . t`, hex or base64, several
//! `v1` entries and several secrets, a tolerance both ways, millisecond `t`, and the body's
//! `timestamp` as fallback. Pure: `now` comes in as an argument. Constant-time comparison.

use bytes::Bytes;

use crate::secret::Secret;

/// Body bytes whose signature has been checked. Only [`verify`] constructs it, so the decoder,
/// which takes `&Verified`, cannot be handed unverified bytes.
#[derive(Debug, Clone)]
pub struct Verified(Bytes);

impl Verified {
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn into_bytes(self) -> Bytes {
        self.0
    }

    /// SHA-256 of the body: the webhook's identity for deduplication and idempotency keys.
    pub fn digest(&self) -> [u8; 32] {
        todo!()
    }
}

/// Why a signature was refused. The reason goes to logs and metrics only; the client always
/// sees the same generic 401.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("no X-Signature header")]
    Missing,
    #[error("X-Signature header is malformed")]
    Malformed,
    #[error("no timestamp in the header or the body")]
    NoTimestamp,
    #[error("timestamp outside the tolerance")]
    Stale,
    #[error("no signature matches any configured secret")]
    Mismatch,
}

impl SignatureError {
    /// Metric label (`relay_signature_failures_total{reason}`).
    pub fn reason(&self) -> &'static str {
        match self {
            SignatureError::Missing => "missing",
            SignatureError::Malformed => "malformed",
            SignatureError::NoTimestamp => "no_timestamp",
            SignatureError::Stale => "stale",
            SignatureError::Mismatch => "mismatch",
        }
    }
}

/// Verifies `body` against the `X-Signature` header value.
pub fn verify(
    body: Bytes,
    header: Option<&[u8]>,
    secrets: &[Secret],
    tolerance_secs: u64,
    now_unix: i64,
) -> Result<Verified, SignatureError> {
    todo!("{body:?}{header:?}{secrets:?}{tolerance_secs}{now_unix}")
}

/// A valid header value `t=<t>,v1=<lowercase hex>` for `body`, as Userpilot would send it.
pub fn sign(body: &[u8], secret: &str, t: i64) -> String {
    todo!("{body:?}{secret}{t}")
}
