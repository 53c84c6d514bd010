//! The support code's own promises: [`eventually`] names the line that waited (not its own)
//! and what the check saw last, and returns the value once the check is done.

use std::time::Duration;

use super::eventually;

#[tokio::test]
#[should_panic(expected = "support/tests.rs:")]
async fn eventually_panics_naming_the_waiting_line() {
    eventually(Duration::from_millis(50), async || false).await;
}

#[tokio::test]
#[should_panic(expected = "not met within 50ms; last seen: 3 of 4 done")]
async fn eventually_panics_with_what_the_check_saw_last() {
    let _: () = eventually(Duration::from_millis(50), async || Err("3 of 4 done")).await;
}

#[tokio::test]
async fn eventually_returns_the_value_once_the_check_is_done() {
    let mut calls = 0;
    let value = eventually(Duration::from_secs(5), async || {
        calls += 1;
        (calls == 3).then_some(calls * 10)
    })
    .await;
    assert_eq!((value, calls), (30, 3));
}
