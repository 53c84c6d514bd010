//! A webhook as both backends store it: its records serialized to the JSON Heap receives, on
//! the caller's task — so the thread or tasks that own a database connection only talk to the
//! database — and its text columns made storable everywhere.

use bytes::Bytes;

use super::{Content, Enqueued, NewWebhook};
use crate::heap::wire::RecordKind;
use crate::shapes::ShapeObservation;

/// A webhook ready to insert.
pub(crate) struct Prepared {
    pub source: String,
    pub app_id: String,
    pub digest: [u8; 32],
    pub body: Bytes,
    pub received_at_ms: i64,
    pub rows: Rows,
    pub shape: Option<StorableShape>,
}

/// A shape's columns as stored: its paths as a JSON array, its text storable.
pub(crate) struct StorableShape {
    pub key: [u8; 32],
    pub kind: Option<String>,
    pub action: Option<String>,
    pub paths: String,
    pub sample: Option<String>,
}

impl From<ShapeObservation> for StorableShape {
    fn from(shape: ShapeObservation) -> Self {
        StorableShape {
            key: shape.key,
            kind: shape.kind.map(storable),
            action: shape.action.map(storable),
            // A list of strings always serializes; the fallback is never taken.
            paths: storable(serde_json::to_string(&shape.paths).unwrap_or_default()),
            // JSON text escapes U+0000 itself.
            sample: shape.sample,
        }
    }
}

/// A webhook's records as stored.
pub(crate) enum Rows {
    Records(Vec<Row>),
    Quarantined {
        key: String,
        reason: String,
        detail: String,
        subject: String,
    },
}

pub(crate) struct Row {
    pub key: String,
    pub kind: RecordKind,
    pub subject: String,
    pub json: String,
}

/// `text` as a column can hold it: Postgres's TEXT refuses U+0000, which would make a webhook
/// naming such an identity fail on every redelivery. The columns are for lookups and for
/// people; the record's JSON, which is what Heap receives, keeps the character (escaped).
/// Both backends store the same, so they answer filters alike.
pub(crate) fn storable(text: String) -> String {
    if text.contains('\0') {
        text.replace('\0', "\u{FFFD}")
    } else {
        text
    }
}

impl Rows {
    pub fn new(content: Content, digest: &[u8; 32]) -> Self {
        match content {
            Content::Records(records) => Rows::Records(
                records
                    .into_iter()
                    .map(|outbound| Row {
                        kind: outbound.record.kind(),
                        subject: storable(outbound.record.subject().to_owned()),
                        json: outbound.record.to_json(),
                        key: outbound.key,
                    })
                    .collect(),
            ),
            Content::Quarantined {
                reason,
                detail,
                subject,
            } => Rows::Quarantined {
                key: format!("quarantine:{}", hex::encode(digest)),
                reason: storable(reason),
                detail: storable(detail),
                subject: storable(subject),
            },
        }
    }

    /// What a new webhook with these rows enqueued as, given its new track events.
    pub fn outcome(&self, events: usize) -> Enqueued {
        match self {
            Rows::Records(_) => Enqueued::Accepted { events },
            Rows::Quarantined { .. } => Enqueued::Quarantined,
        }
    }
}

impl From<NewWebhook> for Prepared {
    fn from(webhook: NewWebhook) -> Self {
        Prepared {
            rows: Rows::new(webhook.content, &webhook.digest),
            source: storable(webhook.source),
            app_id: storable(webhook.app_id),
            digest: webhook.digest,
            body: webhook.body,
            received_at_ms: webhook.received_at_ms,
            shape: webhook.shape.map(StorableShape::from),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_without_nul_is_kept_and_nul_becomes_the_replacement_character() {
        assert_eq!(storable("user@x.io".into()), "user@x.io");
        assert_eq!(storable("a\0b\0".into()), "a\u{FFFD}b\u{FFFD}");
    }
}
