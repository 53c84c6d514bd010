//! Lanes: one [`Forwarder`] per Heap app id (contract §9), each with its own client, rate
//! budget, batches, backoff and pause switch, so an app id that Heap refuses, throttles or
//! cannot reach holds up only its own records.
//!
//! [`Lanes`] is the registry the rest of the process talks to (wake a lane, pause one or all,
//! list them); [`run`] is the supervisor task that starts a forwarder for every lane
//! registered — at start, and later when a reload adds a source with a new app id. A lane is
//! never stopped before shutdown: one whose app id left the configuration still delivers what
//! was queued for it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::{Control, Forwarder};
use crate::config::AppId;

/// Every lane of the process, by app id.
#[derive(Debug)]
pub struct Lanes {
    lanes: Mutex<BTreeMap<String, Arc<Control>>>,
    /// Lanes registered but not started yet, for [`run`].
    start: mpsc::UnboundedSender<(AppId, Arc<Control>)>,
    /// An operator paused every lane: a lane registered meanwhile starts paused too.
    all_paused: AtomicBool,
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
}

/// Builds the forwarder of one lane.
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
                if let Some(forwarder) = build(&app_id, control) {
                    tracing::info!(app_id = %app_id, "forwarding lane started");
                    forwarders.spawn(forwarder.run(shutdown.clone()));
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
}
