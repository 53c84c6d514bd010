//! The SQLite queue file removed or broken under the relay binary. Removed while it runs (an
//! operator's `rm`, a volume mounted over the folder): SQLite would go on committing into the
//! unlinked file and everything acknowledged from then on would be gone at the next start, so
//! the relay must stop acknowledging — `/readyz` 503 within the readiness cache, and no 2xx for
//! any webhook sent after the removal — and say so in one ERROR line. Overwritten (not an
//! SQLite file any more): the relay must refuse to start, naming the file.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::support::{BINARY, FakeHeap, RelayProcess};
use serde_json::Value;

/// Concurrent senders, as Userpilot's delivery workers would be.
const POSTERS: usize = 4;

fn webhook(seq: usize) -> Value {
    crate::support::flow_started("removed", seq)
}

async fn readyz(http: &reqwest::Client, url: &str) -> u16 {
    http.get(format!("{url}/readyz"))
        .send()
        .await
        .map(|response| response.status().as_u16())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_file_removed_under_load_turns_readiness_503_and_nothing_sent_after_gets_a_2xx() {
    let heap = FakeHeap::start().await;
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::spawn(&RelayProcess::env(&heap, dir.path()));
    let http = reqwest::Client::new();
    assert_eq!(readyz(&http, &relay.url).await, 200);

    // Webhooks under concurrent load; each answer noted with the time its request was sent.
    let stop = Arc::new(AtomicBool::new(false));
    let next = Arc::new(AtomicUsize::new(0));
    let accepted = Arc::new(AtomicUsize::new(0));
    let mut posters = tokio::task::JoinSet::new();
    for _ in 0..POSTERS {
        let client = relay.with_timeout(Duration::from_secs(30));
        let (stop, next, accepted) = (stop.clone(), next.clone(), accepted.clone());
        posters.spawn(async move {
            let mut answers: Vec<(Instant, u16)> = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                let seq = next.fetch_add(1, Ordering::SeqCst);
                let sent = Instant::now();
                let status = match client.try_post(&webhook(seq)).await {
                    Ok((status, _)) => status,
                    Err(_) => 0,
                };
                if status == 202 {
                    accepted.fetch_add(1, Ordering::SeqCst);
                }
                answers.push((sent, status));
            }
            answers
        });
    }
    crate::support::eventually(Duration::from_secs(10), async || {
        (accepted.load(Ordering::SeqCst) >= 200).then_some(())
    })
    .await;

    for suffix in ["", "-wal", "-shm"] {
        let file = dir.path().join(format!("queue.sqlite3{suffix}"));
        std::fs::remove_file(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    }
    let removed_at = Instant::now();

    // Readiness: at most the 1 s readiness cache, plus the check itself.
    let not_ready_within = loop {
        let status = readyz(&http, &relay.url).await;
        if status == 503 {
            break removed_at.elapsed();
        }
        assert_eq!(status, 200, "readyz answered {status}");
        assert!(
            removed_at.elapsed() < Duration::from_secs(2),
            "/readyz still 200 two seconds after the queue file was removed"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    // Keep the load on a little longer, then look at every answer.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    let answers: Vec<(Instant, u16)> = posters.join_all().await.into_iter().flatten().collect();

    let before: Vec<u16> = answers
        .iter()
        .filter(|(sent, _)| *sent < removed_at)
        .map(|(_, status)| *status)
        .collect();
    let after: Vec<u16> = answers
        .iter()
        .filter(|(sent, _)| *sent > removed_at)
        .map(|(_, status)| *status)
        .collect();
    eprintln!(
        "readyz 503 after {not_ready_within:?}; {} webhooks sent before the removal ({} answered \
         202), {} after",
        before.len(),
        before.iter().filter(|s| **s == 202).count(),
        after.len()
    );
    assert!(before.iter().filter(|s| **s == 202).count() >= 200);
    assert!(after.len() >= POSTERS, "the load went on after the removal");
    let acknowledged: Vec<&u16> = after.iter().filter(|s| (200..300).contains(*s)).collect();
    assert!(
        acknowledged.is_empty(),
        "{} webhooks sent after the removal were acknowledged",
        acknowledged.len()
    );
    assert!(after.iter().all(|s| *s == 503), "{after:?}");

    // It stays that way, and the operator is told once.
    let (status, _) = relay.post(&webhook(usize::MAX)).await;
    assert_eq!(status, 503);
    assert_eq!(readyz(&http, &relay.url).await, 503);
    let errors: Vec<String> = relay
        .logs()
        .into_iter()
        .filter(|line| line.contains("\"ERROR\"") && line.contains("queue file removed"))
        .collect();
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert!(errors[0].contains("restart the relay"), "{}", errors[0]);
    assert!(
        errors[0].contains(&dir.path().join("queue.sqlite3").display().to_string()),
        "{}",
        errors[0]
    );
}

#[test]
fn a_queue_file_whose_header_was_overwritten_stops_the_relay_at_start_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("queue.sqlite3");
    // A real SQLite file, closed, then its 100-byte header overwritten.
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute_batch("CREATE TABLE t (x INTEGER); INSERT INTO t VALUES (1);")
        .unwrap();
    drop(conn);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[..100].fill(b'x');
    std::fs::write(&path, bytes).unwrap();

    let heap_url = "http://127.0.0.1:9"; // never reached: the relay must not get that far
    let mut child = Command::new(BINARY)
        .env_clear()
        .envs([
            ("RELAY_SERVER__LISTEN", "127.0.0.1:0"),
            ("RELAY_SERVER__ADMIN_LISTEN", "127.0.0.1:0"),
            ("RELAY_USERPILOT__SECRETS", crate::support::SECRET),
            ("RELAY_HEAP__APP_ID", crate::support::APP_ID),
            ("RELAY_HEAP__BASE_URL", heap_url),
            ("RELAY_ADMIN__TOKEN", crate::support::ADMIN_TOKEN),
        ])
        .env("RELAY_QUEUE__PATH", &path)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("the relay started on a queue file that is not an SQLite database");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success(), "{stderr}");
    assert!(stderr.contains(&path.display().to_string()), "{stderr}");
    assert!(stderr.contains("not a database"), "{stderr}");
}
