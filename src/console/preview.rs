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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::console::letters::tests::assert_escaped;
    use crate::preview::HeapRequest;

    const SCRIPT: &str = "<script>alert(1)</script>";

    fn page(payload: &str, error: Option<String>, result: Option<Preview>) -> String {
        PreviewPage {
            nav: Some(Nav {
                csrf: "token-1".into(),
                current: NAV,
            }),
            csrf: "token-1".into(),
            sources: vec![Choice {
                value: "default".into(),
                label: "default".into(),
                selected: true,
            }],
            payload: payload.into(),
            error,
            result: result.map(Shown::from),
        }
        .render()
        .unwrap()
    }

    #[test]
    fn requests_are_shown_with_their_endpoint_and_the_payload_is_kept_escaped() {
        let payload = format!(r#"{{"data": {{"note": "{SCRIPT}"}}}}"#);
        let accepted = Preview::Accepted {
            requests: vec![HeapRequest {
                endpoint: "/api/track",
                body: serde_json::json!({"app_id": "42", "events": [{"event": SCRIPT}]}),
            }],
        };
        let html = page(&payload, None, Some(accepted));
        assert_escaped(&html);
        assert!(html.contains(r#"<section id="preview-result">"#));
        assert!(html.contains(
            r#"<pre class="preview-request">POST <span class="preview-endpoint">/api/track</span>"#
        ));
        assert!(
            html.contains("&#34;app_id&#34;: &#34;42&#34;"),
            "pretty JSON"
        );
        // The payload stays in the textarea (as text), for the next run.
        assert!(html.contains("&#34;note&#34;: &#34;&#60;script&#62;"));
        assert!(html.contains(r#"<input type="hidden" name="csrf" value="token-1">"#));
        for id in [
            "preview-form",
            "preview-source",
            "preview-payload",
            "preview-run",
        ] {
            assert!(html.contains(&format!(r#"id="{id}""#)), "{id}");
        }
    }

    #[test]
    fn a_quarantine_shows_the_reason_and_a_filter_says_filtered() {
        let quarantined = Preview::Quarantined {
            reason: "no_kind".into(),
            detail: format!("no kind in {SCRIPT}"),
        };
        let html = page("{}", None, Some(quarantined));
        assert_escaped(&html);
        assert!(html.contains(r#"<div id="preview-quarantined">"#));
        assert!(html.contains(r#"<code class="preview-reason">no_kind</code>"#));
        let html = page("{}", None, Some(Preview::Filtered));
        assert!(html.contains(r#"<p id="preview-filtered">filtered"#));
        assert!(!html.contains("preview-request"));
    }

    #[test]
    fn an_error_is_shown_with_the_form_and_no_result() {
        let error = format!("Not previewed: {}.", LivePreviewError::InvalidJson);
        let html = page("{not json", Some(error), None);
        assert!(html.contains(r#"id="preview-error""#));
        assert!(html.contains("the payload is not a JSON object"));
        assert!(html.contains("{not json</textarea>"));
        assert!(!html.contains("preview-result"));
    }
}
