//! Heap's bulk wire types: one element of `events`, `users` or `accounts`, and the request
//! bodies that carry them. These are also what the queue stores (as JSON), so a field added
//! here must stay optional for records written by an older version.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Heap property values are strings or numbers only; see [`crate::heap::properties`].
pub type Properties = Map<String, Value>;

/// One element of `POST /api/track`'s `events` array.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrackEvent {
    pub identity: String,
    pub event: String,
    /// ISO 8601, UTC.
    pub timestamp: String,
    pub idempotency_key: String,
    pub properties: Properties,
}

/// One element of `POST /api/add_user_properties`'s `users` array.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserProperties {
    pub identity: String,
    pub properties: Properties,
}

/// One element of `POST /api/add_account_properties`'s `accounts` array.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AccountProperties {
    pub account_id: String,
    pub properties: Properties,
}

/// Which Heap endpoint a record goes to. The queue keeps one lane per kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RecordKind {
    Track,
    User,
    Account,
}

impl RecordKind {
    pub const ALL: [RecordKind; 3] = [RecordKind::Track, RecordKind::User, RecordKind::Account];

    /// The stable name stored in the queue and used as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            RecordKind::Track => "track",
            RecordKind::User => "add_user_properties",
            RecordKind::Account => "add_account_properties",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.as_str() == name)
    }

    /// The path below `heap.base_url`.
    pub fn path(self) -> &'static str {
        match self {
            RecordKind::Track => "/api/track",
            RecordKind::User => "/api/add_user_properties",
            RecordKind::Account => "/api/add_account_properties",
        }
    }

    /// The name of the array in the bulk request body.
    pub fn array_field(self) -> &'static str {
        match self {
            RecordKind::Track => "events",
            RecordKind::User => "users",
            RecordKind::Account => "accounts",
        }
    }
}

/// A record bound for Heap, as the mapper produces it and the queue stores it.
#[derive(Debug, Clone, PartialEq)]
pub enum HeapRecord {
    Track(TrackEvent),
    User(UserProperties),
    Account(AccountProperties),
}

impl HeapRecord {
    pub fn kind(&self) -> RecordKind {
        match self {
            HeapRecord::Track(_) => RecordKind::Track,
            HeapRecord::User(_) => RecordKind::User,
            HeapRecord::Account(_) => RecordKind::Account,
        }
    }

    /// Who the record is about: the Heap identity, or the account id. Per-identity rate
    /// limits and dead-letter filters use it.
    pub fn subject(&self) -> &str {
        match self {
            HeapRecord::Track(event) => &event.identity,
            HeapRecord::User(user) => &user.identity,
            HeapRecord::Account(account) => &account.account_id,
        }
    }

    /// The record as the JSON object that goes into the bulk array.
    pub fn to_json(&self) -> String {
        // Serializing these plain structs cannot fail: all keys are strings.
        match self {
            HeapRecord::Track(e) => serde_json::to_string(e),
            HeapRecord::User(u) => serde_json::to_string(u),
            HeapRecord::Account(a) => serde_json::to_string(a),
        }
        .unwrap_or_default()
    }
}

/// A mapped record plus the key under which the queue deduplicates it. For track events the
/// key is the Heap `idempotency_key`; for property records it is derived from the same body
/// digest with a kind prefix.
#[derive(Debug, Clone, PartialEq)]
pub struct Outbound {
    pub key: String,
    pub record: HeapRecord,
}

/// Builds a bulk request body `{"app_id": ..., "<array>": [<raw json>, ...]}` from records
/// already serialized by the queue, without parsing them again.
pub fn bulk_body(app_id: &str, kind: RecordKind, records: &[&str]) -> String {
    let app_id = Value::String(app_id.to_owned()).to_string();
    let mut body = String::with_capacity(64 + records.iter().map(|r| r.len() + 1).sum::<usize>());
    body.push_str("{\"app_id\":");
    body.push_str(&app_id);
    body.push_str(",\"");
    body.push_str(kind.array_field());
    body.push_str("\":[");
    for (i, record) in records.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(record);
    }
    body.push_str("]}");
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bulk_body_is_valid_json_with_the_records_in_order() {
        let body = bulk_body("12\"3", RecordKind::User, &[r#"{"a":1}"#, r#"{"b":2}"#]);
        let value: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(value["app_id"], "12\"3");
        assert_eq!(value["users"], serde_json::json!([{"a":1},{"b":2}]));
    }

    #[test]
    fn record_kind_names_round_trip() {
        for kind in RecordKind::ALL {
            assert_eq!(RecordKind::parse(kind.as_str()), Some(kind));
        }
        assert_eq!(RecordKind::parse("nope"), None);
    }
}
