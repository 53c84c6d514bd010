//! What goes into one element of a bulk request: a claimed record, or — for user and account
//! properties — every claimed record about the same identity or account, merged into one.
//!
//! Merging is what Heap would do with them one by one: properties accumulate, and where two
//! records set the same property the one received last wins. Done here it also makes that
//! order explicit (a retried older record sent after a newer one would otherwise undo it) and
//! turns, say, 5,000 property updates about 1,000 users into one request instead of five.

use serde_json::{Map, Value};

use crate::heap::wire::RecordKind;
use crate::queue::Claimed;

/// One element of a bulk request and the queue records it carries.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub ids: Vec<i64>,
    pub json: String,
    /// The most failed attempts of its records.
    pub attempts: u32,
}

impl Entry {
    fn single(record: Claimed) -> Self {
        Entry {
            ids: vec![record.id],
            json: record.json,
            attempts: record.attempts,
        }
    }
}

/// The entries for claimed records of `kind`: one per track event; one per subject for
/// property records, in the order each subject first appears.
pub fn entries(kind: RecordKind, records: Vec<Claimed>) -> Vec<Entry> {
    match kind {
        RecordKind::Track => records.into_iter().map(Entry::single).collect(),
        RecordKind::User | RecordKind::Account => merge_by_subject(records),
    }
}

fn merge_by_subject(records: Vec<Claimed>) -> Vec<Entry> {
    let mut subjects: Vec<(String, Vec<Claimed>)> = Vec::new();
    let mut index: std::collections::HashMap<String, usize> = Default::default();
    for record in records {
        match index.get(&record.subject) {
            Some(&at) => subjects[at].1.push(record),
            None => {
                index.insert(record.subject.clone(), subjects.len());
                subjects.push((record.subject.clone(), vec![record]));
            }
        }
    }
    let mut entries = Vec::with_capacity(subjects.len());
    for (_, mut group) in subjects {
        if group.len() == 1 {
            entries.extend(group.pop().map(Entry::single));
            continue;
        }
        group.sort_by_key(|record| (record.received_at_ms, record.id));
        match merge(&group) {
            Some(json) => entries.push(Entry {
                ids: group.iter().map(|record| record.id).collect(),
                attempts: group
                    .iter()
                    .map(|record| record.attempts)
                    .max()
                    .unwrap_or(0),
                json,
            }),
            // Not the shape the mapper writes: sent as they are, never altered.
            None => entries.extend(group.into_iter().map(Entry::single)),
        }
    }
    entries
}

/// `{"identity"|"account_id": ..., "properties": {...}}` records, oldest first, as one such
/// record whose properties are the union, later values winning.
fn merge(records: &[Claimed]) -> Option<String> {
    let mut merged: Option<Map<String, Value>> = None;
    for record in records {
        let Ok(Value::Object(mut object)) = serde_json::from_str(&record.json) else {
            return None;
        };
        let Some(Value::Object(properties)) = object.remove("properties") else {
            return None;
        };
        match &mut merged {
            None => {
                object.insert("properties".into(), Value::Object(properties));
                merged = Some(object);
            }
            Some(merged) => match merged.get_mut("properties") {
                Some(Value::Object(all)) => all.extend(properties),
                _ => return None,
            },
        }
    }
    merged.map(|object| Value::Object(object).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn record(id: i64, subject: &str, received_at_ms: i64, json: Value) -> Claimed {
        Claimed {
            id,
            kind: RecordKind::User,
            subject: subject.into(),
            json: json.to_string(),
            attempts: id as u32 % 3,
            received_at_ms,
            webhook_digest: [0; 32],
            webhook_received_at_ms: 0,
        }
    }

    fn user(id: i64, identity: &str, at: i64, properties: Value) -> Claimed {
        record(
            id,
            identity,
            at,
            json!({"identity": identity, "properties": properties}),
        )
    }

    fn parsed(entry: &Entry) -> Value {
        serde_json::from_str(&entry.json).unwrap()
    }

    #[test]
    fn track_events_are_never_merged() {
        let records = vec![
            user(1, "u1", 0, json!({"a": 1})),
            user(2, "u1", 0, json!({"a": 2})),
        ];
        let entries = entries(RecordKind::Track, records.clone());
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].json, records[0].json);
        assert_eq!(entries[1].ids, [2]);
    }

    #[test]
    fn property_records_of_one_subject_merge_with_the_latest_received_winning() {
        let entries = entries(
            RecordKind::User,
            vec![
                // Claimed out of receive order (4 is a retry of an older update).
                user(4, "u1", 100, json!({"plan": "pro", "seats": 3})),
                user(7, "u2", 150, json!({"plan": "free"})),
                user(2, "u1", 50, json!({"plan": "free", "email": "a@x"})),
                user(9, "u1", 200, json!({"seats": 5})),
            ],
        );
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].ids, [2, 4, 9]);
        assert_eq!(entries[0].attempts, 2);
        assert_eq!(
            parsed(&entries[0]),
            json!({"identity": "u1",
                   "properties": {"plan": "pro", "seats": 5, "email": "a@x"}})
        );
        assert_eq!(entries[1].ids, [7]);
        assert_eq!(
            parsed(&entries[1]),
            json!({"identity": "u2", "properties": {"plan": "free"}})
        );
    }

    #[test]
    fn account_records_merge_by_account_id() {
        let account = |id, at, properties| {
            record(
                id,
                "acme",
                at,
                json!({"account_id": "acme", "properties": properties}),
            )
        };
        let entries = entries(
            RecordKind::Account,
            vec![
                account(1, 1, json!({"tier": 1})),
                account(2, 2, json!({"tier": 2})),
            ],
        );
        assert_eq!(entries.len(), 1);
        assert_eq!(
            parsed(&entries[0]),
            json!({"account_id": "acme", "properties": {"tier": 2}})
        );
    }

    #[test]
    fn records_of_an_unexpected_shape_are_sent_unmerged() {
        let odd = record(2, "u1", 2, json!({"identity": "u1", "properties": "x"}));
        let entries = entries(
            RecordKind::User,
            vec![user(1, "u1", 1, json!({"a": 1})), odd.clone()],
        );
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[1].json, odd.json);
    }
}
