//! `state.url`: where the shared state's Redis is and how to log in, parsed
//! once for every host. The gateway connects with the `redis` crate from
//! these parts, the nginx module with cosockets; neither reads the URL
//! itself, so both log in with the same user and password.
//!
//! - `redis://[[user]:password@]host[:port][/db]`
//! - `rediss://...`: the same over TLS
//! - `redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/master[/db]`
//!   (`rediss+sentinel://`: TLS to the master): the sentinels are asked
//!   for the master at every connection.
//!
//! User and password are percent-decoded (`%40` for `@`, `%3A` for `:`), as
//! URLs spell them; the last `@` ends them, so an unencoded `@` in a
//! password works too. `redis://name@host` names a user without a password,
//! as in any URL (and `redis-cli -u`); a password alone is `:password@`.

use crate::error::redact_url;

/// The parts of a `state.url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisUrl {
    /// TLS to the server (`rediss://`, `rediss+sentinel://`).
    pub tls: bool,
    /// The server (`redis://`, `rediss://`), or the sentinels: `(host,
    /// port)`, an IPv6 host without its brackets.
    pub servers: Vec<(String, u16)>,
    /// The master's name, for a Sentinel URL.
    pub master: Option<String>,
    /// The ACL user (`AUTH user password`), if any.
    pub username: Option<String>,
    /// `AUTH` password.
    pub password: Option<String>,
    /// `SELECT` database.
    pub db: u32,
}

/// Redis' port.
const REDIS_PORT: u16 = 6379;
/// Sentinel's port.
const SENTINEL_PORT: u16 = 26379;

impl RedisUrl {
    /// Parse a `state.url`; the error names what is wrong.
    pub fn parse(url: &str) -> Result<RedisUrl, String> {
        let bad = |what: &str| format!("'{}': {what}", redact_url(url));
        let schemes = [
            ("redis://", false, false),
            ("rediss://", true, false),
            ("redis+sentinel://", false, true),
            ("rediss+sentinel://", true, true),
        ];
        let Some((rest, tls, sentinel)) = schemes
            .iter()
            .find_map(|(s, tls, sentinel)| url.strip_prefix(s).map(|r| (r, *tls, *sentinel)))
        else {
            return Err(bad(
                "must start with redis://, rediss:// (TLS), redis+sentinel:// or rediss+sentinel://",
            ));
        };
        let (auth, rest) = match rest.rsplit_once('@') {
            Some((a, r)) => (Some(a), r),
            None => (None, rest),
        };
        let (username, password) = match auth {
            Some(a) => {
                let (u, p) = a.split_once(':').unwrap_or((a, ""));
                let decode = |s: &str, what: &str| {
                    percent_decode(s)
                        .map(|s| Some(s).filter(|s| !s.is_empty()))
                        .ok_or_else(|| bad(&format!("the {what} is not percent-encoded UTF-8")))
                };
                (decode(u, "user")?, decode(p, "password")?)
            }
            None => (None, None),
        };
        let (hosts, path) = rest.split_once('/').unwrap_or((rest, ""));
        let mut path = path.split('/');
        let master = if sentinel {
            match path.next() {
                Some(m) if !m.is_empty() => Some(m.to_owned()),
                _ => return Err(bad("no master name (.../mymaster)")),
            }
        } else {
            None
        };
        let db = match path.next() {
            None | Some("") => 0,
            Some(d) => d.parse::<u32>().map_err(|_| bad(&format!("bad database '{d}'")))?,
        };
        if path.next().is_some() {
            return Err(bad("too many path parts"));
        }
        let default_port = if sentinel { SENTINEL_PORT } else { REDIS_PORT };
        let servers = hosts
            .split(',')
            .map(|h| host_port(h, default_port).ok_or_else(|| bad(&format!("bad host '{h}'"))))
            .collect::<Result<Vec<_>, String>>()?;
        if !sentinel && servers.len() > 1 {
            return Err(bad("one host (several are for redis+sentinel://)"));
        }
        Ok(RedisUrl {
            tls,
            servers,
            master,
            username,
            password,
            db,
        })
    }

    /// The server's host (the first sentinel's for a Sentinel URL).
    pub fn host(&self) -> &str {
        self.servers.first().map_or("", |(h, _)| h.as_str())
    }

    /// The server's port (the first sentinel's for a Sentinel URL).
    pub fn port(&self) -> u16 {
        self.servers.first().map_or(REDIS_PORT, |(_, p)| *p)
    }

    /// Whether the nginx module can connect to it: one server, no TLS (its
    /// cosockets connect to `redis://` URLs; TLS and Sentinel are the
    /// gateway's).
    pub fn for_nginx(&self) -> Result<(), String> {
        if self.tls || self.master.is_some() {
            return Err(String::from(
                "the nginx module connects to redis:// URLs (TLS and Sentinel are the gateway's)",
            ));
        }
        Ok(())
    }
}

/// `host[:port]`, `[v6]` or `[v6]:port`.
fn host_port(s: &str, default_port: u16) -> Option<(String, u16)> {
    let (host, port) = if let Some(v6) = s.strip_prefix('[') {
        let (host, after) = v6.split_once(']')?;
        match after {
            "" => (host, None),
            p => (host, Some(p.strip_prefix(':')?)),
        }
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        }
    };
    let port = match port {
        Some(p) => p.parse::<u16>().ok().filter(|p| *p != 0)?,
        None => default_port,
    };
    (!host.is_empty() && !host.contains(['/', '@', '?', '#'])).then(|| (host.to_owned(), port))
}

/// `%XX` sequences decoded; `None` when one is malformed or the result is
/// not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(
        tls: bool,
        servers: &[(&str, u16)],
        master: Option<&str>,
        user: Option<&str>,
        pw: Option<&str>,
        db: u32,
    ) -> RedisUrl {
        RedisUrl {
            tls,
            servers: servers.iter().map(|(h, p)| ((*h).to_owned(), *p)).collect(),
            master: master.map(str::to_owned),
            username: user.map(str::to_owned),
            password: pw.map(str::to_owned),
            db,
        }
    }

    #[test]
    fn every_scheme_parses_into_the_same_parts() {
        let cases = [
            (
                "redis://127.0.0.1:6380/2",
                url(false, &[("127.0.0.1", 6380)], None, None, None, 2),
            ),
            (
                "redis://localhost",
                url(false, &[("localhost", 6379)], None, None, None, 0),
            ),
            (
                "redis://:s3cret@localhost/",
                url(false, &[("localhost", 6379)], None, None, Some("s3cret"), 0),
            ),
            (
                "redis://llm:s3:cret@h:1",
                url(false, &[("h", 1)], None, Some("llm"), Some("s3:cret"), 0),
            ),
            (
                "redis://llm:p%40ss%3Aw%25rd@h:1",
                url(false, &[("h", 1)], None, Some("llm"), Some("p@ss:w%rd"), 0),
            ),
            (
                "redis://llm:p@ss@h",
                url(false, &[("h", 6379)], None, Some("llm"), Some("p@ss"), 0),
            ),
            ("redis://llm@h", url(false, &[("h", 6379)], None, Some("llm"), None, 0)),
            (
                "redis://[::1]:7000/3",
                url(false, &[("::1", 7000)], None, None, None, 3),
            ),
            ("redis://[::1]", url(false, &[("::1", 6379)], None, None, None, 0)),
            (
                "rediss://u:p@cache.example:6380",
                url(true, &[("cache.example", 6380)], None, Some("u"), Some("p"), 0),
            ),
            (
                "redis+sentinel://llm:pw@10.0.0.1:26379,10.0.0.2/mymaster/2",
                url(
                    false,
                    &[("10.0.0.1", 26379), ("10.0.0.2", 26379)],
                    Some("mymaster"),
                    Some("llm"),
                    Some("pw"),
                    2,
                ),
            ),
            (
                "rediss+sentinel://:pw@s1:5000/m",
                url(true, &[("s1", 5000)], Some("m"), None, Some("pw"), 0),
            ),
        ];
        for (text, want) in cases {
            assert_eq!(RedisUrl::parse(text), Ok(want), "{text}");
        }
    }

    #[test]
    fn bad_urls_are_named_without_their_password() {
        let cases = [
            ("http://x", "must start with"),
            ("redis://h:1/x", "bad database 'x'"),
            ("redis://h:1/2/3", "too many path parts"),
            ("redis://h:x", "bad host 'h:x'"),
            ("redis://h:0", "bad host 'h:0'"),
            ("redis://:1", "bad host ':1'"),
            ("redis://a,b", "one host"),
            ("redis://u:%zz@h", "password is not percent-encoded"),
            ("redis+sentinel://h:1", "no master name"),
            ("redis+sentinel://h:1/", "no master name"),
            ("redis+sentinel://u:secret@h:x/m", "bad host 'h:x'"),
            ("redis+sentinel://h/m/x", "bad database 'x'"),
        ];
        for (text, want) in cases {
            let e = RedisUrl::parse(text).expect_err(text);
            assert!(e.contains(want), "{text}: {e}");
            assert!(!e.contains("secret"), "{text}: {e}");
        }
    }

    #[test]
    fn nginx_takes_plain_single_servers() {
        assert!(RedisUrl::parse("redis://h").unwrap().for_nginx().is_ok());
        for u in ["rediss://h", "redis+sentinel://h/m"] {
            assert!(RedisUrl::parse(u).unwrap().for_nginx().is_err(), "{u}");
        }
    }
}
