//! A fake Heap for forwarding measurements: answers every request 200 at once and logs, per
//! request, when it arrived, which endpoint it hit and how many elements its bulk array had.
//! It also totals requests and elements per endpoint and Heap app id (the bulk body's
//! `app_id`), so a relay serving several app ids can be checked lane by lane.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, Uri};
use serde::Deserialize;
use serde::de::IgnoredAny;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
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

/// The bulk arrays, counted without being kept, and the app id they are for.
#[derive(Deserialize)]
struct Bulk {
    app_id: Option<String>,
    events: Option<Vec<IgnoredAny>>,
    users: Option<Vec<IgnoredAny>>,
    accounts: Option<Vec<IgnoredAny>>,
}

/// Requests and elements received, per (endpoint, app id).
type ByAppId = BTreeMap<(Endpoint, String), (usize, usize)>;

/// What the sink received: every hit, and the totals per app id.
#[derive(Default)]
struct Received {
    hits: Vec<Hit>,
    by_app_id: ByAppId,
}

type Log = Arc<Mutex<Received>>;

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
    let (app_id, items) = serde_json::from_slice::<Bulk>(&body)
        .map(|bulk| {
            let items = [bulk.events, bulk.users, bulk.accounts]
                .into_iter()
                .flatten()
                .map(|array| array.len())
                .sum();
            (bulk.app_id.unwrap_or_default(), items)
        })
        .unwrap_or_default();
    let mut received = lock(&log);
    received.hits.push(Hit {
        at: Instant::now(),
        endpoint,
        items,
    });
    let total = received.by_app_id.entry((endpoint, app_id)).or_default();
    total.0 += 1;
    total.1 += items;
    (StatusCode::OK, "{}")
}

fn lock(log: &Log) -> MutexGuard<'_, Received> {
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
        lock(&self.log).hits.clone()
    }

    pub fn clear(&self) {
        let mut received = lock(&self.log);
        received.hits.clear();
        received.by_app_id.clear();
    }

    /// Requests and elements received on `endpoint`.
    pub fn count(&self, endpoint: Endpoint) -> (usize, usize) {
        summarize(&lock(&self.log).hits, endpoint)
    }

    /// Requests and elements received on `endpoint`, per app id (`""`: a body without one).
    pub fn count_by_app_id(&self, endpoint: Endpoint) -> BTreeMap<String, (usize, usize)> {
        lock(&self.log)
            .by_app_id
            .iter()
            .filter(|((hit_endpoint, _), _)| *hit_endpoint == endpoint)
            .map(|((_, app_id), &counts)| (app_id.clone(), counts))
            .collect()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load;
    use bytes::Bytes;
    use http_body_util::Full;
    use hyper::Request;

    #[tokio::test]
    async fn events_are_counted_per_endpoint_and_app_id() {
        let sink = Sink::start().await.unwrap();
        let client = load::client();
        for (path, body) in [
            ("/api/track", r#"{"app_id":"a","events":[{},{}]}"#),
            ("/api/track", r#"{"app_id":"a","events":[{}]}"#),
            ("/api/track", r#"{"app_id":"b","events":[{}]}"#),
            (
                "/api/add_user_properties",
                r#"{"app_id":"b","users":[{},{},{}]}"#,
            ),
        ] {
            let request = Request::post(format!("{}{path}", sink.url()))
                .body(Full::new(Bytes::from(body)))
                .unwrap();
            assert_eq!(client.request(request).await.unwrap().status(), 200);
        }
        let track = sink.count_by_app_id(Endpoint::Track);
        assert_eq!(track.get("a"), Some(&(2, 3)));
        assert_eq!(track.get("b"), Some(&(1, 1)));
        let users = sink.count_by_app_id(Endpoint::UserProperties);
        assert_eq!(users.len(), 1);
        assert_eq!(users.get("b"), Some(&(1, 3)));
        sink.clear();
        assert!(sink.count_by_app_id(Endpoint::Track).is_empty());
    }
}
