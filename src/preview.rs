//! Preview (contract §10.3): what the relay would do with a payload under the configuration in
//! force — the Heap requests it would send, the reason it would quarantine the webhook, or
//! that the transform filters it out — without verifying a signature, queueing anything or
//! calling Heap. `userpilot-heap-relay preview`, `send-test --dry-run`, `POST /admin/preview`
//! and the console's preview page all answer from here; the last two through [`LivePreview`],
//! a serving relay's preview under the sources in force.
//!
//! A preview goes through the pipeline a delivery goes through ([`prepare`]), then builds the
//! bulk requests the way the forwarder does for the records of one webhook: one lane pass per
//! record kind in [`RecordKind::ALL`] order, property records merged per subject
//! (`forwarder::entries`), split into batches of the forwarder's batch size, each body made by
//! [`bulk_body`]. So what it shows is, byte for byte, what Heap would receive for that payload
//! delivered on its own.

use std::sync::Arc;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use crate::config::HeapSettings;
use crate::forwarder::entries::entries;
use crate::heap::wire::{Outbound, RecordKind, bulk_body};
use crate::ingest::{PrepareError, Prepared, prepare};
use crate::queue::{Claimed, Content};
use crate::sources::{Source, Sources};
use crate::transform::Transforms;
use crate::userpilot::Verified;

/// What the relay would do with a payload.
#[derive(Debug, Clone, PartialEq)]
pub enum Preview {
    /// Queued, then sent as these requests, in this order.
    Accepted { requests: Vec<HeapRequest> },
    /// Kept as a dead letter with this reason.
    Quarantined { reason: String, detail: String },
    /// The transform output nothing: answered 202 `filtered`, nothing queued.
    Filtered,
}

/// One bulk request as the forwarder would post it.
#[derive(Debug, Clone, PartialEq)]
pub struct HeapRequest {
    /// The path below `heap.base_url`, e.g. `/api/track`.
    pub endpoint: &'static str,
    /// The request body, parsed from the exact text that would be sent.
    pub body: Value,
}

impl Preview {
    /// The answer of `POST /admin/preview` and `preview` (contract §10.3).
    pub fn to_json(&self) -> Value {
        match self {
            Preview::Accepted { requests } => json!({
                "status": "accepted",
                "requests": requests
                    .iter()
                    .map(|r| json!({ "endpoint": r.endpoint, "body": r.body }))
                    .collect::<Vec<_>>(),
            }),
            Preview::Quarantined { reason, detail } => json!({
                "status": "quarantined",
                "reason": reason,
                "detail": detail,
            }),
            Preview::Filtered => json!({ "status": "filtered" }),
        }
    }
}

/// The most elements the forwarder puts in one bulk request: `heap.batch_max_events`, capped
/// by the app budget's burst (`heap.events_per_minute`), as `forwarder::limits` caps it.
/// Both keys need a restart, so the values the process started with are the ones in force.
pub fn batch_size(heap: &HeapSettings) -> usize {
    heap.batch_max_events.min(heap.events_per_minute).get() as usize
}

/// Previews `payload` as if `source` had received it, verified, at `received_at` (pass the
/// current time: event times default to the receipt time, and the preview shows them).
pub async fn preview(
    source: &Source,
    payload: Bytes,
    received_at: DateTime<Utc>,
    batch_size: usize,
    transforms: &Transforms,
) -> Result<Preview, PrepareError> {
    // Nothing previewed is queued or sent, so an unverified body can go through the pipeline.
    let body = Verified::for_preview(payload);
    Ok(
        match prepare(source, &body, received_at, transforms).await? {
            Prepared::Filtered => Preview::Filtered,
            Prepared::Content(Content::Quarantined { reason, detail, .. }) => {
                Preview::Quarantined { reason, detail }
            }
            Prepared::Content(Content::Records(records)) => Preview::Accepted {
                requests: requests(
                    source.app_id.as_str(),
                    records,
                    received_at.timestamp_millis(),
                    batch_size,
                ),
            },
        },
    )
}

/// A serving relay's preview as one source, under one snapshot of the sources in force (after
/// any reload) and the Heap settings the process started with: what `POST /admin/preview`
/// and the console's preview page both run. Made before the payload is read, so that an
/// unknown source is said first.
pub struct LivePreview {
    sources: Arc<Sources>,
    source: Arc<Source>,
    batch_size: usize,
}

/// Why a [`LivePreview`] made no preview of a payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LivePreviewError {
    #[error("the payload is not a JSON object")]
    InvalidJson,
    #[error(
        "the source's transform could not run now (no worker was free or could start): try again"
    )]
    Unavailable,
}

impl LivePreview {
    /// The preview as source `name` of `sources`; `None` when no such source is configured.
    pub fn new(sources: Arc<Sources>, name: &str, heap: &HeapSettings) -> Option<Self> {
        let source = sources.get(name)?.clone();
        Some(LivePreview {
            sources,
            source,
            batch_size: batch_size(heap),
        })
    }

    /// `payload` as the source would receive it at `now`.
    pub async fn run(
        &self,
        payload: Bytes,
        now: DateTime<Utc>,
    ) -> Result<Preview, LivePreviewError> {
        let transforms = self.sources.transforms();
        preview(&self.source, payload, now, self.batch_size, transforms)
            .await
            .map_err(|error| match error {
                PrepareError::InvalidJson => LivePreviewError::InvalidJson,
                busy @ (PrepareError::Busy(_) | PrepareError::Unavailable(_)) => {
                    tracing::warn!(error = %busy, "preview refused: no transform worker");
                    LivePreviewError::Unavailable
                }
            })
    }
}

/// The bulk requests that carry one webhook's `records` to app `app_id`.
fn requests(
    app_id: &str,
    records: Vec<Outbound>,
    received_at_ms: i64,
    batch_size: usize,
) -> Vec<HeapRequest> {
    // As the queue would hand them to the forwarder: ids in insert order, one receipt time.
    let claimed: Vec<Claimed> = records
        .into_iter()
        .enumerate()
        .map(|(i, outbound)| Claimed {
            id: i as i64 + 1,
            kind: outbound.record.kind(),
            // The queue stores subjects with U+0000 replaced (queue::prepared::storable), and
            // the merge groups by the stored subject.
            subject: outbound.record.subject().replace('\0', "\u{FFFD}"),
            json: outbound.record.to_json(),
            attempts: 0,
            received_at_ms,
            webhook_digest: [0; 32],
            webhook_received_at_ms: received_at_ms,
        })
        .collect();
    let mut requests = Vec::new();
    for kind in RecordKind::ALL {
        let of_kind: Vec<Claimed> = claimed.iter().filter(|r| r.kind == kind).cloned().collect();
        if of_kind.is_empty() {
            continue;
        }
        for batch in entries(kind, of_kind).chunks(batch_size.max(1)) {
            let jsons: Vec<&str> = batch.iter().map(|e| e.json.as_str()).collect();
            let text = bulk_body(app_id, kind, &jsons);
            // `bulk_body` joins JSON texts the mapper wrote, so this parses; `Null` would
            // show a bug rather than hide it.
            let body = serde_json::from_str(&text).unwrap_or(Value::Null);
            requests.push(HeapRequest {
                endpoint: kind.path(),
                body,
            });
        }
    }
    requests
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;
    use crate::config::{AppId, Settings};
    use crate::heap::mapping::{Mapper, MappingSettings};
    use crate::heap::wire::{HeapRecord, TrackEvent, UserProperties};

    const NOW: i64 = 1_726_742_461;

    fn source(user_properties: bool) -> Source {
        Source {
            name: "default".into(),
            path: "/webhooks/userpilot".into(),
            secrets: Vec::new(),
            tolerance_secs: 300,
            app_id: AppId::try_from("42".to_owned()).unwrap(),
            mapper: Mapper::new(
                "user_id",
                user_properties,
                false,
                &MappingSettings::default(),
            ),
            transform: crate::transform::Transform::Identity,
            api_key: None,
        }
    }

    fn at() -> DateTime<Utc> {
        Utc.timestamp_opt(NOW, 0).unwrap()
    }

    async fn preview_of(body: &str, user_properties: bool) -> Result<Preview, PrepareError> {
        preview(
            &source(user_properties),
            Bytes::copy_from_slice(body.as_bytes()),
            at(),
            100,
            &Transforms::default(),
        )
        .await
    }

    fn track(key: &str) -> Outbound {
        Outbound {
            key: key.into(),
            record: HeapRecord::Track(TrackEvent {
                identity: "u".into(),
                event: "e".into(),
                timestamp: "2024-09-19T10:41:01Z".into(),
                idempotency_key: key.into(),
                properties: Default::default(),
            }),
        }
    }

    fn user(identity: &str, property: &str, value: i64) -> Outbound {
        let mut properties = serde_json::Map::new();
        properties.insert(property.into(), value.into());
        Outbound {
            key: format!("u:{identity}:{property}"),
            record: HeapRecord::User(UserProperties {
                identity: identity.into(),
                properties,
            }),
        }
    }

    #[tokio::test]
    async fn a_payload_previews_as_the_track_then_the_user_request_the_forwarder_sends() {
        let body = r#"{"data": {"type": "flow", "action": "started", "flow_id": "f",
            "user": {"user_id": "u1", "plan": "pro"}}}"#;
        let Ok(Preview::Accepted { requests }) = preview_of(body, true).await else {
            panic!("not accepted");
        };
        let endpoints: Vec<&str> = requests.iter().map(|r| r.endpoint).collect();
        assert_eq!(endpoints, ["/api/track", "/api/add_user_properties"]);
        let track = &requests[0].body;
        assert_eq!(track["app_id"], "42");
        assert_eq!(track["events"][0]["identity"], "u1");
        // No event time in the payload: the receipt time, as a delivery would get.
        assert_eq!(track["events"][0]["timestamp"], "2024-09-19T10:41:01Z");
        assert!(
            track["events"][0]["idempotency_key"]
                .as_str()
                .is_some_and(|key| !key.is_empty())
        );
        assert_eq!(requests[1].body["users"][0]["properties"]["plan"], "pro");
    }

    #[tokio::test]
    async fn an_unmappable_payload_previews_as_quarantined_and_a_non_object_is_refused() {
        let preview = preview_of(r#"{"data": {"user": {"user_id": "u"}}}"#, false).await;
        let Ok(Preview::Quarantined { reason, detail }) = preview else {
            panic!("not quarantined: {preview:?}");
        };
        assert_eq!(reason, "no_kind");
        assert!(!detail.is_empty());
        assert_eq!(
            preview_of("[1]", false).await,
            Err(PrepareError::InvalidJson)
        );
        assert_eq!(preview_of("{", false).await, Err(PrepareError::InvalidJson));
    }

    #[test]
    fn records_are_batched_by_the_batch_size_and_properties_merged_per_subject() {
        let records = vec![
            track("k1"),
            user("a", "x", 1),
            track("k2"),
            user("b", "x", 2),
            track("k3"),
            user("a", "y", 3),
            user("a", "x", 4),
        ];
        let requests = requests("7", records, NOW * 1000, 2);
        let endpoints: Vec<&str> = requests.iter().map(|r| r.endpoint).collect();
        assert_eq!(
            endpoints,
            ["/api/track", "/api/track", "/api/add_user_properties"]
        );
        let keys = |body: &Value| -> Vec<String> {
            body["events"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["idempotency_key"].as_str().unwrap().to_owned())
                .collect()
        };
        assert_eq!(keys(&requests[0].body), ["k1", "k2"]);
        assert_eq!(keys(&requests[1].body), ["k3"]);
        assert_eq!(
            requests[2].body,
            json!({"app_id": "7", "users": [
                {"identity": "a", "properties": {"x": 4, "y": 3}},
                {"identity": "b", "properties": {"x": 2}},
            ]})
        );
    }

    #[tokio::test]
    async fn a_live_preview_is_the_preview_of_the_named_source_or_none() {
        let heap = Settings::from_toml("[heap]\napp_id = \"1\"\n[userpilot]\nsecrets = [\"s\"]")
            .unwrap()
            .heap;
        let sources = Arc::new(Sources::from_iter([source(true)]));
        assert!(LivePreview::new(sources.clone(), "other", &heap).is_none());
        let live = LivePreview::new(sources, "default", &heap).unwrap();
        let body = r#"{"data": {"type": "flow", "action": "started", "flow_id": "f",
            "user": {"user_id": "u1", "plan": "pro"}}}"#;
        let payload = || Bytes::copy_from_slice(body.as_bytes());
        assert_eq!(
            live.run(payload(), at()).await.unwrap(),
            preview(
                &source(true),
                payload(),
                at(),
                batch_size(&heap),
                &Transforms::default()
            )
            .await
            .unwrap()
        );
        assert_eq!(
            live.run(Bytes::from_static(b"[1]"), at()).await,
            Err(LivePreviewError::InvalidJson)
        );
    }

    #[test]
    fn the_batch_size_is_the_smaller_of_the_batch_and_the_app_budget() {
        let settings = |extra: &str| {
            Settings::from_toml(&format!(
                "[heap]\napp_id = \"1\"\n{extra}\n[userpilot]\nsecrets = [\"s\"]"
            ))
            .unwrap()
        };
        let both = settings("batch_max_events = 500\nevents_per_minute = 30");
        assert_eq!(batch_size(&both.heap), 30);
        let batch = settings("batch_max_events = 20");
        assert_eq!(batch_size(&batch.heap), 20);
    }
}
