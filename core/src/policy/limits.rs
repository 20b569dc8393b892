//! The standard rate limiter's rule (`limits:`), the same for every host
//! and every local store (docs/adr/031, docs/adr/047).
//!
//! Every limit is a token bucket refilled continuously: a limit of N per
//! minute holds at most N tokens and gains N/60 per second, so a burst of N
//! passes and then one request per 60/N seconds. Requests per minute take
//! one token when admitted; tokens per minute are charged after the
//! response ([`charge`]), so a key may run into debt and waits until its
//! bucket is positive again. Concurrency counts requests in flight per key.
//!
//! The functions here are arithmetic over [`Counters`] a host has loaded
//! from its store (the gateway's map, nginx's shared dict under a lock) and
//! saves back: the store is the host's, the rule is this module's. Time is
//! milliseconds on any clock that does not go back between calls on one
//! store. The Redis backend runs the same arithmetic in a script inside
//! Redis (`proxy/src/gateway/state.rs`), where it must be atomic; the
//! shared cases in `conformance/limits.json` pin the rule.

use serde::Serialize;

use crate::config::LimitsConfig;
use crate::hooks::RateLimitStatus;

/// The period of every `limits:` rate (ms).
const MINUTE_MS: f64 = 60_000.0;

/// What `rate_limit_status` shows for a limit that is not set.
pub const UNLIMITED: i64 = i32::MAX as i64;

/// Which standard limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitKind {
    /// `limits.global_rpm`.
    GlobalRpm,
    /// `limits.key_rpm`.
    KeyRpm,
    /// `limits.key_tpm`.
    KeyTpm,
    /// `limits.key_concurrency`.
    #[serde(rename = "key_concurrency")]
    Concurrency,
}

impl LimitKind {
    /// Every kind, in the order they are checked.
    pub const ALL: [LimitKind; 4] = [
        LimitKind::GlobalRpm,
        LimitKind::KeyRpm,
        LimitKind::KeyTpm,
        LimitKind::Concurrency,
    ];

    /// The stable name (metrics label, Redis script verdict).
    pub fn as_str(self) -> &'static str {
        match self {
            LimitKind::GlobalRpm => "global_rpm",
            LimitKind::KeyRpm => "key_rpm",
            LimitKind::KeyTpm => "key_tpm",
            LimitKind::Concurrency => "key_concurrency",
        }
    }

    /// Parse [`LimitKind::as_str`].
    pub fn parse(s: &str) -> Option<LimitKind> {
        LimitKind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// The error code of the 429 the client gets.
    pub fn code(self) -> &'static str {
        match self {
            LimitKind::GlobalRpm => "global_rate_limit",
            LimitKind::KeyRpm => "key_rate_limit",
            LimitKind::KeyTpm => "key_token_limit",
            LimitKind::Concurrency => "key_concurrency_limit",
        }
    }

    /// What the client is told.
    pub fn message(self) -> &'static str {
        match self {
            LimitKind::GlobalRpm => "the gateway's request rate limit is reached",
            LimitKind::KeyRpm => "this API key's request rate limit is reached",
            LimitKind::KeyTpm => "this API key's token rate limit is reached",
            LimitKind::Concurrency => "this API key has too many requests in flight",
        }
    }
}

/// The standard limiter's refusal.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LimitDenial {
    /// The limit that refused.
    pub kind: LimitKind,
    /// Seconds until a retry can pass (for `Retry-After`).
    pub retry_after: f64,
}

/// One token bucket, as a store keeps it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bucket {
    /// Tokens left (below zero: debt).
    pub tokens: f64,
    /// When `tokens` was last brought up to date (ms).
    pub at_ms: f64,
    /// The limit the bucket was filled for.
    pub limit: u64,
}

impl Bucket {
    /// A full bucket for `limit` per minute.
    pub fn full(limit: u64, now_ms: f64) -> Bucket {
        Bucket {
            tokens: limit as f64,
            at_ms: now_ms,
            limit,
        }
    }

    /// Refill to `now_ms` for a limit of `limit` per minute. A bucket
    /// filled for another limit (a reload changed it) keeps what was used
    /// of the old one: a raised limit admits at once, a lowered one counts
    /// what was used against the new capacity (docs/adr/041).
    pub fn refill(&mut self, limit: u64, now_ms: f64) {
        self.refill_over(limit, MINUTE_MS, now_ms);
    }

    /// [`Bucket::refill`] for `limit` tokens per `window_ms`.
    pub fn refill_over(&mut self, limit: u64, window_ms: f64, now_ms: f64) {
        let cap = limit as f64;
        if limit != self.limit {
            self.tokens = (self.tokens + cap - self.limit as f64).min(cap);
            self.limit = limit;
        }
        let dt = (now_ms - self.at_ms).max(0.0);
        self.tokens = (self.tokens + dt * cap / window_ms.max(1.0)).min(cap);
        self.at_ms = self.at_ms.max(now_ms);
    }

    /// Seconds until the bucket holds `need` tokens.
    pub fn wait_for(&self, need: f64) -> f64 {
        self.wait_for_over(need, MINUTE_MS)
    }

    /// [`Bucket::wait_for`] for a bucket refilled over `window_ms`.
    pub fn wait_for_over(&self, need: f64, window_ms: f64) -> f64 {
        let per_sec = self.limit as f64 * 1000.0 / window_ms.max(1.0);
        if per_sec <= 0.0 {
            return window_ms / 1000.0;
        }
        ((need - self.tokens) / per_sec).max(0.0)
    }

    /// Whole tokens left, never below zero (`rate_limit_status`).
    pub fn remaining(&self) -> i64 {
        self.tokens.floor().max(0.0) as i64
    }

    /// Seconds until the bucket is full again: a store may forget it then
    /// (a missing bucket is a full one).
    pub fn idle_ttl_s(&self) -> f64 {
        if self.limit == 0 {
            return 0.0;
        }
        (self.limit as f64 - self.tokens).max(0.0) * 60.0 / self.limit as f64
    }

    /// The bucket as a store's value: 24 bytes (tokens, time, limit; little
    /// endian), cheaper to write and read than text on every request.
    pub fn to_bytes(&self) -> [u8; 24] {
        let mut out = [0u8; 24];
        out[..8].copy_from_slice(&self.tokens.to_le_bytes());
        out[8..16].copy_from_slice(&self.at_ms.to_le_bytes());
        out[16..].copy_from_slice(&self.limit.to_le_bytes());
        out
    }

    /// Read [`Bucket::to_bytes`]; `None` for anything else (the store then
    /// starts a full bucket).
    pub fn from_bytes(b: &[u8]) -> Option<Bucket> {
        let b: &[u8; 24] = b.try_into().ok()?;
        let f = |i: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[i..i + 8]);
            x
        };
        let tokens = f64::from_le_bytes(f(0));
        let at_ms = f64::from_le_bytes(f(8));
        if !tokens.is_finite() || !at_ms.is_finite() {
            return None;
        }
        Some(Bucket {
            tokens,
            at_ms,
            limit: u64::from_le_bytes(f(16)),
        })
    }
}

/// The counters one request is checked against, as loaded from a store:
/// `None` is a bucket the store does not hold (full).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Counters {
    /// The global requests-per-minute bucket.
    pub global: Option<Bucket>,
    /// The key's requests-per-minute bucket.
    pub rpm: Option<Bucket>,
    /// The key's tokens-per-minute bucket.
    pub tpm: Option<Bucket>,
    /// The key's requests in flight.
    pub in_flight: u64,
}

/// The limiter's answer for one request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Verdict {
    /// The counters shown to the `rate_limit` script: remaining requests
    /// after this one (when taken) and requests in flight including it.
    pub status: RateLimitStatus,
    /// `Some` when a limit refused (nothing was taken then, unless forced).
    pub denial: Option<LimitDenial>,
    /// A request token and a concurrency slot were taken: the host saves
    /// the counters and, for a key, holds the slot until the request ends.
    pub took: bool,
}

fn refilled(b: &mut Option<Bucket>, limit: u64, now_ms: f64) -> Option<&mut Bucket> {
    if limit == 0 {
        return None;
    }
    let b = b.get_or_insert_with(|| Bucket::full(limit, now_ms));
    b.refill(limit, now_ms);
    Some(b)
}

/// Check every limit and, when all pass (or `force`: a `rate_limit` script
/// allowed a refused request), take a request token from the global and
/// the key's bucket and a concurrency slot. `has_key`: the request has a
/// key (its counters are in `c`); without one only the global limit holds.
/// Forced requests may drive buckets below zero: later ones wait longer.
pub fn acquire(limits: &LimitsConfig, c: &mut Counters, has_key: bool, now_ms: f64, force: bool) -> Verdict {
    let mut denial: Option<LimitDenial> = None;
    let mut deny = |kind, retry_after: f64| {
        if denial.is_none() {
            denial = Some(LimitDenial { kind, retry_after });
        }
    };
    let global = refilled(&mut c.global, limits.global_rpm, now_ms);
    if let Some(b) = &global {
        if b.tokens < 1.0 {
            deny(LimitKind::GlobalRpm, b.wait_for(1.0));
        }
    }
    let mut rpm = None;
    if has_key {
        rpm = refilled(&mut c.rpm, limits.key_rpm, now_ms);
        if let Some(b) = &rpm {
            if b.tokens < 1.0 {
                deny(LimitKind::KeyRpm, b.wait_for(1.0));
            }
        }
        if let Some(b) = refilled(&mut c.tpm, limits.key_tpm, now_ms) {
            if b.tokens <= 0.0 {
                deny(LimitKind::KeyTpm, b.wait_for(1.0));
            }
        }
        if limits.key_concurrency > 0 && c.in_flight >= limits.key_concurrency {
            deny(LimitKind::Concurrency, 1.0);
        }
    }
    let took = denial.is_none() || force;
    let mut status = RateLimitStatus {
        global_remaining: UNLIMITED,
        key_remaining: UNLIMITED,
        concurrent_count: 0,
    };
    for b in [global, rpm].into_iter().flatten() {
        if took {
            b.tokens -= 1.0;
        }
    }
    if let Some(b) = c.global.as_ref().filter(|_| limits.global_rpm > 0) {
        status.global_remaining = b.remaining();
    }
    if has_key {
        if let Some(b) = c.rpm.as_ref().filter(|_| limits.key_rpm > 0) {
            status.key_remaining = b.remaining();
        }
        if took {
            c.in_flight += 1;
        }
        status.concurrent_count = i64::try_from(c.in_flight).unwrap_or(i64::MAX);
    }
    Verdict {
        status,
        denial: if force { None } else { denial },
        took,
    }
}

/// Give back what [`acquire`] took (a `rate_limit` script refused a request
/// the limits allowed): a request token to each bucket, capped at its
/// limit, and the concurrency slot.
pub fn refund(limits: &LimitsConfig, c: &mut Counters, has_key: bool) {
    let give = |b: &mut Option<Bucket>, limit: u64| {
        if let Some(b) = b.as_mut().filter(|_| limit > 0) {
            b.tokens = (b.tokens + 1.0).min(limit as f64);
        }
    };
    give(&mut c.global, limits.global_rpm);
    if has_key {
        give(&mut c.rpm, limits.key_rpm);
        c.in_flight = c.in_flight.saturating_sub(1);
    }
}

/// Charge a finished request's `tokens` to the key's tokens-per-minute
/// bucket (`policy::usage::charge`'s `limit_tokens`). Nothing to do when
/// the limit is not set.
pub fn charge(limits: &LimitsConfig, tpm: &mut Option<Bucket>, tokens: u64, now_ms: f64) {
    if tokens == 0 {
        return;
    }
    if let Some(b) = refilled(tpm, limits.key_tpm, now_ms) {
        b.tokens -= tokens as f64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use std::collections::HashMap;

    /// One step of a shared case.
    #[derive(Deserialize)]
    struct Step {
        at_ms: f64,
        op: String,
        #[serde(default)]
        key: Option<String>,
        #[serde(default)]
        tokens: u64,
        #[serde(default)]
        limits: Option<serde_json::Value>,
        #[serde(default)]
        expect: Option<Expect>,
    }

    #[derive(Deserialize)]
    struct Expect {
        #[serde(default)]
        denial: Option<String>,
        #[serde(default)]
        retry_after: Option<f64>,
        #[serde(default)]
        global_remaining: Option<i64>,
        #[serde(default)]
        key_remaining: Option<i64>,
        #[serde(default)]
        concurrent_count: Option<i64>,
    }

    #[derive(Deserialize)]
    struct Case {
        name: String,
        limits: serde_json::Value,
        steps: Vec<Step>,
    }

    /// A store as small as a store gets: the buckets by name.
    #[derive(Default)]
    struct Store {
        global: Option<Bucket>,
        keys: HashMap<String, Counters>,
    }

    impl Store {
        fn load(&self, key: Option<&str>) -> Counters {
            let mut c = key.and_then(|k| self.keys.get(k)).copied().unwrap_or_default();
            c.global = self.global;
            c
        }

        fn save(&mut self, key: Option<&str>, c: Counters) {
            self.global = c.global;
            if let Some(k) = key {
                self.keys.insert(k.to_owned(), c);
            }
        }
    }

    fn limits_of(v: &serde_json::Value) -> LimitsConfig {
        serde_json::from_value(v.clone()).expect("a case's limits")
    }

    /// The shared cases (`conformance/limits.json`; the gateway's store and
    /// nginx's shared dict run them too).
    #[test]
    fn the_shared_cases_hold() {
        let cases: Vec<Case> =
            serde_json::from_str(include_str!("../../../conformance/limits.json")).expect("limits.json");
        assert!(cases.len() >= 8, "limits.json has {} cases", cases.len());
        for case in cases {
            let mut store = Store::default();
            let mut limits = limits_of(&case.limits);
            for (i, step) in case.steps.iter().enumerate() {
                let at = format!("{}: step {}", case.name, i + 1);
                let key = step.key.as_deref();
                let mut c = store.load(key);
                let verdict = match step.op.as_str() {
                    "acquire" | "force" => {
                        Some(acquire(&limits, &mut c, key.is_some(), step.at_ms, step.op == "force"))
                    }
                    "refund" => {
                        refund(&limits, &mut c, key.is_some());
                        None
                    }
                    "release" => {
                        c.in_flight = c.in_flight.saturating_sub(1);
                        None
                    }
                    "charge" => {
                        charge(&limits, &mut c.tpm, step.tokens, step.at_ms);
                        None
                    }
                    "limits" => {
                        limits = limits_of(step.limits.as_ref().expect("a limits step has limits"));
                        None
                    }
                    other => panic!("{at}: unknown op {other}"),
                };
                store.save(key, c);
                let (Some(v), Some(e)) = (verdict, step.expect.as_ref()) else {
                    continue;
                };
                assert_eq!(v.denial.map(|d| d.kind.as_str().to_owned()), e.denial, "{at}: denial");
                if let (Some(want), Some(d)) = (e.retry_after, v.denial) {
                    assert!(
                        (d.retry_after - want).abs() < 0.01,
                        "{at}: retry_after {} != {want}",
                        d.retry_after
                    );
                }
                for (name, want, got) in [
                    ("global_remaining", e.global_remaining, v.status.global_remaining),
                    ("key_remaining", e.key_remaining, v.status.key_remaining),
                    ("concurrent_count", e.concurrent_count, v.status.concurrent_count),
                ] {
                    if let Some(want) = want {
                        assert_eq!(got, want, "{at}: {name}");
                    }
                }
            }
        }
    }

    #[test]
    fn a_bucket_round_trips_through_its_bytes() {
        let b = Bucket {
            tokens: -12.5,
            at_ms: 1_733_300_000_123.25,
            limit: 60,
        };
        assert_eq!(Bucket::from_bytes(&b.to_bytes()), Some(b));
        let mut nan = b.to_bytes();
        nan[..8].copy_from_slice(&f64::NAN.to_le_bytes());
        for bad in [&b""[..], b"1/2/3", &b.to_bytes()[..23], &nan[..]] {
            assert_eq!(Bucket::from_bytes(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn an_idle_bucket_may_be_forgotten_once_it_is_full_again() {
        let mut b = Bucket::full(60, 0.0);
        assert_eq!(b.idle_ttl_s(), 0.0);
        b.tokens = -60.0;
        assert!((b.idle_ttl_s() - 120.0).abs() < 1e-9);
        b.refill(60, 120_000.0);
        assert_eq!(b.tokens, 60.0);
    }

    #[test]
    fn error_codes_are_stable() {
        let codes: Vec<_> = LimitKind::ALL.iter().map(|k| k.code()).collect();
        assert_eq!(
            codes,
            [
                "global_rate_limit",
                "key_rate_limit",
                "key_token_limit",
                "key_concurrency_limit"
            ]
        );
        for k in LimitKind::ALL {
            assert_eq!(LimitKind::parse(k.as_str()), Some(k));
        }
    }
}
