//! The console (contract §11) in a real browser (headless Chromium through ChromeDriver, see
//! `support/browser.rs`), against the real binary and a fake Heap: the overview's numbers move
//! without a reload; a dead letter is read (Heap's answer included) and replayed once its cause
//! is fixed; a payload carrying a script is shown as text and never runs; another site's form
//! cannot purge the dead letters; the overview fits a phone; and the keyboard reaches the skip
//! link and the navigation.
//!
//! Each test starts its own relay and browser. They are ignored unless
//! `RELAY_TEST_CHROMEDRIVER` was set when they were built (`.ci/browser.sh` sets it).

use std::sync::atomic::Ordering;

use axum::Router;
use axum::response::Html;
use serde_json::{Value, json};

use crate::support::browser::{Browser, PHONE, WAIT};
use crate::support::console::{HEAP_REFUSAL, dead_letter, dead_letter_count, refuse_track};
use crate::support::{APP_ID, FakeHeap, RelayProcess, eventually, flow_started};

/// A payload value that would run if a page put it into its HTML unescaped.
const SCRIPT: &str = "<script>window.__xss=1</script>";

/// A relay binary talking to `heap`, its queue in `dir`.
fn relay(heap: &FakeHeap, dir: &tempfile::TempDir) -> RelayProcess {
    RelayProcess::spawn(&RelayProcess::env(heap, dir.path()))
}

/// A browser signed in to `relay`'s console.
async fn signed_in(relay: &RelayProcess) -> Browser {
    let browser = Browser::start().await;
    browser.sign_in(&relay.admin_url).await;
    browser
}

/// The integer an overview cell shows.
fn count(text: &str) -> u64 {
    text.trim()
        .parse()
        .unwrap_or_else(|_| panic!("not an integer: {text:?}"))
}

/// Whether the script of [`SCRIPT`] ran in the page.
async fn script_ran(browser: &Browser) -> bool {
    browser.execute("return typeof window.__xss;").await != json!("undefined")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(browser_tests),
    ignore = "needs Chromium and ChromeDriver: set RELAY_TEST_CHROMEDRIVER (CI does, .ci/browser.sh)"
)]
async fn the_overview_counts_new_webhooks_without_a_reload() {
    let heap = FakeHeap::start().await;
    let dir = tempfile::tempdir().unwrap();
    let relay = relay(&heap, &dir);
    let browser = Browser::start().await;
    browser.sign_in(&relay.admin_url).await;
    assert_eq!(browser.path().await, "/console");
    browser.wait_for("#live[data-live='/console/live']").await;
    let lane = format!("#lane-{APP_ID} .forwarder-state");
    browser
        .wait_for_text(&lane, |t| t.trim() == "running")
        .await;

    let total = "#source-default .webhooks-total";
    let before = count(&browser.text(total).await);
    browser.execute("window.__marker = 1; return null;").await;
    for seq in 0..3 {
        assert_eq!(relay.post(&flow_started("live", seq)).await.0, 202);
    }
    browser
        .wait_for_text(total, |t| {
            t.trim().parse::<u64>().is_ok_and(|n| n >= before + 3)
        })
        .await;
    assert_eq!(
        browser.execute("return window.__marker;").await,
        json!(1),
        "the page was reloaded instead of refreshed in place"
    );
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(browser_tests),
    ignore = "needs Chromium and ChromeDriver: set RELAY_TEST_CHROMEDRIVER (CI does, .ci/browser.sh)"
)]
async fn a_dead_letter_shows_heaps_answer_and_replays_once_the_cause_is_fixed() {
    let heap = FakeHeap::start().await;
    let refusing = refuse_track(&heap);
    let dir = tempfile::tempdir().unwrap();
    let relay = relay(&heap, &dir);
    let id = dead_letter(&relay, &flow_started("replay", 1)).await;
    let browser = signed_in(&relay).await;

    browser
        .goto(&format!("{}/console/dead-letters", relay.admin_url))
        .await;
    browser
        .click(&format!(
            "table#dead-letters tr[data-id='{id}'] a.letter-link"
        ))
        .await;
    browser
        .wait_for_text("#heap-answer", |t| t.contains(HEAP_REFUSAL))
        .await;
    let attempts = browser.text("#letter-attempts").await;
    assert!(count(&attempts) >= 1, "attempts {attempts:?}");

    // The cause is fixed: Heap takes the event now.
    refusing.store(false, Ordering::SeqCst);
    assert!(heap.events().is_empty());
    browser.click("button#replay-one").await;
    browser
        .wait_for_text("#confirm-count", |t| t.trim() == "1")
        .await;
    browser.click("button#confirm").await;
    browser
        .wait_for_text("#result", |t| !t.trim().is_empty())
        .await;
    let events = heap.wait_for_events(1, WAIT).await;
    assert_eq!(events[0]["identity"], "replay-1", "{events:?}");
    eventually(WAIT, async || dead_letter_count(&relay).await == 0).await;
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(browser_tests),
    ignore = "needs Chromium and ChromeDriver: set RELAY_TEST_CHROMEDRIVER (CI does, .ci/browser.sh)"
)]
async fn a_payload_carrying_a_script_is_shown_as_text_and_never_runs() {
    let heap = FakeHeap::start().await;
    refuse_track(&heap);
    let dir = tempfile::tempdir().unwrap();
    let relay = relay(&heap, &dir);
    let mut webhook = flow_started("xss", 1);
    webhook["data"]["flow_id"] = json!(SCRIPT);
    let id = dead_letter(&relay, &webhook).await;
    let browser = signed_in(&relay).await;

    browser
        .goto(&format!("{}/console/dead-letters/{id}", relay.admin_url))
        .await;
    browser
        .wait_for_text("#letter-payload", |t| t.contains(SCRIPT))
        .await;
    assert!(!script_ran(&browser).await, "the letter's page ran it");
    browser
        .goto(&format!("{}/console/dead-letters", relay.admin_url))
        .await;
    browser.wait_for(&format!("tr[data-id='{id}']")).await;
    assert!(!script_ran(&browser).await, "the list ran it");

    // The same payload in the preview.
    browser
        .goto(&format!("{}/console/preview", relay.admin_url))
        .await;
    browser
        .wait_for("select#preview-source")
        .await
        .select_by_value("default")
        .await
        .unwrap();
    let payload = browser.wait_for("textarea#preview-payload").await;
    payload.clear().await.unwrap();
    payload
        .send_keys(&serde_json::to_string(&webhook).unwrap())
        .await
        .unwrap();
    browser.click("button#preview-run").await;
    browser
        .wait_for_text("#preview-result", |t| t.contains(SCRIPT))
        .await;
    assert!(!script_ran(&browser).await, "the preview ran it");
    browser.close().await;
}

/// Serves, at `/`, another site's page whose own script submits a form purging every dead
/// letter of the console at `admin_url`; returns the page's port on 127.0.0.1.
async fn evil_site(admin_url: &str) -> u16 {
    let page = format!(
        r#"<!doctype html><title>Win a prize</title>
<form id="f" method="post" action="{admin_url}/console/dead-letters/purge">
<input type="hidden" name="all" value="true"><input type="hidden" name="confirmed" value="1">
</form>
<script>document.getElementById("f").submit();</script>"#
    );
    let app = Router::new().route("/", axum::routing::get(move || async move { Html(page) }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(browser_tests),
    ignore = "needs Chromium and ChromeDriver: set RELAY_TEST_CHROMEDRIVER (CI does, .ci/browser.sh)"
)]
async fn another_sites_form_cannot_purge_the_dead_letters() {
    let heap = FakeHeap::start().await;
    refuse_track(&heap);
    let dir = tempfile::tempdir().unwrap();
    let relay = relay(&heap, &dir);
    dead_letter(&relay, &flow_started("evil", 1)).await;
    let browser = signed_in(&relay).await;
    let port = evil_site(&relay.admin_url).await;

    // `localhost` is another site than `127.0.0.1` (the session cookie, `SameSite=Strict`, is
    // not sent); another port of 127.0.0.1 is the same site but another origin (it is sent, and
    // the origin check refuses).
    for evil in [
        format!("http://localhost:{port}/"),
        format!("http://127.0.0.1:{port}/"),
    ] {
        browser.goto(&evil).await;
        eventually(WAIT, async || {
            browser.path().await == "/console/dead-letters/purge"
                || browser.path().await == "/console/login"
        })
        .await;
        let shown = browser
            .wait_for_text("body", |t| {
                t.contains("Request refused") || t.contains("Sign in")
            })
            .await;
        assert!(!shown.contains("Purged"), "{evil}: {shown}");
        assert_eq!(
            dead_letter_count(&relay).await,
            1,
            "{evil} purged the dead letters"
        );
    }
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(browser_tests),
    ignore = "needs Chromium and ChromeDriver: set RELAY_TEST_CHROMEDRIVER (CI does, .ci/browser.sh)"
)]
async fn the_overview_fits_a_phone_without_sideways_scrolling() {
    let heap = FakeHeap::start().await;
    let dir = tempfile::tempdir().unwrap();
    let relay = relay(&heap, &dir);
    assert_eq!(relay.post(&flow_started("phone", 1)).await.0, 202);
    let browser = Browser::start_on(PHONE).await;
    browser.sign_in(&relay.admin_url).await;
    browser.wait_for("#live #source-default").await;

    let widths = browser
        .execute(
            "return [document.documentElement.scrollWidth, window.innerWidth, \
             document.body.scrollWidth];",
        )
        .await;
    let [scroll, inner, body] = [0, 1, 2].map(|i| widths[i].as_u64().unwrap());
    assert!(inner <= 400, "the window is not phone-sized: {widths}");
    assert!(
        scroll <= inner && body <= inner,
        "the page scrolls sideways: {widths}"
    );
    for href in [
        "/console",
        "/console/dead-letters",
        "/console/shapes",
        "/console/preview",
    ] {
        let link = browser.wait_for(&format!("nav a[href='{href}']")).await;
        assert!(link.is_displayed().await.unwrap(), "{href} hidden");
        let (x, _, width, _) = link.rectangle().await.unwrap();
        assert!(
            x >= 0.0 && x + width <= inner as f64,
            "{href} off screen at x {x} width {width}"
        );
    }
    browser.close().await;
}

/// What has the keyboard focus: its tag, `href`, `id` and class.
async fn focused(browser: &Browser) -> Value {
    browser
        .execute(
            "var e = document.activeElement; return {tag: e.tagName.toLowerCase(), \
             href: e.getAttribute('href'), id: e.id, class: e.className};",
        )
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(browser_tests),
    ignore = "needs Chromium and ChromeDriver: set RELAY_TEST_CHROMEDRIVER (CI does, .ci/browser.sh)"
)]
async fn the_keyboard_reaches_the_skip_link_then_the_navigation() {
    let heap = FakeHeap::start().await;
    let dir = tempfile::tempdir().unwrap();
    let relay = relay(&heap, &dir);
    let browser = signed_in(&relay).await;
    browser.wait_for("#live").await;

    browser.press_tab().await;
    let first = focused(&browser).await;
    assert_eq!(first["href"], "#main", "the first Tab: {first}");
    // Focused, the skip link comes on screen.
    let (x, y, _, _) = browser.wait_for("a.skip").await.rectangle().await.unwrap();
    assert!(
        x >= 0.0 && y >= 0.0,
        "the focused skip link is off screen at {x},{y}"
    );

    let mut reached = Vec::new();
    for _ in 0..8 {
        browser.press_tab().await;
        reached.push(focused(&browser).await);
    }
    let hrefs: Vec<&str> = reached.iter().filter_map(|f| f["href"].as_str()).collect();
    let nav = [
        "/console",
        "/console/dead-letters",
        "/console/shapes",
        "/console/preview",
    ];
    assert!(
        hrefs.starts_with(&nav),
        "after the skip link, Tab goes through the navigation in order: {reached:?}"
    );
    assert!(
        reached.iter().any(|f| f["id"] == "sign-out"),
        "Tab reaches the sign-out button: {reached:?}"
    );
    browser.close().await;
}
