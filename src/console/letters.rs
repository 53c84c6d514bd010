//! The dead-letter pages (contract §11): a filtered, paged list; one letter in full; replay
//! and purge of one or of the filtered set, each after a confirmation that shows the count.
//!
//! The filter is read by the admin API's own rules ([`FilterParams::listing`] and
//! [`FilterParams::selection`]); the only step before is the browser's: a form sends every
//! field, an empty one as `reason=`, and [`LetterForm`] takes an empty value as absent. So a
//! replay or purge form that selects nothing is the `no_scope` error, never "everything": the
//! list page's buttons say `all=true` themselves when no filter is set. Replay and purge run
//! through the functions `POST /admin/dead-letters/replay` and `/purge` run.

use std::sync::Arc;

use askama::Template;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde::Deserialize;
use serde_json::Value;

use super::guard::{Action, Viewer};
use super::{Nav, format_time, message, render};
use crate::dead_letters::{self, DeadLetterView, FilterError, FilterParams, Reason, ReplaySummary};
use crate::http::AppState;
use crate::http::admin::{purge_selected, replay_selected};
use crate::queue::{DeadLetter, QueueError};

/// Dead letters per page of the list.
pub const PAGE: usize = 50;

/// Characters of a letter's detail (Heap's answer) the list shows; the letter's page has all.
pub const DETAIL_SHOWN: usize = 120;

/// The page name in the navigation.
const NAV: &str = "dead-letters";

const LIST: &str = "/console/dead-letters";

/// Every field a dead-letter form or the list's query may hold, as the browser sends them:
/// text, empty when not filled in. The `csrf` field of a POST form is read by the guard.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct LetterForm {
    pub id: String,
    pub reason: String,
    pub source: String,
    pub identity: String,
    pub since: String,
    pub until: String,
    pub after: String,
    /// `true` (or `1`): every dead letter, as the admin API's `all`.
    pub all: String,
    /// `1` once the operator has seen the confirmation.
    pub confirmed: String,
}

/// A form value that is not what its field takes.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum FormError {
    #[error("`{0}` must be a whole number")]
    NotANumber(&'static str),
    #[error(transparent)]
    Filter(#[from] FilterError),
}

/// The value, trimmed; `None` when nothing was filled in.
fn given(value: &str) -> Option<String> {
    let value = value.trim();
    (!value.is_empty()).then(|| value.to_owned())
}

/// The value as typed (an identity is matched exactly); `None` when nothing was filled in.
fn given_exactly(value: &str) -> Option<String> {
    (!value.trim().is_empty()).then(|| value.to_owned())
}

fn number(field: &'static str, value: &str) -> Result<Option<i64>, FormError> {
    given(value)
        .map(|v| v.parse().map_err(|_| FormError::NotANumber(field)))
        .transpose()
}

impl LetterForm {
    /// The filter as the admin API takes it (not yet checked: see [`FilterParams::listing`]
    /// and [`FilterParams::selection`]).
    pub fn params(&self) -> Result<FilterParams, FormError> {
        Ok(FilterParams {
            id: number("id", &self.id)?,
            reason: given(&self.reason),
            source: given(&self.source),
            identity: given_exactly(&self.identity),
            since: given(&self.since),
            until: given(&self.until),
            after: number("after", &self.after)?,
            limit: None,
            all: matches!(self.all.trim(), "true" | "1"),
        })
    }

    /// Whether the operator confirmed the action.
    pub fn confirmed(&self) -> bool {
        self.confirmed.trim() == "1"
    }
}

/// The fields of `params` that are set, as (name, value) for a link or hidden form fields.
/// `limit` is not a console field.
fn filter_pairs(params: &FilterParams) -> Vec<(&'static str, String)> {
    let mut pairs = Vec::new();
    if let Some(id) = params.id {
        pairs.push(("id", id.to_string()));
    }
    let texts = [
        ("reason", &params.reason),
        ("source", &params.source),
        ("identity", &params.identity),
        ("since", &params.since),
        ("until", &params.until),
    ];
    for (name, value) in texts {
        if let Some(value) = value {
            pairs.push((name, value.clone()));
        }
    }
    if let Some(after) = params.after {
        pairs.push(("after", after.to_string()));
    }
    pairs
}

/// The fields a replay or purge form carries for `params`: its filter, or `all=true` when it
/// has none, so that "every dead letter" is said explicitly.
fn scope_pairs(params: &FilterParams) -> Vec<(&'static str, String)> {
    let mut pairs = filter_pairs(params);
    if pairs.is_empty() {
        pairs.push(("all", "true".to_owned()));
    }
    pairs
}

/// `path?pairs`, or `path` alone when there are none.
fn link(path: &str, pairs: &[(&'static str, String)]) -> String {
    match serde_urlencoded::to_string(pairs) {
        Ok(query) if !query.is_empty() => format!("{path}?{query}"),
        _ => path.to_owned(),
    }
}

/// One option of a `<select>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    pub value: String,
    pub label: String,
    pub selected: bool,
}

/// "any" (the empty value) and then `values`, the one equal to `current` selected. A
/// `current` that is not among them (a source no longer configured, typed into the URL) is
/// added, so the form still shows what is filtered on.
pub fn choices(values: Vec<String>, current: &str) -> Vec<Choice> {
    let current = current.trim();
    let mut values = values;
    if !current.is_empty() && !values.iter().any(|v| v == current) {
        values.push(current.to_owned());
    }
    let mut all = vec![Choice {
        value: String::new(),
        label: "any".to_owned(),
        selected: current.is_empty(),
    }];
    all.extend(values.into_iter().map(|value| Choice {
        selected: value == current,
        label: value.clone(),
        value,
    }));
    all
}

/// The names of the sources in force, sorted.
pub fn configured_sources(state: &AppState) -> Vec<String> {
    let mut names: Vec<String> = state
        .sources
        .current()
        .iter()
        .map(|source| source.name.clone())
        .collect();
    names.sort();
    names
}

/// 503: the queue did not answer.
pub fn unavailable(nav: Option<Nav>, err: &QueueError, back: &str) -> Response {
    tracing::error!(error = %err, "console: queue operation failed");
    message(
        StatusCode::SERVICE_UNAVAILABLE,
        nav,
        "Queue unavailable",
        "The queue did not answer; nothing was changed. Try again in a moment.",
        back,
    )
}

/// `text` cut to [`DETAIL_SHOWN`] characters, with an ellipsis when cut.
fn shortened(text: &str) -> String {
    match text.char_indices().nth(DETAIL_SHOWN) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_owned(),
    }
}

/// A value for a `<pre>`: JSON pretty-printed, a string (bytes that were not JSON) as it is.
fn pretty(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        other => serde_json::to_string_pretty(other).unwrap_or_else(|_| other.to_string()),
    }
}

/// One row of the list.
#[derive(Debug, Clone)]
pub struct LetterRow {
    pub id: i64,
    pub dead_at: String,
    pub reason: String,
    pub source: String,
    pub app_id: String,
    pub subject: String,
    pub attempts: u32,
    /// Shortened to [`DETAIL_SHOWN`] characters.
    pub detail: String,
}

impl From<DeadLetter> for LetterRow {
    fn from(letter: DeadLetter) -> Self {
        LetterRow {
            id: letter.id,
            dead_at: format_time(letter.dead_at_ms),
            detail: shortened(&letter.detail),
            reason: letter.reason,
            source: letter.source,
            app_id: letter.app_id,
            subject: letter.subject,
            attempts: letter.attempts,
        }
    }
}

#[derive(Template)]
#[template(path = "console/dead_letters.html")]
pub struct ListPage {
    pub nav: Option<Nav>,
    pub csrf: String,
    /// The filter as typed, to show it again.
    pub form: LetterForm,
    pub reasons: Vec<Choice>,
    pub sources: Vec<Choice>,
    /// Why the filter could not be used.
    pub error: Option<String>,
    pub rows: Vec<LetterRow>,
    /// How many dead letters the filter selects (all pages).
    pub matching: Option<u64>,
    /// The next page, when this one is full.
    pub next_page: Option<String>,
    /// The hidden fields of the replay and purge forms.
    pub scope: Vec<(&'static str, String)>,
}

impl ListPage {
    fn new(state: &AppState, viewer: &Viewer, form: LetterForm) -> Self {
        let reasons = Reason::ALL.map(|r| r.as_str().to_owned()).to_vec();
        ListPage {
            nav: Some(Nav::new(&viewer.session, NAV)),
            csrf: viewer.session.csrf.clone(),
            reasons: choices(reasons, &form.reason),
            sources: choices(configured_sources(state), &form.source),
            form,
            error: None,
            rows: Vec::new(),
            matching: None,
            next_page: None,
            scope: Vec::new(),
        }
    }
}

/// `GET /console/dead-letters?reason=&source=&identity=&since=&until=&after=`: a page of
/// [`PAGE`] dead letters, oldest id first, as `GET /admin/dead-letters` lists them.
pub async fn list(
    State(state): State<Arc<AppState>>,
    viewer: Viewer,
    Query(form): Query<LetterForm>,
) -> Response {
    let mut page = ListPage::new(&state, &viewer, form);
    let parsed = page.form.params().and_then(|params| {
        let listing = FilterParams {
            limit: Some(PAGE),
            ..params.clone()
        }
        .listing()?;
        Ok((params, listing))
    });
    let (params, listing) = match parsed {
        Ok(parsed) => parsed,
        Err(err) => {
            page.error = Some(err.to_string());
            return render(StatusCode::BAD_REQUEST, &page);
        }
    };
    let letters = match state.queue.dead_letters(listing).await {
        Ok(letters) => letters,
        Err(err) => return unavailable(page.nav, &err, LIST),
    };
    // The buttons act on every letter the filter selects, not on this page from `after` on.
    let whole = FilterParams {
        after: None,
        ..params
    };
    if let (true, Some(last)) = (letters.len() == PAGE, letters.last()) {
        let mut pairs = filter_pairs(&whole);
        pairs.push(("after", last.id.to_string()));
        page.next_page = Some(link(LIST, &pairs));
    }
    page.scope = scope_pairs(&whole);
    // What the buttons would select (`all` is what their form adds when no filter is set).
    let selected = FilterParams { all: true, ..whole }.selection();
    if let Ok(filter) = selected {
        page.matching = state
            .queue
            .count_dead_letters(filter)
            .await
            .ok()
            .map(|count| count.dead_letters);
    }
    page.rows = letters.into_iter().map(LetterRow::from).collect();
    render(StatusCode::OK, &page)
}

#[derive(Template)]
#[template(path = "console/dead_letter.html")]
pub struct LetterPage {
    pub nav: Option<Nav>,
    pub csrf: String,
    pub id: i64,
    pub webhook_id: i64,
    pub kind: String,
    pub reason: String,
    pub source: String,
    pub app_id: String,
    pub subject: String,
    pub attempts: u32,
    pub received_at: String,
    /// RFC 3339, for the `<time>` element.
    pub received_at_rfc3339: String,
    pub dead_at: String,
    pub dead_at_rfc3339: String,
    /// The original webhook payload, pretty-printed.
    pub payload: String,
    /// The record that was to go to Heap, pretty-printed; `None` for a quarantined webhook.
    pub events: Option<String>,
    /// The attempt that killed the record: Heap's answer, or why it was quarantined.
    pub detail: String,
    /// The last failed attempt that was retried.
    pub last_error: Option<String>,
}

impl LetterPage {
    pub fn new(nav: Nav, view: DeadLetterView) -> Self {
        let letter = view.letter;
        LetterPage {
            csrf: nav.csrf.clone(),
            nav: Some(nav),
            id: letter.id,
            webhook_id: letter.webhook_id,
            kind: letter.kind,
            reason: letter.reason,
            source: letter.source,
            app_id: letter.app_id,
            subject: letter.subject,
            attempts: letter.attempts,
            received_at: format_time(letter.received_at_ms),
            received_at_rfc3339: view.received_at,
            dead_at: format_time(letter.dead_at_ms),
            dead_at_rfc3339: view.dead_at,
            payload: pretty(&view.webhook),
            events: view.record.as_ref().map(pretty),
            detail: letter.detail,
            last_error: view.last_error,
        }
    }
}

/// `GET /console/dead-letters/{id}`: one dead letter in full, as `GET
/// /admin/dead-letters/{id}` shows it ([`dead_letters::show`]); 404 when there is none.
pub async fn show(
    State(state): State<Arc<AppState>>,
    viewer: Viewer,
    Path(id): Path<String>,
) -> Response {
    let nav = Nav::new(&viewer.session, NAV);
    let not_found = |nav| {
        message(
            StatusCode::NOT_FOUND,
            Some(nav),
            "Dead letter not found",
            "There is no such dead letter: it was replayed, purged or pruned, or never existed.",
            LIST,
        )
    };
    let Ok(id) = id.parse::<i64>() else {
        return not_found(nav);
    };
    match dead_letters::show(state.queue.as_ref(), id).await {
        Ok(Some(view)) => render(StatusCode::OK, &LetterPage::new(nav, view)),
        Ok(None) => not_found(nav),
        Err(err) => unavailable(Some(nav), &err, LIST),
    }
}

/// What a replay or purge form asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Replay,
    Purge,
}

impl Operation {
    /// Where its form posts.
    pub fn path(self) -> &'static str {
        match self {
            Operation::Replay => "/console/dead-letters/replay",
            Operation::Purge => "/console/dead-letters/purge",
        }
    }

    /// The button's word.
    pub fn verb(self) -> &'static str {
        match self {
            Operation::Replay => "Replay",
            Operation::Purge => "Purge",
        }
    }

    /// What will happen to the `count` selected dead letters of `webhooks` webhooks.
    fn consequence(self, count: u64, webhooks: u64) -> String {
        match self {
            Operation::Replay => format!(
                "Replaying maps the {} behind {} again under the configuration in force \
                 now, and queues their events for Heap. A webhook that still cannot be mapped becomes a dead letter again.",
                counted(webhooks, "webhook"),
                counted(count, "dead letter")
            ),
            Operation::Purge => format!(
                "Purging deletes {} for good: they can no longer be replayed or looked \
                 at. This cannot be undone.",
                counted(count, "dead letter")
            ),
        }
    }
}

#[derive(Template)]
#[template(path = "console/confirm.html")]
pub struct ConfirmPage {
    pub nav: Option<Nav>,
    pub csrf: String,
    pub verb: &'static str,
    pub action: &'static str,
    /// How many dead letters the action would touch.
    pub count: u64,
    pub consequence: String,
    /// The selection's fields, sent again with `confirmed=1`.
    pub fields: Vec<(&'static str, String)>,
    pub cancel: String,
}

#[derive(Template)]
#[template(path = "console/result.html")]
pub struct ResultPage {
    pub nav: Option<Nav>,
    pub title: &'static str,
    pub summary: String,
    /// The list, with the filter the action was taken from.
    pub back: String,
}

/// `count` and `noun`, in the plural unless there is one: "1 webhook", "3 webhooks".
fn counted(count: impl Into<u64>, noun: &str) -> String {
    let count = count.into();
    if count == 1 {
        format!("1 {noun}")
    } else {
        format!("{count} {noun}s")
    }
}

/// The replay's summary for the operator: "Replayed N webhooks: M events queued, …".
pub fn replay_result(summary: &ReplaySummary) -> String {
    let mut text = format!(
        "Replayed {}: {} queued, {} quarantined again",
        counted(summary.webhooks as u64, "webhook"),
        counted(summary.events as u64, "event"),
        summary.quarantined
    );
    let left = [
        (summary.filtered, "filtered out by the transform (removed)"),
        (
            summary.busy,
            "left as dead letters: no transform worker was free, replay them again later",
        ),
        (
            summary.unknown_source,
            "left as dead letters: their source is no longer configured",
        ),
    ];
    for (count, what) in left {
        if count > 0 {
            text.push_str(&format!(", {count} {what}"));
        }
    }
    text.push('.');
    text
}

/// The purge's summary for the operator.
pub fn purge_result(purged: u64) -> String {
    format!("Purged {}.", counted(purged, "dead letter"))
}

/// `POST /console/dead-letters/replay`: confirm, then replay as the admin API does.
pub async fn replay(State(state): State<Arc<AppState>>, action: Action<LetterForm>) -> Response {
    act(&state, action, Operation::Replay).await
}

/// `POST /console/dead-letters/purge`: confirm, then purge as the admin API does.
pub async fn purge(State(state): State<Arc<AppState>>, action: Action<LetterForm>) -> Response {
    act(&state, action, Operation::Purge).await
}

/// The selection of a replay or purge form: its filter, checked as the admin API checks it.
fn selection(
    form: &LetterForm,
) -> Result<(FilterParams, crate::queue::DeadLetterFilter), FormError> {
    let params = form.params()?;
    let filter = params.selection()?;
    Ok((params, filter))
}

async fn act(state: &AppState, action: Action<LetterForm>, operation: Operation) -> Response {
    let nav = Nav::new(&action.session, NAV);
    let (params, filter) = match selection(&action.form) {
        Ok(selected) => selected,
        Err(err) => {
            let title = match err {
                FormError::Filter(FilterError::NoScope) => "Nothing selected",
                _ => "Bad filter",
            };
            return message(
                StatusCode::BAD_REQUEST,
                Some(nav),
                title,
                &err.to_string(),
                LIST,
            );
        }
    };
    let fields = scope_pairs(&params);
    let back = match params.id {
        Some(id) => format!("{LIST}/{id}"),
        None => link(LIST, &filter_pairs(&params)),
    };
    if !action.form.confirmed() {
        let count = match state.queue.count_dead_letters(filter).await {
            Ok(count) => count,
            Err(err) => return unavailable(Some(nav), &err, &back),
        };
        let page = ConfirmPage {
            csrf: nav.csrf.clone(),
            nav: Some(nav),
            verb: operation.verb(),
            action: operation.path(),
            count: count.dead_letters,
            consequence: operation.consequence(count.dead_letters, count.webhooks),
            fields,
            cancel: back,
        };
        return render(StatusCode::OK, &page);
    }
    let (title, summary) = match operation {
        Operation::Replay => match replay_selected(state, filter).await {
            Ok(summary) => ("Replayed", replay_result(&summary)),
            Err(err) => return unavailable(Some(nav), &err, &back),
        },
        Operation::Purge => match purge_selected(state, filter).await {
            Ok(purged) => ("Purged", purge_result(purged)),
            Err(err) => return unavailable(Some(nav), &err, &back),
        },
    };
    // After a purge of one letter its page is gone: back to the list.
    let back = link(LIST, &filter_pairs(&FilterParams { id: None, ..params }));
    let page = ResultPage {
        nav: Some(nav),
        title,
        summary,
        back,
    };
    render(StatusCode::OK, &page)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::queue::DeadLetterFilter;

    const SCRIPT: &str = "<script>alert(1)</script>";

    fn form(query: &str) -> LetterForm {
        serde_urlencoded::from_str(query).unwrap()
    }

    fn nav() -> Nav {
        Nav {
            csrf: "token-1".into(),
            current: NAV,
        }
    }

    /// The rendered page holds `SCRIPT` only escaped (askama writes `<` as `&#60;`, which a
    /// browser reads as `&lt;`: text, not a tag).
    pub(crate) fn assert_escaped(html: &str) {
        assert!(html.contains("&#60;script&#62;alert(1)"), "{html}");
        assert!(!html.contains("<script>alert"), "{html}");
    }

    fn letter(detail: &str) -> DeadLetter {
        DeadLetter {
            id: 7,
            webhook_id: 3,
            source: "default".into(),
            app_id: "42".into(),
            kind: "track".into(),
            reason: "rejected".into(),
            detail: detail.into(),
            subject: "alice".into(),
            attempts: 2,
            received_at_ms: 1_700_000_000_000,
            dead_at_ms: 1_700_000_000_250,
        }
    }

    #[test]
    fn a_form_with_every_field_empty_is_no_filter_and_selects_nothing() {
        let empty = form("reason=&source=&identity=&since=&until=&after=&id=&csrf=x");
        let params = empty.params().unwrap();
        assert_eq!(
            params.listing().unwrap().limit,
            Some(dead_letters::DEFAULT_PAGE)
        );
        assert_eq!(
            FilterParams {
                limit: None,
                ..params.clone()
            }
            .listing()
            .unwrap(),
            DeadLetterFilter {
                limit: Some(dead_letters::DEFAULT_PAGE),
                ..DeadLetterFilter::default()
            }
        );
        assert_eq!(params.selection(), Err(FilterError::NoScope));
        assert_eq!(
            selection(&empty).unwrap_err(),
            FormError::Filter(FilterError::NoScope)
        );
        // Blank is empty too (a space typed into a field).
        assert_eq!(
            form("reason=+&identity=%20").params().unwrap().selection(),
            Err(FilterError::NoScope)
        );
        assert!(!form("").confirmed());
    }

    #[test]
    fn filled_fields_become_the_admin_filter() {
        let filled = form(
            "reason=rejected&source=+shop+&identity=a%20b&since=1700000000000\
             &until=2023-11-14T22%3A13%3A20Z&after=12&csrf=x",
        );
        let filter = filled.params().unwrap().selection().unwrap();
        assert_eq!(
            filter,
            DeadLetterFilter {
                reason: Some("rejected".into()),
                source: Some("shop".into()),
                subject: Some("a b".into()),
                since_ms: Some(1_700_000_000_000),
                until_ms: Some(1_700_000_000_000),
                after_id: Some(12),
                ..DeadLetterFilter::default()
            }
        );
        let one = selection(&form("id=9&confirmed=1")).unwrap().1;
        assert_eq!(one.ids, vec![9]);
        assert!(form("id=9&confirmed=1").confirmed());
        let every = selection(&form("all=true")).unwrap().1;
        assert_eq!(every, DeadLetterFilter::default());
    }

    #[test]
    fn bad_values_are_errors_that_say_which_field() {
        assert_eq!(
            form("id=seven").params().unwrap_err(),
            FormError::NotANumber("id")
        );
        assert_eq!(
            form("after=x").params().unwrap_err().to_string(),
            "`after` must be a whole number"
        );
        let bad_time = form("since=yesterday").params().unwrap().listing();
        assert_eq!(bad_time, Err(FilterError::BadTime("since")));
        let typo = form("reason=rejectd").params().unwrap().selection();
        assert!(matches!(typo, Err(FilterError::UnknownReason(_))));
    }

    #[test]
    fn the_buttons_carry_the_filter_or_say_all_explicitly() {
        assert_eq!(
            scope_pairs(&FilterParams::default()),
            vec![("all", "true".to_owned())]
        );
        let params = form("reason=expired&identity=bob").params().unwrap();
        let pairs = scope_pairs(&params);
        assert_eq!(
            pairs,
            vec![
                ("reason", "expired".to_owned()),
                ("identity", "bob".to_owned())
            ]
        );
        // What the buttons send back selects what the list shows.
        let query = serde_urlencoded::to_string(&pairs).unwrap();
        assert_eq!(
            form(&query).params().unwrap().selection().unwrap(),
            params.selection().unwrap()
        );
        assert_eq!(
            link(LIST, &pairs),
            "/console/dead-letters?reason=expired&identity=bob"
        );
        assert_eq!(link(LIST, &[]), LIST);
    }

    #[test]
    fn a_select_offers_any_and_keeps_a_value_not_configured() {
        let options = choices(vec!["a".into(), "b".into()], "gone");
        let values: Vec<&str> = options.iter().map(|c| c.value.as_str()).collect();
        assert_eq!(values, ["", "a", "b", "gone"]);
        assert!(options[3].selected && !options[0].selected);
        let any = choices(vec!["a".into()], "");
        assert!(any[0].selected && !any[1].selected);
        assert_eq!(any[0].label, "any");
    }

    #[test]
    fn a_long_detail_is_cut_on_a_character_boundary() {
        assert_eq!(shortened("short"), "short");
        let long = "é".repeat(DETAIL_SHOWN + 5);
        let cut = shortened(&long);
        assert_eq!(cut.chars().count(), DETAIL_SHOWN + 1);
        assert!(cut.ends_with('…'));
        assert_eq!(
            shortened(&"x".repeat(DETAIL_SHOWN)),
            "x".repeat(DETAIL_SHOWN)
        );
    }

    #[test]
    fn summaries_say_what_was_done() {
        let summary = ReplaySummary {
            webhooks: 3,
            events: 5,
            quarantined: 1,
            unknown_source: 2,
            ..ReplaySummary::default()
        };
        assert_eq!(
            replay_result(&summary),
            "Replayed 3 webhooks: 5 events queued, 1 quarantined again, 2 left as dead \
             letters: their source is no longer configured."
        );
        assert_eq!(purge_result(4), "Purged 4 dead letters.");
        assert_eq!(purge_result(1), "Purged 1 dead letter.");
    }

    #[test]
    fn the_list_shows_a_detail_with_a_script_as_text() {
        let page = ListPage {
            nav: Some(nav()),
            csrf: "token-1".into(),
            form: LetterForm {
                identity: SCRIPT.into(),
                ..LetterForm::default()
            },
            reasons: choices(vec!["rejected".into()], ""),
            sources: choices(vec![SCRIPT.into()], ""),
            error: None,
            rows: vec![LetterRow::from(letter(SCRIPT))],
            matching: Some(1),
            next_page: Some(link(LIST, &[("after", "7".to_owned())])),
            scope: vec![("identity", SCRIPT.to_owned())],
        };
        let html = page.render().unwrap();
        assert_escaped(&html);
        assert!(html.contains(r#"<tr data-id="7">"#));
        assert!(html.contains(r#"<a class="letter-link" href="/console/dead-letters/7">7</a>"#));
        assert!(html.contains(r#"id="next-page" href="/console/dead-letters?after=7""#));
        assert!(
            html.contains(r#"id="replay-filtered""#) && html.contains(r#"id="purge-filtered""#)
        );
        assert!(html.contains(r#"<input type="hidden" name="csrf" value="token-1">"#));
    }

    #[test]
    fn an_empty_list_says_so_and_a_bad_filter_shows_the_error() {
        let base = || ListPage {
            nav: Some(nav()),
            csrf: "t".into(),
            form: LetterForm::default(),
            reasons: Vec::new(),
            sources: Vec::new(),
            error: None,
            rows: Vec::new(),
            matching: Some(0),
            next_page: None,
            scope: vec![("all", "true".to_owned())],
        };
        let html = base().render().unwrap();
        assert!(html.contains(r#"id="no-letters""#));
        assert!(!html.contains("replay-filtered"));
        let html = ListPage {
            error: Some(FilterError::BadTime("since").to_string()),
            ..base()
        }
        .render()
        .unwrap();
        assert!(html.contains(r#"id="filter-error""#));
        assert!(html.contains("must be unix milliseconds or an RFC 3339 time"));
    }

    #[test]
    fn a_letter_page_shows_payload_record_and_answers_as_text() {
        let view = DeadLetterView {
            letter: letter(&format!("heap answered 400: {SCRIPT}")),
            received_at: "2023-11-14T22:13:20.000Z".into(),
            dead_at: "2023-11-14T22:13:20.250Z".into(),
            record: Some(serde_json::json!({"identity": "alice", "event": SCRIPT})),
            last_error: Some(format!("heap answered 503: {SCRIPT}")),
            webhook: serde_json::json!({"data": {"note": SCRIPT, "user": {"user_id": "alice"}}}),
        };
        let page = LetterPage::new(nav(), view);
        assert!(page.payload.contains("\n  \"data\": {"), "pretty-printed");
        let html = page.render().unwrap();
        assert_escaped(&html);
        for id in [
            r#"id="letter-payload""#,
            r#"id="letter-events""#,
            r#"id="heap-answer""#,
            r#"id="replay-one""#,
            r#"id="purge-one""#,
        ] {
            assert!(html.contains(id), "{id}");
        }
        assert!(html.contains(r#"<dd id="letter-attempts">2</dd>"#));
        assert!(html.contains(r#"<input type="hidden" name="id" value="7">"#));
        assert!(html.contains("2023-11-14 22:13:20 UTC"));
    }

    #[test]
    fn a_quarantined_letter_has_no_events_and_raw_bytes_show_as_they_are() {
        let view = DeadLetterView {
            letter: letter("no user id"),
            received_at: String::new(),
            dead_at: String::new(),
            record: None,
            last_error: None,
            webhook: Value::String("not json".into()),
        };
        let html = LetterPage::new(nav(), view).render().unwrap();
        assert!(html.contains(r#"<pre id="letter-payload">not json</pre>"#));
        assert!(html.contains("never mapped"));
        assert!(!html.contains("last-error"));
    }

    #[test]
    fn a_confirmation_sends_the_same_fields_escaped_with_confirmed() {
        let params = form("identity=x&reason=rejected").params().unwrap();
        let mut fields = scope_pairs(&params);
        assert_eq!(fields[1].0, "identity");
        fields[1].1 = format!("\">{SCRIPT}");
        let page = ConfirmPage {
            nav: Some(nav()),
            csrf: "token-1".into(),
            verb: Operation::Purge.verb(),
            action: Operation::Purge.path(),
            count: 12,
            consequence: Operation::Purge.consequence(12, 4),
            fields,
            cancel: link(LIST, &filter_pairs(&params)),
        };
        let html = page.render().unwrap();
        assert_escaped(&html);
        assert!(html.contains(r#"<strong id="confirm-count">12</strong>"#));
        assert!(html.contains(r#"<input type="hidden" name="confirmed" value="1">"#));
        assert!(html.contains(r#"<input type="hidden" name="reason" value="rejected">"#));
        assert!(html.contains(r#"action="/console/dead-letters/purge""#));
        assert!(html.contains(r#"id="confirm""#));
        assert!(html.contains(r#"id="cancel""#));
    }

    #[test]
    fn the_result_page_shows_the_summary() {
        let page = ResultPage {
            nav: Some(nav()),
            title: "Purged",
            summary: purge_result(3),
            back: LIST.into(),
        };
        let html = page.render().unwrap();
        assert!(html.contains(r#"id="result""#));
        assert!(html.contains("Purged 3 dead letters."));
    }
}
