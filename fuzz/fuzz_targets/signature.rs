//! Fuzzes `userpilot::verify` (contract §2.1) with hostile `X-Signature` headers and bodies.
//!
//! Input layout: the bytes before the first `\n` are the header value, the rest is the body; an
//! input without `\n` is a body sent with no header at all. HTTP header values cannot hold a
//! newline, so the split loses nothing, and seeds stay readable. In the header, the placeholders
//! `{hex}`, `{HEX}`, `{b64}` and `{b64url}` are replaced by the correct MAC of the body for
//! `t = NOW` (and `{hexms}` for `t = NOW_MS`), so the fuzzer can reach the accepting paths
//! (whitespace, unknown keys, several `v1`, the body `timestamp` fallback) without forging HMACs.
//!
//! Oracles, beyond "never panics":
//! - accepted ⇒ the bytes are the body, the header carries a correct MAC for a fresh `t` (checked
//!   with an HMAC computed here, independently of the relay), the same request is refused 301 s
//!   earlier or later and accepted 300 s earlier or later (the tolerance is inclusive), changing
//!   one body byte is refused, and `sign` → `verify` of the same body is accepted;
//! - no secret, or only an empty one, never accepts anything;
//! - `sign` agrees with the independent HMAC, and `sign` → `verify` round-trips every body, for
//!   seconds and milliseconds `t` anywhere in the tolerance, and fails with another secret.
#![no_main]

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE_NO_PAD};
use bytes::Bytes;
use hmac::{Hmac, KeyInit, Mac};
use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};
use userpilot_heap_relay::secret::Secret;
use userpilot_heap_relay::userpilot::{SignatureError, sign, verify};

const NOW: i64 = 1_726_742_461;
const NOW_MS: i64 = NOW * 1000 + 123;
const TOLERANCE: u64 = 300;
const SECRET: &str = "s";

/// HMAC-SHA256 over `body . t`, written here from the contract rather than taken from the relay.
fn mac(body: &[u8], t: &str) -> [u8; 32] {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(SECRET.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(body);
    mac.update(b".");
    mac.update(t.as_bytes());
    mac.finalize().into_bytes().into()
}

/// Every way the contract lets a MAC be written, lowercase (hex is compared case-insensitively).
/// Base64 is left unpadded: the padded form contains it.
fn encodings(mac: &[u8; 32]) -> [String; 3] {
    [
        hex::encode(mac),
        STANDARD_NO_PAD.encode(mac).to_lowercase(),
        URL_SAFE_NO_PAD.encode(mac).to_lowercase(),
    ]
}

fn substitute(header: &[u8], body: &[u8]) -> Vec<u8> {
    let secs = mac(body, &NOW.to_string());
    let millis = mac(body, &NOW_MS.to_string());
    let replacements = [
        ("{hexms}", hex::encode(millis)),
        ("{hex}", hex::encode(secs)),
        ("{HEX}", hex::encode_upper(secs)),
        ("{b64}", STANDARD.encode(secs)),
        ("{b64url}", URL_SAFE_NO_PAD.encode(secs)),
    ];
    let mut out = header.to_vec();
    for (placeholder, value) in replacements {
        out = replace(&out, placeholder.as_bytes(), value.as_bytes());
    }
    out
}

fn replace(haystack: &[u8], needle: &[u8], with: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(haystack.len());
    let mut rest = haystack;
    while let Some(at) = rest.windows(needle.len()).position(|w| w == needle) {
        out.extend_from_slice(&rest[..at]);
        out.extend_from_slice(with);
        rest = &rest[at + needle.len()..];
    }
    out.extend_from_slice(rest);
    out
}

fn check(body: &Bytes, header: Option<&[u8]>, now: i64) -> Result<(), SignatureError> {
    verify(body.clone(), header, &[Secret::new(SECRET)], TOLERANCE, now).map(|verified| {
        assert_eq!(verified.bytes(), &body[..], "verify changed the body");
        let digest: [u8; 32] = Sha256::digest(body).into();
        assert_eq!(
            verified.digest(),
            digest,
            "digest is not the body's SHA-256"
        );
    })
}

fn check_request(header: Option<&[u8]>, body: &Bytes) {
    let result = check(body, header, NOW);

    for secrets in [&[][..], &[Secret::new("")][..]] {
        assert!(
            verify(body.clone(), header, secrets, TOLERANCE, NOW).is_err(),
            "accepted without a usable secret"
        );
    }

    let Ok(()) = result else { return };
    let Some(header) = header else {
        panic!("accepted without a header");
    };
    // The only MACs the fuzzer can present are the substituted ones (t = NOW or NOW_MS); any
    // acceptance without one of them in the header means verify accepted a forgery.
    let text = String::from_utf8_lossy(header).to_lowercase();
    let honest = [NOW.to_string(), NOW_MS.to_string()]
        .iter()
        .flat_map(|t| encodings(&mac(body, t)))
        .any(|encoded| text.contains(&encoded));
    assert!(
        honest,
        "accepted a header with no correct MAC for a fresh t"
    );

    // Both accepting MACs sign a time of NOW (in seconds), so the window is exactly NOW ± 300.
    let tolerance = TOLERANCE as i64;
    for now in [NOW - tolerance, NOW + tolerance] {
        assert_eq!(
            check(body, Some(header), now),
            Ok(()),
            "edge of tolerance at {now}"
        );
    }
    for now in [NOW - tolerance - 1, NOW + tolerance + 1] {
        assert_eq!(
            check(body, Some(header), now),
            Err(SignatureError::Stale),
            "outside tolerance at {now}"
        );
    }

    if !body.is_empty() {
        let mut tampered = body.to_vec();
        let at = tampered.len() / 2;
        tampered[at] ^= 0x01;
        assert!(
            check(&Bytes::from(tampered), Some(header), NOW).is_err(),
            "accepted a changed body"
        );
    }

    let resigned = sign(body, SECRET, NOW);
    assert_eq!(
        check(body, Some(resigned.as_bytes()), NOW),
        Ok(()),
        "an accepted body does not verify once re-signed"
    );
}

fn check_round_trip(body: &Bytes) {
    // A `t` derived from the input, anywhere in the window, in seconds and in milliseconds.
    let offset = (body.len() % (2 * TOLERANCE as usize + 1)) as i64 - TOLERANCE as i64;
    let millis = (body.iter().map(|b| i64::from(*b)).sum::<i64>()) % 1000;
    for t in [NOW, NOW + offset, (NOW + offset) * 1000 + millis] {
        let header = sign(body, SECRET, t);
        let expected = format!("t={t},v1={}", hex::encode(mac(body, &t.to_string())));
        assert_eq!(header, expected, "sign disagrees with the contract's HMAC");
        assert_eq!(
            check(body, Some(header.as_bytes()), NOW),
            Ok(()),
            "sign -> verify failed for t={t}"
        );
        assert_eq!(
            verify(
                body.clone(),
                Some(header.as_bytes()),
                &[Secret::new("other")],
                TOLERANCE,
                NOW
            )
            .map(|_| ()),
            Err(SignatureError::Mismatch),
            "accepted with the wrong secret"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let (header, body) = match data.iter().position(|b| *b == b'\n') {
        Some(newline) => (Some(&data[..newline]), &data[newline + 1..]),
        None => (None, data),
    };
    let header = header.map(|header| substitute(header, body));
    let body = Bytes::copy_from_slice(body);
    check_request(header.as_deref(), &body);
    check_round_trip(&body);
});
