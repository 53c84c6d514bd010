//! `relay-bench smoke`: the harness end to end in a few seconds, so CI notices when it rots.
//! Starts the relay binary and the baseline, drives each briefly (closed and open loop),
//! checks that the relay accepted webhooks and that their events reached the fake Heap, and
//! renders a report from those runs (to a scratch file, not `BENCHMARKS.md`).
//!
//! With `RELAY_TEST_POSTGRES_URL` set (CI sets it; see `.ci/postgres.sh`), the relay on
//! Postgres gets the same brief closed loop, in a database of its own
//! ([`POSTGRES_DATABASE`], dropped and created again, then dropped), never the tests' one.
//! With `RELAY_REQUIRE_POSTGRES=1` and no URL, the smoke fails instead of skipping that part.
//!
//! The routing comparison ([`sources::measure`]) runs too, briefly: a relay with 1 source and
//! one with 10 over 3 app ids, every event counted at its app id. A relay that refuses
//! `[sources.*]` fails the smoke, as any other failure of it does.
//!
//! So does the transforms comparison ([`transforms::measure`]): no program, `.`, `. | .` and
//! a reshaping program on four sources of one relay, every event counted; a relay that refuses
//! `transform` fails the smoke.
//!
//! The old-against-new comparison ([`compare::measure`]) runs with the relay as both binaries,
//! two runs (each order once) on tiny windows and a queue grown to 1,000 webhooks; and the
//! smoke relay's queue size is read beside it ([`storage`]), for the report's Targets row.
//!
//! And the erasure measurement ([`erase::measure`]), small: one person's 200 stored webhooks
//! among 300 others erased under a load of 200 webhooks/s, every webhook of the load accepted,
//! the answer counting all 200, and its section rendered.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use tokio::time::Instant;

use crate::compare;
use crate::erase;
use crate::load::{self, Plan};
use crate::postgres::BenchDatabase;
use crate::procfs;
use crate::report;
use crate::results::{Machine, Memory, RELAY_POSTGRES, Results};
use crate::server::{SECRET, Server, postgres_queue};
use crate::sink::{Endpoint, Sink};
use crate::sources;
use crate::storage;
use crate::transforms;

/// The smoke's database on the tests' Postgres server.
pub const POSTGRES_DATABASE: &str = "relay_bench_smoke";

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
        database_pid: None,
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
    let relay_peak = procfs::peak_rss_mib(relay.pid);
    let stored = storage::sqlite_queue(relay.queue_file()?)
        .await
        .context("the SQLite queue's size")?;
    ensure!(
        stored.webhooks >= closed.accepted && stored.bytes > 0 && !stored.objects.is_empty(),
        "the SQLite queue's size: {stored:?}"
    );
    baseline.stop().await;
    relay.stop().await;
    println!(
        "relay-bench smoke: relay on SQLite accepted {} webhooks ({:.0}/s, p99 {:.1} ms) in 1 s; \
         the fake Heap got {events} events in {requests} requests",
        closed.accepted, closed.throughput, closed.p99_ms
    );

    let routing = match sources::accepts_sources(relay_bin, scratch.path())? {
        Ok(()) => {
            let settings = sources::Settings {
                runs: 1,
                duration: 0.3,
                warmup: 0.1,
                concurrency: vec![8],
                rates: vec![200],
                users: 50,
                events_per_minute: 6_000_000,
                extra_env: vec![("RELAY_HEAP__BATCH_LINGER_MS", "10".into())],
            };
            let (routing_runs, routing) =
                sources::measure(&settings, &client, &sink, relay_bin, scratch.path())
                    .await
                    .context("the routing comparison")?;
            for row in &routing.deliveries {
                ensure!(
                    report::delivered_in_full(row),
                    "routing: {} app id {:?} got {} track events of the {} its sources accepted",
                    row.server,
                    row.app_id,
                    row.delivered_events,
                    row.expected_events
                );
            }
            let events: u64 = routing.deliveries.iter().map(|r| r.delivered_events).sum();
            println!(
                "relay-bench smoke: routing: 1 source and {} sources over {} app ids; the fake \
                 Heap got all {events} events, each at its source's app id",
                sources::SOURCES,
                sources::APP_IDS
            );
            runs.extend(routing_runs);
            Some(routing)
        }
        Err(answer) => bail!("the relay refuses `[sources.*]`:\n{answer}"),
    };

    // The cost of transforms, briefly: the three sources answer and every event arrives.
    let transforms = match transforms::accepts_transforms(relay_bin, scratch.path())? {
        Ok(()) => {
            let settings = transforms::Settings {
                runs: 1,
                duration: 0.3,
                warmup: 0.1,
                concurrency: 8,
                users: 50,
                in_process_runs: 20,
                extra_env: vec![("RELAY_HEAP__BATCH_LINGER_MS", "10".into())],
            };
            let comparison =
                transforms::measure(&settings, &client, &sink, relay_bin, scratch.path())
                    .await
                    .context("the transforms comparison")?;
            ensure!(
                comparison.events_delivered >= comparison.events_expected,
                "transforms: the fake Heap got {} of the {} track events accepted",
                comparison.events_delivered,
                comparison.events_expected
            );
            let figures: Vec<String> = comparison
                .modes
                .iter()
                .map(|m| format!("{} {:.0} µs", m.source, m.tree_cpu_us))
                .collect();
            println!(
                "relay-bench smoke: transforms: CPU per webhook {}; the fake Heap got all {} \
                 events",
                figures.join(", "),
                comparison.events_delivered
            );
            Some(comparison)
        }
        Err(answer) => bail!("the relay refuses `[sources.NAME] transform`:\n{answer}"),
    };

    // The cost of an erasure, briefly: the person's webhooks all erased under load.
    let settings = erase::Settings {
        runs: 1,
        stored: 200,
        others: 300,
        rate: 200,
        warmup: 0.2,
        window: 0.5,
        max_erase: 20.0,
        extra_env: vec![("RELAY_HEAP__BATCH_LINGER_MS", "10".into())],
    };
    let measurement = erase::measure(&settings, &client, &sink, relay_bin, scratch.path())
        .await
        .context("the erasure measurement")?;
    let section = erase::render(&measurement, "");
    ensure!(
        section.contains("| 1 | erasure |"),
        "the erasure section has no run:\n{section}"
    );
    println!(
        "relay-bench smoke: erase: {} webhooks of one person erased in {:.0} ms under {} \
         webhooks/s, all accepted",
        settings.stored,
        measurement
            .runs
            .first()
            .map_or(f64::NAN, |run| run.erase_ms),
        settings.rate
    );

    // Old against new, briefly, with this binary as both: every figure of the section there.
    let settings = compare::Settings {
        runs: 2,
        duration_s: 0.3,
        warmup_s: 0.1,
        concurrency: vec![8],
        grown: 1000,
        rate: 200,
        users: 50,
        extra_env: vec![("RELAY_HEAP__BATCH_LINGER_MS", "10".into())],
    };
    let (baseline_runs, binaries) = compare::measure(
        &settings,
        &client,
        &sink,
        [("old", relay_bin), ("new", relay_bin)],
        scratch.path(),
    )
    .await
    .context("the old-against-new comparison")?;
    for run in &binaries {
        ensure!(
            run.paused && run.stored_before_open >= 1000,
            "compare: {} in run {} paused {}, {} stored before the open loop",
            run.binary,
            run.run,
            run.paused,
            run.stored_before_open
        );
    }
    let comparison = compare::Comparison {
        header: String::new(),
        settings,
        old: compare::Binary::describe("old", relay_bin, "smoke"),
        new: compare::Binary::describe("new", relay_bin, "smoke"),
        baseline: baseline_runs,
        binaries,
    };
    let section = compare::render(&comparison);
    ensure!(
        section.contains("| 2 | new (first) |")
            && !section.contains("| Stored bytes per webhook, at the end | – |"),
        "the comparison's section lacks a run or a figure:\n{section}"
    );
    println!(
        "relay-bench smoke: compare: the binary against itself, 2 runs, stored bytes per \
         webhook measured"
    );

    let postgres = match std::env::var("RELAY_TEST_POSTGRES_URL") {
        Ok(url) if !url.is_empty() => {
            let (run, setup) = postgres_smoke(&client, relay_bin, &sink, scratch.path(), &url)
                .await
                .context("the relay on Postgres")?;
            runs.push(run);
            Some(setup)
        }
        _ if std::env::var("RELAY_REQUIRE_POSTGRES").as_deref() == Ok("1") => {
            bail!("RELAY_REQUIRE_POSTGRES=1 but RELAY_TEST_POSTGRES_URL is not set");
        }
        _ => {
            println!(
                "relay-bench smoke: Postgres skipped (set RELAY_TEST_POSTGRES_URL to include it)"
            );
            None
        }
    };

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
            relay_peak_mib: relay_peak,
            ..Memory::default()
        },
        saturation: None,
        live: None,
        limit: None,
        big_drain: None,
        big_drain_watch: None,
        notes: Vec::new(),
        postgres,
        routing,
        transforms,
        storage: Some(stored),
        storage_postgres: None,
    };
    let markdown = report::render(&results);
    ensure!(
        markdown.contains("## Targets"),
        "the report has no Targets section"
    );
    ensure!(
        results.postgres.is_none() || markdown.contains("| relay, Postgres |"),
        "the report has no Postgres rows"
    );
    ensure!(
        results.routing.is_none()
            || markdown.contains("under its source's app id: **met**")
                && markdown.contains("| closed loop, 8 in flight |"),
        "the report has no routing figures"
    );
    ensure!(
        markdown.contains("| Stored bytes per webhook on SQLite ≤ 0.6 KB")
            && markdown.contains("## Queue size (stored bytes per webhook)"),
        "the report has no stored bytes per webhook"
    );
    std::fs::write(scratch.path().join("BENCHMARKS.smoke.md"), &markdown)?;
    println!("relay-bench smoke ok: the report renders");

    Ok(())
}

/// The relay on Postgres: a brief closed loop, then every event delivered to the fake Heap.
async fn postgres_smoke(
    client: &load::Client,
    relay_bin: &Path,
    sink: &Sink,
    scratch: &Path,
    url: &str,
) -> anyhow::Result<(load::RunResult, crate::postgres::Setup)> {
    let database = BenchDatabase::create(url, POSTGRES_DATABASE).await?;
    let setup = database.setup().await?;
    let mut env = postgres_queue(&database.url).to_vec();
    env.push(("RELAY_HEAP__BATCH_LINGER_MS", "10".into()));
    let relay = Server::relay(client, relay_bin, &sink.url(), &env, scratch)
        .await?
        .named(RELAY_POSTGRES);
    sink.clear();
    let pool = Arc::new(load::prepare(3000, SECRET, "smoke-postgres", 50)?);
    let plan = Plan {
        warmup: Duration::from_millis(200),
        duration: Duration::from_millis(500),
        server_pid: Some(relay.pid),
        database_pid: database.postmaster,
    };
    let mut run = load::closed(client, &relay.webhook_uri()?, pool, 8, plan).await;
    run.server = RELAY_POSTGRES.into();
    ensure!(
        run.accepted > 0 && run.refused + run.failed + run.duplicate + run.quarantined == 0,
        "closed loop: {} accepted, {} refused, {} failed, {} duplicate, {} quarantined; log:\n{}",
        run.accepted,
        run.refused,
        run.failed,
        run.duplicate,
        run.quarantined,
        relay.log_tail()
    );
    ensure!(
        !setup.cpu_counted || run.database_cpu_s.is_some(),
        "no CPU time for the local Postgres server"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while relay.unsent(client).await? > 0 || (sink.count(Endpoint::Track).1 as u64) < run.events {
        if Instant::now() > deadline {
            bail!(
                "events did not reach the fake Heap within 30 s; log:\n{}",
                relay.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "relay-bench smoke: relay on Postgres {} (fsync {}, synchronous_commit {}) accepted {} \
         webhooks ({:.0}/s, p99 {:.1} ms, Postgres CPU {}); the fake Heap got them all",
        setup.version,
        setup.fsync,
        setup.synchronous_commit,
        run.accepted,
        run.throughput,
        run.p99_ms,
        run.database_cpu_s
            .map_or("not counted".into(), |s| format!("{s:.2} s")),
    );
    relay.stop().await;
    database.drop_database().await?;
    Ok((run, setup))
}
