//! The standard rate limiter of one process (`state: {backend: local}`):
//! the core's token buckets (`llmproxy_core::policy::limits`, the rule
//! nginx's shared dict runs too) kept in a map under one lock, and the
//! types both state backends share. The Redis backend (`state.rs`) runs
//! the same arithmetic in a script inside Redis.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use llmproxy_core::config::LimitsConfig;
use llmproxy_core::hooks::RateLimitStatus;
use llmproxy_core::policy::limits::{self, Bucket, Counters};
pub use llmproxy_core::policy::limits::{LimitDenial, LimitKind, UNLIMITED};

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

#[derive(Debug, Default, Clone, Copy)]
struct KeyState {
    rpm: Option<Bucket>,
    tpm: Option<Bucket>,
    in_flight: u64,
}

impl KeyState {
    /// Nothing in flight and every bucket full again at `now_ms`: the same
    /// as no state at all (a missing bucket is a full one).
    fn idle(&self, now_ms: f64) -> bool {
        let full = |b: &Option<Bucket>| b.is_none_or(|b| b.at_ms + b.idle_ttl_s() * 1000.0 <= now_ms);
        self.in_flight == 0 && full(&self.rpm) && full(&self.tpm)
    }
}

/// Keys tracked before idle ones are swept out. Per-key counters are kept
/// for every presented key (with auth off, any string): without a sweep,
/// random keys would grow the map without bound.
const SWEEP_AT: usize = 65_536;

#[derive(Debug)]
struct Store {
    global: Option<Bucket>,
    keys: HashMap<Arc<str>, KeyState>,
    /// The size at which the next sweep runs (doubles when a sweep frees
    /// little, so that sweeps stay amortized O(1) per new key).
    sweep_at: usize,
}

impl Default for Store {
    fn default() -> Self {
        Store {
            global: None,
            keys: HashMap::new(),
            sweep_at: SWEEP_AT,
        }
    }
}

impl Store {
    /// Run `f` over the counters of `key` (created when missing) and keep
    /// what it leaves.
    fn with<T>(&mut self, key: Option<&str>, now_ms: f64, f: impl FnOnce(&mut Counters) -> T) -> T {
        if let Some(k) = key.filter(|k| !self.keys.contains_key(*k)) {
            if self.keys.len() >= self.sweep_at {
                self.keys.retain(|_, s| !s.idle(now_ms));
                self.sweep_at = (self.keys.len() * 2).max(SWEEP_AT);
            }
            self.keys.insert(Arc::from(k), KeyState::default());
        }
        let slot = key.and_then(|k| self.keys.get_mut(k));
        let ks = slot.as_deref().copied().unwrap_or_default();
        let mut c = Counters {
            global: self.global,
            rpm: ks.rpm,
            tpm: ks.tpm,
            in_flight: ks.in_flight,
        };
        let out = f(&mut c);
        self.global = c.global;
        if let Some(ks) = slot {
            *ks = KeyState {
                rpm: c.rpm,
                tpm: c.tpm,
                in_flight: c.in_flight,
            };
        }
        out
    }
}

/// The limiter of one process (one lock per call).
#[derive(Debug)]
pub struct LocalLimiter {
    inner: Mutex<Store>,
    /// Where the limiter's clock starts (ms are counted from it).
    origin: Instant,
}

impl Default for LocalLimiter {
    fn default() -> Self {
        LocalLimiter::new()
    }
}

impl LocalLimiter {
    /// A limiter with every bucket full.
    pub fn new() -> LocalLimiter {
        LocalLimiter {
            inner: Mutex::new(Store::default()),
            origin: Instant::now(),
        }
    }

    fn now_ms(&self) -> f64 {
        self.origin.elapsed().as_secs_f64() * 1000.0
    }

    fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Check every limit and, when all pass (or `force`), take a request
    /// token from the global and the key bucket and a concurrency slot.
    pub fn acquire(&self, a: AcquireArgs<'_>) -> Acquired {
        self.acquire_at(a, self.now_ms())
    }

    /// [`LocalLimiter::acquire`] at `now_ms` on the limiter's clock.
    fn acquire_at(&self, a: AcquireArgs<'_>, now_ms: f64) -> Acquired {
        let v = self.store().with(a.key, now_ms, |c| {
            limits::acquire(a.limits, c, a.key.is_some(), now_ms, a.force)
        });
        Acquired {
            status: v.status,
            denial: v.denial,
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
    pub fn refund(&self, key: Option<&str>, lim: &LimitsConfig) {
        let now_ms = self.now_ms();
        self.store()
            .with(key, now_ms, |c| limits::refund(lim, c, key.is_some()));
    }

    /// A request of `key` ended: free its concurrency slot.
    pub fn release(&self, key: &str) {
        if let Some(s) = self.store().keys.get_mut(key) {
            s.in_flight = s.in_flight.saturating_sub(1);
        }
    }

    /// Charge `tokens` to the key's tokens-per-minute bucket.
    pub fn charge_tokens(&self, key: &str, tokens: u64, lim: &LimitsConfig) {
        self.charge_tokens_at(key, tokens, lim, self.now_ms());
    }

    fn charge_tokens_at(&self, key: &str, tokens: u64, lim: &LimitsConfig, now_ms: f64) {
        if lim.key_tpm == 0 || tokens == 0 {
            return;
        }
        self.store()
            .with(Some(key), now_ms, |c| limits::charge(lim, &mut c.tpm, tokens, now_ms));
    }

    /// Requests of `key` in flight.
    pub fn in_flight(&self, key: &str) -> u64 {
        self.store().keys.get(key).map_or(0, |s| s.in_flight)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn limits_of(v: &Value) -> LimitsConfig {
        serde_json::from_value(v.clone()).expect("a case's limits")
    }

    /// The core's shared cases through this store (the map, the lock,
    /// release and charge as the gateway calls them).
    #[test]
    fn the_shared_cases_hold_in_this_store() {
        let cases: Vec<Value> =
            serde_json::from_str(include_str!("../../../conformance/limits.json")).expect("limits.json");
        for case in &cases {
            let name = case["name"].as_str().unwrap_or("?");
            let l = LocalLimiter::new();
            let mut lim = limits_of(&case["limits"]);
            for (i, step) in case["steps"].as_array().into_iter().flatten().enumerate() {
                let at = format!("{name}: step {}", i + 1);
                let now = step["at_ms"].as_f64().expect("at_ms");
                let key = step["key"].as_str();
                let got = match step["op"].as_str() {
                    Some(op @ ("acquire" | "force")) => Some(l.acquire_at(
                        AcquireArgs {
                            key,
                            limits: &lim,
                            force: op == "force",
                        },
                        now,
                    )),
                    Some("refund") => {
                        l.refund(key, &lim);
                        None
                    }
                    Some("release") => {
                        l.release(key.expect("release names a key"));
                        None
                    }
                    Some("charge") => {
                        let tokens = step["tokens"].as_u64().unwrap_or(0);
                        l.charge_tokens_at(key.expect("charge names a key"), tokens, &lim, now);
                        None
                    }
                    Some("limits") => {
                        lim = limits_of(&step["limits"]);
                        None
                    }
                    other => panic!("{at}: unknown op {other:?}"),
                };
                let (Some(a), Some(e)) = (got, step.get("expect")) else {
                    continue;
                };
                assert_eq!(a.denial.map(|d| d.kind.as_str()), e["denial"].as_str(), "{at}: denial");
                if let (Some(want), Some(d)) = (e["retry_after"].as_f64(), a.denial) {
                    assert!(
                        (d.retry_after - want).abs() < 0.01,
                        "{at}: retry_after {}",
                        d.retry_after
                    );
                }
                for (field, got) in [
                    ("global_remaining", a.status.global_remaining),
                    ("key_remaining", a.status.key_remaining),
                    ("concurrent_count", a.status.concurrent_count),
                ] {
                    if let Some(want) = e[field].as_i64() {
                        assert_eq!(got, want, "{at}: {field}");
                    }
                }
            }
        }
    }

    #[test]
    fn idle_keys_are_swept_when_the_map_is_full_busy_ones_stay() {
        let mut store = Store {
            sweep_at: 4,
            ..Store::default()
        };
        let lim = LimitsConfig {
            key_rpm: 60,
            ..LimitsConfig::default()
        };
        // Four keys take a request at t=0 and finish it.
        for k in ["a", "b", "c", "d"] {
            store.with(Some(k), 0.0, |c| limits::acquire(&lim, c, true, 0.0, false));
            store.keys.get_mut(k).expect("tracked").in_flight = 0;
        }
        // "d" is still in flight.
        store.keys.get_mut("d").expect("tracked").in_flight = 1;
        // One second later every bucket is full again: a new key sweeps
        // the idle ones out, the busy one stays.
        store.with(Some("e"), 1_000.0, |c| limits::acquire(&lim, c, true, 1_000.0, false));
        let mut left: Vec<_> = store.keys.keys().map(|k| k.to_string()).collect();
        left.sort();
        assert_eq!(left, ["d", "e"]);
        assert_eq!(store.sweep_at, SWEEP_AT);
    }

    #[test]
    fn the_real_clock_drives_the_buckets() {
        let l = LocalLimiter::new();
        let lim = LimitsConfig {
            key_rpm: 1,
            ..LimitsConfig::default()
        };
        let args = AcquireArgs {
            key: Some("k"),
            limits: &lim,
            force: false,
        };
        assert_eq!(l.acquire(args).denial, None);
        assert_eq!(l.in_flight("k"), 1);
        let d = l.acquire(args).denial.expect("one per minute");
        assert!(d.retry_after > 59.0 && d.retry_after <= 60.0, "{d:?}");
        l.release("k");
        assert_eq!(l.in_flight("k"), 0);
    }
}
