//! The pipeline from verified bytes to what the queue stores (contract §10): the source's
//! transform, then [`translate`] on each of its outputs. The webhook handler, dead-letter
//! replay and preview all call [`prepare`], so a replay or a preview does exactly what a
//! fresh delivery does under the configuration in force.
//!
//! No transform, or exactly `.`: the body is translated in-process, as it was received, with
//! no worker involved. Otherwise the body goes to a transform worker ([`Transforms`]) and:
//! - each output object is decoded and mapped as if Userpilot had sent it, and the records of
//!   all outputs are concatenated (the caller commits them in one webhook). Output 0 keeps the
//!   webhook's digest (so `.` and no transform give the same idempotency keys); output `i > 0`
//!   maps with `sha256(digest || "\n" || i)` so its keys differ. If any output cannot be
//!   mapped, the whole webhook is quarantined with that output's reason, so a replay after a
//!   fix repairs it whole;
//! - no output: [`Prepared::Filtered`], nothing is queued;
//! - a non-object output, a runtime error, a run over 100 ms or a worker that died: the
//!   webhook is quarantined as `transform_error` with the error in its detail.
//!
//! It must not decide HTTP answers (the handler does) nor touch the queue.

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

use crate::dead_letters::Reason;
use crate::queue::Content;
use crate::sources::Source;
use crate::transform::{PoolError, Transform, Transforms};
use crate::translate::{self, InvalidJson};
use crate::userpilot::Verified;

/// The longest error text kept in a `transform_error` letter's detail (a program's own
/// `error(.)` could carry the whole payload).
const MAX_DETAIL_CHARS: usize = 1000;

/// What a verified webhook becomes.
#[derive(Debug)]
pub enum Prepared {
    /// Records to queue, or a quarantine reason: stored either way.
    Content(Content),
    /// The transform had no output: nothing to store (202 `filtered`).
    Filtered,
}

/// Why a webhook cannot be prepared now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrepareError {
    /// The body is not a JSON object: the sender's mistake (400, not stored).
    #[error("body is not a JSON object")]
    InvalidJson,
    /// Every transform worker is busy: try again later (503 + `Retry-After`).
    #[error("{0}")]
    Busy(String),
    /// The relay could not run the transform (no worker could start): its fault, try later.
    #[error("{0}")]
    Unavailable(String),
}

impl From<InvalidJson> for PrepareError {
    fn from(_: InvalidJson) -> Self {
        PrepareError::InvalidJson
    }
}

/// Turns a verified webhook of `source` into what the queue stores for it, running the
/// source's transform on the workers of `transforms` (the generation `source` belongs to).
pub async fn prepare(
    source: &Source,
    body: &Verified,
    received_at: DateTime<Utc>,
    transforms: &Transforms,
) -> Result<Prepared, PrepareError> {
    let slot = match &source.transform {
        Transform::Identity => {
            let content = translate::webhook(&source.mapper, body, received_at)?;
            return Ok(Prepared::Content(content));
        }
        Transform::Jq { slot, .. } => *slot,
    };
    let outputs = match transforms.run(slot, body.bytes()).await {
        Ok(outputs) => outputs,
        Err(PoolError::NotAnObject) => return Err(PrepareError::InvalidJson),
        Err(error @ PoolError::Busy(_)) => return Err(PrepareError::Busy(error.to_string())),
        Err(error @ PoolError::Spawn(_)) => {
            return Err(PrepareError::Unavailable(error.to_string()));
        }
        Err(error) => return Ok(Prepared::Content(transform_error(&error.to_string()))),
    };
    let outputs: Vec<&RawValue> = match serde_json::from_slice(&outputs) {
        Ok(outputs) => outputs,
        Err(error) => {
            return Ok(Prepared::Content(transform_error(&format!(
                "an output is not JSON: {error}"
            ))));
        }
    };
    if outputs.is_empty() {
        return Ok(Prepared::Filtered);
    }
    let digest = body.digest();
    let mut records = Vec::new();
    for (index, output) in outputs.iter().enumerate() {
        // The worker's output derives from verified bytes only; it is decoded as they are.
        let output = Verified::from_queue(Bytes::copy_from_slice(output.get().as_bytes()));
        let key = output_digest(&digest, index);
        match translate::webhook_as(&source.mapper, &output, &key, received_at) {
            Ok(Content::Records(mapped)) => records.extend(mapped),
            Ok(quarantined @ Content::Quarantined { .. }) => {
                return Ok(Prepared::Content(quarantined));
            }
            Err(InvalidJson) => {
                return Ok(Prepared::Content(transform_error(&format!(
                    "output {index} is not a JSON object"
                ))));
            }
        }
    }
    Ok(Prepared::Content(Content::Records(records)))
}

/// The digest output `index` maps under: the webhook's own for output 0.
pub fn output_digest(digest: &[u8; 32], index: usize) -> [u8; 32] {
    if index == 0 {
        return *digest;
    }
    let mut hasher = Sha256::new();
    hasher.update(digest);
    hasher.update(b"\n");
    hasher.update(index.to_string().as_bytes());
    hasher.finalize().into()
}

fn transform_error(detail: &str) -> Content {
    let detail = match detail.char_indices().nth(MAX_DETAIL_CHARS) {
        Some((end, _)) => format!("{}…", &detail[..end]),
        None => detail.to_owned(),
    };
    Content::Quarantined {
        reason: Reason::TransformError.as_str().into(),
        detail,
        subject: String::new(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::disallowed_methods)] // measures real elapsed time against the deadline
    use std::time::{Duration, Instant};

    use chrono::TimeZone;
    use serde_json::{Value, json};

    use super::*;
    use crate::config::Settings;
    use crate::heap::wire::HeapRecord;
    use crate::secret::Secret;
    use crate::sources::Sources;
    use crate::userpilot::{sign, verify};

    const NOW: i64 = 1_726_742_461;

    /// One source `s` with `transform` (none: `None`); its workers are the test binary's.
    fn sources(transform: Option<&str>) -> Sources {
        let transform = transform.map_or(String::new(), |code| {
            format!("transform = {}\n", toml::Value::String(code.into()))
        });
        let settings = Settings::from_toml(&format!(
            "[sources.s]\nsecrets = [\"secret-s-0000000001\"]\napp_id = \"7\"\n{transform}"
        ))
        .unwrap();
        Sources::from_settings(&settings).unwrap()
    }

    fn verified(body: &str) -> Verified {
        let header = sign(body.as_bytes(), "secret-s-0000000001", NOW);
        verify(
            Bytes::copy_from_slice(body.as_bytes()),
            Some(header.as_bytes()),
            &[Secret::new("secret-s-0000000001")],
            300,
            NOW,
        )
        .unwrap()
    }

    async fn run(sources: &Sources, body: &Value) -> Result<Prepared, PrepareError> {
        let source = sources.get("s").unwrap();
        let received_at = Utc.timestamp_opt(NOW, 0).unwrap();
        prepare(
            source,
            &verified(&body.to_string()),
            received_at,
            sources.transforms(),
        )
        .await
    }

    fn flow(user_id: &str) -> Value {
        json!({"timestamp": NOW, "data": {"type": "flow", "action": "started", "flow_id": "f1",
            "user": {"user_id": user_id}}})
    }

    /// Track events as (key, event, identity).
    fn tracks(prepared: Prepared) -> Vec<(String, String, String)> {
        let Prepared::Content(Content::Records(records)) = prepared else {
            panic!("not records: {prepared:?}");
        };
        records
            .into_iter()
            .filter_map(|o| match &o.record {
                HeapRecord::Track(_) => {
                    let json: Value = serde_json::from_str(&o.record.to_json()).unwrap();
                    Some((
                        o.key.clone(),
                        json["event"].as_str().unwrap().to_owned(),
                        json["identity"].as_str().unwrap().to_owned(),
                    ))
                }
                _ => None,
            })
            .collect()
    }

    fn quarantined(prepared: Prepared) -> (String, String) {
        match prepared {
            Prepared::Content(Content::Quarantined { reason, detail, .. }) => (reason, detail),
            other => panic!("not quarantined: {other:?}"),
        }
    }

    #[tokio::test]
    async fn no_transform_and_identity_map_in_process_with_the_same_keys() {
        let none = tracks(run(&sources(None), &flow("u1")).await.unwrap());
        let identity = sources(Some(" . "));
        assert!(
            identity.transforms().is_empty(),
            "`.` must not start workers"
        );
        assert_eq!(tracks(run(&identity, &flow("u1")).await.unwrap()), none);
        assert_eq!(none.len(), 1);
    }

    #[tokio::test]
    async fn each_output_is_mapped_as_a_webhook_and_the_records_are_concatenated() {
        // A payload the decoder does not know, made right by the transform, twice over.
        let sources = sources(Some(
            ".events[] | {timestamp: .at, data: {type: \"flow\", action: .what, flow_id: \"f\", \
             user: {user_id: .who}}}",
        ));
        let body = json!({"events": [{"at": NOW, "what": "started", "who": "a"},
                                     {"at": NOW, "what": "completed", "who": "b"}]});
        let events = tracks(run(&sources, &body).await.unwrap());
        let identities: Vec<&str> = events.iter().map(|(_, _, id)| id.as_str()).collect();
        assert_eq!(identities, ["a", "b"]);
        assert_ne!(events[0].1, events[1].1);
        assert_ne!(events[0].0, events[1].0, "outputs must have distinct keys");
        // Output 0 keys as the webhook itself would.
        let digest = verified(&body.to_string()).digest();
        assert_eq!(output_digest(&digest, 0), digest);
        assert_ne!(output_digest(&digest, 1), digest);
    }

    #[tokio::test]
    async fn an_unmappable_output_quarantines_the_whole_webhook_with_its_reason() {
        let sources = sources(Some(".a, .b"));
        let body = json!({"a": flow("u1"), "b": {"data": {"type": "flow", "action": "started"}}});
        let (reason, _) = quarantined(run(&sources, &body).await.unwrap());
        assert_eq!(reason, "no_user_id");
    }

    #[tokio::test]
    async fn no_output_is_filtered() {
        let sources = sources(Some("select(.data.type != \"flow\")"));
        assert!(matches!(
            run(&sources, &flow("u1")).await,
            Ok(Prepared::Filtered)
        ));
    }

    #[tokio::test]
    async fn a_non_object_output_or_a_runtime_error_is_a_transform_error_with_its_text() {
        let (reason, detail) = quarantined(run(&sources(Some("., 1")), &flow("u")).await.unwrap());
        assert_eq!(
            (reason.as_str(), detail.as_str()),
            ("transform_error", "output 1 is a number, not an object")
        );
        let (reason, detail) = quarantined(
            run(&sources(Some("error(\"boom\")")), &flow("u"))
                .await
                .unwrap(),
        );
        assert_eq!(
            (reason.as_str(), detail.as_str()),
            ("transform_error", "jq error: boom")
        );
    }

    #[tokio::test]
    async fn a_body_that_is_not_a_json_object_is_refused_as_without_a_transform() {
        let sources = sources(Some("{x: 1}"));
        assert_eq!(
            run(&sources, &json!([1])).await.err(),
            Some(PrepareError::InvalidJson)
        );
    }

    #[tokio::test]
    async fn programs_that_never_end_are_transform_errors_within_the_deadline() {
        for program in ["def f: f; f", "until(false; .)"] {
            let sources = sources(Some(program));
            // The first run also starts the worker; the deadline counts from when it has one.
            let (reason, _) = quarantined(run(&sources, &json!({"warm": 1})).await.unwrap());
            assert_eq!(reason, "transform_error");
            let started = Instant::now();
            let (reason, detail) = quarantined(run(&sources, &flow("u")).await.unwrap());
            let took = started.elapsed();
            assert_eq!(reason, "transform_error", "{program}");
            assert!(detail.contains("longer than 100 ms"), "{program}: {detail}");
            assert!(took < Duration::from_millis(100) * 5, "{program}: {took:?}");
        }
    }

    #[tokio::test]
    async fn a_crashing_program_is_a_transform_error_and_the_next_webhook_is_served() {
        let sources = sources(Some("if .crash then (def f: 1 + f; f) else . end"));
        let (reason, detail) = quarantined(run(&sources, &json!({"crash": true})).await.unwrap());
        assert_eq!(reason, "transform_error");
        // Under load the recursion can meet the deadline before the end of its stack.
        assert!(
            detail.contains("worker died") || detail.contains("worker was killed"),
            "{detail}"
        );
        assert_eq!(tracks(run(&sources, &flow("u2")).await.unwrap()).len(), 1);
    }

    #[tokio::test]
    async fn repeat_is_capped_and_env_is_empty() {
        let (reason, detail) =
            quarantined(run(&sources(Some("repeat(.)")), &flow("u")).await.unwrap());
        assert_eq!(
            (reason.as_str(), detail.as_str()),
            ("transform_error", "more than 1000 outputs")
        );
        // `env` could otherwise copy the relay's secrets into an event property.
        let sources = sources(Some(".data.env_seen = (env | tostring)"));
        let Prepared::Content(Content::Records(records)) = run(&sources, &flow("u")).await.unwrap()
        else {
            panic!("not mapped");
        };
        let track = records[0].record.to_json();
        assert!(track.contains(r#""env_seen":"{}""#), "{track}");
    }
}
