//! Nothing acknowledged is lost when the relay binary is killed with `kill -9` in the middle of
//! concurrent webhook traffic (contract §7): after a restart on the same queue folder, every
//! webhook that was answered 202 reaches Heap, each event under exactly one idempotency key.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::{
    Answer, FakeHeap, Posted, RelayProcess, eventually, post_concurrently, set_env,
};
use serde_json::{Value, json};
use tokio::sync::Notify;

/// Concurrent senders, as Userpilot's delivery workers would be.
const POSTERS: usize = 8;
/// Webhooks posted against each relay process before it is killed.
const PER_ROUND: usize = 300;
/// The relay is killed as soon as this many webhooks of its round were answered 202.
const KILL_AFTER: usize = 100;

fn webhook(seq: usize) -> Value {
    let mut webhook = crate::support::flow_started("crash", seq);
    // A user property too, so each webhook also queues a user record.
    webhook["data"]["user"]["plan"] = json!("pro");
    webhook
}

/// Track events Heap took in, grouped by `(identity, event name, seq)`: the idempotency keys
/// each logical event arrived under, and how many times it arrived.
fn arrivals(
    taken_in: &Mutex<Vec<Value>>,
) -> BTreeMap<(String, String, u64), (BTreeSet<String>, usize)> {
    let mut by_event: BTreeMap<_, (BTreeSet<String>, usize)> = BTreeMap::new();
    for event in taken_in.lock().unwrap().iter() {
        let id = (
            event["identity"].as_str().unwrap().to_owned(),
            event["event"].as_str().unwrap().to_owned(),
            event["properties"]["seq"].as_u64().unwrap(),
        );
        let entry = by_event.entry(id).or_default();
        entry
            .0
            .insert(event["idempotency_key"].as_str().unwrap().to_owned());
        entry.1 += 1;
    }
    by_event
}

fn seqs_at_heap(taken_in: &Mutex<Vec<Value>>) -> BTreeSet<usize> {
    arrivals(taken_in)
        .keys()
        .map(|(_, _, seq)| *seq as usize)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_webhook_answered_202_reaches_heap_after_kill_9_and_restart() {
    let heap = FakeHeap::start().await;
    // Heap takes every request in as it arrives and answers a little later, so that a kill can
    // land between the two: the relay never sees that answer and sends the batch again.
    let taken_in: Arc<Mutex<Vec<Value>>> = Arc::default();
    let sink = taken_in.clone();
    heap.respond_with(move |path, body| {
        if path == "/api/track" {
            sink.lock()
                .unwrap()
                .extend(body["events"].as_array().unwrap().iter().cloned());
        }
        Answer {
            delay: Duration::from_millis(50),
            ..Answer::OK
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let mut env = RelayProcess::env(&heap, dir.path());
    set_env(&mut env, "RELAY_HEAP__EVENTS_PER_MINUTE", "1000000");
    let bodies: Arc<Vec<Value>> = Arc::new((0..2 * PER_ROUND).map(webhook).collect());

    // Two rounds: start the relay, post a share of the webhooks concurrently, kill -9 mid-way.
    let mut outcomes: Vec<(usize, Posted)> = Vec::new();
    for round in 0..2 {
        let mut relay = RelayProcess::spawn(&env);
        let notify = Arc::new(Notify::new());
        let indexes: Vec<usize> = (round * PER_ROUND..(round + 1) * PER_ROUND).collect();
        let load = tokio::spawn({
            let (client, bodies, notify) = (relay.client.clone(), bodies.clone(), notify.clone());
            async move {
                post_concurrently(&client, &bodies, indexes, POSTERS, KILL_AFTER, notify).await
            }
        });
        tokio::time::timeout(Duration::from_secs(20), notify.notified())
            .await
            .expect("the relay accepted too few webhooks before the kill");
        relay.kill();
        let round_outcomes = load.await.unwrap();
        let unanswered = round_outcomes
            .iter()
            .filter(|(_, o)| matches!(o, Posted::NoAnswer))
            .count();
        assert!(
            unanswered > 0,
            "round {round}: the kill did not land during the load"
        );
        outcomes.extend(round_outcomes);
    }

    // Every answer the relay did give is an acceptance: nothing else was expected.
    let mut acknowledged = BTreeSet::new();
    let mut unanswered = Vec::new();
    for (seq, outcome) in &outcomes {
        match outcome {
            Posted::Answered(202, answer) => {
                assert_eq!(
                    answer,
                    &json!({"status": "accepted", "events": 1}),
                    "seq {seq}"
                );
                acknowledged.insert(*seq);
            }
            Posted::Answered(status, answer) => panic!("seq {seq}: unexpected {status} {answer}"),
            Posted::NoAnswer => unanswered.push(*seq),
        }
    }

    // Restart on the same folder: every acknowledged webhook arrives, without any resend.
    let relay = RelayProcess::spawn(&env);
    let delivered = eventually(Duration::from_secs(30), async || {
        let at_heap = seqs_at_heap(&taken_in);
        acknowledged.is_subset(&at_heap).then_some(at_heap)
    })
    .await;
    // Userpilot retries what got no answer: accepted now, or recognised as already stored —
    // always so for a webhook that was committed before the kill and has reached Heap since.
    let mut stored_before_kill = 0;
    for seq in &unanswered {
        let (status, answer) = relay.post(&bodies[*seq]).await;
        assert_eq!(status, 202, "seq {seq}: {answer}");
        if answer["status"] == "duplicate" {
            stored_before_kill += 1;
        } else {
            assert!(
                !delivered.contains(seq),
                "seq {seq} was delivered but not recognised"
            );
        }
    }
    let all: BTreeSet<usize> = (0..bodies.len()).collect();
    eventually(Duration::from_secs(30), async || {
        seqs_at_heap(&taken_in) == all
    })
    .await;

    // Effectively once: each event arrived under one idempotency key; resends (a batch in
    // flight when the relay was killed) repeat that key.
    let arrived = arrivals(&taken_in);
    for (event, (keys, _)) in &arrived {
        assert_eq!(
            keys.len(),
            1,
            "{event:?} arrived under several keys: {keys:?}"
        );
    }
    let distinct_keys: BTreeSet<&String> = arrived.values().flat_map(|(keys, _)| keys).collect();
    assert_eq!(distinct_keys.len(), bodies.len());
    let sends: usize = arrived.values().map(|(_, count)| count).sum();
    eprintln!(
        "kill -9: posted {} webhooks in 2 killed rounds; 202 {}, no answer {} (of which {} \
         had been stored before the kill); events at heap {}, \
         distinct keys {}, resent with the same key {}",
        outcomes.len(),
        acknowledged.len(),
        unanswered.len(),
        stored_before_kill,
        sends,
        distinct_keys.len(),
        sends - distinct_keys.len()
    );
}
