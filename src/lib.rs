//! userpilot-heap-relay: receives signed Userpilot webhooks and delivers them to Heap, durably.
//!
//! The request path, top to bottom: [`http::webhook`] takes the raw bytes;
//! [`userpilot::signature`] verifies them into `Verified` bytes; [`ingest`] decodes them
//! ([`userpilot::payload`]) and maps them ([`heap::mapping`]) into Heap records or a quarantine
//! reason; [`queue`] commits them; only then the handler answers 202.
//!
//! The delivery path: [`forwarder`] claims a batch from the [`queue`], applies Heap's rate
//! limits ([`forwarder::limits`]), posts it with [`heap::client`], and records the verdict of
//! [`forwarder::retry`]: ack, retry at a stored time, or dead letter ([`dead_letters`]).
//!
//! Around them: [`config`] (layered settings, validated once), [`app`] (wiring and graceful
//! shutdown), [`cli`], [`telemetry`], [`clock`] (the only wall-clock reader), [`secret`]
//! (values that never print), [`samples`] (a sample webhook of every kind), and [`tls`] (the
//! process's rustls crypto provider, ring, installed before any HTTP client is built).

pub mod app;
pub mod cli;
pub mod clock;
pub mod config;
pub mod dead_letters;
pub mod forwarder;
pub mod heap;
pub mod http;
pub mod ingest;
pub mod queue;
pub mod samples;
pub mod secret;
pub mod telemetry;
pub mod tls;
pub mod userpilot;
