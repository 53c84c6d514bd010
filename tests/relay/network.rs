//! Hostile network clients against the real binary: connections that say nothing, stop in
//! the middle of the HTTP/2 preface, or sit idle after it are cut, so `/healthz`, `/metrics`
//! and signed webhooks recover within the idle deadline; request bodies trickled a byte a
//! second get 408 while signed webhooks keep being accepted; a hostile `X-Request-Id` never
//! reaches the logs.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::support::{FakeHeap, RelayProcess};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The idle deadline SECURITY.md promises: a connection with no request in flight is cut
/// this long after it was accepted or after its last response (sooner at the cap).
const IDLE_CUT: Duration = Duration::from_secs(10);

/// Connections per flood and per port: more than the 512 a listener serves at once.
const FLOOD: usize = 700;

/// The body deadline SECURITY.md promises: the whole body within this long of the headers.
const BODY_DEADLINE: Duration = Duration::from_secs(5);

/// Slow-body senders: more than the 128 webhook permits.
const SLOW_SENDERS: usize = 130;

fn host(url: &str) -> String {
    url.trim_start_matches("http://").to_owned()
}

/// The full HTTP/2 client preface followed by an empty SETTINGS frame.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

/// Connections opened at once: [`FLOOD`] of them, each writing `greeting` and then nothing.
struct Flood {
    streams: Vec<TcpStream>,
    rest: tokio::sync::mpsc::Receiver<Option<TcpStream>>,
}

/// Connections of a flood that must be open before the clock starts: more than the relay's
/// cap (512), fewer than the cap plus the listen backlog (128), so they connect at once.
const ESTABLISHED: usize = 600;

/// Starts [`FLOOD`] connections to `addr` and returns once [`ESTABLISHED`] of them are
/// open. Those beyond the cap and the listen backlog connect only when the relay makes room.
async fn flood(addr: &str, greeting: &'static [u8]) -> Flood {
    let (sender, mut rest) = tokio::sync::mpsc::channel(FLOOD);
    for _ in 0..FLOOD {
        let (addr, sender) = (addr.to_owned(), sender.clone());
        tokio::spawn(async move {
            let connect = async {
                let mut stream = TcpStream::connect(&addr).await.ok()?;
                stream.write_all(greeting).await.ok()?;
                Some(stream)
            };
            let stream = tokio::time::timeout(3 * IDLE_CUT, connect)
                .await
                .ok()
                .flatten();
            let _ = sender.send(stream).await;
        });
    }
    let mut streams = Vec::new();
    while streams.len() < ESTABLISHED {
        let stream = rest.recv().await.unwrap();
        streams.push(stream.expect("a connection within the cap and backlog failed"));
    }
    Flood { streams, rest }
}

impl Flood {
    /// All connections of the flood; fails if one never connected.
    async fn all(mut self) -> Vec<TcpStream> {
        while let Some(stream) = self.rest.recv().await {
            self.streams
                .push(stream.expect("a flooding connection was never accepted"));
            if self.streams.len() == FLOOD {
                break;
            }
        }
        assert_eq!(self.streams.len(), FLOOD);
        self.streams
    }
}

/// Reads each stream until the relay closes it (anything it writes first, such as HTTP/2
/// SETTINGS or GOAWAY, is skipped); returns how long after `since` the last one was closed,
/// failing if one is still open `within` after `since`.
async fn all_closed(streams: Vec<TcpStream>, since: Instant, within: Duration) -> Duration {
    let mut tasks = tokio::task::JoinSet::new();
    for mut stream in streams {
        tasks.spawn(async move {
            let mut buf = [0u8; 512];
            let deadline = tokio::time::Instant::from_std(since + within);
            loop {
                match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => return Some(since.elapsed()),
                    Ok(Ok(_)) => {}
                    Err(_) => return None,
                }
            }
        });
    }
    let mut last = Duration::ZERO;
    let mut open = 0;
    while let Some(closed) = tasks.join_next().await {
        match closed.unwrap() {
            Some(at) => last = last.max(at),
            None => open += 1,
        }
    }
    assert_eq!(open, 0, "{open} connections still open after {within:?}");
    last
}

/// Polls `GET url` on fresh connections until it answers 200; returns how long after `since`
/// that was, failing after `within`.
async fn answered_200(url: &str, since: Instant, within: Duration) -> Duration {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    loop {
        let answer = http.get(url).send().await;
        if answer.is_ok_and(|response| response.status().as_u16() == 200) {
            return since.elapsed();
        }
        assert!(
            since.elapsed() < within,
            "{url} not answered within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn webhook(i: usize) -> Value {
    json!({
        "timestamp": chrono::Utc::now().timestamp(),
        "data": { "type": "flow", "action": "started", "flow_id": format!("f{i}"),
                  "user": { "user_id": format!("u{i}") } }
    })
}

/// One flood of `greeting` connections on both ports: the health routes and a signed
/// webhook must be answered within the idle deadline plus 2 s, and every flooding
/// connection must be closed by the relay.
async fn survives_flood(relay: &RelayProcess, name: &str, greeting: &'static [u8], n: usize) {
    let (public, admin) = (host(&relay.url), host(&relay.admin_url));
    let (public_flood, admin_flood) =
        tokio::join!(flood(&public, greeting), flood(&admin, greeting));
    let since = Instant::now();
    let limit = IDLE_CUT + Duration::from_secs(2);
    let (health_url, metrics_url) = (
        format!("{}/healthz", relay.url),
        format!("{}/metrics", relay.admin_url),
    );
    let (health, metrics) = tokio::join!(
        answered_200(&health_url, since, limit),
        answered_200(&metrics_url, since, limit),
    );
    let (status, answer) = relay
        .with_timeout(Duration::from_secs(2))
        .try_post(&webhook(n))
        .await
        .unwrap();
    let webhook_at = since.elapsed();
    assert_eq!(status, 202, "{answer}");
    assert!(webhook_at < limit, "webhook answered after {webhook_at:?}");
    // Connections beyond the cap wait in the backlog, get their own idle deadline once
    // accepted, and are cut too: none is held forever.
    let (public_streams, admin_streams) = tokio::join!(public_flood.all(), admin_flood.all());
    let within = 3 * IDLE_CUT;
    let (public_closed, admin_closed) = tokio::join!(
        all_closed(public_streams, since, within),
        all_closed(admin_streams, since, within),
    );
    println!(
        "{name}: {FLOOD} connections per port ({ESTABLISHED} open when the clock started); /healthz answered after {health:?}, \
         /metrics after {metrics:?}, signed webhook 202 after {webhook_at:?}; \
         all flooding connections closed by {public_closed:?} (public), \
         {admin_closed:?} (admin)"
    );
}

#[tokio::test]
async fn silent_half_spoken_and_idle_http2_connections_are_cut_so_the_relay_recovers() {
    let heap = FakeHeap::start().await;
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::spawn(&RelayProcess::env(&heap, dir.path()));
    survives_flood(&relay, "silent", b"", 0).await;
    survives_flood(&relay, "partial HTTP/2 preface", b"PRI * HTT", 1).await;
    survives_flood(&relay, "idle HTTP/2 after the preface", H2_PREFACE, 2).await;
    heap.wait_for_events(3, Duration::from_secs(10)).await;
}

/// What a slow sender saw: the status line of the answer and when it came.
async fn send_slowly(addr: String) -> Option<(String, Duration)> {
    let mut stream = TcpStream::connect(&addr).await.unwrap();
    let head = "POST /webhooks/userpilot HTTP/1.1\r\nHost: relay\r\n\
                Content-Type: application/json\r\nContent-Length: 100000\r\n\
                X-Signature: t=1,v1=00\r\n\r\n";
    stream.write_all(head.as_bytes()).await.unwrap();
    let started = Instant::now();
    let mut pace = tokio::time::interval(Duration::from_secs(1));
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        if started.elapsed() > Duration::from_secs(30) {
            return None;
        }
        tokio::select! {
            read = stream.read(&mut buf) => match read {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    answer.extend_from_slice(&buf[..n]);
                    if answer.windows(4).any(|w| w == b"\r\n\r\n")
                        && answer.ends_with(b"}")
                    {
                        break;
                    }
                }
            },
            // The attacker's pace, not a wait for the relay: one byte a second.
            _ = pace.tick() => {
                if stream.write_all(b" ").await.is_err() {
                    // The relay stopped reading; its answer may still be readable.
                }
            }
        }
    }
    let at = started.elapsed();
    let text = String::from_utf8_lossy(&answer).into_owned();
    Some((text, at))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[rank]
}

#[tokio::test]
async fn slow_bodies_get_408_while_signed_webhooks_keep_being_accepted() {
    let heap = FakeHeap::start().await;
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::spawn(&RelayProcess::env(&heap, dir.path()));
    let flood_started = Instant::now();
    let mut slow = tokio::task::JoinSet::new();
    for _ in 0..SLOW_SENDERS {
        slow.spawn(send_slowly(host(&relay.url)));
    }
    // Four posters, like Userpilot's delivery workers, for as long as the slow senders last.
    let done = Arc::new(AtomicBool::new(false));
    let mut posters = tokio::task::JoinSet::new();
    for poster in 0..4 {
        let (client, done) = (relay.with_timeout(Duration::from_secs(20)), done.clone());
        posters.spawn(async move {
            let mut seen = Vec::new();
            let mut i = 0;
            while !done.load(Ordering::SeqCst) {
                let started = Instant::now();
                let answer = client
                    .try_post(&webhook(poster * 100_000 + i))
                    .await
                    .map(|(status, _)| status)
                    .unwrap_or(0);
                seen.push((answer, started.elapsed()));
                i += 1;
            }
            seen
        });
    }
    let mut timed_out = 0;
    let mut answered_at = Vec::new();
    while let Some(outcome) = slow.join_next().await {
        let (answer, at) = outcome.unwrap().expect("slow sender got no answer in 30 s");
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(
            answer.contains(r#"{"error":"request_timeout"}"#),
            "{answer}"
        );
        timed_out += 1;
        answered_at.push(at);
    }
    done.store(true, Ordering::SeqCst);
    let flood_lasted = flood_started.elapsed();
    let mut latencies = Vec::new();
    let mut refused = Vec::new();
    for seen in posters.join_all().await {
        for (status, latency) in seen {
            if status == 202 {
                latencies.push(latency);
            } else {
                refused.push(status);
            }
        }
    }
    latencies.sort();
    answered_at.sort();
    let (p50, p99) = (percentile(&latencies, 0.5), percentile(&latencies, 0.99));
    println!(
        "{SLOW_SENDERS} slow senders: {timed_out} answered 408 between {:?} and {:?}; \
         over {flood_lasted:?}, {} signed webhooks accepted (p50 {p50:?}, p99 {p99:?}, \
         max {:?}), {} refused {refused:?}",
        answered_at[0],
        answered_at[answered_at.len() - 1],
        latencies.len(),
        latencies[latencies.len() - 1],
        refused.len(),
    );
    assert_eq!(timed_out, SLOW_SENDERS);
    assert!(answered_at[0] >= BODY_DEADLINE - Duration::from_millis(500));
    assert!(answered_at[answered_at.len() - 1] < BODY_DEADLINE + Duration::from_secs(3));
    assert!(refused.is_empty(), "signed webhooks refused: {refused:?}");
    assert!(latencies.len() >= 20, "only {} webhooks", latencies.len());
    assert!(p99 < Duration::from_secs(1), "p99 {p99:?}");
    heap.wait_for_events(latencies.len(), Duration::from_secs(30))
        .await;
}

#[tokio::test]
async fn an_invalid_request_id_is_replaced_before_it_reaches_the_logs() {
    let heap = FakeHeap::start().await;
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::spawn(&RelayProcess::env(&heap, dir.path()));
    let http = reqwest::Client::new();
    let post = |id: String| {
        http.post(format!("{}/webhooks/userpilot", relay.url))
            .header("x-request-id", id)
            .header("x-signature", "t=1,v1=00")
            .body("{}")
            .send()
    };
    let hostile = format!("forged\" level=ERROR msg=\"{}", "x".repeat(300));
    let response = post(hostile.clone()).await.unwrap();
    assert_eq!(response.status().as_u16(), 401);
    let echoed = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(uuid::Uuid::parse_str(&echoed).is_ok(), "{echoed}");
    // A plain id is kept, and the refusal is logged with it.
    let response = post("req-7f3a".into()).await.unwrap();
    assert_eq!(response.headers()["x-request-id"], "req-7f3a");
    let logs = crate::support::eventually(Duration::from_secs(10), async || {
        let logs = relay.logs();
        logs.iter()
            .any(|line| line.contains("req-7f3a"))
            .then_some(logs)
    })
    .await;
    assert!(logs.iter().any(|line| line.contains(&echoed)));
    assert!(!logs.iter().any(|line| line.contains("forged")));
}
