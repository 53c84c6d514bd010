//! `check-config [--probe]`: the effective configuration, secrets redacted, on standard output,
//! then every source it serves (name, URL path, app id, how many secrets, tolerance, identity,
//! transform) and each source's transform program, compiled again here (it is not a secret),
//! as TOML comments, so the output stays a configuration file; its warnings and verdict on
//! standard error. A configuration that does not load never gets
//! here: `main` prints each of its problems on a line of its own (exit code 1).
//!
//! `--probe` then tries what the relay will need from its surroundings, in plain words with
//! the fix (contract §6): the queue folder is writable and the queue takes a write (the
//! readiness round trip), and Heap's base URL resolves, connects and answers one `HEAD`
//! request. It sends no events. It opens the queue as the relay does: it may create the folder
//! and the file, and it migrates a queue of an older schema.

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use userpilot_heap_relay::app;
use userpilot_heap_relay::clock::Stopwatch;
use userpilot_heap_relay::config::{Backend, DEFAULT_SOURCE, Settings, SourceSettings};
use userpilot_heap_relay::transform;

/// The exit code when the configuration is valid but a probe failed.
const PROBE_FAILED: u8 = 2;

/// The longest one probe step (a DNS lookup, a connect, the queue's write) may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(5);

pub async fn run(settings: &Settings, probe: bool) -> anyhow::Result<ExitCode> {
    print!("{}", settings.to_redacted_toml());
    print!("{}", source_summary(&settings.sources()));
    print!("{}", transform_summary(&settings.sources())?);
    for warning in settings.warnings() {
        eprintln!("warning: {warning}");
    }
    eprintln!("configuration is valid");
    if !probe {
        return Ok(ExitCode::SUCCESS);
    }
    // Both probes run whatever the first found: an operator fixes everything in one go.
    let results = [
        ("queue", probe_queue(settings).await),
        ("heap", probe_heap(settings).await),
    ];
    let mut failed = false;
    for (name, result) in results {
        match result {
            Ok(passed) => eprintln!("probe: {name} ok: {passed}"),
            Err(failure) => {
                failed = true;
                eprintln!("probe: {name} failed: {failure}");
            }
        }
    }
    Ok(if failed {
        ExitCode::from(PROBE_FAILED)
    } else {
        ExitCode::SUCCESS
    })
}

/// The sources as an aligned table of TOML comments. Secrets are counted, never shown.
fn source_summary(sources: &[SourceSettings]) -> String {
    let header = [
        "name",
        "path",
        "app_id",
        "secrets",
        "tolerance_secs",
        "identity",
        "transform",
    ];
    let mut rows = vec![header.map(str::to_owned)];
    for source in sources {
        rows.push([
            source.name.to_string(),
            source.path(),
            source.app_id.to_string(),
            source.secrets.len().to_string(),
            source.tolerance.as_secs().to_string(),
            source.identity.clone(),
            match source.transform.as_deref() {
                None => "none".to_owned(),
                Some(code) if transform::is_identity(code) => "identity".to_owned(),
                Some(_) => "jq".to_owned(),
            },
        ]);
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|column| {
            rows.iter()
                .map(|row| row[column].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut text = format!("\n# Sources ({}):\n", sources.len());
    for row in &rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        text.push_str(&format!("#   {}\n", cells.join("  ").trim_end()));
    }
    if sources.iter().any(|s| s.name.as_str() == DEFAULT_SOURCE) {
        text.push_str(&format!(
            "# ({DEFAULT_SOURCE} also answers at /webhooks/userpilot/{DEFAULT_SOURCE})\n"
        ));
    }
    text
}

/// Each source's jq program, as TOML comments, after compiling it (a configuration that loads
/// has programs that compile, so an error here would be the relay's own bug).
fn transform_summary(sources: &[SourceSettings]) -> anyhow::Result<String> {
    let mut text = String::new();
    for source in sources {
        let Some(code) = source.transform.as_deref() else {
            continue;
        };
        transform::compile(code)
            .map_err(|error| anyhow::anyhow!("source `{}`: {error}", source.name))?;
        text.push_str(&format!(
            "\n# Transform of `{}` (compiles{}):\n",
            source.name,
            if transform::is_identity(code) {
                "; `.` is the identity: no worker runs"
            } else {
                ""
            }
        ));
        for line in code.lines() {
            text.push_str(&format!("#   {line}\n").replace("#   \n", "#\n"));
        }
    }
    Ok(text)
}

/// What a probe found wrong, and what to do about it.
#[derive(Debug)]
struct Failure {
    what: String,
    fix: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}. Fix: {}", self.what, self.fix)
    }
}

fn failure(what: impl Into<String>, fix: impl Into<String>) -> Failure {
    Failure {
        what: what.into(),
        fix: fix.into(),
    }
}

async fn probe_queue(settings: &Settings) -> Result<String, Failure> {
    let described = match settings.queue.backend {
        Backend::Sqlite => {
            check_queue_folder(&settings.queue.path)?;
            format!("sqlite {}", settings.queue.path.display())
        }
        Backend::Postgres => "postgres".to_owned(),
    };
    let watch = Stopwatch::start();
    let queue = app::open_queue(settings).await.map_err(|error| {
        failure(
            format!("cannot open the queue ({described}): {error}"),
            open_fix(settings.queue.backend, &error.to_string()),
        )
    })?;
    match tokio::time::timeout(STEP_TIMEOUT, queue.ping()).await {
        Ok(Ok(())) => Ok(format!(
            "{described}, opened and written in {} ms",
            watch.elapsed().as_millis()
        )),
        Ok(Err(error)) => Err(failure(
            format!("the queue ({described}) refused a write: {error}"),
            "see the error: the disk may be full or the file damaged",
        )),
        Err(_) => Err(failure(
            format!(
                "the queue ({described}) took more than {} s to take a write",
                STEP_TIMEOUT.as_secs()
            ),
            "see whether the disk or the database is overloaded or locked",
        )),
    }
}

/// The fix for a queue that does not open, from the error's words.
fn open_fix(backend: Backend, error: &str) -> String {
    let error = error.to_lowercase();
    match backend {
        Backend::Sqlite if error.contains("not a database") => {
            "`queue.path` names a file that is not a relay queue: point it at another file".into()
        }
        Backend::Sqlite => "see the error; `queue.path` names the file".into(),
        Backend::Postgres if error.contains("password") || error.contains("authentication") => {
            "check the user and password in `queue.postgres_url`".into()
        }
        Backend::Postgres if error.contains("refused") => {
            "nothing listens at the host and port of `queue.postgres_url`: check them, and \
             that Postgres is running"
                .into()
        }
        Backend::Postgres => "check `queue.postgres_url` (host, port, database, sslmode)".into(),
    }
}

/// The SQLite queue's folder exists (or can be made) and takes a new file, as SQLite needs for
/// its `-wal` and `-shm` files, and the file itself, if there, can be written. Done with the
/// plain file system first, so the answer can name the folder and the cause.
fn check_queue_folder(path: &Path) -> Result<(), Failure> {
    let folder = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_owned(),
        _ => PathBuf::from("."),
    };
    if let Some(file) = folder.ancestors().find(|a| a.exists() && !a.is_dir()) {
        return Err(failure(
            format!(
                "`queue.path` {} is under {}, which is a file, not a folder",
                path.display(),
                file.display()
            ),
            "set queue.path to a file inside a folder, or move that file away",
        ));
    }
    if let Err(error) = std::fs::create_dir_all(&folder) {
        return Err(io_failure(
            &format!("cannot create the queue folder {}", folder.display()),
            &folder,
            &error,
        ));
    }
    let trial = folder.join(format!(
        ".userpilot-heap-relay-probe-{}",
        std::process::id()
    ));
    // Left over by a probe of the same process id that was killed midway, if it exists.
    let _ = std::fs::remove_file(&trial);
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&trial);
    match written {
        Ok(_) => {
            let _ = std::fs::remove_file(&trial);
        }
        Err(error) => {
            return Err(io_failure(
                &format!(
                    "cannot create files in the queue folder {}",
                    folder.display()
                ),
                &folder,
                &error,
            ));
        }
    }
    if path.exists()
        && let Err(error) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
    {
        return Err(io_failure(
            &format!("cannot write the queue file {}", path.display()),
            &folder,
            &error,
        ));
    }
    Ok(())
}

/// A file-system error in plain words, with the fix for the usual causes.
fn io_failure(doing: &str, folder: &Path, error: &std::io::Error) -> Failure {
    let folder = folder.display();
    match error.kind() {
        ErrorKind::PermissionDenied => failure(
            format!("{doing}: permission denied (the relay runs as {})", user()),
            format!(
                "give that user write access to {folder} (chown or chmod; in Kubernetes, \
                 securityContext.fsGroup), or set queue.path to a folder it can write"
            ),
        ),
        ErrorKind::ReadOnlyFilesystem => failure(
            format!("{doing}: the file system is read-only"),
            format!(
                "mount a writable volume at {folder} (a container's own file system is often \
                 read-only), or set queue.path to a folder on one"
            ),
        ),
        ErrorKind::NotADirectory => failure(
            format!("{doing}: part of the path is a file, not a folder"),
            "set queue.path to a file inside a folder",
        ),
        ErrorKind::StorageFull => failure(
            format!("{doing}: the disk is full"),
            format!("free space on the volume of {folder}, or give it a larger one"),
        ),
        _ => failure(
            format!("{doing}: {error}"),
            "set queue.path to a folder the relay can write",
        ),
    }
}

/// This process's user, as `uid N` (from `/proc/self`, which it owns).
fn user() -> String {
    match std::fs::metadata("/proc/self") {
        Ok(metadata) => format!("uid {}", metadata.uid()),
        Err(_) => "its current user".to_owned(),
    }
}

async fn probe_heap(settings: &Settings) -> Result<String, Failure> {
    let url = &settings.heap.base_url;
    let (Some(host), Some(port)) = (url.host_str(), url.port_or_known_default()) else {
        return Err(failure(
            format!("`heap.base_url` {url} names no host"),
            "set heap.base_url to https://heapanalytics.com (US) or https://c.eu.heap-api.com (EU)",
        ));
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    // Through a proxy the relay never resolves or connects to Heap itself: only the request
    // tells.
    let route = match proxy_variable(url.scheme()) {
        Some(variable) => format!("through the proxy in {variable}"),
        None => {
            let addr = connect(host, port).await?;
            format!("connected to {addr}")
        }
    };
    let client = userpilot_heap_relay::tls::http_client()
        .timeout(settings.heap.timeout)
        .connect_timeout(settings.heap.timeout.min(STEP_TIMEOUT))
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("userpilot-heap-relay/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| failure(format!("cannot build an HTTP client: {e}"), "report this"))?;
    let watch = Stopwatch::start();
    match client.head(url.clone()).send().await {
        Ok(response) => Ok(format!(
            "{url}: {route}, HEAD answered {} in {} ms",
            response.status().as_u16(),
            watch.elapsed().as_millis()
        )),
        Err(error) => Err(failure(
            format!(
                "`heap.base_url` {url}: {route}, but the HEAD request failed: {}",
                chain(&error)
            ),
            if url.scheme() == "https" {
                "a TLS failure means the system's CA certificates are missing or a proxy \
                 intercepts TLS; a timeout, that egress drops the traffic"
            } else {
                "see the error; check heap.base_url"
            },
        )),
    }
}

/// Resolves `host` and connects to the first address that answers.
async fn connect(host: &str, port: u16) -> Result<SocketAddr, Failure> {
    let base = "`heap.base_url`";
    let resolved = tokio::time::timeout(STEP_TIMEOUT, tokio::net::lookup_host((host, port))).await;
    let addrs: Vec<SocketAddr> = match resolved {
        Ok(Ok(addrs)) => addrs.collect(),
        Ok(Err(error)) => {
            return Err(failure(
                format!("{base}: cannot resolve {host}: {error}"),
                "check the host name in heap.base_url, and that this machine (or pod) has DNS \
                 and may reach the internet",
            ));
        }
        Err(_) => {
            return Err(failure(
                format!(
                    "{base}: no DNS answer for {host} within {} s",
                    STEP_TIMEOUT.as_secs()
                ),
                "check the DNS this machine (or pod) uses",
            ));
        }
    };
    let mut last = None;
    for addr in &addrs {
        match tokio::time::timeout(STEP_TIMEOUT, tokio::net::TcpStream::connect(addr)).await {
            Ok(Ok(_)) => return Ok(*addr),
            Ok(Err(error)) => last = Some(connect_failure(*addr, &error)),
            Err(_) => {
                last = Some(failure(
                    format!(
                        "{base}: {addr} did not answer within {} s",
                        STEP_TIMEOUT.as_secs()
                    ),
                    "a firewall or an egress rule (a Kubernetes NetworkPolicy) drops the \
                     traffic: allow outgoing connections to Heap",
                ));
            }
        }
    }
    Err(last.unwrap_or_else(|| {
        failure(
            format!("{base}: {host} resolved to no address"),
            "check the host name in heap.base_url",
        )
    }))
}

fn connect_failure(addr: SocketAddr, error: &std::io::Error) -> Failure {
    let base = "`heap.base_url`";
    match error.kind() {
        ErrorKind::ConnectionRefused => failure(
            format!("{base}: {addr} refused the connection"),
            "nothing listens there: check the host and port in heap.base_url",
        ),
        ErrorKind::NetworkUnreachable | ErrorKind::HostUnreachable => failure(
            format!("{base}: {addr} is unreachable ({error})"),
            "this machine (or pod) has no route there: check its network and egress",
        ),
        _ => failure(
            format!("{base}: cannot connect to {addr}: {error}"),
            "check heap.base_url and the network",
        ),
    }
}

/// The proxy variable reqwest would use for `scheme`, if one is set.
fn proxy_variable(scheme: &str) -> Option<&'static str> {
    let names: &[&'static str] = if scheme == "https" {
        &["HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"]
    } else {
        &["HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"]
    };
    names
        .iter()
        .copied()
        .find(|name| std::env::var_os(name).is_some_and(|v| !v.is_empty()))
}

/// An error and its causes on one line (reqwest's own text leaves out the cause).
fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
