//! The servers under test, as child processes: the relay binary (configured by environment
//! variables, as operators run it; its `[sources.NAME]` tables, when it has several sources, by
//! a `--config` file) and the baseline (this binary's `baseline` subcommand).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, Uri};
use serde_json::Value;
use tokio::time::Instant;

use crate::load::Client;

pub const SECRET: &str = "bench-secret";
pub const APP_ID: &str = "bench-app";
pub const ADMIN_TOKEN: &str = "bench-admin-token";
/// The relay's SQLite queue file, in its queue folder.
const QUEUE_FILE: &str = "queue.sqlite3";

/// One of the relay's sources (contract §9): served at `/webhooks/userpilot/{name}`, signed
/// with `secret`, forwarded to Heap app `app_id`.
#[derive(Debug, Clone)]
pub struct SourceSpec {
    pub name: String,
    pub secret: String,
    pub app_id: String,
    /// Its jq program (contract §10, Transform), if it has one.
    pub transform: Option<String>,
}

/// How a relay's sources are configured.
#[derive(Debug, Clone, Copy)]
pub enum Sources<'a> {
    /// The top-level keys (`RELAY_USERPILOT__SECRETS` = [`SECRET`], `RELAY_HEAP__APP_ID` =
    /// [`APP_ID`]): the one source `default`, at `/webhooks/userpilot`.
    Default,
    /// These `[sources.NAME]` tables, in a config file; no top-level keys.
    Named(&'a [SourceSpec]),
}

impl Sources<'_> {
    /// The relay's configuration file for these sources, if they need one.
    fn config_toml(&self) -> Option<String> {
        let Sources::Named(sources) = self else {
            return None;
        };
        // A JSON string is a valid TOML basic string (same quotes and escapes).
        let quote = |text: &str| Value::String(text.to_owned()).to_string();
        let mut toml = String::new();
        for source in *sources {
            toml.push_str(&format!(
                "[sources.{}]\nsecrets = [{}]\napp_id = {}\n",
                source.name,
                quote(&source.secret),
                quote(&source.app_id)
            ));
            if let Some(program) = &source.transform {
                toml.push_str(&format!("transform = {}\n", quote(program)));
            }
            toml.push('\n');
        }
        Some(toml)
    }
}

/// A server process this harness started; killed when dropped.
pub struct Server {
    pub name: &'static str,
    child: Child,
    pub pid: u32,
    /// `http://127.0.0.1:PORT`
    pub url: String,
    pub admin_url: Option<String>,
    log: PathBuf,
    /// The relay's SQLite queue file (not there when its queue is on Postgres).
    queue_file: Option<PathBuf>,
    /// The relay's queue folder; removed when dropped.
    _dir: Option<tempfile::TempDir>,
}

/// Environment variables that put the relay's queue on Postgres, in the database `url`
/// names (the relay creates its schema there at startup).
pub fn postgres_queue(url: &str) -> [(&'static str, String); 2] {
    [
        ("RELAY_QUEUE__BACKEND", "postgres".into()),
        ("RELAY_QUEUE__POSTGRES_URL", url.into()),
    ]
}

/// A free loopback port (bound, then released for the child to take).
fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl Server {
    /// The baseline: `relay-bench baseline` on a free port.
    pub async fn baseline(client: &Client, scratch: &Path) -> anyhow::Result<Server> {
        let port = free_port()?;
        let log = scratch.join("baseline.log");
        let child = Command::new(std::env::current_exe()?)
            .args(["baseline", "--listen", &format!("127.0.0.1:{port}")])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("cannot start the baseline")?;
        let server = Server {
            name: "baseline",
            pid: child.id(),
            child,
            url: format!("http://127.0.0.1:{port}"),
            admin_url: None,
            log,
            queue_file: None,
            _dir: None,
        };
        server.wait_ready(client).await?;
        Ok(server)
    }

    /// The relay binary with its queue in a fresh temporary folder, forwarding to `heap_url`.
    /// `extra` environment variables override the defaults set here (e.g. [`postgres_queue`]).
    pub async fn relay(
        client: &Client,
        binary: &Path,
        heap_url: &str,
        extra: &[(&str, String)],
        scratch: &Path,
    ) -> anyhow::Result<Server> {
        Self::relay_with(client, binary, heap_url, Sources::Default, extra, scratch).await
    }

    /// [`Server::relay`] with the given sources.
    pub async fn relay_with(
        client: &Client,
        binary: &Path,
        heap_url: &str,
        sources: Sources<'_>,
        extra: &[(&str, String)],
        scratch: &Path,
    ) -> anyhow::Result<Server> {
        let dir = tempfile::Builder::new()
            .prefix("relay-bench-queue")
            .tempdir_in(scratch)?;
        let (port, admin_port) = (free_port()?, free_port()?);
        let log = dir.path().join("relay.log");
        let setup = RelaySetup::new(dir.path(), port, admin_port, heap_url, sources, extra)?;
        let child = setup
            .command(binary, "serve")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        let server = Server {
            name: "relay",
            pid: child.id(),
            child,
            url: format!("http://127.0.0.1:{port}"),
            admin_url: Some(format!("http://127.0.0.1:{admin_port}")),
            log,
            queue_file: Some(dir.path().join(QUEUE_FILE)),
            _dir: Some(dir),
        };
        server.wait_ready(client).await?;
        Ok(server)
    }

    /// The same server under another name (in progress lines and the report).
    pub fn named(mut self, name: &'static str) -> Self {
        self.name = name;
        self
    }

    /// The relay's SQLite queue file, for reading its size beside it ([`crate::storage`]).
    pub fn queue_file(&self) -> anyhow::Result<PathBuf> {
        self.queue_file
            .clone()
            .with_context(|| format!("{} has no queue file", self.name))
    }

    pub fn webhook_uri(&self) -> anyhow::Result<Uri> {
        Ok(format!("{}/webhooks/userpilot", self.url).parse()?)
    }

    /// The webhook URL of source `name`.
    pub fn source_uri(&self, name: &str) -> anyhow::Result<Uri> {
        Ok(format!("{}/webhooks/userpilot/{name}", self.url).parse()?)
    }

    /// The status a POST without a signature gets at `uri`: 401 where a source is served,
    /// 404 where none is.
    pub async fn unsigned_post_status(&self, client: &Client, uri: &Uri) -> anyhow::Result<u16> {
        Ok(request(client, Method::POST, uri, None).await?.0)
    }

    /// Waits for `/readyz` to answer 200 (20 s at most).
    async fn wait_ready(&self, client: &Client) -> anyhow::Result<()> {
        let uri: Uri = format!("{}/readyz", self.url).parse()?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok((200, _)) = request(client, Method::GET, &uri, None).await {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not become ready within 20 s; log:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The server's stderr, as a file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The last lines of the server's stderr.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// An authorized admin request; returns the JSON answer.
    pub async fn admin(
        &self,
        client: &Client,
        method: Method,
        path: &str,
    ) -> anyhow::Result<Value> {
        let base = self.admin_url.as_deref().context("no admin port")?;
        let uri: Uri = format!("{base}{path}").parse()?;
        let (status, body) = request(client, method, &uri, Some(ADMIN_TOKEN)).await?;
        if status != 200 {
            bail!(
                "{path} answered {status}: {}",
                String::from_utf8_lossy(&body)
            );
        }
        Ok(serde_json::from_slice(&body)?)
    }

    /// Records waiting in the relay's queue (pending + in flight), from `/admin/status`.
    pub async fn unsent(&self, client: &Client) -> anyhow::Result<u64> {
        let status = self.admin(client, Method::GET, "/admin/status").await?;
        let count = |field: &str| status["queue"][field].as_u64().unwrap_or(0);
        Ok(count("pending") + count("in_flight"))
    }

    /// SIGTERM, then SIGKILL if it has not exited within 15 s.
    pub async fn stop(mut self) {
        if let Ok(pid) = i32::try_from(self.pid) {
            // SAFETY: signals our own child, by its id.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The relay's environment (and config file, for named sources) for a queue in `dir`.
struct RelaySetup {
    env: Vec<(String, String)>,
    config: Option<PathBuf>,
}

impl RelaySetup {
    fn new(
        dir: &Path,
        port: u16,
        admin_port: u16,
        heap_url: &str,
        sources: Sources<'_>,
        extra: &[(&str, String)],
    ) -> anyhow::Result<Self> {
        let mut env: Vec<(String, String)> = vec![
            ("RELAY_SERVER__LISTEN".into(), format!("127.0.0.1:{port}")),
            (
                "RELAY_SERVER__ADMIN_LISTEN".into(),
                format!("127.0.0.1:{admin_port}"),
            ),
            ("RELAY_HEAP__BASE_URL".into(), heap_url.into()),
            (
                "RELAY_QUEUE__PATH".into(),
                dir.join(QUEUE_FILE).display().to_string(),
            ),
            ("RELAY_ADMIN__TOKEN".into(), ADMIN_TOKEN.into()),
            ("RELAY_LOG__LEVEL".into(), "warn".into()),
        ];
        let config = match sources.config_toml() {
            None => {
                env.push(("RELAY_USERPILOT__SECRETS".into(), SECRET.into()));
                env.push(("RELAY_HEAP__APP_ID".into(), APP_ID.into()));
                None
            }
            Some(toml) => {
                let path = dir.join("sources.toml");
                std::fs::write(&path, toml)
                    .with_context(|| format!("cannot write {}", path.display()))?;
                Some(path)
            }
        };
        env.extend(
            extra
                .iter()
                .map(|(key, value)| (key.to_string(), value.clone())),
        );
        Ok(RelaySetup { env, config })
    }

    /// `binary [--config FILE] subcommand`, with this environment only.
    fn command(&self, binary: &Path, subcommand: &str) -> Command {
        let mut command = Command::new(binary);
        if let Some(config) = &self.config {
            command.arg("--config").arg(config);
        }
        command
            .arg(subcommand)
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        command
    }
}

/// Runs the relay's `check-config` with `sources`: `None` if it accepts the configuration, its
/// output if it refuses it.
pub fn check_config(
    binary: &Path,
    sources: Sources<'_>,
    scratch: &Path,
) -> anyhow::Result<Option<String>> {
    let dir = tempfile::Builder::new()
        .prefix("relay-bench-check")
        .tempdir_in(scratch)?;
    let setup = RelaySetup::new(
        dir.path(),
        free_port()?,
        free_port()?,
        "http://127.0.0.1:9",
        sources,
        &[],
    )?;
    let output = setup
        .command(binary, "check-config")
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {} check-config", binary.display()))?;
    if output.status.success() {
        return Ok(None);
    }
    Ok(Some(format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )))
}

/// One small request: status and body.
pub async fn request(
    client: &Client,
    method: Method,
    uri: &Uri,
    bearer: Option<&str>,
) -> anyhow::Result<(u16, Bytes)> {
    let mut builder = Request::builder().method(method).uri(uri.clone());
    if let Some(token) = bearer {
        builder = builder.header("authorization", format!("Bearer {token}"));
    }
    let request = builder.body(Full::new(Bytes::new()))?;
    let response = tokio::time::timeout(Duration::from_secs(10), client.request(request))
        .await
        .context("timed out")??;
    let status = response.status().as_u16();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, body))
}
