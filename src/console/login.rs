//! Signing in and out (contract §11). `POST /console/login` with the form field `token`: the
//! admin token, compared in constant time, starts a [session](super::session) and redirects
//! to `/console`. Attempts are slowed per client address ([`SignInLimiter`]): a burst of
//! [`SIGN_IN_BURST`], then one every [`SIGN_IN_PERIOD`], so guessing a 16-character token is
//! out of reach. The client address is the peer of the TCP connection: behind a proxy that is
//! the proxy, so all clients share one budget (slower for everyone, never faster for an
//! attacker, who could forge a forwarded-for header).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use askama::Template;
use axum::Extension;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Redirect, Response};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DashMapStateStore;
use governor::{Quota, RateLimiter};
use serde::Deserialize;
use subtle::ConstantTimeEq;

use super::guard::{self, Action};
use super::session::{COOKIE, SESSION_LIFETIME};
use crate::clock::Clock;
use crate::forwarder::limits::LimiterClock;
use crate::http::AppState;

/// Sign-in attempts one client address may make at once.
pub const SIGN_IN_BURST: u32 = 5;

/// Then one attempt per this long.
pub const SIGN_IN_PERIOD: Duration = Duration::from_secs(6);

/// Client addresses remembered before the idle ones are forgotten.
const REMEMBERED_CLIENTS: usize = 10_000;

type Limiter =
    RateLimiter<IpAddr, DashMapStateStore<IpAddr>, LimiterClock, NoOpMiddleware<Duration>>;

/// The sign-in budget per client address.
pub struct SignInLimiter {
    limiter: Limiter,
}

impl SignInLimiter {
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        #[allow(clippy::expect_used)] // constants
        let quota = Quota::with_period(SIGN_IN_PERIOD)
            .expect("a non-zero period")
            .allow_burst(NonZeroU32::new(SIGN_IN_BURST).expect("a non-zero burst"));
        SignInLimiter {
            limiter: RateLimiter::dashmap_with_clock(quota, LimiterClock::new(clock)),
        }
    }

    /// Takes one attempt from `client`'s budget; `Err(wait)` when it has none left.
    pub fn attempt(&self, client: IpAddr) -> Result<(), Duration> {
        if self.limiter.len() > REMEMBERED_CLIENTS {
            self.limiter.retain_recent();
        }
        self.limiter.check_key(&client).map_err(|not_until| {
            not_until.wait_time_from(governor::clock::Clock::now(self.limiter.clock()))
        })
    }
}

#[derive(Template)]
#[template(path = "console/login.html")]
struct LoginPage<'a> {
    /// Always `None`: nobody is signed in yet.
    nav: Option<super::Nav>,
    /// Why the last attempt failed, if it did.
    error: Option<&'a str>,
}

/// `GET /console/login`: the sign-in form (403 with no admin token; straight to the overview
/// when already signed in).
pub async fn form(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if state.admin_token.is_empty() {
        return guard::disabled();
    }
    let signed_in = guard::session_id(&headers)
        .and_then(|id| state.console.sessions.get(id, state.clock.now_ms()))
        .is_some();
    if signed_in {
        return Redirect::to("/console").into_response();
    }
    super::render(
        StatusCode::OK,
        &LoginPage {
            nav: None,
            error: None,
        },
    )
}

#[derive(Default, Deserialize)]
pub struct SignIn {
    #[serde(default)]
    token: String,
}

/// Whether the page was reached over HTTPS, as far as the relay can tell: it serves plain
/// HTTP itself, so only a proxy's `X-Forwarded-Proto: https` (or `Forwarded: proto=https`)
/// says so. Then the cookie is `Secure`.
fn over_https(headers: &HeaderMap) -> bool {
    let forwarded_proto = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .is_some_and(|proto| proto.trim().eq_ignore_ascii_case("https"));
    let forwarded = headers
        .get(header::FORWARDED)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .is_some_and(|first| {
            first.split(';').any(|pair| {
                pair.trim().split_once('=').is_some_and(|(k, v)| {
                    k.eq_ignore_ascii_case("proto")
                        && v.trim_matches('"').eq_ignore_ascii_case("https")
                })
            })
        });
    forwarded_proto || forwarded
}

/// The `Set-Cookie` value that starts a session with id `id`.
pub fn session_cookie(id: &str, secure: bool) -> String {
    format!(
        "{COOKIE}={id}; Path=/console; HttpOnly; SameSite=Strict; Max-Age={}{}",
        SESSION_LIFETIME.as_secs(),
        if secure { "; Secure" } else { "" }
    )
}

/// The `Set-Cookie` value that ends the session in the browser.
fn expired_cookie(secure: bool) -> String {
    format!(
        "{COOKIE}=; Path=/console; HttpOnly; SameSite=Strict; Max-Age=0{}",
        if secure { "; Secure" } else { "" }
    )
}

/// `POST /console/login`: 303 to `/console` with the session cookie for the right token; the
/// form again with 401 for a wrong one; 429 with `Retry-After` once the client's attempts are
/// used up; 403 for a cross-site form (a login CSRF would sign the victim in as someone else).
pub async fn sign_in(
    State(state): State<Arc<AppState>>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    uri: Uri,
    body: Bytes,
) -> Response {
    if state.admin_token.is_empty() {
        return guard::disabled();
    }
    if !guard::same_origin(&headers, &uri) {
        return guard::refused();
    }
    // Read after the checks, so a relay without a token or a foreign origin is refused as
    // such whatever the body; a body that is not a form is a sign-in without a token.
    let form: SignIn = serde_urlencoded::from_bytes(&body).unwrap_or_default();
    let client = peer.map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |Extension(c)| c.0.ip());
    if let Err(wait) = state.console.sign_in.attempt(client) {
        let seconds = wait.as_nanos().div_ceil(1_000_000_000).max(1);
        tracing::warn!(%client, retry_in_s = seconds, "console sign-in attempts slowed");
        let mut response = super::render(
            StatusCode::TOO_MANY_REQUESTS,
            &LoginPage {
                nav: None,
                error: Some("Too many attempts from this address: wait a few seconds and retry."),
            },
        );
        if let Ok(value) = HeaderValue::from_str(&seconds.to_string()) {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
        return response;
    }
    let expected = state.admin_token.expose().as_bytes();
    if !bool::from(form.token.as_bytes().ct_eq(expected)) {
        tracing::warn!(%client, "console sign-in with a wrong token");
        return super::render(
            StatusCode::UNAUTHORIZED,
            &LoginPage {
                nav: None,
                error: Some("That is not the admin token."),
            },
        );
    }
    let (id, _) = state.console.sessions.create(state.clock.now_ms());
    tracing::info!(%client, "console: signed in");
    let mut response = Redirect::to("/console").into_response();
    if let Ok(cookie) = HeaderValue::from_str(&session_cookie(&id, over_https(&headers))) {
        response.headers_mut().insert(header::SET_COOKIE, cookie);
    }
    response
}

/// `POST /console/logout`: ends the session here and in the browser.
pub async fn sign_out(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    action: Action<serde::de::IgnoredAny>,
) -> Response {
    state.console.sessions.remove(&action.session_id);
    let mut response = Redirect::to("/console/login").into_response();
    if let Ok(cookie) = HeaderValue::from_str(&expired_cookie(over_https(&headers))) {
        response.headers_mut().insert(header::SET_COOKIE, cookie);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    #[test]
    fn a_client_is_slowed_after_its_burst_and_others_are_not() {
        let clock = Arc::new(ManualClock::at_ms(0));
        let limiter = SignInLimiter::new(clock.clone());
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        for _ in 0..SIGN_IN_BURST {
            assert!(limiter.attempt(a).is_ok());
        }
        let wait = limiter.attempt(a).unwrap_err();
        assert!(wait > Duration::ZERO && wait <= SIGN_IN_PERIOD, "{wait:?}");
        assert!(limiter.attempt(b).is_ok());
        clock.advance(SIGN_IN_PERIOD);
        assert!(limiter.attempt(a).is_ok());
        assert!(limiter.attempt(a).is_err());
    }

    #[test]
    fn the_cookie_is_secure_only_behind_https() {
        let h = |name: &'static str, value: &'static str| {
            let mut map = HeaderMap::new();
            map.insert(name, value.parse().unwrap());
            map
        };
        assert!(over_https(&h("x-forwarded-proto", "https")));
        assert!(over_https(&h("x-forwarded-proto", "HTTPS, http")));
        assert!(!over_https(&h("x-forwarded-proto", "http")));
        assert!(over_https(&h("forwarded", "for=1.2.3.4;proto=https")));
        assert!(!over_https(&h("forwarded", "for=1.2.3.4;proto=http")));
        assert!(!over_https(&HeaderMap::new()));
        let cookie = session_cookie("abc", true);
        assert_eq!(
            cookie,
            "relay_console=abc; Path=/console; HttpOnly; SameSite=Strict; Max-Age=43200; Secure"
        );
        assert!(!session_cookie("abc", false).contains("Secure"));
    }
}
