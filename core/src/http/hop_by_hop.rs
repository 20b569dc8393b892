//! Hop-by-hop header names (RFC 9110 §7.6.1): they describe one connection,
//! so a proxy never forwards them and a script never sets them.
//!
//! The fixed list is `Connection`, `Keep-Alive`, `TE`, `Trailer`,
//! `Transfer-Encoding`, `Upgrade`, plus every `Proxy-*` name
//! (`Proxy-Authorization`, `Proxy-Authenticate`, `Proxy-Connection`, ...)
//! and `Proxy` (the httpoxy header). On top of the list, every name a
//! message's `Connection` header lists is hop-by-hop for that message
//! ([`connection_names`]).
//!
//! Two more a host writes itself on every message it sends
//! ([`HOST_COMPUTED`]): scripts may set neither ([`script_may_set`]).

/// The fixed hop-by-hop names, lower case (`proxy-*` is matched by prefix).
pub const NAMES: [&str; 6] = [
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Whether `name` (any case) is a hop-by-hop header name of the fixed list.
pub fn is_hop_by_hop(name: &str) -> bool {
    NAMES.iter().any(|n| n.eq_ignore_ascii_case(name))
        || name.eq_ignore_ascii_case("proxy")
        || name.get(..6).is_some_and(|p| p.eq_ignore_ascii_case("proxy-"))
}

/// Headers a host writes itself on every message it sends: the length of
/// the body it sends (`Content-Length`) and the backend's authority
/// (`Host`; a backend's config may name another, which the standalone
/// gateway sends).
pub const HOST_COMPUTED: [&str; 2] = ["content-length", "host"];

/// Whether a script may set header `name` (any case) on a message: not a
/// hop-by-hop header, nor one the host computes. Every host drops the
/// others from a script's result, with a warning (the engine does it, so
/// hosts apply what is left as it is).
pub fn script_may_set(name: &str) -> bool {
    !is_hop_by_hop(name) && !HOST_COMPUTED.iter().any(|n| n.eq_ignore_ascii_case(name))
}

/// The header names one `Connection` header value lists, lower case:
/// `close, X-Secret` gives `close` and `x-secret` (RFC 9110 §7.6.1:
/// comma-separated tokens with optional whitespace; empty items skipped).
pub fn connection_names(value: &str) -> impl Iterator<Item = String> + '_ {
    value
        .split(',')
        .map(|t| t.trim_matches([' ', '\t']))
        .filter(|t| !t.is_empty())
        .map(str::to_ascii_lowercase)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_list() {
        for name in [
            "Connection",
            "keep-alive",
            "TE",
            "Trailer",
            "Transfer-Encoding",
            "UPGRADE",
            "Proxy-Authorization",
            "proxy-authenticate",
            "Proxy-Connection",
            "Proxy-Anything",
            "Proxy",
        ] {
            assert!(is_hop_by_hop(name), "{name}");
        }
        for name in [
            "Content-Type",
            "X-Upgrade",
            "Proxyx",
            "Tea",
            "Trailers",
            "X-Proxy-A",
            "",
            "prox",
        ] {
            assert!(!is_hop_by_hop(name), "{name}");
        }
    }

    #[test]
    fn what_a_script_may_set() {
        for (name, may) in [
            ("X-User-ID", true),
            ("Content-Type", true),
            ("Retry-After", true),
            ("Content-Length", false),
            ("HOST", false),
            ("Transfer-Encoding", false),
            ("Proxy-Authorization", false),
            ("Hostname", true),
        ] {
            assert_eq!(script_may_set(name), may, "{name}");
        }
    }

    #[test]
    fn connection_header_names() {
        let cases: &[(&str, &[&str])] = &[
            ("close", &["close"]),
            ("close, X-Secret", &["close", "x-secret"]),
            (" keep-alive ,\tX-A,,x-b ", &["keep-alive", "x-a", "x-b"]),
            ("", &[]),
            (" , ", &[]),
        ];
        for (value, want) in cases {
            let got: Vec<String> = connection_names(value).collect();
            assert_eq!(got, *want, "{value}");
        }
    }
}
