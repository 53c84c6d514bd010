//! The transform workers of one configuration generation ([`Transforms`]): persistent child
//! processes of the relay's own binary, each holding every program of the generation,
//! compiled once when it starts. A run borrows an idle worker (or starts one), sends it the
//! payload and waits at most [`DEADLINE`]; a worker that overruns is killed (SIGKILL, through
//! `kill_on_drop`) and the next run starts a fresh one. So a program that never terminates,
//! overflows its stack or allocates without bound costs one worker, never a runtime thread,
//! the request path or the relay.
//!
//! At most [`max_workers`] run at once; a run waits at most [`WORKER_WAIT`] for one, then is
//! refused with [`PoolError::Busy`] (the webhook is answered 503, never 202, so nothing is
//! acknowledged and then lost). A reload builds a new `Transforms` (a new generation, with
//! the new programs); the old one's workers are killed when its last run is done with it.
//! Workers start with an empty environment (no secrets) and their standard error discarded.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::sync::Semaphore;

use super::worker::{MAGIC, NOT_AN_OBJECT, OK, RUN_ERROR};

/// The longest a run may take (contract §10), counted from when it has a worker.
pub const DEADLINE: Duration = Duration::from_millis(100);

/// The longest a run waits for a free worker before it is refused (503 + `Retry-After`).
pub const WORKER_WAIT: Duration = Duration::from_secs(1);

/// How long a new worker may take to start and compile the programs.
const START_DEADLINE: Duration = Duration::from_secs(10);

/// Workers that may run at once: twice the cores, at least 2 (a run mostly waits on a pipe,
/// and one spinning program must leave room for the others).
pub fn max_workers() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    (2 * cores).max(2)
}

/// Why a run produced no outputs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    /// The program's own error (runtime error, non-object output, too many outputs).
    #[error("{0}")]
    Run(String),
    /// The payload is not a JSON object: the sender's mistake.
    #[error("the payload is not a JSON object")]
    NotAnObject,
    #[error("the transform ran longer than {} ms; its worker was killed", DEADLINE.as_millis())]
    Deadline,
    #[error(
        "the transform worker died ({0}): a run that overflows its stack or its memory does that"
    )]
    Died(String),
    #[error("all {0} transform workers are busy")]
    Busy(usize),
    /// The relay could not start a worker: its own fault, not the program's.
    #[error("cannot start a transform worker: {0}")]
    Spawn(String),
}

impl PoolError {
    /// Whether the program is to blame (the webhook is quarantined as `transform_error`),
    /// rather than the payload or the relay.
    pub fn is_transform_error(&self) -> bool {
        matches!(
            self,
            PoolError::Run(_) | PoolError::Deadline | PoolError::Died(_)
        )
    }
}

/// How a worker process is started.
#[derive(Debug, Clone)]
pub struct WorkerCommand {
    program: PathBuf,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
}

/// The relay binary workers are started from, when it is not the running executable.
static WORKER_BINARY: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Starts workers from `binary` (the relay's executable) instead of the running one, for the
/// whole process: for tests that run the relay in-process, whose own executable (a test
/// harness) cannot serve as a worker. The first call wins.
pub fn use_worker_binary(binary: PathBuf) {
    let _ = WORKER_BINARY.set(binary);
}

impl WorkerCommand {
    /// `<this binary> transform-worker` (or the binary [`use_worker_binary`] named).
    pub fn relay() -> Self {
        let program = WORKER_BINARY
            .get()
            .cloned()
            .or_else(|| std::env::current_exe().ok())
            .unwrap_or_default();
        Self {
            program,
            args: vec!["transform-worker".into()],
            env: Vec::new(),
        }
    }

    /// The unit-test binary itself, running only the test that turns into a worker.
    #[cfg(test)]
    pub(crate) fn test_harness() -> Self {
        Self {
            program: std::env::current_exe().unwrap_or_default(),
            args: [
                "--exact",
                "transform::pool::tests::the_test_binary_serves_as_a_worker_when_asked",
                "--nocapture",
                "--test-threads=1",
            ]
            .map(OsString::from)
            .to_vec(),
            env: vec![(tests::AS_WORKER.into(), "1".into())],
        }
    }
}

impl Default for WorkerCommand {
    fn default() -> Self {
        #[cfg(test)]
        return Self::test_harness();
        #[cfg(not(test))]
        Self::relay()
    }
}

/// The workers of one configuration generation, shared by every webhook, replay and preview
/// under it. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Transforms {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    command: WorkerCommand,
    /// The handshake: the programs as a JSON array, a job names one by its index.
    programs: Vec<u8>,
    count: usize,
    idle: Mutex<Vec<Worker>>,
    permits: Semaphore,
    max: usize,
}

#[derive(Debug)]
struct Worker {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Default for Transforms {
    fn default() -> Self {
        Self::new(Vec::new())
    }
}

impl Transforms {
    /// The generation running `programs` (each already compiled once by the configuration's
    /// checks), started the default way; workers start when first needed.
    pub fn new(programs: Vec<String>) -> Self {
        Self::with_command(WorkerCommand::default(), programs, max_workers())
    }

    pub fn with_command(command: WorkerCommand, programs: Vec<String>, max: usize) -> Self {
        let count = programs.len();
        let programs = serde_json::to_vec(&programs).unwrap_or_default();
        let max = max.max(1);
        Self {
            inner: Arc::new(Inner {
                command,
                programs,
                count,
                idle: Mutex::new(Vec::new()),
                permits: Semaphore::new(max),
                max,
            }),
        }
    }

    /// How many programs this generation runs.
    pub fn len(&self) -> usize {
        self.inner.count
    }

    pub fn is_empty(&self) -> bool {
        self.inner.count == 0
    }

    /// Starts one worker in the background, so the first webhook does not wait for it.
    pub fn warm_up(&self) {
        if self.is_empty() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let inner = self.inner.clone();
        runtime.spawn(async move {
            if let Ok(worker) = inner.spawn().await {
                inner.put(worker);
            }
        });
    }

    /// Runs program `slot` on `payload` (the verified body as received); its outputs come
    /// back as the bytes of one JSON array of objects.
    pub async fn run(&self, slot: usize, payload: &[u8]) -> Result<Vec<u8>, PoolError> {
        let inner = &self.inner;
        let _permit = tokio::time::timeout(WORKER_WAIT, inner.permits.acquire())
            .await
            .map_err(|_| PoolError::Busy(inner.max))?
            .map_err(|_| PoolError::Busy(inner.max))?;
        let taken = inner.idle.lock().ok().and_then(|mut idle| idle.pop());
        let mut worker = match taken {
            Some(worker) => worker,
            None => inner.spawn().await?,
        };
        let slot = u32::try_from(slot).map_err(|_| PoolError::Run("no such program".into()))?;
        let job =
            frame(&[&slot.to_le_bytes(), payload]).map_err(|e| PoolError::Run(e.to_string()))?;
        let reply = tokio::time::timeout(DEADLINE, async {
            worker.stdin.write_all(&job).await?;
            read_reply(&mut worker.stdout).await
        })
        .await;
        match reply {
            Ok(Ok((OK, outputs))) => {
                inner.put(worker);
                Ok(outputs)
            }
            Ok(Ok((RUN_ERROR, text))) => {
                inner.put(worker);
                Err(PoolError::Run(String::from_utf8_lossy(&text).into_owned()))
            }
            Ok(Ok((NOT_AN_OBJECT, _))) => {
                inner.put(worker);
                Err(PoolError::NotAnObject)
            }
            Ok(Ok((status, _))) => {
                killed("died");
                Err(PoolError::Died(format!("unknown reply {status}")))
            }
            Ok(Err(_)) => {
                killed("died");
                // The pipe closed: the process is gone or going. Its status says how.
                let status = tokio::time::timeout(Duration::from_secs(1), worker.child.wait())
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .map_or_else(|| "no exit status".to_owned(), |s| s.to_string());
                Err(PoolError::Died(status))
            }
            Err(_) => {
                // Dropping `worker` kills it (`kill_on_drop`); tokio reaps it.
                killed("deadline");
                Err(PoolError::Deadline)
            }
        }
    }
}

fn killed(reason: &'static str) {
    // The webhook's own log line says it was quarantined; this one says a worker was lost.
    tracing::warn!(
        reason,
        "transform worker stopped; the next run starts a new one"
    );
    metrics::counter!("relay_transform_kills_total", "reason" => reason).increment(1);
}

impl Inner {
    fn put(&self, worker: Worker) {
        if let Ok(mut idle) = self.idle.lock() {
            idle.push(worker);
        }
    }

    async fn spawn(&self) -> Result<Worker, PoolError> {
        let spawn_error = |e: std::io::Error| PoolError::Spawn(e.to_string());
        let mut child = Command::new(&self.command.program)
            .args(&self.command.args)
            .env_clear()
            .envs(self.command.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(spawn_error)?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err(PoolError::Spawn("no pipes to the worker".into()));
        };
        let mut worker = Worker {
            child,
            stdin,
            stdout: BufReader::new(stdout),
        };
        let started = tokio::time::timeout(START_DEADLINE, async {
            write_frame(&mut worker.stdin, &self.programs).await?;
            skip_to_magic(&mut worker.stdout).await?;
            read_reply(&mut worker.stdout).await
        })
        .await;
        match started {
            Ok(Ok((OK, _))) => Ok(worker),
            Ok(Ok((_, text))) => Err(PoolError::Spawn(format!(
                "the worker refused the programs: {}",
                String::from_utf8_lossy(&text)
            ))),
            Ok(Err(e)) => Err(spawn_error(e)),
            Err(_) => Err(PoolError::Spawn(format!(
                "not ready within {} s",
                START_DEADLINE.as_secs()
            ))),
        }
    }
}

/// Reads up to and including [`MAGIC`]; what comes before it (a test harness's banner) is
/// not the worker's.
async fn skip_to_magic(r: &mut BufReader<ChildStdout>) -> std::io::Result<()> {
    let mut window = Vec::with_capacity(MAGIC.len());
    for _ in 0..64 * 1024 {
        let byte = r.read_u8().await?;
        if window.len() == MAGIC.len() {
            window.remove(0);
        }
        window.push(byte);
        if window == MAGIC {
            return Ok(());
        }
    }
    Err(std::io::Error::other("the worker did not identify itself"))
}

/// One frame holding `parts` one after the other, length first, in one buffer: written with
/// one `write`, so the worker wakes once per job, not once for the length and again for the
/// rest.
fn frame(parts: &[&[u8]]) -> std::io::Result<Vec<u8>> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let len = u32::try_from(len).map_err(std::io::Error::other)?;
    let mut frame = Vec::with_capacity(4 + len as usize);
    frame.extend_from_slice(&len.to_le_bytes());
    for part in parts {
        frame.extend_from_slice(part);
    }
    Ok(frame)
}

async fn write_frame(w: &mut ChildStdin, bytes: &[u8]) -> std::io::Result<()> {
    w.write_all(&frame(&[bytes])?).await
}

async fn read_reply(r: &mut BufReader<ChildStdout>) -> std::io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 5];
    r.read_exact(&mut head).await?;
    let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]) as usize;
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    Ok((head[0], body))
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::disallowed_methods)] // measures real elapsed time against the deadline
    use std::time::Instant;

    use super::*;

    /// Set in a worker's environment by [`WorkerCommand::test_harness`].
    pub(crate) const AS_WORKER: &str = "RELAY_TEST_TRANSFORM_WORKER";

    /// Not a test: the entry point of the test binary started as a transform worker.
    #[test]
    fn the_test_binary_serves_as_a_worker_when_asked() {
        if std::env::var_os(AS_WORKER).is_some() {
            let code = i32::from(super::super::worker::main().is_err());
            std::process::exit(code);
        }
        assert!(WorkerCommand::test_harness().program.exists());
    }

    fn pool(programs: &[&str], max: usize) -> Transforms {
        Transforms::with_command(
            WorkerCommand::test_harness(),
            programs.iter().map(|p| p.to_string()).collect(),
            max,
        )
    }

    #[tokio::test]
    async fn a_worker_runs_each_program_of_its_generation() {
        let transforms = pool(&["{a: .x}", "{b: .x}, {c: 1}"], 2);
        assert_eq!(
            transforms.run(0, br#"{"x": 1}"#).await.unwrap(),
            br#"[{"a":1}]"#
        );
        assert_eq!(
            transforms.run(1, br#"{"x": 2}"#).await.unwrap(),
            br#"[{"b":2},{"c":1}]"#
        );
        assert_eq!(transforms.run(0, b"[1]").await, Err(PoolError::NotAnObject));
    }

    #[tokio::test]
    async fn programs_that_never_end_are_killed_at_the_deadline_and_the_next_run_is_served() {
        let transforms = pool(&["def f: f; f", "until(false; .)", "."], 2);
        for slot in [0, 1] {
            // Start the worker first: the deadline counts from when a run has one.
            assert!(transforms.run(2, b"{}").await.is_ok());
            let started = Instant::now();
            assert_eq!(transforms.run(slot, b"{}").await, Err(PoolError::Deadline));
            let took = started.elapsed();
            assert!(
                took >= DEADLINE && took < DEADLINE * 3,
                "program {slot} stopped after {took:?}"
            );
            assert_eq!(
                transforms.run(2, br#"{"k":1}"#).await.unwrap(),
                br#"[{"k":1}]"#
            );
        }
    }

    #[tokio::test]
    async fn a_program_that_overflows_the_stack_kills_only_its_worker() {
        let transforms = pool(&["def f: 1 + f; f", "."], 2);
        let error = transforms.run(0, b"{}").await.unwrap_err();
        // A debug build recursing on a loaded machine can meet the deadline before the end of
        // its stack: either way that worker alone is killed.
        assert!(
            matches!(error, PoolError::Died(_) | PoolError::Deadline),
            "{error:?}"
        );
        assert!(error.is_transform_error());
        assert_eq!(
            transforms.run(1, br#"{"k":1}"#).await.unwrap(),
            br#"[{"k":1}]"#
        );
    }

    #[tokio::test]
    async fn a_program_that_allocates_without_bound_kills_only_its_worker() {
        // 2 GB at once, over the worker's 1 GiB address space: the allocation fails and the
        // worker aborts at once; `[range(1e9)]` grows slower and meets the deadline instead.
        let transforms = pool(&["{s: (\"x\" * 2000000000)}", "[range(1e9)] | {}", "."], 2);
        let error = transforms.run(0, b"{}").await.unwrap_err();
        assert!(matches!(error, PoolError::Died(_)), "{error:?}");
        let error = transforms.run(1, b"{}").await.unwrap_err();
        assert!(error.is_transform_error(), "{error:?}");
        assert_eq!(
            transforms.run(2, br#"{"k":1}"#).await.unwrap(),
            br#"[{"k":1}]"#
        );
    }

    #[tokio::test]
    async fn a_run_waits_a_bounded_time_for_a_worker_then_is_refused() {
        let transforms = pool(&["."], 1);
        // Another run holds the only worker.
        let _held = transforms.inner.permits.acquire().await.unwrap();
        let started = Instant::now();
        assert_eq!(transforms.run(0, b"{}").await, Err(PoolError::Busy(1)));
        let waited = started.elapsed();
        assert!(
            waited >= WORKER_WAIT && waited < WORKER_WAIT * 2,
            "{waited:?}"
        );
    }

    #[tokio::test]
    async fn workers_see_an_empty_environment() {
        let transforms = pool(&["{e: env}"], 1);
        assert_eq!(transforms.run(0, b"{}").await.unwrap(), br#"[{"e":{}}]"#);
    }

    #[tokio::test]
    async fn a_worker_that_cannot_start_is_the_relay_s_fault() {
        let command = WorkerCommand {
            program: "/nonexistent/relay".into(),
            args: Vec::new(),
            env: Vec::new(),
        };
        let transforms = Transforms::with_command(command, vec![".".into()], 1);
        let error = transforms.run(0, b"{}").await.unwrap_err();
        assert!(matches!(error, PoolError::Spawn(_)), "{error:?}");
        assert!(!error.is_transform_error());
    }
}
