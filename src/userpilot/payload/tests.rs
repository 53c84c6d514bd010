//! The decoder's tests: every place and synonym of contract §2.2, precedence, numbers, times,
//! and properties that hold for any input.

use super::*;
use proptest::prelude::*;
use serde_json::{Number, json};

fn decode_json(body: &Value) -> Result<Interaction, DecodeError> {
    decode_bytes(&serde_json::to_vec(body).unwrap())
}

fn decoded(body: &Value) -> Interaction {
    decode_json(body).unwrap_or_else(|e| panic!("{body} did not decode: {e}"))
}

/// Sets `value` at `path` in `root`, creating objects on the way (and replacing anything
/// else that is in the way).
fn put(root: &mut Value, path: &[&str], value: Value) {
    let (last, parents) = path.split_last().unwrap();
    let mut node = root;
    for key in parents {
        node = node
            .as_object_mut()
            .unwrap()
            .entry(*key)
            .or_insert_with(|| json!({}));
        if !node.is_object() {
            *node = json!({});
        }
    }
    node.as_object_mut()
        .unwrap()
        .insert((*last).to_owned(), value);
}

/// For each place, a body holding that place and every later one with distinct values
/// (from `value_at(j)`): checks that each place is read, and that it beats all later ones.
fn assert_precedence<T: PartialEq + std::fmt::Debug>(
    base: &Value,
    places: &[Path],
    value_at: impl Fn(usize) -> Value,
    read: impl Fn(&Interaction) -> T,
    expected_at: impl Fn(usize) -> T,
) {
    for winner in 0..places.len() {
        let mut body = base.clone();
        for (j, path) in places.iter().enumerate().skip(winner) {
            put(&mut body, path, value_at(j));
        }
        assert_eq!(
            read(&decoded(&body)),
            expected_at(winner),
            "place {:?} should win in {body}",
            places[winner]
        );
    }
}

fn utc(rfc3339: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(rfc3339).unwrap().to_utc()
}

// ---- errors ----

#[test]
fn bodies_that_are_not_json_objects_are_refused_with_the_right_error() {
    let cases: &[(&[u8], DecodeError)] = &[
        (b"", DecodeError::InvalidJson),
        (b"not json", DecodeError::InvalidJson),
        (b"{\"type\":\"nps\"", DecodeError::InvalidJson),
        (b"{\"type\":\"nps\"} trailing", DecodeError::InvalidJson),
        (b"{\"type\":\"\xff\"}", DecodeError::InvalidJson),
        (b"[{\"type\":\"nps\"}]", DecodeError::NotAnObject),
        (b"\"nps\"", DecodeError::NotAnObject),
        (b"42", DecodeError::NotAnObject),
        (b"null", DecodeError::NotAnObject),
        (b"true", DecodeError::NotAnObject),
    ];
    for (body, expected) in cases {
        assert_eq!(
            decode_bytes(body).as_ref().err(),
            Some(expected),
            "{}",
            String::from_utf8_lossy(body)
        );
    }
}

#[test]
fn an_object_without_a_usable_kind_is_refused_with_no_kind() {
    let cases = [
        json!({}),
        json!({"data": {"user": {"user_id": "u1"}, "action": "started"}}),
        json!({"data": "nps"}),
        json!({"type": 5, "data": {"type": null, "event_type": ["nps"]}}),
        json!({"type": "   ", "event_type": ""}),
        json!({"event": ".started", "data": {"event": ":x"}}),
        json!({"event": {"type": "nps"}}),
    ];
    for body in cases {
        assert_eq!(decode_json(&body), Err(DecodeError::NoKind), "{body}");
    }
}

// ---- the contract's example and the reference doc's shapes ----

#[test]
fn the_spec_nps_example_decodes_completely() {
    let body = br#"{ "timestamp": 1726742461,
  "data": { "type": "nps", "score": 9, "feedback": "Love it", "hostname": "app.example.com",
        "user": { "user_id": "u_123", "email": "jane@example.com", "plan": "pro" } } }"#;
    let interaction = decode_bytes(body).unwrap();
    let user = json!({"user_id": "u_123", "email": "jane@example.com", "plan": "pro"});
    let data = json!({
        "type": "nps", "score": 9, "feedback": "Love it", "hostname": "app.example.com",
        "user": user,
    });
    assert_eq!(
        interaction,
        Interaction {
            kind: Kind::Nps,
            action: None,
            user: User {
                id: Some("u_123".into()),
                properties: user.as_object().unwrap().clone(),
            },
            company: None,
            content_id: None,
            content_name: None,
            event_name: None,
            occurred_at: Some(utc("2024-09-19T10:41:01Z")),
            data: data.as_object().unwrap().clone(),
        }
    );
}

#[test]
fn guessed_shapes_from_the_reference_doc_decode_to_the_expected_kind_and_action() {
    let cases = [
        (
            json!({"timestamp": 1726742461, "data": {"type": "nps", "status": "dismissed",
                   "user": {"user_id": "u1"}}}),
            Kind::Nps,
            Some(Action::Dismissed),
        ),
        (
            json!({"timestamp": 1726742461, "data": {"type": "flow", "status": "started",
                   "flow_id": "f_1", "flow_name": "Welcome tour", "hostname": "app.example.com",
                   "user": {"user_id": "u1", "plan": "pro"}}}),
            Kind::Experience,
            Some(Action::Started),
        ),
        (
            json!({"timestamp": 1726742461, "data": {"type": "checklist", "state": "completed",
                   "checklist_id": 2, "user": {"user_id": "u1"}}}),
            Kind::Checklist,
            Some(Action::Completed),
        ),
        (
            json!({"timestamp": 1726742461, "data": {"type": "survey", "form_id": "s1",
                   "answers": [{"question": "Why?", "answer": "Because"}],
                   "action": "submitted", "user": {"user_id": "u1"}}}),
            Kind::Form,
            Some(Action::Submitted),
        ),
        (
            json!({"timestamp": 1726742461, "data": {"type": "feature_tag", "action": "text_input",
                   "feature_id": "ft9", "feature_name": "Search box", "user": {"user_id": "u1"}}}),
            Kind::FeatureTag,
            Some(Action::TextInput),
        ),
        (
            json!({"timestamp": 1726742461, "data": {"type": "track",
                   "event_name": "Upgrade clicked", "user": {"user_id": "u1"}}}),
            Kind::TrackedEvent,
            None,
        ),
        // Data Sync export rows.
        (
            json!({"event_type": "track_feature", "event_name": "ft9", "user_id": "u1",
                   "company_id": "c1", "inserted_at": "2024-09-19 10:41:01.123456"}),
            Kind::FeatureTag,
            None,
        ),
        (
            json!({"event": "experience:448:DISMISSED", "user_id": "u1"}),
            Kind::Experience,
            Some(Action::Dismissed),
        ),
        (
            json!({"event": "checklist:2:SEEN", "user_id": "u1"}),
            Kind::Checklist,
            Some(Action::Started),
        ),
        // The speculative n8n node's `event` strings.
        (
            json!({"event": "flow.started", "flow_id": "f1", "user_id": "u1"}),
            Kind::Experience,
            Some(Action::Started),
        ),
        (
            json!({"event": "nps.submitted", "user_id": "u1"}),
            Kind::Nps,
            Some(Action::Submitted),
        ),
    ];
    for (body, kind, action) in cases {
        let interaction = decoded(&body);
        assert_eq!(interaction.kind, kind, "{body}");
        assert_eq!(interaction.action, action, "{body}");
        assert_eq!(interaction.user.id.as_deref(), Some("u1"), "{body}");
    }
}

#[test]
fn a_guessed_flow_shape_yields_content_and_time() {
    let interaction = decoded(&json!({
        "timestamp": 1726742461,
        "data": {"type": "experience", "status": "completed", "experience_id": 448,
                 "experience_name": "Welcome tour", "user": {"user_id": "u1"}},
    }));
    assert_eq!(interaction.content_id.as_deref(), Some("448"));
    assert_eq!(interaction.content_name.as_deref(), Some("Welcome tour"));
    assert_eq!(interaction.event_name.as_deref(), Some("Welcome tour"));
    assert_eq!(interaction.occurred_at, Some(utc("2024-09-19T10:41:01Z")));
}

#[test]
fn unknown_fields_are_kept_in_data_and_never_an_error() {
    let body = json!({
        "app_token": "NX-1", "weird": [1, {"a": null}],
        "data": {"type": "nps", "extra": {"deep": [true]}, "user": {"user_id": "u1"}},
    });
    let interaction = decoded(&body);
    assert_eq!(interaction.kind, Kind::Nps);
    assert_eq!(
        interaction.data.get("extra"),
        Some(&json!({"deep": [true]}))
    );
}

#[test]
fn data_is_empty_when_the_body_has_no_data_object() {
    for data in [None, Some(json!("x")), Some(json!([1])), Some(Value::Null)] {
        let mut body = json!({"type": "nps"});
        if let Some(data) = data {
            put(&mut body, &["data"], data);
        }
        assert!(decoded(&body).data.is_empty(), "{body}");
    }
}

// ---- kind ----

#[test]
fn kind_is_read_from_each_place_and_earlier_places_win() {
    let places: Vec<Path> = KIND_PLACES
        .iter()
        .chain(KIND_EVENT_PLACES)
        .copied()
        .collect();
    assert_precedence(
        &json!({}),
        &places,
        |j| json!(format!("k{j}.a{j}")),
        |i| i.kind.clone(),
        // The whole-string places keep the separator; the event places cut at it.
        |j| {
            Kind::Other(if j < KIND_PLACES.len() {
                format!("k{j}.a{j}")
            } else {
                format!("k{j}")
            })
        },
    );
}

#[test]
fn blank_or_non_string_kinds_are_skipped_for_the_next_place() {
    let body = json!({"type": "nps", "data": {"type": "  ", "event_type": 3}});
    assert_eq!(decoded(&body).kind, Kind::Nps);
    let body = json!({"event": ":x", "data": {"event": "form.submitted"}});
    assert_eq!(decoded(&body).kind, Kind::Form);
}

#[test]
fn kind_takes_the_first_segment_of_an_event_on_either_separator() {
    let cases = [
        ("flow.started", Kind::Experience),
        ("flow:started", Kind::Experience),
        ("experience:448:DISMISSED", Kind::Experience),
        ("nps", Kind::Nps),
        (" Check List .x", Kind::Checklist),
        ("banner.shown", Kind::Other("banner".into())),
    ];
    for (event, kind) in cases {
        assert_eq!(decoded(&json!({"event": event})).kind, kind, "{event}");
        assert_eq!(
            decoded(&json!({"data": {"event": event}})).kind,
            kind,
            "{event}"
        );
    }
}

#[test]
fn every_kind_synonym_is_recognized_whatever_its_case_and_separators() {
    let cases = [
        ("flow", Kind::Experience),
        ("experience", Kind::Experience),
        ("Experience", Kind::Experience),
        ("checklist", Kind::Checklist),
        ("CHECK_LIST", Kind::Checklist),
        ("nps", Kind::Nps),
        ("NPS", Kind::Nps),
        (" n-p s ", Kind::Nps),
        ("form", Kind::Form),
        ("survey", Kind::Form),
        ("feature_tag", Kind::FeatureTag),
        ("Feature Tag", Kind::FeatureTag),
        ("feature-tag", Kind::FeatureTag),
        ("feature", Kind::FeatureTag),
        ("track_feature", Kind::FeatureTag),
        ("TrackFeature", Kind::FeatureTag),
        ("track", Kind::TrackedEvent),
        ("tracked_event", Kind::TrackedEvent),
        ("Tracked Event", Kind::TrackedEvent),
        ("button", Kind::TrackedEvent),
        ("BUTTON", Kind::TrackedEvent),
    ];
    for (raw, kind) in cases {
        assert_eq!(decoded(&json!({"data": {"type": raw}})).kind, kind, "{raw}");
    }
}

#[test]
fn an_unknown_kind_is_kept_trimmed_but_otherwise_as_sent() {
    for (raw, kept) in [
        ("  Resource_Center ", "Resource_Center"),
        ("interaction", "interaction"),
        ("Spot Light", "Spot Light"),
    ] {
        let kind = decoded(&json!({"data": {"type": raw}})).kind;
        assert_eq!(kind, Kind::Other(kept.into()));
    }
}

// ---- action ----

#[test]
fn action_is_read_from_each_place_and_earlier_places_win() {
    let places: Vec<Path> = ACTION_PLACES
        .iter()
        .copied()
        .chain([ACTION_EVENT_PLACE])
        .collect();
    assert_precedence(
        &json!({"data": {"type": "nps"}}),
        &places,
        |j| json!(format!("x:a{j}")),
        |i| i.action.clone(),
        |j| Some(Action::Other(format!("a{j}"))),
    );
}

#[test]
fn action_takes_the_last_segment_of_a_separated_value() {
    let cases = [
        (
            json!({"data": {"type": "flow", "event": "flow.started"}}),
            Action::Started,
        ),
        (
            json!({"data": {"type": "x", "status": "experience:448:DISMISSED"}}),
            Action::Dismissed,
        ),
        (
            json!({"data": {"type": "x", "action": "a.b:score"}}),
            Action::Score,
        ),
        (
            json!({"data": {"type": "x", "action": "click"}}),
            Action::Click,
        ),
        (json!({"event": "nps:Ask Later"}), Action::AskLater),
        (json!({"event": "flow. started "}), Action::Started),
    ];
    for (body, action) in cases {
        assert_eq!(decoded(&body).action, Some(action), "{body}");
    }
}

#[test]
fn a_place_whose_last_segment_is_blank_is_skipped() {
    let body = json!({"data": {"type": "flow", "action": "flow.", "status": "completed"}});
    assert_eq!(decoded(&body).action, Some(Action::Completed));
}

#[test]
fn there_is_no_action_when_no_place_holds_one() {
    let cases = [
        json!({"data": {"type": "nps"}}),
        // A bare top-level `event` names the kind only.
        json!({"event": "nps"}),
        json!({"data": {"type": "nps", "action": 3, "status": "", "state": null}}),
        json!({"event": "nps:"}),
    ];
    for body in cases {
        assert_eq!(decoded(&body).action, None, "{body}");
    }
}

#[test]
fn a_bare_data_event_counts_as_the_action_as_the_lookup_order_says() {
    let interaction = decoded(&json!({"data": {"type": "nps", "event": "score"}}));
    assert_eq!(interaction.action, Some(Action::Score));
}

#[test]
fn every_action_synonym_is_recognized_whatever_its_case_and_separators() {
    let cases = [
        ("started", Action::Started),
        ("start", Action::Started),
        ("seen", Action::Started),
        ("SEEN", Action::Started),
        ("step", Action::Step),
        ("completed", Action::Completed),
        ("complete", Action::Completed),
        ("COMPLETED", Action::Completed),
        ("dismissed", Action::Dismissed),
        ("dismiss", Action::Dismissed),
        ("skipped", Action::Dismissed),
        ("Skipped", Action::Dismissed),
        ("task_completed", Action::TaskCompleted),
        ("Task Completed", Action::TaskCompleted),
        ("task-completed", Action::TaskCompleted),
        ("ask_later", Action::AskLater),
        ("AskLater", Action::AskLater),
        ("score", Action::Score),
        ("feedback", Action::Feedback),
        ("submitted", Action::Submitted),
        ("submit", Action::Submitted),
        ("click", Action::Click),
        ("hover", Action::Hover),
        ("text_input", Action::TextInput),
        ("Text Input", Action::TextInput),
        ("TEXT-INPUT", Action::TextInput),
    ];
    for (raw, action) in cases {
        let body = json!({"data": {"type": "x", "action": raw}});
        assert_eq!(decoded(&body).action, Some(action), "{raw}");
    }
}

#[test]
fn an_unknown_action_is_kept_trimmed_but_otherwise_as_sent() {
    let body = json!({"data": {"type": "x", "action": " Goal_Reached "}});
    assert_eq!(
        decoded(&body).action,
        Some(Action::Other("Goal_Reached".into()))
    );
}

// ---- user ----

#[test]
fn user_id_is_read_from_each_place_and_earlier_places_win() {
    assert_precedence(
        &json!({"data": {"type": "nps"}}),
        USER_ID_PLACES,
        |j| json!(format!("u{j}")),
        |i| i.user.id.clone(),
        |j| Some(format!("u{j}")),
    );
}

#[test]
fn ids_accept_numbers_and_skip_blanks_and_other_types() {
    let cases = [
        (json!(42), Some("42")),
        (json!(-7), Some("-7")),
        (json!(u64::MAX), Some("18446744073709551615")),
        (json!(1.5), Some("1.5")),
        (json!(" u 1 "), Some("u 1")),
        (json!(""), None),
        (json!("   "), None),
        (json!(true), None),
        (Value::Null, None),
        (json!({"id": 1}), None),
        (json!(["u1"]), None),
    ];
    for (value, expected) in cases {
        let body = json!({"data": {"type": "nps", "user": {"user_id": value}}});
        assert_eq!(decoded(&body).user.id.as_deref(), expected, "{value}");
    }
}

#[test]
fn a_non_id_in_an_earlier_place_falls_through_to_the_next() {
    let body = json!({"data": {"type": "nps", "user": {"user_id": false, "id": 7}}});
    assert_eq!(decoded(&body).user.id.as_deref(), Some("7"));
}

#[test]
fn user_properties_come_from_data_user_else_the_top_level_user() {
    let inner = json!({"user_id": "u1", "plan": "pro"});
    let outer = json!({"user_id": "u2", "email": "x@example.com"});
    let cases = [
        (
            json!({"data": {"type": "nps", "user": inner}, "user": outer}),
            inner.clone(),
        ),
        (
            json!({"data": {"type": "nps"}, "user": outer}),
            outer.clone(),
        ),
        (
            json!({"data": {"type": "nps", "user": "u1"}, "user": outer}),
            outer.clone(),
        ),
        (json!({"data": {"type": "nps"}, "user": "u2"}), json!({})),
        (json!({"data": {"type": "nps"}}), json!({})),
    ];
    for (body, expected) in cases {
        let properties = Value::Object(decoded(&body).user.properties);
        assert_eq!(properties, expected, "{body}");
    }
}

// ---- company ----

#[test]
fn company_is_read_from_data_company_else_company_in_every_form() {
    let cases = [
        (
            json!({"data": {"company": {"company_id": "c1", "id": "x", "size": 5}}}),
            Some(("c1", json!({"company_id": "c1", "id": "x", "size": 5}))),
        ),
        (
            json!({"data": {"company": {"id": 9, "size": 5}}}),
            Some(("9", json!({"id": 9, "size": 5}))),
        ),
        (
            json!({"company": {"company_id": "c2"}}),
            Some(("c2", json!({"company_id": "c2"}))),
        ),
        (
            json!({"data": {"company": {"company_id": "c1"}}, "company": {"company_id": "c2"}}),
            Some(("c1", json!({"company_id": "c1"}))),
        ),
        (
            json!({"data": {"company": "acme"}}),
            Some(("acme", json!({}))),
        ),
        (json!({"company": 77}), Some(("77", json!({})))),
        (
            json!({"data": {"company": "acme"}, "company": {"company_id": "c2"}}),
            Some(("acme", json!({}))),
        ),
        (
            json!({"data": {"company": true}, "company": "c2"}),
            Some(("c2", json!({}))),
        ),
        (json!({"data": {"company": " "}}), None),
        (json!({"data": {"company": null}}), None),
        (json!({}), None),
    ];
    for (mut body, expected) in cases {
        put(&mut body, &["type"], json!("nps"));
        let company = decoded(&body).company;
        let expected = expected.map(|(id, properties)| Company {
            id: Some(id.to_owned()),
            properties: properties.as_object().unwrap().clone(),
        });
        assert_eq!(company, expected, "{body}");
    }
}

#[test]
fn a_company_object_without_an_id_is_kept_with_its_properties() {
    let body = json!({"type": "nps", "data": {"company": {"name": "Acme", "company_id": ""}}});
    let company = decoded(&body).company.unwrap();
    assert_eq!(company.id, None);
    assert_eq!(company.properties.get("name"), Some(&json!("Acme")));
}

// ---- content and event names ----

#[test]
fn content_id_is_read_from_each_place_and_earlier_places_win() {
    assert_precedence(
        &json!({"data": {"type": "flow"}}),
        CONTENT_ID_PLACES,
        |j| json!(100 + j),
        |i| i.content_id.clone(),
        |j| Some((100 + j).to_string()),
    );
}

#[test]
fn content_name_is_read_from_each_place_and_earlier_places_win() {
    assert_precedence(
        &json!({"data": {"type": "flow"}}),
        CONTENT_NAME_PLACES,
        |j| json!(format!("name {j}")),
        |i| (i.content_name.clone(), i.event_name.clone()),
        |j| (Some(format!("name {j}")), Some(format!("name {j}"))),
    );
}

#[test]
fn content_names_must_be_strings() {
    let body = json!({"data": {"type": "flow", "name": 5, "title": " Tour "}});
    assert_eq!(decoded(&body).content_name.as_deref(), Some("Tour"));
}

#[test]
fn event_name_prefers_data_then_top_level_then_the_content_name() {
    let mut places: Vec<Path> = EVENT_NAME_PLACES.to_vec();
    places.push(&["data", "name"]);
    assert_precedence(
        &json!({"data": {"type": "track"}}),
        &places,
        |j| json!(format!("event {j}")),
        |i| i.event_name.clone(),
        |j| Some(format!("event {j}")),
    );
    let none = decoded(&json!({"data": {"type": "track", "event_name": ""}}));
    assert_eq!(none.event_name, None);
}

// ---- time ----

#[test]
fn occurred_at_is_read_from_each_place_and_earlier_places_win() {
    assert_precedence(
        &json!({"data": {"type": "nps"}}),
        TIME_PLACES,
        |j| json!(1_700_000_000 + j),
        |i| i.occurred_at,
        |j| DateTime::from_timestamp(1_700_000_000 + j as i64, 0),
    );
}

#[test]
fn an_unreadable_time_falls_through_to_the_next_place() {
    let body = json!({
        "timestamp": 1726742461,
        "data": {"type": "nps", "timestamp": "soon", "created_at": 1e300, "inserted_at": true},
    });
    assert_eq!(
        decoded(&body).occurred_at,
        Some(utc("2024-09-19T10:41:01Z"))
    );
}

#[test]
fn zero_negative_and_pre_1970_times_fall_through_to_the_receive_time() {
    // Every place holds a time at or before the epoch: none is used, so the mapper sends
    // the receive time instead of 1969.
    let body = json!({
        "timestamp": -1726742461,
        "data": {"type": "nps", "timestamp": 0, "created_at": "-1",
                 "inserted_at": "1969-07-20T20:17:40Z"},
    });
    assert_eq!(decoded(&body).occurred_at, None);
    // And one good place among them still wins over the receive time.
    let mut body = body;
    put(&mut body, &["data", "inserted_at"], json!(1726742461));
    assert_eq!(
        decoded(&body).occurred_at,
        Some(utc("2024-09-19T10:41:01Z"))
    );
}

#[test]
fn numeric_times_beyond_every_range_fall_through_to_the_next_place() {
    let body = br#"{"timestamp": 1726742461, "data": {"type": "nps", "timestamp": 1e400,
        "created_at": 123456789012345678901234567890, "inserted_at": -1e400}}"#;
    assert_eq!(
        decode_bytes(body).unwrap().occurred_at,
        Some(utc("2024-09-19T10:41:01Z"))
    );
}

// ---- numbers ----

/// `body_text` with `{n}` replaced by `literal`, decoded.
fn with_number(body_text: &str, literal: &str) -> Interaction {
    let body = body_text.replace("{n}", literal);
    decode_bytes(body.as_bytes()).unwrap_or_else(|e| panic!("{body} did not decode: {e}"))
}

#[test]
fn numeric_ids_are_kept_exactly_as_written() {
    let cases = [
        (
            "123456789012345678901234567890",
            "123456789012345678901234567890",
        ),
        (
            "-123456789012345678901234567890",
            "-123456789012345678901234567890",
        ),
        ("18446744073709551616", "18446744073709551616"), // u64::MAX + 1
        ("9007199254740993", "9007199254740993"),         // 2^53 + 1
        ("1.50", "1.50"),
        ("2.5e-3", "2.5e-3"),
        ("1e+2", "1e+2"),
        // serde_json's one change: an exponent is spelled `e+N` or `e-N`.
        ("1e400", "1e+400"),
        ("1E400", "1e+400"),
        ("1E-7", "1e-7"),
        ("-0", "-0"),
        ("0.0", "0.0"),
    ];
    let body = r#"{"data": {"type": "flow", "id": {n}, "user": {"user_id": {n}},
        "company": {"company_id": {n}}}}"#;
    for (literal, expected) in cases {
        let interaction = with_number(body, literal);
        assert_eq!(interaction.user.id.as_deref(), Some(expected), "{literal}");
        assert_eq!(
            interaction.content_id.as_deref(),
            Some(expected),
            "{literal}"
        );
        let company = interaction.company.unwrap();
        assert_eq!(company.id.as_deref(), Some(expected), "{literal}");
    }
}

#[test]
fn numbers_beyond_f64_are_kept_as_written_in_data_and_user_properties() {
    let interaction = with_number(
        r#"{"data": {"type": "nps", "score": {n}, "user": {"user_id": "u", "seats": {n}}}}"#,
        "1e400",
    );
    assert_eq!(interaction.data["score"].to_string(), "1e+400");
    assert_eq!(interaction.user.properties["seats"].to_string(), "1e+400");
}

// ---- never panics ----

/// Keys that the decoder looks up, so that random bodies reach its branches.
const KEYS: &[&str] = &[
    "data",
    "type",
    "event_type",
    "event",
    "action",
    "status",
    "state",
    "user",
    "user_id",
    "id",
    "company",
    "company_id",
    "name",
    "title",
    "event_name",
    "timestamp",
    "created_at",
    "inserted_at",
    "flow_id",
    "content_name",
];

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => proptest::sample::select(KEYS).prop_map(str::to_owned),
        1 => "[a-z_]{0,8}",
    ]
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| Number::from_f64(f).map_or(Value::Null, Value::Number)),
        proptest::sample::select(vec![
            "nps",
            "flow.started",
            "experience:448:DISMISSED",
            ":",
            ".",
            "",
            " ",
            "2024-09-19T10:41:01Z",
            "2024-09-19 10:41:01.5",
            "1726742461123",
            "NaN",
        ])
        .prop_map(Value::from),
        any::<String>().prop_map(Value::String),
    ]
}

/// Any number RFC 8259's grammar allows, with up to 40 digits in each part and exponents
/// far beyond f64 in both directions.
const JSON_NUMBER: &str = "-?(0|[1-9][0-9]{0,40})(\\.[0-9]{1,40})?([eE][+-]?[0-9]{1,5})?";
/// Stands in for the number until the body is text; JSON-plain, so `to_string` keeps it.
const PLACEHOLDER: &str = "__number_placeholder__";

/// Every place the decoder reads, plus places it only carries (a property, a nested one).
fn number_places() -> Vec<Vec<&'static str>> {
    let read = [
        KIND_PLACES,
        KIND_EVENT_PLACES,
        ACTION_PLACES,
        USER_PLACES,
        USER_ID_PLACES,
        COMPANY_PLACES,
        CONTENT_ID_PLACES,
        CONTENT_NAME_PLACES,
        EVENT_NAME_PLACES,
        TIME_PLACES,
    ];
    let mut places: Vec<Vec<&str>> = read
        .iter()
        .flat_map(|places| places.iter().map(|path| path.to_vec()))
        // `data.type` must stay the kind for the body to decode at all.
        .filter(|path| path != &["data", "type"])
        .collect();
    places.push(vec!["data", "company", "company_id"]);
    places.push(vec!["data", "score"]);
    places.push(vec!["data", "answers", "deep", "value"]);
    places.push(vec!["data", "user", "seats"]);
    places
}

fn json_value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            proptest::collection::btree_map(key(), inner, 0..8)
                .prop_map(|map| Value::Object(map.into_iter().collect())),
        ]
    })
}

proptest! {
    #[test]
    fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let result = decode_bytes(&bytes);
        if serde_json::from_slice::<Value>(&bytes).is_err() {
            prop_assert_eq!(result, Err(DecodeError::InvalidJson));
        }
    }

    #[test]
    fn decoding_arbitrary_json_never_panics_and_errs_only_as_specified(value in json_value()) {
        let result = decode_json(&value);
        match (&value, &result) {
            (Value::Object(_), Err(e)) => prop_assert_eq!(e, &DecodeError::NoKind),
            (Value::Object(root), Ok(interaction)) => {
                let data = root.get("data").and_then(Value::as_object).cloned();
                prop_assert_eq!(&interaction.data, &data.unwrap_or_default());
            }
            (_, result) => prop_assert_eq!(result, &Err(DecodeError::NotAnObject)),
        }
    }

    #[test]
    fn any_valid_json_number_in_any_place_never_makes_the_decoder_refuse_the_body(
        literal in JSON_NUMBER,
        place in proptest::sample::select(number_places()),
        base in json_value(),
    ) {
        // A body that decodes, with the number placed by text (a `Value` could not hold
        // `1e400` before it is parsed), over random other content.
        let mut body = match base {
            Value::Object(map) => Value::Object(map),
            _ => json!({}),
        };
        put(&mut body, &["data"], json!({"type": "nps"}));
        put(&mut body, &place, json!(PLACEHOLDER));
        let text = body.to_string().replace(&format!("\"{PLACEHOLDER}\""), &literal);
        let decoded = decode_bytes(text.as_bytes());
        prop_assert!(decoded.is_ok(), "{} refused: {:?}", text, decoded);
        let interaction = decoded.unwrap_or_else(|_| unreachable!());
        // Where the number is an id, it is the text as written, with the exponent spelled
        // `e+N` or `e-N`.
        let written = match literal.replace('E', "e").split_once('e') {
            Some((mantissa, exponent)) if !exponent.starts_with(['+', '-']) => {
                format!("{mantissa}e+{exponent}")
            }
            _ => literal.replace('E', "e"),
        };
        if place == ["data", "user", "user_id"] {
            prop_assert_eq!(interaction.user.id, Some(written));
        } else if place == ["data", "id"] {
            prop_assert_eq!(interaction.content_id, Some(written));
        }
    }

    #[test]
    fn any_body_with_a_data_type_string_decodes(value in json_value(), kind in "[a-z ]{0,5}[a-z][a-z ]{0,5}") {
        let mut body = match value {
            Value::Object(map) => Value::Object(map),
            _ => json!({}),
        };
        put(&mut body, &["data"], json!({"type": kind}));
        prop_assert!(decode_json(&body).is_ok());
    }
}

#[test]
fn times_outside_the_years_0000_to_9999_fall_through_to_the_next_place() {
    // Found by fuzzing: these printed as `+10000-…` or `-0001-…`, which Heap cannot read.
    for (outer, expected) in [
        (json!(253_402_300_800_i64), None), // year 10000 in seconds
        (json!("0863363371230"), None),     // pre-2001 ms read as seconds
        (json!("-0001-12-31T23:59:59Z"), None),
        (json!(1_726_742_461), Some(1_726_742_461)),
    ] {
        let body = json!({ "timestamp": outer, "data": { "type": "nps",
            "created_at": 253_402_300_800_000_i64, "user": { "user_id": "u" } } });
        let decoded = decode_bytes(body.to_string().as_bytes()).unwrap();
        assert_eq!(
            decoded.occurred_at.map(|t| t.timestamp()),
            expected,
            "{outer}"
        );
    }
}
