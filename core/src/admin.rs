//! The admin token policy (docs/adr/038): a host that serves an admin
//! endpoint on an address other hosts can reach refuses to start (or to
//! reload) with a token that is one of the examples shipped in this
//! repository, a well-known placeholder, or shorter than
//! [`MIN_EXPOSED_TOKEN_BYTES`]. On loopback any token is accepted: only
//! local users reach it.

/// The shortest admin token accepted on a listener that is not loopback.
pub const MIN_EXPOSED_TOKEN_BYTES: usize = 16;

/// Tokens shipped in examples and docs, and common placeholders; compared
/// case-insensitively, ignoring surrounding whitespace.
pub const EXAMPLE_TOKENS: &[&str] = &[
    "change-me",
    "change-me-admin-token",
    "changeme",
    "change_me",
    "admin",
    "admin-token",
    "secret",
    "password",
    "token",
    "t0ken",
    "test",
    "example",
];

/// Why `token` must not guard an admin endpoint that is reachable from
/// other hosts; `None` when it may.
pub fn exposed_token_problem(token: &str) -> Option<String> {
    let t = token.trim();
    if EXAMPLE_TOKENS.iter().any(|e| e.eq_ignore_ascii_case(t)) {
        return Some(format!("'{t}' is an example token that ships with llmproxy"));
    }
    if t.len() < MIN_EXPOSED_TOKEN_BYTES {
        return Some(format!(
            "the token is {} bytes long; at least {MIN_EXPOSED_TOKEN_BYTES} are needed",
            t.len()
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_and_short_tokens_are_refused() {
        let cases = [
            ("change-me", true),
            ("change-me-admin-token", true),
            (" CHANGE-ME-ADMIN-TOKEN ", true),
            ("t0ken", true),
            ("short-but-random", false),
            ("0123456789abcde", true),
            ("0123456789abcdef", false),
            ("9f86d081884c7d659a2feaa0c55ad015", false),
        ];
        for (token, refused) in cases {
            assert_eq!(exposed_token_problem(token).is_some(), refused, "{token:?}");
        }
    }
}
