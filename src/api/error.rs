//! HTTP errors: a JSON body `{"error": CODE, "message": TEXT}` with a 4xx status for anything the
//! client did wrong, 503/504 for "not yet", and 500 only for a storage failure.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::node::NodeError;
use crate::store::StoreError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    /// Stable, machine-readable code.
    pub code: &'static str,
    pub message: String,
    /// Extra fields merged into the body (for example the holder of a lease).
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, code, message: message.into(), extra: serde_json::Map::new() }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }

    fn with(mut self, key: &str, value: impl Into<serde_json::Value>) -> Self {
        self.extra.insert(key.to_owned(), value.into());
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = self.extra;
        body.insert("error".into(), self.code.into());
        body.insert("message".into(), self.message.into());
        (self.status, Json(serde_json::Value::Object(body))).into_response()
    }
}

impl From<NodeError> for ApiError {
    fn from(e: NodeError) -> Self {
        let message = e.to_string();
        match e {
            NodeError::InvalidInput(_) => ApiError::bad_request("invalid_input", message),
            NodeError::ValueTooLarge { max, .. } => {
                ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "value_too_large", message).with("max_bytes", max)
            }
            NodeError::LeaseHeld { holder, token, until_ms } => {
                ApiError::new(StatusCode::CONFLICT, "lease_held", message)
                    .with("holder", holder)
                    .with("token", token)
                    .with("expires_at_ms", until_ms)
            }
            NodeError::NotHolder { .. } => ApiError::new(StatusCode::CONFLICT, "not_holder", message),
            NodeError::ReadOnlyReplica { primaries } => {
                ApiError::new(StatusCode::FORBIDDEN, "read_only_replica", message).with("primaries", primaries)
            }
            NodeError::Syncing => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "syncing", message),
            NodeError::Timeout { missing, .. } => {
                ApiError::new(StatusCode::GATEWAY_TIMEOUT, "timeout", message).with("missing", missing)
            }
            NodeError::AckTimeout { acked, .. } => {
                ApiError::new(StatusCode::GATEWAY_TIMEOUT, "timeout", message).with("acked", acked)
            }
            NodeError::ShuttingDown => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "shutting_down", message),
            NodeError::NoQuorum(_) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "no_quorum", message),
            NodeError::Store(e) if matches!(*e, StoreError::DiskFull { .. }) => {
                ApiError::new(StatusCode::INSUFFICIENT_STORAGE, "disk_full", message)
            }
            NodeError::Store(_) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "storage", message),
        }
    }
}
