//! The console (contract §11): the relay's own web pages for operators, on the admin port
//! under `/console`. Server-rendered HTML from askama templates (`templates/console/`, checked
//! at compile time, HTML-escaped by default), one stylesheet and one small script embedded in
//! the binary ([`assets`]), no inline script or style, and no request to any other origin.
//!
//! Every page calls the same code as the admin API (`dead_letters::replay`, `Queue::purge`,
//! `preview::preview`, the lanes' pause switch): the console is another face, not another
//! implementation. Rooms:
//! - [`session`]: the in-memory sessions; [`guard`]: the extractors that demand a session, and
//!   for a state-changing form also its CSRF token and a same-origin request; [`login`]: sign
//!   in and out, slowed per client address.
//! - [`activity`]: the counts and the last hour of samples the overview and its charts show;
//!   [`chart`]: those samples as SVG.
//! - Pages: [`overview`], [`letters`] (dead letters), [`shapes`], [`preview`].

pub mod activity;
pub mod assets;
pub mod chart;
pub mod guard;
pub mod letters;
pub mod login;
pub mod overview;
pub mod preview;
pub mod session;
pub mod shapes;

use std::sync::Arc;

use askama::Template;
use axum::Router;
use axum::extract::Request;
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};

use crate::http::AppState;

/// What the console keeps for itself, beside the rest of [`AppState`].
pub struct Console {
    pub sessions: session::Sessions,
    pub sign_in: login::SignInLimiter,
    pub activity: Arc<activity::Activity>,
}

impl Console {
    pub fn new(clock: Arc<dyn crate::clock::Clock>, activity: Arc<activity::Activity>) -> Self {
        Console {
            sessions: session::Sessions::default(),
            sign_in: login::SignInLimiter::new(clock),
            activity,
        }
    }
}

/// The console's routes, merged into the admin router.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/console", get(overview::page))
        .route("/console/", get(overview::page))
        .route("/console/live", get(overview::live))
        .route("/console/lanes/pause", post(overview::pause))
        .route("/console/lanes/resume", post(overview::resume))
        .route("/console/login", get(login::form).post(login::sign_in))
        .route("/console/logout", post(login::sign_out))
        .route("/console/dead-letters", get(letters::list))
        .route("/console/dead-letters/{id}", get(letters::show))
        .route("/console/dead-letters/replay", post(letters::replay))
        .route("/console/dead-letters/purge", post(letters::purge))
        .route("/console/shapes", get(shapes::page))
        .route("/console/preview", get(preview::form).post(preview::run))
        .route("/console/assets/{name}", get(assets::serve))
        .route("/console/{*rest}", get(not_found).post(not_found))
        .layer(middleware::from_fn(security_headers))
        .with_state(state)
}

/// Forbids inline scripts and styles and every foreign origin: the pages load only the
/// console's own stylesheet and script, and send forms and requests only to the console.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self'; connect-src 'self'; form-action 'self'; \
     frame-ancestors 'none'; base-uri 'none'";

/// The headers every console response carries: the CSP, no framing, no sniffing, no referrer
/// beyond the console, and no caching of pages (they show live data and the CSRF token).
async fn security_headers(request: Request, next: Next) -> Response {
    let is_asset = request.uri().path().starts_with("/console/assets/");
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    let set = |headers: &mut axum::http::HeaderMap, name: HeaderName, value: &'static str| {
        headers.insert(name, HeaderValue::from_static(value));
    };
    set(
        headers,
        header::CONTENT_SECURITY_POLICY,
        CONTENT_SECURITY_POLICY,
    );
    set(headers, header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    set(headers, header::X_FRAME_OPTIONS, "DENY");
    set(headers, header::REFERRER_POLICY, "same-origin");
    if !is_asset {
        set(headers, header::CACHE_CONTROL, "no-store");
    }
    response
}

/// What the page layout needs: the CSRF token for the sign-out form, and which page is shown
/// (for the navigation's `aria-current`).
#[derive(Debug, Clone)]
pub struct Nav {
    pub csrf: String,
    pub current: &'static str,
}

impl Nav {
    pub fn new(session: &session::Session, current: &'static str) -> Self {
        Nav {
            csrf: session.csrf.clone(),
            current,
        }
    }
}

/// A page from its template, or a 500 page if it could not be rendered (a bug: templates are
/// checked at compile time, so only a value's `Display` can fail).
pub fn render(status: StatusCode, template: &impl Template) -> Response {
    match template.render() {
        Ok(html) => (status, Html(html)).into_response(),
        Err(err) => {
            tracing::error!(error = %err, "console page could not be rendered");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                Html("<!doctype html><title>Error</title><p>The page could not be rendered.</p>"),
            )
                .into_response()
        }
    }
}

/// A page that says what went wrong, with a way back.
#[derive(Template)]
#[template(path = "console/message.html")]
pub struct MessagePage<'a> {
    /// `None` when nobody is signed in (no navigation then).
    pub nav: Option<Nav>,
    pub title: &'a str,
    pub message: &'a str,
    /// Where the "back" link goes.
    pub back: &'a str,
}

/// A message page with `status`.
pub fn message(
    status: StatusCode,
    nav: Option<Nav>,
    title: &str,
    message: &str,
    back: &str,
) -> Response {
    render(
        status,
        &MessagePage {
            nav,
            title,
            message,
            back,
        },
    )
}

async fn not_found() -> Response {
    message(
        StatusCode::NOT_FOUND,
        None,
        "Not found",
        "There is no console page here.",
        "/console",
    )
}

/// A millisecond Unix time as an operator reads it: `2026-12-02 01:54:08 UTC`.
pub fn format_time(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_else(|| ms.to_string())
}

/// A duration in seconds as an operator reads it: `45 s`, `12 min`, `3 h 20 min`.
pub fn format_age(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min", s / 60),
        _ => format!("{} h {} min", s / 3600, (s % 3600) / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_and_ages_read_as_an_operator_expects() {
        assert_eq!(format_time(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(format_age(0.4), "0 s");
        assert_eq!(format_age(59.0), "59 s");
        assert_eq!(format_age(61.0), "1 min");
        assert_eq!(format_age(3.0 * 3600.0 + 20.0 * 60.0 + 5.0), "3 h 20 min");
        assert_eq!(format_age(-5.0), "0 s");
    }
}
