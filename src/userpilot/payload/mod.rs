//! Tolerant decoding of a verified Userpilot webhook body into a typed [`Interaction`]
//! (contract §2.2). Userpilot publishes no schema, so every field is looked up in several places
//! and unknown fields are never an error. Pure: no I/O, no clock.
//!
//! Numbers are kept exactly as written (serde_json's `arbitrary_precision`): a body is never
//! refused for a number (`1e400` is valid JSON), and a numeric id above u64 becomes its digits,
//! not a rounded float. The one change serde_json makes is to spell an exponent `e+N` or `e-N`
//! (`1E400` reads back as `1e+400`): the same number, written one way.
//!
//! This module owns the lookup orders and the synonym tables; it must not decide Heap event
//! names (that is `heap::mapping`) nor touch unverified bytes (only [`decode`] is public, and it
//! takes [`Verified`]).

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use super::signature::Verified;
use time::time;

#[cfg(test)]
mod tests;
mod time;

/// What kind of Userpilot content the interaction is about (contract §2.3).
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

/// What happened (contract §2.2 actions, synonyms folded).
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
    /// From the first of the contract's user id places that holds a string or number (a number
    /// as written).
    pub id: Option<String>,
    /// Every field of the user object (`data.user`, else top-level `user`), as sent.
    pub properties: Map<String, Value>,
}

/// The company, when the payload carries one.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Company {
    /// `company_id`, else `id` (numbers become strings, as written).
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
///
/// # Errors
///
/// [`DecodeError::InvalidJson`] or [`DecodeError::NotAnObject`] for a body that is not a JSON
/// object, and [`DecodeError::NoKind`] when no known place names the kind of event.
pub fn decode(body: &Verified) -> Result<Interaction, DecodeError> {
    decode_value(body.json().ok_or(DecodeError::InvalidJson)?)
}

/// A verified body parsed, with the kind and action [`decode`] would find in it and nothing
/// else decoded: what a payload shape is filed under (`crate::shapes`), on the parse
/// [`decode`] uses (kept with the body: [`Verified::json`]). The action is `None` when the kind
/// is (a body that does not decode has neither). `None` for a body that is not JSON.
pub fn kind_and_action(body: &Verified) -> Option<(&Value, Option<Kind>, Option<Action>)> {
    let value = body.json()?;
    let (kind, action) = match value {
        Value::Object(root) => match kind(root) {
            Some(kind) => (Some(kind), action(root)),
            None => (None, None),
        },
        _ => (None, None),
    };
    Some((value, kind, action))
}

/// A place in the body: object keys from the top level down.
type Path = &'static [&'static str];

// The lookup orders of contract §2.2, earliest place first. The first place holding a usable value
// wins; later places are fallbacks for shapes nobody has seen yet.

/// Kind as a whole string.
const KIND_PLACES: &[Path] = &[
    &["data", "type"],
    &["data", "event_type"],
    &["type"],
    &["event_type"],
];
/// Kind as the first segment of a `kind.action` / `kind:id:action` event string.
const KIND_EVENT_PLACES: &[Path] = &[&["event"], &["data", "event"]];
/// Action; a value with separators contributes its last segment.
const ACTION_PLACES: &[Path] = &[
    &["data", "action"],
    &["data", "status"],
    &["data", "state"],
    &["data", "event"],
    &["action"],
    &["status"],
];
/// Action fallback, used only when the top-level `event` has a separator: a bare `event` names
/// the kind, not the action.
const ACTION_EVENT_PLACE: Path = &["event"];
const USER_PLACES: &[Path] = &[&["data", "user"], &["user"]];
const USER_ID_PLACES: &[Path] = &[
    &["data", "user", "user_id"],
    &["data", "user", "id"],
    &["data", "user_id"],
    &["user", "user_id"],
    &["user_id"],
];
const COMPANY_PLACES: &[Path] = &[&["data", "company"], &["company"]];
const COMPANY_ID_PLACES: &[Path] = &[&["company_id"], &["id"]];
const CONTENT_ID_PLACES: &[Path] = &[
    &["data", "id"],
    &["data", "content_id"],
    &["data", "flow_id"],
    &["data", "experience_id"],
    &["data", "checklist_id"],
    &["data", "survey_id"],
    &["data", "form_id"],
    &["data", "feature_id"],
];
const CONTENT_NAME_PLACES: &[Path] = &[
    &["data", "name"],
    &["data", "title"],
    &["data", "content_name"],
    &["data", "flow_name"],
    &["data", "experience_name"],
    &["data", "checklist_name"],
    &["data", "feature_name"],
];
const EVENT_NAME_PLACES: &[Path] = &[&["data", "event_name"], &["event_name"]];
const TIME_PLACES: &[Path] = &[
    &["data", "timestamp"],
    &["data", "created_at"],
    &["data", "inserted_at"],
    &["timestamp"],
];

/// Separators inside event strings: `flow.started` (guessed) and Data Sync's
/// `experience:448:DISMISSED` (documented for exports).
const SEPARATORS: [char; 2] = ['.', ':'];

/// The logic of [`decode`], on plain bytes, for the tests; only [`decode`] is public, so that
/// nothing outside this module can decode bytes that skipped the signature check.
#[cfg(test)]
fn decode_bytes(bytes: &[u8]) -> Result<Interaction, DecodeError> {
    let value: Value = serde_json::from_slice(bytes).map_err(|_| DecodeError::InvalidJson)?;
    decode_value(&value)
}

/// [`decode`] on the parsed body.
fn decode_value(value: &Value) -> Result<Interaction, DecodeError> {
    let Value::Object(root) = value else {
        return Err(DecodeError::NotAnObject);
    };
    let kind = kind(root).ok_or(DecodeError::NoKind)?;
    let content_name = first_text(root, CONTENT_NAME_PLACES).map(str::to_owned);
    let event_name = first_text(root, EVENT_NAME_PLACES)
        .map(str::to_owned)
        .or_else(|| content_name.clone());
    Ok(Interaction {
        kind,
        action: action(root),
        user: User {
            id: first_id(root, USER_ID_PLACES),
            properties: USER_PLACES
                .iter()
                .find_map(|path| at(root, path)?.as_object())
                .cloned()
                .unwrap_or_default(),
        },
        company: company(root),
        content_id: first_id(root, CONTENT_ID_PLACES),
        content_name,
        event_name,
        occurred_at: TIME_PLACES
            .iter()
            .find_map(|path| at(root, path).and_then(time)),
        data: match root.get("data") {
            Some(Value::Object(data)) => data.clone(),
            _ => Map::new(),
        },
    })
}

fn kind(root: &Map<String, Value>) -> Option<Kind> {
    let raw = first_text(root, KIND_PLACES).or_else(|| {
        KIND_EVENT_PLACES
            .iter()
            .find_map(|path| at(root, path).and_then(text).and_then(first_segment))
    })?;
    Some(match normalize(raw).as_str() {
        "flow" | "experience" => Kind::Experience,
        "checklist" => Kind::Checklist,
        "nps" => Kind::Nps,
        "form" | "survey" => Kind::Form,
        "featuretag" | "feature" | "trackfeature" => Kind::FeatureTag,
        "track" | "trackedevent" | "button" => Kind::TrackedEvent,
        _ => Kind::Other(raw.to_owned()),
    })
}

fn action(root: &Map<String, Value>) -> Option<Action> {
    let raw = ACTION_PLACES
        .iter()
        .find_map(|path| at(root, path).and_then(text).and_then(last_segment))
        .or_else(|| {
            at(root, ACTION_EVENT_PLACE)
                .and_then(text)
                .filter(|event| event.contains(SEPARATORS))
                .and_then(last_segment)
        })?;
    Some(match normalize(raw).as_str() {
        // `seen` is Data Sync's word for a started interaction (`checklist:2:SEEN`).
        "started" | "start" | "seen" => Action::Started,
        "step" => Action::Step,
        "completed" | "complete" => Action::Completed,
        // `skipped` is the mobile SDK's word for dismissing a flow.
        "dismissed" | "dismiss" | "skipped" => Action::Dismissed,
        "taskcompleted" => Action::TaskCompleted,
        "asklater" => Action::AskLater,
        "score" => Action::Score,
        "feedback" => Action::Feedback,
        "submitted" | "submit" => Action::Submitted,
        "click" => Action::Click,
        "hover" => Action::Hover,
        "textinput" => Action::TextInput,
        _ => Action::Other(raw.to_owned()),
    })
}

/// `data.company`, else `company`: an object (id plus properties) or a bare id.
fn company(root: &Map<String, Value>) -> Option<Company> {
    COMPANY_PLACES
        .iter()
        .find_map(|path| match at(root, path)? {
            Value::Object(fields) => Some(Company {
                id: first_id(fields, COMPANY_ID_PLACES),
                properties: fields.clone(),
            }),
            bare => id(bare).map(|id| Company {
                id: Some(id),
                properties: Map::new(),
            }),
        })
}

/// Folds case, `_`, `-` and spaces so that `Task Completed`, `task_completed` and
/// `TASK-COMPLETED` match the same synonym.
fn normalize(raw: &str) -> String {
    raw.chars()
        .filter(|c| !matches!(c, '_' | '-' | ' '))
        .flat_map(char::to_lowercase)
        .collect()
}

/// The value at `path`, walking nested objects; `None` when any step is missing or not an
/// object.
fn at<'a>(root: &'a Map<String, Value>, path: &[&str]) -> Option<&'a Value> {
    let (first, rest) = path.split_first()?;
    rest.iter()
        .try_fold(root.get(*first)?, |value, key| value.as_object()?.get(*key))
}

/// A string that says something: trimmed, and `None` when blank or not a string.
fn text(value: &Value) -> Option<&str> {
    value.as_str().map(str::trim).filter(|s| !s.is_empty())
}

/// An identifier: a non-blank string (trimmed) or a number, as written in the body: `42` is
/// `"42"`, `1.50` is `"1.50"` and a 30-digit number keeps all 30 digits.
fn id(value: &Value) -> Option<String> {
    match value {
        Value::Number(number) => Some(number.to_string()),
        other => text(other).map(str::to_owned),
    }
}

fn first_text<'a>(root: &'a Map<String, Value>, places: &[Path]) -> Option<&'a str> {
    places.iter().find_map(|path| at(root, path).and_then(text))
}

fn first_id(root: &Map<String, Value>, places: &[Path]) -> Option<String> {
    places.iter().find_map(|path| at(root, path).and_then(id))
}

fn first_segment(value: &str) -> Option<&str> {
    value
        .split(SEPARATORS)
        .next()
        .map(str::trim)
        .filter(|s| !s.is_empty())
}

/// The last segment, or the whole value when it has no separator.
fn last_segment(value: &str) -> Option<&str> {
    value
        .rsplit(SEPARATORS)
        .next()
        .map(str::trim)
        .filter(|s| !s.is_empty())
}
