//! Fuzzes the request path after the signature: `userpilot::decode` (contract §2.2),
//! `heap::mapping::Mapper::map` (§2.3–2.4) and `translate::webhook`, which combines them.
//!
//! The input is a webhook body. `decode` only takes `Verified` bytes, which only `verify`
//! makes, so the body is signed and verified first (which must always succeed).
//!
//! Oracles, beyond "never panics", on every record Heap would receive:
//! - track events: the name is non-empty, at most 1023 characters, and (without `[mapping]`)
//!   starts with `Userpilot`; the idempotency key is 64 lowercase hex characters, equal to the
//!   queue key, distinct per event, and independent of the receive time;
//! - properties: keys non-empty and at most 1023 characters, values strings (at most 1023
//!   characters) or numbers; track events carry `source = "userpilot"`; user and account
//!   properties never carry an `id` key;
//! - identities and account ids are non-blank, identities at most 255 characters;
//! - timestamps are RFC 3339 UTC (`…Z`), so Heap's ISO 8601 parser can read them;
//! - `prepare` says "invalid JSON" exactly when the body is not a JSON object, quarantines exactly
//!   when decoding or mapping fails (with a known reason), and otherwise yields the very records
//!   of `decode` + `map`.
#![no_main]

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use chrono::{DateTime, TimeZone, Utc};
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};
use userpilot_heap_relay::heap::mapping::{Mapper, MappingSettings};
use userpilot_heap_relay::heap::wire::{HeapRecord, Outbound};
use userpilot_heap_relay::translate::{self, InvalidJson};
use userpilot_heap_relay::queue::Content;
use userpilot_heap_relay::secret::Secret;
use userpilot_heap_relay::userpilot::{DecodeError, Verified, decode, sign, verify};

const NOW: i64 = 1_726_742_461;
const MAX_CHARS: usize = 1023;
const MAX_IDENTITY_CHARS: usize = 255;
const REASONS: [&str; 4] = ["no_kind", "no_user_id", "no_identity", "identity_too_long"];

fn received_at(offset_secs: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(NOW + offset_secs, 0)
        .single()
        .unwrap_or_else(|| unreachable!("a present-day time"))
}

/// The mappers exercised: the default one, one keyed by a user property, and one whose
/// `[mapping]` renames (to a name over Heap's limit) and drops events.
fn mappers() -> Vec<(&'static str, Mapper)> {
    let mapping = MappingSettings {
        rename: BTreeMap::from([
            (
                "Userpilot Experience (started)".to_owned(),
                "x".repeat(2000),
            ),
            (
                "Userpilot NPS (score)".to_owned(),
                "NPS answered".to_owned(),
            ),
        ]),
        drop: vec![
            "Userpilot NPS (feedback)".to_owned(),
            "NPS answered".to_owned(),
        ],
    };
    vec![
        (
            "default",
            Mapper::new("user_id", true, true, &MappingSettings::default()),
        ),
        (
            "by email",
            Mapper::new("email", true, false, &MappingSettings::default()),
        ),
        (
            "with [mapping]",
            Mapper::new("user_id", false, true, &mapping),
        ),
    ]
}

fn chars(text: &str) -> usize {
    text.chars().count()
}

fn check_properties(what: &str, properties: &Map<String, Value>) {
    for (key, value) in properties {
        assert!(!key.is_empty(), "{what}: empty property key");
        assert!(
            chars(key) <= MAX_CHARS,
            "{what}: property key over {MAX_CHARS} chars"
        );
        match value {
            Value::String(text) => assert!(
                chars(text) <= MAX_CHARS,
                "{what}: property {key:?} over {MAX_CHARS} chars"
            ),
            Value::Number(_) => {}
            other => panic!("{what}: property {key:?} is neither string nor number: {other}"),
        }
    }
}

fn check_identity(what: &str, identity: &str) {
    assert!(!identity.trim().is_empty(), "{what}: blank identity");
    assert!(
        chars(identity) <= MAX_IDENTITY_CHARS,
        "{what}: identity over {MAX_IDENTITY_CHARS} chars"
    );
}

fn is_key(key: &str) -> bool {
    key.len() == 64 && key.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn check_records(label: &str, records: &[Outbound], default_names: bool) {
    let mut keys = BTreeSet::new();
    for outbound in records {
        match &outbound.record {
            HeapRecord::Track(event) => {
                let what = format!("{label} track {:?}", event.event);
                assert!(!event.event.is_empty(), "{what}: empty event name");
                assert!(
                    chars(&event.event) <= MAX_CHARS,
                    "{what}: name over {MAX_CHARS} chars"
                );
                if default_names {
                    assert!(
                        event.event.starts_with("Userpilot"),
                        "{what}: not a Userpilot name"
                    );
                }
                assert!(
                    is_key(&event.idempotency_key),
                    "{what}: bad idempotency key"
                );
                assert_eq!(
                    outbound.key, event.idempotency_key,
                    "{what}: queue key differs"
                );
                check_identity(&what, &event.identity);
                check_properties(&what, &event.properties);
                assert_eq!(
                    event.properties.get("source"),
                    Some(&Value::from("userpilot")),
                    "{what}: no source property"
                );
                let time = DateTime::parse_from_rfc3339(&event.timestamp);
                assert!(
                    time.is_ok() && event.timestamp.ends_with('Z'),
                    "{what}: timestamp {:?} is not RFC 3339 UTC",
                    event.timestamp
                );
            }
            HeapRecord::User(user) => {
                let what = format!("{label} user");
                assert!(
                    outbound.key.starts_with("user:"),
                    "{what}: key {:?}",
                    outbound.key
                );
                check_identity(&what, &user.identity);
                check_properties(&what, &user.properties);
                assert!(!user.properties.is_empty(), "{what}: no properties");
                assert!(
                    !user.properties.keys().any(|k| k.eq_ignore_ascii_case("id")),
                    "{what}: an id property"
                );
            }
            HeapRecord::Account(account) => {
                let what = format!("{label} account");
                assert!(
                    outbound.key.starts_with("account:"),
                    "{what}: key {:?}",
                    outbound.key
                );
                assert!(!account.account_id.is_empty(), "{what}: empty account id");
                check_properties(&what, &account.properties);
                assert!(!account.properties.is_empty(), "{what}: no properties");
                assert!(
                    !account
                        .properties
                        .keys()
                        .any(|k| k.eq_ignore_ascii_case("id")),
                    "{what}: an id property"
                );
            }
        }
        // Renames may merge two events into one name (the queue then keeps one); otherwise
        // every record has its own key.
        if default_names {
            assert!(
                keys.insert(outbound.key.clone()),
                "{label}: duplicate key {}",
                outbound.key
            );
        }
    }
}

fn verified(body: &[u8]) -> Verified {
    let header = sign(body, "s", NOW);
    verify(
        Bytes::copy_from_slice(body),
        Some(header.as_bytes()),
        &[Secret::new("s")],
        300,
        NOW,
    )
    .unwrap_or_else(|error| panic!("a freshly signed body did not verify: {error}"))
}

fuzz_target!(|body: &[u8]| {
    let verified = verified(body);
    let is_object = matches!(serde_json::from_slice::<Value>(body), Ok(Value::Object(_)));
    let decoded = decode(&verified);
    match &decoded {
        Err(DecodeError::InvalidJson | DecodeError::NotAnObject) => {
            assert!(!is_object, "decode refused a JSON object: {decoded:?}")
        }
        Err(DecodeError::NoKind) | Ok(_) => assert!(is_object, "decode accepted a non-object"),
    }
    assert_eq!(decode(&verified), decoded, "decode is not deterministic");

    for (label, mapper) in mappers() {
        let mapped = decoded
            .as_ref()
            .ok()
            .map(|interaction| mapper.map(interaction, &verified.digest(), received_at(0)));
        if let Some(Ok(records)) = &mapped {
            check_records(label, records, label != "with [mapping]");
            // Keys derive from the body alone, so a redelivery an hour later maps to the same.
            let later = decoded
                .as_ref()
                .ok()
                .map(|interaction| mapper.map(interaction, &verified.digest(), received_at(3600)));
            let keys = |records: &[Outbound]| -> Vec<String> {
                records.iter().map(|o| o.key.clone()).collect()
            };
            match later {
                Some(Ok(later)) => assert_eq!(keys(records), keys(&later), "{label}: keys vary"),
                other => panic!("{label}: mapping changed with the receive time: {other:?}"),
            }
        }

        match (translate::webhook(&mapper, &verified, received_at(0)), &mapped) {
            (Err(InvalidJson), _) => assert!(!is_object, "{label}: prepare refused an object"),
            (Ok(Content::Records(records)), Some(Ok(expected))) => {
                assert_eq!(
                    &records, expected,
                    "{label}: prepare differs from decode + map"
                )
            }
            (Ok(Content::Quarantined { reason, .. }), None) => {
                assert_eq!(
                    reason, "no_kind",
                    "{label}: undecodable but quarantined as {reason}"
                );
                assert!(is_object, "{label}: quarantined a non-object");
            }
            (Ok(Content::Quarantined { reason, .. }), Some(Err(unmappable))) => {
                assert_eq!(reason, unmappable.reason(), "{label}: quarantine reason");
                assert!(
                    REASONS.contains(&reason.as_str()),
                    "{label}: unknown reason {reason}"
                );
            }
            (other, mapped) => panic!("{label}: prepare gave {other:?} where map gave {mapped:?}"),
        }
    }
});
