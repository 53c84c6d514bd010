//! The HTTP client of Heap's user deletion API (contract §12): an auth token from
//! `POST /api/public/v0/auth_token` (HTTP Basic `app_id:api_key`), then
//! `POST /api/public/v0/user_deletion` (Bearer token) for up to [`MAX_USERS`] identities, and
//! `GET /api/public/v0/deletion_status/{id}` to follow a request. It owns the requests, the
//! reading of Heap's answers and the classification of failures into [`DeletionError::Retry`]
//! and [`DeletionError::Refused`]; what to store and when to try again is
//! [`crate::erase::heap`]'s.
//!
//! What it must never do: put an api key, a token or an identity in an error, a log line or
//! a metric label. Heap's error message is kept (capped) only with those masked, because an
//! error about a request may quote what it was sent.

use std::sync::Arc;
use std::time::Duration;

use reqwest::header::RETRY_AFTER;
use reqwest::{Response, Url};
use serde_json::Value;

use crate::clock::{Clock, Stopwatch};
use crate::forwarder::retry::{Verdict, classify};
use crate::heap::client::{HeapResponse, TransportError, parse_retry_after, truncate};
use crate::secret::Secret;

/// The most users Heap takes in one `user_deletion` request.
pub const MAX_USERS: usize = 10_000;

/// How much of Heap's error message an error keeps (it is stored and listed).
pub const MAX_MESSAGE: usize = 300;

/// A longer message from Heap is not kept at all: it is masked whole before it is cut (a cut
/// first could leave half an identity), and masking costs its length per identity sent.
const MAX_MASKED: usize = 4096;

/// What stands in an error for an identity, key or token Heap's message quoted.
const MASK: &str = "[redacted]";

const AUTH_TOKEN: &str = "auth_token";
const USER_DELETION: &str = "user_deletion";
const DELETION_STATUS: &str = "deletion_status";

/// A failed call, as the erasure worker needs it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DeletionError {
    /// Worth trying again later: a 5xx, 408 or 429, a timeout or a failed connection, or an
    /// answer that said yes without what a yes carries (a proxy's page, say).
    #[error("{error}")]
    Retry {
        /// For the erasure's `last_error`; holds no identity, key or token.
        error: String,
        /// Heap's `Retry-After`, if it sent one.
        retry_after: Option<Duration>,
        /// Heap said 429.
        throttled: bool,
    },
    /// Heap refused (401, 403, another 4xx): asking again unchanged will not help.
    #[error("{reason}")]
    Refused {
        status: u16,
        /// `heap answered STATUS` and Heap's `err.message`, when it sent one; holds no
        /// identity, key or token.
        reason: String,
    },
}

/// A token from `auth_token`, for the app id it was issued for (Heap's tokens last five
/// minutes).
#[derive(Debug, Clone)]
pub struct AuthToken {
    app_id: String,
    token: Secret,
}

impl AuthToken {
    /// The Heap app id the token is for.
    pub fn app_id(&self) -> &str {
        &self.app_id
    }
}

/// Where a deletion request stands, as `deletion_status` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeletionStatus {
    Pending,
    Complete,
    /// `404`: Heap does not know the request (any more).
    NotFound,
}

#[derive(Clone)]
pub struct DeletionClient {
    http: reqwest::Client,
    /// `heap.base_url` without its trailing `/`, as [`crate::heap::client::HeapClient`]
    /// keeps it: a base with a path (a proxy's prefix) keeps it.
    base_url: String,
    /// For `Retry-After` given as an HTTP date.
    clock: Arc<dyn Clock>,
}

impl DeletionClient {
    pub fn new(
        base_url: &Url,
        timeout: Duration,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, reqwest::Error> {
        let http = crate::tls::http_client()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .user_agent(concat!("userpilot-heap-relay/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            http,
            base_url: base_url.as_str().trim_end_matches('/').to_owned(),
            clock,
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}/api/public/v0/{path}", self.base_url)
    }

    /// An auth token for `app_id` with its `api_key`.
    pub async fn auth_token(
        &self,
        app_id: &str,
        api_key: &Secret,
    ) -> Result<AuthToken, DeletionError> {
        let request = self
            .http
            .post(self.url(AUTH_TOKEN))
            .basic_auth(app_id, Some(api_key.expose()));
        let answer = self.call(AUTH_TOKEN, app_id, request).await;
        let masks = [api_key.expose()];
        let (status, body) = answer.success(&masks)?;
        match body.get("access_token").and_then(Value::as_str) {
            Some(token) if !token.is_empty() => Ok(AuthToken {
                app_id: app_id.to_owned(),
                token: Secret::new(token),
            }),
            _ => Err(malformed(status, "without an access_token")),
        }
    }

    /// Asks Heap to delete the users `identities` (at most [`MAX_USERS`]); returns the
    /// `deletion_request_id` of Heap's `201`.
    pub async fn request_deletion(
        &self,
        token: &AuthToken,
        identities: &[&str],
    ) -> Result<String, DeletionError> {
        let users: Vec<Value> = identities
            .iter()
            .map(|identity| serde_json::json!({ "identity": identity }))
            .collect();
        let request = self
            .http
            .post(self.url(USER_DELETION))
            .bearer_auth(token.token.expose())
            .json(&serde_json::json!({ "users": users }));
        let answer = self.call(USER_DELETION, &token.app_id, request).await;
        let mut masks = identities.to_vec();
        masks.push(token.token.expose());
        let (status, body) = answer.success(&masks)?;
        request_id(&body).ok_or_else(|| malformed(status, "without a deletion_request_id"))
    }

    /// Where the deletion request `id` stands.
    pub async fn deletion_status(
        &self,
        token: &AuthToken,
        id: &str,
    ) -> Result<DeletionStatus, DeletionError> {
        let mut url =
            Url::parse(&self.url(DELETION_STATUS)).map_err(|error| DeletionError::Refused {
                status: 0,
                reason: format!("cannot build the deletion_status URL: {error}"),
            })?;
        // The id is Heap's; as a path segment it is escaped, whatever it holds.
        if let Ok(mut segments) = url.path_segments_mut() {
            segments.push(id);
        }
        let request = self.http.get(url).bearer_auth(token.token.expose());
        let answer = self.call(DELETION_STATUS, &token.app_id, request).await;
        if matches!(&answer, Answer::Status { status: 404, .. }) {
            return Ok(DeletionStatus::NotFound);
        }
        let (status, body) = answer.success(&[token.token.expose()])?;
        match body.get("status").and_then(Value::as_str) {
            Some("pending") => Ok(DeletionStatus::Pending),
            Some("complete") => Ok(DeletionStatus::Complete),
            Some(other) => Err(malformed(
                status,
                &format!("with an unknown status `{}`", truncate(other, 40)),
            )),
            None => Err(malformed(status, "without a status")),
        }
    }

    /// Sends `request`, counting it in `relay_heap_requests_total` and the duration histogram
    /// under `endpoint` (as [`crate::heap::client::HeapClient::send`] does).
    async fn call(
        &self,
        endpoint: &'static str,
        app_id: &str,
        request: reqwest::RequestBuilder,
    ) -> Answer {
        let started = Stopwatch::start();
        let answer = match request.send().await {
            Ok(response) => Answer::read(response, self.clock.now()).await,
            Err(error) if error.is_timeout() => Answer::Failed(TransportError::Timeout),
            Err(error) if error.is_connect() => {
                Answer::Failed(TransportError::Connect(transport_text(error)))
            }
            Err(error) => Answer::Failed(TransportError::Other(transport_text(error))),
        };
        let status = match &answer {
            Answer::Status { status, .. } => status.to_string(),
            Answer::Failed(TransportError::Timeout) => "timeout".to_owned(),
            Answer::Failed(_) => "error".to_owned(),
        };
        metrics::counter!(
            "relay_heap_requests_total",
            "endpoint" => endpoint,
            "status" => status,
            "app_id" => app_id.to_owned()
        )
        .increment(1);
        metrics::histogram!(
            "relay_heap_request_duration_seconds",
            "endpoint" => endpoint,
            "app_id" => app_id.to_owned()
        )
        .record(started.elapsed().as_secs_f64());
        answer
    }
}

/// What came back from one call.
enum Answer {
    Status {
        status: u16,
        retry_after: Option<Duration>,
        body: String,
    },
    Failed(TransportError),
}

impl Answer {
    async fn read(response: Response, now: chrono::DateTime<chrono::Utc>) -> Self {
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, now));
        match response.text().await {
            Ok(body) => Answer::Status {
                status,
                retry_after,
                body,
            },
            // The status came but the body did not: the answer is lost, as with a reset.
            Err(error) if error.is_timeout() => Answer::Failed(TransportError::Timeout),
            Err(error) => Answer::Failed(TransportError::Other(transport_text(error))),
        }
    }

    /// The status and JSON body of a 2xx; any other outcome classified (as the forwarder
    /// classifies events: [`classify`]), with `masks` hidden in the message kept.
    fn success(self, masks: &[&str]) -> Result<(u16, Value), DeletionError> {
        let (status, retry_after, body) = match self {
            Answer::Failed(error) => {
                return Err(DeletionError::Retry {
                    error: error.to_string(),
                    retry_after: None,
                    throttled: false,
                });
            }
            Answer::Status {
                status,
                retry_after,
                body,
            } => (status, retry_after, body),
        };
        let outcome = Ok(HeapResponse {
            status,
            retry_after,
            text: String::new(),
        });
        let said = || match heap_message(&body) {
            Some(message) => format!(
                "heap answered {status}: {}",
                truncate(&mask(&message, masks), MAX_MESSAGE)
            ),
            None => format!("heap answered {status}"),
        };
        match classify(&outcome) {
            Verdict::Delivered => Ok((status, serde_json::from_str(&body).unwrap_or(Value::Null))),
            Verdict::Retry {
                retry_after,
                throttled,
                ..
            } => Err(DeletionError::Retry {
                error: said(),
                retry_after,
                throttled,
            }),
            Verdict::Reject { status, .. } => Err(DeletionError::Refused {
                status,
                reason: said(),
            }),
        }
    }
}

/// A 2xx that lacks what it should carry: retried, since asking again is harmless (a
/// deletion asked twice deletes once) and giving up would leave the user in Heap.
fn malformed(status: u16, what: &str) -> DeletionError {
    DeletionError::Retry {
        error: format!("heap answered {status} {what}"),
        retry_after: None,
        throttled: false,
    }
}

/// `deletion_request_id` of a `201`, a string or (leniently) a number.
fn request_id(body: &Value) -> Option<String> {
    match body.get("deletion_request_id")? {
        Value::String(id) if !id.is_empty() => Some(id.clone()),
        Value::Number(id) => Some(id.to_string()),
        _ => None,
    }
}

/// Heap's `err.message` (or an `err` that is itself a string), unless it is longer than
/// [`MAX_MASKED`] characters.
fn heap_message(body: &str) -> Option<String> {
    let body: Value = serde_json::from_str(body).ok()?;
    let err = body.get("err")?;
    let message = err.get("message").unwrap_or(err).as_str()?;
    (message.chars().count() <= MAX_MASKED).then(|| message.to_owned())
}

/// `text` with every occurrence of a non-empty `masks` value replaced by [`MASK`] (a run of
/// them by one). The occurrences are all found in `text` as Heap sent it, so neither a mask
/// nor a value that overlaps another can leave part of one readable.
fn mask(text: &str, masks: &[&str]) -> String {
    let mut hidden = vec![false; text.len()];
    for value in masks.iter().filter(|value| !value.is_empty()) {
        for (at, _) in text.match_indices(value) {
            hidden[at..at + value.len()].fill(true);
        }
    }
    let mut masked = String::with_capacity(text.len());
    let mut in_mask = false;
    for (at, character) in text.char_indices() {
        match (hidden[at], in_mask) {
            (true, false) => masked.push_str(MASK),
            (true, true) => {}
            (false, _) => masked.push(character),
        }
        in_mask = hidden[at];
    }
    masked
}

/// A transport error's text with its causes (`connection refused`), without its URL: the text
/// is stored and listed, and the URL is the configuration's anyway.
fn transport_text(error: reqwest::Error) -> String {
    let error = error.without_url();
    let mut text = error.to_string();
    let mut cause = std::error::Error::source(&error);
    while let Some(inner) = cause {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        cause = inner.source();
    }
    truncate(&text, MAX_MESSAGE)
}

#[cfg(test)]
pub(crate) mod tests {
    //! Also the fake Heap of [`crate::erase::heap`]'s tests.
    use super::*;

    use std::sync::Mutex;

    use axum::Router;
    use axum::body::Bytes;
    use axum::extract::State;
    use axum::http::{HeaderMap, Method, StatusCode, Uri};
    use axum::response::{IntoResponse, Response};
    use base64::Engine as _;

    use crate::clock::ManualClock;

    /// What the fake Heap was sent.
    #[derive(Debug, Clone)]
    pub(crate) struct Seen {
        pub method: Method,
        pub path: String,
        pub authorization: Option<String>,
        pub body: Value,
    }

    /// Status, `Retry-After` and body of an answer.
    pub(crate) type Reply = (u16, Option<&'static str>, String);

    type Responder = Box<dyn FnMut(&Seen) -> Reply + Send>;

    #[derive(Clone)]
    struct HeapState {
        seen: Arc<Mutex<Vec<Seen>>>,
        responder: Arc<Mutex<Responder>>,
    }

    /// A real HTTP server on 127.0.0.1 playing Heap's deletion API.
    pub(crate) struct FakeHeap {
        pub url: Url,
        state: HeapState,
    }

    impl FakeHeap {
        pub async fn start(responder: impl FnMut(&Seen) -> Reply + Send + 'static) -> Self {
            Self::start_under("", responder).await
        }

        /// Serving `prefix` (a proxy's path) before Heap's paths, as the base URL says.
        pub async fn start_under(
            prefix: &str,
            responder: impl FnMut(&Seen) -> Reply + Send + 'static,
        ) -> Self {
            let state = HeapState {
                seen: Arc::default(),
                responder: Arc::new(Mutex::new(Box::new(responder))),
            };
            let app = Router::new().fallback(answer).with_state(state.clone());
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(async move { axum::serve(listener, app).await });
            let url = Url::parse(&format!("http://{addr}{prefix}/")).unwrap();
            FakeHeap { url, state }
        }

        pub fn seen(&self) -> Vec<Seen> {
            self.state.seen.lock().unwrap().clone()
        }

        pub fn client(&self) -> DeletionClient {
            DeletionClient::new(
                &self.url,
                Duration::from_secs(5),
                Arc::new(ManualClock::at_ms(1_767_225_600_000)),
            )
            .unwrap()
        }
    }

    async fn answer(
        State(state): State<HeapState>,
        method: Method,
        uri: Uri,
        headers: HeaderMap,
        body: Bytes,
    ) -> Response {
        let seen = Seen {
            method,
            path: uri.path().to_owned(),
            authorization: headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            body: serde_json::from_slice(&body).unwrap_or(Value::Null),
        };
        let (status, retry_after, body) = (state.responder.lock().unwrap())(&seen);
        state.seen.lock().unwrap().push(seen);
        let mut response = (
            StatusCode::from_u16(status).unwrap(),
            [("content-type", "application/json")],
            body,
        )
            .into_response();
        if let Some(value) = retry_after {
            response
                .headers_mut()
                .insert("retry-after", value.parse().unwrap());
        }
        response
    }

    /// Heap as documented: a token, a `201` per deletion, `pending` for every status.
    pub(crate) fn heap_says_yes(seen: &Seen) -> Reply {
        match seen.path.rsplit('/').next().unwrap_or("") {
            "auth_token" => (200, None, r#"{"access_token":"token-1"}"#.into()),
            "user_deletion" => (
                201,
                None,
                r#"{"deletion_request_id":"req-1","deletion_request_location":"/api/public/v0/deletion_status/req-1","status":"pending"}"#.into(),
            ),
            _ => (200, None, r#"{"deletion_request_id":"req-1","status":"pending"}"#.into()),
        }
    }

    fn token(app_id: &str) -> AuthToken {
        AuthToken {
            app_id: app_id.into(),
            token: Secret::new("token-1"),
        }
    }

    #[tokio::test]
    async fn a_token_is_asked_for_with_basic_app_id_and_api_key_under_the_base_urls_path() {
        let heap = FakeHeap::start_under("/proxy", heap_says_yes).await;
        let client = heap.client();

        let token = client
            .auth_token("123", &Secret::new("key-secret-1"))
            .await
            .unwrap();

        assert_eq!(token.app_id(), "123");
        assert_eq!(token.token.expose(), "token-1");
        let seen = heap.seen();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].method, Method::POST);
        assert_eq!(seen[0].path, "/proxy/api/public/v0/auth_token");
        let basic = base64::engine::general_purpose::STANDARD.encode("123:key-secret-1");
        assert_eq!(seen[0].authorization, Some(format!("Basic {basic}")));
    }

    #[tokio::test]
    async fn a_deletion_posts_every_identity_with_the_bearer_token_and_returns_heaps_id() {
        let heap = FakeHeap::start(heap_says_yes).await;
        let identities = ["alice@example.com", "bob", "42"];

        let id = heap
            .client()
            .request_deletion(&token("123"), &identities)
            .await
            .unwrap();

        assert_eq!(id, "req-1");
        let seen = heap.seen();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].method, Method::POST);
        assert_eq!(seen[0].path, "/api/public/v0/user_deletion");
        assert_eq!(seen[0].authorization.as_deref(), Some("Bearer token-1"));
        assert_eq!(
            seen[0].body,
            serde_json::json!({"users": [
                {"identity": "alice@example.com"}, {"identity": "bob"}, {"identity": "42"}
            ]})
        );
    }

    #[tokio::test]
    async fn a_401_is_refused_with_heaps_message_masking_what_the_request_sent() {
        let heap = FakeHeap::start(|_: &Seen| {
            (
                401,
                None,
                r#"{"err":{"message":"key key-secret-1 may not delete alice@example.com"}}"#.into(),
            )
        })
        .await;
        let client = heap.client();

        let token_error = client
            .auth_token("123", &Secret::new("key-secret-1"))
            .await
            .unwrap_err();
        let deletion_error = client
            .request_deletion(&token("123"), &["alice@example.com"])
            .await
            .unwrap_err();

        assert_eq!(
            token_error,
            DeletionError::Refused {
                status: 401,
                reason: "heap answered 401: key [redacted] may not delete alice@example.com".into()
            }
        );
        assert_eq!(
            deletion_error,
            DeletionError::Refused {
                status: 401,
                reason: "heap answered 401: key key-secret-1 may not delete [redacted]".into()
            },
            "the request masks what it sent: the identities and its token"
        );
    }

    #[tokio::test]
    async fn a_refusal_without_heaps_message_says_the_status_only() {
        let heap = FakeHeap::start(|_: &Seen| (403, None, "<html>alice</html>".into())).await;

        let error = heap
            .client()
            .request_deletion(&token("123"), &["alice"])
            .await
            .unwrap_err();

        assert_eq!(
            error,
            DeletionError::Refused {
                status: 403,
                reason: "heap answered 403".into()
            }
        );
    }

    #[tokio::test]
    async fn a_503_and_a_429_with_retry_after_are_retried() {
        let answers = Arc::new(Mutex::new(vec![
            (
                429,
                Some("7"),
                r#"{"err":{"message":"slow down"}}"#.to_owned(),
            ),
            (503, None, String::new()),
        ]));
        let next = answers.clone();
        let heap = FakeHeap::start(move |_: &Seen| next.lock().unwrap().pop().unwrap()).await;
        let client = heap.client();

        let unavailable = client.request_deletion(&token("1"), &["a"]).await;
        let throttled = client.request_deletion(&token("1"), &["a"]).await;

        assert_eq!(
            unavailable,
            Err(DeletionError::Retry {
                error: "heap answered 503".into(),
                retry_after: None,
                throttled: false
            })
        );
        assert_eq!(
            throttled,
            Err(DeletionError::Retry {
                error: "heap answered 429: slow down".into(),
                retry_after: Some(Duration::from_secs(7)),
                throttled: true
            })
        );
    }

    #[tokio::test]
    async fn a_connection_refused_is_retried() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let client = DeletionClient::new(
            &Url::parse(&format!("http://{addr}")).unwrap(),
            Duration::from_secs(5),
            Arc::new(ManualClock::at_ms(0)),
        )
        .unwrap();

        let error = client
            .auth_token("1", &Secret::new("key-secret-1"))
            .await
            .unwrap_err();

        let DeletionError::Retry { error, .. } = error else {
            panic!("not retried: {error:?}");
        };
        assert!(error.starts_with("connection failed"), "{error}");
        assert!(!error.contains(&addr.to_string()), "no URL: {error}");
    }

    #[tokio::test]
    async fn a_yes_without_what_a_yes_carries_is_retried() {
        let heap = FakeHeap::start(|_: &Seen| (201, None, "<html>proxy</html>".into())).await;

        let error = heap
            .client()
            .request_deletion(&token("1"), &["a"])
            .await
            .unwrap_err();

        assert_eq!(
            error,
            DeletionError::Retry {
                error: "heap answered 201 without a deletion_request_id".into(),
                retry_after: None,
                throttled: false
            }
        );
    }

    #[tokio::test]
    async fn deletion_status_reads_pending_complete_and_not_found() {
        let heap = FakeHeap::start(|seen: &Seen| match seen.path.as_str() {
            "/api/public/v0/deletion_status/req-pending" => (
                200,
                None,
                r#"{"deletion_request_id":"req-pending","status":"pending"}"#.into(),
            ),
            "/api/public/v0/deletion_status/req-done" => (
                200,
                None,
                r#"{"deletion_request_id":"req-done","status":"complete"}"#.into(),
            ),
            _ => (404, None, r#"{"err":{"message":"not found"}}"#.into()),
        })
        .await;
        let client = heap.client();

        let pending = client.deletion_status(&token("1"), "req-pending").await;
        let complete = client.deletion_status(&token("1"), "req-done").await;
        let unknown = client.deletion_status(&token("1"), "req/odd id").await;

        assert_eq!(pending, Ok(DeletionStatus::Pending));
        assert_eq!(complete, Ok(DeletionStatus::Complete));
        assert_eq!(unknown, Ok(DeletionStatus::NotFound));
        let seen = heap.seen();
        assert!(seen.iter().all(|s| s.method == Method::GET));
        assert!(
            seen.iter()
                .all(|s| s.authorization.as_deref() == Some("Bearer token-1"))
        );
        assert_eq!(
            seen[2].path, "/api/public/v0/deletion_status/req%2Fodd%20id",
            "Heap's id is one escaped path segment"
        );
    }

    #[tokio::test]
    async fn each_call_is_counted_by_endpoint_status_and_app_id() {
        let metrics = crate::telemetry::metrics();
        let heap = FakeHeap::start(heap_says_yes).await;
        let client = heap.client();
        let app_id = "deletion-metrics-app";

        let token = client
            .auth_token(app_id, &Secret::new("key-secret-1"))
            .await
            .unwrap();
        client.request_deletion(&token, &["a"]).await.unwrap();
        client.deletion_status(&token, "req-1").await.unwrap();

        let text = metrics.render();
        for (endpoint, status) in [
            ("auth_token", "200"),
            ("user_deletion", "201"),
            ("deletion_status", "200"),
        ] {
            let counter = format!(
                "relay_heap_requests_total{{endpoint=\"{endpoint}\",status=\"{status}\",app_id=\"{app_id}\"}} 1"
            );
            assert!(text.contains(&counter), "missing {counter} in\n{text}");
            let histogram = format!(
                "relay_heap_request_duration_seconds_count{{endpoint=\"{endpoint}\",app_id=\"{app_id}\"}} 1"
            );
            assert!(text.contains(&histogram), "missing {histogram}");
        }
    }

    #[test]
    fn masking_hides_every_value_whole_and_skips_empty_ones() {
        assert_eq!(
            mask("a-b a-b c", &["a-b", "", "c", "e"]),
            "[redacted] [redacted] [redacted]",
            "the mask's own letters are not masked again"
        );
        assert_eq!(mask("xabcx", &["ab", "bc"]), "x[redacted]x");
        assert_eq!(mask("héllo wörld", &["wö"]), "héllo [redacted]rld");
        assert_eq!(mask("nothing", &[]), "nothing");
    }
}
