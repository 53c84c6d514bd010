//! Traces (contract §8): OpenTelemetry spans of the request path and the delivery path, sent
//! over OTLP/HTTP (protobuf) when `telemetry.otlp_endpoint` is set. With it empty, [`Traces`]
//! is off: every call here returns at once, nothing is recorded and nothing is sent.
//!
//! The spans: `webhook` (one per request to the webhook endpoint, kind server) with the
//! children `verify`, `map` (decode and map) and `commit`; `heap.request` (one per bulk
//! request to Heap, kind client) with a span *link* to the `webhook` span of each webhook
//! whose records it carries. Links, not parents: a record is delivered later, in another
//! trace, perhaps by another replica or after a restart, a retry or a dead-letter replay.
//!
//! **How the forwarder finds the webhook spans without storing anything.** A `webhook` span's
//! ids are derived, not random: its trace id from the body's digest, its span id from the
//! digest and the receive time in milliseconds ([`Origin::context`]). The queue keeps both for
//! every webhook anyway (its digest is its identity) and hands them out with each claimed
//! record, so the forwarder computes the links: no schema change, nothing more written per
//! webhook, and links stay right across restarts, replicas and replays (a replay keeps the
//! webhook's digest and receive time). A
//! redelivery of the same body lands in the same trace as the first delivery (same digest),
//! as a second root with its own span id (its own receive time). The ids are hashes with a
//! label of their own, so they do not give the body's digest away. A webhook whose signature
//! does not verify has no digest: its spans get random ids.
//!
//! **Why spans are built here.** The SDK's tracer always generates a span's ids itself, so it
//! cannot make a span whose ids are derived. This module records start, end, attributes and
//! status, builds the SDK's [`SpanData`] and leaves the wire format, retries and resource to
//! `opentelemetry-otlp`'s exporter, fed by one background task in batches ([`export_loop`]).
//! Recording never waits: a span that finds the export queue full is dropped and counted
//! (`relay_trace_spans_total{outcome="dropped"}`), so a slow or absent collector never slows a
//! webhook or a delivery.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt::Display;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use opentelemetry::trace::{
    Link, SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanExporter, SpanLinks};
use reqwest::Url;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::clock::{Clock, Stopwatch, SystemClock};
use crate::config::TelemetrySettings;
use crate::heap::client::{HeapResponse, TransportError};
use crate::heap::wire::RecordKind;
use crate::queue::Claimed;

#[derive(Debug, thiserror::Error)]
pub enum TracesError {
    #[error("cannot set up trace export to {endpoint}: {reason}")]
    Exporter { endpoint: String, reason: String },
}

/// Spans waiting for export at most; more are dropped (the SDK's default queue size).
const MAX_QUEUED_SPANS: usize = 2048;
/// Spans per OTLP request at most (the SDK's default batch size).
const MAX_EXPORT_BATCH: usize = 512;
/// How long the first span of a batch waits for others before the batch is sent.
const EXPORT_DELAY: Duration = Duration::from_secs(1);
/// One OTLP request's timeout (the exporter retries a failed one a few times within it).
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// Links per `heap.request` span at most: OpenTelemetry's default span limit. A batch of
/// events from more webhooks than this links the first ones and counts the rest as dropped.
pub const MAX_LINKS: usize = 128;

/// The handle the webhook handler and the forwarder record spans with. Cheap to clone; off
/// (the default) unless [`Traces::start`] was given an endpoint.
#[derive(Clone, Default)]
pub struct Traces {
    export: Option<Arc<Export>>,
}

struct Export {
    spans: mpsc::Sender<SpanData>,
    scope: InstrumentationScope,
    stop: CancellationToken,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Traces {
    /// Traces that record nothing.
    pub fn off() -> Self {
        Self::default()
    }

    /// Starts exporting to `settings.otlp_endpoint`, or returns [`Traces::off`] when it is
    /// empty. Spawns the export task: call it inside the runtime.
    pub fn start(settings: &TelemetrySettings) -> Result<Self, TracesError> {
        let Some(base) = &settings.otlp_endpoint else {
            return Ok(Self::off());
        };
        let endpoint = traces_url(base);
        let failed = |reason: String| TracesError::Exporter {
            endpoint: endpoint.clone(),
            reason,
        };
        let http = crate::tls::http_client()
            .timeout(EXPORT_TIMEOUT)
            .user_agent(concat!("userpilot-heap-relay/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| failed(e.to_string()))?;
        let mut exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(endpoint.clone())
            .with_timeout(EXPORT_TIMEOUT)
            .with_http_client(http)
            .build()
            .map_err(|e| failed(e.to_string()))?;
        exporter.set_resource(
            &Resource::builder()
                .with_service_name(settings.service_name.clone())
                .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
                .build(),
        );
        // The recorder is installed on first use: before this, the counters below would go
        // nowhere.
        drop(crate::telemetry::metrics());
        metrics::describe_counter!(
            "relay_trace_spans_total",
            "Spans recorded for OTLP export, by outcome: exported, or dropped (queue full or \
             export failed)."
        );
        for outcome in ["exported", "dropped"] {
            metrics::counter!("relay_trace_spans_total", "outcome" => outcome).increment(0);
        }
        let (spans, queued) = mpsc::channel(MAX_QUEUED_SPANS);
        let stop = CancellationToken::new();
        let task = tokio::spawn(export_loop(exporter, queued, stop.clone()));
        tracing::info!(%endpoint, "exporting traces");
        Ok(Self {
            export: Some(Arc::new(Export {
                spans,
                scope: InstrumentationScope::builder("userpilot-heap-relay")
                    .with_version(env!("CARGO_PKG_VERSION"))
                    .build(),
                stop,
                task: Mutex::new(Some(task)),
            })),
        })
    }

    pub fn is_on(&self) -> bool {
        self.export.is_some()
    }

    /// Starts the `webhook` span of one request. `request_id` is the `x-request-id` that the
    /// request's log lines carry.
    pub fn webhook(&self, request_id: &str) -> WebhookSpan {
        WebhookSpan {
            recording: self.export.as_ref().map(|export| WebhookRecording {
                export: export.clone(),
                timing: Timing::start(),
                origin: None,
                steps: Vec::new(),
                attributes: vec![
                    KeyValue::new("http.request.method", "POST"),
                    KeyValue::new("url.path", "/webhooks/userpilot"),
                    KeyValue::new("relay.request_id", request_id.to_owned()),
                ],
                finished: None,
            }),
        }
    }

    /// Where each claimed record came from, by record id, for the links of the requests that
    /// will carry them. Empty when off.
    pub fn origins(&self, records: &[Claimed]) -> HashMap<i64, Origin> {
        if !self.is_on() {
            return HashMap::new();
        }
        records
            .iter()
            .map(|record| {
                let origin = Origin::new(&record.webhook_digest, record.webhook_received_at_ms);
                (record.id, origin)
            })
            .collect()
    }

    /// Starts the `heap.request` span of one bulk request carrying `records` records that
    /// came from `origins` (repeats are linked once).
    pub fn heap_request<'a>(
        &self,
        kind: RecordKind,
        records: usize,
        origins: impl IntoIterator<Item = &'a Origin>,
    ) -> HeapRequestSpan {
        let Some(export) = &self.export else {
            return HeapRequestSpan { recording: None };
        };
        let mut links: Vec<Link> = Vec::new();
        let mut seen: Vec<&Origin> = Vec::new();
        let mut dropped = 0u32;
        for origin in origins {
            if seen.contains(&origin) {
                continue;
            }
            seen.push(origin);
            if links.len() < MAX_LINKS {
                links.push(Link::new(origin.context(), Vec::new(), 0));
            } else {
                dropped = dropped.saturating_add(1);
            }
        }
        let mut span_links = SpanLinks::default();
        span_links.links = links;
        span_links.dropped_count = dropped;
        HeapRequestSpan {
            recording: Some(HeapRecording {
                export: export.clone(),
                timing: Timing::start(),
                context: random_context(None),
                links: span_links,
                attributes: vec![
                    KeyValue::new("http.request.method", "POST"),
                    KeyValue::new("url.path", kind.path()),
                    KeyValue::new("relay.endpoint", kind.as_str()),
                    KeyValue::new("relay.records", records as i64),
                ],
            }),
        }
    }

    /// Sends what is queued and stops the export, waiting at most `within`. Spans recorded
    /// afterwards are dropped.
    pub async fn shutdown(&self, within: Duration) {
        let Some(export) = &self.export else {
            return;
        };
        export.stop.cancel();
        let task = export.task.lock().ok().and_then(|mut task| task.take());
        if let Some(task) = task
            && tokio::time::timeout(within, task).await.is_err()
        {
            tracing::warn!("trace export did not finish in time; queued spans dropped");
        }
    }
}

/// `base` with `/v1/traces` appended to its path (OTLP/HTTP's path for spans), unless it ends
/// with it already.
fn traces_url(base: &Url) -> String {
    let text = base.as_str().trim_end_matches('/');
    if text.ends_with("/v1/traces") {
        text.to_owned()
    } else {
        format!("{text}/v1/traces")
    }
}

/// A webhook as the queue remembers it: its body's digest and its receive time. The
/// webhook's span ids derive from these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Origin {
    digest: [u8; 32],
    received_at_ms: i64,
}

impl Origin {
    pub fn new(digest: &[u8; 32], received_at_ms: i64) -> Self {
        Self {
            digest: *digest,
            received_at_ms,
        }
    }

    /// The context of the webhook's `webhook` span: trace id = the first 16 bytes of
    /// SHA-256(`"userpilot-heap-relay trace\n"` ‖ digest), span id = the first 8 bytes of
    /// SHA-256(`"userpilot-heap-relay span\n"` ‖ digest ‖ receive time as 8 big-endian bytes).
    /// A durable format: traces recorded by one version are linked by the next.
    pub fn context(&self) -> SpanContext {
        let trace = Sha256::new()
            .chain_update(b"userpilot-heap-relay trace\n")
            .chain_update(self.digest)
            .finalize();
        let span = Sha256::new()
            .chain_update(b"userpilot-heap-relay span\n")
            .chain_update(self.digest)
            .chain_update(self.received_at_ms.to_be_bytes())
            .finalize();
        let mut trace_id = [0u8; 16];
        trace_id.copy_from_slice(&trace[..16]);
        let mut span_id = [0u8; 8];
        span_id.copy_from_slice(&span[..8]);
        // All zeros is "no id" in OpenTelemetry; a hash gives it once in 2^64 or 2^128.
        trace_id[15] |= u8::from(trace_id == [0; 16]);
        span_id[7] |= u8::from(span_id == [0; 8]);
        SpanContext::new(
            TraceId::from_bytes(trace_id),
            SpanId::from_bytes(span_id),
            TraceFlags::SAMPLED,
            false,
            TraceState::default(),
        )
    }
}

/// A span context with a random span id, in `trace` (or a new random trace).
fn random_context(trace: Option<TraceId>) -> SpanContext {
    let trace = trace.unwrap_or_else(|| TraceId::from(fastrand::u128(1..)));
    SpanContext::new(
        trace,
        SpanId::from(fastrand::u64(1..)),
        TraceFlags::SAMPLED,
        false,
        TraceState::default(),
    )
}

/// A span's start on the wall clock, and a stopwatch for its length (a wall-clock step while
/// it runs does not bend its duration).
struct Timing {
    start: SystemTime,
    watch: Stopwatch,
}

impl Timing {
    fn start() -> Self {
        Self {
            start: SystemTime::from(SystemClock.now()),
            watch: Stopwatch::start(),
        }
    }

    /// Now, as this span's clock reads it.
    fn now(&self) -> SystemTime {
        self.start + self.watch.elapsed()
    }
}

/// One child of a `webhook` span.
struct Step {
    name: &'static str,
    start: SystemTime,
    end: SystemTime,
    status: Status,
}

/// The `webhook` span of one request; sent when dropped (also when the request is cut short:
/// then its status says so).
pub struct WebhookSpan {
    recording: Option<WebhookRecording>,
}

struct WebhookRecording {
    export: Arc<Export>,
    timing: Timing,
    origin: Option<Origin>,
    steps: Vec<Step>,
    attributes: Vec<KeyValue>,
    /// The outcome and the status code answered, once known.
    finished: Option<(&'static str, u16)>,
}

impl WebhookSpan {
    /// A span that records nothing.
    pub fn off() -> Self {
        Self { recording: None }
    }

    /// Runs `step` as the child span `name`; an `Err` sets the child's status to error with
    /// the error's text (which never holds secrets or bodies).
    pub fn step<T, E: Display>(
        &mut self,
        name: &'static str,
        step: impl FnOnce() -> Result<T, E>,
    ) -> Result<T, E> {
        let start = self.recording.as_ref().map(|r| r.timing.now());
        let result = step();
        self.record_step(name, start, &result);
        result
    }

    /// [`WebhookSpan::step`] for a future.
    pub async fn step_async<T, E: Display>(
        &mut self,
        name: &'static str,
        step: impl Future<Output = Result<T, E>>,
    ) -> Result<T, E> {
        let start = self.recording.as_ref().map(|r| r.timing.now());
        let result = step.await;
        self.record_step(name, start, &result);
        result
    }

    fn record_step<T, E: Display>(
        &mut self,
        name: &'static str,
        start: Option<SystemTime>,
        result: &Result<T, E>,
    ) {
        let (Some(recording), Some(start)) = (&mut self.recording, start) else {
            return;
        };
        recording.steps.push(Step {
            name,
            start,
            end: recording.timing.now(),
            status: match result {
                Ok(_) => Status::Unset,
                Err(error) => Status::error(error.to_string()),
            },
        });
    }

    /// The webhook verified: its span takes the ids derived from `digest` and the receive
    /// time (see [`Origin::context`]), which the forwarder's links point at.
    pub fn identify(&mut self, digest: &[u8; 32], received_at_ms: i64) {
        if let Some(recording) = &mut self.recording {
            recording.origin = Some(Origin::new(digest, received_at_ms));
        }
    }

    /// How the request ended: `outcome` as the `relay_webhooks_total` label, `status` the
    /// HTTP status answered. A 5xx sets the span's status to error.
    pub fn finish(&mut self, outcome: &'static str, status: u16) {
        if let Some(recording) = &mut self.recording {
            recording.finished = Some((outcome, status));
        }
    }
}

impl Drop for WebhookSpan {
    fn drop(&mut self) {
        let Some(recording) = self.recording.take() else {
            return;
        };
        let end = recording.timing.now();
        let context = match &recording.origin {
            Some(origin) => origin.context(),
            None => random_context(None),
        };
        let mut attributes = recording.attributes;
        let status = match recording.finished {
            Some((outcome, status)) => {
                attributes.push(KeyValue::new("relay.outcome", outcome));
                attributes.push(KeyValue::new(
                    "http.response.status_code",
                    i64::from(status),
                ));
                if status >= 500 {
                    Status::error(outcome)
                } else {
                    Status::Unset
                }
            }
            None => Status::error("cut short before an answer (timed out or disconnected)"),
        };
        let export = &recording.export;
        for step in recording.steps {
            export.send(SpanData {
                span_context: random_context(Some(context.trace_id())),
                parent_span_id: context.span_id(),
                parent_span_is_remote: false,
                span_kind: SpanKind::Internal,
                name: Cow::Borrowed(step.name),
                start_time: step.start,
                end_time: step.end,
                attributes: Vec::new(),
                dropped_attributes_count: 0,
                events: SpanEvents::default(),
                links: SpanLinks::default(),
                status: step.status,
                instrumentation_scope: export.scope.clone(),
            });
        }
        export.send(SpanData {
            span_context: context,
            parent_span_id: SpanId::INVALID,
            parent_span_is_remote: false,
            span_kind: SpanKind::Server,
            name: Cow::Borrowed("webhook"),
            start_time: recording.timing.start,
            end_time: end,
            attributes,
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status,
            instrumentation_scope: export.scope.clone(),
        });
    }
}

/// The `heap.request` span of one bulk request.
pub struct HeapRequestSpan {
    recording: Option<HeapRecording>,
}

struct HeapRecording {
    export: Arc<Export>,
    timing: Timing,
    context: SpanContext,
    links: SpanLinks,
    attributes: Vec<KeyValue>,
}

impl HeapRequestSpan {
    /// Ends the span with what Heap answered (or why it did not). Any answer but 2xx sets the
    /// span's status to error.
    pub fn finish(self, outcome: &Result<HeapResponse, TransportError>) {
        let Some(recording) = self.recording else {
            return;
        };
        let mut attributes = recording.attributes;
        let status = match outcome {
            Ok(response) => {
                attributes.push(KeyValue::new(
                    "http.response.status_code",
                    i64::from(response.status),
                ));
                if (200..300).contains(&response.status) {
                    Status::Unset
                } else {
                    attributes.push(KeyValue::new("error.type", response.status.to_string()));
                    Status::error(format!("heap answered {}", response.status))
                }
            }
            Err(error) => {
                let kind = match error {
                    TransportError::Timeout => "timeout",
                    TransportError::Connect(_) => "connect",
                    TransportError::Other(_) => "request",
                };
                attributes.push(KeyValue::new("error.type", kind));
                Status::error(error.to_string())
            }
        };
        recording.export.send(SpanData {
            span_context: recording.context,
            parent_span_id: SpanId::INVALID,
            parent_span_is_remote: false,
            span_kind: SpanKind::Client,
            name: Cow::Borrowed("heap.request"),
            start_time: recording.timing.start,
            end_time: recording.timing.now(),
            attributes,
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: recording.links,
            status,
            instrumentation_scope: recording.export.scope.clone(),
        });
    }
}

impl Export {
    /// Queues a span for export without waiting; a full queue drops it.
    fn send(&self, span: SpanData) {
        if self.spans.try_send(span).is_err() {
            metrics::counter!("relay_trace_spans_total", "outcome" => "dropped").increment(1);
        }
    }
}

/// Sends queued spans in batches of at most [`MAX_EXPORT_BATCH`], each waiting at most
/// [`EXPORT_DELAY`] to fill, until `stop`; then sends what is left and shuts the exporter down.
async fn export_loop(
    exporter: opentelemetry_otlp::SpanExporter,
    mut queued: mpsc::Receiver<SpanData>,
    stop: CancellationToken,
) {
    let mut failing = false;
    loop {
        let first = tokio::select! {
            span = queued.recv() => span,
            () = stop.cancelled() => None,
        };
        let Some(first) = first else {
            break;
        };
        let mut batch = vec![first];
        let fill = tokio::time::sleep(EXPORT_DELAY);
        tokio::pin!(fill);
        while batch.len() < MAX_EXPORT_BATCH {
            tokio::select! {
                span = queued.recv() => match span {
                    Some(span) => batch.push(span),
                    None => break,
                },
                () = &mut fill => break,
                () = stop.cancelled() => break,
            }
        }
        failing = export(&exporter, batch, failing).await;
    }
    queued.close();
    let mut rest = Vec::new();
    while let Ok(span) = queued.try_recv() {
        rest.push(span);
        if rest.len() == MAX_EXPORT_BATCH {
            failing = export(&exporter, std::mem::take(&mut rest), failing).await;
        }
    }
    if !rest.is_empty() {
        export(&exporter, rest, failing).await;
    }
    let _ = exporter.shutdown();
}

/// Exports one batch; returns whether it failed. A failure is logged when exports start
/// failing, and a recovery when they work again, not once per batch.
async fn export(
    exporter: &opentelemetry_otlp::SpanExporter,
    batch: Vec<SpanData>,
    was_failing: bool,
) -> bool {
    let spans = batch.len() as u64;
    match exporter.export(batch).await {
        Ok(()) => {
            metrics::counter!("relay_trace_spans_total", "outcome" => "exported").increment(spans);
            if was_failing {
                tracing::info!("trace export works again");
            }
            false
        }
        Err(error) => {
            metrics::counter!("relay_trace_spans_total", "outcome" => "dropped").increment(spans);
            if !was_failing {
                tracing::warn!(%error, spans, "trace export failed; spans dropped until it works");
            }
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_webhook_context_is_derived_from_its_digest_and_receive_time() {
        let digest = [7u8; 32];
        let first = Origin::new(&digest, 1_000).context();
        assert_eq!(first, Origin::new(&digest, 1_000).context());
        assert!(first.is_valid() && first.is_sampled());
        // A redelivery: the same trace, another span.
        let again = Origin::new(&digest, 2_000).context();
        assert_eq!(again.trace_id(), first.trace_id());
        assert_ne!(again.span_id(), first.span_id());
        // Another body: another trace.
        let other = Origin::new(&[8u8; 32], 1_000).context();
        assert_ne!(other.trace_id(), first.trace_id());
        // Labelled hashes: the trace id is not the digest's prefix.
        assert_ne!(first.trace_id().to_bytes(), [7u8; 16]);
    }

    #[test]
    fn the_derivation_is_a_durable_format() {
        // Known answers (computed outside Rust): changing the derivation would orphan the
        // links of records queued before an upgrade.
        let context = Origin::new(&[0u8; 32], 1_726_742_461_000).context();
        assert_eq!(
            context.trace_id().to_string(),
            "1fda16af5dfe1bcb30c13283ac550471"
        );
        assert_eq!(context.span_id().to_string(), "4ccd674beecdeccc");
    }

    #[test]
    fn the_traces_path_is_appended_to_the_endpoint_once() {
        let url = |text: &str| traces_url(&Url::parse(text).unwrap());
        assert_eq!(url("http://c:4318"), "http://c:4318/v1/traces");
        assert_eq!(url("http://c:4318/"), "http://c:4318/v1/traces");
        assert_eq!(url("https://c/otlp"), "https://c/otlp/v1/traces");
        assert_eq!(url("http://c:4318/v1/traces"), "http://c:4318/v1/traces");
    }

    /// Traces that queue spans into a channel the test reads, instead of exporting them.
    fn recording() -> (Traces, mpsc::Receiver<SpanData>) {
        let (spans, queued) = mpsc::channel(MAX_QUEUED_SPANS);
        let export = Export {
            spans,
            scope: InstrumentationScope::builder("test").build(),
            stop: CancellationToken::new(),
            task: Mutex::new(None),
        };
        let traces = Traces {
            export: Some(Arc::new(export)),
        };
        (traces, queued)
    }

    fn drain(queued: &mut mpsc::Receiver<SpanData>) -> Vec<SpanData> {
        std::iter::from_fn(|| queued.try_recv().ok()).collect()
    }

    #[tokio::test]
    async fn a_webhook_span_takes_the_derived_ids_and_parents_its_steps() {
        let (traces, mut queued) = recording();
        let mut span = traces.webhook("req-1");
        assert_eq!(span.step("verify", || Ok::<_, String>(())), Ok(()));
        span.identify(&[3; 32], 42);
        assert!(
            span.step("map", || Err::<(), _>("not a JSON object"))
                .is_err()
        );
        span.finish("invalid_json", 400);
        drop(span);
        let spans = drain(&mut queued);
        let names: Vec<&str> = spans.iter().map(|s| s.name.as_ref()).collect();
        assert_eq!(names, ["verify", "map", "webhook"]);
        let expected = Origin::new(&[3; 32], 42).context();
        let webhook = &spans[2];
        assert_eq!(webhook.span_context, expected);
        assert_eq!(webhook.parent_span_id, SpanId::INVALID);
        assert_eq!(webhook.span_kind, SpanKind::Server);
        // A 4xx is the sender's fault: not an error of the relay's.
        assert_eq!(webhook.status, Status::Unset);
        assert!(
            webhook
                .attributes
                .contains(&KeyValue::new("relay.request_id", "req-1"))
        );
        assert!(
            webhook
                .attributes
                .contains(&KeyValue::new("http.response.status_code", 400))
        );
        for step in &spans[..2] {
            assert_eq!(step.span_context.trace_id(), expected.trace_id());
            assert_eq!(step.parent_span_id, expected.span_id());
            assert!(step.start_time >= webhook.start_time && step.end_time <= webhook.end_time);
        }
        assert_eq!(spans[0].status, Status::Unset);
        assert_eq!(spans[1].status, Status::error("not a JSON object"));
    }

    #[tokio::test]
    async fn a_webhook_span_dropped_before_an_answer_is_an_error_with_random_ids() {
        let (traces, mut queued) = recording();
        drop(traces.webhook(""));
        let spans = drain(&mut queued);
        assert_eq!(spans.len(), 1);
        assert!(spans[0].span_context.is_valid());
        assert!(matches!(spans[0].status, Status::Error { .. }));
    }

    #[tokio::test]
    async fn a_heap_request_links_each_webhook_once_and_at_most_the_limit() {
        let (traces, mut queued) = recording();
        let origins: Vec<Origin> = (0..MAX_LINKS as i64 + 2)
            .map(|at| Origin::new(&[1; 32], at))
            .collect();
        // Every webhook twice (a track event and its user properties, say).
        let carried = origins.iter().chain(origins.iter());
        let span = traces.heap_request(RecordKind::Track, 260, carried);
        span.finish(&Err(TransportError::Timeout));
        let spans = drain(&mut queued);
        assert_eq!(spans.len(), 1);
        let request = &spans[0];
        assert_eq!(request.span_kind, SpanKind::Client);
        assert_eq!(request.parent_span_id, SpanId::INVALID);
        assert_eq!(request.links.len(), MAX_LINKS);
        assert_eq!(request.links.dropped_count, 2);
        for (link, origin) in request.links.iter().zip(&origins) {
            assert_eq!(link.span_context, origin.context());
        }
        assert!(
            request
                .attributes
                .contains(&KeyValue::new("error.type", "timeout"))
        );
        assert!(
            request
                .attributes
                .contains(&KeyValue::new("relay.records", 260))
        );
        assert!(matches!(request.status, Status::Error { .. }));
    }

    #[test]
    fn traces_that_are_off_record_nothing_and_need_no_runtime() {
        let traces = Traces::off();
        assert!(!traces.is_on());
        let mut span = traces.webhook("id");
        assert_eq!(span.step("verify", || Ok::<_, String>(1)), Ok(1));
        span.identify(&[1; 32], 1);
        span.finish("accepted", 202);
        assert!(span.recording.is_none());
        let request = traces.heap_request(RecordKind::Track, 1, &[Origin::new(&[1; 32], 1)]);
        assert!(request.recording.is_none());
    }
}
