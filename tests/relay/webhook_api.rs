//! The public HTTP interface of contract §4 through the real server (in-process, port 0) against
//! the fake Heap: every row of the webhook table (202 accepted / duplicate / quarantined, 401, 400,
//! 413, 415, 503 with `Retry-After`), the signature variants of contract §2.1 that must be accepted
//! (secret rotation, base64 MAC, body-timestamp fallback), and `/healthz` and `/readyz`.

use std::time::Duration;

use crate::support::{FakeHeap, Relay, SECRET, eventually};
use base64::Engine as _;
use serde_json::{Value, json};
use userpilot_heap_relay::userpilot::sign;

const WAIT: Duration = Duration::from_secs(10);

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// A realistic NPS webhook for `user_id`; `marker` makes the body unique.
fn nps(user_id: &str, marker: &str) -> Value {
    json!({
        "timestamp": now(),
        "data": {
            "type": "nps",
            "score": 9,
            "feedback": "Love it",
            "hostname": "app.example.com",
            "marker": marker,
            "user": { "user_id": user_id, "email": "jane@example.com", "plan": "pro" }
        }
    })
}

/// A flow-started webhook for `user_id`: exactly one Heap event.
fn flow_started(user_id: &str) -> Value {
    json!({
        "timestamp": now(),
        "data": {
            "type": "flow", "action": "started", "flow_id": "fl_1",
            "user": { "user_id": user_id }
        }
    })
}

fn bytes(body: &Value) -> Vec<u8> {
    serde_json::to_vec(body).unwrap()
}

/// The answer to a webhook stored with `events` track events.
fn accepted(events: usize) -> (u16, Value) {
    (202, json!({"status": "accepted", "events": events}))
}

/// Posts JSON `body` with the `X-Signature` header `header`, as built by the test.
async fn post_as(relay: &Relay, body: Vec<u8>, header: &str) -> (u16, Value) {
    relay
        .post_raw(body, Some(header), Some("application/json"))
        .await
}

/// The `v1` value of a header made by [`sign`].
fn v1_of(header: &str) -> &str {
    header.split_once(",v1=").unwrap().1
}

/// Everything the queue holds, from the admin status route.
async fn queue_total(relay: &Relay) -> u64 {
    let (status, answer) = relay.admin(reqwest::Method::GET, "/admin/status").await;
    assert_eq!(status, 200, "{answer}");
    let queue = &answer["queue"];
    ["pending", "in_flight", "delivered", "dead"]
        .iter()
        .map(|state| queue[state].as_u64().unwrap())
        .sum()
}

#[tokio::test]
async fn a_stored_webhook_is_answered_202_accepted_with_its_event_count() {
    let heap = FakeHeap::start().await;
    let relay = Relay::start(&heap, "").await;

    let (status, answer) = relay.post(&flow_started("u_one")).await;
    assert_eq!((status, answer), accepted(1));

    // NPS with a score and feedback and no action is two Heap events.
    let (status, answer) = relay.post(&nps("u_two", "a")).await;
    assert_eq!((status, answer), accepted(2));

    let events = heap.wait_for_events(3, WAIT).await;
    assert_eq!(events.len(), 3);
    relay.stop().await;
}

#[tokio::test]
async fn a_redelivered_body_is_a_duplicate_and_reaches_heap_once() {
    let heap = FakeHeap::start().await;
    let relay = Relay::start(&heap, "").await;
    let body = bytes(&flow_started("u_dup"));

    let first = sign(&body, SECRET, now());
    let (status, answer) = relay
        .post_raw(body.clone(), Some(&first), Some("application/json"))
        .await;
    assert_eq!((status, answer), accepted(1));

    // Userpilot retries with the same bytes; a retry signed later carries another `t`.
    for t in [now(), now() - 60] {
        let header = sign(&body, SECRET, t);
        let (status, answer) = relay
            .post_raw(body.clone(), Some(&header), Some("application/json"))
            .await;
        assert_eq!(
            (status, answer),
            (202, json!({"status": "duplicate"})),
            "t={t}"
        );
    }

    // A later, different webhook is delivered after the first one: by then a second copy of
    // the first would have been sent too.
    let first_event = heap.wait_for_events(1, WAIT).await.remove(0);
    let (status, _) = relay.post(&flow_started("u_after")).await;
    assert_eq!(status, 202);
    let events = heap.wait_for_events(2, WAIT).await;
    let copies = events
        .iter()
        .filter(|e| e["idempotency_key"] == first_event["idempotency_key"])
        .count();
    assert_eq!(copies, 1, "{events:?}");
    assert_eq!(events.len(), 2);
    relay.stop().await;
}

#[tokio::test]
async fn a_webhook_without_a_user_id_is_quarantined_and_listed_as_a_dead_letter() {
    let heap = FakeHeap::start().await;
    let relay = Relay::start(&heap, "").await;
    let body = json!({
        "timestamp": now(),
        "data": { "type": "flow", "action": "started", "user": { "email": "x@example.com" } }
    });

    let (status, answer) = relay.post(&body).await;
    assert_eq!((status, answer), (202, json!({"status": "quarantined"})));

    let (status, answer) = relay
        .admin(reqwest::Method::GET, "/admin/dead-letters")
        .await;
    assert_eq!(status, 200, "{answer}");
    let letters = answer["dead_letters"].as_array().unwrap();
    assert_eq!(letters.len(), 1, "{answer}");
    assert_eq!(letters[0]["reason"], "no_user_id");
    assert_eq!(letters[0]["kind"], "webhook");

    // Redelivering the broken webhook does not pile up dead letters.
    let (status, answer) = relay.post(&body).await;
    assert_eq!((status, answer), (202, json!({"status": "duplicate"})));

    // Nothing of it goes to Heap: a good webhook posted afterwards is the only event.
    relay.post(&flow_started("u_good")).await;
    let events = heap.wait_for_events(1, WAIT).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["identity"], "u_good");
    relay.stop().await;
}

#[tokio::test]
async fn a_json_object_without_an_event_kind_is_quarantined_with_reason_no_kind() {
    let heap = FakeHeap::start().await;
    let relay = Relay::start(&heap, "").await;
    let body = json!({ "timestamp": now(), "data": { "user": { "user_id": "u_kindless" } } });

    let (status, answer) = relay.post(&body).await;
    assert_eq!((status, answer), (202, json!({"status": "quarantined"})));
    let (_, answer) = relay
        .admin(reqwest::Method::GET, "/admin/dead-letters?reason=no_kind")
        .await;
    assert_eq!(
        answer["dead_letters"].as_array().unwrap().len(),
        1,
        "{answer}"
    );
    relay.stop().await;
}

#[tokio::test]
async fn bad_signatures_are_rejected_with_a_generic_401_and_store_nothing() {
    let heap = FakeHeap::start().await;
    let relay = Relay::start(&heap, "").await;
    let body = bytes(&flow_started("u_401"));
    let valid = sign(&body, SECRET, now());
    let tampered = bytes(&flow_started("u_other"));

    let cases: Vec<(&str, Vec<u8>, Option<String>)> = vec![
        ("missing", body.clone(), None),
        ("empty", body.clone(), Some(String::new())),
        ("garbage", body.clone(), Some("garbage".into())),
        ("no v1", body.clone(), Some(format!("t={}", now()))),
        (
            "non-numeric t",
            body.clone(),
            Some(format!("t=soon,v1={}", v1_of(&valid))),
        ),
        (
            "stale, in the past",
            body.clone(),
            Some(sign(&body, SECRET, now() - 1000)),
        ),
        (
            "stale, in the future",
            body.clone(),
            Some(sign(&body, SECRET, now() + 1000)),
        ),
        (
            "wrong secret",
            body.clone(),
            Some(sign(&body, "not-the-secret", now())),
        ),
        ("tampered body", tampered, Some(valid.clone())),
        (
            "v1 of another t",
            body.clone(),
            Some(format!(
                "t={},v1={}",
                now() - 1,
                v1_of(&sign(&body, SECRET, now() - 2))
            )),
        ),
    ];
    for (name, body, header) in cases {
        let (status, answer) = relay
            .post_raw(body, header.as_deref(), Some("application/json"))
            .await;
        // Exactly the generic body: the reason must never reach the client.
        assert_eq!(
            (status, &answer),
            (401, &json!({"error": "invalid_signature"})),
            "{name}"
        );
    }
    assert_eq!(queue_total(&relay).await, 0, "a refused webhook was stored");

    // The reasons go to the metrics instead.
    let metrics = relay
        .http
        .get(format!("{}/metrics", relay.admin_url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for reason in ["missing", "malformed", "stale", "mismatch"] {
        assert!(
            metrics.contains(&format!(
                "relay_signature_failures_total{{reason=\"{reason}\",source=\"default\"}}"
            )),
            "no {reason} failures in\n{metrics}"
        );
    }
    assert!(heap.requests().is_empty());
    relay.stop().await;
}

#[tokio::test]
async fn a_signature_made_with_any_configured_secret_is_accepted() {
    let heap = FakeHeap::start().await;
    let relay = Relay::start(
        &heap,
        r#"[userpilot]
secrets = ["old-secret", "new-secret"]"#,
    )
    .await;

    for (user, secret) in [("u_new", "new-secret"), ("u_old", "old-secret")] {
        let body = bytes(&flow_started(user));
        let header = sign(&body, secret, now());
        let (status, answer) = post_as(&relay, body, &header).await;
        assert_eq!((status, answer), accepted(1), "{secret}");
    }
    // The test secret is not configured here.
    let (status, _) = relay.post(&flow_started("u_retired")).await;
    assert_eq!(status, 401);
    relay.stop().await;
}

#[tokio::test]
async fn a_base64_signature_is_accepted() {
    let heap = FakeHeap::start().await;
    let relay = Relay::start(&heap, "").await;
    let body = bytes(&flow_started("u_b64"));
    let t = now();
    let mac = hex::decode(v1_of(&sign(&body, SECRET, t))).unwrap();
    let header = format!(
        "t={t},v1={}",
        base64::engine::general_purpose::STANDARD.encode(mac)
    );

    assert_eq!(post_as(&relay, body, &header).await, accepted(1));
    relay.stop().await;
}

#[tokio::test]
async fn a_millisecond_t_unknown_header_keys_and_extra_v1_entries_are_accepted() {
    let heap = FakeHeap::start().await;
    let relay = Relay::start(&heap, "").await;

    let body = bytes(&flow_started("u_millis"));
    let t_ms = chrono::Utc::now().timestamp_millis();
    let header = sign(&body, SECRET, t_ms);
    assert!(header.starts_with(&format!("t={t_ms},")), "{header}");
    assert_eq!(post_as(&relay, body, &header).await, accepted(1));

    let body = bytes(&flow_started("u_extra"));
    let t = now();
    let good = sign(&body, SECRET, t);
    let wrong = sign(&body, "rotated-out", t);
    let header = format!(
        "v0=legacy,t={t},v1={},v2=future,v1={}",
        v1_of(&wrong),
        v1_of(&good)
    );
    assert_eq!(post_as(&relay, body, &header).await, accepted(1));
    relay.stop().await;
}

#[tokio::test]
async fn without_t_in_the_header_the_body_timestamp_is_signed_and_checked() {
    let heap = FakeHeap::start().await;
    let relay = Relay::start(&heap, "").await;

    let t = now();
    let mut fresh = flow_started("u_fresh");
    fresh["timestamp"] = json!(t);
    let body = bytes(&fresh);
    let header = format!("v1={}", v1_of(&sign(&body, SECRET, t)));
    assert_eq!(post_as(&relay, body, &header).await, accepted(1));

    // The fallback timestamp is held to the same tolerance.
    let old = t - 1000;
    let mut stale = flow_started("u_stale");
    stale["timestamp"] = json!(old);
    let body = bytes(&stale);
    let header = format!("v1={}", v1_of(&sign(&body, SECRET, old)));
    let (status, answer) = post_as(&relay, body, &header).await;
    assert_eq!(
        (status, answer),
        (401, json!({"error": "invalid_signature"}))
    );
    relay.stop().await;
}

#[tokio::test]
async fn a_signed_body_that_is_not_a_json_object_is_rejected_with_400() {
    let heap = FakeHeap::start().await;
    let relay = Relay::start(&heap, "").await;

    for body in [
        &b"not json"[..],
        b"{\"data\":",
        b"[1,2,3]",
        b"\"nps\"",
        b"42",
        b"null",
    ] {
        let (status, answer) = relay
            .post_bytes(body.to_vec(), Some("application/json"))
            .await;
        assert_eq!(
            (status, answer),
            (400, json!({"error": "invalid_json"})),
            "{}",
            String::from_utf8_lossy(body)
        );
    }
    assert_eq!(queue_total(&relay).await, 0);
    relay.stop().await;
}

#[tokio::test]
async fn a_body_over_max_body_bytes_is_rejected_with_413() {
    let heap = FakeHeap::start().await;
    let relay = Relay::start(&heap, "[server]\nmax_body_bytes = 512").await;

    /// A flow-started body padded to exactly `size` bytes.
    fn body_of(size: usize) -> Vec<u8> {
        let mut body = flow_started("u_big");
        let base = bytes(&body).len() + r#","pad":"""#.len();
        body["data"]["pad"] = json!("x".repeat(size - base));
        let body = bytes(&body);
        assert_eq!(body.len(), size);
        body
    }

    let over = body_of(513);
    let (status, answer) = relay.post_bytes(over, Some("application/json")).await;
    assert_eq!(
        (status, answer),
        (413, json!({"error": "payload_too_large"}))
    );

    let at_limit = body_of(512);
    let (status, answer) = relay.post_bytes(at_limit, Some("application/json")).await;
    assert_eq!((status, answer), accepted(1));
    relay.stop().await;
}

#[tokio::test]
async fn a_content_type_that_is_not_json_is_rejected_with_415_and_an_absent_one_is_accepted() {
    let heap = FakeHeap::start().await;
    let relay = Relay::start(&heap, "").await;

    for content_type in ["text/plain", "application/x-www-form-urlencoded"] {
        let body = bytes(&flow_started("u_text"));
        let (status, answer) = relay.post_bytes(body, Some(content_type)).await;
        assert_eq!(
            (status, answer),
            (415, json!({"error": "unsupported_media_type"})),
            "{content_type}"
        );
    }

    let body = bytes(&flow_started("u_none"));
    let (status, answer) = relay.post_bytes(body, None).await;
    assert_eq!((status, answer), accepted(1));

    let body = bytes(&flow_started("u_charset"));
    let header = sign(&body, SECRET, now());
    let (status, answer) = relay
        .post_raw(body, Some(&header), Some("application/json; charset=utf-8"))
        .await;
    assert_eq!((status, answer), accepted(1));
    relay.stop().await;
}

#[tokio::test]
async fn a_webhook_the_queue_cannot_commit_is_answered_503_with_retry_after_and_not_stored() {
    let heap = FakeHeap::start().await;
    let relay = Relay::start(&heap, "").await;
    // Draining cannot be reached in-process: the listener closes as draining starts, and
    // a request already in flight is let through. A queue that cannot commit can: another
    // connection holds SQLite's write lock until the relay's busy timeout gives up.
    let (status, _) = relay.post(&flow_started("u_before")).await;
    assert_eq!(status, 202);
    // The forwarder's writes (its ack, its claims) would wait out the lock too and delay
    // the webhook's turn: let it deliver, then pause it and wait until it is idle.
    relay
        .wait_for_status(WAIT, |s| s["queue"]["delivered"] == 1)
        .await;
    let (status, _) = relay
        .admin(reqwest::Method::POST, "/admin/forwarder/pause")
        .await;
    assert_eq!(status, 200);
    relay
        .wait_for_status(WAIT, |s| s["forwarder"] == "paused")
        .await;
    let lock = rusqlite::Connection::open(relay.dir.path().join("queue.sqlite3")).unwrap();
    lock.busy_timeout(WAIT).unwrap();
    lock.execute_batch("BEGIN EXCLUSIVE").unwrap();

    let body = bytes(&flow_started("u_locked"));
    let post = || {
        relay
            .http
            .post(format!("{}/webhooks/userpilot", relay.url))
            .header("content-type", "application/json")
            .header("x-signature", sign(&body, SECRET, now()))
            .body(body.clone())
            .send()
    };
    // One after the other: the queue serves one operation at a time, each waiting out the lock.
    let refused = post().await.unwrap();
    assert_eq!(refused.status().as_u16(), 503);
    let retry_after = refused.headers().get("retry-after").cloned();
    assert!(
        retry_after.is_some_and(|v| v.to_str().unwrap().parse::<u64>().is_ok()),
        "{:?}",
        refused.headers()
    );
    assert_eq!(
        refused.json::<Value>().await.unwrap(),
        json!({"error": "unavailable"})
    );
    let readiness = relay.get("/readyz").await;
    assert_eq!(
        readiness,
        (503, json!({"status": "queue_unavailable"})),
        "readyz while locked"
    );

    lock.execute_batch("ROLLBACK").unwrap();
    // The refused webhook was not stored: its retry is new, not a duplicate.
    let retried = post().await.unwrap();
    assert_eq!(retried.status().as_u16(), 202);
    assert_eq!(
        retried.json::<Value>().await.unwrap(),
        json!({"status": "accepted", "events": 1})
    );
    // Readiness recovers once the queue accepts writes again (answers are cached briefly).
    eventually(WAIT, async || match relay.get("/readyz").await.0 {
        200 => Ok(()),
        status => Err(format!("readyz still answers {status}")),
    })
    .await;
    relay
        .admin(reqwest::Method::POST, "/admin/forwarder/resume")
        .await;
    heap.wait_for_events(2, WAIT).await;
    relay.stop().await;
}

#[tokio::test]
async fn healthz_and_readyz_answer_200_while_serving() {
    let heap = FakeHeap::start().await;
    let relay = Relay::start(&heap, "").await;
    for path in ["/healthz", "/readyz"] {
        assert_eq!(relay.get(path).await.0, 200, "{path}");
    }
    relay.stop().await;
}
