//! Failures of a proxied request and the OpenAI-style error bodies the
//! gateway writes itself (`{"error": {"message", "type", "code"}}`).

use std::sync::Arc;

use bytes::Bytes;
use hyper::HeaderMap;

use super::backend::Backend;

pub use llmproxy_core::policy::errors::ErrorType;
use llmproxy_core::policy::errors::GatewayError;

/// The code of [`Failure::overloaded`].
pub const OVERLOADED: &str = "hooks_overloaded";

/// A backend's own error response, passed through unless `error_handler`
/// replaces it.
#[derive(Debug, Clone)]
pub struct UpstreamReply {
    /// Status from the backend.
    pub status: u16,
    /// Headers from the backend (hop-by-hop headers removed).
    pub headers: HeaderMap,
    /// Body from the backend.
    pub body: Bytes,
}

/// Why a request failed.
#[derive(Debug, Clone)]
pub struct Failure {
    /// The type scripts see.
    pub kind: ErrorType,
    /// A stable machine-readable code (`invalid_json`, `body_too_large`,
    /// `backend_unavailable`, ...).
    pub code: &'static str,
    /// What happened.
    pub message: String,
    /// The status the gateway answers with by default.
    pub status: u16,
    /// The backend involved, if any.
    pub backend: Option<Arc<Backend>>,
    /// Retries made before giving up.
    pub retry_count: u32,
    /// The backend's own error response, if it sent one.
    pub upstream: Option<Box<UpstreamReply>>,
    /// Seconds for a `Retry-After` header (rate limit refusals).
    pub retry_after: Option<u64>,
    /// Answer with `Connection: close` (the request body was not read to
    /// its end, so the connection cannot carry another request).
    pub close_connection: bool,
}

impl Failure {
    /// A failure the gateway detected before or without a backend.
    pub fn new(kind: ErrorType, status: u16, code: &'static str, message: impl Into<String>) -> Self {
        Failure {
            kind,
            code,
            message: message.into(),
            status,
            backend: None,
            retry_count: 0,
            upstream: None,
            retry_after: None,
            close_connection: false,
        }
    }

    /// One of the failures the core names (`policy::errors`).
    pub fn of(e: GatewayError) -> Self {
        Failure::new(e.kind, e.status, e.code, e.message)
    }

    /// The hook threads are overloaded: the job did not fit in the queue or
    /// did not start within `scripts.pool.checkout_timeout_ms`. A fast 503
    /// that skips `error_handler` (which would need the same threads).
    pub fn overloaded() -> Self {
        let mut f = Failure::new(
            ErrorType::BackendError,
            503,
            OVERLOADED,
            "the gateway is overloaded (hook threads busy); retry later",
        );
        f.retry_after = Some(1);
        f
    }

    /// The default body of this failure.
    pub fn default_body(&self) -> Bytes {
        error_body(&self.message, self.kind.as_str(), self.code)
    }
}

/// `{"error": {"message", "type", "code"}}` as bytes (core's
/// [`llmproxy_core::policy::errors::error_body`]).
pub fn error_body(message: &str, kind: &str, code: &str) -> Bytes {
    Bytes::from(llmproxy_core::policy::errors::error_body(message, kind, code))
}
