//! Payload shapes (contract §10.4): what really arrives, per source. A *shape* is the decoded
//! kind and action of a payload and the sorted set of JSON paths it holds with their types
//! (`data.user.user_id:string`, array elements as `[]`); its key is a SHA-256 of the source
//! and those. [`of`] and [`sample`] are pure; [`Recorder`] is the bounded in-memory index of
//! the shape keys each source has stored, which decides on the request path — without asking
//! the database — whether a webhook's shape is recorded. The queue stores the observation in
//! the webhook's own commit (`crate::queue`), so recording a shape costs no round trip.
//!
//! It must not: keep values in a `redacted` sample (only the kind and action fields survive),
//! or let a source's index grow past `capture.max_shapes_per_source`.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::userpilot::{Action, Kind, Verified, kind_and_action};

/// `capture.samples`: what a shape keeps of its latest payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Samples {
    /// Every string and number replaced by a placeholder, except the kind and action fields.
    #[default]
    Redacted,
    /// The payload as received.
    Full,
    /// No sample.
    Off,
}

/// A payload's shape, without its source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shape {
    /// The decoded kind (`experience`, `nps`, an unknown kind as sent), `None` when the
    /// decoder finds none.
    pub kind: Option<String>,
    pub action: Option<String>,
    /// `path:type`, sorted, each once.
    pub paths: Vec<String>,
}

/// A webhook's shape as the queue stores it with the webhook (the source is the webhook's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShapeObservation {
    pub key: [u8; 32],
    pub kind: Option<String>,
    pub action: Option<String>,
    pub paths: Vec<String>,
    /// The sample as JSON text, per [`Samples`]; `None` with `off`.
    pub sample: Option<String>,
}

/// A stored shape, as `GET /admin/shapes` and `shapes` list it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StoredShape {
    /// Hex of the shape's key.
    pub key: String,
    pub source: String,
    pub kind: Option<String>,
    pub action: Option<String>,
    pub paths: Vec<String>,
    /// Webhooks stored with this shape (a duplicate delivery is not counted again).
    pub count: u64,
    pub first_seen_ms: i64,
    pub last_seen_ms: i64,
    pub sample: Option<Value>,
}

/// A `shapes` row's columns as both backends store them: `paths` and `sample` as JSON text.
pub struct ShapeRow {
    pub key: Vec<u8>,
    pub source: String,
    pub kind: Option<String>,
    pub action: Option<String>,
    pub paths: String,
    pub count: i64,
    pub first_seen_ms: i64,
    pub last_seen_ms: i64,
    pub sample: Option<String>,
}

impl From<ShapeRow> for StoredShape {
    fn from(row: ShapeRow) -> Self {
        StoredShape {
            key: hex::encode(row.key),
            source: row.source,
            kind: row.kind,
            action: row.action,
            paths: serde_json::from_str(&row.paths).unwrap_or_default(),
            count: row.count.try_into().unwrap_or(0),
            first_seen_ms: row.first_seen_ms,
            last_seen_ms: row.last_seen_ms,
            sample: row.sample.and_then(|text| serde_json::from_str(&text).ok()),
        }
    }
}

/// The shape of `payload`, whose kind and action the decoder found (or not).
pub fn of(payload: &Value, kind: Option<&Kind>, action: Option<&Action>) -> Shape {
    let mut paths = BTreeSet::new();
    walk(payload, &mut String::new(), &mut paths);
    Shape {
        kind: kind.map(kind_name),
        action: action.map(action_name),
        paths: paths.into_iter().collect(),
    }
}

impl Shape {
    /// The shape's key within `source`: SHA-256 of the source, kind, action and paths, each
    /// field ended by a newline and an absent kind or action spelled apart from any string.
    pub fn key(&self, source: &str) -> [u8; 32] {
        let mut hash = Sha256::new();
        hash.update(source.as_bytes());
        hash.update(b"\n");
        for field in [&self.kind, &self.action] {
            match field {
                Some(text) => {
                    hash.update(b"=");
                    hash.update(text.as_bytes());
                }
                None => hash.update(b"\0"),
            }
            hash.update(b"\n");
        }
        for path in &self.paths {
            hash.update(path.as_bytes());
            hash.update(b"\n");
        }
        hash.finalize().into()
    }
}

/// Every node under `value` as `path:type` (the root's path is empty).
fn walk(value: &Value, path: &mut String, paths: &mut BTreeSet<String>) {
    paths.insert(format!("{path}:{}", type_name(value)));
    match value {
        Value::Object(map) => {
            for (key, child) in map {
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(key);
                walk(child, path, paths);
                path.truncate(len);
            }
        }
        Value::Array(items) => {
            let len = path.len();
            path.push_str("[]");
            for item in items {
                walk(item, path, paths);
            }
            path.truncate(len);
        }
        _ => {}
    }
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::String(_) => "string",
        Value::Number(_) => "number",
        Value::Bool(_) => "boolean",
        Value::Null => "null",
        Value::Object(_) => "object",
        Value::Array(_) => "array",
    }
}

fn kind_name(kind: &Kind) -> String {
    match kind {
        Kind::Experience => "experience".into(),
        Kind::Checklist => "checklist".into(),
        Kind::Nps => "nps".into(),
        Kind::Form => "form".into(),
        Kind::FeatureTag => "feature_tag".into(),
        Kind::TrackedEvent => "tracked_event".into(),
        Kind::Other(other) => other.clone(),
    }
}

fn action_name(action: &Action) -> String {
    match action {
        Action::Started => "started".into(),
        Action::Step => "step".into(),
        Action::Completed => "completed".into(),
        Action::Dismissed => "dismissed".into(),
        Action::TaskCompleted => "task_completed".into(),
        Action::AskLater => "ask_later".into(),
        Action::Score => "score".into(),
        Action::Feedback => "feedback".into(),
        Action::Submitted => "submitted".into(),
        Action::Click => "click".into(),
        Action::Hover => "hover".into(),
        Action::TextInput => "text_input".into(),
        Action::Other(other) => other.clone(),
    }
}

/// The places the decoder reads a kind or an action from (contract §2.2): the fields a
/// redacted sample keeps, so that it still says what kind of payload it was. At the top level:
const KEPT_AT_TOP: &[&str] = &["type", "event_type", "event", "action", "status"];
/// And inside the top-level `data` object:
const KEPT_IN_DATA: &[&str] = &["type", "event_type", "event", "action", "status", "state"];

/// The sample a shape keeps of `payload` under `samples`, as JSON text.
pub fn sample(payload: &Value, samples: Samples) -> Option<String> {
    match samples {
        Samples::Off => None,
        Samples::Full => Some(payload.to_string()),
        Samples::Redacted => serde_json::to_string(&Redacted::root(payload)).ok(),
    }
}

/// `payload` with every string replaced by `"<string:LEN>"` (LEN in characters) and every
/// number by `"<number>"`, except strings at the kind and action fields. Keys, booleans and
/// nulls stay: they are the shape, not the data.
pub fn redact(payload: &Value) -> Value {
    serde_json::to_value(Redacted::root(payload)).unwrap_or(Value::Null)
}

/// Where a value sits, as far as the kept fields go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    Top,
    Data,
    Deeper,
}

/// A value serialized redacted in one pass, with no redacted copy built first: this runs for
/// every webhook.
struct Redacted<'a> {
    value: &'a Value,
    /// Where its members sit.
    place: Place,
    /// Whether it is a kind or action field itself.
    kept: bool,
}

impl<'a> Redacted<'a> {
    fn root(value: &'a Value) -> Self {
        Redacted {
            value,
            place: Place::Top,
            kept: false,
        }
    }

    fn member(&self, key: &str, value: &'a Value) -> Self {
        let (place, kept) = match self.place {
            Place::Top => (
                if key == "data" {
                    Place::Data
                } else {
                    Place::Deeper
                },
                KEPT_AT_TOP.contains(&key),
            ),
            Place::Data => (Place::Deeper, KEPT_IN_DATA.contains(&key)),
            Place::Deeper => (Place::Deeper, false),
        };
        Redacted { value, place, kept }
    }
}

impl Serialize for Redacted<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        match self.value {
            Value::String(text) if self.kept => serializer.serialize_str(text),
            Value::String(text) => {
                serializer.collect_str(&format_args!("<string:{}>", text.chars().count()))
            }
            Value::Number(_) => serializer.serialize_str("<number>"),
            Value::Bool(flag) => serializer.serialize_bool(*flag),
            Value::Null => serializer.serialize_unit(),
            // An element is never a kind or action field.
            Value::Array(items) => serializer.collect_seq(items.iter().map(|item| Redacted {
                value: item,
                place: Place::Deeper,
                kept: false,
            })),
            Value::Object(map) => {
                let mut out = serializer.serialize_map(Some(map.len()))?;
                for (key, value) in map {
                    out.serialize_entry(key, &self.member(key, value))?;
                }
                out.end()
            }
        }
    }
}

/// The bounded index of shape keys stored per source, loaded from the queue database at start
/// and kept in step by the request path. It decides whether a webhook's shape may be recorded:
/// a known key always (its count and last sighting move on), a new one while its source has
/// fewer than the bound, else not (`relay_shapes_overflow_total{source}`). With several
/// Postgres replicas each has its own index, so a source can end up with up to the bound of
/// new shapes per replica beyond what was stored at their starts.
///
/// A key enters the index when its webhook is handled, before the commit: should that commit
/// fail, the shape is stored (upserted) with the next webhook of its kind all the same, only
/// without a second "new payload shape" line.
pub struct Recorder {
    samples: Samples,
    max_per_source: usize,
    known: Mutex<HashMap<String, HashSet<[u8; 32]>>>,
}

impl Recorder {
    /// An index holding the stored `(source, key)`s. Keys beyond the bound are kept too: they
    /// are in the database and count as known, but none is added to a full source.
    pub fn new(
        samples: Samples,
        max_per_source: usize,
        stored: impl IntoIterator<Item = (String, [u8; 32])>,
    ) -> Self {
        let mut known: HashMap<String, HashSet<[u8; 32]>> = HashMap::new();
        for (source, key) in stored {
            known.entry(source).or_default().insert(key);
        }
        Self {
            samples,
            max_per_source,
            known: Mutex::new(known),
        }
    }

    /// The shape of a verified body posted to `source`, to store with its webhook; `None` when
    /// the body is not JSON (the webhook is refused anyway) or the source is full and the shape
    /// new. A first sighting logs one line. The body's parse is the decoder's (kept with the
    /// body); kind and action as the decoder finds them.
    pub fn observe(&self, source: &str, body: &Verified) -> Option<ShapeObservation> {
        let (payload, kind, action) = kind_and_action(body)?;
        let shape = of(payload, kind.as_ref(), action.as_ref());
        let key = shape.key(source);
        let Some(new) = self.admit(source, key) else {
            metrics::counter!("relay_shapes_overflow_total", "source" => source.to_owned())
                .increment(1);
            return None;
        };
        let observation = ShapeObservation {
            key,
            sample: sample(payload, self.samples),
            kind: shape.kind,
            action: shape.action,
            paths: shape.paths,
        };
        if new {
            log_new(source, &observation);
        }
        Some(observation)
    }

    /// Whether `key` may be recorded for `source` (`Some(true)`: a new shape, now in the
    /// index), or `None` when it is new and the source is full.
    fn admit(&self, source: &str, key: [u8; 32]) -> Option<bool> {
        // A panicked holder: the index as it was is still a set of stored keys.
        let mut known = self
            .known
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let keys = match known.get_mut(source) {
            Some(keys) => keys,
            None => known.entry(source.to_owned()).or_default(),
        };
        if keys.contains(&key) {
            return Some(false);
        }
        if keys.len() >= self.max_per_source {
            return None;
        }
        keys.insert(key);
        Some(true)
    }

    /// How many shapes the index knows for `source`.
    pub fn known(&self, source: &str) -> usize {
        self.known
            .lock()
            .map(|known| known.get(source).map_or(0, HashSet::len))
            .unwrap_or(0)
    }
}

/// Logs a shape seen for the first time (contract §10.4): source, kind, action, path count.
fn log_new(source: &str, shape: &ShapeObservation) {
    tracing::info!(
        source,
        kind = shape.kind.as_deref().unwrap_or("null"),
        action = shape.action.as_deref().unwrap_or("null"),
        paths = shape.paths.len(),
        "new payload shape"
    );
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn paths_are_sorted_typed_and_name_array_elements_once() {
        let payload = json!({
            "data": {"user": {"user_id": "u1", "n": 2}, "items": [{"id": 1}, {"id": 2}], "ok": true, "x": null},
        });
        let shape = of(&payload, Some(&Kind::Nps), Some(&Action::Score));
        assert_eq!(
            shape.paths,
            [
                ":object",
                "data.items:array",
                "data.items[].id:number",
                "data.items[]:object",
                "data.ok:boolean",
                "data.user.n:number",
                "data.user.user_id:string",
                "data.user:object",
                "data.x:null",
                "data:object",
            ]
        );
        assert_eq!(shape.kind.as_deref(), Some("nps"));
        assert_eq!(shape.action.as_deref(), Some("score"));
    }

    #[test]
    fn the_key_depends_on_source_kind_action_and_paths_but_not_values() {
        let a = of(&json!({"a": "x"}), Some(&Kind::Form), None);
        let same = of(&json!({"a": "other value"}), Some(&Kind::Form), None);
        assert_eq!(a.key("s"), same.key("s"));
        assert_ne!(a.key("s"), a.key("t"));
        let no_kind = of(&json!({"a": "x"}), None, None);
        assert_ne!(a.key("s"), no_kind.key("s"));
        let other_kind = of(&json!({"a": "x"}), Some(&Kind::Other(String::new())), None);
        assert_ne!(no_kind.key("s"), other_kind.key("s"));
        let other_type = of(&json!({"a": 1}), Some(&Kind::Form), None);
        assert_ne!(a.key("s"), other_type.key("s"));
    }

    #[test]
    fn redaction_keeps_kind_and_action_fields_and_replaces_every_other_value() {
        let payload = json!({
            "event": "flow.started", "timestamp": 17,
            "data": {"type": "flow", "action": "started", "user": {"user_id": "héllo", "type": "x"},
                     "tags": ["a", 2], "ok": false, "none": null},
        });
        assert_eq!(
            redact(&payload),
            json!({
                "event": "flow.started", "timestamp": "<number>",
                "data": {"type": "flow", "action": "started",
                         "user": {"user_id": "<string:5>", "type": "<string:1>"},
                         "tags": ["<string:1>", "<number>"], "ok": false, "none": null},
            })
        );
        assert_eq!(sample(&payload, Samples::Off), None);
        assert_eq!(sample(&payload, Samples::Full), Some(payload.to_string()));
    }

    #[test]
    fn the_recorder_admits_known_shapes_always_and_new_ones_up_to_the_bound() {
        let recorder = Recorder::new(Samples::Redacted, 2, []);
        let body = |text: &str| Verified::from_queue(text.to_owned().into());
        let shape = |field: &str| body(&format!("{{\"{field}\": 1}}"));
        assert!(recorder.observe("s", &shape("a")).is_some());
        assert!(recorder.observe("s", &shape("b")).is_some());
        assert!(recorder.observe("s", &shape("c")).is_none());
        assert!(recorder.observe("s", &shape("a")).is_some());
        assert!(recorder.observe("t", &shape("c")).is_some());
        assert_eq!(recorder.known("s"), 2);
        assert!(recorder.observe("s", &body("not json")).is_none());
        let flow = recorder
            .observe(
                "t",
                &body(r#"{"data": {"type": "flow", "action": "started"}}"#),
            )
            .unwrap();
        assert_eq!(
            (flow.kind.as_deref(), flow.action.as_deref()),
            (Some("experience"), Some("started"))
        );
        let kindless = recorder
            .observe("u", &body(r#"{"action": "started"}"#))
            .unwrap();
        assert_eq!(
            (kindless.kind, kindless.action),
            (None, None),
            "no kind: neither"
        );
    }
}
