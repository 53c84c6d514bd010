//! Wiring: [`App::build`] turns validated [`Settings`] into bound listeners, a queue, the
//! sources, a forwarding lane per app id and the routers; [`App::run`] serves until the
//! shutdown token is cancelled, then drains within `server.shutdown_grace_ms`. It reads no
//! clock itself: time comes from the [`Clock`] it is built with.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::clock::{Clock, SystemClock};
use crate::config::AppId;
use crate::config::{Backend, Settings};
use crate::erase::heap::{EraserConfig, HeapEraser};
use crate::forwarder::lanes::{self, Lanes, Starts};
use crate::forwarder::limits::Limits;
use crate::forwarder::retry::Backoff;
use crate::forwarder::{Control, Forwarder, ForwarderConfig};
use crate::heap::client::HeapClient;
use crate::heap::deletion::DeletionClient;
use crate::http::{self, AppState};
use crate::queue::Queue;
use crate::queue::postgres::PostgresQueue;
use crate::queue::sqlite::SqliteQueue;
use crate::reload::{Load, Reloader};
use crate::sources::{LiveSources, Sources};
use crate::telemetry;
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
    /// The lanes registered so far, for the supervisor to start.
    starts: Starts,
    build_lane: lanes::Build,
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

/// Whether this process forwards for an app id right now.
type Leadership = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// Opens the configured queue backend for the relay that forwards from it, with how each
/// lane's forwarder learns whether it is the one forwarding for its app id.
async fn open_queue_for_serving(
    settings: &Settings,
    clock: Arc<dyn Clock>,
) -> Result<(Arc<dyn Queue>, Leadership), AppError> {
    match settings.queue.backend {
        Backend::Sqlite => {
            let queue =
                SqliteQueue::open_for_serving_with_clock(&settings.queue.path, clock).await?;
            Ok((Arc::new(queue), Arc::new(|_: &str| true)))
        }
        // Shared by replicas: leases are never released at startup (another replica may be
        // sending them); each lane's leader frees those of replicas that are gone.
        Backend::Postgres => {
            let queue = connect_postgres(settings, clock).await?;
            let leader = queue.clone();
            Ok((
                queue,
                Arc::new(move |app_id: &str| leader.is_leader(app_id)),
            ))
        }
    }
}

/// The shared Postgres queue. The replicas elect one forwarder per Heap app id among
/// themselves (see [`crate::queue::postgres`]).
async fn open_postgres(settings: &Settings) -> Result<Arc<dyn Queue>, AppError> {
    Ok(connect_postgres(settings, Arc::new(SystemClock)).await?)
}

async fn connect_postgres(
    settings: &Settings,
    clock: Arc<dyn Clock>,
) -> Result<Arc<PostgresQueue>, AppError> {
    let url = settings.queue.postgres_url.expose();
    Ok(Arc::new(
        PostgresQueue::connect_with_clock(url, clock).await?,
    ))
}

/// Builds the forwarder of each lane from `[heap]` and `[retry]`: its own client, rate
/// budget and backoff; leadership of its app id on a shared queue.
fn lane_builder(
    settings: &Settings,
    queue: Arc<dyn Queue>,
    clock: Arc<dyn Clock>,
    leadership: Leadership,
    traces: Traces,
) -> lanes::Build {
    let heap = settings.heap.clone();
    let config = ForwarderConfig {
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
    Box::new(move |app_id: &AppId, control: Arc<Control>| {
        let client = match HeapClient::new(&heap.base_url, app_id, heap.timeout, clock.clone()) {
            Ok(client) => client,
            Err(error) => {
                tracing::error!(app_id = %app_id, %error, "cannot build the Heap client; lane not started");
                return None;
            }
        };
        let limits = Limits::new(
            heap.events_per_minute,
            heap.identity_events_per_minute,
            heap.batch_max_events,
            clock.clone(),
        );
        let leadership = leadership.clone();
        let lane = app_id.as_str().to_owned();
        let forwarder = Forwarder::new(
            queue.clone(),
            client,
            clock.clone(),
            limits,
            config.clone(),
            control,
        )
        .with_leadership(move || leadership(&lane))
        .with_traces(traces.clone());
        Some(forwarder)
    })
}

/// Registers a lane for every app id the sources name, and for every app id that still has
/// records queued though no source names it any more (they are delivered all the same).
async fn register_lanes(sources: &Sources, queue: &dyn Queue, lanes: &Lanes, now_ms: i64) {
    for app_id in sources.app_ids() {
        lanes.ensure(&app_id);
        telemetry::zero_lane_series(app_id.as_str());
    }
    let queued = match queue.lane_stats(now_ms).await {
        Ok(queued) => queued,
        Err(error) => {
            tracing::warn!(%error, "cannot list the app ids with queued records");
            return;
        }
    };
    for (app_id, stats) in queued {
        let waiting = stats.pending + stats.in_flight;
        let Ok(app_id) = AppId::try_from(app_id) else {
            // Records from before sources (schema v2) that no default source adopted.
            if waiting > 0 {
                tracing::warn!(
                    records = waiting,
                    "records queued before sources existed wait for a default source \
                     (userpilot.secrets and heap.app_id) to adopt them at the next start"
                );
            }
            continue;
        };
        if waiting > 0 && lanes.ensure(&app_id) {
            telemetry::zero_lane_series(app_id.as_str());
            tracing::info!(
                app_id = %app_id,
                records = waiting,
                "no source names this app id any more; its lane delivers what is queued"
            );
        }
    }
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
        // First: the series started at zero below need the recorder installed.
        let metrics = telemetry::metrics();
        let (queue, leadership) = open_queue_for_serving(&settings, clock.clone()).await?;
        let sources = Sources::from_settings(&settings)?;
        if let Some(default) = sources.default_source() {
            let adopted = queue.adopt_unassigned(default.app_id.as_str()).await?;
            if adopted > 0 {
                tracing::info!(
                    records = adopted,
                    app_id = %default.app_id,
                    "records queued before sources existed now belong to the default source's app id"
                );
            }
        }
        for source in sources.iter() {
            telemetry::zero_source_series(&source.name);
        }
        let (lanes, starts) = Lanes::new();
        register_lanes(&sources, queue.as_ref(), &lanes, clock.now_ms()).await;
        let traces = Traces::start(&settings.telemetry)?;
        // The shapes index starts from the table, so a restart keeps counting, not recounting.
        let shapes = crate::shapes::Recorder::new(
            settings.capture.samples,
            settings.capture.max_shapes_per_source.get(),
            queue.shape_keys().await?,
        );
        let build_lane = lane_builder(
            &settings,
            queue.clone(),
            clock.clone(),
            leadership,
            traces.clone(),
        );
        let activity = Arc::new(crate::console::activity::Activity::default());
        let state = Arc::new(AppState {
            sources: LiveSources::new(sources),
            lanes,
            reloader: Reloader::new(settings.clone()),
            queue,
            clock: clock.clone(),
            shutdown: CancellationToken::new(),
            admin_token: settings.admin.token.clone(),
            readiness: http::health::Readiness::default(),
            max_body_bytes: settings.server.max_body_bytes.get(),
            webhook_permits: tokio::sync::Semaphore::new(http::MAX_WEBHOOKS_IN_FLIGHT),
            body_budget: http::body_budget(settings.server.max_body_bytes.get()),
            metrics,
            traces,
            shapes,
            console: crate::console::Console::new(clock.clone(), activity),
        });
        let public = bind(settings.server.listen).await?;
        let admin = bind(settings.server.admin_listen).await?;
        Ok(Self {
            settings,
            state,
            starts,
            build_lane,
            public,
            admin,
        })
    }

    /// Where a reload (SIGHUP, `POST /admin/reload`) reads the configuration from: the same
    /// layers the process started from. Without it, a reload is refused.
    pub fn reload_from(self, load: Load) -> Self {
        self.state.reloader.set_load(load);
        self
    }

    /// Reloads the configuration as `POST /admin/reload` does (for SIGHUP).
    pub fn reload_trigger(&self) -> ReloadTrigger {
        ReloadTrigger(self.state.clone())
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
            starts,
            build_lane,
            public,
            admin,
        } = self;
        let grace = settings.server.shutdown_grace;
        let draining = state.shutdown.clone();
        let listen = public.local_addr().map_err(AppError::Serve)?;
        let admin_listen = admin.local_addr().map_err(AppError::Serve)?;
        // Heap deletions of erasures (contract §12), on every backend: on a shared queue the
        // claim's lease decides which replica asks.
        let eraser = HeapEraser::new(
            state.queue.clone(),
            DeletionClient::new(
                &settings.heap.base_url,
                settings.heap.timeout,
                state.clock.clone(),
            )?,
            state.clock.clone(),
            EraserConfig::from_settings(&settings),
            {
                let state = state.clone();
                move || state.sources.current()
            },
        );
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
        tasks.spawn(lanes::run(starts, build_lane, draining.clone()).map_ok());
        tasks.spawn(prune_periodically(state.clone(), settings.clone(), draining.clone()).map_ok());
        // The console's charts: a sample of the counts every 10 s, the last hour kept.
        tasks.spawn(crate::console::activity::run(state.clone(), draining.clone()).map_ok());
        tasks.spawn(eraser.run(draining.clone()).map_ok());

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
                // Servers, forwarder, pruning, erasures and sampling run until shutdown; one
                // ending is a fault.
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

/// A handle that reloads the running relay's configuration.
#[derive(Clone)]
pub struct ReloadTrigger(Arc<AppState>);

impl ReloadTrigger {
    pub async fn reload(&self) {
        // The outcome is logged and counted by the reload itself.
        let _ = self.0.reloader.reload(&self.0.sources, &self.0.lanes).await;
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
