//! The preview page (contract §11): paste a payload, pick a source, see the Heap requests
//! the relay would send, or why it would quarantine or filter the webhook. It runs the same
//! preview as `POST /admin/preview` ([`crate::http::admin::live_preview`]): the sources in
//! force now, the batch size the forwarder uses, nothing verified, queued or sent.

use std::sync::Arc;

use askama::Template;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use bytes::Bytes;
use serde::Deserialize;

use super::guard::{Action, Viewer};
use super::letters::{Choice, configured_sources};
use super::{Nav, render};
use crate::config::DEFAULT_SOURCE;
use crate::http::AppState;
use crate::http::admin::live_preview;
use crate::preview::{LivePreviewError, Preview};

const NAV: &str = "preview";

/// The preview form (its `csrf` field is read by the guard).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct PreviewForm {
    pub source: String,
    pub payload: String,
}

/// One Heap request as the page shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestShown {
    pub endpoint: &'static str,
    /// The body, pretty-printed.
    pub body: String,
}

/// What the page says the relay would do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Accepted(Vec<RequestShown>),
    Quarantined { reason: String, detail: String },
    Filtered,
}

/// A preview's result, with the admin API's answer beside it.
#[derive(Debug, Clone)]
pub struct Shown {
    pub outcome: Outcome,
    /// `POST /admin/preview`'s JSON answer for the same payload, pretty-printed.
    pub json: String,
}

fn pretty(value: &serde_json::Value) -> String {
    serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
}

impl From<Preview> for Shown {
    fn from(preview: Preview) -> Self {
        let json = pretty(&preview.to_json());
        let outcome = match preview {
            Preview::Accepted { requests } => Outcome::Accepted(
                requests
                    .iter()
                    .map(|request| RequestShown {
                        endpoint: request.endpoint,
                        body: pretty(&request.body),
                    })
                    .collect(),
            ),
            Preview::Quarantined { reason, detail } => Outcome::Quarantined { reason, detail },
            Preview::Filtered => Outcome::Filtered,
        };
        Shown { outcome, json }
    }
}

#[derive(Template)]
#[template(path = "console/preview.html")]
pub struct PreviewPage {
    pub nav: Option<Nav>,
    pub csrf: String,
    pub sources: Vec<Choice>,
    /// The payload as pasted, to keep it in the textarea.
    pub payload: String,
    /// Why the preview could not be made.
    pub error: Option<String>,
    pub result: Option<Shown>,
}

impl PreviewPage {
    /// The form for `source` (the default source when empty and configured, else the first).
    fn new(state: &AppState, nav: Nav, source: &str, payload: String) -> Self {
        let names = configured_sources(state);
        let chosen = if names.iter().any(|name| name == source) {
            source.to_owned()
        } else if names.iter().any(|name| name == DEFAULT_SOURCE) {
            DEFAULT_SOURCE.to_owned()
        } else {
            names.first().cloned().unwrap_or_default()
        };
        PreviewPage {
            csrf: nav.csrf.clone(),
            nav: Some(nav),
            sources: names
                .into_iter()
                .map(|name| Choice {
                    selected: name == chosen,
                    label: name.clone(),
                    value: name,
                })
                .collect(),
            payload,
            error: None,
            result: None,
        }
    }

    fn refused(mut self, status: StatusCode, error: String) -> Response {
        self.error = Some(error);
        render(status, &self)
    }
}

/// `GET /console/preview`: the empty form.
pub async fn form(State(state): State<Arc<AppState>>, viewer: Viewer) -> Response {
    let nav = Nav::new(&viewer.session, NAV);
    render(
        StatusCode::OK,
        &PreviewPage::new(&state, nav, DEFAULT_SOURCE, String::new()),
    )
}

/// `POST /console/preview`: the form again with the preview, or with why there is none
/// (400 for a payload that is not a JSON object, 404 for a source not configured, 413 beyond
/// `server.max_body_bytes`, 503 when no transform worker could run).
pub async fn run(State(state): State<Arc<AppState>>, action: Action<PreviewForm>) -> Response {
    let nav = Nav::new(&action.session, NAV);
    let PreviewForm { source, payload } = action.form;
    let name = source.trim().to_owned();
    let page = PreviewPage::new(&state, nav, &name, payload);
    let Some(previewer) = live_preview(&state, &name) else {
        let shown: String = name.chars().take(64).collect();
        return page.refused(
            StatusCode::NOT_FOUND,
            format!("No source `{shown}` is configured."),
        );
    };
    if page.payload.len() > state.max_body_bytes {
        let error = format!(
            "The payload is larger than the relay accepts ({} bytes, server.max_body_bytes).",
            state.max_body_bytes
        );
        return page.refused(StatusCode::PAYLOAD_TOO_LARGE, error);
    }
    let payload = Bytes::from(page.payload.clone());
    match previewer.run(payload, state.clock.now()).await {
        Ok(preview) => {
            let mut page = page;
            page.result = Some(Shown::from(preview));
            render(StatusCode::OK, &page)
        }
        Err(err @ LivePreviewError::InvalidJson) => {
            page.refused(StatusCode::BAD_REQUEST, format!("Not previewed: {err}."))
        }
        Err(err @ LivePreviewError::Unavailable) => page.refused(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("Not previewed: {err}."),
        ),
    }
}
