//! The failure policy, pure: what a Heap outcome means (contract §3) and how long to wait before
//! trying again. The random source comes in as an argument, so tests are exact.
//!
//! Why not a backoff crate: the delay here is a function of the attempt count stored in the
//! queue, and the result is stored as a due time, so retries survive restarts. Iterator-style
//! backoff crates keep that state in memory and draw their own randomness; the formula itself is
//! two lines.

use std::time::Duration;

use crate::heap::client::{HeapResponse, TransportError};

/// The shortest wait after Heap said 429, whatever the backoff says: being throttled means the
/// budget is gone for a while, and hammering it again makes things worse.
pub const THROTTLED_FLOOR: Duration = Duration::from_secs(5);

/// The longest `Retry-After` honoured, whatever `retry.max_backoff_ms` says: Heap knows best
/// when it will be back, but a silly value must not park the relay for a day.
pub const RETRY_AFTER_CEILING: Duration = Duration::from_secs(600);

/// What to do with a batch after one Heap call.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Delivered,
    /// Worth trying again later.
    Retry {
        /// For the records' `last_error`.
        error: String,
        /// Heap's `Retry-After`, if it sent one.
        retry_after: Option<Duration>,
        /// Heap said 429.
        throttled: bool,
    },
    /// Heap refused the content: trying it again unchanged will not help.
    Reject {
        status: u16,
        text: String,
    },
}

/// Classifies one outcome: connection errors, timeouts, 408, 429 and 5xx except 501 are
/// retryable; other non-2xx statuses are permanent.
pub fn classify(outcome: &Result<HeapResponse, TransportError>) -> Verdict {
    match outcome {
        Err(error) => Verdict::Retry {
            error: error.to_string(),
            retry_after: None,
            throttled: false,
        },
        Ok(response) => match response.status {
            200..=299 => Verdict::Delivered,
            408 | 429 | 500 | 502..=599 => Verdict::Retry {
                error: format!("heap answered {}: {}", response.status, response.text),
                retry_after: response.retry_after,
                throttled: response.status == 429,
            },
            status => Verdict::Reject {
                status,
                text: response.text.clone(),
            },
        },
    }
}

/// Exponential backoff with full jitter between `initial` and `max`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Backoff {
    /// The largest delay after `failures` consecutive failures (1 = the first):
    /// `min(max, initial * 2^(failures-1))`. Non-decreasing in `failures`.
    pub fn ceiling(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(32);
        self.initial
            .saturating_mul(1u32 << doublings.min(31))
            .min(self.max)
    }

    /// Full jitter: a uniform pick in `[0, ceiling]`, with `jitter` in `[0, 1)`.
    pub fn delay(&self, failures: u32, jitter: f64) -> Duration {
        self.ceiling(failures).mul_f64(jitter.clamp(0.0, 1.0))
    }

    /// The wait before the next attempt after a retryable failure: the jittered backoff,
    /// raised to Heap's `Retry-After` (up to the larger of `max` and [`RETRY_AFTER_CEILING`])
    /// and to [`THROTTLED_FLOOR`] (at most `max`) after a 429.
    pub fn retry_delay(
        &self,
        failures: u32,
        jitter: f64,
        retry_after: Option<Duration>,
        throttled: bool,
    ) -> Duration {
        let mut delay = self.delay(failures, jitter);
        if let Some(asked) = retry_after {
            delay = delay.max(asked.min(self.max.max(RETRY_AFTER_CEILING)));
        }
        if throttled {
            delay = delay.max(THROTTLED_FLOOR.min(self.max));
        }
        delay
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn response(status: u16) -> Result<HeapResponse, TransportError> {
        Ok(HeapResponse {
            status,
            retry_after: None,
            text: "why".into(),
        })
    }

    #[test]
    fn classification_table_matches_the_spec() {
        let retry = |status| matches!(classify(&response(status)), Verdict::Retry { .. });
        let reject = |status| matches!(classify(&response(status)), Verdict::Reject { .. });
        for status in [200, 201, 202, 204] {
            assert_eq!(classify(&response(status)), Verdict::Delivered, "{status}");
        }
        for status in [408, 429, 500, 502, 503, 504, 599] {
            assert!(retry(status), "{status} should be retried");
        }
        for status in [301, 400, 401, 403, 404, 409, 413, 422, 501] {
            assert!(reject(status), "{status} should be permanent");
        }
        for error in [
            TransportError::Timeout,
            TransportError::Connect("refused".into()),
            TransportError::Other("reset".into()),
        ] {
            assert!(matches!(classify(&Err(error)), Verdict::Retry { .. }));
        }
    }

    #[test]
    fn a_429_is_marked_throttled_and_keeps_retry_after() {
        let outcome = Ok(HeapResponse {
            status: 429,
            retry_after: Some(Duration::from_secs(7)),
            text: String::new(),
        });
        match classify(&outcome) {
            Verdict::Retry {
                retry_after,
                throttled,
                ..
            } => {
                assert_eq!(retry_after, Some(Duration::from_secs(7)));
                assert!(throttled);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    fn backoff() -> Backoff {
        Backoff {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(60),
        }
    }

    #[test]
    fn ceiling_doubles_from_initial_up_to_max() {
        let b = backoff();
        let ceilings: Vec<u64> = (1..=8).map(|n| b.ceiling(n).as_secs()).collect();
        assert_eq!(ceilings, [1, 2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(b.ceiling(0), Duration::from_secs(1));
        assert_eq!(b.ceiling(u32::MAX), Duration::from_secs(60));
    }

    #[test]
    fn full_jitter_spans_zero_to_the_ceiling() {
        let b = backoff();
        assert_eq!(b.delay(3, 0.0), Duration::ZERO);
        assert_eq!(b.delay(3, 0.5), Duration::from_secs(2));
        assert_eq!(b.delay(3, 1.0), Duration::from_secs(4));
    }

    #[test]
    fn retry_after_and_throttling_raise_the_delay_within_max() {
        let b = backoff();
        let after = Some(Duration::from_secs(30));
        assert_eq!(b.retry_delay(1, 0.0, after, false), Duration::from_secs(30));
        let silly = Some(Duration::from_secs(86_400));
        assert_eq!(b.retry_delay(1, 0.0, silly, false), RETRY_AFTER_CEILING);
        // Retry-After is honoured above a small max_backoff: Heap knows when it is back.
        let small = Backoff {
            initial: Duration::from_millis(50),
            max: Duration::from_millis(500),
        };
        let one = Some(Duration::from_secs(1));
        assert_eq!(small.retry_delay(1, 0.0, one, true), Duration::from_secs(1));
        assert_eq!(b.retry_delay(1, 0.0, None, true), THROTTLED_FLOOR);
        assert_eq!(b.retry_delay(1, 0.0, None, false), Duration::ZERO);
    }

    proptest! {
        #[test]
        fn delay_is_bounded_and_ceilings_never_decrease(
            initial_ms in 1u64..10_000,
            extra_ms in 0u64..1_000_000,
            failures in 0u32..100,
            jitter in 0.0f64..1.0,
        ) {
            let b = Backoff {
                initial: Duration::from_millis(initial_ms),
                max: Duration::from_millis(initial_ms + extra_ms),
            };
            prop_assert!(b.delay(failures, jitter) <= b.ceiling(failures));
            prop_assert!(b.ceiling(failures) <= b.max);
            prop_assert!(b.ceiling(failures) <= b.ceiling(failures + 1));
            prop_assert!(
                b.retry_delay(failures, jitter, Some(Duration::MAX), true)
                    <= b.max.max(RETRY_AFTER_CEILING)
            );
            prop_assert!(b.retry_delay(failures, jitter, None, true) <= b.max);
        }
    }
}
