//! The HTTP server loop, with the connection-level protections `axum::serve` does not expose:
//! a cap on open connections, an idle deadline enforced by a watchdog on every connection
//! whatever protocol state it is in, HTTP/2 limits, a deadline and a cap for request headers
//! (oversize headers get 431), and graceful shutdown that lets in-flight requests finish.
//!
//! Why a watchdog rather than hyper's timeouts alone: hyper-util's `auto` builder first reads
//! the bytes that tell HTTP/1 from HTTP/2, and HTTP/1's header timeout starts only after that,
//! so a client that sends nothing, or stops inside the HTTP/2 preface, was never timed out;
//! HTTP/2 has no idle timeout at all. The watchdog sees only "a request is in flight or not",
//! so it covers every state: before the first byte, inside the preface, between keep-alive
//! requests, on an idle HTTP/2 connection.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::{Bytes, HttpBody};
use axum::extract::Request;
use axum::response::Response;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tower::{BoxError, Service};

use crate::clock::{self, Stopwatch};

/// How long a client may take to send a request's headers (hyper's HTTP/1 timeout; the
/// watchdog enforces the same deadline in every other state).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection with no request in flight is closed this long after it was accepted or after
/// its last response, whatever it has sent (nothing, part of a request head, part of the
/// HTTP/2 preface, or a full preface and no stream).
pub const IDLE_TIMEOUT: Duration = HEADER_READ_TIMEOUT;

/// The idle deadline while the listener is at its connection cap: idle connections make room
/// quickly, so a health probe or a webhook waiting in the listen backlog is served within
/// about this long instead of [`IDLE_TIMEOUT`].
pub const IDLE_TIMEOUT_AT_CAP: Duration = Duration::from_secs(1);

/// After the watchdog asks a connection to close (HTTP/1: finish the response being written;
/// HTTP/2: GOAWAY), it is dropped if it has not ended within this long, e.g. because the
/// client does not read what is written to it.
pub const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// The most bytes of request line and headers buffered per connection (hyper's minimum is
/// 8 KiB); Userpilot's requests carry a handful of short headers.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;

/// The most headers per request.
pub const MAX_HEADERS: usize = 64;

/// The most HTTP/2 streams open at once on one connection.
pub const MAX_H2_STREAMS: u32 = 32;

/// HTTP/2 flow-control windows (connection and stream): how many body bytes a client may
/// send before the handler reads them, so what hyper buffers per connection stays small
/// (hyper's default is 1 MiB per connection). 64 KiB is the protocol's own default.
pub const H2_WINDOW_BYTES: u32 = 64 * 1024;

/// The most connections open at once. At the cap the server stops accepting: new connections
/// wait in the kernel's listen backlog until one closes, and idle connections are cut after
/// [`IDLE_TIMEOUT_AT_CAP`] to make room. Each open connection costs about 25 KiB (plus at most
/// [`H2_WINDOW_BYTES`] of unread HTTP/2 body), so memory stays bounded however many clients
/// connect; webhook bodies are bounded separately (`BODY_BYTES_IN_TRANSIT` in `http`).
pub const MAX_CONNECTIONS: usize = 512;

/// Once at the cap, idle connections stay on the short deadline until this many slots are
/// free again, so the deadline does not flip with every connection accepted or closed.
const FREE_SLOTS_TO_RELAX: usize = MAX_CONNECTIONS / 8;

/// Connections the kernel completes and queues for the relay while it is at its cap (the
/// listen backlog; the kernel caps it at `net.core.somaxconn`). Beyond it, new connections'
/// handshakes are dropped and retried by the client after a second or more, so a probe
/// arriving during a connection flood would wait on TCP's retransmission timers rather than
/// on the relay. Rust's default is 128.
pub const LISTEN_BACKLOG: u32 = 1024;

/// At most one "connection limit reached" warning per this long.
const LIMIT_WARNING_EVERY: Duration = Duration::from_secs(60);

/// A listener on `addr` with [`LISTEN_BACKLOG`].
pub fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    // As `TcpListener::bind` does: a restarted relay can bind while old connections linger.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Serves `router` on `listener` until `shutdown`, then waits for open requests to finish.
/// The caller bounds that wait with the grace period.
pub async fn serve(listener: TcpListener, router: Router, shutdown: CancellationToken) {
    let builder = builder();
    check_open_files_limit();
    let capacity = Arc::new(Capacity {
        slots: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
        at_cap: watch::channel(false).0,
    });
    let slots = &capacity.slots;
    let mut last_warning: Option<Stopwatch> = None;
    loop {
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                capacity
                    .at_cap
                    .send_if_modified(|at| !std::mem::replace(at, true));
                if last_warning.is_none_or(|at| at.elapsed() >= LIMIT_WARNING_EVERY) {
                    tracing::warn!(
                        limit = MAX_CONNECTIONS,
                        "connection limit reached; idle connections are cut sooner, new ones \
                         wait until one closes"
                    );
                    last_warning = Some(Stopwatch::start());
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
        capacity.relax_if_room();
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
        tokio::spawn(serve_connection(
            builder.clone(),
            stream,
            router.clone(),
            capacity.clone(),
            shutdown.clone(),
            slot,
        ));
    }
    drop(listener);
    // Every connection task holds a slot until it ends: all slots back means all ended.
    let _ = slots.acquire_many(MAX_CONNECTIONS as u32).await;
}

/// A listener's connection slots, and whether it is at its cap.
struct Capacity {
    slots: Arc<Semaphore>,
    /// True from the moment no slot is free until [`FREE_SLOTS_TO_RELAX`] are: idle
    /// connections use the short deadline meanwhile.
    at_cap: watch::Sender<bool>,
}

impl Capacity {
    fn relax_if_room(&self) {
        if self.slots.available_permits() >= FREE_SLOTS_TO_RELAX {
            self.at_cap
                .send_if_modified(|at| std::mem::replace(at, false));
        }
    }
}

/// The open-files limit the relay needs: both listeners' connections, plus the queue's files
/// and outbound connections.
const OPEN_FILES_NEEDED: u64 = 2 * MAX_CONNECTIONS as u64 + 128;

/// Warns when the process's soft open-files limit cannot hold [`OPEN_FILES_NEEDED`]: the relay
/// would then refuse connections (accept fails, logged) before its own cap. The relay does not
/// raise the limit itself: that takes `unsafe` code, and container runtimes already set it
/// far higher (Docker and Kubernetes: 1,048,576). Linux only (`/proc/self/limits`).
fn check_open_files_limit() {
    let Ok(limits) = std::fs::read_to_string("/proc/self/limits") else {
        return;
    };
    let soft = limits
        .lines()
        .find_map(|line| line.strip_prefix("Max open files"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|soft| soft.parse::<u64>().ok());
    if let Some(soft) = soft.filter(|&soft| soft < OPEN_FILES_NEEDED) {
        tracing::warn!(
            limit = soft,
            needed = OPEN_FILES_NEEDED,
            "open files limit is below what the connection caps need; raise it (ulimit -n)"
        );
    }
}

fn builder() -> auto::Builder<TokioExecutor> {
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
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        .max_concurrent_streams(MAX_H2_STREAMS)
        .initial_connection_window_size(H2_WINDOW_BYTES)
        .initial_stream_window_size(H2_WINDOW_BYTES);
    builder
}

/// Serves one connection, closing it when it has been idle too long (see [`IDLE_TIMEOUT`]) or
/// when the server shuts down; `slot` is released when the connection has ended.
async fn serve_connection(
    builder: auto::Builder<TokioExecutor>,
    stream: TcpStream,
    router: Router,
    capacity: Arc<Capacity>,
    shutdown: CancellationToken,
    slot: OwnedSemaphorePermit,
) {
    let mut at_cap = capacity.at_cap.subscribe();
    let _ = stream.set_nodelay(true);
    let (in_flight, mut requests) = watch::channel(0usize);
    // Held here too, so `requests` never sees the sender gone while the connection lives.
    let in_flight = Arc::new(in_flight);
    let peer = stream.peer_addr().ok();
    let service = TowerToHyperService::new(Counted {
        router,
        in_flight: in_flight.clone(),
        peer,
    });
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    let mut connection = pin!(connection);
    // `Some(since)` while no request is in flight.
    let mut idle_since = Some(clock::io_instant());
    loop {
        let deadline = idle_since.map(|since| {
            since
                + if *at_cap.borrow_and_update() {
                    IDLE_TIMEOUT_AT_CAP
                } else {
                    IDLE_TIMEOUT
                }
        });
        let idle_over = async {
            match deadline {
                Some(deadline) => tokio::time::sleep_until(deadline).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            // In this order: after the task waited for a core (a loaded machine), the
            // connection first reads what the client already sent, and a request that starts
            // is seen before the deadline is looked at. Unbiased, a due deadline could win the
            // draw and cut a client whose whole request was waiting in the socket.
            biased;
            // Errors here are the client's (reset, timeout, malformed request): nothing to do.
            _ = connection.as_mut() => break,
            Ok(()) = requests.changed() => {
                idle_since = (*requests.borrow_and_update() == 0)
                    .then(clock::io_instant);
            }
            // A change of the cap state recomputes the deadline.
            Ok(()) = at_cap.changed() => {}
            _ = idle_over => {
                connection.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(CLOSE_GRACE, connection.as_mut()).await;
                break;
            }
            _ = shutdown.cancelled() => {
                // In-flight requests finish; the caller bounds the wait with the grace period.
                connection.as_mut().graceful_shutdown();
                let _ = connection.as_mut().await;
                break;
            }
        }
    }
    drop(in_flight);
    drop(slot);
    capacity.relax_if_room();
}

/// The router, counting the requests in flight on one connection for its watchdog. A request
/// counts from its arrival until its response is ready (every response of this relay is
/// produced whole, so writing it is quick; a client that does not read it is cut by
/// [`CLOSE_GRACE`]).
#[derive(Clone)]
struct Counted {
    router: Router,
    in_flight: Arc<watch::Sender<usize>>,
    /// The client's address, given to handlers as `ConnectInfo` (the console's sign-in
    /// budget is per address).
    peer: Option<SocketAddr>,
}

/// One request in flight; dropped (also when the connection is dropped mid-request) it
/// counts down.
struct InFlight(Arc<watch::Sender<usize>>);

impl InFlight {
    fn new(in_flight: &Arc<watch::Sender<usize>>) -> Self {
        in_flight.send_modify(|n| *n += 1);
        InFlight(in_flight.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

impl<B> Service<Request<B>> for Counted
where
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // A `Router` is always ready.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        if let Some(peer) = self.peer {
            request
                .extensions_mut()
                .insert(axum::extract::ConnectInfo(peer));
        }
        let guard = InFlight::new(&self.in_flight);
        let response = self.router.call(request);
        Box::pin(async move {
            let response = response.await;
            drop(guard);
            response
        })
    }
}
