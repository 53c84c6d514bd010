//! The pure mapping from a decoded Userpilot [`Interaction`] to Heap records (contract §2.3–2.4):
//! event names matching Userpilot's native Heap integration, the NPS split, identity choice,
//! timestamps, idempotency keys, user/account properties, and the operator's `[mapping]`
//! renames and drops. No I/O, no clock: the receive time comes in as an argument.
//!
//! Everything a redelivery must reproduce (names, keys) derives only from the interaction and
//! the body digest, so the same webhook always maps to the same records and the queue's
//! deduplication and Heap's idempotency keys make delivery effectively once.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::dead_letters::Reason;
use crate::heap::properties::{cut, flatten};
use crate::heap::wire::{
    AccountProperties, HeapRecord, Outbound, Properties, TrackEvent, UserProperties,
};
use crate::userpilot::{Action, Interaction, Kind, User};

/// Heap rejects identities longer than this (in characters).
pub const MAX_IDENTITY_CHARS: usize = 255;

/// The `heap.identity` value that selects Userpilot's user id rather than a user property.
const USER_ID: &str = "user_id";

/// The `[mapping]` configuration section.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MappingSettings {
    /// Heap event name -> new name.
    #[serde(default)]
    pub rename: BTreeMap<String, String>,
    /// Heap event names (after renaming) that are not sent.
    #[serde(default)]
    pub drop: Vec<String>,
}

/// Why an interaction cannot be sent to Heap. Such webhooks are quarantined as dead letters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unmappable {
    #[error("no user id in any known place")]
    NoUserId,
    #[error("the identity property `{0}` is missing from the user")]
    NoIdentity(String),
    #[error("the identity is longer than {MAX_IDENTITY_CHARS} characters")]
    IdentityTooLong,
}

impl Unmappable {
    /// The dead-letter reason code (one of [`Reason`]'s).
    pub fn reason(&self) -> &'static str {
        match self {
            Unmappable::NoUserId => Reason::NoUserId,
            Unmappable::NoIdentity(_) => Reason::NoIdentity,
            Unmappable::IdentityTooLong => Reason::IdentityTooLong,
        }
        .as_str()
    }
}

/// Where the Heap identity comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Identity {
    UserId,
    Property(String),
}

impl Identity {
    fn resolve(&self, user: &User) -> Result<String, Unmappable> {
        let identity = match self {
            Identity::UserId => user
                .id
                .clone()
                .filter(|id| !id.trim().is_empty())
                .ok_or(Unmappable::NoUserId)?,
            Identity::Property(name) => match user.properties.get(name) {
                Some(Value::String(text)) if !text.trim().is_empty() => text.clone(),
                // As written in the body, so a 30-digit account number stays 30 digits.
                Some(Value::Number(number)) => number.to_string(),
                _ => return Err(Unmappable::NoIdentity(name.clone())),
            },
        };
        if identity.chars().count() > MAX_IDENTITY_CHARS {
            return Err(Unmappable::IdentityTooLong);
        }
        Ok(identity)
    }
}

/// The mapping as configured.
#[derive(Debug, Clone)]
pub struct Mapper {
    identity: Identity,
    user_properties: bool,
    account_properties: bool,
    rename: BTreeMap<String, String>,
    drop: BTreeSet<String>,
    /// Set for a named source (see [`Mapper::scoped_to_source`]).
    key_scope: Option<String>,
}

impl Mapper {
    /// `identity` is `heap.identity`: `"user_id"` or the name of a user property.
    pub fn new(
        identity: &str,
        user_properties: bool,
        account_properties: bool,
        mapping: &MappingSettings,
    ) -> Self {
        let identity = if identity == USER_ID {
            Identity::UserId
        } else {
            Identity::Property(identity.to_owned())
        };
        Mapper {
            identity,
            user_properties,
            account_properties,
            rename: mapping.rename.clone(),
            drop: mapping.drop.iter().cloned().collect(),
            key_scope: None,
        }
    }

    /// Keys derived from `source`'s name as well as the body: the same body sent to two
    /// sources is two webhooks (contract §9), and its events must not share idempotency keys
    /// when both sources deliver to one app id, or Heap would keep only one. The default
    /// source is not scoped, so its keys stay what they were before sources existed.
    pub fn scoped_to_source(mut self, source: &str) -> Self {
        self.key_scope = Some(source.to_owned());
        self
    }

    /// Maps one interaction. `body_digest` is the SHA-256 of the verified body: the
    /// idempotency keys derive from it, so a redelivered webhook maps to the same keys.
    pub fn map(
        &self,
        interaction: &Interaction,
        body_digest: &[u8; 32],
        received_at: DateTime<Utc>,
    ) -> Result<Vec<Outbound>, Unmappable> {
        // First, so that an unmappable webhook is quarantined even when the operator drops
        // all of its events: the dead letter shows the payload is broken.
        let identity = self.identity.resolve(&interaction.user)?;
        let scoped;
        let body_digest = match &self.key_scope {
            Some(source) => {
                let mut hasher = Sha256::new();
                hasher.update(b"source\n");
                hasher.update(source.as_bytes());
                hasher.update(b"\n");
                hasher.update(body_digest);
                scoped = <[u8; 32]>::from(hasher.finalize());
                &scoped
            }
            None => body_digest,
        };

        let timestamp = interaction
            .occurred_at
            .unwrap_or(received_at)
            .to_rfc3339_opts(SecondsFormat::AutoSi, true);
        let mut properties = flatten(&interaction.data, &["user", "company"]);
        properties.insert("source".to_owned(), Value::from("userpilot"));

        let mut out: Vec<Outbound> = event_names(interaction)
            .into_iter()
            .filter_map(|name| self.final_name(name))
            .map(|event| {
                let key = idempotency_key(body_digest, &event);
                Outbound {
                    key: key.clone(),
                    record: HeapRecord::Track(TrackEvent {
                        identity: identity.clone(),
                        event,
                        timestamp: timestamp.clone(),
                        idempotency_key: key,
                        properties: properties.clone(),
                    }),
                }
            })
            .collect();

        let digest = hex::encode(body_digest);
        if self.user_properties {
            let properties = record_properties(&interaction.user.properties, USER_ID);
            if !properties.is_empty() {
                out.push(Outbound {
                    key: format!("user:{digest}"),
                    record: HeapRecord::User(UserProperties {
                        identity,
                        properties,
                    }),
                });
            }
        }
        // Heap keys accounts by id, so a company without one has nowhere to go.
        if self.account_properties
            && let Some(company) = &interaction.company
            && let Some(account_id) = company.id.clone().filter(|id| !id.is_empty())
        {
            let properties = record_properties(&company.properties, "company_id");
            if !properties.is_empty() {
                out.push(Outbound {
                    key: format!("account:{digest}"),
                    record: HeapRecord::Account(AccountProperties {
                        account_id,
                        properties,
                    }),
                });
            }
        }
        Ok(out)
    }

    /// The name sent to Heap after `[mapping]`, or `None` when the event is dropped. A drop
    /// matches the computed name or the renamed one, so operators may write either.
    fn final_name(&self, name: String) -> Option<String> {
        let renamed = self.rename.get(&name).cloned();
        if self.drop.contains(&name) || renamed.as_ref().is_some_and(|r| self.drop.contains(r)) {
            return None;
        }
        Some(cut(&renamed.unwrap_or(name)).to_owned())
    }
}

/// Flattened user or account properties without the id fields: the id is already the record's
/// subject, and Heap forbids a property named `id` (in any case).
fn record_properties(object: &Map<String, Value>, id_field: &str) -> Properties {
    let skip: Vec<&str> = object
        .keys()
        .map(String::as_str)
        .filter(|key| *key == id_field || key.eq_ignore_ascii_case("id"))
        .collect();
    flatten(object, &skip)
}

/// Lowercase hex SHA-256 of `body_digest ++ "\n" ++ event`: 64 characters, the same for every
/// redelivery of the body, different for each event name it maps to.
fn idempotency_key(body_digest: &[u8; 32], event: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(body_digest);
    hasher.update(b"\n");
    hasher.update(event.as_bytes());
    hex::encode(hasher.finalize())
}

/// The Heap event names of an interaction (contract §2.3), before `[mapping]` renames and drops.
/// Names are cut to 1023 characters, like every other string Heap receives.
pub fn event_names(interaction: &Interaction) -> Vec<String> {
    let kind = &interaction.kind;
    let names = match (kind, &interaction.action) {
        (Kind::TrackedEvent, _) => {
            let event_name = interaction.event_name.as_deref();
            vec![name("Tracked Event", event_name)]
        }
        (Kind::Nps, None) => nps_names(&interaction.data),
        (Kind::Form, None) => vec![name("Form", Some("submitted"))],
        (_, None) => vec![name(&kind_label(kind), None)],
        (_, Some(action)) => vec![name(&kind_label(kind), Some(&action_label(kind, action)))],
    };
    names.into_iter().map(|n| cut(&n).to_owned()).collect()
}

/// `Userpilot <kind> (<action>)`, leaving out whichever part is blank.
fn name(kind: &str, action: Option<&str>) -> String {
    let mut name = String::from("Userpilot");
    if !kind.is_empty() {
        name.push(' ');
        name.push_str(kind);
    }
    if let Some(action) = action.filter(|a| !a.trim().is_empty()) {
        name.push_str(" (");
        name.push_str(action);
        name.push(')');
    }
    name
}

/// An NPS delivery without an action carries the answer itself: a score, feedback, or both,
/// which the native integration sends as separate events.
fn nps_names(data: &Map<String, Value>) -> Vec<String> {
    let mut names = Vec::new();
    if data.get("score").is_some_and(|score| !score.is_null()) {
        names.push(name("NPS", Some("score")));
    }
    if data
        .get("feedback")
        .and_then(Value::as_str)
        .is_some_and(|feedback| !feedback.trim().is_empty())
    {
        names.push(name("NPS", Some("feedback")));
    }
    if names.is_empty() {
        names.push(name("NPS", None));
    }
    names
}

fn kind_label(kind: &Kind) -> String {
    match kind {
        Kind::Experience => "Experience".to_owned(),
        Kind::Checklist => "Checklist".to_owned(),
        Kind::Nps => "NPS".to_owned(),
        Kind::Form => "Form".to_owned(),
        Kind::FeatureTag => "Feature Tag".to_owned(),
        Kind::TrackedEvent => "Tracked Event".to_owned(),
        Kind::Other(other) => title_case(other),
    }
}

fn action_label(kind: &Kind, action: &Action) -> String {
    let label = match action {
        // The native integration calls NPS's "dismiss" choice "ask later".
        Action::Dismissed if *kind == Kind::Nps => "ask later",
        Action::Started => "started",
        Action::Step => "step",
        Action::Completed => "completed",
        Action::Dismissed => "dismissed",
        Action::TaskCompleted => "task completed",
        Action::AskLater => "ask later",
        Action::Score => "score",
        Action::Feedback => "feedback",
        Action::Submitted => "submitted",
        Action::Click => "click",
        Action::Hover => "hover",
        Action::TextInput => "text input",
        Action::Other(other) => return other.to_lowercase().replace('_', " "),
    };
    label.to_owned()
}

/// `resource_center` -> `Resource Center`: words split on `_`, `-` and whitespace, each
/// capitalised with the rest lowercased.
fn title_case(text: &str) -> String {
    text.split(|c: char| c == '_' || c == '-' || c.is_whitespace())
        .filter(|word| !word.is_empty())
        .map(|word| {
            let mut chars = word.chars();
            let first = chars.next().map(|c| c.to_uppercase().collect::<String>());
            first.unwrap_or_default() + &chars.as_str().to_lowercase()
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use serde_json::json;

    use super::*;
    use crate::userpilot::Company;

    const DIGEST: [u8; 32] = [7; 32];

    fn object(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            other => panic!("not an object: {other}"),
        }
    }

    fn interaction(kind: Kind, action: Option<Action>) -> Interaction {
        Interaction {
            kind,
            action,
            user: User {
                id: Some("u_123".to_owned()),
                properties: object(json!({
                    "user_id": "u_123", "email": "jane@example.com", "plan": "pro"
                })),
            },
            company: None,
            content_id: None,
            content_name: None,
            event_name: None,
            occurred_at: None,
            data: Map::new(),
        }
    }

    fn with_data(mut interaction: Interaction, data: Value) -> Interaction {
        interaction.data = object(data);
        interaction
    }

    fn received_at() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2024, 9, 19, 12, 0, 0).unwrap()
    }

    fn mapper() -> Mapper {
        Mapper::new("user_id", false, false, &MappingSettings::default())
    }

    fn tracks(out: &[Outbound]) -> Vec<&TrackEvent> {
        out.iter()
            .filter_map(|o| match &o.record {
                HeapRecord::Track(event) => Some(event),
                _ => None,
            })
            .collect()
    }

    fn track_names(out: &[Outbound]) -> Vec<&str> {
        tracks(out).iter().map(|e| e.event.as_str()).collect()
    }

    fn other(text: &str) -> Action {
        Action::Other(text.to_owned())
    }

    fn other_kind(text: &str) -> Kind {
        Kind::Other(text.to_owned())
    }

    #[test]
    fn every_spec_row_gets_the_native_integrations_name() {
        use Action::*;
        use Kind::{Checklist, Experience, FeatureTag, Form, Nps};
        #[rustfmt::skip]
        let cases: Vec<(Kind, Option<Action>, &str)> = vec![
            (Experience, Some(Started), "Userpilot Experience (started)"),
            (Experience, Some(Step), "Userpilot Experience (step)"),
            (Experience, Some(Completed), "Userpilot Experience (completed)"),
            (Experience, Some(Dismissed), "Userpilot Experience (dismissed)"),
            (Checklist, Some(Started), "Userpilot Checklist (started)"),
            (Checklist, Some(TaskCompleted), "Userpilot Checklist (task completed)"),
            (Checklist, Some(Completed), "Userpilot Checklist (completed)"),
            (Checklist, Some(Dismissed), "Userpilot Checklist (dismissed)"),
            (Nps, Some(Score), "Userpilot NPS (score)"),
            (Nps, Some(Feedback), "Userpilot NPS (feedback)"),
            (Nps, Some(AskLater), "Userpilot NPS (ask later)"),
            // The native integration's name for NPS's dismiss choice.
            (Nps, Some(Dismissed), "Userpilot NPS (ask later)"),
            (Form, Some(Submitted), "Userpilot Form (submitted)"),
            (Form, None, "Userpilot Form (submitted)"),
            (FeatureTag, Some(Click), "Userpilot Feature Tag (click)"),
            (FeatureTag, Some(Hover), "Userpilot Feature Tag (hover)"),
            (FeatureTag, Some(TextInput), "Userpilot Feature Tag (text input)"),
            // Known kind, unknown action: lowercased, `_` as spaces.
            (Experience, Some(other("Goal_Reached")), "Userpilot Experience (goal reached)"),
            (Nps, Some(other("SHOWN")), "Userpilot NPS (shown)"),
            // Known kind and known action outside the table: display names.
            (Experience, Some(Click), "Userpilot Experience (click)"),
            (Form, Some(Dismissed), "Userpilot Form (dismissed)"),
            // Unknown kind: title case, and known actions by their display names.
            (other_kind("resource_center"), Some(other("link_clicked")), "Userpilot Resource Center (link clicked)"),
            (other_kind("in-app  SURVEY"), Some(other("Answer_Given")), "Userpilot In App Survey (answer given)"),
            (other_kind("BANNER"), Some(Started), "Userpilot Banner (started)"),
            (other_kind("banner"), Some(TaskCompleted), "Userpilot Banner (task completed)"),
            (other_kind("banner"), Some(Dismissed), "Userpilot Banner (dismissed)"),
            (other_kind("élan_vital"), Some(TextInput), "Userpilot Élan Vital (text input)"),
            // No action.
            (other_kind("banner"), None, "Userpilot Banner"),
            (Experience, None, "Userpilot Experience"),
            (Checklist, None, "Userpilot Checklist"),
            (FeatureTag, None, "Userpilot Feature Tag"),
            // Blank parts are left out rather than leaving `()` or double spaces.
            (other_kind("__"), Some(other("x")), "Userpilot (x)"),
            (Experience, Some(other("")), "Userpilot Experience"),
        ];
        for (kind, action, expected) in cases {
            let case = interaction(kind, action);
            assert_eq!(event_names(&case), [expected], "case {case:?}");
        }
    }

    #[test]
    fn nps_without_an_action_is_named_after_its_answer_score_first() {
        #[rustfmt::skip]
        let cases: Vec<(Value, &[&str])> = vec![
            (json!({"score": 9, "feedback": "Love it"}), &["Userpilot NPS (score)", "Userpilot NPS (feedback)"]),
            (json!({"score": 0}), &["Userpilot NPS (score)"]),
            (json!({"score": "7", "feedback": ""}), &["Userpilot NPS (score)"]),
            (json!({"score": 3, "feedback": "   "}), &["Userpilot NPS (score)"]),
            (json!({"score": 3, "feedback": 5}), &["Userpilot NPS (score)"]),
            (json!({"score": null, "feedback": "Meh"}), &["Userpilot NPS (feedback)"]),
            (json!({"feedback": "Meh"}), &["Userpilot NPS (feedback)"]),
            (json!({"score": null}), &["Userpilot NPS"]),
            (json!({}), &["Userpilot NPS"]),
        ];
        for (data, expected) in cases {
            let case = with_data(interaction(Kind::Nps, None), data.clone());
            assert_eq!(event_names(&case), expected, "data {data}");
        }
        // An explicit action wins over the answer fields.
        let scored = with_data(
            interaction(Kind::Nps, Some(Action::Feedback)),
            json!({"score": 9}),
        );
        assert_eq!(event_names(&scored), ["Userpilot NPS (feedback)"]);
    }

    #[test]
    fn tracked_events_carry_the_event_name_as_sent() {
        let cases: [(Option<&str>, Option<Action>, &str); 5] = [
            (
                Some("Upgrade Clicked"),
                None,
                "Userpilot Tracked Event (Upgrade Clicked)",
            ),
            (
                Some("plan_upgrade"),
                Some(Action::Click),
                "Userpilot Tracked Event (plan_upgrade)",
            ),
            (None, None, "Userpilot Tracked Event"),
            (None, Some(Action::Started), "Userpilot Tracked Event"),
            (Some(""), None, "Userpilot Tracked Event"),
        ];
        for (event_name, action, expected) in cases {
            let mut case = interaction(Kind::TrackedEvent, action);
            case.event_name = event_name.map(str::to_owned);
            assert_eq!(event_names(&case), [expected], "event name {event_name:?}");
        }
    }

    #[test]
    fn event_names_are_cut_to_1023_characters() {
        let mut case = interaction(Kind::TrackedEvent, None);
        case.event_name = Some("ж".repeat(2000));
        let names = event_names(&case);
        assert_eq!(names[0].chars().count(), 1023);
        assert!(names[0].starts_with("Userpilot Tracked Event (жжж"));
    }

    #[test]
    fn map_sends_one_track_event_per_name_in_order() {
        let case = with_data(
            interaction(Kind::Nps, None),
            json!({"score": 9, "feedback": "Great"}),
        );
        let out = mapper().map(&case, &DIGEST, received_at()).unwrap();
        assert_eq!(
            track_names(&out),
            ["Userpilot NPS (score)", "Userpilot NPS (feedback)"]
        );
        assert!(tracks(&out).iter().all(|e| e.identity == "u_123"));
    }

    #[test]
    fn rename_changes_the_name_and_drop_matches_either_name() {
        let settings = MappingSettings {
            rename: BTreeMap::from([
                ("Userpilot NPS (score)".to_owned(), "NPS Score".to_owned()),
                (
                    "Userpilot Experience (step)".to_owned(),
                    "Flow Step".to_owned(),
                ),
                (
                    "Userpilot Checklist (started)".to_owned(),
                    "Checklist Opened".to_owned(),
                ),
            ]),
            drop: vec![
                "Userpilot NPS (feedback)".to_owned(),
                "Flow Step".to_owned(),
                "Userpilot Checklist (started)".to_owned(),
            ],
        };
        let mapper = Mapper::new("user_id", false, false, &settings);
        let cases: Vec<(Interaction, &[&str])> = vec![
            // score renamed, feedback dropped, in the same payload
            (
                with_data(
                    interaction(Kind::Nps, None),
                    json!({"score": 9, "feedback": "x"}),
                ),
                &["NPS Score"],
            ),
            // dropped by its new name
            (interaction(Kind::Experience, Some(Action::Step)), &[]),
            // dropped by its original name although renamed
            (interaction(Kind::Checklist, Some(Action::Started)), &[]),
            // untouched
            (
                interaction(Kind::Experience, Some(Action::Started)),
                &["Userpilot Experience (started)"],
            ),
        ];
        for (case, expected) in cases {
            let out = mapper.map(&case, &DIGEST, received_at()).unwrap();
            assert_eq!(track_names(&out), expected, "case {case:?}");
        }
    }

    #[test]
    fn identity_comes_from_the_configured_place() {
        let mut user = interaction(Kind::Form, None).user;
        user.properties
            .insert("account_number".to_owned(), json!(42));
        user.properties.insert("score".to_owned(), json!(4.5));
        let big: Value = serde_json::from_str("123456789012345678901234567890").unwrap();
        user.properties.insert("big".to_owned(), big);
        let huge: Value = serde_json::from_str("1.50e400").unwrap();
        user.properties.insert("huge".to_owned(), huge);
        user.properties.insert("blank".to_owned(), json!(""));
        user.properties.insert("admin".to_owned(), json!(true));
        user.properties
            .insert("long".to_owned(), json!("x".repeat(256)));
        user.properties
            .insert("longest".to_owned(), json!("é".repeat(255)));
        let no_id = User {
            id: None,
            ..user.clone()
        };
        let empty_id = User {
            id: Some(String::new()),
            ..user.clone()
        };
        let cases: Vec<(&str, &User, Result<String, Unmappable>)> = vec![
            ("user_id", &user, Ok("u_123".to_owned())),
            ("user_id", &no_id, Err(Unmappable::NoUserId)),
            ("user_id", &empty_id, Err(Unmappable::NoUserId)),
            ("email", &user, Ok("jane@example.com".to_owned())),
            ("email", &no_id, Ok("jane@example.com".to_owned())),
            ("account_number", &user, Ok("42".to_owned())),
            ("score", &user, Ok("4.5".to_owned())),
            (
                "big",
                &user,
                Ok("123456789012345678901234567890".to_owned()),
            ),
            ("huge", &user, Ok("1.50e+400".to_owned())),
            (
                "phone",
                &user,
                Err(Unmappable::NoIdentity("phone".to_owned())),
            ),
            (
                "blank",
                &user,
                Err(Unmappable::NoIdentity("blank".to_owned())),
            ),
            (
                "admin",
                &user,
                Err(Unmappable::NoIdentity("admin".to_owned())),
            ),
            ("long", &user, Err(Unmappable::IdentityTooLong)),
            ("longest", &user, Ok("é".repeat(255))),
        ];
        for (identity, user, expected) in cases {
            let mut case = interaction(Kind::Form, None);
            case.user = user.clone();
            let mapped = Mapper::new(identity, true, false, &MappingSettings::default()).map(
                &case,
                &DIGEST,
                received_at(),
            );
            let got = mapped.map(|out| {
                assert!(
                    out.iter()
                        .all(|o| o.record.subject() == out[0].record.subject())
                );
                out[0].record.subject().to_owned()
            });
            assert_eq!(got, expected, "identity {identity}");
        }
    }

    #[test]
    fn unmappable_reasons_are_stable_codes() {
        assert_eq!(Unmappable::NoUserId.reason(), "no_user_id");
        assert_eq!(
            Unmappable::NoIdentity("email".into()).reason(),
            "no_identity"
        );
        assert_eq!(Unmappable::IdentityTooLong.reason(), "identity_too_long");
    }

    #[test]
    fn identity_is_checked_even_when_every_event_is_dropped() {
        let settings = MappingSettings {
            rename: BTreeMap::new(),
            drop: vec!["Userpilot Form (submitted)".to_owned()],
        };
        let mapper = Mapper::new("user_id", false, false, &settings);
        let mut case = interaction(Kind::Form, None);
        assert_eq!(mapper.map(&case, &DIGEST, received_at()), Ok(vec![]));
        case.user.id = None;
        assert_eq!(
            mapper.map(&case, &DIGEST, received_at()),
            Err(Unmappable::NoUserId)
        );
    }

    #[test]
    fn event_properties_are_the_flattened_data_without_user_and_company_plus_source() {
        let case = with_data(
            interaction(Kind::Nps, None),
            json!({
                "type": "nps", "score": 9, "feedback": "Love it", "hostname": "app.example.com",
                "anonymous": false, "extra": null, "tags": ["a", "b"],
                "answers": [{"q": "Why?", "a": "Fast"}],
                "user": {"user_id": "u_123"}, "company": {"id": "c_1"}
            }),
        );
        let out = mapper().map(&case, &DIGEST, received_at()).unwrap();
        let expected = object(json!({
            "type": "nps", "score": 9, "feedback": "Love it", "hostname": "app.example.com",
            "anonymous": "false", "tags": "a||b", "answers.0.q": "Why?", "answers.0.a": "Fast",
            "source": "userpilot"
        }));
        for event in tracks(&out) {
            assert_eq!(event.properties, expected);
        }
        assert_eq!(tracks(&out).len(), 2);
    }

    #[test]
    fn source_is_always_userpilot() {
        let case = with_data(interaction(Kind::Form, None), json!({"source": "spoofed"}));
        let out = mapper().map(&case, &DIGEST, received_at()).unwrap();
        assert_eq!(tracks(&out)[0].properties["source"], "userpilot");
    }

    #[test]
    fn timestamp_is_the_payload_time_else_the_receive_time_in_utc() {
        let with_ms = Utc.timestamp_millis_opt(1_726_742_461_123).unwrap();
        let whole = Utc.timestamp_opt(1_726_742_461, 0).unwrap();
        let cases = [
            (Some(with_ms), "2024-09-19T10:41:01.123Z"),
            (Some(whole), "2024-09-19T10:41:01Z"),
            (None, "2024-09-19T12:00:00Z"),
        ];
        for (occurred_at, expected) in cases {
            let mut case = interaction(Kind::Form, None);
            case.occurred_at = occurred_at;
            let out = mapper().map(&case, &DIGEST, received_at()).unwrap();
            assert_eq!(tracks(&out)[0].timestamp, expected);
        }
    }

    #[test]
    fn idempotency_keys_are_deterministic_per_body_and_event_name() {
        let case = with_data(
            interaction(Kind::Nps, None),
            json!({"score": 9, "feedback": "Yes"}),
        );
        let first = mapper().map(&case, &DIGEST, received_at()).unwrap();
        // A redelivery, received later, maps to the same keys.
        let later = received_at() + chrono::Duration::hours(1);
        let again = mapper().map(&case, &DIGEST, later).unwrap();
        let other_body = mapper().map(&case, &[8; 32], received_at()).unwrap();

        let keys =
            |out: &[Outbound]| -> Vec<String> { out.iter().map(|o| o.key.clone()).collect() };
        assert_eq!(keys(&first), keys(&again));
        assert_ne!(keys(&first)[0], keys(&first)[1], "one key per event name");
        assert_ne!(keys(&first)[0], keys(&other_body)[0], "one key per body");
        assert_ne!(keys(&first)[1], keys(&other_body)[1], "one key per body");

        for (outbound, event) in first.iter().zip(tracks(&first)) {
            assert_eq!(outbound.key, event.idempotency_key);
            assert_eq!(event.idempotency_key.len(), 64);
            assert!(
                event
                    .idempotency_key
                    .chars()
                    .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
            );
            let mut input = DIGEST.to_vec();
            input.extend_from_slice(b"\n");
            input.extend_from_slice(event.event.as_bytes());
            assert_eq!(event.idempotency_key, hex::encode(Sha256::digest(&input)));
        }
    }

    #[test]
    fn a_named_source_scopes_the_keys_and_the_unscoped_mapper_keeps_them() {
        let case = with_data(
            interaction(Kind::Nps, None),
            json!({"score": 9, "feedback": "Yes"}),
        );
        let map = |mapper: Mapper| mapper.map(&case, &DIGEST, received_at()).unwrap();
        let plain = map(mapper());
        let staging = map(mapper().scoped_to_source("staging"));
        let qa = map(mapper().scoped_to_source("qa"));
        assert_eq!(plain.len(), staging.len());
        for ((plain, staging), qa) in plain.iter().zip(&staging).zip(&qa) {
            assert_ne!(plain.key, staging.key);
            assert_ne!(staging.key, qa.key);
        }
        assert_eq!(map(mapper().scoped_to_source("qa"))[0].key, qa[0].key);
        // Unscoped keys are the ones schema v2 queues hold: the default source keeps them.
        let first = tracks(&plain)[0];
        assert_eq!(plain[0].key, idempotency_key(&DIGEST, &first.event));
    }

    #[test]
    fn idempotency_key_hashes_the_renamed_name() {
        let settings = MappingSettings {
            rename: BTreeMap::from([(
                "Userpilot Form (submitted)".to_owned(),
                "Survey".to_owned(),
            )]),
            drop: vec![],
        };
        let case = interaction(Kind::Form, None);
        let renamed = Mapper::new("user_id", false, false, &settings)
            .map(&case, &DIGEST, received_at())
            .unwrap();
        let plain = mapper().map(&case, &DIGEST, received_at()).unwrap();
        assert_eq!(renamed[0].key, idempotency_key(&DIGEST, "Survey"));
        assert_ne!(renamed[0].key, plain[0].key);
    }

    #[test]
    fn renamed_names_are_cut_to_1023_characters_too() {
        let settings = MappingSettings {
            rename: BTreeMap::from([("Userpilot Form (submitted)".to_owned(), "ß".repeat(1500))]),
            drop: vec![],
        };
        let out = Mapper::new("user_id", false, false, &settings)
            .map(&interaction(Kind::Form, None), &DIGEST, received_at())
            .unwrap();
        assert_eq!(track_names(&out), ["ß".repeat(1023)]);
    }

    fn with_company(mut case: Interaction, id: Option<&str>, properties: Value) -> Interaction {
        case.company = Some(Company {
            id: id.map(str::to_owned),
            properties: object(properties),
        });
        case
    }

    #[test]
    fn user_and_account_records_follow_the_settings_after_track_events() {
        let mut case = with_company(
            interaction(Kind::Form, None),
            Some("c_1"),
            json!({"company_id": "c_1", "id": "c_1", "name": "Acme", "seats": 12}),
        );
        case.user.properties.insert("Id".to_owned(), json!("x"));
        case.user.properties.insert("ID".to_owned(), json!("y"));
        case.user
            .properties
            .insert("prefs".to_owned(), json!({"beta": true, "id": 3}));
        let hex_digest = hex::encode(DIGEST);
        let user = Outbound {
            key: format!("user:{hex_digest}"),
            record: HeapRecord::User(UserProperties {
                identity: "u_123".to_owned(),
                properties: object(json!({
                    "email": "jane@example.com", "plan": "pro", "prefs.beta": "true", "prefs.id": 3
                })),
            }),
        };
        let account = Outbound {
            key: format!("account:{hex_digest}"),
            record: HeapRecord::Account(AccountProperties {
                account_id: "c_1".to_owned(),
                properties: object(json!({"name": "Acme", "seats": 12})),
            }),
        };
        let cases = [
            (false, false, vec![]),
            (true, false, vec![user.clone()]),
            (false, true, vec![account.clone()]),
            (true, true, vec![user, account]),
        ];
        for (users, accounts, expected) in cases {
            let mapper = Mapper::new("user_id", users, accounts, &MappingSettings::default());
            let out = mapper.map(&case, &DIGEST, received_at()).unwrap();
            assert_eq!(out[0].record.kind(), crate::heap::wire::RecordKind::Track);
            assert_eq!(out[1..], expected[..], "users {users}, accounts {accounts}");
        }
    }

    #[test]
    fn property_records_are_skipped_when_they_would_be_empty_or_have_no_account() {
        let mapper = Mapper::new("user_id", true, true, &MappingSettings::default());
        let cases = [
            // only id fields: nothing left to send
            with_company(
                interaction(Kind::Form, None),
                Some("c_1"),
                json!({"company_id": "c_1", "id": 1}),
            ),
            // properties but no account id
            with_company(interaction(Kind::Form, None), None, json!({"name": "Acme"})),
            with_company(
                interaction(Kind::Form, None),
                Some(""),
                json!({"name": "Acme"}),
            ),
            // no company at all
            interaction(Kind::Form, None),
        ];
        for mut case in cases {
            case.user.properties = object(json!({"user_id": "u_123", "id": "u_123", "gone": null}));
            let out = mapper.map(&case, &DIGEST, received_at()).unwrap();
            assert_eq!(track_names(&out), ["Userpilot Form (submitted)"]);
            assert_eq!(out.len(), 1, "{out:?}");
        }
    }

    #[test]
    fn title_case_splits_on_separators_and_lowercases_the_rest() {
        let cases = [
            ("resource_center", "Resource Center"),
            ("Resource-CENTER", "Resource Center"),
            ("  spaced\tout  ", "Spaced Out"),
            ("x", "X"),
            ("", ""),
        ];
        for (input, expected) in cases {
            assert_eq!(title_case(input), expected, "input {input:?}");
        }
    }
}
