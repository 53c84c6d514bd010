//! `BENCHMARKS.md` from a suite's [`Results`]: medians of the runs, ratios to the baseline,
//! and the targets of the "Performance" issue with a plain verdict for each.

use std::fmt::Write;

use crate::load::RunResult;
use crate::postgres::Setup;
use crate::results::{
    BASELINE, Delivery, Drain, DrainWatch, FRESH, FRESH_POSTGRES, ONE_SOURCE, RELAY,
    RELAY_POSTGRES, Results, Routing, TEN_SOURCES,
};
use crate::storage::{MAX_BYTES_PER_WEBHOOK, Storage};

/// Targets of the "Performance" issues (17: a storage path that keeps up with the network).
/// Ingest on SQLite, durable: best relay throughput over best baseline throughput.
pub const MIN_THROUGHPUT_RATIO: f64 = 0.4;
/// The same on Postgres.
const MIN_POSTGRES_RATIO: f64 = 0.3;
/// Relay CPU per webhook on SQLite at its best concurrency, µs.
pub const MAX_CPU_US: f64 = 40.0;
/// The large backlog drains at no less than this share of the configured rate...
const MIN_DRAIN_SHARE: f64 = 0.98;
/// ...while closed-loop ingest (32 in flight) keeps this share of its speed without a backlog.
const MIN_DRAINING_INGEST: f64 = 0.8;
/// The closed-loop concurrency of ingest while the large backlog drains.
pub const DRAINING_CONCURRENCY: usize = 32;
pub const MAX_P99_MS: f64 = 10.0;
pub const P99_RATE: u64 = 2000;
const MAX_PEAK_MIB: f64 = 64.0;
const MAX_IDLE_MIB: f64 = 20.0;
const MAX_REQUESTS_PER_1000: f64 = 1.02;

/// Medians over the runs of one server, mode and parameter.
struct Median {
    throughput: f64,
    p50: f64,
    p99: f64,
    p999: f64,
    max: f64,
    /// Server CPU per answered request, µs.
    cpu_per_request_us: Option<f64>,
    /// Server CPU time over wall time (1.0 = one core busy).
    cpu_cores: Option<f64>,
    /// The same for the database server behind the relay (Postgres), when counted.
    database_cpu_per_request_us: Option<f64>,
    database_cpu_cores: Option<f64>,
    client_cores: Option<f64>,
    failed: u64,
    exhausted: bool,
    /// Largest over the runs.
    max_in_flight: u64,
}

pub(crate) fn median(mut values: Vec<f64>) -> Option<f64> {
    values.retain(|v| v.is_finite());
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    Some(if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    })
}

fn summarize(runs: &[RunResult], server: &str, mode: &str, param: u64) -> Option<Median> {
    let runs: Vec<&RunResult> = runs
        .iter()
        .filter(|r| r.server == server && r.mode == mode && r.param == param)
        .collect();
    if runs.is_empty() {
        return None;
    }
    let of = |f: &dyn Fn(&RunResult) -> f64| median(runs.iter().map(|r| f(r)).collect());
    let optional =
        |f: &dyn Fn(&RunResult) -> Option<f64>| median(runs.iter().filter_map(|r| f(r)).collect());
    Some(Median {
        throughput: of(&|r| r.throughput).unwrap_or(0.0),
        p50: of(&|r| r.p50_ms).unwrap_or(f64::NAN),
        p99: of(&|r| r.p99_ms).unwrap_or(f64::NAN),
        p999: of(&|r| r.p999_ms).unwrap_or(f64::NAN),
        max: of(&|r| r.max_ms).unwrap_or(f64::NAN),
        cpu_per_request_us: optional(&|r| {
            r.server_cpu_s.map(|cpu| cpu * 1e6 / (r.ok().max(1) as f64))
        }),
        cpu_cores: optional(&|r| r.server_cpu_s.map(|cpu| cpu / r.elapsed_s)),
        database_cpu_per_request_us: optional(&|r| {
            r.database_cpu_s
                .map(|cpu| cpu * 1e6 / (r.ok().max(1) as f64))
        }),
        database_cpu_cores: optional(&|r| r.database_cpu_s.map(|cpu| cpu / r.elapsed_s)),
        client_cores: optional(&|r| r.client_cpu_s.map(|cpu| cpu / r.elapsed_s)),
        failed: runs.iter().map(|r| r.refused + r.failed).sum(),
        exhausted: runs.iter().any(|r| r.exhausted),
        max_in_flight: runs.iter().map(|r| r.max_in_flight).max().unwrap_or(0),
    })
}

fn params(runs: &[RunResult], mode: &str) -> Vec<u64> {
    let mut params: Vec<u64> = runs
        .iter()
        .filter(|r| r.mode == mode)
        .map(|r| r.param)
        .collect();
    params.sort_unstable();
    params.dedup();
    params
}

pub(crate) fn num(value: f64) -> String {
    if !value.is_finite() {
        return "–".into();
    }
    // Thousands separators for readability.
    let rounded = value.round() as i64;
    let digits = rounded.abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if rounded < 0 { format!("-{out}") } else { out }
}

pub(crate) fn ms(value: f64) -> String {
    if !value.is_finite() {
        "–".into()
    } else if value < 10.0 {
        format!("{value:.2}")
    } else {
        format!("{value:.1}")
    }
}

fn mib(value: Option<f64>) -> String {
    value.map_or("–".into(), |v| format!("{v:.1} MiB"))
}

fn opt(value: Option<f64>, digits: usize) -> String {
    value.map_or("–".into(), |v| format!("{v:.digits$}"))
}

/// How a server of the runs is named in the tables.
fn label(server: &str) -> &str {
    match server {
        RELAY => "relay, SQLite",
        RELAY_POSTGRES => "relay, Postgres",
        FRESH => "fresh relay, SQLite",
        FRESH_POSTGRES => "fresh relay, Postgres",
        other => other,
    }
}

/// The clean release build before and after its dependencies were trimmed (issue 16), measured
/// by hand with `cargo build --release --timings`; not regenerated by the suite.
const BUILD_TIME: &str = include_str!("build_time.md");

/// Where the relay's time goes and why each setting is what it is. Written by hand from
/// measurements made with `relay-bench load` and `perf` (see its first paragraph), not
/// regenerated by the suite.
const SETTINGS: &str = "## Where the time goes, and the settings behind it

This section is written by hand, not regenerated: the figures in it were measured on this \
machine with `relay-bench load` against one release relay (SQLite queue, Heap unreachable so \
nothing but ingest ran), comparing variants in one sitting, run after run; the profile on \
2026-12-03, the settings table from 2026-11-28 on.

**Profile.** `bash bench/profile.sh` (`perf record --call-graph dwarf`, 32 in flight, 10 s; \
6,048 webhooks/s with perf attached) at 26b1133's code: the tokio workers take 61 % of the \
relay's CPU, its one SQLite writer thread 39 %; by code, the kernel 47 %, the relay's own \
binary (SQLite in it) 48 %, libc 5 %. On the writer, the commit is 22 % of all samples, most \
of it the WAL's `fsync` (15 %: ext4 writing the pages out through the virtual disk, which a \
group of one webhook pays as much as a group of many), the inserts 8 % (packing the records 3 \
%), checkpoints 1 %. On the workers, writing the answers (hyper, then the kernel's TCP send) \
9 %, reading requests 4 %, translating a webhook 6 % (decoding 3 %, mapping 3 %), its payload \
shape 4 %, preparing its rows for the writer 2 %, verifying the signature 1 %. mimalloc is 7 \
% of all samples, and giving freed memory back to the system at once (`madvise`, a6295e4, for \
the resident-set target) 3 % more. About half of the relay's CPU is the kernel's — TCP and \
the durable commit — and no function of the relay's own takes more than 1 % by itself. The \
profile of \
e4f152c, before mimalloc, is in the section \"Storage path: old binary against new\", with \
the three changes it led to.

**Why ingest stays below half the baseline.** The baseline does HTTP and nothing else. The \
relay also verifies an HMAC, parses and maps JSON, records the payload's shape, and makes every \
webhook durable before it answers — in one SQLite writer (SQLite has one writer at a time), \
whose group commits write the webhooks' pages to the WAL and wait for its `fsync`. No single \
function of the relay's own takes more than 1 % of its CPU by itself (the profile above): what \
is left is the sum of many \
small costs per webhook (allocations, the shape's path set, serializing the records), each to \
be made smaller, not one hot spot.

**The other gaps, and their causes** (see the Targets table for this run's figures):

- *Every Heap request per 1,000 events*: the mapper sends one user-property record per \
  webhook beside its track event(s). The forwarder merges property records about the same user \
  within a claim of up to ten batches, so with this benchmark's 2,000 users they take about a \
  fifth of a request per 1,000 events; `/api/track` alone stays at the target.
- *The large drain's rate*: each lane forwards track events and property updates in tasks of \
  their own (since 75774a2; before, one task claimed, sent and acked each kind in turn, and a \
  property claim of 10,000 records, about 350 ms of the queue thread on a 100,000-webhook \
  backlog, held the track request behind it). What bounds the drain is the queue thread, which \
  the claims, acks and unpacking share with ingest: on a 200,000-webhook drain of 75774a2 it \
  was on the CPU 53–64 % of the time and waited for `fsync` and reads the rest; of its CPU, \
  commits took 39 % (the automatic checkpoint alone 20 %), inserting the record rows a claim \
  unpacks 22 %, the leases' and acks' updates most of the rest (the section \"Storage path: old \
  binary against new\" has the drain comparison and the experiments measured against it). The \
  saturation row (no limit) runs into the same bound. Heap's own default budget is 250 \
  events/s, far below; the low-limit row holds its configured rate.
- *The cost of a transform* (issue 13: at most 10 µs over no transform; only `.`, which runs no \
  program, meets it): two costs, each measured alone by hand on 2026-12-03 with small \
  throwaway programs linked to the relay's library. The process boundary: a worker's \
  round trip, driven synchronously through its pipes, cost 30–35 µs of the caller's CPU \
  and 36–42 µs of the worker's per job, of which jaq's own work for `. | .` is 4–7 µs; on this \
  virtual machine nearly all the rest is each process going to sleep and being woken. Jobs \
  written 8 at a time cost 6 + 9 µs, 32 at a time 4 + 6.5 µs. The program itself: the reshaping \
  program alone, in-process (the Transforms table's last column), takes 15–24 µs on the \
  harness's payloads, where serde_json parses the same payload in 2.2 µs. So no way of running \
  that program with jaq reaches 10 µs here, not even one without isolation, which the relay \
  cannot use: a jaq run cannot be interrupted, and a deep recursion aborts its process. *Tried \
  and not kept:* batching the round trips (one driver task per worker writing every waiting job \
  at once, replies flushed once per batch, a fault pinned on a job only when it alone was \
  unanswered). Driving the pool alone with 2 runtime threads, old and new alternating twice: at \
  8 in flight 19.9 and 24.7 µs per run before, 19.8 and 23.5 after; at 16, 21.3 and 23.7 against \
  15.6 and 16.2; at 4, 51,000 runs/s against 66,000–71,000 (fewer workers run side by side). In \
  the relay at 8 in flight, where fewer than one run is in flight on average, nothing \
  measurable: the round trip over no transform +67.7 and +58.7 µs before, +64.1 and +43.9 after, with no \
  transform itself varying from 136 to 186 µs between runs.
- *Resident set during the large drain*: it rises while SQLite's page cache, bounded at 16 \
  MiB, fills with pages of the large file, and with the allocator's retained memory: 74.5 MiB \
  at its peak at 7a1b235 (glibc), 88.7 MiB at 81b877d (mimalloc, freed memory given back after \
  10 ms; a6295e4 gives it back at once). It does not grow with the backlog (a million queued \
  webhooks sit on disk), but it is not flat by the rule above.
- *Ingest while the large backlog drains*: the forwarder's bookkeeping and the webhooks take \
  turns on the one writer, so ingest runs at a fraction of its idle speed (the Targets table) \
  and with a higher p99.

**What changed, and what was measured for it** (ratios in the tables above are the ones to \
compare with earlier versions of this file: the relay reached 0.11 of the baseline before):

- *Record keys unique per webhook* (`(webhook_id, key)`, appended in id order) instead of a \
  global unique index on random 64-character keys: two random b-tree inserts fewer per webhook. \
  Together with the next three items, against the previous version, alternating the two \
  binaries three times (median; other work shared the machine for part of it): 7,600 → 12,500 \
  webhooks/s at 32 in flight on a fresh queue, 7,800 → 13,200 on the same queue 5 s later, and \
  p99 at 2,000 webhooks/s 16.4 → 8.9 ms.
- *Records serialized to JSON on the tokio workers* before they reach the writer thread, so the \
  one thread that cannot be parallelized only runs SQLite.
- *No savepoint per webhook*: a group is inserted as it is, and redone with one savepoint per \
  webhook only if an insert fails (then only the failing webhook gets the error).
- *16 MiB SQLite page cache* (the default is 2 MiB): with a large queue, most index pages were \
  read back from the kernel on every insert. It is part of the resident set (peak RSS).

The first open-loop runs (500/s) come right after the closed-loop runs, whose property
records the forwarder is still draining (they are not rate-limited): its bookkeeping shares the
writer with ingest then, which shows in their tail latencies.

**Settings, and their durability / latency trade-offs:**

| Setting | Choice | Durability | Latency and throughput |
|---|---|---|---|
| Journal | WAL | a commit is one append to the WAL | readers (stats, listings) never block the writer |
| `synchronous` for webhook commits | `FULL` | the WAL is fsynced before any 202: an acknowledged webhook survives a power loss, not only a crash | one fsync per group commit; `NORMAL` would skip it (survives `kill -9`, not power loss) and is not offered |
| `synchronous` for the forwarder's claims, acks, retries | `NORMAL` | losing one to power loss repeats a send under the same idempotency key, which Heap deduplicates | no fsync per ack; the next webhook commit persists them anyway |
| Group commit | whatever arrived during the previous commit, up to 1,024 webhooks | each webhook is answered only after its group's commit | one fsync for the group; a lone webhook commits at once (no waiting to fill a group) |
| Forwarder bookkeeping (claims, acks, retries, dead letters) | one transaction, committed early (after a multiple of 100 records) whenever webhooks are waiting for the writer | none: each record's change is atomic, and a crash between two transactions only repeats a send under the same idempotency key | the writer serves one command at a time, so webhooks wait behind a large one: at 2,000 webhooks/s while the forwarder drained a backlog, p99 39–52 ms with claims of 8,000 property records in one transaction, 9.4–11 ms in transactions of 100, 5.2–5.8 ms with the forwarder paused. Always cutting them at 100 cost forwarding at saturation 21,100 events/s against 34,900 (more commits rewrite the same pages); cutting them only while webhooks wait measured 39,100 in a short run |

| Checkpoints | SQLite's default, every 1,000 WAL pages, on the writer thread | none (the WAL is durable) | measured alternatives: every 10,000 pages gave +15 % throughput but p99 at 32 in flight 15 ms instead of 7 ms (longer stalls); a separate checkpointing thread gave +10–25 % throughput but p99 at 2,000/s 7.4–7.8 ms instead of 5.2–5.5 ms on a grown queue, 43 ms instead of 18 ms at 128 in flight, and an 85 MB WAL. Latency won. |
| Page cache | 16 MiB | none | fewer reads from the kernel; counts in RSS |
| Temporary storage | memory | none (statement journals only) | less writer CPU |
| Webhooks handled at once | 128 (`MAX_WEBHOOKS_IN_FLIGHT`), 5 s wait for a slot, then 503 with `Retry-After` | a shed webhook was never acknowledged: Userpilot retries it | bounds memory held by bodies |
| Open connections | 512 per listener, more wait in the listen backlog | none | bounds memory per connection (about 25 KiB each) under a connection flood |
| Postgres group commit | up to 64 webhooks per group, inserted by one statement that commits by itself; 4 committers at once | each 202 follows its group's commit | one round trip and one WAL flush per group. On this machine's local disk 1 committer measured 15,100 webhooks/s against 10,300 for 4 (CPU-bound: smaller groups cost more), but with commits slowed to 3 ms, as across a network, 4 measured 4,950 against 3,450: a shared database is across a network |
| Postgres `synchronous_commit` | must stay `on` (the report above checks it) | `off` would acknowledge webhooks whose commit is not yet on disk | `off` is faster and loses acknowledged webhooks on a server crash |
";

/// Whether the large drain held its rate with flat memory while ingest stayed fast.
struct BigDrainVerdict {
    configured_per_s: f64,
    rate_held: bool,
    rss_spread_mib: f64,
    flat: bool,
    fast: bool,
}

/// "Flat": from halfway through the drain (ingest during the drain, and SQLite's page cache
/// filling, are over by then) to its end, the resident set grows by at most this (MiB).
const FLAT_RSS_MIB: f64 = 4.0;

fn big_drain_verdict(d: &Drain, watch: &DrainWatch) -> BigDrainVerdict {
    let configured_per_s = watch.events_per_minute as f64 / 60.0;
    let (low, high) = watch
        .rss_mib
        .iter()
        .fold((f64::MAX, 0.0_f64), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    let rss_spread_mib = if watch.rss_mib.is_empty() {
        0.0
    } else {
        high - low
    };
    let second_half_growth = match (
        watch.rss_mib.get(watch.rss_mib.len() / 2),
        watch.rss_mib.last(),
    ) {
        (Some(mid), Some(end)) => end - mid,
        _ => f64::MAX,
    };
    let open = watch.ingest.iter().find(|r| r.mode == "open");
    BigDrainVerdict {
        configured_per_s,
        // Not above it is the rate-limit row's business (its budget allows a first burst).
        rate_held: d.events_per_s >= configured_per_s * MIN_DRAIN_SHARE,
        rss_spread_mib,
        flat: second_half_growth <= FLAT_RSS_MIB && high <= MAX_PEAK_MIB,
        fast: open.is_some_and(|r| {
            r.p99_ms <= MAX_P99_MS && r.throughput >= r.param as f64 * 0.98 && r.failed == 0
        }),
    }
}

fn write_big_drain(out: &mut String, d: &Drain, watch: &DrainWatch, runs: &[RunResult]) {
    let v = big_drain_verdict(d, watch);
    let _ = writeln!(
        out,
        "### Large backlog\n\n{} webhooks ({} track events) queued with the forwarder paused, in \
         {:.0} s ({} webhooks/s), then released with `RELAY_HEAP__EVENTS_PER_MINUTE={}` \
         ({} events/s); with the webhooks sent while it drained (below), {} events drained in \
         {:.0} s at {} events/s ({:.1} % of the configured rate).\n",
        num(d.webhooks as f64),
        num(d.events as f64),
        d.ingest_s,
        num(d.ingest_per_s),
        watch.events_per_minute,
        num(v.configured_per_s),
        num(d.track_events as f64),
        d.drain_s,
        num(d.events_per_s),
        d.events_per_s / v.configured_per_s.max(1e-9) * 100.0,
    );
    if !watch.rss_mib.is_empty() {
        let at = |i: usize| watch.rss_mib.get(i).copied();
        let last = watch.rss_mib.len() - 1;
        let _ = writeln!(
            out,
            "Resident set, sampled every second through the drain ({} samples): {} at the release, \
             {} halfway, {} at the end; range {:.1} MiB. Counted as flat when it grows by at most \
             {FLAT_RSS_MIB} MiB from halfway to the end (ingest while draining and SQLite's page \
             cache filling are over by then) and stays within {MAX_PEAK_MIB} MiB.\n",
            watch.rss_mib.len(),
            mib(at(0)),
            mib(at(last / 2)),
            mib(at(last)),
            v.rss_spread_mib
        );
    }
    let _ = writeln!(
        out,
        "Ingest while it drained, against the same relay's figures without a backlog (medians \
         from the tables above):\n\n| | While draining | Without a backlog |\n|---|---:|---:|"
    );
    for r in &watch.ingest {
        let (label, calm) = if r.mode == "open" {
            (
                format!("Open loop {} /s: p50 / p99 / p99.9 ms", num(r.param as f64)),
                summarize(runs, RELAY, "open", r.param)
                    .map(|m| format!("{} / {} / {}", ms(m.p50), ms(m.p99), ms(m.p999))),
            )
        } else {
            (
                format!("Closed loop {} in flight: webhooks/s", r.param),
                summarize(runs, RELAY, "closed", r.param).map(|m| num(m.throughput)),
            )
        };
        let now = if r.mode == "open" {
            format!("{} / {} / {}", ms(r.p50_ms), ms(r.p99_ms), ms(r.p999_ms))
        } else {
            num(r.throughput)
        };
        let _ = writeln!(
            out,
            "| {label} | {now} | {} |",
            calm.unwrap_or_else(|| "–".into())
        );
    }
    let _ = writeln!(out);
}

/// The Targets row of stored bytes per webhook for one backend.
fn storage_target_row(out: &mut String, storage: Option<&Storage>, backend: &str) {
    let target = format!(
        "Stored bytes per webhook on {backend} ≤ {:.1} KB ({} bytes; the suite's mix, before pruning)",
        MAX_BYTES_PER_WEBHOOK / 1000.0,
        num(MAX_BYTES_PER_WEBHOOK)
    );
    let Some(s) = storage else {
        let _ = writeln!(out, "| {target} | – | not measured |");
        return;
    };
    let wal = s.wal_bytes.map_or(String::new(), |w| {
        format!("; WAL {} on disk beside it", bytes(w))
    });
    let _ = writeln!(
        out,
        "| {target} | {} bytes per webhook: {} in use for {} webhooks ({} records) after the ingest runs{wal} | {} |",
        s.bytes_per_webhook().map_or("–".into(), num),
        bytes(s.bytes),
        num(s.webhooks as f64),
        num(s.records as f64),
        if s.met() { "**met**" } else { "**not met**" }
    );
}

/// A size in bytes, in MiB from 1 MiB up.
pub fn bytes(value: u64) -> String {
    if value >= 1 << 20 {
        format!("{:.1} MiB", value as f64 / f64::from(1 << 20))
    } else {
        format!("{} bytes", num(value as f64))
    }
}

/// The queue's size after the ingest runs, per table and index.
fn write_storage(out: &mut String, results: &Results) {
    let stored: Vec<&Storage> = results
        .storage
        .iter()
        .chain(&results.storage_postgres)
        .collect();
    if stored.is_empty() {
        return;
    }
    let _ = writeln!(out, "## Queue size (stored bytes per webhook)\n");
    let _ = writeln!(
        out,
        "Each ingest relay's queue as its runs left it (every webhook kept, nothing pruned; the \
         forwarder ran at the default limit, so some records were delivered and their JSON \
         emptied), read beside the running relay. SQLite: pages in use, (`page_count` − \
         `freelist_count`) × `page_size`, through a read-only connection (its snapshot includes \
         pages still in the WAL), plus any other file the relay keeps in its queue folder, split by table and index with `dbstat`; the WAL's size on disk \
         is shown beside it, not counted (its frames are copies of counted pages). Postgres: \
         `pg_total_relation_size` of `webhooks` and `records`, split by table, index and TOAST.\n"
    );
    for s in stored {
        let _ = writeln!(
            out,
            "**{}**: {} for {} webhooks and {} records: **{} bytes per webhook**{}{}.\n",
            if s.backend == "sqlite" {
                "SQLite"
            } else {
                "Postgres"
            },
            bytes(s.bytes),
            num(s.webhooks as f64),
            num(s.records as f64),
            s.bytes_per_webhook().map_or("–".into(), num),
            s.file_bytes
                .map_or(String::new(), |f| format!("; database file {}", bytes(f))),
            s.wal_bytes
                .map_or(String::new(), |w| format!(", WAL {}", bytes(w))),
        );
        if s.other_files_bytes > 0 {
            let _ = writeln!(
                out,
                "Counted in it: {} in other files the relay keeps in its queue folder.\n",
                bytes(s.other_files_bytes)
            );
        }
        if !s.objects.is_empty() {
            let _ = writeln!(
                out,
                "| Table or index | Size | Bytes per webhook |\n|---|---:|---:|"
            );
            for object in &s.objects {
                let _ = writeln!(
                    out,
                    "| `{}` | {} | {} |",
                    object.name,
                    bytes(object.bytes),
                    num(object.bytes as f64 / s.webhooks.max(1) as f64)
                );
            }
            let _ = writeln!(out);
        }
    }
}

/// The Postgres paragraph: what was measured, and whether its commits were durable.
fn postgres_paragraph(out: &mut String, setup: Option<&Setup>, nproc: usize) {
    let Some(pg) = setup else {
        let _ = writeln!(
            out,
            "**Postgres** was not measured in this run. `bash bench/run.sh` measures it when \
             Postgres is installed (it sets up a durable cluster with `bench/postgres.sh`; \
             `--no-postgres` skips it); or pass `--postgres postgres://...` to \
             `relay-bench suite`.\n"
        );
        return;
    };
    let data = pg
        .data_directory
        .as_ref()
        .map_or(String::new(), |dir| format!(", data in `{dir}`"));
    let _ = write!(
        out,
        "**Postgres.** The relay on Postgres is the same binary with \
         `RELAY_QUEUE__BACKEND=postgres` (group commit, a pool of 16 connections), its queue in \
         the database `{}` (dropped and created again at the start, empty; the relay creates its \
         schema) on PostgreSQL {} at `{}` over loopback TCP{data}. Settings read from the server \
         at bench time: `fsync = {}`, `synchronous_commit = {}`, `full_page_writes = {}`, \
         `wal_sync_method = {}`, `shared_buffers = {}`, `max_connections = {}`. ",
        pg.database,
        pg.version,
        pg.address,
        pg.fsync,
        pg.synchronous_commit,
        pg.full_page_writes,
        pg.wal_sync_method,
        pg.shared_buffers,
        pg.max_connections,
    );
    if pg.fsync != "on" {
        let _ = write!(
            out,
            "**These commits were not durable**: with `fsync = {}` Postgres never forces its \
             writes to disk, so a crash of the machine could lose or corrupt webhooks already \
             answered 202; these figures flatter Postgres against SQLite, whose commits are \
             synced. ",
            pg.fsync
        );
    } else if pg.synchronous_commit == "off" {
        let _ = write!(
            out,
            "**These commits were not durable**: with `synchronous_commit = off` a 202 may \
             precede the flush of its commit's WAL, so a crash of the machine could lose the \
             last webhooks answered 202; these figures flatter Postgres against SQLite, whose \
             commits are synced. "
        );
    } else {
        let _ = write!(
            out,
            "Commits are durable: each 202 follows a commit whose WAL was flushed to disk, as \
             with SQLite. "
        );
    }
    if pg.full_page_writes != "on" {
        let _ = write!(
            out,
            "With `full_page_writes = {}` a crash during a page write can leave a torn page \
             that recovery cannot repair. ",
            pg.full_page_writes
        );
    }
    let cpu = if pg.cpu_counted {
        "Its CPU (the postmaster and all its processes, including those that ended during a \
         window) is in the \"Postgres CPU\" columns, not in the relay's; its background work \
         (checkpoints, autovacuum) may spill into the runs that follow, whichever server they \
         measure."
    } else {
        "Its CPU is not counted (the server is not a process of this machine, or could not be \
         identified as one)."
    };
    let _ = writeln!(
        out,
        "The server runs on the same {nproc}-core machine as everything else. {cpu} Forwarding, \
         memory-probe and targets below are measured on SQLite only.\n"
    );
}

fn latencies(m: &Median) -> String {
    format!("{} / {} / {}", ms(m.p50), ms(m.p99), ms(m.p999))
}

fn flags(m: &Median) -> String {
    let mut flags = String::new();
    if m.failed > 0 {
        let _ = write!(flags, " ⚠ {} not 202", m.failed);
    }
    if m.exhausted {
        flags.push_str(" †");
    }
    flags
}

/// Every event queued for this app id arrived there (more may: a repeat after a request that
/// got no answer), and an app id no source has got nothing. An event sent to the wrong app id
/// shows as one missing at the right one.
pub fn delivered_in_full(row: &Delivery) -> bool {
    row.delivered_events >= row.expected_events
        && !(row.sources.is_empty() && row.delivered_events > 0)
}

/// What the routing section's last column says about one app id.
fn delivery_verdict(row: &Delivery) -> String {
    if row.sources.is_empty() {
        return format!(
            "**not met**: {} events at an app id no source has",
            num(row.delivered_events as f64)
        );
    }
    if row.delivered_events < row.expected_events {
        return format!(
            "**not met**: {} missing",
            num((row.expected_events - row.delivered_events) as f64)
        );
    }
    match row.delivered_events - row.expected_events {
        0 => "every event".into(),
        extra => format!(
            "every event, and {} more (requests that got no answer: {})",
            num(extra as f64),
            num(row.unanswered as f64)
        ),
    }
}

/// Ratio `ten / one`, "–" when either is missing.
fn ratio(one: Option<f64>, ten: Option<f64>) -> String {
    match (one, ten) {
        (Some(one), Some(ten)) if one > 0.0 && one.is_finite() && ten.is_finite() => {
            format!("{:.2}", ten / one)
        }
        _ => "–".into(),
    }
}

/// The closed-loop throughput ratio ten / one: the median, over every concurrency and run, of
/// a ten-source run's throughput over that of the one-source run beside it (same concurrency,
/// same run number, one right after the other), so that drifting background load cancels out.
fn routing_throughput_ratio(runs: &[RunResult]) -> Option<f64> {
    let ratios = runs
        .iter()
        .filter(|ten| ten.server == TEN_SOURCES && ten.mode == "closed")
        .filter_map(|ten| {
            let one = runs.iter().find(|one| {
                one.server == ONE_SOURCE
                    && one.mode == "closed"
                    && one.param == ten.param
                    && one.run == ten.run
            })?;
            (one.throughput > 0.0).then(|| ten.throughput / one.throughput)
        })
        .collect();
    median(ratios)
}

/// The section comparing one source with ten (issue 12); a placeholder when not measured.
fn write_routing(out: &mut String, results: &Results) {
    let runs = &results.runs;
    let _ = writeln!(
        out,
        "## Cost of routing: 1 source against 10 sources over 3 app ids\n"
    );
    let _ = writeln!(
        out,
        "Two relays, the same binary on SQLite, side by side in the same harness and fake Heap, \
         their runs interleaved, alternating which goes first (run 1: 1 source then 10 \
         sources; run 2: 10 then 1; ...):\n\n\
         - **1 source**: the top-level keys (`userpilot.secrets`, `heap.app_id`), as every \
         deployment before issue 12; webhooks at `/webhooks/userpilot`.\n\
         - **10 sources**: `[sources.s0]`..`[sources.s9]` in a `--config` file and no top-level \
         keys, each source with its own secret; app ids spread over 3: s0–s3 → `bench-app-a`, \
         s4–s6 → `bench-app-b`, s7–s9 → `bench-app-c`. The load generator spreads the webhooks \
         evenly over the 10 URLs `/webhooks/userpilot/sN` (webhook *i* of a shuffled run to \
         source *i* mod 10), each signed with its source's secret.\n\n\
         Same generated webhooks and loops as the ingest runs (a subset of their \
         concurrencies and rates); the table shows medians of the runs, the headline ratio \
         the median of the ratios between runs side by side. Both forwarders are paused during the runs \
         (`POST /admin/forwarder/pause`), so the figures are what routing costs at ingest \
         (finding the source by its URL, checking that source's secrets, storing into its app \
         id's lane), not the work of forwarding three lanes instead of one. After the last run \
         both are released and every lane drains into the fake Heap, which counts track events \
         per app id: each app id must get every event its sources' 202 answers announced (all \
         requests of the runs, warm-ups included). Run it alone with \
         `bash bench/run.sh --sources` (a few minutes); the suite includes it unless \
         `--no-sources`.\n"
    );
    let Some(routing) = &results.routing else {
        let _ = writeln!(
            out,
            "*Not measured in this run*: the suite ran with `--no-sources`, or before the \
             relay routed webhooks by source (issue 12).\n"
        );
        return;
    };
    write_routing_figures(out, runs, routing);
}

fn write_routing_figures(out: &mut String, runs: &[RunResult], routing: &Routing) {
    let _ = writeln!(
        out,
        "| Mode | 1 source req/s | 10 sources req/s | 10 / 1 | 1 source p50 / p99 / p99.9 ms | 10 sources p50 / p99 / p99.9 ms | p99 10 / 1 | CPU µs/req, 1 source | CPU µs/req, 10 sources | CPU 10 / 1 |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut cpu_ratios = Vec::new();
    let mut open_rows = Vec::new();
    for mode in ["closed", "open"] {
        for param in params(runs, mode) {
            let (Some(one), Some(ten)) = (
                summarize(runs, ONE_SOURCE, mode, param),
                summarize(runs, TEN_SOURCES, mode, param),
            ) else {
                continue;
            };
            let label = if mode == "closed" {
                format!("closed loop, {param} in flight")
            } else {
                format!("open loop, {} /s", num(param as f64))
            };
            if let (Some(a), Some(b)) = (one.cpu_per_request_us, ten.cpu_per_request_us)
                && a > 0.0
            {
                cpu_ratios.push(b / a);
            }
            if mode == "open" {
                open_rows.push((param, one.p99, ten.p99));
            }
            let _ = writeln!(
                out,
                "| {label} | {}{} | {}{} | {} | {} | {} | {} | {} | {} | {} |",
                num(one.throughput),
                flags(&one),
                num(ten.throughput),
                flags(&ten),
                ratio(Some(one.throughput), Some(ten.throughput)),
                latencies(&one),
                latencies(&ten),
                ratio(Some(one.p99), Some(ten.p99)),
                opt(one.cpu_per_request_us, 0),
                opt(ten.cpu_per_request_us, 0),
                ratio(one.cpu_per_request_us, ten.cpu_per_request_us),
            );
        }
    }
    let _ = writeln!(out);
    let mut headline = Vec::new();
    if let Some(r) = routing_throughput_ratio(runs) {
        headline.push(format!(
            "closed-loop throughput with 10 sources is **{r:.2}×** that with 1 source (median \
             over every concurrency and run of the ratio between the two runs side by side)"
        ));
    }
    if let Some(r) = median(cpu_ratios) {
        headline.push(format!(
            "relay CPU per webhook **{r:.2}×** (median over the rows)"
        ));
    }
    for (rate, one, ten) in open_rows {
        headline.push(format!(
            "p99 at {} /s {} ms against {} ms",
            num(rate as f64),
            ms(ten),
            ms(one)
        ));
    }
    if !headline.is_empty() {
        let _ = writeln!(
            out,
            "**Cost of routing**: {}.
",
            headline.join("; ")
        );
    }

    let _ = writeln!(
        out,
        "Delivery: after the runs both forwarders were released \
         (`heap.events_per_minute` and `identity_events_per_minute` {} per app id); both queues \
         were empty {:.1} s later.\n",
        num(routing.events_per_minute as f64),
        routing.drain_s
    );
    let _ = writeln!(
        out,
        "| Relay | App id | Sources | Webhooks accepted | Not 202 | Track events queued (202 answers) | Track events at the fake Heap | `/api/track` requests | |"
    );
    let _ = writeln!(out, "|---|---|---|---:|---:|---:|---:|---:|---|");
    for row in &routing.deliveries {
        let _ = writeln!(
            out,
            "| {} | `{}` | {} | {} | {} | {} | {} | {} | {} |",
            label_routing(&row.server),
            row.app_id,
            if row.sources.is_empty() {
                "none".to_owned()
            } else {
                row.sources.join(", ")
            },
            num(row.webhooks as f64),
            num((row.refused + row.unanswered) as f64),
            num(row.expected_events as f64),
            num(row.delivered_events as f64),
            num(row.track_requests as f64),
            delivery_verdict(row),
        );
    }
    let all = routing.deliveries.iter().all(delivered_in_full);
    let _ = write!(
        out,
        "\nEvery event reached the fake Heap under its source's app id: {}.",
        if all { "**met**" } else { "**not met**" }
    );
    let accepted: Vec<(u64, &str)> = routing
        .sources
        .iter()
        .map(|s| (s.sent.accepted, s.name.as_str()))
        .collect();
    if let (Some(low), Some(high)) = (accepted.iter().min(), accepted.iter().max()) {
        let _ = write!(
            out,
            " Webhooks accepted per source over all runs: {} ({}) to {} ({}).",
            num(low.0 as f64),
            low.1,
            num(high.0 as f64),
            high.1
        );
    }
    let _ = writeln!(
        out,
        " Peak resident set (`VmHWM`): {} with 1 source, {} with 10.\n",
        mib(routing.one_source_peak_mib),
        mib(routing.ten_sources_peak_mib)
    );
}

fn label_routing(server: &str) -> &str {
    match server {
        ONE_SOURCE => "1 source",
        TEN_SOURCES => "10 sources",
        other => other,
    }
}

/// The transforms section, or what to run to measure it.
fn write_transforms(out: &mut String, results: &Results) {
    match &results.transforms {
        Some(transforms) => out.push_str(&crate::transforms::render(transforms, "")),
        None => {
            let _ = writeln!(
                out,
                "## Transforms: the CPU cost per webhook\n\nNot measured in this run: the relay \
                 build did not know `[sources.NAME] transform`, or the suite ran with \
                 `--no-transforms`. `bash bench/run.sh --transforms` measures it alone.\n"
            );
        }
    }
}

/// `relay-bench sources`: a heading, the machine, and the routing section alone.
pub fn render_routing_alone(results: &Results) -> String {
    let m = &results.machine;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "<!-- relay-bench sources, {}, commit {}: {} × {}, load {} before, {} after; median of \
         {} runs, {} s measured after {} s warm-up, {} s in all -->\n",
        m.date,
        m.commit,
        m.nproc,
        m.cpu_model,
        m.load_before,
        m.load_after,
        results.runs_per_mode,
        results.duration_s,
        results.warmup_s,
        m.total_s.round()
    );
    write_routing(&mut out, results);
    out
}

/// `relay-bench render`: the report from a suite's saved JSON.
pub fn render_file(json: &std::path::Path, out: &std::path::Path) -> anyhow::Result<()> {
    let results: Results = serde_json::from_str(&std::fs::read_to_string(json)?)?;
    let previous = std::fs::read_to_string(out).unwrap_or_default();
    std::fs::write(out, crate::section::keep(&previous, &render(&results)))?;
    Ok(())
}

pub fn render(results: &Results) -> String {
    let mut out = String::new();
    let m = &results.machine;
    let runs = &results.runs;
    let _ = writeln!(out, "# Benchmarks\n");
    let _ = writeln!(
        out,
        "Generated by `bench/run.sh` (the harness in `bench/`); do not edit by hand. Re-run with \
         `bash bench/run.sh` (about {} minutes, plus the release builds).\n",
        (m.total_s / 60.0).ceil().max(1.0)
    );
    let _ = writeln!(out, "| | |\n|---|---|");
    let _ = writeln!(out, "| Date | {} |", m.date);
    let _ = writeln!(out, "| Commit | `{}` |", m.commit);
    let _ = writeln!(out, "| CPU | {} × {} |", m.nproc, m.cpu_model);
    let _ = writeln!(out, "| Kernel | {} |", m.kernel);
    let _ = writeln!(
        out,
        "| Load average (1/5/15 min) | {} before, {} after |",
        m.load_before, m.load_after
    );
    let _ = writeln!(
        out,
        "| Runs | median of {} runs per mode, {} s measured after {} s warm-up; {} distinct users |",
        results.runs_per_mode, results.duration_s, results.warmup_s, results.users
    );
    let _ = writeln!(out, "| Suite time | {:.0} s |\n", m.total_s);

    let _ = writeln!(
        out,
        "**Noise.** This is a shared {}-core virtual machine: other engineers' builds and tests \
         ran at the same time (see the load average), and the load generator, the fake Heap and \
         the server under test share the same cores. Absolute figures are therefore low and \
         noisy; compare the **ratios** to the baseline, which ran interleaved with the relay \
         (run 1 baseline, run 1 relay on SQLite, run 1 relay on Postgres when measured, run 2 \
         baseline, ...) and suffered the same noise.\n",
        m.nproc
    );

    let _ = writeln!(out, "## Method\n");
    let _ = writeln!(
        out,
        "- **Requests**: unique, realistic webhooks of every kind (`samples::all` with varying \
         user ids and nonces), serialized and signed with `userpilot::sign` before each run. \
         HTTP/1.1 keep-alive connections (hyper's pooled client, `TCP_NODELAY`).\n\
         - **Baseline**: a bare axum server (`relay-bench baseline`) answering 202 with the \
         relay's body to the same requests, doing no work: same framework, runtime and \
         response, no verification, decoding, mapping or storage.\n\
         - **Relay**: the release binary, configured by environment only (`RELAY_*`), SQLite \
         queue in a temporary folder on the machine's disk (WAL, `synchronous = FULL`: every \
         202 follows a durable commit), `RELAY_LOG__LEVEL=warn`, forwarding to a fake Heap in \
         the harness at the default limit (15,000 events/min). The ingest runs are repeated \
         with the queue on Postgres (see **Postgres** below).\n\
         - **Closed loop**: N workers, each sending its next request when the previous one is \
         answered: maximum throughput (requests answered 202 per second). Latency there is \
         service time.\n\
         - **Open loop**: requests due at a fixed rate; latency measured from each request's \
         *intended* send time (coordinated-omission-correct: a stall is charged to every request \
         queued behind it), recorded in an HDR histogram. The scheduler wakes on tokio's 1 ms \
         timer, so up to ~1 ms of the figures is the generator's own timing, for both servers.\n\
         - **CPU**: utime + stime of the server process (`/proc/<pid>/stat`) over the measured \
         window; for Postgres, of the postmaster and its children (live ones, plus the \
         `cutime` + `cstime` of those it reaped). **Memory**: `VmRSS` idle (1 s after start) and `VmHWM` (peak) after all load \
         (`/proc/<pid>/status`).\n\
         - **Forwarding**: the fake Heap answers 200 at once and logs each request's time, \
         endpoint and array length.\n"
    );
    let stored_before_open = |server: &str| -> u64 {
        runs.iter()
            .filter(|r| r.server == server && r.mode == "closed")
            .map(|r| r.accepted)
            .sum()
    };
    if stored_before_open(RELAY) > 0 {
        let postgres = match stored_before_open(RELAY_POSTGRES) {
            0 => String::new(),
            stored => format!(
                " The relay on Postgres likewise keeps one database through its runs: more than \
                 {} stored webhooks before its open-loop runs.",
                num(stored as f64)
            ),
        };
        let _ = writeln!(
            out,
            "**Database size.** One relay process serves all ingest runs, and it keeps every \
             webhook (for redelivery deduplication, `queue.dedup_window_secs`, 7 days by \
             default), so its database grows through the runs as it would in production: the \
             open-loop runs, which come after the closed-loop ones, ran against more than {} \
             stored webhooks (those counted inside measured windows alone).{postgres}\n",
            num(stored_before_open(RELAY) as f64)
        );
    }
    postgres_paragraph(&mut out, results.postgres.as_ref(), m.nproc);

    // The servers of the ingest runs, in the order they ran; Postgres columns if it was measured.
    let servers: Vec<&str> = [BASELINE, RELAY, RELAY_POSTGRES]
        .into_iter()
        .filter(|name| runs.iter().any(|r| r.server == *name))
        .collect();
    let with_postgres = runs.iter().any(|r| r.server == RELAY_POSTGRES);
    let database_columns = |m: &Median, per_request: bool| {
        if !with_postgres {
            return String::new();
        }
        let cores = opt(m.database_cpu_cores, 2);
        if per_request {
            format!(" {} | {cores} |", opt(m.database_cpu_per_request_us, 0))
        } else {
            format!(" {cores} |")
        }
    };

    // Closed loop.
    let _ = writeln!(out, "## Ingest throughput (closed loop)\n");
    let _ = writeln!(
        out,
        "| Concurrency | Server | req/s | / baseline | p50 / p99 / p99.9 ms | Server CPU µs/req | Server CPU (cores) |{} Generator CPU (cores) |",
        if with_postgres {
            " Postgres CPU µs/req | Postgres CPU (cores) |"
        } else {
            ""
        }
    );
    let _ = writeln!(
        out,
        "|---:|---|---:|---:|---:|---:|---:|{}---:|",
        if with_postgres { "---:|---:|" } else { "" }
    );
    // Best throughput of each server, and the concurrency it came at.
    let mut best: Vec<(&str, f64, u64)> = Vec::new();
    for param in params(runs, "closed") {
        let Some(b) = summarize(runs, BASELINE, "closed", param) else {
            continue;
        };
        for &server in &servers {
            let Some(r) = summarize(runs, server, "closed", param) else {
                continue;
            };
            match best.iter_mut().find(|(name, _, _)| *name == server) {
                Some(entry) if entry.1 >= r.throughput => {}
                Some(entry) => *entry = (server, r.throughput, param),
                None => best.push((server, r.throughput, param)),
            }
            let ratio = if server == BASELINE {
                "–".to_owned()
            } else {
                format!("{:.2}", r.throughput / b.throughput.max(1e-9))
            };
            let _ = writeln!(
                out,
                "| {param} | {} | {}{} | {ratio} | {} | {} | {} |{} {} |",
                label(server),
                num(r.throughput),
                flags(&r),
                latencies(&r),
                opt(r.cpu_per_request_us, 0),
                opt(r.cpu_cores, 2),
                database_columns(&r, true),
                opt(r.client_cores, 2),
            );
        }
    }
    let best_of = |server: &str| {
        best.iter()
            .find(|(name, _, _)| *name == server)
            .map(|&(_, throughput, param)| (throughput, param))
    };
    let (best_baseline, best_relay) = (best_of(BASELINE), best_of(RELAY));
    let _ = writeln!(
        out,
        "\n† the prepared requests ran out before the window ended; that run's window was \
         shortened (its rate is still requests / measured seconds).\n"
    );
    let cost = |server: &str| {
        best_of(server)
            .and_then(|(_, param)| summarize(runs, server, "closed", param))
            .filter(|m| m.cpu_per_request_us.is_some())
    };
    if let (Some(b), Some(r)) = (
        cost(BASELINE).and_then(|m| m.cpu_per_request_us),
        cost(RELAY).and_then(|m| m.cpu_per_request_us),
    ) {
        let _ = write!(
            out,
            "**CPU cost.** At its best concurrency the relay on SQLite used {r:.0} µs of CPU per \
             webhook and the baseline {b:.0} µs ({:.1}×). On {} cores with nothing else running, \
             CPU alone would cap the relay near {} webhooks/s (cores ÷ CPU per webhook, ignoring \
             the load generator's share), if its single SQLite writer thread (about half of its \
             CPU in a profile, see below) did not saturate first.",
            r / b.max(1e-9),
            m.nproc,
            num(m.nproc as f64 * 1e6 / r.max(1e-9)),
        );
        if let Some(p) = cost(RELAY_POSTGRES)
            && let Some(relay_us) = p.cpu_per_request_us
        {
            let database = match p.database_cpu_per_request_us {
                Some(db) => format!(
                    " and the Postgres server {db:.0} µs more: {:.0} µs per webhook together \
                     ({:.1}× the baseline; the two share the machine's {} cores)",
                    relay_us + db,
                    (relay_us + db) / b.max(1e-9),
                    m.nproc
                ),
                None => " (the Postgres server's CPU not counted)".into(),
            };
            let _ = write!(
                out,
                " On Postgres, at its best concurrency, the relay used {relay_us:.0} µs per \
                 webhook{database}."
            );
        }
        let _ = writeln!(out, "\n");
    }

    // Open loop.
    let _ = writeln!(out, "## Ack latency at fixed rates (open loop)\n");
    let _ = writeln!(
        out,
        "Latency from the intended send time to the 202 answer, milliseconds.\n"
    );
    let _ = writeln!(
        out,
        "| Rate /s | Server | Achieved /s | p50 / p99 / p99.9 / max | p99 − baseline p99 | Server CPU (cores) |{} Most in flight |",
        if with_postgres {
            " Postgres CPU (cores) |"
        } else {
            ""
        }
    );
    let _ = writeln!(
        out,
        "|---:|---|---:|---:|---:|---:|{}---:|",
        if with_postgres { "---:|" } else { "" }
    );
    for param in params(runs, "open") {
        let baseline = summarize(runs, BASELINE, "open", param);
        for &server in &servers {
            let Some(r) = summarize(runs, server, "open", param) else {
                continue;
            };
            let over_baseline = match &baseline {
                Some(b) if server != BASELINE => ms(r.p99 - b.p99),
                _ => "–".into(),
            };
            let _ = writeln!(
                out,
                "| {} | {} | {}{} | {} / {} | {over_baseline} | {} |{} {} |",
                num(param as f64),
                label(server),
                num(r.throughput),
                flags(&r),
                latencies(&r),
                ms(r.max),
                opt(r.cpu_cores, 2),
                database_columns(&r, false),
                num(r.max_in_flight as f64),
            );
        }
    }
    for param in params(runs, "open") {
        for (server, what) in [(FRESH, "SQLite"), (FRESH_POSTGRES, "Postgres")] {
            if let Some(f) = summarize(runs, server, "open", param) {
                let database = f
                    .database_cpu_cores
                    .map_or(String::new(), |c| format!(", Postgres CPU {c:.2} cores"));
                let _ = writeln!(
                    out,
                    "\nThe same at {} /s on a **fresh relay on {what} (empty queue)**: p50 / p99 / \
                     p99.9 / max {} / {} ms, {} /s achieved{}, relay CPU {} cores{database}.",
                    num(param as f64),
                    latencies(&f),
                    ms(f.max),
                    num(f.throughput),
                    flags(&f),
                    opt(f.cpu_cores, 2),
                );
            }
        }
    }
    let _ = writeln!(
        out,
        "\n\"Most in flight\": the most requests outstanding at once in any run (each holds \
         its own HTTP/1.1 connection); it grows when the server falls behind the rate. \
         \"not 202\": requests answered otherwise (the relay's 503 when it cannot take more) or \
         not answered within 10 s.\n"
    );

    // Memory.
    let mem = &results.memory;
    let _ = writeln!(out, "## Memory (resident set)\n");
    // The relay on Postgres gets a column when it was measured.
    let postgres_mib = |value: Option<f64>| {
        if with_postgres {
            format!(" {} |", mib(value))
        } else {
            String::new()
        }
    };
    let no_postgres = postgres_mib(None);
    let _ = writeln!(
        out,
        "| | Baseline | Relay{} |\n|---|---:|---:|{}",
        if with_postgres {
            " (SQLite) | Relay (Postgres)"
        } else {
            ""
        },
        if with_postgres { "---:|" } else { "" }
    );
    let _ = writeln!(
        out,
        "| Idle, 1 s after start (`VmRSS`) | {} | {} |{}",
        mib(mem.baseline_idle_mib),
        mib(mem.relay_idle_mib),
        postgres_mib(mem.relay_postgres_idle_mib)
    );
    let most_in_flight = |server: &str| {
        runs.iter()
            .filter(|r| r.server == server)
            .map(|r| r.max_in_flight)
            .max()
            .unwrap_or(0)
    };
    let _ = writeln!(
        out,
        "| Peak during the ingest runs (`VmHWM`); most connections at once: baseline {}, relay {}{} | {} | {} |{}",
        num(most_in_flight(BASELINE) as f64),
        num(most_in_flight(RELAY) as f64),
        if with_postgres {
            format!(
                ", relay on Postgres {}",
                num(most_in_flight(RELAY_POSTGRES) as f64)
            )
        } else {
            String::new()
        },
        mib(mem.baseline_peak_mib),
        mib(mem.relay_peak_mib),
        postgres_mib(mem.relay_postgres_peak_mib)
    );
    let _ = writeln!(
        out,
        "| After the ingest runs (`VmRSS`) | – | {} |{no_postgres}",
        mib(mem.relay_after_load_mib)
    );
    let _ = writeln!(
        out,
        "| Peak while forwarding at saturation and live (`VmHWM`) | – | {} |{no_postgres}",
        mib(mem.forwarding_peak_mib)
    );
    if mem.drain_peak_mib.is_some() {
        let _ = writeln!(
            out,
            "| Peak during the large backlog drain (`VmHWM`) | – | {} |{no_postgres}",
            mib(mem.drain_peak_mib)
        );
    }
    let _ = writeln!(out);
    if !mem.by_connections.is_empty() {
        let _ = writeln!(
            out,
            "Peak RSS of a fresh relay against the number of concurrent connections (closed \
             loop, 2 s at each count, rising; HTTP/1.1, so one request in flight per \
             connection):\n"
        );
        let _ = writeln!(
            out,
            "| Connections | Peak RSS | req/s | p99 ms |\n|---:|---:|---:|---:|"
        );
        for level in &mem.by_connections {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} |",
                num(level.connections as f64),
                mib(level.peak_mib),
                num(level.throughput),
                ms(level.p99_ms)
            );
        }
        let _ = writeln!(out);
    }

    write_storage(&mut out, results);

    // Forwarding.
    let _ = writeln!(out, "## Forwarding to Heap\n");
    let drains: Vec<(&str, &Drain)> = [
        (
            "Backlog released at saturation",
            results.saturation.as_ref(),
        ),
        ("Live: ingest and forwarding at once", results.live.as_ref()),
        (
            "Backlog under a low limit",
            results.limit.as_ref().map(|l| &l.drain),
        ),
        ("Large backlog (opt-in)", results.big_drain.as_ref()),
    ]
    .into_iter()
    .filter_map(|(label, drain)| drain.map(|d| (label, d)))
    .collect();
    if drains.is_empty() {
        let _ = writeln!(out, "Not measured in this run.\n");
    } else {
        let _ = writeln!(
            out,
            "| | Webhooks | Track events | Forwarded events/s | `/api/track` requests | Mean batch | Full batches (1,000) | Track requests per 1,000 events | All Heap requests per 1,000 events | User-property requests | Relay CPU s |"
        );
        let _ = writeln!(
            out,
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        for (label, d) in &drains {
            let _ = writeln!(
                out,
                "| {label} | {} | {} | {} | {} | {:.0} | {} | {:.3} | {:.3} | {} | {} |",
                num(d.webhooks as f64),
                num(d.track_events as f64),
                num(d.events_per_s),
                num(d.track_requests as f64),
                d.mean_batch,
                num(d.full_batches as f64),
                d.track_requests_per_1000,
                d.all_requests_per_1000,
                num(d.user_requests as f64),
                opt(d.relay_cpu_s, 1),
            );
        }
        let _ = writeln!(
            out,
            "\n\"Backlog\" rows: the webhooks are queued with the forwarder paused \
             (`POST /admin/forwarder/pause`), then released; events/s runs from the release to \
             the last event received. \"Live\": closed loop at 32 in flight for {} s while the \
             forwarder runs, until the queue is empty. Saturation and live use \
             `RELAY_HEAP__EVENTS_PER_MINUTE` high enough not to bind.\n",
            results.duration_s
        );
        if let Some(live) = &results.live {
            let _ = writeln!(
                out,
                "Ingest while forwarding live: {} webhooks/s (32 in flight).\n",
                num(live.ingest_per_s)
            );
        }
    }
    if let (Some(d), Some(watch)) = (&results.big_drain, &results.big_drain_watch) {
        write_big_drain(&mut out, d, watch, runs);
    }
    if let Some(limit) = &results.limit {
        let _ = writeln!(out, "### Rate limit\n");
        let _ = writeln!(
            out,
            "`RELAY_HEAP__EVENTS_PER_MINUTE={}`; the relay's budget is a burst of {} events (one \
             full batch) then {:.1} events/s. {} events drained over {:.1} s.\n",
            limit.configured_per_min,
            limit.burst,
            limit.configured_per_min as f64 / 60.0,
            num(limit.drain.track_events as f64),
            limit.span_s
        );
        let _ = writeln!(out, "| | Measured | Allowed |\n|---|---:|---:|");
        let _ = writeln!(
            out,
            "| Steady rate after the first batch | {} events/min | {} events/min |",
            num(limit.steady_per_min),
            num(limit.configured_per_min as f64)
        );
        let _ = writeln!(
            out,
            "| Worst excess over burst + rate × t, at any arrival | {:.1} events | ≤ 0 |",
            limit.worst_excess_events
        );
        let _ = writeln!(
            out,
            "| Most events in any 10 s window | {} | {} (limit/6) + {} burst |\n",
            num(limit.max_in_10s as f64),
            num(limit.configured_per_min as f64 / 6.0),
            limit.burst
        );
        let _ = writeln!(
            out,
            "The limiter is a token bucket (GCRA) whose burst is one batch: over any window of \
             T seconds it sends at most burst + limit × T / 60 events. Over a 60 s window that \
             is the limit plus one batch ({} events above it): Heap's documented limit is per \
             minute, and whether Heap counts a leading burst against it is not documented.\n",
            limit.burst
        );
    }

    write_routing(&mut out, results);
    write_transforms(&mut out, results);

    // Targets.
    let _ = writeln!(out, "## Targets\n");
    let _ = writeln!(out, "| Target | Measured | Verdict |\n|---|---|---|");
    let verdict = |met: bool| if met { "**met**" } else { "**not met**" };
    match (best_baseline, best_relay) {
        (Some((b, bc)), Some((r, rc))) => {
            let ratio = r / b.max(1e-9);
            let _ = writeln!(
                out,
                "| Ingest on SQLite, durable commits: ≥ {MIN_THROUGHPUT_RATIO}× the baseline's throughput (best relay against best baseline) | best relay {} req/s (at {rc}) / best baseline {} req/s (at {bc}) = {ratio:.2}× | {} |",
                num(r),
                num(b),
                verdict(ratio >= MIN_THROUGHPUT_RATIO)
            );
        }
        _ => {
            let _ = writeln!(
                out,
                "| Ingest on SQLite, durable commits: ≥ {MIN_THROUGHPUT_RATIO}× the baseline's throughput | – | not measured |"
            );
        }
    }
    match cost(RELAY).and_then(|m| m.cpu_per_request_us) {
        Some(us) => {
            let _ = writeln!(
                out,
                "| Relay CPU on SQLite ≤ {MAX_CPU_US} µs per webhook, at its best concurrency | {us:.0} µs per webhook at {} in flight (user + system time of the relay process over the window) | {} |",
                best_relay.map_or(0, |(_, param)| param),
                verdict(us <= MAX_CPU_US)
            );
        }
        None => {
            let _ = writeln!(
                out,
                "| Relay CPU on SQLite ≤ {MAX_CPU_US} µs per webhook, at its best concurrency | – | not measured |"
            );
        }
    }
    let kept_up = |m: &Median| m.throughput >= P99_RATE as f64 * 0.98 && m.failed == 0;
    match summarize(runs, RELAY, "open", P99_RATE) {
        Some(r) => {
            let fresh = summarize(runs, FRESH, "open", P99_RATE);
            let fresh_text = fresh.as_ref().map_or(String::new(), |f| {
                format!(
                    "; on an empty database p99 {} ms (p99.9 {} ms)",
                    ms(f.p99),
                    ms(f.p999)
                )
            });
            let fresh_verdict = fresh.as_ref().map_or(String::new(), |f| {
                format!(
                    "; {} on an empty database",
                    verdict(f.p99 <= MAX_P99_MS && kept_up(f))
                )
            });
            let _ = writeln!(
                out,
                "| p99 ack latency ≤ 10 ms at 2,000 webhooks/s | p99 {} ms (p99.9 {} ms), {} /s achieved, with the database grown by the earlier runs{fresh_text} | {} with the grown database{fresh_verdict} |",
                ms(r.p99),
                ms(r.p999),
                num(r.throughput),
                verdict(r.p99 <= MAX_P99_MS && kept_up(&r)),
            );
        }
        None => {
            let _ = writeln!(
                out,
                "| p99 ack latency ≤ 10 ms at 2,000 webhooks/s | – | not measured |"
            );
        }
    }
    match (best_baseline, best_of(RELAY_POSTGRES)) {
        (Some((b, bc)), Some((p, pc))) => {
            let ratio = p / b.max(1e-9);
            let _ = writeln!(
                out,
                "| Ingest on Postgres: ≥ {MIN_POSTGRES_RATIO}× the baseline's throughput (best relay against best baseline) | best relay on Postgres {} req/s (at {pc}) / best baseline {} req/s (at {bc}) = {ratio:.2}× | {} |",
                num(p),
                num(b),
                verdict(ratio >= MIN_POSTGRES_RATIO)
            );
        }
        _ => {
            let _ = writeln!(
                out,
                "| Ingest on Postgres: ≥ {MIN_POSTGRES_RATIO}× the baseline's throughput | – | not measured (Postgres not installed, or `--no-postgres`) |"
            );
        }
    }
    storage_target_row(&mut out, results.storage.as_ref(), "SQLite");
    if with_postgres {
        storage_target_row(&mut out, results.storage_postgres.as_ref(), "Postgres");
    }
    let peak = [mem.relay_peak_mib, mem.forwarding_peak_mib]
        .into_iter()
        .flatten()
        .fold(None, |acc: Option<f64>, v| {
            Some(acc.map_or(v, |a| a.max(v)))
        });
    match peak {
        Some(peak) => {
            let over: Vec<String> = mem
                .by_connections
                .iter()
                .filter(|level| level.peak_mib.is_some_and(|p| p > MAX_PEAK_MIB))
                .map(|level| {
                    format!(
                        "{} at {} connections",
                        mib(level.peak_mib),
                        num(level.connections as f64)
                    )
                })
                .collect();
            let (over_text, over_verdict) = if over.is_empty() {
                (String::new(), String::new())
            } else {
                (
                    format!("; memory probe: {}", over.join(", ")),
                    " at the suite's load; **not met** with that many connections".to_owned(),
                )
            };
            let _ = writeln!(
                out,
                "| Peak RSS ≤ 64 MiB under max load | {peak:.1} MiB (ingest runs, up to {} connections at once; forwarding at saturation){over_text} | {}{over_verdict} |",
                num(most_in_flight(RELAY) as f64),
                verdict(peak <= MAX_PEAK_MIB)
            );
        }
        None => {
            let _ = writeln!(
                out,
                "| Peak RSS ≤ 64 MiB under max load | – | not measured |"
            );
        }
    }
    match mem.relay_idle_mib {
        Some(idle) => {
            let _ = writeln!(
                out,
                "| RSS ≤ 20 MiB idle | {idle:.1} MiB | {} |",
                verdict(idle <= MAX_IDLE_MIB)
            );
        }
        None => {
            let _ = writeln!(out, "| RSS ≤ 20 MiB idle | – | not measured |");
        }
    }
    match &results.saturation {
        Some(d) => {
            let _ = writeln!(
                out,
                "| ≤ 1.02 Heap requests per 1,000 events at saturation | {:.3} `/api/track` requests per 1,000 events (mean batch {:.0}); {:.3} counting the `add_user_properties` requests too | {} for `/api/track`; {} counting every Heap request |",
                d.track_requests_per_1000,
                d.mean_batch,
                d.all_requests_per_1000,
                verdict(d.track_requests_per_1000 <= MAX_REQUESTS_PER_1000),
                verdict(d.all_requests_per_1000 <= MAX_REQUESTS_PER_1000),
            );
        }
        None => {
            let _ = writeln!(
                out,
                "| ≤ 1.02 Heap requests per 1,000 events at saturation | – | not measured |"
            );
        }
    }
    match &results.limit {
        Some(l) => {
            // Arrival times are taken at the sink, a network hop after the limiter decided;
            // allow 1% of a batch for that jitter.
            let tolerance = l.burst as f64 * 0.01;
            let reached = l.steady_per_min >= l.configured_per_min as f64 * 0.95;
            let respected = l.worst_excess_events <= tolerance;
            let _ = writeln!(
                out,
                "| Configured Heap rate limit reached but not exceeded | steady {} events/min of {} configured ({:.1}%); worst excess over the budget {:.1} events | {} |",
                num(l.steady_per_min),
                num(l.configured_per_min as f64),
                l.steady_per_min * 100.0 / l.configured_per_min.max(1) as f64,
                l.worst_excess_events,
                verdict(reached && respected)
            );
        }
        None => {
            let _ = writeln!(
                out,
                "| Configured Heap rate limit reached but not exceeded | – | not measured |"
            );
        }
    }
    match (&results.big_drain, &results.big_drain_watch) {
        (Some(d), Some(watch)) => {
            let v = big_drain_verdict(d, watch);
            let backlog = num(d.webhooks as f64);
            let _ = writeln!(
                out,
                "| A backlog of {backlog} webhooks drains at ≥ {:.0} % of the configured rate | {} events/s of {} configured ({:.1} %), {} events in {:.0} s | {} |",
                MIN_DRAIN_SHARE * 100.0,
                num(d.events_per_s),
                num(v.configured_per_s),
                d.events_per_s / v.configured_per_s.max(1e-9) * 100.0,
                num(d.track_events as f64),
                d.drain_s,
                verdict(v.rate_held),
            );
            let draining = watch
                .ingest
                .iter()
                .find(|r| r.mode == "closed" && r.param == DRAINING_CONCURRENCY as u64);
            let idle = summarize(runs, RELAY, "closed", DRAINING_CONCURRENCY as u64);
            match (draining, idle) {
                (Some(now), Some(idle)) => {
                    let share = now.throughput / idle.throughput.max(1e-9);
                    let _ = writeln!(
                        out,
                        "| Ingest while it drains ≥ {MIN_DRAINING_INGEST}× idle ingest (closed loop, {DRAINING_CONCURRENCY} in flight) | {} req/s while draining / {} req/s without a backlog (median of the ingest runs) = {share:.2}× | {} |",
                        num(now.throughput),
                        num(idle.throughput),
                        verdict(share >= MIN_DRAINING_INGEST && now.failed == 0),
                    );
                }
                _ => {
                    let _ = writeln!(
                        out,
                        "| Ingest while it drains ≥ {MIN_DRAINING_INGEST}× idle ingest (closed loop, {DRAINING_CONCURRENCY} in flight) | – | not measured (the ingest runs had no closed loop at {DRAINING_CONCURRENCY}) |"
                    );
                }
            }
            let open = watch.ingest.iter().find(|r| r.mode == "open");
            let _ = writeln!(
                out,
                "| p99 ack latency ≤ {MAX_P99_MS} ms at {} webhooks/s while it drains | {} | {} |",
                num(P99_RATE as f64),
                open.map_or("–".into(), |r| format!(
                    "p99 {} ms (p99.9 {} ms), {} /s achieved{}",
                    ms(r.p99_ms),
                    ms(r.p999_ms),
                    num(r.throughput),
                    if r.failed + r.refused > 0 {
                        format!(", {} not 202", num((r.failed + r.refused) as f64))
                    } else {
                        String::new()
                    }
                )),
                if open.is_some() {
                    verdict(v.fast)
                } else {
                    "not measured"
                },
            );
            let _ = writeln!(
                out,
                "| Resident set flat while it drains (≤ {FLAT_RSS_MIB} MiB growth from halfway to the end, within {MAX_PEAK_MIB} MiB) | range {:.1} MiB over {} samples; peak {} | {} |",
                v.rss_spread_mib,
                watch.rss_mib.len(),
                mib(mem.drain_peak_mib),
                verdict(v.flat),
            );
        }
        (Some(d), None) => {
            let _ = writeln!(
                out,
                "| Backlog drain of {} events | {:.0} s at {} events/s; peak RSS {} | measured |",
                num(d.track_events as f64),
                d.drain_s,
                num(d.events_per_s),
                mib(mem.drain_peak_mib)
            );
        }
        (None, _) => {
            let _ = writeln!(
                out,
                "| A backlog of 1,000,000 webhooks drains at ≥ {:.0} % of the configured rate, ingest while it drains ≥ {MIN_DRAINING_INGEST}× idle with p99 ≤ {MAX_P99_MS} ms at {} webhooks/s, resident set flat | – | not measured (opt-in: `bash bench/run.sh --drain 1000000`, long) |",
                MIN_DRAIN_SHARE * 100.0,
                num(P99_RATE as f64)
            );
        }
    }
    match &results.routing {
        Some(routing) => {
            let delivered = routing.deliveries.iter().all(delivered_in_full);
            let _ = writeln!(
                out,
                "| Cost of routing stated (issue 12): ingest with 10 sources over 3 app ids against 1 source, every event at its app id | closed-loop throughput 10 / 1 = {} (median of the run pairs) | measured; delivery to each app id {} |",
                routing_throughput_ratio(runs).map_or("–".into(), |r| format!("{r:.2}")),
                verdict(delivered)
            );
        }
        None => {
            let _ = writeln!(
                out,
                "| Cost of routing stated (issue 12): ingest with 10 sources over 3 app ids against 1 source | – | not measured (`bash bench/run.sh --sources`) |"
            );
        }
    }
    match &results.transforms {
        Some(transforms) => {
            let _ = writeln!(out, "{}", crate::transforms::target_row(transforms));
        }
        None => {
            let _ = writeln!(
                out,
                "| Cost of a transform (issue 13): ≤ {} µs CPU per webhook over no transform, for `.` and a reshaping program | – | not measured (`bash bench/run.sh --transforms`) |",
                crate::transforms::TARGET_US
            );
        }
    }
    let _ = writeln!(out);
    for note in &results.notes {
        let _ = writeln!(out, "{note}\n");
    }

    let _ = writeln!(out, "{SETTINGS}");
    let _ = writeln!(out, "{BUILD_TIME}");

    // Every run.
    let _ = writeln!(out, "## Every run\n");
    let _ = writeln!(out, "<details><summary>{} runs</summary>\n", runs.len());
    let _ = writeln!(
        out,
        "| Server | Mode | N | Run | req/s | p50 | p99 | p99.9 | max | Server CPU s |{} Generator CPU s | Accepted | Refused | Failed | Events |",
        if with_postgres {
            " Postgres CPU s |"
        } else {
            ""
        }
    );
    let _ = writeln!(
        out,
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|{}---:|---:|---:|---:|---:|",
        if with_postgres { "---:|" } else { "" }
    );
    for r in runs {
        let database = if with_postgres {
            format!(" {} |", opt(r.database_cpu_s, 2))
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {}{} | {} | {} | {} | {} | {} |{database} {} | {} | {} | {} | {} |",
            r.server,
            r.mode,
            r.param,
            r.run,
            num(r.throughput),
            if r.exhausted { " †" } else { "" },
            ms(r.p50_ms),
            ms(r.p99_ms),
            ms(r.p999_ms),
            ms(r.max_ms),
            opt(r.server_cpu_s, 2),
            opt(r.client_cpu_s, 2),
            r.accepted,
            r.refused,
            r.failed,
            r.events,
        );
    }
    let _ = writeln!(out, "\n</details>");
    let _ = writeln!(
        out,
        "\nMedians above are taken per column over the runs, so one row's figures may come \
         from different runs."
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(vec![]), None);
    }

    fn run(server: &str, mode: &str, param: u64, throughput: f64) -> RunResult {
        RunResult {
            server: server.into(),
            mode: mode.into(),
            param,
            run: 1,
            elapsed_s: 1.0,
            completed: throughput as u64,
            accepted: throughput as u64,
            duplicate: 0,
            quarantined: 0,
            refused: 0,
            failed: 0,
            events: throughput as u64,
            throughput,
            p50_ms: 1.0,
            p99_ms: 2.0,
            p999_ms: 3.0,
            max_ms: 4.0,
            mean_ms: 1.0,
            server_cpu_s: Some(0.5),
            client_cpu_s: Some(0.1),
            database_cpu_s: (server == RELAY_POSTGRES).then_some(0.25),
            exhausted: false,
            max_in_flight: 8,
            sent: Vec::new(),
        }
    }

    fn setup(fsync: &str, synchronous_commit: &str) -> Setup {
        Setup {
            address: "127.0.0.1:5434".into(),
            database: "relay_bench".into(),
            version: "15.18".into(),
            fsync: fsync.into(),
            synchronous_commit: synchronous_commit.into(),
            full_page_writes: "on".into(),
            wal_sync_method: "fdatasync".into(),
            shared_buffers: "128MB".into(),
            max_connections: "100".into(),
            data_directory: None,
            cpu_counted: true,
        }
    }

    fn report(servers: &[&str], postgres: Option<Setup>) -> String {
        let mut runs = Vec::new();
        for &server in servers {
            runs.push(run(server, "closed", 8, 1000.0));
            runs.push(run(server, "open", 1000, 1000.0));
        }
        render(&Results {
            machine: crate::results::Machine {
                cpu_model: "test".into(),
                nproc: 2,
                kernel: "test".into(),
                load_before: String::new(),
                load_after: String::new(),
                commit: "test".into(),
                date: "today".into(),
                total_s: 60.0,
            },
            runs_per_mode: 1,
            duration_s: 1.0,
            warmup_s: 0.0,
            users: 10,
            runs,
            memory: crate::results::Memory::default(),
            saturation: None,
            live: None,
            limit: None,
            big_drain: None,
            big_drain_watch: None,
            notes: Vec::new(),
            postgres,
            routing: None,
            transforms: None,
            storage: None,
            storage_postgres: None,
        })
    }

    #[test]
    fn postgres_rows_and_settings_appear_beside_sqlite() {
        let markdown = report(&[BASELINE, RELAY, RELAY_POSTGRES], Some(setup("on", "on")));
        for expected in [
            "| 8 | relay, SQLite | 1,000 | 1.00 |",
            "| 8 | relay, Postgres | 1,000 | 1.00 | 1.00 / 2.00 / 3.00 | 500 | 0.50 | 250 | 0.25 |",
            "| 1,000 | relay, Postgres | 1,000 | 1.00 / 2.00 / 3.00 / 4.00 | 0.00 | 0.50 | 0.25 |",
            "Postgres CPU µs/req",
            "`fsync = on`, `synchronous_commit = on`, `full_page_writes = on`",
            "Commits are durable",
            "| relay-postgres | closed | 8 | 1 |",
        ] {
            assert!(
                markdown.contains(expected),
                "{expected:?} missing in:\n{markdown}"
            );
        }
        assert!(!markdown.contains("not durable"));
    }

    #[test]
    fn commits_without_fsync_or_synchronous_commit_are_called_not_durable() {
        let no_fsync = report(&[BASELINE, RELAY, RELAY_POSTGRES], Some(setup("off", "on")));
        assert!(no_fsync.contains("**These commits were not durable**: with `fsync = off`"));
        let asynchronous = report(&[BASELINE, RELAY, RELAY_POSTGRES], Some(setup("on", "off")));
        assert!(
            asynchronous
                .contains("**These commits were not durable**: with `synchronous_commit = off`")
        );
    }

    #[test]
    fn without_postgres_the_report_says_how_to_measure_it() {
        let markdown = report(&[BASELINE, RELAY], None);
        assert!(markdown.contains("**Postgres** was not measured in this run."));
        assert!(!markdown.contains("Postgres CPU"));
        assert!(markdown.contains("| 8 | baseline | 1,000 | – |"));
    }

    #[test]
    fn numbers_get_thousands_separators() {
        assert_eq!(num(1234567.4), "1,234,567");
        assert_eq!(num(999.0), "999");
        assert_eq!(num(-1500.0), "-1,500");
    }
    fn routing_results(deliveries: Vec<Delivery>) -> Results {
        let mut runs = Vec::new();
        for (server, throughput) in [(ONE_SOURCE, 1000.0), (TEN_SOURCES, 900.0)] {
            runs.push(run(server, "closed", 32, throughput));
            runs.push(run(server, "open", 2000, 2000.0));
        }
        let mut results = Results {
            machine: crate::results::Machine {
                cpu_model: "test".into(),
                nproc: 2,
                kernel: "test".into(),
                load_before: String::new(),
                load_after: String::new(),
                commit: "test".into(),
                date: "today".into(),
                total_s: 60.0,
            },
            runs_per_mode: 1,
            duration_s: 1.0,
            warmup_s: 0.0,
            users: 10,
            runs,
            memory: crate::results::Memory::default(),
            saturation: None,
            live: None,
            limit: None,
            big_drain: None,
            big_drain_watch: None,
            notes: Vec::new(),
            postgres: None,
            routing: None,
            transforms: None,
            storage: None,
            storage_postgres: None,
        };
        results.routing = Some(Routing {
            sources: Vec::new(),
            deliveries,
            events_per_minute: 6_000_000,
            drain_s: 2.5,
            one_source_peak_mib: Some(30.0),
            ten_sources_peak_mib: Some(31.0),
        });
        results
    }

    fn lane(server: &str, app_id: &str, sources: &[&str], expected: u64, got: u64) -> Delivery {
        Delivery {
            server: server.into(),
            app_id: app_id.into(),
            sources: sources.iter().map(|s| s.to_string()).collect(),
            webhooks: expected,
            expected_events: expected,
            unanswered: 0,
            refused: 0,
            delivered_events: got,
            track_requests: 1,
        }
    }

    #[test]
    fn the_routing_section_states_the_ratio_and_every_app_ids_delivery() {
        let markdown = render(&routing_results(vec![
            lane(ONE_SOURCE, "bench-app", &["default"], 300, 300),
            lane(
                TEN_SOURCES,
                "bench-app-a",
                &["s0", "s1", "s2", "s3"],
                120,
                120,
            ),
            lane(TEN_SOURCES, "bench-app-b", &["s4", "s5", "s6"], 90, 90),
            lane(TEN_SOURCES, "bench-app-c", &["s7", "s8", "s9"], 90, 90),
        ]));
        for expected in [
            "## Cost of routing: 1 source against 10 sources over 3 app ids",
            "| closed loop, 32 in flight | 1,000 | 900 | 0.90 | 1.00 / 2.00 / 3.00 | 1.00 / 2.00 / 3.00 | 1.00 | 500 | 556 | 1.11 |",
            "| open loop, 2,000 /s | 2,000 | 2,000 | 1.00 |",
            "closed-loop throughput with 10 sources is **0.90×** that with 1 source",
            "| 10 sources | `bench-app-b` | s4, s5, s6 | 90 | 0 | 90 | 90 | 1 | every event |",
            "under its source's app id: **met**",
            "10 / 1 = 0.90 (median of the run pairs) | measured; delivery to each app id **met** |",
            "| relay-10-sources | closed | 32 | 1 |",
        ] {
            assert!(
                markdown.contains(expected),
                "{expected:?} missing in:\n{markdown}"
            );
        }
        assert!(!markdown.contains("*Not measured in this run*"));
    }

    #[test]
    fn a_missing_or_misrouted_event_fails_the_delivery_check() {
        let short = lane(TEN_SOURCES, "bench-app-a", &["s0"], 120, 115);
        let stray = lane("?", "bench-app-x", &[], 0, 5);
        assert!(!delivered_in_full(&short));
        assert!(!delivered_in_full(&stray));
        assert!(delivered_in_full(&lane(
            ONE_SOURCE,
            "bench-app",
            &["default"],
            3,
            4
        )));
        let markdown = render(&routing_results(vec![short, stray]));
        for expected in [
            "| **not met**: 5 missing |",
            "| `bench-app-x` | none | 0 | 0 | 0 | 5 | 1 | **not met**: 5 events at an app id no source has |",
            "under its source's app id: **not met**",
            "delivery to each app id **not met** |",
        ] {
            assert!(
                markdown.contains(expected),
                "{expected:?} missing in:\n{markdown}"
            );
        }
    }

    #[test]
    fn without_routing_figures_the_section_is_a_placeholder() {
        let markdown = report(&[BASELINE, RELAY], None);
        assert!(markdown.contains("## Cost of routing: 1 source against 10 sources"));
        assert!(markdown.contains("*Not measured in this run*"));
        assert!(markdown.contains("| – | not measured (`bash bench/run.sh --sources`) |"));
    }
    #[test]
    fn the_storage_path_targets_state_target_figure_and_verdict() {
        use crate::storage::StoredObject;
        let mut results = routing_results(Vec::new());
        results.routing = None;
        results.runs = vec![
            run(BASELINE, "closed", 32, 10_000.0),
            run(RELAY, "closed", 32, 4_500.0),
            run(RELAY_POSTGRES, "closed", 32, 2_000.0),
        ];
        let sqlite = Storage {
            backend: "sqlite".into(),
            webhooks: 1000,
            records: 2000,
            bytes: 550_000,
            page_size: Some(4096),
            file_bytes: Some(600_000),
            wal_bytes: Some(4 << 20),
            other_files_bytes: 0,
            objects: vec![StoredObject {
                name: "webhooks".into(),
                bytes: 400_000,
            }],
        };
        results.storage_postgres = Some(Storage {
            backend: "postgres".into(),
            bytes: 900_000,
            wal_bytes: None,
            ..sqlite.clone()
        });
        results.storage = Some(sqlite);
        results.big_drain = Some(Drain {
            webhooks: 1_000_000,
            events: 1_100_000,
            ingest_s: 100.0,
            ingest_per_s: 10_000.0,
            drain_s: 111.7,
            events_per_s: 9_850.0,
            track_requests: 1100,
            track_events: 1_100_000,
            user_requests: 0,
            users: 0,
            account_requests: 0,
            track_requests_per_1000: 1.0,
            all_requests_per_1000: 1.0,
            mean_batch: 1000.0,
            full_batches: 1100,
            relay_cpu_s: None,
        });
        let mut draining = run("relay (draining)", "closed", 32, 3_000.0);
        draining.failed = 0;
        results.big_drain_watch = Some(DrainWatch {
            events_per_minute: 600_000,
            rss_mib: vec![40.0, 41.0, 42.0],
            ingest: vec![run("relay (draining)", "open", 2000, 2000.0), draining],
        });
        let markdown = render(&results);
        for expected in [
            "| Ingest on SQLite, durable commits: ≥ 0.4× the baseline's throughput (best relay against best baseline) | best relay 4,500 req/s (at 32) / best baseline 10,000 req/s (at 32) = 0.45× | **met** |",
            "| Relay CPU on SQLite ≤ 40 µs per webhook, at its best concurrency | 111 µs per webhook at 32 in flight",
            "| Ingest on Postgres: ≥ 0.3× the baseline's throughput (best relay against best baseline) | best relay on Postgres 2,000 req/s (at 32) / best baseline 10,000 req/s (at 32) = 0.20× | **not met** |",
            "| Stored bytes per webhook on SQLite ≤ 0.6 KB (600 bytes; the suite's mix, before pruning) | 550 bytes per webhook: 550,000 bytes in use for 1,000 webhooks (2,000 records) after the ingest runs; WAL 4.0 MiB on disk beside it | **met** |",
            "| Stored bytes per webhook on Postgres ≤ 0.6 KB (600 bytes; the suite's mix, before pruning) | 900 bytes per webhook: 900,000 bytes in use for 1,000 webhooks (2,000 records) after the ingest runs | **not met** |",
            "| `webhooks` | 400,000 bytes | 400 |",
            "| A backlog of 1,000,000 webhooks drains at ≥ 98 % of the configured rate | 9,850 events/s of 10,000 configured (98.5 %), 1,100,000 events in 112 s | **met** |",
            "| Ingest while it drains ≥ 0.8× idle ingest (closed loop, 32 in flight) | 3,000 req/s while draining / 4,500 req/s without a backlog (median of the ingest runs) = 0.67× | **not met** |",
            "| p99 ack latency ≤ 10 ms at 2,000 webhooks/s while it drains | p99 2.00 ms (p99.9 3.00 ms), 2,000 /s achieved | **met** |",
            "| Resident set flat while it drains (≤ 4 MiB growth from halfway to the end, within 64 MiB) | range 2.0 MiB over 3 samples; peak – | **met** |",
        ] {
            assert!(
                markdown.contains(expected),
                "{expected:?} missing in:\n{markdown}"
            );
        }
        assert!(!markdown.contains("50%"));
    }

    #[test]
    fn the_routing_ratio_pairs_each_run_with_the_one_beside_it() {
        let mut runs = Vec::new();
        for (number, one, ten) in [(1, 1000.0, 500.0), (2, 2000.0, 1800.0), (3, 3000.0, 2100.0)] {
            for (server, throughput) in [(ONE_SOURCE, one), (TEN_SOURCES, ten)] {
                let mut result = run(server, "closed", 32, throughput);
                result.run = number;
                runs.push(result);
            }
        }
        // Ratios 0.5, 0.9 and 0.7: their median, not the ratio of the medians (1800 / 2000).
        let ratio = routing_throughput_ratio(&runs).unwrap();
        assert!((ratio - 0.7).abs() < 1e-9, "{ratio}");
        runs.retain(|r| r.server == ONE_SOURCE);
        assert_eq!(routing_throughput_ratio(&runs), None);
    }
}
