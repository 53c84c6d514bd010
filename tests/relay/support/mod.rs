//! Shared test support: a fake Heap (a real HTTP server that records what it receives and
//! answers as told), a relay started in-process on port 0, the relay binary as a child process,
//! signing, one HTTP [`Client`] for both kinds of relay, and polling with a deadline
//! ([`eventually`]; never a bare sleep to wait for work). The fake Heap records each request's
//! method and headers too, and [`FakeHeap::reply_with`] can answer any JSON body (Heap's
//! public API for user deletion, contract §12, answers tokens and ids).
//!
//! Renamed when the test binaries became one (old -> new): `post_signed(&http, &url, &body)`
//! -> `client.try_post(&body)` (or `.post(&body)` when an answer is expected);
//! `admin_call(&http, &admin_url, method, path)` -> `client.admin(method, path)`, where
//! `client` is a [`Relay`], a [`RelayProcess`] (both deref to their [`Client`]) or a
//! [`Client::new`]; `post_concurrently(&url, ..)` -> `post_concurrently(&client, ..)`;
//! `eventually(within, || sync)` -> `eventually(within, async || ..)`; `RelayProcess::terminate`
//! is async; `postgres::base_url(test)` -> `postgres::base_url()` (tests are ignored, not skipped).

pub mod browser;
pub mod console;
pub mod postgres;
pub mod records;
mod tests;

use std::future::Future;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::ops::Deref;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use userpilot_heap_relay::app::App;
use userpilot_heap_relay::config::Settings;

pub const SECRET: &str = "test-secret";
pub const APP_ID: &str = "test-app";
pub const ADMIN_TOKEN: &str = "admin-token-for-tests";

/// One request the fake Heap received, and what it answered.
#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    pub body: Value,
    pub status: u16,
    pub at: Instant,
    pub method: String,
    pub headers: HeaderMap,
}

impl Received {
    /// The request's `Authorization` header, if it had one.
    pub fn authorization(&self) -> Option<&str> {
        self.headers
            .get("authorization")
            .and_then(|value| value.to_str().ok())
    }
}

/// What the fake Heap answers: status, optional Retry-After seconds, optional delay.
#[derive(Debug, Clone, Copy)]
pub struct Answer {
    pub status: u16,
    pub retry_after: Option<u64>,
    pub delay: Duration,
}

impl Answer {
    pub const OK: Answer = Answer {
        status: 200,
        retry_after: None,
        delay: Duration::ZERO,
    };

    pub fn status(status: u16) -> Self {
        Answer {
            status,
            ..Answer::OK
        }
    }
}

type Responder = Box<dyn FnMut(&str, &Value) -> Answer + Send>;

/// A request as [`FakeHeap::reply_with`] sees it.
pub struct Incoming<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub headers: &'a HeaderMap,
    pub body: &'a Value,
}

/// A whole answer of the fake Heap: status, optional Retry-After seconds, and a JSON body.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub retry_after: Option<u64>,
    pub body: Value,
}

impl Reply {
    pub fn json(status: u16, body: Value) -> Self {
        Reply {
            status,
            retry_after: None,
            body,
        }
    }
}

type Replier = Box<dyn FnMut(&Incoming<'_>) -> Option<Reply> + Send>;

#[derive(Clone)]
struct HeapState {
    received: Arc<Mutex<Vec<Received>>>,
    responder: Arc<Mutex<Responder>>,
    replier: Arc<Mutex<Option<Replier>>>,
}

/// A real HTTP server standing in for Heap.
#[derive(Clone)]
pub struct FakeHeap {
    pub addr: SocketAddr,
    state: HeapState,
}

async fn record(
    State(state): State<HeapState>,
    method: Method,
    uri: Uri,
    request_headers: HeaderMap,
    body: Bytes,
) -> Response {
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let reply = state.replier.lock().unwrap().as_mut().and_then(|replier| {
        replier(&Incoming {
            method: method.as_str(),
            path: uri.path(),
            headers: &request_headers,
            body: &body,
        })
    });
    let received = |status: u16| Received {
        path: uri.path().to_owned(),
        body: body.clone(),
        status,
        at: Instant::now(),
        method: method.as_str().to_owned(),
        headers: request_headers.clone(),
    };
    if let Some(reply) = reply {
        state.received.lock().unwrap().push(received(reply.status));
        let mut headers = HeaderMap::new();
        if let Some(seconds) = reply.retry_after {
            headers.insert(
                "retry-after",
                HeaderValue::from_str(&seconds.to_string()).unwrap(),
            );
        }
        let status = StatusCode::from_u16(reply.status).unwrap();
        return (status, headers, axum::Json(reply.body)).into_response();
    }
    let answer = (state.responder.lock().unwrap())(uri.path(), &body);
    if !answer.delay.is_zero() {
        tokio::time::sleep(answer.delay).await;
    }
    state.received.lock().unwrap().push(received(answer.status));
    let mut headers = HeaderMap::new();
    if let Some(seconds) = answer.retry_after {
        headers.insert(
            "retry-after",
            HeaderValue::from_str(&seconds.to_string()).unwrap(),
        );
    }
    let status = StatusCode::from_u16(answer.status).unwrap();
    (
        status,
        headers,
        if status.is_success() { "{}" } else { "refused" },
    )
        .into_response()
}

impl FakeHeap {
    pub async fn start() -> Self {
        // Nearly every test starts here: install the relay's rustls provider (ring) before the
        // test builds any reqwest client, which has none of its own (see src/tls.rs).
        userpilot_heap_relay::tls::provider();
        let state = HeapState {
            received: Arc::default(),
            responder: Arc::new(Mutex::new(Box::new(|_: &str, _: &Value| Answer::OK))),
            replier: Arc::default(),
        };
        let app = Router::new().fallback(record).with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        FakeHeap { addr, state }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Decides every answer from now on.
    pub fn respond_with(&self, responder: impl FnMut(&str, &Value) -> Answer + Send + 'static) {
        *self.state.responder.lock().unwrap() = Box::new(responder);
    }

    /// Answers whole (status, Retry-After, JSON body) every request `replier` returns a
    /// [`Reply`] for; the others are answered by [`FakeHeap::respond_with`]'s responder.
    pub fn reply_with(&self, replier: impl FnMut(&Incoming<'_>) -> Option<Reply> + Send + 'static) {
        *self.state.replier.lock().unwrap() = Some(Box::new(replier));
    }

    pub fn requests(&self) -> Vec<Received> {
        self.state.received.lock().unwrap().clone()
    }

    /// Elements of the bulk arrays on `path` that were answered 2xx.
    pub fn accepted(&self, path: &str, field: &str) -> Vec<Value> {
        self.requests()
            .into_iter()
            .filter(|r| r.path == path && (200..300).contains(&r.status))
            .flat_map(|r| r.body[field].as_array().cloned().unwrap_or_default())
            .collect()
    }

    /// Track events Heap accepted.
    pub fn events(&self) -> Vec<Value> {
        self.accepted("/api/track", "events")
    }

    /// Waits until Heap accepted at least `n` track events.
    pub async fn wait_for_events(&self, n: usize, within: Duration) -> Vec<Value> {
        self.wait_for_accepted("/api/track", "events", n, within)
            .await
    }

    /// Requests whose body names `app_id` (every Heap bulk body carries `"app_id"`): what one
    /// Heap environment received.
    pub fn requests_for(&self, app_id: &str) -> Vec<Received> {
        self.requests()
            .into_iter()
            .filter(|r| r.body["app_id"] == app_id)
            .collect()
    }

    /// Track events Heap accepted for `app_id`, each with when its request was received.
    pub fn events_received_for(&self, app_id: &str) -> Vec<(Instant, Value)> {
        self.requests_for(app_id)
            .into_iter()
            .filter(|r| r.path == "/api/track" && (200..300).contains(&r.status))
            .flat_map(|r| {
                let at = r.at;
                let events = r.body["events"].as_array().cloned().unwrap_or_default();
                events.into_iter().map(move |event| (at, event))
            })
            .collect()
    }

    /// Track events Heap accepted for `app_id`.
    pub fn events_for(&self, app_id: &str) -> Vec<Value> {
        self.events_received_for(app_id)
            .into_iter()
            .map(|(_, event)| event)
            .collect()
    }

    /// Waits until Heap accepted at least `n` track events for `app_id`.
    pub async fn wait_for_events_for(
        &self,
        app_id: &str,
        n: usize,
        within: Duration,
    ) -> Vec<Value> {
        eventually(within, async || {
            let events = self.events_for(app_id);
            if events.len() >= n {
                Ok(events)
            } else {
                Err(format!(
                    "Heap accepted {} track events for app id {app_id}, not {n}",
                    events.len()
                ))
            }
        })
        .await
    }

    /// Waits until Heap accepted at least `n` elements of the bulk arrays on `path`.
    pub async fn wait_for_accepted(
        &self,
        path: &str,
        field: &str,
        n: usize,
        within: Duration,
    ) -> Vec<Value> {
        eventually(within, async || {
            let accepted = self.accepted(path, field);
            if accepted.len() >= n {
                Ok(accepted)
            } else {
                Err(format!(
                    "Heap accepted {} {field} on {path}, not {n}",
                    accepted.len()
                ))
            }
        })
        .await
    }
}

/// What a check of [`eventually`] returns: `true`, `Some(value)` or `Ok(value)` once what it
/// awaits has happened; `false`, `None` or `Err(what it saw instead)` to look again later.
pub trait Outcome {
    type Value;
    /// The value, or what was seen instead (if the check said).
    fn settle(self) -> Result<Self::Value, Option<String>>;
}

impl Outcome for bool {
    type Value = ();
    fn settle(self) -> Result<(), Option<String>> {
        if self { Ok(()) } else { Err(None) }
    }
}

impl<T> Outcome for Option<T> {
    type Value = T;
    fn settle(self) -> Result<T, Option<String>> {
        self.ok_or(None)
    }
}

impl<T, E: std::fmt::Display> Outcome for Result<T, E> {
    type Value = T;
    fn settle(self) -> Result<T, Option<String>> {
        self.map_err(|seen| Some(seen.to_string()))
    }
}

/// How often [`eventually`] looks again.
const POLL: Duration = Duration::from_millis(20);

/// Runs `check` every few milliseconds until it says done (see [`Outcome`]) and returns its
/// value; panics after `within`, naming the line that waited and what the check saw last.
///
/// Not an `async fn` so that `#[track_caller]` can name the caller's line.
#[track_caller]
pub fn eventually<C: Outcome>(
    within: Duration,
    mut check: impl AsyncFnMut() -> C,
) -> impl Future<Output = C::Value> {
    let awaited = std::panic::Location::caller();
    async move {
        let deadline = Instant::now() + within;
        loop {
            let seen = match check().await.settle() {
                Ok(value) => return value,
                Err(seen) => seen,
            };
            if Instant::now() >= deadline {
                match seen {
                    Some(seen) => panic!("{awaited}: not met within {within:?}; last seen: {seen}"),
                    None => panic!("{awaited}: not met within {within:?}"),
                }
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

/// `X-Signature` for `body`, signed now with [`SECRET`].
pub fn signature(body: &[u8]) -> String {
    signature_with(body, SECRET)
}

/// `X-Signature` for `body`, signed now with `secret`.
pub fn signature_with(body: &[u8], secret: &str) -> String {
    userpilot_heap_relay::userpilot::sign(body, secret, chrono::Utc::now().timestamp())
}

/// The webhook route of the source `name` (contract §9): `/webhooks/userpilot/{name}`.
pub fn source_path(name: &str) -> String {
    format!("{DEFAULT_WEBHOOK_PATH}/{name}")
}

/// The webhook route of the `default` source (the top-level keys), as it always was.
pub const DEFAULT_WEBHOOK_PATH: &str = "/webhooks/userpilot";

/// The base configuration of a test relay, in TOML, talking to `heap`.
pub fn base_toml(heap: &FakeHeap, queue_path: &std::path::Path) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
shutdown_grace_ms = 2000
[userpilot]
secrets = ["{SECRET}"]
[heap]
app_id = "{APP_ID}"
base_url = "{}"
batch_linger_ms = 10
[retry]
initial_backoff_ms = 50
max_backoff_ms = 500
[queue]
path = "{}"
[admin]
token = "{ADMIN_TOKEN}"
"#,
        heap.url(),
        queue_path.display()
    )
}

/// The sum of the samples of `name` in Prometheus text `text` that carry every label of
/// `labels` (0 when there are none). Labels are matched whole (`source="a"` does not match
/// `source="ab"`), in any order.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, "}"));
            let carried = format!(",{}", rest.strip_suffix('}')?);
            let all = labels
                .iter()
                .all(|(key, value)| carried.contains(&format!(",{key}=\"{value}\"")));
            (metric == name && all).then(|| value.parse::<f64>().unwrap())
        })
        .sum()
}

/// A test's HTTP client for one relay: webhooks signed now with [`SECRET`] to
/// `/webhooks/userpilot` (or, from [`Client::source`], with a source's secret to its route),
/// and the admin API with [`ADMIN_TOKEN`]. [`Relay`] and [`RelayProcess`] deref to theirs;
/// [`Client::new`] makes one for a relay started some other way.
#[derive(Clone)]
pub struct Client {
    pub url: String,
    pub admin_url: String,
    pub http: reqwest::Client,
    /// Where [`Client::post`] and its siblings send webhooks.
    pub webhook_path: String,
    /// What they sign with.
    pub secret: String,
}

impl Client {
    pub fn new(url: String, admin_url: String) -> Client {
        // A relay that never answers fails the test instead of hanging it.
        let http = userpilot_heap_relay::tls::http_client()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        Client {
            url,
            admin_url,
            http,
            webhook_path: DEFAULT_WEBHOOK_PATH.to_owned(),
            secret: SECRET.to_owned(),
        }
    }

    /// The same relay, posting webhooks to `path` signed with `secret` (every posting method,
    /// and [`post_concurrently`], then uses them).
    pub fn webhook(&self, path: &str, secret: &str) -> Client {
        Client {
            webhook_path: path.to_owned(),
            secret: secret.to_owned(),
            ..self.clone()
        }
    }

    /// The same relay, posting to the source `name`'s route signed with `secret`.
    pub fn source(&self, name: &str, secret: &str) -> Client {
        self.webhook(&source_path(name), secret)
    }

    /// The same relay through a client whose requests give up after `timeout`.
    pub fn with_timeout(&self, timeout: Duration) -> Client {
        Client {
            http: reqwest::Client::builder().timeout(timeout).build().unwrap(),
            ..self.clone()
        }
    }

    /// Posts `body`, signed, to the webhook route; returns status and JSON answer (or the text
    /// when it is not JSON). Panics when the relay does not answer.
    pub async fn post(&self, body: &Value) -> (u16, Value) {
        self.try_post(body).await.unwrap()
    }

    /// As [`Client::post`], but `Err` when the relay did not answer: not running, or the
    /// connection dropped (a crash, a shutdown).
    pub async fn try_post(&self, body: &Value) -> Result<(u16, Value), reqwest::Error> {
        let bytes = serde_json::to_vec(body).unwrap();
        let signature = signature_with(&bytes, &self.secret);
        self.try_post_raw(bytes, Some(&signature), Some("application/json"))
            .await
    }

    /// As [`Client::post`], signed at `timestamp` (unix seconds) instead of now: the same body
    /// signed at the same time is the same request, wherever it is sent.
    pub async fn post_signed_at(&self, body: &Value, timestamp: i64) -> (u16, Value) {
        let bytes = serde_json::to_vec(body).unwrap();
        let signature = userpilot_heap_relay::userpilot::sign(&bytes, &self.secret, timestamp);
        self.post_raw(bytes, Some(&signature), Some("application/json"))
            .await
    }

    /// Posts `body` as it is, signed now, with `content_type` (or none).
    pub async fn post_bytes(&self, body: Vec<u8>, content_type: Option<&str>) -> (u16, Value) {
        let signature = signature_with(&body, &self.secret);
        self.post_raw(body, Some(&signature), content_type).await
    }

    /// Posts `body` as it is, with the given signature and content type (or none).
    pub async fn post_raw(
        &self,
        body: Vec<u8>,
        signature: Option<&str>,
        content_type: Option<&str>,
    ) -> (u16, Value) {
        self.try_post_raw(body, signature, content_type)
            .await
            .unwrap()
    }

    async fn try_post_raw(
        &self,
        body: Vec<u8>,
        signature: Option<&str>,
        content_type: Option<&str>,
    ) -> Result<(u16, Value), reqwest::Error> {
        let mut request = self
            .http
            .post(format!("{}{}", self.url, self.webhook_path))
            .body(body);
        if let Some(signature) = signature {
            request = request.header("x-signature", signature);
        }
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        let response = request.send().await?;
        let status = response.status().as_u16();
        let text = response.text().await?;
        Ok((
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        ))
    }

    /// `GET path` on the public port (`/healthz`, `/readyz`): status and JSON answer.
    pub async fn get(&self, path: &str) -> (u16, Value) {
        let response = self
            .http
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// `method` on `path` of the admin port, with the admin token.
    pub async fn admin(&self, method: reqwest::Method, path: &str) -> (u16, Value) {
        let response = self
            .http
            .request(method, format!("{}{path}", self.admin_url))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// `/metrics` of the admin port, as text.
    pub async fn metrics(&self) -> String {
        let response = self
            .http
            .get(format!("{}/metrics", self.admin_url))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "GET /metrics");
        response.text().await.unwrap()
    }

    /// The sum of the samples of `name` carrying every label of `labels` in `/metrics` (0 when
    /// there are none), e.g. `client.metric("relay_webhooks_total", &[("source", "qa")])`.
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric(&self.metrics().await, name, labels)
    }

    /// Polls `/admin/status` until `done` holds for it, and returns that status.
    pub async fn wait_for_status(&self, within: Duration, done: impl Fn(&Value) -> bool) -> Value {
        eventually(within, async || {
            let (_, status) = self.admin(reqwest::Method::GET, "/admin/status").await;
            if done(&status) {
                Ok(status)
            } else {
                Err(format!("/admin/status {status}"))
            }
        })
        .await
    }
}

/// A relay running in this process.
pub struct Relay {
    pub client: Client,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<()>,
    pub dir: Arc<tempfile::TempDir>,
}

/// A test talks to a relay through its HTTP ports, so the relay is first of all its client:
/// `relay.post(..)`, `relay.url`.
impl Deref for Relay {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self.client
    }
}

impl Relay {
    /// Starts a relay against `heap`; `extra` is TOML layered over the test base (later keys
    /// win, so a section repeated in `extra` must not repeat keys of the base).
    pub async fn start(heap: &FakeHeap, extra: &str) -> Relay {
        Self::start_in(heap, extra, Arc::new(tempfile::tempdir().unwrap())).await
    }

    /// Starts a relay on an existing queue folder (a restart).
    pub async fn start_in(heap: &FakeHeap, extra: &str, dir: Arc<tempfile::TempDir>) -> Relay {
        let base = base_toml(heap, &dir.path().join("queue.sqlite3"));
        let settings = Settings::from_toml(&merge_toml(&base, extra)).unwrap();
        let app = App::build(settings).await.unwrap();
        let client = Client::new(
            format!("http://{}", app.public_addr().unwrap()),
            format!("http://{}", app.admin_addr().unwrap()),
        );
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        let task = tokio::spawn(async move {
            app.run(stop).await.unwrap();
        });
        Relay {
            client,
            shutdown,
            task,
            dir,
        }
    }

    pub async fn stop(self) -> Arc<tempfile::TempDir> {
        self.shutdown.cancel();
        self.task.await.unwrap();
        self.dir
    }
}

/// A flow-started webhook, sent now: one Heap track event for the user `{name}-{seq}`, marked
/// with `seq` (`data.seq`) so a test can tell which webhook an event came from.
pub fn flow_started(name: &str, seq: usize) -> Value {
    serde_json::json!({
        "timestamp": chrono::Utc::now().timestamp(),
        "data": {
            "type": "flow",
            "action": "started",
            "flow_id": format!("fl_{name}"),
            "seq": seq,
            "user": { "user_id": format!("{name}-{seq}") },
        },
    })
}

/// Layers `extra` over `base`: keys of sections in `extra` replace those of `base`.
pub fn merge_toml(base: &str, extra: &str) -> String {
    let mut base: toml::Table = base.parse().unwrap();
    let extra: toml::Table = extra.parse().unwrap();
    for (section, values) in extra {
        match (base.get_mut(&section), values) {
            (Some(toml::Value::Table(into)), toml::Value::Table(values)) => into.extend(values),
            (_, values) => {
                base.insert(section, values);
            }
        }
    }
    toml::to_string(&base).unwrap()
}

/// The relay binary, run as operators run it: configured by environment variables only.
pub struct RelayProcess {
    pub child: Child,
    pub client: Client,
    pub logs: Arc<Mutex<Vec<String>>>,
}

/// As for [`Relay`]: `relay.post(..)`, `relay.admin(..)`, `relay.url`.
impl Deref for RelayProcess {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self.client
    }
}

pub const BINARY: &str = env!("CARGO_BIN_EXE_userpilot-heap-relay");

impl RelayProcess {
    /// Starts the binary with `env` (on top of a clean environment) and waits for its
    /// "relay started" line to learn the ports.
    pub fn spawn(env: &[(String, String)]) -> RelayProcess {
        Self::spawn_with_args(&[], env)
    }

    /// As [`RelayProcess::spawn`], with command-line arguments (e.g. `--config PATH`).
    pub fn spawn_with_args(args: &[&str], env: &[(String, String)]) -> RelayProcess {
        userpilot_heap_relay::tls::provider();
        let mut child = Command::new(BINARY)
            .args(args)
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let logs: Arc<Mutex<Vec<String>>> = Arc::default();
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("relay started") {
                    let _ = started_tx.send(line.clone());
                }
                sink.lock().unwrap().push(line);
            }
        });
        let line = started_rx
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("relay did not start: {:?}", logs.lock().unwrap()));
        let started: Value = serde_json::from_str(&line).unwrap();
        RelayProcess {
            child,
            client: Client::new(
                format!("http://{}", started["listen"].as_str().unwrap()),
                format!("http://{}", started["admin_listen"].as_str().unwrap()),
            ),
            logs,
        }
    }

    /// The environment of a test relay talking to `heap`, with its queue in `dir`.
    pub fn env(heap: &FakeHeap, dir: &std::path::Path) -> Vec<(String, String)> {
        [
            ("RELAY_SERVER__LISTEN", "127.0.0.1:0".to_owned()),
            ("RELAY_SERVER__ADMIN_LISTEN", "127.0.0.1:0".to_owned()),
            ("RELAY_USERPILOT__SECRETS", SECRET.to_owned()),
            ("RELAY_HEAP__APP_ID", APP_ID.to_owned()),
            ("RELAY_HEAP__BASE_URL", heap.url()),
            ("RELAY_HEAP__BATCH_LINGER_MS", "10".to_owned()),
            ("RELAY_RETRY__INITIAL_BACKOFF_MS", "50".to_owned()),
            ("RELAY_RETRY__MAX_BACKOFF_MS", "500".to_owned()),
            (
                "RELAY_QUEUE__PATH",
                dir.join("queue.sqlite3").display().to_string(),
            ),
            ("RELAY_ADMIN__TOKEN", ADMIN_TOKEN.to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    /// Starts the binary configured by the file `config` alone (`--config`, no environment):
    /// a test that rewrites the file and reloads changes the whole configuration.
    pub fn spawn_with_config(config: &std::path::Path) -> RelayProcess {
        Self::spawn_with_args(&["--config", config.to_str().unwrap()], &[])
    }

    /// SIGHUP: the relay re-reads its configuration (contract §10, Reload).
    pub fn reload_signal(&self) {
        let sent = Command::new("kill")
            .args(["-HUP", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success(), "kill -HUP {}", self.child.id());
    }

    /// `kill -9`.
    pub fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM, then the exit status and how long the exit took.
    pub async fn terminate(&mut self, within: Duration) -> (std::process::ExitStatus, Duration) {
        let started = Instant::now();
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        let child = &mut self.child;
        let status = eventually(within, async || child.try_wait().unwrap()).await;
        (status, started.elapsed())
    }

    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The whole configuration of a test relay binary talking to `heap` with its queue in `dir`:
/// [`base_toml`] with `extra` layered over it (as [`Relay::start`] layers it), for a
/// `--config` file.
pub fn config_toml(heap: &FakeHeap, dir: &std::path::Path, extra: &str) -> String {
    merge_toml(&base_toml(heap, &dir.join("queue.sqlite3")), extra)
}

/// Writes a configuration file whole: into a sibling file first, then renamed over `path`, so
/// a relay reading it at any moment sees the old file or the new one, never half of one.
pub fn write_config(path: &std::path::Path, toml: &str) {
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    std::fs::write(&partial, toml).unwrap();
    std::fs::rename(&partial, path).unwrap();
}

/// Runs the binary once with `args` and `env` (on top of a clean environment), as an operator
/// runs a command such as `dlq list`, and returns its output.
pub fn run_cli(env: &[(String, String)], args: &[&str]) -> std::process::Output {
    Command::new(BINARY)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .args(args)
        .output()
        .unwrap()
}

/// Sets `key` in an environment list (replacing it when present).
pub fn set_env(env: &mut Vec<(String, String)>, key: &str, value: &str) {
    env.retain(|(k, _)| k != key);
    env.push((key.to_owned(), value.to_owned()));
}

impl RelayProcess {
    /// Resident memory of the relay process in KiB (`VmRSS` of `/proc/<pid>/status`).
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/<pid>/status")
    }
}

/// What one webhook post got: an HTTP answer, or none (the relay died, was gone, or closed the
/// connection).
#[derive(Debug, Clone)]
pub enum Posted {
    Answered(u16, Value),
    NoAnswer,
}

/// Posts `bodies[i]` for every `i` in `indexes` to the relay of `client` from `posters` concurrent
/// tasks (like Userpilot's delivery workers) and returns each `(i, outcome)`. `notify` is rung
/// once `ring_at` of these posts were answered 202, so a test can act in the middle of the load.
pub async fn post_concurrently(
    client: &Client,
    bodies: &Arc<Vec<Value>>,
    indexes: Vec<usize>,
    posters: usize,
    ring_at: usize,
    notify: Arc<tokio::sync::Notify>,
) -> Vec<(usize, Posted)> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let indexes = Arc::new(indexes);
    let next = Arc::new(AtomicUsize::new(0));
    let accepted = Arc::new(AtomicUsize::new(0));
    let log: Arc<Mutex<Vec<(usize, Posted)>>> = Arc::default();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..posters {
        let (client, bodies, indexes) = (client.clone(), bodies.clone(), indexes.clone());
        let (next, accepted, log, notify) =
            (next.clone(), accepted.clone(), log.clone(), notify.clone());
        tasks.spawn(async move {
            while let Some(&i) = indexes.get(next.fetch_add(1, Ordering::SeqCst)) {
                let outcome = match client.try_post(&bodies[i]).await {
                    Ok((status, answer)) => Posted::Answered(status, answer),
                    Err(_) => Posted::NoAnswer,
                };
                if matches!(outcome, Posted::Answered(202, _))
                    && accepted.fetch_add(1, Ordering::SeqCst) + 1 == ring_at
                {
                    notify.notify_one();
                }
                log.lock().unwrap().push((i, outcome));
            }
        });
    }
    tasks.join_all().await;
    Arc::try_unwrap(log).unwrap().into_inner().unwrap()
}

/// [`metric`] matches whole labels in any order, sums the series that carry them, and leaves
/// other metrics (even one whose name starts alike) out.
#[test]
fn metric_sums_the_series_carrying_every_label_matched_whole() {
    let text = "# HELP relay_webhooks_total Webhooks answered.\n\
                relay_webhooks_total{outcome=\"accepted\",source=\"a\"} 2\n\
                relay_webhooks_total{source=\"ab\",outcome=\"accepted\"} 5\n\
                relay_webhooks_total{outcome=\"duplicate\",source=\"a\"} 1\n\
                relay_webhooks_total_other{source=\"a\"} 7\n\
                relay_up 1\n";
    let sum = |name: &str, labels: &[(&str, &str)]| metric(text, name, labels);
    assert_eq!(sum("relay_webhooks_total", &[("source", "a")]), 3.0);
    assert_eq!(
        sum(
            "relay_webhooks_total",
            &[("source", "a"), ("outcome", "accepted")]
        ),
        2.0
    );
    assert_eq!(sum("relay_webhooks_total", &[("source", "ab")]), 5.0);
    assert_eq!(sum("relay_webhooks_total", &[]), 8.0);
    assert_eq!(sum("relay_webhooks_total", &[("source", "b")]), 0.0);
    assert_eq!(sum("relay_up", &[]), 1.0);
}

/// The default source alone, at [`APP_ID`], mapping with `mapper`: for driving replay directly.
pub fn default_source(
    mapper: userpilot_heap_relay::heap::mapping::Mapper,
) -> userpilot_heap_relay::sources::Sources {
    use userpilot_heap_relay::config::{AppId, DEFAULT_SOURCE};
    use userpilot_heap_relay::sources::{Source, Sources};
    Sources::from_iter([Source {
        name: DEFAULT_SOURCE.to_owned(),
        path: "/webhooks/userpilot".to_owned(),
        secrets: vec![userpilot_heap_relay::secret::Secret::new(SECRET)],
        tolerance_secs: 300,
        app_id: AppId::try_from(APP_ID.to_owned()).unwrap(),
        mapper,
        transform: userpilot_heap_relay::transform::Transform::Identity,
        api_key: None,
    }])
}
