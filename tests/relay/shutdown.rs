//! Graceful shutdown of the relay binary under load (contract §7): on SIGTERM it exits 0 within
//! `server.shutdown_grace_ms` even with a Heap request hanging, answers webhooks that arrive
//! while draining with 503 (or not at all), and every webhook it answered 202 is delivered
//! after a restart on the same queue folder. In-process: while draining, `/readyz` and new
//! webhooks answer 503 before the listener closes.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::{
    Answer, FakeHeap, Posted, RelayProcess, eventually, post_concurrently, set_env,
};
use serde_json::{Value, json};
use tokio::sync::Notify;

const GRACE_MS: u64 = 1500;

fn webhook(seq: usize) -> Value {
    json!({
        "timestamp": chrono::Utc::now().timestamp(),
        "data": {
            "type": "checklist",
            "action": "started",
            "checklist_id": "ck_shutdown",
            "seq": seq,
            "user": { "user_id": format!("term-{seq}") },
        },
    })
}

fn seqs(events: &[Value]) -> BTreeSet<usize> {
    events
        .iter()
        .map(|e| e["properties"]["seq"].as_u64().unwrap() as usize)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_under_load_exits_in_grace_and_loses_no_acknowledged_webhook() {
    let heap = FakeHeap::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut env = RelayProcess::env(&heap, dir.path());
    set_env(
        &mut env,
        "RELAY_SERVER__SHUTDOWN_GRACE_MS",
        &GRACE_MS.to_string(),
    );
    set_env(&mut env, "RELAY_HEAP__EVENTS_PER_MINUTE", "1000000");
    let mut relay = RelayProcess::spawn(&env);
    let bodies: Arc<Vec<Value>> = Arc::new((0..1000).map(webhook).collect());

    let notify = Arc::new(Notify::new());
    let load = tokio::spawn({
        let (client, bodies, notify) = (relay.client.clone(), bodies.clone(), notify.clone());
        async move {
            post_concurrently(
                &client,
                &bodies,
                (0..bodies.len()).collect(),
                8,
                150,
                notify,
            )
            .await
        }
    });
    tokio::time::timeout(Duration::from_secs(20), notify.notified())
        .await
        .expect("the relay accepted too few webhooks");

    // Heap stops answering: the forwarder's next batch hangs (longer than the grace period,
    // shorter than heap.timeout_ms), so shutdown has to abandon it.
    let hanging = Arc::new(AtomicUsize::new(0));
    let counter = hanging.clone();
    heap.respond_with(move |_, _| {
        counter.fetch_add(1, Ordering::SeqCst);
        Answer {
            status: 503,
            retry_after: None,
            delay: Duration::from_secs(8),
        }
    });
    eventually(Duration::from_secs(10), async || {
        (hanging.load(Ordering::SeqCst) > 0).then_some(())
    })
    .await;
    let (status, took) = relay
        .terminate(Duration::from_millis(GRACE_MS + 5_000))
        .await;
    let outcomes = load.await.unwrap();
    assert!(
        status.success(),
        "exit status {status:?}: {:?}",
        relay.logs()
    );
    // The app stops its tasks at the grace deadline (+100 ms); the rest is margin for process
    // teardown on a busy machine.
    assert!(
        took < Duration::from_millis(GRACE_MS + 1_500),
        "SIGTERM to exit took {took:?}"
    );
    assert!(
        relay
            .logs()
            .iter()
            .any(|l| l.contains("batch in flight stays queued")),
        "the hanging batch was not abandoned at the end of the grace period"
    );

    // While draining the relay refuses (503) or is gone; it never says 202 and then loses it.
    let mut acknowledged = BTreeSet::new();
    let (mut refused, mut unanswered) = (0, 0);
    for (seq, outcome) in &outcomes {
        match outcome {
            Posted::Answered(202, _) => {
                acknowledged.insert(*seq);
            }
            Posted::Answered(503, answer) => {
                assert_eq!(answer, &json!({"error": "unavailable"}));
                refused += 1;
            }
            Posted::Answered(status, answer) => panic!("seq {seq}: unexpected {status} {answer}"),
            Posted::NoAnswer => unanswered += 1,
        }
    }
    let before_restart = seqs(&heap.events());

    // Heap is back; a restart on the same folder delivers everything acknowledged.
    heap.respond_with(|_, _| Answer::OK);
    let _relay = RelayProcess::spawn(&env);
    let delivered = Arc::new(Mutex::new(BTreeSet::new()));
    let sink = delivered.clone();
    let heap_view = heap.clone();
    eventually(Duration::from_secs(30), async move || {
        let at_heap = seqs(&heap_view.events());
        *sink.lock().unwrap() = at_heap.clone();
        acknowledged.is_subset(&at_heap).then_some(())
    })
    .await;
    eprintln!(
        "SIGTERM: exit {status:?} after {took:?} (grace {GRACE_MS} ms); posted {}: 202 {}, \
         503 while draining {refused}, no answer {unanswered}; delivered before the restart {}, \
         all {} after the restart",
        outcomes.len(),
        outcomes.len() - refused - unanswered,
        before_restart.len(),
        delivered.lock().unwrap().len(),
    );
}

#[tokio::test]
async fn draining_turns_readiness_and_webhooks_to_503_before_the_listener_closes() {
    let heap = crate::support::FakeHeap::start().await;
    let relay = crate::support::Relay::start(&heap, "").await;
    assert_eq!(relay.get("/readyz").await.0, 200);
    relay.shutdown.cancel();
    // The base test config has a 2 s grace, so the listener stays open for 500 ms.
    let (status, ready) = relay.get("/readyz").await;
    assert_eq!(status, 503);
    assert_eq!(ready["status"], "draining");
    let body = serde_json::json!({ "timestamp": chrono::Utc::now().timestamp(),
        "data": { "type": "nps", "score": 3, "user": { "user_id": "d1" } } });
    let (status, answer) = relay.post(&body).await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (503, Some("unavailable"))
    );
    assert_eq!(relay.get("/healthz").await.0, 200);
    relay.task.await.unwrap();
}
