//! What a lane's forwarder shares with the rest of the process ([`Control`]): the doorbell rung
//! when records are queued, the pause switch, and what the forwarder reports of itself for the
//! console and `/metrics` (its state, when a backoff ends, events forwarded, Heap's last error).
//!
//! A lane forwards its record kinds in [`KIND_GROUPS`], each group in a task of its own (see
//! [`super::lanes`]): track events, and property updates. Heap takes them at separate
//! endpoints, so a slow or failing property endpoint, or a large property claim, never holds
//! track events back. Each group has its own doorbell and its own backoff; the lane shows as
//! backing off while any of its groups does.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};

use tokio::sync::Notify;

use crate::heap::wire::RecordKind;

/// The record kinds of a lane, in the groups that are forwarded each by a task of its own.
pub const KIND_GROUPS: [&[RecordKind]; 2] = [
    &[RecordKind::Track],
    &[RecordKind::User, RecordKind::Account],
];

/// What the forwarder is doing, for `/metrics` and the admin API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ForwarderState {
    Running = 0,
    BackingOff = 1,
    Paused = 2,
}

impl ForwarderState {
    pub fn as_str(self) -> &'static str {
        match self {
            ForwarderState::Running => "running",
            ForwarderState::BackingOff => "backing_off",
            ForwarderState::Paused => "paused",
        }
    }
}

/// The most characters of a Heap error kept for the console ([`Control::last_heap_error`]).
pub const HEAP_ERROR_TEXT_MAX: usize = 500;

/// The last time Heap failed a lane's request, as the console shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeapError {
    /// When the answer (or the failure to get one) came, unix ms.
    pub at_ms: i64,
    /// Heap's HTTP status; `None` when Heap did not answer (timeout, connection error).
    pub status: Option<u16>,
    /// The text logged and stored as the records' `last_error` (or the dead letter's
    /// detail), cut to [`HEAP_ERROR_TEXT_MAX`] characters.
    pub text: String,
}

/// One group of kinds' share of [`Control`].
#[derive(Debug, Default)]
struct Group {
    wake: Notify,
    /// While the group backs off: when its next attempt is due, unix ms; 0 otherwise.
    backoff_until_ms: AtomicI64,
}

/// Shared between a lane's forwarder tasks and the rest of the process.
#[derive(Debug, Default)]
pub struct Control {
    groups: [Group; KIND_GROUPS.len()],
    paused: AtomicBool,
    /// Track events Heap accepted from this lane since the process started (as
    /// `relay_events_forwarded_total` counts them).
    forwarded: AtomicU64,
    last_heap_error: Mutex<Option<HeapError>>,
}

impl Control {
    /// New records are queued: every group looks (each keeps the ring until it waits).
    pub fn wake(&self) {
        for group in &self.groups {
            group.wake.notify_one();
        }
    }

    /// Waits for [`Control::wake`] (or a pause switch), as group `group`.
    pub(super) async fn rung(&self, group: usize) {
        self.groups[group].wake.notified().await;
    }

    pub fn set_paused(&self, paused: bool) {
        self.paused.store(paused, Ordering::SeqCst);
        self.wake();
    }

    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    /// The state as an operator should see it: the pause switch wins at once (a request
    /// already in flight still finishes, and no other starts), and a resume shows as running
    /// at once, before the loop wakes up to it; otherwise backing off while any group is.
    pub fn state(&self) -> ForwarderState {
        if self.is_paused() {
            ForwarderState::Paused
        } else if self.backing_off().next().is_some() {
            ForwarderState::BackingOff
        } else {
            ForwarderState::Running
        }
    }

    /// Group `group` runs again (or parks on a pause): its backoff, if it had one, is over.
    pub(super) fn end_backoff(&self, group: usize) {
        self.groups[group]
            .backoff_until_ms
            .store(0, Ordering::SeqCst);
    }

    /// Group `group` waits until `until_ms` (unix ms) before its next attempt.
    pub(super) fn back_off_until(&self, group: usize, until_ms: i64) {
        // 0 means "not backing off"; no backoff ends at the epoch.
        let until_ms = until_ms.max(1);
        self.groups[group]
            .backoff_until_ms
            .store(until_ms, Ordering::SeqCst);
    }

    fn backing_off(&self) -> impl Iterator<Item = i64> + '_ {
        self.groups
            .iter()
            .map(|group| group.backoff_until_ms.load(Ordering::SeqCst))
            .filter(|&until| until != 0)
    }

    /// While the state is backing off: when the next attempt is due (unix ms), the earliest
    /// of the groups backing off.
    pub fn backoff_until_ms(&self) -> Option<i64> {
        if self.is_paused() {
            return None;
        }
        self.backing_off().min()
    }

    /// Track events Heap accepted from this lane since the process started.
    pub fn forwarded(&self) -> u64 {
        self.forwarded.load(Ordering::Relaxed)
    }

    pub(super) fn count_forwarded(&self, events: u64) {
        self.forwarded.fetch_add(events, Ordering::Relaxed);
    }

    /// What Heap last failed with (a retryable failure or a refusal), if it ever did.
    pub fn last_heap_error(&self) -> Option<HeapError> {
        self.heap_error_slot().clone()
    }

    pub(super) fn record_heap_error(&self, at_ms: i64, status: Option<u16>, text: &str) {
        *self.heap_error_slot() = Some(HeapError {
            at_ms,
            status,
            text: crate::heap::client::truncate(text, HEAP_ERROR_TEXT_MAX),
        });
    }

    fn heap_error_slot(&self) -> std::sync::MutexGuard<'_, Option<HeapError>> {
        // Nothing panics while holding the lock: a poisoned slot still holds a whole value.
        self.last_heap_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_shows_a_pause_and_a_resume_before_the_loop_sees_them() {
        let control = Control::default();
        control.back_off_until(0, 5_000);
        control.set_paused(true);
        assert_eq!(control.state(), ForwarderState::Paused);
        assert_eq!(control.backoff_until_ms(), None);
        // The loop parked itself; a resume shows as running before it wakes up.
        control.end_backoff(0);
        control.set_paused(false);
        assert_eq!(control.state(), ForwarderState::Running);
        control.back_off_until(0, 5_000);
        assert_eq!(control.state(), ForwarderState::BackingOff);
    }

    #[test]
    fn a_lane_backs_off_while_any_group_does_until_the_earliest_next_attempt() {
        let control = Control::default();
        control.back_off_until(1, 9_000);
        assert_eq!(control.state(), ForwarderState::BackingOff);
        // The other group running does not hide the property group's backoff.
        control.end_backoff(0);
        assert_eq!(control.backoff_until_ms(), Some(9_000));
        control.back_off_until(0, 7_000);
        assert_eq!(control.backoff_until_ms(), Some(7_000));
        control.end_backoff(0);
        control.end_backoff(1);
        assert_eq!(control.state(), ForwarderState::Running);
        assert_eq!(control.backoff_until_ms(), None);
    }

    #[tokio::test]
    async fn a_ring_reaches_every_group_even_one_busy_when_it_came() {
        let control = Control::default();
        control.wake();
        // Neither group was waiting: each finds the ring kept when it next waits.
        for group in 0..KIND_GROUPS.len() {
            tokio::time::timeout(std::time::Duration::from_secs(5), control.rung(group))
                .await
                .expect("the ring was lost");
        }
    }
}
