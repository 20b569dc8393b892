//! The canonical form of a request path, computed once per request.
//!
//! A host matches endpoints on this form and forwards this form upstream, so
//! a path that an upstream would decode into an endpoint
//! (`/v1/chat/%63ompletions`) is that endpoint for the gateway too, and a
//! path never reaches an upstream with dot segments in it.
//!
//! The steps, on the path only (the query string is not part of the input
//! and is forwarded as the client sent it):
//!
//! 1. Percent-decoding of unreserved characters (RFC 3986 §6.2.2.2:
//!    `ALPHA DIGIT - . _ ~`); every other escape is kept, with upper-case hex
//!    digits (§6.2.2.1). `%2E` is `.`, so `%2E%2E` is a dot segment.
//! 2. Refusals, because an upstream may decode them into something the
//!    gateway did not match on: an encoded `/` (`%2F`) or `\` (`%5C`), which
//!    some servers treat as a separator; an encoded NUL (`%00`), which ends
//!    a string in C servers; and an escape that is not `%` followed by two
//!    hex digits.
//! 3. Duplicate slashes collapse (`//` is `/`, as nginx's `merge_slashes`),
//!    then dot segments are removed (RFC 3986 §5.2.4); a `..` that would
//!    climb above the root is refused rather than clamped, since no
//!    well-behaved client sends one.
//!
//! A trailing slash is kept (`/v1/models/` stays as is), and a path that
//! ends in a dot segment keeps its slash (`/v1/x/..` is `/v1/`).

use std::fmt;

/// Why a request path has no canonical form (hosts answer 400).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    /// The path does not start with `/`.
    NotAbsolute,
    /// A `%` not followed by two hex digits.
    InvalidEscape,
    /// `%2F` or `%5C`: an encoded path separator.
    EncodedSeparator,
    /// `%00`.
    EncodedNul,
    /// A `..` segment above the root.
    AboveRoot,
    /// A space, a control or a non-ASCII byte (RFC 3986: it must be
    /// percent-encoded).
    Unencoded,
}

impl fmt::Display for PathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PathError::NotAbsolute => "the request path must start with '/'",
            PathError::InvalidEscape => "the request path has a '%' that is not followed by two hex digits",
            PathError::EncodedSeparator => "the request path has an encoded '/' or '\\' (%2F, %5C)",
            PathError::EncodedNul => "the request path has an encoded NUL (%00)",
            PathError::AboveRoot => "the request path climbs above the root with '..'",
            PathError::Unencoded => {
                "the request path has a byte that must be percent-encoded (a space, a control or a non-ASCII byte)"
            }
        })
    }
}

impl std::error::Error for PathError {}

/// The canonical form of `path` (no query string), or why there is none.
///
/// ```
/// use llmproxy_core::http::path::{canonical, PathError};
/// assert_eq!(canonical("/v1/chat/%63ompletions").as_deref(), Ok("/v1/chat/completions"));
/// assert_eq!(canonical("/v1//a/./b/../c").as_deref(), Ok("/v1/a/c"));
/// assert_eq!(canonical("/v1/../../x"), Err(PathError::AboveRoot));
/// ```
pub fn canonical(path: &str) -> Result<String, PathError> {
    if !path.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(PathError::Unencoded);
    }
    let rest = path.strip_prefix('/').ok_or(PathError::NotAbsolute)?;
    let mut segments: Vec<String> = Vec::new();
    let mut trailing_slash = false;
    for raw in rest.split('/') {
        let segment = decode_segment(raw)?;
        trailing_slash = matches!(segment.as_str(), "" | "." | "..");
        match segment.as_str() {
            "" | "." => {}
            ".." => {
                segments.pop().ok_or(PathError::AboveRoot)?;
            }
            _ => segments.push(segment),
        }
    }
    let mut out = String::with_capacity(path.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if trailing_slash || out.is_empty() {
        out.push('/');
    }
    Ok(out)
}

/// One segment with unreserved escapes decoded and the others normalized.
fn decode_segment(raw: &str) -> Result<String, PathError> {
    if !raw.contains('%') {
        return Ok(raw.to_owned());
    }
    let bytes = raw.as_bytes();
    let mut out = String::with_capacity(raw.len());
    let mut i = 0;
    while i < bytes.len() {
        let Some(pos) = raw[i..].find('%') else {
            out.push_str(&raw[i..]);
            break;
        };
        out.push_str(&raw[i..i + pos]);
        i += pos;
        let (Some(hi), Some(lo)) = (
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) else {
            return Err(PathError::InvalidEscape);
        };
        let byte = hi << 4 | lo;
        match byte {
            b'/' | b'\\' => return Err(PathError::EncodedSeparator),
            0 => return Err(PathError::EncodedNul),
            b if is_unreserved(b) => out.push(char::from(b)),
            b => {
                const HEX: &[u8; 16] = b"0123456789ABCDEF";
                out.push('%');
                out.push(char::from(HEX[usize::from(b >> 4)]));
                out.push(char::from(HEX[usize::from(b & 15)]));
            }
        }
        i += 3;
    }
    Ok(out)
}

fn hex(b: u8) -> Option<u8> {
    char::from(b).to_digit(16).and_then(|d| u8::try_from(d).ok())
}

/// RFC 3986 §2.3.
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_forms() {
        let cases: &[(&str, Result<&str, PathError>)] = &[
            ("/v1/chat/completions", Ok("/v1/chat/completions")),
            ("/", Ok("/")),
            ("/v1/models/", Ok("/v1/models/")),
            // unreserved escapes are decoded, in either hex case
            ("/v1/chat/%63ompletions", Ok("/v1/chat/completions")),
            ("/v1/chat/%63%6F%6d%70letions", Ok("/v1/chat/completions")),
            ("/%76%31/%65mbeddings", Ok("/v1/embeddings")),
            ("/v1/a%2Db%5Fc%7Ed", Ok("/v1/a-b_c~d")),
            // other escapes stay, upper-cased
            ("/v1/a%20b", Ok("/v1/a%20b")),
            ("/v1/a%3fb", Ok("/v1/a%3Fb")),
            ("/v1/%e4%bd%a0", Ok("/v1/%E4%BD%A0")),
            // duplicate slashes
            ("//v1///chat//completions", Ok("/v1/chat/completions")),
            ("//", Ok("/")),
            // dot segments, plain and encoded
            ("/v1/./chat/completions", Ok("/v1/chat/completions")),
            ("/v1/x/../chat/completions", Ok("/v1/chat/completions")),
            ("/v1/../x", Ok("/x")),
            ("/v1/%2e%2E/x", Ok("/x")),
            ("/v1/.%2e/x", Ok("/x")),
            ("/v1/x/..", Ok("/v1/")),
            ("/v1/x/.", Ok("/v1/x/")),
            ("/v1/..", Ok("/")),
            ("/v1/...", Ok("/v1/...")),
            ("/v1/..x", Ok("/v1/..x")),
            // refusals
            ("/..", Err(PathError::AboveRoot)),
            ("/v1/../../x", Err(PathError::AboveRoot)),
            ("/v1/%2e%2e/%2e%2e/x", Err(PathError::AboveRoot)),
            ("/v1/chat%2Fcompletions", Err(PathError::EncodedSeparator)),
            ("/v1/chat%2fcompletions", Err(PathError::EncodedSeparator)),
            ("/v1/chat%5Ccompletions", Err(PathError::EncodedSeparator)),
            ("/v1/x%00", Err(PathError::EncodedNul)),
            ("/v1/\u{4f60}", Err(PathError::Unencoded)),
            ("/v1/a b", Err(PathError::Unencoded)),
            ("/v1/a\u{0}", Err(PathError::Unencoded)),
            ("/v1/x%", Err(PathError::InvalidEscape)),
            ("/v1/x%4", Err(PathError::InvalidEscape)),
            ("/v1/x%zz", Err(PathError::InvalidEscape)),
            ("/v1/x%%41", Err(PathError::InvalidEscape)),
            ("v1/x", Err(PathError::NotAbsolute)),
            ("", Err(PathError::NotAbsolute)),
            ("*", Err(PathError::NotAbsolute)),
        ];
        for (input, want) in cases {
            let got = canonical(input);
            assert_eq!(got.as_deref().map_err(|e| *e), *want, "{input}");
        }
    }

    #[test]
    fn canonical_is_idempotent() {
        for p in [
            "/v1/chat/%63ompletions",
            "/v1//a/./b/../c/",
            "/v1/a%3fb%20",
            "/v1/%e4%bd%a0",
        ] {
            let once = canonical(p).unwrap();
            assert_eq!(canonical(&once).unwrap(), once, "{p}");
        }
    }

    #[test]
    fn errors_say_what_is_wrong() {
        assert!(PathError::EncodedSeparator.to_string().contains("%2F"));
        assert!(PathError::AboveRoot.to_string().contains(".."));
    }
}
