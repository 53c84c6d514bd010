//! The only place that reads the clock, wall or monotonic. Everything else takes `now` as an
//! argument, a [`Clock`] (for decisions: due times, rate budgets, caches) or a [`Stopwatch`]
//! (for measurements that only feed metrics and logs), so tests can pin time where it matters.
//!
//! `clippy.toml` forbids `Utc::now`, `SystemTime::now` and `Instant::now` everywhere else;
//! this module is the one allowed exception.
// The exception the lint's configuration names: this module is where the clock is read.
#![allow(clippy::disallowed_methods)]

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};

/// A future returned by [`Clock::sleep`].
pub type Sleep = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

pub trait Clock: Send + Sync + 'static {
    /// Wall-clock time: what is stored and compared with other machines.
    fn now(&self) -> DateTime<Utc>;

    fn now_ms(&self) -> i64 {
        self.now().timestamp_millis()
    }

    /// Time since an arbitrary origin fixed for the clock's life, never going back when the
    /// wall clock is set: for intervals (rate budgets, caches, "every minute").
    fn monotonic(&self) -> Duration;

    /// Waits `duration` as this clock counts it.
    fn sleep(&self, duration: Duration) -> Sleep;
}

/// The real clock. Its monotonic time is tokio's, so tests on paused tokio time see it pause
/// (and [`Clock::sleep`] is `tokio::time::sleep`).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

/// The monotonic origin of every [`SystemClock`]: the first reading in the process.
fn origin() -> tokio::time::Instant {
    static ORIGIN: OnceLock<tokio::time::Instant> = OnceLock::new();
    *ORIGIN.get_or_init(tokio::time::Instant::now)
}

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }

    fn monotonic(&self) -> Duration {
        let origin = origin();
        tokio::time::Instant::now().saturating_duration_since(origin)
    }

    fn sleep(&self, duration: Duration) -> Sleep {
        Box::pin(tokio::time::sleep(duration))
    }
}

/// A clock that moves only when told to; for tests. Wall and monotonic time move together;
/// monotonic time starts at zero. A [`Clock::sleep`] returns at once, having moved the clock by
/// its length (as tokio's paused time auto-advances), so code that waits on this clock runs
/// without waiting and sees exactly the time it waited for.
#[derive(Debug, Clone, Default)]
pub struct ManualClock {
    start_ms: i64,
    now_ms: Arc<AtomicI64>,
}

impl ManualClock {
    pub fn at_ms(ms: i64) -> Self {
        Self {
            start_ms: ms,
            now_ms: Arc::new(AtomicI64::new(ms)),
        }
    }

    pub fn advance_ms(&self, ms: i64) {
        self.now_ms.fetch_add(ms, Ordering::SeqCst);
    }

    pub fn advance(&self, by: Duration) {
        self.advance_ms(i64::try_from(by.as_millis()).unwrap_or(i64::MAX));
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(self.now_ms.load(Ordering::SeqCst)).unwrap_or_default()
    }

    fn monotonic(&self) -> Duration {
        let elapsed = self.now_ms.load(Ordering::SeqCst) - self.start_ms;
        Duration::from_millis(u64::try_from(elapsed).unwrap_or(0))
    }

    fn sleep(&self, duration: Duration) -> Sleep {
        self.advance(duration);
        Box::pin(std::future::ready(()))
    }
}

/// Now on tokio's timer, for the deadlines of network I/O (a request's headers and body, an
/// idle connection). They guard real sockets, so their tests run on real (or tokio's paused)
/// time; decisions that a test must pin take a [`Clock`] instead.
pub fn io_instant() -> tokio::time::Instant {
    tokio::time::Instant::now()
}

/// Real elapsed time, for durations that only feed metrics and logs (a request's latency, how
/// long since a warning was last logged). Decisions a test must pin take a [`Clock`] instead.
#[derive(Debug, Clone, Copy)]
pub struct Stopwatch(tokio::time::Instant);

impl Stopwatch {
    pub fn start() -> Self {
        Self(tokio::time::Instant::now())
    }

    pub fn elapsed(&self) -> Duration {
        self.0.elapsed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_manual_clock_sleeps_by_moving_its_time() {
        let clock = ManualClock::at_ms(1_000_000);
        assert_eq!(clock.monotonic(), Duration::ZERO);
        clock.sleep(Duration::from_millis(1500)).await;
        assert_eq!(clock.now_ms(), 1_001_500);
        assert_eq!(clock.monotonic(), Duration::from_millis(1500));
    }
}
