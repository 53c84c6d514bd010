//! Dead letters an operator can read and act on safely (contract §4.3, §6): `dlq show` and
//! `GET /admin/dead-letters/{id}` give the same full view (the webhook body, the Heap record,
//! Heap's answer, attempts, times) beside a running relay; `--dry-run` counts and changes
//! nothing; an unknown reason is an error naming the known ones; and a replay larger than one
//! page re-maps every webhook once, in pages, reporting progress after each.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use userpilot_heap_relay::dead_letters::{self, REPLAY_PAGE, Reason};
use userpilot_heap_relay::heap::mapping::{Mapper, MappingSettings};
use userpilot_heap_relay::queue::sqlite::SqliteQueue;
use userpilot_heap_relay::queue::{DeadLetterFilter, Queue};

use crate::support::records;
use crate::support::{Answer, FakeHeap, RelayProcess, eventually, run_cli};

fn poisoned_webhook() -> Value {
    json!({
        "timestamp": chrono::Utc::now().timestamp(),
        "data": {
            "type": "feature_tag",
            "action": "click",
            "feature_id": "ft_9",
            "user": { "user_id": "view-1", "email": "view-1@example.com" },
        },
    })
}

fn stdout_json(output: &std::process::Output) -> Value {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_is_shown_in_full_by_dlq_show_and_the_admin_api_beside_the_relay() {
    let heap = FakeHeap::start().await;
    // Heap fails the event once (503: retried), then refuses it (400: dead-lettered).
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    // Only track requests count: the user properties may reach Heap first.
    heap.respond_with(move |path, _| match path {
        "/api/track" if seen.fetch_add(1, Ordering::SeqCst) == 0 => Answer::status(503),
        "/api/track" => Answer::status(400),
        _ => Answer::OK,
    });
    let dir = tempfile::tempdir().unwrap();
    let env = RelayProcess::env(&heap, dir.path());
    let relay = RelayProcess::spawn(&env);
    let body = poisoned_webhook();
    assert_eq!(relay.post(&body).await.0, 202);

    let id = eventually(Duration::from_secs(10), async || {
        let (_, listing) = relay.admin(Method::GET, "/admin/dead-letters").await;
        listing["dead_letters"][0]["id"]
            .as_i64()
            .ok_or(format!("no dead letter yet: {listing}"))
    })
    .await;
    let (status, view) = relay
        .admin(Method::GET, &format!("/admin/dead-letters/{id}"))
        .await;
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["id"], id);
    assert_eq!(view["reason"], "rejected");
    assert_eq!(view["kind"], "track");
    assert_eq!(view["attempts"], 2);
    assert!(
        view["detail"]
            .as_str()
            .unwrap()
            .starts_with("heap answered 400"),
        "{view}"
    );
    assert!(
        view["last_error"].as_str().unwrap().contains("503"),
        "{view}"
    );
    // The original body, and the Heap event it was mapped to.
    assert_eq!(view["webhook"], body);
    assert_eq!(view["record"]["identity"], "view-1");
    assert!(view["record"]["idempotency_key"].is_string(), "{view}");
    let received = view["received_at"].as_str().unwrap();
    assert!(
        chrono::DateTime::parse_from_rfc3339(received).is_ok(),
        "{received}"
    );
    assert!(view["dead_at_ms"].as_i64() >= view["received_at_ms"].as_i64());

    // `dlq show`, beside the running relay, prints the same.
    let shown = stdout_json(&run_cli(&env, &["dlq", "show", &id.to_string()]));
    assert_eq!(shown, view);

    // Unknown ids: 404 on the API, exit 1 with one line on the command.
    let (status, answer) = relay
        .admin(Method::GET, &format!("/admin/dead-letters/{}", id + 1000))
        .await;
    assert_eq!((status, answer), (404, json!({"error": "not_found"})));
    let missing = run_cli(&env, &["dlq", "show", &(id + 1000).to_string()]);
    assert!(!missing.status.success());
    assert_eq!(
        String::from_utf8_lossy(&missing.stderr),
        format!("error: no dead letter with id {}\n", id + 1000)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_runs_count_and_change_nothing_and_an_unknown_reason_lists_the_known_ones() {
    let heap = FakeHeap::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut env = RelayProcess::env(&heap, dir.path());
    crate::support::set_env(&mut env, "RELAY_HEAP__IDENTITY", "email");
    let relay = RelayProcess::spawn(&env);
    for n in 0..3 {
        let orphan = json!({
            "timestamp": chrono::Utc::now().timestamp(),
            "data": { "type": "nps", "score": n, "user": { "user_id": format!("dry-{n}") } },
        });
        assert_eq!(
            relay.post(&orphan).await,
            (202, json!({"status": "quarantined"}))
        );
    }

    let replay = run_cli(
        &env,
        &["dlq", "replay", "--reason", "no_identity", "--dry-run"],
    );
    assert_eq!(
        stdout_json(&replay),
        json!({"dry_run": true, "would_replay": {"dead_letters": 3, "webhooks": 3}})
    );
    let purge = run_cli(
        &env,
        &["dlq", "purge", "--all", "--limit", "2", "--dry-run"],
    );
    assert_eq!(
        stdout_json(&purge),
        json!({"dry_run": true, "would_purge": 2})
    );
    // Still there, all three.
    let (_, listing) = relay.admin(Method::GET, "/admin/dead-letters").await;
    assert_eq!(listing["dead_letters"].as_array().unwrap().len(), 3);
    // A dry run still needs a scope.
    assert!(
        !run_cli(&env, &["dlq", "purge", "--dry-run"])
            .status
            .success()
    );

    // The README once said `no_identity` where `no_user_id` was stored: a name that matches no
    // reason is an error listing them, not an empty result.
    let known =
        "no_user_id, no_identity, identity_too_long, no_kind, transform_error, rejected, expired";
    let unknown = run_cli(&env, &["dlq", "list", "--reason", "no_identiy"]);
    assert!(!unknown.status.success());
    assert_eq!(
        String::from_utf8_lossy(&unknown.stderr),
        format!("error: unknown reason `no_identiy`: the reasons are {known}\n")
    );
    let (status, answer) = relay
        .admin(Method::GET, "/admin/dead-letters?reason=nope")
        .await;
    assert_eq!(status, 400);
    assert_eq!(
        answer,
        json!({
            "error": "invalid_filter",
            "detail": format!("unknown reason `nope`: the reasons are {known}"),
        })
    );
    let (status, _) = relay
        .admin(Method::POST, "/admin/dead-letters/purge?reason=nope")
        .await;
    assert_eq!(status, 400);
    assert_eq!(Reason::known(), known);
}

/// A valid NPS webhook of user `n`, without the email the `email` identity needs.
fn nps(n: usize) -> String {
    json!({ "timestamp": 1_700_000_000, "data": { "type": "nps", "score": 7, "user": { "user_id": format!("page-{n}") } } })
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_larger_than_a_page_re_maps_every_webhook_once_reporting_each_page() {
    const WEBHOOKS: usize = 2 * REPLAY_PAGE + 200;
    let dir = tempfile::tempdir().unwrap();
    let queue = SqliteQueue::open(&dir.path().join("queue.sqlite3")).unwrap();
    let at = 1_700_000_000_000;
    for n in 0..WEBHOOKS {
        queue
            .enqueue(records::quarantined(
                &nps(n),
                at,
                "no_identity",
                "no email",
                "",
            ))
            .await
            .unwrap();
    }
    let now = chrono::DateTime::from_timestamp_millis(at + 1000).unwrap();
    let all = DeadLetterFilter::default();

    // Still unmappable (the identity still `email`): each is quarantined again, with a new
    // dead record, which the same replay must not take up a second time.
    let by_email = Mapper::new("email", false, false, &MappingSettings::default());
    let mut pages = Vec::new();
    let summary = dead_letters::replay_with_progress(
        &queue,
        &crate::support::default_source(by_email.clone()),
        all.clone(),
        now,
        &mut |done| pages.push(done.webhooks),
    )
    .await
    .unwrap();
    assert_eq!(
        (summary.webhooks, summary.quarantined, summary.events),
        (WEBHOOKS, WEBHOOKS, 0)
    );
    assert_eq!(pages, [REPLAY_PAGE, 2 * REPLAY_PAGE, WEBHOOKS]);
    let count = queue.count_dead_letters(all.clone()).await.unwrap();
    assert_eq!(count.dead_letters as usize, WEBHOOKS);

    // Fixed: every webhook becomes one pending track event; a limit counts dead letters.
    let by_user_id = Mapper::new("user_id", false, false, &MappingSettings::default());
    let first = DeadLetterFilter {
        limit: Some(REPLAY_PAGE + 1),
        ..all.clone()
    };
    let summary = dead_letters::replay(
        &queue,
        &crate::support::default_source(by_user_id.clone()),
        first,
        now,
    )
    .await
    .unwrap();
    assert_eq!(
        (summary.webhooks, summary.events),
        (REPLAY_PAGE + 1, REPLAY_PAGE + 1)
    );
    let summary = dead_letters::replay(
        &queue,
        &crate::support::default_source(by_user_id.clone()),
        all.clone(),
        now,
    )
    .await
    .unwrap();
    assert_eq!(summary.webhooks, WEBHOOKS - REPLAY_PAGE - 1);
    let stats = queue.stats(at).await.unwrap();
    assert_eq!((stats.pending, stats.dead), (WEBHOOKS as u64, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_shows_its_progress_on_a_terminal_and_nothing_in_a_pipe() {
    const WEBHOOKS: usize = 2 * REPLAY_PAGE + 200;
    let heap = FakeHeap::start().await;
    let dir = tempfile::tempdir().unwrap();
    let fill = |from: usize| {
        let path = dir.path().join("queue.sqlite3");
        async move {
            let queue = SqliteQueue::open(&path).unwrap();
            for n in from..from + WEBHOOKS {
                let webhook = records::quarantined(&nps(n), 1, "no_identity", "no email", "");
                queue.enqueue(webhook).await.unwrap();
            }
        }
    };
    fill(0).await;
    let env = RelayProcess::env(&heap, dir.path());

    // `script` runs the command on a pseudo-terminal, as an operator's shell would.
    let command = format!("{} dlq replay --all", crate::support::BINARY);
    let on_terminal = std::process::Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .unwrap();
    assert!(on_terminal.status.success());
    let shown = String::from_utf8_lossy(&on_terminal.stdout);
    let progress: Vec<&str> = shown
        .split(['\r', '\n'])
        .filter(|line| line.starts_with("replayed "))
        .collect();
    assert_eq!(
        progress,
        [
            format!("replayed {REPLAY_PAGE}/{WEBHOOKS} webhooks"),
            format!("replayed {}/{WEBHOOKS} webhooks", 2 * REPLAY_PAGE),
            format!("replayed {WEBHOOKS}/{WEBHOOKS} webhooks"),
        ],
        "{shown}"
    );
    assert!(
        shown.contains(&format!(
            r#"{{"webhooks":{WEBHOOKS},"events":{WEBHOOKS},"quarantined":0}}"#
        )),
        "{shown}"
    );

    // In a pipe (a script, a log file): only the summary, nothing on standard error.
    fill(WEBHOOKS).await;
    let piped = run_cli(&env, &["dlq", "replay", "--all"]);
    assert!(
        piped.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&piped.stderr)
    );
    assert_eq!(
        stdout_json(&piped),
        json!({"webhooks": WEBHOOKS, "events": WEBHOOKS, "quarantined": 0})
    );
}
