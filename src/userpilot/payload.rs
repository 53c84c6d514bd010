//! Tolerant decoding of a verified Userpilot webhook body into a typed [`Interaction`]
//! (SPEC §2.2). Userpilot publishes no schema, so every field is looked up in several places and
//! unknown fields are never an error. Pure: no I/O, no clock.

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use super::signature::Verified;

/// What kind of Userpilot content the interaction is about (SPEC §2.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Experience,
    Checklist,
    Nps,
    Form,
    FeatureTag,
    TrackedEvent,
    /// Any other kind, as sent (not normalized), for the generic `Userpilot K (a)` name.
    Other(String),
}

/// What happened (SPEC §2.2 actions, synonyms folded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Started,
    Step,
    Completed,
    Dismissed,
    TaskCompleted,
    AskLater,
    Score,
    Feedback,
    Submitted,
    Click,
    Hover,
    TextInput,
    /// Any other action, as sent (not normalized).
    Other(String),
}

/// The user the interaction belongs to.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct User {
    /// From the first of the SPEC's user id places that holds a string or number.
    pub id: Option<String>,
    /// Every field of the user object (`data.user`, else top-level `user`), as sent.
    pub properties: Map<String, Value>,
}

/// The company, when the payload carries one.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Company {
    /// `company_id`, else `id` (numbers become strings).
    pub id: Option<String>,
    /// Every field of the company object, as sent.
    pub properties: Map<String, Value>,
}

/// One decoded Userpilot webhook.
#[derive(Debug, Clone, PartialEq)]
pub struct Interaction {
    pub kind: Kind,
    pub action: Option<Action>,
    pub user: User,
    pub company: Option<Company>,
    pub content_id: Option<String>,
    pub content_name: Option<String>,
    /// The name of a button-tracked event (`data.event_name`, `event_name`, else the content
    /// name), used for `Userpilot Tracked Event (N)`.
    pub event_name: Option<String>,
    /// When it happened, from the payload; `None` when absent or unreadable.
    pub occurred_at: Option<DateTime<Utc>>,
    /// The `data` object (empty when the payload has none): the source of event properties.
    pub data: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("body is not valid JSON")]
    InvalidJson,
    #[error("body is JSON but not an object")]
    NotAnObject,
    #[error("no event kind in any known place")]
    NoKind,
}

/// Decodes a verified body. Only [`Verified`] bytes can be decoded, so nothing unverified is
/// ever parsed past the signature's timestamp fallback.
pub fn decode(body: &Verified) -> Result<Interaction, DecodeError> {
    todo!("{body:?}")
}
