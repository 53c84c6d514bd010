//! Numbers and event times end to end, through the real binary against the fake Heap: a signed
//! body is never refused for a valid JSON number, a numeric id beyond u64 reaches Heap exactly as
//! written, a number Heap cannot read exactly arrives as its text, and an event time at or before
//! the Unix epoch (or beyond any range) gives way to the receive time (contract §2.2, §2.4).

use std::time::Duration;

use crate::support::{FakeHeap, RelayProcess, eventually, set_env, signature};
use chrono::{DateTime, Utc};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(10);

/// 30 digits: far above u64, and above what any float holds exactly.
const BIG_ID: &str = "123456789012345678901234567890";
const BIG_ACCOUNT: &str = "98765432109876543210987654321";

/// Posts `text` exactly as given (a `Value` could not even hold `1e400` before the relay parses
/// it), signed now with the test secret.
async fn post_text(relay: &RelayProcess, text: &str) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(format!("{}/webhooks/userpilot", relay.url))
        .header("content-type", "application/json")
        .header("x-signature", signature(text.as_bytes()))
        .body(text.to_owned())
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// The relay binary with user and account properties on, against `heap`.
fn relay(heap: &FakeHeap, dir: &tempfile::TempDir) -> RelayProcess {
    let mut env = RelayProcess::env(heap, dir.path());
    set_env(&mut env, "RELAY_HEAP__USER_PROPERTIES", "true");
    set_env(&mut env, "RELAY_HEAP__ACCOUNT_PROPERTIES", "true");
    RelayProcess::spawn(&env)
}

fn rfc3339(text: &Value) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text.as_str().unwrap())
        .unwrap()
        .to_utc()
}

#[tokio::test]
async fn numbers_beyond_f64_and_u64_are_accepted_and_reach_heap_as_documented() {
    let heap = FakeHeap::start().await;
    let dir = tempfile::tempdir().unwrap();
    let relay = relay(&heap, &dir);
    let body = format!(
        r#"{{"data": {{"type": "nps", "score": 9, "timestamp": 1e400,
            "huge": 1e400, "tiny": -1e-400, "ratio": 1.50, "safe": 9007199254740992,
            "unsafe": 9007199254740993, "nested": {{"big": {BIG_ID}}}, "list": [1e400, 2],
            "user": {{"user_id": {BIG_ID}, "seats": 1E400}},
            "company": {{"company_id": {BIG_ACCOUNT}, "revenue": 1e308}}}}}}"#
    );
    let before = Utc::now();
    let (status, answer) = post_text(&relay, &body).await;
    let after = Utc::now();
    assert_eq!(
        (status, answer),
        (202, json!({"status": "accepted", "events": 1}))
    );

    let events = heap.wait_for_events(1, WAIT).await;
    assert_eq!(events.len(), 1, "{events:?}");
    let event = &events[0];
    assert_eq!(event["identity"], BIG_ID);
    assert_eq!(event["event"], "Userpilot NPS (score)");
    // The text Heap received: numbers it reads exactly stay numbers, the others are strings
    // (an exponent spelled `e+N` / `e-N`, the one change serde_json makes when it reads them).
    assert_eq!(
        event["properties"].to_string(),
        concat!(
            r#"{"huge":"1e+400","list":"1e+400||2","nested.big":"123456789012345678901234567890","#,
            r#""ratio":1.5,"safe":9007199254740992,"score":9,"source":"userpilot","#,
            r#""timestamp":"1e+400","tiny":"-1e-400","type":"nps","unsafe":"9007199254740993"}"#
        )
    );
    // `1e400` is no event time: the receive time instead.
    let sent_at = rfc3339(&event["timestamp"]);
    assert!(
        before <= sent_at && sent_at <= after,
        "{sent_at} not within {before}..{after}"
    );

    let users = eventually(WAIT, async || {
        let users = heap.accepted("/api/add_user_properties", "users");
        (!users.is_empty()).then_some(users)
    })
    .await;
    assert_eq!(
        users,
        [json!({"identity": BIG_ID, "properties": {"seats": "1e+400"}})]
    );
    let accounts = eventually(WAIT, async || {
        let accounts = heap.accepted("/api/add_account_properties", "accounts");
        (!accounts.is_empty()).then_some(accounts)
    })
    .await;
    assert_eq!(accounts.len(), 1, "{accounts:?}");
    assert_eq!(accounts[0]["account_id"], BIG_ACCOUNT);
    assert_eq!(
        accounts[0]["properties"].to_string(),
        r#"{"revenue":1e+308}"#
    );
}

#[tokio::test]
async fn event_times_at_or_before_the_epoch_reach_heap_as_the_receive_time() {
    let heap = FakeHeap::start().await;
    let dir = tempfile::tempdir().unwrap();
    let relay = relay(&heap, &dir);
    // Every place the decoder reads a time from holds one that is no time: negative seconds,
    // zero, negative milliseconds as text, and a huge number.
    let cases = [
        (r#""timestamp": -1726742461"#, "negative seconds"),
        (r#""timestamp": 0"#, "zero"),
        (r#""created_at": "-1726742461123""#, "negative milliseconds"),
        (r#""inserted_at": -123456789012345678901234567890"#, "huge"),
        (
            r#""timestamp": -1, "created_at": "1969-12-31T23:59:59Z", "inserted_at": 0"#,
            "all at once",
        ),
    ];
    for (index, (time, label)) in cases.iter().enumerate() {
        let body = format!(
            r#"{{"timestamp": -1, "data": {{"type": "form", {time},
                "user": {{"user_id": "u{index}"}}}}}}"#
        );
        let before = Utc::now();
        let (status, _) = post_text(&relay, &body).await;
        let after = Utc::now();
        assert_eq!(status, 202, "{label}");

        let identity = format!("u{index}");
        let event = eventually(WAIT, async || {
            heap.events()
                .into_iter()
                .find(|event| event["identity"] == identity.as_str())
        })
        .await;
        let sent_at = rfc3339(&event["timestamp"]);
        assert!(
            before <= sent_at && sent_at <= after,
            "{label}: {sent_at} not within {before}..{after}"
        );
    }
}
