//! The relay's black-box tests, in one test binary: every module below was once a binary of its
//! own, and each repeated the lint header and compiled `support` again. One crate root links
//! the relay once for all of them, and lets the compiler see which support code nobody uses.
//!
//! `cargo test` runs them all; `cargo test --test relay MODULE::` runs one module. Tests that
//! need Postgres are ignored unless `RELAY_TEST_POSTGRES_URL` was set when they were built (see
//! `build.rs` and `.ci/postgres.sh`); the console's browser tests (`console_browser`) likewise
//! unless `RELAY_TEST_CHROMEDRIVER` was (`.ci/browser.sh`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
// Black-box tests drive the real relay, which reads the real clock: they may too. The relay's
// own code may not (clippy.toml's disallowed-methods; only src/clock.rs reads the clock).
#![allow(clippy::disallowed_methods)]

mod support;

mod binary_config;
mod console;
mod console_browser;
mod crash;
mod dead_letter_scope;
mod dead_letter_views;
mod dead_letters;
mod delivery;
mod erase;
mod event_kinds;
mod hardening;
mod lanes;
mod manifests;
mod network;
mod numbers;
mod observability;
mod outage;
mod postgres_ingest;
mod postgres_replicas;
mod postgres_tls;
mod preview;
mod queue_conformance;
mod queue_file_removed;
mod queue_migrations;
mod rate_budget;
mod reload;
mod serving_lock;
mod shapes;
mod shutdown;
mod smoke;
mod sources;
mod sqlite_ingest;
mod traces;
mod transforms;
mod validation;
mod webhook_api;
