//! What the overview shows over time (contract §11): webhooks counted per source and
//! outcome as they are answered, and a bounded history of samples (the last hour) of those
//! counts, of each lane's forwarded events and of its queue depth, taken by a task ([`run`])
//! every [`SAMPLE_PERIOD`]. Memory only: a restart starts the charts empty.
//!
//! Counts are totals since the process started; a rate is the growth of a total since the
//! sample nearest a minute earlier ([`per_minute`]). A counter absent from an older sample (a
//! source added by a reload, a lane registered later) was zero then.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::http::AppState;
use crate::queue::QueueStats;

/// How often [`run`] takes a sample.
pub const SAMPLE_PERIOD: Duration = Duration::from_secs(10);

/// Samples kept: one hour of them, both ends included. Older ones are dropped, so the history
/// holds at most this many whatever the uptime.
pub const MAX_SAMPLES: usize = 361;

/// The span a rate is measured over.
pub const RATE_WINDOW_MS: i64 = 60_000;

/// Webhooks answered, per source label, per outcome (the `relay_webhooks_total` labels).
pub type WebhookCounts = BTreeMap<String, BTreeMap<&'static str, u64>>;

/// The totals at one moment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sample {
    /// Unix ms.
    pub at_ms: i64,
    pub webhooks: WebhookCounts,
    /// Track events forwarded per lane (app id) since start.
    pub forwarded: BTreeMap<String, u64>,
    /// Queue counts per lane; `None` when the queue could not be read.
    pub queue: Option<BTreeMap<String, QueueStats>>,
}

impl Sample {
    /// Webhooks answered for `source`, every outcome together.
    pub fn source_total(&self, source: &str) -> u64 {
        self.webhooks.get(source).map_or(0, |o| o.values().sum())
    }

    /// Webhooks answered for `source` with `outcome`.
    pub fn source_outcome(&self, source: &str, outcome: &str) -> u64 {
        self.webhooks
            .get(source)
            .and_then(|o| o.get(outcome))
            .copied()
            .unwrap_or(0)
    }

    /// Webhooks answered, every source and outcome together.
    pub fn webhooks_total(&self) -> u64 {
        self.webhooks.values().flat_map(|o| o.values()).sum()
    }

    /// Events forwarded by the lane of `app_id`.
    pub fn lane_forwarded(&self, app_id: &str) -> u64 {
        self.forwarded.get(app_id).copied().unwrap_or(0)
    }

    /// Events forwarded, every lane together.
    pub fn forwarded_total(&self) -> u64 {
        self.forwarded.values().sum()
    }

    /// The queue counts of the lane of `app_id`, when known.
    pub fn lane_queue(&self, app_id: &str) -> Option<&QueueStats> {
        self.queue.as_ref()?.get(app_id)
    }
}

/// The counts and samples of this process.
#[derive(Debug, Default)]
pub struct Activity {
    webhooks: Mutex<WebhookCounts>,
    /// Oldest first; at most [`MAX_SAMPLES`].
    history: Mutex<VecDeque<Arc<Sample>>>,
}

/// A lock whose holder cannot panic midway: a poisoned value is still whole.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Activity {
    /// One webhook to `source` was answered with `outcome` (an `outcome` label of
    /// `relay_webhooks_total`).
    pub fn webhook(&self, source: &str, outcome: &'static str) {
        let mut webhooks = lock(&self.webhooks);
        let outcomes = match webhooks.get_mut(source) {
            Some(outcomes) => outcomes,
            None => webhooks.entry(source.to_owned()).or_default(),
        };
        *outcomes.entry(outcome).or_default() += 1;
    }

    /// The webhooks answered so far.
    pub fn webhook_counts(&self) -> WebhookCounts {
        lock(&self.webhooks).clone()
    }

    /// Keeps `sample`, dropping the oldest beyond [`MAX_SAMPLES`].
    pub fn record(&self, sample: Sample) {
        push_bounded(&mut lock(&self.history), sample, MAX_SAMPLES);
    }

    /// The samples kept, oldest first.
    pub fn history(&self) -> Vec<Arc<Sample>> {
        lock(&self.history).iter().cloned().collect()
    }
}

/// Appends `sample` and drops the oldest until at most `max` remain.
fn push_bounded(history: &mut VecDeque<Arc<Sample>>, sample: Sample, max: usize) {
    history.push_back(Arc::new(sample));
    while history.len() > max {
        history.pop_front();
    }
}

/// The totals of the process now: webhooks, forwarded events and queue counts per lane (one
/// scan of the queue, [`crate::forwarder::lanes::Lanes::status`]).
pub async fn sample(state: &AppState) -> Sample {
    let at_ms = state.clock.now_ms();
    let queue = match state.lanes.status(state.queue.as_ref(), at_ms).await {
        Ok(status) => Some(
            status
                .lanes
                .into_iter()
                .map(|lane| (lane.app_id, lane.queue))
                .collect(),
        ),
        Err(error) => {
            tracing::warn!(%error, "console: the queue counts could not be read");
            None
        }
    };
    let forwarded = state
        .lanes
        .all()
        .into_iter()
        .map(|(app_id, control)| (app_id, control.forwarded()))
        .collect();
    Sample {
        at_ms,
        webhooks: state.console.activity.webhook_counts(),
        forwarded,
        queue,
    }
}

/// Takes a sample now and every [`SAMPLE_PERIOD`] until `shutdown`.
pub async fn run(state: Arc<AppState>, shutdown: CancellationToken) {
    loop {
        let taken = sample(&state).await;
        state.console.activity.record(taken);
        tokio::select! {
            _ = tokio::time::sleep(SAMPLE_PERIOD) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

/// The sample of `history` (oldest first) a rate at `at_ms` is counted from: the newest at
/// least [`RATE_WINDOW_MS`] older, or, while the history is younger than that, the oldest
/// sample before `at_ms`.
fn baseline(history: &[Arc<Sample>], at_ms: i64) -> Option<&Sample> {
    let earlier = &history[..history.partition_point(|s| s.at_ms < at_ms)];
    let old_enough = earlier.partition_point(|s| s.at_ms <= at_ms - RATE_WINDOW_MS);
    match old_enough.checked_sub(1) {
        Some(i) => earlier.get(i),
        None => earlier.first(),
    }
    .map(Arc::as_ref)
}

/// How fast `value` grew per minute up to `now`: its growth since the [`baseline`] sample,
/// over at least a minute. A baseline a little more than a minute old (samples are
/// [`SAMPLE_PERIOD`] apart) is scaled down to a minute; a younger one (the first minute after
/// start) is not scaled up, so the rate is what arrived so far, never an extrapolation.
/// `None` without an earlier sample.
pub fn per_minute(
    history: &[Arc<Sample>],
    now: &Sample,
    value: impl Fn(&Sample) -> u64,
) -> Option<f64> {
    let then = baseline(history, now.at_ms)?;
    let grown = value(now).saturating_sub(value(then));
    let elapsed_ms = (now.at_ms - then.at_ms).max(RATE_WINDOW_MS);
    Some(grown as f64 * RATE_WINDOW_MS as f64 / elapsed_ms as f64)
}

/// [`per_minute`] as a whole number for display; 0 without history.
pub fn per_minute_now(
    history: &[Arc<Sample>],
    now: &Sample,
    value: impl Fn(&Sample) -> u64,
) -> u64 {
    per_minute(history, now, value).map_or(0, |rate| rate.round() as u64)
}

/// The rate of `value` at each sample of `history` that has an earlier one: a chart's series.
pub fn rate_series(history: &[Arc<Sample>], value: impl Fn(&Sample) -> u64) -> Vec<(i64, f64)> {
    history
        .iter()
        .enumerate()
        .filter_map(|(i, sample)| {
            per_minute(&history[..i], sample, &value).map(|rate| (sample.at_ms, rate))
        })
        .collect()
}

/// A level read from each sample of `history` that knows it (queue depth): a chart's series.
pub fn level_series(
    history: &[Arc<Sample>],
    value: impl Fn(&Sample) -> Option<u64>,
) -> Vec<(i64, f64)> {
    history
        .iter()
        .filter_map(|sample| value(sample).map(|v| (sample.at_ms, v as f64)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sample at `at_s` seconds with webhook totals per (source, outcome).
    fn at(at_s: i64, webhooks: &[(&str, &'static str, u64)]) -> Sample {
        let mut counts = WebhookCounts::new();
        for (source, outcome, n) in webhooks {
            counts
                .entry((*source).to_owned())
                .or_default()
                .insert(*outcome, *n);
        }
        Sample {
            at_ms: at_s * 1000,
            webhooks: counts,
            ..Sample::default()
        }
    }

    fn history(samples: Vec<Sample>) -> Vec<Arc<Sample>> {
        samples.into_iter().map(Arc::new).collect()
    }

    fn accepted(source: &'static str) -> impl Fn(&Sample) -> u64 {
        move |s| s.source_outcome(source, "accepted")
    }

    #[test]
    fn the_history_keeps_the_last_hour_of_samples_only() {
        let mut kept = VecDeque::new();
        for i in 0..400 {
            push_bounded(&mut kept, at(i * 10, &[]), MAX_SAMPLES);
        }
        assert_eq!(kept.len(), MAX_SAMPLES);
        assert_eq!(kept.front().map(|s| s.at_ms), Some(39 * 10_000));
        assert_eq!(kept.back().map(|s| s.at_ms), Some(399 * 10_000));
        // An hour: the first and the last sample are 3600 s apart.
        assert_eq!(
            kept.back().unwrap().at_ms - kept.front().unwrap().at_ms,
            3_600_000
        );

        let activity = Activity::default();
        for i in 0..370 {
            activity.record(at(i, &[]));
        }
        assert_eq!(activity.history().len(), MAX_SAMPLES);
    }

    #[test]
    fn a_rate_is_the_growth_since_the_newest_sample_a_minute_old() {
        let past: Vec<Sample> = (0..=12)
            .map(|i| at(i * 10, &[("a", "accepted", i as u64 * 5)]))
            .collect();
        let past = history(past);
        // Now at 125 s with 70: the newest sample at least a minute older is at 60 s (30),
        // 65 s ago: 40 in 65 s, scaled to a minute.
        let now = at(125, &[("a", "accepted", 70)]);
        let rate = per_minute(&past, &now, accepted("a")).unwrap();
        assert!((rate - 40.0 * 60.0 / 65.0).abs() < 1e-9, "{rate}");
        // Exactly a minute after a sample: that sample.
        let now = at(120, &[("a", "accepted", 60)]);
        assert_eq!(per_minute(&past[..12], &now, accepted("a")), Some(30.0));
    }

    #[test]
    fn before_a_minute_of_history_the_rate_is_what_arrived_so_far() {
        let past = history(vec![at(0, &[("a", "accepted", 0)])]);
        let now = at(20, &[("a", "accepted", 10)]);
        assert_eq!(per_minute(&past, &now, accepted("a")), Some(10.0));
        assert_eq!(per_minute_now(&past, &now, accepted("a")), 10);
    }

    #[test]
    fn without_an_earlier_sample_there_is_no_rate() {
        let now = at(20, &[("a", "accepted", 10)]);
        assert_eq!(per_minute(&[], &now, accepted("a")), None);
        assert_eq!(per_minute_now(&[], &now, accepted("a")), 0);
        // A sample taken at the same moment is not earlier.
        let same = history(vec![at(20, &[("a", "accepted", 3)])]);
        assert_eq!(per_minute(&same, &now, accepted("a")), None);
    }

    #[test]
    fn a_source_added_by_a_reload_counts_from_zero() {
        // "b" did not exist a minute ago; "a" still does.
        let past = history(vec![at(0, &[("a", "accepted", 10)])]);
        let now = at(60, &[("a", "accepted", 16), ("b", "accepted", 4)]);
        assert_eq!(per_minute(&past, &now, accepted("b")), Some(4.0));
        assert_eq!(per_minute(&past, &now, accepted("a")), Some(6.0));
        assert_eq!(per_minute(&past, &now, |s| s.webhooks_total()), Some(10.0));
    }

    #[test]
    fn an_outcome_first_seen_since_the_old_sample_counts_from_zero() {
        let past = history(vec![at(0, &[("a", "accepted", 10)])]);
        let now = at(30, &[("a", "accepted", 10), ("a", "invalid_signature", 2)]);
        let refused = |s: &Sample| s.source_outcome("a", "invalid_signature");
        assert_eq!(per_minute(&past, &now, refused), Some(2.0));
        assert_eq!(per_minute(&past, &now, |s| s.source_total("a")), Some(2.0));
        // A counter that vanished (never happens: totals only grow) reads as no growth.
        assert_eq!(per_minute(&past, &at(30, &[]), accepted("a")), Some(0.0));
    }

    #[test]
    fn a_series_has_a_rate_at_every_sample_after_the_first() {
        let past = history(
            (0..4)
                .map(|i| at(i * 10, &[("a", "accepted", (i * i) as u64)]))
                .collect(),
        );
        let series = rate_series(&past, accepted("a"));
        // Against the first sample each time (less than a minute of history), not scaled up.
        assert_eq!(series, vec![(10_000, 1.0), (20_000, 4.0), (30_000, 9.0)]);
        let depth = level_series(&past, |s| (s.at_ms > 0).then_some(7));
        assert_eq!(depth.len(), 3);
        assert!(rate_series(&[], accepted("a")).is_empty());
    }

    #[test]
    fn webhooks_are_counted_per_source_and_outcome() {
        let activity = Activity::default();
        activity.webhook("a", "accepted");
        activity.webhook("a", "accepted");
        activity.webhook("a", "duplicate");
        activity.webhook("b", "accepted");
        let counts = activity.webhook_counts();
        let now = Sample {
            webhooks: counts,
            ..Sample::default()
        };
        assert_eq!(now.source_outcome("a", "accepted"), 2);
        assert_eq!(now.source_total("a"), 3);
        assert_eq!(now.webhooks_total(), 4);
        assert_eq!(now.source_total("c"), 0);
    }
}
