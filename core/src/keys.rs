//! API keys and the standard checks every host computes the same way.
//!
//! A key record carries the seed's `key_info` fields (key, user_id, name,
//! status, total_quota, used_quota, allowed_ips, expires_at). The standard
//! checks (`key_valid`, `status_active`, `not_expired`, `ip_allowed`,
//! `quota_available`) are computed here, not in the hosts, so the gateway and
//! nginx agree on every verdict. Keys are never logged in clear:
//! [`key_fingerprint`] gives the short hash used in logs and the ledger.
//!
//! A record holds its key in clear (`key`) or only its SHA-256
//! (`key_sha256`, docs/adr/039); [`KeyIndex`] finds the record of a key
//! the client presents either way, so every host accepts both forms.

use std::collections::HashMap;
use std::net::IpAddr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::hooks::StandardChecks;

/// One API key, as configured (`keys:` or `keys_file`) and as shown to the
/// `auth` and `rate_limit` scripts (`key_info`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRecord {
    /// The secret the client sends (`Authorization: Bearer <key>` or
    /// `x-api-key`), in clear; empty when only `key_sha256` is stored.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub key: String,
    /// The SHA-256 of the key (64 hex digits), stored instead of `key`
    /// (what `llmproxy keys add` writes). Exactly one of the two is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_sha256: Option<String>,
    /// The user the key belongs to.
    pub user_id: String,
    /// A display name.
    #[serde(default)]
    pub name: String,
    /// `active` or `disabled`.
    #[serde(default)]
    pub status: KeyStatus,
    /// Token quota: `None` (absent, or `unlimited` in the file) means
    /// unlimited. `0`, the old spelling of unlimited, still reads as
    /// unlimited, with a warning ([`KeyRecord::warnings`], docs/adr/041).
    #[serde(default, with = "quota_form")]
    pub total_quota: Option<u64>,
    /// Tokens used so far.
    #[serde(default)]
    pub used_quota: u64,
    /// Client addresses allowed (CIDR, IPv4 or IPv6); empty means any.
    #[serde(default)]
    pub allowed_ips: Vec<String>,
    /// Expiry (RFC 3339); absent means never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
}

/// Whether a key may be used.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyStatus {
    /// In use.
    #[default]
    Active,
    /// Turned off by an operator.
    Disabled,
}

/// An address range such as `192.168.1.0/24`, `10.0.0.1` or `2001:db8::/32`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parse `addr[/prefix]`.
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("'{s}' is not an IP address or CIDR range"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("'{s}': prefix must be 0..={max}"))?,
        };
        Ok(Cidr { addr, prefix })
    }

    /// Whether `ip` is inside this range (IPv4-mapped IPv6 addresses match
    /// IPv4 ranges).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => prefix_eq(&net.octets(), &ip.octets(), self.prefix),
            (IpAddr::V6(net), IpAddr::V6(ip)) => prefix_eq(&net.octets(), &ip.octets(), self.prefix),
            _ => false,
        }
    }
}

fn prefix_eq(a: &[u8], b: &[u8], prefix: u8) -> bool {
    let full = usize::from(prefix / 8);
    let rest = prefix % 8;
    if a[..full] != b[..full] {
        return false;
    }
    if rest == 0 {
        return true;
    }
    let mask = 0xffu8 << (8 - rest);
    (a[full] & mask) == (b[full] & mask)
}

impl KeyRecord {
    /// Check the record's own fields (CIDRs, expiry format); `at` names it.
    pub fn validate(&self, at: &str) -> Vec<String> {
        let mut problems = Vec::new();
        match &self.key_sha256 {
            None if self.key.trim().is_empty() => problems.push(format!("{at}.key: must not be empty")),
            None => {}
            Some(_) if !self.key.is_empty() => {
                problems.push(format!("{at}: set key or key_sha256, not both"));
            }
            Some(h) if parse_digest(h).is_none() => {
                problems.push(format!("{at}.key_sha256: must be 64 hex digits (a SHA-256)"));
            }
            Some(_) => {}
        }
        for (i, c) in self.allowed_ips.iter().enumerate() {
            if let Err(e) = Cidr::parse(c) {
                problems.push(format!("{at}.allowed_ips[{i}]: {e}"));
            }
        }
        if let Some(exp) = &self.expires_at {
            if DateTime::parse_from_rfc3339(exp).is_err() {
                problems.push(format!("{at}.expires_at: '{exp}' is not an RFC 3339 time"));
            }
        }
        problems
    }

    /// The SHA-256 of the key: `key_sha256` as given, else computed from
    /// `key` (an unparsable `key_sha256`, which validation rejects, gives
    /// all zeros and matches nothing a client can send in practice).
    pub fn key_digest(&self) -> [u8; 32] {
        match &self.key_sha256 {
            Some(h) => parse_digest(h).unwrap_or([0; 32]),
            None => Sha256::digest(self.key.as_bytes()).into(),
        }
    }

    /// The key's fingerprint ([`key_fingerprint`]), the same whether the
    /// record holds the key or its hash.
    pub fn fingerprint(&self) -> String {
        fingerprint_of(&self.key_digest())
    }

    /// Whether `secret` is this record's key.
    pub fn matches_secret(&self, secret: &str) -> bool {
        match &self.key_sha256 {
            None => !self.key.is_empty() && self.key == secret,
            Some(_) => <[u8; 32]>::from(Sha256::digest(secret.as_bytes())) == self.key_digest(),
        }
    }

    /// This record with its key replaced by the key's SHA-256 (no change
    /// when it holds a hash already).
    pub fn hashed(mut self) -> KeyRecord {
        if self.key_sha256.is_none() {
            self.key_sha256 = Some(hex(&self.key_digest()));
            self.key.clear();
        }
        self
    }

    /// Whether `client_ip` may use this key (no `allowed_ips` = any).
    /// An unparsable client address never matches a non-empty list.
    pub fn ip_allowed(&self, client_ip: Option<&str>) -> bool {
        if self.allowed_ips.is_empty() {
            return true;
        }
        let Some(ip) = client_ip.and_then(|ip| ip.parse::<IpAddr>().ok()) else {
            return false;
        };
        self.allowed_ips
            .iter()
            .filter_map(|c| Cidr::parse(c).ok())
            .any(|c| c.contains(ip))
    }

    /// Whether the key has expired at `now` (an unparsable expiry counts as
    /// expired: fail closed).
    pub fn expired(&self, now: DateTime<Utc>) -> bool {
        match &self.expires_at {
            None => false,
            Some(exp) => DateTime::parse_from_rfc3339(exp).map_or(true, |e| e <= now),
        }
    }

    /// Whether quota is left.
    pub fn quota_available(&self) -> bool {
        self.quota_limit().is_none_or(|q| self.used_quota < q)
    }

    /// The quota in force: `None` when unlimited (no `total_quota`,
    /// `unlimited`, or the old `0`).
    pub fn quota_limit(&self) -> Option<u64> {
        self.total_quota.filter(|q| *q > 0)
    }

    /// What is worth a warning but still loads; `at` names the record.
    pub fn warnings(&self, at: &str) -> Vec<String> {
        match self.total_quota {
            Some(0) => vec![format!(
                "{at}.total_quota: 0 is read as unlimited (its old meaning); write `unlimited` or leave it out (docs/adr/041)"
            )],
            _ => Vec::new(),
        }
    }

    /// The `key_info` scripts see (`auth`, `rate_limit`): the record's
    /// fields with `used_quota` = `used`, `unlimited` (whether the key has
    /// no quota) and, for an unlimited key, `total_quota` =
    /// [`UNLIMITED_QUOTA`], so a tier check such as the seed's
    /// `key_info.total_quota >= 1000000` puts it in the top tier.
    pub fn key_info(&self, used: u64) -> serde_json::Value {
        let mut info = match serde_json::to_value(self) {
            Ok(serde_json::Value::Object(m)) => m,
            _ => serde_json::Map::new(),
        };
        let limit = self.quota_limit();
        info.insert("total_quota".into(), limit.unwrap_or(UNLIMITED_QUOTA).into());
        info.insert("unlimited".into(), limit.is_none().into());
        info.insert("used_quota".into(), used.into());
        serde_json::Value::Object(info)
    }
}

/// What scripts see as an unlimited key's `total_quota`: 2^53 - 1, the
/// largest integer a Lua number holds exactly.
pub const UNLIMITED_QUOTA: u64 = (1 << 53) - 1;

/// `total_quota` in a keys file: a number, or `unlimited` / absent / null.
mod quota_form {
    use serde::{Deserialize, Deserializer, Serializer};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Form {
        Number(u64),
        Word(String),
    }

    pub fn serialize<S: Serializer>(q: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
        match q {
            Some(n) => s.serialize_u64(*n),
            None => s.serialize_str("unlimited"),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        match Option::<Form>::deserialize(d)? {
            None => Ok(None),
            Some(Form::Number(n)) => Ok(Some(n)),
            Some(Form::Word(w)) if w.trim().eq_ignore_ascii_case("unlimited") => Ok(None),
            Some(Form::Word(w)) => Err(serde::de::Error::custom(format!(
                "total_quota must be a number of tokens or `unlimited`, not '{w}'"
            ))),
        }
    }
}

/// The standard checks for a request that presented `key` (or none).
pub fn standard_checks(key: Option<&KeyRecord>, client_ip: Option<&str>, now: DateTime<Utc>) -> StandardChecks {
    match key {
        None => StandardChecks {
            key_valid: false,
            status_active: false,
            not_expired: false,
            ip_allowed: false,
            quota_available: false,
        },
        Some(k) => StandardChecks {
            key_valid: true,
            status_active: k.status == KeyStatus::Active,
            not_expired: !k.expired(now),
            ip_allowed: k.ip_allowed(client_ip),
            quota_available: k.quota_available(),
        },
    }
}

/// [`standard_checks`] with the key's live usage: hosts that count usage
/// outside the record (a ledger, a shared store) pass it as `used_quota`
/// instead of copying the record per request.
pub fn standard_checks_with_usage(
    key: Option<&KeyRecord>,
    used_quota: u64,
    client_ip: Option<&str>,
    now: DateTime<Utc>,
) -> StandardChecks {
    let mut checks = standard_checks(key, client_ip, now);
    if let Some(k) = key {
        checks.quota_available = k.quota_limit().is_none_or(|q| used_quota < q);
    }
    checks
}

/// Why the standard checks deny, with the HTTP status the hosts answer.
/// `None` when every check passed.
/// ([`crate::admission::standard_denial`] has the error code too.)
pub fn standard_denial(checks: &StandardChecks) -> Option<(u16, &'static str)> {
    crate::admission::standard_denial(checks).map(|d| (d.status, d.message))
}

/// A short, stable fingerprint of a key for logs and the ledger
/// (`sha256:` + the first 12 hex digits); the key itself is never logged.
pub fn key_fingerprint(key: &str) -> String {
    fingerprint_of(&Sha256::digest(key.as_bytes()).into())
}

fn fingerprint_of(digest: &[u8; 32]) -> String {
    format!("sha256:{}", hex(&digest[..6]))
}

/// Lowercase hex of `bytes`.
fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// The SHA-256 of `key` as 64 lowercase hex digits (the `key_sha256` form).
pub fn key_sha256_hex(key: &str) -> String {
    hex(&Sha256::digest(key.as_bytes()))
}

/// Parse 64 hex digits (either case).
fn parse_digest(text: &str) -> Option<[u8; 32]> {
    let t = text.trim().as_bytes();
    if t.len() != 64 {
        return None;
    }
    let nibble = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = [0u8; 32];
    for (i, pair) in t.chunks_exact(2).enumerate() {
        out[i] = nibble(pair[0])? << 4 | nibble(pair[1])?;
    }
    Some(out)
}

/// Finds the record of the key a client presents, whether records hold
/// keys in clear or only their SHA-256. A presented key is hashed only
/// when some record is stored hashed and no clear key matched.
#[derive(Debug, Clone, Default)]
pub struct KeyIndex {
    plain: HashMap<String, usize>,
    hashed: HashMap<[u8; 32], usize>,
}

impl KeyIndex {
    /// Index `records` (positions into the slice; the first of duplicates
    /// wins, configs reject duplicates anyway).
    pub fn new(records: &[KeyRecord]) -> KeyIndex {
        let mut index = KeyIndex::default();
        for (i, r) in records.iter().enumerate() {
            if r.key_sha256.is_some() {
                index.hashed.entry(r.key_digest()).or_insert(i);
            } else if !r.key.is_empty() {
                index.plain.entry(r.key.clone()).or_insert(i);
            }
        }
        index
    }

    /// The position of the record whose key is `presented`.
    pub fn find(&self, presented: &str) -> Option<usize> {
        if let Some(i) = self.plain.get(presented) {
            return Some(*i);
        }
        if self.hashed.is_empty() {
            return None;
        }
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        self.hashed.get(&digest).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> KeyRecord {
        KeyRecord {
            key: "sk-test".into(),
            key_sha256: None,
            user_id: "u1".into(),
            name: "test".into(),
            status: KeyStatus::Active,
            total_quota: Some(100),
            used_quota: 10,
            allowed_ips: vec!["192.168.1.0/24".into(), "2001:db8::/32".into(), "10.0.0.7".into()],
            expires_at: Some("2026-12-31T23:59:59Z".into()),
        }
    }

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).map(|d| d.with_timezone(&Utc)).unwrap()
    }

    #[test]
    fn cidr_matching_is_exact_at_the_prefix_boundary() {
        let cases = [
            ("192.168.1.0/24", "192.168.1.255", true),
            ("192.168.1.0/24", "192.168.2.0", false),
            ("192.168.1.0/23", "192.168.0.9", true),
            ("10.0.0.7", "10.0.0.7", true),
            ("10.0.0.7", "10.0.0.8", false),
            ("0.0.0.0/0", "8.8.8.8", true),
            ("2001:db8::/32", "2001:db8:ffff::1", true),
            ("2001:db8::/32", "2001:db9::1", false),
            ("192.168.1.0/24", "::ffff:192.168.1.3", true),
            ("192.168.1.0/24", "2001:db8::1", false),
            ("172.16.0.0/12", "172.31.255.255", true),
            ("172.16.0.0/12", "172.32.0.0", false),
        ];
        for (cidr, ip, want) in cases {
            let c = Cidr::parse(cidr).unwrap();
            assert_eq!(c.contains(ip.parse().unwrap()), want, "{cidr} contains {ip}");
        }
        for bad in ["", "300.1.1.1", "10.0.0.0/33", "::/129", "abc/8", "10.0.0.0/x"] {
            assert!(Cidr::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn standard_checks_follow_each_field() {
        let now = at("2026-06-01T00:00:00Z");
        let ip = Some("192.168.1.100");
        let all = standard_checks(Some(&key()), ip, now);
        assert!(all.all_passed(), "{all:?}");
        assert_eq!(standard_denial(&all), None);

        let none = standard_checks(None, ip, now);
        assert_eq!(standard_denial(&none), Some((401, "invalid or missing API key")));

        let mut disabled = key();
        disabled.status = KeyStatus::Disabled;
        assert_eq!(
            standard_denial(&standard_checks(Some(&disabled), ip, now)).map(|d| d.0),
            Some(403)
        );

        let expired = standard_checks(Some(&key()), ip, at("2027-01-01T00:00:00Z"));
        assert!(!expired.not_expired);
        assert_eq!(standard_denial(&expired), Some((403, "API key has expired")));

        let wrong_ip = standard_checks(Some(&key()), Some("8.8.8.8"), now);
        assert!(!wrong_ip.ip_allowed);
        let no_ip = standard_checks(Some(&key()), None, now);
        assert!(!no_ip.ip_allowed);

        let mut spent = key();
        spent.used_quota = 100;
        let spent = standard_checks(Some(&spent), ip, now);
        assert_eq!(standard_denial(&spent), Some((429, "API key quota is exhausted")));

        let mut unlimited = key();
        unlimited.total_quota = None;
        unlimited.used_quota = u64::MAX;
        unlimited.allowed_ips.clear();
        unlimited.expires_at = None;
        assert!(standard_checks(Some(&unlimited), None, now).all_passed());
    }

    #[test]
    fn live_usage_replaces_the_records_used_quota() {
        let now = at("2026-06-01T00:00:00Z");
        let ip = Some("192.168.1.100");
        let k = key();
        assert!(standard_checks_with_usage(Some(&k), 99, ip, now).quota_available);
        let spent = standard_checks_with_usage(Some(&k), 100, ip, now);
        assert!(!spent.quota_available && spent.key_valid && spent.ip_allowed);
        let mut unlimited = key();
        unlimited.total_quota = None;
        assert!(standard_checks_with_usage(Some(&unlimited), u64::MAX, ip, now).quota_available);
        assert!(!standard_checks_with_usage(None, 0, ip, now).quota_available);
    }

    #[test]
    fn validation_names_each_bad_field_and_fingerprints_hide_the_key() {
        let mut k = key();
        k.allowed_ips.push("10.0.0.0/99".into());
        k.expires_at = Some("tomorrow".into());
        let problems = k.validate("keys[0]");
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].starts_with("keys[0].allowed_ips[3]:"));
        assert!(problems[1].starts_with("keys[0].expires_at:"));

        let f = key_fingerprint("sk-secret-123");
        assert_eq!(f.len(), "sha256:".len() + 12);
        assert!(!f.contains("secret"));
        assert_eq!(f, key_fingerprint("sk-secret-123"));
        assert_ne!(f, key_fingerprint("sk-secret-124"));
    }

    #[test]
    fn hashed_records_match_their_key_and_fingerprint_alike() {
        let plain = key();
        let hashed = key().hashed();
        assert!(hashed.key.is_empty());
        assert_eq!(hashed.key_sha256.as_deref(), Some(key_sha256_hex("sk-test").as_str()));
        assert_eq!(hashed.fingerprint(), plain.fingerprint());
        assert_eq!(plain.fingerprint(), key_fingerprint("sk-test"));
        assert!(hashed.matches_secret("sk-test") && plain.matches_secret("sk-test"));
        assert!(!hashed.matches_secret("sk-tesT") && !plain.matches_secret(""));
        assert!(hashed.validate("k").is_empty(), "{:?}", hashed.validate("k"));
        let mut upper = key().hashed();
        upper.key_sha256 = upper.key_sha256.map(|h| h.to_uppercase());
        assert!(upper.validate("k").is_empty() && upper.matches_secret("sk-test"));

        // (key, key_sha256, problem)
        let cases = [
            ("", None, Some("k.key: must not be empty")),
            ("sk-x", Some("ab"), Some("k: set key or key_sha256, not both")),
            ("", Some("abc"), Some("k.key_sha256: must be 64 hex digits (a SHA-256)")),
            (
                "",
                Some(&"zz".repeat(32)[..]),
                Some("k.key_sha256: must be 64 hex digits (a SHA-256)"),
            ),
        ];
        for (k, h, want) in cases {
            let mut r = key();
            r.key = k.into();
            r.key_sha256 = h.map(str::to_owned);
            assert_eq!(r.validate("k").first().map(String::as_str), want, "{k:?} {h:?}");
        }

        let mut other = key();
        other.key = "sk-other".into();
        let records = [plain.clone(), other.clone().hashed()];
        let index = KeyIndex::new(&records);
        assert_eq!(index.find("sk-test"), Some(0));
        assert_eq!(index.find("sk-other"), Some(1));
        assert_eq!(index.find("sk-none"), None);
        assert_eq!(index.find(""), None);
        assert_eq!(KeyIndex::new(&[plain]).find("sk-other"), None);
    }

    #[test]
    fn unlimited_is_explicit_in_the_record_and_top_tier_for_scripts() {
        // (total_quota in the file, quota in force, warns, key_info.total_quota)
        let cases: [(&str, Option<u64>, bool, u64); 5] = [
            ("", None, false, UNLIMITED_QUOTA),
            (", total_quota: unlimited", None, false, UNLIMITED_QUOTA),
            (", total_quota: null", None, false, UNLIMITED_QUOTA),
            (", total_quota: 0", None, true, UNLIMITED_QUOTA),
            (", total_quota: 100000", Some(100_000), false, 100_000),
        ];
        for (field, limit, warns, seen) in cases {
            let r: KeyRecord = serde_norway::from_str(&format!("{{key: sk-a, user_id: u{field}}}")).unwrap();
            assert_eq!(r.quota_limit(), limit, "{field}");
            assert_eq!(!r.warnings("k").is_empty(), warns, "{field}");
            let info = r.key_info(7);
            assert_eq!(info["total_quota"], seen, "{field}");
            assert_eq!(info["unlimited"], limit.is_none(), "{field}");
            assert_eq!(info["used_quota"], 7);
            // The seed's tier check puts unlimited keys at the top.
            assert_eq!(
                info["total_quota"].as_u64().unwrap() >= 1_000_000,
                limit.is_none(),
                "{field}"
            );
        }
        let unlimited: KeyRecord = serde_norway::from_str("{key: sk-a, user_id: u}").unwrap();
        assert!(serde_norway::to_string(&unlimited)
            .unwrap()
            .contains("total_quota: unlimited"));
        assert!(serde_norway::from_str::<KeyRecord>("{key: sk-a, user_id: u, total_quota: lots}").is_err());
        assert!(serde_norway::from_str::<KeyRecord>("{key: sk-a, user_id: u, total_quota: -1}").is_err());
    }
}
