//! Transforms (contract §10, Transform) against the real binary and a fake Heap: a payload of a
//! shape the decoder does not know, reshaped by a source's jq program, reaches Heap as the
//! native event (name, identity, properties, timestamp); no output is 202 `filtered` and
//! nothing at Heap; two outputs are two events; a non-object output or a runtime error
//! quarantines the webhook as `transform_error` with the error in its detail; a program that
//! never ends (`def f: f; f`, `until(false; .)`, `repeat(.)`) quarantines its webhook within the
//! deadline while another source's posters keep being answered (their p99 is printed); one that
//! overflows the stack or the parser (`def f: 1 + f; f`) quarantines and the relay stays up; a
//! letter quarantined by a buggy program (or for `no_kind`, before there was a program) is
//! repaired by rewriting the file, SIGHUP and a replay; a program that does not compile refuses
//! startup (one line naming `sources.NAME.transform` and the position) and a reload (422, the
//! running program stays); and, as a property, generated programs that compile on generated
//! payloads always get a defined answer from a relay that stays up.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};

use crate::support::{
    BINARY, Client, FakeHeap, RelayProcess, config_toml, eventually, flow_started, write_config,
};

const WAIT: Duration = Duration::from_secs(10);

/// Every source of these tests forwards to this app id.
const APP: &str = "app-transforms";

/// The deadline of one run of a transform (contract §10), and what a test allows on top of it
/// for the answer (a respawned worker, a loaded machine, a debug build).
const DEADLINE_AND_MARGIN: Duration = Duration::from_secs(1);

/// The realistic fix: Userpilot sending `{"event": {"name": "flow_started", "uid", "props",
/// "ts"}}` instead of the shape the decoder knows. The kind and action come from the name
/// (`checklist_task_completed` is kind `checklist`, action `task_completed`), the user from
/// `uid`, the properties from `props`, the time from `ts`.
const RESHAPE: &str = r#"
.event as $e
| ($e.name | split("_")) as $name
| {
    timestamp: $e.ts,
    data: ({type: $name[0], action: ($name[1:] | join("_")), user: {user_id: $e.uid}} + $e.props)
  }
"#;

/// A payload of that unknown shape, at 2024-09-19T10:41:01Z.
fn foreign(name: &str, uid: &str, props: Value) -> Value {
    json!({ "event": { "name": name, "uid": uid, "props": props, "ts": 1_726_742_461 } })
}

fn secret_of(source: &str) -> String {
    format!("{source}-secret-for-transform-tests")
}

/// `[sources.NAME]` tables at [`APP`], each with its secret and, when given, its transform; over
/// the test base (whose top-level keys are the `default` source). Property updates are off, so
/// that one mapped output is one record, one track event.
fn sources_toml(sources: &[(&str, Option<&str>)]) -> String {
    let mut toml = String::from("[heap]\nuser_properties = false\nevents_per_minute = 1000000\n");
    for (name, transform) in sources {
        toml.push_str(&format!(
            "[sources.{name}]\nsecrets = [\"{}\"]\napp_id = \"{APP}\"\n",
            secret_of(name)
        ));
        if let Some(program) = transform {
            // A TOML literal string: the program as written, quotes and backslashes included.
            assert!(!program.contains("'''"), "{program}");
            toml.push_str(&format!("transform = '''\n{program}'''\n"));
        }
    }
    toml
}

/// Writes the `--config` file for `sources` in `dir` (over the test base) and returns its path.
fn write(heap: &FakeHeap, dir: &Path, sources: &[(&str, Option<&str>)]) -> PathBuf {
    let file = dir.join("relay.toml");
    write_config(&file, &config_toml(heap, dir, &sources_toml(sources)));
    file
}

/// The relay binary serving `sources`, configured by a file in `dir`.
fn start(heap: &FakeHeap, dir: &Path, sources: &[(&str, Option<&str>)]) -> RelayProcess {
    RelayProcess::spawn_with_config(&write(heap, dir, sources))
}

/// A client posting to `source`'s route with its secret.
fn to(relay: &Client, source: &str) -> Client {
    relay.source(source, &secret_of(source))
}

/// The dead letters of `source`, oldest first.
async fn letters(relay: &Client, source: &str) -> Vec<Value> {
    let (status, answer) = relay
        .admin(Method::GET, &format!("/admin/dead-letters?source={source}"))
        .await;
    assert_eq!(status, 200, "{answer}");
    let mut letters = answer["dead_letters"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    letters.sort_by_key(|letter| letter["id"].as_i64());
    letters
}

/// Waits until the queue has nothing left to send and `delivered` records were delivered, so
/// that what Heap has not received by then it never will.
async fn wait_until_settled(relay: &Client, delivered: u64) {
    relay
        .wait_for_status(WAIT, |status| {
            let queue = &status["queue"];
            queue["pending"] == 0 && queue["in_flight"] == 0 && queue["delivered"] == delivered
        })
        .await;
}

fn quarantined() -> (u16, Value) {
    (202, json!({"status": "quarantined"}))
}

fn filtered() -> (u16, Value) {
    (202, json!({"status": "filtered"}))
}

fn accepted(events: u64) -> (u16, Value) {
    (202, json!({"status": "accepted", "events": events}))
}

/// The relay has not exited (a crash, an abort).
fn assert_running(relay: &mut RelayProcess, after: &str) {
    let exited = relay.child.try_wait().unwrap();
    assert!(
        exited.is_none(),
        "the relay exited ({exited:?}) after {after}; last lines: {:?}",
        last_lines(relay)
    );
}

fn last_lines(relay: &RelayProcess) -> Vec<String> {
    let logs = relay.logs();
    logs[logs.len().saturating_sub(10)..].to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payload_of_an_unknown_shape_made_right_by_a_transform_reaches_heap_as_the_native_event()
{
    let heap = FakeHeap::start().await;
    let dir = tempfile::tempdir().unwrap();
    let relay = start(
        &heap,
        dir.path(),
        &[("reshaped", Some(RESHAPE)), ("plain", None)],
    );
    let flow = foreign(
        "flow_started",
        "u-foreign-1",
        json!({"flow_id": "fl_9", "flow_name": "Product tour", "step": 3}),
    );
    let task = foreign(
        "checklist_task_completed",
        "u-foreign-2",
        json!({"checklist_id": "ck_2", "task": "Invite a teammate"}),
    );

    // Without the program, the decoder finds no kind in it.
    assert_eq!(to(&relay, "plain").post(&flow).await, quarantined());
    let plain = letters(&relay, "plain").await;
    assert_eq!(plain.len(), 1, "{plain:?}");
    assert_eq!(plain[0]["reason"], "no_kind", "{plain:?}");

    // With it, each is the event Userpilot's known shape would have made.
    assert_eq!(to(&relay, "reshaped").post(&flow).await, accepted(1));
    assert_eq!(to(&relay, "reshaped").post(&task).await, accepted(1));
    let events = heap.wait_for_events_for(APP, 2, WAIT).await;
    let by_identity: BTreeMap<&str, &Value> = events
        .iter()
        .map(|event| (event["identity"].as_str().unwrap(), event))
        .collect();
    let flow = by_identity["u-foreign-1"];
    assert_eq!(flow["event"], "Userpilot Experience (started)", "{flow}");
    assert_eq!(flow["timestamp"], "2024-09-19T10:41:01Z", "{flow}");
    assert_eq!(
        flow["properties"],
        json!({
            "type": "flow", "action": "started", "flow_id": "fl_9",
            "flow_name": "Product tour", "step": 3, "source": "userpilot"
        }),
        "{flow}"
    );
    let task = by_identity["u-foreign-2"];
    assert_eq!(
        task["event"], "Userpilot Checklist (task completed)",
        "{task}"
    );
    assert_eq!(task["timestamp"], "2024-09-19T10:41:01Z", "{task}");
    assert_eq!(task["properties"]["checklist_id"], "ck_2", "{task}");
    assert_eq!(task["properties"]["task"], "Invite a teammate", "{task}");
    assert!(letters(&relay, "reshaped").await.is_empty());
    wait_until_settled(&relay, 2).await;
    assert_eq!(heap.events_for(APP).len(), 2, "{:?}", heap.events_for(APP));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_output_is_filtered_two_outputs_are_two_events_and_a_bad_output_is_quarantined() {
    let heap = FakeHeap::start().await;
    let dir = tempfile::tempdir().unwrap();
    let relay = start(
        &heap,
        dir.path(),
        &[
            ("empty", Some("empty\n")),
            ("sieve", Some("select(.data.type != \"nps\")\n")),
            ("twice", Some(". , (.data.action = \"completed\")\n")),
            ("scalar", Some(".data.type\n")),
            ("boom", Some("error(\"boom: \\(.data.type)\")\n")),
        ],
    );
    let nps = json!({
        "timestamp": chrono::Utc::now().timestamp(),
        "data": { "type": "nps", "score": 9, "user": { "user_id": "sieve-0" } },
    });

    // Filtered: 202, nothing queued.
    assert_eq!(
        to(&relay, "empty").post(&flow_started("empty", 0)).await,
        filtered()
    );
    assert_eq!(to(&relay, "sieve").post(&nps).await, filtered());
    assert_eq!(
        to(&relay, "sieve").post(&flow_started("sieve", 1)).await,
        accepted(1)
    );
    // Two objects out: two events, one webhook.
    assert_eq!(
        to(&relay, "twice").post(&flow_started("twice", 0)).await,
        accepted(2)
    );
    // A string out, and an error: quarantined, with the error kept.
    assert_eq!(
        to(&relay, "scalar").post(&flow_started("scalar", 0)).await,
        quarantined()
    );
    assert_eq!(
        to(&relay, "boom").post(&flow_started("boom", 0)).await,
        quarantined()
    );

    assert_eq!(
        relay
            .metric("relay_webhooks_total", &[("outcome", "filtered")])
            .await,
        2.0
    );
    for source in ["empty", "sieve"] {
        assert_eq!(
            relay
                .metric(
                    "relay_webhooks_total",
                    &[("outcome", "filtered"), ("source", source)]
                )
                .await,
            1.0,
            "{source}"
        );
    }
    for (source, says) in [("scalar", "object"), ("boom", "boom: flow")] {
        let letters = letters(&relay, source).await;
        assert_eq!(letters.len(), 1, "{source}: {letters:?}");
        let letter = &letters[0];
        assert_eq!(letter["reason"], "transform_error", "{letter}");
        assert_eq!(letter["kind"], "webhook", "{letter}");
        let detail = letter["detail"].as_str().unwrap().to_lowercase();
        assert!(detail.contains(says), "{source}: detail {detail:?}");
    }
    for source in ["empty", "sieve", "twice"] {
        assert!(letters(&relay, source).await.is_empty(), "{source}");
    }

    // Heap gets the three events, and nothing of the filtered or quarantined webhooks.
    let events = heap.wait_for_events_for(APP, 3, WAIT).await;
    wait_until_settled(&relay, 3).await;
    let events_now = heap.events_for(APP);
    assert_eq!(events_now.len(), 3, "{events_now:?}");
    let mut seen: Vec<(String, String)> = events
        .iter()
        .map(|e| {
            (
                e["identity"].as_str().unwrap().to_owned(),
                e["event"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        [
            ("sieve-1", "Userpilot Experience (started)"),
            ("twice-0", "Userpilot Experience (completed)"),
            ("twice-0", "Userpilot Experience (started)"),
        ]
        .map(|(identity, name)| (identity.to_owned(), name.to_owned()))
    );
    let twice: Vec<&Value> = events
        .iter()
        .filter(|e| e["identity"] == "twice-0")
        .map(|e| &e["idempotency_key"])
        .collect();
    assert_ne!(
        twice[0], twice[1],
        "the two outputs share an idempotency key"
    );
}

/// Latencies of one poster's webhooks, and any answer that was not `202 accepted`.
type Posted = (Vec<Duration>, Vec<String>);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_transform_that_never_ends_quarantines_its_webhook_within_the_deadline_while_others_are_answered()
 {
    const POSTERS: usize = 4;
    const ROUNDS: usize = 3;
    let heap = FakeHeap::start().await;
    let dir = tempfile::tempdir().unwrap();
    let relay = start(
        &heap,
        dir.path(),
        &[
            ("hang", Some("def f: f; f\n")),
            ("spin", Some("until(false; .)\n")),
            ("flood", Some("repeat(.)\n")),
            ("steady", None),
        ],
    );

    // Source B: posters on a source without a transform, for the whole test.
    let stop = Arc::new(AtomicBool::new(false));
    let mut posters = tokio::task::JoinSet::new();
    for poster in 0..POSTERS {
        let (client, stop) = (to(&relay, "steady"), stop.clone());
        posters.spawn(async move {
            let (mut latencies, mut wrong) = (Vec::new(), Vec::new());
            let name = format!("steady{poster}");
            while !stop.load(Ordering::SeqCst) {
                let body = flow_started(&name, latencies.len());
                let sent = Instant::now();
                let answer = client.try_post(&body).await;
                latencies.push(sent.elapsed());
                match answer {
                    Ok((202, answer)) if answer["status"] == "accepted" => {}
                    other => wrong.push(format!("{other:?}")),
                }
            }
            (latencies, wrong) as Posted
        });
    }
    // Source A: the programs that never end, one webhook at a time, then three at once.
    let mut slowest = Duration::ZERO;
    for round in 0..ROUNDS {
        for source in ["hang", "spin", "flood"] {
            let sent = Instant::now();
            let answer = to(&relay, source).post(&flow_started(source, round)).await;
            let took = sent.elapsed();
            assert_eq!(answer, quarantined(), "{source} round {round}");
            assert!(
                took < DEADLINE_AND_MARGIN,
                "{source} round {round}: answered after {took:?}"
            );
            slowest = slowest.max(took);
        }
    }
    let sent = Instant::now();
    let mut at_once = tokio::task::JoinSet::new();
    for seq in 0..3 {
        let client = to(&relay, "hang");
        at_once.spawn(async move { client.post(&flow_started("hang-at-once", seq)).await });
    }
    for answer in at_once.join_all().await {
        assert_eq!(answer, quarantined(), "three hanging at once");
    }
    let three = sent.elapsed();
    assert!(
        three < DEADLINE_AND_MARGIN,
        "three hanging at once answered after {three:?}"
    );
    stop.store(true, Ordering::SeqCst);

    let mut latencies = Vec::new();
    for (mine, wrong) in posters.join_all().await {
        assert!(wrong.is_empty(), "steady answers: {wrong:?}");
        latencies.extend(mine);
    }
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    let (p50, p99, max) = (at(0.50), at(0.99), latencies[latencies.len() - 1]);
    eprintln!(
        "never-ending transforms: {} quarantined, slowest answer {slowest:?}, three at once \
         {three:?}; meanwhile source steady: {} webhooks from {POSTERS} posters, p50 {p50:?}, \
         p99 {p99:?}, max {max:?}",
        ROUNDS * 3 + 3,
        latencies.len()
    );
    assert!(latencies.len() >= 20, "{} steady webhooks", latencies.len());
    assert!(p99 < Duration::from_secs(1), "steady p99 {p99:?}");

    for source in ["hang", "spin", "flood"] {
        let letters = letters(&relay, source).await;
        let expected = if source == "hang" { ROUNDS + 3 } else { ROUNDS };
        assert_eq!(letters.len(), expected, "{source}: {letters:?}");
        for letter in &letters {
            assert_eq!(letter["reason"], "transform_error", "{letter}");
            assert!(letter["detail"].as_str().is_some_and(|d| !d.is_empty()));
        }
    }
    // Every steady webhook reaches Heap.
    heap.wait_for_events_for(APP, latencies.len(), WAIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transform_that_overflows_the_stack_quarantines_and_the_relay_stays_up() {
    let heap = FakeHeap::start().await;
    let dir = tempfile::tempdir().unwrap();
    let crashing = [
        ("deep", "def f: 1 + f; f\n"),
        ("nest", "def f: [f]; f\n"),
        ("parse", "(\"[\" * 100000 | fromjson) as $deep | .\n"),
    ];
    let mut sources: Vec<(&str, Option<&str>)> =
        crashing.iter().map(|(name, p)| (*name, Some(*p))).collect();
    sources.push(("steady", None));
    let mut relay = start(&heap, dir.path(), &sources);

    for seq in 0..2 {
        for (source, program) in crashing {
            assert_eq!(
                to(&relay, source).post(&flow_started(source, seq)).await,
                quarantined(),
                "{program}"
            );
            assert_running(&mut relay, program);
        }
        // The relay still takes webhooks: 202 accepted, and they reach Heap.
        assert_eq!(
            to(&relay, "steady")
                .post(&flow_started("steady", seq))
                .await,
            accepted(1)
        );
    }
    heap.wait_for_events_for(APP, 2, WAIT).await;
    for (source, _) in crashing {
        let letters = letters(&relay, source).await;
        assert_eq!(letters.len(), 2, "{source}: {letters:?}");
        assert!(
            letters.iter().all(|l| l["reason"] == "transform_error"),
            "{letters:?}"
        );
    }
    let (status, _) = relay.admin(Method::GET, "/admin/status").await;
    assert_eq!(status, 200);
    assert_running(&mut relay, "the crashing programs");
}

async fn reloads(relay: &Client, result: &str) -> f64 {
    relay
        .metric("relay_config_reloads_total", &[("result", result)])
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_letter_quarantined_by_a_buggy_transform_is_repaired_by_reload_and_replay() {
    let heap = FakeHeap::start().await;
    let dir = tempfile::tempdir().unwrap();
    // The first guess at the fix reads a key the payload does not have: its output is null.
    let relay = start(
        &heap,
        dir.path(),
        &[("repair", Some(".payload\n")), ("later", None)],
    );
    let first = foreign("flow_completed", "u-repair-1", json!({"flow_id": "fl_3"}));
    let second = foreign("nps_score", "u-later-1", json!({"score": 10}));
    assert_eq!(to(&relay, "repair").post(&first).await, quarantined());
    assert_eq!(to(&relay, "later").post(&second).await, quarantined());
    let repair = letters(&relay, "repair").await;
    assert_eq!(repair.len(), 1, "{repair:?}");
    assert_eq!(repair[0]["reason"], "transform_error", "{repair:?}");
    let later = letters(&relay, "later").await;
    assert_eq!(later.len(), 1, "{later:?}");
    assert_eq!(later[0]["reason"], "no_kind", "{later:?}");
    assert!(heap.events_for(APP).is_empty());

    // The operator fixes the program (and gives `later` one), and reloads with SIGHUP.
    write(
        &heap,
        dir.path(),
        &[("repair", Some(RESHAPE)), ("later", Some(RESHAPE))],
    );
    relay.reload_signal();
    eventually(WAIT, async || reloads(&relay, "ok").await >= 1.0).await;

    // Replay runs the current program on the stored bodies.
    let (status, answer) = relay
        .admin(
            Method::POST,
            "/admin/dead-letters/replay?reason=transform_error",
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer["replayed"],
        json!({"webhooks": 1, "events": 1, "quarantined": 0}),
        "{answer}"
    );
    let (status, answer) = relay
        .admin(
            Method::POST,
            "/admin/dead-letters/replay?reason=no_kind&source=later",
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer["replayed"],
        json!({"webhooks": 1, "events": 1, "quarantined": 0}),
        "{answer}"
    );

    let events = heap.wait_for_events_for(APP, 2, WAIT).await;
    let names: BTreeMap<&str, &str> = events
        .iter()
        .map(|e| {
            (
                e["identity"].as_str().unwrap(),
                e["event"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        names,
        BTreeMap::from([
            ("u-later-1", "Userpilot NPS (score)"),
            ("u-repair-1", "Userpilot Experience (completed)"),
        ])
    );
    assert_eq!(events[0]["timestamp"], "2024-09-19T10:41:01Z");
    assert!(letters(&relay, "repair").await.is_empty());
    assert!(letters(&relay, "later").await.is_empty());
    wait_until_settled(&relay, 2).await;
    assert_eq!(heap.events_for(APP).len(), 2);
}

/// Runs the binary with `args` until it exits (at most 20 s: one that starts serving instead is
/// killed and fails the test); its output.
async fn run_to_exit(args: Vec<String>) -> std::process::Output {
    tokio::task::spawn_blocking(move || {
        let mut child = Command::new(BINARY)
            .args(&args)
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let output = child.wait_with_output().unwrap();
                panic!(
                    "{args:?} did not exit within 20 s; stderr: {}",
                    String::from_utf8_lossy(&output.stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(20)); // polling a child process
        }
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transform_that_does_not_compile_refuses_startup_with_one_line_naming_the_key_and_position()
 {
    let heap = FakeHeap::start().await;
    // An undefined filter on line 2, and a syntax error on line 1.
    for (source, program, line) in [
        ("undefined", ".data\n| no_such_filter(1)\n", "line 2"),
        ("syntax", ".data | {a: }\n", "line 1"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let file = write(
            &heap,
            dir.path(),
            &[("fine", Some(".\n")), (source, Some(program))],
        );
        let config = file.display().to_string();
        let key = format!("sources.{source}.transform");
        let output = run_to_exit(vec!["--config".into(), config.clone()]).await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{program:?} started: {stderr}");
        assert_eq!(
            stderr.trim_end().lines().count(),
            1,
            "not one line: {stderr}"
        );
        assert!(stderr.contains(&key), "does not name {key}: {stderr}");
        assert!(
            stderr.contains(line) && stderr.contains("column"),
            "no {line} and column: {stderr}"
        );
        assert!(
            !dir.path().join("queue.sqlite3").exists(),
            "a refused start opened the queue"
        );
        // check-config says the same.
        let checked = run_to_exit(vec!["--config".into(), config, "check-config".into()]).await;
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&checked.stdout),
            String::from_utf8_lossy(&checked.stderr)
        );
        assert!(
            !checked.status.success(),
            "check-config accepted it: {said}"
        );
        assert!(said.contains(&key), "check-config: {said}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_with_a_transform_that_does_not_compile_is_refused_and_the_running_one_stays() {
    let heap = FakeHeap::start().await;
    let dir = tempfile::tempdir().unwrap();
    let tagging = "{timestamp: .timestamp, data: (.data + {via: \"transform\"})}\n";
    let relay = start(&heap, dir.path(), &[("tagged", Some(tagging))]);
    assert_eq!(
        to(&relay, "tagged").post(&flow_started("tagged", 0)).await,
        accepted(1)
    );

    write(&heap, dir.path(), &[("tagged", Some(".data | nope\n"))]);
    let (status, answer) = relay.admin(Method::POST, "/admin/reload").await;
    assert_eq!(status, 422, "{answer}");
    assert!(
        answer.to_string().contains("sources.tagged.transform"),
        "{answer}"
    );
    assert_eq!(reloads(&relay, "error").await, 1.0);
    // The program that ran before still runs.
    assert_eq!(
        to(&relay, "tagged").post(&flow_started("tagged", 1)).await,
        accepted(1)
    );
    let events = heap.wait_for_events_for(APP, 2, WAIT).await;
    for event in &events {
        assert_eq!(event["properties"]["via"], "transform", "{event}");
    }
}

/// A small deterministic generator (xorshift64*): the property test needs no more, and its seed
/// is printed so that a failure can be run again (`RELAY_TEST_TRANSFORM_SEED`).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a>(&mut self, choices: &[&'a str]) -> &'a str {
        choices[self.below(choices.len())]
    }

    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
}

/// A jq program from a grammar of the constructs transforms use and abuse: paths, iteration,
/// object and array construction, arithmetic and comparison, conditionals, `try`, `reduce`,
/// `range`, `limit`, `error`, `paths`, `getpath`/`setpath`/`del`, assignment, string functions,
/// and recursion (bounded and not). Not every one compiles (unknown arity, jq 1.7 names jaq
/// lacks): the test keeps those that do.
fn program(rng: &mut Rng, depth: usize) -> String {
    const LEAVES: &[&str] = &[
        ".",
        ".data",
        ".data.user",
        ".data.user.user_id",
        ".timestamp",
        ".a",
        ".[]",
        ".[0]",
        ".[-1]",
        ".[1:3]",
        "..",
        "null",
        "true",
        "false",
        "0",
        "-1",
        "1e308",
        "3.5",
        "\"\"",
        "\"x\"",
        "\"é😀\"",
        "[]",
        "{}",
        "empty",
        "error",
        "error(\"boom\")",
        "error(null)",
        "error({})",
        "keys",
        "length",
        "paths",
        "[paths]",
        "[paths(type == \"string\")]",
        "[leaf_paths]",
        "to_entries",
        "tojson",
        "fromjson",
        "tostring",
        "tonumber",
        "ascii_downcase",
        "explode",
        "implode",
        "add",
        "any",
        "all",
        "flatten",
        "sort",
        "unique",
        "min",
        "max",
        "reverse",
        "recurse",
        "env",
        "$ENV",
        "input",
        "now",
        "todate",
        "fromdate",
        "@base64",
        "@base64d",
        "@uri",
        "@json",
        "@text",
        "@csv",
        "@html",
        "range(5)",
        "range(0; 10; 3)",
        "range(0; 10; 0)",
        "range(1e9)",
        "[range(1e7)]",
        "repeat(.)",
        "limit(3; repeat(.))",
        "first(range(10))",
        "last(range(10))",
        "getpath([\"data\", \"user\"])",
        "setpath([\"data\", \"x\"]; 1)",
        "setpath([\"a\", \"b\"]; 1)",
        "del(.data)",
        "del(.[0])",
        "to_entries | from_entries",
        "with_entries(.value |= tostring)",
        "split(\",\")",
        "join(\",\")",
        "ltrimstr(\"x\")",
        "test(\"a+\")",
        "test(\"(\")",
        "capture(\"(?<k>[a-z]+)\")",
        "sub(\"a\"; \"b\")",
        "gsub(\"\"; \"-\")",
        "splits(\", *\")",
        "ascii",
        "infinite",
        "nan",
        "-infinite | floor",
        "halt",
        "halt_error",
        "input_line_number",
        "$__loc__",
        "debug",
        "stderr",
        "splits(\"a\")",
        "significand",
        "getpath([1, \"a\"])",
        "\"[\" * 1000 | fromjson",
        "\"x\" * 100000 | length",
        "def f: f; f",
        "def f: 1 + f; f",
        "def f($n): if $n <= 0 then . else f($n - 1) end; f(50)",
        "def f($n): if $n <= 0 then 0 else 1 + f($n - 1) end; f(3000)",
        "label $out | (1, 2) | ., break $out",
        "until(. == 3; 1)",
        "reduce range(100000) as $i (null; [.])",
        "[limit(100000; repeat(1))] | length",
        "{(\"a\", \"b\"): (1, 2)}",
        "{(1): 2}",
        "{(.data.type // \"k\"): .}",
        "tostream",
        "input_filename",
        "@sh",
        "ltrimstr(1)",
        "indices(\", \")",
        "utf8bytelength",
        "splits(null)",
    ];
    // Programs that keep the payload, so that outputs reach the decoder often enough.
    const KEEPING: &[&str] = &[
        ".",
        "{timestamp: .timestamp, data: .data}",
        ". + {extra: 1}",
        "select(.data)",
        ".data.user.user_id |= tostring",
        "del(.timestamp)",
    ];
    if depth == 0 || rng.chance(30) {
        if rng.chance(40) {
            return rng.pick(KEEPING).to_owned();
        }
        return rng.pick(LEAVES).to_owned();
    }
    // Each part in parentheses, so that a `def`, a pipe or a comma inside one stays inside it:
    // the program compiles unless a name or an arity is unknown.
    let mut sub = || format!("({})", program(rng, depth - 1));
    let (a, b, c) = (sub(), sub(), sub());
    match rng.below(22) {
        0 => format!("{a} | {b}"),
        1 => format!("{a}, {b}"),
        2 => format!("{a} + {b}"),
        3 => format!("{a} - {b}"),
        4 => format!("{a} * {b}"),
        5 => format!("{a} / {b}"),
        6 => format!("{a} % {b}"),
        7 => format!("{a} == {b}"),
        8 => format!("{a} < {b} and {c}"),
        9 => format!("if {a} then {b} else {c} end"),
        10 => format!("try {a} catch {b}"),
        11 => format!("{a} // {b}"),
        12 => format!("[{a}]"),
        13 => format!("{{user: {a}, data: {b}, \"k\": {c}}}"),
        14 => format!("reduce {a} as $x ({b}; {c})"),
        15 => format!("select({a})"),
        16 => format!("map({a})"),
        17 => format!(".data |= {a}"),
        18 => format!(".a.b = {a}"),
        19 => format!("def g: {a}; g | {b}"),
        20 => format!("{a} as $v | {b} | $v"),
        _ => format!("limit({}; {a})", rng.below(5)),
    }
}

/// A payload: a sample of a known kind (sometimes damaged), or any JSON at all.
fn payload(rng: &mut Rng, seq: usize) -> Value {
    let now = chrono::Utc::now().timestamp();
    let samples = userpilot_heap_relay::samples::all(&format!("p-{seq}"), now, &seq.to_string());
    let mut body = if rng.chance(60) {
        samples[rng.below(samples.len())].1.clone()
    } else if rng.chance(90) {
        // Any object: the relay answers 400 to a body that is not one, before any program.
        let mut map = serde_json::Map::new();
        map.insert("data".into(), json_value(rng, 4));
        map.insert("seq".into(), json!(seq));
        if rng.chance(50) {
            map.insert("timestamp".into(), json_value(rng, 1));
        }
        Value::Object(map)
    } else {
        json_value(rng, 4)
    };
    if rng.chance(30)
        && let Value::Object(map) = &mut body
    {
        // Damage: a field replaced by any value.
        let key = rng.pick(&["data", "timestamp", "event", "user_id", "a"]);
        map.insert(key.to_owned(), json_value(rng, 3));
    }
    body
}

fn json_value(rng: &mut Rng, depth: usize) -> Value {
    match rng.below(if depth == 0 { 6 } else { 8 }) {
        0 => Value::Null,
        1 => json!(rng.chance(50)),
        2 => json!(
            [
                0.0,
                -0.0,
                1e308,
                -1e-308,
                9_007_199_254_740_993_u64 as f64,
                42.0
            ][rng.below(6)]
        ),
        3 => json!([i64::MAX, i64::MIN, 0, 1, -1][rng.below(5)]),
        4 => json!(rng.pick(&["", "x", "é😀", "flow", "started", "\u{0}", "a,b", "[[["])),
        5 => json!(u64::MAX),
        6 => Value::Array(
            (0..rng.below(4))
                .map(|_| json_value(rng, depth - 1))
                .collect(),
        ),
        _ => {
            let mut map = serde_json::Map::new();
            for _ in 0..rng.below(5) {
                let key = rng.pick(&["data", "type", "action", "user", "user_id", "a", ""]);
                map.insert(key.to_owned(), json_value(rng, depth - 1));
            }
            Value::Object(map)
        }
    }
}

/// Sets the transforms of the sources `p0..` to `programs` (None: no transform) by a reload.
/// A program that does not compile makes the reload fail naming its key: it is taken out and
/// the reload tried again. Returns how many were taken out.
async fn reload_programs(
    relay: &RelayProcess,
    heap: &FakeHeap,
    dir: &Path,
    programs: &mut [Option<String>],
) -> usize {
    let mut refused = 0;
    loop {
        let names: Vec<String> = (0..programs.len()).map(|i| format!("p{i}")).collect();
        let sources: Vec<(&str, Option<&str>)> = names
            .iter()
            .zip(programs.iter())
            .map(|(name, program)| (name.as_str(), program.as_deref()))
            .collect();
        write(heap, dir, &sources);
        let (status, answer) = relay.admin(Method::POST, "/admin/reload").await;
        if status == 200 {
            return refused;
        }
        assert_eq!(status, 422, "{answer}");
        let text = answer.to_string();
        let named: Vec<usize> = (0..programs.len())
            .filter(|i| text.contains(&format!("sources.p{i}.transform")))
            .collect();
        assert!(
            !named.is_empty(),
            "a reload refused for no program's sake: {answer}"
        );
        for i in named {
            programs[i] = None;
            refused += 1;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn any_compiling_jq_program_on_any_payload_gets_a_defined_answer_and_never_stops_the_relay() {
    const SOURCES: usize = 24;
    const BATCHES: usize = 6;
    const PAYLOADS: usize = 5;
    const POSTERS: usize = 6;
    let seed = std::env::var("RELAY_TEST_TRANSFORM_SEED")
        .ok()
        .and_then(|seed| seed.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("transform property test: RELAY_TEST_TRANSFORM_SEED={seed}");
    let mut rng = Rng(seed);
    let started = Instant::now();
    let heap = FakeHeap::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut programs: Vec<Option<String>> = vec![None; SOURCES];
    let names: Vec<String> = (0..SOURCES).map(|i| format!("p{i}")).collect();
    let none: Vec<(&str, Option<&str>)> = names.iter().map(|n| (n.as_str(), None)).collect();
    let mut relay = start(&heap, dir.path(), &none);

    let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
    let mut undefined: Vec<String> = Vec::new();
    let (mut compiled, mut refused, mut seq) = (0, 0, 0);
    for batch in 0..BATCHES {
        for program in programs.iter_mut() {
            *program = Some(format!("{}\n", self::program(&mut rng, 3)));
        }
        refused += reload_programs(&relay, &heap, dir.path(), &mut programs).await;
        compiled += programs.iter().filter(|p| p.is_some()).count();

        let mut posts: Vec<(usize, Value)> = Vec::new();
        for source in 0..SOURCES {
            for _ in 0..PAYLOADS {
                posts.push((source, payload(&mut rng, seq)));
                seq += 1;
            }
        }
        let posts = Arc::new(posts);
        let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut posters = tokio::task::JoinSet::new();
        for _ in 0..POSTERS {
            let (posts, next, relay) = (posts.clone(), next.clone(), relay.client.clone());
            posters.spawn(async move {
                let mut seen = Vec::new();
                while let Some((source, body)) = posts.get(next.fetch_add(1, Ordering::SeqCst)) {
                    let client = to(&relay, &format!("p{source}"));
                    let answer = client.try_post(body).await.map_err(|e| e.to_string());
                    seen.push((*source, body.clone(), answer));
                }
                seen
            });
        }
        for (source, body, answer) in posters.join_all().await.into_iter().flatten() {
            let outcome = match &answer {
                Ok((202, answer)) => match answer["status"].as_str() {
                    Some(status @ ("accepted" | "duplicate" | "quarantined" | "filtered")) => {
                        Some(format!("202 {status}"))
                    }
                    _ => None,
                },
                Ok((400, answer)) if answer["error"] == "invalid_json" => {
                    Some("400 invalid_json".into())
                }
                Ok((503, answer)) if answer["error"] == "unavailable" => {
                    Some("503 unavailable".into())
                }
                _ => None,
            };
            match outcome {
                Some(outcome) => *outcomes.entry(outcome).or_default() += 1,
                None => undefined.push(format!(
                    "batch {batch}: program {:?} on {body} answered {answer:?}",
                    programs[source]
                )),
            }
        }
        assert!(
            undefined.is_empty(),
            "seed {seed}: {} answers outside the contract, e.g.:\n{}",
            undefined.len(),
            undefined[..undefined.len().min(5)].join("\n")
        );
        assert_running(&mut relay, &format!("batch {batch} (seed {seed})"));
    }

    // Still up and serving: a webhook of the default source reaches Heap.
    let (status, answer) = relay.post(&flow_started("after", 0)).await;
    assert_eq!(
        (status, &answer["status"]),
        (202, &json!("accepted")),
        "{answer}"
    );
    heap.wait_for_events_for(crate::support::APP_ID, 1, WAIT)
        .await;
    let panicked: Vec<String> = relay
        .logs()
        .into_iter()
        .filter(|line| line.contains("panicked"))
        .collect();
    assert!(panicked.is_empty(), "seed {seed}: {panicked:?}");
    assert!(compiled > 0, "seed {seed}: no generated program compiled");
    eprintln!(
        "transform property test: {} programs generated, {compiled} compiled ({refused} \
         refused at reload), {seq} webhooks in {:?}: {outcomes:?}",
        SOURCES * BATCHES,
        started.elapsed()
    );
}
