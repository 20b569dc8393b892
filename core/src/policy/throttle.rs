//! The auth throttle's rule (`gateway.auth_throttle`, docs/adr/039), the
//! same in every host: one token bucket per client address,
//! `max_failures` tokens refilled over `window_s`; every failed API key
//! check (the standard 401: no key, or an unknown one) takes one, and a
//! client whose bucket is empty is answered 429 `too_many_auth_failures`
//! with `Retry-After` before its key is looked at. IPv6 clients count per
//! /64. Hosts keep the buckets ([`Bucket`], absent = full) in their store:
//! the gateway in a bounded map, nginx in its shared dict.

use std::net::IpAddr;

use crate::config::AuthThrottleConfig;
use crate::policy::limits::Bucket;

/// The error code of the 429.
pub const CODE: &str = "too_many_auth_failures";

/// What a throttled client is told (`what`: the credential, such as "API
/// key"); its error type is `rate_limit`.
pub fn message(what: &str, wait_s: u64) -> String {
    format!("too many failed {what} attempts from this address; retry after {wait_s} s")
}

/// The throttle of a config.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Throttle {
    capacity: u64,
    window_ms: f64,
}

/// What a host does with a client before looking at its key.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Check {
    /// Let it try.
    Pass,
    /// Let it try; its bucket is full again: the store may forget it.
    Recovered,
    /// Refuse it: 429 with `Retry-After` of this many seconds.
    Wait(u64),
}

impl Throttle {
    /// The throttle `config` describes.
    pub fn new(config: &AuthThrottleConfig) -> Throttle {
        Throttle {
            capacity: u64::from(config.max_failures),
            window_ms: config.window_s.max(1) as f64 * 1000.0,
        }
    }

    /// Whether it throttles at all (`max_failures: 0` turns it off).
    pub fn enabled(&self) -> bool {
        self.capacity > 0
    }

    /// May the client whose bucket is `b` try a key now?
    pub fn check(&self, b: Option<&mut Bucket>, now_ms: f64) -> Check {
        let Some(b) = b.filter(|_| self.enabled()) else {
            return Check::Pass;
        };
        b.refill_over(self.capacity, self.window_ms, now_ms);
        if b.tokens >= self.capacity as f64 {
            return Check::Recovered;
        }
        if b.tokens >= 1.0 {
            return Check::Pass;
        }
        Check::Wait(b.wait_for_over(1.0, self.window_ms).ceil().max(1.0) as u64)
    }

    /// The client failed a key check: its bucket after taking a token (a
    /// full one when it had none), never below zero.
    pub fn failed(&self, b: Option<Bucket>, now_ms: f64) -> Bucket {
        let mut b = b.unwrap_or_else(|| Bucket::full(self.capacity, now_ms));
        b.refill_over(self.capacity, self.window_ms, now_ms);
        b.tokens = (b.tokens - 1.0).max(0.0);
        b
    }

    /// Seconds until `b` is full again (a store may forget it then).
    pub fn idle_ttl_s(&self, b: &Bucket) -> f64 {
        if self.capacity == 0 {
            return 0.0;
        }
        (self.capacity as f64 - b.tokens).max(0.0) * self.window_ms / 1000.0 / self.capacity as f64
    }
}

/// The address a client is counted under: IPv4 (IPv4-mapped IPv6
/// included) as is, IPv6 by its /64 (one host usually owns a whole /64).
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let mut o = v6.octets();
            o[8..].fill(0);
            IpAddr::from(o)
        }
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn throttle(max: u32, window_s: u64) -> Throttle {
        Throttle::new(&AuthThrottleConfig {
            max_failures: max,
            window_s,
            ..AuthThrottleConfig::default()
        })
    }

    #[test]
    fn max_failures_in_a_burst_then_one_per_window_over_max() {
        let t = throttle(3, 30);
        let mut b: Option<Bucket> = None;
        for i in 0..3 {
            assert_eq!(t.check(b.as_mut(), 0.0), Check::Pass, "attempt {i}");
            b = Some(t.failed(b, 0.0));
        }
        // Empty: one token comes back every 10 s.
        assert_eq!(t.check(b.as_mut(), 0.0), Check::Wait(10));
        assert_eq!(t.check(b.as_mut(), 9_500.0), Check::Wait(1));
        assert_eq!(t.check(b.as_mut(), 10_000.0), Check::Pass);
        assert_eq!(t.check(b.as_mut(), 30_000.0), Check::Recovered);
    }

    #[test]
    fn off_never_throttles() {
        let t = throttle(0, 60);
        let mut b = Some(Bucket {
            tokens: 0.0,
            at_ms: 0.0,
            limit: 0,
        });
        assert!(!t.enabled());
        assert_eq!(t.check(b.as_mut(), 0.0), Check::Pass);
    }

    #[test]
    fn ipv6_clients_count_per_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(client_key(a), client_key(b));
        assert_ne!(client_key(a), client_key(c));
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(client_key(mapped), "10.0.0.1".parse::<IpAddr>().unwrap());
    }
}
