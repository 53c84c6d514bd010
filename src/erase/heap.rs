//! The Heap part of erasures (contract §12): asks Heap to delete the users of recorded
//! erasures whose source has an `api_key` — an auth token with Basic `app_id:api_key`, then
//! one `user_deletion` request per app id for up to 10,000 users — retries failures like
//! events, and follows each request's `deletion_status` until Heap says it is complete.
//! The work is in the queue (`erasures`), so a restart resumes it.
//!
//! One pass ([`HeapEraser::run_once`]) reads in order: claim the due erasures with a lease →
//! [`plan`] them into [`Job`]s (pure: grouping, the api key in force, the 10,000 cap) → each
//! job's Heap calls ([`Deleter::execute`]) → [`decide`] (pure: Heap's answer to an
//! [`ErasureUpdate`]) → `update_erasure` → one `scrub` once an identity was cleared, so the
//! identity kept for Heap is gone from the queue's files too.
//!
//! The api key is the source's CURRENT one (a reload applies a new key to erasures already
//! queued), used with the app id recorded with the erasure: if the source moved to another
//! app id since, Heap judges the pair (a refusal fails the erasure with Heap's reason).
//!
//! What it must never do: log or store an identity, an api key or a token. Logs name an
//! erasure by its source and app id; [`crate::heap::deletion`] masks them out of Heap's
//! messages.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::clock::{Clock, Stopwatch};
use crate::config::Settings;
use crate::forwarder::retry::Backoff;
use crate::heap::deletion::{AuthToken, DeletionClient, DeletionError, DeletionStatus, MAX_USERS};
use crate::queue::{ErasureRow, ErasureState, ErasureUpdate, Queue, QueueError};
use crate::secret::Secret;
use crate::sources::Sources;

/// The longest wait between passes: an erasure recorded by a CLI `erase` beside the relay
/// (which cannot wake this task) is picked up within it.
pub const MAX_WAIT: Duration = Duration::from_secs(1);

/// The shortest wait between passes, so that work another replica holds cannot spin this one.
const MIN_WAIT: Duration = Duration::from_millis(50);

/// The shortest lease on claimed erasures. A pass starts no Heap call that could end after
/// its lease; what is left is handed back, due at once.
const MIN_LEASE: Duration = Duration::from_secs(300);

/// How long an auth token is reused within a pass: Heap's last five minutes.
const TOKEN_REUSE: Duration = Duration::from_secs(240);

/// How often a queue that keeps failing is warned about.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// `[retry]` and `[heap]` as erasures use them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EraserConfig {
    /// Between failed attempts, exponential on an erasure's `attempts`.
    pub backoff: Backoff,
    /// Between status checks of an accepted deletion request (`retry.max_backoff_ms`).
    pub poll: Duration,
    /// The longest a Heap call takes (`heap.timeout_ms`).
    pub timeout: Duration,
    /// How long claimed erasures are this process's.
    pub lease: Duration,
}

impl EraserConfig {
    pub fn from_settings(settings: &Settings) -> Self {
        let timeout = settings.heap.timeout;
        Self {
            backoff: Backoff {
                initial: settings.retry.initial_backoff,
                max: settings.retry.max_backoff,
            },
            poll: settings.retry.max_backoff,
            timeout,
            lease: MIN_LEASE.max(timeout.saturating_mul(10)),
        }
    }
}

/// An erasure as a job carries it. Its `Debug` hides the identity.
#[derive(Clone, PartialEq)]
pub struct Due {
    pub id: i64,
    /// Failed attempts so far: the backoff's exponent.
    pub attempts: u32,
    /// Present for a deletion still to request.
    pub identity: Option<String>,
}

impl std::fmt::Debug for Due {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Due")
            .field("id", &self.id)
            .field("attempts", &self.attempts)
            .field("identity", &self.identity.as_ref().map(|_| "[redacted]"))
            .finish()
    }
}

impl From<ErasureRow> for Due {
    fn from(row: ErasureRow) -> Self {
        Due {
            id: row.id,
            attempts: row.attempts,
            identity: row.identity,
        }
    }
}

/// One piece of a pass's work.
#[derive(Debug, Clone, PartialEq)]
pub enum Job {
    /// Ask Heap to delete the users of these erasures (at most [`MAX_USERS`]), all of one
    /// source and app id.
    Request {
        app_id: String,
        source: String,
        api_key: Secret,
        erasures: Vec<Due>,
    },
    /// Ask Heap where deletion request `deletion_request_id` stands; these erasures wait for
    /// it.
    Check {
        app_id: String,
        source: String,
        api_key: Secret,
        deletion_request_id: String,
        erasures: Vec<Due>,
    },
    /// Heap cannot be asked: these erasures fail with `reason`.
    Fail {
        app_id: String,
        source: String,
        reason: String,
        erasures: Vec<Due>,
    },
}

impl Job {
    pub fn erasures(&self) -> &[Due] {
        match self {
            Job::Request { erasures, .. }
            | Job::Check { erasures, .. }
            | Job::Fail { erasures, .. } => erasures,
        }
    }

    fn into_erasures(self) -> Vec<Due> {
        match self {
            Job::Request { erasures, .. }
            | Job::Check { erasures, .. }
            | Job::Fail { erasures, .. } => erasures,
        }
    }

    fn calls_heap(&self) -> bool {
        !matches!(self, Job::Fail { .. })
    }
}

/// Turns claimed erasures into jobs, using `sources` (the snapshot in force) for the api keys:
/// deletions to request grouped by (app id, source) and cut at [`MAX_USERS`], status checks
/// grouped by deletion request. Failures first (they call nobody), then requests (the
/// newest work), then checks. Rows that are not due Heap work (a backend's mistake) are left
/// alone.
pub fn plan(rows: Vec<ErasureRow>, sources: &Sources) -> Vec<Job> {
    let mut requests: BTreeMap<(String, String), Vec<Due>> = BTreeMap::new();
    let mut checks: BTreeMap<(String, String, String), Vec<Due>> = BTreeMap::new();
    let mut fails = Vec::new();
    for row in rows {
        let Some(app_id) = row.heap_app_id.clone() else {
            continue;
        };
        match row.state {
            ErasureState::LocalDone if row.identity.is_some() => {
                requests
                    .entry((app_id, row.source.clone()))
                    .or_default()
                    .push(row.into());
            }
            ErasureState::HeapPending => match row.deletion_request_id.clone() {
                Some(id) => checks
                    .entry((app_id, row.source.clone(), id))
                    .or_default()
                    .push(row.into()),
                None => fails.push(Job::Fail {
                    app_id,
                    source: row.source.clone(),
                    reason: "no deletion request id was recorded: its status cannot be checked"
                        .into(),
                    erasures: vec![row.into()],
                }),
            },
            _ => {}
        }
    }
    let key_of = |source: &str| {
        sources
            .get(source)
            .and_then(|source| source.api_key.clone())
            .filter(|key| !key.is_empty())
    };
    let mut jobs = fails;
    let mut later = Vec::new();
    for ((app_id, source), erasures) in requests {
        let Some(api_key) = key_of(&source) else {
            jobs.push(Job::Fail {
                reason: no_key(&source, "Heap was not asked to delete the user"),
                app_id,
                source,
                erasures,
            });
            continue;
        };
        for chunk in erasures.chunks(MAX_USERS) {
            later.push(Job::Request {
                app_id: app_id.clone(),
                source: source.clone(),
                api_key: api_key.clone(),
                erasures: chunk.to_vec(),
            });
        }
    }
    for ((app_id, source, deletion_request_id), erasures) in checks {
        let Some(api_key) = key_of(&source) else {
            jobs.push(Job::Fail {
                reason: no_key(
                    &source,
                    &format!(
                        "Heap accepted deletion request `{deletion_request_id}`, \
                         whose status cannot be checked"
                    ),
                ),
                app_id,
                source,
                erasures,
            });
            continue;
        };
        later.push(Job::Check {
            app_id,
            source,
            api_key,
            deletion_request_id,
            erasures,
        });
    }
    jobs.extend(later);
    jobs
}

fn no_key(source: &str, consequence: &str) -> String {
    format!("source `{source}` has no api_key any more: {consequence}")
}

/// What Heap said yes to.
#[derive(Debug, Clone, PartialEq)]
pub enum HeapAnswer {
    /// `user_deletion` answered `201` with this id.
    Requested(String),
    /// `deletion_status` of this request.
    Status {
        deletion_request_id: String,
        status: DeletionStatus,
    },
}

/// The update one Heap outcome means for an erasure that had failed `attempts` times, at
/// `now_ms`; `jitter` in `[0, 1)` picks the backoff (full jitter), which is never shorter
/// than `retry.initial_backoff_ms` and follows Heap's `Retry-After`.
pub fn decide(
    outcome: &Result<HeapAnswer, DeletionError>,
    attempts: u32,
    now_ms: i64,
    config: &EraserConfig,
    jitter: f64,
) -> ErasureUpdate {
    match outcome {
        Ok(HeapAnswer::Requested(id)) => ErasureUpdate::Requested {
            deletion_request_id: id.clone(),
            check_at_ms: now_ms.saturating_add(millis(config.poll)),
        },
        Ok(HeapAnswer::Status {
            deletion_request_id,
            status,
        }) => match status {
            DeletionStatus::Complete => ErasureUpdate::Done,
            DeletionStatus::Pending => ErasureUpdate::CheckLater {
                at_ms: now_ms.saturating_add(millis(config.poll)),
            },
            DeletionStatus::NotFound => ErasureUpdate::Failed {
                reason: format!(
                    "heap answered 404: it does not know deletion request `{deletion_request_id}`"
                ),
            },
        },
        Err(DeletionError::Retry {
            error,
            retry_after,
            throttled,
        }) => {
            let delay = config
                .backoff
                .retry_delay(attempts.saturating_add(1), jitter, *retry_after, *throttled)
                .max(config.backoff.initial);
            ErasureUpdate::Retry {
                error: error.clone(),
                at_ms: now_ms.saturating_add(millis(delay)),
            }
        }
        Err(DeletionError::Refused { reason, .. }) => ErasureUpdate::Failed {
            reason: reason.clone(),
        },
    }
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// Makes a job's Heap calls and says what they mean for each of its erasures. Holds the auth
/// tokens of the current pass: one per (app id, source).
pub struct Deleter {
    client: DeletionClient,
    clock: Arc<dyn Clock>,
    config: EraserConfig,
    jitter: Box<dyn FnMut() -> f64 + Send>,
    /// By (app id, source): when it was asked for (monotonic) and what came of it, a failure
    /// included, so one pass asks once per group.
    tokens: HashMap<(String, String), (Duration, Result<AuthToken, DeletionError>)>,
}

impl Deleter {
    pub fn new(client: DeletionClient, clock: Arc<dyn Clock>, config: EraserConfig) -> Self {
        Self {
            client,
            clock,
            config,
            jitter: Box::new(fastrand::f64),
            tokens: HashMap::new(),
        }
    }

    /// Draws the backoff's jitter from `jitter` (tests pin it).
    pub fn with_jitter(mut self, jitter: impl FnMut() -> f64 + Send + 'static) -> Self {
        self.jitter = Box::new(jitter);
        self
    }

    /// Forgets the tokens: a new pass asks for new ones.
    pub fn new_pass(&mut self) {
        self.tokens.clear();
    }

    async fn token(
        &mut self,
        app_id: &str,
        source: &str,
        api_key: &Secret,
    ) -> Result<AuthToken, DeletionError> {
        let now = self.clock.monotonic();
        let key = (app_id.to_owned(), source.to_owned());
        if let Some((at, token)) = self.tokens.get(&key)
            && now.saturating_sub(*at) < TOKEN_REUSE
        {
            return token.clone();
        }
        let token = self.client.auth_token(app_id, api_key).await;
        self.tokens.insert(key, (now, token.clone()));
        token
    }

    /// The updates `job` comes to, one per erasure, in its order.
    pub async fn execute(&mut self, job: &Job) -> Vec<(i64, ErasureUpdate)> {
        let outcome = match job {
            Job::Fail {
                app_id,
                source,
                reason,
                erasures,
            } => {
                tracing::warn!(
                    app_id = %app_id,
                    source = %source,
                    erasures = erasures.len(),
                    reason = %reason,
                    "heap user deletion failed"
                );
                let failed = ErasureUpdate::Failed {
                    reason: reason.clone(),
                };
                return erasures
                    .iter()
                    .map(|due| (due.id, failed.clone()))
                    .collect();
            }
            Job::Request {
                app_id,
                source,
                api_key,
                erasures,
            } => {
                let outcome = match self.token(app_id, source, api_key).await {
                    Ok(token) => {
                        let identities: Vec<&str> = erasures
                            .iter()
                            .filter_map(|due| due.identity.as_deref())
                            .collect();
                        self.client
                            .request_deletion(&token, &identities)
                            .await
                            .map(HeapAnswer::Requested)
                    }
                    Err(error) => Err(error),
                };
                log(app_id, source, erasures.len(), &outcome);
                outcome
            }
            Job::Check {
                app_id,
                source,
                api_key,
                deletion_request_id,
                erasures,
            } => {
                let outcome = match self.token(app_id, source, api_key).await {
                    Ok(token) => self
                        .client
                        .deletion_status(&token, deletion_request_id)
                        .await
                        .map(|status| HeapAnswer::Status {
                            deletion_request_id: deletion_request_id.clone(),
                            status,
                        }),
                    Err(error) => Err(error),
                };
                log(app_id, source, erasures.len(), &outcome);
                outcome
            }
        };
        let now_ms = self.clock.now_ms();
        job.erasures()
            .iter()
            .map(|due| {
                let jitter = (self.jitter)();
                let update = decide(&outcome, due.attempts, now_ms, &self.config, jitter);
                (due.id, update)
            })
            .collect()
    }
}

/// One line per Heap outcome of a job (never an identity or a key).
fn log(app_id: &str, source: &str, erasures: usize, outcome: &Result<HeapAnswer, DeletionError>) {
    match outcome {
        Ok(HeapAnswer::Requested(id)) => tracing::info!(
            app_id,
            source,
            erasures,
            deletion_request_id = %id,
            "heap user deletion requested"
        ),
        Ok(HeapAnswer::Status {
            deletion_request_id,
            status: DeletionStatus::Complete,
        }) => tracing::info!(
            app_id,
            source,
            erasures,
            deletion_request_id = %deletion_request_id,
            "heap user deletion done"
        ),
        Ok(HeapAnswer::Status {
            deletion_request_id,
            status: DeletionStatus::Pending,
        }) => tracing::debug!(
            app_id,
            source,
            erasures,
            deletion_request_id = %deletion_request_id,
            "heap user deletion still pending"
        ),
        Ok(HeapAnswer::Status {
            deletion_request_id,
            status: DeletionStatus::NotFound,
        }) => tracing::warn!(
            app_id,
            source,
            erasures,
            deletion_request_id = %deletion_request_id,
            reason = "heap does not know the deletion request (404)",
            "heap user deletion failed"
        ),
        Err(DeletionError::Retry { error, .. }) => tracing::warn!(
            app_id,
            source,
            erasures,
            %error,
            "heap user deletion not answered; will retry"
        ),
        Err(DeletionError::Refused { reason, .. }) => tracing::warn!(
            app_id,
            source,
            erasures,
            reason = %reason,
            "heap user deletion failed"
        ),
    }
}

/// The wait before the next pass when the next erasure is due at `due_ms` (`None`: none is
/// recorded), within [`MIN_WAIT`]..=[`MAX_WAIT`].
pub fn wait_until(due_ms: Option<i64>, now_ms: i64) -> Duration {
    let Some(due_ms) = due_ms else {
        return MAX_WAIT;
    };
    let ahead = u64::try_from(due_ms.saturating_sub(now_ms)).unwrap_or(0);
    Duration::from_millis(ahead).clamp(MIN_WAIT, MAX_WAIT)
}

/// The part of the [`Queue`] the eraser works with: every queue is one; tests give the task
/// a small fake of just this.
#[async_trait::async_trait]
pub trait ErasureQueue: Send + Sync {
    async fn claim_erasures(
        &self,
        now_ms: i64,
        lease_ms: i64,
        max: usize,
    ) -> Result<Vec<ErasureRow>, QueueError>;
    async fn update_erasure(
        &self,
        id: i64,
        update: ErasureUpdate,
        now_ms: i64,
    ) -> Result<(), QueueError>;
    async fn next_erasure_due_ms(&self) -> Result<Option<i64>, QueueError>;
    async fn scrub(&self) -> Result<(), QueueError>;
}

#[async_trait::async_trait]
impl<Q: Queue + ?Sized> ErasureQueue for Q {
    async fn claim_erasures(
        &self,
        now_ms: i64,
        lease_ms: i64,
        max: usize,
    ) -> Result<Vec<ErasureRow>, QueueError> {
        Queue::claim_erasures(self, now_ms, lease_ms, max).await
    }

    async fn update_erasure(
        &self,
        id: i64,
        update: ErasureUpdate,
        now_ms: i64,
    ) -> Result<(), QueueError> {
        Queue::update_erasure(self, id, update, now_ms).await
    }

    async fn next_erasure_due_ms(&self) -> Result<Option<i64>, QueueError> {
        Queue::next_erasure_due_ms(self).await
    }

    async fn scrub(&self) -> Result<(), QueueError> {
        Queue::scrub(self).await
    }
}

/// What one pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pass {
    /// Erasures claimed.
    pub claimed: usize,
    /// Erasures updated by a Heap outcome (or a failure to ask).
    pub updated: usize,
    /// Erasures handed back unworked (the lease was running out, or shutdown).
    pub released: usize,
}

/// The task: passes until shutdown, each claiming the due erasures.
pub struct HeapEraser<Q: ErasureQueue + ?Sized = dyn Queue> {
    queue: Arc<Q>,
    deleter: Deleter,
    clock: Arc<dyn Clock>,
    config: EraserConfig,
    /// The sources in force (a reload's new api keys apply to the next pass).
    sources: Box<dyn Fn() -> Arc<Sources> + Send + Sync>,
    /// An identity was cleared and the queue's files are not yet scrubbed of it.
    scrub_owed: bool,
}

impl<Q: ErasureQueue + ?Sized> HeapEraser<Q> {
    pub fn new(
        queue: Arc<Q>,
        client: DeletionClient,
        clock: Arc<dyn Clock>,
        config: EraserConfig,
        sources: impl Fn() -> Arc<Sources> + Send + Sync + 'static,
    ) -> Self {
        Self {
            queue,
            deleter: Deleter::new(client, clock.clone(), config),
            clock,
            config,
            sources: Box::new(sources),
            scrub_owed: false,
        }
    }

    /// Draws the backoff's jitter from `jitter` (tests pin it).
    pub fn with_jitter(mut self, jitter: impl FnMut() -> f64 + Send + 'static) -> Self {
        self.deleter = self.deleter.with_jitter(jitter);
        self
    }

    /// Passes until `shutdown`, each when an erasure is due; between them it sleeps until
    /// the next one is, at most [`MAX_WAIT`]. A failing queue is warned about (at most once a
    /// minute) and tried again.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut warned: Option<Stopwatch> = None;
        loop {
            let wait = match self.step(&shutdown).await {
                Ok(wait) => {
                    if warned.take().is_some() {
                        tracing::info!("erasures: the queue answers again");
                    }
                    wait
                }
                Err(error) => {
                    if warned.is_none_or(|at| at.elapsed() >= WARN_EVERY) {
                        tracing::warn!(%error, "erasures: the queue failed; will try again");
                        warned = Some(Stopwatch::start());
                    }
                    MAX_WAIT
                }
            };
            tokio::select! {
                biased;
                () = shutdown.cancelled() => return,
                () = self.clock.sleep(wait) => {}
            }
        }
    }

    /// A pass if one is due (or a scrub is owed), then how long to wait for the next. Asking
    /// when the next is due is a read; a claim would be a write every second.
    async fn step(&mut self, shutdown: &CancellationToken) -> Result<Duration, QueueError> {
        let mut due = self.queue.next_erasure_due_ms().await?;
        if self.scrub_owed || due.is_some_and(|due| due <= self.clock.now_ms()) {
            self.run_once(shutdown).await?;
            due = self.queue.next_erasure_due_ms().await?;
        }
        Ok(wait_until(due, self.clock.now_ms()))
    }

    /// One pass: claims up to [`MAX_USERS`] due erasures and works them (see the module doc),
    /// then scrubs the queue's files if an identity was cleared (in this pass or one whose
    /// scrub failed). Stops starting Heap calls at `shutdown` or when one could outlast the
    /// lease, handing the rest back due at once.
    pub async fn run_once(&mut self, shutdown: &CancellationToken) -> Result<Pass, QueueError> {
        let worked = self.work(shutdown).await;
        let scrubbed = self.scrub_if_owed().await;
        let pass = worked?;
        scrubbed?;
        Ok(pass)
    }

    async fn work(&mut self, shutdown: &CancellationToken) -> Result<Pass, QueueError> {
        let now_ms = self.clock.now_ms();
        let lease_ms = millis(self.config.lease);
        let lease_end_ms = now_ms.saturating_add(lease_ms);
        let rows = self
            .queue
            .claim_erasures(now_ms, lease_ms, MAX_USERS)
            .await?;
        let mut pass = Pass {
            claimed: rows.len(),
            ..Pass::default()
        };
        if rows.is_empty() {
            return Ok(pass);
        }
        self.deleter.new_pass();
        let sources = (self.sources)();
        // A job makes up to two calls (a token, then the request).
        let calls_ms = millis(self.config.timeout).saturating_mul(2);
        let mut jobs = plan(rows, &sources).into_iter();
        while let Some(job) = jobs.next() {
            let now_ms = self.clock.now_ms();
            if job.calls_heap()
                && (shutdown.is_cancelled() || now_ms.saturating_add(calls_ms) > lease_end_ms)
            {
                let rest = std::iter::once(job)
                    .chain(jobs.by_ref())
                    .flat_map(Job::into_erasures);
                for due in rest {
                    let back = ErasureUpdate::CheckLater { at_ms: now_ms };
                    self.queue.update_erasure(due.id, back, now_ms).await?;
                    pass.released += 1;
                }
                break;
            }
            for (id, update) in self.deleter.execute(&job).await {
                let clears = matches!(
                    update,
                    ErasureUpdate::Requested { .. } | ErasureUpdate::Failed { .. }
                );
                self.queue
                    .update_erasure(id, update, self.clock.now_ms())
                    .await?;
                self.scrub_owed |= clears;
                pass.updated += 1;
            }
        }
        Ok(pass)
    }

    /// Scrubs the queue's files once identities were cleared (retried next pass if it fails).
    async fn scrub_if_owed(&mut self) -> Result<(), QueueError> {
        if self.scrub_owed {
            self.queue.scrub().await?;
            self.scrub_owed = false;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use axum::http::Method;

    use crate::clock::ManualClock;
    use crate::config::AppId;
    use crate::heap::deletion::tests::{FakeHeap, Reply, Seen, heap_says_yes};
    use crate::heap::mapping::{Mapper, MappingSettings};
    use crate::queue::Removed;
    use crate::sources::Source;

    const NOW: i64 = 1_767_225_600_000;

    fn config() -> EraserConfig {
        EraserConfig {
            backoff: Backoff {
                initial: Duration::from_secs(1),
                max: Duration::from_secs(300),
            },
            poll: Duration::from_secs(300),
            timeout: Duration::from_secs(5),
            lease: MIN_LEASE,
        }
    }

    fn source(name: &str, app_id: &str, api_key: Option<&str>) -> Source {
        Source {
            name: name.into(),
            path: format!("/webhooks/userpilot/{name}"),
            secrets: Vec::new(),
            tolerance_secs: 300,
            app_id: AppId::try_from(app_id.to_owned()).unwrap(),
            mapper: Mapper::new("user_id", false, false, &MappingSettings::default()),
            transform: crate::transform::Transform::Identity,
            api_key: api_key.map(Secret::new),
        }
    }

    fn to_request(id: i64, source: &str, app_id: &str) -> ErasureRow {
        ErasureRow {
            id,
            source: source.into(),
            heap_app_id: Some(app_id.into()),
            identity: Some(format!("user-{id}")),
            identity_sha256: crate::erase::identity_sha256(&format!("user-{id}")),
            state: ErasureState::LocalDone,
            removed: Removed::default(),
            requested_at_ms: NOW,
            updated_at_ms: NOW,
            deletion_request_id: None,
            attempts: 0,
            last_error: None,
            reason: None,
            next_attempt_at_ms: NOW,
        }
    }

    fn to_check(id: i64, source: &str, app_id: &str, request: &str) -> ErasureRow {
        ErasureRow {
            identity: None,
            state: ErasureState::HeapPending,
            deletion_request_id: Some(request.into()),
            ..to_request(id, source, app_id)
        }
    }

    fn ids(job: &Job) -> Vec<i64> {
        job.erasures().iter().map(|due| due.id).collect()
    }

    fn retry(error: &str, retry_after: Option<u64>, throttled: bool) -> DeletionError {
        DeletionError::Retry {
            error: error.into(),
            retry_after: retry_after.map(Duration::from_secs),
            throttled,
        }
    }

    #[test]
    fn heaps_answers_become_the_erasures_updates() {
        let config = config();
        let decide =
            |outcome: Result<HeapAnswer, DeletionError>| decide(&outcome, 0, NOW, &config, 0.5);
        let status = |status| {
            Ok(HeapAnswer::Status {
                deletion_request_id: "req-9".into(),
                status,
            })
        };

        assert_eq!(
            decide(Ok(HeapAnswer::Requested("req-9".into()))),
            ErasureUpdate::Requested {
                deletion_request_id: "req-9".into(),
                check_at_ms: NOW + 300_000
            }
        );
        assert_eq!(
            decide(status(DeletionStatus::Complete)),
            ErasureUpdate::Done
        );
        assert_eq!(
            decide(status(DeletionStatus::Pending)),
            ErasureUpdate::CheckLater {
                at_ms: NOW + 300_000
            }
        );
        assert_eq!(
            decide(status(DeletionStatus::NotFound)),
            ErasureUpdate::Failed {
                reason: "heap answered 404: it does not know deletion request `req-9`".into()
            }
        );
        assert_eq!(
            decide(Err(DeletionError::Refused {
                status: 401,
                reason: "heap answered 401: bad key".into()
            })),
            ErasureUpdate::Failed {
                reason: "heap answered 401: bad key".into()
            }
        );
        assert_eq!(
            decide(Err(retry("heap answered 503", None, false))),
            ErasureUpdate::Retry {
                error: "heap answered 503".into(),
                at_ms: NOW + 1_000
            },
            "half of the first ceiling (1 s) is raised to retry.initial_backoff_ms"
        );
    }

    #[test]
    fn retries_back_off_exponentially_on_attempts_within_the_bounds() {
        let config = config();
        let at = |attempts, jitter, error: DeletionError| match decide(
            &Err(error),
            attempts,
            NOW,
            &config,
            jitter,
        ) {
            ErasureUpdate::Retry { at_ms, .. } => at_ms - NOW,
            other => panic!("not a retry: {other:?}"),
        };
        let unavailable = || retry("heap answered 503", None, false);

        assert_eq!(
            at(0, 0.0, unavailable()),
            1_000,
            "never below the initial backoff"
        );
        assert_eq!(
            at(1, 0.999_999, unavailable()),
            1_999,
            "a second failure: up to 2 s"
        );
        assert_eq!(
            at(3, 0.5, unavailable()),
            4_000,
            "a fourth failure: half of 8 s"
        );
        assert_eq!(
            at(40, 0.5, unavailable()),
            150_000,
            "half of the 300 s maximum"
        );
        assert_eq!(
            at(0, 0.0, retry("heap answered 429", Some(30), true)),
            30_000,
            "Retry-After is honoured"
        );
        assert_eq!(
            at(0, 0.0, retry("heap answered 429", None, true)),
            5_000,
            "a 429 waits at least the throttled floor"
        );
    }

    #[test]
    fn erasures_are_grouped_by_app_id_and_source_and_cut_at_ten_thousand_users() {
        let sources: Sources = [
            source("default", "100", Some("key-100")),
            source("staging", "200", Some("key-200")),
        ]
        .into_iter()
        .collect();
        let mut rows: Vec<ErasureRow> = (1..=10_001)
            .map(|id| to_request(id, "default", "100"))
            .collect();
        rows.insert(17, to_request(20_001, "staging", "200"));

        let jobs = plan(rows, &sources);

        assert_eq!(jobs.len(), 3, "{jobs:?}");
        let Job::Request {
            app_id, api_key, ..
        } = &jobs[0]
        else {
            panic!("not a request: {:?}", jobs[0]);
        };
        assert_eq!((app_id.as_str(), api_key.expose()), ("100", "key-100"));
        assert_eq!(ids(&jobs[0]), (1..=10_000).collect::<Vec<_>>());
        assert_eq!(ids(&jobs[1]), vec![10_001]);
        let Job::Request {
            app_id, api_key, ..
        } = &jobs[2]
        else {
            panic!("not a request: {:?}", jobs[2]);
        };
        assert_eq!((app_id.as_str(), api_key.expose()), ("200", "key-200"));
        assert_eq!(ids(&jobs[2]), vec![20_001]);
    }

    #[test]
    fn an_erasure_whose_source_lost_its_api_key_fails_with_that_reason() {
        let sources: Sources = [
            source("default", "100", None),
            source("blank", "100", Some("")),
        ]
        .into_iter()
        .collect();
        let rows = vec![
            to_request(1, "default", "100"),
            to_request(2, "gone", "100"),
            to_request(3, "blank", "100"),
            to_check(4, "gone", "100", "req-4"),
        ];

        let jobs = plan(rows, &sources);

        let reasons: Vec<(Vec<i64>, &str)> = jobs
            .iter()
            .map(|job| match job {
                Job::Fail { reason, .. } => (ids(job), reason.as_str()),
                other => panic!("not a failure: {other:?}"),
            })
            .collect();
        assert_eq!(
            reasons,
            vec![
                (
                    vec![3],
                    "source `blank` has no api_key any more: Heap was not asked to delete the user"
                ),
                (
                    vec![1],
                    "source `default` has no api_key any more: Heap was not asked to delete the user"
                ),
                (
                    vec![2],
                    "source `gone` has no api_key any more: Heap was not asked to delete the user"
                ),
                (
                    vec![4],
                    "source `gone` has no api_key any more: Heap accepted deletion request \
                     `req-4`, whose status cannot be checked"
                ),
            ]
        );
    }

    #[test]
    fn pending_erasures_are_checked_once_per_deletion_request_after_the_requests() {
        let sources: Sources = [source("default", "100", Some("key-100"))]
            .into_iter()
            .collect();
        let rows = vec![
            to_check(1, "default", "100", "req-a"),
            to_check(2, "default", "100", "req-b"),
            to_check(3, "default", "100", "req-a"),
            to_request(4, "default", "100"),
            ErasureRow {
                deletion_request_id: None,
                ..to_check(5, "default", "100", "")
            },
        ];

        let jobs = plan(rows, &sources);

        assert!(matches!(jobs[0], Job::Fail { .. }), "{:?}", jobs[0]);
        assert_eq!(ids(&jobs[0]), vec![5]);
        assert!(matches!(jobs[1], Job::Request { .. }), "{:?}", jobs[1]);
        assert_eq!(ids(&jobs[1]), vec![4]);
        let checks: Vec<(&str, Vec<i64>)> = jobs[2..]
            .iter()
            .map(|job| match job {
                Job::Check {
                    deletion_request_id,
                    ..
                } => (deletion_request_id.as_str(), ids(job)),
                other => panic!("not a check: {other:?}"),
            })
            .collect();
        assert_eq!(checks, vec![("req-a", vec![1, 3]), ("req-b", vec![2])]);
    }

    fn deleter(heap: &FakeHeap) -> Deleter {
        Deleter::new(heap.client(), Arc::new(ManualClock::at_ms(NOW)), config()).with_jitter(|| 0.0)
    }

    fn on(seen: &[Seen], endpoint: &str) -> Vec<Seen> {
        seen.iter()
            .filter(|s| s.path.ends_with(endpoint) || s.path.contains(&format!("/{endpoint}/")))
            .cloned()
            .collect()
    }

    #[tokio::test]
    async fn ten_thousand_and_one_erasures_take_one_token_and_two_requests_naming_everyone() {
        let heap = FakeHeap::start(heap_says_yes).await;
        let mut deleter = deleter(&heap);
        let sources: Sources = [source("default", "100", Some("key-100"))]
            .into_iter()
            .collect();
        let rows = (1..=10_001)
            .map(|id| to_request(id, "default", "100"))
            .collect();

        let mut updates = Vec::new();
        for job in plan(rows, &sources) {
            updates.extend(deleter.execute(&job).await);
        }

        let seen = heap.seen();
        assert_eq!(on(&seen, "auth_token").len(), 1, "one token for the group");
        let requests = on(&seen, "user_deletion");
        assert_eq!(requests.len(), 2);
        let sizes: Vec<usize> = requests
            .iter()
            .map(|r| r.body["users"].as_array().unwrap().len())
            .collect();
        assert_eq!(sizes, vec![10_000, 1]);
        let named: Vec<String> = requests
            .iter()
            .flat_map(|r| r.body["users"].as_array().unwrap().clone())
            .map(|user| user["identity"].as_str().unwrap().to_owned())
            .collect();
        let expected: Vec<String> = (1..=10_001).map(|id| format!("user-{id}")).collect();
        assert_eq!(named, expected);
        assert!(
            requests.iter().all(|r| r.method == Method::POST
                && r.authorization.as_deref() == Some("Bearer token-1"))
        );
        assert_eq!(updates.len(), 10_001);
        assert!(updates.iter().all(|(_, update)| *update
            == ErasureUpdate::Requested {
                deletion_request_id: "req-1".into(),
                check_at_ms: NOW + 300_000
            }));
    }

    #[tokio::test]
    async fn each_app_id_gets_its_own_token_and_a_source_reuses_its_token_for_checks() {
        let heap = FakeHeap::start(heap_says_yes).await;
        let mut deleter = deleter(&heap);
        let sources: Sources = [
            source("default", "100", Some("key-100")),
            source("staging", "200", Some("key-200")),
        ]
        .into_iter()
        .collect();
        let rows = vec![
            to_request(1, "default", "100"),
            to_request(2, "staging", "200"),
            to_check(3, "default", "100", "req-1"),
        ];

        let mut updates = Vec::new();
        for job in plan(rows, &sources) {
            updates.extend(deleter.execute(&job).await);
        }

        let basic = |pair: &str| {
            use base64::Engine as _;
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(pair)
            )
        };
        let tokens: Vec<Option<String>> = on(&heap.seen(), "auth_token")
            .into_iter()
            .map(|s| s.authorization)
            .collect();
        assert_eq!(
            tokens,
            vec![Some(basic("100:key-100")), Some(basic("200:key-200"))]
        );
        assert_eq!(on(&heap.seen(), "deletion_status").len(), 1);
        assert_eq!(
            updates[2],
            (
                3,
                ErasureUpdate::CheckLater {
                    at_ms: NOW + 300_000
                }
            )
        );
    }

    #[tokio::test]
    async fn a_refused_token_fails_its_group_and_an_unavailable_heap_retries_it() {
        let heap = FakeHeap::start(|seen: &Seen| -> Reply {
            let basic = seen.authorization.clone().unwrap_or_default();
            use base64::Engine as _;
            let refused = format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode("100:old-key")
            );
            if basic == refused {
                (401, None, r#"{"err":{"message":"Unauthorized"}}"#.into())
            } else {
                (503, Some("20"), String::new())
            }
        })
        .await;
        let mut deleter = deleter(&heap);
        let sources: Sources = [
            source("default", "100", Some("old-key")),
            source("staging", "200", Some("key-200")),
        ]
        .into_iter()
        .collect();
        let mut rows = vec![
            to_request(1, "default", "100"),
            to_request(2, "default", "100"),
            to_request(3, "staging", "200"),
        ];
        rows[2].attempts = 2;

        let mut updates = Vec::new();
        for job in plan(rows, &sources) {
            updates.extend(deleter.execute(&job).await);
        }

        let failed = ErasureUpdate::Failed {
            reason: "heap answered 401: Unauthorized".into(),
        };
        assert_eq!(
            updates,
            vec![
                (1, failed.clone()),
                (2, failed),
                (
                    3,
                    ErasureUpdate::Retry {
                        error: "heap answered 503".into(),
                        at_ms: NOW + 20_000
                    }
                ),
            ]
        );
        assert_eq!(on(&heap.seen(), "user_deletion").len(), 0);
        assert_eq!(on(&heap.seen(), "auth_token").len(), 2, "one per group");
    }

    #[tokio::test]
    async fn a_failure_to_ask_heap_calls_nobody() {
        let heap = FakeHeap::start(heap_says_yes).await;
        let mut deleter = deleter(&heap);
        let job = Job::Fail {
            app_id: "100".into(),
            source: "gone".into(),
            reason: "why".into(),
            erasures: vec![Due {
                id: 7,
                attempts: 0,
                identity: Some("x".into()),
            }],
        };

        let updates = deleter.execute(&job).await;

        assert_eq!(
            updates,
            vec![(
                7,
                ErasureUpdate::Failed {
                    reason: "why".into()
                }
            )]
        );
        assert!(heap.seen().is_empty());
    }

    /// The erasure part of a queue: hands out its rows once, records updates and scrubs.
    #[derive(Default)]
    struct FakeQueue {
        due: std::sync::Mutex<Vec<ErasureRow>>,
        updates: std::sync::Mutex<Vec<(i64, ErasureUpdate)>>,
        scrubs: std::sync::atomic::AtomicUsize,
        scrub_fails: std::sync::atomic::AtomicBool,
    }

    impl FakeQueue {
        fn with(rows: Vec<ErasureRow>) -> Arc<Self> {
            let queue = Self::default();
            *queue.due.lock().unwrap() = rows;
            Arc::new(queue)
        }

        fn updates(&self) -> Vec<(i64, ErasureUpdate)> {
            self.updates.lock().unwrap().clone()
        }

        fn scrubs(&self) -> usize {
            self.scrubs.load(std::sync::atomic::Ordering::SeqCst)
        }
    }

    #[async_trait::async_trait]
    impl ErasureQueue for FakeQueue {
        async fn claim_erasures(
            &self,
            _now_ms: i64,
            _lease_ms: i64,
            max: usize,
        ) -> Result<Vec<ErasureRow>, QueueError> {
            let mut due = self.due.lock().unwrap();
            let n = due.len().min(max);
            Ok(due.drain(..n).collect())
        }

        async fn update_erasure(
            &self,
            id: i64,
            update: ErasureUpdate,
            _now_ms: i64,
        ) -> Result<(), QueueError> {
            self.updates.lock().unwrap().push((id, update));
            Ok(())
        }

        async fn next_erasure_due_ms(&self) -> Result<Option<i64>, QueueError> {
            // Anything it holds is long due.
            Ok((!self.due.lock().unwrap().is_empty()).then_some(0))
        }

        async fn scrub(&self) -> Result<(), QueueError> {
            self.scrubs
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if self
                .scrub_fails
                .swap(false, std::sync::atomic::Ordering::SeqCst)
            {
                return Err(QueueError::Storage("checkpoint blocked by a reader".into()));
            }
            Ok(())
        }
    }

    fn eraser(
        heap: &FakeHeap,
        queue: Arc<FakeQueue>,
        config: EraserConfig,
    ) -> HeapEraser<FakeQueue> {
        let sources: Arc<Sources> = Arc::new(
            [
                source("default", "100", Some("key-100")),
                source("keyless", "100", None),
            ]
            .into_iter()
            .collect(),
        );
        HeapEraser::new(
            queue,
            heap.client(),
            Arc::new(ManualClock::at_ms(NOW)),
            config,
            move || sources.clone(),
        )
        .with_jitter(|| 0.0)
    }

    #[tokio::test]
    async fn a_pass_stores_heaps_answers_and_scrubs_once_after_identities_were_cleared() {
        let heap = FakeHeap::start(heap_says_yes).await;
        let queue = FakeQueue::with(vec![
            to_request(1, "default", "100"),
            to_request(2, "default", "100"),
            to_check(3, "default", "100", "req-0"),
        ]);
        let mut eraser = eraser(&heap, queue.clone(), config());

        let pass = eraser.run_once(&CancellationToken::new()).await.unwrap();

        let requested = ErasureUpdate::Requested {
            deletion_request_id: "req-1".into(),
            check_at_ms: NOW + 300_000,
        };
        assert_eq!(
            queue.updates(),
            vec![
                (1, requested.clone()),
                (2, requested),
                (
                    3,
                    ErasureUpdate::CheckLater {
                        at_ms: NOW + 300_000
                    }
                ),
            ]
        );
        assert_eq!(
            pass,
            Pass {
                claimed: 3,
                updated: 3,
                released: 0
            }
        );
        assert_eq!(queue.scrubs(), 1);
        assert_eq!(on(&heap.seen(), "auth_token").len(), 1);
    }

    #[tokio::test]
    async fn a_pass_that_only_checks_on_heap_scrubs_nothing() {
        let heap = FakeHeap::start(heap_says_yes).await;
        let queue = FakeQueue::with(vec![to_check(3, "default", "100", "req-0")]);
        let mut eraser = eraser(&heap, queue.clone(), config());

        eraser.run_once(&CancellationToken::new()).await.unwrap();
        eraser.run_once(&CancellationToken::new()).await.unwrap();

        assert_eq!(queue.updates().len(), 1);
        assert_eq!(queue.scrubs(), 0, "no identity was cleared");
    }

    #[tokio::test]
    async fn a_failed_scrub_is_owed_to_the_next_pass() {
        let heap = FakeHeap::start(heap_says_yes).await;
        let queue = FakeQueue::with(vec![to_request(1, "keyless", "100")]);
        queue
            .scrub_fails
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let mut eraser = eraser(&heap, queue.clone(), config());

        let first = eraser.run_once(&CancellationToken::new()).await;
        let second = eraser.run_once(&CancellationToken::new()).await;
        let third = eraser.run_once(&CancellationToken::new()).await;

        assert!(matches!(first, Err(QueueError::Storage(_))), "{first:?}");
        assert_eq!(second.unwrap(), Pass::default());
        third.unwrap();
        assert_eq!(queue.scrubs(), 2, "tried again once, then nothing owed");
        assert_eq!(
            queue.updates(),
            vec![(
                1,
                ErasureUpdate::Failed {
                    reason: "source `keyless` has no api_key any more: \
                             Heap was not asked to delete the user"
                        .into()
                }
            )],
            "the update was stored before the scrub failed"
        );
    }

    #[tokio::test]
    async fn at_shutdown_a_pass_hands_back_what_needs_heap_due_at_once() {
        let heap = FakeHeap::start(heap_says_yes).await;
        let queue = FakeQueue::with(vec![
            to_request(1, "default", "100"),
            to_check(2, "default", "100", "req-0"),
            to_request(3, "keyless", "100"),
        ]);
        let mut eraser = eraser(&heap, queue.clone(), config());
        let shutdown = CancellationToken::new();
        shutdown.cancel();

        let pass = eraser.run_once(&shutdown).await.unwrap();

        assert!(heap.seen().is_empty(), "no Heap call at shutdown");
        let back = ErasureUpdate::CheckLater { at_ms: NOW };
        let updates = queue.updates();
        assert!(
            matches!(updates[0], (3, ErasureUpdate::Failed { .. })),
            "{updates:?}"
        );
        assert_eq!(updates[1..], [(1, back.clone()), (2, back)]);
        assert_eq!(
            pass,
            Pass {
                claimed: 3,
                updated: 1,
                released: 2
            }
        );
    }

    #[tokio::test]
    async fn a_call_that_could_outlast_the_lease_is_not_started() {
        let heap = FakeHeap::start(heap_says_yes).await;
        let queue = FakeQueue::with(vec![to_request(1, "default", "100")]);
        let config = EraserConfig {
            timeout: Duration::from_secs(5),
            lease: Duration::from_secs(9),
            ..config()
        };
        let mut eraser = eraser(&heap, queue.clone(), config);

        let pass = eraser.run_once(&CancellationToken::new()).await.unwrap();

        assert_eq!(pass.released, 1, "a token and a request may take 10 s");
        assert_eq!(
            queue.updates(),
            vec![(1, ErasureUpdate::CheckLater { at_ms: NOW })]
        );
        assert!(heap.seen().is_empty());
    }

    #[tokio::test]
    async fn the_task_works_what_is_due_and_stops_at_shutdown() {
        let heap = FakeHeap::start(heap_says_yes).await;
        let queue = FakeQueue::with(vec![to_request(1, "default", "100")]);
        let sources: Arc<Sources> = Arc::new(
            [source("default", "100", Some("key-100"))]
                .into_iter()
                .collect(),
        );
        // The real clock: the task sleeps (a second, nothing being due) between passes.
        let eraser = HeapEraser::new(
            queue.clone(),
            heap.client(),
            Arc::new(crate::clock::SystemClock),
            config(),
            move || sources.clone(),
        );
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(eraser.run(shutdown.clone()));

        let waited = Stopwatch::start();
        while queue.updates().is_empty() {
            assert!(
                waited.elapsed() < Duration::from_secs(10),
                "no pass was made"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the task stops at shutdown, not after its sleep")
            .unwrap();

        let updates = queue.updates();
        assert_eq!(updates.len(), 1);
        assert!(
            matches!(updates[0], (1, ErasureUpdate::Requested { .. })),
            "{updates:?}"
        );
        assert_eq!(queue.scrubs(), 1);
    }

    #[test]
    fn a_jobs_debug_output_hides_identities_and_keys() {
        let sources: Sources = [source("default", "100", Some("key-100"))]
            .into_iter()
            .collect();
        let jobs = plan(vec![to_request(1, "default", "100")], &sources);

        let shown = format!("{jobs:?}");

        assert!(!shown.contains("user-1"), "{shown}");
        assert!(!shown.contains("key-100"), "{shown}");
        assert!(shown.contains("id: 1"), "{shown}");
    }

    #[test]
    fn the_wait_between_passes_is_until_the_next_due_within_a_second() {
        assert_eq!(wait_until(None, NOW), MAX_WAIT);
        assert_eq!(wait_until(Some(NOW + 400), NOW), Duration::from_millis(400));
        assert_eq!(wait_until(Some(NOW + 60_000), NOW), MAX_WAIT);
        assert_eq!(wait_until(Some(NOW - 5), NOW), MIN_WAIT);
    }
}
