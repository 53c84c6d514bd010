//! The baseline: the cheapest server that answers the webhook like the relay does (same
//! framework, same runtime, same response), with no verification, decoding or storage. Relay
//! figures are reported as ratios to it, which cancels most of the machine's noise.

use std::net::SocketAddr;

use axum::Router;
use axum::body::Bytes;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};

async fn accept(body: Bytes) -> impl IntoResponse {
    // The body is read in full, as the relay reads it, and then ignored.
    let _ = body.len();
    (
        StatusCode::ACCEPTED,
        [("content-type", "application/json")],
        r#"{"events":1,"status":"accepted"}"#,
    )
}

pub async fn serve(listen: SocketAddr) -> anyhow::Result<()> {
    let app = Router::new()
        .route("/webhooks/userpilot", post(accept))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(|| async { "ok" }));
    let listener = tokio::net::TcpListener::bind(listen).await?;
    println!("listening on {}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}
