//! Preview (contract §10.3): `POST /admin/preview` and `userpilot-heap-relay preview` show what
//! the relay would do with a payload. Preview equals reality: for every sample of `samples.rs`,
//! the requests a preview shows are, as JSON, the requests the fake Heap then receives for
//! that payload posted signed. A quarantined payload previews with the reason its dead letter
//! then gets. A preview queues and sends nothing; an unknown source is 404 / exit code 2 with
//! one line naming it; a body that is not a JSON object is 400 / exit code 2; the CLI reads
//! standard input; the admin route previews under the configuration a reload put in force;
//! and `send-test --dry-run` prints a preview per sample and posts nothing.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use crate::support::{
    ADMIN_TOKEN, APP_ID, BINARY, Client, FakeHeap, Relay, RelayProcess, config_toml, eventually,
    run_cli, set_env, write_config,
};

const WAIT: Duration = Duration::from_secs(10);

/// User and account properties on, so a webhook becomes requests on more than one endpoint.
const PROPERTIES: &str = "[heap]\nuser_properties = true\naccount_properties = true\n";

/// `POST /admin/preview[?source=NAME]` with `payload` as the body.
async fn preview(client: &Client, source: Option<&str>, payload: &[u8]) -> (u16, Value) {
    let query = source.map_or(String::new(), |name| format!("?source={name}"));
    let response = client
        .http
        .post(format!("{}/admin/preview{query}", client.admin_url))
        .bearer_auth(ADMIN_TOKEN)
        .body(payload.to_vec())
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Request bodies by endpoint, each endpoint's in the order sent: what a comparison of
/// preview and reality may rely on (the forwarder's lanes for track and property records
/// are separate passes, so the order between endpoints is not part of the contract).
fn by_endpoint<'a>(
    requests: impl Iterator<Item = (&'a str, &'a Value)>,
) -> BTreeMap<String, Vec<Value>> {
    let mut grouped: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for (endpoint, body) in requests {
        grouped
            .entry(endpoint.to_owned())
            .or_default()
            .push(body.clone());
    }
    grouped
}

fn previewed(answer: &Value) -> BTreeMap<String, Vec<Value>> {
    let requests = answer["requests"].as_array().unwrap();
    by_endpoint(
        requests
            .iter()
            .map(|r| (r["endpoint"].as_str().unwrap(), &r["body"])),
    )
}

/// A flow-started payload with an event time, a user with a property and a company.
fn payload(user_id: &str) -> Value {
    json!({
        "timestamp": chrono::Utc::now().timestamp(),
        "data": {
            "type": "flow", "action": "started", "flow_id": "fl_preview",
            "user": {"user_id": user_id, "plan": "pro"},
            "company": {"company_id": "acme", "tier": "gold"},
        }
    })
}

#[tokio::test]
async fn every_sample_previews_as_exactly_the_requests_heap_then_receives() {
    let heap = FakeHeap::start().await;
    let relay = Relay::start(&heap, PROPERTIES).await;
    let now = chrono::Utc::now().timestamp();
    let samples = userpilot_heap_relay::samples::all("preview-user", now, "preview-equals-reality");
    let kinds = samples.len();
    let mut compared = 0;
    for (label, body) in samples {
        let bytes = serde_json::to_vec(&body).unwrap();
        let (status, answer) = preview(&relay, None, &bytes).await;
        assert_eq!(status, 200, "{label}: {answer}");
        assert_eq!(answer["status"], "accepted", "{label}: {answer}");
        let expected = previewed(&answer);
        let count: usize = expected.values().map(Vec::len).sum();
        assert!(count >= 1, "{label}: no request previewed");

        let before = heap.requests().len();
        let (status, posted) = relay.post_bytes(bytes, Some("application/json")).await;
        assert_eq!(status, 202, "{label}: {posted}");
        let received = eventually(WAIT, async || {
            let requests = heap.requests();
            if requests.len() >= before + count {
                Ok(requests[before..].to_vec())
            } else {
                Err(format!(
                    "{label}: {} of {count} requests",
                    requests.len() - before
                ))
            }
        })
        .await;
        let actual = by_endpoint(received.iter().map(|r| (r.path.as_str(), &r.body)));
        assert_eq!(actual, expected, "{label}: preview and reality differ");
        compared += count;
    }
    // Every sample's user properties and track event: 2 requests per sample, nothing more.
    assert_eq!(compared, 2 * kinds);
    assert_eq!(heap.requests().len(), compared, "requests nobody previewed");
}

#[tokio::test]
async fn a_preview_queues_nothing_sends_nothing_and_quarantines_as_delivery_would() {
    let heap = FakeHeap::start().await;
    let relay = Relay::start(&heap, PROPERTIES).await;
    let accepted = serde_json::to_vec(&payload("u-preview")).unwrap();
    let (status, answer) = preview(&relay, None, &accepted).await;
    assert_eq!((status, answer["status"].as_str()), (200, Some("accepted")));
    let expected = previewed(&answer);
    assert_eq!(
        expected.keys().collect::<Vec<_>>(),
        [
            "/api/add_account_properties",
            "/api/add_user_properties",
            "/api/track"
        ]
    );
    assert_eq!(expected["/api/track"][0]["app_id"], APP_ID);
    assert_eq!(
        expected["/api/track"][0]["events"][0]["identity"],
        "u-preview"
    );
    assert_eq!(
        expected["/api/add_account_properties"][0]["accounts"][0]["properties"]["tier"],
        "gold"
    );

    let no_kind = serde_json::to_vec(&json!({"data": {"user": {"user_id": "u"}}})).unwrap();
    let (status, quarantined) = preview(&relay, None, &no_kind).await;
    assert_eq!(status, 200);
    assert_eq!(quarantined["status"], "quarantined");
    assert_eq!(quarantined["reason"], "no_kind");
    assert!(
        quarantined["detail"]
            .as_str()
            .is_some_and(|d| !d.is_empty())
    );

    // Both previews left the queue and Heap untouched (a webhook is committed before its
    // answer, so anything queued would show now).
    let (_, status) = relay.admin(Method::GET, "/admin/status").await;
    for state in ["pending", "in_flight", "delivered", "dead"] {
        assert_eq!(status["queue"][state], 0, "{state}: {status}");
    }
    let (_, letters) = relay.admin(Method::GET, "/admin/dead-letters").await;
    assert_eq!(letters["dead_letters"], json!([]));
    assert!(heap.requests().is_empty());

    // Delivered for real, the quarantined payload gets the reason its preview showed.
    let (status, _) = relay.post_bytes(no_kind, Some("application/json")).await;
    assert_eq!(status, 202);
    let (_, letters) = relay.admin(Method::GET, "/admin/dead-letters").await;
    assert_eq!(letters["dead_letters"][0]["reason"], quarantined["reason"]);
}

#[tokio::test]
async fn an_unknown_source_is_404_a_body_that_is_not_an_object_400_and_one_too_large_413() {
    let heap = FakeHeap::start().await;
    let relay = Relay::start(&heap, "[server]\nmax_body_bytes = 1024\n").await;
    let (status, answer) = preview(&relay, Some("nope"), b"{}").await;
    assert_eq!(status, 404);
    assert_eq!(answer["error"], "unknown_source");
    assert!(
        answer["detail"].as_str().unwrap().contains("`nope`"),
        "{answer}"
    );
    for body in [&b"[1]"[..], b"{\"a\":", b"not json"] {
        let (status, answer) = preview(&relay, None, body).await;
        assert_eq!((status, &answer), (400, &json!({"error": "invalid_json"})));
    }
    let (status, _) = preview(&relay, Some("default"), b"{\"data\": {}}").await;
    assert_eq!(status, 200);
    let large = format!("{{\"pad\": \"{}\"}}", "x".repeat(1024));
    let (status, answer) = preview(&relay, None, large.as_bytes()).await;
    assert_eq!(
        (status, &answer),
        (413, &json!({"error": "payload_too_large"}))
    );
}

/// Runs `preview ARGS` with `env`, `stdin` on standard input.
fn preview_cli(env: &[(String, String)], args: &[&str], stdin: &[u8]) -> std::process::Output {
    let mut child = Command::new(BINARY)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .arg("preview")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

#[tokio::test]
async fn the_cli_previews_standard_input_or_a_file_and_refuses_with_exit_code_2() {
    let heap = FakeHeap::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut env = RelayProcess::env(&heap, dir.path());
    set_env(&mut env, "RELAY_HEAP__USER_PROPERTIES", "true");
    let body = serde_json::to_vec(&payload("u-cli")).unwrap();

    let output = preview_cli(&env, &["-"], &body);
    assert!(output.status.success(), "{output:?}");
    let answer: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(answer["status"], "accepted");
    let requests = previewed(&answer);
    assert_eq!(requests["/api/track"][0]["app_id"], APP_ID);
    assert_eq!(requests["/api/track"][0]["events"][0]["identity"], "u-cli");
    assert_eq!(
        requests["/api/add_user_properties"][0]["users"][0]["properties"]["plan"],
        "pro"
    );

    // The same payload from a file, received a moment later, is the same preview: its
    // event time and idempotency key come from the payload.
    let file = dir.path().join("payload.json");
    std::fs::write(&file, &body).unwrap();
    let output = preview_cli(&env, &[file.to_str().unwrap()], b"");
    assert!(output.status.success(), "{output:?}");
    assert_eq!(
        serde_json::from_slice::<Value>(&output.stdout).unwrap(),
        answer
    );

    let output = preview_cli(&env, &["--source", "nope", "-"], &body);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("`nope`"), "{stderr}");
    assert!(output.stdout.is_empty());

    let output = preview_cli(&env, &["-"], b"[1]");
    assert_eq!(output.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&output.stderr).trim(),
        "error: the payload is not a JSON object"
    );

    // No relay ran, and nothing reached Heap; the queue was never created.
    assert!(heap.requests().is_empty());
    assert!(!dir.path().join("queue.sqlite3").exists());
}

#[tokio::test]
async fn send_test_dry_run_prints_every_samples_preview_and_posts_nothing() {
    let heap = FakeHeap::start().await;
    let dir = tempfile::tempdir().unwrap();
    let env = RelayProcess::env(&heap, dir.path());
    let output = run_cli(&env, &["send-test", "--dry-run", "--user-id", "dry-user"]);
    assert!(output.status.success(), "{output:?}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    let samples = userpilot_heap_relay::samples::all("dry-user", 0, "");
    assert_eq!(lines.len(), samples.len(), "{stdout}");
    for ((label, _), line) in samples.iter().zip(&lines) {
        let json = line.strip_prefix(label).unwrap().trim_start();
        let answer: Value = serde_json::from_str(json).unwrap();
        assert_eq!(answer["status"], "accepted", "{line}");
        let requests = previewed(&answer);
        assert_eq!(
            requests["/api/track"][0]["events"][0]["identity"],
            "dry-user"
        );
    }
    assert!(heap.requests().is_empty());
    assert!(!dir.path().join("queue.sqlite3").exists());
}

#[tokio::test]
async fn the_admin_preview_follows_the_configuration_a_reload_put_in_force() {
    let heap = FakeHeap::start().await;
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let file = dir.path().join("relay.toml");
    let qa = |app_id: &str| {
        format!("[sources.qa]\nsecrets = [\"qa-secret-0000000001\"]\napp_id = \"{app_id}\"\n")
    };
    write_config(&file, &config_toml(&heap, dir.path(), &qa("app-before")));
    let relay = RelayProcess::spawn_with_config(&file);
    let body = serde_json::to_vec(&payload("u-reload")).unwrap();
    let app_id = async || {
        let (status, answer) = preview(&relay, Some("qa"), &body).await;
        assert_eq!(status, 200, "{answer}");
        previewed(&answer)["/api/track"][0]["app_id"].clone()
    };
    assert_eq!(app_id().await, "app-before");
    write_config(&file, &config_toml(&heap, dir.path(), &qa("app-after")));
    let (status, reloaded) = relay.admin(Method::POST, "/admin/reload").await;
    assert_eq!(status, 200, "{reloaded}");
    assert_eq!(app_id().await, "app-after");
    assert!(heap.requests().is_empty());
}
