//! What a replay or purge applies to (contract §4, §6): one `id`, a filter, or `all`; an empty
//! selection is refused with 400 `no_scope` (HTTP) or an error naming the choices (CLI), never
//! taken to mean every dead letter. Also `limit=0` and the admin token's scheme spelling.

use crate::support::{ADMIN_TOKEN, FakeHeap, Relay, RelayProcess, run_cli};
use reqwest::Method;
use serde_json::{Value, json};

/// A webhook with no user id: quarantined as a dead letter on arrival.
fn unmappable(seq: usize) -> Value {
    json!({
        "timestamp": chrono::Utc::now().timestamp(),
        "data": { "type": "nps", "score": 5, "seq": seq },
    })
}

async fn dead_letter_count(relay: &Relay) -> usize {
    let (status, listing) = relay.admin(Method::GET, "/admin/dead-letters").await;
    assert_eq!(status, 200, "{listing}");
    listing["dead_letters"].as_array().unwrap().len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_or_replay_without_scope_is_refused_and_deletes_nothing() {
    let heap = FakeHeap::start().await;
    let relay = Relay::start(&heap, "").await;
    for seq in 0..3 {
        let (status, answer) = relay.post(&unmappable(seq)).await;
        assert_eq!((status, answer), (202, json!({"status": "quarantined"})));
    }
    assert_eq!(dead_letter_count(&relay).await, 3);

    for path in ["/admin/dead-letters/purge", "/admin/dead-letters/replay"] {
        let (status, answer) = relay.admin(Method::POST, path).await;
        assert_eq!(status, 400, "{path}: {answer}");
        assert_eq!(answer["error"], "no_scope", "{path}");
        let detail = answer["detail"].as_str().unwrap();
        assert!(
            detail.contains("`id`") && detail.contains("`all`"),
            "{detail}"
        );
    }
    assert_eq!(dead_letter_count(&relay).await, 3, "nothing was purged");

    let (status, answer) = relay
        .admin(Method::POST, "/admin/dead-letters/purge?all=true")
        .await;
    assert_eq!((status, answer), (200, json!({"purged": 3})));
    assert_eq!(dead_letter_count(&relay).await, 0);
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limit_of_zero_is_refused_instead_of_returning_one_row() {
    let heap = FakeHeap::start().await;
    let relay = Relay::start(&heap, "").await;
    for seq in 0..2 {
        relay.post(&unmappable(seq)).await;
    }
    let (status, answer) = relay
        .admin(Method::GET, "/admin/dead-letters?limit=0")
        .await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["error"], "invalid_filter");
    let (status, answer) = relay
        .admin(Method::GET, "/admin/dead-letters?limit=1")
        .await;
    assert_eq!(status, 200);
    assert_eq!(answer["dead_letters"].as_array().unwrap().len(), 1);
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bearer_scheme_is_accepted_in_any_case() {
    let heap = FakeHeap::start().await;
    let relay = Relay::start(&heap, "").await;
    let http = reqwest::Client::new();
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let response = http
            .get(format!("{}/admin/status", relay.admin_url))
            .header("authorization", format!("{scheme} {ADMIN_TOKEN}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{scheme}");
    }
    let response = http
        .get(format!("{}/admin/status", relay.admin_url))
        .header("authorization", format!("Basic {ADMIN_TOKEN}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    relay.stop().await;
}

#[tokio::test]
async fn the_dlq_command_refuses_a_purge_or_replay_without_scope() {
    let heap = FakeHeap::start().await;
    let dir = tempfile::tempdir().unwrap();
    let env = RelayProcess::env(&heap, dir.path());
    for verb in ["purge", "replay"] {
        let output = run_cli(&env, &["dlq", verb]);
        assert!(!output.status.success(), "{verb} without scope succeeded");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("no dead letters selected"), "{stderr}");
        assert!(stderr.contains("`all`"), "{stderr}");
    }
    let output = run_cli(&env, &["dlq", "purge", "--all"]);
    assert!(output.status.success(), "{output:?}");
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        r#"{"purged":0}"#
    );
}
