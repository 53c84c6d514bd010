//! Sources (contract §9): several Userpilot environments in one relay, each with its own
//! webhook route, secrets and Heap app id. Against a fake Heap serving several app ids (every
//! bulk body names its `app_id`): each source's events reach its own app id; a signature is
//! checked against the secrets of the source in the URL only; deduplication is per source; an
//! unknown source is 404 `unknown_source`; the top-level keys still serve `/webhooks/userpilot`
//! (and `/webhooks/userpilot/default`); webhook metrics, `/admin/status`, dead letters,
//! `dlq list` and `send-test` know the source.

use std::collections::BTreeSet;
use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use crate::support::{
    APP_ID, Client, DEFAULT_WEBHOOK_PATH, FakeHeap, Relay, RelayProcess, SECRET, config_toml,
    flow_started, run_cli, source_path, write_config,
};

const WAIT: Duration = Duration::from_secs(10);

const PRODUCTION: &str = "production";
const PRODUCTION_SECRETS: [&str; 2] = ["production-secret-one", "production-secret-two"];
const PRODUCTION_APP: &str = "app-production";
const STAGING: &str = "staging";
const STAGING_SECRET: &str = "staging-secret-only-one";
const STAGING_APP: &str = "app-staging";

/// The two sources, layered over the test base (whose top-level keys define the source
/// `default` at [`APP_ID`] unless `with_default` is false). Property updates are off so that
/// every webhook is exactly one queue record, one track event.
fn two_sources(with_default: bool) -> String {
    let top_level = if with_default {
        "[heap]\nuser_properties = false\n".to_owned()
    } else {
        // Empty top-level keys define no `default` source (contract §9: they are required
        // only when no other source is configured).
        "[userpilot]\nsecrets = []\n[heap]\napp_id = \"\"\nuser_properties = false\n".to_owned()
    };
    format!(
        r#"{top_level}
[sources.{PRODUCTION}]
secrets = ["{}", "{}"]
app_id = "{PRODUCTION_APP}"
[sources.{STAGING}]
secrets = ["{STAGING_SECRET}"]
app_id = "{STAGING_APP}"
"#,
        PRODUCTION_SECRETS[0], PRODUCTION_SECRETS[1]
    )
}

fn production(client: &Client) -> Client {
    client.source(PRODUCTION, PRODUCTION_SECRETS[0])
}

fn staging(client: &Client) -> Client {
    client.source(STAGING, STAGING_SECRET)
}

/// A webhook without any user id: quarantined on arrival as a dead letter of its source.
fn unmappable(seq: usize) -> Value {
    json!({
        "timestamp": chrono::Utc::now().timestamp(),
        "data": { "type": "nps", "score": 5, "seq": seq },
    })
}

async fn assert_accepted(client: &Client, body: &Value) {
    let (status, answer) = client.post(body).await;
    assert_eq!(status, 202, "{}: {answer}", client.webhook_path);
    assert_eq!(answer["status"], "accepted", "{}", client.webhook_path);
}

fn identities(events: &[Value]) -> BTreeSet<String> {
    events
        .iter()
        .map(|e| e["identity"].as_str().unwrap().to_owned())
        .collect()
}

/// A relay binary configured by a `--config` file with the two sources (and `default`).
fn spawn_binary(heap: &FakeHeap, dir: &std::path::Path) -> (RelayProcess, std::path::PathBuf) {
    let file = dir.join("relay.toml");
    write_config(&file, &config_toml(heap, dir, &two_sources(true)));
    (RelayProcess::spawn_with_config(&file), file)
}

/// Runs the binary's `args` (a command such as `dlq list`) off the runtime's threads, so the
/// fake Heap keeps answering meanwhile.
async fn cli(args: Vec<String>) -> std::process::Output {
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run_cli(&[], &args)
    })
    .await
    .unwrap()
}

fn json_lines(bytes: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(bytes)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_sources_events_reach_its_own_app_id() {
    let heap = FakeHeap::start().await;
    let relay = Relay::start(&heap, &two_sources(true)).await;
    for seq in 0..3 {
        assert_accepted(&production(&relay), &flow_started("prod", seq)).await;
    }
    // Any of a source's secrets is accepted on its route.
    let second_secret = relay.source(PRODUCTION, PRODUCTION_SECRETS[1]);
    assert_accepted(&second_secret, &flow_started("prod", 3)).await;
    for seq in 0..2 {
        assert_accepted(&staging(&relay), &flow_started("staging", seq)).await;
    }

    let prod = heap.wait_for_events_for(PRODUCTION_APP, 4, WAIT).await;
    let stag = heap.wait_for_events_for(STAGING_APP, 2, WAIT).await;
    assert_eq!(
        identities(&prod),
        (0..4).map(|seq| format!("prod-{seq}")).collect(),
        "production's events at {PRODUCTION_APP}"
    );
    assert_eq!(
        identities(&stag),
        (0..2).map(|seq| format!("staging-{seq}")).collect(),
        "staging's events at {STAGING_APP}"
    );
    assert_eq!((prod.len(), stag.len()), (4, 2), "an event was sent twice");
    // Every request Heap received named one of the two app ids; the default source's app id
    // (which had no webhook) received nothing.
    let requests = heap.requests();
    for request in &requests {
        assert!(
            request.body["app_id"] == PRODUCTION_APP || request.body["app_id"] == STAGING_APP,
            "{} {}",
            request.path,
            request.body
        );
    }
    assert!(heap.requests_for(APP_ID).is_empty());
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sources_secret_is_refused_on_another_sources_url_with_401() {
    let heap = FakeHeap::start().await;
    let relay = Relay::start(&heap, &two_sources(true)).await;
    let refused = [
        // A staging secret on the production URL, and the other way round.
        (source_path(PRODUCTION), STAGING_SECRET),
        (source_path(STAGING), PRODUCTION_SECRETS[0]),
        (source_path(STAGING), PRODUCTION_SECRETS[1]),
        // The default source's secret on a named source's URL, and a named source's secret on
        // the default URL.
        (source_path(PRODUCTION), SECRET),
        (DEFAULT_WEBHOOK_PATH.to_owned(), STAGING_SECRET),
    ];
    for (seq, (path, secret)) in refused.iter().enumerate() {
        let (status, answer) = relay
            .webhook(path, secret)
            .post(&flow_started("refused", seq))
            .await;
        assert_eq!(
            (status, answer),
            (401, json!({"error": "invalid_signature"})),
            "{path} signed with another source's secret"
        );
    }

    // Each secret on its own URL: accepted, and only these reach Heap.
    assert_accepted(&production(&relay), &flow_started("own", 0)).await;
    assert_accepted(&staging(&relay), &flow_started("own", 1)).await;
    assert_accepted(&relay, &flow_started("own", 2)).await;
    heap.wait_for_events(3, WAIT).await;
    assert_eq!(
        identities(&heap.events()),
        ["own-0", "own-1", "own-2"].map(str::to_owned).into(),
        "a refused webhook reached Heap"
    );
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_body_on_two_sources_is_two_webhooks_but_twice_on_one_source_a_duplicate() {
    let heap = FakeHeap::start().await;
    let relay = Relay::start(&heap, &two_sources(true)).await;
    let (prod, stag) = (production(&relay), staging(&relay));
    // The very same bytes, signed at the very same second (each with its source's secret).
    let body = flow_started("twice", 1);
    let at = chrono::Utc::now().timestamp();
    for client in [&prod, &stag] {
        let (status, answer) = client.post_signed_at(&body, at).await;
        assert_eq!(status, 202, "{}: {answer}", client.webhook_path);
        assert_eq!(
            answer["status"], "accepted",
            "{}: the first copy on this source",
            client.webhook_path
        );
    }
    for client in [&prod, &stag] {
        let (status, answer) = client.post_signed_at(&body, at).await;
        assert_eq!(
            (status, answer),
            (202, json!({"status": "duplicate"})),
            "{}: the second copy on this source",
            client.webhook_path
        );
    }
    // A marker behind the copies on each source: once it has arrived, a copy wrongly queued
    // would have arrived too.
    assert_accepted(&prod, &flow_started("marker", 2)).await;
    assert_accepted(&stag, &flow_started("marker", 3)).await;
    let at_prod = heap.wait_for_events_for(PRODUCTION_APP, 2, WAIT).await;
    let at_stag = heap.wait_for_events_for(STAGING_APP, 2, WAIT).await;
    for (app_id, events, marker) in [
        (PRODUCTION_APP, &at_prod, "marker-2"),
        (STAGING_APP, &at_stag, "marker-3"),
    ] {
        assert_eq!(
            events.len(),
            2,
            "{app_id}: one event per accepted webhook: {events:?}"
        );
        assert_eq!(
            identities(events),
            ["twice-1", marker].map(str::to_owned).into(),
            "{app_id}"
        );
    }
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_or_unconfigured_source_is_404_unknown_source() {
    let heap = FakeHeap::start().await;
    // No top-level keys: no `default` source, so its two routes are unconfigured too.
    let relay = Relay::start(&heap, &two_sources(false)).await;
    let unknown = [
        source_path("nosuch"),
        // Names are lower case (`^[a-z0-9][a-z0-9_]{0,31}$`): this is not `production`.
        source_path("Production"),
        DEFAULT_WEBHOOK_PATH.to_owned(),
        source_path("default"),
    ];
    for (seq, path) in unknown.iter().enumerate() {
        // Signed with a secret the relay knows (production's), so only the route can be why.
        let (status, answer) = relay
            .webhook(path, PRODUCTION_SECRETS[0])
            .post(&flow_started("unknown", seq))
            .await;
        assert_eq!(
            (status, answer),
            (404, json!({"error": "unknown_source"})),
            "{path}"
        );
    }
    assert_accepted(&production(&relay), &flow_started("known", 0)).await;
    let events = heap.wait_for_events(1, WAIT).await;
    assert_eq!(identities(&events), ["known-0".to_owned()].into());
    relay.stop().await;
}

/// Today's behaviour, which must not change: a deployment with the top-level keys only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_level_keys_alone_still_serve_webhooks_userpilot_at_their_app_id() {
    let heap = FakeHeap::start().await;
    let relay = Relay::start(&heap, "").await;
    assert_accepted(&relay, &flow_started("top-level", 0)).await;
    let events = heap.wait_for_events_for(APP_ID, 1, WAIT).await;
    assert_eq!(identities(&events), ["top-level-0".to_owned()].into());
    assert_eq!(heap.requests_for(APP_ID).len(), heap.requests().len());
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_level_keys_also_serve_webhooks_userpilot_default_as_the_same_source() {
    let heap = FakeHeap::start().await;
    let relay = Relay::start(&heap, &two_sources(true)).await;
    let named_default = relay.source("default", SECRET);
    assert_accepted(&named_default, &flow_started("default", 0)).await;
    // Both routes are one source: the same body signed at the same second, first on one route
    // and then on the other, is a duplicate (deduplication is per source).
    let body = flow_started("default", 1);
    let at = chrono::Utc::now().timestamp();
    let (status, answer) = relay.post_signed_at(&body, at).await;
    assert_eq!((status, answer["status"].clone()), (202, json!("accepted")));
    let (status, answer) = named_default.post_signed_at(&body, at).await;
    assert_eq!(
        (status, answer),
        (202, json!({"status": "duplicate"})),
        "/webhooks/userpilot/default is not the source of /webhooks/userpilot"
    );
    let events = heap.wait_for_events_for(APP_ID, 2, WAIT).await;
    assert_eq!(
        identities(&events),
        ["default-0", "default-1"].map(str::to_owned).into()
    );
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_metrics_carry_the_source_label_and_forwarder_metrics_the_app_id() {
    let heap = FakeHeap::start().await;
    let dir = tempfile::tempdir().unwrap();
    // The binary: its metrics are its own (in-process relays share one recorder).
    let (relay, _file) = spawn_binary(&heap, dir.path());
    let (prod, stag) = (production(&relay), staging(&relay));
    let duplicate = flow_started("metrics", 0);
    assert_accepted(&prod, &duplicate).await;
    assert_accepted(&prod, &flow_started("metrics", 1)).await;
    assert_eq!(
        prod.post(&duplicate).await.1,
        json!({"status": "duplicate"})
    );
    assert_accepted(&stag, &flow_started("metrics", 2)).await;
    let wrong = relay.source(STAGING, PRODUCTION_SECRETS[0]);
    assert_eq!(wrong.post(&flow_started("metrics", 3)).await.0, 401);

    let text = relay.metrics().await;
    let webhooks = |source: &str, outcome: &str| {
        crate::support::metric(
            &text,
            "relay_webhooks_total",
            &[("source", source), ("outcome", outcome)],
        )
    };
    assert_eq!(webhooks(PRODUCTION, "accepted"), 2.0, "{text}");
    assert_eq!(webhooks(PRODUCTION, "duplicate"), 1.0, "{text}");
    assert_eq!(webhooks(PRODUCTION, "invalid_signature"), 0.0, "{text}");
    assert_eq!(webhooks(STAGING, "accepted"), 1.0, "{text}");
    assert_eq!(webhooks(STAGING, "invalid_signature"), 1.0, "{text}");
    assert_eq!(webhooks("default", "accepted"), 0.0, "{text}");
    let failures = |source: &str| {
        crate::support::metric(
            &text,
            "relay_signature_failures_total",
            &[("source", source)],
        )
    };
    assert_eq!((failures(STAGING), failures(PRODUCTION)), (1.0, 0.0));
    let durations = crate::support::metric(
        &text,
        "relay_webhook_duration_seconds_count",
        &[("source", STAGING)],
    );
    assert_eq!(durations, 2.0, "one duration per staging webhook: {text}");

    // Delivered: counted per app id.
    heap.wait_for_events(3, WAIT).await;
    crate::support::eventually(WAIT, async || {
        let text = relay.metrics().await;
        let forwarded = |app_id: &str| {
            crate::support::metric(&text, "relay_events_forwarded_total", &[("app_id", app_id)])
        };
        let seen = (forwarded(PRODUCTION_APP), forwarded(STAGING_APP));
        if seen == (2.0, 1.0) {
            Ok(())
        } else {
            Err(format!("relay_events_forwarded_total by app id: {seen:?}"))
        }
    })
    .await;
    let prod_requests = relay
        .metric("relay_heap_requests_total", &[("app_id", PRODUCTION_APP)])
        .await;
    assert!(prod_requests >= 1.0, "relay_heap_requests_total{{app_id}}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_status_lists_every_source_and_every_lane() {
    let heap = FakeHeap::start().await;
    let relay = Relay::start(&heap, &two_sources(true)).await;
    assert_accepted(&production(&relay), &flow_started("status", 0)).await;
    assert_accepted(&staging(&relay), &flow_started("status", 1)).await;
    assert_accepted(&staging(&relay), &flow_started("status", 2)).await;

    let delivered =
        |status: &Value, app_id: &str| status["lanes"][app_id]["queue"]["delivered"].clone();
    let status = relay
        .wait_for_status(WAIT, |s| {
            delivered(s, PRODUCTION_APP) == 1 && delivered(s, STAGING_APP) == 2
        })
        .await;
    // The three fields the design names (more may come: a source's identity, say).
    let source = |name: &str| {
        let source = &status["sources"][name];
        (
            source["path"].clone(),
            source["app_id"].clone(),
            source["secrets"].clone(),
        )
    };
    assert_eq!(
        source(PRODUCTION),
        (
            json!(source_path(PRODUCTION)),
            json!(PRODUCTION_APP),
            json!(2)
        ),
        "{status}"
    );
    assert_eq!(
        source(STAGING),
        (json!(source_path(STAGING)), json!(STAGING_APP), json!(1)),
        "{status}"
    );
    // The top-level keys' source. Its path: either of its two routes (the design leaves open
    // which one /admin/status shows).
    let default = &status["sources"]["default"];
    assert_eq!(
        (&default["app_id"], &default["secrets"]),
        (&json!(APP_ID), &json!(1)),
        "{status}"
    );
    assert!(
        default["path"] == DEFAULT_WEBHOOK_PATH || default["path"] == source_path("default"),
        "{status}"
    );
    for app_id in [PRODUCTION_APP, STAGING_APP] {
        let lane = &status["lanes"][app_id];
        assert_eq!(lane["forwarder"], "running", "{app_id}: {status}");
        assert_eq!(
            (
                &lane["queue"]["pending"],
                &lane["queue"]["in_flight"],
                &lane["queue"]["dead"]
            ),
            (&json!(0), &json!(0), &json!(0)),
            "{app_id}: {status}"
        );
    }
    // The fields that were there before lanes stay, over all lanes.
    assert_eq!(status["queue"]["delivered"], 3, "{status}");
    assert_eq!(status["forwarder"], "running", "{status}");
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_carry_their_source_and_are_filtered_by_it() {
    let heap = FakeHeap::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (relay, file) = spawn_binary(&heap, dir.path());
    for (client, seqs) in [(production(&relay), 0..2), (staging(&relay), 2..3)] {
        for seq in seqs {
            let (status, answer) = client.post(&unmappable(seq)).await;
            assert_eq!(
                (status, answer),
                (202, json!({"status": "quarantined"})),
                "{}",
                client.webhook_path
            );
        }
    }

    let (status, all) = relay.admin(Method::GET, "/admin/dead-letters").await;
    assert_eq!(status, 200, "{all}");
    assert_eq!(all["dead_letters"].as_array().unwrap().len(), 3, "{all}");
    for (source, app_id, count) in [(PRODUCTION, PRODUCTION_APP, 2), (STAGING, STAGING_APP, 1)] {
        let (status, listing) = relay
            .admin(Method::GET, &format!("/admin/dead-letters?source={source}"))
            .await;
        assert_eq!(status, 200, "{listing}");
        let letters = listing["dead_letters"].as_array().unwrap();
        assert_eq!(letters.len(), count, "?source={source}: {listing}");
        for letter in letters {
            assert_eq!(
                (&letter["source"], &letter["app_id"], &letter["reason"]),
                (&json!(source), &json!(app_id), &json!("no_user_id")),
                "{letter}"
            );
        }
    }

    // The command, beside the running relay, on the same configuration file.
    let config = file.to_str().unwrap().to_owned();
    for (source, count) in [(STAGING, 1), (PRODUCTION, 2)] {
        let args = ["--config", &config, "dlq", "list", "--source", source];
        let listed = cli(args.map(str::to_owned).to_vec()).await;
        assert!(
            listed.status.success(),
            "{}",
            String::from_utf8_lossy(&listed.stderr)
        );
        let letters = json_lines(&listed.stdout);
        assert_eq!(
            letters.len(),
            count,
            "dlq list --source {source}: {letters:?}"
        );
        assert!(letters.iter().all(|l| l["source"] == source), "{letters:?}");
    }

    // A purge filtered by source takes that source's dead letters only.
    let (status, answer) = relay
        .admin(
            Method::POST,
            &format!("/admin/dead-letters/purge?source={STAGING}"),
        )
        .await;
    assert_eq!((status, answer), (200, json!({"purged": 1})));
    let (_, left) = relay.admin(Method::GET, "/admin/dead-letters").await;
    let left = left["dead_letters"].as_array().unwrap().clone();
    assert_eq!(left.len(), 2, "{left:?}");
    assert!(left.iter().all(|l| l["source"] == PRODUCTION), "{left:?}");
}

/// The reading chosen where the design is brief ("`send-test --source NAME` posts to
/// `/webhooks/userpilot/NAME` signed with that source's first secret"): URL is the relay's
/// webhook URL, as documented for `send-test` today, and `--source` appends the source's name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_test_with_a_source_posts_to_that_sources_url_with_its_secret() {
    let heap = FakeHeap::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (relay, file) = spawn_binary(&heap, dir.path());
    let url = format!("{}{DEFAULT_WEBHOOK_PATH}", relay.url);
    let config = file.to_str().unwrap().to_owned();
    let args = ["--config", &config, "send-test", &url, "--source", STAGING];
    let sent = cli(args.map(str::to_owned).to_vec()).await;
    let stdout = String::from_utf8_lossy(&sent.stdout).into_owned();
    assert!(
        sent.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&sent.stderr)
    );
    // Each line: label, status, the relay's answer; the answers say how many events to expect.
    let mut expected = 0;
    for line in stdout.lines() {
        let answer: Value = serde_json::from_str(&line[line.find('{').unwrap()..]).unwrap();
        assert!(line.contains(" 202 "), "{line}");
        expected += answer["events"].as_u64().unwrap() as usize;
    }
    assert!(expected > 0, "{stdout}");

    let events = heap.wait_for_events_for(STAGING_APP, expected, WAIT).await;
    assert_eq!(events.len(), expected, "{events:?}");
    assert!(
        events.iter().all(|e| e["identity"] == "relay-send-test"),
        "{events:?}"
    );
    assert!(heap.requests_for(PRODUCTION_APP).is_empty());
    assert!(heap.requests_for(APP_ID).is_empty());
    let text = relay.metrics().await;
    let accepted = crate::support::metric(
        &text,
        "relay_webhooks_total",
        &[("source", STAGING), ("outcome", "accepted")],
    );
    assert_eq!(
        accepted as usize,
        stdout.lines().count(),
        "every sample on the staging route"
    );
}
