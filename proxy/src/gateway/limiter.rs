//! The standard rate limiter of one process (`state: {backend: local}`)
//! and the types both state backends share.
//!
//! Every limit is a token bucket refilled continuously: a limit of N per
//! minute holds at most N tokens and gains N/60 per second, so a burst of N
//! passes and then one request per 60/N seconds (docs/adr/031). Requests per
//! minute take one token when admitted; tokens per minute are charged after
//! the response (usage), so a key may run into debt and waits until its
//! bucket is positive again. Concurrency counts requests in flight per key.
//! The Redis backend (`redis_state.rs`) runs the same arithmetic in a Lua
//! script inside Redis.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use llmproxy_core::config::LimitsConfig;
use llmproxy_core::hooks::RateLimitStatus;

/// What `rate_limit_status` shows for a limit that is not set.
pub const UNLIMITED: i64 = i32::MAX as i64;

/// Which standard limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKind {
    /// `limits.global_rpm`.
    GlobalRpm,
    /// `limits.key_rpm`.
    KeyRpm,
    /// `limits.key_tpm`.
    KeyTpm,
    /// `limits.key_concurrency`.
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

    /// The stable name (metrics label, error code suffix).
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

/// The limiter's answer for one request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Acquired {
    /// The counters shown to the `rate_limit` script: remaining requests
    /// after this one (when admitted) and requests in flight including it.
    pub status: RateLimitStatus,
    /// `Some` when a limit refused (nothing was taken then).
    pub denial: Option<LimitDenial>,
    /// The key's quota usage as the backend counts it (when asked for).
    pub used: u64,
    /// The quota check (asked for in the same step) refused: nothing was
    /// taken.
    pub quota_exhausted: bool,
}

/// What one request asks of the limiter.
#[derive(Debug, Clone, Copy)]
pub struct AcquireArgs<'a> {
    /// The key's counters (its fingerprint); `None`: global limit only.
    pub key: Option<&'a str>,
    /// The limits in force.
    pub limits: &'a LimitsConfig,
    /// Take even when a limit refuses (a `rate_limit` script allowed it).
    pub force: bool,
}

/// A token bucket refilled continuously.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
    /// The limit the bucket was filled for.
    limit: u64,
}

impl Bucket {
    fn full(limit: u64, now: Instant) -> Bucket {
        Bucket {
            tokens: limit as f64,
            at: now,
            limit,
        }
    }

    /// Refill to `now` for a limit of `limit` per minute. A bucket filled
    /// for another limit (a reload changed it) keeps what was used of the
    /// old one: a raised limit admits at once, a lowered one counts what
    /// was used against the new capacity (docs/adr/041).
    fn refill(&mut self, limit: u64, now: Instant) {
        if limit != self.limit {
            self.tokens = (self.tokens + limit as f64 - self.limit as f64).min(limit as f64);
            self.limit = limit;
        }
        let per_sec = limit as f64 / 60.0;
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + dt * per_sec).min(limit as f64);
        self.at = now;
    }

    /// Seconds until the bucket holds `need` tokens.
    fn wait_for(&self, need: f64, limit: u64) -> f64 {
        let per_sec = limit as f64 / 60.0;
        if per_sec <= 0.0 {
            return 60.0;
        }
        ((need - self.tokens) / per_sec).max(0.0)
    }
}

fn remaining(tokens: f64) -> i64 {
    tokens.floor().max(0.0) as i64
}

#[derive(Debug, Default)]
struct KeyState {
    rpm: Option<Bucket>,
    tpm: Option<Bucket>,
    in_flight: u64,
}

#[derive(Debug, Default)]
struct Counters {
    global: Option<Bucket>,
    keys: HashMap<Arc<str>, KeyState>,
}

/// The limiter of one process (one lock per call).
#[derive(Debug, Default)]
pub struct LocalLimiter {
    inner: Mutex<Counters>,
}

impl LocalLimiter {
    /// A limiter with every bucket full.
    pub fn new() -> LocalLimiter {
        LocalLimiter::default()
    }

    /// Check every limit and, when all pass (or `force`), take a request
    /// token from the global and the key bucket and a concurrency slot.
    pub fn acquire(&self, a: AcquireArgs<'_>) -> Acquired {
        let now = Instant::now();
        let l = a.limits;
        let mut denial: Option<LimitDenial> = None;
        let mut deny = |kind, retry_after: f64| {
            if denial.is_none() {
                denial = Some(LimitDenial { kind, retry_after });
            }
        };
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let Counters { global, keys } = &mut *guard;
        let g = if l.global_rpm > 0 {
            let b = global.get_or_insert_with(|| Bucket::full(l.global_rpm, now));
            b.refill(l.global_rpm, now);
            if b.tokens < 1.0 {
                deny(LimitKind::GlobalRpm, b.wait_for(1.0, l.global_rpm));
            }
            Some(b)
        } else {
            None
        };
        if let Some(k) = a.key.filter(|k| !keys.contains_key(*k)) {
            keys.insert(Arc::from(k), KeyState::default());
        }
        let ks = a.key.and_then(|k| keys.get_mut(k));
        let mut key_remaining = UNLIMITED;
        let mut concurrent = 0i64;
        if let Some(s) = ks {
            if l.key_rpm > 0 {
                let b = s.rpm.get_or_insert_with(|| Bucket::full(l.key_rpm, now));
                b.refill(l.key_rpm, now);
                if b.tokens < 1.0 {
                    deny(LimitKind::KeyRpm, b.wait_for(1.0, l.key_rpm));
                }
            }
            if l.key_tpm > 0 {
                let b = s.tpm.get_or_insert_with(|| Bucket::full(l.key_tpm, now));
                b.refill(l.key_tpm, now);
                if b.tokens <= 0.0 {
                    deny(LimitKind::KeyTpm, b.wait_for(1.0, l.key_tpm));
                }
            }
            if l.key_concurrency > 0 && s.in_flight >= l.key_concurrency {
                deny(LimitKind::Concurrency, 1.0);
            }
            let take = denial.is_none() || a.force;
            if take {
                if let Some(b) = s.rpm.as_mut().filter(|_| l.key_rpm > 0) {
                    b.tokens -= 1.0;
                }
                s.in_flight += 1;
            }
            if l.key_rpm > 0 {
                key_remaining = s.rpm.map_or(0, |b| remaining(b.tokens));
            }
            concurrent = s.in_flight as i64;
        }
        let take = denial.is_none() || a.force;
        let global_remaining = match g {
            Some(b) => {
                if take {
                    b.tokens -= 1.0;
                }
                remaining(b.tokens)
            }
            None => UNLIMITED,
        };
        Acquired {
            status: RateLimitStatus {
                global_remaining,
                key_remaining,
                concurrent_count: concurrent,
            },
            denial: if a.force { None } else { denial },
            used: 0,
            quota_exhausted: false,
        }
    }

    /// Take a request the limits refused (a `rate_limit` script allowed
    /// it): the buckets may go below zero, later requests wait longer.
    pub fn force(&self, key: Option<&str>, limits: &LimitsConfig) -> Acquired {
        self.acquire(AcquireArgs {
            key,
            limits,
            force: true,
        })
    }

    /// Give back what [`LocalLimiter::acquire`] took (a `rate_limit`
    /// script refused a request the limits allowed).
    pub fn refund(&self, key: Option<&str>, limits: &LimitsConfig) {
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if limits.global_rpm > 0 {
            if let Some(b) = guard.global.as_mut() {
                b.tokens = (b.tokens + 1.0).min(limits.global_rpm as f64);
            }
        }
        if let Some(k) = key {
            if let Some(s) = guard.keys.get_mut(k) {
                if let Some(b) = s.rpm.as_mut().filter(|_| limits.key_rpm > 0) {
                    b.tokens = (b.tokens + 1.0).min(limits.key_rpm as f64);
                }
                s.in_flight = s.in_flight.saturating_sub(1);
            }
        }
    }

    /// A request of `key` ended: free its concurrency slot.
    pub fn release(&self, key: &str) {
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = guard.keys.get_mut(key) {
            s.in_flight = s.in_flight.saturating_sub(1);
        }
    }

    /// Charge `tokens` to the key's tokens-per-minute bucket.
    pub fn charge_tokens(&self, key: &str, tokens: u64, limits: &LimitsConfig) {
        if limits.key_tpm == 0 || tokens == 0 {
            return;
        }
        let now = Instant::now();
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let keys = &mut guard.keys;
        if !keys.contains_key(key) {
            keys.insert(Arc::from(key), KeyState::default());
        }
        let Some(s) = keys.get_mut(key) else {
            return;
        };
        let b = s.tpm.get_or_insert_with(|| Bucket::full(limits.key_tpm, now));
        b.refill(limits.key_tpm, now);
        b.tokens -= tokens as f64;
    }

    /// Requests of `key` in flight.
    pub fn in_flight(&self, key: &str) -> u64 {
        let guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        guard.keys.get(key).map_or(0, |s| s.in_flight)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(global: u64, rpm: u64, tpm: u64, conc: u64) -> LimitsConfig {
        LimitsConfig {
            global_rpm: global,
            key_rpm: rpm,
            key_tpm: tpm,
            key_concurrency: conc,
            ..LimitsConfig::default()
        }
    }

    fn take(l: &LocalLimiter, key: &str, lim: &LimitsConfig) -> Acquired {
        l.acquire(AcquireArgs {
            key: Some(key),
            limits: lim,
            force: false,
        })
    }

    #[test]
    fn a_burst_of_n_passes_then_the_bucket_refuses() {
        let l = LocalLimiter::new();
        let lim = limits(0, 5, 0, 0);
        for i in 0..5 {
            let a = take(&l, "k", &lim);
            assert_eq!(a.denial, None, "request {i}");
            assert_eq!(a.status.key_remaining, 4 - i);
            assert_eq!(a.status.global_remaining, UNLIMITED);
            l.release("k");
        }
        let a = take(&l, "k", &lim);
        let d = a.denial.expect("sixth refused");
        assert_eq!(d.kind, LimitKind::KeyRpm);
        assert!(d.retry_after > 11.0 && d.retry_after <= 12.0, "{d:?}");
        // Another key has its own bucket.
        assert_eq!(take(&l, "other", &lim).denial, None);
    }

    #[test]
    fn global_limit_spans_keys_and_refunds_give_back() {
        let l = LocalLimiter::new();
        let lim = limits(3, 0, 0, 0);
        for k in ["a", "b", "c"] {
            assert_eq!(take(&l, k, &lim).denial, None);
        }
        assert_eq!(take(&l, "d", &lim).denial.map(|d| d.kind), Some(LimitKind::GlobalRpm));
        l.refund(Some("c"), &lim);
        assert_eq!(take(&l, "d", &lim).denial, None);
        // force takes anyway and goes into debt.
        let f = l.force(Some("e"), &lim);
        assert_eq!(f.denial, None);
        assert_eq!(f.status.global_remaining, 0);
    }

    #[test]
    fn concurrency_slots_come_back_on_release() {
        let l = LocalLimiter::new();
        let lim = limits(0, 0, 0, 2);
        assert_eq!(take(&l, "k", &lim).status.concurrent_count, 1);
        assert_eq!(take(&l, "k", &lim).status.concurrent_count, 2);
        let refused = take(&l, "k", &lim);
        assert_eq!(refused.denial.map(|d| d.kind), Some(LimitKind::Concurrency));
        assert_eq!(refused.status.concurrent_count, 2);
        l.release("k");
        assert_eq!(l.in_flight("k"), 1);
        assert_eq!(take(&l, "k", &lim).denial, None);
    }

    #[test]
    fn a_changed_limit_keeps_what_was_used_of_the_old_one() {
        let l = LocalLimiter::new();
        let two = limits(0, 2, 0, 0);
        assert_eq!(take(&l, "k", &two).denial, None);
        assert_eq!(take(&l, "k", &two).denial, None);
        assert!(take(&l, "k", &two).denial.is_some(), "2 per minute, both used");
        // Raised to 100: 98 left at once.
        let hundred = limits(0, 100, 0, 0);
        let a = take(&l, "k", &hundred);
        assert_eq!((a.denial, a.status.key_remaining), (None, 97));
        // Lowered to 5 with 3 used: 2 left.
        let five = limits(0, 5, 0, 0);
        assert_eq!(take(&l, "k", &five).status.key_remaining, 1);
        assert_eq!(take(&l, "k", &five).status.key_remaining, 0);
        assert!(take(&l, "k", &five).denial.is_some());
    }

    #[test]
    fn tokens_per_minute_are_charged_after_the_fact() {
        let l = LocalLimiter::new();
        let lim = limits(0, 0, 100, 0);
        assert_eq!(take(&l, "k", &lim).denial, None);
        l.charge_tokens("k", 150, &lim);
        let d = take(&l, "k", &lim).denial.expect("in debt");
        assert_eq!(d.kind, LimitKind::KeyTpm);
        // 51 tokens to make up at 100/60 per second: ~30.6 s.
        assert!(d.retry_after > 30.0 && d.retry_after < 31.0, "{d:?}");
    }
}
