//! Traces (contract §8) from the real binary to an OTLP/HTTP receiver started by the test: a
//! real axum server taking `POST /v1/traces` and decoding the protobuf
//! `ExportTraceServiceRequest` with the protocol's own types. And, on both queue backends, the
//! claim's part in it: each record comes with its webhook's digest and receive time.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::post;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode as SpanStatus;
use prost::Message;
use reqwest::Method;
use sha2::{Digest, Sha256};

use crate::support::postgres::Schema;
use crate::support::records;
use crate::support::{Answer, FakeHeap, RelayProcess, eventually, set_env};
use userpilot_heap_relay::heap::wire::RecordKind;
use userpilot_heap_relay::queue::sqlite::SqliteQueue;
use userpilot_heap_relay::queue::{Content, DeadLetterFilter, Queue, ReplayItem};
use userpilot_heap_relay::traces::Origin;

/// A span as received, with the resource's `service.name`.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    span: Span,
}

/// An OTLP/HTTP trace receiver on a port of its own.
struct Collector {
    url: String,
    spans: Arc<Mutex<Vec<Received>>>,
    requests: Arc<Mutex<Vec<String>>>,
}

impl Collector {
    async fn start() -> Collector {
        let spans: Arc<Mutex<Vec<Received>>> = Arc::default();
        let requests: Arc<Mutex<Vec<String>>> = Arc::default();
        let app = Router::new()
            .route("/v1/traces", post(receive))
            .with_state((spans.clone(), requests.clone()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Collector {
            url,
            spans,
            requests,
        }
    }

    fn spans(&self) -> Vec<Received> {
        self.spans.lock().unwrap().clone()
    }

    fn named(&self, name: &str) -> Vec<Span> {
        self.spans()
            .into_iter()
            .filter(|r| r.span.name == name)
            .map(|r| r.span)
            .collect()
    }
}

type CollectorState = (Arc<Mutex<Vec<Received>>>, Arc<Mutex<Vec<String>>>);

async fn receive(
    State((spans, requests)): State<CollectorState>,
    headers: HeaderMap,
    body: Bytes,
) -> impl IntoResponse {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    requests.lock().unwrap().push(content_type.clone());
    if content_type != "application/x-protobuf" {
        return (StatusCode::UNSUPPORTED_MEDIA_TYPE, Vec::new());
    }
    let Ok(request) = ExportTraceServiceRequest::decode(body) else {
        return (StatusCode::BAD_REQUEST, Vec::new());
    };
    let mut received = spans.lock().unwrap();
    for resource in request.resource_spans {
        let service = resource
            .resource
            .iter()
            .flat_map(|r| &r.attributes)
            .find_map(|kv| text(kv, "service.name"))
            .unwrap_or_default();
        for scope in resource.scope_spans {
            for span in scope.spans {
                received.push(Received {
                    service: service.clone(),
                    span,
                });
            }
        }
    }
    (
        StatusCode::OK,
        ExportTraceServiceResponse::default().encode_to_vec(),
    )
}

fn text(kv: &KeyValue, key: &str) -> Option<String> {
    match kv.value.as_ref()?.value.as_ref()? {
        AnyValue::StringValue(value) if kv.key == key => Some(value.clone()),
        _ => None,
    }
}

fn attribute(span: &Span, key: &str) -> Option<AnyValue> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.clone()?.value)
}

fn span_status(span: &Span) -> i32 {
    span.status.as_ref().map_or(0, |s| s.code)
}

/// The two sample webhooks the test sends (a track event and user properties each).
fn webhooks() -> Vec<serde_json::Value> {
    let now = chrono::Utc::now().timestamp();
    let samples = userpilot_heap_relay::samples::all("u_traces", now, "trace-test");
    samples.into_iter().take(2).map(|(_, body)| body).collect()
}

#[tokio::test]
async fn webhook_and_heap_request_spans_reach_the_collector_with_links_to_the_webhooks() {
    let collector = Collector::start().await;
    let heap = FakeHeap::start().await;
    // The first track request fails: its retry is another `heap.request` span, linked to the
    // same webhooks.
    let failed_once = Arc::new(Mutex::new(false));
    let first = failed_once.clone();
    heap.respond_with(move |path, _| {
        let mut failed = first.lock().unwrap();
        if path == "/api/track" && !*failed {
            *failed = true;
            return Answer::status(503);
        }
        Answer::OK
    });
    let dir = tempfile::tempdir().unwrap();
    let mut env = RelayProcess::env(&heap, dir.path());
    set_env(&mut env, "RELAY_TELEMETRY__OTLP_ENDPOINT", &collector.url);
    set_env(
        &mut env,
        "RELAY_TELEMETRY__SERVICE_NAME",
        "relay-under-test",
    );
    let mut relay = RelayProcess::spawn(&env);

    // Paused, so that both webhooks' events travel in one request.
    let (status, _) = relay.admin(Method::POST, "/admin/forwarder/pause").await;
    assert_eq!(status, 200);
    let bodies = webhooks();
    let mut events = 0;
    for body in &bodies {
        let (status, answer) = relay.post(body).await;
        assert_eq!(status, 202, "{answer}");
        events += answer["events"].as_u64().unwrap() as usize;
    }
    let (status, _) = relay.admin(Method::POST, "/admin/forwarder/resume").await;
    assert_eq!(status, 200);
    heap.wait_for_events(2, Duration::from_secs(20)).await;
    assert!(events >= 2);

    // Every webhook's four spans, and the two track requests.
    eventually(Duration::from_secs(20), async || {
        collector.named("webhook").len() == 2
            && collector.named("commit").len() == 2
            && collector
                .named("heap.request")
                .iter()
                .filter(|s| {
                    attribute(s, "url.path") == Some(AnyValue::StringValue("/api/track".into()))
                })
                .count()
                == 2
    })
    .await;
    assert!(
        collector
            .requests
            .lock()
            .unwrap()
            .iter()
            .all(|t| t == "application/x-protobuf")
    );
    assert!(
        collector
            .spans()
            .iter()
            .all(|r| r.service == "relay-under-test")
    );

    let webhook_spans = collector.named("webhook");
    for body in &bodies {
        // The trace id is derived from the body's digest (the receive time only moves the
        // span id): find this webhook's span by it.
        let digest: [u8; 32] = Sha256::digest(serde_json::to_vec(body).unwrap()).into();
        let trace_id = Origin::new(&digest, 0).context().trace_id().to_bytes();
        let webhook = webhook_spans
            .iter()
            .find(|s| s.trace_id == trace_id)
            .unwrap_or_else(|| panic!("no webhook span in trace {}", hex::encode(trace_id)));
        assert_eq!(webhook.kind, SpanKind::Server as i32);
        assert!(webhook.parent_span_id.is_empty(), "a root span");
        assert_eq!(
            attribute(webhook, "relay.outcome"),
            Some(AnyValue::StringValue("accepted".into()))
        );
        assert_eq!(
            attribute(webhook, "http.response.status_code"),
            Some(AnyValue::IntValue(202))
        );
        assert_ne!(span_status(webhook), SpanStatus::Error as i32);
        // Its children, in order, in its trace.
        let mut children: Vec<Span> = collector
            .spans()
            .into_iter()
            .map(|r| r.span)
            .filter(|s| s.parent_span_id == webhook.span_id)
            .collect();
        children.sort_by_key(|s| s.start_time_unix_nano);
        let names: Vec<&str> = children.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["verify", "map", "commit"]);
        for child in &children {
            assert_eq!(child.trace_id, webhook.trace_id);
            assert!(child.start_time_unix_nano >= webhook.start_time_unix_nano);
            assert!(child.end_time_unix_nano <= webhook.end_time_unix_nano);
        }
    }

    // Both track requests (the failed one and its retry) carry both webhooks' events: each
    // is a root of its own trace, linked — not parented — to both webhook spans.
    let mut tracks: Vec<Span> = collector
        .named("heap.request")
        .into_iter()
        .filter(|s| attribute(s, "url.path") == Some(AnyValue::StringValue("/api/track".into())))
        .collect();
    tracks.sort_by_key(|s| s.start_time_unix_nano);
    let codes: Vec<Option<AnyValue>> = tracks
        .iter()
        .map(|s| attribute(s, "http.response.status_code"))
        .collect();
    assert_eq!(
        codes,
        [Some(AnyValue::IntValue(503)), Some(AnyValue::IntValue(200))]
    );
    assert_eq!(span_status(&tracks[0]), SpanStatus::Error as i32);
    assert_ne!(span_status(&tracks[1]), SpanStatus::Error as i32);
    let mut webhook_contexts: Vec<(Vec<u8>, Vec<u8>)> = webhook_spans
        .iter()
        .map(|s| (s.trace_id.clone(), s.span_id.clone()))
        .collect();
    webhook_contexts.sort();
    for track in &tracks {
        assert_eq!(track.kind, SpanKind::Client as i32);
        assert!(track.parent_span_id.is_empty(), "links, not a parent");
        assert!(webhook_spans.iter().all(|w| w.trace_id != track.trace_id));
        let mut linked: Vec<(Vec<u8>, Vec<u8>)> = track
            .links
            .iter()
            .map(|l| (l.trace_id.clone(), l.span_id.clone()))
            .collect();
        linked.sort();
        assert_eq!(linked, webhook_contexts);
    }
    // The user-property requests link to the webhooks too.
    let users = collector
        .named("heap.request")
        .into_iter()
        .filter(|s| {
            attribute(s, "relay.endpoint")
                == Some(AnyValue::StringValue("add_user_properties".into()))
        })
        .collect::<Vec<_>>();
    assert!(!users.is_empty());
    for user in &users {
        assert!(!user.links.is_empty());
        for link in &user.links {
            assert!(webhook_contexts.contains(&(link.trace_id.clone(), link.span_id.clone())));
        }
    }
    // What was exported is counted; nothing was dropped.
    eventually(Duration::from_secs(10), async || {
        let metrics = metrics(&relay).await;
        let exported = counter(&metrics, "relay_trace_spans_total{outcome=\"exported\"}");
        let dropped = counter(&metrics, "relay_trace_spans_total{outcome=\"dropped\"}");
        let received = collector.spans().len() as u64;
        if exported == Some(received) && dropped == Some(0) {
            Ok(())
        } else {
            Err(format!(
                "exported {exported:?}, dropped {dropped:?}, received {received}"
            ))
        }
    })
    .await;
    relay.terminate(Duration::from_secs(10)).await;
}

async fn metrics(relay: &RelayProcess) -> String {
    relay
        .http
        .get(format!("{}/metrics", relay.admin_url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The value of the series `series` in a Prometheus text page.
fn counter(metrics: &str, series: &str) -> Option<u64> {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
}

#[tokio::test]
async fn a_refused_signature_is_a_webhook_span_whose_verify_step_failed() {
    let collector = Collector::start().await;
    let heap = FakeHeap::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut env = RelayProcess::env(&heap, dir.path());
    set_env(&mut env, "RELAY_TELEMETRY__OTLP_ENDPOINT", &collector.url);
    let mut relay = RelayProcess::spawn(&env);
    let (status, _) = relay
        .post_raw(b"{}".to_vec(), Some("t=1,v1=00"), None)
        .await;
    assert_eq!(status, 401);
    let webhook = eventually(Duration::from_secs(20), async || {
        collector.named("webhook").pop()
    })
    .await;
    assert_eq!(
        attribute(&webhook, "http.response.status_code"),
        Some(AnyValue::IntValue(401))
    );
    let verify = eventually(Duration::from_secs(5), async || {
        collector.named("verify").pop()
    })
    .await;
    assert_eq!(verify.parent_span_id, webhook.span_id);
    assert_eq!(span_status(&verify), SpanStatus::Error as i32);
    assert!(collector.named("map").is_empty(), "nothing mapped");
    relay.terminate(Duration::from_secs(10)).await;
}

#[tokio::test]
async fn without_an_endpoint_nothing_is_exported_and_events_still_reach_heap() {
    let collector = Collector::start().await;
    let heap = FakeHeap::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut env = RelayProcess::env(&heap, dir.path());
    // The SDK's own variable does not turn traces on: only the relay's key does.
    set_env(&mut env, "OTEL_EXPORTER_OTLP_ENDPOINT", &collector.url);
    let mut relay = RelayProcess::spawn(&env);
    let (status, _) = relay.post(&webhooks()[0]).await;
    assert_eq!(status, 202);
    heap.wait_for_events(1, Duration::from_secs(20)).await;
    let metrics = metrics(&relay).await;
    assert!(metrics.contains("relay_webhooks_total"), "{metrics}");
    assert!(!metrics.contains("relay_trace_spans_total"), "{metrics}");
    // A relay exporting would flush its spans while stopping: once it has stopped, anything
    // it recorded would have arrived.
    relay.terminate(Duration::from_secs(10)).await;
    assert!(collector.requests.lock().unwrap().is_empty());
    let logs = relay.logs.lock().unwrap().join("\n");
    assert!(!logs.contains("exporting traces"), "{logs}");
}

/// What a `heap.request` span's links derive from: each claimed record's webhook digest and
/// receive time, as the webhook span derived its ids from them.
async fn claims_carry_the_origin_of_their_webhook(queue: Arc<dyn Queue>) {
    const AT: i64 = 1_700_000_000_000;
    for (n, body) in ["first body", "second body"].into_iter().enumerate() {
        let tracks = vec![
            records::track(&format!("{n}-a"), "u"),
            records::track(&format!("{n}-b"), "u"),
        ];
        queue
            .enqueue(records::webhook(body, AT + n as i64, tracks))
            .await
            .unwrap();
    }
    let claimed = queue
        .claim(records::APP, RecordKind::Track, 10, AT + 10, 60_000)
        .await
        .unwrap();
    let origins: Vec<([u8; 32], i64)> = claimed
        .iter()
        .map(|c| (c.webhook_digest, c.webhook_received_at_ms))
        .collect();
    let digest = |body: &str| -> [u8; 32] { Sha256::digest(body.as_bytes()).into() };
    assert_eq!(
        origins,
        [
            (digest("first body"), AT),
            (digest("first body"), AT),
            (digest("second body"), AT + 1),
            (digest("second body"), AT + 1),
        ]
    );

    // A replayed record restarts its age at the replay, but still links to its webhook's span.
    let first = claimed[0].id;
    queue
        .dead_letter(vec![first], "rejected".into(), "no".into(), true, AT + 20)
        .await
        .unwrap();
    let item = queue
        .replay_items(DeadLetterFilter::default(), 10)
        .await
        .unwrap()
        .remove(0);
    let replayed_at = AT + 5_000;
    let item = ReplayItem {
        received_at_ms: replayed_at,
        ..item
    };
    let content = Content::Records(vec![records::track("0-a", "u")]);
    assert_eq!(
        queue
            .requeue(item, content, records::APP, replayed_at)
            .await
            .unwrap(),
        1
    );
    let again = queue
        .claim(
            records::APP,
            RecordKind::Track,
            10,
            replayed_at + 60_001,
            60_000,
        )
        .await
        .unwrap();
    let replayed = again
        .iter()
        .find(|c| c.received_at_ms == replayed_at)
        .expect("the replayed record is claimable");
    assert_eq!(
        (replayed.webhook_digest, replayed.webhook_received_at_ms),
        (digest("first body"), AT)
    );
}

#[tokio::test]
async fn sqlite_claims_carry_the_origin_of_their_webhook() {
    let dir = tempfile::tempdir().unwrap();
    let queue = SqliteQueue::open(&dir.path().join("queue.sqlite3")).unwrap();
    claims_carry_the_origin_of_their_webhook(Arc::new(queue)).await;
}

#[cfg_attr(not(postgres_tests), ignore = "needs RELAY_TEST_POSTGRES_URL")]
#[tokio::test]
async fn postgres_claims_carry_the_origin_of_their_webhook() {
    let schema = Schema::fresh().await;
    let queue = schema.queue().await;
    claims_carry_the_origin_of_their_webhook(Arc::new(queue)).await;
    schema.drop().await;
}
