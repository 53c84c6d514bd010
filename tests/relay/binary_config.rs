//! The real binary as operators run it, configured by environment variables (contract §5, §6):
//! it starts and relays to the fake Heap; `RELAY_USERPILOT__SECRETS` list parsing; refusing to
//! start with one line naming the key; `check-config` with secrets redacted; `--config` layered
//! under the environment; the queue folder created when missing; `sign`; JSON logs that never
//! show secrets, signatures or bodies; and sources (§9) from `RELAY_SOURCES__<NAME>__<KEY>`,
//! listed by `check-config`, as the examples of `config/default.toml`, `docker-compose.yml` and
//! `deploy/kubernetes/` write them.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use crate::support::{ADMIN_TOKEN, APP_ID, BINARY, FakeHeap, RelayProcess, SECRET, eventually};
use serde_json::{Value, json};
use userpilot_heap_relay::userpilot::sign;

const WAIT: Duration = Duration::from_secs(10);

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// `env` with the variables named in `remove` taken out and `set` put in (replacing).
fn with(env: &[(String, String)], remove: &[&str], set: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = env
        .iter()
        .filter(|(k, _)| !remove.contains(&k.as_str()) && !set.iter().any(|(s, _)| s == k))
        .cloned()
        .collect();
    env.extend(set.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
    env
}

/// Runs the binary with `args` on a clean environment plus `env`, and waits for it to exit
/// (killing it and failing after 20 s: a relay that accepted a bad configuration would serve
/// forever).
fn run(args: &[&str], env: &[(String, String)]) -> Output {
    let child = Command::new(BINARY)
        .args(args)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let (done, result) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(child.wait_with_output());
    });
    match result.recv_timeout(Duration::from_secs(20)) {
        Ok(output) => output.unwrap(),
        Err(_) => {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            panic!("`{args:?}` did not exit within 20 s (env {env:?})");
        }
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A realistic webhook for `user_id`; `marker` goes into the body (and must stay there).
fn webhook(user_id: &str, marker: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "timestamp": now(),
        "data": {
            "type": "nps", "action": "feedback", "feedback": marker,
            "user": { "user_id": user_id, "email": "jane@example.com" }
        }
    }))
    .unwrap()
}

/// Posts `body` with `signature` to the relay's webhook URL.
async fn post(url: &str, body: Vec<u8>, signature: &str) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(format!("{url}/webhooks/userpilot"))
        .header("content-type", "application/json")
        .header("x-signature", signature)
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// The queue location the support environment uses.
fn queue_file(dir: &Path) -> std::path::PathBuf {
    dir.join("queue.sqlite3")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_configured_only_by_environment_relays_a_signed_webhook_to_heap() {
    let heap = FakeHeap::start().await;
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::spawn(&RelayProcess::env(&heap, dir.path()));

    let body = webhook("u_env", "hello");
    let signature = crate::support::signature(&body);
    let (status, answer) = post(&relay.url, body, &signature).await;
    assert_eq!(
        (status, answer),
        (202, json!({"status": "accepted", "events": 1}))
    );

    let events = heap.wait_for_events(1, WAIT).await;
    assert_eq!(events[0]["identity"], "u_env");
    assert_eq!(events[0]["event"], "Userpilot NPS (feedback)");
    let track = heap
        .requests()
        .into_iter()
        .find(|r| r.path == "/api/track")
        .unwrap();
    assert_eq!(track.body["app_id"], APP_ID);
    assert!(queue_file(dir.path()).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_comma_separated_secrets_variable_configures_every_secret() {
    let heap = FakeHeap::start().await;
    let dir = tempfile::tempdir().unwrap();
    // Mixed case on purpose: keys are case-folded by the loader, values must not be.
    let env = with(
        &RelayProcess::env(&heap, dir.path()),
        &[],
        &[("RELAY_USERPILOT__SECRETS", "First-Secret,Second-Secret")],
    );
    let relay = RelayProcess::spawn(&env);

    for (user, secret) in [("u_first", "First-Secret"), ("u_second", "Second-Secret")] {
        let body = webhook(user, "x");
        let signature = sign(&body, secret, now());
        let (status, answer) = post(&relay.url, body, &signature).await;
        assert_eq!(
            (status, answer),
            (202, json!({"status": "accepted", "events": 1})),
            "{secret}"
        );
    }
    for wrong in ["First-Secret,Second-Secret", "first-secret", SECRET] {
        let body = webhook("u_wrong", wrong);
        let signature = sign(&body, wrong, now());
        let (status, _) = post(&relay.url, body, &signature).await;
        assert_eq!(status, 401, "{wrong} should not be a configured secret");
    }
    heap.wait_for_events(2, WAIT).await;
}

/// Variables to remove, variables to set, and the key the refusal must name.
type Refusal<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);

#[tokio::test]
async fn startup_is_refused_with_one_line_naming_the_key() {
    let heap = FakeHeap::start().await;
    let dir = tempfile::tempdir().unwrap();
    let base = RelayProcess::env(&heap, dir.path());
    let cases: &[Refusal] = &[
        (&["RELAY_HEAP__APP_ID"], &[], "heap.app_id"),
        (&[], &[("RELAY_HEAP__APP_ID", "  ")], "heap.app_id"),
        (&["RELAY_USERPILOT__SECRETS"], &[], "userpilot.secrets"),
        (
            &[],
            &[("RELAY_USERPILOT__SECRETS", "")],
            "userpilot.secrets",
        ),
        (
            &[],
            &[("RELAY_USERPILOT__SECRETS", "a-secret,")],
            "userpilot.secrets",
        ),
        (&[], &[("RELAY_SERVER__LISTEN", "nope")], "server.listen"),
        (
            &[],
            &[("RELAY_HEAP__BATCH_MAX_EVENTS", "5000")],
            "heap.batch_max_events",
        ),
        (&[], &[("RELAY_LOG__FORMAT", "xml")], "log.format"),
        (&[], &[("RELAY_HEAP__APPID", "1")], "heap.appid"),
        (
            &[],
            &[("RELAY_HEAP__BASE_URL", "ftp://heap.example")],
            "heap.base_url",
        ),
        (
            &[],
            &[("RELAY_RETRY__MAX_BACKOFF_MS", "soon")],
            "retry.max_backoff_ms",
        ),
        (
            &[],
            &[("RELAY_HEAP__USER_PROPERTIES", "maybe")],
            "heap.user_properties",
        ),
        (&[], &[("RELAY_QUEUE__BACKEND", "mysql")], "queue.backend"),
    ];
    for (remove, set, key) in cases {
        let env = with(&base, remove, set);
        let output = run(&[], &env);
        let stderr = text(&output.stderr);
        let context = format!("removed {remove:?}, set {set:?}: stderr {stderr:?}");
        assert!(!output.status.success(), "{context}");
        assert_eq!(
            stderr.trim_end().lines().count(),
            1,
            "not one line: {context}"
        );
        assert!(
            stderr.contains(&format!("`{key}`")),
            "does not name `{key}`: {context}"
        );
        assert!(
            !stderr.contains(SECRET) && !stderr.contains(ADMIN_TOKEN),
            "{context}"
        );
    }
    assert!(
        !queue_file(dir.path()).exists(),
        "a refused start opened the queue"
    );
}

#[tokio::test]
async fn a_missing_config_file_is_refused_with_one_line_naming_it() {
    let heap = FakeHeap::start().await;
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nowhere.toml");
    let output = run(
        &["--config", missing.to_str().unwrap()],
        &RelayProcess::env(&heap, dir.path()),
    );
    let stderr = text(&output.stderr);
    assert!(!output.status.success());
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("nowhere.toml"), "{stderr}");
}

#[tokio::test]
async fn check_config_prints_the_effective_configuration_with_secrets_redacted() {
    let heap = FakeHeap::start().await;
    let dir = tempfile::tempdir().unwrap();
    let hidden = [
        "sekrit-one",
        "sekrit-two",
        "admin-tok-xyz-long-enough",
        "pg-password-123",
    ];
    let env = with(
        &RelayProcess::env(&heap, dir.path()),
        &[],
        &[
            ("RELAY_USERPILOT__SECRETS", "sekrit-one,sekrit-two"),
            ("RELAY_ADMIN__TOKEN", "admin-tok-xyz-long-enough"),
            (
                "RELAY_QUEUE__POSTGRES_URL",
                "postgres://relay:pg-password-123@db/relay",
            ),
            ("RELAY_HEAP__EVENTS_PER_MINUTE", "1234"),
        ],
    );
    let output = run(&["check-config"], &env);
    let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));
    assert!(output.status.success(), "{stderr}");

    let printed: toml::Table = stdout.parse().unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert_eq!(printed["heap"]["app_id"].as_str(), Some(APP_ID));
    assert_eq!(
        printed["heap"]["base_url"].as_str(),
        Some(heap.url().as_str())
    );
    assert_eq!(
        printed["heap"]["events_per_minute"].as_integer(),
        Some(1234)
    );
    // A default nobody overrode is part of the effective configuration too.
    assert_eq!(
        printed["userpilot"]["tolerance_secs"].as_integer(),
        Some(300)
    );
    let secrets = printed["userpilot"]["secrets"].as_array().unwrap();
    assert_eq!(secrets.len(), 2, "{stdout}");
    for value in hidden {
        assert!(!stdout.contains(value), "{value} printed:\n{stdout}");
        assert!(!stderr.contains(value), "{value} printed:\n{stderr}");
    }
    assert!(
        !queue_file(dir.path()).exists(),
        "check-config opened the queue"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_file_is_layered_over_the_defaults_and_under_the_environment() {
    let heap = FakeHeap::start().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("relay.toml");
    std::fs::write(
        &file,
        r#"
[userpilot]
secrets = ["file-secret"]
[heap]
app_id = "from-file"
identity = "email"
[mapping]
rename = { "Userpilot NPS (feedback)" = "NPS comment" }
"#,
    )
    .unwrap();
    let env = with(
        &RelayProcess::env(&heap, dir.path()),
        &["RELAY_USERPILOT__SECRETS"],
        &[("RELAY_HEAP__APP_ID", "from-env")],
    );
    let relay = RelayProcess::spawn_with_args(&["--config", file.to_str().unwrap()], &env);

    let body = webhook("u_layers", "x");
    let signature = sign(&body, "file-secret", now());
    let (status, answer) = post(&relay.url, body, &signature).await;
    assert_eq!(
        (status, answer),
        (202, json!({"status": "accepted", "events": 1}))
    );

    let events = heap.wait_for_events(1, WAIT).await;
    assert_eq!(
        events[0]["event"], "NPS comment",
        "the file's [mapping] applies"
    );
    assert_eq!(
        events[0]["identity"], "jane@example.com",
        "the file's heap.identity applies"
    );
    let track = heap
        .requests()
        .into_iter()
        .find(|r| r.path == "/api/track")
        .unwrap();
    assert_eq!(
        track.body["app_id"], "from-env",
        "the environment wins over the file"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_folder_is_created_when_missing() {
    let heap = FakeHeap::start().await;
    let dir = tempfile::tempdir().unwrap();
    let queue = dir
        .path()
        .join("not")
        .join("there")
        .join("yet")
        .join("relay.sqlite3");
    let env = with(
        &RelayProcess::env(&heap, dir.path()),
        &[],
        &[("RELAY_QUEUE__PATH", queue.to_str().unwrap())],
    );
    let relay = RelayProcess::spawn(&env);
    assert!(queue.exists());

    let body = webhook("u_folder", "x");
    let signature = crate::support::signature(&body);
    let (status, _) = post(&relay.url, body, &signature).await;
    assert_eq!(status, 202);
    heap.wait_for_events(1, WAIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_prints_a_header_that_the_relay_accepts() {
    let heap = FakeHeap::start().await;
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::spawn(&RelayProcess::env(&heap, dir.path()));
    let body = webhook("u_signed", "x");
    let file = dir.path().join("body.json");
    std::fs::write(&file, &body).unwrap();

    let output = run(&["sign", "--secret", SECRET, file.to_str().unwrap()], &[]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let stdout = text(&output.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "{stdout}");
    assert!(
        lines[0].starts_with("t=") && lines[0].contains(",v1="),
        "{stdout}"
    );

    let (status, answer) = post(&relay.url, body.clone(), lines[0]).await;
    assert_eq!(
        (status, answer),
        (202, json!({"status": "accepted", "events": 1}))
    );

    // The same body signed with another secret is refused: the secret was really used.
    let output = run(&["sign", "--secret", "other", file.to_str().unwrap()], &[]);
    let (status, _) = post(&relay.url, body, text(&output.stdout).trim()).await;
    assert_eq!(status, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_are_json_lines_without_secrets_signatures_or_bodies() {
    assert_logs_are_clean("info").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn even_trace_logs_show_no_secrets_signatures_or_bodies() {
    assert_logs_are_clean("trace").await;
}

/// Sends accepted, refused and quarantined webhooks to a relay logging at `level`, then checks
/// every log line.
async fn assert_logs_are_clean(level: &str) {
    let heap = FakeHeap::start().await;
    let dir = tempfile::tempdir().unwrap();
    let env = with(
        &RelayProcess::env(&heap, dir.path()),
        &[],
        &[("RELAY_LOG__LEVEL", level)],
    );
    let relay = RelayProcess::spawn(&env);
    let mut signatures = Vec::new();

    // Accepted.
    let body = webhook("u_logs", "marker-accepted-7f3a");
    let signature = crate::support::signature(&body);
    signatures.push(signature.clone());
    assert_eq!(post(&relay.url, body, &signature).await.0, 202);
    // Refused: a signature made for another body.
    let body = webhook("u_logs", "marker-tampered-7f3a");
    assert_eq!(post(&relay.url, body, &signature).await.0, 401);
    // Refused: a signed body that is not JSON.
    let body = b"marker-not-json-7f3a".to_vec();
    let signature = crate::support::signature(&body);
    signatures.push(signature.clone());
    assert_eq!(post(&relay.url, body, &signature).await.0, 400);
    // Quarantined.
    let body = serde_json::to_vec(&json!({
        "timestamp": now(), "data": {"type": "flow", "action": "started", "note": "marker-quarantined-7f3a"}
    }))
    .unwrap();
    let signature = crate::support::signature(&body);
    signatures.push(signature.clone());
    assert_eq!(post(&relay.url, body, &signature).await.0, 202);
    heap.wait_for_events(1, WAIT).await;

    let logs = eventually(WAIT, async || {
        let logs = relay.logs();
        let outcomes = logs
            .iter()
            .filter(|l| {
                ["webhook accepted", "webhook refused", "quarantined"]
                    .iter()
                    .any(|m| l.contains(m))
            })
            .count();
        (outcomes >= 4).then_some(logs)
    })
    .await;

    let mut forbidden: Vec<String> = vec![SECRET.to_owned(), ADMIN_TOKEN.to_owned()];
    for signature in &signatures {
        forbidden.push(signature.clone());
        forbidden.push(signature.split_once(",v1=").unwrap().1.to_owned());
    }
    forbidden.push("7f3a".to_owned());
    for line in &logs {
        let parsed: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        assert!(parsed.is_object(), "{line}");
        assert!(
            parsed["level"].is_string() && parsed["message"].is_string(),
            "{line}"
        );
        for value in &forbidden {
            assert!(
                !line.contains(value.as_str()),
                "log line shows {value:?}: {line}"
            );
        }
    }
    // Every line of a webhook request carries its request id.
    for line in logs
        .iter()
        .filter(|l| l.contains("\"/webhooks/userpilot\""))
    {
        let parsed: Value = serde_json::from_str(line).unwrap();
        let id = parsed["span"]["request_id"].as_str().unwrap_or("");
        assert!(!id.is_empty(), "no request id: {line}");
    }
}

#[test]
fn numeric_looking_environment_values_are_kept_as_written() {
    let env: Vec<(String, String)> = [
        ("RELAY_USERPILOT__SECRETS", "a-secret"),
        ("RELAY_HEAP__APP_ID", "0123"),
        ("RELAY_QUEUE__PATH", "/nonexistent/relay.sqlite3"),
    ]
    .iter()
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect();
    let output = run(&["check-config"], &env);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let printed: toml::Table = text(&output.stdout).parse().unwrap();
    assert_eq!(printed["heap"]["app_id"].as_str(), Some("0123"));

    // An app id longer than an i64 goes through f64 and loses digits.
    let long = with(
        &env,
        &[],
        &[("RELAY_HEAP__APP_ID", "12345678901234567890123")],
    );
    let printed: toml::Table = text(&run(&["check-config"], &long).stdout).parse().unwrap();
    assert_eq!(
        printed["heap"]["app_id"].as_str(),
        Some("12345678901234567890123")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numeric_looking_secrets_and_tokens_work_as_written() {
    let heap = FakeHeap::start().await;
    let dir = tempfile::tempdir().unwrap();
    let env = with(
        &RelayProcess::env(&heap, dir.path()),
        &[],
        &[
            ("RELAY_USERPILOT__SECRETS", "000424242"),
            ("RELAY_ADMIN__TOKEN", "0099000000000042"),
        ],
    );
    let output = run(&["check-config"], &env);
    let stderr = text(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        !stderr.contains("424242"),
        "the secret is printed: {stderr}"
    );

    let relay = RelayProcess::spawn(&env);
    let body = webhook("u_numeric", "x");
    let signature = sign(&body, "000424242", now());
    assert_eq!(post(&relay.url, body, &signature).await.0, 202);
    let status = reqwest::Client::new()
        .get(format!("{}/admin/status", relay.admin_url))
        .bearer_auth("0099000000000042")
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(
        status.as_u16(),
        200,
        "the admin token 0099000000000042 was read as a number"
    );
}

#[test]
fn a_secret_written_as_a_string_is_never_printed() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("relay.toml");
    // A plausible slip: a string where a list is expected.
    std::fs::write(
        &file,
        "[userpilot]\nsecrets = \"file-sekrit\"\n[heap]\napp_id = \"1\"\n",
    )
    .unwrap();
    let output = run(&["--config", file.to_str().unwrap(), "check-config"], &[]);
    let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));
    // Accepting it as one secret or refusing it are both fine; printing it is not.
    assert!(
        !stdout.contains("file-sekrit") && !stderr.contains("file-sekrit"),
        "{stderr}"
    );
    if !output.status.success() {
        assert!(stderr.contains("`userpilot.secrets`"), "{stderr}");
    }
}

/// The source table `check-config` prints after the configuration: one row of cells per
/// source, the header first.
fn source_rows(stdout: &str) -> Vec<Vec<String>> {
    let (_, table) = stdout
        .split_once("\n# Sources (")
        .unwrap_or_else(|| panic!("no source summary in:\n{stdout}"));
    table
        .lines()
        .skip(1)
        .map_while(|line| line.strip_prefix("#   "))
        .map(|row| row.split_whitespace().map(str::to_owned).collect())
        .collect()
}

fn row(cells: &[&str]) -> Vec<String> {
    cells.iter().map(|c| (*c).to_owned()).collect()
}

const SUMMARY_HEADER: [&str; 7] = [
    "name",
    "path",
    "app_id",
    "secrets",
    "tolerance_secs",
    "identity",
    "transform",
];

#[tokio::test]
async fn check_config_reads_sources_from_the_environment_and_lists_each_without_its_secrets() {
    let heap = FakeHeap::start().await;
    let dir = tempfile::tempdir().unwrap();
    let hidden = [
        "staging-sekrit-one",
        "staging-sekrit-two",
        "eu-sekrit-0000001",
    ];
    let env = with(
        &RelayProcess::env(&heap, dir.path()),
        &[],
        &[
            (
                "RELAY_SOURCES__STAGING__SECRETS",
                "staging-sekrit-one,staging-sekrit-two",
            ),
            ("RELAY_SOURCES__STAGING__APP_ID", "0456"),
            ("RELAY_SOURCES__STAGING__TOLERANCE_SECS", "60"),
            ("RELAY_SOURCES__PROD_EU__SECRETS", "eu-sekrit-0000001"),
            ("RELAY_SOURCES__PROD_EU__APP_ID", "789"),
            ("RELAY_SOURCES__PROD_EU__IDENTITY", "email"),
        ],
    );
    let output = run(&["check-config"], &env);
    let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));
    assert!(output.status.success(), "{stderr}");

    // The whole output is still TOML: the summary is comments.
    let printed: toml::Table = stdout.parse().unwrap_or_else(|e| panic!("{e}: {stdout}"));
    let staging = &printed["sources"]["staging"];
    assert_eq!(staging["app_id"].as_str(), Some("0456"), "{stdout}");
    assert_eq!(staging["tolerance_secs"].as_integer(), Some(60));
    assert_eq!(staging["secrets"].as_array().map(Vec::len), Some(2));
    assert_eq!(
        printed["sources"]["prod_eu"]["identity"].as_str(),
        Some("email")
    );
    assert_eq!(
        source_rows(&stdout),
        [
            row(&SUMMARY_HEADER),
            row(&[
                "default",
                "/webhooks/userpilot",
                APP_ID,
                "1",
                "300",
                "user_id",
                "none"
            ]),
            row(&[
                "prod_eu",
                "/webhooks/userpilot/prod_eu",
                "789",
                "1",
                "300",
                "email",
                "none"
            ]),
            row(&[
                "staging",
                "/webhooks/userpilot/staging",
                "0456",
                "2",
                "60",
                "user_id",
                "none"
            ]),
        ],
        "{stdout}"
    );
    assert!(
        stdout.contains("# (default also answers at /webhooks/userpilot/default)"),
        "{stdout}"
    );
    for value in hidden.iter().chain([&SECRET]) {
        assert!(!stdout.contains(value), "{value} printed:\n{stdout}");
        assert!(!stderr.contains(value), "{value} printed:\n{stderr}");
    }
}

/// The lines of `text` from the first that starts with `first` up to (not including) the first
/// after it that starts with `end`, their `# ` taken off.
fn uncommented(text: &str, first: &str, end: &str) -> String {
    let start = text
        .find(first)
        .unwrap_or_else(|| panic!("no {first:?} in the example"));
    let block = &text[start..];
    let block = &block[..block.find(end).unwrap_or(block.len())];
    block
        .lines()
        .map(|line| {
            line.strip_prefix("# ")
                .or_else(|| line.strip_prefix('#'))
                .unwrap_or(line)
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn the_two_source_example_of_the_default_configuration_is_accepted_once_filled_in() {
    let dir = tempfile::tempdir().unwrap();
    let defaults =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("config/default.toml"))
            .unwrap();
    let example = uncommented(&defaults, "# [sources.production]", "[sources]\n");
    // The placeholders are refused as they stand; an operator fills them in.
    let filled = example
        .replace("<production webhook secret>", "production-webhook-secret")
        .replace("<production Heap app id>", "1001")
        .replace("<staging webhook secret>", "staging-webhook-secret-1")
        .replace("<staging Heap app id>", "1002");
    assert_ne!(
        filled, example,
        "the example has no placeholders left to fill"
    );
    let file = dir.path().join("relay.toml");
    std::fs::write(&file, &filled).unwrap();
    let env: Vec<(String, String)> = vec![(
        "RELAY_QUEUE__PATH".into(),
        queue_file(dir.path()).display().to_string(),
    )];

    let output = run(&["--config", file.to_str().unwrap(), "check-config"], &env);
    let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));
    assert!(output.status.success(), "{filled}\n{stderr}");
    assert_eq!(stderr.trim(), "configuration is valid", "{filled}");
    assert_eq!(
        source_rows(&stdout),
        [
            row(&SUMMARY_HEADER),
            row(&[
                "production",
                "/webhooks/userpilot/production",
                "1001",
                "1",
                "300",
                "user_id",
                "none"
            ]),
            row(&[
                "staging",
                "/webhooks/userpilot/staging",
                "1002",
                "1",
                "600",
                "email",
                "none"
            ]),
        ],
        "{filled}\n{stdout}"
    );

    // Left as written, the placeholders are refused, one line each.
    std::fs::write(&file, &example).unwrap();
    let output = run(&["--config", file.to_str().unwrap(), "check-config"], &env);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    let keys: Vec<&str> = stderr
        .lines()
        .map(|line| line.split('`').nth(1).unwrap_or(line))
        .collect();
    assert_eq!(
        keys,
        [
            "sources.production.secrets",
            "sources.production.app_id",
            "sources.staging.secrets",
            "sources.staging.app_id",
        ],
        "{stderr}"
    );
}

/// Every `RELAY_SOURCES__...` variable named in `text`, comments included.
fn source_variables(text: &str) -> Vec<String> {
    let mut names: Vec<String> = text
        .match_indices("RELAY_SOURCES__")
        .map(|(at, _)| {
            text[at..]
                .chars()
                .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                .collect()
        })
        .collect();
    names.sort();
    names.dedup();
    names
}

#[tokio::test]
async fn the_staging_source_compose_and_kubernetes_show_is_accepted_once_set() {
    let heap = FakeHeap::start().await;
    let dir = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for files in [
        &["docker-compose.yml"][..],
        &[
            "deploy/kubernetes/configmap.yaml",
            "deploy/kubernetes/secret.env.example",
        ],
    ] {
        let shown: String = files
            .iter()
            .map(|file| std::fs::read_to_string(root.join(file)).unwrap())
            .collect();
        let names = source_variables(&shown);
        let keys: Vec<&str> = names
            .iter()
            .filter_map(|n| n.strip_prefix("RELAY_SOURCES__STAGING__"))
            .collect();
        assert_eq!(
            keys,
            ["APP_ID", "IDENTITY", "SECRETS", "TOLERANCE_SECS"],
            "{files:?} show {names:?}"
        );
        let value = |key: &str| match key {
            "APP_ID" => "2002",
            "IDENTITY" => "email",
            "SECRETS" => "staging-webhook-secret-1,staging-webhook-secret-2",
            _ => "120",
        };
        let set: Vec<(String, String)> = keys
            .iter()
            .map(|key| {
                (
                    format!("RELAY_SOURCES__STAGING__{key}"),
                    value(key).to_owned(),
                )
            })
            .collect();
        let set: Vec<(&str, &str)> = set.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let env = with(&RelayProcess::env(&heap, dir.path()), &[], &set);
        let output = run(&["check-config"], &env);
        let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));
        assert!(output.status.success(), "{files:?}: {stderr}");
        assert_eq!(
            source_rows(&stdout)[2],
            row(&[
                "staging",
                "/webhooks/userpilot/staging",
                "2002",
                "2",
                "120",
                "email",
                "none"
            ]),
            "{files:?}: {stdout}"
        );
    }
}
