//! userpilot-heap-relay: receives signed Userpilot webhooks and delivers them to Heap, durably.
//! The contract it keeps (routes, status codes, configuration, guarantees, metrics) is
//! `docs/contract.md`; "contract §N" in comments points into it.
//!
//! The request path, top to bottom: `http::webhook` takes the raw bytes within the
//! connection limits of [`http::serve`]; [`userpilot`] verifies the signature over them into
//! `Verified` bytes (the only way to get any) and decodes the payload; [`ingest`] runs the
//! source's [`transform`] (a jq program, in worker processes of the relay's own binary) and
//! [`translate`] maps each decoded interaction with [`heap::mapping`] into Heap records or a
//! quarantine reason; [`queue`] commits them (SQLite or Postgres behind one trait), with the
//! payload's shape ([`shapes`], what really arrives, per source) in the same commit; only then
//! the handler answers 202.
//!
//! The delivery path: the [`forwarder`] claims a batch from the [`queue`], applies Heap's rate
//! limits ([`forwarder::limits`]), posts it with [`heap::client`] in the wire format of
//! [`heap::wire`], and records the verdict of [`forwarder::retry`]: ack, retry at a stored
//! time, or dead letter. [`dead_letters`] lists, replays and purges those, for the admin API
//! and the `dlq` command alike. [`preview`] shows what a payload would become without
//! queueing it. The [`console`] is the operators' web page for all of it, on the admin port,
//! calling the same code as the admin API.
//!
//! Around them: [`config`] (layered settings, parsed once into typed values), [`app`] (wiring
//! and graceful shutdown), [`cli`] (the command line; the subcommands themselves live in the
//! binary), [`telemetry`] (logs and metrics), [`traces`] (OpenTelemetry spans of both paths,
//! off by default), [`clock`] (the only reader of the clock: time is an input, and clippy
//! enforces it), [`secret`] (values that never print), [`samples`] (a sample webhook of every
//! kind), and [`tls`] (the process's rustls crypto provider, ring, installed before any HTTP
//! client is built).

pub mod app;
pub mod cli;
pub mod clock;
pub mod config;
pub mod console;
pub mod dead_letters;
pub mod erase;
pub mod forwarder;
pub mod heap;
pub mod http;
pub mod ingest;
pub mod preview;
pub mod queue;
pub mod reload;
pub mod samples;
pub mod secret;
pub mod shapes;
pub mod sources;
pub mod telemetry;
pub mod tls;
pub mod traces;
pub mod transform;
pub mod translate;
pub mod userpilot;
