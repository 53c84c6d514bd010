//! A real browser for the console's tests (contract §11): headless Chromium driven through
//! ChromeDriver (WebDriver, with the `fantoccini` client), and the few things every browser
//! test does with it: sign in through the form, wait for an element or a text with a deadline
//! (polling, never a fixed sleep), read a text, run a line of script.
//!
//! Each [`Browser`] starts its own `chromedriver --port=N` on a free port, in a process group of
//! its own, with a browser profile in a folder of its own. Dropping it kills that whole group
//! (ChromeDriver and every Chromium process it started), also when the test failed, and
//! removes the profile.
//!
//! The browser tests are ignored unless `RELAY_TEST_CHROMEDRIVER` was set when they were built
//! (`build.rs` then turns on `cfg(browser_tests)`; `.ci/browser.sh` installs both programs
//! and sets it); they run the driver that variable names, and the browser `RELAY_TEST_CHROMIUM`
//! names (else `/usr/bin/chromium`).

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::actions::{InputSource, KeyAction, KeyActions};
use fantoccini::elements::Element;
use fantoccini::key::Key;
use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::{Value, json};

use super::{ADMIN_TOKEN, eventually};

/// The variable naming ChromeDriver (its presence at build time turns the browser tests on).
pub const DRIVER_VAR: &str = "RELAY_TEST_CHROMEDRIVER";

/// The variable naming the Chromium binary, when not [`DEFAULT_CHROMIUM`].
pub const CHROMIUM_VAR: &str = "RELAY_TEST_CHROMIUM";

/// Debian's Chromium.
pub const DEFAULT_CHROMIUM: &str = "/usr/bin/chromium";

/// How long a browser test waits for what a page should show. Generous: the machine has two
/// cores shared with compilers, and Chromium is slow to paint under load.
pub const WAIT: Duration = Duration::from_secs(15);

/// How long ChromeDriver may take to listen, and Chromium to start a session.
const STARTUP: Duration = Duration::from_secs(30);

/// A headless Chromium, through its own ChromeDriver.
pub struct Browser {
    /// The WebDriver session, for what the helpers below do not cover.
    pub client: Client,
    driver: Child,
    /// Chromium's profile (cookies, cache), removed on drop.
    _profile: tempfile::TempDir,
}

/// ChromeDriver's path, from [`DRIVER_VAR`]. Only browser tests call it, and they are ignored
/// unless the variable was set at build time, so it is missing only when it was unset between
/// build and run.
fn driver_path() -> String {
    match std::env::var(DRIVER_VAR) {
        Ok(path) if !path.trim().is_empty() => path,
        _ => panic!(
            "{DRIVER_VAR} is not set, but this test binary was built with it (cfg \
             browser_tests): set it again (`source .ci/browser.sh`), or rebuild without it to \
             ignore the browser tests"
        ),
    }
}

fn chromium_path() -> String {
    std::env::var(CHROMIUM_VAR)
        .ok()
        .filter(|path| !path.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_CHROMIUM.to_owned())
}

/// A port nobody listens on now (the kernel's choice for port 0, released at once).
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// What the page is shown on.
#[derive(Debug, Clone, Copy)]
pub enum Screen {
    /// A window of `width`×`height` CSS pixels.
    Window(u32, u32),
    /// A phone's screen of `width`×`height` CSS pixels (Chromium's device emulation: a
    /// window cannot be made narrower than 500 pixels, and a phone honours the page's
    /// `viewport` meta tag).
    Phone(u32, u32),
}

/// A laptop's window (the default).
pub const LAPTOP: Screen = Screen::Window(1280, 900);

/// A common phone, 390×844 CSS pixels.
pub const PHONE: Screen = Screen::Phone(390, 844);

/// The capabilities of a headless Chromium on `screen`, its profile in `profile`.
/// `--no-sandbox`: CI runs as root, where Chromium's sandbox refuses to start.
fn capabilities(screen: Screen, profile: &std::path::Path) -> serde_json::Map<String, Value> {
    let (Screen::Window(width, height) | Screen::Phone(width, height)) = screen;
    let mut options = json!({
        "binary": chromium_path(),
        "args": [
            "--headless=new",
            "--no-sandbox",
            "--disable-dev-shm-usage",
            "--disable-gpu",
            "--no-first-run",
            "--disable-extensions",
            format!("--window-size={width},{height}"),
            format!("--user-data-dir={}", profile.display()),
        ],
    });
    if let Screen::Phone(width, height) = screen {
        options["mobileEmulation"] = json!({
            "deviceMetrics": {
                "width": width,
                "height": height,
                "pixelRatio": 3.0,
                "touch": true,
                "mobile": true,
            },
        });
    }
    let mut capabilities = serde_json::Map::new();
    capabilities.insert("browserName".into(), json!("chrome"));
    capabilities.insert("goog:chromeOptions".into(), options);
    capabilities
}

impl Browser {
    /// A browser with a laptop's window.
    pub async fn start() -> Browser {
        Self::start_on(LAPTOP).await
    }

    /// A browser showing pages on `screen`.
    pub async fn start_on(screen: Screen) -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let (mut starting, webdriver) = Starting::driver(profile.path()).await;
        let client = ClientBuilder::new(HttpConnector::new())
            .capabilities(capabilities(screen, profile.path()))
            .connect(&webdriver)
            .await
            .unwrap_or_else(|e| panic!("ChromeDriver could not start Chromium: {e}"));
        Browser {
            client,
            driver: starting.driver.take().unwrap(),
            _profile: profile,
        }
    }

    /// Opens `url` and waits for it to load.
    pub async fn goto(&self, url: &str) {
        self.client
            .goto(url)
            .await
            .unwrap_or_else(|e| panic!("open {url}: {e}"));
    }

    /// The path of the page shown now (`/console/login`).
    pub async fn path(&self) -> String {
        self.client.current_url().await.unwrap().path().to_owned()
    }

    /// Signs in through the console's form at `admin_url` with the admin token, and waits
    /// until the browser has left the sign-in page.
    pub async fn sign_in(&self, admin_url: &str) {
        self.goto(&format!("{admin_url}/console/login")).await;
        self.wait_for("input#token")
            .await
            .send_keys(ADMIN_TOKEN)
            .await
            .unwrap();
        self.click("button#sign-in").await;
        eventually(WAIT, async || {
            let path = self.path().await;
            (path != "/console/login").then_some(()).ok_or(path)
        })
        .await;
    }

    /// The first element matching `css`, once there is one.
    pub async fn wait_for(&self, css: &str) -> Element {
        eventually(WAIT, async || self.find(css).await).await
    }

    /// The first element matching `css` now, or why there is none.
    async fn find(&self, css: &str) -> Result<Element, String> {
        match self.client.find(Locator::Css(css)).await {
            Ok(element) => Ok(element),
            Err(e) => Err(format!("no {css} on {}: {e}", self.describe().await)),
        }
    }

    /// The text of the first element matching `css`, once there is one whose text satisfies
    /// `wanted`; the test fails with the last text seen when none does within [`WAIT`].
    pub async fn wait_for_text(&self, css: &str, wanted: impl Fn(&str) -> bool) -> String {
        eventually(WAIT, async || match self.try_text(css).await {
            Ok(text) if wanted(&text) => Ok(text),
            Ok(text) => Err(format!("{css} reads {text:?}")),
            Err(e) => Err(e),
        })
        .await
    }

    /// The text of the first element matching `css` (waiting for it to be there).
    pub async fn text(&self, css: &str) -> String {
        self.wait_for(css).await.text().await.unwrap()
    }

    async fn try_text(&self, css: &str) -> Result<String, String> {
        self.find(css)
            .await?
            .text()
            .await
            .map_err(|e| format!("{css}: {e}"))
    }

    /// Clicks the first element matching `css` (waiting for it to be there).
    pub async fn click(&self, css: &str) {
        self.wait_for(css)
            .await
            .click()
            .await
            .unwrap_or_else(|e| panic!("click {css}: {e}"));
    }

    /// Runs `script` (a function body: `return ...` gives a value) in the page.
    pub async fn execute(&self, script: &str) -> Value {
        self.client
            .execute(script, Vec::new())
            .await
            .unwrap_or_else(|e| panic!("script {script:?}: {e}"))
    }

    /// Presses and releases Tab, as a person moving the focus with the keyboard.
    pub async fn press_tab(&self) {
        let tab: char = Key::Tab.into();
        let keys = KeyActions::new("keyboard".into())
            .then(KeyAction::Down { value: tab })
            .then(KeyAction::Up { value: tab });
        self.client.perform_actions(keys).await.unwrap();
    }

    /// The page's address and title, for a failure message.
    async fn describe(&self) -> String {
        let url = self
            .client
            .current_url()
            .await
            .map_or_else(|e| e.to_string(), |url| url.to_string());
        let title = self.client.title().await.unwrap_or_default();
        format!("{url} ({title:?})")
    }

    /// Ends the WebDriver session (Chromium quits); drop then ends ChromeDriver.
    pub async fn close(self) {
        let _ = self.client.clone().close().await;
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        kill_group(&mut self.driver);
    }
}

/// ChromeDriver until a session was made: killed if starting fails.
struct Starting {
    driver: Option<Child>,
}

/// Tries at starting ChromeDriver: another test may take the free port before it binds it.
const DRIVER_TRIES: usize = 3;

impl Starting {
    /// ChromeDriver listening on a free port, with `profile` as its temporary folder; and its
    /// URL.
    async fn driver(profile: &std::path::Path) -> (Starting, String) {
        let mut exits = Vec::new();
        for _ in 0..DRIVER_TRIES {
            let port = free_port();
            let mut starting = Starting {
                driver: Some(spawn_driver(port, profile)),
            };
            let webdriver = format!("http://127.0.0.1:{port}");
            match starting.listening(&webdriver).await {
                Ok(()) => return (starting, webdriver),
                Err(exit) => exits.push(exit),
            }
        }
        panic!("ChromeDriver exited at start, {DRIVER_TRIES} times: {exits:?}");
    }

    /// Waits until ChromeDriver at `webdriver` answers its status (it takes a moment to
    /// listen); `Err` when it exited first (its port was taken), and fails the test when it
    /// does not answer within [`STARTUP`].
    async fn listening(&mut self, webdriver: &str) -> Result<(), String> {
        let http = reqwest::Client::new();
        let deadline = Instant::now() + STARTUP;
        loop {
            let driver = self.driver.as_mut().unwrap();
            if let Some(status) = driver.try_wait().unwrap() {
                return Err(status.to_string());
            }
            let ready = http
                .get(format!("{webdriver}/status"))
                .timeout(Duration::from_secs(2))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ready {
                return Ok(());
            }
            assert!(
                Instant::now() < deadline,
                "ChromeDriver did not listen on {webdriver} within {STARTUP:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// `chromedriver --port=port`, logging into `profile`.
fn spawn_driver(port: u16, profile: &std::path::Path) -> Child {
    Command::new(driver_path())
        .arg(format!("--port={port}"))
        .arg(format!(
            "--log-path={}",
            profile.join("chromedriver.log").display()
        ))
        // Its own process group, so that drop can kill Chromium with it; and its own
        // temporary folder (Chromium's too), removed with the profile even after a kill.
        .process_group(0)
        .env("TMPDIR", profile)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", driver_path()))
}

impl Drop for Starting {
    fn drop(&mut self) {
        if let Some(driver) = self.driver.as_mut() {
            kill_group(driver);
        }
    }
}

/// Kills the process group `leader` leads (ChromeDriver, and the Chromium it started, which
/// stays in that group) and reaps the leader. Not once the leader was reaped: its number may
/// then name someone else's group.
fn kill_group(leader: &mut Child) {
    if !matches!(leader.try_wait(), Ok(None)) {
        return;
    }
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{}", leader.id())])
        .stderr(Stdio::null())
        .status();
    let _ = leader.kill();
    let _ = leader.wait();
}
