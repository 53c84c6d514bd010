//! What the real binary says about a configuration before any traffic (contract §5.2, §6):
//! each refusal's exact words, every problem at once, warnings that do not refuse (printed by
//! `check-config`, logged by the relay at start), log filters as operators write them,
//! `check-config --probe` on a broken queue folder or an unreachable Heap, `healthcheck`
//! without a configuration, and the same for sources (§9) set by `RELAY_SOURCES__*`.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Output};

use crate::support::{BINARY, FakeHeap, RelayProcess, run_cli, set_env};

/// A valid configuration with no warnings: a digits-only app id, a long secret and token.
fn clean_env(dir: &Path, heap_url: &str) -> Vec<(String, String)> {
    [
        (
            "RELAY_USERPILOT__SECRETS",
            "a-webhook-secret-of-some-length",
        ),
        ("RELAY_HEAP__APP_ID", "1234567890"),
        ("RELAY_HEAP__BASE_URL", heap_url),
        ("RELAY_ADMIN__TOKEN", "an-admin-token-long-enough"),
        ("RELAY_SERVER__LISTEN", "127.0.0.1:0"),
        ("RELAY_SERVER__ADMIN_LISTEN", "127.0.0.1:0"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .chain([(
        "RELAY_QUEUE__PATH".to_owned(),
        dir.join("queue.sqlite3").display().to_string(),
    )])
    .collect()
}

fn with(env: &[(String, String)], set: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut env = env.to_vec();
    for (key, value) in set {
        set_env(&mut env, key, value);
    }
    env
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A port nothing listens on (bound, then released).
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

const LEVELS: &str = "use one of trace, debug, info, warn, error or off";

#[test]
fn each_refusal_is_one_line_in_exact_words_naming_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let base = clean_env(dir.path(), "http://127.0.0.1:1");
    let cases: &[(&[(&str, &str)], String)] = &[
        (
            &[("RELAY_LOG__LEVEL", "verbose")],
            format!(
                "`log.level` has `verbose`, which is not a level: {LEVELS}, optionally with \
                 targets (`info,hyper=warn`, `userpilot_heap_relay=debug`)"
            ),
        ),
        (
            &[("RELAY_LOG__LEVEL", "info,chatty")],
            format!(
                "`log.level` has `chatty`, which is not a level: {LEVELS}, optionally with \
                 targets (`info,hyper=warn`, `userpilot_heap_relay=debug`)"
            ),
        ),
        (
            &[("RELAY_LOG__LEVEL", "hyper=warn")],
            "`log.level` `hyper=warn` sets no level for the relay's own lines, so it would hide \
             them all: add one (`info,hyper=warn`)"
                .to_owned(),
        ),
        (
            &[("RELAY_LOG__LEVEL", "")],
            format!("`log.level` is empty: {LEVELS}"),
        ),
        (
            &[("RELAY_USERPILOT__SECRETS", "REPLACE_WITH_USERPILOT_SECRET")],
            "`userpilot.secrets` secret 1 of 1 is a placeholder, not a secret: set the webhook \
             secret token from Userpilot"
                .to_owned(),
        ),
        (
            &[(
                "RELAY_USERPILOT__SECRETS",
                "a-webhook-secret-of-some-length,changeme",
            )],
            "`userpilot.secrets` secret 2 of 2 is a placeholder, not a secret: set the webhook \
             secret token from Userpilot"
                .to_owned(),
        ),
        (
            &[("RELAY_ADMIN__TOKEN", "REPLACE_ME")],
            "`admin.token` is a placeholder, not a token: set a random one (openssl rand -hex \
             32), or leave it empty to turn /admin off"
                .to_owned(),
        ),
        (
            &[("RELAY_ADMIN__TOKEN", "<admin token>")],
            "`admin.token` is a placeholder, not a token: set a random one (openssl rand -hex \
             32), or leave it empty to turn /admin off"
                .to_owned(),
        ),
        (
            &[("RELAY_ADMIN__TOKEN", "qz7")],
            "`admin.token` is shorter than 16 characters: set a random one (openssl rand -hex \
             32), or leave it empty to turn /admin off"
                .to_owned(),
        ),
        (
            &[("RELAY_ADMIN__TOKEN", "fifteen-chars-!")],
            "`admin.token` is shorter than 16 characters: set a random one (openssl rand -hex \
             32), or leave it empty to turn /admin off"
                .to_owned(),
        ),
        (
            &[("RELAY_HEAP__APP_ID", "REPLACE_WITH_HEAP_APP_ID")],
            "`heap.app_id` is a placeholder: set your Heap environment id (RELAY_HEAP__APP_ID)"
                .to_owned(),
        ),
        (
            &[
                ("RELAY_QUEUE__BACKEND", "postgres"),
                (
                    "RELAY_QUEUE__POSTGRES_URL",
                    "postgres://relay:REPLACE_ME@db:5432/relay",
                ),
            ],
            "`queue.postgres_url` holds a placeholder (the URL or its password): set the real \
             connection URL"
                .to_owned(),
        ),
        (
            &[("RELAY_SERVER__LISTEN", "8080")],
            "`server.listen` must be an address and port, such as `0.0.0.0:8080`".to_owned(),
        ),
        (
            &[("RELAY_RETRY__MAX_BACKOFF_MS", "soon")],
            "`retry.max_backoff_ms` must be an integer, not string \"soon\"".to_owned(),
        ),
    ];
    for (set, expected) in cases {
        let output = run_cli(&with(&base, set), &["check-config"]);
        let text = stderr(&output);
        assert_eq!(output.status.code(), Some(1), "{set:?}: {text}");
        assert_eq!(
            text,
            format!("error: configuration: {expected}\n"),
            "{set:?}"
        );
        assert!(output.stdout.is_empty(), "{set:?}");
        for (key, value) in *set {
            if key.contains("SECRETS") || key.contains("TOKEN") || key.contains("POSTGRES") {
                assert!(!text.contains(value), "{key} shown: {text}");
            }
        }
    }
    // The relay itself refuses the same way, before it opens the queue.
    let output = run_cli(&with(&base, &[("RELAY_ADMIN__TOKEN", "x")]), &[]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).starts_with("error: configuration: `admin.token` is shorter than 16"),
        "{}",
        stderr(&output)
    );
    assert!(!dir.path().join("queue.sqlite3").exists());
}

#[test]
fn every_problem_of_a_configuration_is_reported_at_once_one_line_each() {
    let dir = tempfile::tempdir().unwrap();
    let env = with(
        &clean_env(dir.path(), "http://127.0.0.1:1"),
        &[
            ("RELAY_LOG__LEVEL", "verbose"),
            ("RELAY_USERPILOT__SECRETS", "REPLACE_ME"),
            ("RELAY_ADMIN__TOKEN", "abc"),
            ("RELAY_HEAP__APPID", "123"),
            ("RELAY_HEAP__TIMEOUT_MS", "0"),
            ("RELAY_LOG__FORMAT", "xml"),
        ],
    );
    let output = run_cli(&env, &["check-config"]);
    assert_eq!(output.status.code(), Some(1));
    let expected = [
        "`heap.timeout_ms` must be above 0",
        "`log.format` must be `json` or `pretty`",
        "unknown key `heap.appid`",
        "`userpilot.secrets` secret 1 of 1 is a placeholder, not a secret: set the webhook \
         secret token from Userpilot",
        "`admin.token` is shorter than 16 characters: set a random one (openssl rand -hex 32), \
         or leave it empty to turn /admin off",
        "`log.level` has `verbose`, which is not a level: use one of trace, debug, info, warn, \
         error or off, optionally with targets (`info,hyper=warn`, `userpilot_heap_relay=debug`)",
    ];
    let lines: Vec<String> = expected
        .iter()
        .map(|line| format!("error: configuration: {line}"))
        .collect();
    assert_eq!(stderr(&output).lines().collect::<Vec<_>>(), lines);
    // The same configuration reads the same every time (the loader's tables are unordered).
    for _ in 0..3 {
        assert_eq!(
            stderr(&run_cli(&env, &["check-config"])),
            stderr(&output),
            "the order of the problems changed"
        );
    }
}

#[test]
fn suspicious_values_are_warned_about_by_check_config_and_not_refused() {
    let dir = tempfile::tempdir().unwrap();
    let env = with(
        &clean_env(dir.path(), "http://127.0.0.1:1"),
        &[
            (
                "RELAY_USERPILOT__SECRETS",
                "a-webhook-secret-of-some-length,short1",
            ),
            ("RELAY_HEAP__APP_ID", "my-heap-app"),
        ],
    );
    let output = run_cli(&env, &["check-config"]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(
        stderr(&output),
        "warning: configuration: `userpilot.secrets` secret 2 of 2 is shorter than 16 \
         characters: choose a longer one in Userpilot at the next rotation\n\
         warning: configuration: `heap.app_id` `my-heap-app` is not decimal digits, as Heap \
         environment ids are: Heap accepts an unknown id silently, so check it in Heap\n\
         configuration is valid\n"
    );
    assert!(!stderr(&output).contains("short1"));

    let clean = run_cli(
        &clean_env(dir.path(), "http://127.0.0.1:1"),
        &["check-config"],
    );
    assert_eq!(stderr(&clean), "configuration is valid\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_logs_its_configuration_warnings_at_start() {
    let heap = FakeHeap::start().await;
    let dir = tempfile::tempdir().unwrap();
    // The support environment's app id (`test-app`) and secret (`test-secret`) are both
    // suspicious.
    let relay = RelayProcess::spawn(&RelayProcess::env(&heap, dir.path()));
    let warnings: Vec<serde_json::Value> = relay
        .logs()
        .iter()
        .map(|line| serde_json::from_str(line).unwrap())
        .filter(|line: &serde_json::Value| line["level"] == "WARN")
        .collect();
    let seen: Vec<(&str, &str)> = warnings
        .iter()
        .map(|w| {
            (
                w["key"].as_str().unwrap_or(""),
                w["message"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            (
                "userpilot.secrets",
                "configuration: `userpilot.secrets` secret 1 of 1 is shorter than 16 \
                 characters: choose a longer one in Userpilot at the next rotation"
            ),
            (
                "heap.app_id",
                "configuration: `heap.app_id` `test-app` is not decimal digits, as Heap \
                 environment ids are: Heap accepts an unknown id silently, so check it in Heap"
            ),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filter_written_with_spaces_still_logs() {
    let heap = FakeHeap::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut env = RelayProcess::env(&heap, dir.path());
    // `tracing` alone refuses this filter (the space after the comma is not part of a target
    // to it): the relay tidies it rather than refusing what an operator obviously meant.
    set_env(
        &mut env,
        "RELAY_LOG__LEVEL",
        "warn, userpilot_heap_relay=info",
    );
    let relay = RelayProcess::spawn(&env);
    assert!(relay.logs().iter().any(|l| l.contains("relay started")));

    let output = run_cli(&env, &["check-config"]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let printed: toml::Table = String::from_utf8_lossy(&output.stdout).parse().unwrap();
    assert_eq!(
        printed["log"]["level"].as_str(),
        Some("warn,userpilot_heap_relay=info")
    );
}

/// Runs `check-config --probe` with `env`, through `wrapper` (a command and its arguments
/// that exec the rest) when given.
fn probe(env: &[(String, String)], wrapper: &[&str]) -> Output {
    let mut command = match wrapper.split_first() {
        Some((program, args)) => {
            let mut command = Command::new(program);
            command.args(args).arg(BINARY);
            command
        }
        None => Command::new(BINARY),
    };
    command
        .args(["check-config", "--probe"])
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .unwrap()
}

/// The line of `output`'s standard error that starts with `prefix`.
fn line_starting(output: &Output, prefix: &str) -> String {
    let text = stderr(output);
    text.lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no line starting {prefix:?} in:\n{text}"))
        .to_owned()
}

/// `N ms` at the end of `line`, after `before`.
fn millis_after(line: &str, before: &str) -> u64 {
    let rest = line.split_once(before).unwrap().1;
    rest.trim_end_matches(" ms").parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_probe_passes_on_a_writable_queue_and_a_listening_heap() {
    let heap = FakeHeap::start().await;
    let dir = tempfile::tempdir().unwrap();
    let queue = dir.path().join("new").join("queue.sqlite3");
    let env = with(
        &clean_env(dir.path(), &heap.url()),
        &[("RELAY_QUEUE__PATH", queue.to_str().unwrap())],
    );
    let output = tokio::task::spawn_blocking(move || probe(&env, &[]))
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let queue_line = line_starting(&output, "probe: queue ok: ");
    let prefix = format!(
        "probe: queue ok: sqlite {}, opened and written in ",
        queue.display()
    );
    assert!(queue_line.starts_with(&prefix), "{queue_line}");
    let queue_ms = millis_after(&queue_line, " written in ");
    let port = heap.url().rsplit(':').next().unwrap().to_owned();
    let heap_line = line_starting(&output, "probe: heap ok: ");
    let prefix = format!(
        "probe: heap ok: {}/: connected to 127.0.0.1:{port}, HEAD answered ",
        heap.url()
    );
    assert!(heap_line.starts_with(&prefix), "{heap_line}");
    let heap_ms = millis_after(&heap_line, " in ");
    eprintln!("probe timings: queue {queue_ms} ms, heap {heap_ms} ms");
    // It wrote for real (as the relay will) and sent Heap no events.
    assert!(queue.exists());
    assert!(heap.events().is_empty());
}

#[test]
fn the_probe_names_a_queue_path_under_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("data");
    std::fs::write(&file, "not a folder").unwrap();
    let queue = file.join("relay.sqlite3");
    let env = with(
        &clean_env(dir.path(), &format!("http://127.0.0.1:{}", closed_port())),
        &[("RELAY_QUEUE__PATH", queue.to_str().unwrap())],
    );
    let output = probe(&env, &[]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert_eq!(
        line_starting(&output, "probe: queue"),
        format!(
            "probe: queue failed: `queue.path` {} is under {}, which is a file, not a folder. \
             Fix: set queue.path to a file inside a folder, or move that file away",
            queue.display(),
            file.display()
        )
    );
}

#[test]
fn the_probe_names_a_refused_heap_port_and_an_unresolvable_host() {
    let dir = tempfile::tempdir().unwrap();
    let port = closed_port();
    let env = clean_env(dir.path(), &format!("http://127.0.0.1:{port}"));
    let output = probe(&env, &[]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert_eq!(
        line_starting(&output, "probe: heap"),
        format!(
            "probe: heap failed: `heap.base_url`: 127.0.0.1:{port} refused the connection. \
             Fix: nothing listens there: check the host and port in heap.base_url"
        )
    );
    // The queue was fine, and says so beside the failure.
    line_starting(&output, "probe: queue ok: ");

    // `.invalid` never resolves (RFC 2606). The resolver's own words vary by system.
    let env = with(
        &env,
        &[("RELAY_HEAP__BASE_URL", "https://heap.relay-probe.invalid")],
    );
    let output = probe(&env, &[]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    let line = line_starting(&output, "probe: heap");
    assert!(
        line.starts_with(
            "probe: heap failed: `heap.base_url`: cannot resolve heap.relay-probe.invalid: "
        ) && line.ends_with(
            ". Fix: check the host name in heap.base_url, and that this machine (or pod) has \
             DNS and may reach the internet"
        ),
        "{line}"
    );
}

/// Whether this process runs as root (it owns what it creates).
fn running_as_root() -> bool {
    let dir = tempfile::tempdir().unwrap();
    std::fs::metadata(dir.path()).unwrap().uid() == 0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_probe_names_permission_denied_on_the_queue_folder() {
    let heap = FakeHeap::start().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let folder = dir.path().join("queue");
    std::fs::create_dir(&folder).unwrap();
    std::fs::set_permissions(&folder, std::fs::Permissions::from_mode(0o555)).unwrap();
    let env = with(
        &clean_env(dir.path(), &heap.url()),
        &[(
            "RELAY_QUEUE__PATH",
            folder.join("relay.sqlite3").to_str().unwrap(),
        )],
    );
    // Root writes through any mode: drop to `nobody` to meet the denial a relay user meets.
    let (wrapper, uid): (&[&str], u32) = if running_as_root() {
        (
            &[
                "setpriv",
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
            ],
            65534,
        )
    } else {
        (&[], std::fs::metadata(dir.path()).unwrap().uid())
    };
    let output = tokio::task::spawn_blocking(move || probe(&env, wrapper))
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert_eq!(
        line_starting(&output, "probe: queue"),
        format!(
            "probe: queue failed: cannot create files in the queue folder {}: permission denied \
             (the relay runs as uid {uid}). Fix: give that user write access to {} (chown or \
             chmod; in Kubernetes, securityContext.fsGroup), or set queue.path to a folder it \
             can write",
            folder.display(),
            folder.display()
        )
    );
    line_starting(&output, "probe: heap ok: ");
}

#[test]
fn the_probe_names_a_read_only_file_system() {
    // A read-only mount, in a user and mount namespace of its own (no privileges needed where
    // unprivileged user namespaces are allowed).
    let available = Command::new("unshare")
        .args(["-rm", "true"])
        .status()
        .is_ok_and(|s| s.success());
    // Never a silent pass: where unprivileged namespaces are off, this test must say so.
    assert!(
        available,
        "`unshare -rm` (util-linux) is needed to mount a read-only folder for this test"
    );
    let dir = tempfile::tempdir().unwrap();
    let mount = dir.path().join("ro");
    std::fs::create_dir(&mount).unwrap();
    let env = with(
        &clean_env(dir.path(), &format!("http://127.0.0.1:{}", closed_port())),
        &[(
            "RELAY_QUEUE__PATH",
            mount.join("relay.sqlite3").to_str().unwrap(),
        )],
    );
    let script = "mount -t tmpfs -o ro tmpfs \"$0\" && exec \"$@\"";
    let wrapper = [
        "unshare",
        "-rm",
        "sh",
        "-c",
        script,
        mount.to_str().unwrap(),
    ];
    let output = probe(&env, &wrapper);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert_eq!(
        line_starting(&output, "probe: queue"),
        format!(
            "probe: queue failed: cannot create files in the queue folder {}: the file system \
             is read-only. Fix: mount a writable volume at {} (a container's own file system \
             is often read-only), or set queue.path to a folder on one",
            mount.display(),
            mount.display()
        )
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthcheck_needs_no_configuration_beyond_the_listen_address() {
    let heap = FakeHeap::start().await;
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::spawn(&RelayProcess::env(&heap, dir.path()));
    let ready = format!("{}/readyz", relay.url);
    let listen = relay.url.trim_start_matches("http://").to_owned();

    let outputs = tokio::task::spawn_blocking(move || {
        let config = tempfile::tempdir().unwrap();
        let file = config.path().join("relay.toml");
        std::fs::write(&file, format!("[server]\nlisten = \"{listen}\"\n")).unwrap();
        let file = file.to_str().unwrap().to_owned();
        // What a health check may meet: no secrets at all, or a configuration the relay would
        // refuse for reasons that have nothing to do with the address.
        let broken = [
            ("RELAY_LOG__LEVEL", "verbose"),
            ("RELAY_ADMIN__TOKEN", "x"),
            ("RELAY_HEAP__APPID", "1"),
        ];
        let broken: Vec<(String, String)> = broken
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let listen_env = with(&broken, &[("RELAY_SERVER__LISTEN", &listen)]);
        [
            (
                "--url, empty environment",
                run_cli(&[], &["healthcheck", "--url", &ready]),
            ),
            (
                "RELAY_SERVER__LISTEN only",
                run_cli(&listen_env, &["healthcheck"]),
            ),
            (
                "--config with [server] only",
                run_cli(&broken, &["--config", &file, "healthcheck"]),
            ),
            (
                "nothing listening",
                run_cli(
                    &[],
                    &[
                        "healthcheck",
                        "--url",
                        &format!("http://127.0.0.1:{}/readyz", closed_port()),
                    ],
                ),
            ),
            (
                "a bad listen address",
                run_cli(
                    &[("RELAY_SERVER__LISTEN".into(), "8080".into())],
                    &["healthcheck"],
                ),
            ),
        ]
    })
    .await
    .unwrap();
    let [with_url, from_env, from_file, refused, bad] = outputs;
    for (label, output) in [with_url, from_env, from_file] {
        assert_eq!(
            output.status.code(),
            Some(0),
            "{label}: {}",
            stderr(&output)
        );
    }
    let (_, refused) = refused;
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        stderr(&refused).starts_with("not ready: "),
        "{}",
        stderr(&refused)
    );
    let (_, bad) = bad;
    assert_eq!(bad.status.code(), Some(1));
    assert_eq!(
        stderr(&bad),
        "error: configuration: `server.listen` must be an address and port, such as \
         `0.0.0.0:8080`\n"
    );
}

#[test]
fn the_probe_names_a_postgres_that_refuses_connections() {
    let dir = tempfile::tempdir().unwrap();
    let port = closed_port();
    let env = with(
        &clean_env(dir.path(), &format!("http://127.0.0.1:{}", closed_port())),
        &[
            ("RELAY_QUEUE__BACKEND", "postgres"),
            (
                "RELAY_QUEUE__POSTGRES_URL",
                &format!("postgres://relay:pg-sekrit-9@127.0.0.1:{port}/relay"),
            ),
        ],
    );
    let output = probe(&env, &[]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    let line = line_starting(&output, "probe: queue");
    assert!(
        line.starts_with("probe: queue failed: cannot open the queue (postgres): ")
            && line.ends_with(
                ". Fix: nothing listens at the host and port of `queue.postgres_url`: check \
                 them, and that Postgres is running"
            ),
        "{line}"
    );
    assert!(!stderr(&output).contains("pg-sekrit-9"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(postgres_tests), ignore = "needs RELAY_TEST_POSTGRES_URL")]
async fn the_probe_writes_to_a_reachable_postgres_queue() {
    let heap = FakeHeap::start().await;
    let schema = crate::support::postgres::Schema::fresh().await;
    let dir = tempfile::tempdir().unwrap();
    let env = with(
        &clean_env(dir.path(), &heap.url()),
        &[
            ("RELAY_QUEUE__BACKEND", "postgres"),
            ("RELAY_QUEUE__POSTGRES_URL", &schema.url),
        ],
    );
    let output = tokio::task::spawn_blocking(move || probe(&env, &[]))
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let line = line_starting(&output, "probe: queue ok: postgres, opened and written in ");
    eprintln!("{line}");
    // The readiness write landed in the schema the URL names.
    assert_eq!(
        schema
            .count("SELECT count(*) FROM {schema}.heartbeat")
            .await,
        1
    );
    schema.drop().await;
}

/// A staging source's two required variables, valid.
const STAGING: [(&str, &str); 2] = [
    (
        "RELAY_SOURCES__STAGING__SECRETS",
        "a-staging-secret-of-some-length",
    ),
    ("RELAY_SOURCES__STAGING__APP_ID", "2345678901"),
];

fn without(env: &[(String, String)], remove: &[&str]) -> Vec<(String, String)> {
    env.iter()
        .filter(|(k, _)| !remove.contains(&k.as_str()))
        .cloned()
        .collect()
}

const TOP_LEVEL: [&str; 2] = ["RELAY_USERPILOT__SECRETS", "RELAY_HEAP__APP_ID"];

/// Variables to set, variables to remove, and the one line of the refusal.
type SourceRefusal = (
    Vec<(&'static str, &'static str)>,
    &'static [&'static str],
    &'static str,
);

#[test]
fn each_source_refusal_is_one_line_in_exact_words_naming_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let base = clean_env(dir.path(), "http://127.0.0.1:1");
    let staging = |set: &[(&'static str, &'static str)]| -> Vec<(&'static str, &'static str)> {
        let mut env: Vec<_> = STAGING
            .into_iter()
            .filter(|(k, _)| !set.iter().any(|(s, _)| s == k))
            .collect();
        env.extend(set.iter().copied());
        env
    };
    let cases: Vec<SourceRefusal> = vec![
        (
            vec![
                (
                    "RELAY_SOURCES__DEFAULT__SECRETS",
                    "a-default-secret-of-some-length",
                ),
                ("RELAY_SOURCES__DEFAULT__APP_ID", "3456789012"),
            ],
            &[],
            "`sources.default` duplicates the source `default` that the top-level \
             userpilot.secrets and heap.app_id define: keep one of the two",
        ),
        (
            vec![
                (
                    "RELAY_SOURCES__STAGING-1__SECRETS",
                    "a-staging-secret-of-some-length",
                ),
                ("RELAY_SOURCES__STAGING-1__APP_ID", "2345678901"),
            ],
            &[],
            "`sources.staging-1` is not a valid source name: use 1 to 32 lower-case letters, \
             digits and `_`, starting with a letter or a digit",
        ),
        (
            vec![STAGING[1]],
            &[],
            "`sources.staging.secrets` is required: set at least one webhook secret \
             (RELAY_SOURCES__STAGING__SECRETS)",
        ),
        (
            staging(&[("RELAY_SOURCES__STAGING__SECRETS", "")]),
            &[],
            "`sources.staging.secrets` is required: set at least one webhook secret \
             (RELAY_SOURCES__STAGING__SECRETS)",
        ),
        (
            vec![STAGING[0]],
            // Named sources alone need no top-level keys: the refusal is the source's only.
            &TOP_LEVEL,
            "`sources.staging.app_id` is required: set the source's Heap environment id \
             (RELAY_SOURCES__STAGING__APP_ID)",
        ),
        (
            staging(&[(
                "RELAY_SOURCES__STAGING__SECRETS",
                "a-staging-secret-of-some-length,",
            )]),
            &[],
            "`sources.staging.secrets` contains an empty secret",
        ),
        (
            staging(&[("RELAY_SOURCES__STAGING__SECRETS", "REPLACE_ME")]),
            &[],
            "`sources.staging.secrets` secret 1 of 1 is a placeholder, not a secret: set the \
             webhook secret token from Userpilot",
        ),
        (
            staging(&[("RELAY_SOURCES__STAGING__APP_ID", "REPLACE_WITH_HEAP_APP_ID")]),
            &[],
            "`sources.staging.app_id` is a placeholder: set the source's Heap environment id \
             (RELAY_SOURCES__STAGING__APP_ID)",
        ),
        (
            staging(&[("RELAY_SOURCES__STAGING__TOLERANCE_SECS", "soon")]),
            &[],
            "`sources.staging.tolerance_secs` must be an integer, not string \"soon\"",
        ),
        (
            staging(&[("RELAY_SOURCES__STAGING__TOLERANCE_SECS", "604801")]),
            &[],
            "`queue.dedup_window_secs` must be at least sources.staging.tolerance_secs",
        ),
        (
            staging(&[("RELAY_SOURCES__STAGING__WRITE_KEY", "a-heap-write-key")]),
            &[],
            "unknown key `sources.staging.write_key`",
        ),
        (
            staging(&[("RELAY_SOURCES__STAGING__API_KEY", "REPLACE_ME")]),
            &[],
            "`sources.staging.api_key` is a placeholder, not an API key: set the Heap API key \
             of the app id (RELAY_SOURCES__STAGING__API_KEY), or leave it empty for local-only \
             erasures",
        ),
        (
            vec![("RELAY_SOURCES__STAGING", "yes")],
            &[],
            "`sources.staging` must be a table with `secrets` and `app_id` (from the \
             environment: RELAY_SOURCES__STAGING__SECRETS and RELAY_SOURCES__STAGING__APP_ID)",
        ),
    ];
    for (set, remove, expected) in &cases {
        let env = with(&without(&base, remove), set);
        let output = run_cli(&env, &["check-config"]);
        let text = stderr(&output);
        assert_eq!(output.status.code(), Some(1), "{set:?}: {text}");
        assert_eq!(
            text,
            format!("error: configuration: {expected}\n"),
            "{set:?}"
        );
        assert!(output.stdout.is_empty(), "{set:?}");
        for (key, value) in set {
            if (key.contains("SECRETS") || key.contains("API_KEY")) && !value.is_empty() {
                assert!(!text.contains(value), "{key} shown: {text}");
            }
        }
    }
    // The relay itself refuses the same way, before it opens the queue.
    let output = run_cli(&with(&base, &[STAGING[1]]), &[]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).starts_with("error: configuration: `sources.staging.secrets` is required"),
        "{}",
        stderr(&output)
    );
    assert!(!dir.path().join("queue.sqlite3").exists());
}

#[test]
fn no_source_at_all_is_refused_naming_both_top_level_keys_and_the_sources_tables() {
    let dir = tempfile::tempdir().unwrap();
    let env = without(&clean_env(dir.path(), "http://127.0.0.1:1"), &TOP_LEVEL);
    let output = run_cli(&env, &["check-config"]);
    assert_eq!(output.status.code(), Some(1));
    let why = "no source is configured: set the top-level keys (the source `default`) or add \
               [sources.<name>] tables";
    assert_eq!(
        stderr(&output),
        format!(
            "error: configuration: `heap.app_id` is required: set your Heap environment id \
             (RELAY_HEAP__APP_ID); {why}\n\
             error: configuration: `userpilot.secrets` is required: set at least one webhook \
             secret (RELAY_USERPILOT__SECRETS); {why}\n"
        )
    );
    // Half the pair: the missing key alone, even beside a named source.
    let output = run_cli(
        &with(&env, &[STAGING[0], STAGING[1], ("RELAY_HEAP__APP_ID", "1")]),
        &["check-config"],
    );
    assert_eq!(
        stderr(&output),
        "error: configuration: `userpilot.secrets` is required: set at least one webhook \
         secret (RELAY_USERPILOT__SECRETS); the other top-level key is set, which makes the \
         source `default`\n"
    );
}

#[test]
fn named_sources_alone_are_a_valid_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let env = with(
        &without(&clean_env(dir.path(), "http://127.0.0.1:1"), &TOP_LEVEL),
        &STAGING,
    );
    let output = run_cli(&env, &["check-config"]);
    assert_eq!(stderr(&output), "configuration is valid\n");
    assert_eq!(output.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let printed: toml::Table = stdout.parse().unwrap();
    // Unset, the top-level pair prints empty: it defines no source.
    assert_eq!(printed["heap"]["app_id"].as_str(), Some(""));
    assert!(stdout.contains("\n# Sources (1):\n"), "{stdout}");
    assert!(
        !stdout.contains("/webhooks/userpilot "),
        "a default source is listed: {stdout}"
    );
}

#[test]
fn suspicious_source_values_are_warned_about_naming_the_sources_key() {
    let dir = tempfile::tempdir().unwrap();
    let env = with(
        &clean_env(dir.path(), "http://127.0.0.1:1"),
        &[
            (
                "RELAY_SOURCES__STAGING__SECRETS",
                "a-staging-secret-of-some-length,short2",
            ),
            ("RELAY_SOURCES__STAGING__APP_ID", "staging-app"),
        ],
    );
    let output = run_cli(&env, &["check-config"]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(
        stderr(&output),
        "warning: configuration: `sources.staging.secrets` secret 2 of 2 is shorter than 16 \
         characters: choose a longer one in Userpilot at the next rotation\n\
         warning: configuration: `sources.staging.app_id` `staging-app` is not decimal digits, \
         as Heap environment ids are: Heap accepts an unknown id silently, so check it in Heap\n\
         configuration is valid\n"
    );
    assert!(!stderr(&output).contains("short2"));
}
