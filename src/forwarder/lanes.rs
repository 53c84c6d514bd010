//! Lanes: one pair of [`Forwarder`]s per Heap app id (contract §9) — one for track events,
//! one for property updates ([`KIND_GROUPS`]) — each lane with its own clients, rate budget,
//! batches, backoff and pause switch, so an app id that Heap refuses, throttles or cannot reach
//! holds up only its own records.
//!
//! [`Lanes`] is the registry the rest of the process talks to (wake a lane, pause one or all,
//! list them); [`run`] is the supervisor task that starts a forwarder for every lane
//! registered — at start, and later when a reload adds a source with a new app id. A lane is
//! never stopped before shutdown: one whose app id left the configuration still delivers what
//! was queued for it.
//!
//! The admin API and the console share [`Lanes::switch`] (pause or resume, and its log line)
//! and [`Lanes::status`] (each lane with its queue counts).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::{Control, Forwarder, KIND_GROUPS};
use crate::config::AppId;
use crate::queue::{Queue, QueueError, QueueStats};

/// Every lane of the process, by app id.
#[derive(Debug)]
pub struct Lanes {
    lanes: Mutex<BTreeMap<String, Arc<Control>>>,
    /// Lanes registered but not started yet, for [`run`].
    start: mpsc::UnboundedSender<(AppId, Arc<Control>)>,
    /// An operator paused every lane: a lane registered meanwhile starts paused too.
    all_paused: AtomicBool,
}

/// One lane as the status pages show it: its switch and forwarder state, and its records.
#[derive(Debug, Clone)]
pub struct LaneStatus {
    pub app_id: String,
    pub control: Arc<Control>,
    pub queue: QueueStats,
}

/// Every lane with its queue counts, and the counts of the whole queue (which include app ids
/// no lane forwards for any more, and records from before sources existed).
#[derive(Debug, Clone)]
pub struct Status {
    pub queue: QueueStats,
    pub lanes: Vec<LaneStatus>,
}

/// Lanes registered and waiting for [`run`] to start their forwarders.
pub type Starts = mpsc::UnboundedReceiver<(AppId, Arc<Control>)>;

impl Lanes {
    pub fn new() -> (Arc<Lanes>, Starts) {
        let (start, starts) = mpsc::unbounded_channel();
        let lanes = Lanes {
            lanes: Mutex::default(),
            start,
            all_paused: AtomicBool::new(false),
        };
        (Arc::new(lanes), starts)
    }

    fn map(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<Control>>> {
        // Nothing panics while holding the lock: a poisoned map is still whole.
        self.lanes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Registers a lane for `app_id` unless there is one; [`run`] starts its forwarder.
    /// Returns whether the lane is new.
    pub fn ensure(&self, app_id: &AppId) -> bool {
        let mut lanes = self.map();
        if lanes.contains_key(app_id.as_str()) {
            return false;
        }
        let control = Arc::new(Control::default());
        if self.all_paused.load(Ordering::SeqCst) {
            control.set_paused(true);
        }
        lanes.insert(app_id.as_str().to_owned(), control.clone());
        // The receiver lives as long as the process serves; after shutdown nothing is started.
        let _ = self.start.send((app_id.clone(), control));
        true
    }

    pub fn control(&self, app_id: &str) -> Option<Arc<Control>> {
        self.map().get(app_id).cloned()
    }

    /// Every lane, by app id.
    pub fn all(&self) -> Vec<(String, Arc<Control>)> {
        self.map()
            .iter()
            .map(|(id, control)| (id.clone(), control.clone()))
            .collect()
    }

    /// New records are queued for `app_id`.
    pub fn wake(&self, app_id: &str) {
        if let Some(control) = self.control(app_id) {
            control.wake();
        }
    }

    /// Pauses or resumes every lane, and the lanes registered later.
    pub fn set_all_paused(&self, paused: bool) {
        self.all_paused.store(paused, Ordering::SeqCst);
        for (_, control) in self.all() {
            control.set_paused(paused);
        }
    }

    /// An operator pauses or resumes the lane of `app_id`, or every lane (and those
    /// registered later) for `None`. Returns the app ids switched, or `None` when no lane has
    /// that app id (nothing is switched then).
    pub fn switch(&self, app_id: Option<&str>, paused: bool) -> Option<Vec<String>> {
        let app_ids: Vec<String> = match app_id {
            None => {
                self.set_all_paused(paused);
                self.all().into_iter().map(|(id, _)| id).collect()
            }
            Some(app_id) => {
                self.control(app_id)?.set_paused(paused);
                vec![app_id.to_owned()]
            }
        };
        if paused {
            tracing::warn!(?app_ids, "forwarding paused by an operator");
        } else {
            tracing::info!(?app_ids, "forwarding resumed by an operator");
        }
        Some(app_ids)
    }

    /// Every lane with its queue counts as of `now_ms` (one scan of the queue).
    pub async fn status(&self, queue: &dyn Queue, now_ms: i64) -> Result<Status, QueueError> {
        let by_lane = queue.lane_stats(now_ms).await?;
        let lanes = self
            .all()
            .into_iter()
            .map(|(app_id, control)| LaneStatus {
                queue: by_lane.get(&app_id).copied().unwrap_or_default(),
                app_id,
                control,
            })
            .collect();
        Ok(Status {
            queue: QueueStats::sum(by_lane.values()),
            lanes,
        })
    }
}

/// Builds a forwarder of one lane (called once per group of kinds).
pub type Build = Box<dyn Fn(&AppId, Arc<Control>) -> Option<Forwarder> + Send + Sync>;

/// Starts a forwarder for every lane registered, until `shutdown`; then waits for them all to
/// finish or abandon their batches (each within the grace period on its own). Returns early
/// if a lane stops before shutdown, which only a fault does.
pub async fn run(mut starts: Starts, build: Build, shutdown: CancellationToken) {
    let mut forwarders = JoinSet::new();
    loop {
        tokio::select! {
            started = starts.recv() => {
                let Some((app_id, control)) = started else { break };
                // One task per group of kinds, so that neither holds the other back.
                let groups: Option<Vec<Forwarder>> = (0..KIND_GROUPS.len())
                    .map(|group| Some(build(&app_id, control.clone())?.for_group(group)))
                    .collect();
                if let Some(groups) = groups {
                    tracing::info!(app_id = %app_id, "forwarding lane started");
                    for forwarder in groups {
                        forwarders.spawn(forwarder.run(shutdown.clone()));
                    }
                }
            }
            Some(done) = forwarders.join_next(), if !forwarders.is_empty() => {
                // A lane runs until shutdown; one that ended is a fault (a panic), and the
                // process must stop rather than leave its app id unforwarded.
                if let Err(error) = done {
                    tracing::error!(%error, "a forwarding lane failed");
                }
                return;
            }
            () = shutdown.cancelled() => break,
        }
    }
    while forwarders.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app(id: &str) -> AppId {
        AppId::try_from(id.to_owned()).unwrap()
    }

    #[test]
    fn a_lane_is_registered_and_started_once_per_app_id() {
        let (lanes, mut starts) = Lanes::new();
        assert!(lanes.ensure(&app("1")));
        assert!(!lanes.ensure(&app("1")));
        assert!(lanes.ensure(&app("2")));
        let started: Vec<String> = std::iter::from_fn(|| starts.try_recv().ok())
            .map(|(id, _)| id.to_string())
            .collect();
        assert_eq!(started, ["1", "2"]);
        let ids: Vec<String> = lanes.all().into_iter().map(|(id, _)| id).collect();
        assert_eq!(ids, ["1", "2"]);
        assert!(lanes.control("3").is_none());
    }

    #[test]
    fn pausing_one_lane_leaves_the_others_and_pausing_all_covers_later_lanes() {
        let (lanes, _starts) = Lanes::new();
        lanes.ensure(&app("1"));
        lanes.ensure(&app("2"));
        lanes.control("1").unwrap().set_paused(true);
        assert!(lanes.control("1").unwrap().is_paused());
        assert!(!lanes.control("2").unwrap().is_paused());
        lanes.set_all_paused(true);
        lanes.ensure(&app("3"));
        assert!(lanes.all().iter().all(|(_, control)| control.is_paused()));
        lanes.set_all_paused(false);
        lanes.ensure(&app("4"));
        assert!(lanes.all().iter().all(|(_, control)| !control.is_paused()));
    }

    #[test]
    fn the_operators_switch_names_the_lanes_it_switched_and_refuses_an_unknown_one() {
        let (lanes, _starts) = Lanes::new();
        lanes.ensure(&app("1"));
        lanes.ensure(&app("2"));
        assert_eq!(lanes.switch(Some("2"), true), Some(vec!["2".to_owned()]));
        assert!(lanes.control("2").unwrap().is_paused());
        assert!(!lanes.control("1").unwrap().is_paused());
        assert_eq!(lanes.switch(Some("3"), true), None);
        assert!(!lanes.control("1").unwrap().is_paused());
        assert_eq!(lanes.switch(None, true), Some(vec!["1".into(), "2".into()]));
        // Every lane: the lanes registered later start paused too.
        lanes.ensure(&app("3"));
        assert!(lanes.control("3").unwrap().is_paused());
        assert_eq!(lanes.switch(None, false).map(|ids| ids.len()), Some(3));
        assert!(lanes.all().iter().all(|(_, control)| !control.is_paused()));
    }
}
