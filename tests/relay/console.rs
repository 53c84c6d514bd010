//! The console (contract §11) over HTTP, against the real binary: it is off (403) without an
//! admin token; without a session a page sends the visitor to sign in and the live fragment
//! answers 401; sign-in sets a `HttpOnly`, `SameSite=Strict` cookie scoped to `/console`
//! (`Secure` behind HTTPS) and is slowed per address; every answer carries the CSP and the
//! anti-framing and anti-sniffing headers; a form without the session's CSRF token or from
//! another origin changes nothing; signing out and restarting the relay end sessions; and no
//! page loads anything from another origin.

use reqwest::Method;
use userpilot_heap_relay::console::login::SIGN_IN_PERIOD;

use crate::support::console::{
    Console, HEAP_REFUSAL, Page, cookie_pair, dead_letter, dead_letter_count, refuse_track,
};
use crate::support::{ADMIN_TOKEN, FakeHeap, RelayProcess, flow_started, set_env};

/// A relay binary with the admin token, and its console.
async fn relay(heap: &FakeHeap, dir: &std::path::Path) -> (RelayProcess, Console) {
    let relay = RelayProcess::spawn(&RelayProcess::env(heap, dir));
    let console = Console::new(&relay);
    (relay, console)
}

/// `/admin/status`'s overall forwarder state.
async fn forwarder(relay: &RelayProcess) -> String {
    let (status, answer) = relay.admin(Method::GET, "/admin/status").await;
    assert_eq!(status, 200, "{answer}");
    answer["forwarder"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_admin_token_every_console_route_is_forbidden() {
    let heap = FakeHeap::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut env = RelayProcess::env(&heap, dir.path());
    set_env(&mut env, "RELAY_ADMIN__TOKEN", "");
    let relay = RelayProcess::spawn(&env);
    let console = Console::new(&relay);

    for path in ["/console", "/console/login", "/console/live"] {
        let page = console.get(path, None).await;
        assert_eq!(page.status, 403, "GET {path}: {}", page.body);
        assert!(
            page.body.contains("admin.token"),
            "GET {path}: {}",
            page.body
        );
        assert_security_headers(&format!("GET {path}"), &page);
    }
    for token in [ADMIN_TOKEN, ""] {
        let page = console.sign_in_with(token, &[]).await;
        assert_eq!(page.status, 403, "POST /console/login {token:?}");
        assert_eq!(page.header("set-cookie"), "", "no session without a token");
    }
    let page = console
        .post("/console/lanes/pause", None, &[("csrf", "x")], &[])
        .await;
    assert_eq!(page.status, 403, "POST /console/lanes/pause");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_visitor_without_a_session_is_sent_to_sign_in_and_the_fragment_answers_401() {
    let heap = FakeHeap::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (relay, console) = relay(&heap, dir.path()).await;

    for cookie in [None, Some("relay_console=not-a-session")] {
        for path in [
            "/console",
            "/console/dead-letters",
            "/console/dead-letters/1",
            "/console/shapes",
            "/console/preview",
        ] {
            let page = console.get(path, cookie).await;
            assert!(
                page.is_redirect_to_sign_in(),
                "GET {path} with {cookie:?}: {} {:?}",
                page.status,
                page.location()
            );
        }
        let live = console.get("/console/live", cookie).await;
        assert_eq!(live.status, 401, "GET /console/live with {cookie:?}");
        let pause = console
            .post("/console/lanes/pause", cookie, &[("csrf", "x")], &[])
            .await;
        assert!(
            pause.is_redirect_to_sign_in(),
            "POST /console/lanes/pause with {cookie:?}: {}",
            pause.status
        );
    }
    let login = console.get("/console/login", None).await;
    assert_eq!(login.status, 200);
    assert!(login.body.contains(r#"id="token""#), "{}", login.body);
    assert!(login.body.contains(r#"id="sign-in""#), "{}", login.body);
    assert_eq!(forwarder(&relay).await, "running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_in_sets_a_strict_http_only_cookie_for_the_console_secure_only_behind_https() {
    let heap = FakeHeap::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (_relay, console) = relay(&heap, dir.path()).await;

    let wrong = console.sign_in_with("not-the-admin-token", &[]).await;
    assert_eq!(wrong.status, 401);
    assert!(wrong.body.contains(r#"id="login-error""#), "{}", wrong.body);
    assert_eq!(wrong.header("set-cookie"), "");

    let right = console.sign_in_with(ADMIN_TOKEN, &[]).await;
    assert_eq!((right.status, right.location()), (303, "/console"));
    let attributes = cookie_attributes(&right);
    for wanted in [
        "HttpOnly",
        "SameSite=Strict",
        "Path=/console",
        "Max-Age=43200",
    ] {
        assert!(
            attributes.iter().any(|a| a == wanted),
            "{wanted} missing from {attributes:?}"
        );
    }
    assert!(
        !attributes.iter().any(|a| a.eq_ignore_ascii_case("Secure")),
        "Secure over plain HTTP: {attributes:?}"
    );
    let cookie = cookie_pair(right.header("set-cookie"));
    assert!(console.signed_in(&cookie).await);
    // Signed in, the sign-in page sends the operator on to the overview.
    let again = console.get("/console/login", Some(&cookie)).await;
    assert!(matches!(again.status, 303 | 307), "{}", again.status);
    assert_eq!(again.location(), "/console");

    let proxied = console
        .sign_in_with(ADMIN_TOKEN, &[("x-forwarded-proto", "https")])
        .await;
    assert_eq!(proxied.status, 303);
    let attributes = cookie_attributes(&proxied);
    assert!(
        attributes.iter().any(|a| a == "Secure"),
        "no Secure behind HTTPS: {attributes:?}"
    );
}

/// The attributes of a page's `Set-Cookie` (after `name=value`), trimmed.
fn cookie_attributes(page: &Page) -> Vec<String> {
    page.header("set-cookie")
        .split(';')
        .skip(1)
        .map(|a| a.trim().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_console_answer_carries_the_csp_and_forbids_framing_and_sniffing() {
    let heap = FakeHeap::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (_relay, console) = relay(&heap, dir.path()).await;
    let cookie = console.session().await;

    let mut answers = Vec::new();
    for path in [
        "/console/login",
        "/console",
        "/console/live",
        "/console/dead-letters",
        "/console/assets/console.css",
        "/console/assets/console.js",
        "/console/assets/nothing.js",
        "/console/no-such-page",
    ] {
        answers.push((format!("GET {path}"), console.get(path, None).await));
    }
    for path in [
        "/console",
        "/console/live",
        "/console/dead-letters",
        "/console/shapes",
        "/console/preview",
    ] {
        let page = console.get(path, Some(&cookie)).await;
        answers.push((format!("GET {path} signed in"), page));
    }
    answers.push((
        "POST /console/login (wrong token)".into(),
        console.sign_in_with("wrong", &[]).await,
    ));
    answers.push((
        "POST /console/lanes/pause (no csrf)".into(),
        console
            .post("/console/lanes/pause", Some(&cookie), &[], &[])
            .await,
    ));

    for (what, page) in &answers {
        assert_security_headers(what, page);
    }
}

/// `page` carries the CSP (scripts only from the console itself, nothing inline, no framing)
/// and forbids framing and content sniffing.
fn assert_security_headers(what: &str, page: &Page) {
    let csp = page.header("content-security-policy");
    let directives: Vec<&str> = csp.split(';').map(str::trim).collect();
    assert!(
        directives.contains(&"script-src 'self'"),
        "{what}: CSP {csp:?}"
    );
    assert!(
        !csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"),
        "{what}: CSP {csp:?}"
    );
    assert!(
        directives.contains(&"frame-ancestors 'none'"),
        "{what}: {csp:?}"
    );
    assert_eq!(page.header("x-frame-options"), "DENY", "{what}");
    assert_eq!(page.header("x-content-type-options"), "nosniff", "{what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_form_without_the_sessions_csrf_token_is_refused_and_changes_nothing() {
    let heap = FakeHeap::start().await;
    refuse_track(&heap);
    let dir = tempfile::tempdir().unwrap();
    let (relay, console) = relay(&heap, dir.path()).await;
    dead_letter(&relay, &flow_started("csrf", 1)).await;
    let cookie = console.session().await;

    let forms: [(&str, &[(&str, &str)]); 4] = [
        ("/console/lanes/pause", &[]),
        ("/console/lanes/pause", &[("csrf", "")]),
        ("/console/lanes/pause", &[("csrf", "0123456789abcdef")]),
        (
            "/console/dead-letters/purge",
            &[("all", "true"), ("confirmed", "1"), ("csrf", "guessed")],
        ),
    ];
    for (path, fields) in forms {
        let page = console.post(path, Some(&cookie), fields, &[]).await;
        assert_eq!(page.status, 403, "POST {path} {fields:?}: {}", page.body);
    }
    assert_eq!(forwarder(&relay).await, "running");
    assert_eq!(dead_letter_count(&relay).await, 1, "the purge was refused");
    assert!(
        console.signed_in(&cookie).await,
        "a refusal keeps the session"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_form_from_another_origin_is_refused_and_the_consoles_own_one_works() {
    let heap = FakeHeap::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (relay, console) = relay(&heap, dir.path()).await;
    let cookie = console.session().await;
    let csrf = console.csrf(&cookie).await;
    let fields = [("csrf", csrf.as_str())];

    let foreign: [&[(&str, &str)]; 3] = [
        &[("origin", "http://evil.example")],
        // Another port of the same host is another origin (though the same site).
        &[("origin", "http://127.0.0.1:1")],
        &[("sec-fetch-site", "cross-site")],
    ];
    for headers in foreign {
        let page = console
            .post("/console/lanes/pause", Some(&cookie), &fields, headers)
            .await;
        assert_eq!(page.status, 403, "{headers:?}: {}", page.body);
        assert_eq!(forwarder(&relay).await, "running", "{headers:?}");
    }

    // As a browser on one of the console's pages sends it.
    let own = [
        ("origin", console.admin_url.as_str()),
        ("sec-fetch-site", "same-origin"),
    ];
    let paused = console
        .post("/console/lanes/pause", Some(&cookie), &fields, &own)
        .await;
    assert_eq!(
        (paused.status, paused.location()),
        (303, "/console"),
        "{}",
        paused.body
    );
    assert_eq!(forwarder(&relay).await, "paused");
    let resumed = console
        .post("/console/lanes/resume", Some(&cookie), &fields, &own)
        .await;
    assert_eq!((resumed.status, resumed.location()), (303, "/console"));
    assert_eq!(forwarder(&relay).await, "running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_wrong_sign_ins_are_slowed_and_then_the_right_token_waits_too() {
    let heap = FakeHeap::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (_relay, console) = relay(&heap, dir.path()).await;

    let first = std::time::Instant::now();
    let mut statuses = Vec::new();
    for _ in 0..6 {
        statuses.push(console.sign_in_with("guess", &[]).await.status);
    }
    assert!(
        statuses[..5].iter().all(|&s| s == 401),
        "the first five are answered: {statuses:?}"
    );
    assert_eq!(statuses[5], 429, "{statuses:?}");

    let right = console.sign_in_with(ADMIN_TOKEN, &[]).await;
    assert_eq!(right.status, 429, "the right token is slowed as well");
    let retry_after: u64 = right
        .header("retry-after")
        .parse()
        .unwrap_or_else(|_| panic!("Retry-After {:?}", right.header("retry-after")));
    // The wait is rounded up: a client retrying after Retry-After seconds is let in.
    let period = SIGN_IN_PERIOD.as_secs();
    let least = SIGN_IN_PERIOD
        .saturating_sub(first.elapsed())
        .as_secs_f64()
        .ceil() as u64;
    assert!(
        (least.max(1)..=period).contains(&retry_after),
        "Retry-After {retry_after}, expected {least}..={period}"
    );
    assert_eq!(right.header("set-cookie"), "", "no session while slowed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signing_out_ends_the_session() {
    let heap = FakeHeap::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (_relay, console) = relay(&heap, dir.path()).await;
    let cookie = console.session().await;
    let other = console.session().await;

    // Without the token, signing out is refused like any other form.
    let refused = console
        .post("/console/logout", Some(&cookie), &[], &[])
        .await;
    assert_eq!(refused.status, 403);
    assert!(console.signed_in(&cookie).await);

    let csrf = console.csrf(&cookie).await;
    let out = console
        .post("/console/logout", Some(&cookie), &[("csrf", &csrf)], &[])
        .await;
    assert_eq!((out.status, out.location()), (303, "/console/login"));
    assert!(
        out.header("set-cookie").contains("Max-Age=0"),
        "the browser forgets the cookie: {:?}",
        out.header("set-cookie")
    );
    assert!(!console.signed_in(&cookie).await, "the old cookie is dead");
    assert_eq!(
        console.get("/console/live", Some(&cookie)).await.status,
        401
    );
    assert!(console.signed_in(&other).await, "other sessions go on");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_of_the_relay_signs_everyone_out() {
    let heap = FakeHeap::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (mut relay, console) = relay(&heap, dir.path()).await;
    let cookie = console.session().await;
    assert!(console.signed_in(&cookie).await);

    relay.terminate(std::time::Duration::from_secs(10)).await;
    drop(relay);
    let (_relay, console) = self::relay(&heap, dir.path()).await;
    assert!(
        !console.signed_in(&cookie).await,
        "a session outlived the restart"
    );
    assert_eq!(
        console.get("/console/live", Some(&cookie)).await.status,
        401
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_assets_are_served_with_their_content_types_without_a_session() {
    let heap = FakeHeap::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (_relay, console) = relay(&heap, dir.path()).await;
    for (name, content_type) in [
        ("console.css", "text/css"),
        ("console.js", "text/javascript"),
    ] {
        let asset = console.get(&format!("/console/assets/{name}"), None).await;
        assert_eq!(asset.status, 200, "{name}");
        assert!(
            asset.header("content-type").starts_with(content_type),
            "{name}: {:?}",
            asset.header("content-type")
        );
        assert!(
            !asset.body.contains("http://") && !asset.body.contains("https://"),
            "{name} names another origin"
        );
    }
    assert!(
        !console
            .get("/console/assets/console.css", None)
            .await
            .body
            .contains("@import"),
        "the stylesheet imports nothing"
    );
    let missing = console.get("/console/assets/console.map", None).await;
    assert_eq!(missing.status, 404);
}

/// Attributes through which a page would load or send something elsewhere.
const URL_ATTRIBUTES: [&str; 4] = ["src=", "href=", "action=", "formaction="];

/// Every URL attribute of `html` that points at another origin (absolute or scheme-relative).
fn foreign_references(html: &str) -> Vec<String> {
    let lower = html.to_ascii_lowercase();
    URL_ATTRIBUTES
        .iter()
        .flat_map(|attribute| lower.match_indices(attribute).map(|(at, _)| at))
        .filter_map(|at| {
            let value = lower[at..]
                .split_once('=')?
                .1
                .trim_start_matches(['"', '\'']);
            (value.starts_with("http:") || value.starts_with("https:") || value.starts_with("//"))
                .then(|| lower[at..].chars().take(80).collect())
        })
        .collect()
}

#[test]
fn foreign_references_finds_absolute_and_scheme_relative_urls_only() {
    let html = r#"<link href="/console/assets/console.css"><script src='https://cdn.example/x.js'>
        <img SRC="//cdn.example/i.png"><form action="http://evil.example/"><a href="/console">"#;
    let found = foreign_references(html);
    assert_eq!(found.len(), 3, "{found:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_console_page_references_another_origin() {
    let heap = FakeHeap::start().await;
    refuse_track(&heap);
    let dir = tempfile::tempdir().unwrap();
    let (relay, console) = relay(&heap, dir.path()).await;
    let id = dead_letter(&relay, &flow_started("cdn", 1)).await;
    let cookie = console.session().await;

    let login = console.get("/console/login", None).await;
    let mut pages = vec![("/console/login".to_owned(), login)];
    for path in [
        "/console".to_owned(),
        "/console/live".to_owned(),
        "/console/dead-letters".to_owned(),
        format!("/console/dead-letters/{id}"),
        "/console/shapes".to_owned(),
        "/console/preview".to_owned(),
    ] {
        let page = console.get(&path, Some(&cookie)).await;
        pages.push((path, page));
    }
    for (path, page) in &pages {
        assert_eq!(page.status, 200, "GET {path}: {}", page.body);
        assert!(
            page.header("content-type").starts_with("text/html"),
            "GET {path}: {:?}",
            page.header("content-type")
        );
        let foreign = foreign_references(&page.body);
        assert!(foreign.is_empty(), "GET {path} references {foreign:?}");
    }
    // The letter's page shows Heap's answer (escaped, as text).
    let letter = &pages[4].1;
    assert!(
        letter.body.contains(HEAP_REFUSAL),
        "the letter's page shows Heap's answer: {}",
        letter.body
    );
}
