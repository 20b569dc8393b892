//! Header handling between client, gateway and backend.

use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use llmproxy_core::hooks::HeaderChange;
use llmproxy_core::http::hop_by_hop;
use llmproxy_core::http::script_headers::{Message, ScriptHeaders};

/// The hop-by-hop headers of one message (RFC 9110 §7.6.1): the fixed list
/// (core's [`hop_by_hop::is_hop_by_hop`]) plus every name its `Connection`
/// headers list (`Connection: close, X-Secret` makes `X-Secret` one).
struct HopByHop {
    named: Vec<String>,
}

impl HopByHop {
    fn of(map: &HeaderMap) -> HopByHop {
        let named = map
            .get_all(header::CONNECTION)
            .iter()
            .flat_map(|v| hop_by_hop::connection_names(&String::from_utf8_lossy(v.as_bytes())).collect::<Vec<_>>())
            .collect();
        HopByHop { named }
    }

    fn contains(&self, name: &HeaderName) -> bool {
        hop_by_hop::is_hop_by_hop(name.as_str()) || self.named.iter().any(|n| n == name.as_str())
    }
}

/// Client headers to forward upstream: no hop-by-hop headers (nor those
/// the client's `Connection` header names), no `Host` or `Content-Length`
/// (recomputed), no `X-Request-ID` (set by the gateway) and, when the
/// gateway must read the response, no `Accept-Encoding`.
pub fn upstream(client: &HeaderMap, strip_accept_encoding: bool) -> HeaderMap {
    let hop = HopByHop::of(client);
    let mut out = HeaderMap::with_capacity(client.len() + 2);
    for (name, value) in client {
        if hop.contains(name)
            || name == header::HOST
            || name == header::CONTENT_LENGTH
            || name.as_str() == super::request_id::HEADER
            || (strip_accept_encoding && name == header::ACCEPT_ENCODING)
        {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    out
}

/// Backend headers to send to the client: no hop-by-hop headers (nor those
/// the backend's `Connection` header names) and no `Content-Length`
/// (recomputed for the body actually sent).
pub fn downstream(backend: &HeaderMap) -> HeaderMap {
    let hop = HopByHop::of(backend);
    let mut out = HeaderMap::with_capacity(backend.len() + 2);
    for (name, value) in backend {
        if hop.contains(name) || name == header::CONTENT_LENGTH {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    out
}

/// Apply a script's header changes (the engine has dropped those no script
/// may set: core's [`hop_by_hop::script_may_set`]). Values the HTTP layer
/// rejects are skipped with a warning.
pub fn apply(map: &mut HeaderMap, changes: &[(String, HeaderChange)], request_id: &str) {
    for (name, change) in changes {
        let Ok(name) = HeaderName::from_bytes(name.as_bytes()) else {
            continue;
        };
        match change {
            HeaderChange::Remove => {
                map.remove(&name);
            }
            HeaderChange::Set(v) => match HeaderValue::from_str(v) {
                Ok(v) => {
                    map.insert(name, v);
                }
                Err(_) => {
                    tracing::warn!(target: "llmproxy::gateway", request_id, header = %name, "header value rejected; ignored");
                }
            },
        }
    }
}

/// The headers of a `message` as scripts see them (core's rule,
/// [`llmproxy_core::http::script_headers`]).
pub fn for_scripts(map: &HeaderMap, message: Message) -> Vec<(String, String)> {
    let mut out = ScriptHeaders::new(message, map.keys_len());
    for (name, value) in map {
        out.add(name.as_str(), value.as_bytes());
    }
    out.into_pairs()
}

/// The token of `Authorization: Bearer <token>` (core's rule,
/// [`llmproxy_core::http::client::bearer`]).
pub fn bearer(map: &HeaderMap) -> Option<&str> {
    let v = map.get(header::AUTHORIZATION)?.to_str().ok()?;
    llmproxy_core::http::client::bearer(v)
}

/// The `Content-Type` of a message, when it is text.
pub fn content_type(map: &HeaderMap) -> Option<&str> {
    map.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_token() {
        let mut m = HeaderMap::new();
        m.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer sk-1 "));
        assert_eq!(bearer(&m), Some("sk-1"));
    }

    #[test]
    fn connection_named_headers_are_hop_by_hop() {
        let mut m = HeaderMap::new();
        m.append(header::CONNECTION, HeaderValue::from_static("close, X-Secret"));
        m.append(header::CONNECTION, HeaderValue::from_static("x-other"));
        for (k, v) in [
            ("x-secret", "s"),
            ("x-other", "o"),
            ("x-kept", "k"),
            ("upgrade", "h2c"),
            ("proxy-x", "p"),
        ] {
            m.insert(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        for out in [upstream(&m, false), downstream(&m)] {
            let names: Vec<&str> = out.keys().map(HeaderName::as_str).collect();
            assert_eq!(names, ["x-kept"]);
        }
    }

    #[test]
    fn changes_apply_and_values_http_refuses_are_skipped() {
        // (What no script may set never gets here: the engine drops it.)
        let mut m = HeaderMap::new();
        m.insert("x-gone", HeaderValue::from_static("1"));
        m.insert("x-kept", HeaderValue::from_static("2"));
        apply(
            &mut m,
            &[
                ("X-A".into(), HeaderChange::Set("b".into())),
                ("X-Gone".into(), HeaderChange::Remove),
                ("X-Bad".into(), HeaderChange::Set("a\u{7f}b".into())),
            ],
            "r",
        );
        assert_eq!(m.len(), 2);
        assert_eq!((m["x-a"].as_bytes(), m["x-kept"].as_bytes()), (&b"b"[..], &b"2"[..]));
    }
}
