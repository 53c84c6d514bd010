//! End to end through the real server: every sample kind reaches the fake Heap.

use std::time::Duration;

use crate::support::{FakeHeap, Relay};
use serde_json::json;

#[tokio::test]
async fn every_sample_kind_is_accepted_and_reaches_heap() {
    let heap = FakeHeap::start().await;
    let relay = Relay::start(&heap, "").await;
    let samples = userpilot_heap_relay::samples::all("u_1", chrono::Utc::now().timestamp(), "n1");
    let mut expected = 0;
    for (label, body) in &samples {
        let (status, answer) = relay.post(body).await;
        assert_eq!(status, 202, "{label}: {answer}");
        assert_eq!(answer["status"], "accepted", "{label}");
        expected += answer["events"].as_u64().unwrap() as usize;
    }
    let events = heap
        .wait_for_events(expected, Duration::from_secs(10))
        .await;
    let mut names: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    names.sort();
    assert!(names.contains(&"Userpilot NPS (score)"));
    assert!(names.contains(&"Userpilot Tracked Event (Clicked Upgrade)"));
    assert_eq!(events.len(), expected);
    let (status, answer) = relay.post(&samples[0].1).await;
    assert_eq!((status, answer), (202, json!({"status": "duplicate"})));
    relay.stop().await;
}
