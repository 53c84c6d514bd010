//! Dead letters against the relay binary (contract §3, §7): an event Heap refuses is isolated from
//! its batch and dead-lettered alone, visible and replayable through the admin API; a webhook
//! quarantined for a configuration problem is repaired by changing the configuration and
//! replaying it with the `dlq` command.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::support::{Answer, FakeHeap, RelayProcess, eventually, run_cli, set_env};
use reqwest::Method;
use serde_json::{Value, json};

fn webhook(seq: usize, poison: bool) -> Value {
    json!({
        "timestamp": chrono::Utc::now().timestamp(),
        "data": {
            "type": "feature_tag",
            "action": "click",
            "feature_id": "ft_1",
            "seq": seq,
            "poison": poison,
            "user": { "user_id": format!("dl-{seq}"), "email": format!("dl-{seq}@example.com") },
        },
    })
}

fn is_poisoned(event: &Value) -> bool {
    event["properties"]["poison"] == "true"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_event_is_isolated_from_its_batch_dead_lettered_and_replayable() {
    const BATCH: usize = 20;
    const POISON: usize = 13;
    let heap = FakeHeap::start().await;
    // Heap refuses any track request that carries the poisoned event, until "fixed".
    let fixed = Arc::new(AtomicBool::new(false));
    let is_fixed = fixed.clone();
    heap.respond_with(move |path, body| {
        let poisoned =
            path == "/api/track" && body["events"].as_array().unwrap().iter().any(is_poisoned);
        if poisoned && !is_fixed.load(Ordering::SeqCst) {
            Answer::status(400)
        } else {
            Answer::OK
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::spawn(&RelayProcess::env(&heap, dir.path()));

    // Paused, so that the twenty webhooks are claimed as one batch.
    assert_eq!(
        relay.admin(Method::POST, "/admin/forwarder/pause").await.0,
        200
    );
    for seq in 0..BATCH {
        let (status, answer) = relay.post(&webhook(seq, seq == POISON)).await;
        assert_eq!(
            (status, answer),
            (202, json!({"status": "accepted", "events": 1}))
        );
    }
    let (_, status) = relay.admin(Method::GET, "/admin/status").await;
    assert_eq!(status["forwarder"], "paused");
    assert!(heap.requests().is_empty(), "sent while paused");
    assert_eq!(
        relay.admin(Method::POST, "/admin/forwarder/resume").await.0,
        200
    );

    // The neighbours arrive; the poisoned event alone becomes a dead letter.
    let events = heap
        .wait_for_events(BATCH - 1, Duration::from_secs(10))
        .await;
    assert!(!events.iter().any(is_poisoned));
    let (status, listing) = eventually_dead_letters(&relay, 1).await;
    assert_eq!(status, 200);
    let letter = &listing["dead_letters"][0];
    assert_eq!(letter["reason"], "rejected");
    assert_eq!(letter["kind"], "track");
    assert_eq!(letter["subject"], format!("dl-{POISON}"));
    let detail = letter["detail"].as_str().unwrap();
    assert!(
        detail.contains("400"),
        "detail without heap's status: {detail}"
    );

    // It was one batch, split in halves down to the bad event: at most 2·⌈log2 20⌉ + 1 calls.
    let track: Vec<_> = heap
        .requests()
        .into_iter()
        .filter(|r| r.path == "/api/track")
        .collect();
    assert_eq!(track[0].body["events"].as_array().unwrap().len(), BATCH);
    assert!(
        track.len() <= 11,
        "{} track requests to isolate one event",
        track.len()
    );
    eprintln!(
        "poison: {} track requests to isolate 1 bad event in a batch of {BATCH}",
        track.len()
    );
    let refused_key = track
        .iter()
        .flat_map(|r| r.body["events"].as_array().unwrap().clone())
        .find(is_poisoned)
        .unwrap()["idempotency_key"]
        .clone();

    // The cause is fixed at Heap; replaying the dead letter by id delivers it, same key.
    fixed.store(true, Ordering::SeqCst);
    let id = letter["id"].as_i64().unwrap();
    let (status, answer) = relay
        .admin(Method::POST, &format!("/admin/dead-letters/replay?id={id}"))
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        answer["replayed"],
        json!({"webhooks": 1, "events": 1, "quarantined": 0})
    );
    let events = heap.wait_for_events(BATCH, Duration::from_secs(10)).await;
    let replayed: Vec<&Value> = events.iter().filter(|e| is_poisoned(e)).collect();
    assert_eq!(replayed.len(), 1);
    assert_eq!(replayed[0]["idempotency_key"], refused_key);
    assert_eq!(events.len(), BATCH, "a neighbour was sent twice");
    let (_, listing) = relay.admin(Method::GET, "/admin/dead-letters").await;
    assert_eq!(listing["dead_letters"], json!([]));
}

/// Polls the dead-letter listing until it holds `n` letters.
async fn eventually_dead_letters(relay: &RelayProcess, n: usize) -> (u16, Value) {
    eventually(Duration::from_secs(10), async || {
        let (status, listing) = relay.admin(Method::GET, "/admin/dead-letters").await;
        if listing["dead_letters"]
            .as_array()
            .is_some_and(|l| l.len() >= n)
        {
            Ok((status, listing))
        } else {
            Err(format!("no {n} dead letters: {listing}"))
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_quarantined_for_its_identity_is_repaired_by_config_and_dlq_replay() {
    let heap = FakeHeap::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut by_email = RelayProcess::env(&heap, dir.path());
    set_env(&mut by_email, "RELAY_HEAP__IDENTITY", "email");
    let mut relay = RelayProcess::spawn(&by_email);

    // A user without an email cannot be identified in Heap: kept, as a dead letter.
    let orphan = json!({
        "timestamp": chrono::Utc::now().timestamp(),
        "data": { "type": "nps", "score": 3, "user": { "user_id": "no-email-1" } },
    });
    let (status, answer) = relay.post(&orphan).await;
    assert_eq!((status, answer), (202, json!({"status": "quarantined"})));
    // Its neighbour with an email goes through, identified by the email.
    let (status, _) = relay.post(&webhook(1, false)).await;
    assert_eq!(status, 202);
    let events = heap.wait_for_events(1, Duration::from_secs(10)).await;
    assert_eq!(events[0]["identity"], "dl-1@example.com");
    let (code, _) = relay.terminate(Duration::from_secs(10)).await;
    assert!(code.success());

    // The operator looks at the dead letters with the relay stopped...
    let listed = run_cli(&by_email, &["dlq", "list"]);
    assert!(
        listed.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    let letters: Vec<Value> = String::from_utf8(listed.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0]["reason"], "no_identity");
    assert_eq!(letters[0]["kind"], "webhook");
    assert_eq!(letters[0]["subject"], "no-email-1");

    // ...switches the identity to the Userpilot user id and replays by reason.
    let mut by_user_id = by_email.clone();
    set_env(&mut by_user_id, "RELAY_HEAP__IDENTITY", "user_id");
    let replayed = run_cli(&by_user_id, &["dlq", "replay", "--reason", "no_identity"]);
    assert!(
        replayed.status.success(),
        "{}",
        String::from_utf8_lossy(&replayed.stderr)
    );
    let summary: Value = serde_json::from_slice(&replayed.stdout).unwrap();
    assert_eq!(
        summary,
        json!({"webhooks": 1, "events": 1, "quarantined": 0})
    );
    let listed = run_cli(&by_user_id, &["dlq", "list"]);
    assert!(
        listed.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&listed.stdout)
    );

    // The relay, restarted with the new configuration, delivers it.
    let _relay = RelayProcess::spawn(&by_user_id);
    let events = heap.wait_for_events(2, Duration::from_secs(10)).await;
    assert_eq!(events.len(), 2, "the neighbour was sent again: {events:?}");
    assert_eq!(events[1]["identity"], "no-email-1");
    assert_eq!(events[1]["event"], "Userpilot NPS (score)");
}
