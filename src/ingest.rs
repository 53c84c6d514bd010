//! The pure middle of the request path: verified bytes -> decoded [`Interaction`] -> Heap
//! records, or the reason the webhook must be quarantined. The webhook handler and dead-letter
//! replay both go through here, so a replay maps exactly as a fresh delivery would.
//!
//! [`Interaction`]: crate::userpilot::Interaction

use chrono::{DateTime, Utc};

use crate::heap::mapping::Mapper;
use crate::queue::Content;
use crate::userpilot::{DecodeError, Verified, decode};

/// The body is not a JSON object: the sender's mistake, answered 400 and not stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("body is not a JSON object")]
pub struct InvalidJson;

/// Maps a verified body to what the queue stores for it.
pub fn prepare(
    mapper: &Mapper,
    body: &Verified,
    received_at: DateTime<Utc>,
) -> Result<Content, InvalidJson> {
    let interaction = match decode(body) {
        Ok(interaction) => interaction,
        Err(DecodeError::InvalidJson | DecodeError::NotAnObject) => return Err(InvalidJson),
        Err(error @ DecodeError::NoKind) => {
            return Ok(Content::Quarantined {
                reason: "no_kind".into(),
                detail: error.to_string(),
                subject: String::new(),
            });
        }
    };
    Ok(
        match mapper.map(&interaction, &body.digest(), received_at) {
            Ok(records) => Content::Records(records),
            Err(unmappable) => Content::Quarantined {
                reason: unmappable.reason().into(),
                detail: unmappable.to_string(),
                subject: interaction.user.id.unwrap_or_default(),
            },
        },
    )
}
