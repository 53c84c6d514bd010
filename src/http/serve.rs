//! The HTTP server loop, with the connection-level protections `axum::serve` does not expose:
//! a deadline for request headers (a slowloris client cannot hold a connection by trickling
//! them, and an idle keep-alive connection is closed), a cap on header size and count
//! (oversize headers get 431), and graceful shutdown that lets in-flight requests finish.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// How long a client may take to send a request's headers (and how long an idle keep-alive
/// connection stays open).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The most bytes of request line and headers buffered per connection (hyper's minimum is
/// 8 KiB); Userpilot's requests carry a handful of short headers.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;

/// The most headers per request.
pub const MAX_HEADERS: usize = 64;

/// The most connections open at once. At the cap the server stops accepting: new connections
/// wait in the kernel's listen backlog until one closes (an idle keep-alive connection closes
/// after [`HEADER_READ_TIMEOUT`]). Each open connection costs about 25 KiB, so memory stays
/// bounded however many clients connect; webhooks being handled are capped separately, lower
/// ([`MAX_WEBHOOKS_IN_FLIGHT`](super::MAX_WEBHOOKS_IN_FLIGHT)), so this only bounds idle and
/// waiting connections.
pub const MAX_CONNECTIONS: usize = 512;

/// At most one "connection limit reached" warning per this long.
const LIMIT_WARNING_EVERY: Duration = Duration::from_secs(60);

/// Serves `router` on `listener` until `shutdown`, then waits for open requests to finish.
/// The caller bounds that wait with the grace period.
pub async fn serve(listener: TcpListener, router: Router, shutdown: CancellationToken) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES)
        .max_headers(MAX_HEADERS);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEADER_BYTES as u32);
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut last_warning: Option<Instant> = None;
    loop {
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                if last_warning.is_none_or(|at| at.elapsed() >= LIMIT_WARNING_EVERY) {
                    tracing::warn!(
                        limit = MAX_CONNECTIONS,
                        "connection limit reached; new connections wait until one closes"
                    );
                    last_warning = Some(Instant::now());
                }
                tokio::select! {
                    slot = slots.clone().acquire_owned() => match slot {
                        Ok(slot) => slot,
                        Err(_) => break, // never closed
                    },
                    _ = shutdown.cancelled() => break,
                }
            }
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // Out of file descriptors and the like: pause instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(router.clone());
        let connection = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            // Errors here are the client's (reset, timeout, malformed request): nothing to do.
            let _ = connection.await;
            drop(slot);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}
