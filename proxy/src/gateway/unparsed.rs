//! Heads hyper refuses before the gateway sees a request
//! (docs/adr/074-heads-the-http-parser-refuses.md).
//!
//! hyper answers a request head it cannot parse (a header line without a
//! colon, a byte HTTP does not allow), one with more than 100 header lines
//! and one whose target is over 64 KiB itself, with an empty `400`, `431`
//! or `414` and closes the connection: no request reaches the service, so
//! neither the gateway's JSON error nor its request log nor its metrics
//! would. It has no hook for that answer. What it writes is recognisable,
//! though: the first thing written in answer to that head, a status line
//! and exactly `connection: close`, `content-length: 0` and `date`. The
//! connection's writer ([`super::conn::WriteTimeout`]) hands such a head
//! here and sends [`answer`]'s bytes instead: core's error for the refusal
//! (the one the gateway gives a head over its own bounds, and nginx's
//! `refused()` gives these heads), with a request id, counted and logged as
//! a request that reached no backend.

use llmproxy_core::http::head::HeadRefusal;

use super::errors::error_body;
use super::metrics::Metrics;
use super::request_id;

/// The status lines hyper writes for a refused head, and the refusal each
/// stands for.
const STATUS_LINES: [(&[u8], HeadRefusal); 3] = [
    (b"HTTP/1.1 400 Bad Request\r\n", HeadRefusal::Malformed),
    (b"HTTP/1.1 414 URI Too Long\r\n", HeadRefusal::UriTooLong),
    (
        b"HTTP/1.1 431 Request Header Fields Too Large\r\n",
        HeadRefusal::HeadersTooLarge,
    ),
];

/// Most header lines hyper reads in a request head (its default): a head
/// with more is refused with a 431 before the gateway's own bounds
/// (`http::head`), which count bytes, are applied.
pub const MAX_HEADER_LINES: usize = 100;

/// The header lines of hyper's refusal, before its `date`.
const REFUSAL_HEADERS: &[u8] = b"connection: close\r\ncontent-length: 0\r\ndate: ";

/// The refusal `head` is, with its status line and its `date`, when it
/// is hyper's answer to a head it refused: one of [`STATUS_LINES`], then
/// exactly `connection: close`, `content-length: 0` and a `date`, and
/// nothing after the blank line. The gateway's own answers always carry a
/// body or an `x-request-id`, so none of them has this shape.
pub fn refusal_of(head: &[u8]) -> Option<(HeadRefusal, &'static [u8], &[u8])> {
    let &(line, refusal) = STATUS_LINES.iter().find(|(line, _)| head.starts_with(line))?;
    let rest = head[line.len()..].strip_prefix(REFUSAL_HEADERS)?;
    let date = rest.strip_suffix(b"\r\n\r\n")?;
    if date.len() > 64 || date.contains(&b'\n') {
        return None;
    }
    Some((refusal, line, date))
}

/// The answer to send instead of hyper's empty one: the same status with
/// core's JSON error for `refusal`, a new `x-request-id`, the connection
/// closed. Counted as a request with no backend, and logged like one.
pub fn answer(refusal: HeadRefusal, date: &[u8], status_line: &[u8], metrics: &Metrics) -> Vec<u8> {
    let mut error = refusal.error();
    if refusal == HeadRefusal::HeadersTooLarge {
        // Within core's byte bounds, hyper's own bound is the line count.
        error.message = format!(
            "the request has more than {MAX_HEADER_LINES} header lines, or {}",
            error.message
        );
    }
    let id = request_id::accept_or_generate(None);
    let body = error_body(&error.message, error.kind.as_str(), error.code);
    metrics.request(None, error.status);
    tracing::info!(
        target: "llmproxy::access",
        request_id = %id,
        method = "-",
        path = "-",
        backend = super::metrics::NO_BACKEND,
        status = error.status,
        stream = false,
        code = error.code,
        "request"
    );
    let mut out = Vec::with_capacity(status_line.len() + 160 + body.len());
    out.extend_from_slice(status_line);
    out.extend_from_slice(b"content-type: application/json\r\nx-request-id: ");
    out.extend_from_slice(id.as_bytes());
    out.extend_from_slice(b"\r\nconnection: close\r\ncontent-length: ");
    out.extend_from_slice(body.len().to_string().as_bytes());
    out.extend_from_slice(b"\r\ndate: ");
    out.extend_from_slice(date);
    out.extend_from_slice(b"\r\n\r\n");
    out.extend_from_slice(&body);
    out
}

/// [`refusal_of`], then [`answer`]: the bytes to write instead of `head`,
/// or `None` to write `head` as it is.
pub fn replacement(head: &[u8], metrics: &Metrics) -> Option<Vec<u8>> {
    let (refusal, status_line, date) = refusal_of(head)?;
    Some(answer(refusal, date, status_line, metrics))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_hypers_refusal_heads_are_recognised() {
        let date = "Tue, 08 Dec 2026 01:25:44 GMT";
        let refusal = |line: &str| format!("{line}\r\nconnection: close\r\ncontent-length: 0\r\ndate: {date}\r\n\r\n");
        let cases: [(String, Option<HeadRefusal>); 8] = [
            (refusal("HTTP/1.1 400 Bad Request"), Some(HeadRefusal::Malformed)),
            (refusal("HTTP/1.1 414 URI Too Long"), Some(HeadRefusal::UriTooLong)),
            (
                refusal("HTTP/1.1 431 Request Header Fields Too Large"),
                Some(HeadRefusal::HeadersTooLarge),
            ),
            // Another status, more headers, a body, another version: not hyper's refusal.
            (refusal("HTTP/1.1 404 Not Found"), None),
            (
                format!("HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\nx-request-id: r\r\ndate: {date}\r\n\r\n"),
                None,
            ),
            (refusal("HTTP/1.1 400 Bad Request") + "{}", None),
            (refusal("HTTP/1.0 400 Bad Request"), None),
            (
                format!("HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 0\r\ndate: {date}\r\n\r\n"),
                None,
            ),
        ];
        for (head, want) in cases {
            assert_eq!(refusal_of(head.as_bytes()).map(|(r, _, _)| r), want, "{head:?}");
        }
    }
}
