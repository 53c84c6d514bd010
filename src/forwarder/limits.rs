//! Heap's rate limits (contract §3), kept on our side so the relay never provokes a 429 in
//! steady state: a budget of events per minute for the whole app id, and one per identity. Both
//! are GCRA token buckets from `governor`, running on the relay's [`Clock`] (its monotonic
//! time), so tests pin them with a manual clock and expect exact waits.
//!
//! A noisy identity must not hold up the others, so the per-identity budget is applied record
//! by record: records over their identity's budget are held back (and rescheduled in the queue
//! for when the budget allows) while the rest of the batch goes ahead. The app budget is
//! applied per batch, by waiting on the clock.
//!
//! The app budget outlives the process: a forwarder that starts (or takes over on Postgres)
//! [`Limits::precharge`]s it with what the queue says was delivered in the last minute, as if
//! all of it had been sent just now. Conservative: a restart never buys a fresh budget.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DashMapStateStore;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

use crate::clock::Clock;
use crate::queue::Claimed;

/// The window Heap's per-minute limits are counted over.
pub const RATE_WINDOW: Duration = Duration::from_secs(60);

/// governor's view of the relay's clock: its monotonic time, as a `Duration` (which governor
/// accepts as an instant).
#[derive(Clone)]
pub(crate) struct LimiterClock(Arc<dyn Clock>);

impl LimiterClock {
    pub(crate) fn new(clock: Arc<dyn Clock>) -> Self {
        LimiterClock(clock)
    }
}

impl governor::clock::Clock for LimiterClock {
    type Instant = Duration;

    fn now(&self) -> Duration {
        self.0.monotonic()
    }
}

type AppLimiter = RateLimiter<NotKeyed, InMemoryState, LimiterClock, NoOpMiddleware<Duration>>;
type IdentityLimiter =
    RateLimiter<String, DashMapStateStore<String>, LimiterClock, NoOpMiddleware<Duration>>;

pub struct Limits {
    app: AppLimiter,
    identity: IdentityLimiter,
    per_minute: NonZeroU32,
    /// The largest batch the app budget can admit at once.
    app_burst: NonZeroU32,
    /// How long one event of the app budget takes to come back.
    app_period: Duration,
    /// Monotonic time (ns) before which the app budget admits nothing: the debt
    /// [`Limits::precharge`] took on.
    app_opens_at_ns: AtomicU64,
    clock: Arc<dyn Clock>,
}

impl Limits {
    /// `batch_max` is the largest batch that will be asked for; the app budget's burst is that
    /// (so a full batch can go at once, capped at a minute's budget) and its rate is
    /// `events_per_minute`. An identity may burst a sixth of its per-minute budget (ten
    /// seconds' worth), then gets its rate.
    pub fn new(
        events_per_minute: NonZeroU32,
        identity_events_per_minute: NonZeroU32,
        batch_max: NonZeroU32,
        clock: Arc<dyn Clock>,
    ) -> Self {
        let app_burst = batch_max.min(events_per_minute);
        let app = Quota::per_minute(events_per_minute).allow_burst(app_burst);
        let identity_burst =
            NonZeroU32::new(identity_events_per_minute.get() / 6).unwrap_or(NonZeroU32::MIN);
        let identity = Quota::per_minute(identity_events_per_minute).allow_burst(identity_burst);
        let limiter_clock = LimiterClock(clock.clone());
        Self {
            app: RateLimiter::direct_with_clock(app, limiter_clock.clone()),
            identity: RateLimiter::dashmap_with_clock(identity, limiter_clock),
            per_minute: events_per_minute,
            app_burst,
            app_period: RATE_WINDOW / events_per_minute.get(),
            app_opens_at_ns: AtomicU64::new(0),
            clock,
        }
    }

    /// The app budget's events per minute.
    pub fn per_minute(&self) -> u64 {
        u64::from(self.per_minute.get())
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
                    let wait = not_until.wait_time_from(self.clock.monotonic());
                    held.push((record, wait));
                }
            }
        }
        (admitted, held)
    }

    /// Charges the app budget with `events` sent just now (elsewhere: before a restart, or by
    /// the replica that forwarded before this one). Nothing more is admitted until they would
    /// have been paid back at the budget's rate; then a full batch, as from a rested budget.
    /// In any minute, that keeps what was sent and what will be within a minute's budget plus
    /// one batch.
    pub fn precharge(&self, events: u64) {
        let debt = self
            .app_period
            .saturating_mul(u32::try_from(events).unwrap_or(u32::MAX));
        let opens_at = self.clock.monotonic().saturating_add(debt);
        let opens_at_ns = u64::try_from(opens_at.as_nanos()).unwrap_or(u64::MAX);
        self.app_opens_at_ns
            .fetch_max(opens_at_ns, Ordering::SeqCst);
    }

    /// Takes `events` (capped at the burst) from the app budget if it has them now; otherwise
    /// says how long until it will, taking nothing.
    pub fn try_app(&self, events: usize) -> Result<(), Duration> {
        let now = self.clock.monotonic();
        let opens_at = Duration::from_nanos(self.app_opens_at_ns.load(Ordering::SeqCst));
        if now < opens_at {
            return Err(opens_at - now);
        }
        let events = u32::try_from(events)
            .unwrap_or(u32::MAX)
            .clamp(1, self.app_burst.get());
        let events = NonZeroU32::new(events).unwrap_or(NonZeroU32::MIN);
        match self.app.check_n(events) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(not_until.wait_time_from(now)),
            // Cannot happen: `events` is capped at the burst.
            Err(_) => Ok(()),
        }
    }

    /// Waits (on the clock) until the app budget admits `events` more events, and takes them.
    pub async fn until_app_admits(&self, events: usize) {
        while let Err(wait) = self.try_app(events) {
            self.clock.sleep(wait).await;
        }
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
    use crate::clock::ManualClock;
    use crate::heap::wire::RecordKind;

    fn record(id: i64, subject: &str) -> Claimed {
        Claimed {
            id,
            kind: RecordKind::Track,
            subject: subject.into(),
            json: String::new(),
            attempts: 0,
            received_at_ms: 0,
            webhook_digest: [0; 32],
            webhook_received_at_ms: 0,
        }
    }

    fn n(value: u32) -> NonZeroU32 {
        NonZeroU32::new(value).unwrap()
    }

    /// Limits on a manual clock at its start.
    fn limits(per_minute: u32, identity_per_minute: u32, batch: u32) -> (Limits, ManualClock) {
        let clock = ManualClock::at_ms(1_700_000_000_000);
        let limits = Limits::new(
            n(per_minute),
            n(identity_per_minute),
            n(batch),
            Arc::new(clock.clone()),
        );
        (limits, clock)
    }

    #[test]
    fn a_noisy_identity_gets_ten_at_once_then_one_a_second_while_others_pass() {
        // 60/min per identity: a burst of 10, then one a second.
        let (limits, clock) = limits(15_000, 60, 1000);
        let mut batch: Vec<Claimed> = (0..30).map(|i| record(i, "noisy")).collect();
        batch.push(record(100, "quiet"));
        let (admitted, held) = limits.admit(batch);
        assert_eq!(admitted.len(), 11);
        assert_eq!(admitted.iter().filter(|r| r.subject == "noisy").count(), 10);
        assert!(admitted.iter().any(|r| r.subject == "quiet"));
        assert_eq!(held.len(), 20);
        for (record, wait) in &held {
            assert_eq!(record.subject, "noisy");
            assert_eq!(*wait, Duration::from_secs(1));
        }

        // 999 ms later the 11th still waits, for exactly the remaining millisecond.
        clock.advance_ms(999);
        let (admitted, held) = limits.admit(vec![record(200, "noisy")]);
        assert!(admitted.is_empty());
        assert_eq!(held[0].1, Duration::from_millis(1));
        clock.advance_ms(1);
        let (admitted, held) = limits.admit(vec![record(201, "noisy"), record(202, "noisy")]);
        assert_eq!((admitted.len(), held.len()), (1, 1));
        assert_eq!(held[0].1, Duration::from_secs(1));
    }

    #[test]
    fn the_app_budget_admits_a_full_batch_then_events_at_its_rate() {
        // 600/min: one event every 100 ms after a burst of one batch (100).
        let (limits, clock) = limits(600, 1000, 100);
        assert_eq!(limits.try_app(100), Ok(()));
        assert_eq!(limits.try_app(1), Err(Duration::from_millis(100)));
        assert_eq!(limits.try_app(30), Err(Duration::from_secs(3)));
        clock.advance_ms(3000);
        assert_eq!(limits.try_app(30), Ok(()));
        assert_eq!(limits.try_app(1), Err(Duration::from_millis(100)));
    }

    #[tokio::test]
    async fn waiting_for_the_app_budget_waits_exactly_on_the_clock() {
        let (limits, clock) = limits(600, 1000, 100);
        limits.until_app_admits(100).await;
        assert_eq!(clock.monotonic(), Duration::ZERO);
        limits.until_app_admits(50).await;
        assert_eq!(clock.monotonic(), Duration::from_secs(5));
        // More than a batch is asked as a batch: the burst is the most it can ever admit.
        limits.until_app_admits(1000).await;
        assert_eq!(clock.monotonic(), Duration::from_secs(15));
    }

    #[test]
    fn a_precharged_budget_opens_when_the_charged_events_are_paid_back() {
        // 600 events delivered in the last minute, before a restart: a minute's budget.
        let (limits, clock) = limits(600, 1000, 100);
        limits.precharge(600);
        assert_eq!(limits.try_app(1), Err(Duration::from_secs(60)));
        clock.advance_ms(59_900);
        assert_eq!(limits.try_app(100), Err(Duration::from_millis(100)));
        clock.advance_ms(100);
        assert_eq!(limits.try_app(100), Ok(()));
        assert_eq!(limits.try_app(1), Err(Duration::from_millis(100)));
        // A smaller charge later never shortens a longer one.
        limits.precharge(0);
        assert_eq!(limits.try_app(1), Err(Duration::from_millis(100)));
    }

    #[test]
    fn the_batch_size_never_exceeds_the_app_budget() {
        assert_eq!(limits(15_000, 1000, 1000).0.max_batch(), 1000);
        assert_eq!(limits(300, 1000, 1000).0.max_batch(), 300);
    }
}
