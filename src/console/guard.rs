//! Who may see and do what on the console. Two extractors:
//! - [`Viewer`]: a page or fragment that only reads. It needs a live session; without one a
//!   page redirects to the sign-in form (the fragment answers 401, so the script can go
//!   there too).
//! - [`Action<T>`]: a form that changes state (pause, replay, purge, preview, sign out). It
//!   needs a same-origin request ([`same_origin`]), a live session, and the session's CSRF
//!   token in the form's `csrf` field, compared in constant time; then the form as `T`.
//!
//! With no `admin.token` configured, both answer 403, as `/admin` does. The session cookie is
//! `SameSite=Strict`, so another site's form does not carry it at all; the origin check and
//! the CSRF token also refuse a request from another port of the same host (the same "site"
//! to a browser) and from a browser that ignores `SameSite`.

use std::sync::Arc;

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Redirect, Response};
use serde::de::DeserializeOwned;
use subtle::ConstantTimeEq;

use super::session::{COOKIE, Session};
use crate::http::AppState;

/// The most bytes of a console form: a preview's payload plus the form's other fields.
fn max_form_bytes(state: &AppState) -> usize {
    state
        .max_body_bytes
        .saturating_mul(4)
        .saturating_add(64 * 1024)
}

/// A signed-in operator looking at a page.
pub struct Viewer {
    pub session: Session,
}

/// A signed-in operator sending a state-changing form `T` that passed every check.
pub struct Action<T> {
    pub session: Session,
    /// The session's cookie id (for signing out).
    pub session_id: String,
    pub form: T,
}

/// 403 for a relay without an admin token.
pub fn disabled() -> Response {
    super::message(
        StatusCode::FORBIDDEN,
        None,
        "Console disabled",
        "No admin token is configured (admin.token), so the console and the admin API are off.",
        "/console/login",
    )
}

/// The value of the session cookie in `headers`, if any.
pub fn session_id(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value)
}

/// The host the browser sent the request to: a proxy's `X-Forwarded-Host` when there is one
/// (nginx, for one, rewrites `Host` to its upstream's unless told otherwise), else `Host`,
/// else the request's authority (HTTP/2 sends `:authority`, not `Host`). Trusting the
/// forwarded header is safe here: a form cannot set headers, and a script of another origin
/// that sets one needs a CORS preflight, which the relay never grants.
fn requested_host<'a>(headers: &'a HeaderMap, uri: &'a Uri) -> Option<&'a str> {
    let header = |name| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(',').next())
            .map(str::trim)
    };
    header("x-forwarded-host")
        .or_else(|| header(header::HOST.as_str()))
        .or_else(|| uri.authority().map(|a| a.as_str()))
}

/// Whether the request comes from a page of this origin. `Origin`, when the browser sends it,
/// must name the host the request was sent to ([`requested_host`]; the scheme is not
/// compared: behind a TLS proxy the relay sees plain HTTP). `Sec-Fetch-Site`, when sent, must
/// be `same-origin` (or `none`: typed in the address bar). A request with neither (curl, an
/// old browser) passes here and still needs the session and its CSRF token.
pub fn same_origin(headers: &HeaderMap, uri: &Uri) -> bool {
    if let Some(site) = headers.get("sec-fetch-site")
        && !matches!(site.as_bytes(), b"same-origin" | b"none")
    {
        return false;
    }
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let Some(host) = requested_host(headers, uri) else {
        return false;
    };
    let Ok(origin) = origin.to_str() else {
        return false;
    };
    origin
        .split_once("://")
        .is_some_and(|(_, authority)| authority.eq_ignore_ascii_case(host))
}

/// The live session the request's cookie names, if any.
fn current_session(state: &AppState, headers: &HeaderMap) -> Option<(String, Session)> {
    let id = session_id(headers)?;
    let session = state.console.sessions.get(id, state.clock.now_ms())?;
    Some((id.to_owned(), session))
}

/// Whether the request is the console's own script asking for a fragment.
fn is_fragment_request(parts: &Parts) -> bool {
    parts.uri.path() == "/console/live"
}

impl FromRequestParts<Arc<AppState>> for Viewer {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        if state.admin_token.is_empty() {
            return Err(disabled());
        }
        match current_session(state, &parts.headers) {
            Some((_, session)) => Ok(Viewer { session }),
            None if is_fragment_request(parts) => {
                Err((StatusCode::UNAUTHORIZED, "signed out").into_response())
            }
            None => Err(Redirect::to("/console/login").into_response()),
        }
    }
}

/// The `csrf` field every console form carries, whatever else it holds.
#[derive(serde::Deserialize)]
struct CsrfField {
    #[serde(default)]
    csrf: String,
}

/// 403: the request was not the console's own.
pub fn refused() -> Response {
    super::message(
        StatusCode::FORBIDDEN,
        None,
        "Request refused",
        "This request did not come from a console page (another site, or an old page): \
         nothing was changed. Open the page again and retry.",
        "/console",
    )
}

impl<T> FromRequest<Arc<AppState>> for Action<T>
where
    T: DeserializeOwned,
{
    type Rejection = Response;

    async fn from_request(
        request: Request,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        if state.admin_token.is_empty() {
            return Err(disabled());
        }
        if !same_origin(request.headers(), request.uri()) {
            tracing::warn!("console: cross-site request refused");
            return Err(refused());
        }
        let Some((session_id, session)) = current_session(state, request.headers()) else {
            return Err(Redirect::to("/console/login").into_response());
        };
        let Ok(body) = axum::body::to_bytes(request.into_body(), max_form_bytes(state)).await
        else {
            return Err(super::message(
                StatusCode::PAYLOAD_TOO_LARGE,
                None,
                "Too large",
                "The form is larger than the relay accepts.",
                "/console",
            ));
        };
        let presented = serde_urlencoded::from_bytes::<CsrfField>(&body)
            .map(|f| f.csrf)
            .unwrap_or_default();
        if !bool::from(presented.as_bytes().ct_eq(session.csrf.as_bytes())) {
            tracing::warn!("console: form without this session's CSRF token refused");
            return Err(refused());
        }
        match serde_urlencoded::from_bytes::<T>(&body) {
            Ok(form) => Ok(Action {
                session,
                session_id,
                form,
            }),
            Err(err) => Err(super::message(
                StatusCode::BAD_REQUEST,
                None,
                "Bad form",
                &format!("The form could not be read: {err}."),
                "/console",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, value.parse().unwrap());
        }
        map
    }

    #[test]
    fn the_origin_must_name_the_host_the_request_went_to() {
        let path: Uri = "/console/login".parse().unwrap();
        let h = |origin| headers(&[("host", "relay:9091"), ("origin", origin)]);
        assert!(same_origin(&h("http://relay:9091"), &path));
        assert!(same_origin(&h("https://RELAY:9091"), &path));
        assert!(!same_origin(&h("http://relay:9092"), &path));
        assert!(!same_origin(&h("http://evil.example"), &path));
        assert!(!same_origin(&h("null"), &path));
        assert!(same_origin(&headers(&[("host", "relay:9091")]), &path));
        assert!(!same_origin(
            &headers(&[("origin", "http://relay:9091")]),
            &path
        ));
    }

    #[test]
    fn behind_a_proxy_the_forwarded_host_is_the_one_compared() {
        let path: Uri = "/console/login".parse().unwrap();
        let proxied = |origin| {
            headers(&[
                ("host", "127.0.0.1:9090"),
                ("x-forwarded-host", "relay.internal"),
                ("origin", origin),
            ])
        };
        assert!(same_origin(&proxied("https://relay.internal"), &path));
        assert!(!same_origin(&proxied("http://127.0.0.1:9090"), &path));
        assert!(!same_origin(&proxied("https://evil.example"), &path));
    }

    #[test]
    fn an_http2_request_is_compared_with_its_authority() {
        let uri: Uri = "http://relay:9091/console/login".parse().unwrap();
        let h = |origin| headers(&[("origin", origin)]);
        assert!(same_origin(&h("http://relay:9091"), &uri));
        assert!(!same_origin(&h("http://evil.example"), &uri));
    }

    #[test]
    fn fetch_metadata_from_another_site_is_refused() {
        let path: Uri = "/console".parse().unwrap();
        let h = |site| headers(&[("host", "relay"), ("sec-fetch-site", site)]);
        assert!(same_origin(&h("same-origin"), &path));
        assert!(same_origin(&h("none"), &path));
        assert!(!same_origin(&h("same-site"), &path));
        assert!(!same_origin(&h("cross-site"), &path));
    }

    #[test]
    fn the_session_cookie_is_found_among_others() {
        let h = headers(&[("cookie", "a=1; relay_console=abc; b=2")]);
        assert_eq!(session_id(&h), Some("abc"));
        let h = headers(&[("cookie", "a=1"), ("cookie", "relay_console=xyz")]);
        assert_eq!(session_id(&h), Some("xyz"));
        assert_eq!(
            session_id(&headers(&[("cookie", "relay_consolex=1")])),
            None
        );
        assert_eq!(session_id(&HeaderMap::new()), None);
    }
}
