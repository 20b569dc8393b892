//! The failures a host answers itself, not a backend: their error type,
//! status, code and message, one table for every host (the gateway's
//! `Failure`s and the nginx module's, through `llmproxy.gateway_error`).
//! A backend's own error answer keeps its body; its type for
//! `error_handler` is [`ErrorType::of_upstream_status`].

use std::fmt::Display;

/// The error types handed to `error_handler` (seed design, hook 7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorType {
    /// The backend failed (connect error, 5xx, broken connection).
    BackendError,
    /// The backend was too slow.
    Timeout,
    /// Authentication failed (the auth stage, or upstream 401/403).
    AuthError,
    /// Rate limited (the rate limit stage, or upstream 429).
    RateLimit,
    /// The client's request is wrong (malformed JSON, too large, 4xx).
    BadRequest,
}

impl ErrorType {
    /// The name scripts see as `error.type`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorType::BackendError => "backend_error",
            ErrorType::Timeout => "timeout",
            ErrorType::AuthError => "auth_error",
            ErrorType::RateLimit => "rate_limit",
            ErrorType::BadRequest => "bad_request",
        }
    }

    /// The type of an upstream error status.
    pub fn of_upstream_status(status: u16) -> ErrorType {
        match status {
            401 | 403 => ErrorType::AuthError,
            429 => ErrorType::RateLimit,
            408 | 504 => ErrorType::Timeout,
            400..=499 => ErrorType::BadRequest,
            _ => ErrorType::BackendError,
        }
    }
}

/// The message `error_handler` sees (`error.message`) for a backend's own
/// error answer with `status`: the answer's `error.message` when its body
/// is OpenAI's error shape, else "the backend answered STATUS". Every host
/// reads the answer's body before it calls `error_handler`.
///
/// ```
/// use llmproxy_core::policy::errors::upstream_message;
/// assert_eq!(upstream_message(500, br#"{"error":{"message":"overloaded"}}"#), "overloaded");
/// assert_eq!(upstream_message(502, b"<html>bad gateway</html>"), "the backend answered 502");
/// assert_eq!(upstream_message(404, br#"{"error":"nope"}"#), "the backend answered 404");
/// ```
pub fn upstream_message(status: u16, body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Answer {
        error: Inner,
    }
    #[derive(serde::Deserialize)]
    struct Inner {
        message: String,
    }
    serde_json::from_slice::<Answer>(body)
        .map(|a| a.error.message)
        .unwrap_or_else(|_| format!("the backend answered {status}"))
}

/// The type of the 503 a hook failing under `on_error: deny` gets (never
/// shaped by `error_handler`, so not an [`ErrorType`]).
pub const HOOK_ERROR: &str = "hook_error";

/// The code of that 503.
pub const HOOK_FAILED: &str = "hook_failed";

/// The message of that 503 (`kind`: the hook error's kind).
pub fn hook_failed_message(hook: &str, kind: &str) -> String {
    format!("the request was refused: the {hook} hook failed ({kind})")
}

/// The body of an error a host answers itself, OpenAI's shape:
/// `{"error":{"message":…,"type":…,"code":…}}`, keys in that order.
pub fn error_body(message: &str, kind: &str, code: &str) -> String {
    // A string always serializes; the fallback only keeps this total.
    let quote = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| String::from("\"\""));
    format!(
        "{{\"error\":{{\"message\":{},\"type\":{},\"code\":{}}}}}",
        quote(message),
        quote(kind),
        quote(code)
    )
}

/// A failure a host answers itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayError {
    /// What `error_handler` sees as `error.type`.
    pub kind: ErrorType,
    /// The status answered by default.
    pub status: u16,
    /// A stable machine-readable code.
    pub code: &'static str,
    /// What happened.
    pub message: String,
}

impl GatewayError {
    fn new(kind: ErrorType, status: u16, code: &'static str, message: impl Into<String>) -> GatewayError {
        GatewayError {
            kind,
            status,
            code,
            message: message.into(),
        }
    }

    /// The request body is over `gateway.max_body_bytes`: 413.
    pub fn body_too_large(max_bytes: u64) -> GatewayError {
        GatewayError::new(
            ErrorType::BadRequest,
            413,
            "body_too_large",
            format!("the request body is larger than {max_bytes} bytes"),
        )
    }

    /// The request's target (path and query) is longer than
    /// [`crate::http::head::MAX_URI_BYTES`]: 414.
    pub fn uri_too_long() -> GatewayError {
        GatewayError::new(
            ErrorType::BadRequest,
            414,
            "uri_too_long",
            format!(
                "the request target is longer than {} bytes",
                crate::http::head::MAX_URI_BYTES
            ),
        )
    }

    /// A request header, or all of them, is larger than
    /// [`crate::http::head`]'s bounds: 431.
    pub fn headers_too_large() -> GatewayError {
        GatewayError::new(
            ErrorType::BadRequest,
            431,
            "headers_too_large",
            format!(
                "a request header is larger than {} bytes, or all of them than {} bytes",
                crate::http::head::MAX_HEADER_BYTES,
                crate::http::head::MAX_HEAD_BYTES
            ),
        )
    }

    /// The request path has no canonical form ([`crate::http::path`]):
    /// 400.
    pub fn invalid_path(why: impl Display) -> GatewayError {
        GatewayError::new(ErrorType::BadRequest, 400, "invalid_path", why.to_string())
    }

    /// The HTTP server found the request malformed before it could be
    /// read as one (a request line or a header it cannot parse, a header
    /// that must be unique sent twice, a method that is not an uppercase
    /// token: `http::head`): 400.
    pub fn malformed_request() -> GatewayError {
        GatewayError::new(
            ErrorType::BadRequest,
            400,
            "malformed_request",
            "the request is not valid HTTP",
        )
    }

    /// The request body is not JSON: 400.
    pub fn invalid_json(detail: impl Display) -> GatewayError {
        GatewayError::new(
            ErrorType::BadRequest,
            400,
            "invalid_json",
            format!("the request body is not valid JSON: {detail}"),
        )
    }

    /// The request body is JSON but not an object: 400.
    pub fn invalid_body() -> GatewayError {
        GatewayError::new(
            ErrorType::BadRequest,
            400,
            "invalid_body",
            "the request body must be a JSON object",
        )
    }

    /// A field of the request has the wrong type: 400.
    pub fn invalid_field(detail: impl Display) -> GatewayError {
        GatewayError::new(
            ErrorType::BadRequest,
            400,
            "invalid_field",
            format!("invalid request: {detail}"),
        )
    }

    /// The request body could not be read: 400.
    pub fn body_unreadable(detail: impl Display) -> GatewayError {
        GatewayError::new(
            ErrorType::BadRequest,
            400,
            "body_unreadable",
            format!("cannot read the request body: {detail}"),
        )
    }

    /// No backend is usable (none configured, all unhealthy, all tried): 503.
    pub fn no_backend() -> GatewayError {
        GatewayError::new(ErrorType::BackendError, 503, "no_backend", "no backend is available")
    }

    /// The backend could not be reached: 502.
    pub fn backend_unreachable(detail: impl Display) -> GatewayError {
        GatewayError::new(
            ErrorType::BackendError,
            502,
            "backend_unreachable",
            format!("cannot connect to the backend: {detail}"),
        )
    }

    /// The backend did not answer in time (`phase`: what it was late for): 504.
    pub fn backend_timeout(phase: impl Display) -> GatewayError {
        GatewayError::new(
            ErrorType::Timeout,
            504,
            "backend_timeout",
            format!("the backend timed out ({phase})"),
        )
    }

    /// The connection to the backend broke: 502.
    pub fn backend_failed(detail: impl Display) -> GatewayError {
        GatewayError::new(
            ErrorType::BackendError,
            502,
            "backend_failed",
            format!("the backend connection failed: {detail}"),
        )
    }

    /// The backend's answer is larger than `gateway.max_response_bytes`
    /// (a host reads a whole answer to transform it and read its usage):
    /// 502.
    pub fn response_too_large() -> GatewayError {
        GatewayError::new(
            ErrorType::BackendError,
            502,
            "response_too_large",
            "the backend response is too large",
        )
    }

    /// A backend's stream event grew past `gateway.max_event_bytes`
    /// without ending: 502 before the stream began, else the stream ends
    /// with this error as its last event.
    pub fn event_too_large() -> GatewayError {
        GatewayError::new(
            ErrorType::BackendError,
            502,
            "event_too_large",
            "the backend sent a stream event larger than gateway.max_event_bytes",
        )
    }

    /// A client failed too many `what` checks (such as "API key") and must
    /// wait `wait_s` seconds (the auth throttle): 429.
    pub fn auth_throttled(what: &str, wait_s: u64) -> GatewayError {
        GatewayError::new(
            ErrorType::RateLimit,
            429,
            crate::policy::throttle::CODE,
            crate::policy::throttle::message(what, wait_s),
        )
    }

    /// The limiter's and quotas' store (Redis) failed and `state.on_error`
    /// is `deny`: 503.
    pub fn state_unavailable() -> GatewayError {
        GatewayError::new(
            ErrorType::BackendError,
            503,
            "state_unavailable",
            "the gateway's rate limit and quota store is unavailable",
        )
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_error_body_reads_back_as_written() {
        let controls: String = (0u8..32).map(char::from).collect();
        let cases = [
            "",
            "plain",
            "say \"hi\"",
            "back\\slash",
            controls.as_str(),
            "\u{7f}",
            "中文 ✓",
            "</script>",
        ];
        for message in cases {
            let body = error_body(message, "bad_request", "invalid_json");
            assert!(!body.chars().any(|c| c.is_control() && c != '\u{7f}'), "{body}");
            let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            assert_eq!(v["error"]["message"], message, "{body}");
            assert_eq!(v["error"]["type"], "bad_request");
            assert_eq!(v["error"]["code"], "invalid_json");
        }
        assert_eq!(
            error_body("m", "t", "c"),
            r#"{"error":{"message":"m","type":"t","code":"c"}}"#
        );
    }

    use super::*;

    #[test]
    fn upstream_statuses_map_to_the_seed_types() {
        for (status, kind) in [
            (400, "bad_request"),
            (401, "auth_error"),
            (403, "auth_error"),
            (404, "bad_request"),
            (408, "timeout"),
            (429, "rate_limit"),
            (500, "backend_error"),
            (502, "backend_error"),
            (504, "timeout"),
        ] {
            assert_eq!(ErrorType::of_upstream_status(status).as_str(), kind, "{status}");
        }
    }

    #[test]
    fn every_failure_has_its_status_code_and_words() {
        let cases = [
            (
                GatewayError::body_too_large(64),
                413,
                "body_too_large",
                "the request body is larger than 64 bytes",
            ),
            (
                GatewayError::backend_unreachable("connection refused"),
                502,
                "backend_unreachable",
                "cannot connect to the backend: connection refused",
            ),
            (GatewayError::no_backend(), 503, "no_backend", "no backend is available"),
        ];
        for (e, status, code, message) in cases {
            assert_eq!((e.status, e.code, e.message.as_str()), (status, code, message));
        }
        assert_eq!(
            hook_failed_message("routing", "timeout"),
            "the request was refused: the routing hook failed (timeout)"
        );
    }
}
