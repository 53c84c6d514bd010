//! A webhook's records packed into one value of its own row (schema version 6), so that storing
//! a webhook is one row: no record row and none of the records' index entries are written on
//! the request path. The forwarder unpacks them into record rows when it claims from the
//! webhook's lane (`writer::unpack_some`); only from then on does a record have a state,
//! attempts and an id of its own.
//!
//! The format is private to this file and versioned by its first byte. Version 2 (written):
//! - the version, the id the first record takes (taken from the file's counter at arrival, so
//!   that record ids follow arrival whenever records become rows) and the number of records;
//! - per record, its kind (one byte), its subject (a LEB128 length and the UTF-8 bytes), the
//!   length of its stored JSON and its key;
//! - then all the stored JSONs, concatenated and compressed as one LZ4 block against a
//!   dictionary: fragments every record repeats, then the webhook's body, whose values the
//!   records carry. A flow webhook's two records take about a quarter of their JSON's bytes.
//!
//! Keys repeat what the row holds already, so they are stored as a reference where they can
//! be. A track event's key is derived from the digest and its name: it is cut out of the
//! stored JSON and rebuilt ([`derived_key`]). Any other key found in its JSON is stored as its
//! offset and length there. A property record's key is a prefix and the webhook's hex digest
//! (stored as the prefix). Any other key is stored as it is.
//!
//! Subjects stay uncompressed and as the records table would store them
//! ([`crate::queue::prepared::storable`]): an erasure's byte match over the row finds them.
//! Version 1 (each JSON as it is, in its record's place; no count) is still read.

use std::borrow::Cow;

use sha2::{Digest, Sha256};

use crate::heap::wire::RecordKind;
use crate::queue::prepared::Row;

/// The format written: record JSONs compressed (version 2).
const VERSION: u8 = 2;
/// The first format, JSONs as they are (written by the first release of schema version 6);
/// still read.
const VERSION_PLAIN: u8 = 1;

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
/// The key is derived from the digest and the event's name ([`derived_key`]), and was cut out
/// of the stored JSON at an offset; the name is at an offset, of a length, in what is stored
/// (version 2).
const KEY_DERIVED: u8 = 3;

/// The bit of `kind` in a webhook's `packed_kinds`.
pub(super) fn kind_bit(kind: RecordKind) -> i64 {
    1 << kind_code(kind)
}

/// What the row holds beside its packed records, which the packing refers to: the digest (the
/// keys of property records end with it) and the body (the JSONs are compressed against it).
/// Both stay as they are while the records are packed: an erasure that empties the body
/// drops the packed records in the same statement.
#[derive(Clone, Copy)]
pub(super) struct Beside<'a> {
    pub digest: &'a [u8; 32],
    pub body: &'a [u8],
}

/// The records of a packed webhook, and the id the first takes.
pub(super) struct Unpacked {
    pub first_id: i64,
    pub rows: Vec<Row>,
}

/// `rows` of a webhook, their ids from `first_id` on, as one value.
pub(super) fn pack(rows: &[&Row], beside: Beside<'_>, first_id: i64) -> Vec<u8> {
    let hex_digest = hex::encode(beside.digest);
    let mut out = Vec::with_capacity(16 + rows.iter().map(|r| 16 + r.subject.len()).sum::<usize>());
    let mut jsons = Vec::with_capacity(rows.iter().map(|row| row.json.len()).sum());
    out.push(VERSION);
    // Ids are positive (the counter starts at 1); a negative one is stored as 0 and refused.
    put_len(&mut out, usize::try_from(first_id).unwrap_or(0));
    put_len(&mut out, rows.len());
    for row in rows {
        let (stored, key) = stored_form(row, beside.digest, &hex_digest);
        out.push(kind_code(row.kind));
        put_text(&mut out, &row.subject);
        put_len(&mut out, stored.len());
        put_key(&mut out, &key);
        jsons.extend_from_slice(&stored);
    }
    out.extend_from_slice(&lz4_flex::block::compress_with_dict(
        &jsons,
        &dictionary(beside.body),
    ));
    out
}

/// The JSON `row` is stored with, and how its key is: a reference where the row holds it
/// already.
fn stored_form<'a>(row: &'a Row, digest: &[u8; 32], hex_digest: &str) -> (Cow<'a, [u8]>, Key) {
    let json = row.json.as_bytes();
    if let Some(prefix) = row.key.strip_suffix(hex_digest) {
        return (json.into(), Key::DigestSuffix(prefix.to_owned()));
    }
    let Some(at) = row.json.find(&row.key).filter(|_| row.key.len() > 2) else {
        return (json.into(), Key::Literal(row.key.clone()));
    };
    let stripped = [&json[..at], &json[at + row.key.len()..]].concat();
    match event_name(&stripped)
        .filter(|name| derived_key(digest, &stripped[name.clone()]) == row.key)
    {
        Some(name) => (stripped.into(), Key::Derived { key_at: at, name }),
        None => {
            let len = row.key.len();
            (json.into(), Key::InJson { at, len })
        }
    }
}

fn put_key(out: &mut Vec<u8>, key: &Key) {
    match key {
        Key::Literal(key) => {
            out.push(KEY_LITERAL);
            put_text(out, key);
        }
        Key::InJson { at, len } => {
            out.push(KEY_IN_JSON);
            put_len(out, *at);
            put_len(out, *len);
        }
        Key::DigestSuffix(prefix) => {
            out.push(KEY_DIGEST_SUFFIX);
            put_text(out, prefix);
        }
        Key::Derived { key_at, name } => {
            out.push(KEY_DERIVED);
            put_len(out, *key_at);
            put_len(out, name.start);
            put_len(out, name.len());
        }
    }
}

/// Where a track event's name is in its JSON (the bytes between the quotes of `"event":"…"`),
/// as the mapper writes it. Any match is checked against the key before it is relied on.
fn event_name(json: &[u8]) -> Option<std::ops::Range<usize>> {
    const FIELD: &[u8] = b"\"event\":\"";
    let start = json.windows(FIELD.len()).position(|w| w == FIELD)? + FIELD.len();
    let len = json[start..].iter().position(|&b| b == b'"')?;
    Some(start..start + len)
}

/// A track event's idempotency key as the mapper derives it from the body's digest and the
/// event's name (`hex(sha256(digest || "\n" || name))`), here as part of the format: a key
/// stored as derived is rebuilt this way, whatever the mapper does in a later version.
fn derived_key(digest: &[u8; 32], name: &[u8]) -> String {
    let mut hasher = Sha256::new();
    hasher.update(digest);
    hasher.update(b"\n");
    hasher.update(name);
    hex::encode(hasher.finalize())
}

/// What [`pack`] was given, rows in order, for the webhook holding `beside`.
pub(super) fn unpack(bytes: &[u8], beside: Beside<'_>) -> Result<Unpacked, Damaged> {
    let (first_id, headers, jsons) = headers(bytes)?;
    let jsons = match jsons {
        Jsons::Compressed(compressed) => {
            let len = headers.iter().try_fold(0usize, |sum, header| {
                sum.checked_add(header.json_len)
                    .ok_or(Damaged("length too large"))
            })?;
            // No allocation beyond what the block could hold: LZ4 writes at least one byte per
            // 255 it stands for (a damaged length is refused, not allocated).
            if len > compressed.len().saturating_mul(255).saturating_add(16) {
                return Err(Damaged("length too large"));
            }
            let dictionary = dictionary(beside.body);
            let jsons = lz4_flex::block::decompress_with_dict(compressed, len, &dictionary)
                .map_err(|_| Damaged("records do not decompress"))?;
            if jsons.len() != len {
                return Err(Damaged("records do not decompress"));
            }
            jsons
        }
        Jsons::Plain(jsons) => jsons,
    };
    let hex_digest = hex::encode(beside.digest);
    let mut rows = Vec::with_capacity(headers.len());
    // The JSONs are exactly as long as the headers say (checked above, or read from them).
    let mut rest = &jsons[..];
    for header in headers {
        let (stored, tail) = rest
            .split_at_checked(header.json_len)
            .ok_or(Damaged("truncated"))?;
        rest = tail;
        let mut stored = stored.to_vec();
        let key = match header.key {
            Key::Literal(key) => key,
            Key::Derived { key_at, name } => {
                let name = stored.get(name).ok_or(Damaged("name outside the JSON"))?;
                let key = derived_key(beside.digest, name);
                if key_at > stored.len() {
                    return Err(Damaged("key outside the JSON"));
                }
                stored.splice(key_at..key_at, key.bytes());
                key
            }
            Key::DigestSuffix(prefix) => prefix + &hex_digest,
            Key::InJson { at, len } => at
                .checked_add(len)
                .and_then(|end| stored.get(at..end))
                .ok_or(Damaged("key outside the JSON"))
                .and_then(|key| {
                    String::from_utf8(key.to_vec()).map_err(|_| Damaged("not UTF-8"))
                })?,
        };
        let json = String::from_utf8(stored).map_err(|_| Damaged("not UTF-8"))?;
        rows.push(Row {
            key,
            kind: header.kind,
            subject: header.subject,
            json,
        });
    }
    Ok(Unpacked { first_id, rows })
}

/// The subjects of packed records, in order, without the rest: what an erasure's scan
/// compares (they are never compressed).
pub(super) fn subjects(bytes: &[u8]) -> Result<Vec<String>, Damaged> {
    let (_, headers, _) = headers(bytes)?;
    Ok(headers.into_iter().map(|header| header.subject).collect())
}

/// A record as its packing starts: everything but its JSON's bytes.
struct Header {
    kind: RecordKind,
    subject: String,
    json_len: usize,
    key: Key,
}

enum Key {
    Literal(String),
    InJson {
        at: usize,
        len: usize,
    },
    DigestSuffix(String),
    Derived {
        key_at: usize,
        name: std::ops::Range<usize>,
    },
}

/// The records' JSONs, concatenated in order.
enum Jsons<'a> {
    /// Version 2: the bytes after the headers.
    Compressed(&'a [u8]),
    /// Version 1: each record's JSON was in its header's place.
    Plain(Vec<u8>),
}

/// The first record id, the records' headers and their JSONs.
fn headers(mut bytes: &[u8]) -> Result<(i64, Vec<Header>, Jsons<'_>), Damaged> {
    let version = match bytes.split_first() {
        Some((&version @ (VERSION | VERSION_PLAIN), rest)) => {
            bytes = rest;
            version
        }
        Some(_) => return Err(Damaged("unknown format version")),
        None => return Err(Damaged("empty")),
    };
    let first_id = i64::try_from(take_len(&mut bytes)?)
        .ok()
        .filter(|id| *id > 0)
        .ok_or(Damaged("no first record id"))?;
    let count = match version {
        VERSION => Some(take_len(&mut bytes)?),
        _ => None,
    };
    let mut headers = Vec::new();
    let mut plain = Vec::new();
    while count.map_or(!bytes.is_empty(), |count| headers.len() < count) {
        let (&code, rest) = bytes.split_first().ok_or(Damaged("truncated"))?;
        bytes = rest;
        let kind = kind_of(code).ok_or(Damaged("unknown record kind"))?;
        let subject = take_text(&mut bytes)?;
        let json_len = match version {
            VERSION => take_len(&mut bytes)?,
            _ => {
                let json = take_text(&mut bytes)?;
                plain.extend_from_slice(json.as_bytes());
                json.len()
            }
        };
        let (&how, rest) = bytes.split_first().ok_or(Damaged("truncated"))?;
        bytes = rest;
        let key = match how {
            KEY_LITERAL => Key::Literal(take_text(&mut bytes)?),
            KEY_DIGEST_SUFFIX => Key::DigestSuffix(take_text(&mut bytes)?),
            KEY_IN_JSON => Key::InJson {
                at: take_len(&mut bytes)?,
                len: take_len(&mut bytes)?,
            },
            KEY_DERIVED if version == VERSION => {
                let key_at = take_len(&mut bytes)?;
                let at = take_len(&mut bytes)?;
                let len = take_len(&mut bytes)?;
                let end = at.checked_add(len).ok_or(Damaged("length too large"))?;
                Key::Derived {
                    key_at,
                    name: at..end,
                }
            }
            _ => return Err(Damaged("unknown key form")),
        };
        headers.push(Header {
            kind,
            subject,
            json_len,
            key,
        });
    }
    let jsons = match version {
        VERSION => Jsons::Compressed(bytes),
        _ => Jsons::Plain(plain),
    };
    Ok((first_id, headers, jsons))
}

/// What record JSONs are compressed against: a few fragments every Heap record repeats, then
/// the webhook's body, whose values the records carry (the last 64 KiB, LZ4's window).
fn dictionary(body: &[u8]) -> Vec<u8> {
    let mut dictionary = Vec::with_capacity(COMMON.len() + body.len());
    dictionary.extend_from_slice(COMMON);
    dictionary.extend_from_slice(body);
    let window = dictionary.len().saturating_sub(64 << 10);
    dictionary.split_off(window)
}

/// Fragments of the JSON the mapper writes for every record, so that a webhook's first
/// record does not spell them out. Changing it changes how version 2 reads: never edit it;
/// a new dictionary is a new version.
const COMMON: &[u8] = b"{\"account_id\":\"{\"identity\":\"\",\"event\":\"Userpilot Tracked Event (\
    Userpilot NPS (Userpilot Form (Userpilot Feature Tag (Userpilot Checklist (Userpilot Experience (\
    \",\"timestamp\":\"20\",\"idempotency_key\":\"\",\"properties\":{\"action\":\"\
    \"source\":\"userpilot\",\"type\":\"\"}}";

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
    const BODY: &[u8] = br#"{"timestamp":1764000000,"data":{"type":"flow","action":"started","flow_id":"fl_1","flow_name":"Onboarding","user":{"user_id":"ada-77","email":"ada-77@example.com","plan":"pro"},"hostname":"app.example.com","sample":"0f6c2b0e-5a3d-4d7e-9c1b-2f8e6a4d9b11"}}"#;

    fn beside() -> Beside<'static> {
        Beside {
            digest: &DIGEST,
            body: BODY,
        }
    }

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
        let unpacked = unpack(&pack(&refs(rows), beside(), 41), beside()).unwrap();
        assert_eq!(unpacked.first_id, 41);
        unpacked.rows
    }

    fn contains(haystack: &[u8], needle: &str) -> usize {
        haystack
            .windows(needle.len())
            .filter(|w| *w == needle.as_bytes())
            .count()
    }

    /// The records the mapper makes of [`BODY`], as it writes them.
    fn flow_rows() -> Vec<Row> {
        let key = derived_key(&DIGEST, b"Userpilot Experience (started)");
        let track = format!(
            r#"{{"identity":"ada-77","event":"Userpilot Experience (started)","timestamp":"2025-11-24T16:00:00Z","idempotency_key":"{key}","properties":{{"action":"started","flow_id":"fl_1","flow_name":"Onboarding","hostname":"app.example.com","sample":"0f6c2b0e-5a3d-4d7e-9c1b-2f8e6a4d9b11","source":"userpilot","type":"flow"}}}}"#
        );
        let user =
            r#"{"identity":"ada-77","properties":{"email":"ada-77@example.com","plan":"pro"}}"#;
        vec![
            row(RecordKind::Track, &key, "ada-77", &track),
            row(
                RecordKind::User,
                &format!("user:{}", hex::encode(DIGEST)),
                "ada-77",
                user,
            ),
        ]
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
        assert_eq!(fields(&round_trip(&flow_rows())), fields(&flow_rows()));
    }

    #[test]
    fn a_webhooks_records_take_a_fraction_of_their_json() {
        let rows = flow_rows();
        let json: usize = rows.iter().map(|r| r.json.len() + r.key.len()).sum();
        let packed = pack(&refs(&rows), beside(), 1).len();
        assert!(packed * 3 < json, "{packed} bytes packed of {json}");
    }

    #[test]
    fn keys_found_elsewhere_in_the_row_are_stored_as_references() {
        let hex = hex::encode(DIGEST);
        let rows = flow_rows();
        let packed = pack(&refs(&rows), beside(), 1);
        assert_eq!(contains(&packed, &hex), 0, "the digest is the row's");
        assert_eq!(
            contains(&packed, &rows[0].key),
            0,
            "a derived key is rebuilt"
        );
        // A key derived from another digest (a transform's second output) is found in its
        // JSON; one found nowhere is stored as it is.
        let other = derived_key(&[1; 32], b"x");
        let json = format!(r#"{{"event":"x","idempotency_key":"{other}"}}"#);
        let rows = vec![
            row(RecordKind::Track, &other, "u", &json),
            row(RecordKind::User, "user:not-this-digest", "u", "{}"),
        ];
        assert_eq!(fields(&round_trip(&rows)), fields(&rows));
        // Another webhook's digest gives another key: the reference is to the row's digest.
        let packed = pack(&refs(&flow_rows()), beside(), 1);
        let other = Beside {
            digest: &[0; 32],
            body: BODY,
        };
        let rows = unpack(&packed, other).unwrap().rows;
        assert!(rows[1].key.ends_with(&hex::encode([0; 32])));
        assert_ne!(rows[0].key, flow_rows()[0].key);
    }

    #[test]
    fn a_subject_is_stored_as_its_bytes_so_a_byte_match_finds_it() {
        let packed = pack(&refs(&flow_rows()), beside(), 1);
        assert_eq!(contains(&packed, "ada-77"), 2);
        assert_eq!(subjects(&packed).unwrap(), ["ada-77", "ada-77"]);
    }

    #[test]
    fn version_1_is_still_read() {
        // Version, first id 7, then one record: kind, subject, JSON, key form and key.
        let mut bytes = vec![
            VERSION_PLAIN,
            7,
            1,
            1,
            b'u',
            2,
            b'{',
            b'}',
            KEY_LITERAL,
            1,
            b'k',
        ];
        bytes.extend([0, 1, b'v', 10]);
        bytes.extend(br#"{"k":"ky"}"#);
        bytes.extend([KEY_IN_JSON, 6, 2]);
        let unpacked = unpack(&bytes, beside()).unwrap();
        assert_eq!(unpacked.first_id, 7);
        assert_eq!(
            fields(&unpacked.rows),
            [
                (RecordKind::User, "k", "u", "{}"),
                (RecordKind::Track, "ky", "v", r#"{"k":"ky"}"#)
            ]
        );
        assert_eq!(subjects(&bytes).unwrap(), ["u", "v"]);
    }

    #[test]
    fn damage_is_an_error_never_a_panic_or_a_wrong_row() {
        let packed = pack(&refs(&flow_rows()), beside(), 1);
        let unpack = |bytes: &[u8]| unpack(bytes, beside()).err();
        assert_eq!(unpack(&[]), Some(Damaged("empty")));
        assert_eq!(unpack(&[9]), Some(Damaged("unknown format version")));
        assert_eq!(unpack(&[VERSION, 0]), Some(Damaged("no first record id")));
        assert_eq!(unpack(&[VERSION, 1, 1]), Some(Damaged("truncated")));
        assert_eq!(
            unpack(&packed[..packed.len() - 1]),
            Some(Damaged("records do not decompress"))
        );
        let mut kind = packed.clone();
        kind[3] = 7; // after the version, the first id and the count
        assert_eq!(unpack(&kind), Some(Damaged("unknown record kind")));
        // Compressed against another body, the JSONs come back otherwise or not at all.
        let other = Beside {
            digest: &DIGEST,
            body: b"{}",
        };
        assert!(
            super::unpack(&packed, other)
                .map(|u| u.rows.len() != 2 || fields(&u.rows) != fields(&flow_rows()))
                .unwrap_or(true)
        );
        // A JSON length beyond what the block can hold is refused, not allocated.
        assert_eq!(
            unpack(&[
                VERSION,
                1,
                1,
                0,
                0,
                0xff,
                0xff,
                0xff,
                0x7f,
                KEY_LITERAL,
                0,
                0
            ]),
            Some(Damaged("length too large"))
        );
        assert_eq!(
            unpack(&[VERSION, 1, 1, 0, 0, 2, KEY_IN_JSON, 1, 5, 0x20, b'{', b'}']),
            Some(Damaged("key outside the JSON"))
        );
        assert_eq!(
            unpack(&[
                VERSION,
                1,
                1,
                0,
                0,
                2,
                KEY_DERIVED,
                0,
                1,
                5,
                0x20,
                b'{',
                b'}'
            ]),
            Some(Damaged("name outside the JSON"))
        );
        assert_eq!(
            unpack(&[VERSION, 1, 1, 0, 0, 2, 9, 0x20, b'{', b'}']),
            Some(Damaged("unknown key form"))
        );
        assert_eq!(
            unpack(&[
                VERSION, 1, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff
            ]),
            Some(Damaged("length too large"))
        );
    }

    proptest! {
        #[test]
        fn any_rows_round_trip(
            rows in proptest::collection::vec(
                (0u8..3, ".{0,40}", ".{0,40}", ".{0,200}", 0u8..3), 0..6),
            body in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let rows: Vec<Row> = rows
                .into_iter()
                .map(|(code, key, subject, json, form)| {
                    let (key, json) = match form {
                        // A key inside its JSON, as a transform output's track events have.
                        0 => (key.clone(), format!("{json}{key}{json}")),
                        // A key derived from the digest and the event's name, as the mapper's.
                        1 => {
                            let key = derived_key(&DIGEST, subject.as_bytes());
                            let json = format!(r#"{{"event":"{subject}","idempotency_key":"{key}"}}{json}"#);
                            (key, json)
                        }
                        _ => (key, json),
                    };
                    Row { kind: kind_of(code).unwrap(), json, key, subject }
                })
                .collect();
            let packed = pack(&refs(&rows), Beside { digest: &DIGEST, body: &body }, 3);
            let back = unpack(&packed, Beside { digest: &DIGEST, body: &body }).unwrap();
            prop_assert_eq!(back.first_id, 3);
            prop_assert_eq!(fields(&back.rows), fields(&rows));
        }

        #[test]
        fn any_bytes_unpack_or_fail_without_panicking(
            version in prop_oneof![Just(VERSION), Just(VERSION_PLAIN), any::<u8>()],
            bytes in proptest::collection::vec(any::<u8>(), 0..96),
        ) {
            let bytes = [&[version][..], &bytes].concat();
            let _ = unpack(&bytes, beside());
            let _ = subjects(&bytes);
        }
    }
}
