//! Wiring: [`App::build`] turns validated [`Settings`] into bound listeners, a queue, the
//! forwarder and the routers; [`App::run`] serves until the shutdown token is cancelled, then
//! drains within `server.shutdown_grace_ms`. It reads no clock itself: time comes from the
//! [`Clock`] it is built with.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::clock::{Clock, SystemClock};
use crate::config::{Backend, Settings};
use crate::forwarder::limits::Limits;
use crate::forwarder::retry::Backoff;
use crate::forwarder::{Control, Forwarder, ForwarderConfig};
use crate::heap::client::HeapClient;
use crate::heap::mapping::Mapper;
use crate::http::{self, AppState};
use crate::queue::Queue;
use crate::queue::postgres::{PostgresQueue, leader_lock_key};
use crate::queue::sqlite::SqliteQueue;
use crate::traces::Traces;

/// How long the spans still queued at shutdown may take to reach the trace collector.
const TRACES_FLUSH: Duration = Duration::from_secs(2);

/// How often delivered records and old dead letters are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Queue(#[from] crate::queue::QueueError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("cannot build the Heap client: {0}")]
    Client(#[from] reqwest::Error),
    #[error("server failed: {0}")]
    Serve(std::io::Error),
    #[error("a task failed: {0}")]
    TaskFailed(String),
    #[error(transparent)]
    Traces(#[from] crate::traces::TracesError),
}

pub struct App {
    settings: Settings,
    state: Arc<AppState>,
    forwarder: Forwarder,
    public: TcpListener,
    admin: TcpListener,
}

/// Opens the configured queue backend, for a tool working beside (or instead of) the relay.
pub async fn open_queue(settings: &Settings) -> Result<Arc<dyn Queue>, AppError> {
    match settings.queue.backend {
        Backend::Sqlite => Ok(Arc::new(SqliteQueue::open(&settings.queue.path)?)),
        Backend::Postgres => open_postgres(settings).await,
    }
}

/// Whether this process forwards for the app id right now.
type Leadership = Box<dyn Fn() -> bool + Send + Sync>;

/// Opens the configured queue backend for the relay that forwards from it, with how its
/// forwarder learns whether it is the one forwarding.
async fn open_queue_for_serving(
    settings: &Settings,
    clock: Arc<dyn Clock>,
) -> Result<(Arc<dyn Queue>, Leadership), AppError> {
    match settings.queue.backend {
        Backend::Sqlite => {
            let queue =
                SqliteQueue::open_for_serving_with_clock(&settings.queue.path, clock).await?;
            Ok((Arc::new(queue), Box::new(|| true)))
        }
        // Shared by replicas: leases are never released at startup (another replica may be
        // sending them); the leader frees those of replicas that are gone.
        Backend::Postgres => {
            let queue = connect_postgres(settings, clock).await?;
            let leader = queue.clone();
            Ok((queue, Box::new(move || leader.is_leader())))
        }
    }
}

/// The shared Postgres queue. The replicas serving one Heap app id elect one forwarder among
/// themselves (see [`crate::queue::postgres`]).
async fn open_postgres(settings: &Settings) -> Result<Arc<dyn Queue>, AppError> {
    Ok(connect_postgres(settings, Arc::new(SystemClock)).await?)
}

async fn connect_postgres(
    settings: &Settings,
    clock: Arc<dyn Clock>,
) -> Result<Arc<PostgresQueue>, AppError> {
    let lock_key = leader_lock_key(serving_app_id(settings)?.as_str());
    let url = settings.queue.postgres_url.expose();
    Ok(Arc::new(
        PostgresQueue::connect_with_clock(url, lock_key, clock).await?,
    ))
}

/// The one app id served until each app id has its lane: the `default` source's, else the
/// first source's (valid settings have at least one).
fn serving_app_id(settings: &Settings) -> Result<crate::config::AppId, AppError> {
    let sources = settings.sources();
    sources
        .iter()
        .find(|source| source.name.as_str() == crate::config::DEFAULT_SOURCE)
        .or(sources.first())
        .map(|source| source.app_id.clone())
        .ok_or_else(|| {
            crate::config::ConfigError::Invalid(vec!["no source is configured".to_owned()]).into()
        })
}

/// The mapper as configured.
pub fn mapper(settings: &Settings) -> Result<Mapper, AppError> {
    Ok(Mapper::new(
        &settings.heap.identity,
        settings.heap.user_properties,
        settings.heap.account_properties,
        &settings.mapping()?,
    ))
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, AppError> {
    http::serve::listen(addr).map_err(|source| AppError::Bind { addr, source })
}

impl App {
    pub async fn build(settings: Settings) -> Result<Self, AppError> {
        Self::build_with_clock(settings, Arc::new(SystemClock)).await
    }

    pub async fn build_with_clock(
        settings: Settings,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, AppError> {
        let (queue, leadership) = open_queue_for_serving(&settings, clock.clone()).await?;
        let heap = &settings.heap;
        let app_id = serving_app_id(&settings)?;
        let client = HeapClient::new(&heap.base_url, &app_id, heap.timeout, clock.clone())?;
        let limits = Limits::new(
            heap.events_per_minute,
            heap.identity_events_per_minute,
            heap.batch_max_events,
            clock.clone(),
        );
        let forwarder_config = ForwarderConfig {
            linger: heap.batch_linger,
            backoff: Backoff {
                initial: settings.retry.initial_backoff,
                max: settings.retry.max_backoff,
            },
            max_event_age: settings.retry.max_event_age,
            // Long enough for the app budget to admit a full batch and Heap to answer.
            lease: heap.timeout + Duration::from_secs(60),
            shutdown_grace: settings.server.shutdown_grace,
        };
        let control = Arc::new(Control::default());
        let traces = Traces::start(&settings.telemetry)?;
        let forwarder = Forwarder::new(
            queue.clone(),
            client,
            clock.clone(),
            limits,
            forwarder_config,
            control.clone(),
        )
        .with_leadership(leadership)
        .with_traces(traces.clone());
        let state = Arc::new(AppState {
            secrets: settings.userpilot.secrets.clone(),
            tolerance_secs: settings.userpilot.tolerance.as_secs(),
            mapper: mapper(&settings)?,
            queue,
            clock,
            control,
            shutdown: CancellationToken::new(),
            admin_token: settings.admin.token.clone(),
            readiness: http::health::Readiness::default(),
            max_body_bytes: settings.server.max_body_bytes.get(),
            webhook_permits: tokio::sync::Semaphore::new(http::MAX_WEBHOOKS_IN_FLIGHT),
            body_budget: http::body_budget(settings.server.max_body_bytes.get()),
            metrics: crate::telemetry::metrics(),
            traces,
        });
        let public = bind(settings.server.listen).await?;
        let admin = bind(settings.server.admin_listen).await?;
        Ok(Self {
            settings,
            state,
            forwarder,
            public,
            admin,
        })
    }

    pub fn public_addr(&self) -> Option<SocketAddr> {
        self.public.local_addr().ok()
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.local_addr().ok()
    }

    /// Serves until `shutdown` is cancelled, then: readiness and new webhooks answer 503,
    /// in-flight requests finish, the forwarder finishes or abandons its batch, all within the
    /// grace period.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), AppError> {
        let Self {
            settings,
            state,
            forwarder,
            public,
            admin,
        } = self;
        let grace = settings.server.shutdown_grace;
        let draining = state.shutdown.clone();
        let listen = public.local_addr().map_err(AppError::Serve)?;
        let admin_listen = admin.local_addr().map_err(AppError::Serve)?;
        tracing::info!(
            %listen,
            %admin_listen,
            queue = settings.queue.backend.as_str(),
            "relay started"
        );

        let mut tasks = JoinSet::new();
        let public_app = http::public_router(state.clone());
        // The listeners close a little after draining starts, so load balancers probing
        // /readyz see 503 (not a refused connection) and stop sending traffic first.
        let closing = CancellationToken::new();
        let stop = closing.clone();
        tasks.spawn(http::serve::serve(public, public_app, stop).map_ok());
        let admin_app = http::admin_router(state.clone());
        let stop = closing.clone();
        tasks.spawn(http::serve::serve(admin, admin_app, stop).map_ok());
        tasks.spawn(forwarder.run(draining.clone()).map_ok());
        tasks.spawn(prune_periodically(state.clone(), settings.clone(), draining.clone()).map_ok());

        // Serve until asked to stop — or until a task fails on its own.
        let early = tokio::select! {
            _ = shutdown.cancelled() => None,
            Some(done) = tasks.join_next() => Some(done),
        };
        tracing::info!("shutting down: draining");
        // The forwarder honours the same grace on its own; the margin lets it log.
        let deadline = tokio::time::sleep(grace + Duration::from_millis(100));
        draining.cancel();
        match early {
            Some(Ok(Err(error))) => {
                closing.cancel();
                return Err(error);
            }
            Some(Err(panicked)) => {
                closing.cancel();
                return Err(AppError::TaskFailed(panicked.to_string()));
            }
            Some(Ok(Ok(()))) => {
                // Servers, forwarder and pruning run until shutdown; one ending is a fault.
                closing.cancel();
                return Err(AppError::TaskFailed("a task stopped unexpectedly".into()));
            }
            None => {}
        }
        tokio::time::sleep(drain_delay(grace)).await;
        closing.cancel();
        let drained = async {
            while let Some(done) = tasks.join_next().await {
                if let Ok(Err(error)) = done {
                    tracing::error!(%error, "task failed during shutdown");
                }
            }
        };
        let drained = tokio::select! {
            () = drained => true,
            () = deadline => false,
        };
        if !drained {
            tracing::warn!("grace period over; stopping what is still running");
            tasks.abort_all();
        }
        state.traces.shutdown(TRACES_FLUSH).await;
        tracing::info!("stopped");
        Ok(())
    }
}

/// How long the listeners stay open answering 503 after draining starts: a quarter of the
/// grace period, at most two seconds.
fn drain_delay(grace: Duration) -> Duration {
    (grace / 4).min(Duration::from_secs(2))
}

/// Lets a task that cannot fail sit in the same `JoinSet` as the servers.
trait MapOk: std::future::Future<Output = ()> + Sized {
    fn map_ok(self) -> impl std::future::Future<Output = Result<(), AppError>> {
        async move {
            self.await;
            Ok(())
        }
    }
}

impl<F: std::future::Future<Output = ()>> MapOk for F {}

/// Retention: forgets delivered records after `queue.dedup_window_secs` and dead letters after
/// `queue.dead_letter_retention_secs`, so the queue does not grow without bound.
async fn prune_periodically(state: Arc<AppState>, settings: Settings, shutdown: CancellationToken) {
    let dedup_ms = i64::try_from(settings.queue.dedup_window.as_millis()).unwrap_or(i64::MAX);
    let dead_ms =
        i64::try_from(settings.queue.dead_letter_retention.as_millis()).unwrap_or(i64::MAX);
    loop {
        let now = state.clock.now_ms();
        match state
            .queue
            .prune(now.saturating_sub(dedup_ms), now.saturating_sub(dead_ms))
            .await
        {
            Ok(0) => {}
            Ok(pruned) => tracing::info!(pruned, "old records pruned"),
            Err(error) => tracing::warn!(%error, "pruning failed; will try again"),
        }
        tokio::select! {
            _ = tokio::time::sleep(PRUNE_EVERY) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}
