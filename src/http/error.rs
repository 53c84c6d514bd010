//! `ApiError`: every way a public request can fail, mapped once to the status and JSON body of
//! contract §4 (`docs/contract.md`). Details stay in logs and metrics; clients see only the
//! generic code.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::userpilot::SignatureError;

/// Seconds a client is asked to wait after a 503.
pub const RETRY_AFTER_SECS: &str = "5";

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The URL names no configured source (or `/webhooks/userpilot` with no default source).
    #[error("no source `{0}` is configured")]
    UnknownSource(String),
    #[error("invalid signature: {0}")]
    Signature(#[from] SignatureError),
    #[error("body is not a JSON object")]
    InvalidJson,
    #[error("body too large")]
    PayloadTooLarge,
    #[error("content type is not JSON")]
    UnsupportedMediaType,
    #[error("body could not be read")]
    BadBody,
    #[error("body not received within the deadline")]
    RequestTimeout,
    #[error("the relay is shutting down")]
    Draining,
    #[error("too many webhooks in flight")]
    Overloaded,
    /// The relay's own fault, said in full: the queue could not commit (its error says so), or
    /// no transform worker could start.
    #[error("{0}")]
    Unavailable(String),
}

impl ApiError {
    /// The `error` code in the body, also the `outcome` label of `relay_webhooks_total`.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::UnknownSource(_) => "unknown_source",
            ApiError::Signature(_) => "invalid_signature",
            ApiError::InvalidJson => "invalid_json",
            ApiError::PayloadTooLarge => "payload_too_large",
            ApiError::UnsupportedMediaType => "unsupported_media_type",
            ApiError::BadBody => "bad_request",
            ApiError::RequestTimeout => "request_timeout",
            ApiError::Draining | ApiError::Overloaded | ApiError::Unavailable(_) => "unavailable",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::UnknownSource(_) => StatusCode::NOT_FOUND,
            ApiError::Signature(_) => StatusCode::UNAUTHORIZED,
            ApiError::InvalidJson | ApiError::BadBody => StatusCode::BAD_REQUEST,
            ApiError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ApiError::Draining | ApiError::Overloaded | ApiError::Unavailable(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status(), Json(json!({ "error": self.code() }))).into_response();
        if self.status() == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from_static(RETRY_AFTER_SECS),
            );
        }
        response
    }
}
