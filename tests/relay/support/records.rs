//! Queue inputs for the queue tests: records of each kind and webhooks carrying them, built
//! directly (not through the mapper), so a test names exactly what it stores.

use bytes::Bytes;
use serde_json::Map;
use sha2::{Digest, Sha256};
use userpilot_heap_relay::heap::wire::{
    AccountProperties, HeapRecord, Outbound, TrackEvent, UserProperties,
};
use userpilot_heap_relay::queue::{Content, DEFAULT_SOURCE, NewWebhook};

pub use crate::support::APP_ID as APP;

/// A track event under idempotency key `key`.
pub fn track(key: &str, identity: &str) -> Outbound {
    Outbound {
        key: key.to_owned(),
        record: HeapRecord::Track(TrackEvent {
            identity: identity.to_owned(),
            event: "Userpilot Test".to_owned(),
            timestamp: "2023-11-14T22:13:20Z".to_owned(),
            idempotency_key: key.to_owned(),
            properties: Map::new(),
        }),
    }
}

/// User properties of `user-<key>`, under key `user:<key>`.
pub fn user(key: &str) -> Outbound {
    Outbound {
        key: format!("user:{key}"),
        record: HeapRecord::User(UserProperties {
            identity: format!("user-{key}"),
            properties: Map::new(),
        }),
    }
}

/// Account properties of `account-<key>`, under key `account:<key>`.
pub fn account(key: &str) -> Outbound {
    Outbound {
        key: format!("account:{key}"),
        record: HeapRecord::Account(AccountProperties {
            account_id: format!("account-{key}"),
            properties: Map::new(),
        }),
    }
}

/// A webhook on source `default` whose body is `body`, received at `at` (unix ms), mapped to
/// `records` in lane [`APP`].
pub fn webhook(body: &str, at: i64, records: Vec<Outbound>) -> NewWebhook {
    NewWebhook {
        source: DEFAULT_SOURCE.to_owned(),
        app_id: APP.to_owned(),
        digest: Sha256::digest(body.as_bytes()).into(),
        body: Bytes::from(body.to_owned()),
        received_at_ms: at,
        content: Content::Records(records),
        shape: None,
    }
}

/// A webhook that could not be mapped, kept as a dead letter.
pub fn quarantined(body: &str, at: i64, reason: &str, detail: &str, subject: &str) -> NewWebhook {
    NewWebhook {
        content: Content::Quarantined {
            reason: reason.to_owned(),
            detail: detail.to_owned(),
            subject: subject.to_owned(),
        },
        ..webhook(body, at, Vec::new())
    }
}

/// `webhook` posted to `source`, its records in lane `app_id`.
pub fn on(source: &str, app_id: &str, webhook: NewWebhook) -> NewWebhook {
    NewWebhook {
        source: source.to_owned(),
        app_id: app_id.to_owned(),
        ..webhook
    }
}

/// `webhook` carrying the shape of `payload` on its source (kind `form`, no action), with
/// the redacted sample: as the handler attaches it (contract §10.4).
pub fn shaped(webhook: NewWebhook, payload: &serde_json::Value) -> NewWebhook {
    use userpilot_heap_relay::shapes;
    let shape = shapes::of(payload, None, None);
    NewWebhook {
        shape: Some(shapes::ShapeObservation {
            key: shape.key(&webhook.source),
            kind: Some("form".into()),
            action: None,
            paths: shape.paths,
            sample: shapes::sample(payload, shapes::Samples::Redacted),
        }),
        ..webhook
    }
}
