//! What an on-call reads (contract §8): the metrics a fresh relay exports before any traffic,
//! the forwarder's state in `/admin/status` the moment it is paused, one log line per Heap
//! request, and retry lines whose wait is the one that really follows.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use crate::support::{APP_ID, Answer, FakeHeap, Relay, RelayProcess, eventually, set_env};

const WAIT: Duration = Duration::from_secs(20);

/// A Userpilot "flow started" webhook: one track event.
fn webhook(user: &str, n: u64) -> Value {
    json!({
        "timestamp": chrono::Utc::now().timestamp(),
        "data": {
            "type": "flow", "action": "started", "flow_id": format!("fl_{n}"),
            "user": { "user_id": user }
        }
    })
}

/// The relay's JSON log lines, parsed (anything else it may print is skipped).
fn json_logs(relay: &RelayProcess) -> Vec<Value> {
    relay
        .logs()
        .iter()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect()
}

fn with_message<'a>(logs: &'a [Value], message: &str) -> Vec<&'a Value> {
    logs.iter().filter(|l| l["message"] == message).collect()
}

async fn scrape(relay: &RelayProcess) -> String {
    let answer = relay
        .http
        .get(format!("{}/metrics", relay.admin_url))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    answer.text().await.unwrap()
}

/// The commit the relay was built from, as build.rs finds it, when this checkout can say.
fn checkout_commit() -> Option<String> {
    if std::env::var_os("USERPILOT_HEAP_RELAY_COMMIT").is_some() {
        return None;
    }
    let output = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

#[tokio::test]
async fn a_fresh_relay_exports_help_text_zero_counters_and_its_build_info() {
    let heap = FakeHeap::start().await;
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::spawn(&RelayProcess::env(&heap, dir.path()));
    let text = scrape(&relay).await;
    let lines: Vec<&str> = text.lines().collect();

    // Every metric that has a TYPE line has a HELP line, and all the relay's metrics show.
    let typed: Vec<&str> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    for name in &typed {
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with(&format!("# HELP {name} ")) && l.len() > name.len() + 10),
            "no HELP text for {name}:\n{text}"
        );
    }
    for name in [
        "relay_webhooks_total",
        "relay_signature_failures_total",
        "relay_events_forwarded_total",
        "relay_events_dead_lettered_total",
        "relay_heap_requests_total",
        "relay_queue_depth",
        "relay_oldest_pending_age_seconds",
        "relay_forwarder_state",
        "relay_build_info",
    ] {
        assert!(typed.contains(&name), "{name} missing:\n{text}");
    }

    // Counters at zero before anything happened, for their known label values.
    for series in [
        r#"relay_webhooks_total{outcome="accepted",source="default"} 0"#,
        r#"relay_webhooks_total{outcome="invalid_signature",source="default"} 0"#,
        r#"relay_webhooks_total{outcome="unavailable",source="default"} 0"#,
        r#"relay_signature_failures_total{reason="mismatch",source="default"} 0"#,
        r#"relay_signature_failures_total{reason="stale",source="default"} 0"#,
        r#"relay_events_dead_lettered_total{reason="no_user_id",app_id="test-app"} 0"#,
        r#"relay_events_dead_lettered_total{reason="rejected",app_id="test-app"} 0"#,
        r#"relay_events_dead_lettered_total{reason="expired",app_id="test-app"} 0"#,
        r#"relay_events_forwarded_total{app_id="test-app"} 0"#,
        r#"relay_heap_requests_total{endpoint="track",status="200",app_id="test-app"} 0"#,
        r#"relay_heap_requests_total{endpoint="add_user_properties",status="200",app_id="test-app"} 0"#,
        r#"relay_heap_requests_total{endpoint="add_account_properties",status="200",app_id="test-app"} 0"#,
    ] {
        assert!(lines.contains(&series), "{series} missing:\n{text}");
    }

    let info = lines
        .iter()
        .find(|l| l.starts_with("relay_build_info{"))
        .unwrap_or_else(|| panic!("no relay_build_info:\n{text}"));
    assert!(info.ends_with("} 1"), "{info}");
    assert!(
        info.contains(&format!(r#"version="{}""#, env!("CARGO_PKG_VERSION"))),
        "{info}"
    );
    let commit = info
        .split(r#"commit=""#)
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap();
    match checkout_commit() {
        Some(expected) => assert_eq!(commit, expected, "{info}"),
        None => assert!(
            commit == "unknown" || commit.chars().all(|c| c.is_ascii_hexdigit()),
            "{info}"
        ),
    }
}

#[tokio::test]
async fn a_pause_shows_in_admin_status_at_once_even_with_a_request_in_flight() {
    let heap = FakeHeap::start().await;
    // Heap holds the request for two seconds: the forwarder is busy when the pause comes, so
    // it cannot be the one to report it.
    heap.respond_with(|_, _| Answer {
        delay: Duration::from_secs(2),
        ..Answer::OK
    });
    let relay = Relay::start(&heap, "").await;
    assert_eq!(relay.post(&webhook("u1", 1)).await.0, 202);
    relay
        .wait_for_status(WAIT, |s| s["queue"]["in_flight"] == 1)
        .await;

    let (status, _) = relay.admin(Method::POST, "/admin/forwarder/pause").await;
    assert_eq!(status, 200);
    let (_, now) = relay.admin(Method::GET, "/admin/status").await;
    assert_eq!(now["forwarder"], "paused", "{now}");
    assert_eq!(
        now["queue"]["in_flight"], 1,
        "the request is still in flight"
    );

    // The request in flight finishes; the state stays paused.
    let done = relay
        .wait_for_status(WAIT, |s| s["queue"]["delivered"] == 1)
        .await;
    assert_eq!(done["forwarder"], "paused", "{done}");

    let (status, _) = relay.admin(Method::POST, "/admin/forwarder/resume").await;
    assert_eq!(status, 200);
    let (_, now) = relay.admin(Method::GET, "/admin/status").await;
    assert_eq!(now["forwarder"], "running", "{now}");
    relay.stop().await;
}

#[tokio::test]
async fn admin_status_names_the_oldest_pending_as_a_time_and_as_an_age() {
    let heap = FakeHeap::start().await;
    let relay = Relay::start(&heap, "").await;
    relay.admin(Method::POST, "/admin/forwarder/pause").await;
    let before = chrono::Utc::now().timestamp_millis();
    assert_eq!(relay.post(&webhook("u1", 1)).await.0, 202);
    let after = chrono::Utc::now().timestamp_millis();
    let (_, status) = relay.admin(Method::GET, "/admin/status").await;
    let queue = &status["queue"];
    assert!(queue.get("oldest_pending_ms").is_none(), "{status}");
    let received = queue["oldest_pending_received_at_ms"].as_i64().unwrap();
    assert!((before..=after).contains(&received), "{status}");
    let age = queue["oldest_pending_age_seconds"].as_f64().unwrap();
    let upper = (chrono::Utc::now().timestamp_millis() - received) as f64 / 1000.0;
    assert!((0.0..=upper).contains(&age), "{age} not in 0..={upper}");
    relay.stop().await;
}

#[tokio::test]
async fn each_heap_request_is_logged_once_with_endpoint_lane_events_status_duration_and_outcome() {
    let heap = FakeHeap::start().await;
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::spawn(&RelayProcess::env(&heap, dir.path()));
    for n in 0..3 {
        assert_eq!(relay.post(&webhook(&format!("u{n}"), n)).await.0, 202);
    }
    heap.wait_for_events(3, WAIT).await;

    let lines = eventually(WAIT, async || {
        let logs = json_logs(&relay);
        let lines: Vec<Value> = with_message(&logs, "heap request delivered")
            .into_iter()
            .cloned()
            .collect();
        let events: u64 = lines.iter().map(|l| l["events"].as_u64().unwrap()).sum();
        (events == 3).then_some(lines)
    })
    .await;
    assert_eq!(lines.len(), heap.requests().len(), "one line per request");
    for line in &lines {
        assert_eq!(line["level"], "INFO", "{line}");
        assert_eq!(line["endpoint"], "track", "{line}");
        assert_eq!(line["lane"], APP_ID, "{line}");
        assert_eq!(line["status"], 200, "{line}");
        assert_eq!(line["outcome"], "delivered", "{line}");
        assert_eq!(line["records"], line["events"], "{line}");
        assert!(line["duration_ms"].is_u64(), "{line}");
    }
}

#[tokio::test]
async fn the_retry_line_states_the_wait_that_really_follows() {
    // Backoff and Retry-After compete: the forwarder pauses at least initial_backoff_ms
    // (1.5 s) after a failure, the full-jitter delay is at most max_backoff_ms (1.5 s), and
    // Heap asks for 1 s, then 2 s. What follows: 1.5 s (the backoff wins), then 2 s (Heap wins).
    let heap = FakeHeap::start().await;
    let mut answers = vec![
        Answer {
            status: 503,
            retry_after: Some(1),
            delay: Duration::ZERO,
        },
        Answer {
            status: 503,
            retry_after: Some(2),
            delay: Duration::ZERO,
        },
    ]
    .into_iter();
    heap.respond_with(move |_, _| answers.next().unwrap_or(Answer::OK));
    let dir = tempfile::tempdir().unwrap();
    let mut env = RelayProcess::env(&heap, dir.path());
    set_env(&mut env, "RELAY_RETRY__INITIAL_BACKOFF_MS", "1500");
    set_env(&mut env, "RELAY_RETRY__MAX_BACKOFF_MS", "1500");
    let relay = RelayProcess::spawn(&env);
    assert_eq!(relay.post(&webhook("u1", 1)).await.0, 202);

    let requests = eventually(WAIT, async || {
        let requests = heap.requests();
        (requests.len() == 3 && requests[2].status == 200).then_some(requests)
    })
    .await;
    let retries = eventually(WAIT, async || {
        let logs = json_logs(&relay);
        let lines: Vec<Value> = with_message(&logs, "heap request failed; will retry")
            .into_iter()
            .cloned()
            .collect();
        (lines.len() == 2).then_some(lines)
    })
    .await;

    let logged: Vec<u64> = retries
        .iter()
        .map(|l| l["retry_in_ms"].as_u64().unwrap())
        .collect();
    assert_eq!(logged, [1500, 2000], "{retries:?}");
    let measured: Vec<Duration> = requests
        .windows(2)
        .map(|pair| pair[1].at.duration_since(pair[0].at))
        .collect();
    println!("logged retry_in_ms {logged:?}, measured waits {measured:?}");
    for (said, waited) in logged.iter().zip(&measured) {
        let said = Duration::from_millis(*said);
        // Never earlier than said; later only by the time to claim and send again.
        assert!(
            *waited + Duration::from_millis(20) >= said
                && *waited <= said + Duration::from_millis(400),
            "said {said:?}, waited {waited:?}"
        );
    }
    for (line, attempt) in retries.iter().zip([1, 2]) {
        assert_eq!(line["level"], "WARN", "{line}");
        assert_eq!(line["outcome"], "retry", "{line}");
        assert_eq!(line["status"], 503, "{line}");
        assert_eq!(line["attempt"], attempt, "{line}");
        assert_eq!(line["lane"], APP_ID, "{line}");
        let logged_at =
            chrono::DateTime::parse_from_rfc3339(line["timestamp"].as_str().unwrap()).unwrap();
        let retry_at =
            chrono::DateTime::parse_from_rfc3339(line["retry_at"].as_str().unwrap()).unwrap();
        let said = (retry_at - logged_at).num_milliseconds();
        let expected = line["retry_in_ms"].as_i64().unwrap();
        assert!((said - expected).abs() <= 50, "{line}");
    }
}
