//! The pure middle of the request path, Userpilot translated into Heap: verified bytes ->
//! decoded [`Interaction`] -> Heap records, or the reason the webhook must be quarantined.
//! [`crate::ingest::prepare`] calls it (after the source's transform, if any) for the webhook
//! handler, dead-letter replay and preview alike, so a replay maps exactly as a fresh
//! delivery would.
//!
//! [`Interaction`]: crate::userpilot::Interaction

use chrono::{DateTime, Utc};

use crate::dead_letters::Reason;
use crate::heap::mapping::Mapper;
use crate::queue::Content;
use crate::userpilot::{DecodeError, Verified, decode};

/// The body is not a JSON object: the sender's mistake, answered 400 and not stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("body is not a JSON object")]
pub struct InvalidJson;

/// Translates a verified webhook body into what the queue stores for it.
pub fn webhook(
    mapper: &Mapper,
    body: &Verified,
    received_at: DateTime<Utc>,
) -> Result<Content, InvalidJson> {
    webhook_as(mapper, body, &body.digest(), received_at)
}

/// [`webhook`], with the records' idempotency keys derived from `digest` instead of the
/// body's own: a transform's outputs are mapped under keys derived from the webhook's digest.
pub fn webhook_as(
    mapper: &Mapper,
    body: &Verified,
    digest: &[u8; 32],
    received_at: DateTime<Utc>,
) -> Result<Content, InvalidJson> {
    let interaction = match decode(body) {
        Ok(interaction) => interaction,
        Err(DecodeError::InvalidJson | DecodeError::NotAnObject) => return Err(InvalidJson),
        Err(error @ DecodeError::NoKind) => {
            return Ok(Content::Quarantined {
                reason: Reason::NoKind.as_str().into(),
                detail: error.to_string(),
                subject: String::new(),
            });
        }
    };
    Ok(match mapper.map(&interaction, digest, received_at) {
        Ok(records) => Content::Records(records),
        Err(unmappable) => Content::Quarantined {
            reason: unmappable.reason().into(),
            detail: unmappable.to_string(),
            subject: interaction.user.id.unwrap_or_default(),
        },
    })
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use chrono::TimeZone;
    use serde_json::Value;

    use super::*;
    use crate::heap::mapping::MappingSettings;
    use crate::heap::wire::HeapRecord;
    use crate::secret::Secret;
    use crate::userpilot::{sign, verify};

    const NOW: i64 = 1_726_742_461;

    fn verified(body: &str) -> Verified {
        let header = sign(body.as_bytes(), "s", NOW);
        verify(
            Bytes::copy_from_slice(body.as_bytes()),
            Some(header.as_bytes()),
            &[Secret::new("s")],
            300,
            NOW,
        )
        .unwrap()
    }

    fn received_at() -> DateTime<Utc> {
        Utc.timestamp_opt(NOW, 0).unwrap()
    }

    /// The records `body` maps to with user and account properties on, as Heap JSON.
    fn records(body: &str) -> Vec<Value> {
        let mapper = Mapper::new("user_id", true, true, &MappingSettings::default());
        match webhook(&mapper, &verified(body), received_at()) {
            Ok(Content::Records(records)) => records
                .iter()
                .map(|o| serde_json::from_str(&o.record.to_json()).unwrap())
                .collect(),
            Ok(Content::Quarantined { reason, .. }) => panic!("quarantined as {reason}: {body}"),
            Err(InvalidJson) => panic!("refused: {body}"),
        }
    }

    #[test]
    fn numbers_beyond_f64_and_u64_are_mapped_not_refused() {
        let body = r#"{"timestamp": 1e400, "data": {"type": "nps", "score": 1e400,
            "ratio": 1.50, "count": 9007199254740993, "ok": 12,
            "user": {"user_id": 123456789012345678901234567890, "seats": -1e400},
            "company": {"company_id": 98765432109876543210987654321, "arr": 1e-400}}}"#;
        let records = records(body);
        assert_eq!(records.len(), 3, "{records:?}");
        let track = &records[0];
        assert_eq!(track["identity"], "123456789012345678901234567890");
        // No readable event time anywhere: the receive time.
        assert_eq!(track["timestamp"], "2024-09-19T10:41:01Z");
        let properties = track["properties"].to_string();
        for expected in [
            r#""score":"1e+400""#,
            r#""ratio":1.5"#,
            r#""count":"9007199254740993""#,
            r#""ok":12"#,
        ] {
            assert!(properties.contains(expected), "{expected} in {properties}");
        }
        assert_eq!(records[1]["identity"], "123456789012345678901234567890");
        assert_eq!(records[1]["properties"]["seats"], "-1e+400");
        assert_eq!(records[2]["account_id"], "98765432109876543210987654321");
        assert_eq!(records[2]["properties"]["arr"], "1e-400");
    }

    #[test]
    fn a_record_with_converted_numbers_survives_the_queues_json_unchanged() {
        // The queue stores `to_json` and the forwarder parses and re-serializes it: the text
        // Heap gets must be the text the mapper made.
        let body = r#"{"data": {"type": "form", "a": 1e400, "b": 0.1, "c": 1E2, "d": -0,
            "user": {"user_id": "u"}}}"#;
        let mapper = Mapper::new("user_id", false, false, &MappingSettings::default());
        let Ok(Content::Records(records)) = webhook(&mapper, &verified(body), received_at()) else {
            panic!("not mapped");
        };
        let stored = records[0].record.to_json();
        let reread: Value = serde_json::from_str(&stored).unwrap();
        let properties = reread["properties"].to_string();
        assert!(
            properties.starts_with(r#"{"a":"1e+400","b":0.1,"c":100.0,"d":-0,"#),
            "{properties}"
        );
        let HeapRecord::Track(event) = &records[0].record else {
            panic!("not a track event");
        };
        assert_eq!(
            properties,
            serde_json::to_string(&event.properties).unwrap()
        );
    }

    #[test]
    fn only_bodies_that_are_not_json_objects_are_refused() {
        let mapper = Mapper::new("user_id", false, false, &MappingSettings::default());
        for body in [
            "[1e400]",
            "1e400",
            "{\"a\": 1e400",
            "{\"a\": 01}",
            "{\"a\": 1.}",
        ] {
            assert_eq!(
                webhook(&mapper, &verified(body), received_at()).err(),
                Some(InvalidJson),
                "{body}"
            );
        }
    }
}
