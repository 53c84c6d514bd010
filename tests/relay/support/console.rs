//! The console (contract §11) as a test speaks to it over HTTP, like a browser but seeing every
//! answer as it is: a client that never follows redirects, sign-in returning the session cookie,
//! the CSRF token read from a page, forms posted with or without it. And one dead letter with
//! Heap's own words in it, which the dead-letter pages show.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use reqwest::Method;
use reqwest::header::{HeaderMap, LOCATION, SET_COOKIE};
use serde_json::{Value, json};

use super::{ADMIN_TOKEN, Client, FakeHeap, Reply, eventually};

/// What the fake Heap answers a refused track request: [`refuse_track`]'s dead letters carry
/// it, and the console shows it as Heap's answer.
pub const HEAP_REFUSAL: &str = "property flow_id is not allowed here";

/// The console of the relay whose admin port is `admin_url`.
pub struct Console {
    pub admin_url: String,
    /// Never follows a redirect: the tests look at each one.
    pub http: reqwest::Client,
}

/// An answer, read whole.
pub struct Page {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: String,
}

impl Page {
    /// The `Location` header, or "".
    pub fn location(&self) -> &str {
        self.header(LOCATION.as_str())
    }

    /// The header `name`, or "" when absent.
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    /// Whether this is the redirect to the sign-in page a signed-out visitor gets.
    pub fn is_redirect_to_sign_in(&self) -> bool {
        matches!(self.status, 303 | 307) && self.location() == "/console/login"
    }
}

impl Console {
    pub fn new(client: &Client) -> Console {
        Console {
            admin_url: client.admin_url.clone(),
            http: userpilot_heap_relay::tls::http_client()
                .redirect(reqwest::redirect::Policy::none())
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.admin_url)
    }

    async fn read(request: reqwest::RequestBuilder) -> Page {
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.text().await.unwrap();
        Page {
            status,
            headers,
            body,
        }
    }

    /// `GET path`, with the session `cookie` when given.
    pub async fn get(&self, path: &str, cookie: Option<&str>) -> Page {
        let mut request = self.http.get(self.url(path));
        if let Some(cookie) = cookie {
            request = request.header("cookie", cookie);
        }
        Self::read(request).await
    }

    /// `POST path` with the form `fields`, the session `cookie` and the extra `headers`.
    pub async fn post(
        &self,
        path: &str,
        cookie: Option<&str>,
        fields: &[(&str, &str)],
        headers: &[(&str, &str)],
    ) -> Page {
        let mut request = self
            .http
            .post(self.url(path))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(serde_urlencoded::to_string(fields).unwrap());
        if let Some(cookie) = cookie {
            request = request.header("cookie", cookie);
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        Self::read(request).await
    }

    /// `POST /console/login` with `token` and the extra `headers`.
    pub async fn sign_in_with(&self, token: &str, headers: &[(&str, &str)]) -> Page {
        self.post("/console/login", None, &[("token", token)], headers)
            .await
    }

    /// Signs in with the admin token; returns the session cookie (`relay_console=...`) for a
    /// `Cookie` header.
    pub async fn session(&self) -> String {
        let page = self.sign_in_with(ADMIN_TOKEN, &[]).await;
        assert_eq!(
            (page.status, page.location()),
            (303, "/console"),
            "{}",
            page.body
        );
        cookie_pair(page.header(SET_COOKIE.as_str()))
    }

    /// Whether `cookie` is a live session: `GET /console` does not send it to sign in.
    pub async fn signed_in(&self, cookie: &str) -> bool {
        !self
            .get("/console", Some(cookie))
            .await
            .is_redirect_to_sign_in()
    }

    /// The session's CSRF token, as the overview page carries it in its forms.
    pub async fn csrf(&self, cookie: &str) -> String {
        let page = self.get("/console", Some(cookie)).await;
        assert_eq!(page.status, 200, "GET /console: {}", page.body);
        csrf_in(&page.body).unwrap_or_else(|| panic!("no csrf field in {}", page.body))
    }
}

/// `name=value` of a `Set-Cookie` header value (its attributes left off).
pub fn cookie_pair(set_cookie: &str) -> String {
    let pair = set_cookie.split(';').next().unwrap_or("").trim();
    assert!(
        pair.starts_with("relay_console=") && pair.len() > "relay_console=".len(),
        "not a session cookie: {set_cookie:?}"
    );
    pair.to_owned()
}

/// The value of the first `<input ... name="csrf" value="...">` in `html`.
pub fn csrf_in(html: &str) -> Option<String> {
    let field = html.split("name=\"csrf\"").nth(1)?;
    let value = field.split("value=\"").nth(1)?;
    Some(value.split('"').next()?.to_owned())
}

/// From now on the fake Heap refuses track requests with a 400 carrying [`HEAP_REFUSAL`] while
/// the switch returned is on (it starts on); turn it off and Heap accepts them again.
pub fn refuse_track(heap: &FakeHeap) -> Arc<AtomicBool> {
    let refusing = Arc::new(AtomicBool::new(true));
    let switch = refusing.clone();
    heap.reply_with(move |incoming| {
        (incoming.path == "/api/track" && switch.load(Ordering::SeqCst))
            .then(|| Reply::json(400, json!({ "error": HEAP_REFUSAL })))
    });
    refusing
}

/// Posts `webhook` (Heap must be refusing it: [`refuse_track`]) and waits for its dead letter;
/// returns the letter's id (the newest one: a test's earlier letters have lower ids).
pub async fn dead_letter(client: &Client, webhook: &Value) -> i64 {
    let before = dead_letter_count(client).await;
    assert_eq!(client.post(webhook).await.0, 202);
    eventually(Duration::from_secs(15), async || {
        let (_, listing) = client.admin(Method::GET, "/admin/dead-letters").await;
        let letters = listing["dead_letters"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if letters.len() > before {
            letters
                .iter()
                .filter_map(|letter| letter["id"].as_i64())
                .max()
        } else {
            None
        }
    })
    .await
}

/// How many dead letters `GET /admin/dead-letters` lists.
pub async fn dead_letter_count(client: &Client) -> usize {
    let (status, listing) = client.admin(Method::GET, "/admin/dead-letters").await;
    assert_eq!(status, 200, "{listing}");
    listing["dead_letters"].as_array().map_or(0, Vec::len)
}

#[test]
fn the_csrf_token_and_the_cookie_are_read_from_their_markup() {
    let html = r#"<form><input type="hidden" name="csrf" value="abc123"><button>x</button>"#;
    assert_eq!(csrf_in(html).as_deref(), Some("abc123"));
    assert_eq!(csrf_in("<p>nothing</p>"), None);
    assert_eq!(
        cookie_pair("relay_console=xyz; Path=/console; HttpOnly"),
        "relay_console=xyz"
    );
}
