//! The relay's black-box tests, in one test binary: every module below was once a binary of its
//! own, and each repeated the lint header and compiled `support` again. One crate root links
//! the relay once for all of them, and lets the compiler see which support code nobody uses.
//!
//! `cargo test` runs them all; `cargo test --test relay MODULE::` runs one module. Tests that
//! need Postgres are ignored unless `RELAY_TEST_POSTGRES_URL` was set when they were built (see
//! `build.rs` and `.ci/postgres.sh`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

mod binary_config;
mod crash;
mod dead_letters;
mod delivery;
mod event_kinds;
mod hardening;
mod manifests;
mod outage;
mod postgres_ingest;
mod postgres_replicas;
mod postgres_tls;
mod queue_conformance;
mod queue_migrations;
mod shutdown;
mod smoke;
mod sqlite_ingest;
mod webhook_api;
