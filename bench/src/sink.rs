//! A fake Heap for forwarding measurements: answers every request 200 at once and logs, per
//! request, when it arrived, which endpoint it hit and how many elements its bulk array had.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, Uri};
use serde::Deserialize;
use serde::de::IgnoredAny;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Track,
    UserProperties,
    AccountProperties,
    Other,
}

/// One request the sink received.
#[derive(Debug, Clone, Copy)]
pub struct Hit {
    pub at: Instant,
    pub endpoint: Endpoint,
    /// Elements of the bulk array (`events`, `users`, `accounts`).
    pub items: usize,
}

/// The bulk arrays, counted without being kept.
#[derive(Deserialize)]
struct Bulk {
    events: Option<Vec<IgnoredAny>>,
    users: Option<Vec<IgnoredAny>>,
    accounts: Option<Vec<IgnoredAny>>,
}

type Log = Arc<Mutex<Vec<Hit>>>;

#[derive(Clone)]
pub struct Sink {
    pub addr: SocketAddr,
    log: Log,
}

async fn receive(State(log): State<Log>, uri: Uri, body: Bytes) -> (StatusCode, &'static str) {
    let endpoint = match uri.path() {
        "/api/track" => Endpoint::Track,
        "/api/add_user_properties" => Endpoint::UserProperties,
        "/api/add_account_properties" => Endpoint::AccountProperties,
        _ => Endpoint::Other,
    };
    let items = serde_json::from_slice::<Bulk>(&body)
        .map(|bulk| {
            [bulk.events, bulk.users, bulk.accounts]
                .into_iter()
                .flatten()
                .map(|array| array.len())
                .sum()
        })
        .unwrap_or(0);
    lock(&log).push(Hit {
        at: Instant::now(),
        endpoint,
        items,
    });
    (StatusCode::OK, "{}")
}

fn lock(log: &Log) -> MutexGuard<'_, Vec<Hit>> {
    log.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Sink {
    /// Starts on a free loopback port, in this process.
    pub async fn start() -> anyhow::Result<Self> {
        let log: Log = Arc::default();
        let app = Router::new().fallback(receive).with_state(log.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok(Sink { addr, log })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request so far, in arrival order.
    pub fn hits(&self) -> Vec<Hit> {
        lock(&self.log).clone()
    }

    pub fn clear(&self) {
        lock(&self.log).clear();
    }

    /// Requests and elements received on `endpoint`.
    pub fn count(&self, endpoint: Endpoint) -> (usize, usize) {
        summarize(&lock(&self.log), endpoint)
    }
}

/// Requests and elements on `endpoint` among `hits`.
pub fn summarize(hits: &[Hit], endpoint: Endpoint) -> (usize, usize) {
    hits.iter()
        .filter(|hit| hit.endpoint == endpoint)
        .fold((0, 0), |(requests, items), hit| {
            (requests + 1, items + hit.items)
        })
}
