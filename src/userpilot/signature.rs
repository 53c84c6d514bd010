//! The `X-Signature` check (contract §2.1): HMAC-SHA256 over `raw body . t`, hex or base64, several
//! `v1` entries and several secrets, a tolerance both ways, millisecond `t`, and the body's
//! `timestamp` as fallback. Pure: `now` comes in as an argument. Constant-time comparison.
//!
//! Checks run cheapest first (header shape, timestamp, tolerance, then HMAC), so a stale or
//! garbled request costs no hashing. Before the check, nothing parses the body beyond the
//! top-level `timestamp` fallback; a [`Verified`] body is parsed whole on first use, and decoding
//! it belongs to [`super::payload`], which only accepts [`Verified`].

use std::borrow::Cow;
use std::sync::OnceLock;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD_PAD_INDIFFERENT, URL_SAFE_PAD_INDIFFERENT};
use bytes::Bytes;
use hmac::{Hmac, KeyInit, Mac};
use serde::Deserialize;
use serde_json::Value;
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::secret::Secret;

/// At most this many `v1` entries are considered, so a hostile header cannot make us decode and
/// compare without bound. Rotation needs two or three.
const MAX_V1_ENTRIES: usize = 16;

/// A `t` above this is milliseconds: as seconds it would be past the year 33000.
const MILLIS_THRESHOLD: i64 = 1_000_000_000_000;

/// HMAC-SHA256 output length.
const MAC_LEN: usize = 32;

/// Body bytes whose signature has been checked. Only [`verify`] constructs it, so the decoder,
/// which takes `&Verified`, cannot be handed unverified bytes.
///
/// The body's digest and its parse are each computed once, on first use, and kept with it: the
/// handler, the decoder and the shape recorder all need them (parsing the body twice was a
/// measurable part of a webhook's CPU).
#[derive(Debug, Clone)]
pub struct Verified {
    bytes: Bytes,
    digest: OnceLock<[u8; 32]>,
    /// The body as JSON, `None` when it is not JSON.
    parsed: OnceLock<Option<Value>>,
}

impl Verified {
    fn new(bytes: Bytes) -> Self {
        Self {
            bytes,
            digest: OnceLock::new(),
            parsed: OnceLock::new(),
        }
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub fn into_bytes(self) -> Bytes {
        self.bytes
    }

    /// SHA-256 of the body: the webhook's identity for deduplication and idempotency keys.
    pub fn digest(&self) -> [u8; 32] {
        *self
            .digest
            .get_or_init(|| Sha256::digest(&self.bytes).into())
    }

    /// The body parsed as JSON (numbers as written), `None` when it is not JSON.
    pub fn json(&self) -> Option<&Value> {
        self.parsed
            .get_or_init(|| serde_json::from_slice(&self.bytes).ok())
            .as_ref()
    }

    /// Bytes the queue stored after verifying them on receipt, for dead-letter replay. The
    /// queue keeps only verified bodies, so this does not open a way around [`verify`].
    pub fn from_queue(stored: Bytes) -> Self {
        Self::new(stored)
    }

    /// Bytes a preview maps as if they had been verified (contract §10.3). Nothing made from
    /// them is queued or sent, so this does not open a way around [`verify`] either.
    pub fn for_preview(payload: Bytes) -> Self {
        Self::new(payload)
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
///
/// # Errors
///
/// In the order checked: [`Missing`](SignatureError::Missing) without a header;
/// [`Malformed`](SignatureError::Malformed) for a non-UTF-8 header, no `v1` or a non-integer `t`;
/// [`NoTimestamp`](SignatureError::NoTimestamp) when neither the header nor the body has one;
/// [`Stale`](SignatureError::Stale) outside the tolerance; [`Mismatch`](SignatureError::Mismatch)
/// when no `v1` matches any non-empty secret.
pub fn verify(
    body: Bytes,
    header: Option<&[u8]>,
    secrets: &[Secret],
    tolerance_secs: u64,
    now_unix: i64,
) -> Result<Verified, SignatureError> {
    let header = parse_header(header.ok_or(SignatureError::Missing)?)?;
    // The `t` string goes into the signed message byte for byte, so it is kept as text.
    let t = match header.t {
        Some(t) => Cow::Borrowed(t),
        None => Cow::Owned(body_timestamp(&body).ok_or(SignatureError::NoTimestamp)?),
    };
    check_tolerance(&t, tolerance_secs, now_unix)?;

    let candidates: Vec<[u8; MAC_LEN]> = header.v1.iter().filter_map(|v| decode_mac(v)).collect();
    if candidates.is_empty() {
        return Err(SignatureError::Mismatch);
    }
    let matched = secrets
        .iter()
        // An empty key would let anyone sign; config should refuse it, and we refuse it again.
        .filter(|secret| !secret.is_empty())
        .filter_map(|secret| hmac_sha256(secret.expose().as_bytes(), &body, t.as_bytes()))
        .any(|expected| {
            candidates
                .iter()
                .any(|candidate| bool::from(candidate.ct_eq(&expected)))
        });
    if matched {
        Ok(Verified::new(body))
    } else {
        Err(SignatureError::Mismatch)
    }
}

/// A valid header value `t=<t>,v1=<lowercase hex>` for `body`, as Userpilot would send it.
pub fn sign(body: &[u8], secret: &str, t: i64) -> String {
    let t = t.to_string();
    // `hmac_sha256` cannot fail in practice; if it did, an empty `v1` never verifies.
    let v1 = hmac_sha256(secret.as_bytes(), body, t.as_bytes())
        .map(hex::encode)
        .unwrap_or_default();
    format!("t={t},v1={v1}")
}

/// The parts of the header we use; unknown keys (`v0`, `v2`, ...) are dropped.
struct Header<'a> {
    t: Option<&'a str>,
    v1: Vec<&'a str>,
}

fn parse_header(raw: &[u8]) -> Result<Header<'_>, SignatureError> {
    let text = std::str::from_utf8(raw).map_err(|_| SignatureError::Malformed)?;
    let mut header = Header {
        t: None,
        v1: Vec::new(),
    };
    for part in text.split(',') {
        // Empty parts and parts without `=` carry nothing we could use; skip them like unknown
        // keys rather than refusing the whole header.
        let Some((key, value)) = part.trim().split_once('=') else {
            continue;
        };
        match key {
            "t" if header.t.is_none() => header.t = Some(value),
            "v1" if header.v1.len() < MAX_V1_ENTRIES => header.v1.push(value),
            _ => {}
        }
    }
    if header.v1.is_empty() {
        return Err(SignatureError::Malformed);
    }
    Ok(header)
}

/// Only the top-level `timestamp`; every other field is skipped without being materialised.
#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow)]
    timestamp: Option<&'a RawValue>,
}

/// The body's top-level `timestamp` as text: a number exactly as written in the body (so it
/// matches what Userpilot signed), or a string's content. `None` for anything else.
fn body_timestamp(body: &[u8]) -> Option<String> {
    // serde's derived struct visitor would also accept a JSON array (`[123]`), which has no
    // top-level `timestamp`; only an object counts.
    if body.trim_ascii_start().first() != Some(&b'{') {
        return None;
    }
    let envelope: Envelope<'_> = serde_json::from_slice(body).ok()?;
    let raw = envelope.timestamp?.get();
    match raw.as_bytes().first()? {
        b'"' => serde_json::from_str::<String>(raw).ok(),
        b'-' | b'0'..=b'9' => Some(raw.to_owned()),
        _ => None,
    }
}

/// `|now - t| <= tolerance`, both directions, with a millisecond `t` scaled down for the check.
fn check_tolerance(t: &str, tolerance_secs: u64, now_unix: i64) -> Result<(), SignatureError> {
    let t: i64 = t.parse().map_err(|_| SignatureError::Malformed)?;
    let t_secs = if t > MILLIS_THRESHOLD { t / 1000 } else { t };
    if now_unix.abs_diff(t_secs) > tolerance_secs {
        return Err(SignatureError::Stale);
    }
    Ok(())
}

/// A `v1` value as the 32 MAC bytes: hex in either case (64 chars), or base64 in the standard or
/// URL-safe alphabet, padded or not (43 or 44 chars). The length gate keeps decoding bounded.
fn decode_mac(value: &str) -> Option<[u8; MAC_LEN]> {
    let mut mac = [0u8; MAC_LEN];
    match value.len() {
        64 => hex::decode_to_slice(value, &mut mac).ok()?,
        43 | 44 => {
            let bytes = STANDARD_PAD_INDIFFERENT
                .decode(value)
                .or_else(|_| URL_SAFE_PAD_INDIFFERENT.decode(value))
                .ok()?;
            mac = bytes.try_into().ok()?;
        }
        _ => return None,
    }
    Some(mac)
}

/// HMAC-SHA256 over `body . t` (body first: the reverse of Stripe's order).
fn hmac_sha256(key: &[u8], body: &[u8], t: &[u8]) -> Option<[u8; MAC_LEN]> {
    // HMAC accepts keys of any length; the `Result` comes from the trait shared with fixed-key MACs.
    let mut mac = Hmac::<Sha256>::new_from_slice(key).ok()?;
    mac.update(body);
    mac.update(b".");
    mac.update(t);
    Some(mac.finalize().into_bytes().into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const NOW: i64 = 1_726_742_461;
    const TOLERANCE: u64 = 300;
    const SECRET: &str = "whsec-test-secret";
    const BODY: &str = r#"{"timestamp":1726742461,"data":{"type":"nps","score":9}}"#;

    // Expected MACs below were computed independently with Python's `hmac` module:
    // hmac.new(secret.encode(), body.encode() + b"." + t.encode(), hashlib.sha256)

    /// BODY, SECRET, t = "1726742461".
    const HEX: &str = "3c8892c8deaa9a0700e98945766abe0356bc51941cdad7a33894613d03748360";
    /// The same MAC over `t . body` (Stripe's order), which must not verify.
    const STRIPE_ORDER_HEX: &str =
        "4e0be4a822aae62d13e085fa4546557c100a6a2a1dc9d88c4c7706f6bf3578e8";
    /// BODY, SECRET, t = "01726742461": `t` is signed as sent, not reformatted.
    const LEADING_ZERO_T_HEX: &str =
        "c3320e470957c0308f236571f8aec08dedc1c6b783ecc3a56d2c20b14ff08891";
    /// BODY, "old-secret", t = "1726742461".
    const OLD_SECRET_HEX: &str = "1e20a6c9b8d575f9509a1f961d79cb5abb6bfed66e25c9d9db8eedf1324c7458";
    /// STRING_TS_BODY, SECRET, t = "1726742461".
    const STRING_TS_BODY: &str = r#"{"timestamp":"1726742461","data":{}}"#;
    const STRING_TS_HEX: &str = "111b304d2ca3838aad5a1696acb9e09af7e68443ed450a4c8cd77232988f28d5";

    fn secrets(values: &[&str]) -> Vec<Secret> {
        values.iter().map(|v| Secret::new(*v)).collect()
    }

    fn check(body: &str, header: Option<&str>, keys: &[&str]) -> Result<(), SignatureError> {
        verify(
            Bytes::copy_from_slice(body.as_bytes()),
            header.map(str::as_bytes),
            &secrets(keys),
            TOLERANCE,
            NOW,
        )
        .map(|verified| assert_eq!(verified.bytes(), body.as_bytes()))
    }

    struct Vector {
        name: &'static str,
        body: &'static str,
        secret: &'static str,
        t: i64,
        hex: &'static str,
        base64: &'static str,
        base64_url: &'static str,
    }

    const VECTORS: &[Vector] = &[
        Vector {
            name: "seconds",
            body: BODY,
            secret: SECRET,
            t: 1_726_742_461,
            hex: HEX,
            base64: "PIiSyN6qmgcA6YlFdmq+A1a8UZQc2tejOJRhPQN0g2A=",
            base64_url: "PIiSyN6qmgcA6YlFdmq-A1a8UZQc2tejOJRhPQN0g2A=",
        },
        Vector {
            name: "milliseconds",
            body: r#"{"timestamp":1726742461123,"data":{"type":"nps","score":9}}"#,
            secret: SECRET,
            t: 1_726_742_461_123,
            hex: "5523a6de37a65f6679f9648fb94a0e52939770281efd0431e40c05ae0f7ae140",
            base64: "VSOm3jemX2Z5+WSPuUoOUpOXcCge/QQx5AwFrg964UA=",
            base64_url: "VSOm3jemX2Z5-WSPuUoOUpOXcCge_QQx5AwFrg964UA=",
        },
        Vector {
            name: "unicode body and secret",
            body: r#"{"data":{"feedback":"Ça marche très bien — 👍"}}"#,
            secret: "clé-secrète",
            t: 1_726_742_461,
            hex: "480c25520cf8a54b4998acefe5f1fb4ea9ffbd92ffcc4f22c191b206a445ed65",
            base64: "SAwlUgz4pUtJmKzv5fH7Tqn/vZL/zE8iwZGyBqRF7WU=",
            base64_url: "SAwlUgz4pUtJmKzv5fH7Tqn_vZL_zE8iwZGyBqRF7WU=",
        },
    ];

    #[test]
    fn sign_matches_the_known_answer_vectors() {
        for v in VECTORS {
            let expected = format!("t={},v1={}", v.t, v.hex);
            assert_eq!(
                sign(v.body.as_bytes(), v.secret, v.t),
                expected,
                "{}",
                v.name
            );
        }
    }

    #[test]
    fn known_answer_vectors_verify_in_hex_and_every_base64_form() {
        for v in VECTORS {
            let encodings = [
                ("lowercase hex", v.hex.to_owned()),
                ("uppercase hex", v.hex.to_uppercase()),
                ("standard base64", v.base64.to_owned()),
                (
                    "standard base64 without padding",
                    v.base64.trim_end_matches('=').to_owned(),
                ),
                ("url-safe base64", v.base64_url.to_owned()),
                (
                    "url-safe base64 without padding",
                    v.base64_url.trim_end_matches('=').to_owned(),
                ),
            ];
            for (encoding, v1) in encodings {
                let header = format!("t={},v1={v1}", v.t);
                assert_eq!(
                    check(v.body, Some(&header), &[v.secret]),
                    Ok(()),
                    "{} / {encoding}",
                    v.name
                );
            }
        }
    }

    #[test]
    fn digest_is_the_sha256_of_the_body() {
        let verified = verify(
            Bytes::from_static(BODY.as_bytes()),
            Some(format!("t={NOW},v1={HEX}").as_bytes()),
            &secrets(&[SECRET]),
            TOLERANCE,
            NOW,
        )
        .unwrap();
        assert_eq!(
            hex::encode(verified.digest()),
            "8cd682895249c88784a2d8a40669281e893e39f041606877d0b4bbb5c3748f96"
        );
        assert_eq!(verified.into_bytes(), BODY.as_bytes());
    }

    type Expected = Result<(), SignatureError>;

    /// Runs `(name, header, expected)` rows against BODY and SECRET.
    fn assert_headers(cases: &[(&str, String, Expected)]) {
        for (name, header, expected) in cases {
            assert_eq!(check(BODY, Some(header), &[SECRET]), *expected, "{name}");
        }
    }

    #[test]
    fn tolerance_is_inclusive_and_applies_in_both_directions() {
        use SignatureError::Stale;
        let at = |t: i64| sign(BODY.as_bytes(), SECRET, t);
        let tol = TOLERANCE as i64;
        let ms = |secs: i64| secs * 1000;
        assert_headers(&[
            ("exactly tolerance in the past", at(NOW - tol), Ok(())),
            ("one second more in the past", at(NOW - tol - 1), Err(Stale)),
            ("exactly tolerance in the future", at(NOW + tol), Ok(())),
            (
                "one second more in the future",
                at(NOW + tol + 1),
                Err(Stale),
            ),
            ("zero", at(0), Err(Stale)),
            ("negative", at(-5), Err(Stale)),
            ("ms at the future edge", at(ms(NOW + tol) + 999), Ok(())),
            ("ms past the future edge", at(ms(NOW + tol + 1)), Err(Stale)),
            ("ms at the past edge", at(ms(NOW - tol)), Ok(())),
            ("ms past the past edge", at(ms(NOW - tol) - 1), Err(Stale)),
        ]);
    }

    #[test]
    fn staleness_is_decided_before_the_mac_is_checked() {
        let header = format!("t={},v1={}", NOW - 1000, "00".repeat(32));
        assert_eq!(
            check(BODY, Some(&header), &[SECRET]),
            Err(SignatureError::Stale)
        );
    }

    #[test]
    fn a_missing_header_is_refused() {
        assert_eq!(check(BODY, None, &[SECRET]), Err(SignatureError::Missing));
    }

    #[test]
    fn malformed_headers_are_refused() {
        use SignatureError::Malformed;
        assert_headers(&[
            ("empty", String::new(), Err(Malformed)),
            ("no v1", format!("t={NOW}"), Err(Malformed)),
            (
                "only v0 and v2",
                format!("t={NOW},v0={HEX},v2={HEX}"),
                Err(Malformed),
            ),
            ("garbage", "garbage".into(), Err(Malformed)),
            ("only commas", ",, ,".into(), Err(Malformed)),
            ("v1 without =", format!("t={NOW},v1"), Err(Malformed)),
            ("non-integer t", format!("t=abc,v1={HEX}"), Err(Malformed)),
            (
                "fractional t",
                format!("t={NOW}.0,v1={HEX}"),
                Err(Malformed),
            ),
            ("empty t", format!("t=,v1={HEX}"), Err(Malformed)),
            (
                "t beyond i64",
                format!("t=99999999999999999999,v1={HEX}"),
                Err(Malformed),
            ),
            // Only whole parts are trimmed; a space after `=` belongs to the value.
            (
                "space after t=",
                format!("t= {NOW},v1={HEX}"),
                Err(Malformed),
            ),
            (
                "bad first t",
                format!("t=junk,t={NOW},v1={HEX}"),
                Err(Malformed),
            ),
        ]);
    }

    #[test]
    fn a_non_utf8_header_is_malformed() {
        let header = [format!("t={NOW},v1=").as_bytes(), &[0xff, 0xfe]].concat();
        let body = Bytes::from_static(BODY.as_bytes());
        let result = verify(body, Some(&header), &secrets(&[SECRET]), TOLERANCE, NOW);
        assert_eq!(result.unwrap_err(), SignatureError::Malformed);
    }

    #[test]
    fn unknown_keys_empty_parts_and_surrounding_whitespace_are_ignored() {
        assert_headers(&[
            (
                "unknown keys",
                format!("v0=abc,t={NOW},v2=zzz,flag,v1={HEX}"),
                Ok(()),
            ),
            ("whitespace", format!("  t={NOW} ,\tv1={HEX}  ,"), Ok(())),
            ("empty parts", format!(",t={NOW},,v1={HEX},"), Ok(())),
            ("v1 before t", format!("v1={HEX},t={NOW}"), Ok(())),
            ("first t wins", format!("t={NOW},t=junk,v1={HEX}"), Ok(())),
        ]);
    }

    #[test]
    fn any_of_several_v1_entries_may_match_up_to_sixteen() {
        let wrong = format!("v1={},", "00".repeat(32));
        assert_headers(&[
            (
                "last valid",
                format!("t={NOW},{wrong}v1=junk,v1=,v1={HEX}"),
                Ok(()),
            ),
            (
                "16th valid",
                format!("t={NOW},{}v1={HEX}", wrong.repeat(15)),
                Ok(()),
            ),
            (
                "17th ignored",
                format!("t={NOW},{}v1={HEX}", wrong.repeat(16)),
                Err(SignatureError::Mismatch),
            ),
        ]);
    }

    #[test]
    fn any_configured_secret_may_match() {
        use SignatureError::Mismatch;
        let current = format!("t={NOW},v1={HEX}");
        let old = format!("t={NOW},v1={OLD_SECRET_HEX}");
        let cases: &[(&str, &String, &[&str], Expected)] = &[
            (
                "second secret matches",
                &current,
                &["new-secret", SECRET],
                Ok(()),
            ),
            (
                "old secret still active",
                &old,
                &[SECRET, "old-secret"],
                Ok(()),
            ),
            ("old secret retired", &old, &[SECRET], Err(Mismatch)),
            ("wrong secret", &current, &["other"], Err(Mismatch)),
            ("no secrets", &current, &[], Err(Mismatch)),
        ];
        for (name, header, keys, expected) in cases {
            assert_eq!(check(BODY, Some(header), keys), *expected, "{name}");
        }
    }

    #[test]
    fn an_empty_secret_never_verifies() {
        let header = sign(BODY.as_bytes(), "", NOW);
        assert_eq!(
            check(BODY, Some(&header), &[""]),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn values_that_are_not_a_32_byte_mac_never_match() {
        use SignatureError::Mismatch;
        assert_headers(&[
            (
                "not hex",
                format!("t={NOW},v1={}", "zz".repeat(32)),
                Err(Mismatch),
            ),
            (
                "truncated hex",
                format!("t={NOW},v1={}", &HEX[..62]),
                Err(Mismatch),
            ),
            (
                "hex with a prefix",
                format!("t={NOW},v1=sha256={HEX}"),
                Err(Mismatch),
            ),
            (
                "mixed base64 alphabets",
                format!("t={NOW},v1={}", "+-".repeat(22)),
                Err(Mismatch),
            ),
        ]);
    }

    #[test]
    fn the_signed_message_is_the_body_then_a_dot_then_t_as_sent() {
        use SignatureError::Mismatch;
        assert_headers(&[
            (
                "Stripe order t.body",
                format!("t={NOW},v1={STRIPE_ORDER_HEX}"),
                Err(Mismatch),
            ),
            (
                "t as sent",
                format!("t=0{NOW},v1={LEADING_ZERO_T_HEX}"),
                Ok(()),
            ),
            ("t reformatted", format!("t=0{NOW},v1={HEX}"), Err(Mismatch)),
        ]);
        let other_body = r#"{"timestamp":1726742461}"#;
        let header = format!("t={NOW},v1={HEX}");
        assert_eq!(check(other_body, Some(&header), &[SECRET]), Err(Mismatch));
    }

    #[test]
    fn the_body_timestamp_stands_in_for_a_missing_t() {
        use SignatureError::{Malformed, NoTimestamp, Stale};
        let v1 = format!("v1={HEX}");
        let cases: &[(&str, &str, &str, Expected)] = &[
            ("number", BODY, &v1, Ok(())),
            (
                "string",
                STRING_TS_BODY,
                &format!("v1={STRING_TS_HEX}"),
                Ok(()),
            ),
            (
                "header t wins",
                BODY,
                &format!("t={},{v1}", NOW - 1000),
                Err(Stale),
            ),
            ("stale", r#"{"timestamp":1000}"#, &v1, Err(Stale)),
            (
                "fractional",
                r#"{"timestamp":1726742461.5}"#,
                &v1,
                Err(Malformed),
            ),
            ("absent", r#"{"data":{}}"#, &v1, Err(NoTimestamp)),
            (
                "nested only",
                r#"{"data":{"timestamp":1726742461}}"#,
                &v1,
                Err(NoTimestamp),
            ),
            ("null", r#"{"timestamp":null}"#, &v1, Err(NoTimestamp)),
            ("boolean", r#"{"timestamp":true}"#, &v1, Err(NoTimestamp)),
            ("not JSON", "not json", &v1, Err(NoTimestamp)),
            ("JSON array", "[1726742461]", &v1, Err(NoTimestamp)),
        ];
        for (name, body, header, expected) in cases {
            assert_eq!(check(body, Some(header), &[SECRET]), *expected, "{name}");
        }
    }

    #[test]
    fn reasons_are_distinct_metric_labels() {
        use SignatureError::*;
        let labels: std::collections::BTreeSet<_> =
            [Missing, Malformed, NoTimestamp, Stale, Mismatch]
                .iter()
                .map(SignatureError::reason)
                .collect();
        assert_eq!(labels.len(), 5);
        assert_eq!(Stale.reason(), "stale");
    }

    fn fresh_t() -> impl Strategy<Value = i64> {
        let tol = TOLERANCE as i64;
        prop_oneof![
            (NOW - tol..=NOW + tol),
            (NOW - tol..=NOW + tol).prop_flat_map(|secs| secs * 1000..secs * 1000 + 1000),
        ]
    }

    proptest! {
        #[test]
        fn signed_bodies_verify(
            body in proptest::collection::vec(any::<u8>(), 0..512),
            secret in "\\PC{1,40}",
            t in fresh_t(),
        ) {
            let header = sign(&body, &secret, t);
            let verified = verify(Bytes::from(body.clone()), Some(header.as_bytes()), &[Secret::new(secret)], TOLERANCE, NOW);
            prop_assert_eq!(verified.map(Verified::into_bytes), Ok(Bytes::from(body)));
        }

        #[test]
        fn any_changed_body_byte_is_a_mismatch(
            body in proptest::collection::vec(any::<u8>(), 1..512),
            index in any::<prop::sample::Index>(),
            flip in 1u8..=255,
            secret in "\\PC{1,40}",
            t in fresh_t(),
        ) {
            let header = sign(&body, &secret, t);
            let mut tampered = body;
            let at = index.index(tampered.len());
            tampered[at] ^= flip;
            let result = verify(Bytes::from(tampered), Some(header.as_bytes()), &[Secret::new(secret)], TOLERANCE, NOW);
            prop_assert_eq!(result.unwrap_err(), SignatureError::Mismatch);
        }

        #[test]
        fn arbitrary_headers_never_panic_and_never_verify(
            header in prop_oneof![
                any::<String>(),
                "((t|v1|v0| |,|=|-?[0-9]{1,14}|[0-9a-fA-F]{64}|[A-Za-z0-9+/_=-]{43,44}),?){0,20}",
            ],
            body in prop_oneof![
                any::<String>(),
                "\\{\"timestamp\":(-?[0-9]{1,14}|\"[0-9]{0,14}\"|null|1e9|\\[\\])\\}",
            ],
        ) {
            let result = verify(Bytes::from(body), Some(header.as_bytes()), &secrets(&[SECRET]), TOLERANCE, NOW);
            prop_assert!(result.is_err());
        }

        #[test]
        fn arbitrary_header_bytes_never_panic_and_never_verify(
            header in proptest::collection::vec(any::<u8>(), 0..256),
        ) {
            let result = verify(Bytes::from_static(BODY.as_bytes()), Some(&header), &secrets(&[SECRET]), TOLERANCE, NOW);
            prop_assert!(result.is_err());
        }
    }
}
