//! Payload shapes (contract §10.4) end to end: every sample of `samples.rs` posted to the real
//! binary is recorded once per shape with its count and first/last sighting, its sample
//! redacted so that no string or number of the payload survives but the kind and action
//! fields, listed newest first by `GET /admin/shapes` and by the `shapes` command, filtered
//! by source; the shapes survive a restart (counting on, no first-sighting line again); the
//! per-source bound holds and counts the overflow; `full` and `off` samples.

use std::collections::HashMap;
use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use userpilot_heap_relay::samples;
use userpilot_heap_relay::shapes;
use userpilot_heap_relay::userpilot::{Verified, decode};

use crate::support::{FakeHeap, RelayProcess, run_cli, set_env};

/// The places of the kind and action (contract §2.2) whose strings a redacted sample keeps.
const KEPT: &[&str] = &[
    "type",
    "event_type",
    "event",
    "action",
    "status",
    "data.type",
    "data.event_type",
    "data.event",
    "data.action",
    "data.status",
    "data.state",
];

/// Every sample of `samples.rs`, for a run marked `nonce`.
fn all_samples(nonce: &str) -> Vec<(&'static str, Value)> {
    samples::all("shape-user", chrono::Utc::now().timestamp(), nonce)
}

/// The key the relay gives `payload` on source `default`.
fn key_of(payload: &Value) -> String {
    let decoded = decode(&Verified::from_queue(
        payload.to_string().into_bytes().into(),
    ))
    .ok();
    let shape = shapes::of(
        payload,
        decoded.as_ref().map(|d| &d.kind),
        decoded.as_ref().and_then(|d| d.action.as_ref()),
    );
    hex::encode(shape.key("default"))
}

/// Asserts that `sample` is `original` with every string and number replaced by its
/// placeholder, except strings at the kind and action fields, which are kept.
fn assert_redacted(original: &Value, sample: &Value, path: &str) {
    match (original, sample) {
        (Value::String(_), _) if KEPT.contains(&path) => {
            assert_eq!(sample, original, "{path}: a kind or action field is kept");
        }
        (Value::String(text), Value::String(placeholder)) => assert_eq!(
            placeholder,
            &format!("<string:{}>", text.chars().count()),
            "{path}"
        ),
        (Value::Number(_), Value::String(placeholder)) => {
            assert_eq!(placeholder, "<number>", "{path}")
        }
        (Value::Object(a), Value::Object(b)) => {
            assert_eq!(
                a.keys().collect::<Vec<_>>(),
                b.keys().collect::<Vec<_>>(),
                "{path}"
            );
            for (key, value) in a {
                let inner = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                assert_redacted(value, &b[key], &inner);
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            assert_eq!(a.len(), b.len(), "{path}");
            for (value, redacted) in a.iter().zip(b) {
                assert_redacted(value, redacted, &format!("{path}[]"));
            }
        }
        (Value::Bool(_) | Value::Null, _) => assert_eq!(sample, original, "{path}"),
        _ => panic!("{path}: {original} became {sample}"),
    }
}

async fn listed(relay: &RelayProcess, query: &str) -> Vec<Value> {
    let (status, body) = relay
        .admin(Method::GET, &format!("/admin/shapes{query}"))
        .await;
    assert_eq!(status, 200, "{body}");
    body["shapes"].as_array().unwrap().clone()
}

fn new_shape_lines(relay: &RelayProcess) -> usize {
    relay
        .logs()
        .iter()
        .filter(|line| line.contains("new payload shape"))
        .count()
}

#[tokio::test]
async fn every_sample_is_recorded_once_per_shape_redacted_counted_and_kept_across_a_restart() {
    let heap = FakeHeap::start().await;
    let dir = tempfile::tempdir().unwrap();
    let env = RelayProcess::env(&heap, dir.path());
    let mut relay = RelayProcess::spawn(&env);

    let first = all_samples("first");
    let mut expected: HashMap<String, (usize, &Value)> = HashMap::new();
    for (label, payload) in &first {
        let (status, answer) = relay.post(payload).await;
        assert_eq!(status, 202, "{label}: {answer}");
        let entry = expected.entry(key_of(payload)).or_insert((0, payload));
        entry.0 += 1;
        entry.1 = payload;
    }
    let second = all_samples("second");
    for (label, payload) in &second {
        let (status, answer) = relay.post(payload).await;
        assert_eq!(status, 202, "{label}: {answer}");
        let entry = expected.get_mut(&key_of(payload)).unwrap();
        entry.0 += 1;
        entry.1 = payload;
    }

    let shapes = listed(&relay, "").await;
    assert_eq!(shapes.len(), expected.len(), "one per distinct shape");
    let last_seen: Vec<i64> = shapes
        .iter()
        .map(|s| s["last_seen_ms"].as_i64().unwrap())
        .collect();
    assert!(
        last_seen.is_sorted_by(|a, b| a >= b),
        "newest first: {last_seen:?}"
    );
    for shape in &shapes {
        let (count, latest) = expected[shape["key"].as_str().unwrap()];
        assert_eq!(shape["count"], json!(count), "{shape}");
        assert_eq!(shape["source"], "default");
        assert!(shape["first_seen_ms"].as_i64() <= shape["last_seen_ms"].as_i64());
        assert!(shape["kind"].is_string(), "every sample decodes: {shape}");
        assert!(
            shape["paths"]
                .as_array()
                .unwrap()
                .contains(&json!("data.user.user_id:string")),
            "{shape}"
        );
        // No string or number of the payload survives, but the kind and action fields.
        assert_redacted(latest, &shape["sample"], "");
    }
    assert_eq!(
        new_shape_lines(&relay),
        expected.len(),
        "one info line per new shape"
    );
    assert!(listed(&relay, "?source=elsewhere").await.is_empty());
    assert_eq!(listed(&relay, "?source=default").await, shapes);

    // A restart on the same queue: the shapes are there, and counting goes on.
    relay.terminate(Duration::from_secs(10)).await;
    let relay = RelayProcess::spawn(&env);
    let (label, payload) = &all_samples("third")[0];
    let (status, answer) = relay.post(payload).await;
    assert_eq!(status, 202, "{label}: {answer}");
    assert_eq!(
        new_shape_lines(&relay),
        0,
        "a known shape is not new after a restart"
    );
    let after = listed(&relay, "").await;
    assert_eq!(after.len(), expected.len());
    let key = key_of(payload);
    assert_eq!(
        after[0]["key"],
        json!(key),
        "the latest sighting comes first"
    );
    assert_eq!(after[0]["count"], json!(expected[&key].0 + 1));

    // The command lists the same, one JSON object a line, newest first.
    let output = run_cli(&env, &["shapes", "--source", "default"]);
    assert!(output.status.success(), "{output:?}");
    let lines: Vec<Value> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(lines, after);
}

#[tokio::test]
async fn beyond_the_bound_new_shapes_are_counted_not_stored_and_known_ones_still_count() {
    let heap = FakeHeap::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut env = RelayProcess::env(&heap, dir.path());
    set_env(&mut env, "RELAY_CAPTURE__MAX_SHAPES_PER_SOURCE", "2");
    let relay = RelayProcess::spawn(&env);
    // `seq` makes every body new (no duplicate) without changing its shape.
    let payload = |field: &str, seq: usize| {
        json!({"data": {"type": "flow", "action": "started", "user": {"user_id": "u"},
                        "seq": seq.to_string(), field: 1}})
    };
    for (seq, field) in ["a", "b", "c", "d", "a"].into_iter().enumerate() {
        let (status, answer) = relay.post(&payload(field, seq)).await;
        assert_eq!(status, 202, "{field}: {answer}");
    }
    let shapes = listed(&relay, "").await;
    let counts: Vec<i64> = shapes
        .iter()
        .map(|s| s["count"].as_i64().unwrap())
        .collect();
    assert_eq!(counts, [2, 1], "a (seen twice, last), then b: {shapes:?}");
    assert_eq!(
        relay
            .metric("relay_shapes_overflow_total", &[("source", "default")])
            .await,
        2.0,
        "c and d"
    );
    let metrics = relay.metrics().await;
    assert!(metrics.contains("# HELP relay_shapes_overflow_total"));
}

#[tokio::test]
async fn full_samples_keep_the_payload_and_off_keeps_none() {
    let heap = FakeHeap::start().await;
    let payload = json!({"data": {"type": "nps", "action": "score", "score": 9,
                                  "user": {"user_id": "u-1"}}});
    for (mode, expected) in [("full", payload.clone()), ("off", Value::Null)] {
        let dir = tempfile::tempdir().unwrap();
        let mut env = RelayProcess::env(&heap, dir.path());
        set_env(&mut env, "RELAY_CAPTURE__SAMPLES", mode);
        let relay = RelayProcess::spawn(&env);
        let (status, answer) = relay.post(&payload).await;
        assert_eq!(status, 202, "{answer}");
        let shapes = listed(&relay, "").await;
        assert_eq!(shapes.len(), 1);
        assert_eq!(shapes[0]["sample"], expected, "{mode}");
        assert_eq!(
            (shapes[0]["kind"].as_str(), shapes[0]["action"].as_str()),
            (Some("nps"), Some("score"))
        );
    }
}
