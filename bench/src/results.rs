//! What a suite run measured: the figures `suite` collects, saves as JSON and hands to
//! `report` (and `smoke` checks), and the server names that label its runs. Plain data with
//! serde derives and nothing else, so that the modules that fill it in and the one that
//! renders it both depend on this one instead of on each other.

use serde::{Deserialize, Serialize};

use crate::load::{RunResult, Sent};
use crate::postgres::Setup;
use crate::storage::Storage;

/// Where, when and on which commit the suite ran.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    pub cpu_model: String,
    pub nproc: usize,
    pub kernel: String,
    pub load_before: String,
    pub load_after: String,
    pub commit: String,
    pub date: String,
    pub total_s: f64,
}

/// Resident sets (MiB) of the servers, idle and at their peaks.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Memory {
    pub baseline_idle_mib: Option<f64>,
    pub relay_idle_mib: Option<f64>,
    pub baseline_peak_mib: Option<f64>,
    pub relay_peak_mib: Option<f64>,
    pub relay_after_load_mib: Option<f64>,
    /// The relay on Postgres, during the ingest runs.
    #[serde(default)]
    pub relay_postgres_idle_mib: Option<f64>,
    #[serde(default)]
    pub relay_postgres_peak_mib: Option<f64>,
    /// Peak of the relay used for the forwarding measurements.
    pub forwarding_peak_mib: Option<f64>,
    pub drain_peak_mib: Option<f64>,
    /// Peak RSS of a fresh relay after a closed loop at each connection count, rising.
    pub by_connections: Vec<ConnectionsMemory>,
}

/// One step of the memory probe: a fresh relay after a closed loop at `connections`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConnectionsMemory {
    pub connections: usize,
    pub peak_mib: Option<f64>,
    pub throughput: f64,
    pub p99_ms: f64,
}

/// A backlog released to the forwarder (or live forwarding), as seen by the sink.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Drain {
    pub webhooks: u64,
    /// Track events the relay said it queued (its 202 answers).
    pub events: u64,
    /// Seconds to queue the webhooks, and the rate.
    pub ingest_s: f64,
    pub ingest_per_s: f64,
    /// Seconds from release to the last track event received.
    pub drain_s: f64,
    pub events_per_s: f64,
    pub track_requests: usize,
    pub track_events: usize,
    pub user_requests: usize,
    pub users: usize,
    pub account_requests: usize,
    /// `/api/track` requests per 1,000 track events.
    pub track_requests_per_1000: f64,
    /// Every Heap request (track + user/account properties) per 1,000 track events.
    pub all_requests_per_1000: f64,
    pub mean_batch: f64,
    /// `/api/track` requests carrying a full batch (1,000 events).
    pub full_batches: usize,
    pub relay_cpu_s: Option<f64>,
}

/// The large drain, watched: the configured rate, the relay's resident set sampled every
/// second from the release to the last event, and ingest measured while it drained.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DrainWatch {
    pub events_per_minute: u32,
    /// `VmRSS` (MiB) once a second from the release.
    pub rss_mib: Vec<f64>,
    /// Open loop at the p99 target's rate, then closed loop at 32 in flight, during the drain.
    pub ingest: Vec<RunResult>,
}

/// The low-limit drain, checked against the GCRA bound `burst + rate * t`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LimitCheck {
    pub configured_per_min: u32,
    pub burst: u32,
    pub drain: Drain,
    /// Events per minute after the initial burst, from the first to the last track request.
    pub steady_per_min: f64,
    /// Largest `delivered - (burst + rate * t)` over every arrival (<= 0: never exceeded).
    pub worst_excess_events: f64,
    /// Most events in any window of 10 s, and what the limit allows in 10 s (`limit / 6`).
    pub max_in_10s: usize,
    pub span_s: f64,
}

/// The cost of routing (issue 12): the relay with one source against the relay with ten over
/// three app ids, interleaved (their runs are in [`Results::runs`] as [`ONE_SOURCE`] and
/// [`TEN_SOURCES`]); then every lane drained into the sink, counted per app id.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Routing {
    /// The ten-source relay's sources, with every answer each got over all runs.
    pub sources: Vec<RoutedSource>,
    /// Per relay and app id: what the relay accepted and what reached the sink.
    pub deliveries: Vec<Delivery>,
    /// `heap.events_per_minute` (and per identity) of both relays, for the drain.
    pub events_per_minute: u32,
    /// Seconds from releasing both forwarders until both queues were empty.
    pub drain_s: f64,
    /// Peak resident sets (`VmHWM`) at the end.
    pub one_source_peak_mib: Option<f64>,
    pub ten_sources_peak_mib: Option<f64>,
}

/// One source of the ten-source relay.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoutedSource {
    pub name: String,
    pub app_id: String,
    pub sent: Sent,
}

/// One app id of one relay after the drain. An app id the sink saw but no source has is a row
/// with no sources and nothing expected.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Delivery {
    pub server: String,
    pub app_id: String,
    pub sources: Vec<String>,
    /// Webhooks answered 202 `accepted` by those sources, over all runs.
    pub webhooks: u64,
    /// Track events the relay said it queued for them.
    pub expected_events: u64,
    /// Requests that got no answer (the relay may have queued them: they may add events).
    pub unanswered: u64,
    /// Requests answered otherwise than 202 (none expected; 503 if the relay shed load).
    #[serde(default)]
    pub refused: u64,
    /// Track events the sink received for this app id, and in how many requests.
    pub delivered_events: u64,
    pub track_requests: u64,
}

/// Every figure of one suite run: what `--json` saves and `render` reads back.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Results {
    pub machine: Machine,
    pub runs_per_mode: usize,
    pub duration_s: f64,
    pub warmup_s: f64,
    pub users: usize,
    pub runs: Vec<RunResult>,
    pub memory: Memory,
    pub saturation: Option<Drain>,
    pub live: Option<Drain>,
    pub limit: Option<LimitCheck>,
    pub big_drain: Option<Drain>,
    /// What was seen while the large backlog drained.
    #[serde(default)]
    pub big_drain_watch: Option<DrainWatch>,
    pub notes: Vec<String>,
    /// The Postgres server measured (`--postgres`), as it described itself at bench time.
    #[serde(default)]
    pub postgres: Option<Setup>,
    /// One source against ten (issue 12).
    #[serde(default)]
    pub routing: Option<Routing>,
    /// No transform against `.` and a reshaping program (issue 13).
    #[serde(default)]
    pub transforms: Option<crate::transforms::Comparison>,
    /// The relay's queue after the ingest runs, on SQLite and on Postgres (issue 17: stored
    /// bytes per webhook).
    #[serde(default)]
    pub storage: Option<Storage>,
    #[serde(default)]
    pub storage_postgres: Option<Storage>,
}

/// Server names in the runs (and the saved JSON).
pub const BASELINE: &str = "baseline";
/// The relay on SQLite.
pub const RELAY: &str = "relay";
/// The relay on Postgres.
pub const RELAY_POSTGRES: &str = "relay-postgres";
/// The relays on an empty queue.
pub const FRESH: &str = "relay-fresh";
pub const FRESH_POSTGRES: &str = "relay-postgres-fresh";
/// The relays of the routing comparison: one source (top-level keys), ten over three app ids.
pub const ONE_SOURCE: &str = "relay-1-source";
pub const TEN_SOURCES: &str = "relay-10-sources";
