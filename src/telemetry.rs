//! Logging and metrics set-up. Logs: JSON lines (or pretty) through `tracing`, filtered by
//! `log.level`. Metrics: one process-wide Prometheus recorder, rendered on the admin port,
//! which this module also describes: every metric's `# HELP` text, the counters shown at zero
//! from the start for the label values known in advance, and `relay_build_info`.
//!
//! Why zeros at start: a counter that first appears at its first increment has no earlier
//! sample, so `rate()` and `increase()` miss that first step, and an alert on a ratio cannot
//! tell "nothing failed" from "never scraped". The metric names are written out in full at
//! each `metrics::` call (not through constants) so that `.ci/check-observability.py` can find
//! them in the sources.

use std::sync::OnceLock;

use metrics::Unit;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, LogSettings};
use crate::heap::wire::RecordKind;

/// Installs the global tracing subscriber. Call once, from `main`.
pub fn init_tracing(settings: &LogSettings) {
    let filter = EnvFilter::try_new(&settings.level).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match settings.format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
        LogFormat::Pretty => builder.pretty().try_init(),
    };
}

/// Latency buckets (seconds) for request and Heap-call histograms.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The version built, for `relay_build_info{version}`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The commit built, for `relay_build_info{commit}`: set by `build.rs` from git (or from
/// `USERPILOT_HEAP_RELAY_COMMIT`), `unknown` when it could not tell (a build without `.git`).
pub const COMMIT: &str = match option_env!("USERPILOT_HEAP_RELAY_COMMIT") {
    Some(commit) => commit,
    None => "unknown",
};

/// The `outcome` label values of `relay_webhooks_total`: [`crate::http::error::ApiError::code`]
/// plus the three 202 answers and the request timeout (contract §8.2).
pub const WEBHOOK_OUTCOMES: &[&str] = &[
    "accepted",
    "duplicate",
    "quarantined",
    "filtered",
    "unknown_source",
    "invalid_signature",
    "invalid_json",
    "bad_request",
    "payload_too_large",
    "unsupported_media_type",
    "request_timeout",
    "unavailable",
    "timed_out",
];

/// The `reason` label values of `relay_signature_failures_total`
/// ([`crate::userpilot::SignatureError::reason`]).
pub const SIGNATURE_FAILURE_REASONS: &[&str] =
    &["missing", "malformed", "no_timestamp", "stale", "mismatch"];

/// The process-wide metrics recorder, installed and described on first use. Tests that build
/// several apps in one process share it.
pub fn metrics() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new();
            let builder = builder
                .set_buckets(LATENCY_BUCKETS)
                .unwrap_or_else(|_| PrometheusBuilder::new());
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_ok() {
                describe();
            }
            handle
        })
        .clone()
}

/// `# HELP` for every metric the relay exports, the build info, and the reload counters at
/// zero. The counters labelled by source or app id start at zero when the source or lane
/// does ([`zero_source_series`], [`zero_lane_series`]).
fn describe() {
    metrics::describe_counter!(
        "relay_webhooks_total",
        "Webhooks answered, by source and outcome (accepted, duplicate and quarantined are answered 202)."
    );
    metrics::describe_histogram!(
        "relay_webhook_duration_seconds",
        Unit::Seconds,
        "Time to answer a webhook, by source and outcome."
    );
    metrics::describe_counter!(
        "relay_shapes_overflow_total",
        "Webhooks whose new payload shape was not stored because their source already has capture.max_shapes_per_source shapes, by source."
    );
    metrics::describe_counter!(
        "relay_signature_failures_total",
        "Webhooks refused for their signature, by source and reason."
    );
    metrics::describe_counter!(
        "relay_events_forwarded_total",
        "Track events Heap accepted, by app id (property updates are not counted)."
    );
    metrics::describe_counter!(
        "relay_events_dead_lettered_total",
        "Queue records that became dead letters, by app id and reason; a quarantined webhook counts once."
    );
    metrics::describe_counter!(
        "relay_heap_requests_total",
        "Heap bulk requests made, by app id, endpoint and status (HTTP status, timeout, or error: no answer)."
    );
    metrics::describe_histogram!(
        "relay_heap_request_duration_seconds",
        Unit::Seconds,
        "Duration of Heap bulk requests, by app id and endpoint."
    );
    metrics::describe_gauge!(
        "relay_queue_depth",
        "Queue records (track events, property updates, quarantined webhooks) by app id and state, read at scrape time."
    );
    metrics::describe_gauge!(
        "relay_oldest_pending_age_seconds",
        Unit::Seconds,
        "Age of the oldest record not yet delivered (pending or in flight), by app id; 0 when there is none."
    );
    metrics::describe_gauge!(
        "relay_forwarder_state",
        "1 for the state of this process's forwarding lane (running, backing_off, paused), 0 for the others, by app id."
    );
    metrics::describe_gauge!(
        "relay_queue_leader",
        "Postgres queue only: 1 on the replica that forwards for the app id, 0 on the others."
    );
    metrics::describe_counter!(
        "relay_erasures_total",
        "Erasures of a person committed in the queue (POST /admin/erase, the erase command), by source."
    );
    metrics::describe_counter!(
        "relay_config_reloads_total",
        "Configuration reloads (SIGHUP, POST /admin/reload), by result: ok, or error (the running configuration stayed)."
    );
    metrics::describe_gauge!(
        "relay_build_info",
        "Always 1; the labels name the version and the commit built."
    );

    for result in ["ok", "error"] {
        metrics::counter!("relay_config_reloads_total", "result" => result).increment(0);
    }
    metrics::gauge!("relay_build_info", "version" => VERSION, "commit" => COMMIT).set(1.0);
}

/// Starts the counters of webhooks to `source` at zero, so rate and ratio queries have a series
/// from the first scrape (contract §8.2).
pub fn zero_source_series(source: &str) {
    metrics::counter!("relay_shapes_overflow_total", "source" => source.to_owned()).increment(0);
    metrics::counter!("relay_erasures_total", "source" => source.to_owned()).increment(0);
    for &outcome in WEBHOOK_OUTCOMES {
        metrics::counter!("relay_webhooks_total", "outcome" => outcome, "source" => source.to_owned())
            .increment(0);
    }
    for &reason in SIGNATURE_FAILURE_REASONS {
        metrics::counter!(
            "relay_signature_failures_total",
            "reason" => reason,
            "source" => source.to_owned()
        )
        .increment(0);
    }
}

/// Starts the counters of the lane of `app_id` at zero: dead letters of every reason
/// (contract §7.1), forwarded events, and `200` per Heap endpoint (statuses are open-ended;
/// the error-ratio queries need a denominator series to start from).
pub fn zero_lane_series(app_id: &str) {
    for reason in crate::dead_letters::Reason::ALL {
        metrics::counter!(
            "relay_events_dead_lettered_total",
            "reason" => reason.as_str(),
            "app_id" => app_id.to_owned()
        )
        .increment(0);
    }
    metrics::counter!("relay_events_forwarded_total", "app_id" => app_id.to_owned()).increment(0);
    for kind in RecordKind::ALL {
        metrics::counter!(
            "relay_heap_requests_total",
            "endpoint" => kind.as_str(),
            "status" => "200",
            "app_id" => app_id.to_owned()
        )
        .increment(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::userpilot::SignatureError;

    #[test]
    fn the_zeroed_signature_reasons_are_the_ones_the_verifier_reports() {
        use SignatureError::*;
        let reported: Vec<&str> = [Missing, Malformed, NoTimestamp, Stale, Mismatch]
            .iter()
            .map(SignatureError::reason)
            .collect();
        assert_eq!(reported, SIGNATURE_FAILURE_REASONS);
    }

    #[test]
    fn the_commit_is_a_short_hash_or_unknown() {
        assert!(
            COMMIT == "unknown"
                || (COMMIT.len() >= 7 && COMMIT.chars().all(|c| c.is_ascii_hexdigit())),
            "{COMMIT}"
        );
    }
}
