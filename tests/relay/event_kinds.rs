//! What Heap receives for each Userpilot event, through the real server and forwarder against the
//! fake Heap: the event name of every kind and action of contract §2.3 (and the payload shapes of
//! contract §2.2), identity, timestamp, idempotency keys and flattened properties (contract §2.4),
//! user and account properties, `heap.identity`, and `[mapping]` renames and drops.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::support::{APP_ID, FakeHeap, Relay};
use chrono::{DateTime, Utc};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(10);

/// `data` with `data.user` set to a user with `user_id`, in a body with a recent timestamp.
fn webhook(user_id: &str, data: Value) -> Value {
    let mut data = data;
    data["user"] = json!({ "user_id": user_id });
    json!({ "timestamp": chrono::Utc::now().timestamp(), "data": data })
}

/// Posts `body` and asserts it was accepted with `events` Heap events.
async fn accept(relay: &Relay, body: &Value, events: usize) {
    let (status, answer) = relay.post(body).await;
    assert_eq!(
        (status, answer),
        (202, json!({"status": "accepted", "events": events})),
        "{body}"
    );
}

/// Waits until the queue has nothing left to send and `delivered` records were delivered, so
/// that what Heap has not received by then it never will.
async fn wait_until_settled(relay: &Relay, delivered: u64) {
    relay
        .wait_for_status(WAIT, |status| {
            let queue = &status["queue"];
            queue["pending"] == 0 && queue["in_flight"] == 0 && queue["delivered"] == delivered
        })
        .await;
}

/// Track events Heap received, by identity, names sorted.
fn names_by_identity(events: &[Value]) -> BTreeMap<String, Vec<String>> {
    let mut names: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for event in events {
        names
            .entry(event["identity"].as_str().unwrap().to_owned())
            .or_default()
            .push(event["event"].as_str().unwrap().to_owned());
    }
    for list in names.values_mut() {
        list.sort();
    }
    names
}

/// Posts each `(body, expected names)` for a distinct identity (the bodies' own) and checks
/// that Heap received exactly those names for each identity, with the right `app_id`.
async fn assert_names(relay: &Relay, heap: &FakeHeap, cases: &[(Value, String, &[&str])]) {
    let mut total = 0;
    for (body, _, expected) in cases {
        accept(relay, body, expected.len()).await;
        total += expected.len();
    }
    let events = heap.wait_for_events(total, WAIT).await;
    let received = names_by_identity(&events);
    for (body, identity, expected) in cases {
        let mut expected: Vec<String> = expected.iter().map(|s| (*s).to_owned()).collect();
        expected.sort();
        assert_eq!(
            received.get(identity),
            Some(&expected),
            "for {body}\nHeap received {received:#?}"
        );
    }
    assert_eq!(events.len(), total, "{received:#?}");
    for request in heap.requests().iter().filter(|r| r.path == "/api/track") {
        assert_eq!(request.body["app_id"], APP_ID);
    }
}

#[tokio::test]
async fn every_kind_and_action_gets_the_native_heap_event_name() {
    let heap = FakeHeap::start().await;
    let relay = Relay::start(&heap, "").await;
    let table: Vec<(Value, &[&str])> = vec![
        // Experiences (flows), with the synonyms of contract §2.2.
        (
            json!({"type": "flow", "action": "started", "flow_id": "fl_1", "flow_name": "Onboarding"}),
            &["Userpilot Experience (started)"],
        ),
        (
            json!({"type": "experience", "action": "start", "experience_id": "fl_1"}),
            &["Userpilot Experience (started)"],
        ),
        (
            json!({"type": "flow", "action": "seen"}),
            &["Userpilot Experience (started)"],
        ),
        (
            json!({"type": "flow", "action": "step", "flow_id": "fl_1", "step": 2}),
            &["Userpilot Experience (step)"],
        ),
        (
            json!({"type": "flow", "action": "completed"}),
            &["Userpilot Experience (completed)"],
        ),
        (
            json!({"type": "Flow", "action": "Complete"}),
            &["Userpilot Experience (completed)"],
        ),
        (
            json!({"type": "experience", "action": "dismissed"}),
            &["Userpilot Experience (dismissed)"],
        ),
        (
            json!({"type": "flow", "action": "skipped"}),
            &["Userpilot Experience (dismissed)"],
        ),
        // Checklists.
        (
            json!({"type": "checklist", "action": "started", "checklist_id": "ck_1"}),
            &["Userpilot Checklist (started)"],
        ),
        (
            json!({"type": "checklist", "action": "task_completed", "task": "Invite a teammate"}),
            &["Userpilot Checklist (task completed)"],
        ),
        (
            json!({"type": "checklist", "action": "Task Completed"}),
            &["Userpilot Checklist (task completed)"],
        ),
        (
            json!({"type": "CHECKLIST", "action": "TASK-COMPLETED"}),
            &["Userpilot Checklist (task completed)"],
        ),
        (
            json!({"type": "checklist", "action": "completed"}),
            &["Userpilot Checklist (completed)"],
        ),
        (
            json!({"type": "checklist", "action": "dismissed"}),
            &["Userpilot Checklist (dismissed)"],
        ),
        // NPS: an answer without an action is a score, plus feedback when there is some.
        (
            json!({"type": "nps", "score": 9, "feedback": "Love it"}),
            &["Userpilot NPS (score)", "Userpilot NPS (feedback)"],
        ),
        (
            json!({"type": "nps", "score": 0}),
            &["Userpilot NPS (score)"],
        ),
        (
            json!({"type": "nps", "score": 6, "feedback": "   "}),
            &["Userpilot NPS (score)"],
        ),
        (
            json!({"type": "nps", "action": "score", "score": 3}),
            &["Userpilot NPS (score)"],
        ),
        (
            json!({"type": "nps", "action": "feedback", "feedback": "Slow"}),
            &["Userpilot NPS (feedback)"],
        ),
        (
            json!({"type": "nps", "action": "dismissed"}),
            &["Userpilot NPS (ask later)"],
        ),
        (
            json!({"type": "nps", "action": "ask_later"}),
            &["Userpilot NPS (ask later)"],
        ),
        (
            json!({"type": "NPS", "status": "dismiss"}),
            &["Userpilot NPS (ask later)"],
        ),
        // Forms and surveys.
        (
            json!({"type": "form", "action": "submitted", "form_id": "fm_1"}),
            &["Userpilot Form (submitted)"],
        ),
        (
            json!({"type": "survey", "action": "submit", "survey_id": "sv_1"}),
            &["Userpilot Form (submitted)"],
        ),
        // Feature tags.
        (
            json!({"type": "feature_tag", "action": "click", "feature_id": "ft_1", "feature_name": "Export"}),
            &["Userpilot Feature Tag (click)"],
        ),
        (
            json!({"type": "feature", "action": "hover", "feature_id": "ft_1"}),
            &["Userpilot Feature Tag (hover)"],
        ),
        (
            json!({"type": "track_feature", "action": "text_input"}),
            &["Userpilot Feature Tag (text input)"],
        ),
        (
            json!({"type": "feature_tag", "action": "Text Input"}),
            &["Userpilot Feature Tag (text input)"],
        ),
        // Button-tracked events carry their own name.
        (
            json!({"type": "track", "event_name": "Clicked Upgrade"}),
            &["Userpilot Tracked Event (Clicked Upgrade)"],
        ),
        (
            json!({"type": "tracked_event", "event_name": "Opened Billing"}),
            &["Userpilot Tracked Event (Opened Billing)"],
        ),
        (
            json!({"type": "button", "name": "Pressed Buy"}),
            &["Userpilot Tracked Event (Pressed Buy)"],
        ),
        // Any other kind: title-cased kind, lower-cased action with `_` as spaces.
        (
            json!({"type": "resource_center", "action": "Opened_Link"}),
            &["Userpilot Resource Center (opened link)"],
        ),
        (
            json!({"type": "banner", "action": "shown"}),
            &["Userpilot Banner (shown)"],
        ),
    ];
    let cases: Vec<(Value, String, &[&str])> = table
        .into_iter()
        .enumerate()
        .map(|(i, (data, names))| {
            let identity = format!("u_{i}");
            (webhook(&identity, data), identity, names)
        })
        .collect();
    assert_names(&relay, &heap, &cases).await;
    relay.stop().await;
}

#[tokio::test]
async fn the_payload_shapes_of_spec_2_2_are_decoded() {
    let heap = FakeHeap::start().await;
    let relay = Relay::start(&heap, "").await;
    let now = chrono::Utc::now().timestamp();
    let cases: Vec<(Value, String, &[&str])> = vec![
        (
            json!({"event": "flow.started", "user_id": "v_event", "timestamp": now}),
            "v_event".into(),
            &["Userpilot Experience (started)"],
        ),
        (
            json!({"event_type": "checklist", "status": "completed", "user": {"user_id": "v_top"}}),
            "v_top".into(),
            &["Userpilot Checklist (completed)"],
        ),
        (
            json!({"data": {"event_type": "form", "action": "submitted", "user_id": "v_data"}}),
            "v_data".into(),
            &["Userpilot Form (submitted)"],
        ),
        (
            json!({"data": {"type": "nps", "score": 8, "user_id": 12345}}),
            "12345".into(),
            &["Userpilot NPS (score)"],
        ),
        (
            json!({"data": {"event": "checklist:12:TASK_COMPLETED", "user": {"id": "v_sync"}}}),
            "v_sync".into(),
            &["Userpilot Checklist (task completed)"],
        ),
        (
            json!({"type": "flow", "action": "dismissed", "data": {"user": {"user_id": 42}}}),
            "42".into(),
            &["Userpilot Experience (dismissed)"],
        ),
        (
            json!({"data": {"event": "feature_tag.click", "user": {"user_id": "v_dotted"}}}),
            "v_dotted".into(),
            &["Userpilot Feature Tag (click)"],
        ),
        (
            json!({"data": {"type": "nps", "state": "ask_later", "user": {"user_id": "v_state"}},
                   "unknown": {"fields": ["are", "fine"]}}),
            "v_state".into(),
            &["Userpilot NPS (ask later)"],
        ),
    ];
    assert_names(&relay, &heap, &cases).await;
    relay.stop().await;
}

#[tokio::test]
async fn the_event_time_is_the_payload_time_in_utc_else_the_receive_time() {
    let heap = FakeHeap::start().await;
    let relay = Relay::start(&heap, "").await;
    let flow = |user: &str, extra: Value| {
        let mut data = json!({"type": "flow", "action": "started", "user": {"user_id": user}});
        data.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        data
    };
    let cases = [
        (
            "t_seconds",
            json!({"timestamp": 1_726_742_461, "data": flow("t_seconds", json!({}))}),
            "2024-09-19T10:41:01Z",
        ),
        (
            "t_millis",
            json!({"data": flow("t_millis", json!({"timestamp": 1_726_742_461_123_i64}))}),
            "2024-09-19T10:41:01.123Z",
        ),
        (
            "t_offset",
            json!({"data": flow("t_offset", json!({"created_at": "2024-09-19T12:41:01+02:00"}))}),
            "2024-09-19T10:41:01Z",
        ),
        (
            "t_naive",
            json!({"data": flow("t_naive", json!({"inserted_at": "2024-09-19T10:41:01"}))}),
            "2024-09-19T10:41:01Z",
        ),
    ];
    for (_, body, _) in &cases {
        accept(&relay, body, 1).await;
    }
    let before = Utc::now();
    accept(&relay, &json!({"data": flow("t_absent", json!({}))}), 1).await;
    let after = Utc::now();

    let events = heap.wait_for_events(cases.len() + 1, WAIT).await;
    let time_of = |identity: &str| -> String {
        let event = events.iter().find(|e| e["identity"] == identity).unwrap();
        event["timestamp"].as_str().unwrap().to_owned()
    };
    for (identity, _, expected) in &cases {
        assert_eq!(time_of(identity), *expected, "{identity}");
    }
    let received = time_of("t_absent");
    assert!(received.ends_with('Z'), "{received}");
    let received: DateTime<Utc> = received.parse().unwrap();
    // Second precision is enough for "the receive time"; allow for a truncated fraction.
    assert!(
        received >= before - chrono::Duration::seconds(1) && received <= after,
        "{received} not within {before}..{after}"
    );
    relay.stop().await;
}

#[tokio::test]
async fn event_properties_are_the_flattened_data_without_user_and_company() {
    let heap = FakeHeap::start().await;
    let relay = Relay::start(&heap, "").await;
    let body = json!({
        "timestamp": 1_726_742_461,
        "data": {
            "type": "flow", "action": "started", "flow_id": "fl_1", "flow_name": "Onboarding",
            "step": 2, "ratio": 0.5,
            "nested": {"a": {"b": "deep"}, "n": 1},
            "flag": true, "off": false, "nothing": null,
            "tags": ["a", "b", 3, true],
            "answers": [{"question": "Role?", "answer": "PM"}],
            "source": "spoofed",
            "long": "é".repeat(2000),
            "k".repeat(1100): 1,
            "user": {"user_id": "u_props", "email": "jane@example.com"},
            "company": {"company_id": "c_1", "name": "Acme"}
        }
    });
    accept(&relay, &body, 1).await;
    let event = heap.wait_for_events(1, WAIT).await.remove(0);

    assert_eq!(
        event["app_id"],
        Value::Null,
        "app_id belongs to the request, not the event"
    );
    assert_eq!(event["event"], "Userpilot Experience (started)");
    assert_eq!(event["identity"], "u_props");
    assert_eq!(event["timestamp"], "2024-09-19T10:41:01Z");
    // Strings and keys are cut to 1023 characters (not bytes).
    let mut properties = event["properties"].as_object().unwrap().clone();
    assert_eq!(properties.remove("long"), Some(json!("é".repeat(1023))));
    assert_eq!(properties.remove(&"k".repeat(1023)), Some(json!(1)));
    assert_eq!(
        Value::Object(properties),
        json!({
            "type": "flow", "action": "started", "flow_id": "fl_1", "flow_name": "Onboarding",
            "step": 2, "ratio": 0.5,
            "nested.a.b": "deep", "nested.n": 1,
            "flag": "true", "off": "false",
            "tags": "a||b||3||true",
            "answers.0.question": "Role?", "answers.0.answer": "PM",
            "source": "userpilot"
        })
    );
    let track = heap
        .requests()
        .into_iter()
        .find(|r| r.path == "/api/track")
        .unwrap();
    assert_eq!(track.body["app_id"], APP_ID);
    relay.stop().await;
}

fn is_sha256_hex(key: &Value) -> bool {
    key.as_str().is_some_and(|k| {
        k.len() == 64
            && k.chars()
                .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
    })
}

#[tokio::test]
async fn idempotency_keys_are_per_event_and_stable_across_redeliveries() {
    let heap = FakeHeap::start().await;
    let first = Relay::start(&heap, "").await;
    // A second relay with its own queue does not know the webhook: it sends it again, as a
    // relay would after losing its queue, and Heap must be able to tell.
    let second = Relay::start(&heap, "").await;
    let body = webhook(
        "u_keys",
        json!({"type": "nps", "score": 9, "feedback": "Love it"}),
    );
    let other = webhook(
        "u_keys",
        json!({"type": "nps", "score": 9, "feedback": "Love it too"}),
    );

    accept(&first, &body, 2).await;
    let events = heap.wait_for_events(2, WAIT).await;
    let keys: Vec<&Value> = events.iter().map(|e| &e["idempotency_key"]).collect();
    assert!(keys.iter().all(|k| is_sha256_hex(k)), "{keys:?}");
    assert_ne!(keys[0], keys[1], "score and feedback share a key");

    // The signature's `t` differs between deliveries; the key must not.
    accept(&second, &body, 2).await;
    accept(&second, &other, 2).await;
    let events = heap.wait_for_events(6, WAIT).await;
    let mut keys: BTreeMap<(String, String), Vec<Value>> = BTreeMap::new();
    for event in &events {
        let feedback = event["properties"]["feedback"].as_str().unwrap().to_owned();
        let name = event["event"].as_str().unwrap().to_owned();
        keys.entry((feedback, name))
            .or_default()
            .push(event["idempotency_key"].clone());
    }
    assert_eq!(keys.len(), 4, "{keys:#?}");
    for ((feedback, name), found) in &keys {
        let copies = if feedback == "Love it" { 2 } else { 1 };
        assert_eq!(found.len(), copies, "{feedback} / {name}");
        assert!(
            found.iter().all(|k| k == &found[0]),
            "redelivery changed the key: {found:?}"
        );
        assert!(is_sha256_hex(&found[0]), "{found:?}");
    }
    let distinct: BTreeSet<String> = keys.values().map(|found| found[0].to_string()).collect();
    assert_eq!(distinct.len(), 4, "two events share a key: {keys:#?}");
    first.stop().await;
    second.stop().await;
}

#[tokio::test]
async fn user_properties_go_to_add_user_properties_for_the_same_identity() {
    let heap = FakeHeap::start().await;
    let relay = Relay::start(&heap, "").await;
    let body = json!({
        "timestamp": chrono::Utc::now().timestamp(),
        "data": {
            "type": "checklist", "action": "completed",
            "user": {
                "user_id": "u_user", "id": "internal-7", "email": "jane@example.com",
                "plan": "pro", "seats": 12, "beta": true, "address": {"city": "Paris"},
                "nothing": null
            },
            "company": {"company_id": "c_1", "name": "Acme"}
        }
    });
    accept(&relay, &body, 1).await;
    let users = heap
        .wait_for_accepted("/api/add_user_properties", "users", 1, WAIT)
        .await;
    assert_eq!(
        users,
        vec![json!({
            "identity": "u_user",
            "properties": {
                "email": "jane@example.com", "plan": "pro", "seats": 12, "beta": "true",
                "address.city": "Paris"
            }
        })]
    );
    let event = heap.wait_for_events(1, WAIT).await.remove(0);
    assert_eq!(event["identity"], "u_user");
    let request = heap
        .requests()
        .into_iter()
        .find(|r| r.path == "/api/add_user_properties")
        .unwrap();
    assert_eq!(request.body["app_id"], APP_ID);

    // Account properties are off by default.
    wait_until_settled(&relay, 2).await;
    assert!(
        heap.requests()
            .iter()
            .all(|r| r.path != "/api/add_account_properties"),
        "account properties sent while disabled"
    );
    relay.stop().await;
}

#[tokio::test]
async fn user_properties_are_not_sent_when_disabled() {
    let heap = FakeHeap::start().await;
    let relay = Relay::start(&heap, "[heap]\nuser_properties = false").await;
    let body = json!({
        "timestamp": chrono::Utc::now().timestamp(),
        "data": {"type": "flow", "action": "completed", "user": {"user_id": "u_quiet", "plan": "pro"}}
    });
    accept(&relay, &body, 1).await;
    heap.wait_for_events(1, WAIT).await;
    wait_until_settled(&relay, 1).await;
    assert!(heap.requests().iter().all(|r| r.path == "/api/track"));
    relay.stop().await;
}

#[tokio::test]
async fn company_properties_go_to_add_account_properties_when_enabled() {
    let heap = FakeHeap::start().await;
    let relay = Relay::start(&heap, "[heap]\naccount_properties = true").await;
    let body = json!({
        "timestamp": chrono::Utc::now().timestamp(),
        "data": {
            "type": "flow", "action": "completed",
            "user": {"user_id": "u_account"},
            "company": {"company_id": "c_1", "id": "internal", "name": "Acme", "employees": 50, "paying": false}
        }
    });
    accept(&relay, &body, 1).await;
    let accounts = heap
        .wait_for_accepted("/api/add_account_properties", "accounts", 1, WAIT)
        .await;
    assert_eq!(
        accounts,
        vec![json!({
            "account_id": "c_1",
            "properties": {"name": "Acme", "employees": 50, "paying": "false"}
        })]
    );
    let request = heap
        .requests()
        .into_iter()
        .find(|r| r.path == "/api/add_account_properties")
        .unwrap();
    assert_eq!(request.body["app_id"], APP_ID);
    let event = heap.wait_for_events(1, WAIT).await.remove(0);
    let keys: Vec<&String> = event["properties"].as_object().unwrap().keys().collect();
    assert!(
        keys.iter()
            .all(|k| !k.starts_with("company") && !k.starts_with("user")),
        "{keys:?}"
    );
    relay.stop().await;
}

#[tokio::test]
async fn identity_email_uses_the_users_email_for_events_and_user_properties() {
    let heap = FakeHeap::start().await;
    let relay = Relay::start(&heap, "[heap]\nidentity = \"email\"").await;
    let body = json!({
        "timestamp": chrono::Utc::now().timestamp(),
        "data": {
            "type": "nps", "action": "dismissed",
            "user": {"user_id": "u_mail", "email": "jane@example.com", "plan": "pro"}
        }
    });
    accept(&relay, &body, 1).await;
    let event = heap.wait_for_events(1, WAIT).await.remove(0);
    assert_eq!(event["identity"], "jane@example.com");
    let users = heap
        .wait_for_accepted("/api/add_user_properties", "users", 1, WAIT)
        .await;
    assert_eq!(users[0]["identity"], "jane@example.com");

    // A user without the identity property cannot be sent; it is quarantined, not guessed.
    let (status, answer) = relay
        .post(&webhook(
            "u_nomail",
            json!({"type": "flow", "action": "started"}),
        ))
        .await;
    assert_eq!((status, answer), (202, json!({"status": "quarantined"})));
    let (_, answer) = relay
        .admin(reqwest::Method::GET, "/admin/dead-letters")
        .await;
    assert_eq!(
        answer["dead_letters"][0]["reason"], "no_identity",
        "{answer}"
    );
    relay.stop().await;
}

#[tokio::test]
async fn mapping_renames_and_drops_event_names() {
    let heap = FakeHeap::start().await;
    let relay = Relay::start(
        &heap,
        r#"[mapping]
rename = { "Userpilot NPS (ask later)" = "NPS later", "Userpilot Feature Tag (click)" = "Clicked feature" }
drop = ["Userpilot Feature Tag (hover)", "Clicked feature", "Userpilot NPS (feedback)"]"#,
    )
    .await;

    accept(
        &relay,
        &webhook("m_later", json!({"type": "nps", "action": "dismissed"})),
        1,
    )
    .await;
    // Dropped by its original name.
    accept(
        &relay,
        &webhook("m_hover", json!({"type": "feature_tag", "action": "hover"})),
        0,
    )
    .await;
    // Dropped by its new name.
    accept(
        &relay,
        &webhook("m_click", json!({"type": "feature_tag", "action": "click"})),
        0,
    )
    .await;
    // One of two events dropped.
    accept(
        &relay,
        &webhook(
            "m_nps",
            json!({"type": "nps", "score": 10, "feedback": "Great"}),
        ),
        1,
    )
    .await;
    accept(
        &relay,
        &webhook("m_flow", json!({"type": "flow", "action": "started"})),
        1,
    )
    .await;

    let events = heap.wait_for_events(3, WAIT).await;
    // The users carry no properties besides their id, so the 3 events are all there is.
    wait_until_settled(&relay, 3).await;
    let names = names_by_identity(&heap.events());
    assert_eq!(
        names,
        BTreeMap::from([
            ("m_later".to_owned(), vec!["NPS later".to_owned()]),
            ("m_nps".to_owned(), vec!["Userpilot NPS (score)".to_owned()]),
            (
                "m_flow".to_owned(),
                vec!["Userpilot Experience (started)".to_owned()]
            ),
        ]),
        "{events:?}"
    );
    relay.stop().await;
}
