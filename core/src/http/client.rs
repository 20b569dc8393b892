//! What a client says about itself in its request's headers: the API key
//! it presents and the request id it asks for. Every host reads them with
//! these functions, so a key or an id one host accepts, every host accepts.

/// Longest client-supplied request id accepted.
pub const MAX_REQUEST_ID: usize = 128;

/// Whether a client's `X-Request-ID` may be the request's id: 1 to
/// [`MAX_REQUEST_ID`] visible ASCII characters (a host makes its own id
/// otherwise).
pub fn request_id_acceptable(id: &[u8]) -> bool {
    !id.is_empty() && id.len() <= MAX_REQUEST_ID && id.iter().all(|b| (0x21..=0x7e).contains(b))
}

/// The credentials of `Authorization: Bearer <token>` (the scheme in any
/// case, blanks around the token trimmed); `None` for another scheme or an
/// empty token.
pub fn bearer(authorization: &str) -> Option<&str> {
    let (scheme, token) = authorization.split_once([' ', '\t'])?;
    let token = token.trim_matches([' ', '\t']);
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The API key a client presents: `Authorization: Bearer <key>`, else
/// `x-api-key: <key>` (blanks trimmed, an empty key is none).
pub fn api_key<'a>(authorization: Option<&'a str>, x_api_key: Option<&'a str>) -> Option<&'a str> {
    authorization
        .and_then(bearer)
        .or_else(|| x_api_key.map(|k| k.trim_matches([' ', '\t'])).filter(|k| !k.is_empty()))
}

#[cfg(test)]
mod tests {
    use super::*;

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
