//! Hostile and heavy traffic: slow clients are cut off, oversize headers refused, connections
//! beyond the cap kept waiting until one closes, a thousand concurrent connections served or
//! shed (never a crash, never an unexplained error), admin routes closed without the token, and
//! metrics exported.

use std::time::{Duration, Instant};

use crate::support::{FakeHeap, Relay, RelayProcess, eventually};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn host(url: &str) -> &str {
    url.trim_start_matches("http://")
}

#[tokio::test]
async fn a_client_trickling_headers_is_disconnected() {
    let heap = FakeHeap::start().await;
    let relay = Relay::start(&heap, "").await;
    let mut stream = TcpStream::connect(host(&relay.url)).await.unwrap();
    stream
        .write_all(b"POST /webhooks/userpilot HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    // Keep trickling a header byte every second; the server must still close the connection
    // once its header deadline passes.
    let mut buf = [0u8; 1024];
    let closed = loop {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "connection still open after 30 s"
        );
        match tokio::time::timeout(Duration::from_secs(1), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break started.elapsed(),
            Ok(Ok(_)) => {} // a 408 response may come first; keep reading until close
            Err(_) => {
                if stream.write_all(b"X").await.is_err() {
                    break started.elapsed();
                }
            }
        }
    };
    let limit = userpilot_heap_relay::http::serve::HEADER_READ_TIMEOUT;
    assert!(
        closed >= limit - Duration::from_secs(1),
        "closed too early: {closed:?}"
    );
    assert!(
        closed < limit + Duration::from_secs(5),
        "closed too late: {closed:?}"
    );
    relay.stop().await;
}

#[tokio::test]
async fn oversize_headers_are_refused_with_431() {
    let heap = FakeHeap::start().await;
    let relay = Relay::start(&heap, "").await;
    let big = "a".repeat(64 * 1024);
    let response = relay
        .http
        .post(format!("{}/webhooks/userpilot", relay.url))
        .header("x-padding", big)
        .body("{}")
        .send()
        .await;
    match response {
        Ok(response) => assert_eq!(response.status().as_u16(), 431),
        // hyper may close the connection before the client finished writing.
        Err(error) => assert!(error.is_request() || error.is_connect(), "{error}"),
    }
    // Too many headers, each small, are refused as well.
    let mut request = relay
        .http
        .post(format!("{}/webhooks/userpilot", relay.url))
        .body("{}");
    for i in 0..200 {
        request = request.header(format!("x-h{i}"), "v");
    }
    let status = request
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(431);
    assert_eq!(status, 431);
    // The server is unharmed.
    let ok = relay
        .http
        .get(format!("{}/healthz", relay.url))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status().as_u16(), 200);
    relay.stop().await;
}

#[tokio::test]
async fn a_thousand_concurrent_webhooks_are_served_or_shed_without_a_crash() {
    let heap = FakeHeap::start().await;
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::spawn(&RelayProcess::env(&heap, dir.path()));
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0) // one connection per request: 1,000 connections at once
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let now = chrono::Utc::now().timestamp();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..1000 {
        let body = json!({
            "timestamp": now,
            "data": { "type": "flow", "action": "started", "flow_id": format!("f{i}"),
                      "user": { "user_id": format!("u{i}") } }
        });
        let body = serde_json::to_vec(&body).unwrap();
        let signature = crate::support::signature(&body);
        let client = client.clone();
        let url = format!("{}/webhooks/userpilot", relay.url);
        tasks.spawn(async move {
            let response = client
                .post(url)
                .header("content-type", "application/json")
                .header("x-signature", signature)
                .body(body)
                .send()
                .await
                .unwrap();
            let retry_after = response.headers().contains_key("retry-after");
            (response.status().as_u16(), retry_after)
        });
    }
    let (mut accepted, mut shed) = (0, 0);
    while let Some(result) = tasks.join_next().await {
        match result.unwrap() {
            (202, _) => accepted += 1,
            (503, true) => shed += 1,
            other => panic!("unexpected answer {other:?}"),
        }
    }
    assert_eq!(accepted + shed, 1000);
    assert!(accepted > 0);
    println!("1000 concurrent webhooks: {accepted} accepted, {shed} shed");
    // Every accepted one is delivered, and the relay still answers.
    heap.wait_for_events(accepted, Duration::from_secs(60))
        .await;
    let health = client
        .get(format!("{}/healthz", relay.url))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status().as_u16(), 200);
}

#[tokio::test]
async fn admin_routes_need_the_token() {
    let heap = FakeHeap::start().await;
    let relay = Relay::start(&heap, "").await;
    let url = format!("{}/admin/dead-letters", relay.admin_url);
    let none = relay.http.get(&url).send().await.unwrap();
    assert_eq!(none.status().as_u16(), 401);
    let wrong = relay
        .http
        .get(&url)
        .bearer_auth("admin-tokem")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status().as_u16(), 401);
    let (status, body) = relay
        .admin(reqwest::Method::GET, "/admin/dead-letters")
        .await;
    assert_eq!(status, 200);
    assert_eq!(body["dead_letters"], json!([]));
    relay.stop().await;
}

#[tokio::test]
async fn admin_is_forbidden_when_no_token_is_configured() {
    let heap = FakeHeap::start().await;
    let relay = Relay::start(&heap, "[admin]\ntoken = \"\"").await;
    for path in ["/admin/dead-letters", "/admin/status"] {
        let response = relay
            .http
            .get(format!("{}{path}", relay.admin_url))
            .bearer_auth("")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 403, "{path}");
    }
    relay.stop().await;
}

#[tokio::test]
async fn metrics_export_the_spec_names() {
    let heap = FakeHeap::start().await;
    let relay = Relay::start(&heap, "").await;
    let body = json!({ "timestamp": chrono::Utc::now().timestamp(),
                       "data": { "type": "nps", "score": 7, "user": { "user_id": "m1" } } });
    assert_eq!(relay.post(&body).await.0, 202);
    let (status, _) = relay
        .post_raw(b"{}".to_vec(), Some("t=1,v1=00"), None)
        .await;
    assert_eq!(status, 401);
    heap.wait_for_events(1, Duration::from_secs(10)).await;
    let names = [
        "relay_webhooks_total{outcome=\"accepted\",source=\"default\"}",
        "relay_webhooks_total{outcome=\"invalid_signature\",source=\"default\"}",
        "relay_signature_failures_total{reason=\"stale\",source=\"default\"}",
        "relay_events_forwarded_total",
        "relay_heap_requests_total{endpoint=\"track\",status=\"200\",app_id=\"test-app\"}",
        "relay_heap_request_duration_seconds_bucket",
        "relay_webhook_duration_seconds_bucket",
        "relay_queue_depth{state=\"pending\",app_id=\"test-app\"}",
        "relay_oldest_pending_age_seconds",
        "relay_forwarder_state{state=\"running\",app_id=\"test-app\"}",
    ];
    let url = format!("{}/metrics", relay.admin_url);
    eventually(Duration::from_secs(10), async || {
        let metrics = relay
            .http
            .get(&url)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let missing: Vec<_> = names.iter().filter(|n| !metrics.contains(*n)).collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(format!("missing {missing:?} in:\n{metrics}"))
        }
    })
    .await;
    relay.stop().await;
}

/// Sends `GET /healthz` on `stream` and reads the response head within `wait`.
async fn health_on(stream: &mut TcpStream, wait: Duration) -> Option<String> {
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    read_head(stream, wait).await
}

/// Reads until the end of a response head, within `wait`; `None` when it did not come in time.
async fn read_head(stream: &mut TcpStream, wait: Duration) -> Option<String> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    let read = async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "connection closed");
            head.extend_from_slice(&buf[..n]);
        }
    };
    tokio::time::timeout(wait, read).await.ok()?;
    Some(String::from_utf8_lossy(&head).into_owned())
}

#[tokio::test]
async fn at_the_cap_idle_connections_are_cut_so_a_waiting_one_is_served() {
    use userpilot_heap_relay::http::serve::{CLOSE_GRACE, IDLE_TIMEOUT_AT_CAP, MAX_CONNECTIONS};
    let heap = FakeHeap::start().await;
    let relay = Relay::start(&heap, "").await;
    let mut open = Vec::new();
    for _ in 0..MAX_CONNECTIONS {
        let mut stream = TcpStream::connect(host(&relay.url)).await.unwrap();
        let head = health_on(&mut stream, Duration::from_secs(10)).await;
        assert!(head.unwrap().starts_with("HTTP/1.1 200"));
        open.push(stream); // kept alive, idle
    }

    // The kernel completes the connection; the relay, at its cap, takes it once idle
    // connections have been cut on the short deadline.
    let mut extra = TcpStream::connect(host(&relay.url)).await.unwrap();
    let wait = IDLE_TIMEOUT_AT_CAP + CLOSE_GRACE + Duration::from_secs(3);
    let head = health_on(&mut extra, wait).await;
    let head = head.expect("the waiting connection was not served");
    assert!(head.starts_with("HTTP/1.1 200"));
    // The oldest idle connection was the one cut.
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        while open[0].read(&mut buf).await.is_ok_and(|n| n > 0) {}
    })
    .await;
    assert!(closed.is_ok(), "the oldest idle connection is still open");
    drop(open);
    relay.stop().await;
}
