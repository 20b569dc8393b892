//! Sending one attempt upstream and reading its body under the configured
//! timeouts.

use llmproxy_core::policy::errors::GatewayError;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Request, Response};

use super::backend::Backend;

/// Why an upstream exchange failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamError {
    /// The connection could not be made (refused, reset, connect timeout).
    Connect(String),
    /// The backend was too slow (`phase`: first byte or idle).
    Timeout(&'static str),
    /// The connection broke while reading or writing.
    Io(String),
    /// The response body was larger than `gateway.max_response_bytes`.
    TooLarge,
    /// The backend's final response had a 1xx status (hyper hands over a
    /// `101 Switching Protocols` as final; other 1xx are interim and
    /// skipped). Never relayed: a 101 to the client would drop the body and
    /// hand the client's connection over.
    InterimStatus(u16),
    /// An SSE event grew past `gateway.max_event_bytes` without ending.
    EventTooLarge,
}

impl UpstreamError {
    /// A message for logs and error bodies.
    pub fn message(&self) -> String {
        match self {
            UpstreamError::Connect(m) => GatewayError::backend_unreachable(m).message,
            UpstreamError::Timeout(phase) => GatewayError::backend_timeout(phase).message,
            UpstreamError::Io(m) => GatewayError::backend_failed(m).message,
            UpstreamError::TooLarge => GatewayError::response_too_large().message,
            UpstreamError::InterimStatus(status) => {
                format!("the backend answered {status}, an interim (1xx) status, as its final response")
            }
            UpstreamError::EventTooLarge => GatewayError::event_too_large().message,
        }
    }
}

/// Send `req` to `backend`; the response head must arrive within the
/// backend's first-byte timeout and have a final (>= 200) status.
pub async fn send(
    backend: &Backend,
    req: Request<http_body_util::Full<Bytes>>,
) -> Result<Response<Incoming>, UpstreamError> {
    match tokio::time::timeout(backend.timeouts.first_byte, backend.client().request(req)).await {
        Err(_) => Err(UpstreamError::Timeout("first byte")),
        Ok(Ok(resp)) if resp.status().is_informational() => Err(UpstreamError::InterimStatus(resp.status().as_u16())),
        Ok(Ok(resp)) => Ok(resp),
        Ok(Err(e)) if e.is_connect() => Err(UpstreamError::Connect(source_chain(&e))),
        Ok(Err(e)) => Err(UpstreamError::Io(source_chain(&e))),
    }
}

/// The next data chunk of `body`, waiting at most `idle` (or until
/// `deadline` when one is given). `Ok(None)` at the end of the body;
/// trailers and other frames are skipped.
pub async fn next_chunk(
    body: &mut Incoming,
    idle: Duration,
    deadline: Option<Instant>,
) -> Result<Option<Bytes>, UpstreamError> {
    loop {
        let wait = match deadline {
            Some(d) => d.saturating_duration_since(Instant::now()).min(idle),
            None => idle,
        };
        let phase = if deadline.is_some() { "first byte" } else { "idle" };
        match tokio::time::timeout(wait, body.frame()).await {
            Err(_) => return Err(UpstreamError::Timeout(phase)),
            Ok(None) => return Ok(None),
            Ok(Some(Err(e))) => return Err(UpstreamError::Io(source_chain(&e))),
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    if !data.is_empty() {
                        return Ok(Some(data));
                    }
                }
            }
        }
    }
}

/// Read a whole body (idle timeout between chunks, at most `max` bytes).
pub async fn read_all(body: &mut Incoming, idle: Duration, max: usize) -> Result<Bytes, UpstreamError> {
    let mut first: Option<Bytes> = None;
    let mut buf = BytesMut::new();
    while let Some(chunk) = next_chunk(body, idle, None).await? {
        let len = first.as_ref().map_or(0, Bytes::len) + buf.len() + chunk.len();
        if len > max {
            return Err(UpstreamError::TooLarge);
        }
        match first.take() {
            None if buf.is_empty() => first = Some(chunk),
            None => buf.extend_from_slice(&chunk),
            Some(f) => {
                buf.extend_from_slice(&f);
                buf.extend_from_slice(&chunk);
            }
        }
    }
    Ok(first.unwrap_or_else(|| buf.freeze()))
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        cur = s.source();
    }
    msg
}
