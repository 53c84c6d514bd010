//! A webhook's records packed into one value of its own row (schema version 6), so that storing
//! a webhook is one row: no record row and none of the records' index entries are written on
//! the request path. The forwarder unpacks them into record rows when it claims from the
//! webhook's lane (`writer::unpack_some`); only from then on does a record have a state,
//! attempts and an id of its own.
//!
//! The format is private to this file and versioned by its first byte: the version, the id the
//! first record takes (taken from the file's counter at arrival, so that record ids follow
//! arrival whenever records become rows), then each record as its kind (one byte), its subject
//! and JSON (each a LEB128 length and the UTF-8 bytes), and its key. Keys repeat what the row holds already, so they are stored as a
//! reference where they can be: a track event's key is its JSON's `idempotency_key` (stored as
//! its offset and length in the JSON), a property record's is a prefix and the webhook's hex digest
//! (stored as the prefix); any other key is stored as it is. That is about 130 of a flow
//! webhook's bytes. The subject is stored as the records table would store it
//! ([`crate::queue::prepared::storable`]), so an erasure's byte match finds it alike.

use crate::heap::wire::RecordKind;
use crate::queue::prepared::Row;

/// The format written; the only one read.
const VERSION: u8 = 1;

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("packed records are damaged: {0}")]
pub(super) struct Damaged(&'static str);

fn kind_code(kind: RecordKind) -> u8 {
    match kind {
        RecordKind::Track => 0,
        RecordKind::User => 1,
        RecordKind::Account => 2,
    }
}

fn kind_of(code: u8) -> Option<RecordKind> {
    match code {
        0 => Some(RecordKind::Track),
        1 => Some(RecordKind::User),
        2 => Some(RecordKind::Account),
        _ => None,
    }
}

/// How a key is stored: its bytes, or where else in the row they are.
const KEY_LITERAL: u8 = 0;
/// The key is the JSON's bytes at an offset, of a length (a track event's `idempotency_key`).
const KEY_IN_JSON: u8 = 1;
/// The key is a stored prefix followed by the webhook's hex digest (`user:…`, `account:…`).
const KEY_DIGEST_SUFFIX: u8 = 2;

/// The bit of `kind` in a webhook's `packed_kinds`.
pub(super) fn kind_bit(kind: RecordKind) -> i64 {
    1 << kind_code(kind)
}

/// The records of a packed webhook, and the id the first takes.
pub(super) struct Unpacked {
    pub first_id: i64,
    pub rows: Vec<Row>,
}

/// `rows` of the webhook whose body has `digest`, their ids from `first_id` on, as one value.
pub(super) fn pack(rows: &[&Row], digest: &[u8; 32], first_id: i64) -> Vec<u8> {
    let hex_digest = hex::encode(digest);
    let size: usize = rows
        .iter()
        .map(|row| 16 + row.key.len() + row.subject.len() + row.json.len())
        .sum();
    let mut out = Vec::with_capacity(10 + size);
    out.push(VERSION);
    // Ids are positive (the counter starts at 1); a negative one is stored as 0 and refused.
    put_len(&mut out, usize::try_from(first_id).unwrap_or(0));
    for row in rows {
        out.push(kind_code(row.kind));
        put_text(&mut out, &row.subject);
        put_text(&mut out, &row.json);
        if let Some(prefix) = row.key.strip_suffix(&hex_digest) {
            out.push(KEY_DIGEST_SUFFIX);
            put_text(&mut out, prefix);
        } else if let Some(at) = row.json.find(&row.key).filter(|_| row.key.len() > 2) {
            out.push(KEY_IN_JSON);
            put_len(&mut out, at);
            put_len(&mut out, row.key.len());
        } else {
            out.push(KEY_LITERAL);
            put_text(&mut out, &row.key);
        }
    }
    out
}

/// What [`pack`] was given, rows in order, for the webhook whose body has `digest`.
pub(super) fn unpack(mut bytes: &[u8], digest: &[u8; 32]) -> Result<Unpacked, Damaged> {
    match bytes.split_first() {
        Some((&VERSION, rest)) => bytes = rest,
        Some(_) => return Err(Damaged("unknown format version")),
        None => return Err(Damaged("empty")),
    }
    let first_id = i64::try_from(take_len(&mut bytes)?)
        .ok()
        .filter(|id| *id > 0)
        .ok_or(Damaged("no first record id"))?;
    let mut rows = Vec::new();
    while let Some((&code, rest)) = bytes.split_first() {
        bytes = rest;
        let kind = kind_of(code).ok_or(Damaged("unknown record kind"))?;
        let subject = take_text(&mut bytes)?;
        let json = take_text(&mut bytes)?;
        let (&how, rest) = bytes.split_first().ok_or(Damaged("truncated"))?;
        bytes = rest;
        let key = match how {
            KEY_LITERAL => take_text(&mut bytes)?,
            KEY_DIGEST_SUFFIX => take_text(&mut bytes)? + &hex::encode(digest),
            KEY_IN_JSON => {
                let at = take_len(&mut bytes)?;
                let len = take_len(&mut bytes)?;
                at.checked_add(len)
                    .and_then(|end| json.get(at..end))
                    .ok_or(Damaged("key outside the JSON"))?
                    .to_owned()
            }
            _ => return Err(Damaged("unknown key form")),
        };
        rows.push(Row {
            key,
            kind,
            subject,
            json,
        });
    }
    Ok(Unpacked { first_id, rows })
}

fn put_text(out: &mut Vec<u8>, text: &str) {
    put_len(out, text.len());
    out.extend_from_slice(text.as_bytes());
}

fn take_text(bytes: &mut &[u8]) -> Result<String, Damaged> {
    let len = take_len(bytes)?;
    if len > bytes.len() {
        return Err(Damaged("truncated"));
    }
    let (head, rest) = bytes.split_at(len);
    *bytes = rest;
    String::from_utf8(head.to_vec()).map_err(|_| Damaged("not UTF-8"))
}

fn put_len(out: &mut Vec<u8>, mut len: usize) {
    while len >= 0x80 {
        out.push((len as u8 & 0x7f) | 0x80);
        len >>= 7;
    }
    out.push(len as u8);
}

fn take_len(bytes: &mut &[u8]) -> Result<usize, Damaged> {
    let mut len: usize = 0;
    for shift in (0..usize::BITS).step_by(7) {
        let (&byte, rest) = bytes.split_first().ok_or(Damaged("truncated"))?;
        *bytes = rest;
        len |= usize::from(byte & 0x7f)
            .checked_shl(shift)
            .ok_or(Damaged("length too large"))?;
        if byte & 0x80 == 0 {
            return Ok(len);
        }
    }
    Err(Damaged("length too large"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const DIGEST: [u8; 32] = [0xab; 32];

    fn row(kind: RecordKind, key: &str, subject: &str, json: &str) -> Row {
        Row {
            key: key.into(),
            kind,
            subject: subject.into(),
            json: json.into(),
        }
    }

    fn fields(rows: &[Row]) -> Vec<(RecordKind, &str, &str, &str)> {
        rows.iter()
            .map(|r| (r.kind, &*r.key, &*r.subject, &*r.json))
            .collect()
    }

    fn refs(rows: &[Row]) -> Vec<&Row> {
        rows.iter().collect()
    }

    fn round_trip(rows: &[Row]) -> Vec<Row> {
        let unpacked = unpack(&pack(&refs(rows), &DIGEST, 41), &DIGEST).unwrap();
        assert_eq!(unpacked.first_id, 41);
        unpacked.rows
    }

    #[test]
    fn rows_come_back_in_order_with_every_field() {
        let long = "é".repeat(300); // lengths over 127 take two bytes
        let rows = vec![
            row(RecordKind::Track, "k1", "user@x.io", r#"{"event":"a"}"#),
            row(RecordKind::User, "k2", &long, "{}"),
            row(RecordKind::Account, "", "", ""),
        ];
        assert_eq!(fields(&round_trip(&rows)), fields(&rows));
        assert_eq!(round_trip(&[]).len(), 0);
    }

    #[test]
    fn keys_found_elsewhere_in_the_row_are_stored_as_references() {
        let hex = hex::encode(DIGEST);
        let json = r#"{"identity":"u","idempotency_key":"5f2c9a1e77d0b3c4","event":"x"}"#;
        let rows = vec![
            row(RecordKind::Track, "5f2c9a1e77d0b3c4", "u", json),
            row(RecordKind::User, &format!("user:{hex}"), "u", "{}"),
            row(RecordKind::User, "user:not-this-digest", "u", "{}"),
        ];
        let packed = pack(&refs(&rows), &DIGEST, 1);
        assert!(!packed.windows(hex.len()).any(|w| w == hex.as_bytes()));
        assert_eq!(
            packed
                .windows(16)
                .filter(|w| *w == b"5f2c9a1e77d0b3c4")
                .count(),
            1,
            "the track key only in its JSON"
        );
        assert_eq!(fields(&round_trip(&rows)), fields(&rows));
        // Another webhook's digest gives another key: the reference is to the row's digest.
        let other = unpack(&packed, &[0; 32]).unwrap().rows;
        assert!(other[1].key.ends_with(&hex::encode([0; 32])));
    }

    #[test]
    fn a_subject_is_stored_as_its_bytes_so_a_byte_match_finds_it() {
        let packed = pack(
            &[&row(RecordKind::Track, "k", "ada@example.com", "{}")],
            &DIGEST,
            1,
        );
        assert!(packed.windows(15).any(|w| w == b"ada@example.com"));
    }

    #[test]
    fn damage_is_an_error_never_a_panic_or_a_wrong_row() {
        let packed = pack(
            &[&row(RecordKind::Track, "key", "subject", "{}")],
            &DIGEST,
            1,
        );
        let unpack = |bytes: &[u8]| unpack(bytes, &DIGEST).err();
        assert_eq!(unpack(&[]), Some(Damaged("empty")));
        assert_eq!(unpack(&[9]), Some(Damaged("unknown format version")));
        assert_eq!(unpack(&[VERSION, 0]), Some(Damaged("no first record id")));
        assert_eq!(
            unpack(&packed[..packed.len() - 1]),
            Some(Damaged("truncated"))
        );
        let mut kind = packed.clone();
        kind[2] = 7; // after the version and the first id
        assert_eq!(unpack(&kind), Some(Damaged("unknown record kind")));
        let mut form = packed.clone();
        let at = packed.len() - 5; // the key's form, then its length and its 3 bytes
        form[at] = 9;
        assert_eq!(unpack(&form), Some(Damaged("unknown key form")));
        // A key at an offset beyond its JSON.
        assert_eq!(
            unpack(&[VERSION, 1, 0, 0, 2, b'{', b'}', KEY_IN_JSON, 1, 5]),
            Some(Damaged("key outside the JSON"))
        );
        assert_eq!(
            unpack(&[
                VERSION, 1, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff
            ]),
            Some(Damaged("length too large"))
        );
    }

    proptest! {
        #[test]
        fn any_rows_round_trip(
            rows in proptest::collection::vec(
                (0u8..3, ".{0,40}", ".{0,40}", ".{0,200}", any::<bool>()), 0..6)
        ) {
            let rows: Vec<Row> = rows
                .into_iter()
                .map(|(code, key, subject, json, embed)| Row {
                    kind: kind_of(code).unwrap(),
                    // Half of the keys inside their JSON, as track events' are.
                    json: if embed { format!("{json}{key}{json}") } else { json },
                    key,
                    subject,
                })
                .collect();
            let back = round_trip(&rows);
            prop_assert_eq!(fields(&back), fields(&rows));
        }

        #[test]
        fn any_bytes_unpack_or_fail_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = unpack(&bytes, &DIGEST);
        }
    }
}
