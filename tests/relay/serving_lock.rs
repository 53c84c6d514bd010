//! One relay per SQLite file (contract §4), with real processes: a second relay started on a
//! queue file that a running relay serves refuses to start, in one line naming the file and
//! the running relay's PID, and leaves that relay serving; `dlq` commands keep working beside
//! it; after the holder is killed with `kill -9` the lock it leaves behind blocks nothing.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::{BINARY, FakeHeap, RelayProcess, eventually, run_cli};

fn webhook(user: &str) -> serde_json::Value {
    json!({
        "timestamp": chrono::Utc::now().timestamp(),
        "data": { "type": "nps", "score": 9, "user": { "user_id": user } },
    })
}

/// Runs the relay with `env` and waits (at most 20 s, then kills it) for it to exit.
async fn run_until_exit(env: &[(String, String)]) -> (std::process::ExitStatus, String) {
    let mut child = Command::new(BINARY)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = eventually(Duration::from_secs(20), async || {
        child
            .try_wait()
            .unwrap()
            .ok_or("the second relay is still running")
    })
    .await;
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    (status, stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_relay_on_the_same_queue_file_refuses_naming_the_file_and_the_pid() {
    let heap = FakeHeap::start().await;
    let dir = tempfile::tempdir().unwrap();
    let env = RelayProcess::env(&heap, dir.path());
    let queue = dir.path().join("queue.sqlite3");
    let mut first = RelayProcess::spawn(&env);
    let pid = first.child.id();

    let started = Instant::now();
    let (status, stderr) = run_until_exit(&env).await;
    let refused_in = started.elapsed();
    assert!(!status.success(), "the second relay served: {stderr}");
    // One error line (configuration warnings, such as the tests' short secret, may precede it).
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|line| line.contains(r#""level":"ERROR""#))
        .collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    let line: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    let error = line["error"].as_str().unwrap_or_default();
    assert!(
        error.starts_with(&format!("queue file {} is in use", queue.display())),
        "{line}"
    );
    assert!(error.contains(&format!("(PID {pid})")), "{line}");
    eprintln!("second relay refused in {refused_in:?}: {error}");

    // The first relay still serves and forwards; `dlq` works beside it.
    let (code, _) = first.post(&webhook("lock-1")).await;
    assert_eq!(code, 202);
    heap.wait_for_events(1, Duration::from_secs(10)).await;
    let listed = run_cli(&env, &["dlq", "list"]);
    assert!(
        listed.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );

    // Killed with -9, it leaves its lock file (and its PID in it): the kernel released the
    // lock itself, so the next relay starts and delivers.
    first.kill();
    assert!(dir.path().join("queue.sqlite3.lock").exists());
    let next = RelayProcess::spawn(&env);
    let (code, _) = next.post(&webhook("lock-2")).await;
    assert_eq!(code, 202);
    heap.wait_for_events(2, Duration::from_secs(10)).await;
    let held = std::fs::read_to_string(dir.path().join("queue.sqlite3.lock")).unwrap();
    assert_eq!(held.trim(), next.child.id().to_string());
}
