//! Heap's rate limits (SPEC §3), kept on our side so the relay never provokes a 429 in steady
//! state: a budget of events per minute for the whole app id, and one per identity. Both are
//! GCRA token buckets from `governor`.
//!
//! A noisy identity must not hold up the others, so the per-identity budget is applied record
//! by record: records over their identity's budget are held back (and rescheduled in the queue
//! for when the budget allows) while the rest of the batch goes ahead. The app budget is
//! applied per batch, by waiting.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::queue::Claimed;

pub struct Limits {
    app: DefaultDirectRateLimiter,
    identity: DefaultKeyedRateLimiter<String>,
    /// The largest batch the app budget can admit at once.
    app_burst: NonZeroU32,
    clock: DefaultClock,
}

fn non_zero(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN)
}

impl Limits {
    /// `batch_max` is the largest batch that will be asked for; the app budget's burst is that
    /// (so a full batch can go at once) and its rate is `events_per_minute`. An identity may
    /// burst a sixth of its per-minute budget (ten seconds' worth), then gets its rate.
    pub fn new(events_per_minute: u32, identity_events_per_minute: u32, batch_max: u32) -> Self {
        let app_burst = non_zero(batch_max.min(events_per_minute));
        let app = Quota::per_minute(non_zero(events_per_minute)).allow_burst(app_burst);
        let identity = Quota::per_minute(non_zero(identity_events_per_minute))
            .allow_burst(non_zero(identity_events_per_minute / 6));
        Self {
            app: RateLimiter::direct(app),
            identity: RateLimiter::keyed(identity),
            app_burst,
            clock: DefaultClock::default(),
        }
    }

    /// The largest batch worth claiming.
    pub fn max_batch(&self) -> usize {
        self.app_burst.get() as usize
    }

    /// Splits claimed records into those within their identity's budget and those held back,
    /// each with how long until its identity has budget again.
    pub fn admit(&self, records: Vec<Claimed>) -> (Vec<Claimed>, Vec<(Claimed, Duration)>) {
        let mut admitted = Vec::with_capacity(records.len());
        let mut held = Vec::new();
        for record in records {
            match self.identity.check_key(&record.subject) {
                Ok(()) => admitted.push(record),
                Err(not_until) => {
                    let wait = not_until.wait_time_from(self.clock.now());
                    held.push((record, wait));
                }
            }
        }
        (admitted, held)
    }

    /// Waits until the app budget admits `events` more events.
    pub async fn until_app_admits(&self, events: usize) {
        let events = non_zero(
            u32::try_from(events)
                .unwrap_or(u32::MAX)
                .min(self.app_burst.get()),
        );
        // Cannot fail: `events` is capped at the burst.
        let _ = self.app.until_n_ready(events).await;
    }

    /// Forgets identities that have been quiet long enough to have a full budget again, so
    /// the per-identity table does not grow with every identity ever seen.
    pub fn forget_idle_identities(&self) {
        self.identity.retain_recent();
        self.identity.shrink_to_fit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::heap::wire::RecordKind;

    fn record(id: i64, subject: &str) -> Claimed {
        Claimed {
            id,
            kind: RecordKind::Track,
            subject: subject.into(),
            json: String::new(),
            attempts: 0,
            received_at_ms: 0,
        }
    }

    #[test]
    fn a_noisy_identity_is_held_back_while_others_pass() {
        // 60/min per identity: a burst of 10, then one a second.
        let limits = Limits::new(15_000, 60, 1000);
        let mut batch: Vec<Claimed> = (0..30).map(|i| record(i, "noisy")).collect();
        batch.push(record(100, "quiet"));
        let (admitted, held) = limits.admit(batch);
        assert_eq!(admitted.len(), 11);
        assert!(admitted.iter().any(|r| r.subject == "quiet"));
        assert_eq!(held.len(), 20);
        assert!(
            held.iter()
                .all(|(r, wait)| r.subject == "noisy" && *wait > Duration::ZERO)
        );
    }

    #[test]
    fn the_batch_size_never_exceeds_the_app_budget() {
        assert_eq!(Limits::new(15_000, 1000, 1000).max_batch(), 1000);
        assert_eq!(Limits::new(300, 1000, 1000).max_batch(), 300);
    }
}
