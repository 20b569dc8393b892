//! What a client says about itself in its request's headers: the API key
//! it presents and the request id it asks for. Every host reads them with
//! these functions, so a key or an id one host accepts, every host accepts,
//! and every host makes its own ids the same way.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

/// Longest client-supplied request id accepted.
pub const MAX_REQUEST_ID: usize = 128;

/// Whether a client's `X-Request-ID` may be the request's id: 1 to
/// [`MAX_REQUEST_ID`] visible ASCII characters (a host makes its own id
/// otherwise).
pub fn request_id_acceptable(id: &[u8]) -> bool {
    !id.is_empty() && id.len() <= MAX_REQUEST_ID && id.iter().all(|b| (0x21..=0x7e).contains(b))
}

/// The request's id: the client's `X-Request-ID` when acceptable
/// ([`request_id_acceptable`]), else a new one ([`new_request_id`]).
pub fn request_id(client: Option<&[u8]>) -> String {
    match client {
        Some(id) if request_id_acceptable(id) => String::from_utf8_lossy(id).into_owned(),
        _ => new_request_id(),
    }
}

/// A new request id, `req_` + 24 hex digits: a per-process random prefix
/// and a counter, so ids are unique within a process (an nginx worker, a
/// gateway) and unlikely to collide across processes. No system call and
/// no entropy per id.
pub fn new_request_id() -> String {
    static PREFIX: OnceLock<u64> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let prefix = *PREFIX.get_or_init(|| {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        splitmix(nanos ^ (u64::from(std::process::id()) << 32))
    });
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    // Written digit by digit: `format!` cost ten times as much, on every
    // request.
    let mut id = String::with_capacity(28);
    id.push_str("req_");
    push_hex(&mut id, prefix & 0xffff_ffff, 8);
    push_hex(&mut id, splitmix(prefix ^ n), 16);
    id
}

/// Append the `digits` low hex digits of `x`, lowercase, zero-padded.
fn push_hex(out: &mut String, x: u64, digits: u32) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for i in (0..digits).rev() {
        out.push(char::from(HEX[((x >> (4 * i)) & 0xf) as usize]));
    }
}

/// SplitMix64's finalizer: a bijection that spreads a counter's bits.
fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The credentials of `Authorization: Bearer <token>` (the scheme in any
/// case, blanks around the token trimmed); `None` for another scheme or an
/// empty token.
pub fn bearer(authorization: &str) -> Option<&str> {
    let (scheme, token) = authorization.split_once([' ', '\t'])?;
    let token = token.trim_matches([' ', '\t']);
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The value of a header the client sent once; `None` when it sent none
/// or several. A credential header sent twice is ambiguous (a proxy in
/// front may have read the other one), so hosts pass [`api_key`] the
/// headers through this: neither value is used.
pub fn sole<'a, I: IntoIterator<Item = &'a str>>(values: I) -> Option<&'a str> {
    let mut it = values.into_iter();
    let first = it.next()?;
    it.next().is_none().then_some(first)
}

/// The API key a client presents: `Authorization: Bearer <key>`, else
/// `x-api-key: <key>` (blanks trimmed, an empty key is none); each header
/// as [`sole`] reads it.
pub fn api_key<'a>(authorization: Option<&'a str>, x_api_key: Option<&'a str>) -> Option<&'a str> {
    authorization
        .and_then(bearer)
        .or_else(|| x_api_key.map(|k| k.trim_matches([' ', '\t'])).filter(|k| !k.is_empty()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_the_clients_when_sane_else_new() {
        assert_eq!(request_id(Some(b"abc-123")), "abc-123");
        for bad in [
            None,
            Some(&b""[..]),
            Some(b"has space"),
            Some(b"tab\t"),
            Some(&[b'x'; 129][..]),
            Some(b"\xff"),
        ] {
            let id = request_id(bad);
            assert!(id.starts_with("req_") && id.len() == 28, "{id}");
            assert!(id[4..].bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
        }
        assert_ne!(new_request_id(), new_request_id());
    }

    #[test]
    fn hex_digits_are_formats() {
        for x in [0, 1, 0xf, 0x10, 0xdead_beef, 0x0123_4567_89ab_cdef, u64::MAX] {
            let (mut eight, mut sixteen) = (String::new(), String::new());
            push_hex(&mut eight, x & 0xffff_ffff, 8);
            push_hex(&mut sixteen, x, 16);
            assert_eq!(eight, format!("{:08x}", x as u32));
            assert_eq!(sixteen, format!("{x:016x}"));
        }
    }

    #[test]
    fn a_header_sent_twice_presents_nothing() {
        assert_eq!(sole([]), None);
        assert_eq!(sole(["Bearer a"]), Some("Bearer a"));
        assert_eq!(sole(["Bearer a", "Bearer b"]), None);
        assert_eq!(api_key(sole(["Bearer a", "Bearer b"]), sole(["sk-x"])), Some("sk-x"));
    }

    #[test]
    fn keys_come_from_bearer_else_x_api_key() {
        let cases: &[(Option<&str>, Option<&str>, Option<&str>)] = &[
            (None, None, None),
            (None, Some(" sk-b "), Some("sk-b")),
            (Some("Bearer sk-a"), Some("sk-b"), Some("sk-a")),
            (Some("bearer \tsk-a "), None, Some("sk-a")),
            (Some("BEARER sk-a"), None, Some("sk-a")),
            (Some("Bearer "), Some("sk-b"), Some("sk-b")),
            (Some("Bearer"), None, None),
            (Some("Basic dXNlcjpwYXNz"), Some("sk-b"), Some("sk-b")),
            (Some(" Bearer sk-a"), None, None),
            (None, Some(" \t"), None),
        ];
        for (auth, x, want) in cases {
            assert_eq!(api_key(*auth, *x), *want, "{auth:?} {x:?}");
        }
    }

    #[test]
    fn request_ids_are_short_visible_ascii() {
        assert!(request_id_acceptable(b"abc-123"));
        assert!(request_id_acceptable(&[b'x'; MAX_REQUEST_ID]));
        for bad in [
            &b""[..],
            b"has space",
            b"tab\t",
            &[b'x'; MAX_REQUEST_ID + 1][..],
            b"\xff",
        ] {
            assert!(!request_id_acceptable(bad), "{bad:?}");
        }
    }
}
