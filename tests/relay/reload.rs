//! Live reload (contract §10, Reload): SIGHUP and `POST /admin/reload` re-read the `--config`
//! file. Against the real binary: under load from concurrent posters, a reload that adds a
//! secret to a source and removes another fails no request and answers no 5xx; afterwards the
//! new secret is accepted and the removed one refused; an invalid file is refused with the
//! running configuration still serving; `relay_config_reloads_total{result}` counts both; the
//! admin route answers 200 with what was applied and what needs a restart (ignored), or 422
//! with the problems; and a reload that adds a source with a new app id starts its lane.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};

use crate::support::{
    APP_ID, Client, FakeHeap, RelayProcess, config_toml, eventually, flow_started, merge_toml,
    write_config,
};

const WAIT: Duration = Duration::from_secs(10);

const PRODUCTION: &str = "production";
const PRODUCTION_APP: &str = "app-production";
/// Production's secrets before the rotation: the one being retired and the one kept.
const RETIRED: &str = "production-retired-secret";
const KEPT: &str = "production-kept-secret";
/// The secret the rotation adds.
const ADDED: &str = "production-added-secret";
const STAGING: &str = "staging";
const STAGING_APP: &str = "app-staging";
const STAGING_SECRET: &str = "staging-secret-unchanged";

/// The two sources, production with `production_secrets`, over the test base (whose top-level
/// keys are the `default` source). One webhook is one record; the app budget is out of reach.
fn sources(production_secrets: &[&str]) -> String {
    format!(
        r#"
[heap]
user_properties = false
events_per_minute = 1000000
[sources.{PRODUCTION}]
secrets = {}
app_id = "{PRODUCTION_APP}"
[sources.{STAGING}]
secrets = ["{STAGING_SECRET}"]
app_id = "{STAGING_APP}"
"#,
        json!(production_secrets)
    )
}

/// Writes `extra` over the test base as the `--config` file in `dir`, and returns its path.
fn write(heap: &FakeHeap, dir: &Path, extra: &str) -> std::path::PathBuf {
    let file = dir.join("relay.toml");
    write_config(&file, &config_toml(heap, dir, extra));
    file
}

async fn reloads(relay: &RelayProcess, result: &str) -> f64 {
    relay
        .metric("relay_config_reloads_total", &[("result", result)])
        .await
}

/// Waits until `relay_config_reloads_total{result}` reached `count`.
async fn wait_for_reloads(relay: &RelayProcess, result: &str, count: f64) {
    eventually(WAIT, async || {
        let seen = reloads(relay, result).await;
        if seen >= count {
            Ok(())
        } else {
            Err(format!(
                "relay_config_reloads_total{{result=\"{result}\"}} {seen}"
            ))
        }
    })
    .await;
}

/// The relay's JSON log lines with `message`.
fn logged(relay: &RelayProcess, message: &str) -> Vec<Value> {
    relay
        .logs()
        .iter()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|line| line["message"] == message)
        .collect()
}

/// Posts a fresh webhook to `client`'s source, signed with its secret; the status.
async fn probe(client: &Client, name: &str, seq: usize) -> u16 {
    client.post(&flow_started(name, seq)).await.0
}

/// What each poster saw: its source, and every answer's status (or why there was none).
type Outcomes = (&'static str, Vec<Result<u16, String>>);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sighup_under_load_rotates_a_secret_without_failing_a_request() {
    const POSTERS: usize = 8;
    const LOAD: Duration = Duration::from_secs(3);
    let heap = FakeHeap::start().await;
    let dir = tempfile::tempdir().unwrap();
    let file = write(&heap, dir.path(), &sources(&[RETIRED, KEPT]));
    let relay = RelayProcess::spawn_with_config(&file);
    let retired = relay.source(PRODUCTION, RETIRED);
    let added = relay.source(PRODUCTION, ADDED);
    assert_eq!(probe(&retired, "before", 0).await, 202);
    assert_eq!(probe(&added, "before", 1).await, 401);

    // The load: half the posters on production with the secret that stays, half on staging,
    // until the test has done both reloads and at least LOAD has passed.
    let started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicUsize::new(0));
    let mut posters = tokio::task::JoinSet::new();
    for poster in 0..POSTERS {
        let (source, client) = if poster % 2 == 0 {
            (PRODUCTION, relay.source(PRODUCTION, KEPT))
        } else {
            (STAGING, relay.source(STAGING, STAGING_SECRET))
        };
        let (stop, answered) = (stop.clone(), answered.clone());
        posters.spawn(async move {
            let mut outcomes = Vec::new();
            let name = format!("load-{poster}");
            while !stop.load(Ordering::SeqCst) {
                let body = flow_started(&name, outcomes.len());
                let outcome = client.try_post(&body).await;
                outcomes.push(outcome.map(|(status, _)| status).map_err(|e| e.to_string()));
                answered.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(5)).await; // spacing the load
            }
            (source, outcomes) as Outcomes
        });
    }
    eventually(WAIT, async || answered.load(Ordering::SeqCst) >= 50).await;

    // The rotation: production gets ADDED and loses RETIRED, in the middle of the load.
    write(&heap, dir.path(), &sources(&[KEPT, ADDED]));
    let before_reload = answered.load(Ordering::SeqCst);
    relay.reload_signal();
    wait_for_reloads(&relay, "ok", 1.0).await;
    assert_eq!(probe(&added, "rotated", 0).await, 202, "the added secret");
    assert_eq!(
        probe(&retired, "rotated", 1).await,
        401,
        "the removed secret"
    );

    // An invalid file: refused, and the configuration that runs stays.
    write_config(&file, "[sources.production\nsecrets = ");
    relay.reload_signal();
    wait_for_reloads(&relay, "error", 1.0).await;
    assert_eq!(reloads(&relay, "error").await, 1.0);
    assert_eq!(reloads(&relay, "ok").await, 1.0);
    assert_eq!(probe(&added, "kept", 0).await, 202, "the added secret");
    assert_eq!(probe(&retired, "kept", 1).await, 401, "the removed secret");

    eventually(WAIT, async || {
        started.elapsed() >= LOAD && answered.load(Ordering::SeqCst) > before_reload + 50
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    let outcomes = posters.join_all().await;

    let mut accepted = [(PRODUCTION, 0), (STAGING, 0)];
    for (source, answers) in &outcomes {
        for (seq, answer) in answers.iter().enumerate() {
            assert_eq!(
                answer,
                &Ok(202),
                "{source} webhook {seq} during the reloads: every one must be accepted"
            );
        }
        let slot = accepted.iter_mut().find(|(s, _)| s == source).unwrap();
        slot.1 += answers.len();
    }
    eprintln!(
        "reload under load: {} webhooks from {POSTERS} posters over {:?} ({} before the SIGHUP), \
         all 202; accepted by source: {accepted:?}",
        answered.load(Ordering::SeqCst),
        started.elapsed(),
        before_reload,
    );

    // Nothing accepted was lost: every load webhook and the accepted probes reach their app id.
    let [(_, production), (_, staging)] = accepted;
    let probes = 3; // "before" with RETIRED, "rotated" and "kept" with ADDED
    heap.wait_for_events_for(PRODUCTION_APP, production + probes, WAIT)
        .await;
    heap.wait_for_events_for(STAGING_APP, staging, WAIT).await;
    assert_eq!(heap.events_for(PRODUCTION_APP).len(), production + probes);
    assert_eq!(heap.events_for(STAGING_APP).len(), staging);

    eventually(WAIT, async || {
        logged(&relay, "configuration reload refused").len() == 1
    })
    .await;
    let reloaded = logged(&relay, "configuration reloaded");
    assert_eq!(reloaded.len(), 1, "{reloaded:?}");
    assert!(
        reloaded[0]
            .to_string()
            .contains("sources.production.secrets"),
        "the applied keys: {}",
        reloaded[0]
    );
    for line in relay.logs() {
        for secret in [RETIRED, KEPT, ADDED, STAGING_SECRET] {
            assert!(!line.contains(secret), "a secret in the logs: {line}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_admin_reload_answers_what_changed_or_422_with_the_problems() {
    let heap = FakeHeap::start().await;
    let dir = tempfile::tempdir().unwrap();
    let file = write(&heap, dir.path(), &sources(&[RETIRED, KEPT]));
    let relay = RelayProcess::spawn_with_config(&file);
    let (retired, added) = (
        relay.source(PRODUCTION, RETIRED),
        relay.source(PRODUCTION, ADDED),
    );

    // Only with the admin token.
    let anonymous = relay
        .http
        .post(format!("{}/admin/reload", relay.admin_url))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);

    // A secret rotated (live) and the listener moved (needs a restart: reported, not done).
    let rotated = merge_toml(
        &config_toml(&heap, dir.path(), &sources(&[KEPT, ADDED])),
        "[server]\nlisten = \"127.0.0.1:1\"\n",
    );
    write_config(&file, &rotated);
    let (status, answer) = relay.admin(Method::POST, "/admin/reload").await;
    assert_eq!(
        (status, answer),
        (
            200,
            json!({
                "status": "reloaded",
                "applied": ["sources.production.secrets"],
                "ignored": ["server.listen"],
            })
        )
    );
    // The same listener still serves, with the new secrets.
    assert_eq!(probe(&added, "applied", 0).await, 202);
    assert_eq!(probe(&retired, "applied", 1).await, 401);
    assert_eq!(reloads(&relay, "ok").await, 1.0);

    // A source without its app id: 422 naming the key; nothing of it is applied.
    let invalid = merge_toml(
        &rotated,
        "[sources.qa]\nsecrets = [\"qa-secret-never-applied\"]\n",
    );
    write_config(&file, &invalid);
    let (status, answer) = relay.admin(Method::POST, "/admin/reload").await;
    assert_eq!(status, 422, "{answer}");
    assert_eq!(answer["error"], "invalid_configuration", "{answer}");
    let problems = answer["problems"].as_array().unwrap();
    assert!(
        problems
            .iter()
            .any(|p| p.to_string().contains("sources.qa.app_id")),
        "{answer}"
    );
    // A reload refused through the admin route counts like one from SIGHUP (the contract's
    // counter is of reloads, whatever asked for them).
    assert_eq!(reloads(&relay, "error").await, 1.0);
    assert_eq!(reloads(&relay, "ok").await, 1.0);
    assert_eq!(probe(&added, "kept", 0).await, 202);
    assert_eq!(probe(&retired, "kept", 1).await, 401);
    let qa = relay.source("qa", "qa-secret-never-applied");
    assert_eq!(
        qa.post(&flow_started("qa", 0)).await,
        (404, json!({"error": "unknown_source"}))
    );
    eventually(WAIT, async || {
        logged(&relay, "configuration reload refused").len() == 1
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_adding_a_source_with_a_new_app_id_starts_delivering_to_it() {
    const QA_SECRET: &str = "qa-secret-added-live";
    const QA_APP: &str = "app-qa";
    let heap = FakeHeap::start().await;
    let dir = tempfile::tempdir().unwrap();
    let only_default = "[heap]\nuser_properties = false\n";
    let file = write(&heap, dir.path(), only_default);
    let relay = RelayProcess::spawn_with_config(&file);
    let qa = relay.source("qa", QA_SECRET);
    assert_eq!(
        qa.post(&flow_started("qa", 0)).await,
        (404, json!({"error": "unknown_source"}))
    );

    write(
        &heap,
        dir.path(),
        &format!(
            "{only_default}[sources.qa]\nsecrets = [\"{QA_SECRET}\"]\napp_id = \"{QA_APP}\"\n"
        ),
    );
    relay.reload_signal();
    wait_for_reloads(&relay, "ok", 1.0).await;
    let (status, answer) = qa.post(&flow_started("qa", 1)).await;
    assert_eq!(
        (status, &answer["status"]),
        (202, &json!("accepted")),
        "{answer}"
    );
    let events = heap.wait_for_events_for(QA_APP, 1, WAIT).await;
    assert_eq!(events[0]["identity"], "qa-1");
    // The source that was there goes on as before.
    let (status, _) = relay.post(&flow_started("default", 2)).await;
    assert_eq!(status, 202);
    let events = heap.wait_for_events_for(APP_ID, 1, WAIT).await;
    assert_eq!(events[0]["identity"], "default-2");
    assert_eq!(heap.events_for(QA_APP).len(), 1);

    let status = relay
        .wait_for_status(WAIT, |s| s["lanes"][QA_APP]["queue"]["delivered"] == 1)
        .await;
    assert_eq!(status["sources"]["qa"]["app_id"], QA_APP, "{status}");
    assert_eq!(status["lanes"][QA_APP]["forwarder"], "running", "{status}");
    let reloaded = logged(&relay, "configuration reloaded");
    assert_eq!(reloaded.len(), 1, "{reloaded:?}");
    assert!(
        reloaded[0].to_string().contains("sources.qa"),
        "{}",
        reloaded[0]
    );
}
