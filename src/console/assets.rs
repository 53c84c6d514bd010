//! The console's stylesheet and script, embedded in the binary (the console works with no
//! internet access and loads nothing from another origin). Both are small and hand-written:
//! the script only refreshes the overview's live part every 2 s; everything else is plain
//! HTML forms and links, which work without it.

use axum::extract::Path;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

/// `(name, content type, bytes)` of every asset.
const ASSETS: &[(&str, &str, &[u8])] = &[
    (
        "console.css",
        "text/css; charset=utf-8",
        include_bytes!("../../assets/console/console.css"),
    ),
    (
        "favicon.svg",
        "image/svg+xml",
        include_bytes!("../../assets/console/favicon.svg"),
    ),
    (
        "console.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../assets/console/console.js"),
    ),
];

/// `GET /console/assets/{name}`: no session needed (they hold nothing secret).
pub async fn serve(Path(name): Path<String>) -> Response {
    match ASSETS.iter().find(|(n, _, _)| *n == name) {
        Some((_, content_type, bytes)) => (
            [
                (header::CONTENT_TYPE, *content_type),
                // Names carry no version: a short cache keeps an upgrade visible quickly.
                (header::CACHE_CONTROL, "public, max-age=300"),
            ],
            *bytes,
        )
            .into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_asset_is_embedded_and_not_empty() {
        for (name, _, bytes) in ASSETS {
            assert!(bytes.len() > 100, "{name} is {} bytes", bytes.len());
        }
    }
}
