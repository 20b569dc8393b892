//! Bounds on a request's head (its target and headers), the same in every
//! host: a request over them is refused before anything reads it, with
//! core's error ([`GatewayError::uri_too_long`],
//! [`GatewayError::headers_too_large`]; nginx's other refusals of a head
//! are [`GatewayError::malformed_request`]).
//!
//! The numbers are nginx's defaults (`large_client_header_buffers 4 8k`:
//! a request line or a header line fits in 8 KiB, the head in four such
//! buffers), so a client meets the same limits behind either host. The
//! gateway checks them itself; nginx applies its own directive, and the
//! module answers nginx's refusals with the same errors.

use crate::policy::errors::GatewayError;

/// Longest request target (path and query), in bytes.
pub const MAX_URI_BYTES: usize = 8 << 10;

/// Largest header (name, `: ` and value), in bytes.
pub const MAX_HEADER_BYTES: usize = 8 << 10;

/// Largest sum of the headers (each as [`MAX_HEADER_BYTES`] counts it), in
/// bytes.
pub const MAX_HEAD_BYTES: usize = 32 << 10;

/// Most bytes of a refused head's path that the logs and `error_handler`
/// see (its target may be far longer).
pub const MAX_SHOWN_PATH_BYTES: usize = 256;

/// The start of a refused head's `path` that the logs and `error_handler`
/// see: at most [`MAX_SHOWN_PATH_BYTES`], cut at a character boundary.
///
/// ```
/// use llmproxy_core::http::head::{shown_path, MAX_SHOWN_PATH_BYTES};
/// assert_eq!(shown_path("/v1/x"), "/v1/x");
/// assert_eq!(shown_path(&"a".repeat(9000)).len(), MAX_SHOWN_PATH_BYTES);
/// ```
pub fn shown_path(path: &str) -> &str {
    let mut end = path.len().min(MAX_SHOWN_PATH_BYTES);
    while !path.is_char_boundary(end) {
        end -= 1;
    }
    &path[..end]
}

/// Which bound a request's head is over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadRefusal {
    /// The target is over [`MAX_URI_BYTES`].
    UriTooLong,
    /// A header is over [`MAX_HEADER_BYTES`], or all of them over
    /// [`MAX_HEAD_BYTES`].
    HeadersTooLarge,
    /// The request's header lines are not what HTTP allows ([`lines`]), or
    /// its method is not one a host reads ([`method`]).
    Malformed,
}

impl HeadRefusal {
    /// The error the client gets.
    pub fn error(self) -> GatewayError {
        match self {
            HeadRefusal::UriTooLong => GatewayError::uri_too_long(),
            HeadRefusal::HeadersTooLarge => GatewayError::headers_too_large(),
            HeadRefusal::Malformed => GatewayError::malformed_request(),
        }
    }
}

/// Whether a request whose target is `uri_bytes` long, with headers of
/// the given (name, value) lengths in bytes, is within the bounds.
///
/// ```
/// use llmproxy_core::http::head::{self, HeadRefusal};
/// assert!(head::check(20, [(13, 30)]).is_ok());
/// assert_eq!(head::check(9000, []), Err(HeadRefusal::UriTooLong));
/// assert_eq!(head::check(20, [(5, 9000)]).unwrap_err().error().status, 431);
/// ```
pub fn check(uri_bytes: usize, headers: impl IntoIterator<Item = (usize, usize)>) -> Result<(), HeadRefusal> {
    if uri_bytes > MAX_URI_BYTES {
        return Err(HeadRefusal::UriTooLong);
    }
    let mut head = 0usize;
    for (name, value) in headers {
        let line = name.saturating_add(value).saturating_add(2);
        head = head.saturating_add(line);
        if line > MAX_HEADER_BYTES || head > MAX_HEAD_BYTES {
            return Err(HeadRefusal::HeadersTooLarge);
        }
    }
    Ok(())
}

/// Headers a request may carry at most once: a second line of one is
/// refused, never merged or picked from. These are the headers nginx
/// itself refuses twice, so a client meets the same rule behind either
/// host: two `Authorization` lines are neither "no key" nor "the first
/// key", two `Content-Length`s or `Transfer-Encoding`s frame no body, and
/// the conditional headers name one validator each.
pub const UNIQUE_HEADERS: [&str; 11] = [
    "host",
    "authorization",
    "content-length",
    "transfer-encoding",
    "content-range",
    "expect",
    "if-match",
    "if-none-match",
    "if-modified-since",
    "if-unmodified-since",
    "if-range",
];

/// Whether a request's header lines, by name (any case), are lines HTTP
/// allows: a header of [`UNIQUE_HEADERS`] at most once, and the host named
/// as RFC 9112 §3.2 requires (in exactly one `Host` line for HTTP/1.1, at
/// most one otherwise). A server MUST refuse any other request; a host
/// does with [`GatewayError::malformed_request`] and closes the
/// connection, as nginx does. (A request with both `Content-Length` and
/// `Transfer-Encoding`, which nginx refuses too, never reaches the
/// gateway's handler: hyper reads its body by `Transfer-Encoding`, and the
/// gateway frames the body it sends upstream itself.)
///
/// ```
/// use llmproxy_core::http::head::{lines, HeadRefusal};
/// assert!(lines(true, ["Host", "Accept", "accept"]).is_ok());
/// assert!(lines(false, ["content-type"]).is_ok());
/// assert_eq!(lines(true, ["accept"]), Err(HeadRefusal::Malformed));
/// assert_eq!(lines(true, ["host", "Authorization", "authorization"]), Err(HeadRefusal::Malformed));
/// ```
pub fn lines<'n>(http11: bool, names: impl IntoIterator<Item = &'n str>) -> Result<(), HeadRefusal> {
    let mut seen = 0u16;
    for name in names {
        let Some(i) = UNIQUE_HEADERS
            .iter()
            .position(|u| u.len() == name.len() && u.eq_ignore_ascii_case(name))
        else {
            continue;
        };
        let bit = 1u16 << i;
        if seen & bit != 0 {
            return Err(HeadRefusal::Malformed);
        }
        seen |= bit;
    }
    // "host" is the first of UNIQUE_HEADERS.
    if http11 && seen & 1 == 0 {
        return Err(HeadRefusal::Malformed);
    }
    Ok(())
}

/// Whether a request's method is one a host reads: a token of uppercase
/// letters, `_` and `-`, as nginx reads one (it refuses `post` or `Get`
/// before any phase runs). A method is case-sensitive (RFC 9110 §9.1), so a
/// lowercase one is no method the API knows, and a backend should not
/// receive it either.
///
/// ```
/// use llmproxy_core::http::head::{method, HeadRefusal};
/// assert!(method("POST").is_ok());
/// assert!(method("M-SEARCH").is_ok());
/// assert_eq!(method("post"), Err(HeadRefusal::Malformed));
/// ```
pub fn method(method: &str) -> Result<(), HeadRefusal> {
    let read = !method.is_empty() && method.bytes().all(|b| b.is_ascii_uppercase() || b == b'_' || b == b'-');
    if read {
        Ok(())
    } else {
        Err(HeadRefusal::Malformed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a case is, the target's length, the headers' (name, value)
    /// lengths, and the status of the refusal (none: within the bounds).
    type Case = (&'static str, usize, Vec<(usize, usize)>, Option<u16>);

    #[test]
    fn heads_within_and_over_the_bounds() {
        let line = MAX_HEADER_BYTES - 2 - 4; // a 4-byte name and its value fill a line
        let cases: &[Case] = &[
            ("no headers", 1, vec![], None),
            ("the longest target", MAX_URI_BYTES, vec![], None),
            ("a target one byte longer", MAX_URI_BYTES + 1, vec![], Some(414)),
            ("the largest header", 1, vec![(4, line)], None),
            ("a header one byte larger", 1, vec![(4, line + 1)], Some(431)),
            ("four largest headers", 1, vec![(4, line); 4], None),
            ("five of them", 1, vec![(4, line); 5], Some(431)),
            ("many small headers within the head", 1, vec![(10, 20); 1000], None),
            (
                "more small headers than the head holds",
                1,
                vec![(10, 20); 1200],
                Some(431),
            ),
        ];
        for (what, uri, headers, refused) in cases {
            let got = check(*uri, headers.iter().copied()).err().map(|e| e.error().status);
            assert_eq!(got, *refused, "{what}");
        }
    }

    #[test]
    fn header_lines_http_allows_and_those_it_does_not() {
        // (what, HTTP/1.1, the header names, accepted)
        let cases: &[(&str, bool, &[&str], bool)] = &[
            ("HTTP/1.1 with a host", true, &["host"], true),
            ("HTTP/1.0 without a host", false, &[], true),
            ("HTTP/1.0 with a host", false, &["Host"], true),
            ("HTTP/1.1 without a host", true, &["accept"], false),
            ("two hosts", true, &["host", "HOST"], false),
            ("two hosts in HTTP/1.0", false, &["host", "host"], false),
            ("a list header twice", true, &["host", "accept", "Accept"], true),
            ("one of each unique header", true, &UNIQUE_HEADERS, true),
            (
                "authorization twice",
                true,
                &["host", "authorization", "Authorization"],
                false,
            ),
            (
                "content-length twice",
                true,
                &["content-length", "host", "content-length"],
                false,
            ),
            (
                "the last unique header twice",
                true,
                &["if-range", "host", "If-Range"],
                false,
            ),
            (
                "a name only one byte longer",
                true,
                &["host", "expects", "expects"],
                true,
            ),
        ];
        for (what, http11, names, accepted) in cases {
            assert_eq!(lines(*http11, names.iter().copied()).is_ok(), *accepted, "{what}");
        }
    }

    #[test]
    fn methods_a_host_reads_and_those_it_refuses() {
        for (m, read) in [
            ("POST", true),
            ("GET", true),
            ("PROPFIND", true),
            ("X_CUSTOM-1", false),
            ("X_CUSTOM-A", true),
            ("post", false),
            ("Post", false),
            ("", false),
            ("PO ST", false),
        ] {
            assert_eq!(method(m).is_ok(), read, "{m:?}");
        }
    }
}
