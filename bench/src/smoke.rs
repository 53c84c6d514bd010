//! `relay-bench smoke`: the harness end to end in a few seconds, so CI notices when it rots.
//! Starts the relay binary and the baseline, drives each briefly (closed and open loop),
//! checks that the relay accepted webhooks and that their events reached the fake Heap, and
//! renders a report from those runs (to a scratch file, not `BENCHMARKS.md`).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use tokio::time::Instant;

use crate::load::{self, Plan};
use crate::procfs;
use crate::report;
use crate::server::{SECRET, Server};
use crate::sink::{Endpoint, Sink};
use crate::suite::{Machine, Memory, Results};

pub async fn run(relay_bin: &Path) -> anyhow::Result<()> {
    let scratch = tempfile::Builder::new()
        .prefix("relay-bench-smoke")
        .tempdir()?;
    let client = load::client();
    let sink = Sink::start().await?;
    let relay = Server::relay(
        &client,
        relay_bin,
        &sink.url(),
        &[("RELAY_HEAP__BATCH_LINGER_MS", "10".into())],
        scratch.path(),
    )
    .await?;
    let baseline = Server::baseline(&client, scratch.path()).await?;
    let mut runs = Vec::new();

    let plan = |server: &Server, seconds: f64| Plan {
        warmup: Duration::from_millis(200),
        duration: Duration::from_secs_f64(seconds),
        server_pid: Some(server.pid),
    };
    let pool = Arc::new(load::prepare(5000, SECRET, "smoke-closed", 50)?);
    let mut closed = load::closed(&client, &relay.webhook_uri()?, pool, 8, plan(&relay, 1.0)).await;
    closed.server = "relay".into();
    ensure!(
        closed.accepted > 0 && closed.refused + closed.failed == 0,
        "relay closed loop: {} accepted, {} refused, {} failed; relay log:\n{}",
        closed.accepted,
        closed.refused,
        closed.failed,
        relay.log_tail()
    );
    ensure!(
        closed.duplicate + closed.quarantined == 0,
        "generated webhooks must be unique and mappable: {} duplicate, {} quarantined",
        closed.duplicate,
        closed.quarantined
    );
    ensure!(
        closed.events >= closed.accepted,
        "the relay reported fewer events than webhooks"
    );
    runs.push(closed.clone());

    let pool = Arc::new(load::prepare(300, SECRET, "smoke-open", 50)?);
    let mut open = load::open(&client, &relay.webhook_uri()?, pool, 200, plan(&relay, 0.5)).await;
    open.server = "relay".into();
    ensure!(
        open.accepted > 0 && open.refused + open.failed == 0,
        "relay open loop failed"
    );
    runs.push(open);

    for (mode, server) in [("closed", &baseline), ("open", &baseline)] {
        // The baseline is fast even in a debug build: enough requests for the whole window.
        let pool = Arc::new(load::prepare(20_000, SECRET, "smoke-baseline", 50)?);
        let uri = server.webhook_uri()?;
        let mut result = match mode {
            "closed" => load::closed(&client, &uri, pool, 8, plan(server, 0.5)).await,
            _ => load::open(&client, &uri, pool, 200, plan(server, 0.5)).await,
        };
        result.server = "baseline".into();
        ensure!(
            result.accepted > 0,
            "baseline {mode} loop: nothing accepted"
        );
        runs.push(result);
    }

    // Everything the relay accepted reaches the fake Heap.
    let deadline = Instant::now() + Duration::from_secs(30);
    while relay.unsent(&client).await? > 0 || sink.count(Endpoint::Track).1 == 0 {
        if Instant::now() > deadline {
            bail!(
                "events did not reach the fake Heap within 30 s; relay log:\n{}",
                relay.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (requests, events) = sink.count(Endpoint::Track);
    ensure!(
        events as u64 >= closed.events,
        "the fake Heap got {events} events, fewer than the {} counted in the closed loop alone",
        closed.events
    );
    let relay_rss = procfs::rss_mib(relay.pid).context("no RSS for the relay")?;
    ensure!(closed.server_cpu_s.is_some(), "no CPU time for the relay");

    let results = Results {
        machine: Machine {
            cpu_model: procfs::cpu_model(),
            nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
            kernel: procfs::kernel(),
            load_before: procfs::load_average(),
            load_after: procfs::load_average(),
            commit: "smoke".into(),
            date: chrono::Utc::now().to_rfc3339(),
            total_s: 0.0,
        },
        runs_per_mode: 1,
        duration_s: 1.0,
        warmup_s: 0.2,
        users: 50,
        runs,
        memory: Memory {
            relay_idle_mib: Some(relay_rss),
            relay_peak_mib: procfs::peak_rss_mib(relay.pid),
            ..Memory::default()
        },
        saturation: None,
        live: None,
        limit: None,
        big_drain: None,
        notes: Vec::new(),
    };
    let markdown = report::render(&results);
    ensure!(
        markdown.contains("## Targets"),
        "the report has no Targets section"
    );
    std::fs::write(scratch.path().join("BENCHMARKS.smoke.md"), &markdown)?;

    println!(
        "relay-bench smoke ok: relay accepted {} webhooks ({:.0}/s, p99 {:.1} ms) in 1 s; \
         the fake Heap got {events} events in {requests} requests",
        closed.accepted, closed.throughput, closed.p99_ms
    );
    baseline.stop().await;
    relay.stop().await;
    Ok(())
}
