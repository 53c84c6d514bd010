//! The overview page (contract §11): per source and app id, what arrives and what leaves,
//! the queue, the forwarder's state and Heap's last error; pause and resume.
//!
//! `GET /console` is the layout around the live region, which holds the fragment
//! `GET /console/live` answers (the same template, rendered in place), so the page is whole
//! without script and the console's script refreshes the region every 2 s. What the fragment
//! shows is read at once ([`gather`]) and shaped by pure code ([`Live::new`]), so it can be
//! checked from hand-made facts. Pause and resume call [`Lanes::switch`], as the admin API does.
//!
//! [`Lanes::switch`]: crate::forwarder::lanes::Lanes::switch

use std::sync::Arc;

use askama::Template;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use serde::Deserialize;

use super::activity::{self, Sample};
use super::chart::{Chart, Series};
use super::guard::{Action, Viewer};
use super::{Nav, format_age, format_time, render};
use crate::forwarder::{ForwarderState, HeapError};
use crate::http::AppState;
use crate::telemetry::WEBHOOK_OUTCOMES;

/// A configured source, as the overview names it.
#[derive(Debug, Clone)]
pub struct SourceFacts {
    pub name: String,
    pub path: String,
    pub app_id: String,
}

/// A lane's forwarder, as read from its [`crate::forwarder::Control`].
#[derive(Debug, Clone)]
pub struct LaneFacts {
    pub app_id: String,
    pub state: ForwarderState,
    pub backoff_until_ms: Option<i64>,
    pub last_error: Option<HeapError>,
}

/// Everything the live region is made from.
#[derive(Debug, Clone)]
pub struct Facts {
    /// The totals now (and the clock: `now.at_ms`).
    pub now: Sample,
    /// The samples of the last hour, oldest first.
    pub history: Vec<Arc<Sample>>,
    pub sources: Vec<SourceFacts>,
    pub lanes: Vec<LaneFacts>,
}

/// Reads the facts of the process now: one scan of the queue.
pub async fn gather(state: &AppState) -> Facts {
    let now = activity::sample(state).await;
    let sources = state
        .sources
        .current()
        .iter()
        .map(|source| SourceFacts {
            name: source.name.clone(),
            path: source.path.clone(),
            app_id: source.app_id.as_str().to_owned(),
        })
        .collect();
    let lanes = state
        .lanes
        .all()
        .into_iter()
        .map(|(app_id, control)| LaneFacts {
            app_id,
            state: control.state(),
            backoff_until_ms: control.backoff_until_ms(),
            last_error: control.last_heap_error(),
        })
        .collect();
    Facts {
        now,
        history: state.console.activity.history(),
        sources,
        lanes,
    }
}

/// Webhooks per minute with one outcome.
#[derive(Debug, Clone)]
pub struct OutcomeRate {
    pub outcome: &'static str,
    pub per_minute: u64,
}

/// A source's card.
#[derive(Debug, Clone)]
pub struct SourceRow {
    pub name: String,
    pub path: String,
    pub app_id: String,
    /// Webhooks per minute, every outcome together.
    pub per_minute: u64,
    /// One per outcome of `relay_webhooks_total`, in its order.
    pub outcomes: Vec<OutcomeRate>,
    /// Webhooks answered since start.
    pub total: u64,
}

/// One count of a lane's queue.
#[derive(Debug, Clone)]
pub struct QueueCell {
    pub label: &'static str,
    /// `queue-pending`, `queue-in-flight`, `queue-delivered`, `queue-dead`.
    pub class: &'static str,
    /// An integer, or `unknown` when the queue could not be read.
    pub value: String,
}

/// Heap's last error as shown.
#[derive(Debug, Clone)]
pub struct ErrorRow {
    pub at: String,
    /// `HTTP 503`, or `no answer`.
    pub status: String,
    pub text: String,
}

/// A lane's card.
#[derive(Debug, Clone)]
pub struct LaneRow {
    pub app_id: String,
    /// `running`, `paused`, `backing off until HH:MM:SS UTC`.
    pub state_word: String,
    /// `ok` or `warn`: the colour beside the word.
    pub state_class: &'static str,
    pub paused: bool,
    pub queue: Vec<QueueCell>,
    /// How long the oldest record not delivered has waited, or `none`.
    pub oldest_pending: String,
    pub events_per_minute: u64,
    pub last_error: Option<ErrorRow>,
}

/// What the live region shows.
#[derive(Debug, Clone)]
pub struct Live {
    /// The session's token, for the pause and resume forms.
    pub csrf: String,
    /// When the facts were read.
    pub updated: String,
    pub queue_readable: bool,
    pub sources: Vec<SourceRow>,
    pub lanes: Vec<LaneRow>,
    pub charts: Vec<Chart>,
}

/// `HH:MM:SS UTC` of a unix ms time (today's backoff ends: the date adds nothing).
fn clock_time(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%H:%M:%S UTC").to_string())
        .unwrap_or_else(|| ms.to_string())
}

/// The forwarder's state as a word and a colour class.
fn state_word(lane: &LaneFacts) -> (String, &'static str) {
    match (lane.state, lane.backoff_until_ms) {
        (ForwarderState::Running, _) => ("running".to_owned(), "ok"),
        (ForwarderState::Paused, _) => ("paused".to_owned(), "warn"),
        (ForwarderState::BackingOff, Some(until)) => {
            (format!("backing off until {}", clock_time(until)), "warn")
        }
        (ForwarderState::BackingOff, None) => ("backing off".to_owned(), "warn"),
    }
}

fn error_row(error: &HeapError) -> ErrorRow {
    ErrorRow {
        at: format_time(error.at_ms),
        status: error
            .status
            .map_or_else(|| "no answer".to_owned(), |status| format!("HTTP {status}")),
        text: error.text.clone(),
    }
}

fn queue_cells(stats: Option<&crate::queue::QueueStats>) -> Vec<QueueCell> {
    let count = |pick: fn(&crate::queue::QueueStats) -> u64| {
        stats.map_or_else(|| "unknown".to_owned(), |s| pick(s).to_string())
    };
    vec![
        QueueCell {
            label: "Pending",
            class: "queue-pending",
            value: count(|s| s.pending),
        },
        QueueCell {
            label: "In flight",
            class: "queue-in-flight",
            value: count(|s| s.in_flight),
        },
        QueueCell {
            label: "Delivered",
            class: "queue-delivered",
            value: count(|s| s.delivered),
        },
        QueueCell {
            label: "Dead",
            class: "queue-dead",
            value: count(|s| s.dead),
        },
    ]
}

impl Live {
    pub fn new(facts: &Facts, csrf: String) -> Live {
        let now = &facts.now;
        let history = &facts.history;
        let sources = facts
            .sources
            .iter()
            .map(|source| SourceRow {
                per_minute: activity::per_minute_now(history, now, |s| {
                    s.source_total(&source.name)
                }),
                outcomes: WEBHOOK_OUTCOMES
                    .iter()
                    .map(|&outcome| OutcomeRate {
                        outcome,
                        per_minute: activity::per_minute_now(history, now, |s| {
                            s.source_outcome(&source.name, outcome)
                        }),
                    })
                    .collect(),
                total: now.source_total(&source.name),
                name: source.name.clone(),
                path: source.path.clone(),
                app_id: source.app_id.clone(),
            })
            .collect();
        let lanes = facts
            .lanes
            .iter()
            .map(|lane| {
                let (state_word, state_class) = state_word(lane);
                let stats = now.lane_queue(&lane.app_id);
                LaneRow {
                    state_word,
                    state_class,
                    paused: lane.state == ForwarderState::Paused,
                    queue: queue_cells(stats),
                    oldest_pending: stats
                        .and_then(|s| s.oldest_pending_age_seconds(now.at_ms))
                        .map_or_else(|| "none".to_owned(), format_age),
                    events_per_minute: activity::per_minute_now(history, now, |s| {
                        s.lane_forwarded(&lane.app_id)
                    }),
                    last_error: lane.last_error.as_ref().map(error_row),
                    app_id: lane.app_id.clone(),
                }
            })
            .collect();
        Live {
            csrf,
            updated: format_time(now.at_ms),
            queue_readable: now.queue.is_some(),
            sources,
            lanes,
            charts: charts(facts),
        }
    }
}

/// Throughput over the last hour, then the queue depth of each lane.
fn charts(facts: &Facts) -> Vec<Chart> {
    let mut samples = facts.history.clone();
    samples.push(Arc::new(facts.now.clone()));
    let end_ms = facts.now.at_ms;
    let series = |label: &str, values| Series {
        label: label.to_owned(),
        values,
    };
    let mut charts = vec![Chart {
        id: "throughput".to_owned(),
        title: "Throughput: webhooks answered and events forwarded per minute".to_owned(),
        end_ms,
        series: vec![
            series(
                "webhooks per minute",
                activity::rate_series(&samples, Sample::webhooks_total),
            ),
            series(
                "events forwarded per minute",
                activity::rate_series(&samples, Sample::forwarded_total),
            ),
        ],
    }];
    for lane in &facts.lanes {
        let app_id = lane.app_id.as_str();
        let level = |pick: fn(&crate::queue::QueueStats) -> u64| {
            activity::level_series(&samples, |s| s.lane_queue(app_id).map(pick))
        };
        charts.push(Chart {
            id: format!("queue-{app_id}"),
            title: format!("Queue of app id {app_id}: pending and dead records"),
            end_ms,
            series: vec![
                series("pending", level(|s| s.pending)),
                series("dead", level(|s| s.dead)),
            ],
        });
    }
    charts
}

/// `GET /console`.
#[derive(Template)]
#[template(path = "console/overview.html")]
pub struct OverviewPage {
    pub nav: Option<Nav>,
    pub live: Live,
}

/// `GET /console/live`: what the live region of [`OverviewPage`] holds.
#[derive(Template)]
#[template(path = "console/overview_live.html")]
pub struct LiveFragment {
    pub live: Live,
}

pub async fn page(State(state): State<Arc<AppState>>, viewer: Viewer) -> Response {
    let live = Live::new(&gather(&state).await, viewer.session.csrf.clone());
    let nav = Some(Nav::new(&viewer.session, "overview"));
    render(StatusCode::OK, &OverviewPage { nav, live })
}

pub async fn live(State(state): State<Arc<AppState>>, viewer: Viewer) -> Response {
    let live = Live::new(&gather(&state).await, viewer.session.csrf.clone());
    render(StatusCode::OK, &LiveFragment { live })
}

/// The pause and resume forms: one lane, or every lane when `app_id` is absent or empty.
#[derive(Debug, Deserialize)]
pub struct LaneForm {
    #[serde(default)]
    app_id: Option<String>,
}

pub async fn pause(State(state): State<Arc<AppState>>, action: Action<LaneForm>) -> Response {
    switch(&state, action, true)
}

pub async fn resume(State(state): State<Arc<AppState>>, action: Action<LaneForm>) -> Response {
    switch(&state, action, false)
}

/// 303 to the overview once switched; 404 for an app id no lane has.
fn switch(state: &AppState, action: Action<LaneForm>, paused: bool) -> Response {
    let app_id = action.form.app_id.as_deref().filter(|id| !id.is_empty());
    if state.lanes.switch(app_id, paused).is_some() {
        return Redirect::to("/console").into_response();
    }
    let shown: String = app_id.unwrap_or_default().chars().take(64).collect();
    super::message(
        StatusCode::NOT_FOUND,
        Some(Nav::new(&action.session, "overview")),
        "Unknown lane",
        &format!("No lane forwards for the app id “{shown}”: nothing was paused or resumed."),
        "/console",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::QueueStats;

    /// 2026-01-01T00:00:00Z.
    const T0: i64 = 1_767_225_600_000;

    fn sample(at_ms: i64, accepted: u64, forwarded: u64, queue: Option<QueueStats>) -> Sample {
        let mut s = Sample {
            at_ms,
            ..Sample::default()
        };
        s.webhooks
            .entry("shop".to_owned())
            .or_default()
            .insert("accepted", accepted);
        s.forwarded.insert("app-1".to_owned(), forwarded);
        s.queue = queue.map(|q| [("app-1".to_owned(), q)].into_iter().collect());
        s
    }

    fn facts(state: ForwarderState, queue: Option<QueueStats>) -> Facts {
        let stats = queue.unwrap_or_default();
        Facts {
            now: sample(T0 + 60_000, 30, 120, queue),
            history: vec![Arc::new(sample(T0, 0, 0, Some(stats)))],
            sources: vec![SourceFacts {
                name: "shop".into(),
                path: "/webhooks/userpilot/shop".into(),
                app_id: "app-1".into(),
            }],
            lanes: vec![LaneFacts {
                app_id: "app-1".into(),
                state,
                backoff_until_ms: Some(T0 + 3_723_000),
                last_error: Some(HeapError {
                    at_ms: T0,
                    status: Some(503),
                    text: "heap answered 503: <script>alert(1)</script>".into(),
                }),
            }],
        }
    }

    fn queue() -> QueueStats {
        QueueStats {
            pending: 7,
            in_flight: 2,
            delivered: 40,
            dead: 3,
            oldest_pending_received_at_ms: Some(T0),
        }
    }

    fn fragment(facts: &Facts) -> String {
        LiveFragment {
            live: Live::new(facts, "token-1".into()),
        }
        .render()
        .unwrap()
    }

    #[test]
    fn the_fragment_shows_each_source_and_lane_with_the_hooks_the_tests_use() {
        let html = fragment(&facts(ForwarderState::Running, Some(queue())));
        for needle in [
            r#"id="source-shop""#,
            r#"<dd class="webhooks-per-minute">30</dd>"#,
            r#"<dd class="webhooks-total">30</dd>"#,
            r#"<dd class="outcome-accepted">30</dd>"#,
            r#"<div class="zero"><dt>invalid_signature</dt><dd class="outcome-invalid_signature">0</dd>"#,
            r#"id="lane-app-1""#,
            r#"<span class="forwarder-state status ok">running</span>"#,
            r#"<dd class="queue-pending">7</dd>"#,
            r#"<dd class="queue-in-flight">2</dd>"#,
            r#"<dd class="queue-delivered">40</dd>"#,
            r#"<dd class="queue-dead">3</dd>"#,
            r#"<dd class="events-per-minute">120</dd>"#,
            r#"<button type="submit" id="pause-app-1""#,
            r#"<input type="hidden" name="csrf" value="token-1">"#,
            r#"<input type="hidden" name="app_id" value="app-1">"#,
            r#"<svg class="chart""#,
            r#"<title id="chart-throughput-title">"#,
            r#"aria-labelledby="chart-queue-app-1-title""#,
            r#"<span class="key k1"></span>events forwarded per minute"#,
            "1 min",
        ] {
            assert!(html.contains(needle), "{needle} missing from\n{html}");
        }
        for outcome in WEBHOOK_OUTCOMES {
            assert!(html.contains(&format!("outcome-{outcome}\"")), "{outcome}");
        }
        assert!(!html.contains("resume-app-1"));
        assert!(!html.contains("style="), "no inline style");
        assert!(!html.contains("<script"), "no script");
    }

    #[test]
    fn heaps_error_text_is_escaped() {
        let html = fragment(&facts(ForwarderState::Running, Some(queue())));
        assert!(!html.contains("<script>alert(1)</script>"));
        assert!(
            html.contains("&#60;script&#62;alert(1)&#60;/script&#62;")
                || html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
            "{html}"
        );
        assert!(html.contains("HTTP 503"));
        assert!(html.contains("2026-01-01 00:00:00 UTC"));
    }

    #[test]
    fn a_lane_backing_off_says_until_when_and_a_paused_one_offers_resume() {
        let html = fragment(&facts(ForwarderState::BackingOff, Some(queue())));
        assert!(
            html.contains(
                r#"<span class="forwarder-state status warn">backing off until 01:02:03 UTC</span>"#
            ),
            "{html}"
        );
        let html = fragment(&facts(ForwarderState::Paused, Some(queue())));
        assert!(html.contains(r#"<span class="forwarder-state status warn">paused</span>"#));
        assert!(html.contains(r#"id="resume-app-1""#));
        assert!(html.contains(r#"action="/console/lanes/resume""#));
        assert!(!html.contains(r#"id="pause-app-1""#));
    }

    #[test]
    fn without_an_error_or_a_readable_queue_the_fragment_says_so() {
        let mut facts = facts(ForwarderState::Running, None);
        facts.lanes[0].last_error = None;
        let html = fragment(&facts);
        assert!(
            html.contains(r#"<dd class="last-heap-error">none</dd>"#),
            "{html}"
        );
        assert!(html.contains(r#"id="queue-unavailable""#));
        assert!(html.contains(r#"<dd class="queue-pending">unknown</dd>"#));
    }

    #[test]
    fn the_page_holds_the_fragment_in_the_live_region_and_the_switches_for_all() {
        let facts = facts(ForwarderState::Running, Some(queue()));
        let live = Live::new(&facts, "token-1".into());
        let session = crate::console::session::Sessions::default().create(T0).1;
        let page = OverviewPage {
            nav: Some(Nav::new(&session, "overview")),
            live,
        }
        .render()
        .unwrap();
        let region = page
            .split_once(r#"<div id="live" data-live="/console/live">"#)
            .map(|(_, rest)| rest)
            .unwrap();
        assert!(region.contains(r#"id="lane-app-1""#));
        assert!(page.contains(r#"id="pause-all""#));
        assert!(page.contains(r#"id="resume-all""#));
        assert!(page.contains(r#"aria-current="page">Overview"#));
        assert!(!page.contains("style="));
    }
}
